"""Tests for infer.predict: Cellpose's tiling geometry, blending, test-time augmentation,
channels, diameter rescale, loading weights, and a random tiny CP-SAM end to end.

Most tests use stand-in networks whose output is a known function of their input, so the
stitched output is known exactly whatever the tiling:

* ``PositionNet`` reads each pixel's global (y, x) from the image (channels 0 and 1 hold
  y + 1 and x + 1; the zero padding is recognisably "outside"), works out from the ramps
  whether its tile arrived flipped, and returns flows that are correct in the tile's own frame
  (negated along a flipped axis). A correct un-flip and blend reproduce ``expected_output``.
* ``PixelNet`` is a per-pixel function of the channels (for channel handling).
* ``ConstantNet`` returns constants (blending, rescale).
"""

import dataclasses
import json
import math
import types

import numpy as np
import pytest
import torch

from infer import predict as predict_module
from pipeline import model as model_module
from pipeline import weights
from infer.predict import (
    DIAMETER_MEAN,
    TILE_SIZE,
    PredictConfig,
    default_dtype,
    estimate_diameter,
    load_model,
    pad_widths,
    predict,
    predict_many,
    predict_stream,
    predict_tiles,
    predict_volume,
    taper_weights,
    tile_grid,
    tile_starts,
)

# ------------------------------------------------------------------------------------------------
# Stand-in networks
# ------------------------------------------------------------------------------------------------


def flow_y(y, x):
    return np.sin(y / 7.0) + x / 100.0


def flow_x(y, x):
    return np.cos(x / 5.0) - y / 50.0


def cell_logit(y, x):
    return np.sin((y + 2 * x) / 11.0) * 3.0


class PositionNet(torch.nn.Module):
    """Flows of a known field, given in the tile's (possibly flipped) frame; see the module doc."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the model a device and dtype
        self.tiles_seen = 0

    def forward(self, tiles):
        self.tiles_seen += tiles.shape[0]
        y = tiles[:, 0].double() - 1  # global row of each pixel (-1 in the padding)
        x = tiles[:, 1].double() - 1
        inside = (tiles[:, 0] > 0) & (tiles[:, 1] > 0)
        # +1 where the global row grows downwards in the tile (not flipped), -1 where it shrinks.
        pairs_y = inside[:, 1:, :] & inside[:, :-1, :]
        pairs_x = inside[:, :, 1:] & inside[:, :, :-1]
        sign_y = torch.sign(((y[:, 1:, :] - y[:, :-1, :]) * pairs_y).sum((1, 2)))[:, None, None]
        sign_x = torch.sign(((x[:, :, 1:] - x[:, :, :-1]) * pairs_x).sum((1, 2)))[:, None, None]
        assert (sign_y != 0).all() and (sign_x != 0).all(), "tiles need 2 rows and columns of image"
        out = torch.stack([
            sign_y * (torch.sin(y / 7.0) + x / 100.0),
            sign_x * (torch.cos(x / 5.0) - y / 50.0),
            torch.sin((y + 2 * x) / 11.0) * 3.0,
        ], dim=1)
        return torch.where(inside[:, None], out, torch.full_like(out, 1e6)).to(tiles.dtype)


def position_image(height, width):
    """(H, W, 2) float32: channel 0 = row + 1, channel 1 = column + 1."""
    rows, cols = np.indices((height, width), dtype=np.float32)
    return np.stack([rows + 1, cols + 1], axis=-1)


def expected_output(height, width):
    rows, cols = np.indices((height, width), dtype=np.float64)
    return np.stack([flow_y(rows, cols), flow_x(rows, cols), cell_logit(rows, cols)])


class PixelNet(torch.nn.Module):
    """Per pixel: dy = c0, dx = c1, cellprob = c0 + 2 c1 + 4 c2, for 3-channel input."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tiles):
        assert tiles.shape[1] == 3
        c0, c1, c2 = tiles[:, 0], tiles[:, 1], tiles[:, 2]
        return torch.stack([c0, c1, c0 + 2 * c1 + 4 * c2], dim=1)


class ConstantNet(torch.nn.Module):
    def __init__(self, values=(1.5, -2.0, 0.25)):
        super().__init__()
        self.values = torch.tensor(values)
        self.tiles_seen = 0

    def forward(self, tiles):
        self.tiles_seen += tiles.shape[0]
        return self.values[None, :, None, None].expand(tiles.shape[0], 3, *tiles.shape[-2:]).clone()


class ConvNet(torch.nn.Module):
    """A fixed random 5x5 convolution: position-dependent, not flip-equivariant."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(3, 3, 5, padding=2)

    def forward(self, tiles):
        return self.conv(tiles)


class CellposeAdapter(torch.nn.Module):
    """Wraps a stand-in as a Cellpose network: .device, .dtype, and an (output, style) pair."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    def forward(self, x):
        return self.net(x), torch.zeros(x.shape[0], 256)


def raw(**options) -> PredictConfig:
    """Options that return the stitched network output for the image as given."""
    return PredictConfig(normalize=False, compute_masks=False, **options)


RAW = raw()
SIZES = [(1 + 1, 2), (17, 300), (100, 100), (255, 257), (256, 256), (300, 140), (513, 700)]


def stitched(prediction):
    return np.concatenate([prediction.flows, prediction.cellprob[None]])


# ------------------------------------------------------------------------------------------------
# Geometry against Cellpose
# ------------------------------------------------------------------------------------------------


@pytest.mark.reference
def test_pad_widths_match_cellpose():
    transforms = pytest.importorskip("cellpose.transforms")
    # Expected: cellpose.transforms.get_pad_yx as core.run_net calls it (min_size = tile size).
    for length in list(range(1, 600)) + [1000, 1023, 1024, 4097]:
        expected = transforms.get_pad_yx(length, length, min_size=(TILE_SIZE, TILE_SIZE))[:2]
        assert pad_widths(length) == tuple(int(v) for v in expected), length


