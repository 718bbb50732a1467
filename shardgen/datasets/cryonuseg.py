"""CryoNuSeg: nuclei in 30 cryosectioned H&E patches of 10 organs (Mahbod et al. 2021), as
unpacked from the Kaggle dataset ``ipateam/segmentation-of-nuclei-in-cryosectioned-he-images``
(datasets.md 2.11).

Layout ([T] torch-em)::

    tissue images/<name>.tif                               RGB 512 x 512
    Annotator 1 (biologist)/label masks modify/<name>.tif  instance labels

No official split: everything is split "all"; no subsets.

Decisions on the "Tricky" notes of datasets.md:

* Three annotation sets exist; this uses Annotator 1, first round (the usual choice, and
  torch-em's default). Its folder is single-nested; if only the double-nested form
  ``Annotator 1 (biologist)/Annotator 1 (biologist)/label masks modify/`` exists (as the
  alternative annotator folders are), that is read instead. The second-round and Annotator 2
  folders are not read.
* "label masks modify" is used: overlaps resolved to one instance each (unlike "label masks").
* Folder names with spaces and parentheses are used verbatim.
* Images are RGB (a constant alpha channel is dropped by ``pipeline.io``); an image that is not
  3-channel is rejected rather than guessed at.
"""

from __future__ import annotations

from pathlib import Path

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import found_in, image_files, load_pair, pair_items

INFO = DatasetInfo(
    name="cryonuseg",
    title="CryoNuSeg H&E cryosection nuclei, Annotator 1 first round (Mahbod et al. 2021)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout="tissue images/<name>.tif + Annotator 1 (biologist)/label masks modify/<name>.tif",
    paper_images=30,
)

IMAGES = "tissue images"
ANNOTATOR = "Annotator 1 (biologist)"
LABELS = "label masks modify"


def _label_folder(root: Path) -> Path:
    single = root / ANNOTATOR / LABELS
    double = root / ANNOTATOR / ANNOTATOR / LABELS
    return double if not single.is_dir() and double.is_dir() else single


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not (root / IMAGES).is_dir():
        found = found_in(root)
        raise LayoutError(
            f"{root} is not the CryoNuSeg folder: expected {INFO.layout}; found {found}. Pass the "
            "folder the Kaggle archive unpacked into (the one holding 'tissue images')."
        )
    if split not in INFO.splits:
        return []
    labels = _label_folder(root)
    return pair_items(
        root, image_files(root / IMAGES), image_files(labels),
        lambda image: labels / (image.stem + ".tif"), split,
    )


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel = item.ref
    if image_rel is not None and label_rel is None:
        raise ItemError(f"image {image_rel} has no label file in '{ANNOTATOR}/{LABELS}/'")
    loaded = load_pair(root, item)
    if loaded.image.shape[2] != 3:
        raise ItemError(f"{image_rel}: expected an RGB H&E image; got shape {loaded.image.shape}")
    return loaded
