"""``FileStorage``: the embedded store (SQLite catalog + Arrow IPC shards), pytupli's API.

Layout of a store directory::

    root/catalog.sqlite        SQLite (WAL): benchmarks, artifacts, shards, episodes, leaf indexes
    root/shards/<uuid>.arrow   one Arrow IPC file per written batch (readable with pyarrow alone)
    root/artifacts/<id>        artifact bytes
    root/staging/<pid>-<uuid>/ files being written (moved into place under the write lock)

Atomic protocol (``record_episodes``, ``store_artifact``): files are written and fsynced in a
private staging directory without any lock; then ``BEGIN IMMEDIATE`` takes the store-wide write
lock, the files are renamed into place, the directory is fsynced, the rows are inserted and the
transaction commits. Because a live writer holds the lock from the rename to the commit, a
final-named file that the catalog does not know can only come from a writer that died: opening a
store removes such orphans (under the same lock) and the staging directories of dead processes, so
a store whose writer was killed at any moment verifies clean after reopening.

Example:
    >>> import tempfile
    >>> from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
    >>> store = FileStorage(tempfile.mkdtemp())
    >>> query = BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
    >>> store.store_benchmark(query).id == store.store_benchmark(query).id
    True
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import gc
import hashlib
import json
import os
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa
import pydantic

from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    ArtifactMetadataItem,
    BaseFilter,
    Benchmark,
    BenchmarkHeader,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
    RLTuple,
    matches,
)
from tupli_jax.storage import catalog as cat
from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.shards import group_by_structure, open_shard, verify_shard, write_shard

__all__ = ["EpisodeLocations", "FileStorage"]

_SHARD_FILE = re.compile(r"[A-Za-z0-9_-]{1,64}\.arrow")
_STAGING_DIR = re.compile(r"(\d{1,7})-[0-9a-f]{32}")  # Linux pids are < 2**22
_STALE_AGE_S = 3600.0  # a staging dir of a live pid older than this is a pid-reuse leftover
_MAX_LISTED = 20  # problems of one kind listed one by one by verify()
_live_staging: set[str] = set()  # staging dirs this process is using
_live_lock = threading.Lock()

_P = ParamSpec("_P")
_R = TypeVar("_R")
_RAW_ERRORS = (
    sqlite3.Error,
    OSError,
    pa.ArrowException,
    pydantic.ValidationError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    RecursionError,
)


def _guarded(
    action: str,
) -> Callable[
    [Callable[Concatenate[FileStorage, _P], _R]], Callable[Concatenate[FileStorage, _P], _R]
]:
    """Turns raw sqlite/OS/pyarrow/validation errors into ``TupliStorageError`` with context."""

    def decorate(
        fn: Callable[Concatenate[FileStorage, _P], _R],
    ) -> Callable[Concatenate[FileStorage, _P], _R]:
        @functools.wraps(fn)
        def wrapper(self: FileStorage, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(self, *args, **kwargs)
            except TupliStorageError:
                raise
            except _RAW_ERRORS as err:
                raise TupliStorageError(
                    f"could not {action} in store '{self.root}': {type(err).__name__}: {err}"
                ) from err

        return wrapper

    return decorate


def _now() -> str:
    return datetime.datetime.now().isoformat()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: Path) -> None:
    with suppress(FileNotFoundError):
        path.unlink()


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pauses the cyclic GC while building many objects (halves the time of 100k headers)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except OSError:  # EPERM: alive, owned by someone else
        return True
    return True


def _older_than(entry: os.DirEntry[str], seconds: float) -> bool:
    return time.time() - entry.stat(follow_symlinks=False).st_mtime > seconds


def _staging_is_stale(entry: os.DirEntry[str]) -> bool:
    match = _STAGING_DIR.fullmatch(entry.name)
    if match is None:
        return False  # not ours: leave it alone
    pid = int(match[1])
    if pid == os.getpid():
        with _live_lock:
            return entry.name not in _live_staging
    if not _pid_alive(pid):
        return True
    return _older_than(entry, _STALE_AGE_S)


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


def _from_tuples(index: int, episode: Episode) -> EpisodeData:
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


def _builtin_rows(tree: Any, start: int, n: int) -> list[Any]:
    """Rows ``start .. start + n`` of a pytree of arrays as plain Python values (``to_builtin``)."""
    if isinstance(tree, Mapping):
        keys = [str(k) for k in tree]
        columns = [_builtin_rows(v, start, n) for v in tree.values()]
        return [dict(zip(keys, row, strict=True)) for row in zip(*columns, strict=True)] or [
            {} for _ in range(n)
        ]
    if isinstance(tree, list | tuple):
        columns = [_builtin_rows(v, start, n) for v in tree]
        return [list(row) for row in zip(*columns, strict=True)] or [[] for _ in range(n)]
    if tree is None:
        return [None] * n
    rows: list[Any] = np.asarray(tree)[start : start + n].tolist()
    return rows


def _tuples(episode: EpisodeData, n_tuples: int) -> list[RLTuple]:
    """pytupli's tuple view: tuple ``t`` holds the observation returned by step ``t``."""
    offset = 1 if episode.has_reset_observation else 0
    states = _builtin_rows(episode.observations, offset, n_tuples)
    actions = _builtin_rows(episode.actions, 0, n_tuples)
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
        out.append(cat.fast_model(RLTuple, values))
    return out