@pytest.mark.reference
@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("overlap", [0.05, 0.1, 0.25, 0.5])
def test_tile_starts_and_flips_match_cellpose(augment, overlap):
    transforms = pytest.importorskip("cellpose.transforms")
    rng = np.random.default_rng(0)
    # Padded sizes as run_net produces them: 256 for small images, else 16k + 16.
    for height, width in [(256, 256), (256, 272), (272, 256), (528, 304), (800, 1040), (256, 1200)]:
        image = rng.random((2, height, width)).astype(np.float32)
        # Expected: the tiles cellpose.transforms.make_tiles cuts (and flips, with augment).
        tiles, ysub, xsub, _, _ = transforms.make_tiles(
            image, bsize=TILE_SIZE, augment=augment, tile_overlap=overlap
        )
        tiles = tiles.reshape(-1, 2, TILE_SIZE, TILE_SIZE)
        grid = tile_grid((height, width), TILE_SIZE, overlap, augment)
        expected_starts = [(int(y[0]), int(x[0])) for y, x in zip(ysub, xsub)]
        assert [(y0, x0) for y0, x0, _, _ in grid] == expected_starts
        for (y0, x0, flip_y, flip_x), expected in zip(grid, tiles):
            tile = image[:, y0 : y0 + TILE_SIZE, x0 : x0 + TILE_SIZE]
            tile = tile[:, ::-1] if flip_y else tile
            tile = tile[:, :, ::-1] if flip_x else tile
            np.testing.assert_array_equal(tile, expected)
        starts = tile_starts(height, TILE_SIZE, overlap, augment)
        assert sorted(set(starts.tolist())) == sorted({int(y[0]) for y in ysub})


@pytest.mark.reference
def test_taper_matches_cellpose():
    transforms = pytest.importorskip("cellpose.transforms")
    # Expected: cellpose.transforms._taper_mask, the weight average_tiles uses.
    expected = transforms._taper_mask(TILE_SIZE, TILE_SIZE)
    np.testing.assert_allclose(taper_weights(TILE_SIZE), expected, rtol=1e-12)


@pytest.mark.reference
@pytest.mark.parametrize("augment", [False, True])
def test_stitched_output_matches_cellpose_run_net(augment):
    core = pytest.importorskip("cellpose.core")
    transforms = pytest.importorskip("cellpose.transforms")
    net = ConvNet().eval()
    rng = np.random.default_rng(1)
    cases = [((100, 100), None), ((250, 300), None), ((513, 700), None), ((1000, 37), None),
             ((300, 260), 45.0), ((260, 300), 17.0)]
    for (height, width), diameter in cases:
        image = rng.random((height, width, 3)).astype(np.float32)
        ours = stitched(predict(net, image, raw(augment=augment, diameter=diameter)))
        # Expected: Cellpose's core.run_net on the same network, then the resize back to the
        # input size that CellposeModel._run_net does after a rescale.
        rescale = None if diameter is None else 30.0 / diameter
        with torch.no_grad():
            output, _ = core.run_net(
                CellposeAdapter(net), image[None], augment=augment, tile_overlap=0.1,
                bsize=TILE_SIZE, rsz=rescale,
            )
        if rescale is not None:
            output = transforms.resize_image(output, height, width)
        expected = output[0].transpose(2, 0, 1)
        # Without a rescale only float rounding differs; cv2's bilinear resize is a little coarser.
        tolerance = 1e-5 if diameter is None else 2e-4
        np.testing.assert_allclose(
            ours, expected, atol=tolerance, err_msg=f"{height}x{width}, {diameter}"
        )


# ------------------------------------------------------------------------------------------------
# Blending and test-time augmentation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", SIZES)
def test_blending_a_constant_field_gives_the_constant(height, width):
    image = np.random.default_rng(0).random((height, width, 3)).astype(np.float32)
    prediction = predict(ConstantNet(), image, RAW)
    assert prediction.flows.shape == (2, height, width)
    assert prediction.cellprob.shape == (height, width)
    assert prediction.flows.dtype == np.float32 and prediction.cellprob.dtype == np.float32
    constants = np.array([1.5, -2.0, 0.25])[:, None, None]
    expected = np.broadcast_to(constants, (3, height, width))
    np.testing.assert_allclose(stitched(prediction), expected, rtol=1e-6)


def test_augment_averages_flipped_constants_to_zero_flow():
    # Flip TTA negates a flipped tile's flow along the flipped axis; with a constant flow the
    # flipped and unflipped tiles cancel where they overlap equally, and cellprob is untouched.
    prediction = predict(ConstantNet(), np.ones((100, 100, 1), np.float32), raw(augment=True))
    np.testing.assert_allclose(prediction.cellprob, 0.25, rtol=1e-6)
    # A 100x100 image pads to 256: 2 x 2 tiles at the same place, one of each flip pattern.
    np.testing.assert_allclose(prediction.flows, 0.0, atol=1e-6)


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("height, width", SIZES)
def test_stitched_position_field_is_exact(height, width, augment):
    net = PositionNet()
    prediction = predict(net, position_image(height, width), raw(augment=augment))
    np.testing.assert_allclose(stitched(prediction), expected_output(height, width), atol=2e-5)
    padded = [h + sum(pad_widths(h)) for h in (height, width)]
    assert net.tiles_seen == len(tile_grid(tuple(padded), augment=augment))


@pytest.mark.parametrize("augment", [False, True])
@pytest.mark.parametrize("height, width", [(100, 100), (300, 140)])
def test_a_model_of_another_input_size_is_tiled_at_that_size(height, width, augment):
    # A model built with ModelConfig(image_size=128) takes 128 x 128 tiles: the padding minimum,
    # the tile grid and the taper follow its config instead of CP-SAM's 256.
    net = PositionNet()
    net.cfg = types.SimpleNamespace(image_size=128, in_channels=3)
    shapes = []
    net.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[-2:])))
    prediction = predict(net, position_image(height, width), raw(augment=augment))
    np.testing.assert_allclose(stitched(prediction), expected_output(height, width), atol=2e-5)
    assert set(shapes) == {(128, 128)}
    padded = [h + sum(pad_widths(h, 128)) for h in (height, width)]
    assert net.tiles_seen == len(tile_grid(tuple(padded), 128, augment=augment))


def test_tiny_model_at_128_predicts_masks():
    model = model_module.CPSAM(model_module.ModelConfig(encoder="tiny", image_size=128)).eval()
    image = np.random.default_rng(0).random((150, 170)).astype(np.float32)
    prediction = predict(model, image, PredictConfig())
    assert prediction.masks.shape == (150, 170) and np.isfinite(prediction.flows).all()


