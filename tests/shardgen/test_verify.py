"""Tests for shardgen.verify: a sound root passes; each kind of damage is found and named."""

import io
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.shards import encode_array
from shardgen.build import BuildConfig, build_dataset
from shardgen.verify import verify


@pytest.fixture(scope="module")
def sound_root(tmp_path_factory):
    src = tmp_path_factory.mktemp("src")
    (src / "counts.txt").write_text("train 4\ntest 2\n")
    out = tmp_path_factory.mktemp("shards")
    build_dataset("synthetic", src, out, config=BuildConfig(max_samples=2))
    return out


@pytest.fixture
def root(sound_root, tmp_path):
    copy = tmp_path / "root"
    shutil.copytree(sound_root, copy)
    return copy


def rewrite_member(tar_path, suffix, transform):
    """Rewrite the first member of ``tar_path`` ending in ``suffix`` with ``transform(bytes)``."""
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        done = False
        for member, data in members:
            if not done and member.name.endswith(suffix):
                data, done = transform(data), True
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_sound_root_passes(sound_root):
    assert verify(sound_root) == []


def test_truncated_tar(root):
    tar = root / "synthetic" / "synthetic-train-000001.tar"
    tar.write_bytes(tar.read_bytes()[:5000])
    problems = verify(root)
    assert any("synthetic-train-000001.tar" in p and ("unreadable" in p or "not in the tar" in p) for p in problems)


def test_missing_and_unlisted_tars(root):
    (root / "synthetic" / "synthetic-test-000000.tar").unlink()
    shutil.copy(root / "synthetic" / "synthetic-train-000000.tar", root / "synthetic" / "extra.tar")
    problems = verify(root)
    assert any("synthetic-test-000000.tar: listed" in p and "missing" in p for p in problems)
    assert any("extra.tar: tar not listed" in p for p in problems)


def test_flows_that_are_not_unit_inside_objects(root):
    def halve(data):
        from pipeline.shards import decode_array
        return encode_array(decode_array(data) * np.float16(0.5))
    rewrite_member(root / "synthetic" / "synthetic-train-000000.tar", "flows.npy.zst", halve)
    problems = verify(root)
    assert any("synthetic-train-0000000" in p and "not unit length" in p for p in problems)


def test_undecodable_member(root):
    rewrite_member(root / "synthetic" / "synthetic-train-000000.tar", "labels.npy.zst", lambda d: d[:20])
    problems = verify(root)
    assert any("synthetic-train-0000000" in p and "does not decode" in p for p in problems)


def test_manifest_disagrees_with_the_tar(root):
    table = pq.read_table(root / "manifest.parquet")
    rows = table.to_pylist()
    rows[0]["n_cells"] += 1
    rows.append(dict(rows[1], key="synthetic-train-9999999"))
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), root / "manifest.parquet")
    problems = verify(root)
    assert any("n_cells" in p for p in problems)
    assert any("not in the tar" in p and "9999999" in p for p in problems)


def test_missing_manifest(root):
    (root / "manifest.parquet").unlink()
    assert any("manifest.parquet: missing" in p for p in verify(root))
