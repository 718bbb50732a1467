"""Shared test fixtures and paths."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real annotated samples in their published layouts. Read-only, never copied into the repo.
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real samples not found at {SHARED_DATA}")
    return SHARED_DATA
