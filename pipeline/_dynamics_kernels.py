"""Compiled kernels behind :mod:`pipeline.dynamics`.

Private: call the validated public function ``pipeline.dynamics.flows_to_masks``, never these
directly. Each kernel has a plain NumPy twin in ``pipeline/dynamics.py`` (``_<name>_reference``)
and the tests assert the two agree. Flow following does its arithmetic in the same order as its
twin (float64, no fast-math, so no fused multiply-adds), which makes the two agree to the last
bit rather than to a tolerance.

Flow following has a 2-D kernel (the hot path) and a 3-D one. The other kernels work on
(Z, Y, X) volumes and take 2-D images as Z = 1, where a z-neighbourhood clipped to the volume is
the 2-D neighbourhood, so one code path serves both.

Every kernel releases the GIL (``nogil``): on a GPU, ``infer.predict.predict_stream`` follows
one image's flows in a worker thread while the main thread keeps the network busy.
"""

import numba
import numpy as np

# Pixels followed side by side by one thread. One pixel's Euler steps form a serial chain
# (position -> index -> load -> interpolate -> position), so a single trajectory runs at the
# latency of that chain; interleaving independent trajectories lets the CPU overlap them.
# Measured on 2 cores: about 2x faster than one trajectory at a time.
_LANES = 8
# Pixels handed to a thread at a time: small enough to balance threads when some regions
# converge faster than others, large enough to amortise the lane set-up.
_CHUNK = 2048

# ------------------------------------------------------------------------------------------------
# Following flows (Euler integration with bilinear / trilinear sampling)
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, parallel=True)
def prepare_flows_2d_numba(dP, cellprob, threshold, flow_scale):
    """The step field and the pixels to follow; see ``_follow_flows_reference``.

    Returns ``padded_flows`` (Y + 2, X + 2, 2) float32, ``dP / flow_scale`` on pixels with
    ``cellprob > threshold`` and 0 elsewhere, channels last, with a ring of zeros (so sampling
    needs no bounds checks); and ``starts``, those pixels' flat indices in raster order (int64).
    """
    ny, nx = cellprob.shape
    padded_flows = np.zeros((ny + 2, nx + 2, 2), dtype=np.float32)
    row_counts = np.zeros(ny, dtype=np.int64)
    for y in numba.prange(ny):
        count = 0
        for x in range(nx):
            if cellprob[y, x] > threshold:
                # Divide in dP's own precision, then round to float32, as NumPy does.
                padded_flows[y + 1, x + 1, 0] = dP[0, y, x] / flow_scale
                padded_flows[y + 1, x + 1, 1] = dP[1, y, x] / flow_scale
                count += 1
        row_counts[y] = count
    row_offsets = np.cumsum(row_counts) - row_counts
    starts = np.empty(row_offsets[-1] + row_counts[-1] if ny > 0 else 0, dtype=np.int64)
    for y in numba.prange(ny):
        k = row_offsets[y]
        for x in range(nx):
            if cellprob[y, x] > threshold:
                starts[k] = y * nx + x
                k += 1
    return padded_flows, starts


