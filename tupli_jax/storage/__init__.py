"""The embedded store: ``TupliStorage`` interface, ``TupliStorageError``, ``FileStorage`` and
``EpisodeHeaders`` (the lazy headers ``FileStorage.record_episode_batch`` returns)."""

from tupli_jax.storage._episodes import EpisodeHeaders
from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

__all__ = ["EpisodeHeaders", "FileStorage", "TupliStorage", "TupliStorageError"]
