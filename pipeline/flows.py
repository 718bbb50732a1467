"""Flow fields from instance labels: Cellpose's heat-diffusion targets.

Each object gets a vector field of unit length that points, at every pixel, up the gradient of
heat diffused from the object's centre, i.e. toward the centre along paths that stay inside the
object. The network learns to predict these fields (times 5) and ``infer`` rebuilds masks by
following them, so the definition here is the contract between training and inference.

Definition (Cellpose's ``masks_to_flows_gpu``, made per object):

* centre: the object pixel nearest the object's mean coordinate (first in raster order on ties);
* heat: start at 0; each step adds 1 at the centre, then replaces every object pixel by the sum
  of its same-object neighbours divided by the stencil size (3x3 box / 9 in 2-D; self + 6 faces
  / 7 in 3-D). Neighbours outside the object count as 0, so heat leaks out at the border;
* steps: 2 * (h + w + 2) in 2-D and 6 * (d + h + w + 3) in 3-D, from the object's own bounding
  box (Cellpose uses one count from the largest object for the whole image);
* flow: the central difference of the heat image, (dy, dx) or (dz, dy, dx), divided by its
  length. As in Cellpose, the difference is taken on the whole image's heat, so at a pixel that
  touches another object the neighbour's heat takes part.

Objects are independent, so this runs in parallel over objects inside each object's bounding
box; see ``pipeline/_kernels.py``.
"""

import fastremap
import numba
import numpy as np
import scipy.ndimage

from pipeline import _kernels

__all__ = ["masks_to_flows", "diffusion_steps"]

# Ids up to this bound (or up to the pixel count) are compacted with a dense lookup table;
# larger ids go through fastremap's hash map instead of allocating a table that big.
_DENSE_ID_LIMIT = 1 << 22


def diffusion_steps(box_shape: tuple[int, ...]) -> int:
    """Number of diffusion steps for an object whose bounding box has shape ``box_shape``.

    Cellpose's rule, applied per object: ``2 * (h + w + 2)`` in 2-D, ``6 * (d + h + w + 3)`` in 3-D.

    >>> diffusion_steps((5, 7))
    28
    >>> diffusion_steps((2, 3, 4))
    72
    """
    if len(box_shape) == 2:
        return 2 * (box_shape[0] + box_shape[1] + 2)
    if len(box_shape) == 3:
        return 6 * (sum(box_shape) + 3)
    raise ValueError(f"box_shape must have 2 or 3 entries; got {box_shape}")


def masks_to_flows(labels: np.ndarray) -> np.ndarray:
    """Unit flow field toward each object's centre, by heat diffusion inside the object.

    Parameters
    ----------
    labels : (Y, X) or (Z, Y, X) integer array
        Instance labels, 0 = background. Any integer dtype; ids need not be consecutive.

    Returns
    -------
    flows : (2, Y, X) or (3, Z, Y, X) float32
        (dy, dx) or (dz, dy, dx). Unit length inside objects, exactly 0 on background.

    Notes
    -----
    * The convention is Cellpose's (same centre, stencil, step count rule and sign), so flows are
      interchangeable with ``cellpose.dynamics.masks_to_flows_gpu``; the step count is taken from
      each object's own box rather than from the largest object in the image.
    * An object in several pieces (not connected under the stencil: 8-connectivity in 2-D,
      6-connectivity in 3-D) diffuses from each piece's own centre, so every piece flows to a
      centre of its own and rebuilding masks from these flows gives one mask per piece. (Cellpose
      diffuses from one centre only, and leaves the other pieces at 0.)
    * The flow is 0, not unit, where the heat gradient vanishes exactly: at the centre of a
      symmetric object, in an isolated one-pixel object, at a pixel whose edge neighbours are all
      background (a diagonal chain), and where heat never arrives (it underflows float64 only in
      extremely long, thin objects, several hundred pixels long per pixel of width).
    * Objects touching the image border are handled as if the image were padded with background.

    Examples
    --------
    >>> labels = np.zeros((5, 5), dtype=np.uint8)
    >>> labels[1:4, 1:4] = 7
    >>> flows = masks_to_flows(labels)
    >>> flows.shape, flows.dtype
    ((2, 5, 5), dtype('float32'))
    >>> flows[:, 1, 2].tolist()  # above the centre: points down (+y) toward it
    [1.0, 0.0]
    >>> float(np.abs(flows[:, 0, :]).max())  # background row
    0.0
    """
    ids, n_objects = _compact_ids(labels)
    is_2d = labels.ndim == 2
    volume = ids[None] if is_2d else ids
    flows = np.zeros((labels.ndim,) + volume.shape, dtype=np.float32)
    if n_objects > 0:
        lo, hi = _kernels.object_boxes_numba(volume, n_objects)
        order = _work_order(lo, hi, is_2d)
        heat = _kernels.heat_numba(volume, lo, hi, order, is_2d, numba.get_num_threads())
        flows = _kernels.unit_gradient_numba(heat, volume, is_2d)
    return flows[:, 0] if is_2d else flows


