"""Tests of tupli_jax/episode.py: ``EpisodeData`` and ``EpisodeBatch`` (packed columns)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax.episode import EpisodeBatch, EpisodeData


class Obs(NamedTuple):
    """A NamedTuple observation node."""

    pixels: np.ndarray
    flag: np.ndarray


def _offsets_by_hand(lengths: list[int]) -> tuple[list[int], list[int]]:
    """First step row and first observation row of every episode, by a plain loop."""
    steps, obs = [], []
    s = o = 0
    for t in lengths:
        steps.append(s)
        obs.append(o)
        s += t
        o += t + 1
    return steps, obs


def _batch(lengths: list[int], *, reward_shape: tuple[int, ...] = ()) -> EpisodeBatch:
    """A batch whose every row is distinguishable (values are row numbers)."""
    n_steps, n_obs, n = sum(lengths), sum(lengths) + len(lengths), len(lengths)
    rng = np.random.default_rng(len(lengths))
    return EpisodeBatch(
        observations={
            "obs": Obs(
                pixels=np.arange(n_obs * 6, dtype=np.uint8).reshape(n_obs, 2, 3),
                flag=np.arange(n_obs) % 3 == 0,
            ),
            "pos": np.arange(n_obs, dtype=np.int64),
        },
        actions=(np.arange(n_steps, dtype=np.int32), np.arange(n_steps * 2.0).reshape(-1, 2)),
        rewards=rng.normal(size=(n_steps, *reward_shape)).astype(np.float32),
        discounts=np.linspace(0.0, 1.0, n_steps, dtype=np.float32),
        n_tuples=np.asarray(lengths, np.int64),
        terminated=np.arange(n) % 2 == 0,
        truncated=np.arange(n) % 2 == 1,
        benchmark_id="bench",
        metadata=[{"k": i} for i in range(n)],
        extras={"value": np.arange(n_steps, dtype=np.float64) * 0.5},
    )


# --------------------------------------------------------------------------------------------
# EpisodeData


def test_episode_data_length_and_return() -> None:
    ep = EpisodeData(
        observations=np.zeros((4, 2), np.float32),
        actions=np.zeros(3, np.int32),
        rewards=np.array([0.5, 1.5, -1.0], np.float32),
        discounts=np.array([1, 1, 0], np.float32),
        terminated=True,
        truncated=False,
    )
    assert ep.length == 3
    assert ep.episode_return == pytest.approx(1.0)
    assert ep.metadata == {} and ep.extras == {} and ep.id is None


# --------------------------------------------------------------------------------------------
# EpisodeBatch


def test_len_and_num_transitions() -> None:
    batch = _batch([3, 1, 5])
    assert len(batch) == 3
    assert batch.num_transitions == 9


@pytest.mark.parametrize("lengths", [[1], [4], [3, 1, 5], [2, 2, 2, 7, 1]])
def test_episode_views_match_slicing_by_hand(lengths: list[int]) -> None:
    batch = _batch(lengths)
    steps, obs = _offsets_by_hand(lengths)
    for i, (t, s, o) in enumerate(zip(lengths, steps, obs, strict=True)):
        ep = batch.episode(i)
        assert ep.length == t
        assert isinstance(ep.observations["obs"], Obs)
        np.testing.assert_array_equal(
            ep.observations["obs"].pixels, batch.observations["obs"].pixels[o : o + t + 1]
        )
        np.testing.assert_array_equal(
            ep.observations["obs"].flag, batch.observations["obs"].flag[o : o + t + 1]
        )
        # the "pos" leaf holds row numbers: the rows of episode i are o .. o + t
        assert ep.observations["pos"].tolist() == list(range(o, o + t + 1))
        assert isinstance(ep.actions, tuple)
        assert ep.actions[0].tolist() == list(range(s, s + t))
        np.testing.assert_array_equal(ep.actions[1], batch.actions[1][s : s + t])
        np.testing.assert_array_equal(ep.rewards, batch.rewards[s : s + t])
        np.testing.assert_array_equal(ep.discounts, batch.discounts[s : s + t])
        np.testing.assert_array_equal(ep.extras["value"], np.arange(s, s + t) * 0.5)
        assert ep.terminated is (i % 2 == 0)
        assert ep.truncated is (i % 2 == 1)
        assert ep.metadata == {"k": i}
        assert ep.benchmark_id == "bench"
        assert ep.has_reset_observation


def test_episode_is_a_view_not_a_copy() -> None:
    batch = _batch([2, 3])
    ep = batch.episode(1)
    assert np.shares_memory(ep.rewards, batch.rewards)
    assert np.shares_memory(ep.observations["obs"].pixels, batch.observations["obs"].pixels)


def test_negative_index_counts_from_the_end() -> None:
    lengths = [2, 4, 1]
    batch = _batch(lengths)
    for neg, pos in ((-1, 2), (-2, 1), (-3, 0)):
        a, b = batch.episode(neg), batch.episode(pos)
        assert a.length == lengths[pos]
        np.testing.assert_array_equal(a.observations["pos"], b.observations["pos"])
        assert a.metadata == b.metadata and a.terminated == b.terminated


@pytest.mark.parametrize("index", [3, 4, -4, 100])
def test_index_out_of_range_raises(index: int) -> None:
    batch = _batch([2, 4, 1])
    with pytest.raises(IndexError, match="out of range"):
        batch.episode(index)


def test_episode_of_empty_batch_raises() -> None:
    batch = _batch([])
    assert len(batch) == 0 and batch.num_transitions == 0
    assert batch.episodes() == []
    assert batch.episode_returns().shape == (0,)
    with pytest.raises(IndexError):
        batch.episode(0)


def test_metadata_none_gives_empty_dicts() -> None:
    batch = _batch([1, 2])
    batch.metadata = None
    assert [e.metadata for e in batch.episodes()] == [{}, {}]


def test_episodes_lists_every_episode_in_order() -> None:
    lengths = [3, 1, 2]
    eps = _batch(lengths).episodes()
    assert [e.length for e in eps] == lengths
    assert [e.metadata["k"] for e in eps] == [0, 1, 2]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=12))
def test_episode_returns_match_per_episode_sums(lengths: list[int]) -> None:
    batch = _batch(lengths)
    steps, _ = _offsets_by_hand(lengths)
    expected = [
        float(np.sum(batch.rewards[s : s + t].astype(np.float64)))
        for s, t in zip(steps, lengths, strict=True)
    ]
    returns = batch.episode_returns()
    assert returns.dtype == np.float64 and returns.shape == (len(lengths),)
    assert returns.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert returns.tolist() == pytest.approx([e.episode_return for e in batch.episodes()])


def test_episode_returns_with_a_trailing_reward_dim() -> None:
    lengths = [2, 3, 1]
    batch = _batch(lengths, reward_shape=(2,))
    steps, _ = _offsets_by_hand(lengths)
    expected = [
        float(batch.rewards[s : s + t].astype(np.float64).sum())
        for s, t in zip(steps, lengths, strict=True)
    ]
    assert batch.episode_returns().tolist() == pytest.approx(expected)
    # each episode's own return sums both reward components as well
    assert batch.episode_returns().tolist() == pytest.approx(
        [e.episode_return for e in batch.episodes()]
    )
    assert batch.episode(1).rewards.shape == (3, 2)


def test_episode_returns_of_known_values() -> None:
    batch = EpisodeBatch(
        observations=np.arange(7.0),
        actions=np.zeros(4, np.int32),
        rewards=np.array([1.0, 2.0, 10.0, -3.0], np.float32),
        discounts=np.ones(4, np.float32),
        n_tuples=np.array([2, 1, 1]),
        terminated=np.array([True, False, False]),
        truncated=np.array([False, True, False]),
    )
    assert batch.episode_returns().tolist() == [3.0, 10.0, -3.0]
    assert batch.episode(2).observations.tolist() == [5.0, 6.0]


def test_flat_pytrees_keep_their_container_types() -> None:
    obs: Any = [np.arange(2.0), np.arange(2)]
    batch = EpisodeBatch(
        observations=obs,
        actions={"a": np.zeros(1, np.int8)},
        rewards=np.ones(1, np.float32),
        discounts=np.ones(1, np.float32),
        n_tuples=np.array([1]),
        terminated=np.array([False]),
        truncated=np.array([False]),
    )
    ep = batch.episode(0)
    assert isinstance(ep.observations, list) and len(ep.observations) == 2
    assert ep.observations[1].tolist() == [0, 1]
    assert ep.actions["a"].dtype == np.int8
