"""LIVECell (Edlund et al. 2021): phase-contrast images of 8 cell lines, COCO polygon annotations.

Layout, as ``images.zip`` and the annotation files unpack::

    annotations/LIVECell/livecell_coco_{train,val,test}.json
    images/livecell_train_val_images/<CellType>/<CellType>_Phase_<Well>_<Loc>_<Time>_<Crop>.tif
    images/livecell_test_images/<CellType>/...tif

Some copies have no ``<CellType>`` folders (the images lie flat in the two image folders); both are
read. Train and val images share ``livecell_train_val_images``; each JSON says which are its own.
The other annotation sets (``LIVECell_single_cells/``, ``LIVECell_dataset_size_split/``) cover
the same images and are not read.

Items: one per entry of the split's JSON ``images`` list, in ``file_name`` order; ``subset`` is the
cell type, the file name's prefix before the first ``_`` (A172, BT474, ...). Also items, so that
they are rejected with a reason: an image the JSON lists whose file is missing, annotations whose
``image_id`` the JSON's image list lacks, an unreadable JSON, and image files that no JSON lists
(those of the shared train/val folder are listed under ``train``). Images the JSON lists without
annotations become samples without objects, which the writer rejects.

The JSON is parsed once, in ``find_items``; each item carries its own polygons as float32 bytes
(about 250 bytes per cell), so workers never parse the JSON (the train JSON is hundreds of MB, and
one parse per worker would cost a few GB each).

Tricky bits (datasets.md 2.4):

1. ``annotations`` (and ``images``) may be a dict keyed by id rather than a list: both are read,
   in file order.
2. Instances overlap. They are resolved with the rule of the Cellpose authors' LIVECell
   preprocessing (``paper/2.0/datasets.py``), implemented in :func:`resolve_overlaps`: visit masks
   from smallest to largest, drop one when >= 75% of its pixels are covered more than once, then
   give each pixel still covered more than once to the surviving mask with the nearest mean
   pixel coordinate. Two deliberate differences, both in :func:`resolve_overlaps`' notes: a pixel
   only goes to a mask that covers it, and empty masks get no id.
3. torch-em's rule (paint by increasing area, delete fragments < 50 px) is not used.
4. Cell type = file-name prefix, kept as ``subset``.

Polygons are filled with Pillow (boundary included, as ``shardgen.common.rasterise_polygons``),
not with pycocotools' ``annToMask``, so masks can differ from the authors' by a pixel along the
outline. A segmentation in RLE form (``iscrowd`` annotations; LIVECell has none as far as known)
rejects the image with a message. Unconfirmed: split sizes (about 3.2k / 0.57k / 1.5k images).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.io import read_image
from shardgen.base import DatasetInfo, Item, ItemError, LayoutError, Loaded
from shardgen.common import as_uint_image, found_in

INFO = DatasetInfo(
    name="livecell",
    title="LIVECell (Edlund et al. 2021)",
    modality="phase",
    channel_names=("phase",),
    splits=("train", "val", "test"),
    layout=(
        "annotations/LIVECell/livecell_coco_{train,val,test}.json + "
        "images/livecell_{train_val,test}_images/[<CellType>/]<CellType>_Phase_*.tif"
    ),
    paper_images=3188,
)

ANNOTATION_DIR = "annotations/LIVECell"
IMAGE_DIR_OF_SPLIT = {"train": "livecell_train_val_images", "val": "livecell_train_val_images",
                      "test": "livecell_test_images"}
# The splits whose images share a folder; image files no JSON lists are listed under the first.
SPLITS_OF_IMAGE_DIR = {"livecell_train_val_images": ("train", "val"), "livecell_test_images": ("test",)}
IMAGE_SUFFIXES = (".tif", ".tiff")
OVERLAP_THRESHOLD = 0.75


# ------------------------------------------------------------------------------------------------
# Overlap rule
# ------------------------------------------------------------------------------------------------


def resolve_overlaps(
    masks: Sequence[tuple[np.ndarray, np.ndarray]],
    shape: tuple[int, int],
    overlap_threshold: float = OVERLAP_THRESHOLD,
) -> np.ndarray:
    """One label image from possibly overlapping masks, by the Cellpose authors' LIVECell rule.

    Parameters
    ----------
    masks : sequence of (rows, cols)
        Each mask as the integer pixel coordinates it covers (``np.nonzero`` of a bool mask).
    shape : (H, W)
        Shape of the label image.
    overlap_threshold : float
        A mask whose fraction of pixels covered by more than one mask is at least this is dropped.

    Returns
    -------
    labels : (H, W) uint32
        0 = background; the surviving masks numbered 1..N in their input order.

    Notes
    -----
    1. Masks are visited from the smallest to the largest (ties: input order). A mask with at
       least ``overlap_threshold`` of its pixels where the coverage count is > 1 is dropped and
       the coverage count of its pixels is decremented, so that the masks visited after it no
       longer count it.
    2. Each pixel still covered by several surviving masks goes to the one whose mean pixel
       coordinate (computed on the whole mask, before any pixel is taken away) is nearest (ties:
       input order). Every other pixel keeps its only mask.

    Differences from the authors' ``remove_overlaps``: they pick the nearest mean among *all*
    surviving masks, so an overlap pixel can go to a mask that does not cover it; here it goes to
    the nearest of the masks that cover it. Empty masks (no pixel inside the image) get no id
    here; theirs gave them one (and a NaN mean).
    """
    height, width = shape
    pixels = [np.unique(np.ravel_multi_index((np.asarray(r), np.asarray(c)), shape)) for r, c in masks]

    # 1. Drop masks that lie mostly where others are.
    coverage = np.zeros(height * width, dtype=np.int32)
    for mask_pixels in pixels:
        coverage[mask_pixels] += 1  # indices are unique within a mask, so += counts each once
    areas = np.array([mask_pixels.size for mask_pixels in pixels], dtype=np.int64)
    keep = areas > 0
    for index in np.argsort(areas, kind="stable"):
        if not keep[index]:
            continue
        mask_pixels = pixels[index]
        overlapped = np.count_nonzero(coverage[mask_pixels] > 1)
        if overlapped / mask_pixels.size >= overlap_threshold:
            keep[index] = False
            coverage[mask_pixels] -= 1

    # 2. Paint the survivors; a pixel goes to the covering mask whose mean coordinate is nearest.
    labels = np.zeros(height * width, dtype=np.uint32)
    nearest = np.full(height * width, np.inf)
    for new_id, index in enumerate(np.flatnonzero(keep), start=1):
        mask_pixels = pixels[index]
        rows, cols = np.divmod(mask_pixels, width)
        squared_distance = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
        nearer = squared_distance < nearest[mask_pixels]
        labels[mask_pixels[nearer]] = new_id
        nearest[mask_pixels[nearer]] = squared_distance[nearer]
    return labels.reshape(shape)


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def find_items(root: Path, split: str) -> list[Item]:
    root = Path(root)
    _check_layout(root)
    if split not in INFO.splits:
        return []
    image_dir_name = IMAGE_DIR_OF_SPLIT[split]
    image_dir = root / "images" / image_dir_name
    files, duplicates = _list_images(root, image_dir)  # basename -> path relative to root

    items: list[Item] = []
    json_rel = f"{ANNOTATION_DIR}/livecell_coco_{split}.json"
    coco, problem = _read_json_or_problem(root, json_rel)
    if coco is not None:
        images, annotations_by_image, unknown_ids = coco
        for image_id, file_name, height, width in sorted(images, key=lambda entry: (entry[1], entry[0])):
            name = Path(file_name).name
            items.append(Item(
                source=files.get(name, f"{json_rel}[{file_name}]"),
                split=split,
                subset=_cell_type(name),
                ref=("image", files.get(name), json_rel, image_id, file_name, height, width,
                     annotations_by_image.get(image_id, ())),
            ))
        for image_id, count in unknown_ids:
            reason = (f"{json_rel}: {count} annotation(s) refer to image_id {image_id}, which the "
                      "file's 'images' list lacks; the JSON is inconsistent (re-download it)")
            items.append(Item(source=f"{json_rel}[image_id={image_id}]", split=split, ref=("reject", reason)))
    elif problem is not None and (root / json_rel).exists():
        items.append(Item(source=json_rel, split=split, ref=("reject", problem)))

    # Image files that no JSON of their folder lists: listed once, under the folder's first split.
    folder_splits = SPLITS_OF_IMAGE_DIR[image_dir_name]
    if split == folder_splits[0]:
        for rel, first in duplicates:
            reason = f"{rel}: a second file named like {first}; the annotations cannot tell them apart"
            items.append(Item(source=rel, split=split, subset=_cell_type(Path(rel).name), ref=("reject", reason)))
    if split == folder_splits[0] and files:
        listed, notes = set(), []
        for other in folder_splits:
            other_rel = f"{ANNOTATION_DIR}/livecell_coco_{other}.json"
            other_coco, other_problem = (coco, problem) if other == split else _read_json_or_problem(root, other_rel)
            if other_coco is None:
                notes.append(other_problem)
            else:
                listed.update(Path(entry[1]).name for entry in other_coco[0])
        jsons = " or ".join(f"livecell_coco_{other}.json" for other in folder_splits)
        for name, rel in sorted(files.items(), key=lambda pair: pair[1]):
            if name not in listed:
                reason = f"{rel}: image listed in no annotation file ({jsons})"
                if notes:
                    reason += "; " + "; ".join(notes)
                items.append(Item(source=rel, split=split, subset=_cell_type(name), ref=("reject", reason)))
    return items


def _check_layout(root: Path) -> None:
    if (root / ANNOTATION_DIR).is_dir() or any((root / "images" / d).is_dir() for d in SPLITS_OF_IMAGE_DIR):
        return
    found = found_in(root)
    raise LayoutError(f"{root}: not a LIVECell folder; expected {INFO.layout}; found {found}")


def _list_images(root: Path, image_dir: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Image files in ``image_dir`` and its cell-type folders: basename -> path relative to root,
    plus (path, first path) for files whose basename was already seen."""
    files: dict[str, str] = {}
    duplicates: list[tuple[str, str]] = []
    if not image_dir.is_dir():
        return files, duplicates
    folders = [image_dir] + sorted(p for p in image_dir.iterdir() if p.is_dir() and not _is_debris(p.name))
    for folder in folders:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and not _is_debris(entry.name) and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                rel = Path(entry.path).relative_to(root).as_posix()
                if entry.name in files:
                    duplicates.append((rel, files[entry.name]))
                else:
                    files[entry.name] = rel
    return files, duplicates


