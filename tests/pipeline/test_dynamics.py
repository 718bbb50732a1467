"""Tests for pipeline.dynamics: kernels against their NumPy references, masks rebuilt from
ground-truth flows of real labels, documented options, input handling, and agreement with
Cellpose 4's ``compute_masks``."""

import csv

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import _dynamics_kernels as _kernels
from pipeline.dynamics import (
    _cluster_bins,
    _cluster_bins_reference,
    _fill_holes_reference,
    _follow_flows,
    _follow_flows_reference,
    _mean_flow_error_reference,
    _relabel_reference,
    flows_to_masks,
)
from pipeline.flows import masks_to_flows
from pipeline.metrics import average_precision

# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def ap50(masks_true: np.ndarray, masks_pred: np.ndarray) -> float:
    return float(average_precision(masks_true, masks_pred, 0.5)[0][0, 0])


def in_raster_order(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in raster order of their first pixel, as flows_to_masks numbers."""
    ids, first = np.unique(labels, return_index=True)
    first, ids = first[ids > 0], ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, dtype=np.int64)
    lut[ids[np.argsort(first)]] = np.arange(1, ids.size + 1)
    return lut[labels]


def network_like(labels: np.ndarray, noise: float = 0.0, seed: int = 0):
    """Ground-truth network outputs for `labels`: 5 x unit flows (plus Gaussian noise of sd
    `noise`) and a cellprob logit of +10 inside objects, -10 outside."""
    dP = 5 * masks_to_flows(labels)
    if noise:
        dP = dP + np.random.default_rng(seed).normal(0, noise, dP.shape).astype(np.float32)
    cellprob = np.where(labels > 0, 10.0, -10.0).astype(np.float32)
    return dP.astype(np.float32), cellprob


def balls(shape, specs) -> np.ndarray:
    """Label image of discs / balls: specs are (centre..., radius), numbered in order."""
    grids = np.indices(shape)
    labels = np.zeros(shape, dtype=np.uint16)
    for object_id, (*centre, radius) in enumerate(specs, start=1):
        labels[sum((g - c) ** 2 for g, c in zip(grids, centre)) <= radius**2] = object_id
    return labels


def cyto_labels(shared_data, name: str) -> np.ndarray:
    return np.asarray(Image.open(shared_data / "cellpose_cyto" / "train" / f"{name}_masks.png"))


def neurips_labels(shared_data, name: str) -> np.ndarray:
    path = shared_data / "neurips22" / "Train_Labeled" / "labels" / f"{name}_label.tiff"
    return tifffile.imread(path).astype(np.int32)


def dsb_labels(shared_data, image_id: str) -> np.ndarray:
    """DSB2018 stores one binary PNG per nucleus (no overlaps); paint them into one label image."""
    mask_files = sorted((shared_data / "dsb2018" / "stage1_train" / image_id / "masks").glob("*.png"))
    labels = None
    for object_id, path in enumerate(mask_files, start=1):
        mask = np.asarray(Image.open(path)) > 0
        labels = np.zeros(mask.shape, dtype=np.int32) if labels is None else labels
        labels[mask] = object_id
    return labels


def dsb_ids(shared_data, count: int) -> list[str]:
    with open(shared_data / "dsb2018" / "manifest.csv") as f:
        rows = [row for row in csv.DictReader(f) if int(row["height"]) <= 520]
    return [row["image_id"] for row in rows[:count]]


def random_hist(rng: np.random.Generator, shape) -> np.ndarray:
    """Sparse counts with scattered peaks, some touching, some at the border."""
    hist = rng.poisson(rng.choice([0.5, 3.0]), shape) * (rng.random(shape) < 0.5)
    peaks = tuple(rng.integers(0, size, 3 * max(shape)) for size in shape)
    np.add.at(hist, peaks, rng.integers(5, 40, peaks[0].size))
    return hist.astype(np.int32)


# ------------------------------------------------------------------------------------------------
# Kernels == references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(23, 31), (1, 17), (17, 1), (7, 9, 11), (2, 3, 1)])
@pytest.mark.parametrize("niter", [0, 1, 37])
def test_follow_flows_kernel_equals_reference_on_random_flows(seed, shape, niter):
    rng = np.random.default_rng(seed)
    dtype = np.float32 if seed % 2 else np.float64
    dP = rng.normal(0, 5, (len(shape),) + shape).astype(dtype)
    cellprob = rng.normal(0, 1, shape).astype(np.float32)
    starts, final = _follow_flows(dP, cellprob, 0.3, niter)
    starts_ref, final_ref = _follow_flows_reference(dP, cellprob, 0.3, niter)
    np.testing.assert_array_equal(starts, starts_ref)
    assert final.dtype == final_ref.dtype == np.float32
    # Same float64 arithmetic in the same order: equal to the last bit.
    np.testing.assert_array_equal(final, final_ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("niter", [200, 201])
def test_follow_flows_kernel_equals_reference_on_converging_flows(seed, niter):
    # Noisy flows toward centres: pixels reach fixed points and 2-cycles, so both stopping rules
    # and the parity of niter are exercised.
    labels = balls((48, 64), [(12, 14, 8), (30, 40, 12.5), (40, 10, 5)])
    dP, cellprob = network_like(labels, noise=0.5, seed=seed)
    starts, final = _follow_flows(dP, cellprob, 0.0, niter)
    starts_ref, final_ref = _follow_flows_reference(dP, cellprob, 0.0, niter)
    np.testing.assert_array_equal(starts, starts_ref)
    np.testing.assert_array_equal(final, final_ref)


@pytest.mark.parametrize("seed", range(2))
def test_follow_flows_kernel_equals_reference_in_3d_on_converging_flows(seed):
    labels = balls((14, 20, 22), [(6, 6, 6, 4.5), (7, 12, 15, 5.5)])
    dP, cellprob = network_like(labels, noise=0.5, seed=seed)
    starts, final = _follow_flows(dP, cellprob, 0.0, 100)
    np.testing.assert_array_equal(final, _follow_flows_reference(dP, cellprob, 0.0, 100)[1])


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(40, 50), (3, 60), (12, 20, 24)])
def test_cluster_bins_kernel_equals_reference(seed, shape):
    hist = random_hist(np.random.default_rng(seed), shape)
    bin_labels = _cluster_bins(hist)
    assert bin_labels.max() > 1  # the case is not trivial
    np.testing.assert_array_equal(bin_labels, _cluster_bins_reference(hist))


@pytest.mark.parametrize("seed", range(3))
def test_histogram_kernel_truncates_positions(seed):
    rng = np.random.default_rng(seed)
    shape = (13, 17)
    positions = (rng.random((500, 2)) * (np.array(shape) - 1)).astype(np.float32)
    bins, hist = _kernels.histogram_numba(positions, np.array(shape))
    expected = np.ravel_multi_index(tuple(np.floor(positions).astype(np.int64).T), shape)
    np.testing.assert_array_equal(bins, expected)
    np.testing.assert_array_equal(hist, np.bincount(expected, minlength=13 * 17))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape", [(30, 40), (12, 15), (8, 12, 14)])
def test_fill_holes_kernel_equals_reference(seed, shape):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 8, shape) * (rng.random(shape) < 0.85)
    labels = (ndi.grey_dilation(labels, size=2) * (rng.random(shape) < 0.9)).astype(np.uint32)
    # A closed shell of a new label around random content: it has a hole for sure.
    corner = [int(rng.integers(0, size - 5)) for size in shape]
    shell = np.zeros(shape, dtype=bool)
    shell[tuple(slice(c, c + 5) for c in corner)] = True
    shell[tuple(slice(c + 1, c + 4) for c in corner)] = False
    labels[shell] = 8
    filled = labels.copy()
    _kernels.fill_holes_numba(filled.reshape((-1,) + shape[-2:]), 8, len(shape) == 3)
    expected = _fill_holes_reference(labels)
    assert np.all(expected[tuple(slice(c + 1, c + 4) for c in corner)] == 8)
    np.testing.assert_array_equal(filled, expected)


@pytest.mark.parametrize("seed", range(4))
def test_relabel_kernel_equals_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 30, (20, 25)).astype(np.uint32)
    keep = rng.random(30) < 0.6
    relabelled, n = _kernels.relabel_numba(labels.ravel(), keep)
    expected = _relabel_reference(labels, keep)
    np.testing.assert_array_equal(relabelled.reshape(labels.shape), expected)
    assert n == expected.max() == np.count_nonzero(keep[1:] & np.isin(np.arange(1, 30), labels))


@pytest.mark.parametrize("seed", range(3))
def test_mean_flow_error_kernel_equals_reference(seed):
    rng = np.random.default_rng(seed)
    masks = (rng.integers(0, 6, (30, 40)) * (rng.random((30, 40)) < 0.8)).astype(np.uint32)
    flows = masks_to_flows(masks)
    dP = rng.normal(0, 5, (2, 30, 40)).astype(np.float32)
    np.testing.assert_array_equal(
        _kernels.mean_flow_error_numba(masks, flows, dP, 5.0, 7),
        _mean_flow_error_reference(masks, flows, dP, 7),
    )


# ------------------------------------------------------------------------------------------------
# Invariants on synthetic objects
# ------------------------------------------------------------------------------------------------


def test_well_separated_discs_are_recovered_exactly():
    labels = balls((96, 128), [(15, 15, 6), (15, 60, 9), (20, 105, 12.5), (60, 20, 4),
                               (65, 64, 15), (70, 110, 7.5), (90, 40, 5)])
    masks = flows_to_masks(*network_like(labels))
    np.testing.assert_array_equal(masks, in_raster_order(labels))


def test_well_separated_balls_are_recovered_exactly_in_3d():
    labels = balls((40, 64, 64), [(10, 15, 15, 7), (10, 45, 20, 6), (28, 20, 45, 7),
                                  (28, 48, 48, 8), (20, 32, 32, 5)])
    masks = flows_to_masks(*network_like(labels))
    assert masks.shape == labels.shape and masks.dtype == np.uint16
    np.testing.assert_array_equal(masks, in_raster_order(labels))


def test_min_size_drops_small_masks_and_nonpositive_disables_it():
    labels = np.zeros((64, 64), dtype=np.uint16)
    labels[8:13, 8:13] = 1  # 25 pixels
    labels[30:50, 30:50] = 2  # 400 pixels
    dP, cellprob = network_like(labels)
    assert set(np.unique(flows_to_masks(dP, cellprob, min_size=15))) == {0, 1, 2}
    assert set(np.unique(flows_to_masks(dP, cellprob, min_size=26))) == {0, 1}
    assert flows_to_masks(dP, cellprob, min_size=26)[40, 40] == 1  # renumbered
    assert flows_to_masks(dP, cellprob, min_size=0).max() == 2
    assert flows_to_masks(dP, cellprob, min_size=-1).max() == 2


def test_max_size_fraction_drops_large_masks():
    labels = np.zeros((40, 40), dtype=np.uint16)
    labels[2:32, 2:32] = 1  # 900 / 1600 = 56% of the image
    labels[34:39, 34:39] = 2
    dP, cellprob = network_like(labels)
    masks = flows_to_masks(dP, cellprob)  # default 0.4
    assert masks.max() == 1 and masks[36, 36] == 1 and masks[10, 10] == 0
    np.testing.assert_array_equal(flows_to_masks(dP, cellprob, max_size_fraction=0.6), labels)


def test_flow_threshold_drops_masks_with_wrong_flows_and_zero_disables_it():
    labels = balls((64, 64), [(32, 32, 8)])
    dP, cellprob = network_like(labels)
    # Flows a fifth as long still converge, but each pixel's squared error against the mask's
    # own unit flows is (1 - 0.2)^2 = 0.64.
    weak = 0.2 * dP
    assert flows_to_masks(weak, cellprob).max() == 0  # default threshold 0.4
    np.testing.assert_array_equal(flows_to_masks(weak, cellprob, flow_threshold=0), labels)
    np.testing.assert_array_equal(flows_to_masks(weak, cellprob, flow_threshold=0.7), labels)


def test_flow_check_is_skipped_in_3d():
    # As Cellpose (do_3D): 3-D flows are sums over slice predictions, not unit flows.
    labels = balls((20, 24, 24), [(10, 12, 12, 6)])
    dP, cellprob = network_like(labels)
    np.testing.assert_array_equal(flows_to_masks(0.2 * dP, cellprob), labels)


def test_holes_are_filled():
    labels = balls((48, 48), [(24, 24, 14)])
    dP, cellprob = network_like(labels)
    cellprob[22:26, 22:27] = -10.0  # a hole in the cell-probability map
    masks = flows_to_masks(dP, cellprob, flow_threshold=0)
    np.testing.assert_array_equal(masks, labels)


@pytest.mark.parametrize("shape", [(32, 40), (6, 16, 20)])
def test_empty_input_gives_all_zero_uint16(shape):
    dP = np.zeros((len(shape),) + shape, dtype=np.float32)
    below = np.full(shape, -1.0, dtype=np.float32)
    for masks in (flows_to_masks(dP, below), flows_to_masks(dP, -below)):
        # Nothing above threshold; or every pixel stays put, so no bin reaches a seed's count.
        assert masks.shape == shape and masks.dtype == np.uint16 and not masks.any()
    assert flows_to_masks(np.zeros((2, 0, 7), np.float32), np.zeros((0, 7), np.float32)).shape == (0, 7)


def test_output_is_uint32_past_65535_masks():
    # 256 x 256 separated 5x5 squares (stride 6): 65,536 masks.
    ids = np.arange(1, 256 * 256 + 1, dtype=np.uint32).reshape(256, 256)
    labels = np.zeros((256 * 6, 256 * 6), dtype=np.uint32)
    for dy in range(5):
        for dx in range(5):
            labels[dy::6, dx::6] = ids
    masks = flows_to_masks(*network_like(labels))
    assert masks.dtype == np.uint32 and masks.max() == 65536
    np.testing.assert_array_equal(masks, labels)
    assert flows_to_masks(*network_like(labels[:600, :600])).dtype == np.uint16


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), ny=st.integers(1, 40), nx=st.integers(1, 40),
       min_size=st.integers(-1, 30))
def test_masks_are_consecutive_and_at_least_min_size(seed, ny, nx, min_size):
    rng = np.random.default_rng(seed)
    labels = balls((ny, nx), [(rng.uniform(0, ny), rng.uniform(0, nx), rng.uniform(1, 9))
                              for _ in range(4)])
    dP, cellprob = network_like(labels, noise=float(rng.uniform(0, 2)), seed=seed)
    masks = flows_to_masks(dP, cellprob, min_size=min_size)
    assert masks.shape == (ny, nx) and masks.dtype == np.uint16
    counts = np.bincount(masks.ravel())
    assert np.all(counts[1:] >= max(min_size, 1))  # consecutive ids, none too small
    if masks.any():  # numbered in raster order of first pixel
        np.testing.assert_array_equal(masks, in_raster_order(masks))


# ------------------------------------------------------------------------------------------------
# Real labels: ground-truth flows rebuild the labels
# ------------------------------------------------------------------------------------------------

# Images where the Cellpose procedure itself rebuilds the labels (cellpose's compute_masks
# scores the same on them); on crowded ones such as 290 or 326 both lose ~2% of cells whose
# border pixels are sampled half a pixel into the neighbour and then fail the flow QC.
CYTO = ["095", "103", "128", "311"]
NEURIPS = ["cell_00225", "cell_00528"]


@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("name", CYTO)
def test_ground_truth_flows_rebuild_cyto_labels(shared_data, name, noise):
    labels = cyto_labels(shared_data, name)
    assert ap50(labels, flows_to_masks(*network_like(labels, noise))) >= 0.99


@pytest.mark.parametrize("noise", [0.0, 0.5])
@pytest.mark.parametrize("name", NEURIPS)
def test_ground_truth_flows_rebuild_neurips_labels(shared_data, name, noise):
    labels = neurips_labels(shared_data, name)
    assert ap50(labels, flows_to_masks(*network_like(labels, noise))) >= 0.99


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_ground_truth_flows_rebuild_dsb_labels(shared_data, noise):
    for image_id in dsb_ids(shared_data, 6):
        labels = dsb_labels(shared_data, image_id)
        assert ap50(labels, flows_to_masks(*network_like(labels, noise))) >= 0.99, image_id


# ------------------------------------------------------------------------------------------------
# Input handling
# ------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    dP = np.zeros((2, 8, 9), dtype=np.float32)
    cellprob = np.zeros((8, 9), dtype=np.float32)
    with pytest.raises(TypeError, match="numpy array"):
        flows_to_masks(dP.tolist(), cellprob)
    with pytest.raises(TypeError, match="float"):
        flows_to_masks(dP.astype(np.int16), cellprob)
    with pytest.raises(ValueError, match=r"\(2, Y, X\) or \(3, Z, Y, X\)"):
        flows_to_masks(np.zeros((3, 8, 9), np.float32), cellprob)
    with pytest.raises(ValueError, match=r"\(2, Y, X\) or \(3, Z, Y, X\)"):
        flows_to_masks(np.zeros((1, 2, 8, 9), np.float32), cellprob)
    with pytest.raises(ValueError, match="spatial shape"):
        flows_to_masks(dP, cellprob.T)
    for name, bad in (("dP", dP.copy()), ("cellprob", cellprob.copy())):
        bad.flat[5] = np.nan
        args = (bad, cellprob) if name == "dP" else (dP, bad)
        with pytest.raises(ValueError, match=f"{name} has 1 non-finite"):
            flows_to_masks(*args)
    with pytest.raises(TypeError, match="niter"):
        flows_to_masks(dP, cellprob, niter=200.0)
    with pytest.raises(ValueError, match="niter"):
        flows_to_masks(dP, cellprob, niter=-1)
    with pytest.raises(ValueError, match="flow_threshold"):
        flows_to_masks(dP, cellprob, flow_threshold=-0.1)
    with pytest.raises(TypeError, match="flow_threshold"):
        flows_to_masks(dP, cellprob, flow_threshold=None)
    with pytest.raises(ValueError, match="max_size_fraction"):
        flows_to_masks(dP, cellprob, max_size_fraction=0)


def test_float16_and_float64_inputs_give_the_same_masks():
    labels = balls((48, 64), [(12, 14, 8), (30, 40, 12.5)])
    dP, cellprob = network_like(labels)
    expected = flows_to_masks(dP, cellprob)
    assert expected.max() == 2
    for dtype in (np.float64, np.float16):
        masks = flows_to_masks(dP.astype(dtype), cellprob.astype(dtype))
        np.testing.assert_array_equal(masks, expected)


# ------------------------------------------------------------------------------------------------
# Agreement with Cellpose 4.2.1.1 (the values compared against come from the installed package)
# ------------------------------------------------------------------------------------------------


@pytest.mark.reference
def test_euler_steps_follow_cellpose_conventions(shared_data):
    cellpose_dynamics = pytest.importorskip("cellpose.dynamics")
    labels = cyto_labels(shared_data, "095")[:160, :200]
    dP, cellprob = network_like(labels, noise=0.5)
    foreground = cellprob > 0
    # Few steps, so no pixel has converged yet and ours must match Cellpose's Euler integration
    # (grid_sample, align_corners=False, on (L - 1)-normalised positions) step for step.
    reference = cellpose_dynamics.follow_flows(dP * foreground / 5.0, np.nonzero(foreground), niter=5)
    _, final = _follow_flows(dP, cellprob, 0.0, 5)
    np.testing.assert_allclose(final, reference.numpy().T, atol=2e-3)  # torch works in float32


@pytest.mark.reference
@pytest.mark.slow  # about 1 s each on 2 idle cores, but Cellpose's torch CPU time varies 10x with load
@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch, inside compute_masks
@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_masks_agree_with_cellpose_compute_masks(shared_data, noise):
    torch = pytest.importorskip("torch")
    cellpose_dynamics = pytest.importorskip("cellpose.dynamics")
    images = [dsb_labels(shared_data, i) for i in dsb_ids(shared_data, 3)]
    images.append(cyto_labels(shared_data, "095"))
    for labels in images:
        dP, cellprob = network_like(labels, noise)
        # compute_masks fills holes and drops small masks only with min_size > 0, as we do.
        expected = cellpose_dynamics.compute_masks(
            dP, cellprob, niter=200, min_size=15, device=torch.device("cpu")
        )
        assert ap50(expected, flows_to_masks(dP, cellprob)) >= 0.98


@pytest.mark.reference
def test_fill_holes_and_min_size_match_cellpose_in_2d():
    cellpose_utils = pytest.importorskip("cellpose.utils")
    from pipeline.dynamics import _remove_small_masks

    for seed in range(20):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 12, (30, 40)) * (rng.random((30, 40)) < 0.85)
        labels = (ndi.grey_dilation(labels, size=2) * (rng.random((30, 40)) < 0.9)).astype(np.uint32)
        labels = _relabel_reference(labels, np.ones(13, dtype=bool))
        ours, n = _remove_small_masks(labels, 5)
        _kernels.fill_holes_numba(ours[None], n, False)
        ours, _ = _remove_small_masks(ours, 5)
        expected = cellpose_utils.fill_holes_and_remove_small_masks(labels.copy(), min_size=5)
        np.testing.assert_array_equal(ours, expected)
