"""Shared by the recorder benchmarks: a tiny pure-JAX CartPole for jumanji, and the rollout.

``CartPole`` is the classic cart-pole (gymnasium's ``CartPole-v1`` dynamics: Euler integration,
``tau = 0.02``, termination past 2.4 m or 12 degrees, reward 1 per step) written as a jumanji
``Environment``: 4 float32 observations, 2 discrete actions, truncated after 500 steps. It is
the cheap, small-observation case of the benchmarks (16 B of observation per step).

``make_rollout`` builds the timed loop of every benchmark: ``jit(scan(vmap(step)))`` with the
recorder's / ``tj.record``'s random policy and per-episode return and length tracking (the same
per-step work as ``tupli_jax.pipeline``), the carry donated; ``prepare`` compiles it (timed) and
``time_run`` times ``run`` calls from a fresh ``init``.

Example:
    >>> import jax
    >>> env = CartPole()
    >>> state, ts = env.reset(jax.random.PRNGKey(0))
    >>> state, ts = env.step(state, jax.numpy.int32(1))
    >>> ts.observation.shape
    (4,)
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, cast

import chex
import flax.struct
import jax
import jax.numpy as jnp
import jumanji
from jumanji import specs
from jumanji.env import Environment
from jumanji.types import StepType, TimeStep, restart

import tupli_jax as tj
from tupli_jax.schema import FilterEQ

__all__ = [
    "CartPole",
    "CartPoleState",
    "ENV_IDS",
    "Prepared",
    "Rollout",
    "compile_rollout",
    "make_env",
    "make_rollout",
    "prepare",
    "record_job",
    "record_once",
    "time_run",
]

# Benchmark name -> how to build it.
ENV_IDS = ("CartPole", "Game2048-v1", "Snake-v1")


class CartPoleState(flax.struct.PyTreeNode):
    """State of one cart-pole.

    Attributes:
        physics: ``[4]`` float32 ``(x, x_dot, theta, theta_dot)``.
        step_count: ``[]`` int32 steps taken in this episode.
        key: ``[2]`` uint32 PRNG key (used by auto-reset wrappers).
    """

    physics: chex.Array
    step_count: chex.Array
    key: chex.PRNGKey


class CartPole(Environment[CartPoleState, specs.DiscreteArray, chex.Array]):
    """Classic cart-pole as a pure-JAX jumanji environment (time limit 500 steps).

    Example:
        >>> env = CartPole()
        >>> env.action_spec.num_values
        2
    """

    gravity = 9.8
    mass_cart = 1.0
    mass_pole = 0.1
    half_length = 0.5
    force_mag = 10.0
    tau = 0.02
    theta_threshold = 12 * 2 * math.pi / 360
    x_threshold = 2.4
    time_limit = 500

    def __repr__(self) -> str:
        return "CartPole()"

    def reset(self, key: chex.PRNGKey) -> tuple[CartPoleState, TimeStep[chex.Array]]:
        """Starts an episode at a uniform random state in ``[-0.05, 0.05]^4``."""
        physics = jax.random.uniform(key, (4,), jnp.float32, -0.05, 0.05)
        state = CartPoleState(physics=physics, step_count=jnp.zeros((), jnp.int32), key=key)
        return state, restart(physics, dtype=jnp.float32)

    def step(
        self, state: CartPoleState, action: chex.Array
    ) -> tuple[CartPoleState, TimeStep[chex.Array]]:
        """One Euler step of ``tau`` seconds pushing left (0) or right (1)."""
        x, x_dot, theta, theta_dot = (state.physics[i] for i in range(4))
        f32 = jnp.float32
        force = jnp.where(action == 1, f32(self.force_mag), f32(-self.force_mag))
        cos, sin = jnp.cos(theta), jnp.sin(theta)
        total_mass = f32(self.mass_cart + self.mass_pole)
        pole_ml = f32(self.mass_pole * self.half_length)
        temp = (force + pole_ml * theta_dot**2 * sin) / total_mass
        theta_acc = (f32(self.gravity) * sin - cos * temp) / (
            f32(self.half_length) * (f32(4.0 / 3.0) - f32(self.mass_pole) * cos**2 / total_mass)
        )
        x_acc = temp - pole_ml * theta_acc * cos / total_mass
        tau = f32(self.tau)
        physics = jnp.stack(
            [
                x + tau * x_dot,
                x_dot + tau * x_acc,
                theta + tau * theta_dot,
                theta_dot + tau * theta_acc,
            ]
        )
        step_count = state.step_count + 1
        failed = (jnp.abs(physics[0]) > f32(self.x_threshold)) | (
            jnp.abs(physics[2]) > f32(self.theta_threshold)
        )
        timeout = step_count >= self.time_limit
        # Branchless (cheap under vmap): LAST on failure (discount 0) or at the time limit.
        timestep = TimeStep(
            step_type=cast(StepType, jnp.where(failed | timeout, StepType.LAST, StepType.MID)),
            reward=jnp.ones((), jnp.float32),
            discount=jnp.where(failed, f32(0.0), f32(1.0)),
            observation=physics,
            extras={},
        )
        return CartPoleState(physics=physics, step_count=step_count, key=state.key), timestep

    @property
    def observation_spec(self) -> specs.Array:
        """``[4]`` float32 ``(x, x_dot, theta, theta_dot)``."""
        return specs.Array((4,), jnp.float32, "observation")

    @property
    def action_spec(self) -> specs.DiscreteArray:
        """Push left (0) or right (1)."""
        return specs.DiscreteArray(2, jnp.int32, "action")


def make_env(env_id: str) -> Any:
    """Builds a benchmark environment: ``"CartPole"`` (above) or a registered jumanji id."""
    if env_id == "CartPole":
        return CartPole()
    return jumanji.make(env_id)


class Rollout(NamedTuple):
    """Carry of the benchmark rollout (``B`` environments).

    Attributes:
        env_state: Batched env (or recorder) state.
        observation: Batched observation the policy sees next.
        key: ``[2]`` uint32, one split per step.
        episode_return: ``[B]`` float32 running return of each env's episode.
        episode_length: ``[B]`` int32 running length.
        extra: Anything else updated per step (a Flashbax buffer state), else ``None``.
    """

    env_state: Any
    observation: Any
    key: jax.Array
    episode_return: jax.Array
    episode_length: jax.Array
    extra: Any = None


Hook = Callable[[Any, Any, Any, TimeStep[Any]], Any]


def make_rollout(
    env: Any,
    num_envs: int,
    length: int,
    extra: Callable[[], Any] | None = None,
    hook: Hook | None = None,
) -> tuple[Callable[[jax.Array], Rollout], Callable[[Rollout], tuple[Rollout, Any]]]:
    """Builds ``init(key) -> Rollout`` and ``run(rollout) -> (rollout, per-step outputs)``.

    ``run`` is ``length`` steps of ``jax.lax.scan`` over ``jax.vmap(env.step)`` with a uniform
    random policy over ``env.action_spec``; neither is jitted here (``init`` should be, so that
    the observation and the env state never share a buffer; ``run`` with ``donate_argnums=0``).

    Args:
        env: A jumanji env that resets itself (``AutoResetWrapper``) or a ``RecordingWrapper``.
        num_envs: ``B``.
        length: Steps per ``run`` call.
        extra: Builds the initial ``Rollout.extra`` (e.g. an empty Flashbax buffer).
        hook: ``hook(extra, observation, action, timestep) -> extra`` after each batched step.

    Returns:
        ``(init, run)``; ``run``'s per-step outputs are ``(last, return, length)``, ``[T, B]``.
    """
    from tupli_jax.pipeline import uniform_policy

    policy = jax.vmap(uniform_policy(env.action_spec))
    step = jax.vmap(env.step)

    def init(key: jax.Array) -> Rollout:
        key, reset_key = jax.random.split(key)
        env_state, timestep = jax.vmap(env.reset)(jax.random.split(reset_key, num_envs))
        return Rollout(
            env_state=env_state,
            observation=timestep.observation,
            key=key,
            episode_return=jnp.zeros(num_envs, jnp.float32),
            episode_length=jnp.zeros(num_envs, jnp.int32),
            extra=None if extra is None else extra(),
        )

    def one_step(c: Rollout, _: None) -> tuple[Rollout, Any]:
        key, act_key = jax.random.split(c.key)
        action = policy(jax.random.split(act_key, num_envs), c.observation)
        env_state, timestep = step(c.env_state, action)
        new_extra = c.extra if hook is None else hook(c.extra, c.observation, action, timestep)
        episode_return = c.episode_return + timestep.reward.astype(jnp.float32)
        episode_length = c.episode_length + 1
        last = timestep.last()
        new = Rollout(
            env_state=env_state,
            observation=timestep.observation,
            key=key,
            episode_return=jnp.where(last, jnp.zeros_like(episode_return), episode_return),
            episode_length=jnp.where(last, jnp.zeros_like(episode_length), episode_length),
            extra=new_extra,
        )
        return new, (last, episode_return, episode_length)

    def run(c: Rollout) -> tuple[Rollout, Any]:
        return jax.lax.scan(one_step, c, None, length=length)

    return init, run


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A compiled rollout: ``init`` (jitted) and ``run`` (compiled, carry donated)."""

    init: Callable[[jax.Array], Rollout]
    run: Any
    compile_s: float


