"""Seeded synthetic microscopy images with exact instance labels, for tests and the demo.

Five kinds of image (`KINDS`), each returned as ``image`` (Y, X, C) and ``labels`` (Y, X):

========== ========= =========================================================================
kind       image     what it shows; what `labels` marks
========== ========= =========================================================================
nuclei     uint16, 1 fluorescent nuclei on a dark background; nuclei
cyto       uint16, 2 channel 0 cytoplasm, channel 1 nucleus (fluorescence); whole cells
phase      uint16, 1 phase contrast: dark cells with bright halos on grey; whole cells
he         uint8, 3  H&E: purple-blue nuclei on pink, fibrous stroma (RGB); nuclei
bacteria   uint16, 1 rods touching end to end and side by side, phase or fluorescence; rods
========== ========= =========================================================================

Geometry
--------
Every object is a seed with a shape: an ellipse whose radius wobbles with the angle (a few
low Fourier harmonics) or a capsule (a rod, optionally bent). For every nearby object a pixel
gets a *normalised distance*, 0 at the seed and 1 on the object's outline, plus a smooth
per-object noise that roughens the outline. The pixel belongs to the object with the smallest
normalised distance if that is below 1, else to the background. Where two shapes overlap they
therefore share a border, as touching cells do, instead of one painting over the other.

Seeds sit on a jittered lattice whose spacing follows the diameter, and a smooth random field
thins them, so an image shows clusters of touching objects next to empty stretches. Then every
object keeps only its largest 8-connected piece, objects under ``min_area`` pixels go, and ids
are renumbered 1..N. The image is rendered from that final label image, so the labels are
exactly what the image shows.

Appearance
----------
Per-object brightness, internal texture, a Gaussian point spread, uneven illumination,
background texture and noise: Poisson photon noise plus Gaussian read noise for the uint16
kinds; Gaussian noise for H&E, which is composed from haematoxylin and eosin optical densities
by the Beer-Lambert law. Every image draws its own settings from `SyntheticConfig` ranges.

Everything comes from one ``numpy.random.Generator`` seeded by the caller, so a seed gives
byte-identical output on a given machine and NumPy/SciPy build.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from scipy import ndimage

__all__ = ["KINDS", "SyntheticConfig", "generate", "generate_dataset"]

KINDS: tuple[str, ...] = ("nuclei", "cyto", "phase", "he", "bacteria")
"""The kinds of image `generate` draws, in the order `generate_dataset` cycles through them."""

_CHANNELS = {"nuclei": 1, "cyto": 2, "phase": 1, "he": 3, "bacteria": 1}
_DTYPES = {
    "nuclei": np.uint16,
    "cyto": np.uint16,
    "phase": np.uint16,
    "he": np.uint8,
    "bacteria": np.uint16,
}
_MIN_SIDE = 16
_MIN_DIAMETER = 4.0
# Normalised distances are stored in the high bits of an int64 key with the object index in
# the low bits, so a single np.minimum.at gives both the winning distance and its owner.
_DIST_BITS = 24
_INDEX_BITS = 31


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """Ranges the generator draws each image's settings from."""

    diameter_range: tuple[float, float] = (8.0, 100.0)
    """Per-image mean object diameter in pixels (Cellpose definition), drawn log-uniformly."""
    density_range: tuple[float, float] = (0.3, 1.0)
    """Per-image fraction of seed sites kept (about the fraction of the field covered)."""
    size_jitter: float = 0.15
    """Standard deviation of log(object diameter) around the image's mean diameter."""
    blur_range: tuple[float, float] = (0.5, 1.5)
    """Gaussian point-spread sigma in pixels, drawn uniformly per image."""
    photons_range: tuple[float, float] = (150.0, 3000.0)
    """Photons in a typical object pixel (sets the Poisson noise), drawn log-uniformly."""
    read_noise: float = 3.0
    """Gaussian camera read noise of the uint16 kinds, in counts."""
    camera_offset: int = 100
    """Dark level added to the uint16 kinds, in counts."""
    he_noise: float = 3.0
    """Gaussian pixel noise of H&E images, in 8-bit levels."""
    illumination: float = 0.3
    """Largest relative change of the illumination across the field."""
    min_area: int = 12
    """Objects with fewer pixels (slivers cut by the image edge) are dropped from labels and image."""

    def __post_init__(self) -> None:
        # Ranges may arrive as lists (YAML); store them as float tuples so configs compare equal.
        for name, low, high in [
            ("diameter_range", _MIN_DIAMETER, math.inf),
            ("density_range", 1e-3, 1.0),
            ("blur_range", 0.0, 10.0),
            ("photons_range", 1.0, math.inf),
        ]:
            object.__setattr__(self, name, _checked_range(name, getattr(self, name), low, high))
        for name, high in [
            ("size_jitter", 0.5),
            ("read_noise", 1000.0),
            ("he_noise", 50.0),
            ("illumination", 0.9),
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= high:
                raise ValueError(f"SyntheticConfig.{name} must be a number in [0, {high}]; got {value!r}.")
        for name, low, high, unit in [
            ("camera_offset", 0, 10_000, "counts"),
            ("min_area", 1, 10_000, "pixels"),
        ]:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(
                    f"SyntheticConfig.{name} must be an int in [{low}, {high}] {unit}; got {value!r}."
                )


def _checked_range(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and low <= value[0] <= value[1] <= high
    )
    if not ok:
        raise ValueError(
            f"SyntheticConfig.{name} must be a (min, max) pair with {low} <= min <= max <= {high}; "
            f"got {value!r}."
        )
    return float(value[0]), float(value[1])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def generate(
    kind: str,
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int,
    diameter: float | None = None,
    density: float | None = None,
    config: SyntheticConfig | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one synthetic microscopy image and its exact instance labels.

    Parameters
    ----------
    kind : str
        One of `KINDS`: ``"nuclei"``, ``"cyto"``, ``"phase"``, ``"he"`` or ``"bacteria"``.
    shape : tuple of int
        (Y, X) size of the image, each side at least 16.
    seed : int
        Seed of the ``numpy.random.Generator`` that draws everything; a non-negative int.
    diameter : float, optional
        Mean object diameter in pixels, Cellpose definition (``2 * sqrt(area / pi)``); objects
        vary around it. Must lie in [4, min(shape) / 2]. Drawn log-uniformly from
        ``config.diameter_range`` (capped at min(shape) / 2) when None.
    density : float, optional
        Fraction of seed sites kept, in (0, 1]; roughly the fraction of the field covered by
        objects. Drawn from ``config.density_range`` when None.
    config : SyntheticConfig, optional
        Ranges of the per-image settings; ``SyntheticConfig()`` when None.

    Returns
    -------
    image : np.ndarray
        (Y, X, C). uint16 with C = 1 for nuclei, phase and bacteria and C = 2 for cyto
        (channel 0 cytoplasm, channel 1 nucleus); photon counts plus ``config.camera_offset``.
        uint8 RGB with C = 3 for he.
    labels : np.ndarray
        (Y, X) uint16, or uint32 beyond 65535 objects. 0 is background and objects are
        numbered 1..N; each is one 8-connected piece of at least ``config.min_area`` pixels.
        For cyto and phase the objects are whole cells; for he, nuclei.

    Notes
    -----
    The same arguments give byte-identical output. Objects cut by the image edge keep their
    visible part if it has at least ``config.min_area`` pixels. An image can hold no objects
    at all when the density is low and the diameter large relative to the shape.

    Examples
    --------
    >>> image, labels = generate("nuclei", (64, 64), seed=0, diameter=12.0)
    >>> image.shape, image.dtype.name, labels.dtype.name
    ((64, 64, 1), 'uint16', 'uint16')
    >>> ids = np.unique(labels[labels > 0])
    >>> bool((ids == np.arange(1, len(ids) + 1)).all())
    True
    >>> again, _ = generate("nuclei", (64, 64), seed=0, diameter=12.0)
    >>> bool((again == image).all())
    True
    """
    image, labels, _ = _generate(kind, shape, seed, diameter, density, config)
    return image, labels


def generate_dataset(
    n: int,
    kinds: Sequence[str] = KINDS,
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Yield `n` synthetic images, cycling through `kinds`, each with its labels and metadata.

    Parameters
    ----------
    n : int
        Number of images, at least 0.
    kinds : sequence of str
        Kinds to cycle through in order: image ``i`` is ``kinds[i % len(kinds)]``.
    shape : tuple of int
        (Y, X) size of every image.
    seed : int
        Dataset seed. Image ``i`` uses a seed derived from (seed, i) only, so any image can be
        regenerated alone and a longer dataset starts with the shorter one.
    config : SyntheticConfig, optional
        Ranges of the per-image settings; diameter and density are drawn per image.

    Yields
    ------
    image : np.ndarray
        As returned by `generate`.
    labels : np.ndarray
        As returned by `generate`.
    meta : dict
        ``kind``; ``seed`` (the per-image seed, for ``generate(kind, shape, seed=...)``);
        ``diameter`` (the drawn mean diameter); ``density``; ``n_cells`` (objects in labels);
        ``modality`` (``"fluorescence"``, ``"phase"`` or ``"brightfield"``).

    Examples
    --------
    >>> metas = [m for _, _, m in generate_dataset(3, ("nuclei", "he"), (48, 48), seed=1)]
    >>> [m["kind"] for m in metas]
    ['nuclei', 'he', 'nuclei']
    >>> image, labels = generate(metas[1]["kind"], (48, 48), seed=metas[1]["seed"])
    >>> int(labels.max()) == metas[1]["n_cells"]
    True
    """
    # Arguments are checked here, before the first image is asked for.
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int; got {n!r}.")
    if isinstance(kinds, str) or not isinstance(kinds, Sequence) or len(kinds) == 0:
        raise ValueError(f"kinds must be a non-empty sequence of kinds from {KINDS}; got {kinds!r}.")
    kinds = tuple(_check_kind(kind) for kind in kinds)
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    config = _check_config(config)
    return _iterate_dataset(n, kinds, shape, seed, config)


def dataset_item(
    index: int,
    kinds: Sequence[str] = KINDS,
    shape: tuple[int, int] = (256, 256),
    *,
    seed: int = 0,
    config: SyntheticConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Image ``index`` of ``generate_dataset(n, kinds, shape, seed=seed, config=config)``, alone.

    Lets a caller (shardgen's workers) draw any image of a dataset without the ones before it.

    >>> a = list(generate_dataset(3, ("nuclei", "he"), (48, 48), seed=4))[2]
    >>> b = dataset_item(2, ("nuclei", "he"), (48, 48), seed=4)
    >>> bool((a[0] == b[0]).all() and (a[1] == b[1]).all())
    True
    """
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative int; got {index!r}.")
    kinds = tuple(_check_kind(kind) for kind in kinds)
    return _dataset_item(int(index), kinds, _check_shape(shape), _check_seed(seed), _check_config(config))


def _dataset_item(
    index: int, kinds: tuple[str, ...], shape: tuple[int, int], seed: int, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray, dict]:
    # SeedSequence mixes (seed, index) so neighbouring indices get unrelated streams.
    image_seed = int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0] >> 1)
    return _generate(kinds[index % len(kinds)], shape, image_seed, None, None, config)


def _iterate_dataset(
    n: int, kinds: tuple[str, ...], shape: tuple[int, int], seed: int, config: SyntheticConfig
) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    for index in range(n):
        yield _dataset_item(index, kinds, shape, seed, config)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _check_kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}.")
    return kind  # type: ignore[return-value]


def _check_config(config: object) -> SyntheticConfig:
    if config is None:
        return SyntheticConfig()
    if not isinstance(config, SyntheticConfig):
        raise TypeError(f"config must be a SyntheticConfig or None; got {type(config).__name__}.")
    return config


def _check_seed(seed: object) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}.")
    return int(seed)


def _check_shape(shape: object) -> tuple[int, int]:
    ok = (
        isinstance(shape, (tuple, list))
        and len(shape) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in shape)
        and all(_MIN_SIDE <= s <= 16384 for s in shape)
    )
    if not ok:
        raise ValueError(
            f"shape must be a (Y, X) pair of ints, each in [{_MIN_SIDE}, 16384]; got {shape!r}. "
            "Pass for example shape=(256, 256)."
        )
    return int(shape[0]), int(shape[1])


def _resolve(
    rng: np.random.Generator,
    shape: tuple[int, int],
    diameter: float | None,
    density: float | None,
    config: SyntheticConfig,
) -> tuple[float, float]:
    """Check or draw the image's mean diameter and density (always two draws, for stability)."""
    max_diameter = min(shape) / 2
    low, high = config.diameter_range
    high = min(high, max_diameter)
    low = min(low, high)
    drawn_diameter = math.exp(rng.uniform(math.log(low), math.log(high)))
    drawn_density = rng.uniform(*config.density_range)
    if diameter is None:
        diameter = drawn_diameter
    elif (
        isinstance(diameter, bool)
        or not isinstance(diameter, (int, float, np.integer, np.floating))
        or not _MIN_DIAMETER <= diameter <= max_diameter
    ):
        raise ValueError(
            f"diameter must be a number in [{_MIN_DIAMETER}, {max_diameter}] pixels for shape {shape} "
            f"(at most half the shorter side); got {diameter!r}. Pass a smaller diameter, a larger "
            "shape, or None to draw one."
        )
    if density is None:
        density = drawn_density
    elif (
        isinstance(density, bool)
        or not isinstance(density, (int, float, np.integer, np.floating))
        or not 0.0 < density <= 1.0
    ):
        raise ValueError(f"density must be a number in (0, 1]; got {density!r}. Pass None to draw one.")
    return float(diameter), float(density)


def _generate(
    kind: str,
    shape: object,
    seed: object,
    diameter: float | None,
    density: float | None,
    config: SyntheticConfig | None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    kind = _check_kind(kind)
    shape = _check_shape(shape)
    seed = _check_seed(seed)
    config = _check_config(config)
    # The kind is mixed into the stream so that kinds sharing a seed do not share a layout.
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    diameter, density = _resolve(rng, shape, diameter, density, config)

    # Geometry first, then the image from the final labels only.
    if kind == "bacteria":
        objects = _rod_objects(rng, shape, diameter, density, config)
    else:
        objects = _blob_objects(rng, shape, diameter, density, config, _MORPHOLOGY[kind])
    raw_labels, raw_dist = _rasterise(rng, shape, objects, diameter)
    labels, kept = _clean_labels(raw_labels, config.min_area)
    objects = {name: values[kept] for name, values in objects.items()}
    dist = np.where(labels > 0, raw_dist, np.float32(0))

    render = _RENDERERS[kind]
    image, modality = render(rng, labels, dist, objects, diameter, config)
    assert image.shape == (*shape, _CHANNELS[kind]), (kind, image.shape)
    assert image.dtype == _DTYPES[kind], (kind, image.dtype)
    meta = {
        "kind": kind,
        "seed": seed,
        "diameter": diameter,
        "density": density,
        "n_cells": int(len(kept)),
        "modality": modality,
    }
    return image, labels, meta


# --------------------------------------------------------------------------------------------
# Geometry: seeds, shapes, rasterisation, clean-up
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Morphology:
    """Shape statistics of one blob kind."""

    aspect_range: tuple[float, float]  # major / minor axis ratio, drawn per object
    wobble: float  # total amplitude of the outline's Fourier harmonics, relative to the radius
    roughness: float  # amplitude of the smooth noise added to the normalised distance
    spacing: float  # lattice spacing relative to the diameter; < 1 packs cells tighter


_MORPHOLOGY = {
    "nuclei": _Morphology(aspect_range=(1.0, 1.7), wobble=0.06, roughness=0.04, spacing=0.95),
    "cyto": _Morphology(aspect_range=(1.0, 2.4), wobble=0.16, roughness=0.07, spacing=0.92),
    "phase": _Morphology(aspect_range=(1.0, 2.0), wobble=0.12, roughness=0.06, spacing=0.95),
    "he": _Morphology(aspect_range=(1.0, 2.0), wobble=0.08, roughness=0.05, spacing=0.95),
}
_HARMONICS = np.arange(2, 6)  # wobble harmonics 2..5: lobes, dents and flattening
# Packed objects fill their lattice cells only partly (gaps at corners, rough outlines), so
# nominal sizes and spacings are scaled up to make the measured (Cellpose) diameter match.
_SIZE_GAIN = 1.12


def _lattice_seeds(
    shape: tuple[int, int],
    step_u: float,
    step_v: float,
    angle: float,
    row_shift: Callable[[int], np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Sites of a rotated lattice covering `shape` plus a margin: rows along `angle`.

    Returns (y, x) float64 arrays. Row j is shifted along u by ``row_shift(n_rows)[j] * step_u``
    (half a step on odd rows, a hexagonal lattice, when `row_shift` is None).
    """
    height, width = shape
    margin = 2 * max(step_u, step_v)
    half_diag = 0.5 * math.hypot(height, width) + margin
    n_u = int(math.ceil(half_diag / step_u)) + 1
    n_v = int(math.ceil(half_diag / step_v)) + 1
    j = np.arange(-n_v, n_v + 1)
    i = np.arange(-n_u, n_u + 1)
    shift = 0.5 * (j % 2) if row_shift is None else row_shift(len(j))
    u = (i[None, :] + shift[:, None]) * step_u
    v = np.broadcast_to(j[:, None] * step_v, u.shape)
    cos, sin = math.cos(angle), math.sin(angle)
    y = (height / 2 + u * sin + v * cos).ravel()
    x = (width / 2 + u * cos - v * sin).ravel()
    inside = (y > -margin) & (y < height + margin) & (x > -margin) & (x < width + margin)
    return y[inside], x[inside]


def _thin(
    rng: np.random.Generator,
    shape: tuple[int, int],
    y: np.ndarray,
    x: np.ndarray,
    density: float,
    cluster_scale: float,
) -> np.ndarray:
    """Indices of the sites kept: the top `density` fraction of a smooth field plus noise.

    The smooth field makes clusters of touching objects and empty stretches; the noise keeps
    a few loners. Returned in a random order, so object ids carry no position.
    """
    n_keep = int(round(density * len(y)))
    field = _noise_fields(rng, shape, [cluster_scale])[0]
    iy = np.clip(np.round(y), 0, shape[0] - 1).astype(np.intp)
    ix = np.clip(np.round(x), 0, shape[1] - 1).astype(np.intp)
    score = field[iy, ix] + 0.6 * rng.standard_normal(len(y))
    kept = np.argsort(-score, kind="stable")[:n_keep]
    return rng.permutation(kept)


def _blob_objects(
    rng: np.random.Generator,
    shape: tuple[int, int],
    diameter: float,
    density: float,
    config: SyntheticConfig,
    morphology: _Morphology,
) -> dict[str, np.ndarray]:
    """Ellipses with wobbly outlines: per-object parameter arrays keyed by name."""
    # A hexagonal lattice of spacing `step` gives each site the area of a disc of diameter
    # 1.05 * step, so a packed field of cells measures about `diameter` at step ~ 0.95 * diameter.
    step = morphology.spacing * diameter * _SIZE_GAIN
    y, x = _lattice_seeds(shape, step, step * math.sqrt(3) / 2, rng.uniform(0, math.pi), None)
    y = y + rng.normal(0, 0.18 * step, len(y))
    x = x + rng.normal(0, 0.18 * step, len(x))
    kept = _thin(rng, shape, y, x, density, cluster_scale=1.2 * diameter)
    n = len(kept)
    size = diameter * _SIZE_GAIN * np.exp(np.clip(rng.normal(0, config.size_jitter, n), -2.5, 2.5))
    aspect = rng.uniform(*morphology.aspect_range, n)
    harmonic_weight = rng.dirichlet(np.ones(len(_HARMONICS)), n) * morphology.wobble
    harmonics = harmonic_weight * np.exp(1j * rng.uniform(0, 2 * math.pi, (n, len(_HARMONICS))))
    # Nucleus inside each cell (used by the cyto and phase renderers): an ellipse around a
    # point near the cell centre, small enough to stay inside the cell's minor axis.
    nucleus_size = rng.uniform(0.45, 0.65, n)
    nucleus_offset = rng.uniform(0, 0.25, n) * (1 - nucleus_size)
    nucleus_angle = rng.uniform(0, 2 * math.pi, n)
    return {
        "cy": y[kept],
        "cx": x[kept],
        "angle": rng.uniform(0, math.pi, n),
        # Semi-axes keep the ellipse's area at pi * size**2 / 4 whatever the aspect.
        "semi_u": 0.5 * size * np.sqrt(aspect),
        "semi_v": 0.5 * size / np.sqrt(aspect),
        "half_segment": np.zeros(n),
        "bend": np.zeros(n),
        "harmonics": harmonics,
        "roughness": np.full(n, morphology.roughness),
        "nucleus_size": nucleus_size,
        "nucleus_dy": nucleus_offset * np.sin(nucleus_angle),
        "nucleus_dx": nucleus_offset * np.cos(nucleus_angle),
    }


def _rod_objects(
    rng: np.random.Generator,
    shape: tuple[int, int],
    diameter: float,
    density: float,
    config: SyntheticConfig,
) -> dict[str, np.ndarray]:
    """Capsules (rods) in loosely aligned rows, so neighbours touch end to end and side by side."""
    aspect = rng.uniform(2.5, 5.0)  # length / width of a rod of the mean size
    # A capsule of width w and length aspect * w has area w**2 * (aspect - 1 + pi / 4); equate
    # it with the disc of the requested (Cellpose) diameter.
    width = _SIZE_GAIN * diameter * 0.5 * math.sqrt(math.pi / (aspect - 1 + math.pi / 4))
    length = aspect * width
    angle = rng.uniform(0, math.pi)
    y, x = _lattice_seeds(
        shape, length * 1.0, width * 1.02, angle, lambda n_rows: rng.uniform(0, 1, n_rows)
    )
    # Rows bend a little: the orientation follows a smooth field, so colonies look grown.
    disorder = rng.uniform(0.05, 0.5)
    orientation = _noise_fields(rng, shape, [3 * length])[0]
    iy = np.clip(np.round(y), 0, shape[0] - 1).astype(np.intp)
    ix = np.clip(np.round(x), 0, shape[1] - 1).astype(np.intp)
    cos, sin = math.cos(angle), math.sin(angle)
    along = rng.normal(0, 0.12 * length, len(y))
    across = rng.normal(0, 0.08 * width, len(y))
    y = y + along * sin + across * cos
    x = x + along * cos - across * sin
    kept = _thin(rng, shape, y, x, density, cluster_scale=1.5 * length)
    n = len(kept)
    # Cells grow before they divide: lengths spread over a factor of about two.
    size = np.exp(np.clip(rng.normal(0, config.size_jitter * 0.5, n), -2.5, 2.5))
    rod_width = width * size
    rod_length = np.maximum(length * size * rng.uniform(0.75, 1.3, n), rod_width * 1.3)
    radius = rod_width / 2
    bend_scale = rng.uniform(0.0, 1.2)  # tip deflection, in rod radii
    return {
        "cy": y[kept],
        "cx": x[kept],
        "angle": angle + disorder * orientation[iy, ix][kept] + rng.normal(0, 0.06, n),
        "semi_u": radius,
        "semi_v": radius,
        # Capsule: the distance is measured from a segment of half-length half_segment * radius.
        "half_segment": (rod_length / 2 - radius) / radius,
        "bend": bend_scale * rng.uniform(-1, 1, n),
        "harmonics": np.zeros((n, len(_HARMONICS)), np.complex128),
        "roughness": np.full(n, 0.03),
        "nucleus_size": np.zeros(n),
        "nucleus_dy": np.zeros(n),
        "nucleus_dx": np.zeros(n),
    }


def _shape_distance(
    dy: np.ndarray, dx: np.ndarray, shapes: dict[str, np.ndarray], obj: np.ndarray
) -> np.ndarray:
    """Normalised distance of pixels from their object's seed: 0 at the seed, 1 on the outline.

    Parameters
    ----------
    dy, dx : np.ndarray
        (m,) float32 offsets of m pixels from the seed of object ``obj[j]``.
    shapes : dict of np.ndarray
        Per-object float32 outline parameters from `_outline_parameters`.
    obj : np.ndarray
        (m,) intp object index of each pixel.

    Returns
    -------
    np.ndarray
        (m,) float32. The outline is an ellipse with semi-axes (semi_u, semi_v) along
        (angle, angle + 90 degrees), stretched into a capsule by half_segment, bent by bend,
        and wobbled by Fourier harmonics of the polar angle.
    """
    cos, sin = shapes["cos"][obj], shapes["sin"][obj]
    u = (dx * cos + dy * sin) * shapes["inverse_u"][obj]
    v = (dy * cos - dx * sin) * shapes["inverse_v"][obj]
    if shapes["is_capsule"]:
        # Bend: shift v by a parabola in u, so the tips deflect by `bend` rod radii.
        v -= shapes["bend_per_u2"][obj] * u * u
        along = np.maximum(np.abs(u) - shapes["half_segment"][obj], np.float32(0))
        dist = np.sqrt(along * along + v * v)
    else:
        dist = np.sqrt(u * u + v * v)
    if shapes["has_wobble"]:
        # Radius 1 + sum_k Re(c_k e^{ik theta}); e^{ik theta} as powers of the unit vector.
        unit = (u + 1j * v).astype(np.complex64)
        unit /= dist + np.float32(1e-6) if not shapes["is_capsule"] else np.abs(unit) + np.float32(1e-6)
        power = unit * unit
        wobble = np.ones(len(u), np.float32)
        for harmonic in shapes["harmonics"]:
            wobble += (harmonic[obj] * power).real
            power *= unit
        dist /= wobble
    return dist


def _outline_parameters(objects: dict[str, np.ndarray]) -> dict:
    """Per-object float32 parameters of `_shape_distance`, computed once per image."""
    half_segment = objects["half_segment"]
    return {
        "cos": np.cos(objects["angle"]).astype(np.float32),
        "sin": np.sin(objects["angle"]).astype(np.float32),
        "inverse_u": (1 / objects["semi_u"]).astype(np.float32),
        "inverse_v": (1 / objects["semi_v"]).astype(np.float32),
        "half_segment": half_segment.astype(np.float32),
        "bend_per_u2": (objects["bend"] / (half_segment + 1) ** 2).astype(np.float32),
        "harmonics": list(objects["harmonics"].astype(np.complex64).T),
        "is_capsule": bool(np.any(half_segment > 0) or np.any(objects["bend"] != 0)),
        "has_wobble": bool(np.any(objects["harmonics"] != 0)),
    }


def _candidate_ellipses(objects: dict[str, np.ndarray], limit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Semi-axes (along, across) of ellipses that contain every pixel an object may own.

    A pixel may belong to an object while its smooth distance is below `limit`. The capsule
    |u| <= U, |v| <= V (tips bent by up to `bend * limit` radii) fits in the ellipse with semi-axes
    sqrt(2) * (U, V) through its corners; a plain ellipse (no segment, no bend) is its own.
    """
    capsule = (objects["half_segment"] > 0) | (objects["bend"] != 0)
    corner = np.where(capsule, math.sqrt(2), 1.0)
    along = objects["semi_u"] * (objects["half_segment"] + 1) * corner * limit
    across = objects["semi_v"] * (1 + np.abs(objects["bend"]) * limit) * corner * limit
    return along, across


def _rasterise(
    rng: np.random.Generator,
    shape: tuple[int, int],
    objects: dict[str, np.ndarray],
    diameter: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Assign each pixel to the object with the smallest roughened normalised distance below 1.

    Returns raw labels (Y, X) int64 (0 background, i + 1 for object i) and the winning
    normalised distance (Y, X) float32. Objects go in groups of similar size; each group is a
    stack of square patches around the seeds, where a cheap quadratic form picks candidate
    pixels and only those get the exact distance, so the work is vectorised and small.
    """
    height, width = shape
    n = len(objects["cy"])
    keys = np.full(height * width, np.iinfo(np.int64).max, np.int64)
    # Outline noise: each object reads the same smooth field at its own random offset, so
    # neighbours' outlines wobble independently and shared borders are not straight.
    rough_field = np.clip(_noise_fields(rng, shape, [max(diameter / 10, 1.0)])[0], -3, 3)
    # The field is periodic, so a 2 x 2 tiling lets offsets in [0, side) index without a modulo.
    rough_tiled = np.tile(rough_field, (2, 2)).ravel()
    offset_y = rng.integers(0, height, n)
    offset_x = rng.integers(0, width, n)
    if n == 0:
        return np.zeros(shape, np.int64), np.zeros(shape, np.float32)

    roughness = objects["roughness"].astype(np.float32)
    shapes = _outline_parameters(objects)
    # A pixel can belong to an object only if its smooth distance is below `limit`: the
    # largest wobble times the largest roughness allowance (the field is clipped to +-3).
    limit = (1 + np.abs(objects["harmonics"]).sum(axis=1)) * (1 + 3 * roughness)
    along, across = _candidate_ellipses(objects, limit)
    # Quadratic form of the candidate ellipse, q(dy, dx) <= 1 inside, and its bounding box.
    cos, sin = np.cos(objects["angle"]), np.sin(objects["angle"])
    qxx = ((cos / along) ** 2 + (sin / across) ** 2).astype(np.float32)
    qyy = ((sin / along) ** 2 + (cos / across) ** 2).astype(np.float32)
    qxy = (2 * cos * sin * (1 / along**2 - 1 / across**2)).astype(np.float32)
    # Patches are centred on the rounded seed, half a pixel off at most.
    reach_y = np.hypot(along * sin, across * cos) + 0.5
    reach_x = np.hypot(along * cos, across * sin) + 0.5
    order = np.argsort(reach_y * reach_x, kind="stable")
    for group in np.array_split(order, min(8, n)):
        half_y = int(math.ceil(reach_y[group].max()))
        half_x = int(math.ceil(reach_x[group].max()))
        ys = np.round(objects["cy"][group]).astype(np.intp)[:, None] + np.arange(-half_y, half_y + 1)
        xs = np.round(objects["cx"][group]).astype(np.intp)[:, None] + np.arange(-half_x, half_x + 1)
        dy = (ys - objects["cy"][group][:, None]).astype(np.float32)  # (g, Sy)
        dx = (xs - objects["cx"][group][:, None]).astype(np.float32)  # (g, Sx)
        # Rows and columns outside the image get a far offset, so they fail the test below.
        dy[(ys < 0) | (ys >= height)] = 1e4
        dx[(xs < 0) | (xs >= width)] = 1e4
        # Only one full (g, Sy, Sx) product; the squared terms stay small until the sum.
        q = (qxy[group][:, None, None] * dy[:, :, None]) * dx[:, None, :]
        q += (qyy[group][:, None] * dy * dy)[:, :, None]
        q += (qxx[group][:, None] * dx * dx)[:, None, :]
        flat = np.flatnonzero(q <= 1)
        # From here on only candidate pixels, as flat (object, y, x) arrays.
        k, within = np.divmod(flat, q.shape[1] * q.shape[2])
        iy, ix = np.divmod(within, q.shape[2])
        obj = group[k]
        py, px = ys[k, iy], xs[k, ix]
        d = _shape_distance(dy[k, iy], dx[k, ix], shapes, obj)
        d += roughness[obj] * rough_tiled[(py + offset_y[obj]) * (2 * width) + px + offset_x[obj]]
        hit = d < 1
        quantised = (np.maximum(d[hit], 0) * (1 << _DIST_BITS)).astype(np.int64)
        np.minimum.at(keys, py[hit] * width + px[hit], (quantised << _INDEX_BITS) | obj[hit])
    background = keys == np.iinfo(np.int64).max
    raw_labels = np.where(background, 0, (keys & ((1 << _INDEX_BITS) - 1)) + 1).reshape(shape)
    dist = np.where(background, 0.0, (keys >> _INDEX_BITS) / float(1 << _DIST_BITS))
    return raw_labels, dist.astype(np.float32).reshape(shape)


_EIGHT_CONNECTED = np.ones((3, 3), bool)


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique (a, b) pairs, a < b, of different nonzero labels that touch (8-connectivity)."""
    n_labels = int(labels.max()) + 1
    codes = []
    for first, second in [
        (labels[:, :-1], labels[:, 1:]),
        (labels[:-1, :], labels[1:, :]),
        (labels[:-1, :-1], labels[1:, 1:]),
        (labels[:-1, 1:], labels[1:, :-1]),
    ]:
        touching = (first != second) & (first > 0) & (second > 0)
        a, b = first[touching], second[touching]
        codes.append(np.minimum(a, b) * n_labels + np.maximum(a, b))
    codes = np.unique(np.concatenate(codes))
    return np.stack([codes // n_labels, codes % n_labels], axis=1)


def _colour_labels(n_labels: int, pairs: np.ndarray) -> np.ndarray:
    """Colour labels 1..n so touching labels differ: (n + 1,) int, colour 0 unused by label 0.

    Each round colours the uncoloured labels whose index beats all uncoloured neighbours', an
    independent set, so a round's colour never sits on two touching labels.
    """
    colour = np.full(n_labels + 1, -1)
    colour[0] = 0
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    # Priorities by a multiplicative hash: neighbours' order is mixed, so rounds stay few.
    priority = (np.arange(n_labels + 1, dtype=np.uint64) * np.uint64(2654435761)) % np.uint64(1 << 32)
    round_colour = 1
    while (colour < 0).any():
        open_edge = (colour[src] < 0) & (colour[dst] < 0)
        best_neighbour = np.zeros(n_labels + 1, np.uint64)
        np.maximum.at(best_neighbour, src[open_edge], priority[dst[open_edge]])
        chosen = (colour < 0) & (priority > best_neighbour)
        # Ties are impossible: the hash is a bijection on indices below 2**32.
        colour[chosen] = round_colour
        round_colour += 1
    return colour


def _clean_labels(raw_labels: np.ndarray, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep each label's largest 8-connected piece, drop small labels, renumber 1..N.

    Parameters
    ----------
    raw_labels : np.ndarray
        (Y, X) int64, 0 background, object i as i + 1.
    min_area : int
        Objects with fewer pixels after clean-up are removed.

    Returns
    -------
    labels : np.ndarray
        (Y, X) uint16 (uint32 beyond 65535 objects), consecutive ids 1..N.
    kept : np.ndarray
        (N,) intp: the raw object index (label - 1) of each final label.
    """
    n_raw = int(raw_labels.max()) if raw_labels.size else 0
    colour = _colour_labels(n_raw, _adjacent_pairs(raw_labels))
    colour_image = colour[raw_labels]
    # Same-coloured labels never touch, so components of one colour are pieces of one label.
    pieces = np.zeros(raw_labels.shape, np.int64)
    n_pieces = 0
    for value in range(1, int(colour.max()) + 1):
        mask = colour_image == value
        piece, count = ndimage.label(mask, _EIGHT_CONNECTED)
        pieces[mask] = piece[mask] + n_pieces
        n_pieces += count
    piece_size = np.bincount(pieces.ravel(), minlength=n_pieces + 1)
    piece_label = np.zeros(n_pieces + 1, np.int64)
    piece_label[pieces.ravel()] = raw_labels.ravel()
    # Largest piece of each label: sort by (label, -size) and take the first of each label.
    order = np.lexsort((-piece_size[1:], piece_label[1:])) + 1
    first = np.ones(len(order), bool)
    first[1:] = piece_label[order[1:]] != piece_label[order[:-1]]
    largest = order[first]
    largest = largest[piece_size[largest] >= min_area]
    new_id = np.zeros(n_pieces + 1, np.int64)
    # Renumber in raw-label order, which is already a random order.
    largest = largest[np.argsort(piece_label[largest], kind="stable")]
    new_id[largest] = np.arange(1, len(largest) + 1)
    dtype = np.uint16 if len(largest) <= np.iinfo(np.uint16).max else np.uint32
    labels = new_id[pieces].astype(dtype)
    return labels, piece_label[largest] - 1


# --------------------------------------------------------------------------------------------
# Appearance helpers
# --------------------------------------------------------------------------------------------


def _noise_fields(
    rng: np.random.Generator, shape: tuple[int, int], scales: Sequence[float | tuple[float, float, float]]
) -> np.ndarray:
    """Smooth Gaussian random fields, (len(scales), Y, X) float32, zero mean and unit sd each.

    A scale is a Gaussian correlation sigma in pixels, or (sigma_along, sigma_across, angle)
    for fibres along `angle`. The fields are drawn directly in Fourier space: complex white
    noise times the Gaussian transfer function, only over the band where that function is
    above ~1e-3, then one inverse FFT. The fields are periodic, which texture does not mind.
    """
    height, width = shape
    spectrum = np.zeros((len(scales), height, width // 2 + 1), np.complex64)
    all_fy = np.fft.fftfreq(height).astype(np.float32)
    all_fx = np.fft.rfftfreq(width).astype(np.float32)
    gauss = np.float32(-2 * math.pi**2)
    for i, scale in enumerate(scales):
        finest = min(scale[:2]) if isinstance(scale, tuple) else scale
        # exp(-2 pi^2 sigma^2 f^2) < 1e-3 beyond f = 0.6 / sigma.
        band = 0.6 / max(finest, 1e-3)
        rows = np.flatnonzero(np.abs(all_fy) <= band)
        cols = np.flatnonzero(all_fx <= band)
        fy, fx = all_fy[rows][:, None], all_fx[cols][None, :]
        if isinstance(scale, tuple):
            along, across, angle = scale
            c, s = math.cos(angle), math.sin(angle)
            f_along, f_across = fx * c + fy * s, fy * c - fx * s
            transfer = np.exp(gauss * ((along * f_along) ** 2 + (across * f_across) ** 2))
        else:
            transfer = np.exp(gauss * (scale * fy) ** 2) * np.exp(gauss * (scale * fx) ** 2)
        noise = rng.standard_normal((2, len(rows), len(cols)), dtype=np.float32)
        spectrum[i][np.ix_(rows, cols)] = (noise[0] + 1j * noise[1]) * transfer
        spectrum[i, 0, 0] = 0
    fields = scipy.fft.irfft2(spectrum, s=shape).astype(np.float32, copy=False)
    # Unit sd estimated on a subsample: exactness does not matter, speed does.
    sd = fields[:, ::3, ::3].reshape(len(scales), -1).std(axis=1)
    fields *= (1 / (sd + np.float32(1e-12))).astype(np.float32)[:, None, None]
    return fields


def _illumination(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """Smooth multiplicative illumination (Y, X) float32 around 1: a tilt plus a vignette."""
    y = np.linspace(-1, 1, shape[0], dtype=np.float32)[:, None]
    x = np.linspace(-1, 1, shape[1], dtype=np.float32)[None, :]
    tilt_y, tilt_x = rng.uniform(-0.5, 0.5, 2) * strength
    vignette = rng.uniform(0, 0.5) * strength
    cy, cx = rng.uniform(-0.5, 0.5, 2)
    field = 1 + tilt_y * y + tilt_x * x - vignette * ((y - cy) ** 2 + (x - cx) ** 2)
    return np.maximum(field, np.float32(0.2)).astype(np.float32)


def _shared_borders(labels: np.ndarray) -> np.ndarray:
    """(Y, X) float32, 1 on pixels 4-adjacent to a different nonzero label, else 0."""
    border = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = labels[:-1, :] if axis == 0 else labels[:, :-1]
        b = labels[1:, :] if axis == 0 else labels[:, 1:]
        edge = (a != b) & (a > 0) & (b > 0)
        if axis == 0:
            border[:-1, :] |= edge
            border[1:, :] |= edge
        else:
            border[:, :-1] |= edge
            border[:, 1:] |= edge
    return border.astype(np.float32)


def _nucleus_distance(labels: np.ndarray, objects: dict[str, np.ndarray]) -> np.ndarray:
    """Normalised distance (Y, X) float32 to each cell's nucleus ellipse; inf off the cells.

    The nucleus is an ellipse at the cell's orientation, nucleus_size times the cell's minor
    semi-axis across, moved by (nucleus_dy, nucleus_dx) minor semi-axes from the cell centre.
    """
    dist = np.full(labels.shape, np.inf, np.float32)
    ys, xs = np.nonzero(labels)
    if len(ys) == 0:
        return dist
    index = labels[ys, xs].astype(np.intp) - 1
    semi_v = objects["semi_v"]
    radius = (semi_v * objects["nucleus_size"]).astype(np.float32)[index]
    aspect = np.sqrt(objects["semi_u"] / semi_v).astype(np.float32)[index]
    dy = ys.astype(np.float32) - (objects["cy"] + objects["nucleus_dy"] * semi_v).astype(np.float32)[index]
    dx = xs.astype(np.float32) - (objects["cx"] + objects["nucleus_dx"] * semi_v).astype(np.float32)[index]
    cos = np.cos(objects["angle"]).astype(np.float32)[index]
    sin = np.sin(objects["angle"]).astype(np.float32)[index]
    u = (dx * cos + dy * sin) / (radius * aspect)
    v = (dy * cos - dx * sin) / radius
    dist[ys, xs] = np.sqrt(u * u + v * v)
    return dist


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a (Y, X) float32 image; reflect at the edges."""
    if sigma <= 0:
        return image
    return ndimage.gaussian_filter(image, sigma, mode="reflect", truncate=3.0)


def _to_counts(rng: np.random.Generator, expected: np.ndarray, config: SyntheticConfig) -> np.ndarray:
    """Camera counts (Y, X) uint16 from expected photons (Y, X) float32.

    Poisson shot noise, then Gaussian read noise and the camera offset, rounded and clipped.
    """
    photons = rng.poisson(np.maximum(expected, 0).astype(np.float64)).astype(np.float32)
    photons += np.float32(config.read_noise) * rng.standard_normal(expected.shape, dtype=np.float32)
    counts = np.round(photons + np.float32(config.camera_offset))
    return np.clip(counts, 0, np.iinfo(np.uint16).max).astype(np.uint16)


def _texture_scale(diameter: float) -> float:
    """Correlation length of object texture (chromatin, cytoplasm grain), in pixels."""
    return float(np.clip(diameter / 10, 0.8, 4.0))


def _object_values(rng: np.random.Generator, n: int, spread: float, low: float, high: float) -> np.ndarray:
    """(n + 1,) float32 per-object log-normal values clipped to [low, high]; entry 0 is 0."""
    values = np.zeros(n + 1, np.float32)
    values[1:] = np.clip(np.exp(rng.normal(0, spread, n)), low, high)
    return values


# --------------------------------------------------------------------------------------------
# Renderers: (rng, labels, dist, objects, diameter, config) -> (image (Y, X, C), modality).
# labels (Y, X) are final; dist (Y, X) float32 is each pixel's normalised distance from its
# object's seed (0 centre, 1 outline; 0 on background); objects holds per-label parameters
# (row i for label i + 1).
# --------------------------------------------------------------------------------------------


def _fluorescent_objects(
    rng: np.random.Generator, labels: np.ndarray, dist: np.ndarray, diameter: float, texture_amount: float
) -> np.ndarray:
    """Relative brightness (Y, X) float32 of fluorescent objects, before blur; 0 off objects."""
    n = int(labels.max())
    brightness = _object_values(rng, n, 0.3, 0.4, 2.5)
    texture = _noise_fields(rng, labels.shape, [_texture_scale(diameter)])[0]
    dome = rng.uniform(0.1, 0.5)
    signal = brightness[labels] * (1 - dome * dist * dist) * (1 + texture_amount * texture)
    # Touching objects look separate through a dimmer seam between them.
    signal *= 1 - rng.uniform(0.2, 0.6) * _shared_borders(labels)
    return np.maximum(signal, 0)


def _background(rng: np.random.Generator, shape: tuple[int, int], diameter: float) -> np.ndarray:
    """Fluorescence background (Y, X) float32 >= 0, relative to a typical object (1)."""
    level = rng.uniform(0.02, 0.15)
    haze = _noise_fields(rng, shape, [rng.uniform(3, max(4.0, diameter))])[0]
    return level * np.exp(rng.uniform(0.2, 0.6) * haze)


def _render_nuclei(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    objects: dict[str, np.ndarray],
    diameter: float,
    config: SyntheticConfig,
) -> tuple[np.ndarray, str]:
    """Fluorescent nuclei: bright textured domes, dim seams, haze, uneven light."""
    signal = _fluorescent_objects(rng, labels, dist, diameter, rng.uniform(0.05, 0.3))
    signal = _blur(signal, rng.uniform(*config.blur_range))
    image = (signal + _background(rng, labels.shape, diameter)) * _illumination(
        rng, labels.shape, config.illumination
    )
    photons = math.exp(rng.uniform(*np.log(config.photons_range)))
    return _to_counts(rng, image * photons, config)[..., None], "fluorescence"


def _render_cyto(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    objects: dict[str, np.ndarray],
    diameter: float,
    config: SyntheticConfig,
) -> tuple[np.ndarray, str]:
    """Two fluorescence channels: 0 cytoplasm of whole cells, 1 their nuclei."""
    n = int(labels.max())
    cells = (labels > 0).astype(np.float32)
    nucleus = (_nucleus_distance(labels, objects) < 1).astype(np.float32)
    texture = _noise_fields(rng, labels.shape, [_texture_scale(diameter), 1.5 * _texture_scale(diameter)])
    # Cytoplasm: uneven per cell, grainy, thinner (dimmer) towards the cell edge, dimmer over
    # the nucleus, with a dark seam where cells touch.
    brightness = _object_values(rng, n, 0.4, 0.3, 3.0)
    edge_fall = rng.uniform(0.2, 0.7)
    cytoplasm = brightness[labels] * (1 - edge_fall * dist**2) * (1 + rng.uniform(0.15, 0.4) * texture[0])
    cytoplasm *= 1 - rng.uniform(0.0, 0.5) * nucleus
    cytoplasm *= 1 - rng.uniform(0.3, 0.7) * _shared_borders(labels)
    cytoplasm = np.maximum(cytoplasm, 0) * cells
    nucleus_brightness = _object_values(rng, n, 0.3, 0.4, 2.5)
    nuclear = nucleus_brightness[labels] * nucleus * (1 + rng.uniform(0.05, 0.3) * texture[1])
    blur = rng.uniform(*config.blur_range)
    illumination = _illumination(rng, labels.shape, config.illumination)
    photons = math.exp(rng.uniform(*np.log(config.photons_range)))
    channels = []
    for signal, bleed in [(cytoplasm, nuclear), (np.maximum(nuclear, 0), cytoplasm)]:
        # A little crosstalk between channels, as with real filter sets.
        mixed = signal + rng.uniform(0, 0.08) * bleed
        image = (_blur(mixed, blur) + _background(rng, labels.shape, diameter)) * illumination
        channels.append(_to_counts(rng, image * photons, config))
    return np.stack(channels, axis=-1), "fluorescence"


def _phase_contrast(
    rng: np.random.Generator, thickness: np.ndarray, blur: float, halo_sigma: float
) -> np.ndarray:
    """Phase-contrast intensity (Y, X) float32 around 1 from optical thickness (Y, X) >= 0.

    Phase contrast passes roughly a high-pass of the phase: objects go dark and a bright halo
    appears just outside them (thickness minus its blurred self is negative there).
    """
    phase = _blur(thickness, blur)
    high_pass = phase - _blur(phase, halo_sigma)
    contrast = rng.uniform(0.5, 0.8)
    # Absorption keeps the middle of large objects darker than the background.
    return 1 - contrast * high_pass - rng.uniform(0.15, 0.3) * phase


def _render_phase(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    objects: dict[str, np.ndarray],
    diameter: float,
    config: SyntheticConfig,
) -> tuple[np.ndarray, str]:
    """Phase contrast: dark cells, slightly darker nuclei, bright halos and membrane lines."""
    n = int(labels.max())
    thickness_per_cell = _object_values(rng, n, 0.25, 0.5, 1.8)
    texture = _noise_fields(rng, labels.shape, [_texture_scale(diameter), max(diameter / 3, 2.0)])
    nucleus = (_nucleus_distance(labels, objects) < 1).astype(np.float32)
    dome = np.sqrt(np.maximum(1 - dist * dist, 0))
    thickness = thickness_per_cell[labels] * (0.45 + 0.55 * dome) * (1 + 0.2 * texture[0])
    thickness *= 1 + rng.uniform(0.0, 0.4) * nucleus
    # Where cells touch the membranes show as a bright line: thin the cells there.
    thickness *= 1 - 0.7 * _shared_borders(labels)
    thickness = np.maximum(thickness, 0) * (labels > 0)
    halo_sigma = float(np.clip(rng.uniform(0.12, 0.3) * diameter, 1.5, 8.0))
    intensity = _phase_contrast(rng, thickness, rng.uniform(*config.blur_range), halo_sigma)
    intensity *= 1 + 0.03 * texture[1]
    intensity *= _illumination(rng, labels.shape, config.illumination)
    photons = math.exp(rng.uniform(*np.log(config.photons_range)))
    return _to_counts(rng, np.maximum(intensity, 0.02) * photons, config)[..., None], "phase"


def _render_bacteria(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    objects: dict[str, np.ndarray],
    diameter: float,
    config: SyntheticConfig,
) -> tuple[np.ndarray, str]:
    """Rods in phase contrast (60 %) or fluorescence (40 %)."""
    if rng.uniform() < 0.6:
        n = int(labels.max())
        thickness_per_rod = _object_values(rng, n, 0.15, 0.6, 1.5)
        dome = np.sqrt(np.maximum(1 - dist * dist, 0))
        thickness = thickness_per_rod[labels] * (0.5 + 0.5 * dome)
        thickness *= (1 - 0.8 * _shared_borders(labels)) * (labels > 0)
        width = 2 * float(np.median(objects["semi_v"])) if n else diameter / 2
        halo_sigma = float(np.clip(rng.uniform(0.5, 1.2) * width, 1.5, 8.0))
        intensity = _phase_contrast(rng, thickness, rng.uniform(*config.blur_range), halo_sigma)
        haze = _noise_fields(rng, labels.shape, [rng.uniform(4, 20)])[0]
        intensity *= (1 + 0.03 * haze) * _illumination(rng, labels.shape, config.illumination)
        photons = math.exp(rng.uniform(*np.log(config.photons_range)))
        return _to_counts(rng, np.maximum(intensity, 0.02) * photons, config)[..., None], "phase"
    image, _ = _render_nuclei(rng, labels, dist, objects, diameter, config)
    return image, "fluorescence"


# Optical density per unit stain in (R, G, B), decadic: the H&E reference vectors of
# Macenko et al. (2009), which give MoNuSeg-like colours (stroma ~ (185, 135, 165), nuclei ~
# (80, 50, 95)) at the stain amounts below.
_HAEMATOXYLIN = np.array([0.5626, 0.7201, 0.4062], np.float32)
_EOSIN = np.array([0.2159, 0.8012, 0.5581], np.float32)


def _render_he(
    rng: np.random.Generator,
    labels: np.ndarray,
    dist: np.ndarray,
    objects: dict[str, np.ndarray],
    diameter: float,
    config: SyntheticConfig,
) -> tuple[np.ndarray, str]:
    """H&E brightfield: haematoxylin-dense nuclei in eosin-pink fibrous stroma, RGB uint8."""
    shape = labels.shape
    n = int(labels.max())
    nuclei = (labels > 0).astype(np.float32)
    fibre_angle = rng.uniform(0, math.pi)
    fields = _noise_fields(
        rng,
        shape,
        [
            _texture_scale(diameter),  # chromatin
            (rng.uniform(3, 8), rng.uniform(0.8, 1.5), fibre_angle),  # collagen fibres
            rng.uniform(1.5, 4.0) * diameter,  # tissue vs empty space
            rng.uniform(2, 6),  # cytoplasm mottle
        ],
    )
    # Nuclei: dense haematoxylin with chromatin grain; some are vesicular (pale centre, dark rim).
    stain = _object_values(rng, n, 0.25, 0.5, 1.8) * rng.uniform(0.6, 1.1)
    vesicular = np.zeros(n + 1, np.float32)
    vesicular[1:] = (rng.uniform(size=n) < rng.uniform(0, 0.5)) * rng.uniform(0.2, 0.5, n)
    rim = 1 - vesicular[labels] * (1 - dist * dist)
    haematoxylin = stain[labels] * rim * (1 + rng.uniform(0.15, 0.35) * fields[0])
    haematoxylin *= 1 - rng.uniform(0.3, 0.6) * _shared_borders(labels)
    # Stroma: pink with some haematoxylin, fibrous and mottled, with gaps (lumen, fat, tears)
    # where the tissue field is low.
    tissue = 1 / (1 + np.exp(-3 * (fields[2] + rng.uniform(0.3, 1.5))))
    tissue = np.maximum(tissue, nuclei)
    grain = 1 + rng.uniform(0.05, 0.2) * fields[1] + 0.15 * fields[3]
    eosin = rng.uniform(0.12, 0.3) * tissue * grain
    haematoxylin = haematoxylin * nuclei + rng.uniform(0.06, 0.18) * tissue * grain
    blur = rng.uniform(*config.blur_range)
    haematoxylin = _blur(np.maximum(haematoxylin, 0).astype(np.float32), blur)
    eosin = _blur(eosin.astype(np.float32), blur)
    # Stain vectors vary between labs and scanners.
    h_vector = _HAEMATOXYLIN * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    e_vector = _EOSIN * rng.uniform(0.85, 1.15, 3).astype(np.float32)
    density = haematoxylin[..., None] * h_vector + eosin[..., None] * e_vector
    white = rng.uniform(225, 250) * _illumination(rng, shape, config.illumination * 0.3)[..., None]
    rgb = white * np.exp(np.float32(-math.log(10)) * density)  # Beer-Lambert, decadic
    rgb += config.he_noise * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(np.round(rgb), 0, 255).astype(np.uint8), "brightfield"


_RENDERERS = {
    "nuclei": _render_nuclei,
    "cyto": _render_cyto,
    "phase": _render_phase,
    "he": _render_he,
    "bacteria": _render_bacteria,
}
