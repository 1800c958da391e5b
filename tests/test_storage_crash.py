"""Crash safety of tupli_jax/storage/file_storage.py: a writer SIGKILLed at random moments.

A writer subprocess (``tests/_storage_writer.py loop``) records batches (one or two shards each),
deletes whole earlier batches and stores artifacts until it is killed. After every kill the store
is reopened (which runs recovery) and must verify clean, list no partial batch and load every
listed episode whole. A second writer (``chunks``) plays a job that records chunks with batch ids
and is restarted after each kill from a point that may lie behind what it committed.
"""

from __future__ import annotations

import collections
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from _storage_writer import RUN_SIZE, chunk_batch_id, chunk_episodes

from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
from tupli_jax.storage import FileStorage

WRITER = Path(__file__).with_name("_storage_writer.py")
ROUNDS = 7


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_writer_leaves_a_sound_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = FileStorage(root)
    meta = BenchmarkMetadata(name="crash")
    bench = store.store_benchmark(BenchmarkQuery(hash="h", serialized="{}", metadata=meta)).id
    rng = random.Random(1234)
    seen_batches = 0
    for round_ in range(ROUNDS):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), "loop", str(root), bench, str(round_)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert proc.stdout is not None
            ready = proc.stdout.readline()
            assert ready.strip() == b"ready", proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(rng.uniform(0.0, 0.6))
            assert proc.poll() is None, "the writer stopped before it was killed"
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

        reopened = FileStorage(root)  # recovery runs here
        assert reopened.verify() == []  # checks pending episode runs without expanding them
        everything = reopened.list_episodes()  # expands them
        runs = [h for h in everything if not h.metadata]
        assert len(runs) % RUN_SIZE == 0, "a partial episode run is listed"
        assert len(runs) >= RUN_SIZE * (round_ + 1)  # each writer commits one before "ready"
        headers = [h for h in everything if h.metadata]
        batches = collections.Counter((h.metadata["writer"], h.metadata["batch"]) for h in headers)
        sizes = {(h.metadata["writer"], h.metadata["batch"]): h.metadata["size"] for h in headers}
        assert {key: batches[key] for key in sizes} == sizes, "a partial batch is listed"
        for header in everything:
            episode = reopened.load_episode(header.id)
            n = header.n_tuples
            assert episode.length == n and np.shape(episode.discounts) == (n,)
            obs = episode.observations
            rows = obs["pos"].shape[0] if isinstance(obs, dict) else obs.shape[0]
            assert rows == n + 1 and np.shape(episode.actions) == (n,)
            assert episode.episode_return == pytest.approx(header.episode_return, rel=1e-5)
        for artifact in reopened.list_artifacts():
            assert reopened.load_artifact(artifact.id).startswith(b"artifact ")
        leftovers = list((root / "staging").iterdir())
        assert leftovers == []
        seen_batches += sum(1 for key in sizes if key[0] == round_)
        reopened.close()
    assert seen_batches >= ROUNDS  # every writer committed at least its first batch


N_CHUNKS = 40


def _run_chunks(root: Path, bench: str, start: int, kill_after: int | None, delay: float) -> None:
    """Runs the writer over chunks ``start ..``; SIGKILLs it ``delay`` s after ``kill_after``."""
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), "chunks", str(root), bench, str(start), str(N_CHUNKS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        if kill_after is None:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err.decode()
            return
        for line in proc.stdout:
            if line.strip() == f"committed {kill_after}".encode():
                break
        else:
            raise AssertionError(proc.stderr.read().decode() if proc.stderr else "no output")
        time.sleep(delay)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_killed_job_rerun_with_batch_ids_stores_every_chunk_once(tmp_path: Path) -> None:
    """A job killed at random moments and restarted from a lagging checkpoint (it re-runs
    committed chunks) ends with exactly the episodes of an uninterrupted run, byte for byte."""
    root = tmp_path / "store"
    store = FileStorage(root)
    query = BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="job"))
    bench = store.store_benchmark(query).id
    rng = random.Random(4321)
    for _ in range(4):
        committed = [k for k in range(N_CHUNKS) if store.has_batch(chunk_batch_id(k))]
        assert committed == list(range(len(committed))), "chunks are committed in order"
        start = max(0, len(committed) - rng.randint(0, 3))  # the checkpoint may lag behind
        kill_after = rng.randint(start, min(start + 8, N_CHUNKS - 2))
        _run_chunks(root, bench, start, kill_after, rng.uniform(0.0, 0.03))
        store = FileStorage(root)  # recovery runs here
        assert store.verify() == []
        assert list((root / "staging").iterdir()) == []
    _run_chunks(root, bench, 0, None, 0.0)  # the final restart re-runs every chunk

    reference = FileStorage(tmp_path / "reference")
    ref_bench = reference.store_benchmark(query).id
    for k in range(N_CHUNKS):
        reference.record_episodes(chunk_episodes(ref_bench, k))
    got, want = store.list_episodes(), reference.list_episodes()
    assert [(h.metadata, h.n_tuples) for h in got] == [(h.metadata, h.n_tuples) for h in want]
    assert (
        len({h.id for h in got})
        == len(got)
        == sum(len(chunk_episodes(bench, k)) for k in range(N_CHUNKS))
    )
    for a, b in zip(got, want, strict=True):
        x, y = store.load_episode(a.id), reference.load_episode(b.id)
        for field in ("observations", "actions", "rewards", "discounts"):
            xs, ys = _leaves(getattr(x, field)), _leaves(getattr(y, field))
            assert [(v.dtype, v.shape, v.tobytes()) for v in xs] == [
                (v.dtype, v.shape, v.tobytes()) for v in ys
            ]
        assert (x.terminated, x.truncated) == (y.terminated, y.truncated)
    assert store.verify() == []


def _leaves(tree: object) -> list[np.ndarray]:
    """The array leaves of a dict/list pytree in key order (no JAX needed)."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in _leaves(tree[key])]
    if isinstance(tree, list | tuple):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [np.asarray(tree)]
