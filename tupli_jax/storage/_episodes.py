"""The episode write path: shards staged, renamed and committed in one transaction; batch ids.

Host-side only. ``write_episodes`` writes one Arrow shard per observation structure into a
private staging directory (no lock held), then under the catalog's write lock renames the shards
into place, fsyncs the directory and inserts the shard, episode and metadata-leaf rows; the
commit makes the whole batch visible at once, and a writer killed at any moment leaves nothing
of it (``Layout.recover`` removes renamed but uncommitted shards).

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

import datetime
import json
import os
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tupli_jax.episode import EpisodeData
from tupli_jax.schema import EpisodeHeader
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._files import Layout, fsync_dir, unlink
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.shards import ShardInfo, group_by_structure, write_shard

__all__ = ["has_batch", "write_episodes"]

_SHOWN = 8  # lengths shown in a batch mismatch message


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


def has_batch(catalog: cat.Catalog, batch_id: str) -> bool:
    """Whether a batch with this (validated) id is committed."""
    rows = catalog.query("SELECT 1 FROM batches WHERE id = ?", (batch_id,))
    return bool(rows)


def _committed(
    conn: sqlite3.Connection, batch_id: str, items: Sequence[EpisodeData], store: Path
) -> list[EpisodeHeader] | None:
    """The headers of committed batch ``batch_id`` in their original order, or ``None``.

    Episodes of the batch deleted since are left out. Raises if ``items`` cannot be the same
    batch (another number of episodes or other lengths): a batch id names one batch.
    """
    row = conn.execute("SELECT episodes FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None:
        return None
    entries: list[list[Any]] = json.loads(row[0])
    stored = [int(n) for _, n in entries]
    received = [e.length for e in items]
    if stored != received:
        raise TupliStorageError(
            f"batch '{batch_id}' is already committed in store '{store}' with {len(stored)} "
            f"episodes of lengths {stored[:_SHOWN]}{'...' if len(stored) > _SHOWN else ''}, "
            f"but this call passes {len(received)} episodes of lengths "
            f"{received[:_SHOWN]}{'...' if len(received) > _SHOWN else ''}; a batch id must name "
            "one batch: pass the same episodes to re-record it, or use a new batch id"
        )
    ids = [str(eid) for eid, _ in entries]
    rows = conn.execute(
        f"SELECT {cat.EPISODE_COLUMNS} FROM episodes t "
        "WHERE t.id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    ).fetchall()
    by_id = {r[0]: r for r in rows}
    return cat.episode_headers([by_id[i] for i in ids if i in by_id])


def _stage(
    staging: Path, items: list[EpisodeData], compression: str | None
) -> tuple[list[ShardInfo], list[tuple[str, int, int]]]:
    """Writes the shards (one per observation structure); where each episode landed."""
    shard_of: list[tuple[str, int, int]] = [("", 0, 0)] * len(items)
    infos = []
    for group in group_by_structure(items):
        info = write_shard(staging, [items[i] for i in group], compression=compression)
        infos.append(info)
        for i, (start, stop) in zip(group, info.ranges, strict=True):
            shard_of[i] = (info.name, start, stop)
    return infos, shard_of


def _insert(
    conn: sqlite3.Connection,
    items: list[EpisodeData],
    metas: list[tuple[str, dict[str, Any]]],
    shard_of: list[tuple[str, int, int]],
    created_by: str,
) -> list[EpisodeHeader]:
    """Inserts the episode and metadata-leaf rows; the headers in input order."""
    now, published = _now(), json.dumps([created_by])
    rid0 = int(conn.execute("SELECT COALESCE(MAX(rid), 0) + 1 FROM episodes").fetchone()[0])
    rows: list[tuple[Any, ...]] = []
    leaf_rows: list[tuple[Any, ...]] = []
    headers: list[EpisodeHeader] = []
    for i, episode in enumerate(items):
        name, start, stop = shard_of[i]
        leaves, inexact = cat.document_leaves(metas[i][1])
        leaf_rows.extend((*leaf, rid0 + i) for leaf in leaves)
        terminated, truncated = bool(episode.terminated), bool(episode.truncated)
        values = {
            "id": uuid.uuid4().hex,
            "created_by": created_by,
            "published_in": [created_by],
            "created_at": now,
            "benchmark_id": episode.benchmark_id,
            "metadata": metas[i][1],
            "n_tuples": episode.length,
            "terminated": terminated,
            "timeout": truncated,
            "truncated": truncated,
            "episode_return": episode.episode_return,
        }
        headers.append(cat.fast_model(EpisodeHeader, values))
        rows.append(
            (rid0 + i, values["id"], episode.benchmark_id, name, start, stop, episode.length,
             values["episode_return"], terminated, truncated, truncated, metas[i][0],
             created_by, now, published, int(inexact))
        )  # fmt: skip
    conn.executemany(
        "INSERT INTO episodes (rid, id, benchmark_id, shard, row_start, row_stop, n_tuples, "
        "episode_return, terminated, timeout, truncated, metadata, created_by, created_at, "
        "published_in, inexact) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.executemany("INSERT INTO episode_leaves VALUES (?, ?, ?, ?)", leaf_rows)
    return headers


def _insert_batch(conn: sqlite3.Connection, batch_id: str, headers: list[EpisodeHeader]) -> None:
    entries = [[h.id, h.n_tuples] for h in headers]
    conn.execute(
        "INSERT INTO batches (id, episodes, created_at) VALUES (?, ?, ?)",
        (batch_id, json.dumps(entries), _now()),
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
    root = layout.root
    if batch_id is not None:
        with catalog.read() as conn:  # the common replay case, without staging anything
            done = _committed(conn, batch_id, items, root)
        if done is not None:
            return done
    if not items:
        if batch_id is not None:
            with catalog.write() as conn:
                done = _committed(conn, batch_id, items, root)
                if done is None:
                    _insert_batch(conn, batch_id, [])
        return []
    metas = [
        cat.normalize_document(e.metadata, f"metadata of episode {i}") for i, e in enumerate(items)
    ]
    bench_ids = {cat.check_id(e.benchmark_id, "benchmark", root) for e in items}
    with catalog.read() as conn:
        require_benchmarks(conn, bench_ids, root)
    with layout.staging_dir() as staging:
        infos, shard_of = _stage(staging, items, compression)
        renamed: list[Path] = []
        try:
            with catalog.write() as conn:
                if batch_id is not None:
                    done = _committed(conn, batch_id, items, root)
                    if done is not None:  # another writer committed it meanwhile
                        return done
                require_benchmarks(conn, bench_ids, root)
                for info in infos:
                    os.replace(staging / info.name, layout.shards / info.name)
                    renamed.append(layout.shards / info.name)
                fsync_dir(layout.shards)
                now = _now()
                conn.executemany(
                    "INSERT INTO shards (name, checksum, size, n_rows, created_at) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(s.name, s.checksum, s.size, s.n_rows, now) for s in infos],
                )
                headers = _insert(conn, items, metas, shard_of, created_by)
                if batch_id is not None:
                    _insert_batch(conn, batch_id, headers)
        except BaseException:
            for path in renamed:  # not committed: nobody references them
                unlink(path)
            raise
    return headers
