"""``EpisodeData``: one episode in columnar form, as the store writes and loads it.

Host-side only (numpy). ``observations`` keeps the env's pytree structure (dicts, tuples, lists,
NamedTuples of arrays) with leading axis ``T + 1`` (reset observation first, true final observation
last) or ``T`` for episodes recorded from pytupli tuples, which have no reset observation.
``actions`` is a pytree with leading axis ``T``; ``rewards`` and ``discounts`` are ``[T]``;
``extras`` is a dict of pytrees with leading axis ``T``.

``EpisodeBatch`` holds ``E`` complete episodes of one benchmark as packed columns (episodes back
to back), the form a flush produces and ``FileStorage.record_episode_batch`` writes without any
per-episode Python.

Example:
    >>> import numpy as np
    >>> ep = EpisodeData(
    ...     observations=np.zeros((4, 2), np.float32), actions=np.zeros(3, np.int32),
    ...     rewards=np.ones(3, np.float32), discounts=np.array([1, 1, 0], np.float32),
    ...     terminated=True, truncated=False)
    >>> ep.length, ep.episode_return
    (3, 3.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

__all__ = ["EpisodeBatch", "EpisodeData"]


@dataclasses.dataclass
class EpisodeData:
    """A complete episode in columnar form.

    Attributes:
        observations: Pytree of arrays ``[T + 1, ...]`` (or ``[T, ...]`` when
            ``has_reset_observation`` is false).
        actions: Pytree of arrays ``[T, ...]``.
        rewards: ``[T]`` rewards.
        discounts: ``[T]`` discounts (0 on a terminating step).
        terminated: The episode ended in a terminal state.
        truncated: The episode was cut by a time limit (pytupli's ``timeout``).
        metadata: JSON-serialisable episode metadata.
        benchmark_id: Id of the benchmark the episode belongs to.
        id: Episode id once stored, else ``None``.
        extras: Dict of pytrees ``[T, ...]`` (e.g. chosen jumanji ``extras``).
        infos: Optional per-step info dicts (``T`` of them), kept for pytupli's tuple view.
        has_reset_observation: Whether ``observations`` starts with the reset observation.
    """

    observations: Any
    actions: Any
    rewards: np.ndarray
    discounts: np.ndarray
    terminated: bool
    truncated: bool
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    benchmark_id: str = ""
    id: str | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    infos: list[dict[str, Any]] | None = None
    has_reset_observation: bool = True

    @property
    def length(self) -> int:
        """Number of transitions ``T``."""
        return int(np.shape(self.rewards)[0])

    @property
    def episode_return(self) -> float:
        """Undiscounted sum of rewards."""
        return float(np.sum(np.asarray(self.rewards, dtype=np.float64)))


def _map(fn: Any, tree: Any) -> Any:
    """``fn`` applied to every leaf, keeping the pytree's containers."""
    if isinstance(tree, dict):
        return {key: _map(fn, value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        items = [_map(fn, item) for item in tree]
        if isinstance(tree, list):
            return items
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    return fn(tree)


@dataclasses.dataclass
class EpisodeBatch:
    """``E`` complete episodes of one benchmark as packed columns, episodes back to back.

    Episode ``e`` has ``T_e = n_tuples[e]`` transitions: its rows of ``actions``, ``rewards``,
    ``discounts`` and ``extras`` are ``steps[e] : steps[e] + T_e`` with ``steps`` the exclusive
    cumulative sum of ``n_tuples``; its ``T_e + 1`` observations (reset observation first) are
    rows ``obs[e] : obs[e] + T_e + 1`` with ``obs`` the exclusive cumulative sum of
    ``n_tuples + 1``.

    Attributes:
        observations: Pytree of arrays ``[sum(T_e + 1), ...]``.
        actions: Pytree of arrays ``[sum(T_e), ...]``.
        rewards: ``[sum(T_e)]`` rewards.
        discounts: ``[sum(T_e)]`` discounts.
        n_tuples: ``[E]`` int, transitions per episode (each >= 1).
        terminated: ``[E]`` bool, the episode ended in a terminal state.
        truncated: ``[E]`` bool, the episode was cut by a time limit.
        benchmark_id: Id of the benchmark all the episodes belong to.
        metadata: ``None`` (no metadata) or ``E`` JSON-serialisable dicts.
        extras: Dict of pytrees ``[sum(T_e), ...]``.

    Example:
        >>> import numpy as np
        >>> batch = EpisodeBatch(
        ...     observations=np.arange(5.0), actions=np.zeros(3, np.int32),
        ...     rewards=np.ones(3, np.float32), discounts=np.array([1, 0, 1], np.float32),
        ...     n_tuples=np.array([2, 1]), terminated=np.array([True, False]),
        ...     truncated=np.array([False, True]))
        >>> len(batch), batch.episode(1).observations.tolist(), batch.episode(1).truncated
        (2, [3.0, 4.0], True)
    """

    observations: Any
    actions: Any
    rewards: np.ndarray
    discounts: np.ndarray
    n_tuples: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    benchmark_id: str = ""
    metadata: list[dict[str, Any]] | None = None
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(np.shape(self.n_tuples)[0])

    @property
    def num_transitions(self) -> int:
        """``sum(T_e)``."""
        return int(np.sum(self.n_tuples, dtype=np.int64))

    def _offsets(self) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.asarray(self.n_tuples, np.int64)
        steps = np.concatenate([[0], np.cumsum(lengths)])
        obs = np.concatenate([[0], np.cumsum(lengths + 1)])
        return steps, obs

    def episode_returns(self) -> np.ndarray:
        """``[E]`` float64 undiscounted returns (one vectorised reduction; the rounding of a
        long episode's sum may differ in the last bits from ``EpisodeData.episode_return``)."""
        rewards = np.asarray(self.rewards, np.float64)
        if len(self) == 0:
            return np.zeros(0, np.float64)
        if rewards.ndim > 1:
            rewards = rewards.reshape(rewards.shape[0], -1).sum(axis=1)
        steps, _ = self._offsets()
        return np.add.reduceat(rewards, steps[:-1]) if rewards.size else np.zeros(len(self))

    def episode(self, index: int) -> EpisodeData:
        """Episode ``index`` as an ``EpisodeData`` of views into the columns (no copy).

        Raises:
            IndexError: ``index`` is not in ``[0, E)``.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"episode index {index} out of range for a batch of {len(self)}")
        index %= len(self)
        steps, obs = self._offsets()
        s, e = int(steps[index]), int(steps[index + 1])
        o, p = int(obs[index]), int(obs[index + 1])
        return EpisodeData(
            observations=_map(lambda x: x[o:p], self.observations),
            actions=_map(lambda x: x[s:e], self.actions),
            rewards=self.rewards[s:e],
            discounts=self.discounts[s:e],
            terminated=bool(self.terminated[index]),
            truncated=bool(self.truncated[index]),
            metadata={} if self.metadata is None else self.metadata[index],
            benchmark_id=self.benchmark_id,
            extras=_map(lambda x: x[s:e], self.extras),
        )

    def episodes(self) -> list[EpisodeData]:
        """Every episode as an ``EpisodeData`` of views, in order."""
        return [self.episode(i) for i in range(len(self))]
