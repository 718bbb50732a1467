"""DeepBacs bacterial segmentation sets (Spahn et al. 2022), one Zenodo zip each (datasets.md 2.7).

The dataset folder holds one sub-folder per unpacked zip; most zips have no top folder of their
own, so unpack each into a folder named after it: ``unzip <name>.zip -d <name>``.
The sub-folder's name is the items' ``subset``, with every character other than letters,
digits, ``_`` and ``-`` replaced by ``_`` (``E.coli`` -> ``E_coli``): the subset becomes part of
the WebDataset sample keys, which may not hold dots. Its layout is recognised from its contents:
split folders ``training``/``train`` (split "train") and ``test``, each holding an image folder
and a mask folder of one of these pairs (the first pair whose two folders exist wins for an
image folder)::

    source + target              StarDist MIXED (5551009), [T] torch-em; modality "mixed"
    brightfield + masks_RoiMap   E. coli brightfield (5550935), [T]
    brightfield + masks          E. coli stationary phase (6400327) [T], S. aureus brightfield [T]
    fluorescence + masks         S. aureus fluorescence [T], B. subtilis FtsZ [T]

The split folders sit in the zip folder itself or up to three folders deeper (S. aureus:
``brightfield_dataset/`` and ``fluorescence_dataset/``; B. subtilis FtsZ: one folder per
network, ``StarDist_dataset/`` ...). Where a split folder has ``full_images/`` (S. aureus
train), the pair is read from there. Masks are paired with images by file name, then by stem.

Decisions on the "Tricky" notes of datasets.md (which sub-datasets Cellpose-SAM used is
unconfirmed; every recognised one is converted):

* Ignored as derived or unannotated, never listed: ``masks_binary/`` (binary copies of the
  RoiMap labels), ``live-cell_data/`` (unannotated E. coli time-lapses), ``patches/`` (S. aureus
  crops of the full images), non-image files (notes).
* B. subtilis FtsZ ships the data once per network (StarDist_dataset, SplineDist_dataset,
  pix2pix_dataset, CARE_U-Net_dataset; third-party code, unconfirmed that the images are the
  same). Only one is used, in that order of preference (StarDist's masks are instance labels);
  the others' images are listed and rejected as duplicates, so they stay visible.
* A mask with a single non-zero value is a binary mask (some variants are binary, and whether
  e.g. the S. aureus or stationary-phase masks are instance maps is unconfirmed): it is split
  into objects by 8-connected components, so touching cells merge. A true instance map with a
  single cell gives the same cell.
* A sub-folder whose layout is not recognised has all its image files listed and rejected with
  "unrecognised DeepBacs layout" (image files elsewhere in a recognised zip are rejected as not
  part of a recognised image/mask pair); LayoutError only when no sub-folder is recognised.
  Such files go to split "test" when a folder on their path is called test, else "train".
* Images are single-channel 2-D (several identical channels are read as one, distinct ones are
  rejected); odd dtypes go through ``as_uint_image``. The fluorescence stain is not recorded in
  the sources seen, so the channel is called "fluorescence".
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from pipeline.io import SUPPORTED_SUFFIXES
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, binary_to_instances, image_files, load_pair, pair_items, single_channel

INFO = DatasetInfo(
    name="deepbacs",
    title=(
        "DeepBacs segmentation: StarDist MIXED, E. coli BF, E. coli stationary, S. aureus, B. subtilis "
        "(Spahn et al. 2022)"
    ),
    modality="mixed",
    channel_names=("main",),
    splits=("train", "test"),
    layout=(
        "<zip folder>/[...]/{training,train,test}/ with source+target, brightfield+masks_RoiMap, "
        "brightfield+masks or fluorescence+masks (train/full_images/ where present), one folder per unpacked zip"
    ),
    paper_images=155,
)

# Split folder name (lower case) -> split.
SPLIT_FOLDERS = {"training": "train", "train": "train", "test": "test"}
# (image folder, mask folder), tried in this order inside each split folder.
PAIRS = (("source", "target"), ("brightfield", "masks_RoiMap"), ("brightfield", "masks"), ("fluorescence", "masks"))
# Image folder -> (modality, what the single channel holds).
IMAGE_KINDS = {
    "source": ("mixed", ("main",)),  # StarDist MIXED: brightfield and fluorescence images together
    "brightfield": ("brightfield", ("brightfield",)),
    "fluorescence": ("fluorescence", ("fluorescence",)),
}
FULL_IMAGES = "full_images"
# Derived or unannotated folders, skipped wherever they are.
IGNORED_FOLDERS = frozenset({"masks_binary", "live-cell_data", "patches"})
# B. subtilis FtsZ: the same data prepared per network; the first present is used.
NETWORK_FOLDERS = ("StarDist_dataset", "SplineDist_dataset", "pix2pix_dataset", "CARE_U-Net_dataset")
MAX_DEPTH = 3


@dataclasses.dataclass(frozen=True)
class _PairFolder:
    split: str
    images: Path
    masks: Path


@dataclasses.dataclass(frozen=True)
class _ZipLayout:
    pairs: tuple[_PairFolder, ...]
    """The image/mask folders that are converted."""
    duplicates: dict[Path, str]
    """Network folders not used -> the name of the one used instead."""


# ------------------------------------------------------------------------------------------------
# Recognising a zip folder
# ------------------------------------------------------------------------------------------------


def _subset_name(folder_name: str) -> str:
    """The folder name with characters a WebDataset key cannot hold (dots above all) as "_"."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", folder_name)


