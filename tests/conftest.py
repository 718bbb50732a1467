"""Shared test fixtures and paths."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Real annotated samples in their published layouts. Read-only, never copied into the repo.
# CPSAM_SHARED_DATA points elsewhere when the checkout does not sit beside ../shared.
SHARED_DATA = Path(os.environ.get("CPSAM_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real samples not found at {SHARED_DATA}")
    return SHARED_DATA
