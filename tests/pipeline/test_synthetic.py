"""Tests for pipeline/synthetic.py: exact labels, determinism, sizes, contrast, errors."""

import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from pipeline import synthetic
from pipeline.synthetic import KINDS, SyntheticConfig, generate, generate_dataset

CHANNELS = {"nuclei": 1, "cyto": 2, "phase": 1, "he": 3, "bacteria": 1}
DTYPES = {"nuclei": np.uint16, "cyto": np.uint16, "phase": np.uint16, "he": np.uint8, "bacteria": np.uint16}


def cellpose_diameter(labels: np.ndarray, *, interior: bool = False) -> float:
    """Median over objects of sqrt(area) / (sqrt(pi) / 2): Cellpose's `utils.diameters`.

    With `interior`, objects touching the image edge (cropped, so smaller) are left out.
    """
    areas = np.bincount(labels.ravel().astype(np.int64))
    if interior:
        edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
        areas[np.unique(edge)] = 0
    areas = areas[1:]
    areas = areas[areas > 0]
    return float(np.median(np.sqrt(areas)) / (np.sqrt(np.pi) / 2))


def touching_pairs(labels: np.ndarray) -> np.ndarray:
    """(P, 2) unique pairs of different nonzero labels that share a 4-connected edge."""
    pairs = []
    for a, b in [(labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])]:
        touch = (a != b) & (a > 0) & (b > 0)
        pairs.append(np.sort(np.stack([a[touch], b[touch]], axis=1), axis=1))
    return np.unique(np.concatenate(pairs), axis=0)


def assert_exact_labels(labels: np.ndarray, min_area: int) -> None:
    """Ids are 1..N, each object is one 8-connected piece of at least `min_area` pixels."""
    ids = np.unique(labels[labels > 0])
    np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == index
        _, n_pieces = ndimage.label(mask, structure=np.ones((3, 3), bool))
        assert n_pieces == 1, f"object {index} has {n_pieces} 8-connected pieces"
        assert mask.sum() >= min_area, f"object {index} has {mask.sum()} < {min_area} pixels"


# --------------------------------------------------------------------------------------------
# Output format
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shape_dtype_and_channels_per_kind(kind):
    image, labels = generate(kind, (96, 160), seed=3, diameter=14.0)
    assert image.shape == (96, 160, CHANNELS[kind])
    assert image.dtype == DTYPES[kind]
    assert labels.shape == (96, 160)
    assert labels.dtype == np.uint16
    assert labels.max() > 0
    assert image.std() > 0


def test_kinds_are_the_documented_five():
    assert KINDS == ("nuclei", "cyto", "phase", "he", "bacteria")


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_bytes_and_other_seeds_differ(kind):
    image, labels = generate(kind, (80, 96), seed=11)
    again_image, again_labels = generate(kind, (80, 96), seed=11)
    assert image.tobytes() == again_image.tobytes()
    assert labels.tobytes() == again_labels.tobytes()
    other_image, other_labels = generate(kind, (80, 96), seed=12)
    assert image.tobytes() != other_image.tobytes()
    assert labels.tobytes() != other_labels.tobytes()


def test_kinds_sharing_a_seed_do_not_share_a_layout():
    _, nuclei_labels = generate("nuclei", (96, 96), seed=5, diameter=12.0, density=0.6)
    _, he_labels = generate("he", (96, 96), seed=5, diameter=12.0, density=0.6)
    assert not np.array_equal(nuclei_labels > 0, he_labels > 0)


def test_generator_leaves_global_numpy_random_state_alone():
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    generate("cyto", (64, 64), seed=0)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


# --------------------------------------------------------------------------------------------
# Exact instance labels
# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**32),
    height=st.integers(16, 96),
    width=st.integers(16, 96),
    diameter_fraction=st.floats(0.0, 1.0),
    density=st.floats(0.05, 1.0),
)
def test_labels_are_consecutive_connected_and_not_tiny(kind, seed, height, width, diameter_fraction, density):
    # Any valid diameter, from the smallest (4 px) to half the shorter side.
    diameter = 4.0 + diameter_fraction * (min(height, width) / 2 - 4.0)
    image, labels = generate(kind, (height, width), seed=seed, diameter=diameter, density=density)
    assert image.shape[:2] == labels.shape == (height, width)
    assert_exact_labels(labels, SyntheticConfig().min_area)


