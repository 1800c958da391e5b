"""Cutting complete episodes out of fetched rows (pure numpy; no JAX, no I/O).

The flush (``tupli_jax.flush``) decodes the fetched rows of ``B`` environments into a
:class:`HostChunk`; :func:`cut_columns` finds the complete episodes with an integer pass over
the step numbers and LAST flags (``_spans``) and gathers each leaf once for all of them into
packed columns (``_Plan``: runs of big rows are copied one memcpy each, small step rows by one
``take`` over the whole column, the few reset and carried rows scattered over it). Unfinished
episodes become the new :class:`Carry`: the rows each flush adds to them are gathered into one
new pool per leaf (never aliasing the chunk), and no Python object is made per environment or
episode.

Exactly once: every step row carries the stream's step ``number`` and every reset row the
``number`` of its episode's first step. An episode is emitted only when its reset row and all
its step rows, with consecutive numbers ending in a LAST row, have been seen; a gap in the
numbers (recording switched off) or a fresh stream drops the partial episode.

Example:
    >>> chunk = HostChunk(
    ...     step_number=np.array([[0, 1]], np.uint32), last=np.array([[False, True]]),
    ...     discount=np.array([[1.0, 0.0]]), num_steps=np.array([2]),
    ...     step_observations=[np.array([[1.0, 2.0]])], step_data=[np.array([[5, 6]])],
    ...     reset_number=np.array([[0, 2]], np.uint32), num_resets=np.array([2]),
    ...     reset_observations=[np.array([[0.0, 9.0]])], end_number=np.array([2], np.uint32),
    ...     fresh=np.array([True]))
    >>> cut_columns(chunk, [None])[0].n_tuples.tolist()
    [2]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tupli_jax._rows import ranges, take_rows

__all__ = [
    "MOD",
    "Carry",
    "CutColumns",
    "HostChunk",
    "OpenEpisode",
    "cut_columns",
]

MOD = 1 << 32
"""Step numbers count modulo ``2**32``."""


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


@dataclasses.dataclass(frozen=True)
class _Piece:
    """Carried rows gathered at one flush: one pool per leaf (``None`` for a leaf without rows)
    and, per environment, where its rows lie in them (length 0: none)."""

    observations: list[np.ndarray | None]
    data: list[np.ndarray | None]
    obs_start: np.ndarray  # [B] int64
    obs_len: np.ndarray  # [B] int64
    data_start: np.ndarray  # [B] int64
    data_len: np.ndarray  # [B] int64

    @classmethod
    def packed(
        cls,
        observations: list[np.ndarray | None],
        data: list[np.ndarray | None],
        obs_len: np.ndarray,
        data_len: np.ndarray,
    ) -> _Piece:
        """A piece whose pools hold each environment's rows back to back, in env order."""
        obs_start = np.cumsum(obs_len) - obs_len
        return cls(observations, data, obs_start, obs_len, np.cumsum(data_len) - data_len, data_len)

    def keep(self, envs: np.ndarray) -> _Piece | None:
        """The piece with the rows of environments outside ``envs`` ([B] bool) dropped, or
        ``None`` if none are left."""
        obs_len = np.where(envs, self.obs_len, 0)
        data_len = np.where(envs, self.data_len, 0)
        if not (obs_len.any() or data_len.any()):
            return None
        return dataclasses.replace(self, obs_len=obs_len, data_len=data_len)

    def resized(self, num_envs: int) -> _Piece:
        """The piece for ``num_envs`` environments (the ones past the end have no rows)."""
        return dataclasses.replace(
            self,
            obs_start=_fit(self.obs_start, num_envs),
            obs_len=_fit(self.obs_len, num_envs),
            data_start=_fit(self.data_start, num_envs),
            data_len=_fit(self.data_len, num_envs),
        )


def _fit(x: np.ndarray, num_envs: int) -> np.ndarray:
    """Per-environment values ``x`` for ``num_envs`` environments (zeros for the added ones)."""
    out = np.zeros(num_envs, x.dtype)
    n = min(num_envs, len(x))
    out[:n] = x[:n]
    return out


