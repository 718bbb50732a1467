"""Tests for infer.outputs: file names, the masks TIFF (ImageJ-compatible), flows .npy, the
outline PNG, and the ImageJ ROI zip (read back with roifile, one exact polygon per mask)."""

import numpy as np
import pytest
import roifile
import scipy.ndimage as ndi
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from infer.outputs import (
    mask_polygons,
    outline_overlay,
    outline_pixels,
    output_paths,
    write_array,
    write_masks,
    write_overlay,
    write_rois,
)
from pipeline.synthetic import generate


def rasterise(points: np.ndarray, shape) -> np.ndarray:
    """Pixels whose centre is inside the polygon (even-odd rule), as ImageJ fills a polygon ROI."""
    rows, cols = np.indices(shape)
    centre_y, centre_x = rows + 0.5, cols + 0.5
    inside = np.zeros(shape, dtype=bool)
    x0, y0 = points[:, 0].astype(float), points[:, 1].astype(float)
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for xa, ya, xb, yb in zip(x0, y0, x1, y1):
        if ya == yb:
            continue
        crosses = (centre_y >= min(ya, yb)) & (centre_y < max(ya, yb))
        x_at = xa + (centre_y - ya) * (xb - xa) / (yb - ya)
        inside ^= crosses & (centre_x < x_at)
    return inside


def traced_region(masks: np.ndarray, label: int) -> np.ndarray:
    """What a mask's polygon should cover: its largest 4-connected piece, with holes (background
    not 8-connected to the outside) filled."""
    pieces, n_pieces = ndi.label(masks == label)
    sizes = np.bincount(pieces.ravel())
    sizes[0] = 0
    return ndi.binary_fill_holes(pieces == np.argmax(sizes), structure=np.ones((3, 3)))


def random_labels(seed: int, shape=(40, 50)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blobs = ndi.binary_opening(rng.random(shape) < 0.6)
    labels, _ = ndi.label(blobs)
    # Split some objects with a second label, so that masks touch each other.
    labels[labels % 3 == 0] += 100 * (rng.random(np.count_nonzero(labels % 3 == 0)) < 0.2)
    return labels.astype(np.uint16)


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------


def test_output_paths_mirror_the_relative_input(tmp_path):
    paths = output_paths(tmp_path, "plate 1/well.A1.ome.tif")
    folder = tmp_path / "plate 1"
    assert paths.masks == folder / "well.A1.ome_masks.tif"
    assert paths.flows == folder / "well.A1.ome_flows.npy"
    assert paths.cellprob == folder / "well.A1.ome_cellprob.npy"
    assert paths.outlines == folder / "well.A1.ome_outlines.png"
    assert paths.rois == folder / "well.A1.ome_rois.zip"


# ------------------------------------------------------------------------------------------------
# Polygons
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(8))
def test_each_polygon_covers_exactly_its_mask(seed):
    masks = random_labels(seed)
    polygons = mask_polygons(masks)
    assert [label for label, _ in polygons] == sorted(set(np.unique(masks)) - {0})
    for label, points in polygons:
        assert points.dtype == np.int32 and points.shape[1] == 2
        np.testing.assert_array_equal(
            rasterise(points, masks.shape), traced_region(masks, label), err_msg=f"label {label}"
        )


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_polygon_of_any_small_shape_is_exact(height, width, seed):
    inside = np.random.default_rng(seed).random((height, width)) < 0.6
    masks = inside.astype(np.uint8) * 5
    if not inside.any():
        assert mask_polygons(masks) == []
        return
    ((label, points),) = mask_polygons(masks)
    assert label == 5
    np.testing.assert_array_equal(rasterise(points, masks.shape), traced_region(masks, 5))
    # Only turning corners are kept: consecutive edges alternate between horizontal and vertical.
    edges = np.diff(np.vstack([points, points[:1]]), axis=0)
    horizontal = edges[:, 1] == 0
    assert np.all((edges[:, 0] == 0) != horizontal) and np.all(horizontal != np.roll(horizontal, 1))


