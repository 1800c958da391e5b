"""Cutting complete episodes out of fetched rows (pure numpy; no JAX, no I/O).

The flush (``tupli_jax.flush``) decodes the fetched rows of ``B`` environments into a
:class:`HostChunk`; :func:`cut_columns` finds the complete episodes with an integer pass over
the step numbers and LAST flags (``_spans``) and gathers each leaf once for all of them into
packed columns (``_Plan``: runs of big rows are copied one memcpy each, small rows by one
fancy-index gather). Unfinished episodes become the new carry (:class:`OpenEpisode`), gathered
into one pool per leaf per flush, never aliasing the chunk.

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
from collections.abc import Sequence

import numpy as np

from tupli_jax._rows import ranges, take_rows

__all__ = [
    "MOD",
    "CutColumns",
    "HostChunk",
    "OpenEpisode",
    "concat",
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


def concat(pieces: list[np.ndarray]) -> np.ndarray:
    """The pieces of a carried leaf as one array (no copy for a single piece)."""
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)


@dataclasses.dataclass
class _Span:
    """An episode (complete, or the unfinished tail of an env) found by the index pass; its
    arrays are gathered afterwards."""

    env: int
    start: int  # first step row
    stop: int  # one past its last row in this chunk
    reset_row: int  # its reset row in this chunk, or -1 when it continues a carried episode
    base: OpenEpisode | None  # the carried part, when reset_row == -1
    start_number: int
    next_number: int = 0  # tails only: the number its next step must have


@dataclasses.dataclass
class _Complete:
    """The complete episodes found by the index pass, as arrays in environment then time order
    (``reset_row`` is -1 for an episode that continues a carried one; ``carried`` holds those
    carried parts, in the same order)."""

    env: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    reset_row: np.ndarray
    start_number: np.ndarray
    carried: list[OpenEpisode]


def _lookup(keys: np.ndarray, values: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Per query, the value of its key (the last one in ``keys`` order for repeated keys), or
    -1 when the key is absent."""
    if not len(keys):
        return np.full(len(queries), -1, np.int64)
    order = np.argsort(keys, kind="stable")
    pos = np.searchsorted(keys[order], queries, side="right") - 1
    hit = (pos >= 0) & (keys[order][np.maximum(pos, 0)] == queries)
    return np.where(hit, values[order][np.maximum(pos, 0)], -1)


