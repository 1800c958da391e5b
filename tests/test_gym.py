"""Tests of ``tupli_jax.gym.TupliEnvWrapper`` (the pytupli drop-in) on a real ``FileStorage``.

Expected values come from what the env itself returned (recorded by the test while stepping) or
from pytupli's own wrapper run on the same seeds, never from the wrapper under test.
"""

from __future__ import annotations

import copy
import gc
import json
import runpy
import subprocess
import sys
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gym_envs
import gymnasium
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tupli_jax.gym as tg
from tupli_jax import schema
from tupli_jax._gym_record import READ_BARRIER_HOOK
from tupli_jax.benchmark import UnsafePayloadError, benchmark_hash
from tupli_jax.gym import (
    ArtifactMetadata,
    BenchmarkMetadata,
    BenchmarkQuery,
    EpisodeMetadataCallback,
    FileStorage,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterIN,
    FilterLT,
    RLTuple,
    TupliEnvWrapper,
    TupliStorageError,
)
from tupli_jax.schema import to_builtin

PYTUPLI_NAMES = [
    "TupliEnvWrapper",
    "FileStorage",
    "TupliStorage",
    "TupliStorageError",
    "RLTuple",
    "Episode",
    "EpisodeHeader",
    "EpisodeItem",
    "EpisodeMetadataCallback",
    "Benchmark",
    "BenchmarkHeader",
    "BenchmarkMetadata",
    "BenchmarkQuery",
    "ArtifactMetadata",
    "ArtifactMetadataItem",
    "FilterEQ",
    "FilterNE",
    "FilterGEQ",
    "FilterLEQ",
    "FilterGT",
    "FilterLT",
    "FilterIN",
    "FilterAND",
    "FilterOR",
    "TupliDataset",
    "TupliVectorEnvWrapper",
]


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


@dataclass
class Played:
    """One episode as the env returned it (the ground truth)."""

    observations: list[Any]
    actions: list[Any] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    infos: list[dict[str, Any]] = field(default_factory=list)
    terminated: bool = False
    truncated: bool = False


def play(env: gymnasium.Env[Any, Any], n_episodes: int, seed: int, int_actions: bool = False):
    """Plays ``n_episodes`` with seeded random actions; returns what the env returned."""
    env.action_space.seed(seed)
    episodes = []
    for k in range(n_episodes):
        obs, _ = env.reset(seed=seed + k)
        ep = Played(observations=[copy.deepcopy(obs)])
        done = False
        while not done:
            action = env.action_space.sample()
            if int_actions:
                action = int(action)
            obs, reward, terminated, truncated, info = env.step(action)
            ep.observations.append(copy.deepcopy(obs))
            ep.actions.append(action)
            ep.rewards.append(float(reward))
            ep.infos.append(to_builtin(info))
            ep.terminated, ep.truncated = bool(terminated), bool(truncated)
            done = terminated or truncated
        episodes.append(ep)
    return episodes


def stored_in_order(store: FileStorage, bench_id: str) -> list[Any]:
    headers = store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))  # insertion order
    return [(h, store.load_episode(h.id)) for h in headers]


def assert_matches(played: Played, header: Any, data: Any) -> None:
    np.testing.assert_array_equal(data.observations, np.stack(played.observations))
    np.testing.assert_array_equal(data.actions, np.asarray(played.actions))
    np.testing.assert_array_equal(data.rewards, np.asarray(played.rewards))
    assert (data.terminated, data.truncated) == (played.terminated, played.truncated)
    assert header.n_tuples == len(played.actions)
    assert header.terminated == played.terminated
    assert header.timeout == header.truncated == played.truncated
    assert header.episode_return == pytest.approx(sum(played.rewards))
    expected_discounts = np.ones(len(played.actions))
    if played.terminated:
        expected_discounts[-1] = 0.0
    np.testing.assert_array_equal(data.discounts, expected_discounts)


# ----------------------------------------------------------------------------------------------
# Module surface
# ----------------------------------------------------------------------------------------------


