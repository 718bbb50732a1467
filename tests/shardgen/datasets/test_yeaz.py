"""YeaZ converter on a miniature copy of the published layout (datasets.md 2.6 fixture)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from shardgen.datasets import yeaz
from tests.shardgen.datasets.helpers import (
    assert_layout_error, assert_load_errors, build_and_read, by_source, disc_labels, truncate,
)

SHAPE = (40, 44)
BF = "gold-standard-BF-V-1"
PHC = "gold-standard-PhC-plus-2"


CENTRES = [(10, 10), (28, 32), (30, 10), (10, 34)]


def write_bf(folder: Path, name: str, n_cells: int) -> np.ndarray:
    folder.mkdir(parents=True, exist_ok=True)
    labels = disc_labels(CENTRES[:n_cells], SHAPE)
    image = (60 + 100 * (labels > 0)).astype(np.uint8)
    tifffile.imwrite(folder / f"{name}_im.tif", image)
    tifffile.imwrite(folder / f"{name}_mask.tif", labels)
    return image


def write_phc(folder: Path, name: str, cells_per_frame, mask_frames=None, photometric="minisblack") -> np.ndarray:
    """A (T, H, W) uint16 image stack and its (T, H, W) label stack; frame t has cells_per_frame[t].

    photometric="rgb" stores a 3-frame stack as one planar "RGB" page, as tifffile's old default
    (and other writers) do for (3, H, W) data.
    """
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.stack([disc_labels(CENTRES[:n], SHAPE) for n in cells_per_frame])
    image = (1000 + 300 * (labels > 0) + np.arange(len(cells_per_frame))[:, None, None]).astype(np.uint16)
    tifffile.imwrite(folder / f"{name}_im.tif", image, photometric=photometric)
    mask = labels if mask_frames is None else labels[:mask_frames]
    tifffile.imwrite(folder / f"{name}_mask.tif", mask, photometric=photometric)
    return image


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "yeaz"
    write_bf(root / BF, "x1", 2)
    write_bf(root / BF, "x2", 3)
    write_phc(root / PHC, "y1", [1, 2, 4])
    write_phc(root / PHC, "y2", [3, 3])
    (root / BF / "._x1_im.tif").write_bytes(b"resource fork")
    return root


def test_find_items_lists_bf_files_and_one_item_per_phc_frame(dataset):
    items = yeaz.find_items(dataset, "all")
    assert [(i.subset, i.source) for i in items] == [
        ("bf", f"{BF}/x1_im.tif"),
        ("bf", f"{BF}/x2_im.tif"),
        ("phc", f"{PHC}/y1_im.tif[0]"),
        ("phc", f"{PHC}/y1_im.tif[1]"),
        ("phc", f"{PHC}/y1_im.tif[2]"),
        ("phc", f"{PHC}/y2_im.tif[0]"),
        ("phc", f"{PHC}/y2_im.tif[1]"),
    ]
    assert {i.split for i in items} == {"all"}
    assert yeaz.find_items(dataset, "train") == []


def test_load_bf_image(dataset):
    item = yeaz.find_items(dataset, "all")[1]
    loaded = yeaz.load(dataset, item)
    assert loaded.image.shape == (*SHAPE, 1) and loaded.image.dtype == np.uint8
    assert len(np.unique(loaded.labels)) - 1 == 3
    assert loaded.modality == "brightfield" and loaded.channel_names == ("brightfield",)


def test_load_phc_pairs_image_frame_with_mask_frame(dataset):
    stack = tifffile.imread(dataset / PHC / "y1_im.tif")
    items = [i for i in yeaz.find_items(dataset, "all") if i.source.startswith(f"{PHC}/y1")]
    for frame, (item, n_cells) in enumerate(zip(items, [1, 2, 4])):
        loaded = yeaz.load(dataset, item)
        assert loaded.image.shape == (*SHAPE, 1) and loaded.image.dtype == np.uint16
        np.testing.assert_array_equal(loaded.image[:, :, 0], stack[frame])
        assert len(np.unique(loaded.labels)) - 1 == n_cells
        assert loaded.modality == "phase" and loaded.channel_names == ("phase",)


def test_three_frame_stack_stored_as_planar_rgb_is_still_frames(dataset):
    write_phc(dataset / PHC, "y1", [1, 2, 4], photometric="rgb")
    with tifffile.TiffFile(dataset / PHC / "y1_im.tif") as tif:
        assert tif.series[0].axes == "SYX"  # the fixture really is the planar case
    stack = tifffile.imread(dataset / PHC / "y1_im.tif")
    items = [i for i in yeaz.find_items(dataset, "all") if i.source.startswith(f"{PHC}/y1")]
    assert len(items) == 3
    for frame, (item, n_cells) in enumerate(zip(items, [1, 2, 4])):
        loaded = yeaz.load(dataset, item)
        np.testing.assert_array_equal(loaded.image[:, :, 0], stack[frame])
        assert len(np.unique(loaded.labels)) - 1 == n_cells


def test_frame_count_mismatch_rejects_every_frame(dataset):
    write_phc(dataset / PHC, "y3", [2, 2, 2], mask_frames=2)
    items = [i for i in yeaz.find_items(dataset, "all") if "y3" in i.source]
    assert [i.source for i in items] == [f"{PHC}/y3_im.tif[{t}]" for t in range(3)]
    for item in items:
        with pytest.raises(ValueError, match=r"y3_im.tif has 3 frame\(s\) but .*y3_mask.tif has 2"):
            yeaz.load(dataset, item)
    # a 2-D image with a stacked mask is a mismatch too
    write_bf(dataset / BF, "x3", 2)
    tifffile.imwrite(dataset / BF / "x3_mask.tif", np.stack([disc_labels(CENTRES[:2], SHAPE)] * 2))
    item = next(i for i in yeaz.find_items(dataset, "all") if "x3" in i.source)
    with pytest.raises(ValueError, match="x3_im.tif has 1 frame"):
        yeaz.load(dataset, item)


def test_bad_files_are_listed_and_rejected_with_their_name(dataset):
    folder = dataset / PHC
    (folder / "broken_im.tif").write_bytes(b"II*\x00" + b"\x01" * 30)
    write_phc(folder, "cut", [2, 2, 2, 2, 2, 2])
    truncate(folder / "cut_im.tif")
    write_bf(dataset / BF, "lonely", 2)
    (dataset / BF / "lonely_mask.tif").unlink()
    write_bf(dataset / BF, "orphan", 2)
    (dataset / BF / "orphan_im.tif").unlink()
    tifffile.imwrite(dataset / BF / "notes.tif", np.zeros(SHAPE, np.uint8))

    items = yeaz.find_items(dataset, "all")
    cut_items = [i for i in items if "cut_im" in i.source]
    assert cut_items, "a truncated stack is still listed"
    expected = {
        f"{PHC}/broken_im.tif": "broken_im.tif",
        f"{BF}/lonely_im.tif": "lonely_im.tif has no label",
        f"{BF}/orphan_mask.tif": "orphan_mask.tif has no matching image",
        f"{BF}/notes.tif": "notes.tif: unexpected file",
    }
    assert_load_errors(yeaz.load, dataset, by_source(items), expected)
    for item in cut_items:
        with pytest.raises(ValueError, match="cut_im.tif"):
            yeaz.load(dataset, item)


def test_wrong_folder_raises_layout_error(tmp_path):
    (tmp_path / "images").mkdir()
    assert_layout_error(yeaz.find_items, tmp_path, "all", match="gold-standard-BF-V-1")


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    built = build_and_read("yeaz", dataset, shards_dir)
    for image, _, _, _, _ in built.samples:
        assert image.shape == (*SHAPE, 1)
    counts = {meta.source: (int(labels.max()), meta.subset, meta.modality) for _, labels, _, meta, _ in built.samples}
    assert counts == {
        f"{BF}/x1_im.tif": (2, "bf", "brightfield"),
        f"{BF}/x2_im.tif": (3, "bf", "brightfield"),
        f"{PHC}/y1_im.tif[0]": (1, "phc", "phase"),
        f"{PHC}/y1_im.tif[1]": (2, "phc", "phase"),
        f"{PHC}/y1_im.tif[2]": (4, "phc", "phase"),
        f"{PHC}/y2_im.tif[0]": (3, "phc", "phase"),
        f"{PHC}/y2_im.tif[1]": (3, "phc", "phase"),
    }
