"""``TupliDataset``'s columnar view: transition rows gathered from shard columns. Host side only.

``_plan`` turns the catalog's ``EpisodeLocations`` into index arrays (vectorised, no Python per
episode) and ``_gather_columns`` gathers ``to_numpy``'s columns from the decoded shards with one
``take_rows`` per leaf and shard; ``_columns_from_episodes`` builds the same columns from
``EpisodeData`` for storages without shards, ``_select_rows`` and ``_d4rl`` post-process them.
Split out of ``tupli_jax.dataset`` (whose ``TupliDataset`` is the only user); nothing here is
public.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from tupli_jax import _tree
from tupli_jax._rows import ranges, take_rows
from tupli_jax.episode import EpisodeData
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.file_storage import EpisodeLocations
from tupli_jax.storage.shards import Shard, open_shard


def _spec_shape_key(spec: _tree.TreeSpec) -> str:
    """Structure and per-row shapes of a spec, without dtypes (dtypes are promoted instead)."""

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k != "dtype"}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return _tree.spec_key(strip(spec))


def _empty_columns() -> dict[str, Any]:
    empty = np.zeros((0,), np.float32)
    return {
        "observations": empty,
        "actions": empty.copy(),
        "rewards": empty.copy(),
        "next_observations": empty.copy(),
        "terminals": np.zeros((0,), np.bool_),
        "timeouts": np.zeros((0,), np.bool_),
        "episode_ids": np.zeros((0,), object),
    }


def _common_layout(
    shards: list[Shard], group: str
) -> tuple[_tree.TreeSpec, list[tuple[tuple[int, ...], np.dtype[Any]]]]:
    """The shared spec of column ``group`` ("obs" or "act") and per leaf its row shape and
    promoted dtype."""

    def spec_of(shard: Shard) -> _tree.TreeSpec:
        return shard.obs_spec if group == "obs" else shard.action_spec

    first = spec_of(shards[0])
    key = _spec_shape_key(first)
    for shard in shards[1:]:
        if _spec_shape_key(spec_of(shard)) != key:
            raise ValueError(
                f"the selected episodes do not share one {group} structure (shard "
                f"'{shards[0].path.name}' has {key}, shard '{shard.path.name}' has "
                f"{_spec_shape_key(spec_of(shard))}); expected one structure and per-row shape: "
                "narrow the selection, e.g. with_benchmark_filter(FilterEQ(key='id', value=...))"
            )
    leaves = []
    for j, column in enumerate(shards[0].columns(group)):
        dtype = np.result_type(*(shard.columns(group)[j].dtype for shard in shards))
        leaves.append((tuple(column.shape[1:]), dtype))
    return first, leaves


@dataclasses.dataclass(frozen=True)
class _ShardRows:
    """The rows one shard contributes: ``s_t`` is row ``rows[i]``, ``s_t+1`` the next row.

    ``actions`` says where a_t and r_t are: ``"same"`` (episodes with a reset observation),
    ``"next"`` (one row later: episodes without one) or explicit rows (a mix of both).
    """

    shard: int
    rows: np.ndarray
    actions: str | np.ndarray
    dst: slice | np.ndarray
    max_row: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What ``to_numpy`` gathers for some ``EpisodeLocations`` (kept while the store is
    unchanged: 8 bytes per row of indices plus the shared read-only ``episode_ids``)."""

    locations: EpisodeLocations
    total: int
    parts: list[_ShardRows]
    last: np.ndarray  # int64, the last row of each episode with rows
    terminated: np.ndarray  # bool, per ``last``
    truncated: np.ndarray
    episode_ids: np.ndarray  # object [total], read-only


def _plan(locations: EpisodeLocations) -> _Plan:
    """Index arrays for ``locations`` (catalog order), vectorised: no Python per episode."""
    has_reset = locations.has_reset
    counts = locations.n_tuples - (~has_reset).astype(np.int64)  # T, or T - 1 without reset obs
    ends = np.cumsum(counts)
    out_starts = ends - counts
    order = np.argsort(locations.shard_index, kind="stable")
    bounds = np.searchsorted(
        locations.shard_index[order], np.arange(len(locations.shard_paths) + 1)
    )
    parts = []
    for s in range(len(locations.shard_paths)):
        episodes = order[bounds[s] : bounds[s + 1]]
        episodes = episodes[counts[episodes] > 0]
        if episodes.size == 0:
            continue
        c = counts[episodes]
        rows = ranges(locations.row_start[episodes], c)
        shift = ~has_reset[episodes]
        actions: str | np.ndarray = "same"
        if shift.all():
            actions = "next"
        elif shift.any():
            actions = rows + np.repeat(shift.astype(np.int64), c)
        starts = out_starts[episodes]
        contiguous = bool(np.all(starts[1:] == starts[:-1] + c[:-1]))
        dst = slice(int(starts[0]), int(starts[0] + c.sum())) if contiguous else ranges(starts, c)
        parts.append(_ShardRows(s, rows, actions, dst, int(rows.max())))
    with_rows = counts > 0
    ids = np.empty((len(locations),), object)
    ids[:] = locations.ids
    episode_ids = np.repeat(ids, counts)
    episode_ids.flags.writeable = False
    return _Plan(
        locations=locations,
        total=int(ends[-1]) if len(ends) else 0,
        parts=parts,
        last=(ends - 1)[with_rows],
        terminated=locations.terminated[with_rows],
        truncated=locations.truncated[with_rows],
        episode_ids=episode_ids,
    )


