"""Write path cost per episode: ``record_episode_batch`` (packed columns) vs ``record_episodes``.

Writes ``--batches`` batches of ``--episodes`` CartPole-like episodes (4 float32 observations,
int32 actions, random lengths 5..39) into a new ``FileStorage`` with each method, interleaved,
and prints the median time per batch, microseconds per episode and transitions per second. It
shows where a recording job with many short episodes is bound: the catalog row per episode.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_batch_write.py
    PYTHONPATH=. python benchmarks_perf/bench_batch_write.py --episodes 20000 --batches 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

import tupli_jax as tj
from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery


def make_batch(rng: np.random.Generator, episodes: int, benchmark_id: str) -> tj.EpisodeBatch:
    """``episodes`` random CartPole-like episodes as one ``EpisodeBatch``."""
    lengths = rng.integers(5, 40, size=episodes)
    steps = int(lengths.sum())
    return tj.EpisodeBatch(
        observations=rng.random((steps + episodes, 4), np.float32),
        actions=rng.integers(0, 2, size=steps, dtype=np.int32),
        rewards=np.ones(steps, np.float32),
        discounts=np.ones(steps, np.float32),
        n_tuples=lengths,
        terminated=rng.random(episodes) < 0.9,
        truncated=np.zeros(episodes, bool),
        benchmark_id=benchmark_id,
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=6000, help="episodes per batch")
    parser.add_argument("--batches", type=int, default=5, help="timed batches per method")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench_batch_write_")
    try:
        store = tj.FileStorage(root)
        query = BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
        bid = store.store_benchmark(query).id
        rng = np.random.default_rng(0)
        methods = {
            "record_episode_batch": lambda b: store.record_episode_batch(b),
            "record_episodes": lambda b: store.record_episodes(b.episodes()),
        }
        times: dict[str, list[float]] = {m: [] for m in methods}
        transitions: dict[str, list[int]] = {m: [] for m in methods}
        store.record_episode_batch(make_batch(rng, args.episodes, bid))  # warm-up
        for _ in range(args.batches):
            for name, write in methods.items():
                batch = make_batch(rng, args.episodes, bid)
                start = time.perf_counter()
                write(batch)
                times[name].append(time.perf_counter() - start)
                transitions[name].append(batch.num_transitions)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.episodes} episodes per batch, {args.batches} batches, load average {load:.1f}\n")
    print("| method | s per batch (median) | us per episode | transitions/s |")
    print("|---|---|---|---|")
    for name in methods:
        t = statistics.median(times[name])
        rate = statistics.median(transitions[name]) / t
        print(f"| {name} | {t:.3f} | {t / args.episodes * 1e6:.1f} | {rate / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
