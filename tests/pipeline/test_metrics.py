"""Tests for pipeline.metrics.

Three layers: parity with cellpose 4.2.1.1 (marked `reference`), an independent check of the
matching definition (brute force over all matchings, and the paper's dense Hungarian cost
written out here), and invariants / hand-computed values that need neither.
"""

import doctest
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from pipeline import metrics
from pipeline.metrics import (
    aggregated_jaccard_index,
    average_precision,
    count_label_overlaps,
    error_rate,
    match_instances,
)

# The paper stores AP at 0.5:0.05:0.95; the low ones make rows compete for columns, which is
# where the matching (not just the threshold) decides TP.
THRESHOLDS = [0.1, 0.3, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


# --------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------


def make_labels(rng, shape, n_objects, max_radius=9):
    """Touching blob-shaped objects (nearest seed within a radius), ids 1..n, plus dots."""
    seeds = np.zeros(shape, np.int32)
    coords = tuple(rng.integers(0, s, n_objects) for s in shape)
    seeds[coords] = np.arange(1, n_objects + 1)
    distance, nearest = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    labels = seeds[tuple(nearest)]
    labels[distance > rng.uniform(3, max_radius)] = 0
    # a few one-pixel objects in the background
    background = np.flatnonzero(labels.ravel() == 0)
    dots = rng.choice(background, size=min(3, background.size), replace=False)
    labels.ravel()[dots] = labels.max() + 1 + np.arange(dots.size)
    return labels


def perturb(rng, labels):
    """A fake prediction: shift, drop, merge, split, dilate, erode objects and add spurious ones.

    Object sizes of a few pixels to ~20 px across make 1-2 px changes straddle every threshold.
    """
    out = np.roll(labels, tuple(rng.integers(-1, 2, labels.ndim)), tuple(range(labels.ndim)))
    ids = np.unique(out)[1:]
    next_id = int(labels.max()) + 1
    for object_id in ids:
        action = rng.choice(["keep", "drop", "merge", "split", "dilate", "erode"],
                            p=[0.35, 0.1, 0.1, 0.1, 0.2, 0.15])
        mask = out == object_id
        if not mask.any():  # merged away already
            continue
        if action == "drop":
            out[mask] = 0
        elif action == "merge":  # absorb into a random other object (merges need not touch)
            out[mask] = rng.choice(ids)
        elif action == "split":
            coords = np.nonzero(mask)
            axis = rng.integers(labels.ndim)
            half = coords[axis] > np.median(coords[axis])
            out[tuple(c[half] for c in coords)] = next_id
            next_id += 1
        elif action == "dilate":
            grown = ndi.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
            out[grown & (out == 0)] = object_id
        elif action == "erode":
            out[mask & ~ndi.binary_erosion(mask)] = 0
    for _ in range(int(rng.integers(1, 4))):  # spurious objects
        corner = tuple(int(rng.integers(0, s - 3)) for s in labels.shape)
        box = tuple(slice(c, c + 3) for c in corner)
        out[box][out[box] == 0] = next_id
        next_id += 1
    return out


def grid_labels(size=2048, cell=45, border=3):
    """(size, size) uint32 with (size // cell)**2 square objects, ~2000 for the defaults."""
    n = size // cell
    tile = np.ones((cell, cell), np.uint32)
    tile[:border] = 0
    tile[:, :border] = 0
    ids = np.arange(1, n * n + 1, dtype=np.uint32).reshape(n, n)
    labels = np.zeros((size, size), np.uint32)
    labels[: n * cell, : n * cell] = np.kron(ids, tile)
    return labels


def brute_force_ious(masks_true, masks_pred):
    """IoU matrix by looping over every id pair, straight from the definition."""
    true_ids = [i for i in np.unique(masks_true) if i != 0]
    pred_ids = [j for j in np.unique(masks_pred) if j != 0]
    ious = np.zeros((len(true_ids), len(pred_ids)))
    for a, i in enumerate(true_ids):
        for b, j in enumerate(pred_ids):
            t, p = masks_true == i, masks_pred == j
            ious[a, b] = (t & p).sum() / (t | p).sum()
    return ious, true_ids, pred_ids


def brute_force_true_positives(ious, threshold):
    """Largest number of one-to-one pairs with IoU >= threshold, over all matchings."""
    if ious.shape[0] > ious.shape[1]:
        ious = ious.T
    n_rows, n_cols = ious.shape
    best = 0
    for cols in itertools.permutations(range(n_cols), n_rows):
        best = max(best, sum(ious[r, c] >= threshold for r, c in enumerate(cols)))
    return best


def hungarian_true_positives(masks_true, masks_pred, threshold):
    """The paper's matching written out: dense IoU, cost -(iou >= th) - iou / (2 n_min)."""
    ious, _, _ = brute_force_ious(masks_true, masks_pred)
    if ious.size == 0:
        return 0
    n_min = min(ious.shape)
    cost = -(ious >= threshold).astype(float) - ious / (2 * n_min)
    rows, cols = linear_sum_assignment(cost)
    return int((ious[rows, cols] >= threshold).sum())


def edge_cases():
    """(name, masks_true, masks_pred) pairs that cellpose also handles (all have background)."""
    empty = np.zeros((6, 7), np.int32)
    one = empty.copy()
    one[2:4, 2:5] = 1
    dots = np.zeros((8, 8), np.int32)  # one-pixel objects on a checkerboard
    dots[::2, ::2] = np.arange(1, 17).reshape(4, 4)
    blob = np.zeros((8, 8), np.int32)
    blob[1:5, 1:6] = 3
    halves_true = np.array([[1, 1, 0]], np.int32)  # two halves at IoU exactly 0.5 each
    halves_pred = np.array([[4, 5, 0]], np.int32)
    # cellpose builds a dense (max id + 1)^2 table, so keep the ids sparse but small here.
    sparse_ids = np.array([[0, 3, 3, 0], [17, 17, 0, 400]], np.int64)
    return [
        ("both empty", empty, empty),
        ("true empty", empty, one),
        ("pred empty", one, empty),
        ("identical", one, one),
        ("one-pixel identical", dots, dots),
        ("one-pixel shifted", dots, np.roll(dots, 1, axis=1)),
        ("one-pixel vs blob", dots, blob),
        ("exact 0.5 ties", halves_true, halves_pred),
        ("exact 0.5 ties swapped", halves_pred, halves_true),
        ("sparse ids", sparse_ids, np.array([[3, 3, 3, 0], [0, 17, 0, 400]], np.int64)),
    ]


# --------------------------------------------------------------------------------------------
# Parity with cellpose (the reference implementation)
# --------------------------------------------------------------------------------------------


def assert_same_as_cellpose(masks_true, masks_pred, thresholds=THRESHOLDS):
    """Our (ap, tp, fp, fn) against cellpose.metrics.average_precision on list inputs."""
    pytest.importorskip("cellpose")
    from cellpose import metrics as cellpose_metrics

    ap, tp, fp, fn = average_precision(masks_true, masks_pred, thresholds)
    # cellpose needs a list threshold and warns on 0 / 0 (both-empty images) before giving NaN.
    with np.errstate(invalid="ignore"):
        expected = cellpose_metrics.average_precision(
            list(masks_true), list(masks_pred), threshold=list(thresholds)
        )
    cp_ap, cp_tp, cp_fp, cp_fn = expected
    assert_array_equal(tp, cp_tp.astype(np.int64))
    assert_array_equal(fp, cp_fp.astype(np.int64))
    assert_array_equal(fn, cp_fn.astype(np.int64))
    # cellpose divides in float32; our float64 quotient rounds to the same float32.
    assert_array_equal(ap.astype(np.float32), cp_ap)


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(6))
def test_average_precision_matches_cellpose_on_random_2d(seed):
    rng = np.random.default_rng(seed)
    trues = [make_labels(rng, (96, 112), int(rng.integers(5, 60))) for _ in range(3)]
    preds = [perturb(rng, t) for t in trues]
    assert_same_as_cellpose(trues, preds)


