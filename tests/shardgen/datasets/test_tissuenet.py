"""TissueNet converter: fake v1.0 / v1.1 npz downloads in the published layout, and npz_member."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardgen.base import LayoutError
from shardgen.datasets import tissuenet
from shardgen.datasets.tissuenet import CompressedNpyRows, npz_member
from tests.shardgen.datasets.helpers import (
    assert_layout_error, build_and_read, disc_mask, n_objects, samples_by_source, traced_peak,
)

SIZES = {"train": (3, 64), "val": (2, 32), "test": (2, 32)}  # (rows, side) as datasets.md's recipe


def _fake_split(n_rows: int, side: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """X (nucleus, membrane) float32 and y (cell, nucleus) int32 with known objects per row."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n_rows, side, side, 2), np.float32)
    labels = np.zeros((n_rows, side, side, 2), np.int32)
    n_cells = []
    for row in range(n_rows):
        count = 2 + row % 2  # 2 or 3 cells
        for k in range(count):
            centre = (side // 4 + (k * side) // 4, side // 4 + (k * side) // 4)
            cell = disc_mask(centre, (side, side), side // 8)
            labels[row, :, :, 0][cell] = 1000 + 7 * k  # whole-cell ids, not consecutive
            labels[row, :, :, 1][disc_mask(centre, (side, side), 2)] = k + 1
            images[row, :, :, 1][cell] += 0.75  # membrane/cytoplasm
        images[row, :, :, 0] = labels[row, :, :, 1] > 0  # nucleus
        images[row] += rng.random((side, side, 2), dtype=np.float32) * 0.1
        n_cells.append(count)
    labels[0, 0, 0, 1] = 99  # an extra nucleus-only id: counting the wrong channel would show it
    return images, labels, n_cells


def _meta(n_rows: int) -> np.ndarray:
    header = ["filename", "experiment", "pixel_size", "data_type", "platform", "specimen"]
    rows = [[f"img{i}", "exp", 0.5, "tissue", "codex", "breast"] for i in range(n_rows)]
    return np.array([header] + rows, dtype=object)


def _write_dataset(root: Path, version: str = "v1.1", compressed: bool = False) -> dict:
    """Write the three splits; return {split: (X, y, n_cells)}."""
    root.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compressed else np.savez
    written = {}
    for seed, (split, (n_rows, side)) in enumerate(SIZES.items()):
        images, labels, n_cells = _fake_split(n_rows, side, seed)
        if version == "v1.1":
            save(root / f"tissuenet_v1.1_{split}.npz", X=images, y=labels, meta=_meta(n_rows))
        elif version == "plain":
            save(root / f"{split}.npz", X=images, y=labels, meta=_meta(n_rows))
        else:  # v1.0
            save(
                root / f"tissuenet_v1.0_{split}.npz", X=images, y=labels,
                tissue_list=np.array(["breast"] * n_rows), platform_list=np.array(["codex"] * n_rows),
            )
        written[split] = (images, labels, n_cells)
    return written


# ------------------------------------------------------------------------------------------------
# find_items / load on the published layouts
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "prefix"), [("v1.1", "tissuenet_v1.1_"), ("plain", ""), ("v1.0", "tissuenet_v1.0_")]
)
def test_find_items_lists_every_row_of_each_split(tmp_path, version, prefix):
    _write_dataset(tmp_path, version)
    for split, (n_rows, _) in SIZES.items():
        items = tissuenet.find_items(tmp_path, split)
        assert [item.source for item in items] == [f"{prefix}{split}.npz[{i}]" for i in range(n_rows)]
        assert {item.split for item in items} == {split}
        assert {item.subset for item in items} == {""}


@pytest.mark.parametrize("compressed", [False, True])
@pytest.mark.parametrize("version", ["v1.1", "v1.0"])
def test_load_reorders_channels_and_takes_whole_cell_labels(tmp_path, version, compressed):
    written = _write_dataset(tmp_path, version, compressed)
    for split in SIZES:
        images, labels, n_cells = written[split]
        for item in tissuenet.find_items(tmp_path, split):
            row = item.ref[1]
            loaded = tissuenet.load(tmp_path, item)
            side = images.shape[1]
            assert loaded.image.shape == (side, side, 2)
            assert loaded.image.dtype == np.uint16  # real-valued floats -> uint16
            # channel 0 = membrane/cytoplasm (X[..., 1]), channel 1 = nucleus (X[..., 0]),
            # each mapped linearly from its own [min, max]
            for project_channel, source_channel in ((0, 1), (1, 0)):
                values = images[row, :, :, source_channel].astype(np.float64)
                expected = np.round((values - values.min()) / (values.max() - values.min()) * 65535)
                assert np.array_equal(loaded.image[:, :, project_channel], expected.astype(np.uint16))
            assert np.array_equal(loaded.labels, labels[row, :, :, 0])
            assert n_objects(loaded.labels) == n_cells[row]


