"""GPU-side augmentation (``train.augment.augment``) against the training step it feeds.

    python -m benchmarks.bench_augment [--config configs/tiny-cpu.yaml] [--batches 40] [--repeats 3]
                                       [--device cpu] [--shards DIR] [override ...]

Reads ``--batches`` real batches from the config's training stream (``train.data``, the
trainer's loader, on synthetic shards built in a temporary folder unless ``--shards`` is
given), moves them to the device once, then times ``augment`` over all of them, ``--repeats``
times, and one forward + backward of the config's model on augmented batches (the work the
augmentation sits in front of; bf16 autocast on a GPU, as the trainer does). Reports the median
milliseconds per batch of each and their ratio: the fraction of a training step, apart from the
optimizer and FSDP, that augmentation takes. One JSON line; nothing is asserted.

Examples: the learning check's setting on the CPU (one thread, as each torchrun rank has),
    OMP_NUM_THREADS=1 python -m benchmarks.bench_augment --config configs/learn-check.yaml
and the paper's on a GPU (batch 32 per device),
    python -m benchmarks.bench_augment --config configs/paper.yaml --device cuda \
        model.sam_checkpoint=null data.batch_size=32 loop.global_batch=32
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.bench_train import make_shards
from benchmarks.common import cpu_description, sync
from pipeline.model import build_model
from train.augment import augment
from train.config import load_config
from train.data import build_train_loader
from train.trainer import layer_drop_masks, step_random

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny-cpu.yaml")
    parser.add_argument("--batches", type=int, default=40, help="distinct batches timed per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the batches (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shards", type=Path, help="an existing shard root (default: synthetic, built here)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, section.field=value")
    args = parser.parse_args()
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        shards = args.shards or make_shards(Path(tmp), n_train=128)
        # The main process decodes (no workers): only the batches are wanted, not the loader's speed.
        cfg = load_config(args.config, [f"data.root={shards}", "data.num_workers=0", *args.overrides])
        stream = iter(build_train_loader(cfg.data, rank=0, world_size=1))
        batches = [next(stream).to(device) for _ in range(args.batches)]
    sync(device)

    # A fresh generator per batch, seeded as the trainer seeds each step's (the host's draws, which
    # samples are degraded, follow the generator's seed).
    generators = [step_random(0, 0, index, 0, device).augment for index in range(len(batches))]
    augment(batches[0], cfg.augment, generators[0])  # warm-up: first-call allocations and kernels
    augment_ms = []
    for _ in range(args.repeats):
        sync(device)
        start = time.perf_counter()
        for batch, generator in zip(batches, generators):
            augment(batch, cfg.augment, generator)
        sync(device)
        augment_ms.append(1e3 * (time.perf_counter() - start) / len(batches))

    model = build_model(cfg.model).to(device).train()
    inputs = [augment(batch, cfg.augment, generator).images for batch, generator in list(zip(batches, generators))[:8]]
    step_ms = []
    for index in range(1 + args.repeats * len(inputs)):  # the first is a warm-up
        sync(device)
        start = time.perf_counter()
        # Layer drop as the trainer draws it: on the CPU (a device generator would be refused).
        images = inputs[index % len(inputs)]
        drop = layer_drop_masks(cfg.model, len(images), step_random(0, 0, index, 0, device))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(images, drop=drop)
        out.float().square().mean().backward()
        sync(device)
        if index:
            step_ms.append(1e3 * (time.perf_counter() - start))

    augment_median, step_median = statistics.median(augment_ms), statistics.median(step_ms)
    record = dict(
        name="augment", config=args.config.name, encoder=cfg.model.encoder, batch=cfg.data.batch_size,
        crop_size=cfg.augment.crop_size, degrade_prob=cfg.augment.degrade_prob,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description(),
        threads=torch.get_num_threads(), torch=torch.__version__, batches=len(batches),
        augment_ms_per_batch=round(augment_median, 2), augment_ms_runs=[round(t, 2) for t in augment_ms],
        model_step_ms=round(step_median, 2),
        augment_over_model_step=round(augment_median / step_median, 3),
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
