"""Tests for train.augment: the flows stay the flows of the warped labels, exact rotations and
flips, reproducibility from the generator alone, parameter statistics, normalisation, channels,
degradations, the ignore weight and validation's centre crop."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.flows import masks_to_flows
from pipeline.shards import cellpose_diameter
from pipeline.synthetic import generate
from train.augment import (
    AugmentConfig,
    Augmented,
    _AffineParams,
    _DegradeParams,
    _blur_matrix,
    _degrade,
    _draw_params,
    _percentile_bounds,
    _resample_matrix,
    _source_extents,
    _warp,
    augment,
)
from train.data import Batch


# Every augmentation that is not geometry off: isolates the geometry or one intensity step.
PLAIN = dict(
    invert_prob=0.0,
    channel_drop_prob=0.0,
    permute_channels=False,
    brightness_sigma=0.0,
    contrast_log2_range=(0.0, 0.0),
    degrade_prob=0.0,
)
# No geometry change beyond the rescale: the crop is the centre of the rescaled image.
STILL = dict(zoom_log2_range=(0.0, 0.0), rotation_degrees=0.0, flip_prob=0.0)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------


def make_batch(samples, diameters=None, ignores=None, pad_to=None) -> Batch:
    """Batch from (image (H, W, C), labels (H, W)) pairs, padded at the bottom/right like train.data."""
    height = max(labels.shape[0] for _, labels in samples)
    width = max(labels.shape[1] for _, labels in samples)
    if pad_to is not None:
        height, width = max(height, pad_to[0]), max(width, pad_to[1])
    n = len(samples)
    images = np.zeros((n, 3, height, width), np.float32)
    flows = np.zeros((n, 2, height, width), np.float32)
    labels = np.zeros((n, height, width), np.int32)
    ignore = np.zeros((n, height, width), bool)
    valid = np.zeros((n, height, width), bool)
    for i, (image, label) in enumerate(samples):
        h, w = label.shape
        images[i, : image.shape[2], :h, :w] = np.moveaxis(image, -1, 0)
        labels[i, :h, :w] = label
        flows[i, :, :h, :w] = masks_to_flows(label)
        valid[i, :h, :w] = True
        if ignores is not None:
            ignore[i, :h, :w] = ignores[i]
    if diameters is None:
        diameters = [cellpose_diameter(label) for _, label in samples]
    return Batch(
        images=torch.from_numpy(images).half(),
        flows=torch.from_numpy(flows).half(),
        labels=torch.from_numpy(labels),
        ignore=torch.from_numpy(ignore),
        valid=torch.from_numpy(valid),
        diameters=torch.tensor(diameters, dtype=torch.float32),
        datasets=["test"] * n,
        keys=[str(i) for i in range(n)],
    )


def synthetic_batch(n: int, size: int = 96, kinds=("cyto", "nuclei", "he", "bacteria"), seed: int = 0) -> Batch:
    samples = [generate(kinds[i % len(kinds)], (size, size), seed=seed + i, diameter=14.0) for i in range(n)]
    return make_batch(samples)


def params_of(batch: Batch, cfg: AugmentConfig, seed: int):
    """The parameters augment(batch, cfg, Generator().manual_seed(seed)) draws."""
    _, extent = _source_extents(batch.valid)
    rescale = cfg.target_diameter / batch.diameters.clamp(min=cfg.min_diameter)
    return _draw_params(rescale, extent, cfg, torch.Generator().manual_seed(seed))


def run(batch: Batch, seed: int = 0, train: bool = True, **overrides) -> Augmented:
    return augment(batch, AugmentConfig(**overrides), torch.Generator().manual_seed(seed), train=train)


def interior_flow_cosines(labels: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """Cosines between ``flows`` and masks_to_flows(labels) inside objects that miss the crop border.

    Objects cut by the crop border are left out: their visible part has another centre, so the
    recomputed flows differ by definition (the warped ones are those of the whole object).
    """
    recomputed = masks_to_flows(labels)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    inside = (labels > 0) & ~np.isin(labels, border)
    norm = np.linalg.norm(flows, axis=0)
    # The few pixels with no direction (object centres, exactly cancelling neighbours) are skipped.
    inside &= (np.linalg.norm(recomputed, axis=0) > 0) & (norm > 1e-3)
    return (recomputed * flows).sum(axis=0)[inside] / norm[inside]


def rotate_flows(flows: np.ndarray, quarter_turns: int, flip: bool) -> np.ndarray:
    """(dy, dx) flows of np.rot90(np.flip(labels, 1) if flip else labels, quarter_turns)."""
    dy, dx = flows
    if flip:
        dy, dx = np.flip(dy, 1), -np.flip(dx, 1)
    for _ in range(quarter_turns % 4):
        # A counter-clockwise quarter turn maps the vector (dy, dx) to (-dx, dy).
        dy, dx = -np.rot90(dx), np.rot90(dy)
    return np.stack([dy, dx])


# ------------------------------------------------------------------------------------------------
# The check: warped flows are the flows of the warped labels
# ------------------------------------------------------------------------------------------------


def assert_flows_follow_labels(batch: Batch, seeds, cfg: AugmentConfig) -> None:
    flips, angles, means = set(), [], []
    for seed in seeds:
        out = augment(batch, cfg, torch.Generator().manual_seed(seed))
        affine = params_of(batch, cfg, seed)[0]
        flips |= set(affine.flip.tolist())
        angles += torch.rad2deg(affine.angle).tolist()
        for i in range(len(batch.keys)):
            cosines = interior_flow_cosines(out.labels[i].numpy(), out.flows[i].numpy())
            if cosines.size >= 200:  # a crop that holds whole objects
                means.append(float(cosines.mean()))
    assert flips == {False, True}, "the seeds must cover flipped and unflipped samples"
    assert max(angles) > 90 and min(angles) < -90, f"the seeds must cover large rotations; got {angles}"
    assert len(means) >= len(seeds) * len(batch.keys) // 2, f"too few crops with whole objects: {len(means)}"
    assert min(means) >= 0.9, f"mean cosine per crop {np.round(means, 3)}"


@pytest.mark.slow
def test_warped_flows_match_recomputed_flows_on_real_labels(shared_data: Path):
    from pipeline.io import read_image, read_labels

    paths = sorted((shared_data / "cellpose_cyto" / "train").glob("*_img.png"))[:6]
    assert paths, f"no cellpose_cyto images under {shared_data}"
    samples = [(read_image(p), read_labels(p.with_name(p.name.replace("_img", "_masks")))) for p in paths]
    batch = make_batch([(image, labels.astype(np.int32)) for image, labels in samples])
    assert_flows_follow_labels(batch, seeds=range(4), cfg=AugmentConfig())


def test_warped_flows_match_recomputed_flows_on_synthetic_labels():
    batch = synthetic_batch(4, size=160)
    assert_flows_follow_labels(batch, seeds=range(5), cfg=AugmentConfig(crop_size=128))


def test_a_wrong_flow_convention_would_fail_the_check():
    """Guard on the check itself: a flipped x sign or a rotation the wrong way scores below 0.9."""
    batch = synthetic_batch(4, size=128)
    out = run(batch, seed=1, crop_size=96, **STILL)
    x_negated = out.flows[0].numpy() * np.array([1, -1])[:, None, None]
    cosines = interior_flow_cosines(out.labels[0].numpy(), x_negated)
    assert cosines.mean() < 0.5

    cfg = AugmentConfig(crop_size=96, zoom_log2_range=(0.0, 0.0))
    out = augment(batch, cfg, torch.Generator().manual_seed(2))
    angles = params_of(batch, cfg, 2)[0].angle.numpy()
    checked = 0
    for i, angle in enumerate(angles):
        right = interior_flow_cosines(out.labels[i].numpy(), out.flows[i].numpy())
        if not math.radians(30) < abs(angle) < math.radians(150) or right.size < 200:
            continue
        # Vectors rotated by -angle instead of +angle: R(-2 angle) applied to the right ones.
        c, s = math.cos(-2 * angle), math.sin(-2 * angle)
        dy, dx = out.flows[i].numpy()
        wrong = np.stack([c * dy - s * dx, s * dy + c * dx])
        assert right.mean() > 0.9
        assert interior_flow_cosines(out.labels[i].numpy(), wrong).mean() < 0.9
        checked += 1
    assert checked > 0, f"no sample rotated by 30-150 degrees: {np.degrees(angles)}"


# ------------------------------------------------------------------------------------------------
# Exact quarter turns and flips
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "degrees, flip",
    [(90, False), (180, False), (-90, False), (0, True), (90, True), (180, True)],
)
def test_quarter_turns_and_flips_equal_numpy(degrees, flip):
    size = 64
    image, labels = generate("cyto", (size, size), seed=3, diameter=12.0)
    labels = labels.astype(np.int32)
    batch = make_batch([(image, labels)])
    images = torch.rand((1, 3, size, size), generator=torch.Generator().manual_seed(0))
    affine = _AffineParams(
        scale=torch.ones(1),
        angle=torch.tensor([math.radians(degrees)]),
        flip=torch.tensor([flip]),
        shift=torch.zeros((1, 2)),
    )
    centre, _ = _source_extents(batch.valid)
    warped_images, flows, cellprob, warped_labels, _ = _warp(
        images, batch.flows, batch.labels, batch.ignore, batch.valid, centre, affine, size
    )

    turns = degrees // 90

    def expected(array):  # (..., H, W): flip first, then counter-clockwise quarter turns
        array = np.flip(array, -1) if flip else array
        return np.rot90(array, turns, axes=(-2, -1))

    np.testing.assert_array_equal(warped_labels[0].numpy(), expected(labels))
    np.testing.assert_array_equal(cellprob[0].numpy(), expected(labels > 0).astype(np.float32))
    np.testing.assert_allclose(warped_images[0].numpy(), expected(images[0].numpy()), atol=1e-5)
    expected_flows = rotate_flows(batch.flows[0].float().numpy(), turns, flip)
    np.testing.assert_allclose(flows[0].numpy(), expected_flows, atol=1e-5)
    # The hand-rotated flows are the flows of the transformed labels: the convention is physical,
    # not only self-consistent (90-degree turns commute with the 3x3 diffusion stencil).
    recomputed = masks_to_flows(expected(labels).copy())
    inside = np.linalg.norm(recomputed, axis=0) > 0
    cosines = (recomputed * expected_flows).sum(axis=0)[inside]
    assert cosines.mean() > 0.99


def test_translation_and_scale_move_the_crop():
    """shift moves content by +shift output pixels; scale 2 doubles distances from the centre."""
    size = 32
    batch = make_batch([(np.zeros((size, size, 1), np.uint8), np.zeros((size, size), np.int32))])
    images = torch.zeros((1, 3, size, size))
    images[0, 0, 10, 20] = 1.0
    centre, _ = _source_extents(batch.valid)

    def warp(scale, shift):
        affine = _AffineParams(
            scale=torch.tensor([scale]), angle=torch.zeros(1), flip=torch.tensor([False]),
            shift=torch.tensor([shift]),
        )
        warped = _warp(images, batch.flows, batch.labels, batch.ignore, batch.valid, centre, affine, size)
        return warped[0][0, 0]

    shifted = warp(1.0, [3.0, -5.0])
    assert shifted[13, 15] == pytest.approx(1.0, abs=1e-5)
    # (10, 20) is (-5.5, 4.5) from the centre 15.5; scale 2 puts it at (-11, 9) -> (4.5, 24.5).
    # Output pixels 4 and 5 read source 9.75 and 10.25: bilinear weight 0.75 per axis.
    zoomed = warp(2.0, [0.0, 0.0])
    torch.testing.assert_close(zoomed[4:6, 24:26], torch.full((2, 2), 0.5625))
    assert zoomed.sum() == pytest.approx(4.0, abs=1e-4)  # area grows with scale**2


# ------------------------------------------------------------------------------------------------
# Reproducibility
# ------------------------------------------------------------------------------------------------


def test_same_seed_same_output_and_global_rng_untouched():
    batch = synthetic_batch(3, size=80)
    cfg = AugmentConfig(crop_size=64, degrade_prob=1.0)
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = augment(batch, cfg, torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state), "augment touched the global torch RNG"
    second = augment(batch, cfg, torch.Generator().manual_seed(7))
    other = augment(batch, cfg, torch.Generator().manual_seed(8))
    for name in ("images", "flows", "cellprob", "labels", "weight"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert not torch.equal(first.images, other.images)
    assert not torch.equal(first.flows, other.flows)


def test_generator_state_advances_so_consecutive_calls_differ():
    batch = synthetic_batch(2, size=64)
    generator = torch.Generator().manual_seed(0)
    cfg = AugmentConfig(crop_size=48)
    assert not torch.equal(augment(batch, cfg, generator).images, augment(batch, cfg, generator).images)


# ------------------------------------------------------------------------------------------------
# Parameter statistics
# ------------------------------------------------------------------------------------------------


def test_parameter_statistics():
    n = 20_000
    cfg = AugmentConfig()
    rescale = torch.full((n,), 0.5)
    extent = torch.full((n, 2), 1000.0)
    affine, channel, degrade = _draw_params(rescale, extent, cfg, torch.Generator().manual_seed(0))
    zoom_log2 = torch.log2(affine.scale / 0.5)
    assert -2.0 <= zoom_log2.min() < -1.98 and 1.98 < zoom_log2.max() <= 2.0
    assert abs(zoom_log2.mean()) < 0.05
    degrees = torch.rad2deg(affine.angle)
    assert -180 <= degrees.min() < -179 and 179 < degrees.max() <= 180
    assert abs(affine.flip.float().mean() - 0.5) < 0.02
    # The crop centre stays where the scaled (unrotated) image covers the crop.
    slack = (1000.0 * affine.scale[:, None] - cfg.crop_size).clamp(min=0)
    assert (affine.shift.abs() <= slack / 2 + 1e-3).all()
    assert (affine.shift[affine.scale < 0.256] == 0).all()  # image smaller than the crop: centred

    assert abs(channel.invert.float().mean() - 0.25) < 0.02
    assert abs(channel.drop.float().mean() - 0.1) < 0.01
    assert (channel.permutation.sort(dim=1).values == torch.arange(3)).all()
    counts = torch.unique(channel.permutation, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and counts.min() > n / 6 * 0.9
    assert abs(channel.brightness.std() - 0.2) < 0.01
    assert channel.contrast.min() >= 0.5 and channel.contrast.max() <= 2.0

    degraded = (degrade.sigma.amax(dim=1) > 0) | (degrade.factor.amax(dim=1) > 1) | (degrade.photons > 0)
    # p(degrade) * p(at least one of blur / downsampling / noise) = 0.5 * (1 - 0.3 * 0.3 * 0.3)
    assert abs(degraded.float().mean() - 0.5 * (1 - 0.3**3)) < 0.02
    factors = degrade.factor[degrade.factor[:, 0] > 1, 0]
    assert set(factors.tolist()) == set(range(2, 8))
    assert (degrade.photons[degrade.photons > 0] >= 1.0).all()
    assert abs(degrade.photons[degrade.photons > 0].mean() - 4 / 0.7) < 0.2
    # Downsampled samples are always blurred (add_noise forces it).
    assert (degrade.sigma[degrade.factor[:, 0] > 1, 0] > 0).all()
    anisotropic = (degrade.sigma[:, 0] > 0) & torch.isclose(degrade.sigma[:, 0], 10 * degrade.sigma[:, 1])
    blurred = degrade.sigma[:, 0] > 0
    assert abs(anisotropic[blurred].float().mean() - 0.5) < 0.03


def test_probabilities_only_move_thresholds():
    """Changing one probability leaves every other parameter of the same seed unchanged."""
    batch = synthetic_batch(6, size=64)
    base = params_of(batch, AugmentConfig(), seed=3)
    changed = params_of(batch, AugmentConfig(invert_prob=1.0, degrade_prob=0.0), seed=3)
    for a, b in zip(base[:2], changed[:2]):
        for field in dataclasses.fields(a):
            if field.name != "invert":
                assert torch.equal(getattr(a, field.name), getattr(b, field.name)), field.name
    assert changed[1].invert.all()
    assert (changed[2].photons == 0).all() and (changed[2].sigma == 0).all()


def test_degradations_hit_the_drawn_half_of_the_batch():
    batch = synthetic_batch(40, size=48)
    seed = 5
    degraded = run(batch, seed, crop_size=48).images
    clean = run(batch, seed, crop_size=48, degrade_prob=0.0).images
    differs = (degraded - clean).abs().amax(dim=(1, 2, 3)) > 1e-4
    degrade = params_of(batch, AugmentConfig(crop_size=48), seed)[2]
    drawn = (degrade.sigma.amax(dim=1) > 0) | (degrade.factor.amax(dim=1) > 1) | (degrade.photons > 0)
    assert torch.equal(differs, drawn)
    assert 0.25 <= differs.float().mean() <= 0.75


def test_degrade_transforms_only_its_samples_each_by_its_own_matrices():
    # Blur then downsample + upsample along each axis (Cellpose3's add_noise, no noise drawn
    # here) computed sample by sample; the undegraded samples come back bit for bit.
    images = torch.rand((4, 2, 32, 32), generator=torch.Generator().manual_seed(0))
    params = _DegradeParams(
        sigma=torch.tensor([[0.0, 0.0], [2.0, 0.2], [0.0, 0.0], [1.5, 1.5]]),
        factor=torch.tensor([[1, 1], [1, 1], [1, 1], [3, 3]]),
        photons=torch.zeros(4),
        index=torch.tensor([1, 3]),  # the samples drawn for a degradation
        index_device=torch.tensor([1, 3]),
    )
    out = _degrade(images, params, torch.Generator().manual_seed(0))
    assert torch.equal(out[[0, 2]], images[[0, 2]])
    for b in (1, 3):
        along_y = _resample_matrix(params.factor[b : b + 1, 0], 32)[0] @ _blur_matrix(params.sigma[b : b + 1, 0], 32)[0]
        along_x = _resample_matrix(params.factor[b : b + 1, 1], 32)[0] @ _blur_matrix(params.sigma[b : b + 1, 1], 32)[0]
        torch.testing.assert_close(out[b], along_y @ images[b] @ along_x.T, atol=1e-5, rtol=0)
        assert not torch.allclose(out[b], images[b], atol=1e-3)


def test_zoom_changes_object_size():
    batch = synthetic_batch(4, size=128, kinds=("nuclei",))
    areas = []
    for zoom in (-1.0, 1.0):
        out = run(batch, 0, crop_size=128, zoom_log2_range=(zoom, zoom), rotation_degrees=0.0)
        areas.append(np.median([np.bincount(l.ravel())[1:].max() for l in out.labels.numpy()]))
    # 2**-1 vs 2**1 zoom: objects differ 16-fold in area (largest visible object per crop).
    assert 8 < areas[1] / areas[0] < 24


# ------------------------------------------------------------------------------------------------
# Outputs, normalisation, channels, weight
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [True, False])
def test_output_shapes_and_dtypes(train):
    batch = synthetic_batch(3, size=72)
    out = run(batch, train=train, crop_size=64)
    assert out.images.shape == (3, 3, 64, 64) and out.images.dtype == torch.float32
    assert out.flows.shape == (3, 2, 64, 64) and out.flows.dtype == torch.float32
    assert out.cellprob.shape == (3, 64, 64) and out.cellprob.dtype == torch.float32
    assert out.labels.shape == (3, 64, 64) and out.labels.dtype == torch.int32
    assert out.weight.shape == (3, 64, 64) and out.weight.dtype == torch.float32
    assert set(out.cellprob.unique().tolist()) <= {0.0, 1.0}
    assert torch.isfinite(out.images).all() and torch.isfinite(out.flows).all()
    assert out.flows.norm(dim=1).max() <= 1.0 + 1e-3
    # Foreground target and labels agree up to the one-pixel boundary band of bilinear vs nearest.
    assert ((out.cellprob > 0) == (out.labels > 0)).float().mean() > 0.95


def test_output_percentiles_are_0_and_1_without_jitter():
    batch = synthetic_batch(6, size=96)
    out = run(batch, 2, crop_size=64, degrade_prob=1.0, brightness_sigma=0.0, contrast_log2_range=(0.0, 0.0))
    images = out.images.numpy()
    for sample in images:
        for channel in sample:
            if np.all(channel == 0):
                continue
            low, high = np.percentile(channel, [1, 99])
            assert low == pytest.approx(0.0, abs=1e-5) and high == pytest.approx(1.0, abs=1e-5)
    # Jitter moves them (by design: it comes after the renormalisation).
    jittered = run(batch, 2, crop_size=64, degrade_prob=1.0).images.numpy()
    assert not np.allclose(np.percentile(jittered[:, :2], 99, axis=(2, 3)), 1.0, atol=1e-3)


def test_empty_channels_stay_empty():
    """A one-channel image keeps two all-zero channels through every augmentation."""
    batch = synthetic_batch(8, size=64, kinds=("nuclei",))
    out = run(batch, 4, crop_size=48, invert_prob=1.0, degrade_prob=1.0)
    zero_channels = (out.images.abs().amax(dim=(2, 3)) == 0).sum(dim=1)
    assert (zero_channels == 2).all()
    # ... and the remaining one lands in every position over a few samples (the permutation).
    occupied = out.images.abs().amax(dim=(2, 3)).argmax(dim=1)
    assert len(set(occupied.tolist())) >= 2


def test_inversion_maps_x_to_1_minus_x():
    batch = synthetic_batch(4, size=64, kinds=("cyto",))
    plain = run(batch, 0, crop_size=48, **PLAIN).images
    inverted = run(batch, 0, crop_size=48, **{**PLAIN, "invert_prob": 1.0}).images
    nonempty = plain.abs().amax(dim=(2, 3)) > 0
    assert nonempty[:, :2].all() and not nonempty[:, 2].any()  # cyto: two channels
    np.testing.assert_allclose(inverted[:, :2].numpy(), 1.0 - plain[:, :2].numpy(), atol=1e-5)
    assert (inverted[:, 2] == 0).all()


def test_channel_permutation_keeps_the_channels():
    batch = synthetic_batch(6, size=64, kinds=("he",))
    shuffle = {**PLAIN, "permute_channels": True}
    plain = run(batch, 1, crop_size=48, **PLAIN).images
    permuted = run(batch, 1, crop_size=48, **shuffle).images
    permutation = params_of(batch, AugmentConfig(crop_size=48, **shuffle), 1)[1].permutation
    expected = plain.gather(1, permutation[:, :, None, None].expand(-1, -1, 48, 48))
    torch.testing.assert_close(permuted, expected)
    assert not (permutation == torch.arange(3)).all(), "the seed should permute something"


def test_grayscale_mode_averages_the_channels_into_channel_3():
    samples = [generate("he", (64, 64), seed=s, diameter=14.0) for s in range(3)]
    # Diameter 30 and a crop the size of the image: the warp is the identity, so the crop's
    # renormalisation equals the first one and the expected mean can be built from the output.
    batch = make_batch(samples, diameters=[30.0] * 3)
    plain = run(batch, 0, crop_size=64, **PLAIN, **STILL).images
    gray = run(batch, 0, crop_size=64, **{**PLAIN, "channel_drop_prob": 1.0}, **STILL).images
    assert (gray[:, :2] == 0).all()
    mean = plain.mean(dim=1)  # renormalised, as the output is
    flat = mean.flatten(1)
    low, high = torch.quantile(flat, 0.01, dim=1), torch.quantile(flat, 0.99, dim=1)
    expected = (mean - low[:, None, None]) / (high - low)[:, None, None]
    torch.testing.assert_close(gray[:, 2], expected, atol=1e-4, rtol=0)


def test_drop_third_mode_never_empties_an_image():
    batch = synthetic_batch(12, size=48, kinds=("nuclei", "cyto"))
    cfg = dict(PLAIN, channel_drop_prob=1.0, channel_drop_mode="drop_third", permute_channels=True)
    out = run(batch, 0, crop_size=32, **cfg)
    nonempty = out.images.abs().amax(dim=(2, 3)) > 0
    assert nonempty.any(dim=1).all()
    assert (nonempty[1::2].sum(dim=1) <= 2).all()
    # A two-channel image loses its third channel whenever one was there.
    assert not nonempty[1::2, 2].any()


def test_ignore_mask_becomes_zero_weight():
    samples = [generate("nuclei", (96, 96), seed=s, diameter=16.0) for s in range(4)]
    samples = [(image, labels.astype(np.int32)) for image, labels in samples]
    ignores = [(labels % 3 == 1) for _, labels in samples]  # every third object is "don't care"
    batch = make_batch(samples, ignores=ignores)
    for train in (True, False):
        out = run(batch, 3, train=train, crop_size=64)
        labels = out.labels.numpy()
        expected = np.where((labels % 3 == 1), 0.0, 1.0)
        np.testing.assert_array_equal(out.weight.numpy(), expected)
        assert (out.weight == 0).any()


def test_a_padding_slot_has_zero_weight():
    """Validation's padding slot (nothing valid, all ignored) must not count in the loss."""
    batch = make_batch([generate("nuclei", (48, 48), seed=0, diameter=10.0)] * 2, diameters=[30.0, 30.0])
    batch.valid[1] = False
    batch.ignore[1] = True
    for train in (True, False):
        out = run(batch, 0, train=train, crop_size=64)
        assert (out.weight[1] == 0).all() and (out.images[1] == 0).all() and (out.labels[1] == 0).all()
        assert (out.weight[0] == 1).all()


