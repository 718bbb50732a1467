"""Entry point: ``torchrun --nproc_per_node=N train/main.py --config configs/paper.yaml [--resume] [a.b=value ...]``.

Parses, builds the config, runs the trainer, always closes it and the process group. Options
other than --config and --resume are dotted config fields (train/config.py); there are no others.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

# Run as a script (train/main.py), the repository root is not on sys.path; make the packages importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402

from train.checkpoint import RunDirConflict  # noqa: E402
from train.config import load_config, option_names  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def parse(argv=None):
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node=N train/main.py",
        description="Train Cellpose-SAM on shardgen shards.",
        epilog="Overrides: section.field=value, e.g. optim.lr=5e-5 loop.max_steps=100. "
        "python train/main.py --list-options prints them all.",
    )
    parser.add_argument("--config", type=Path, help="YAML config (configs/paper.yaml, configs/tiny-cpu.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in run_dir even where its settings differ from this launch's (a launch with the same settings continues it anyway)")
    parser.add_argument("--list-options", action="store_true", help="print every config option and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value")
    args = parser.parse_args(argv)
    if args.list_options:
        print("\n".join(option_names()))
        sys.exit(0)
    overrides = list(args.overrides) + (["checkpoint.resume=true"] if args.resume else [])
    try:
        return load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as error:
        parser.error(str(error))


def main(argv=None) -> int:
    cfg = parse(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    trainer = None
    try:
        trainer = Trainer(cfg)
        trainer.train()
    except RunDirConflict as error:
        # Every rank finds the same conflict; one message is enough.
        if rank == 0:
            print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
