"""NuInsSeg converter on a miniature copy of the published layout (datasets.md 2.12 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from shardgen.datasets import nuinsseg
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, max_labels,
    source_split_subset, truncate,
)

SHAPE = (40, 40)
CENTRES = [(8, 8), (28, 28), (28, 8), (8, 28)]


def write_sample(tissue: Path, name: str, n_cells: int, alpha=None) -> None:
    """RGBA PNG (alpha 255 unless given) + uint16 'label masks modify' TIF + a decoy 'label masks'."""
    labels = disc_labels(CENTRES[:n_cells], SHAPE)
    rgba = np.empty((*SHAPE, 4), np.uint8)
    rgba[...] = (230, 180, 210, 255)
    rgba[labels > 0] = (120, 60, 160, 255)
    if alpha is not None:
        rgba[:, :, 3] = alpha
    for folder in ("tissue images", "label masks modify", "label masks"):
        (tissue / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgba, "RGBA").save(tissue / "tissue images" / f"{name}.png")
    tifffile.imwrite(tissue / "label masks modify" / f"{name}.tif", labels)
    # decoy: 'label masks' gives overlaps a new id; here it merely has a different count
    tifffile.imwrite(tissue / "label masks" / f"{name}.tif", disc_labels(CENTRES[:1], SHAPE))


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "nuinsseg"
    write_sample(root / "NuInsSeg" / "human bladder", "h1", 3)
    write_sample(root / "NuInsSeg" / "human bladder", "h2", 2)
    write_sample(root / "NuInsSeg" / "mouse liver", "m1", 4)
    (root / "NuInsSeg" / "human bladder" / "tissue images" / ".DS_Store").write_bytes(b"x")
    return root


def test_find_items_lists_every_image_with_its_modify_label(dataset):
    items = nuinsseg.find_items(dataset, "all")
    assert source_split_subset(items) == [
        ("NuInsSeg/human bladder/tissue images/h1.png", "all", ""),
        ("NuInsSeg/human bladder/tissue images/h2.png", "all", ""),
        ("NuInsSeg/mouse liver/tissue images/m1.png", "all", ""),
    ]
    assert all("/label masks modify/" in i.ref[1] for i in items)
    assert nuinsseg.find_items(dataset, "test") == []


def test_load_gives_rgb_and_modify_labels(dataset):
    counts = []
    for item in nuinsseg.find_items(dataset, "all"):
        loaded = nuinsseg.load(dataset, item)
        assert loaded.image.shape == (*SHAPE, 3) and loaded.image.dtype == np.uint8
        np.testing.assert_array_equal(loaded.image[0, 0], [230, 180, 210])
        assert loaded.ignore is None
        counts.append(len(np.unique(loaded.labels)) - 1)
    assert counts == [3, 2, 4]


def test_rgba_with_varying_alpha_keeps_the_first_three_channels(dataset):
    tissue = dataset / "NuInsSeg" / "human bladder"
    write_sample(tissue, "h1", 3, alpha=np.arange(SHAPE[1], dtype=np.uint8)[None, :].repeat(SHAPE[0], 0))
    loaded = nuinsseg.load(dataset, nuinsseg.find_items(dataset, "all")[0])
    assert loaded.image.shape == (*SHAPE, 3)
    np.testing.assert_array_equal(loaded.image[0, 0], [230, 180, 210])


def test_tissue_folders_without_the_nuinsseg_folder_kaggle_layout(tmp_path):
    root = tmp_path / "kaggle"
    write_sample(root / "human brain", "b1", 2)
    (item,) = nuinsseg.find_items(root, "all")
    assert item.source == "human brain/tissue images/b1.png"
    assert len(np.unique(nuinsseg.load(root, item).labels)) - 1 == 2


def test_bad_files_are_listed_and_rejected_with_their_name(dataset):
    tissue = dataset / "NuInsSeg" / "mouse liver"
    (tissue / "tissue images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    write_sample(tissue, "cut", 2)
    truncate(tissue / "tissue images" / "cut.png")
    write_sample(tissue, "lonely", 2)
    (tissue / "label masks modify" / "lonely.tif").unlink()
    write_sample(tissue, "orphan", 2)
    (tissue / "tissue images" / "orphan.png").unlink()
    expected = {
        "NuInsSeg/mouse liver/tissue images/corrupt.png": "corrupt.png",
        "NuInsSeg/mouse liver/tissue images/cut.png": "cut.png",
        "NuInsSeg/mouse liver/tissue images/lonely.png": "lonely.png has no label file",
        "NuInsSeg/mouse liver/label masks modify/orphan.tif": "orphan.tif has no matching image",
    }
    assert_load_errors(nuinsseg.load, dataset, by_source(nuinsseg.find_items(dataset, "all")), expected)


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(nuinsseg.find_items, tmp_path, "all", match="tissue images")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    built = build_and_read("nuinsseg", dataset, shards_dir)
    for image, _, _, meta, ignore in built.samples:
        assert image.shape == (*SHAPE, 3) and meta.channel_names == ("red", "green", "blue")
        assert ignore is None
    counts = max_labels(built.samples)
    assert counts == {
        "NuInsSeg/human bladder/tissue images/h1.png": 3,
        "NuInsSeg/human bladder/tissue images/h2.png": 2,
        "NuInsSeg/mouse liver/tissue images/m1.png": 4,
    }
