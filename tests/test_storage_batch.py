"""Tests of ``FileStorage.record_episode_batch`` (tupli_jax/storage/_episodes.py), the
``TupliStorage`` default of it, and ``FileStorage.add_read_barrier``; real SQLite and real files
on ``tmp_path``."""

from __future__ import annotations

import gc
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.dataset import TupliDataset
from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    ArtifactMetadataItem,
    BaseFilter,
    Benchmark,
    BenchmarkHeader,
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    FilterEQ,
    FilterGEQ,
)
from tupli_jax.storage import FileStorage, TupliStorage, TupliStorageError


class Agent(NamedTuple):
    """An importable NamedTuple observation node (shards store its class path)."""

    grid: np.ndarray  # uint8 [.., 3, 3]
    alive: np.ndarray  # bool [..]


# --------------------------------------------------------------------------------------------
# helpers


def _query(hash: str = "h") -> BenchmarkQuery:
    return BenchmarkQuery(hash=hash, serialized="{}", metadata=BenchmarkMetadata(name="b"))


@pytest.fixture
def bench(store: FileStorage) -> str:
    return store.store_benchmark(_query()).id


def _batch(
    lengths: Sequence[int],
    bench: str,
    *,
    seed: int = 0,
    terminated: Sequence[bool] | None = None,
    truncated: Sequence[bool] | None = None,
    metadata: list[dict[str, Any]] | None = None,
) -> EpisodeBatch:
    """A batch with a dict/NamedTuple observation of several dtypes, pytree actions, extras."""
    n = len(lengths)
    steps, rows = int(sum(lengths)), int(sum(lengths)) + n
    rng = np.random.default_rng(seed)
    return EpisodeBatch(
        observations={
            "agent": Agent(
                grid=rng.integers(0, 256, (rows, 3, 3), dtype=np.uint8),
                alive=rng.random(rows) < 0.5,
            ),
            "step": rng.integers(-(2**40), 2**40, rows, dtype=np.int64),
            "pos": rng.normal(size=(rows, 2)).astype(np.float32),
        },
        actions={
            "move": rng.integers(0, 4, steps, dtype=np.int32),
            "force": rng.normal(size=(steps, 2)).astype(np.float32),
        },
        rewards=rng.normal(size=steps).astype(np.float32),
        discounts=rng.random(steps).astype(np.float32),
        n_tuples=np.asarray(lengths, np.int64),
        terminated=np.asarray(terminated if terminated is not None else [True] * n, bool),
        truncated=np.asarray(truncated if truncated is not None else [False] * n, bool),
        benchmark_id=bench,
        metadata=metadata,
        extras={"logits": rng.normal(size=(steps, 4)).astype(np.float64)},
    )