def test_whole_number_images_stay_as_stored(tmp_path):
    images, labels, _ = _fake_split(2, 32, 0)
    images = np.round(images * 200).astype(np.float32)  # whole numbers 0..255
    np.savez(tmp_path / "tissuenet_v1.1_train.npz", X=images, y=labels)
    loaded = tissuenet.load(tmp_path, tissuenet.find_items(tmp_path, "train")[1])
    assert loaded.image.dtype == np.uint8
    assert np.array_equal(loaded.image, images[1][:, :, ::-1].astype(np.uint8))


@pytest.mark.parametrize(("folder", "version", "name"), [
    ("tissuenet_v1.1", "v1.1", "tissuenet_v1.1_val.npz"),
    # deepcell-tf's TissueNet downloads tissuenet_v1-1.zip / tissuenet_1-0.zip and reads
    # <zip name without .zip>/{split}.npz (deepcell/datasets/dataset.py, tissue_net.py).
    ("tissuenet_v1-1", "plain", "val.npz"),
    ("tissuenet_1-0", "plain", "val.npz"),
])
def test_version_and_deepcell_wrapper_folders_are_accepted(tmp_path, folder, version, name):
    _write_dataset(tmp_path / folder, version)
    items = tissuenet.find_items(tmp_path, "val")
    assert [item.source for item in items] == [f"{folder}/{name}[0]", f"{folder}/{name}[1]"]
    assert tissuenet.load(tmp_path, items[0]).labels.shape == (32, 32)


def test_both_deepcell_versions_side_by_side_raise(tmp_path):
    _write_dataset(tmp_path / "tissuenet_v1-1", "plain")
    _write_dataset(tmp_path / "tissuenet_1-0", "plain")
    with pytest.raises(LayoutError, match="tissuenet_v1-1/train.npz.*tissuenet_1-0/train.npz.*one version"):
        tissuenet.find_items(tmp_path, "train")


def test_two_versions_of_one_split_raise(tmp_path):
    _write_dataset(tmp_path, "v1.1")
    _write_dataset(tmp_path, "v1.0")
    with pytest.raises(LayoutError, match="several TissueNet files"):
        tissuenet.find_items(tmp_path, "train")


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "train.zip").write_bytes(b"PK")
    assert_layout_error(tissuenet.find_items, tmp_path, "train", match="tissuenet_v1.1_")
    assert_layout_error(tissuenet.find_items, tmp_path / "missing", "train")


def test_missing_split_file_lists_nothing(tmp_path):
    images, labels, _ = _fake_split(2, 32, 0)
    np.savez(tmp_path / "tissuenet_v1.1_train.npz", X=images, y=labels)
    assert tissuenet.find_items(tmp_path, "test") == []


def test_unknown_split_raises(tmp_path):
    _write_dataset(tmp_path)
    with pytest.raises(ValueError, match="splits"):
        tissuenet.find_items(tmp_path, "training")


# ------------------------------------------------------------------------------------------------
# Bad files: listed, then rejected with the file name
# ------------------------------------------------------------------------------------------------


def test_corrupt_file_is_one_item_rejected_by_name(tmp_path):
    _write_dataset(tmp_path)
    bad = tmp_path / "tissuenet_v1.1_test.npz"
    bad.write_bytes(bad.read_bytes()[:500])  # truncated: the zip directory at its end is gone
    items = tissuenet.find_items(tmp_path, "test")
    assert [item.source for item in items] == ["tissuenet_v1.1_test.npz"]
    with pytest.raises(ValueError, match="tissuenet_v1.1_test.npz"):
        tissuenet.load(tmp_path, items[0])


def test_missing_labels_key_is_rejected_by_name(tmp_path):
    images, _, _ = _fake_split(2, 32, 0)
    np.savez(tmp_path / "tissuenet_v1.1_train.npz", X=images)
    items = tissuenet.find_items(tmp_path, "train")
    assert len(items) == 1
    with pytest.raises(ValueError, match=r"tissuenet_v1.1_train.npz: has no array 'y'"):
        tissuenet.load(tmp_path, items[0])


