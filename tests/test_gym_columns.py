"""Tests of ``tupli_jax._gym_columns`` (the packed step columns of the single-env recorder).

The reference is the list recorder the columns replace: every episode kept as Python lists and
stacked on its own with ``stack_trees`` (numpy's ``np.array`` promotion rules, per episode). The
columns must hand over exactly those episodes, in the order they ended, whatever mix of
observation and action types, dtypes and shapes an env returns.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import gym_envs
import gymnasium
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax._gym_columns import (
    EpisodeColumns,
    PendingBatch,
    batch_discounts,
    make_episode,
    merge_batches,
    stack_trees,
)
from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.gym import FileStorage, TupliEnvWrapper
from tupli_jax.schema import to_builtin

# ----------------------------------------------------------------------------------------------
# Values an env may return
# ----------------------------------------------------------------------------------------------


def _obs(kind: str, k: int) -> Any:
    """An observation of ``kind`` whose values depend on ``k``."""
    base = np.array([k, -k], dtype=np.float64) / 7.0
    if kind == "f32":
        return base.astype(np.float32)
    if kind == "f64":
        return base
    if kind == "f32x3":
        return np.array([k, k + 1, k + 2], dtype=np.float32)
    if kind == "pyfloat":
        return float(k) / 3.0
    if kind == "i64":
        return np.int64(k)
    if kind == "dict":
        return {"a": base.astype(np.float32), "b": k}
    raise AssertionError(kind)


def _action(kind: str, k: int) -> Any:
    if kind == "int":
        return k % 3
    if kind == "np_int":
        return np.int64(k % 3)
    if kind == "np_f32":
        return np.float32(k) / 2
    if kind == "bool":
        return bool(k % 2)
    if kind == "box":
        return np.array([k, -k], dtype=np.float32)
    if kind == "huge":
        return 2**70 + k
    raise AssertionError(kind)


OBS = st.sampled_from(["f32", "f64", "f32x3", "pyfloat", "i64", "dict"])
ACTIONS = st.sampled_from(["int", "np_int", "np_f32", "bool", "box", "huge"])
REWARDS = st.sampled_from([1.0, np.float32(0.5), np.int64(2), -0.25])
# A step keeps the kinds its episode began with (``None``) or, now and then, switches.
SWITCH = st.integers(0, 39).flatmap(lambda i: st.tuples(OBS, ACTIONS) if i == 0 else st.none())
EPISODES = st.lists(
    st.tuples(
        st.one_of(st.none(), st.none(), st.none(), st.tuples(OBS, ACTIONS)),  # new kinds
        st.lists(SWITCH, max_size=8),  # its steps
        st.sampled_from(["end", "end", "end", "drop", "leave"]),  # how it stops
        st.sampled_from(["a", "b"]),  # benchmark id
        st.booleans(),  # terminated (else truncated); with metadata and infos
        st.booleans(),  # drain afterwards
    ),
    min_size=1,
    max_size=12,
)


def _episodes(items: list[Any]) -> list[EpisodeData]:
    out: list[EpisodeData] = []
    for item in items:
        out.extend(item.episodes() if isinstance(item, PendingBatch) else [item])
    return out


def _assert_tree_equal(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys()
        for key in want:
            _assert_tree_equal(got[key], want[key])
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "O":  # what numpy makes of steps that do not stack: same values
        assert [to_builtin(g) for g in got.ravel()] == [to_builtin(w) for w in want.ravel()]
    else:
        np.testing.assert_array_equal(got, want)


def _assert_same(got: EpisodeData, want: EpisodeData) -> None:
    _assert_tree_equal(got.observations, want.observations)
    _assert_tree_equal(got.actions, want.actions)
    _assert_tree_equal(got.rewards, want.rewards)
    _assert_tree_equal(got.discounts, want.discounts)
    assert (got.terminated, got.truncated) == (want.terminated, want.truncated)
    assert (got.benchmark_id, got.metadata) == (want.benchmark_id, want.metadata)
    assert (got.infos or None) == (want.infos or None)
    assert got.has_reset_observation


# ----------------------------------------------------------------------------------------------
# The columns against the list recorder
# ----------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.tuples(OBS, ACTIONS),
    episodes=EPISODES,
    reward=REWARDS,
    capacity=st.sampled_from([1, 2, 64]),
)
def test_columns_hand_over_what_the_list_recorder_stacks(
    kinds: tuple[str, str], episodes: list[tuple[Any, ...]], reward: Any, capacity: int
) -> None:
    cols = EpisodeColumns(capacity=capacity)
    expected: list[EpisodeData] = []
    drained: list[EpisodeData] = []
    k = 0
    for new_kinds, steps, stop, bench, flag, drain in episodes:
        obs_kind, action_kind = kinds = new_kinds or kinds
        k += 1
        obs = _obs(obs_kind, k)
        cols.begin(obs)
        observations, actions = [copy.deepcopy(obs)], []
        for switch in steps:
            k += 1
            kinds = switch or (obs_kind, action_kind)
            obs, action = _obs(kinds[0], k), _action(kinds[1], k)
            cols.append(obs, action, reward)
            if isinstance(obs, np.ndarray):
                obs[...] = -99  # an env reusing its buffer must not change what was recorded
            observations.append(_obs(kinds[0], k))
            actions.append(action)
            assert cols.steps == len(actions)
        if stop == "drop":
            cols.drop()
        elif stop == "end" and actions:
            infos = [{"t": t} for t in range(len(actions))] if flag else None
            metadata = {"k": k} if flag else {}
            try:
                want = make_episode(
                    stack_trees(observations),
                    stack_trees(actions),
                    np.asarray([reward] * len(actions), dtype=np.float64),
                    terminated=flag,
                    truncated=not flag,
                    benchmark_id=bench,
                    metadata=metadata,
                    infos=infos,
                )
            except (TypeError, ValueError) as error:  # the env changed structure or shape
                with pytest.raises(type(error)):
                    cols.end(flag, not flag, bench, metadata, infos)
            else:
                assert cols.end(flag, not flag, bench, metadata, infos) == len(actions)
                expected.append(want)
        if drain:
            drained.extend(_episodes(cols.drain()))
            assert cols.finished == 0
    drained.extend(_episodes(cols.drain()))
    assert len(drained) == len(expected)
    for got, want in zip(drained, expected, strict=True):
        _assert_same(got, want)


def test_regular_episodes_are_one_packed_batch() -> None:
    cols = EpisodeColumns(capacity=2)  # grows while recording
    lengths = [3, 1, 5]
    for e, length in enumerate(lengths):
        cols.begin(np.full(2, e, np.float32))
        for t in range(length):
            cols.append(np.full(2, 10 * e + t, np.float32), np.int64(t), float(t))
        cols.end(e == 2, e != 2, "bench", {}, None)
    cols.begin(np.zeros(2, np.float32))  # in progress: stays
    cols.append(np.ones(2, np.float32), np.int64(1), 1.0)
    (item,) = cols.drain()
    assert isinstance(item, PendingBatch) and item.infos is None
    batch = item.batch
    assert batch.n_tuples.tolist() == lengths
    assert batch.observations.shape == (sum(lengths) + 3, 2)
    assert batch.observations.dtype == np.float32 and batch.actions.dtype == np.int64
    assert batch.terminated.tolist() == [False, False, True]
    assert batch.metadata is None
    assert batch.discounts.tolist() == [1.0] * 8 + [0.0]
    assert cols.steps == 1 and cols.current()[1] == [np.int64(1)]
    cols.end(True, False, "bench", {}, None)
    (item,) = cols.drain()
    np.testing.assert_array_equal(item.batch.observations, [[0, 0], [1, 1]])


def test_python_and_numpy_int_actions_share_a_batch_and_huge_ints_split_it() -> None:
    cols = EpisodeColumns()
    for e, actions in enumerate([[1, 2], [np.int64(0), 1], [2**70, 3], [0]]):
        cols.begin(np.zeros(2, np.float32))
        for action in actions:
            cols.append(np.ones(2, np.float32), action, 1.0)
        cols.end(True, False, "b", {"e": e}, None)
        if e == 1:  # Python and numpy ints: one int64 batch
            (item,) = cols.drain()
            assert isinstance(item, PendingBatch)
            assert item.batch.actions.dtype == np.int64
            assert item.batch.actions.tolist() == [1, 2, 0, 1]
    items = cols.drain()  # an int beyond int64: each episode stacked on its own
    assert [type(item) for item in items] == [EpisodeData, EpisodeData]
    huge, small = items
    assert isinstance(huge, EpisodeData) and isinstance(small, EpisodeData)
    assert huge.actions.dtype == object and huge.actions.tolist() == [2**70, 3]
    assert small.actions.dtype == np.int64 and small.actions.tolist() == [0]
    assert (huge.metadata, small.metadata) == ({"e": 2}, {"e": 3})


def test_batch_discounts_zero_only_where_an_episode_terminated() -> None:
    got = batch_discounts(np.array([2, 3, 1]), np.array([True, False, True]))
    assert got.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert got.dtype == np.float32


def _batch(obs: np.ndarray, n: list[int], bench: str = "b", meta: Any = None) -> PendingBatch:
    steps = sum(n)
    term = np.ones(len(n), bool)
    return PendingBatch(
        EpisodeBatch(
            observations=obs,
            actions=np.arange(steps),
            rewards=np.ones(steps),
            discounts=batch_discounts(np.array(n), term),
            n_tuples=np.array(n),
            terminated=term,
            truncated=~term,
            benchmark_id=bench,
            metadata=meta,
        )
    )


def test_merge_batches_keeps_order_and_refuses_different_layouts() -> None:
    a = _batch(np.zeros((3, 2), np.float32), [2])
    b = _batch(np.ones((5, 2), np.float32), [1, 2], meta=[{"x": 1}, {}])
    merged = merge_batches([a, b])
    assert merged is not None
    assert merged.batch.n_tuples.tolist() == [2, 1, 2]
    assert merged.batch.metadata == [{}, {"x": 1}, {}]
    np.testing.assert_array_equal(merged.batch.observations[:3], 0)
    np.testing.assert_array_equal(merged.batch.observations[3:], 1)
    assert merged.batch.actions.tolist() == [0, 1, 0, 1, 2]
    assert merge_batches([a, _batch(np.zeros((2, 2), np.float64), [1])]) is None  # dtype
    assert merge_batches([a, _batch(np.zeros((2, 3), np.float32), [1])]) is None  # shape
    assert merge_batches([a, _batch(np.zeros((2, 2), np.float32), [1], bench="c")]) is None


# ----------------------------------------------------------------------------------------------
# Through the wrapper, on a real FileStorage
# ----------------------------------------------------------------------------------------------


def test_env_changing_dtypes_and_action_types_is_stored_per_episode(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    env = TupliEnvWrapper(gymnasium.make(gym_envs.SHIFTY_ID), store)
    env.store(name="shifty")
    played = []
    for seed in range(6):
        obs, _ = env.reset(seed=seed)
        observations, actions = [obs.copy()], []
        done = False
        t = 0
        while not done:
            action = t % 2 if seed % 2 else np.int64(t % 2)  # Python ints or numpy ints
            obs, _, terminated, truncated, _ = env.step(action)
            observations.append(obs.copy())
            actions.append(action)
            done = terminated or truncated
            t += 1
        played.append((observations, actions))
    env.close()
    headers = store.list_episodes()
    assert len(headers) == len(played)
    for header, (observations, actions) in zip(headers, played, strict=True):
        data = store.load_episode(header.id)
        want = np.array(observations)  # numpy's promotion, as pytupli-style lists would stack
        assert data.observations.dtype == want.dtype
        np.testing.assert_array_equal(data.observations, want)
        np.testing.assert_array_equal(data.actions, np.array(actions))
        assert data.actions.dtype == np.int64
    dtypes = {store.load_episode(h.id).observations.dtype for h in headers}
    assert dtypes == {np.dtype(np.float32), np.dtype(np.float64)}  # both kinds were played
