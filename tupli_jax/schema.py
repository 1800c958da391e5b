"""pytupli-compatible data models and filters.

The models keep pytupli's names, fields and defaults so that code written against
``pytupli.schema`` works unchanged; the differences are additions (``EpisodeHeader.truncated``,
``EpisodeHeader.episode_return``) and fixes (``FilterIN`` works; an ordering comparison between
incomparable types makes only that leaf false instead of raising).

``matches(filter, document)`` is the reference semantics of a filter on a plain-Python document;
the storage engine compiles filters to SQL and is tested against it.

Example:
    >>> f = FilterEQ(key="metadata.seed", value=3) & FilterGEQ(key="n_tuples", value=10)
    >>> matches(f, {"metadata": {"seed": 3}, "n_tuples": 12})
    True
"""

from __future__ import annotations

import datetime
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping
from enum import Enum
from typing import Any, Self

import numpy as np
from pydantic import BaseModel, model_validator

__all__ = [
    "ArtifactMetadata",
    "ArtifactMetadataItem",
    "BaseFilter",
    "Benchmark",
    "BenchmarkHeader",
    "BenchmarkMetadata",
    "BenchmarkQuery",
    "DBItem",
    "Episode",
    "EpisodeHeader",
    "EpisodeItem",
    "EpisodeMetadataCallback",
    "FilterAND",
    "FilterEQ",
    "FilterGEQ",
    "FilterGT",
    "FilterIN",
    "FilterLEQ",
    "FilterLT",
    "FilterNE",
    "FilterOR",
    "FilterType",
    "RLTuple",
    "get_path",
    "matches",
    "to_builtin",
]


def _new_id() -> str:
    return uuid.uuid4().hex


def _now() -> str:
    return datetime.datetime.now().isoformat()


def to_builtin(value: Any) -> Any:
    """Converts numpy arrays/scalars (recursively, inside dicts, lists and tuples) to Python values.

    Example:
        >>> to_builtin({"a": np.float32(1.5), "b": np.arange(2)})
        {'a': 1.5, 'b': [0, 1]}
    """
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): to_builtin(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_builtin(v) for v in value]
    if hasattr(value, "__array__") and hasattr(value, "shape"):  # jax arrays
        return np.asarray(value).tolist()
    return value


class DBItem(BaseModel):
    """Fields every stored object carries (pytupli's ``DBItem``)."""

    id: str
    created_by: str
    published_in: list[str] = []
    created_at: str

    @classmethod
    def create_new(cls, **data: Any) -> Self:
        """Creates an item with a fresh id, the current time and ``published_in=[created_by]``."""
        data.setdefault("id", _new_id())
        data.setdefault("created_at", _now())
        data.setdefault("published_in", [data.get("created_by")])
        return cls(**data)


class ArtifactMetadata(BaseModel):
    """Metadata given when storing an artifact (a csv file, a trained model, ...)."""

    name: str
    description: str = ""
    benchmark_id: str | None = None
    extra: dict[str, Any] = {}


class BenchmarkMetadata(BaseModel):
    """Human-facing description of a benchmark."""

    name: str
    description: str = ""
    difficulty: str | None = None
    version: str | None = None
    extra: dict[str, Any] = {}


class BenchmarkQuery(BaseModel):
    """What a wrapper sends to ``store_benchmark``: hash, serialized env and metadata."""

    hash: str
    serialized: str
    metadata: BenchmarkMetadata


class ArtifactMetadataItem(DBItem, ArtifactMetadata):
    """A stored artifact's header."""

    hash: str
    encoding: str = "utf-8"


class BenchmarkHeader(DBItem):
    """A stored benchmark without its serialized env."""

    hash: str
    metadata: BenchmarkMetadata


class Benchmark(BenchmarkHeader):
    """A stored benchmark including the jsonpickle encoding of its env."""

    serialized: str


class RLTuple(BaseModel):
    """One transition in pytupli's tuple view: ``state`` is the observation returned by the step."""

    state: Any
    action: Any
    reward: Any
    info: dict[str, Any] = {}
    terminal: bool = False
    timeout: bool = False

    @classmethod
    def from_env_step(
        cls,
        obs: Any,
        action: Any,
        reward: Any,
        terminated: bool,
        truncated: bool,
        info: dict[str, Any],
    ) -> Self:
        """Builds a tuple from a Gymnasium step; numpy values (arrays and scalars) become lists.

        Unlike pytupli this accepts Python ``int`` actions, numpy scalar rewards and numpy values
        inside ``info``.

        Example:
            >>> RLTuple.from_env_step(np.zeros(2), 1, np.float64(1.0), False, False, {}).state
            [0.0, 0.0]
        """
        return cls(
            state=to_builtin(obs),
            action=to_builtin(action),
            reward=float(reward),
            terminal=bool(terminated),
            timeout=bool(truncated),
            info=to_builtin(dict(info)) if info else {},
        )


