"""Compiled kernels behind :mod:`pipeline.flows`.

Private: call the validated public functions in ``pipeline.flows``, never these directly. Each
kernel here has a plain NumPy twin in the public module (``_<name>_reference``) and the tests
assert the two agree; the diffusion arithmetic is written in the same order in both so they
agree to the last bit, which keeps the comparison meaningful even at a symmetric object's centre
where the gradient is a difference of two nearly equal numbers.

Every kernel releases the GIL (``nogil``): the flow-error check of ``pipeline.dynamics`` recomputes
flows here from a worker thread that runs beside the network (``infer.predict.predict_stream``).
"""

import numba
import numpy as np

# ------------------------------------------------------------------------------------------------
# Label compaction and per-object statistics
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def compact_ids_numba(labels_flat, max_label):
    """Map arbitrary non-negative ids to 1..N through a lookup table.

    Returns ``(ids_flat int32, n_objects)``; 0 stays 0. Used when ``max_label`` is small enough
    for a dense table, which is the common case and avoids a sort.
    """
    present = np.zeros(max_label + 1, dtype=np.bool_)
    for i in range(labels_flat.size):
        present[labels_flat[i]] = True
    lut = np.zeros(max_label + 1, dtype=np.int32)
    n = 0
    for v in range(1, max_label + 1):
        if present[v]:
            n += 1
            lut[v] = n
    ids_flat = np.empty(labels_flat.size, dtype=np.int32)
    for i in range(labels_flat.size):
        ids_flat[i] = lut[labels_flat[i]]
    return ids_flat, n


@numba.njit(cache=True, nogil=True)
def object_boxes_numba(ids, n_objects):
    """Bounding boxes of objects 1..N in a (Z, Y, X) int32 id volume.

    Returns ``lo, hi`` of shape (N, 3): inclusive lower and exclusive upper corners.
    """
    nz, ny, nx = ids.shape
    lo = np.empty((n_objects, 3), dtype=np.int64)
    hi = np.zeros((n_objects, 3), dtype=np.int64)
    lo[:, 0] = nz
    lo[:, 1] = ny
    lo[:, 2] = nx
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = ids[z, y, x] - 1
                if k < 0:
                    continue
                if z < lo[k, 0]:
                    lo[k, 0] = z
                if y < lo[k, 1]:
                    lo[k, 1] = y
                if x < lo[k, 2]:
                    lo[k, 2] = x
                if z + 1 > hi[k, 0]:
                    hi[k, 0] = z + 1
                if y + 1 > hi[k, 1]:
                    hi[k, 1] = y + 1
                if x + 1 > hi[k, 2]:
                    hi[k, 2] = x + 1
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Pieces: the connected parts of one object, under the diffusion stencil's connectivity
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _label_pieces(inside, full_connectivity):
    """Connected components of a padded boolean (Z, Y, X) box, numbered 1..P in raster order.

    ``full_connectivity`` selects 26/8-connectivity (the 2-D 3x3 stencil) instead of the
    6-connectivity of the 3-D 7-point stencil: a piece is exactly what heat can cross.
    The box is padded by one zero voxel on every side, so neighbours never leave it.
    """
    nz, ny, nx = inside.shape
    piece = np.zeros((nz, ny, nx), dtype=np.int32)
    stack = np.empty((nz * ny * nx, 3), dtype=np.int64)
    n_pieces = 0
    for z0 in range(nz):
        for y0 in range(ny):
            for x0 in range(nx):
                if not inside[z0, y0, x0] or piece[z0, y0, x0] != 0:
                    continue
                n_pieces += 1
                piece[z0, y0, x0] = n_pieces
                top = 0
                stack[0, 0] = z0
                stack[0, 1] = y0
                stack[0, 2] = x0
                top = 1
                while top > 0:
                    top -= 1
                    z = stack[top, 0]
                    y = stack[top, 1]
                    x = stack[top, 2]
                    for dz in range(-1, 2):
                        for dy in range(-1, 2):
                            for dx in range(-1, 2):
                                n_off = abs(dz) + abs(dy) + abs(dx)
                                if n_off == 0 or (not full_connectivity and n_off > 1):
                                    continue
                                zz = z + dz
                                yy = y + dy
                                xx = x + dx
                                if zz < 0 or zz >= nz:
                                    continue
                                if inside[zz, yy, xx] and piece[zz, yy, xx] == 0:
                                    piece[zz, yy, xx] = n_pieces
                                    stack[top, 0] = zz
                                    stack[top, 1] = yy
                                    stack[top, 2] = xx
                                    top += 1
    return piece, n_pieces