def test_polygon_runs_on_pixel_corners():
    masks = np.zeros((4, 5), np.uint16)
    masks[1:3, 1:4] = 7
    assert [(label, points.tolist()) for label, points in mask_polygons(masks)] == [
        (7, [[1, 1], [4, 1], [4, 3], [1, 3]])
    ]
    masks[:] = 0
    masks[0, 0] = 2  # a single pixel at the image corner
    assert mask_polygons(masks)[0][1].tolist() == [[0, 0], [1, 0], [1, 1], [0, 1]]


def test_polygons_refuse_non_label_input():
    with pytest.raises(ValueError, match="integer labels"):
        mask_polygons(np.zeros((3, 3), np.float32))


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def test_rois_read_back_one_polygon_per_mask(tmp_path):
    _, masks = generate("nuclei", (160, 200), seed=3)
    masks = masks.astype(np.uint16)
    count = write_rois(tmp_path / "x_rois.zip", masks)
    rois = roifile.roiread(tmp_path / "x_rois.zip")
    labels = sorted(set(np.unique(masks)) - {0})
    assert count == len(rois) == len(labels) > 10
    width = len(str(max(labels)))
    assert [roi.name for roi in rois] == [f"{label:0{width}d}" for label in labels]
    for roi, label in zip(rois, labels):
        assert roi.roitype == roifile.ROI_TYPE.TRACED
        expected = traced_region(masks, label)
        np.testing.assert_array_equal(rasterise(roi.coordinates(), masks.shape), expected)
    assert not [p for p in tmp_path.iterdir() if p.name != "x_rois.zip"]  # no temporary left


def test_rois_of_an_empty_image_are_an_empty_zip(tmp_path):
    assert write_rois(tmp_path / "e_rois.zip", np.zeros((10, 10), np.uint16)) == 0
    assert roifile.roiread(tmp_path / "e_rois.zip") == []


def test_masks_tiff_is_imagej_compatible(tmp_path):
    _, masks = generate("cyto", (90, 120), seed=1)
    write_masks(tmp_path / "x_masks.tif", masks)
    with tifffile.TiffFile(tmp_path / "x_masks.tif") as tif:
        assert tif.is_imagej
        stored = tif.asarray()
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(stored, masks)


def test_arrays_round_trip(tmp_path):
    flows = np.random.default_rng(0).normal(size=(2, 30, 40)).astype(np.float32)
    write_array(tmp_path / "x_flows.npy", flows)
    loaded = np.load(tmp_path / "x_flows.npy", allow_pickle=False)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, flows)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_array(tmp_path / "missing" / "x.npy", flows)


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_overlay_png_opens_and_marks_outlines(tmp_path, channels):
    image = np.random.default_rng(channels).integers(0, 60000, (50, 70, channels)).astype(np.uint16)
    masks = np.zeros((50, 70), np.uint16)
    masks[5:20, 5:30] = 1
    masks[20:40, 10:60] = 2  # touches mask 1
    write_overlay(tmp_path / "x_outlines.png", image, masks)
    with Image.open(tmp_path / "x_outlines.png") as png:
        assert png.mode == "RGB" and png.size == (70, 50)
        rgb = np.asarray(png)
    outline = outline_pixels(masks)
    assert (rgb[outline] == [255, 0, 0]).all()
    without_masks = outline_overlay(image, np.zeros_like(masks))
    np.testing.assert_array_equal(rgb[~outline], without_masks[~outline])
    if channels == 1:  # gray
        assert (rgb[~outline][:, 0] == rgb[~outline][:, 2]).all()
    if channels == 2:  # red and green only
        assert (rgb[~outline][:, 2] == 0).all()


