"""Tests for shardgen/datasets/livecell.py: listing, loading, and the Cellpose overlap rule."""

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import given, settings
from hypothesis import strategies as st

from shardgen.base import ItemError, LayoutError
from shardgen.datasets import livecell
from shardgen.datasets.livecell import find_items, load, resolve_overlaps
from tests.shardgen.datasets.helpers import build_and_read, by_source, max_labels, n_objects, random_uint8, write_image

HEIGHT, WIDTH = 40, 56


def square(x0, y0, x1, y1):
    """A COCO polygon [x0, y0, x1, y0, ...] whose filled pixels are columns x0..x1, rows y0..y1."""
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


# Three polygons of the fixture's first image (LIVECell fixture recipe, datasets.md 2.4):
# A and B overlap on columns 18..24, rows 10..24 (105 px); C (63 px) has 49 px (78%) inside A,
# so it is dropped. The JSON order is A, C, B, so the survivors get ids A = 1, B = 2.
POLYGON_A = square(4, 4, 24, 24)
POLYGON_B = square(18, 10, 40, 30)
POLYGON_C = square(2, 6, 10, 12)

TRAIN_A1 = "A172_Phase_A1_1_00d00h00m_1.tif"
TRAIN_A2 = "A172_Phase_A1_1_00d00h00m_2.tif"  # listed without annotations
TRAIN_MISSING = "BV2_Phase_C3_2_01d00h00m_3.tif"  # listed, but no file
VAL_B1 = "BT474_Phase_B2_1_00d00h00m_1.tif"
TEST_S1 = "SkBr3_Phase_E3_1_00d12h00m_1.tif"


def write_tif(path: Path, seed: int) -> np.ndarray:
    """A random 8-bit gray TIFF; returns its pixels."""
    return write_image(path, random_uint8((HEIGHT, WIDTH), seed))


def coco(images, annotations, dict_style=False):
    image_entries = [
        {"id": image_id, "file_name": name, "height": HEIGHT, "width": WIDTH} for image_id, name in images
    ]
    annotation_entries = [
        {"id": 100 + k, "image_id": image_id, "segmentation": [polygon], "area": 0.0,
         "bbox": [0, 0, 1, 1], "iscrowd": 0, "category_id": 1}
        for k, (image_id, polygon) in enumerate(annotations)
    ]
    if dict_style:  # the variant some copies have (LIVECell issues #4, #9, #23)
        annotation_entries = {str(entry["id"]): entry for entry in annotation_entries}
    return {"images": image_entries, "annotations": annotation_entries,
            "categories": [{"id": 1, "name": "cell"}]}


def write_json(root: Path, split: str, data: dict) -> None:
    path = root / "annotations" / "LIVECell" / f"livecell_coco_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


@pytest.fixture
def dataset(tmp_path):
    """A miniature LIVECell download: per-type train_val folder, flat test folder, three JSONs."""
    root = tmp_path / "LIVECell_dataset_2021"
    train_val = root / "images" / "livecell_train_val_images"
    images = {
        TRAIN_A1: write_tif(train_val / "A172" / TRAIN_A1, 1),
        TRAIN_A2: write_tif(train_val / "A172" / TRAIN_A2, 2),
        VAL_B1: write_tif(train_val / "BT474" / VAL_B1, 3),
        TEST_S1: write_tif(root / "images" / "livecell_test_images" / TEST_S1, 4),
    }
    write_json(root, "train", coco(
        [(7, TRAIN_A1), (8, TRAIN_A2), (9, TRAIN_MISSING)],
        [(7, POLYGON_A), (7, POLYGON_C), (7, POLYGON_B), (9, POLYGON_A)],
    ))
    write_json(root, "val", coco([(11, VAL_B1)], [(11, POLYGON_B)]))
    write_json(root, "test", coco([(21, TEST_S1)], [(21, POLYGON_A), (21, POLYGON_B)], dict_style=True))
    return root, images


