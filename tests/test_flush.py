"""Tests of tupli_jax.flush: episode cutting (property-based), carry, errors, checkpoints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax._cut import _MAX_PIECES
from tupli_jax.flush import Carry, HostChunk, OpenEpisode, _carry_from_state, cut_columns
from tupli_jax.recorder import RecordingWrapper
from tupli_jax.testing import FakeEnv


@dataclasses.dataclass
class _Cut:
    """One episode of a ``CutColumns``, split out for the model checks below."""

    env_index: int
    start_number: int
    observations: list[np.ndarray]
    data: list[np.ndarray]
    terminated: bool
    truncated: bool


def cut_episodes(
    chunk: HostChunk, carry: Carry | list[OpenEpisode | None]
) -> tuple[list[_Cut], Carry]:
    """``cut_columns``, split per episode along its ``n_tuples`` (T + 1 observation rows)."""
    cut, new_carry = cut_columns(chunk, carry)
    step_at = np.concatenate([[0], np.cumsum(cut.n_tuples)]).tolist()
    obs_at = np.concatenate([[0], np.cumsum(cut.n_tuples + 1)]).tolist()
    episodes = [
        _Cut(
            env_index=int(cut.env_index[i]),
            start_number=int(cut.start_number[i]),
            observations=[x[obs_at[i] : obs_at[i + 1]] for x in cut.observations],
            data=[x[step_at[i] : step_at[i + 1]] for x in cut.data],
            terminated=bool(cut.terminated[i]),
            truncated=not bool(cut.terminated[i]),  # as the flush stores it
        )
        for i in range(len(cut))
    ]
    return episodes, new_carry


# -- a model of the device stream ------------------------------------------------------------
#
# Each environment plays episodes of given lengths. Codes identify every value: observation
# p of episode e of env b is (b, e * 1000 + p) (p = 0 is the reset observation), the data of
# step p of episode e is e * 1000 + p. The model writes rows exactly as the buffer specifies:
# a step row per recorded step, a reset row per recorded episode start.


@dataclasses.dataclass
class _Rows:
    steps: list[tuple[int, bool, float, tuple[int, int], int]]  # number, last, discount, obs, data
    resets: list[tuple[int, tuple[int, int]]]  # number, obs


def _stream(
    b: int, lengths: list[int], truncated: list[bool], recording: list[bool], total: int
) -> tuple[list[tuple[int, bool, Any, Any]], list[tuple[int, Any]], list[tuple[int, int]]]:
    """Events per step for env ``b``: (number, last, step row or None, reset row or None)."""
    events = []
    expected = []  # (episode, length) of episodes that must be stored
    episode, position = 0, 0
    reset_recorded = recording[0]
    initial = (0, (b, 0)) if recording[0] else None
    all_recorded = reset_recorded
    for n in range(total):
        on = recording[n + 1]
        length = lengths[episode % len(lengths)]
        position += 1
        last = position == length
        discount = 1.0 if (last and truncated[episode % len(truncated)]) else (0.0 if last else 1.0)
        obs = (b, episode * 1000 + position)
        step_row = (n, last, discount, obs, episode * 1000 + position - 1) if on else None
        all_recorded = all_recorded and on
        reset_row = None
        if last:
            if all_recorded:
                expected.append((episode, length))
            episode, position = episode + 1, 0
            reset_row = (n + 1, (b, episode * 1000)) if on else None
            all_recorded = on
        events.append((n, last, step_row, reset_row))
    return events, [initial] if initial else [], expected


def _chunks(
    num_envs: int,
    lengths: list[list[int]],
    truncated: list[bool],
    recording: list[bool],
    flush_after: list[int],
    total: int,
) -> tuple[list[HostChunk], dict[int, list[tuple[int, int]]], list[int]]:
    streams = [_stream(b, lengths[b], truncated, recording, total) for b in range(num_envs)]
    bounds = sorted({f for f in flush_after if 0 <= f <= total} | {total})
    chunks, start = [], 0
    for i, end in enumerate(bounds):
        rows = []
        for b in range(num_envs):
            events, initial, _ = streams[b]
            r = _Rows([], list(initial) if i == 0 else [])
            for _, _, step_row, reset_row in events[start:end]:
                if step_row is not None:
                    r.steps.append(step_row)
                if reset_row is not None:
                    r.resets.append(reset_row)
            rows.append(r)
        chunks.append(_host_chunk(rows, end, fresh=i == 0))
        start = end
    unfinished = []
    for b in range(num_envs):
        events = streams[b][0]
        since = 0
        for _, last, _, _ in events:
            since = 0 if last else since + 1
        unfinished.append(since)
    return chunks, {b: streams[b][2] for b in range(num_envs)}, unfinished


_WIDE = 512


def _host_chunk(rows: list[_Rows], end_number: int, fresh: bool) -> HostChunk:
    num_envs = len(rows)
    s = max([len(r.steps) for r in rows] + [0]) + 1  # one spare row of garbage past the end
    k = max([len(r.resets) for r in rows] + [0]) + 1
    step_number = np.full((num_envs, s), 777, np.uint32)
    last = np.ones((num_envs, s), np.bool_)
    discount = np.full((num_envs, s), 0.5, np.float32)
    step_obs = np.full((num_envs, s, 2), -1.0, np.float32)
    # A wide leaf (2 KB rows): the cut copies runs of such rows one by one, small ones by gather.
    step_wide = np.full((num_envs, s, _WIDE), -1, np.int32)
    reset_wide = np.full((num_envs, max(k, 1), _WIDE), -1, np.int32)
    step_data = np.full((num_envs, s), -1, np.int32)
    reset_number = np.full((num_envs, k), 888, np.uint32)
    reset_obs = np.full((num_envs, k, 2), -1.0, np.float32)
    for b, r in enumerate(rows):
        for j, (n, is_last, disc, obs, data) in enumerate(r.steps):
            step_number[b, j], last[b, j], discount[b, j] = n, is_last, disc
            step_obs[b, j], step_data[b, j] = obs, data
            step_wide[b, j] = obs[1]
        for j, (n, obs) in enumerate(r.resets):
            reset_number[b, j], reset_obs[b, j] = n, obs
            reset_wide[b, j] = obs[1]
    return HostChunk(
        step_number=step_number,
        last=last,
        discount=discount,
        num_steps=np.array([len(r.steps) for r in rows]),
        step_observations=[step_obs, step_wide],
        step_data=[step_data, discount],
        reset_number=reset_number,
        num_resets=np.array([len(r.resets) for r in rows]),
        reset_observations=[reset_obs, reset_wide],
        end_number=np.full(num_envs, end_number, np.uint32),
        fresh=np.full(num_envs, fresh),
    )


def _time_major(chunk: HostChunk) -> HostChunk:
    """The same rows with every leaf a ``[B, S, ...]`` view of ``[S, B, ...]`` memory (its two
    leading axes cannot be merged without a copy)."""

    def view(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.swapaxes(0, 1)).swapaxes(0, 1)

    return dataclasses.replace(
        chunk,
        step_observations=[view(x) for x in chunk.step_observations],
        step_data=[view(x) for x in chunk.step_data],
        reset_observations=[view(x) for x in chunk.reset_observations],
    )


def _layout(chunk: HostChunk, layout: str) -> HostChunk:
    """``chunk`` with its leaves in ``layout``: ``"batch"`` (``[B, S, ...]`` memory),
    ``"time"`` (``_time_major``), or ``"packed batch"`` / ``"packed time"``: each leaf a view
    of wider rows (as decoded packed words are: every row strided, its own bytes contiguous)."""
    if layout == "batch":
        return chunk
    time_major = layout.endswith("time")

    def view(x: np.ndarray) -> np.ndarray:
        lead = x.shape[:2][::-1] if time_major else x.shape[:2]
        rows = x.swapaxes(0, 1) if time_major else x
        width = int(np.prod(x.shape[2:], dtype=np.int64))
        wide = np.full((*lead, width + 3), -7, x.dtype)  # 1 word before, 2 after each row
        wide[..., 1 : 1 + width] = rows.reshape(*lead, width)
        packed = wide[..., 1 : 1 + width].reshape(*lead, *x.shape[2:])
        return packed.swapaxes(0, 1) if time_major else packed

    if layout == "time":
        return _time_major(chunk)
    return dataclasses.replace(
        chunk,
        step_observations=[view(x) for x in chunk.step_observations],
        step_data=[view(x) for x in chunk.step_data],
        reset_observations=[view(x) for x in chunk.reset_observations],
    )


_LAYOUTS = ("batch", "time", "packed batch", "packed time")


def _run_all(chunks: list[HostChunk]) -> tuple[list[Any], Carry]:
    carry: Carry | list[OpenEpisode | None] = []
    episodes = []
    for chunk in chunks:
        cut, carry = cut_episodes(chunk, carry)
        episodes += cut
    return episodes, carry


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    num_envs=st.integers(1, 4),
    total=st.integers(0, 60),
)
def test_cut_matches_the_model_exactly_once(data: st.DataObject, num_envs: int, total: int) -> None:
    lengths = data.draw(
        st.lists(
            st.lists(st.integers(1, 25), min_size=1, max_size=6),
            min_size=num_envs,
            max_size=num_envs,
        )
    )
    truncated = data.draw(st.lists(st.booleans(), min_size=1, max_size=5))
    recording = data.draw(
        st.one_of(
            st.just([True] * (total + 1)),
            st.lists(st.booleans(), min_size=total + 1, max_size=total + 1),
        )
    )
    # Flush intervals of 1 to 7 steps: shorter than many episodes (up to 25 steps).
    gaps = data.draw(st.lists(st.integers(0, 7), max_size=total + 1))
    flush_after = list(np.cumsum(gaps)) if gaps else []
    chunks, expected, unfinished = _chunks(
        num_envs, lengths, truncated, recording, flush_after, total
    )
    # leaves as time-major views of packed words, as tj.record's chunks give them, or others
    layout = data.draw(st.sampled_from(_LAYOUTS))
    chunks = [_layout(chunk, layout) for chunk in chunks]
    episodes, carry = _run_all(chunks)

    got: dict[int, list[Any]] = {b: [] for b in range(num_envs)}
    for ep in episodes:
        got[ep.env_index].append(ep)
    for b in range(num_envs):
        assert [(int(ep.data[0][0]) // 1000, len(ep.data[0])) for ep in got[b]] == expected[b]
        for ep in got[b]:
            e = int(ep.data[0][0]) // 1000
            length = len(ep.data[0])
            obs = ep.observations[0]
            assert obs.shape == (length + 1, 2)
            np.testing.assert_array_equal(obs[:, 0], b)
            np.testing.assert_array_equal(obs[:, 1], e * 1000 + np.arange(length + 1))
            wide = ep.observations[1]
            assert wide.shape == (length + 1, _WIDE)
            np.testing.assert_array_equal(wide, np.broadcast_to(obs[:, 1:2], wide.shape))
            np.testing.assert_array_equal(ep.data[0], e * 1000 + np.arange(length))
            assert ep.terminated == (ep.data[1][-1] == 0) and ep.truncated != ep.terminated
            assert ep.terminated == (not truncated[e % len(truncated)])
    if all(recording):
        stored = sum(len(ep.data[0]) for ep in episodes)
        carried = sum(c.length for c in carry if c is not None)
        assert stored + carried == num_envs * total
        assert [c.length if c else 0 for c in carry] == unfinished


def test_cut_example_with_a_carry_across_three_flushes() -> None:
    # One env, one episode of 5 steps (terminated) then 2 unfinished steps; flushes after 2 and 4.
    chunks, expected, _ = _chunks(1, [[5, 9]], [False], [True] * 8, [2, 4], 7)
    episodes, carry = _run_all(chunks)
    assert expected[0] == [(0, 5)] and len(episodes) == 1
    assert episodes[0].observations[0][:, 1].tolist() == [0, 1, 2, 3, 4, 5]
    assert carry[0] is not None and carry[0].length == 2 and carry[0].start_number == 5


def test_fresh_stream_drops_the_carry() -> None:
    first, _, _ = _chunks(1, [[10]], [False], [True] * 4, [], 3)
    _, carry = _run_all(first)
    assert carry[0] is not None and carry[0].length == 3
    again, _, _ = _chunks(1, [[2]], [False], [True] * 3, [], 2)  # a new reset: fresh chunk
    episodes, new_carry = cut_episodes(again[0], carry)
    assert [len(e.data[0]) for e in episodes] == [2]  # only the new stream's episode
    assert new_carry[0] is not None and new_carry[0].start_number == 2
    assert episodes[0].observations[0][:, 1].tolist() == [0, 1, 2]


def test_neither_the_cut_nor_the_carry_aliases_the_chunk() -> None:
    # Env 0 ends an episode in the chunk, env 1 does not; in every leaf layout.
    for layout in _LAYOUTS:
        chunks, _, _ = _chunks(2, [[2], [10]], [False], [True] * 4, [], 3)
        chunk = _layout(chunks[0], layout)
        cut, carry = cut_columns(chunk, [])
        assert len(cut) == 1 and carry[1] is not None
        kept = [x.copy() for x in cut.observations + cut.data]
        for leaf in chunk.step_observations + chunk.reset_observations + chunk.step_data:
            leaf[...] = -5
        for x, y in zip(cut.observations + cut.data, kept, strict=True):
            np.testing.assert_array_equal(x, y)
        assert np.all(np.concatenate(carry[1].observations[0]) >= 0)
        assert np.all(np.concatenate(carry[1].data[0]) >= 0)


def test_a_long_episode_keeps_few_pieces_and_all_its_rows() -> None:
    # Two envs, one flush per step: env 0 plays 3-step episodes, env 1 one 40-step episode, so
    # env 1's rows pile up over 40 flushes while env 0's come and go.
    total = 45
    chunks, expected, unfinished = _chunks(
        2, [[3], [40, 50]], [False], [True] * (total + 1), list(range(1, total)), total
    )
    carry: Carry | list[OpenEpisode | None] = []
    episodes: list[_Cut] = []
    for chunk in chunks:
        cut, carry = cut_episodes(chunk, carry)
        episodes += cut
        assert isinstance(carry, Carry) and len(carry.pieces) <= _MAX_PIECES
    assert [(e.env_index, len(e.data[0])) for e in episodes if e.env_index == 1] == [(1, 40)]
    (long,) = [e for e in episodes if e.env_index == 1]
    assert long.observations[0][:, 1].tolist() == list(range(41))
    assert [ep.length if ep else 0 for ep in carry] == unfinished
    assert len([e for e in episodes if e.env_index == 0]) == len(expected[0])


def test_carry_pools_round_trip_and_the_earlier_format_loads() -> None:
    chunks, _, unfinished = _chunks(3, [[4], [9], [2, 7]], [False], [True] * 7, [2, 4], 6)
    _, carry = _run_all(chunks)
    assert isinstance(carry, Carry) and len(carry.pieces) > 1  # pieces from several flushes
    again = Carry.from_pools(carry.pools())
    assert len(again.pieces) == 1 and again.length.tolist() == unfinished
    earlier = {"num_envs": 3}  # the per-environment format of earlier checkpoints
    for b, ep in enumerate(carry):
        if ep is not None:
            earlier[str(b)] = {
                "start_number": ep.start_number,
                "next_number": ep.next_number,
                "observations": [np.concatenate(p) for p in ep.observations],
                "data": [np.concatenate(p) for p in ep.data],
            }
    for restored in (again, _carry_from_state(earlier)):
        for a, b in zip(carry, restored, strict=True):
            assert (a is None) == (b is None)
            if a is None or b is None:
                continue
            assert (a.start_number, a.next_number) == (b.start_number, b.next_number)
            for x, y in zip(a.observations + a.data, b.observations + b.data, strict=True):
                np.testing.assert_array_equal(np.concatenate(x), np.concatenate(y))
    # The next chunk cuts the same episodes from either carry.
    more, _, _ = _chunks(3, [[4], [9], [2, 7]], [False], [True] * 13, [2, 4, 6], 12)
    for name, restored in (("pools", again), ("earlier", _carry_from_state(earlier))):
        got, _ = cut_episodes(more[-1], restored)
        want, _ = cut_episodes(more[-1], carry)
        assert [(e.env_index, e.start_number) for e in got] == [
            (e.env_index, e.start_number) for e in want
        ], name
        for e, f in zip(got, want, strict=True):
            for x, y in zip(e.observations + e.data, f.observations + f.data, strict=True):
                np.testing.assert_array_equal(x, y)


def test_a_saved_carry_of_other_leaves_is_refused() -> None:
    rec = _recorder()
    state = _rollout(rec, _start(rec), 4, seed=7)
    _, pending = rec.fetch(state)
    rec.collect(pending)
    saved = rec.flush_state()
    (entry,) = saved["carries"].values()
    assert np.any(entry["is_open"])
    wrong_dtype = dict(entry, observations=[x.astype(np.float64) for x in entry["observations"]])
    one_leaf_less = dict(entry, data=entry["data"][:-1])
    for bad, match in ((wrong_dtype, "this recorder records float32"),
                       (one_leaf_less, "data leaves; this recorder records")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            _recorder().restore_flush_state(dict(saved, carries={"5": bad}))


def test_a_corrupt_saved_carry_is_refused() -> None:
    chunks, _, _ = _chunks(2, [[4], [9]], [False], [True] * 4, [2], 3)
    _, carry = _run_all(chunks)
    pools = carry.pools()
    short = dict(pools, observations=[x[:-1] for x in pools["observations"]])
    with pytest.raises(ValueError, match="rows of an observation leaf"):
        Carry.from_pools(short)
    with pytest.raises(ValueError, match="does not fit"):
        Carry.from_pools(dict(pools, data_len=pools["data_len"][:1]))
    with pytest.raises(ValueError, match="one more observation than steps"):
        Carry.from_pools(dict(pools, obs_len=pools["obs_len"] + pools["is_open"]))


def test_cut_refuses_more_rows_than_fetched() -> None:
    chunks, _, _ = _chunks(1, [[10]], [False], [True] * 4, [], 3)
    chunk = dataclasses.replace(chunks[0], num_steps=np.array([99]))
    with pytest.raises(ValueError, match="fetched"):
        cut_episodes(chunk, [])


# -- Flusher through a recorder ----------------------------------------------------------------


_COMPILED: dict[int, tuple[RecordingWrapper, Any, Any]] = {}
_CAPACITY = 6
_MAX_STEPS = 8
_SHARED: list[RecordingWrapper] = []


def _recorder(**kwargs: Any) -> RecordingWrapper:
    """A recorder with empty host state; compiled functions are shared (compiling is slow)."""
    if not _SHARED:
        _SHARED.append(RecordingWrapper(FakeEnv(time_limit=9), capacity=_CAPACITY))
    rec = _SHARED[0]
    rec.restore_flush_state({"next_token": 1, "carries": {}})
    rec.metadata_fn = kwargs.get("metadata_fn")
    rec.storage, rec.id = None, None
    return rec


def _compiled(rec: RecordingWrapper) -> tuple[Any, Any]:
    if id(rec) not in _COMPILED:

        def rollout(state: Any, actions: jax.Array, steps: jax.Array) -> Any:
            # A traced step count: one compile serves every length.
            body = lambda t, s: jax.vmap(rec.step)(s, actions[t])[0]  # noqa: E731
            return jax.lax.fori_loop(0, steps, body, state)

        _COMPILED[id(rec)] = (rec, jax.jit(jax.vmap(rec.reset)), jax.jit(rollout))
    return _COMPILED[id(rec)][1:]


def _rollout(rec: RecordingWrapper, state: Any, steps: int, seed: int) -> Any:
    num_envs = state.buffer.num_steps.shape[0]
    actions = jax.random.randint(jax.random.PRNGKey(seed), (_MAX_STEPS, num_envs), 0, 3, jnp.int32)
    assert steps <= _MAX_STEPS
    return _compiled(rec)[1](state, actions, jnp.int32(steps))


def _start(rec: RecordingWrapper, num_envs: int = 3) -> Any:
    return _compiled(rec)[0](jax.random.split(jax.random.PRNGKey(0), num_envs))[0]


def test_overflow_raises_with_capacity_and_stores_nothing() -> None:
    rec = _recorder()
    state = _rollout(rec, _start(rec), 8, seed=1)
    with pytest.raises(ValueError, match="capacity is 6") as info:
        rec.fetch(state)
    assert "Flush at least every 6 steps" in str(info.value)
    with pytest.raises(ValueError, match="capacity"):
        rec.fetch(state, num_steps=8)


def test_flushing_the_same_state_twice_is_refused() -> None:
    rec = _recorder()
    state = _rollout(rec, _start(rec), 5, seed=2)
    new_state, pending = rec.fetch(state)
    rec.collect(pending)
    _, pending_again = rec.fetch(new_state)
    rec.collect(pending_again)
    _, stale = rec.fetch(new_state)  # new_state was already flushed
    with pytest.raises(ValueError, match="already flushed"):
        rec.collect(stale)


def _assert_same_episodes(a: list[Any], b: list[Any]) -> None:
    """Two non-empty runs' episodes are equal, array for array."""
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        for u, v in zip(
            jax.tree.leaves(dataclasses.asdict(x)),
            jax.tree.leaves(dataclasses.asdict(y)),
            strict=True,
        ):
            np.testing.assert_array_equal(u, v)


