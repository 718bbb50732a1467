"""Tests for pipeline.flows: the numba kernel against the NumPy reference, invariants of the
definition, input handling, and parity with Cellpose 4's ``masks_to_flows_gpu``."""

import fastremap
import numpy as np
import pytest
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.flows import _masks_to_flows_reference, diffusion_steps, masks_to_flows

# ------------------------------------------------------------------------------------------------
# Label image builders
# ------------------------------------------------------------------------------------------------


def random_labels(rng: np.random.Generator, shape, n_objects: int, max_size: int = 12) -> np.ndarray:
    """Random ellipses and boxes painted over each other: touching objects, borders, fragments."""
    labels = np.zeros(shape, dtype=np.int32)
    grids = np.indices(shape)
    for object_id in range(1, n_objects + 1):
        centre = [rng.uniform(0, s) for s in shape]
        radii = [rng.uniform(0.5, max_size / 2) for _ in shape]
        if rng.random() < 0.5:
            inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii)) <= 1.0
        else:
            inside = np.all([np.abs(g - c) <= r for g, c, r in zip(grids, centre, radii)], axis=0)
        labels[inside] = object_id
    return labels


def piece_centres(labels: np.ndarray) -> tuple[np.ndarray, set[int]]:
    """Boolean image of piece centres (as the docstring defines them), and ids with a tied centre."""
    ndim = labels.ndim
    structure = ndi.generate_binary_structure(ndim, ndim if ndim == 2 else 1)
    centres = np.zeros(labels.shape, dtype=bool)
    tied = set()
    for object_id in np.unique(labels[labels > 0]):
        pieces, n = ndi.label(labels == object_id, structure=structure)
        for p in range(1, n + 1):
            points = np.stack(np.nonzero(pieces == p), axis=1)
            offsets = len(points) * points - points.sum(axis=0)
            dist = (offsets.astype(np.float64) ** 2).sum(axis=1)
            centres[tuple(points[np.argmin(dist)])] = True
            if np.count_nonzero(dist == dist.min()) > 1:
                tied.add(int(object_id))
    return centres, tied


def real_cyto_labels(shared_data, index: int = 0) -> np.ndarray:
    files = sorted((shared_data / "cellpose_cyto" / "train").glob("*_masks.png"))
    return np.asarray(Image.open(files[index]))


# ------------------------------------------------------------------------------------------------
# Kernel == reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_kernel_equals_reference_2d(seed):
    rng = np.random.default_rng(seed)
    labels = random_labels(rng, (int(rng.integers(20, 60)), int(rng.integers(20, 60))), 12)
    # The kernel and the reference add in the same order, so they agree to the last bit.
    np.testing.assert_array_equal(masks_to_flows(labels), _masks_to_flows_reference(labels))


@pytest.mark.parametrize("seed", range(4))
def test_kernel_equals_reference_3d(seed):
    rng = np.random.default_rng(100 + seed)
    labels = random_labels(rng, (10, 18, 16), 6, max_size=8)
    np.testing.assert_array_equal(masks_to_flows(labels), _masks_to_flows_reference(labels))


def test_kernel_equals_reference_on_real_labels(shared_data):
    labels = real_cyto_labels(shared_data, 0)[:160, :160]
    np.testing.assert_array_equal(masks_to_flows(labels), _masks_to_flows_reference(labels))


# ------------------------------------------------------------------------------------------------
# Properties of the definition
# ------------------------------------------------------------------------------------------------


