"""CoNIC 2022 challenge release (patches of Lizard; Graham et al. 2021): H&E nuclei in two arrays.

Layout (datasets.md 2.18), all in the dataset folder:

* ``images.npy``: uint8 (N, 256, 256, 3) RGB patches
* ``labels.npy``: uint16 (N, 256, 256, 2); channel 0 = instance map (0 = background), channel 1 =
  class map (not used here)
* ``patch_info.csv``: one row per patch naming its Lizard source image, ``<source>-<patch>``
  (e.g. ``consep_1-0000``), under a one-line header
* ``counts.csv``, ``README.txt``: not read

One item per row of ``images.npy``; its source is ``images.npy[<row>]``. Both arrays are
memory-mapped, and a worker reads one row of each.

What this converter does about the "Tricky" notes:

* No official split, so there is one split, ``all``. Patches do not overlap, but many come from
  one Lizard image, so a held-out set must be split by source image, never by patch: row ``i``'s
  source image is row ``i`` of ``patch_info.csv`` without its ``-NNNN`` suffix (HoVer-Net's CoNIC
  branch did this with a stratified split by cohort). This converter does not read
  ``patch_info.csv``; a group-aware split can be made from the manifest's ``source`` column.
* Labels are ``labels[..., 0]`` as stored; the writer renumbers. The class channel is ignored.
* ``counts.csv`` counts only nuclei touching the central 224 x 224; the labels cover the whole
  256 x 256 patch, so object counts here are not expected to match it.

Unconfirmed [U]: the license (Lizard is CC BY-NC-SA 4.0), and the class order of channel 1.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import found_in, open_npy

_log = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="conic",
    title="CoNIC 2022 (patches of Lizard; Graham et al. 2021)",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout="images.npy uint8 (N,256,256,3) + labels.npy uint16 (N,256,256,2; ch0 instances) + patch_info.csv",
    paper_images=None,
)

IMAGES_FILE, LABELS_FILE = "images.npy", "labels.npy"


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"conic has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    if not (root / IMAGES_FILE).is_file() and not (root / LABELS_FILE).is_file():
        found = found_in(root)
        raise LayoutError(f"{root}: not a CoNIC folder; expected {INFO.layout}; found {found}")
    counts = []
    for name in (IMAGES_FILE, LABELS_FILE):
        try:
            counts.append(len(open_npy(root / name)))
        except ValueError as error:  # missing or unreadable: counted by the other file
            _log.warning("%s", error)
    if not counts:
        # Neither file can be listed: one item that load rejects with the reason.
        return [Item(source=IMAGES_FILE, split=split, ref=(None,))]
    return [Item(source=f"{IMAGES_FILE}[{i}]", split=split, ref=(i,)) for i in range(max(counts))]


def load(root: Path, item: Item) -> Loaded:
    (row,) = item.ref
    root = Path(root)
    images, labels = open_npy(root / IMAGES_FILE), open_npy(root / LABELS_FILE)
    if row is None:
        raise ItemError(f"{root / IMAGES_FILE}: could not be listed")
    if images.ndim != 4 or images.shape[3] != 3 or labels.ndim != 4 or labels.shape[:3] != images.shape[:3]:
        raise ItemError(
            f"{root}: expected {IMAGES_FILE} (N, H, W, 3) and {LABELS_FILE} (N, H, W, 2) with the same N, H, W; "
            f"got {images.shape} and {labels.shape}"
        )
    if images.dtype != np.uint8:
        raise ItemError(f"{root / IMAGES_FILE}: expected uint8 RGB; got {images.dtype}")
    if labels.dtype.kind not in "iu":
        raise ItemError(f"{root / LABELS_FILE}: expected integer (uint16) labels; got {labels.dtype}")
    image = np.array(images[row])
    instances = np.array(labels[row, :, :, 0])
    if instances.size and instances.min() < 0:
        raise ItemError(f"{root / LABELS_FILE}[{row}]: negative instance ids")
    return Loaded(image=image, labels=instances.astype(np.uint32))