def test_fetch_with_num_steps_equals_exact_fetch() -> None:
    results = []
    for num_steps in (None, 5):
        rec = _recorder()
        state = _rollout(rec, _start(rec), 5, seed=3)
        state, pending = rec.fetch(state, num_steps=num_steps)
        episodes = rec.collect(pending)
        state = _rollout(rec, state, 6, seed=4)
        state, pending = rec.fetch(state, num_steps=None if num_steps is None else 6)
        episodes += rec.collect(pending)
        results.append(episodes)
    _assert_same_episodes(*results)


def test_an_empty_fetch_changes_nothing() -> None:
    """``fetch(num_steps=0)`` (no step row fetched) collects nothing and loses nothing."""
    results = []
    for with_empty_fetches in (False, True):
        rec = _recorder()
        state = _start(rec)
        episodes = []
        if with_empty_fetches:
            state, pending = rec.fetch(state, num_steps=0)
            episodes += rec.collect(pending)
            assert episodes == []
        state = _rollout(rec, state, 5, seed=7)
        state, pending = rec.fetch(state)
        episodes += rec.collect(pending)
        if with_empty_fetches:  # again, now with carries open
            state, pending = rec.fetch(state, num_steps=0)
            assert rec.collect(pending) == []
        state = _rollout(rec, state, 6, seed=8)
        state, pending = rec.fetch(state)
        episodes += rec.collect(pending)
        results.append(episodes)
    _assert_same_episodes(*results)


