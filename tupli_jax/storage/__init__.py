"""The embedded store: ``TupliStorage`` interface, ``TupliStorageError`` and ``FileStorage``."""

from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

__all__ = ["FileStorage", "TupliStorage", "TupliStorageError"]
