"""Tests of tupli_jax/storage/file_storage.py on real SQLite and real files (``tmp_path``)."""

from __future__ import annotations

import gc
import hashlib
import json
import math
import os
import pickle
import re
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    FilterEQ,
    FilterGEQ,
    FilterIN,
    FilterLT,
    RLTuple,
    to_builtin,
)
from tupli_jax.storage import FileStorage, TupliStorage, TupliStorageError
from tupli_jax.storage._files import no_gc
from tupli_jax.storage.shards import open_shard

WRITER = Path(__file__).with_name("_storage_writer.py")


class Pos(NamedTuple):
    """An importable NamedTuple observation node."""

    row: np.ndarray
    col: np.ndarray


# --------------------------------------------------------------------------------------------
# helpers


def _query(hash: str = "h", name: str = "bench", **extra: Any) -> BenchmarkQuery:
    return BenchmarkQuery(
        hash=hash, serialized='{"env": 1}', metadata=BenchmarkMetadata(name=name, extra=extra)
    )


@pytest.fixture
def bench(store: FileStorage) -> str:
    return store.store_benchmark(_query()).id


def _episode(bench: str, n: int = 3, obs: Any = None, **kw: Any) -> EpisodeData:
    return EpisodeData(
        observations=np.arange((n + 1) * 2, dtype=np.float32).reshape(n + 1, 2)
        if obs is None
        else obs,
        actions=kw.pop("actions", np.arange(n, dtype=np.int64)),
        rewards=kw.pop("rewards", np.linspace(0, 1, n, dtype=np.float32)),
        discounts=kw.pop("discounts", (np.arange(n) < n - 1).astype(np.float32)),
        terminated=kw.pop("terminated", True),
        truncated=kw.pop("truncated", False),
        metadata=kw.pop("metadata", {}),
        benchmark_id=bench,
        **kw,
    )


def _index(tree: Any, t: int) -> Any:
    if isinstance(tree, dict):
        return {k: _index(v, t) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_index(v, t) for v in tree))
    if isinstance(tree, list | tuple):
        return type(tree)(_index(v, t) for v in tree)
    return np.asarray(tree)[t]


def _assert_tree_equal(a: Any, b: Any) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b)  # key order: sorted, like jax
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, tuple) and hasattr(a, "_fields"):
        assert type(b).__name__ == type(a).__name__ and b._fields == a._fields
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    else:
        x, y = np.asarray(a), np.asarray(b)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


# --------------------------------------------------------------------------------------------
# construction


def test_store_is_a_tupli_storage_with_a_readable_root(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "a" / "b")
    assert isinstance(store, TupliStorage)
    assert store.root == (tmp_path / "a" / "b").absolute()
    assert (store.root / "catalog.sqlite").is_file()
    assert str(store.root) in repr(store)
    assert FileStorage(storage_base_dir=tmp_path / "c").root == tmp_path / "c"
    with pytest.raises(AttributeError):
        store.root = tmp_path  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(store)).root == store.root