def test_fetch_told_too_few_steps_is_refused() -> None:
    rec = _recorder()
    state = _rollout(rec, _start(rec), 5, seed=5)
    _, pending = rec.fetch(state, num_steps=3)
    with pytest.raises(ValueError, match="fewer steps than were taken"):
        rec.collect(pending)


def test_metadata_fn_must_return_a_dict() -> None:
    rec = _recorder(metadata_fn=lambda ep: ["not", "a", "dict"])
    state = _rollout(rec, _start(rec), 6, seed=6)
    _, pending = rec.fetch(state)
    with pytest.raises(TypeError, match="metadata_fn must return a dict"):
        rec.collect(pending)


def test_flush_state_round_trip_continues_identically() -> None:
    """A recorder restored from flush_state() continues exactly like the original."""
    rec = _recorder()
    state = _rollout(rec, _start(rec), 4, seed=7)
    state, pending = rec.fetch(state)
    first = rec.collect(pending)
    saved = rec.flush_state()
    assert any(np.any(entry["is_open"]) for entry in saved["carries"].values())

    later = _rollout(rec, state, 4, seed=8)
    _, pending = rec.fetch(later)
    original = rec.collect(pending)

    restored = _recorder()
    restored.restore_flush_state(saved)
    later_again = _rollout(restored, state, 4, seed=8)
    _, pending = restored.fetch(later_again)
    again = restored.collect(pending)
    assert len(original) == len(again) and len(first) + len(original) > 0
    for a, b in zip(original, again, strict=True):
        for x, y in zip(
            jax.tree.leaves(a.observations), jax.tree.leaves(b.observations), strict=True
        ):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(a.actions, b.actions)


