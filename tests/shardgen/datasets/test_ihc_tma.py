"""IHC TMA converter: a fake IHC_TMA_dataset/{images,masks} download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import ihc_tma
from shardgen.datasets.ihc_tma import nuclear_masks_to_instances
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, n_objects, random_uint8, samples_by_source,
    write_image,
)

H, W = 40, 48


def _binary_masks() -> tuple[np.ndarray, int]:
    """datasets.md's recipe: (2, H, W) 0/1, two touching blobs in ch0 and one apart in ch1."""
    masks = np.zeros((2, H, W), np.uint8)
    masks[0, 4:12, 4:12] = 1
    masks[0, 4:12, 12:20] = 1  # touches the first: one component
    masks[1, 25:33, 30:38] = 1
    return masks, 2


def _instance_masks() -> tuple[np.ndarray, int]:
    """(2, H, W) instance ids: two touching nuclei in ch0 (kept apart), two in ch1 with ids 1, 2."""
    masks = np.zeros((2, H, W), np.uint16)
    masks[0, 4:12, 4:12] = 1
    masks[0, 4:12, 12:20] = 2
    masks[1, 25:33, 30:38] = 1
    masks[1, 25:33, 4:12] = 2
    return masks, 4


def _write_pair(base: Path, stem: str, masks: np.ndarray | None, seed: int) -> np.ndarray:
    rgb = write_image(base / "images" / f"{stem}.png", random_uint8((H, W, 3), seed))
    (base / "masks").mkdir(parents=True, exist_ok=True)
    if masks is not None:
        np.save(base / "masks" / f"{stem}.npy", masks)
    return rgb


def _write_dataset(root: Path) -> dict[str, tuple[np.ndarray, int]]:
    """{stem: (rgb, n_objects)} for fold1 (binary masks), fold2 (instance ids), fold3."""
    base = root / "IHC_TMA_dataset"
    written = {}
    for seed, (stem, (masks, count)) in enumerate(
        {
            "fold1_0": _binary_masks(),
            "fold1_1": _binary_masks(),
            "fold2_0": _instance_masks(),
            "fold3_0": _binary_masks(),
        }.items()
    ):
        written[stem] = (_write_pair(base, stem, masks, seed), count)
    return written


def test_find_items_lists_each_fold(tmp_path):
    _write_dataset(tmp_path)
    sources = {split: [i.source for i in ihc_tma.find_items(tmp_path, split)] for split in ihc_tma.INFO.splits}
    assert sources == {
        "fold1": ["IHC_TMA_dataset/images/fold1_0.png", "IHC_TMA_dataset/images/fold1_1.png"],
        "fold2": ["IHC_TMA_dataset/images/fold2_0.png"],
        "fold3": ["IHC_TMA_dataset/images/fold3_0.png"],
    }
    assert all(i.subset == "" and i.split == "fold1" for i in ihc_tma.find_items(tmp_path, "fold1"))


def test_load_binary_and_instance_masks(tmp_path):
    written = _write_dataset(tmp_path)
    for split in ihc_tma.INFO.splits:
        for item in ihc_tma.find_items(tmp_path, split):
            rgb, count = written[Path(item.source).stem]
            loaded = ihc_tma.load(tmp_path, item)
            assert loaded.image.dtype == np.uint8 and loaded.image.shape == (H, W, 3)
            assert np.array_equal(loaded.image, rgb)
            assert loaded.labels.shape == (H, W)
            assert n_objects(loaded.labels) == count
            assert ihc_tma.INFO.modality == "ihc" and loaded.modality in (None, "ihc")


def test_the_dataset_folder_itself_is_accepted(tmp_path):
    _write_dataset(tmp_path)
    items = ihc_tma.find_items(tmp_path / "IHC_TMA_dataset", "fold2")
    assert [i.source for i in items] == ["images/fold2_0.png"]
    assert ihc_tma.load(tmp_path / "IHC_TMA_dataset", items[0]).labels.max() == 4


def test_instance_channels_keep_touching_nuclei_apart_and_offset_channel_1():
    masks, _ = _instance_masks()
    labels = nuclear_masks_to_instances(masks.astype(np.int64))
    assert labels[5, 5] == 1 and labels[5, 15] == 2  # channel 0 ids as they are
    assert labels[30, 35] == 3 and labels[30, 5] == 4  # channel 1 ids past channel 0's max


def test_single_valued_channel_beside_instance_ids_is_split_into_components():
    masks = np.zeros((2, H, W), np.int64)
    masks[0, 2:6, 2:6], masks[0, 2:6, 10:14] = 5, 9  # instance ids
    masks[1, 20:24, 2:6] = masks[1, 20:24, 20:24] = 1  # 0/1 with two separate blobs
    labels = nuclear_masks_to_instances(masks)
    assert n_objects(labels) == 4


