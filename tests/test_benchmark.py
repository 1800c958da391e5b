"""Tests of ``tupli_jax.benchmark``: env round trips, hashing, and benchmark storage operations.

The allow-list, hostile payloads and the size budget are tested in ``test_safe_json.py``. Round
trips load without ``trusted=True`` and compare the loaded env with the original by stepping both
with the same seeds and actions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import envs_for_tests
import gymnasium
import jax
import jax.numpy as jnp
import jsonpickle
import jumanji
import numpy as np
import pytest
from _payloads import call, fn, made_gym

from tupli_jax.benchmark import (
    UnsafePayloadError,
    audit_payload,
    benchmark_hash,
    delete_benchmark,
    deserialize_env,
    load_env,
    publish_benchmark,
    serialize_env,
    store_benchmark,
)
from tupli_jax.schema import (
    ArtifactMetadata,
    BenchmarkMetadata,
    Episode,
    FilterEQ,
    RLTuple,
)
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

GYM_IDS = ["CartPole-v1", "Pendulum-v1", "MountainCar-v0"]
JUMANJI_IDS = ["Game2048-v1", "Snake-v1", "Maze-v0"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rollout(env: gymnasium.Env[Any, Any], actions: list[Any], seed: int | None) -> list[Any]:
    """Observations and rewards of a reset (seeded or continuing the env's RNG) and steps."""
    obs, _ = env.reset(seed=seed)
    out: list[Any] = [np.asarray(obs)]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        out.extend([np.asarray(obs), float(reward), terminated, truncated])
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(np.asarray(obs))
    return out


def assert_same_rollout(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def assert_trees_equal(a: Any, b: Any) -> None:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def cartpole_payload_with(evil: Any) -> str:
    """A real CartPole payload with ``evil`` added as an attribute of the innermost env."""
    data = json.loads(serialize_env(made_gym("CartPole-v1")))
    node = data
    while not node["py/object"].endswith("CartPoleEnv"):
        node = node["env"]
    node["evil"] = evil
    return json.dumps(data)


# --------------------------------------------------------------------------------------------
# round trips that must load without trusted=True
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", GYM_IDS)
def test_gym_envs_round_trip_untrusted_and_behave_identically(env_id: str) -> None:
    env = made_gym(env_id)
    loaded = deserialize_env(serialize_env(env))
    assert [type(e).__name__ for e in _chain(loaded)] == [type(e).__name__ for e in _chain(env)]
    assert loaded.spec == env.spec
    actions = [env.action_space.sample() for _ in range(40)]
    # Without a seed the loaded env continues the original's RNG state; then with a seed.
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))
    assert_same_rollout(rollout(loaded, actions, 7), rollout(env, actions, 7))


def _chain(env: Any) -> list[Any]:
    chain = [env]
    while isinstance(chain[-1], gymnasium.Wrapper):
        chain.append(chain[-1].env)
    return chain


def test_gym_payload_is_plain_jsonpickle_for_pytupli_readers() -> None:
    env = made_gym("CartPole-v1")
    payload = serialize_env(env)
    assert payload == jsonpickle.encode(env, indent=4)  # pytupli's own encoding, byte for byte
    plain = jsonpickle.decode(payload)
    actions = [env.action_space.sample() for _ in range(10)]
    assert_same_rollout(rollout(plain, actions, 3), rollout(env, actions, 3))


def test_pytupli_payload_loads_untrusted() -> None:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper

    env = made_gym("Pendulum-v1")
    payload = PytupliWrapper(env, storage=None).serialize_env(env)  # type: ignore[arg-type]
    loaded = deserialize_env(payload)
    assert loaded.unwrapped.related_artifacts == []
    actions = [env.action_space.sample() for _ in range(10)]
    assert_same_rollout(rollout(loaded, actions, 1), rollout(env, actions, 1))


