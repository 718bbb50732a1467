"""The training loop: torchrun processes, FSDP2, GPU-side augmentation, DCP checkpoints.

``Trainer.__init__`` builds in a fixed order (STYLE.md section 4); ``train()`` is a flat loop of
``train_step``, maybe checkpoint, maybe validate, maybe log. Randomness that shapes a step (the
data stream, augmentation, layer drop) is drawn from generators seeded by (seed, rank, step), so
a run resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from tqdm import tqdm

from pipeline.model import FLOW_SCALE, flops_per_image
from pipeline.weights import EXPORT_NAME, build_model, write_export
from train.augment import augment
from train.checkpoint import Checkpointer, read_init_weights
from train.config import TrainConfig
from train.data import build_train_loader, build_val_loader, steps_per_epoch
from train.optim import build_optimizer, learning_rate, set_learning_rate
from train.parallelize import parallelize

log = logging.getLogger(__name__)

# The parts of the training loss that are logged as means over each log window.
_LOSS_PARTS = ("loss", "flow_loss", "cellprob_loss")
# Peak dense bf16 TFLOP/s per device, for the MFU estimate when loop.peak_tflops is unset.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# What the ranks agree on before each step (the largest wins).
_GO, _STOP, _FAILED = 0, 1, 2


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good step was checkpointed."""