def test_states_from_two_flushes_take_each_env_from_its_own_carry() -> None:
    """``_carry_of`` with two live tokens: env b's episode comes from its own token's carry;
    an unknown token is refused."""
    chunks, _, _ = _chunks(3, [[9], [9], [9]], [False], [True] * 4, [1], 3)
    _, first = cut_episodes(chunks[0], [])  # 1 step per env
    _, second = _run_all(chunks)  # 3 steps per env
    flusher = _recorder()._flusher
    flusher._carries = {5: first, 7: second}
    mixed = flusher._carry_of(np.array([5, 7, 0], np.uint32))
    assert [ep.length if ep else None for ep in mixed] == [1, 3, None]
    for b, source in ((0, first), (1, second)):
        got, want = mixed[b], source[b]
        assert got is not None and want is not None
        np.testing.assert_array_equal(
            np.concatenate(got.observations[0]), np.concatenate(want.observations[0])
        )
    with pytest.raises(ValueError, match="flush token is unknown"):
        flusher._carry_of(np.array([5, 6, 0], np.uint32))


def test_failed_write_commits_nothing_and_can_be_retried(tmp_path: Path) -> None:
    from tupli_jax.storage.base import TupliStorageError
    from tupli_jax.storage.file_storage import FileStorage

    store = FileStorage(tmp_path / "store")
    rec = _recorder()
    rec.storage = store
    rec.id = "no-such-benchmark"
    state = _rollout(rec, _start(rec), 6, seed=9)
    state, pending = rec.fetch(state)
    with pytest.raises(TupliStorageError):
        rec.write(pending)
    assert store.list_episodes() == []
    rec.store(name="fake")
    headers = rec.write(pending)
    assert len(headers) > 0 and len(store.list_episodes()) == len(headers)
    state = _rollout(rec, state, 6, seed=10)  # the carry of the first write is in place
    headers2 = rec.write(rec.fetch(state)[1])
    assert {h.id for h in headers}.isdisjoint({h.id for h in headers2})


def test_write_pauses_the_cyclic_gc_and_restores_it(tmp_path: Path) -> None:
    """The GC is off while a write cuts and stores (metadata_fn runs inside it), on again after,
    also after a failed write; a caller's disabled GC stays disabled."""
    import gc

    from tupli_jax.storage.base import TupliStorageError
    from tupli_jax.storage.file_storage import FileStorage

    seen: list[bool] = []

    def metadata(episode: Any) -> dict[str, Any]:
        seen.append(gc.isenabled())
        return {}

    store = FileStorage(tmp_path / "store")
    rec = _recorder(metadata_fn=metadata)
    rec.storage, rec.id = store, "no-such-benchmark"
    state, pending = rec.fetch(_rollout(rec, _start(rec), 6, seed=11))
    assert gc.isenabled()
    with pytest.raises(TupliStorageError):
        rec.write(pending)
    assert gc.isenabled() and seen and not any(seen)
    rec.store(name="fake")
    seen.clear()
    assert len(rec.write(pending)) == len(seen) > 0
    assert gc.isenabled() and not any(seen)
    gc.disable()
    try:
        rec.write(rec.fetch(_rollout(rec, state, 6, seed=12))[1])
        assert not gc.isenabled()
    finally:
        gc.enable()
