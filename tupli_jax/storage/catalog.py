"""The SQLite catalog of a ``FileStorage``: schema, connection, ids and header rows.

Host-side only. The catalog is one SQLite database in WAL mode (several processes may read and
write one store at once); the episode data itself lives in Arrow shards that the catalog points to
with ``(shard_rid, row_start, row_stop)``, so listing and filtering never open a shard. Metadata
documents and their leaf index live in ``_documents``, filter compilation in ``_sql_filter``
(both re-exported here), the columnar read path's episode blocks in ``_blocks``, batches of
episode rows committed as one row in ``_runs`` (expanded before any transaction that reads
episode rows). Schema version 3; a version-1 store (shard names in ``episodes``) is migrated when
opened, a version-2 store gets the ``episode_runs`` table.

Example:
    >>> from tupli_jax.schema import FilterEQ
    >>> sql = compile_filter(FilterEQ(key="metadata.seed", value=7), EPISODE_FIELDS)
    >>> sql.exact, "episode_leaves" in sql.text
    (True, True)
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel
from pydantic_core import from_json

from tupli_jax.schema import (
    ArtifactMetadataItem,
    BenchmarkHeader,
    BenchmarkMetadata,
    EpisodeHeader,
)
from tupli_jax.storage import _blocks, _runs
from tupli_jax.storage._documents import (
    DICT,
    LIST,
    NAN,
    NULL,
    NUMBER,
    TEXT,
    UNINDEXED,
    Documents,
    document_leaves,
    normalize_document,
    normalize_documents,
)
from tupli_jax.storage._sql_filter import (
    ARTIFACT_FIELDS,
    BENCHMARK_FIELDS,
    EPISODE_FIELDS,
    Column,
    Doc,
    Fields,
    Sql,
    compile_filter,
)
from tupli_jax.storage.base import TupliStorageError

__all__ = [
    "ARTIFACT_FIELDS",
    "BENCHMARK_FIELDS",
    "DICT",
    "EPISODE_FIELDS",
    "EPISODE_FIELDS_SET",
    "LIST",
    "NAN",
    "NULL",
    "NUMBER",
    "SCHEMA_VERSION",
    "TEXT",
    "UNINDEXED",
    "Catalog",
    "Column",
    "Doc",
    "Documents",
    "Fields",
    "Sql",
    "check_batch_id",
    "check_id",
    "compile_filter",
    "document_leaves",
    "is_id",
    "new_ids",
    "normalize_document",
    "normalize_documents",
]

SCHEMA_VERSION = 3  # 2: integer shard rids in ``episodes`` (version 1 is migrated on open);
# 3: ``episode_runs`` (a version-2 store gets the table when opened; older code must not open a
# store whose runs it would not see)

_WAL_SIZE_LIMIT = 4 << 20  # bytes the WAL file keeps after a checkpoint (SQLite's auto-checkpoint
# runs at ~4 MiB of WAL)
_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BATCH_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")


def is_id(name: str) -> bool:
    """Whether ``name`` has the form of a store id (e.g. an artifact file name).

    Example:
        >>> is_id("3f2a"), is_id("../x")
        (True, False)
    """
    return _ID_RE.fullmatch(name) is not None


def new_ids(n: int) -> list[str]:
    """``n`` fresh ids: 32 hex digits laid out as UUIDv7 (RFC 9562), from one ``os.urandom``.

    48 bits of Unix time in milliseconds, the version and variant bits, 74 random bits; the ids
    of one call are sorted. Ids made later sort later (to the millisecond), so the catalog's
    unique index on ids grows at its end instead of at random places (a third of the cost of
    an episode row). About 0.2 us per id.

    One call's ids share their time prefix, so they are sorted on the 8 bytes after it (58
    random bits): two ids tie there with odds ~n**2 / 2**59 (for 10k ids, one in 10**10),
    and a tie only leaves that pair unsorted (a full 16-byte ``lexsort`` took 5x longer).

    Example:
        >>> a, b = new_ids(2)
        >>> len(a), a[12], a <= b, is_id(a)
        (32, '7', True, True)
    """
    if n <= 0:
        return []
    raw = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
    raw[:, :6] = np.frombuffer((time.time_ns() // 1_000_000).to_bytes(6, "big"), np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x70
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    after_time = raw[:, 6:14].copy().view(">u8").reshape(-1)  # byte order is hex order
    text = raw[np.argsort(after_time)].tobytes().hex()
    return [text[i : i + 32] for i in range(0, 32 * n, 32)]


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


def check_batch_id(value: object, store: object) -> str:
    """Returns ``value`` if it is a valid batch id, else raises ``TupliStorageError``.

    Batch ids are chosen by the caller (e.g. ``"job-3f2a:chunk:17"``): a ``str`` of 1 to 128
    letters, digits, ``'_'``, ``'.'``, ``':'`` or ``'-'``.

    Example:
        >>> check_batch_id("run-1:chunk:0", "tupli_store")
        'run-1:chunk:0'
    """
    if not isinstance(value, str) or _BATCH_ID_RE.fullmatch(value) is None:
        raise TupliStorageError(
            f"invalid batch id {value!r} for store '{store}': expected a str of 1 to 128 "
            "letters, digits, '_', '.', ':' or '-' (e.g. 'job-1:chunk:17')"
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


_EPISODES_TABLE = """
CREATE TABLE IF NOT EXISTS {name} (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, benchmark_id TEXT NOT NULL,
    shard_rid INTEGER NOT NULL, row_start INTEGER NOT NULL, row_stop INTEGER NOT NULL,
    n_tuples INTEGER NOT NULL, episode_return REAL, terminated INTEGER NOT NULL,
    timeout INTEGER NOT NULL, truncated INTEGER NOT NULL, metadata TEXT NOT NULL,
    created_by TEXT NOT NULL, created_at TEXT NOT NULL, published_in TEXT NOT NULL,
    inexact INTEGER NOT NULL, flags INTEGER NOT NULL,
    CHECK (flags = terminated + 2 * truncated + 4 * inexact
        + 8 * (row_stop - row_start - n_tuples)))
