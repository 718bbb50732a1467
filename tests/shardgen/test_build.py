"""Tests for shardgen.build: shards read back with plain webdataset, rollover, rejects, resume
after a crash, byte-identical reruns, and the manifest."""

import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

import shardgen.build as build
from pipeline.flows import masks_to_flows
from pipeline.shards import decode_sample
from shardgen.base import DatasetInfo, Item, ItemError, Loaded
from shardgen.build import BuildConfig, build_dataset
from shardgen.datasets import synthetic

REPO = Path(__file__).resolve().parents[2]


def read_shards(out: Path, dataset: str) -> dict:
    """Every sample under out/dataset, read with plain webdataset, decoded, by key."""
    urls = sorted(str(p) for p in (out / dataset).glob("*.tar"))
    samples = {}
    for raw in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image, labels, flows, meta, ignore = decode_sample(raw)
        samples[raw["__key__"]] = (image, labels, flows, meta, ignore)
    return samples


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def synthetic_src(tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "counts.txt").write_text("train 7\ntest 3\n")
    return src


# ------------------------------------------------------------------------------------------------
# Round trip
# ------------------------------------------------------------------------------------------------


def test_shards_read_back_with_webdataset_equal_what_went_in(tmp_path, synthetic_src):
    out = tmp_path / "shards"
    summary = build_dataset("synthetic", synthetic_src, out)
    assert summary == dict(dataset="synthetic", found=10, written=10, rejected=0, cells=summary["cells"])
    samples = read_shards(out, "synthetic")
    assert len(samples) == 10
    for split in ("train", "test"):
        for item in synthetic.find_items(synthetic_src, split):
            key = f"synthetic-{split}-{item.ref[0]:07d}"
            image, labels, flows, meta, ignore = samples[key]
            loaded = synthetic.load(synthetic_src, item)
            np.testing.assert_array_equal(image, loaded.image)
            # Labels are renumbered 1..N in the same order; synthetic ids already are.
            np.testing.assert_array_equal(labels, loaded.labels)
            assert labels.dtype == np.uint16
            np.testing.assert_array_equal(flows, masks_to_flows(loaded.labels).astype(np.float16))
            assert flows.dtype == np.float16
            assert meta.source == item.source and meta.split == split and meta.dataset == "synthetic"
            assert meta.n_cells == int(loaded.labels.max())
            assert (meta.height, meta.width, meta.channels) == image.shape
            assert meta.channel_names == loaded.channel_names
            assert ignore is None


def test_manifest_has_one_row_per_sample(tmp_path, synthetic_src):
    out = tmp_path / "shards"
    build_dataset("synthetic", synthetic_src, out)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    samples = read_shards(out, "synthetic")
    assert sorted(r["key"] for r in manifest) == sorted(samples)
    for row in manifest:
        meta = samples[row["key"]][3]
        assert (out / row["shard"]).is_file()
        assert row["shard"] == f"synthetic/synthetic-{row['split']}-000000.tar"
        assert row["n_cells"] == meta.n_cells and row["diameter"] == pytest.approx(meta.diameter)
        assert row["channel_names"] == ",".join(meta.channel_names)
    for column in ("dataset", "key", "shard", "split", "height", "width", "channels", "n_cells", "diameter", "source"):
        assert column in manifest[0]
    assert pq.read_table(out / "rejects.parquet").num_rows == 0


def test_shards_roll_over_by_count_and_by_bytes(tmp_path, synthetic_src):
    by_count = tmp_path / "by_count"
    build_dataset("synthetic", synthetic_src, by_count, splits=["train"], config=BuildConfig(max_samples=3))
    assert sorted(p.name for p in (by_count / "synthetic").glob("*.tar")) == [
        f"synthetic-train-{i:06d}.tar" for i in range(3)
    ]  # 7 samples: 3 + 3 + 1
    by_bytes = tmp_path / "by_bytes"
    build_dataset("synthetic", synthetic_src, by_bytes, splits=["train"], config=BuildConfig(max_bytes=1))
    tars = sorted((by_bytes / "synthetic").glob("*.tar"))
    assert len(tars) == 7  # every sample is bigger than 1 byte: one per shard
    assert sorted(read_shards(by_count, "synthetic")) == sorted(read_shards(by_bytes, "synthetic"))


