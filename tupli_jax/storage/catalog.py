"""The SQLite catalog of a ``FileStorage``: schema, metadata leaf index and filter compilation.

Host-side only. The catalog is one SQLite database in WAL mode (several processes may read and
write one store at once); the episode data itself lives in Arrow shards that the catalog points to
with ``(shard, row_start, row_stop)``, so listing and filtering never open a shard.

Filters compile to SQL with bound parameters only (keys select columns from fixed maps or are
bound as leaf paths; values are always bound). The semantics are exactly those of
``tupli_jax.schema.matches`` on ``header.model_dump()``. ``metadata.*`` keys use a side table of
metadata nodes ``(path, type, value, owner)`` whose primary key is an index on
``(path, type, value)``, so a selective leaf such as ``metadata.seed == 7`` is an index seek.
Where SQL cannot decide a leaf exactly (list or dict values, exotic Python types, integers beyond
64 bits), the SQL selects a superset and ``matches`` decides the candidates in Python.

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
import os
import re
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel
from pydantic_core import from_json

from tupli_jax.schema import (
    ArtifactMetadataItem,
    BaseFilter,
    BenchmarkHeader,
    BenchmarkMetadata,
    EpisodeHeader,
    FilterType,
    to_builtin,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = [
    "ARTIFACT_FIELDS",
    "BENCHMARK_FIELDS",
    "EPISODE_FIELDS",
    "SCHEMA_VERSION",
    "Catalog",
    "Column",
    "Doc",
    "Sql",
    "check_id",
    "compile_filter",
    "document_leaves",
    "normalize_document",
]

SCHEMA_VERSION = 1

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# SQLite allows 32766 bound parameters per statement; beyond this a filter falls back to Python.
_MAX_PARAMS = 30_000
_CHUNK = 500
# Strings that SQLite's JSON parser decodes to exactly themselves (for large IN lists).
_JSON_SAFE = re.compile(r'[^"\\\x00-\x1f\x7f-\U0010ffff]*')

# Leaf types in the metadata side tables. UNINDEXED marks a scalar SQL cannot compare exactly
# (an integer beyond 64 bits, a string that is not valid UTF-8); its owner is flagged ``inexact``
# and rechecked in Python whenever a filter is applied.
NULL, NUMBER, TEXT, LIST, DICT, UNINDEXED, NAN = range(7)


def check_id(value: object, what: str, store: object) -> str:
    """Returns ``value`` if it is a safe id, else raises ``TupliStorageError``.

    Ids are ``str`` matching ``[A-Za-z0-9_-]{1,64}``: nothing that could leave the store
    directory or change a SQL statement reaches a path or a query.

    Example:
        >>> check_id("3f2a", "episode", "tupli_store")
        '3f2a'
    """
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise TupliStorageError(
            f"invalid {what} id {value!r} for store '{store}': expected a str of 1 to 64 "
            "letters, digits, '_' or '-' (as returned by the store)"
        )
    return value


# --------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------


def _leaves_table(name: str) -> str:
    # WITHOUT ROWID: the primary key is the (path, type, value) index itself, and covering.
    return f"""
CREATE TABLE IF NOT EXISTS {name} (
    path TEXT NOT NULL, type INTEGER NOT NULL, value NOT NULL, owner INTEGER NOT NULL,
    PRIMARY KEY (path, type, value, owner)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS {name}_owner ON {name}(owner);
"""


_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS benchmarks (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL, description TEXT NOT NULL, difficulty TEXT, version TEXT,
    metadata TEXT NOT NULL, serialized TEXT NOT NULL, created_by TEXT NOT NULL,
    created_at TEXT NOT NULL, published_in TEXT NOT NULL, inexact INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS artifacts (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, hash TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL, description TEXT NOT NULL, benchmark_id TEXT, extra TEXT NOT NULL,
    encoding TEXT NOT NULL, size INTEGER NOT NULL, created_by TEXT NOT NULL,
    created_at TEXT NOT NULL, published_in TEXT NOT NULL, inexact INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS shards (
    rid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, checksum TEXT NOT NULL,
    size INTEGER NOT NULL, n_rows INTEGER NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS episodes (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, benchmark_id TEXT NOT NULL,
    shard TEXT NOT NULL, row_start INTEGER NOT NULL, row_stop INTEGER NOT NULL,
    n_tuples INTEGER NOT NULL, episode_return REAL, terminated INTEGER NOT NULL,
    timeout INTEGER NOT NULL, truncated INTEGER NOT NULL, metadata TEXT NOT NULL,
    created_by TEXT NOT NULL, created_at TEXT NOT NULL, published_in TEXT NOT NULL,
    inexact INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS episodes_benchmark ON episodes(benchmark_id);
CREATE INDEX IF NOT EXISTS episodes_shard ON episodes(shard);
"""
    + _leaves_table("episode_leaves")
    + _leaves_table("benchmark_leaves")
    + _leaves_table("artifact_leaves")
)


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