@pytest.mark.reference
@pytest.mark.parametrize("seed", range(2))
def test_average_precision_matches_cellpose_on_random_3d(seed):
    rng = np.random.default_rng(100 + seed)
    trues = [make_labels(rng, (12, 40, 44), 25, max_radius=6) for _ in range(2)]
    preds = [perturb(rng, t) for t in trues]
    assert_same_as_cellpose(trues, preds)


@pytest.mark.reference
def test_average_precision_matches_cellpose_on_real_labels(shared_data):
    from PIL import Image

    paths = sorted((shared_data / "cellpose_cyto" / "train").glob("*_masks.png"))
    assert paths, "no *_masks.png under cellpose_cyto/train"
    rng = np.random.default_rng(7)
    trues = [np.asarray(Image.open(p)) for p in paths]  # uint16 labels
    preds = [perturb(rng, t) for t in trues]
    assert_same_as_cellpose(trues, preds)


@pytest.mark.reference
@pytest.mark.parametrize("case", edge_cases(), ids=lambda case: case[0])
def test_average_precision_matches_cellpose_on_edge_cases(case):
    _, masks_true, masks_pred = case
    assert_same_as_cellpose([masks_true], [masks_pred])


# --------------------------------------------------------------------------------------------
# The definition, checked without cellpose
# --------------------------------------------------------------------------------------------

