"""GPU-side augmentation: a pure function from a device ``Batch`` to the network's inputs and targets.

``augment(batch, cfg, generator)`` runs these stages on ``batch.images.device``, batched over the
samples (no Python loop over samples), with every random number drawn from ``generator``:

1. **Normalise** each sample and channel to its 1st-99th percentiles over the sample's valid
   pixels (padding excluded); padding and flat channels become 0 (``pipeline.io.normalize_percentile``'s
   rule: a channel whose percentile range is <= 1e-3 is flat).
2. **Warp** (paper.md 1c/1d, Cellpose's ``random_rotate_and_resize``): one affine map per sample,
   resampled once into the ``crop_size`` output: rescale by ``30 / max(diameter, 5)``, zoom
   ``2**U(zoom_log2_range)``, horizontal flip (p 0.5, applied first), rotation U(-180, 180) deg
   about the image centre, and a random shift of the crop centre within the range where the
   (unrotated) scaled image covers the crop (none if it is smaller: it is then centred on zero
   fill). Images and flows are bilinear with zero fill; the cellprob target is ``labels > 0``
   warped bilinearly then ``> 0.5``; labels and the ignore mask are nearest-neighbour. The flow
   *vectors* are mapped by the same flip and rotation so they stay the flows of the warped labels.
3. **Channels and inversion** (paper.md 1d), on the normalised image, before the degradations so
   that shot noise hits the bright parts of the image the network will see:
   with p ``channel_drop_prob`` the ``channel_drop_mode`` operation, a uniformly random
   permutation of all three channels, then with p ``invert_prob`` x -> 1 - x.
4. **Degradations** on a ``degrade_prob`` fraction of the samples (Cellpose3's ``denoise.add_noise``
   with its default ranges): blur, downsampling and Poisson noise, see :class:`AugmentConfig`.
5. **Renormalise** every sample and channel to its 1st-99th percentiles over the crop.
6. **Brightness and contrast jitter** per non-empty channel: x -> contrast * x + brightness. They
   come after the renormalisation because a per-channel percentile normalisation would undo any
   per-channel affine change exactly; with jitter disabled the output is exactly step 5's.

Conventions
-----------
* Arrays are (y, x) with y pointing down; flows are (dy, dx). A positive ``angle`` rotates the
  image content counter-clockwise as displayed, so ``angle = 90 deg`` gives ``np.rot90``.
* The forward map from source pixel ``p`` to output pixel ``q`` is
  ``q = c_out + shift + scale * R(angle) @ F @ (p - c_src)`` with ``F = diag(1, -1)`` when
  flipped and ``R(a) = [[cos a, -sin a], [sin a, cos a]]`` acting on (y, x). Flow vectors are
  mapped by ``R(angle) @ F`` (unit length is kept; the scale does not change directions).
* Channels that are empty (all zero, e.g. the zero-padding of a one- or two-channel image) stay
  exactly 0 through every intensity operation, as missing channels are at inference.

Validation (``train=False``) only rescales to diameter 30 and takes the centre crop; it draws no
random numbers and returns the same result for any generator.

Window batches
--------------
The trainer's loader sends a ``train.data.WindowBatch`` instead: each sample's geometry (stage 2's
scale, angle, flip and shift) already drawn on the CPU from the step's seed with the same laws,
and only the source window the map reads, in the stored dtypes, with the percentile bounds of the
whole sample. Stages 1 and 2 then run as one gather of the bilinear taps (``_warp_windows``,
the same arithmetic); the generator draws everything else as above (its geometry draws are made
and dropped, so the other draws keep their place), and the degradations use the loader's zoom.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # only for annotations: augment reads the Batch's fields, nothing else
    from train.data import Batch

__all__ = ["AugmentConfig", "Augmented", "augment"]

# Columns of a WindowBatch's layout and transform (train.data builds them, _augment_windows reads them).
LAYOUT_COLUMNS = ("image_offset", "label_offset", "flow_offset", "ignore_offset", "height", "width", "channels",
                  "image_itemsize", "label_itemsize")
TRANSFORM_COLUMNS = ("centre_y", "centre_x", "scale", "angle", "flip", "shift_y", "shift_x", "zoom")

# A channel whose percentile range is at most this is flat and becomes 0 (Cellpose's normalize99
# and pipeline.io.normalize_percentile use the same threshold).
_FLAT_RANGE = 1e-3
# float16 (the Batch's transport dtype) tops out at 65504: uint16 values above it arrive as inf.
_FLOAT16_MAX = 65504.0
# Constants of Cellpose3's denoise.add_noise that the config does not expose:
_ISO_BLUR_EXP_SCALE = 0.5  # iso blur: sigma factor = clip(0.5 * Exp(1), 0.1, 1)
_ISO_BLUR_CLIP = (0.1, 1.0)
_ANISO_DS_JITTER = 0.35  # aniso blur with downsampling: factor = clip(ds + U(-0.35, 0.35), 0.05, 1.5)
_ANISO_DS_CLIP = (0.05, 1.5)


@dataclass(frozen=True, kw_only=True)
class AugmentConfig:
    """Every knob of the GPU augmentation; defaults are the paper's values (paper.md 1c-1e)."""

    crop_size: int = 256
    """Side of the square output crop in pixels (the network's input size)."""
    target_diameter: float = 30.0
    """Median object diameter every image is rescaled to before the random zoom."""
    min_diameter: float = 5.0
    """Diameters below this are raised to it before the rescale (Cellpose clips at 5)."""
    zoom_log2_range: tuple[float, float] = (-2.0, 2.0)
    """Random zoom is 2**U(low, high) on top of the rescale: 0.25-4x, diameters 7.5-120 px."""
    rotation_degrees: float = 180.0
    """Rotation angle is uniform in [-rotation_degrees, rotation_degrees]."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip (x -> -x, applied before the rotation)."""
    channel_drop_prob: float = 0.1
    """Probability of the channel_drop_mode operation ("10% random channel drop")."""
    channel_drop_mode: Literal["grayscale", "drop_third"] = "grayscale"
    """What the channel drop does. grayscale: the mean of the non-empty channels goes to channel 3
    (the paper's grayscale layout), the others are zeroed, before the permutation. drop_third:
    channel 3 is zeroed after the permutation (so a random channel), unless it is the only
    non-empty one."""
    permute_channels: bool = True
    """Apply a uniformly random permutation of all three channels (empty ones included)."""
    invert_prob: float = 0.25
    """Probability of contrast inversion x -> 1 - x of the non-empty channels."""
    brightness_sigma: float = 0.2
    """Standard deviation of the additive brightness offset, per non-empty channel."""
    contrast_log2_range: tuple[float, float] = (-1.0, 1.0)
    """Contrast factor is 2**U(low, high) per non-empty channel (0.5-2x: "between -2 and 2" read
    as "between halved and doubled"); (0, 0) disables it."""
    degrade_prob: float = 0.5
    """Fraction of samples that get the degradations below (each sample independently)."""
    anisotropic_prob: float = 0.5
    """Of the degraded samples, the fraction whose blur and downsampling act along y only
    (add_noise's iso=False); the paper gives no split."""
    downsample_prob: float = 0.7
    """Probability of downsampling a degraded sample (strided, after the blur) and re-upsampling."""
    downsample_max: int = 7
    """Downsampling factor is an integer uniform in [2, downsample_max]."""
    blur_prob: float = 0.7
    """Probability of a Gaussian blur of a degraded sample; always on when it is downsampled."""
    blur_sigma_max: float = 5.0
    """Isotropic blur sigma = d/30 * blur_sigma_max * clip(0.5 Exp(1), 0.1, 1), d = the object
    diameter in the crop (30 x zoom): 0.5-5 px at diameter 30."""
    anisotropic_sigma_ratio: float = 10.0
    """Anisotropic blur: sigma_y = d/30 * U(0, 1) (about 1.5 d/30 when downsampled), sigma_x =
    sigma_y / this ratio."""
    poisson_prob: float = 0.7
    """Probability of Poisson (shot) noise on a degraded sample, after blur and downsampling."""
    poisson_gamma_shape: float = 4.0
    """Photon scale ~ Gamma(shape, rate), clamped to >= poisson_min_scale; image ~ Poisson(scale x)."""
    poisson_gamma_rate: float = 0.7
    """Rate of the photon-scale Gamma distribution (mean shape / rate, about 5.7)."""
    poisson_min_scale: float = 1.0
    """Lower clamp of the photon scale."""
    percentiles: tuple[float, float] = (1.0, 99.0)
    """Percentiles mapped to 0 and 1 by both normalisations."""
    percentile_max_pixels: int = 1 << 16
    """Percentiles of a channel with more valid pixels are taken on a strided subsample of about
    this many."""

    def __post_init__(self) -> None:
        # YAML gives lists: store tuples so that configs compare equal.
        for name in ("zoom_log2_range", "contrast_log2_range", "percentiles"):
            value = getattr(self, name)
            if (
                not isinstance(value, (tuple, list))
                or len(value) != 2
                or not all(_is_real(v) for v in value)
                or value[0] > value[1]
            ):
                raise ValueError(
                    f"augment.{name} must be a (low, high) pair of numbers with low <= high; got {value!r}"
                )
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_prob") and not (_is_real(value) and 0.0 <= value <= 1.0):
                raise ValueError(f"augment.{f.name} is a probability and must lie in [0, 1]; got {value!r}")
        for name in ("target_diameter", "min_diameter", "poisson_gamma_shape", "poisson_gamma_rate",
                     "poisson_min_scale", "anisotropic_sigma_ratio"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 < value < math.inf):
                raise ValueError(f"augment.{name} must be a finite number > 0; got {value!r}")
        for name in ("brightness_sigma", "blur_sigma_max"):
            value = getattr(self, name)
            if not (_is_real(value) and 0.0 <= value < math.inf):
                raise ValueError(f"augment.{name} must be a finite number >= 0; got {value!r}")
        if not (_is_real(self.rotation_degrees) and 0.0 <= self.rotation_degrees <= 180.0):
            raise ValueError(f"augment.rotation_degrees must lie in [0, 180]; got {self.rotation_degrees!r}")
        for name, low in (("crop_size", 8), ("downsample_max", 2), ("percentile_max_pixels", 1024)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"augment.{name} must be an int >= {low}; got {value!r}")
        if self.channel_drop_mode not in ("grayscale", "drop_third"):
            raise ValueError(
                f"augment.channel_drop_mode must be 'grayscale' or 'drop_third'; got {self.channel_drop_mode!r}"
            )
        if not 0.0 <= self.percentiles[0] < self.percentiles[1] <= 100.0:
            raise ValueError(f"augment.percentiles must satisfy 0 <= low < high <= 100; got {self.percentiles}")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Augmented:
    """The network's input and the loss targets, all (B, ...) on the batch's device."""

    images: torch.Tensor
    """(B, 3, S, S) float32, 1st-99th percentile normalised per channel, then jittered."""
    flows: torch.Tensor
    """(B, 2, S, S) float32 target flows (dy, dx), unit inside objects (shorter where bilinear
    interpolation mixes objects or background, as in Cellpose), moved with the image."""
    cellprob: torch.Tensor
    """(B, S, S) float32 in {0, 1}: labels > 0 warped bilinearly, then > 0.5."""
    labels: torch.Tensor
    """(B, S, S) int32 instance ids warped nearest-neighbour (0 = background and zero fill)."""
    weight: torch.Tensor
    """(B, S, S) float32 loss weight: 0 where the ignore mask is set and in a padding slot (a
    sample with no valid pixel), 1 elsewhere (zero fill outside the image counts as background)."""


