"""YeaZ yeast gold standards (Dietler et al. 2020), as unpacked from the EPFL LPBS tarballs
``gold-standard-BF-V-1.tar.gz`` and ``gold-standard-PhC-plus-2.tar.gz`` (datasets.md 2.6).

Layout ([T] torch-em): each tarball unpacks to a folder of its own name holding ``<x>_im.tif``
images and ``<x>_mask.tif`` instance labels. The dataset folder holds one or both::

    gold-standard-BF-V-1/<x>_im.tif + <x>_mask.tif       subset "bf", brightfield
    gold-standard-PhC-plus-2/<y>_im.tif + <y>_mask.tif   subset "phc", phase contrast

There is no official split, so everything is split "all".

Decisions on the "Tricky" notes of datasets.md:

* Time stacks: PhC files reportedly hold 2-D + t stacks (assumed (T, H, W), unconfirmed).
  ``find_items`` reads each image's TIFF header (not its pixels) and lists one item per frame,
  source ``<y>_im.tif[t]``; ``load`` pairs image frame t with mask frame t and reads only that
  page. Any third axis counts as frames, however short, because these images are grayscale;
  that includes a leading "samples" axis, since writers store a (3, H, W) stack as one planar
  RGB page. Only a trailing samples axis (contiguous RGB) is read as colour. If the image and
  mask frame counts differ, every item of that file is rejected with both counts in the
  reason. A 2-D image is one item, read with the project's channel policy.
* A file whose header cannot be read is listed as one item so ``load`` rejects it with the
  error. Other image files in the folders (neither ``_im`` nor ``_mask``) are listed and
  rejected as unexpected; ``_mask`` files no image claims are orphan items.
* Images are grayscale: several identical channels are read as one, distinct channels are
  rejected. Float or odd dtypes go through ``as_uint_image``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import tifffile

from pipeline.io import SUPPORTED_SUFFIXES, read_image, read_labels
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in, single_channel

INFO = DatasetInfo(
    name="yeaz",
    title="YeaZ yeast brightfield and phase-contrast gold standards (Dietler et al. 2020)",
    modality="mixed",
    channel_names=("main",),
    splits=("all",),
    layout=(
        "gold-standard-BF-V-1/<x>_im.tif + <x>_mask.tif and/or gold-standard-PhC-plus-2/<y>_im.tif + "
        "<y>_mask.tif (PhC files may be (T, H, W) time stacks: one item per frame)"
    ),
    paper_images=245,
)

# subset -> (folder as the tarball unpacks, modality, what the single channel holds)
SUBSETS = {
    "bf": ("gold-standard-BF-V-1", "brightfield", ("brightfield",)),
    "phc": ("gold-standard-PhC-plus-2", "phase", ("phase",)),
}
IMAGE_END = "_im"
MASK_END = "_mask"
_TIFF_SUFFIXES = (".tif", ".tiff")


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def _files_below(folder: Path) -> list[Path]:
    """Image-suffixed files anywhere below ``folder``, sorted, without archive debris."""
    def is_debris(path: Path) -> bool:
        return any(part.startswith(".") or part == "__MACOSX" for part in path.relative_to(folder).parts)

    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES and not is_debris(p)
    )


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    folders = {subset: root / folder for subset, (folder, _, _) in SUBSETS.items()}
    if not any(folder.is_dir() for folder in folders.values()):
        found = found_in(root)
        raise LayoutError(
            f"{root} is not the YeaZ folder: expected {INFO.layout}; found {found}. Unpack the "
            "tarballs into this folder so that each makes its gold-standard-* folder."
        )
    if split not in INFO.splits:
        return []
    items: list[Item] = []
    for subset, folder in folders.items():
        if folder.is_dir():
            items += _folder_items(root, folder, subset)
    return items


def _folder_items(root: Path, folder: Path, subset: str) -> list[Item]:
    items: list[Item] = []
    files = _files_below(folder)
    claimed: set[Path] = set()
    for path in files:
        rel = path.relative_to(root).as_posix()
        if path.stem.endswith(MASK_END):
            continue
        if not path.stem.endswith(IMAGE_END):
            items.append(Item(source=rel, split="all", subset=subset, ref=("unexpected", rel)))
            continue
        mask = path.with_name(path.stem[: -len(IMAGE_END)] + MASK_END + path.suffix)
        claimed.add(mask)
        mask_rel = mask.relative_to(root).as_posix() if mask.exists() else None
        try:
            n_frames = _count_frames(path)
        except (ValueError, OSError):  # ItemError is a ValueError
            n_frames = None  # unreadable header: one item, so that load reports why
        if n_frames is None or n_frames == 1:
            items.append(Item(source=rel, split="all", subset=subset, ref=("pair", rel, mask_rel, None)))
        else:
            items += [
                Item(source=f"{rel}[{t}]", split="all", subset=subset, ref=("pair", rel, mask_rel, t))
                for t in range(n_frames)
            ]
    for path in files:
        if path.stem.endswith(MASK_END) and path not in claimed:
            rel = path.relative_to(root).as_posix()
            items.append(Item(source=rel, split="all", subset=subset, ref=("orphan", rel)))
    return items


# ------------------------------------------------------------------------------------------------
# TIFF frames
# ------------------------------------------------------------------------------------------------


class _ErrorCollector(logging.Handler):
    """ERROR records tifffile logs in this thread (it logs, not raises, for a cut page list)."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


