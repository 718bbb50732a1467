"""``python -m infer INPUT... --checkpoint FILE --out DIR``: segment images in files and folders.

Inputs are image files (TIFF, PNG, JPEG, BMP, NPY; see ``pipeline.io.read_image``) and folders,
searched for files matching ``--glob`` (default ``*``) with one of those suffixes: at every depth
by default, only the folder itself with ``--no-recursive`` (Cellpose's default), one level of
subfolders with ``--look-one-level-down``. A folder search leaves out names starting with ``.``,
files whose name (before the suffix) ends in ``_masks`` (so ``_cp_masks``), ``_labels``,
``_flows``, ``_cellprob``, ``_outlines``, ``_rois`` or ``_seg`` (labels and outputs, ours or
Cellpose's, not images), and, when ``--out`` lies inside the folder, everything under ``--out``.
Files named on the command line are always taken; one named like an output fails with that
reason.

Outputs (``infer/outputs.py``) mirror the inputs' folders under ``--out``: each input's path
relative to the deepest folder holding all inputs (a folder input counts as itself, a file
input as its folder) names its outputs, so ``a/x.tif`` and ``b/x.tif`` give ``out/a/x_masks.tif``
and ``out/b/x_masks.tif``. Two inputs that would still write the same files (``x.tif`` and
``x.png`` side by side) both fail with a message saying so. Nothing is written outside ``--out``.

Stacks (``pipeline.io.read_stack``: a Z or T axis, or more than 4 pages) are segmented plane by
plane into one label stack of the same shape (``--plane N``: only plane N, 2-D outputs), or as
volumes with ``--do-3d`` / ``--stitch-threshold`` (``infer.predict.predict_volume``).

Reruns: the settings that produce the outputs (checkpoint, precision, channels, every
prediction option but the batch size) are kept as JSON in each masks file and in summary.csv.
An image whose masks (and the other outputs asked for) exist with the same settings is skipped
unless ``--overwrite``; one made with other settings is redone, with an info line naming what
changed. A file that cannot be read or predicted gets one ``ERROR <file>: <reason>`` line (a
read error as soon as the read fails) and the others go on; the exit status is 1 if any file
failed, 2 for bad arguments (a missing checkpoint or input, an ``--out`` that is a file, an
input, or not writable: all reported before the model loads), else 0. The last line gives the
total time and the done / skipped / failed counts. ``<out>/summary.csv`` gets one row per input
appended to those of earlier runs (an older layout is rewritten with the new columns empty), in
the order of the files: file (absolute path), size (HxW, or NxHxW for a stack), n_cells,
diameter (the one the image was rescaled by, given or estimated with ``--diameter auto``; empty
without a rescale), seconds (from the start of reading the file to its last output written;
images overlap, so these add up to more than the run), status (ok, skipped, failed), error,
run_started (UTC) and settings.

Cellpose's flag names are accepted too (:data:`CELLPOSE_FLAGS`, listed in ``--help``).

Files are read a few ahead by a thread, and on a GPU the tiles of consecutive images share
network batches (``--batch-size`` tiles per call, whichever images they come from) and the masks
of one image are followed and written while the network runs on the next
(``infer.predict.predict_stream``). A network call that fails is retried image by image, so
only the image that fails on its own is reported failed.

Under ``torchrun`` (WORLD_SIZE > 1) every rank takes a disjoint, deterministic share of the files
(largest first, each to the rank with the fewest bytes so far; ties to the lower rank), on
``cuda:LOCAL_RANK`` when there is a GPU. Each rank writes ``summary_rank<k>.csv`` as it goes;
after a barrier rank 0 appends them to ``summary.csv`` (sorted by file) and deletes them. A run
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
import json
import logging
import os
import queue
import sys
import textwrap
import threading
import time
import typing
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal, NamedTuple

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
    write_png_masks,
    write_rois,
    write_seg,
)
from infer.predict import AUTO, Prediction, PredictConfig, Skip, load_model, predict_stream
from pipeline.io import SUPPORTED_SUFFIXES, read_image, read_labels_info, read_stack

__all__ = ["CELLPOSE_FLAGS", "FileResult", "InferConfig", "main", "run"]

log = logging.getLogger("infer")

SUMMARY_COLUMNS = (
    "file", "size", "n_cells", "diameter", "seconds", "status", "error", "run_started", "settings"
)
# Name endings (before the suffix) of labels and outputs, ours or Cellpose's (_cp_masks,
# _seg.npy, _flows): never taken as images.
_NOT_IMAGES = ("_masks", "_labels", "_flows", "_cellprob", "_outlines", "_seg", "_rois")
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
    """Pattern matched against file names while searching folders."""
    recursive: bool = True
    """Search folders at every depth; --no-recursive: only the folder itself (Cellpose's default)."""
    look_one_level_down: bool = False
    """Search folders and their direct subfolders only (Cellpose's --look_one_level_down)."""
    overwrite: bool = False
    """Redo images whose outputs exist with the same settings (outputs made with other settings are always redone)."""
    save_flows: bool = False
    """Also write <name>_flows.npy (2, H, W) and <name>_cellprob.npy (H, W), float32."""
    save_outlines: bool = False
    """Also write <name>_outlines.png, the image with mask outlines in red (2-D images)."""
    save_rois: bool = False
    """Also write <name>_rois.zip, one ImageJ polygon ROI per mask (Fiji's ROI Manager; 2-D images)."""
    save_png: bool = False
    """Also write <name>_masks.png, the masks as a 16-bit PNG (Cellpose's --save_png; 2-D images)."""
    save_seg: bool = False
    """Also write <name>_seg.npy, the Cellpose GUI file (io.masks_flows_to_seg layout), to correct masks in the GUI (2-D images)."""
    channels: tuple[int, ...] | None = None
    """Channel indices to use (up to 3), for files with more than 3 channels or a varying alpha."""
    channel_axis: int | None = None
    """Axis of the stored array that holds the channels (e.g. 0 for a plain TIFF of 5 channel pages)."""
    z_axis: int | None = None
    """Axis of the stored array that holds the planes of a stack (Z or T)."""
    plane: int | None = None
    """Segment only this plane of each stack; default: every plane, into a label stack of the same shape."""
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
        if self.plane is not None and self.plane < 0:
            raise ValueError(f"plane: a plane index >= 0; got {self.plane}")
        if self.plane is not None and self.predict.volume:
            raise ValueError("plane picks one 2-D plane; drop it to segment whole stacks in 3-D")
        if self.look_one_level_down and not self.recursive:
            raise ValueError("look_one_level_down searches subfolders; drop --no-recursive")


# ------------------------------------------------------------------------------------------------
# Command line (generated from the config dataclasses)
# ------------------------------------------------------------------------------------------------

#: Cellpose's flags (``cellpose/cli.py``) this command takes, and the option each one is.
#: Values are read as Cellpose reads them: ``--diameter 0`` is ``--diameter auto`` (Cellpose 3
#: estimated the size at 0) and ``--niter 0`` is the automatic 200 / rescale, whichever spelling
#: is used; ``--img_filter X`` is ``--glob '*X.*'``.
CELLPOSE_FLAGS = {
    "--dir": "INPUT", "--image_path": "INPUT", "--pretrained_model": "--checkpoint",
    "--savedir": "--out", "--img_filter": "--glob", "--look_one_level_down": "--look-one-level-down",
    "--channel_axis": "--channel-axis", "--z_axis": "--z-axis", "--use_gpu": "--device cuda",
    "--no_norm": "--no-normalize", "--norm_percentile": "--norm-percentile",
    "--diameter": "--diameter", "--flow_threshold": "--flow-threshold",
    "--cellprob_threshold": "--cellprob-threshold", "--min_size": "--min-size", "--niter": "--niter",
    "--batch_size": "--batch-size", "--augment": "--augment",
    "--exclude_on_edges": "--exclude-on-edges", "--save_png": "--save-png",
    "--save_flows": "--save-flows", "--save_outlines": "--save-outlines", "--save_rois": "--save-rois",
    "--do_3D": "--do-3d", "--anisotropy": "--anisotropy", "--flow3D_smooth": "--flow3d-smooth",
    "--stitch_threshold": "--stitch-threshold",
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run, return the exit status."""
    parser = _parser()
    # nargs="+" gives lists; the configs hold tuples (they are frozen and hashable).
    parsed = vars(parser.parse_args(argv))
    args = {name: tuple(v) if isinstance(v, list) else v for name, v in parsed.items()}
    try:
        args = _from_cellpose_flags(args)
        predict_names = _cli_fields(PredictConfig)
        predict_cfg = PredictConfig(**{name: args.pop(name) for name in predict_names})
        cfg = InferConfig(predict=predict_cfg, **args)
    except (TypeError, ValueError) as error:
        parser.error(str(error))
    return run(cfg)


def _from_cellpose_flags(args: dict) -> dict:
    """Fold the values given under Cellpose's flags into the fields (see CELLPOSE_FLAGS)."""
    args = dict(args)
    args["inputs"] = args["inputs"] + args.pop("cellpose_inputs", ())
    for name, flags in (("checkpoint", "--checkpoint (or --pretrained_model)"),
                        ("out", "--out (or --savedir)")):
        if args.get(name) is None:
            raise ValueError(f"the following argument is required: {flags}")
    img_filter = args.pop("img_filter", None)
    if img_filter is not None:
        if args["glob"] != "*":
            raise ValueError("--img_filter and --glob both pick files; give one of them")
        args["glob"] = f"*{img_filter}.*"
    if args.pop("use_gpu", False):
        if args["device"] not in (None, "cuda"):
            raise ValueError(f"--use_gpu and --device {args['device']} disagree; give one of them")
        args["device"] = "cuda"
    if args["diameter"] == 0:
        args["diameter"] = AUTO  # Cellpose 3's "estimate it"
    if args["niter"] == 0:
        args["niter"] = None  # Cellpose's "automatic"
    return args


def _parser() -> argparse.ArgumentParser:
    epilog = "Cellpose's flags are taken too (--diameter 0 is auto, --niter 0 automatic):\n" + "\n".join(
        f"  {flag:24} {ours}" for flag, ours in CELLPOSE_FLAGS.items() if flag != ours
    )
    parser = argparse.ArgumentParser(
        prog="python -m infer",
        description="Segment images with a CP-SAM model: masks, optional flows, outlines and ROIs.",
        formatter_class=_HelpFormatter,
        epilog=epilog,
    )
    docs = {**_field_docs(InferConfig), **_field_docs(PredictConfig)}
    parser.add_argument("inputs", nargs="*", metavar="INPUT", help=docs["inputs"])
    hints = {**typing.get_type_hints(InferConfig), **typing.get_type_hints(PredictConfig)}
    for cls in (InferConfig, PredictConfig):
        defaults = _defaults(cls)
        for name in _cli_fields(cls):
            if name != "inputs":
                _add_option(parser, name, hints[name], defaults[name], docs[name])
    _add_cellpose_flags(parser, hints)
    return parser


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the help; the epilog's table of Cellpose's flags kept as written."""


def _add_cellpose_flags(parser: argparse.ArgumentParser, hints: dict) -> None:
    """Cellpose's spellings, hidden from the help (its epilog lists them); defaults left alone."""
    hidden = {"help": argparse.SUPPRESS, "default": argparse.SUPPRESS}
    parser.add_argument("--dir", "--image_path", dest="cellpose_inputs", action="append", **hidden)
    parser.add_argument("--img_filter", dest="img_filter", **hidden)
    parser.add_argument("--use_gpu", dest="use_gpu", action="store_true", **hidden)
    parser.add_argument("--no_norm", dest="normalize", action="store_false", **hidden)
    special = {"--dir", "--image_path", "--img_filter", "--use_gpu", "--no_norm"}
    for flag, ours in CELLPOSE_FLAGS.items():
        if flag == ours or flag in special:
            continue  # the same spelling, or one of those above
        name = ours.removeprefix("--").replace("-", "_")
        parser.add_argument(flag, dest=name, **_value_options(name, hints[name]), **hidden)


def _value_options(name: str, hint) -> dict:
    """argparse's type / nargs / action for a field, from its annotation."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
    if words:  # a number or a keyword, e.g. --diameter 17 / --diameter auto
        return {"type": _number_or(words, base), "metavar": f"{{{base.__name__},{','.join(words)}}}"}
    if base is bool:
        return {"action": "store_true"}
    if typing.get_origin(base) is tuple:
        items = typing.get_args(base)
        nargs = "+" if Ellipsis in items else len(items)
        return {"nargs": nargs, "type": items[0]}
    assert base in (int, float, str), f"no command-line type for {name}: {hint}"
    return {"type": base}


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
    options = _value_options(name, hint)
    if default is dataclasses.MISSING:
        # Required, but checked after parsing: Cellpose's spelling may give it.
        parser.add_argument(flag, dest=name, default=None, **options, help=help_text)
    elif options.get("action") == "store_true":
        parser.add_argument(
            flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=help_text
        )
    else:
        parser.add_argument(flag, dest=name, default=default, **options, help=help_text)


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


@dataclass(frozen=True)
class FileResult:
    """What happened to one input file: its summary row (see SUMMARY_COLUMNS)."""

    file: str
    status: Literal["ok", "skipped", "failed"]
    size: str = ""
    n_cells: int | str = ""
    diameter: str = ""
    seconds: str = ""
    error: str = ""
    run_started: str = ""
    settings: str = ""


def run(cfg: InferConfig) -> int:
    """Segment the inputs of ``cfg``; return the exit status (0 ok, 1 a file failed, 2 usage)."""
    started = time.perf_counter()
    run_started = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    rank, world_size, local_rank = _init_distributed()
    _configure_logging(rank)
    try:
        # Everything that can be wrong with the arguments is reported before any file is read
        # and before the model loads.
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
        problem = _out_problem(out_dir, cfg.inputs)
        if problem is not None:
            log.error("--out %s: %s", out_dir, problem)
            return 2
        jobs = _find_jobs([Path(p) for p in cfg.inputs], out_dir, cfg.glob, _depth(cfg))
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
        run = _Run(cfg, settings=_settings(cfg), run_started=run_started)
        summary = out_dir / ("summary.csv" if world_size == 1 else f"summary_rank{rank}.csv")
        if world_size == 1:
            _prepare_summary(summary)
        else:
            _write_rows(summary, [], mode="w")  # this run's rows only; merged at the end
        counts = _process(model, my_jobs, run, summary, show_progress=rank == 0)
        if world_size > 1:
            dist.barrier()  # every rank's summary is complete
            if rank == 0:
                counts = _merge_summaries(out_dir, world_size)
            dist.barrier()  # rank 0 has merged before any rank exits (torchrun stops the rest)
        if rank == 0:
            log.info(
                "%d images in %.1f s: %d done, %d skipped, %d failed; summary in %s",
                sum(counts.values()), time.perf_counter() - started, counts["ok"],
                counts["skipped"], counts["failed"], out_dir / "summary.csv",
            )
        return 1 if counts["failed"] else 0
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _out_problem(out_dir: Path, inputs: tuple[str, ...]) -> str | None:
    """Why ``--out`` cannot take the outputs (None if it can); nothing is created here."""
    absolute = Path(os.path.abspath(out_dir))
    if absolute.exists() and not absolute.is_dir():
        return "is a file, not a folder"
    if any(Path(os.path.abspath(given)) == absolute for given in inputs if Path(given).is_file()):
        return "is one of the input files"
    existing = absolute
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == absolute else f"cannot be created in {existing} (not writable)"
        return what
    return None


def _depth(cfg: InferConfig) -> int | None:
    """How deep folder searches go: None for any depth, 0 for the folder itself."""
    if cfg.look_one_level_down:
        return 1
    return None if cfg.recursive else 0


@dataclass(frozen=True)
class _Run:
    """What every file of a run shares."""

    cfg: InferConfig
    settings: dict  # what produced the outputs (recorded with them; see _settings)
    run_started: str  # ISO time, UTC


def _settings(cfg: InferConfig) -> dict:
    """The options that decide the outputs' content, recorded in summary.csv and each masks file.

    The checkpoint is named by its absolute path, size and modification time (hashing a 1.2 GB
    file per run would cost more than a small run); batch size and device change only rounding.
    """
    checkpoint = Path(cfg.checkpoint).resolve()
    stat = checkpoint.stat()
    predict = dataclasses.asdict(cfg.predict)
    predict.pop("batch_size")
    return {
        "checkpoint": str(checkpoint),
        "checkpoint_bytes": stat.st_size,
        "checkpoint_mtime_ns": stat.st_mtime_ns,
        "precision": cfg.precision,
        "channels": cfg.channels,
        "channel_axis": cfg.channel_axis,
        "z_axis": cfg.z_axis,
        "plane": cfg.plane,
        **{name: list(v) if isinstance(v, tuple) else v for name, v in predict.items()},
    }


def _process(model, jobs: list[_Job], run: _Run, summary: Path, show_progress: bool) -> Counter:
    """Run every job, appending a summary row as each ends; return the count of each status.

    A thread reads the next files (:func:`_read_ahead`) while ``infer.predict.predict_stream``
    runs the network (on a GPU with the tiles of consecutive images pooled into batches, and a
    worker following the flows and writing each image's outputs, :func:`_collect`, meanwhile).
    A stack goes through the stream plane by plane. Rows come out in the order of ``jobs``.
    """
    counts: Counter = Counter({"ok": 0, "skipped": 0, "failed": 0})
    with open(summary, "a", newline="") as fh, logging_redirect_tqdm():
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        bar = tqdm(total=len(jobs), disable=not show_progress, unit="image", dynamic_ncols=True)
        tiles = tqdm(disable=not show_progress, unit="tile", leave=False, dynamic_ncols=True, position=1)

        def on_tiles(n_run: int, n_planned: int) -> None:
            tiles.total = n_planned
            tiles.update(n_run - tiles.n)

        then = functools.partial(_collect, run=run)
        stream = predict_stream(model, _read_ahead(jobs, run), run.cfg.predict, then=then, on_tiles=on_tiles)
        for (item, plane), result in stream:
            result = _file_result(item, plane, result, run)
            if result is None:
                continue  # a plane of a stack whose last plane is still to come
            if result.status == "failed" and not item.logged:
                log.error("%s: %s", item.job.path, result.error)
            counts[result.status] += 1
            writer.writerow(dataclasses.asdict(result))
            fh.flush()  # a run cut short keeps the rows so far
            bar.update()
        tiles.close()
        bar.close()
    return counts


@dataclass(eq=False)
class _Item:
    """One job on its way through :func:`_process`."""

    job: _Job
    paths: OutputPaths
    started: float  # perf_counter() when its file began to be read
    image: np.ndarray | None = None  # kept for the outlines only
    stack_axes: str | None = None  # ZYX / TYX for a stack segmented plane by plane
    n_planes: int = 1
    planes: list = field(default_factory=list)  # a stack's plane predictions, in the worker
    error: tuple[int | None, BaseException] | None = None  # the first (plane, error) that failed
    logged: bool = False  # its failure was logged when it happened (a read error)


# Files read ahead of the network: enough to fill a batch of small images without holding many.
_READ_AHEAD = 4
# A stack's letter (pipeline.io.read_stack) -> the ImageJ axes of its label stack.
_STACK_AXES = {"T": "TYX"}  # everything else (Z, pages, unnamed) is a Z-stack


def _read_ahead(jobs: list[_Job], run: _Run) -> Iterator[tuple[tuple[_Item, int | None], object]]:
    """``((item, plane), image)`` per image or plane, read by a thread a few files ahead.

    ``plane`` is None for a 2-D image. The image is a :class:`~infer.predict.Skip` with the
    job's row when it needs no network, or the exception that stopped the read (logged as it
    happens, not when its turn in the stream comes).
    """
    results: queue.Queue = queue.Queue(maxsize=_READ_AHEAD)
    stop = threading.Event()

    def put(value) -> bool:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def reader() -> None:
        try:
            for job in jobs:
                for loaded in _load(job, run):
                    if not put(loaded):
                        return
        except BaseException as error:  # a bug here must reach the consumer, not hang it
            put(_ReaderFailed(error))
            return
        put(None)

    thread = threading.Thread(target=reader, name="read-ahead", daemon=True)
    thread.start()
    try:
        while (loaded := results.get()) is not None:
            if isinstance(loaded, _ReaderFailed):
                raise loaded.error
            yield loaded
    finally:
        stop.set()  # the consumer stopped early: let the reader end
        thread.join()


class _ReaderFailed(NamedTuple):
    error: BaseException


def _load(job: _Job, run: _Run) -> Iterator[tuple[tuple[_Item, int | None], object]]:
    """The images of one job (its planes, for a stack); never raises."""
    cfg = run.cfg
    item = _Item(job, output_paths(cfg.out, job.relative), time.perf_counter())
    if job.error is not None:
        yield (item, None), Skip(_failed(item, job.error, run))
        return
    try:
        if not cfg.overwrite:
            done = _done_before(item, run)
            if done is not None:
                yield (item, None), Skip(done)
                return
        if cfg.plane is not None:
            image = read_image(job.path, cfg.channels, cfg.plane, channel_axis=cfg.channel_axis, z_axis=cfg.z_axis)
            planes, letter = image[np.newaxis], None
        else:
            planes, letter = read_stack(job.path, cfg.channels, channel_axis=cfg.channel_axis, z_axis=cfg.z_axis)
    except Exception as error:  # noqa: BLE001 -- one bad file must not stop the others
        item.logged = True
        reason = _reason(error, job.path)
        log.error("%s: %s", job.path, reason)
        yield (item, None), Skip(_failed(item, reason, run))
        return
    if cfg.predict.volume:
        if letter is None:
            yield (item, None), Skip(_failed(item, "is a 2-D image; --do-3d and --stitch-threshold segment stacks", run))
            return
        item.stack_axes = "ZYX"
        yield (item, None), planes  # the whole volume at once
        return
    if letter is None:
        item.image = planes[0] if cfg.save_outlines else None
        yield (item, None), planes[0]
        return
    item.stack_axes, item.n_planes = _STACK_AXES.get(letter, "ZYX"), len(planes)
    item.planes = [None] * len(planes)
    for index, plane in enumerate(planes):
        yield (item, index), plane


def _collect(key: tuple[_Item, int | None], prediction, run: _Run) -> FileResult | None:
    """``then`` of the stream: write a 2-D image's outputs, or keep a plane until its stack is whole."""
    item, plane = key
    if plane is None:
        return _write(item, prediction, run)
    item.planes[plane] = prediction
    if plane < item.n_planes - 1 or any(p is None for p in item.planes):
        return None  # more planes to come, or one failed (reported by _file_result)
    planes, item.planes = item.planes, []
    masks = np.stack([p.masks for p in planes])
    diameters = [p.diameter for p in planes if p.diameter is not None]
    stacked = Prediction(
        masks=masks.astype(np.uint32 if masks.max(initial=0) > np.iinfo(np.uint16).max else np.uint16),
        flows=np.stack([p.flows for p in planes], axis=1),  # (2, N, H, W), as Cellpose's dP
        cellprob=np.stack([p.cellprob for p in planes]),
        diameter=float(np.median(diameters)) if diameters else None,
    )
    return _write(item, stacked, run)


def _file_result(item: _Item, plane: int | None, result, run: _Run) -> FileResult | None:
    """The row of a job from what the stream gave for it (None: a plane of a stack, more to come)."""
    if isinstance(result, BaseException) and item.error is None:
        item.error = (plane, result)
    if plane is not None and plane < item.n_planes - 1:
        return None
    if isinstance(result, FileResult):
        return result
    if item.error is None:  # not expected: the last plane's then gave nothing without a failure
        return _failed(item, "internal error: no result and no failure recorded", run)
    failed_plane, error = item.error
    where = "" if failed_plane is None else f"plane {failed_plane}: "
    return _failed(item, where + _reason(error, item.job.path), run)


def _failed(item: _Item, reason: str, run: _Run) -> FileResult:
    return FileResult(
        file=str(item.job.path), status="failed", error=reason,
        seconds=f"{time.perf_counter() - item.started:.3f}", run_started=run.run_started,
        settings=_settings_text(run.settings),
    )


class _Output(NamedTuple):
    """An output an option asks for, besides the masks (which are always written, last)."""

    flag: str  # the InferConfig field that asks for it
    paths: tuple[str, ...]  # the OutputPaths fields it writes (all must exist for "done")
    flat_only: bool  # written for 2-D images only, not for stacks
    write: Callable[[_Item, Prediction], None]


# One entry per optional output; adding an output is adding an entry (and its OutputPaths field).
_EXTRA_OUTPUTS = (
    _Output("save_flows", ("flows", "cellprob"), False, lambda item, prediction: (
        write_array(item.paths.flows, prediction.flows),
        write_array(item.paths.cellprob, prediction.cellprob))),
    _Output("save_outlines", ("outlines",), True,
            lambda item, prediction: write_overlay(item.paths.outlines, item.image, prediction.masks)),
    _Output("save_rois", ("rois",), True,
            lambda item, prediction: write_rois(item.paths.rois, prediction.masks)),
    _Output("save_png", ("png",), True,
            lambda item, prediction: write_png_masks(item.paths.png, prediction.masks)),
    _Output("save_seg", ("seg",), True, lambda item, prediction: write_seg(item.paths.seg, seg_record(
        item.job.path, prediction.masks, prediction.flows, prediction.cellprob, prediction.diameter))),
)


def _write(item: _Item, prediction: Prediction, run: _Run) -> FileResult:
    """Write one image's (or stack's) outputs, masks last: their presence marks the image done."""
    cfg, paths, masks = run.cfg, item.paths, prediction.masks
    paths.masks.parent.mkdir(parents=True, exist_ok=True)
    stack = item.stack_axes is not None
    asked = [output for output in _EXTRA_OUTPUTS if getattr(cfg, output.flag)]
    if stack and any(output.flat_only for output in asked):
        flags = ", ".join("--" + o.flag.replace("_", "-") for o in asked if o.flat_only)
        log.warning("%s: is a stack; %s are written for 2-D images only (use --plane N for one plane)",
                    item.job.path, flags)
    for output in asked:
        if not (output.flat_only and stack):
            output.write(item, prediction)
    item.image = None  # held for the outlines only
    row = FileResult(
        file=str(item.job.path),
        status="ok",
        size="x".join(map(str, masks.shape)),
        # Planes segmented one by one are numbered on their own: their masks add up.
        n_cells=sum(map(_count_cells, masks)) if stack and not cfg.predict.volume else _count_cells(masks),
        diameter="" if prediction.diameter is None else f"{prediction.diameter:.2f}",
        run_started=run.run_started,
        settings=_settings_text(run.settings),
    )
    info = {"settings": run.settings, "stack": stack, "size": row.size, "n_cells": row.n_cells,
            "diameter": row.diameter}
    write_masks(paths.masks, masks, axes=item.stack_axes, info=json.dumps(info))
    return dataclasses.replace(row, seconds=f"{time.perf_counter() - item.started:.3f}")


def _done_before(item: _Item, run: _Run) -> FileResult | None:
    """The skipped row of an input whose outputs exist with this run's settings, else None.

    Outputs made with other settings (or by a version that did not record them) are redone.
    """
    paths = item.paths
    if not paths.masks.is_file():
        return None
    try:
        info = json.loads(read_labels_info(paths.masks) or "null")
    except ValueError:
        info = None
    if not isinstance(info, dict) or info.get("settings") != json.loads(json.dumps(run.settings)):
        changed = _changed_settings(info.get("settings") if isinstance(info, dict) else None, run.settings)
        log.info("%s: made with other settings (%s); redoing it", paths.masks, changed)
        return None
    for output in _EXTRA_OUTPUTS:
        wanted = getattr(run.cfg, output.flag) and not (output.flat_only and info.get("stack"))
        if wanted and not all(getattr(paths, name).is_file() for name in output.paths):
            return None
    return FileResult(
        file=str(item.job.path), status="skipped", size=info.get("size", ""), n_cells=info.get("n_cells", ""),
        diameter=info.get("diameter", ""), run_started=run.run_started,
        settings=_settings_text(run.settings),
    )


def _changed_settings(before: dict | None, now: dict) -> str:
    if not isinstance(before, dict):
        return "none recorded"
    now = json.loads(json.dumps(now))  # tuples as lists, as recorded
    names = sorted(name for name in before.keys() | now.keys() if before.get(name) != now.get(name))
    return ", ".join(f"{name} {before.get(name)!r} -> {now.get(name)!r}" for name in names)


def _settings_text(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def _count_cells(masks: np.ndarray) -> int:
    return int(np.count_nonzero(np.bincount(masks.ravel())[1:]))


def _reason(error, path: Path) -> str:
    """One line saying what went wrong, without repeating the file name."""
    if isinstance(error, str):
        return error
    message = " ".join(str(error).split()) or "(no message)"
    if message.startswith(f"{path}: "):
        message = message[len(f"{path}: "):]
    if not isinstance(error, (ValueError, TypeError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return message


# ------------------------------------------------------------------------------------------------
# summary.csv: kept across runs
# ------------------------------------------------------------------------------------------------


def _prepare_summary(summary: Path) -> None:
    """Make ``summary`` end in this version's header, keeping the rows of earlier runs."""
    if summary.is_file():
        with open(summary, newline="") as fh:
            reader = csv.DictReader(fh)
            if tuple(reader.fieldnames or ()) == SUMMARY_COLUMNS:
                return  # rows are appended
            rows = list(reader)  # an older layout: rewritten with the new columns empty
        _write_rows(summary, rows, mode="w")
    else:
        _write_rows(summary, [], mode="w")


def _write_rows(path: Path, rows: list[dict], mode: str) -> None:
    with open(path, mode, newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS, restval="", extrasaction="ignore")
        if mode == "w":
            writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------------------------------------
# Finding files and sharing them out
# ------------------------------------------------------------------------------------------------


def _find_jobs(inputs: list[Path], out_dir: Path, pattern: str, depth: int | None = None) -> list[_Job]:
    """Every input file once, sorted by its relative path, with colliding outputs marked failed.

    Folders are searched ``depth`` levels down (None: all the way; 0: the folder itself). A file
    named like a mask or an output is left out of folder searches, and fails with the reason
    when it is named on the command line.
    """
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
                if depth is not None and len(relative.parts) > depth + 1:
                    continue
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
        if job.path.stem.endswith(_NOT_IMAGES):
            job = dataclasses.replace(
                job,
                error=f"is named like a mask or an output (ends in {_name_ending(job.path)}), "
                "not an image; rename it to segment it",
            )
            marked.append(job)
            continue
        clash = by_masks[output_paths("", job.relative).masks]
        if len(clash) > 1:
            others = ", ".join(str(other.path) for other in clash if other is not job)
            job = dataclasses.replace(
                job,
                error=f"would write the same outputs as {others}; rename one or run them apart",
            )
        marked.append(job)
    return marked


def _name_ending(path: Path) -> str:
    return next(end for end in _NOT_IMAGES if path.stem.endswith(end)) + path.suffix


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


def _merge_summaries(out_dir: Path, world_size: int) -> Counter:
    """Rank 0: append this run's summary_rank<k>.csv to summary.csv, delete them; count statuses."""
    rows = []
    for rank in range(world_size):
        part = out_dir / f"summary_rank{rank}.csv"
        with open(part, newline="") as fh:
            rows += list(csv.DictReader(fh))
    rows.sort(key=lambda row: row["file"])
    summary = out_dir / "summary.csv"
    _prepare_summary(summary)
    _write_rows(summary, rows, mode="a")
    for rank in range(world_size):
        (out_dir / f"summary_rank{rank}.csv").unlink()
    return Counter(row["status"] for row in rows)
