"""A separate writer process for the storage tests (not a test module).

Usage:
    python tests/_storage_writer.py episodes ROOT BENCH_ID TAG N_BATCHES BATCH_SIZE
    python tests/_storage_writer.py benchmarks ROOT N
    python tests/_storage_writer.py loop ROOT BENCH_ID SEED
    python tests/_storage_writer.py batch ROOT BENCH_ID BATCH_ID START_AT
    python tests/_storage_writer.py chunks ROOT BENCH_ID START STOP

``episodes`` records ``N_BATCHES`` batches of ``BATCH_SIZE`` episodes with metadata
``{"writer": TAG, "batch": k, "size": BATCH_SIZE}``. ``benchmarks`` stores benchmarks with hashes
``h0 .. h{N-1}``. ``loop`` records random batches (two observation structures, so some batches
write two shards), every other time a packed batch of ``RUN_SIZE`` episodes without metadata (one
episode run), deletes whole earlier batches (expanding the runs) and stores artifacts until it is
killed; it prints ``ready`` after its first commit. ``batch`` waits until the wall-clock time
``START_AT`` (so that racing processes start together), records a fixed batch of 4 episodes under
``BATCH_ID`` and prints the returned episode ids as JSON. ``chunks`` records chunks
``START .. STOP - 1`` with ``batch_id=chunk_batch_id(k)``, as a restarted job re-runs its chunks,
printing ``committed k`` after each.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    BenchmarkMetadata,
    BenchmarkQuery,
    FilterEQ,
)
from tupli_jax.storage import FileStorage


def make_episode(
    rng: np.random.Generator, bench: str, metadata: dict[str, object], image: bool = False
) -> EpisodeData:
    """A random episode of 1-40 steps; ``image`` switches to a second observation structure."""
    n = int(rng.integers(1, 40))
    obs: object = rng.normal(size=(n + 1, 4)).astype(np.float32)
    if image:
        obs = {"pixels": rng.integers(0, 255, (n + 1, 6, 6, 3), dtype=np.uint8), "pos": obs}
    return EpisodeData(
        observations=obs,
        actions=rng.integers(0, 4, n),
        rewards=rng.normal(size=n).astype(np.float32),
        discounts=np.r_[np.ones(n - 1), 0.0].astype(np.float32),
        terminated=True,
        truncated=False,
        metadata=metadata,
        benchmark_id=bench,
    )


RUN_SIZE = 3  # episodes of each episode run ``loop`` records


def run_batch(rng: np.random.Generator, bench: str) -> EpisodeBatch:
    """``RUN_SIZE`` random episodes packed, without metadata (stored as one episode run)."""
    episodes = [make_episode(rng, bench, {}) for _ in range(RUN_SIZE)]
    return EpisodeBatch(
        observations=np.concatenate([e.observations for e in episodes]),
        actions=np.concatenate([e.actions for e in episodes]),
        rewards=np.concatenate([e.rewards for e in episodes]),
        discounts=np.concatenate([e.discounts for e in episodes]),
        n_tuples=np.array([e.length for e in episodes], np.int64),
        terminated=np.ones(RUN_SIZE, bool),
        truncated=np.zeros(RUN_SIZE, bool),
        benchmark_id=bench,
    )


def chunk_batch_id(k: int) -> str:
    """The batch id of chunk ``k`` of the test job."""
    return f"job-1:chunk:{k}"


def chunk_episodes(bench: str, k: int) -> list[EpisodeData]:
    """The episodes chunk ``k`` of the test job completes: a function of ``k`` alone (0 to 4
    episodes, some chunks complete none, two observation structures)."""
    rng = np.random.default_rng([7, k])
    count = int(rng.integers(0, 5))
    return [
        make_episode(rng, bench, {"chunk": k, "i": i}, bool(rng.random() < 0.3))
        for i in range(count)
    ]


def main(argv: list[str]) -> None:
    mode, root = argv[0], argv[1]
    store = FileStorage(root)
    if mode == "episodes":
        bench, tag, n_batches, size = argv[2], argv[3], int(argv[4]), int(argv[5])
        rng = np.random.default_rng(abs(hash(tag)) % 2**32)
        for k in range(n_batches):
            meta = {"writer": tag, "batch": k, "size": size}
            store.record_episodes([make_episode(rng, bench, meta) for _ in range(size)])
    elif mode == "benchmarks":
        for i in range(int(argv[2])):
            meta = BenchmarkMetadata(name=f"bench {i}")
            store.store_benchmark(BenchmarkQuery(hash=f"h{i}", serialized="{}", metadata=meta))
    elif mode == "loop":
        bench, seed = argv[2], int(argv[3])
        rng = np.random.default_rng(seed)
        k = 0
        while True:
            size = int(rng.integers(1, 12))
            meta = {"writer": seed, "batch": k, "size": size}
            batch = [make_episode(rng, bench, meta, bool(rng.random() < 0.3)) for _ in range(size)]
            store.record_episodes(batch)
            if k % 2 == 0:
                store.record_episode_batch(run_batch(rng, bench))
            if k == 0:
                print("ready", flush=True)
            if k % 3 == 2:  # delete a whole earlier batch (all or nothing)
                old = FilterEQ(key="metadata.batch", value=int(rng.integers(0, k)))
                store.delete_episodes([h.id for h in store.list_episodes(old)])
            if k % 4 == 1:
                store.store_artifact(f"artifact {seed} {k}".encode(), ArtifactMetadata(name="a"))
            k += 1
    elif mode == "batch":
        bench, batch_id, start_at = argv[2], argv[3], float(argv[4])
        rng = np.random.default_rng(99)  # every racing process records the same batch
        batch = [make_episode(rng, bench, {"race": i}) for i in range(4)]
        time.sleep(max(0.0, start_at - time.time()))
        headers = store.record_episodes(batch, batch_id=batch_id)
        print(json.dumps([h.id for h in headers]), flush=True)
    elif mode == "chunks":
        bench, start, stop = argv[2], int(argv[3]), int(argv[4])
        for k in range(start, stop):
            store.record_episodes(chunk_episodes(bench, k), batch_id=chunk_batch_id(k))
            print(f"committed {k}", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
