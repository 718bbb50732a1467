"""Shard loading for training and validation: stream the shardgen shards, decode, batch (CPU only).

Everything here runs on the CPU. Training batches (``build_train_loader(..., augment=cfg)``, what
the trainer uses) move only what the step reads: the loader draws each sample's geometric
augmentation (rescale to the target diameter, zoom, rotation, flip, crop position; the laws of
``train/augment.py``) from the step's seed, cuts out the source window those parameters read plus
the bilinear margin, and packs the windows in their stored dtypes without padding
(:class:`WindowBatch`, with each sample's transform and percentile bounds). The device then does
every resampling and intensity operation (``train/augment.py``). Validation batches (and training
batches without ``augment``) are whole samples, cropped to ``max_side`` and zero-padded to the
batch's largest (:class:`Batch`). Host memory is bounded in bytes: see :func:`loader_host_bytes`.

Training stream (per rank)
--------------------------
Each training group (a dataset, or a dataset's subset: the keys of ``<root>/weights.yaml``) has
an endless stream: shards resampled with replacement -> raw samples (webdataset) -> a shuffle
buffer of raw, still compressed samples. Every slot of a batch first draws its group with the
weights of ``weights.yaml`` (renormalised over the groups that have training shards), then takes
the next raw sample of that group's stream, which is then decoded, checked and cropped.

Determinism and exact resume
----------------------------
The batch of global step ``s`` on rank ``r`` is a function of (seed, r, world_size, num_workers,
s) and the shards alone, whatever step the run started at:

* Step ``s`` belongs to *virtual worker* ``v = s % V`` (``V = max(num_workers, 1)``) as its local
  batch ``j = s // V``. A DataLoader started at step ``s0`` pulls batches from its workers
  round-robin starting at worker 0, so worker ``w`` plays virtual worker ``(s0 + w) % V`` and
  yields steps ``s0 + w``, ``s0 + w + V``, ...
* A virtual worker's streams (group choices, shard picks, shuffle buffers) are re-created every
  ``chunk_steps`` local batches from (seed, rank, v, chunk). A run resumed inside a chunk
  re-creates that chunk and fast-forwards: it draws the same group choices and reads (but does
  not decode) the same raw samples, ``batch_size`` per skipped batch.
* That is exact because every batch consumes exactly ``batch_size`` raw samples from the
  streams, corrupt or not. A corrupt sample (undecodable, or arrays whose shapes disagree) is
  skipped, logged with its shard and key, counted in ``Batch.skipped``, and its slot refilled
  with a sample of the same group picked at random from a generator seeded by (seed, rank, v,
  j, slot), which never touches the streams.
* The random ``max_side`` crop of step ``s`` uses a generator seeded by (seed, rank, s), its
  geometry (WindowBatch) another seeded by (seed, rank, s).

Shards of a group are split disjointly over the ``world_size * V`` (rank, virtual worker) slots
when the group has at least that many shards; with fewer, every slot resamples all of them with
its own generator (samples then repeat across ranks, which a warning says).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import webdataset as wds
import yaml
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.shards import MANIFEST_FILE, TRAIN_SPLITS, WEIGHTS_FILE, decode_sample, group_key, sample_problems
from train.augment import LAYOUT_COLUMNS, TRANSFORM_COLUMNS, AugmentConfig

log = logging.getLogger(__name__)

# float16's largest finite value: uint16 intensities above it would become inf.
_FLOAT16_MAX = 65504
# What a generator is for: the first seed word, so two purposes never share a seed. Each tag
# always comes with the same number of words (SeedSequence treats trailing zeros as absent).
_TAG_GROUPS, _TAG_SHARDS, _TAG_SHUFFLE, _TAG_REFILL, _TAG_CROP, _TAG_GEOMETRY = range(1, 7)
# A corrupt sample's slot is refilled from at most this many random picks of its group.
_MAX_REFILL_PICKS = 16


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the shards are and how they are streamed, mixed and batched on the CPU."""

    root: str = "shards"
    """Shard root written by shardgen: ``<root>/<dataset>/*.tar``, manifest.parquet, weights.yaml."""
    shard_url: str | None = None
    """Where the shards themselves are read from, when not under ``root``: a template with
    ``{shard}`` (the manifest's path of a shard relative to the root) that webdataset opens, e.g.
    ``pipe:aws s3 cp s3://bucket/shards/{shard} -`` or ``pipe:curl -sfL https://host/shards/{shard}``.
    The manifest and weights (a few MB) are still read from ``root``; None reads ``root/{shard}``."""
    weights_file: str | None = None
    """Sampling weights to use instead of ``<root>/weights.yaml`` (same format: a ``weights:``
    mapping, or a bare mapping, of "dataset" or "dataset/subset" to a non-negative number)."""
    batch_size: int = 32
    """Samples per batch on each rank (the global batch is ``batch_size * world_size``)."""
    num_workers: int = 6
    """DataLoader worker processes per rank; 0 decodes in the training process. Part of the
    stream's definition: changing it changes the batches (see the module docstring)."""
    prefetch_factor: int = 2
    """Batches each worker prepares ahead (in shared memory; see loader_host_bytes)."""
    max_side: int = 1024
    """Samples larger than this in H or W are randomly cropped to at most max_side x max_side on
    the CPU before anything else (the augmentation then sees that crop as the image): bounds a
    batch's bytes (see loader_host_bytes)."""
    shuffle_buffer: int = 128
    """At most this many raw (still compressed) samples in each group's shuffle buffer, per
    worker; a buffer starts yielding at a quarter full (of this or of its share of shuffle_bytes)."""
    shuffle_bytes: int = 256 * 2**20
    """Bytes of raw samples one worker's shuffle buffers hold at most, all groups together (each
    group's buffer gets an equal share): what bounds the buffers' host memory."""
    seed: int = 0
    """Seeds every random choice of the data stream (groups, shards, shuffles, crops)."""
    samples_per_epoch: int | None = None
    """Samples in one epoch over all ranks; None = the number of training samples in the groups
    with a positive weight (Cellpose's default). The train stream itself is endless; the trainer
    counts epochs in steps (see steps_per_epoch)."""
    chunk_steps: int = 256
    """Each worker's streams are re-seeded every chunk_steps of its batches. Smaller means a
    quicker resume (a resume reads up to chunk_steps * batch_size raw samples per worker without
    decoding them) but refills the shuffle buffers more often."""
    val_splits: tuple[str, ...] = ("test",)
    """Splits streamed by the validation loader (pannuke's held-out fold is "fold3")."""
    val_limit: int | None = None
    """At most this many validation samples per group (the first ones by key); None = all."""
    pin_memory: bool = True
    """Pin batch memory for asynchronous host-to-device copies (only when CUDA is available)."""

    def __post_init__(self) -> None:
        # YAML gives lists where the field is a tuple.
        if isinstance(self.val_splits, list):
            object.__setattr__(self, "val_splits", tuple(self.val_splits))
        positive = ("batch_size", "prefetch_factor", "max_side", "shuffle_buffer", "shuffle_bytes", "chunk_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataConfig.{name} must be an integer >= 1; got {value!r}")
        for name in ("num_workers", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataConfig.{name} must be an integer >= 0; got {value!r}")
        for name in ("samples_per_epoch", "val_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"DataConfig.{name} must be None or an integer >= 1; got {value!r}")
        if self.shard_url is not None and "{shard}" not in self.shard_url:
            raise ValueError(f"DataConfig.shard_url must contain {{shard}}; got {self.shard_url!r}")
        if not self.val_splits or not all(isinstance(s, str) and s for s in self.val_splits):
            raise ValueError(f"DataConfig.val_splits must be a non-empty tuple of split names; got {self.val_splits!r}")
        trained = sorted(set(self.val_splits) & set(TRAIN_SPLITS))
        if trained:
            raise ValueError(
                f"DataConfig.val_splits {self.val_splits} includes training split(s) {trained} "
                f"(training draws from {TRAIN_SPLITS}); validate on held-out splits such as 'test'."
            )
        if not self.root:
            raise ValueError("DataConfig.root must name the shard root (the --out folder of python -m shardgen)")


@dataclass
class Batch:
    """One batch on the CPU (pinned when CUDA is available); ``.to(device)`` moves it."""

    images: torch.Tensor
    """(B, 3, H, W) float16 raw intensities (uint8/uint16 values; uint16 above 65504 clamp to
    65504), channels zero-padded to 3."""
    flows: torch.Tensor
    """(B, 2, H, W) float16 unit flows (dy, dx)."""
    labels: torch.Tensor
    """(B, H, W) int32 instance ids, 0 = background."""
    ignore: torch.Tensor
    """(B, H, W) bool, True = don't care (all False when the sample has no ignore mask)."""
    valid: torch.Tensor
    """(B, H, W) bool, True inside the sample, False in the padding to the batch's H, W."""
    diameters: torch.Tensor
    """(B,) float32 Cellpose diameter of the whole (uncropped) sample, from its json."""
    datasets: list[str]
    """Group key per sample ("cyto2", "omnipose/bact_phase", ...); "" for a padding slot."""
    keys: list[str]
    """Shard key per sample; "" for a padding slot (validation only, see build_val_loader)."""
    step: int = -1
    """Global step this training batch belongs to; -1 in validation."""
    skipped: int = 0
    """Corrupt samples, and reads of damaged shards, skipped while assembling this batch."""

    def to(self, device, non_blocking: bool = True) -> Batch:
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **moved)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread."""
        pinned = {
            f.name: getattr(self, f.name).pin_memory()
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        return dataclasses.replace(self, **pinned)

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class WindowBatch:
    """One training batch as windows: per sample, the part of its image the step's warp reads,
    in its stored dtypes, packed without padding, with the warp that reads it.

    The CPU draws each sample's geometry (train.augment's rescale, zoom, rotation, flip and crop
    shift, with its distributions) from the step's seed, and cuts out the source window the
    (crop_size x crop_size) output reads, plus the bilinear taps' margin; the device resamples it
    (``train.augment``). Window ``i`` is (h, w) = ``layout[i, 4:6]`` pixels; its image is (h, w, c)
    little-endian uint8 or uint16 bytes in ``image_bytes`` from ``layout[i, 0]``, its labels (h, w)
    uint16 or uint32 bytes in ``label_bytes`` from ``layout[i, 1]``, its flows (2, h, w) in
    ``flows`` from ``layout[i, 2]`` and its ignore mask (h, w) in ``ignore`` from ``layout[i, 3]``
    (-1: none).
    """

    image_bytes: torch.Tensor
    """(N,) uint8: every window's image, (h, w, c) in its stored dtype, one after another."""
    label_bytes: torch.Tensor
    """(M,) uint8: every window's labels, (h, w) uint16 or uint32 as stored."""
    flows: torch.Tensor
    """(K,) float16: every window's unit flows (2, h, w), (dy, dx)."""
    ignore: torch.Tensor
    """(L,) bool: the windows' ignore masks (h, w), of the samples that have one (at least 1 element)."""
    layout: torch.Tensor
    """(B, 9) int64, columns :data:`LAYOUT_COLUMNS`: where each window is and its shape and dtypes."""
    transform: torch.Tensor
    """(B, 8) float32, columns :data:`TRANSFORM_COLUMNS`: the window pixel (y, x) the output's
    centre shows before the shift, the total scale (rescale x zoom), the angle (radians), the flip
    (0/1), the shift of the image centre from the crop centre (output pixels) and the zoom alone."""
    bounds: torch.Tensor
    """(B, 3, 2) float32: each channel's (low, high) percentiles over the whole (max_side-cropped)
    sample, what the first normalisation maps to 0 and 1; NaN for channels the sample lacks."""
    diameters: torch.Tensor
    """(B,) float32 Cellpose diameter of the whole sample, from its json."""
    datasets: list[str]
    """Group key per sample."""
    keys: list[str]
    """Shard key per sample."""
    image_itemsize: int = 1
    """Largest image itemsize in the batch (1 or 2): how many bytes the device combines per value."""
    label_itemsize: int = 2
    """Largest label itemsize in the batch (2 or 4)."""
    step: int = -1
    """Global step this training batch belongs to."""
    skipped: int = 0
    """Corrupt samples, and reads of damaged shards, skipped while assembling this batch."""

    to = Batch.to
    pin_memory = Batch.pin_memory
    __len__ = Batch.__len__


