"""Reading shards: checksum-verified, decoded ``Shard``s and their LRU cache.

Host-side only. ``open_shard`` reads a whole file (no mmap), checks its CRC-32, decodes every
column into read-only numpy arrays (``Shard``) and keeps the result in a small LRU (``_cache``,
the only copy of that state) keyed by the file's stat; ``verify_shard`` always re-reads. Columns
are described by ``_shard_layout``; ``_shard_write`` writes the files; ``shards`` (the public
module, which re-exports these) describes the format.

Example:
    >>> # shard = open_shard(path, info.checksum); shard.columns("obs")[0].shape
"""

from __future__ import annotations

import collections
import json
import os
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tupli_jax._tree import TreeSpec, num_leaves, unflatten
from tupli_jax.episode import EpisodeData
from tupli_jax.storage._shard_layout import (
    _GROUPS,
    _METADATA_KEY,
    FORMAT_NAME,
    FORMAT_VERSION,
    _Column,
    _Layout,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = ["Shard", "clear_shard_cache", "file_checksum", "open_shard", "verify_shard"]

_CACHE_MAX_ENTRIES = 8
_CACHE_MAX_BYTES = 1 << 30  # the most recent shard is kept even if larger
_READ_CHUNK = 4 << 20


class Shard:
    """An opened, checksum-verified, decoded shard (immutable; arrays are read-only).

    Attributes:
        path: The file.
        checksum: Its verified checksum.
        n_rows: Rows in the file.
        obs_spec: ``TreeSpec`` of the observations (leaf shapes per row).
        action_spec: ``TreeSpec`` of the actions.
        extras_spec: ``TreeSpec`` of the extras dict.
        has_info: Whether the shard has an ``info`` column.
        nbytes: Decoded size in memory.

    Example:
        >>> # shard = open_shard(path, checksum); shard.columns("obs")[0].shape -> (n_rows, ...)
    """

    def __init__(self, path: Path, checksum: str, table: pa.Table) -> None:
        self.path = path
        self.checksum = checksum
        self.n_rows = table.num_rows
        raw = (table.schema.metadata or {}).get(_METADATA_KEY)
        if raw is None:
            raise ValueError("no tupli_jax metadata in the Arrow schema")
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} file")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"format version {meta.get('version')!r}; this tupli_jax reads version "
                f"{FORMAT_VERSION}: upgrade tupli_jax"
            )
        layout = _Layout(*(meta[k] for k in _Layout._fields))
        self.obs_spec, self.action_spec, self.extras_spec = layout[:3]
        self.has_info = bool(meta.get("has_info"))
        columns = layout.columns()
        stored = [c for c in columns if c.stored]
        names = [c.name for c in stored] + (["info"] if self.has_info else [])
        if table.column_names != names:
            raise ValueError(f"columns {table.column_names[:8]} do not match the metadata")
        if self.has_info and table.schema.field("info").type != pa.large_string():
            raise ValueError(f"column info is {table.schema.field('info').type}; expected string")
        self._columns: dict[str, list[np.ndarray]] = {g: [] for g in _GROUPS}
        for column in columns:
            if column.stored:
                values = _to_numpy(table.column(column.name), column)
            else:
                values = np.zeros((self.n_rows, *column.shape), column.dtype)
            values.flags.writeable = False
            self._columns[column.group].append(values)
        self._info = table.column("info") if self.has_info else None
        self.nbytes = sum(a.nbytes for cols in self._columns.values() for a in cols)
        self.nbytes += self._info.nbytes if self._info is not None else 0
        for spec in (self.obs_spec, self.action_spec, self.extras_spec):
            unflatten(spec, [None] * num_leaves(spec))  # validates NamedTuple nodes up front

    def __repr__(self) -> str:
        return f"Shard('{self.path}', n_rows={self.n_rows})"

    def _spec(self, group: str) -> TreeSpec | None:
        return {"obs": self.obs_spec, "act": self.action_spec, "ext": self.extras_spec}.get(group)

    def columns(self, group: str) -> list[np.ndarray]:
        """Full read-only columns ``[n_rows, ...]`` of ``group`` in leaf order (zero-copy).

        Args:
            group: One of ``"obs"``, ``"act"``, ``"ext"``, ``"reward"``, ``"discount"``.

        Example:
            >>> # obs_leaves = shard.columns("obs")
        """
        if group not in self._columns:
            raise TupliStorageError(f"unknown column group {group!r}; expected one of {_GROUPS}")
        return list(self._columns[group])

    def gather(self, group: str, rows: np.ndarray) -> Any:
        """Rows ``rows`` of ``group``: a pytree for obs/act/ext, an array for reward/discount.

        Args:
            group: One of ``"obs"``, ``"act"``, ``"ext"``, ``"reward"``, ``"discount"``.
            rows: Integer row indices ``[N]``.

        Returns:
            New arrays ``[N, ...]`` (copies), arranged as the group's pytree.

        Example:
            >>> # next_obs = shard.gather("obs", np.array([1, 2, 5]))
        """
        leaves = self.columns(group)
        index = np.asarray(rows)
        if index.dtype.kind not in "iu":
            raise TupliStorageError(f"rows must be integers; received dtype {index.dtype}")
        if index.size and (index.min() < 0 or index.max() >= self.n_rows):
            raise TupliStorageError(
                f"rows out of range [0, {self.n_rows}) in shard '{self.path}' "
                f"(min {index.min()}, max {index.max()})"
            )
        gathered = [leaf[index] for leaf in leaves]
        spec = self._spec(group)
        return gathered[0] if spec is None else unflatten(spec, gathered)

    def episode(self, row_start: int, row_stop: int, n_tuples: int) -> EpisodeData:
        """The episode stored in rows ``[row_start, row_stop)`` (arrays only, copied).

        ``observations`` are all rows of the range; actions, rewards, discounts, extras and infos
        the first ``n_tuples`` rows. ``has_reset_observation`` is
        ``row_stop - row_start == n_tuples + 1``. ``terminated``, ``truncated``, ``metadata`` and
        ids keep their defaults: the catalog fills them.

        Example:
            >>> # ep = shard.episode(0, 23, n_tuples=22)
        """
        n_obs = row_stop - row_start
        valid_range = 0 <= row_start < row_stop <= self.n_rows and n_tuples >= 1
        if not (valid_range and n_obs - n_tuples in (0, 1)):
            raise TupliStorageError(
                f"row range [{row_start}, {row_stop}) with n_tuples={n_tuples} is not an episode "
                f"of shard '{self.path}' ({self.n_rows} rows); expected a range inside the file "
                "holding n_tuples or n_tuples + 1 rows: the catalog may be damaged, run verify"
            )
        obs_stop, act_stop = row_stop, row_start + n_tuples

        def take(group: str, stop: int) -> list[np.ndarray]:
            return [np.array(c[row_start:stop]) for c in self._columns[group]]

        infos = None
        if self._info is not None:
            raw = self._info.slice(row_start, n_tuples).to_pylist()
            if any(s is not None for s in raw):
                infos = [json.loads(s) if s is not None else {} for s in raw]
        return EpisodeData(
            observations=unflatten(self.obs_spec, take("obs", obs_stop)),
            actions=unflatten(self.action_spec, take("act", act_stop)),
            rewards=take("reward", act_stop)[0],
            discounts=take("discount", act_stop)[0],
            terminated=False,
            truncated=False,
            extras=unflatten(self.extras_spec, take("ext", act_stop)),
            infos=infos,
            has_reset_observation=n_obs == n_tuples + 1,
        )


