"""The generic layout users bring: an image folder, a mask folder, and optional list files.

Layout (paths relative to the dataset folder)::

    images/a.tif          masks/a_masks.tif        any extension pipeline.io reads
    train_list.txt        optional: the image/mask pairs of split "train", one pair a line
    test_list.txt         optional: the pairs of split "test"

List files: one pair per line, ``<image> <mask>`` separated by whitespace, or by a comma (use
commas when a path contains spaces), each path relative to the dataset folder, e.g.
``images/a.tif masks/a_masks.tif`` or ``images/my cell.png, masks/my cell.png``. Blank lines
and lines starting with ``#`` are skipped. Every other line is an item, in file order: a line
without exactly two paths, or naming a file that does not exist, is rejected with the list's
name and line number.

Splits:

* ``train``: the lines of ``train_list.txt``; without it, every image in ``images/`` paired by
  name with a mask in ``masks/`` (below), except the images and masks ``test_list.txt`` names.
* ``test``: the lines of ``test_list.txt``; empty without it.

Pairing by name: the mask of ``images/<stem>.<ext>`` is the file in ``masks/`` whose stem is
``<stem>_masks``, ``<stem>_mask``, ``<stem>_label``, ``<stem>_labels`` or ``<stem>`` (any
extension). An image with no such mask, or with more than one, and a mask no image claims, are
items that ``load`` rejects with the reason.

Masks: a mask whose non-zero pixels all hold one value (0/255, 0/1, ...) is binary and becomes
instances by 8-connected components (touching objects merge; a one-object label mask whose
object is in several pieces becomes several objects). Any other mask is an instance-label image
and is kept as is. A mask stored with identical RGB channels is read as one channel.

Images: as stored (``pipeline.io`` channel policy), except that channels that are all identical
(gray saved as RGB) become one channel, losslessly, as the project convention wants for gray
images. Modality "mixed"; channel names are generic (``channel_0`` ...), because only the user
knows what they hold. Float or odd dtypes go through ``as_uint_image``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import (
    as_uint_image,
    binary_to_instances,
    check_same_size,
    found_in,
    generic_channel_names,
    image_files,
    merge_identical_channels,
)

INFO = DatasetInfo(
    name="folder",
    title="Your own data: images/ + masks/ (+ train_list.txt / test_list.txt)",
    modality="mixed",
    channel_names=("channel_0", "channel_1", "channel_2"),
    splits=("train", "test"),
    layout="images/<name>.<ext> + masks/<name>[_masks|_mask|_label|_labels].<ext>; "
    "optional train_list.txt / test_list.txt with '<image> <mask>' per line",
)

LIST_FILES = {"train": "train_list.txt", "test": "test_list.txt"}
MASK_SUFFIXES = ("_masks", "_mask", "_label", "_labels", "")


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def _list_file_items(root: Path, split: str) -> list[Item]:
    """One item per non-blank, non-comment line; ``ref = (image, mask, origin, problem)``."""
    name = LIST_FILES[split]
    items = []
    for number, line in enumerate((root / name).read_text(encoding="utf-8-sig").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = [f.strip() for f in text.split(",")] if "," in text else text.split()
        origin = f"{name} line {number}"
        if len(fields) != 2 or not all(fields):
            problem = f"expected '<image> <mask>' (whitespace- or comma-separated); got {text!r}"
            items.append(Item(source=f"{name}:{number}", split=split, ref=(None, None, origin, problem)))
        else:
            items.append(Item(source=fields[0], split=split, ref=(fields[0], fields[1], origin, None)))
    return items


def _listed_paths(root: Path, split: str) -> set[str]:
    """Image and mask paths (normalised, relative) named by a split's list file."""
    if not (root / LIST_FILES[split]).is_file():
        return set()
    named = set()
    for item in _list_file_items(root, split):
        named.update(Path(p).as_posix() for p in item.ref[:2] if p)
    return named


def _stem_items(root: Path, split: str, exclude: set[str]) -> list[Item]:
    """Images in images/ paired by name with masks in masks/; unpaired files kept as items."""
    rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
    images = [p for p in image_files(root / "images") if rel(p) not in exclude]
    masks = [p for p in image_files(root / "masks") if rel(p) not in exclude]
    masks_by_stem: dict[str, list[Path]] = {}
    for mask in masks:
        masks_by_stem.setdefault(mask.stem, []).append(mask)
    items, claimed = [], set()
    for image in images:
        candidates = [m for suffix in MASK_SUFFIXES for m in masks_by_stem.get(image.stem + suffix, [])]
        claimed.update(candidates)
        if len(candidates) == 1:
            ref = (rel(image), rel(candidates[0]), "", None)
        elif not candidates:
            wanted = ", ".join(f"masks/{image.stem}{s}.*" for s in MASK_SUFFIXES)
            ref = (rel(image), None, "", f"image {rel(image)} has no mask (looked for {wanted})")
        else:
            names = ", ".join(rel(m) for m in candidates)
            ref = (rel(image), None, "", f"image {rel(image)} matches several masks ({names}); keep one")
        items.append(Item(source=rel(image), split=split, ref=ref))
    for mask in masks:
        if mask not in claimed:
            problem = f"mask {rel(mask)} has no image in images/ with a matching name"
            items.append(Item(source=rel(mask), split=split, ref=(None, rel(mask), "", problem)))
    return items


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    has_lists = any((root / name).is_file() for name in LIST_FILES.values())
    if not has_lists and not ((root / "images").is_dir() and (root / "masks").is_dir()):
        found = found_in(root)
        raise LayoutError(f"{root}: expected {INFO.layout}; found {found}")
    if (root / LIST_FILES[split]).is_file():
        return _list_file_items(root, split)
    if split == "train":
        return _stem_items(root, split, exclude=_listed_paths(root, "test"))
    return []


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def read_mask(path: Path) -> np.ndarray:
    """(H, W) integer mask; a mask saved with identical channels (RGB, gray + alpha) is accepted."""
    try:
        return read_labels(path)
    except ValueError as error:
        if "one 2-D plane" not in str(error):
            raise
        mask = merge_identical_channels(read_image(path))
        if mask.shape[2] != 1 or mask.dtype.kind not in "biu":
            raise
        return mask[:, :, 0]


def instances_from_mask(mask: np.ndarray) -> np.ndarray:
    """Instance labels: connected components of a binary mask (one non-zero value), else ``mask``."""
    foreground = mask[mask != 0]
    if foreground.size and (foreground == foreground[0]).all():
        return binary_to_instances(mask)
    return mask


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, mask_rel, origin, problem = item.ref
    where = f"{origin}: " if origin else ""
    if problem:
        raise ItemError(where + problem)
    for kind, rel in (("image", image_rel), ("mask", mask_rel)):
        if not (root / rel).is_file():
            raise ItemError(f"{where}{kind} {rel} does not exist (paths are relative to {root})")
    image = merge_identical_channels(as_uint_image(read_image(root / image_rel)))
    labels = instances_from_mask(read_mask(root / mask_rel))
    check_same_size(image, labels, image_rel, mask_rel)
    return Loaded(image=image, labels=labels, channel_names=generic_channel_names(image.shape[2]))
