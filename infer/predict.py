"""The network on an image of any size: normalise, rescale, pad, tile, blend, then masks.

:func:`predict` follows Cellpose 4's inference path (``CellposeModel.eval`` -> ``_run_net`` ->
``core.run_net``; paper.md 2c) step by step:

1. **Channels.** An (H, W) or (H, W, C) image with 1 <= C <= 3; fewer channels than the model
   takes are zero-padded at the end (Cellpose slices the patch-embed weights instead, which is
   the same thing). A grayscale image is channel 0, as in ``CellposeModel.eval``.
2. **Normalise** each channel, 1st percentile -> 0 and 99th -> 1
   (``pipeline.io.normalize_percentile``, the equivalent of Cellpose's ``normalize99``).
3. **Rescale** (optional) by ``30 / diameter`` to (int(H * r), int(W * r)), bilinearly
   (Cellpose: ``cv2.resize(INTER_LINEAR)``; here ``torch.nn.functional.interpolate`` with
   ``align_corners=False``, which samples the same points). ``diameter="auto"`` estimates it
   per image first (:func:`estimate_diameter`, below).
4. **Pad** with zeros (:func:`pad_widths`): to a multiple of 16 plus 8 px each side, or to 256
   for images under 240 px (Cellpose's ``get_pad_yx`` with ``min_size=(256, 256)``).
5. **Tile** (:func:`tile_starts`): 256 x 256 tiles, 1 per axis up to 256 px, otherwise
   ``ceil((1 + 2 * overlap) * L / 256)``, starts evenly spaced (``np.linspace``, truncated).
   A model built at another ``ModelConfig.image_size`` is tiled (and padded, and tapered) at
   that size in place of 256.
   With test-time augmentation: ``max(2, ceil(2 L / 256))`` per axis (50% overlap); tile (j, i)
   of the grid is flipped in y if j is even and i odd, in x if j is odd and i even, in both if
   both are odd, and its output flipped back with the matching flow components negated
   (:func:`tile_grid`).
6. **Run** the tiles ``batch_size`` at a time, in the model's dtype (bf16 on a GPU by default,
   see :func:`load_model`), outputs cast to float32.
7. **Blend**: each tile is weighted by the separable sigmoid taper
   ``1 / (1 + exp((|i - centre| - (256/2 - 20)) / 7.5))`` (:func:`taper_weights`, Cellpose's
   ``_taper_mask``); the map is the weighted sum over the summed weights. The padding is cropped
   and, after a rescale, the output resized back to (H, W) bilinearly.
8. **Masks** from ``pipeline.dynamics.flows_to_masks`` with ``niter = int(200 / r)`` unless given
   (Cellpose's rule: a shrunk image's flows are followed further at full size).

**Estimated diameter** (``diameter="auto"``, not in Cellpose 4, which dropped the size model of
Cellpose 1-3): each image is first run at its own scale, and the median diameter of the masks
found there (Cellpose's definition, :func:`estimate_diameter`) is the diameter of the next run,
so the cells reach the network at about 30 px; the masks of that run give a second estimate and
the final run (:data:`AUTO_ESTIMATES`). Cellpose 1-3 likewise refined their size model's guess
with the masks of a run at it. An image whose run finds no masks keeps that run. It matters for
a model trained on a narrow range of sizes (the tiny learning-check model: docs/BENCHMARKS.md);
CP-SAM itself was trained on 7.5 to 120 px and needs no diameter. It costs two extra runs per
image.

Where this differs from Cellpose:

* ``tile_overlap`` outside [0.05, 0.5] is an error (Cellpose clips it silently); a diameter of
  0 is an error too (Cellpose reads it as "no rescale"; leave it None instead).
* Padding, tiling and blending run in torch on the model's device, in float32; Cellpose cuts
  tiles and blends on the CPU in NumPy with a float64 taper. With the same network, stitched
  outputs agree with ``cellpose.core.run_net`` to 2e-7 (values of order 1), and to 5e-5 after
  a diameter rescale, where cv2's resize and torch's round differently (see the tests).
* On a GPU the tiles of consecutive images are pooled into the same batches, and the masks of
  one image are followed while the network runs on the next (:func:`predict_many`,
  :func:`predict_stream`); Cellpose runs each image on its own, as this module does on a CPU.

**The stream** (:func:`predict_stream`, which :func:`predict` and :func:`predict_many` use) is
three stages composed in :func:`_stream`, each passing on one ``_Work`` record per image:
``_prepared`` (steps 1-5: checked, normalised, rescaled, padded, its tile grid planned; or
finished: failed, skipped, given), ``_run_tiles`` (the one batcher: tiles of consecutive images
``batch_size`` at a time, blended into each image's output, images yielded in order) and
``_finished`` (step 8 and the caller's ``then``, maybe in a worker thread). The tiling maths
(:func:`pad_widths`, :func:`tile_starts`, :func:`tile_grid`, :func:`taper_weights`,
:func:`scaled_size`) are pure functions. ``diameter="auto"`` is a loop of single-scale runs.

**Volumes** (:func:`predict_volume`, ``do_3d`` or ``stitch_threshold``) follow Cellpose 4's
``eval(do_3D=True)``: the planes of each orientation go through the same batcher.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

import scipy.ndimage

from pipeline.dynamics import clean_masks, flows_to_masks
from pipeline.io import normalize_percentile
from pipeline.model import DIAMETER_MEAN, MIN_DIAMETER, set_bias_as_mask
from pipeline.shards import cellpose_diameter
from pipeline.weights import read_export, sidecar_path

__all__ = [
    "DIAMETER_MEAN",
    "TILE_SIZE",
    "Prediction",
    "PredictConfig",
    "Skip",
    "default_dtype",
    "estimate_diameter",
    "load_model",
    "pad_widths",
    "predict",
    "predict_many",
    "predict_stream",
    "predict_tiles",
    "predict_volume",
    "stitch_planes",
    "remove_edge_masks",
    "scaled_size",
    "taper_weights",
    "tile_grid",
    "tile_starts",
]

log = logging.getLogger(__name__)

#: Side of the square tiles CP-SAM sees. A model built with another ``ModelConfig.image_size``
#: is tiled at that size instead (the padding minimum and the taper follow it).
TILE_SIZE = 256
#: Euler steps for the masks at scale 1 (Cellpose's default), divided by the rescale factor.
NITER_AT_SCALE_1 = 200
#: ``PredictConfig.diameter`` value that estimates each image's diameter from a first run.
AUTO = "auto"
#: With ``diameter="auto"``: estimates after the run at scale 1, each followed by a run at it.
#: A model trained on a narrow range of sizes misjudges cells far outside it (13 px nuclei
#: measured 16-20 px at scale 1); the second estimate, made near its range, corrects most of
#: that (docs/BENCHMARKS.md, learning check).
AUTO_ESTIMATES = 2

# Padding: to a multiple of 16, plus 16 px split over the two sides (Cellpose's get_pad_yx,
# div=16, extra=1). The network does not need it (tiles are 256), but it moves the tile grid
# and the zero border the same way as in Cellpose.
_PAD_DIVISOR = 16
_PAD_EXTRA = 16
# Taper: the weight falls to 1/2 at 20 px from the tile's edge, with a logistic width of 7.5 px.
_TAPER_EDGE = 20
_TAPER_SIGMA = 7.5
# tile_overlap is clipped to this range by Cellpose; here values outside it are refused.
_OVERLAP_RANGE = (0.05, 0.5)


# ------------------------------------------------------------------------------------------------
# Options and results
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PredictConfig:
    """Options of :func:`predict` (the defaults are Cellpose 4's)."""

    diameter: float | Literal["auto"] | None = None
    """Typical cell diameter in pixels; the image is rescaled by 30 / diameter. None: no rescale. auto: estimated per image from the masks of a run at its own scale, then again from those of a run at that estimate."""
    augment: bool = False
    """Test-time augmentation: 50%-overlapping tiles, alternate tiles flipped, outputs averaged."""
    tile_overlap: float = 0.1
    """Fraction of a tile by which neighbouring tiles overlap, in [0.05, 0.5] (not with augment)."""
    batch_size: int = 8
    """Tiles run through the network at once."""
    normalize: bool = True
    """Scale each channel so its 1st percentile is 0 and its 99th is 1 before the network."""
    norm_percentile: tuple[float, float] = (1.0, 99.0)
    """The percentiles normalisation maps to 0 and 1 (Cellpose's norm_percentile)."""
    compute_masks: bool = True
    """Follow the flows to instance masks; False returns flows and cellprob only."""
    niter: int | None = None
    """Euler steps when following flows; None: 200, divided by the rescale factor 30 / diameter."""
    cellprob_threshold: float = 0.0
    """Pixels with a cell-probability logit above this are followed and can be in a mask."""
    flow_threshold: float = 0.4
    """Masks whose flows disagree with the prediction by more than this are dropped; 0 keeps all."""
    min_size: int = 15
    """Masks with fewer pixels are dropped; 0 keeps all."""
    max_size_fraction: float = 0.4
    """Masks larger than this fraction of the image are dropped."""
    exclude_on_edges: bool = False
    """Drop masks that touch the image's border, then renumber (Cellpose's --exclude_on_edges)."""
    do_3d: bool = False
    """Segment a stack as one 3-D volume: the network on its YX, ZY and ZX planes, flows summed."""
    anisotropy: float | None = None
    """With do_3d: Z is rescaled by this first (2.0 when Z is sampled half as densely as X and Y)."""
    flow3d_smooth: float = 0.0
    """With do_3d: the standard deviation of a Gaussian smoothing the 3-D flows; 0: none."""
    stitch_threshold: float = 0.0
    """Segment a stack plane by plane and link masks of neighbouring planes with IoU above this; 0: off."""

    def __post_init__(self) -> None:
        if self.diameter not in (None, AUTO) and not (
            _is_real(self.diameter) and math.isfinite(self.diameter) and self.diameter > 0
        ):
            raise ValueError(
                f"diameter must be a cell diameter in pixels (> 0) or {AUTO!r}; got "
                f"{self.diameter!r}. Leave it unset (None) for no rescale."
            )
        low, high = _OVERLAP_RANGE
        if not (_is_real(self.tile_overlap) and low <= self.tile_overlap <= high):
            raise ValueError(
                f"tile_overlap must be in [{low}, {high}] (Cellpose's range); "
                f"got {self.tile_overlap!r}"
            )
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1; got {self.batch_size!r}")
        if self.niter is not None and (not _is_int(self.niter) or self.niter < 1):
            raise ValueError(
                f"niter must be an integer >= 1, or None for 200 / rescale; got {self.niter!r}"
            )
        bounds = self.norm_percentile
        if not (
            isinstance(bounds, tuple) and len(bounds) == 2 and all(map(_is_real, bounds))
            and 0 <= bounds[0] < bounds[1] <= 100
        ):
            raise ValueError(
                f"norm_percentile must be (low, high) with 0 <= low < high <= 100; got "
                f"{self.norm_percentile!r}"
            )
        for name in ("augment", "normalize", "compute_masks", "exclude_on_edges"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}")
        # flows_to_masks checks the mask options again; checking here fails before any compute.
        if not _is_int(self.min_size):
            raise TypeError(f"min_size must be an integer; got {self.min_size!r}")
        for name in ("cellprob_threshold", "flow_threshold", "max_size_fraction"):
            if not (_is_real(getattr(self, name)) and math.isfinite(getattr(self, name))):
                raise TypeError(f"{name} must be a finite number; got {getattr(self, name)!r}")
        if self.flow_threshold < 0:
            raise ValueError(
                f"flow_threshold must be >= 0 (0 keeps all masks); got {self.flow_threshold}"
            )
        if self.max_size_fraction <= 0:
            raise ValueError(f"max_size_fraction must be > 0; got {self.max_size_fraction}")
        if not isinstance(self.do_3d, bool):
            raise TypeError(f"do_3d must be True or False; got {self.do_3d!r}")
        if self.anisotropy is not None and not (_is_real(self.anisotropy) and self.anisotropy > 0):
            raise ValueError(f"anisotropy must be > 0 (or None for 1); got {self.anisotropy!r}")
        for name in ("flow3d_smooth", "stitch_threshold"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a number >= 0 (0: off); got {value!r}")
        if self.do_3d and self.stitch_threshold > 0:
            raise ValueError(
                "do_3d and stitch_threshold are two ways to segment a volume; pick one "
                "(stitch_threshold=0 for the 3-D flows, do_3d=False to stitch 2-D masks)"
            )
        if self.volume and self.diameter == AUTO:
            raise ValueError(
                "diameter='auto' is for 2-D images; give a volume's cell diameter in pixels "
                "(or none)"
            )

    @property
    def volume(self) -> bool:
        """Whether an image is a volume segmented in 3-D (do_3d or stitch_threshold > 0)."""
        return self.do_3d or self.stitch_threshold > 0

    @property
    def rescale(self) -> float:
        """Factor applied to the image before the network: 30 / diameter (1 without diameter)."""
        if self.diameter == AUTO:
            raise ValueError("diameter='auto' has no fixed rescale: it is estimated per image")
        return 1.0 if self.diameter is None else DIAMETER_MEAN / float(self.diameter)

    @property
    def niter_masks(self) -> int:
        """Euler steps used for the masks: ``niter``, or int(200 / rescale) as Cellpose."""
        return self.niter if self.niter is not None else int(NITER_AT_SCALE_1 / self.rescale)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class Prediction(NamedTuple):
    """What :func:`predict` returns for one image of size (H, W) or a volume (Z, Y, X)."""

    masks: np.ndarray | None
    """(H, W) or (Z, Y, X) uint16 (uint32 past 65,535 masks), 0 = background; None if compute_masks=False."""
    flows: np.ndarray
    """(2, H, W) float32 dP = (dy, dx), 5 x unit flows as the network outputs them; (3, Z, Y, X) (dz, dy, dx) with do_3d, (2, Z, Y, X) per plane with stitch_threshold."""
    cellprob: np.ndarray
    """(H, W) or (Z, Y, X) float32 cell-probability logits (the sum of three with do_3d)."""
    diameter: float | None = None
    """The diameter the image was rescaled by (given, or estimated with ``"auto"``); None: none."""


# ------------------------------------------------------------------------------------------------
# Geometry (pure functions, compared with Cellpose's in the tests)
# ------------------------------------------------------------------------------------------------


def pad_widths(length: int, tile_size: int = TILE_SIZE) -> tuple[int, int]:
    """Zeros added before and after an axis of ``length`` pixels (Cellpose's ``get_pad_yx``).

    An axis of at least ``tile_size`` is padded to the next multiple of 16, plus 8 on each
    side; a shorter one to ``max(tile_size, length + 16)``. Odd remainders go after.

    >>> pad_widths(100), pad_widths(250), pad_widths(300)
    ((78, 78), (8, 8), (10, 10))
    """
    if length < 1:
        raise ValueError(f"length must be >= 1; got {length}")
    if length >= tile_size:
        extra = _PAD_DIVISOR * math.ceil(length / _PAD_DIVISOR) - length
    else:
        extra = max(0, tile_size - length - _PAD_EXTRA)
    before = _PAD_EXTRA // 2 + extra // 2
    return before, _PAD_EXTRA // 2 + extra - extra // 2


def tile_starts(
    length: int, tile_size: int = TILE_SIZE, tile_overlap: float = 0.1, augment: bool = False
) -> np.ndarray:
    """Start of each tile along a padded axis of ``length >= tile_size`` pixels (int64).

    ``ceil((1 + 2 * tile_overlap) * length / tile_size)`` tiles (1 if the axis fits one tile),
    or ``max(2, ceil(2 * length / tile_size))`` with ``augment``, evenly spaced from 0 to
    ``length - tile_size`` and truncated to integers, as Cellpose's ``make_tiles``.

    >>> tile_starts(512).tolist(), tile_starts(256, augment=True).tolist()
    ([0, 128, 256], [0, 0])
    """
    if length < tile_size:
        raise ValueError(f"length must be >= tile_size ({tile_size}) after padding; got {length}")
    if augment:
        n_tiles = max(2, math.ceil(2.0 * length / tile_size))
    elif length <= tile_size:
        n_tiles = 1
    else:
        n_tiles = math.ceil((1.0 + 2 * tile_overlap) * length / tile_size)
    return np.linspace(0, length - tile_size, n_tiles).astype(np.int64)


def tile_grid(
    padded_shape: tuple[int, int],
    tile_size: int = TILE_SIZE,
    tile_overlap: float = 0.1,
    augment: bool = False,
) -> list[tuple[int, int, bool, bool]]:
    """Tiles of a padded (Hp, Wp) image as (y0, x0, flip_y, flip_x), row by row.

    Without ``augment`` nothing is flipped. With it, tile (j, i) of the grid (j down, i across)
    is flipped in y when j is even and i odd, in x when j is odd and i even, and in both when
    both are odd (Cellpose's ``make_tiles`` / ``unaugment_tiles``).

    >>> tile_grid((256, 300), augment=True)[:4]
    [(0, 0, False, False), (0, 22, True, False), (0, 44, False, False), (0, 0, False, True)]
    """
    y_starts = tile_starts(padded_shape[0], tile_size, tile_overlap, augment)
    x_starts = tile_starts(padded_shape[1], tile_size, tile_overlap, augment)
    grid = []
    for j, y0 in enumerate(y_starts):
        for i, x0 in enumerate(x_starts):
            # Cellpose's rule (y flipped on odd columns, x on odd rows) reduces to this.
            grid.append((int(y0), int(x0), augment and i % 2 == 1, augment and j % 2 == 1))
    return grid


def taper_weights(tile_size: int = TILE_SIZE) -> np.ndarray:
    """(tile_size, tile_size) float64 blending weight of a tile (Cellpose's ``_taper_mask``).

    Separable: ``w(i) = 1 / (1 + exp((|i - (tile_size - 1) / 2| - (tile_size / 2 - 20)) / 7.5))``
    per axis, so a tile's outer ~20 px fade out and overlapping tiles hand over smoothly.

    >>> w = taper_weights()
    >>> round(float(w[128, 128]), 4), round(float(w[0, 128]), 4)
    (1.0, 0.0691)
    """
    distance = np.abs(np.arange(tile_size) - (tile_size - 1) / 2)
    profile = 1.0 / (1.0 + np.exp((distance - (tile_size / 2 - _TAPER_EDGE)) / _TAPER_SIGMA))
    return profile[:, np.newaxis] * profile[np.newaxis, :]


def scaled_size(height: int, width: int, rescale: float) -> tuple[int, int]:
    """(H, W) after a diameter rescale: ``int(side * rescale)``, as Cellpose's ``resize_image``.

    >>> scaled_size(300, 200, 30 / 45)
    (200, 133)
    """
    if rescale == 1.0:
        return height, width
    return int(height * rescale), int(width * rescale)


# ------------------------------------------------------------------------------------------------
# Running the network: one image, several, a stream
# ------------------------------------------------------------------------------------------------


class Skip(NamedTuple):
    """In place of an image in :func:`predict_stream`: an item that needs no network.

    The stream yields ``value`` for it, in its place in the order (e.g. the summary row of a
    file whose outputs exist).
    """

    value: Any


def predict(
    model: torch.nn.Module, image: np.ndarray, cfg: PredictConfig = PredictConfig()
) -> Prediction:
    """Flows, cell probability and instance masks for one 2-D image of any size.

    Parameters
    ----------
    model : torch.nn.Module
        Maps (B, C, 256, 256) float tensors to (B, 3, 256, 256) = (dy, dx, cellprob logit), e.g.
        ``pipeline.model.CPSAM`` from :func:`load_model`. Runs on the model's device in the
        dtype of its parameters (float32 for a model without parameters); it is put in eval
        mode for the call and restored after.
    image : np.ndarray
        (H, W) or (H, W, C), 1 <= C <= 3, bool, integer or float, e.g. from
        ``pipeline.io.read_image``. Raw intensities when ``cfg.normalize`` (the default).
    cfg : PredictConfig
        Options; see :class:`PredictConfig`.

    Returns
    -------
    Prediction
        ``masks`` (H, W) uint16/uint32 or None, ``flows`` (2, H, W) float32, ``cellprob``
        (H, W) float32.

    With ``cfg.do_3d`` or ``cfg.stitch_threshold`` the image is a volume (Z, Y, X) or
    (Z, Y, X, C): see :func:`predict_volume`.
    """
    if cfg.volume:
        return predict_volume(model, image, cfg)
    return next(predict_many(model, [image], cfg, pool=False, overlap=False))


def predict_volume(
    model: torch.nn.Module, volume: np.ndarray, cfg: PredictConfig = PredictConfig(do_3d=True)
) -> Prediction:
    """Masks of a (Z, Y, X) or (Z, Y, X, C) volume, as Cellpose 4's ``eval(do_3D=True)``.

    The volume is normalised as a whole (Cellpose's ``norm3D``). With ``cfg.do_3d``: Z is
    rescaled by ``anisotropy`` and the volume by 30 / diameter (trilinear, as Cellpose's
    separable ``resize_image_3d``); the network runs on every YX, ZY and ZX plane (the tiles of
    the planes of one orientation batched together); the matching flow components and the three
    cellprob maps are summed (``core.run_3D``) and resized back; ``flow3d_smooth`` smooths the
    flows; :func:`infer.dynamics.flows_to_masks` follows the (3, Z, Y, X) flows (no flow-error
    check in 3-D). With ``cfg.stitch_threshold``: 2-D masks per plane (no size filter), linked
    across planes by IoU (:func:`stitch_planes`), then holes filled and small masks dropped in
    3-D (Cellpose's ``stitch3D`` and ``fill_holes_and_remove_small_masks``).
    """
    if not cfg.volume:
        raise ValueError("predict_volume needs cfg.do_3d=True or cfg.stitch_threshold > 0")
    volume = _checked_volume(volume)
    if cfg.normalize:
        depth, height, width, n_channels = volume.shape
        flat = volume.reshape(depth * height, width, n_channels)  # percentiles of the whole volume
        volume = normalize_percentile(flat, *cfg.norm_percentile).reshape(volume.shape)
    device, _ = _device_and_dtype(model)
    image = _network_input(volume.reshape(-1, *volume.shape[2:]), _RAW, device)
    image = image.reshape(image.shape[0], *volume.shape[:3])  # (C, Z, Y, X)
    if cfg.stitch_threshold > 0:
        return _stitched_volume(model, image, cfg)
    flows, cellprob = _flows_3d(model, image, cfg)
    if cfg.flow3d_smooth > 0:
        flows = scipy.ndimage.gaussian_filter(flows, [0] + [cfg.flow3d_smooth] * 3)
    masks = None
    if cfg.compute_masks:
        masks = _masks(flows, cellprob, cfg)
    diameter = None if cfg.diameter is None else float(cfg.diameter)
    return Prediction(masks=masks, flows=flows, cellprob=cellprob, diameter=diameter)


def predict_many(
    model: torch.nn.Module,
    images: Iterable[np.ndarray],
    cfg: PredictConfig = PredictConfig(),
    *,
    pool: bool | None = None,
    overlap: bool | None = None,
) -> Iterator[Prediction]:
    """:func:`predict` for each image in turn, lazily; on a GPU, tiles of images pooled.

    The same results as calling :func:`predict` on each image (to float rounding: batches are
    composed differently), in the same order. With ``pool`` the tiles of consecutive images
    share network calls: a folder of 256 x 256 images (4 tiles each) runs ``cfg.batch_size``
    tiles per call instead of 4 (Cellpose 4 runs each image's tiles on their own: users'
    complaint #1460 in paper.md section 4). With ``overlap`` the masks of an image are followed
    in a worker thread while the network runs on the next ones. Both default to on for a GPU
    and off on a CPU, where the network's cost per tile does not fall with the batch (it rose
    from 4 to 8 tiles with the tiny model) and the mask step would compete with it for the same
    cores (docs/BENCHMARKS.md). The first image that fails raises; see :func:`predict_stream`
    to go on.
    """
    for _, result in predict_stream(model, enumerate(images), cfg, pool=pool, overlap=overlap):
        if isinstance(result, BaseException):
            raise result
        yield result


def predict_stream(
    model: torch.nn.Module,
    items: Iterable[tuple[Any, np.ndarray | BaseException | Skip] | tuple[Any, np.ndarray, PredictConfig]],
    cfg: PredictConfig = PredictConfig(),
    *,
    pool: bool | None = None,
    overlap: bool | None = None,
    then: Callable[[Any, Prediction], Any] | None = None,
    on_tiles: Callable[[int, int], None] | None = None,
) -> Iterator[tuple[Any, Any]]:
    """:func:`predict_many` for ``(key, image)`` pairs, each failure kept to its own image.

    An item may also be ``(key, image, image_cfg)``: that image is predicted with ``image_cfg``
    (its own diameter, say; a single-scale config), the stream's batching with ``cfg``'s.

    Yields ``(key, result)`` in the order of ``items``: ``result`` is the image's
    :class:`Prediction`, or ``then(key, prediction)`` when ``then`` is given (it runs where the
    masks do, so that writing files also overlaps the network), or the exception that stopped
    this image. An item whose image is an exception (e.g. the file could not be read) is passed
    through in its place, and so is the value of a :class:`Skip`. A network call that fails is
    retried image by image, so only the images that fail on their own fail. ``pool`` and
    ``overlap`` as in :func:`predict_many`. ``on_tiles(n_run, n_planned)`` is called after each
    network call with the tiles run and planned so far (progress for large images).

    The stream is three stages composed in :func:`_stream` (prepare each image, run the tiles
    in batches, masks and ``then``), each passing on one ``_Work`` record per item; with
    ``diameter="auto"`` it runs once per scale, each run fed by the one before
    (:func:`_auto_runs`). Images are pulled from ``items`` as the tile pool needs them, so at
    most about ``cfg.batch_size`` images, plus :data:`_MAX_MASKS_AHEAD` waiting for their masks,
    are held (up to three times that with ``diameter="auto"``).
    """
    device, _ = _device_and_dtype(model)
    options = _StreamOptions(
        batch_size=cfg.batch_size,
        pool=device.type == "cuda" if pool is None else pool,
        overlap=device.type == "cuda" if overlap is None else overlap,
        on_tiles=on_tiles,
    )
    if cfg.volume:
        yield from _volumes(model, items, cfg, then)
    elif cfg.diameter == AUTO:
        yield from _auto_runs(model, items, cfg, options, then)
    else:
        # An item may carry a config of its own (key, image, config), e.g. its own diameter.
        yield from _stream(model, ((item[0], item[1], item[2] if len(item) > 2 else cfg) for item in items),
                           options, then)


def _volumes(model, items, cfg: PredictConfig, then) -> Iterator[tuple[Any, Any]]:
    """:func:`predict_stream` over volumes: each one on its own (its planes batch together)."""
    for key, volume in items:
        work = _prepared(model, key, volume, cfg, None, plan=False)
        if work.cfg is not None:  # not finished already (failed, skipped, given)
            try:
                work.prediction = predict_volume(model, volume, cfg)
            except Exception as error:  # noqa: BLE001 -- this volume fails, the others go on
                work.error = error
        yield key, _result(work, then)


def estimate_diameter(masks: np.ndarray) -> float | None:
    """The diameter ``diameter="auto"`` rescales by: Cellpose's median mask diameter, at least 5 px.

    None when ``masks`` has no mask (there is nothing to measure; the image is not rescaled).
    """
    diameter = cellpose_diameter(masks)
    return None if diameter == 0 else max(diameter, MIN_DIAMETER)  # the trainer's floor too


def predict_tiles(
    model: torch.nn.Module, image: torch.Tensor, cfg: PredictConfig = PredictConfig()
) -> torch.Tensor:
    """Network output for a normalised (C, H, W) float tensor: steps 3-7 of the module notes.

    ``image`` is used as is (no normalisation); channels are zero-padded to the model's input
    channels. Returns (3, H, W) float32 (dy, dx, cellprob) on the model's device. Uses
    ``cfg.diameter``, ``cfg.augment``, ``cfg.tile_overlap`` and ``cfg.batch_size``.
    """
    work = _Work(key=None, cfg=cfg, plan=_plan(model, image, cfg))
    options = _StreamOptions(batch_size=cfg.batch_size, pool=False, overlap=False)
    (work,) = _run_tiles(model, [work], options)
    if work.error is not None:
        raise work.error
    return work.output


# At most this many images wait for (or are in) the mask worker before the network waits for it:
# it bounds the memory held by finished network outputs (3 x H x W float32 each).
_MAX_MASKS_AHEAD = 2


@dataclass(frozen=True)
class _StreamOptions:
    """How a stream runs (the same for every image in it)."""

    batch_size: int  # tiles per network call
    pool: bool  # tiles of consecutive images share network calls
    overlap: bool  # masks and ``then`` in a worker thread while the network runs on
    on_tiles: Callable[[int, int], None] | None = None  # progress: (tiles run, tiles planned)


@dataclass(eq=False)
class _Plan:
    """One image's network input and tile grid, and the running blend of its tile outputs."""

    padded: torch.Tensor  # (C, H + pad, W + pad), on the model's device
    grid: list[tuple[int, int, bool, bool]]  # (y0, x0, flip_y, flip_x) per tile
    crop: tuple[int, int, int, int]  # top, left, height, width of the image in ``padded``
    size: tuple[int, int]  # (H, W) to return: the size before a diameter rescale
    summed: torch.Tensor | None = None  # (3, ...) taper-weighted sum of the tile outputs
    weights: torch.Tensor | None = None  # summed taper
    tiles_left: int = 0


@dataclass(eq=False)
class _Work:
    """One item on its way through :func:`_stream`; each stage fills in what it produces.

    It is finished once it has an ``error``, a ``prediction`` or a ``skipped`` value; an item
    still needing the network has a ``plan`` until its last tile is blended into ``output``.
    """

    key: Any
    cfg: PredictConfig | None = None  # options of its network run (None: no run)
    plan: _Plan | None = None  # while its tiles are in the network
    output: torch.Tensor | None = None  # (3, H, W) float32 network output, once blended
    prediction: Prediction | None = None  # given (settled by an earlier "auto" run) or made
    error: BaseException | None = None  # what stopped it
    skipped: Skip | None = None  # passed through as its value


def _stream(
    model: torch.nn.Module,
    items: Iterable[tuple[Any, Any, PredictConfig]],
    options: _StreamOptions,
    then: Callable[[Any, Prediction], Any] | None,
) -> Iterator[tuple[Any, Any]]:
    """One run over ``(key, image, cfg)`` items: prepare -> network -> masks and ``then``.

    An item's image may also be an exception (passed through as its result), a :class:`Skip`
    (its value passed through) or a finished :class:`Prediction` (it only goes through
    ``then``).
    """
    device, _ = _device_and_dtype(model)
    works = (_prepared(model, key, image, cfg, device) for key, image, cfg in items)
    return _finished(_run_tiles(model, works, options), options, then)


def _prepared(model, key, image, cfg: PredictConfig, device: torch.device | None, plan: bool = True) -> _Work:
    """Stage 1, steps 1-5: a work with its plan, or finished (skipped, given, failed)."""
    if isinstance(image, BaseException):
        return _Work(key, error=image)
    if isinstance(image, Skip):
        return _Work(key, skipped=image)
    if isinstance(image, Prediction):
        return _Work(key, prediction=image)
    if not plan:
        return _Work(key, cfg=cfg)
    try:
        return _Work(key, cfg=cfg, plan=_plan(model, _network_input(image, cfg, device), cfg))
    except Exception as error:  # noqa: BLE001 -- this image fails, the others go on
        return _Work(key, error=error)


def _run_tiles(model: torch.nn.Module, works: Iterable[_Work], options: _StreamOptions) -> Iterator[_Work]:
    """Stage 2, steps 6-7, the batcher: planned tiles -> blended network outputs, in order.

    Runs the tiles of consecutive works ``options.batch_size`` at a time and yields each work,
    in the order given, once it is finished or its last tile is blended (``work.output``). A
    network call that fails on tiles of several images is retried image by image, so only
    the images whose own tiles fail get its exception (their other tiles are then dropped).
    Works are pulled only while fewer than a batch of tiles waits; without ``options.pool`` a
    batch never spans two images.
    """
    size = _tile_size(model)
    device, dtype = _device_and_dtype(model)
    taper = torch.from_numpy(taper_weights(size)).to(device=device, dtype=torch.float32)
    works = iter(works)
    in_order: deque[_Work] = deque()  # pulled, not yet yielded
    tiles: deque[tuple[_Work, int]] = deque()  # (work, tile index) not yet run
    n_run = n_planned = 0
    exhausted = False
    with _eval_mode(model):
        while True:
            while not exhausted and len(tiles) < options.batch_size and (options.pool or not tiles):
                work = next(works, None)
                if work is None:
                    exhausted = True
                    break
                in_order.append(work)
                if work.plan is not None:
                    tiles.extend((work, index) for index in range(len(work.plan.grid)))
                    n_planned += len(work.plan.grid)
            if tiles:
                batch = [tiles.popleft() for _ in range(min(options.batch_size, len(tiles)))]
                _run_batch_or_each(model, batch, taper, size, dtype)
                while tiles and tiles[0][0].error is not None:  # a failed image's later tiles
                    tiles.popleft()
                n_run += len(batch)
                if options.on_tiles is not None:
                    options.on_tiles(n_run, n_planned)
            while in_order and in_order[0].plan is None:
                yield in_order.popleft()
            if exhausted and not tiles and not in_order:
                return


def _run_batch_or_each(model, batch: list[tuple[_Work, int]], taper, size: int, dtype) -> None:
    """Run a batch; if it fails with several images in it, each image's tiles on their own.

    A work whose tiles fail gets the error and loses its plan; one whose last tile is blended
    gets its output and loses its plan.
    """
    owners = list(dict.fromkeys(work for work, _ in batch))  # in order, once each
    error = _run_batch(model, batch, taper, size, dtype)
    if error is not None and len(owners) == 1:
        owners[0].error = error
    elif error is not None:
        # Retry each image's tiles on their own, so that one image (too large, or whatever the
        # model refuses) does not fail the others it was pooled with.
        for work in owners:
            own_error = _run_batch(model, [t for t in batch if t[0] is work], taper, size, dtype)
            if own_error is not None:
                work.error = own_error
    for work in owners:
        if work.error is not None:
            work.plan = None
        elif work.plan.tiles_left == 0:
            work.output, work.plan = _blended(work.plan), None


def _finished(works: Iterable[_Work], options: _StreamOptions, then) -> Iterator[tuple[Any, Any]]:
    """Stage 3, step 8: ``(key, result)`` per work in order; masks and ``then`` maybe in a thread.

    With ``options.overlap`` a worker follows the flows (and runs ``then``) while the stages
    before go on; at most :data:`_MAX_MASKS_AHEAD` works wait for it before the network does.
    """
    if not options.overlap:
        for work in works:
            yield work.key, _result(work, then)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="masks") as worker:
        waiting: deque[tuple[Any, Future]] = deque()  # in order
        for work in works:
            waiting.append((work.key, worker.submit(_result, work, then)))
            while waiting and (waiting[0][1].done() or len(waiting) > _MAX_MASKS_AHEAD):
                key, future = waiting.popleft()
                yield key, future.result()
        for key, future in waiting:
            yield key, future.result()


def _result(work: _Work, then) -> Any:
    """What the stream yields for a work: its masks made and ``then`` run; never raises."""
    if work.error is not None:
        return work.error
    if work.skipped is not None:
        return work.skipped.value
    try:
        if work.prediction is None:
            work.prediction = _with_masks(work.output, work.cfg)
            work.output = None
        return work.prediction if then is None else then(work.key, work.prediction)
    except Exception as error:  # noqa: BLE001 -- reported as this image's result
        return error


def _auto_runs(model, items, cfg: PredictConfig, options: _StreamOptions, then) -> Iterator[tuple[Any, Any]]:
    """``diameter="auto"``: a run at scale 1, then one at each of :data:`AUTO_ESTIMATES` estimates.

    A loop of single-scale runs (:func:`_stream`), each fed lazily by the one before: an item's
    key carries its image to the next run, which takes it at the diameter its masks give; an
    item with no masks to measure (or a failure) is settled and passed on as it is. The runs
    before the last always compute masks (the next estimate needs them).
    """
    first = dataclasses.replace(cfg, diameter=None, compute_masks=True)
    results = _stream(model, (((key, image), image, first) for key, image in items), options, None)
    for run in range(1, AUTO_ESTIMATES + 1):
        last = run == AUTO_ESTIMATES
        results = _stream(model, _next_run(results, cfg, last), options, then if last else None)
    return results


def _next_run(results, cfg: PredictConfig, last: bool) -> Iterator[tuple[Any, Any, PredictConfig | None]]:
    """The items of the next ``auto`` run from the results of the one before."""
    for (key, image), result in results:
        item_key = key if last else (key, image)
        estimate = estimate_diameter(result.masks) if isinstance(result, Prediction) else None
        if estimate is not None:
            compute_masks = cfg.compute_masks or not last
            yield item_key, image, dataclasses.replace(cfg, diameter=estimate, compute_masks=compute_masks)
        elif last and isinstance(result, Prediction) and not cfg.compute_masks:
            yield item_key, result._replace(masks=None), None
        else:
            yield item_key, result, None  # settled: a failure, or a run without masks


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, its training flag restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _network_input(image, cfg: PredictConfig, device: torch.device) -> torch.Tensor:
    """Steps 1-2: a checked, normalised (C, H, W) float32 tensor on ``device``."""
    image = _checked_image(image)
    if cfg.normalize:
        image = normalize_percentile(image, *cfg.norm_percentile)
    image = np.ascontiguousarray(image, dtype=np.float32)
    n_bad = image.size - np.count_nonzero(np.isfinite(image))
    if n_bad:
        raise ValueError(
            f"image has {n_bad} non-finite pixels (NaN or inf); replace them (e.g. np.nan_to_num) "
            "before predicting"
        )
    return torch.from_numpy(image).to(device).permute(2, 0, 1)


def _plan(model: torch.nn.Module, image: torch.Tensor, cfg: PredictConfig) -> _Plan:
    """Steps 3-5 for a (C, H, W) float tensor: channels, rescale, pad and the tile grid."""
    if image.ndim != 3 or not image.is_floating_point():
        raise ValueError(
            f"image must be a float (C, H, W) tensor; got {image.dtype} {tuple(image.shape)}"
        )
    device, _ = _device_and_dtype(model)
    image = _pad_channels(image.to(device=device, dtype=torch.float32), _input_channels(model))
    height, width = image.shape[-2:]
    size = scaled_size(height, width, cfg.rescale)
    if min(size) < 1:
        raise ValueError(
            f"diameter {cfg.diameter} shrinks the {height}x{width} image to {size}; pass the "
            "cell diameter in pixels of this image (or no diameter)"
        )
    if size != (height, width):
        image = _resize(image, size)
    tile = _tile_size(model)
    rows, cols = size
    (top, bottom), (left, right) = pad_widths(rows, tile), pad_widths(cols, tile)
    padded = F.pad(image, (left, right, top, bottom))
    grid = tile_grid(tuple(padded.shape[-2:]), tile, cfg.tile_overlap, cfg.augment)
    return _Plan(padded, grid, (top, left, rows, cols), (height, width), tiles_left=len(grid))


def _run_batch(model, batch: list[tuple[_Work, int]], taper, size: int, dtype) -> BaseException | None:
    """Run tiles through the network and blend them in; the exception instead, nothing blended."""
    try:
        with torch.inference_mode():
            tiles = torch.stack([_cut(work.plan, index, size) for work, index in batch])
            outputs = _checked_output(model(tiles.to(dtype)), len(batch), size).float()
    except Exception as error:  # noqa: BLE001 -- the caller decides whose images fail
        return error
    with torch.inference_mode():
        for (work, index), tile_output in zip(batch, outputs):
            _blend(work.plan, index, tile_output, taper, size)
    return None


def _cut(plan: _Plan, index: int, size: int) -> torch.Tensor:
    y0, x0, flip_y, flip_x = plan.grid[index]
    return _flip(plan.padded[:, y0 : y0 + size, x0 : x0 + size], flip_y, flip_x)


def _blend(plan: _Plan, index: int, tile_output: torch.Tensor, taper: torch.Tensor, size: int) -> None:
    """Add one tile's un-flipped, tapered output into its plan's running sums."""
    if plan.summed is None:
        plan.summed = torch.zeros((3, *plan.padded.shape[-2:]), dtype=torch.float32, device=taper.device)
        plan.weights = torch.zeros(plan.padded.shape[-2:], dtype=torch.float32, device=taper.device)
    y0, x0, flip_y, flip_x = plan.grid[index]
    plan.summed[:, y0 : y0 + size, x0 : x0 + size] += _unflip_flows(tile_output, flip_y, flip_x) * taper
    plan.weights[y0 : y0 + size, x0 : x0 + size] += taper
    plan.tiles_left -= 1


def _blended(plan: _Plan) -> torch.Tensor:
    """The plan's (3, H, W) output: blend, crop the padding, resize back after a rescale."""
    # Every pixel is covered by at least one tile, and the taper is > 0 everywhere.
    blended = plan.summed / plan.weights
    top, left, rows, cols = plan.crop
    output = blended[:, top : top + rows, left : left + cols].contiguous()
    if (rows, cols) != plan.size:
        output = _resize(output, plan.size)
    plan.padded = plan.summed = plan.weights = None  # free them while the plan is still referenced
    return output


def _with_masks(output: torch.Tensor, cfg: PredictConfig) -> Prediction:
    """Step 8 on a (3, H, W) network output."""
    flows = output[:2].cpu().numpy()
    cellprob = output[2].cpu().numpy()
    masks = _masks(flows, cellprob, cfg) if cfg.compute_masks else None
    diameter = None if cfg.diameter is None else float(cfg.diameter)
    return Prediction(masks=masks, flows=flows, cellprob=cellprob, diameter=diameter)


def _masks(flows: np.ndarray, cellprob: np.ndarray, cfg: PredictConfig, min_size: int | None = None) -> np.ndarray:
    """Masks of (2, Y, X) or (3, Z, Y, X) flows with the options of ``cfg``."""
    masks = flows_to_masks(
        flows,
        cellprob,
        niter=cfg.niter_masks,
        cellprob_threshold=cfg.cellprob_threshold,
        flow_threshold=cfg.flow_threshold,
        min_size=cfg.min_size if min_size is None else min_size,
        max_size_fraction=cfg.max_size_fraction,
    )
    return remove_edge_masks(masks) if cfg.exclude_on_edges else masks


# Planes of a volume go through the 2-D path as they are: normalised and rescaled as a volume.
_RAW = PredictConfig(normalize=False)
# The planes of a (C, Z, Y, X) volume along Z, Y and X: (axis of the plane stack, the volume
# axes the network's dy and dx are along), as Cellpose's core.run_3D (YX, ZY, ZX).
_ORIENTATIONS = ((1, (1, 2)), (2, (0, 2)), (3, (0, 1)))


def _flows_3d(model, image: torch.Tensor, cfg: PredictConfig) -> tuple[np.ndarray, np.ndarray]:
    """(3, Z, Y, X) summed flows and (Z, Y, X) summed cellprob of a (C, Z, Y, X) volume."""
    depth, height, width = image.shape[1:]
    anisotropy = 1.0 if cfg.anisotropy is None else float(cfg.anisotropy)
    size = (int(depth * anisotropy * cfg.rescale), *scaled_size(height, width, cfg.rescale))
    if min(size) < 1:
        raise ValueError(
            f"diameter {cfg.diameter} and anisotropy {cfg.anisotropy} shrink the {depth}x{height}x"
            f"{width} volume to {size}; pass the cell diameter in pixels of this volume"
        )
    if size != (depth, height, width):
        image = F.interpolate(image[None], size=size, mode="trilinear", align_corners=False)[0]
    summed = torch.zeros((4, *size), dtype=torch.float32, device=image.device)
    plane_cfg = dataclasses.replace(cfg, diameter=None, do_3d=False, normalize=False)
    for axis, (along_y, along_x) in _ORIENTATIONS:
        planes = image.movedim(axis, 1)  # (C, n, a, b): n planes of a x b
        outputs = _run_planes(model, planes, plane_cfg).movedim(0, 1).movedim(1, axis)
        summed[along_y] += outputs[0]
        summed[along_x] += outputs[1]
        summed[3] += outputs[2]
    if size != (depth, height, width):
        summed = F.interpolate(summed[None], size=(depth, height, width), mode="trilinear", align_corners=False)[0]
    summed = summed.cpu().numpy()
    return summed[:3], summed[3]


def _run_planes(model, planes: torch.Tensor, cfg: PredictConfig) -> torch.Tensor:
    """(n, 3, a, b) network outputs of the n planes of (C, n, a, b), their tiles batched together."""
    works = (_Work(key=i, cfg=cfg, plan=_plan(model, planes[:, i], cfg)) for i in range(planes.shape[1]))
    options = _StreamOptions(batch_size=cfg.batch_size, pool=True, overlap=False)
    outputs = []
    for work in _run_tiles(model, works, options):
        if work.error is not None:
            raise work.error
        outputs.append(work.output)
    return torch.stack(outputs)


def _stitched_volume(model, image: torch.Tensor, cfg: PredictConfig) -> Prediction:
    """2-D masks per plane of a (C, Z, Y, X) volume, stitched across planes by IoU."""
    plane_cfg = dataclasses.replace(cfg, stitch_threshold=0.0, normalize=False)
    flows, cellprobs, masks, diameters = [], [], [], []
    planes = (image[:, z].permute(1, 2, 0).cpu().numpy() for z in range(image.shape[1]))
    options = dict(pool=True, overlap=False)
    for prediction in predict_many(model, planes, dataclasses.replace(plane_cfg, compute_masks=False), **options):
        flows.append(prediction.flows)
        cellprobs.append(prediction.cellprob)
        if cfg.compute_masks:  # Cellpose's min_size is applied after stitching, in 3-D
            masks.append(_masks(prediction.flows, prediction.cellprob, plane_cfg, min_size=0))
    stitched = None
    if cfg.compute_masks:
        stitched = clean_masks(stitch_planes(np.stack(masks), cfg.stitch_threshold), cfg.min_size)
    diameter = None if cfg.diameter is None else float(cfg.diameter)
    return Prediction(masks=stitched, flows=np.stack(flows, axis=1), cellprob=np.stack(cellprobs), diameter=diameter)


def stitch_planes(masks: np.ndarray, threshold: float) -> np.ndarray:
    """Link the 2-D masks of consecutive planes of (Z, Y, X) labels by IoU (Cellpose's ``stitch3D``).

    Plane by plane from the top: a mask of plane z + 1 takes the label of the mask of plane z
    (already linked) with which its IoU is highest, if that IoU is at least ``threshold`` and
    that mask has no better match in plane z + 1; otherwise it gets a new label. Returns
    uint16 labels, uint32 once they pass 65,535.
    """
    masks = np.asarray(masks)
    stitched = np.zeros(masks.shape, dtype=np.uint32)
    stitched[0] = masks[0]
    next_label = int(masks[0].max(initial=0)) + 1
    for z in range(1, masks.shape[0]):
        below, above = masks[z], stitched[z - 1]
        n_below, n_above = int(below.max(initial=0)), int(above.max(initial=0))
        if n_below == 0:
            continue
        new_ids = np.zeros(n_below + 1, dtype=np.uint32)
        if n_above > 0:
            iou = _iou_matrix(below, above, n_below, n_above)[1:, 1:]
            iou[iou < threshold] = 0.0
            iou[iou < iou.max(axis=0)] = 0.0  # each mask above keeps only its best match
            new_ids[1:] = iou.argmax(axis=1) + 1
            unmatched = np.nonzero(iou.max(axis=1) == 0.0)[0]
        else:
            unmatched = np.arange(n_below)
        new_ids[unmatched + 1] = np.arange(next_label, next_label + unmatched.size)
        next_label += unmatched.size
        stitched[z] = new_ids[below]
    return stitched.astype(np.uint16) if next_label <= 2**16 else stitched


def _iou_matrix(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> np.ndarray:
    """(n_a + 1, n_b + 1) IoU of every pair of labels of two label images (0 included)."""
    overlap = np.bincount(
        a.ravel().astype(np.int64) * (n_b + 1) + b.ravel(), minlength=(n_a + 1) * (n_b + 1)
    ).reshape(n_a + 1, n_b + 1)
    union = overlap.sum(axis=1, keepdims=True) + overlap.sum(axis=0, keepdims=True) - overlap
    return overlap / np.maximum(union, 1)


def remove_edge_masks(masks: np.ndarray) -> np.ndarray:
    """``masks`` without the masks that touch the border, renumbered 1..N in label order.

    ``masks``: (Y, X) or (Z, Y, X) unsigned labels, 0 = background.

    Cellpose's ``utils.remove_edge_masks`` (its CLI's ``--exclude_on_edges``); the dtype is kept.

    >>> remove_edge_masks(np.array([[1, 0, 0], [0, 2, 0], [0, 0, 0]], np.uint16)).tolist()
    [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    """
    edge = np.zeros(masks.shape, dtype=bool)
    for axis in range(masks.ndim):
        index = [slice(None)] * masks.ndim
        for end in (0, -1):
            index[axis] = end
            edge[tuple(index)] = True
    n_labels = int(masks.max(initial=0))
    keep = np.bincount(masks.ravel(), minlength=n_labels + 1) > 0  # present labels
    keep[np.unique(masks[edge])] = False
    keep[0] = False
    new_ids = np.zeros(n_labels + 1, dtype=masks.dtype)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_ids[masks]


def _flip(tile: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    dims = [d for d, flip in ((-2, flip_y), (-1, flip_x)) if flip]
    return torch.flip(tile, dims) if dims else tile


def _unflip_flows(output: torch.Tensor, flip_y: bool, flip_x: bool) -> torch.Tensor:
    """Undo a tile's flips on its (3, T, T) output: flip back, negate the flipped flow axes."""
    output = _flip(output, flip_y, flip_x)
    if flip_y or flip_x:
        sign = torch.tensor(
            [-1.0 if flip_y else 1.0, -1.0 if flip_x else 1.0, 1.0], device=output.device
        )
        output = output * sign[:, None, None]
    return output


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (C, H, W) to (C, *size): pixel centres aligned as cv2.INTER_LINEAR."""
    return F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]


def _pad_channels(image: torch.Tensor, n_channels: int) -> torch.Tensor:
    if image.shape[0] > n_channels:
        raise ValueError(
            f"the image has {image.shape[0]} channels but the model takes {n_channels}; pick "
            f"{n_channels} channel(s) (e.g. read_image(..., channels=[...]))"
        )
    if image.shape[0] < n_channels:
        image = F.pad(image, (0, 0, 0, 0, 0, n_channels - image.shape[0]))
    return image


def _input_channels(model: torch.nn.Module) -> int:
    """Channels the model takes: its config's ``in_channels``, else 3 (CP-SAM's)."""
    return int(getattr(getattr(model, "cfg", None), "in_channels", 3))


def _tile_size(model: torch.nn.Module) -> int:
    """Side of the tiles the model takes: its config's ``image_size``, else 256 (CP-SAM's)."""
    return int(getattr(getattr(model, "cfg", None), "image_size", TILE_SIZE))


def _device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    if parameter is None:
        return torch.device("cpu"), torch.float32
    return parameter.device, parameter.dtype


def _checked_output(output, n_tiles: int, tile_size: int = TILE_SIZE) -> torch.Tensor:
    expected = (n_tiles, 3, tile_size, tile_size)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
        got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"the model must return a tensor {expected} = (dy, dx, cellprob) per tile; got {got}"
        )
    return output


def _checked_volume(volume) -> np.ndarray:
    """(Z, Y, X) or (Z, Y, X, C <= 3) numeric array -> (Z, Y, X, C)."""
    if not isinstance(volume, np.ndarray) or volume.dtype.kind not in "biuf":
        what = volume.dtype if isinstance(volume, np.ndarray) else type(volume).__name__
        raise TypeError(f"volume must be a bool, integer or float numpy array; got {what}")
    if volume.ndim == 3:
        volume = volume[..., np.newaxis]
    if volume.ndim != 4 or not 1 <= volume.shape[3] <= 3 or 0 in volume.shape:
        raise ValueError(
            f"a volume must be (Z, Y, X) or (Z, Y, X, C) with 1 <= C <= 3; got shape {volume.shape}. "
            "Read stacks with pipeline.io.read_stack, which returns this layout."
        )
    return volume


def _checked_image(image) -> np.ndarray:
    """(H, W) or (H, W, C <= 3) numeric array -> (H, W, C)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image must be a numpy array (H, W) or (H, W, C); got {type(image).__name__}"
        )
    if image.dtype.kind not in "biuf":
        raise TypeError(f"image must be bool, integer or float; got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, np.newaxis]
    if image.ndim != 3 or not 1 <= image.shape[2] <= 3 or 0 in image.shape:
        raise ValueError(
            f"image must be (H, W) or (H, W, C) with 1 <= C <= 3, channels last; got shape "
            f"{image.shape}. Read files with pipeline.io.read_image, which returns this layout."
        )
    return image


# ------------------------------------------------------------------------------------------------
# Loading weights
# ------------------------------------------------------------------------------------------------


def load_model(
    path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> torch.nn.Module:
    """A CP-SAM model, in eval mode, from a weights file in Cellpose's cpsam layout.

    Parameters
    ----------
    path : str or Path
        Either the trainer's export (``model_cellpose.pt``) with its ``<stem>.json`` beside it
        (``{"model": ModelConfig fields, "step": n}``; the model is built from that config, so
        tiny and vit_b exports load), or an official Cellpose-SAM file (``cpsam``, no json: a
        ViT-L). Read by ``pipeline.weights.read_export``, which owns the format.
    device : str or torch.device, optional
        Default: ``cuda`` when available, else ``cpu``.
    dtype : torch.dtype, optional
        Default: :func:`default_dtype` of the device (bfloat16 where the hardware computes it,
        as Cellpose's default; float32 elsewhere).

    On a CPU the attention's relative-position bias is passed to the kernel as a mask
    (``pipeline.model.set_bias_as_mask``), the faster of the two exact forms there.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If ``path`` is a folder (e.g. a training checkpoint: export it first) or not a
        Cellpose-layout state dict.
    """
    model, sidecar = read_export(path)
    if sidecar is None:
        log.info("loaded %s (%s, Cellpose layout, no %s)", path, model.cfg.encoder, sidecar_path(path).name)
    else:
        log.info("loaded %s (%s, config from %s)", path, model.cfg.encoder, sidecar_path(path).name)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = default_dtype(device)
    # Inference on a CPU: the relative-position bias as an (N, N) mask beats the extended query
    # and key, which double ViT-L's attention width (64 -> 128) for the sake of GPU kernels that
    # take no mask: ViT-L bf16, 4 tiles, 10.3 s against 11.9 s (Cellpose's own attention
    # 10.2 s); the tiny model 0.091 s against 0.114 s (docs/BENCHMARKS.md, inference).
    set_bias_as_mask(model, device.type == "cpu")
    return model.to(device=device, dtype=dtype).eval()


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The inference dtype for ``device``: bfloat16 where the hardware computes it, else float32.

    Cellpose 4 runs its network in bfloat16 by default on every device (``use_bfloat16=True``;
    paper.md 3d: about 20% faster on a GPU). On a CPU that holds only where the processor has
    bfloat16 matrix instructions (x86 AVX512-BF16 or AMX): there ViT-L runs 1.75x faster than in
    float32 (docs/BENCHMARKS.md, inference). Without them bfloat16 products are emulated and
    there is no such gain to expect (not measured here: this project's CPU has AVX512-BF16), so
    those CPUs keep float32.
    """
    device = torch.device(device)
    native = device.type == "cuda" or (device.type == "cpu" and _cpu_has_bf16())
    return torch.bfloat16 if native else torch.float32


def _cpu_has_bf16() -> bool:
    # torch.cpu's feature probes (cpuinfo); private, hence the fallback to "no" if they move.
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
