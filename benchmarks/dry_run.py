"""Size a training job before renting it: device memory, FLOPs and host memory per rank, no GPU.

    python -m benchmarks.dry_run --config configs/paper.yaml --world-size 8 [--device-memory GIB]
        [--host-memory GIB] [--gpu NAME] [--json FILE] [section.field=value ...]

The model is built as ``train.trainer.Trainer`` builds it, from the trainer's own building blocks:
``pipeline.weights.build_model`` on the meta device, ``train.parallelize.parallelize`` (FSDP2 per
block and at the root, activation checkpointing, the mixed-precision policy the GPU run would
use), ``train.optim.build_optimizer`` (fused AdamW). Every tensor is a fake one
(``FakeTensorMode``: shapes and dtypes, no storage) and the process group is torch's fake one of
``--world-size`` ranks, so this one process plays rank 0 of the whole job on the CPU (ViT-L: 25-45 s
of CPU time).
It then runs two optimizer steps as ``Trainer.train_step`` does, at the config's per-rank batch:
the largest batch the loader can deliver (``train.data.WindowBatch``: every sample's window
``data.max_side`` square at the largest dtypes), ``train.augment.augment`` on it,
the layer-drop masks the trainer draws (``step_random`` + ``layer_drop_masks``), the forward,
``flow_and_cellprob_loss``, backward, gradient clipping, the optimizer step. The shards are never
read and SAM's checkpoint is never loaded (values do not change memory or FLOPs).

It reports, per rank:

* device memory at the peak of the two steps and its parts, from torch's ``FSDPMemTracker``:
  sharded parameters, all-gathered (unsharded) parameters, gradients, optimizer state, the input
  batch, activations (tensors made in the forward, augmentation included), temporaries (made in
  the backward), all-gather and reduce-scatter buffers. The parts add up to the peak. These are
  tensor bytes: the CUDA context, NCCL's and cuBLAS's workspaces and the caching allocator's
  fragmentation come on top on a GPU (typically 1-3 GiB).
* FLOPs per image, forward + backward, executed: counted by ``torch.utils.flop_counter`` over a
  third forward + backward (the model's part only, not augmentation's), with layer drop at its
  expected rate (each block's count per sample, weighted by its keep probability). On the CPU, attention runs as
  ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's counter does not know; it is
  given the formula of the other fused attention ops. The fused attention widens each head
  (``pipeline.model.RelPosAttention`` folds the relative-position bias into the query and key), so
  executed FLOPs exceed the model FLOPs, ``3 x pipeline.model.flops_per_image(skip_dropped=True)``,
  which MFU counts (train/trainer.py). Activation checkpointing adds the recomputed forward.
* images/s per GPU that 50% MFU would mean on ``--gpu`` (its dense bf16 peak from
  ``train.trainer.PEAK_BF16_TFLOPS``).
* host memory: the training loader's bytes (``train.data.loader_host_bytes``: batches in flight,
  shuffle buffers, pinned batches, batches being assembled) plus the full fp32 model that rank 0
  builds on the CPU at start-up with SAM's checkpoint loaded beside it. Not counted: the Python
  interpreter with torch and the CUDA libraries in each process and each loader worker (a few GiB
  per rank).

Exit status 1 when the device peak exceeds ``--device-memory`` or the host peak ``--host-memory``
(both GiB per rank), naming which. ``--json FILE`` writes the figures. ``parallel.compile`` is
sized in eager mode (FakeTensorMode does not run torch.compile's CPU code generation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType
from torch.distributed.device_mesh import init_device_mesh
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

import train.augment
from pipeline.model import ENCODERS, flops_per_image
from pipeline.weights import build_model
from train.augment import LAYOUT_COLUMNS, TRANSFORM_COLUMNS, Augmented, augment
from train.config import TrainConfig, load_config
from train.data import WindowBatch, loader_host_bytes
from train.optim import build_optimizer
from train.parallelize import parallelize, uses_bf16
from train.trainer import (
    PEAK_BF16_TFLOPS,
    flow_and_cellprob_loss,
    layer_drop_masks,
    optimizer_step,
    peak_bf16_tflops,
    step_random,
)

GIB = 2**30
# The parts of the device peak, in FSDPMemTracker's categories, by the names the report uses.
DEVICE_PARTS = {
    "parameters": _FSDPRefType.SHARDED_PARAM,
    "gathered_parameters": _FSDPRefType.UNSHARDED_PARAM,
    "buffers": _FSDPRefType.BUFFER,
    "gradients": _FSDPRefType.SHARDED_GRAD,
    "gathered_gradients": _FSDPRefType.UNSHARDED_GRAD,
    "optimizer_state": _FSDPRefType.OPT,
    "inputs": _FSDPRefType.INP,
    "activations": _FSDPRefType.ACT,
    "temporaries": _FSDPRefType.TEMP,
    "all_gather_buffers": _FSDPRefType.ALL_GATHER,
    "reduce_scatter_buffers": _FSDPRefType.REDUCE_SCATTER,
}
# Steps run: the first creates the optimizer state, so the second holds everything a long run does.
STEPS = 2
# Ranks per node of the job this sizes (the host figures are also given per node).
GPUS_PER_NODE = 8

# On the CPU, scaled_dot_product_attention runs this op, unknown to torch's flop counter: count it
# as the other fused attention ops are counted (2 matmuls forward, 5 backward).
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if _CPU_SDPA not in flop_registry:

    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


if _CPU_SDPA_BACKWARD not in flop_registry:

    @register_flop_formula(_CPU_SDPA_BACKWARD)
    def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# What an op that needs real values raises under FakeTensorMode.
_FAKE_ERRORS = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException,
                GuardOnDataDependentSymNode)


class _HostOpsRunForReal(TorchFunctionMode):
    """Run torch functions whose tensor arguments are all real (not fake) for real.

    The model turns the layer-drop masks, a real CPU tensor the host owns, into per-block sample
    counts and indices (``pipeline.model.CPSAM._run_blocks``: ``nonzero``, ``len``). Under
    FakeTensorMode that would be a data-dependent shape and fail; on a GPU it is host work whose
    values are known. So host tensors keep their values here, exactly as in the training run;
    everything touching a fake (device) tensor stays fake.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [leaf for leaf in tree_leaves((args, kwargs)) if isinstance(leaf, torch.Tensor)]
        if tensors and all(type(tensor) is torch.Tensor for tensor in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _host_draws_for_real():
    """Run augment's host-side draws (which samples are degraded: a CPU generator, then
    ``nonzero``) on real tensors, as in the training run, where the host knows them without
    asking the device; under FakeTensorMode ``nonzero`` would be a data-dependent shape."""
    real = train.augment._draw_degraded

    def draw(*args, **kwargs):
        with unset_fake_temporarily():
            return real(*args, **kwargs)

    train.augment._draw_degraded = draw
    try:
        yield
    finally:
        train.augment._draw_degraded = real


@contextlib.contextmanager
def _sharding_propagation_in_its_own_fake_mode():
    """Keep DTensor's shape inference out of the memory count.

    DTensor infers an op's output shape by running it on fake tensors of the *global* shapes
    (``torch.distributed.tensor._sharding_prop``), in the fake mode it detects or else a fresh
    one. In a GPU run that is a fresh one, which ``FSDPMemTracker`` ignores; here it would find
    the dry run's own mode, and the tracker would count those global-shape tensors as memory
    (the fused AdamW step, whose ``found_inf`` is a plain tensor among DTensors, showed 4 x the
    full model as optimizer state). So the propagation gets a fresh mode here too.
    """
    from torch.distributed.tensor import _sharding_prop

    detect = _sharding_prop.detect_fake_mode
    _sharding_prop.detect_fake_mode = lambda *args: None
    try:
        yield
    finally:
        _sharding_prop.detect_fake_mode = detect


def parse(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dry_run",
        description="Size a training job without a GPU: peak device memory and its parts, FLOPs per "
        "image and host memory per rank, from two fake optimizer steps of the real model. Exits 1 "
        "when a budget is exceeded.",
        epilog="Overrides: section.field=value as for train/main.py, e.g. data.batch_size=64 "
        "loop.global_batch=512 parallel.activation_checkpointing=true.",
    )
    parser.add_argument("--config", type=Path, required=True, help="YAML config (configs/paper.yaml)")
    parser.add_argument("--world-size", type=int, default=GPUS_PER_NODE, help="ranks (GPUs) of the job (default 8)")
    parser.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                        help="device memory budget per rank in GiB (default 80)")
    parser.add_argument("--host-memory", type=float, default=64.0, metavar="GIB",
                        help="host memory budget per rank in GiB (default 64)")
    parser.add_argument("--gpu", default="H100 SXM",
                        help="GPU whose dense bf16 peak gives the images/s at 50%% MFU (default 'H100 SXM'; "
                        f"known: {', '.join(key for key, _ in PEAK_BF16_TFLOPS)})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the figures to FILE as JSON")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error(f"--world-size must be >= 1; got {args.world_size}")
    for name in ("device_memory", "host_memory"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0 GiB; got {getattr(args, name)}")
    if peak_bf16_tflops(args.gpu) is None:
        parser.error(f"--gpu {args.gpu!r} is not a known GPU; known: {', '.join(key for key, _ in PEAK_BF16_TFLOPS)}")
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))
    per_step = cfg.data.batch_size * args.world_size
    if cfg.loop.global_batch % per_step:
        parser.error(
            f"loop.global_batch ({cfg.loop.global_batch}) must be a multiple of data.batch_size "
            f"({cfg.data.batch_size}) x --world-size ({args.world_size}) = {per_step}, as the trainer "
            f"requires; set loop.global_batch=..."
        )
    return args, cfg


