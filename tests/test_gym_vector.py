"""Tests of ``tupli_jax.gym.TupliVectorEnvWrapper`` on a real ``FileStorage``.

The main check: recording N sub-envs of a vector env stores, sub-env by sub-env, exactly the
episodes that ``TupliEnvWrapper`` stores for a single env run with the same seeds and actions,
in every autoreset mode (``NEXT_STEP``, ``SAME_STEP``, ``DISABLED``), with partial resets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gym_envs
import gymnasium
import numpy as np
import pytest
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.gym import (
    EpisodeMetadataCallback,
    FileStorage,
    FilterEQ,
    RLTuple,
    TupliEnvWrapper,
    TupliStorageError,
    TupliVectorEnvWrapper,
)

MODES = [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP, AutoresetMode.DISABLED]


class CountingStorage(FileStorage):
    """A real ``FileStorage`` that remembers the size of every write (``record_episodes`` or
    ``record_episode_batch``)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.batches: list[int] = []

    def record_episodes(self, episodes: Any, **kwargs: Any) -> Any:
        self.batches.append(len(episodes))
        return super().record_episodes(episodes, **kwargs)

    def record_episode_batch(self, batch: Any, **kwargs: Any) -> Any:
        self.batches.append(len(batch))
        return super().record_episode_batch(batch, **kwargs)


class LengthCallback(EpisodeMetadataCallback):
    def __init__(self) -> None:
        self.n = 0

    def reset(self) -> None:
        self.n = 0

    def __call__(self, tuple: RLTuple) -> dict[str, Any]:
        self.n += 1
        return {"length": self.n, "last_reward": float(tuple.reward)}


class IndexedTuple(RLTuple):
    step_index: int = -1

    @classmethod
    def from_env_step(cls, obs, action, reward, terminated, truncated, info):  # type: ignore[no-untyped-def]
        base = RLTuple.from_env_step(obs, action, reward, terminated, truncated, info)
        return cls(**base.model_dump(), step_index=int(info.get("steps", -1)))


def record_vector(
    store: FileStorage,
    env_id: str,
    mode: AutoresetMode,
    seeds: list[int],
    n_steps: int,
    *,
    reset_prob: float = 0.0,
    rng_seed: int = 0,
    vector_cls: type = SyncVectorEnv,
    **wrapper_kwargs: Any,
) -> tuple[TupliVectorEnvWrapper, np.ndarray, np.ndarray]:
    """Runs a recorded vector env; returns it, the actions ``[T, N]`` and reset masks ``[T, N]``."""
    n = len(seeds)
    vec = vector_cls([lambda: gymnasium.make(env_id) for _ in range(n)], autoreset_mode=mode)
    rec = TupliVectorEnvWrapper(vec, store, sub_env_key="sub_env", **wrapper_kwargs)
    rec.store(name=f"{env_id}-vec")
    rng = np.random.default_rng(rng_seed)
    rec.single_action_space.seed(rng_seed)
    rec.reset(seed=seeds)
    actions = []
    masks = np.zeros((n_steps, n), dtype=bool)
    for t in range(n_steps):
        action = np.stack([rec.single_action_space.sample() for _ in range(n)])
        actions.append(action)
        _, _, terminated, truncated, _ = rec.step(action)
        mask = rng.random(n) < reset_prob
        if mode is AutoresetMode.DISABLED:
            mask |= terminated | truncated
        if mask.any():
            masks[t] = mask
            rec.reset(options={"reset_mask": mask})
    return rec, np.stack(actions), masks


def record_single(
    store: FileStorage,
    env_id: str,
    mode: AutoresetMode,
    seed: int,
    actions: np.ndarray,
    masks: np.ndarray,
    **wrapper_kwargs: Any,
) -> str:
    """What one sub-env went through, replayed on a single recorded env."""
    env = TupliEnvWrapper(gymnasium.make(env_id), store, **wrapper_kwargs)
    bench_id = env.store(name=f"{env_id}-single-{seed}")
    env.reset(seed=seed)
    reset_step_next = False
    for action, mask in zip(actions, masks, strict=True):
        if reset_step_next:  # NEXT_STEP: this vector step only reset the sub-env
            env.reset()
            reset_step_next = False
        else:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                if mode is AutoresetMode.NEXT_STEP:
                    reset_step_next = True
                elif mode is AutoresetMode.SAME_STEP:
                    env.reset()
        if mask:
            env.reset()
            reset_step_next = False
    env.close()
    return bench_id