@numba.njit(cache=True, nogil=True)
def _piece_geometry(piece, p):
    """Bounding box (inclusive lo, exclusive hi) and centre of piece ``p`` in a padded box.

    The centre is the piece voxel nearest the piece's mean coordinate, first in raster order
    on ties. Distances use exact integer offsets ``count * coord - sum`` so that ties are
    decided identically here and in the NumPy reference.
    """
    nz, ny, nx = piece.shape
    lo = np.array([nz, ny, nx], dtype=np.int64)
    hi = np.zeros(3, dtype=np.int64)
    count = 0
    sz = 0
    sy = 0
    sx = 0
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if piece[z, y, x] != p:
                    continue
                count += 1
                sz += z
                sy += y
                sx += x
                lo[0] = min(lo[0], z)
                lo[1] = min(lo[1], y)
                lo[2] = min(lo[2], x)
                hi[0] = max(hi[0], z + 1)
                hi[1] = max(hi[1], y + 1)
                hi[2] = max(hi[2], x + 1)
    centre = np.zeros(3, dtype=np.int64)
    best = np.inf
    for z in range(lo[0], hi[0]):
        for y in range(lo[1], hi[1]):
            for x in range(lo[2], hi[2]):
                if piece[z, y, x] != p:
                    continue
                ez = float(count * z - sz)
                ey = float(count * y - sy)
                ex = float(count * x - sx)
                d = ez * ez + ey * ey + ex * ex
                if d < best:
                    best = d
                    centre[0] = z
                    centre[1] = y
                    centre[2] = x
    return lo, hi, centre


# ------------------------------------------------------------------------------------------------
# Heat diffusion inside one piece
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _diffuse_2d(weight, cy, cx, n_iter):
    """Heat after ``n_iter`` Jacobi steps of the 3x3 box average inside one 2-D piece.

    ``weight`` is the padded (Y, X) piece mask scaled by the stencil: 1/9 inside, 0 outside.
    Each step adds 1 at the centre, then replaces every piece pixel by the sum of its 3x3
    neighbourhood divided by 9; pixels outside the piece hold 0, so only same-piece neighbours
    contribute and heat leaks out at the edge (the boundary is absorbing, as in Cellpose). The
    3x3 sum is a row sum then a column sum, 4 additions a pixel instead of 8.
    """
    ny, nx = weight.shape
    heat = np.zeros((ny, nx), dtype=np.float64)
    heat_next = np.zeros((ny, nx), dtype=np.float64)
    row_sum = np.zeros((ny, nx), dtype=np.float64)
    one = np.uint64(1)
    for it in range(n_iter):
        heat[cy, cx] += 1.0
        # Heat has travelled at most it + 1 pixels from the centre: skip the cold rest.
        reach = it + 1
        y_lo = max(1, cy - reach)
        y_hi = min(ny - 1, cy + reach + 1)
        # Unsigned column indices on 1-D row views: numba then drops its negative-index
        # wraparound checks and LLVM vectorises the inner loops (about 6x faster).
        x_lo = np.uint64(max(1, cx - reach))
        x_hi = np.uint64(min(nx - 1, cx + reach + 1))
        for y in range(y_lo - 1, y_hi + 1):
            h = heat[y]
            r = row_sum[y]
            for x in range(x_lo, x_hi):
                r[x] = h[x - one] + h[x] + h[x + one]
        for y in range(y_lo, y_hi):
            above = row_sum[y - 1]
            level = row_sum[y]
            below = row_sum[y + 1]
            w = weight[y]
            out = heat_next[y]
            for x in range(x_lo, x_hi):
                out[x] = (above[x] + level[x] + below[x]) * w[x]
        heat, heat_next = heat_next, heat
    return heat


@numba.njit(cache=True, nogil=True)
def _diffuse_3d(weight, cz, cy, cx, n_iter):
    """3-D twin of :func:`_diffuse_2d`: Cellpose's 7-point stencil (self + 6 faces), weight 1/7."""
    nz, ny, nx = weight.shape
    heat = np.zeros((nz, ny, nx), dtype=np.float64)
    heat_next = np.zeros((nz, ny, nx), dtype=np.float64)
    one = np.uint64(1)
    for it in range(n_iter):
        heat[cz, cy, cx] += 1.0
        reach = it + 1
        z_lo = max(1, cz - reach)
        z_hi = min(nz - 1, cz + reach + 1)
        y_lo = max(1, cy - reach)
        y_hi = min(ny - 1, cy + reach + 1)
        x_lo = np.uint64(max(1, cx - reach))
        x_hi = np.uint64(min(nx - 1, cx + reach + 1))
        for z in range(z_lo, z_hi):
            for y in range(y_lo, y_hi):
                h = heat[z, y]
                front = heat[z - 1, y]
                back = heat[z + 1, y]
                up = heat[z, y - 1]
                down = heat[z, y + 1]
                w = weight[z, y]
                out = heat_next[z, y]
                for x in range(x_lo, x_hi):
                    out[x] = (h[x] + front[x] + back[x] + up[x] + down[x] + h[x - one] + h[x + one]) * w[x]
        heat, heat_next = heat_next, heat
    return heat


