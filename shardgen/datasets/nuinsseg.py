"""NuInsSeg: nuclei in 665 H&E patches of 31 human and mouse organs (Mahbod et al. 2024), as
unpacked from Zenodo 10518968 ``NuInsSeg.zip`` or the Kaggle dataset ``ipateam/nuinsseg``
(datasets.md 2.12).

Layout ([T] torch-em, InstanSeg)::

    NuInsSeg/<tissue>/tissue images/<name>.png        RGB(A) 512 x 512
    NuInsSeg/<tissue>/label masks modify/<name>.tif   instance labels

The dataset folder may hold ``NuInsSeg/`` (InstanSeg's and datasets.md's reading of the Zenodo
zip) or the tissue folders directly (the Kaggle archive, as torch-em reads it; a zip may well have
no ``NuInsSeg/`` level either): both are read, and ``--list`` shows both forms. No official split: everything is split
"all"; no subsets (the tissue is in each item's source path).

Decisions on the "Tricky" notes of datasets.md:

* Labels come from ``label masks modify`` (overlaps given to one nucleus), never from
  ``label masks`` (which gives overlap regions a new id of their own).
* RGBA images: the first three channels are kept whatever the alpha holds ([T] third-party
  loaders do the same).
* Ambiguous ("vague") area masks: NOT used. The README says they exist but does not name their
  folder; third-party code disagrees on it (``vague areas/mask binary/``,
  ``vague areas/mask binary_vague/``, ``vague areas/Imagj_zips/``), so no folder name could be
  identified with confidence. Using them as ``Loaded.ignore`` is a follow-up once a real copy
  has been checked.
* Tissue folder names have spaces and are used verbatim; other sibling folders (distance maps,
  binary masks, ...) are derived from the same ROIs and not read.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import found_in, image_files, pair_items

INFO = DatasetInfo(
    name="nuinsseg",
    title="NuInsSeg H&E nuclei of 31 human and mouse organs (Mahbod et al. 2024)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout=(
        "NuInsSeg/<tissue>/tissue images/<name>.png + NuInsSeg/<tissue>/label masks modify/<name>.tif, "
        "or <tissue>/tissue images/<name>.png + <tissue>/label masks modify/<name>.tif (no NuInsSeg/ level)"
    ),
    paper_images=665,
)

TOP = "NuInsSeg"
IMAGES = "tissue images"
LABELS = "label masks modify"


def _tissue_folders(root: Path) -> list[Path]:
    base = root / TOP if (root / TOP).is_dir() else root
    if not base.is_dir():
        return []
    return sorted(
        p for p in base.iterdir()
        if p.is_dir() and not p.name.startswith(".") and ((p / IMAGES).is_dir() or (p / LABELS).is_dir())
    )


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    tissues = _tissue_folders(root)
    if not tissues:
        found = found_in(root)
        raise LayoutError(
            f"{root} is not the NuInsSeg folder: expected {INFO.layout}; found {found}."
        )
    if split not in INFO.splits:
        return []
    items: list[Item] = []
    for tissue in tissues:
        labels = tissue / LABELS
        items += pair_items(
            root, image_files(tissue / IMAGES), image_files(labels),
            lambda image, labels=labels: labels / (image.stem + ".tif"), split,
        )
    return items


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel = item.ref
    if image_rel is None:
        raise ItemError(f"label file {label_rel} has no matching image in '{IMAGES}/'")
    if label_rel is None:
        raise ItemError(f"image {image_rel} has no label file in '{LABELS}/' ('label masks' is not used)")
    # RGBA -> RGB whatever the alpha holds; a gray image fails here, naming the file.
    image = read_image(root / image_rel, channels=[0, 1, 2])
    labels = read_labels(root / label_rel)
    return Loaded(image=image, labels=labels)