def test_exports_pytupli_names() -> None:
    assert set(PYTUPLI_NAMES) <= set(tg.__all__)
    for name in PYTUPLI_NAMES:
        if name != "TupliDataset":
            assert getattr(tg, name) is not None
    assert tg.RLTuple is schema.RLTuple
    assert tg.FilterIN is schema.FilterIN
    with pytest.raises(AttributeError):
        _ = tg.NotAThing  # type: ignore[attr-defined]


def test_tupli_dataset_is_lazy() -> None:
    dataset = pytest.importorskip("tupli_jax.dataset")
    assert tg.TupliDataset is dataset.TupliDataset


# ----------------------------------------------------------------------------------------------
# Recording
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_id", "n_episodes"), [("CartPole-v1", 5), ("Pendulum-v1", 2), (gym_envs.COUNTER_ID, 12)]
)
def test_records_whole_episodes_with_reset_observation(
    store: FileStorage, env_id: str, n_episodes: int
) -> None:
    env = TupliEnvWrapper(gymnasium.make(env_id), store)
    bench_id = env.store(name=env_id)
    played = play(env, n_episodes, seed=3)
    env.close()
    stored = stored_in_order(store, bench_id)
    assert len(stored) == n_episodes
    for ep, (header, data) in zip(played, stored, strict=True):
        assert header.benchmark_id == bench_id == data.benchmark_id
        assert data.has_reset_observation
        assert_matches(ep, header, data)
    if env_id == gym_envs.COUNTER_ID:  # both endings happen with this seed
        assert {(p.terminated, p.truncated) for p in played} == {(True, False), (False, True)}


def test_wrapper_passes_env_outputs_through(store: FileStorage) -> None:
    raw = play(gymnasium.make("CartPole-v1"), 3, seed=11)
    wrapped = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    wrapped.store(name="cp")
    recorded = play(wrapped, 3, seed=11)
    for a, b in zip(raw, recorded, strict=True):
        np.testing.assert_array_equal(np.stack(a.observations), np.stack(b.observations))
        assert a.rewards == b.rewards and a.actions == b.actions


def test_episode_is_listed_when_the_ending_step_returns(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6)
    bench_id = env.store(name="cp")
    env.reset(seed=0)
    env.action_space.seed(0)
    ended = 0
    for _ in range(200):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            ended += 1
            env.reset()
        assert len(store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))) == ended
    assert ended >= 3


def test_close_flushes_for_other_store_instances(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6)
    env.store(name="cp")
    played = play(env, 4, seed=5)
    env.close()
    other = FileStorage(tmp_path / "s")
    assert sorted(h.n_tuples for h in other.list_episodes()) == sorted(
        len(p.actions) for p in played
    )


def test_batch_steps_zero_writes_inside_the_step(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    other = FileStorage(tmp_path / "s")  # no read barrier: sees only what is on disk
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store, batch_steps=0)
    env.store(name="counter")
    env.reset(seed=1)
    env.action_space.seed(1)
    for _ in range(40):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            assert len(other.list_episodes()) == len(store.list_episodes())
            env.reset()
    assert len(other.list_episodes()) >= 3


def test_int_actions_and_numpy_info_values(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store)
    env.store(name="counter")
    played = play(env, 3, seed=8, int_actions=True)
    items = store.list_episodes(include_tuples=True)
    for ep, item in zip(played, items, strict=True):
        assert [t.action for t in item.tuples] == ep.actions
        assert [t.info for t in item.tuples] == ep.infos
        info = item.tuples[0].info
        assert type(info["steps"]) is int and type(info["distance"]) is float
        assert info["trace"] == [int(v) for v in info["trace"]] and info["tag"] in ("left", "other")
        assert [t.reward for t in item.tuples] == ep.rewards
        assert [t.state for t in item.tuples] == [o.tolist() for o in ep.observations[1:]]
        loaded = store.load_episode(item.id)
        assert loaded.infos == ep.infos


