"""The training folders Cellpose users keep, for fine-tuning (``make finetune``, issue 20).

Layouts, found by name in the training folder (``<root>/train/`` if it exists, else ``<root>``)::

    <name>_img.<ext>  + <name>_masks.<ext>      Cellpose's --img_filter _img --mask_filter _masks
    <name>.<ext>      + <name>_masks.<ext>      Cellpose's default --mask_filter _masks
    <name>.<ext>      + <name>_seg.npy          the GUI's file: its masks are the user's corrections
    images/<name>.<ext> + masks/<name>[_masks|_mask|_labels|_label].<ext>

``<ext>`` is any suffix ``pipeline.io`` reads. The mask may also be ``_mask``, ``_labels`` or
``_label``. When an image has both a ``_seg.npy`` and a mask file, the ``_seg.npy`` wins: it is
what the GUI saved last (``python -m infer --save-seg --out`` the image folder writes an
uncorrected ``_masks.tif`` beside it); :func:`label_sources` counts which were used. Files
named like outputs (``_flows``, ``_cellprob``, ``_outlines``) are not images.

Splits: ``test`` is ``<root>/test/`` (same layouts) when it exists. Otherwise a fixed fraction of
the training pairs, :data:`TEST_FRACTION` (at least one image once there are two), is held out:
the pairs whose names hash (CRC-32) lowest, so the choice depends on the names only, not on the
order or the machine. ``train`` is every other pair.

As with every converter, nothing is dropped while listing: an image without labels, or labels
without an image, is an item that ``load`` rejects with the reason (``rejects.parquet``). A
folder with no image and no label file at all is a :class:`LayoutError` naming what it holds.

Images are kept as stored (``pipeline.io`` channel policy; Cellpose 4 takes the first three
channels as they are), except that identical channels (gray saved as RGB) become one. Binary
masks (one non-zero value) become instances by connected components, as in ``folder``.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from pipeline.io import SEG_SUFFIX, read_image, read_seg
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import (
    as_uint_image,
    check_same_size,
    found_in,
    generic_channel_names,
    image_files,
    merge_identical_channels,
)
from shardgen.datasets.folder import instances_from_mask, read_mask

INFO = DatasetInfo(
    name="cellpose_folder",
    title="Your Cellpose training folder: _img/_masks pairs, GUI _seg.npy files, or images/ + masks/",
    modality="mixed",
    channel_names=("channel_0", "channel_1", "channel_2"),
    splits=("train", "test"),
    layout="<name>[_img].<ext> + <name>_masks.<ext> or <name>_seg.npy in one folder, or images/ + "
    "masks/; optional test/ (else a fixed fraction is held out)",
)

#: Share of the training pairs held out as the test split when there is no test/ folder.
TEST_FRACTION = 0.2
IMAGE_TAG = "_img"
MASK_TAGS = ("_masks", "_mask", "_labels", "_label")
# Stems ending like this are labels or outputs, never images (Cellpose's get_image_files skips
# the same endings).
NOT_IMAGE_TAGS = (*MASK_TAGS, "_seg", "_flows", "_cellprob", "_outlines", "_cp_output")


def _pairs(root: Path, folder: Path, split: str) -> list[Item]:
    """Items for the image/label pairs in ``folder``; ``ref = (image, labels, problem)``."""
    image_dir, mask_dir = folder, folder
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        image_dir, mask_dir = folder / "images", folder / "masks"
    rel = lambda path: path.relative_to(root).as_posix()  # noqa: E731
    images = [p for p in image_files(image_dir) if not p.stem.endswith(NOT_IMAGE_TAGS)]
    masks = {p.stem: p for p in image_files(mask_dir) if p.stem.endswith(MASK_TAGS) or mask_dir != image_dir}
    segs = {p.name[: -len(SEG_SUFFIX)]: p for p in image_dir.glob("*" + SEG_SUFFIX) if not p.name.startswith(".")}
    items, claimed = [], set()
    for image in images:
        base = image.stem.removesuffix(IMAGE_TAG)
        seg = segs.get(image.stem)
        stems = dict.fromkeys(b + t for b in (base, image.stem) for t in MASK_TAGS)
        candidates = [masks[s] for s in stems if s in masks]
        if mask_dir != image_dir and image.stem in masks:
            candidates.append(masks[image.stem])
        claimed.update(candidates + ([seg] if seg else []))
        if seg is not None:
            items.append(Item(source=rel(image), split=split, ref=(rel(image), rel(seg), None)))
        elif len(candidates) == 1:
            items.append(Item(source=rel(image), split=split, ref=(rel(image), rel(candidates[0]), None)))
        else:
            problem = (f"image {rel(image)} has no labels (looked for {base}_masks.*, {image.stem}{SEG_SUFFIX})"
                       if not candidates else
                       f"image {rel(image)} matches several masks ({', '.join(map(rel, candidates))}); keep one")
            items.append(Item(source=rel(image), split=split, ref=(rel(image), None, problem)))
    for label in [*masks.values(), *segs.values()]:
        if label not in claimed:
            problem = f"labels {rel(label)} have no image with a matching name in {rel(image_dir) or '.'}"
            items.append(Item(source=rel(label), split=split, ref=(None, rel(label), problem)))
    return items


def held_out(names: list[str], fraction: float = TEST_FRACTION) -> set[str]:
    """The names of the test split: the ``round(fraction * n)`` (at least 1 of 2 or more) whose
    CRC-32 is lowest.

    >>> sorted(held_out([f"{i:03d}_img.png" for i in range(10)]))
    ['002_img.png', '003_img.png']
    """
    count = 0 if len(names) < 2 else max(1, round(fraction * len(names)))
    return set(sorted(names, key=lambda name: (zlib.crc32(name.encode()), name))[:count])


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"{INFO.name} has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    train_dir = root / "train" if (root / "train").is_dir() else root
    train = _pairs(root, train_dir, "train")
    if not train:
        raise LayoutError(
            f"{train_dir}: no images or labels found; expected {INFO.layout}. It holds: {found_in(train_dir)}"
        )
    if (root / "test").is_dir():
        return train if split == "train" else _pairs(root, root / "test", "test")
    usable = [item.source for item in train if item.ref[2] is None]
    test = held_out(usable)
    if split == "train":
        return [item for item in train if item.source not in test]
    return [Item(source=i.source, split="test", ref=i.ref) for i in train if i.source in test]


def label_sources(items: list[Item]) -> dict[str, int]:
    """How many items take their labels from a GUI ``_seg.npy``, from a mask file, or are unpaired."""
    kinds = ["unpaired" if i.ref[2] else "seg" if i.ref[1].endswith(SEG_SUFFIX) else "masks" for i in items]
    return {kind: kinds.count(kind) for kind in ("seg", "masks", "unpaired")}


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, labels_rel, problem = item.ref
    if problem:
        raise ItemError(problem)
    image = merge_identical_channels(as_uint_image(read_image(root / image_rel)))
    if labels_rel.endswith(SEG_SUFFIX):
        labels = read_seg(root / labels_rel)["masks"]
    else:
        labels = instances_from_mask(read_mask(root / labels_rel))
    check_same_size(image, labels, image_rel, labels_rel)
    return Loaded(image=image, labels=np.ascontiguousarray(labels), channel_names=generic_channel_names(image.shape[2]))
