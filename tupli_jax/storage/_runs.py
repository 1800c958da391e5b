"""Episode runs: a batch's episode rows, committed as one row and expanded when first needed.

Host-side only. An ``episodes`` row costs SQLite ~5-8 us to insert (the table and its indexes),
so a recorder writing 100k short episodes per second would spend most of its time in the catalog.
A batch without metadata (what ``tj.record`` writes) is committed instead as one
``episode_runs`` row: the episodes' ids (comma-joined), an int64 ``[3, n]`` array
(``row_start, n_tuples, flags``, as in ``episodes``) and a float64 ``[n]`` array of returns; the
rest is the same for the whole batch (benchmark, shard, creator, time; metadata ``{}``,
``published_in`` ``[created_by]``, ``timeout`` = ``truncated``). The episodes get their ``rid``
at commit (``first_rid .. first_rid + n - 1``, above every other rid, see ``next_rid``) and are
added to the episode blocks then, so the columnar read path (``TupliDataset``) reads them at once.

``expand`` turns every run into its ``episodes`` rows (the same values a row-by-row insert
writes) and deletes the runs, in the caller's write transaction. ``Catalog`` calls it before any
transaction that reads or changes episode rows (``Catalog.read`` / ``write`` / ``query`` unless
``runs_ok=True``): to every query the episodes of a run look like episodes inserted row by row.
The cost is only moved, to the first episode query after a recording (~10 us per episode, once),
off the recording's critical path.

A process of an older tupli_jax that opened the store before it became schema 3 would insert
``MAX(rid) + 1`` onwards, into a pending run's rids: the trigger ``episodes_reserved_rids``
aborts such an insert with a message (``expand`` deletes the runs before inserting their rows).

Example:
    >>> # first = next_rid(conn)
    >>> # add(conn, "bench", shard_rid=3, first_rid=first, ids=ids, row_start=starts,
    >>> #     n_tuples=lengths, flags=flags, returns=returns, created_by="me", created_at=now)
    >>> # expand(conn)  # later, in a write transaction
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "SCHEMA",
    "TRIGGER",
    "Run",
    "add",
    "expand",
    "next_rid",
    "pending",
    "read",
]

SCHEMA = """
CREATE TABLE IF NOT EXISTS episode_runs (
    rid INTEGER PRIMARY KEY, benchmark_id TEXT NOT NULL, shard_rid INTEGER NOT NULL,
    first_rid INTEGER NOT NULL, n INTEGER NOT NULL, ids TEXT NOT NULL, columns BLOB NOT NULL,
    returns BLOB NOT NULL, created_by TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS episode_runs_first_rid ON episode_runs(first_rid);
"""
# Created after ``episodes`` (a version-1 store rebuilds that table, which drops its triggers).
TRIGGER = """
CREATE TRIGGER IF NOT EXISTS episodes_reserved_rids BEFORE INSERT ON episodes
WHEN (SELECT first_rid + n - 1 FROM episode_runs WHERE first_rid <= NEW.rid
      ORDER BY first_rid DESC LIMIT 1) >= NEW.rid
BEGIN
    SELECT RAISE(ABORT, 'rid reserved by an episode run: restart with tupli_jax >= schema 3');
END;
"""
_FIELDS = 3  # row_start, n_tuples, flags


def pending(conn: sqlite3.Connection) -> bool:
    """Whether any run waits to be expanded (~2 us)."""
    return conn.execute("SELECT 1 FROM episode_runs LIMIT 1").fetchone() is not None


def next_rid(conn: sqlite3.Connection) -> int:
    """The first rid above every episode, expanded or not (inside a write transaction)."""
    row = conn.execute(
        "SELECT max(COALESCE((SELECT max(rid) FROM episodes), 0), "
        "COALESCE((SELECT max(first_rid + n - 1) FROM episode_runs), 0))"
    ).fetchone()
    return int(row[0]) + 1


def add(
    conn: sqlite3.Connection,
    benchmark_id: str,
    *,
    shard_rid: int,
    first_rid: int,
    ids: Sequence[str],
    row_start: np.ndarray,
    n_tuples: np.ndarray,
    flags: np.ndarray,
    returns: np.ndarray,
    created_by: str,
    created_at: str,
) -> None:
    """Inserts one run of ``len(ids)`` episodes with rids ``first_rid, first_rid + 1, ...``.

    ``flags`` as in ``episodes`` (``terminated + 2 * truncated + 8 * reset_row``; runs hold no
    inexact metadata).
    """
    n = len(ids)
    columns = np.stack([row_start, n_tuples, flags]).astype("<i8", copy=False)
    if columns.shape != (_FIELDS, n) or np.shape(returns) != (n,):
        raise ValueError(f"a run of {n} episodes needs {n} values per column")
    conn.execute(
        "INSERT INTO episode_runs (benchmark_id, shard_rid, first_rid, n, ids, columns, returns, "
        "created_by, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            benchmark_id,
            shard_rid,
            first_rid,
            n,
            ",".join(ids),
            np.ascontiguousarray(columns).tobytes(),
            np.ascontiguousarray(returns, dtype="<f8").tobytes(),
            created_by,
            created_at,
        ),
    )


class Run(NamedTuple):
    """One decoded episode run (``columns``: int64 ``[3, n]`` row_start, n_tuples, flags)."""

    rid: int
    benchmark_id: str
    shard_rid: int
    first_rid: int
    ids: list[str]
    columns: np.ndarray
    returns: np.ndarray
    created_by: str
    created_at: str


def _decode(row: Sequence[Any]) -> Run | str:
    """The run of an ``episode_runs`` row, or what is wrong with it."""
    rid, bench, shard_rid, first_rid, n, ids, columns, returns, by, at = row
    names = ids.split(",") if n else []
    values = np.frombuffer(columns, dtype="<i8") if len(columns) % 8 == 0 else np.zeros(0)
    rewards = np.frombuffer(returns, dtype="<f8") if len(returns) % 8 == 0 else np.zeros(0)
    if len(names) != n or values.size != _FIELDS * n or rewards.size != n:
        return (
            f"episode run #{rid} is damaged: {n} episodes but {len(names)} ids, "
            f"{values.size} column values (expected {_FIELDS * n}) and {rewards.size} returns; "
            "no episode query can run until it is removed (DELETE FROM episode_runs WHERE "
            f"rid = {rid} on catalog.sqlite drops its episodes from the catalog; then reopen "
            "the store and run verify())"
        )
    return Run(rid, bench, shard_rid, first_rid, names, values.reshape(_FIELDS, n), rewards, by, at)


def read(conn: sqlite3.Connection) -> tuple[list[Run], list[str]]:
    """Every pending run in rid order, and a description of each damaged one (left out)."""
    runs: list[Run] = []
    problems: list[str] = []
    for row in conn.execute(
        "SELECT rid, benchmark_id, shard_rid, first_rid, n, ids, columns, returns, created_by, "
        "created_at FROM episode_runs ORDER BY first_rid"
    ):
        run = _decode(row)
        if isinstance(run, str):
            problems.append(run)
        else:
            runs.append(run)
    return runs, problems


def expand(conn: sqlite3.Connection) -> int:
    """Inserts the ``episodes`` rows of every run and deletes the runs; the episodes expanded.

    Call inside a write transaction (``BEGIN IMMEDIATE``): the runs read are the runs deleted
    (first: the trigger ``episodes_reserved_rids`` refuses rows in a pending run's rids).

    Raises:
        ValueError: A run is damaged (its sizes disagree); nothing is changed.
    """
    runs, problems = read(conn)
    if problems:
        raise ValueError(problems[0])
    conn.execute("DELETE FROM episode_runs")
    total = 0
    for run in runs:
        start, length, flags = run.columns
        n, by = len(run.ids), run.created_by
        stop = start + length + (flags >> 3)
        terminated = (flags & 1).tolist()
        truncated = ((flags >> 1) & 1).tolist()
        conn.executemany(
            "INSERT INTO episodes (rid, id, benchmark_id, shard_rid, row_start, row_stop, "
            "n_tuples, episode_return, terminated, timeout, truncated, metadata, created_by, "
            "created_at, published_in, inexact, flags) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '{}', ?, ?, ?, 0, ?)",
            zip(range(run.first_rid, run.first_rid + n), run.ids, repeat(run.benchmark_id),
                repeat(run.shard_rid), start.tolist(), stop.tolist(), length.tolist(),
                run.returns.tolist(), terminated, truncated, truncated, repeat(by),
                repeat(run.created_at), repeat(json.dumps([by])), flags.tolist()),
        )  # fmt: skip
        total += n
    return total