@dataclasses.dataclass(frozen=True)
class Carry:
    """The unfinished episodes of ``B`` environments between flushes, as pooled arrays.

    Environment ``b``'s episode (where ``is_open[b]``) is its rows in each piece, in piece
    order; its first observation row is the reset observation. Each flush adds at most one
    piece (the rows of that flush's unfinished episodes, gathered once for all environments)
    and drops the rows of the episodes it completed, so carrying costs no Python work per
    environment; beyond ``_MAX_PIECES`` pieces the live rows are joined into one.

    Attributes:
        is_open: ``[B]`` bool, the environment has an unfinished episode.
        start_number: ``[B]`` int64 step number of its first step.
        next_number: ``[B]`` int64 step number its next step must have (mod 2**32).
        pieces: The pieces holding the rows.

    Example:
        >>> carry = Carry.from_episodes([None, OpenEpisode(7, 9, [[np.zeros((3, 2))]],
        ...                                                   [[np.ones(2)]])])
        >>> len(carry), carry[0], carry[1].length, carry.length.tolist()
        (2, None, 2, [0, 2])
    """

    is_open: np.ndarray
    start_number: np.ndarray
    next_number: np.ndarray
    pieces: tuple[_Piece, ...]

    @classmethod
    def empty(cls, num_envs: int = 0) -> Carry:
        """No unfinished episode in ``num_envs`` environments."""
        zeros = np.zeros(num_envs, np.int64)
        return cls(np.zeros(num_envs, bool), zeros, zeros, ())

    @classmethod
    def from_episodes(cls, episodes: Sequence[OpenEpisode | None]) -> Carry:
        """The carry of one :class:`OpenEpisode` (or ``None``) per environment."""
        num_envs = len(episodes)
        open_eps = [(b, ep) for b, ep in enumerate(episodes) if ep is not None]
        if not open_eps:
            return cls.empty(num_envs)
        is_open = np.zeros(num_envs, bool)
        start_number = np.zeros(num_envs, np.int64)
        next_number = np.zeros(num_envs, np.int64)
        obs_len = np.zeros(num_envs, np.int64)
        data_len = np.zeros(num_envs, np.int64)
        for b, ep in open_eps:
            is_open[b] = True
            start_number[b], next_number[b] = ep.start_number, ep.next_number
            obs_len[b] = sum(len(p) for p in ep.observations[0])
            data_len[b] = ep.length

        def pools(field: str) -> list[np.ndarray | None]:
            num_leaves = len(getattr(open_eps[0][1], field))
            out: list[np.ndarray | None] = []
            for j in range(num_leaves):
                parts = [p for _, ep in open_eps for p in getattr(ep, field)[j]]
                out.append(np.concatenate(parts, axis=0) if parts else None)
            return out

        piece = _Piece.packed(pools("observations"), pools("data"), obs_len, data_len)
        return cls(is_open, start_number, next_number, (piece,))

    def pools(self) -> dict[str, Any]:
        """The carry as plain arrays (e.g. for a checkpoint; :meth:`from_pools` reverses it):
        ``is_open``, ``start_number``, ``next_number``, ``obs_len`` and ``data_len`` ``[B]``, and
        per leaf the rows of every open episode back to back in environment order
        (``observations``, ``data``; ``None`` for a leaf without rows)."""
        joined = self.joined()
        zeros = np.zeros(len(self), np.int64)
        piece = joined.pieces[0] if joined.pieces else None
        return {
            "is_open": joined.is_open.copy(),
            "start_number": joined.start_number.copy(),
            "next_number": joined.next_number.copy(),
            "obs_len": piece.obs_len if piece else zeros,
            "data_len": piece.data_len if piece else zeros,
            "observations": list(piece.observations) if piece else [],
            "data": list(piece.data) if piece else [],
        }

    @classmethod
    def from_pools(cls, pools: dict[str, Any]) -> Carry:
        """The carry saved by :meth:`pools`.

        Raises:
            ValueError: The arrays do not fit together (e.g. a corrupt checkpoint).
        """
        is_open = np.asarray(pools["is_open"], bool).reshape(-1)
        num_envs = len(is_open)
        fields = {}
        for name in ("start_number", "next_number", "obs_len", "data_len"):
            fields[name] = np.asarray(pools[name], np.int64).reshape(-1)
            if len(fields[name]) != num_envs or (name.endswith("_len") and np.any(
                (fields[name] < 0) | (~is_open & (fields[name] != 0))
            )):  # fmt: skip
                raise ValueError(f"a saved carry's {name} does not fit its {num_envs} environments")
        obs_len, data_len = fields["obs_len"], fields["data_len"]
        if np.any(is_open & (obs_len != data_len + 1)):
            raise ValueError(
                "a saved carry's open episodes must have one more observation than steps"
            )
        observations = [None if x is None else np.asarray(x) for x in pools["observations"]]
        data = [None if x is None else np.asarray(x) for x in pools["data"]]
        for name, leaves, total in (("an observation", observations, obs_len.sum()),
                                    ("a data", data, data_len.sum())):  # fmt: skip
            for x in leaves:
                if (0 if x is None else len(x)) != total:
                    raise ValueError(
                        f"a saved carry has {0 if x is None else len(x)} rows of {name} leaf "
                        f"for {total} rows of open episodes"
                    )
        if not is_open.any():
            return cls(is_open, fields["start_number"], fields["next_number"], ())
        piece = _Piece.packed(observations, data, obs_len, data_len)
        return cls(is_open, fields["start_number"], fields["next_number"], (piece,))

    def __len__(self) -> int:
        return len(self.is_open)

    def __getitem__(self, b: int) -> OpenEpisode | None:
        """Environment ``b``'s unfinished episode (views of the pools), or ``None``."""
        if not self.is_open[b]:
            return None

        def rows(
            pool: np.ndarray | None, start: np.ndarray, length: np.ndarray
        ) -> list[np.ndarray]:
            s, n = int(start[b]), int(length[b])
            return [] if pool is None or n == 0 else [pool[s : s + n]]

        first = self.pieces[0]
        return OpenEpisode(
            int(self.start_number[b]),
            int(self.next_number[b]),
            [
                [x for p in self.pieces for x in rows(p.observations[j], p.obs_start, p.obs_len)]
                for j in range(len(first.observations))
            ],
            [
                [x for p in self.pieces for x in rows(p.data[j], p.data_start, p.data_len)]
                for j in range(len(first.data))
            ],
        )

    def __iter__(self) -> Iterator[OpenEpisode | None]:
        return (self[b] for b in range(len(self)))

    @property
    def length(self) -> np.ndarray:
        """``[B]`` int64 steps seen so far per environment (0 where none is open)."""
        return self._rows("data_len")

    def _rows(self, length: str) -> np.ndarray:
        """``[B]`` rows per environment in all pieces (``length``: ``"obs_len"`` or
        ``"data_len"``)."""
        total = np.zeros(len(self), np.int64)
        for piece in self.pieces:
            total += getattr(piece, length)
        return total

    def resized(self, num_envs: int) -> Carry:
        """The carry of the first ``num_envs`` environments (the ones added have none)."""
        if num_envs == len(self):
            return self
        return Carry(
            _fit(self.is_open, num_envs),
            _fit(self.start_number, num_envs),
            _fit(self.next_number, num_envs),
            tuple(p.resized(num_envs) for p in self.pieces),
        )

    def joined(self) -> Carry:
        """The same episodes in at most one piece holding only their rows (a copy)."""
        if not self.pieces:
            return self
        envs = np.nonzero(self.is_open)[0]
        zero = np.zeros(len(envs), np.int64)
        every = np.ones(len(envs), bool)

        def join(field: str, leaves: str) -> list[np.ndarray | None]:
            parts = _carried_parts(self, envs, every, field)
            plan = _Plan.episodes([(zero, zero), *parts], envs, zero, zero)
            out: list[np.ndarray | None] = []
            for j in range(len(getattr(self.pieces[0], leaves))):
                pools = [getattr(p, leaves)[j] for p in self.pieces]
                like = next((x for x in pools if x is not None), None)
                out.append(
                    None if like is None or plan.rows == 0
                    else plan.gather([None, None, *pools], like.dtype, like.shape[1:])
                )  # fmt: skip
            return out

        piece = _Piece.packed(
            join("obs", "observations"),
            join("data", "data"),
            self._rows("obs_len"),
            self._rows("data_len"),
        )
        return dataclasses.replace(self, pieces=(piece,))


