"""Helpers that several converters share: pairing files, reading pairs, instances from binary
masks and polygons, and turning odd image dtypes into uint8/uint16."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import scipy.ndimage
from PIL import Image, ImageDraw

from pipeline.io import SUPPORTED_SUFFIXES, read_image, read_labels
from shardgen.base import Item, ItemError, Loaded

# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def image_files(folder: Path, suffixes: Iterable[str] = SUPPORTED_SUFFIXES) -> list[Path]:
    """Files in ``folder`` (not recursive) with an image suffix, sorted; [] if it is missing.

    Hidden files and macOS resource forks (``._name``, ``__MACOSX``) are skipped: they are
    archive debris, not data.
    """
    if not folder.is_dir():
        return []
    wanted = {s.lower() for s in suffixes}
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in wanted and not p.name.startswith(".")
    )


def found_in(root: Path, limit: int = 20) -> str:
    """What a folder holds, for a LayoutError message: its first entries, or that it is missing."""
    if not root.is_dir():
        return "no such folder" if not root.exists() else "a file, not a folder"
    names = sorted(p.name for p in root.iterdir())
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return (", ".join(names[:limit]) or "an empty folder") + more


def pair_items(
    root: Path,
    images: Iterable[Path],
    labels: Iterable[Path],
    label_for: Callable[[Path], Path],
    split: str,
    subset: str = "",
) -> list[Item]:
    """Items for image/label file pairs, keeping the unpaired ones so they get rejected loudly.

    ``label_for(image_path)`` gives the label path an image should have. Every image becomes an
    item (its label may be missing); every label file no image claims becomes an item too. The
    item's ``ref`` is ``(image_rel or None, label_rel or None)``, relative to ``root``; use
    :func:`load_pair` to read it.
    """
    items = []
    claimed = set()
    for image in sorted(images):
        label = label_for(image)
        claimed.add(label.resolve())
        rel_label = label.relative_to(root).as_posix() if label.exists() else None
        items.append(
            Item(source=image.relative_to(root).as_posix(), split=split, subset=subset,
                 ref=(image.relative_to(root).as_posix(), rel_label))
        )
    for label in sorted(labels):
        if label.resolve() not in claimed:
            rel = label.relative_to(root).as_posix()
            items.append(Item(source=rel, split=split, subset=subset, ref=(None, rel)))
    return items


def load_pair(root: Path, item: Item, **read_kwargs) -> Loaded:
    """Read an item made by :func:`pair_items`: the image as stored, the labels as stored."""
    image_rel, label_rel = item.ref
    if image_rel is None:
        raise ItemError(f"label file {label_rel} has no matching image")
    if label_rel is None:
        raise ItemError(f"image {image_rel} has no label file")
    image = read_image(root / image_rel, **read_kwargs)
    labels = read_labels(root / label_rel)
    return Loaded(image=image, labels=labels)


def open_npy(path: Path) -> np.ndarray:
    """Memory map of a ``.npy`` file (only its header is read); ItemError naming the file if
    it is missing, truncated or corrupt. Index it to read one image at a time."""
    if not path.is_file():
        raise ItemError(f"{path}: missing")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ItemError(
            f"{path}: cannot read this .npy ({type(error).__name__}: {error}); it is truncated or corrupt"
        ) from error


# ------------------------------------------------------------------------------------------------
# Instances
# ------------------------------------------------------------------------------------------------


def binary_to_instances(mask: np.ndarray, threshold: float = 0, connectivity: int = 8) -> np.ndarray:
    """Instance labels (uint32) from a binary (or anti-aliased, or RGB) mask by connected components.

    A pixel is foreground where any channel exceeds ``threshold``. Touching objects merge: that
    is the source's limitation, not something this can undo.
    """
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = (mask > threshold).any(axis=-1)
    elif mask.ndim == 2:
        mask = mask > threshold
    else:
        raise ItemError(f"binary mask must be (H, W) or (H, W, C); got shape {mask.shape}")
    structure = np.ones((3, 3), bool) if connectivity == 8 else None
    labels, _ = scipy.ndimage.label(mask, structure=structure)
    return labels.astype(np.uint32)


def rasterise_polygons(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> tuple[np.ndarray, int]:
    """Fill polygons into a label image, ids 1.. in the given order, later over earlier.

    Each polygon is an (n, 2) array of (x, y) = (column, row) vertices in pixel units. Polygons
    with fewer than 3 vertices cannot enclose pixels and are skipped; their number is returned
    so the caller can say so. Returns (labels uint32, n_skipped).
    """
    height, width = shape
    # Mode "I" is 32-bit integer, so ids never wrap.
    canvas = Image.new("I", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    next_id, skipped = 1, 0
    for polygon in polygons:
        polygon = np.asarray(polygon, dtype=np.float64)
        if polygon.ndim != 2 or polygon.shape[0] < 3 or polygon.shape[1] != 2:
            skipped += 1
            continue
        draw.polygon([(float(x), float(y)) for x, y in polygon], fill=next_id, outline=next_id)
        next_id += 1
    return np.asarray(canvas, dtype=np.int32).astype(np.uint32), skipped


# ------------------------------------------------------------------------------------------------
# Channels and image dtypes
# ------------------------------------------------------------------------------------------------


def merge_identical_channels(image: np.ndarray) -> np.ndarray:
    """(H, W, 1) when every channel of ``image`` (H, W, C) equals the first, else ``image``.

    Grayscale saved as RGB is common; keeping one copy loses nothing.
    """
    if image.shape[2] > 1 and all(np.array_equal(image[:, :, c], image[:, :, 0]) for c in range(1, image.shape[2])):
        return np.ascontiguousarray(image[:, :, :1])
    return image


def single_channel(image: np.ndarray, source: str) -> np.ndarray:
    """(H, W, 1) from an image that must be grayscale; ItemError naming ``source`` otherwise."""
    merged = merge_identical_channels(image)
    if merged.shape[2] != 1:
        raise ItemError(
            f"{source}: expected a single-channel image; got {image.shape[2]} channels that differ "
            f"(shape {image.shape}), and which one holds the signal is not documented"
        )
    return merged


def generic_channel_names(n_channels: int) -> tuple[str, ...]:
    """``channel_0``, ``channel_1``, ... for images whose channels carry no documented meaning."""
    return tuple(f"channel_{c}" for c in range(n_channels))


def colour_channel_names(n_channels: int) -> tuple[str, ...]:
    """("gray",) for one channel, RGB names for three, generic names otherwise."""
    return {1: ("gray",), 3: ("red", "green", "blue")}.get(n_channels, generic_channel_names(n_channels))


def check_same_size(image: np.ndarray, labels: np.ndarray, image_name: str, labels_name: str) -> None:
    """ItemError naming both files when the labels are not the image's height and width."""
    if labels.shape != image.shape[:2]:
        raise ItemError(
            f"{labels_name} is {labels.shape[0]}x{labels.shape[1]} but image {image_name} is "
            f"{image.shape[0]}x{image.shape[1]}; they must have the same height and width"
        )


def as_uint_image(image: np.ndarray) -> np.ndarray:
    """uint8/uint16 version of an image of any numeric dtype, losing nothing that matters.

    Integer-valued data that fits 0..255 becomes uint8 and data that fits 0..65535 becomes
    uint16, unchanged; anything else (real-valued floats, negative values, wider integers) is
    mapped linearly from its [min, max] onto 0..65535 as uint16, which keeps every level that the
    per-image percentile normalisation in training can see. Non-finite values become the minimum.
    """
    image = np.asarray(image)
    if image.dtype in (np.uint8, np.uint16):
        return image
    if image.dtype == bool:
        return image.astype(np.uint8) * 255
    values = image.astype(np.float64)
    finite = np.isfinite(values)
    if not finite.any():
        raise ItemError("image has no finite values")
    low, high = values[finite].min(), values[finite].max()
    values[~finite] = low
    integral = np.array_equal(values, np.round(values))
    if integral and low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if integral and low >= 0 and high <= 65535:
        return values.astype(np.uint16)
    if high == low:
        return np.zeros(image.shape, dtype=np.uint16)
    return np.round((values - low) / (high - low) * 65535).astype(np.uint16)