# ------------------------------------------------------------------------------------------------
# Listing
# ------------------------------------------------------------------------------------------------


def test_find_items_lists_every_json_image_with_cell_type_subset(dataset):
    root, _ = dataset
    items = find_items(root, "train")
    assert [item.source for item in items] == [
        f"images/livecell_train_val_images/A172/{TRAIN_A1}",
        f"images/livecell_train_val_images/A172/{TRAIN_A2}",
        f"annotations/LIVECell/livecell_coco_train.json[{TRAIN_MISSING}]",
    ]
    assert [item.subset for item in items] == ["A172", "A172", "BV2"]
    assert {item.split for item in items} == {"train"}
    assert [item.source for item in find_items(root, "val")] == [
        f"images/livecell_train_val_images/BT474/{VAL_B1}"
    ]
    test_items = find_items(root, "test")
    assert [(item.source, item.subset) for item in test_items] == [
        (f"images/livecell_test_images/{TEST_S1}", "SkBr3")  # flat folder variant
    ]


def test_find_items_is_deterministic_and_items_are_hashable(dataset):
    root, _ = dataset
    first, second = find_items(root, "train"), find_items(root, "train")
    assert first == second
    assert len({hash(item) for item in first}) == len(first)


def test_wrong_folder_raises_layout_error_quoting_the_layout(tmp_path):
    (tmp_path / "something_else").mkdir()
    with pytest.raises(LayoutError) as excinfo:
        find_items(tmp_path, "train")
    assert "livecell_coco_" in str(excinfo.value)
    assert "something_else" in str(excinfo.value)


def test_info_declares_phase_single_channel_and_published_splits():
    assert livecell.INFO.modality == "phase"
    assert livecell.INFO.channel_names == ("phase",)
    assert livecell.INFO.splits == ("train", "val", "test")


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def test_load_resolves_overlaps_by_the_cellpose_rule(dataset):
    root, images = dataset
    loaded = load(root, find_items(root, "train")[0])
    assert loaded.image.dtype == np.uint8 and loaded.image.shape == (HEIGHT, WIDTH, 1)
    np.testing.assert_array_equal(loaded.image[:, :, 0], images[TRAIN_A1])
    labels = loaded.labels
    assert labels.shape == (HEIGHT, WIDTH)
    # C is nearly contained in A (78% overlapped) and dropped: 2 objects from 3 polygons.
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert labels[8, 3] == 0  # a pixel only C covered is background once C is dropped
    # Overlap pixels go to the nearer mean: A's is (row 14, col 14), B's (row 20, col 29).
    assert labels[10, 18] == 1 and labels[24, 24] == 2
    # Pixels only one mask covers keep it; no pixel outside A and B is labelled.
    assert labels[4, 4] == 1 and labels[30, 40] == 2
    covered = np.zeros((HEIGHT, WIDTH), bool)
    covered[4:25, 4:25] = covered[10:31, 18:41] = True
    assert not labels[~covered].any() and labels[covered].all()


def test_dict_style_annotations_give_the_same_labels_as_a_list(dataset, tmp_path):
    root, _ = dataset
    test_labels = load(root, find_items(root, "test")[0]).labels  # the test JSON is dict-style
    assert n_objects(test_labels) == 2
    write_json(root, "test", coco([(21, TEST_S1)], [(21, POLYGON_A), (21, POLYGON_B)], dict_style=False))
    np.testing.assert_array_equal(load(root, find_items(root, "test")[0]).labels, test_labels)


def test_image_without_annotations_loads_without_objects(dataset):
    root, images = dataset
    loaded = load(root, by_source(find_items(root, "train"))[
        f"images/livecell_train_val_images/A172/{TRAIN_A2}"])
    np.testing.assert_array_equal(loaded.image[:, :, 0], images[TRAIN_A2])
    assert not loaded.labels.any()  # the writer rejects it as "no objects"


