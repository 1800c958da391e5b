"""Packed step columns of the single-env Gymnasium recorder. Host side, numpy only.

``EpisodeColumns`` writes every step of the episode in progress straight into preallocated
buffers that hold the finished, not yet stored episodes back to back, in ``EpisodeBatch``'s
layout: observations ``[sum(T_e + 1), ...]`` (reset observation first), actions and rewards
``[sum(T_e), ...]``. The buffers grow by doubling. A step costs a type/dtype/shape check and one
row assignment per leaf (the row assignment is the copy that protects against envs reusing their
buffers); nothing is stacked when an episode ends, and ``drain`` hands the finished episodes over
as one ``PendingBatch`` (``FileStorage.record_episode_batch`` writes it as one shard).

An episode whose observations or actions change structure, dtype or shape mid-episode, or hold
values a typed buffer cannot (object arrays, integers beyond int64, non-numeric leaves), is
recorded as Python lists instead (``_ListEpisode``) and stacked with ``stack_trees`` when it
ends, exactly as the list recorder did; finished episodes keep their order.

Example:
    >>> cols = EpisodeColumns()
    >>> cols.begin(np.zeros(2, np.float32))
    >>> cols.append(np.ones(2, np.float32), np.int64(1), 1.0)
    >>> cols.end(True, False, "bench", {}, None)
    1
    >>> [item.batch.observations.shape for item in cols.drain()]
    [(2, 2)]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from tupli_jax import _tree
from tupli_jax.episode import EpisodeBatch, EpisodeData

__all__ = [
    "EpisodeColumns",
    "PendingBatch",
    "PendingItem",
    "batch_discounts",
    "copy_tree",
    "make_episode",
    "merge_batches",
    "stack_trees",
]

_INITIAL_ROWS = 1024
_ARRAY, _SCALAR, _TREE = 0, 1, 2
_LIST, _COLUMN = "list", "column"  # how EpisodeColumns keeps actions
_SCALAR_TYPES = (bool, int, float, np.generic)
_ndarray = np.ndarray


class _Never:
    """A type no value has: the fast path's action type while it is off."""


# ----------------------------------------------------------------------------------------------
# Episode helpers (the list recorder's; used for irregular episodes and by the vector wrapper)
# ----------------------------------------------------------------------------------------------


