"""The shard layout: columns of an episode structure, validation, grouping by structure.

Host-side only. ``_Layout`` (the five ``TreeSpec``s of an episode: observations, actions,
extras, rewards, discounts) lists a shard's columns as ``_Column``s (name, group, dtype, per-row
shape); the validation helpers check episodes against a layout and raise ``TupliStorageError``
naming the first bad episode and field; ``group_by_structure`` groups episodes one shard each.
The file format is described in ``shards`` (the public module); ``_shard_write`` writes it and
``_shard_read`` reads it, both on top of this module.

Example:
    >>> a = EpisodeData(np.zeros((2, 1)), np.zeros(1), np.zeros(1), np.ones(1), True, False)
    >>> [c.name for c in _layout_of(0, a).columns()]
    ['obs', 'act', 'reward', 'discount']
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from tupli_jax._tree import (
    TreeSpec,
    compile_flatten_as,
    flatten,
    leaf_names,
    structure_key,
)
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import to_builtin
from tupli_jax.storage.base import TupliStorageError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "group_by_structure"]

FORMAT_NAME = "tupli_jax.shard"
FORMAT_VERSION = 1
_METADATA_KEY = b"tupli_jax"
# Dtypes a shard may hold; also an allow-list for specs read from files (never ``object``).
_DTYPES = frozenset(
    ["bool", "float16", "float32", "float64"]
    + [f"{p}int{b}" for p in ("", "u") for b in (8, 16, 32, 64)]
)
_GROUPS = ("obs", "act", "ext", "reward", "discount")
_FIELDS = ("observations", "actions", "extras", "rewards", "discounts")  # EpisodeData, per group


class _Column(NamedTuple):
    name: str
    group: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]

    @property
    def stored(self) -> bool:
        return math.prod(self.shape) > 0

    def arrow_type(self) -> pa.DataType:
        primitive = pa.from_numpy_dtype(self.dtype)
        return primitive if not self.shape else pa.list_(primitive, math.prod(self.shape))


class _Layout(NamedTuple):
    obs_spec: TreeSpec
    action_spec: TreeSpec
    extras_spec: TreeSpec
    reward_spec: TreeSpec
    discount_spec: TreeSpec

    def columns(self) -> list[_Column]:
        columns: list[_Column] = []
        parts = (
            ("obs", self.obs_spec, "obs"),
            ("act", self.action_spec, "act"),
            ("ext", self.extras_spec, "ext"),
            ("reward", self.reward_spec, "reward"),
            ("discount", self.discount_spec, "discount"),
        )
        for group, spec, prefix in parts:
            for name, leaf in zip(leaf_names(spec, prefix), _leaf_specs(spec), strict=True):
                columns.append(_Column(name, group, np.dtype(leaf["dtype"]), tuple(leaf["shape"])))
        return columns


def _leaf_specs(spec: TreeSpec, *, validate: bool = True) -> list[TreeSpec]:
    """Leaf nodes in flatten order; ``validate`` checks dtype (allow-list) and shape, as specs
    read from files must be."""
    if not isinstance(spec, dict):
        raise ValueError(f"invalid TreeSpec node {spec!r:.200}")
    if spec.get("kind") == "leaf":
        dtype, shape = spec.get("dtype"), spec.get("shape")
        if validate and (
            dtype not in _DTYPES
            or not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise ValueError(f"leaf spec {spec!r:.200} has no supported dtype/shape")
        return [spec]
    children = spec.get("children") or []
    return [leaf for child in children for leaf in _leaf_specs(child, validate=validate)]


# ------------------------------------------------------------------------------------------------
# Validation


def _flatten_field(where: str, field: str, tree: Any) -> tuple[list[np.ndarray], TreeSpec]:
    try:
        return flatten(tree, leading_axis=True)
    except (TypeError, ValueError) as err:
        raise TupliStorageError(f"{where}: {field}: {err}") from None


def _check_episode_type(index: int, episode: Any) -> None:
    if not isinstance(episode, EpisodeData):
        raise TupliStorageError(
            f"episode {index} is a {type(episode).__name__}; expected tupli_jax.EpisodeData"
        )
    if not isinstance(episode.extras, dict):
        raise TupliStorageError(
            f"episode {index}: extras is a {type(episode.extras).__name__}; expected a dict"
        )


def _layout_from(where: str, trees: Sequence[Any]) -> tuple[_Layout, list[np.ndarray], int]:
    """Layout, leaves (in ``_Layout.columns`` order) and number of observation leaves of the
    five trees (observations, actions, extras, rewards, discounts)."""
    flat = [_flatten_field(where, name, tree) for name, tree in zip(_FIELDS, trees, strict=True)]
    for name, (_, spec) in zip(_FIELDS[3:], flat[3:], strict=True):
        if spec["kind"] != "leaf":
            raise TupliStorageError(
                f"{where}: {name} is a {spec['kind']}; expected one array [T, ...]"
            )
    layout = _Layout(*(spec for _, spec in flat))
    return layout, [leaf for leaves, _ in flat for leaf in leaves], len(flat[0][0])


def _layout_of(index: int, episode: Any) -> _Layout:
    _check_episode_type(index, episode)
    return _layout_from(f"episode {index}", _fields_of(episode))[0]


def _field_leaf_names(layout: _Layout) -> list[str]:
    """Leaf names as users know them (``observations.agent.row``), in column order."""
    return [
        name
        for field, spec in zip(_FIELDS, layout, strict=True)
        for name in leaf_names(spec, field)
    ]


def _check_dtypes(where: str, layout: _Layout) -> None:
    for name, leaf in zip(
        _field_leaf_names(layout),
        [leaf for spec in layout for leaf in _leaf_specs(spec, validate=False)],
        strict=True,
    ):
        if leaf["dtype"] not in _DTYPES:
            raise TupliStorageError(
                f"{where}: {name} has dtype {leaf['dtype']}; expected bool, "
                "(u)int8-64 or float16/32/64: cast it (e.g. bfloat16 -> float32) first"
            )


def _encode_infos(index: int, infos: Any, n_tuples: int) -> list[str] | None:
    if infos is None:
        return None
    if not isinstance(infos, list | tuple) or len(infos) != n_tuples:
        received = len(infos) if isinstance(infos, list | tuple) else type(infos).__name__
        raise TupliStorageError(
            f"episode {index}: infos has {received} entries; expected None or a list of "
            f"{n_tuples} dicts (one per step)"
        )
    encoded = []
    for t, info in enumerate(infos):
        try:
            encoded.append(json.dumps(to_builtin(info if info is not None else {})))
        except (TypeError, ValueError) as err:
            raise TupliStorageError(
                f"episode {index}: infos[{t}] is not JSON-serialisable ({err}); keep only "
                "numbers, strings, lists and dicts in infos"
            ) from None
    return encoded


def _fields_of(episode: EpisodeData) -> tuple[Any, ...]:
    return (
        episode.observations,
        episode.actions,
        episode.extras,
        episode.rewards,
        episode.discounts,
    )


def _describe(layout: _Layout) -> list[str]:
    return [f"{c.name}:{c.dtype}{list(c.shape)}" for c in layout.columns()]


def _structure_error(index: int, expected: _Layout, received: _Layout) -> TupliStorageError:
    want, got = _describe(expected), _describe(received)
    diff = sorted(set(want) ^ set(got))[:6] or ["NamedTuple classes differ"]
    return TupliStorageError(
        f"episode {index} has a different structure from episode 0 of the batch (differences: "
        f"{', '.join(diff)}); expected all episodes of one shard to share structure, dtypes "
        "and per-row shapes: group them with group_by_structure() first"
    )


def _length_error(
    where: str,
    layout: _Layout,
    column: int,
    received: int,
    expected: int,
    n_tuples: int,
    *,
    observations_t1: bool,
) -> TupliStorageError:
    name = _field_leaf_names(layout)[column]
    what = "T + 1" if name.startswith("observations") and observations_t1 else "T"
    return TupliStorageError(
        f"{where}: {name} has leading length {received}; expected {expected} ({what}, "
        f"T = {n_tuples} rewards): all arrays of an episode must agree in length"
    )


def _compile_layout(layout: _Layout) -> Callable[[Any], list[np.ndarray] | None]:
    """Leaves (in ``_Layout.columns`` order) of a 5-tuple of episode fields matching ``layout``."""
    return compile_flatten_as({"kind": "tuple", "children": list(layout)})


def _validate_one(index: int, episode: Any, layout: _Layout) -> None:
    """Raises the error of episode ``index`` (the reference, per-episode validation)."""
    _check_episode_type(index, episode)
    received, leaves, n_obs = _layout_from(f"episode {index}", _fields_of(episode))
    if received != layout:
        raise _structure_error(index, layout, received)
    n_tuples = int(leaves[-2].shape[0])
    if n_tuples == 0:
        raise TupliStorageError(
            f"episode {index} is empty (0 transitions); expected at least one step"
        )
    reset = bool(episode.has_reset_observation)
    for j, leaf in enumerate(leaves):
        expected = n_tuples + reset if j < n_obs else n_tuples
        if leaf.shape[0] != expected:
            raise _length_error(
                f"episode {index}", layout, j, leaf.shape[0], expected, n_tuples,
                observations_t1=reset,
            )  # fmt: skip
    _encode_infos(index, episode.infos, n_tuples)


class _Group(NamedTuple):
    layout: _Layout
    leaves_of: Callable[[Any], list[np.ndarray] | None]  # compiled flatten_as of the layout
    indices: list[int]
    leaves: list[list[np.ndarray]]  # per episode of the group, in _Layout.columns() order


def _group(episodes: Sequence[Any]) -> list[_Group]:
    """Groups by layout, keeping each episode's leaves; raises for unsupported pytrees."""
    groups: list[_Group] = []
    by_key: dict[Hashable, _Group] = {}
    last: _Group | None = None
    for index, episode in enumerate(episodes):
        if type(episode) is not EpisodeData:
            _check_episode_type(index, episode)
        fields = _fields_of(episode)
        leaves = last.leaves_of(fields) if last is not None else None
        group = last
        if leaves is None:
            key = structure_key(fields)
            group = by_key.get(key)
            if group is not None:
                leaves = group.leaves_of(fields)
            if group is None or leaves is None:  # a new key (or, never, a key collision)
                _check_episode_type(index, episode)
                layout, leaves, _ = _layout_from(f"episode {index}", fields)
                # e.g. a dict whose keys are in another order: another key, the same layout
                group = next((g for g in groups if g.layout == layout), None)
                if group is None:
                    group = _Group(layout, _compile_layout(layout), [], [])
                    groups.append(group)
                by_key[key] = group
        assert group is not None
        group.indices.append(index)
        group.leaves.append(leaves)
        last = group
    return groups


def group_by_structure(episodes: Sequence[EpisodeData]) -> list[list[int]]:
    """Groups episode indices by identical structure, dtypes and per-row shapes, in O(N).

    Each episode is first checked against the group of the previous episode with a compiled
    ``flatten_as`` (about 1 us for a CartPole episode); on a miss its ``structure_key`` is looked
    up, and only a key never seen before costs a full ``flatten``.

    Args:
        episodes: Episodes to group.

    Returns:
        Index lists in order of first appearance; each group can go to one ``write_shard``.

    Raises:
        TupliStorageError: An episode's fields are not a supported pytree of arrays.

    Example:
        >>> a = EpisodeData(np.zeros((2, 1)), np.zeros(1), np.zeros(1), np.ones(1), True, False)
        >>> b = EpisodeData(np.zeros((2, 3)), np.zeros(1), np.zeros(1), np.ones(1), True, False)
        >>> group_by_structure([a, b, a])
        [[0, 2], [1]]
    """
    return [group.indices for group in _group(episodes)]
