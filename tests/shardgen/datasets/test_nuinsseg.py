"""NuInsSeg converter on a miniature copy of the published layout (datasets.md 2.12 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from shardgen.base import LayoutError
from shardgen.datasets import nuinsseg

SHAPE = (40, 40)
CENTRES = [(8, 8), (28, 28), (28, 8), (8, 28)]


def disc_labels(n_cells: int, radius=5) -> np.ndarray:
    yy, xx = np.mgrid[: SHAPE[0], : SHAPE[1]]
    labels = np.zeros(SHAPE, np.uint16)
    for index, (y, x) in enumerate(CENTRES[:n_cells], 1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= radius**2] = index
    return labels


def write_sample(tissue: Path, name: str, n_cells: int, alpha=None) -> None:
    """RGBA PNG (alpha 255 unless given) + uint16 'label masks modify' TIF + a decoy 'label masks'."""
    labels = disc_labels(n_cells)
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
    tifffile.imwrite(tissue / "label masks" / f"{name}.tif", disc_labels(1))


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
    assert [(i.source, i.split, i.subset) for i in items] == [
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
    data = (tissue / "tissue images" / "cut.png").read_bytes()
    (tissue / "tissue images" / "cut.png").write_bytes(data[: len(data) // 2])
    write_sample(tissue, "lonely", 2)
    (tissue / "label masks modify" / "lonely.tif").unlink()
    write_sample(tissue, "orphan", 2)
    (tissue / "tissue images" / "orphan.png").unlink()
    items = {i.source: i for i in nuinsseg.find_items(dataset, "all")}
    expected = {
        "NuInsSeg/mouse liver/tissue images/corrupt.png": "corrupt.png",
        "NuInsSeg/mouse liver/tissue images/cut.png": "cut.png",
        "NuInsSeg/mouse liver/tissue images/lonely.png": "lonely.png has no label file",
        "NuInsSeg/mouse liver/label masks modify/orphan.tif": "orphan.tif has no matching image",
    }
    for source, message in expected.items():
        with pytest.raises(ValueError, match=message):
            nuinsseg.load(dataset, items[source])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(LayoutError, match="tissue images"):
        nuinsseg.find_items(tmp_path, "all")


def test_end_to_end_shards_hold_every_object(dataset, tmp_path):
    build = pytest.importorskip("shardgen.build")
    import webdataset as wds

    from pipeline.shards import decode_sample

    build.build_dataset("nuinsseg", dataset, tmp_path / "shards")
    urls = sorted(str(p) for p in (tmp_path / "shards" / "nuinsseg").glob("*.tar"))
    counts = {}
    for sample in wds.WebDataset(urls, shardshuffle=False):
        image, labels, _, meta, ignore = decode_sample(sample)
        counts[meta.source] = int(labels.max())
        assert image.shape == (*SHAPE, 3) and meta.channel_names == ("red", "green", "blue")
        assert ignore is None
    assert counts == {
        "NuInsSeg/human bladder/tissue images/h1.png": 3,
        "NuInsSeg/human bladder/tissue images/h2.png": 2,
        "NuInsSeg/mouse liver/tissue images/m1.png": 4,
    }