"""
# ``episodes_benchmark`` covers the columnar read path (``_locations``): reading every episode,
# or those of some benchmarks, scans this index alone, grouped by benchmark and in ``rid``
# order within each. ``flags`` packs what that path needs besides (terminated, truncated,
# inexact, and ``flags >> 3``: 1 if the rows start with a reset observation); the CHECK keeps it
# equal to its sources. (A generated column would do the same, but SQLite < 3.42 does not
# read generated columns from a covering index.)
_EPISODE_INDEXES = """
CREATE INDEX IF NOT EXISTS episodes_benchmark ON episodes(benchmark_id, rid, shard_rid,
    row_start, n_tuples, flags, id);
CREATE INDEX IF NOT EXISTS episodes_shard ON episodes(shard_rid);
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
CREATE TABLE IF NOT EXISTS batches (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, episodes TEXT NOT NULL,
    created_at TEXT NOT NULL);
"""
    + _EPISODES_TABLE.format(name="episodes")
    + ";"
    + _leaves_table("episode_leaves")
    + _leaves_table("benchmark_leaves")
    + _leaves_table("artifact_leaves")
    + _blocks.SCHEMA
    + _runs.SCHEMA
)

# Version 1 kept the shard's name in ``episodes.shard`` (TEXT); version 2 keeps its ``rid`` in
# ``episodes.shard_rid`` and a covering benchmark index. Opening a version-1 store migrates it.
_EPISODE_COLUMNS_V2 = (
    "rid, id, benchmark_id, shard_rid, row_start, row_stop, n_tuples, episode_return, "
    "terminated, timeout, truncated, metadata, created_by, created_at, published_in, inexact, "
    "flags"
)


def _migrate_v1(conn: sqlite3.Connection) -> None:
    """Rebuilds a version-1 ``episodes`` table in the version-2 shape (same rids and ids).

    An episode whose shard is missing from ``shards`` (a damaged store) gets ``shard_rid`` 0,
    which ``verify`` reports.
    """
    conn.execute(_EPISODES_TABLE.format(name="episodes_v2"))
    conn.execute(
        f"INSERT INTO episodes_v2 ({_EPISODE_COLUMNS_V2}) SELECT e.rid, e.id, e.benchmark_id, "
        "COALESCE(s.rid, 0), e.row_start, e.row_stop, e.n_tuples, e.episode_return, "
        "e.terminated, e.timeout, e.truncated, e.metadata, e.created_by, e.created_at, "
        "e.published_in, e.inexact, e.terminated + 2 * e.truncated + 4 * e.inexact "
        "+ 8 * (e.row_stop - e.row_start - e.n_tuples) "
        "FROM episodes e LEFT JOIN shards s ON s.name = e.shard"
    )
    conn.execute("DROP TABLE episodes")  # and its indexes
    conn.execute("ALTER TABLE episodes_v2 RENAME TO episodes")


def _statements(script: str) -> list[str]:
    """The statements of ``script`` (a trigger's body holds ``;`` of its own)."""
    out, current = [], ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \n;"):
                out.append(current)
            current = ""
    return out


# --------------------------------------------------------------------------------------------
# Connection
# --------------------------------------------------------------------------------------------


class Catalog:
    """One SQLite connection to ``catalog.sqlite``, safe to share between threads.

    Reopened transparently in a forked child (a SQLite connection must not cross ``fork``).

    Args:
        path: The database file.
        store: The store's name for messages.
        busy_timeout_s: How long a statement waits for another process's write lock.
        synchronous: SQLite's ``synchronous`` setting: ``"full"`` (default) fsyncs the WAL at
            every commit, so a commit survives a power loss; ``"normal"`` fsyncs it only at
            checkpoints: a commit still survives a process kill, a power loss may roll back
            the last commits (the database stays consistent).

    Example:
        >>> import tempfile
        >>> cat = Catalog(Path(tempfile.mkdtemp()) / "catalog.sqlite", "store")
        >>> with cat.write() as conn:
        ...     _ = conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        >>> cat.query("SELECT value FROM meta WHERE key = 'k'")
        [('v',)]
    """

    def __init__(
        self,
        path: Path,
        store: str,
        busy_timeout_s: float = 120.0,
        synchronous: str = "full",
    ) -> None:
        if synchronous not in ("full", "normal"):
            raise TupliStorageError(
                f"synchronous must be 'full' or 'normal', received {synchronous!r}"
            )
        self._path = path
        self._store = store
        self._timeout = busy_timeout_s
        self._synchronous = synchronous.upper()
        self._lock = threading.RLock()
        self._pid = -1
        self._conn: sqlite3.Connection | None = None
        self._generation = 0  # connections opened so far (data_version restarts with each)
        self._commits = 0  # commits through this object that changed rows
        with self.write(runs_ok=True) as conn:
            for statement in _statements(_SCHEMA):  # executescript would commit first
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row[0]) > SCHEMA_VERSION:
                raise TupliStorageError(
                    f"store '{store}' has catalog schema version {row[0]}, this tupli_jax reads "
                    f"up to {SCHEMA_VERSION}: upgrade tupli_jax to open it"
                )
            columns = {r[1] for r in conn.execute("PRAGMA table_info(episodes)")}
            if "shard_rid" not in columns:
                _migrate_v1(conn)
            for statement in _statements(_EPISODE_INDEXES + _runs.TRIGGER):
                conn.execute(statement)
            key = (_blocks.META_KEY,)
            if conn.execute("SELECT 1 FROM meta WHERE key = ?", key).fetchone() is None:
                try:
                    _runs.expand(conn)
                except ValueError as err:
                    raise TupliStorageError(f"cannot open store '{store}': {err}") from err
                _blocks.rebuild(conn)  # a new, migrated or repaired store
                conn.execute("INSERT INTO meta VALUES (?, '1')", key)
            if row is None or int(row[0]) < SCHEMA_VERSION:
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            # A connection inherited through fork is abandoned, never closed, as SQLite asks.
            conn = sqlite3.connect(
                self._path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute("PRAGMA cache_size=-65536")  # up to 64 MiB, as pages are read
            # A big transaction (expanding episode runs) grows the WAL file; once checkpointed,
            # SQLite cuts it back to this size instead of keeping it at its largest.
            conn.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._conn, self._pid = conn, os.getpid()
            self._generation += 1
        return self._conn

    @contextmanager
    def write(self, *, runs_ok: bool = False) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: holds the store-wide write lock until commit.

        Episode runs (``_runs``) are expanded into ``episodes`` rows first, in the same
        transaction, unless ``runs_ok`` (the caller touches no episode rows, or handles runs).
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
            changes = conn.total_changes
            try:
                if not runs_ok and _runs.pending(conn):
                    _runs.expand(conn)
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            finally:
                if conn.total_changes != changes:
                    self._commits += 1  # also after a failed commit: a spurious change is safe

    @contextmanager
    def read(self, *, runs_ok: bool = False) -> Iterator[sqlite3.Connection]:
        """A read transaction: every statement inside sees the same snapshot.

        Unless ``runs_ok``, the snapshot has no episode runs: if some are pending, the read runs
        in a write transaction that expands them first (holding the write lock, so no writer
        adds runs before the read ends). Does not nest in another ``read`` / ``write``.
        """
        with self._lock:
            conn = self._connection()
            conn.execute("BEGIN")
            if not runs_ok and _runs.pending(conn):
                conn.execute("COMMIT")
                with self.write() as conn:
                    yield conn
                return
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] = (), *, runs_ok: bool = False) -> list[Any]:
        """Runs one statement and returns all its rows. Unless ``runs_ok``, in a ``read``
        transaction that sees no episode runs (so not inside another ``read`` / ``write``: use
        its connection there)."""
        if runs_ok:
            with self._lock:
                return self._connection().execute(sql, params).fetchall()
        with self.read() as conn:
            return conn.execute(sql, params).fetchall()

    def version(self) -> int:
        """A number that changes whenever a commit changed the catalog, from any connection.

        Combines SQLite's ``PRAGMA data_version`` (changes when *another* connection, in any
        process, commits), the count of this object's own commits that changed rows, and the
        count of connections it opened (``data_version`` restarts with a new connection).
        About 5 us.

        Example:
            >>> import tempfile
            >>> cat = Catalog(Path(tempfile.mkdtemp()) / "catalog.sqlite", "store")
            >>> before = cat.version()
            >>> with cat.write() as conn:
            ...     _ = conn.execute("INSERT INTO meta VALUES ('k', 'v')")
            >>> cat.version() != before
            True
        """
        with self._lock:
            data = int(self._connection().execute("PRAGMA data_version").fetchone()[0])
            return (self._generation << 96) | (self._commits << 32) | (data & 0xFFFFFFFF)

    def close(self) -> None:
        """Closes the connection (it is reopened on the next use)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


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


EPISODE_FIELDS_SET = set(EpisodeHeader.model_fields)
_BOOL = (False, True)


def episode_headers(rows: Sequence[Sequence[Any]]) -> list[EpisodeHeader]:
    """Headers from rows selected with ``EPISODE_COLUMNS`` (``fast_model`` inlined: hot path)."""
    loads, new, nan, cls = _loads, object.__new__, math.nan, EpisodeHeader
    # One fields-set object for all: every field is set, so pydantic never adds to it.
    fields_set = EPISODE_FIELDS_SET
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