@dataclass
class _AffineParams:
    """Per-sample affine parameters of the warp; every field is (B,) or (B, 2) on the device."""

    scale: torch.Tensor
    """(B,) float32 total scale: rescale to the target diameter times the random zoom."""
    angle: torch.Tensor
    """(B,) float32 rotation in radians, counter-clockwise as displayed."""
    flip: torch.Tensor
    """(B,) bool horizontal flip, applied before the rotation."""
    shift: torch.Tensor
    """(B, 2) float32 (y, x) shift of the image centre from the crop centre, in output pixels."""


@dataclass
class _ChannelParams:
    drop: torch.Tensor  # (B,) bool: apply the channel_drop_mode operation
    permutation: torch.Tensor  # (B, 3) int64: output channel k takes input channel permutation[k]
    invert: torch.Tensor  # (B,) bool
    brightness: torch.Tensor  # (B, 3) float32 additive offset
    contrast: torch.Tensor  # (B, 3) float32 factor


@dataclass
class _DegradeParams:
    sigma: torch.Tensor  # (B, 2) float32 blur sigma (y, x) in pixels; 0 = no blur
    factor: torch.Tensor  # (B, 2) int64 downsampling factor (y, x); 1 = none
    photons: torch.Tensor  # (B,) float32 Poisson photon scale; 0 = no noise
    index: torch.Tensor  # (D,) int64 on the CPU: the samples drawn for a degradation
    index_device: torch.Tensor  # the same on the device


