"""``FileStorage``: the embedded store (SQLite catalog + Arrow IPC shards), pytupli's API.

Layout of a store directory::

    root/catalog.sqlite        SQLite (WAL): benchmarks, artifacts, shards, episodes, leaf
                               indexes, committed batch ids
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

Durability: with ``synchronous="full"`` (default) a write that returned survives a power loss;
with ``"normal"`` it survives a process kill, and a power loss may roll back the last commits
(their shards, fsynced before the commit, are then orphans that reopening removes).

This class is the facade; the work is split over private modules: ``_files`` (layout, staging,
recovery), ``_episodes`` (the episode write path and idempotent batch ids), ``_items``
(benchmarks, artifacts), ``_convert`` (pytupli tuples <-> columns), ``_locations`` and
``_blocks`` (the columnar read path), ``_verify``, ``_errors``; ``catalog`` (with ``_documents``
and ``_sql_filter``) and ``shards`` hold the SQLite and Arrow formats.

Example:
    >>> import tempfile
    >>> from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
    >>> store = FileStorage(tempfile.mkdtemp())
    >>> query = BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
    >>> store.store_benchmark(query).id == store.store_benchmark(query).id
    True
"""

from __future__ import annotations

import functools
import json
import sqlite3
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydantic

from tupli_jax.episode import EpisodeBatch, EpisodeData
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
    matches,
)
from tupli_jax.storage import _blocks
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._convert import as_episode_data, tuple_view
from tupli_jax.storage._episodes import has_batch, write_episode_batch, write_episodes
from tupli_jax.storage._errors import guarded
from tupli_jax.storage._files import Layout, no_gc, unlink
from tupli_jax.storage._items import insert_artifact, insert_benchmark, read_artifact
from tupli_jax.storage._locations import EpisodeLocations, episode_locations
from tupli_jax.storage._verify import verify_store
from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.shards import open_shard

__all__ = ["EpisodeLocations", "FileStorage"]


_PUBLISHABLE = {"benchmark": "benchmarks", "artifact": "artifacts", "episode": "episodes"}