def _fake_batch(batch_size: int, side: int) -> WindowBatch:
    """The largest training batch the loader can deliver: ``train.data.WindowBatch`` with every
    window ``side`` x ``side`` pixels (a sample's ``data.max_side`` crop, all of which a strong
    zoom-out reads) of 3-channel uint16 images, uint32 labels, flows and an ignore mask."""
    pixels = side * side
    layout = torch.zeros((batch_size, len(LAYOUT_COLUMNS)), dtype=torch.int64)
    transform = torch.zeros((batch_size, len(TRANSFORM_COLUMNS)))
    return WindowBatch(
        image_bytes=torch.zeros(batch_size * pixels * 3 * 2, dtype=torch.uint8),
        label_bytes=torch.zeros(batch_size * pixels * 4, dtype=torch.uint8),
        flows=torch.zeros(batch_size * 2 * pixels, dtype=torch.float16),
        ignore=torch.zeros(batch_size * pixels, dtype=torch.bool),
        layout=layout, transform=transform, bounds=torch.zeros((batch_size, 3, 2)),
        diameters=torch.full((batch_size,), 30.0), datasets=[""] * batch_size, keys=[""] * batch_size,
        image_itemsize=2, label_itemsize=4,
    )


def _augmented_stand_in(batch_size: int, side: int) -> Augmented:
    """What ``augment`` returns, for when it cannot run under FakeTensorMode."""
    shape = (batch_size, side, side)
    return Augmented(images=torch.zeros((batch_size, 3, side, side)),
                     flows=torch.zeros((batch_size, 2, side, side)), cellprob=torch.zeros(shape),
                     labels=torch.zeros(shape, dtype=torch.int32), weight=torch.ones(shape))


