"""Tests for shardgen/datasets/monuseg.py: Aperio XML polygons to instance labels."""

import re
from pathlib import Path

import numpy as np
import pytest

from shardgen.base import ItemError
from shardgen.datasets import monuseg
from shardgen.datasets.monuseg import find_items, load
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, max_labels, random_uint8,
    source_split_subset, write_image,
)

TRAIN = "MoNuSeg 2018 Training Data"
TRAIN_ID = "TCGA-AA-0000-01Z-00-DX1"
TEST_ID = "TCGA-BB-0000-01Z-00-DX1"
SIZE = 64


def region_xml(region_id, vertices):
    rows = "\n".join(f'\t\t\t\t\t<Vertex X="{x}" Y="{y}"/>' for x, y in vertices)
    return (
        f'\t\t\t<Region Id="{region_id}" Type="0" Zoom="5" Length="1.0" Area="1.0">\n'
        "\t\t\t\t<Attributes/>\n\t\t\t\t<Vertices>\n"
        f"{rows}\n\t\t\t\t</Vertices>\n\t\t\t</Region>"
    )


def write_xml(path: Path, regions) -> None:
    """An Aperio XML like MoNuSeg's: Annotations/Annotation/Regions/Region/Vertices/Vertex."""
    body = "\n".join(region_xml(k, vertices) for k, vertices in enumerate(regions, start=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<Annotations MicronsPerPixel="0.246800">\n'
        '\t<Annotation Id="1" Name="" ReadOnly="0" Type="4" LineColor="4259584" Visible="1">\n'
        "\t\t<Attributes/>\n\t\t<Regions>\n"
        "\t\t\t<RegionAttributeHeaders>\n"
        '\t\t\t\t<AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>\n'
        "\t\t\t</RegionAttributeHeaders>\n"
        f"{body}\n\t\t</Regions>\n\t\t<Plots/>\n\t</Annotation>\n</Annotations>\n"
    )


def write_rgb(path: Path, seed: int) -> np.ndarray:
    """A random RGB TIFF; returns its pixels."""
    return write_image(path, random_uint8((SIZE, SIZE, 3), seed), photometric="rgb")


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


# Train image regions: 1 and 2 separate; 3 overlaps 2 and is drawn over it; 4 has 2 vertices
# (skipped); 5 pokes out of the image (clipped). Expected: 4 objects.
TRAIN_REGIONS = [
    box(2.5, 2.5, 12.2, 10.7),
    box(20, 20, 34, 34),
    box(30, 30, 44, 44),
    [(50, 5), (55, 6)],
    box(56, 50, 70.4, 66),
]
TEST_REGIONS = [box(5, 5, 15, 15), box(40, 40, 50, 52)]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "monuseg"
    images = {
        "train": write_rgb(root / TRAIN / "Tissue Images" / f"{TRAIN_ID}.tif", 1),
        "test": write_rgb(root / "MoNuSegTestData" / f"{TEST_ID}.tif", 2),
    }
    write_xml(root / TRAIN / "Annotations" / f"{TRAIN_ID}.xml", TRAIN_REGIONS)
    write_xml(root / "MoNuSegTestData" / f"{TEST_ID}.xml", TEST_REGIONS)
    # Archive debris, which must not become items.
    debris = root / "__MACOSX" / TRAIN / "Tissue Images"
    debris.mkdir(parents=True)
    (debris / f"._{TRAIN_ID}.tif").write_bytes(b"\x00\x05\x16\x07")
    (root / "MoNuSegTestData" / f"._{TEST_ID}.tif").write_bytes(b"\x00\x05\x16\x07")
    return root, images


def test_find_items_lists_train_and_test_pairs(dataset):
    root, _ = dataset
    train, test = find_items(root, "train"), find_items(root, "test")
    assert source_split_subset(train) == [
        (f"{TRAIN}/Tissue Images/{TRAIN_ID}.tif", "train", "")]
    assert train[0].ref == (f"{TRAIN}/Tissue Images/{TRAIN_ID}.tif", f"{TRAIN}/Annotations/{TRAIN_ID}.xml")
    assert [(i.source, i.split) for i in test] == [(f"MoNuSegTestData/{TEST_ID}.tif", "test")]
    assert monuseg.INFO.splits == ("train", "test")


def test_training_folder_found_by_its_annotations_subfolder_whatever_its_name(dataset):
    root, _ = dataset
    (root / TRAIN).rename(root / "MoNuSeg Training Data")
    items = find_items(root, "train")
    assert [i.source for i in items] == [f"MoNuSeg Training Data/Tissue Images/{TRAIN_ID}.tif"]
    assert load(root, items[0]).labels.max() == 4


def test_load_rasterises_regions_later_over_earlier_with_ids_from_one(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "train")[0])
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(loaded.image, images["train"])
    labels = loaded.labels
    assert labels.shape == (SIZE, SIZE)
    # 5 regions, one with 2 vertices: 4 objects, ids 1..4 in document order.
    assert sorted(np.unique(labels)) == [0, 1, 2, 3, 4]
    assert labels[5, 5] == 1  # row = Y, col = X
    assert labels[25, 25] == 2 and labels[32, 32] == 3  # region 3 is drawn over region 2
    assert labels[40, 40] == 3
    assert labels[60, 63] == 4  # clipped at the border, still there
    assert labels[5, 52] == 0  # the 2-vertex region drew nothing