def test_augment_without_unflipping_would_be_caught(monkeypatch):
    # The position test is sharp: if flipped outputs were not negated, it would fail.
    def flip_back_only(output, flip_y, flip_x):
        return predict_module._flip(output, flip_y, flip_x)

    monkeypatch.setattr(predict_module, "_unflip_flows", flip_back_only)
    prediction = predict(PositionNet(), position_image(300, 300), raw(augment=True))
    assert not np.allclose(stitched(prediction), expected_output(300, 300), atol=1e-3)


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batch_size_does_not_change_the_output(batch_size):
    image = np.random.default_rng(2).random((300, 520, 3)).astype(np.float32)
    net = ConvNet().eval()
    reference = stitched(predict(net, image, RAW))
    ours = stitched(predict(net, image, raw(batch_size=batch_size)))
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_tile_counts_follow_cellpose_formula():
    # 1 tile up to 256 px padded; ceil(1.2 L / 256) beyond; max(2, ceil(2 L / 256)) with augment.
    assert tile_starts(256).tolist() == [0]
    assert len(tile_starts(272)) == math.ceil(1.2 * 272 / 256) == 2
    assert len(tile_starts(1040, tile_overlap=0.5)) == math.ceil(2.0 * 1040 / 256)
    assert len(tile_starts(272, augment=True)) == 3
    assert tile_starts(1040)[-1] == 1040 - 256
    with pytest.raises(ValueError, match="tile_size"):
        tile_starts(200)


# ------------------------------------------------------------------------------------------------
# Channels, normalisation, input checks
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_fewer_channels_equal_zero_padding(channels):
    rng = np.random.default_rng(channels)
    image = rng.random((120, 300, channels)).astype(np.float32)
    padded = np.concatenate([image, np.zeros((120, 300, 3 - channels), np.float32)], axis=-1)
    ours = stitched(predict(PixelNet(), image, RAW))
    np.testing.assert_allclose(ours, stitched(predict(PixelNet(), padded, RAW)), atol=1e-6)
    np.testing.assert_allclose(ours[2], image @ np.array([1.0, 2.0, 4.0])[:channels], atol=1e-5)


def test_predict_tiles_takes_a_normalised_channels_first_tensor():
    image = np.random.default_rng(4).random((70, 300, 2)).astype(np.float32)
    output = predict_tiles(ConvNet().eval(), torch.from_numpy(image).permute(2, 0, 1), RAW)
    assert output.dtype == torch.float32 and tuple(output.shape) == (3, 70, 300)
    np.testing.assert_array_equal(output.numpy(), stitched(predict(ConvNet().eval(), image, RAW)))
    with pytest.raises(ValueError, match="float"):
        predict_tiles(ConvNet(), torch.zeros(3, 10, 10, dtype=torch.uint8), RAW)


def test_grayscale_2d_image_is_one_channel():
    image = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    np.testing.assert_allclose(stitched(predict(PixelNet(), image, RAW))[2], image, atol=1e-6)


def test_normalize_maps_percentiles_per_channel():
    rng = np.random.default_rng(3)
    channels = [rng.integers(0, 4000, (90, 90)), rng.integers(100, 200, (90, 90))]
    image = np.stack(channels, axis=-1).astype(np.uint16)
    from pipeline.io import normalize_percentile

    ours = stitched(predict(PixelNet(), image, PredictConfig(compute_masks=False)))
    expected = normalize_percentile(image)
    np.testing.assert_allclose(ours[0], expected[..., 0], atol=1e-5)
    np.testing.assert_allclose(ours[1], expected[..., 1], atol=1e-5)


def test_bad_images_are_refused():
    with pytest.raises(ValueError, match="1 <= C <= 3"):
        predict(PixelNet(), np.zeros((10, 10, 4), np.float32), RAW)
    with pytest.raises(TypeError, match="numpy"):
        predict(PixelNet(), torch.zeros(10, 10), RAW)
    with pytest.raises(ValueError, match="non-finite"):
        predict(PixelNet(), np.full((10, 10), np.nan, np.float32), RAW)


def test_more_channels_than_the_model_takes_is_an_error():
    class OneChannel(ConstantNet):
        cfg = type("Cfg", (), {"in_channels": 1})()

    with pytest.raises(ValueError, match="2 channels but the model takes 1"):
        predict(OneChannel(), np.zeros((10, 10, 2), np.float32), RAW)


def test_model_training_mode_is_restored():
    net = ConvNet().train()
    predict(net, np.zeros((20, 20, 3), np.float32), RAW)
    assert net.training
    net.eval()
    predict(net, np.zeros((20, 20, 3), np.float32), RAW)
    assert not net.training


# ------------------------------------------------------------------------------------------------
# Diameter rescale
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("diameter", [10.0, 30.0, 45.0, 61.0])
@pytest.mark.parametrize("height, width", [(100, 37), (300, 513)])
def test_diameter_rescale_returns_the_input_size(height, width, diameter):
    net = ConstantNet()
    image = np.random.default_rng(0).random((height, width, 3)).astype(np.float32)
    prediction = predict(net, image, raw(diameter=diameter))
    assert prediction.flows.shape == (2, height, width)
    assert prediction.cellprob.shape == (height, width)
    np.testing.assert_allclose(prediction.cellprob, 0.25, rtol=1e-6)
    # The network saw the image at 30 / diameter: count its tiles.
    scaled = [int(side * DIAMETER_MEAN / diameter) for side in (height, width)]
    padded = tuple(side + sum(pad_widths(side)) for side in scaled)
    assert net.tiles_seen == len(tile_grid(padded))


def test_rescaled_position_field_is_close_to_the_field():
    # Downscaling by 2 and back blurs a smooth field only a little; this checks orientation and
    # alignment of the two resizes (a half-pixel or axis mix-up gives errors of order 1).
    image = position_image(400, 300)
    prediction = predict(PositionNet(), image, raw(diameter=60.0))
    error = np.abs(stitched(prediction) - expected_output(400, 300))[:, 4:-4, 4:-4]
    assert error.max() < 0.05