tiny_labels = hnp.arrays(np.int16, st.tuples(st.integers(2, 4), st.integers(2, 5)),
                         elements=st.integers(0, 4))


@settings(max_examples=300, deadline=None)
@given(masks_true=tiny_labels, data=st.data(), threshold=st.sampled_from([0.2, 0.34, 0.5, 0.7]))
def test_matching_is_a_maximum_matching_by_brute_force(masks_true, data, threshold):
    masks_pred = data.draw(hnp.arrays(np.int16, masks_true.shape, elements=st.integers(0, 4)))
    ious, true_ids, pred_ids = brute_force_ious(masks_true, masks_pred)
    expected_tp = brute_force_true_positives(ious, threshold) if ious.size else 0

    _, tp, fp, fn = average_precision(masks_true, masks_pred, threshold)
    assert tp[0, 0] == expected_tp
    assert fp[0, 0] == len(pred_ids) - expected_tp
    assert fn[0, 0] == len(true_ids) - expected_tp

    matched_true, matched_pred, matched_ious = match_instances(masks_true, masks_pred, threshold)
    assert len(matched_true) == expected_tp
    assert len(set(matched_true)) == len(matched_true) == len(set(matched_pred))  # one to one
    for i, j, iou in zip(matched_true, matched_pred, matched_ious):
        assert iou == ious[true_ids.index(i), pred_ids.index(j)]  # same division, same float
        assert iou >= threshold


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_matches_dense_hungarian_reference(seed):
    rng = np.random.default_rng(200 + seed)
    masks_true = make_labels(rng, (64, 72), 20)
    masks_pred = perturb(rng, masks_true)
    _, tp, _, _ = average_precision(masks_true, masks_pred, THRESHOLDS)
    expected = [hungarian_true_positives(masks_true, masks_pred, th) for th in THRESHOLDS]
    assert_array_equal(tp[0], expected)