@pytest.mark.parametrize("kind", KINDS)
def test_dense_images_have_exact_labels_and_touching_objects(kind):
    _, labels = generate(kind, (160, 160), seed=2, diameter=16.0, density=1.0)
    assert_exact_labels(labels, SyntheticConfig().min_area)
    # Touching objects share a border (label adjacency), not only separated blobs.
    assert len(touching_pairs(labels)) >= labels.max() // 2


def test_min_area_from_config_is_respected():
    config = SyntheticConfig(min_area=40)
    _, labels = generate("nuclei", (128, 128), seed=4, diameter=10.0, config=config)
    assert_exact_labels(labels, 40)


def test_bacteria_touch_end_to_end_and_side_by_side():
    _, labels = generate("bacteria", (256, 256), seed=1, diameter=14.0, density=0.9)
    # Centroid and long axis of each rod from its second moments.
    ys, xs = np.nonzero(labels)
    ids = labels[ys, xs].astype(np.intp)
    count = np.bincount(ids)
    cy, cx = np.bincount(ids, ys) / np.maximum(count, 1), np.bincount(ids, xs) / np.maximum(count, 1)
    dy, dx = ys - cy[ids], xs - cx[ids]
    syy, sxx, sxy = np.bincount(ids, dy * dy), np.bincount(ids, dx * dx), np.bincount(ids, dx * dy)
    axis_angle = 0.5 * np.arctan2(2 * sxy, sxx - syy)
    pairs = touching_pairs(labels)
    a, b = pairs[:, 0], pairs[:, 1]
    link_angle = np.arctan2(cy[b] - cy[a], cx[b] - cx[a])
    alignment = np.abs(np.cos(link_angle - axis_angle[a]))
    assert (alignment > 0.9).sum() >= 5, "no rods touching end to end"
    assert (alignment < 0.4).sum() >= 5, "no rods touching side by side"


def test_clean_labels_keeps_largest_piece_and_drops_small_objects():
    raw = np.zeros((12, 12), np.int64)
    raw[1:4, 1:4] = 1  # object 0: a 9-pixel piece ...
    raw[8:10, 8:10] = 1  # ... and a separate 4-pixel fragment
    raw[1:3, 6:9] = 2  # object 1: 6 pixels
    raw[10, 1:4] = 3  # object 2: 3 pixels, below min_area
    labels, kept = synthetic._clean_labels(raw, min_area=5)
    np.testing.assert_array_equal(kept, [0, 1])
    assert labels.dtype == np.uint16
    assert (labels == 1).sum() == 9 and (labels[1:4, 1:4] == 1).all()
    assert (labels == 2).sum() == 6
    assert (labels[8:10, 8:10] == 0).all() and (labels[10] == 0).all()


def test_clean_labels_keeps_objects_touching_only_diagonally_apart():
    # A checkerboard: each label is one 8-connected piece through its diagonals, and the two
    # labels touch everywhere; they must not be merged or split.
    raw = (np.indices((4, 4)).sum(axis=0) % 2 + 1).astype(np.int64)
    labels, kept = synthetic._clean_labels(raw, min_area=1)
    np.testing.assert_array_equal(labels, raw)
    np.testing.assert_array_equal(kept, [0, 1])


def test_clean_labels_switches_to_uint32_beyond_65535_objects():
    blocks = 265  # 265 ** 2 = 70225 blocks of 2 x 2 pixels, all touching their neighbours
    index = np.arange(blocks * blocks).reshape(blocks, blocks) + 1
    raw = np.kron(index, np.ones((2, 2), np.int64))
    labels, kept = synthetic._clean_labels(raw, min_area=4)
    assert labels.dtype == np.uint32
    assert labels.max() == blocks * blocks == len(kept)


# --------------------------------------------------------------------------------------------
# Object sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("diameter", [10.0, 24.0, 48.0])
def test_measured_diameter_follows_the_requested_one(kind, diameter):
    side = int(8 * diameter)  # room for ~50 objects, so the median is stable
    for seed in range(2):
        _, labels = generate(kind, (side, side), seed=seed, diameter=diameter, density=0.6)
        # Objects cropped by the image edge are smaller by construction; judge the others.
        assert 0.85 <= cellpose_diameter(labels, interior=True) / diameter <= 1.18
        # All objects, as Cellpose measures a training image: the crop pulls it down a little.
        assert 0.75 <= cellpose_diameter(labels) / diameter <= 1.18


