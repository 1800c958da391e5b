"""Where episodes live in the shards, as numpy arrays: the columnar read path's catalog query.

Host-side only. ``TupliDataset`` asks for the locations of the episodes passing a filter, then
opens each shard once and slices rows; no header object is built except for the rare rows that
``matches`` must recheck.

Example:
    >>> # loc = store._episode_locations(FilterEQ(key="benchmark_id", value=b))
    >>> # loc.shard_paths[loc.shard_index[0]], loc.row_start[0], loc.row_stop[0]
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from tupli_jax.schema import BaseFilter, matches
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._files import Layout

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


def episode_locations(
    layout: Layout, catalog: cat.Catalog, filter: BaseFilter | None
) -> EpisodeLocations:
    """Where the episodes passing ``filter`` live, in recording order.

    One SQL query and a vectorised conversion; headers are only built for the rows that
    ``matches`` must recheck (superset filters, metadata SQL cannot compare).

    Raises:
        TupliStorageError: ``filter`` is not a filter tree, or the catalog names a bad shard.
    """
    sql = cat.compile_filter(filter, cat.EPISODE_FIELDS)
    source = "episodes t JOIN shards s ON s.name = t.shard"
    columns = "t.id, t.benchmark_id, s.rid, t.row_start, t.row_stop, t.n_tuples, "
    columns += "t.terminated, t.truncated, t.rid, t.inexact"
    with catalog.read() as conn:
        rows = conn.execute(
            f"SELECT {columns} FROM {source} WHERE {sql.text} ORDER BY t.rid", sql.params
        ).fetchall()
        check = [r[8] for r in rows if filter is not None and (not sql.exact or r[9])]
        if check:
            found = conn.execute(
                f"SELECT {cat.EPISODE_COLUMNS}, t.rid FROM episodes t "
                "WHERE t.rid IN (SELECT value FROM json_each(?))",
                (json.dumps(check),),
            ).fetchall()
            headers = cat.episode_headers(found)
            rejected = {
                row[-1]
                for row, header in zip(found, headers, strict=True)
                if not matches(filter, header.model_dump())
            }
            rows = [r for r in rows if r[8] not in rejected]
        shard_rids, shard_index = np.unique(
            np.fromiter((r[2] for r in rows), np.int64, len(rows)), return_inverse=True
        )
        shards = dict(
            (r[0], (r[1], r[2]))
            for r in conn.execute(
                "SELECT rid, name, checksum FROM shards "
                "WHERE rid IN (SELECT value FROM json_each(?))",
                (json.dumps(shard_rids.tolist()),),
            )
        )

    def column(i: int, dtype: type) -> np.ndarray:
        return np.fromiter((r[i] for r in rows), dtype, len(rows))

    return EpisodeLocations(
        ids=[r[0] for r in rows],
        benchmark_ids=[r[1] for r in rows],
        shard_paths=[layout.shard_path(shards[int(r)][0]) for r in shard_rids],
        shard_checksums=[shards[int(r)][1] for r in shard_rids],
        shard_index=shard_index.astype(np.int64).reshape(-1),
        row_start=column(3, np.int64),
        row_stop=column(4, np.int64),
        n_tuples=column(5, np.int64),
        terminated=column(6, np.bool_),
        truncated=column(7, np.bool_),
    )
