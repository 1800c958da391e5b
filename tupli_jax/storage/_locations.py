"""Where episodes live in the shards, as numpy arrays: the columnar read path's catalog query.

Host-side only. ``TupliDataset`` asks for the locations of the episodes passing a filter, then
opens each shard once and slices rows. Without a filter or with one on ``benchmark_id`` alone
the locations come from the episode blocks (``_blocks``, ~0.2 us per episode); otherwise from the
``episodes`` rows, folded by SQLite into one text per column (~1 us per matching episode). No
header object is built except for the rare rows that ``matches`` must recheck.

Example:
    >>> # loc = store._episode_locations(FilterEQ(key="benchmark_id", value=b))
    >>> # loc.shard_paths[loc.shard_index[0]], loc.row_start[0], loc.row_stop[0]
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from tupli_jax.schema import BaseFilter, FilterType, matches
from tupli_jax.storage import _blocks
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._files import Layout
from tupli_jax.storage.base import TupliStorageError

__all__ = ["EpisodeLocations", "episode_locations"]


@dataclasses.dataclass(frozen=True)
class EpisodeLocations:
    """Where the episodes passing a filter live, one entry per episode in catalog order.

    Returned by ``FileStorage._episode_locations`` for columnar loading (``TupliDataset``): group
    by ``shard_index``, open each shard once with ``open_shard(shard_paths[i],
    shard_checksums[i])`` and slice rows ``[row_start, row_stop)``.

    Attributes:
        ids: Episode ids ``[N]``.
        benchmark_ids: Benchmark id per episode ``[N]``.
        shard_paths: Paths of the distinct shards ``[S]``.
        shard_checksums: Their checksums ``[S]``.
        shard_index: int64 ``[N]``, index into ``shard_paths`` per episode.
        row_start: int64 ``[N]``, first row (the first observation) in the shard.
        row_stop: int64 ``[N]``, one past the last row.
        n_tuples: int64 ``[N]``, transitions ``T`` per episode.
        terminated: bool ``[N]``.
        truncated: bool ``[N]``.
    """

    ids: list[str]
    benchmark_ids: list[str]
    shard_paths: list[Path]
    shard_checksums: list[str]
    shard_index: np.ndarray
    row_start: np.ndarray
    row_stop: np.ndarray
    n_tuples: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def has_reset(self) -> np.ndarray:
        """bool ``[N]``: the episode's rows start with its reset observation (``T + 1`` rows)."""
        return np.asarray(self.row_stop - self.row_start == self.n_tuples + 1)

    def __len__(self) -> int:
        return len(self.ids)


# The row path: the matching episodes, one result row per benchmark, each column folded by SQLite
# into one comma-separated text (stepping a row in SQLite costs ~0.1 us, building a Python tuple
# for it ~0.5 us); the covering index ``episodes_benchmark`` serves it wherever the filter allows.
# All aggregates of one result row see the episodes in the same order; across result rows the
# order is by benchmark, so episodes are sorted by ``rid`` afterwards if needed.
_COLUMNS = (
    "t.benchmark_id, count(*), group_concat(t.id), group_concat(t.rid), "
    "group_concat(CAST(t.shard_rid AS INTEGER)), group_concat(CAST(t.row_start AS INTEGER)), "
    "group_concat(CAST(t.n_tuples AS INTEGER)), group_concat(t.flags)"
)
_RIDS_PER_QUERY = 1 << 20  # keeps each folded text far below SQLite's 1e9-byte string limit


def _ints(text: str | None, n: int, store: Path) -> np.ndarray:
    values = np.fromstring(text or "", dtype=np.int64, sep=",")
    if values.shape != (n,):
        raise _damaged(store)
    return values


def _strs(text: str | None, n: int, store: Path) -> list[str]:
    values = text.split(",") if text else []
    if len(values) != n:
        raise _damaged(store)
    return values