def _is_debris(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _cell_type(file_name: str) -> str:
    return file_name.split("_", 1)[0] if "_" in file_name else ""


def _read_json_or_problem(root: Path, json_rel: str):
    """(parsed, None) or (None, why not): a missing or unreadable JSON is not fatal for listing."""
    path = root / json_rel
    if not path.is_file():
        return None, f"{json_rel}: missing"
    try:
        return _read_coco(path), None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return None, (f"{json_rel}: cannot read this COCO annotation file ({type(error).__name__}: "
                      f"{error}); re-download it")


def _read_coco(path: Path):
    """(images, annotations_by_image, unknown_image_ids) from a COCO JSON, compactly.

    ``images``: (id, file_name, height, width) tuples. ``annotations_by_image``: image id ->
    tuple of (annotation id, parts), where parts is a tuple of float32 ``x0 y0 x1 y1 ...`` bytes
    (one per polygon of the annotation), or None when the segmentation is not a polygon list.
    """
    with path.open("rb") as fh:
        data = json.load(fh)
    images = [
        (entry["id"], str(entry["file_name"]), int(entry["height"]), int(entry["width"]))
        for entry in _entries(data, "images")
    ]
    known = {entry[0] for entry in images}
    by_image: dict = {}
    for annotation in _entries(data, "annotations"):
        segmentation = annotation.get("segmentation")
        if isinstance(segmentation, list):
            parts = tuple(np.asarray(part, dtype=np.float32).tobytes() for part in segmentation)
        else:
            parts = None
        by_image.setdefault(annotation["image_id"], []).append((annotation.get("id"), parts))
    unknown = [(image_id, len(anns)) for image_id, anns in by_image.items() if image_id not in known]
    annotations_by_image = {image_id: tuple(anns) for image_id, anns in by_image.items() if image_id in known}
    return images, annotations_by_image, sorted(unknown, key=lambda pair: str(pair[0]))


def _entries(data: dict, key: str) -> list[dict]:
    """``data[key]`` as a list of dicts, whether stored as a list or as a dict keyed by id."""
    if key not in data:
        raise KeyError(f"no {key!r} field (fields: {sorted(data)[:10]})")
    entries = data[key]
    if isinstance(entries, dict):
        entries = list(entries.values())
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise TypeError(f"{key!r} must be a list of objects or a dict of them")
    return entries


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def load(root: Path, item: Item) -> Loaded:
    root = Path(root)
    if item.ref[0] == "reject":
        raise ItemError(item.ref[1])
    _, image_rel, json_rel, image_id, file_name, height, width, annotations = item.ref
    if image_rel is None:
        raise ItemError(
            f"{json_rel}: lists image {file_name!r} (id {image_id}), but no such file is in "
            f"images/{IMAGE_DIR_OF_SPLIT[item.split]}/ (flat or in a cell-type folder); "
            "download and unpack images.zip"
        )
    image = _read_gray(root / image_rel)
    if image.shape[:2] != (height, width):
        raise ItemError(
            f"{image_rel}: image is {image.shape[0]}x{image.shape[1]} (HxW) but {json_rel} says "
            f"{height}x{width} for id {image_id}; the image and the annotation file do not match"
        )
    masks = [_mask_pixels(image_rel, annotation_id, parts, (height, width))
             for annotation_id, parts in annotations]
    return Loaded(image=image, labels=resolve_overlaps(masks, (height, width)))


def _read_gray(path: Path) -> np.ndarray:
    """(H, W, 1) image; a gray image saved as 3 equal channels is accepted as one channel."""
    image = as_uint_image(read_image(path))
    if image.shape[2] == 3 and np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(
        image[:, :, 0], image[:, :, 2]
    ):
        image = image[:, :, :1]
    if image.shape[2] != 1:
        raise ItemError(f"{path}: LIVECell images are 1-channel phase contrast; got shape {image.shape}")
    return np.ascontiguousarray(image)


def _mask_pixels(image_rel: str, annotation_id, parts, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) inside the image covered by one annotation's polygons (their union)."""
    if parts is None:
        raise ItemError(
            f"{image_rel}: annotation {annotation_id} has an RLE segmentation; only polygon "
            "segmentations are read (LIVECell ships polygons)"
        )
    polygons = []
    for part in parts:
        coords = np.frombuffer(part, dtype=np.float32)
        if coords.size % 2 or not np.all(np.isfinite(coords)):
            raise ItemError(
                f"{image_rel}: annotation {annotation_id} has a polygon with {coords.size} numbers "
                "or a non-finite one; expected x0, y0, x1, y1, ... pairs"
            )
        if coords.size >= 6:  # fewer than 3 vertices enclose nothing
            polygons.append(coords.reshape(-1, 2).astype(np.float64))
    empty = (np.zeros(0, np.intp), np.zeros(0, np.intp))
    if not polygons:
        return empty
    height, width = shape
    # Draw on a canvas the size of the polygons' bounding box (clipped to the image): cheap per mask.
    vertices = np.concatenate(polygons)
    x0, y0 = max(0, math.floor(vertices[:, 0].min())), max(0, math.floor(vertices[:, 1].min()))
    x1, y1 = min(width - 1, math.ceil(vertices[:, 0].max())), min(height - 1, math.ceil(vertices[:, 1].max()))
    if x1 < x0 or y1 < y0:
        return empty
    canvas = Image.new("L", (x1 - x0 + 1, y1 - y0 + 1), 0)
    draw = ImageDraw.Draw(canvas)
    for polygon in polygons:
        points = [(float(x - x0), float(y - y0)) for x, y in polygon]
        draw.polygon(points, fill=1, outline=1)
    rows, cols = np.nonzero(np.asarray(canvas))
    return rows + y0, cols + x0
