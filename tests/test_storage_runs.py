"""Tests of episode runs (tupli_jax/storage/_runs.py): a batch without metadata committed as one
catalog row, expanded into ``episodes`` rows before any query that reads them; real SQLite and
real shards on ``tmp_path``."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.dataset import TupliDataset
from tupli_jax.episode import EpisodeBatch
from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery, EpisodeHeader, FilterEQ
from tupli_jax.storage import EpisodeHeaders, FileStorage, TupliStorageError


def _bench(store: FileStorage, name: str = "b") -> str:
    query = BenchmarkQuery(hash=name, serialized="{}", metadata=BenchmarkMetadata(name=name))
    return store.store_benchmark(query).id


def _batch(
    lengths: Sequence[int],
    bench: str,
    *,
    seed: int = 0,
    terminated: Sequence[bool] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> EpisodeBatch:
    n, steps = len(lengths), int(sum(lengths))
    rng = np.random.default_rng(seed)
    done = np.asarray(terminated if terminated is not None else [True] * n, bool)
    return EpisodeBatch(
        observations=rng.normal(size=(steps + n, 3)).astype(np.float32),
        actions=rng.integers(0, 4, steps, dtype=np.int32),
        rewards=rng.normal(size=steps).astype(np.float32),
        discounts=rng.random(steps).astype(np.float32),
        n_tuples=np.asarray(lengths, np.int64),
        terminated=done,
        truncated=~done,
        benchmark_id=bench,
        metadata=metadata,
    )


def _sql(store: FileStorage, statement: str) -> list[Any]:
    """Reads the catalog through a connection of its own (no expansion)."""
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    try:
        return conn.execute(statement).fetchall()
    finally:
        conn.close()


def _pending(store: FileStorage) -> tuple[int, int]:
    runs, episodes = _sql(store, "SELECT count(*), COALESCE(sum(n), 0) FROM episode_runs")[0]
    return int(runs), int(episodes)


_ROW_COLUMNS = (
    "rid, shard_rid, row_start, row_stop, n_tuples, episode_return, terminated, "
    "timeout, truncated, metadata, created_by, published_in, inexact, flags"
)


def test_batch_without_metadata_is_one_run_until_an_episode_query(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    headers = store.record_episode_batch(_batch([3, 1, 4], bench))
    assert isinstance(headers, EpisodeHeaders)
    assert _pending(store) == (1, 3)
    assert _sql(store, "SELECT count(*) FROM episodes") == [(0,)]
    store.list_benchmarks()  # reads no episode rows: the run stays
    assert _pending(store) == (1, 3)
    listed = store.list_episodes()
    assert _pending(store) == (0, 0)
    assert _sql(store, "SELECT count(*) FROM episodes") == [(3,)]
    assert listed == headers
    assert store.verify() == []


def test_batch_with_metadata_is_inserted_row_by_row(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    headers = store.record_episode_batch(_batch([2, 2], bench, metadata=[{"k": 1}, {"k": 2}]))
    assert isinstance(headers, list)
    assert _pending(store) == (0, 0)
    assert [h.metadata for h in store.list_episodes(FilterEQ(key="metadata.k", value=2))] == [
        {"k": 2}
    ]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=st.lists(
        st.lists(st.tuples(st.integers(1, 6), st.booleans()), min_size=1, max_size=12),
        min_size=1,
        max_size=4,
    ),
)
def test_expanded_rows_equal_rows_inserted_one_by_one(
    tmp_path_factory: pytest.TempPathFactory, batches: list[list[tuple[int, bool]]]
) -> None:
    """Every column of every episode row, block and header is what the row-by-row path writes
    for the same episodes (metadata ``[{}] * n`` takes that path), except ids and times."""
    root = tmp_path_factory.mktemp("runs")
    runs, rows = FileStorage(root / "runs"), FileStorage(root / "rows")
    bench_runs, bench_rows = _bench(runs), _bench(rows)  # random ids: compared apart
    for seed, episodes in enumerate(batches):
        lengths = [n for n, _ in episodes]
        done = [t for _, t in episodes]
        runs.record_episode_batch(_batch(lengths, bench_runs, seed=seed, terminated=done))
        rows.record_episode_batch(
            _batch(lengths, bench_rows, seed=seed, terminated=done, metadata=[{}] * len(lengths))
        )
    assert _pending(runs)[0] == len(batches) and _pending(rows) == (0, 0)

    def strip(h: EpisodeHeader) -> dict[str, Any]:
        return h.model_dump(exclude={"id", "created_at", "benchmark_id"})

    assert [strip(h) for h in runs.list_episodes()] == [strip(h) for h in rows.list_episodes()]
    select = f"SELECT {_ROW_COLUMNS} FROM episodes ORDER BY rid"
    assert _sql(runs, select) == _sql(rows, select)
    assert {h.benchmark_id for h in runs.list_episodes()} == {bench_runs}
    block_runs = runs._episode_locations()
    block_rows = rows._episode_locations()
    for name in ("row_start", "row_stop", "n_tuples", "terminated", "truncated", "shard_index"):
        np.testing.assert_array_equal(getattr(block_runs, name), getattr(block_rows, name))
    assert block_runs.ids == [h.id for h in runs.list_episodes()]
    assert runs.verify() == [] and rows.verify() == []


def test_lazy_headers_behave_as_the_listed_headers(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    batch = _batch([3, 1, 4, 2], bench, terminated=[True, False, True, False])
    headers = store.record_episode_batch(batch)
    assert isinstance(headers, EpisodeHeaders)
    listed = store.list_episodes()
    assert len(headers) == 4 and list(headers) == listed and headers == listed
    assert headers[-1] == listed[-1] and headers[1:3] == listed[1:3]
    assert headers + listed[:1] == [*listed, listed[0]]
    assert listed[:1] + headers == [listed[0], *listed]
    np.testing.assert_array_equal(headers.n_tuples, [3, 1, 4, 2])
    assert [h.truncated for h in headers] == [False, True, False, True]
    assert [h.timeout for h in headers] == [h.truncated for h in headers]
    np.testing.assert_allclose([h.episode_return for h in headers], batch.episode_returns())
    assert headers != listed[:3] and headers != listed[::-1]
    with pytest.raises(IndexError):
        headers[4]
    with pytest.raises(ValueError, match="read-only"):
        headers.n_tuples[0] = 9
    for h in headers:  # the same validated model as a header built from its fields
        assert EpisodeHeader.model_validate(h.model_dump()) == h


def test_runs_and_row_inserts_keep_rids_unique_and_in_order(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    first = store.record_episode_batch(_batch([2, 3], bench, seed=1))  # run
    middle = store.record_episodes(_batch([1], bench, seed=2).episodes())  # rows, run pending
    last = store.record_episode_batch(_batch([4, 1, 1], bench, seed=3))  # run
    assert _pending(store) == (2, 5)
    ids = [h.id for h in [*first, *middle, *last]]
    assert [h.id for h in store.list_episodes()] == ids
    assert _sql(store, "SELECT count(DISTINCT rid), count(*) FROM episodes") == [(6, 6)]
    data = TupliDataset(store).to_numpy()
    assert len(data["rewards"]) == 2 + 3 + 1 + 4 + 1 + 1
    assert store.verify() == []


def test_columnar_load_reads_the_runs_without_expanding_them(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    batch = _batch([3, 2, 5], bench)
    store.record_episode_batch(batch)
    data = TupliDataset(store).to_numpy()
    assert _pending(store) == (1, 3)
    np.testing.assert_array_equal(data["rewards"], batch.rewards)
    np.testing.assert_array_equal(data["actions"], batch.actions)


def test_another_connection_sees_and_expands_the_runs(tmp_path: Path) -> None:
    writer = FileStorage(tmp_path / "s")
    bench = _bench(writer)
    headers = writer.record_episode_batch(_batch([1, 2], bench))
    reader = FileStorage(tmp_path / "s")
    assert [h.id for h in reader.list_episodes()] == [h.id for h in headers]
    assert _pending(writer) == (0, 0)
    assert writer.list_episodes() == reader.list_episodes()


def test_replayed_batch_id_of_a_pending_run_returns_its_headers(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    batch = _batch([2, 5, 1], bench)
    first = store.record_episode_batch(batch, batch_id="job:chunk:0")
    assert _pending(store) == (1, 3)
    again = store.record_episode_batch(batch, batch_id="job:chunk:0")
    assert [h.id for h in again] == [h.id for h in first] and again == first
    assert len(store.list_episodes()) == 3
    with pytest.raises(TupliStorageError, match="already committed"):
        store.record_episode_batch(_batch([2, 5], bench), batch_id="job:chunk:0")


def test_delete_and_publish_episodes_of_a_pending_run(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    headers = store.record_episode_batch(_batch([2, 3, 4], bench))
    store.publish_episode(headers[2].id, "team")
    store.delete_episode(headers[0].id)
    listed = store.list_episodes()
    assert [h.id for h in listed] == [headers[1].id, headers[2].id]
    assert listed[1].published_in == [headers[2].created_by, "team"]
    assert store.load_episode(headers[1].id).length == 3
    assert store.verify() == []


def test_damaged_run_is_reported_with_its_fix(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    store.record_episode_batch(_batch([2, 3], bench))
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    with conn:
        conn.execute("UPDATE episode_runs SET columns = substr(columns, 1, 16)")
    conn.close()
    with pytest.raises(TupliStorageError, match=r"episode run #1 is damaged.*DELETE FROM"):
        store.list_episodes()
    assert any("episode run #1 is damaged" in problem for problem in store.verify())
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    with conn:  # the blocks are rebuilt when the store is opened next
        conn.execute("DELETE FROM meta WHERE key = 'episode_blocks'")
    conn.close()
    with pytest.raises(TupliStorageError, match=r"cannot open store .*episode run #1"):
        FileStorage(store.root)
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    with conn:
        conn.execute("DELETE FROM episode_runs WHERE rid = 1")
    conn.close()
    assert store.list_episodes() == []
    assert any("blocks" in problem for problem in store.verify())


def test_verify_checks_pending_runs_without_expanding_them(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    store.record_episode_batch(_batch([3, 2], bench))
    assert store.verify() == []
    assert _pending(store) == (1, 2)
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    with conn:  # a pending episode beyond its shard's rows
        conn.execute("UPDATE shards SET n_rows = 4")
    conn.close()
    assert any("bad row range" in problem for problem in store.verify())
    assert _pending(store) == (1, 2)


def test_a_read_that_expands_runs_holds_off_writers(tmp_path: Path) -> None:
    """With runs pending, a read runs in the write transaction that expands them: nobody can
    commit a new run between the expansion and the read."""
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    store.record_episode_batch(_batch([1, 2], bench))
    other = sqlite3.connect(store.root / "catalog.sqlite", timeout=0.05)
    try:
        with store._catalog.read() as conn:
            assert conn.execute("SELECT count(*) FROM episodes").fetchone() == (2,)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
        other.execute("BEGIN IMMEDIATE")  # free again after the read
        other.execute("ROLLBACK")
        store.record_episode_batch(_batch([4], bench))
        with store._catalog.read(runs_ok=True) as conn:  # a plain read: writers may go on
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
    finally:
        other.close()


def test_an_older_writer_cannot_take_the_rids_of_a_pending_run(tmp_path: Path) -> None:
    """tupli_jax before episode runs inserted rows from ``MAX(rid) + 1`` of ``episodes``; a process
    of that version still holding the store open must be refused, not corrupt it."""
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    store.record_episodes(_batch([2], bench).episodes())  # rid 1, a row
    store.record_episode_batch(_batch([1, 3], bench))  # rids 2-3, a run
    conn = sqlite3.connect(store.root / "catalog.sqlite")
    try:
        (rid,) = conn.execute("SELECT max(rid) + 1 FROM episodes").fetchone()
        assert rid == 2
        with pytest.raises(sqlite3.IntegrityError, match="reserved by an episode run"):
            conn.execute(
                "INSERT INTO episodes (rid, id, benchmark_id, shard_rid, row_start, row_stop, "
                "n_tuples, episode_return, terminated, timeout, truncated, metadata, created_by, "
                "created_at, published_in, inexact, flags) "
                "VALUES (?, 'old', ?, 1, 0, 3, 2, 0.0, 1, 0, 0, '{}', 'x', 'now', '[]', 0, 9)",
                (rid, bench),
            )
    finally:
        conn.close()
    assert [h.n_tuples for h in store.list_episodes()] == [2, 1, 3]
    assert store.verify() == []


def test_a_version_2_store_gets_the_runs_table_and_trigger(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = _bench(store)
    store.record_episodes(_batch([2], bench).episodes())
    store.close()
    conn = sqlite3.connect(tmp_path / "s" / "catalog.sqlite")
    with conn:
        conn.execute("DROP TRIGGER episodes_reserved_rids")
        conn.execute("DROP TABLE episode_runs")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    conn.close()
    store = FileStorage(tmp_path / "s")
    assert _sql(store, "SELECT value FROM meta WHERE key = 'schema_version'") == [("3",)]
    names = {r[0] for r in _sql(store, "SELECT name FROM sqlite_master")}
    assert {"episode_runs", "episodes_reserved_rids"} <= names
    store.record_episode_batch(_batch([1, 1], bench))
    assert [h.n_tuples for h in store.list_episodes()] == [2, 1, 1]


def test_nan_returns_are_stored_as_by_the_row_path(tmp_path: Path) -> None:
    runs, rows = FileStorage(tmp_path / "runs"), FileStorage(tmp_path / "rows")
    batches = []
    for store in (runs, rows):
        batch = _batch([2, 3], _bench(store))
        batch.rewards[1] = np.nan
        batches.append(batch)
    lazy = runs.record_episode_batch(batches[0])
    rows.record_episode_batch(dataclasses.replace(batches[1], metadata=[{}, {}]))
    assert np.isnan(lazy[0].episode_return) and not np.isnan(lazy[1].episode_return)
    for store in (runs, rows):
        returns = [h.episode_return for h in store.list_episodes()]
        assert np.isnan(returns[0]) and returns[1] == pytest.approx(lazy[1].episode_return)
    select = "SELECT episode_return IS NULL, episode_return FROM episodes ORDER BY rid"
    assert _sql(runs, select) == _sql(rows, select)
