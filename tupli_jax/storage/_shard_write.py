"""Writing shards: validated episodes (or packed columns) to one Arrow IPC file, atomically.

Host-side only. ``write_shard``, ``write_shards`` and ``write_shard_columns`` validate their
input with ``_shard_layout``, pack it into one array per column (``_Batch``) and write
``<uuid>.arrow`` through a temporary file, fsync and rename, computing the CRC-32 as they write;
they return a ``ShardInfo`` for the catalog. The format and the costs are described in
``shards`` (the public module, which re-exports these); ``_shard_read`` reads the files back.

Example:
    >>> # info = write_shard(directory, episodes); info.name, info.checksum, info.ranges
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import numpy as np
import pyarrow as pa

from tupli_jax._tree import dtype_name, num_leaves
from tupli_jax.episode import EpisodeData
from tupli_jax.storage._files import fsync_dir
from tupli_jax.storage._shard_layout import (
    _METADATA_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    _check_dtypes,
    _check_episode_type,
    _Column,
    _compile_layout,
    _encode_infos,
    _field_leaf_names,
    _fields_of,
    _group,
    _Layout,
    _layout_from,
    _validate_one,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = ["ShardInfo", "write_shard", "write_shard_columns", "write_shards"]

_FIELD_SHAPE_KEY = b"tupli_jax.shape"
_FIELD_DTYPE_KEY = b"tupli_jax.dtype"
_COMPRESSIONS = ("lz4", "zstd", None)
_MAX_BATCH_BYTES = 256 << 20  # rows per IPC record batch are chosen to stay under this


@dataclasses.dataclass(frozen=True, eq=False)
class ShardInfo:
    """What ``write_shard`` wrote; the catalog keeps it.

    Attributes:
        name: File name inside the shards directory, ``"<uuid4hex>.arrow"``.
        checksum: CRC-32 of the whole file, 8 lowercase hex digits.
        size: Bytes on disk.
        n_rows: Rows in the file (observations of all episodes).
        starts: int64 ``[E]`` first row per input episode, in input order.
        stops: int64 ``[E]`` row after the last, per input episode.
    """

    name: str
    checksum: str
    size: int
    n_rows: int
    starts: np.ndarray
    stops: np.ndarray

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """``[row_start, row_stop)`` per input episode, in input order (Python ints)."""
        return list(zip(self.starts.tolist(), self.stops.tolist(), strict=True))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardInfo):
            return NotImplemented
        return (
            (self.name, self.checksum, self.size, self.n_rows)
            == (other.name, other.checksum, other.size, other.n_rows)
            and np.array_equal(self.starts, other.starts)
            and np.array_equal(self.stops, other.stops)
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays, as it held a list before


class _ChecksumWriter:
    """A file object for ``pa.PythonFile`` that computes the CRC-32 of what it writes."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.crc = 0
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        self.crc = zlib.crc32(data, self.crc)
        written: int = self._file.write(data)
        self.size += written
        return written

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:  # the real file is closed by write_shard after fsync
        self.closed = True

    def writable(self) -> bool:
        return True

    def readable(self) -> bool:
        return False

    def seekable(self) -> bool:
        return False


def _primitive_array(values: np.ndarray) -> pa.Array:
    """A null-free Arrow array over ``values`` (zero-copy except bool, which Arrow bit-packs).

    Built from buffers: ``pa.array`` would import pandas (~0.6 s) on first use."""
    flat = np.ascontiguousarray(values).reshape(-1)
    if flat.dtype == np.bool_:
        buffer = pa.py_buffer(np.packbits(flat, bitorder="little"))
    else:
        buffer = pa.py_buffer(flat)
    return pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), flat.size, [None, buffer])


def _arrow_column(column: _Column, values: np.ndarray) -> pa.Array:
    flat = _primitive_array(values)
    if not column.shape:
        return flat
    return pa.FixedSizeListArray.from_arrays(flat, math.prod(column.shape))