def _assert_tree_equal(a: Any, b: Any) -> None:
    """Same containers (NamedTuple classes included), same dtypes, same values (dict keys in
    any order: a store returns them sorted, as JAX flattens them)."""
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for key in a:
            _assert_tree_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_tree_equal(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
        np.testing.assert_array_equal(a, b)


def _assert_episode_equal(got: EpisodeData, want: EpisodeData) -> None:
    _assert_tree_equal(got.observations, want.observations)
    _assert_tree_equal(got.actions, want.actions)
    _assert_tree_equal(got.extras, want.extras)
    _assert_tree_equal(got.rewards, want.rewards)
    _assert_tree_equal(got.discounts, want.discounts)
    assert got.terminated == want.terminated and got.truncated == want.truncated
    assert got.metadata == want.metadata and got.benchmark_id == want.benchmark_id
    assert got.has_reset_observation == want.has_reset_observation


def _header_fields(h: EpisodeHeader) -> tuple[Any, ...]:
    return (h.n_tuples, h.terminated, h.truncated, h.timeout, h.benchmark_id, h.metadata)


def _assert_nothing_stored(store: FileStorage) -> None:
    assert store.list_episodes() == []
    assert store.verify() == []
    assert list((store.root / "shards").iterdir()) == []
    assert list((store.root / "staging").iterdir()) == []


# --------------------------------------------------------------------------------------------
# round trip


def test_round_trip_matches_record_episodes(tmp_path: Path) -> None:
    lengths = [3, 1, 7, 2]
    a, b = FileStorage(tmp_path / "a"), FileStorage(tmp_path / "b")
    bench_a, bench_b = a.store_benchmark(_query()).id, b.store_benchmark(_query()).id
    meta = [{"seed": i, "tag": f"e{i}"} for i in range(4)]
    flags: dict[str, Any] = {
        "terminated": [True, False, False, True],
        "truncated": [False, True, False, False],
    }
    batch = _batch(lengths, bench_a, metadata=meta, **flags)
    headers = a.record_episode_batch(batch)
    eps = _batch(lengths, bench_b, metadata=meta, **flags).episodes()
    b.record_episodes(eps)

    assert [h.n_tuples for h in headers] == lengths
    assert [h.terminated for h in headers] == flags["terminated"]
    assert [h.truncated for h in headers] == flags["truncated"]
    assert [h.timeout for h in headers] == flags["truncated"]
    assert [h.metadata for h in headers] == meta
    assert {h.benchmark_id for h in headers} == {bench_a}
    sums = [float(np.sum(e.rewards, dtype=np.float64)) for e in batch.episodes()]
    assert [h.episode_return for h in headers] == pytest.approx(sums, rel=1e-9)
    assert [h.id for h in a.list_episodes()] == [h.id for h in headers]
    # the returned headers are the stored ones
    listed = {h.id: h for h in a.list_episodes()}
    for h in headers:
        assert listed[h.id].model_dump() == h.model_dump()

    loaded = a.load_episode(headers[2].id)
    assert isinstance(loaded.observations["agent"], Agent)
    _assert_episode_equal(loaded, batch.episode(2))
    assert loaded.id == headers[2].id

    # the other store holds bench_b: compare all views with the benchmark ids aside
    for h in b.list_episodes():
        assert h.benchmark_id == bench_b
    data = TupliDataset(a).to_numpy()
    assert data["rewards"].shape == (sum(lengths),)
    assert data["terminals"].tolist() == [
        t == n - 1 and flags["terminated"][i] for i, n in enumerate(lengths) for t in range(n)
    ]
    _assert_stores_agree_modulo_benchmark(a, b)


def _assert_stores_agree_modulo_benchmark(a: FileStorage, b: FileStorage) -> None:
    ha, hb = a.list_episodes(), b.list_episodes()
    assert [_header_fields(h)[:4] + _header_fields(h)[5:] for h in ha] == [
        _header_fields(h)[:4] + _header_fields(h)[5:] for h in hb
    ]
    for x, y in zip(ha, hb, strict=True):
        assert x.episode_return == pytest.approx(y.episode_return, rel=1e-9, abs=1e-9)
        ea, eb = a.load_episode(x.id), b.load_episode(y.id)
        eb.benchmark_id = ea.benchmark_id
        _assert_episode_equal(ea, eb)
    ia, ib = a.list_episodes(include_tuples=True), b.list_episodes(include_tuples=True)
    assert len(ia) == len(ib) == len(ha)
    for x, y in zip(ia, ib, strict=True):
        assert isinstance(x, EpisodeItem) and isinstance(y, EpisodeItem)
        assert len(x.tuples) == x.n_tuples
        assert [t.model_dump() for t in x.tuples] == [t.model_dump() for t in y.tuples]
    da, db = TupliDataset(a).to_numpy(), TupliDataset(b).to_numpy()
    assert sorted(da) == sorted(db)
    for key in da:
        if key != "episode_ids":
            _assert_tree_equal(da[key], db[key])
    assert a.verify() == [] and b.verify() == []


def test_batch_shares_one_shard_and_reads_like_single_writes(
    store: FileStorage, bench: str
) -> None:
    batch = _batch([2, 3, 1], bench)
    headers = store.record_episode_batch(batch)
    assert len(list((store.root / "shards").iterdir())) == 1
    for i, h in enumerate(headers):
        _assert_episode_equal(store.load_episode(h.id), batch.episode(i))
    assert store.verify() == []


def test_two_batches_append(store: FileStorage, bench: str) -> None:
    first = store.record_episode_batch(_batch([2, 2], bench, seed=1))
    second = store.record_episode_batch(_batch([5], bench, seed=2))
    assert [h.id for h in store.list_episodes()] == [h.id for h in first + second]
    _assert_episode_equal(store.load_episode(second[0].id), _batch([5], bench, seed=2).episode(0))
    assert store.verify() == []


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    episodes=st.lists(
        st.tuples(st.integers(1, 30), st.booleans(), st.booleans()), min_size=1, max_size=40
    ),
    seed=st.integers(0, 2**16),
    with_metadata=st.booleans(),
)
def test_property_batch_equals_record_episodes(
    tmp_path: Path, episodes: list[tuple[int, bool, bool]], seed: int, with_metadata: bool
) -> None:
    lengths = [n for n, _, _ in episodes]
    term = [t for _, t, _ in episodes]
    trunc = [u for _, _, u in episodes]
    meta = [{"k": i, "even": i % 2 == 0} for i in range(len(lengths))] if with_metadata else None
    with tempfile.TemporaryDirectory(dir=tmp_path) as root:
        a = FileStorage(Path(root) / "a", synchronous="normal")
        b = FileStorage(Path(root) / "b", synchronous="normal")
        ba, bb = a.store_benchmark(_query()).id, b.store_benchmark(_query()).id
        kw: dict[str, Any] = {"seed": seed, "terminated": term, "truncated": trunc}
        batch = _batch(lengths, ba, metadata=meta, **kw)
        headers = a.record_episode_batch(batch)
        b.record_episodes(_batch(lengths, bb, metadata=meta, **kw).episodes())
        assert [h.n_tuples for h in headers] == lengths
        assert [h.terminated for h in headers] == term
        assert [h.timeout for h in headers] == trunc
        assert [h.metadata for h in headers] == (meta if meta is not None else [{}] * len(lengths))
        _assert_stores_agree_modulo_benchmark(a, b)
        a.close()
        b.close()


