"""``check_env_contract``: checks that an environment can be recorded by ``RecordingWrapper``.

Run it on your own jumanji environment before recording with it.

Example:
    >>> import jax
    >>> from tupli_jax.testing import FakeEnv, check_env_contract
    >>> check_env_contract(FakeEnv(), jax.random.PRNGKey(0), num_steps=20)
    []
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jumanji import specs
from jumanji.env import Environment
from jumanji.types import StepType, TimeStep
from jumanji.wrappers import AutoResetWrapper, VmapWrapper, Wrapper

__all__ = ["check_env_contract", "sample_action"]


def sample_action(spec: Any, key: chex.PRNGKey) -> Any:
    """A uniformly random action of a jumanji action spec. Pure; jit/vmap-safe.

    Args:
        spec: ``DiscreteArray``, ``MultiDiscreteArray``, ``BoundedArray``, ``Array`` or a nested
            ``Spec`` of those.
        key: ``[2]`` uint32 PRNG key, consumed.

    Returns:
        An action with the spec's shape and dtype (an ``Array`` spec gives its zero value).
    """
    if isinstance(spec, specs.DiscreteArray):
        return jax.random.randint(key, spec.shape, 0, spec.num_values, dtype=spec.dtype)
    if isinstance(spec, specs.MultiDiscreteArray):
        return jax.random.randint(key, spec.shape, 0, spec.num_values, dtype=spec.dtype)
    if isinstance(spec, specs.BoundedArray):
        if jnp.issubdtype(spec.dtype, jnp.integer):
            return jax.random.randint(
                key, spec.shape, spec.minimum, jnp.asarray(spec.maximum) + 1, dtype=spec.dtype
            )
        if jnp.issubdtype(spec.dtype, jnp.floating):
            return jax.random.uniform(
                key, spec.shape, spec.dtype, jnp.asarray(spec.minimum), jnp.asarray(spec.maximum)
            )
        return spec.generate_value()
    if isinstance(spec, specs.Array):
        return spec.generate_value()
    sub_specs = spec.get_specs() if hasattr(spec, "get_specs") else None
    if sub_specs is None:
        return spec.generate_value()
    keys = jax.random.split(key, max(len(sub_specs), 1))
    values = {
        name: sample_action(s, k) for (name, s), k in zip(sub_specs.items(), keys, strict=False)
    }
    return spec.constructor(**values)


def _avals(tree: Any) -> list[tuple[str, tuple[int, ...], str]]:
    return [
        (jax.tree_util.keystr(path), tuple(np.shape(x)), str(jnp.result_type(x)))
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _same_tree(a: Any, b: Any) -> bool:
    structure: Any = jax.tree.structure(a)
    return bool(structure == jax.tree.structure(b)) and _avals(a) == _avals(b)


def _validate(spec: Any, value: Any, what: str, problems: list[str]) -> None:
    try:
        spec.validate(value)
    except Exception as error:  # specs raise ValueError / TypeError / AssertionError
        problems.append(f"{what} does not match its spec {spec!r}: {error}")


def _bitwise_equal(a: Any, b: Any) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(
        np.array_equal(np.asarray(x), np.asarray(y), equal_nan=True)
        for x, y in zip(la, lb, strict=True)
    )


def check_env_contract(
    env: Environment, key: chex.PRNGKey, num_steps: int = 50, raise_on_error: bool = False
) -> list[str]:
    """Checks the contract the recorder relies on.

    Checks: ``reset``/``step`` jit and are pure (same inputs, same outputs); outputs match the
    observation / reward / discount specs; the state has a ``key`` and keeps its structure and
    dtypes; timesteps keep theirs; ``reset`` gives FIRST with discount 1; ``step`` gives MID or
    LAST, never FIRST; discounts lie in [0, 1]; a MID step has discount > 0 (a zero discount
    must come with LAST).

    Args:
        env: A single (unbatched) jumanji environment.
        key: ``[2]`` uint32 PRNG key, consumed.
        num_steps: Steps to take with uniformly random actions (resetting after LAST).
        raise_on_error: Raise ``ValueError`` listing the problems instead of returning them.

    Returns:
        Problems found, each a sentence; empty when the env passes.
    """
    problems: list[str] = []
    inner: Any = env
    while isinstance(inner, Wrapper):
        if isinstance(inner, AutoResetWrapper | VmapWrapper):
            problems.append(
                f"{env!r} contains {type(inner).__name__}, which resets episodes itself or "
                "batches the env; pass the single, non-resetting env (the recorder resets it)."
            )
        inner = inner._env
    reset_key, run_key = jax.random.split(key)
    try:
        reset = jax.jit(env.reset)
        step = jax.jit(env.step)
        state, timestep = reset(reset_key)
    except Exception as error:
        problems.append(f"env.reset does not run under jax.jit: {type(error).__name__}: {error}")
        return _finish(problems, raise_on_error)
    if not hasattr(state, "key"):
        problems.append(
            f"the state ({type(state).__name__}) has no `key` attribute; jumanji's auto-reset "
            "(and the recorder) derive the next reset key from state.key."
        )
    again_state, again_timestep = reset(reset_key)
    if not (_bitwise_equal(state, again_state) and _bitwise_equal(timestep, again_timestep)):
        problems.append("env.reset is not pure: the same key gave different outputs.")
    if not isinstance(timestep, TimeStep):
        problems.append(f"env.reset must return a jumanji TimeStep, got {type(timestep).__name__}.")
        return _finish(problems, raise_on_error)
    if int(timestep.step_type) != int(StepType.FIRST):
        problems.append(f"env.reset returned step_type {int(timestep.step_type)}, expected FIRST.")
    _validate(env.observation_spec, timestep.observation, "reset observation", problems)
    _validate(env.reward_spec, timestep.reward, "reset reward", problems)
    _validate(env.discount_spec, timestep.discount, "reset discount", problems)
    if not np.all(np.asarray(timestep.discount) == 1):
        problems.append(f"env.reset returned discount {timestep.discount}, expected 1.")

    first_state, first_timestep = state, timestep
    step_state = step_timestep = None
    for i in range(num_steps):
        run_key, action_key = jax.random.split(run_key)
        action = sample_action(env.action_spec, action_key)
        try:
            next_state, next_timestep = step(state, action)
        except Exception as error:
            problems.append(f"env.step does not run under jax.jit: {type(error).__name__}: {error}")
            break
        if i == 0:
            again = step(state, action)
            if not _bitwise_equal((next_state, next_timestep), again):
                problems.append("env.step is not pure: the same inputs gave different outputs.")
        if not _same_tree(next_state, first_state):
            problems.append(
                f"step {i}: the state changed structure, shapes or dtypes: reset gave "
                f"{_avals(first_state)}, step gave {_avals(next_state)}."
            )
            break
        if step_timestep is not None and not _same_tree(next_timestep, step_timestep):
            problems.append(
                f"step {i}: the timestep changed structure, shapes or dtypes: "
                f"{_avals(step_timestep)} became {_avals(next_timestep)}."
            )
            break
        if not _same_tree(next_timestep.observation, first_timestep.observation):
            problems.append(
                f"step {i}: the observation differs in structure, shape or dtype from reset's."
            )
            break
        step_state, step_timestep = next_state, next_timestep
        _validate(
            env.observation_spec, next_timestep.observation, f"step {i} observation", problems
        )
        _validate(env.reward_spec, next_timestep.reward, f"step {i} reward", problems)
        _validate(env.discount_spec, next_timestep.discount, f"step {i} discount", problems)
        step_type = int(next_timestep.step_type)
        discount = np.asarray(next_timestep.discount)
        if step_type == int(StepType.FIRST):
            problems.append(
                f"step {i} returned FIRST: the env seems to reset itself; RecordingWrapper needs "
                "an env that returns LAST and lets the wrapper reset."
            )
        if np.any(discount < 0) or np.any(discount > 1):
            problems.append(f"step {i} returned discount {discount}, outside [0, 1].")
        if step_type == int(StepType.MID) and np.any(discount == 0):
            problems.append(f"step {i} returned discount 0 on a MID step; end with LAST instead.")
        if problems:
            break
        state = next_state
        if step_type == int(StepType.LAST):
            reset_key, sub = jax.random.split(reset_key)
            state, _ = reset(sub)
    del step_state
    return _finish(problems, raise_on_error)


def _finish(problems: list[str], raise_on_error: bool) -> list[str]:
    if problems and raise_on_error:
        raise ValueError(
            "the environment breaks the recorder's contract:\n- " + "\n- ".join(problems)
        )
    return problems
