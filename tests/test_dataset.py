"""Tests of tupli_jax/dataset.py on a real FileStorage (SQLite + shards on ``tmp_path``).

``to_numpy`` is checked against a plain-Python reference built one step at a time from
``load_episode``; pytupli's own ``TupliDataset`` runs side by side where it is wrong.
"""

from __future__ import annotations

import pickle
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.dataset import (
    BaseTupleParser,
    NumpyTupleParser,
    TensorflowTupleParser,
    TorchTupleParser,
    TupliDataset,
)
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    BenchmarkMetadata,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    FilterEQ,
    FilterGEQ,
    FilterIN,
    RLTuple,
)
from tupli_jax.storage import FileStorage, TupliStorage, TupliStorageError


class Frame(NamedTuple):
    """An importable NamedTuple observation (image + step counter)."""

    image: np.ndarray
    step: np.ndarray


# --------------------------------------------------------------------------------------------
# helpers


def _bench(store: FileStorage, name: str = "bench") -> str:
    query = BenchmarkQuery(hash=name, serialized="{}", metadata=BenchmarkMetadata(name=name))
    return store.store_benchmark(query).id


def _observations(kind: str, n_rows: int, base: float) -> Any:
    """Distinct values per episode (``base``) and per row, so that a row from the wrong place
    is detected."""
    t = np.arange(n_rows, dtype=np.float64) + base
    if kind == "vector":
        return np.stack([t, -t, t * 0.5], axis=1).astype(np.float32)
    if kind == "dict":
        return {"pos": np.stack([t, t + 0.25], axis=1).astype(np.float32), "speed": t * 2.0}
    if kind == "frame":
        image = (t[:, None, None, None] + np.zeros((1, 4, 4, 3))) % 251
        return Frame(image=image.astype(np.uint8), step=t.astype(np.int32))
    raise AssertionError(kind)


def _actions(kind: str, n: int, base: float) -> Any:
    t = np.arange(n) + int(base)
    if kind == "vector":
        return t.astype(np.int64)
    if kind == "dict":
        return {"move": np.stack([t, t + 1], axis=1).astype(np.float32)}
    return (t % 7).astype(np.int32)


def _episode(
    bench: str,
    n: int,
    base: float,
    kind: str = "vector",
    *,
    terminated: bool = True,
    truncated: bool = False,
    metadata: dict[str, Any] | None = None,
    reset: bool = True,
) -> EpisodeData:
    """``reset=False`` drops the reset observation (``T`` rows), as tuple-form episodes have."""
    discounts = np.ones(n, np.float32)
    discounts[-1] = 0.0 if terminated else 1.0
    observations = _observations(kind, n + 1, base)
    if not reset:
        observations = jax.tree_util.tree_map(lambda leaf: leaf[1:], observations)
    return EpisodeData(
        observations=observations,
        actions=_actions(kind, n, base),
        rewards=(np.arange(n) + base).astype(np.float32) / 10.0,
        discounts=discounts,
        terminated=terminated,
        truncated=truncated,
        metadata=metadata or {},
        benchmark_id=bench,
        has_reset_observation=reset,
    )


def _tuple_episode(
    bench: str,
    n: int,
    base: float,
    *,
    terminated: bool = False,
    truncated: bool = True,
    **meta: Any,
) -> Episode:
    """A pytupli tuple-form episode (no reset observation) whose states look like the "vector"
    observations: state t = [x, -x, x / 2] with x = base + t."""
    tuples = [
        RLTuple(
            state=[base + t, -(base + t), (base + t) / 2],
            action=int(base) + t,
            reward=(base + t) / 10.0,
            info={"t": t},
            terminal=terminated and t == n - 1,
            timeout=truncated and t == n - 1,
        )
        for t in range(n)
    ]
    return Episode(benchmark_id=bench, metadata=dict(meta), tuples=tuples)


