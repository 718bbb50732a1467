"""Tests for shardgen/datasets/cpm.py: HoVer-Net's .mat inst_map and .npy, and CPM-15 as first
released (imageXX_mask.txt with a "width height" header, x fastest)."""

import re
import shutil
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


def write_vector(path: Path, labels: np.ndarray, header=None, separator="\n") -> None:
    """The competition's format (its README_training.txt): a "width height" line, then one id per
    pixel, x fastest. ``header`` overrides the (width, height) written."""
    height, width = labels.shape
    header = (width, height) if header is None else header
    values = separator.join(str(v) for v in labels.reshape(-1))  # C order: x fastest
    path.write_text(f"{header[0]} {header[1]}\n{values}\n")


@pytest.mark.parametrize("suffix,separator", [(".csv", "\n"), (".txt", " "), (".csv", ",")])
def test_text_vector_labels_reshape_x_fastest(dataset, suffix, separator):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "train" / "Labels"
    (label_dir / "image_00.mat").unlink()
    write_vector(label_dir / f"image_00{suffix}", labels["train"], separator=separator)
    loaded = load(root, find_items(root, "train")[0])
    np.testing.assert_array_equal(loaded.labels, labels["train"])
    assert n_objects(loaded.labels) == 3


def test_text_vector_with_wrong_header_or_count_is_rejected(dataset):
    root, _, labels = dataset
    label_dir = root / "cpm17" / "train" / "Labels"
    (label_dir / "image_00.mat").unlink()
    path = label_dir / "image_00.csv"
    write_vector(path, labels["train"], (WIDTH + 1, HEIGHT))
    with pytest.raises(ItemError, match="image_00.csv: the header gives 41 x 30 .* image_00.png is 40 x 30"):
        load(root, find_items(root, "train")[0])
    # Height first: the README puts the width first, so this is not read as the image's labels.
    write_vector(path, labels["train"], (HEIGHT, WIDTH))
    with pytest.raises(ItemError, match="header gives 30 x 40 .*README puts the width first"):
        load(root, find_items(root, "train")[0])
    write_vector(path, labels["train"][:-1])  # the header says 40 x 29
    with pytest.raises(ItemError, match="header gives 40 x 29"):
        load(root, find_items(root, "train")[0])
    path.write_text(f"{WIDTH} {HEIGHT}\n" + "0\n" * (HEIGHT * WIDTH - 40))
    with pytest.raises(ItemError, match="image_00.csv: expected 40 \\* 30 = 1200 pixel values.*got 1160"):
        load(root, find_items(root, "train")[0])
    path.write_text("40 30\n1,2,x\n")
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


# ------------------------------------------------------------------------------------------------
# CPM-15 as first released: one flat folder, imageXX.png + imageXX_mask.txt + imageXX_poly.png
# ------------------------------------------------------------------------------------------------

# (height, width) of each image; the real images differ in size too (image01 is 643 x 488).
RELEASE_SIZES = {"image01": (30, 40), "image02": (26, 34), "image03": (28, 36)}


def release_labels(height: int, width: int, seed: int) -> np.ndarray:
    """Two rectangles, ids 7 and 22 (the real files' ids are not consecutive either)."""
    labels = np.zeros((height, width), np.int32)
    labels[2:9, 3 + seed:12 + seed] = 7
    labels[14:22, 18:30] = 22
    return labels


def write_release(folder: Path, image_folder: Path | None = None, swap_headers: bool = False) -> dict:
    """The release's real names and format (README_training.txt): ``imageXX.png``,
    ``imageXX_mask.txt`` (a "width height" line, e.g. "643 488", then one id per line, x fastest)
    and ``imageXX_poly.png`` (the outlines drawn on the image, for viewing), beside the release's
    ``README_training.txt``. ``swap_headers``
    gives image02's and image03's label files each other's header, as in a real copy.
    Returns {stem: (rgb, labels)}."""
    image_folder = image_folder or folder
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for seed, (stem, (height, width)) in enumerate(RELEASE_SIZES.items()):
        rgb = write_image(image_folder / f"{stem}.png", random_uint8((height, width, 3), seed))
        write_image(image_folder / f"{stem}_poly.png", random_uint8((height, width, 3), seed + 10))
        labels = release_labels(height, width, seed)
        write_vector(folder / f"{stem}_mask.txt", labels)
        written[stem] = (rgb, labels)
    (folder / "README_training.txt").write_text("This is the training dataset ...\n")  # not a label file
    if swap_headers:
        for stem, other in (("image02", "image03"), ("image03", "image02")):
            height, width = RELEASE_SIZES[other]
            write_vector(folder / f"{stem}_mask.txt", written[stem][1], header=(width, height))
    return written


def test_first_release_flat_folder_pairs_image_with_mask_txt_and_skips_poly(tmp_path):
    written = write_release(tmp_path)
    items = find_items(tmp_path, "all")
    assert [(i.source, i.subset, i.ref[1]) for i in items] == [
        (f"{stem}.png", "cpm15", f"{stem}_mask.txt") for stem in RELEASE_SIZES
    ]
    assert find_items(tmp_path, "train") == find_items(tmp_path, "test") == []
    for item in items:
        loaded = load(tmp_path, item)
        rgb, labels = written[Path(item.source).stem]
        np.testing.assert_array_equal(loaded.image, rgb)
        np.testing.assert_array_equal(loaded.labels, labels)  # x fastest: rows come out as written
        assert n_objects(loaded.labels) == 2


def test_first_release_in_cpm15_beside_cpm17(dataset):
    root, _, _ = dataset
    shutil.rmtree(root / "cpm15")
    written = write_release(root / "cpm15")
    items = find_items(root, "all")
    assert [i.source for i in items] == [f"cpm15/{stem}.png" for stem in RELEASE_SIZES]
    np.testing.assert_array_equal(load(root, items[1]).labels, written["image02"][1])
    assert [i.source for i in find_items(root, "train")] == ["cpm17/train/Images/image_00.png"]


def test_released_files_put_into_images_and_labels_still_pair(tmp_path):
    """The release's files sorted into HoVer-Net's folders: image01.png pairs with image01_mask.txt
    (before, this gave 0 samples: every image "has no label file", every label an orphan)."""
    written = write_release(tmp_path / "cpm15" / "Labels", image_folder=tmp_path / "cpm15" / "Images")
    items = find_items(tmp_path, "all")
    assert [i.ref for i in items] == [
        (f"cpm15/Images/{stem}.png", f"cpm15/Labels/{stem}_mask.txt") for stem in RELEASE_SIZES
    ]
    np.testing.assert_array_equal(load(tmp_path, items[2]).labels, written["image03"][1])


def test_swapped_headers_are_rejected_naming_the_other_image(tmp_path, shards_dir):
    write_release(tmp_path / "src", swap_headers=True)
    built = build_and_read("cpm", tmp_path / "src", shards_dir)
    assert built.summary["written"] == 1 and built.summary["rejected"] == 2
    assert [meta.source for _, _, _, meta, _ in built.samples] == ["image01.png"]
    reasons = {row["source"]: row["reason"] for row in built.rejects}
    assert set(reasons) == {"image02.png", "image03.png"}
    assert re.search(r"image02_mask.txt: the header gives 36 x 28 .*image02.png is 34 x 26.*size of image03.png",
                     reasons["image02.png"])
    assert re.search(r"image03_mask.txt: the header gives 34 x 26 .*size of image02.png", reasons["image03.png"])
