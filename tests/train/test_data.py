"""Tests for train.data on real shards built with shardgen in tmp_path: weighted mixing, exact
resume, corrupt samples, shard splitting over (rank, worker) slots, validation coverage and the
batch layout."""

import dataclasses
import io
import json
import logging
import math
import tarfile
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import webdataset as wds
import yaml
from scipy import stats

import shardgen.build as build

import train.data as data
from pipeline.shards import decode_sample, encode_array, group_key
from shardgen.base import DatasetInfo, Item, Loaded
from shardgen.build import BuildConfig, build_dataset, finalize
from train.data import (
    Batch,
    DataConfig,
    build_train_loader,
    build_val_loader,
    loader_host_bytes,
    steps_per_epoch,
    train_weights,
)

WEIGHTS = {"synthetic": 0.5, "fake/a": 0.3, "fake/b": 0.2}
FAKE_COUNTS = {("train", "a"): 24, ("train", "b"): 8, ("test", "a"): 3, ("test", "b"): 2}


# ------------------------------------------------------------------------------------------------
# Fixtures: a shard root with three groups (synthetic 256x256, and a fake dataset with two subsets
# of small images of varied size, channels and dtype)
# ------------------------------------------------------------------------------------------------


def fake_item(index: int) -> Loaded:
    """Noise image (so a crop's position is recoverable) of 20..80 px, 1-3 channels, uint8 or
    uint16 (with a saturated pixel), a few rectangular objects, an ignore mask on every 4th."""
    rng = np.random.default_rng(index)
    height, width = (int(v) for v in rng.integers(20, 81, 2))
    channels = 1 + index % 3
    if index % 2:
        image = rng.integers(0, 65536, (height, width, channels), dtype=np.uint16)
        image[0, 0, 0] = 65535
    else:
        image = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    labels = np.zeros((height, width), np.uint16)
    for obj in range(1, 4):
        y, x = int(rng.integers(0, height - 8)), int(rng.integers(0, width - 8))
        labels[y: y + 8, x: x + 8] = obj
    ignore = labels == labels.max() if index % 4 == 0 else None
    return Loaded(image=image, labels=labels, ignore=ignore, channel_names=tuple(f"c{c}" for c in range(channels)))


def fake_converter(counts: dict) -> types.SimpleNamespace:
    info = DatasetInfo(name="fake", title="fake", modality="fluorescence", channel_names=("c0",),
                       splits=("train", "test"), layout="none")

    def find_items(root, split):
        items = []
        for offset, ((item_split, subset), n) in enumerate(sorted(counts.items())):
            if item_split == split:  # every item of every group gets its own image
                items += [Item(source=f"{subset}/{i}", split=split, subset=subset, ref=(1000 * offset + i,))
                          for i in range(n)]
        return items

    return types.SimpleNamespace(INFO=info, find_items=find_items, load=lambda root, item: fake_item(item.ref[0]))


def build_fake(out: Path, counts: dict, max_samples: int = 2) -> None:
    converter = fake_converter(counts)
    real = build.get_converter
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(build, "get_converter", lambda name: converter if name == "fake" else real(name))
        build_dataset("fake", out, out, config=BuildConfig(max_samples=max_samples), finalize_root=False)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("data")
    out = base / "shards"
    src = base / "synthetic_src"
    src.mkdir()
    (src / "counts.txt").write_text("train 6\ntest 3\n")
    build_dataset("synthetic", src, out, config=BuildConfig(max_samples=2), finalize_root=False)
    build_fake(out, FAKE_COUNTS)
    weights_file = base / "weights.yaml"
    weights_file.write_text(yaml.safe_dump(WEIGHTS))
    finalize(out, weights_file)
    return out


def manifest(root: Path) -> list[dict]:
    return pq.read_table(root / "manifest.parquet").to_pylist()


def originals(root: Path) -> dict:
    """Every sample under root decoded with plain webdataset, by key."""
    samples = {}
    for tar in sorted(root.glob("*/*.tar")):
        for raw in wds.WebDataset(str(tar), shardshuffle=False, empty_check=False):
            samples[raw["__key__"]] = decode_sample(raw)
    return samples


def config(root: Path, **kw) -> DataConfig:
    defaults = dict(root=str(root), batch_size=4, num_workers=0, shuffle_buffer=8, chunk_steps=3)
    return DataConfig(**(defaults | kw))