def assert_same_episodes(a: Any, b: Any) -> None:
    assert a.length == b.length
    for key in ("observations", "actions"):
        left, right = getattr(a, key), getattr(b, key)
        if isinstance(left, dict):
            assert left.keys() == right.keys()
            for k in left:
                np.testing.assert_array_equal(left[k], right[k])
                assert left[k].dtype == right[k].dtype
        else:
            np.testing.assert_array_equal(left, right)
    np.testing.assert_array_equal(a.rewards, b.rewards)
    np.testing.assert_array_equal(a.discounts, b.discounts)
    assert (a.terminated, a.truncated) == (b.terminated, b.truncated)
    assert (a.infos or None) == (b.infos or None)


def compare_with_single(
    store: FileStorage,
    rec: TupliVectorEnvWrapper,
    env_id: str,
    mode: AutoresetMode,
    seeds: list[int],
    actions: np.ndarray,
    masks: np.ndarray,
    **wrapper_kwargs: Any,
) -> int:
    rec.close()
    total = 0
    for i, seed in enumerate(seeds):
        single_id = record_single(
            store, env_id, mode, seed, actions[:, i], masks[:, i], **wrapper_kwargs
        )
        vector_eps = store.list_episodes(
            FilterEQ(key="benchmark_id", value=rec.id) & FilterEQ(key="metadata.sub_env", value=i)
        )
        single_eps = store.list_episodes(FilterEQ(key="benchmark_id", value=single_id))
        assert len(vector_eps) == len(single_eps)
        for v, s in zip(vector_eps, single_eps, strict=True):
            assert {**s.metadata, "sub_env": i} == v.metadata
            assert_same_episodes(store.load_episode(v.id), store.load_episode(s.id))
        total += len(vector_eps)
    return total


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
@pytest.mark.parametrize(
    ("env_id", "n_steps"),
    [("CartPole-v1", 80), (gym_envs.COUNTER_ID, 40), (gym_envs.SPARSE_INFO_ID, 40)],
)
def test_vector_matches_single_env_recording(
    tmp_path: Path, mode: AutoresetMode, env_id: str, n_steps: int
) -> None:
    store = FileStorage(tmp_path / "s")
    seeds = [3, 10, 42]
    rec, actions, masks = record_vector(store, env_id, mode, seeds, n_steps)
    assert compare_with_single(store, rec, env_id, mode, seeds, actions, masks) >= 3


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(MODES),
    reset_prob=st.sampled_from([0.0, 0.05, 0.3]),
    rng_seed=st.integers(0, 10**6),
    n_envs=st.integers(1, 4),
)
def test_vector_matches_single_with_partial_resets(
    tmp_path_factory: pytest.TempPathFactory,
    mode: AutoresetMode,
    reset_prob: float,
    rng_seed: int,
    n_envs: int,
) -> None:
    store = FileStorage(tmp_path_factory.mktemp("s"))
    seeds = [rng_seed + 7 * i for i in range(n_envs)]
    rec, actions, masks = record_vector(
        store, gym_envs.COUNTER_ID, mode, seeds, 30, reset_prob=reset_prob, rng_seed=rng_seed,
        batch_steps=5,
    )  # fmt: skip
    compare_with_single(store, rec, gym_envs.COUNTER_ID, mode, seeds, actions, masks)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_callbacks_and_custom_tuples_per_sub_env(tmp_path: Path, mode: AutoresetMode) -> None:
    store = FileStorage(tmp_path / "s")
    seeds = [1, 2]
    rec, actions, masks = record_vector(
        store, gym_envs.COUNTER_ID, mode, seeds, 30,
        metadata_callback=LengthCallback(), rl_tuple_cls=IndexedTuple,
    )  # fmt: skip
    compare_with_single(
        store, rec, gym_envs.COUNTER_ID, mode, seeds, actions, masks,
        metadata_callback=LengthCallback(), rl_tuple_cls=IndexedTuple,
    )  # fmt: skip
    items = rec.list_episodes(include_tuples=True)
    assert items
    for item in items:
        assert item.metadata["length"] == item.n_tuples
        assert all(type(t) is IndexedTuple for t in item.tuples)
        assert [t.step_index for t in item.tuples] == list(range(1, item.n_tuples + 1))


