"""CPM-15 and CPM-17 (Vu et al. 2019): H&E nuclei, as first released and as the HoVer-Net authors
reorganised them.

Layouts read (the dataset folder is ``--src``)::

    cpm15/Images/<name>.png + cpm15/Labels/<name>.mat           HoVer-Net reorganisation (their Google
    cpm17/{train,test}/Images/<name>.png + .../Labels/<name>.mat  Drive, vqdang/hover_net issue #5)

    imageXX.png + imageXX_mask.txt + imageXX_poly.png            CPM-15 as first released: one flat
                                                                 folder, either the dataset folder
                                                                 itself or its cpm15/ folder

CPM-15 has no published split (15 images), so it is the ``all`` split, subset ``cpm15``; CPM-17 has
32 train and 32 test images (subset ``cpm17``). Not read: ``imageXX_poly.png`` (the release README:
"provided for visualization of the segmentation results only") and HoVer-Net's ``Overlay/`` folder.

Pairing: an image ``<stem>.png`` pairs with the label file ``<stem>`` or ``<stem>_mask`` (the
release's name) with one of the label suffixes, so the released files also pair when they are put
into ``Images/`` and ``Labels/``. In the flat folder only ``*_mask.*`` files are label files, and
``README*`` files (the release's ``README_training.txt``) never are. An image without a label
file and a label file without an image are items that ``load`` rejects.

Label formats (with several for one image, the first in this order is used, the others ignored):

1. ``.mat`` with key ``inst_map`` (torch-em reads this): an (H, W) instance map, read with
   ``scipy.io.loadmat``. MATLAB v7.3 files are HDF5: read with h5py when it is installed (not a
   dependency), otherwise rejected with a message saying so.
2. ``.npy``: an (H, W) instance map (the authors' 2019 re-organisation note: "numpy arrays ...
   load with numpy.load").
3. ``.txt`` / ``.csv``: the competition's ASCII format, as its README_training.txt defines it: a
   first line ``width height``, then width * height instance ids (0 = background), one per line,
   pixel (0, 0), (1, 0), (2, 0), ... i.e. x fastest (row 0 left to right, then row 1, ...).
   Numbers separated by commas are read too (the HoVer-Net maintainer's 2019 description of a
   "single vector" with the dimensions "at the top of the file").

The header must be exactly the image's width and height, in that order. A real copy of CPM-15
has two label files whose headers carry each other's image size (swapped): such a file is
rejected, the reason naming the image whose size its header gives, rather than read against an
image it does not describe. A header in height-width order is rejected the same way (the README
puts the width first; reading it anyway could pair labels with the wrong image silently).

Label ids are kept as stored (non-negative whole numbers; the writer renumbers).
Image: RGB PNG (a constant alpha channel is dropped by ``pipeline.io.read_image``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

from pipeline.io import SUPPORTED_SUFFIXES, read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, image_files

INFO = DatasetInfo(
    name="cpm",
    title="CPM-15 and CPM-17 (Vu et al. 2019), as released and as HoVer-Net reorganised them",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("train", "test", "all"),
    layout=(
        "cpm15/{Images/*.png, Labels/*.mat} (split all); cpm17/{train,test}/{Images/*.png, Labels/*.mat}; "
        "or CPM-15 as first released, flat: imageXX.png + imageXX_mask.txt ('W H' line, then W*H ids, "
        "x fastest) + imageXX_poly.png (not read), in the folder itself or in cpm15/"
    ),
    paper_images=47,
)

LABEL_SUFFIXES = (".mat", ".npy", ".csv", ".txt")  # preference order when one image has several
MAT_KEY = "inst_map"
MASK_SUFFIX = "_mask"  # the first release's label name: imageXX_mask.txt
POLY_SUFFIX = "_poly"  # the first release's rendering, for viewing only
_IMAGE_SUFFIXES = tuple(s for s in SUPPORTED_SUFFIXES if s not in LABEL_SUFFIXES)


def _is_flat_release(folder: Path) -> bool:
    """True when ``folder`` holds CPM-15 as first released (``*_mask.txt`` beside the images)."""
    return folder.is_dir() and any(p.name.lower().endswith(MASK_SUFFIX + ".txt") for p in folder.iterdir())


def _split_folders(root: Path, split: str) -> tuple[Path, Path, str] | None:
    """(image folder, label folder, subset) of ``split``, or None when the dataset folder lacks it."""
    if split != "all":
        folder = root / "cpm17" / split
        return (folder / "Images", folder / "Labels", "cpm17") if (root / "cpm17").is_dir() else None
    cpm15 = root / "cpm15"
    if (cpm15 / "Images").is_dir() or (cpm15 / "Labels").is_dir():
        return cpm15 / "Images", cpm15 / "Labels", "cpm15"
    if cpm15.is_dir():
        return cpm15, cpm15, "cpm15"
    if _is_flat_release(root):
        return root, root, "cpm15"
    return None


def _pair_key(path: Path) -> str:
    """The image stem a label file belongs to: its stem without the release's ``_mask``."""
    stem = path.stem
    return stem[: -len(MASK_SUFFIX)] if stem.lower().endswith(MASK_SUFFIX) else stem


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not (root / "cpm15").is_dir() and not (root / "cpm17").is_dir() and not _is_flat_release(root):
        found = found_in(root)
        raise LayoutError(f"{root}: not a CPM folder; expected {INFO.layout}; found {found}")
    folders = _split_folders(root, split) if split in INFO.splits else None
    if folders is None:
        return []
    image_dir, label_dir, subset = folders
    labels_by_key: dict[str, list[Path]] = {}
    for label in image_files(label_dir, LABEL_SUFFIXES):
        if label.name.lower().startswith("readme") or (label_dir == image_dir and _pair_key(label) == label.stem):
            continue  # the release's README_training.txt; in the flat folder only imageXX_mask.* are labels
        labels_by_key.setdefault(_pair_key(label), []).append(label)
    items = []
    for image in image_files(image_dir, _IMAGE_SUFFIXES):
        if image.stem.lower().endswith(POLY_SUFFIX):
            continue  # the release's rendering of the outlines, not an image to learn from
        candidates = labels_by_key.pop(image.stem, [])
        label = min(candidates, key=lambda p: (LABEL_SUFFIXES.index(p.suffix.lower()), p.name), default=None)
        items.append(Item(source=_rel(root, image), split=split, subset=subset,
                          ref=(_rel(root, image), label and _rel(root, label))))
    for key in sorted(labels_by_key):
        for label in labels_by_key[key]:
            items.append(Item(source=_rel(root, label), split=split, subset=subset, ref=(None, _rel(root, label))))
    return items


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel = item.ref
    if image_rel is None:
        raise ItemError(f"label file {label_rel} has no matching image")
    if label_rel is None:
        stem = Path(image_rel).stem
        raise ItemError(
            f"image {image_rel} has no label file (expected {stem} or {stem}{MASK_SUFFIX} with one of "
            f"{', '.join(LABEL_SUFFIXES)})"
        )
    image = as_uint_image(read_image(root / image_rel))
    if image.shape[2] != 3:
        raise ItemError(f"{image_rel}: CPM images are RGB; got shape {image.shape}")
    labels = read_cpm_labels(root / label_rel, image.shape[:2], root / image_rel)
    if labels.shape != image.shape[:2]:
        raise ItemError(f"{label_rel}: labels are {labels.shape} but the image {image_rel} is {image.shape[:2]}")
    return Loaded(image=image, labels=labels)