@pytest.mark.parametrize("diameter, niter, expected", [
    (None, None, 200), (30.0, None, 200), (60.0, None, 400), (15.0, None, 100), (45.0, 7, 7),
])
def test_niter_scales_with_the_rescale_as_cellpose(monkeypatch, diameter, niter, expected):
    seen = {}

    def fake_flows_to_masks(dP, cellprob, **options):
        seen.update(options)
        return np.zeros(cellprob.shape, np.uint16)

    monkeypatch.setattr(predict_module, "flows_to_masks", fake_flows_to_masks)
    mask_options = {"cellprob_threshold": 0.5, "flow_threshold": 0.3, "min_size": 3,
                    "max_size_fraction": 0.2}
    cfg = PredictConfig(diameter=diameter, niter=niter, **mask_options)
    prediction = predict(ConstantNet(), np.ones((50, 50), np.float32), cfg)
    assert prediction.masks.shape == (50, 50)
    assert seen == {"niter": expected, **mask_options}


def test_too_large_a_diameter_is_an_error():
    with pytest.raises(ValueError, match="shrinks"):
        predict(ConstantNet(), np.ones((10, 10), np.float32), raw(diameter=400.0))


@pytest.mark.parametrize("options, match", [
    ({"diameter": 0.0}, "diameter"), ({"diameter": -3.0}, "diameter"),
    ({"tile_overlap": 0.9}, "tile_overlap"), ({"tile_overlap": 0.0}, "tile_overlap"),
    ({"batch_size": 0}, "batch_size"), ({"niter": 0}, "niter"), ({"augment": 1}, "augment"),
    ({"flow_threshold": -1.0}, "flow_threshold"), ({"min_size": 1.5}, "min_size"),
    ({"max_size_fraction": 0.0}, "max_size_fraction"),
    ({"cellprob_threshold": math.nan}, "cellprob_threshold"),
])
def test_config_checks(options, match):
    with pytest.raises((TypeError, ValueError), match=match):
        PredictConfig(**options)


# ------------------------------------------------------------------------------------------------
# diameter="auto": a first run at scale 1, then one at the median diameter of its masks
# ------------------------------------------------------------------------------------------------


def squares(shape, side, step):
    """Labels: side x side squares every ``step`` px (Cellpose diameter side / (sqrt(pi) / 2))."""
    labels = np.zeros(shape, np.uint16)
    for n, (y, x) in enumerate((y, x) for y in range(2, shape[0] - side, step) for x in range(2, shape[1] - side, step)):
        labels[y : y + side, x : x + side] = n + 1
    return labels


def test_estimate_diameter_is_cellposes_median_diameter_with_a_floor():
    labels = squares((100, 100), 10, 20)
    labels[labels == 1] = 0  # one fewer: the median is still of equal squares
    # Cellpose's utils.diameters: median of sqrt(area) / (sqrt(pi) / 2).
    assert estimate_diameter(labels) == pytest.approx(10 / (math.sqrt(math.pi) / 2))
    assert estimate_diameter(np.zeros((20, 20), np.uint16)) is None
    assert estimate_diameter(squares((20, 20), 2, 4)) == 5.0  # 2.26 px, floored as the trainer's


def test_auto_diameter_is_estimated_again_at_the_first_estimate(monkeypatch):
    # Masks whose size depends on the run (niter = 200 / rescale tells the runs apart): 12 px
    # squares at scale 1, 20 px at the first estimate; a third run follows at the second
    # estimate, and that run is the result.
    niters = []

    def fake_flows_to_masks(dP, cellprob, niter, **options):
        niters.append(niter)
        return squares(cellprob.shape, 12 if niter == 200 else 20, 30)

    monkeypatch.setattr(predict_module, "flows_to_masks", fake_flows_to_masks)
    image = np.ones((300, 200), np.float32)
    net = ConstantNet()
    prediction = predict(net, image, PredictConfig(diameter="auto"))
    first, second = (side / (math.sqrt(math.pi) / 2) for side in (12, 20))
    # Masks once per run, at the image's size, with Cellpose's niter = 200 / rescale.
    assert niters == [200, int(200 / (DIAMETER_MEAN / first)), int(200 / (DIAMETER_MEAN / second))]
    assert prediction.diameter == pytest.approx(second)
    # The network saw the image at scale 1, then at 30 / each estimate.
    tiles = 0
    for scale in (1.0, DIAMETER_MEAN / first, DIAMETER_MEAN / second):
        scaled = [int(side * scale) for side in (300, 200)]
        tiles += len(tile_grid(tuple(side + sum(pad_widths(side)) for side in scaled)))
    assert net.tiles_seen == tiles
    niters.clear()
    prediction = predict(ConstantNet(), image, PredictConfig(diameter="auto", compute_masks=False))
    assert niters == [200, int(200 / (DIAMETER_MEAN / first))]  # no masks in the last run
    assert prediction.diameter == pytest.approx(second) and prediction.masks is None


def test_auto_diameter_without_masks_keeps_the_first_run(monkeypatch):
    monkeypatch.setattr(predict_module, "flows_to_masks", lambda dP, cellprob, **_: np.zeros(cellprob.shape, np.uint16))
    net = ConstantNet()
    prediction = predict(net, np.ones((100, 100), np.float32), PredictConfig(diameter="auto"))
    assert prediction.diameter is None and prediction.masks.max() == 0
    assert net.tiles_seen == 1  # not run again
    flows_only = predict(ConstantNet(), np.ones((100, 100), np.float32), PredictConfig(diameter="auto", compute_masks=False))
    assert flows_only.masks is None


@pytest.mark.parametrize("side", [8, 26])
def test_auto_diameter_finds_the_objects_size(side):
    # PixelNet returns its channels 0 and 1 as the flows: fed the true flows (x 5, as the
    # network's) of squares of a known size, both runs give real masks, so the estimate is the
    # squares' diameter and the rescaled run still finds each square.
    from pipeline.flows import masks_to_flows
    from pipeline.metrics import average_precision

    labels = squares((240, 260), side, side + 10)
    flows = 5 * masks_to_flows(labels)
    cellprob = np.where(labels > 0, 4.0, -4.0)
    image = np.stack([flows[0], flows[1], (cellprob - flows[0] - 2 * flows[1]) / 4], axis=-1).astype(np.float32)
    cfg = PredictConfig(diameter="auto", normalize=False)
    prediction = predict(PixelNet(), image, cfg)
    assert prediction.diameter == pytest.approx(side / (math.sqrt(math.pi) / 2), rel=0.05)
    assert average_precision(labels, prediction.masks, [0.5])[0][0, 0] >= 0.95