def test_count_label_overlaps_matches_brute_force_on_both_paths(monkeypatch):
    rng = np.random.default_rng(3)
    masks_true = make_labels(rng, (40, 48), 15).astype(np.uint32) * 7  # non-consecutive ids
    masks_pred = perturb(rng, masks_true // 7).astype(np.int64)
    dense = count_label_overlaps(masks_true, masks_pred)
    # A zero bin limit sends the same pair through the np.unique (sparse) branch.
    monkeypatch.setattr(metrics, "_DENSE_BINS_MIN", 0)
    masks_many = np.arange(1, 40 * 48 + 1, dtype=np.uint32).reshape(40, 48)  # rows * cols > size
    sparse = count_label_overlaps(masks_true, masks_pred)
    many = count_label_overlaps(masks_many, masks_pred)
    for overlap, true_ids, pred_ids, t, p in [
        (*dense, masks_true, masks_pred),
        (*sparse, masks_true, masks_pred),
        (*many, masks_many, masks_pred),
    ]:
        assert true_ids[0] == 0 and pred_ids[0] == 0
        assert_array_equal(true_ids[1:], np.unique(t[t > 0]))
        assert_array_equal(pred_ids[1:], np.unique(p[p > 0]))
        assert true_ids.dtype == t.dtype and pred_ids.dtype == p.dtype
        expected = np.array([[np.sum((t == i) & (p == j)) for j in pred_ids] for i in true_ids])
        assert_array_equal(overlap, expected)


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64,
                                   np.uint64])
@pytest.mark.parametrize("shape", [(50, 60), (8, 30, 34)])
def test_identical_inputs_score_perfectly(dtype, shape):
    rng = np.random.default_rng(len(shape))
    masks = make_labels(rng, shape, 30, max_radius=6).astype(dtype)
    ap, tp, fp, fn = average_precision(masks, masks, THRESHOLDS)
    n_objects = np.unique(masks).size - 1
    assert_array_equal(ap, 1.0)
    assert_array_equal(tp, n_objects)
    assert_array_equal(fp, 0)
    assert_array_equal(fn, 0)
    assert error_rate(masks, masks) == (np.array([0.0]), 0.0)
    assert aggregated_jaccard_index(masks, masks) == (np.array([1.0]), 1.0)


def test_image_without_background_counts_every_id():
    # cellpose counts len(unique) - 1 objects and so returns NaN here; every id is an object.
    full = np.arange(12, dtype=np.int32).reshape(3, 4) + 1  # 12 one-pixel objects, no 0
    ap, tp, fp, fn = average_precision(full, full)
    assert_array_equal(tp, 12)
    assert_array_equal(ap, 1.0)
    ap, tp, fp, fn = average_precision(np.ones((3, 4), np.uint8), np.ones((3, 4), np.uint8))
    assert_array_equal(tp, 1)


def relabel(rng, masks, dtype, monotone=False):
    """Map ids 1..max through a random injective map into `dtype`'s top range (0 stays 0)."""
    ids = np.unique(masks)
    ids = ids[ids > 0]
    offsets = rng.choice(10 * ids.size, ids.size, replace=False)  # distinct, random order
    if monotone:
        offsets = np.sort(offsets)[::-1]
    new_ids = np.iinfo(dtype).max - offsets.astype(dtype)  # in dtype arithmetic: no overflow
    lookup = dict(zip(ids.tolist(), new_ids.tolist()))
    out = np.zeros(masks.shape, dtype)
    for old, new in lookup.items():
        out[masks == old] = new
    return out, lookup


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtypes", [(np.uint32, np.int64), (np.int64, np.uint16),
                                    (np.uint64, np.int32)])
def test_relabelling_does_not_change_results(seed, dtypes):
    rng = np.random.default_rng(300 + seed)
    masks_true = make_labels(rng, (80, 90), 30)
    masks_pred = perturb(rng, masks_true)
    relabelled_true, true_map = relabel(rng, masks_true, dtypes[0])
    relabelled_pred, pred_map = relabel(rng, masks_pred, dtypes[1])

    expected = average_precision(masks_true, masks_pred, THRESHOLDS)
    for got, want in zip(average_precision(relabelled_true, relabelled_pred, THRESHOLDS),
                         expected):
        assert_array_equal(got, want)
    assert_array_equal(error_rate(relabelled_true, relabelled_pred)[0],
                       error_rate(masks_true, masks_pred)[0])

    true_ids, pred_ids, ious = match_instances(masks_true, masks_pred, 0.5)
    new_true, new_pred, new_ious = match_instances(relabelled_true, relabelled_pred, 0.5)
    assert new_true.dtype == dtypes[0] and new_pred.dtype == dtypes[1]
    mapped = {(true_map[i], pred_map[j]): iou for i, j, iou in zip(true_ids.tolist(),
                                                                   pred_ids.tolist(), ious)}
    assert dict(zip(zip(new_true.tolist(), new_pred.tolist()), new_ious)) == mapped

    # AJI breaks IoU ties by the smallest predicted id, so only order-preserving maps keep it.
    monotone_true, _ = relabel(rng, masks_true, dtypes[0], monotone=True)
    monotone_pred, _ = relabel(rng, masks_pred, dtypes[1], monotone=True)
    assert (aggregated_jaccard_index(monotone_true, monotone_pred)
            == aggregated_jaccard_index(masks_true, masks_pred))