def _dense_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` in O(N) for values in a narrow range."""
    if values.size == 0:
        return values, values
    low, high = int(values.min()), int(values.max())
    if high - low > 4 * values.size + 1024:
        return np.unique(values, return_inverse=True)
    present = np.zeros(high - low + 1, np.bool_)
    present[values - low] = True
    distinct = np.flatnonzero(present)
    code = np.cumsum(present, dtype=np.int64) - 1
    return distinct + low, code[values - low]


def _damaged(store: Path) -> TupliStorageError:
    return TupliStorageError(
        f"the catalog of store '{store}' holds episode rows with values of the wrong type; the "
        "store is damaged: run verify()"
    )


def _benchmark_selection(filter: BaseFilter | None) -> tuple[bool, list[str] | None]:
    """``(True, None)``: every episode; ``(True, ids)``: the episodes of those benchmarks
    (``EQ`` or ``IN`` on ``benchmark_id`` with ``str`` values); ``(False, None)``: anything else.
    """
    if filter is None:
        return True, None
    if isinstance(filter, BaseFilter) and filter.key == "benchmark_id":
        value = filter.value
        if filter.type is FilterType.EQ and type(value) is str:
            return True, [value]
        if (
            filter.type is FilterType.IN
            and isinstance(value, list | tuple)
            and all(type(v) is str for v in value)
        ):
            return True, list(value)
    return False, None


def _from_rows(conn: sqlite3.Connection, filter: BaseFilter | None, store: Path) -> _blocks.Blocks:
    """The episodes passing ``filter`` from the ``episodes`` rows (any filter), rid order."""
    sql = cat.compile_filter(filter, cat.EPISODE_FIELDS)
    groups: list[tuple[Any, ...]] = []
    low, high = conn.execute(  # two subqueries: each is one B-tree descent
        "SELECT (SELECT min(rid) FROM episodes), (SELECT max(rid) FROM episodes)"
    ).fetchone()
    if low is not None:
        for first in range(int(low), int(high) + 1, _RIDS_PER_QUERY):
            groups += conn.execute(
                f"SELECT {_COLUMNS} FROM episodes t "  # '+': the range must not pick the index
                f"WHERE +t.rid BETWEEN ? AND ? AND {sql.text} GROUP BY t.benchmark_id",
                (first, first + _RIDS_PER_QUERY - 1, *sql.params),
            ).fetchall()
    ids: list[str] = []
    names, counts = [], []
    parts: list[np.ndarray] = []
    for bench, n, id_text, *numbers in groups:
        ids += _strs(id_text, n, store)
        names.append(bench)
        counts.append(n)
        parts.append(np.stack([_ints(text, n, store) for text in numbers]))
    columns = np.concatenate(parts, 1) if parts else np.zeros((5, 0), np.int64)
    benchmarks = np.repeat(np.array(names, dtype=object), counts)
    rid, flags = columns[0], columns[4]
    if rid.size > 1 and not bool(np.all(rid[1:] > rid[:-1])):
        order = np.argsort(rid, kind="stable")  # a merge of sorted runs
        columns, benchmarks = columns[:, order], benchmarks[order]
        ids = np.array(ids, dtype=object)[order].tolist()
        rid, flags = columns[0], columns[4]
    check = rid if not sql.exact else rid[(flags & 4) != 0]
    if filter is not None and check.size:
        found = conn.execute(
            f"SELECT {cat.EPISODE_COLUMNS}, t.rid FROM episodes t "
            "WHERE t.rid IN (SELECT value FROM json_each(?))",
            (json.dumps(check.tolist()),),
        ).fetchall()
        headers = cat.episode_headers(found)
        rejected = [
            row[-1]
            for row, header in zip(found, headers, strict=True)
            if not matches(filter, header.model_dump())
        ]
        if rejected:
            keep = ~np.isin(rid, np.asarray(rejected, np.int64))
            columns, benchmarks = columns[:, keep], benchmarks[keep]
            ids = np.array(ids, dtype=object)[keep].tolist()
    return _blocks.Blocks(columns, ids, benchmarks.tolist())


def episode_locations(
    layout: Layout, catalog: cat.Catalog, filter: BaseFilter | None
) -> EpisodeLocations:
    """Where the episodes passing ``filter`` live, in recording order.

    Without a filter, or with one on ``benchmark_id`` alone (``EQ``, or ``IN`` a list of ids:
    what ``TupliDataset`` asks), the answer comes from the episode blocks (``_blocks``: ~0.2 us
    per episode). Any other filter reads the ``episodes`` rows, each column folded by SQLite into
    one comma-separated text and parsed by numpy (~1 us per matching episode); headers are built
    only for the rows ``matches`` must recheck (superset filters, metadata SQL cannot compare).

    Raises:
        TupliStorageError: ``filter`` is not a filter tree, or the catalog is damaged (an episode
            in a shard it does not list, values of the wrong type).
    """
    store = layout.root
    fast, benchmarks = _benchmark_selection(filter)
    with catalog.read(runs_ok=fast) as conn:  # the blocks hold the episodes of runs too
        found = _blocks.read(conn, benchmarks) if fast else _from_rows(conn, filter, store)
        _, shard_rid, row_start, n_tuples, flags = found.columns
        shard_rids, shard_index = _dense_codes(shard_rid)
        shards = dict(
            (r[0], (r[1], r[2]))
            for r in conn.execute(
                "SELECT rid, name, checksum FROM shards "
                "WHERE rid IN (SELECT value FROM json_each(?))",
                (json.dumps(shard_rids.tolist()),),
            )
        )
    missing = [int(r) for r in shard_rids if int(r) not in shards]
    if missing:
        raise TupliStorageError(
            f"the catalog of store '{store}' places episodes in shard #{missing[0]}, which it "
            "does not list; the store is damaged: run verify() and delete those episodes"
        )
    return EpisodeLocations(
        ids=found.ids,
        benchmark_ids=found.benchmark_ids,
        shard_paths=[layout.shard_path(shards[int(r)][0]) for r in shard_rids],
        shard_checksums=[shards[int(r)][1] for r in shard_rids],
        shard_index=shard_index.astype(np.int64).reshape(-1),
        row_start=row_start,
        row_stop=row_start + n_tuples + (flags >> 3),
        n_tuples=n_tuples,
        terminated=(flags & 1) != 0,
        truncated=(flags & 2) != 0,
    )