# What tifffile raises on broken files; our own ItemErrors (a ValueError) pass through unchanged.
_DECODE_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError, RuntimeError, EOFError)


def _frame_axes(path: Path, tif: tifffile.TiffFile) -> tuple[int, int]:
    """(number of frames, pages per frame) of the first series; 1 frame for a 2-D image."""
    series = tif.series[0]
    kept = [(axis, n) for axis, n in zip(series.axes, series.shape) if n > 1 or axis in "YX"]
    if len(kept) == 2 or (len(kept) == 3 and kept[-1][0] == "S"):
        return 1, len(series.pages)
    if len(kept) == 3:
        return kept[0][1], len(series.pages) // kept[0][1]
    raise ItemError(
        f"{path}: expected a 2-D image or a (T, H, W) stack; got shape {series.shape} (axes {series.axes})"
    )


def _read_tiff(path: Path, frame: int | None = None) -> tuple[int, np.ndarray | None]:
    """(number of frames, frame ``frame`` as (H, W) or None) of a TIFF, reading one page only.

    Errors that tifffile only logs (a page list cut short by truncation) are raised too, so a
    truncated stack never looks like a shorter one.
    """
    collector = _ErrorCollector()
    logger = logging.getLogger("tifffile")
    logger.addHandler(collector)
    try:
        with tifffile.TiffFile(path) as tif:
            n_frames, pages_per_frame = _frame_axes(path, tif)
            plane = None
            if frame is not None and 0 <= frame < n_frames:
                if pages_per_frame == 1 and len(tif.series[0].pages) == n_frames:
                    plane = tif.asarray(key=frame, series=0)
                else:
                    # Not one page per frame (e.g. an ImageJ file stored as one block).
                    plane = tif.series[0].asarray().reshape(n_frames, *tif.series[0].shape[-2:])[frame]
    except ItemError:
        raise
    except _DECODE_ERRORS as error:
        raise ItemError(
            f"{path}: cannot read this TIFF ({type(error).__name__}: {error}); truncated or corrupt"
        ) from error
    finally:
        logger.removeHandler(collector)
    if collector.messages:
        raise ItemError(f"{path}: tifffile reported: {'; '.join(collector.messages)}; truncated or corrupt")
    if frame is not None:
        if plane is None:
            raise ItemError(f"{path}: frame {frame} out of range; the file has {n_frames} frame(s)")
        plane = np.squeeze(plane)
        if plane.ndim != 2:
            raise ItemError(f"{path}: frame {frame} has shape {plane.shape}; expected (H, W)")
    return n_frames, plane


def _count_frames(path: Path) -> int:
    if path.suffix.lower() not in _TIFF_SUFFIXES:
        return 1
    return _read_tiff(path)[0]


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _label_frame(plane: np.ndarray, path: Path, frame: int) -> np.ndarray:
    """Check a mask frame holds non-negative whole-number ids; return it as an integer array."""
    if plane.dtype.kind == "f":
        if not (np.all(np.isfinite(plane)) and np.array_equal(plane, np.round(plane))):
            raise ItemError(f"{path}: frame {frame} holds non-integer values; expected instance ids")
        plane = plane.astype(np.int64)
    elif plane.dtype.kind not in "biu":
        raise ItemError(f"{path}: frame {frame} has pixel type {plane.dtype}; expected integer ids")
    if plane.size and plane.min() < 0:
        raise ItemError(f"{path}: frame {frame} holds negative ids (min {plane.min()})")
    return plane.astype(np.uint32) if plane.dtype.kind in "bi" else plane


def _check_frame_counts(image_rel: str, n_image: int, mask_rel: str, n_mask: int) -> None:
    if n_mask != n_image:
        raise ItemError(f"{image_rel} has {n_image} frame(s) but {mask_rel} has {n_mask}; frames cannot be paired")


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    kind, *ref = item.ref
    if kind == "unexpected":
        raise ItemError(f"{ref[0]}: unexpected file in a YeaZ folder (neither *{IMAGE_END}.tif nor *{MASK_END}.tif)")
    if kind == "orphan":
        raise ItemError(f"label file {ref[0]} has no matching image (*{IMAGE_END}.tif)")
    image_rel, mask_rel, frame = ref
    if mask_rel is None:
        raise ItemError(f"image {image_rel} has no label file (*{MASK_END}.tif beside it)")
    image_path, mask_path = root / image_rel, root / mask_rel
    _, modality, channel_names = SUBSETS[item.subset]
    if frame is None:
        image = read_image(image_path)
        _check_frame_counts(image_rel, 1, mask_rel, _count_frames(mask_path))
        labels = read_labels(mask_path)
    else:
        n_image, plane = _read_tiff(image_path, frame)
        _check_frame_counts(image_rel, n_image, mask_rel, _count_frames(mask_path))
        image = plane[:, :, np.newaxis]
        labels = _label_frame(_read_tiff(mask_path, frame)[1], mask_path, frame)
    image = as_uint_image(single_channel(image, image_rel))
    return Loaded(image=image, labels=labels, modality=modality, channel_names=channel_names)
