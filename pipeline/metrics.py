"""Instance-segmentation metrics: AP at IoU thresholds, error rate, aggregated Jaccard index.

Matching and AP follow Cellpose 4 (``cellpose.metrics.average_precision``, paper section 3a);
the tests check that tp, fp, fn and AP equal cellpose's on the inputs cellpose handles.
Unlike cellpose, nothing here assumes consecutive ids: labels may be any non-negative integers
in any integer dtype (``{3, 17, 40000}``, ``uint32``, ``int64``), with 0 = background.

The metrics (`average_precision`, `error_rate`, `aggregated_jaccard_index`) take either one
pair of label images (numpy arrays) or two equal-length lists of them; the per-image helpers
(`count_label_overlaps`, `match_instances`) take one pair. A single array is always *one*
image, 2-D (Y, X) or 3-D (Z, Y, X); pass ``list(stack)`` to score a stack of 2-D images one by
one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import fastremap
import numpy as np
import scipy.sparse
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

# Below this many (true id, pred id) bins the overlap is counted with one dense np.bincount;
# above it (and above the pixel count) a sort of the pixel codes keeps memory linear in pixels.
_DENSE_BINS_MIN = 1 << 22


class _Overlaps(NamedTuple):
    """Sparse overlap table of one image pair. Index 0 of both id arrays is background."""

    true_ids: np.ndarray  # (n_true + 1,) input dtype, sorted, true_ids[0] == 0
    pred_ids: np.ndarray  # (n_pred + 1,) input dtype, sorted, pred_ids[0] == 0
    pair_true: np.ndarray  # (k,) intp, row of each (true, pred) pair that shares pixels
    pair_pred: np.ndarray  # (k,) intp, column of that pair
    pair_pixels: np.ndarray  # (k,) int64, pixels the pair shares; pairs sorted by (row, col)


class _ObjectPairs(NamedTuple):
    """Foreground pairs that overlap, with their IoU. Indices as in `_Overlaps`."""

    n_true: int
    n_pred: int
    true_areas: np.ndarray  # (n_true + 1,) int64, pixels per row (row 0 = background)
    pred_areas: np.ndarray  # (n_pred + 1,) int64
    pair_true: np.ndarray  # (k,) intp, in 1..n_true
    pair_pred: np.ndarray  # (k,) intp, in 1..n_pred
    intersections: np.ndarray  # (k,) int64
    unions: np.ndarray  # (k,) int64
    ious: np.ndarray  # (k,) float64, > 0


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_label_image(masks: object, name: str) -> np.ndarray:
    """Return `masks` as a native-byte-order integer array, or raise saying what is wrong."""
    if not isinstance(masks, np.ndarray):
        raise TypeError(
            f"{name} must be a numpy integer label array (Y, X) or (Z, Y, X); "
            f"got {type(masks).__name__}. Wrap sequences of images in a list, one array each."
        )
    if masks.dtype == np.bool_:
        raise TypeError(
            f"{name} is a boolean mask {masks.shape}; instance metrics need integer labels "
            "(0 = background, one id per object). Label it first, e.g. "
            "scipy.ndimage.label(mask)[0]."
        )
    if not np.issubdtype(masks.dtype, np.integer):
        raise TypeError(
            f"{name} must be an integer label image (0 = background, ids > 0 = objects); got "
            f"{masks.dtype} {masks.shape}. Pass instance labels, not probabilities or flows; "
            "if the values are whole numbers cast them, e.g. masks.astype(np.int32)."
        )
    if masks.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be 2-D (Y, X) or 3-D (Z, Y, X); got {masks.ndim}-D {masks.shape}. "
            "Pass a list with one label array per image."
        )
    if np.issubdtype(masks.dtype, np.signedinteger) and masks.size and masks.min() < 0:
        raise ValueError(
            f"{name} has negative labels (min {masks.min()}); use 0 for background and "
            "positive ids for objects."
        )
    if not masks.dtype.isnative:
        masks = masks.astype(masks.dtype.newbyteorder("="))
    return masks


def _as_image_pairs(masks_true, masks_pred) -> list[tuple[np.ndarray, np.ndarray]]:
    """Validate one pair of label images or two equal-length lists of them."""
    if isinstance(masks_true, np.ndarray) and isinstance(masks_pred, np.ndarray):
        trues, preds, names = [masks_true], [masks_pred], [("masks_true", "masks_pred")]
    elif isinstance(masks_true, (list, tuple)) and isinstance(masks_pred, (list, tuple)):
        if len(masks_true) != len(masks_pred):
            raise ValueError(
                f"masks_true has {len(masks_true)} images but masks_pred has {len(masks_pred)}; "
                "pass one prediction per ground-truth image, in the same order."
            )
        trues, preds = masks_true, masks_pred
        names = [(f"masks_true[{i}]", f"masks_pred[{i}]") for i in range(len(trues))]
    else:
        raise TypeError(
            "masks_true and masks_pred must both be label arrays or both be lists of label "
            f"arrays; got {type(masks_true).__name__} and {type(masks_pred).__name__}."
        )
    pairs = []
    for masks_t, masks_p, (name_t, name_p) in zip(trues, preds, names):
        masks_t = _check_label_image(masks_t, name_t)
        masks_p = _check_label_image(masks_p, name_p)
        if masks_t.shape != masks_p.shape:
            raise ValueError(
                f"{name_t} has shape {masks_t.shape} but {name_p} has shape {masks_p.shape}; "
                "they must match pixel for pixel (resize the prediction to the ground truth)."
            )
        pairs.append((masks_t, masks_p))
    return pairs


def _check_scalar(threshold) -> float:
    """Return `threshold` if it is one number (range checked by `_as_thresholds`)."""
    if np.ndim(threshold) != 0:
        raise TypeError(f"threshold must be a single IoU value; got {threshold!r}.")
    return threshold


def _as_one_image_pair(masks_true, masks_pred, function: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate a single pair of label arrays (no lists) for the per-image helpers."""
    if not (isinstance(masks_true, np.ndarray) and isinstance(masks_pred, np.ndarray)):
        raise TypeError(
            f"{function} takes one pair of label arrays; got {type(masks_true).__name__} and "
            f"{type(masks_pred).__name__}. Call it once per image."
        )
    ((masks_true, masks_pred),) = _as_image_pairs(masks_true, masks_pred)
    return masks_true, masks_pred