# ------------------------------------------------------------------------------------------------
# Public entry point
# ------------------------------------------------------------------------------------------------


def augment(
    batch: Batch, cfg: AugmentConfig, generator: torch.Generator | None, train: bool = True
) -> Augmented:
    """Augment a device batch into the network's (B, 3, S, S) input and its loss targets.

    ``generator`` must live on ``batch.images.device``; it is the only source of randomness (the
    global RNG is never touched), so a generator state gives the same result on a given device.
    With ``train=False`` nothing random happens and ``generator`` may be None.
    """
    if hasattr(batch, "transform"):  # a WindowBatch: geometry drawn by the loader, windows to resample
        return _augment_windows(batch, cfg, generator, train)
    device = _check_batch(batch)
    if train:
        _check_generator(generator, device)
    images, nonempty = _normalize_percentile(
        _finite(batch.images.float()), batch.valid, cfg.percentiles, cfg.percentile_max_pixels
    )
    centre, extent = _source_extents(batch.valid)
    rescale = cfg.target_diameter / batch.diameters.float().clamp(min=cfg.min_diameter)
    if train:
        affine, channel, degrade = _draw_params(rescale, extent, cfg, generator)
    else:
        affine = _centre_crop_params(rescale)
    images, flows, cellprob, labels, ignore = _warp(
        images, batch.flows, batch.labels, batch.ignore, batch.valid, centre, affine, cfg.crop_size
    )
    images = _intensity(images, nonempty, channel if train else None, degrade if train else None, cfg, generator)
    # A sample with no valid pixel is a padding slot (validation's last batch): out of the loss.
    weight = (~ignore & batch.valid.any(dim=(1, 2))[:, None, None]).float()
    return Augmented(images=images, flows=flows, cellprob=cellprob, labels=labels, weight=weight)


def _intensity(
    images: torch.Tensor, nonempty: torch.Tensor, channel: _ChannelParams | None, degrade: _DegradeParams | None,
    cfg: AugmentConfig, generator: torch.Generator | None,
) -> torch.Tensor:
    """Stages 3-6 on the warped, normalised crops: channels and inversion, degradations,
    renormalisation, jitter (only the renormalisation when ``channel`` is None: validation)."""
    if channel is not None:
        images, nonempty = _mix_channels(images, nonempty, channel, cfg)
        images = _degrade(images, degrade, generator)
    images, nonempty = _normalize_percentile(images, None, cfg.percentiles, cfg.percentile_max_pixels)
    if channel is not None:
        jittered = channel.contrast[:, :, None, None] * images + channel.brightness[:, :, None, None]
        images = torch.where(nonempty[:, :, None, None], jittered, images)
    return images