def _block_flops(counts: dict[str, dict], depth: int) -> list[int]:
    """FLOPs counted inside each transformer block (module names end with ``blocks.<i>``)."""
    per_block = [0] * depth
    for name, ops in counts.items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] == "blocks" and parts[-1].isdigit():
            per_block[int(parts[-1])] += sum(ops.values())
    return per_block


def dry_run(cfg: TrainConfig, world_size: int, gpu: str = "H100 SXM") -> dict:
    """Two fake optimizer steps of rank 0 of a ``world_size``-rank job; returns the report's figures."""
    # Registers the "fake" process-group backend.
    from torch.testing._internal.distributed.fake_pg import FakeStore

    start = time.perf_counter()
    batch_size, depth = cfg.data.batch_size, ENCODERS[cfg.model.encoder].depth
    accumulation = cfg.loop.global_batch // (batch_size * world_size)
    # The GPU run's policy: "auto" is bf16 on CUDA, but this mesh is a CPU one.
    parallel = cfg.parallel
    if uses_bf16(parallel, "cuda"):
        parallel = dataclasses.replace(parallel, mixed_precision="bf16")
    notes = []
    if parallel.compile:
        parallel = dataclasses.replace(parallel, compile=False)
        notes.append("parallel.compile=true is sized in eager mode (torch.compile does not run under "
                     "FakeTensorMode here); compiled blocks usually need a little less activation memory")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        with FakeTensorMode(allow_non_fake_inputs=True), _sharding_propagation_in_its_own_fake_mode():
            # Trainer.__init__ steps 2-4: the model on the meta device, sharded, materialised, the optimizer.
            with torch.device("meta"):
                model = build_model(cfg.model)
            parallelize(model, mesh, parallel)
            model.to_empty(device="cpu")
            model.train()
            optimizer = build_optimizer(model, cfg.optim)
            model_name = type(model).__name__  # the flop counter's name of the root module
            # FSDP2's parameters are DTensors, whose shape (and numel) is the whole parameter's.
            parameters = sum(p.numel() for p in model.parameters())
            # The loader's batch, on the device for the whole step as in Trainer.train_step.
            device_batch = _fake_batch(batch_size, cfg.data.max_side)
            augment_error = []

            def forward_backward(step: int, micro: int) -> torch.Tensor | None:
                """Trainer.train_step's work for one micro-batch; returns its layer-drop masks."""
                random = step_random(cfg.seed, 0, step, micro, torch.device("cpu"))
                augmented = None
                if not augment_error:
                    try:
                        with _host_draws_for_real():
                            augmented = augment(device_batch, cfg.augment, random.augment, train=True)
                    except _FAKE_ERRORS as error:  # reported, then sized without augmentation
                        augment_error.append(f"{type(error).__name__}: {error}")
                if augmented is None:
                    augmented = _augmented_stand_in(batch_size, cfg.augment.crop_size)
                # Drawn on the CPU for real, as Trainer._layer_drop does.
                with unset_fake_temporarily():
                    drop = layer_drop_masks(cfg.model, batch_size, random)
                with _HostOpsRunForReal():
                    prediction = model(augmented.images, drop=drop)
                flow_loss, cellprob_loss = flow_and_cellprob_loss(prediction, augmented.flows, augmented.cellprob,
                                                                  augmented.weight)
                ((flow_loss + cellprob_loss) / accumulation).backward()
                return drop

            tracker = FSDPMemTracker(model, optimizer)
            tracker.track_inputs(tuple(value for value in vars(device_batch).values()
                                       if isinstance(value, torch.Tensor)))
            with tracker:
                for step in range(STEPS):
                    for micro in range(accumulation):
                        forward_backward(step, micro)
                        # Module-wise stats are per forward; the overall peak is kept across them.
                        tracker.reset_mod_stats()
                    optimizer_step(model, optimizer, cfg.optim.grad_clip)  # as Trainer.train_step
            snapshot = tracker.get_tracker_snapshot("peak")
            between_steps = tracker.get_tracker_snapshot("current")
            # FLOPs of a third forward + backward, apart: with the counter active inside the
            # tracker, the recomputed activations of checkpointed blocks stayed alive through the
            # backward (10x the temporaries of vit_b with activation checkpointing).
            with FlopCounterMode(display=False) as flops:
                drop = forward_backward(STEPS, 0)
            optimizer.zero_grad(set_to_none=True)
    finally:
        dist.destroy_process_group()
    augment_error = augment_error[0] if augment_error else None

    device_snapshot = next(iter(snapshot.values()))
    parts = {name: device_snapshot.get(kind, 0) / GIB for name, kind in DEVICE_PARTS.items()}
    peak = device_snapshot["Total"] / GIB
    # What stays on the device from one step to the next (the input batch aside).
    held = next(iter(between_steps.values()))
    between = {name: held.get(kind, 0) / GIB for name, kind in DEVICE_PARTS.items() if name != "inputs"}

    # FLOPs per image at layer drop's expected rate: what ran outside the blocks per image, plus
    # each block's FLOPs per sample that ran it (all blocks cost the same per sample) times the
    # expected number of blocks a sample runs.
    counts = flops.get_flop_counts()
    # The model's own (its forward and backward are attributed to its root module); the rest of
    # the step's counted FLOPs are augmentation's (its blur and resampling matmuls).
    total = sum(counts[model_name].values())
    augment_flops = (flops.get_total_flops() - total) / batch_size
    per_block = _block_flops(counts, depth)
    # A block no sample keeps still runs one sample (pipeline.model.CPSAM._run_blocks).
    ran = [batch_size] * depth if drop is None else [max(int(k), 1) for k in (~drop).sum(dim=0)]
    per_sample_block = sum(per_block) / sum(ran)
    keep = 1 - torch.linspace(0.0, cfg.model.layer_drop, depth, dtype=torch.float64)
    expected_blocks = float(keep.sum()) if cfg.model.layer_drop > 0 else float(depth)
    executed = (total - sum(per_block)) / batch_size + per_sample_block * expected_blocks
    model_flops = 3 * flops_per_image(cfg.model, skip_dropped=True)
    peak_tflops = peak_bf16_tflops(gpu)

    host = loader_host_bytes(cfg.data)
    # Rank 0 builds the full fp32 model on the CPU at start-up (Trainer.__init__ step 3), with SAM's
    # checkpoint as torch.load returns it alongside while the encoder's weights are copied in.
    model_bytes = 4 * parameters
    checkpoint_bytes = 0
    if cfg.model.sam_checkpoint is not None:
        path = Path(cfg.model.sam_checkpoint)
        if path.is_file():
            checkpoint_bytes = path.stat().st_size
        else:
            # SAM's file holds the encoder (most of the model) plus the small prompt encoder and decoder.
            checkpoint_bytes = model_bytes
            notes.append(f"model.sam_checkpoint {path} is not here: counted at the model's fp32 size "
                         f"({model_bytes / GIB:.2f} GiB; SAM's released vit_l file is about 1.2 GB)")
    host_parts = {
        "loader_in_flight": host["in_flight"] / GIB,
        "loader_shuffle": host["shuffle"] / GIB,
        "loader_pinned": host["pinned"] / GIB,
        "initial_model": model_bytes / GIB,
        "sam_checkpoint": checkpoint_bytes / GIB,
    }
    host_peak = sum(host_parts.values())
    if augment_error is not None:
        notes.append(f"train.augment.augment could not run under FakeTensorMode ({augment_error}); its memory is "
                     f"not counted, only its output at the crop size")
    return {
        "config": cfg.to_dict(),
        "world_size": world_size,
        "batch_size": batch_size,
        "accumulation": accumulation,
        "max_side": cfg.data.max_side,
        "mixed_precision": "bf16" if uses_bf16(parallel, "cpu") else "fp32",
        "activation_checkpointing": parallel.activation_checkpointing,
        "reshard_after_forward": parallel.reshard_after_forward,
        "layer_drop": cfg.model.layer_drop,
        "parameters": parameters,
        "augment_counted": augment_error is None,
        "device_peak_gib": peak,
        "device_parts_gib": parts,
        "device_between_steps_gib": between,
        "flops_per_image": executed,
        "model_flops_per_image": model_flops,
        "augment_flops_per_image": augment_flops,
        # What the counter saw in the model's forward + backward of one micro-batch, per op.
        "counted_flops_by_op": {str(op): int(n) for op, n in counts[model_name].items()},
        "gpu": gpu,
        "gpu_peak_bf16_tflops": peak_tflops,
        "images_per_s_at_50_mfu": 0.5 * peak_tflops * 1e12 / model_flops,
        "host_peak_gib": host_peak,
        "host_parts_gib": host_parts,
        # Every rank of a node has its loader; only rank 0 builds the initial model.
        "host_node_gib": host["total"] / GIB * min(world_size, GPUS_PER_NODE)
        + host_parts["initial_model"] + host_parts["sam_checkpoint"],
        "notes": notes,
        "seconds": time.perf_counter() - start,
    }