def copy_tree(tree: Any) -> Any:
    """A copy of ``tree`` whose arrays no later env call can change (envs may reuse buffers).

    Example:
        >>> a = np.zeros(2); b = copy_tree({"x": a}); a[0] = 1; float(b["x"][0])
        0.0
    """
    if type(tree) is np.ndarray:
        return tree.copy()
    if isinstance(tree, np.generic | bool | int | float | str) or tree is None:
        return tree
    if isinstance(tree, dict):
        return {k: copy_tree(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        items = [copy_tree(v) for v in tree]
        if type(tree) is list:
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else tuple(items)
    return copy.deepcopy(tree)


def stack_trees(trees: Sequence[Any]) -> Any:
    """Stacks same-structured pytrees along a new leading axis ``[T, ...]``.

    Python ints become ``int64``, Python floats ``float64`` (numpy's defaults); arrays keep their
    dtype.

    Raises:
        TypeError: The trees differ in structure.

    Example:
        >>> stack_trees([1, 2, 3]).tolist()
        [1, 2, 3]
    """
    first = trees[0]
    if type(first) is np.ndarray or isinstance(first, np.generic | bool | int | float):
        # np.array is ~3x faster than np.stack on short lists and refuses ragged input too.
        return np.array(trees)
    leaves0, spec = _tree.flatten(first)
    columns: list[list[np.ndarray]] = [[leaf] for leaf in leaves0]
    for tree in trees[1:]:
        leaves, other = _tree.flatten(tree)
        if len(leaves) != len(columns) or not _tree.specs_equal(spec, other):
            raise TypeError(
                f"an episode's observations/actions changed structure from {spec} to {other}; "
                "expected every step to return the same pytree structure: fix the env or "
                "its observation wrapper"
            )
        for column, leaf in zip(columns, leaves, strict=True):
            column.append(leaf)
    return _tree.unflatten(spec, [np.array(column) for column in columns])


def make_episode(
    observations: Any,
    actions: Any,
    rewards: np.ndarray,
    *,
    terminated: bool,
    truncated: bool,
    benchmark_id: str,
    metadata: dict[str, Any],
    infos: list[dict[str, Any]] | None,
) -> EpisodeData:
    """An ``EpisodeData`` with ``T + 1`` observations; discounts are 0 on a terminal last step.

    ``infos`` made only of empty dicts is dropped (``None``) so the store writes no info column.

    Example:
        >>> ep = make_episode(np.zeros(3), np.zeros(2), np.ones(2), terminated=True,
        ...                   truncated=False, benchmark_id="b", metadata={}, infos=[{}, {}])
        >>> ep.discounts.tolist(), ep.infos
        ([1.0, 0.0], None)
    """
    discounts = np.ones(rewards.shape[0], dtype=np.float32)
    if terminated:
        discounts[-1] = 0.0
    if infos is not None and not any(infos):
        infos = None
    return EpisodeData(
        observations=observations,
        actions=actions,
        rewards=rewards,
        discounts=discounts,
        terminated=bool(terminated),
        truncated=bool(truncated),
        metadata=metadata,
        benchmark_id=benchmark_id,
        infos=infos,
        has_reset_observation=True,
    )


def batch_discounts(n_tuples: np.ndarray, terminated: np.ndarray) -> np.ndarray:
    """``[sum(T_e)]`` float32 discounts of packed episodes: 0 on a terminated episode's last step.

    Example:
        >>> batch_discounts(np.array([2, 1]), np.array([True, False])).tolist()
        [1.0, 0.0, 1.0]
    """
    discounts = np.ones(int(n_tuples.sum()), dtype=np.float32)
    ends = np.cumsum(n_tuples) - 1
    discounts[ends[terminated]] = 0.0
    return discounts


# ----------------------------------------------------------------------------------------------
# Pending items: packed batches (with what EpisodeBatch has no field for) and single episodes
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PendingBatch:
    """Finished episodes as packed columns, plus their per-step infos (``EpisodeBatch`` has none).

    Attributes:
        batch: The episodes (one benchmark).
        infos: ``None`` (no episode has infos) or, per episode, ``None`` or its ``T_e`` info dicts.
    """

    batch: EpisodeBatch
    infos: list[list[dict[str, Any]] | None] | None = None

    def episodes(self) -> list[EpisodeData]:
        """The episodes as ``EpisodeData`` (views into the columns), infos attached."""
        episodes = self.batch.episodes()
        if self.infos is not None:
            for episode, infos in zip(episodes, self.infos, strict=True):
                episode.infos = infos if infos is not None and any(infos) else None
        return episodes


PendingItem = PendingBatch | EpisodeData
"""What a sink holds until its next write: packed batches or single (irregular) episodes."""


def _column_layout(column: Any) -> tuple[list[np.ndarray], Any]:
    leaves, spec = _tree.flatten(column, leading_axis=True)
    return leaves, spec


def merge_batches(items: Sequence[PendingBatch]) -> PendingBatch | None:
    """One ``PendingBatch`` holding every episode of ``items`` in order, or ``None`` when they
    differ in benchmark, structure, dtype or per-row shape (write them as episodes then).

    Example:
        >>> def one(obs):
        ...     return PendingBatch(EpisodeBatch(
        ...         observations=obs, actions=np.zeros(1), rewards=np.ones(1),
        ...         discounts=np.ones(1, np.float32), n_tuples=np.array([1]),
        ...         terminated=np.array([False]), truncated=np.array([True])))
        >>> merged = merge_batches([one(np.zeros(2)), one(np.ones(2))])
        >>> merged.batch.observations.tolist(), merged.batch.n_tuples.tolist()
        ([0.0, 0.0, 1.0, 1.0], [1, 1])
    """
    if len(items) == 1:
        return items[0]
    first = items[0].batch
    names = ("observations", "actions", "rewards", "discounts")
    layouts = {name: _column_layout(getattr(first, name)) for name in names}
    columns: dict[str, list[list[np.ndarray]]] = {
        name: [[leaf] for leaf in layouts[name][0]] for name in names
    }
    if first.extras:
        return None
    for item in items[1:]:
        batch = item.batch
        if batch.benchmark_id != first.benchmark_id or batch.extras:
            return None
        for name in names:
            leaves, spec = _column_layout(getattr(batch, name))
            if spec != layouts[name][1]:
                return None
            for column, leaf in zip(columns[name], leaves, strict=True):
                column.append(leaf)
    merged = {
        name: _tree.unflatten(layouts[name][1], [np.concatenate(c) for c in columns[name]])
        for name in names
    }
    metadata: list[dict[str, Any]] | None = None
    if any(item.batch.metadata is not None for item in items):
        metadata = []
        for item in items:
            metadata.extend(item.batch.metadata or [{}] * len(item.batch))
    infos: list[list[dict[str, Any]] | None] | None = None
    if any(item.infos is not None for item in items):
        infos = []
        for item in items:
            infos.extend(item.infos or [None] * len(item.batch))
    batch = EpisodeBatch(
        n_tuples=np.concatenate([item.batch.n_tuples for item in items]),
        terminated=np.concatenate([item.batch.terminated for item in items]),
        truncated=np.concatenate([item.batch.truncated for item in items]),
        benchmark_id=first.benchmark_id,
        metadata=metadata,
        **merged,
    )
    return PendingBatch(batch, infos)


# ----------------------------------------------------------------------------------------------
# Typed growable columns
# ----------------------------------------------------------------------------------------------


class _Column:
    """Row buffers of one pytree column (observations or actions): leaf ``k`` is ``bufs[k]``,
    shaped ``[capacity, *shape_k]`` with the dtype of the value the column was made from.

    ``put`` accepts a value only if it has exactly that structure, dtypes and shapes; the fast
    paths (a bare array, a bare scalar of the same type) cost an identity test or two.
    """

    __slots__ = ("bufs", "dtype0", "kind", "layout", "row_nbytes", "scalar_type", "shape0", "spec")

    def __init__(self, value: Any, leaves: list[np.ndarray], spec: Any, capacity: int) -> None:
        self.spec = spec
        self.layout = [(leaf.dtype, leaf.shape) for leaf in leaves]
        self.bufs = [np.empty((capacity, *leaf.shape), leaf.dtype) for leaf in leaves]
        self.row_nbytes = sum(leaf.nbytes for leaf in leaves)
        self.dtype0: np.dtype[Any] | None = leaves[0].dtype if len(leaves) == 1 else None
        self.shape0: tuple[int, ...] | None = leaves[0].shape if len(leaves) == 1 else None
        self.scalar_type: type | None = None
        if type(value) is np.ndarray:
            self.kind = _ARRAY
        elif isinstance(value, _SCALAR_TYPES):
            self.kind = _SCALAR
            self.scalar_type = type(value)
        else:
            self.kind = _TREE

    @classmethod
    def of(cls, value: Any, capacity: int) -> _Column | None:
        """A column for values like ``value``, or ``None`` if a typed buffer cannot hold it."""
        try:
            leaves, spec = _tree.flatten(value)
        except TypeError:
            return None
        if not leaves or any(leaf.dtype.kind == "O" for leaf in leaves):
            return None
        return cls(value, leaves, spec, capacity)

    def put(self, value: Any, row: int) -> bool:
        """Copies ``value`` into ``row``; False (nothing written) if it does not fit the layout."""
        kind = self.kind
        if kind == _ARRAY:
            if (
                type(value) is np.ndarray
                and value.dtype is self.dtype0
                and value.shape == self.shape0
            ):
                self.bufs[0][row] = value
                return True
        elif kind == _SCALAR and type(value) is self.scalar_type:
            try:
                self.bufs[0][row] = value
            except (OverflowError, TypeError, ValueError):
                return False
            return True
        return self._put_tree(value, row)

    def _put_tree(self, value: Any, row: int) -> bool:
        try:
            leaves, spec = _tree.flatten(value)
        except TypeError:
            return False
        if spec != self.spec or len(leaves) != len(self.layout):
            return False
        for leaf, (dtype, shape) in zip(leaves, self.layout, strict=True):
            if leaf.dtype != dtype or leaf.shape != shape:
                return False
        for buf, leaf in zip(self.bufs, leaves, strict=True):
            buf[row] = leaf
        return True

    def row(self, row: int) -> Any:
        """The value stored in ``row`` (copies, in the column's structure)."""
        values = [np.array(buf[row]) for buf in self.bufs]
        if self.kind == _SCALAR:
            return values[0][()]
        if self.kind == _ARRAY:
            return values[0]
        return _tree.unflatten(self.spec, values)

    def take(self, stop: int) -> Any:
        """Rows ``[0, stop)`` as a pytree of new arrays ``[stop, ...]``."""
        leaves = [buf[:stop].copy() for buf in self.bufs]
        return leaves[0] if self.kind != _TREE else _tree.unflatten(self.spec, leaves)

    def move(self, start: int, stop: int) -> None:
        """Moves rows ``[start, stop)`` to the front."""
        if start:
            for buf in self.bufs:
                buf[: stop - start] = buf[start:stop]

    def grow(self, capacity: int, keep: int) -> None:
        """Reallocates with ``capacity`` rows, keeping rows ``[0, keep)``."""
        for k, buf in enumerate(self.bufs):
            new = np.empty((capacity, *buf.shape[1:]), buf.dtype)
            new[:keep] = buf[:keep]
            self.bufs[k] = new


@dataclasses.dataclass
class _ListEpisode:
    """An episode recorded as lists (values the typed columns cannot hold)."""

    observations: list[Any]
    actions: list[Any] = dataclasses.field(default_factory=list)
    rewards: list[Any] = dataclasses.field(default_factory=list)

    def append(self, obs: Any, action: Any, reward: Any) -> None:
        self.observations.append(copy_tree(obs))
        self.actions.append(action if isinstance(action, _SCALAR_TYPES) else copy_tree(action))
        self.rewards.append(reward)


class EpisodeColumns:
    """The episode in progress and the finished, not yet stored episodes, as packed columns.

    Observations go into a typed buffer (one row assignment per leaf and step); scalar actions
    (Python or numpy scalars of one type) and rewards into lists, converted once per batch;
    other actions (arrays, pytrees) into a typed buffer like the observations. Holds no reference
    to the wrapper or the storage (a finalizer may drain it). Usage: ``begin`` on reset,
    ``append`` per step, ``end`` when the episode ends (or ``drop`` to discard it), ``drain`` to
    take the finished episodes.

    Example:
        >>> cols = EpisodeColumns()
        >>> cols.begin(0.5); cols.append(1.5, 1, 2.0); cols.steps
        1
    """

    def __init__(self, capacity: int = _INITIAL_ROWS) -> None:
        self.capacity = capacity
        self.obs: _Column | None = None
        # Rows [0, obs_start) of the observation buffer and items [0, step_start) of the step
        # columns hold finished episodes; the episode in progress has rows
        # [obs_start, obs_row) and [step_start, step_row).
        self.obs_row = self.obs_start = self.step_row = self.step_start = 0
        self.rewards: list[Any] = []
        # Actions: ``None`` until the first step of new buffers, then a list of scalars of
        # one type (``act_scalar``, numpy dtype ``act_dtype``) or a typed ``_Column``.
        self.act_kind: str | None = None
        self.actions: list[Any] = []
        self.act: _Column | None = None
        self.act_type: type | None = None
        self.act_dtype: np.dtype[Any] | None = None
        self.irregular: _ListEpisode | None = None
        self.benchmark_id = ""
        self.n_tuples: list[int] = []
        self.terminated: list[bool] = []
        self.truncated: list[bool] = []
        self.metadata: list[dict[str, Any]] = []
        self.infos: list[list[dict[str, Any]] | None] = []
        self.sealed: list[PendingItem] = []  # go before the finished episodes in the buffers
        # Fast path of ``append`` (a bare array observation and a scalar action): what it
        # checks against, refreshed by ``_refresh`` (``act_scalar`` is ``_Never`` while off).
        self.obs_buf: np.ndarray | None = None
        self.obs_dtype: np.dtype[Any] | None = None
        self.obs_shape: tuple[int, ...] | None = None
        self.act_scalar: type = _Never

    @property
    def steps(self) -> int:
        """Transitions recorded so far in the episode in progress."""
        if self.irregular is not None:
            return len(self.irregular.actions)
        return self.step_row - self.step_start

    @property
    def finished(self) -> int:
        """Finished episodes not yet drained."""
        return len(self.n_tuples) + len(self.sealed)

    @property
    def step_nbytes(self) -> int:
        """Bytes a transition takes in the buffers: observation, action and reward (float64)."""
        nbytes = 8 + (self.obs.row_nbytes if self.obs is not None else 0)
        if self.act_kind == _LIST and self.act_dtype is not None:
            nbytes += self.act_dtype.itemsize
        elif self.act is not None:
            nbytes += self.act.row_nbytes
        return nbytes

    def begin(self, obs: Any) -> None:
        """Starts an episode with its reset observation (drops the one in progress)."""
        self.drop()
        if self.obs_row == self.capacity:
            self._grow()
        if self.obs is not None and self.obs.put(obs, self.obs_row):
            self.obs_row += 1
            return
        column = _Column.of(obs, self.capacity)
        if column is None:
            self.irregular = _ListEpisode([copy_tree(obs)])
            self._refresh()
            return
        self.seal()  # the finished episodes keep their layout
        self.obs, self.act, self.act_kind, self.act_type = column, None, None, None
        column.put(obs, 0)
        self.obs_row = 1
        self._refresh()

    def append(self, obs: Any, action: Any, reward: Any) -> None:
        """Records one step of the episode in progress (``begin`` must have been called)."""
        o = self.obs_row
        if (
            type(action) is self.act_scalar
            and type(obs) is _ndarray
            and obs.dtype is self.obs_dtype
            and obs.shape == self.obs_shape
            and o < self.capacity
        ):
            self.obs_buf[o] = obs  # type: ignore[index]
            self.obs_row = o + 1
            self.step_row += 1
            self.actions.append(action)
            self.rewards.append(reward)
            return
        self._append_slow(obs, action, reward)

    def _append_slow(self, obs: Any, action: Any, reward: Any) -> None:
        """``append`` for what the fast path leaves out: pytree or scalar observations, array
        or pytree actions, a full buffer, the first step of new buffers, and values that do not
        fit the buffers (the episode continues as lists)."""
        if self.irregular is not None:
            self.irregular.append(obs, action, reward)
            return
        if self.obs_row == self.capacity:
            self._grow()
        if self.act_kind is None:
            self._start_actions(action)
        obs_column = self.obs
        assert obs_column is not None
        s = self.step_row
        if self.act_kind == _LIST:  # scalars of one numpy dtype (int and np.int64 mix)
            fits = type(action) is self.act_type or (
                isinstance(action, _SCALAR_TYPES) and np.asarray(action).dtype == self.act_dtype
            )
        else:
            fits = self.act is not None and self.act.put(action, s)
        if fits and obs_column.put(obs, self.obs_row):
            if self.act_kind == _LIST:
                self.actions.append(action)
            self.rewards.append(reward)
            self.obs_row += 1
            self.step_row = s + 1
            return
        self._to_lists().append(obs, action, reward)

    def _start_actions(self, action: Any) -> None:
        """Chooses how actions are kept, from the first action of new buffers."""
        if isinstance(action, _SCALAR_TYPES):
            dtype = np.asarray(action).dtype
            if dtype.kind != "O":
                self.act_kind, self.act_type, self.act_dtype = _LIST, type(action), dtype
                self._refresh()
                return
        self.act_kind, self.act = _COLUMN, _Column.of(action, self.capacity)

    def _refresh(self) -> None:
        """Points the fast path of ``append`` at the current buffers (or turns it off)."""
        obs = self.obs
        if obs is not None and obs.kind == _ARRAY:
            self.obs_buf, self.obs_dtype, self.obs_shape = obs.bufs[0], obs.dtype0, obs.shape0
        else:
            self.obs_buf = self.obs_dtype = self.obs_shape = None
        self.act_scalar = _Never
        if self.act_kind == _LIST and self.irregular is None and self.act_type is not None:
            self.act_scalar = self.act_type

    def end(
        self,
        terminated: bool,
        truncated: bool,
        benchmark_id: str,
        metadata: dict[str, Any],
        infos: list[dict[str, Any]] | None,
    ) -> int:
        """Finishes the episode in progress; returns its number of transitions.

        Raises:
            TypeError: An irregular episode's steps cannot be stacked (structure changed).
        """
        lists = self.irregular
        if lists is not None:
            self.irregular = None
            self._refresh()
            episode = make_episode(
                stack_trees(lists.observations),
                stack_trees(lists.actions),
                np.asarray(lists.rewards, dtype=np.float64),
                terminated=terminated,
                truncated=truncated,
                benchmark_id=benchmark_id,
                metadata=metadata,
                infos=infos,
            )
            self.seal()
            self.sealed.append(episode)
            return episode.length
        if benchmark_id != self.benchmark_id:
            self.seal()  # a batch holds one benchmark
            self.benchmark_id = benchmark_id
        steps = self.step_row - self.step_start
        self.n_tuples.append(steps)
        self.terminated.append(terminated)
        self.truncated.append(truncated)
        self.metadata.append(metadata)
        self.infos.append(infos)
        self.obs_start = self.obs_row
        self.step_start = self.step_row
        return steps

    def drop(self) -> None:
        """Discards the episode in progress."""
        if self.irregular is not None:
            self.irregular = None
            self._refresh()
        self.obs_row = self.obs_start
        self.step_row = self.step_start
        del self.rewards[self.step_start :]
        del self.actions[self.step_start :]

    def current(self) -> tuple[list[Any], list[Any], list[Any]]:
        """The steps of the episode in progress: observations returned by the steps (the reset
        observation left out), actions and rewards."""
        if self.irregular is not None:
            lists = self.irregular
            return lists.observations[1:], lists.actions, lists.rewards
        if self.obs is None or self.obs_row == self.obs_start:
            return [], [], []
        return (
            [self.obs.row(r) for r in range(self.obs_start + 1, self.obs_row)],
            self._current_actions(),
            self.rewards[self.step_start : self.step_row],
        )

    def _current_actions(self) -> list[Any]:
        return self._actions_of(range(self.step_start, self.step_row))

    def _actions_of(self, steps: range) -> list[Any]:
        if self.act_kind == _LIST:
            return self.actions[steps.start : steps.stop]
        act = self.act
        return [act.row(r) for r in steps] if act is not None else []

    def seal(self) -> None:
        """Moves the finished episodes out of the buffers (copies) into ``sealed``."""
        if self.n_tuples:
            self.sealed.extend(self._batch())

    def drain(self) -> list[PendingItem]:
        """Takes every finished episode, in order; the episode in progress stays."""
        self.seal()
        items, self.sealed = self.sealed, []
        return items

    def _batch(self) -> list[PendingItem]:
        """The finished episodes as a batch of copies (as single episodes if their scalar
        actions do not share a dtype); the buffers keep the episode in progress."""
        assert self.obs is not None
        n_steps = self.step_start
        n_tuples = np.array(self.n_tuples, dtype=np.int64)
        terminated = np.array(self.terminated, dtype=bool)
        if self.act_kind == _LIST:
            try:
                actions = np.array(self.actions[:n_steps], dtype=self.act_dtype)
            except (OverflowError, TypeError, ValueError):  # Python ints beyond int64
                return self._episodes()
            del self.actions[:n_steps]
        else:
            assert self.act is not None
            actions = self.act.take(n_steps)
        rewards = np.asarray(self.rewards[:n_steps], dtype=np.float64)
        del self.rewards[:n_steps]
        batch = EpisodeBatch(
            observations=self.obs.take(self.obs_start),
            actions=actions,
            rewards=rewards,
            discounts=batch_discounts(n_tuples, terminated),
            n_tuples=n_tuples,
            terminated=terminated,
            truncated=np.array(self.truncated, dtype=bool),
            benchmark_id=self.benchmark_id,
            metadata=self.metadata if any(self.metadata) else None,
        )
        infos = self.infos if any(i is not None for i in self.infos) else None
        pending = PendingBatch(batch, infos)
        self._forget_finished()
        return [pending]

    def _episodes(self) -> list[PendingItem]:
        """The finished episodes one by one, each stacked on its own as the list recorder would
        (for scalar actions that fit no common dtype)."""
        assert self.obs is not None
        items: list[PendingItem] = []
        obs, step = 0, 0
        for e, length in enumerate(self.n_tuples):
            rows = range(obs, obs + length + 1)
            items.append(
                make_episode(
                    stack_trees([self.obs.row(r) for r in rows]),
                    stack_trees(self._actions_of(range(step, step + length))),
                    np.asarray(self.rewards[step : step + length], dtype=np.float64),
                    terminated=self.terminated[e],
                    truncated=self.truncated[e],
                    benchmark_id=self.benchmark_id,
                    metadata=self.metadata[e],
                    infos=self.infos[e],
                )
            )
            obs, step = obs + length + 1, step + length
        if self.act_kind == _LIST:
            del self.actions[: self.step_start]
        del self.rewards[: self.step_start]
        self._forget_finished()
        return items

    def _forget_finished(self) -> None:
        """Drops the finished episodes' rows (the lists are trimmed by the caller); the episode
        in progress moves to the front."""
        assert self.obs is not None
        self.obs.move(self.obs_start, self.obs_row)
        if self.act_kind == _COLUMN and self.act is not None:
            self.act.move(self.step_start, self.step_row)
        self.obs_row -= self.obs_start
        self.step_row -= self.step_start
        self.obs_start = self.step_start = 0
        self.n_tuples, self.terminated, self.truncated = [], [], []
        self.metadata, self.infos = [], []

    def _to_lists(self) -> _ListEpisode:
        """Turns the episode in progress into lists (a value did not fit the typed columns)."""
        assert self.obs is not None
        lists = _ListEpisode(
            [self.obs.row(r) for r in range(self.obs_start, self.obs_row)],
            self._current_actions(),
            self.rewards[self.step_start : self.step_row],
        )
        self.drop()
        self.irregular = lists
        self._refresh()
        return lists

    def _grow(self) -> None:
        capacity = self.capacity * 2
        if self.obs is not None:
            self.obs.grow(capacity, self.obs_row)
        if self.act is not None:
            self.act.grow(capacity, self.step_row)
        self.capacity = capacity
        self._refresh()