@dataclasses.dataclass(frozen=True)
class EpisodeLocations:
    """Where the episodes passing a filter live, one entry per episode in catalog order.

    Returned by ``FileStorage._episode_locations`` for columnar loading (``TupliDataset``): group
    by ``shard_index``, open each shard once with ``open_shard(shard_paths[i],
    shard_checksums[i])`` and slice rows ``[row_start, row_stop)``.

    Attributes:
        ids: Episode ids ``[N]``.
        benchmark_ids: Benchmark id per episode ``[N]``.
        shard_paths: Paths of the distinct shards ``[S]``.
        shard_checksums: Their checksums ``[S]``.
        shard_index: int64 ``[N]``, index into ``shard_paths`` per episode.
        row_start: int64 ``[N]``, first row (the first observation) in the shard.
        row_stop: int64 ``[N]``, one past the last row.
        n_tuples: int64 ``[N]``, transitions ``T`` per episode.
        terminated: bool ``[N]``.
        truncated: bool ``[N]``.
    """

    ids: list[str]
    benchmark_ids: list[str]
    shard_paths: list[Path]
    shard_checksums: list[str]
    shard_index: np.ndarray
    row_start: np.ndarray
    row_stop: np.ndarray
    n_tuples: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray

    @property
    def has_reset(self) -> np.ndarray:
        """bool ``[N]``: the episode's rows start with its reset observation (``T + 1`` rows)."""
        return np.asarray(self.row_stop - self.row_start == self.n_tuples + 1)

    def __len__(self) -> int:
        return len(self.ids)


_PUBLISHABLE = {"benchmark": "benchmarks", "artifact": "artifacts", "episode": "episodes"}