def _as_thresholds(thresholds) -> np.ndarray:
    """IoU thresholds as a 1-D float64 array, each in (0, 1]."""
    values = np.atleast_1d(np.asarray(thresholds, dtype=np.float64))
    # IoU >= 0 holds for pairs that share no pixel, which this sparse matching never visits.
    if values.ndim != 1 or values.size == 0 or not np.all((values > 0) & (values <= 1)):
        raise ValueError(
            f"thresholds must be one or more IoU values in (0, 1]; got {thresholds!r}."
        )
    return values


# --------------------------------------------------------------------------------------------
# Overlaps and matching
# --------------------------------------------------------------------------------------------


def _compact_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted ids with 0 first, and each pixel's index into them (flat, intp)."""
    ids, index = fastremap.unique(masks, return_inverse=True)
    # fastremap's inverse keeps the array's logical shape; ravel in C order like the other image.
    index = np.asarray(index).reshape(-1).astype(np.intp, copy=False)
    if ids.size == 0 or ids[0] != 0:
        # No background pixel: keep index 0 for background anyway so rows mean the same thing.
        ids = np.concatenate([np.zeros(1, masks.dtype), ids])
        index = index + 1
    return ids.astype(masks.dtype, copy=False), index


def _tabulate_overlaps(masks_true: np.ndarray, masks_pred: np.ndarray) -> _Overlaps:
    """Pixels shared by every (true id, pred id) pair, background included, without a loop."""
    true_ids, true_index = _compact_labels(masks_true)
    pred_ids, pred_index = _compact_labels(masks_pred)
    n_rows, n_cols = true_ids.size, pred_ids.size
    pair_code = true_index * n_cols + pred_index
    if n_rows * n_cols <= max(pair_code.size, _DENSE_BINS_MIN):
        pixels = np.bincount(pair_code, minlength=n_rows * n_cols)
        pair_code = np.flatnonzero(pixels)
        pixels = pixels[pair_code]
    else:
        pair_code, pixels = np.unique(pair_code, return_counts=True)
    pair_true, pair_pred = np.divmod(pair_code, n_cols)
    return _Overlaps(true_ids, pred_ids, pair_true, pair_pred, pixels.astype(np.int64))