def _reference(store: FileStorage, ids: list[str]) -> dict[str, Any]:
    """``to_numpy`` built one step at a time from ``load_episode`` (leaves in jax order)."""
    rows: dict[str, list[Any]] = {k: [] for k in ("obs", "next", "act", "rew", "term", "trunc")}
    row_ids: list[str] = []
    for episode_id in ids:
        ep = store.load_episode(episode_id)
        obs = jax.tree_util.tree_leaves(ep.observations)
        act = jax.tree_util.tree_leaves(ep.actions)
        shift = 0 if ep.has_reset_observation else 1
        n_rows = ep.length - shift
        for t in range(n_rows):
            rows["obs"].append([np.asarray(leaf[t]) for leaf in obs])
            rows["next"].append([np.asarray(leaf[t + 1]) for leaf in obs])
            rows["act"].append([np.asarray(leaf[t + shift]) for leaf in act])
            rows["rew"].append(ep.rewards[t + shift])
            rows["term"].append(t == n_rows - 1 and ep.terminated)
            rows["trunc"].append(t == n_rows - 1 and ep.truncated)
            row_ids.append(episode_id)
    return {**rows, "ids": row_ids}


def _leaves(tree: Any) -> list[np.ndarray]:
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(tree)]


def _assert_matches(data: dict[str, Any], ref: dict[str, Any]) -> None:
    n = len(ref["ids"])
    assert data["episode_ids"].tolist() == ref["ids"]
    assert all(isinstance(i, str) for i in data["episode_ids"].tolist())
    for key, ref_key in (
        ("observations", "obs"),
        ("next_observations", "next"),
        ("actions", "act"),
    ):
        leaves = _leaves(data[key])
        for j, leaf in enumerate(leaves):
            assert leaf.shape[0] == n, key
            for t in range(n):
                np.testing.assert_array_equal(leaf[t], ref[ref_key][t][j], err_msg=f"{key}[{t}]")
    np.testing.assert_array_equal(data["rewards"], np.asarray(ref["rew"]).reshape(n))
    assert data["terminals"].dtype == np.bool_ and data["timeouts"].dtype == np.bool_
    assert data["terminals"].tolist() == ref["term"]
    assert data["timeouts"].tolist() == ref["trunc"]


def _record(store: FileStorage, episodes: list[Any]) -> list[str]:
    return [h.id for h in store.record_episodes(episodes)]


# --------------------------------------------------------------------------------------------
# to_numpy against the reference


@pytest.mark.parametrize("kind", ["vector", "dict", "frame"])
def test_to_numpy_matches_the_reference_over_several_shards(store: FileStorage, kind: str) -> None:
    bench = _bench(store)
    ids: list[str] = []
    for batch in range(3):  # three record_episodes calls: three shards
        episodes = [
            _episode(bench, n, base=100 * batch + 10 * i, kind=kind, terminated=i % 2 == 0,
                     truncated=i % 2 == 1)
            for i, n in enumerate([1, 4, 2])
        ]  # fmt: skip
        ids += _record(store, episodes)
    data = TupliDataset(store).to_numpy()
    _assert_matches(data, _reference(store, ids))
    assert len(data["rewards"]) == 3 * (1 + 4 + 2)
    # the pytree structure and the dtypes are kept
    reference = store.load_episode(ids[0])
    structure = jax.tree_util.tree_structure(reference.observations)
    assert structure == jax.tree_util.tree_structure(data["observations"])  # type: ignore[operator]
    assert [x.dtype for x in _leaves(data["observations"])] == [
        x.dtype for x in _leaves(reference.observations)
    ]
    assert [x.dtype for x in _leaves(data["actions"])] == [
        x.dtype for x in _leaves(reference.actions)
    ]


def test_flags_are_only_on_the_last_row_and_stay_apart(store: FileStorage) -> None:
    bench = _bench(store)
    _record(
        store,
        [
            _episode(bench, 3, 0, terminated=True, truncated=False),
            _episode(bench, 2, 10, terminated=False, truncated=True),
            _episode(bench, 2, 20, terminated=False, truncated=False),
        ],
    )
    data = TupliDataset(store).to_numpy()
    assert data["terminals"].tolist() == [False, False, True, False, False, False, False]
    assert data["timeouts"].tolist() == [False, False, False, False, True, False, False]
    # next observations never cross episodes: the last row's is the episode's final observation
    assert data["next_observations"][2, 0] == 3.0
    assert data["next_observations"][4, 0] == 12.0
    assert data["observations"][5, 0] == 20.0


