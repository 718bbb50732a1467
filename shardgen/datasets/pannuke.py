"""PanNuke (Gamper et al. 2019/2020): H&E nuclei of 19 tissues, three folds of 256 px patches.

Layout (datasets.md 2.19), one folder per ``fold_k.zip`` (note the space in ``Fold 1`` and none
in ``fold1``)::

    Fold 1/images/fold1/images.npy   float64 (N, 256, 256, 3), RGB 0..255
    Fold 1/images/fold1/types.npy    (N,) tissue names (not read)
    Fold 1/masks/fold1/masks.npy     float64 (N, 256, 256, 6)
    Fold 2/..., Fold 3/...

Mask channels: 0 neoplastic, 1 inflammatory, 2 connective/soft tissue, 3 dead, 4 epithelial (each
holds instance ids), 5 background. One item per row of ``images.npy``; its source is
``Fold k/images/foldk/images.npy[<row>]``. Both arrays are memory-mapped and a worker reads one
row of each (a float64 row is 1.5 MiB of image and 3 MiB of masks).

What this converter does about the "Tricky" notes:

* Splits are the published folds, ``fold1``, ``fold2``, ``fold3``. (A common protocol trains on
  fold 1, validates on 2 and tests on 3; which folds the paper trained on is unconfirmed.)
* Instances: ids are unique across the five class channels within a patch, so the instance map
  is the maximum over channels 0-4. Ids are not contiguous (up to ~3500); the writer renumbers.
* Cross-class overlaps (about 4.3k pixels over the release): such a pixel holds two different
  ids, and the maximum gives it to the larger id. Nothing else is done about them.
* Disconnected ids (one id in several pieces, in ~65-80 patches per fold) are kept as one id.
  ``pipeline.flows.masks_to_flows`` diffuses each piece from its own centre, so every piece
  flows to a centre of its own (and masks rebuilt from those flows have one mask per piece);
  only the object count and the diameter see them as one object.
* "Void" pixels (neither an instance nor marked in the background channel 5) and empty patches:
  channel 5 is not read; void pixels count as background. Whether they mean "unannotated" is
  unconfirmed, so no ignore mask is made.
* float64 dtype: images must be finite and within 0..255; they are rounded to uint8 (the values
  are reported to be whole numbers, so this loses nothing). Mask values must be whole,
  non-negative numbers; they become uint32 ids.
* ``types.npy`` (tissue per patch) is not read: the source names the row, and the tissue can be
  looked up there.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import found_in, open_npy

_log = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="pannuke",
    title="PanNuke (Gamper et al. 2020)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("fold1", "fold2", "fold3"),
    layout=(
        "'Fold k/images/foldk/images.npy' float64 (N,256,256,3) + 'Fold k/masks/foldk/masks.npy' "
        "float64 (N,256,256,6: 5 class channels of instance ids, background) for k = 1, 2, 3"
    ),
    paper_images=None,
)

_N_CLASS_CHANNELS = 5  # channels 0-4 hold instance ids; channel 5 is background
_N_MASK_CHANNELS = 6


def _fold_files(split: str) -> tuple[str, str]:
    k = split.removeprefix("fold")
    return f"Fold {k}/images/fold{k}/images.npy", f"Fold {k}/masks/fold{k}/masks.npy"


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"pannuke has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    folds = [f"Fold {s.removeprefix('fold')}" for s in INFO.splits]
    if not any((root / fold).is_dir() for fold in folds):
        found = found_in(root)
        raise LayoutError(f"{root}: not a PanNuke folder; expected {INFO.layout}; found {found}")
    images_rel, masks_rel = _fold_files(split)
    if not (root / images_rel).is_file() and not (root / masks_rel).is_file():
        fold = images_rel.split("/")[0]
        if (root / fold).is_dir():
            # The fold's folder is there but holds neither array: one item, rejected by load.
            return [Item(source=images_rel, split=split, ref=(images_rel, masks_rel, None))]
        _log.warning("%s: no %r folder; split %s is empty", root, fold, split)
        return []
    counts = []
    for rel in (images_rel, masks_rel):
        try:
            counts.append(len(open_npy(root / rel)))
        except ValueError as error:  # missing or unreadable: counted by the other file
            _log.warning("%s", error)
    if not counts:
        return [Item(source=images_rel, split=split, ref=(images_rel, masks_rel, None))]
    return [
        Item(source=f"{images_rel}[{i}]", split=split, ref=(images_rel, masks_rel, i)) for i in range(max(counts))
    ]


def load(root: Path, item: Item) -> Loaded:
    images_rel, masks_rel, row = item.ref
    root = Path(root)
    images, masks = open_npy(root / images_rel), open_npy(root / masks_rel)
    if row is None:
        raise ItemError(f"{root / images_rel}: could not be listed")
    if (
        images.ndim != 4 or images.shape[3] != 3 or masks.ndim != 4 or masks.shape[3] != _N_MASK_CHANNELS
        or masks.shape[:3] != images.shape[:3]
    ):
        raise ItemError(
            f"{root / images_rel.split('/')[0]}: expected images.npy (N, H, W, 3) and masks.npy (N, H, W, 6) with "
            f"the same N, H, W; got {images.shape} and {masks.shape}"
        )
    image = _as_uint8_rgb(np.array(images[row]), f"{root / images_rel}[{row}]")
    class_ids = np.array(masks[row, :, :, :_N_CLASS_CHANNELS])
    what = f"{root / masks_rel}[{row}]"
    if class_ids.dtype.kind not in "fiu":
        raise ItemError(f"{what}: masks have dtype {class_ids.dtype}; expected numbers")
    if not np.isfinite(class_ids).all() or not np.array_equal(class_ids, np.round(class_ids)):
        raise ItemError(f"{what}: masks hold fractions, NaN or inf; expected whole-number instance ids")
    if class_ids.min() < 0 or class_ids.max() > np.iinfo(np.uint32).max:
        raise ItemError(f"{what}: instance ids must lie in 0..2**32-1; got {class_ids.min()}..{class_ids.max()}")
    # Ids are unique across classes, so the maximum is the instance map; at the few pixels two
    # classes share, the larger id wins.
    labels = class_ids.max(axis=-1).astype(np.uint32)
    return Loaded(image=image, labels=labels)


def _as_uint8_rgb(image: np.ndarray, what: str) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype.kind not in "fiu":
        raise ItemError(f"{what}: image has dtype {image.dtype}; expected float64 RGB in 0..255")
    if not np.isfinite(image).all() or image.min() < 0 or image.max() > 255:
        raise ItemError(f"{what}: image values must be finite and within 0..255; got {image.min()}..{image.max()}")
    return np.round(image).astype(np.uint8)