def read_cpm_labels(path: Path, image_shape: tuple[int, int], image_path: Path | None = None) -> np.ndarray:
    """(H, W) instance ids from a ``.mat`` / ``.npy`` / ``.csv`` / ``.txt`` CPM label file.

    ``image_path`` (the image the labels are for) lets a text file's wrong header name the image
    whose size it gives instead.
    """
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_labels(path)
    if suffix == ".mat":
        return _checked_ids(path, _read_mat(path))
    return _read_vector(path, image_shape, image_path)


def _read_mat(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise ItemError(f"{path}: file is empty (0 bytes); re-download it")
    try:
        contents = scipy.io.loadmat(path, variable_names=[MAT_KEY])
    except NotImplementedError:  # scipy's answer to MATLAB v7.3 (HDF5) files
        return _read_mat_v73(path)
    except Exception as error:  # scipy raises IndexError, ValueError, MatReadError, ... on corrupt files
        raise ItemError(
            f"{path}: cannot read this MATLAB file ({type(error).__name__}: {error}); it is truncated or corrupt"
        ) from error
    if MAT_KEY not in contents:
        names = [name for name, _, _ in scipy.io.whosmat(path)]
        raise ItemError(f"{path}: no variable {MAT_KEY!r} in this MATLAB file; it holds {names}")
    return contents[MAT_KEY]


def _read_mat_v73(path: Path) -> np.ndarray:
    try:
        import h5py
    except ImportError:
        raise ItemError(
            f"{path}: is a MATLAB v7.3 (HDF5) file, which needs h5py (not installed, not a dependency); "
            "install h5py or re-save the file with MATLAB's -v7 option"
        ) from None
    try:
        with h5py.File(path, "r") as file:
            if MAT_KEY not in file:
                raise ItemError(f"{path}: no variable {MAT_KEY!r} in this MATLAB v7.3 file; it holds {sorted(file)}")
            # MATLAB stores column-major; HDF5 readers see the transpose.
            return np.asarray(file[MAT_KEY]).T
    except OSError as error:
        raise ItemError(f"{path}: cannot read this MATLAB v7.3 file ({error}); it is truncated or corrupt") from error


def _read_vector(path: Path, image_shape: tuple[int, int], image_path: Path | None) -> np.ndarray:
    """The competition's text format: ``width height``, then H * W ids, x fastest (module notes)."""
    if path.stat().st_size == 0:
        raise ItemError(f"{path}: file is empty (0 bytes); re-download it")
    try:
        tokens = re.split(r"[,\s]+", path.read_text().strip())
        values = np.array(tokens, dtype=np.float64)
    except (UnicodeDecodeError, ValueError) as error:
        raise ItemError(
            f"{path}: not a text label file (numbers separated by line breaks, spaces or commas): {error}"
        ) from error
    height, width = image_shape
    header = values[:2].tolist()
    if header != [width, height]:
        raise ItemError(_header_mismatch(path, header, (height, width), image_path))
    if values.size - 2 != height * width:
        raise ItemError(
            f"{path}: expected {width} * {height} = {height * width} pixel values after the 'width height' "
            f"line; got {values.size - 2}"
        )
    return _checked_ids(path, values[2:].reshape(height, width))


def _header_mismatch(path: Path, header: list, image_shape: tuple[int, int], image_path: Path | None) -> str:
    """The reject reason for a text label file whose header is not its image's width and height."""
    height, width = image_shape
    image_name = image_path.name if image_path is not None else "its image"
    reason = (
        f"{path}: the header gives {_size_text(header)} (width height) but {image_name} is {width} x {height}"
    )
    if len(header) == 2 and header == [height, width]:
        return reason + "; the README puts the width first, so the header does not describe this image"
    same_size = _images_of_size(image_path, header) if len(header) == 2 else []
    if same_size:
        return reason + (
            f", which is the size of {', '.join(same_size)}: the label file belongs to (or carries the header "
            "of) another image, so it is not matched with this one"
        )
    return reason + "; the label file does not describe this image"


def _size_text(header: list) -> str:
    return " x ".join(f"{v:g}" for v in header) if header else "nothing"


def _images_of_size(image_path: Path | None, size: list) -> list[str]:
    """Names of the other images beside ``image_path`` whose (width, height) is ``size``."""
    if image_path is None or not image_path.parent.is_dir():
        return []
    names = []
    for other in image_files(image_path.parent, _IMAGE_SUFFIXES):
        if other == image_path or other.stem.lower().endswith(POLY_SUFFIX):
            continue
        try:
            with Image.open(other) as opened:  # reads the header only
                if list(opened.size) == size:
                    names.append(other.name)
        except OSError:
            continue  # an unreadable neighbour says nothing about this file
    return names


def _checked_ids(path: Path, labels: np.ndarray) -> np.ndarray:
    """(H, W) uint32 from an array that must hold non-negative whole numbers."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ItemError(f"{path}: instance map must be 2-D (H, W); got shape {labels.shape}")
    if labels.dtype.kind not in "biuf":
        raise ItemError(f"{path}: instance map must be numeric; got {labels.dtype}")
    values = labels.astype(np.float64)
    if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)) or values.min(initial=0) < 0:
        raise ItemError(f"{path}: instance ids must be non-negative whole numbers")
    if values.max(initial=0) > np.iinfo(np.uint32).max:
        raise ItemError(f"{path}: instance id {values.max()} does not fit uint32")
    return values.astype(np.uint32)
