"""LyNSeC: lymphoma nuclei in IHC and H&E, one ``.npy`` per image.

Paper: Comput. Biol. Med. 2024, doi 10.1016/j.compbiomed.2024.107978; data CC BY 4.0.

Layout (datasets.md 2.16), as ``lynsec.zip`` (Zenodo 8065174) unpacks::

    lynsec 1/<n>_l1.npy   IHC
    lynsec 2/<n>_l2.npy   H&E
    lynsec 3/<n>_l3.npy   H&E

The arrays, as the Zenodo record describes them: ``*_l1.npy`` and ``*_l3.npy`` are (H, W, 5):
channels 0-2 RGB, channel 3 the instance map (0 = background), channel 4 the class map (LyNSeC 1:
1 = marker-negative, 2 = marker-positive; LyNSeC 3: 1 = non-tumour, 2 = tumour). ``*_l2.npy``
are (H, W, 4), without the class map. 512 x 512 px at 40x; 379 / 280 / 40 images in LyNSeC
1 / 2 / 3. One item per ``.npy``, listed folder by folder and by the number in the name;
its source is the file's path, e.g. ``lynsec 1/0_l1.npy``. A zip unpacked into an extra
``lynsec/`` folder is accepted too.

What this converter does about the "Tricky" notes:

* Misaligned labels in ``lynsec 2``: files ``0_l2`` .. ``34_l2`` have labels that do not match
  their images (torch-em skips exactly these; InstanSeg skips the whole folder). They are listed
  and rejected with that reason, so they appear in ``rejects.parquet``; the rest of ``lynsec 2``
  is used, as torch-em does. Whether more of ``lynsec 2`` is off is unconfirmed.
* Modality by folder: ``lynsec 1`` is IHC (``modality="ihc"``, subset ``ihc``); ``lynsec 2`` and
  ``lynsec 3`` are H&E (``modality="he"``, subset ``he``). The subsets let the IHC part carry its
  own sampling weight: the paper names LyNSeC as one of its two IHC sources.
* No official split: one split, ``all``.
* The RGB channels go through ``as_uint_image`` (whole numbers in 0..255 become uint8, which is
  what the stored values are reported to be); channel 3 must hold whole, non-negative ids.
  The class map (channel 4) is never read: classes are not objects. Any array with at least the
  4 channels up to the instance map is read the same way, whatever its folder.

Unconfirmed [U]: file names beyond ``<n>_l<folder>``, the stored dtype.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, open_npy

INFO = DatasetInfo(
    name="lynsec",
    title="LyNSeC lymphoma nuclei, IHC and H&E (Comput. Biol. Med. 2024)",
    modality="mixed",
    channel_names=("red", "green", "blue"),
    splits=("all",),
    layout=(
        "'lynsec 1/' (IHC), 'lynsec 2/', 'lynsec 3/' (H&E), one <n>_l<k>.npy per image: "
        "_l1, _l3 (H,W,5) RGB + instance ids + class (not read); _l2 (H,W,4) RGB + instance ids"
    ),
    paper_images=None,
)

# Folder -> (modality, subset).
FOLDERS = {"lynsec 1": ("ihc", "ihc"), "lynsec 2": ("he", "he"), "lynsec 3": ("he", "he")}
# The part of "lynsec 2" whose labels do not match the images (torch-em's exclusion list).
_MISALIGNED = re.compile(r"(\d+)_l2")
_LAST_MISALIGNED = 34


def _dataset_dir(root: Path) -> Path:
    if not any((root / name).is_dir() for name in FOLDERS) and any((root / "lynsec" / n).is_dir() for n in FOLDERS):
        return root / "lynsec"
    return root


def _number_first(path: Path) -> tuple:
    match = re.match(r"(\d+)", path.name)
    return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)


def find_items(root: Path, split: str) -> list[Item]:
    if split not in INFO.splits:
        raise ValueError(f"lynsec has splits {INFO.splits}; got {split!r}")
    root = Path(root)
    folder_root = _dataset_dir(root)
    if not any((folder_root / name).is_dir() for name in FOLDERS):
        found = found_in(root)
        raise LayoutError(f"{root}: not a LyNSeC folder; expected {INFO.layout}; found {found}")
    items = []
    for name, (_, subset) in FOLDERS.items():
        folder = folder_root / name
        if not folder.is_dir():
            continue
        files = [
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".npy" and not p.name.startswith(".")
        ]
        for path in sorted(files, key=_number_first):
            rel = path.relative_to(root).as_posix()
            items.append(Item(source=rel, split=split, subset=subset, ref=(rel, name)))
    return items


def load(root: Path, item: Item) -> Loaded:
    rel, folder = item.ref
    path = Path(root) / rel
    modality = FOLDERS[folder][0]
    misaligned = _MISALIGNED.fullmatch(path.stem)
    if folder == "lynsec 2" and misaligned and int(misaligned.group(1)) <= _LAST_MISALIGNED:
        raise ItemError(
            f"{path}: labels do not match the image (known LyNSeC issue for 0_l2..{_LAST_MISALIGNED}_l2 in "
            "'lynsec 2'; torch-em skips these files, InstanSeg the whole folder)"
        )
    array = open_npy(path)
    if array.ndim != 3 or array.shape[2] < 4:
        raise ItemError(
            f"{path}: expected (H, W, 5) (RGB, instance ids, class) or (H, W, 4) (RGB, instance ids); "
            f"got shape {array.shape}"
        )
    if array.dtype.kind not in "fiub":
        raise ItemError(f"{path}: expected a numeric array; got {array.dtype}")
    try:
        image = as_uint_image(np.array(array[:, :, :3]))
    except ItemError as error:
        raise ItemError(f"{path}: {error}") from error
    ids = np.array(array[:, :, 3])
    if not np.isfinite(ids).all() or not np.array_equal(ids, np.round(ids)) or ids.min() < 0:
        raise ItemError(
            f"{path}: channel 3 must hold whole, non-negative instance ids; got values {ids.min()}..{ids.max()}"
        )
    if ids.max() > np.iinfo(np.uint32).max:
        raise ItemError(f"{path}: instance id {ids.max()} does not fit uint32")
    return Loaded(image=image, labels=ids.astype(np.uint32), modality=modality)
