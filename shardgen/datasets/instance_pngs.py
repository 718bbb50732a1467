"""One binary PNG per object, as in DSB2018 / BBBC038 ``stage1_train`` (Caicedo et al. 2019).

Layout (the dataset folder is the one holding the per-image folders, e.g. ``stage1_train/``)::

    <id>/images/<id>.png        the image (DSB2018: RGBA with constant alpha)
    <id>/masks/<anything>.png   one binary mask (0 / 255) per object

No official split: everything is split "all" (DSB2018's stage1_test has no masks in this
layout; its solution is a run-length CSV this converter does not read).

Decisions:

* Items: one per sub-folder of the dataset folder, in name order; an image file lying directly
  in the dataset folder is an item too, rejected (it is outside the layout). Archive debris
  (``__MACOSX``, dot-files) is skipped.
* The image is ``<id>/images/<id>.<ext>``; when that name is absent but ``images/`` holds exactly
  one image file, that file is used (other per-object datasets do not always repeat the id).
  No image, or several without ``<id>``, rejects the item.
* Channels: read with ``pipeline.io`` (the constant alpha is dropped). An image whose channels
  are identical (DSB2018's gray fluorescence and brightfield images, saved as RGB) becomes
  ``(H, W, 1)`` "gray"; others stay RGB ("red", "green", "blue"). Modality "mixed" (DSB2018 mixes
  fluorescence, brightfield and H&E and does not say which image is which).
* Labels: each mask file, in sorted file-name order, is its own object with id 1, 2, ...; a
  pixel is foreground where any channel is non-zero. Where masks overlap, the later mask wins
  (overwrites the earlier one); the DSB2018 fixes release has no overlaps, so object counts equal
  the number of mask files there. A mask of the wrong size rejects the item, naming the file; an
  all-zero mask file adds no object.
* A folder with no ``masks/`` or an empty one still loads, with all-zero labels: the writer then
  rejects it as "no objects".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, colour_channel_names, found_in, image_files, merge_identical_channels

INFO = DatasetInfo(
    name="instance_pngs",
    title="One binary PNG per object (DSB2018 / BBBC038 stage1_train layout; Caicedo et al. 2019)",
    modality="mixed",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout="<id>/images/<id>.png + <id>/masks/*.png (one binary mask per object)",
)


def _is_debris(path: Path) -> bool:
    return path.name.startswith(".") or path.name == "__MACOSX"


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder; expected {INFO.layout}")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not _is_debris(p))
    if not any((p / "images").is_dir() or (p / "masks").is_dir() for p in folders):
        found = found_in(root)
        raise LayoutError(
            f"{root}: expected per-image folders {INFO.layout}; found no <id>/images or <id>/masks "
            f"(contents: {found}). Point --src at the folder that holds the <id> folders."
        )
    items = [Item(source=p.name, split=split, ref=(p.name, None)) for p in folders]
    items += [Item(source=p.name, split=split, ref=(None, p.name)) for p in image_files(root)]
    return items


def _image_path(folder: Path) -> Path:
    candidates = image_files(folder / "images")
    named = [p for p in candidates if p.stem == folder.name]
    if len(named) == 1:
        return named[0]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ItemError(f"{folder.name}/images/ holds no image (expected {folder.name}/images/{folder.name}.png)")
    names = ", ".join(p.name for p in candidates[:5])
    raise ItemError(f"{folder.name}/images/ holds {len(candidates)} images ({names}) and none is named {folder.name}.*")


def masks_to_labels(masks: list[Path], shape: tuple[int, int], root: Path) -> np.ndarray:
    """(H, W) uint32: mask k (0-based, in the given order) painted as id k + 1, later over earlier."""
    labels = np.zeros(shape, dtype=np.uint32)
    for index, path in enumerate(masks, 1):
        mask = read_image(path)
        if mask.shape[:2] != shape:
            raise ItemError(
                f"mask {path.relative_to(root).as_posix()} is {mask.shape[0]}x{mask.shape[1]} but the image is "
                f"{shape[0]}x{shape[1]}"
            )
        labels[(mask != 0).any(axis=2)] = index
    return labels


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    folder_name, stray = item.ref
    if folder_name is None:
        raise ItemError(f"{stray} lies directly in the dataset folder; expected {INFO.layout}")
    folder = root / folder_name
    image_path = _image_path(folder)
    image = merge_identical_channels(as_uint_image(read_image(image_path)))
    labels = masks_to_labels(image_files(folder / "masks"), image.shape[:2], root)
    names = colour_channel_names(image.shape[2])
    return Loaded(image=image, labels=labels, channel_names=names)
