"""CPM-15 and CPM-17 (Vu et al. 2019): H&E nuclei, as organised by the HoVer-Net authors.

Layout (their Google Drive folder, vqdang/hover_net issue #5)::

    cpm15/Images/<name>.png   + cpm15/Labels/<name>.mat          split "all", subset cpm15
    cpm17/{train,test}/Images/<name>.png + .../Labels/<name>.mat  splits train/test, subset cpm17

CPM-15 has no published split (15 images), so it is the ``all`` split; CPM-17 has 32 train and
32 test images. An ``Overlay/`` folder (label outlines drawn on the images, for viewing) is not
read. Images pair with the label file of the same stem; an image without one and a label file
without an image are items that ``load`` rejects.

Label formats (datasets.md 2.14 says the current Drive content is unconfirmed, so all three
formats that have been described are read; with several for one stem, the first in this order
is used and the others are ignored):

1. ``.mat`` with key ``inst_map`` (torch-em reads this): an (H, W) instance map, read with
   ``scipy.io.loadmat``. MATLAB v7.3 files are HDF5: read with h5py when it is installed (not a
   dependency), otherwise rejected with a message saying so.
2. ``.npy``: an (H, W) instance map (the authors' 2019 re-organisation note: "numpy arrays ...
   load with numpy.load").
3. ``.csv`` / ``.txt``: the CPM competition's vector format, as the HoVer-Net maintainer described
   it in 2019 ("a single vector ... the dimensions of the image are given at the top of the
   file"). Read as: numbers separated by commas and/or white space; the first two are the image
   dimensions, in either order (they must be the image's height and width); then exactly H * W
   non-negative whole numbers, one per pixel, x fastest (row 0 left to right, then row 1, ...),
   as datasets.md reports the competition README to say. Unconfirmed: the pixel order (a
   y-fastest file would load scrambled, transposed for a square image, with no error) and
   whether the header holds anything besides the two dimensions (if so, the count check
   rejects the file).

Label ids are kept as stored (non-negative whole numbers; the writer renumbers).
Image: RGB PNG (a constant alpha channel is dropped by ``pipeline.io.read_image``).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import scipy.io

from pipeline.io import read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, image_files

INFO = DatasetInfo(
    name="cpm",
    title="CPM-15 and CPM-17 (Vu et al. 2019), HoVer-Net authors' organisation",
    modality="he",
    channel_names=("red", "green", "blue"),
    splits=("train", "test", "all"),
    layout="cpm15/{Images/*.png, Labels/*.mat} (split all); cpm17/{train,test}/{Images/*.png, Labels/*.mat}",
    paper_images=47,
)

LABEL_SUFFIXES = (".mat", ".npy", ".csv", ".txt")  # preference order when one stem has several
MAT_KEY = "inst_map"


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    if not (root / "cpm15").is_dir() and not (root / "cpm17").is_dir():
        found = found_in(root)
        raise LayoutError(f"{root}: not a CPM folder; expected {INFO.layout}; found {found}")
    if split not in INFO.splits:
        return []
    folder, subset = (root / "cpm15", "cpm15") if split == "all" else (root / "cpm17" / split, "cpm17")
    labels_by_stem: dict[str, list[Path]] = {}
    for label in image_files(folder / "Labels", LABEL_SUFFIXES):
        labels_by_stem.setdefault(label.stem, []).append(label)
    items = []
    for image in image_files(folder / "Images"):
        candidates = labels_by_stem.pop(image.stem, [])
        label = min(candidates, key=lambda p: LABEL_SUFFIXES.index(p.suffix.lower()), default=None)
        items.append(Item(source=_rel(root, image), split=split, subset=subset,
                          ref=(_rel(root, image), label and _rel(root, label))))
    for stem in sorted(labels_by_stem):
        for label in labels_by_stem[stem]:
            items.append(Item(source=_rel(root, label), split=split, subset=subset, ref=(None, _rel(root, label))))
    return items


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    image_rel, label_rel = item.ref
    if image_rel is None:
        raise ItemError(f"label file {label_rel} has no matching image in ../Images/")
    if label_rel is None:
        raise ItemError(
            f"image {image_rel} has no label file (expected ../Labels/{Path(image_rel).stem} with one of "
            f"{', '.join(LABEL_SUFFIXES)})"
        )
    image = as_uint_image(read_image(root / image_rel))
    if image.shape[2] != 3:
        raise ItemError(f"{image_rel}: CPM images are RGB; got shape {image.shape}")
    labels = read_cpm_labels(root / label_rel, image.shape[:2])
    if labels.shape != image.shape[:2]:
        raise ItemError(f"{label_rel}: labels are {labels.shape} but the image {image_rel} is {image.shape[:2]}")
    return Loaded(image=image, labels=labels)


def read_cpm_labels(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """(H, W) instance ids from a ``.mat`` / ``.npy`` / ``.csv`` / ``.txt`` CPM label file."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return read_labels(path)
    if suffix == ".mat":
        return _checked_ids(path, _read_mat(path))
    return _read_vector(path, image_shape)


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


def _read_vector(path: Path, image_shape: tuple[int, int]) -> np.ndarray:
    """The competition's text format: two dimensions, then H * W ids, x fastest (see module notes)."""
    if path.stat().st_size == 0:
        raise ItemError(f"{path}: file is empty (0 bytes); re-download it")
    try:
        tokens = re.split(r"[,\s]+", path.read_text().strip())
        values = np.array([float(token) for token in tokens], dtype=np.float64)
    except (UnicodeDecodeError, ValueError) as error:
        raise ItemError(f"{path}: not a text label vector (numbers separated by commas or spaces): {error}") from error
    height, width = image_shape
    if values.size < 2 or sorted(values[:2].tolist()) != sorted([height, width]):
        raise ItemError(
            f"{path}: the first two numbers must be the image's dimensions {height} and {width}; got "
            f"{values[:2].tolist()}"
        )
    if values.size - 2 != height * width:
        raise ItemError(
            f"{path}: expected {height} * {width} = {height * width} pixel values after the dimensions; "
            f"got {values.size - 2}"
        )
    return _checked_ids(path, values[2:].reshape(height, width))


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
