"""Tests for shardgen/datasets/cpm.py: .mat inst_map, .npy and the competition's text vectors."""

import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from shardgen.base import ItemError
from shardgen.datasets import cpm
from shardgen.datasets.cpm import find_items, load
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, max_labels, n_objects, random_uint8,
    source_split_subset, write_image,
)

HEIGHT, WIDTH = 30, 40


def instance_map(seed: int) -> np.ndarray:
    """Three rectangles with ids 1, 2, 5 (ids need not be consecutive)."""
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[2:10, 3:12] = 1
    labels[15:25, 20 + seed:30 + seed] = 2
    labels[5:9, 30:38] = 5
    return labels


def write_png(path: Path, seed: int) -> np.ndarray:
    """A random RGB PNG; returns its pixels."""
    return write_image(path, random_uint8((HEIGHT, WIDTH, 3), seed))


def write_mat(path: Path, labels: np.ndarray, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"inst_map": labels, **extra})


@pytest.fixture
def dataset(tmp_path):
    """cpm15/{Images,Labels} and cpm17/{train,test}/{Images,Labels}, as the HoVer-Net Drive has them."""
    root = tmp_path / "cpm"
    images, labels = {}, {}
    for key, folder, name, seed in [
        ("cpm15", root / "cpm15", "image01", 1),
        ("train", root / "cpm17" / "train", "image_00", 2),
        ("test", root / "cpm17" / "test", "image_00", 3),
    ]:
        images[key] = write_png(folder / "Images" / f"{name}.png", seed)
        labels[key] = instance_map(seed)
        write_mat(folder / "Labels" / f"{name}.mat", labels[key], type_map=np.zeros((2, 2), np.int32))
    (root / "cpm17" / "train" / "Overlay").mkdir()
    write_png(root / "cpm17" / "train" / "Overlay" / "image_00.png", 9)  # not an image to convert
    return root, images, labels


def test_find_items_lists_cpm15_as_all_and_cpm17_by_split(dataset):
    root, _, _ = dataset
    assert source_split_subset(find_items(root, "all")) == [
        ("cpm15/Images/image01.png", "all", "cpm15")]
    assert [(i.source, i.subset, i.ref) for i in find_items(root, "train")] == [
        ("cpm17/train/Images/image_00.png", "cpm17",
         ("cpm17/train/Images/image_00.png", "cpm17/train/Labels/image_00.mat"))]
    assert [i.source for i in find_items(root, "test")] == ["cpm17/test/Images/image_00.png"]
    assert set(cpm.INFO.splits) == {"train", "test", "all"}


@pytest.mark.parametrize("split", ["all", "train", "test"])
def test_load_reads_the_inst_map_and_the_rgb_image(dataset, split):
    root, images, labels = dataset
    loaded = load(root, find_items(root, split)[0])
    key = "cpm15" if split == "all" else split
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(loaded.image, images[key])
    np.testing.assert_array_equal(loaded.labels, labels[key])
    assert n_objects(loaded.labels) == 3


def test_matlab_double_inst_map_is_accepted(dataset):
    root, _, labels = dataset
    write_mat(root / "cpm17" / "test" / "Labels" / "image_00.mat", labels["test"].astype(np.float64))
    loaded = load(root, find_items(root, "test")[0])
    np.testing.assert_array_equal(loaded.labels, labels["test"])


def test_npy_labels_are_read(dataset):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "test" / "Labels"
    (label_dir / "image_00.mat").unlink()
    np.save(label_dir / "image_00.npy", labels["test"])
    item = find_items(root, "test")[0]
    assert item.ref[1] == "cpm17/test/Labels/image_00.npy"
    np.testing.assert_array_equal(load(root, item).labels, labels["test"])


def write_vector(path: Path, labels: np.ndarray, header, separator="\n") -> None:
    """The competition's format: the dimensions first, then one value per pixel, x fastest."""
    values = separator.join(str(v) for v in labels.reshape(-1))  # C order: x fastest
    path.write_text(f"{header[0]},{header[1]}\n{values}\n")


@pytest.mark.parametrize("header_order", ["height_width", "width_height"])
@pytest.mark.parametrize("suffix,separator", [(".csv", "\n"), (".txt", " "), (".csv", ",")])
def test_text_vector_labels_reshape_x_fastest(dataset, header_order, suffix, separator):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "train" / "Labels"
    (label_dir / "image_00.mat").unlink()
    header = (HEIGHT, WIDTH) if header_order == "height_width" else (WIDTH, HEIGHT)
    write_vector(label_dir / f"image_00{suffix}", labels["train"], header, separator)
    loaded = load(root, find_items(root, "train")[0])
    np.testing.assert_array_equal(loaded.labels, labels["train"])
    assert n_objects(loaded.labels) == 3