# --------------------------------------------------------------------------------------------
# metadata


def test_metadata_is_filterable(store: FileStorage, bench: str) -> None:
    meta: list[dict[str, Any]] = [{"k": 5}, {"k": 1}, {"k": 9, "name": "x"}, {"other": 3}]
    headers = store.record_episode_batch(_batch([1, 2, 3, 4], bench, metadata=meta))
    found = store.list_episodes(FilterGEQ(key="metadata.k", value=5))
    assert [h.id for h in found] == [headers[0].id, headers[2].id]
    by_name = store.list_episodes(FilterEQ(key="metadata.name", value="x"))
    assert [h.id for h in by_name] == [headers[2].id]
    assert [h.n_tuples for h in store.list_episodes(FilterGEQ(key="n_tuples", value=3))] == [3, 4]
    ds = TupliDataset(store).with_episode_filter(FilterGEQ(key="metadata.k", value=5))
    assert ds.to_numpy()["rewards"].shape == (1 + 3,)


def test_metadata_none_gives_empty_dicts(store: FileStorage, bench: str) -> None:
    headers = store.record_episode_batch(_batch([2, 1], bench, metadata=None))
    assert [h.metadata for h in headers] == [{}, {}]
    assert [h.metadata for h in store.list_episodes()] == [{}, {}]
    assert store.load_episode(headers[1].id).metadata == {}
    headers[0].metadata["x"] = 1  # headers do not share one dict
    assert headers[1].metadata == {}
    assert store.list_episodes(FilterEQ(key="metadata.k", value=0)) == []