def test_auto_diameter_keeps_order_failures_and_then():
    images = mixed_images(4)
    unreadable = OSError("cannot read")
    items = [("a", images[0]), ("b", unreadable), ("c", "not an array"), ("d", images[1])]
    cfg = PredictConfig(diameter="auto", normalize=False, batch_size=3)
    for pool, overlap in ((False, False), (True, True)):
        results = list(predict_stream(ConvNet().eval(), items, cfg, pool=pool, overlap=overlap,
                                      then=lambda key, p: (key, p.masks.shape)))
        assert [key for key, _ in results] == ["a", "b", "c", "d"]
        assert results[0][1] == ("a", images[0].shape[:2]) and results[3][1] == ("d", images[1].shape[:2])
        assert results[1][1] is unreadable and isinstance(results[2][1], TypeError)


def test_auto_is_the_only_word_a_diameter_takes():
    assert PredictConfig(diameter="auto").diameter == "auto"
    with pytest.raises(ValueError, match="auto"):
        PredictConfig(diameter="large")
    with pytest.raises(ValueError, match="per image"):
        predict_tiles(ConstantNet(), torch.ones(1, 50, 50), PredictConfig(diameter="auto"))


# ------------------------------------------------------------------------------------------------
# Several images: tiles pooled across images, failures kept to their image
# ------------------------------------------------------------------------------------------------


class CallCountingNet(ConvNet):
    """ConvNet that records the batch size of every call, and fails on a tile holding ``poison``."""

    def __init__(self, poison=None):
        super().__init__()
        self.batches = []
        self.poison = poison

    def forward(self, tiles):
        self.batches.append(tiles.shape[0])
        if self.poison is not None and (tiles == self.poison).any():
            raise RuntimeError("out of memory (simulated)")
        return super().forward(tiles)


def mixed_images(n=7, seed=3):
    """Images of 1, 2, 4 and 9 tiles, in an order that makes batches straddle images."""
    rng = np.random.default_rng(seed)
    shapes = [(100, 120), (256, 300), (40, 500), (520, 310), (256, 256), (9, 9), (400, 400)]
    return [rng.random((*shapes[i % len(shapes)], 3)).astype(np.float32) for i in range(n)]


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("options", [{}, {"augment": True}, {"diameter": 45.0}, {"batch_size": 1}])
def test_pooled_images_give_what_each_image_gives_alone(options, overlap):
    images = mixed_images()
    net = ConvNet().eval()
    cfg = raw(batch_size=options.pop("batch_size", 5), **options)
    alone = [stitched(predict(net, image, cfg)) for image in images]
    pooled = [stitched(p) for p in predict_many(net, images, cfg, pool=True, overlap=overlap)]
    assert len(pooled) == len(images)
    for ours, reference in zip(pooled, alone):
        np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_tiles_of_small_images_share_network_calls():
    # Cellpose 4 runs each image's tiles on their own (paper.md section 4, #1460): ten one-tile
    # images at batch_size 4 are ten calls of one tile there, three calls (4 + 4 + 2) here.
    images = [np.random.default_rng(i).random((200, 200)).astype(np.float32) for i in range(10)]
    net = CallCountingNet().eval()
    list(predict_many(net, images, raw(batch_size=4), pool=True))
    assert net.batches == [4, 4, 2]
    # The default on the CPU: each image's tiles on their own, as Cellpose (docs/BENCHMARKS.md:
    # pooling is no faster there).
    net = CallCountingNet().eval()
    list(predict_many(net, images, raw(batch_size=4)))
    assert net.batches == [1] * 10
    net = CallCountingNet().eval()
    list(predict_many(net, [np.zeros((520, 520), np.float32)] * 2, raw(batch_size=4)))
    assert net.batches == [4, 4, 1, 4, 4, 1]  # 9 tiles each, never sharing a call


def test_masks_are_those_of_each_image_alone():
    from pipeline.synthetic import generate

    images = [generate("nuclei", shape, seed=i)[0] for i, shape in enumerate([(120, 140), (300, 260), (90, 90)])]
    model = tiny_model(in_channels=1)
    cfg = PredictConfig(flow_threshold=0.0, min_size=0, batch_size=3)
    for overlap in (False, True):
        for image, pooled in zip(images, predict_many(model, images, cfg, pool=True, overlap=overlap)):
            np.testing.assert_array_equal(pooled.masks, predict(model, image, cfg).masks)


def test_a_bad_image_fails_alone_and_order_is_kept():
    images = mixed_images(5)
    images[1] = images[1].copy()
    images[1][3, 4] = np.nan  # refused before the network
    unreadable = OSError("cannot read b.tif")
    items = [("a", images[0]), ("b", unreadable), ("c", images[1]), ("d", images[2]), ("e", "not an array")]
    net = ConvNet().eval()
    results = list(predict_stream(net, items, raw(batch_size=3), pool=True))
    assert [key for key, _ in results] == ["a", "b", "c", "d", "e"]
    assert results[1][1] is unreadable  # passed through in its place
    assert isinstance(results[2][1], ValueError) and "non-finite" in str(results[2][1])
    assert isinstance(results[4][1], TypeError)
    for (key, result), image in ((results[0], images[0]), (results[3], images[2])):
        np.testing.assert_allclose(stitched(result), stitched(predict(net, image, RAW)), atol=1e-5)