@numba.njit(cache=True, nogil=True, parallel=True)
def follow_flows_2d_numba(padded_flows, starts, niter, scale, tol):
    """Euler-integrate 2-D flows from each start pixel; see ``_follow_flows_reference``.

    ``padded_flows`` is (Y + 2, X + 2, 2) float32 from ``prepare_flows_2d_numba``; ``starts``
    holds flat int64 pixel indices; ``scale`` is the (2,) float64 factor mapping a position to
    its sampling coordinate. Returns final (y, x) positions, (n, 2) float32.
    """
    n = starts.shape[0]
    final = np.empty((n, 2), dtype=np.float32)
    nx = padded_flows.shape[1] - 2
    max_y = padded_flows.shape[0] - 3.0
    max_x = padded_flows.shape[1] - 3.0
    scale_y = scale[0]
    scale_x = scale[1]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for chunk in numba.prange(n_chunks):
        stop = min(n, (chunk + 1) * _CHUNK)
        next_pixel = chunk * _CHUNK
        lane_pixel = np.full(_LANES, -1, dtype=np.int64)
        lane_y = np.zeros(_LANES)
        lane_x = np.zeros(_LANES)
        lane_steps = np.zeros(_LANES, dtype=np.int64)
        # Position one step back, to spot 2-cycles; NaN compares false, so "none yet".
        lane_back_y = np.full(_LANES, np.nan)
        lane_back_x = np.full(_LANES, np.nan)
        n_busy = 0
        for lane in range(_LANES):
            if next_pixel < stop:
                lane_pixel[lane] = next_pixel
                lane_y[lane] = starts[next_pixel] // nx
                lane_x[lane] = starts[next_pixel] % nx
                next_pixel += 1
                n_busy += 1
        if niter == 0:  # nothing moves
            for i in range(chunk * _CHUNK, stop):
                final[i, 0] = starts[i] // nx
                final[i, 1] = starts[i] % nx
            n_busy = 0
        while n_busy > 0:
            for lane in range(_LANES):
                if lane_pixel[lane] < 0:
                    continue
                y = lane_y[lane]
                x = lane_x[lane]
                # Sampling coordinate in the padded array: position * scale - 0.5, plus 1 for
                # the zero ring. It is >= 0.5, so int() truncation is floor().
                sy = y * scale_y + 0.5
                sx = x * scale_x + 0.5
                iy = int(sy)
                ix = int(sx)
                wy = sy - iy
                wx = sx - ix
                dy = (1.0 - wy) * ((1.0 - wx) * padded_flows[iy, ix, 0]
                                   + wx * padded_flows[iy, ix + 1, 0]) \
                    + wy * ((1.0 - wx) * padded_flows[iy + 1, ix, 0]
                            + wx * padded_flows[iy + 1, ix + 1, 0])
                dx = (1.0 - wy) * ((1.0 - wx) * padded_flows[iy, ix, 1]
                                   + wx * padded_flows[iy, ix + 1, 1]) \
                    + wy * ((1.0 - wx) * padded_flows[iy + 1, ix, 1]
                            + wx * padded_flows[iy + 1, ix + 1, 1])
                new_y = min(max(y + dy, 0.0), max_y)
                new_x = min(max(x + dx, 0.0), max_x)
                steps = lane_steps[lane] + 1
                # Converged: a fixed point, or a 2-cycle (back where it was two steps ago), in
                # which case it stops where an odd or even number of further steps leaves it.
                in_cycle = abs(new_y - lane_back_y[lane]) < tol and abs(new_x - lane_back_x[lane]) < tol
                if in_cycle and (niter - steps) % 2 == 1:
                    new_y = y
                    new_x = x
                if in_cycle or steps >= niter or (abs(new_y - y) < tol and abs(new_x - x) < tol):
                    i = lane_pixel[lane]
                    final[i, 0] = new_y
                    final[i, 1] = new_x
                    if next_pixel < stop:  # refill the lane with the chunk's next pixel
                        lane_pixel[lane] = next_pixel
                        lane_y[lane] = starts[next_pixel] // nx
                        lane_x[lane] = starts[next_pixel] % nx
                        lane_steps[lane] = 0
                        lane_back_y[lane] = np.nan
                        lane_back_x[lane] = np.nan
                        next_pixel += 1
                    else:
                        lane_pixel[lane] = -1
                        n_busy -= 1
                else:
                    lane_back_y[lane] = y
                    lane_back_x[lane] = x
                    lane_y[lane] = new_y
                    lane_x[lane] = new_x
                    lane_steps[lane] = steps
    return final