def take(loader, n: int) -> list[Batch]:
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a: Batch, b: Batch) -> None:
    assert (a.step, a.keys, a.datasets, a.skipped) == (b.step, b.keys, b.datasets, b.skipped)
    for name in ("images", "flows", "labels", "ignore", "valid", "diameters"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ------------------------------------------------------------------------------------------------
# Groups and weights
# ------------------------------------------------------------------------------------------------


def test_weights_come_from_weights_yaml_renormalised_over_present_groups(root, tmp_path):
    assert train_weights(config(root)) == pytest.approx(WEIGHTS)
    override = tmp_path / "w.yaml"
    override.write_text(yaml.safe_dump({"weights": {"synthetic": 2, "fake/a": 1, "fake/b": 0, "ghost": 5}}))
    expected = {"synthetic": 2 / 3, "fake/a": 1 / 3}  # fake/b (0) and ghost (no shards) left out
    assert train_weights(config(root, weights_file=str(override))) == pytest.approx(expected)
    override.write_text(yaml.safe_dump({"synthetic": 1, "fake/a": 1}))
    with pytest.raises(ValueError, match="fake/b"):
        train_weights(config(root, weights_file=str(override)))
    override.write_text(yaml.safe_dump({"synthetic": -1, "fake/a": 1, "fake/b": 1}))
    with pytest.raises(ValueError, match="non-negative"):
        train_weights(config(root, weights_file=str(override)))


def test_group_frequencies_match_the_weights_over_thousands_of_draws(root):
    # Raw batches: the same draws and reads as training, without decoding.
    cfg = config(root, batch_size=16, num_workers=2, chunk_steps=8)
    groups = data._train_groups(cfg)
    stream = data._TrainStream(cfg, groups, rank=0, world_size=1, start_step=0)
    counts = Counter()
    for virtual in range(2):
        batches = stream.raw_batches(virtual, 0)
        for _ in range(125):
            _, raw_batch, errors = next(batches)
            assert errors == []
            for index, raw in raw_batch:
                meta = json.loads(raw["json"])
                assert group_key(meta["dataset"], meta["subset"]) == groups[index].key  # the drawn group's sample
                counts[groups[index].key] += 1
    n = sum(counts.values())
    assert n == 4000
    expected = [WEIGHTS[g.key] * n for g in groups]
    observed = [counts[g.key] for g in groups]
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_decoded_batches_follow_the_weights(root):
    loader = build_train_loader(config(root, batch_size=8), rank=0, world_size=1)
    batches = take(loader, 40)
    counts = Counter(g for b in batches for g in b.datasets)
    n = 320
    for group, weight in WEIGHTS.items():
        sigma = math.sqrt(n * weight * (1 - weight))
        assert abs(counts[group] - n * weight) < 4 * sigma, (group, counts)
    prefixes = {"synthetic": "synthetic-train-", "fake/a": "fake-a-train-", "fake/b": "fake-b-train-"}
    for batch in batches:
        assert all(key.startswith(prefixes[group]) for key, group in zip(batch.keys, batch.datasets))


def test_steps_per_epoch(root):
    assert steps_per_epoch(config(root), world_size=2) == math.ceil((6 + 24 + 8) / 8)  # all training samples
    assert steps_per_epoch(config(root, samples_per_epoch=100), world_size=2) == 13


# ------------------------------------------------------------------------------------------------
# Exact resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_loader_yields_the_batches_of_an_uninterrupted_run(root, num_workers):
    cfg = config(root, batch_size=3, num_workers=num_workers, chunk_steps=3, max_side=48)
    full = take(build_train_loader(cfg, rank=1, world_size=2, start_step=0), 14)
    assert [b.step for b in full] == list(range(14))
    # Resumes inside a chunk (steps 7 and 11 are local batch 1 and 2 of a 3-step chunk without
    # workers; with 2, one virtual worker resumes inside a chunk and the other at its start).
    for start in (7, 11):
        resumed = take(build_train_loader(cfg, rank=1, world_size=2, start_step=start), 14 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            assert_batches_equal(a, b)
    # The same through state_dict, as a checkpointer would do it.
    interrupted = build_train_loader(cfg, rank=1, world_size=2)
    take(interrupted, 9)
    state = interrupted.state_dict()
    interrupted.close()
    restored = build_train_loader(cfg, rank=1, world_size=2)
    restored.load_state_dict(state)
    for a, b in zip(full[9:], take(restored, 5), strict=True):
        assert_batches_equal(a, b)
    # Another rank, or another seed, reads something else.
    other_rank = take(build_train_loader(cfg, rank=0, world_size=2), 4)
    other_seed = take(build_train_loader(config(root, batch_size=3, num_workers=num_workers, max_side=48, seed=1),
                                         rank=1, world_size=2), 4)
    assert [b.keys for b in other_rank] != [b.keys for b in full[:4]]
    assert [b.keys for b in other_seed] != [b.keys for b in full[:4]]


# ------------------------------------------------------------------------------------------------
# Corrupt samples
# ------------------------------------------------------------------------------------------------


def damage_shard(tar_path: Path, damages: dict[int, str]) -> dict[int, str]:
    """Rewrite ``tar_path`` with the samples at the given positions damaged; returns their keys."""
    samples = list(wds.WebDataset(str(tar_path), shardshuffle=False, empty_check=False))
    keys = {}
    buffer = io.BytesIO()
    with wds.TarWriter(buffer, encoder=False) as writer:
        for position, raw in enumerate(samples):
            sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
            damage = damages.get(position)
            if damage == "bytes":  # zstd frame garbled
                image = bytearray(sample["image.npy.zst"])
                image[8: 40] = bytes(32)
                sample["image.npy.zst"] = bytes(image)
            elif damage == "shape":  # decodes, but the labels are not the image's size
                sample["labels.npy.zst"] = encode_array(np.ones((5, 5), np.uint16))
            elif damage == "missing":
                del sample["flows.npy.zst"]
            if damage:
                keys[position] = sample["__key__"]
            writer.write(sample)
    tar_path.write_bytes(buffer.getvalue())
    return keys


def test_corrupt_samples_are_skipped_counted_and_logged(tmp_path, caplog):
    out = tmp_path / "shards"
    build_fake(out, {("train", "a"): 6, ("test", "a"): 3}, max_samples=3)
    finalize(out)
    shards = sorted((out / "fake").glob("fake-a-train-*.tar"))
    corrupt = {**damage_shard(shards[0], {1: "bytes", 2: "missing"}), **damage_shard(shards[1], {0: "shape"})}
    corrupt_keys = set(corrupt.values())
    shard_of = {r["key"]: Path(r["shard"]).name for r in manifest(out)}

    cfg = config(out, batch_size=4, chunk_steps=5)
    stream = data._TrainStream(cfg, data._train_groups(cfg), rank=0, world_size=1, start_step=0)
    raw_batches = stream.raw_batches(0, 0)
    drawn = [next(raw_batches)[1] for _ in range(12)]
    corrupt_draws = [sum(raw["__key__"] in corrupt_keys for _, raw in batch) for batch in drawn]
    assert sum(corrupt_draws) >= 3  # the test below means something

    caplog.set_level(logging.WARNING, logger="train.data")
    batches = take(build_train_loader(cfg, rank=0, world_size=1), 12)
    for batch, n_corrupt in zip(batches, corrupt_draws):
        assert len(batch) == 4 and not corrupt_keys & set(batch.keys)
        assert batch.skipped >= n_corrupt  # a refill can hit a corrupt sample too, and counts
    skips = [r.getMessage() for r in caplog.records if "skipped sample" in r.getMessage()]
    assert not [r for r in caplog.records if "damaged shard" in r.getMessage()]
    assert len(skips) == sum(b.skipped for b in batches)
    for key in corrupt_keys:
        messages = [m for m in skips if key in m]
        assert messages and all(shard_of[key] in m for m in messages)
    assert any("does not decode" in m for m in skips) and any("lacks member" in m for m in skips)
    assert any("labels are" in m for m in skips)
    # Resuming still reproduces the batches exactly (fast-forward never decodes).
    for a, b in zip(batches[6:], take(build_train_loader(cfg, rank=0, world_size=1, start_step=6), 6), strict=True):
        assert_batches_equal(a, b)
    # Validation skips it too: the batch is one smaller.
    (bad_test_key,) = damage_shard(out / "fake" / "fake-a-test-000000.tar", {1: "bytes"}).values()
    (val_batch,) = build_val_loader(cfg, rank=0, world_size=1)
    assert val_batch.skipped == 1 and val_batch.keys == ["fake-a-test-0000000", "fake-a-test-0000002"]
    assert any(bad_test_key in r.getMessage() for r in caplog.records)


def test_truncated_tar_is_survived(tmp_path, caplog):
    out = tmp_path / "shards"
    build_fake(out, {("train", "a"): 6}, max_samples=3)
    finalize(out)
    tar_path = sorted((out / "fake").glob("*.tar"))[0]
    tar_bytes = tar_path.read_bytes()
    with tarfile.open(tar_path) as tar:
        cut = tar.getmembers()[5].offset_data + 100  # inside the second sample
    tar_path.write_bytes(tar_bytes[:cut])
    caplog.set_level(logging.WARNING, logger="train.data")
    batches = take(build_train_loader(config(out, batch_size=4), rank=0, world_size=1), 10)
    assert all(len(b) == 4 for b in batches)
    damaged = [r.getMessage() for r in caplog.records if "damaged shard" in r.getMessage()]
    assert damaged and all(tar_path.name in m for m in damaged)
    assert sum(b.skipped for b in batches) == len(damaged)  # the intact first sample still arrives
    assert "fake-a-train-0000000" in {k for b in batches for k in b.keys}


def test_a_group_whose_every_shard_is_unreadable_raises(tmp_path):
    out = tmp_path / "shards"
    build_fake(out, {("train", "a"): 2}, max_samples=3)
    finalize(out)
    for tar_path in (out / "fake").glob("*.tar"):
        tar_path.write_bytes(b"not a tar" * 100)
    with pytest.raises(RuntimeError, match="unreadable"):
        next(build_train_loader(config(out), rank=0, world_size=1))


# ------------------------------------------------------------------------------------------------
# Shards over (rank, worker) slots
# ------------------------------------------------------------------------------------------------


def test_shards_are_split_disjointly_over_slots_when_there_are_enough(root):
    cfg = config(root, num_workers=2)
    groups = {g.key: g for g in data._train_groups(cfg)}
    assert (len(groups["fake/a"].shards), len(groups["fake/b"].shards), len(groups["synthetic"].shards)) == (12, 4, 3)
    slots = [(rank, virtual) for rank in range(2) for virtual in range(2)]
    for key, group in groups.items():
        shares = [data._slot_shards(group, rank, 2, virtual, 2)[0] for rank, virtual in slots]
        if len(group.shards) >= 4:
            assert sorted(s for share in shares for s in share) == sorted(group.shards)  # disjoint, complete
        else:
            assert all(share == group.shards for share in shares)  # too few: every slot reads all

    # What real DataLoader workers read: step s comes from virtual worker s % 2 of its rank.
    shard_of = {r["key"]: str(root / r["shard"]) for r in manifest(root)}
    read = {slot: set() for slot in slots}
    for rank in range(2):
        for batch in take(build_train_loader(config(root, num_workers=2, batch_size=8), rank=rank, world_size=2), 6):
            for key, group in zip(batch.keys, batch.datasets):
                shard = shard_of[key]
                assert shard in data._slot_shards(groups[group], rank, 2, batch.step % 2, 2)[0]
                if group == "fake/a":
                    read[rank, batch.step % 2].add(shard)
    for a in slots:
        for b in slots:
            if a != b:
                assert not read[a] & read[b]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "num_workers", "val_limit"), [(1, 0, None), (2, 2, None), (3, 0, None), (11, 0, None), (2, 0, 1)]
)
def test_validation_yields_every_held_out_sample_exactly_once(root, world_size, num_workers, val_limit):
    cfg = config(root, batch_size=2, num_workers=num_workers, val_limit=val_limit)
    held_out = sorted(r["key"] for r in manifest(root) if r["split"] == "test")
    if val_limit == 1:
        held_out = ["fake-a-test-0000000", "fake-b-test-0000000", "synthetic-test-0000000"]
    keys, batch_counts = [], []
    for rank in range(world_size):
        batches = list(build_val_loader(cfg, rank, world_size))
        assert [b.keys for b in batches] == [b.keys for b in build_val_loader(cfg, rank, world_size)]  # deterministic
        batch_counts.append(len(batches))
        for batch in batches:
            assert batch.step == -1 and batch.skipped == 0
            if batch.keys == [""]:  # padding: nothing valid, everything ignored
                assert not batch.valid.any() and batch.ignore.all() and batch is batches[-1]
            else:
                keys += batch.keys
                assert all(batch.valid[i].any() for i in range(len(batch)))
    assert sorted(keys) == held_out
    assert len(set(batch_counts)) == 1  # the same number of batches on every rank (FSDP)


