"""Omnipose converter on a miniature copy of the published layout (datasets.md 2.5 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from shardgen.datasets import omnipose
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, n_objects, truncate,
)

SHAPE = (48, 56)


def phase_image(labels: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (1000 + 500 * (labels > 0) + rng.integers(0, 50, labels.shape)).astype(np.uint16)


def write_pair(folder: Path, name: str, n_cells: int, *, mask_ext=".tif", flows=True, seed=0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    centres = [(12, 12), (30, 40), (36, 14)][:n_cells]
    labels = disc_labels(centres, SHAPE, radius=6)
    tifffile.imwrite(folder / f"{name}.tif", phase_image(labels, seed))
    if mask_ext == ".png":
        Image.fromarray(labels.astype(np.uint8)).save(folder / f"{name}_masks.png")
    else:
        tifffile.imwrite(folder / f"{name}_masks{mask_ext}", labels)
    if flows:  # a dummy 3 x H x W float flows file, as Omnipose ships beside some images
        tifffile.imwrite(folder / f"{name}_flows.tif", np.zeros((3, *SHAPE), np.float32), photometric="minisblack")


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "omnipose"
    write_pair(root / "bact_phase/train_sorted/set1", "a", 3)
    write_pair(root / "bact_phase/train_sorted/set2", "10", 2, flows=False)
    write_pair(root / "bact_phase/test_sorted/set1", "b", 1)
    write_pair(root / "bact_fluor/train_sorted/setA", "c", 2)
    write_pair(root / "bact_fluor/test_sorted/setA", "d", 3)
    write_pair(root / "worm/train", "w", 2, mask_ext=".png", flows=False)
    write_pair(root / "worm/test", "wt", 1, mask_ext=".png", flows=False)
    write_pair(root / "worm_high_res/train", "h", 3)
    (root / "bact_phase/train_sorted/set1/.DS_Store").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    return root


def test_find_items_lists_pairs_per_subset_and_skips_flows(dataset):
    items = omnipose.find_items(dataset, "train")
    assert [(i.subset, i.source) for i in items] == [
        ("bact_phase", "bact_phase/train_sorted/set1/a.tif"),
        ("bact_phase", "bact_phase/train_sorted/set2/10.tif"),
        ("bact_fluor", "bact_fluor/train_sorted/setA/c.tif"),
        ("worm", "worm/train/w.tif"),
        ("worm_high_res", "worm_high_res/train/h.tif"),
    ]
    assert {i.split for i in items} == {"train"}
    assert [i.source for i in omnipose.find_items(dataset, "test")] == [
        "bact_phase/test_sorted/set1/b.tif",
        "bact_fluor/test_sorted/setA/d.tif",
        "worm/test/wt.tif",
    ]
    assert not any("_flows" in i.source for i in items)


@pytest.mark.parametrize(
    ("source", "n_cells", "modality", "channel"),
    [
        ("bact_phase/train_sorted/set1/a.tif", 3, "phase", "phase"),
        ("bact_fluor/train_sorted/setA/c.tif", 2, "fluorescence", "membrane/cytoplasm"),
        ("worm/train/w.tif", 2, "brightfield", "brightfield"),
        ("worm_high_res/train/h.tif", 3, "brightfield", "brightfield"),
    ],
)
def test_load_gives_gray_image_and_all_objects(dataset, source, n_cells, modality, channel):
    item = next(i for i in omnipose.find_items(dataset, "train") if i.source == source)
    loaded = omnipose.load(dataset, item)
    assert loaded.image.shape == (*SHAPE, 1) and loaded.image.dtype == np.uint16
    source_image = tifffile.imread(dataset / source)
    np.testing.assert_array_equal(loaded.image[:, :, 0], source_image)
    assert loaded.labels.shape == SHAPE
    assert n_objects(loaded.labels) == n_cells
    assert loaded.modality == modality and loaded.channel_names == (channel,)


def test_rgb_with_equal_channels_is_one_channel_and_distinct_channels_are_rejected(dataset):
    folder = dataset / "worm/train"
    gray = tifffile.imread(folder / "w.tif")
    tifffile.imwrite(folder / "w.tif", np.stack([gray, gray, gray], axis=-1).astype(np.uint8), photometric="rgb")
    item = next(i for i in omnipose.find_items(dataset, "train") if i.source == "worm/train/w.tif")
    assert omnipose.load(dataset, item).image.shape == (*SHAPE, 1)
    colour = np.stack([gray, gray // 2, gray // 3], axis=-1).astype(np.uint8)
    tifffile.imwrite(folder / "w.tif", colour, photometric="rgb")
    with pytest.raises(ValueError, match="w.tif.*channels"):
        omnipose.load(dataset, item)


def test_bad_files_are_listed_and_rejected_with_their_name(dataset):
    folder = dataset / "bact_phase/train_sorted/set1"
    (folder / "corrupt.tif").write_bytes(b"II*\x00" + b"\x07" * 40)
    write_pair(folder, "cut", 2, flows=False)
    truncate(folder / "cut.tif")
    write_pair(folder, "lonely", 2, flows=False)
    (folder / "lonely_masks.tif").unlink()
    write_pair(folder, "orphan", 2, flows=False)
    (folder / "orphan.tif").unlink()

    expected = {
        "bact_phase/train_sorted/set1/corrupt.tif": "corrupt.tif",
        "bact_phase/train_sorted/set1/cut.tif": "cut.tif",
        "bact_phase/train_sorted/set1/lonely.tif": "lonely.tif.*no label",
        "bact_phase/train_sorted/set1/orphan_masks.tif": "orphan_masks.tif.*no matching image",
    }
    items = by_source(omnipose.find_items(dataset, "train"))
    assert_load_errors(omnipose.load, dataset, items, expected, error=(ValueError, FileNotFoundError))


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(omnipose.find_items, tmp_path, "train", match="bact_phase")
    assert_layout_error(omnipose.find_items, tmp_path / "missing", "train")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    built = build_and_read("omnipose", dataset, shards_dir)
    for image, _, flows, _, ignore in built.samples:
        assert image.shape == (*SHAPE, 1) and flows.shape == (2, *SHAPE) and ignore is None
    counts = {meta.source: (int(labels.max()), meta.subset, meta.modality) for _, labels, _, meta, _ in built.samples}
    assert counts == {
        "bact_phase/train_sorted/set1/a.tif": (3, "bact_phase", "phase"),
        "bact_phase/train_sorted/set2/10.tif": (2, "bact_phase", "phase"),
        "bact_phase/test_sorted/set1/b.tif": (1, "bact_phase", "phase"),
        "bact_fluor/train_sorted/setA/c.tif": (2, "bact_fluor", "fluorescence"),
        "bact_fluor/test_sorted/setA/d.tif": (3, "bact_fluor", "fluorescence"),
        "worm/train/w.tif": (2, "worm", "brightfield"),
        "worm/test/wt.tif": (1, "worm", "brightfield"),
        "worm_high_res/train/h.tif": (3, "worm_high_res", "brightfield"),
    }