@numba.njit(cache=True, nogil=True, parallel=True)
def follow_flows_3d_numba(padded_flows, starts, niter, scale, tol):
    """Euler-integrate 3-D flows from each start voxel; see ``_follow_flows_reference``.

    ``padded_flows`` is (Z + 2, Y + 2, X + 2, 3) float32 with a ring of zeros; ``starts`` holds
    flat int64 voxel indices; ``scale`` is (3,) float64. Returns final (z, y, x) positions,
    (n, 3) float32. One trajectory at a time: 3-D is not the hot path.
    """
    n = starts.shape[0]
    final = np.empty((n, 3), dtype=np.float32)
    ny = padded_flows.shape[1] - 2
    nx = padded_flows.shape[2] - 2
    upper = np.empty(3)
    for axis in range(3):
        upper[axis] = padded_flows.shape[axis] - 3.0
    for i in numba.prange(n):
        p = np.empty(3)
        new = np.empty(3)
        step = np.empty(3)
        back = np.full(3, np.nan)  # position one step back (NaN: none yet)
        p[0] = starts[i] // (ny * nx)
        p[1] = (starts[i] // nx) % ny
        p[2] = starts[i] % nx
        for t in range(niter):
            sz = p[0] * scale[0] + 0.5
            sy = p[1] * scale[1] + 0.5
            sx = p[2] * scale[2] + 0.5
            iz = int(sz)
            iy = int(sy)
            ix = int(sx)
            wz = sz - iz
            wy = sy - iy
            wx = sx - ix
            for c in range(3):
                # Same nesting as the reference: lerp along x, then y, then z.
                v00 = (1.0 - wx) * padded_flows[iz, iy, ix, c] + wx * padded_flows[iz, iy, ix + 1, c]
                v01 = (1.0 - wx) * padded_flows[iz, iy + 1, ix, c] \
                    + wx * padded_flows[iz, iy + 1, ix + 1, c]
                v10 = (1.0 - wx) * padded_flows[iz + 1, iy, ix, c] \
                    + wx * padded_flows[iz + 1, iy, ix + 1, c]
                v11 = (1.0 - wx) * padded_flows[iz + 1, iy + 1, ix, c] \
                    + wx * padded_flows[iz + 1, iy + 1, ix + 1, c]
                step[c] = (1.0 - wz) * ((1.0 - wy) * v00 + wy * v01) \
                    + wz * ((1.0 - wy) * v10 + wy * v11)
            fixed = True
            in_cycle = True
            for axis in range(3):
                new[axis] = min(max(p[axis] + step[axis], 0.0), upper[axis])
                fixed = fixed and abs(new[axis] - p[axis]) < tol
                in_cycle = in_cycle and abs(new[axis] - back[axis]) < tol
            if in_cycle and (niter - t - 1) % 2 == 1:
                break  # stay on p: an odd number of further steps would bring it back here
            for axis in range(3):
                back[axis] = p[axis]
                p[axis] = new[axis]
            if fixed or in_cycle:
                break
        for axis in range(3):
            final[i, axis] = p[axis]
    return final


# ------------------------------------------------------------------------------------------------
# Histogram clustering: seeds at local maxima, grown over well-visited bins
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def histogram_numba(final_positions, shape):
    """Truncate (n, ndim) final positions to bins; return (flat bin per pixel int64, counts per
    bin int32 of size prod(shape)). Positions are >= 0, so truncation is floor."""
    n, ndim = final_positions.shape
    size = 1
    for axis in range(ndim):
        size *= shape[axis]
    bins = np.empty(n, dtype=np.int64)
    hist = np.zeros(size, dtype=np.int32)
    for i in range(n):
        flat = 0
        for axis in range(ndim):
            flat = flat * shape[axis] + int(final_positions[i, axis])
        bins[i] = flat
        hist[flat] += 1
    return bins, hist


@numba.njit(cache=True, nogil=True)
def is_local_max_numba(hist, candidates, radius):
    """For each flat index in ``candidates``, whether its bin is the maximum of the
    (2 * radius + 1)^3 window around it, clipped to the (Z, Y, X) ``hist``. Ties count as maxima.
    """
    nz, ny, nx = hist.shape
    flat = hist.ravel()
    is_max = np.ones(candidates.size, dtype=np.bool_)
    for k in range(candidates.size):
        c = candidates[k]
        z, rest = divmod(c, ny * nx)
        y, x = divmod(rest, nx)
        count = flat[c]
        for zz in range(max(z - radius, 0), min(z + radius + 1, nz)):
            for yy in range(max(y - radius, 0), min(y + radius + 1, ny)):
                for xx in range(max(x - radius, 0), min(x + radius + 1, nx)):
                    if hist[zz, yy, xx] > count:
                        is_max[k] = False
    return is_max


@numba.njit(cache=True, nogil=True)
def grow_seeds_numba(hist, seeds, radius, n_rounds, min_count):
    """Label the bins each seed reaches; see ``_cluster_bins_reference``.

    ``seeds`` are flat indices into the (Z, Y, X) ``hist`` in increasing order of count. Seed k
    (label k + 1) grows from its bin by ``n_rounds`` 3x3(x3) dilations restricted to bins with
    count > ``min_count`` inside the (2 * radius + 1)^3 window around it, clipped to the volume.
    Seeds are written in order, so where regions overlap the later (higher-count) seed wins.
    Returns (Z, Y, X) int32 bin labels, 0 = reached by no seed.
    """
    nz, ny, nx = hist.shape
    bin_labels = np.zeros(hist.shape, dtype=np.int32)
    width = 2 * radius + 1
    grown = np.zeros((width, width, width), dtype=np.bool_)
    dilated = np.zeros((width, width, width), dtype=np.bool_)
    for k in range(seeds.size):
        z, rest = divmod(seeds[k], ny * nx)
        y, x = divmod(rest, nx)
        # Window [lo, hi) in volume coordinates; local index = volume index - (centre - radius).
        z0, z1 = max(z - radius, 0), min(z + radius + 1, nz)
        y0, y1 = max(y - radius, 0), min(y + radius + 1, ny)
        x0, x1 = max(x - radius, 0), min(x + radius + 1, nx)
        oz, oy, ox = z - radius, y - radius, x - radius
        grown[:] = False
        grown[radius, radius, radius] = True
        for _ in range(n_rounds):
            for zz in range(z0, z1):
                for yy in range(y0, y1):
                    for xx in range(x0, x1):
                        hit = False
                        if hist[zz, yy, xx] > min_count:
                            for az in range(max(zz - 1, z0), min(zz + 2, z1)):
                                for ay in range(max(yy - 1, y0), min(yy + 2, y1)):
                                    for ax in range(max(xx - 1, x0), min(xx + 2, x1)):
                                        if grown[az - oz, ay - oy, ax - ox]:
                                            hit = True
                        dilated[zz - oz, yy - oy, xx - ox] = hit
            for zz in range(z0, z1):
                for yy in range(y0, y1):
                    for xx in range(x0, x1):
                        grown[zz - oz, yy - oy, xx - ox] = dilated[zz - oz, yy - oy, xx - ox]
        for zz in range(z0, z1):
            for yy in range(y0, y1):
                for xx in range(x0, x1):
                    if grown[zz - oz, yy - oy, xx - ox]:
                        bin_labels[zz, yy, xx] = k + 1
    return bin_labels


# ------------------------------------------------------------------------------------------------
# Clean-up: flow error, relabelling and hole filling
# ------------------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def mean_flow_error_numba(masks, flows_from_masks, dP, flow_scale, n_labels):
    """Per label, the mean over its pixels of ``sum_c (flows_from_masks[c] - dP[c] / flow_scale)^2``
    in float64; see ``_mean_flow_error_reference``. Returns (n_labels + 1,) float64, 0 where a
    label has no pixels. ``masks`` is (Y, X); the flow arrays are (2, Y, X).
    """
    ny, nx = masks.shape
    sums = np.zeros(n_labels + 1)
    counts = np.zeros(n_labels + 1, dtype=np.int64)
    for y in range(ny):
        for x in range(nx):
            label = masks[y, x]
            if label == 0:
                continue
            ey = np.float64(flows_from_masks[0, y, x]) - np.float64(dP[0, y, x]) / flow_scale
            ex = np.float64(flows_from_masks[1, y, x]) - np.float64(dP[1, y, x]) / flow_scale
            sums[label] += ey * ey + ex * ex
            counts[label] += 1
    for label in range(n_labels + 1):
        if counts[label] > 0:
            sums[label] /= counts[label]
    return sums


@numba.njit(cache=True, nogil=True)
def relabel_numba(masks_flat, keep):
    """Renumber kept labels 1..N in raster order of first appearance; others become 0.

    ``keep`` is a bool array indexed by label (``keep[0]`` is ignored). Returns
    ``(uint32 masks_flat, N)``.
    """
    new_id = np.zeros(keep.size, dtype=np.uint32)
    out = np.zeros(masks_flat.size, dtype=np.uint32)
    n = 0
    for i in range(masks_flat.size):
        label = masks_flat[i]
        if label == 0 or not keep[label]:
            continue
        if new_id[label] == 0:
            n += 1
            new_id[label] = n
        out[i] = new_id[label]
    return out, n


@numba.njit(cache=True, nogil=True)
def fill_holes_numba(masks, n_labels, is_3d):
    """Fill each object's holes in place, objects 1..n_labels in order; see
    ``_fill_holes_reference``.

    A hole of object k is a region of the object's bounding box, not in k, that cannot reach the
    box's border through face-connected (4 in 2-D, 6 in 3-D) non-k pixels. Holes may contain
    other objects, which are overwritten, as in Cellpose. ``masks`` is (Z, Y, X) uint32; a 2-D
    image comes as Z = 1 with ``is_3d`` False, so its z-faces are not borders.
    """
    nz, ny, nx = masks.shape
    lo = np.empty((n_labels + 1, 3), dtype=np.int64)
    hi = np.zeros((n_labels + 1, 3), dtype=np.int64)
    lo[:, 0] = nz
    lo[:, 1] = ny
    lo[:, 2] = nx
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                k = masks[z, y, x]
                if k == 0:
                    continue
                lo[k, 0] = min(lo[k, 0], z)
                lo[k, 1] = min(lo[k, 1], y)
                lo[k, 2] = min(lo[k, 2], x)
                hi[k, 0] = max(hi[k, 0], z + 1)
                hi[k, 1] = max(hi[k, 1], y + 1)
                hi[k, 2] = max(hi[k, 2], x + 1)
    max_volume = 0
    for k in range(1, n_labels + 1):
        volume = (hi[k, 0] - lo[k, 0]) * (hi[k, 1] - lo[k, 1]) * (hi[k, 2] - lo[k, 2])
        max_volume = max(max_volume, volume)
    reached = np.zeros(max_volume, dtype=np.bool_)
    stack = np.empty(max_volume, dtype=np.int64)
    for k in range(1, n_labels + 1):
        if hi[k, 0] == 0:
            continue  # label not present
        z0, y0, x0 = lo[k, 0], lo[k, 1], lo[k, 2]
        bz, by, bx = hi[k, 0] - z0, hi[k, 1] - y0, hi[k, 2] - x0
        reached[: bz * by * bx] = False
        top = 0
        # Seed the flood with every non-k pixel on the box's border.
        for z in range(bz):
            for y in range(by):
                for x in range(bx):
                    on_border = (is_3d and (z == 0 or z == bz - 1)) or y == 0 or y == by - 1 \
                        or x == 0 or x == bx - 1
                    if on_border and masks[z0 + z, y0 + y, x0 + x] != k:
                        j = (z * by + y) * bx + x
                        reached[j] = True
                        stack[top] = j
                        top += 1
        while top > 0:
            top -= 1
            j = stack[top]
            z, rest = divmod(j, by * bx)
            y, x = divmod(rest, bx)
            for axis in range(3):
                for delta in (-1, 1):
                    zz, yy, xx = z, y, x
                    if axis == 0:
                        zz += delta
                    elif axis == 1:
                        yy += delta
                    else:
                        xx += delta
                    if zz < 0 or zz >= bz or yy < 0 or yy >= by or xx < 0 or xx >= bx:
                        continue
                    jj = (zz * by + yy) * bx + xx
                    if not reached[jj] and masks[z0 + zz, y0 + yy, x0 + xx] != k:
                        reached[jj] = True
                        stack[top] = jj
                        top += 1
        for z in range(bz):
            for y in range(by):
                for x in range(bx):
                    if not reached[(z * by + y) * bx + x]:
                        masks[z0 + z, y0 + y, x0 + x] = k
    return masks