def test_shards_read_through_a_pipe_url_template(root, tmp_path):
    """Shards elsewhere (object storage), only the manifest and weights under data.root: a
    ``pipe:`` template gives the same batches as reading the files."""
    local = tmp_path / "root"
    local.mkdir()
    for name in ("manifest.parquet", "weights.yaml"):
        (local / name).write_bytes((root / name).read_bytes())
    piped = config(local, shard_url=f"pipe:cat {root}/{{shard}}", batch_size=3)
    for a, b in zip(take(build_train_loader(config(root, batch_size=3), rank=0, world_size=1), 4),
                    take(build_train_loader(piped, rank=0, world_size=1), 4), strict=True):
        assert_batches_equal(a, b)
    val = [b.keys for b in build_val_loader(piped, rank=0, world_size=1)]
    assert val == [b.keys for b in build_val_loader(config(root, batch_size=3), rank=0, world_size=1)]
    # Without the template, the missing local files are named.
    with pytest.raises(FileNotFoundError, match="missing"):
        build_train_loader(config(local), rank=0, world_size=1)


# ------------------------------------------------------------------------------------------------
# Batch layout
# ------------------------------------------------------------------------------------------------


def test_batches_are_cropped_padded_and_typed(root):
    max_side = 48
    cfg = config(root, batch_size=6, max_side=max_side)
    batches = take(build_train_loader(cfg, rank=0, world_size=1), 6)
    source = originals(root)
    crops_seen = 0
    for batch in batches:
        n, height, width = batch.labels.shape
        assert batch.images.shape == (n, 3, height, width) and batch.images.dtype == torch.float16
        assert batch.flows.shape == (n, 2, height, width) and batch.flows.dtype == torch.float16
        assert batch.labels.dtype == torch.int32
        assert batch.ignore.dtype == torch.bool and batch.valid.dtype == torch.bool
        assert batch.diameters.shape == (n,) and batch.diameters.dtype == torch.float32
        assert len(batch.datasets) == len(batch.keys) == n == 6
        assert height <= max_side and width <= max_side
        assert torch.isfinite(batch.images).all()
        sizes = []
        for i, key in enumerate(batch.keys):
            image, labels, flows, meta, ignore = source[key]
            h, w = min(image.shape[0], max_side), min(image.shape[1], max_side)
            sizes.append((h, w))
            expected_valid = torch.zeros((height, width), dtype=torch.bool)
            expected_valid[:h, :w] = True
            assert torch.equal(batch.valid[i], expected_valid)
            # Outside the sample, and in channels the image lacks, everything is zero.
            channels = image.shape[2]
            assert not batch.images[i, channels:].any() and not batch.images[i][:, ~expected_valid].any()
            assert not batch.labels[i][~expected_valid].any() and not batch.ignore[i][~expected_valid].any()
            assert not batch.flows[i][:, ~expected_valid].any()
            # The crop is a window of the original, the same for every array.
            values = np.minimum(image.astype(np.int64), 65504).astype(np.float16)  # float16 tops out at 65504
            got = batch.images[i, :channels, :h, :w].numpy().transpose(1, 2, 0)
            corner = values[: image.shape[0] - h + 1, : image.shape[1] - w + 1, 0] == got[0, 0, 0]
            offsets = [(y, x) for y, x in np.argwhere(corner) if np.array_equal(values[y: y + h, x: x + w], got)]
            assert len(offsets) == 1, key
            (y, x), = offsets
            crops_seen += (h, w) != image.shape[:2]
            np.testing.assert_array_equal(batch.labels[i, :h, :w].numpy(), labels[y: y + h, x: x + w])
            np.testing.assert_array_equal(batch.flows[i, :, :h, :w].numpy(), flows[:, y: y + h, x: x + w])
            expected_ignore = ignore[y: y + h, x: x + w] if ignore is not None else np.zeros((h, w), bool)
            np.testing.assert_array_equal(batch.ignore[i, :h, :w].numpy(), expected_ignore)
            assert batch.diameters[i].item() == pytest.approx(meta.diameter)
            assert batch.datasets[i] == group_key(meta.dataset, meta.subset)
        assert (height, width) == (max(h for h, _ in sizes), max(w for _, w in sizes))
    assert crops_seen >= 5  # synthetic 256x256 and fake images past 48 px were cropped


