"""Cost of AP during training (``loop.eval_every``, train/evaluation.py) against the training step.

    python -m benchmarks.bench_train_eval [--config configs/tiny-cpu.yaml] [--nproc 2] [--steps 30]
                                         [--eval-every 5] [override ...]

Runs the real trainer under torchrun on synthetic shards (built in a temporary folder: 128
training and 8 test images, so ``eval.images_per_group=8`` takes all 8), with ``loop.log_every=1``,
and reads ``metrics.jsonl``: the median wall time of one evaluation (rank 0's ``seconds``) and
of one training step (global batch / images per s, over the steps without an evaluation, the
first left out), their ratio, and the fraction of the run the evaluations take at
``--eval-every`` and at a few other intervals. One JSON line; nothing is asserted.
"""

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.bench_train import REPO, make_shards, run_trainer
from benchmarks.common import cpu_description
from train.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "tiny-cpu.yaml")
    parser.add_argument("--nproc", type=int, default=2, help="processes (devices) for torchrun")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra config overrides, section.field=value")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = make_shards(tmp, n_train=128)
        run_dir = tmp / "run"
        overrides = [f"data.root={shards}", f"run_dir={run_dir}", f"loop.max_steps={args.steps}",
                     "loop.log_every=1", "loop.val_every=0", f"loop.eval_every={args.eval_every}",
                     "checkpoint.every=100000", *args.overrides]
        records = run_trainer(args.config, args.nproc, overrides, run_dir)

    cfg = load_config(args.config, overrides)
    evaluations = [r for r in records if "ap50/all" in r]
    eval_steps = {r["step"] for r in evaluations}
    steps = [r for r in records if "images_per_s" in r and r["step"] not in eval_steps][1:]
    step_s = statistics.median(cfg.loop.global_batch / r["images_per_s"] for r in steps)
    eval_s = statistics.median(r["seconds"] for r in evaluations)
    fraction = {every: round(eval_s / (every * step_s + eval_s), 4) for every in (args.eval_every, 100, 500, 1000)}
    record = dict(
        name="train_eval_cost", config=args.config.name, encoder=cfg.model.encoder, nproc=args.nproc,
        global_batch=cfg.loop.global_batch, images_evaluated=evaluations[0]["images/all"],
        evaluations=len(evaluations), steps_timed=len(steps),
        device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu_description(),
        torch=torch.__version__, step_seconds=round(step_s, 4), eval_seconds=round(eval_s, 4),
        eval_over_step=round(eval_s / step_s, 2), fraction_of_run_at_eval_every=fraction,
    )
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