def test_custom_env_subclass_round_trips_untrusted() -> None:
    env = envs_for_tests.NoisyWalkEnv(size=3, noise_seed=11)
    env.reset(seed=2)
    env.step(np.int64(2))
    loaded = deserialize_env(serialize_env(env))
    assert type(loaded) is envs_for_tests.NoisyWalkEnv
    assert loaded.table == {0: -1.0, 1: 0.0, 2: 1.0}  # int keys kept
    np.testing.assert_array_equal(loaded.gains, env.gains)
    actions = [np.int64(a) for a in [0, 2, 2, 1, 0, 2, 1, 1, 0, 2] * 3]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))
    assert_same_rollout(rollout(loaded, actions, 5), rollout(env, actions, 5))


@pytest.fixture(scope="module")
def jumanji_envs() -> dict[str, Any]:
    return {env_id: jumanji.make(env_id) for env_id in JUMANJI_IDS}


@pytest.mark.parametrize("env_id", JUMANJI_IDS)
def test_jumanji_envs_round_trip_untrusted(env_id: str, jumanji_envs: dict[str, Any]) -> None:
    env = jumanji_envs[env_id]
    loaded = deserialize_env(serialize_env(env))
    assert type(loaded) is type(env)
    # jumanji's own env code needs standard promotion (conftest turns on the strict rules).
    # Unjitted: the loaded env reuses the primitives the original compiled (jit would not).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        key = jax.random.PRNGKey(3)
        state_a, ts_a = env.reset(key)
        state_b, ts_b = loaded.reset(key)
        assert_trees_equal((state_a, ts_a), (state_b, ts_b))
        mask = np.asarray(ts_a.observation.action_mask).reshape(-1)
        action = jnp.asarray(int(np.flatnonzero(mask)[-1]), jnp.int32)
        assert_trees_equal(env.step(state_a, action), loaded.step(state_b, action))
    spec_a, spec_b = env.observation_spec, loaded.observation_spec
    assert_trees_equal(spec_b.generate_value(), spec_a.generate_value())


# Beyond the three above, envs whose classes need each admission rule: chex dataclasses called
# (MultiCVRP) or rebuilt (SearchAndRescue, BinPack), a generator with no base (LevelBased-
# Foraging), matplotlib colormaps in viewers (CVRP). Sokoban downloads its levels when made;
# MMST holds a closure jsonpickle cannot encode (not loadable even with trusted=True).
JUMANJI_MORE = [
    "MultiCVRP-v0",
    "SearchAndRescue-v0",
    "BinPack-v2",
    "LevelBasedForaging-v0",
    "CVRP-v1",
]


def assert_same_as_plain_jsonpickle(payload: str, loaded: Any) -> None:
    """The guarded loader rebuilds exactly what unguarded jsonpickle rebuilds."""
    plain = jsonpickle.decode(payload, keys=True)
    assert serialize_env(loaded) == serialize_env(plain)


@pytest.mark.parametrize("env_id", JUMANJI_MORE)
def test_more_jumanji_envs_load_untrusted(env_id: str) -> None:
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        env = jumanji.make(env_id)  # some constructors need jumanji's usual promotion rules
    payload = serialize_env(env)
    assert audit_payload(payload) == []
    loaded = deserialize_env(payload)
    assert type(loaded) is type(env)
    assert_same_as_plain_jsonpickle(payload, loaded)


@pytest.mark.parametrize(
    "env_id", ["Acrobot-v1", "FrozenLake-v1", "CliffWalking-v1", "Blackjack-v1", "Taxi-v4"]
)
def test_more_gym_envs_round_trip_untrusted(env_id: str) -> None:
    env = made_gym(env_id)
    payload = serialize_env(env)
    loaded = deserialize_env(payload)
    assert_same_as_plain_jsonpickle(payload, loaded)
    actions = [env.action_space.sample() for _ in range(30)]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))