@dataclasses.dataclass
class CutColumns:
    """The complete episodes of one flush as packed columns, episodes back to back.

    Attributes:
        observations: Observation leaves ``[sum(T_e + 1), ...]`` (reset observation first).
        data: Data leaves ``[sum(T_e), ...]``.
        n_tuples: ``[E]`` int64 transitions per episode.
        terminated: ``[E]`` bool, ended with discount 0.
        env_index: ``[E]`` int64 environment of each episode.
        start_number: ``[E]`` int64 step number of each episode's first step.
    """

    observations: list[np.ndarray]
    data: list[np.ndarray]
    n_tuples: np.ndarray
    terminated: np.ndarray
    env_index: np.ndarray
    start_number: np.ndarray

    def __len__(self) -> int:
        return int(self.n_tuples.shape[0])


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


@dataclasses.dataclass(frozen=True)
class _Complete:
    """The complete episodes found by the index pass, as arrays in environment then time order
    (``reset_row`` is -1 for an episode that continues its environment's carried one)."""

    env: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    reset_row: np.ndarray
    start_number: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Tails:
    """Per environment ``[B]``, its unfinished episode after the flush: ``is_open``; its step
    rows ``[start, stop)`` in this chunk; ``reset_row``, its reset row in this chunk, or -1 when
    it continues the carried episode (whose rows it keeps); its first and next step numbers."""

    is_open: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    reset_row: np.ndarray
    start_number: np.ndarray
    next_number: np.ndarray


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Per query, the value of its key (the last one in ``keys`` order for repeated keys), or
    -1 when the key is absent."""
    if not len(keys):
        return np.full(len(queries), -1, np.int64)
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], queries, side="right") - 1
    hit = (pos >= 0) & (keys[order][np.maximum(pos, 0)] == queries)
    return np.where(hit, values[order][np.maximum(pos, 0)], -1)


def _spans(chunk: HostChunk, carry: Carry) -> tuple[_Complete, _Tails]:
    """Index pass (integer work, vectorised over environments): the complete episodes, and per
    env its unfinished episode after this chunk. ``carry`` has ``B`` environments.

    Each env's valid step rows split into segments ending at its LAST rows, plus an unfinished
    tail after the last one. A segment is a complete episode when its first step either
    continues the env's carried episode (first segment only, matching step number) or has a
    reset row, and its step numbers have no gap.
    """
    num_envs, num_rows = chunk.step_number.shape
    steps = np.asarray(chunk.num_steps, np.int64)
    resets = np.asarray(chunk.num_resets, np.int64)
    if np.any(steps > num_rows) or np.any(resets > chunk.reset_number.shape[1]):
        raise ValueError(
            f"more rows were written ({int(steps.max())} step rows, {int(resets.max())} reset "
            f"rows) than were fetched ({num_rows} and {chunk.reset_number.shape[1]})."
        )
    numbers = np.asarray(chunk.step_number).astype(np.uint32, copy=False)  # wraps mod MOD
    # gap_count[b, j]: how many pairs of consecutive rows up to j are not consecutive steps
    # (recording was off in between); a segment is gap-free if it is equal at both ends.
    gap_count = np.zeros((num_envs, num_rows), np.int32)
    np.cumsum(numbers[:, 1:] - numbers[:, :-1] != 1, axis=1, dtype=np.int32,
              out=gap_count[:, 1:])  # fmt: skip
    envs = np.arange(num_envs)
    last = np.asarray(chunk.last, bool)
    if steps.min(initial=num_rows) < num_rows:  # rows past an env's steps are not its own
        last = last & (np.arange(num_rows)[None, :] < steps[:, None])
    has_tail = steps > 0  # the last step row is not a LAST row (an unfinished tail)
    if num_rows:  # else no env has a step row (checked above)
        has_tail &= ~last[envs, np.maximum(steps - 1, 0)]
    ends = last.copy()
    ends[envs[has_tail], steps[has_tail] - 1] = True
    seg_env, seg_end = np.nonzero(ends)  # every segment's env and last row, in env-time order
    n = len(seg_env)
    first_of_env = np.ones(n, bool)
    first_of_env[1:] = seg_env[1:] != seg_env[:-1]
    last_of_env = np.ones(n, bool)
    last_of_env[:-1] = first_of_env[1:]
    seg_start = np.zeros(n, np.int64)
    seg_start[1:] = seg_end[:-1] + 1
    seg_start[first_of_env] = 0
    first = numbers[seg_env, seg_start].astype(np.int64)

    kept = carry.is_open & ~np.asarray(chunk.fresh, bool)
    kept_next = np.where(kept, carry.next_number, -1)
    continues = first_of_env & (kept_next[seg_env] == first)
    reset_env, reset_j = np.nonzero(
        np.arange(chunk.reset_number.shape[1])[None, :] < resets[:, None]
    )
    reset_key = reset_env * MOD + chunk.reset_number[reset_env, reset_j].astype(np.int64)
    row = np.where(continues, -1, _lookup(reset_key, reset_j, seg_env * MOD + first))
    complete = (continues | (row >= 0)) & (
        gap_count[seg_env, seg_end] == gap_count[seg_env, seg_start]
    )
    number = np.where(continues, carry.start_number[seg_env], first)
    is_tail = last_of_env & has_tail[seg_env]
    emit = complete & ~is_tail
    found = _Complete(
        seg_env[emit].astype(np.int64), seg_start[emit], seg_end[emit] + 1, row[emit], number[emit]
    )

    # The unfinished episodes: a carried one without steps this flush passes on unchanged ...
    idle = kept & (steps == 0)
    tails = _Tails(
        is_open=idle.copy(),
        start=np.zeros(num_envs, np.int64),
        stop=np.zeros(num_envs, np.int64),
        reset_row=np.full(num_envs, -1, np.int64),
        start_number=np.where(idle, carry.start_number, 0),
        next_number=np.where(idle, carry.next_number, 0),
    )
    # ... a tail segment ends the env's rows ...
    i = np.nonzero(is_tail & complete)[0]
    b = seg_env[i]
    tails.is_open[b] = True
    tails.start[b] = seg_start[i]
    tails.stop[b] = seg_end[i] + 1
    tails.reset_row[b] = row[i]
    tails.start_number[b] = number[i]
    tails.next_number[b] = (numbers[b, seg_end[i]].astype(np.int64) + 1) % MOD
    # ... or an episode starts after the last LAST row (or the stream's first one): a reset row
    # for the next step's number, no step yet.
    end_number = chunk.end_number.astype(np.int64)
    end_row = _lookup(reset_key, reset_j, envs * MOD + end_number)
    b = np.nonzero(~tails.is_open & (end_row >= 0))[0]
    tails.is_open[b] = True
    tails.start[b] = tails.stop[b] = steps[b]
    tails.reset_row[b] = end_row[b]
    tails.start_number[b] = tails.next_number[b] = end_number[b]
    # Steps taken unrecorded since: the episode can't be complete.
    tails.is_open[tails.next_number != end_number] = False
    return found, tails


_Segments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where each row of a packed column comes from: per source (0 = step rows ``[B, S]``,
    1 = reset rows ``[B, R]``, 2 and up = pools of carried rows ``[P]``), contiguous segments
    ``(out_start, env, row_start, length)`` in output order.

    The step rows, most of every column, are gathered by one ``take`` over a row index for the
    whole column (rows from the other sources read any row there and are overwritten next)
    instead of a gather into a temporary plus a fancy-index scatter (the scatter was ~20% of a
    CartPole-like cut). The other sources' rows are few (one reset row per new episode, the
    carried rows of the first episode of each environment) and are scattered.
    """

    rows: int
    segments: tuple[_Segments, ...]
    # source -> (out, env, row) per row; (source, env stride, row stride) -> flat row indices
    # and the range of the ones read
    _indices: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )
    _flat: dict[tuple[int, int, int], tuple[np.ndarray, int, int]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_segments(cls, rows: int, segments: Sequence[_Segments]) -> _Plan:
        """The plan of a column of ``rows`` rows from its sources' segments (each in ascending
        ``out_start`` order)."""
        kept = []
        for out_start, env, row_start, length in segments:
            used = length > 0
            kept.append((out_start[used], env[used], row_start[used], length[used]))
        return cls(rows, tuple(kept))

    @classmethod
    def episodes(
        cls,
        parts: Sequence[tuple[np.ndarray, np.ndarray]],
        env: np.ndarray,
        step_start: np.ndarray,
        step_len: np.ndarray,
    ) -> _Plan:
        """Per episode (of environment ``env``): for each source ``k = 1, 2, ...`` in order,
        ``parts[k - 1] = (start, length)`` rows of it (reset rows of ``env`` for ``k = 1``,
        pool rows beyond), then ``step_len`` step rows of ``env`` from ``step_start``."""
        lengths = [length for _, length in parts]
        per = sum(lengths, step_len)
        first = np.cumsum(per) - per
        segments: list[_Segments] = [(first + (per - step_len), env, step_start, step_len)]
        at = first
        for start, length in parts:
            segments.append((at, env, start, length))
            at = at + length
        return cls.from_segments(int(per.sum()), segments)

    def _rows_of(self, source: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(out, env, row)`` of every row ``source`` gives (built once)."""
        found = self._indices.get(source)
        if found is None:
            out_start, env, row_start, length = self.segments[source]
            within = ranges(np.zeros_like(length), length)  # row of each within its run
            found = self._indices[source] = (
                np.repeat(out_start, length) + within,
                np.repeat(env, length),
                np.repeat(row_start, length) + within,
            )
        return found

    def gather(
        self, sources: Sequence[np.ndarray | None], dtype: np.dtype, row_shape: tuple[int, ...]
    ) -> np.ndarray:
        """The column (``dtype``, rows of ``row_shape``) from ``sources``: step rows
        ``[B, S, ...]``, reset rows ``[B, R, ...]``, then pools ``[P, ...]``."""
        out = np.empty((self.rows, *row_shape), dtype)
        row_bytes = np.dtype(dtype).itemsize * int(np.prod(row_shape, dtype=np.int64))
        for source, leaf in enumerate(sources):
            if leaf is None or not len(self.segments[source][0]):
                continue
            out_start, env, row_start, length = self.segments[source]
            pool = source >= 2
            # Runs of rows one memcpy each (contiguous runs), or one memcpy per row (big rows of
            # time-major memory): faster than a gather, which for rows interleaved with another
            # source's goes through a temporary.
            copyable = (
                pool
                or _merges(leaf)  # [B, S] memory: an env's rows are one strided run
                or row_bytes >= _ROW_COPY_BYTES
            )
            if copyable and row_bytes * int(length.sum()) >= _SEGMENT_COPY_BYTES * len(length):
                for o, e, r, n in zip(out_start.tolist(), env.tolist(), row_start.tolist(),
                                      length.tolist(), strict=True):  # fmt: skip
                    out[o : o + n] = leaf[r : r + n] if pool else leaf[e, r : r + n]
                continue
            self._put(source, leaf, out)
        return out

    def _put(self, source: int, leaf: np.ndarray, out: np.ndarray) -> None:
        """Writes the rows of ``leaf`` for ``source`` into ``out``, with ``take_rows`` over flat
        row indices where ``leaf``'s ``[B, S]`` axes merge without a copy (measured 4x (scalar
        rows) to 20x (rows of 4 values) faster than ``(env, row)`` indexing): in ``[B, S]``
        memory, or in ``[S, B]`` memory for time-major rows (row ``s * B + b``; 2x faster than
        making the leaf ``[B, S]`` first and gathering from that). The step rows (source 0)
        are taken for every row of ``out``, so it must come first."""
        if source >= 2:
            merged, key = leaf, (source, 0, 1)
        elif _merges(leaf):  # [B, S] memory
            merged = leaf.reshape(leaf.shape[0] * leaf.shape[1], *leaf.shape[2:])
            key = (source, leaf.shape[1], 1)
        elif _merges(swapped := leaf.swapaxes(0, 1)):  # [S, B] memory
            merged = swapped.reshape(leaf.shape[0] * leaf.shape[1], *leaf.shape[2:])
            key = (source, 1, leaf.shape[0])
        else:
            out_rows, env_rows, rows = self._rows_of(source)
            out[out_rows] = leaf[env_rows, rows]
            return
        dst: slice | np.ndarray = slice(None)
        if source and len(out_rows := self._rows_of(source)[0]) < self.rows:
            dst = out_rows
        cached = self._flat.get(key)
        if cached is None:
            cached = self._flat[key] = (
                self._full_index(*key[1:]) if source == 0 else self._flat_index(*key)
            )
        flat, low, high = cached
        if not 0 <= low <= high < len(merged):  # take_rows does not check
            raise IndexError(f"a cut plan reads rows beyond the {len(merged)} rows fetched")
        take_rows(merged, flat, out, dst)

    def _flat_index(self, source: int, env_stride: int, row_stride: int) -> tuple[Any, int, int]:
        """Flat row ``env * env_stride + row * row_stride`` of every row of ``source``, and
        their range."""
        _, env_rows, rows = self._rows_of(source)
        flat = env_rows * env_stride + rows * row_stride
        return flat, int(flat.min()), int(flat.max())

    def _full_index(self, env_stride: int, row_stride: int) -> tuple[Any, int, int]:
        """Per row of the column, the flat step row it reads (``env * env_stride + row *
        row_stride``), and the range of the ones it keeps. Rows that another source overwrites
        read whatever row follows on from the step run before them (or precedes the first one),
        possibly out of range: ``take_rows`` clips. No per-row scatter: each step run extends
        to the next one's start."""
        out_start, env, row_start, length = self.segments[0]
        flat_start = env * env_stride + row_start * row_stride
        stretch = np.diff(out_start, append=self.rows)
        stretch[0] += out_start[0]  # rows before the first run read back from it
        base = flat_start - out_start * row_stride
        flat = np.repeat(base, stretch) + np.arange(self.rows, dtype=np.int64) * row_stride
        last = flat_start + (length - 1) * row_stride
        return flat, int(flat_start.min()), int(last.max())


