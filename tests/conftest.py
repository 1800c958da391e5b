"""Test configuration: strict JAX promotion rules (as Equinox tests do), CPU only, and the
``store`` fixture (a new ``FileStorage`` on ``tmp_path``) shared by the storage-facing tests."""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

import pytest  # noqa: E402

from tupli_jax.storage.file_storage import FileStorage  # noqa: E402


@pytest.fixture
def store(tmp_path: Path) -> FileStorage:
    """A new, empty store in the test's temporary directory."""
    return FileStorage(tmp_path / "store")
