"""CryoNuSeg converter on a miniature copy of the published layout (datasets.md 2.11 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from shardgen.datasets import cryonuseg
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, max_labels,
    source_split_subset, truncate,
)

SHAPE = (40, 40)
LABELS = "Annotator 1 (biologist)/label masks modify"
SECOND = "Annotator 1 (biologist second round of manual marks up)/" * 2 + "label masks modify"
CENTRES = [(8, 8), (28, 28), (28, 8), (8, 28)]


def he_image(labels: np.ndarray) -> np.ndarray:
    """RGB uint8: pink background, purple nuclei; channels differ so their order is checkable."""
    image = np.empty((*SHAPE, 3), np.uint8)
    image[...] = (230, 180, 210)
    image[labels > 0] = (120, 60, 160)
    return image


def write_sample(root: Path, name: str, n_cells: int, label_dir=LABELS) -> None:
    labels = disc_labels(CENTRES[:n_cells], SHAPE)
    (root / "tissue images").mkdir(parents=True, exist_ok=True)
    (root / label_dir).mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(root / "tissue images" / f"{name}.tif", he_image(labels), photometric="rgb")
    tifffile.imwrite(root / label_dir / f"{name}.tif", labels)


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "cryonuseg"
    write_sample(root, "Human_AdrenalGland_01", 3)
    write_sample(root, "Human_Larynx_02", 2)
    # a second annotation set with different labels: must not be read
    (root / SECOND).mkdir(parents=True)
    tifffile.imwrite(root / SECOND / "Human_AdrenalGland_01.tif", disc_labels(CENTRES[:1], SHAPE))
    return root


def test_find_items_lists_every_image(dataset):
    items = cryonuseg.find_items(dataset, "all")
    assert source_split_subset(items) == [
        ("tissue images/Human_AdrenalGland_01.tif", "all", ""),
        ("tissue images/Human_Larynx_02.tif", "all", ""),
    ]
    assert [i.ref[1] for i in items] == [f"{LABELS}/Human_AdrenalGland_01.tif", f"{LABELS}/Human_Larynx_02.tif"]
    assert cryonuseg.find_items(dataset, "train") == []


def test_load_gives_rgb_image_and_annotator_1_labels(dataset):
    item = cryonuseg.find_items(dataset, "all")[0]
    loaded = cryonuseg.load(dataset, item)
    assert loaded.image.shape == (*SHAPE, 3) and loaded.image.dtype == np.uint8
    np.testing.assert_array_equal(loaded.image[0, 0], [230, 180, 210])  # R, G, B order kept
    assert len(np.unique(loaded.labels)) - 1 == 3
    assert cryonuseg.INFO.modality == "he" and cryonuseg.INFO.channel_names == ("red", "green", "blue")


def test_double_nested_annotator_folder_is_read_when_the_single_one_is_missing(tmp_path):
    root = tmp_path / "cryo"
    write_sample(root, "a", 4, label_dir="Annotator 1 (biologist)/" * 2 + "label masks modify")
    (item,) = cryonuseg.find_items(root, "all")
    assert len(np.unique(cryonuseg.load(root, item).labels)) - 1 == 4


def test_bad_files_are_listed_and_rejected_with_their_name(dataset):
    images = dataset / "tissue images"
    (images / "corrupt.tif").write_bytes(b"MM\x00*" + b"\x00" * 30)
    (dataset / LABELS / "corrupt.tif").write_bytes((dataset / LABELS / "Human_Larynx_02.tif").read_bytes())
    write_sample(dataset, "cut", 2)
    truncate(images / "cut.tif", divisor=3)
    write_sample(dataset, "lonely", 2)
    (dataset / LABELS / "lonely.tif").unlink()
    write_sample(dataset, "orphan", 2)
    (images / "orphan.tif").unlink()
    tifffile.imwrite(images / "gray.tif", np.zeros(SHAPE, np.uint8))
    tifffile.imwrite(dataset / LABELS / "gray.tif", disc_labels(CENTRES[:1], SHAPE))
    expected = {
        "tissue images/corrupt.tif": "corrupt.tif",
        "tissue images/cut.tif": "cut.tif",
        "tissue images/lonely.tif": "lonely.tif has no label file",
        f"{LABELS}/orphan.tif": "orphan.tif has no matching image",
        "tissue images/gray.tif": "gray.tif: expected an RGB",
    }
    expected = {source: message.replace("(", r"\(").replace(")", r"\)") for source, message in expected.items()}
    assert_load_errors(cryonuseg.load, dataset, by_source(cryonuseg.find_items(dataset, "all")), expected)


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(cryonuseg.find_items, tmp_path, "all", match="tissue images")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    built = build_and_read("cryonuseg", dataset, shards_dir)
    for image, _, _, meta, _ in built.samples:
        assert image.shape == (*SHAPE, 3) and meta.modality == "he"
    counts = max_labels(built.samples)
    assert counts == {"tissue images/Human_AdrenalGland_01.tif": 3, "tissue images/Human_Larynx_02.tif": 2}
