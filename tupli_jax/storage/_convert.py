"""Tuple form <-> columnar form of episodes (pytupli ``Episode`` and ``EpisodeData``).

Host-side only (numpy). pytupli stores an episode as a list of ``RLTuple(state, action, reward,
terminal, timeout, info)``; the store keeps columns (``EpisodeData``). ``as_episode_data``
validates a batch given in either form; ``tuple_view`` rebuilds pytupli's tuples on load.

Example:
    >>> from tupli_jax.schema import Episode, RLTuple
    >>> ep = Episode(benchmark_id="b", metadata={}, tuples=[RLTuple(state=[0.0], action=1,
    ...     reward=1.0, terminal=True)])
    >>> data = from_tuples(0, ep)
    >>> data.observations.shape, data.discounts.tolist(), data.has_reset_observation
    ((1, 1), [0.0], False)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydantic

from tupli_jax.episode import EpisodeData
from tupli_jax.schema import Episode, RLTuple
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.catalog import fast_model

__all__ = ["as_episode_data", "builtin_rows", "from_tuples", "tuple_view"]


def as_episode_data(episodes: Sequence[Episode | EpisodeData]) -> list[EpisodeData]:
    """A batch given as pytupli ``Episode``s and/or ``EpisodeData``, all as ``EpisodeData``.

    Raises:
        TupliStorageError: ``episodes`` is not a list of episodes, or a tuple-form episode is
            empty or cannot be stacked into numeric arrays.
    """
    if isinstance(episodes, Episode | EpisodeData) or not isinstance(episodes, Sequence):
        raise TupliStorageError(
            f"record_episodes expects a list of Episode or EpisodeData, received "
            f"{type(episodes).__name__} (use record_episode for a single episode)"
        )
    items: list[EpisodeData] = []
    for i, episode in enumerate(episodes):
        if isinstance(episode, Episode):
            items.append(from_tuples(i, episode))
        elif isinstance(episode, EpisodeData):
            items.append(episode)
        elif isinstance(episode, pydantic.BaseModel) and hasattr(episode, "tuples"):
            # pytupli's own schema classes: same fields, another class
            items.append(from_tuples(i, Episode.model_validate(episode.model_dump())))
        else:
            raise TupliStorageError(
                f"episode {i} is a {type(episode).__name__}; expected a pytupli Episode or "
                "tupli_jax.EpisodeData"
            )
    return items


def _stack(values: list[Any], what: str) -> Any:
    """Stacks per-tuple values (dicts, lists, scalars) into a pytree of arrays ``[T, ...]``."""
    first = values[0]
    if isinstance(first, Mapping):
        keys = list(first)
        if not all(isinstance(v, Mapping) and list(v) == keys for v in values):
            raise TupliStorageError(f"{what}: the tuples' dicts do not all have keys {keys}")
        return {str(k): _stack([v[k] for v in values], f"{what}.{k}") for k in keys}
    try:
        array = np.asarray(values)
    except (ValueError, TypeError):
        array = None
    if array is not None and array.dtype.kind in "biuf":
        return array
    if isinstance(first, list | tuple) and all(
        isinstance(v, list | tuple) and len(v) == len(first) for v in values
    ):
        return [_stack([v[j] for v in values], f"{what}[{j}]") for j in range(len(first))]
    raise TupliStorageError(
        f"{what}: cannot stack the tuples' values into one numeric array (received e.g. "
        f"{first!r:.80}); expected numbers, bools or equal-shape (nested) lists or dicts of them"
    )


def from_tuples(index: int, episode: Episode) -> EpisodeData:
    """A pytupli tuple-form episode as ``EpisodeData`` (no reset observation: T observations)."""
    tuples = episode.tuples
    if not tuples:
        raise TupliStorageError(f"episode {index} has no tuples; expected at least one transition")
    try:
        rewards = np.asarray([float(t.reward) for t in tuples], np.float64)
    except (TypeError, ValueError) as err:
        raise TupliStorageError(f"episode {index}: rewards must be numbers ({err})") from None
    last = tuples[-1]
    discounts = np.ones(len(tuples), np.float32)
    discounts[-1] = 0.0 if last.terminal else 1.0
    return EpisodeData(
        observations=_stack([t.state for t in tuples], f"episode {index}: states"),
        actions=_stack([t.action for t in tuples], f"episode {index}: actions"),
        rewards=rewards,
        discounts=discounts,
        terminated=bool(last.terminal),
        truncated=bool(last.timeout),
        metadata=episode.metadata,
        benchmark_id=episode.benchmark_id,
        infos=[dict(t.info) for t in tuples],
        has_reset_observation=False,
    )


def builtin_rows(tree: Any, start: int, n: int) -> list[Any]:
    """Rows ``start .. start + n`` of a pytree of arrays as plain Python values (``to_builtin``)."""
    if isinstance(tree, Mapping):
        keys = [str(k) for k in tree]
        columns = [builtin_rows(v, start, n) for v in tree.values()]
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)] or [
            {} for _ in range(n)
        ]
    if isinstance(tree, list | tuple):
        columns = [builtin_rows(v, start, n) for v in tree]
        return [list(row) for row in zip(*columns, strict=True)] or [[] for _ in range(n)]
    if tree is None:
        return [None] * n
    rows: list[Any] = np.asarray(tree)[start : start + n].tolist()
    return rows


def tuple_view(episode: EpisodeData, n_tuples: int) -> list[RLTuple]:
    """pytupli's tuple view: tuple ``t`` holds the observation returned by step ``t``."""
    offset = 1 if episode.has_reset_observation else 0
    states = builtin_rows(episode.observations, offset, n_tuples)
    actions = builtin_rows(episode.actions, 0, n_tuples)
    rewards = np.asarray(episode.rewards, np.float64).tolist()
    infos = episode.infos or [{} for _ in range(n_tuples)]
    out = []
    for t in range(n_tuples):
        last = t == n_tuples - 1
        values = {
            "state": states[t],
            "action": actions[t],
            "reward": rewards[t],
            "info": infos[t] if infos[t] is not None else {},
            "terminal": bool(episode.terminated) if last else False,
            "timeout": bool(episode.truncated) if last else False,
        }
        out.append(fast_model(RLTuple, values))
    return out
