"""End-to-end recording job: ``tj.record`` against the unrecorded rollout, in one run.

For each env (CartPole-like, Game2048, Snake) at ``B = --num-envs`` over ``--transitions``
transitions (``steps = transitions / B`` per env, in chunks of ``--capacity`` steps, by default
``tj.record``'s own, 256):

- ``unrecorded``: the same chunked ``jit(scan(vmap(step)))`` of the env in jumanji's
  ``AutoResetWrapper(next_obs_in_extras=True)``, same random policy and per-step bookkeeping as
  ``tj.record`` (``benchmarks_perf/_envs.py``), outputs blocked on; reset and compile not timed.
- ``tj.record``: the whole job into a new ``FileStorage`` in a temporary directory: device
  rollout, device-to-host transfer, cutting episodes, Arrow shards, SQLite catalog, fsync; its
  wall time minus ``RecordResult.compile_seconds`` (so it includes storing the benchmark,
  resetting the envs, the final drain and the count). The first call in the process is
  reported apart (``first call``): it also pays for first-use costs that ``compile_seconds``
  does not count (the flush's small slice programs, fresh host memory).

Reported per env: medians over ``--repeats`` (unrecorded and recorded runs interleaved; the
ratio is the median of per-repeat ratios, with the ratio of the best times in parentheses, which
other processes on a shared machine disturb least), compile times, stored episodes and
episodes/s, the store size per transition (shards alone, and the whole store directory with
the catalog), and the first episode query after the job (``first episode query``: it inserts
the catalog rows of the job's episodes, which ``tj.record`` commits as one row per chunk; not
part of the job's time, and paid once).

Targets (B = 1024, >= 2M transitions): <= 1.15x for Game2048 and CartPole-like, <= 1.4x for
Snake.

On a CPU-only machine XLA's threads and the writer share the cores; to give the rollout cores
of its own, as an accelerator would, run it through ``benchmarks_perf/device_cores.py``.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_record.py
    PYTHONPATH=. python benchmarks_perf/bench_record.py --envs Snake-v1 --repeats 3
    PYTHONPATH=. python benchmarks_perf/device_cores.py 1 benchmarks_perf/bench_record.py
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import statistics
from typing import Any

import jax
from jumanji.wrappers import AutoResetWrapper

import tupli_jax as tj
from benchmarks_perf._envs import ENV_IDS, make_env, prepare, record_once, time_run


def bench_env(
    env_id: str, num_envs: int, steps: int, capacity: int, repeats: int
) -> dict[str, Any]:
    """Unrecorded vs ``tj.record`` for one env."""
    env = make_env(env_id)
    chunks = steps // capacity
    first = record_once(env, num_envs, steps, capacity)
    base = prepare(AutoResetWrapper(env, next_obs_in_extras=True), num_envs, capacity)
    key = jax.random.PRNGKey(1)
    time_run(base, key, chunks)  # warm-up
    unrecorded: list[float] = []
    recorded: list[dict[str, Any]] = []
    for _ in range(repeats):
        unrecorded.append(time_run(base, key, chunks))
        recorded.append(record_once(env, num_envs, steps, capacity))
    rec_s = [r["seconds"] for r in recorded]
    return {
        "first": first,
        "last": recorded[-1],
        "unrecorded": statistics.median(unrecorded),
        "recorded": statistics.median(rec_s),
        "ratio": statistics.median(r / u for r, u in zip(rec_s, unrecorded, strict=True)),
        "best_ratio": min(rec_s) / min(unrecorded),
        "compile": (base.compile_s, statistics.median(r["compile"] for r in recorded)),
    }


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default=",".join(ENV_IDS), help="comma-separated env ids")
    parser.add_argument("--num-envs", type=int, default=1024, help="B")
    parser.add_argument("--transitions", type=int, default=2**21, help="steps taken in total")
    parser.add_argument(
        "--capacity",
        type=int,
        default=inspect.signature(tj.record).parameters["capacity"].default,
        help="steps per chunk (default: tj.record's)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per figure")
    args = parser.parse_args(argv)
    steps = max(args.transitions // args.num_envs // args.capacity, 1) * args.capacity
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "all"
    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"jax {jax.__version__}, devices {jax.devices()}, load average {load:.1f}, "
        f"main thread on cores {cores}"
    )
    print(f"command: {args}; {steps} steps x {args.num_envs} envs = {steps * args.num_envs:,}")
    print(
        "\n| env | episodes | unrecorded | tj.record | ratio | episodes/s "
        "| B/transition (shards / store) | compile s (unrec / record) | first call "
        "| first episode query |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for env_id in [e for e in args.envs.split(",") if e]:
        r = bench_env(env_id, args.num_envs, steps, args.capacity, args.repeats)
        n = steps * args.num_envs
        last = r["last"]
        per = max(last["transitions"], 1)
        print(
            f"| {env_id} | {last['episodes']:,} "
            f"| {r['unrecorded']:.2f} s ({n / r['unrecorded'] / 1e6:.2f}M/s) "
            f"| {r['recorded']:.2f} s ({n / r['recorded'] / 1e6:.2f}M/s) | {r['ratio']:.2f}x "
            f"({r['best_ratio']:.2f}x) "
            f"| {last['episodes'] / r['recorded']:,.0f} "
            f"| {last['shard_bytes'] / per:.1f} / {last['store_bytes'] / per:.1f} "
            f"| {r['compile'][0]:.1f} / {r['compile'][1]:.1f} "
            f"| {r['first']['seconds']:.2f} s + {r['first']['compile']:.1f} s compile "
            f"| {last['index_seconds']:.2f} s |",
            flush=True,
        )


if __name__ == "__main__":
    main()