def test_bad_constructor_arguments(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(TupliStorageError, match="cannot open store"):
        FileStorage(tmp_path / "file")
    with pytest.raises(TupliStorageError, match="compression"):
        FileStorage(tmp_path / "s", compression="gzip")
    with pytest.raises(TupliStorageError, match="created_by"):
        FileStorage(tmp_path / "s", created_by="")


# --------------------------------------------------------------------------------------------
# benchmarks


def test_benchmark_store_load_list_dedup_publish_delete(store: FileStorage) -> None:
    first = store.store_benchmark(_query(hash="h1", name="one", seed=np.int64(3)))
    again = store.store_benchmark(_query(hash="h1", name="different name"))
    other = store.store_benchmark(_query(hash="h2", name="two"))
    assert again == first and other.id != first.id
    assert first.published_in == ["local_storage"] and first.created_by == "local_storage"
    loaded = store.load_benchmark(first.id)
    assert loaded.serialized == '{"env": 1}' and loaded.hash == "h1"
    assert loaded.metadata.name == "one" and loaded.metadata.extra == {"seed": 3}
    assert [b.id for b in store.list_benchmarks()] == [first.id, other.id]
    assert [b.id for b in store.list_benchmarks(FilterEQ(key="metadata.name", value="two"))] == [
        other.id
    ]
    store.publish_benchmark(first.id, "team")
    store.publish_benchmark(first.id, "team")
    assert store.load_benchmark(first.id).published_in == ["local_storage", "team"]
    store.unpublish_benchmark(first.id, "local_storage")
    assert store.list_benchmarks()[0].published_in == ["team"]
    store.delete_benchmark(first.id)
    assert [b.id for b in store.list_benchmarks()] == [other.id]
    with pytest.raises(TupliStorageError, match="not found"):
        store.load_benchmark(first.id)


def test_unknown_ids_name_the_id_and_the_store(store: FileStorage) -> None:
    uid = uuid.uuid4().hex
    root = re.escape(str(store.root))
    calls = {
        "benchmark": [store.load_benchmark, store.delete_benchmark, store.publish_benchmark],
        "artifact": [store.load_artifact, store.delete_artifact, store.publish_artifact],
        "episode": [store.load_episode, store.delete_episode, store.publish_episode],
    }
    for what, fns in calls.items():
        for fn in fns:
            with pytest.raises(
                TupliStorageError, match=f"{what} '{uid}' not found in store '{root}'"
            ):
                fn(uid)
    for fn in (store.unpublish_benchmark, store.unpublish_artifact, store.unpublish_episode):
        with pytest.raises(TupliStorageError, match="not found"):
            fn(uid, "global")


HOSTILE_IDS: list[Any] = [
    "../x",
    "../../etc/passwd",
    "/etc/passwd",
    "a\x00b",
    "x' OR '1'='1",
    "..",
    "",
    "a" * 65,
    "shards/../x",
    "a.arrow",
    3,
    None,
    b"abc",
]


def test_hostile_ids_are_refused_and_nothing_is_created_outside_root(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "store")
    bench = store.store_benchmark(_query()).id
    header = store.record_episode(_episode(bench))
    art = store.store_artifact(b"x", ArtifactMetadata(name="a"))
    before = _files(tmp_path)
    methods = [
        store.load_benchmark,
        store.delete_benchmark,
        store.publish_benchmark,
        store.load_artifact,
        store.delete_artifact,
        store.publish_artifact,
        store.load_episode,
        store.delete_episode,
        store.publish_episode,
        lambda u: store.unpublish_benchmark(u, "g"),
        lambda u: store.unpublish_artifact(u, "g"),
        lambda u: store.unpublish_episode(u, "g"),
        lambda u: store.delete_episodes([u]),
        lambda u: store.record_episode(_episode(u)),
    ]
    for bad in HOSTILE_IDS:
        for method in methods:
            with pytest.raises(TupliStorageError):
                method(bad)
    assert _files(tmp_path) == before
    assert [h.id for h in store.list_episodes()] == [header.id]
    assert [a.id for a in store.list_artifacts()] == [art.id]
    assert store.verify() == []


def test_bad_group_names_are_refused(store: FileStorage, bench: str) -> None:
    for bad in ("", None, 3):
        with pytest.raises(TupliStorageError, match="group"):
            store.publish_benchmark(bench, bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# artifacts


def test_artifacts_store_load_dedup_list_publish_delete(store: FileStorage) -> None:
    item = store.store_artifact(b"a,b\n1,2\n", ArtifactMetadata(name="table", extra={"k": 1}))
    same = store.store_artifact(bytearray(b"a,b\n1,2\n"), ArtifactMetadata(name="other name"))
    other = store.store_artifact(b"\x00\x01", ArtifactMetadata(name="bin", benchmark_id="b1"))
    assert same == item and other.id != item.id
    assert item.hash == hashlib.sha256(b"a,b\n1,2\n").hexdigest()
    assert store.load_artifact(item.id) == b"a,b\n1,2\n"
    assert store.load_artifact(other.id, encoding="ignored") == b"\x00\x01"
    assert [a.id for a in store.list_artifacts()] == [item.id, other.id]
    assert [a.id for a in store.list_artifacts(FilterEQ(key="extra.k", value=1))] == [item.id]
    store.publish_artifact(other.id, "g")
    assert store.list_artifacts(FilterEQ(key="id", value=other.id))[0].published_in == [
        "local_storage",
        "g",
    ]
    store.unpublish_artifact(other.id, "g")
    assert store.list_artifacts()[1].published_in == ["local_storage"]
    store.delete_artifact(item.id)
    assert not (store.root / "artifacts" / item.id).exists()
    assert [a.id for a in store.list_artifacts()] == [other.id]
    with pytest.raises(TupliStorageError, match="bytes"):
        store.store_artifact("text", ArtifactMetadata(name="t"))  # type: ignore[arg-type]
    assert store.verify() == []


def test_damaged_or_missing_artifact(store: FileStorage) -> None:
    item = store.store_artifact(b"payload", ArtifactMetadata(name="a"))
    path = store.root / "artifacts" / item.id
    path.write_bytes(b"paylaod")
    with pytest.raises(TupliStorageError, match="damaged"):
        store.load_artifact(item.id)
    assert any("damaged artifact" in p and item.id in p for p in store.verify())
    path.unlink()
    with pytest.raises(TupliStorageError, match="missing"):
        store.load_artifact(item.id)
    assert any("missing" in p and item.id in p for p in store.verify())


# --------------------------------------------------------------------------------------------
# episodes: round trips


def _zoo(n: int) -> dict[str, Any]:
    rng = np.random.default_rng(n)
    rows = n + 1
    return {
        "nested dict": {
            "a": {"b": rng.normal(size=(rows, 2)).astype(np.float32)},
            "c": np.arange(rows, dtype=np.int32),
        },
        "namedtuple": Pos(row=np.arange(rows, dtype=np.int32), col=np.arange(rows) % 3 == 0),
        "image": rng.integers(0, 256, (rows, 8, 8, 3), dtype=np.uint8),
        "bool": np.arange(rows) % 2 == 0,
        "int": np.arange(rows, dtype=np.int64) * 7,
        "float64 scalar": rng.normal(size=rows),
        "tuple and list": (np.zeros(rows, np.float16), [np.ones((rows, 1), np.uint16)]),
    }


@pytest.mark.parametrize("kind", list(_zoo(1)))
def test_episode_data_round_trip(store: FileStorage, bench: str, kind: str) -> None:
    n = 4
    obs = _zoo(n)[kind]
    actions = {"move": np.arange(n, dtype=np.int32), "force": np.ones((n, 2), np.float64)}
    extras = {"logp": np.linspace(-1, 0, n, dtype=np.float32)}
    episode = _episode(
        bench,
        n,
        obs,
        actions=actions,
        extras=extras,
        terminated=False,
        truncated=True,
        discounts=np.ones(n, np.float32),
        metadata={"kind": kind},
    )
    header = store.record_episode(episode)
    assert isinstance(header, EpisodeHeader)
    assert (header.n_tuples, header.terminated, header.timeout, header.truncated) == (
        n,
        False,
        True,
        True,
    )
    assert header.episode_return == pytest.approx(float(np.sum(episode.rewards)))
    loaded = store.load_episode(header.id)
    _assert_tree_equal(loaded.observations, obs)
    _assert_tree_equal(loaded.actions, actions)
    _assert_tree_equal(loaded.extras, extras)
    _assert_tree_equal(loaded.rewards, episode.rewards)
    _assert_tree_equal(loaded.discounts, episode.discounts)
    assert (loaded.terminated, loaded.truncated, loaded.has_reset_observation) == (
        False,
        True,
        True,
    )
    assert (loaded.id, loaded.benchmark_id, loaded.metadata) == (header.id, bench, {"kind": kind})
    # pytupli's tuple view: tuple t holds the observation returned by step t (obs[t + 1])
    (item,) = store.list_episodes(FilterEQ(key="id", value=header.id), include_tuples=True)
    assert isinstance(item, EpisodeItem) and item.n_tuples == n
    for t, tup in enumerate(item.tuples):
        assert tup.state == to_builtin(_index(obs, t + 1))
        assert tup.action == to_builtin(_index(actions, t))
        assert tup.reward == pytest.approx(float(episode.rewards[t]))
        assert (tup.terminal, tup.timeout) == (False, t == n - 1)


def test_pytupli_episode_round_trip_via_tuples(store: FileStorage, bench: str) -> None:
    tuples = [
        RLTuple(state=[0.5, 1.0], action=1, reward=1.0, info={"step": 0}),
        RLTuple(state=[0.25, 2.0], action=0, reward=-0.5, info={}),
        RLTuple(state=[0.0, 3.0], action=1, reward=2.0, info={"x": [1, 2]}, terminal=True),
    ]
    header = store.record_episode(Episode(benchmark_id=bench, metadata={"m": 1}, tuples=tuples))
    assert (header.n_tuples, header.terminated, header.timeout) == (3, True, False)
    assert header.episode_return == 2.5
    (item,) = store.list_episodes(include_tuples=True)
    assert item.tuples == tuples
    assert (item.benchmark_id, item.metadata, item.id) == (bench, {"m": 1}, header.id)
    loaded = store.load_episode(header.id)
    assert loaded.has_reset_observation is False
    np.testing.assert_array_equal(loaded.observations, [[0.5, 1.0], [0.25, 2.0], [0.0, 3.0]])
    np.testing.assert_array_equal(loaded.discounts, [1, 1, 0])
    assert loaded.infos == [{"step": 0}, {}, {"x": [1, 2]}]


def test_pytupli_dict_states_and_timeouts(store: FileStorage, bench: str) -> None:
    tuples = [
        RLTuple(state={"pos": [1, 2], "hp": 3}, action=[0.5], reward=0.0),
        RLTuple(state={"pos": [2, 2], "hp": 2}, action=[1.5], reward=1.0, timeout=True),
    ]
    header = store.record_episode(Episode(benchmark_id=bench, metadata={}, tuples=tuples))
    assert (header.terminated, header.timeout, header.truncated) == (False, True, True)
    assert store.list_episodes(include_tuples=True)[0].tuples == tuples
    loaded = store.load_episode(header.id)
    np.testing.assert_array_equal(loaded.observations["pos"], [[1, 2], [2, 2]])
    assert loaded.observations["hp"].dtype == np.int64
    np.testing.assert_array_equal(loaded.discounts, [1, 1])


def test_episodes_of_the_installed_pytupli_schema_are_accepted(
    store: FileStorage, bench: str
) -> None:
    pytupli_schema = pytest.importorskip("pytupli.schema")
    tuples = [pytupli_schema.RLTuple(state=[1.0], action=0, reward=1.0, terminal=True)]
    episode = pytupli_schema.Episode(benchmark_id=bench, metadata={"a": 1}, tuples=tuples)
    header = store.record_episode(episode)
    assert store.list_episodes(include_tuples=True)[0].tuples[0].state == [1.0]
    assert header.metadata == {"a": 1}


def test_metadata_types_are_kept(store: FileStorage, bench: str) -> None:
    meta = {
        "i": 1,
        "f": 1.0,
        "b": True,
        "n": None,
        "s": "x",
        "nested": {"l": [1, 2.0, "x", None, {"d": False}]},
        "np": {"f32": np.float32(0.5), "i64": np.int64(-3), "arr": np.arange(2)},
    }
    expected = {**meta, "np": {"f32": 0.5, "i64": -3, "arr": [0, 1]}}
    header = store.record_episode(_episode(bench, metadata=meta))
    for got in (
        header.metadata,
        store.list_episodes()[0].metadata,
        store.load_episode(header.id).metadata,
    ):
        assert got == expected
        assert type(got["i"]) is int and type(got["f"]) is float and type(got["b"]) is bool
        assert type(got["np"]["i64"]) is int and type(got["np"]["f32"]) is float


# --------------------------------------------------------------------------------------------
# episodes: batches, validation, all-or-nothing


def test_batches_keep_input_order_across_structures(store: FileStorage, bench: str) -> None:
    image = {"img": np.zeros((3, 2, 2), np.uint8)}
    batch = [
        _episode(bench, 3, metadata={"i": 0}),
        _episode(bench, 2, image, metadata={"i": 1}),
        _episode(bench, 5, metadata={"i": 2}),
    ]
    headers = store.record_episodes(batch)
    assert [h.metadata["i"] for h in headers] == [0, 1, 2]
    assert [h.n_tuples for h in headers] == [3, 2, 5]
    assert [h.id for h in store.list_episodes()] == [h.id for h in headers]
    assert len(list((store.root / "shards").iterdir())) == 2
    for header, episode in zip(headers, batch, strict=True):
        _assert_tree_equal(store.load_episode(header.id).observations, episode.observations)
    assert store.record_episodes([]) == []


def _bad_batches(bench: str) -> dict[str, list[Any]]:
    good = _episode(bench)
    return {
        "length mismatch": [good, _episode(bench, 3, actions=np.zeros(4, np.int64))],
        "observation rows": [good, _episode(bench, 3, np.zeros((3, 2), np.float32))],
        "empty episode": [good, _episode(bench, 0, np.zeros((1, 2), np.float32))],
        "empty tuples": [good, Episode(benchmark_id=bench, metadata={}, tuples=[])],
        "unknown benchmark": [good, _episode(uuid.uuid4().hex)],
        "bad metadata": [good, _episode(bench, metadata={"x": object()})],
        "not an episode": [good, {"observations": []}],
        "ragged states": [
            good,
            Episode(
                benchmark_id=bench,
                metadata={},
                tuples=[
                    RLTuple(state=[1], action=0, reward=0),
                    RLTuple(state=[1, 2], action=0, reward=0),
                ],
            ),
        ],
        "object dtype": [good, _episode(bench, 1, np.array([None, None], dtype=object))],
    }


@pytest.mark.parametrize("case", list(_bad_batches("x")))
def test_a_bad_episode_rejects_the_whole_batch(store: FileStorage, bench: str, case: str) -> None:
    batch = _bad_batches(bench)[case]
    with pytest.raises(TupliStorageError):
        store.record_episodes(batch)
    assert store.list_episodes() == []
    assert list((store.root / "shards").iterdir()) == []
    assert list((store.root / "staging").iterdir()) == []
    assert store.verify() == []


def test_record_episodes_wants_a_list(store: FileStorage, bench: str) -> None:
    with pytest.raises(TupliStorageError, match="record_episode"):
        store.record_episodes(_episode(bench))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# idempotent batches (batch_id)


def _shard_count(store: FileStorage) -> int:
    return len(list((store.root / "shards").iterdir()))


def _mixed_batch(bench: str) -> list[EpisodeData]:
    """Three episodes, the middle one with another structure (so it lands in another shard)."""
    image = {"img": np.arange(12, dtype=np.uint8).reshape(3, 2, 2)}
    return [
        _episode(bench, 3, metadata={"i": 0}),
        _episode(bench, 2, image, metadata={"i": 1}),
        _episode(bench, 4, metadata={"i": 2}),
    ]


def test_a_batch_id_makes_recording_idempotent(store: FileStorage, bench: str) -> None:
    assert not store.has_batch("job:chunk:0")
    first = store.record_episodes(_mixed_batch(bench), batch_id="job:chunk:0")
    assert store.has_batch("job:chunk:0") and not store.has_batch("job:chunk:1")
    assert [h.metadata["i"] for h in first] == [0, 1, 2]
    shards = _shard_count(store)
    assert shards == 2
    again = store.record_episodes(_mixed_batch(bench), batch_id="job:chunk:0")
    assert [h.model_dump() for h in again] == [h.model_dump() for h in first]
    assert [h.id for h in store.list_episodes()] == [h.id for h in first]
    assert _shard_count(store) == shards
    assert list((store.root / "staging").iterdir()) == []
    # a later batch is appended after it, and a reopened store still knows the batch
    second = store.record_episodes([_episode(bench, 1)], batch_id="job:chunk:1")
    reopened = FileStorage(store.root)
    assert reopened.has_batch("job:chunk:0") and reopened.has_batch("job:chunk:1")
    replay = reopened.record_episodes(_mixed_batch(bench), batch_id="job:chunk:0")
    assert [h.id for h in replay] == [h.id for h in first]
    assert [h.id for h in reopened.list_episodes()] == [h.id for h in first + second]
    assert reopened.verify() == []


def test_an_empty_batch_is_committed_with_no_episode(store: FileStorage, bench: str) -> None:
    assert store.record_episodes([], batch_id="job:chunk:7") == []
    assert store.has_batch("job:chunk:7")
    assert store.record_episodes([], batch_id="job:chunk:7") == []
    assert store.list_episodes() == [] and _shard_count(store) == 0
    with pytest.raises(TupliStorageError, match=r"job:chunk:7.*0 episodes"):
        store.record_episodes([_episode(bench)], batch_id="job:chunk:7")
    assert store.list_episodes() == []
    assert store.verify() == []


def test_without_a_batch_id_the_same_episodes_are_stored_twice(
    store: FileStorage, bench: str
) -> None:
    a = store.record_episodes([_episode(bench)])
    b = store.record_episodes([_episode(bench)])
    assert a[0].id != b[0].id and len(store.list_episodes()) == 2


@pytest.mark.parametrize(
    "batch_id", ["", "a" * 129, "a/b", "../x", "a b", "ch\u00e9", "x;DROP", "new\nline", 5, b"ab"]
)
def test_bad_batch_ids_are_refused(store: FileStorage, bench: str, batch_id: Any) -> None:
    with pytest.raises(TupliStorageError, match="batch id"):
        store.record_episodes([_episode(bench)], batch_id=batch_id)
    with pytest.raises(TupliStorageError, match="batch id"):
        store.has_batch(batch_id)
    assert store.list_episodes() == [] and _shard_count(store) == 0


def test_the_longest_batch_id_and_every_allowed_character(store: FileStorage, bench: str) -> None:
    for batch_id in ("a" * 128, "AZaz09_.:-"):
        store.record_episodes([_episode(bench)], batch_id=batch_id)
        assert store.has_batch(batch_id)
    assert len(store.list_episodes()) == 2


@pytest.mark.parametrize("change", ["fewer", "more", "other lengths"])
def test_a_batch_id_names_one_batch(store: FileStorage, bench: str, change: str) -> None:
    first = store.record_episodes(_mixed_batch(bench), batch_id="b")
    other = {
        "fewer": _mixed_batch(bench)[:2],
        "more": [*_mixed_batch(bench), _episode(bench)],
        "other lengths": [_episode(bench, 3), _episode(bench, 2), _episode(bench, 5)],
    }[change]
    with pytest.raises(TupliStorageError, match=r"batch 'b' is already committed.*new batch id"):
        store.record_episodes(other, batch_id="b")
    assert [h.id for h in store.list_episodes()] == [h.id for h in first]
    assert _shard_count(store) == 2


def test_a_failed_batch_is_not_committed_and_can_be_retried(store: FileStorage, bench: str) -> None:
    bad = [_episode(bench), _episode(bench, metadata={"x": object()})]
    with pytest.raises(TupliStorageError):
        store.record_episodes(bad, batch_id="job:chunk:0")
    assert not store.has_batch("job:chunk:0")
    with pytest.raises(TupliStorageError, match="benchmark"):
        store.record_episodes([_episode(uuid.uuid4().hex)], batch_id="job:chunk:0")
    assert not store.has_batch("job:chunk:0") and store.list_episodes() == []
    headers = store.record_episodes([_episode(bench), _episode(bench, 2)], batch_id="job:chunk:0")
    assert [h.n_tuples for h in headers] == [3, 2] and store.has_batch("job:chunk:0")


def test_a_replay_leaves_out_episodes_deleted_since(store: FileStorage, bench: str) -> None:
    first = store.record_episodes(_mixed_batch(bench), batch_id="b")
    store.delete_episode(first[1].id)
    replay = store.record_episodes(_mixed_batch(bench), batch_id="b")
    assert [h.id for h in replay] == [first[0].id, first[2].id]
    assert len(store.list_episodes()) == 2


def test_pytupli_tuple_episodes_with_a_batch_id(store: FileStorage, bench: str) -> None:
    def batch() -> list[Episode]:
        tuples = [RLTuple(state=[float(t)], action=t, reward=1.0) for t in range(3)]
        return [Episode(benchmark_id=bench, metadata={"k": 1}, tuples=tuples)]

    first = store.record_episodes(batch(), batch_id="tuples")
    assert store.record_episodes(batch(), batch_id="tuples") == first
    assert len(store.list_episodes()) == 1


_BATCH_IDS = ["c:0", "c:1", "c:2", "c:3"]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from([*_BATCH_IDS, None]), st.integers(0, 3)), min_size=1, max_size=8
    )
)
def test_batches_are_stored_once_whatever_the_repeats(
    tmp_path: Path, ops: list[tuple[str | None, int]]
) -> None:
    """Model: a committed batch id keeps its first episodes; a batch without id always adds."""
    store = FileStorage(tmp_path / uuid.uuid4().hex)
    bench = store.store_benchmark(_query()).id
    first_size: dict[str, int] = {}
    expected: list[str] = []
    for batch_id, size in ops:
        if batch_id is not None and batch_id in first_size:
            size = first_size[batch_id]  # a repeat passes the same episodes
        batch = [_episode(bench, 1 + j % 3, metadata={"b": batch_id, "j": j}) for j in range(size)]
        headers = store.record_episodes(batch, batch_id=batch_id)
        assert [h.metadata for h in headers] == [e.metadata for e in batch]
        if batch_id is None or batch_id not in first_size:
            expected.extend(h.id for h in headers)
        if batch_id is not None:
            first_size.setdefault(batch_id, size)
        assert [h.id for h in store.list_episodes()] == expected
    assert all(store.has_batch(b) == (b in first_size) for b in _BATCH_IDS)
    assert store.verify() == []
    store.close()


