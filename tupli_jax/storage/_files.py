"""The files of a store directory: layout, staging, fsync and recovery after a dead writer.

Host-side only. A store directory holds ``catalog.sqlite``, ``shards/``, ``artifacts/`` and
``staging/<pid>-<uuid>/`` (files being written). Files are written and fsynced in a private
staging directory, then renamed into place while the catalog's write lock is held and committed
in the same transaction; a final-named file the catalog does not know can therefore only come
from a writer that died, and ``Layout.recover`` removes it (under the same lock).

Example:
    >>> import tempfile
    >>> layout = Layout.create(Path(tempfile.mkdtemp()))
    >>> with layout.staging_dir() as staging:
    ...     staging.parent == layout.staging
    True
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.catalog import Catalog, is_id

__all__ = ["SHARD_FILE", "Layout", "fsync_dir", "no_gc", "unlink"]

SHARD_FILE = re.compile(r"[A-Za-z0-9_-]{1,64}\.arrow")
_STAGING_DIR = re.compile(r"(\d{1,7})-[0-9a-f]{32}")  # Linux pids are < 2**22
_STALE_AGE_S = 3600.0  # a staging dir of a live pid older than this is a pid-reuse leftover
_live_staging: set[str] = set()  # staging dirs this process is using
_live_lock = threading.Lock()


def fsync_dir(directory: Path) -> None:
    """Makes renames and creations in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink(path: Path) -> None:
    """Removes a file if it exists."""
    with suppress(FileNotFoundError):
        path.unlink()


_gc_lock = threading.Lock()
_gc_paused = 0  # no_gc blocks running now, in any thread
_gc_was_enabled = False


@contextmanager
def no_gc() -> Iterator[None]:
    """Pauses the cyclic GC while building many objects (halves the time of 100k headers).

    Counted across threads (``tj.record`` cuts and stores on two at once): the GC comes back,
    if it was on, when the last block running exits, not when the first one does.
    """
    global _gc_paused, _gc_was_enabled
    with _gc_lock:
        if _gc_paused == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_paused += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_paused -= 1
            if _gc_paused == 0 and _gc_was_enabled:
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


def _remove_staging(path: Path) -> None:
    try:
        for entry in os.scandir(path):
            unlink(Path(entry.path))
        path.rmdir()
    except FileNotFoundError:
        pass


@dataclasses.dataclass(frozen=True)
class Layout:
    """The directories of one store (absolute paths).

    Attributes:
        root: The store directory.
        shards: Arrow IPC shard files ``<name>.arrow``.
        artifacts: Artifact files named by their id.
        staging: Private per-writer directories of files not yet committed.
    """

    root: Path
    shards: Path
    artifacts: Path
    staging: Path

    @classmethod
    def create(cls, root: Path) -> Layout:
        """The layout under ``root``, creating missing directories (raises ``OSError``)."""
        layout = cls(root, root / "shards", root / "artifacts", root / "staging")
        for directory in (layout.root, layout.shards, layout.artifacts, layout.staging):
            directory.mkdir(parents=True, exist_ok=True)
        return layout

    def shard_path(self, name: str) -> Path:
        """The path of shard ``name``, refusing names that could leave the shard directory."""
        if SHARD_FILE.fullmatch(name) is None:  # a damaged catalog must not leave the store
            raise TupliStorageError(f"catalog of store '{self.root}' names a bad shard {name!r}")
        return self.shards / name

    @contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A fresh private staging directory, removed with its content on exit."""
        name = f"{os.getpid()}-{uuid.uuid4().hex}"
        with _live_lock:
            _live_staging.add(name)
        path = self.staging / name
        try:
            path.mkdir()
            yield path
        finally:
            _remove_staging(path)
            with _live_lock:
                _live_staging.discard(name)

    def stale_staging(self) -> list[str]:
        """Names of staging directories left by dead writers."""
        return [
            e.name
            for e in os.scandir(self.staging)
            if e.is_dir(follow_symlinks=False) and _staging_is_stale(e)
        ]

    def recover(self, catalog: Catalog) -> None:
        """Removes what dead writers left: orphan shards/artifacts and stale staging dirs."""
        for name in self.stale_staging():
            _remove_staging(self.staging / name)
        with catalog.write(runs_ok=True) as conn:  # shards only
            known = {r[0] for r in conn.execute("SELECT name FROM shards")}
            for entry in os.scandir(self.shards):
                if SHARD_FILE.fullmatch(entry.name) and entry.name not in known:
                    unlink(Path(entry.path))
                elif entry.name.endswith(".tmp") and _older_than(entry, _STALE_AGE_S):
                    unlink(Path(entry.path))  # a temporary file outside staging (older writers)
            known = {r[0] for r in conn.execute("SELECT id FROM artifacts")}
            for entry in os.scandir(self.artifacts):
                if is_id(entry.name) and entry.name not in known:
                    unlink(Path(entry.path))