# --------------------------------------------------------------------------------------------
# errors: a useful message, nothing stored


def _with(batch: EpisodeBatch, **changes: Any) -> EpisodeBatch:
    values = {f: getattr(batch, f) for f in batch.__dataclass_fields__}
    return EpisodeBatch(**{**values, **changes})


def _bad_batches(bench: str) -> dict[str, tuple[Any, str]]:
    good = _batch([2, 3], bench)
    rows = 2 + 3 + 2
    obs = good.observations
    return {
        "observations without reset rows": (
            _with(good, observations={**obs, "pos": obs["pos"][:5]}),
            r"observations.*pos.*leading length 5.*expected 7",
        ),
        "actions too long": (
            _with(good, actions={**good.actions, "move": np.zeros(6, np.int32)}),
            r"actions.*move.*leading length 6.*expected 5",
        ),
        "rewards too short": (_with(good, rewards=np.zeros(4, np.float32)), r"rewards.*4.*5"),
        "extras too long": (
            _with(good, extras={"logits": np.zeros((rows, 4))}),
            r"extras.*logits.*7.*expected 5",
        ),
        "n_tuples with a 0": (
            _with(good, n_tuples=np.array([5, 0])),
            r"episode 1 is empty.*n_tuples\[1\] = 0",
        ),
        "n_tuples float": (
            _with(good, n_tuples=np.array([2.0, 3.0])),
            r"n_tuples must be a 1-D integer array.*float64",
        ),
        "terminated of wrong shape": (
            _with(good, terminated=np.array([True, False, True])),
            r"terminated must be a bool array of shape \(2,\).*\(3,\)",
        ),
        "terminated of wrong dtype": (
            _with(good, terminated=np.array([1, 0])),
            r"terminated must be a bool array.*int64",
        ),
        "truncated scalar": (
            _with(good, truncated=np.bool_(False)),
            r"truncated must be a bool array of shape \(2,\)",
        ),
        "metadata list of wrong length": (
            _with(good, metadata=[{"a": 1}]),
            r"metadata must be None or a list of 2 dicts.*received 1",
        ),
        "metadata not a list": (
            _with(good, metadata={"a": 1}),  # a dict is no Sequence of dicts
            r"metadata must be None or a list of 2 dicts",
        ),
        "non-JSON metadata": (
            _with(good, metadata=[{"a": 1}, {"b": object()}]),
            r"metadata of episode 1",
        ),
        "metadata entry not a dict": (
            _with(good, metadata=[{"a": 1}, 3]),
            r"metadata of episode 1",
        ),
        "unknown benchmark": (
            _with(good, benchmark_id="nope"),
            r"benchmark 'nope' not found.*store_benchmark",
        ),
        "hostile benchmark id": (
            _with(good, benchmark_id="../x"),
            r"invalid benchmark id '\.\./x'",
        ),
        "empty benchmark id": (_with(good, benchmark_id=""), r"invalid benchmark id ''"),
        "object dtype observation": (
            _with(good, observations={**obs, "pos": np.array([None] * rows, dtype=object)}),
            r"observations.*pos.*object",
        ),
    }


_BAD_NAMES = list(_bad_batches("b"))


@pytest.mark.parametrize("case", _BAD_NAMES)
def test_bad_batch_raises_and_stores_nothing(store: FileStorage, bench: str, case: str) -> None:
    batch, pattern = _bad_batches(bench)[case]
    with pytest.raises(TupliStorageError, match=pattern):
        store.record_episode_batch(batch)
    _assert_nothing_stored(store)
    # the store still works afterwards
    store.record_episode_batch(_batch([1], bench))
    assert len(store.list_episodes()) == 1


@pytest.mark.parametrize("case", _BAD_NAMES)
def test_bad_batch_with_batch_id_commits_no_batch(
    store: FileStorage, bench: str, case: str
) -> None:
    batch, pattern = _bad_batches(bench)[case]
    with pytest.raises(TupliStorageError, match=pattern):
        store.record_episode_batch(batch, batch_id="job:bad")
    assert not store.has_batch("job:bad")
    _assert_nothing_stored(store)