def _augment_windows(batch, cfg: AugmentConfig, generator: torch.Generator | None, train: bool) -> Augmented:
    """augment() of a WindowBatch: the loader drew the geometry (same laws as _draw_params') and
    cut out each sample's window; here the windows are resampled and everything else is drawn."""
    if not train:
        raise ValueError("a WindowBatch is a training batch; validation takes whole-sample Batches")
    device = batch.flows.device
    _check_generator(generator, device)
    t = batch.transform.float()
    column = TRANSFORM_COLUMNS.index
    affine = _AffineParams(scale=t[:, column("scale")], angle=t[:, column("angle")], flip=t[:, column("flip")] > 0.5,
                           shift=t[:, column("shift_y"): column("shift_x") + 1])
    zoom = t[:, column("zoom")]
    # The device's own geometry draws are still made (and dropped) so that the channel and
    # degradation draws stay where they are in the stream; the degradations use the loader's zoom.
    _, channel, degrade = _draw_params(torch.ones_like(zoom), torch.zeros_like(t[:, :2]), cfg, generator, zoom=zoom)
    centre = t[:, column("centre_y"): column("centre_x") + 1]
    images, flows, cellprob, labels, ignore, nonempty = _warp_windows(batch, affine, centre, cfg.crop_size)
    images = _intensity(images, nonempty, channel, degrade, cfg, generator)
    return Augmented(images=images, flows=flows, cellprob=cellprob, labels=labels, weight=(~ignore).float())


def _check_batch(batch: Batch) -> torch.device:
    """Validate shapes, dtypes and devices of the batch's tensors (no host sync); return the device."""
    images = batch.images
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"batch.images must be a non-empty (B, 3, H, W) tensor; got {got}. Pad channels to 3.")
    b, _, h, w = images.shape
    expected = {
        "flows": ((b, 2, h, w), (torch.float16, torch.bfloat16, torch.float32)),
        "labels": ((b, h, w), (torch.int32, torch.int64)),
        "ignore": ((b, h, w), (torch.bool,)),
        "valid": ((b, h, w), (torch.bool,)),
        "diameters": ((b,), (torch.float16, torch.bfloat16, torch.float32, torch.float64)),
    }
    for name, (shape, dtypes) in expected.items():
        tensor = getattr(batch, name)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(
                f"batch.{name} must have shape {shape} to match images {tuple(images.shape)}; got {got}"
            )
        if tensor.dtype not in dtypes:
            raise TypeError(f"batch.{name} must be one of {[str(d) for d in dtypes]}; got {tensor.dtype}")
        if tensor.device != images.device:
            raise ValueError(
                f"batch.{name} is on {tensor.device} but images are on {images.device}; move the whole batch "
                "with batch.to(device)"
            )
    if not images.dtype.is_floating_point:
        raise TypeError(f"batch.images must be floating point (raw intensities as float); got {images.dtype}")
    return images.device


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"augment(train=True) needs a torch.Generator; got {type(generator).__name__}")
    gen_device = generator.device
    same = gen_device.type == device.type and (
        gen_device.index is None or device.index is None or gen_device.index == device.index
    )
    if not same:
        raise ValueError(
            f"the generator is on {gen_device} but the batch is on {device}; create it with "
            f"torch.Generator(device={str(device)!r})"
        )


def _finite(images: torch.Tensor) -> torch.Tensor:
    # uint16 values above float16's range arrive as inf: treat them as the largest float16.
    return torch.nan_to_num(images, nan=0.0, posinf=_FLOAT16_MAX, neginf=0.0)


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


