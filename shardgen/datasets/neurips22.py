"""NeurIPS 2022 Cell Segmentation Challenge (Ma et al. 2024, Nat. Methods), datasets.md 2.8.

Layout, as ``Training-labeled.zip``, ``Tuning.zip`` and ``Testing.zip`` from Zenodo 10719375
unpack::

    Training-labeled/images/cell_00001.<ext> + Training-labeled/labels/cell_00001_label.tiff   "train"
    Tuning/images/...                        + Tuning/labels/..._label.tiff                     "tuning"
    Testing/Public/images/...                + Testing/Public/labels/..._label.tiff             "test"
    Testing/Public/WSI/...                   + Testing/Public/WSI-labels/..._label.tiff         "test", subset "wsi"

``Train_Labeled/`` (the folder name of the real sample in /work/shared/data/neurips22) is
accepted as well as ``Training-labeled/``; if both exist both are listed. Any of the folders may
be missing (one zip downloaded); a folder with none of them is not this dataset. The unlabeled
parts (``release-part1``, ``train-unlabeled-part2``) and ``Testing/Hidden`` (no labels) are not
read. Every image becomes an item; an image without its label and a label file without its
image are rejected by ``load``.

Decisions on the "Tricky" notes:

* Mixed formats (tif/tiff/png/jpg/bmp), 8/16-bit, gray or RGB: read by ``pipeline.io`` as stored
  (constant alpha dropped; float images through ``as_uint_image``). An RGB image whose three
  channels are identical is gray and becomes ``(H, W, 1)`` (lossless; the project's convention
  for gray). Channel names: 3 channels -> ("red", "green", "blue"), 1 -> ("gray",), 2 ->
  ("channel_0", "channel_1"). Modality "mixed" (fluorescence, phase, DIC, brightfield).
* The label is ``<image stem>_label.tiff``; ``_label.tif`` / ``.png`` are accepted too. Labels
  are int16 in the release; ``pipeline.io.read_labels`` reads them as uint16.
* WSI: the public test set has whole-slide images with labels. They are listed (split "test",
  subset "wsi") so they are not silently lost and an evaluation can use or filter them; each is
  read whole, so converting them needs memory for one full slide per worker. The label name
  ``<stem>_label.tiff`` in ``WSI-labels`` is third-party knowledge [T].
* The Cellpose NeurIPS analysis leaves out the last Tuning image (reason not stated); it is
  converted here, and its source name lets an evaluation drop it.
* The paper lists 504 NeurIPS images for training (of 1000 labelled train images): which ones is
  unconfirmed, so all are converted.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.io import read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, check_same_size, colour_channel_names, found_in, image_files, merge_identical_channels

INFO = DatasetInfo(
    name="neurips22",
    title="NeurIPS 2022 Cell Segmentation Challenge (Ma et al. 2024, Nat. Methods)",
    modality="mixed",
    channel_names=("red", "green", "blue"),
    splits=("train", "tuning", "test"),
    layout="Training-labeled/ (or Train_Labeled/), Tuning/, Testing/Public/ with images/<stem>.<ext> + "
    "labels/<stem>_label.tiff; Testing/Public/WSI/ + WSI-labels/",
    paper_images=504,
)

# (images folder, labels folder, subset) per split, in listing order.
FOLDERS = {
    "train": (
        ("Training-labeled/images", "Training-labeled/labels", ""),
        ("Train_Labeled/images", "Train_Labeled/labels", ""),
    ),
    "tuning": (("Tuning/images", "Tuning/labels", ""),),
    "test": (
        ("Testing/Public/images", "Testing/Public/labels", ""),
        ("Testing/Public/WSI", "Testing/Public/WSI-labels", "wsi"),
    ),
}
LABEL_TAG = "_label"
# Preferred label extension first: the release standardised labels to .tiff.
LABEL_SUFFIXES = (".tiff", ".tif", ".png")


def _pairs(root: Path, images_folder: str, labels_folder: str, split: str, subset: str) -> list[Item]:
    rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
    labels: dict[str, Path] = {}
    for path in image_files(root / labels_folder):
        stem = path.stem[: -len(LABEL_TAG)] if path.stem.endswith(LABEL_TAG) else None
        if stem is not None and path.suffix.lower() in LABEL_SUFFIXES:
            best = labels.get(stem)
            if best is None or LABEL_SUFFIXES.index(path.suffix.lower()) < LABEL_SUFFIXES.index(best.suffix.lower()):
                labels[stem] = path
    items, claimed = [], set()
    for image in image_files(root / images_folder):
        label = labels.get(image.stem)
        claimed.add(label)
        items.append(Item(source=rel(image), split=split, subset=subset,
                          ref=(rel(image), rel(label) if label else None, labels_folder)))
    for path in image_files(root / labels_folder):
        if path not in claimed:
            items.append(Item(source=rel(path), split=split, subset=subset, ref=(None, rel(path), images_folder)))
    return items


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} publishes splits {INFO.splits}; got {split!r}")
    root = Path(root)
    tops = {folder.split("/")[0] for pairs in FOLDERS.values() for folder, _, _ in pairs}
    if not any((root / top).is_dir() for top in tops):
        found = found_in(root)
        raise LayoutError(f"{root}: expected the NeurIPS 2022 CellSeg layout ({INFO.layout}); found {found}")
    items = []
    for images_folder, labels_folder, subset in FOLDERS[split]:
        items += _pairs(root, images_folder, labels_folder, split, subset)
    return items


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel, other_folder = item.ref
    if image_rel is None:
        raise ItemError(
            f"label file {label_rel} has no image in {other_folder}/ (labels are named <image stem>{LABEL_TAG}.tiff)"
        )
    if label_rel is None:
        stem = Path(image_rel).stem
        raise ItemError(f"image {image_rel} has no label file {other_folder}/{stem}{LABEL_TAG}.tiff")
    image = merge_identical_channels(as_uint_image(read_image(root / image_rel)))
    labels = read_labels(root / label_rel)
    check_same_size(image, labels, image_rel, label_rel)
    names = colour_channel_names(image.shape[2])
    return Loaded(image=image, labels=labels, channel_names=names)