def test_jumanji_viewer_keeps_its_render_mode() -> None:
    from jumanji.environments.logic.game_2048.env import Game2048
    from jumanji.environments.logic.game_2048.viewer import Game2048Viewer

    env = Game2048(viewer=Game2048Viewer("2048", board_size=4, render_mode="rgb_array"))
    loaded = deserialize_env(serialize_env(env))
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        state, _ = env.reset(jax.random.PRNGKey(0))
    frame = loaded.render(state)
    assert isinstance(frame, np.ndarray) and frame.ndim == 3
    np.testing.assert_array_equal(frame, env.render(state))
    loaded.close()
    env.close()


# --------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------

HASH_SCRIPT = textwrap.dedent(
    """
    import envs_for_tests, gymnasium, jumanji
    from tupli_jax.benchmark import benchmark_hash
    from tupli_jax.schema import BenchmarkMetadata
    meta = BenchmarkMetadata(name="h", description="d", version="1",
                             extra={"tags": ["b", "a"], "cfg": {"x": 1.5, "y": None}})
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    print(benchmark_hash(env, meta))
    print(benchmark_hash(jumanji.make("Snake-v1"), meta))
    print(benchmark_hash(envs_for_tests.NoisyWalkEnv(), meta))
    """
)


def test_hash_is_deterministic_across_processes(jumanji_envs: dict[str, Any]) -> None:
    meta = BenchmarkMetadata(
        name="h",
        description="d",
        version="1",
        extra={"tags": ["b", "a"], "cfg": {"x": 1.5, "y": None}},
    )
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    here = [
        benchmark_hash(env, meta),
        benchmark_hash(jumanji_envs["Snake-v1"], meta),
        benchmark_hash(envs_for_tests.NoisyWalkEnv(), meta),
    ]
    root = Path(__file__).resolve().parents[1]
    environ = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT], capture_output=True, text=True, env=environ, check=True
    )
    assert result.stdout.split() == here


def test_hash_changes_with_env_state_and_metadata() -> None:
    meta = BenchmarkMetadata(name="a")
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    base = benchmark_hash(env, meta)
    assert len(base) == 64 and int(base, 16) >= 0
    assert benchmark_hash(env, meta) == base
    assert benchmark_hash(env, BenchmarkMetadata(name="b")) != base
    assert benchmark_hash(env, BenchmarkMetadata(name="a", extra={"k": 1})) != base
    other = gymnasium.make("CartPole-v1")
    other.reset(seed=1)
    assert benchmark_hash(other, meta) != base
    with pytest.raises(TypeError, match="BenchmarkMetadata"):
        benchmark_hash(env, {"name": "a"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# storage operations
# --------------------------------------------------------------------------------------------


def _episode(benchmark_id: str, n: int) -> Episode:
    tuples = [RLTuple(state=[float(i)], action=0, reward=1.0) for i in range(n)]
    tuples[-1] = RLTuple(state=[float(n)], action=0, reward=1.0, terminal=True)
    return Episode(benchmark_id=benchmark_id, metadata={"n": n}, tuples=tuples)


def test_store_load_round_trip_and_dedup(store: FileStorage) -> None:
    env = made_gym("CartPole-v1")
    first = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 0})
    again = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 0})
    other = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 1})
    assert first == again != other
    assert sorted(h.id for h in store.list_benchmarks()) == sorted({first, other})
    header = store.load_benchmark(first)
    assert header.metadata.extra == {"seed": 0} and header.metadata.description == "d"
    loaded = load_env(store, first)
    actions = [env.action_space.sample() for _ in range(20)]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))


def test_store_uses_given_serialization_and_rejects_bad_metadata(store: FileStorage) -> None:
    env = envs_for_tests.NoisyWalkEnv()
    custom = serialize_env(envs_for_tests.NoisyWalkEnv(size=2))
    bench_id = store_benchmark(store, env, name="walk", serialized=custom)
    assert store.load_benchmark(bench_id).serialized == custom
    assert load_env(store, bench_id).position.shape == (2,)
    with pytest.raises(TupliStorageError, match="metadata"):
        store_benchmark(store, env, name="walk", metadata=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TupliStorageError, match="serialized"):
        store_benchmark(store, env, name="walk", serialized=b"{}")  # type: ignore[arg-type]


