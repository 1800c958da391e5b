"""Storage speed and size: tupli_jax ``FileStorage`` vs pytupli's ``FileStorage``, one run.

Both stores receive the same seeded gymnasium CartPole-v1 episodes (random actions):

1. **Writes and bytes**: ``--write-episodes`` episodes written by pytupli (``record_episode``,
   one JSON file each), by tupli_jax one at a time (``record_episode``, one shard each) and by
   tupli_jax in one ``record_episodes`` batch; episodes/s and bytes on disk per transition
   (raw: 16 B observation + 1 B action + 4 B reward + 2 B flags = 23 B).
2. **Listing with a filter** at ``--sizes`` stored episodes: a selective filter
   ``FilterEQ("benchmark_id", b) & FilterEQ("metadata.seed", k)`` (1 match) and a range filter
   ``FilterGEQ("metadata.seed", lo) & FilterLT("metadata.seed", lo + 100)`` (100 matches).
   Listing cost does not depend on episode length, so these stores hold tiny episodes (the
   first ``--tiny-steps`` steps of the CartPole episodes), written in ``--batch``-episode
   ``record_episodes`` calls; pytupli gets the same episodes, one ``record_episode`` each, as
   long as its predicted time for the next size stays under ``--pytupli-budget`` seconds.
3. **Dataset load**: ``TupliDataset(store).to_numpy()`` on ``--load-episodes`` full CartPole
   episodes (the generated pool, cycled), cold (first call: catalog query, shard read,
   checksum and decode) and warm (repeated calls: the gathers only); pytupli's
   ``TupliDataset.load()`` + ``convert_to_tensors()`` and tupli_jax's ``to_numpy()`` on the
   ``--write-episodes`` store.

Figures are medians of ``--repeats`` runs (best of them in brackets where it matters), in
transitions (steps) per second unless said otherwise. The machine may be shared: compare figures
of one run only.

Usage:
    python benchmarks_perf/bench_storage.py                      # full run (minutes)
    python benchmarks_perf/bench_storage.py --sizes 1000,10000 --load-episodes 20000  # quick
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

from tupli_jax.dataset import TupliDataset
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery, FilterEQ, FilterGEQ, FilterLT
from tupli_jax.storage.file_storage import FileStorage
from tupli_jax.storage.shards import clear_shard_cache

RAW_BYTES = 23  # 4 x float32 observation + 1 B action + float32 reward + 2 flag bytes
N_BENCHMARKS = 10


# ------------------------------------------------------------------------------------------------
# Episodes


def cartpole_pool(n_episodes: int, seed: int) -> list[dict[str, Any]]:
    """``n_episodes`` CartPole-v1 episodes with seeded random actions, as plain arrays."""
    env = gymnasium.make("CartPole-v1")
    env.action_space.seed(seed)
    pool = []
    for k in range(n_episodes):
        obs, _ = env.reset(seed=seed + k)
        observations, actions, rewards = [obs], [], []
        terminated = truncated = False
        while not (terminated or truncated):
            action = env.action_space.sample()
            obs, reward, terminated, truncated, _ = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(reward)
        pool.append(
            {
                "observations": np.asarray(observations, np.float32),
                "actions": np.asarray(actions, np.int64),
                "rewards": np.asarray(rewards, np.float32),
                "terminated": bool(terminated),
                "truncated": bool(truncated),
            }
        )
    env.close()
    return pool


def episode_data(
    raw: dict[str, Any], bench: str, metadata: dict[str, Any], steps: int | None = None
) -> EpisodeData:
    """A tupli_jax episode (reset observation included), optionally cut to ``steps`` steps."""
    n = len(raw["rewards"]) if steps is None else min(steps, len(raw["rewards"]))
    cut = n < len(raw["rewards"])
    terminated = raw["terminated"] and not cut
    discounts = np.ones(n, np.float32)
    discounts[-1] = 0.0 if terminated else 1.0
    return EpisodeData(
        observations=raw["observations"][: n + 1],
        actions=raw["actions"][:n],
        rewards=raw["rewards"][:n],
        discounts=discounts,
        terminated=terminated,
        truncated=raw["truncated"] or cut,
        metadata=metadata,
        benchmark_id=bench,
    )


def pytupli_episode(
    raw: dict[str, Any], bench: str, metadata: dict[str, Any], steps: int | None = None
) -> Any:
    """The same episode in pytupli's tuple form (``state`` = observation after each step)."""
    from pytupli.schema import Episode, RLTuple

    n = len(raw["rewards"]) if steps is None else min(steps, len(raw["rewards"]))
    cut = n < len(raw["rewards"])
    tuples = [
        RLTuple(
            state=raw["observations"][t + 1].tolist(),
            action=int(raw["actions"][t]),
            reward=float(raw["rewards"][t]),
            info={},
            terminal=bool(raw["terminated"] and not cut) and t == n - 1,
            timeout=bool(raw["truncated"] or cut) and t == n - 1,
        )
        for t in range(n)
    ]
    return Episode(benchmark_id=bench, metadata=metadata, tuples=tuples)