def test_listed_image_whose_file_is_missing_is_rejected_with_its_name(dataset):
    root, _ = dataset
    item = find_items(root, "train")[2]
    with pytest.raises(ItemError, match=TRAIN_MISSING):
        load(root, item)


def test_image_no_json_lists_is_an_item_of_its_folders_first_split(dataset):
    root, _ = dataset
    rel = "images/livecell_train_val_images/A172/A172_Phase_Z9_9_00d00h00m_9.tif"
    write_tif(root / rel, 5)
    train = by_source(find_items(root, "train"))
    assert rel in train and train[rel].subset == "A172"
    assert rel not in by_source(find_items(root, "val"))  # listed once only
    listed_nowhere = "A172_Phase_Z9_9_00d00h00m_9.tif.*livecell_coco_train.json or livecell_coco_val.json"
    with pytest.raises(ItemError, match=listed_nowhere):
        load(root, train[rel])
    # A val image is not an orphan of train: the val JSON lists it.
    assert f"images/livecell_train_val_images/BT474/{VAL_B1}" not in train


def test_truncated_image_is_rejected_naming_the_file(dataset):
    root, _ = dataset
    path = root / "images" / "livecell_train_val_images" / "A172" / TRAIN_A1
    path.write_bytes(path.read_bytes()[:200])
    item = find_items(root, "train")[0]
    with pytest.raises(ValueError, match=TRAIN_A1):
        load(root, item)


def test_image_of_another_size_than_the_json_says_is_rejected(dataset):
    root, _ = dataset
    tifffile.imwrite(root / "images" / "livecell_test_images" / TEST_S1, np.zeros((20, 20), np.uint8))
    with pytest.raises(ItemError, match=f"{TEST_S1}.*20x20.*{HEIGHT}x{WIDTH}"):
        load(root, find_items(root, "test")[0])


def test_corrupt_json_is_one_rejected_item_and_its_images_become_orphans(dataset):
    root, _ = dataset
    path = root / "annotations" / "LIVECell" / "livecell_coco_train.json"
    path.write_text(path.read_text()[:100])
    items = find_items(root, "train")
    sources = [item.source for item in items]
    assert "annotations/LIVECell/livecell_coco_train.json" in sources
    with pytest.raises(ItemError, match="livecell_coco_train.json"):
        load(root, by_source(items)["annotations/LIVECell/livecell_coco_train.json"])
    # The two train images are on disk but now listed by no readable JSON: still items.
    assert f"images/livecell_train_val_images/A172/{TRAIN_A1}" in sources
    assert f"images/livecell_train_val_images/A172/{TRAIN_A2}" in sources


def test_annotations_of_an_unknown_image_id_are_a_rejected_item(dataset):
    root, _ = dataset
    write_json(root, "val", coco([(11, VAL_B1)], [(11, POLYGON_B), (99, POLYGON_A)]))
    items = find_items(root, "val")
    assert len(items) == 2
    with pytest.raises(ItemError, match="image_id 99"):
        load(root, items[1])
    assert n_objects(load(root, items[0]).labels) == 1


def test_rle_segmentation_is_rejected_with_a_message(dataset):
    root, _ = dataset
    data = coco([(11, VAL_B1)], [(11, POLYGON_B)])
    data["annotations"][0]["segmentation"] = {"counts": [0, 5], "size": [HEIGHT, WIDTH]}
    write_json(root, "val", data)
    with pytest.raises(ItemError, match="RLE"):
        load(root, find_items(root, "val")[0])


# ------------------------------------------------------------------------------------------------
# The overlap rule on hand-made masks
# ------------------------------------------------------------------------------------------------


def rect(shape, r0, r1, c0, c1):
    mask = np.zeros(shape, bool)
    mask[r0:r1, c0:c1] = True
    return np.nonzero(mask)