def test_dict_observations_same_step(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    mode = AutoresetMode.SAME_STEP
    n = 2
    vec = SyncVectorEnv([gym_envs.DictObsEnv for _ in range(n)], autoreset_mode=mode)
    rec = TupliVectorEnvWrapper(vec, store, sub_env_key="sub_env")
    rec.store(name="dict-vec")
    rec.reset(seed=[5, 6])
    rec.single_action_space.seed(0)
    actions = np.stack([[rec.single_action_space.sample() for _ in range(n)] for _ in range(10)])
    for action in actions:
        rec.step(action)
    rec.close()
    for i, seed in enumerate([5, 6]):
        env = TupliEnvWrapper(gym_envs.DictObsEnv(), store)
        single_id = env.store(name=f"dict-{seed}")
        env.reset(seed=seed)
        for action in actions[:, i]:
            if env.step(action)[3]:
                env.reset()
        v = store.list_episodes(FilterEQ(key="metadata.sub_env", value=i))
        s = store.list_episodes(FilterEQ(key="benchmark_id", value=single_id))
        assert len(v) == len(s) == 2
        for a, b in zip(v, s, strict=True):
            assert_same_episodes(store.load_episode(a.id), store.load_episode(b.id))


def test_async_vector_env(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    seeds = [4, 5]
    mode = AutoresetMode.NEXT_STEP
    rec, actions, masks = record_vector(
        store, "CartPole-v1", mode, seeds, 60, vector_cls=AsyncVectorEnv
    )
    assert compare_with_single(store, rec, "CartPole-v1", mode, seeds, actions, masks) >= 2


def test_numpy_vectorised_cartpole_matches_a_reference(tmp_path: Path) -> None:
    """``make_vec(..., "vector_entry_point")`` is a VectorEnv that is not a SyncVectorEnv."""
    store = FileStorage(tmp_path / "s")
    n, steps = 16, 120
    vec = gymnasium.make_vec("CartPole-v1", num_envs=n, vectorization_mode="vector_entry_point")
    assert not isinstance(vec, SyncVectorEnv)
    rec = TupliVectorEnvWrapper(
        vec, store, sub_env_key="sub_env", benchmark_env=gymnasium.make("CartPole-v1")
    )
    rec.store(name="cartpole-vec")
    obs, _ = rec.reset(seed=0)
    rng = np.random.default_rng(0)
    # Reference: NEXT_STEP semantics applied to the raw outputs.
    current: list[dict[str, list[Any]]] = [{"obs": [o], "act": [], "rew": []} for o in obs]
    expected: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    reset_next = np.zeros(n, dtype=bool)
    for _ in range(steps):
        action = rng.integers(0, 2, size=n)
        obs, reward, terminated, truncated, _ = rec.step(action)
        for i in range(n):
            if reset_next[i]:
                current[i] = {"obs": [obs[i]], "act": [], "rew": []}
                continue
            current[i]["obs"].append(obs[i])
            current[i]["act"].append(action[i])
            current[i]["rew"].append(reward[i])
            if terminated[i] or truncated[i]:
                expected[i].append({**current[i], "term": bool(terminated[i])})
        reset_next = terminated | truncated
    rec.close()
    for i in range(n):
        got = store.list_episodes(FilterEQ(key="metadata.sub_env", value=i))
        assert len(got) == len(expected[i])
        for header, ref in zip(got, expected[i], strict=True):
            ep = store.load_episode(header.id)
            np.testing.assert_array_equal(ep.observations, np.stack(ref["obs"]))
            np.testing.assert_array_equal(ep.actions, np.asarray(ref["act"]))
            np.testing.assert_array_equal(ep.rewards, np.asarray(ref["rew"], dtype=np.float64))
            assert ep.terminated == ref["term"] and header.n_tuples == len(ref["act"])
    assert sum(len(e) for e in expected) >= n


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.name)
def test_one_write_per_step_holding_the_episodes_that_ended(
    tmp_path: Path, mode: AutoresetMode
) -> None:
    store = CountingStorage(tmp_path / "s")
    vec = SyncVectorEnv(
        [lambda: gymnasium.make(gym_envs.COUNTER_ID) for _ in range(4)], autoreset_mode=mode
    )
    rec = TupliVectorEnvWrapper(vec, store, batch_steps=0)
    rec.store(name="counter-vec")
    rec.reset(seed=0)
    rec.single_action_space.seed(0)
    expected_batches = []
    reset_next = np.zeros(4, dtype=bool)
    for _ in range(40):
        _, _, terminated, truncated, _ = rec.step(
            np.stack([rec.single_action_space.sample() for _ in range(4)])
        )
        done = (terminated | truncated) & ~reset_next
        if done.any():
            expected_batches.append(int(done.sum()))
            listed = len(store.list_episodes())
            assert listed == sum(expected_batches)
        if mode is AutoresetMode.NEXT_STEP:
            reset_next = terminated | truncated
        if mode is AutoresetMode.DISABLED and done.any():
            rec.reset(options={"reset_mask": done})
    assert store.batches == expected_batches
    assert len(expected_batches) >= 3


def test_batched_writes_are_visible_and_fewer(tmp_path: Path) -> None:
    store = CountingStorage(tmp_path / "s")
    vec = SyncVectorEnv([lambda: gymnasium.make(gym_envs.COUNTER_ID) for _ in range(4)])
    rec = TupliVectorEnvWrapper(vec, store, batch_steps=10**6, interval_s=1e6)
    rec.store(name="counter-vec")
    rec.reset(seed=0)
    rec.single_action_space.seed(1)
    ended = 0
    reset_next = np.zeros(4, dtype=bool)
    for _ in range(60):
        _, _, terminated, truncated, _ = rec.step(
            np.stack([rec.single_action_space.sample() for _ in range(4)])
        )
        ended += int(((terminated | truncated) & ~reset_next).sum())
        reset_next = terminated | truncated
    assert store.batches == []  # nothing written yet ...
    assert len(store.list_episodes()) == ended  # ... but a read writes the pending batch first
    assert store.batches == [ended]
    rec.close()
    assert ended >= 10


def test_deactivate_drops_episodes_in_progress(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    vec = SyncVectorEnv([lambda: gymnasium.make(gym_envs.COUNTER_ID) for _ in range(2)])
    rec = TupliVectorEnvWrapper(vec, store)
    rec.store(name="counter-vec")
    rec.reset(seed=0)
    rec.step(np.array([1, 1]))
    rec.deactivate_recording()
    for _ in range(10):
        _, _, terminated, truncated, _ = rec.step(np.array([2, 2]))
    assert store.list_episodes() == []
    rec.activate_recording()  # starts with each sub-env's next episode
    starts = 0
    reset_next = terminated | truncated
    for _ in range(20):
        _, _, terminated, truncated, _ = rec.step(np.array([2, 2]))
        starts += int(reset_next.sum())
        reset_next = terminated | truncated
    headers = store.list_episodes()
    assert 0 < len(headers) <= starts
    for header in headers:
        assert store.load_episode(header.id).observations.shape[0] == header.n_tuples + 1


def test_store_and_load_a_vector_benchmark(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    vec = SyncVectorEnv([lambda: gymnasium.make("CartPole-v1") for _ in range(2)])
    rec = TupliVectorEnvWrapper(vec, store)
    bench_id = rec.store(name="cartpole")
    assert rec.id == bench_id
    loaded = TupliVectorEnvWrapper.load(store, bench_id, num_envs=3)
    assert loaded.num_envs == 3 and loaded.id == bench_id
    loaded.reset(seed=0)
    for _ in range(40):
        loaded.step(np.ones(3, dtype=np.int64))
    loaded.close()
    headers = store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))
    assert len(headers) >= 3
    rec.publish()
    assert "global" in store.load_benchmark(bench_id).published_in
    rec.delete()
    assert store.list_benchmarks() == [] and store.list_episodes() == []


def test_episode_end_without_benchmark_raises(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    vec = SyncVectorEnv([lambda: gymnasium.make(gym_envs.COUNTER_ID) for _ in range(2)])
    rec = TupliVectorEnvWrapper(vec, store)
    rec.reset(seed=0)
    with pytest.raises(TupliStorageError, match=r"store\(\)"):
        for _ in range(10):
            rec.step(np.array([2, 2]))
