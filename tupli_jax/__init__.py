"""tupli_jax: record vectorised RL transitions on device into an embedded offline-RL store.

The public API (see the README and ``shared/DESIGN.md``)::

    import tupli_jax as tj

    store = tj.FileStorage("tupli_store")
    rec = tj.RecordingWrapper(jumanji.make("Game2048-v1"), storage=store, capacity=1024)
    result = tj.record(jumanji.make("Snake-v1"), storage=store, num_envs=1024, num_steps=2_000)
    data = tj.TupliDataset(store).to_numpy()

Storage-only users do not pay for importing JAX: the JAX parts (``RecordingWrapper``,
``RecorderState``, ``record``) are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    ArtifactMetadataItem,
    Benchmark,
    BenchmarkHeader,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    EpisodeMetadataCallback,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterGT,
    FilterIN,
    FilterLEQ,
    FilterLT,
    FilterNE,
    FilterOR,
    RLTuple,
)
from tupli_jax.storage import FileStorage, TupliStorage, TupliStorageError

if TYPE_CHECKING:
    from tupli_jax.dataset import TupliDataset
    from tupli_jax.pipeline import RecordResult, record
    from tupli_jax.recorder import RecorderState, RecordingWrapper

__version__ = "0.1.0"

_LAZY = {
    "TupliDataset": "tupli_jax.dataset",
    "RecordingWrapper": "tupli_jax.recorder",
    "RecorderState": "tupli_jax.recorder",
    "record": "tupli_jax.pipeline",
    "RecordResult": "tupli_jax.pipeline",
}

__all__ = [
    "ArtifactMetadata",
    "ArtifactMetadataItem",
    "Benchmark",
    "BenchmarkHeader",
    "BenchmarkMetadata",
    "BenchmarkQuery",
    "Episode",
    "EpisodeBatch",
    "EpisodeData",
    "EpisodeHeader",
    "EpisodeItem",
    "EpisodeMetadataCallback",
    "FileStorage",
    "FilterAND",
    "FilterEQ",
    "FilterGEQ",
    "FilterGT",
    "FilterIN",
    "FilterLEQ",
    "FilterLT",
    "FilterNE",
    "FilterOR",
    "RLTuple",
    "RecordResult",
    "RecorderState",
    "RecordingWrapper",
    "TupliDataset",
    "TupliStorage",
    "TupliStorageError",
    "record",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tupli_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