# ------------------------------------------------------------------------------------------------
# Validation and padding
# ------------------------------------------------------------------------------------------------


def test_validation_is_a_deterministic_centre_crop():
    size = 512
    image, labels = generate("cyto", (size, size), seed=0, diameter=24.0)
    batch = make_batch([(image, labels.astype(np.int32))], diameters=[60.0])  # scale 0.5
    out = augment(batch, AugmentConfig(), None, train=False)
    again = augment(batch, AugmentConfig(), torch.Generator().manual_seed(99), train=False)
    assert torch.equal(out.images, again.images)
    # Output pixel i sits at source 2 i + 0.5: nearest is 2 i + 1, bilinear the 2x2 block mean.
    np.testing.assert_array_equal(out.labels[0].numpy(), labels[1::2, 1::2])
    blocks = batch.images[0, :2].float().reshape(2, 256, 2, 256, 2).mean(dim=(2, 4))
    reference = _normalised(blocks)
    torch.testing.assert_close(out.images[0, :2], reference, atol=1e-4, rtol=0)
    assert (out.images[0, 2] == 0).all()
    flow_blocks = batch.flows[0].float().reshape(2, 256, 2, 256, 2).mean(dim=(2, 4))
    torch.testing.assert_close(out.flows[0], flow_blocks, atol=1e-5, rtol=0)