def prepare(env: Any, num_envs: int, length: int, extra: Any = None, hook: Any = None) -> Prepared:
    """``make_rollout`` compiled by ``compile_rollout``."""
    init, run = make_rollout(env, num_envs, length, extra=extra, hook=hook)
    return compile_rollout(init, run)


def compile_rollout(init: Callable[[jax.Array], Any], run: Callable[[Any], Any]) -> Prepared:
    """Jits ``init``, compiles ``run`` with its carry donated (timed: trace + lower + compile)."""
    init_j = jax.jit(init)
    carry = jax.block_until_ready(init_j(jax.random.PRNGKey(0)))
    start = time.perf_counter()
    compiled = jax.jit(run, donate_argnums=0).lower(carry).compile()
    return Prepared(init_j, compiled, time.perf_counter() - start)


def _size(root: Path) -> tuple[int, int]:
    """Bytes of the shard files and of the whole store directory."""
    files = [p for p in root.rglob("*") if p.is_file()]
    shards = sum(p.stat().st_size for p in files if p.suffix == ".arrow")
    return shards, sum(p.stat().st_size for p in files)


def record_job(env: Any, storage: Any, num_envs: int, steps: int, capacity: int) -> tj.RecordResult:
    """The benchmarks' ``tj.record`` job: seed 0, benchmark ``"bench"``, no progress bar."""
    return tj.record(
        env,
        storage=storage,
        num_envs=num_envs,
        num_steps=steps,
        capacity=capacity,
        seed=0,
        name="bench",
        progress=False,
    )


