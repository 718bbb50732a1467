"""AdamW and the learning-rate schedule: a plain function of the step, as in the paper.

Paper (paper.md 1a, secondary source): AdamW with torch's defaults, lr 5e-5, weight decay 0.1 on
all parameters (norms, biases and position embeddings included), a linear warm-up over the first
10 epochs from 0, then constant, divided by 10 for the last 100 epochs and by 10 again for the
last 50. Gradients are clipped to a global norm (the paper gives no value; 1.0 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 5e-5
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay, applied to every parameter as the official code does."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_epochs: float = 10.0
    """Linear warm-up from 0 over this many epochs."""
    decay: tuple[tuple[float, float], ...] = ((100.0, 0.1), (50.0, 0.1))
    """(epochs before the end, factor): the lr is multiplied by each factor from that point on."""
    grad_clip: float | None = 1.0
    """Max global gradient norm; None disables clipping."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0; got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        if self.warmup_epochs < 0:
            raise ValueError(f"optim.warmup_epochs must be >= 0; got {self.warmup_epochs}")
        for before_end, factor in self.decay:
            if before_end < 0 or not 0 < factor:
                raise ValueError(f"optim.decay entries must be (epochs >= 0, factor > 0); got {self.decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or null; got {self.grad_clip}")


def learning_rate(step: int, cfg: OptimConfig, steps_per_epoch: int, epochs: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``epochs`` epochs.

    >>> cfg = OptimConfig(lr=1.0, warmup_epochs=2, decay=((2, 0.1), (1, 0.1)))
    >>> [round(learning_rate(s, cfg, steps_per_epoch=2, epochs=6), 4) for s in range(12)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    """
    epoch = step / steps_per_epoch
    lr = cfg.lr
    if epoch < cfg.warmup_epochs:
        lr *= epoch / cfg.warmup_epochs
    for before_end, factor in cfg.decay:
        if epoch >= epochs - before_end:
            lr *= factor
    return lr


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    # lr is set by the schedule before every step; weight decay on everything, as the official code.
    # Fused: one kernel per step, and it honours ``optimizer.found_inf`` (a device tensor), which
    # the trainer sets to skip a non-finite update without a host-device sync.
    return torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay,
        fused=True,
    )


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