def test_mixed_reset_and_tuple_form_episodes(store: FileStorage) -> None:
    bench = _bench(store)
    columnar = EpisodeData(
        observations=_observations("vector", 4, 0.0),
        actions=np.array([7, 8, 9]),
        rewards=np.array([0.5, 0.25, 0.125], np.float32),
        discounts=np.array([1, 1, 0], np.float32),
        terminated=True,
        truncated=False,
        benchmark_id=bench,
    )
    ids = _record(
        store,
        [
            _tuple_episode(bench, 4, 100),
            columnar,
            _tuple_episode(bench, 1, 200),  # a single tuple: no well-defined row
            _tuple_episode(bench, 3, 300, terminated=True, truncated=False),
        ],
    )
    data = TupliDataset(store).to_numpy()
    _assert_matches(data, _reference(store, ids))
    # tuple form: (state_t, a_t+1, r_t+1, state_t+1): T - 1 rows
    assert data["episode_ids"].tolist() == [ids[0]] * 3 + [ids[1]] * 3 + [ids[3]] * 2
    assert data["observations"][:3, 0].tolist() == [100.0, 101.0, 102.0]
    assert data["next_observations"][:3, 0].tolist() == [101.0, 102.0, 103.0]
    assert data["actions"][:3].tolist() == [101, 102, 103]
    np.testing.assert_allclose(data["rewards"][:3], [10.1, 10.2, 10.3])
    assert data["timeouts"].tolist() == [False, False, True, False, False, False, False, False]
    assert data["terminals"].tolist() == [False, False, False, False, False, True, False, True]
    # float32 (columnar) and float64 (from Python floats) observations are promoted
    assert data["observations"].dtype == np.float64
    assert data["rewards"].dtype == np.float64


def test_one_shard_with_and_without_reset_observations(store: FileStorage) -> None:
    bench = _bench(store)
    ids = _record(
        store,
        [_episode(bench, 3, 0), _episode(bench, 3, 10, reset=False), _episode(bench, 2, 20)],
    )
    data = TupliDataset(store).to_numpy()
    _assert_matches(data, _reference(store, ids))
    assert data["actions"].tolist() == [0, 1, 2, 11, 12, 20, 21]
    assert data["observations"][:, 0].tolist() == [0, 1, 2, 11, 12, 20, 21]


def test_deleted_episodes_and_shards_are_left_out(store: FileStorage) -> None:
    bench = _bench(store)
    first = _record(store, [_episode(bench, n, 10 * i) for i, n in enumerate([2, 3, 2, 4])])
    second = _record(store, [_episode(bench, 2, 500)])
    third = _record(store, [_episode(bench, 3, 900 + 10 * i) for i in range(2)])
    store.delete_episodes([first[1], first[3], second[0], third[0]])  # gaps; one shard emptied
    kept = [first[0], first[2], third[1]]
    data = TupliDataset(store).to_numpy()
    _assert_matches(data, _reference(store, kept))
    assert set(data["episode_ids"].tolist()) == set(kept)


def test_shards_interleaved_in_catalog_order(store: FileStorage) -> None:
    """One batch with two action dtypes makes two shards whose episodes alternate."""
    bench = _bench(store)
    episodes = [_episode(bench, 2 + i % 3, 10 * i) for i in range(6)]
    for ep in episodes[1::2]:
        ep.actions = ep.actions.astype(np.int32)
    ids = _record(store, episodes)
    data = TupliDataset(store).to_numpy()
    _assert_matches(data, _reference(store, ids))
    assert data["actions"].dtype == np.int64  # promoted


def test_different_structures_are_refused(store: FileStorage) -> None:
    bench = _bench(store)
    other = _bench(store, "other")
    _record(store, [_episode(bench, 2, 0, "vector"), _episode(other, 2, 0, "dict")])
    with pytest.raises(ValueError, match="do not share one obs structure"):
        TupliDataset(store).to_numpy()
    only = TupliDataset(store).with_benchmark_filter(FilterEQ(key="id", value=other)).to_numpy()
    assert sorted(only["observations"]) == ["pos", "speed"]


def test_empty_selections(store: FileStorage) -> None:
    data = TupliDataset(store).to_numpy()
    assert {k: len(v) for k, v in data.items()} == dict.fromkeys(data, 0)
    assert sorted(data) == sorted(
        ["observations", "actions", "rewards", "next_observations", "terminals", "timeouts",
         "episode_ids"]
    )  # fmt: skip
    bench = _bench(store)
    _record(store, [_episode(bench, 2, 0)])
    none = TupliDataset(store).with_benchmark_filter(FilterEQ(key="metadata.name", value="x"))
    assert len(none.to_numpy()["rewards"]) == 0
    assert none.preview() == []
    # a selection of one-tuple pytupli episodes has no rows but a known structure
    _record(store, [_tuple_episode(bench, 1, 0)])
    one = TupliDataset(store).with_episode_filter(FilterEQ(key="n_tuples", value=1)).to_numpy()
    assert one["observations"].shape == (0, 3)