def _size(gib: float) -> str:
    return f"{gib:8.2f} GiB" if gib >= 0.1 else f"{gib * 1024:8.1f} MiB"


def report(figures: dict, device_budget: float, host_budget: float) -> tuple[str, list[str]]:
    """The readable table, and the budgets exceeded (empty when the job fits)."""
    rows = [
        f"dry run: {figures['config']['model']['encoder']}, world size {figures['world_size']}, batch "
        f"{figures['batch_size']} per rank (x{figures['accumulation']} accumulation), {figures['mixed_precision']}, "
        f"activation checkpointing {'on' if figures['activation_checkpointing'] else 'off'}, "
        f"layer drop {figures['layer_drop']}, {figures['parameters'] / 1e6:.1f}M parameters",
        "",
        f"device memory per rank      {_size(figures['device_peak_gib'])} peak  (budget {device_budget:g} GiB)",
    ]
    rows += [f"  {name:<26}{_size(value)}" for name, value in figures["device_parts_gib"].items() if value > 0]
    rows.append(f"  {'held between steps':<26}{_size(sum(figures['device_between_steps_gib'].values()))} "
                f"(parameters, optimizer state)")
    rows += [
        "",
        f"FLOPs per image, fwd+bwd    {figures['flops_per_image'] / 1e9:8.1f} GFLOP executed (counted)",
        f"  model FLOPs (MFU's)       {figures['model_flops_per_image'] / 1e9:8.1f} GFLOP "
        f"(3 x pipeline.model.flops_per_image, layer drop skipped)",
        f"  at 50% MFU on {figures['gpu']:<12}{figures['images_per_s_at_50_mfu']:8.1f} images/s per GPU "
        f"({figures['gpu_peak_bf16_tflops']:g} TFLOP/s dense bf16)",
        "",
        f"host memory per rank        {_size(figures['host_peak_gib'])} peak  (budget {host_budget:g} GiB; "
        f"{figures['host_node_gib']:.1f} GiB per node of {min(figures['world_size'], GPUS_PER_NODE)})",
    ]
    rows += [f"  {name:<26}{_size(value)}" for name, value in figures["host_parts_gib"].items() if value > 0]
    rows += [f"note: {note}" for note in figures["notes"]]
    exceeded = []
    if figures["device_peak_gib"] > device_budget:
        exceeded.append(f"device memory: {figures['device_peak_gib']:.2f} GiB per rank exceeds --device-memory "
                        f"{device_budget:g} GiB")
    if figures["host_peak_gib"] > host_budget:
        exceeded.append(f"host memory: {figures['host_peak_gib']:.2f} GiB per rank exceeds --host-memory "
                        f"{host_budget:g} GiB")
    rows += [""] + ([f"DOES NOT FIT: {line}" for line in exceeded] or ["fits both budgets"])
    return "\n".join(rows), exceeded


def main(argv=None) -> int:
    args, cfg = parse(argv)
    figures = dry_run(cfg, args.world_size, args.gpu)
    table, exceeded = report(figures, args.device_memory, args.host_memory)
    figures |= {"device_budget_gib": args.device_memory, "host_budget_gib": args.host_memory,
                "fits": not exceeded, "exceeded": exceeded}
    print(table)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if exceeded else 0


if __name__ == "__main__":
    sys.exit(main())