def test_dict_observations(store: FileStorage) -> None:
    env = TupliEnvWrapper(gym_envs.DictObsEnv(), store)
    bench_id = env.store(name="dict")
    played = play(env, 2, seed=4)
    for ep, (header, data) in zip(played, stored_in_order(store, bench_id), strict=True):
        assert header.n_tuples == 4
        assert data.observations["image"].dtype == np.uint8
        np.testing.assert_array_equal(
            data.observations["image"], np.stack([o["image"] for o in ep.observations])
        )
        np.testing.assert_array_equal(
            data.observations["pos"], [int(o["pos"]) for o in ep.observations]
        )
        np.testing.assert_array_equal(data.actions, np.stack(ep.actions))


def test_reset_mid_episode_drops_the_unfinished_steps(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    bench_id = env.store(name="cp")
    env.reset(seed=0)
    for _ in range(3):
        env.step(0)
    played = play(env, 1, seed=9)[0]
    stored = stored_in_order(store, bench_id)
    assert len(stored) == 1
    assert_matches(played, *stored[0])


def test_deactivated_recording_stores_nothing_and_partial_episodes_are_skipped(
    store: FileStorage,
) -> None:
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store)
    bench_id = env.store(name="counter")
    env.deactivate_recording()
    play(env, 2, seed=0)
    env.reset(seed=1)
    env.step(2)
    env.activate_recording()  # mid-episode: this episode is not whole, so not stored
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(2)
        done = terminated or truncated
    assert store.list_episodes() == []
    played = play(env, 2, seed=5)
    stored = stored_in_order(store, bench_id)
    assert len(stored) == 2
    for ep, pair in zip(played, stored, strict=True):
        assert_matches(ep, *pair)
    env.reset(seed=3)
    env.step(2)
    env.deactivate_recording()  # drops the episode in progress
    env.activate_recording()
    for _ in range(8):
        _, _, terminated, truncated, _ = env.step(2)
        if terminated or truncated:
            break
    assert len(store.list_episodes()) == 2


def test_episode_end_without_benchmark_id_raises(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store)
    env.reset(seed=0)
    with pytest.raises(TupliStorageError, match=r"store\(\)"):
        for _ in range(10):
            env.step(2)