def assert_flow_properties(labels: np.ndarray, flows: np.ndarray) -> None:
    assert flows.dtype == np.float32
    assert flows.shape == (labels.ndim,) + labels.shape
    assert np.isfinite(flows).all()
    assert not flows[:, labels == 0].any(), "flows must be exactly 0 on background"
    norm = np.sqrt((flows.astype(np.float64) ** 2).sum(axis=0))[labels > 0]
    unit = np.abs(norm - 1.0) < 1e-5
    assert np.all(unit | (norm == 0.0)), "inside objects flows are unit length or exactly 0"
    # Zero flow only where the docstring says: a piece's centre (by symmetry), or a pixel whose
    # edge neighbours are all background, so both central differences compare 0 with 0.
    # Pixels next to another object are exempt: two mirror-image neighbours can cancel exactly.
    centres, _ = piece_centres(labels)
    fg = np.pad(labels > 0, 1)
    edge_neighbour = np.zeros(labels.shape, dtype=bool)
    for axis in range(labels.ndim):
        for shift in (-1, 1):
            edge_neighbour |= np.roll(fg, shift, axis=axis)[(slice(1, -1),) * labels.ndim]
    low = ndi.minimum_filter(np.where(labels > 0, labels, labels.max() + 1), size=3, mode="nearest")
    high = ndi.maximum_filter(labels, size=3, mode="nearest")
    next_to_other = (low != labels) | ((high != labels) & (high > 0))
    allowed_zero = (centres | ~edge_neighbour | next_to_other)[labels > 0]
    unexpected = (norm == 0.0) & ~allowed_zero
    assert not unexpected.any(), f"{unexpected.sum()} unexpected zero-flow pixels"


label_images = st.builds(
    lambda seed, h, w, n: random_labels(np.random.default_rng(seed), (h, w), n),
    st.integers(0, 2**32 - 1),
    st.integers(1, 48),
    st.integers(1, 48),
    st.integers(0, 15),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=label_images)
def test_properties_on_random_labels(labels):
    assert_flow_properties(labels, masks_to_flows(labels))


def rotate_flows_2d(flows: np.ndarray) -> np.ndarray:
    """Flows of np.rot90(labels) from flows of labels.

    rot90 maps pixel (y, x) of the original to (W - 1 - x, y), so a displacement (dy, dx)
    becomes (-dx, dy) and the field is carried along by the same rotation.
    """
    return np.stack([np.rot90(-flows[1]), np.rot90(flows[0])])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(labels=label_images)
def test_rotation_by_90_degrees_rotates_the_field(labels):
    flows = masks_to_flows(labels)
    rotated = masks_to_flows(np.ascontiguousarray(np.rot90(labels)))
    expected = rotate_flows_2d(flows)
    # A centre tie (two pixels equally near the mean) is broken in raster order, which a
    # rotation changes; such objects, and pixels next to them (whose gradient sees their heat),
    # are left out of the comparison. So are the centres themselves: there the gradient is a
    # difference of two nearly equal heats, and its direction is rounding noise.
    centres, tied = piece_centres(labels)
    affected = np.isin(labels, list(tied))
    affected = ndi.binary_dilation(affected, np.ones((3, 3), bool)) | centres
    compare = np.rot90(~affected)
    np.testing.assert_allclose(rotated[:, compare], expected[:, compare], atol=2e-5)


def test_rotation_3d_in_each_plane():
    labels = random_labels(np.random.default_rng(7), (12, 14, 16), 5, max_size=9)
    centres, tied = piece_centres(labels)
    affected = ndi.binary_dilation(np.isin(labels, list(tied))) | centres
    flows = masks_to_flows(labels)
    for axes in [(1, 2), (0, 1), (0, 2)]:
        a, b = axes
        rotated = masks_to_flows(np.ascontiguousarray(np.rot90(labels, axes=axes)))
        expected = flows.copy()
        expected[a], expected[b] = -flows[b], flows[a]
        expected = np.stack([np.rot90(e, axes=axes) for e in expected])
        compare = np.rot90(~affected, axes=axes)
        np.testing.assert_allclose(rotated[:, compare], expected[:, compare], atol=2e-5)