def _draw_params(
    rescale: torch.Tensor, extent: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator,
    zoom: torch.Tensor | None = None,
) -> tuple[_AffineParams, _ChannelParams, _DegradeParams]:
    """Draw every sample's augmentation parameters from ``generator``.

    The draws have fixed shapes that do not depend on the data or on the probabilities in
    ``cfg``, so changing a probability only flips thresholds: two configs differing in one
    probability give the same random stream, and the same parameters everywhere else.
    """
    b, device = rescale.shape[0], rescale.device

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand((b, *shape), generator=generator, device=device)

    def between(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * uniform(*shape)

    # Geometry (Cellpose's random_rotate_and_resize with scale_range=None).
    drawn = 2.0 ** between(*cfg.zoom_log2_range)
    zoom = drawn if zoom is None else zoom  # a zoom given by the loader (WindowBatch) replaces the draw
    scale = rescale * zoom
    angle = torch.deg2rad(between(-cfg.rotation_degrees, cfg.rotation_degrees))
    flip = uniform() < cfg.flip_prob
    # The crop centre may move as far as the scaled image still covers the crop (per axis,
    # ignoring the rotation, as Cellpose does; Cellpose swaps the y and x ranges, we do not).
    slack = (extent * scale[:, None] - cfg.crop_size).clamp(min=0.0)
    shift = slack * (uniform(2) - 0.5)
    affine = _AffineParams(scale=scale, angle=angle, flip=flip, shift=shift)

    # Channels and intensity.
    drop = uniform() < cfg.channel_drop_prob
    permutation = uniform(3).argsort(dim=1)  # drawn even when unused, to keep the stream fixed
    channel = _ChannelParams(
        drop=drop,
        permutation=permutation if cfg.permute_channels else _identity_permutation(b, device),
        invert=uniform() < cfg.invert_prob,
        brightness=cfg.brightness_sigma * torch.randn((b, 3), generator=generator, device=device),
        contrast=2.0 ** between(*cfg.contrast_log2_range, 3),
    )

    # Degradations (Cellpose3's denoise.add_noise), sigmas relative to the object diameter in the crop.
    # Which samples are degraded is drawn on the host (_draw_degraded), so that only those go
    # through the degradation's matmuls and noise without the host asking the device which.
    degrade_cpu, index = _draw_degraded(b, cfg.degrade_prob, generator)
    degrade = _to_device(degrade_cpu, device)
    anisotropic = uniform() < cfg.anisotropic_prob
    downsample = degrade & (uniform() < cfg.downsample_prob)
    factor = 2 + (uniform() * (cfg.downsample_max - 1)).long().clamp(max=cfg.downsample_max - 2)
    blur = degrade & ((uniform() < cfg.blur_prob) | downsample)
    diameter_ratio = zoom * cfg.target_diameter / 30.0
    exponential = -torch.log1p(-uniform())
    iso_sigma = cfg.blur_sigma_max * (_ISO_BLUR_EXP_SCALE * exponential).clamp(*_ISO_BLUR_CLIP)
    aniso_sigma = torch.where(
        downsample,
        (factor + between(-_ANISO_DS_JITTER, _ANISO_DS_JITTER)).clamp(*_ANISO_DS_CLIP),
        uniform(),
    )
    sigma_y = diameter_ratio * torch.where(anisotropic, aniso_sigma, iso_sigma)
    sigma_x = torch.where(anisotropic, sigma_y / cfg.anisotropic_sigma_ratio, sigma_y)
    sigma = torch.stack([sigma_y, sigma_x], dim=1) * blur[:, None]
    ones = torch.ones_like(factor)
    factor = torch.where(downsample, factor, ones)
    factors = torch.stack([factor, torch.where(anisotropic, ones, factor)], dim=1)
    alpha = torch.full((b,), cfg.poisson_gamma_shape, device=device)
    # torch.distributions.Gamma cannot take a generator; _standard_gamma (what it calls) can.
    photons = (torch._standard_gamma(alpha, generator=generator) / cfg.poisson_gamma_rate).clamp(
        min=cfg.poisson_min_scale
    )
    photons = photons * (degrade & (uniform() < cfg.poisson_prob))
    return affine, channel, _DegradeParams(sigma=sigma, factor=factors, photons=photons, index=index,
                                           index_device=_to_device(index, device))


def _draw_degraded(b: int, probability: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of ``b`` samples are degraded: a (B,) bool mask and their indices, both on the CPU.

    Drawn on the host from a CPU generator seeded from ``generator``'s seed (``initial_seed`` is
    a host-side number, so no device is asked; the trainer seeds a fresh generator for every
    micro-batch, so these draws differ between batches as the device's do).
    """
    seed = (generator.initial_seed() * 0x9E3779B97F4A7C15 + 0x2545F4914F6CDD1D) % (1 << 64)
    degrade = torch.rand(b, generator=torch.Generator().manual_seed(seed)) < probability
    return degrade, degrade.nonzero()[:, 0]


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without waiting for the device: pinned, then copied asynchronously."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _centre_crop_params(rescale: torch.Tensor) -> _AffineParams:
    """Validation: rescale only, no rotation, flip or shift (the crop is the image centre)."""
    b = rescale.shape[0]
    zeros = torch.zeros_like(rescale)
    return _AffineParams(
        scale=rescale, angle=zeros, flip=torch.zeros(b, dtype=torch.bool, device=rescale.device),
        shift=torch.zeros((b, 2), device=rescale.device),
    )


def _identity_permutation(b: int, device: torch.device) -> torch.Tensor:
    return torch.arange(3, device=device).expand(b, 3).clone()


# ------------------------------------------------------------------------------------------------
# Normalisation
# ------------------------------------------------------------------------------------------------


def _normalize_percentile(
    images: torch.Tensor, valid: torch.Tensor | None, percentiles: tuple[float, float], max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map each sample's and channel's percentiles to 0 and 1 over its valid pixels.

    images (B, C, H, W) float32; valid (B, H, W) bool or None (all valid). Returns the normalised
    images, 0 outside ``valid`` and in flat channels, and ``nonempty`` (B, C) bool (not flat).
    """
    b, c, h, w = images.shape
    low, high = _percentile_bounds(
        images.reshape(b, c, h * w), None if valid is None else valid.reshape(b, h * w), percentiles, max_pixels
    )
    # Written as "not (> threshold)" so that NaN bounds (no valid pixel) also count as flat.
    nonempty = (high - low) > _FLAT_RANGE
    span = torch.where(nonempty, high - low, torch.ones_like(high))
    normalized = (images - low[:, :, None, None]) / span[:, :, None, None]
    keep = nonempty[:, :, None, None]
    if valid is not None:
        keep = keep & valid[:, None]
    return torch.where(keep, normalized, torch.zeros_like(normalized)), nonempty


def _percentile_bounds(
    values: torch.Tensor, valid: torch.Tensor | None, percentiles: tuple[float, float], max_pixels: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(low, high) percentiles, each (B, C), of values (B, C, N) over the pixels where valid (B, N).

    Linear interpolation between order statistics, as ``np.percentile``'s default. A strided
    subsample of at most ``max_pixels`` per row keeps the selection cheap (torch.quantile refuses
    inputs past 2**24 elements and cannot skip the padding). Only the two order statistics on
    either side of each percentile are needed, so each end is read from a partial selection
    (``topk`` of the ~1% smallest and largest values) rather than a full sort: the same values,
    6x less time on a CPU for the 65,536-pixel rows of a 256x256 crop.
    """
    step = -(-values.shape[-1] // max_pixels)
    if step > 1:
        values = values[..., ::step]
        valid = None if valid is None else valid[..., ::step]
    b, c, n = values.shape
    if valid is None:
        count = torch.full((b,), n, device=values.device)
    else:
        count = valid.sum(dim=-1)
    last = (count - 1).clamp(min=0)[:, None]  # (B, 1) index of the largest valid value
    bounds = []
    for end, percentile in enumerate(percentiles):
        # The low end selects the smallest values (padding pushed to +inf), the high end the
        # largest (padding at -inf), where ascending rank r is descending rank last - r.
        smallest = end == 0
        fraction = percentile / 100.0
        position = fraction * last.float()  # (B, 1)
        below = position.floor()
        index0 = below.long()  # ascending ranks among the valid values
        index1 = (index0 + 1).minimum(last)
        ranks = torch.cat([index0, index1], dim=-1)  # (B, 2)
        if not smallest:
            ranks = last - ranks
        # k from the shape alone, never from the data (which would be a host-device sync): the
        # deepest rank any row can need, had it all n values valid, plus a margin for the float32
        # rounding of the position. Padding only lowers a row's ranks.
        reach = math.floor(fraction * (n - 1)) + 1 if smallest else math.ceil((1 - fraction) * (n - 1))
        k = min(n, reach + 2)
        rows = values if valid is None else values.masked_fill(
            ~valid[:, None, :], math.inf if smallest else -math.inf)
        selected = rows.topk(k, dim=-1, largest=not smallest, sorted=True).values  # (B, C, k)
        pair = selected.gather(-1, ranks[:, None, :].expand(b, c, 2))
        value0, value1 = pair[..., 0], pair[..., 1]
        bounds.append(value0 + (value1 - value0) * (position - below))
    bounds = torch.stack(bounds, dim=-1)  # (B, C, 2)
    # No valid pixel: both bounds NaN, so the channel counts as flat.
    bounds = torch.where(count[:, None, None] > 0, bounds, torch.full_like(bounds, math.nan))
    return bounds[..., 0], bounds[..., 1]


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------


def _source_extents(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre (B, 2) and size (B, 2), (y, x) in pixels, of each sample's valid bounding box."""
    bounds = []
    for axis in (2, 1):  # rows (any over x), then columns (any over y)
        occupied = valid.any(dim=axis)  # (B, L)
        length = occupied.shape[1]
        first = occupied.int().argmax(dim=1)
        end = length - occupied.flip(1).int().argmax(dim=1)
        empty = ~occupied.any(dim=1)
        first = torch.where(empty, torch.zeros_like(first), first)
        end = torch.where(empty, torch.full_like(end, length), end)
        bounds.append((first, end))
    start = torch.stack([bounds[0][0], bounds[1][0]], dim=1).float()
    end = torch.stack([bounds[0][1], bounds[1][1]], dim=1).float()
    return (start + end - 1) / 2, end - start


def _source_coordinates(centre: torch.Tensor, affine: _AffineParams, crop_size: int) -> torch.Tensor:
    """(B, S, S, 2) source (y, x) pixel coordinates of every output pixel: the inverse affine map."""
    device = centre.device
    offsets = torch.arange(crop_size, device=device, dtype=torch.float32) - (crop_size - 1) / 2
    out_y, out_x = torch.meshgrid(offsets, offsets, indexing="ij")
    # q - c_out - shift, per sample
    qy = out_y[None] - affine.shift[:, 0, None, None]
    qx = out_x[None] - affine.shift[:, 1, None, None]
    cos, sin = torch.cos(affine.angle)[:, None, None], torch.sin(affine.angle)[:, None, None]
    inv_scale = 1.0 / affine.scale[:, None, None]
    # R(-angle) on (y, x): [[cos, sin], [-sin, cos]]; then F (x -> -x when flipped); then 1/scale.
    src_y = (cos * qy + sin * qx) * inv_scale
    src_x = (-sin * qy + cos * qx) * inv_scale
    src_x = torch.where(affine.flip[:, None, None], -src_x, src_x)
    return torch.stack([src_y + centre[:, 0, None, None], src_x + centre[:, 1, None, None]], dim=-1)


def _warp(
    images: torch.Tensor,
    flows: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    valid: torch.Tensor,
    centre: torch.Tensor,
    affine: _AffineParams,
    crop_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Resample everything through each sample's affine map into a (crop_size, crop_size) crop.

    images (B, C, H, W) float32 (0 outside valid), flows (B, 2, H, W), labels / ignore / valid
    (B, H, W), centre (B, 2) the source point that the crop centre (minus the shift) shows.
    Returns images (B, C, S, S) float32, flows (B, 2, S, S) float32 with rotated vectors,
    cellprob (B, S, S) float32 in {0, 1}, labels (B, S, S) int32 and ignore (B, S, S) bool.
    """
    b, c, h, w = images.shape
    source = _source_coordinates(centre, affine, crop_size)
    # Bilinear, zero fill: images, flows and the foreground in one grid_sample. Pixel centres sit
    # at (2 i + 1) / size - 1 in grid_sample's [-1, 1] coordinates with align_corners=False.
    grid = torch.stack([(2 * source[..., 1] + 1) / w - 1, (2 * source[..., 0] + 1) / h - 1], dim=-1)
    inside = valid[:, None]
    smooth = torch.cat(
        [images, flows.float() * inside, ((labels > 0) & valid)[:, None].float()], dim=1
    )
    warped = F.grid_sample(smooth, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    images, flows, foreground = warped[:, :c], warped[:, c : c + 2], warped[:, c + 2]
    flows = _map_flow_vectors(flows, affine)
    # Nearest: an exact integer gather (grid_sample would round ids past 2**24 through float32).
    row = torch.floor(source[..., 0] + 0.5).long()
    col = torch.floor(source[..., 1] + 0.5).long()
    hit = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    flat_index = (row.clamp(0, h - 1) * w + col.clamp(0, w - 1)).reshape(b, -1)
    hit = hit & valid.reshape(b, -1).gather(1, flat_index).reshape(hit.shape)

    def nearest(field: torch.Tensor) -> torch.Tensor:
        return field.reshape(b, -1).gather(1, flat_index).reshape(hit.shape)

    warped_labels = torch.where(hit, nearest(labels), torch.zeros_like(row)).to(torch.int32)
    warped_ignore = hit & nearest(ignore)
    return images, flows, (foreground > 0.5).float(), warped_labels, warped_ignore


def _read_uint(buffer: torch.Tensor, index: torch.Tensor, itemsize: torch.Tensor, max_itemsize: int) -> torch.Tensor:
    """int64 little-endian unsigned values at byte ``index`` of a uint8 ``buffer``, each of its
    sample's ``itemsize`` bytes (broadcast with index); ``max_itemsize`` bounds the loop (no sync)."""
    last = buffer.shape[0] - 1
    value = buffer[index.clamp(0, last)].long()
    for k in range(1, max_itemsize):
        byte = buffer[(index + k).clamp(0, last)].long()
        value = value + torch.where(itemsize > k, byte << (8 * k), torch.zeros_like(byte))
    return value


def _warp_windows(
    batch, affine: _AffineParams, centre: torch.Tensor, crop_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """_warp and the first normalisation of a WindowBatch: each output pixel gathers its bilinear
    taps (or its nearest pixel) straight from the packed windows.

    The same arithmetic as ``_normalize_percentile`` then ``_warp`` on the whole sample: a tap
    outside the window is outside the image (the loader's window holds every pixel the map
    reads), so it counts as zero fill; inside, the image value is normalised with the sample's
    percentile bounds (``batch.bounds``). Returns images (B, 3, S, S) normalised, flows (B, 2, S, S)
    with rotated vectors, cellprob, labels (int32), ignore and ``nonempty`` (B, 3).
    """
    layout = batch.layout
    offset_image, offset_labels, offset_flows, offset_ignore, h, w, c, image_size, label_size = (
        layout[:, k, None, None] for k in range(len(LAYOUT_COLUMNS))
    )
    source = _source_coordinates(centre, affine, crop_size)
    sy, sx = source[..., 0], source[..., 1]
    floor_y, floor_x = torch.floor(sy), torch.floor(sx)
    frac_y, frac_x = sy - floor_y, sx - floor_x
    floor_y, floor_x = floor_y.long(), floor_x.long()
    bounds = batch.bounds.float()
    low, high = bounds[..., 0], bounds[..., 1]
    nonempty = (high - low) > _FLAT_RANGE  # NaN (a channel the sample lacks) is flat
    span = torch.where(nonempty, high - low, torch.ones_like(high))
    b = layout.shape[0]
    raw = torch.zeros((b, 3, crop_size, crop_size), device=sy.device)
    flows = torch.zeros((b, 2, crop_size, crop_size), device=sy.device)
    foreground = torch.zeros((b, crop_size, crop_size), device=sy.device)
    covered = torch.zeros_like(foreground)  # the bilinear weight that fell inside the image
    flow_last = batch.flows.shape[0] - 1
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = floor_y + dy, floor_x + dx
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        weight = (frac_y if dy else 1 - frac_y) * (frac_x if dx else 1 - frac_x) * inside
        pixel = y.clamp(min=0).minimum(h - 1) * w + x.clamp(min=0).minimum(w - 1)
        covered += weight
        for channel in range(3):
            index = offset_image + (pixel * c + channel) * image_size
            raw[:, channel] += weight * _read_uint(batch.image_bytes, index, image_size, batch.image_itemsize)
        for k in range(2):
            flows[:, k] += weight * batch.flows[(offset_flows + k * h * w + pixel).clamp(0, flow_last)].float()
        labels = _read_uint(batch.label_bytes, offset_labels + pixel * label_size, label_size, batch.label_itemsize)
        foreground += weight * (labels > 0)
    # sum of w (v - low) / span over the taps inside the image: what warping the normalised image gives.
    normalized = (raw - low[:, :, None, None] * covered[:, None]) / span[:, :, None, None]
    images = torch.where(nonempty[:, :, None, None], normalized, torch.zeros_like(normalized))
    flows = _map_flow_vectors(flows, affine)
    row, col = torch.floor(sy + 0.5).long(), torch.floor(sx + 0.5).long()
    hit = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    pixel = row.clamp(min=0).minimum(h - 1) * w + col.clamp(min=0).minimum(w - 1)
    labels = _read_uint(batch.label_bytes, offset_labels + pixel * label_size, label_size, batch.label_itemsize)
    labels = torch.where(hit, labels, torch.zeros_like(labels)).to(torch.int32)
    ignore_last = batch.ignore.shape[0] - 1
    ignore = hit & (offset_ignore >= 0) & batch.ignore[(offset_ignore + pixel).clamp(0, ignore_last)]
    return images, flows, (foreground > 0.5).float(), labels, ignore, nonempty


def _map_flow_vectors(flows: torch.Tensor, affine: _AffineParams) -> torch.Tensor:
    """Apply R(angle) @ F to (dy, dx) flow vectors (B, 2, S, S): the warp's linear part, unscaled."""
    dy, dx = flows[:, 0], flows[:, 1]
    dx = torch.where(affine.flip[:, None, None], -dx, dx)
    cos, sin = torch.cos(affine.angle)[:, None, None], torch.sin(affine.angle)[:, None, None]
    return torch.stack([cos * dy - sin * dx, sin * dy + cos * dx], dim=1)


# ------------------------------------------------------------------------------------------------
# Channels, degradations
# ------------------------------------------------------------------------------------------------


def _mix_channels(
    images: torch.Tensor, nonempty: torch.Tensor, params: _ChannelParams, cfg: AugmentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel drop or grayscale, permutation, then inversion of the non-empty channels.

    images (B, 3, S, S) normalised; nonempty (B, 3) bool. Returns both, updated.
    """
    drop = params.drop[:, None]
    if cfg.channel_drop_mode == "grayscale":
        weights = nonempty.float()
        gray = (images * weights[:, :, None, None]).sum(dim=1) / weights.sum(dim=1).clamp(min=1)[:, None, None]
        gray_images = torch.stack([torch.zeros_like(gray), torch.zeros_like(gray), gray], dim=1)
        gray_nonempty = torch.zeros_like(nonempty)
        gray_nonempty[:, 2] = nonempty.any(dim=1)
        images = torch.where(drop[:, :, None, None], gray_images, images)
        nonempty = torch.where(drop, gray_nonempty, nonempty)
    size = images.shape[-1]
    images = images.gather(1, params.permutation[:, :, None, None].expand(-1, -1, size, size))
    nonempty = nonempty.gather(1, params.permutation)
    if cfg.channel_drop_mode == "drop_third":
        # Never drop the only non-empty channel: an empty input with labelled cells teaches nothing.
        drop_third = params.drop & nonempty[:, :2].any(dim=1)
        keep = torch.ones_like(nonempty)
        keep[:, 2] = ~drop_third
        images = images * keep[:, :, None, None]
        nonempty = nonempty & keep
    invert = (params.invert[:, None] & nonempty)[:, :, None, None]
    return torch.where(invert, 1.0 - images, images), nonempty


def _degrade(images: torch.Tensor, params: _DegradeParams, generator: torch.Generator) -> torch.Tensor:
    """Blur, downsample + re-upsample and Poisson noise (B, C, S, S), per sample.

    Blur (zero padding) and resampling are both linear along each axis, so they fold into one
    (S, S) matrix per sample and axis: the result is ``A_y @ image @ A_x.T``, two batched matmuls
    with no dependence of the cost on sigma and no per-sample loop. Only the samples drawn for a
    degradation (``params.index``, known on the host: no sync) go through them; the others would
    cost as much and come out unchanged, and they are most of the batch (``degrade_prob``
    0.25-0.5). The Poisson draws come last from ``generator``: how many numbers they take may
    depend on the data on the CPU, and nothing draws after them.
    """
    if params.index.numel() == 0:
        return images
    index = params.index_device
    sigma, factor, photons = params.sigma[index], params.factor[index], params.photons[index]
    size = images.shape[-1]
    along_y = _resample_matrix(factor[:, 0], size) @ _blur_matrix(sigma[:, 0], size)
    along_x = _resample_matrix(factor[:, 1], size) @ _blur_matrix(sigma[:, 1], size)
    degraded = along_y[:, None] @ images[index] @ along_x[:, None].transpose(-1, -2)
    photons = photons[:, None, None, None]
    safe = photons.clamp(min=1e-6)
    noisy = torch.poisson(degraded.clamp(min=0.0) * safe, generator=generator) / safe
    return images.index_copy(0, index, torch.where(photons > 0, noisy, degraded))


def _blur_matrix(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) Gaussian blur along one axis with zero padding; sigma (B,) in pixels, 0 = identity.

    Row i holds the normalised kernel exp(-(j - i)^2 / 2 sigma^2) / sum_k exp(-k^2 / 2 sigma^2),
    the same as a convolution with that kernel and zero padding (Cellpose's conv2d with padding).
    The matrix is Toeplitz, so it is gathered from the 2S - 1 kernel taps.
    """
    offsets = torch.arange(-(size - 1), size, device=sigma.device, dtype=torch.float32)
    variance2 = 2 * sigma.float().clamp(min=1e-3).square()[:, None]
    taps = torch.exp(-offsets.square()[None] / variance2)  # (B, 2S - 1), tap k at offset k - (S - 1)
    taps = taps / taps.sum(dim=1, keepdim=True)
    positions = torch.arange(size, device=sigma.device)
    return taps[:, positions[None, :] - positions[:, None] + size - 1]


def _resample_matrix(factor: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) strided subsampling by ``factor`` (B,) then bilinear upsampling back to ``size``.

    Equals ``F.interpolate(x[::factor], size=size, mode="bilinear", align_corners=False)`` along
    one axis (Cellpose's add_noise); factor 1 gives the identity.
    """
    factor = factor.long()
    coarse = (size + factor - 1) // factor  # length of x[::factor]
    out = torch.arange(size, device=factor.device, dtype=torch.float32)
    # PyTorch's source index for align_corners=False: (i + 0.5) * in / out - 0.5, clamped at 0.
    position = ((out[None] + 0.5) * (coarse[:, None].float() / size) - 0.5).clamp(min=0.0)
    index0 = position.floor().long()
    index1 = (index0 + 1).minimum(coarse[:, None] - 1)
    weight1 = position - index0.float()
    columns = torch.arange(size, device=factor.device)
    source0 = (index0 * factor[:, None])[:, :, None]
    source1 = (index1 * factor[:, None])[:, :, None]
    return (1 - weight1)[:, :, None] * (columns == source0) + weight1[:, :, None] * (columns == source1)
