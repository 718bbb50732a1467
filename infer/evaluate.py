"""``python -m infer.evaluate --true DIR --pred DIR [--csv FILE]``: score predicted masks.

Pairing (both folders are searched recursively; names starting with ``.`` are left out):

* **Predictions** are the files in ``--pred`` whose name ends in ``_masks`` (what ``python -m
  infer`` writes; Cellpose's ``_cp_masks`` too) before a label suffix (TIFF, PNG, BMP, NPY).
  Other files there (flows, outlines, summary.csv) are not predictions.
* **Ground truth**: in a folder of ``--true`` that holds files ending in ``_masks`` or
  ``_labels``, those are the labels and the other files are images (Cellpose's layout:
  ``x.tif`` or ``x_img.png`` beside ``x_masks.tif``). In a folder holding none, every image file
  is a label file (a folder of bare ``x.tif`` labels).
* A file's **key** is its folder relative to ``--true`` / ``--pred`` plus its name without the
  suffix, without a trailing ``_cp_masks``, ``_masks`` or ``_labels``, and then without a
  trailing ``_img`` or ``_image``. So ``pred/a/x_masks.tif`` pairs with ``true/a/x_masks.tif``,
  ``true/a/x_labels.png``, ``true/a/x.tif`` (bare-label folder) or ``true/a/x_masks.png``
  beside ``true/a/x_img.png``; and ``pred/x_img_masks.tif`` (the prediction for the image
  ``x_img.png``) pairs with ``true/x_masks.png``.
* Where one key has both ``_masks`` and ``_labels`` ground truth, ``_masks`` wins. Two
  predictions, or two ground-truth files of the same kind, with one key are ambiguous.

Ground truth without a prediction, predictions without ground truth, ambiguous files and files
that fail to load (or whose shapes differ) are listed on stdout and in the CSV; the exit status
is then 1 (0 when every file was paired and scored, 2 for bad arguments).

Scores (``pipeline.metrics``, matching as Cellpose's): per image, AP = TP / (TP + FP + FN) at
IoU 0.5, 0.75 and 0.9 (``--thresholds``), TP/FP/FN at the first threshold, and the error rate
(FP + FN) / n_true at IoU 0.5. The ``mean`` row averages AP over images that have any object
(AP of an image with none is undefined) and the error rate over images with true objects,
each image weighing the same (paper.md 3a).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infer.outputs import MASKS_SUFFIX
from pipeline.io import SUPPORTED_SUFFIXES, read_labels
from pipeline.metrics import average_precision, error_rate

__all__ = ["Pairing", "evaluate", "main", "mean_row", "pair_files", "pairing_key", "score_masks"]

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)
# Label-file suffixes in order of preference, and image-name suffixes stripped after them.
_LABEL_SUFFIXES = ("_masks", "_labels")
_PRED_SUFFIXES = ("_cp_masks", MASKS_SUFFIX)  # Cellpose's CLI writes x_cp_masks.tif
_IMAGE_SUFFIXES = ("_img", "_image")
_LABEL_FILE_SUFFIXES = tuple(s for s in SUPPORTED_SUFFIXES if s not in (".jpg", ".jpeg"))


@dataclass
class Pairing:
    """Which ground-truth file goes with which prediction, and what is left over."""

    pairs: list[tuple[Path, Path]] = field(default_factory=list)
    """(true, pred) file pairs, sorted by key."""
    true_only: list[Path] = field(default_factory=list)
    """Ground-truth files with no prediction."""
    pred_only: list[Path] = field(default_factory=list)
    """Predictions with no ground truth."""
    ambiguous: list[tuple[Path, str]] = field(default_factory=list)
    """Files left out because another file has the same key and kind, with the reason."""


def pairing_key(relative: Path) -> str:
    """The key of a file path relative to its root folder (see the module notes).

    >>> pairing_key(Path("a/x_img_masks.tif")), pairing_key(Path("x_labels.png"))
    ('a/x', 'x')
    """
    stem = relative.stem
    for suffix in _PRED_SUFFIXES + _LABEL_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    for suffix in _IMAGE_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            stem = stem[: -len(suffix)]
            break
    return (relative.parent / stem).as_posix()


def pair_files(true_dir: str | os.PathLike, pred_dir: str | os.PathLike) -> Pairing:
    """Pair ground truth under ``true_dir`` with predictions under ``pred_dir`` by key."""
    true_dir, pred_dir = Path(true_dir), Path(pred_dir)
    pairing = Pairing()
    preds = _unique_by_key(
        [p for p in _files(pred_dir) if p.stem.endswith(MASKS_SUFFIX)], pred_dir, pairing, rank=None
    )
    truths = _unique_by_key(_label_files(true_dir), true_dir, pairing, rank=_label_rank)
    for key in sorted(truths.keys() | preds.keys()):
        if key in truths and key in preds:
            pairing.pairs.append((truths[key], preds[key]))
        elif key in truths:
            pairing.true_only.append(truths[key])
        else:
            pairing.pred_only.append(preds[key])
    return pairing


def _files(root: Path) -> list[Path]:
    """Files with a label-file suffix under ``root``, hidden names left out, sorted."""
    return sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and path.suffix.lower() in _LABEL_FILE_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    )


def _label_files(true_dir: Path) -> list[Path]:
    """Ground-truth label files: the ``_masks``/``_labels`` files of a folder, or all if none."""
    by_folder: dict[Path, list[Path]] = {}
    for path in _files(true_dir):
        by_folder.setdefault(path.parent, []).append(path)
    labels = []
    for paths in by_folder.values():
        marked = [p for p in paths if _label_rank(p) < len(_LABEL_SUFFIXES)]
        labels += marked or paths
    return sorted(labels)


def _label_rank(path: Path) -> int:
    """0 for ``_masks``, 1 for ``_labels``, 2 for a bare name (lower is preferred)."""
    ranks = (i for i, suffix in enumerate(_LABEL_SUFFIXES) if path.stem.endswith(suffix))
    return next(ranks, len(_LABEL_SUFFIXES))


def _unique_by_key(paths: list[Path], root: Path, pairing: Pairing, rank) -> dict[str, Path]:
    """key -> the one file for it (the best-ranked); ties are recorded as ambiguous."""
    groups: dict[str, list[Path]] = {}
    for path in paths:
        groups.setdefault(pairing_key(path.relative_to(root)), []).append(path)
    chosen = {}
    for key, group in groups.items():
        best = min(rank(p) for p in group) if rank else 0
        tied = [p for p in group if (rank(p) if rank else 0) == best]
        if len(tied) == 1:
            chosen[key] = tied[0]
            continue
        for path in tied:
            others = ", ".join(str(p) for p in tied if p != path)
            pairing.ambiguous.append((path, f"same key {key!r} as {others}; rename or remove one"))
    return chosen


# ------------------------------------------------------------------------------------------------
# Scoring
# ------------------------------------------------------------------------------------------------


def evaluate(
    pairs: Sequence[tuple[Path, Path]], thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> list[dict]:
    """One row per (true, pred) pair: counts, AP per threshold, error rate, or the error."""
    rows = []
    for true_path, pred_path in pairs:
        row = {"true": str(true_path), "pred": str(pred_path)}
        try:
            masks_true, masks_pred = read_labels(true_path), read_labels(pred_path)
            if masks_true.shape != masks_pred.shape:
                raise ValueError(
                    f"shapes differ: true {masks_true.shape}, pred {masks_pred.shape}; predict on "
                    "the same image at its full size"
                )
            rows.append(row | score_masks(masks_true, masks_pred, thresholds))
        except (ValueError, TypeError, OSError) as error:
            rows.append({**row, "status": "failed", "error": " ".join(str(error).split())})
    return rows


def score_masks(
    masks_true: np.ndarray, masks_pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> dict:
    """One image's scores: status "ok", n_true, n_pred, ap@t per threshold, tp/fp/fn at the
    first threshold and error_rate@0.5 (NaN AP without any object, NaN error without true ones).

    The one definition of a per-image row, shared with ``infer.benchmark``.
    """
    ap, tp, fp, fn = average_precision(masks_true, masks_pred, thresholds)
    errors, _ = error_rate(masks_true, masks_pred, 0.5)
    tp, fp, fn = int(tp[0, 0]), int(fp[0, 0]), int(fn[0, 0])  # at the first threshold
    row = {"status": "ok", "n_true": tp + fn, "n_pred": tp + fp}
    row |= {f"ap@{t:g}": float(ap[0, k]) for k, t in enumerate(thresholds)}
    first = f"{thresholds[0]:g}"
    row |= {f"tp@{first}": tp, f"fp@{first}": fp, f"fn@{first}": fn}
    row["error_rate@0.5"] = float(errors[0])
    return row


def mean_row(rows: Sequence[dict], thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Means over the scored rows: AP where defined (any object), error rate where n_true > 0."""
    scored = [row for row in rows if row.get("status") == "ok"]
    mean = {"true": "", "pred": "mean", "status": f"{len(scored)} scored"}
    for name in [f"ap@{t:g}" for t in thresholds] + ["error_rate@0.5"]:
        values = [row[name] for row in scored if not math.isnan(row[name])]
        mean[name] = float(np.mean(values)) if values else math.nan
    for name in ["n_true", "n_pred"] + [f"{c}@{thresholds[0]:g}" for c in ("tp", "fp", "fn")]:
        mean[name] = sum(row[name] for row in scored)
    return mean


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, pair, score, print (and write the CSV); return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m infer.evaluate",
        description="AP and error rate of predicted masks against ground truth (see the module "
        "docs of infer/evaluate.py for how files are paired).",
    )
    parser.add_argument("--true", required=True, type=Path, help="folder of ground-truth labels")
    parser.add_argument("--pred", required=True, type=Path, help="folder of *_masks predictions")
    parser.add_argument("--csv", type=Path, help="write per-image rows and the mean here")
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=list(DEFAULT_THRESHOLDS),
        help="IoU thresholds for AP (default: 0.5 0.75 0.9)",
    )
    args = parser.parse_args(argv)
    for name in ("true", "pred"):
        if not getattr(args, name).is_dir():
            parser.error(f"--{name} {getattr(args, name)} is not a folder")
    if not all(0 < t <= 1 for t in args.thresholds):
        parser.error(f"--thresholds must be IoU values in (0, 1]; got {args.thresholds}")
    thresholds = tuple(args.thresholds)

    pairing = pair_files(args.true, args.pred)
    rows = evaluate(pairing.pairs, thresholds)
    rows += [{"true": str(p), "pred": "", "status": "no_prediction"} for p in pairing.true_only]
    rows += [{"true": "", "pred": str(p), "status": "no_ground_truth"} for p in pairing.pred_only]
    rows += [
        {"true": "", "pred": str(p), "status": "ambiguous", "error": why}
        for p, why in pairing.ambiguous
    ]
    rows.append(mean_row(rows, thresholds))

    columns = ["pred", "true", "status", "n_true", "n_pred", *[f"ap@{t:g}" for t in thresholds],
               *[f"{c}@{thresholds[0]:g}" for c in ("tp", "fp", "fn")], "error_rate@0.5", "error"]
    _print_table(rows, columns)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
    problems = [row for row in rows[:-1] if row["status"] != "ok"]
    return 1 if problems or not pairing.pairs else 0


def _print_table(rows: list[dict], columns: list[str]) -> None:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    print("\t".join(columns))
    for row in rows:
        print("\t".join(cell(row.get(name, "")) for name in columns))


if __name__ == "__main__":
    sys.exit(main())