@pytest.mark.parametrize("seed", range(3))
def test_swapping_true_and_pred_swaps_fp_and_fn(seed):
    rng = np.random.default_rng(400 + seed)
    masks_true = make_labels(rng, (70, 70), 25)
    masks_pred = perturb(rng, masks_true)
    ap, tp, fp, fn = average_precision(masks_true, masks_pred, THRESHOLDS)
    ap_swapped, tp_swapped, fp_swapped, fn_swapped = average_precision(
        masks_pred, masks_true, THRESHOLDS)
    assert_array_equal(tp_swapped, tp)
    assert_array_equal(fp_swapped, fn)
    assert_array_equal(fn_swapped, fp)
    assert_array_equal(ap_swapped, ap)


def test_memory_layout_does_not_change_results():
    rng = np.random.default_rng(5)
    masks_true = make_labels(rng, (60, 50), 20)
    masks_pred = perturb(rng, masks_true)
    expected = average_precision(masks_true, masks_pred, THRESHOLDS)
    views = [
        (np.asfortranarray(masks_true), masks_pred),
        (masks_true.T.copy().T, masks_pred.T.T),  # F-ordered copy against a C array
        (masks_true.astype(">i4"), masks_pred.astype("<i8")),  # big-endian input
    ]
    for t, p in views:
        for got, want in zip(average_precision(t, p, THRESHOLDS), expected):
            assert_array_equal(got, want)
    # strided views: score the same crop two ways
    crop = (slice(5, 55, 2), slice(3, 47, 3))
    for got, want in zip(average_precision(masks_true[crop], masks_pred[crop]),
                         average_precision(masks_true[crop].copy(), masks_pred[crop].copy())):
        assert_array_equal(got, want)


def test_list_input_scores_each_image():
    rng = np.random.default_rng(6)
    trues = [make_labels(rng, (40, 40), 10), make_labels(rng, (6, 30, 30), 8)]
    preds = [perturb(rng, t) for t in trues]
    ap, tp, fp, fn = average_precision(trues, preds, (0.5, 0.75))
    assert ap.shape == tp.shape == fp.shape == fn.shape == (2, 2)
    for image in range(2):
        single = average_precision(trues[image], preds[image], (0.5, 0.75))
        assert_array_equal(single[1], tp[image : image + 1])
    assert average_precision([], [], (0.5, 0.75))[0].shape == (0, 2)


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------

# One row, 16 pixels. True: A=1 (4 px), B=2 (2 px), C=3 (2 px), D=4 (2 px).
# Pred: 5 = first 3 px of A (IoU 3/4); 6 covers B, the gap and C (5 px, IoU 2/5 with each);
# 7 is a spurious 2 px object; D is missed.
HAND_TRUE = np.array([[1, 1, 1, 1, 0, 2, 2, 0, 3, 3, 0, 4, 4, 0, 0, 0]], np.uint16)
HAND_PRED = np.array([[5, 5, 5, 0, 0, 6, 6, 6, 6, 6, 0, 0, 0, 0, 7, 7]], np.uint16)