def test_a_failing_network_call_fails_only_the_image_that_fails_alone():
    # One tile each, batch_size 2: calls (0, 1), (2, 3), (4,). Image 2 holds the poison value, so
    # the call (2, 3) fails; it is retried image by image: 2 fails again, 3 succeeds.
    images = [np.full((100, 100), float(i + 1), dtype=np.float32) for i in range(5)]
    net = CallCountingNet(poison=3.0).eval()
    results = dict(predict_stream(net, enumerate(images), raw(batch_size=2), pool=True))
    failed = sorted(key for key, result in results.items() if isinstance(result, BaseException))
    assert failed == [2]
    assert "out of memory" in str(results[2])
    assert net.batches == [2, 2, 1, 1, 1]
    for key in (0, 1, 3, 4):
        np.testing.assert_allclose(stitched(results[key]), stitched(predict(ConvNet().eval(), images[key], RAW)), atol=1e-6)
    # A multi-tile image whose tiles straddle the failed call: its later tiles are not run.
    big = np.full((520, 520), 3.0, dtype=np.float32)  # 9 tiles, all poisoned
    net = CallCountingNet(poison=3.0).eval()
    results = list(predict_stream(net, enumerate([images[0], big, images[1]]), raw(batch_size=4), pool=True))
    assert [isinstance(r, BaseException) for _, r in results] == [False, True, False]
    # (image 0, big x 3) fails, then image 0 alone and big's 3 alone; big's other 6 tiles are
    # skipped; image 1 runs alone.
    assert net.batches == [4, 1, 3, 1]


def test_images_are_pulled_only_as_the_pool_needs_them():
    pulled = []

    def images():
        for i in range(50):
            pulled.append(i)
            yield np.zeros((100, 100), dtype=np.float32)

    stream = predict_many(ConvNet().eval(), images(), raw(batch_size=4), pool=True)
    next(stream)
    assert len(pulled) <= 4 + 1  # one batch of one-tile images, and the next one it looked at


def test_then_runs_on_each_prediction_and_its_errors_are_results():
    images = [np.zeros((60, 60), dtype=np.float32) + i for i in range(4)]

    def then(key, prediction):
        if key == 2:
            raise OSError("disk full")
        return key, prediction.flows.shape

    for overlap in (False, True):
        results = list(predict_stream(ConvNet().eval(), enumerate(images), raw(batch_size=3), then=then, pool=True, overlap=overlap))
        assert [r for _, r in results if not isinstance(r, BaseException)] == [(0, (2, 60, 60)), (1, (2, 60, 60)), (3, (2, 60, 60))]
        assert isinstance(results[2][1], OSError)


def test_overlap_defaults_to_the_gpu_only(monkeypatch):
    used = []
    real = predict_module.ThreadPoolExecutor

    def spy(*args, **kwargs):
        used.append(True)
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module, "ThreadPoolExecutor", spy)
    list(predict_many(ConvNet().eval(), [np.zeros((50, 50), dtype=np.float32)], RAW))
    assert used == []  # on the CPU the network and the mask kernels share the same cores
    list(predict_many(ConvNet().eval(), [np.zeros((50, 50), dtype=np.float32)], RAW, overlap=True))
    assert used == [True]


# ------------------------------------------------------------------------------------------------
# The real model: a randomly initialised tiny CP-SAM, and loading weight files
# ------------------------------------------------------------------------------------------------



def tiny_model(in_channels=3, seed=0):
    torch.manual_seed(seed)
    cfg = model_module.ModelConfig(encoder="tiny", in_channels=in_channels)
    return weights.build_model(cfg).eval()


def export(model, path, step=7):
    """Write ``model`` as the trainer exports it: Cellpose layout plus <stem>.json."""
    torch.save(weights.to_cellpose(model), path)
    # As train/trainer.py writes it: every ModelConfig field, incl. the SAM weights it started from.
    fields = dataclasses.asdict(model.cfg) | {"sam_checkpoint": "sam_vit_l_0b3195.pth"}
    path.with_suffix(".json").write_text(json.dumps({"model": fields, "step": step}))


@pytest.mark.parametrize("channels", [1, 2, 3])
def test_tiny_model_predicts_masks_for_1_to_3_channels(channels):
    from pipeline.synthetic import generate

    kind = {1: "nuclei", 2: "cyto", 3: "he"}[channels]
    image, _ = generate(kind, (200, 300), seed=channels)
    assert image.shape[-1] == channels
    prediction = predict(tiny_model(), image, PredictConfig(flow_threshold=0.0, min_size=0))
    assert prediction.flows.shape == (2, 200, 300) and prediction.cellprob.shape == (200, 300)
    assert np.isfinite(prediction.flows).all() and np.isfinite(prediction.cellprob).all()
    assert prediction.masks.dtype == np.uint16 and prediction.masks.shape == (200, 300)
    # Masks are numbered 1..N.
    assert set(np.unique(prediction.masks)) == set(range(int(prediction.masks.max()) + 1))


def test_tiny_model_export_round_trips_through_load_model(tmp_path):
    model = tiny_model(in_channels=1)
    export(model, tmp_path / "model_cellpose.pt")
    loaded = load_model(tmp_path / "model_cellpose.pt", device="cpu", dtype=torch.float32)
    assert loaded.cfg.in_channels == 1 and loaded.cfg.encoder == "tiny" and not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    image = np.random.default_rng(0).integers(0, 500, (140, 270)).astype(np.uint16)
    extended = stitched(predict(model, image, RAW))
    # On the CPU load_model passes the attention bias as a mask (faster there): the same
    # function, so the same output to float rounding, and bit for bit with the same kernel.
    assert model_module.set_bias_as_mask(model, True) == 2  # the tiny model's 2 blocks
    expected = stitched(predict(model, image, RAW))
    np.testing.assert_array_equal(stitched(predict(loaded, image, RAW)), expected)
    np.testing.assert_allclose(expected, extended, rtol=0, atol=1e-5 * np.abs(extended).max())


def test_load_model_picks_the_attention_kernel_by_device(tmp_path):
    export(tiny_model(), tmp_path / "m.pt")
    blocks = [m for m in load_model(tmp_path / "m.pt", device="cpu").modules()
              if isinstance(m, model_module.RelPosAttention)]
    assert len(blocks) == 2 and all(block.bias_as_mask for block in blocks)
    model = tiny_model()
    assert model_module.set_bias_as_mask(model, False) == 2
    assert not any(m.bias_as_mask for m in model.modules() if isinstance(m, model_module.RelPosAttention))