def test_validation_at_diameter_30_is_the_identity_warp():
    image, labels = generate("nuclei", (256, 256), seed=1, diameter=20.0)
    batch = make_batch([(image, labels.astype(np.int32))], diameters=[30.0])
    out = augment(batch, AugmentConfig(), None, train=False)
    np.testing.assert_array_equal(out.labels[0].numpy(), labels)
    torch.testing.assert_close(out.flows[0], batch.flows[0].float())
    torch.testing.assert_close(out.images[0, :1], _normalised(batch.images[0, :1].float()), atol=1e-5, rtol=0)


def test_small_images_are_centred_on_zero_fill():
    image, labels = generate("nuclei", (40, 40), seed=2, diameter=10.0)
    batch = make_batch([(image, labels.astype(np.int32))], diameters=[30.0])
    out = run(batch, 0, crop_size=64, **STILL)
    np.testing.assert_array_equal(out.labels[0, 12:52, 12:52].numpy(), labels)
    assert (out.labels[0, :12] == 0).all() and (out.labels[0, :, 52:] == 0).all()
    # Bilinear flows reach half a pixel past the edge (output pixel 11 reads source -0.5).
    assert (out.flows[0, :, :, :11] == 0).all() and (out.flows[0, :, :, 11] != 0).any()


@pytest.mark.parametrize("train", [True, False])
def test_padding_does_not_change_the_result(train):
    """A sample padded into a bigger batch augments like the same sample alone (train.data pads)."""
    image, labels = generate("cyto", (70, 90), seed=4, diameter=12.0)
    sample = (image, labels.astype(np.int32))
    alone = make_batch([sample])
    padded = make_batch([sample], pad_to=(120, 100))
    a, b = run(alone, 6, train=train, crop_size=64), run(padded, 6, train=train, crop_size=64)
    for name in ("images", "flows", "cellprob", "labels", "weight"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-4, rtol=0, msg=name)