class Episode(BaseModel):
    """An episode in pytupli's tuple form, as given to ``record_episode``."""

    benchmark_id: str
    metadata: dict[str, Any]
    tuples: list[RLTuple]


class EpisodeHeader(DBItem):
    """A stored episode's header: pytupli's fields plus ``truncated`` and ``episode_return``."""

    benchmark_id: str
    metadata: dict[str, Any]
    n_tuples: int
    terminated: bool
    timeout: bool
    truncated: bool = False
    episode_return: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _truncated_defaults_to_timeout(cls, data: Any) -> Any:
        if isinstance(data, dict) and "truncated" not in data and "timeout" in data:
            data = {**data, "truncated": data["timeout"]}
        return data


class EpisodeItem(Episode, EpisodeHeader):
    """A stored episode with its tuples (``list_episodes(include_tuples=True)``)."""

    @classmethod
    def create_new(cls, **data: Any) -> Self:
        """Creates an item from tuples, deriving ``n_tuples``, ``terminated`` and ``timeout``."""
        tuples = data["tuples"]
        last = tuples[-1] if tuples else None

        def flag(name: str) -> bool:
            if last is None:
                return False
            return bool(last[name] if isinstance(last, dict) else getattr(last, name))

        data.setdefault("n_tuples", len(tuples))
        data.setdefault("terminated", flag("terminal"))
        data.setdefault("timeout", flag("timeout"))
        return super().create_new(**data)


class EpisodeMetadataCallback(ABC):
    """Computes episode metadata from the tuples as they are recorded (pytupli's interface).

    ``__call__`` is called with every tuple; the dict it returns for the last tuple of an episode
    becomes the episode's metadata. ``reset`` is called after each stored episode.
    """

    @abstractmethod
    def reset(self) -> None:
        """Resets the callback's internal state."""

    @abstractmethod
    def __call__(self, tuple: RLTuple) -> dict[str, Any]:
        """Returns the episode metadata as known after ``tuple``."""


# --------------------------------------------------------------------------------------------
# Filters
# --------------------------------------------------------------------------------------------


class FilterType(str, Enum):
    """The filter operators of pytupli."""

    EQ = "EQ"
    GEQ = "GEQ"
    LEQ = "LEQ"
    GT = "GT"
    LT = "LT"
    NE = "NE"
    IN = "IN"
    AND = "AND"
    OR = "OR"


_COMBINATORS = (FilterType.AND, FilterType.OR)