def test_binary_channels_merge_by_union():
    masks, _ = _binary_masks()
    masks[1, 10:14, 16:18] = 1  # overlaps and touches channel 0's blobs
    labels = nuclear_masks_to_instances(masks.astype(np.int64))
    assert n_objects(labels) == 2


def test_channels_last_masks_are_accepted(tmp_path):
    masks, count = _binary_masks()
    _write_pair(tmp_path / "IHC_TMA_dataset", "fold1_7", np.moveaxis(masks, 0, -1), 0)
    loaded = ihc_tma.load(tmp_path, ihc_tma.find_items(tmp_path, "fold1")[0])
    assert n_objects(loaded.labels) == count


def test_orphans_and_bad_files_are_listed_and_rejected_by_name(tmp_path):
    _write_dataset(tmp_path)
    base = tmp_path / "IHC_TMA_dataset"
    _write_pair(base, "fold3_5", None, 9)  # image without mask
    np.save(base / "masks" / "fold3_9.npy", _binary_masks()[0])  # mask without image
    (base / "masks" / "fold1_1.npy").write_bytes(b"garbage")  # corrupt mask
    png = base / "images" / "fold1_0.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated image
    np.save(base / "masks" / "fold2_0.npy", np.zeros((1, H, W), np.uint8))  # one channel only
    (base / "images" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (base / "images" / "._fold1_0.png").write_bytes(b"\0\5\26\7")

    fold3 = by_source(ihc_tma.find_items(tmp_path, "fold3"))
    assert set(fold3) == {
        "IHC_TMA_dataset/images/fold3_0.png",
        "IHC_TMA_dataset/images/fold3_5.png",
        "IHC_TMA_dataset/masks/fold3_9.npy",
    }
    assert_load_errors(ihc_tma.load, tmp_path, fold3, {
        "IHC_TMA_dataset/images/fold3_5.png": r"fold3_5.png: image has no mask file",
        "IHC_TMA_dataset/masks/fold3_9.npy": r"fold3_9.npy: mask has no matching image",
    })

    fold1 = ihc_tma.find_items(tmp_path, "fold1")
    assert [i.source for i in fold1] == ["IHC_TMA_dataset/images/fold1_0.png", "IHC_TMA_dataset/images/fold1_1.png"]
    with pytest.raises(ValueError, match="fold1_0.png"):
        ihc_tma.load(tmp_path, fold1[0])
    with pytest.raises(ValueError, match="fold1_1.npy: cannot read"):
        ihc_tma.load(tmp_path, fold1[1])
    with pytest.raises(ValueError, match=r"fold2_0.npy: expected masks of shape \(C, H, W\) with C >= 2"):
        ihc_tma.load(tmp_path, ihc_tma.find_items(tmp_path, "fold2")[0])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "IHC_TMA_dataset" / "images").mkdir(parents=True)  # no masks folder
    assert_layout_error(ihc_tma.find_items, tmp_path, "fold1", match="IHC_TMA_dataset/images/fold")


def test_build_end_to_end(tmp_path, shards_dir):
    written = _write_dataset(tmp_path / "src")
    built = build_and_read("ihc_tma", tmp_path / "src", shards_dir)
    assert built.summary["written"] == len(written) and built.summary["rejected"] == 0
    samples = samples_by_source(built.samples)
    assert {source: meta.n_cells for source, (_, _, meta) in samples.items()} == {
        f"IHC_TMA_dataset/images/{stem}.png": count for stem, (_, count) in written.items()
    }
    for image, labels, meta in samples.values():
        assert image.shape == (H, W, 3) and meta.modality == "ihc" and meta.split == meta.source.split("/")[-1][:5]
        assert int(labels.max()) == meta.n_cells


def test_files_that_name_no_fold_are_rejected_not_dropped(tmp_path):
    """A file without a fold1_/fold2_/fold3_ prefix belongs to no split: it is listed once, with
    the first split, so that it lands in rejects.parquet with the reason."""
    base = tmp_path / "IHC_TMA_dataset"
    (base / "images").mkdir(parents=True)
    (base / "masks").mkdir(parents=True)

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(base / "images" / "stray.png")
    np.save(base / "masks" / "stray.npy", np.zeros((2, 8, 8), np.uint8))
    first = [i for i in ihc_tma.find_items(tmp_path, "fold1") if "stray" in i.source]
    assert sorted(i.source for i in first) == ["IHC_TMA_dataset/images/stray.png", "IHC_TMA_dataset/masks/stray.npy"]
    assert not [i for i in ihc_tma.find_items(tmp_path, "fold2") if "stray" in i.source]
    for item in first:
        with pytest.raises(ItemError, match="belongs to no split"):
            ihc_tma.load(tmp_path, item)
