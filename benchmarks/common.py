"""What the benchmark scripts share: real-label inputs, timing, and the machine's description.

Inputs: the real Cellpose "cyto" masks in ../shared/data are cut into 256x256 crops; a mosaic of
crops, each renumbered so ids stay unique, gives a label image of any size with realistic object
shapes, sizes and touching borders.
"""

import os
import platform
import statistics
import time
from pathlib import Path

import fastremap
import numpy as np
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CROP = 256
# The two sizes every benchmark reports, with the object count the issues ask for.
CASES = {512: 125, 2048: 2000}


def median_seconds(fn, repeats: int) -> tuple[float, list[float], object]:
    """Median wall time of ``repeats`` calls of ``fn``, all times, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall-clock times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(variants: dict, repeats: int, device: torch.device) -> tuple[dict, dict[str, list[float]]]:
    """Each variant's output from a warm-up call, and the seconds of ``repeats`` timed calls each.

    The variants take turns within each round, so that changing machine load hits them alike.
    """
    outputs = {name: fn() for name, fn in variants.items()}  # warm-up: compilation, caches
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return outputs, times


def cpu_description() -> str:
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _real_crops(root: Path) -> list[np.ndarray]:
    files = sorted((root / "cellpose_cyto" / "train").glob("*_masks.png"))
    if not files:
        raise FileNotFoundError(
            f"no *_masks.png under {root / 'cellpose_cyto' / 'train'}; the benchmarks tile the "
            "real Cellpose samples from ../shared/data"
        )
    crops = []
    for path in files:
        labels = np.asarray(Image.open(path))
        for y in range(0, labels.shape[0] - CROP + 1, CROP):
            for x in range(0, labels.shape[1] - CROP + 1, CROP):
                crop, _ = fastremap.renumber(labels[y : y + CROP, x : x + CROP].copy(), preserve_zero=True)
                crops.append(crop.astype(np.uint32))
    return crops


def tiled_real_labels(size: int, n_objects: int, root: Path = SHARED_DATA) -> np.ndarray:
    """A (size, size) uint32 label mosaic of real crops with about ``n_objects`` objects.

    Crops are drawn with replacement by a seeded generator, then tiles are swapped one at a time
    for the crop that brings the total closest to the target; the result is deterministic.
    """
    if size % CROP:
        raise ValueError(f"size must be a multiple of {CROP}; got {size}")
    crops = _real_crops(root)
    per_side = size // CROP
    n_tiles = per_side * per_side
    counts = np.array([int(c.max()) for c in crops])
    best = np.random.default_rng(0).choice(len(crops), n_tiles)
    for i in range(n_tiles):
        rest = int(counts[best].sum() - counts[best[i]])
        best[i] = int(np.argmin(np.abs(rest + counts - n_objects)))
    mosaic = np.zeros((size, size), dtype=np.uint32)
    offset = 0
    for i in range(n_tiles):
        crop = crops[best[i]]
        ty, tx = divmod(i, per_side)
        tile = mosaic[ty * CROP : (ty + 1) * CROP, tx * CROP : (tx + 1) * CROP]
        tile[...] = np.where(crop > 0, crop + offset, 0)
        offset += int(crop.max())
    return mosaic
