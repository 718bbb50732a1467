"""Re-read every shard under a root and check it against the manifest.

Checks that every array decodes, shapes and dtypes agree with each other and with the sample's
json, labels are 1..n_cells, flows are unit length inside objects (or exactly 0, where the heat
gradient vanishes) and 0 outside, the manifest lists exactly the samples the tars hold, and no
tar is missing or unlisted. Returns the problems found, each naming the shard and the key.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from pipeline.shards import MANIFEST_FILE, REJECTS_FILE, WEIGHTS_FILE, decode_sample

# Flows are stored as float16: a unit vector's length comes back within ~1e-3 of 1.
_UNIT_TOLERANCE = 1e-2
# At most this fraction of an image's object pixels may have zero flow (object centres,
# one-pixel objects); more means the flows were not computed from these labels.
_MAX_ZERO_FRACTION = 0.05


def verify(root: str | Path) -> list[str]:
    """All problems found under ``root``; an empty list means the shards are sound."""
    root = Path(root)
    problems: list[str] = []
    for name in (MANIFEST_FILE, REJECTS_FILE, WEIGHTS_FILE):
        if not (root / name).is_file():
            problems.append(f"{root / name}: missing")
    if not (root / MANIFEST_FILE).is_file():
        return problems
    try:
        manifest = pq.read_table(root / MANIFEST_FILE).to_pylist()
    except Exception as error:
        return problems + [f"{root / MANIFEST_FILE}: unreadable ({error})"]

    listed = defaultdict(list)
    for row in manifest:
        listed[row["shard"]].append(row)
    on_disk = {p.relative_to(root).as_posix() for p in root.glob("*/*.tar")}
    for shard in sorted(on_disk - set(listed)):
        problems.append(f"{shard}: tar not listed in {MANIFEST_FILE}")
    for shard in sorted(set(listed) - on_disk):
        problems.append(f"{shard}: listed in {MANIFEST_FILE} but missing")

    for shard in tqdm(sorted(set(listed) & on_disk), desc="verify", unit="shard"):
        problems += _verify_shard(root, shard, listed[shard])
    return problems


def _verify_shard(root: Path, shard: str, rows: list[dict]) -> list[str]:
    expected = {row["key"]: row for row in rows}
    problems, seen = [], []
    try:
        for raw in wds.WebDataset(str(root / shard), shardshuffle=False, empty_check=False):
            key = raw["__key__"]
            seen.append(key)
            if key not in expected:
                problems.append(f"{shard}: sample {key!r} is not in the manifest")
                continue
            problems += [f"{shard}: {key}: {p}" for p in _check_sample(raw, expected[key])]
    except Exception as error:
        problems.append(f"{shard}: tar unreadable after {len(seen)} samples ({type(error).__name__}: {error})")
    missing = [k for k in expected if k not in set(seen)]
    if missing:
        problems.append(f"{shard}: {len(missing)} manifest sample(s) not in the tar, e.g. {missing[0]!r}")
    if len(seen) != len(set(seen)):
        problems.append(f"{shard}: duplicate keys in the tar")
    return problems


def _check_sample(raw: dict, row: dict) -> list[str]:
    try:
        image, labels, flows, meta, ignore = decode_sample(raw)
    except ValueError as error:
        return [str(error)]
    problems = []
    for field in ("dataset", "subset", "split", "source", "height", "width", "channels", "n_cells", "modality"):
        if getattr(meta, field) != row[field]:
            problems.append(f"json {field}={getattr(meta, field)!r} but manifest has {row[field]!r}")
    h, w, c = meta.height, meta.width, meta.channels
    if image.shape != (h, w, c) or image.dtype not in (np.uint8, np.uint16):
        problems.append(f"image is {image.dtype} {image.shape}, expected uint8/uint16 {(h, w, c)}")
    if labels.shape != (h, w) or labels.dtype not in (np.uint16, np.uint32):
        problems.append(f"labels are {labels.dtype} {labels.shape}, expected uint16/uint32 {(h, w)}")
        return problems
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not np.array_equal(ids, np.arange(1, meta.n_cells + 1)):
        problems.append(f"label ids are not 1..{meta.n_cells} ({len(ids)} distinct ids)")
    if flows.shape != (2, h, w) or flows.dtype != np.float16:
        problems.append(f"flows are {flows.dtype} {flows.shape}, expected float16 {(2, h, w)}")
        return problems
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
    if ignore is not None and ignore.shape != (h, w):
        problems.append(f"ignore mask is {ignore.shape}, expected {(h, w)}")
    return problems