def test_drawn_diameters_span_8_to_100_pixels():
    measured, drawn = [], []
    for _, labels, meta in generate_dataset(40, shape=(256, 256), seed=0):
        drawn.append(meta["diameter"])
        if meta["n_cells"] >= 3:
            measured.append(cellpose_diameter(labels))
    assert 8.0 <= min(drawn) < 10.0 and 80.0 < max(drawn) <= 100.0
    assert min(measured) < 10.0 and max(measured) > 50.0


def test_drawn_diameter_is_capped_at_half_the_shorter_side():
    metas = [meta for _, _, meta in generate_dataset(20, shape=(40, 200), seed=3)]
    assert max(meta["diameter"] for meta in metas) <= 20.0


@pytest.mark.reference
def test_cellpose_diameter_helper_matches_cellpose():
    utils = pytest.importorskip("cellpose.utils")
    _, labels = generate("cyto", (128, 128), seed=0, diameter=15.0)
    # Expected value: cellpose.utils.diameters, the definition the tests above rely on.
    expected, _ = utils.diameters(labels)
    assert cellpose_diameter(labels) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------------------------


def test_objects_differ_from_background_in_the_expected_direction():
    for image, labels, meta in generate_dataset(30, shape=(128, 128), seed=9):
        cells = labels > 0
        if cells.all() or not cells.any():
            continue
        values = image.astype(np.float64)
        if meta["kind"] == "he":
            values = values.mean(axis=-1, keepdims=True)  # brightness of the RGB pixel
        inside = values[cells].mean(axis=0)
        outside = values[~cells].mean(axis=0)
        if meta["modality"] == "fluorescence":  # nuclei, cyto (both channels), some bacteria
            assert (inside > 1.3 * outside).all(), meta
        else:  # phase contrast and H&E: objects darker
            assert (inside < 0.95 * outside).all(), meta


def test_modalities_per_kind():
    seen = {kind: set() for kind in KINDS}
    for _, _, meta in generate_dataset(60, shape=(32, 32), seed=2):
        seen[meta["kind"]].add(meta["modality"])
    assert seen == {
        "nuclei": {"fluorescence"},
        "cyto": {"fluorescence"},
        "phase": {"phase"},
        "he": {"brightfield"},
        "bacteria": {"phase", "fluorescence"},
    }


def test_he_nuclei_are_purple_blue_on_pink():
    image, labels = generate("he", (160, 160), seed=6, diameter=14.0, density=0.5)
    rgb = image.astype(np.float64)
    nuclei = rgb[labels > 0].mean(axis=0)
    stroma = rgb[labels == 0].mean(axis=0)
    # Haematoxylin absorbs red and green most: nuclei are blue-dominant.
    assert nuclei[2] > nuclei[0] > nuclei[1]
    # Eosin absorbs green: the stroma is pink (red and blue above green).
    assert stroma[0] > stroma[1] and stroma[2] > stroma[1]


def test_cyto_nucleus_channel_is_concentrated_inside_cells():
    image, labels = generate("cyto", (160, 160), seed=8, diameter=24.0, density=0.6)
    nucleus = image[..., 1].astype(np.float64)
    cyto = image[..., 0].astype(np.float64)
    cells = labels > 0
    # The nucleus fills only part of each cell, so its channel varies more inside cells.
    assert nucleus[cells].std() / nucleus[cells].mean() > cyto[cells].std() / cyto[cells].mean() * 0.8
    assert nucleus[cells].mean() > 1.3 * nucleus[~cells].mean()


# --------------------------------------------------------------------------------------------
# generate_dataset
# --------------------------------------------------------------------------------------------


def test_dataset_is_deterministic_per_index_and_regenerable_from_meta():
    first = list(generate_dataset(7, shape=(48, 64), seed=4))
    longer = list(generate_dataset(9, shape=(48, 64), seed=4))
    assert [m["kind"] for _, _, m in first] == [KINDS[i % len(KINDS)] for i in range(7)]
    for (image, labels, meta), (image2, labels2, meta2) in zip(first, longer):
        assert meta == meta2
        assert image.tobytes() == image2.tobytes() and labels.tobytes() == labels2.tobytes()
    for image, labels, meta in first:
        assert set(meta) == {"kind", "seed", "diameter", "density", "n_cells", "modality"}
        assert meta["n_cells"] == int(labels.max())
        again_image, again_labels = generate(meta["kind"], (48, 64), seed=meta["seed"])
        assert again_image.tobytes() == image.tobytes() and again_labels.tobytes() == labels.tobytes()
    other = list(generate_dataset(7, shape=(48, 64), seed=5))
    assert all(a[0].tobytes() != b[0].tobytes() for a, b in zip(first, other))