def test_nearly_contained_mask_is_dropped_and_the_rest_kept():
    shape = (20, 20)
    big = rect(shape, 2, 12, 2, 12)  # 100 px
    nearly_inside = rect(shape, 3, 7, 1, 6)  # 20 px, 16 of them (80%) inside big
    labels = resolve_overlaps([big, nearly_inside], shape)
    assert sorted(np.unique(labels)) == [0, 1]
    np.testing.assert_array_equal(labels > 0, np.isin(np.arange(400).reshape(shape),
                                                      np.ravel_multi_index(big, shape)))


def test_exactly_the_threshold_drops_and_just_below_keeps():
    shape = (20, 20)
    big = rect(shape, 0, 10, 0, 10)
    three_quarters = rect(shape, 0, 2, 7, 11)  # 8 px, 6 inside big: 0.75 -> dropped
    assert len(np.unique(resolve_overlaps([big, three_quarters], shape))) - 1 == 1
    below = rect(shape, 0, 2, 8, 12)  # 8 px, 4 inside big: 0.5 -> kept
    labels = resolve_overlaps([big, below], shape)
    assert len(np.unique(labels)) - 1 == 2
    assert labels[0, 11] == 2 and labels[0, 0] == 1


def test_dropping_a_mask_uncounts_its_pixels_for_the_larger_masks():
    shape = (10, 30)
    small = rect(shape, 0, 4, 0, 4)  # 16 px, all inside medium: dropped first
    medium = rect(shape, 0, 4, 0, 5)  # 20 px; 16 (80%) overlapped only while small counts
    large = rect(shape, 5, 10, 0, 30)  # 150 px, apart
    labels = resolve_overlaps([large, medium, small], shape)
    # Without the decrement medium would be dropped too; with it, medium survives whole.
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert (labels == 2).sum() == 20 and (labels == 1).sum() == 150


def test_smallest_first_decides_which_of_two_overlapping_masks_goes():
    shape = (20, 20)
    larger = rect(shape, 0, 10, 0, 10)  # 100 px
    smaller = rect(shape, 0, 9, 1, 10)  # 81 px, all inside larger: goes first, and is dropped
    labels = resolve_overlaps([smaller, larger], shape)
    assert sorted(np.unique(labels)) == [0, 1]
    assert (labels == 1).sum() == 100


def test_overlap_pixels_go_to_the_covering_mask_with_the_nearest_mean():
    shape = (10, 30)
    left = rect(shape, 0, 10, 0, 12)  # mean column 5.5
    right = rect(shape, 0, 10, 8, 30)  # mean column 18.5; overlap = columns 8..11
    labels = resolve_overlaps([left, right], shape)
    # Columns 8..11: distance to 5.5 is 2.5..5.5, to 18.5 is 10.5..7.5 -> all go to left.
    assert (labels[:, 8:12] == 1).all()
    assert (labels[:, 12:] == 2).all() and (labels[:, :8] == 1).all()


def test_overlap_pixel_never_goes_to_a_mask_that_does_not_cover_it():
    # The authors' version compares against every surviving mask; here only covering masks count.
    shape = (20, 40)
    wide_a = rect(shape, 0, 20, 0, 20)  # mean (9.5, 9.5)
    wide_b = rect(shape, 4, 20, 18, 38)  # mean (11.5, 27.5); overlap rows 4..19, columns 18..19
    tiny = rect(shape, 0, 2, 20, 22)  # 4 px apart from both, mean (0.5, 20.5)
    labels = resolve_overlaps([wide_a, wide_b, tiny], shape)
    # Pixel (4, 19): squared distances 120.5 (a), 128.5 (b), 14.5 (tiny, which does not cover it).
    assert labels[4, 19] == 1
    assert (labels == 3).sum() == 4