def test_processes_racing_with_one_batch_id_store_one_batch(store: FileStorage, bench: str) -> None:
    start_at = str(time.time() + 4.0)  # after every writer has imported and opened the store
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), "batch", str(store.root), bench, "race:0", start_at],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(3)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        outputs.append(json.loads(out))
    headers = store.list_episodes()
    assert len(headers) == 4 and [h.metadata["race"] for h in headers] == [0, 1, 2, 3]
    assert all(ids == [h.id for h in headers] for ids in outputs)
    assert _shard_count(store) == 1
    assert store.verify() == []


# --------------------------------------------------------------------------------------------
# delete, publish


def test_delete_episode_removes_an_emptied_shard(store: FileStorage, bench: str) -> None:
    a, b = store.record_episodes([_episode(bench), _episode(bench, 2)])
    (shard,) = (store.root / "shards").iterdir()
    store.delete_episode(a.id)
    assert shard.exists() and [h.id for h in store.list_episodes()] == [b.id]
    assert store.load_episode(b.id).length == 2
    with pytest.raises(TupliStorageError, match="not found"):
        store.load_episode(a.id)
    store.delete_episode(b.id)
    assert not shard.exists() and store.list_episodes() == []
    assert store.verify() == []


def test_delete_episodes_is_all_or_nothing(store: FileStorage, bench: str) -> None:
    headers = store.record_episodes([_episode(bench) for _ in range(3)])
    with pytest.raises(TupliStorageError, match="not found"):
        store.delete_episodes([headers[0].id, uuid.uuid4().hex])
    assert len(store.list_episodes()) == 3
    store.delete_episodes([h.id for h in headers[:2]])
    assert [h.id for h in store.list_episodes()] == [headers[2].id]