def test_average_precision_by_hand():
    # At 0.5 only A-5 matches: TP 1, FP = 3 preds - 1 = 2, FN = 4 trues - 1 = 3, AP = 1/6.
    # At 0.3 A-5 plus one of B-6 / C-6 (6 can match only once): TP 2, FP 1, FN 2, AP = 2/5.
    ap, tp, fp, fn = average_precision(HAND_TRUE, HAND_PRED, (0.3, 0.5, 0.8))
    assert_array_equal(tp, [[2, 1, 0]])
    assert_array_equal(fp, [[1, 2, 3]])
    assert_array_equal(fn, [[2, 3, 4]])
    assert_allclose(ap, [[2 / 5, 1 / 6, 0.0]])


def test_error_rate_by_hand():
    # Image 0: (FP + FN) / (TP + FN) = (2 + 3) / (1 + 3) = 5/4 at IoU 0.5 (see HAND_*).
    # Image 1: a perfect prediction, 0. Image 2: no true objects -> NaN, left out of the mean.
    empty = np.zeros_like(HAND_TRUE)
    per_image, mean = error_rate([HAND_TRUE, HAND_TRUE, empty], [HAND_PRED, HAND_TRUE, HAND_PRED])
    assert_allclose(per_image, [5 / 4, 0.0, np.nan])
    assert mean == pytest.approx((5 / 4 + 0.0) / 2)
    # No image with true objects: the mean is NaN too.
    per_image, mean = error_rate([empty], [HAND_PRED])
    assert np.isnan(per_image).all() and np.isnan(mean)


def test_aggregated_jaccard_index_by_hand():
    # A: best 5, C += 3, U += |A | 5| = 4.  B: best 6 (2/5), C += 2, U += 5.
    # C: best 6 as well (2/5), C += 2, U += 5 (6 counts again: Kumar's merge penalty).
    # D: overlaps nothing, U += 2.  Unused prediction 7: U += 2.  AJI = 7 / 18.
    per_image, overall = aggregated_jaccard_index(HAND_TRUE, HAND_PRED)
    assert_allclose(per_image, [7 / 18])
    assert overall == pytest.approx(7 / 18)

    # Pooled over images: (7 + C) / (18 + U). Second image: true [1 1 1 1], pred [2 2 0 0]:
    # C = 2, U = 4 -> 1/2 alone; pooled (7 + 2) / (18 + 4) = 9/22, not the mean of 7/18 and 1/2.
    second_true = np.array([[1, 1, 1, 1]], np.int32)
    second_pred = np.array([[2, 2, 0, 0]], np.int32)
    per_image, overall = aggregated_jaccard_index([HAND_TRUE, second_true],
                                                  [HAND_PRED, second_pred])
    assert_allclose(per_image, [7 / 18, 1 / 2])
    assert overall == pytest.approx(9 / 22)


def test_aggregated_jaccard_index_edge_cases():
    empty = np.zeros((3, 3), np.int32)
    one = empty.copy()
    one[1, 1] = 9
    per_image, overall = aggregated_jaccard_index([empty, empty, one], [empty, one, empty])
    # nothing at all -> NaN; only a prediction -> 0 / 1; only a true object -> 0 / 1.
    assert_allclose(per_image, [np.nan, 0.0, 0.0])
    assert overall == 0.0
    assert np.isnan(aggregated_jaccard_index(empty, empty)[1])


def test_average_precision_empty_images():
    empty = np.zeros((5, 5), np.uint32)
    one = empty.copy()
    one[0, 0] = 40000
    ap, tp, fp, fn = average_precision([empty, empty, one], [empty, one, empty], (0.5,))
    assert_array_equal(ap[0], np.nan)  # 0 / 0, as in cellpose
    assert_array_equal(ap[1:], 0.0)
    assert_array_equal(tp, 0)
    assert_array_equal(fp, [[0], [1], [0]])
    assert_array_equal(fn, [[0], [0], [1]])


def test_exact_half_ties_match_once():
    # True object of 2 px, two 1-px predictions at IoU exactly 1/2: one TP, one FP.
    masks_true = np.array([[1, 1, 0]], np.int32)
    masks_pred = np.array([[4, 5, 0]], np.int32)
    _, tp, fp, fn = average_precision(masks_true, masks_pred, (0.5, 0.51))
    assert_array_equal(tp, [[1, 0]])
    assert_array_equal(fp, [[1, 2]])
    assert_array_equal(fn, [[0, 1]])