def test_load_env_refuses_unsafe_stored_payload_unless_trusted(
    store: FileStorage, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    evil = cartpole_payload_with(call(fn("os.system"), f"touch {marker}"))
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="evil", serialized=evil)
    with pytest.raises(UnsafePayloadError, match=r"os\.system"):
        load_env(store, bench_id)
    assert not marker.exists()
    load_env(store, bench_id, trusted=True)
    assert marker.exists()


def test_publish_benchmark(store: FileStorage) -> None:
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="cp")
    publish_benchmark(store, bench_id, publish_in="team")
    assert "team" in store.load_benchmark(bench_id).published_in
    with pytest.raises(TupliStorageError):
        publish_benchmark(store, "0" * 32)


class SpyStorage(FileStorage):
    """A real FileStorage that records how episodes were listed."""

    listed: list[bool]

    def list_episodes(self, filter: Any = None, include_tuples: bool = False) -> Any:
        self.listed = [*getattr(self, "listed", []), include_tuples]
        return super().list_episodes(filter, include_tuples=include_tuples)


def test_delete_benchmark_removes_its_episodes_only(tmp_path: Path) -> None:
    store = SpyStorage(tmp_path / "store")
    keep = store_benchmark(store, made_gym("CartPole-v1"), name="keep")
    drop = store_benchmark(store, made_gym("Pendulum-v1"), name="drop")
    kept = [store.record_episode(_episode(keep, n)).id for n in (2, 3)]
    for n in (1, 4, 5):
        store.record_episode(_episode(drop, n))
    delete_benchmark(store, drop)
    assert store.listed == [False]  # episodes found without loading tuples
    assert sorted(h.id for h in store.list_episodes()) == sorted(kept)
    assert [h.id for h in store.list_benchmarks()] == [keep]
    with pytest.raises(TupliStorageError):
        store.load_benchmark(drop)


def test_delete_benchmark_can_keep_episodes_and_refuses_unknown_ids(store: FileStorage) -> None:
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="cp")
    episode = store.record_episode(_episode(bench_id, 3)).id
    with pytest.raises(TupliStorageError):
        delete_benchmark(store, "f" * 32)
    assert [h.id for h in store.list_episodes()] == [episode]
    delete_benchmark(store, bench_id, delete_episodes=False)
    assert [h.id for h in store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))] == [
        episode
    ]
    assert store.list_benchmarks() == []


def test_delete_benchmark_deletes_related_artifacts(store: FileStorage) -> None:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper

    artifacts = [
        store.store_artifact(data, ArtifactMetadata(name=name)).id
        for name, data in [("a", b"1,2"), ("b", b"3,4"), ("c", b"5,6")]
    ]
    env = made_gym("CartPole-v1")
    given_id = store_benchmark(store, env, name="given")
    delete_benchmark(store, given_id, delete_artifacts=True, related_artifacts=artifacts[:1])
    assert sorted(a.id for a in store.list_artifacts()) == sorted(artifacts[1:])
    # pytupli keeps the ids on env.unwrapped.related_artifacts; they are read from the JSON.
    wrapper = PytupliWrapper(env, storage=None)  # type: ignore[arg-type]
    wrapper._serialize = lambda e: (e, artifacts[1:2])  # type: ignore[method-assign]
    payload = wrapper.serialize_env(env)
    pytupli_id = store_benchmark(store, env, name="pytupli", serialized=payload)
    delete_benchmark(store, pytupli_id, delete_artifacts=False)
    assert len(store.list_artifacts()) == 2
    again = store_benchmark(store, env, name="pytupli", serialized=payload)
    delete_benchmark(store, again, delete_artifacts=True)
    assert [a.id for a in store.list_artifacts()] == artifacts[2:]
