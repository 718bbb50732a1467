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
from dataclasses import dataclass
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

from pipeline.model import ENCODERS, FLOW_SCALE, ModelConfig, forward_flops_parts, sample_layer_drop
from pipeline.weights import EXPORT_NAME, build_model, write_export
from train.augment import augment
from train.checkpoint import Checkpointer, read_init_weights, resume_step
from train.config import TrainConfig
from train.data import build_train_loader, build_val_loader, steps_per_epoch
from train.evaluation import evaluate_ap
from train.optim import build_optimizer, learning_rate, set_learning_rate
from train.parallelize import parallelize

log = logging.getLogger(__name__)

# The parts of the training loss that are logged as means over each log window.
_LOSS_PARTS = ("loss", "flow_loss", "cellprob_loss")
# Dense (no sparsity) bf16 tensor-core peak TFLOP/s per GPU, from the vendor's data sheets, for
# MFU when loop.peak_tflops is unset. Matched in order against torch.cuda.get_device_name: every
# word of a key must appear in the name, so the PCIe and NVL products come before the SXM one
# ("NVIDIA H100 80GB HBM3" is the SXM part).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
)
# Seed tags of a step's generators, so that two purposes never share a seed.
_TAG_LAYER_DROP, _TAG_DROP_COUNTS = 1, 2


# What the ranks agree on before each step (the largest wins).
_GO, _STOP, _FAILED, _NONFINITE = 0, 1, 2, 3


def peak_bf16_tflops(device_name: str) -> float | None:
    """Dense bf16 peak of the GPU named ``device_name`` (:data:`PEAK_BF16_TFLOPS`), or None.

    >>> peak_bf16_tflops("NVIDIA H100 80GB HBM3"), peak_bf16_tflops("NVIDIA H100 PCIe")
    (989.4, 756.0)
    """
    for key, tflops in PEAK_BF16_TFLOPS:
        if all(word in device_name for word in key.split()):
            return tflops
    return None


def process_group_options(cuda: bool, local_rank: int) -> dict:
    """``init_process_group``'s arguments: NCCL bound to this process's GPU, or gloo on the CPU.

    ``device_id`` makes NCCL create its communicator eagerly on the right GPU (no hang or
    guess of the device at the first collective, no second CUDA context on GPU 0).
    """
    if cuda:
        return {"backend": "nccl", "device_id": torch.device("cuda", local_rank)}
    return {"backend": "gloo"}