def record_once(env: Any, num_envs: int, steps: int, capacity: int) -> dict[str, Any]:
    """One ``tj.record`` job into a new store; its figures (the store is deleted after).

    ``seconds`` is the job's wall time minus ``RecordResult.compile_seconds`` (opening the
    empty store is not timed). ``index_seconds``: the first episode query after the job, which
    inserts the ``episodes`` rows of the job's episode runs (``tupli_jax/storage/_runs.py``);
    ``store_bytes`` is measured after it.
    """
    root = Path(tempfile.mkdtemp(prefix="bench_record_"))
    try:
        storage = tj.FileStorage(root)
        start = time.perf_counter()
        result = record_job(env, storage, num_envs, steps, capacity)
        wall = time.perf_counter() - start
        shards, _ = _size(root)
        start = time.perf_counter()
        storage.list_episodes(FilterEQ(key="n_tuples", value=-1))  # matches none
        index = time.perf_counter() - start
        _, total = _size(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "seconds": wall - result.compile_seconds,
        "compile": result.compile_seconds,
        "episodes": result.num_episodes,
        "transitions": result.num_transitions,
        "shard_bytes": shards,
        "store_bytes": total,
        "index_seconds": index,
    }


def time_run(p: Prepared, key: jax.Array, chunks: int = 1) -> float:
    """Seconds of ``chunks`` calls of ``run`` from a fresh ``init`` (init not timed)."""
    carry = jax.block_until_ready(p.init(key))
    start = time.perf_counter()
    outs = None
    for _ in range(chunks):
        carry, outs = p.run(carry)
    jax.block_until_ready((carry, outs))
    return time.perf_counter() - start
