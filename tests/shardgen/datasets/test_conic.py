"""CoNIC converter: a fake release (images.npy, labels.npy, patch_info.csv, counts.csv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardgen.datasets import conic
from tests.shardgen.datasets.helpers import (
    assert_layout_error, build_and_read, n_objects, samples_by_source, traced_peak,
)

N_ROWS, SIDE = 4, 32


def _write_release(root: Path) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The recipe of datasets.md 2.18: 4 patches of 32 px with 1..3 rectangular nuclei each."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N_ROWS, SIDE, SIDE, 3), dtype=np.uint8)
    labels = np.zeros((N_ROWS, SIDE, SIDE, 2), np.uint16)
    n_nuclei = []
    for row in range(N_ROWS):
        count = 1 + row % 3
        for k in range(count):
            labels[row, 2 + 9 * k : 8 + 9 * k, 4:10, 0] = k + 1
            labels[row, 2 + 9 * k : 8 + 9 * k, 4:10, 1] = 2  # class map: epithelial
        n_nuclei.append(count)
    np.save(root / "images.npy", images)
    np.save(root / "labels.npy", labels)
    patches = "".join(f"consep_{1 + r // 2}-{r:04d}\n" for r in range(N_ROWS))
    (root / "patch_info.csv").write_text("patch_info\n" + patches)
    header = "neutrophil,epithelial,lymphocyte,plasma,eosinophil,connective\n"
    (root / "counts.csv").write_text(header + "0,1,0,0,0,0\n" * N_ROWS)
    return images, labels, n_nuclei


def test_find_items_lists_one_item_per_patch(tmp_path):
    _write_release(tmp_path)
    items = conic.find_items(tmp_path, "all")
    assert [item.source for item in items] == [f"images.npy[{i}]" for i in range(N_ROWS)]
    assert {(item.split, item.subset) for item in items} == {("all", "")}
    assert conic.INFO.splits == ("all",)


def test_load_returns_rgb_and_instance_channel(tmp_path):
    images, labels, n_nuclei = _write_release(tmp_path)
    for item, row in zip(conic.find_items(tmp_path, "all"), range(N_ROWS)):
        loaded = conic.load(tmp_path, item)
        assert loaded.image.dtype == np.uint8 and loaded.image.shape == (SIDE, SIDE, 3)
        assert np.array_equal(loaded.image, images[row])
        assert np.array_equal(loaded.labels, labels[row, :, :, 0])
        assert n_objects(loaded.labels) == n_nuclei[row]
        assert not isinstance(loaded.image, np.memmap) and not isinstance(loaded.labels, np.memmap)


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(conic.find_items, tmp_path, "all", match="images.npy")


def test_truncated_labels_reject_every_item_by_name(tmp_path):
    _write_release(tmp_path)
    labels = tmp_path / "labels.npy"
    labels.write_bytes(labels.read_bytes()[:5000])
    items = conic.find_items(tmp_path, "all")
    assert len(items) == N_ROWS  # counted from images.npy
    with pytest.raises(ValueError, match="labels.npy"):
        conic.load(tmp_path, items[0])


def test_corrupt_images_and_missing_labels(tmp_path):
    _write_release(tmp_path)
    (tmp_path / "images.npy").write_bytes(b"not an npy file at all")
    (tmp_path / "labels.npy").unlink()
    items = conic.find_items(tmp_path, "all")
    assert [item.source for item in items] == ["images.npy"]
    with pytest.raises(ValueError, match="images.npy"):
        conic.load(tmp_path, items[0])


def test_missing_images_file_is_rejected_by_name(tmp_path):
    _write_release(tmp_path)
    (tmp_path / "images.npy").unlink()
    items = conic.find_items(tmp_path, "all")
    assert len(items) == N_ROWS  # counted from labels.npy
    with pytest.raises(ValueError, match="images.npy: missing"):
        conic.load(tmp_path, items[1])


def test_row_count_mismatch_is_rejected(tmp_path):
    images, labels, _ = _write_release(tmp_path)
    np.save(tmp_path / "labels.npy", labels[:3])
    items = conic.find_items(tmp_path, "all")
    assert len(items) == N_ROWS
    with pytest.raises(ValueError, match="same N"):
        conic.load(tmp_path, items[0])


def test_load_reads_one_row_not_the_arrays(tmp_path):
    n_rows, side = 64, 256  # 12 MiB of images, 16 MiB of labels
    np.save(tmp_path / "images.npy", np.zeros((n_rows, side, side, 3), np.uint8))
    labels = np.zeros((n_rows, side, side, 2), np.uint16)
    labels[40, 10:20, 10:20, 0] = 5
    np.save(tmp_path / "labels.npy", labels)
    del labels
    item = conic.find_items(tmp_path, "all")[40]
    loaded, peak = traced_peak(conic.load, tmp_path, item)
    assert np.unique(loaded.labels).tolist() == [0, 5]
    assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB for one 256 px patch"


def test_build_end_to_end(tmp_path, shards_dir):
    _, _, n_nuclei = _write_release(tmp_path / "src")
    built = build_and_read("conic", tmp_path / "src", shards_dir)
    assert built.summary["written"] == N_ROWS and built.summary["rejected"] == 0
    samples = samples_by_source(built.samples)
    assert {source: meta.n_cells for source, (_, _, meta) in samples.items()} == {
        f"images.npy[{row}]": n_nuclei[row] for row in range(N_ROWS)
    }
    for image, labels, meta in samples.values():
        assert image.dtype == np.uint8 and image.shape == (SIDE, SIDE, 3) and meta.modality == "he"
        assert int(labels.max()) == meta.n_cells