@pytest.mark.parametrize(
    "value", [[], None, "batch", [EpisodeData(np.zeros(2), np.zeros(1), np.zeros(1),
                                              np.zeros(1), True, False)]],
)  # fmt: skip
def test_not_an_episode_batch_raises(store: FileStorage, value: Any) -> None:
    with pytest.raises(TupliStorageError, match=r"expected an EpisodeBatch.*record_episodes"):
        store.record_episode_batch(value)
    _assert_nothing_stored(store)


@pytest.mark.parametrize("batch_id", ["", "a/b", "x" * 129, 7])
def test_bad_batch_id_raises(store: FileStorage, bench: str, batch_id: Any) -> None:
    with pytest.raises(TupliStorageError, match="invalid batch id"):
        store.record_episode_batch(_batch([1], bench), batch_id=batch_id)
    _assert_nothing_stored(store)


def test_failed_batch_leaves_earlier_episodes_intact(store: FileStorage, bench: str) -> None:
    kept = store.record_episode_batch(_batch([2, 2], bench))
    with pytest.raises(TupliStorageError):
        store.record_episode_batch(_with(_batch([1, 1], bench), n_tuples=np.array([1, 0])))
    assert [h.id for h in store.list_episodes()] == [h.id for h in kept]
    assert len(list((store.root / "shards").iterdir())) == 1
    assert store.verify() == []


# --------------------------------------------------------------------------------------------
# batch ids


def test_same_batch_id_returns_same_headers_and_stores_nothing(
    store: FileStorage, bench: str
) -> None:
    batch = _batch([3, 1, 4], bench, metadata=[{"k": 1}, {"k": 2}, {"k": 3}])
    first = store.record_episode_batch(batch, batch_id="job-1:chunk:0")
    assert store.has_batch("job-1:chunk:0")
    shards = sorted((store.root / "shards").iterdir())
    version = store.catalog_version()
    again = store.record_episode_batch(batch, batch_id="job-1:chunk:0")
    assert [h.model_dump() for h in again] == [h.model_dump() for h in first]
    assert len(store.list_episodes()) == 3
    assert sorted((store.root / "shards").iterdir()) == shards
    assert store.catalog_version() == version
    # also through record_episodes: one batch id space
    via_list = store.record_episodes(batch.episodes(), batch_id="job-1:chunk:0")
    assert [h.id for h in via_list] == [h.id for h in first]
    assert len(store.list_episodes()) == 3
    assert store.verify() == []


def test_batch_id_of_record_episodes_is_honoured(store: FileStorage, bench: str) -> None:
    batch = _batch([2, 5], bench)
    first = store.record_episodes(batch.episodes(), batch_id="k:1")
    again = store.record_episode_batch(batch, batch_id="k:1")
    assert [h.id for h in again] == [h.id for h in first]
    assert len(store.list_episodes()) == 2


def test_same_batch_id_other_lengths_raises(store: FileStorage, bench: str) -> None:
    store.record_episode_batch(_batch([3, 1], bench), batch_id="job:7")
    for lengths in ([3, 2], [3], [3, 1, 1]):
        with pytest.raises(TupliStorageError, match=r"batch 'job:7' is already committed"):
            store.record_episode_batch(_batch(lengths, bench), batch_id="job:7")
    assert [h.n_tuples for h in store.list_episodes()] == [3, 1]
    assert len(list((store.root / "shards").iterdir())) == 1
    assert store.verify() == []


def test_other_batch_ids_store_again(store: FileStorage, bench: str) -> None:
    batch = _batch([2], bench)
    a = store.record_episode_batch(batch, batch_id="a")
    b = store.record_episode_batch(batch, batch_id="b")
    assert a[0].id != b[0].id
    assert len(store.list_episodes()) == 2


