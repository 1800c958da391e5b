"""Tests of tupli_jax.testing: FakeEnv and check_env_contract."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jumanji import specs
from jumanji.env import Environment
from jumanji.types import StepType, TimeStep, restart, termination, transition
from jumanji.wrappers import AutoResetWrapper

from tupli_jax.testing import (
    FakeEnv,
    FakeObservation,
    FakeState,
    check_env_contract,
    sample_action,
)

_JITTED: dict[int, Any] = {}


def _run(env: FakeEnv, key: jax.Array, actions: list[int]) -> list[TimeStep]:
    if id(env) not in _JITTED:  # one compile per env (a bound method is a new object each time)
        _JITTED[id(env)] = (env, jax.jit(env.reset), jax.jit(env.step))
    _, reset, step = _JITTED[id(env)]
    state, ts = reset(key)
    out = [ts]
    for a in actions:
        state, ts = step(state, jnp.int32(a))
        out.append(ts)
        if ts.last():
            break
    return out


def test_fake_env_counts_up_and_terminates_at_its_target() -> None:
    env = FakeEnv(time_limit=100, min_target=5, max_target=6)  # target is always 5
    timesteps = _run(env, jax.random.PRNGKey(0), [0, 1, 0, 2])
    counters = [int(ts.observation.counter) for ts in timesteps]
    assert counters == [0, 1, 3, 4, 7]
    assert [int(ts.step_type) for ts in timesteps] == [0, 1, 1, 1, 2]
    assert float(timesteps[-1].discount) == 0.0  # termination
    assert isinstance(timesteps[0].observation, FakeObservation)
    assert timesteps[-1].extras["parity"].dtype == jnp.int32
    assert int(timesteps[-1].extras["parity"]) == 1


def test_fake_env_truncates_at_the_time_limit_with_discount_one() -> None:
    env = FakeEnv(time_limit=3, min_target=50, max_target=51)
    timesteps = _run(env, jax.random.PRNGKey(1), [0] * 10)
    assert len(timesteps) == 4
    assert timesteps[-1].last() and float(timesteps[-1].discount) == 1.0


def test_fake_env_episode_lengths_vary_with_the_key() -> None:
    env = FakeEnv(time_limit=50)
    lengths = {len(_run(env, jax.random.PRNGKey(i), [0] * 25)) - 1 for i in range(12)}
    assert len(lengths) > 3


def test_fake_env_consumes_its_key_every_step() -> None:
    env = FakeEnv()
    state, _ = env.reset(jax.random.PRNGKey(0))
    next_state, _ = env.step(state, jnp.int32(0))
    assert not np.array_equal(np.asarray(state.key), np.asarray(next_state.key))


def test_fake_env_rejects_bad_targets() -> None:
    with pytest.raises(ValueError, match="min_target"):
        FakeEnv(min_target=5, max_target=5)


def test_contract_passes_for_fake_env() -> None:
    assert check_env_contract(FakeEnv(), jax.random.PRNGKey(0), num_steps=40) == []


SPECS = [
    specs.DiscreteArray(4, dtype=jnp.int32),
    specs.MultiDiscreteArray(np.array([2, 3], np.int32)),
    specs.BoundedArray((2,), jnp.float32, -1.0, 1.0),
    specs.BoundedArray((), jnp.int32, 3, 5),
]


def test_sample_action_respects_the_spec() -> None:
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    batches = jax.jit(jax.vmap(lambda k: [sample_action(spec, k) for spec in SPECS]))(keys)
    for spec, actions in zip(SPECS, batches, strict=True):
        for a in actions:
            spec.validate(a)
        assert len(np.unique(np.asarray(actions).reshape(64, -1), axis=0)) > 1


# -- broken environments ----------------------------------------------------------------------


@flax.struct.dataclass
class _NoKeyState:
    count: chex.Array


class _Base(Environment):
    """A tiny env whose pieces the subclasses break one at a time."""

    def __init__(self) -> None:
        super().__init__()

    @cached_property
    def observation_spec(self) -> specs.Array:
        return specs.Array((2,), jnp.float32, "obs")

    @cached_property
    def action_spec(self) -> specs.DiscreteArray:
        return specs.DiscreteArray(2, dtype=jnp.int32)

    @cached_property
    def reward_spec(self) -> specs.Array:
        return specs.Array((), jnp.float32, "reward")

    @cached_property
    def discount_spec(self) -> specs.BoundedArray:
        return specs.BoundedArray((), jnp.float32, 0.0, 1.0, "discount")

    def reset(self, key: chex.PRNGKey) -> tuple[Any, TimeStep]:
        state = FakeState(
            vector=jnp.zeros(2, jnp.float32),
            counter=jnp.int32(0),
            target=jnp.int32(3),
            time=jnp.int32(0),
            key=key,
        )
        return state, restart(jnp.zeros(2, jnp.float32), dtype=jnp.float32)

    def step(self, state: Any, action: chex.Array) -> tuple[Any, TimeStep]:
        key, _ = jax.random.split(state.key)
        state = state.replace(key=key, time=state.time + 1)
        obs = jnp.full(2, state.time, jnp.float32)
        return state, jax.lax.cond(
            state.time >= 3,
            lambda: termination(jnp.float32(1), obs, dtype=jnp.float32),
            lambda: transition(jnp.float32(1), obs, dtype=jnp.float32),
        )


class _NoKey(_Base):
    def reset(self, key: chex.PRNGKey) -> tuple[Any, TimeStep]:
        return _NoKeyState(jnp.int32(0)), restart(jnp.zeros(2, jnp.float32), dtype=jnp.float32)

    def step(self, state: Any, action: chex.Array) -> tuple[Any, TimeStep]:
        obs = jnp.ones(2, jnp.float32)
        return _NoKeyState(state.count + 1), transition(jnp.float32(0), obs, dtype=jnp.float32)


class _WrongObsDtype(_Base):
    def step(self, state: Any, action: chex.Array) -> tuple[Any, TimeStep]:
        state, ts = super().step(state, action)
        return state, ts.replace(observation=ts.observation.astype(jnp.int32))


class _ZeroDiscountMid(_Base):
    def step(self, state: Any, action: chex.Array) -> tuple[Any, TimeStep]:
        state, ts = super().step(state, action)
        return state, ts.replace(discount=jnp.float32(0), step_type=StepType.MID)


class _Impure(_Base):
    def step(self, state: Any, action: chex.Array) -> tuple[Any, TimeStep]:
        state, ts = super().step(state, action)
        rng = np.random.default_rng()
        noise = jax.pure_callback(
            lambda: np.float32(rng.random()), jax.ShapeDtypeStruct((), jnp.float32)
        )
        return state, ts.replace(reward=ts.reward + noise)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (_NoKey(), "no `key`"),
        (_WrongObsDtype(), "observation"),
        (_ZeroDiscountMid(), "discount 0 on a MID"),
        (AutoResetWrapper(_Base()), "resets episodes itself"),
        (_Impure(), "not pure"),
    ],
)
def test_contract_reports_broken_envs(env: Environment, expected: str) -> None:
    problems = check_env_contract(env, jax.random.PRNGKey(0), num_steps=10)
    assert any(expected in p for p in problems), problems
    with pytest.raises(ValueError, match="contract"):
        check_env_contract(env, jax.random.PRNGKey(0), num_steps=10, raise_on_error=True)
