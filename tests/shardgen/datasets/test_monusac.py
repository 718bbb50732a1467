"""Tests for shardgen/datasets/monusac.py: class blocks, ambiguous regions, split folders."""

from pathlib import Path

import numpy as np
import pytest

from shardgen.base import ItemError
from shardgen.datasets import monusac
from shardgen.datasets.monusac import find_items, load, split_of_folder
from tests.shardgen.datasets.helpers import (
    assert_layout_error, build_and_read, max_labels, random_uint8, source_split_subset, write_image,
)

TRAIN_TOP = "MoNuSAC_images_and_annotations"
TEST_TOP = "MoNuSAC Testing Data and Annotations"
TRAIN_PATIENT = "TCGA-00-0000-01Z-00-DX1"
TEST_PATIENT = "TCGA-11-1111-01Z-00-DX1"
HEIGHT, WIDTH = 48, 64


def box(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def annotation_block(block_id, name, regions):
    region_text = "".join(
        f'<Region Id="{k}" Type="0" Zoom="1" Length="1" Area="1"><Attributes/><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
        + "</Vertices></Region>"
        for k, vertices in enumerate(regions, start=1)
    )
    return (
        f'<Annotation Id="{block_id}" Name="" ReadOnly="0" Type="4" Visible="1">'
        f'<Attributes><Attribute Name="{name}" Id="0" Value=""/></Attributes>'
        '<Regions><RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>'
        f"</RegionAttributeHeaders>{region_text}</Regions><Plots/></Annotation>"
    )


def write_xml(path: Path, blocks) -> None:
    """A MoNuSAC XML: one Annotation block per class, named by Attributes/Attribute@Name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(annotation_block(k, name, regions) for k, (name, regions) in enumerate(blocks, start=1))
    path.write_text(f'<?xml version="1.0"?>\n<Annotations MicronsPerPixel="0.252700">{body}</Annotations>\n')


def write_rgba(path: Path, seed: int) -> np.ndarray:
    """RGBA uint8 TIFF with a varying alpha channel (the converter keeps the first 3)."""
    image = random_uint8((HEIGHT, WIDTH, 4), seed)
    return write_image(path, image, photometric="rgb", extrasamples=["unassalpha"])


TRAIN_BLOCKS = [
    ("Epithelial", [box(2, 2, 12, 12), box(20, 20, 32, 32)]),
    ("Lymphocyte", [box(28, 28, 40, 40)]),  # drawn over the second epithelial nucleus
]
TEST_BLOCKS = [
    ("Epithelial", [box(4, 4, 14, 14), [(30, 3), (40, 3)]]),  # the second region has 2 vertices
    ("Ambiguous", [box(40, 20, 60, 40)]),
]


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "monusac"
    train_dir = root / TRAIN_TOP / TRAIN_PATIENT
    test_dir = root / TEST_TOP / TEST_PATIENT
    images = {
        "train": write_rgba(train_dir / f"{TRAIN_PATIENT}_1.tif", 1),
        "test": write_rgba(test_dir / f"{TEST_PATIENT}_1.tif", 2),
    }
    write_xml(train_dir / f"{TRAIN_PATIENT}_1.xml", TRAIN_BLOCKS)
    (train_dir / f"{TRAIN_PATIENT}_1.svs").write_bytes(b"II*\x00svs placeholder")
    write_xml(test_dir / f"{TEST_PATIENT}_1.xml", TEST_BLOCKS)
    # Test stem _2: .svs and .xml but no .tif (as in some of the real test set).
    write_xml(test_dir / f"{TEST_PATIENT}_2.xml", TEST_BLOCKS)
    (test_dir / f"{TEST_PATIENT}_2.svs").write_bytes(b"II*\x00svs placeholder")
    # Debris.
    (root / "__MACOSX" / TRAIN_TOP / TRAIN_PATIENT).mkdir(parents=True)
    (train_dir / f"._{TRAIN_PATIENT}_1.tif").write_bytes(b"\x00\x05\x16\x07")
    return root, images


def test_split_of_folder_reads_the_published_names_and_their_spelling_variants():
    assert split_of_folder("MoNuSAC_images_and_annotations") == "train"
    assert split_of_folder("MoNuSAC_images_and_annotation") == "train"  # the challenge page's spelling
    assert split_of_folder("MoNuSAC images and annotations") == "train"
    assert split_of_folder("MoNuSAC Testing Data and Annotations") == "test"
    assert split_of_folder("MoNuSAC_Testing_Data_and_Annotations") == "test"
    assert split_of_folder("__MACOSX") is None and split_of_folder("MoNuSeg 2018 Training Data") is None


def test_find_items_lists_one_item_per_stem_by_split(dataset):
    root, _ = dataset
    train = find_items(root, "train")
    prefix = f"{TRAIN_TOP}/{TRAIN_PATIENT}/{TRAIN_PATIENT}_1"
    assert source_split_subset(train) == [(f"{prefix}.tif", "train", "")]
    assert train[0].ref == (f"{prefix}.tif", f"{prefix}.xml", f"{prefix}.svs")
    test = find_items(root, "test")
    assert [i.source for i in test] == [
        f"{TEST_TOP}/{TEST_PATIENT}/{TEST_PATIENT}_1.tif",
        f"{TEST_TOP}/{TEST_PATIENT}/{TEST_PATIENT}_2.xml",  # no .tif: still an item
    ]
    assert monusac.INFO.splits == ("train", "test")


def test_load_gives_each_region_its_own_id_across_classes_later_over_earlier(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "train")[0])
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(loaded.image, images["train"][:, :, :3])  # RGBA -> RGB
    labels = loaded.labels
    assert sorted(np.unique(labels)) == [0, 1, 2, 3]
    assert labels[5, 5] == 1 and labels[22, 22] == 2
    assert labels[30, 30] == 3  # the lymphocyte is drawn over the epithelial nucleus
    assert loaded.ignore is None


def test_ambiguous_regions_become_the_ignore_mask_and_two_vertex_regions_are_skipped(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "test")[0])
    np.testing.assert_array_equal(loaded.image, images["test"][:, :, :3])
    assert sorted(np.unique(loaded.labels)) == [0, 1]  # one nucleus; the 2-vertex region drew nothing
    assert loaded.ignore is not None and loaded.ignore.dtype == bool
    assert loaded.ignore.shape == (HEIGHT, WIDTH)
    rows, cols = np.nonzero(loaded.ignore)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20, 40, 40, 60)
    assert not loaded.labels[loaded.ignore].any()  # ambiguous regions are not objects


def test_missing_tif_is_rejected_asking_to_convert_the_svs(dataset):
    root, _ = dataset
    item = find_items(root, "test")[1]
    with pytest.raises(ItemError, match=r"_2\.tif: image missing \(convert the \.svs\)"):
        load(root, item)


def test_tif_without_xml_is_rejected_naming_the_file(dataset):
    root, _ = dataset
    (root / TRAIN_TOP / TRAIN_PATIENT / f"{TRAIN_PATIENT}_1.xml").unlink()
    item = find_items(root, "train")[0]
    with pytest.raises(ItemError, match=f"{TRAIN_PATIENT}_1.tif: no annotation file"):
        load(root, item)


def test_corrupt_xml_and_truncated_tif_are_rejected_naming_the_file(dataset):
    root, _ = dataset
    xml = root / TEST_TOP / TEST_PATIENT / f"{TEST_PATIENT}_1.xml"
    xml.write_text(xml.read_text()[:150])
    with pytest.raises(ItemError, match=f"{TEST_PATIENT}_1.xml"):
        load(root, find_items(root, "test")[0])
    tif = root / TRAIN_TOP / TRAIN_PATIENT / f"{TRAIN_PATIENT}_1.tif"
    tif.write_bytes(tif.read_bytes()[:64])
    with pytest.raises(ValueError, match=f"{TRAIN_PATIENT}_1.tif"):
        load(root, find_items(root, "train")[0])


def test_unnamed_or_unknown_class_blocks_still_count_as_nuclei(dataset):
    root, _ = dataset
    xml = root / TRAIN_TOP / TRAIN_PATIENT / f"{TRAIN_PATIENT}_1.xml"
    write_xml(xml, [("Macrophages", [box(2, 2, 12, 12)]), ("Description", [box(20, 20, 30, 30)])])
    assert load(root, find_items(root, "train")[0]).labels.max() == 2


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "TCGA-00-0000-01Z-00-DX1").mkdir()
    assert_layout_error(find_items, tmp_path, "train", match="MoNuSAC_images_and_annotations")


def test_a_split_whose_folder_is_absent_lists_nothing(dataset, tmp_path):
    root, _ = dataset
    only_train = tmp_path / "only_train"
    only_train.mkdir()
    (root / TRAIN_TOP).rename(only_train / TRAIN_TOP)
    assert find_items(only_train, "test") == []
    assert len(find_items(only_train, "train")) == 1


def test_end_to_end_shards_hold_every_object_and_the_ignore_mask(dataset, shards_dir):
    root, images = dataset
    built = build_and_read("monusac", root, shards_dir)
    for image, _, _, meta, _ in built.samples:
        np.testing.assert_array_equal(image, images[meta.split][:, :, :3])
    counts = max_labels(built.samples, key=lambda meta: meta.split)
    ignored = {meta.split: None if ignore is None else int(ignore.sum()) for _, _, _, meta, ignore in built.samples}
    assert counts == {"train": 3, "test": 1}
    assert ignored == {"train": None, "test": 21 * 21}
    assert len(built.rejects) == 1 and "image missing (convert the .svs)" in built.rejects[0]["reason"]