def _normalised(images: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> 1st-99th percentile normalised per channel, with torch.quantile (NumPy's rule)."""
    flat = images.flatten(1)
    low, high = torch.quantile(flat, 0.01, dim=1), torch.quantile(flat, 0.99, dim=1)
    return (images - low[:, None, None]) / (high - low)[:, None, None]


# ------------------------------------------------------------------------------------------------
# Building blocks against plain references
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_percentile_bounds_match_numpy(seed):
    rng = np.random.default_rng(seed)
    values = rng.gamma(2.0, 100.0, size=(3, 2, 500)).astype(np.float32)
    valid = rng.random((3, 500)) < 0.7
    low, high = _percentile_bounds(torch.from_numpy(values), torch.from_numpy(valid), (1.0, 99.0), 1 << 16)
    for b in range(3):
        for c in range(2):
            expected = np.percentile(values[b, c][valid[b]].astype(np.float64), [1, 99])
            np.testing.assert_allclose([low[b, c], high[b, c]], expected, rtol=1e-5)


@pytest.mark.parametrize("percentiles", [(0.0, 100.0), (5.0, 95.0), (50.0, 50.0), (30.0, 70.0), (99.0, 99.9)])
def test_percentile_bounds_match_numpy_at_any_percentiles_with_ties(percentiles):
    # The bounds come from a partial selection at each end; np.percentile (linear) is the
    # definition. Integer values make ties; rows keep from 1 to all of their pixels.
    rng = np.random.default_rng(7)
    values = rng.integers(0, 20, size=(4, 3, 300)).astype(np.float32)
    valid = rng.random((4, 300)) < np.array([1.0, 0.5, 0.05, 0.0])[:, None]
    valid[3, 17] = True  # a single valid pixel
    low, high = _percentile_bounds(torch.from_numpy(values), torch.from_numpy(valid), percentiles, 1 << 16)
    for b in range(4):
        for c in range(3):
            expected = np.percentile(values[b, c][valid[b]].astype(np.float64), percentiles)
            np.testing.assert_allclose([low[b, c], high[b, c]], expected, rtol=1e-6)


def test_percentile_bounds_of_a_large_channel_use_a_strided_subsample():
    values = torch.rand((1, 1, 5000), generator=torch.Generator().manual_seed(0))
    low, high = _percentile_bounds(values, None, (1.0, 99.0), 1024)  # 5000 pixels: every 5th
    expected = np.percentile(values[0, 0, ::5].double().numpy(), [1, 99])
    np.testing.assert_allclose([low.item(), high.item()], expected, rtol=1e-5)


def test_percentile_bounds_of_an_empty_sample_are_nan():
    nothing_valid = torch.zeros((1, 10), dtype=torch.bool)
    low, _ = _percentile_bounds(torch.ones((1, 1, 10)), nothing_valid, (1.0, 99.0), 1 << 16)
    assert torch.isnan(low).all()


@pytest.mark.parametrize("factor", range(1, 8))
def test_resample_matrix_equals_strided_subsample_then_bilinear_upsample(factor):
    size = 50
    x = torch.rand((1, 1, size, size), generator=torch.Generator().manual_seed(factor))
    # Cellpose's add_noise: x[..., ::ds, :] then F.interpolate back to the full size.
    expected = F.interpolate(x[:, :, ::factor], size=(size, size), mode="bilinear", align_corners=False)
    matrix = _resample_matrix(torch.tensor([factor]), size)
    torch.testing.assert_close(matrix[0] @ x[0, 0], expected[0, 0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [0.0, 0.7, 2.5, 9.0])
def test_blur_matrix_equals_zero_padded_gaussian_convolution(sigma):
    size = 40
    x = torch.rand(size, generator=torch.Generator().manual_seed(0))
    matrix = _blur_matrix(torch.tensor([sigma]), size)[0]
    if sigma == 0:
        torch.testing.assert_close(matrix, torch.eye(size))
        return
    offsets = torch.arange(-(size - 1), size, dtype=torch.float32)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel /= kernel.sum()
    expected = F.conv1d(x[None, None], kernel[None, None], padding=size - 1)[0, 0]
    torch.testing.assert_close(matrix @ x, expected, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# Config and input checks
# ------------------------------------------------------------------------------------------------


def test_config_defaults_are_the_papers():
    cfg = AugmentConfig()
    assert (cfg.crop_size, cfg.target_diameter, cfg.min_diameter) == (256, 30.0, 5.0)
    assert cfg.zoom_log2_range == (-2.0, 2.0) and cfg.rotation_degrees == 180.0 and cfg.flip_prob == 0.5
    assert (cfg.invert_prob, cfg.channel_drop_prob, cfg.brightness_sigma) == (0.25, 0.1, 0.2)
    assert (cfg.degrade_prob, cfg.downsample_prob, cfg.blur_prob, cfg.poisson_prob) == (0.5, 0.7, 0.7, 0.7)
    assert (cfg.downsample_max, cfg.poisson_gamma_shape, cfg.poisson_gamma_rate) == (7, 4.0, 0.7)
    assert AugmentConfig(zoom_log2_range=[-1, 1]).zoom_log2_range == (-1.0, 1.0)  # YAML lists


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"invert_prob": 1.5}, "invert_prob"),
        ({"degrade_prob": -0.1}, "degrade_prob"),
        ({"zoom_log2_range": (2.0, -2.0)}, "zoom_log2_range"),
        ({"contrast_log2_range": (0.0,)}, "contrast_log2_range"),
        ({"crop_size": 4}, "crop_size"),
        ({"crop_size": 256.0}, "crop_size"),
        ({"rotation_degrees": 270.0}, "rotation_degrees"),
        ({"downsample_max": 1}, "downsample_max"),
        ({"target_diameter": 0.0}, "target_diameter"),
        ({"brightness_sigma": -1.0}, "brightness_sigma"),
        ({"channel_drop_mode": "random"}, "channel_drop_mode"),
        ({"percentiles": (50.0, 50.0)}, "percentiles"),
    ],
)
def test_config_rejects_bad_values(overrides, field):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**overrides)