def init_distributed(cuda: bool, local_rank: int) -> None:
    """The process group of a torchrun worker (env://), one that also survives torchrun's restarts.

    torchrun --max-restarts relaunches every worker against the same agent store, where gloo
    would read the dead attempt's addresses under the same keys and fail to connect (torch
    2.14: "connectFullMesh failed ... Connection refused"). Each attempt gets its own keys.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(store=store, rank=rank, world_size=world_size, **process_group_options(cuda, local_rank))


@dataclass
class StepRandom:
    """The generators of one micro-batch of one rank (seeded from seed, rank, step, micro-batch)."""

    augment: torch.Generator
    """On the training device: every draw of ``train.augment.augment``."""
    layer_drop: torch.Generator
    """On the CPU, this rank's own: which samples skip each block."""
    drop_counts: torch.Generator
    """On the CPU, the same on every rank (no rank in its seed): how many samples skip each block."""


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   grad_clip: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Clip, then step the fused AdamW unless the gradient norm is not finite, all on the device.

    Returns the global gradient norm and ``found_inf`` (1.0 where the update was skipped), both
    device tensors: no host sync. The norm is over every rank's gradients (after the
    reduce-scatter), so a NaN on any rank makes every rank skip the same update.
    """
    if grad_clip is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    found_inf = (~torch.isfinite(grad_norm)).float()
    optimizer.found_inf = found_inf
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, found_inf


def layer_drop_masks(cfg: ModelConfig, batch_size: int, random: StepRandom) -> torch.Tensor | None:
    """The (batch_size, depth) layer-drop masks of a micro-batch, on the CPU; None without layer drop.

    Counts shared by every rank, samples chosen per rank (``pipeline.model.sample_layer_drop``):
    every rank runs each block on as many samples, so none waits for another at the block's
    FSDP collectives.
    """
    if cfg.layer_drop <= 0:
        return None
    return sample_layer_drop(batch_size, ENCODERS[cfg.encoder].depth, cfg.layer_drop,
                             random.layer_drop, random.drop_counts)


def step_random(seed: int, rank: int, step: int, micro: int, device: torch.device,
                generator=torch.Generator) -> StepRandom:
    """The generators of (seed, rank, step, micro-batch) for a run on ``device``.

    Augmentation draws on the training device, where its tensors are; layer drop on the CPU,
    because the host must know how many samples run each block without waiting for the device
    (``pipeline.model.sample_layer_drop`` refuses anything else). ``generator`` is the
    constructor (tests pass one that records the devices asked for).
    """
    return StepRandom(
        augment=generator(device=device).manual_seed(hash_ints((seed, rank, step, micro))),
        layer_drop=generator(device="cpu").manual_seed(hash_ints((_TAG_LAYER_DROP, seed, rank, step, micro))),
        drop_counts=generator(device="cpu").manual_seed(hash_ints((_TAG_DROP_COUNTS, seed, step, micro))),
    )


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
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if not dist.is_initialized():
            init_distributed(cuda, local_rank)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
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
        # Where this launch starts, decided before anything is written into the run directory:
        # the newest checkpoint of this run, or step 0 in a directory without checkpoints; a
        # directory holding another run's checkpoints is refused (train/checkpoint.py).
        self.start_step = resume_step(self.run_dir, cfg.to_json(), force=cfg.checkpoint.resume)
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
            self._metrics_file = _open_metrics(self.run_dir / "metrics.jsonl", self.start_step)
            from torch.utils.tensorboard import SummaryWriter

            # Events of an earlier launch past the start step are dropped from the curves.
            purge = 0 if self.start_step is None else self.start_step + 1
            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=purge)
        # Model FLOPs of one image's forward outside the blocks and in one block: a step's work
        # follows from how many samples ran each block (layer drop skips the others).
        self._flops_outside, self._flops_block = forward_flops_parts(cfg.model)
        self._depth = ENCODERS[cfg.model.encoder].depth
        self._window_flops = 0.0  # model FLOPs (forward + backward) this rank ran since the last log
        # Device flag: 1 when a step since the last check had a non-finite loss or gradient norm.
        self._nonfinite = torch.zeros((), device=self.device)
        self._last_parts: dict[str, torch.Tensor] = {}

    # --------------------------------------------------------------------------------------------
    # The loop
    # --------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        if self.start_step is not None:
            self.step = self.checkpointer.load(self.start_step)
            if self.rank == 0:
                log.info("resuming at step %d", self.step)
        self._install_signal_handlers()
        total = self.total_steps
        # The loader counts micro-batches, so a resumed stream starts at step x accumulation.
        loader = iter(build_train_loader(cfg.data, self.rank, self.world, start_step=self.step * self.accumulation,
                                          augment=cfg.augment))  # windows: the loader draws the geometry
        if cfg.loop.val_every and self.step == 0:
            self._log({"val_loss": self.validate()}, prefix="")  # the starting point of the curve
        progress = tqdm(total=total, initial=self.step, desc="train", unit="step", disable=self.rank != 0)
        window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
        window_aside = 0.0  # seconds of the window spent validating and checkpointing
        window_losses = None  # device tensor: sums of (loss, flow_loss, cellprob_loss) since the last log
        deadline = time.monotonic() + 60 * cfg.loop.max_minutes if cfg.loop.max_minutes else math.inf
        out_of_time = False
        while self.step < total:
            batches, failure = self._next_batches(loader)
            # Every rank decides here, at the same point of every step, whether to go on: a stop
            # signal (SIGTERM/SIGINT) on any rank stops all of them after a checkpoint, and a
            # non-finite loss of the last step stops them with a checkpoint of the step before.
            # This is the step's one host-device sync.
            stop = self._stop_requested or time.monotonic() > deadline
            decision = self._agree_code(_STOP if stop else (_FAILED if failure else _GO))
            if decision == _NONFINITE:
                self._raise_nonfinite()
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
            saving = self.checkpointer.should_save(self.step) or self.step == total
            validating = bool(cfg.loop.val_every) and self.step % cfg.loop.val_every == 0
            evaluating = bool(cfg.loop.eval_every) and self.step % cfg.loop.eval_every == 0
            logging_now = self.step % cfg.loop.log_every == 0 or self.step == total
            if saving or validating or evaluating or logging_now:
                # These steps sync anyway: never save, validate or log a step whose update was
                # skipped as non-finite.
                if self._agree_code(_GO) == _NONFINITE:
                    self._raise_nonfinite()
            aside_start = time.perf_counter()
            if saving:
                self.checkpointer.save(self.step)
            if validating:
                self._log({"val_loss": self.validate()}, prefix="")
            if evaluating:
                self._log(evaluate_ap(self.model, cfg, self.device), prefix="eval/")  # AP per dataset
            window_aside += time.perf_counter() - aside_start
            if logging_now:
                self._log_step(parts, window_losses, window_steps, window_start, window_aside, window_skipped)
                window_start, window_steps, window_skipped = time.perf_counter(), 0, 0
                window_aside, window_losses = 0.0, None
        progress.close()
        if self.step == total or out_of_time:
            self.export(self.run_dir / EXPORT_NAME)

    def train_step(self, batches) -> dict[str, torch.Tensor]:
        """One optimizer step over ``accumulation`` micro-batches; returns device tensors.

        No host-device sync: a non-finite gradient norm makes the fused AdamW skip the update
        on the device (``found_inf``), and the host learns of it at the next agreement.
        """
        lr = learning_rate(self.step, self.cfg.optim, self.steps_per_epoch, self.cfg.loop.epochs)
        set_learning_rate(self.optimizer, lr)
        totals = {"loss": 0.0, "flow_loss": 0.0, "cellprob_loss": 0.0}
        for micro, batch in enumerate(batches):
            random = step_random(self.cfg.seed, self.rank, self.step, micro, self.device)
            batch = batch.to(self.device, non_blocking=True)
            augmented = augment(batch, self.cfg.augment, random.augment, train=True)
            drop = self._layer_drop(len(batch), random)
            loss, flow_loss, cellprob_loss = self.forward_and_loss(augmented, drop)
            (loss / len(batches)).backward()
            totals["loss"] = totals["loss"] + loss.detach() / len(batches)
            totals["flow_loss"] = totals["flow_loss"] + flow_loss.detach() / len(batches)
            totals["cellprob_loss"] = totals["cellprob_loss"] + cellprob_loss.detach() / len(batches)

        grad_norm, found_inf = optimizer_step(self.model, self.optimizer, self.cfg.optim.grad_clip)
        self._nonfinite = torch.maximum(self._nonfinite, torch.maximum(found_inf, (~torch.isfinite(totals["loss"])).float()))
        totals["grad_norm"] = grad_norm
        totals["lr"] = torch.tensor(lr)  # on the CPU: no copy to the device
        self._last_parts = totals
        return totals

    def _layer_drop(self, batch_size: int, random: StepRandom) -> torch.Tensor | None:
        """This micro-batch's layer-drop masks (on the CPU), and its model FLOPs counted."""
        drop = layer_drop_masks(self.cfg.model, batch_size, random)
        kept_blocks = batch_size * self._depth if drop is None else int((~drop).sum())  # CPU: no device
        # Forward + backward = 3 x the forward, of the work actually done (MFU's definition).
        self._window_flops += 3 * (batch_size * self._flops_outside + kept_blocks * self._flops_block)
        return drop

    def forward_and_loss(self, augmented, drop: torch.Tensor | None = None):
        prediction = self.model(augmented.images, drop=drop)
        flow_loss, cellprob_loss = flow_and_cellprob_loss(prediction, augmented.flows, augmented.cellprob,
                                                          augmented.weight)
        return flow_loss + cellprob_loss, flow_loss, cellprob_loss

    @torch.no_grad()
    def validate(self) -> float:
        """Mean loss over the first ``loop.val_batches`` test-split batches (all ranks)."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        for index, batch in enumerate(self.val_loader):
            if index >= self.cfg.loop.val_batches:
                break
            augmented = augment(batch.to(self.device), self.cfg.augment, None, train=False)
            loss, _, _ = self.forward_and_loss(augmented)
            total += torch.stack([loss.float(), torch.ones((), device=self.device)])
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / total[1].clamp_min(1))  # host sync: validation runs rarely

    # --------------------------------------------------------------------------------------------
    # Helpers
    # --------------------------------------------------------------------------------------------

    def _raise_nonfinite(self) -> None:
        """Stop after a step whose loss or gradients were not finite (its update was skipped)."""
        self.optimizer.zero_grad(set_to_none=True)
        good = self.step - 1  # the failed step's update was skipped: the weights are the step before's
        self.checkpointer.save(good)
        parts = {k: float(v) for k, v in self._last_parts.items() if k in ("flow_loss", "cellprob_loss", "grad_norm")}
        raise NonFiniteLoss(
            f"loss is not finite at step {self.step} (flow {parts.get('flow_loss')}, cellprob "
            f"{parts.get('cellprob_loss')}, gradient norm {parts.get('grad_norm')}); its update was skipped and "
            f"the last good step {good} was checkpointed to {self.checkpointer.path(good)}. Lower optim.lr "
            f"or check the data, then relaunch (it resumes from there)."
        )

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
        """The largest ``code`` over all ranks, or :data:`_NONFINITE` when a step since the last
        call was not finite on any rank (a collective and a host sync)."""
        # torch.full fills on the device; torch.tensor([code], device=...) would copy from
        # pageable host memory, another sync on CUDA.
        tensor = torch.full((1,), float(code), device=self.device)
        tensor = torch.maximum(tensor, self._nonfinite * _NONFINITE)
        self._nonfinite = torch.zeros((), device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def _agree(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (a collective)."""
        tensor = torch.full((1,), 1.0 if flag else 0.0, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _log_step(self, parts: dict, losses: torch.Tensor, steps: int, window_start: float, aside: float,
                  skipped: int) -> None:
        """Log the window since the last log line: the loss parts are its mean over the steps and
        the ranks (one batch's loss swings with what its crops hold); grad norm and lr are the
        last step's. Host syncs and two all-reduces, only at log intervals. Throughput and MFU
        count the window's training time only: validation and checkpoints are left out."""
        losses = losses.detach().float() / (steps * self.world)
        dist.all_reduce(losses)
        # Corrupt samples skipped by every rank's loader since the last log line.
        skipped_total = torch.full((1,), float(skipped), device=self.device)
        dist.all_reduce(skipped_total)
        values = {k: float(v) for k, v in parts.items() if k not in _LOSS_PARTS}
        values |= {k: float(v) for k, v in zip(_LOSS_PARTS, losses)}
        values["skipped_samples"] = int(skipped_total.item())
        # Timed after the syncs above, so the device has finished the window's work.
        seconds = max(time.perf_counter() - window_start - aside, 1e-9)
        images_per_s = steps * self.cfg.loop.global_batch / seconds
        values["images_per_s"] = images_per_s
        values["images_per_s_per_device"] = images_per_s / self.world
        values["step_seconds"] = seconds / steps
        peak = self._peak_flops()
        if peak:
            # Every rank runs the same number of samples through each block (shared layer-drop
            # counts), so this rank's FLOPs are every rank's.
            values["mfu"] = self._window_flops / seconds / peak
        self._window_flops = 0.0
        if self.device.type == "cuda":
            values["max_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(values)

    def _peak_flops(self) -> float | None:
        if self.cfg.loop.peak_tflops:
            return self.cfg.loop.peak_tflops * 1e12
        if self.device.type == "cuda":
            tflops = peak_bf16_tflops(torch.cuda.get_device_name(self.device))
            return None if tflops is None else tflops * 1e12
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


def _open_metrics(path: Path, start_step: int | None):
    """metrics.jsonl for appending, holding only the rows of this run up to where it starts.

    A launch that resumes at step s keeps the rows of steps <= s: those after s were logged by
    a launch that failed before its next checkpoint, and are logged again now. A launch from
    step 0 starts the file anew.
    """
    kept = []
    if start_step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", math.inf) <= start_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
    path.write_text("".join(line + "\n" for line in kept))
    return open(path, "a")
