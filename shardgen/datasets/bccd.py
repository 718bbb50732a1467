"""BCCD with masks (Kaggle ``jeetblahiri/bccd-dataset-with-mask``): blood smears, semantic masks.

Layout, as the Kaggle archive unpacks::

    BCCD Dataset with mask/{train,test}/original/<name>.png
    BCCD Dataset with mask/{train,test}/mask/<name>.png      (same file name)

Splits: ``train`` and ``test``. An image pairs with the mask of the same file name, else with
the mask of the same stem (another extension); an image without a mask and a mask without an
image are items that ``load`` rejects.

Tricky bits (datasets.md 2.13):

* The masks are semantic (cell vs background), possibly stored as RGB and anti-aliased. A pixel
  is foreground where any channel is > 127 (half of the 8-bit range, so anti-aliased edges split
  evenly); a mask whose maximum is 1 (a 0/1 mask) uses > 0 instead. Instances are the 8-connected
  components of the foreground (``shardgen.common.binary_to_instances``), so touching cells
  merge into one object: a limitation of the source.
* That the paper used this "with mask" version (rather than the box-only BCCD) is unconfirmed.

Image: RGB PNG (a constant alpha channel is dropped by ``pipeline.io.read_image``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, binary_to_instances, found_in, image_files, pair_items

INFO = DatasetInfo(
    name="bccd",
    title="BCCD blood cells with masks (Kaggle jeetblahiri/bccd-dataset-with-mask)",
    modality="brightfield",
    channel_names=("red", "green", "blue"),
    splits=("train", "test"),
    layout="'BCCD Dataset with mask'/{train,test}/{original,mask}/<name>.png (same name in both)",
    paper_images=1169,
)

TOP = "BCCD Dataset with mask"
FOREGROUND_ABOVE = 127  # on any channel; 0 for 0/1 masks


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not (root / TOP).is_dir():
        found = found_in(root)
        raise LayoutError(f"{root}: not a BCCD-with-mask folder; expected {INFO.layout}; found {found}")
    if split not in INFO.splits:
        return []
    base = root / TOP / split
    masks = image_files(base / "mask")
    masks_by_stem: dict[str, Path] = {}
    for mask in masks:
        masks_by_stem.setdefault(mask.stem, mask)

    def mask_for(image: Path) -> Path:
        same_name = base / "mask" / image.name
        return same_name if same_name.exists() else masks_by_stem.get(image.stem, same_name)

    return pair_items(root, image_files(base / "original"), masks, mask_for, split)


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, mask_rel = item.ref
    if image_rel is None:
        raise ItemError(f"mask {mask_rel} has no matching image in ../original/")
    if mask_rel is None:
        raise ItemError(f"image {image_rel} has no mask (expected ../mask/{Path(image_rel).name})")
    image = as_uint_image(read_image(root / image_rel))
    if image.shape[2] != 3:
        raise ItemError(f"{image_rel}: BCCD images are RGB; got shape {image.shape}")
    mask = read_image(root / mask_rel)
    if mask.shape[:2] != image.shape[:2]:
        raise ItemError(f"{mask_rel}: mask is {mask.shape[:2]} but the image {image_rel} is {image.shape[:2]}")
    return Loaded(image=image, labels=mask_to_instances(mask))


def mask_to_instances(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint32 instances from an (H, W, C) semantic mask: > 127 on any channel (> 0 for 0/1)."""
    threshold = FOREGROUND_ABOVE if mask.max() > 1 else 0
    return binary_to_instances(mask, threshold=threshold)
