"""``RecordingWrapper``: a jumanji environment that records its own transitions on device.

``reset`` and ``step`` are pure (jit / vmap / scan-safe) and return ``(RecorderState, TimeStep)``;
the transitions go into a preallocated buffer inside the state (see :mod:`tupli_jax.buffer`).
Episodes reach storage through the host-side ``flush`` (see :mod:`tupli_jax.flush`).

Example:
    >>> import jax
    >>> from tupli_jax.testing import FakeEnv
    >>> rec = RecordingWrapper(FakeEnv(), capacity=16)  # storage=tj.FileStorage("tupli_store")
    >>> state, ts = jax.vmap(rec.reset)(jax.random.split(jax.random.PRNGKey(0), 8))
    >>> state, ts = jax.jit(jax.vmap(rec.step))(state, jax.numpy.zeros(8, "int32"))
    >>> int(state.buffer.num_steps[0])
    1
    >>> state = rec.flush(state)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jumanji.env import Environment
from jumanji.types import TimeStep
from jumanji.wrappers import NEXT_OBS_KEY_IN_EXTRAS, AutoResetWrapper, VmapWrapper, Wrapper

from tupli_jax.buffer import BufferSpec, BufferState
from tupli_jax.flush import Flusher, PendingFlush

if TYPE_CHECKING:
    from tupli_jax.episode import EpisodeBatch, EpisodeData
    from tupli_jax.schema import EpisodeHeader
    from tupli_jax.storage.base import TupliStorage

__all__ = ["RecordSpec", "RecorderState", "RecordingWrapper"]


@dataclasses.dataclass(frozen=True)
class RecordSpec:
    """What is recorded (the JAX counterpart of pytupli's ``rl_tuple_cls``).

    Attributes:
        observation: Pure function mapping one observation pytree to the recorded pytree (drop
            or transform leaves); applied to every stored observation. ``None`` keeps it whole.
        extras: Names of ``timestep.extras`` entries to record with each step.

    Example:
        >>> spec = RecordSpec(observation=lambda obs: obs.board, extras=("highest_tile",))
    """

    observation: Callable[[Any], Any] | None = None
    extras: tuple[str, ...] = ()


class RecorderState(flax.struct.PyTreeNode):
    """State of a :class:`RecordingWrapper` for one environment (``vmap`` adds ``[B]``).

    Attributes:
        env_state: The wrapped environment's state.
        buffer: Recorded transitions and their counters.
    """

    env_state: Any
    buffer: BufferState

    @property
    def key(self) -> chex.PRNGKey:
        """The wrapped state's key (jumanji's ``StateProtocol``)."""
        return self.env_state.key


def _select_tree(pred: jax.Array, on_true: Any, on_false: Any, what: str) -> Any:
    """Branchless per-leaf select (fast under vmap, unlike ``lax.cond`` / ``lax.map``)."""
    true_def: Any = jax.tree.structure(on_true)
    false_def: Any = jax.tree.structure(on_false)
    if true_def != false_def:
        raise ValueError(
            f"{what}: env.reset gives {true_def} but env.step gives {false_def}; the recorder "
            "needs both to return the same structure to reset automatically. Fix the environment."
        )
    return jax.tree.map(
        lambda t, f: jax.lax.select(jnp.broadcast_to(pred, jnp.shape(t)), t, f), on_true, on_false
    )


def _reject_auto_reset(env: Environment) -> None:
    """Raises for wrappers whose auto-reset or batching would make recorded episodes wrong."""
    inner: Any = env
    while True:
        if isinstance(inner, AutoResetWrapper | VmapWrapper):
            raise ValueError(
                f"RecordingWrapper expects a single, non-auto-resetting jumanji environment, "
                f"received {env!r}, which contains {type(inner).__name__}. The recorder resets "
                "episodes itself (as AutoResetWrapper(next_obs_in_extras=True) does) and is "
                "batched with jax.vmap; wrap the environment without that wrapper."
            )
        if not isinstance(inner, Wrapper):
            return
        inner = inner._env


def _shape_struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x))


class RecordingWrapper(Wrapper):
    """Records every transition of a jumanji environment into a device buffer.

    The wrapper is itself a jumanji ``Environment``: ``reset(key)`` and ``step(state, action)``
    are pure, work unbatched, under ``jax.vmap`` and inside ``lax.scan``, and reset episodes
    automatically with timesteps bit-identical to ``AutoResetWrapper(env,
    next_obs_in_extras=True)``. The library never jits for you; jit with ``donate_argnums`` so
    the buffer is updated in place. Call ``flush`` (host) at least every ``capacity`` steps.

    Args:
        env: A single (unbatched) jumanji environment that does not reset itself.
        storage: Where ``flush`` stores episodes (e.g. ``tj.FileStorage``).
        capacity: Steps per environment between flushes.
        metadata_fn: Optional host function ``EpisodeData -> dict`` adding episode metadata.
        record: What to record (:class:`RecordSpec`); default: whole observations, no extras.

    Example:
        >>> rec = RecordingWrapper(env, storage=store, capacity=256)  # doctest: +SKIP
        >>> state, ts = jax.vmap(rec.reset)(keys)  # doctest: +SKIP
        >>> step = jax.jit(jax.vmap(rec.step), donate_argnums=0)  # doctest: +SKIP
        >>> state, ts = step(state, actions)  # doctest: +SKIP
        >>> state = rec.flush(state)  # doctest: +SKIP
    """

    def __init__(
        self,
        env: Environment,
        storage: TupliStorage | None = None,
        capacity: int = 1024,
        metadata_fn: Callable[[EpisodeData], dict[str, Any]] | None = None,
        record: RecordSpec | None = None,
    ) -> None:
        _reject_auto_reset(env)
        if record is not None and not isinstance(record, RecordSpec):
            raise TypeError(f"record must be a RecordSpec, received {type(record).__name__}.")
        super().__init__(env)
        self.storage = storage
        self.capacity = capacity
        self.metadata_fn = metadata_fn
        self.record_spec = record if record is not None else RecordSpec()
        self.id: str | None = None
        self._recording = True
        self._rebind()
        self.buffer_spec, observation, data = self._build_spec()
        self._flusher = Flusher(self.buffer_spec, observation=observation, data=data)

    def __repr__(self) -> str:
        return f"RecordingWrapper({self._env!r}, capacity={self.capacity})"

    # -- static configuration -------------------------------------------------------------
    def _record_observation(self, observation: Any) -> Any:
        fn = self.record_spec.observation
        return observation if fn is None else fn(observation)

    def _chosen_extras(self, extras: dict[str, Any]) -> dict[str, Any]:
        missing = [name for name in self.record_spec.extras if name not in extras]
        if missing:
            raise ValueError(
                f"RecordSpec.extras asks for {missing}, but the env's timestep.extras has "
                f"{sorted(extras)}. Record only extras that env.step returns."
            )
        return {name: extras[name] for name in self.record_spec.extras}

    def _build_spec(self) -> tuple[BufferSpec, Any, Any]:
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        env_state, _ = jax.eval_shape(self._env.reset, key)
        action = jax.tree.map(_shape_struct, self._env.action_spec.generate_value())
        _, timestep = jax.eval_shape(self._env.step, env_state, action)
        observation = jax.eval_shape(self._record_observation, timestep.observation)
        extras = self._chosen_extras(timestep.extras)
        transition = {
            "action": action,
            "reward": timestep.reward,
            "discount": timestep.discount,
            "last": jax.ShapeDtypeStruct((), jnp.bool_),
            "next_obs": observation,
            "extras": extras,
        }
        spec = BufferSpec.create(self.capacity, transition, observation)
        data = {
            "action": action,
            "reward": timestep.reward,
            "discount": timestep.discount,
            "extras": extras,
        }
        return spec, observation, data

    # -- recording switch -----------------------------------------------------------------
    @property
    def recording(self) -> bool:
        """Whether step functions traced now write to the buffer."""
        return self._recording

    def activate_recording(self) -> None:
        """Turns recording on for ``reset``/``step`` functions traced after this call.

        ``jax.jit(rec.step)`` made after the call traces anew; a function of yours that calls
        ``rec.step`` and was already jitted keeps its trace (jit it again after the switch).
        """
        self._recording = True
        self._rebind()

    def deactivate_recording(self) -> None:
        """Turns recording off for functions traced after this call (they write nothing).

        Episodes with steps taken while recording was off are never stored.
        """
        self._recording = False
        self._rebind()

    def _rebind(self) -> None:
        """Gives ``rec.reset`` / ``rec.step`` new function objects.

        jax.jit caches traces per function, and two bound methods of one object compare equal,
        so without this ``jax.jit(rec.step)`` after a switch would reuse the old trace.
        """
        cls_reset, cls_step = type(self).reset, type(self).step

        @functools.wraps(cls_reset)
        def reset(key: chex.PRNGKey) -> tuple[RecorderState, TimeStep]:
            return cls_reset(self, key)

        @functools.wraps(cls_step)
        def step(state: RecorderState, action: chex.Array) -> tuple[RecorderState, TimeStep]:
            return cls_step(self, state, action)

        self.__dict__["reset"] = reset
        self.__dict__["step"] = step

    # -- pure environment API -------------------------------------------------------------
    def reset(self, key: chex.PRNGKey) -> tuple[RecorderState, TimeStep]:
        """Resets the environment with ``key`` and starts a new recording stream.

        Pure; jit/vmap-safe. The returned state holds a fresh, empty buffer: flush the previous
        state first, or its unflushed episodes are lost. ``timestep.extras["next_obs"]`` holds
        the reset observation, as after a step.

        Args:
            key: ``[2]`` uint32 PRNG key, consumed by ``env.reset``.

        Returns:
            The recorder state and the env's FIRST timestep.
        """
        env_state, timestep = self._env.reset(key)
        timestep = dataclasses.replace(
            timestep, extras={**timestep.extras, NEXT_OBS_KEY_IN_EXTRAS: timestep.observation}
        )
        buffer = self.buffer_spec.init()
        if self._recording:
            observation = self._record_observation(timestep.observation)
            buffer = self.buffer_spec.record_reset(buffer, observation)
        return RecorderState(env_state=env_state, buffer=buffer), timestep

    def step(self, state: RecorderState, action: chex.Array) -> tuple[RecorderState, TimeStep]:
        """Steps the environment, records the transition and resets after a LAST timestep.

        Pure; jit/vmap/scan-safe, traces once. After a LAST timestep the env is reset with
        ``jax.random.split(env_state.key)[0]`` and the returned timestep carries the reset
        observation, with the true final observation in ``extras["next_obs"]`` (exactly
        ``AutoResetWrapper(env, next_obs_in_extras=True)``).

        Args:
            state: Recorder state of one environment.
            action: One environment's action, with the action spec's shape and dtype.

        Returns:
            The next recorder state and timestep.
        """
        new_state, timestep, _ = self._step(state, action, emit_row=False)
        return new_state, timestep

    def _step_emitting_row(
        self, state: RecorderState, action: chex.Array
    ) -> tuple[RecorderState, TimeStep, Any]:
        """``step`` for a recorder without step storage (``_keep_step_rows_outside``): the
        encoded step row ``(words, large leaves)`` is returned for the caller to stack
        time-major (``tj.record`` makes it a ``lax.scan`` output) and pass to ``_fetch``."""
        return self._step(state, action, emit_row=True)

    def _step(
        self, state: RecorderState, action: chex.Array, emit_row: bool
    ) -> tuple[RecorderState, TimeStep, Any]:
        env_state, timestep = self._env.step(state.env_state, action)
        reset_key = jax.random.split(env_state.key)[0]
        reset_env_state, reset_timestep = self._env.reset(reset_key)
        last = timestep.last()
        next_env_state = _select_tree(last, reset_env_state, env_state, "environment state")
        observation = _select_tree(
            last, reset_timestep.observation, timestep.observation, "observation"
        )
        out = dataclasses.replace(
            timestep,
            observation=observation,
            extras={**timestep.extras, NEXT_OBS_KEY_IN_EXTRAS: timestep.observation},
        )
        buffer = state.buffer
        row = None
        if self._recording:
            transition = {
                "action": action,
                "reward": timestep.reward,
                "discount": timestep.discount,
                "last": last,
                "next_obs": self._record_observation(timestep.observation),
                "extras": self._chosen_extras(timestep.extras),
            }
            reset_observation = self._record_observation(reset_timestep.observation)
            if emit_row:
                buffer, row = self.buffer_spec.record_step_row(
                    buffer, transition, reset_observation, last
                )
            else:
                buffer = self.buffer_spec.record_step(buffer, transition, reset_observation, last)
        else:
            if emit_row:
                raise ValueError("step rows can only be emitted while recording is on.")
            buffer = self.buffer_spec.skip_step(buffer)
        return RecorderState(env_state=next_env_state, buffer=buffer), out, row

    # -- host side: flushing ---------------------------------------------------------------
    def fetch(
        self, state: RecorderState, num_steps: int | None = None
    ) -> tuple[RecorderState, PendingFlush]:
        """Starts copying the recorded rows to the host and returns the emptied state.

        Host call. Pair with :meth:`write` (in fetch order) to overlap the copy and the disk
        write with the next chunk of steps. With ``num_steps`` (steps taken since the last
        flush) it does not wait for the device; without it, it reads the counters first.

        Raises:
            ValueError: The buffer overflowed (message says "capacity" and what to do).
        """
        return self._flusher.fetch(state, num_steps=num_steps)

    def _keep_step_rows_outside(self) -> None:
        """Switches to a buffer without step storage (before any ``reset``): steps must then go
        through ``_step_emitting_row`` and flushes through ``_fetch(state, step_rows)``."""
        self.buffer_spec = dataclasses.replace(self.buffer_spec, step_storage=False)
        self._flusher.spec = self.buffer_spec

    def _fetch(self, state: RecorderState, step_rows: Any) -> tuple[RecorderState, PendingFlush]:
        """``fetch`` for a recorder without step storage: ``step_rows`` are the rows that
        ``_step_emitting_row`` returned since the last flush, stacked time-major
        ``(words [T, B, Ws], large leaves [T, B, n_i])``."""
        return self._flusher.fetch(state, step_rows=step_rows)

    def write(self, pending: PendingFlush, batch_id: str | None = None) -> Sequence[EpisodeHeader]:
        """Cuts the fetched rows into episodes and stores the complete ones (one batch call).

        Host call; returns after the episodes are durable. Unfinished episodes stay on the host.
        If storing raises, nothing is committed and the same ``pending`` can be written again.
        Returns the stored episodes' headers as the storage gives them (from a ``FileStorage``
        without ``metadata_fn``: a lazy ``EpisodeHeaders`` sequence).

        Args:
            pending: From :meth:`fetch`; write them in fetch order.
            batch_id: Passed to ``storage.record_episodes`` to make the write idempotent (a
                repeated batch id stores nothing twice), e.g. ``f"{job}:chunk:{k}"``.
        """
        storage = self._require_storage("write")
        return self._flusher.write(
            pending,
            storage,
            benchmark_id=self._require_id("write"),
            metadata_fn=self.metadata_fn,
            batch_id=batch_id,
        )

    def _cut(self, pending: PendingFlush) -> tuple[EpisodeBatch, Callable[[], None]]:
        """``write`` without the storing (``Flusher.cut``): the batch for ``self.storage`` and the
        carry's commit; for ``tj.record``'s writer, which stores batch k while it cuts k + 1."""
        self._require_storage("write")
        return self._flusher.cut(
            pending, benchmark_id=self._require_id("write"), metadata_fn=self.metadata_fn
        )

    def collect(self, pending: PendingFlush) -> list[EpisodeData]:
        """Like :meth:`write` but returns the complete episodes instead of storing them."""
        return self._flusher.collect(
            pending, benchmark_id=self.id or "", metadata_fn=self.metadata_fn
        )

    def flush(self, state: RecorderState) -> RecorderState:
        """Stores every complete episode recorded in ``state`` and returns the emptied state.

        Host call: one device-to-host transfer of the used rows, one
        ``storage.record_episodes`` call; episodes are listed and loadable when it returns.
        Unfinished episodes are carried on the host, so episodes longer than ``capacity`` are
        stored whole. Keep using the returned state (an already-flushed state is refused).

        Raises:
            ValueError: The buffer overflowed (flush at least every ``capacity`` steps), or the
                state was already flushed.
        """
        storage = self._require_storage("flush")
        benchmark_id = self._require_id("flush")
        # No device-side copy: the rows are written before the caller can step the state again.
        new_state, pending = self._flusher.fetch(state, copy=False)
        self._flusher.write(
            pending, storage, benchmark_id=benchmark_id, metadata_fn=self.metadata_fn
        )
        return new_state

    def flush_state(self) -> dict[str, Any]:
        """The host carry (unfinished episodes), as plain numpy/python for checkpointing.

        Take it after every pending :meth:`write` has returned, together with the device
        state that the last :meth:`fetch` / :meth:`flush` returned.
        """
        return self._flusher.state_dict()

    def restore_flush_state(self, flush_state: dict[str, Any]) -> None:
        """Restores a carry saved by :meth:`flush_state` (with the matching device state)."""
        self._flusher.load_state_dict(flush_state)

    # -- benchmark management ---------------------------------------------------------------
    def _require_storage(self, what: str) -> TupliStorage:
        if self.storage is None:
            raise ValueError(
                f"RecordingWrapper.{what} needs a storage, but the recorder has none. Create it "
                "with RecordingWrapper(env, storage=tj.FileStorage('tupli_store'))."
            )
        return self.storage

    def _require_id(self, what: str) -> str:
        if self.id is None:
            raise ValueError(
                f"RecordingWrapper.{what} needs a stored benchmark (episodes belong to one); "
                "call rec.store(name=...) first, or load the recorder with "
                "RecordingWrapper.load(storage, benchmark_id)."
            )
        return self.id

    def store(
        self,
        name: str,
        description: str = "",
        difficulty: str | None = None,
        version: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> str:
        """Stores the wrapped env as a benchmark and sets ``rec.id`` (hash dedup; the hash
        ignores ``capacity``).

        Returns:
            The benchmark id (an existing one for an identical env and metadata).
        """
        from tupli_jax.benchmark import store_benchmark

        storage = self._require_storage("store")
        self.id = store_benchmark(
            storage,
            self._env,
            name=name,
            description=description,
            difficulty=difficulty,
            version=version,
            metadata=metadata,
        )
        return self.id

    def publish(self, publish_in: str = "global") -> None:
        """Publishes the stored benchmark in ``publish_in``."""
        from tupli_jax.benchmark import publish_benchmark

        publish_benchmark(self._require_storage("publish"), self._require_id("publish"), publish_in)

    def delete(
        self,
        delete_artifacts: bool = False,
        delete_episodes: bool = True,
        related_artifacts: Sequence[str] = (),
    ) -> None:
        """Deletes the stored benchmark (and its episodes by default); clears ``rec.id``."""
        from tupli_jax.benchmark import delete_benchmark

        delete_benchmark(
            self._require_storage("delete"),
            self._require_id("delete"),
            delete_artifacts=delete_artifacts,
            delete_episodes=delete_episodes,
            related_artifacts=related_artifacts,
        )
        self.id = None

    @classmethod
    def load(
        cls,
        storage: TupliStorage,
        benchmark_id: str,
        capacity: int = 1024,
        trusted: bool = False,
        metadata_fn: Callable[[EpisodeData], dict[str, Any]] | None = None,
        record: RecordSpec | None = None,
    ) -> RecordingWrapper:
        """Rebuilds a recorder for a stored benchmark (``rec.id`` set to ``benchmark_id``).

        Args:
            storage: The store holding the benchmark.
            benchmark_id: Its id.
            capacity: Buffer capacity of the new recorder.
            trusted: Allow deserializing env classes outside the allow-list.
            metadata_fn: As in the constructor.
            record: As in the constructor.
        """
        from tupli_jax.benchmark import load_env

        env = load_env(storage, benchmark_id, trusted=trusted)
        rec = cls(env, storage=storage, capacity=capacity, metadata_fn=metadata_fn, record=record)
        rec.id = benchmark_id
        return rec