def _is_debris(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_debris(p.name))


def _split_pairs(split_folder: Path, split: str) -> list[_PairFolder]:
    base = split_folder / FULL_IMAGES if (split_folder / FULL_IMAGES).is_dir() else split_folder
    pairs, used = [], set()
    for image_name, mask_name in PAIRS:
        if image_name not in used and (base / image_name).is_dir() and (base / mask_name).is_dir():
            pairs.append(_PairFolder(split, base / image_name, base / mask_name))
            used.add(image_name)
    return pairs


def _folder_pairs(folder: Path) -> list[_PairFolder]:
    """The pairs of ``folder`` if it holds split folders with recognised pairs, else []."""
    return [
        pair
        for child in _subfolders(folder)
        if child.name.lower() in SPLIT_FOLDERS
        for pair in _split_pairs(child, SPLIT_FOLDERS[child.name.lower()])
    ]


def _analyse(zip_folder: Path) -> _ZipLayout:
    """Find the dataset folders (those holding split folders) at most MAX_DEPTH below the zip."""
    found: dict[Path, list[_PairFolder]] = {}
    level = [zip_folder]
    for _ in range(MAX_DEPTH + 1):
        deeper = []
        for folder in level:
            pairs = _folder_pairs(folder)
            if pairs:
                found[folder] = pairs
            else:
                deeper += [
                    c for c in _subfolders(folder)
                    if c.name not in IGNORED_FOLDERS and c.name.lower() not in SPLIT_FOLDERS
                ]
        level = deeper
    networks = sorted((f for f in found if f.name in NETWORK_FOLDERS), key=lambda f: NETWORK_FOLDERS.index(f.name))
    duplicates = {f: networks[0].name for f in networks[1:]}
    pairs = tuple(p for folder, folder_pairs in found.items() if folder not in duplicates for p in folder_pairs)
    return _ZipLayout(pairs=pairs, duplicates=duplicates)


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def _image_files_below(folder: Path, skip_ignored: bool) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if any(_is_debris(part) for part in parts) or not path.is_file():
            continue
        if skip_ignored and any(part in IGNORED_FOLDERS for part in parts[:-1]):
            continue
        if path.suffix.lower() in SUPPORTED_SUFFIXES:
            files.append(path)
    return files


def _split_of(path: Path) -> str:
    """Split of a file outside a recognised pair: test if a folder on its path says so."""
    return "test" if any(part.lower() == "test" for part in path.parts[:-1]) else "train"


