"""Crash safety of tupli_jax/storage/file_storage.py: a writer SIGKILLed at random moments.

A writer subprocess (``tests/_storage_writer.py loop``) records batches (one or two shards each),
deletes whole earlier batches and stores artifacts until it is killed. After every kill the store
is reopened (which runs recovery) and must verify clean, list no partial batch and load every
listed episode whole.
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
        assert reopened.verify() == []
        headers = reopened.list_episodes()
        batches = collections.Counter((h.metadata["writer"], h.metadata["batch"]) for h in headers)
        sizes = {(h.metadata["writer"], h.metadata["batch"]): h.metadata["size"] for h in headers}
        assert {key: batches[key] for key in sizes} == sizes, "a partial batch is listed"
        for header in headers:
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