def test_delete_benchmark_keeps_its_episodes(store: FileStorage, bench: str) -> None:
    header = store.record_episode(_episode(bench))
    store.delete_benchmark(bench)
    assert store.list_benchmarks() == []
    assert [h.id for h in store.list_episodes()] == [header.id]
    with pytest.raises(TupliStorageError, match="benchmark"):
        store.record_episode(_episode(bench))


def test_publish_and_unpublish_episode(store: FileStorage, bench: str) -> None:
    header = store.record_episode(_episode(bench))
    store.publish_episode(header.id)
    store.publish_episode(header.id, "team")
    assert store.list_episodes()[0].published_in == ["local_storage", "global", "team"]
    assert [
        h.id
        for h in store.list_episodes(
            FilterEQ(key="published_in", value=["local_storage", "global", "team"])
        )
    ] == [header.id]
    store.unpublish_episode(header.id, "global")
    store.unpublish_episode(header.id, "never there")
    assert store.list_episodes()[0].published_in == ["local_storage", "team"]


def test_created_by_and_compression_options(tmp_path: Path) -> None:
    for compression in ("zstd", None):
        store = FileStorage(tmp_path / str(compression), compression=compression, created_by="me")
        bench = store.store_benchmark(_query())
        assert bench.created_by == "me" and bench.published_in == ["me"]
        obs = _zoo(3)["image"]
        header = store.record_episode(_episode(bench.id, 3, obs))
        assert header.created_by == "me"
        _assert_tree_equal(store.load_episode(header.id).observations, obs)