def test_bad_inputs_are_rejected():
    batch = synthetic_batch(2, size=48)
    with pytest.raises(TypeError, match="Generator"):
        augment(batch, AugmentConfig(), None, train=True)
    bad = dataclasses.replace(batch, images=batch.images[:, :2])
    with pytest.raises(ValueError, match="images"):
        augment(bad, AugmentConfig(), torch.Generator())
    bad = dataclasses.replace(batch, labels=batch.labels[:, :-1])
    with pytest.raises(ValueError, match="labels"):
        augment(bad, AugmentConfig(), torch.Generator())
    bad = dataclasses.replace(batch, ignore=batch.ignore.float())
    with pytest.raises(TypeError, match="ignore"):
        augment(bad, AugmentConfig(), torch.Generator())


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_is_deterministic_and_validation_matches_cpu():
    batch = synthetic_batch(4, size=300)
    on_gpu = Batch(**{f.name: _to_cuda(getattr(batch, f.name)) for f in dataclasses.fields(batch)})
    first = augment(on_gpu, AugmentConfig(), torch.Generator("cuda").manual_seed(3))
    second = augment(on_gpu, AugmentConfig(), torch.Generator("cuda").manual_seed(3))
    for name in ("images", "flows", "cellprob", "labels", "weight"):
        assert getattr(first, name).device.type == "cuda"
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    with pytest.raises(ValueError, match="generator"):
        augment(on_gpu, AugmentConfig(), torch.Generator().manual_seed(3))
    cpu = augment(batch, AugmentConfig(), None, train=False)
    gpu = augment(on_gpu, AugmentConfig(), None, train=False)
    torch.testing.assert_close(gpu.images.cpu(), cpu.images, atol=1e-4, rtol=0)
    assert (gpu.labels.cpu() != cpu.labels).float().mean() < 1e-3