# ------------------------------------------------------------------------------------------------
# Flows for a whole label image
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _object_heat(ids, k, lo, hi, is_2d, heat):
    """Diffuse every piece of object ``k`` (1-based) and write its final heat into ``heat``."""
    # Padded box around the object: one zero voxel each side (in z only for 3-D).
    pz = 0 if is_2d else 1
    bz = hi[0] - lo[0] + 2 * pz
    by = hi[1] - lo[1] + 2
    bx = hi[2] - lo[2] + 2
    inside = np.zeros((bz, by, bx), dtype=np.bool_)
    for z in range(lo[0], hi[0]):
        for y in range(lo[1], hi[1]):
            for x in range(lo[2], hi[2]):
                if ids[z, y, x] == k:
                    inside[z - lo[0] + pz, y - lo[1] + 1, x - lo[2] + 1] = True
    piece, n_pieces = _label_pieces(inside, is_2d)

    for p in range(1, n_pieces + 1):
        plo, phi, centre = _piece_geometry(piece, p)
        # Cellpose's iteration count, applied to this piece's own box:
        # 2 * (h + w + 2) in 2-D, 6 * (d + h + w + 3) in 3-D.
        if is_2d:
            n_iter = 2 * ((phi[1] - plo[1]) + (phi[2] - plo[2]) + 2)
        else:
            n_iter = 6 * ((phi[0] - plo[0]) + (phi[1] - plo[1]) + (phi[2] - plo[2]) + 3)
        # Sub-box of the piece, padded by one voxel (the object box already has that margin).
        z0 = plo[0] - pz
        y0 = plo[1] - 1
        x0 = plo[2] - 1
        wz = phi[0] - plo[0] + 2 * pz
        wy = phi[1] - plo[1] + 2
        wx = phi[2] - plo[2] + 2
        stencil_weight = 1.0 / 9.0 if is_2d else 1.0 / 7.0
        weight = np.zeros((wz, wy, wx), dtype=np.float64)
        for z in range(wz):
            for y in range(wy):
                for x in range(wx):
                    if piece[z0 + z, y0 + y, x0 + x] == p:
                        weight[z, y, x] = stencil_weight
        if is_2d:
            piece_heat = _diffuse_2d(weight[0].copy(), centre[1] - y0, centre[2] - x0, n_iter).reshape((1, wy, wx))
        else:
            piece_heat = _diffuse_3d(weight, centre[0] - z0, centre[1] - y0, centre[2] - x0, n_iter)
        # Box voxel (z, y, x) sits at image voxel lo + (z0, y0, x0) + (z, y, x) - padding.
        for z in range(wz):
            for y in range(wy):
                for x in range(wx):
                    if weight[z, y, x] != 0.0:
                        heat[lo[0] + z0 + z - pz, lo[1] + y0 + y - 1, lo[2] + x0 + x - 1] = piece_heat[z, y, x]


@numba.njit(cache=True, nogil=True, parallel=True)
def heat_numba(ids, lo, hi, order, is_2d, n_threads):
    """Final diffusion heat (Z, Y, X) float64 of every object in a compact int32 id volume.

    ``lo``/``hi`` are the object boxes from :func:`object_boxes_numba`; Z = 1 for 2-D. Objects
    are independent and own disjoint voxels, so they run in parallel; ``order`` lists them
    largest-work first and is dealt round-robin to the ``n_threads`` threads so that no thread is
    left holding all the big ones.
    """
    heat = np.zeros(ids.shape, dtype=np.float64)
    n_objects = lo.shape[0]
    for t in numba.prange(n_threads):
        for j in range(t, n_objects, n_threads):
            k = order[j]
            _object_heat(ids, k + 1, lo[k], hi[k], is_2d, heat)
    return heat


@numba.njit(cache=True, nogil=True, parallel=True)
def unit_gradient_numba(heat, ids, is_2d):
    """Central-difference gradient of ``heat`` on object voxels, normalised; 0 elsewhere.

    Neighbours outside the image count as 0 heat. As in Cellpose, a neighbour in another object
    contributes that object's heat: the gradient is taken on the whole heat image.
    Returns (ndim, Z, Y, X) float32.
    """
    nz, ny, nx = heat.shape
    ndim = 2 if is_2d else 3
    flows = np.zeros((ndim, nz, ny, nx), dtype=np.float32)
    for zy in numba.prange(nz * ny):
        z = zy // ny
        y = zy % ny
        for x in range(nx):
            if ids[z, y, x] == 0:
                continue
            up = heat[z, y + 1, x] if y + 1 < ny else 0.0
            down = heat[z, y - 1, x] if y > 0 else 0.0
            right = heat[z, y, x + 1] if x + 1 < nx else 0.0
            left = heat[z, y, x - 1] if x > 0 else 0.0
            gy = up - down
            gx = right - left
            if is_2d:
                norm = np.sqrt(gy * gy + gx * gx)
                if norm > 0.0:
                    flows[0, z, y, x] = gy / norm
                    flows[1, z, y, x] = gx / norm
            else:
                front = heat[z + 1, y, x] if z + 1 < nz else 0.0
                back = heat[z - 1, y, x] if z > 0 else 0.0
                gz = front - back
                norm = np.sqrt(gz * gz + gy * gy + gx * gx)
                if norm > 0.0:
                    flows[0, z, y, x] = gz / norm
                    flows[1, z, y, x] = gy / norm
                    flows[2, z, y, x] = gx / norm
    return flows