def _spans(
    chunk: HostChunk, carry: Sequence[OpenEpisode | None]
) -> tuple[_Complete, list[_Span | OpenEpisode | None]]:
    """Index pass (integer work, vectorised over environments): the complete episodes, and per
    env what to carry: a tail span to gather, a carried episode passed on unchanged (no steps
    this flush), or None.

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
    numbers = chunk.step_number.astype(np.int64)
    # gap_count[b, j]: how many pairs of consecutive rows up to j are not consecutive steps
    # (recording was off in between); a segment is gap-free if it is equal at both ends.
    gaps = np.zeros((num_envs, num_rows), np.int64)
    gaps[:, 1:] = ((numbers[:, 1:] - numbers[:, :-1]) % MOD) != 1
    gap_count = np.cumsum(gaps, axis=1)
    envs = np.arange(num_envs)
    last = chunk.last & (np.arange(num_rows)[None, :] < steps[:, None])
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
    first = numbers[seg_env, seg_start]

    kept = [
        None if b >= len(carry) or chunk.fresh[b] else carry[b] for b in range(num_envs)
    ]  # fmt: skip
    kept_next = np.array([-1 if k is None else k.next_number for k in kept], np.int64)
    kept_start = np.array([0 if k is None else k.start_number for k in kept], np.int64)
    continues = first_of_env & (kept_next[seg_env] == first)
    reset_env, reset_j = np.nonzero(
        np.arange(chunk.reset_number.shape[1])[None, :] < resets[:, None]
    )
    reset_key = reset_env * MOD + chunk.reset_number[reset_env, reset_j].astype(np.int64)
    row = np.where(continues, -1, _lookup(reset_key, reset_j, seg_env * MOD + first))
    complete = (continues | (row >= 0)) & (
        gap_count[seg_env, seg_end] == gap_count[seg_env, seg_start]
    )
    number = np.where(continues, kept_start[seg_env], first)
    is_tail = last_of_env & has_tail[seg_env]
    emit = complete & ~is_tail
    found = _Complete(
        seg_env[emit].astype(np.int64),
        seg_start[emit],
        seg_end[emit] + 1,
        row[emit],
        number[emit],
        [kept[b] for b in seg_env[emit & continues].tolist()],
    )

    tails: list[_Span | OpenEpisode | None] = [
        kept[b] if t == 0 else None for b, t in enumerate(steps.tolist())
    ]
    for i in np.nonzero(is_tail & complete)[0].tolist():
        b = int(seg_env[i])
        tails[b] = _Span(
            b,
            int(seg_start[i]),
            int(seg_end[i]) + 1,
            int(row[i]),
            kept[b] if continues[i] else None,
            int(number[i]),
            (int(numbers[b, seg_end[i]]) + 1) % MOD,
        )
    end_number = chunk.end_number.astype(np.int64)
    # The episode that starts after the last LAST row (or the stream's first one): a reset row
    # for the next step's number, no step yet.
    end_row = _lookup(reset_key, reset_j, envs * MOD + end_number).tolist()
    end, t_of = end_number.tolist(), steps.tolist()
    for b in range(num_envs):
        tail = tails[b]
        if tail is None and end_row[b] >= 0:
            tail = _Span(b, t_of[b], t_of[b], end_row[b], None, end[b], end[b])
        if tail is not None and tail.next_number != end[b]:
            tail = None  # steps were taken unrecorded since: the episode can't be complete
        tails[b] = tail
    return found, tails


_Segments = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Where each row of a packed column comes from: per source (0 = step rows ``[B, S]``,
    1 = reset rows ``[B, R]``, 2 = a pool of carried rows ``[P]``), contiguous segments
    ``(out_start, env, row_start, length)`` and the same expanded to row indices
    ``(out, env, row)``."""

    rows: int
    segments: tuple[_Segments, ...]
    indices: tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]
    # (source, rows per env) -> flat row indices ``env * rows_per_env + row`` and their range
    _flat: dict[tuple[int, int], tuple[np.ndarray, int, int]] = dataclasses.field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_segments(cls, rows: int, segments: Sequence[_Segments]) -> _Plan:
        """The plan of a column of ``rows`` rows from its three sources' segments."""
        kept: list[_Segments] = []
        indices = []
        for out_start, env, row_start, length in segments:
            used = length > 0
            out_start, env, row_start, length = (
                out_start[used],
                env[used],
                row_start[used],
                length[used],
            )
            kept.append((out_start, env, row_start, length))
            within = ranges(np.zeros_like(length), length)  # row of each within its run
            indices.append(
                (
                    np.repeat(out_start, length) + within,
                    np.repeat(env, length),
                    np.repeat(row_start, length) + within,
                )
            )
        return cls(rows, tuple(kept), tuple(indices))

    @classmethod
    def episodes(
        cls,
        prefix_source: int,
        prefix_start: np.ndarray,
        prefix_len: np.ndarray,
        env: np.ndarray,
        step_start: np.ndarray,
        step_len: np.ndarray,
    ) -> _Plan:
        """Per episode ``prefix_len`` rows of source ``prefix_source`` from ``prefix_start``
        (rows of ``env`` for reset rows), then ``step_len`` step rows of ``env``."""
        per = prefix_len + step_len
        first = np.cumsum(per) - per
        empty = (np.zeros(0, np.int64),) * 4
        segments: list[_Segments] = [(first + prefix_len, env, step_start, step_len), empty, empty]
        segments[prefix_source] = (first, env, prefix_start, prefix_len)
        return cls.from_segments(int(per.sum()), segments)

    def gather(self, sources: Sequence[np.ndarray | None], like: np.ndarray) -> np.ndarray:
        """The column from ``sources`` (step ``[B, S, ...]``, reset ``[B, R, ...]``, pool
        ``[P, ...]``; ``like`` gives the dtype and row shape)."""
        out = np.empty((self.rows, *like.shape[2:]), like.dtype)
        row_bytes = like.dtype.itemsize * int(np.prod(like.shape[2:], dtype=np.int64))
        for source, leaf in enumerate(sources):
            if leaf is None or not len(self.indices[source][0]):
                continue
            out_start, env, row_start, length = self.segments[source]
            if row_bytes * len(self.indices[source][0]) >= _SEGMENT_COPY_BYTES * len(length):
                # Runs of big rows: one memcpy per run beats a gather through a temporary.
                for o, e, r, n in zip(out_start.tolist(), env.tolist(), row_start.tolist(),
                                      length.tolist(), strict=True):  # fmt: skip
                    out[o : o + n] = leaf[r : r + n] if source == 2 else leaf[e, r : r + n]
                continue
            out_rows = self.indices[source][0]
            self._put(source, leaf, out, slice(None) if len(out_rows) == self.rows else out_rows)
        return out

    def _put(self, source: int, leaf: np.ndarray, out: np.ndarray, dst: slice | np.ndarray) -> None:
        """``out[dst] =`` the rows of ``leaf`` for ``source`` in plan order, with ``take_rows``
        over flat row indices where ``leaf``'s ``[B, S]`` axes merge without a copy: measured
        4x (scalar rows) to 20x (rows of 4 values) faster than ``(env, row)`` indexing."""
        _, env_rows, rows = self.indices[source]
        if source != 2 and leaf.strides[0] != leaf.strides[1] * leaf.shape[1]:
            out[dst] = leaf[env_rows, rows]  # a time-major view: its axes do not merge
            return
        per_env = 1 if source == 2 else leaf.shape[1]
        cached = self._flat.get((source, per_env))
        if cached is None:
            flat = rows if source == 2 else env_rows * per_env + rows
            cached = self._flat[(source, per_env)] = (flat, int(flat.min()), int(flat.max()))
        flat, low, high = cached
        merged = leaf if source == 2 else leaf.reshape(len(leaf) * per_env, *leaf.shape[2:])
        if not 0 <= low <= high < len(merged):  # take_rows does not check
            raise IndexError(f"a cut plan reads rows beyond the {len(merged)} rows fetched")
        take_rows(merged, flat, out, dst)