def test_outline_pixels_border_between_masks_and_image_edge():
    masks = np.array([[1, 1, 2, 2],
                      [1, 1, 2, 2],
                      [1, 1, 0, 0],
                      [1, 1, 0, 0]], np.uint16)
    # Every pixel of these 2-pixel-wide masks touches another label, background or the edge.
    np.testing.assert_array_equal(outline_pixels(masks), masks > 0)
    masks = np.zeros((5, 5), np.uint16)
    masks[1:4, 1:4] = 3
    assert outline_pixels(masks).sum() == 8 and not outline_pixels(masks)[2, 2]


def test_overlay_checks_shapes():
    with pytest.raises(ValueError, match="masks"):
        outline_overlay(np.zeros((5, 6)), np.zeros((6, 5), np.uint16))


# ------------------------------------------------------------------------------------------------
# Cellpose GUI files
# ------------------------------------------------------------------------------------------------


def prediction_like(seed=0, shape=(70, 90)):
    """Masks of a synthetic image, its ground-truth flows x 5 and a cellprob, as predict gives."""
    from pipeline.flows import masks_to_flows

    _, masks = generate("nuclei", shape, seed=seed)
    rng = np.random.default_rng(seed)
    flows = (5 * masks_to_flows(masks) + rng.normal(0, 0.3, (2, *shape))).astype(np.float32)
    cellprob = np.where(masks > 0, 3.0, -3.0).astype(np.float32) + rng.normal(0, 1, shape).astype(np.float32)
    return masks.astype(np.uint16), flows, cellprob


def test_seg_record_is_what_cellpose_masks_flows_to_seg_saves(tmp_path):
    # The expected file is Cellpose 4.2.1.1's own io.masks_flows_to_seg, given what its eval
    # returns for a 2-D image: flows = [plot.dx_to_circ(dP), dP, cellprob].
    io = pytest.importorskip("cellpose.io")
    plot = pytest.importorskip("cellpose.plot")
    from infer.outputs import seg_record, write_seg

    masks, flows, cellprob = prediction_like()
    image_path = tmp_path / "cells.tif"
    io.masks_flows_to_seg(np.zeros(masks.shape, np.float32), masks, [plot.dx_to_circ(flows), flows, cellprob],
                          str(image_path))
    theirs = np.load(tmp_path / "cells_seg.npy", allow_pickle=True).item()
    write_seg(tmp_path / "ours_seg.npy", seg_record(image_path, masks, flows, cellprob, diameter=None))
    ours = np.load(tmp_path / "ours_seg.npy", allow_pickle=True).item()
    assert sorted(ours) == sorted(theirs)
    assert ours["filename"] == theirs["filename"] and ours["chan_choose"] == theirs["chan_choose"]
    assert np.isnan(ours["diameter"]) and np.isnan(theirs["diameter"])
    for key in ("masks", "ismanual"):
        assert ours[key].dtype == theirs[key].dtype
        np.testing.assert_array_equal(ours[key], theirs[key])
    assert len(ours["flows"]) == len(theirs["flows"]) == 5 and ours["flows"][3] == theirs["flows"][3] == []
    for index in (0, 1, 2, 4):
        assert ours["flows"][index].dtype == theirs["flows"][index].dtype, index
        np.testing.assert_array_equal(ours["flows"][index], theirs["flows"][index])
    # Outlines: Cellpose traces outer contours with OpenCV, we take 4-neighbour borders; on
    # these convex nuclei they are the same pixels (see seg_record's notes).
    assert ours["outlines"].dtype == theirs["outlines"].dtype
    assert np.mean(ours["outlines"] != theirs["outlines"]) < 0.002


def test_seg_record_checks_shapes_and_keeps_the_diameter(tmp_path):
    from infer.outputs import seg_record

    masks, flows, cellprob = prediction_like(seed=1)
    assert seg_record(tmp_path / "a.png", masks, flows, cellprob, diameter=17.25)["diameter"] == 17.25
    with pytest.raises(ValueError, match="seg_record takes"):
        seg_record(tmp_path / "a.png", masks, flows[:1], cellprob, None)
