"""Source items -> checked samples -> WebDataset shards, in parallel, resumable, byte-reproducible.

For each (dataset, subset, split) group the converter's items are processed in order by worker
processes (load, check, renumber, flows, encode) and written by this process in that same order,
so the output never depends on which worker finished first. A shard closes when the next sample
would take it past ``max_samples`` or ``max_bytes``. Each shard is written to a temporary file
and renamed into place; then a small JSON "sidecar" records which items it covered, its manifest
rows and the items rejected on the way. A rerun reads the sidecars, skips the finished shards,
and carries on from the first item not yet covered; because everything is deterministic (fixed
tar metadata, single-threaded zstd, ordered writes) the result is byte-identical to an
uninterrupted run. ``manifest.parquet``, ``rejects.parquet`` and ``weights.yaml`` are rebuilt
from all sidecars under the output root at the end of every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import fastremap
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from tqdm import tqdm

from pipeline.flows import masks_to_flows
from pipeline.shards import (
    MANIFEST_FILE,
    MANIFEST_SCHEMA,
    REJECTS_FILE,
    REJECTS_SCHEMA,
    SampleMeta,
    cellpose_diameter,
    encode_sample,
    image_problem,
    sample_problems,
)
from shardgen.base import Item, ItemError
from shardgen.datasets import get_converter
from shardgen.weights import write_weights

log = logging.getLogger(__name__)

SIDECAR_FORMAT = 1


@dataclass(frozen=True, kw_only=True)
class BuildConfig:
    max_samples: int = 1000
    """A shard closes before it would hold more samples than this."""
    max_bytes: int = 256 * 2**20
    """A shard closes before it would grow past this many bytes (a single larger sample gets a
    shard of its own)."""
    workers: int = 0
    """Worker processes; 0 runs everything in this process (tests, debugging)."""
    limit: int | None = None
    """Convert only the first N items of each split (a quick look at a new dataset)."""

    def __post_init__(self) -> None:
        if self.max_samples < 1:
            raise ValueError(f"BuildConfig.max_samples must be >= 1; got {self.max_samples}")
        if self.max_bytes < 1:
            raise ValueError(f"BuildConfig.max_bytes must be >= 1; got {self.max_bytes}")
        if self.workers < 0:
            raise ValueError(f"BuildConfig.workers must be >= 0; got {self.workers}")
        if self.limit is not None and self.limit < 0:
            raise ValueError(f"BuildConfig.limit must be >= 0 or None; got {self.limit}")


# ------------------------------------------------------------------------------------------------
# One item -> one encoded sample (runs in the workers)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Done:
    sample: dict
    """The encoded WebDataset sample (bytes per member)."""
    row: dict
    """Its manifest row, without ``shard`` (filled in when written)."""
    nbytes: int


@dataclass(frozen=True)
class _Rejected:
    reason: str


def make_sample(name: str, root: str, item: Item, key: str, converter: str | None = None) -> _Done | _Rejected:
    """Load, check and encode one item of dataset ``name`` (read by converter ``converter``, by
    default the one of that name); every failure becomes a reject with its reason."""
    try:
        converter = get_converter(converter or name)
        loaded = converter.load(Path(root), item)
        image, labels, ignore = _check_arrays(loaded.image, loaded.labels, loaded.ignore)
        if labels.max() == 0:
            return _Rejected("no objects")
        flows = masks_to_flows(labels)
        channel_names = tuple(loaded.channel_names or converter.INFO.channel_names)
        if len(channel_names) != image.shape[2]:
            raise ItemError(f"image has {image.shape[2]} channels but {len(channel_names)} channel names {channel_names}")
        meta = SampleMeta(
            dataset=name,
            subset=item.subset,
            key=key,
            split=item.split,
            source=item.source,
            height=int(image.shape[0]),
            width=int(image.shape[1]),
            channels=int(image.shape[2]),
            n_cells=int(labels.max()),
            diameter=round(cellpose_diameter(labels), 3),
            modality=loaded.modality or converter.INFO.modality,
            channel_names=channel_names,
        )
        problems = sample_problems(image, labels, flows.astype(np.float16), meta, ignore)
        if problems:  # the checks every reader of the shards applies: never write what they would skip
            raise ItemError("; ".join(problems))
        sample = encode_sample(image, labels, flows, meta, ignore)
        nbytes = sum(len(v) for k, v in sample.items() if k != "__key__")
        return _Done(sample, meta.manifest_row(shard=""), nbytes)
    except MemoryError:
        return _Rejected("out of memory while converting (image too large for one worker?)")
    except Exception as error:  # one bad item never stops the run; its reason is kept
        return _Rejected(f"{type(error).__name__}: {error}")


def _check_arrays(image, labels, ignore):
    """Validate a converter's output and renumber the labels 1..N (uint16, or uint32 past 65535)."""
    image = np.asarray(image)
    labels = np.asarray(labels)
    problem = image_problem(image)
    if problem:
        raise ItemError(problem)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ItemError(f"labels must be a 2-D integer image; got {labels.dtype} {labels.shape}")
    if labels.shape != image.shape[:2]:
        raise ItemError(f"image/label size mismatch: image {image.shape[:2]}, labels {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ItemError(f"labels hold negative ids (min {labels.min()})")
    # Renumber 1..N keeping the source's id order (object k is the k-th smallest source id).
    ids = fastremap.unique(labels)
    ids = ids[ids > 0]
    n = len(ids)
    dtype = np.uint16 if n <= 65535 else np.uint32
    if n and ids[-1] == n:
        labels = labels.astype(dtype)  # already 1..N
    else:
        labels = np.searchsorted(np.concatenate([[0], ids]), labels).astype(dtype)
    if ignore is not None:
        ignore = np.asarray(ignore, dtype=bool)
        if ignore.shape != labels.shape:
            raise ItemError(f"ignore mask shape {ignore.shape} differs from the labels {labels.shape}")
        if not ignore.any():
            ignore = None
    return np.ascontiguousarray(image), labels, ignore


def _init_worker() -> None:
    # Each worker converts one image at a time; the parallelism is across workers, so numba's
    # own threads would only oversubscribe the cores.
    import numba

    numba.set_num_threads(1)


def _worker_pool(workers: int):
    """A process pool for the whole build (spawning costs seconds), or a no-op context for 0."""
    if workers == 0:
        return contextlib.nullcontext(None)
    # spawn, not fork: the parent may hold numba/OpenMP threads, which do not survive a fork.
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)