_SEGMENT_COPY_BYTES = 4096  # mean bytes per run from which runs are copied one by one
_MAX_PIECES = 4  # a carried episode's pieces are joined beyond this (bounds the pools kept alive)


def _carried_pool(
    carried: Sequence[OpenEpisode], field: str, num_leaves: int
) -> list[np.ndarray | None]:
    """Per leaf, the pieces of the ``carried`` episodes back to back."""
    pool: list[np.ndarray | None] = []
    for j in range(num_leaves):
        pieces = [p for ep in carried for p in getattr(ep, field)[j]]
        pool.append(np.concatenate(pieces, axis=0) if pieces else None)
    return pool


def _span_arrays(spans: Sequence[_Span]) -> tuple[np.ndarray, ...]:
    n = len(spans)
    env = np.fromiter((sp.env for sp in spans), np.int64, count=n)
    start = np.fromiter((sp.start for sp in spans), np.int64, count=n)
    stop = np.fromiter((sp.stop for sp in spans), np.int64, count=n)
    reset_row = np.fromiter((sp.reset_row for sp in spans), np.int64, count=n)
    return env, start, stop, reset_row


def _carry_tails(
    chunk: HostChunk, tails: list[_Span | OpenEpisode | None]
) -> list[OpenEpisode | None]:
    """The new carry: every tail span's rows gathered into one new pool per leaf (never a view
    of ``chunk``); each carried episode keeps its old pieces plus a slice of the pool."""
    spans = [t for t in tails if isinstance(t, _Span)]
    if not spans:
        return [t if isinstance(t, OpenEpisode) else None for t in tails]
    env, start, stop, reset_row = _span_arrays(spans)
    fresh = reset_row >= 0
    step_len = stop - start
    zero = np.zeros(len(spans), np.int64)
    obs_plan = _Plan.episodes(
        1, np.maximum(reset_row, 0), fresh.astype(np.int64), env, start, step_len
    )
    data_plan = _Plan.episodes(2, zero, zero, env, start, step_len)
    obs_pool = [
        obs_plan.gather((s_leaf, r_leaf, None), s_leaf)
        for s_leaf, r_leaf in zip(chunk.step_observations, chunk.reset_observations, strict=True)
    ]
    data_pool = [data_plan.gather((leaf, None, None), leaf) for leaf in chunk.step_data]
    obs_at = np.concatenate([[0], np.cumsum(fresh + step_len)]).tolist()
    data_at = np.concatenate([[0], np.cumsum(step_len)]).tolist()

    def pieces(old: list[np.ndarray], new: np.ndarray) -> list[np.ndarray]:
        joined = [*old, new] if len(new) else list(old)
        return [np.concatenate(joined, axis=0)] if len(joined) > _MAX_PIECES else joined

    out: list[OpenEpisode | None] = []
    k = 0
    for tail in tails:
        if not isinstance(tail, _Span):
            out.append(tail)
            continue
        base = tail.base
        obs = [x[obs_at[k] : obs_at[k + 1]] for x in obs_pool]
        data = [x[data_at[k] : data_at[k + 1]] for x in data_pool]
        k += 1
        out.append(
            OpenEpisode(
                tail.start_number,
                tail.next_number,
                [pieces(base.observations[j] if base else [], x) for j, x in enumerate(obs)],
                [pieces(base.data[j] if base else [], x) for j, x in enumerate(data)],
            )
        )
    return out