def test_dataset_respects_kinds_and_empty_length():
    metas = [m for _, _, m in generate_dataset(4, kinds=("he",), shape=(32, 32), seed=0)]
    assert [m["kind"] for m in metas] == ["he"] * 4
    assert list(generate_dataset(0)) == []


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


def test_unknown_kind_lists_the_valid_kinds():
    with pytest.raises(ValueError, match="kind must be one of") as error:
        generate("fluorescent", seed=0)
    assert all(kind in str(error.value) for kind in KINDS)


@pytest.mark.parametrize("shape", [(8, 64), (64,), (64, 64, 3), (64.0, 64), (64, -1), "64x64", (True, 64)])
def test_bad_shape_is_a_value_error(shape):
    with pytest.raises(ValueError, match=r"shape must be a \(Y, X\) pair"):
        generate("nuclei", shape, seed=0)


@pytest.mark.parametrize("diameter", [0.0, -5.0, 3.0, 200.0, float("nan"), float("inf"), "10"])
def test_bad_diameter_names_the_valid_range(diameter):
    with pytest.raises(ValueError, match=r"diameter must be a number in \[4.0, 64.0\]"):
        generate("nuclei", (128, 128), seed=0, diameter=diameter)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_bad_density_is_a_value_error(density):
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        generate("nuclei", (64, 64), seed=0, density=density)


@pytest.mark.parametrize("seed", [-1, 1.5, None, True])
def test_bad_seed_is_a_value_error(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        generate("nuclei", (64, 64), seed=seed)


def test_bad_arguments_to_generate_dataset_fail_before_the_first_image():
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        generate_dataset(-1)
    with pytest.raises(ValueError, match="kinds must be a non-empty sequence"):
        generate_dataset(1, kinds=())
    with pytest.raises(ValueError, match="kinds must be a non-empty sequence"):
        generate_dataset(1, kinds="nuclei")
    with pytest.raises(ValueError, match="kind must be one of"):
        generate_dataset(1, kinds=("nuclei", "dapi"))
    with pytest.raises(ValueError, match=r"shape must be a \(Y, X\) pair"):
        generate_dataset(1, shape=(8, 8))
    with pytest.raises(TypeError, match="config must be a SyntheticConfig"):
        generate_dataset(1, config={"min_area": 3})


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"diameter_range": (50.0, 10.0)}, "diameter_range"),
        ({"diameter_range": (2.0, 10.0)}, "diameter_range"),
        ({"density_range": (0.5, 1.5)}, "density_range"),
        ({"blur_range": (-1.0, 1.0)}, "blur_range"),
        ({"photons_range": (0.0, 10.0)}, "photons_range"),
        ({"size_jitter": -0.1}, "size_jitter"),
        ({"illumination": 1.0}, "illumination"),
        ({"read_noise": float("nan")}, "read_noise"),
        ({"min_area": 0}, "min_area"),
        ({"camera_offset": -5}, "camera_offset"),
    ],
)
def test_config_validation_names_the_field(fields, name):
    with pytest.raises(ValueError, match=f"SyntheticConfig.{name}"):
        SyntheticConfig(**fields)


def test_config_accepts_lists_for_ranges_as_yaml_gives_them():
    config = SyntheticConfig(diameter_range=[10, 20], density_range=[0.5, 0.5])
    assert config.diameter_range == (10.0, 20.0) and config.density_range == (0.5, 0.5)
    metas = [meta for _, _, meta in generate_dataset(3, shape=(96, 96), seed=0, config=config)]
    assert all(10.0 <= meta["diameter"] <= 20.0 and meta["density"] == 0.5 for meta in metas)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        SyntheticConfig((8.0, 100.0))  # type: ignore[misc]


def test_docstring_examples_run():
    result = doctest.testmod(synthetic, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