def test_filters_select_the_same_episodes_as_python(store: FileStorage) -> None:
    a, b = _bench(store, "a"), _bench(store, "b")
    episodes = [
        _episode(bench, 2 + k % 3, 10 * k, metadata={"seed": k % 3, "group": str(k % 2)})
        for k, bench in enumerate([a, b, a, a, b, b, a, b])
    ]
    ids = _record(store, episodes)
    base = TupliDataset(store)
    cases: list[tuple[TupliDataset, Callable[[EpisodeData], bool]]] = [
        (base, lambda e: True),
        (base.with_benchmark_filter(FilterEQ(key="metadata.name", value="a")),
         lambda e: e.benchmark_id == a),
        (base.with_episode_filter(FilterEQ(key="metadata.seed", value=1)),
         lambda e: e.metadata["seed"] == 1),
        (base.with_benchmark_filter(FilterEQ(key="metadata.name", value="b"))
         .with_episode_filter(FilterIN(key="metadata.seed", value=[0, 2])),
         lambda e: e.benchmark_id == b and e.metadata["seed"] in (0, 2)),
    ]  # fmt: skip
    for dataset, predicate in cases:
        expected = [i for i, e in zip(ids, episodes, strict=True) if predicate(e)]
        _assert_matches(dataset.to_numpy(), _reference(store, expected))
        assert [h.id for h in dataset.preview()] == expected


def test_tuple_filter_keeps_the_rows_of_passing_tuples(store: FileStorage) -> None:
    bench = _bench(store)
    ids = _record(
        store,
        [_episode(bench, 4, 0), _tuple_episode(bench, 4, 10), _episode(bench, 3, 20)],
    )
    ref = _reference(store, ids)
    by_reward = TupliDataset(store).with_tuple_filter(lambda t: t.reward > 0.15)
    keep = [float(r) > 0.15 for r in ref["rew"]]
    expected = {k: [v for v, ok in zip(ref[k], keep, strict=True) if ok] for k in ref}
    _assert_matches(by_reward.to_numpy(), expected)
    # a tuple's state is the row's next observation
    by_state = TupliDataset(store).with_tuple_filter(lambda t: t.state[0] % 2 == 1)
    keep = [float(n[0][0]) % 2 == 1 for n in ref["next"]]
    expected = {k: [v for v, ok in zip(ref[k], keep, strict=True) if ok] for k in ref}
    data = by_state.to_numpy()
    _assert_matches(data, expected)
    assert 0 < len(data["rewards"]) < len(ref["rew"])


def test_to_numpy_sees_later_writes_and_deletes(store: FileStorage, tmp_path: Path) -> None:
    bench = _bench(store)
    first = _record(store, [_episode(bench, 2, 0)])
    dataset = TupliDataset(store)
    assert dataset.to_numpy()["episode_ids"].tolist() == first * 2
    again = dataset.to_numpy()  # cached plan, same answer, fresh arrays
    assert again["episode_ids"].tolist() == first * 2
    assert not again["episode_ids"].flags.writeable
    again["observations"][:] = -1.0
    again["rewards"][:] = -1.0
    assert dataset.to_numpy()["observations"][0, 0] == 0.0
    assert dataset.to_numpy()["rewards"][0] == 0.0
    other = FileStorage(tmp_path / "store")  # another connection, as another process would be
    second = _record(other, [_episode(bench, 3, 10)])
    assert dataset.to_numpy()["episode_ids"].tolist() == first * 2 + second * 3
    store.delete_episode(first[0])
    assert dataset.to_numpy()["episode_ids"].tolist() == second * 3
    dataset.preview()
    other.publish_episode(second[0], "team")
    assert dataset.episodes[0].published_in[-1] == "team"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=10),
    forms=st.lists(st.sampled_from(["reset", "no_reset", "tuples"]), min_size=10, max_size=10),
    cuts=st.lists(st.integers(1, 4), min_size=1, max_size=10),
    deleted=st.sets(st.integers(0, 9), max_size=3),
)
def test_property_random_lengths_batches_and_forms(
    lengths: list[int], forms: list[str], cuts: list[int], deleted: set[int]
) -> None:
    """Reset and no-reset ``EpisodeData`` share shards; pytupli episodes get their own."""
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(tmp)
        bench = _bench(store)
        episodes = [
            _tuple_episode(bench, n, 10 * i)
            if forms[i] == "tuples"
            else _episode(bench, n, 10 * i, terminated=i % 2 == 0, truncated=i % 3 == 0,
                          reset=forms[i] == "reset")
            for i, n in enumerate(lengths)
        ]  # fmt: skip
        ids: list[str] = []
        start = 0
        for cut in cuts:
            if start >= len(episodes):
                break
            ids += _record(store, episodes[start : start + cut])
            start += cut
        if start < len(episodes):
            ids += _record(store, episodes[start:])
        gone = [ids[i] for i in sorted(deleted) if i < len(ids)]
        if gone:
            store.delete_episodes(gone)
        kept = [i for i in ids if i not in gone]
        _assert_matches(TupliDataset(store).to_numpy(), _reference(store, kept))
        store.close()