def _to_numpy(chunked: pa.ChunkedArray, column: _Column) -> np.ndarray:
    if chunked.type != column.arrow_type() or chunked.null_count:
        raise ValueError(
            f"column {column.name} is {chunked.type} with {chunked.null_count} nulls; expected "
            f"{column.arrow_type()} without nulls"
        )
    parts = [_chunk_to_numpy(chunk, column) for chunk in chunked.chunks]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.zeros((0, *column.shape), column.dtype)
    return np.concatenate(parts, axis=0)


def _chunk_to_numpy(chunk: pa.Array, column: _Column) -> np.ndarray:
    """Zero-copy view of a null-free chunk (bool is unpacked); reads buffers directly because
    ``Array.to_numpy`` imports pandas."""
    values = chunk.flatten() if column.shape else chunk
    n, offset = len(values), values.offset
    buffer = values.buffers()[1]
    if n == 0 or buffer is None:
        flat = np.zeros(n, column.dtype)
    elif column.dtype == np.bool_:
        bits = np.frombuffer(buffer, np.uint8)
        flat = np.unpackbits(bits, count=offset + n, bitorder="little")[offset:].view(np.bool_)
    else:
        itemsize = column.dtype.itemsize
        flat = np.frombuffer(buffer, column.dtype, count=n, offset=offset * itemsize)
    return flat.reshape(len(chunk), *column.shape)


_cache: collections.OrderedDict[str, tuple[tuple[int, ...], Shard]] = collections.OrderedDict()
_cache_lock = threading.Lock()


def clear_shard_cache() -> None:
    """Empties the cache of decoded shards (``open_shard`` then re-reads every file)."""
    with _cache_lock:
        _cache.clear()


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _read_file(path: Path) -> tuple[pa.Buffer, tuple[int, ...]]:
    """Reads the whole file into an aligned Arrow buffer (no mmap: a truncated mmap'd file would
    crash the process with SIGBUS)."""
    with open(path, "rb", buffering=0) as file:
        st = os.fstat(file.fileno())
        buffer = pa.allocate_buffer(st.st_size)
        view = memoryview(buffer)
        filled = 0
        while filled < st.st_size:
            n = file.readinto(view[filled:])
            if not n:
                raise OSError(f"file shrank while reading ({filled} of {st.st_size} bytes)")
            filled += n
        if file.read(1):
            raise OSError("file grew while reading")
    return buffer, _stat_key(st)


