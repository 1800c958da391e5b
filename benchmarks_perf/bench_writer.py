"""``tj.record``'s writer alone: one job's chunks replayed with and without cutting while storing.

Records one job (B = ``--num-envs``, ``--transitions``, chunks of ``--capacity`` steps) and keeps
a host copy of every chunk it handed to the writer. Then, with no device work running, replays
those chunks into the same store (a new run id each time, so every replay stores every episode)
through ``tupli_jax.pipeline._Writer``:

- ``one after the other``: each chunk is cut, then stored (``pipeline._OVERLAP = False``),
  which is what the single writer thread did before;
- ``overlapped``: chunk k + 1 is cut on one thread while chunk k is stored on the other (the
  default).

The two alternate ``--repeats`` times; reported: transitions/s of each (median) and the median
of the per-repeat ratios. This is the writer's throughput when the device leaves it the host's
cores (an accelerator host), which ``bench_record.py`` on a CPU-only machine cannot show. Also
reported: the seconds the cut alone takes for the job's chunks (numpy: complete episodes and
carry, nothing stored), and the seconds storing their cut batches alone takes (Arrow shards,
SQLite catalog, fsync; one after the other), once each after each pair of replays.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_writer.py
    PYTHONPATH=. python benchmarks_perf/bench_writer.py --envs Game2048-v1 --repeats 7
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

import tupli_jax as tj
from benchmarks_perf._envs import make_env, record_job
from tupli_jax import pipeline
from tupli_jax.flush import store_batch


def capture(env: Any, num_envs: int, steps: int, capacity: int, root: Path) -> tuple[Any, list]:
    """Runs one job into ``root``; returns its recorder and host copies of its chunks."""
    chunks: list[tuple[int, Any]] = []
    recorders: list[Any] = []
    writer = pipeline._Writer

    class Capturing(writer):  # type: ignore[misc, valid-type]
        def put(self, chunk_index: int, pending: Any) -> None:
            host = jax.tree.map(np.array, pending.arrays)
            chunks.append((chunk_index, dataclasses.replace(pending, arrays=host)))
            recorders.append(self._rec)
            super().put(chunk_index, pending)

    pipeline._Writer = Capturing  # type: ignore[misc]
    try:
        record_job(env, tj.FileStorage(root), num_envs, steps, capacity)
    finally:
        pipeline._Writer = writer  # type: ignore[misc]
    return recorders[0], chunks


def replay(rec: Any, chunks: list, run_id: str, overlap: bool) -> tuple[float, int]:
    """Seconds to write ``chunks`` again, and the transitions stored."""
    default = pipeline._OVERLAP
    pipeline._OVERLAP = overlap
    rec._flusher._carries = {}  # the first chunk comes from fresh states (token 0)
    try:
        out = pipeline._Writer(rec, run_id)
        start = time.perf_counter()
        for chunk_index, pending in chunks:
            out.put(chunk_index, pending)
        out.drain()
        seconds = time.perf_counter() - start
        out.close()
    finally:
        pipeline._OVERLAP = default
    return seconds, out.transitions


def replay_cut(rec: Any, chunks: list) -> float:
    """Seconds to cut ``chunks`` again (numpy only: episodes and carry, nothing stored)."""
    rec._flusher._carries = {}
    start = time.perf_counter()
    for _, pending in chunks:
        batch, commit = rec._flusher.cut(pending)
        commit()
        del batch
    return time.perf_counter() - start


def replay_store(rec: Any, chunks: list, run_id: str) -> float:
    """Seconds to store ``chunks``' batches one after the other, cut beforehand (not timed)."""
    rec._flusher._carries = {}
    batches = []
    for chunk_index, pending in chunks:
        batch, commit = rec._cut(pending)
        commit()
        batches.append((chunk_index, batch))
    start = time.perf_counter()
    for chunk_index, batch in batches:
        store_batch(rec.storage, batch, f"{run_id}:{chunk_index}")
    return time.perf_counter() - start


def bench_env(env_id: str, num_envs: int, steps: int, capacity: int, repeats: int) -> str:
    """One table row."""
    root = Path(tempfile.mkdtemp(prefix="bench_writer_"))
    try:
        rec, chunks = capture(make_env(env_id), num_envs, steps, capacity, root)
        row_bytes = sum(
            int(np.asarray(x).nbytes) for _, p in chunks for x in jax.tree.leaves(p.arrays)
        )
        times: dict[str, list[float]] = {"one after the other": [], "overlapped": []}
        cut_times, store_times = [], []
        transitions = 0
        replay(rec, chunks, "warm-up", False)
        for i in range(repeats):
            for name, overlap in (("one after the other", False), ("overlapped", True)):
                seconds, transitions = replay(rec, chunks, f"{name[:3]}-{i}", overlap)
                times[name].append(seconds)
            cut_times.append(replay_cut(rec, chunks))
            store_times.append(replay_store(rec, chunks, f"sto-{i}"))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    one, two = times["one after the other"], times["overlapped"]
    ratio = statistics.median(a / b for a, b in zip(one, two, strict=True))
    return (
        f"| {env_id} | {len(chunks)} x {row_bytes / len(chunks) / 2**20:.0f} MiB "
        f"| {transitions / statistics.median(one) / 1e6:.2f}M/s "
        f"| {transitions / statistics.median(two) / 1e6:.2f}M/s | {ratio:.2f}x "
        f"| {statistics.median(cut_times):.2f} s ({min(cut_times):.2f} s) "
        f"| {statistics.median(store_times):.2f} s ({min(store_times):.2f} s) |"
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default="CartPole,Game2048-v1", help="comma-separated env ids")
    parser.add_argument("--num-envs", type=int, default=1024, help="B")
    parser.add_argument("--transitions", type=int, default=2**21, help="steps taken in total")
    parser.add_argument("--capacity", type=int, default=256, help="steps per chunk")
    parser.add_argument("--repeats", type=int, default=5, help="replays of each kind")
    args = parser.parse_args(argv)
    steps = max(args.transitions // args.num_envs // args.capacity, 1) * args.capacity
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"{platform.machine()}, {cores} cores for this process, Python "
        f"{platform.python_version()}, jax {jax.__version__}"
    )
    print(f"command: {args}; {steps} steps x {args.num_envs} envs per job")
    print(
        "\n| env | chunks (fetched rows) | one after the other | overlapped "
        "| speed-up (median of ratios) | cut alone per job, median (best) "
        "| store alone per job, median (best) |"
    )
    print("|---|---|---|---|---|---|---|")
    for env_id in [e for e in args.envs.split(",") if e]:
        print(bench_env(env_id, args.num_envs, steps, args.capacity, args.repeats), flush=True)


if __name__ == "__main__":
    main()
