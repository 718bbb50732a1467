"""PanNuke converter: fake fold folders with float64 images and 6-channel float64 masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from shardgen.datasets import pannuke
from tests.shardgen.datasets.helpers import assert_layout_error, build_and_read, samples_by_source, traced_peak

N_ROWS, SIDE = 3, 32


def _write_fold(root: Path, k: int, n_rows: int = N_ROWS, side: int = SIDE) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """datasets.md 2.19's recipe: non-contiguous ids in two class channels, channel 5 background.

    Row 0 also has an id in two disconnected pieces and a cross-class overlap pixel.
    """
    image_dir, mask_dir = root / f"Fold {k}" / "images" / f"fold{k}", root / f"Fold {k}" / "masks" / f"fold{k}"
    image_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    rng = np.random.default_rng(k)
    images = rng.integers(0, 256, (n_rows, side, side, 3)).astype(np.float64)
    masks = np.zeros((n_rows, side, side, 6), np.float64)
    n_objects = []
    for row in range(n_rows):
        masks[row, 2:8, 2:8, 0] = 517 + row  # neoplastic
        masks[row, 12:20, 12:20, 4] = 1203  # epithelial
        count = 2
        if row == 0:
            masks[row, 24:28, 2:6, 1] = 3000  # inflammatory, in two pieces: still one id
            masks[row, 24:28, 20:24, 1] = 3000
            masks[row, 7:11, 7:11, 2] = 2999  # connective; overlaps 517 at (7, 7): the larger id wins
            count += 2
        masks[row, :, :, 5] = (masks[row, :, :, :5].max(axis=-1) == 0).astype(np.float64)
        n_objects.append(count)
    np.save(image_dir / "images.npy", images)
    np.save(image_dir / "types.npy", np.array(["Breast", "Colon", "Lung", "Liver"][:n_rows]))
    np.save(mask_dir / "masks.npy", masks)
    (mask_dir / "README.md").write_text("neoplastic, inflammatory, connective, dead, epithelial, background\n")
    (root / f"Fold {k}" / "README.md").write_text("PanNuke\n")
    return images, masks, n_objects


def test_find_items_lists_each_fold(tmp_path):
    for k in (1, 2, 3):
        _write_fold(tmp_path, k, n_rows=k + 1)
    for k in (1, 2, 3):
        items = pannuke.find_items(tmp_path, f"fold{k}")
        assert [item.source for item in items] == [f"Fold {k}/images/fold{k}/images.npy[{i}]" for i in range(k + 1)]
        assert {(item.split, item.subset) for item in items} == {(f"fold{k}", "")}


def test_load_converts_dtypes_and_merges_class_channels(tmp_path):
    images, masks, n_objects = _write_fold(tmp_path, 1)
    for row, item in enumerate(pannuke.find_items(tmp_path, "fold1")):
        loaded = pannuke.load(tmp_path, item)
        assert loaded.image.dtype == np.uint8 and loaded.image.shape == (SIDE, SIDE, 3)
        assert np.array_equal(loaded.image, images[row].astype(np.uint8))
        assert loaded.labels.shape == (SIDE, SIDE) and loaded.labels.dtype.kind == "u"
        ids = np.unique(loaded.labels[loaded.labels > 0])
        assert len(ids) == n_objects[row]
        assert {517 + row, 1203} <= set(ids.tolist())
    row0 = pannuke.load(tmp_path, pannuke.find_items(tmp_path, "fold1")[0]).labels
    assert row0[7, 7] == 2999  # overlap pixel: max of 517 and 2999
    assert row0[25, 3] == row0[25, 21] == 3000  # both pieces keep the one id


def test_missing_fold_lists_nothing_but_wrong_folder_raises(tmp_path):
    _write_fold(tmp_path, 2)
    assert pannuke.find_items(tmp_path, "fold1") == []
    assert len(pannuke.find_items(tmp_path, "fold2")) == N_ROWS
    # one level too deep
    assert_layout_error(pannuke.find_items, tmp_path / "Fold 2", "fold2", match="Fold k/images/foldk/images.npy")
    with pytest.raises(ValueError, match="splits"):
        pannuke.find_items(tmp_path, "train")


def test_missing_masks_file_is_rejected_by_name(tmp_path):
    _write_fold(tmp_path, 1)
    (tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy").unlink()
    items = pannuke.find_items(tmp_path, "fold1")
    assert len(items) == N_ROWS
    with pytest.raises(ValueError, match=r"Fold 1/masks/fold1/masks.npy: missing"):
        pannuke.load(tmp_path, items[0])


def test_truncated_images_and_corrupt_masks_are_rejected_by_name(tmp_path):
    _write_fold(tmp_path, 1)
    images = tmp_path / "Fold 1" / "images" / "fold1" / "images.npy"
    images.write_bytes(images.read_bytes()[:4000])
    items = pannuke.find_items(tmp_path, "fold1")
    assert len(items) == N_ROWS  # counted from masks.npy
    with pytest.raises(ValueError, match=r"images.npy: cannot read"):
        pannuke.load(tmp_path, items[0])
    (tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy").write_bytes(b"\x93NUMPY garbage")
    items = pannuke.find_items(tmp_path, "fold1")
    assert [item.source for item in items] == ["Fold 1/images/fold1/images.npy"]
    with pytest.raises(ValueError, match="fold1"):
        pannuke.load(tmp_path, items[0])


def test_fold_folder_without_arrays_is_one_rejected_item(tmp_path):
    _write_fold(tmp_path, 1)
    (tmp_path / "Fold 2").mkdir()
    items = pannuke.find_items(tmp_path, "fold2")
    assert len(items) == 1
    with pytest.raises(ValueError, match="Fold 2/images/fold2/images.npy: missing"):
        pannuke.load(tmp_path, items[0])


def test_bad_values_are_rejected(tmp_path):
    images, masks, _ = _write_fold(tmp_path, 1)
    images[1, 0, 0, 0] = 300.0
    masks[2, 0, 0, 3] = 1.5
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "images.npy", images)
    np.save(tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy", masks)
    items = pannuke.find_items(tmp_path, "fold1")
    pannuke.load(tmp_path, items[0])
    with pytest.raises(ValueError, match=r"images.npy\[1\]: image values must be finite and within 0..255"):
        pannuke.load(tmp_path, items[1])
    with pytest.raises(ValueError, match=r"masks.npy\[2\]: masks hold fractions"):
        pannuke.load(tmp_path, items[2])


def test_load_reads_one_row_not_the_arrays(tmp_path):
    n_rows, side = 24, 128  # float64: 9 MiB of images, 18 MiB of masks
    _write_fold(tmp_path, 3, n_rows=4, side=16)  # the fold's other files
    fold = tmp_path / "Fold 3"
    np.save(fold / "images" / "fold3" / "images.npy", np.zeros((n_rows, side, side, 3)))
    masks = np.zeros((n_rows, side, side, 6))
    masks[20, 5:9, 5:9, 2] = 42
    np.save(fold / "masks" / "fold3" / "masks.npy", masks)
    del masks
    item = pannuke.find_items(tmp_path, "fold3")[20]
    loaded, peak = traced_peak(pannuke.load, tmp_path, item)
    assert np.unique(loaded.labels).tolist() == [0, 42]
    row_bytes = side * side * 9 * 8  # one row of images and masks, float64
    assert peak < 4 * row_bytes < n_rows * row_bytes / 4


def test_build_end_to_end(tmp_path, shards_dir):
    _, _, n_objects = _write_fold(tmp_path / "src", 1)
    built = build_and_read("pannuke", tmp_path / "src", shards_dir)
    assert built.summary["written"] == N_ROWS and built.summary["rejected"] == 0
    samples = samples_by_source(built.samples)
    assert {source: meta.n_cells for source, (_, _, meta) in samples.items()} == {
        f"Fold 1/images/fold1/images.npy[{row}]": n_objects[row] for row in range(N_ROWS)
    }
    for image, labels, meta in samples.values():
        assert image.dtype == np.uint8 and meta.split == "fold1" and meta.modality == "he"
        assert int(labels.max()) == meta.n_cells
