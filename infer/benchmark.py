"""``python -m infer.benchmark --shards ROOT --checkpoint CKPT``: the paper's table from shards.

    python -m infer.benchmark --shards ROOT --checkpoint CKPT [--split test] [--datasets NAME ...]
                              [--diameter true|auto|none] [--out DIR] [--device cuda] [--batch-size 64]
                              [--limit N]
    torchrun --nproc_per_node=8 -m infer.benchmark --shards ROOT --checkpoint CKPT --out DIR

Every sample of the split (``--split``, default test) of every dataset in the shard root (or of
``--datasets``) goes through the model (``infer.predict``: Cellpose 4's defaults, which are the
paper's benchmark protocol: no test-time augmentation, 256 px tiles with 0.1 overlap,
flow_threshold 0.4, cellprob_threshold 0; paper.md 3b), its tiles pooled into ``--batch-size``
network calls on a GPU. The image is rescaled by 30 / diameter where the diameter is:

* ``true`` (default): the sample's own, from its labels (the manifest's ``diameter``; an image
  without objects is not rescaled);
* ``auto``: estimated from a first run (``PredictConfig(diameter="auto")``);
* ``none``: no rescale (CP-SAM was trained on 7.5-120 px cells and is meant to need none).

Each image is scored against its labels as ``python -m infer.evaluate`` scores a file pair
(``infer.evaluate.score_masks``: AP = TP / (TP + FP + FN) at IoU 0.5, 0.75, 0.9 and the error
rate (FP + FN) / n_true at IoU 0.5, Cellpose's matching; paper.md 3a). Where a sample has a
don't-care mask (``ignore``, e.g. MoNuSAC's ambiguous regions), predicted masks with more than
half their pixels in it are removed first, as the loss leaves those pixels out in training.

The table has a row per dataset, one per ``dataset/subset`` where the shards have subsets, and
``overall``: images scored (and failed), cells (true objects), found (predicted ones), mean AP
over images with any object, mean error rate over images with true objects (every image weighs
the same, as the paper averages per image; ``overall`` therefore weighs datasets by their test
size), and the paper's error rate beside it where paper.md has one (:data:`PAPER_ERROR50`). It
is printed (markdown) and, with ``--out``, written as ``benchmark.md``, ``benchmark.csv``,
``benchmark.json`` (``{"datasets": {name: {"ap50", "ap75", "ap90", "error50", ...}},
"subsets": {...}, "overall": {...}, "settings": {...}}``) and ``images.csv`` (one row per image:
its key, source, the diameter used, the scores or the error).

Under ``torchrun`` every rank takes a disjoint share of the samples (largest first, each to the
rank with the fewest pixels so far), on ``cuda:LOCAL_RANK`` when there is a GPU; rank 0 gathers
the per-image rows (gloo) and writes the outputs. Exit status: 0 when every image was scored, 1
when any failed (they are listed), 2 for bad arguments.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Before torch and numba load (see infer/__main__.py): idle OpenMP workers must not spin.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import queue  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable, Iterator  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from infer.cli import _configure_logging, _init_distributed, _resolve_device  # noqa: E402
from infer.evaluate import DEFAULT_THRESHOLDS, mean_row, score_masks  # noqa: E402
from infer.predict import AUTO, PredictConfig, load_model, predict_stream  # noqa: E402
from pipeline.metrics import remove_ignored_masks  # noqa: E402
from pipeline.shards import iter_samples, read_manifest  # noqa: E402

__all__ = ["PAPER_ERROR50", "BenchmarkConfig", "format_table", "main", "run", "score_sample", "summarise"]

log = logging.getLogger("infer")

DIAMETER_MODES = ("true", "auto", "none")
#: The paper's error rate at IoU 0.5 per dataset, where paper.md gives one (section 3c): only
#: the Cellpose (cyto2) test set, 0.163 for Cellpose-SAM. The paper scores the test images that
#: have a second annotator (about 67 of 68, paper.md 3a); this table scores the whole split.
#: Its per-dataset figures for Tissuenet, Livecell, ... are not in paper.md ("NOT FOUND").
PAPER_ERROR50 = {"cyto2": 0.163}
#: Table columns: the table's own name -> the per-image row's (infer.evaluate's) name.
_MEANS = {"ap50": "ap@0.5", "ap75": "ap@0.75", "ap90": "ap@0.9", "error50": "error_rate@0.5"}
TABLE_COLUMNS = ("group", "images", "failed", "cells", "found", *_MEANS, "paper_error50")
IMAGE_COLUMNS = (
    "dataset", "subset", "key", "source", "height", "width", "diameter", "true_diameter", "status",
    "n_true", "n_pred", "ap@0.5", "ap@0.75", "ap@0.9", "tp@0.5", "fp@0.5", "fn@0.5", "error_rate@0.5",
    "error",
)
# Samples decoded ahead of the network: enough to fill a batch of small images.
_READ_AHEAD = 4


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """Everything ``python -m infer.benchmark`` does, as one value (see the module notes)."""

    shards: str
    """Shard root written by shardgen (manifest.parquet and <dataset>/*.tar)."""
    checkpoint: str
    """Weights: the trainer's export (with its .json beside it) or an official cpsam file."""
    split: str = "test"
    """Split to score, as the manifest names it (test, val, fold3; all for a dataset without splits)."""
    datasets: tuple[str, ...] | None = None
    """Datasets to score (default: every dataset that has the split)."""
    diameter: str = "true"
    """Rescale by 30 / diameter with: true (each sample's own), auto (estimated per image), none."""
    out: str | None = None
    """Folder for benchmark.{md,csv,json} and images.csv (default: print only)."""
    device: str | None = None
    """torch device (cpu, cuda, cuda:1); default cuda:LOCAL_RANK when a GPU is present, else cpu."""
    batch_size: int = 64
    """Tiles per network call (the paper's benchmarks use 64)."""
    limit: int | None = None
    """At most this many images per dataset, the first by key (a quick look); None: all."""

    def __post_init__(self) -> None:
        if self.diameter not in DIAMETER_MODES:
            raise ValueError(f"diameter: one of {', '.join(DIAMETER_MODES)}; got {self.diameter!r}")
        for name in ("batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}: an integer >= 1; got {value!r}")
        if self.datasets is not None and not self.datasets:
            raise ValueError("datasets: name at least one dataset, or leave it out for all")


# ------------------------------------------------------------------------------------------------
# Scoring one sample
# ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Item:
    """One sample on its way through the network: what scoring it needs besides the masks."""

    row: dict  # the manifest row
    labels: np.ndarray | None = None
    ignore: np.ndarray | None = None


def score_sample(labels: np.ndarray, masks: np.ndarray, ignore: np.ndarray | None = None) -> dict:
    """``infer.evaluate.score_masks`` of one sample, after removing the predicted masks that lie
    mostly (> 1/2 of their pixels) in its don't-care region ``ignore`` (H, W) bool
    (``pipeline.metrics.remove_ignored_masks``)."""
    return score_masks(labels, remove_ignored_masks(masks, ignore), DEFAULT_THRESHOLDS)


def _image_row(item: _Item, result) -> dict:
    """The images.csv row of a sample from what prediction gave for it (scores or an exception)."""
    row = item.row
    base = {name: row[name] for name in ("dataset", "subset", "key", "source", "height", "width")}
    base["true_diameter"] = round(float(row["diameter"]), 2)
    if isinstance(result, BaseException):
        reason = " ".join(str(result).split()) or type(result).__name__
        return base | {"status": "failed", "error": reason}
    return base | result


def _then(item: _Item, prediction) -> dict:
    """Runs where the masks are followed (a worker thread on a GPU): score, drop the arrays."""
    try:
        scores = score_sample(item.labels, prediction.masks, item.ignore)
    finally:
        item.labels = item.ignore = None
    diameter = "" if prediction.diameter is None else round(float(prediction.diameter), 2)
    return scores | {"diameter": diameter}


# ------------------------------------------------------------------------------------------------
# Running a rank's share
# ------------------------------------------------------------------------------------------------


def select_rows(cfg: BenchmarkConfig) -> list[dict]:
    """The manifest rows to score, sorted by (dataset, subset, key); ValueError if none."""
    rows = read_manifest(cfg.shards, splits=[cfg.split])
    present = sorted({row["dataset"] for row in rows})
    if cfg.datasets is not None:
        unknown = sorted(set(cfg.datasets) - set(present))
        if unknown:
            raise ValueError(
                f"{cfg.shards}: no {cfg.split!r} samples of {', '.join(unknown)}; datasets with that split: "
                f"{', '.join(present) or 'none'}"
            )
        rows = [row for row in rows if row["dataset"] in cfg.datasets]
    if not rows:
        splits = sorted({row["split"] for row in read_manifest(cfg.shards)})
        raise ValueError(f"{cfg.shards}: no samples in split {cfg.split!r}; the manifest has splits {splits}")
    rows.sort(key=lambda row: (row["dataset"], row["subset"], row["key"]))
    if cfg.limit is not None:
        by_dataset: dict[str, list[dict]] = {}
        for row in rows:
            by_dataset.setdefault(row["dataset"], []).append(row)
        rows = [row for group in by_dataset.values() for row in group[: cfg.limit]]
    return rows


def share_rows(rows: list[dict], rank: int, world_size: int) -> list[dict]:
    """This rank's rows: largest image first to the rank with the fewest pixels (ties: lower
    rank), returned in the order of ``rows`` (so each shard is read front to back)."""
    load = [0] * world_size
    mine = set()
    for index in sorted(range(len(rows)), key=lambda i: (-rows[i]["height"] * rows[i]["width"], i)):
        target = min(range(world_size), key=lambda k: (load[k], k))
        load[target] += rows[index]["height"] * rows[index]["width"]
        if target == rank:
            mine.add(index)
    return [row for index, row in enumerate(rows) if index in mine]


def score_rows(model, rows: list[dict], cfg: BenchmarkConfig, root: str | Path, show_progress: bool = True) -> list[dict]:
    """Predict and score the samples of ``rows`` (manifest rows under ``root``); their
    images.csv rows, in the order the shards hold them."""
    predict_cfg = PredictConfig(batch_size=cfg.batch_size, diameter=AUTO if cfg.diameter == "auto" else None)
    items = _read_ahead(_items(root, rows, cfg, predict_cfg))
    if cfg.diameter == "true":
        # Each image at its own diameter: its items carry a config of their own.
        results = predict_stream(model, items, predict_cfg, then=_then)
    else:
        results = predict_stream(model, ((item, image) for item, image, _ in items), predict_cfg, then=_then)
    image_rows = []
    with logging_redirect_tqdm():
        bar = tqdm(total=len(rows), disable=not show_progress, unit="image", dynamic_ncols=True, desc="benchmark")
        for item, result in results:
            image_rows.append(_image_row(item, result))
            if image_rows[-1]["status"] != "ok":
                log.error("%s: %s", item.row["key"], image_rows[-1]["error"])
            bar.update()
        bar.close()
    return image_rows


def _items(root, rows: list[dict], cfg: BenchmarkConfig, predict_cfg: PredictConfig) -> Iterator[tuple]:
    """``(item, image or the reason there is none, options)`` per sample, decoded from its shard."""
    for row, sample in iter_samples(root, rows):
        item = _Item(row)
        if isinstance(sample, BaseException):
            yield item, sample, predict_cfg
            continue
        image, item.labels, _, meta, item.ignore = sample
        options = predict_cfg
        if cfg.diameter == "true" and meta.diameter > 0:
            options = PredictConfig(batch_size=cfg.batch_size, diameter=float(meta.diameter))
        yield item, image, options


def _read_ahead(items: Iterable, depth: int = _READ_AHEAD) -> Iterator:
    """``items``, produced by a thread up to ``depth`` ahead (decoding overlaps the network)."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        """Put ``item`` unless the consumer has stopped (then False)."""
        while not stop.is_set():
            try:
                results.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def producer() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as error:  # noqa: BLE001 -- re-raised in the consumer
            offer(error)
            return
        offer(done)

    thread = threading.Thread(target=producer, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (item := results.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# ------------------------------------------------------------------------------------------------
# The table
# ------------------------------------------------------------------------------------------------


def summarise(image_rows: list[dict]) -> dict[str, dict]:
    """Table rows keyed by group: each dataset followed by its "dataset/subset"s, then "overall"."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(image_rows, key=lambda r: (r["dataset"], r["subset"], r["key"])):
        groups.setdefault(row["dataset"], []).append(row)
    for dataset in list(groups):  # a dataset's subsets right after it
        for row in groups[dataset]:
            if row["subset"]:
                groups.setdefault(f"{dataset}/{row['subset']}", []).append(row)
    groups = dict(sorted(groups.items(), key=lambda item: item[0].split("/")))
    groups["overall"] = list(image_rows)
    table = {}
    for name, rows in groups.items():
        mean = mean_row(rows, DEFAULT_THRESHOLDS)
        scored = sum(row["status"] == "ok" for row in rows)
        table[name] = {"group": name, "images": scored, "failed": len(rows) - scored,
                       "cells": mean["n_true"], "found": mean["n_pred"]}
        table[name] |= {column: _finite_or_none(mean[source]) for column, source in _MEANS.items()}
        table[name]["paper_error50"] = PAPER_ERROR50.get(name)
    return table


def _finite_or_none(value: float) -> float | None:
    return None if math.isnan(value) else round(float(value), 4)


def format_table(table: dict[str, dict]) -> str:
    """The table as markdown (numbers to 3 decimals; "-" where undefined or the paper has none)."""
    def cell(value) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in TABLE_COLUMNS) + " |" for row in table.values()]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, table: dict[str, dict], image_rows: list[dict], settings: dict) -> None:
    """benchmark.md, benchmark.csv, benchmark.json and images.csv under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark.md").write_text(format_table(table))
    with open(out / "benchmark.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=TABLE_COLUMNS)
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table.values())
    datasets = {name: row for name, row in table.items() if name != "overall" and "/" not in name}
    subsets = {name: row for name, row in table.items() if "/" in name}
    report = {"datasets": datasets, "subsets": subsets, "overall": table["overall"], "settings": settings}
    (out / "benchmark.json").write_text(json.dumps(report, indent=1) + "\n")
    with open(out / "images.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=IMAGE_COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(sorted(image_rows, key=lambda r: (r["dataset"], r["subset"], r["key"])))


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def run(cfg: BenchmarkConfig) -> int:
    """Score the split of ``cfg``; return the exit status (0 ok, 1 an image failed, 2 usage)."""
    rank, world_size, local_rank = _init_distributed()
    _configure_logging(rank)
    try:
        try:
            rows = select_rows(cfg)
            device = _resolve_device(cfg.device, local_rank, world_size)
            model = load_model(cfg.checkpoint, device=device)
        except (FileNotFoundError, ValueError) as error:
            log.error("%s", error)
            return 2
        mine = share_rows(rows, rank, world_size)
        log.info("%d %s images of %s, %d on this rank; model on %s, diameter %s", len(rows), cfg.split,
                 ", ".join(sorted({r["dataset"] for r in rows})), len(mine), device, cfg.diameter)
        start = time.perf_counter()
        image_rows = score_rows(model, mine, cfg, cfg.shards, show_progress=rank == 0)
        if world_size > 1:
            gathered = [None] * world_size if rank == 0 else None
            dist.gather_object(image_rows, gathered, dst=0)
            if rank != 0:
                return 1 if any(r["status"] != "ok" for r in image_rows) else 0
            image_rows = [row for part in gathered for row in part]
        table = summarise(image_rows)
        print(format_table(table), end="", flush=True)
        settings = asdict(cfg) | {"world_size": world_size, "device": str(device),
                                  "seconds": round(time.perf_counter() - start, 1)}
        if cfg.out is not None:
            write_outputs(Path(cfg.out), table, image_rows, settings)
            log.info("table and per-image scores in %s", cfg.out)
        failed = [row for row in image_rows if row["status"] != "ok"]
        if failed:
            log.error("%d of %d images failed (listed in images.csv with the reason)", len(failed), len(image_rows))
        return 1 if failed else 0
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer.benchmark",
        description="AP@0.5/0.75/0.9 and the error rate per dataset of a shard root's test split "
        "(see the module docs of infer/benchmark.py).",
    )
    docs = _field_docs()
    parser.add_argument("--shards", required=True, help=docs["shards"])
    parser.add_argument("--checkpoint", required=True, help=docs["checkpoint"])
    parser.add_argument("--split", default="test", help=docs["split"])
    parser.add_argument("--datasets", nargs="+", help=docs["datasets"])
    parser.add_argument("--diameter", default="true", choices=DIAMETER_MODES, help=docs["diameter"])
    parser.add_argument("--out", help=docs["out"])
    parser.add_argument("--device", help=docs["device"])
    parser.add_argument("--batch-size", type=int, default=64, help=docs["batch_size"])
    parser.add_argument("--limit", type=int, help=docs["limit"])
    return parser


def _field_docs() -> dict[str, str]:
    """Each BenchmarkConfig field's docstring (the help text), read from this module's source."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(BenchmarkConfig))
    body = tree.body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = following.value.value
    return docs


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    args = _parser().parse_args(argv)
    try:
        cfg = BenchmarkConfig(
            shards=args.shards, checkpoint=args.checkpoint, split=args.split,
            datasets=tuple(args.datasets) if args.datasets else None, diameter=args.diameter,
            out=args.out, device=args.device, batch_size=args.batch_size, limit=args.limit,
        )
    except ValueError as error:
        _parser().error(str(error))
    return run(cfg)


if __name__ == "__main__":
    sys.exit(main())