def _ordered_map(fn: Callable, tasks: Iterable[tuple], pool: ProcessPoolExecutor | None) -> Iterator:
    """``fn(*task)`` for each task, results in task order, at most ~2 tasks per worker in flight.

    The window bounds memory: finished samples wait for their turn to be written, and a slow
    item can hold back at most the window behind it.
    """
    if pool is None:
        for task in tasks:
            yield fn(*task)
        return
    window = 2 * pool._max_workers
    pending = deque()
    for task in tasks:
        pending.append(pool.submit(fn, *task))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# ------------------------------------------------------------------------------------------------
# Writing one (dataset, subset, split) group
# ------------------------------------------------------------------------------------------------


def _group_prefix(name: str, subset: str, split: str) -> str:
    """File-name and key prefix of a group. WebDataset splits a member name at its first dot
    into key and member, so anything but letters, digits, ``_`` and ``-`` becomes ``_``."""
    parts = (re.sub(r"[^A-Za-z0-9_-]", "_", part) for part in (name, subset, split) if part)
    return "-".join(parts)


def _fingerprint(items: list[Item]) -> str:
    """Identifies the item list, so a resume never mixes two different sources."""
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.source.encode() + b"\0")
    return digest.hexdigest()[:16]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class _GroupWriter:
    """Shards of one group: rollover by count and bytes, tar then sidecar, both atomic."""

    def __init__(self, out: Path, name: str, prefix: str, fingerprint: str, config: BuildConfig,
                 shard_index: int, first_item: int):
        self.folder = out / name
        self.name = name
        self.prefix = prefix
        self.fingerprint = fingerprint
        self.config = config
        self.shard_index = shard_index
        self.first_item = first_item
        self._open_state()

    def _open_state(self) -> None:
        self.tar_path = self.folder / f"{self.prefix}-{self.shard_index:06d}.tar"
        self.tmp_path = self.tar_path.with_name(self.tar_path.name + ".tmp")
        self.stream = None
        self.tar = None
        self.rows: list[dict] = []
        self.rejects: list[dict] = []
        self.nbytes = 0

    def add_sample(self, index: int, done: _Done) -> None:
        full = self.rows and (
            len(self.rows) >= self.config.max_samples or self.nbytes + done.nbytes > self.config.max_bytes
        )
        if full:
            self.close(next_item=index)
            self.shard_index += 1
            self.first_item = index
            self._open_state()
        if self.tar is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.stream = open(self.tmp_path, "wb")
            # Fixed mtime/owner/mode: the same input gives byte-identical tars.
            self.tar = wds.TarWriter(self.stream, encoder=False, mtime=0, user="cpsam", group="cpsam", mode=0o644)
        self.tar.write(done.sample)
        row = dict(done.row, shard=f"{self.name}/{self.tar_path.name}")
        self.rows.append(row)
        self.nbytes += done.nbytes

    def add_reject(self, row: dict) -> None:
        self.rejects.append(row)

    def close(self, next_item: int) -> None:
        """Finish the current shard (if it has samples) and write its sidecar (if it covered items)."""
        if next_item == self.first_item:
            return
        shard = None
        if self.tar is not None:
            self.tar.close()
            self.stream.close()
            os.replace(self.tmp_path, self.tar_path)
            shard = f"{self.name}/{self.tar_path.name}"
        sidecar = {
            "format": SIDECAR_FORMAT,
            "fingerprint": self.fingerprint,
            "shard": shard,
            "bytes": self.tar_path.stat().st_size if shard else 0,
            "first_item": self.first_item,
            "next_item": next_item,
            "samples": self.rows,
            "rejects": self.rejects,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.tar_path.with_suffix(".json"), json.dumps(sidecar, sort_keys=True, indent=0).encode())