# --------------------------------------------------------------------------------------------
# pytupli's API


def test_preview_load_and_the_tuple_view(store: FileStorage) -> None:
    bench = _bench(store)
    ids = _record(store, [_tuple_episode(bench, 3, 0), _episode(bench, 2, 10)])
    dataset = TupliDataset(store, info={"source": "test"})
    assert dataset.info == {"source": "test"}
    assert dataset.episodes == [] and dataset.tuples == [] and dataset.benchmarks == []
    headers = dataset.preview()
    assert [h.id for h in headers] == ids
    assert all(type(h) is EpisodeHeader for h in headers)
    assert [b.id for b in dataset.benchmarks] == [bench]
    assert dataset.tuples == []
    dataset.load()
    assert all(isinstance(e, EpisodeItem) for e in dataset.episodes)
    items = store.list_episodes(include_tuples=True)
    tuples = [t for item in items for t in item.tuples]  # type: ignore[attr-defined]
    assert dataset.tuples == tuples and len(tuples) == 5
    assert dataset.observations == [t.state for t in tuples]
    assert dataset.observations[3] == [11.0, -11.0, 5.5]  # states after each step
    assert dataset.actions == [0, 1, 2, 10, 11]
    assert dataset.rewards == pytest.approx([0.0, 0.1, 0.2, 1.0, 1.1])
    assert dataset.terminals == [False, False, False, False, True]
    assert dataset.timeouts == [False, False, True, False, False]
    assert dataset.infos[:3] == [{"t": 0}, {"t": 1}, {"t": 2}]


def test_with_methods_return_new_datasets_sharing_the_storage(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_episode(bench, 2, 0, metadata={"seed": 0}), _episode(bench, 2, 10)])
    base = TupliDataset(store)
    derived = [
        base.with_benchmark_filter(FilterEQ(key="id", value=bench)),
        base.with_episode_filter(FilterEQ(key="metadata.seed", value=0)),
        base.with_tuple_filter(lambda t: True),
    ]
    for dataset in derived:
        assert dataset is not base and dataset.storage is store
    assert len(base.preview()) == 2
    assert len(derived[1].preview()) == 1
    assert len(base.preview()) == 2  # the original kept its filters


def _pytupli_pair(tmp_path: Path) -> tuple[Any, FileStorage, list[Episode]]:
    """The same three tuple-form episodes in a pytupli store and in a tupli_jax store."""
    from pytupli import schema as ps
    from pytupli.storage import FileStorage as PytupliFileStorage

    pstore = PytupliFileStorage(storage_base_dir=str(tmp_path / "pytupli"))
    query = ps.BenchmarkQuery(hash="h", serialized="{}", metadata=ps.BenchmarkMetadata(name="b"))
    pbench = pstore.store_benchmark(query).id
    store = FileStorage(tmp_path / "tupli_jax")
    bench = _bench(store, "b")
    episodes = [
        _tuple_episode("", 3, 0, terminated=True, truncated=False, seed=0),
        _tuple_episode("", 3, 10, terminated=False, truncated=True, seed=1),
        _tuple_episode("", 2, 20, terminated=True, truncated=False, seed=2),
    ]
    for ep in episodes:
        pstore.record_episode(ps.Episode(**{**ep.model_dump(), "benchmark_id": pbench}))
    _record(store, [ep.model_copy(update={"benchmark_id": bench}) for ep in episodes])
    return pstore, store, episodes


