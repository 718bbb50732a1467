"""TNBC (Naylor et al. 2018): H&E nuclei of triple-negative breast cancer, binary masks.

Layout, as either Zenodo zip unpacks::

    TNBC_NucleiSegmentation/Slide_NN/NN_k.png + TNBC_NucleiSegmentation/GT_NN/NN_k.png   (1175282)
    TNBC_and_Brain_dataset/Slide_NN/NN_k.png  + TNBC_and_Brain_dataset/GT_NN/NN_k.png    (3552674)

Each ``Slide_NN/<name>`` pairs with ``GT_NN/<name>``; an image without its mask and a mask
without its image (also a ``GT_NN`` folder without a ``Slide_NN``) are items that ``load``
rejects. When both top folders are present, both are listed. ``__MACOSX/``, dot files and
``.DS_Store`` are skipped. No published split: everything is ``all``; no subset (slides would be
too fine a grain to weight).

Tricky bits (datasets.md 2.15):

* The masks are binary (mode L, 0/255): a pixel is foreground where any channel is > 0, and
  instances are the 8-connected components (``shardgen.common.binary_to_instances``, as skimage's
  default ``label`` in torch-em and InstanSeg). Touching nuclei merge into one object: a known
  weakness of the source.
* Images are RGBA PNGs: the first 3 channels are kept, whatever the alpha holds (torch-em and
  InstanSeg do the same).
* One third-party loader drops ``Slide_09/09_2`` .. ``09_4`` (reason unknown): kept here.
* ``TNBC_and_Brain_dataset`` reportedly adds brain-tissue slides as ``Slide_12`` .. ``Slide_14``
  (a third-party script deletes them as "brain files"); they are listed like the others, as
  InstanSeg does. Unconfirmed: which slides are brain.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, binary_to_instances, found_in, image_files, pair_items

INFO = DatasetInfo(
    name="tnbc",
    title="TNBC nuclei (Naylor et al. 2018)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout="{TNBC_NucleiSegmentation,TNBC_and_Brain_dataset}/{Slide_NN/NN_k.png, GT_NN/NN_k.png}",
    paper_images=50,
)

TOPS = ("TNBC_NucleiSegmentation", "TNBC_and_Brain_dataset")
SLIDE = re.compile(r"Slide_(\w+)$")
GROUND_TRUTH = re.compile(r"GT_(\w+)$")


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    tops = [root / name for name in TOPS if (root / name).is_dir()]
    if not tops:
        found = found_in(root)
        raise LayoutError(f"{root}: not a TNBC folder; expected {INFO.layout}; found {found}")
    if split not in INFO.splits:
        return []
    items = []
    for top in tops:
        folders = sorted(p for p in top.iterdir() if p.is_dir())
        images = [f for p in folders if SLIDE.match(p.name) for f in image_files(p)]
        masks = [f for p in folders if GROUND_TRUTH.match(p.name) for f in image_files(p)]
        items += pair_items(
            root, images, masks,
            lambda image, top=top: top / f"GT_{SLIDE.match(image.parent.name).group(1)}" / image.name,
            split,
        )
    return items


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, mask_rel = item.ref
    if image_rel is None:
        raise ItemError(f"mask {mask_rel} has no matching image (expected it in the Slide_NN folder)")
    if mask_rel is None:
        raise ItemError(f"image {image_rel} has no mask (expected it in the GT_NN folder, same name)")
    # RGBA -> RGB: keep the first 3 channels, whatever the 4th holds.
    image = as_uint_image(read_image(root / image_rel, channels=[0, 1, 2]))
    mask = read_image(root / mask_rel)
    if mask.shape[:2] != image.shape[:2]:
        raise ItemError(f"{mask_rel}: mask is {mask.shape[:2]} but the image {image_rel} is {image.shape[:2]}")
    return Loaded(image=image, labels=binary_to_instances(mask))