def _measure_object_pairs(overlaps: _Overlaps) -> _ObjectPairs:
    """Areas of all objects and the IoU of every foreground pair that shares pixels."""
    n_rows, n_cols = overlaps.true_ids.size, overlaps.pred_ids.size
    # Pixel counts are < 2**53, so the float64 sums of bincount are exact.
    true_areas = np.bincount(overlaps.pair_true, overlaps.pair_pixels, n_rows).astype(np.int64)
    pred_areas = np.bincount(overlaps.pair_pred, overlaps.pair_pixels, n_cols).astype(np.int64)
    foreground = (overlaps.pair_true > 0) & (overlaps.pair_pred > 0)
    pair_true = overlaps.pair_true[foreground]
    pair_pred = overlaps.pair_pred[foreground]
    intersections = overlaps.pair_pixels[foreground]
    unions = true_areas[pair_true] + pred_areas[pair_pred] - intersections
    # Same integers and the same single division as cellpose, so IoUs agree bit for bit.
    ious = intersections / unions
    return _ObjectPairs(
        n_rows - 1, n_cols - 1, true_areas, pred_areas, pair_true, pair_pred,
        intersections, unions, ious,
    )


def _match_object_pairs(pairs: _ObjectPairs, threshold: float) -> np.ndarray:
    """Boolean (k,) mask of the pairs in the optimal matching that reach `threshold`.

    The assignment maximises ``sum([iou >= th] + iou / (2 * n_min))`` over one-to-one
    matchings, which is the paper's cost ``-(iou >= th) - iou / (2 * n_min)`` minimised.
    Pairs that share no pixel have weight 0, so only overlapping pairs need to be edges.
    """
    if pairs.ious.size == 0:
        return np.zeros(0, dtype=bool)
    n_rows, n_cols = pairs.n_true + 1, pairs.n_pred + 1
    n_min = min(pairs.n_true, pairs.n_pred)
    weights = (pairs.ious >= threshold) + pairs.ious / (2 * n_min)
    # The sparse solver needs a full matching of the rows and positive costs, so every row also
    # gets a private "unmatched" column of cost 2 and every real edge costs 2 - weight (>= 0.5).
    rows = np.concatenate([pairs.pair_true, np.arange(n_rows)])
    cols = np.concatenate([pairs.pair_pred, n_cols + np.arange(n_rows)])
    costs = np.concatenate([2.0 - weights, np.full(n_rows, 2.0)])
    graph = scipy.sparse.csr_matrix((costs, (rows, cols)), shape=(n_rows, n_cols + n_rows))
    matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
    col_of_row = np.empty(n_rows, dtype=np.intp)
    col_of_row[matched_rows] = matched_cols
    return (col_of_row[pairs.pair_true] == pairs.pair_pred) & (pairs.ious >= threshold)


