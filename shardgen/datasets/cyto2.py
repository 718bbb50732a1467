"""Cellpose "cyto" and "cyto2" (Stringer et al. 2021; Pachitariu & Stringer 2022), datasets.md 2.1.

Layout, as the three zips from cellpose.org/dataset unpack::

    train/NNN_img.png  + train/NNN_masks.png          split "train", subset "cyto"
    train_cyto2/NNN_img.png + train_cyto2/NNN_masks.png  split "train", subset "cyto2"
    test/NNN_img.png   + test/NNN_masks.png           split "test",  subset "cyto"

The mask is the image name with ``_img`` replaced by ``_masks``. Any of the three folders may be
missing (e.g. only ``train.zip`` was downloaded); a folder with none of them is not this dataset.
Every image file in those folders becomes an item: an image without its mask, a mask without its
image, and a file named neither ``*_img.*`` nor ``*_masks.*`` are rejected by ``load`` with the
reason.

Decisions on the "Tricky" notes:

* Channels: the PNGs are RGB with G = cytoplasm (or the only channel of grayscale images),
  R = nucleus, B = empty. We return ``(H, W, 2)`` = (G, R), i.e. (cytoplasm, nucleus), the
  project convention and what Cellpose 2.0 does; images without a nuclear stain keep an all-zero
  nucleus channel, as published. A blue channel with any signal breaks that assumption, so the
  item is rejected (naming the file) rather than dropping data silently. A single-channel file
  becomes ``(H, W, 1)`` with channel name "cytoplasm". We read with ``pipeline.io`` (RGB order),
  so the OpenCV BGR pitfall does not arise.
* Bit depth: datasets.md says uint8, but the real files in /work/shared/data/cellpose_cyto are
  16-bit RGB PNGs (values up to 65535); both are kept as stored (uint8 or uint16).
* 65535 in masks: a third-party loader maps mask value 65535 to background. The 20 real masks we
  have hold ids 0..N with no 65535 (checked), so the claim is unconfirmed; but an image with
  65535 cells is implausible and the value is what a background of -1 becomes in an unsigned
  16-bit PNG, so in uint16 masks 65535 is set to 0 (background). Masks of other dtypes are left
  alone.
* ``train_cyto2/758`` is reportedly corrupt [T]; we have no copy to check, so it is not
  blacklisted: if it does not decode it is rejected with the reader's reason, and if it decodes
  it is converted like any other.
* The paper evaluates on a subset of the test images (indices 0-54, 68, 69, 71-76, 84, 86, 89,
  90); all test images are converted, and the source name (``test/NNN_img.png``) lets the
  evaluation pick that subset.
* Modality: the set mixes fluorescence, brightfield and non-microscopy images, hence "mixed";
  the channel meaning (main stain, nucleus) holds for all of them.

:func:`find_cellpose_pairs` (the ``*_img`` / ``*_masks`` pairing) is also used by
``shardgen.datasets.nuclei``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, image_files

INFO = DatasetInfo(
    name="cyto2",
    title="Cellpose cyto and cyto2 (Stringer et al. 2021, Nat. Methods; Pachitariu & Stringer 2022)",
    modality="mixed",
    channel_names=("cytoplasm", "nucleus"),
    splits=("train", "test"),
    layout="train/, test/, train_cyto2/ with NNN_img.png (RGB: G = cytoplasm, R = nucleus) + NNN_masks.png",
    paper_images=796,
)

# (folder, subset) per split, in listing order.
FOLDERS = {
    "train": (("train", "cyto"), ("train_cyto2", "cyto2")),
    "test": (("test", "cyto"),),
}
IMAGE_TAG = "_img"
MASK_TAG = "_masks"
# What a background of -1 becomes in an unsigned 16-bit mask (see the module docstring).
BACKGROUND_SENTINEL = 65535


def find_cellpose_pairs(root: Path, folder: str, split: str, subset: str) -> list[Item]:
    """Items for ``<folder>/X_img.<ext>`` + ``<folder>/X_masks.<ext>`` pairs, keeping strays.

    ``ref`` is ``(image_rel or None, mask_rel or None)``; both None marks a file that is
    neither an image nor a mask by name. Order: images by name, then unclaimed masks, then
    strays.
    """
    files = image_files(root / folder)  # sorted by name
    images = [f for f in files if f.stem.endswith(IMAGE_TAG)]
    masks: dict[str, Path] = {}
    strays = []
    for f in files:
        if f.stem.endswith(MASK_TAG) and f.stem[: -len(MASK_TAG)] not in masks:
            masks[f.stem[: -len(MASK_TAG)]] = f
        elif not f.stem.endswith(IMAGE_TAG):
            strays.append(f)  # a second mask for the same image, or an unrelated name
    image_prefixes = {f.stem[: -len(IMAGE_TAG)] for f in images}

    def rel(path: Path | None) -> str | None:
        return None if path is None else path.relative_to(root).as_posix()

    items = [
        Item(source=rel(image), split=split, subset=subset,
             ref=(rel(image), rel(masks.get(image.stem[: -len(IMAGE_TAG)]))))
        for image in images
    ]
    items += [
        Item(source=rel(mask), split=split, subset=subset, ref=(None, rel(mask)))
        for prefix, mask in masks.items()
        if prefix not in image_prefixes
    ]
    items += [Item(source=rel(f), split=split, subset=subset, ref=(None, None)) for f in strays]
    return items


def _checked_split(split: str) -> None:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} publishes splits {INFO.splits}; got {split!r}")


def find_items(root: Path, split: str) -> list[Item]:
    _checked_split(split)
    root = Path(root)
    every_folder = [folder for pairs in FOLDERS.values() for folder, _ in pairs]
    if not any((root / folder).is_dir() for folder in every_folder):
        found = found_in(root)
        raise LayoutError(f"{root}: expected the Cellpose cyto layout ({INFO.layout}); found {found}")
    items = []
    for folder, subset in FOLDERS[split]:
        items += find_cellpose_pairs(root, folder, split, subset)
    return items


def read_pair(root: Path, item: Item) -> tuple[np.ndarray, np.ndarray]:
    """The image (as stored) and the labels (65535 -> 0 in uint16) of a :func:`find_cellpose_pairs` item."""
    image_rel, mask_rel = item.ref
    if image_rel is None and mask_rel is None:
        raise ItemError(
            f"{item.source}: cannot pair it: the name is neither <name>{IMAGE_TAG}.<ext> nor "
            f"<name>{MASK_TAG}.<ext>, or another mask file already pairs with that image"
        )
    if image_rel is None:
        raise ItemError(f"mask {mask_rel} has no image (expected {_partner(mask_rel, MASK_TAG, IMAGE_TAG)}.*)")
    if mask_rel is None:
        raise ItemError(f"image {image_rel} has no mask (expected {_partner(image_rel, IMAGE_TAG, MASK_TAG)}.*)")
    image = as_uint_image(read_image(root / image_rel))
    labels = read_labels(root / mask_rel)
    if labels.shape != image.shape[:2]:
        raise ItemError(f"{mask_rel} is {labels.shape} but image {image_rel} is {image.shape[:2]}")
    if labels.dtype == np.uint16:
        labels[labels == BACKGROUND_SENTINEL] = 0
    return image, labels


def _partner(rel: str, tag: str, other_tag: str) -> str:
    path = Path(rel)
    return path.with_name(path.stem[: -len(tag)] + other_tag).as_posix()


def load(root: Path, item: Item) -> Loaded:
    image, labels = read_pair(Path(root), item)
    if image.shape[2] == 1:
        return Loaded(image=image, labels=labels, channel_names=("cytoplasm",))
    if image.shape[2] != 3:
        raise ItemError(f"{item.ref[0]}: expected an RGB image (G = cytoplasm, R = nucleus); got shape {image.shape}")
    if image[:, :, 2].any():
        raise ItemError(
            f"{item.ref[0]}: the blue channel holds signal (max {image[:, :, 2].max()}), but this layout "
            "keeps only G = cytoplasm and R = nucleus; not dropping it silently"
        )
    # RGB (R = nucleus, G = cytoplasm) -> (cytoplasm, nucleus)
    return Loaded(image=np.ascontiguousarray(image[:, :, [1, 0]]), labels=labels)