# ------------------------------------------------------------------------------------------------
# Rejects: nothing is dropped silently
# ------------------------------------------------------------------------------------------------


def fake_converter() -> types.SimpleNamespace:
    """A converter whose items exercise every reject path of the shared checks."""
    labels = np.zeros((32, 32), np.int64)
    labels[4:12, 4:12] = 70000  # renumbered to 1
    labels[20:28, 10:30] = 3
    good = np.zeros((32, 32, 1), np.uint8)
    cases = {
        "good.tif": lambda: Loaded(image=good, labels=labels),
        "unreadable.tif": lambda: (_ for _ in ()).throw(ItemError("unreadable.tif: truncated TIFF")),
        "mismatch.tif": lambda: Loaded(image=good, labels=labels[:30]),
        "empty.tif": lambda: Loaded(image=good, labels=np.zeros((32, 32), np.uint16)),
        "float.tif": lambda: Loaded(image=good.astype(np.float32), labels=labels),
        "five_channels.tif": lambda: Loaded(image=np.zeros((32, 32, 5), np.uint8), labels=labels),
        "negative.tif": lambda: Loaded(image=good, labels=-labels),
        "crash.tif": lambda: 1 / 0,
        "ignore.tif": lambda: Loaded(image=good, labels=labels, ignore=labels == 3),
    }
    info = DatasetInfo(name="fake", title="fake", modality="fluorescence", channel_names=("gray",),
                       splits=("all",), layout="*.tif")
    return types.SimpleNamespace(
        INFO=info,
        find_items=lambda root, split: [Item(source=name, split=split, ref=(name,)) for name in cases],
        load=lambda root, item: cases[item.ref[0]](),
    )