def test_tuple_buffer_holds_the_episode_in_progress(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    env.store(name="cp")
    env.reset(seed=2)
    states = [env.step(1)[0].tolist() for _ in range(3)]
    assert [t.state for t in env.tuple_buffer] == states
    assert [t.action for t in env.tuple_buffer] == [1, 1, 1]


# ----------------------------------------------------------------------------------------------
# Same tuples as pytupli
# ----------------------------------------------------------------------------------------------


def _tuple_rows(items: list[Any]) -> list[list[tuple[Any, ...]]]:
    episodes = [
        [(t.state, t.action, float(t.reward), t.info, t.terminal, t.timeout) for t in item.tuples]
        for item in items
    ]
    return sorted(episodes, key=lambda ep: json.dumps(ep[0][0]))


def _played_rows(p: Played) -> list[tuple[Any, ...]]:
    """pytupli's tuple view of a played episode (state = observation returned by the step)."""
    last = len(p.actions) - 1
    return [
        (o.tolist(), int(a), r, info, p.terminated and t == last, p.truncated and t == last)
        for t, (o, a, r, info) in enumerate(
            zip(p.observations[1:], p.actions, p.rewards, p.infos, strict=True)
        )
    ]


def test_same_tuples_as_pytupli(tmp_path: Path) -> None:
    pytupli_benchmark = pytest.importorskip("pytupli.benchmark")
    pytupli_storage = pytest.importorskip("pytupli.storage")
    theirs_store = pytupli_storage.FileStorage(str(tmp_path / "pytupli"))
    theirs = pytupli_benchmark.TupliEnvWrapper(gymnasium.make("CartPole-v1"), theirs_store)
    theirs.store(name="cp")
    play(theirs, 6, seed=21)
    ours_store = FileStorage(tmp_path / "ours")
    ours = TupliEnvWrapper(gymnasium.make("CartPole-v1"), ours_store)
    ours.store(name="cp")
    play(ours, 6, seed=21)
    their_items = theirs_store.list_episodes(include_tuples=True)
    our_items = ours_store.list_episodes(include_tuples=True)
    assert len(our_items) == 6
    assert _tuple_rows(our_items) == _tuple_rows(their_items)
    assert sorted((h.n_tuples, h.terminated, h.timeout) for h in our_items) == sorted(
        (h.n_tuples, h.terminated, h.timeout) for h in their_items
    )


# ----------------------------------------------------------------------------------------------
# Metadata callback, filters, custom tuples
# ----------------------------------------------------------------------------------------------


class LengthCallback(EpisodeMetadataCallback):
    """Counts tuples and sums rewards; records how it was called."""

    def __init__(self) -> None:
        self.n = 0
        self.total = 0.0
        self.calls = 0
        self.resets = 0

    def reset(self) -> None:
        self.n, self.total = 0, 0.0
        self.resets += 1

    def __call__(self, tuple: RLTuple) -> dict[str, Any]:
        self.calls += 1
        self.n += 1
        self.total += float(tuple.reward)
        return {
            "length": self.n,
            "total": self.total,
            "long": self.n >= 20,
            "ended": tuple.terminal,
        }


def test_metadata_callback_and_filters(store: FileStorage) -> None:
    callback = LengthCallback()
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, metadata_callback=callback)
    bench_id = env.store(name="cp")
    played = play(env, 8, seed=1)
    assert callback.calls == sum(len(p.actions) for p in played)
    assert callback.resets == len(played)
    stored = stored_in_order(store, bench_id)
    for ep, (header, _) in zip(played, stored, strict=True):
        n = len(ep.actions)
        assert header.metadata == {
            "length": n,
            "total": pytest.approx(sum(ep.rewards)),
            "long": n >= 20,
            "ended": ep.terminated,
        }
    lengths = {h.id: h.n_tuples for h, _ in stored}

    def ids(flt: Any) -> set[str]:
        return {h.id for h in env.list_episodes(flt)}

    assert ids(FilterGEQ(key="metadata.length", value=20)) == {
        i for i, n in lengths.items() if n >= 20
    }
    assert ids(FilterEQ(key="metadata.long", value=True)) == {
        i for i, n in lengths.items() if n >= 20
    }
    some = sorted(set(lengths.values()))[:2]
    assert ids(FilterIN(key="metadata.length", value=some)) == {
        i for i, n in lengths.items() if n in some
    }
    assert ids(
        FilterAND(
            filters=[
                FilterLT(key="metadata.length", value=15),
                FilterEQ(key="terminated", value=True),
            ]
        )
    ) == {i for i, n in lengths.items() if n < 15}


def test_reset_mid_episode_resets_the_callback(store: FileStorage) -> None:
    callback = LengthCallback()
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, metadata_callback=callback)
    env.store(name="cp")
    env.reset(seed=0)
    env.step(0)
    env.step(1)
    played = play(env, 1, seed=2)[0]
    (header,) = store.list_episodes()
    assert header.metadata["length"] == len(played.actions)


class ScoredTuple(RLTuple):
    """A custom tuple with extra fields (pytupli drops them when storing)."""

    step_index: int = -1
    label: str = ""
    advantage: float = 0.0

    @classmethod
    def from_env_step(cls, obs, action, reward, terminated, truncated, info):  # type: ignore[no-untyped-def]
        base = RLTuple.from_env_step(obs, action, reward, terminated, truncated, info)
        return cls(
            **base.model_dump(),
            step_index=int(info["steps"]),
            label=f"a{int(action)}",
            advantage=float(reward) - 0.5,
        )


def test_custom_rl_tuple_fields_survive_the_round_trip(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store, rl_tuple_cls=ScoredTuple)
    env.store(name="counter")
    played = play(env, 3, seed=6)
    items = env.list_episodes(include_tuples=True)
    for ep, item in zip(played, items, strict=True):
        assert all(type(t) is ScoredTuple for t in item.tuples)
        assert [t.step_index for t in item.tuples] == list(range(1, len(ep.actions) + 1))
        assert [t.label for t in item.tuples] == [f"a{int(a)}" for a in ep.actions]
        assert [t.advantage for t in item.tuples] == pytest.approx([r - 0.5 for r in ep.rewards])
        assert [t.info for t in item.tuples] == ep.infos
        assert [t.state for t in item.tuples] == [o.tolist() for o in ep.observations[1:]]
    headers = env.list_episodes()
    assert len(headers) == 3 and not hasattr(headers[0], "tuples")