def _reads_episodes(method: Callable[..., Any]) -> Callable[..., Any]:
    """Runs the read barriers (``FileStorage.add_read_barrier``) before ``method``."""

    @functools.wraps(method)
    def after_barriers(self: FileStorage, *args: Any, **kwargs: Any) -> Any:
        if self._barriers:
            self._run_read_barriers()
        return method(self, *args, **kwargs)

    return after_barriers


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
        synchronous: How durable a commit is when a write returns. ``"full"`` (default): it
            survives a process kill and a power loss (SQLite fsyncs its WAL at every commit).
            ``"normal"``: it survives a process kill; a power loss (or OS crash) may roll back
            the last commits, never leaving a torn or inconsistent store (shard files are still
            fsynced before their commit, and reopening removes shards whose commit was lost).
            Saves one fsync per write; keep ``"full"`` where another durable record (a
            checkpoint saying a batch id is stored) must not get ahead of the store.

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
        synchronous: str = "full",
    ) -> None:
        if storage_base_dir is not None:
            root = storage_base_dir
        if synchronous not in ("full", "normal"):
            raise TupliStorageError(
                f"synchronous must be 'full' or 'normal', received {synchronous!r}"
            )
        if compression not in ("lz4", "zstd", None):
            raise TupliStorageError(
                f"compression {compression!r} is not supported; use 'lz4', 'zstd' or None"
            )
        if not isinstance(created_by, str) or not created_by:
            raise TupliStorageError(f"created_by must be a non-empty str, received {created_by!r}")
        self._root = Path(root).absolute()
        self._compression = compression
        self._created_by = created_by
        self._synchronous = synchronous
        self._barriers: list[weakref.ref[Any]] = []
        self._barrier_guard = threading.local()
        try:
            self._layout = Layout.create(self._root)
            self._catalog = cat.Catalog(
                self._root / "catalog.sqlite", str(self._root), synchronous=synchronous
            )
            self._layout.recover(self._catalog)
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

    def add_read_barrier(self, flush: Callable[[], object]) -> None:
        """Registers ``flush`` to run before every read or change of stored episodes.

        For writers that buffer episodes in memory (the Gymnasium adapters batch their
        writes): ``list_episodes``, ``load_episode``, ``publish_episode``,
        ``unpublish_episode``, ``delete_episode(s)``, ``delete_benchmark``, ``verify``,
        ``catalog_version`` (so datasets notice) and the dataset fast path first call every
        registered ``flush``, so that an episode is visible in this process as soon as the
        writer has it. ``flush`` is held weakly (a bound method through ``weakref.WeakMethod``):
        it never keeps the writer alive, and a dead writer's barrier is dropped (so an inline
        ``lambda`` or ``functools.partial`` that nothing else holds is dropped at once). A ``flush``
        that reads this store does not run the barriers again (no recursion).

        Args:
            flush: A callable taking no arguments; typically a bound ``flush`` method.

        Example:
            >>> import tempfile
            >>> class Pending:
            ...     calls = 0
            ...     def flush(self): self.calls += 1
            >>> store, writer = FileStorage(tempfile.mkdtemp()), Pending()
            >>> store.add_read_barrier(writer.flush)
            >>> _ = store.list_episodes()
            >>> writer.calls
            1
        """
        if not callable(flush):
            raise TupliStorageError(f"add_read_barrier expects a callable, received {flush!r:.80}")
        try:
            ref: weakref.ref[Any] = (
                weakref.WeakMethod(flush) if hasattr(flush, "__self__") else weakref.ref(flush)
            )
        except TypeError:
            raise TupliStorageError(
                f"add_read_barrier holds its callable weakly and cannot hold {flush!r:.80}; pass "
                "a Python function or a bound method of a Python object (kept alive by you)"
            ) from None
        self._barriers.append(ref)

    def _run_read_barriers(self) -> None:
        guard = self._barrier_guard
        if getattr(guard, "active", False):
            return
        guard.active = True
        try:
            alive: list[weakref.ref[Any]] = []
            for ref in list(self._barriers):
                fn = ref()
                if fn is not None:
                    alive.append(ref)
                    fn()
            if len(alive) != len(self._barriers):
                self._barriers = [r for r in self._barriers if r() is not None]
        finally:
            guard.active = False

    def __repr__(self) -> str:
        return f"FileStorage('{self._root}')"

    def __reduce__(self) -> tuple[Any, ...]:
        args = (str(self._root), self._compression, self._created_by, self._synchronous)
        return (_reopen, args)

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
        with no_gc():
            rows = self._catalog.query(
                f"SELECT {columns}, t.inexact FROM {source} WHERE {sql.text} ORDER BY t.rid",
                sql.params,
                runs_ok=fields is not cat.EPISODE_FIELDS,  # benchmarks, artifacts
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

    @guarded("store the benchmark")
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
        return insert_benchmark(self._catalog, query, self._created_by)

    @guarded("load the benchmark")
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
            runs_ok=True,
        )
        if not rows:
            raise self._not_found("benchmark", uri)
        return cat.benchmark_headers(rows, Benchmark)[0]

    @guarded("list benchmarks")
    def list_benchmarks(self, filter: BaseFilter | None = None) -> list[BenchmarkHeader]:
        """Benchmark headers passing ``filter`` (pytupli's filter keys, e.g. ``metadata.name``).

        Example:
            >>> # store.list_benchmarks(FilterEQ(key="metadata.name", value="2048"))
        """
        source, columns = "benchmarks t", cat.BENCHMARK_COLUMNS
        return self._list(source, columns, cat.BENCHMARK_FIELDS, cat.benchmark_headers, filter)[0]

    @guarded("publish the benchmark")
    def publish_benchmark(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the benchmark's ``published_in`` groups."""
        self._set_published("benchmark", uri, publish_in, add=True)

    @guarded("unpublish the benchmark")
    def unpublish_benchmark(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the benchmark's groups (no-op if absent)."""
        self._set_published("benchmark", uri, unpublish_from, add=False)

    @guarded("delete the benchmark")
    @_reads_episodes
    def delete_benchmark(self, uri: str) -> None:
        """Deletes a benchmark; its episodes stay (delete them with ``delete_episode``)."""
        cat.check_id(uri, "benchmark", self._root)
        with self._catalog.write(runs_ok=True) as conn:  # its episodes stay
            row = conn.execute("SELECT rid FROM benchmarks WHERE id = ?", (uri,)).fetchone()
            if row is None:
                raise self._not_found("benchmark", uri)
            conn.execute("DELETE FROM benchmark_leaves WHERE owner = ?", row)
            conn.execute("DELETE FROM benchmarks WHERE rid = ?", row)

    # -- artifacts ----------------------------------------------------------------------------

    @guarded("store the artifact")
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
        return insert_artifact(self._layout, self._catalog, data, meta, self._created_by)

    @guarded("load the artifact")
    def load_artifact(self, uri: str, **kwargs: object) -> bytes:
        """The artifact's bytes, checked against its sha256 (``kwargs`` are ignored)."""
        cat.check_id(uri, "artifact", self._root)
        rows = self._catalog.query("SELECT hash FROM artifacts WHERE id = ?", (uri,), runs_ok=True)
        if not rows:
            raise self._not_found("artifact", uri)
        return read_artifact(self._layout, uri, rows[0][0])

    @guarded("list artifacts")
    def list_artifacts(self, filter: BaseFilter | None = None) -> list[ArtifactMetadataItem]:
        """Artifact headers passing ``filter``."""
        source, columns = "artifacts t", cat.ARTIFACT_COLUMNS
        return self._list(source, columns, cat.ARTIFACT_FIELDS, cat.artifact_headers, filter)[0]

    @guarded("publish the artifact")
    def publish_artifact(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the artifact's ``published_in`` groups."""
        self._set_published("artifact", uri, publish_in, add=True)

    @guarded("unpublish the artifact")
    def unpublish_artifact(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the artifact's groups (no-op if absent)."""
        self._set_published("artifact", uri, unpublish_from, add=False)

    @guarded("delete the artifact")
    def delete_artifact(self, uri: str) -> None:
        """Deletes an artifact and its file."""
        cat.check_id(uri, "artifact", self._root)
        with self._catalog.write(runs_ok=True) as conn:
            row = conn.execute("SELECT rid FROM artifacts WHERE id = ?", (uri,)).fetchone()
            if row is None:
                raise self._not_found("artifact", uri)
            conn.execute("DELETE FROM artifact_leaves WHERE owner = ?", row)
            conn.execute("DELETE FROM artifacts WHERE rid = ?", row)
        unlink(self._layout.artifacts / uri)

    # -- episodes -----------------------------------------------------------------------------

    @guarded("record the episode")
    def record_episode(self, episode: Episode | EpisodeData) -> EpisodeHeader:
        """Stores one episode (pytupli ``Episode`` or ``EpisodeData``); durable when it returns."""
        return self.record_episodes([episode])[0]

    @guarded("record episodes")
    def record_episodes(
        self, episodes: Sequence[Episode | EpisodeData], *, batch_id: str | None = None
    ) -> list[EpisodeHeader]:
        """Stores a batch of episodes, all or nothing; durable (committed) when it returns.

        Args:
            episodes: pytupli ``Episode``s (tuple form) and/or ``EpisodeData``; their benchmarks
                must exist in this store. May be empty.
            batch_id: Makes the call idempotent: a ``str`` of 1 to 128 letters, digits, ``_``,
                ``.``, ``:`` or ``-`` that the caller derives from the batch's place in its job
                (e.g. ``"job-1:chunk:17"``). It is committed in the same transaction as the
                episodes (also for an empty batch); if it is already committed, nothing is
                written and the headers of that batch come back in their original order
                (episodes deleted since are left out). Two processes racing with one batch id
                store one batch.

        Returns:
            One ``EpisodeHeader`` per input, in input order.

        Raises:
            TupliStorageError: An empty episode, arrays disagreeing in length, metadata that is
                not JSON-serialisable, an unknown benchmark, a bad batch id or one already
                committed with other episodes (another count or other lengths), or an I/O
                failure; nothing is stored.

        Example:
            >>> # headers = store.record_episodes([ep_a, ep_b]); headers[0].n_tuples
            >>> # store.record_episodes(chunk, batch_id=f"{job}:chunk:{k}")  # safe to repeat
        """
        items = as_episode_data(episodes)
        if batch_id is not None:
            cat.check_batch_id(batch_id, self._root)
        elif not items:
            return []
        return write_episodes(
            self._layout,
            self._catalog,
            items,
            compression=self._compression,
            created_by=self._created_by,
            batch_id=batch_id,
        )

    @guarded("record the episode batch")
    def record_episode_batch(
        self, batch: EpisodeBatch, *, batch_id: str | None = None
    ) -> Sequence[EpisodeHeader]:
        """Stores ``E`` episodes given as packed columns (``EpisodeBatch``), all or nothing.

        The fast path of the recorder's flush: one shard written straight from the columns
        (no per-episode arrays or Python objects besides the catalog rows and headers). Same
        durability, atomicity and ``batch_id`` semantics as ``record_episodes``; the stored
        episodes are identical to recording ``batch.episodes()`` (``episode_return`` is summed
        in one vectorised pass, so its last bits may differ for long episodes).

        Args:
            batch: The episodes; ``batch.benchmark_id`` must exist in this store.
            batch_id: As in ``record_episodes``.

        Returns:
            One ``EpisodeHeader`` per episode, in batch order. For a batch without metadata
            (``batch.metadata is None``) a lazy ``EpisodeHeaders`` sequence, which builds each
            header when read and gives all lengths at once as ``headers.n_tuples``: such a
            batch is committed as one catalog row (its episode rows are inserted before the
            next transaction that reads episodes), so storing it costs ~1 us per episode.

        Raises:
            TupliStorageError: Columns whose lengths disagree with ``n_tuples``, bad per-episode
                fields, metadata that is not JSON-serialisable, an unknown benchmark, a bad or
                conflicting batch id, or an I/O failure; nothing is stored.

        Example:
            >>> # batch = EpisodeBatch(observations=obs, actions=a, rewards=r, discounts=d,
            >>> #                      n_tuples=lengths, terminated=t, truncated=~t,
            >>> #                      benchmark_id=bid)
            >>> # headers = store.record_episode_batch(batch, batch_id="job:chunk:3")
        """
        if batch_id is not None:
            cat.check_batch_id(batch_id, self._root)
        return write_episode_batch(
            self._layout,
            self._catalog,
            batch,
            compression=self._compression,
            created_by=self._created_by,
            batch_id=batch_id,
        )

    @guarded("look up the batch")
    def has_batch(self, batch_id: str) -> bool:
        """Whether a batch recorded with ``record_episodes(..., batch_id=batch_id)`` is committed.

        Example:
            >>> # if not store.has_batch(f"{job}:chunk:{k}"): ...
        """
        return has_batch(self._catalog, cat.check_batch_id(batch_id, self._root))

    @guarded("load the episode")
    @_reads_episodes
    def load_episode(self, episode_id: str) -> EpisodeData:
        """Loads one episode in columnar form (checksum verified).

        Example:
            >>> # ep = store.load_episode(header.id); ep.observations, ep.actions, ep.rewards
        """
        cat.check_id(episode_id, "episode", self._root)
        rows = self._catalog.query(
            "SELECT s.name, t.row_start, t.row_stop, t.n_tuples, s.checksum, t.terminated, "
            "t.truncated, t.metadata, t.benchmark_id, t.shard_rid FROM episodes t "
            "LEFT JOIN shards s ON s.rid = t.shard_rid WHERE t.id = ?",
            (episode_id,),
        )
        if not rows:
            raise self._not_found("episode", episode_id)
        shard, start, stop, n_tuples, checksum, terminated, truncated, meta, bid, srid = rows[0]
        if checksum is None:
            raise TupliStorageError(
                f"episode '{episode_id}' points to shard #{srid} that the catalog of store "
                f"'{self._root}' does not list; run verify() and delete the episode"
            )
        episode = open_shard(self._layout.shard_path(shard), checksum).episode(
            start, stop, n_tuples
        )
        episode.terminated, episode.truncated = bool(terminated), bool(truncated)
        episode.metadata, episode.benchmark_id, episode.id = json.loads(meta), bid, episode_id
        return episode

    @guarded("publish the episode")
    @_reads_episodes
    def publish_episode(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the episode's ``published_in`` groups."""
        self._set_published("episode", uri, publish_in, add=True)

    @guarded("unpublish the episode")
    @_reads_episodes
    def unpublish_episode(self, uri: str, unpublish_from: str) -> None:
        """Removes ``unpublish_from`` from the episode's groups (no-op if absent)."""
        self._set_published("episode", uri, unpublish_from, add=False)

    @guarded("list episodes")
    @_reads_episodes
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
        source = "episodes t LEFT JOIN shards s ON s.rid = t.shard_rid"
        columns = cat.EPISODE_COLUMNS + ", s.name, t.row_start, t.row_stop, s.checksum"
        headers, rows = self._list(source, columns, fields, cat.episode_headers, filter)
        items: list[EpisodeItem] = []
        for header, row in zip(headers, rows, strict=True):
            shard, start, stop, checksum = row[11:15]
            if checksum is None:
                raise TupliStorageError(
                    f"episode '{header.id}' points to a shard missing from the catalog of store "
                    f"'{self._root}'; run verify()"
                )
            episode = open_shard(self._layout.shard_path(shard), checksum).episode(
                start, stop, header.n_tuples
            )
            episode.terminated, episode.truncated = header.terminated, header.truncated
            values = {**header.__dict__, "tuples": tuple_view(episode, header.n_tuples)}
            items.append(cat.fast_model(EpisodeItem, values))
        return items

    @guarded("delete the episode")
    @_reads_episodes
    def delete_episode(self, uri: str) -> None:
        """Deletes an episode; a shard left without episodes is removed from disk."""
        self.delete_episodes([uri])

    @guarded("delete episodes")
    @_reads_episodes
    def delete_episodes(self, uris: Sequence[str]) -> None:
        """Deletes several episodes in one transaction (all or nothing: unknown ids raise)."""
        if isinstance(uris, str) or not isinstance(uris, Sequence):
            raise TupliStorageError(f"expected a list of episode ids, received {uris!r:.80}")
        for uri in uris:
            cat.check_id(uri, "episode", self._root)
        emptied: list[str] = []
        with self._catalog.write() as conn:
            shards = set()
            gone: list[tuple[int, str]] = []
            for uri in uris:
                row = conn.execute(
                    "SELECT rid, shard_rid, benchmark_id FROM episodes WHERE id = ?", (uri,)
                ).fetchone()
                if row is None:
                    raise self._not_found("episode", uri)
                conn.execute("DELETE FROM episode_leaves WHERE owner = ?", (row[0],))
                conn.execute("DELETE FROM episodes WHERE rid = ?", (row[0],))
                shards.add(row[1])
                gone.append((row[0], row[2]))
            _blocks.remove(conn, gone)
            for rid in shards:
                if conn.execute(
                    "SELECT 1 FROM episodes WHERE shard_rid = ? LIMIT 1", (rid,)
                ).fetchone():
                    continue
                name = conn.execute("SELECT name FROM shards WHERE rid = ?", (rid,)).fetchone()
                if name is not None:
                    conn.execute("DELETE FROM shards WHERE rid = ?", (rid,))
                    emptied.append(name[0])
        for name in emptied:
            unlink(self._layout.shard_path(name))

    # -- columnar access and integrity ----------------------------------------------------------

    @guarded("read the catalog version")
    @_reads_episodes
    def catalog_version(self) -> int:
        """A number that changes whenever anything is committed to this store's catalog.

        Any commit that changed rows, by this object or by any other connection or process
        (SQLite's ``PRAGMA data_version`` plus a count of this object's own commits), gives a new
        value; equal values mean nothing was committed in between, so whatever was read from the
        catalog is still current. About 5 us; opens nothing new.

        Example:
            >>> import tempfile
            >>> from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
            >>> store = FileStorage(tempfile.mkdtemp())
            >>> before = store.catalog_version()
            >>> _ = store.store_benchmark(
            ...     BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b")))
            >>> after = store.catalog_version()
            >>> after != before, store.catalog_version() == after
            (True, True)
        """
        return self._catalog.version()

    @guarded("locate episodes")
    @_reads_episodes
    def _episode_locations(self, filter: BaseFilter | None = None) -> EpisodeLocations:
        """Where the episodes passing ``filter`` live, as numpy arrays (no headers built).

        The fast path of ``TupliDataset``: one SQL query, vectorised conversion. Internal API.

        Example:
            >>> # loc = store._episode_locations(FilterEQ(key="benchmark_id", value=b))
            >>> # loc.shard_paths[loc.shard_index[0]], loc.row_start[0], loc.row_stop[0]
        """
        return episode_locations(self._layout, self._catalog, filter)

    @guarded("verify the store")
    @_reads_episodes
    def verify(self) -> list[str]:
        """Checks the store and lists its problems (``[]`` when sound).

        Finds orphan shard and artifact files, missing files, checksum mismatches (every shard is
        re-read), episodes whose row range does not fit their shard or their length, overlapping
        episodes, shards without episodes, damaged artifacts, leftovers of dead writers,
        episode blocks that disagree with the episode rows and SQLite-level damage. Changes
        nothing.

        Example:
            >>> # assert store.verify() == [], store.verify()
        """
        return verify_store(self._layout, self._catalog)


def _reopen(
    root: str, compression: str | None, created_by: str, synchronous: str = "full"
) -> FileStorage:
    """Unpickles a ``FileStorage`` (e.g. sent to another process) by reopening its directory."""
    return FileStorage(
        root, compression=compression, created_by=created_by, synchronous=synchronous
    )