def test_filters_set_after_load_take_effect_unlike_pytupli(tmp_path: Path) -> None:
    from pytupli.dataset import TupliDataset as PytupliDataset
    from pytupli.schema import FilterEQ as PFilterEQ

    pstore, store, _ = _pytupli_pair(tmp_path)
    theirs = PytupliDataset(pstore)
    theirs.load()
    ours = TupliDataset(store)
    ours.load()
    assert len(theirs.tuples) == len(ours.tuples) == 8

    by_seed = PFilterEQ(key="metadata.seed", value=1)
    their_seed = theirs.with_episode_filter(by_seed)
    their_seed.load()
    assert len(their_seed.episodes) == 1 and len(their_seed.tuples) == 8  # pytupli: stale tuples
    our_seed = ours.with_episode_filter(by_seed)  # pytupli's filter objects are accepted
    assert len(our_seed.tuples) == 3  # derived from a loaded dataset: loaded with its filter
    our_seed.load()
    assert [t.state[0] for t in our_seed.tuples] == [10.0, 11.0, 12.0]

    their_bench = theirs.with_benchmark_filter(PFilterEQ(key="metadata.name", value="none"))
    their_bench.load()
    assert len(their_bench.tuples) == 8  # pytupli: the benchmark filter is ignored after load
    our_bench = ours.with_benchmark_filter(FilterEQ(key="metadata.name", value="none"))
    our_bench.load()
    assert our_bench.tuples == [] and our_bench.episodes == []

    our_tuple = ours.with_tuple_filter(lambda t: t.reward >= 1.0)
    assert [t.reward for t in our_tuple.tuples] == pytest.approx([1.0, 1.1, 1.2, 2.0, 2.1])


def test_no_benchmark_filter_means_every_episode_unlike_pytupli(tmp_path: Path) -> None:
    from pytupli.dataset import TupliDataset as PytupliDataset

    pstore, store, _ = _pytupli_pair(tmp_path)
    for b in pstore.list_benchmarks():
        pstore.delete_benchmark(b.id)
    for b in store.list_benchmarks():
        store.delete_benchmark(b.id)  # the episodes stay
    assert PytupliDataset(pstore).preview() == []  # pytupli: OR over an empty benchmark list
    assert len(TupliDataset(store).preview()) == 3
    assert len(TupliDataset(store).to_numpy()["rewards"]) == 2 + 2 + 1


def test_episode_filter_is_combined_with_the_benchmark_ids(store: FileStorage) -> None:
    a, b = _bench(store, "a"), _bench(store, "b")
    ids = _record(
        store, [_episode(a, 2, 0, metadata={"k": 1}), _episode(b, 2, 10, metadata={"k": 1})]
    )
    dataset = (
        TupliDataset(store)
        .with_benchmark_filter(FilterEQ(key="metadata.name", value="b"))
        .with_episode_filter(FilterEQ(key="metadata.k", value=1))
    )
    assert [h.id for h in dataset.preview()] == [ids[1]]
    assert dataset.to_numpy()["episode_ids"].tolist() == [ids[1]] * 2


def test_d4rl_keeps_episodes_and_flags_apart_unlike_pytupli(tmp_path: Path) -> None:
    from pytupli.dataset import TupliDataset as PytupliDataset

    pstore, store, episodes = _pytupli_pair(tmp_path)
    theirs = PytupliDataset(pstore)
    theirs.load()
    their = theirs.convert_to_d4rl_format()
    # pytupli shifts across episodes: the last step of one episode "leads to" the first state of
    # the next one, and the very last observation is duplicated
    starts = {ep.tuples[0].state[0] for ep in episodes}
    ends = np.flatnonzero(np.asarray(theirs.terminals) | np.asarray(theirs.timeouts))
    assert {float(their["next_observations"][i, 0]) for i in ends[:-1]} <= starts
    np.testing.assert_array_equal(their["next_observations"][-1], their["observations"][-1])
    assert "timeouts" not in their and their["terminals"].sum() == 3  # flags ORed together

    ours = TupliDataset(store).convert_to_d4rl_format()
    assert sorted(ours) == sorted(
        ["observations", "actions", "next_observations", "rewards", "terminals", "timeouts"]
    )
    assert ours["observations"].dtype == np.float32 and ours["observations"].shape == (5, 3)
    assert ours["actions"].dtype == np.float32 and ours["rewards"].dtype == np.float32
    np.testing.assert_array_equal(ours["next_observations"][:, 0], ours["observations"][:, 0] + 1)
    assert ours["actions"].tolist() == [1, 2, 11, 12, 21]  # a_t+1 goes with state_t
    assert ours["terminals"].tolist() == [False, True, False, False, True]
    assert ours["timeouts"].tolist() == [False, False, False, True, False]