def _merges(leaf: np.ndarray) -> bool:
    """Whether the first two axes of ``leaf`` ``[X, Y, ...]`` merge into one without a copy
    (rows may be strided: the decoded leaves of packed words are views of the words)."""
    return leaf.ndim >= 2 and leaf.strides[0] == leaf.strides[1] * leaf.shape[1]


_SEGMENT_COPY_BYTES = 4096  # mean bytes per run from which runs are copied one by one
_ROW_COPY_BYTES = 1024  # rows from which a run of time-major rows is copied row by row
_MAX_PIECES = 4  # a carry's live rows are joined into one piece beyond this many pieces


def _carried_parts(
    carry: Carry, env: np.ndarray, continues: np.ndarray, field: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per piece of ``carry``, ``(start, length)`` of the rows of ``env`` where ``continues``
    (length 0 elsewhere), for ``field`` ``"obs"`` or ``"data"``."""
    parts = []
    for piece in carry.pieces:
        start = getattr(piece, f"{field}_start")[env]
        length = np.where(continues, getattr(piece, f"{field}_len")[env], 0)
        parts.append((start, length))
    return parts


def _gather_columns(
    chunk: HostChunk,
    carry: Carry,
    env: np.ndarray,
    reset_row: np.ndarray,
    start: np.ndarray,
    step_len: np.ndarray,
) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """The observation and data columns of episodes of ``env``: the carried rows (where
    ``reset_row < 0``) or the reset row, then ``step_len`` step rows from ``start``. Also the
    data rows per episode."""
    continues = reset_row < 0
    fresh = (~continues).astype(np.int64)
    obs_parts = _carried_parts(carry, env, continues, "obs")
    data_parts = _carried_parts(carry, env, continues, "data")
    obs_plan = _Plan.episodes([(np.maximum(reset_row, 0), fresh), *obs_parts], env, start, step_len)
    zero = np.zeros(len(env), np.int64)
    data_plan = _Plan.episodes([(zero, zero), *data_parts], env, start, step_len)
    observations = [
        obs_plan.gather(
            [s_leaf, r_leaf, *(p.observations[j] for p in carry.pieces)],
            s_leaf.dtype,
            s_leaf.shape[2:],
        )
        for j, (s_leaf, r_leaf) in enumerate(
            zip(chunk.step_observations, chunk.reset_observations, strict=True)
        )
    ]
    data = [
        data_plan.gather(
            [leaf, None, *(p.data[j] for p in carry.pieces)], leaf.dtype, leaf.shape[2:]
        )
        for j, leaf in enumerate(chunk.step_data)
    ]
    return observations, data, sum((length for _, length in data_parts), step_len)


def _carry_tails(chunk: HostChunk, carry: Carry, tails: _Tails) -> Carry:
    """The new carry: the old pieces keep the rows of the episodes that go on; the rows this
    chunk adds to the unfinished episodes are gathered into one new piece (never a view of
    ``chunk``)."""
    continues = tails.is_open & (tails.reset_row < 0)
    pieces = [kept for p in carry.pieces if (kept := p.keep(continues)) is not None]
    adds = tails.is_open & ((tails.reset_row >= 0) | (tails.stop > tails.start))
    if adds.any():
        env = np.nonzero(adds)[0]
        empty = Carry.empty(len(carry))
        reset_row = tails.reset_row[env]
        step_len = tails.stop[env] - tails.start[env]
        observations, data, _ = _gather_columns(
            chunk, empty, env, reset_row, tails.start[env], step_len
        )
        obs_len = np.zeros(len(carry), np.int64)
        obs_len[env] = (reset_row >= 0) + step_len
        data_len = np.zeros(len(carry), np.int64)
        data_len[env] = step_len
        pieces.append(
            _Piece.packed(
                list(observations), [x if len(x) else None for x in data], obs_len, data_len
            )
        )
    new = Carry(tails.is_open, tails.start_number, tails.next_number, tuple(pieces))
    return new.joined() if len(pieces) > _MAX_PIECES else new


def cut_columns(
    chunk: HostChunk, carry: Carry | Sequence[OpenEpisode | None]
) -> tuple[CutColumns, Carry]:
    """Cuts complete episodes out of one flush's rows into packed columns. Pure numpy.

    One gather per leaf for all episodes: episodes that started in this chunk take their reset
    observation from the reset rows, episodes continuing a carried one take their first rows
    from the carry's pools; no per-episode array is made.

    Args:
        chunk: The rows of ``B`` environments.
        carry: Per environment, its unfinished episode from the previous flush (a
            :class:`Carry`, or one :class:`OpenEpisode` or ``None`` per environment); ignored
            where ``chunk.fresh``. May have fewer than ``B`` environments (missing = none).

    Returns:
        The complete, fully recorded episodes in environment then time order, and the new
        carry (``B`` environments). No returned array aliases ``chunk``.

    Example:
        >>> chunk = HostChunk(
        ...     step_number=np.array([[0, 1]], np.uint32), last=np.array([[False, True]]),
        ...     discount=np.array([[1.0, 0.0]]), num_steps=np.array([2]),
        ...     step_observations=[np.array([[1.0, 2.0]])], step_data=[np.array([[5, 6]])],
        ...     reset_number=np.array([[0, 2]], np.uint32), num_resets=np.array([2]),
        ...     reset_observations=[np.array([[0.0, 9.0]])], end_number=np.array([2], np.uint32),
        ...     fresh=np.array([True]))
        >>> cut, new_carry = cut_columns(chunk, [None])
        >>> cut.observations[0].tolist(), cut.n_tuples.tolist(), cut.terminated.tolist()
        ([0.0, 1.0, 2.0], [2], [True])
    """
    if not isinstance(carry, Carry):
        carry = Carry.from_episodes(carry)
    carry = carry.resized(chunk.step_number.shape[0])
    found, tails = _spans(chunk, carry)
    env, stop = found.env, found.stop
    n = len(env)
    observations, data, n_tuples = _gather_columns(
        chunk, carry, env, found.reset_row, found.start, stop - found.start
    )
    last_rows = chunk.discount[env, stop - 1]
    terminated = np.all((last_rows == 0).reshape(n, -1), axis=1) if n else np.zeros(0, bool)
    cut = CutColumns(observations, data, n_tuples, terminated, env, found.start_number)
    return cut, _carry_tails(chunk, carry, tails)