def test_text_vector_with_wrong_dimensions_or_count_is_rejected(dataset):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "train" / "Labels"
    (label_dir / "image_00.mat").unlink()
    path = label_dir / "image_00.csv"
    write_vector(path, labels["train"], (HEIGHT, WIDTH + 1))
    with pytest.raises(ItemError, match="image_00.csv.*dimensions"):
        load(root, find_items(root, "train")[0])
    write_vector(path, labels["train"][:-1], (HEIGHT, WIDTH))
    with pytest.raises(ItemError, match="image_00.csv.*1200 pixel values.*1160"):
        load(root, find_items(root, "train")[0])
    path.write_text("30,40\n1,2,x\n")
    with pytest.raises(ItemError, match="image_00.csv"):
        load(root, find_items(root, "train")[0])


def test_mat_without_inst_map_is_rejected_listing_its_variables(dataset):
    root, _, _ = dataset
    path = root / "cpm15" / "Labels" / "image01.mat"
    scipy.io.savemat(path, {"type_map": np.zeros((HEIGHT, WIDTH), np.int32)})
    with pytest.raises(ItemError, match="image01.mat.*'inst_map'.*type_map"):
        load(root, find_items(root, "all")[0])


def test_matlab_v73_file_gives_a_clear_error_without_h5py(dataset):
    try:
        import h5py  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("h5py is installed; the v7.3 file would be read with it")
    root, _, _ = dataset
    # A v7.3 header: 116 text bytes, 8 subsystem bytes, version 0x0200, endian "IM", then HDF5.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116) + bytes(8)
    path = root / "cpm15" / "Labels" / "image01.mat"
    path.write_bytes(header + struct.pack("<H", 0x0200) + b"IM" + b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ItemError, match="image01.mat.*v7.3.*h5py"):
        load(root, find_items(root, "all")[0])


def test_corrupt_and_truncated_files_are_rejected_naming_the_file(dataset):
    root, _, _ = dataset
    mat = root / "cpm15" / "Labels" / "image01.mat"
    mat.write_bytes(mat.read_bytes()[:150])
    with pytest.raises(ItemError, match="image01.mat"):
        load(root, find_items(root, "all")[0])
    mat.write_bytes(b"")
    with pytest.raises(ItemError, match="image01.mat.*empty"):
        load(root, find_items(root, "all")[0])
    png = root / "cpm17" / "test" / "Images" / "image_00.png"
    png.write_bytes(png.read_bytes()[:80])
    with pytest.raises(ValueError, match="image_00.png"):
        load(root, find_items(root, "test")[0])


def test_missing_partner_files_are_items_rejected_with_the_name(dataset):
    root, _, labels = dataset
    write_png(root / "cpm17" / "train" / "Images" / "image_01.png", 4)
    write_mat(root / "cpm17" / "train" / "Labels" / "image_02.mat", labels["train"])
    items = by_source(find_items(root, "train"))
    assert set(items) == {"cpm17/train/Images/image_00.png", "cpm17/train/Images/image_01.png",
                          "cpm17/train/Labels/image_02.mat"}
    assert_load_errors(load, root, items, {
        "cpm17/train/Images/image_01.png": "image_01.png has no label file",
        "cpm17/train/Labels/image_02.mat": "image_02.mat has no matching image",
    }, error=ItemError)


def test_one_stem_with_several_label_formats_is_one_item_using_the_mat(dataset):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "test" / "Labels"
    np.save(label_dir / "image_00.npy", np.zeros((HEIGHT, WIDTH), np.int32))
    items = find_items(root, "test")
    assert len(items) == 1 and items[0].ref[1] == "cpm17/test/Labels/image_00.mat"
    np.testing.assert_array_equal(load(root, items[0]).labels, labels["test"])


def test_labels_of_another_shape_than_the_image_are_rejected(dataset):
    root, _, _ = dataset
    write_mat(root / "cpm15" / "Labels" / "image01.mat", np.ones((HEIGHT, WIDTH + 2), np.int32))
    with pytest.raises(ItemError, match="image01.mat.*image01.png"):
        load(root, find_items(root, "all")[0])


def test_negative_ids_are_rejected(dataset):
    root, _, _ = dataset
    write_mat(root / "cpm15" / "Labels" / "image01.mat", -np.ones((HEIGHT, WIDTH), np.int32))
    with pytest.raises(ItemError, match="non-negative"):
        load(root, find_items(root, "all")[0])


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "Images").mkdir()
    assert_layout_error(find_items, tmp_path, "train", match="cpm17")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    root, _, _ = dataset
    built = build_and_read("cpm", root, shards_dir)
    for image, _, _, meta, _ in built.samples:
        assert image.shape == (HEIGHT, WIDTH, 3) and meta.channel_names == ("red", "green", "blue")
    counts = max_labels(built.samples, key=lambda meta: (meta.subset, meta.split, meta.source))
    assert counts == {
        ("cpm15", "all", "cpm15/Images/image01.png"): 3,
        ("cpm17", "train", "cpm17/train/Images/image_00.png"): 3,
        ("cpm17", "test", "cpm17/test/Images/image_00.png"): 3,
    }