class BaseFilter(BaseModel):
    """A filter tree. Leaves compare the value at a dotted ``key`` with ``value``.

    Semantics (``matches``): a missing key makes a leaf false (also for ``NE``); equality is
    Python equality (``True == 1 == 1.0``, ``'1' != 1``); an ordering comparison between
    incomparable types makes that leaf false; ``IN`` is true when the value equals one element of
    ``value``; an empty ``AND`` is true and an empty ``OR`` false.

    Example:
        >>> (FilterEQ(key="a", value=1) | FilterEQ(key="a", value=2)).type
        <FilterType.OR: 'OR'>
    """

    type: FilterType = FilterType.OR
    key: str | None = None
    value: Any | None = None
    filters: list[BaseFilter] | None = []

    @model_validator(mode="after")
    def _check_leaf(self) -> Self:
        if self.type not in _COMBINATORS:
            if self.key is None or self.value is None:
                raise ValueError(f"{self.type.value} filter must have key and value set")
            if self.type is FilterType.IN and not isinstance(self.value, list | tuple | set):
                raise ValueError(
                    f"IN filter expects a list value, received {type(self.value).__name__}"
                )
        return self

    def __and__(self, other: BaseFilter) -> BaseFilter:
        """``a & b``: flattens into an existing AND on either side."""
        if self.type is FilterType.AND:
            return FilterAND(filters=[*(self.filters or []), other])
        if other.type is FilterType.AND:
            return FilterAND(filters=[self, *(other.filters or [])])
        return FilterAND(filters=[self, other])

    def __or__(self, other: BaseFilter) -> BaseFilter:
        """``a | b``: flattens into an existing OR on either side."""
        if self.type is FilterType.OR:
            return FilterOR(filters=[*(self.filters or []), other])
        if other.type is FilterType.OR:
            return FilterOR(filters=[self, *(other.filters or [])])
        return FilterOR(filters=[self, other])

    def to_params_dict(self, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """The filter as a plain dict (pytupli sends this as query parameters)."""
        return {**(params or {}), **self.model_dump(exclude_none=True)}

    def apply_prefix(self, prefix: str) -> None:
        """Prefixes the key of this filter and all subfilters with ``prefix + '.'`` in place."""
        if self.key:
            self.key = f"{prefix}.{self.key}"
        for sub in self.filters or []:
            sub.apply_prefix(prefix)


class FilterEQ(BaseFilter):
    """``key == value``."""

    type: FilterType = FilterType.EQ


class FilterNE(BaseFilter):
    """``key != value`` (false when the key is missing)."""

    type: FilterType = FilterType.NE


class FilterGEQ(BaseFilter):
    """``key >= value``."""

    type: FilterType = FilterType.GEQ


class FilterLEQ(BaseFilter):
    """``key <= value``."""

    type: FilterType = FilterType.LEQ


class FilterGT(BaseFilter):
    """``key > value``."""

    type: FilterType = FilterType.GT


class FilterLT(BaseFilter):
    """``key < value``."""

    type: FilterType = FilterType.LT


class FilterIN(BaseFilter):
    """``key`` equals one of the elements of the list ``value``."""

    type: FilterType = FilterType.IN


class FilterAND(BaseFilter):
    """All subfilters hold."""

    type: FilterType = FilterType.AND
    filters: list[BaseFilter]


class FilterOR(BaseFilter):
    """At least one subfilter holds."""

    type: FilterType = FilterType.OR
    filters: list[BaseFilter]

    @classmethod
    def from_list(cls, items: list[Any], on_key: str, from_key: str) -> FilterOR:
        """One ``FilterEQ(on_key, getattr(item, from_key))`` per item, OR-ed together."""
        return cls(filters=[FilterEQ(key=on_key, value=getattr(i, from_key)) for i in items])


_MISSING = object()


def get_path(document: Any, key: str) -> Any:
    """The value at dotted ``key`` in nested dicts, or a private sentinel when it is missing.

    Each dot-separated part is a literal dict key; nothing else (no indexing, no wildcards).
    """
    value = document
    for part in key.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def is_missing(value: Any) -> bool:
    """Whether ``value`` is the sentinel ``get_path`` returns for a missing key."""
    return value is _MISSING


def _ordered(op: FilterType, left: Any, right: Any) -> bool:
    # Strings only compare with strings, numbers (bool included) only with numbers; anything
    # else (None, lists, dicts, mixed types) is incomparable, which makes the leaf false.
    numeric = (bool, int, float)
    both_str = isinstance(left, str) and isinstance(right, str)
    if not both_str and not (isinstance(left, numeric) and isinstance(right, numeric)):
        return False
    if op is FilterType.GEQ:
        return bool(left >= right)
    if op is FilterType.LEQ:
        return bool(left <= right)
    if op is FilterType.GT:
        return bool(left > right)
    return bool(left < right)


def matches(filter: BaseFilter | None, document: Mapping[str, Any]) -> bool:
    """Evaluates ``filter`` on a plain-Python ``document`` (the reference filter semantics).

    Args:
        filter: The filter tree, or ``None`` for "everything".
        document: A header as a dict (``header.model_dump()``).

    Returns:
        Whether the document passes the filter.

    Example:
        >>> matches(FilterIN(key="k", value=[1, 2]), {"k": 2.0})
        True
    """
    if filter is None:
        return True
    kind = filter.type
    if kind is FilterType.AND:
        return all(matches(f, document) for f in filter.filters or [])
    if kind is FilterType.OR:
        return any(matches(f, document) for f in filter.filters or [])
    assert filter.key is not None
    value = get_path(document, filter.key)
    if value is _MISSING:
        return False
    if kind is FilterType.EQ:
        return bool(value == filter.value)
    if kind is FilterType.NE:
        return bool(value != filter.value)
    if kind is FilterType.IN:
        return any(value == v for v in filter.value or ())
    return _ordered(kind, value, filter.value)