def _gather_columns(plan: _Plan) -> dict[str, Any]:
    """``to_numpy``'s columns: one ``take`` per leaf and shard into preallocated arrays."""
    locations = plan.locations
    if len(locations) == 0:
        return _empty_columns()
    shards = [
        open_shard(path, checksum)
        for path, checksum in zip(locations.shard_paths, locations.shard_checksums, strict=True)
    ]
    obs_spec, obs_leaves = _common_layout(shards, "obs")
    act_spec, act_leaves = _common_layout(shards, "act")
    reward_dtype = np.result_type(*(s.columns("reward")[0].dtype for s in shards))
    total = plan.total

    def allocate(leaves: list[tuple[tuple[int, ...], np.dtype[Any]]]) -> list[np.ndarray]:
        return [np.empty((total, *shape), dtype) for shape, dtype in leaves]

    observations, next_observations = allocate(obs_leaves), allocate(obs_leaves)
    actions, rewards = allocate(act_leaves), np.empty((total,), reward_dtype)
    for part in plan.parts:
        shard = shards[part.shard]
        if part.max_row + 1 >= shard.n_rows:  # s_t+1 of the last row; take(mode="clip") needs it
            raise TupliStorageError(
                f"the catalog places episodes beyond the {shard.n_rows} rows of shard "
                f"'{shard.path}'; the store is damaged: run verify()"
            )
        for column, o, n in zip(shard.columns("obs"), observations, next_observations, strict=True):
            take_rows(column, part.rows, o, part.dst)
            take_rows(column[1:], part.rows, n, part.dst)  # s_t+1: one row on, same indices
        act_columns = shard.columns("act") + shard.columns("reward")
        for column, out in zip(act_columns, [*actions, rewards], strict=True):
            if isinstance(part.actions, np.ndarray):
                take_rows(column, part.actions, out, part.dst)
            else:
                source = column[1:] if part.actions == "next" else column
                take_rows(source, part.rows, out, part.dst)
    terminals = np.zeros((total,), np.bool_)
    timeouts = np.zeros((total,), np.bool_)
    terminals[plan.last] = plan.terminated
    timeouts[plan.last] = plan.truncated
    return {
        "observations": _tree.unflatten(obs_spec, observations),
        "actions": _tree.unflatten(act_spec, actions),
        "rewards": rewards,
        "next_observations": _tree.unflatten(obs_spec, next_observations),
        "terminals": terminals,
        "timeouts": timeouts,
        "episode_ids": plan.episode_ids,
    }


def _map_leaves(tree: Any, fn: Callable[[np.ndarray], np.ndarray]) -> Any:
    leaves, spec = _tree.flatten(tree)
    return _tree.unflatten(spec, [fn(leaf) for leaf in leaves])


def _select_rows(columns: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    return {key: _map_leaves(value, lambda leaf: leaf[mask]) for key, value in columns.items()}


def _d4rl(columns: dict[str, Any]) -> dict[str, Any]:
    def flat(value: Any) -> Any:
        return value.astype(np.float32) if isinstance(value, np.ndarray) else value

    return {
        "observations": flat(columns["observations"]),
        "actions": flat(columns["actions"]),
        "next_observations": flat(columns["next_observations"]),
        "rewards": np.asarray(columns["rewards"], np.float32),
        "terminals": columns["terminals"],
        "timeouts": columns["timeouts"],
    }


def _columns_from_episodes(episodes: list[EpisodeData]) -> dict[str, Any]:
    """``to_numpy``'s columns from ``EpisodeData``s (storages without shards; Python per
    episode)."""
    if not episodes:
        return _empty_columns()
    obs_specs = [_tree.flatten(e.observations, leading_axis=True)[1] for e in episodes]
    act_specs = [_tree.flatten(e.actions, leading_axis=True)[1] for e in episodes]
    for specs, what in ((obs_specs, "observation"), (act_specs, "action")):
        keys = {_spec_shape_key(spec) for spec in specs}
        if len(keys) > 1:
            raise ValueError(
                f"the selected episodes do not share one {what} structure ({sorted(keys)[:2]}); "
                "expected one structure and per-row shape: narrow the selection"
            )
    obs, nxt, act, rew, term, trunc, ids = [], [], [], [], [], [], []
    for ep in episodes:
        offset = 0 if ep.has_reset_observation else 1
        n = ep.length - offset
        leaves = _tree.flatten(ep.observations, leading_axis=True)[0]
        obs.append([leaf[:n] for leaf in leaves])
        nxt.append([leaf[1 : n + 1] for leaf in leaves])
        act.append([leaf[offset:] for leaf in _tree.flatten(ep.actions, leading_axis=True)[0]])
        rew.append(np.asarray(ep.rewards)[offset:])
        last = np.arange(n) == n - 1
        term.append(last & bool(ep.terminated))
        trunc.append(last & bool(ep.truncated))
        ids.append(np.full((n,), ep.id, object))

    def stack(spec: _tree.TreeSpec, per_episode: list[list[np.ndarray]]) -> Any:
        return _tree.unflatten(
            spec, [np.concatenate(leaf) for leaf in zip(*per_episode, strict=True)]
        )

    return {
        "observations": stack(obs_specs[0], obs),
        "actions": stack(act_specs[0], act),
        "rewards": np.concatenate(rew),
        "next_observations": stack(obs_specs[0], nxt),
        "terminals": np.concatenate(term),
        "timeouts": np.concatenate(trunc),
        "episode_ids": np.concatenate(ids),
    }