def test_equal_distances_go_to_the_earlier_mask():
    shape = (4, 10)
    first = rect(shape, 0, 4, 0, 6)  # columns 0..5, mean 2.5
    second = rect(shape, 0, 4, 4, 10)  # columns 4..9, mean 6.5; overlap columns 4, 5
    labels = resolve_overlaps([first, second], shape)
    assert (labels[:, 4] == 1).all()  # 1.5 vs 2.5
    assert (labels[:, 5] == 2).all()  # 2.5 vs 1.5
    tie_first = rect(shape, 0, 4, 0, 5)  # columns 0..4, mean 2
    tie_second = rect(shape, 0, 4, 4, 9)  # columns 4..8, mean 6: column 4 is 2 from both
    labels = resolve_overlaps([tie_first, tie_second], shape)
    assert (labels[:, 4] == 1).all()
    labels = resolve_overlaps([tie_second, tie_first], shape)
    assert (labels[:, 4] == 1).all()  # now tie_second is first in the input, and id 1


def test_empty_masks_get_no_id():
    shape = (8, 8)
    empty = (np.zeros(0, int), np.zeros(0, int))
    labels = resolve_overlaps([empty, rect(shape, 0, 3, 0, 3), empty, rect(shape, 5, 8, 5, 8)], shape)
    assert sorted(np.unique(labels)) == [0, 1, 2]
    assert resolve_overlaps([], shape).dtype == np.uint32 and not resolve_overlaps([], shape).any()


def dense_overlap_rule(stack, threshold=0.75):
    """The same rule on a (N, H, W) bool stack, written the other way round: whole-array steps."""
    stack = stack.copy()
    coverage = stack.sum(axis=0)
    areas = stack.sum(axis=(1, 2))
    alive = areas > 0
    for k in sorted(range(len(stack)), key=lambda k: (areas[k], k)):
        if alive[k] and (coverage[stack[k]] > 1).mean() >= threshold:
            alive[k] = False
            coverage = coverage - stack[k]
    stack = stack[alive]
    if len(stack) == 0:
        return np.zeros(stack.shape[1:], np.uint32)
    rows, cols = np.indices(stack.shape[1:])
    means = [(rows[m].mean(), cols[m].mean()) for m in stack]
    distance = np.stack([np.where(m, (rows - r) ** 2 + (cols - c) ** 2, np.inf) for m, (r, c) in zip(stack, means)])
    labels = np.argmin(distance, axis=0) + 1  # argmin: the first of equal distances
    labels[~stack.any(axis=0)] = 0
    return labels.astype(np.uint32)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 14), st.integers(1, 9), st.integers(0, 14), st.integers(1, 9)),
                min_size=0, max_size=7))
def test_overlap_rule_matches_a_dense_formulation(boxes):
    shape = (16, 16)
    stack = np.zeros((len(boxes),) + shape, bool)
    for k, (r, h, c, w) in enumerate(boxes):
        stack[k, r:r + h, c:c + w] = True
    labels = resolve_overlaps([np.nonzero(m) for m in stack], shape)
    np.testing.assert_array_equal(labels, dense_overlap_rule(stack))
    # And plain invariants: only covered pixels are labelled, ids are 1..N.
    assert not labels[~stack.any(axis=0)].any()
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))


def test_end_to_end_shards_hold_every_object(dataset, shards_dir):
    root, images = dataset
    built = build_and_read("livecell", root, shards_dir)
    for image, _, _, meta, _ in built.samples:
        np.testing.assert_array_equal(image[:, :, 0], images[Path(meta.source).name])
        assert image.shape == (HEIGHT, WIDTH, 1) and meta.modality == "phase"
    counts = max_labels(built.samples, key=lambda meta: (meta.split, meta.subset, Path(meta.source).name))
    assert counts == {("train", "A172", TRAIN_A1): 2, ("val", "BT474", VAL_B1): 1, ("test", "SkBr3", TEST_S1): 2}
    rejects = {r["source"]: r["reason"] for r in built.rejects}
    missing = f"annotations/LIVECell/livecell_coco_train.json[{TRAIN_MISSING}]"
    assert set(rejects) == {f"images/livecell_train_val_images/A172/{TRAIN_A2}", missing}
    assert rejects[f"images/livecell_train_val_images/A172/{TRAIN_A2}"] == "no objects"
    assert "no such file" in rejects[missing]
