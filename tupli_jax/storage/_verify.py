"""``verify``: a read-only integrity check of a whole store directory.

Host-side only. Re-reads every shard (CRC-32 of each column buffer, row counts), every artifact
(sha256) and checks the catalog's rows against the files; lists problems in plain words.

Example:
    >>> # problems = store.verify(); assert problems == [], problems
"""

from __future__ import annotations

import collections
import hashlib
import os

from tupli_jax.storage import _blocks, _runs
from tupli_jax.storage._files import SHARD_FILE, Layout
from tupli_jax.storage.catalog import Catalog, is_id
from tupli_jax.storage.shards import verify_shard

__all__ = ["verify_store"]

_MAX_LISTED = 20  # problems of one kind listed one by one


def verify_store(layout: Layout, catalog: Catalog) -> list[str]:
    """The problems of the store at ``layout`` (``[]`` when sound); changes nothing.

    Finds orphan shard and artifact files, missing files, checksum mismatches, episodes whose row
    range does not fit their shard or their length, overlapping episodes, shards without
    episodes, damaged artifacts, leftovers of dead writers, episode blocks that disagree with the
    episode rows, damaged episode runs and SQLite-level damage. Episodes still in runs are
    checked as if expanded (nothing is expanded).
    """
    quick = [r[0] for r in catalog.query("PRAGMA quick_check", runs_ok=True)]
    # The write lock: no writer is between rename+commit. Episode runs are read, not expanded.
    with catalog.write(runs_ok=True) as conn:
        shard_rows = conn.execute("SELECT name, checksum, size, n_rows FROM shards").fetchall()
        shard_names = dict(conn.execute("SELECT rid, name FROM shards").fetchall())
        rows = conn.execute(
            "SELECT rid, shard_rid, row_start, n_tuples, flags, id, benchmark_id, row_stop "
            "FROM episodes"
        ).fetchall()
        runs, run_problems = _runs.read(conn)
        pending = [
            (rid, run.shard_rid, start, length, flags, eid, run.benchmark_id,
             start + length + (flags >> 3))
            for run in runs
            for rid, eid, start, length, flags in zip(
                range(run.first_rid, run.first_rid + len(run.ids)), run.ids,
                *run.columns.tolist(), strict=True)
        ]  # fmt: skip
        episodes = sorted(
            (shard_names.get(srid, f"#{srid}"), start, stop, n_tuples, eid)
            for _, srid, start, n_tuples, _, eid, _, stop in rows + pending
        )
        artifact_rows = conn.execute("SELECT id, hash, size FROM artifacts").fetchall()
        block_problems = _blocks.check(conn, [r[:7] for r in pending])
        shard_files = {e.name for e in os.scandir(layout.shards)}
        artifact_files = {e.name for e in os.scandir(layout.artifacts)}
        stale = layout.stale_staging()
    problems: list[str] = list(run_problems)
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
            str(layout.shards / n)
            for n in shard_files
            if SHARD_FILE.fullmatch(n) and n not in known
        ),
    )
    report("stale staging directory of a dead writer", [str(layout.staging / n) for n in stale])
    per_shard = collections.Counter(e[0] for e in episodes)
    used = set(per_shard)
    missing, damaged = [], []
    for name, checksum, size, n_rows in shard_rows:
        if SHARD_FILE.fullmatch(name) is None:
            damaged.append(f"catalog names a bad shard file {name!r}")
        elif name not in shard_files:
            missing.append(f"'{layout.shards / name}' ({per_shard[name]} episodes)")
        else:
            found = verify_shard(layout.shards / name, checksum, expected_rows=n_rows)
            if not found and (layout.shards / name).stat().st_size != size:
                found = [f"shard '{layout.shards / name}' has a size other than recorded ({size})"]
            damaged.extend(found)
    report("missing shard (in the catalog, not on disk)", missing)
    report("damaged shard", damaged)
    report("shard without episodes", sorted(n for n in known if n not in used))
    bad_ranges, dangling, overlaps = [], [], []
    previous: tuple[str, int] = ("", 0)
    for shard, start, stop, n_tuples, eid in episodes:
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
    problems.extend(block_problems)
    bad_artifacts = []
    for aid, digest, _size in artifact_rows:
        path = layout.artifacts / aid
        if aid not in artifact_files:
            bad_artifacts.append(f"'{path}' is missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad_artifacts.append(f"'{path}' does not match its sha256")
    report("damaged artifact", bad_artifacts)
    report(
        "orphan artifact file (reopening the store removes it)",
        sorted(
            str(layout.artifacts / n)
            for n in artifact_files - {r[0] for r in artifact_rows}
            if is_id(n)
        ),
    )
    return problems
