"""IHC TMA (SRSA-Net; Zenodo 7647846): NSCLC tissue-microarray IHC nuclei, three folds.

Layout (datasets.md 2.17), as ``IHC_TMA_dataset.zip`` unpacks (the dataset folder may be the one
holding ``IHC_TMA_dataset/`` or ``IHC_TMA_dataset/`` itself)::

    IHC_TMA_dataset/images/fold{1,2,3}_<n>.png   RGB IHC
    IHC_TMA_dataset/masks/fold{1,2,3}_<n>.npy    (C, H, W), C >= 2: channels 0 and 1 are nuclear masks

Splits are the published folds ``fold1``, ``fold2``, ``fold3``, taken from the file-name prefix
(torch-em maps them to train / val / test). One item per image, paired with the mask of the same
stem; an image without a mask, or a mask without an image, is still an item and is rejected by
``load``. Files whose names start with no ``fold<k>_`` belong to no split; they are listed with
``fold1`` (the first split) and rejected there, so they show up in ``rejects.parquet``.

What this converter does about the "Tricky" notes (the channel semantics are unconfirmed:
probably positive and negative nuclei, and whether they hold instance ids or 0/1 is unknown):

* Instance ids or binary, decided per file from the data: if channel 0 or channel 1 holds more
  than one distinct positive value, the channels already hold instance ids. Then channel 0's ids
  are kept, channel 1's ids are shifted past channel 0's largest id so the two cannot collide,
  and where both channels are set channel 0 keeps the pixel. A channel with a single positive
  value is ambiguous (one object, or a 0/1 mask of several), so it is split into connected
  components first, which changes nothing for a single connected object.
* Otherwise the masks are binary: the union of channels 0 and 1 is split into 8-connected
  components (``binary_to_instances``), as torch-em does. Touching nuclei merge into one object;
  that is the source's limitation. (InstanSeg instead splits touching blobs with a
  distance-transform watershed; that invents boundaries, so it is not done here.) Components are
  taken on the union rather than per channel so that overlapping channels (if one were a subset
  of the other) cannot produce duplicate objects.
* Channels past 1 (if any) are not read. A mask stored channels-last, (H, W, C), is accepted
  when its (H, W) matches the image.
* Modality ``ihc``; the image stays RGB (a constant alpha channel is dropped by ``read_image``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.ndimage

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
        "((C,H,W), C >= 2, channels 0 and 1 nuclear masks)"
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
    channels = _two_channels(masks, image.shape[:2], mask_path)
    return Loaded(image=image, labels=nuclear_masks_to_instances(channels, mask_path))


def _two_channels(masks: np.ndarray, image_shape: tuple[int, int], path: Path) -> np.ndarray:
    """Channels 0 and 1 as a (2, H, W) array, from (C, H, W) or (H, W, C) masks."""
    if masks.ndim == 3 and masks.shape[0] >= 2 and masks.shape[1:] == image_shape:
        channels = masks[:2]
    elif masks.ndim == 3 and masks.shape[2] >= 2 and masks.shape[:2] == image_shape:
        channels = np.moveaxis(masks[:, :, :2], -1, 0)
    else:
        raise ItemError(
            f"{path}: expected masks of shape (C, H, W) with C >= 2 and (H, W) = {image_shape} as the image; "
            f"got {masks.shape}"
        )
    channels = np.array(channels)
    if channels.dtype.kind not in "biuf":
        raise ItemError(f"{path}: masks have dtype {channels.dtype}; expected numbers")
    if not np.isfinite(channels).all() or not np.array_equal(channels, np.round(channels)) or channels.min() < 0:
        raise ItemError(f"{path}: masks must hold whole, non-negative values; got {channels.min()}..{channels.max()}")
    return channels.astype(np.int64)


def nuclear_masks_to_instances(channels: np.ndarray, path: Path | str = "masks") -> np.ndarray:
    """(H, W) uint32 instance labels from the two nuclear mask channels (2, H, W), see the module notes."""
    distinct = [np.unique(channel[channel > 0]) for channel in channels]
    if all(len(values) <= 1 for values in distinct):
        # Binary: components of the union.
        return binary_to_instances((channels > 0).any(axis=0))
    per_channel = []
    for channel, values in zip(channels, distinct):
        if len(values) == 1:  # ambiguous: one object or a 0/1 mask of several
            channel, _ = scipy.ndimage.label(channel > 0, structure=np.ones((3, 3), bool))
        per_channel.append(channel.astype(np.int64))
    labels = per_channel[0].copy()
    second = per_channel[1]
    take = (second > 0) & (labels == 0)
    labels[take] = second[take] + labels.max()
    if labels.max() > np.iinfo(np.uint32).max:
        raise ItemError(f"{path}: instance ids past uint32 after combining the two channels")
    return labels.astype(np.uint32)
