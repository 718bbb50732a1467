"""Fixtures shared by the trainer's tests."""

from pathlib import Path

import pytest

from shardgen.build import build_dataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small synthetic shard root (48 training, 8 test images), as shardgen writes it."""
    src = tmp_path_factory.mktemp("synthetic_src")
    (src / "counts.txt").write_text("train 48\ntest 8\n")
    out = tmp_path_factory.mktemp("shards")
    build_dataset("synthetic", src, out, config=None, workers=0)
    return out
