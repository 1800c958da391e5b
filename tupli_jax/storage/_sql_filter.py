"""Filter compilation: pytupli filter trees to SQL conditions on the catalog's tables.

Filters compile to SQL with bound parameters only (keys select columns from fixed maps or are
bound as leaf paths; values are always bound). The semantics are exactly those of
``tupli_jax.schema.matches`` on ``header.model_dump()``. ``metadata.*`` keys use the side table
of metadata nodes (``_documents``), so a selective leaf such as ``metadata.seed == 7`` is an
index seek. Where SQL cannot decide a leaf exactly (list or dict values, exotic Python types,
integers beyond 64 bits), the SQL selects a superset and ``matches`` decides in Python.

Example:
    >>> from tupli_jax.schema import FilterEQ
    >>> sql = compile_filter(FilterEQ(key="metadata.seed", value=7), EPISODE_FIELDS)
    >>> sql.exact, "episode_leaves" in sql.text
    (True, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from tupli_jax.schema import BaseFilter, FilterType
from tupli_jax.storage._documents import (
    I64_MAX,
    I64_MIN,
    NUMBER,
    TEXT,
    UNINDEXED,
    scalar_leaf,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = [
    "ARTIFACT_FIELDS",
    "BENCHMARK_FIELDS",
    "EPISODE_FIELDS",
    "Column",
    "Doc",
    "Fields",
    "Sql",
    "compile_filter",
]

# SQLite allows 32766 bound parameters per statement; beyond this a filter falls back to Python.
_MAX_PARAMS = 30_000
_CHUNK = 500
# Strings that SQLite's JSON parser decodes to exactly themselves (for large IN lists).
_JSON_SAFE = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*')


@dataclasses.dataclass(frozen=True)
class Column:
    """A header field stored in a column. ``kind``: text, opt_text, int, real or list."""

    name: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Doc:
    """A header field holding a JSON dict, indexed in the side table ``table``."""

    table: str


Fields = Mapping[str, "Column | Doc | Fields"]

EPISODE_FIELDS: Fields = {
    "id": Column("id", "text"),
    "created_by": Column("created_by", "text"),
    "published_in": Column("published_in", "list"),
    "created_at": Column("created_at", "text"),
    "benchmark_id": Column("benchmark_id", "text"),
    "metadata": Doc("episode_leaves"),
    "n_tuples": Column("n_tuples", "int"),
    "terminated": Column("terminated", "int"),
    "timeout": Column("timeout", "int"),
    "truncated": Column("truncated", "int"),
    "episode_return": Column("episode_return", "real"),
}
BENCHMARK_FIELDS: Fields = {
    "id": Column("id", "text"),
    "created_by": Column("created_by", "text"),
    "published_in": Column("published_in", "list"),
    "created_at": Column("created_at", "text"),
    "hash": Column("hash", "text"),
    "metadata": {
        "name": Column("name", "text"),
        "description": Column("description", "text"),
        "difficulty": Column("difficulty", "opt_text"),
        "version": Column("version", "opt_text"),
        "extra": Doc("benchmark_leaves"),
    },
}
ARTIFACT_FIELDS: Fields = {
    "id": Column("id", "text"),
    "created_by": Column("created_by", "text"),
    "published_in": Column("published_in", "list"),
    "created_at": Column("created_at", "text"),
    "name": Column("name", "text"),
    "description": Column("description", "text"),
    "benchmark_id": Column("benchmark_id", "opt_text"),
    "extra": Doc("artifact_leaves"),
    "hash": Column("hash", "text"),
    "encoding": Column("encoding", "text"),
}


@dataclasses.dataclass(frozen=True)
class Sql:
    """A compiled condition on ``t`` (the listed table). ``exact=False``: a superset, recheck."""

    text: str
    params: tuple[Any, ...] = ()
    exact: bool = True


_TRUE, _FALSE, _SUPERSET = Sql("1"), Sql("0"), Sql("1", (), False)
_OPS = {
    FilterType.EQ: "=",
    FilterType.NE: "<>",
    FilterType.GT: ">",
    FilterType.GEQ: ">=",
    FilterType.LT: "<",
    FilterType.LEQ: "<=",
}


def _category(value: Any) -> tuple[str, Any]:
    """Classifies a filter value: null, num, str, nan, or other (decided in Python)."""
    if value is None:
        return "null", None
    kind = type(value)
    if kind is bool:
        return "num", int(value)
    if kind is int:
        return ("num", value) if I64_MIN <= value <= I64_MAX else ("other", value)
    if isinstance(value, float):  # np.float64 subclasses float and compares like it
        number = float(value)
        return ("nan", number) if math.isnan(number) else ("num", number)
    if kind is str and scalar_leaf(value)[0] == TEXT:
        return "str", value
    return "other", value


def _and(parts: Sequence[Sql]) -> Sql:
    exact = all(p.exact for p in parts)
    if any(p.text == "0" for p in parts):
        return Sql("0", (), exact)
    kept = [p for p in parts if p.text != "1"]
    if not kept:
        return Sql("1", (), exact)
    if len(kept) == 1:
        return Sql(kept[0].text, kept[0].params, exact)
    params = tuple(x for p in kept for x in p.params)
    return Sql("(" + " AND ".join(p.text for p in kept) + ")", params, exact)


def _or(parts: Sequence[Sql]) -> Sql:
    exact = all(p.exact for p in parts)
    if any(p.text == "1" for p in parts):
        return Sql("1", (), exact)
    kept = [p for p in parts if p.text != "0"]
    if not kept:
        return Sql("0", (), exact)
    if len(kept) == 1:
        return Sql(kept[0].text, kept[0].params, exact)
    params = tuple(x for p in kept for x in p.params)
    return Sql("(" + " OR ".join(p.text for p in kept) + ")", params, exact)


def _in_list(expr: str, values: Sequence[Any]) -> list[Sql]:
    """``expr IN (...)`` in chunks of bound parameters (one JSON parameter for safe strings)."""
    if len(values) > _CHUNK and all(isinstance(v, str) and _JSON_SAFE.fullmatch(v) for v in values):
        return [Sql(f"{expr} IN (SELECT value FROM json_each(?))", (json.dumps(list(values)),))]
    out = []
    for i in range(0, len(values), _CHUNK):
        chunk = tuple(values[i : i + _CHUNK])
        out.append(Sql(f"{expr} IN ({','.join('?' * len(chunk))})", chunk))
    return out


def _container_leaf(op: FilterType, values: Sequence[tuple[str, Any]]) -> Sql:
    """A leaf on a list or dict field (always present): only 'other' values may equal it."""
    if op in (FilterType.EQ, FilterType.IN):
        return _SUPERSET if any(c == "other" for c, _ in values) else _FALSE
    if op is FilterType.NE:
        return _SUPERSET if values[0][0] == "other" else _TRUE
    return _FALSE  # a list or dict is never ordered


def _column_leaf(col: Column, op: FilterType, values: Sequence[tuple[str, Any]]) -> Sql:
    if col.kind == "list":
        return _container_leaf(op, values)
    name = f"t.{col.name}"
    own = "str" if col.kind in ("text", "opt_text") else "num"  # the values the column holds
    nullable = col.kind in ("opt_text", "real")  # NULL: None for opt_text, NaN for real
    if op is FilterType.IN:
        if any(c == "other" for c, _ in values):
            return _SUPERSET
        parts = _in_list(name, [v for c, v in values if c == own])
        if col.kind == "opt_text" and any(c == "null" for c, _ in values):
            parts.append(Sql(f"{name} IS NULL"))
        return _or(parts)
    cat, value = values[0]
    if cat == "other":
        return _SUPERSET
    if op is FilterType.EQ:
        if cat == own:
            return Sql(f"{name} = ?", (value,))
        return Sql(f"{name} IS NULL") if cat == "null" and col.kind == "opt_text" else _FALSE
    if op is FilterType.NE:
        if cat == own:
            null_ok = f"{name} IS NULL OR " if nullable else ""
            return Sql(f"({null_ok}{name} <> ?)", (value,))
        return Sql(f"{name} IS NOT NULL") if cat == "null" and col.kind == "opt_text" else _TRUE
    return Sql(f"{name} {_OPS[op]} ?", (value,)) if cat == own else _FALSE


def _doc_leaf(table: str, path: str, op: FilterType, values: Sequence[tuple[str, Any]]) -> Sql:
    def owners(*conds: Sql) -> Sql:
        selects = [f"SELECT owner FROM {table} WHERE path = ? AND {c.text}" for c in conds]
        params = tuple(x for c in conds for x in (path, *c.params))
        return Sql(f"t.rid IN ({' UNION ALL '.join(selects)})", params)

    exists = owners(_TRUE)
    if any(c == "other" for c, _ in values):
        return Sql(exists.text, exists.params, False)
    by_type = {"num": NUMBER, "str": TEXT}
    if op is FilterType.IN:
        conds = []
        for cat, kind in by_type.items():
            for part in _in_list("value", [v for c, v in values if c == cat]):
                conds.append(Sql(f"type = {kind} AND {part.text}", part.params))
        if conds:
            conds.append(Sql(f"type = {UNINDEXED}"))
        if any(c == "null" for c, _ in values):
            conds.append(Sql("type = 0"))
        return owners(*conds) if conds else _FALSE
    cat, value = values[0]
    if cat == "nan":  # nothing equals or orders with NaN; everything is != NaN
        return exists if op is FilterType.NE else _FALSE
    if cat == "null":
        if op is FilterType.EQ:
            return owners(Sql("type = 0"))
        return owners(Sql("type <> 0")) if op is FilterType.NE else _FALSE
    kind = by_type[cat]
    if op is FilterType.NE:
        return owners(Sql(f"(type <> {kind} OR value <> ?)", (value,)))
    return owners(
        Sql(f"type = {kind} AND value {_OPS[op]} ?", (value,)), Sql(f"type = {UNINDEXED}")
    )


def _leaf(f: BaseFilter, fields: Fields) -> Sql:
    if f.key is None or not isinstance(f.key, str):
        raise TupliStorageError(f"{f.type.value} filter needs a str key, received {f.key!r}")
    op = f.type
    if op is FilterType.IN:
        if not isinstance(f.value, list | tuple | set | frozenset):
            raise TupliStorageError(
                f"IN filter expects a list value, received {type(f.value).__name__}"
            )
        values = [_category(v) for v in f.value]
        values = [(c, v) for c, v in values if c != "nan"]  # x == NaN is never true
        if not values:
            return _FALSE
    else:
        values = [_category(f.value)]
    node = _resolve(f.key, fields)
    if node is None:
        return _FALSE  # the key is missing from every header
    if isinstance(node, tuple):
        return _doc_leaf(node[0], node[1], op, values)
    if isinstance(node, Column):
        return _column_leaf(node, op, values)
    return _container_leaf(op, values)  # a whole dict (metadata, extra)


def _resolve(key: str, fields: Fields) -> Column | Doc | Fields | tuple[str, str] | None:
    """What a dotted key names: a column, ``(side table, path)`` inside a document, a whole
    document or dict of fields, or ``None`` (no header has it)."""
    parts = key.split(".")
    node: Column | Doc | Fields = fields
    for i, part in enumerate(parts):
        if isinstance(node, Column):
            return None  # a scalar has no sub-keys
        if isinstance(node, Doc):
            return node.table, ".".join(parts[i:])
        if part not in node:
            return None
        node = node[part]
    return node


# --------------------------------------------------------------------------------------------
# Bounds on one document path, merged
# --------------------------------------------------------------------------------------------

_BOUND_OPS = (FilterType.EQ, FilterType.GT, FilterType.GEQ, FilterType.LT, FilterType.LEQ)


def _bound_key(f: BaseFilter, fields: Fields) -> tuple[str, str, str] | None:
    """``(table, path, category)`` of a leaf that compares one document path with a number or
    a string (EQ or an ordering), else ``None``."""
    if f.type not in _BOUND_OPS or not isinstance(f.key, str):
        return None
    category = _category(f.value)[0]
    if category not in ("num", "str"):
        return None
    node = _resolve(f.key, fields)
    if not isinstance(node, tuple):
        return None
    return node[0], node[1], category


def _merged_bounds(table: str, path: str, category: str, leaves: list[BaseFilter]) -> Sql:
    """The conjunction of ``leaves`` (all ``_bound_key`` equal) as ONE index range scan.

    Each leaf alone selects ``owners(type = T AND value op v) UNION owners(type = UNINDEXED)``.
    A document has at most one node per path, so the AND of those sets is the owners whose
    node has type ``T`` and satisfies every bound, plus the ``UNINDEXED`` owners (rechecked in
    Python, as for one leaf): one scan of ``(path, type, value)`` from the lower to the upper
    bound instead of one subquery per bound, each matching a large share of the store.
    """
    kind = NUMBER if category == "num" else TEXT
    conds = " AND ".join(f"value {_OPS[f.type]} ?" for f in leaves)
    bounds = tuple(_category(f.value)[1] for f in leaves)
    return Sql(
        f"t.rid IN (SELECT owner FROM {table} WHERE path = ? AND type = {kind} AND {conds} "
        f"UNION ALL SELECT owner FROM {table} WHERE path = ? AND type = {UNINDEXED})",
        (path, *bounds, path),
    )


def _conjuncts(filter: BaseFilter) -> list[BaseFilter]:
    """The operands of nested ANDs, flattened (AND is associative)."""
    out: list[BaseFilter] = []
    for f in filter.filters or []:
        if isinstance(f, BaseFilter) and f.type is FilterType.AND:
            out += _conjuncts(f)
        else:
            out.append(f)
    return out


def _compile_and(filter: BaseFilter, fields: Fields) -> Sql:
    """An AND node: bounds on the same document path (and value class) merged into one range
    scan, every other operand compiled on its own."""
    operands = _conjuncts(filter)
    groups: dict[tuple[str, str, str], list[BaseFilter]] = {}
    rest: list[BaseFilter] = []
    for f in operands:
        key = _bound_key(f, fields) if isinstance(f, BaseFilter) else None
        if key is None:
            rest.append(f)
        else:
            groups.setdefault(key, []).append(f)
    parts = []
    for (table, path, category), leaves in groups.items():
        if len(leaves) == 1:
            parts.append(compile_filter(leaves[0], fields))
        else:
            parts.append(_merged_bounds(table, path, category, leaves))
    parts += [compile_filter(f, fields) for f in rest]
    return _and(parts)


def compile_filter(filter: BaseFilter | None, fields: Fields) -> Sql:
    """Compiles a filter tree to a SQL condition on the table aliased ``t``.

    Args:
        filter: The filter, or ``None`` for everything.
        fields: How header fields map to columns and side tables (``EPISODE_FIELDS``, ...).

    Returns:
        The condition. ``exact=False`` means it selects a superset: run ``matches`` on the rows.
        Rows with ``inexact = 1`` must be rechecked with ``matches`` whatever ``exact`` says.

    Raises:
        TupliStorageError: ``filter`` is not a filter tree.

    Example:
        >>> from tupli_jax.schema import FilterGT
        >>> compile_filter(FilterGT(key="n_tuples", value=5), EPISODE_FIELDS)
        Sql(text='t.n_tuples > ?', params=(5,), exact=True)
    """
    if filter is None:
        return _TRUE
    if not isinstance(filter, BaseFilter):
        raise TupliStorageError(
            f"filter must be a tupli_jax.schema filter (FilterEQ, FilterAND, ...) or None, "
            f"received {type(filter).__name__}"
        )
    if filter.type is FilterType.AND:
        sql = _compile_and(filter, fields)
    elif filter.type is FilterType.OR:
        sql = _or([compile_filter(f, fields) for f in filter.filters or []])
    else:
        sql = _leaf(filter, fields)
    if len(sql.params) > _MAX_PARAMS:
        return _SUPERSET
    return sql