def test_d4rl_keeps_pytree_observations(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_episode(bench, 3, 0, "frame")])
    d4rl = TupliDataset(store).convert_to_d4rl_format()
    assert isinstance(d4rl["observations"], Frame)
    assert d4rl["observations"].image.dtype == np.uint8
    assert d4rl["next_observations"].step.tolist() == [1, 2, 3]


def test_convert_to_tensors_with_the_numpy_parser(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_tuple_episode(bench, 3, 0), _tuple_episode(bench, 2, 10)])
    obs, act, rew, term, trunc = TupliDataset(store).convert_to_tensors()  # loads by itself
    assert obs.dtype == np.float32 and obs[:, 0].tolist() == [0, 1, 2, 10, 11]
    assert obs.shape == (5, 3) and obs[4].tolist() == [11, -11, 5.5]
    assert act.dtype == np.float32 and act.tolist() == [0, 1, 2, 10, 11]
    np.testing.assert_allclose(rew, [0.0, 0.1, 0.2, 1.0, 1.1], rtol=1e-6)
    assert term.tolist() == [False] * 5
    assert trunc.tolist() == [False, False, True, False, True]


def test_torch_and_tensorflow_parsers_convert_each_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """With stand-in modules (numpy behind torch's and tf's names): float32 data, bool flags."""
    import types

    fake_torch = types.SimpleNamespace(tensor=np.array, float32=np.float32, bool=np.bool_)
    fake_tf = types.SimpleNamespace(constant=np.array, float32=np.float32, bool=np.bool_)
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    monkeypatch.setitem(sys.modules, "tensorflow", fake_tf)
    lists = ([[1, 2], [3, 4]], [0, 1], [0.5, 1.5], [False, True], [True, False])
    for parser in (TorchTupleParser, TensorflowTupleParser):
        obs, act, rew, term, trunc = parser.parse_lists(*lists)
        assert obs.dtype == act.dtype == rew.dtype == np.float32
        assert term.dtype == trunc.dtype == np.bool_
        assert obs.tolist() == [[1, 2], [3, 4]] and act.tolist() == [0, 1]
        assert rew.tolist() == [0.5, 1.5]
        assert term.tolist() == [False, True] and trunc.tolist() == [True, False]


def test_parsers_name_their_missing_package() -> None:
    for parser, module in ((TorchTupleParser, "torch"), (TensorflowTupleParser, "tensorflow")):
        if module in sys.modules:
            continue
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(ImportError, match=module):
                parser.parse_lists([[0.0]], [0], [0.0], [False], [False])
    with pytest.raises(NotImplementedError, match="parse_lists"):
        BaseTupleParser.parse_lists([], [], [], [], [])
    assert NumpyTupleParser.parse_lists([[1, 2]], [1], [1.0], [True], [False])[3].dtype == np.bool_


def test_convert_to_dataframe(store: FileStorage) -> None:
    pd = pytest.importorskip("pandas")
    bench = _bench(store)
    ids = _record(store, [_episode(bench, 2, 0, "dict"), _episode(bench, 1, 10, "dict")])
    frame = TupliDataset(store).convert_to_dataframe()
    assert isinstance(frame, pd.DataFrame) and len(frame) == 3
    assert frame["episode_ids"].tolist() == [ids[0], ids[0], ids[1]]
    assert frame["observations.speed"].tolist() == [0.0, 2.0, 20.0]
    assert frame["next_observations.pos"][2].tolist() == [11.0, 11.25]
    assert frame["actions.move"][1].tolist() == [1.0, 2.0]
    assert frame["terminals"].tolist() == [False, True, True]
    assert frame["timeouts"].tolist() == [False, False, False]
    bench2 = _bench(store, "vector")
    vector = TupliDataset(store).with_benchmark_filter(FilterEQ(key="id", value=bench2))
    _record(store, [_episode(bench2, 2, 0)])
    assert vector.convert_to_dataframe()["observations"][1].tolist() == [1.0, -1.0, 0.5]


