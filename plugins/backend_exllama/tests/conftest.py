"""Fixtures of the exllama backend's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from exllama_folder import make_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder without weights (see exllama_folder)."""
    return make_folder(tmp_path)