def test_official_layout_without_json_loads_from_shapes(tmp_path):
    # An official cpsam file has no json; the variant comes from the tensor shapes (a ViT-L in
    # the real file, the tiny variant here) and in_channels is 3.
    model = tiny_model()
    torch.save(weights.to_cellpose(model), tmp_path / "cpsam")
    loaded = load_model(tmp_path / "cpsam", device="cpu", dtype=torch.float32)
    assert loaded.cfg.encoder == "tiny" and loaded.cfg.in_channels == 3
    image = np.random.default_rng(1).random((64, 64, 2)).astype(np.float32)
    model_module.set_bias_as_mask(model, True)  # as load_model does on the CPU
    expected = stitched(predict(model, image, RAW))
    np.testing.assert_array_equal(stitched(predict(loaded, image, RAW)), expected)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (False, False, torch.float32), (True, False, torch.bfloat16), (False, True, torch.bfloat16),
])
def test_default_dtype_is_bf16_where_the_hardware_has_it(monkeypatch, tmp_path, avx512_bf16, amx, expected):
    # Cellpose 4 runs bf16 everywhere by default; here the CPU does only with bf16 instructions.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert default_dtype("cpu") == expected
    assert default_dtype("cuda") == default_dtype(torch.device("cuda", 1)) == torch.bfloat16
    export(tiny_model(), tmp_path / "m.pt")
    assert next(load_model(tmp_path / "m.pt", device="cpu").parameters()).dtype == expected
    # Probes missing from another torch release: float32, never an error.
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert default_dtype("cpu") == torch.float32


def test_bf16_model_returns_float32_close_to_fp32(tmp_path):
    model = tiny_model()
    export(model, tmp_path / "m.pt")
    half = load_model(tmp_path / "m.pt", device="cpu", dtype=torch.bfloat16)
    assert next(half.parameters()).dtype == torch.bfloat16
    image = np.random.default_rng(2).random((100, 100, 3)).astype(np.float32)
    ours = stitched(predict(half, image, RAW))
    assert ours.dtype == np.float32
    reference = stitched(predict(model, image, RAW))
    assert np.abs(ours - reference).max() < 0.1 * np.abs(reference).max()


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="folder"):
        load_model(tmp_path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_model(tmp_path / "junk.pt")
    torch.save({"W2": torch.zeros(1)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="partial.pt"):
        load_model(tmp_path / "partial.pt")
    export(tiny_model(), tmp_path / "m.pt")
    (tmp_path / "m.json").write_text(json.dumps({"step": 3}))
    with pytest.raises(ValueError, match="m.json"):
        load_model(tmp_path / "m.pt")


# ------------------------------------------------------------------------------------------------
# Stream records, progress, and Cellpose's CLI options kept in PredictConfig
# ------------------------------------------------------------------------------------------------


def test_skipped_items_pass_through_in_order_without_the_network():
    from infer.predict import Skip

    images = mixed_images(3)
    net = CallCountingNet().eval()
    items = [("a", images[0]), ("b", Skip("row of b")), ("c", images[1]), ("d", Skip(None))]
    for pool, overlap in ((False, False), (True, True)):
        results = list(predict_stream(net, items, raw(batch_size=3), pool=pool, overlap=overlap, then=lambda k, p: k))
        assert results == [("a", "a"), ("b", "row of b"), ("c", "c"), ("d", None)]


def test_on_tiles_reports_every_tile_run():
    calls = []
    images = [np.zeros((520, 520), np.float32), np.zeros((100, 100), np.float32)]  # 9 + 1 tiles
    list(predict_stream(ConvNet().eval(), enumerate(images), raw(batch_size=4), pool=True,
                        on_tiles=lambda run, planned: calls.append((run, planned))))
    assert calls[-1] == (10, 10)
    assert [run for run, _ in calls] == sorted({run for run, _ in calls})  # grows each call
    assert all(run <= planned for run, planned in calls)


@pytest.mark.reference
def test_remove_edge_masks_matches_cellpose():
    utils = pytest.importorskip("cellpose.utils")
    from infer.predict import remove_edge_masks

    rng = np.random.default_rng(0)
    for shape in [(30, 40), (8, 30, 40)]:
        masks = np.zeros(shape, np.uint16)
        for label in range(1, 40):  # boxes, some on the border, some overlapping later ones
            corner = [rng.integers(0, n - 3) for n in shape]
            masks[tuple(slice(c, c + int(rng.integers(2, 8))) for c in corner)] = label
        ours = remove_edge_masks(masks)
        np.testing.assert_array_equal(ours, utils.remove_edge_masks(masks.copy()))
        assert ours.dtype == masks.dtype and 0 < ours.max() < masks.max()


def test_norm_percentile_is_passed_to_the_normalisation():
    image = np.random.default_rng(2).random((60, 70, 3)).astype(np.float32) * 100
    from pipeline.io import normalize_percentile

    for bounds in [(1.0, 99.0), (5.0, 95.0)]:
        cfg = PredictConfig(compute_masks=False, norm_percentile=bounds)
        ours = stitched(predict(PixelNet(), image, cfg))
        reference = stitched(predict(PixelNet(), normalize_percentile(image, *bounds), raw()))
        np.testing.assert_allclose(ours, reference, atol=1e-5)
    with pytest.raises(ValueError, match="norm_percentile"):
        PredictConfig(norm_percentile=(99.0, 1.0))


def test_exclude_on_edges_applies_to_the_masks(monkeypatch):
    masks = np.zeros((100, 100), np.uint16)
    masks[0:5, 0:5], masks[40:50, 40:50], masks[95:, 50:60] = 1, 2, 3
    monkeypatch.setattr(predict_module, "flows_to_masks", lambda dP, cellprob, **_: masks.copy())
    prediction = predict(ConstantNet(), np.ones((100, 100), np.float32), PredictConfig(exclude_on_edges=True))
    assert np.unique(prediction.masks).tolist() == [0, 1] and (prediction.masks == 1).sum() == 100


# ------------------------------------------------------------------------------------------------
# Volumes: do_3d (Cellpose 4's eval(do_3D=True)) and stitch_threshold
# ------------------------------------------------------------------------------------------------


def cellpose_model_around(net):
    """A CellposeModel whose network is ``net`` (Cellpose's eval, not its weights loading)."""
    models = pytest.importorskip("cellpose.models")
    model = models.CellposeModel.__new__(models.CellposeModel)
    model.net = CellposeAdapter(net)
    model.device, model.backbone, model.timing = torch.device("cpu"), "sam_vitl", False
    return model


@pytest.mark.reference
@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"anisotropy": 2.0}, {"diameter": 45.0, "flow3D_smooth": 1.0}])
def test_volume_flows_match_cellpose_eval_do_3d(options):
    # The same network in Cellpose 4's eval(do_3D=True) (normalisation over the volume, Z
    # rescaled by the anisotropy, the network on YX, ZY and ZX planes, flow components and the
    # three cellprobs summed, resized back, smoothed) and in predict_volume: the same summed
    # flows and cellprob, to the 2-D test's tolerance (5e-5 after a resize).
    net = ConvNet().eval()
    volume = (np.random.default_rng(0).random((6, 40, 50, 3)) * 1000).astype(np.float32)
    _, flows, _ = cellpose_model_around(net).eval(volume, do_3D=True, z_axis=0, channel_axis=3, **options)
    ours = predict_volume(net, volume, PredictConfig(
        do_3d=True, anisotropy=options.get("anisotropy"), diameter=options.get("diameter"),
        flow3d_smooth=options.get("flow3D_smooth", 0.0)))
    assert ours.flows.shape == flows[1].shape == (3, 6, 40, 50)
    tolerance = 1e-6 if not options else 5e-5
    np.testing.assert_allclose(ours.flows, flows[1], atol=tolerance * np.abs(flows[1]).max())
    np.testing.assert_allclose(ours.cellprob, flows[2], atol=tolerance * np.abs(flows[2]).max())