def test_batch_to_moves_every_tensor(root):
    batch = next(build_train_loader(config(root), rank=0, world_size=1))
    moved = batch.to("meta")
    for name in ("images", "flows", "labels", "ignore", "valid", "diameters"):
        assert getattr(moved, name).device.type == "meta"
    assert (moved.keys, moved.datasets, moved.step) == (batch.keys, batch.datasets, batch.step)


# ------------------------------------------------------------------------------------------------
# Configuration and errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    dict(batch_size=0), dict(num_workers=-1), dict(max_side=0), dict(shuffle_buffer=0), dict(chunk_steps=0),
    dict(seed=-1), dict(samples_per_epoch=0), dict(val_limit=0), dict(val_splits=()), dict(val_splits=("train",)),
    dict(batch_size=2.5), dict(shard_url="pipe:cat /shards/x.tar"),
])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        DataConfig(**bad)


def test_config_accepts_yaml_lists():
    assert DataConfig(val_splits=["test", "fold3"]).val_splits == ("test", "fold3")


def test_missing_root_says_how_to_make_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="shardgen"):
        build_train_loader(DataConfig(root=str(tmp_path / "nowhere")), rank=0, world_size=1)


def test_loader_host_bytes_counts_what_the_config_allows(tmp_path):
    # Pure arithmetic of the config: every part scales with what bounds it.
    cfg = DataConfig(root=str(tmp_path), batch_size=4, num_workers=2, prefetch_factor=3, max_side=64,
                     shuffle_bytes=1000, pin_memory=True)
    host = loader_host_bytes(cfg)
    assert set(host) >= {"in_flight", "shuffle", "pinned", "total"}
    assert host["shuffle"] == 2 * 1000
    assert host["total"] == host["in_flight"] + host["shuffle"] + host["pinned"]
    # A window pixel is at most 15 bytes: 3 x uint16 image, uint32 labels, 2 x float16 flows, bool ignore.
    assert host["in_flight"] == 2 * 3 * 4 * 64 * 64 * 15
    bigger = loader_host_bytes(dataclasses.replace(cfg, prefetch_factor=6))
    assert bigger["in_flight"] == 2 * host["in_flight"]
    assert loader_host_bytes(dataclasses.replace(cfg, pin_memory=False))["pinned"] == 0
    assert loader_host_bytes(dataclasses.replace(cfg, batch_size=8))["in_flight"] == 2 * host["in_flight"]