# ----------------------------------------------------------------------------------------------
# Benchmarks: store, dedup, load, publish, delete, artifacts, hostile payloads
# ----------------------------------------------------------------------------------------------


def test_store_returns_id_and_deduplicates(store: FileStorage) -> None:
    a = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    bench_id = a.store(name="cp", description="d", metadata={"k": 1})
    assert isinstance(bench_id, str) and a.id == bench_id
    b = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    assert b.store(name="cp", description="d", metadata={"k": 1}) == bench_id
    c = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    other = c.store(name="cp", description="d", metadata={"k": 2})
    assert other != bench_id
    assert {h.id for h in store.list_benchmarks()} == {bench_id, other}
    loaded = store.load_benchmark(bench_id)
    assert loaded.metadata == BenchmarkMetadata(name="cp", description="d", extra={"k": 1})
    built = BenchmarkMetadata(
        name="cp", description="d", difficulty=None, version=None, extra={"k": 1}
    )  # as store() builds it (jsonpickle also encodes which fields were set)
    assert loaded.hash == a._get_hash([a.env, built]) == benchmark_hash(a.env, built)


def test_load_rebuilds_an_equivalent_env(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store)
    bench_id = env.store(name="counter")
    loaded = TupliEnvWrapper.load(store, bench_id)
    assert loaded.id == bench_id
    first = play(env, 2, seed=30)
    second = play(loaded, 2, seed=30)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(np.stack(a.observations), np.stack(b.observations))
        assert (a.terminated, a.truncated, a.rewards) == (b.terminated, b.truncated, b.rewards)
    assert len(env.list_episodes()) == 4  # the loaded wrapper records into the same benchmark


def test_publish(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    bench_id = env.store(name="cp")
    assert "global" not in store.load_benchmark(bench_id).published_in
    env.publish()
    assert "global" in store.load_benchmark(bench_id).published_in


def test_publish_and_delete_need_an_id(store: FileStorage) -> None:
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    with pytest.raises(TupliStorageError, match="store"):
        env.publish()
    with pytest.raises(TupliStorageError, match="store"):
        env.delete()


class CsvTupliEnvWrapper(TupliEnvWrapper):
    """Moves the env's csv data into an artifact on store and back on load (pytupli's hooks)."""

    def _serialize(self, env: Any) -> tuple[Any, list[str]]:
        env = copy.deepcopy(env)  # the live env keeps its data
        data = env.unwrapped.data
        text = "\n".join(",".join(repr(float(v)) for v in row) for row in data)
        item = self.storage.store_artifact(
            text.encode("utf-8"), ArtifactMetadata(name="csv-data", description="rows")
        )
        env.unwrapped.data = None
        return env, [item.id]

    @classmethod
    def _deserialize(cls, env: Any, storage: Any) -> Any:
        (artifact_id,) = env.unwrapped.related_artifacts
        raw = storage.load_artifact(artifact_id).decode("utf-8")
        env.unwrapped.data = np.loadtxt(raw.splitlines(), delimiter=",", ndmin=2)
        return env


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("0.5,1.0\n2.0,-1.0\n3.25,4.0\n-2.0,0.125\n")
    return path


def test_artifacts_through_serialize_hooks(store: FileStorage, csv_file: Path) -> None:
    env = CsvTupliEnvWrapper(gym_envs.CsvEnv(csv_file), store)
    bench_id = env.store(name="csv")
    assert env.env.unwrapped.data is not None
    (artifact,) = store.list_artifacts()
    serialized = json.loads(store.load_benchmark(bench_id).serialized)
    assert artifact.id in json.dumps(serialized)
    loaded = CsvTupliEnvWrapper.load(store, bench_id)
    np.testing.assert_array_equal(loaded.env.unwrapped.data, np.loadtxt(csv_file, delimiter=","))
    a = play(env, 1, seed=0)[0]
    b = play(loaded, 1, seed=0)[0]
    np.testing.assert_array_equal(np.stack(a.observations), np.stack(b.observations))
    assert a.rewards == b.rewards


def test_delete_with_episodes_and_artifacts(store: FileStorage, csv_file: Path) -> None:
    keep = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    keep.store(name="keep")
    play(keep, 2, seed=0)
    env = CsvTupliEnvWrapper(gym_envs.CsvEnv(csv_file), store)
    bench_id = env.store(name="csv")
    play(env, 3, seed=0)
    assert len(env.list_episodes()) == 3
    env.delete(delete_artifacts=True)
    assert [h.id for h in store.list_benchmarks()] == [keep.id]
    assert store.list_artifacts() == []
    assert store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id)) == []
    assert len(store.list_episodes()) == 2