class FileStorage(TupliStorage):
    """The embedded store: a directory with a SQLite catalog and Arrow IPC shards.

    Implements pytupli's ``FileStorage`` API (benchmarks, artifacts, episodes, filters) with
    correct filters, batched and atomic episode writes, columnar episodes and integrity checks.
    Several processes may use one store at once. Every failure raises ``TupliStorageError``.

    Args:
        root: The store directory, created if missing.
        compression: Shard compression: ``"lz4"`` (default), ``"zstd"`` or ``None``.
        created_by: Recorded as ``created_by`` (and the initial ``published_in``) of new items.
        storage_base_dir: pytupli's name for ``root``; overrides it when given.

    Example:
        >>> import tempfile
        >>> store = FileStorage(tempfile.mkdtemp())
        >>> store.list_episodes()
        []
    """

    def __init__(
        self,
        root: str | Path = "tupli_store",
        *,
        compression: str | None = "lz4",
        created_by: str = "local_storage",
        storage_base_dir: str | Path | None = None,
    ) -> None:
        if storage_base_dir is not None:
            root = storage_base_dir
        if compression not in ("lz4", "zstd", None):
            raise TupliStorageError(
                f"compression {compression!r} is not supported; use 'lz4', 'zstd' or None"
            )
        if not isinstance(created_by, str) or not created_by:
            raise TupliStorageError(f"created_by must be a non-empty str, received {created_by!r}")
        self._root = Path(root).absolute()
        self._compression = compression
        self._created_by = created_by
        self._shards = self._root / "shards"
        self._artifacts = self._root / "artifacts"
        self._staging = self._root / "staging"
        try:
            for directory in (self._root, self._shards, self._artifacts, self._staging):
                directory.mkdir(parents=True, exist_ok=True)
            self._catalog = cat.Catalog(self._root / "catalog.sqlite", str(self._root))
            self._recover()
        except TupliStorageError:
            raise
        except (sqlite3.Error, OSError) as err:
            raise TupliStorageError(
                f"cannot open store '{self._root}': {type(err).__name__}: {err}; expected a "
                "writable directory holding a tupli_jax store (or nothing)"
            ) from err

    @property
    def root(self) -> Path:
        """The store directory (absolute)."""
        return self._root

    def __repr__(self) -> str:
        return f"FileStorage('{self._root}')"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (str(self._root), self._compression, self._created_by))

    def close(self) -> None:
        """Closes the catalog connection (reopened on the next call)."""
        self._catalog.close()

    def __enter__(self) -> FileStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _not_found(self, what: str, uri: str) -> TupliStorageError:
        return TupliStorageError(
            f"{what} '{uri}' not found in store '{self._root}'; list_{what}s() shows what exists"
        )

    def _shard_path(self, name: str) -> Path:
        if _SHARD_FILE.fullmatch(name) is None:  # a damaged catalog must not leave the store
            raise TupliStorageError(f"catalog of store '{self._root}' names a bad shard {name!r}")
        return self._shards / name

    def _recover(self) -> None:
        """Removes what dead writers left: orphan shards/artifacts and stale staging dirs."""
        for entry in os.scandir(self._staging):
            if entry.is_dir(follow_symlinks=False) and _staging_is_stale(entry):
                self._remove_staging(Path(entry.path))
        with self._catalog.write() as conn:
            known = {r[0] for r in conn.execute("SELECT name FROM shards")}
            for entry in os.scandir(self._shards):
                if _SHARD_FILE.fullmatch(entry.name) and entry.name not in known:
                    _unlink(Path(entry.path))
                elif entry.name.endswith(".tmp") and _older_than(entry, _STALE_AGE_S):
                    _unlink(Path(entry.path))  # a temporary file outside staging (older writers)
            known = {r[0] for r in conn.execute("SELECT id FROM artifacts")}
            for entry in os.scandir(self._artifacts):
                if cat._ID_RE.fullmatch(entry.name) and entry.name not in known:
                    _unlink(Path(entry.path))

    @contextmanager
    def _staging_dir(self) -> Iterator[Path]:
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        with _live_lock:
            _live_staging.add(name)
        path = self._staging / name
        try:
            path.mkdir()
            yield path
        finally:
            self._remove_staging(path)
            with _live_lock:
                _live_staging.discard(name)

    @staticmethod
    def _remove_staging(path: Path) -> None:
        try:
            for entry in os.scandir(path):
                _unlink(Path(entry.path))
            path.rmdir()
        except FileNotFoundError:
            pass

    def _require_benchmarks(self, conn: sqlite3.Connection, ids: set[str]) -> None:
        for bid in ids:
            if conn.execute("SELECT 1 FROM benchmarks WHERE id = ?", (bid,)).fetchone() is None:
                raise TupliStorageError(
                    f"benchmark '{bid}' not found in store '{self._root}'; store the benchmark "
                    "(store_benchmark / wrapper.store()) before recording its episodes"
                )

    def _set_published(self, what: str, uri: str, group: str, add: bool) -> None:
        cat.check_id(uri, what, self._root)
        if not isinstance(group, str) or not group:
            raise TupliStorageError(f"group must be a non-empty str, received {group!r}")
        table = _PUBLISHABLE[what]
        with self._catalog.write() as conn:
            row = conn.execute(f"SELECT published_in FROM {table} WHERE id = ?", (uri,)).fetchone()
            if row is None:
                raise self._not_found(what, uri)
            groups = [g for g in json.loads(row[0]) if g != group]
            if add:
                groups.append(group)
            conn.execute(
                f"UPDATE {table} SET published_in = ? WHERE id = ?", (json.dumps(groups), uri)
            )

    def _list(
        self,
        source: str,
        columns: str,
        fields: cat.Fields,
        build: Callable[[list[Any]], list[Any]],
        filter: BaseFilter | None,
    ) -> tuple[list[Any], list[Any]]:
        """Items (and their rows) of ``source`` (aliased ``t``) passing ``filter``, in order.

        SQL decides exactly where it can; ``matches`` rechecks superset results and rows whose
        metadata holds values SQL cannot compare (``inexact``).
        """
        sql = cat.compile_filter(filter, fields)
        with _no_gc():
            rows = self._catalog.query(
                f"SELECT {columns}, t.inexact FROM {source} WHERE {sql.text} ORDER BY t.rid",
                sql.params,
            )
            items = build(rows)
        if filter is None or (sql.exact and not any(r[-1] for r in rows)):
            return items, rows
        keep = [
            i
            for i, (item, row) in enumerate(zip(items, rows, strict=True))
            if (sql.exact and not row[-1]) or matches(filter, item.model_dump())
        ]
        return [items[i] for i in keep], [rows[i] for i in keep]

    # -- benchmarks ---------------------------------------------------------------------------

    @_guarded("store the benchmark")
    def store_benchmark(self, benchmark_query: BenchmarkQuery) -> BenchmarkHeader:
        """Stores a benchmark; one with the same hash is returned instead (also across processes).

        Example:
            >>> # header = store.store_benchmark(BenchmarkQuery(hash=h, serialized=s, metadata=m))
        """
        query = BenchmarkQuery.model_validate(
            benchmark_query.model_dump()
            if isinstance(benchmark_query, pydantic.BaseModel)
            else benchmark_query
        )
        extra_text, extra = cat.normalize_document(query.metadata.extra, "benchmark metadata.extra")
        meta = query.metadata
        metadata = {
            "name": meta.name,
            "description": meta.description,
            "difficulty": meta.difficulty,
            "version": meta.version,
            "extra": extra,
        }
        leaves, inexact = cat.document_leaves(extra)
        columns = "id, created_by, published_in, created_at, hash, metadata"
        with self._catalog.write() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO benchmarks (id, hash, name, description, difficulty, "
                "version, metadata, serialized, created_by, created_at, published_in, inexact) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    uuid.uuid4().hex,
                    query.hash,
                    meta.name,
                    meta.description,
                    meta.difficulty,
                    meta.version,
                    json.dumps(metadata),
                    query.serialized,
                    self._created_by,
                    _now(),
                    json.dumps([self._created_by]),
                    int(inexact),
                ),
            )
            if cursor.rowcount == 1:
                rid = cursor.lastrowid
                conn.executemany(
                    "INSERT INTO benchmark_leaves VALUES (?, ?, ?, ?)",
                    [(*leaf, rid) for leaf in leaves],
                )
            row = conn.execute(
                f"SELECT {columns} FROM benchmarks WHERE hash = ?", (query.hash,)
            ).fetchone()
        del extra_text
        return cat.benchmark_headers([row])[0]

    @_guarded("load the benchmark")
    def load_benchmark(self, uri: str) -> Benchmark:
        """Loads a benchmark with its serialized env.

        Example:
            >>> # env_json = store.load_benchmark(bench_id).serialized
        """
        cat.check_id(uri, "benchmark", self._root)
        rows = self._catalog.query(
            "SELECT id, created_by, published_in, created_at, hash, metadata, serialized "
            "FROM benchmarks WHERE id = ?",
            (uri,),
        )
        if not rows:
            raise self._not_found("benchmark", uri)
        return cat.benchmark_headers(rows, Benchmark)[0]

    @_guarded("list benchmarks")
    def list_benchmarks(self, filter: BaseFilter | None = None) -> list[BenchmarkHeader]:
        """Benchmark headers passing ``filter`` (pytupli's filter keys, e.g. ``metadata.name``).

        Example:
            >>> # store.list_benchmarks(FilterEQ(key="metadata.name", value="2048"))
        """
        source, columns = "benchmarks t", cat.BENCHMARK_COLUMNS
        return self._list(source, columns, cat.BENCHMARK_FIELDS, cat.benchmark_headers, filter)[0]

    @_guarded("publish the benchmark")
    def publish_benchmark(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the benchmark's ``published_in`` groups."""
        self._set_published("benchmark", uri, publish_in, add=True)

    @_guarded("unpublish the benchmark")
    def unpublish_benchmark(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the benchmark's groups (no-op if absent)."""
        self._set_published("benchmark", uri, unpublish_from, add=False)

    @_guarded("delete the benchmark")
    def delete_benchmark(self, uri: str) -> None:
        """Deletes a benchmark; its episodes stay (delete them with ``delete_episode``)."""
        cat.check_id(uri, "benchmark", self._root)
        with self._catalog.write() as conn:
            row = conn.execute("SELECT rid FROM benchmarks WHERE id = ?", (uri,)).fetchone()
            if row is None:
                raise self._not_found("benchmark", uri)
            conn.execute("DELETE FROM benchmark_leaves WHERE owner = ?", row)
            conn.execute("DELETE FROM benchmarks WHERE rid = ?", row)

    # -- artifacts ----------------------------------------------------------------------------

    @_guarded("store the artifact")
    def store_artifact(self, artifact: bytes, metadata: ArtifactMetadata) -> ArtifactMetadataItem:
        """Stores bytes; an artifact with the same content (sha256) is returned instead.

        Example:
            >>> # item = store.store_artifact(b"a,b\\n1,2\\n", ArtifactMetadata(name="table"))
        """
        if not isinstance(artifact, bytes | bytearray | memoryview):
            raise TupliStorageError(
                f"artifact must be bytes, received {type(artifact).__name__}: encode text first"
            )
        data = bytes(artifact)
        meta = ArtifactMetadata.model_validate(
            metadata.model_dump() if isinstance(metadata, pydantic.BaseModel) else metadata
        )
        digest = hashlib.sha256(data).hexdigest()
        select = f"SELECT {cat.ARTIFACT_COLUMNS} FROM artifacts t WHERE t.hash = ?"
        existing = self._catalog.query(select, (digest,))
        if existing:
            return cat.artifact_headers(existing)[0]
        extra_text, extra = cat.normalize_document(meta.extra, "artifact metadata.extra")
        leaves, inexact = cat.document_leaves(extra)
        new_id = uuid.uuid4().hex
        with self._staging_dir() as staging:
            tmp = staging / new_id
            with open(tmp, "xb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            with self._catalog.write() as conn:
                row = conn.execute(select, (digest,)).fetchone()
                if row is not None:
                    return cat.artifact_headers([row])[0]
                final = self._artifacts / new_id
                os.replace(tmp, final)
                try:
                    _fsync_dir(self._artifacts)
                    cursor = conn.execute(
                        "INSERT INTO artifacts (id, hash, name, description, benchmark_id, extra, "
                        "encoding, size, created_by, created_at, published_in, inexact) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            new_id,
                            digest,
                            meta.name,
                            meta.description,
                            meta.benchmark_id,
                            extra_text,
                            "utf-8",
                            len(data),
                            self._created_by,
                            _now(),
                            json.dumps([self._created_by]),
                            int(inexact),
                        ),
                    )
                    conn.executemany(
                        "INSERT INTO artifact_leaves VALUES (?, ?, ?, ?)",
                        [(*leaf, cursor.lastrowid) for leaf in leaves],
                    )
                    row = conn.execute(select, (digest,)).fetchone()
                except BaseException:
                    _unlink(final)
                    raise
        return cat.artifact_headers([row])[0]

    @_guarded("load the artifact")
    def load_artifact(self, uri: str, **kwargs: object) -> bytes:
        """The artifact's bytes, checked against its sha256 (``kwargs`` are ignored)."""
        cat.check_id(uri, "artifact", self._root)
        rows = self._catalog.query("SELECT hash FROM artifacts WHERE id = ?", (uri,))
        if not rows:
            raise self._not_found("artifact", uri)
        try:
            data = (self._artifacts / uri).read_bytes()
        except FileNotFoundError:
            raise TupliStorageError(
                f"artifact '{uri}' is in the catalog of store '{self._root}' but its file is "
                "missing; restore it or delete the artifact"
            ) from None
        if hashlib.sha256(data).hexdigest() != rows[0][0]:
            raise TupliStorageError(
                f"artifact '{uri}' in store '{self._root}' is damaged: its sha256 does not match "
                "the catalog; restore it from a backup or delete it"
            )
        return data

    @_guarded("list artifacts")
    def list_artifacts(self, filter: BaseFilter | None = None) -> list[ArtifactMetadataItem]:
        """Artifact headers passing ``filter``."""
        source, columns = "artifacts t", cat.ARTIFACT_COLUMNS
        return self._list(source, columns, cat.ARTIFACT_FIELDS, cat.artifact_headers, filter)[0]

    @_guarded("publish the artifact")
    def publish_artifact(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the artifact's ``published_in`` groups."""
        self._set_published("artifact", uri, publish_in, add=True)

    @_guarded("unpublish the artifact")
    def unpublish_artifact(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the artifact's groups (no-op if absent)."""
        self._set_published("artifact", uri, unpublish_from, add=False)

    @_guarded("delete the artifact")
    def delete_artifact(self, uri: str) -> None:
        """Deletes an artifact and its file."""
        cat.check_id(uri, "artifact", self._root)
        with self._catalog.write() as conn:
            row = conn.execute("SELECT rid FROM artifacts WHERE id = ?", (uri,)).fetchone()
            if row is None:
                raise self._not_found("artifact", uri)
            conn.execute("DELETE FROM artifact_leaves WHERE owner = ?", row)
            conn.execute("DELETE FROM artifacts WHERE rid = ?", row)
        _unlink(self._artifacts / uri)

    # -- episodes -----------------------------------------------------------------------------

    @_guarded("record the episode")
    def record_episode(self, episode: Episode | EpisodeData) -> EpisodeHeader:
        """Stores one episode (pytupli ``Episode`` or ``EpisodeData``); durable when it returns."""
        return self.record_episodes([episode])[0]

    @_guarded("record episodes")
    def record_episodes(self, episodes: Sequence[Episode | EpisodeData]) -> list[EpisodeHeader]:
        """Stores a batch of episodes, all or nothing; durable (committed) when it returns.

        Args:
            episodes: pytupli ``Episode``s (tuple form) and/or ``EpisodeData``; their benchmarks
                must exist in this store.

        Returns:
            One ``EpisodeHeader`` per input, in input order.

        Raises:
            TupliStorageError: An empty episode, arrays disagreeing in length, metadata that is
                not JSON-serialisable, an unknown benchmark, or an I/O failure; nothing is stored.

        Example:
            >>> # headers = store.record_episodes([ep_a, ep_b]); headers[0].n_tuples
        """
        if isinstance(episodes, Episode | EpisodeData) or not isinstance(episodes, Sequence):
            raise TupliStorageError(
                f"record_episodes expects a list of Episode or EpisodeData, received "
                f"{type(episodes).__name__} (use record_episode for a single episode)"
            )
        items: list[EpisodeData] = []
        for i, episode in enumerate(episodes):
            if isinstance(episode, Episode):
                items.append(_from_tuples(i, episode))
            elif isinstance(episode, EpisodeData):
                items.append(episode)
            elif isinstance(episode, pydantic.BaseModel) and hasattr(episode, "tuples"):
                # pytupli's own schema classes: same fields, another class
                items.append(_from_tuples(i, Episode.model_validate(episode.model_dump())))
            else:
                raise TupliStorageError(
                    f"episode {i} is a {type(episode).__name__}; expected a pytupli Episode or "
                    "tupli_jax.EpisodeData"
                )
        if not items:
            return []
        metas = [
            cat.normalize_document(e.metadata, f"metadata of episode {i}")
            for i, e in enumerate(items)
        ]
        bench_ids = {cat.check_id(e.benchmark_id, "benchmark", self._root) for e in items}
        with self._catalog.read() as conn:
            self._require_benchmarks(conn, bench_ids)
        returns = [e.episode_return for e in items]
        flags = [(bool(e.terminated), bool(e.truncated)) for e in items]
        now, published = _now(), json.dumps([self._created_by])
        with self._staging_dir() as staging:
            shard_of: list[tuple[str, int, int]] = [("", 0, 0)] * len(items)
            infos = []
            for group in group_by_structure(items):
                info = write_shard(
                    staging, [items[i] for i in group], compression=self._compression
                )
                infos.append(info)
                for i, (start, stop) in zip(group, info.ranges, strict=True):
                    shard_of[i] = (info.name, start, stop)
            renamed: list[Path] = []
            try:
                with self._catalog.write() as conn:
                    self._require_benchmarks(conn, bench_ids)
                    for info in infos:
                        os.replace(staging / info.name, self._shards / info.name)
                        renamed.append(self._shards / info.name)
                    _fsync_dir(self._shards)
                    conn.executemany(
                        "INSERT INTO shards (name, checksum, size, n_rows, created_at) "
                        "VALUES (?, ?, ?, ?, ?)",
                        [(s.name, s.checksum, s.size, s.n_rows, now) for s in infos],
                    )
                    first = conn.execute("SELECT COALESCE(MAX(rid), 0) + 1 FROM episodes")
                    rid0 = int(first.fetchone()[0])
                    rows: list[tuple[Any, ...]] = []
                    leaf_rows: list[tuple[Any, ...]] = []
                    headers: list[EpisodeHeader] = []
                    for i, episode in enumerate(items):
                        name, start, stop = shard_of[i]
                        leaves, inexact = cat.document_leaves(metas[i][1])
                        leaf_rows.extend((*leaf, rid0 + i) for leaf in leaves)
                        values = {
                            "id": uuid.uuid4().hex,
                            "created_by": self._created_by,
                            "published_in": [self._created_by],
                            "created_at": now,
                            "benchmark_id": episode.benchmark_id,
                            "metadata": metas[i][1],
                            "n_tuples": episode.length,
                            "terminated": flags[i][0],
                            "timeout": flags[i][1],
                            "truncated": flags[i][1],
                            "episode_return": returns[i],
                        }
                        headers.append(cat.fast_model(EpisodeHeader, values))
                        rows.append(
                            (rid0 + i, values["id"], episode.benchmark_id, name, start, stop,
                             episode.length, returns[i], *flags[i], flags[i][1], metas[i][0],
                             self._created_by, now, published, int(inexact))
                        )  # fmt: skip
                    conn.executemany(
                        "INSERT INTO episodes (rid, id, benchmark_id, shard, row_start, row_stop, "
                        "n_tuples, episode_return, terminated, timeout, truncated, metadata, "
                        "created_by, created_at, published_in, inexact) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    conn.executemany("INSERT INTO episode_leaves VALUES (?, ?, ?, ?)", leaf_rows)
            except BaseException:
                for path in renamed:  # not committed: nobody references them
                    _unlink(path)
                raise
        return headers

    @_guarded("load the episode")
    def load_episode(self, episode_id: str) -> EpisodeData:
        """Loads one episode in columnar form (checksum verified).

        Example:
            >>> # ep = store.load_episode(header.id); ep.observations, ep.actions, ep.rewards
        """
        cat.check_id(episode_id, "episode", self._root)
        rows = self._catalog.query(
            "SELECT t.shard, t.row_start, t.row_stop, t.n_tuples, s.checksum, t.terminated, "
            "t.truncated, t.metadata, t.benchmark_id FROM episodes t "
            "LEFT JOIN shards s ON s.name = t.shard WHERE t.id = ?",
            (episode_id,),
        )
        if not rows:
            raise self._not_found("episode", episode_id)
        shard, start, stop, n_tuples, checksum, terminated, truncated, meta, bid = rows[0]
        if checksum is None:
            raise TupliStorageError(
                f"episode '{episode_id}' points to shard '{shard}' that the catalog of store "
                f"'{self._root}' does not list; run verify() and delete the episode"
            )
        episode = open_shard(self._shard_path(shard), checksum).episode(start, stop, n_tuples)
        episode.terminated, episode.truncated = bool(terminated), bool(truncated)
        episode.metadata, episode.benchmark_id, episode.id = json.loads(meta), bid, episode_id
        return episode

    @_guarded("publish the episode")
    def publish_episode(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the episode's ``published_in`` groups."""
        self._set_published("episode", uri, publish_in, add=True)

    @_guarded("unpublish the episode")
    def unpublish_episode(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the episode's groups (no-op if absent)."""
        self._set_published("episode", uri, unpublish_from, add=False)

    @_guarded("list episodes")
    def list_episodes(
        self, filter: BaseFilter | None = None, include_tuples: bool = False
    ) -> list[EpisodeHeader] | list[EpisodeItem]:
        """Episode headers passing ``filter``, in recording order; never opens a shard unless
        ``include_tuples`` asks for pytupli's tuple view (``EpisodeItem``s).

        Example:
            >>> # f = FilterEQ(key="benchmark_id", value=b) & FilterGT(key="n_tuples", value=9)
            >>> # store.list_episodes(f)
        """
        fields = cat.EPISODE_FIELDS
        if not include_tuples:
            source, columns = "episodes t", cat.EPISODE_COLUMNS
            return self._list(source, columns, fields, cat.episode_headers, filter)[0]
        source = "episodes t LEFT JOIN shards s ON s.name = t.shard"
        columns = cat.EPISODE_COLUMNS + ", t.shard, t.row_start, t.row_stop, s.checksum"
        headers, rows = self._list(source, columns, fields, cat.episode_headers, filter)
        items: list[EpisodeItem] = []
        for header, row in zip(headers, rows, strict=True):
            shard, start, stop, checksum = row[11:15]
            if checksum is None:
                raise TupliStorageError(
                    f"episode '{header.id}' points to shard '{shard}' missing from the catalog "
                    f"of store '{self._root}'; run verify()"
                )
            episode = open_shard(self._shard_path(shard), checksum).episode(
                start, stop, header.n_tuples
            )
            episode.terminated, episode.truncated = header.terminated, header.truncated
            values = {**header.__dict__, "tuples": _tuples(episode, header.n_tuples)}
            items.append(cat.fast_model(EpisodeItem, values))
        return items

    @_guarded("delete the episode")
    def delete_episode(self, uri: str) -> None:
        """Deletes an episode; a shard left without episodes is removed from disk."""
        self.delete_episodes([uri])

    @_guarded("delete episodes")
    def delete_episodes(self, uris: Sequence[str]) -> None:
        """Deletes several episodes in one transaction (all or nothing: unknown ids raise)."""
        if isinstance(uris, str) or not isinstance(uris, Sequence):
            raise TupliStorageError(f"expected a list of episode ids, received {uris!r:.80}")
        for uri in uris:
            cat.check_id(uri, "episode", self._root)
        emptied: list[str] = []
        with self._catalog.write() as conn:
            shards = set()
            for uri in uris:
                row = conn.execute(
                    "SELECT rid, shard FROM episodes WHERE id = ?", (uri,)
                ).fetchone()
                if row is None:
                    raise self._not_found("episode", uri)
                conn.execute("DELETE FROM episode_leaves WHERE owner = ?", (row[0],))
                conn.execute("DELETE FROM episodes WHERE rid = ?", (row[0],))
                shards.add(row[1])
            for name in shards:
                if conn.execute(
                    "SELECT 1 FROM episodes WHERE shard = ? LIMIT 1", (name,)
                ).fetchone():
                    continue
                conn.execute("DELETE FROM shards WHERE name = ?", (name,))
                emptied.append(name)
        for name in emptied:
            _unlink(self._shard_path(name))

    # -- columnar access and integrity ----------------------------------------------------------

    @_guarded("locate episodes")
    def _episode_locations(self, filter: BaseFilter | None = None) -> EpisodeLocations:
        """Where the episodes passing ``filter`` live, as numpy arrays (no headers built).

        The fast path of ``TupliDataset``: one SQL query, vectorised conversion; headers are
        only built for the rare rows that ``matches`` must recheck. Internal API.

        Example:
            >>> # loc = store._episode_locations(FilterEQ(key="benchmark_id", value=b))
            >>> # loc.shard_paths[loc.shard_index[0]], loc.row_start[0], loc.row_stop[0]
        """
        sql = cat.compile_filter(filter, cat.EPISODE_FIELDS)
        source = "episodes t JOIN shards s ON s.name = t.shard"
        columns = "t.id, t.benchmark_id, s.rid, t.row_start, t.row_stop, t.n_tuples, "
        columns += "t.terminated, t.truncated, t.rid, t.inexact"
        with self._catalog.read() as conn:
            rows = conn.execute(
                f"SELECT {columns} FROM {source} WHERE {sql.text} ORDER BY t.rid", sql.params
            ).fetchall()
            check = [r[8] for r in rows if filter is not None and (not sql.exact or r[9])]
            if check:
                found = conn.execute(
                    f"SELECT {cat.EPISODE_COLUMNS}, t.rid FROM episodes t "
                    "WHERE t.rid IN (SELECT value FROM json_each(?))",
                    (json.dumps(check),),
                ).fetchall()
                headers = cat.episode_headers(found)
                rejected = {
                    row[-1]
                    for row, header in zip(found, headers, strict=True)
                    if not matches(filter, header.model_dump())
                }
                rows = [r for r in rows if r[8] not in rejected]
            shard_rids, shard_index = np.unique(
                np.fromiter((r[2] for r in rows), np.int64, len(rows)), return_inverse=True
            )
            shards = dict(
                (r[0], (r[1], r[2]))
                for r in conn.execute(
                    "SELECT rid, name, checksum FROM shards "
                    "WHERE rid IN (SELECT value FROM json_each(?))",
                    (json.dumps(shard_rids.tolist()),),
                )
            )

        def column(i: int, dtype: type) -> np.ndarray:
            return np.fromiter((r[i] for r in rows), dtype, len(rows))

        return EpisodeLocations(
            ids=[r[0] for r in rows],
            benchmark_ids=[r[1] for r in rows],
            shard_paths=[self._shard_path(shards[int(r)][0]) for r in shard_rids],
            shard_checksums=[shards[int(r)][1] for r in shard_rids],
            shard_index=shard_index.astype(np.int64).reshape(-1),
            row_start=column(3, np.int64),
            row_stop=column(4, np.int64),
            n_tuples=column(5, np.int64),
            terminated=column(6, np.bool_),
            truncated=column(7, np.bool_),
        )

    @_guarded("verify the store")
    def verify(self) -> list[str]:
        """Checks the store and lists its problems (``[]`` when sound).

        Finds orphan shard and artifact files, missing files, checksum mismatches (every shard is
        re-read), episodes whose row range does not fit their shard or their length, overlapping
        episodes, shards without episodes, damaged artifacts, leftovers of dead writers and
        SQLite-level damage. Changes nothing.

        Example:
            >>> # assert store.verify() == [], store.verify()
        """
        quick = [r[0] for r in self._catalog.query("PRAGMA quick_check")]
        with self._catalog.write() as conn:  # the write lock: no writer is between rename+commit
            shard_rows = conn.execute("SELECT name, checksum, size, n_rows FROM shards").fetchall()
            episodes = conn.execute(
                "SELECT id, shard, row_start, row_stop, n_tuples FROM episodes ORDER BY shard, "
                "row_start"
            ).fetchall()
            artifact_rows = conn.execute("SELECT id, hash, size FROM artifacts").fetchall()
            shard_files = {e.name for e in os.scandir(self._shards)}
            artifact_files = {e.name for e in os.scandir(self._artifacts)}
            stale = [
                e.name
                for e in os.scandir(self._staging)
                if e.is_dir(follow_symlinks=False) and _staging_is_stale(e)
            ]
        problems: list[str] = []
        if quick != ["ok"]:
            problems.append(f"catalog.sqlite failed SQLite's quick_check: {'; '.join(quick[:5])}")

        def report(kind: str, items: list[str]) -> None:
            for item in items[:_MAX_LISTED]:
                problems.append(f"{kind}: {item}")
            if len(items) > _MAX_LISTED:
                problems.append(f"{kind}: ... and {len(items) - _MAX_LISTED} more")

        known = {r[0]: r for r in shard_rows}
        report(
            "orphan shard (a file the catalog does not know; reopening the store removes it)",
            sorted(
                str(self._shards / n)
                for n in shard_files
                if _SHARD_FILE.fullmatch(n) and n not in known
            ),
        )
        report("stale staging directory of a dead writer", [str(self._staging / n) for n in stale])
        per_shard = collections.Counter(e[1] for e in episodes)
        used = set(per_shard)
        missing, damaged = [], []
        for name, checksum, size, n_rows in shard_rows:
            if _SHARD_FILE.fullmatch(name) is None:
                damaged.append(f"catalog names a bad shard file {name!r}")
            elif name not in shard_files:
                missing.append(f"'{self._shards / name}' ({per_shard[name]} episodes)")
            else:
                found = verify_shard(self._shards / name, checksum, expected_rows=n_rows)
                if not found and (self._shards / name).stat().st_size != size:
                    found = [
                        f"shard '{self._shards / name}' has a size other than recorded ({size})"
                    ]
                damaged.extend(found)
        report("missing shard (in the catalog, not on disk)", missing)
        report("damaged shard", damaged)
        report("shard without episodes", sorted(n for n in known if n not in used))
        bad_ranges, dangling, overlaps = [], [], []
        previous: tuple[str, int] = ("", 0)
        for eid, shard, start, stop, n_tuples in episodes:
            if shard not in known:
                dangling.append(f"episode '{eid}' -> shard '{shard}'")
                continue
            n_rows = known[shard][3]
            if not (
                0 <= start < stop <= n_rows and n_tuples >= 1 and stop - start - n_tuples in (0, 1)
            ):
                bad_ranges.append(
                    f"episode '{eid}': rows [{start}, {stop}) with n_tuples={n_tuples} in shard "
                    f"'{shard}' of {n_rows} rows"
                )
            if previous[0] == shard and start < previous[1]:
                overlaps.append(f"episode '{eid}' overlaps the previous episode in shard '{shard}'")
            previous = (shard, stop)
        report("episode referencing a shard missing from the catalog", dangling)
        report("episode with a bad row range", bad_ranges)
        report("overlapping episodes", overlaps)
        bad_artifacts = []
        for aid, digest, _size in artifact_rows:
            path = self._artifacts / aid
            if aid not in artifact_files:
                bad_artifacts.append(f"'{path}' is missing")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                bad_artifacts.append(f"'{path}' does not match its sha256")
        report("damaged artifact", bad_artifacts)
        report(
            "orphan artifact file (reopening the store removes it)",
            sorted(
                str(self._artifacts / n)
                for n in artifact_files - {r[0] for r in artifact_rows}
                if cat._ID_RE.fullmatch(n)
            ),
        )
        return problems


def _reopen(root: str, compression: str | None, created_by: str) -> FileStorage:
    """Unpickles a ``FileStorage`` (e.g. sent to another process) by reopening its directory."""
    return FileStorage(root, compression=compression, created_by=created_by)
