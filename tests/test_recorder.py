"""Tests of tupli_jax.recorder: the RecordingWrapper against plain reference loops and jumanji.

Reference episodes are built step by step from ``env.reset`` / ``env.step`` with a manual reset
(``jax.random.split(state.key)[0]``, the documented rule), never from the buffer code; stored
episodes are read back from a real ``FileStorage`` on ``tmp_path``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import jumanji
import numpy as np
import pytest
from jumanji.wrappers import AutoResetWrapper, VmapWrapper

from tupli_jax.episode import EpisodeData
from tupli_jax.recorder import RecordingWrapper, RecordSpec
from tupli_jax.storage.file_storage import FileStorage
from tupli_jax.testing import FakeEnv

ENV = FakeEnv(time_limit=12, min_target=3, max_target=20)
_JIT: dict[str, Any] = {}


def _carried_steps(rec: RecordingWrapper) -> list[int]:
    """Steps of each env's unfinished episode in the recorder's (only) carry; checks that the
    saved pools hold exactly those rows (plus one reset observation per open episode)."""
    (entry,) = rec.flush_state()["carries"].values()
    steps = np.asarray(entry["data_len"]).tolist()
    open_envs = int(np.sum(entry["is_open"]))
    for leaf in entry["data"]:
        assert (0 if leaf is None else len(leaf)) == sum(steps)
    for leaf in entry["observations"]:
        assert len(leaf) == sum(steps) + open_envs
    return steps


def _env_fns(env: Any) -> tuple[Any, Any]:
    key = f"{id(env)}"
    if key not in _JIT:
        _JIT[key] = (env, jax.jit(env.reset), jax.jit(env.step))
    return _JIT[key][1], _JIT[key][2]


def _reference(
    env: Any,
    keys: np.ndarray,
    actions: np.ndarray,
    recording: list[bool],
    obs_fn: Any = None,
    extras: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], list[int]]:
    """Complete, fully recorded episodes of a plain loop; ``recording[t]`` for step t."""
    reset, step = _env_fns(env)
    obs_fn = obs_fn or (lambda o: o)
    episodes, unfinished = [], []
    for b in range(keys.shape[0]):
        state, ts = reset(keys[b])
        ep: dict[str, Any] = {"obs": [obs_fn(ts.observation)], "act": [], "rew": [], "disc": []}
        ep["extras"] = {name: [] for name in extras}
        complete = True  # the first reset is recorded (recording starts on in these tests)
        for t in range(actions.shape[0]):
            state, ts = step(state, actions[t, b])
            complete = complete and recording[t]
            ep["obs"].append(obs_fn(ts.observation))
            ep["act"].append(actions[t, b])
            ep["rew"].append(ts.reward)
            ep["disc"].append(ts.discount)
            for name in extras:
                ep["extras"][name].append(ts.extras[name])
            if bool(ts.last()):
                if complete:
                    episodes.append(
                        {
                            "observations": jax.tree.map(lambda *x: np.stack(x), *ep["obs"]),
                            "actions": np.stack(ep["act"]),
                            "rewards": np.stack(ep["rew"]),
                            "discounts": np.stack(ep["disc"]),
                            "extras": {k: np.stack(v) for k, v in ep["extras"].items()},
                            "terminated": float(ts.discount) == 0.0,
                        }
                    )
                state, ts = reset(jax.random.split(state.key)[0])
                ep = {"obs": [obs_fn(ts.observation)], "act": [], "rew": [], "disc": []}
                ep["extras"] = {name: [] for name in extras}
                complete = recording[t]
        unfinished.append(len(ep["act"]))
    return episodes, unfinished


def _fingerprint(observations: Any, length: int) -> tuple[Any, ...]:
    first = tuple(np.asarray(leaf)[0].tobytes() for leaf in jax.tree.leaves(observations))
    return (*first, length)


def _assert_same_episodes(stored: list[EpisodeData], expected: list[dict[str, Any]]) -> None:
    assert len(stored) == len(expected) > 0
    stored = sorted(stored, key=lambda e: _fingerprint(e.observations, e.length))
    expected = sorted(expected, key=lambda e: _fingerprint(e["observations"], len(e["actions"])))
    for got, want in zip(stored, expected, strict=True):
        assert jax.tree.structure(got.observations) == jax.tree.structure(want["observations"])
        for g, w in zip(
            jax.tree.leaves(got.observations), jax.tree.leaves(want["observations"]), strict=True
        ):
            assert g.dtype == w.dtype
            np.testing.assert_array_equal(g, w)
        np.testing.assert_array_equal(got.actions, want["actions"])
        np.testing.assert_array_equal(got.rewards, want["rewards"])
        np.testing.assert_array_equal(got.discounts, want["discounts"])
        assert set(got.extras) == set(want["extras"])
        for name, values in want["extras"].items():
            np.testing.assert_array_equal(got.extras[name], values)
        assert got.terminated == want["terminated"] and got.truncated == (not want["terminated"])


def _stored(store: FileStorage) -> list[EpisodeData]:
    return [store.load_episode(h.id) for h in store.list_episodes()]


# -- episodes equal a reference loop -------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vmapped", "unbatched", "nested", "recording_gap"])
def test_stored_episodes_equal_the_reference_loop(tmp_path: Path, mode: str) -> None:
    batch = {"vmapped": (3,), "unbatched": (), "nested": (2, 2), "recording_gap": (3,)}[mode]
    num_envs = int(np.prod(batch))
    steps = 40
    store = FileStorage(tmp_path / "store")
    rec = RecordingWrapper(ENV, storage=store, capacity=5)  # shorter than most episodes
    rec.store(name="fake")
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(1), num_envs))
    actions = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (steps, num_envs), 0, 3))
    actions = actions.astype(np.int32)
    recording = [not (mode == "recording_gap" and 12 <= t < 17) for t in range(steps)]

    def batched(fn: Any) -> Any:
        for _ in batch:
            fn = jax.vmap(fn)
        return fn

    reset = jax.jit(batched(rec.reset))
    state, _ = reset(keys.reshape(*batch, 2))
    example = (state, actions[0].reshape(batch))
    # The switch applies to functions traced after it: trace (compile) each one in its mode.
    step_on = step_off = jax.jit(batched(rec.step), donate_argnums=0).lower(*example).compile()
    if not all(recording):
        rec.deactivate_recording()
        step_off = jax.jit(batched(rec.step), donate_argnums=0).lower(*example).compile()
        rec.activate_recording()
    since_flush, flushes = 0, 0
    flush_every = [3, 5, 1, 4, 5, 2, 5, 5]  # irregular, never more than the capacity
    for t in range(steps):
        step = step_on if recording[t] else step_off
        state, _ = step(state, actions[t].reshape(batch))
        since_flush += 1
        if since_flush == flush_every[flushes % len(flush_every)]:
            state = rec.flush(state)
            since_flush, flushes = 0, flushes + 1
    state = rec.flush(state)

    expected, unfinished = _reference(ENV, keys, actions, recording)
    stored = _stored(store)
    _assert_same_episodes(stored, expected)
    if mode != "recording_gap":
        carried_steps = _carried_steps(rec)
        assert carried_steps == unfinished
        assert sum(e.length for e in stored) + sum(carried_steps) == steps * num_envs


def test_time_major_step_rows_equal_the_reference_loop(tmp_path: Path) -> None:
    # tj.record's path: no step storage in the buffer, step rows stacked [T, B] by lax.scan.
    num_envs, steps = 4, 40
    store = FileStorage(tmp_path / "store")
    rec = RecordingWrapper(ENV, storage=store, capacity=5)
    rec._keep_step_rows_outside()
    rec.store(name="fake")
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(3), num_envs))
    actions = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (steps, num_envs), 0, 3))
    actions = actions.astype(np.int32)
    state, _ = jax.jit(jax.vmap(rec.reset))(keys)
    assert all(x.shape[1] == 0 for x in jax.tree.leaves(state.buffer.step_big))
    step = jax.vmap(rec._step_emitting_row)

    @jax.jit
    def chunk(state: Any, acts: jax.Array) -> tuple[Any, Any]:
        def one(s: Any, a: jax.Array) -> tuple[Any, Any]:
            s, _, row = step(s, a)
            return s, row

        return jax.lax.scan(one, state, acts)

    with pytest.raises(ValueError, match="step_rows"):
        rec.fetch(state)
    t = 0
    for length in [3, 5, 1, 4, 5, 2, 5, 5, 5, 5]:  # irregular, never more than the capacity
        state, rows = chunk(state, jnp.asarray(actions[t : t + length]))
        state, pending = rec._fetch(state, rows)
        assert pending.time_major and pending.num_step_rows == length
        rec.write(pending)
        t += length
    assert t == steps
    expected, unfinished = _reference(ENV, keys, actions, [True] * steps)
    stored = _stored(store)
    _assert_same_episodes(stored, expected)
    carried = _carried_steps(rec)
    assert carried == unfinished


def test_one_step_episodes_fill_the_buffer_without_overflow(tmp_path: Path) -> None:
    """Worst case for reset rows: every step ends an episode; ``capacity`` steps still fit."""
    env = FakeEnv(min_target=1, max_target=2)  # the counter reaches 1 at the first step
    store = FileStorage(tmp_path / "store")
    rec = RecordingWrapper(env, storage=store, capacity=4)
    rec.store(name="one-step")
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(9), 2))
    actions = np.asarray(jax.random.randint(jax.random.PRNGKey(10), (8, 2), 0, 3), np.int32)
    state, _ = jax.jit(jax.vmap(rec.reset))(keys)
    step = jax.jit(jax.vmap(rec.step))
    for t in range(8):
        state, _ = step(state, actions[t])
        if t % 4 == 3:
            state = rec.flush(state)  # exactly `capacity` steps since the last flush
    expected, unfinished = _reference(env, keys, actions, [True] * 8)
    assert len(expected) == 16 and unfinished == [0, 0]
    _assert_same_episodes(_stored(store), expected)


_SHARED: dict[str, Any] = {}


def _shared(store: FileStorage) -> tuple[RecordingWrapper, Any, Any]:
    """One recorder (capacity 5) and its jitted vmapped reset/step, shared to save compiles."""
    if not _SHARED:
        rec = RecordingWrapper(ENV, capacity=5)
        _SHARED.update(
            rec=rec, reset=jax.jit(jax.vmap(rec.reset)), step=jax.jit(jax.vmap(rec.step))
        )
    rec = _SHARED["rec"]
    rec.restore_flush_state({"next_token": 1, "carries": {}})
    rec.storage, rec.id, rec.metadata_fn = store, None, None
    return rec, _SHARED["reset"], _SHARED["step"]


def test_a_new_reset_drops_the_old_partial_episode(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "store")
    rec, reset, step = _shared(store)
    rec.store(name="fake")
    old_keys = jax.random.split(jax.random.PRNGKey(3), 3)
    state, _ = reset(old_keys)
    for _ in range(2):  # far too few steps to finish an episode (targets >= 3)
        state, _ = step(state, jnp.zeros(3, jnp.int32))
    rec.flush(state)  # the partial episodes are carried on the host
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(4), 3))
    actions = np.zeros((10, 3), np.int32)
    state, _ = reset(keys)  # a new stream: the carried partial episodes are dropped
    for t in range(10):
        state, _ = step(state, actions[t])
        if t % 5 == 4:
            state = rec.flush(state)
    expected, _ = _reference(ENV, keys, actions, [True] * 10)
    _assert_same_episodes(_stored(store), expected)


def test_record_spec_transforms_observations_and_keeps_extras(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "store")
    obs_fn = lambda obs: {"v": obs.vector[:2] * 2}  # noqa: E731
    seen: list[int] = []

    def metadata(ep: EpisodeData) -> dict[str, Any]:
        seen.append(ep.length)
        return {"length": ep.length, "first_action": int(ep.actions[0])}

    rec = RecordingWrapper(
        ENV,
        storage=store,
        capacity=16,
        metadata_fn=metadata,
        record=RecordSpec(observation=obs_fn, extras=("parity",)),
    )
    rec.store(name="fake-spec")
    keys = np.asarray(jax.random.split(jax.random.PRNGKey(5), 2))
    actions = np.asarray(jax.random.randint(jax.random.PRNGKey(6), (16, 2), 0, 3), np.int32)
    state, _ = jax.vmap(rec.reset)(keys)
    step = jax.jit(jax.vmap(rec.step))
    for t in range(16):
        state, _ = step(state, actions[t])
    rec.flush(state)
    expected, _ = _reference(ENV, keys, actions, [True] * 16, obs_fn=obs_fn, extras=("parity",))
    stored = _stored(store)
    _assert_same_episodes(stored, expected)
    headers = store.list_episodes()
    assert sorted(seen) == sorted(h.n_tuples for h in headers)
    for h, ep in zip(headers, [store.load_episode(h.id) for h in headers], strict=True):
        assert h.metadata == {"length": ep.length, "first_action": int(ep.actions[0])}


def test_unknown_extras_are_refused() -> None:
    with pytest.raises(ValueError, match=r"\['nope'\].*\['parity'\]"):
        RecordingWrapper(ENV, record=RecordSpec(extras=("nope",)))


# -- jumanji compatibility ----------------------------------------------------------------------


def _rollouts(env: Any, rec: RecordingWrapper, steps: int) -> tuple[Any, Any]:
    """jit(scan(vmap(step))) for the recorder and AutoResetWrapper(next_obs_in_extras=True)."""
    auto = AutoResetWrapper(env, next_obs_in_extras=True)

    def run(wrapper: Any) -> Any:
        def rollout(keys: jax.Array, actions: jax.Array) -> Any:
            state, first = jax.vmap(wrapper.reset)(keys)

            def body(state: Any, action: jax.Array) -> Any:
                state, ts = jax.vmap(wrapper.step)(state, action)
                return state, ts

            state, timesteps = jax.lax.scan(body, state, actions)
            return state, first, timesteps

        return jax.jit(rollout)

    return run(rec), run(auto)


@pytest.mark.parametrize("env_id", ["FakeEnv", "Snake-v1", "Game2048-v1"])
def test_bit_identical_to_auto_reset_and_counts_consistent(tmp_path: Path, env_id: str) -> None:
    # jumanji's envs mix bool and int arithmetic: they need JAX's standard promotion rules.
    promotion = "strict" if env_id == "FakeEnv" else "standard"
    with jax.numpy_dtype_promotion(promotion):
        _check_against_auto_reset(tmp_path, env_id)


def _check_against_auto_reset(tmp_path: Path, env_id: str) -> None:
    env = ENV if env_id == "FakeEnv" else jumanji.make(env_id)
    steps = {"FakeEnv": 30, "Snake-v1": 40, "Game2048-v1": 120}[env_id]
    num_envs = 2
    store = FileStorage(tmp_path / "store")
    rec = RecordingWrapper(env, storage=store, capacity=steps)
    rec.store(name=env_id)
    rec_run, auto_run = _rollouts(env, rec, steps)
    keys = jax.random.split(jax.random.PRNGKey(7), num_envs)
    num_actions = int(env.action_spec.num_values)
    actions = jax.random.randint(jax.random.PRNGKey(8), (steps, num_envs), 0, num_actions)
    actions = actions.astype(env.action_spec.dtype)
    rec_state, rec_first, rec_ts = rec_run(keys, actions)
    if env_id != "Game2048-v1":  # the bit-identity check on two envs is enough (compile time)
        auto_state, auto_first, auto_ts = auto_run(keys, actions)
        pairs = [(rec_first, auto_first), (rec_ts, auto_ts), (rec_state.env_state, auto_state)]
        for a, b in pairs:
            assert jax.tree.structure(a) == jax.tree.structure(b)
            for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
                assert x.dtype == y.dtype
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    rec.flush(rec_state)
    # Expected episodes, rebuilt from the returned timesteps (bit-identical to jumanji's
    # AutoResetWrapper above), not from the buffer.
    expected = []
    unfinished = []
    ts_np = jax.tree.map(np.asarray, (rec_first, rec_ts))
    first, timesteps = ts_np
    for b in range(num_envs):
        obs = [jax.tree.map(lambda x, b=b: x[b], first.observation)]
        acts: list[Any] = []
        rews: list[Any] = []
        discs: list[Any] = []
        for t in range(steps):
            acts.append(np.asarray(actions)[t, b])
            rews.append(timesteps.reward[t, b])
            discs.append(timesteps.discount[t, b])
            obs.append(jax.tree.map(lambda x, t=t, b=b: x[t, b], timesteps.extras["next_obs"]))
            if timesteps.step_type[t, b] == 2:
                expected.append(
                    {
                        "observations": jax.tree.map(lambda *x: np.stack(x), *obs),
                        "actions": np.stack(acts),
                        "rewards": np.stack(rews),
                        "discounts": np.stack(discs),
                        "extras": {},
                        "terminated": float(discs[-1]) == 0.0,
                    }
                )
                obs = [jax.tree.map(lambda x, t=t, b=b: x[t, b], timesteps.observation)]
                acts, rews, discs = [], [], []
        unfinished.append(len(acts))
    stored = _stored(store)
    _assert_same_episodes(stored, expected)
    carried = _carried_steps(rec)
    assert carried == unfinished
    assert sum(h.n_tuples for h in store.list_episodes()) + sum(carried) == steps * num_envs


def test_step_traces_once_and_reset_matches_step_structure() -> None:
    rec = RecordingWrapper(ENV, capacity=4)
    step = jax.jit(chex.assert_max_traces(rec.step, n=1))
    state, _ = jax.jit(rec.reset)(jax.random.PRNGKey(0))
    for a in range(5):  # through a LAST and a buffer overflow: still one trace
        state, _ = step(state, jnp.int32(a % 3))
    vstep = jax.jit(jax.vmap(chex.assert_max_traces(lambda s, a: rec.step(s, a), n=1)))
    vstate, _ = jax.jit(jax.vmap(rec.reset))(jax.random.split(jax.random.PRNGKey(0), 4))
    for _ in range(3):
        vstate, _ = vstep(vstate, jnp.ones(4, jnp.int32))

    def either(pred: jax.Array, key: jax.Array, state: Any, action: jax.Array) -> Any:
        return jax.lax.cond(pred, lambda: rec.reset(key), lambda: rec.step(state, action))

    # lax.cond refuses, at trace time, branches whose outputs differ in structure or dtype.
    out_state, _ = jax.eval_shape(
        either, jnp.bool_(True), jax.random.PRNGKey(1), state, jnp.int32(0)
    )
    assert jax.tree.structure(out_state) == jax.tree.structure(state)
    reset_state = jax.eval_shape(rec.reset, jax.random.PRNGKey(1))[0]
    step_state = jax.eval_shape(rec.step, state, jnp.int32(0))[0]
    assert jax.tree.structure(reset_state) == jax.tree.structure(step_state)
    for a, b in zip(jax.tree.leaves(reset_state), jax.tree.leaves(step_state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
    assert np.array_equal(state.key, state.env_state.key)


def test_recording_off_traces_no_buffer_writes() -> None:
    rec = RecordingWrapper(ENV, capacity=4)
    state, _ = rec.reset(jax.random.PRNGKey(0))
    on = str(jax.make_jaxpr(rec.step)(state, jnp.int32(0)))
    rec.deactivate_recording()
    assert not rec.recording
    off = str(jax.make_jaxpr(rec.step)(state, jnp.int32(0)))
    assert "scatter" in on and "scatter" not in off
    new_state, _ = jax.jit(rec.step)(state, jnp.int32(0))
    for a, b in zip(jax.tree.leaves(state.buffer), jax.tree.leaves(new_state.buffer), strict=True):
        if a.shape == () and a.dtype == jnp.uint32:
            continue  # step_number / flush_token
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.buffer.step_number) == 1 and int(new_state.buffer.num_steps) == 0


@pytest.mark.parametrize(
    "wrap", [lambda e: AutoResetWrapper(e), lambda e: VmapWrapper(e)], ids=["auto", "vmap"]
)
def test_auto_resetting_or_batched_envs_are_refused(wrap: Any) -> None:
    with pytest.raises(ValueError, match="non-auto-resetting"):
        RecordingWrapper(wrap(ENV))


def test_flush_needs_storage_and_wrong_actions_fail_clearly() -> None:
    rec = RecordingWrapper(ENV, capacity=4)
    state, _ = rec.reset(jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs a storage"):
        rec.flush(state)
    with pytest.raises(TypeError, match=r"\['action'\]: expected dtype int32, received float32"):
        rec.step(state, jnp.float32(1))


# -- benchmark management -----------------------------------------------------------------------


def test_store_publish_load_delete(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "store")
    rec = RecordingWrapper(ENV, storage=store, capacity=8)
    bench_id = rec.store(name="fake", description="d", metadata={"k": 1})
    assert rec.id == bench_id
    other = RecordingWrapper(ENV, storage=store, capacity=64)  # the hash ignores capacity
    assert other.store(name="fake", description="d", metadata={"k": 1}) == bench_id
    assert RecordingWrapper(ENV, storage=store).store(name="fake-2") != bench_id

    rec.publish()
    (header,) = [b for b in store.list_benchmarks() if b.id == bench_id]
    assert "global" in header.published_in

    shared, reset, step = _shared(store)
    shared.id = bench_id
    state, _ = reset(jax.random.split(jax.random.PRNGKey(0), 3))
    for _ in range(5):
        state, _ = step(state, jnp.ones(3, jnp.int32))
    shared.flush(state)
    assert len(store.list_episodes()) > 0

    loaded = RecordingWrapper.load(store, bench_id, capacity=3, trusted=True)
    assert loaded.id == bench_id and loaded.capacity == 3
    assert isinstance(loaded.unwrapped, FakeEnv) and loaded.unwrapped.time_limit == 12

    rec.delete()
    assert rec.id is None
    assert store.list_episodes() == []
    assert bench_id not in {b.id for b in store.list_benchmarks()}
    with pytest.raises(ValueError, match="store"):
        rec.publish()