def test_delete_keeping_episodes_and_artifacts(store: FileStorage, csv_file: Path) -> None:
    env = CsvTupliEnvWrapper(gym_envs.CsvEnv(csv_file), store)
    env.store(name="csv")
    play(env, 2, seed=0)
    env.delete(delete_episodes=False)
    assert store.list_benchmarks() == []
    assert len(store.list_artifacts()) == 1
    assert len(store.list_episodes()) == 2


def _store_hostile(store: FileStorage, marker: Path) -> str:
    payload = json.dumps(
        {"py/reduce": [{"py/function": "os.system"}, {"py/tuple": [f"touch {marker}"]}]}
    )
    header = store.store_benchmark(
        BenchmarkQuery(hash="hostile", serialized=payload, metadata=BenchmarkMetadata(name="x"))
    )
    return header.id


def test_hostile_benchmark_is_refused(store: FileStorage, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bench_id = _store_hostile(store, marker)
    with pytest.raises(UnsafePayloadError):
        TupliEnvWrapper.load(store, bench_id)
    with pytest.raises(UnsafePayloadError):
        TupliEnvWrapper.deserialize_env(store.load_benchmark(bench_id).serialized, store)
    assert not marker.exists()
    # The payload is real: a trusting load runs it (and then fails to wrap a non-env).
    with pytest.raises(Exception):  # noqa: B017
        TupliEnvWrapper.load(store, bench_id, trusted=True)
    assert marker.exists()


def test_hostile_env_nested_in_a_legit_env_is_refused(store: FileStorage, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store)
    document = json.loads(env.serialize_env(env.env))
    document["evil"] = {
        "py/reduce": [{"py/function": "os.system"}, {"py/tuple": [f"touch {marker}"]}]
    }
    query = BenchmarkQuery(
        hash="nested", serialized=json.dumps(document), metadata=BenchmarkMetadata(name="n")
    )
    bench_id = store.store_benchmark(query).id
    with pytest.raises(UnsafePayloadError):
        TupliEnvWrapper.load(store, bench_id)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Property: whatever the sequence of steps, resets and recording switches, the store holds
# exactly the episodes that were recorded whole, once each.
# ----------------------------------------------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("step"), st.integers(0, 2)),
        st.tuples(st.just("reset"), st.integers(0, 1000)),
        st.tuples(st.just("off"), st.just(0)),
        st.tuples(st.just("on"), st.just(0)),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, batch_steps=st.sampled_from([0, 7, 10**6]))