def test_shuffle_buffer_is_bounded_in_bytes_and_loses_nothing():
    import random

    sizes = [(i * 37) % 100 + 1 for i in range(300)]
    samples = [{"__key__": str(i), "x": b"\0" * n} for i, n in enumerate(sizes)]
    taken = 0
    peak = 0

    def source():
        nonlocal taken
        for sample in samples:
            taken += 1
            yield sample

    out = []
    for sample in data._shuffled(source(), capacity=1000, budget=500, rng=random.Random(0)):
        out.append(sample)
        held = sum(sizes[: taken]) - sum(len(s["x"]) for s in out)
        peak = max(peak, held)
    assert sorted(int(s["__key__"]) for s in out) == list(range(300))  # a permutation
    assert [s["__key__"] for s in out] != [s["__key__"] for s in samples]
    assert peak <= 500 + 2 * max(sizes)  # the budget, overshot by at most the two samples just taken in


# ------------------------------------------------------------------------------------------------
# Window batches (the trainer's path: build_train_loader(..., augment=cfg))
# ------------------------------------------------------------------------------------------------


def assert_window_batches_equal(a, b) -> None:
    assert (a.step, a.keys, a.datasets, a.skipped) == (b.step, b.keys, b.datasets, b.skipped)
    assert (a.image_itemsize, a.label_itemsize) == (b.image_itemsize, b.label_itemsize)
    for name in ("image_bytes", "label_bytes", "flows", "ignore", "layout", "transform", "diameters"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.bounds, b.bounds, rtol=0, atol=0, equal_nan=True)  # NaN: channels a sample lacks


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_window_loader_yields_the_batches_of_an_uninterrupted_run(root, num_workers):
    from train.augment import AugmentConfig

    cfg = config(root, batch_size=3, num_workers=num_workers, chunk_steps=3, max_side=48)
    augment_cfg = AugmentConfig(crop_size=32)
    full = take(build_train_loader(cfg, rank=1, world_size=2, start_step=0, augment=augment_cfg), 10)
    assert all(isinstance(b, data.WindowBatch) for b in full) and [b.step for b in full] == list(range(10))
    for start in (4, 7):
        resumed = take(build_train_loader(cfg, rank=1, world_size=2, start_step=start, augment=augment_cfg), 10 - start)
        for a, b in zip(full[start:], resumed, strict=True):
            assert_window_batches_equal(a, b)
    # The geometry comes from the step's seed: another seed draws other transforms.
    other = take(build_train_loader(dataclasses.replace(cfg, seed=1), rank=1, world_size=2, augment=augment_cfg), 2)
    assert not torch.equal(other[0].transform, full[0].transform)