def test_sample_episodes_uses_the_dataset_seed(store: FileStorage) -> None:
    bench = _bench(store)
    ids = _record(store, [_episode(bench, 1, i) for i in range(8)])
    dataset = TupliDataset(store)
    random.seed(123)
    before = random.random()
    dataset.set_seed(7)
    first = [e.id for e in dataset.sample_episodes(4)]
    dataset.set_seed(7)
    assert [e.id for e in dataset.sample_episodes(4)] == first
    assert len(set(first)) == 4 and set(first) <= set(ids)
    assert sorted(e.id for e in dataset.sample_episodes(100)) == sorted(ids)
    random.seed(123)
    assert random.random() == before  # Python's global RNG was not touched... by set_seed
    with pytest.raises(ValueError, match="n_samples"):
        dataset.sample_episodes(-1)


def test_batch_generator(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_tuple_episode(bench, 4, 0), _tuple_episode(bench, 3, 10)])
    dataset = TupliDataset(store)
    batches = list(dataset.as_batch_generator(3))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [t.action for b in batches for t in b] == [0, 1, 2, 3, 10, 11, 12]
    dataset.set_seed(0)
    shuffled = [t.action for b in dataset.as_batch_generator(2, shuffle=True) for t in b]
    assert sorted(shuffled) == [0, 1, 2, 3, 10, 11, 12] and shuffled != sorted(shuffled)
    assert dataset.actions == [0, 1, 2, 3, 10, 11, 12]  # shuffling did not reorder the dataset
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            dataset.as_batch_generator(bad)  # type: ignore[arg-type]


def test_bad_filters_are_refused(store: FileStorage) -> None:
    dataset = TupliDataset(store)
    with pytest.raises(TypeError, match="filter"):
        dataset.with_episode_filter("metadata.seed == 1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="callable"):
        dataset.with_tuple_filter(3)  # type: ignore[arg-type]
    as_dict = dataset.with_episode_filter({"type": "EQ", "key": "n_tuples", "value": 2})  # type: ignore[arg-type]
    assert as_dict.preview() == []


def test_a_dataset_survives_pickling(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_episode(bench, 2, 0)])
    dataset = TupliDataset(store).with_episode_filter(FilterGEQ(key="n_tuples", value=1))
    dataset.preview()
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy.to_numpy()["rewards"].tolist() == dataset.to_numpy()["rewards"].tolist()
    assert [h.id for h in copy.preview()] == [h.id for h in dataset.preview()]


class _Delegating(TupliStorage):
    """A TupliStorage that is not a FileStorage (no shards visible): delegates every call."""

    def __init__(self, inner: FileStorage) -> None:
        self.inner = inner


for _name in sorted(TupliStorage.__abstractmethods__):
    setattr(
        _Delegating,
        _name,
        lambda self, *args, _n=_name, **kwargs: getattr(self.inner, _n)(*args, **kwargs),
    )
_Delegating.__abstractmethods__ = frozenset()


def test_other_storages_take_the_per_episode_path(store: FileStorage) -> None:
    bench = _bench(store)
    ids = _record(
        store, [_episode(bench, 3, 0, "frame"), _episode(bench, 1, 10, "frame", truncated=True)]
    )
    dataset = TupliDataset(_Delegating(store))  # type: ignore[abstract]
    data = dataset.to_numpy()
    _assert_matches(data, _reference(store, ids))
    filtered = dataset.with_tuple_filter(lambda t: t.reward > 0.05).to_numpy()
    assert filtered["episode_ids"].tolist() == [ids[0], ids[0], ids[1]]
    _record(store, [_episode(bench, 2, 20, "frame")])
    assert len(dataset.to_numpy()["rewards"]) == 4  # read once: pytupli's snapshot behaviour
    dataset.refresh()
    assert len(dataset.to_numpy()["rewards"]) == 6


def test_a_missing_shard_is_a_storage_error(store: FileStorage) -> None:
    bench = _bench(store)
    _record(store, [_episode(bench, 2, 0)])
    for shard in (store.root / "shards").iterdir():
        shard.unlink()
    with pytest.raises(TupliStorageError, match="missing"):
        TupliDataset(store).to_numpy()
