"""Tests for shardgen.cli, run as real processes: python -m shardgen ..."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shardgen.base import LayoutError
from shardgen.cli import follow_child_folder
from shardgen.datasets import NAMES

REPO = Path(__file__).resolve().parents[2]


def shardgen(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "shardgen", *map(str, args)], env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _list_entries(out: str) -> dict[str, str]:
    """{converter name: its --list text}: an entry starts with the name at column 0, indented lines follow."""
    entries, name = {}, None
    for line in out.splitlines():
        if line[:1].strip():
            name = line.split()[0]
            entries[name] = line
        elif name is not None:
            entries[name] += "\n" + line
    return entries


def test_list_names_every_converter():
    entries = _list_entries(shardgen("--list").stdout)
    assert list(entries) == list(NAMES)
    # The Cellpose nuclei set has no public copy to check its layout against: --list says so.
    assert "layout: ASSUMED" in entries["nuclei"] and "train/ and test/ with NNN_img.png" in entries["nuclei"]
    # NuInsSeg: both forms, with and without the NuInsSeg/ level (both are read: test_nuinsseg.py).
    assert "NuInsSeg/<tissue>/tissue images/<name>.png" in entries["nuinsseg"]
    assert "or <tissue>/tissue images/<name>.png" in entries["nuinsseg"]
    assert "no NuInsSeg/ level" in entries["nuinsseg"]


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


def _write_instance_pngs(folder: Path, n_images: int = 2) -> None:
    """A miniature DSB2018 ``stage1_train/``: <id>/images/<id>.png + <id>/masks/<k>.png (one object each)."""
    for index in range(n_images):
        image_id = f"img{index}"
        (folder / image_id / "images").mkdir(parents=True)
        (folder / image_id / "masks").mkdir(parents=True)
        Image.fromarray(np.full((16, 16), 40 + index, np.uint8)).save(folder / image_id / "images" / f"{image_id}.png")
        mask = np.zeros((16, 16), np.uint8)
        mask[4:12, 4:12] = 255
        Image.fromarray(mask).save(folder / image_id / "masks" / "0.png")


def test_follow_child_folder_takes_the_one_folder_with_the_layout(tmp_path):
    _write_instance_pngs(tmp_path / "stage1_train")
    (tmp_path / "stage1_test").mkdir()  # no <id>/images inside: not the layout
    (tmp_path / "__MACOSX" / "stage1_train").mkdir(parents=True)  # archive debris: never tried
    (tmp_path / "README.rst").write_text("DSB2018\n")
    error = LayoutError("not the layout")
    assert follow_child_folder("instance_pngs", tmp_path, error) == tmp_path / "stage1_train"


def test_follow_child_folder_reraises_without_a_match_and_names_several(tmp_path):
    error = LayoutError("the original message")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LayoutError, match="the original message"):
        follow_child_folder("instance_pngs", tmp_path, error)
    _write_instance_pngs(tmp_path / "a")
    _write_instance_pngs(tmp_path / "b")
    with pytest.raises(LayoutError, match=r"several folders inside it do \(a, b\); point --src at one"):
        follow_child_folder("instance_pngs", tmp_path, error)
    # A src that lists by itself is not looked into: the error was about something else.
    with pytest.raises(LayoutError, match="the original message"):
        follow_child_folder("instance_pngs", tmp_path / "a", error)


def test_src_one_level_above_the_dataset_folder_is_followed_with_a_log_line(tmp_path):
    src = tmp_path / "dsb2018"
    _write_instance_pngs(src / "stage1_train", n_images=3)
    out = tmp_path / "shards"
    result = shardgen("--dataset", "instance_pngs", "--src", src, "--out", out, "--workers", "0")
    assert f"{src} does not have the instance_pngs layout but its folder stage1_train does" in result.stderr
    assert sorted(pq.read_table(out / "manifest.parquet").column("source").to_pylist()) == ["img0", "img1", "img2"]


def test_like_needs_the_synthetic_converter(tmp_path):
    result = shardgen("--dataset", "cyto2", "--src", tmp_path, "--out", tmp_path / "o", "--like", "paper", check=False)
    assert result.returncode == 2 and "--like needs --dataset synthetic" in result.stderr
