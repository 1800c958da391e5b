"""Host side of recording: device-to-host transfer, cutting episodes, carrying unfinished ones.

``fetch`` starts one asynchronous copy of the used buffer rows and hands back the emptied
device state; ``write`` waits for the copy, cuts complete episodes (:func:`cut_episodes`, pure
numpy), stores them with one ``storage.record_episodes`` call and only then commits the carry.

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

from tupli_jax.episode import EpisodeData

if TYPE_CHECKING:
    from tupli_jax.buffer import BufferSpec
    from tupli_jax.recorder import RecorderState
    from tupli_jax.schema import EpisodeHeader
    from tupli_jax.storage.base import TupliStorage

__all__ = [
    "CutEpisode",
    "Flusher",
    "HostChunk",
    "OpenEpisode",
    "PendingFlush",
    "cut_episodes",
]

_MOD = 1 << 32


@dataclasses.dataclass
class OpenEpisode:
    """An unfinished episode carried on the host between flushes.

    Attributes:
        start_number: Step number of the episode's first step.
        next_number: Step number its next step must have (mod 2**32).
        observations: Per observation leaf, the pieces ``[n_i, ...]`` seen so far (the first
            piece starts with the reset observation).
        data: Per data leaf (action, reward, discount, extras), the pieces seen so far.
    """

    start_number: int
    next_number: int
    observations: list[list[np.ndarray]]
    data: list[list[np.ndarray]]

    @property
    def length(self) -> int:
        """Steps seen so far."""
        return sum(len(p) for p in self.data[0]) if self.data else 0


@dataclasses.dataclass
class CutEpisode:
    """A complete episode cut from host rows (flat leaves; see :func:`cut_episodes`).

    Attributes:
        env_index: Index of the environment in the (flattened) batch.
        start_number: Step number of its first step.
        observations: Observation leaves ``[T + 1, ...]``.
        data: Data leaves ``[T, ...]``.
        terminated: Ended with discount 0.
        truncated: Ended with discount > 0.
    """

    env_index: int
    start_number: int
    observations: list[np.ndarray]
    data: list[np.ndarray]
    terminated: bool
    truncated: bool


@dataclasses.dataclass
class HostChunk:
    """Rows of one flush of ``B`` environments, on the host.

    Attributes:
        step_number: ``[B, S]`` uint32 step number of each step row.
        last: ``[B, S]`` bool, the step ended its episode.
        discount: ``[B, S, ...]`` discount of each step.
        num_steps: ``[B]`` valid step rows per environment (``<= S``).
        step_observations: Leaves ``[B, S, ...]`` of the true next observation.
        step_data: Leaves ``[B, S, ...]`` stored per step (action, reward, discount, extras).
        reset_number: ``[B, R]`` uint32 first-step number of each reset row.
        num_resets: ``[B]`` valid reset rows per environment (``<= R``).
        reset_observations: Leaves ``[B, R, ...]`` of the reset observations.
        end_number: ``[B]`` uint32 step number the next step will have.
        fresh: ``[B]`` bool, the state comes straight from ``reset`` (no carry applies).
    """

    step_number: np.ndarray
    last: np.ndarray
    discount: np.ndarray
    num_steps: np.ndarray
    step_observations: list[np.ndarray]
    step_data: list[np.ndarray]
    reset_number: np.ndarray
    num_resets: np.ndarray
    reset_observations: list[np.ndarray]
    end_number: np.ndarray
    fresh: np.ndarray


def _concat(pieces: list[np.ndarray]) -> np.ndarray:
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


def _from_reset(chunk: HostChunk, b: int, row: int | None, number: int) -> OpenEpisode | None:
    """A new episode of env ``b`` starting at reset row ``row`` (``None``: not recorded)."""
    if row is None:
        return None
    observations = [[leaf[b, row : row + 1]] for leaf in chunk.reset_observations]
    return OpenEpisode(number, number, observations, [[] for _ in chunk.step_data])


@dataclasses.dataclass
class _Span:
    """A complete episode found by the index pass; its arrays are filled in afterwards."""

    env: int
    start: int  # first step row
    stop: int  # one past its LAST row
    reset_row: int  # its reset row in this chunk, or -1 when it continues a carried episode
    base: OpenEpisode | None  # the carried part, when reset_row == -1
    start_number: int


def _own(episode: OpenEpisode) -> OpenEpisode:
    """Copies the pieces that are views (into a chunk), so the chunk can be freed."""

    def own(pieces: list[np.ndarray]) -> list[np.ndarray]:
        return [x if x.base is None else np.array(x) for x in pieces]

    return dataclasses.replace(
        episode,
        observations=[own(p) for p in episode.observations],
        data=[own(p) for p in episode.data],
    )


def _spans(
    chunk: HostChunk, carry: Sequence[OpenEpisode | None]
) -> tuple[list[_Span], list[OpenEpisode | None]]:
    """Index pass: finds the complete episodes and the new carry (integer work only)."""
    num_envs, num_rows = chunk.step_number.shape
    steps = np.asarray(chunk.num_steps, np.int64)
    resets = np.asarray(chunk.num_resets, np.int64)
    if np.any(steps > num_rows) or np.any(resets > chunk.reset_number.shape[1]):
        raise ValueError(
            f"more rows were written ({int(steps.max())} step rows, {int(resets.max())} reset "
            f"rows) than were fetched ({num_rows} and {chunk.reset_number.shape[1]})."
        )
    numbers = chunk.step_number.astype(np.int64)
    # gaps[b, j]: rows j - 1 and j are not consecutive steps (recording was off in between).
    gaps = np.zeros((num_envs, num_rows), np.int64)
    gaps[:, 1:] = ((numbers[:, 1:] - numbers[:, :-1]) % _MOD) != 1
    gap_count = np.cumsum(gaps, axis=1)
    last = chunk.last & (np.arange(num_rows)[None, :] < steps[:, None])
    spans: list[_Span] = []
    new_carry: list[OpenEpisode | None] = []
    all_lasts = np.nonzero(last)
    lasts_per_env = np.split(all_lasts[1], np.searchsorted(all_lasts[0], np.arange(1, num_envs)))
    for b in range(num_envs):
        t = int(steps[b])
        numbers_b = numbers[b, :t].tolist()  # python ints: cheaper than numpy scalars below
        gaps_b = gap_count[b, :t].tolist()
        reset_rows = {n: j for j, n in enumerate(chunk.reset_number[b, : resets[b]].tolist())}
        open_ep = None if chunk.fresh[b] or b >= len(carry) else carry[b]
        s = 0
        ends = lasts_per_env[b].tolist()
        tail = not ends or ends[-1] != t - 1
        if tail:
            ends.append(t - 1)  # the unfinished tail (absent when t == 0)
        for i, e in enumerate(ends):
            if e < s:
                continue
            first = numbers_b[s]
            continues = s == 0 and open_ep is not None and open_ep.next_number == first
            base = open_ep if continues else None
            row = reset_rows.get(first, -1) if base is None else -1
            complete = (base is not None or row >= 0) and gaps_b[e] == gaps_b[s]
            open_ep = None
            if complete and not (tail and i == len(ends) - 1):
                number = base.start_number if base is not None else first
                spans.append(_Span(b, s, e + 1, row, base, number))
            elif complete:  # the tail: carried to the next flush
                start = base if base is not None else _from_reset(chunk, b, row, first)
                assert start is not None
                open_ep = OpenEpisode(
                    start.start_number,
                    (numbers_b[e] + 1) % _MOD,
                    [
                        [*p, leaf[b, s : e + 1]]
                        for p, leaf in zip(start.observations, chunk.step_observations, strict=True)
                    ],
                    [
                        [*p, leaf[b, s : e + 1]]
                        for p, leaf in zip(start.data, chunk.step_data, strict=True)
                    ],
                )
            s = e + 1
        end = int(chunk.end_number[b])
        if open_ep is None:
            # The episode that starts after the last LAST row (or the stream's first one).
            open_ep = _from_reset(chunk, b, reset_rows.get(end), end)
        if open_ep is not None and open_ep.next_number != end:
            open_ep = None  # steps were taken unrecorded since: the episode can't be complete
        new_carry.append(None if open_ep is None else _own(open_ep))
    return spans, new_carry


def cut_episodes(
    chunk: HostChunk, carry: Sequence[OpenEpisode | None]
) -> tuple[list[CutEpisode], list[OpenEpisode | None]]:
    """Cuts complete episodes out of one flush's rows. Pure numpy (no I/O, no JAX).

    Episodes that start in this chunk get their observations from one gather per leaf (the
    common case costs a few numpy calls in all, not per episode); data leaves are views.

    Args:
        chunk: The rows of ``B`` environments.
        carry: Per environment, its unfinished episode from the previous flush (or ``None``);
            ignored where ``chunk.fresh``. May be shorter than ``B`` (missing = ``None``).

    Returns:
        The complete, fully recorded episodes in environment then time order, and the new
        carry (length ``B``). Arrays of the new carry never alias ``chunk``; the episodes' data
        arrays may.

    Example:
        >>> chunk = HostChunk(
        ...     step_number=np.array([[0, 1]], np.uint32), last=np.array([[False, True]]),
        ...     discount=np.array([[1.0, 0.0]]), num_steps=np.array([2]),
        ...     step_observations=[np.array([[1.0, 2.0]])], step_data=[np.array([[5, 6]])],
        ...     reset_number=np.array([[0, 2]], np.uint32), num_resets=np.array([2]),
        ...     reset_observations=[np.array([[0.0, 9.0]])], end_number=np.array([2], np.uint32),
        ...     fresh=np.array([True]))
        >>> episodes, new_carry = cut_episodes(chunk, [None])
        >>> episodes[0].observations[0].tolist(), episodes[0].terminated, new_carry[0].length
        ([0.0, 1.0, 2.0], True, 0)
    """
    spans, new_carry = _spans(chunk, carry)
    fresh = [sp for sp in spans if sp.reset_row >= 0]
    gathered: list[np.ndarray] = []
    offsets = np.zeros(1, np.int64)
    if fresh:
        env = np.array([sp.env for sp in fresh], np.int64)
        start = np.array([sp.start for sp in fresh], np.int64)
        length = np.array([sp.stop - sp.start for sp in fresh], np.int64)
        offsets = np.concatenate([[0], np.cumsum(length + 1)])
        is_reset = np.zeros(int(offsets[-1]), np.bool_)
        is_reset[offsets[:-1]] = True
        step_env = np.repeat(env, length)
        # Rows start_i, ..., start_i + length_i - 1 of each episode, concatenated.
        before = np.cumsum(length) - length
        step_row = np.repeat(start - before, length) + np.arange(int(length.sum()))
        reset_row = np.array([sp.reset_row for sp in fresh], np.int64)
        for step_leaf, reset_leaf in zip(
            chunk.step_observations, chunk.reset_observations, strict=True
        ):
            out = np.empty((int(offsets[-1]), *step_leaf.shape[2:]), step_leaf.dtype)
            out[offsets[:-1]] = reset_leaf[env, reset_row]
            out[~is_reset] = step_leaf[step_env, step_row]
            gathered.append(out)
    last_rows = chunk.discount[[sp.env for sp in spans], [sp.stop - 1 for sp in spans]]
    zero = (last_rows == 0).reshape(len(spans), int(np.prod(last_rows.shape[1:], dtype=np.int64)))
    terminated_all = np.all(zero, axis=1).tolist()
    episodes: list[CutEpisode] = []
    i = 0
    for sp, terminated in zip(spans, terminated_all, strict=True):
        b, s, e = sp.env, sp.start, sp.stop
        data = [leaf[b, s:e] for leaf in chunk.step_data]
        if sp.reset_row >= 0:
            observations = [out[offsets[i] : offsets[i + 1]] for out in gathered]
            i += 1
        else:
            assert sp.base is not None
            observations = [
                _concat([*p, leaf[b, s:e]])
                for p, leaf in zip(sp.base.observations, chunk.step_observations, strict=True)
            ]
            data = [_concat([*p, x]) for p, x in zip(sp.base.data, data, strict=True)]
        episodes.append(
            CutEpisode(b, sp.start_number, observations, data, terminated, not terminated)
        )
    return episodes, new_carry


@dataclasses.dataclass
class PendingFlush:
    """Rows fetched from the device (copy in flight) and the bookkeeping to commit them.

    Attributes:
        arrays: Sliced device arrays (new buffers, safe to donate the state meanwhile).
        num_step_rows: Step rows fetched per environment.
        num_reset_rows: Reset rows fetched per environment.
        new_token: Flush token given to the emptied state.
        exact: Whether the row counts were read from the device (else given by the caller).
    """

    arrays: dict[str, Any]
    num_step_rows: int
    num_reset_rows: int
    new_token: int
    exact: bool


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
        self._data_leaves: list[Any] = jax.tree.leaves(data)
        self._carries: dict[int, list[OpenEpisode | None]] = {}
        self._next_token = 1 + secrets.randbelow(_MOD - 1)
        # fetch (main thread) and write (a pipeline's writer thread) may run concurrently; the
        # lock is never held during device transfers or storage I/O.
        self._lock = threading.RLock()

    def _issue_token(self) -> int:
        with self._lock:
            token = self._next_token
            self._next_token = token % (_MOD - 1) + 1  # never 0, the "fresh from reset" token
        return token

    # -- fetch ----------------------------------------------------------------------------
    def fetch(
        self, state: RecorderState, num_steps: int | None = None, copy: bool = True
    ) -> tuple[RecorderState, PendingFlush]:
        """Slices the used rows on device, starts their copy to host, empties the state.

        With ``copy=False`` the rows are not copied on device first: only for a caller that
        writes the pending flush before it steps the returned state again (``flush``).
        """
        buffer = state.buffer
        capacity = self.spec.capacity
        if num_steps is None:
            steps = np.asarray(jax.device_get(buffer.num_steps))
            resets = np.asarray(jax.device_get(buffer.num_resets))
            max_steps = int(steps.max(initial=0))
            if max_steps > capacity:
                raise _overflow_error(capacity)
            # Row counts rounded up to a power of two: few distinct slice programs to compile.
            step_rows = min(_round_up(max_steps), capacity)
            reset_rows = min(_round_up(int(resets.max(initial=0))), self.spec.num_reset_rows)
            exact = True
        else:
            if num_steps < 0:
                raise ValueError(f"num_steps must be >= 0, received {num_steps}.")
            if num_steps > capacity:
                raise _overflow_error(capacity)
            step_rows = num_steps
            reset_rows = min(num_steps + 1, self.spec.num_reset_rows)
            exact = False
        take = _take_rows if copy else _view_rows
        arrays = take(buffer, steps=step_rows, resets=reset_rows)
        for leaf in jax.tree.leaves(arrays):
            leaf.copy_to_host_async()
        token = self._issue_token()
        emptied = buffer.replace(
            num_steps=jnp.zeros_like(buffer.num_steps),
            num_resets=jnp.zeros_like(buffer.num_resets),
            flush_token=jnp.full(jnp.shape(buffer.flush_token), token, jnp.uint32),
        )
        pending = PendingFlush(arrays, step_rows, reset_rows, token, exact)
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

        step_tree = self.spec.step_codec.treedef.unflatten(
            self.spec.step_codec.decode(
                rows(host["step_words"]), [rows(x) for x in host["step_big"]]
            )
        )
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

    def _cut(
        self, pending: PendingFlush, benchmark_id: str, metadata_fn: Any
    ) -> tuple[list[EpisodeData], Callable[[], None]]:
        chunk, tokens = self._host_chunk(pending)
        carry: list[OpenEpisode | None] = []
        for b, token in enumerate(tokens.tolist()):
            if token == 0:
                carry.append(None)
                continue
            with self._lock:
                carried = self._carries.get(token)
            if carried is None or b >= len(carried):
                raise ValueError(
                    "this RecorderState was already flushed (or comes from another recorder): "
                    "its flush token is unknown. Always continue with the state returned by "
                    "rec.flush / rec.fetch, and call rec.write in fetch order."
                )
            carry.append(carried[b])
        cut, new_carry = cut_episodes(chunk, carry)
        episodes = [self._episode(c, benchmark_id, metadata_fn) for c in cut]
        consumed = {t for t in tokens.tolist() if t != 0}

        def commit() -> None:
            with self._lock:
                for t in consumed:
                    self._carries.pop(t, None)
                self._carries[pending.new_token] = new_carry

        return episodes, commit

    def _episode(self, cut: CutEpisode, benchmark_id: str, metadata_fn: Any) -> EpisodeData:
        data = self.data_treedef.unflatten(cut.data)
        episode = EpisodeData(
            observations=self.observation_treedef.unflatten(cut.observations),
            actions=data["action"],
            rewards=data["reward"],
            discounts=data["discount"],
            terminated=cut.terminated,
            truncated=cut.truncated,
            benchmark_id=benchmark_id,
            extras=dict(data["extras"]),
        )
        if metadata_fn is not None:
            metadata = metadata_fn(episode)
            if not isinstance(metadata, dict):
                raise TypeError(
                    f"metadata_fn must return a dict, received {type(metadata).__name__}."
                )
            episode.metadata = dict(metadata)
        return episode

    def collect(
        self, pending: PendingFlush, benchmark_id: str = "", metadata_fn: Any = None
    ) -> list[EpisodeData]:
        """Cuts the fetched rows and returns the complete episodes (commits the carry)."""
        episodes, commit = self._cut(pending, benchmark_id, metadata_fn)
        commit()
        return episodes

    def write(
        self,
        pending: PendingFlush,
        storage: TupliStorage,
        benchmark_id: str = "",
        metadata_fn: Any = None,
        batch_id: str | None = None,
    ) -> list[EpisodeHeader]:
        """Cuts, stores with one ``record_episodes`` call, then commits the carry.

        If storing raises, nothing is committed: the same ``pending`` can be written again.
        """
        episodes, commit = self._cut(pending, benchmark_id, metadata_fn)
        if batch_id is not None:
            record: Any = storage.record_episodes
            headers = record(episodes, batch_id=batch_id)
        else:
            headers = storage.record_episodes(episodes) if episodes else []
        commit()
        return list(headers)

    # -- checkpointing --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The carry as plain python/numpy (string keys), e.g. for orbax."""
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        carries: dict[str, Any] = {}
        for token, envs in self._carries.items():
            entry: dict[str, Any] = {"num_envs": len(envs)}
            for b, ep in enumerate(envs):
                if ep is None:
                    continue
                entry[str(b)] = {
                    "start_number": ep.start_number,
                    "next_number": ep.next_number,
                    "observations": [_concat(p) for p in ep.observations],
                    "data": [
                        _concat(p) if p else np.zeros((0, *leaf.shape), leaf.dtype)
                        for p, leaf in zip(ep.data, self._data_leaves, strict=True)
                    ],
                }
            carries[str(token)] = entry
        return {"next_token": self._next_token, "carries": carries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a carry produced by :meth:`state_dict`."""
        carries: dict[int, list[OpenEpisode | None]] = {}
        for token, entry in state["carries"].items():
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
            carries[int(token)] = envs
        with self._lock:
            self._carries = carries
            self._next_token = int(state["next_token"])