def test_docstring_examples():
    result = doctest.testmod(metrics)
    assert result.attempted > 0
    assert result.failed == 0


# --------------------------------------------------------------------------------------------
# Speed
# --------------------------------------------------------------------------------------------


def test_large_image():
    # A 2048 x 2048 pair with ~2000 objects each (its speed is in benchmarks/bench_metrics.py).
    masks_true = grid_labels()
    masks_pred = np.roll(masks_true, 7, axis=1)  # IoU 35/49 for every object
    assert np.unique(masks_true).size - 1 == 2025
    ap, tp, fp, fn = average_precision(masks_true, masks_pred)
    assert_array_equal(tp, [[2025, 0, 0]])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

GOOD = np.zeros((8, 8), np.int32)


@pytest.mark.parametrize(
    ("masks_true", "masks_pred", "error", "message"),
    [
        (GOOD.astype(np.float32), GOOD, TypeError, r"masks_true must be an integer label.*float32"),
        (GOOD, GOOD.astype(bool), TypeError, r"masks_pred is a boolean mask"),
        (GOOD, GOOD.tolist(), TypeError, r"both be label arrays or both be lists"),
        ([GOOD, GOOD.tolist()], [GOOD, GOOD], TypeError, r"masks_true\[1\] must be a numpy"),
        ([GOOD, GOOD], [GOOD], ValueError, r"masks_true has 2 images but masks_pred has 1"),
        ([GOOD, GOOD], [GOOD, np.zeros((8, 9), np.int32)], ValueError,
         r"masks_true\[1\] has shape \(8, 8\) but masks_pred\[1\] has shape \(8, 9\)"),
        (GOOD[0], GOOD[0], ValueError, r"2-D \(Y, X\) or 3-D .* got 1-D"),
        (GOOD[None, None], GOOD[None, None], ValueError, r"got 4-D"),
        (GOOD - 1, GOOD, ValueError, r"masks_true has negative labels"),
    ],
)
def test_bad_input_raises_clear_errors(masks_true, masks_pred, error, message):
    for function in (average_precision, error_rate, aggregated_jaccard_index):
        with pytest.raises(error, match=message):
            function(masks_true, masks_pred)


@pytest.mark.parametrize("thresholds", [0.0, 1.5, [], [0.5, -0.1], [[0.5]]])
def test_bad_thresholds_raise(thresholds):
    with pytest.raises(ValueError, match="thresholds must be one or more IoU values"):
        average_precision(GOOD, GOOD, thresholds)


def test_error_rate_and_match_instances_take_one_threshold():
    with pytest.raises(TypeError, match="single IoU value"):
        error_rate(GOOD, GOOD, threshold=[0.5, 0.75])
    with pytest.raises(TypeError, match="single IoU value"):
        match_instances(GOOD, GOOD, threshold=(0.5,))
    with pytest.raises(TypeError, match="one pair of label arrays"):
        match_instances([GOOD], [GOOD])
    with pytest.raises(TypeError, match="one pair of label arrays"):
        count_label_overlaps([GOOD], [GOOD])


def test_remove_ignored_masks_drops_only_masks_mostly_inside():
    masks = np.zeros((2, 10, 10), np.uint32)  # 3-D: the rule is per mask, any ndim
    masks[:, 0:4, 0:4] = 5  # entirely inside the ignored region
    masks[:, 0:4, 5:9] = 70000  # a quarter inside
    masks[:, 6:9, 6:9] = 2  # outside
    ignore = np.zeros(masks.shape, bool)
    ignore[:, 0:4, 0:6] = True
    kept = metrics.remove_ignored_masks(masks, ignore)
    assert kept.dtype == masks.dtype and set(np.unique(kept)) == {0, 2, 70000}
    assert metrics.remove_ignored_masks(masks, None) is masks
    with pytest.raises(ValueError, match="shape"):
        metrics.remove_ignored_masks(masks, ignore[0])