def test_exactly_the_whole_recorded_episodes_are_stored(
    ops: list[tuple[str, int]], batch_steps: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(Path(tmp) / "s")
        env = TupliEnvWrapper(gymnasium.make(gym_envs.COUNTER_ID), store, batch_steps=batch_steps)
        env.store(name="counter")
        expected: list[Played] = []
        current: Played | None = None  # reference model of the episode being recorded
        recording, needs_reset = True, True
        for op, value in ops:
            if op == "reset":
                obs, _ = env.reset(seed=value)
                needs_reset = False
                current = Played(observations=[obs]) if recording else None
            elif op == "off":
                env.deactivate_recording()
                recording, current = False, None
            elif op == "on":
                env.activate_recording()
                recording = True
            elif not needs_reset:
                obs, reward, terminated, truncated, _ = env.step(value)
                if current is not None:
                    current.observations.append(obs)
                    current.actions.append(value)
                    current.rewards.append(float(reward))
                if terminated or truncated:
                    needs_reset = True
                    if current is not None:
                        current.terminated, current.truncated = terminated, truncated
                        expected.append(current)
                    current = None
        stored = store.list_episodes()
        assert len(stored) == len(expected)
        for ep, header in zip(expected, stored, strict=True):
            assert_matches(ep, header, store.load_episode(header.id))
        env.close()


def test_dropin_example_runs(tmp_path: Path) -> None:
    example = Path(__file__).parents[1] / "examples" / "gymnasium_pytupli_dropin.py"
    namespace = runpy.run_path(str(example), run_name="example")
    counts = namespace["main"](["--store", str(tmp_path / "s"), "--episodes", "6"])
    store = FileStorage(tmp_path / "s")
    headers = store.list_episodes()
    assert counts["episodes"] == len(headers) > 6
    single = [h for h in headers if "return" in h.metadata]
    assert len(single) == 6
    assert counts["long"] == sum(h.n_tuples >= 20 for h in single)


def test_pending_episodes_are_written_when_the_wrapper_is_collected(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6)
    env.store(name="cp")
    played = play(env, 3, seed=0)
    other = FileStorage(tmp_path / "s")  # reads what is on disk only
    assert other.list_episodes() == []
    del env
    gc.collect()
    assert sorted(h.n_tuples for h in other.list_episodes()) == sorted(
        len(p.actions) for p in played
    )


def test_pending_episodes_are_written_at_interpreter_exit(tmp_path: Path) -> None:
    root = tmp_path / "s"
    script = f"""
import sys
sys.path[:0] = [{str(Path(__file__).parents[1])!r}]
import gymnasium
from tupli_jax.gym import FileStorage, TupliEnvWrapper
env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), FileStorage({str(root)!r}),
                      batch_steps=10**6, interval_s=1e6)
env.store(name="cp")
for seed in range(3):
    env.reset(seed=seed)
    done = False
    while not done:
        _, _, terminated, truncated, _ = env.step(1)
        done = terminated or truncated
KEEP = env  # never closed: the exit hook must write the episodes
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    assert len(FileStorage(root).list_episodes()) == 3


def test_works_on_pytupli_storage_too(tmp_path: Path) -> None:
    """Storages with pytupli's interface only get one record_episode per episode (tuple form)."""
    pytupli_storage = pytest.importorskip("pytupli.storage")
    store = pytupli_storage.FileStorage(str(tmp_path / "pytupli"))
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store)
    bench_id = env.store(name="cp")
    played = play(env, 3, seed=12)
    env.close()
    items = store.list_episodes(include_tuples=True)
    assert _tuple_rows(items) == sorted(
        (_played_rows(p) for p in played), key=lambda ep: json.dumps(ep[0][0])
    )
    assert TupliEnvWrapper.load(store, bench_id).env.spec.id == "CartPole-v1"


# ----------------------------------------------------------------------------------------------
# Visibility of batched episodes: the read-barrier hook, our FileStorage, foreign storages
# ----------------------------------------------------------------------------------------------