def _mask_for(masks: Path):
    def mask_for(image: Path) -> Path:
        same_name = masks / image.name
        if same_name.exists():
            return same_name
        same_stem = [masks / (image.stem + suffix) for suffix in SUPPORTED_SUFFIXES]
        return next((p for p in same_stem if p.exists()), same_name)

    return mask_for


def _zip_items(root: Path, zip_folder: Path, layout: _ZipLayout, split: str) -> list[Item]:
    subset = _subset_name(zip_folder.name)
    items: list[Item] = []
    for pair in layout.pairs:
        if pair.split == split:
            images, masks = image_files(pair.images), image_files(pair.masks)
            paired = pair_items(root, images, masks, _mask_for(pair.masks), split, subset)
            items += [dataclasses.replace(item, ref=("pair", *item.ref)) for item in paired]
    used = {folder for pair in layout.pairs for folder in (pair.images, pair.masks)}
    for path in _image_files_below(zip_folder, skip_ignored=True):
        if path.parent in used or _split_of(path.relative_to(root)) != split:
            continue
        rel = path.relative_to(root).as_posix()
        kept = next((name for folder, name in layout.duplicates.items() if folder in path.parents), None)
        ref = ("duplicate", rel, kept) if kept else ("unplaced", rel, zip_folder.name)
        items.append(Item(source=rel, split=split, subset=subset, ref=ref))
    return items


def _unrecognised_items(root: Path, path: Path, split: str) -> list[Item]:
    """Every image file of an unrecognised zip folder (or one loose file in the dataset folder)."""
    if path.is_dir():
        files, zip_name, subset = _image_files_below(path, skip_ignored=False), path.name, _subset_name(path.name)
    else:
        files, zip_name, subset = [path], "", ""
    return [
        Item(source=rel, split=split, subset=subset, ref=("unrecognised", rel, zip_name))
        for rel in (file.relative_to(root).as_posix() for file in files)
        if _split_of(Path(rel)) == split
    ]


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder; expected {INFO.layout}")
    zip_folders = _subfolders(root)
    layouts = {folder: _analyse(folder) for folder in zip_folders}
    if not any(layout.pairs for layout in layouts.values()):
        hint = ""
        if _folder_pairs(root):
            hint = (" This folder itself looks like one unpacked zip: move its contents into a "
                    "sub-folder named after the zip.")
        raise LayoutError(
            f"{root}: no DeepBacs layout recognised; expected {INFO.layout}. "
            f"Found sub-folders {[f.name for f in zip_folders]}.{hint}"
        )
    items: list[Item] = []
    for folder, layout in layouts.items():
        if layout.pairs:
            items += _zip_items(root, folder, layout, split)
        else:
            items += _unrecognised_items(root, folder, split)
    loose = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES
             and not _is_debris(p.name)]
    for path in loose:
        items += _unrecognised_items(root, path, split)
    return items


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _instances(labels: np.ndarray) -> np.ndarray:
    """Labels as stored, or connected components when the mask is binary (one non-zero value)."""
    values = np.unique(labels)
    if len(values) == 2 and values[0] == 0:
        return binary_to_instances(labels)
    return labels


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    kind, *ref = item.ref
    if kind == "unrecognised":
        rel, zip_name = ref
        raise ItemError(
            f"{rel}: unrecognised DeepBacs layout in {zip_name or 'the dataset folder'}/ "
            f"(expected {INFO.layout})"
        )
    if kind == "duplicate":
        rel, kept = ref
        raise ItemError(f"{rel}: not used; this zip's {kept} holds the same data prepared for another network")
    if kind == "unplaced":
        rel, zip_name = ref
        raise ItemError(f"{rel}: not in a recognised image/mask folder pair of {zip_name}/")
    pair = load_pair(root, dataclasses.replace(item, ref=tuple(ref)))
    image_rel = ref[0]
    modality, channel_names = IMAGE_KINDS[Path(image_rel).parent.name]
    image = as_uint_image(single_channel(pair.image, image_rel))
    return Loaded(image=image, labels=_instances(pair.labels), modality=modality, channel_names=channel_names)