class Catalog:
    """One SQLite connection to ``catalog.sqlite``, safe to share between threads.

    Reopened transparently in a forked child (a SQLite connection must not cross ``fork``).

    Example:
        >>> import tempfile
        >>> cat = Catalog(Path(tempfile.mkdtemp()) / "catalog.sqlite", "store")
        >>> with cat.write() as conn:
        ...     _ = conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        >>> cat.query("SELECT value FROM meta WHERE key = 'k'")
        [('v',)]
    """

    def __init__(self, path: Path, store: str, busy_timeout_s: float = 120.0) -> None:
        self._path = path
        self._store = store
        self._timeout = busy_timeout_s
        self._lock = threading.RLock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        with self.write() as conn:
            for statement in _SCHEMA.split(";"):  # executescript would commit first
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) > SCHEMA_VERSION:
                raise TupliStorageError(
                    f"store '{store}' has catalog schema version {row[0]}, this tupli_jax reads "
                    f"up to {SCHEMA_VERSION}: upgrade tupli_jax to open it"
                )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # A connection inherited through fork is abandoned, never closed, as SQLite asks.
            conn = sqlite3.connect(
                self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA temp_store=MEMORY")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: holds the store-wide write lock until commit."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement inside sees the same snapshot."""
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Runs one statement and returns all its rows."""
        with self._lock:
            return self._connection().execute(sql, params).fetchall()

    def close(self) -> None:
        """Closes the connection (it is reopened on the next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


# --------------------------------------------------------------------------------------------
# Documents and their leaf index
# --------------------------------------------------------------------------------------------


def normalize_document(doc: object, what: str) -> tuple[str, dict[str, Any]]:
    """JSON text of ``doc`` and the dict read back from it (what headers will return).

    numpy values become Python values (``to_builtin``); int, float, bool, str, None, lists and
    dicts keep their types.

    Raises:
        TupliStorageError: ``doc`` is not a dict or not JSON-serialisable.

    Example:
        >>> import numpy as np
        >>> normalize_document({"seed": np.int64(3)}, "metadata")
        ('{"seed": 3}', {'seed': 3})
    """
    if not isinstance(doc, Mapping):
        raise TupliStorageError(f"{what} must be a dict, received {type(doc).__name__}")
    try:
        text = json.dumps(to_builtin(doc))
    except (TypeError, ValueError, RecursionError) as err:
        raise TupliStorageError(
            f"{what} must be JSON-serialisable (dicts, lists, str, int, float, bool, None, numpy "
            f"values): {err}"
        ) from err
    return text, json.loads(text)


def _scalar_leaf(value: Any) -> tuple[int, Any]:
    if value is None:
        return NULL, 0
    if isinstance(value, bool):
        return NUMBER, int(value)
    if isinstance(value, int):
        return (NUMBER, value) if _I64_MIN <= value <= _I64_MAX else (UNINDEXED, 0)
    if isinstance(value, float):
        return (NAN, 0) if math.isnan(value) else (NUMBER, value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return UNINDEXED, 0
        return TEXT, value
    if isinstance(value, list):
        return LIST, 0
    return UNINDEXED, 0


def document_leaves(doc: Mapping[str, Any]) -> tuple[list[tuple[str, int, Any]], bool]:
    """Every node of a JSON document reachable by a dotted filter key, as ``(path, type, value)``.

    A key containing ``'.'`` can never be reached (filter keys split on dots), so it and its
    subtree are left out. Returns the leaves and whether any of them is ``UNINDEXED``.

    Example:
        >>> document_leaves({"a": {"b": 1}, "c.d": 2})
        ([('a', 4, 0), ('a.b', 1, 1)], False)
    """
    leaves: list[tuple[str, int, Any]] = []
    inexact = False

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        nonlocal inexact
        for key, value in node.items():
            if "." in key:
                continue
            path = prefix + key
            if isinstance(value, Mapping):
                leaves.append((path, DICT, 0))
                walk(value, path + ".")
            else:
                kind, stored = _scalar_leaf(value)
                inexact |= kind == UNINDEXED
                leaves.append((path, kind, stored))

    walk(doc, "")
    return leaves, inexact


# --------------------------------------------------------------------------------------------
# Filter compilation
# --------------------------------------------------------------------------------------------


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
        return ("num", value) if _I64_MIN <= value <= _I64_MAX else ("other", value)
    if isinstance(value, float):  # np.float64 subclasses float and compares like it
        number = float(value)
        return ("nan", number) if math.isnan(number) else ("num", number)
    if kind is str and _scalar_leaf(value)[0] == TEXT:
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
    parts = f.key.split(".")
    node: Column | Doc | Fields = fields
    for i, part in enumerate(parts):
        if isinstance(node, Column):
            return _FALSE  # a scalar has no sub-keys: the key is missing
        if isinstance(node, Doc):
            return _doc_leaf(node.table, ".".join(parts[i:]), op, values)
        if part not in node:
            return _FALSE
        node = node[part]
    if isinstance(node, Column):
        return _column_leaf(node, op, values)
    return _container_leaf(op, values)  # a whole dict (metadata, extra)


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
    if filter.type in (FilterType.AND, FilterType.OR):
        subs = [compile_filter(f, fields) for f in filter.filters or []]
        sql = _and(subs) if filter.type is FilterType.AND else _or(subs)
    else:
        sql = _leaf(filter, fields)
    if len(sql.params) > _MAX_PARAMS:
        return _SUPERSET
    return sql


# --------------------------------------------------------------------------------------------
# Rows -> headers (trusted catalog rows: no validation, about 1 us per header)
# --------------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)
_set_attr = object.__setattr__


def fast_model(cls: type[_M], values: dict[str, Any]) -> _M:
    """Builds a pydantic model from trusted, complete field values without validation.

    What ``model_construct`` does, without its per-field default handling (8x faster).
    """
    model = cls.__new__(cls)
    _set_attr(model, "__dict__", values)
    _set_attr(model, "__pydantic_fields_set__", set(values))
    _set_attr(model, "__pydantic_extra__", None)
    _set_attr(model, "__pydantic_private__", None)
    return model


EPISODE_COLUMNS = (
    "t.id, t.created_by, t.published_in, t.created_at, t.benchmark_id, t.metadata, "
    "t.n_tuples, t.terminated, t.timeout, t.truncated, t.episode_return"
)
BENCHMARK_COLUMNS = "t.id, t.created_by, t.published_in, t.created_at, t.hash, t.metadata"
ARTIFACT_COLUMNS = (
    "t.id, t.created_by, t.published_in, t.created_at, t.name, t.description, t.benchmark_id, "
    "t.extra, t.hash, t.encoding"
)


def _loads(text: str) -> Any:
    """``json.loads`` for the catalog's own JSON, 3x faster (pydantic-core's parser)."""
    try:
        return from_json(text)
    except ValueError:  # what only Python's parser accepts (lone surrogates in strings)
        return json.loads(text)


_EPISODE_FIELDS_SET = set(EpisodeHeader.model_fields)
_BOOL = (False, True)


def episode_headers(rows: Sequence[Sequence[Any]]) -> list[EpisodeHeader]:
    """Headers from rows selected with ``EPISODE_COLUMNS`` (``fast_model`` inlined: hot path)."""
    loads, new, nan, cls = _loads, object.__new__, math.nan, EpisodeHeader
    # One fields-set object for all: every field is set, so pydantic never adds to it.
    fields_set = _EPISODE_FIELDS_SET
    groups: dict[str, list[str]] = {}
    out = []
    for r in rows:
        pub = groups.get(r[2])
        if pub is None:
            pub = groups[r[2]] = loads(r[2])
        values = {
            "id": r[0],
            "created_by": r[1],
            "published_in": pub[:],
            "created_at": r[3],
            "benchmark_id": r[4],
            "metadata": loads(r[5]),
            "n_tuples": r[6],
            "terminated": _BOOL[r[7]],
            "timeout": _BOOL[r[8]],
            "truncated": _BOOL[r[9]],
            "episode_return": nan if r[10] is None else r[10],
        }
        model = new(cls)
        _set_attr(model, "__dict__", values)
        _set_attr(model, "__pydantic_fields_set__", fields_set)
        _set_attr(model, "__pydantic_extra__", None)
        _set_attr(model, "__pydantic_private__", None)
        out.append(model)
    return out


def benchmark_headers(
    rows: Sequence[Sequence[Any]], cls: type[BenchmarkHeader] = BenchmarkHeader
) -> list[Any]:
    """Headers from rows selected with ``BENCHMARK_COLUMNS`` (with ``cls=Benchmark``, followed by
    a ``serialized`` column)."""
    out = []
    for r in rows:
        values = {
            "id": r[0],
            "created_by": r[1],
            "published_in": json.loads(r[2]),
            "created_at": r[3],
            "hash": r[4],
            "metadata": fast_model(BenchmarkMetadata, json.loads(r[5])),
        }
        if cls is not BenchmarkHeader:
            values["serialized"] = r[6]
        out.append(fast_model(cls, values))
    return out


def artifact_headers(rows: Sequence[Sequence[Any]]) -> list[ArtifactMetadataItem]:
    """Artifact headers from rows selected with ``ARTIFACT_COLUMNS``."""
    return [_artifact_header(r) for r in rows]


def _artifact_header(r: Sequence[Any]) -> ArtifactMetadataItem:
    values = {
        "id": r[0],
        "created_by": r[1],
        "published_in": json.loads(r[2]),
        "created_at": r[3],
        "name": r[4],
        "description": r[5],
        "benchmark_id": r[6],
        "extra": json.loads(r[7]),
        "hash": r[8],
        "encoding": r[9],
    }
    return fast_model(ArtifactMetadataItem, values)
