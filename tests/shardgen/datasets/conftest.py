"""Fixtures shared by the converter tests; plain helper functions are in helpers.py."""

from pathlib import Path

import pytest


@pytest.fixture
def shards_dir(tmp_path_factory) -> Path:
    """A fresh, empty output folder for build_dataset, outside every dataset fixture's folder
    (some fixtures use tmp_path itself as the dataset root)."""
    return tmp_path_factory.mktemp("shards")
