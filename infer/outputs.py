"""What ``python -m infer`` writes for each image, and where.

For an input ``<rel>/<stem>.<ext>`` (``<rel>`` its folder relative to the common folder of the
inputs), under ``--out``:

* ``<rel>/<stem>_masks.tif``: instance labels, uint16 in ImageJ's TIFF format (uint32 plain TIFF
  past 65,535 masks), zlib-compressed; Fiji and napari open it (``pipeline.io.write_labels``).
  A stack's masks are a label stack of the same shape, an ImageJ hyperstack along Z or T. The
  settings that made it, its size and cell count are kept in it as JSON (ImageJ's ``Info``,
  Image > Show Info in Fiji; ``pipeline.io.read_labels_info``). Written last, so its presence
  means the image is done.
* ``<rel>/<stem>_flows.npy``: (2, H, W) float32 dP = (dy, dx), 5 x unit flows (``--save-flows``);
  (2, N, H, W) for a stack of N planes (Cellpose's dP), (3, Z, Y, X) (dz, dy, dx) with ``--do-3d``.
* ``<rel>/<stem>_cellprob.npy``: (H, W) float32 logits (``--save-flows``); (N, H, W) for a stack.
* ``<rel>/<stem>_masks.png``: the masks as a 16-bit grayscale PNG (``--save-png``, Cellpose's
  ``--save_png``; 2-D images with at most 65,535 masks).
* ``<rel>/<stem>_outlines.png``: the image (1st-99th percentile, gray for one channel, RG for two,
  RGB for three) with each mask's outline in red (``--save-outlines``).
* ``<rel>/<stem>_rois.zip``: one ImageJ polygon ROI per mask, named by its label id zero-padded
  to equal width, for Fiji's ROI Manager (``--save-rois``).
* ``<rel>/<stem>_seg.npy``: the Cellpose GUI's file, as Cellpose 4's ``io.masks_flows_to_seg``
  writes it (``--save-seg``): open it in the GUI (``python -m cellpose``, File > Load masks),
  which loads the image from the absolute path in its ``filename``; correct the masks; the GUI
  saves ``<stem>_seg.npy`` next to the image, ready for ``make finetune``.

ROI polygons run along pixel edges (corner coordinates, as ImageJ's wand tool traces them), so
ImageJ's "pixel centre inside the polygon" rule gives back exactly the mask's pixels. A mask in
several 4-connected pieces is traced around its largest piece (Cellpose keeps the longest
contour); holes are not traced (``flows_to_masks`` fills them).

Every file is written to a temporary name in its folder and renamed, so an interrupted run
never leaves a half-written file under a final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import roifile
import scipy.ndimage
from PIL import Image

from pipeline.io import SEG_SUFFIX, normalize_percentile, write_labels

__all__ = [
    "MASKS_SUFFIX",
    "OutputPaths",
    "mask_polygons",
    "outline_overlay",
    "output_paths",
    "seg_record",
    "write_array",
    "write_masks",
    "write_overlay",
    "write_png_masks",
    "write_rois",
    "write_seg",
]

#: Appended to an input's stem to name its masks file (``x.png`` -> ``x_masks.tif``).
MASKS_SUFFIX = "_masks"
_OUTLINE_COLOUR = (255, 0, 0)


class OutputPaths(NamedTuple):
    """Where the outputs of one input image go."""

    masks: Path
    flows: Path
    cellprob: Path
    outlines: Path
    rois: Path
    seg: Path
    png: Path


def output_paths(out_dir: str | os.PathLike, relative_input: str | os.PathLike) -> OutputPaths:
    """Output files for the input at ``relative_input`` (relative to the inputs' common folder).

    >>> output_paths("out", "plate1/a.png").masks.as_posix()
    'out/plate1/a_masks.tif'
    """
    relative_input = Path(relative_input)
    stem = Path(out_dir) / relative_input.parent / relative_input.stem
    return OutputPaths(
        masks=stem.with_name(stem.name + MASKS_SUFFIX + ".tif"),
        flows=stem.with_name(stem.name + "_flows.npy"),
        cellprob=stem.with_name(stem.name + "_cellprob.npy"),
        outlines=stem.with_name(stem.name + "_outlines.png"),
        rois=stem.with_name(stem.name + "_rois.zip"),
        seg=stem.with_name(stem.name + SEG_SUFFIX),
        png=stem.with_name(stem.name + MASKS_SUFFIX + ".png"),
    )


# ------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------


def write_masks(
    path: str | os.PathLike, masks: np.ndarray, *, axes: str | None = None, info: str | None = None
) -> None:
    """(H, W) or (N, H, W) integer labels -> ImageJ-compatible TIFF (``pipeline.io.write_labels``).

    ``axes`` ``ZYX`` or ``TYX`` for a stack; ``info`` is text kept in the file.
    """
    write_labels(path, masks, axes=axes, info=info)


def write_png_masks(path: str | os.PathLike, masks: np.ndarray) -> None:
    """(H, W) labels -> 16-bit grayscale PNG, atomically (Cellpose's ``--save_png``)."""
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype.kind not in "iu":
        raise ValueError(f"masks must be (H, W) integer labels; got {masks.dtype} {masks.shape}")
    if masks.max(initial=0) > np.iinfo(np.uint16).max:
        raise ValueError(
            f"{path}: {int(masks.max())} masks do not fit a 16-bit PNG; use the _masks.tif"
        )
    with _atomic(path) as temporary:
        with open(temporary, "xb") as fh:
            Image.fromarray(masks.astype(np.uint16)).save(fh, format="PNG")


def write_array(path: str | os.PathLike, array: np.ndarray) -> None:
    """An array to ``.npy`` (no pickles), atomically."""
    with _atomic(path) as temporary:
        with open(temporary, "xb") as fh:
            np.save(fh, np.asarray(array), allow_pickle=False)


def write_overlay(path: str | os.PathLike, image: np.ndarray, masks: np.ndarray) -> None:
    """:func:`outline_overlay` of ``image`` and ``masks`` to an RGB PNG, atomically."""
    rgb = outline_overlay(image, masks)
    with _atomic(path) as temporary:
        with open(temporary, "xb") as fh:
            Image.fromarray(rgb, mode="RGB").save(fh, format="PNG")


def write_rois(path: str | os.PathLike, masks: np.ndarray) -> int:
    """One ImageJ polygon ROI per mask (:func:`mask_polygons`) to a ``.zip``; returns the count.

    Masks without pixels give no ROI; an image without masks gives an empty zip, which ImageJ
    opens as no ROIs (so that a finished image always has all its files).
    """
    polygons = mask_polygons(masks)
    width = len(str(max((label for label, _ in polygons), default=0)))
    rois = []
    for label, points in polygons:
        roi = roifile.ImagejRoi.frompoints(points, name=f"{label:0{width}d}")
        # A traced ROI is ImageJ's wand-tool outline: integer vertices on pixel corners.
        roi.roitype = roifile.ROI_TYPE.TRACED
        rois.append(roi)
    with _atomic(path) as temporary:
        roifile.roiwrite(temporary, rois, mode="w")
    return len(rois)


def write_seg(path: str | os.PathLike, record: dict) -> None:
    """:func:`seg_record`'s dict to a Cellpose ``_seg.npy`` (a pickled dict, as Cellpose saves it)."""
    with _atomic(path) as temporary:
        with open(temporary, "xb") as fh:
            np.save(fh, np.array(record, dtype=object), allow_pickle=True)


@contextlib.contextmanager
def _atomic(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` if the block succeeds."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: cannot write, folder {path.parent} does not exist")
    # Same folder, so the rename is atomic; the real suffix last, for writers that look at it.
    temporary = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# ------------------------------------------------------------------------------------------------
# Pictures and polygons (pure functions)
# ------------------------------------------------------------------------------------------------


def outline_overlay(image: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` scaled to its 1st-99th percentiles, mask outlines in red.

    ``image`` is (H, W) or (H, W, C), C <= 3 (one channel is gray, two are red and green).
    An outline pixel is a mask pixel with a 4-neighbour of another label or outside the image.

    >>> masks = np.zeros((5, 5), np.uint16); masks[1:4, 1:4] = 1
    >>> outline_overlay(np.zeros((5, 5)), masks)[..., 0]
    array([[  0,   0,   0,   0,   0],
           [  0, 255, 255, 255,   0],
           [  0, 255,   0, 255,   0],
           [  0, 255, 255, 255,   0],
           [  0,   0,   0,   0,   0]], dtype=uint8)
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 3 or image.shape[:2] != np.shape(masks):
        raise ValueError(
            f"image must be (H, W) or (H, W, C <= 3) with the masks' (H, W) {np.shape(masks)}; "
            f"got {image.shape}"
        )
    scaled = np.clip(np.nan_to_num(normalize_percentile(image)), 0.0, 1.0)
    pixels = np.round(scaled * 255).astype(np.uint8)
    if pixels.shape[2] == 1:
        rgb = np.repeat(pixels, 3, axis=2)
    else:
        rgb = np.zeros(pixels.shape[:2] + (3,), dtype=np.uint8)
        rgb[:, :, : pixels.shape[2]] = pixels
    rgb[outline_pixels(masks)] = _OUTLINE_COLOUR
    return rgb


def seg_record(
    image_path: str | os.PathLike,
    masks: np.ndarray,
    flows: np.ndarray,
    cellprob: np.ndarray,
    diameter: float | None,
) -> dict:
    """The dict Cellpose 4's ``io.masks_flows_to_seg`` saves for one 2-D image, from our outputs.

    Parameters
    ----------
    image_path : path
        The input image; stored, absolute, as ``filename`` (the GUI opens the image from it).
    masks : (H, W) integer labels, 0 = background.
    flows : (2, H, W) float32 dP = (dy, dx), 5 x unit flows, as the network predicts them.
    cellprob : (H, W) float32 logits.
    diameter : the diameter the image was rescaled by (given or estimated), or None.

    Returns
    -------
    dict
        Keys and layout of ``masks_flows_to_seg`` given Cellpose's own eval output
        ``[dx_to_circ(dP), dP, cellprob]``: ``outlines`` (each outline pixel holds its mask's
        id) and ``masks``, uint16 (uint32 past 65,534 masks); ``chan_choose`` [0, 0];
        ``ismanual`` (n_masks,) False; ``filename``; ``flows`` = [(1, H, W, 3) uint8 flow
        colours, (1, H, W) uint8 cellprob (1st-99th percentile to 0-255), (1, H, W, 3) uint8
        zeros, [], (3, H, W) float32 (dy, dx, cellprob)]; ``diameter``, which Cellpose leaves
        NaN and the GUI fills when it saves: here the diameter used, NaN without a rescale.

    Notes
    -----
    Outlines are the mask pixels with a 4-neighbour of another label (:func:`outline_pixels`).
    Cellpose traces each mask's outer contour with OpenCV instead, so a mask with a hole also
    outlines the hole here; the GUI redraws outlines from the masks when they are edited.
    """
    masks = np.asarray(masks)
    flows = np.asarray(flows, dtype=np.float32)
    cellprob = np.asarray(cellprob, dtype=np.float32)
    if masks.ndim != 2 or flows.shape != (2, *masks.shape) or cellprob.shape != masks.shape:
        raise ValueError(
            f"seg_record takes (H, W) masks, (2, H, W) flows and (H, W) cellprob; got "
            f"{masks.shape}, {flows.shape}, {cellprob.shape}"
        )
    outlines = masks * outline_pixels(masks)
    # Cellpose decides the width by the outlines' largest id, for masks too.
    label_dtype = np.uint16 if outlines.max(initial=0) < 2**16 - 1 else np.uint32
    cellprob_u8 = (np.clip(_normalize99(cellprob), 0, 1) * 255).astype(np.uint8)
    colours = _flow_colours(flows)
    return {
        "outlines": outlines.astype(label_dtype),
        "masks": masks.astype(label_dtype),
        "chan_choose": [0, 0],
        "ismanual": np.zeros(int(masks.max(initial=0)), bool),
        "filename": str(Path(image_path).resolve()),
        "flows": [
            colours[np.newaxis], cellprob_u8[np.newaxis], np.zeros_like(colours)[np.newaxis], [],
            np.concatenate((flows, cellprob[np.newaxis]), axis=0),
        ],
        "diameter": np.nan if diameter is None else float(diameter),
    }


def _normalize99(values: np.ndarray, downsample: bool = False) -> np.ndarray:
    """Cellpose's ``transforms.normalize99`` of a float32 (H, W) array, in its float32 arithmetic
    (its byte images must come out the same; ``pipeline.io.normalize_percentile`` takes the
    percentiles in float64)."""
    values = values.astype(np.float32, copy=True)
    sample = values
    if downsample and values.size > 224**3:
        sample = values[tuple(slice(None, None, max(1, n // 224)) for n in values.shape)]
    low, high = np.percentile(sample, 1), np.percentile(sample, 99)
    if high - low > 1e-3:
        values -= low
        values /= high - low
    else:
        values[:] = 0
    return values


def _flow_colours(flows: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: Cellpose's ``plot.dx_to_circ`` (direction as hue, magnitude as value)."""
    magnitude = 255 * np.clip(_normalize99(np.sqrt(np.sum(flows**2, axis=0)), downsample=True), 0, 1.0)
    angles = np.arctan2(flows[1], flows[0]) + np.pi
    magnitude /= 2
    rgb = np.zeros((*flows.shape[1:], 3), np.uint8)
    for channel in range(3):
        rgb[..., channel] = np.clip(magnitude * (np.cos(angles + channel * 2 * np.pi / 3) + 1), 0, 255).astype(np.uint8)
    return rgb


def outline_pixels(masks: np.ndarray) -> np.ndarray:
    """(H, W) bool: mask pixels with a 4-neighbour of a different label (outside counts as 0)."""
    masks = np.asarray(masks)
    padded = np.pad(masks, 1)
    centre = padded[1:-1, 1:-1]
    differs = (
        (padded[:-2, 1:-1] != centre)
        | (padded[2:, 1:-1] != centre)
        | (padded[1:-1, :-2] != centre)
        | (padded[1:-1, 2:] != centre)
    )
    return differs & (centre > 0)


def mask_polygons(masks: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """The outline of each mask as a polygon on pixel corners: ``[(label, (n, 2) int32 x, y)]``.

    Labels in increasing order. Each polygon is the outer boundary of the mask's largest
    4-connected piece, traced clockwise (on screen) along pixel edges from the top-left corner
    of the piece's first pixel, with only the corners where it turns. A pixel's centre lies
    inside the polygon exactly when the pixel is in that piece.

    >>> masks = np.zeros((4, 5), np.uint16); masks[1:3, 1:4] = 7
    >>> label, points = mask_polygons(masks)[0]
    >>> label, points.tolist()
    (7, [[1, 1], [4, 1], [4, 3], [1, 3]])
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype.kind not in "iu":
        raise ValueError(f"masks must be (H, W) integer labels; got {masks.dtype} {masks.shape}")
    polygons = []
    for index, box in enumerate(scipy.ndimage.find_objects(masks)):
        if box is None:
            continue
        label = index + 1
        piece = _largest_piece(masks[box] == label)
        corners = _trace_outer_boundary(np.pad(piece, 1))
        offset = np.array([box[1].start - 1, box[0].start - 1])  # x, y; -1 undoes the pad
        polygons.append((label, (corners + offset).astype(np.int32)))
    return polygons


def _largest_piece(inside: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a bool image (the first of equal ones)."""
    pieces, n_pieces = scipy.ndimage.label(inside)
    if n_pieces == 1:
        return inside
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return pieces == int(np.argmax(sizes))


def _trace_outer_boundary(inside: np.ndarray) -> np.ndarray:
    """Corner polygon (n, 2) as (x, y) around a 4-connected piece, with a background border.

    Walk along pixel edges with the piece on the right-hand side (y points down). At each
    corner, look at the two pixels ahead: if the one ahead on the right is outside, turn right;
    if both are inside, turn left; otherwise go straight. Turning right when only the left one
    is inside keeps diagonal neighbours apart (4-connectivity).
    """
    rows, cols = np.nonzero(inside)
    start = (int(rows[0]), int(cols[0]))  # top-left corner of the first pixel in raster order
    y, x = start
    dy, dx = 0, 1  # along the first pixel's top edge: the pixel below (on the right) is inside
    corners = [(x, y)]
    for _ in range(4 * rows.size + 4):  # a piece of n pixels has at most 4n edges
        right_y, right_x = dx, -dy  # the right-hand direction when facing (dy, dx)
        ahead_right = inside[y + (dy + right_y - 1) // 2, x + (dx + right_x - 1) // 2]
        ahead_left = inside[y + (dy - right_y - 1) // 2, x + (dx - right_x - 1) // 2]
        if not ahead_right:
            new_dy, new_dx = right_y, right_x
        elif ahead_left:
            new_dy, new_dx = -right_y, -right_x
        else:
            new_dy, new_dx = dy, dx
        if (new_dy, new_dx) != (dy, dx):
            corners.append((x, y))
        dy, dx = new_dy, new_dx
        y, x = y + dy, x + dx
        if (y, x) == start:
            return np.array(corners, dtype=np.int64)
    raise AssertionError("boundary trace did not close")  # unreachable for a 4-connected piece