def test_episode_locations_agree_with_load_episode(store: FileStorage, bench: str) -> None:
    image = {"img": np.arange(4 * 4, dtype=np.uint8).reshape(4, 2, 2)}
    headers = store.record_episodes(
        [_episode(bench, 3, metadata={"k": 0}), _episode(bench, 3, image, metadata={"k": 1})]
    )
    store.record_episode(
        Episode(
            benchmark_id=bench,
            metadata={"k": 2},
            tuples=[RLTuple(state=[1.0, 2.0], action=0, reward=1.0)],
        )
    )
    loc = store._episode_locations()
    assert len(loc) == 3 and loc.ids[:2] == [h.id for h in headers]
    np.testing.assert_array_equal(loc.n_tuples, [3, 3, 1])
    np.testing.assert_array_equal(loc.has_reset, [True, True, False])
    assert loc.shard_index.dtype == np.int64 and len(loc.shard_paths) == 3
    for i, eid in enumerate(loc.ids):
        shard = open_shard(
            loc.shard_paths[loc.shard_index[i]], loc.shard_checksums[loc.shard_index[i]]
        )
        episode = shard.episode(int(loc.row_start[i]), int(loc.row_stop[i]), int(loc.n_tuples[i]))
        _assert_tree_equal(episode.observations, store.load_episode(eid).observations)
    only = store._episode_locations(FilterEQ(key="metadata.k", value=1))
    assert only.ids == [headers[1].id] and len(only.shard_paths) == 1
    assert only.shard_paths[0] == loc.shard_paths[loc.shard_index[1]]
    none = store._episode_locations(FilterEQ(key="metadata.k", value=7))
    assert len(none) == 0 and none.shard_paths == [] and none.row_start.shape == (0,)


