"""IHC TMA (SRSA-Net; Zenodo 7647846): NSCLC tissue-microarray IHC nuclei, three folds.

Layout (datasets.md 2.17), as ``IHC_TMA_dataset.zip`` unpacks (the dataset folder may be the one
holding ``IHC_TMA_dataset/`` or ``IHC_TMA_dataset/`` itself)::

    IHC_TMA_dataset/images/fold{1,2,3}_<n>.png   RGB IHC
    IHC_TMA_dataset/masks/fold{1,2,3}_<n>.npy    (3, H, W) int64, channel 0 = instance ids

Splits are the published folds ``fold1``, ``fold2``, ``fold3``, taken from the file-name prefix
(torch-em maps them to train / val / test). One item per image, paired with the mask of the same
stem; an image without a mask, or a mask without an image, is still an item and is rejected by
``load``. Files whose names start with no ``fold<k>_`` belong to no split; they are listed with
``fold1`` (the first split) and rejected there, so they show up in ``rejects.parquet``.

The masks. The only first-hand description of the files (someone who loaded them: "masks (3, H, W)
int64, channel 0 = instance IDs") says channel 0 holds the instance ids; what channels 1 and 2
hold is not described (class or type maps, by the look of it: positive / negative nuclei).
datasets.md's "(2, H, W) binary nuclear masks" comes from third-party loaders (torch-em adds
channels 0 and 1 and takes connected components; InstanSeg takes their maximum), not from the
files. So:

* Objects come from channel 0 only. Pixels of another channel never become objects: a class or
  type map turned into objects would invent nuclei.
* Channel 0 with several distinct ids: the ids as stored (touching nuclei stay apart).
* Channel 0 with a single value (one nucleus, or a 0/1 mask of several) or none: split into
  8-connected components, which changes nothing for a single connected nucleus. This is not the
  described form, so here the other channels are checked: where one of them marks pixels that
  channel 0 leaves as background, those could be nuclei that channel 0 lacks, and the item is
  rejected naming the channel and the pixel count rather than converted without them.
* Masks stored channels-last, (H, W, C), or as a single (H, W) plane are accepted when (H, W)
  matches the image.
* Modality ``ihc``; the image stays RGB (a constant alpha channel is dropped by ``read_image``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from pipeline.io import SUPPORTED_SUFFIXES, read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import binary_to_instances, found_in, image_files, open_npy, pair_items

INFO = DatasetInfo(
    name="ihc_tma",
    title="IHC TMA / SRSA-Net NSCLC nuclei (Zenodo 7647846)",
    modality="ihc",
    channel_names=("red", "green", "blue"),
    splits=("fold1", "fold2", "fold3"),
    layout=(
        "IHC_TMA_dataset/images/fold{1,2,3}_<n>.png (RGB) + IHC_TMA_dataset/masks/fold{1,2,3}_<n>.npy "
        "((3,H,W) int64: channel 0 instance ids; channels 1, 2 are never made into objects)"
    ),
    paper_images=None,
)

DATASET_FOLDER = "IHC_TMA_dataset"
_IMAGE_SUFFIXES = tuple(s for s in SUPPORTED_SUFFIXES if s != ".npy")
_FOLD = re.compile(r"(fold[123])_")
_NO_FOLD = "<no fold>"  # marks the ref of a file that names no fold


def _dataset_dir(root: Path) -> Path | None:
    for candidate in (root / DATASET_FOLDER, root):
        if (candidate / "images").is_dir() and (candidate / "masks").is_dir():
            return candidate
    return None


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"ihc_tma has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    base = _dataset_dir(root)
    if base is None:
        found = found_in(root)
        raise LayoutError(f"{root}: not an IHC TMA folder; expected {INFO.layout}; found {found}")
    images = image_files(base / "images", _IMAGE_SUFFIXES)
    masks = image_files(base / "masks", (".npy",))
    # Files that name no fold belong to no split: listed once (with the first) to be rejected.
    unassigned = [
        Item(source=p.relative_to(root).as_posix(), split=split, ref=(_NO_FOLD, p.relative_to(root).as_posix()))
        for p in images + masks
        if not _FOLD.match(p.name)
    ] if split == INFO.splits[0] else []

    def in_split(path: Path) -> bool:
        match = _FOLD.match(path.name)
        return match is not None and match.group(1) == split

    return pair_items(
        root,
        [p for p in images if in_split(p)],
        [p for p in masks if in_split(p)],
        lambda image: base / "masks" / f"{image.stem}.npy",
        split,
    ) + unassigned


def load(root: Path, item: Item) -> Loaded:
    image_rel, mask_rel = item.ref
    if image_rel == _NO_FOLD:
        raise ItemError(f"{mask_rel}: the name starts with no fold1_/fold2_/fold3_, so it belongs to no split")
    root = Path(root)
    if image_rel is None:
        raise ItemError(f"{root / mask_rel}: mask has no matching image")
    if mask_rel is None:
        raise ItemError(f"{root / image_rel}: image has no mask file (expected masks/{Path(image_rel).stem}.npy)")
    image = read_image(root / image_rel)
    mask_path = root / mask_rel
    masks = open_npy(mask_path)
    channels = _mask_channels(masks, image.shape[:2], mask_path)
    return Loaded(image=image, labels=masks_to_instances(channels, mask_path))


def _mask_channels(masks: np.ndarray, image_shape: tuple[int, int], path: Path) -> np.ndarray:
    """(C, H, W) int64 from (C, H, W), (H, W, C) or (H, W) masks whose (H, W) is the image's."""
    if masks.ndim == 2 and masks.shape == image_shape:
        channels = masks[np.newaxis]
    elif masks.ndim == 3 and masks.shape[1:] == image_shape:
        channels = masks
    elif masks.ndim == 3 and masks.shape[:2] == image_shape:
        channels = np.moveaxis(masks, -1, 0)
    else:
        raise ItemError(
            f"{path}: expected masks of shape (C, H, W) (published: (3, H, W)) with (H, W) = {image_shape} as "
            f"the image; got {masks.shape}"
        )
    channels = np.array(channels)
    if channels.dtype.kind not in "biuf":
        raise ItemError(f"{path}: masks have dtype {channels.dtype}; expected numbers")
    if not np.isfinite(channels).all() or not np.array_equal(channels, np.round(channels)) or channels.min() < 0:
        raise ItemError(f"{path}: masks must hold whole, non-negative values; got {channels.min()}..{channels.max()}")
    if channels.max() > np.iinfo(np.uint32).max:
        raise ItemError(f"{path}: instance id {channels.max()} does not fit uint32")
    return channels.astype(np.int64)


def masks_to_instances(channels: np.ndarray, path: Path | str = "masks") -> np.ndarray:
    """(H, W) uint32 instance labels from channel 0 of (C, H, W) masks; see the module notes."""
    ids = channels[0]
    if len(np.unique(ids[ids > 0])) > 1:
        return ids.astype(np.uint32)  # the described form; the other channels are not read
    background = ids == 0
    for index in range(1, channels.shape[0]):
        outside = int(np.count_nonzero(channels[index][background]))
        if outside:
            raise ItemError(
                f"{path}: channel 0 holds {'no ids' if background.all() else 'a single value'}, not the instance "
                f"ids of the published masks, and channel {index} marks {outside} pixels where channel 0 is "
                f"background; other channels are never made into objects (they hold classes or types), so "
                f"nuclei there would be lost"
            )
    return binary_to_instances(~background)