def _finished_sidecars(folder: Path, prefix: str, fingerprint: str) -> list[dict]:
    """Sidecars of this group's finished shards, in order; stale partial files removed."""
    for stale in folder.glob(f"{prefix}-*.tmp"):
        stale.unlink()
    done = []
    while True:
        path = folder / f"{prefix}-{len(done):06d}.json"
        if not path.is_file():
            return done
        sidecar = json.loads(path.read_text())
        if sidecar.get("fingerprint") != fingerprint:
            raise RuntimeError(
                f"{path} was written from a different list of source items (the dataset folder "
                "changed since that run). Write to a new --out folder, or delete "
                f"{folder} to rebuild this dataset."
            )
        if sidecar["shard"] and not (folder.parent / sidecar["shard"]).is_file():
            return done  # the sidecar outlived its tar: redo from here
        done.append(sidecar)


def _write_group(name: str, root: Path, out: Path, items: list[Item], config: BuildConfig, pool,
                 converter: str | None = None) -> None:
    subset, split = items[0].subset, items[0].split
    prefix = _group_prefix(name, subset, split)
    fingerprint = _fingerprint(items)
    done = _finished_sidecars(out / name, prefix, fingerprint)
    start = done[-1]["next_item"] if done else 0
    if start >= len(items):
        log.info("%s: all %d items already converted", prefix, len(items))
        return
    writer = _GroupWriter(out, name, prefix, fingerprint, config, shard_index=len(done), first_item=start)
    tasks = ((name, str(root), items[i], f"{prefix}-{i:07d}", converter) for i in range(start, len(items)))
    progress = tqdm(total=len(items), initial=start, desc=prefix, unit="img", leave=False)
    try:
        for offset, result in enumerate(_ordered_map(make_sample, tasks, pool)):
            index = start + offset
            if isinstance(result, _Done):
                writer.add_sample(index, result)
            else:
                item = items[index]
                writer.add_reject(
                    dict(dataset=name, subset=item.subset, split=item.split, source=item.source, reason=result.reason)
                )
            progress.update()
        writer.close(next_item=len(items))
    finally:
        progress.close()


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------


