"""``FakeEnv``: a small deterministic jumanji environment for tests and examples.

A counter moves up by ``1 + action`` each step; the episode terminates once the counter reaches
a target drawn from the reset key (so lengths vary with the key and the actions) and is
truncated at ``time_limit`` steps. The observation is a NamedTuple pytree (a float vector and an
int counter), the state carries a ``key`` that every step consumes, and ``extras`` holds the
counter's parity, so every recorder feature has something to record.

Example:
    >>> import jax
    >>> env = FakeEnv(time_limit=5)
    >>> state, ts = env.reset(jax.random.PRNGKey(0))
    >>> state, ts = env.step(state, jax.numpy.int32(1))
    >>> int(ts.observation.counter)
    2
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple, cast

import chex
import flax.struct
import jax
import jax.numpy as jnp
from jumanji import specs
from jumanji.env import Environment
from jumanji.types import StepType, TimeStep, restart

__all__ = ["FakeEnv", "FakeObservation", "FakeState"]


class FakeObservation(NamedTuple):
    """Observation of :class:`FakeEnv`.

    Attributes:
        vector: ``[obs_dim]`` float32 features.
        counter: ``[]`` int32 counter.
    """

    vector: chex.Array
    counter: chex.Array


@flax.struct.dataclass
class FakeState:
    """State of :class:`FakeEnv`.

    Attributes:
        vector: ``[obs_dim]`` float32.
        counter: ``[]`` int32, grows by ``1 + action`` per step.
        target: ``[]`` int32, the episode terminates when ``counter >= target``.
        time: ``[]`` int32 steps taken in the episode.
        key: ``[2]`` uint32 PRNG key, split at every step.
    """

    vector: chex.Array
    counter: chex.Array
    target: chex.Array
    time: chex.Array
    key: chex.PRNGKey


class FakeEnv(Environment[FakeState, specs.DiscreteArray, FakeObservation]):
    """Deterministic counter environment with termination and truncation.

    Args:
        time_limit: Steps after which an episode is truncated (discount stays 1).
        min_target: Smallest termination target.
        max_target: Largest termination target (exclusive).
        obs_dim: Length of the observation vector.
        num_actions: Number of discrete actions (action ``a`` adds ``1 + a`` to the counter).
    """

    def __init__(
        self,
        time_limit: int = 12,
        min_target: int = 2,
        max_target: int = 20,
        obs_dim: int = 3,
        num_actions: int = 3,
    ) -> None:
        if not 0 < min_target < max_target:
            raise ValueError(
                f"expected 0 < min_target < max_target, received {min_target}, {max_target}."
            )
        self.time_limit = time_limit
        self.min_target = min_target
        self.max_target = max_target
        self.obs_dim = obs_dim
        self.num_actions = num_actions
        super().__init__()

    def __repr__(self) -> str:
        return f"FakeEnv(time_limit={self.time_limit}, obs_dim={self.obs_dim})"

    def _observation(self, state: FakeState) -> FakeObservation:
        return FakeObservation(vector=state.vector, counter=state.counter)

    def reset(self, key: chex.PRNGKey) -> tuple[FakeState, TimeStep[FakeObservation]]:
        """Starts an episode; ``key`` is consumed (split into target, vector and state key)."""
        target_key, vector_key, state_key = jax.random.split(key, 3)
        state = FakeState(
            vector=jax.random.uniform(vector_key, (self.obs_dim,), jnp.float32),
            counter=jnp.zeros((), jnp.int32),
            target=jax.random.randint(
                target_key, (), self.min_target, self.max_target, dtype=jnp.int32
            ),
            time=jnp.zeros((), jnp.int32),
            key=state_key,
        )
        timestep = restart(self._observation(state), extras=self._extras(state), dtype=jnp.float32)
        return state, timestep

    def _extras(self, state: FakeState) -> dict[str, chex.Array]:
        return {"parity": state.counter % 2}

    def step(
        self, state: FakeState, action: chex.Array
    ) -> tuple[FakeState, TimeStep[FakeObservation]]:
        """Advances the counter by ``1 + action``; pure and jit/vmap-safe."""
        key, noise_key = jax.random.split(state.key)
        action = jnp.asarray(action, jnp.int32)
        counter = state.counter + 1 + action
        noise = jax.random.uniform(noise_key, (self.obs_dim,), jnp.float32)
        vector = 0.5 * state.vector + noise + action.astype(jnp.float32)
        next_state = FakeState(
            vector=vector, counter=counter, target=state.target, time=state.time + 1, key=key
        )
        observation = self._observation(next_state)
        reward = (counter % 3).astype(jnp.float32) - 0.5
        extras = self._extras(next_state)
        terminal = counter >= state.target
        timeout = next_state.time >= self.time_limit
        # Branchless (cheap to compile and to vmap): LAST on termination or time-out, discount 0
        # only on termination.
        step_type = jnp.where(terminal | timeout, StepType.LAST, StepType.MID)
        timestep = TimeStep(
            step_type=cast(StepType, step_type),
            reward=reward,
            discount=jnp.where(terminal, jnp.float32(0), jnp.float32(1)),
            observation=observation,
            extras=extras,
        )
        return next_state, timestep

    @cached_property
    def observation_spec(self) -> specs.Spec[FakeObservation]:
        """A ``FakeObservation`` of a float32 vector and an int32 counter."""
        return specs.Spec(
            FakeObservation,
            "ObservationSpec",
            vector=specs.Array((self.obs_dim,), jnp.float32, "vector"),
            counter=specs.Array((), jnp.int32, "counter"),
        )

    @cached_property
    def action_spec(self) -> specs.DiscreteArray:
        """``num_actions`` discrete actions, int32."""
        return specs.DiscreteArray(self.num_actions, dtype=jnp.int32, name="action")

    @cached_property
    def reward_spec(self) -> specs.Array:
        """float32 scalar reward."""
        return specs.Array((), jnp.float32, "reward")

    @cached_property
    def discount_spec(self) -> specs.BoundedArray:
        """float32 scalar discount in [0, 1]."""
        return specs.BoundedArray((), jnp.float32, 0.0, 1.0, "discount")
