"""Training throughput: images/s per device and estimated MFU for a config, under torchrun.

    python -m benchmarks.bench_train [--config configs/tiny-cpu.yaml] [--nproc 2] [--steps 40]
                                     [--shards DIR] [override ...]

Runs the real trainer (``torchrun --standalone --nproc_per_node=N train/main.py``) for
``--steps`` optimizer steps on synthetic shards (built in a temporary folder unless ``--shards``
is given), then reads its ``metrics.jsonl``: the median over the log windows after the first
(which holds start-up and compilation) of images/s per device, and of MFU where the device's peak
is known (``loop.peak_tflops`` or a known GPU). On the CPU, where no peak is set, the achieved
TFLOP/s (3 x forward FLOPs of the blocks actually run x images/s) is reported instead.

GPU example (goal: >= 280 img/s per H100 for ViT-L in bf16 at 256x256, about 50% MFU of the executed model FLOPs):
    python -m benchmarks.bench_train --config configs/paper.yaml --nproc 1 --steps 60 \\
        model.sam_checkpoint=null data.batch_size=32 loop.global_batch=32 data.num_workers=8
(the paper's per-GPU batch; benchmarks/gpu_check.py runs this with the other GPU checks).
One JSON line; nothing is asserted.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import cpu_description
from pipeline.model import flops_per_image
from shardgen.build import BuildConfig, build_dataset
from train.config import load_config

REPO = Path(__file__).resolve().parents[1]


def python_path() -> str:
    """The repository first, then whatever PYTHONPATH already holds (packages carried as wheels
    to a machine, as benchmarks/gpu_check.py does, must stay visible to the trainer)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))


def make_shards(folder: Path, n_train: int) -> Path:
    src = folder / "src"
    src.mkdir(parents=True)
    (src / "counts.txt").write_text(f"train {n_train}\ntest 8\n")
    out = folder / "shards"
    build_dataset("synthetic", src, out, config=BuildConfig(workers=min(4, os.cpu_count() or 1), max_samples=16))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny-cpu.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes (devices) for torchrun")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--shards", type=Path, help="an existing shard root (default: synthetic, built here)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides, section.field=value")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = args.shards or make_shards(tmp, n_train=128)
        run_dir = tmp / "run"
        log_every = max(1, args.steps // 8)
        overrides = [f"data.root={shards}", f"run_dir={run_dir}", f"loop.max_steps={args.steps}",
                     f"loop.log_every={log_every}", "loop.val_every=0", "checkpoint.every=100000", *args.overrides]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
                   str(REPO / "train" / "main.py"), "--config", str(args.config), *overrides]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=python_path()))
        if result.returncode != 0:
            sys.exit(f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    windows = [r for r in records if "images_per_s_per_device" in r][1:]  # the first window holds start-up
    cfg = load_config(args.config, overrides)
    per_device = statistics.median(r["images_per_s_per_device"] for r in windows)
    flops = flops_per_image(cfg.model, skip_dropped=True)
    record = dict(
        name="train_throughput", config=str(args.config.name), encoder=cfg.model.encoder, nproc=args.nproc,
        per_rank_batch=cfg.data.batch_size, global_batch=cfg.loop.global_batch, steps=args.steps,
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_description(),
        torch=torch.__version__, windows=len(windows),
        images_per_s_per_device=round(per_device, 2),
        achieved_tflops_per_device=round(3 * flops * per_device / 1e12, 4),
    )
    if all("mfu" in r for r in windows):
        record["mfu"] = round(statistics.median(r["mfu"] for r in windows), 4)
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
