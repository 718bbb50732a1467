"""``python -m infer INPUT... --checkpoint FILE --out DIR``: segment images in files and folders.

Inputs are image files (TIFF, PNG, JPEG, BMP, NPY; see ``pipeline.io.read_image``) and folders,
searched recursively for files matching ``--glob`` (default ``*``) with one of those suffixes.
A folder search leaves out names starting with ``.``, files whose name (before the suffix) ends
in ``_masks``, ``_labels``, ``_flows``, ``_cellprob``, ``_outlines`` or ``_seg`` (labels and
outputs, ours or Cellpose's, not images), and, when ``--out`` lies inside the folder, everything
under ``--out``. Files named on the command line are always taken.

Outputs (``infer/outputs.py``) mirror the inputs' folders under ``--out``: each input's path
relative to the deepest folder holding all inputs (a folder input counts as itself, a file
input as its folder) names its outputs, so ``a/x.tif`` and ``b/x.tif`` give ``out/a/x_masks.tif``
and ``out/b/x_masks.tif``. Two inputs that would still write the same files (``x.tif`` and
``x.png`` side by side) both fail with a message saying so. Nothing is written outside ``--out``.

An image whose ``_masks.tif`` (and any other output asked for) exists is skipped unless
``--overwrite``. A file that cannot be read or predicted gets one ``ERROR <file>: <reason>``
line and the others go on; the exit status is 1 if any file failed, 2 for bad arguments (a
missing checkpoint or input is reported before any file is processed), else 0.
``<out>/summary.csv`` gets one row per input, in the order of the files: file (absolute path),
size (HxW), n_cells, diameter (the one the image was rescaled by, given or estimated with
``--diameter auto``; empty without a rescale), seconds (from the start of reading the file to
its last output written; images overlap, so these add up to more than the run), status (ok,
skipped, failed) and error.

Files are read a few ahead by a thread, and on a GPU the tiles of consecutive images share
network batches (``--batch-size`` tiles per call, whichever images they come from) and the masks
of one image are followed and written while the network runs on the next
(``infer.predict.predict_stream``). A network call that fails is retried image by image, so
only the image that fails on its own is reported failed.

Under ``torchrun`` (WORLD_SIZE > 1) every rank takes a disjoint, deterministic share of the files
(largest first, each to the rank with the fewest bytes so far; ties to the lower rank), on
``cuda:LOCAL_RANK`` when there is a GPU. Each rank writes ``summary_rank<k>.csv`` as it goes;
after a barrier rank 0 merges them into ``summary.csv`` (sorted by file) and deletes them. A run
cut short therefore leaves per-rank summaries, and a rerun skips what is done.

Options are the fields of :class:`InferConfig` and of ``infer.predict.PredictConfig`` (except
``compute_masks``), spelled with dashes; the help text is each field's docstring.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import functools
import inspect
import logging
import os
import queue
import sys
import textwrap
import threading
import time
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from infer.outputs import (
    OutputPaths,
    output_paths,
    seg_record,
    write_array,
    write_masks,
    write_overlay,
    write_rois,
    write_seg,
)
from infer.predict import PredictConfig, load_model, predict_stream
from pipeline.io import SUPPORTED_SUFFIXES, read_image, read_labels

__all__ = ["InferConfig", "main", "run"]

log = logging.getLogger("infer")

SUMMARY_COLUMNS = ("file", "size", "n_cells", "diameter", "seconds", "status", "error")
# Name endings (before the suffix) of labels and outputs, which folder searches leave out.
_NOT_IMAGES = ("_masks", "_labels", "_flows", "_cellprob", "_outlines", "_seg")
# PredictConfig fields the command line does not offer: it always writes masks.
_PREDICT_FIELDS_NOT_ON_CLI = ("compute_masks",)
# --precision: the model's dtype (None: infer.predict.default_dtype of the device).
_PRECISIONS = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}
# Long enough for the slowest rank to finish its share before the final barrier.
_PROCESS_GROUP_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True, kw_only=True)
class InferConfig:
    """Everything ``python -m infer`` does, as one value (see the module notes)."""

    inputs: tuple[str, ...]
    """Image files and folders to segment."""
    checkpoint: str
    """Weights: the trainer's export (with its .json beside it) or an official cpsam file."""
    out: str
    """Output folder; the inputs' folder structure is mirrored under it."""
    glob: str = "*"
    """Pattern matched against file names while searching folders recursively."""
    overwrite: bool = False
    """Redo images whose outputs exist (default: skip them)."""
    save_flows: bool = False
    """Also write <name>_flows.npy (2, H, W) and <name>_cellprob.npy (H, W), float32."""
    save_outlines: bool = False
    """Also write <name>_outlines.png, the image with mask outlines in red."""
    save_rois: bool = False
    """Also write <name>_rois.zip, one ImageJ polygon ROI per mask (Fiji's ROI Manager)."""
    save_seg: bool = False
    """Also write <name>_seg.npy, the Cellpose GUI file (io.masks_flows_to_seg layout), to correct masks in the GUI."""
    channels: tuple[int, ...] | None = None
    """Channel indices to use (up to 3), for files with more than 3 channels or a varying alpha."""
    device: str | None = None
    """torch device (cpu, cuda, cuda:1); default cuda:LOCAL_RANK when a GPU is present, else cpu."""
    precision: str = "auto"
    """Network dtype: auto (bf16 on a GPU and on CPUs with bf16 instructions, else fp32), bf16, fp32."""
    predict: PredictConfig = field(default_factory=PredictConfig)
    """Prediction and mask options."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("inputs: name at least one image file or folder")
        if self.precision not in _PRECISIONS:
            raise ValueError(f"precision: one of {', '.join(_PRECISIONS)}; got {self.precision!r}")
        if self.channels is not None and not 1 <= len(self.channels) <= 3:
            raise ValueError(f"channels: pick 1 to 3 channel indices; got {list(self.channels)}")


# ------------------------------------------------------------------------------------------------
# Command line (generated from the config dataclasses)
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    parser = _parser()
    # nargs="+" gives lists; the configs hold tuples (they are frozen and hashable).
    parsed = vars(parser.parse_args(argv))
    args = {name: tuple(v) if isinstance(v, list) else v for name, v in parsed.items()}
    predict_names = _cli_fields(PredictConfig)
    try:
        predict_cfg = PredictConfig(**{name: args.pop(name) for name in predict_names})
        cfg = InferConfig(predict=predict_cfg, **args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return run(cfg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m infer",
        description="Segment images with a CP-SAM model: masks, optional flows, outlines and ROIs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    docs = {**_field_docs(InferConfig), **_field_docs(PredictConfig)}
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help=docs["inputs"])
    hints = {**typing.get_type_hints(InferConfig), **typing.get_type_hints(PredictConfig)}
    for cls in (InferConfig, PredictConfig):
        defaults = _defaults(cls)
        for name in _cli_fields(cls):
            if name != "inputs":
                _add_option(parser, name, hints[name], defaults[name], docs[name])
    return parser


def _cli_fields(cls) -> list[str]:
    skip = {"predict"} | set(_PREDICT_FIELDS_NOT_ON_CLI)
    return [f.name for f in dataclasses.fields(cls) if f.name not in skip]


def _defaults(cls) -> dict:
    """Field name -> default (``dataclasses.MISSING`` for required fields)."""
    return {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
    }


def _add_option(parser, name: str, hint, default, help_text: str) -> None:
    """One ``--name-with-dashes`` option typed from the field's annotation."""
    flag = "--" + name.replace("_", "-")
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
    if words:  # a number or a keyword, e.g. --diameter 17 / --diameter auto
        parser.add_argument(
            flag, dest=name, type=_number_or(words, base), default=default,
            metavar=f"{{{base.__name__},{','.join(words)}}}", help=help_text,
        )
        return
    if default is dataclasses.MISSING:
        parser.add_argument(
            flag, dest=name, required=True, type=base, default=argparse.SUPPRESS, help=help_text
        )
    elif base is bool:
        parser.add_argument(
            flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    elif typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        parser.add_argument(flag, dest=name, nargs="+", type=item, default=default, help=help_text)
    else:
        assert base in (int, float, str), f"no command-line type for {name}: {hint}"
        parser.add_argument(flag, dest=name, type=base, default=default, help=help_text)


def _number_or(words: list[str], number: type):
    """An argparse type: the word itself if it is one of ``words``, else ``number(text)``."""

    def convert(text: str):
        return text if text in words else number(text)

    convert.__name__ = f"{number.__name__} or {' / '.join(words)}"  # argparse's error names it
    return convert


def _field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a dataclass (the help text), read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            # argparse %-formats help strings.
            docs[statement.target.id] = following.value.value.strip().replace("%", "%%")
    return docs


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    path: Path  # the input file, as found
    relative: Path  # its path under the inputs' common folder, which names its outputs
    error: str | None = None  # a reason to fail it without reading it (name collisions)


def run(cfg: InferConfig) -> int:
    """Segment the inputs of ``cfg``; return the exit status (0 ok, 1 a file failed, 2 usage)."""
    rank, world_size, local_rank = _init_distributed()
    _configure_logging(rank)
    try:
        # Everything that can be wrong with the arguments is reported before any file is read.
        checkpoint = Path(cfg.checkpoint)
        if not checkpoint.is_file():
            what = "is a folder, not a weights file" if checkpoint.is_dir() else "not found"
            log.error("checkpoint %s: %s", checkpoint, what)
            return 2
        missing = [path for path in cfg.inputs if not Path(path).exists()]
        if missing:
            log.error("input not found: %s", ", ".join(missing))
            return 2
        out_dir = Path(cfg.out)
        jobs = _find_jobs([Path(p) for p in cfg.inputs], out_dir, cfg.glob)
        if not jobs:
            log.error(
                "no images (%s) matching %r under %s",
                " ".join(SUPPORTED_SUFFIXES), cfg.glob, " ".join(cfg.inputs),
            )
            return 2
        my_jobs = _share(jobs, rank, world_size)

        try:
            device = _resolve_device(cfg.device, local_rank, world_size)
        except ValueError as error:
            log.error("%s", error)
            return 2
        try:
            model = load_model(checkpoint, device=device, dtype=_PRECISIONS[cfg.precision])
        except (FileNotFoundError, ValueError) as error:
            log.error("checkpoint %s", error)
            return 2
        log.info("%d images, %d on this rank; model on %s in %s", len(jobs), len(my_jobs), device,
                 str(next(model.parameters()).dtype).removeprefix("torch."))

        out_dir.mkdir(parents=True, exist_ok=True)
        summary = out_dir / ("summary.csv" if world_size == 1 else f"summary_rank{rank}.csv")
        n_failed = _process(model, my_jobs, cfg, summary, show_progress=rank == 0)
        if world_size > 1:
            dist.barrier()  # every rank's summary is complete
            if rank == 0:
                n_failed = _merge_summaries(out_dir, world_size)
            dist.barrier()  # rank 0 has merged before any rank exits (torchrun stops the rest)
        else:
            log.info("%d images: %d failed; summary in %s", len(jobs), n_failed, summary)
        return 1 if n_failed else 0
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _process(model, jobs: list[_Job], cfg: InferConfig, summary: Path, show_progress: bool) -> int:
    """Run every job, appending a summary row as each ends; return how many failed.

    A thread reads the next files (:func:`_read_ahead`) while ``infer.predict.predict_stream``
    runs the network (on a GPU with the tiles of consecutive images pooled into batches, and a
    worker following the flows and writing each image's outputs, :func:`_write`, meanwhile).
    Rows come out in the order of ``jobs``.
    """
    n_failed = 0
    with open(summary, "w", newline="") as fh, logging_redirect_tqdm():
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        bar = tqdm(total=len(jobs), disable=not show_progress, unit="image", dynamic_ncols=True)
        then = functools.partial(_write, cfg=cfg)
        for item, result in predict_stream(model, _read_ahead(jobs, cfg), cfg.predict, then=then):
            row = _row(item, result)
            if row["status"] == "failed":
                n_failed += 1
                log.error("%s: %s", item.job.path, row["error"])
            writer.writerow(row)
            fh.flush()  # a run cut short keeps the rows so far
            bar.update()
        bar.close()
    return n_failed


@dataclass(eq=False)
class _Item:
    """One job on its way through :func:`_process`."""

    job: _Job
    paths: OutputPaths
    started: float  # perf_counter() when its file began to be read
    image: np.ndarray | None = None  # kept for the outlines only


class _NoPrediction(Exception):
    """A job that needs no network (skipped, or failed before reading): its summary row.

    Passed through ``predict_stream`` in the job's place, so that rows keep the jobs' order.
    """

    def __init__(self, row: dict):
        super().__init__(row["status"])
        self.row = row


# Files read ahead of the network: enough to fill a batch of small images without holding many.
_READ_AHEAD = 4


def _read_ahead(jobs: list[_Job], cfg: InferConfig) -> Iterator[tuple[_Item, np.ndarray | BaseException]]:
    """``(item, image or the reason there is none)`` per job, read by a thread a few files ahead."""
    results: queue.Queue = queue.Queue(maxsize=_READ_AHEAD)
    stop = threading.Event()

    def reader() -> None:
        for job in jobs:
            loaded = _load(job, cfg)
            while not stop.is_set():
                try:
                    results.put(loaded, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if stop.is_set():
                return
        results.put(None)

    thread = threading.Thread(target=reader, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (loaded := results.get()) is not None:
            yield loaded
    finally:
        stop.set()  # the consumer stopped early: let the reader end
        thread.join()


def _load(job: _Job, cfg: InferConfig) -> tuple[_Item, np.ndarray | BaseException]:
    """Read one job's image; never raises (a failure is returned in the image's place)."""
    item = _Item(job, output_paths(cfg.out, job.relative), time.perf_counter())
    row = dict.fromkeys(SUMMARY_COLUMNS, "") | {"file": str(job.path)}
    if job.error is not None:
        return item, _NoPrediction({**row, "status": "failed", "error": job.error})
    try:
        if not cfg.overwrite and _is_done(item.paths, cfg):
            masks = read_labels(item.paths.masks)
            size = "x".join(map(str, masks.shape))
            return item, _NoPrediction({**row, "size": size, "n_cells": _count_cells(masks), "status": "skipped"})
        image = read_image(job.path, channels=cfg.channels)
    except Exception as error:  # noqa: BLE001 -- one bad file must not stop the others
        return item, error
    if cfg.save_outlines:
        item.image = image
    return item, image


def _write(item: _Item, prediction, cfg: InferConfig) -> dict:
    """Write one image's outputs (masks last: their presence marks the image done); its row."""
    paths = item.paths
    paths.masks.parent.mkdir(parents=True, exist_ok=True)
    if cfg.save_flows:
        write_array(paths.flows, prediction.flows)
        write_array(paths.cellprob, prediction.cellprob)
    if cfg.save_outlines:
        write_overlay(paths.outlines, item.image, prediction.masks)
        item.image = None
    if cfg.save_rois:
        write_rois(paths.rois, prediction.masks)
    if cfg.save_seg:
        record = seg_record(item.job.path, prediction.masks, prediction.flows, prediction.cellprob, prediction.diameter)
        write_seg(paths.seg, record)
    write_masks(paths.masks, prediction.masks)
    return {
        "file": str(item.job.path),
        "size": "x".join(map(str, prediction.masks.shape)),
        "n_cells": _count_cells(prediction.masks),
        "diameter": "" if prediction.diameter is None else f"{prediction.diameter:.2f}",
        "seconds": f"{time.perf_counter() - item.started:.3f}",
        "status": "ok",
        "error": "",
    }


def _row(item: _Item, result) -> dict:
    """The summary row of a job from what ``predict_stream`` gave for it."""
    if isinstance(result, _NoPrediction):
        return result.row
    if isinstance(result, BaseException):
        return dict.fromkeys(SUMMARY_COLUMNS, "") | {
            "file": str(item.job.path), "seconds": f"{time.perf_counter() - item.started:.3f}",
            "status": "failed", "error": _reason(result, item.job.path),
        }
    return result


def _is_done(paths: OutputPaths, cfg: InferConfig) -> bool:
    wanted = [paths.masks]
    wanted += [paths.flows, paths.cellprob] if cfg.save_flows else []
    wanted += [paths.outlines] if cfg.save_outlines else []
    wanted += [paths.rois] if cfg.save_rois else []
    wanted += [paths.seg] if cfg.save_seg else []
    return all(path.is_file() for path in wanted)


def _count_cells(masks: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(masks.ravel())[1:]))


def _reason(error: Exception, path: Path) -> str:
    """One line saying what went wrong, without repeating the file name."""
    message = " ".join(str(error).split()) or "(no message)"
    if message.startswith(f"{path}: "):
        message = message[len(f"{path}: "):]
    if not isinstance(error, (ValueError, TypeError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return message


# ------------------------------------------------------------------------------------------------
# Finding files and sharing them out
# ------------------------------------------------------------------------------------------------


def _find_jobs(inputs: list[Path], out_dir: Path, pattern: str) -> list[_Job]:
    """Every input file once, sorted by its relative path, with colliding outputs marked failed."""
    out_abs = Path(os.path.abspath(out_dir))
    files: dict[Path, None] = {}  # absolute path -> (ordered set)
    roots = []
    for given in inputs:
        absolute = Path(os.path.abspath(given))
        if absolute.is_dir():
            roots.append(absolute)
            # --out inside the folder: skip it. --out the folder itself (outputs beside the
            # images) is allowed; the name rule then keeps the outputs out.
            skip = out_abs if out_abs != absolute and out_abs.is_relative_to(absolute) else None
            for path in sorted(absolute.rglob(pattern)):
                relative = path.relative_to(absolute)
                if (
                    path.is_file()
                    and path.suffix.lower() in SUPPORTED_SUFFIXES
                    and not any(part.startswith(".") for part in relative.parts)
                    and not path.stem.endswith(_NOT_IMAGES)
                    and not (skip is not None and path.is_relative_to(skip))
                ):
                    files[path] = None
        else:
            roots.append(absolute.parent)
            files[absolute] = None
    root = Path(os.path.commonpath(roots))
    jobs = sorted(
        (_Job(path, path.relative_to(root)) for path in files), key=lambda job: job.relative
    )

    # Inputs that would write the same outputs (x.tif and x.png in one folder) all fail.
    by_masks: dict[Path, list[_Job]] = {}
    for job in jobs:
        by_masks.setdefault(output_paths("", job.relative).masks, []).append(job)
    marked = []
    for job in jobs:
        clash = by_masks[output_paths("", job.relative).masks]
        if len(clash) > 1:
            others = ", ".join(str(other.path) for other in clash if other is not job)
            job = dataclasses.replace(
                job,
                error=f"would write the same outputs as {others}; rename one or run them apart",
            )
        marked.append(job)
    return marked


def _share(jobs: list[_Job], rank: int, world_size: int) -> list[_Job]:
    """This rank's jobs: largest file first to the rank with the fewest bytes (ties: lower rank)."""
    if world_size == 1:
        return jobs
    sizes = {job.path: job.path.stat().st_size if job.path.is_file() else 0 for job in jobs}
    load = [0] * world_size
    mine = []
    for job in sorted(jobs, key=lambda job: (-sizes[job.path], job.relative)):
        target = min(range(world_size), key=lambda k: (load[k], k))
        load[target] += sizes[job.path]
        if target == rank:
            mine.append(job)
    return sorted(mine, key=lambda job: job.relative)


# ------------------------------------------------------------------------------------------------
# Processes and logs
# ------------------------------------------------------------------------------------------------


def _init_distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank); joins torchrun's process group when WORLD_SIZE > 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1, 0
    # gloo: only barriers go over it, and it works whether or not the ranks have GPUs.
    dist.init_process_group("gloo", timeout=_PROCESS_GROUP_TIMEOUT)
    return dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def _resolve_device(name: str | None, local_rank: int, world_size: int) -> torch.device:
    """The device to run on: ``name``, or cuda:LOCAL_RANK when there is a GPU, else cpu."""
    if name is None:
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1): {error}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
        if device.index is None and world_size > 1:
            device = torch.device("cuda", local_rank)  # one GPU per rank
    return device


def _configure_logging(rank: int) -> None:
    """Errors from every rank; info from rank 0 only."""
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(format="%(levelname)s %(message)s", stream=sys.stderr)
    logging.getLogger("infer").setLevel(level)


def _merge_summaries(out_dir: Path, world_size: int) -> int:
    """Rank 0: merge summary_rank<k>.csv into summary.csv, delete them; return failures."""
    rows = []
    for rank in range(world_size):
        part = out_dir / f"summary_rank{rank}.csv"
        with open(part, newline="") as fh:
            rows += list(csv.DictReader(fh))
    rows.sort(key=lambda row: row["file"])
    with open(out_dir / "summary.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for rank in range(world_size):
        (out_dir / f"summary_rank{rank}.csv").unlink()
    n_failed = sum(row["status"] == "failed" for row in rows)
    log.info("%d images: %d failed; summary in %s", len(rows), n_failed, out_dir / "summary.csv")
    return n_failed