def test_volume_planes_are_summed_with_their_flow_axes():
    # PixelNet returns (c0, c1, c0 + 2 c1 + 4 c2) per pixel: with channels (z, y, x) ramps, every
    # orientation's dy / dx land on the volume axes they run along (paper.md 2c: the matching
    # flow components summed), and the cellprob is three times the 2-D one.
    depth, height, width = 5, 20, 30
    z, y, x = np.indices((depth, height, width), dtype=np.float32)
    volume = np.stack([z, y, x], axis=-1)
    ours = predict_volume(PixelNet(), volume, PredictConfig(do_3d=True, normalize=False, compute_masks=False))
    # YX planes: dy = c0 = z along y, dx = c1 = y along x; ZY planes (along X): dy -> Z gets c0
    # (z), dx -> Y gets c1 (y); ZX planes (along Y): dy -> Z gets c0, dx -> X gets c1.
    np.testing.assert_allclose(ours.flows[0], 2 * z, atol=1e-5)
    np.testing.assert_allclose(ours.flows[1], z + y, atol=1e-5)
    np.testing.assert_allclose(ours.flows[2], y + y, atol=1e-5)
    np.testing.assert_allclose(ours.cellprob, 3 * (z + 2 * y + 4 * x), atol=1e-4)


@pytest.mark.reference
def test_stitch_planes_matches_cellpose_stitch3d():
    utils = pytest.importorskip("cellpose.utils")
    from infer.predict import stitch_planes

    rng = np.random.default_rng(1)
    for threshold in (0.1, 0.25, 0.6):
        masks = np.zeros((6, 40, 40), np.uint16)
        for z in range(6):
            if z == 2:
                continue  # an empty plane in between
            for label in range(1, 8):
                y0, x0 = rng.integers(0, 32, 2)
                masks[z, y0 : y0 + int(rng.integers(3, 9)), x0 : x0 + int(rng.integers(3, 9))] = label
        ours = stitch_planes(masks, threshold)
        np.testing.assert_array_equal(ours, utils.stitch3D(masks.copy(), stitch_threshold=threshold))


def test_stitched_volume_links_a_column_of_squares(monkeypatch):
    # flows_to_masks stands in: the same square on every plane, shifted by one pixel per plane
    # (IoU 0.8 between neighbours): stitched into one 3-D mask at threshold 0.5, not at 0.9.
    def fake(dP, cellprob, niter, **options):
        masks = np.zeros(cellprob.shape, np.uint16)
        shift = int(round(float(cellprob.mean()) * 0 + fake.calls))
        masks[10 + shift : 20 + shift, 10:20] = 1
        fake.calls += 1
        return masks

    monkeypatch.setattr(predict_module, "flows_to_masks", fake)
    volume = np.ones((4, 50, 50), np.float32)
    for threshold, n_masks in ((0.5, 1), (0.9, 4)):
        fake.calls = 0
        prediction = predict(ConstantNet(), volume, PredictConfig(stitch_threshold=threshold, min_size=0))
        assert prediction.masks.shape == (4, 50, 50) and prediction.flows.shape == (2, 4, 50, 50)
        assert prediction.masks.max() == n_masks


def test_volume_options_are_checked():
    with pytest.raises(ValueError, match="pick one"):
        PredictConfig(do_3d=True, stitch_threshold=0.5)
    with pytest.raises(ValueError, match="auto"):
        PredictConfig(do_3d=True, diameter="auto")
    with pytest.raises(ValueError, match="anisotropy"):
        PredictConfig(do_3d=True, anisotropy=0)
    with pytest.raises(ValueError, match=r"\(Z, Y, X\)"):
        predict(ConstantNet(), np.ones((5, 5), np.float32), PredictConfig(do_3d=True))


def test_a_stream_of_volumes_keeps_order_failures_and_then():
    volumes = [np.random.default_rng(i).random((3, 30, 40, 3)).astype(np.float32) for i in range(2)]
    items = [("a", volumes[0]), ("b", OSError("unreadable")), ("c", np.ones((5, 5), np.float32)), ("d", volumes[1])]
    cfg = PredictConfig(do_3d=True, normalize=False, compute_masks=False)
    results = list(predict_stream(ConvNet().eval(), items, cfg, then=lambda key, p: (key, p.flows.shape)))
    assert [key for key, _ in results] == ["a", "b", "c", "d"]
    assert results[0][1] == ("a", (3, 3, 30, 40)) and results[3][1] == ("d", (3, 3, 30, 40))
    assert isinstance(results[1][1], OSError) and isinstance(results[2][1], ValueError)