# ------------------------------------------------------------------------------------------------
# The shard root: manifest, weights, groups
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """A training group: its weight and its shards (absolute paths) with their sample counts."""

    key: str
    weight: float
    shards: tuple[str, ...]
    sizes: tuple[int, ...]


def _read_manifest(root: Path, splits: Iterable[str]) -> list[dict]:
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise FileNotFoundError(
            f"shard root {root} does not exist; build shards first (make shards, or python -m shardgen "
            f"--dataset NAME --src DIR --out {root}) or set data.root"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; {root} is not a finished shardgen root (rerun python -m shardgen)")
    table = pq.read_table(path, columns=["dataset", "subset", "key", "shard", "split"])
    wanted = set(splits)
    return [row for row in table.to_pylist() if row["split"] in wanted]


def _read_weights(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise FileNotFoundError(
            f"weights file {path} does not exist (shardgen writes {WEIGHTS_FILE} beside the manifest)"
        )
    data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and isinstance(data.get("weights"), dict):
        data = data["weights"]
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of dataset (or dataset/subset) to weight; got {type(data).__name__}"
        )
    weights = {}
    for key, value in data.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{path}: weight of {key!r} must be a non-negative number; got {value!r}")
        weights[str(key)] = float(value)
    return weights


def _train_groups(cfg: DataConfig) -> tuple[_Group, ...]:
    """Groups with training shards and a positive weight, weights renormalised to sum to 1."""
    root = Path(cfg.root).resolve()
    rows = _read_manifest(root, TRAIN_SPLITS)
    if not rows:
        raise ValueError(
            f"{root / MANIFEST_FILE} lists no training samples (splits {TRAIN_SPLITS}); "
            "convert a dataset with training data"
        )
    weights_path = Path(cfg.weights_file) if cfg.weights_file else root / WEIGHTS_FILE
    weights = _read_weights(weights_path)
    sizes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for row in rows:
        sizes[group_key(row["dataset"], row["subset"])][row["shard"]] += 1
    missing = sorted(set(sizes) - set(weights))
    if missing:
        raise ValueError(
            f"{weights_path} gives no weight to training group(s) {missing}; add them (0 leaves a group out) "
            "or rebuild the weights with python -m shardgen"
        )
    total = sum(weights[g] for g in sizes)
    if total <= 0:
        raise ValueError(
            f"{weights_path}: every training group {sorted(sizes)} has weight 0; give at least one a positive weight"
        )
    groups = []
    for key in sorted(sizes):
        if weights[key] == 0:
            continue
        shards = sorted(sizes[key])
        for shard in shards:
            if cfg.shard_url is None and not (root / shard).is_file():
                raise FileNotFoundError(
                    f"{root / shard} is listed in {MANIFEST_FILE} but missing; check the root with "
                    f"python -m shardgen verify {root}"
                )
        paths = tuple(_shard_url(cfg, root, s) for s in shards)
        groups.append(_Group(key, weights[key] / total, paths, tuple(sizes[key][s] for s in shards)))
    return tuple(groups)


def _shard_url(cfg: DataConfig, root: Path, shard: str) -> str:
    """What webdataset opens for a shard listed in the manifest (see DataConfig.shard_url)."""
    if cfg.shard_url is None:
        return str(root / shard)
    return cfg.shard_url.replace("{shard}", shard)


def train_weights(cfg: DataConfig) -> dict[str, float]:
    """The probability each training group is drawn with (what the train loader mixes by)."""
    return {g.key: g.weight for g in _train_groups(cfg)}


def steps_per_epoch(cfg: DataConfig, world_size: int) -> int:
    """Optimizer steps in one epoch of ``cfg.samples_per_epoch`` samples over all ranks."""
    samples = cfg.samples_per_epoch
    if samples is None:
        samples = sum(sum(g.sizes) for g in _train_groups(cfg))
    return max(1, math.ceil(samples / (cfg.batch_size * world_size)))


# Largest bytes per pixel of a training batch's window: a 3-channel uint16 image, uint32 labels,
# float16 flows (2) and an ignore mask.
_WINDOW_PIXEL_BYTES = 3 * 2 + 4 + 2 * 2 + 1


def loader_host_bytes(cfg: DataConfig) -> dict[str, int]:
    """Host memory one rank's training loader may hold at most, in bytes, workers included.

    A batch is at most ``batch_size`` windows of ``max_side`` x ``max_side`` pixels at the
    largest dtypes (15 bytes a pixel); typical windows are far smaller (docs/BENCHMARKS.md).
    ``in_flight``: the DataLoader's outstanding batches, ``num_workers x prefetch_factor``, in
    shared memory (a worker assembles its batch straight into it). ``shuffle``: the shuffle
    buffers of all workers (``shuffle_bytes`` each). ``pinned``: two batches in page-locked memory
    (the one the step copies from and the one being pinned), when ``pin_memory``. ``total``: their
    sum. Not included: each worker's decoded samples of the batch it is assembling (their size,
    whole images, is the data's) and the validation loader, whose workers run only while it does.
    A pure function of the config: the dry run and the loader's start-up log print the same numbers.
    """
    batch = cfg.batch_size * cfg.max_side**2 * _WINDOW_PIXEL_BYTES
    in_flight = cfg.num_workers * cfg.prefetch_factor * batch if cfg.num_workers else batch
    shuffle = max(cfg.num_workers, 1) * cfg.shuffle_bytes
    pinned = 2 * batch if cfg.pin_memory else 0
    return dict(in_flight=in_flight, shuffle=shuffle, pinned=pinned, total=in_flight + shuffle + pinned)


def _slot_shards(
    group: _Group, rank: int, world_size: int, virtual: int, n_virtual: int
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The shards (and sizes) slot (rank, virtual worker) reads: a disjoint share, or all of them."""
    slots = world_size * n_virtual
    if len(group.shards) < slots:
        return group.shards, group.sizes
    slot = rank * n_virtual + virtual
    return group.shards[slot::slots], group.sizes[slot::slots]


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------


def _rng(tag: int, *words: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([tag, *(int(w) for w in words)])))


def _py_rng(tag: int, *words: int) -> random.Random:
    """A ``random.Random`` (what webdataset's shuffle takes) seeded like :func:`_rng`."""
    return random.Random(int(np.random.SeedSequence([tag, *(int(w) for w in words)]).generate_state(1, np.uint64)[0]))


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else -1


# ------------------------------------------------------------------------------------------------
# Decoding and checking one sample
# ------------------------------------------------------------------------------------------------


@dataclass
class _Sample:
    image: np.ndarray  # (H, W, C) uint8/uint16
    labels: np.ndarray  # (H, W) unsigned int
    flows: np.ndarray  # (2, H, W) float16
    ignore: np.ndarray | None  # (H, W) bool
    diameter: float
    group: str
    key: str


def _decode(raw: dict, expected_group: str | None) -> _Sample:
    """Decode a raw webdataset sample and check that its parts agree; ValueError otherwise."""
    image, labels, flows, meta, ignore = decode_sample(raw, readonly=True)  # no copy: only windows are cut out
    key = raw.get("__key__", "?")
    problems = sample_problems(image, labels, flows, meta, ignore, key=key)
    if problems:
        raise ValueError("; ".join(problems))
    group = group_key(meta.dataset, meta.subset)
    if expected_group is not None and group != expected_group:
        raise ValueError(
            f"sample belongs to group {group!r}, but its shard is listed under {expected_group!r} (stale manifest?)"
        )
    if ignore is not None:
        ignore = ignore.astype(bool, copy=False)
    return _Sample(image, labels, flows, ignore, float(meta.diameter), group, key)


def _crop_window(size: int, max_side: int, rng: np.random.Generator | None) -> slice:
    """A window of at most max_side along one axis: random with rng, else centred."""
    if size <= max_side:
        return slice(0, size)
    start = int(rng.integers(0, size - max_side + 1)) if rng is not None else (size - max_side) // 2
    return slice(start, start + max_side)


def _collate(samples: list[_Sample], max_side: int, rng: np.random.Generator | None) -> Batch:
    """Crop each sample to at most max_side (random with rng, centred without), pad, stack."""
    windows = [
        (_crop_window(s.image.shape[0], max_side, rng), _crop_window(s.image.shape[1], max_side, rng)) for s in samples
    ]
    height = max(ys.stop - ys.start for ys, _ in windows)
    width = max(xs.stop - xs.start for _, xs in windows)
    n = len(samples)
    # Assembled in NumPy and wrapped at the end: NumPy copies are single-threaded, while torch's
    # intra-op threads make these small copies ~100x slower in a busy training process.
    images = np.zeros((n, 3, height, width), np.float16)
    flows = np.zeros((n, 2, height, width), np.float16)
    labels = np.zeros((n, height, width), np.int32)
    ignore = np.zeros((n, height, width), bool)
    valid = np.zeros((n, height, width), bool)
    for i, (sample, (ys, xs)) in enumerate(zip(samples, windows)):
        h, w = ys.stop - ys.start, xs.stop - xs.start
        image = sample.image[ys, xs]
        if image.dtype == np.uint16:
            image = np.minimum(image, _FLOAT16_MAX)  # values above float16's range would become inf
        images[i, : image.shape[2], :h, :w] = image.transpose(2, 0, 1)
        flows[i, :, :h, :w] = sample.flows[:, ys, xs]
        labels[i, :h, :w] = sample.labels[ys, xs]
        if sample.ignore is not None:
            ignore[i, :h, :w] = sample.ignore[ys, xs]
        valid[i, :h, :w] = True
    return Batch(
        images=torch.from_numpy(images),
        flows=torch.from_numpy(flows),
        labels=torch.from_numpy(labels),
        ignore=torch.from_numpy(ignore),
        valid=torch.from_numpy(valid),
        diameters=torch.tensor([s.diameter for s in samples], dtype=torch.float32),
        datasets=[s.group for s in samples],
        keys=[s.key for s in samples],
    )


def _geometry_draws(rng: np.random.Generator, n: int, augment: AugmentConfig) -> dict[str, np.ndarray]:
    """Each sample's zoom, angle (radians), flip and shift fractions: train.augment's laws
    (paper.md 1c/1d, Cellpose's random_rotate_and_resize), from one fixed-shape draw."""
    u = rng.random((n, 5))
    low, high = augment.zoom_log2_range
    return dict(
        zoom=2.0 ** (low + (high - low) * u[:, 0]),
        angle=np.deg2rad(augment.rotation_degrees * (2 * u[:, 1] - 1)),
        flip=u[:, 2] < augment.flip_prob,
        shift=u[:, 3:5] - 0.5,  # times the slack, per axis
    )


def _inverse_corners(centre, scale, angle, flip, shift, crop_size) -> np.ndarray:
    """(4, 2) source (y, x) of the output crop's corner pixels: train.augment's inverse affine map."""
    half = (crop_size - 1) / 2
    q = np.array([[-half, -half], [-half, half], [half, -half], [half, half]]) - shift
    cos, sin = math.cos(angle), math.sin(angle)
    src_y = (cos * q[:, 0] + sin * q[:, 1]) / scale
    src_x = (-sin * q[:, 0] + cos * q[:, 1]) / scale
    if flip:
        src_x = -src_x
    return np.stack([src_y + centre[0], src_x + centre[1]], axis=1)


def channel_bounds(image: np.ndarray, percentiles: tuple[float, float], max_pixels: int) -> np.ndarray:
    """(C, 2) float32 (low, high) percentiles of each channel of an (H, W, C) uint8/uint16 image.

    ``np.percentile``'s linear interpolation, on a strided subsample of at most about
    ``max_pixels`` pixels (train.augment's ``_percentile_bounds`` rule), read from a histogram
    of the integer values: exact, and a fraction of a sort's cost.
    """
    flat = image.reshape(-1, image.shape[-1])
    step = -(-flat.shape[0] // max_pixels)
    sub = flat[::step]
    n = sub.shape[0]
    position = np.array(percentiles, np.float64) / 100.0 * (n - 1)
    below = np.floor(position)
    ranks = np.concatenate([below, np.minimum(below + 1, n - 1)]).astype(np.int64)
    out = np.empty((image.shape[-1], 2), np.float32)
    for channel in range(image.shape[-1]):
        cumulative = np.cumsum(np.bincount(sub[:, channel]))
        values = np.searchsorted(cumulative, ranks, side="right").astype(np.float64)  # order statistics
        value0, value1 = values[:2], values[2:]
        out[channel] = value0 + (value1 - value0) * (position - below)
    return out


def _collate_windows(
    samples: list[_Sample], max_side: int, crop_rng: np.random.Generator, geometry_rng: np.random.Generator,
    augment: AugmentConfig,
) -> WindowBatch:
    """Draw each sample's geometry, cut out the window its warp reads, pack the windows."""
    n = len(samples)
    draws = _geometry_draws(geometry_rng, n, augment)
    crop = augment.crop_size
    offsets = dict.fromkeys(("image", "labels", "flows", "ignore"), 0)
    windows: list[tuple[slice, slice]] = []
    layout = np.zeros((n, len(LAYOUT_COLUMNS)), np.int64)
    transform = np.zeros((n, len(TRANSFORM_COLUMNS)), np.float32)
    bounds = np.full((n, 3, 2), np.nan, np.float32)
    for i, sample in enumerate(samples):
        # The region the old loader cropped to max_side (same draws): the image as augment sees it.
        ys = _crop_window(sample.image.shape[0], max_side, crop_rng)
        xs = _crop_window(sample.image.shape[1], max_side, crop_rng)
        h, w = ys.stop - ys.start, xs.stop - xs.start
        image = sample.image[ys, xs]
        bounds[i, : image.shape[2]] = channel_bounds(image, augment.percentiles, augment.percentile_max_pixels)
        rescale = augment.target_diameter / max(sample.diameter, augment.min_diameter)
        scale = rescale * draws["zoom"][i]
        # The crop centre may move as far as the scaled image covers the crop (train.augment's rule).
        slack = np.maximum(np.array([h, w]) * scale - crop, 0.0)
        shift = slack * draws["shift"][i]
        centre = np.array([(h - 1) / 2, (w - 1) / 2])
        corners = _inverse_corners(centre, scale, draws["angle"][i], draws["flip"][i], shift, crop)
        # Bilinear reads floor(p) and floor(p) + 1, nearest floor(p + 0.5); one more pixel each side
        # covers float32 rounding on the device.
        low = np.floor(corners.min(axis=0)).astype(np.int64) - 1
        high = np.floor(corners.max(axis=0)).astype(np.int64) + 3
        y0, x0 = int(np.clip(low[0], 0, h - 1)), int(np.clip(low[1], 0, w - 1))
        y1, x1 = int(np.clip(high[0], y0 + 1, h)), int(np.clip(high[1], x0 + 1, w))
        rows, cols = slice(ys.start + y0, ys.start + y1), slice(xs.start + x0, xs.start + x1)
        windows.append((rows, cols))
        wh, ww = y1 - y0, x1 - x0
        sizes = {"image": wh * ww * image.shape[2] * image.dtype.itemsize,
                 "labels": wh * ww * sample.labels.dtype.itemsize, "flows": 2 * wh * ww,
                 "ignore": wh * ww if sample.ignore is not None else 0}
        where = {}
        for name, nbytes in sizes.items():
            where[name] = offsets[name] if nbytes else -1
            offsets[name] += nbytes
        layout[i] = (where["image"], where["labels"], where["flows"], where["ignore"], wh, ww,
                     image.shape[2], image.dtype.itemsize, sample.labels.dtype.itemsize)
        transform[i] = (centre[0] - y0, centre[1] - x0, scale, draws["angle"][i], float(draws["flip"][i]),
                        shift[0], shift[1], draws["zoom"][i])
    # One copy of each window, straight into the batch's buffers (in shared memory in a worker,
    # so the DataLoader's hand-over to the rank copies nothing more).
    buffers = {name: _buffer(offsets[name], dtype)
               for name, dtype in (("image", torch.uint8), ("labels", torch.uint8), ("flows", torch.float16),
                                   ("ignore", torch.bool))}
    arrays = {name: buffer.numpy() for name, buffer in buffers.items()}
    for i, (sample, (rows, cols)) in enumerate(zip(samples, windows)):
        start_image, start_labels, start_flows, start_ignore, wh, ww, c = (int(v) for v in layout[i, :7])
        image, labels = sample.image, sample.labels
        out = arrays["image"][start_image: start_image + wh * ww * c * image.dtype.itemsize]
        out.view(image.dtype).reshape(wh, ww, c)[...] = image[rows, cols]
        out = arrays["labels"][start_labels: start_labels + wh * ww * labels.dtype.itemsize]
        out.view(labels.dtype).reshape(wh, ww)[...] = labels[rows, cols]
        arrays["flows"][start_flows: start_flows + 2 * wh * ww].reshape(2, wh, ww)[...] = sample.flows[:, rows, cols]
        if start_ignore >= 0:
            arrays["ignore"][start_ignore: start_ignore + wh * ww].reshape(wh, ww)[...] = sample.ignore[rows, cols]
    return WindowBatch(
        image_bytes=buffers["image"],
        label_bytes=buffers["labels"],
        flows=buffers["flows"],
        ignore=buffers["ignore"],
        layout=torch.from_numpy(layout),
        transform=torch.from_numpy(transform),
        bounds=torch.from_numpy(bounds),
        diameters=torch.tensor([s.diameter for s in samples], dtype=torch.float32),
        datasets=[s.group for s in samples],
        keys=[s.key for s in samples],
        image_itemsize=int(layout[:, 7].max()),
        label_itemsize=int(layout[:, 8].max()),
    )


def _buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor to fill, in shared memory inside a DataLoader worker (as torch's default_collate
    allocates its output there), in ordinary memory otherwise."""
    if numel == 0:  # no sample has this part (no ignore mask): one zero, so that indexing stays valid
        return torch.zeros(1, dtype=dtype)
    if get_worker_info() is None:
        return torch.empty(numel, dtype=dtype)
    base = torch.empty(0, dtype=dtype)
    return base.new(base._typed_storage()._new_shared(numel, device=base.device))


def _padding_batch(side: int = 16) -> Batch:
    """One slot of pure padding: nothing valid, everything ignored (see build_val_loader)."""
    return Batch(
        images=torch.zeros((1, 3, side, side), dtype=torch.float16),
        flows=torch.zeros((1, 2, side, side), dtype=torch.float16),
        labels=torch.zeros((1, side, side), dtype=torch.int32),
        ignore=torch.ones((1, side, side), dtype=torch.bool),
        valid=torch.zeros((1, side, side), dtype=torch.bool),
        diameters=torch.tensor([30.0]),
        datasets=[""],
        keys=[""],
    )


def _log_skip(rank: int, url: str, key: str, error: Exception | str) -> None:
    # Every rank logs its own skips (at warning level): each rank reads different samples.
    log.warning("rank %d worker %d: skipped sample %r of %s: %s", rank, _worker_id(), key, url, error)


def _log_damaged(rank: int, url: str, message: str) -> None:
    log.warning("rank %d worker %d: stopped reading damaged shard %s after its intact samples: %s",
                rank, _worker_id(), url, message)


# ------------------------------------------------------------------------------------------------
# Training stream: stages composed per group, then per batch
# ------------------------------------------------------------------------------------------------


class _Guard:
    """Counts shard picks since the last sample, so a group whose every shard is unreadable
    raises instead of looping forever."""

    def __init__(self, group: str, n_shards: int):
        self.group = group
        self.limit = 20 * n_shards + 20  # a readable shard among n is missed 20n times with p ~ e^-20
        self.picks = 0

    def pick(self) -> None:
        self.picks += 1
        if self.picks > self.limit:
            raise RuntimeError(
                f"group {self.group!r}: {self.limit} shard picks in a row gave no sample; its shards look "
                "unreadable (check with python -m shardgen verify)"
            )


def _resampled_shards(shards: tuple[str, ...], rng: np.random.Generator, guard: _Guard) -> Iterator[dict]:
    """Stage: an endless stream of shard urls picked uniformly with replacement."""
    while True:
        guard.pick()
        yield dict(url=shards[int(rng.integers(len(shards)))])


def _reset_guard(samples: Iterator[dict], guard: _Guard) -> Iterator[dict]:
    """Stage: passes samples through, telling the guard each time one arrives."""
    for sample in samples:
        guard.picks = 0
        yield sample


def _shard_samples(sources: Iterable[dict], on_error: Callable[[str, str], None], select_files=None) -> Iterator[dict]:
    """Stage: the raw samples of each shard in turn (webdataset). Shards are read one by one so
    that a sample never spans two of them; a read error ends its shard (the samples before it
    stand) and is passed to ``on_error(url, message)``."""
    for source in sources:
        def handler(error: Exception, url: str = source["url"]) -> bool:
            on_error(url, f"{type(error).__name__}: {error.args[0] if error.args else error}")
            return False  # stop this shard: after a damaged header the rest cannot be trusted
        yield from wds.tarfile_samples([source], handler=handler, select_files=select_files)


def _raw_bytes(sample: dict) -> int:
    return sum(len(v) for v in sample.values() if isinstance(v, bytes))


def _shuffled(samples: Iterator[dict], capacity: int, budget: int, rng: random.Random) -> Iterator[dict]:
    """Stage: a shuffle buffer of at most ``capacity`` samples and ``budget`` bytes (overshot by
    the two samples just taken in at most). Like webdataset's shuffle it takes two samples in per
    sample out until full, and starts yielding at a quarter full (by count or by bytes)."""
    buffer: list[dict] = []
    held = 0
    for sample in samples:
        buffer.append(sample)
        held += _raw_bytes(sample)
        if len(buffer) < capacity and held < budget:
            extra = next(samples, None)
            if extra is not None:
                buffer.append(extra)
                held += _raw_bytes(extra)
        if len(buffer) < max(1, capacity // 4) and held < budget // 4:
            continue
        while True:  # one out per sample in, more while over the budget
            index = rng.randrange(len(buffer))
            buffer[index], buffer[-1] = buffer[-1], buffer[index]
            chosen = buffer.pop()
            held -= _raw_bytes(chosen)
            yield chosen
            if held <= budget or not buffer:
                break
    rng.shuffle(buffer)  # a finite stream (tests) ends with the rest, in random order
    yield from buffer


def _group_stream(
    shards: tuple[str, ...], key: str, words: tuple[int, ...], buffer: int, budget: int, errors: list
) -> Iterator[dict]:
    """One group's endless stream of raw samples for one slot and chunk: resampled shards ->
    raw samples -> shuffle buffer. Tar-level errors are appended to ``errors`` as (url, message)."""
    guard = _Guard(key, len(shards))
    stream = _resampled_shards(shards, _rng(_TAG_SHARDS, *words), guard)
    stream = _shard_samples(stream, lambda url, message: errors.append((url, message)))
    stream = _reset_guard(stream, guard)
    return _shuffled(stream, buffer, budget, _py_rng(_TAG_SHUFFLE, *words))


class _Chunk:
    """One virtual worker's streams for ``chunk_steps`` of its batches."""

    def __init__(self, source: _TrainStream, virtual: int, chunk: int):
        self.source = source
        self.words = (source.cfg.seed, source.rank, virtual, chunk)
        self.virtual = virtual
        self.group_rng = _rng(_TAG_GROUPS, *self.words)
        self.probabilities = np.array([g.weight for g in source.groups])
        self.streams: dict[int, Iterator[dict]] = {}
        self.errors: list[tuple[str, str]] = []

    def next_raw_batch(self) -> list[tuple[int, dict]]:
        """(group index, raw sample) for each slot of the next batch: one draw and one raw sample per slot."""
        choices = self.group_rng.choice(len(self.probabilities), size=self.source.cfg.batch_size, p=self.probabilities)
        return [(int(g), next(self._stream(int(g)))) for g in choices]

    def _stream(self, index: int) -> Iterator[dict]:
        if index not in self.streams:  # created on first use: a rarely drawn group costs nothing until then
            group = self.source.groups[index]
            source = self.source
            shards, _ = _slot_shards(group, source.rank, source.world_size, self.virtual, source.n_virtual)
            words = (*self.words, index)
            budget = source.cfg.shuffle_bytes // len(source.groups)
            self.streams[index] = _group_stream(shards, group.key, words, source.cfg.shuffle_buffer, budget,
                                                self.errors)
        return self.streams[index]


class _TrainStream(IterableDataset):
    """Endless training batches of one rank starting at ``start_step`` (see the module docstring)."""

    def __init__(self, cfg: DataConfig, groups: tuple[_Group, ...], rank: int, world_size: int, start_step: int,
                 augment: AugmentConfig | None = None):
        super().__init__()
        self.cfg = cfg
        self.augment = augment
        self.groups = groups
        self.rank = rank
        self.world_size = world_size
        self.start_step = start_step
        self.n_virtual = max(cfg.num_workers, 1)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if n_workers != self.n_virtual:
            raise RuntimeError(f"stream defined for {self.n_virtual} workers runs in a DataLoader with {n_workers}")
        first_step = self.start_step + worker  # DataLoader order: worker 0 yields start_step, ...
        virtual = first_step % self.n_virtual
        for local, raw_batch, errors in self.raw_batches(virtual, first_step // self.n_virtual):
            yield self._assemble(virtual, local, raw_batch, errors)

    def raw_batches(self, virtual: int, first_local: int) -> Iterator[tuple[int, list[tuple[int, dict]], list]]:
        """(local index, [(group index, raw sample)] per slot, tar errors) of virtual worker
        ``virtual``'s batches from local index ``first_local`` on, nothing decoded."""
        local = first_local
        while True:
            chunk_index, offset = divmod(local, self.cfg.chunk_steps)
            chunk = _Chunk(self, virtual, chunk_index)
            for _ in range(offset):  # fast-forward a resumed chunk: same draws, same raw reads
                chunk.next_raw_batch()
            chunk.errors.clear()  # already reported by the run that produced those batches
            end = (chunk_index + 1) * self.cfg.chunk_steps
            for index in range(local, end):
                raw_batch = chunk.next_raw_batch()
                errors = list(chunk.errors)
                chunk.errors.clear()
                yield index, raw_batch, errors
            local = end

    def _assemble(self, virtual: int, local: int, raw_batch: list[tuple[int, dict]], errors: list) -> Batch:
        for url, message in errors:
            _log_damaged(self.rank, url, message)
        skipped = len(errors)
        samples = []
        for slot, (index, raw) in enumerate(raw_batch):
            group = self.groups[index]
            try:
                samples.append(_decode(raw, group.key))
                continue
            except ValueError as error:
                _log_skip(self.rank, raw.get("__url__", "?"), raw.get("__key__", "?"), error)
                skipped += 1
            sample, failed = self._refill(group, virtual, local, slot)
            samples.append(sample)
            skipped += failed
        step = virtual + local * self.n_virtual
        crop_rng = _rng(_TAG_CROP, self.cfg.seed, self.rank, step)
        if self.augment is None:
            batch = _collate(samples, self.cfg.max_side, crop_rng)
        else:
            geometry_rng = _rng(_TAG_GEOMETRY, self.cfg.seed, self.rank, step)
            batch = _collate_windows(samples, self.cfg.max_side, crop_rng, geometry_rng, self.augment)
        batch.step, batch.skipped = step, skipped
        return batch

    def _refill(self, group: _Group, virtual: int, local: int, slot: int) -> tuple[_Sample, int]:
        """A random sample of ``group`` for a slot whose sample was corrupt, drawn without touching
        the streams (so fast-forwarding never needs to decode). Returns it and the corrupt picks."""
        shards, sizes = _slot_shards(group, self.rank, self.world_size, virtual, self.n_virtual)
        rng = _rng(_TAG_REFILL, self.cfg.seed, self.rank, virtual, local, slot)
        failed = 0
        for _ in range(_MAX_REFILL_PICKS):
            which = int(rng.integers(len(shards)))
            position = int(rng.integers(sizes[which]))
            raws = _shard_samples([dict(url=shards[which])], lambda url, message: None)  # a short tar shows below
            raw = next(islice(raws, position, None), None)
            if raw is None:
                _log_skip(self.rank, shards[which], f"#{position}", "tar ends before this sample")
                failed += 1
                continue
            try:
                return _decode(raw, group.key), failed
            except ValueError as error:
                _log_skip(self.rank, shards[which], raw.get("__key__", "?"), error)
                failed += 1
        raise RuntimeError(
            f"group {group.key!r}: {_MAX_REFILL_PICKS} random samples in a row were corrupt; check its shards "
            "with python -m shardgen verify"
        )


def _identity(batch: Batch) -> Batch:
    return batch


def _pin() -> bool:
    return torch.cuda.is_available()


class TrainLoader:
    """Endless iterator of training batches: the batch for step ``start_step``, then the next, ...

    ``step`` is the step of the next batch. Resuming is either building the loader at the
    resumed step, or ``load_state_dict`` of a saved ``state_dict`` before the first ``next``;
    either way the batches equal those of an uninterrupted run. Workers start on the first
    ``next``.
    """

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, start_step: int = 0,
                 augment: AugmentConfig | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0; got {start_step}")
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.step = start_step
        self.augment = augment
        self.groups = _train_groups(cfg)
        self.weights = {g.key: g.weight for g in self.groups}  # probability each group is drawn with
        self.steps_per_epoch = steps_per_epoch(cfg, world_size)
        if rank == 0:
            _log_plan(self.groups, world_size, max(cfg.num_workers, 1))
        host = loader_host_bytes(cfg)
        log.info("rank %d loader host memory at most %.2f GiB: %.2f in flight, %.2f shuffle buffers, %.2f pinned",
                 rank, *(host[k] / 2**30 for k in ("total", "in_flight", "shuffle", "pinned")))
        self._iterator: Iterator[Batch] | None = None

    def _start(self) -> Iterator[Batch]:
        dataset = _TrainStream(self.cfg, self.groups, self.rank, self.world_size, self.step, self.augment)
        loader = DataLoader(
            dataset,
            batch_size=None,
            collate_fn=_identity,
            num_workers=self.cfg.num_workers,
            prefetch_factor=self.cfg.prefetch_factor if self.cfg.num_workers else None,
            pin_memory=self.cfg.pin_memory and _pin(),
            in_order=True,  # batches come from workers 0, 1, ... in turn: the step -> worker mapping relies on it
            worker_init_fn=_own_session,
        )
        return iter(loader)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        assert batch.step == self.step, f"loader yielded step {batch.step}, expected {self.step}"
        self.step += 1
        return batch

    def state_dict(self) -> dict:
        """What defines the stream from here on: the next step, and the settings it depends on."""
        return dict(step=self.step, seed=self.cfg.seed, world_size=self.world_size,
                    num_workers=self.cfg.num_workers, batch_size=self.cfg.batch_size)

    def load_state_dict(self, state: dict) -> None:
        """Continue at ``state["step"]`` (restarting the workers if they run)."""
        now = self.state_dict()
        changed = {k: (state[k], now[k]) for k in now if k != "step" and k in state and state[k] != now[k]}
        if changed and self.rank == 0:
            log.warning("data settings changed since the checkpoint (saved, now): %s; from step %d the batches "
                        "differ from those of an uninterrupted run", changed, state["step"])
        self.close()
        self.step = int(state["step"])

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._iterator = None


def _log_plan(groups: tuple[_Group, ...], world_size: int, n_virtual: int) -> None:
    slots = world_size * n_virtual
    for group in groups:
        split = "split over" if len(group.shards) >= slots else "each resampled whole by"
        log.info("train group %-24s weight %.4f  %4d shards (%6d samples) %s %d slots",
                 group.key, group.weight, len(group.shards), sum(group.sizes), split, slots)
    few = [g.key for g in groups if len(g.shards) < slots]
    if few and slots > 1:
        log.warning("groups %s have fewer shards than the %d (rank, worker) slots: every slot resamples all of "
                    "their shards, so ranks may see the same samples in one step", few, slots)


def build_train_loader(
    cfg: DataConfig, rank: int, world_size: int, start_step: int = 0, augment: AugmentConfig | None = None
) -> TrainLoader:
    """Endless training batches of ``rank`` from global step ``start_step`` on (an iterator).

    With ``augment`` the batches are :class:`WindowBatch` es: the CPU draws each sample's geometry
    from the step's seed and sends only the window the warp reads (what the trainer uses).
    Without it they are whole-sample :class:`Batch` es, padded to the batch's largest sample.
    """
    return TrainLoader(cfg, rank, world_size, start_step, augment)


# ------------------------------------------------------------------------------------------------
# Validation: every held-out sample exactly once across ranks, the same batch count on each rank
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    shard: str
    key: str
    group: str


def _val_batches(cfg: DataConfig, rank: int, world_size: int) -> list[list[_Ref]]:
    """This rank's validation batches: a contiguous share of the samples sorted by (group, key),
    cut into batches; ranks with fewer batches get empty ones (yielded as padding)."""
    root = Path(cfg.root).resolve()
    per_group: dict[str, list[_Ref]] = defaultdict(list)
    for row in _read_manifest(root, cfg.val_splits):
        group = group_key(row["dataset"], row["subset"])
        per_group[group].append(_Ref(_shard_url(cfg, root, row["shard"]), row["key"], group))
    refs = []
    for group in sorted(per_group):
        refs += sorted(per_group[group], key=lambda r: r.key)[: cfg.val_limit]
    bounds = np.linspace(0, len(refs), world_size + 1).round().astype(int)
    counts = np.diff(bounds)
    n_batches = int(math.ceil(counts.max() / cfg.batch_size)) if len(refs) else 0
    mine = refs[bounds[rank]: bounds[rank + 1]]
    batches = [mine[i: i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
    return batches + [[] for _ in range(n_batches - len(batches))]


class _ValStream(IterableDataset):
    """One rank's validation batches; DataLoader worker w takes a contiguous block of them."""

    def __init__(self, cfg: DataConfig, batches: list[list[_Ref]], rank: int):
        super().__init__()
        self.cfg = cfg
        self.batches = batches
        self.rank = rank

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        block = np.array_split(np.arange(len(self.batches)), n_workers)[worker]
        batches = [self.batches[i] for i in block]
        wanted = {ref.key for batch in batches for ref in batch}
        shards = list(dict.fromkeys(ref.shard for batch in batches for ref in batch))
        raws = _shard_samples(
            [dict(url=s) for s in shards],
            lambda url, message: _log_damaged(self.rank, url, message),  # its missing samples are counted below
            select_files=lambda name: name.rsplit("/", 1)[-1].split(".", 1)[0] in wanted,
        )
        arrived: dict[str, dict] = {}
        for batch in batches:
            keys = {ref.key for ref in batch}
            while not keys <= arrived.keys():  # samples arrive in shard order, which is key order
                raw = next(raws, None)
                if raw is None:
                    break
                arrived[raw["__key__"]] = raw
            yield self._assemble(batch, [arrived.pop(ref.key, None) for ref in batch])

    def _assemble(self, refs: list[_Ref], raws: list[dict | None]) -> Batch:
        samples, skipped = [], 0
        for ref, raw in zip(refs, raws):
            try:
                if raw is None:
                    raise ValueError("not found in its shard (truncated tar?)")
                samples.append(_decode(raw, ref.group))
            except ValueError as error:
                _log_skip(self.rank, ref.shard, ref.key, error)
                skipped += 1
        batch = _collate(samples, self.cfg.max_side, None) if samples else _padding_batch()
        batch.skipped = skipped
        return batch


def build_val_loader(cfg: DataConfig, rank: int, world_size: int) -> DataLoader:
    """Validation batches of ``rank``: the ``cfg.val_splits`` samples (at most ``val_limit`` per
    group), each exactly once over all ranks, deterministic and finite (iterate it once per
    validation).

    Every rank yields the same number of batches, so FSDP's collectives stay in step: a rank
    with fewer samples ends with a padding batch of one slot whose key and group are "", with
    ``valid`` all False and ``ignore`` all True; leave such slots out of the metrics. Samples
    larger than ``max_side`` are centre-cropped. A corrupt sample is skipped (``Batch.skipped``)
    and its batch is one smaller.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}); got {rank}")
    batches = _val_batches(cfg, rank, world_size)
    workers = min(cfg.num_workers, len(batches))
    return DataLoader(
        _ValStream(cfg, batches, rank),
        batch_size=None,
        collate_fn=_identity,
        num_workers=workers,
        prefetch_factor=cfg.prefetch_factor if workers else None,
        pin_memory=cfg.pin_memory and _pin(),
        worker_init_fn=_own_session,
    )


def _own_session(worker_id: int) -> None:
    """Move a loader worker into a session of its own.

    A stop signal sent to the trainer's whole process group (a scheduler, Ctrl-C, torchrun's
    SIGTERM to its workers' groups) must reach the trainer, which checkpoints and then shuts its
    workers down; if it also killed the workers, torch would raise "DataLoader worker is killed"
    in the middle of the step instead. The workers still exit with their parent (torch's
    watchdog), and the DataLoader can still terminate them.
    """
    os.setsid()


__all__ = [
    "Batch",
    "DataConfig",
    "TrainLoader",
    "WindowBatch",
    "build_train_loader",
    "build_val_loader",
    "loader_host_bytes",
    "steps_per_epoch",
    "train_weights",
]