def hash_ints(parts) -> int:
    """A 63-bit seed from integers (FNV-style), the same in every process and run."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 % (1 << 64)
    return value >> 1


def flow_and_cellprob_loss(prediction: torch.Tensor, flows: torch.Tensor, cellprob: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cellpose's loss (paper.md 1b), per pixel weighted by ``weight`` (0 = don't care).

    Flow part: MSE between the predicted flows and 5 x the unit target flows, halved, averaged
    over all pixels (background included, target 0 there). Cellprob part: BCE-with-logits against
    the binary target. With every weight 1 both are plain means, exactly as Cellpose computes them.
    """
    prediction = prediction.float()
    norm = weight.sum().clamp_min(1.0)
    flow_error = (prediction[:, :2] - FLOW_SCALE * flows).square().mean(dim=1)
    flow_loss = (flow_error * weight).sum() / norm / 2
    bce = F.binary_cross_entropy_with_logits(prediction[:, 2], cellprob, reduction="none")
    cellprob_loss = (bce * weight).sum() / norm
    return flow_loss, cellprob_loss


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        # 1. Process group and device mesh: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK.
        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        per_step = cfg.data.batch_size * self.world
        if cfg.loop.global_batch % per_step:
            raise ValueError(
                f"loop.global_batch ({cfg.loop.global_batch}) must be a multiple of data.batch_size "
                f"({cfg.data.batch_size}) x ranks ({self.world}) = {per_step}"
            )
        self.accumulation = cfg.loop.global_batch // per_step
        # An epoch is data.samples_per_epoch samples (default: every training sample once).
        self.steps_per_epoch = max(1, steps_per_epoch(cfg.data, self.world) // self.accumulation)
        self.total_steps = cfg.loop.total_steps(self.steps_per_epoch)
        self.run_dir = Path(cfg.run_dir)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(cfg.to_json())

        # 2. Model on the meta device, then sharded: no rank ever holds a full copy but rank 0
        #    while it loads the initial weights.
        with torch.device("meta"):
            self.model = build_model(cfg.model)
        parallelize(self.model, self.mesh, cfg.parallel)

        # 3. Materialise and initialise: rank 0 builds the full model on the CPU (seeded init;
        #    build_model loads SAM's encoder weights when model.sam_checkpoint is set), or reads
        #    model.init_checkpoint's weights to fine-tune, and broadcasts them into the shards.
        self.model.to_empty(device=self.device)
        full_state = {}
        if self.rank == 0 and cfg.model.init_checkpoint is not None:
            full_state = read_init_weights(cfg.model.init_checkpoint, cfg.model)
            log.info("starting from the weights of %s", cfg.model.init_checkpoint)
        elif self.rank == 0:
            torch.manual_seed(cfg.seed)
            initial = build_model(cfg.model)
            full_state = initial.state_dict()
            del initial
        set_model_state_dict(
            self.model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        )
        self.model.train()

        # 4. Optimizer; the learning rate is a function of the step (train/optim.py).
        self.optimizer = build_optimizer(self.model, cfg.optim)

        # 5. Loaders: the training stream is opened in train(), once the start step is known.
        self.val_loader = build_val_loader(cfg.data, self.rank, self.world) if cfg.loop.val_every else None

        # 6. Checkpointer.
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, self.model, self.optimizer,
                                         config_json=cfg.to_json())
        self.step = 0
        self._stop_requested = False
        self._metrics_file = None
        self._tensorboard = None
        if self.rank == 0:
            self._metrics_file = open(self.run_dir / "metrics.jsonl", "a")
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        # Training forwards skip the samples a block drops, so count only the work done.
        self.flops_per_image = flops_per_image(cfg.model, skip_dropped=True)

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        if cfg.checkpoint.resume:
            resumed = self.checkpointer.load()
            self.step = resumed or 0
            if self.rank == 0:
                log.info("resuming at step %d" if resumed is not None else "no checkpoint to resume; starting at %d",
                         self.step)
        self._install_signal_handlers()
        total = self.total_steps
        # The loader counts micro-batches, so a resumed stream starts at step x accumulation.
        loader = iter(build_train_loader(cfg.data, self.rank, self.world, start_step=self.step * self.accumulation))
        if cfg.loop.val_every and self.step == 0:
            self._log({"val_loss": self.validate()}, prefix="")  # the starting point of the curve
        progress = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=self.rank != 0)
        window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
        window_losses = None  # device tensor: sums of (loss, flow_loss, cellprob_loss) since the last log
        deadline = time.monotonic() + 60 * cfg.loop.max_minutes if cfg.loop.max_minutes else math.inf
        out_of_time = False
        while self.step < total:
            batches, failure = self._next_batches(loader)
            # Every rank decides here, at the same point of every step, whether to go on: a stop
            # signal (SIGTERM/SIGINT) on any rank stops all of them after a checkpoint.
            stop = self._stop_requested or time.monotonic() > deadline
            decision = self._agree_code(_STOP if stop else (_FAILED if failure else _GO))
            if decision == _FAILED:
                raise failure or RuntimeError("another rank's data loader failed; see its traceback")
            if decision == _STOP:
                out_of_time = not self._agree(self._stop_requested)
                log.warning("%s: checkpointing step %d and stopping",
                            "time limit reached" if out_of_time else "stop requested", self.step)
                self.checkpointer.save(self.step)
                break
            window_skipped += sum(getattr(b, "skipped", 0) for b in batches)
            parts = self.train_step(batches)
            step_losses = torch.stack([parts[k] for k in _LOSS_PARTS])
            window_losses = step_losses if window_losses is None else window_losses + step_losses
            self.step += 1
            window_steps += 1
            progress.update()
            if self.checkpointer.should_save(self.step) or self.step == total:
                self.checkpointer.save(self.step)
            if cfg.loop.val_every and self.step % cfg.loop.val_every == 0:
                self._log({"val_loss": self.validate()}, prefix="")
            if self.step % cfg.loop.log_every == 0 or self.step == total:
                elapsed = time.perf_counter() - window_start
                self._log_step(parts, window_losses, window_steps, elapsed, window_skipped)
                window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
                window_losses = None
        progress.close()
        if self.step == total or out_of_time:
            self.export(self.run_dir / EXPORT_NAME)

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accumulation`` micro-batches; returns device tensors."""
        lr = learning_rate(self.step, self.cfg.optim, self.steps_per_epoch, self.cfg.loop.epochs)
        set_learning_rate(self.optimizer, lr)
        totals = {"loss": 0.0, "flow_loss": 0.0, "cellprob_loss": 0.0}
        for micro, batch in enumerate(batches):
            generator = self._generator(micro)
            batch = batch.to(self.device, non_blocking=True)
            augmented = augment(batch, self.cfg.augment, generator, train=True)
            loss, flow_loss, cellprob_loss = self.forward_and_loss(augmented, generator)
            (loss / len(batches)).backward()
            totals["loss"] = totals["loss"] + loss.detach() / len(batches)
            totals["flow_loss"] = totals["flow_loss"] + flow_loss.detach() / len(batches)
            totals["cellprob_loss"] = totals["cellprob_loss"] + cellprob_loss.detach() / len(batches)

        # Finite check before the update: one small all-reduce and a host sync per step, the price
        # of never applying a NaN update.
        if self._agree(not bool(torch.isfinite(totals["loss"]).item())):
            self.optimizer.zero_grad(set_to_none=True)
            self.checkpointer.save(self.step)
            raise NonFiniteLoss(
                f"loss is not finite at step {self.step + 1} (flow {float(totals['flow_loss'])}, "
                f"cellprob {float(totals['cellprob_loss'])}); the last good step {self.step} was checkpointed "
                f"to {self.checkpointer.path(self.step)}. Lower optim.lr or check the data, then --resume."
            )
        if self.cfg.optim.grad_clip is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        totals["grad_norm"] = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        totals["lr"] = torch.tensor(lr)
        return totals

    def forward_and_loss(self, augmented, generator=None):
        prediction = self.model(augmented.images, generator=generator)
        flow_loss, cellprob_loss = flow_and_cellprob_loss(prediction, augmented.flows, augmented.cellprob,
                                                          augmented.weight)
        return flow_loss + cellprob_loss, flow_loss, cellprob_loss

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the first ``loop.val_batches`` test-split batches (all ranks)."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        generator = torch.Generator(self.device).manual_seed(self.cfg.seed)
        for index, batch in enumerate(self.val_loader):
            if index >= self.cfg.loop.val_batches:
                break
            augmented = augment(batch.to(self.device), self.cfg.augment, generator, train=False)
            loss, _, _ = self.forward_and_loss(augmented)
            total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))  # host sync: validation runs rarely

    # --------------------------------------------------------------------------------------------
    # Helpers
    # --------------------------------------------------------------------------------------------

    def _generator(self, micro: int) -> torch.Generator:
        """Augmentation and layer-drop randomness of (seed, rank, step, micro-batch)."""
        return torch.Generator(self.device).manual_seed(hash_ints((self.cfg.seed, self.rank, self.step, micro)))

    def _next_batches(self, loader) -> tuple[list | None, Exception | None]:
        """The next step's micro-batches, or the loader's failure."""
        try:
            return [next(loader) for _ in range(self.accumulation)], None
        except RuntimeError as error:
            # A scheduler that signals the whole process group (SLURM, Ctrl-C) stops the
            # loader's workers too, which fails the fetch; give this process's own signal
            # handler a moment to run so that this counts as the stop it is.
            time.sleep(1.0)
            return None, error

    def _agree_code(self, code: int) -> int:
        """The largest ``code`` over all ranks (a collective)."""
        tensor = torch.tensor([float(code)], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        tensor = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _log_step(self, parts: dict, losses: torch.Tensor, steps: int, seconds: float, skipped: int) -> None:
        """Log the window since the last log line: the loss parts are its mean over the steps and
        the ranks (one batch's loss swings with what its crops hold); grad norm and lr are the
        last step's. Host sync and one all-reduce, only at log intervals."""
        losses = losses.detach().float() / (steps * self.world)
        dist.all_reduce(losses)
        values = {k: float(v) for k, v in parts.items() if k not in _LOSS_PARTS}
        values |= {k: float(v) for k, v in zip(_LOSS_PARTS, losses)}
        images_per_s = steps * self.cfg.loop.global_batch / max(seconds, 1e-9)
        values["images_per_s"] = images_per_s
        values["images_per_s_per_device"] = images_per_s / self.world
        peak = self._peak_flops()
        if peak:
            # Forward + backward ~ 3 x the forward FLOPs (of the blocks layer drop keeps).
            values["mfu"] = 3 * self.flops_per_image * values["images_per_s_per_device"] / peak
        # Corrupt samples skipped by every rank's loader since the last log line.
        skipped_total = torch.tensor([float(skipped)], device=self.device)
        dist.all_reduce(skipped_total)
        values["skipped_samples"] = int(skipped_total.item())
        if self.device.type == "cuda":
            values["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(values)

    def _peak_flops(self) -> float | None:
        if self.cfg.loop.peak_tflops:
            return self.cfg.loop.peak_tflops * 1e12
        if self.device.type == "cuda":
            name = torch.cuda.get_device_name(self.device)
            for key, tflops in _PEAK_TFLOPS.items():
                if key in name:
                    return tflops * 1e12
        return None

    def _log(self, values: dict, prefix: str = "train/") -> None:
        if self.rank != 0:
            return
        record = {"step": self.step, "time": time.time(), **values}
        self._metrics_file.write(json.dumps(record) + "\n")
        self._metrics_file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(prefix + key, value, self.step)
        log.info("step %d %s", self.step, " ".join(f"{k}={v:.4g}" for k, v in values.items()))

    def export(self, path: Path) -> None:
        """The current weights as one file in Cellpose's cpsam layout, with its json (a collective)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            write_export(path, state, self.cfg.model, self.step)
            log.info("exported %s", path)
        dist.barrier()

    def close(self) -> None:
        self.checkpointer.close()
        if self._metrics_file:
            self._metrics_file.close()
        if self._tensorboard:
            self._tensorboard.close()