def count_label_overlaps(
    masks_true: np.ndarray, masks_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count the pixels shared by every pair of true and predicted labels.

    Parameters
    ----------
    masks_true, masks_pred : ndarray of int, (Y, X) or (Z, Y, X)
        Label images of the same shape, any integer dtype; 0 = background, ids need not be
        consecutive.

    Returns
    -------
    overlap : ndarray of int64, (n_true + 1, n_pred + 1)
        ``overlap[i, j]`` = pixels where ``masks_true == true_ids[i]`` and
        ``masks_pred == pred_ids[j]``. Row and column 0 are background, so row sums are the
        true objects' areas and column sums the predicted objects' areas.
    true_ids : ndarray, (n_true + 1,), dtype of `masks_true`
        0 followed by the sorted ids present in `masks_true`.
    pred_ids : ndarray, (n_pred + 1,), dtype of `masks_pred`
        0 followed by the sorted ids present in `masks_pred`.

    Notes
    -----
    The ids are compacted (fastremap) and all pairs counted at once with ``np.bincount`` on a
    combined index, or ``np.unique`` when the table would be much larger than the image. The
    returned table is dense: for volumes with tens of thousands of objects prefer
    `match_instances` or `average_precision`, which keep it sparse.

    Examples
    --------
    >>> masks_true = np.array([[0, 3, 3],
    ...                        [0, 3, 40000]], dtype=np.uint32)
    >>> masks_pred = np.array([[5, 5, 0],
    ...                        [0, 5, 0]], dtype=np.int64)
    >>> overlap, true_ids, pred_ids = count_label_overlaps(masks_true, masks_pred)
    >>> overlap
    array([[1, 1],
           [1, 2],
           [1, 0]])
    >>> true_ids, pred_ids
    (array([    0,     3, 40000], dtype=uint32), array([0, 5]))
    """
    masks_true, masks_pred = _as_one_image_pair(masks_true, masks_pred, "count_label_overlaps")
    overlaps = _tabulate_overlaps(masks_true, masks_pred)
    overlap = np.zeros((overlaps.true_ids.size, overlaps.pred_ids.size), dtype=np.int64)
    overlap[overlaps.pair_true, overlaps.pair_pred] = overlaps.pair_pixels
    return overlap, overlaps.true_ids, overlaps.pred_ids


def match_instances(
    masks_true: np.ndarray, masks_pred: np.ndarray, threshold: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pair true and predicted objects one to one, keeping pairs with IoU >= `threshold`.

    Parameters
    ----------
    masks_true, masks_pred : ndarray of int, (Y, X) or (Z, Y, X)
        Label images of the same shape, any integer dtype; 0 = background, ids need not be
        consecutive.
    threshold : float, default 0.5
        IoU a matched pair must reach, in (0, 1].

    Returns
    -------
    true_ids : ndarray, (n_matches,), dtype of `masks_true`
        Matched true ids, ascending.
    pred_ids : ndarray, (n_matches,), dtype of `masks_pred`
        The predicted id matched to each of `true_ids`.
    ious : ndarray of float64, (n_matches,)
        IoU of each pair, ``|T & P| / |T | P|`` in pixels.

    Notes
    -----
    The matching is the paper's (section 3a): the one-to-one assignment minimising
    ``-(iou >= threshold) - iou / (2 * n_min)``, ``n_min = min(n_true, n_pred)``. Because the
    second term sums to at most 1/2, this maximises the number of pairs at or above the
    threshold first and their summed IoU (over all assigned pairs) second. The number of
    matches is therefore unique even where the pairs are not (exact ties, e.g. two halves of an
    object at IoU 0.5 each). It is solved exactly with a sparse assignment solver
    (``scipy.sparse.csgraph.min_weight_full_bipartite_matching``) over the pairs that share
    pixels, which gives the same optimum as the dense ``linear_sum_assignment`` cellpose runs.

    Examples
    --------
    >>> masks_true = np.array([[1, 1, 0, 2],
    ...                        [1, 1, 0, 2]], dtype=np.uint16)
    >>> masks_pred = np.array([[7, 7, 7, 0],
    ...                        [7, 7, 0, 9]], dtype=np.int32)
    >>> match_instances(masks_true, masks_pred, threshold=0.5)
    (array([1, 2], dtype=uint16), array([7, 9], dtype=int32), array([0.8, 0.5]))
    """
    masks_true, masks_pred = _as_one_image_pair(masks_true, masks_pred, "match_instances")
    (threshold,) = _as_thresholds(_check_scalar(threshold))
    overlaps = _tabulate_overlaps(masks_true, masks_pred)
    pairs = _measure_object_pairs(overlaps)
    matched = _match_object_pairs(pairs, threshold)
    return (
        overlaps.true_ids[pairs.pair_true[matched]],
        overlaps.pred_ids[pairs.pair_pred[matched]],
        pairs.ious[matched],
    )


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def average_precision(
    masks_true: np.ndarray | Sequence[np.ndarray],
    masks_pred: np.ndarray | Sequence[np.ndarray],
    thresholds: float | Sequence[float] = (0.5, 0.75, 0.9),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Average precision ``TP / (TP + FP + FN)`` per image at each IoU threshold.

    Parameters
    ----------
    masks_true, masks_pred : ndarray of int or list of them
        One pair of label images, (Y, X) or (Z, Y, X), or two lists of the same length with
        pairwise equal shapes. Any integer dtype; 0 = background; ids need not be consecutive.
    thresholds : float or sequence of float, default (0.5, 0.75, 0.9)
        IoU thresholds in (0, 1].

    Returns
    -------
    ap : ndarray of float64, (n_images, n_thresholds)
        ``tp / (tp + fp + fn)``; NaN where an image has neither true nor predicted objects.
    tp : ndarray of int64, (n_images, n_thresholds)
        Matched pairs with IoU >= threshold (see `match_instances`).
    fp : ndarray of int64, (n_images, n_thresholds)
        ``n_pred - tp``.
    fn : ndarray of int64, (n_images, n_thresholds)
        ``n_true - tp``.

    Notes
    -----
    Equal to ``cellpose.metrics.average_precision`` (4.2.1.1) wherever that is defined: the
    counts exactly, and ``ap.astype(np.float32)`` bit for bit (cellpose returns float32 for all
    four; casting our float64 quotient rounds to the same float32). Both give NaN when an image
    has no objects at all (0 / 0), AP 0 when only one side has objects. Deliberate differences:
    a single image gives shape (1, n_thresholds), not (n_thresholds,); an image without
    background pixels counts all its ids (cellpose counts ``len(unique) - 1`` and so misses
    one); ids are compacted, so huge or sparse ids cost nothing extra.

    Examples
    --------
    >>> masks_true = np.array([[1, 1, 0, 2],
    ...                        [1, 1, 0, 2]], dtype=np.uint16)
    >>> masks_pred = np.array([[7, 7, 7, 0],
    ...                        [7, 7, 0, 0]], dtype=np.int32)
    >>> ap, tp, fp, fn = average_precision(masks_true, masks_pred)
    >>> ap  # object 1 matched at IoU 4/5; object 2 missed
    array([[0.5, 0.5, 0. ]])
    >>> tp, fp, fn
    (array([[1, 1, 0]]), array([[0, 0, 1]]), array([[1, 1, 2]]))
    """
    image_pairs = _as_image_pairs(masks_true, masks_pred)
    thresholds = _as_thresholds(thresholds)
    tp = np.zeros((len(image_pairs), thresholds.size), dtype=np.int64)
    n_true = np.zeros((len(image_pairs), 1), dtype=np.int64)
    n_pred = np.zeros((len(image_pairs), 1), dtype=np.int64)
    for image, (masks_t, masks_p) in enumerate(image_pairs):
        pairs = _measure_object_pairs(_tabulate_overlaps(masks_t, masks_p))
        n_true[image], n_pred[image] = pairs.n_true, pairs.n_pred
        for k, threshold in enumerate(thresholds):
            tp[image, k] = np.count_nonzero(_match_object_pairs(pairs, threshold))
    fp = n_pred - tp
    fn = n_true - tp
    with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN for images with no objects at all
        ap = tp / (tp + fp + fn)
    return ap, tp, fp, fn


def error_rate(
    masks_true: np.ndarray | Sequence[np.ndarray],
    masks_pred: np.ndarray | Sequence[np.ndarray],
    threshold: float = 0.5,
) -> tuple[np.ndarray, float]:
    """Error rate ``(FP + FN) / (TP + FN)`` per image, and its mean over images.

    Parameters
    ----------
    masks_true, masks_pred : ndarray of int or list of them
        As in `average_precision`.
    threshold : float, default 0.5
        IoU threshold in (0, 1]; the paper reports 0.5.

    Returns
    -------
    per_image : ndarray of float64, (n_images,)
        ``(fp + fn) / n_true`` for each image; NaN for an image with no true objects.
    mean : float
        Mean of `per_image` over the images that have true objects (NaN if none do).

    Notes
    -----
    As in the paper (section 3a), the rate is computed per image and then averaged, so every
    image weighs the same whatever its object count. The denominator ``TP + FN`` is the number
    of true objects; with none the rate is undefined (any false positive would make it
    infinite), so such an image is NaN and left out of the mean rather than silently counted as
    0 or inf. Its false positives are still reported by `average_precision`.

    Examples
    --------
    >>> masks_true = np.array([[1, 1, 0, 2],
    ...                        [1, 1, 0, 2]], dtype=np.uint16)
    >>> masks_pred = np.array([[7, 7, 0, 0],
    ...                        [7, 7, 0, 8]], dtype=np.int32)
    >>> error_rate(masks_true, masks_pred)  # IoUs 1 and 1/2: both match at 0.5
    (array([0.]), 0.0)
    >>> error_rate([masks_true, np.zeros_like(masks_true)], [np.zeros_like(masks_pred)] * 2)
    (array([ 1., nan]), 1.0)
    """
    _, tp, fp, fn = average_precision(masks_true, masks_pred, _check_scalar(threshold))
    tp, fp, fn = tp[:, 0], fp[:, 0], fn[:, 0]
    n_true = tp + fn
    per_image = np.full(n_true.shape, np.nan)
    has_objects = n_true > 0
    per_image[has_objects] = (fp + fn)[has_objects] / n_true[has_objects]
    mean = float(per_image[has_objects].mean()) if has_objects.any() else float("nan")
    return per_image, mean


def aggregated_jaccard_index(
    masks_true: np.ndarray | Sequence[np.ndarray],
    masks_pred: np.ndarray | Sequence[np.ndarray],
) -> tuple[np.ndarray, float]:
    """Aggregated Jaccard index (AJI) of Kumar et al. 2017, per image and pooled.

    Parameters
    ----------
    masks_true, masks_pred : ndarray of int or list of them
        As in `average_precision`.

    Returns
    -------
    per_image : ndarray of float64, (n_images,)
        ``C / U`` for each image; NaN for an image with no objects on either side.
    overall : float
        ``sum(C) / sum(U)`` over all images (pixel-weighted, the "aggregated" reading), NaN if
        the sum of unions is 0. ``np.nanmean(per_image)`` gives the per-image average that
        MoNuSeg-style tables usually report.

    Notes
    -----
    N. Kumar et al., "A dataset and a technique for generalized nuclear segmentation for
    computational pathology", IEEE TMI 36(7):1550-1560, 2017. For each true object ``G``:
    take the predicted object ``S`` with the largest IoU with ``G``; add ``|G & S|`` to ``C``
    and ``|G | S|`` to ``U``, and mark ``S`` used. Then add the area of every unused predicted
    object to ``U``. ``AJI = C / U``. Details where the paper is silent, following the common
    "fast AJI" implementation (HoVer-Net's ``get_fast_aji``):

    - a true object that overlaps no prediction adds only its own area to ``U``;
    - ties in IoU go to the smallest predicted id;
    - a prediction may be chosen by several true objects; it then counts in each of their
      unions (this is Kumar's definition, and it penalises merges).

    This is not ``cellpose.metrics.aggregated_jaccard_index``, which uses the one-to-one
    matching at IoU 0.5 and the foreground union instead.

    Examples
    --------
    >>> masks_true = np.array([[1, 1, 2, 2]], dtype=np.uint8)
    >>> masks_pred = np.array([[5, 5, 5, 5]], dtype=np.uint8)
    >>> aggregated_jaccard_index(masks_true, masks_pred)  # both pick 5: C = 2+2, U = 4+4
    (array([0.5]), 0.5)
    """
    image_pairs = _as_image_pairs(masks_true, masks_pred)
    intersection = np.zeros(len(image_pairs), dtype=np.int64)
    union = np.zeros(len(image_pairs), dtype=np.int64)
    for image, (masks_t, masks_p) in enumerate(image_pairs):
        intersection[image], union[image] = _sum_aji_pixels(
            _measure_object_pairs(_tabulate_overlaps(masks_t, masks_p))
        )
    with np.errstate(invalid="ignore"):  # 0 / 0 -> NaN for images with no objects at all
        per_image = intersection / union
    overall = float(intersection.sum() / union.sum()) if union.sum() else float("nan")
    return per_image, overall


def _sum_aji_pixels(pairs: _ObjectPairs) -> tuple[int, int]:
    """AJI numerator ``C`` and denominator ``U`` of one image, in pixels."""
    # Best prediction per true object: sort by (true row, IoU descending, pred column) and
    # keep the first pair of each row, so ties go to the smallest predicted id.
    order = np.lexsort((pairs.pair_pred, -pairs.ious, pairs.pair_true))
    rows_sorted = pairs.pair_true[order]
    is_first = np.ones(order.size, dtype=bool)
    is_first[1:] = rows_sorted[1:] != rows_sorted[:-1]
    best = order[is_first]
    has_match = np.zeros(pairs.n_true + 1, dtype=bool)
    has_match[pairs.pair_true[best]] = True
    used = np.zeros(pairs.n_pred + 1, dtype=bool)
    used[pairs.pair_pred[best]] = True
    intersection = pairs.intersections[best].sum()
    union = (
        pairs.unions[best].sum()
        + pairs.true_areas[1:][~has_match[1:]].sum()
        + pairs.pred_areas[1:][~used[1:]].sum()
    )
    return int(intersection), int(union)


def remove_ignored_masks(masks: np.ndarray, ignore: np.ndarray | None, fraction: float = 0.5) -> np.ndarray:
    """``masks`` without the masks that lie mostly in a don't-care region, before scoring.

    Parameters
    ----------
    masks : ndarray of int, (Y, X) or (Z, Y, X)
        Predicted labels, 0 = background.
    ignore : ndarray of bool, same shape, or None
        True where the annotation is "don't care" (a sample's ignore mask, pipeline.shards).
    fraction : float, default 0.5
        A mask with more than this fraction of its pixels in ``ignore`` is removed (set to 0).

    Returns
    -------
    ndarray, same shape and dtype
        ``masks`` itself when nothing is removed, else a copy. The other ids are kept as they are.

    Notes
    -----
    Training leaves the ignored pixels out of the loss, so an object found there is neither right
    nor wrong; counting it as a false positive would penalise the model for what it was never
    taught. Masks only partly inside keep counting.

    Examples
    --------
    >>> masks = np.array([[1, 1, 2, 2]], dtype=np.uint16)
    >>> remove_ignored_masks(masks, np.array([[False, True, True, True]]))
    array([[1, 1, 0, 0]], dtype=uint16)
    """
    if ignore is None or not ignore.any():
        return masks
    if ignore.shape != masks.shape:
        raise ValueError(f"ignore must have the masks' shape {masks.shape}; got {ignore.shape}")
    flat = masks.ravel().astype(np.int64)
    areas = np.bincount(flat)
    inside = np.bincount(flat[ignore.ravel()], minlength=areas.size)
    dropped = np.flatnonzero(inside > fraction * areas)
    dropped = dropped[dropped > 0]
    if dropped.size == 0:
        return masks
    return np.where(np.isin(masks, dropped), 0, masks).astype(masks.dtype)