def build_dataset(
    name: str,
    src: str | Path,
    out: str | Path,
    *,
    splits: Iterable[str] | None = None,
    workers: int = 0,
    limit: int | None = None,
    config: BuildConfig | None = None,
    finalize_root: bool = True,
    weights_file: str | Path | None = None,
    dataset: str | None = None,
) -> dict:
    """Convert one dataset folder into shards under ``out/<name>/``; returns its summary row.

    ``splits`` defaults to every split the converter publishes. ``finalize_root`` rebuilds the
    manifest, rejects and weights files of ``out`` afterwards (turn it off when converting
    several datasets in a row and call :func:`finalize` once). ``dataset`` writes the samples
    under that name instead of the converter's (the synthetic stand-ins of ``--like paper``).
    """
    config = config or BuildConfig(workers=workers, limit=limit)
    converter = get_converter(name)
    reader, name = name, dataset or name
    root, out = Path(src), Path(out)
    wanted = tuple(splits) if splits else converter.INFO.splits
    unknown = set(wanted) - set(converter.INFO.splits)
    if unknown:
        raise ValueError(f"{reader} publishes splits {converter.INFO.splits}; unknown: {sorted(unknown)}")
    with _worker_pool(config.workers) as pool:
        for split in wanted:
            items = converter.find_items(root, split)
            if config.limit is not None:
                items = items[: config.limit]
            groups: dict[str, list[Item]] = {}
            for item in items:
                groups.setdefault(item.subset, []).append(item)
            for group in groups.values():
                _write_group(name, root, out, group, config, pool, converter=reader if reader != name else None)
    if finalize_root:
        finalize(out, weights_file)
    return summarize(out, [name])[0]


def _all_sidecars(out: Path) -> list[dict]:
    sidecars = []
    for path in sorted(out.glob("*/*.json")):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT:
            sidecars.append(data)
    return sidecars


def finalize(out: str | Path, weights_file: str | Path | None = None) -> None:
    """Rebuild ``manifest.parquet``, ``rejects.parquet`` and ``weights.yaml`` from the sidecars."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sidecars = _all_sidecars(out)
    rows = sorted((r for s in sidecars for r in s["samples"]), key=lambda r: (r["dataset"], r["key"]))
    rejects = sorted(
        (r for s in sidecars for r in s["rejects"]), key=lambda r: (r["dataset"], r["split"], r["subset"], r["source"])
    )
    for filename, schema, records in ((MANIFEST_FILE, MANIFEST_SCHEMA, rows), (REJECTS_FILE, REJECTS_SCHEMA, rejects)):
        table = pa.Table.from_pylist(records, schema=schema)
        tmp = out / (filename + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, out / filename)
    write_weights(out, rows, weights_file)


def summarize(out: str | Path, names: Iterable[str] | None = None) -> list[dict]:
    """Per dataset: items found, samples written, items rejected, cells, from the sidecars."""
    table: dict[str, dict] = {}
    for sidecar in _all_sidecars(Path(out)):
        for row in sidecar["samples"] + sidecar["rejects"]:
            entry = table.setdefault(row["dataset"], dict(dataset=row["dataset"], found=0, written=0, rejected=0, cells=0))
            entry["found"] += 1
            if "key" in row:
                entry["written"] += 1
                entry["cells"] += row["n_cells"]
            else:
                entry["rejected"] += 1
    names = list(names) if names is not None else sorted(table)
    return [table.get(n, dict(dataset=n, found=0, written=0, rejected=0, cells=0)) for n in names]