def test_empty_batch_with_batch_id_is_committed(store: FileStorage, bench: str) -> None:
    empty = _batch([], bench)
    assert len(empty) == 0
    assert not store.has_batch("job:empty")
    assert store.record_episode_batch(empty, batch_id="job:empty") == []
    assert store.has_batch("job:empty")
    assert store.record_episode_batch(empty, batch_id="job:empty") == []
    with pytest.raises(TupliStorageError, match="already committed"):
        store.record_episode_batch(_batch([1], bench), batch_id="job:empty")
    _assert_nothing_stored(store)


def test_empty_batch_without_batch_id_is_a_no_op(store: FileStorage, bench: str) -> None:
    assert store.record_episode_batch(_batch([], bench)) == []
    _assert_nothing_stored(store)


@pytest.mark.parametrize("batch_id", [None, "job:rows"])
def test_empty_batch_with_rows_in_its_columns_raises(
    store: FileStorage, bench: str, batch_id: str | None
) -> None:
    """``n_tuples = []`` but 5 rows of transitions: the rows must not vanish silently (nor
    the batch id be committed as done)."""
    rows = _batch([2, 3], bench)
    empty = _with(
        rows,
        n_tuples=np.zeros(0, np.int64),
        terminated=np.zeros(0, bool),
        truncated=np.zeros(0, bool),
    )
    with pytest.raises(TupliStorageError, match=r"leading length|expected 0"):
        store.record_episode_batch(empty, batch_id=batch_id)
    if batch_id is not None:
        assert not store.has_batch(batch_id)
    _assert_nothing_stored(store)


def test_replay_leaves_out_deleted_episodes(store: FileStorage, bench: str) -> None:
    batch = _batch([1, 2, 3], bench)
    first = store.record_episode_batch(batch, batch_id="r")
    store.delete_episode(first[1].id)
    again = store.record_episode_batch(batch, batch_id="r")
    assert [h.id for h in again] == [first[0].id, first[2].id]
    assert len(store.list_episodes()) == 2


# --------------------------------------------------------------------------------------------
# the TupliStorage default


