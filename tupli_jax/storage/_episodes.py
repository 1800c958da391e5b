"""The episode write path: shards staged, renamed and committed in one transaction; batch ids.

Host-side only. ``write_episodes`` writes one Arrow shard per observation structure into a
private staging directory (no lock held), then under the catalog's write lock renames the shards
into place, fsyncs the directory and inserts the shard, episode, metadata-leaf and episode-block
rows; the commit makes the whole batch visible at once, and a writer killed at any moment leaves
nothing of it (``Layout.recover`` removes renamed but uncommitted shards).

The catalog side is batched (~15 us per episode with small metadata, ~2/3 of it SQLite): ids
from one ``os.urandom`` (``new_ids``), metadata through ``normalize_documents`` (no JSON for an
empty dict), rows as prebuilt tuples for ``executemany``, headers built without validation. A
packed batch without metadata (the recorder's) is committed as one ``episode_runs`` row instead
(``_runs``: ~1 us per episode, its ``episodes`` rows inserted when first needed).

With a ``batch_id``, a ``batches`` row ``(id, [[episode_id, n_tuples], ...])`` is inserted in the
same transaction. A batch id that is already committed makes the call a no-op that returns the
batch's headers: the check runs under the write lock, so two processes racing with one batch id
store one batch. This is what lets a restarted job re-run a chunk whose episodes were committed
before it was killed.

Example:
    >>> # headers = write_episodes(layout, catalog, items, compression="lz4",
    >>> #                          created_by="me", batch_id="job-1:chunk:7")
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, cast, overload

import numpy as np

from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import EpisodeHeader
from tupli_jax.storage import _blocks, _runs
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._files import Layout, fsync_dir, unlink
from tupli_jax.storage._shard_layout import _flatten_field
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.shards import (
    ShardInfo,
    write_shard_columns,
    write_shards,
)

__all__ = ["EpisodeHeaders", "has_batch", "write_episode_batch", "write_episodes"]

_SHOWN = 8  # lengths shown in a batch mismatch message
_RowIndex = list[int] | np.ndarray  # per episode, a shard row (a list, or the shard's array)
_set_attr = object.__setattr__


def _now() -> str:
    return datetime.datetime.now().isoformat()


def require_benchmarks(conn: sqlite3.Connection, ids: set[str], store: Path) -> None:
    """Raises ``TupliStorageError`` unless every benchmark id in ``ids`` is in the catalog."""
    for bid in ids:
        if conn.execute("SELECT 1 FROM benchmarks WHERE id = ?", (bid,)).fetchone() is None:
            raise TupliStorageError(
                f"benchmark '{bid}' not found in store '{store}'; store the benchmark "
                "(store_benchmark / wrapper.store()) before recording its episodes"
            )


def _benchmark_ids(items: list[EpisodeData], store: Path) -> set[str]:
    """The distinct benchmark ids of ``items``, each checked with ``check_id``."""
    try:
        distinct = {e.benchmark_id for e in items}
    except TypeError:  # an unhashable id: let check_id name it
        distinct = set()
        for e in items:
            cat.check_id(e.benchmark_id, "benchmark", store)
    return {cat.check_id(bid, "benchmark", store) for bid in distinct}


def has_batch(catalog: cat.Catalog, batch_id: str) -> bool:
    """Whether a batch with this (validated) id is committed."""
    rows = catalog.query("SELECT 1 FROM batches WHERE id = ?", (batch_id,), runs_ok=True)
    return bool(rows)


def _committed(
    conn: sqlite3.Connection, batch_id: str, received: Sequence[int], store: Path
) -> list[str] | None:
    """The episode ids of committed batch ``batch_id`` in their original order, or ``None``.

    Raises if ``received`` (the episode lengths of this call) cannot be the same batch (another
    number of episodes or other lengths): a batch id names one batch. Reads ``batches`` alone
    (episode runs may be pending).
    """
    row = conn.execute("SELECT episodes FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        return None
    entries: list[list[Any]] = json.loads(row[0])
    stored = [int(n) for _, n in entries]
    received = list(received)
    if stored != received:
        raise TupliStorageError(
            f"batch '{batch_id}' is already committed in store '{store}' with {len(stored)} "
            f"episodes of lengths {stored[:_SHOWN]}{'...' if len(stored) > _SHOWN else ''}, "
            f"but this call passes {len(received)} episodes of lengths "
            f"{received[:_SHOWN]}{'...' if len(received) > _SHOWN else ''}; a batch id must name "
            "one batch: pass the same episodes to re-record it, or use a new batch id"
        )
    return [str(eid) for eid, _ in entries]


def _headers_of(conn: sqlite3.Connection, ids: list[str]) -> list[EpisodeHeader]:
    """The headers of episodes ``ids`` in that order; ids no longer stored are left out (episodes
    of a batch deleted since). Needs the episode runs expanded."""
    rows = conn.execute(
        f"SELECT {cat.EPISODE_COLUMNS} FROM episodes t "
        "WHERE t.id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ).fetchall()
    by_id = {r[0]: r for r in rows}
    return cat.episode_headers([by_id[i] for i in ids if i in by_id])


def _stage(
    staging: Path, items: list[EpisodeData], compression: str | None
) -> tuple[list[ShardInfo], list[int], list[int], list[int]]:
    """Writes the shards (one per structure); per episode its shard's position in the
    returned list, its first row and its stop row.

    The staging directory is not fsynced: the files are renamed out of it and the shards
    directory is fsynced then.
    """
    n = len(items)
    shard_of, starts, stops = [0] * n, [0] * n, [0] * n
    infos = []
    written = write_shards(staging, items, compression=compression, fsync_directory=False)
    for k, (group, info) in enumerate(written):
        infos.append(info)
        for i, (start, stop) in zip(group, info.ranges, strict=True):
            shard_of[i], starts[i], stops[i] = k, start, stop
    return infos, shard_of, starts, stops


def _returns(items: list[EpisodeData]) -> list[float]:
    """``EpisodeData.episode_return`` of every episode, bit for bit.

    ``ndarray.sum`` is the same float64 reduction as the property's ``np.sum``, without its
    dispatch (~1.5 us instead of ~7 us). ``np.add.reduceat`` over all episodes would be faster
    still, but it adds in another order (other last bits).
    """
    out = []
    for e in items:
        r = e.rewards
        if type(r) is np.ndarray:
            out.append(float((r if r.dtype == np.float64 else r.astype(np.float64)).sum()))
        else:
            out.append(e.episode_return)
    return out


@dataclasses.dataclass(frozen=True)
class _Rows:
    """Per-episode catalog values, as python lists (one entry per episode)."""

    lengths: list[int]
    returns: list[float]
    terminated: list[bool]
    truncated: list[bool]
    bench: list[str]

    @classmethod
    def of_items(cls, items: list[EpisodeData]) -> _Rows:
        return cls(
            [int(np.shape(e.rewards)[0]) for e in items],
            _returns(items),
            [bool(e.terminated) for e in items],
            [bool(e.truncated) for e in items],
            [e.benchmark_id for e in items],
        )

    @classmethod
    def of_batch(cls, batch: EpisodeBatch) -> _Rows:
        n = len(batch)
        return cls(
            np.asarray(batch.n_tuples, np.int64).tolist(),
            batch.episode_returns().tolist(),
            np.asarray(batch.terminated, bool).tolist(),
            np.asarray(batch.truncated, bool).tolist(),
            [batch.benchmark_id] * n,
        )


def _ints(rows: _RowIndex) -> list[int]:
    """``rows`` as a list of Python ints."""
    return rows.tolist() if isinstance(rows, np.ndarray) else rows


def _insert(
    conn: sqlite3.Connection,
    values: _Rows,
    docs: cat.Documents,
    shards: tuple[list[int], list[int], list[int]],
    created_by: str,
) -> tuple[list[EpisodeHeader], list[str]]:
    """Inserts the episode, metadata-leaf and episode-block rows; the headers in input order.

    No per-episode SQL statement: two ``executemany`` over prebuilt tuples and one block write
    per benchmark; headers are built without validation.
    """
    shard_rid, starts, stops = shards
    lengths, returns = values.lengths, values.returns
    terminated, truncated, bench = values.terminated, values.truncated, values.bench
    n = len(lengths)
    now = _now()
    published = json.dumps([created_by])
    rid0 = _runs.next_rid(conn)
    ids = cat.new_ids(n)
    flags = [
        t + 2 * u + 4 * x + 8 * (stop - start - length)
        for t, u, x, start, stop, length in zip(
            terminated, truncated, docs.inexact, starts, stops, lengths, strict=True
        )
    ]
    rids = range(rid0, rid0 + n)
    conn.executemany(
        "INSERT INTO episodes (rid, id, benchmark_id, shard_rid, row_start, row_stop, n_tuples, "
        "episode_return, terminated, timeout, truncated, metadata, created_by, created_at, "
        "published_in, inexact, flags) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        zip(rids, ids, bench, shard_rid, starts, stops, lengths, returns, terminated, truncated,
            truncated, docs.texts, repeat(created_by), repeat(now), repeat(published),
            docs.inexact, flags),
    )  # fmt: skip
    if docs.leaves:
        conn.executemany(
            "INSERT INTO episode_leaves VALUES (?, ?, ?, ?)",
            [(path, kind, value, rid0 + k) for path, kind, value, k in docs.leaves],
        )
    _blocks.add(conn, bench, rids, shard_rid, starts, lengths, flags, ids)
    new, fields = object.__new__, cat.EPISODE_FIELDS_SET
    headers: list[EpisodeHeader] = []
    for i in range(n):
        header = new(EpisodeHeader)
        _set_attr(
            header,
            "__dict__",
            {
                "id": ids[i],
                "created_by": created_by,
                "published_in": [created_by],
                "created_at": now,
                "benchmark_id": bench[i],
                "metadata": docs.dicts[i],
                "n_tuples": lengths[i],
                "terminated": terminated[i],
                "timeout": truncated[i],
                "truncated": truncated[i],
                "episode_return": returns[i],
            },
        )
        _set_attr(header, "__pydantic_fields_set__", fields)
        _set_attr(header, "__pydantic_extra__", None)
        _set_attr(header, "__pydantic_private__", None)
        headers.append(header)
    return headers, ids


def _insert_run(
    conn: sqlite3.Connection,
    batch: EpisodeBatch,
    shard: tuple[int, _RowIndex, _RowIndex],
    created_by: str,
) -> tuple[EpisodeHeaders, list[str]]:
    """Commits a batch without metadata as one episode run (``_runs``) plus its block entries:
    no per-episode row or Python object; the headers are built when read."""
    shard_rid, starts, stops = shard
    n = len(batch)
    bench = batch.benchmark_id
    lengths = np.asarray(batch.n_tuples, np.int64)
    returns = batch.episode_returns()
    terminated = np.asarray(batch.terminated, bool)
    truncated = np.asarray(batch.truncated, bool)
    start = np.asarray(starts, np.int64)
    flags = terminated + 2 * truncated.astype(np.int64) + 8 * (np.asarray(stops) - start - lengths)
    rid0 = _runs.next_rid(conn)
    ids = cat.new_ids(n)
    now = _now()
    _runs.add(conn, bench, shard_rid=shard_rid, first_rid=rid0, ids=ids, row_start=start,
              n_tuples=lengths, flags=flags, returns=returns, created_by=created_by,
              created_at=now)  # fmt: skip
    _blocks.add(conn, bench, np.arange(rid0, rid0 + n), np.full(n, shard_rid), start, lengths,
                flags, ids)  # fmt: skip
    headers = EpisodeHeaders(ids, bench, lengths, returns, terminated, truncated, created_by, now)
    return headers, ids


def _insert_batch(
    conn: sqlite3.Connection, batch_id: str, ids: list[str], lengths: list[int]
) -> None:
    """Inserts the ``batches`` row ``(batch_id, [[episode_id, n_tuples], ...])``.

    The JSON is formatted directly (~0.2 us per episode instead of ~3 us for lists through
    ``json.dumps``): the ids are store ids (``[A-Za-z0-9_-]``, nothing to escape), the lengths
    ints.
    """
    if len(ids) != len(lengths):
        raise ValueError(f"{len(ids)} episode ids for {len(lengths)} lengths")
    inner = '],["'.join([f'{eid}",{n:d}' for eid, n in zip(ids, lengths, strict=True)])
    entries = f'[["{inner}]]' if ids else "[]"
    conn.execute(
        "INSERT INTO batches (id, episodes, created_at) VALUES (?, ?, ?)",
        (batch_id, entries, _now()),
    )


def write_episodes(
    layout: Layout,
    catalog: cat.Catalog,
    items: list[EpisodeData],
    *,
    compression: str | None,
    created_by: str,
    batch_id: str | None,
) -> list[EpisodeHeader]:
    """Stores ``items`` all or nothing; returns their headers in input order once committed.

    Args:
        layout: The store's directories.
        catalog: The store's catalog.
        items: The episodes (possibly none).
        compression: Shard compression (``"lz4"``, ``"zstd"`` or ``None``).
        created_by: ``created_by`` and initial ``published_in`` of the new episodes.
        batch_id: A validated batch id, or ``None`` for a batch without one.

    Returns:
        The new headers, or with a ``batch_id`` that is already committed the headers of that
        batch (nothing written).

    Raises:
        TupliStorageError: Bad metadata, an unknown benchmark, a batch id already committed with
            other episodes, or an I/O failure; nothing is stored.
    """
    lengths = [e.length for e in items]
    if not items:
        return cast(list[EpisodeHeader], _commit(layout, catalog, lengths, None, created_by,
                                                 batch_id))  # fmt: skip

    def prepare() -> _Prepared:
        docs = cat.normalize_documents([e.metadata for e in items], "metadata of episode {}")
        return _Prepared(docs, _benchmark_ids(items, layout.root), lambda: _Rows.of_items(items))

    def stage(staging: Path) -> tuple[list[ShardInfo], list[int], list[int], list[int]]:
        return _stage(staging, items, compression)

    headers = _commit(layout, catalog, lengths, (prepare, stage), created_by, batch_id)
    return cast(list[EpisodeHeader], headers)  # no run: a list


def write_episode_batch(
    layout: Layout,
    catalog: cat.Catalog,
    batch: EpisodeBatch,
    *,
    compression: str | None,
    created_by: str,
    batch_id: str | None,
) -> Sequence[EpisodeHeader]:
    """``write_episodes`` for packed columns: one shard from the columns, no per-episode arrays.

    Same atomicity, batch-id semantics and errors as ``write_episodes``. A batch without
    metadata is committed as one episode run (``_runs``) and its headers come back as a lazy
    ``EpisodeHeaders``.
    """
    n = _check_batch(batch, layout.root)
    lengths = np.asarray(batch.n_tuples, np.int64).tolist()
    if n == 0:
        return _commit(layout, catalog, lengths, None, created_by, batch_id)

    def prepare() -> _Prepared:
        bench = {cat.check_id(batch.benchmark_id, "benchmark", layout.root)}
        if batch.metadata is None:  # no metadata: one episode run, nothing to encode or index
            return _Prepared(None, bench, lambda: None, batch)
        docs = cat.normalize_documents(batch.metadata, "metadata of episode {}")
        return _Prepared(docs, bench, lambda: _Rows.of_batch(batch))

    def stage(staging: Path) -> tuple[list[ShardInfo], list[int], _RowIndex, _RowIndex]:
        info = write_shard_columns(
            staging,
            observations=batch.observations,
            actions=batch.actions,
            rewards=batch.rewards,
            discounts=batch.discounts,
            n_tuples=np.asarray(batch.n_tuples),
            extras=batch.extras,
            compression=compression,
            fsync_directory=False,
        )
        return [info], [0] * n, info.starts, info.stops

    return _commit(layout, catalog, lengths, (prepare, stage), created_by, batch_id)


def _check_batch(batch: EpisodeBatch, store: Path) -> int:
    """Checks the per-episode fields of ``batch``; returns ``E`` (the columns are checked by
    ``write_shard_columns``)."""
    if not isinstance(batch, EpisodeBatch):
        raise TupliStorageError(
            f"expected an EpisodeBatch, received {type(batch).__name__}; use record_episodes "
            "for a list of episodes"
        )
    counts = np.asarray(batch.n_tuples)
    if counts.ndim != 1 or counts.dtype.kind not in "iu":
        raise TupliStorageError(
            f"EpisodeBatch.n_tuples must be a 1-D integer array [E]; received dtype "
            f"{counts.dtype} with shape {counts.shape}"
        )
    n = int(counts.shape[0])
    for name in ("terminated", "truncated"):
        flags = np.asarray(getattr(batch, name))
        if flags.shape != (n,) or flags.dtype != np.bool_:
            raise TupliStorageError(
                f"EpisodeBatch.{name} must be a bool array of shape ({n},) (one per episode); "
                f"received dtype {flags.dtype} with shape {flags.shape}"
            )
    if batch.metadata is not None and (
        not isinstance(batch.metadata, Sequence) or len(batch.metadata) != n
    ):
        received = len(batch.metadata) if isinstance(batch.metadata, Sequence) else "no list"
        raise TupliStorageError(
            f"EpisodeBatch.metadata must be None or a list of {n} dicts (one per episode); "
            f"received {received}"
        )
    if n == 0:  # write_shard_columns is not called: check here that no rows would be dropped
        fields = ("observations", "actions", "rewards", "discounts", "extras")
        for field in fields:
            for leaf in _flatten_field("EpisodeBatch", field, getattr(batch, field))[0]:
                if leaf.shape[:1] != (0,):
                    raise TupliStorageError(
                        f"EpisodeBatch.n_tuples is empty (no episodes) but {field} has "
                        f"{leaf.shape[0] if leaf.ndim else 'scalar'} rows; expected leading "
                        "length 0: pass n_tuples for those rows"
                    )
    return n


@dataclasses.dataclass(frozen=True)
class _Prepared:
    """What a write needs before the staging: metadata documents, benchmark ids, row values;
    or, for a batch without metadata (``run``), the batch to commit as one episode run."""

    docs: cat.Documents | None
    bench_ids: set[str]
    rows: Callable[[], _Rows | None]
    run: EpisodeBatch | None = None


_Stage = Callable[[Path], tuple[list[ShardInfo], list[int], _RowIndex, _RowIndex]]


def _commit(
    layout: Layout,
    catalog: cat.Catalog,
    lengths: list[int],
    work: tuple[Callable[[], _Prepared], _Stage] | None,
    created_by: str,
    batch_id: str | None,
) -> Sequence[EpisodeHeader]:
    """The write protocol shared by both write paths (``work`` is ``None`` for no episodes):
    replay check, validation, staging without a lock, then rename + insert + commit.

    Every transaction here leaves episode runs pending (``runs_ok``): only a replayed batch,
    whose headers are read back, expands them.
    """
    root = layout.root
    if batch_id is not None:
        with catalog.read(runs_ok=True) as conn:  # the common replay case, without staging
            done = _committed(conn, batch_id, lengths, root)
        if done is not None:
            with catalog.read() as conn:
                return _headers_of(conn, done)
    if work is None:
        if batch_id is not None:
            with catalog.write(runs_ok=True) as conn:
                done = _committed(conn, batch_id, lengths, root)
                if done is None:
                    _insert_batch(conn, batch_id, [], [])
                else:
                    _runs.expand(conn)
                    return _headers_of(conn, done)
        return []
    prepare, stage = work
    prepared = prepare()
    with catalog.read(runs_ok=True) as conn:
        require_benchmarks(conn, prepared.bench_ids, root)
    with layout.staging_dir() as staging:
        infos, shard_of, starts, stops = stage(staging)
        values = prepared.rows()
        renamed: list[Path] = []
        try:
            with catalog.write(runs_ok=True) as conn:
                if batch_id is not None:
                    done = _committed(conn, batch_id, lengths, root)
                    if done is not None:  # another writer committed it meanwhile
                        _runs.expand(conn)
                        return _headers_of(conn, done)
                require_benchmarks(conn, prepared.bench_ids, root)
                for info in infos:
                    os.replace(staging / info.name, layout.shards / info.name)
                    renamed.append(layout.shards / info.name)
                fsync_dir(layout.shards)
                now = _now()
                rids: list[int] = []
                for info in infos:
                    cursor = conn.execute(
                        "INSERT INTO shards (name, checksum, size, n_rows, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (info.name, info.checksum, info.size, info.n_rows, now),
                    )
                    rids.append(int(cursor.lastrowid or 0))  # always set after an INSERT
                headers: Sequence[EpisodeHeader]
                if prepared.run is not None:  # one shard
                    shard = (rids[0], starts, stops)
                    headers, ids = _insert_run(conn, prepared.run, shard, created_by)
                else:
                    assert values is not None and prepared.docs is not None
                    shard_rid = [rids[k] for k in shard_of]
                    rows = (shard_rid, _ints(starts), _ints(stops))  # SQLite binds Python ints
                    headers, ids = _insert(conn, values, prepared.docs, rows, created_by)
                if batch_id is not None:
                    _insert_batch(conn, batch_id, ids, lengths)
        except BaseException:
            for path in renamed:  # not committed: nobody references them
                unlink(path)
            raise
    return headers


class EpisodeHeaders(Sequence[EpisodeHeader]):
    """The headers of a stored batch, built one at a time when read (a read-only sequence).

    What ``FileStorage.record_episode_batch`` returns: building 100k pydantic headers costs
    ~0.4 s, which a recorder that only counts them should not pay. Indexing, iterating and
    slicing give ordinary ``EpisodeHeader`` objects, the same as ``list_episodes`` returns for
    these episodes; ``n_tuples`` gives all lengths at once. Like a list, it equals a list of equal
    headers and concatenates with ``+`` (into a list); unlike a list it is read-only and every
    access builds a new header (changes to one are not kept; ``list(headers)`` for a list).

    Example:
        >>> import numpy as np
        >>> h = EpisodeHeaders(["a1", "b2"], "bench", np.array([3, 4]), np.array([1.0, 2.5]),
        ...                    np.array([True, False]), np.array([False, True]), "me", "now")
        >>> len(h), h[1].id, h[1].truncated, int(h.n_tuples.sum())
        (2, 'b2', True, 7)
    """

    def __init__(
        self,
        ids: Sequence[str],
        benchmark_id: str,
        n_tuples: np.ndarray,
        returns: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        created_by: str,
        created_at: str,
    ) -> None:
        self._ids = list(ids)
        self._bench = benchmark_id
        self._n_tuples = np.asarray(n_tuples, np.int64)
        self._returns = np.asarray(returns, np.float64)
        self._terminated = np.asarray(terminated, bool)
        self._truncated = np.asarray(truncated, bool)
        self._by, self._at = created_by, created_at

    @property
    def n_tuples(self) -> np.ndarray:
        """Every episode's number of transitions (int64 ``[n]``, read-only view)."""
        view = self._n_tuples.view()
        view.flags.writeable = False
        return view

    def __len__(self) -> int:
        return len(self._ids)

    def _header(self, i: int) -> EpisodeHeader:
        truncated = bool(self._truncated[i])
        values = {
            "id": self._ids[i],
            "created_by": self._by,
            "published_in": [self._by],
            "created_at": self._at,
            "benchmark_id": self._bench,
            "metadata": {},
            "n_tuples": int(self._n_tuples[i]),
            "terminated": bool(self._terminated[i]),
            "timeout": truncated,
            "truncated": truncated,
            "episode_return": float(self._returns[i]),
        }
        return cat.fast_model(EpisodeHeader, values)

    @overload
    def __getitem__(self, index: int) -> EpisodeHeader: ...

    @overload
    def __getitem__(self, index: slice) -> list[EpisodeHeader]: ...

    def __getitem__(self, index: int | slice) -> EpisodeHeader | list[EpisodeHeader]:
        if isinstance(index, slice):
            return [self._header(i) for i in range(*index.indices(len(self)))]
        n = len(self)
        i = index.__index__()
        if not -n <= i < n:
            raise IndexError(f"episode index {index} out of range for {n} headers")
        return self._header(i % n if n else i)

    def __iter__(self) -> Iterator[EpisodeHeader]:
        return (self._header(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpisodeHeaders | list):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other, strict=True))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-like equality, as list

    def __add__(self, other: object) -> list[EpisodeHeader]:
        if isinstance(other, EpisodeHeaders | list):
            return [*self, *other]
        return NotImplemented

    def __radd__(self, other: object) -> list[EpisodeHeader]:
        if isinstance(other, list):
            return [*other, *self]
        return NotImplemented

    def __repr__(self) -> str:
        return f"EpisodeHeaders({len(self)} episodes of benchmark {self._bench!r})"
