"""Tests of tupli_jax/storage/_blocks.py: the episode blocks always agree with the episode rows.

Real SQLite and real shards on temporary directories. The reference is the row path of
``_episode_locations`` (any filter that is not on ``benchmark_id`` alone reads the rows, e.g. an
empty ``FilterAND``), which the block path must reproduce exactly.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import (
    BaseFilter,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    FilterAND,
    FilterEQ,
    FilterIN,
    RLTuple,
)
from tupli_jax.storage import FileStorage, TupliStorageError, _blocks
from tupli_jax.storage.file_storage import EpisodeLocations

_ROWS = FilterAND(filters=[])  # matches everything, read from the rows


def _episode(bench: str, n: int, image: bool = False, **kw: Any) -> EpisodeData:
    obs: Any = np.full((n + 1, 2), n, np.float32)
    if image:
        obs = {"img": np.zeros((n + 1, 2, 2), np.uint8)}
    return EpisodeData(
        observations=obs,
        actions=np.zeros(n, np.int64),
        rewards=np.ones(n, np.float32),
        discounts=np.ones(n, np.float32),
        terminated=kw.pop("terminated", True),
        truncated=kw.pop("truncated", False),
        metadata=kw.pop("metadata", {}),
        benchmark_id=bench,
    )


def _run_batch(bench: str, lengths: list[int]) -> EpisodeBatch:
    steps, n = sum(lengths), len(lengths)
    return EpisodeBatch(
        observations=np.zeros((steps + n, 2), np.float32),
        actions=np.zeros(steps, np.int64),
        rewards=np.ones(steps, np.float32),
        discounts=np.ones(steps, np.float32),
        n_tuples=np.asarray(lengths, np.int64),
        terminated=np.ones(n, bool),
        truncated=np.zeros(n, bool),
        benchmark_id=bench,
    )


def _benchmarks(store: FileStorage, n: int) -> list[str]:
    return [
        store.store_benchmark(
            BenchmarkQuery(hash=f"h{i}", serialized="{}", metadata=BenchmarkMetadata(name="b"))
        ).id
        for i in range(n)
    ]


def _same(a: EpisodeLocations, b: EpisodeLocations) -> None:
    assert a.ids == b.ids and a.benchmark_ids == b.benchmark_ids
    assert a.shard_paths == b.shard_paths and a.shard_checksums == b.shard_checksums
    for name in ("shard_index", "row_start", "row_stop", "n_tuples", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def _assert_blocks_agree(store: FileStorage, benches: list[str]) -> None:
    blocks = store._episode_locations(None)  # first: episode runs may still be pending
    everything = store._episode_locations(_ROWS)
    assert everything.ids == [h.id for h in store.list_episodes()]
    _same(blocks, everything)
    filters: list[BaseFilter] = [FilterEQ(key="benchmark_id", value=b) for b in benches]
    filters.append(FilterIN(key="benchmark_id", value=benches[::-1]))
    filters.append(FilterIN(key="benchmark_id", value=[]))
    for f in filters:
        _same(store._episode_locations(f), store._episode_locations(FilterAND(filters=[f])))
    assert store.verify() == []


_OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("record"),
            st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4), st.booleans()), max_size=6),
        ),
        st.tuples(st.just("delete"), st.lists(st.integers(0, 50), max_size=4)),
        st.tuples(  # one benchmark, no metadata: an episode run (tupli_jax/storage/_runs.py)
            st.just("batch"),
            st.tuples(st.integers(0, 2), st.lists(st.integers(1, 4), min_size=1, max_size=6)),
        ),
    ),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(ops=_OPS, grow_below=st.sampled_from([1, 3, 512]), max_block=st.sampled_from([2, 5, 4096]))
def test_blocks_agree_with_the_rows_after_any_writes_and_deletes(
    ops: list[tuple[str, list[Any]]],
    grow_below: int,
    max_block: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_blocks, "_GROW_BELOW", grow_below)
    monkeypatch.setattr(_blocks, "_MAX_BLOCK", max_block)
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(tmp)
        benches = _benchmarks(store, 3)
        for op, args in ops:
            if op == "record":
                batch = [_episode(benches[b], n, image) for b, n, image in args]
                store.record_episodes(batch)
            elif op == "batch":
                b, lengths = args
                store.record_episode_batch(_run_batch(benches[b], lengths))
            else:
                ids = [h.id for h in store.list_episodes()]
                doomed = sorted({ids[k % len(ids)] for k in args}) if ids else []
                store.delete_episodes(doomed)
            _assert_blocks_agree(store, benches)
        store.close()


def test_one_at_a_time_writes_grow_one_block(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    (bench,) = _benchmarks(store, 1)
    for k in range(5):
        store.record_episode(_episode(bench, k + 1))
    store.record_episode(
        Episode(benchmark_id=bench, metadata={}, tuples=[RLTuple(state=[0.0], action=0, reward=1)])
    )
    counts = store._catalog.query("SELECT n FROM episode_blocks")
    assert counts == [(6,)]
    _assert_blocks_agree(store, [bench])
    assert store._episode_locations(None).has_reset.tolist() == [True] * 5 + [False]


def test_blocks_are_rebuilt_on_open_when_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_blocks, "_MAX_BLOCK", 2)  # several blocks per benchmark
    store = FileStorage(tmp_path / "s")
    benches = _benchmarks(store, 2)
    store.record_episodes([_episode(benches[k % 2], k + 1, k == 3) for k in range(7)])
    before = store._episode_locations(None)
    store.close()
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM episode_blocks")
    conn.close()
    damaged = FileStorage(tmp_path / "s")
    assert any("episode blocks disagree" in p for p in damaged.verify())
    damaged.close()
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM meta WHERE key = 'episode_blocks'")  # what the message says
    conn.close()
    repaired = FileStorage(tmp_path / "s")
    _same(repaired._episode_locations(None), before)
    _assert_blocks_agree(repaired, benches)


def test_a_damaged_block_is_reported_and_refused(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    (bench,) = _benchmarks(store, 1)
    store.record_episodes([_episode(bench, 2), _episode(bench, 3)])
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        conn.execute("UPDATE episode_blocks SET n = n + 1")
    conn.close()
    assert any("damaged episode block" in p for p in store.verify())
    with pytest.raises(TupliStorageError, match="episode block"):
        store._episode_locations(None)
    assert len(store._episode_locations(_ROWS)) == 2  # the rows are intact


def test_big_batches_are_cut_into_blocks_and_a_delete_rewrites_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_blocks, "_MAX_BLOCK", 3)
    store = FileStorage(tmp_path / "s")
    (bench,) = _benchmarks(store, 1)
    headers = store.record_episodes([_episode(bench, k + 1) for k in range(8)])
    sizes = "SELECT n FROM episode_blocks ORDER BY first_rid"
    assert store._catalog.query(sizes) == [(3,), (3,), (2,)]
    store.delete_episode(headers[4].id)
    assert store._catalog.query(sizes) == [(3,), (2,), (2,)]
    store.delete_episodes([h.id for h in headers[:3]])  # empties the first block
    assert store._catalog.query(sizes) == [(2,), (2,)]
    _assert_blocks_agree(store, [bench])
