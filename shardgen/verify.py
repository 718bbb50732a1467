"""Re-read every shard under a root and check it against the manifest.

Checks that every array decodes, shapes and dtypes agree with each other and with the sample's
json, labels are 1..n_cells, flows are unit length inside objects (or exactly 0, where the heat
gradient vanishes) and 0 outside, the manifest lists exactly the samples the tars hold, and no
tar is missing or unlisted. Returns the problems found, each naming the shard and the key.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from pipeline.shards import MANIFEST_FILE, REJECTS_FILE, WEIGHTS_FILE, decode_sample, sample_problems

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
    return problems + sample_problems(image, labels, flows, meta, ignore, key=raw["__key__"], content=True)