def test_flows_point_toward_the_centre_of_a_disc():
    yy, xx = np.mgrid[:41, :41]
    labels = (((yy - 20) ** 2 + (xx - 20) ** 2) <= 15**2).astype(np.uint8)
    flows = masks_to_flows(labels)
    inside = labels > 0
    inside[20, 20] = False
    toward = np.stack([20 - yy, 20 - xx]).astype(np.float64)
    toward /= np.linalg.norm(toward, axis=0, keepdims=True) + 1e-12
    cosine = (flows * toward).sum(axis=0)[inside]
    assert cosine.min() > 0.7  # every pixel heads inward
    assert cosine.mean() > 0.97  # and almost radially on a disc
    assert np.all(flows[:, 20, 20] == 0)  # the centre of a symmetric disc has no gradient


def test_diffusion_steps_follow_each_objects_own_box():
    # Cellpose: n_iter = 2 * (h + w + 2) from the box; 3-D: 6 * (d + h + w + 3).
    assert diffusion_steps((10, 4)) == 32
    assert diffusion_steps((3, 10, 4)) == 120
    with pytest.raises(ValueError):
        diffusion_steps((3,))


def test_small_object_unaffected_by_a_large_one_far_away():
    """The step count is per object: a large object elsewhere does not change a small one."""
    small = np.zeros((30, 120), dtype=np.uint16)
    small[10:16, 5:12] = 1
    both = small.copy()
    both[2:28, 40:118] = 2
    np.testing.assert_array_equal(masks_to_flows(small)[:, small == 1], masks_to_flows(both)[:, small == 1])


# ------------------------------------------------------------------------------------------------
# Edge cases the issue names
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64])
def test_any_integer_dtype(dtype):
    labels = random_labels(np.random.default_rng(3), (32, 40), 10)
    expected = masks_to_flows(labels.astype(np.int32))
    np.testing.assert_array_equal(masks_to_flows(labels.astype(dtype)), expected)


def test_non_consecutive_and_huge_ids_give_the_same_flows():
    labels = random_labels(np.random.default_rng(4), (40, 40), 12)
    expected = masks_to_flows(labels)
    ids = np.unique(labels[labels > 0]).astype(np.int64)
    for new_ids in (ids * 7 + 1000, ids**2 * 2**33):  # sparse ids; ids far past the dense table
        remapped = np.zeros(labels.shape, dtype=np.int64)
        for old, new in zip(ids, new_ids):
            remapped[labels == old] = new
        np.testing.assert_array_equal(masks_to_flows(remapped), expected)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (7, 9), (1, 1), (3, 4, 5)])
def test_empty_images(shape):
    flows = masks_to_flows(np.zeros(shape, dtype=np.uint16))
    assert flows.shape == (len(shape),) + shape
    assert flows.dtype == np.float32 and not flows.any()


def test_one_pixel_objects_are_zero_and_do_not_break_neighbours():
    labels = np.zeros((9, 9), dtype=np.uint16)
    labels[4, 4] = 3  # isolated: no gradient anywhere
    labels[0, 0] = 9  # in a corner
    labels[7, 1:8] = 5
    labels[8, 4] = 6  # touching object 5: sees its heat, so it does get a direction
    flows = masks_to_flows(labels)
    assert np.all(flows[:, 4, 4] == 0) and np.all(flows[:, 0, 0] == 0)
    assert np.isclose(np.hypot(*flows[:, 8, 4]), 1.0)
    assert_flow_properties(labels, flows)


def test_objects_on_the_border_match_a_padded_image():
    """Outside the image counts as background, so padding with background changes nothing."""
    labels = random_labels(np.random.default_rng(5), (30, 30), 14, max_size=16)
    assert labels[0].any() and labels[-1].any()
    padded = np.pad(labels, 3)
    np.testing.assert_array_equal(masks_to_flows(padded)[:, 3:-3, 3:-3], masks_to_flows(labels))


def test_object_with_a_hole():
    yy, xx = np.mgrid[:31, :31]
    r2 = (yy - 15) ** 2 + (xx - 15) ** 2
    labels = ((r2 <= 14**2) & (r2 > 4**2)).astype(np.uint8)  # a ring around a background hole
    flows = masks_to_flows(labels)
    assert_flow_properties(labels, flows)
    assert not flows[:, r2 <= 16].any()