def cut_columns(
    chunk: HostChunk, carry: Sequence[OpenEpisode | None]
) -> tuple[CutColumns, list[OpenEpisode | None]]:
    """Cuts complete episodes out of one flush's rows into packed columns. Pure numpy.

    One gather per leaf for all episodes: episodes that started in this chunk take their reset
    observation from the reset rows, episodes continuing a carried one take their first rows
    from a pool of the carried pieces; no per-episode array is made.

    Args:
        chunk: The rows of ``B`` environments.
        carry: Per environment, its unfinished episode from the previous flush (or ``None``);
            ignored where ``chunk.fresh``. May be shorter than ``B`` (missing = ``None``).

    Returns:
        The complete, fully recorded episodes in environment then time order, and the new
        carry (length ``B``). No returned array aliases ``chunk``.

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
    found, tails = _spans(chunk, carry)
    env, start, stop, reset_row = found.env, found.start, found.stop, found.reset_row
    n = len(env)
    is_carried = reset_row < 0
    carried_obs = np.zeros(n, np.int64)
    carried_data = np.zeros(n, np.int64)
    if found.carried:
        carried_obs[is_carried] = [sum(len(p) for p in ep.observations[0]) for ep in found.carried]
        carried_data[is_carried] = [ep.length for ep in found.carried]
    obs_pool = _carried_pool(found.carried, "observations", len(chunk.step_observations))
    data_pool = _carried_pool(found.carried, "data", len(chunk.step_data))
    step_len = stop - start
    # Observations: the reset row (new episode) or the carried rows (pool), then step rows.
    obs_plan = _observation_plan(is_carried, carried_obs, reset_row, env, start, step_len)
    observations = [
        obs_plan.gather((s_leaf, r_leaf, pool), s_leaf)
        for s_leaf, r_leaf, pool in zip(
            chunk.step_observations, chunk.reset_observations, obs_pool, strict=True
        )
    ]
    pool_start = np.cumsum(carried_data) - carried_data
    data_plan = _Plan.episodes(2, pool_start, carried_data, env, start, step_len)
    data = [
        data_plan.gather((leaf, None, pool), leaf)
        for leaf, pool in zip(chunk.step_data, data_pool, strict=True)
    ]
    last_rows = chunk.discount[env, stop - 1]
    terminated = np.all((last_rows == 0).reshape(n, -1), axis=1) if n else np.zeros(0, bool)
    cut = CutColumns(
        observations, data, carried_data + step_len, terminated, env, found.start_number
    )
    return cut, _carry_tails(chunk, tails)


def _observation_plan(
    is_carried: np.ndarray,
    carried_obs: np.ndarray,
    reset_row: np.ndarray,
    env: np.ndarray,
    start: np.ndarray,
    step_len: np.ndarray,
) -> _Plan:
    """Observation rows of the complete episodes: a carried episode's rows from the pool (in
    span order), a new episode's reset row, then the step rows."""  # fmt: skip
    new = ~is_carried
    prefix = np.where(is_carried, carried_obs, 1)
    per = prefix + step_len
    first = np.cumsum(per) - per
    pooled = np.where(is_carried, carried_obs, 0)
    pool_start = np.cumsum(pooled) - pooled
    return _Plan.from_segments(
        int(per.sum()),
        (
            (first + prefix, env, start, step_len),
            (first[new], env[new], reset_row[new], np.ones(int(new.sum()), np.int64)),
            (first[is_carried], env[is_carried], pool_start[is_carried], carried_obs[is_carried]),
        ),
    )