def _to_cuda(value):
    return value.cuda() if isinstance(value, torch.Tensor) else value


# ------------------------------------------------------------------------------------------------
# Window batches: the loader draws the geometry and cuts windows, the device resamples them
# ------------------------------------------------------------------------------------------------


def window_samples(specs, ignore_every: int = 0):
    """train.data samples from (kind, (H, W), seed): stored dtypes, float16 flows."""
    from train.data import _Sample

    samples = []
    for i, (kind, shape, seed) in enumerate(specs):
        image, labels = generate(kind, shape, seed=seed, diameter=14.0)
        if image.dtype == np.uint16:
            image = np.minimum(image, 2047).astype(np.uint16)  # exact in the old path's float16 too
        ignore = None
        if ignore_every and i % ignore_every == 0:
            ignore = (np.add.outer(np.arange(shape[0]), np.arange(shape[1])) % 7) == 0
        samples.append(_Sample(image, labels, masks_to_flows(labels).astype(np.float16), ignore,
                               cellpose_diameter(labels), "test", f"k{i}"))
    return samples


def window_batch(samples, cfg: AugmentConfig, step: int, max_side: int = 1024):
    from train.data import _collate_windows, _rng

    return _collate_windows(samples, max_side, _rng(5, 0, 0, step), _rng(6, 0, 0, step), cfg)