def test_object_in_several_pieces_flows_to_each_pieces_centre():
    labels = np.zeros((30, 60), dtype=np.uint16)
    labels[5:20, 5:18] = 4
    labels[8:25, 35:55] = 4  # the same id, far away
    alone_left = np.where(labels[:, :30] > 0, 1, 0)
    alone_right = np.where(labels[:, 30:] > 0, 1, 0)
    flows = masks_to_flows(labels)
    np.testing.assert_array_equal(flows[:, :, :30], masks_to_flows(alone_left))
    np.testing.assert_array_equal(flows[:, :, 30:], masks_to_flows(alone_right))
    assert_flow_properties(labels, flows)


def test_bad_input_is_rejected_with_a_clear_message():
    with pytest.raises(TypeError, match="integer"):
        masks_to_flows(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="binary mask"):
        masks_to_flows(np.zeros((4, 4), dtype=bool))
    with pytest.raises(ValueError, match="non-negative"):
        masks_to_flows(np.array([[0, -2], [1, 1]], dtype=np.int16))
    with pytest.raises(ValueError, match=r"\(Y, X\) or \(Z, Y, X\)"):
        masks_to_flows(np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(TypeError, match="numpy array"):
        masks_to_flows([[0, 1], [1, 1]])


def test_input_is_not_modified_and_views_work():
    labels = random_labels(np.random.default_rng(6), (40, 50), 10)
    before = labels.copy()
    view = labels[::2, 5:]
    np.testing.assert_array_equal(masks_to_flows(view), masks_to_flows(view.copy()))
    np.testing.assert_array_equal(labels, before)


# ------------------------------------------------------------------------------------------------
# Parity with Cellpose 4
# ------------------------------------------------------------------------------------------------


@pytest.mark.reference
@pytest.mark.parametrize("index", [0, 5, 14])
def test_parity_with_cellpose_on_real_labels(shared_data, index):
    cellpose_dynamics = pytest.importorskip("cellpose.dynamics")
    torch = pytest.importorskip("torch")
    labels = real_cyto_labels(shared_data, index)
    ours = masks_to_flows(labels)
    theirs = cellpose_dynamics.masks_to_flows_gpu(labels, device=torch.device("cpu"))[0]
    cosine = (ours * theirs).sum(axis=0)[labels > 0]
    # The goal: mean cosine >= 0.97 inside objects. What differs is the step count
    # (per object here, from the largest object in Cellpose), which only changes how far the
    # small objects' heat has spread; measured ~0.995.
    assert cosine.mean() >= 0.97
    assert np.median(cosine) > 0.999


@pytest.mark.reference
def test_parity_with_cellpose_when_steps_are_global(shared_data, monkeypatch):
    """With Cellpose's single global step count, the definitions coincide (up to rounding)."""
    cellpose_dynamics = pytest.importorskip("cellpose.dynamics")
    torch = pytest.importorskip("torch")
    import pipeline.flows as flows_module

    # Cellpose needs ids 1..N (it crashes on the gaps a crop leaves), so renumber for it.
    labels, _ = fastremap.renumber(real_cyto_labels(shared_data, 2)[:200, :200].copy(), preserve_zero=True)
    boxes = [b for b in ndi.find_objects(labels) if b is not None]
    global_steps = 2 * max((b[0].stop - b[0].start) + (b[1].stop - b[1].start) + 2 for b in boxes)
    monkeypatch.setattr(flows_module, "diffusion_steps", lambda box: global_steps)
    ours = flows_module._masks_to_flows_reference(labels)
    theirs = cellpose_dynamics.masks_to_flows_gpu(labels, device=torch.device("cpu"))[0]
    cosine = (ours * theirs).sum(axis=0)[labels > 0]
    assert cosine.mean() > 0.9999
