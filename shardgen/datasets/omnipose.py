"""Omnipose training sets (Cutler et al. 2022): bacteria in phase contrast and fluorescence, and
C. elegans, as unpacked from ``datasets.zip`` of the OSF project xmury (datasets.md 2.5).

Layout (the zip's top level, [T] torch-em and a third-party tree)::

    bact_phase/train_sorted/<set>/<n>.tif + <n>_masks.tif (+ <n>_flows.tif)
    bact_phase/test_sorted/<set>/...
    bact_fluor/{train_sorted,test_sorted}/<set>/...
    worm/{train,test}/<n>.tif + <n>_masks.tif or <n>_masks.png
    worm_high_res/{train,test}/...

Each top folder is a ``subset`` (the paper's sampling table weights bact_phase and bact_fluor on
their own); the ``<set>`` folders under ``*_sorted`` only appear in the item's source path.

Decisions on the "Tricky" notes of datasets.md:

* ``<n>_flows.tif`` files are skipped: they are flows Omnipose precomputed from the masks
  (derived data, not images and not labels), so they are neither items nor rejects.
* Subfolders: every file below a split folder is listed, at any depth (datasets.md says one
  level; deeper files are listed rather than silently dropped). Hidden files and ``__MACOSX``
  are archive debris and skipped.
* Masks: ``<n>_masks.tif`` is looked up first, then ``.tiff`` and ``.png`` (the worm sets
  reportedly ship PNG masks [T]). A ``_masks`` file no image claims becomes an orphan item.
* Images are single-channel 2-D; a file with several identical channels is read as one channel,
  one with distinct channels is rejected (nothing guesses which channel holds the signal).
  Float or odd dtypes go through ``as_uint_image``. Bit depth is unconfirmed.
* Modality per subset: bact_phase phase contrast, bact_fluor fluorescence (the Omnipose README:
  "the subset of the phase data that had a membrane or cytosol tag"), worm and worm_high_res
  brightfield (torch-em's description says brightfield; datasets.md only says "gray", so this is
  unconfirmed). Whether Cellpose-SAM used the worm sets is unconfirmed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io import SUPPORTED_SUFFIXES
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, load_pair, pair_items, single_channel

INFO = DatasetInfo(
    name="omnipose",
    title="Omnipose bact_phase, bact_fluor, worm, worm_high_res (Cutler et al. 2022; OSF xmury datasets.zip)",
    modality="mixed",
    channel_names=("main",),
    splits=("train", "test"),
    layout=(
        "bact_phase/{train_sorted,test_sorted}/<set>/<n>.tif + <n>_masks.tif (same for bact_fluor); "
        "worm/{train,test}/<n>.tif + <n>_masks.{tif,png} (same for worm_high_res); *_flows.tif skipped"
    ),
    paper_images=392,
)

# subset -> (folder of each split, modality, what the single channel holds)
SUBSETS: dict[str, tuple[dict[str, str], str, tuple[str, ...]]] = {
    "bact_phase": ({"train": "train_sorted", "test": "test_sorted"}, "phase", ("phase",)),
    "bact_fluor": ({"train": "train_sorted", "test": "test_sorted"}, "fluorescence", ("membrane/cytoplasm",)),
    "worm": ({"train": "train", "test": "test"}, "brightfield", ("brightfield",)),
    "worm_high_res": ({"train": "train", "test": "test"}, "brightfield", ("brightfield",)),
}
MASK_SUFFIX = "_masks"
FLOWS_SUFFIX = "_flows"
# Tried in this order for the mask of <n>.<ext>.
MASK_EXTENSIONS = (".tif", ".tiff", ".png")


def _is_debris(path: Path, folder: Path) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts)


def _files_below(folder: Path) -> list[Path]:
    """Image-suffixed files anywhere below ``folder``, sorted, without archive debris."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not _is_debris(p, folder)
    )


def _mask_for(image: Path) -> Path:
    """The mask file of ``image``: the first existing ``<n>_masks.<ext>``, else the .tif name."""
    candidates = [image.with_name(image.stem + MASK_SUFFIX + ext) for ext in MASK_EXTENSIONS]
    return next((c for c in candidates if c.exists()), candidates[0])


def _split_folders(root: Path) -> list[Path]:
    return [root / subset / folder for subset, (folders, _, _) in SUBSETS.items() for folder in folders.values()]


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not any(folder.is_dir() for folder in _split_folders(root)):
        found = found_in(root)
        raise LayoutError(
            f"{root} is not the Omnipose datasets folder: expected {INFO.layout}; found {found}. "
            "Pass the folder that datasets.zip unpacked into (the one holding bact_phase/, worm/, ...)."
        )
    items: list[Item] = []
    for subset, (folders, _, _) in SUBSETS.items():
        if split not in folders:
            continue
        folder = root / subset / folders[split]
        if not folder.is_dir():
            continue
        images, masks = [], []
        for path in _files_below(folder):
            stem = path.stem.lower()
            if stem.endswith(FLOWS_SUFFIX):
                continue  # precomputed flows: derived from the masks, not data
            (masks if stem.endswith(MASK_SUFFIX) else images).append(path)
        items += pair_items(root, images, masks, _mask_for, split, subset)
    return items


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel = item.ref
    if image_rel is not None and label_rel is None:
        stem = Path(image_rel).stem
        raise ItemError(f"image {image_rel} has no label file ({stem}{MASK_SUFFIX}.tif, .tiff or .png)")
    pair = load_pair(root, item)
    _, modality, channel_names = SUBSETS[item.subset]
    image = as_uint_image(single_channel(pair.image, image_rel))
    return Loaded(image=image, labels=pair.labels, modality=modality, channel_names=channel_names)