# ------------------------------------------------------------------------------------------------
# Helpers


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, float, Any]:
    """(median seconds, best seconds, last result) of ``repeats`` calls."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), result


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tupli_store(path: Path) -> tuple[FileStorage, list[str]]:
    store = FileStorage(path)
    benches = [
        store.store_benchmark(
            BenchmarkQuery(
                hash=f"cartpole-{i}", serialized="{}", metadata=BenchmarkMetadata(name=f"b{i}")
            )
        ).id
        for i in range(N_BENCHMARKS)
    ]
    return store, benches


def pytupli_store(path: Path) -> tuple[Any, list[str]]:
    from pytupli.schema import BenchmarkMetadata as PMeta
    from pytupli.schema import BenchmarkQuery as PQuery
    from pytupli.storage import FileStorage as PytupliFileStorage

    store = PytupliFileStorage(storage_base_dir=str(path))
    benches = [
        store.store_benchmark(
            PQuery(hash=f"cartpole-{i}", serialized="{}", metadata=PMeta(name=f"b{i}"))
        ).id
        for i in range(N_BENCHMARKS)
    ]
    return store, benches


def metadata(k: int) -> dict[str, Any]:
    return {"seed": k, "policy": "random"}


def fmt_rate(value: float) -> str:
    if value >= 1e6:
        return f"{value / 1e6:.1f}M"
    if value >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:.0f}"


def table(header: Sequence[str], rows: list[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# 1. writes and bytes


def bench_writes(pool: list[dict[str, Any]], work: Path, n_episodes: int) -> tuple[str, Path, Any]:
    raws = [pool[k % len(pool)] for k in range(n_episodes)]
    transitions = sum(len(r["rewards"]) for r in raws)
    rows = []

    pstore, pbenches = pytupli_store(work / "write_pytupli")
    episodes = [
        pytupli_episode(r, pbenches[k % N_BENCHMARKS], metadata(k)) for k, r in enumerate(raws)
    ]
    start = time.perf_counter()
    for ep in episodes:
        pstore.record_episode(ep)
    elapsed = time.perf_counter() - start
    size = tree_bytes(work / "write_pytupli" / "episodes")
    rows.append(("pytupli, record_episode", elapsed, size))

    store, benches = tupli_store(work / "write_single")
    datas = [episode_data(r, benches[k % N_BENCHMARKS], metadata(k)) for k, r in enumerate(raws)]
    start = time.perf_counter()
    for ep in datas:
        store.record_episode(ep)
    elapsed = time.perf_counter() - start
    rows.append(("tupli_jax, record_episode", elapsed, tree_bytes(store.root / "shards")))
    store.close()

    store, benches = tupli_store(work / "write_batch")
    datas = [episode_data(r, benches[k % N_BENCHMARKS], metadata(k)) for k, r in enumerate(raws)]
    start = time.perf_counter()
    store.record_episodes(datas)
    elapsed = time.perf_counter() - start
    rows.append(
        ("tupli_jax, record_episodes (one batch)", elapsed, tree_bytes(store.root / "shards"))
    )
    store.close()  # checkpoints the WAL into catalog.sqlite
    catalog = sum(p.stat().st_size for p in store.root.glob("catalog.sqlite*"))

    out = [
        (
            name,
            f"{n_episodes / elapsed:,.0f}",
            fmt_rate(transitions / elapsed),
            f"{size / transitions:.1f}",
            f"{size / transitions / RAW_BYTES:.2f}x",
        )
        for name, elapsed, size in rows
    ]
    text = (
        f"{n_episodes} CartPole episodes, {transitions} transitions; bytes = episode files "
        f"(pytupli) or shards (tupli_jax); the tupli_jax catalog adds "
        f"{catalog / n_episodes:.0f} B per episode ({catalog / transitions:.1f} B/transition)\n\n"
        + table(
            ["writer", "episodes/s", "transitions/s", "B/transition", "vs raw 23 B"],
            out,
        )
    )
    return text, work / "write_batch", pstore


# ------------------------------------------------------------------------------------------------
# 2. listing with filters


def bench_listing(
    pool: list[dict[str, Any]],
    work: Path,
    sizes: list[int],
    batch: int,
    tiny_steps: int,
    repeats: int,
    pytupli_budget: float,
) -> str:
    from pytupli.schema import FilterEQ as PFilterEQ
    from pytupli.schema import FilterGEQ as PFilterGEQ
    from pytupli.schema import FilterLT as PFilterLT

    store, benches = tupli_store(work / "list_tupli")
    pstore, pbenches = pytupli_store(work / "list_pytupli")
    stored = pstored = 0
    p_write_per_episode = p_list_per_episode = 0.0  # pytupli seconds, measured at the last size
    p_repeats = max(1, min(repeats, 3))
    pytupli_alive = True
    rows = []
    for size in sorted(sizes):
        start = time.perf_counter()
        while stored < size:
            n = min(batch, size - stored)
            store.record_episodes(
                [
                    episode_data(pool[k % len(pool)], benches[k % N_BENCHMARKS], metadata(k),
                                 tiny_steps)
                    for k in range(stored, stored + n)
                ]
            )  # fmt: skip
            stored += n
        write_s = time.perf_counter() - start
        k = size // 2 + 3  # a seed in the middle of the store
        bench_k = k % N_BENCHMARKS
        lo = size // 3
        selective = FilterEQ(key="benchmark_id", value=benches[bench_k]) & FilterEQ(
            key="metadata.seed", value=k
        )
        ranged = FilterGEQ(key="metadata.seed", value=lo) & FilterLT(
            key="metadata.seed", value=lo + 100
        )
        sel_med, sel_best, found = timed(lambda f=selective: store.list_episodes(f), repeats)
        assert len(found) == 1, len(found)
        rng_med, rng_best, found = timed(lambda f=ranged: store.list_episodes(f), repeats)
        assert len(found) == min(100, size - lo), len(found)
        row = [
            f"{size:,}",
            f"{sel_med * 1e3:.2f} ({sel_best * 1e3:.2f})",
            f"{rng_med * 1e3:.2f} ({rng_best * 1e3:.2f})",
            f"{write_s:.1f}",
        ]
        predicted = (size - pstored) * p_write_per_episode + 2 * p_repeats * size * (
            p_list_per_episode
        )
        pytupli_alive = pytupli_alive and predicted < pytupli_budget
        if pytupli_alive:
            start = time.perf_counter()
            for j in range(pstored, size):
                pstore.record_episode(
                    pytupli_episode(pool[j % len(pool)], pbenches[j % N_BENCHMARKS], metadata(j),
                                    tiny_steps)
                )  # fmt: skip
            pwrite = time.perf_counter() - start
            p_write_per_episode = pwrite / (size - pstored)
            pstored = size
            pselective = PFilterEQ(key="benchmark_id", value=pbenches[bench_k]) & PFilterEQ(
                key="metadata.seed", value=k
            )
            pranged = PFilterGEQ(key="metadata.seed", value=lo) & PFilterLT(
                key="metadata.seed", value=lo + 100
            )
            psel, _, found = timed(lambda f=pselective: pstore.list_episodes(f), p_repeats)
            assert len(found) == 1
            prng, _, found = timed(lambda f=pranged: pstore.list_episodes(f), p_repeats)
            assert len(found) == min(100, size - lo)
            p_list_per_episode = max(psel, prng) / size
            row += [f"{psel * 1e3:.0f}", f"{prng * 1e3:.0f}", f"{pwrite:.1f}"]
            row += [f"{psel / sel_med:,.0f}x"]
        else:
            row += [f"skipped (predicted {predicted:.0f} s)"] + [""] * 3
        rows.append(row)
        print(f"  listing at {size:,} episodes done", flush=True)
    store.close()
    return (
        f"tiny episodes ({tiny_steps} CartPole steps), {N_BENCHMARKS} benchmarks; list_episodes "
        "time in ms, median (best) of the repeats; write = seconds to add the episodes since the "
        "previous size\n\n"
        + table(
            [
                "episodes",
                "tupli_jax selective ms",
                "tupli_jax range ms",
                "tupli_jax write s",
                "pytupli selective ms",
                "pytupli range ms",
                "pytupli write s",
                "pytupli / tupli_jax (selective)",
            ],
            rows,
        )
    )


# ------------------------------------------------------------------------------------------------
# 3. dataset load


def bench_load(
    pool: list[dict[str, Any]],
    work: Path,
    n_episodes: int,
    batch: int,
    repeats: int,
    small_store: Path,
    pstore: Any,
) -> str:
    from pytupli.dataset import TupliDataset as PytupliDataset

    store, benches = tupli_store(work / "load_tupli")
    start = time.perf_counter()
    for first in range(0, n_episodes, batch):
        store.record_episodes(
            [
                episode_data(pool[k % len(pool)], benches[k % N_BENCHMARKS], metadata(k))
                for k in range(first, min(n_episodes, first + batch))
            ]
        )
    write_s = time.perf_counter() - start
    rows = []

    def measure(name: str, target: FileStorage) -> None:
        clear_shard_cache()
        dataset = TupliDataset(target)
        start = time.perf_counter()
        data = dataset.to_numpy()
        cold = time.perf_counter() - start
        n = len(data["rewards"])
        del data
        locate = timed(lambda: target._episode_locations(None), 1)[0]
        warm_med, warm_best, _ = timed(dataset.to_numpy, repeats)
        rows.append(
            (
                name,
                f"{n:,}",
                f"{fmt_rate(n / cold)} ({locate:.2f} s catalog query)",
                f"{fmt_rate(n / warm_med)} ({fmt_rate(n / warm_best)})",
            )
        )

    measure(f"tupli_jax to_numpy, {n_episodes:,} episodes", store)
    small = FileStorage(small_store)
    measure("tupli_jax to_numpy, the write store", small)
    small.close()

    logging.getLogger("pytupli").setLevel(logging.WARNING)

    def pytupli_load() -> tuple[Any, ...]:
        dataset = PytupliDataset(pstore)
        dataset.load()
        return tuple(dataset.convert_to_tensors())

    med, best, arrays = timed(pytupli_load, max(1, min(repeats, 3)))
    n = len(arrays[2])
    rows.append(
        ("pytupli load + convert_to_tensors, the write store", f"{n:,}", "", f"{fmt_rate(n / med)} "
         f"({fmt_rate(n / best)})")
    )  # fmt: skip
    store.close()
    return (
        f"transitions/s; cold = first call after clearing the shard cache (the OS page cache is "
        f"warm); warm = repeated calls, median (best). The {n_episodes:,}-episode store took "
        f"{write_s:.1f} s to write in batches of {batch:,}\n\n"
        + table(["what", "transitions", "cold", "warm"], rows)
    )


# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000",
                        help="store sizes (episodes) for the listing benchmark")  # fmt: skip
    parser.add_argument("--pool", type=int, default=2000, help="distinct CartPole episodes")
    parser.add_argument("--write-episodes", type=int, default=1000)
    parser.add_argument("--load-episodes", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=100_000, help="episodes per record_episodes")
    parser.add_argument("--tiny-steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pytupli-budget", type=float, default=60.0,
                        help="seconds pytupli may take at one listing size")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument("--skip", default="", help="comma list of: writes,listing,load")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    skip = set(args.skip.split(","))

    work = Path(tempfile.mkdtemp(prefix="bench_storage_", dir=args.workdir))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}; work dir {work}", flush=True)  # fmt: skip
    try:
        start = time.perf_counter()
        pool = cartpole_pool(args.pool, args.seed)
        steps = sum(len(p["rewards"]) for p in pool)
        elapsed = time.perf_counter() - start
        print(f"pool: {len(pool)} CartPole-v1 episodes, {steps} steps, mean length "
              f"{steps / len(pool):.1f} ({elapsed:.1f} s)\n", flush=True)  # fmt: skip
        writes, small_store, pstore = bench_writes(pool, work, args.write_episodes)
        if "writes" not in skip:
            print("## Writes and bytes on disk\n\n" + writes + "\n", flush=True)
        if "listing" not in skip:
            listing = bench_listing(
                pool, work, sizes, args.batch, args.tiny_steps, args.repeats, args.pytupli_budget
            )
            print("## Listing with a filter\n\n" + listing + "\n", flush=True)
        if "load" not in skip:
            load = bench_load(
                pool, work, args.load_episodes, args.batch, args.repeats, small_store, pstore
            )
            print("## Dataset load\n\n" + load + "\n", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