class HookStorage(FileStorage):
    """A real ``FileStorage`` with the ``add_read_barrier`` hook as specified for FileStorage:
    callbacks held weakly, run before every method that reads stored episodes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.barriers: list[weakref.WeakMethod[Any]] = []
        self.batches: list[int] = []

    def add_read_barrier(self, flush: Any) -> None:
        self.barriers.append(weakref.WeakMethod(flush))

    def _run_barriers(self) -> None:
        for ref in list(self.barriers):
            flush = ref()
            if flush is not None:
                flush()

    def record_episodes(self, episodes: Any, **kwargs: Any) -> Any:
        self.batches.append(len(episodes))
        return super().record_episodes(episodes, **kwargs)

    def record_episode_batch(self, batch: Any, **kwargs: Any) -> Any:
        self.batches.append(len(batch))
        return super().record_episode_batch(batch, **kwargs)

    def list_episodes(self, *args: Any, **kwargs: Any) -> Any:
        self._run_barriers()
        return super().list_episodes(*args, **kwargs)


def _steps_until_episodes_end(env: Any, check: Any, n_steps: int = 200) -> int:
    env.reset(seed=0)
    env.action_space.seed(0)
    ended = 0
    for _ in range(n_steps):
        _, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            ended += 1
            check(ended)
            env.reset()
    return ended


def test_storage_with_the_hook_batches_and_is_not_patched(tmp_path: Path) -> None:
    store = HookStorage(tmp_path / "s")
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6)
    env.store(name="cp")
    assert len(store.barriers) == 1
    other = FileStorage(tmp_path / "s")  # another reader: sees only what is on disk

    def check(ended: int) -> None:
        assert len(other.list_episodes()) == sum(store.batches)  # pending until a read
        assert len(store.list_episodes()) == ended  # the hook wrote them first
        assert sum(store.batches) == ended

    ended = _steps_until_episodes_end(env, check)
    assert ended >= 3 and store.batches == [1] * ended
    assert not {"list_episodes", "load_episode", "_episode_locations"} & set(vars(store))
    env.close()
    del env
    gc.collect()
    assert [ref() for ref in store.barriers] == [None]  # held weakly: gone with the wrapper


def test_file_storage_read_barrier_shows_pending_episodes_without_patching(
    tmp_path: Path,
) -> None:
    store = FileStorage(tmp_path / "s")
    assert callable(getattr(store, READ_BARRIER_HOOK))
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6)
    env.store(name="cp")
    other = FileStorage(tmp_path / "s")
    played: list[int] = []

    def check(ended: int) -> None:
        assert len(other.list_episodes()) == ended - 1  # batched: not yet on disk ...
        headers = store.list_episodes()  # ... but this storage's read barrier writes it
        assert len(headers) == ended and len(other.list_episodes()) == ended
        played.append(store.load_episode(headers[-1].id).length)

    assert _steps_until_episodes_end(env, check) >= 3
    assert not set(vars(store)) & {"list_episodes", "load_episode", "_episode_locations"}
    assert sorted(h.n_tuples for h in other.list_episodes()) == sorted(played)


def test_wrapper_list_episodes_and_flush_write_pending_episodes(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6)
    env.store(name="cp")
    played = play(env, 3, seed=4)
    other = FileStorage(tmp_path / "s")
    assert other.list_episodes() == []
    assert len(env.list_episodes()) == 3  # explicit flush, whatever the storage
    assert sorted(h.n_tuples for h in other.list_episodes()) == sorted(
        len(p.actions) for p in played
    )
    play(env, 2, seed=9)
    assert len(env.flush()) == 2 and len(other.list_episodes()) == 5
    assert env.flush() == []


def test_batch_bytes_bounds_what_waits_in_memory(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    # CartPole: 4 float32 observations + an int64 action + a float64 reward = 32 B a step.
    env = TupliEnvWrapper(
        gymnasium.make("CartPole-v1"), store, batch_steps=10**6, interval_s=1e6, batch_bytes=32 * 40
    )
    env.store(name="cp")
    other = FileStorage(tmp_path / "s")  # sees only what was written
    env.action_space.seed(3)
    written, pending, writes, waited = 0, 0, 0, 0
    for k in range(12):
        env.reset(seed=k)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            pending += 1
            done = terminated or truncated
        if pending >= 40:  # the bytes threshold: everything pending is written
            written, pending, writes = k + 1, 0, writes + 1
        waited += written < k + 1
        assert len(other.list_episodes()) == written
    assert writes >= 2 and waited >= 2


def test_foreign_storage_gets_each_episode_inside_its_step_and_is_not_patched(
    tmp_path: Path,
) -> None:
    pytupli_storage = pytest.importorskip("pytupli.storage")
    store = pytupli_storage.FileStorage(str(tmp_path / "pytupli"))
    before = dict(vars(store))
    env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=10**6)
    env.store(name="cp")
    assert not env._sink.batched

    def check(ended: int) -> None:
        assert len(store.list_episodes()) == ended

    assert _steps_until_episodes_end(env, check, n_steps=80) >= 2
    assert {k: v for k, v in vars(store).items() if k in before or callable(v)} == before
