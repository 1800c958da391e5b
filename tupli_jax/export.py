"""Export a benchmark's episodes to other formats: D4RL-style npz, Parquet and Minari.

Host-side only. Every export keeps ``terminals`` (terminated) and ``timeouts`` (truncated) apart.

Example:
    >>> # from tupli_jax.export import export_benchmark
    >>> # export_benchmark(store, bench_id, "npz", "dataset.npz")
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tupli_jax import _tree
from tupli_jax.schema import FilterEQ
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

__all__ = ["FORMATS", "export_benchmark", "export_minari", "export_npz", "export_parquet"]


def _flat_leaves(tree: Any, prefix: str) -> dict[str, np.ndarray]:
    leaves, spec = _tree.flatten(tree)
    names = _tree.leaf_names(spec, prefix)
    return {name: np.asarray(leaf) for name, leaf in zip(names, leaves, strict=True)}


def _columns(store: FileStorage, benchmark_id: str) -> dict[str, np.ndarray]:
    from tupli_jax.dataset import TupliDataset

    store.load_benchmark(benchmark_id)  # unknown ids fail here with a clear message
    data = (
        TupliDataset(store).with_benchmark_filter(FilterEQ(key="id", value=benchmark_id)).to_numpy()
    )
    if len(data["episode_ids"]) == 0:
        raise TupliStorageError(
            f"benchmark '{benchmark_id}' in store '{store.root}' has no episodes to export"
        )
    columns: dict[str, np.ndarray] = {}
    for key in ("observations", "actions", "next_observations"):
        tree = data[key]
        if isinstance(tree, np.ndarray):
            columns[key] = tree
        else:
            columns.update(_flat_leaves(tree, key))
    for key in ("rewards", "terminals", "timeouts", "episode_ids"):
        columns[key] = np.asarray(data[key])
    return columns


def export_npz(store: FileStorage, benchmark_id: str, out: Path) -> Path:
    """Writes a D4RL-layout ``.npz``: observations, actions, rewards, next_observations, terminals,
    timeouts, episode_ids (pytree observations as ``observations.<leaf path>`` keys).
    """
    columns = _columns(store, benchmark_id)
    columns["episode_ids"] = columns["episode_ids"].astype(str)
    with open(out, "wb") as f:
        np.savez(f, **columns)  # type: ignore[arg-type]
    return out


def export_parquet(store: FileStorage, benchmark_id: str, out: Path) -> Path:
    """Writes one Parquet row per transition; multi-dimensional leaves become fixed-size lists
    (their row shape is in the column's field metadata ``shape``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays, fields = [], []
    for name, column in _columns(store, benchmark_id).items():
        if column.dtype.kind in "US":
            array: pa.Array = pa.array(column.tolist(), type=pa.string())
            meta = None
        elif column.ndim == 1:
            array = pa.array(column)
            meta = None
        else:
            width = int(np.prod(column.shape[1:]))
            flat = pa.array(np.ascontiguousarray(column).reshape(-1))
            array = pa.FixedSizeListArray.from_arrays(flat, width)
            meta = {b"shape": repr(tuple(column.shape[1:])).encode()}
        arrays.append(array)
        fields.append(pa.field(name, array.type, metadata=meta))
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), out)
    return out


def _space_for(value: Any) -> Any:
    import gymnasium.spaces as spaces

    if isinstance(value, Mapping):
        return spaces.Dict({k: _space_for(v) for k, v in value.items()})
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return spaces.Dict({k: _space_for(getattr(value, k)) for k in value._fields})
    if isinstance(value, list | tuple):
        return spaces.Tuple([_space_for(v) for v in value])
    array = np.asarray(value)
    shape = array.shape[1:]
    if array.dtype == np.bool_:
        return spaces.MultiBinary(list(shape) or 1) if shape else spaces.Discrete(2)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        return spaces.Box(low=info.min, high=info.max, shape=shape, dtype=array.dtype)
    return spaces.Box(low=-np.inf, high=np.inf, shape=shape, dtype=array.dtype)


def _as_minari_tree(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _as_minari_tree(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {k: _as_minari_tree(getattr(value, k)) for k in value._fields}
    if isinstance(value, list | tuple):
        return tuple(_as_minari_tree(v) for v in value)
    return np.asarray(value)


_MINARI_ID = re.compile(r"^([A-Za-z0-9_-]+/)?[A-Za-z0-9_-]+-v\d+$")


def export_minari(
    store: FileStorage, benchmark_id: str, out: Path, dataset_id: str = "tupli/export-v0"
) -> Path:
    """Writes a Minari dataset (arrow format) named ``dataset_id`` under the directory ``out``;
    read it back with ``MINARI_DATASETS_PATH=out`` and ``minari.load_dataset(dataset_id)``.
    """
    try:
        import minari
        from minari.data_collector.episode_buffer import EpisodeBuffer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise TupliStorageError(
            "exporting to Minari needs the 'minari' package: pip install 'tupli_jax[bench]'"
        ) from e
    if not _MINARI_ID.match(dataset_id):
        raise TupliStorageError(
            f"Minari dataset id must look like 'namespace/name-v0', received {dataset_id!r}"
        )
    store.load_benchmark(benchmark_id)
    headers = store.list_episodes(FilterEQ(key="benchmark_id", value=benchmark_id))
    if not headers:
        raise TupliStorageError(
            f"benchmark '{benchmark_id}' in store '{store.root}' has no episodes to export"
        )
    buffers = []
    first = None
    for index, header in enumerate(headers):
        episode = store.load_episode(header.id)
        if not episode.has_reset_observation:
            raise TupliStorageError(
                f"episode '{header.id}' was recorded from pytupli tuples without its reset "
                "observation; Minari needs T + 1 observations per episode"
            )
        first = first or episode
        buffers.append(
            EpisodeBuffer(
                id=index,
                observations=_as_minari_tree(episode.observations),
                actions=_as_minari_tree(episode.actions),
                rewards=list(np.asarray(episode.rewards, np.float64)),
                terminations=[False] * (episode.length - 1) + [episode.terminated],
                truncations=[False] * (episode.length - 1) + [episode.truncated],
                infos={},
            )
        )
    assert first is not None
    out.mkdir(parents=True, exist_ok=True)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(out)
    try:
        minari.create_dataset_from_buffers(
            dataset_id=dataset_id,
            buffer=buffers,
            observation_space=_space_for(first.observations),
            action_space=_space_for(first.actions),
            algorithm_name="tupli_jax export",
            data_format="arrow",
        )
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    return out


FORMATS: dict[str, Callable[[FileStorage, str, Path], Path]] = {
    "npz": export_npz,
    "parquet": export_parquet,
    "minari": export_minari,
}


def export_benchmark(store: FileStorage, benchmark_id: str, fmt: str, out: str | Path) -> Path:
    """Exports every episode of a benchmark in format ``fmt`` (``npz``, ``parquet`` or ``minari``).

    Args:
        store: The store holding the benchmark.
        benchmark_id: Id of the benchmark whose episodes are exported.
        fmt: One of ``FORMATS``.
        out: Output file (npz, parquet) or directory (minari).

    Returns:
        The path written.

    Example:
        >>> # export_benchmark(FileStorage("tupli_store"), bench_id, "parquet", "data.parquet")
    """
    if fmt not in FORMATS:
        raise TupliStorageError(
            f"unknown export format {fmt!r}; expected one of {', '.join(sorted(FORMATS))}"
        )
    return FORMATS[fmt](store, benchmark_id, Path(out))