def test_windows_hold_the_stored_arrays_the_warp_reads(root):
    """Each window is the stored sample's pixels (stored dtypes) around the crop's footprint."""
    from train.augment import LAYOUT_COLUMNS, AugmentConfig

    stored = originals(root)
    augment_cfg = AugmentConfig(crop_size=16)
    loader = build_train_loader(config(root, batch_size=6), rank=0, world_size=1, augment=augment_cfg)
    column = LAYOUT_COLUMNS.index
    smaller = 0
    for batch in take(loader, 4):
        for i, key in enumerate(batch.keys):
            image, labels, flows, meta, ignore = stored[key]
            row = batch.layout[i].tolist()
            h, w, c = row[column("height")], row[column("width")], row[column("channels")]
            assert c == image.shape[2] and h <= image.shape[0] and w <= image.shape[1]
            assert row[column("image_itemsize")] == image.dtype.itemsize
            assert row[column("label_itemsize")] == labels.dtype.itemsize
            start = row[column("image_offset")]
            window = batch.image_bytes[start: start + h * w * c * image.dtype.itemsize].numpy().view(image.dtype)
            window = window.reshape(h, w, c)
            # Where the window sits in the image: find it (the images are noise, so it is unique).
            found = [(y, x) for y in range(image.shape[0] - h + 1) for x in range(image.shape[1] - w + 1)
                     if np.array_equal(image[y: y + h, x: x + w], window)]
            assert len(found) == 1, key
            y, x = found[0]
            start = row[column("flow_offset")]
            np.testing.assert_array_equal(batch.flows[start: start + 2 * h * w].numpy().reshape(2, h, w),
                                          flows[:, y: y + h, x: x + w])
            start = row[column("label_offset")]
            got = batch.label_bytes[start: start + h * w * labels.dtype.itemsize].numpy().view(labels.dtype)
            np.testing.assert_array_equal(got.reshape(h, w), labels[y: y + h, x: x + w])
            start = row[column("ignore_offset")]
            assert (start >= 0) == (ignore is not None)
            if ignore is not None:
                np.testing.assert_array_equal(batch.ignore[start: start + h * w].numpy().reshape(h, w),
                                              ignore[y: y + h, x: x + w])
            smaller += h * w < image.shape[0] * image.shape[1]
    assert smaller > 0  # zoomed-in crops read only part of their image


def test_channel_bounds_equal_numpy_percentiles():
    rng = np.random.default_rng(0)
    for dtype, top in ((np.uint8, 256), (np.uint16, 65536)):
        image = rng.integers(0, top, (37, 53, 3)).astype(dtype)
        got = data.channel_bounds(image, (1.0, 99.0), 1 << 16)
        expected = np.percentile(image.reshape(-1, 3).astype(np.float64), [1.0, 99.0], axis=0).T
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    # A large image: the strided subsample, as train.augment's _percentile_bounds takes it.
    image = rng.integers(0, 256, (300, 300, 1)).astype(np.uint8)
    sub = image.reshape(-1, 1)[:: -(-90000 // 4096)]
    np.testing.assert_allclose(data.channel_bounds(image, (2.0, 98.0), 4096),
                               np.percentile(sub.astype(np.float64), [2.0, 98.0], axis=0).T, rtol=1e-6)