def _compact_ids(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Validate ``labels`` and renumber its objects 1..N as int32 (0 stays background)."""
    if not isinstance(labels, np.ndarray):
        raise TypeError(f"labels must be a numpy array; got {type(labels).__name__}")
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"labels must be integer (Y, X) or (Z, Y, X) instance labels; got {labels.dtype} "
            f"{labels.shape}. Pass instance labels, not flows, probabilities or a binary mask "
            "(label a binary mask's connected components first)."
        )
    if labels.ndim not in (2, 3):
        raise ValueError(
            f"labels must be (Y, X) or (Z, Y, X); got {labels.ndim} dimensions {labels.shape}"
        )
    if labels.size == 0:
        return np.zeros(labels.shape, dtype=np.int32), 0
    low, high = int(labels.min()), int(labels.max())
    if low < 0:
        raise ValueError(f"labels must be non-negative (0 = background); found id {low}")
    if high == 0:
        return np.zeros(labels.shape, dtype=np.int32), 0
    if high <= max(_DENSE_ID_LIMIT, labels.size):
        flat = np.ascontiguousarray(labels).reshape(-1)
        if flat.dtype.kind == "u" and flat.dtype.itemsize == 8:
            flat = flat.astype(np.int64)  # numba indexes with signed integers
        ids_flat, n_objects = _kernels.compact_ids_numba(flat, high)
        return ids_flat.reshape(labels.shape), int(n_objects)
    renumbered, _ = fastremap.renumber(np.ascontiguousarray(labels), preserve_zero=True, in_place=False)
    return renumbered.astype(np.int32), int(renumbered.max())


def _work_order(lo: np.ndarray, hi: np.ndarray, is_2d: bool) -> np.ndarray:
    """Objects sorted by estimated diffusion work (steps x box volume), largest first."""
    box = (hi - lo).astype(np.float64)
    if is_2d:
        steps = 2 * (box[:, 1] + box[:, 2] + 2)
        work = steps * (box[:, 1] + 2) * (box[:, 2] + 2)
    else:
        steps = 6 * (box.sum(axis=1) + 3)
        work = steps * np.prod(box + 2, axis=1)
    return np.argsort(-work, kind="stable").astype(np.int64)


# ------------------------------------------------------------------------------------------------
# Plain NumPy reference: same definition, written for reading. The tests assert that the numba
# kernel equals it; the benchmark times it too.
# ------------------------------------------------------------------------------------------------


def _masks_to_flows_reference(labels: np.ndarray) -> np.ndarray:
    """NumPy version of :func:`masks_to_flows`, one object and one piece at a time."""
    labels = np.asarray(labels)
    ndim = labels.ndim
    heat = np.zeros(labels.shape, dtype=np.float64)
    # Pieces are what the stencil connects: the full 3x3 in 2-D, faces only in 3-D.
    structure = scipy.ndimage.generate_binary_structure(ndim, ndim if ndim == 2 else 1)
    for object_id in np.unique(labels[labels > 0]):
        pieces, n_pieces = scipy.ndimage.label(labels == object_id, structure=structure)
        for p in range(1, n_pieces + 1):
            points = np.stack(np.nonzero(pieces == p), axis=1)  # raster order: argmin ties agree
            heat[tuple(points.T)] = _piece_heat_reference(points)

    # Central differences on the whole heat image, zero beyond the image edge.
    padded = np.pad(heat, 1)
    core = (slice(1, -1),) * ndim
    grads = np.zeros((ndim,) + labels.shape, dtype=np.float64)
    for axis in range(ndim):
        ahead = list(core)
        behind = list(core)
        ahead[axis] = slice(2, None)
        behind[axis] = slice(None, -2)
        grads[axis] = padded[tuple(ahead)] - padded[tuple(behind)]
    norm = np.sqrt((grads**2).sum(axis=0))
    keep = (labels > 0) & (norm > 0)
    flows = np.zeros((ndim,) + labels.shape, dtype=np.float32)
    flows[:, keep] = grads[:, keep] / norm[keep]
    return flows


def _piece_heat_reference(points: np.ndarray) -> np.ndarray:
    """Final heat at ``points`` (n, ndim) of one connected piece, diffused from its centre."""
    ndim = points.shape[1]
    count = len(points)
    offsets = count * points - points.sum(axis=0)  # count * (coordinate - mean), exact
    centre = points[np.argmin((offsets.astype(np.float64) ** 2).sum(axis=1))]
    lo = points.min(axis=0)
    hi = points.max(axis=0) + 1
    n_iter = diffusion_steps(tuple(int(v) for v in hi - lo))

    # Padded box: one background pixel on every side; inside the piece, the stencil weight.
    weight = np.zeros(tuple(hi - lo + 2), dtype=np.float64)
    local = tuple((points - lo + 1).T)
    weight[local] = 1.0 / 9.0 if ndim == 2 else 1.0 / 7.0
    c = tuple(centre - lo + 1)
    core = (slice(1, -1),) * ndim
    heat = np.zeros_like(weight)
    for _ in range(n_iter):
        heat[c] += 1.0
        h = heat
        if ndim == 2:
            row_sum = h[:, :-2] + h[:, 1:-1] + h[:, 2:]  # over x, then over y (the kernel's order)
            total = row_sum[:-2] + row_sum[1:-1] + row_sum[2:]
        else:
            total = (  # self, z -/+, y -/+, x -/+ (the kernel's order)
                h[1:-1, 1:-1, 1:-1]
                + h[:-2, 1:-1, 1:-1]
                + h[2:, 1:-1, 1:-1]
                + h[1:-1, :-2, 1:-1]
                + h[1:-1, 2:, 1:-1]
                + h[1:-1, 1:-1, :-2]
                + h[1:-1, 1:-1, 2:]
            )
        heat = np.zeros_like(h)
        heat[core] = total * weight[core]
    return heat[local]