def _string_array(rows: list[str | None]) -> pa.Array:
    encoded = [b"" if row is None else row.encode() for row in rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    valid = np.packbits(np.array([row is not None for row in rows], bool), bitorder="little")
    buffers = [pa.py_buffer(valid), pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    return pa.Array.from_buffers(pa.large_string(), len(rows), buffers)


class _Batch(NamedTuple):
    """A validated batch in packed form: episodes back to back, no padding rows yet."""

    layout: _Layout
    described: list[_Column]  # layout.columns(), computed once (~70 us)
    columns: list[np.ndarray]  # in that order: obs [sum T + reset, ...], others [sum T, ...]
    n_tuples: np.ndarray  # [E] int64, each >= 1
    has_reset: np.ndarray  # [E] bool
    infos: list[list[str] | None] | None  # JSON per step, per episode; None: no info column


def _raise_first_problem(
    episodes: Sequence[Any], layout: _Layout, indices: Sequence[int] | None = None
) -> NoReturn:
    """The fast path found a problem: find and raise it with the per-episode validation, so
    the message names the first bad episode exactly as before (``indices``: the episodes'
    indices in the caller's batch, ``0..N-1`` by default)."""
    for index, episode in zip(indices or range(len(episodes)), episodes, strict=True):
        _validate_one(index, episode, layout)
    raise TupliStorageError(  # pragma: no cover - the two validations agree
        "the batch failed validation but no episode could be blamed; expected episodes of one "
        "structure: write them one by one to find the culprit"
    )


def _batch_from_episodes(episodes: Sequence[EpisodeData]) -> _Batch:
    """Validates and packs ``episodes`` (one layout): one compiled flatten per episode."""
    first = episodes[0]
    _check_episode_type(0, first)
    layout, first_leaves, _ = _layout_from("episode 0", _fields_of(first))
    leaves_of = _compile_layout(layout)
    per_episode = [first_leaves]
    for episode in episodes[1:]:
        leaves = leaves_of(_fields_of(episode)) if isinstance(episode, EpisodeData) else None
        if leaves is None:
            _raise_first_problem(episodes, layout)
        per_episode.append(leaves)
    return _pack(layout, episodes, per_episode, range(len(episodes)))


def _pack(
    layout: _Layout,
    episodes: Sequence[EpisodeData],
    per_episode: list[list[np.ndarray]],
    indices: Sequence[int],
) -> _Batch:
    """Checks dtypes and lengths (vectorised) and concatenates each column once; ``indices``
    are the episodes' indices in the caller's batch, for error messages."""
    _check_dtypes(f"episode {indices[0]}", layout)
    n = len(episodes)
    n_obs = num_leaves(layout.obs_spec)
    by_column = list(zip(*per_episode, strict=True))
    lengths = [np.fromiter(map(len, column), np.int64, count=n) for column in by_column]
    n_tuples = lengths[-2]  # the reward column
    has_reset = np.fromiter((e.has_reset_observation for e in episodes), bool, count=n)
    n_obs_rows = n_tuples + has_reset
    if not n_tuples.all() or any(
        not np.array_equal(lens, n_obs_rows if j < n_obs else n_tuples)
        for j, lens in enumerate(lengths)
    ):
        _raise_first_problem(episodes, layout, indices)
    infos: list[list[str] | None] | None = None
    if any(e.infos is not None for e in episodes):
        infos = [
            _encode_infos(i, e.infos, t)
            for i, e, t in zip(indices, episodes, n_tuples.tolist(), strict=True)
        ]
    described = layout.columns()
    columns = [
        np.concatenate(parts, axis=0, dtype=c.dtype, casting="equiv")
        if c.stored
        else np.zeros((0, *c.shape), c.dtype)
        for c, parts in zip(described, by_column, strict=True)
    ]
    return _Batch(layout, described, columns, n_tuples, has_reset, infos)


def _batch_from_columns(
    observations: Any,
    actions: Any,
    extras: Any,
    rewards: Any,
    discounts: Any,
    n_tuples: Any,
    has_reset_observation: Any,
    infos: Any,
) -> _Batch:
    where = "write_shard_columns"
    counts = np.asarray(n_tuples)
    if counts.ndim != 1 or counts.size == 0 or counts.dtype.kind not in "iu":
        raise TupliStorageError(
            f"{where}: n_tuples must be a non-empty 1-D integer array [E] (transitions per "
            f"episode); received dtype {counts.dtype} with shape {counts.shape}"
        )
    counts = counts.astype(np.int64)
    if (counts < 1).any():
        i = int(np.argmax(counts < 1))
        raise TupliStorageError(
            f"episode {i} is empty (n_tuples[{i}] = {counts[i]}); expected at least one step"
        )
    reset = np.asarray(has_reset_observation)
    if reset.dtype != np.bool_ or reset.shape not in ((), counts.shape):
        raise TupliStorageError(
            f"{where}: has_reset_observation must be a bool or a bool array of shape "
            f"{counts.shape}; received dtype {reset.dtype} with shape {reset.shape}"
        )
    reset = np.broadcast_to(reset, counts.shape)
    if not isinstance(extras, dict):
        raise TupliStorageError(
            f"{where}: extras is a {type(extras).__name__}; expected a dict (or None)"
        )
    trees = (observations, actions, extras, rewards, discounts)
    layout, leaves, n_obs = _layout_from(where, trees)
    _check_dtypes(where, layout)
    total_steps = int(counts.sum())
    total_obs = total_steps + int(reset.sum())
    for j, leaf in enumerate(leaves):
        expected, rows = (
            (total_obs, "sum(n_tuples + has_reset_observation)")
            if j < n_obs
            else (total_steps, "sum(n_tuples)")
        )
        if leaf.shape[0] != expected:
            raise TupliStorageError(
                f"{where}: {_field_leaf_names(layout)[j]} has leading length {leaf.shape[0]}; "
                f"expected {expected} = {rows}: pass the episodes back to back, observations "
                "with T + 1 rows per episode that has a reset observation"
            )
    encoded: list[list[str] | None] | None = None
    if infos is not None:
        if not isinstance(infos, Sequence) or len(infos) != counts.size:
            received = len(infos) if isinstance(infos, Sequence) else type(infos).__name__
            raise TupliStorageError(
                f"{where}: infos has {received} entries; expected None or one entry per "
                f"episode ({counts.size}), each None or a list of T dicts"
            )
        if any(x is not None for x in infos):  # no info column when no episode has infos
            encoded = [
                _encode_infos(i, x, t)
                for i, (x, t) in enumerate(zip(infos, counts.tolist(), strict=True))
            ]
    described = layout.columns()
    columns = [
        leaf.astype(c.dtype, copy=False, casting="equiv")
        for c, leaf in zip(described, leaves, strict=True)
    ]
    return _Batch(layout, described, columns, counts, np.array(reset), encoded)


def _info_array(batch: _Batch, starts: np.ndarray, n_rows: int) -> pa.Array:
    assert batch.infos is not None
    rows: list[str | None] = [None] * n_rows
    for start, encoded in zip(starts.tolist(), batch.infos, strict=True):
        if encoded is not None:
            rows[start : start + len(encoded)] = encoded
    return _string_array(rows)


def _build_table(batch: _Batch, stops: np.ndarray) -> pa.Table:
    n_rows = int(stops[-1])
    step_rows = None  # rows holding a transition, when some rows hold only an observation
    if batch.has_reset.any():
        step_rows = np.ones(n_rows, bool)
        step_rows[stops[batch.has_reset] - 1] = False
    arrays: list[pa.Array] = []
    fields: list[pa.Field] = []
    for column, values in zip(batch.described, batch.columns, strict=True):
        if not column.stored:
            continue
        if column.group != "obs" and step_rows is not None:
            padded = np.zeros((n_rows, *column.shape), column.dtype)
            padded[step_rows] = values
            values = padded
        arrays.append(_arrow_column(column, values))
        meta = {_FIELD_DTYPE_KEY: dtype_name(column.dtype).encode()}
        if column.shape:
            meta[_FIELD_SHAPE_KEY] = json.dumps(list(column.shape)).encode()
        fields.append(pa.field(column.name, arrays[-1].type, nullable=False, metadata=meta))
    if batch.infos is not None:
        arrays.append(_info_array(batch, stops - (batch.n_tuples + batch.has_reset), n_rows))
        fields.append(pa.field("info", pa.large_string()))
    metadata = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        **batch.layout._asdict(),
        "has_info": batch.infos is not None,
    }
    schema = pa.schema(fields, metadata={_METADATA_KEY: json.dumps(metadata).encode()})
    return pa.Table.from_arrays(arrays, schema=schema)


def _check_compression(compression: str | None) -> None:
    if compression not in _COMPRESSIONS:
        raise TupliStorageError(
            f"compression {compression!r} is not supported; expected one of {_COMPRESSIONS}"
        )


def _write_batch(
    directory: Path, batch: _Batch, compression: str | None, fsync_directory: bool = True
) -> ShardInfo:
    stops = np.cumsum(batch.n_tuples + batch.has_reset)
    starts = stops - (batch.n_tuples + batch.has_reset)
    name = f"{uuid.uuid4().hex}.arrow"
    directory = Path(directory)
    final, tmp = directory / name, directory / f"{name}.tmp"
    replaced = False
    try:
        table = _build_table(batch, stops)
        row_bytes = max(1, table.nbytes // max(1, table.num_rows))
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb") as file:
            sink = _ChecksumWriter(file)
            options = pa.ipc.IpcWriteOptions(compression=compression)
            with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), table.schema, options=options) as w:
                w.write_table(table, max_chunksize=max(1, _MAX_BATCH_BYTES // row_bytes))
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, final)
        replaced = True
        if fsync_directory:
            fsync_dir(directory)
    except BaseException as err:
        for leftover in (tmp, final) if replaced else (tmp,):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
            except OSError:  # pragma: no cover - best effort; verify() reports orphans
                pass
        if not isinstance(err, Exception):
            raise
        raise TupliStorageError(
            f"could not write shard '{final}': {type(err).__name__}: {err}; nothing was "
            "written: check disk space and permissions of the store directory"
        ) from err
    return ShardInfo(
        name,
        f"{sink.crc:08x}",
        sink.size,
        int(stops[-1]),
        np.asarray(starts, np.int64),
        np.asarray(stops, np.int64),
    )


def write_shard(
    directory: Path,
    episodes: Sequence[EpisodeData],
    *,
    compression: str | None = "lz4",
    fsync_directory: bool = True,
) -> ShardInfo:
    """Writes a batch of same-structure episodes to a new shard file, atomically and durably.

    Every episode is validated before anything is written. The file is written as
    ``<name>.tmp``, flushed and fsynced, renamed to ``<name>``, and the directory fsynced
    (unless ``fsync_directory`` is false); on any failure the temporary file is removed.

    Cost: the structure is flattened once (episode 0); every other episode goes through a
    compiled ``flatten_as`` (~1 us for CartPole), lengths are checked vectorised and each column
    is one ``np.concatenate``. Infos, when present, cost one ``json.dumps`` per step.

    Args:
        directory: The shards directory (created if missing).
        episodes: Non-empty sequence of ``EpisodeData`` sharing one structure (see
            ``group_by_structure``).
        compression: ``"lz4"`` (default), ``"zstd"`` or ``None``.
        fsync_directory: Fsync ``directory`` after the rename. Pass ``False`` only when the
            caller moves the file elsewhere and fsyncs that directory (a staging directory),
            which saves one fsync per batch.

    Returns:
        A ``ShardInfo`` with the file name, checksum, size, row count and per-episode row ranges.

    Raises:
        TupliStorageError: Bad input (naming the first bad episode's index and field) or an I/O
            failure.

    Example:
        >>> # see the module docstring
    """
    _check_compression(compression)
    if len(episodes) == 0:
        raise TupliStorageError("write_shard got no episodes; expected at least one")
    return _write_batch(directory, _batch_from_episodes(episodes), compression, fsync_directory)


def write_shards(
    directory: Path,
    episodes: Sequence[EpisodeData],
    *,
    compression: str | None = "lz4",
    fsync_directory: bool = True,
) -> list[tuple[list[int], ShardInfo]]:
    """``group_by_structure`` + one ``write_shard`` per group, walking each episode once.

    Every episode of every group is validated before the first file is written, so bad input
    writes nothing. Saves one compiled flatten per episode over calling the two functions
    (~2 us per CartPole episode).

    Args:
        directory: The shards directory (created if missing).
        episodes: Episodes of any structures (possibly empty).
        compression: As in ``write_shard``.
        fsync_directory: As in ``write_shard``.

    Returns:
        ``(indices, info)`` per shard written, in order of first appearance; ``info.ranges[k]``
        are the rows of ``episodes[indices[k]]``.

    Raises:
        TupliStorageError: Bad input (naming the episode index and field) or an I/O failure;
            shards written before an I/O failure stay (the caller writes into a staging
            directory it removes, as ``FileStorage`` does).

    Example:
        >>> # for indices, info in write_shards(staging, episodes): catalog rows ...
    """
    _check_compression(compression)
    batches = [
        (group.indices, _pack(group.layout, [episodes[i] for i in group.indices], group.leaves,
                              group.indices))
        for group in _group(episodes)
    ]  # fmt: skip
    return [
        (indices, _write_batch(directory, batch, compression, fsync_directory))
        for indices, batch in batches
    ]


def write_shard_columns(
    directory: Path,
    *,
    observations: Any,
    actions: Any,
    rewards: np.ndarray,
    discounts: np.ndarray,
    n_tuples: np.ndarray | Sequence[int],
    has_reset_observation: bool | np.ndarray = True,
    extras: dict[str, Any] | None = None,
    infos: Sequence[Sequence[dict[str, Any]] | None] | None = None,
    compression: str | None = "lz4",
    fsync_directory: bool = True,
) -> ShardInfo:
    """Writes ``E`` episodes given as packed columns (episodes back to back) to a new shard.

    For callers that already hold concatenated columns (a flush cutting episodes out of a
    time-major buffer with one gather per leaf): no per-episode Python at all. The file is
    identical to what ``write_shard`` writes for the same episodes, with the same atomicity.

    Args:
        directory: The shards directory (created if missing).
        observations: Pytree of arrays ``[sum(n_tuples + has_reset_observation), ...]``:
            episode ``e``'s ``T_e + 1`` observations (``T_e`` without a reset observation),
            episodes back to back.
        actions: Pytree of arrays ``[sum(n_tuples), ...]``: the ``T_e`` actions of each episode,
            back to back (no padding row).
        rewards: ``[sum(n_tuples), ...]``.
        discounts: ``[sum(n_tuples), ...]``.
        n_tuples: ``[E]`` transitions per episode, each at least 1.
        has_reset_observation: Bool, or ``[E]`` bools: whether each episode's observations
            start with the reset observation.
        extras: Dict of pytrees ``[sum(n_tuples), ...]`` (``None``: no extras).
        infos: ``None``, or ``E`` entries, each ``None`` or a list of ``T_e`` info dicts.
        compression: ``"lz4"`` (default), ``"zstd"`` or ``None``.
        fsync_directory: As in ``write_shard``.

    Returns:
        A ``ShardInfo``; ``ranges[e]`` are episode ``e``'s rows, for the catalog.

    Raises:
        TupliStorageError: Bad input (the message names the column and the expected length) or
            an I/O failure; nothing is written.

    Not jit-safe (host I/O). Example:
        >>> import tempfile
        >>> info = write_shard_columns(
        ...     Path(tempfile.mkdtemp()), observations=np.zeros((5, 4), np.float32),
        ...     actions=np.array([0, 1, 1]), rewards=np.ones(3, np.float32),
        ...     discounts=np.ones(3, np.float32), n_tuples=np.array([2, 1]))
        >>> info.ranges
        [(0, 3), (3, 5)]
    """
    _check_compression(compression)
    batch = _batch_from_columns(
        observations,
        actions,
        {} if extras is None else extras,
        rewards,
        discounts,
        n_tuples,
        has_reset_observation,
        infos,
    )
    return _write_batch(directory, batch, compression, fsync_directory)
