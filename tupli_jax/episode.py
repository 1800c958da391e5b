"""``EpisodeData``: one episode in columnar form, as the store writes and loads it.

Host-side only (numpy). ``observations`` keeps the env's pytree structure (dicts, tuples, lists,
NamedTuples of arrays) with leading axis ``T + 1`` (reset observation first, true final observation
last) or ``T`` for episodes recorded from pytupli tuples, which have no reset observation.
``actions`` is a pytree with leading axis ``T``; ``rewards`` and ``discounts`` are ``[T]``;
``extras`` is a dict of pytrees with leading axis ``T``.

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

__all__ = ["EpisodeData"]


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
