"""Benchmark and artifact rows: dedup by hash, artifact files staged and committed atomically.

Host-side only. A benchmark is one catalog row (deduplicated by its env hash, also across
processes: ``INSERT OR IGNORE`` on a unique column under the write lock). An artifact is a file
named by its id plus a row deduplicated by the sha256 of its bytes; the file is written and fsynced
in a staging directory, renamed into place under the write lock and committed with its row.

Example:
    >>> # header = insert_benchmark(catalog, query, created_by="me")
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import uuid

from tupli_jax.schema import ArtifactMetadata, ArtifactMetadataItem, BenchmarkHeader, BenchmarkQuery
from tupli_jax.storage import catalog as cat
from tupli_jax.storage._files import Layout, fsync_dir, unlink
from tupli_jax.storage.base import TupliStorageError

__all__ = ["insert_artifact", "insert_benchmark", "read_artifact"]


def _now() -> str:
    return datetime.datetime.now().isoformat()


def insert_benchmark(
    catalog: cat.Catalog, query: BenchmarkQuery, created_by: str
) -> BenchmarkHeader:
    """Stores a validated benchmark query; the existing benchmark with its hash wins."""
    _, extra = cat.normalize_document(query.metadata.extra, "benchmark metadata.extra")
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
    with catalog.write(runs_ok=True) as conn:  # no episode rows
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
                created_by,
                _now(),
                json.dumps([created_by]),
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
    return cat.benchmark_headers([row])[0]


def insert_artifact(
    layout: Layout, catalog: cat.Catalog, data: bytes, meta: ArtifactMetadata, created_by: str
) -> ArtifactMetadataItem:
    """Stores artifact bytes; the existing artifact with the same sha256 wins."""
    digest = hashlib.sha256(data).hexdigest()
    select = f"SELECT {cat.ARTIFACT_COLUMNS} FROM artifacts t WHERE t.hash = ?"
    existing = catalog.query(select, (digest,), runs_ok=True)
    if existing:
        return cat.artifact_headers(existing)[0]
    extra_text, extra = cat.normalize_document(meta.extra, "artifact metadata.extra")
    leaves, inexact = cat.document_leaves(extra)
    new_id = uuid.uuid4().hex
    with layout.staging_dir() as staging:
        tmp = staging / new_id
        with open(tmp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        with catalog.write(runs_ok=True) as conn:  # no episode rows
            row = conn.execute(select, (digest,)).fetchone()
            if row is not None:
                return cat.artifact_headers([row])[0]
            final = layout.artifacts / new_id
            os.replace(tmp, final)
            try:
                fsync_dir(layout.artifacts)
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
                        created_by,
                        _now(),
                        json.dumps([created_by]),
                        int(inexact),
                    ),
                )
                conn.executemany(
                    "INSERT INTO artifact_leaves VALUES (?, ?, ?, ?)",
                    [(*leaf, cursor.lastrowid) for leaf in leaves],
                )
                row = conn.execute(select, (digest,)).fetchone()
            except BaseException:
                unlink(final)
                raise
    return cat.artifact_headers([row])[0]


def read_artifact(layout: Layout, uri: str, digest: str) -> bytes:
    """The bytes of artifact ``uri``, checked against its catalog ``digest`` (sha256)."""
    try:
        data = (layout.artifacts / uri).read_bytes()
    except FileNotFoundError:
        raise TupliStorageError(
            f"artifact '{uri}' is in the catalog of store '{layout.root}' but its file is "
            "missing; restore it or delete the artifact"
        ) from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise TupliStorageError(
            f"artifact '{uri}' in store '{layout.root}' is damaged: its sha256 does not match "
            "the catalog; restore it from a backup or delete it"
        )
    return data