def file_checksum(path: Path) -> str:
    """CRC-32 of a file as 8 lowercase hex digits (read in 4 MiB chunks).

    Raises:
        TupliStorageError: The file cannot be read.

    Example:
        >>> # file_checksum(Path("tupli_store/shards/ab12.arrow")) -> '1f0c9a3e'
    """
    crc = 0
    try:
        with open(path, "rb", buffering=0) as file:
            chunk = bytearray(min(_READ_CHUNK, os.fstat(file.fileno()).st_size + 1))
            view = memoryview(chunk)
            while n := file.readinto(chunk):
                crc = zlib.crc32(view[:n], crc)
    except OSError as err:
        raise TupliStorageError(f"cannot read shard '{path}': {err}") from None
    return f"{crc:08x}"


def _load(path: Path, checksum: str) -> tuple[Shard, tuple[int, ...]]:
    """Reads, verifies and decodes; raises TupliStorageError naming the shard."""
    try:
        buffer, key = _read_file(path)
    except FileNotFoundError:
        raise TupliStorageError(
            f"shard '{path}' is missing; its episodes cannot be loaded: restore the file or "
            "delete those episodes (tupli-jax verify lists them)"
        ) from None
    except OSError as err:
        raise TupliStorageError(f"cannot read shard '{path}': {err}") from None
    actual = f"{zlib.crc32(buffer):08x}"
    if actual != checksum.lower():
        raise TupliStorageError(
            f"shard '{path}' is damaged: checksum {actual}, expected {checksum} ({buffer.size} "
            "bytes); restore it from a backup or delete its episodes (tupli-jax verify)"
        )
    try:
        reader = pa.ipc.open_file(buffer, options=pa.ipc.IpcReadOptions(use_threads=True))
        shard = Shard(path, actual, reader.read_all())
    except (pa.ArrowException, ValueError, TypeError, KeyError, json.JSONDecodeError) as err:
        raise TupliStorageError(
            f"shard '{path}' passed its checksum but is not a readable tupli_jax shard: "
            f"{type(err).__name__}: {err}"
        ) from None
    return shard, key


def open_shard(path: Path, checksum: str) -> Shard:
    """Opens a shard, verifying its checksum; decoded shards are cached (see the module docs).

    Args:
        path: The shard file.
        checksum: The checksum recorded when it was written (``ShardInfo.checksum``).

    Returns:
        The decoded ``Shard``.

    Raises:
        TupliStorageError: Missing file, checksum mismatch (damage, truncation) or an unreadable
            file; the message names the shard and what to do.

    Example:
        >>> # shard = open_shard(store / "shards" / info.name, info.checksum)
    """
    path = Path(path)
    cache_key = os.path.abspath(path)
    try:
        key = _stat_key(os.stat(path))
    except OSError:
        key = ()
    with _cache_lock:
        entry = _cache.get(cache_key)
        if entry is not None and entry[0] == key:
            if entry[1].checksum != checksum.lower():
                raise TupliStorageError(
                    f"shard '{path}' has checksum {entry[1].checksum}, expected {checksum}: the "
                    "catalog and the file disagree; run tupli-jax verify"
                )
            _cache.move_to_end(cache_key)
            return entry[1]
        _cache.pop(cache_key, None)
    shard, key = _load(path, checksum)
    with _cache_lock:
        _cache[cache_key] = (key, shard)
        _cache.move_to_end(cache_key)
        total = sum(s.nbytes for _, s in _cache.values())
        while len(_cache) > 1 and (len(_cache) > _CACHE_MAX_ENTRIES or total > _CACHE_MAX_BYTES):
            _, (_, evicted) = _cache.popitem(last=False)
            total -= evicted.nbytes
    return shard


def verify_shard(path: Path, checksum: str, expected_rows: int | None = None) -> list[str]:
    """Re-reads a shard (bypassing the cache) and lists its problems; ``[]`` if sound.

    Args:
        path: The shard file.
        checksum: The recorded checksum.
        expected_rows: If given, the row count the catalog expects.

    Example:
        >>> # verify_shard(path, info.checksum, info.n_rows) -> []
    """
    path = Path(path)
    try:
        shard, _ = _load(path, checksum)
    except TupliStorageError as err:
        problems = [str(err)]
    else:
        problems = []
        if expected_rows is not None and shard.n_rows != expected_rows:
            problems.append(
                f"shard '{path}' has {shard.n_rows} rows; the catalog expects {expected_rows}"
            )
    if problems:
        with _cache_lock:
            _cache.pop(os.path.abspath(path), None)
    return problems