def test_every_bad_item_becomes_a_reject_with_its_reason(tmp_path, monkeypatch):
    converter = fake_converter()
    monkeypatch.setattr(build, "get_converter", lambda name: converter)
    out = tmp_path / "shards"
    summary = build_dataset("fake", tmp_path, out)
    assert summary == dict(dataset="fake", found=9, written=2, rejected=7, cells=4)
    reasons = {r["source"]: r["reason"] for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert set(reasons) == {"unreadable.tif", "mismatch.tif", "empty.tif", "float.tif",
                            "five_channels.tif", "negative.tif", "crash.tif"}
    assert "truncated TIFF" in reasons["unreadable.tif"]
    assert "size mismatch" in reasons["mismatch.tif"]
    assert reasons["empty.tif"] == "no objects"
    assert "uint8 or uint16" in reasons["float.tif"]
    assert "1 to 3 channels" in reasons["five_channels.tif"]
    assert "negative" in reasons["negative.tif"]
    assert "ZeroDivisionError" in reasons["crash.tif"]
    samples = read_shards(out, "fake")
    _, labels, _, meta, ignore = samples["fake-all-0000000"]
    assert labels.max() == 2 and meta.n_cells == 2  # ids 3 and 70000 renumbered
    assert ignore is None
    _, labels, _, _, ignore = samples["fake-all-0000008"]
    np.testing.assert_array_equal(ignore, labels == 1)  # source id 3 is the smaller, so it becomes 1


# ------------------------------------------------------------------------------------------------
# Determinism and resume
# ------------------------------------------------------------------------------------------------


def test_reruns_are_byte_identical_and_skip_finished_work(tmp_path, synthetic_src, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    config = BuildConfig(max_samples=2)
    build_dataset("synthetic", synthetic_src, first, config=config)
    build_dataset("synthetic", synthetic_src, second, config=config)
    assert tree_bytes(first) == tree_bytes(second)
    # A rerun on a finished root converts nothing and changes nothing.
    calls = []
    monkeypatch.setattr(build, "make_sample", lambda *a: calls.append(a))
    before = tree_bytes(first)
    build_dataset("synthetic", synthetic_src, first, config=config)
    assert calls == [] and tree_bytes(first) == before


def test_resume_after_a_crash_gives_the_same_bytes(tmp_path, synthetic_src, monkeypatch):
    config = BuildConfig(max_samples=2)
    reference = tmp_path / "reference"
    build_dataset("synthetic", synthetic_src, reference, config=config)

    crashed = tmp_path / "crashed"
    real_make_sample = build.make_sample
    converted = []

    def crash_on_sixth(*task):
        if len(converted) == 5:
            raise KeyboardInterrupt  # as if the process were stopped mid-shard
        converted.append(task[3])
        return real_make_sample(*task)

    monkeypatch.setattr(build, "make_sample", crash_on_sixth)
    with pytest.raises(KeyboardInterrupt):
        build_dataset("synthetic", synthetic_src, crashed, config=config)
    # Two train shards finished (items 0-3); the third was half written to a temp file.
    assert sorted(p.name for p in (crashed / "synthetic").glob("*.tar")) == [
        "synthetic-train-000000.tar", "synthetic-train-000001.tar"]
    assert list((crashed / "synthetic").glob("*.tmp"))

    resumed = []
    monkeypatch.setattr(build, "make_sample", lambda *task: resumed.append(task[3]) or real_make_sample(*task))
    build_dataset("synthetic", synthetic_src, crashed, config=config)
    assert resumed[0] == "synthetic-train-0000004"  # finished shards were not redone
    assert tree_bytes(crashed) == tree_bytes(reference)


@pytest.mark.slow
def test_killed_worker_pool_run_resumes_to_the_same_bytes(tmp_path, synthetic_src):
    """A real process, killed with SIGKILL mid-run, then run again to completion."""
    (synthetic_src / "counts.txt").write_text("train 24\ntest 4\n")
    command = [sys.executable, "-m", "shardgen", "--dataset", "synthetic", "--src", str(synthetic_src),
               "--max-shard-samples", "3", "--workers", "2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    reference = tmp_path / "reference"
    subprocess.run(command + ["--out", str(reference)], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command + ["--out", str(killed)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "synthetic").glob("*.json"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in (killed / "synthetic").glob("*.json"))
    assert 2 <= len(finished) < 9  # killed part-way: some shards done, not all

    subprocess.run(command + ["--out", str(killed)], check=True, env=env, capture_output=True)
    assert tree_bytes(killed) == tree_bytes(reference)


def test_resume_refuses_a_changed_source(tmp_path, synthetic_src):
    out = tmp_path / "shards"
    build_dataset("synthetic", synthetic_src, out, config=BuildConfig(max_samples=2, limit=4))
    (synthetic_src / "counts.txt").write_text("train 9\ntest 3\n")
    with pytest.raises(RuntimeError, match="different list of source items"):
        build_dataset("synthetic", synthetic_src, out, config=BuildConfig(max_samples=2, limit=5))


def test_worker_processes_give_the_same_bytes_as_in_process(tmp_path, synthetic_src):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    build_dataset("synthetic", synthetic_src, serial, config=BuildConfig(max_samples=4))
    build_dataset("synthetic", synthetic_src, parallel, config=BuildConfig(max_samples=4, workers=2))
    assert tree_bytes(serial) == tree_bytes(parallel)


def test_sidecars_record_what_each_shard_covers(tmp_path, synthetic_src):
    out = tmp_path / "shards"
    build_dataset("synthetic", synthetic_src, out, splits=["train"], config=BuildConfig(max_samples=3))
    spans = []
    for path in sorted((out / "synthetic").glob("*.json")):
        sidecar = json.loads(path.read_text())
        spans.append((sidecar["first_item"], sidecar["next_item"], len(sidecar["samples"])))
    assert spans == [(0, 3, 3), (3, 6, 3), (6, 7, 1)]


def test_bad_arguments(tmp_path, synthetic_src):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        build_dataset("nope", synthetic_src, tmp_path)
    with pytest.raises(ValueError, match="unknown"):
        build_dataset("synthetic", synthetic_src, tmp_path, splits=["validation"])
    with pytest.raises(ValueError, match="max_samples"):
        BuildConfig(max_samples=0)
