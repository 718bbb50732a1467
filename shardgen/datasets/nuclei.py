"""Cellpose "nuclei" (the nuclear set of Stringer et al. 2021, 1,139 images), datasets.md 2.2.

The public layout is UNCONFIRMED: the set was not released in 2021 (cellpose issue #240), and the
authors' own copy is ``images_nuclei/{train,test}/*.tif`` with ``_flows.tif`` labels. As
datasets.md advises, this converter assumes the cyto scheme::

    train/NNN_img.png + train/NNN_masks.png      split "train"
    test/NNN_img.png  + test/NNN_masks.png       split "test"

(any extension ``pipeline.io`` reads, e.g. ``.tif``, is accepted for both). Pairing, strays and
the rejection reasons are those of ``shardgen.datasets.cyto2`` (:func:`find_cellpose_pairs`).

Decisions:

* Channels: the result is one channel, the nuclear stain, ``(H, W, 1)``. A single-channel file
  is kept as is. A multi-channel file (e.g. grayscale packed into RGB the way the cyto set does
  it) is reduced to one channel when every channel that holds signal is identical to the others
  with signal (R = G = B, or G only, or R only, or R = G with B empty); that channel is kept.
  If two channels hold different signal, nothing says which one is the nucleus, so the item is
  rejected naming the file.
* 65535 in uint16 masks is set to background, as for cyto (same authors, same tooling;
  unconfirmed for this set).
* The paper's style analysis sets aside train indices 693-935 and test indices 76-102 (reason
  unknown); everything is converted, and the source name keeps the index.
* Modality "fluorescence": the sub-sources (DSB2018, ISBI 2009, ...) are mostly fluorescence; a
  few DSB2018 images are brightfield or H&E reduced to gray [U].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import found_in
from shardgen.datasets.cyto2 import find_cellpose_pairs, read_pair

INFO = DatasetInfo(
    name="nuclei",
    title="Cellpose nuclei (Stringer et al. 2021, Nat. Methods)",
    modality="fluorescence",
    channel_names=("nucleus",),
    splits=("train", "test"),
    # No public copy of this set was found (it was not on Cellpose's dataset page when users asked
    # for it, cellpose issue #240), so --list and layout errors say that this layout is assumed.
    layout=(
        "ASSUMED, no public copy seen (cellpose issue #240): laid out like the cyto set, "
        "train/ and test/ with NNN_img.png (1 channel, or gray packed in RGB) + NNN_masks.png (labels)"
    ),
    paper_images=1025,
)


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} publishes splits {INFO.splits}; got {split!r}")
    root = Path(root)
    if not any((root / folder).is_dir() for folder in INFO.splits):
        found = found_in(root)
        raise LayoutError(f"{root}: expected the Cellpose nuclei layout ({INFO.layout}); found {found}")
    return find_cellpose_pairs(root, split, split, "")


def nuclear_channel(image: np.ndarray, name: str) -> np.ndarray:
    """(H, W, 1): the one channel of ``image`` (H, W, C) that holds the signal; ItemError if ambiguous."""
    if image.shape[2] == 1:
        return image
    with_signal = [c for c in range(image.shape[2]) if image[:, :, c].any()]
    if not with_signal:
        return np.ascontiguousarray(image[:, :, :1])  # a blank image; the labels decide its fate
    first = with_signal[0]
    if all(np.array_equal(image[:, :, c], image[:, :, first]) for c in with_signal[1:]):
        return np.ascontiguousarray(image[:, :, first : first + 1])
    raise ItemError(
        f"{name}: channels {with_signal} of a {image.shape} image hold different signals; a nuclei image "
        "should have one channel (or gray packed into identical channels), and nothing says which is the nucleus"
    )


def load(root: Path, item: Item) -> Loaded:
    image, labels = read_pair(Path(root), item)
    return Loaded(image=nuclear_channel(image, item.ref[0]), labels=labels)
