"""Command line of the shard generator.

    python -m shardgen --list
    python -m shardgen --dataset NAME --src DIR --out DIR [--workers N] [--split S ...] [--limit N]
    python -m shardgen --data-root DIR --out DIR [--workers N]      every dataset folder under DIR
    python -m shardgen verify DIR
    python -m shardgen --dataset synthetic --like paper --scale S --out DIR   the paper's mix, synthetic

Options shared by the converting forms: ``--weights FILE`` (YAML overrides of the sampling
weights), ``--max-shard-samples`` and ``--max-shard-mb`` (shard rollover).

A ``--src`` (or a ``--data-root`` folder) one level above the dataset folder, e.g. the folder
that holds the unpacked ``stage1_train/`` or ``tissuenet_v1-1/``, is followed down when exactly
one of its folders has the dataset's layout; a log line says so.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from shardgen.base import LayoutError
from shardgen.build import BuildConfig, build_dataset, finalize, summarize
from shardgen.datasets import NAMES, get_converter
from shardgen.datasets.synthetic import paper_like_folders
from shardgen.verify import verify

log = logging.getLogger("shardgen")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shardgen",
        description="Convert public cell-segmentation datasets, as published, to weighted WebDataset shards.",
        epilog="python -m shardgen verify DIR re-reads every shard under DIR and checks it.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--list", action="store_true", help="list the converters and the layouts they read")
    what.add_argument("--dataset", choices=NAMES, metavar="NAME", help="the converter to run (see --list)")
    what.add_argument("--data-root", type=Path, help="convert every folder under this one named as a converter")
    parser.add_argument("--src", type=Path, help="the dataset folder, as downloaded and unpacked (with --dataset)")
    parser.add_argument("--out", type=Path, help="shard root: <out>/<dataset>/*.tar, manifest.parquet, ...")
    parser.add_argument("--split", nargs="+", metavar="S", help="only these splits (default: all published)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all cores)")
    parser.add_argument("--limit", type=int, help="convert only the first N items of each split")
    parser.add_argument("--weights", type=Path, help="YAML file overriding sampling weights")
    parser.add_argument("--like", choices=["paper"],
                        help="with --dataset synthetic: one synthetic group per paper dataset, with its image size, "
                             "channels, dtype, modality and share of images (see shardgen/datasets/synthetic.py)")
    parser.add_argument("--scale", type=float, default=0.1,
                        help="with --like: images per dataset as a fraction of the paper's counts (default 0.1)")
    defaults = BuildConfig()
    parser.add_argument("--max-shard-samples", type=int, default=defaults.max_samples)
    parser.add_argument("--max-shard-mb", type=float, default=defaults.max_bytes / 2**20)
    return parser


def _print_list() -> None:
    for name in NAMES:
        info = get_converter(name).INFO
        print(f"{name:<14} {info.title}")
        print(f"{'':<14} splits: {', '.join(info.splits)}; {info.modality}; channels: {', '.join(info.channel_names)}")
        print(f"{'':<14} layout: {info.layout}")


def follow_child_folder(name: str, src: Path, error: LayoutError) -> Path:
    """The one folder inside ``src`` that has the layout of converter ``name``.

    For a ``src`` one level above the dataset folder (the folder an archive was unpacked into).
    Called after converting ``src`` raised ``error``, so a ``src`` with the layout costs nothing
    extra. ``src`` and then each sub-folder (archive debris skipped) are tried with the
    converter's ``find_items`` on its first split. Raises ``error`` again when ``src`` itself
    lists (the error was about something else, perhaps after some splits were written) or when
    no sub-folder has the layout, and a LayoutError naming them when several do.
    """
    if not src.is_dir():
        raise error
    converter = get_converter(name)
    split = converter.INFO.splits[0]
    try:
        converter.find_items(src, split)
    except OSError:
        pass  # src lacks the layout: look one level down
    else:
        raise error
    matches = []
    for child in sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != "__MACOSX"):
        try:
            converter.find_items(child, split)
        except OSError:  # LayoutError (a FileNotFoundError), or a folder that cannot be read
            continue
        matches.append(child)
    if not matches:
        raise error
    if len(matches) > 1:
        names = ", ".join(p.name for p in matches)
        raise LayoutError(
            f"{src} does not have the {name} layout, and several folders inside it do ({names}); point --src "
            f"at one of them"
        ) from error
    return matches[0]


def _convert(name: str, src: Path, args: argparse.Namespace, config: BuildConfig) -> None:
    """Build ``name`` from ``src``, or from the one folder inside it with the layout (logged)."""
    try:
        build_dataset(name, src, args.out, splits=args.split, config=config, finalize_root=False)
    except LayoutError as error:
        child = follow_child_folder(name, src, error)
        log.info("%s: %s does not have the %s layout but its folder %s does; converting that", name, src, name,
                 child.name)
        build_dataset(name, child, args.out, splits=args.split, config=config, finalize_root=False)


def _print_summary(rows: list[dict]) -> None:
    print(f"\n{'dataset':<14}{'found':>9}{'written':>9}{'rejected':>10}{'cells':>11}")
    for row in rows:
        print(f"{row['dataset']:<14}{row['found']:>9}{row['written']:>9}{row['rejected']:>10}{row['cells']:>11}")
    total = {k: sum(r[k] for r in rows) for k in ("found", "written", "rejected", "cells")}
    print(f"{'total':<14}{total['found']:>9}{total['written']:>9}{total['rejected']:>10}{total['cells']:>11}")


def _verify_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m shardgen verify", description="Re-read and check every shard.")
    parser.add_argument("root", type=Path, help="shard root (the --out of a conversion)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a folder", file=sys.stderr)
        return 2
    problems = verify(args.root)
    for problem in problems:
        print(f"PROBLEM {problem}")
    print(f"{args.root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _like_paper(args: argparse.Namespace, config: BuildConfig) -> int:
    """Synthetic stand-ins of the paper's datasets under their own names, with the paper's weights."""
    try:
        folders = paper_like_folders(args.scale)
    except ValueError as error:
        print(f"error: --scale: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as settings:
        for name, counts in folders.items():
            src = Path(settings) / name
            src.mkdir()
            (src / "counts.txt").write_text(counts)
            log.info("writing the synthetic stand-in of %s (scale %g)", name, args.scale)
            build_dataset("synthetic", src, args.out, splits=args.split, config=config, finalize_root=False,
                          dataset=name)
    finalize(args.out, args.weights)
    _print_summary(summarize(args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if argv[:1] == ["verify"]:
        return _verify_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        _print_list()
        return 0
    if args.out is None:
        parser.error("--out is required")
    if args.dataset and args.src is None and args.dataset != "synthetic":
        parser.error(f"--src is required for --dataset {args.dataset}")
    try:
        config = BuildConfig(
            workers=args.workers,
            limit=args.limit,
            max_samples=args.max_shard_samples,
            max_bytes=int(args.max_shard_mb * 2**20),
        )
    except ValueError as error:
        parser.error(str(error))

    if args.like and args.dataset != "synthetic":
        parser.error("--like needs --dataset synthetic")
    if args.like:
        return _like_paper(args, config)
    if args.dataset:
        jobs = [(args.dataset, args.src or Path("."))]
    else:
        if not args.data_root.is_dir():
            parser.error(f"--data-root {args.data_root} is not a folder")
        folders = sorted(p for p in args.data_root.iterdir() if p.is_dir())
        jobs = [(p.name, p) for p in folders if p.name in NAMES]
        for p in folders:
            if p.name not in NAMES:
                log.warning("skipping %s: not a converter name (python -m shardgen --list)", p)
        if not jobs:
            parser.error(f"no folder under {args.data_root} is named as a converter ({', '.join(NAMES)})")

    failed = []
    for name, src in jobs:
        log.info("converting %s from %s", name, src)
        try:
            _convert(name, src, args, config)
        except (LayoutError, ValueError) as error:
            log.error("%s: %s", name, error)
            failed.append(name)
    finalize(args.out, args.weights)
    _print_summary(summarize(args.out))
    if failed:
        print(f"\nfailed: {', '.join(failed)} (see the errors above)", file=sys.stderr)
        return 1
    return 0