def test_episode_locations_in_catalog_order_over_interleaved_benchmarks_and_shards(
    store: FileStorage, bench: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = store.store_benchmark(_query(hash="h-other")).id
    image = {"img": np.zeros((3, 2, 2), np.uint8)}
    for k in range(4):  # each batch: two benchmarks and two structures (two shards), interleaved
        store.record_episodes(
            [
                _episode(bench, k + 1, metadata={"k": k, "i": 0}),
                _episode(other, 2, image, metadata={"k": k, "i": 1}, terminated=False,
                         truncated=True),
                _episode(other, k + 2, metadata={"k": k, "i": 2}),
            ]
        )  # fmt: skip
    store.record_episode(
        Episode(benchmark_id=bench, metadata={"k": 9}, tuples=[RLTuple(state=[1.0, 2.0], action=0,
                reward=1.0, terminal=True)])
    )  # fmt: skip
    headers = store.list_episodes()
    store.delete_episodes([headers[1].id, headers[5].id])  # gaps in rids
    filters = [
        None,
        FilterEQ(key="benchmark_id", value=other),
        FilterIN(key="benchmark_id", value=[other, bench]),
        FilterEQ(key="metadata.i", value=2),
        FilterGEQ(key="metadata.k", value=1) & FilterLT(key="metadata.k", value=3),
        FilterEQ(key="benchmark_id", value=bench) & FilterEQ(key="metadata.k", value=9),
    ]
    from tupli_jax.storage import _locations

    for chunk in (1 << 20, 2):  # 2: one query per two rids, as for a huge store
        monkeypatch.setattr(_locations, "_RIDS_PER_QUERY", chunk)
        for f in filters:
            expected = store.list_episodes(f)
            loc = store._episode_locations(f)
            assert loc.ids == [h.id for h in expected], (chunk, f)
            assert loc.benchmark_ids == [h.benchmark_id for h in expected]
            np.testing.assert_array_equal(loc.n_tuples, [h.n_tuples for h in expected])
            np.testing.assert_array_equal(loc.terminated, [h.terminated for h in expected])
            np.testing.assert_array_equal(loc.truncated, [h.truncated for h in expected])
            for i, eid in enumerate(loc.ids):
                path = loc.shard_paths[loc.shard_index[i]]
                shard = open_shard(path, loc.shard_checksums[loc.shard_index[i]])
                start, stop = int(loc.row_start[i]), int(loc.row_stop[i])
                episode = shard.episode(start, stop, int(loc.n_tuples[i]))
                _assert_tree_equal(episode.observations, store.load_episode(eid).observations)
                assert bool(loc.has_reset[i]) == (stop - start == int(loc.n_tuples[i]) + 1)


def test_episode_locations_refuse_an_episode_in_an_unlisted_shard(
    store: FileStorage, bench: str
) -> None:
    import sqlite3

    header = store.record_episode(_episode(bench, 3))
    with sqlite3.connect(store.root / "catalog.sqlite") as conn:
        conn.execute("DELETE FROM shards")
    conn.close()
    with pytest.raises(TupliStorageError, match="run verify"):
        store._episode_locations()
    with pytest.raises(TupliStorageError, match=header.id):
        store.load_episode(header.id)
    assert any("missing from the catalog" in p for p in store.verify())


def test_new_ids_are_unique_time_ordered_uuid7_hex(store: FileStorage, bench: str) -> None:
    first = store.record_episodes([_episode(bench, 2)] * 300)
    time.sleep(0.002)
    second = store.record_episodes([_episode(bench, 2)] * 3)
    ids = [h.id for h in first + second]
    assert len(set(ids)) == len(ids)
    for eid in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", eid), eid
        parsed = uuid.UUID(hex=eid)
        assert parsed.version == 7 and parsed.variant == uuid.RFC_4122
    assert ids[:300] == sorted(ids[:300]) and max(ids[:300]) < min(ids[300:])
    millis = int(ids[0][:12], 16)
    assert abs(millis / 1000 - time.time()) < 60  # the prefix is the Unix time in ms
    assert [h.id for h in store.list_episodes()] == ids


class _Subclass(np.ndarray):
    """An ndarray subclass (as a user's array type might be)."""


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rewards=st.lists(
        st.tuples(
            st.integers(1, 300),
            st.sampled_from([np.float32, np.float64, np.int32, np.bool_]),
            st.integers(0, 2**32 - 1),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_returns_equal_the_episode_data_property_bit_for_bit(
    store: FileStorage, bench: str, rewards: list[tuple[int, Any, int]]
) -> None:
    episodes = []
    for n, dtype, seed in rewards:
        values = np.random.default_rng(seed).normal(0, 1e3, n)
        if seed % 7 == 0 and dtype in (np.float32, np.float64):
            values[n // 2] = np.nan
        episodes.append(_episode(bench, n, rewards=values.astype(dtype)))
    if len(episodes) > 1:  # an ndarray subclass takes the per-episode path
        episodes[-1].rewards = episodes[-1].rewards.view(_Subclass)
    written = store.record_episodes(episodes)
    listed = {h.id: h for h in store.list_episodes()}
    for episode, header in zip(episodes, written, strict=True):
        expected = episode.episode_return
        for got in (header.episode_return, listed[header.id].episode_return):
            assert (math.isnan(got) and math.isnan(expected)) or got == expected


def test_catalog_version_changes_with_every_commit_from_anywhere(
    store: FileStorage, bench: str, tmp_path: Path
) -> None:
    v0 = store.catalog_version()
    assert store.catalog_version() == v0
    store.list_episodes()
    store.verify()  # takes the write lock, changes nothing
    assert store.catalog_version() == v0
    header = store.record_episode(_episode(bench, 2))
    v1 = store.catalog_version()
    assert v1 != v0
    other = FileStorage(store.root)  # another connection of this process
    other.publish_episode(header.id, "team")
    v2 = store.catalog_version()
    assert v2 not in (v0, v1)
    assert other.catalog_version() != v0
    root = str(store.root)
    _run_writers([["episodes", root, bench, "p", "1", "1"]])  # another process
    v3 = store.catalog_version()
    assert v3 not in (v0, v1, v2)
    with pytest.raises(TupliStorageError):
        store.record_episodes([_episode(bench, 2), _episode("unknown-benchmark", 2)])
    assert store.catalog_version() == v3  # nothing was committed
    store.close()  # a new connection restarts data_version: tokens never repeat
    assert store.catalog_version() not in (v0, v1, v2, v3)


def test_synchronous_modes(tmp_path: Path) -> None:
    for mode, level in (("full", 2), ("normal", 1)):
        store = FileStorage(tmp_path / mode, synchronous=mode)
        assert store._catalog.query("PRAGMA synchronous") == [(level,)]
        bench = store.store_benchmark(_query()).id
        header = store.record_episode(_episode(bench, 2))
        reopened = pickle.loads(pickle.dumps(store))
        assert reopened._catalog.query("PRAGMA synchronous") == [(level,)]
        assert reopened.load_episode(header.id).length == 2
    with pytest.raises(TupliStorageError, match="synchronous"):
        FileStorage(tmp_path / "bad", synchronous="off")


def test_threads_share_one_store(store: FileStorage, bench: str) -> None:
    errors: list[BaseException] = []

    def write(tag: int) -> None:
        try:
            for k in range(5):
                store.record_episodes([_episode(bench, metadata={"t": tag, "k": k})] * 2)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(store.list_episodes()) == 40
    assert store.verify() == []


# --------------------------------------------------------------------------------------------
# damage, orphans, recovery


def test_damaged_shard_raises_on_load_and_verify_reports_it(store: FileStorage, bench: str) -> None:
    header = store.record_episode(_episode(bench, 30))
    assert store.load_episode(header.id).length == 30  # also fills the shard cache
    (shard,) = (store.root / "shards").iterdir()
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TupliStorageError, match="damaged"):
        store.load_episode(header.id)
    with pytest.raises(TupliStorageError):
        store.list_episodes(include_tuples=True)
    problems = store.verify()
    assert any("damaged shard" in p and shard.name in p for p in problems), problems
    shard.unlink()
    with pytest.raises(TupliStorageError, match="missing"):
        store.load_episode(header.id)
    assert any("missing shard" in p and shard.name in p for p in store.verify())
    assert [h.id for h in store.list_episodes()] == [header.id]  # listing never opens shards


def test_orphans_and_dead_writer_leftovers_are_reported_then_removed_on_open(
    store: FileStorage, bench: str
) -> None:
    header = store.record_episode(_episode(bench))
    (shard,) = (store.root / "shards").iterdir()
    orphan = store.root / "shards" / f"{uuid.uuid4().hex}.arrow"
    orphan.write_bytes(shard.read_bytes())
    dead_pid = (
        int(Path("/proc/sys/kernel/pid_max").read_text())
        if Path("/proc/sys/kernel/pid_max").exists()
        else 4194303
    )  # pids are always below pid_max: no process has this one
    stale = store.root / "staging" / f"{dead_pid}-{uuid.uuid4().hex}"
    stale.mkdir()
    (stale / "x.arrow.tmp").write_bytes(b"partial")
    live = store.root / "staging" / f"{os.getppid()}-{uuid.uuid4().hex}"  # a live process
    live.mkdir()
    reused = store.root / "staging" / f"{os.getpid()}-{uuid.uuid4().hex}"  # our pid, not ours
    reused.mkdir()
    orphan_artifact = store.root / "artifacts" / uuid.uuid4().hex
    orphan_artifact.write_bytes(b"x")
    unrelated = store.root / "shards" / "README.txt"
    unrelated.write_text("not ours")
    problems = store.verify()
    assert any("orphan shard" in p and orphan.name in p for p in problems), problems
    assert any("stale staging" in p and stale.name in p for p in problems), problems
    assert any("orphan artifact" in p for p in problems), problems
    assert not any(live.name in p for p in problems)
    reopened = FileStorage(store.root)
    assert not orphan.exists() and not stale.exists() and not orphan_artifact.exists()
    assert not reused.exists()
    assert live.exists() and unrelated.exists() and shard.exists()
    assert reopened.verify() == []
    assert reopened.load_episode(header.id).length == 3


def test_verify_finds_catalog_rows_that_disagree_with_the_shard(
    store: FileStorage, bench: str
) -> None:
    import sqlite3

    header = store.record_episode(_episode(bench, 3))
    with sqlite3.connect(store.root / "catalog.sqlite") as conn:
        conn.execute(  # flags repeats row_stop - row_start - n_tuples (a CHECK keeps them equal)
            "UPDATE episodes SET row_stop = 99, flags = flags + 8 * (99 - row_stop) WHERE id = ?",
            (header.id,),
        )
    problems = store.verify()
    assert any("bad row range" in p and header.id in p for p in problems), problems
    with pytest.raises(TupliStorageError):
        store.load_episode(header.id)


# --------------------------------------------------------------------------------------------
# several processes


def _run_writers(args: list[list[str]]) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, str(WRITER), *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for a in args
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()


def test_two_processes_write_one_store_at_once(store: FileStorage, bench: str) -> None:
    root = str(store.root)
    _run_writers([["episodes", root, bench, tag, "8", "5"] for tag in ("p1", "p2")])
    headers = store.list_episodes()
    assert len(headers) == 80
    for tag in ("p1", "p2"):
        for k in range(8):
            f = FilterEQ(key="metadata.writer", value=tag) & FilterEQ(key="metadata.batch", value=k)
            assert len(store.list_episodes(f)) == 5
    for header in headers[::7]:
        assert store.load_episode(header.id).length == header.n_tuples
    assert store.verify() == []


def test_two_processes_storing_the_same_hashes_yield_one_benchmark_each(tmp_path: Path) -> None:
    root = tmp_path / "store"
    FileStorage(root)
    _run_writers([["benchmarks", str(root), "25"] for _ in range(3)])
    benchmarks = FileStorage(root).list_benchmarks()
    assert sorted(b.hash for b in benchmarks) == sorted(f"h{i}" for i in range(25))


@pytest.mark.parametrize("enabled_before", [True, False])
def test_no_gc_is_counted_across_threads(enabled_before: bool):
    """Overlapping no_gc blocks in two threads (tj.record's cut and store): the GC stays off
    until the last one exits, then is as it was before the first."""
    first_in, first_out, second_done = threading.Event(), threading.Event(), threading.Event()
    seen: list[bool] = []

    def first() -> None:
        with no_gc():
            first_in.set()
            first_out.wait(10)

    def second() -> None:
        first_in.wait(10)
        with no_gc():
            first_out.set()  # the first block exits while this one runs
            thread_a.join(10)
            seen.append(gc.isenabled())
        second_done.set()

    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        thread_a = threading.Thread(target=first)
        thread_b = threading.Thread(target=second)
        thread_a.start()
        thread_b.start()
        thread_b.join(10)
        assert second_done.is_set()
        assert seen == [False]
        assert gc.isenabled() is enabled_before
    finally:
        (gc.enable if was else gc.disable)()
