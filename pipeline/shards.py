"""The shard format: what ``shardgen`` writes and ``train`` reads, defined once.

A shard is a WebDataset tar. Each sample is four members sharing one key (no dots, no slashes):

* ``<key>.image.npy.zst``  image (H, W, C) uint8 or uint16, C in 1..3, project channel order
* ``<key>.labels.npy.zst`` instance labels (H, W) uint16 (uint32 past 65,535 objects), ids 1..N
* ``<key>.flows.npy.zst``  unit flows (2, H, W) float16, (dy, dx), from ``pipeline.flows``
* ``<key>.json``           metadata (see :class:`SampleMeta`)
* ``<key>.ignore.npy.zst`` optional: (H, W) bool, True where the annotation is "don't care"
  (e.g. MoNuSAC's ambiguous regions); the loss leaves those pixels out

Arrays are ``.npy`` bytes (``np.save``, so dtype and shape travel with them) compressed with
zstandard. Shards live at ``<root>/<dataset>/<dataset>-<split>-NNNNNN.tar``; ``<root>/
manifest.parquet`` has one row per sample (:data:`MANIFEST_SCHEMA`), ``<root>/rejects.parquet``
one row per source item that did not become a sample, and ``<root>/weights.yaml`` the
per-dataset sampling weights.
"""

from __future__ import annotations

import io
import json
import math
import re
import struct
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import zstandard

# Member suffixes of one sample inside a shard.
IMAGE_KEY = "image.npy.zst"
LABELS_KEY = "labels.npy.zst"
FLOWS_KEY = "flows.npy.zst"
META_KEY = "json"
IGNORE_KEY = "ignore.npy.zst"
SAMPLE_KEYS = (IMAGE_KEY, LABELS_KEY, FLOWS_KEY, META_KEY)  # always present; IGNORE_KEY optional

MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
WEIGHTS_FILE = "weights.yaml"

# zstd level 3 is the library default: ~4x faster to write than level 9 for ~5% more bytes, and
# decoding speed (what training pays) barely depends on the level.
_ZSTD_LEVEL = 3

# Splits whose samples are drawn in training (weights.yaml counts them, the trainer streams them);
# the others (test, val, tuning, fold3) are for validation and evaluation. PanNuke's and IHC TMA's
# folds 1-2 train and fold 3 tests, the common protocol.
TRAIN_SPLITS = ("train", "all", "fold1", "fold2")


def group_key(dataset: str, subset: str) -> str:
    """A sampling group's name in weights.yaml: the dataset, or "dataset/subset"."""
    return f"{dataset}/{subset}" if subset else dataset


MANIFEST_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("subset", pa.string()),  # "" or a part of the dataset with its own weight (omnipose bact_phase)
        ("key", pa.string()),
        ("shard", pa.string()),  # path relative to the shard root
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("channels", pa.int8()),
        ("n_cells", pa.int32()),
        ("diameter", pa.float32()),
        ("source", pa.string()),  # the source item, relative to the dataset folder
        ("modality", pa.string()),
        ("channel_names", pa.string()),  # comma-separated, one name per image channel
    ]
)