class Delegating(TupliStorage):
    """A storage that forwards the abstract methods to a FileStorage, nothing else."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner
        self.record_episodes_calls = 0

    def store_benchmark(self, benchmark_query: BenchmarkQuery) -> BenchmarkHeader:
        return self.inner.store_benchmark(benchmark_query)

    def load_benchmark(self, uri: str) -> Benchmark:
        return self.inner.load_benchmark(uri)

    def list_benchmarks(self, filter: BaseFilter | None = None) -> list[BenchmarkHeader]:
        return self.inner.list_benchmarks(filter)

    def publish_benchmark(self, uri: str, publish_in: str = "global") -> None:
        self.inner.publish_benchmark(uri, publish_in)

    def delete_benchmark(self, uri: str) -> None:
        self.inner.delete_benchmark(uri)

    def store_artifact(self, artifact: bytes, metadata: ArtifactMetadata) -> ArtifactMetadataItem:
        return self.inner.store_artifact(artifact, metadata)

    def load_artifact(self, uri: str, **kwargs: object) -> bytes:
        return self.inner.load_artifact(uri, **kwargs)

    def list_artifacts(self, filter: BaseFilter | None = None) -> list[ArtifactMetadataItem]:
        return self.inner.list_artifacts(filter)

    def publish_artifact(self, uri: str, publish_in: str = "global") -> None:
        self.inner.publish_artifact(uri, publish_in)

    def delete_artifact(self, uri: str) -> None:
        self.inner.delete_artifact(uri)

    def record_episode(self, episode: Episode | EpisodeData) -> EpisodeHeader:
        return self.inner.record_episode(episode)

    def record_episodes(
        self, episodes: Sequence[Episode | EpisodeData], *, batch_id: str | None = None
    ) -> list[EpisodeHeader]:
        self.record_episodes_calls += 1
        return self.inner.record_episodes(episodes, batch_id=batch_id)

    def has_batch(self, batch_id: str) -> bool:
        return self.inner.has_batch(batch_id)

    def load_episode(self, episode_id: str) -> EpisodeData:
        return self.inner.load_episode(episode_id)

    def publish_episode(self, uri: str, publish_in: str = "global") -> None:
        self.inner.publish_episode(uri, publish_in)

    def list_episodes(
        self, filter: BaseFilter | None = None, include_tuples: bool = False
    ) -> list[EpisodeHeader] | list[EpisodeItem]:
        return self.inner.list_episodes(filter, include_tuples)

    def delete_episode(self, uri: str) -> None:
        self.inner.delete_episode(uri)


def test_base_class_default_stores_the_same_episodes(tmp_path: Path) -> None:
    assert "record_episode_batch" not in Delegating.__dict__
    a = FileStorage(tmp_path / "a")
    wrapped = Delegating(FileStorage(tmp_path / "b"))
    ba, bb = a.store_benchmark(_query()).id, wrapped.store_benchmark(_query()).id
    meta = [{"k": 1}, {"k": 2}, {"k": 3}]
    kw: dict[str, Any] = {"terminated": [True, False, True], "truncated": [False, True, False]}
    a.record_episode_batch(_batch([2, 5, 1], ba, metadata=meta, **kw))
    headers = wrapped.record_episode_batch(
        _batch([2, 5, 1], bb, metadata=meta, **kw), batch_id="d:1"
    )
    assert wrapped.record_episodes_calls == 1
    assert [h.n_tuples for h in headers] == [2, 5, 1]
    assert wrapped.has_batch("d:1")
    again = wrapped.record_episode_batch(_batch([2, 5, 1], bb, metadata=meta, **kw), batch_id="d:1")
    assert [h.id for h in again] == [h.id for h in headers]
    _assert_stores_agree_modulo_benchmark(a, wrapped.inner)
    # TupliDataset on a non-FileStorage goes through load_episode: same columns again
    via_default = TupliDataset(wrapped).to_numpy()
    direct = TupliDataset(a).to_numpy()
    for key in direct:
        if key != "episode_ids":
            _assert_tree_equal(via_default[key], direct[key])


# --------------------------------------------------------------------------------------------
# read barriers


class BufferedWriter:
    """Buffers episodes in memory; ``flush`` records them (what the Gymnasium adapters do)."""

    flushes: ClassVar[list[int]] = []  # class-level: counts calls even after an instance died

    def __init__(self, store: FileStorage) -> None:
        self.store = store
        self.pending: list[EpisodeData] = []
        store.add_read_barrier(self.flush)

    def add(self, episode: EpisodeData) -> None:
        self.pending.append(episode)

    def flush(self) -> None:
        BufferedWriter.flushes.append(len(self.pending))
        if self.pending:
            episodes, self.pending = self.pending, []
            self.store.record_episodes(episodes)


@pytest.fixture
def flushes() -> list[int]:
    BufferedWriter.flushes = []
    return BufferedWriter.flushes


def test_barrier_makes_pending_episodes_visible(
    store: FileStorage, bench: str, flushes: list[int]
) -> None:
    writer = BufferedWriter(store)
    eps = _batch([2, 3, 4], bench).episodes()
    dataset = TupliDataset(store)
    assert dataset.to_numpy()["rewards"].shape == (0,)

    writer.add(eps[0])
    assert [h.n_tuples for h in store.list_episodes()] == [2]
    assert writer.pending == []

    writer.add(eps[1])
    version = store.catalog_version()  # runs the barrier first: the new episode counts
    assert len(store.list_episodes()) == 2
    assert store.catalog_version() == version

    writer.add(eps[2])
    data = dataset.to_numpy()  # the dataset notices the flushed episode
    assert data["rewards"].shape == (2 + 3 + 4,)

    writer.add(_batch([6], bench, seed=3).episode(0))
    before = len(flushes)
    assert [h.n_tuples for h in store.list_episodes(include_tuples=True)] == [2, 3, 4, 6]
    assert len(flushes) == before + 1
    assert store.verify() == []


def test_barrier_runs_before_load_episode(store: FileStorage, bench: str) -> None:
    writer = BufferedWriter(store)
    first = store.record_episode_batch(_batch([2], bench))[0]
    writer.add(_batch([5], bench).episode(0))
    assert store.load_episode(first.id).length == 2
    assert writer.pending == []  # load_episode flushed it
    assert sorted(h.n_tuples for h in store.list_episodes()) == [2, 5]


def test_barrier_runs_before_deletes(store: FileStorage, bench: str) -> None:
    writer = BufferedWriter(store)
    first = store.record_episode_batch(_batch([2], bench))[0]
    writer.add(_batch([3], bench).episode(0))
    store.delete_episode(first.id)
    assert writer.pending == []
    assert [h.n_tuples for h in store.list_episodes()] == [3]


def test_writer_is_not_kept_alive(store: FileStorage, bench: str, flushes: list[int]) -> None:
    writer = BufferedWriter(store)
    store.list_episodes()
    assert flushes == [0]
    alive = weakref.ref(writer)
    del writer
    gc.collect()
    assert alive() is None
    assert store.list_episodes() == []
    store.load_episode(store.record_episode_batch(_batch([1], bench))[0].id)
    assert store.catalog_version() == store.catalog_version()
    assert flushes == [0]  # the dead writer's barrier never ran again


def test_barrier_that_reads_the_store_does_not_recurse(store: FileStorage, bench: str) -> None:
    seen: list[int] = []

    class Reader:
        def flush(self) -> None:
            seen.append(len(store.list_episodes()))
            store.catalog_version()

    reader = Reader()
    store.add_read_barrier(reader.flush)
    store.record_episode_batch(_batch([1, 1], bench))
    assert len(store.list_episodes()) == 2
    assert seen == [2]
    store.verify()
    assert seen == [2, 2]


def test_plain_function_barrier(store: FileStorage, bench: str) -> None:
    calls: list[str] = []

    def barrier() -> None:
        calls.append("x")

    store.add_read_barrier(barrier)
    store.list_episodes()
    store.catalog_version()
    assert calls == ["x", "x"]
    del barrier
    gc.collect()
    store.list_episodes()
    assert calls == ["x", "x"]


def test_several_barriers_all_run(store: FileStorage, bench: str) -> None:
    a, b = BufferedWriter(store), BufferedWriter(store)
    eps = _batch([1, 2], bench).episodes()
    a.add(eps[0])
    b.add(eps[1])
    assert sorted(h.n_tuples for h in store.list_episodes()) == [1, 2]


def test_barrier_does_not_run_for_benchmark_reads(store: FileStorage, bench: str) -> None:
    calls: list[int] = []

    def barrier() -> None:
        calls.append(1)

    store.add_read_barrier(barrier)
    store.list_benchmarks()
    store.load_benchmark(bench)
    assert calls == []


@pytest.mark.parametrize("value", [None, 3, "flush", [1]])
def test_non_callable_barrier_raises(store: FileStorage, value: Any) -> None:
    with pytest.raises(TupliStorageError, match="expects a callable"):
        store.add_read_barrier(value)
    assert store.list_episodes() == []


def test_builtin_bound_method_barrier_is_usable_or_refused(store: FileStorage) -> None:
    """A callable whose ``__self__`` is not a Python method (``list.clear``) must not escape
    as a bare ``TypeError`` from ``weakref.WeakMethod``."""
    pending = [1]
    try:
        store.add_read_barrier(pending.clear)
    except TupliStorageError as err:
        assert "weak" in str(err).lower() or "bound method" in str(err)
    else:
        store.list_episodes()
        assert pending == []
