"""Episode blocks: the columnar read path's copy of the episode rows, a few thousand per row.

Host-side only. Reading the location of every episode from ``episodes`` costs ~1 us per episode
even folded into one text per column (SQLite steps every row). The table ``episode_blocks``
keeps the same facts for many episodes of one benchmark in one row: ``columns`` is an int64
array ``[5, n]`` (``rid, shard_rid, row_start, n_tuples, flags``, as in ``episodes``) and ``ids``
the comma-joined episode ids, so reading 200k locations is ~50 reads of a few hundred kB and
one ``np.frombuffer`` each (~0.2 us per episode, most of it making the id strings).

Invariants, kept in the transactions that insert or delete episodes (``verify`` checks them):
every episode is in exactly one block, the block of its benchmark whose rid range holds its rid;
within a block rids increase; the blocks of one benchmark cover disjoint rid ranges, increasing
with ``first_rid``. New episodes get rids above every existing one, so they join the last block
of their benchmark while it holds fewer than ``_GROW_BELOW`` episodes (one-at-a-time writers
still make big blocks), else start a new block; no block grows beyond ``_MAX_BLOCK`` episodes
(deleting an episode rewrites its block).

Example:
    >>> # add(conn, ["b", "b"], [7, 8], [1, 1], [0, 4], [3, 3], [9, 9], ["id7", "id8"])
    >>> # read(conn, None).ids -> ['id7', 'id8']
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["SCHEMA", "Blocks", "add", "check", "read", "rebuild", "remove"]

META_KEY = "episode_blocks"  # in ``meta`` once the blocks are built; deleting it rebuilds them

SCHEMA = """
CREATE TABLE IF NOT EXISTS episode_blocks (
    rid INTEGER PRIMARY KEY, benchmark_id TEXT NOT NULL, first_rid INTEGER NOT NULL,
    n INTEGER NOT NULL, ids TEXT NOT NULL, columns BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS episode_blocks_benchmark ON episode_blocks(benchmark_id, first_rid);
"""
_GROW_BELOW = 512  # a last block with fewer episodes takes the next ones of its benchmark
_MAX_BLOCK = 4096  # at most (~300 kB): deleting an episode rewrites its whole block
_FIELDS = 5  # rid, shard_rid, row_start, n_tuples, flags


class Blocks(NamedTuple):
    """Episodes read from blocks, in ``rid`` order.

    Attributes:
        columns: int64 ``[5, N]``: rid, shard_rid, row_start, n_tuples, flags.
        ids: Episode ids ``[N]``.
        benchmark_ids: Benchmark id per episode ``[N]``.
    """

    columns: np.ndarray
    ids: list[str]
    benchmark_ids: list[str]


def _decode(n: int, ids: str, columns: bytes) -> tuple[np.ndarray, list[str]]:
    values = np.frombuffer(columns, dtype="<i8")
    names = ids.split(",") if n else []
    if values.size != _FIELDS * n or len(names) != n:
        raise ValueError(f"an episode block of {n} episodes holds {values.size} values")
    return values.reshape(_FIELDS, n).astype(np.int64, copy=False), names


def _write(
    conn: sqlite3.Connection, rid: int | None, bench: str, columns: np.ndarray, ids: list[str]
) -> None:
    """Inserts (``rid`` None) or replaces block ``rid``; an empty block is deleted."""
    n = len(ids)
    if n == 0:
        if rid is not None:
            conn.execute("DELETE FROM episode_blocks WHERE rid = ?", (rid,))
        return
    blob = np.ascontiguousarray(columns, dtype="<i8").tobytes()
    values = (bench, int(columns[0, 0]), n, ",".join(ids), blob)
    if rid is None:
        conn.execute(
            "INSERT INTO episode_blocks (benchmark_id, first_rid, n, ids, columns) "
            "VALUES (?, ?, ?, ?, ?)",
            values,
        )
    else:
        conn.execute(
            "UPDATE episode_blocks SET benchmark_id = ?, first_rid = ?, n = ?, ids = ?, "
            "columns = ? WHERE rid = ?",
            (*values, rid),
        )


def add(
    conn: sqlite3.Connection,
    benchmark_ids: str | Sequence[str],
    rids: Sequence[int] | np.ndarray,
    shard_rids: Sequence[int] | np.ndarray,
    row_starts: Sequence[int] | np.ndarray,
    n_tuples: Sequence[int] | np.ndarray,
    flags: Sequence[int] | np.ndarray,
    ids: Sequence[str],
) -> None:
    """Adds new episodes (rids above every existing one, increasing) to their blocks.

    ``benchmark_ids``: per episode, or one ``str`` for all of them (no per-episode grouping).
    """
    columns = np.array([rids, shard_rids, row_starts, n_tuples, flags], dtype=np.int64)
    groups: dict[str, Any] = {}
    if isinstance(benchmark_ids, str):
        groups[benchmark_ids] = slice(None)
    else:
        for i, bench in enumerate(benchmark_ids):
            groups.setdefault(bench, []).append(i)
    for bench, members in groups.items():
        new_columns = columns[:, members]
        new_ids = list(ids[members]) if isinstance(members, slice) else [ids[i] for i in members]
        last = conn.execute(
            "SELECT rid, n, ids, columns FROM episode_blocks WHERE benchmark_id = ? "
            "ORDER BY first_rid DESC LIMIT 1",
            (bench,),
        ).fetchone()
        if last is not None and last[1] < min(_GROW_BELOW, _MAX_BLOCK):
            old_columns, old_ids = _decode(last[1], last[2], last[3])
            if old_columns.shape[1] and old_columns[0, -1] >= new_columns[0, 0]:
                raise ValueError("new episodes must have rids above every existing one")
            take = _MAX_BLOCK - last[1]
            merged = np.concatenate([old_columns, new_columns[:, :take]], 1)
            _write(conn, last[0], bench, merged, old_ids + new_ids[:take])
            new_columns, new_ids = new_columns[:, take:], new_ids[take:]
        for start in range(0, len(new_ids), _MAX_BLOCK):
            part = slice(start, start + _MAX_BLOCK)
            _write(conn, None, bench, new_columns[:, part], new_ids[part])


def remove(conn: sqlite3.Connection, episodes: Sequence[tuple[int, str]]) -> None:
    """Removes episodes ``(rid, benchmark_id)`` from their blocks (rewritten once each)."""
    by_block: dict[int, set[int]] = {}
    for rid, bench in episodes:
        row = conn.execute(
            "SELECT rid FROM episode_blocks WHERE benchmark_id = ? AND first_rid <= ? "
            "ORDER BY first_rid DESC LIMIT 1",
            (bench, rid),
        ).fetchone()
        if row is not None:  # a block-less episode is a damaged catalog: verify reports it
            by_block.setdefault(int(row[0]), set()).add(int(rid))
    for block, gone in by_block.items():
        bench, n, ids, blob = conn.execute(
            "SELECT benchmark_id, n, ids, columns FROM episode_blocks WHERE rid = ?", (block,)
        ).fetchone()
        columns, names = _decode(n, ids, blob)
        keep = ~np.isin(columns[0], np.fromiter(gone, np.int64, len(gone)))
        kept = [name for name, k in zip(names, keep.tolist(), strict=True) if k]
        _write(conn, block, bench, columns[:, keep], kept)


def read(conn: sqlite3.Connection, benchmarks: Sequence[str] | None) -> Blocks:
    """The episodes of ``benchmarks`` (all with ``None``), in ``rid`` order.

    Raises:
        ValueError: A block is damaged (sizes disagree).
    """
    select = "SELECT benchmark_id, n, ids, columns FROM episode_blocks"
    if benchmarks is None:
        rows = conn.execute(f"{select} ORDER BY first_rid").fetchall()
    else:
        rows = conn.execute(
            f"{select} WHERE benchmark_id IN (SELECT value FROM json_each(?)) ORDER BY first_rid",
            (json.dumps(list(benchmarks)),),
        ).fetchall()
    parts, ids = [], []
    for _, n, text, blob in rows:
        columns, names = _decode(n, text, blob)
        parts.append(columns)
        ids += names
    columns = np.concatenate(parts, 1) if parts else np.zeros((_FIELDS, 0), np.int64)
    counts = [r[1] for r in rows]
    benches = np.repeat(np.array([r[0] for r in rows], dtype=object), counts)
    rid = columns[0]
    if rid.size > 1 and not bool(np.all(rid[1:] > rid[:-1])):  # benchmarks interleave
        order = np.argsort(rid, kind="stable")
        columns, benches = columns[:, order], benches[order]
        ids = np.array(ids, dtype=object)[order].tolist()
    return Blocks(columns, ids, benches.tolist())


def rebuild(conn: sqlite3.Connection) -> None:
    """Rebuilds every block from the ``episodes`` rows (opening an older store)."""
    conn.execute("DELETE FROM episode_blocks")
    rows = conn.execute(
        "SELECT benchmark_id, rid, shard_rid, row_start, n_tuples, flags, id FROM episodes "
        "ORDER BY benchmark_id, rid"
    ).fetchall()
    start = 0
    while start < len(rows):
        bench = rows[start][0]
        stop = start
        while stop < len(rows) and stop - start < _MAX_BLOCK and rows[stop][0] == bench:
            stop += 1
        part = rows[start:stop]
        columns = np.array([r[1:6] for r in part], dtype=np.int64).T
        _write(conn, None, bench, columns, [r[6] for r in part])
        start = stop


def check(conn: sqlite3.Connection, pending: Sequence[tuple[Any, ...]] = ()) -> list[str]:
    """How the blocks disagree with the ``episodes`` rows plus ``pending`` ones (the episodes of
    runs not expanded yet, as ``(rid, shard_rid, row_start, n_tuples, flags, id,
    benchmark_id)``); ``[]`` when they agree."""
    try:
        blocks = read(conn, None)
    except ValueError as err:
        return [f"damaged episode block: {err}"]
    rows = conn.execute(
        "SELECT rid, shard_rid, row_start, n_tuples, flags, id, benchmark_id FROM episodes"
    ).fetchall()
    rows = sorted([*rows, *pending], key=lambda r: int(r[0]))
    expected = np.array([r[:5] for r in rows], dtype=np.int64).reshape(-1, _FIELDS).T
    if (
        blocks.columns.shape == expected.shape
        and np.array_equal(blocks.columns, expected)
        and blocks.ids == [r[5] for r in rows]
        and blocks.benchmark_ids == [r[6] for r in rows]
    ):
        return []
    known = set(blocks.columns[0].tolist())
    listed = set(expected[0].tolist())
    return [
        f"episode blocks disagree with the episode rows ({len(listed - known)} episodes missing "
        f"from the blocks, {len(known - listed)} extra, or others differ); the rows are "
        "authoritative: run DELETE FROM meta WHERE key = 'episode_blocks' on catalog.sqlite and "
        "reopen the store to rebuild the blocks"
    ]
