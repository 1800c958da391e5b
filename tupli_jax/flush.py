"""Host side of recording: device-to-host transfer, cutting episodes, carrying unfinished ones.

``fetch`` starts one asynchronous copy of the used buffer rows and hands back the emptied
device state; ``write`` waits for the copy, cuts complete episodes into packed columns
(:func:`cut_columns` in ``tupli_jax._cut``, pure numpy), stores them with one
``storage.record_episode_batch`` call and only then commits the carry.

Exactly once: every step row carries the stream's step ``number`` and every reset row the
``number`` of its episode's first step. An episode is emitted only when its reset row and all
its step rows, with consecutive numbers ending in a LAST row, have been seen; unfinished ones
are carried on the host under a *flush token* that the emptied state carries, so a state that
was already flushed (stale token), a new stream (token 0) or an unrecorded stretch (a gap in
the numbers) can never produce a duplicate or partial episode.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from tupli_jax._cut import (
    MOD,
    Carry,
    CutColumns,
    HostChunk,
    OpenEpisode,
    cut_columns,
)
from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.storage._files import no_gc

if TYPE_CHECKING:
    from tupli_jax.buffer import BufferSpec
    from tupli_jax.recorder import RecorderState
    from tupli_jax.schema import EpisodeHeader
    from tupli_jax.storage.base import TupliStorage

__all__ = [
    "Carry",
    "CutColumns",
    "Flusher",
    "HostChunk",
    "OpenEpisode",
    "PendingFlush",
    "cut_columns",
    "store_batch",
]


@dataclasses.dataclass
class PendingFlush:
    """Rows fetched from the device (copy in flight) and the bookkeeping to commit them.

    Attributes:
        arrays: Sliced device arrays (new buffers, safe to donate the state meanwhile).
        num_step_rows: Step rows fetched per environment.
        num_reset_rows: Reset rows fetched per environment.
        new_token: Flush token given to the emptied state.
        exact: Whether the row counts were read from the device (else given by the caller).
        time_major: The step rows are ``[T, B, ...]`` (kept by the caller), not ``[B, C, ...]``.
    """

    arrays: dict[str, Any]
    num_step_rows: int
    num_reset_rows: int
    new_token: int
    exact: bool
    time_major: bool = False


@partial(jax.jit, static_argnames=("steps", "resets"))
def _take_rows(buffer: Any, steps: int, resets: int) -> dict[str, Any]:
    """New device arrays holding the first rows (safe while the state is donated on)."""

    def rows(x: jax.Array, n: int) -> jax.Array:
        # jnp.copy keeps the result a new buffer even when the slice is the whole array.
        return jnp.copy(jax.lax.slice_in_dim(x, 0, n, axis=x.ndim - 2))

    return {
        "step_words": rows(buffer.step_words, steps),
        "step_big": [rows(x, steps) for x in buffer.step_big],
        "reset_words": rows(buffer.reset_words, resets),
        "reset_big": [rows(x, resets) for x in buffer.reset_big],
        "num_steps": jnp.copy(buffer.num_steps),
        "num_resets": jnp.copy(buffer.num_resets),
        "step_number": jnp.copy(buffer.step_number),
        "flush_token": jnp.copy(buffer.flush_token),
    }


def _view_rows(buffer: Any, steps: int, resets: int) -> dict[str, Any]:
    """The first rows without a device copy where all rows are used (synchronous flush)."""

    def rows(x: jax.Array, n: int) -> jax.Array:
        return x if x.shape[-2] == n else jax.lax.slice_in_dim(x, 0, n, axis=x.ndim - 2)

    return {
        "step_words": rows(buffer.step_words, steps),
        "step_big": [rows(x, steps) for x in buffer.step_big],
        "reset_words": rows(buffer.reset_words, resets),
        "reset_big": [rows(x, resets) for x in buffer.reset_big],
        "num_steps": buffer.num_steps,
        "num_resets": buffer.num_resets,
        "step_number": buffer.step_number,
        "flush_token": buffer.flush_token,
    }


def _round_up(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _overflow_error(capacity: int) -> ValueError:
    return ValueError(
        f"RecordingWrapper buffer overflow: more steps were taken since the last flush than "
        f"the capacity is {capacity} steps per environment, so steps after the first "
        f"{capacity} were not recorded. Flush at least every {capacity} steps (e.g. scan "
        f"{capacity} steps, then rec.flush(state)) or create the recorder with a larger "
        "capacity. Nothing was stored; call rec.reset to start a new stream."
    )


def store_batch(
    storage: TupliStorage, batch: EpisodeBatch, batch_id: str | None = None
) -> Sequence[EpisodeHeader]:
    """Stores a cut batch with one ``record_episode_batch`` call (the GC paused), or with
    ``record_episodes`` on a storage without it; an empty batch without ``batch_id`` is not
    stored. Returns the storage's headers.

    Example:
        >>> import tempfile
        >>> from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
        >>> from tupli_jax.storage.file_storage import FileStorage
        >>> store = FileStorage(tempfile.mkdtemp())
        >>> bench = store.store_benchmark(
        ...     BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b")))
        >>> batch = EpisodeBatch(
        ...     observations=np.arange(5.0), actions=np.zeros(3, np.int32),
        ...     rewards=np.ones(3, np.float32), discounts=np.array([1, 0, 1], np.float32),
        ...     n_tuples=np.array([2, 1]), terminated=np.array([True, False]),
        ...     truncated=np.array([False, True]), benchmark_id=bench.id)
        >>> [h.n_tuples for h in store_batch(store, batch, batch_id="job:0")]
        [2, 1]
        >>> _ = store_batch(store, batch, batch_id="job:0")  # the same batch id: stored once
        >>> len(store.list_episodes())
        2
    """
    if batch_id is None and len(batch) == 0:
        return []
    with no_gc():
        record_batch = getattr(storage, "record_episode_batch", None)
        if callable(record_batch):
            headers: Sequence[EpisodeHeader] = record_batch(batch, batch_id=batch_id)
            return headers
        record: Any = storage.record_episodes  # a storage with record_episodes only
        episodes = batch.episodes()
        return record(episodes) if batch_id is None else record(episodes, batch_id=batch_id)


class Flusher:
    """Host bookkeeping of one recorder: carried episodes per flush token.

    Args:
        spec: The recorder's buffer spec.
        observation: Example (shapes) of one recorded observation.
        data: Example of one step's ``{"action", "reward", "discount", "extras"}``.
    """

    def __init__(self, spec: BufferSpec, observation: Any, data: Any) -> None:
        self.spec = spec
        self.observation_treedef: Any = jax.tree.structure(observation)
        self.data_treedef: Any = jax.tree.structure(data)
        # (shape, dtype) of each leaf, to check restored carries against
        self._leaf_specs = {
            field: [(tuple(x.shape), np.dtype(x.dtype)) for x in jax.tree.leaves(example)]
            for field, example in (("observations", observation), ("data", data))
        }
        self._carries: dict[int, Carry] = {}
        self._next_token = 1 + secrets.randbelow(MOD - 1)
        # fetch (main thread) and write or cut (a pipeline's writer) may run concurrently; the
        # lock is never held during device transfers or storage I/O.
        self._lock = threading.RLock()

    def _issue_token(self) -> int:
        with self._lock:
            token = self._next_token
            self._next_token = token % (MOD - 1) + 1  # never 0, the "fresh from reset" token
        return token

    # -- fetch ----------------------------------------------------------------------------
    def fetch(
        self,
        state: RecorderState,
        num_steps: int | None = None,
        copy: bool = True,
        step_rows: Any = None,
    ) -> tuple[RecorderState, PendingFlush]:
        """Slices the used rows on device, starts their copy to host, empties the state.

        With ``copy=False`` the rows are not copied on device first: only for a caller that
        writes the pending flush before it steps the returned state again (``flush``). With
        ``step_rows`` (a buffer without step storage) the step rows are those arrays, stacked
        time-major ``(words [T, B, Ws], large leaves [T, B, n_i])``; nothing is copied.
        """
        buffer = state.buffer
        capacity = self.spec.capacity
        if (step_rows is None) != self.spec.step_storage:
            raise ValueError(
                "step_rows must be given exactly when the buffer keeps no step rows "
                f"(step_storage={self.spec.step_storage})."
            )
        if num_steps is None or step_rows is not None:
            steps = np.asarray(jax.device_get(buffer.num_steps))
            resets = np.asarray(jax.device_get(buffer.num_resets))
            max_steps = int(steps.max(initial=0))
            if max_steps > capacity:
                raise _overflow_error(capacity)
            # Row counts rounded up to a power of two: few distinct slice programs to compile.
            step_count = min(_round_up(max_steps), capacity)
            if step_rows is not None:  # one row per step since the last flush, for every env
                step_count = int(step_rows[0].shape[0])
            reset_rows = min(_round_up(int(resets.max(initial=0))), self.spec.num_reset_rows)
            exact = True
        else:
            if num_steps < 0:
                raise ValueError(f"num_steps must be >= 0, received {num_steps}.")
            if num_steps > capacity:
                raise _overflow_error(capacity)
            step_count = num_steps
            reset_rows = min(num_steps + 1, self.spec.num_reset_rows)
            exact = False
        take = _take_rows if copy else _view_rows
        if step_rows is not None:  # fresh scan outputs: never donated, no device copy needed
            arrays = take(buffer, steps=0, resets=reset_rows)
            arrays["step_words"], arrays["step_big"] = step_rows[0], list(step_rows[1])
        else:
            arrays = take(buffer, steps=step_count, resets=reset_rows)
        for leaf in jax.tree.leaves(arrays):
            leaf.copy_to_host_async()
        token = self._issue_token()
        emptied = buffer.replace(
            num_steps=jnp.zeros_like(buffer.num_steps),
            num_resets=jnp.zeros_like(buffer.num_resets),
            flush_token=jnp.full(jnp.shape(buffer.flush_token), token, jnp.uint32),
        )
        pending = PendingFlush(
            arrays, step_count, reset_rows, token, exact, time_major=step_rows is not None
        )
        return state.replace(buffer=emptied), pending

    # -- cut ------------------------------------------------------------------------------
    def _host_chunk(self, pending: PendingFlush) -> tuple[HostChunk, np.ndarray]:
        host = jax.device_get(pending.arrays)
        tokens = np.asarray(host["flush_token"]).reshape(-1)
        num_envs = tokens.shape[0]
        steps = np.asarray(host["num_steps"]).reshape(-1)
        if steps.max(initial=0) > pending.num_step_rows:
            if steps.max() > self.spec.capacity:
                raise _overflow_error(self.spec.capacity)
            raise ValueError(
                f"fetch(num_steps={pending.num_step_rows}) was told fewer steps than were taken "
                f"({int(steps.max())}); pass the number of steps taken since the last flush."
            )

        def rows(x: np.ndarray) -> np.ndarray:
            return np.asarray(x).reshape(num_envs, *np.shape(x)[-2:])

        def time_major_rows(x: np.ndarray) -> np.ndarray:  # [T, B..., n] -> [T, B, n]
            x = np.asarray(x)
            return x.reshape(x.shape[0], num_envs, x.shape[-1])

        step_rows = time_major_rows if pending.time_major else rows
        step_leaves = self.spec.step_codec.decode(
            step_rows(host["step_words"]), [step_rows(x) for x in host["step_big"]]
        )
        if pending.time_major:  # decoded in [T, B] memory (copying each leaf into [B, T]
            # memory took longer than the cut's gathers from it), then viewed as [B, T]
            step_leaves = [x.swapaxes(0, 1) for x in step_leaves]
        step_tree = self.spec.step_codec.treedef.unflatten(step_leaves)
        reset_tree = self.spec.reset_codec.treedef.unflatten(
            self.spec.reset_codec.decode(
                rows(host["reset_words"]), [rows(x) for x in host["reset_big"]]
            )
        )
        data = {k: step_tree[k] for k in ("action", "reward", "discount", "extras")}
        chunk = HostChunk(
            step_number=step_tree["number"],
            last=step_tree["last"],
            discount=step_tree["discount"],
            num_steps=steps,
            step_observations=jax.tree.leaves(step_tree["next_obs"]),
            step_data=self.data_treedef.flatten_up_to(data),
            reset_number=reset_tree["number"],
            num_resets=np.minimum(
                np.asarray(host["num_resets"]).reshape(-1), pending.num_reset_rows
            ),
            reset_observations=jax.tree.leaves(reset_tree["obs"]),
            end_number=np.asarray(host["step_number"]).reshape(-1),
            fresh=tokens == 0,
        )
        return chunk, tokens

    def _carry_of(self, tokens: np.ndarray) -> Carry:
        """The carry of ``B`` environments whose states carry flush ``tokens`` (0: fresh)."""
        used = np.nonzero(tokens)[0]
        with self._lock:
            found = {t: self._carries.get(t) for t in set(tokens[used].tolist())}
        carries: dict[int, Carry] = {}
        for t, carried in found.items():
            if carried is None or int(used[tokens[used] == t].max()) >= len(carried):
                raise ValueError(
                    "this RecorderState was already flushed (or comes from another recorder): "
                    "its flush token is unknown. Always continue with the state returned by "
                    "rec.flush / rec.fetch, and call rec.write in fetch order."
                )
            carries[t] = carried
        if not carries:
            return Carry.empty(len(tokens))
        if len(carries) == 1:  # the usual case: every state comes from the same flush
            return next(iter(carries.values()))
        # States from several flushes: each env's episode from its own flush's carry.
        return Carry.from_episodes(
            [None if t == 0 else carries[t][b] for b, t in enumerate(tokens.tolist())]
        )

    def _cut(
        self, pending: PendingFlush, benchmark_id: str, metadata_fn: Any
    ) -> tuple[EpisodeBatch, Callable[[], None]]:
        chunk, tokens = self._host_chunk(pending)
        carry = self._carry_of(tokens)
        cut, new_carry = cut_columns(chunk, carry)
        batch = self._batch(cut, benchmark_id, metadata_fn)
        consumed = {t for t in tokens.tolist() if t != 0}

        def commit() -> None:
            with self._lock:
                for t in consumed:
                    self._carries.pop(t, None)
                self._carries[pending.new_token] = new_carry

        return batch, commit

    def _batch(self, cut: CutColumns, benchmark_id: str, metadata_fn: Any) -> EpisodeBatch:
        data = self.data_treedef.unflatten(cut.data)
        batch = EpisodeBatch(
            observations=self.observation_treedef.unflatten(cut.observations),
            actions=data["action"],
            rewards=data["reward"],
            discounts=data["discount"],
            n_tuples=cut.n_tuples,
            terminated=cut.terminated,
            truncated=~cut.terminated,
            benchmark_id=benchmark_id,
            extras=dict(data["extras"]),
        )
        if metadata_fn is not None:
            metadata = []
            for episode in batch.episodes():
                entry = metadata_fn(episode)
                if not isinstance(entry, dict):
                    raise TypeError(
                        f"metadata_fn must return a dict, received {type(entry).__name__}."
                    )
                metadata.append(dict(entry))
            batch.metadata = metadata
        return batch

    def collect(
        self, pending: PendingFlush, benchmark_id: str = "", metadata_fn: Any = None
    ) -> list[EpisodeData]:
        """Cuts the fetched rows and returns the complete episodes (commits the carry)."""
        batch, commit = self._cut(pending, benchmark_id, metadata_fn)
        commit()
        return batch.episodes()

    def write(
        self,
        pending: PendingFlush,
        storage: TupliStorage,
        benchmark_id: str = "",
        metadata_fn: Any = None,
        batch_id: str | None = None,
    ) -> Sequence[EpisodeHeader]:
        """Cuts, stores with one ``record_episode_batch`` call, then commits the carry.

        If storing raises, nothing is committed: the same ``pending`` can be written again.
        The cyclic GC is paused in both halves (``cut`` and ``store_batch``, with ``no_gc``): they
        build few objects and nothing cyclic, and the collections they would trigger scan every
        object of the process (JAX's included), measured ~15% of a recording job's time for
        CartPole-like.
        """
        batch, commit = self.cut(pending, benchmark_id, metadata_fn)
        headers = store_batch(storage, batch, batch_id)
        commit()
        return headers

    def cut(
        self, pending: PendingFlush, benchmark_id: str = "", metadata_fn: Any = None
    ) -> tuple[EpisodeBatch, Callable[[], None]]:
        """The first half of :meth:`write` (the GC paused): the complete episodes of ``pending``
        as one batch, and ``commit``, which makes the new carry current.

        For a writer that stores batch k while it cuts batch k + 1 (``tj.record``): call
        ``commit`` before cutting the next ``pending``, store the batches in order with
        :func:`store_batch`, and give up the recorder if storing fails (its carry is then ahead
        of the store). The batch never aliases ``pending``'s rows.

        Example:
            >>> # batch, commit = flusher.cut(pending, benchmark_id)
            >>> # commit(); store_batch(storage, batch, batch_id="job:0")
        """
        with no_gc():
            return self._cut(pending, benchmark_id, metadata_fn)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The carry as plain python/numpy (string keys), e.g. for orbax."""
        with self._lock:  # carries are never changed, only replaced: join them unlocked
            carries, next_token = dict(self._carries), self._next_token
        return {
            "next_token": next_token,
            "carries": {str(token): carry.pools() for token, carry in carries.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a carry produced by :meth:`state_dict` (or by the per-environment format
        of earlier versions).

        Raises:
            ValueError: A carry does not fit this recorder (leaf count, row shape or dtype),
                or its arrays do not fit together.
        """
        carries: dict[int, Carry] = {}
        for token, entry in state["carries"].items():
            carry = _carry_from_state(entry)
            self._check_leaves(carry)
            carries[int(token)] = carry
        with self._lock:
            self._carries = carries
            self._next_token = int(state["next_token"])

    def _check_leaves(self, carry: Carry) -> None:
        for piece in carry.pieces:
            for field, pools in (("observations", piece.observations), ("data", piece.data)):
                specs = self._leaf_specs[field]
                if len(pools) != len(specs):
                    raise ValueError(
                        f"a saved carry has {len(pools)} {field} leaves; this recorder records "
                        f"{len(specs)}"
                    )
                for pool, (shape, dtype) in zip(pools, specs, strict=True):
                    if pool is not None and (pool.shape[1:] != shape or pool.dtype != dtype):
                        raise ValueError(
                            f"a saved carry has {field} rows of {pool.dtype}{list(pool.shape[1:])}"
                            f"; this recorder records {dtype}{list(shape)}"
                        )


def _carry_from_state(entry: dict[str, Any]) -> Carry:
    """A carry from :meth:`Flusher.state_dict`'s entry for one token."""
    if "num_envs" not in entry:
        return Carry.from_pools(entry)
    # The per-environment format of earlier versions: {"num_envs": B, "<b>": episode, ...}.
    envs: list[OpenEpisode | None] = [None] * int(entry["num_envs"])
    for key, ep in entry.items():
        if key == "num_envs":
            continue
        envs[int(key)] = OpenEpisode(
            start_number=int(ep["start_number"]),
            next_number=int(ep["next_number"]),
            observations=[[np.asarray(x)] for x in ep["observations"]],
            data=[[np.asarray(x)] for x in ep["data"]],
        )
    return Carry.from_episodes(envs)