REJECTS_SCHEMA = pa.schema(
    [
        ("dataset", pa.string()),
        ("subset", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True, kw_only=True)
class SampleMeta:
    """The json member of a sample; the manifest row minus ``shard``."""

    dataset: str
    """Converter name, as ``python -m shardgen --list`` prints it."""
    subset: str
    """Part of the dataset that can carry its own sampling weight ("" when the dataset has none)."""
    key: str
    """WebDataset key of the sample, unique over the whole shard root."""
    split: str
    """Split as the dataset's authors publish it (train, test, val, ...)."""
    source: str
    """The source item relative to the dataset folder (``file`` or ``file[index]``)."""
    height: int
    width: int
    channels: int
    n_cells: int
    diameter: float
    """Cellpose's diameter: median over objects of sqrt(area) / (sqrt(pi) / 2)."""
    modality: str
    """fluorescence, brightfield, phase, he, ihc, ... (see shardgen's converters)."""
    channel_names: tuple[str, ...]
    """What each image channel holds, in the project's channel order."""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes | str) -> SampleMeta:
        fields = json.loads(data)
        fields["channel_names"] = tuple(fields["channel_names"])
        return cls(**fields)

    def manifest_row(self, shard: str) -> dict:
        row = asdict(self)
        row["channel_names"] = ",".join(self.channel_names)
        row["shard"] = shard
        return row


def cellpose_diameter(labels: np.ndarray) -> float:
    """Median over objects of sqrt(area) / (sqrt(pi) / 2): Cellpose's diameter definition.

    0 for an image without objects.

    >>> labels = np.zeros((20, 20), np.uint16)
    >>> labels[2:6, 2:6] = 1
    >>> round(cellpose_diameter(labels), 3)  # a 4x4 square: sqrt(16) / (sqrt(pi) / 2)
    4.514
    """
    areas = np.bincount(labels.reshape(-1).astype(np.int64))[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        return 0.0
    return float(np.median(np.sqrt(areas)) / (math.sqrt(math.pi) / 2))


def encode_array(array: np.ndarray) -> bytes:
    """``.npy`` bytes of ``array``, zstandard-compressed."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(buffer.getvalue())


# The header np.save writes for a C-ordered array: parsed with a regex, not numpy's literal_eval.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|][a-zA-Z0-9]+)', 'fortran_order': False, 'shape': \(([0-9, ]*)\), *\}")


def decode_array(data: bytes, readonly: bool = False) -> np.ndarray:
    """Inverse of :func:`encode_array`.

    ``readonly=True`` returns a read-only array over the decompressed bytes instead of a copy
    (what the training loader takes: it only slices and copies windows out).
    """
    raw = zstandard.ZstdDecompressor().decompress(data)
    if readonly and raw[:6] == b"\x93NUMPY" and raw[6] in (1, 2):
        size, start = (struct.unpack("<H", raw[8:10])[0], 10) if raw[6] == 1 else (struct.unpack("<I", raw[8:12])[0], 12)
        match = _NPY_HEADER.match(raw[start: start + size].decode("latin1"))
        if match:
            shape = tuple(int(v) for v in match.group(2).split(",") if v.strip())
            return np.frombuffer(raw, dtype=np.dtype(match.group(1)), offset=start + size).reshape(shape)
    return np.load(io.BytesIO(raw), allow_pickle=False)


def encode_sample(
    image: np.ndarray,
    labels: np.ndarray,
    flows: np.ndarray,
    meta: SampleMeta,
    ignore: np.ndarray | None = None,
) -> dict:
    """WebDataset sample dict (``__key__`` plus the members) ready for a TarWriter."""
    sample = {
        "__key__": meta.key,
        IMAGE_KEY: encode_array(image),
        LABELS_KEY: encode_array(labels),
        FLOWS_KEY: encode_array(flows.astype(np.float16)),
        META_KEY: meta.to_json(),
    }
    if ignore is not None:
        sample[IGNORE_KEY] = encode_array(ignore.astype(bool))
    return sample


# What a sample's arrays may be (the writer produces exactly these; readers accept nothing else).
IMAGE_DTYPES = (np.uint8, np.uint16)
LABEL_DTYPES = (np.uint16, np.uint32)
FLOW_DTYPE = np.float16
MAX_CHANNELS = 3
# Flows are stored as float16: a unit vector's length comes back within ~1e-3 of 1.
_UNIT_TOLERANCE = 1e-2
# At most this fraction of an image's object pixels may have zero flow (object centres,
# one-pixel objects); more means the flows were not computed from these labels.
_MAX_ZERO_FRACTION = 0.05


def image_problem(image: np.ndarray) -> str | None:
    """Why ``image`` cannot be a sample's image (None when it can): (H, W, 1..3) uint8/uint16, H, W > 0."""
    if image.ndim != 3 or not 1 <= image.shape[2] <= MAX_CHANNELS:
        return f"image must be (H, W, C) with 1 to {MAX_CHANNELS} channels; got shape {image.shape}"
    if image.dtype not in IMAGE_DTYPES:
        return f"image must be uint8 or uint16; got {image.dtype}"
    if image.shape[0] == 0 or image.shape[1] == 0:
        return f"empty image {image.shape}"
    return None


def sample_problems(
    image: np.ndarray,
    labels: np.ndarray,
    flows: np.ndarray,
    meta: SampleMeta,
    ignore: np.ndarray | None,
    *,
    key: str | None = None,
    content: bool = False,
) -> list[str]:
    """Everything that makes a decoded sample invalid; an empty list means it is sound.

    The structural checks (dtypes, shapes, agreement with the json, tar key, a positive
    diameter) are cheap and run everywhere a sample is read: the builder before writing,
    ``shardgen verify`` and the training loader. ``content=True`` adds what needs a pass over
    the pixels (labels are 1..n_cells; flows are unit length inside objects, or 0 where the heat
    gradient vanishes, and 0 outside), which ``shardgen verify`` runs.
    """
    problems = []
    problem = image_problem(image)
    if problem:
        problems.append(problem)
    h, w, c = meta.height, meta.width, meta.channels
    if image.shape != (h, w, c):
        problems.append(f"json says {(h, w, c)} but the image is {image.shape}")
    if key is not None and meta.key != key:
        problems.append(f"json key {meta.key!r} differs from the tar key {key!r}")
    if not (math.isfinite(meta.diameter) and meta.diameter > 0):
        problems.append(f"diameter must be positive; got {meta.diameter}")
    if ignore is not None and ignore.shape != (h, w):
        problems.append(f"ignore mask is {ignore.shape}, expected {(h, w)}")
    if labels.shape != (h, w) or labels.dtype not in LABEL_DTYPES:
        problems.append(f"labels are {labels.dtype} {labels.shape}, expected uint16/uint32 {(h, w)}")
        return problems
    if flows.shape != (2, h, w) or flows.dtype != FLOW_DTYPE:
        problems.append(f"flows are {flows.dtype} {flows.shape}, expected float16 {(2, h, w)}")
        return problems
    if content:
        problems += _content_problems(labels, flows, meta.n_cells)
    return problems


def _content_problems(labels: np.ndarray, flows: np.ndarray, n_cells: int) -> list[str]:
    problems = []
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not np.array_equal(ids, np.arange(1, n_cells + 1)):
        problems.append(f"label ids are not 1..{n_cells} ({len(ids)} distinct ids)")
    inside = labels > 0
    if np.abs(flows[:, ~inside]).max(initial=0) != 0:
        problems.append("flows are not 0 outside objects")
    norm = np.sqrt((flows[:, inside].astype(np.float32) ** 2).sum(axis=0))
    if not np.isfinite(norm).all():
        problems.append("flows hold non-finite values")
    elif np.any((np.abs(norm - 1) > _UNIT_TOLERANCE) & (norm != 0)):
        problems.append(f"flows inside objects are not unit length (lengths {norm.min():.3f}..{norm.max():.3f})")
    elif norm.size and np.mean(norm == 0) > _MAX_ZERO_FRACTION:
        problems.append(f"{np.mean(norm == 0):.1%} of object pixels have zero flow")
    return problems


def decode_sample(
    sample: dict, readonly: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, SampleMeta, np.ndarray | None]:
    """(image, labels, flows, meta, ignore) from a raw WebDataset sample dict of bytes.

    ``ignore`` is None when the sample has no don't-care mask. ``readonly``: see :func:`decode_array`. Raises ValueError naming the key
    and the member when a member is missing or undecodable.
    """
    key = sample.get("__key__", "?")
    missing = [k for k in SAMPLE_KEYS if k not in sample]
    if missing:
        raise ValueError(f"sample {key!r} lacks member(s) {missing}; expected {list(SAMPLE_KEYS)}")
    try:
        image = decode_array(sample[IMAGE_KEY], readonly)
        labels = decode_array(sample[LABELS_KEY], readonly)
        flows = decode_array(sample[FLOWS_KEY], readonly)
        meta = SampleMeta.from_json(sample[META_KEY])
        ignore = decode_array(sample[IGNORE_KEY], readonly) if IGNORE_KEY in sample else None
    except Exception as error:  # zstd, npy and json errors all mean the same thing here
        raise ValueError(f"sample {key!r} does not decode: {type(error).__name__}: {error}") from error
    return image, labels, flows, meta, ignore