def test_window_warp_equals_the_whole_sample_warp():
    """The windows and the whole samples give the same crops for the same affine map: the loader's
    window holds every pixel the map reads, and the taps do the same arithmetic."""
    from train.augment import _finite, _normalize_percentile, _warp_windows
    from train.data import _collate, _rng

    samples = window_samples([("cyto", (200, 170), 1), ("he", (120, 260), 2), ("nuclei", (260, 240), 3),
                              ("bacteria", (96, 96), 4)], ignore_every=2)
    cfg = AugmentConfig(percentile_max_pixels=1 << 20)  # both take the percentiles over every pixel
    read_fraction = []
    for step in range(4):
        windows = window_batch(samples, cfg, step)
        whole = _collate(samples, 1024, _rng(5, 0, 0, step))  # the same max_side crop draws
        t = windows.transform
        affine = _AffineParams(scale=t[:, 2], angle=t[:, 3], flip=t[:, 4] > 0.5, shift=t[:, 5:7])
        images, nonempty = _normalize_percentile(_finite(whole.images.float()), whole.valid, cfg.percentiles,
                                                 cfg.percentile_max_pixels)
        centre, _ = _source_extents(whole.valid)
        expected = _warp(images, whole.flows, whole.labels, whole.ignore, whole.valid, centre, affine, cfg.crop_size)
        got = _warp_windows(windows, affine, t[:, 0:2], cfg.crop_size)
        for name, a, b in zip(("images", "flows", "cellprob"), expected[:3], got[:3]):
            torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-4, msg=name)
        # Nearest-neighbour ties (p exactly x.5) may round either way in float32: a pixel or two.
        for name, a, b in zip(("labels", "ignore"), expected[3:], got[3:5]):
            assert (a != b).sum() <= 4, name
        assert torch.equal(got[5], nonempty)
        sizes = torch.tensor([s.image.shape[0] * s.image.shape[1] for s in samples])
        read_fraction += (windows.layout[:, 4] * windows.layout[:, 5] / sizes).tolist()
    assert min(read_fraction) < 0.5  # the draws include windows well inside their image