def test_row_is_y_and_column_is_x(dataset):
    root, _ = dataset
    labels = load(root, find_items(root, "test")[0]).labels
    # Region 2 spans X 40..50 (columns) and Y 40..52 (rows): taller than wide.
    rows, cols = np.nonzero(labels == 2)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (40, 52, 40, 50)


def test_image_without_xml_and_xml_without_image_are_items_rejected_with_names(dataset):
    root, _ = dataset
    lonely_image = f"{TRAIN}/Tissue Images/TCGA-CC-0000-01Z-00-DX1.tif"
    write_rgb(root / lonely_image, 3)
    lonely_xml = f"{TRAIN}/Annotations/TCGA-DD-0000-01Z-00-DX1.xml"
    write_xml(root / lonely_xml, TEST_REGIONS)
    items = by_source(find_items(root, "train"))
    assert set(items) == {f"{TRAIN}/Tissue Images/{TRAIN_ID}.tif", lonely_image, lonely_xml}
    assert_load_errors(load, root, items, {
        lonely_image: "TCGA-CC-0000-01Z-00-DX1",
        lonely_xml: "TCGA-DD-0000-01Z-00-DX1.xml",
    }, error=ItemError)


def test_truncated_xml_and_corrupt_image_are_rejected_naming_the_file(dataset):
    root, _ = dataset
    xml = root / "MoNuSegTestData" / f"{TEST_ID}.xml"
    xml.write_text(xml.read_text()[:300])
    item = find_items(root, "test")[0]
    with pytest.raises(ItemError, match=f"{TEST_ID}.xml"):
        load(root, item)
    image = root / TRAIN / "Tissue Images" / f"{TRAIN_ID}.tif"
    image.write_bytes(image.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{TRAIN_ID}.tif"):
        load(root, find_items(root, "train")[0])


def test_vertex_without_coordinates_is_rejected(dataset):
    root, _ = dataset
    xml = root / "MoNuSegTestData" / f"{TEST_ID}.xml"
    xml.write_text(xml.read_text().replace('X="40"', 'X="forty"', 1))
    with pytest.raises(ItemError, match="region 2"):
        load(root, find_items(root, "test")[0])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(find_items, tmp_path, "test", match="MoNuSegTestData")


def test_missing_split_folder_lists_nothing(dataset):
    root, _ = dataset
    for path in sorted((root / "MoNuSegTestData").iterdir()):
        path.unlink()
    (root / "MoNuSegTestData").rmdir()
    assert find_items(root, "test") == []
    assert len(find_items(root, "train")) == 1


def test_real_test_images_give_one_object_per_region(shared_data):
    # /work/shared/data/monuseg: 2 test images, 1,393 nuclei (575 + 818). Every region has >= 24
    # vertices and none is fully covered by later ones, so objects == regions.
    root = shared_data / "monuseg"
    items = find_items(root, "test")
    assert len(items) == 2
    total = 0
    for item in items:
        loaded = load(root, item)
        assert loaded.image.shape == (1000, 1000, 3) and loaded.image.dtype == np.uint8
        regions = len(re.findall(r"<Region\b", (root / item.ref[1]).read_text()))
        objects = len(np.unique(loaded.labels)) - 1
        assert objects == regions
        total += objects
    assert total == 1393


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    root, images = dataset
    built = build_and_read("monuseg", root, shards_dir)
    for image, _, _, meta, _ in built.samples:
        np.testing.assert_array_equal(image, images[meta.split])
        assert meta.modality == "he"
    counts = max_labels(built.samples, key=lambda meta: (meta.split, meta.source))
    assert counts == {("train", f"{TRAIN}/Tissue Images/{TRAIN_ID}.tif"): 4,
                      ("test", f"MoNuSegTestData/{TEST_ID}.tif"): 2}
