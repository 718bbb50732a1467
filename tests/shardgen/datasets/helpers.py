"""Plain helpers shared by the converter tests: fixture writers, the end-to-end build, error checks.

Fixtures (pytest) live in conftest.py beside this file; these are ordinary functions, imported as
``from tests.shardgen.datasets.helpers import ...``.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import NamedTuple

import imagecodecs
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import webdataset as wds
from PIL import Image

from pipeline.shards import decode_sample
from shardgen.base import LayoutError
from shardgen.build import build_dataset

# ------------------------------------------------------------------------------------------------
# Fixture writers
# ------------------------------------------------------------------------------------------------


def disc_mask(centre, shape, radius=5) -> np.ndarray:
    """(H, W) bool: the pixels within ``radius`` of ``centre`` (row, col), the edge included."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def disc_labels(centres, shape, radius=5, dtype=np.uint16) -> np.ndarray:
    """(H, W) labels of ``dtype`` with one disc per centre, ids 1..n in order; 0 = background."""
    labels = np.zeros(shape, dtype)
    for index, centre in enumerate(centres, 1):
        labels[disc_mask(centre, shape, radius)] = index
    return labels


def random_uint8(shape, seed: int) -> np.ndarray:
    """uint8 noise of ``shape`` from ``np.random.default_rng(seed)``: an image whose every pixel is checkable."""
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_image(path: Path, array: np.ndarray, **tiff_options) -> np.ndarray:
    """Write ``array`` to ``path``, creating its folder; returns ``array``.

    ``.tif``/``.tiff`` go through tifffile (``tiff_options`` such as ``photometric`` are passed
    on); 16-bit RGB(A) PNGs through imagecodecs, since Pillow cannot write them; anything else
    through Pillow, which picks the format from the suffix.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array, **tiff_options)
    elif array.dtype == np.uint16 and array.ndim == 3:
        path.write_bytes(imagecodecs.png_encode(array))
    else:
        Image.fromarray(array).save(path)
    return array


def truncate(path: Path, divisor: int = 2) -> None:
    """Keep only the first 1/``divisor`` of the file's bytes, as an interrupted download does."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // divisor])


def damage_file(path: Path, damage: str, junk: bytes, divisor: int = 2) -> None:
    """``damage`` "corrupt": replace the file's bytes with ``junk``; otherwise ("truncated"):
    :func:`truncate` it to its first 1/``divisor``."""
    if damage == "corrupt":
        path.write_bytes(junk)
    else:
        truncate(path, divisor)


# ------------------------------------------------------------------------------------------------
# Listings, counts, memory
# ------------------------------------------------------------------------------------------------


def by_source(items) -> dict:
    """{item.source: item} of a find_items listing."""
    return {item.source: item for item in items}


def source_split_subset(items) -> list[tuple[str, str, str]]:
    """[(source, split, subset)] of a find_items listing, in its order."""
    return [(item.source, item.split, item.subset) for item in items]


def n_objects(labels: np.ndarray) -> int:
    """Number of distinct non-zero ids in ``labels``."""
    return len(np.unique(labels[labels > 0]))


def traced_peak(function, *args):
    """(``function(*args)``, the peak bytes Python allocated meanwhile, as tracemalloc counts them)."""
    tracemalloc.start()
    try:
        result = function(*args)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


# ------------------------------------------------------------------------------------------------
# Error checks
# ------------------------------------------------------------------------------------------------


def assert_layout_error(find_items, root: Path, split: str, match: str | None = None) -> None:
    """``find_items(root, split)`` raises LayoutError, its message matching the regex ``match`` if given."""
    with pytest.raises(LayoutError, match=match):
        find_items(root, split)


def assert_load_errors(load, root: Path, items: dict, expected: dict, error=ValueError) -> None:
    """For every ``source: message`` of ``expected``: ``source`` is listed in ``items`` (by source),
    and ``load(root, items[source])`` raises ``error`` with a message matching the regex ``message``."""
    for source, message in expected.items():
        assert source in items, f"{source} is not listed; listed: {sorted(items)}"
        with pytest.raises(error, match=message):
            load(root, items[source])


# ------------------------------------------------------------------------------------------------
# End to end: build the shards, read them back
# ------------------------------------------------------------------------------------------------


class Built(NamedTuple):
    """What :func:`build_and_read` gives back."""

    summary: dict  # build_dataset's summary row: dataset, found, written, rejected, cells
    samples: list  # decode_sample's (image, labels, flows, meta, ignore), one per sample, shard order
    rejects: list[dict]  # the rows of out/rejects.parquet


def build_and_read(name: str, root: Path, out: Path) -> Built:
    """Convert ``root`` with ``shardgen.build.build_dataset(name, root, out)``, then read every shard
    of ``out/name`` back with plain ``webdataset.WebDataset`` + ``pipeline.shards.decode_sample``,
    and ``out/rejects.parquet`` with pyarrow."""
    summary = build_dataset(name, root, out)
    urls = sorted(str(path) for path in (Path(out) / name).glob("*.tar"))
    samples = [decode_sample(raw) for raw in wds.WebDataset(urls, shardshuffle=False)]
    rejects = pq.read_table(Path(out) / "rejects.parquet").to_pylist()
    return Built(summary, samples, rejects)


def max_labels(samples, key=lambda meta: meta.source) -> dict:
    """{key(meta): int(labels.max())} of decoded samples: each sample's largest id, by ``key``."""
    return {key(meta): int(labels.max()) for _, labels, _, meta, _ in samples}


def samples_by_source(samples) -> dict:
    """{meta.source: (image, labels, meta)} of decoded samples."""
    return {meta.source: (image, labels, meta) for image, labels, _, meta, _ in samples}
