"""AP while training: the paper's metrics on a fixed subset of the held-out shards, every
``loop.eval_every`` steps, so that a run shows AP per dataset rising, not only a loss falling.

The subset is the validation loader's (``train.data.build_val_loader``) with ``eval.splits`` and
at most ``eval.images_per_group`` samples per group (dataset or dataset/subset), the first by
key: the same images every time, each rank its contiguous share, every rank the same number of
batches (FSDP's collectives stay in step). Each sample goes through validation's augmentation
(``train.augment.augment(train=False)``: rescaled to diameter 30, the centre crop of
``augment.crop_size``), the model, then, on the CPU at the step, the masks
(``pipeline.dynamics.flows_to_masks``, Cellpose's defaults), scored against the crop's labels
(``pipeline.metrics``: AP at IoU 0.5, 0.75, 0.9 and the error rate at 0.5, with masks mostly in
a don't-care region removed first, as ``python -m infer.benchmark`` does). The sums per group
are all-reduced; the means are per image (paper.md 3a) per group and over all images.

This is one network tile per image, not the tiled, full-image prediction of ``infer``: it
follows the run's progress cheaply; ``python -m infer.benchmark`` on the export gives the
paper's table. Its cost is measured in docs/BENCHMARKS.md (issue 22).
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from pipeline.dynamics import flows_to_masks
from pipeline.metrics import average_precision, error_rate, remove_ignored_masks
from pipeline.shards import group_key, read_manifest
from train.augment import augment
from train.data import build_val_loader

__all__ = ["EvalConfig", "evaluate_ap"]

_THRESHOLDS = (0.5, 0.75, 0.9)
# Columns of the per-group sums that are all-reduced.
_IMAGES, _AP50, _AP75, _AP90, _AP_DEFINED, _ERROR, _ERROR_DEFINED = range(7)


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """AP during training (every ``loop.eval_every`` steps; 0 there turns it off)."""

    splits: tuple[str, ...] = ("test",)
    """Held-out splits the subset is drawn from (pannuke's and ihc_tma's is "fold3")."""
    images_per_group: int = 8
    """Images per group (dataset, or dataset/subset), the first by key: the fixed subset."""
    batch_size: int = 8
    """Images per forward pass on each rank."""

    def __post_init__(self) -> None:
        if isinstance(self.splits, list):  # YAML gives lists where the field is a tuple
            object.__setattr__(self, "splits", tuple(self.splits))
        if not self.splits or not all(isinstance(s, str) and s for s in self.splits):
            raise ValueError(f"eval.splits must be a non-empty tuple of split names; got {self.splits!r}")
        for name in ("images_per_group", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"eval.{name} must be an integer >= 1; got {value!r}")


@torch.no_grad()
def evaluate_ap(model: torch.nn.Module, cfg, device: torch.device) -> dict[str, float]:
    """AP@0.5/0.75/0.9 and the error rate at 0.5 per group and over ``all`` (a collective: every
    rank calls it with the same ``cfg``, a ``TrainConfig``).

    Returns ``{"ap50/<group>": ..., "ap75/...", "ap90/...", "error50/...", "images/<group>": n,
    ..., "seconds": wall time of this rank}``, the same on every rank; a mean is NaN where no image
    defines it (no object at all for AP, no true object for the error rate).
    """
    start = time.perf_counter()
    rank, world = dist.get_rank(), dist.get_world_size()
    data_cfg = dataclasses.replace(cfg.data, val_splits=cfg.eval.splits, val_limit=cfg.eval.images_per_group,
                                   batch_size=cfg.eval.batch_size, num_workers=0)
    # The groups from the manifest, so that every rank's sums have the same rows in the same order.
    groups = sorted({group_key(row["dataset"], row["subset"])
                     for row in read_manifest(data_cfg.root, splits=data_cfg.val_splits)})
    index = {group: row for row, group in enumerate(groups)}
    sums = np.zeros((len(groups), 7))
    was_training = model.training
    model.eval()
    try:
        for batch in build_val_loader(data_cfg, rank, world):
            augmented = augment(batch.to(device), cfg.augment, None, train=False)
            output = model(augmented.images).float().cpu().numpy()  # host sync: eval runs rarely
            labels = augmented.labels.cpu().numpy()
            ignored = (augmented.weight == 0).cpu().numpy()
            for slot, group in enumerate(batch.datasets):
                if group:  # "" is a padding slot
                    sums[index[group]] += _score(output[slot], labels[slot], ignored[slot])
    finally:
        model.train(was_training)
    totals = torch.from_numpy(sums).to(device)
    dist.all_reduce(totals)
    totals = totals.cpu().numpy()
    values = {}
    for name, row in [*((g, totals[index[g]]) for g in groups), ("all", totals.sum(axis=0))]:
        values |= _means(name, row)
    values["seconds"] = time.perf_counter() - start
    return values


def _score(output: np.ndarray, labels: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """One image's row of sums: masks from the (3, S, S) output, scored against ``labels``."""
    masks = flows_to_masks(output[:2], output[2])
    masks = remove_ignored_masks(masks, ignored if ignored.any() and not ignored.all() else None)
    ap, _, _, _ = average_precision(labels, masks, _THRESHOLDS)
    errors, _ = error_rate(labels, masks, 0.5)
    row = np.zeros(7)
    row[_IMAGES] = 1
    if not math.isnan(ap[0, 0]):  # NaN: no object on either side
        row[[_AP50, _AP75, _AP90]] = ap[0]
        row[_AP_DEFINED] = 1
    if not math.isnan(errors[0]):  # NaN: no true object
        row[_ERROR], row[_ERROR_DEFINED] = errors[0], 1
    return row


def _means(name: str, row: np.ndarray) -> dict[str, float]:
    def mean(total: float, count: float) -> float:
        return float(total / count) if count else math.nan

    return {
        f"ap50/{name}": mean(row[_AP50], row[_AP_DEFINED]),
        f"ap75/{name}": mean(row[_AP75], row[_AP_DEFINED]),
        f"ap90/{name}": mean(row[_AP90], row[_AP_DEFINED]),
        f"error50/{name}": mean(row[_ERROR], row[_ERROR_DEFINED]),
        f"images/{name}": int(row[_IMAGES]),
    }
