"""IHC TMA converter: a fake IHC_TMA_dataset/{images,masks} download."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shardgen.base import ItemError
from shardgen.datasets import ihc_tma
from shardgen.datasets.ihc_tma import masks_to_instances
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, n_objects, random_uint8, samples_by_source,
    write_image,
)

H, W = 40, 48


def _published_masks() -> tuple[np.ndarray, int]:
    """The described shape: (3, H, W) int64, instance ids in channel 0 (three nuclei, two of them
    touching), a class map in channel 1 (1 / 2 over the nuclei) and a third channel that also
    marks pixels outside the nuclei: neither may become objects."""
    masks = np.zeros((3, H, W), np.int64)
    masks[0, 4:12, 4:12] = 3
    masks[0, 4:12, 12:20] = 8  # touches nucleus 3: kept apart by its id
    masks[0, 25:33, 30:38] = 11
    masks[1][masks[0] == 3] = 1
    masks[1][(masks[0] == 8) | (masks[0] == 11)] = 2
    masks[2, 20:30, 2:40] = 1  # a type/region channel crossing background
    return masks, 3


def _binary_masks() -> tuple[np.ndarray, int]:
    """Channel 0 a 0/1 mask of two separate nuclei (not the described form), a class channel inside it."""
    masks = np.zeros((3, H, W), np.uint8)
    masks[0, 4:12, 4:12] = 1
    masks[0, 25:33, 30:38] = 1
    masks[1] = masks[0] * 2
    return masks, 2


def _write_pair(base: Path, stem: str, masks: np.ndarray | None, seed: int) -> np.ndarray:
    rgb = write_image(base / "images" / f"{stem}.png", random_uint8((H, W, 3), seed))
    (base / "masks").mkdir(parents=True, exist_ok=True)
    if masks is not None:
        np.save(base / "masks" / f"{stem}.npy", masks)
    return rgb


def _write_dataset(root: Path) -> dict[str, tuple[np.ndarray, int]]:
    """{stem: (rgb, n_objects)}: the published (3, H, W) masks, and one with a binary channel 0 (fold3)."""
    base = root / "IHC_TMA_dataset"
    written = {}
    for seed, (stem, (masks, count)) in enumerate(
        {
            "fold1_0": _published_masks(),
            "fold1_1": _published_masks(),
            "fold2_0": _published_masks(),
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


def test_load_published_and_binary_masks(tmp_path):
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
    assert ihc_tma.load(tmp_path / "IHC_TMA_dataset", items[0]).labels.max() == 11


def test_published_masks_give_channel_0_ids_and_never_class_channels():
    masks, _ = _published_masks()
    labels = masks_to_instances(masks)
    np.testing.assert_array_equal(labels, masks[0])  # touching nuclei 3 and 8 stay apart
    assert labels[22, 25] == 0  # channel 2 marks it; it is no object


def test_binary_channel_0_is_split_into_components():
    masks, count = _binary_masks()
    labels = masks_to_instances(masks.astype(np.int64))
    assert n_objects(labels) == count and labels[5, 5] != labels[30, 35]


@pytest.mark.parametrize("ids", ["binary", "empty"])
def test_other_channel_outside_a_non_id_channel_0_is_rejected_not_made_into_objects(ids):
    masks, _ = _binary_masks()
    if ids == "empty":
        masks[0] = 0
    masks[1, 36:39, 2:5] = 1  # 9 pixels where channel 0 is background
    expected = 9 if ids == "binary" else 9 + 2 * 64
    with pytest.raises(ItemError, match=rf"m.npy: channel 0 holds .*channel 1 marks {expected} pixels"):
        masks_to_instances(masks.astype(np.int64), "m.npy")


@pytest.mark.parametrize("layout", ["channels_last", "one_plane"])
def test_channels_last_and_single_plane_masks_are_accepted(tmp_path, layout):
    masks, count = _published_masks()
    stored = np.moveaxis(masks, 0, -1) if layout == "channels_last" else masks[0]
    _write_pair(tmp_path / "IHC_TMA_dataset", "fold1_7", stored, 0)
    loaded = ihc_tma.load(tmp_path, ihc_tma.find_items(tmp_path, "fold1")[0])
    np.testing.assert_array_equal(loaded.labels, masks[0])
    assert n_objects(loaded.labels) == count


def test_orphans_and_bad_files_are_listed_and_rejected_by_name(tmp_path):
    _write_dataset(tmp_path)
    base = tmp_path / "IHC_TMA_dataset"
    _write_pair(base, "fold3_5", None, 9)  # image without mask
    np.save(base / "masks" / "fold3_9.npy", _binary_masks()[0])  # mask without image
    (base / "masks" / "fold1_1.npy").write_bytes(b"garbage")  # corrupt mask
    png = base / "images" / "fold1_0.png"
    png.write_bytes(png.read_bytes()[:60])  # truncated image
    np.save(base / "masks" / "fold2_0.npy", np.zeros((3, H + 1, W), np.int64))  # not the image's size
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
    with pytest.raises(ValueError, match=r"fold2_0.npy: expected masks of shape \(C, H, W\) \(published: \(3, H"):
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
