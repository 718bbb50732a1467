"""Tests for shardgen.cli, run as real processes: python -m shardgen ..."""

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from shardgen.datasets import NAMES

REPO = Path(__file__).resolve().parents[2]


def shardgen(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "shardgen", *map(str, args)], env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def test_list_names_every_converter():
    out = shardgen("--list").stdout
    for name in NAMES:
        assert f"\n{name} " in "\n" + out


def test_convert_then_verify(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "counts.txt").write_text("train 3\ntest 1\n")
    out = tmp_path / "shards"
    result = shardgen("--dataset", "synthetic", "--src", src, "--out", out, "--workers", "0")
    assert "synthetic" in result.stdout and "written" in result.stdout  # the summary table
    assert pq.read_table(out / "manifest.parquet").num_rows == 4
    assert shardgen("verify", out).stdout.strip().endswith("OK")
    (out / "synthetic" / "synthetic-test-000000.tar").write_bytes(b"not a tar")
    bad = shardgen("verify", out, check=False)
    assert bad.returncode == 1 and "synthetic-test-000000.tar" in bad.stdout


def test_data_root_converts_folders_named_as_converters(tmp_path):
    data_root = tmp_path / "data"
    (data_root / "synthetic").mkdir(parents=True)
    (data_root / "synthetic" / "counts.txt").write_text("train 2\ntest 0\n")
    (data_root / "not_a_dataset").mkdir()
    out = tmp_path / "shards"
    result = shardgen("--data-root", data_root, "--out", out, "--workers", "0")
    assert "not_a_dataset" in result.stderr  # named, not silently ignored
    assert pq.read_table(out / "manifest.parquet").num_rows == 2


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cyto2", "--out", "x"], "--src is required"),
    (["--dataset", "nope", "--src", ".", "--out", "x"], "invalid choice"),
    (["--dataset", "synthetic"], "--out is required"),
    (["--dataset", "synthetic", "--out", "x", "--max-shard-samples", "0"], "max_samples"),
])
def test_usage_errors(args, message):
    result = shardgen(*args, check=False)
    assert result.returncode == 2 and message in result.stderr


def test_layout_error_names_the_folder_and_exits_nonzero(tmp_path):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "counts.txt").write_text("bogus line\n")
    result = shardgen("--dataset", "synthetic", "--src", src, "--out", tmp_path / "o", "--workers", "0", check=False)
    assert result.returncode == 1
    assert "counts.txt:1" in result.stderr


def test_like_needs_the_synthetic_converter(tmp_path):
    result = shardgen("--dataset", "cyto2", "--src", tmp_path, "--out", tmp_path / "o", "--like", "paper", check=False)
    assert result.returncode == 2 and "--like needs --dataset synthetic" in result.stderr