def test_row_count_mismatch_rejects_every_row(tmp_path):
    images, labels, _ = _fake_split(3, 32, 0)
    np.savez(tmp_path / "tissuenet_v1.1_train.npz", X=images, y=labels[:2])
    items = tissuenet.find_items(tmp_path, "train")
    assert len(items) == 3  # nothing dropped
    for item in items:
        with pytest.raises(ValueError, match=r"tissuenet_v1.1_train.npz: expected X .* same N"):
            tissuenet.load(tmp_path, item)


def test_negative_label_ids_are_rejected(tmp_path):
    images, labels, _ = _fake_split(2, 32, 0)
    labels[1, 3, 3, 0] = -5
    np.savez(tmp_path / "tissuenet_v1.1_train.npz", X=images, y=labels)
    items = tissuenet.find_items(tmp_path, "train")
    assert tissuenet.load(tmp_path, items[0]).labels.max() > 0
    with pytest.raises(ValueError, match=r"tissuenet_v1.1_train.npz\[y\]\[1\].*negative"):
        tissuenet.load(tmp_path, items[1])


# ------------------------------------------------------------------------------------------------
# npz_member
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_member_rows_equal_np_load_in_any_order(tmp_path, compressed):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.random((7, 5, 3)).astype(np.float32), "b": rng.integers(0, 9, (7, 4), dtype=np.int16)}
    path = tmp_path / "x.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    for key, array in arrays.items():
        rows = npz_member(path, key)
        assert isinstance(rows, CompressedNpyRows if compressed else np.memmap)
        assert rows.shape == array.shape and rows.dtype == array.dtype and len(rows) == 7
        for row in [0, 3, 4, 1, 6, -1, 2]:  # backwards steps restart a compressed stream
            assert np.array_equal(np.asarray(rows[row]), array[row])


def test_npz_member_reads_fortran_order_when_stored(tmp_path):
    array = np.asfortranarray(np.arange(60, dtype=np.float64).reshape(5, 4, 3))
    np.savez(tmp_path / "f.npz", a=array)
    assert np.array_equal(np.asarray(npz_member(tmp_path / "f.npz", "a")[2]), array[2])
    np.savez_compressed(tmp_path / "fc.npz", a=array)
    with pytest.raises(ValueError, match="Fortran"):
        npz_member(tmp_path / "fc.npz", "a")


def test_npz_member_refuses_object_arrays_and_bad_indices(tmp_path):
    np.savez_compressed(tmp_path / "m.npz", meta=_meta(2), a=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="Python objects"):
        npz_member(tmp_path / "m.npz", "meta")
    rows = npz_member(tmp_path / "m.npz", "a")
    with pytest.raises(IndexError):
        rows[2]
    with pytest.raises(TypeError):
        rows[0:1]
    with pytest.raises(FileNotFoundError):
        npz_member(tmp_path / "nothing.npz", "a")


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_member_reads_one_row_without_reading_the_array(tmp_path, compressed):
    # 32 MiB of float32; each row holds its index, so it compresses well and writes fast.
    n_rows, side = 128, 256
    big = np.repeat(np.arange(n_rows, dtype=np.float32), side * side).reshape(n_rows, side, side)
    path = tmp_path / "big.npz"
    (np.savez_compressed if compressed else np.savez)(path, X=big)
    del big
    row, peak = traced_peak(lambda: np.asarray(npz_member(path, "X")[120]))
    assert row.shape == (side, side) and np.all(row == 120)
    array_bytes = n_rows * side * side * 4
    # One row is 256 KiB; the streaming buffer is 1 MiB. The array is 32 MiB.
    assert peak < array_bytes / 8, f"peak {peak / 2**20:.1f} MiB reading one row of {array_bytes / 2**20:.0f} MiB"


# ------------------------------------------------------------------------------------------------
# End to end
# ------------------------------------------------------------------------------------------------


def test_build_end_to_end_from_compressed_npz(tmp_path, shards_dir):
    written = _write_dataset(tmp_path / "src", compressed=True)
    built = build_and_read("tissuenet", tmp_path / "src", shards_dir)
    assert built.summary["written"] == sum(n for n, _ in SIZES.values()) and built.summary["rejected"] == 0
    samples = samples_by_source(built.samples)
    for split, (images, _, n_cells) in written.items():
        for row in range(len(images)):
            image, labels, meta = samples[f"tissuenet_v1.1_{split}.npz[{row}]"]
            assert meta.split == split and meta.modality == "fluorescence"
            assert meta.channel_names == ("membrane/cytoplasm", "nucleus") and image.shape[2] == 2
            assert int(labels.max()) == meta.n_cells == n_cells[row]