@pytest.mark.slow
def test_window_batches_keep_the_flows_of_the_warped_labels():
    cfg = AugmentConfig(crop_size=128)
    samples = window_samples([(k, (160, 160), i) for i, k in enumerate(["cyto", "nuclei", "he", "bacteria"])])
    flips, angles, means = set(), [], []
    for step in range(5):
        batch = window_batch(samples, cfg, step)
        out = augment(batch, cfg, torch.Generator().manual_seed(step))
        assert out.images.shape == (4, 3, 128, 128) and out.labels.dtype == torch.int32
        assert torch.isfinite(out.images).all() and (out.weight == 1).all()
        flips |= set((batch.transform[:, 4] > 0.5).tolist())
        angles += torch.rad2deg(batch.transform[:, 3]).tolist()
        for i in range(4):
            cosines = interior_flow_cosines(out.labels[i].numpy(), out.flows[i].numpy())
            if cosines.size >= 200:
                means.append(float(cosines.mean()))
    assert flips == {False, True} and max(angles) > 90 and min(angles) < -90
    assert len(means) >= 10 and min(means) >= 0.9, np.round(means, 3)


def test_loader_geometry_has_the_device_draws_distributions():
    """Zoom, angle, flip and crop position drawn by the loader follow _draw_params' laws (which
    test_parameter_statistics pins to the paper's): two-sample KS tests against the device draws."""
    from scipy import stats

    from train.data import _geometry_draws, _rng

    n = 20_000
    cfg = AugmentConfig()
    cpu = _geometry_draws(_rng(6, 0, 0, 0), n, cfg)
    affine, _, _ = _draw_params(torch.full((n,), 0.5), torch.full((n, 2), 1000.0), cfg,
                                torch.Generator().manual_seed(0))
    assert stats.ks_2samp(np.log2(cpu["zoom"]), torch.log2(affine.scale / 0.5).numpy()).pvalue > 0.01
    assert stats.ks_2samp(cpu["angle"], affine.angle.numpy()).pvalue > 0.01
    assert stats.binomtest(int(cpu["flip"].sum()), n, 0.5).pvalue > 0.01
    # Crop position: the shift as a fraction of its range, where there is a range.
    slack = (1000.0 * affine.scale[:, None] - cfg.crop_size).clamp(min=0).expand(n, 2)
    device_fraction = (affine.shift / slack.clamp(min=1e-6))[slack > 0].numpy()
    assert stats.ks_2samp(cpu["shift"].ravel(), device_fraction).pvalue > 0.01
    assert stats.kstest(cpu["shift"].ravel(), stats.uniform(-0.5, 1).cdf).pvalue > 0.01


def test_window_batch_through_augment_is_reproducible_and_moves_with_the_device_draws():
    cfg = AugmentConfig(crop_size=64)
    samples = window_samples([("nuclei", (96, 96), 0), ("he", (80, 120), 1)])
    batch = window_batch(samples, cfg, step=3)
    a = augment(batch, cfg, torch.Generator().manual_seed(1))
    b = augment(batch, cfg, torch.Generator().manual_seed(1))
    c = augment(batch, cfg, torch.Generator().manual_seed(2))
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, c.labels)  # geometry is the loader's
    assert not torch.equal(a.images, c.images)  # intensity draws are the device's
    with pytest.raises(ValueError, match="training batch"):
        augment(batch, cfg, None, train=False)


def test_read_uint_combines_little_endian_bytes_of_each_sample_s_itemsize():
    from train.augment import _read_uint

    values16 = np.array([1, 258, 65535], np.uint16)
    values32 = np.array([70000, 4_000_000_000], np.uint32)
    buffer = torch.from_numpy(np.concatenate([values16.view(np.uint8), values32.view(np.uint8)]))
    index = torch.tensor([[0, 2, 4], [6, 10, 10]])
    itemsize = torch.tensor([[2], [4]])
    got = _read_uint(buffer, index, itemsize, max_itemsize=4)
    assert got.tolist() == [[1, 258, 65535], [70000, 4_000_000_000, 4_000_000_000]]
