"""Gymnasium recording speed: raw env vs pytupli vs Minari vs tupli_jax (same episodes, one run).

Single env: the same seeded CartPole-v1 episodes with the same actions are run through

- the raw gymnasium env (no recording),
- pytupli's ``TupliEnvWrapper`` + pytupli's ``FileStorage``,
- Minari's ``DataCollector`` (``create_dataset`` at the end, in a temporary directory),
- tupli_jax's ``TupliEnvWrapper`` + ``FileStorage`` (``close()`` at the end, so every episode is
  on disk inside the timed region).

Vector envs: CartPole with ``--num-envs`` sub-envs, numpy-vectorised
(``make_vec(..., vectorization_mode="vector_entry_point")``) and ``SyncVectorEnv``, raw vs
recorded with ``TupliVectorEnvWrapper``.

Shard write path: ``--shard-episodes`` CartPole-sized episodes (9-59 steps) written with
``group_by_structure`` + ``write_shard`` (what ``FileStorage.record_episodes`` calls),
``write_shards`` (one walk per episode) and ``write_shard_columns`` (packed columns, no episode
objects), next to the whole ``FileStorage.record_episodes`` (shards + catalog), per episode.

Each figure is the median of ``--repeats`` runs (the recorders are interleaved in each repeat so
that machine noise hits all of them alike). Wall-clock time is the figure; CPU time of this
process is printed next to it because on a shared machine other processes stretch wall time
(CPU time leaves out waiting for fsync, so it flatters the recorders a little). Targets:
tupli_jax <= 1.5x the raw env's time and >= 5x pytupli's speed; vector recording >= 200k
recorded steps/s.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_gym.py --episodes 300 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium
import numpy as np

from tupli_jax.episode import EpisodeData
from tupli_jax.gym import FileStorage, TupliEnvWrapper, TupliVectorEnvWrapper
from tupli_jax.storage.shards import (
    group_by_structure,
    write_shard,
    write_shard_columns,
    write_shards,
)


class TimedFileStorage(FileStorage):
    """``FileStorage`` that adds up the time spent in ``record_episodes`` (the disk writes)."""

    write_s = 0.0

    def record_episodes(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().record_episodes(*args, **kwargs)
        finally:
            TimedFileStorage.write_s += time.perf_counter() - start


def _episodes(env: Any, seeds: list[int], actions: np.ndarray) -> int:
    """Runs one episode per seed, consuming ``actions`` in order; returns the step count."""
    k = 0
    for seed in seeds:
        env.reset(seed=seed)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(actions[k])
            k += 1
            done = terminated or truncated
    return k


@contextlib.contextmanager
def _tmpdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="bench_gym_") as tmp:
        yield Path(tmp)


class _Clock:
    """Wall and CPU time since construction."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def stop(self, steps: int) -> Run:
        return Run(time.perf_counter() - self.wall, time.process_time() - self.cpu, steps)


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run: wall and CPU seconds, and the steps (or episodes) it did."""

    wall: float
    cpu: float
    steps: int


def run_raw(seeds: list[int], actions: np.ndarray) -> Run:
    env = gymnasium.make("CartPole-v1")
    clock = _Clock()
    steps = _episodes(env, seeds, actions)
    return clock.stop(steps)


def run_tupli_jax(seeds: list[int], actions: np.ndarray) -> Run:
    with _tmpdir() as tmp:
        env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), TimedFileStorage(tmp / "store"))
        env.store(name="cartpole-bench")
        clock = _Clock()
        steps = _episodes(env, seeds, actions)
        env.close()  # every episode is on disk
        run = clock.stop(steps)
        assert len(env.storage.list_episodes()) == len(seeds)
    return run


def run_pytupli(seeds: list[int], actions: np.ndarray) -> Run:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper
    from pytupli.storage import FileStorage as PytupliStorage

    logging.getLogger("pytupli").setLevel(logging.WARNING)
    with _tmpdir() as tmp:
        storage = PytupliStorage(str(tmp / "store"))
        env = PytupliWrapper(gymnasium.make("CartPole-v1"), storage)
        env.store(name="cartpole-bench")
        clock = _Clock()
        steps = _episodes(env, seeds, actions)
        run = clock.stop(steps)
        assert len(storage.list_episodes()) == len(seeds)
    return run


def run_minari(seeds: list[int], actions: np.ndarray) -> Run:
    with _tmpdir() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = str(tmp)
        import minari

        # "arrow": the default "hdf5" format needs h5py, which is not installed here.
        env = minari.DataCollector(gymnasium.make("CartPole-v1"), data_format="arrow")
        clock = _Clock()
        steps = _episodes(env, seeds, actions)
        dataset = env.create_dataset(dataset_id="cartpole/bench-v0", algorithm_name="random")
        run = clock.stop(steps)
        assert dataset.total_episodes == len(seeds)
        env.close()
    return run


def run_vector(mode: str, num_envs: int, steps: int, record: bool) -> Run:
    with _tmpdir() as tmp:
        vec = gymnasium.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode=mode)
        env: Any = vec
        if record:
            env = TupliVectorEnvWrapper(
                vec, TimedFileStorage(tmp / "store"), benchmark_env=gymnasium.make("CartPole-v1")
            )
            env.store(name=f"cartpole-vec-{mode}")
        actions = np.random.default_rng(0).integers(0, 2, size=(steps, num_envs))
        env.reset(seed=0)
        clock = _Clock()
        for action in actions:
            env.step(action)
        if record:
            env.close()
        run = clock.stop(steps * num_envs)
    return run


def _median(runs: list[Run]) -> Run:
    wall = statistics.median(r.wall for r in runs)
    cpu = statistics.median(r.cpu for r in runs)
    return Run(wall, cpu, runs[0].steps)


def _cartpole_episodes(n: int, benchmark_id: str) -> list[EpisodeData]:
    """``n`` CartPole-shaped episodes of 9-59 steps (random values)."""
    rng = np.random.default_rng(0)
    episodes = []
    for length in rng.integers(9, 60, n).tolist():
        discounts = np.ones(length, np.float32)
        discounts[-1] = 0.0
        episodes.append(
            EpisodeData(
                observations=rng.standard_normal((length + 1, 4)).astype(np.float32),
                actions=rng.integers(0, 2, length),
                rewards=np.ones(length, np.float64),
                discounts=discounts,
                terminated=True,
                truncated=False,
                benchmark_id=benchmark_id,
            )
        )
    return episodes


def shard_write_costs(n_episodes: int, repeats: int) -> dict[str, Run]:
    """Per-episode cost of the shard write paths and of the whole ``record_episodes``."""
    runs: dict[str, list[Run]] = {}
    with _tmpdir() as tmp:
        store = FileStorage(tmp / "store")
        env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), store, batch_steps=0)
        episodes = _cartpole_episodes(n_episodes, env.store(name="cartpole-shards"))
        columns: dict[str, Any] = {
            "observations": np.concatenate([e.observations for e in episodes]),
            "actions": np.concatenate([e.actions for e in episodes]),
            "rewards": np.concatenate([e.rewards for e in episodes]),
            "discounts": np.concatenate([e.discounts for e in episodes]),
            "n_tuples": np.array([e.length for e in episodes]),
        }

        def grouped() -> None:
            for group in group_by_structure(episodes):
                write_shard(tmp / "a", [episodes[i] for i in group])

        paths: dict[str, Callable[[], object]] = {
            "group_by_structure + write_shard": grouped,
            "write_shards": lambda: write_shards(tmp / "b", episodes),
            "write_shard_columns": lambda: write_shard_columns(tmp / "c", **columns),
            "FileStorage.record_episodes": lambda: store.record_episodes(episodes),
        }
        for _ in range(repeats):
            for name, path in paths.items():
                clock = _Clock()
                path()
                runs.setdefault(name, []).append(clock.stop(n_episodes))
    return {name: _median(r) for name, r in runs.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the benchmark, prints the tables and returns the figures (steps/s by name)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=300, help="CartPole episodes per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per recorder (median)")
    parser.add_argument("--num-envs", type=int, default=64, help="sub-envs of the vector env")
    parser.add_argument("--vector-steps", type=int, default=2000, help="vector steps per run")
    parser.add_argument(
        "--shard-episodes", type=int, default=10_000, help="episodes per shard write (0: skip)"
    )
    parser.add_argument("--skip-minari", action="store_true", help="leave Minari out")
    parser.add_argument("--skip-pytupli", action="store_true", help="leave pytupli out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    seeds = list(range(args.episodes))
    actions = np.random.default_rng(0).integers(0, 2, size=500 * args.episodes)
    single: dict[str, Callable[[list[int], np.ndarray], Run]] = {
        "raw gymnasium": run_raw,
        "tupli_jax TupliEnvWrapper": run_tupli_jax,
    }
    if not args.skip_pytupli:
        single["pytupli TupliEnvWrapper"] = run_pytupli
    if not args.skip_minari:
        single["minari DataCollector"] = run_minari
    runs: dict[str, list[Run]] = {name: [] for name in single}
    write_shares = []
    for _ in range(args.repeats):
        for name, fn in single.items():
            TimedFileStorage.write_s = 0.0
            runs[name].append(fn(seeds, actions))
            if name == "tupli_jax TupliEnvWrapper":
                write_shares.append(TimedFileStorage.write_s / runs[name][-1].wall)
    results = {name: _median(r) for name, r in runs.items()}
    raw = results["raw gymnasium"]
    pyt = results.get("pytupli TupliEnvWrapper")
    figures: dict[str, float] = {}
    print(f"\nCartPole-v1, {args.episodes} episodes, {raw.steps} steps, median of {args.repeats}")
    print(
        f"{'recorder':<28}{'steps/s':>10}{'time vs raw':>13}{'vs pytupli':>12}"
        f"{'| CPU: vs raw':>14}{'vs pytupli':>12}"
    )
    for name, run in results.items():
        assert run.steps == raw.steps, "every recorder must run the same steps"
        vs_pyt = f"{pyt.wall / run.wall:.2f}x" if pyt else "-"
        cpu_vs_pyt = f"{pyt.cpu / run.cpu:.2f}x" if pyt else "-"
        print(
            f"{name:<28}{run.steps / run.wall:>10,.0f}{run.wall / raw.wall:>12.2f}x"
            f"{vs_pyt:>12}{run.cpu / raw.cpu:>13.2f}x{cpu_vs_pyt:>12}"
        )
        figures[name] = run.steps / run.wall
    share = statistics.median(write_shares)
    print(f"tupli_jax: {share:.0%} of its wall time is FileStorage.record_episodes (disk writes)")

    print(f"\nCartPole-v1 vector env, {args.num_envs} sub-envs, {args.vector_steps} steps")
    print(
        f"{'vector env':<20}{'raw steps/s':>13}{'recorded steps/s':>18}{'time vs raw':>13}"
        f"{'disk writes':>13}{'| CPU: rec. steps/s':>21}{'vs raw':>8}"
    )
    for mode, label in (("vector_entry_point", "numpy-vectorised"), ("sync", "SyncVectorEnv")):
        raw_vec = _median(
            [run_vector(mode, args.num_envs, args.vector_steps, False) for _ in range(args.repeats)]
        )
        recorded, shares = [], []
        for _ in range(args.repeats):
            TimedFileStorage.write_s = 0.0
            recorded.append(run_vector(mode, args.num_envs, args.vector_steps, True))
            shares.append(TimedFileStorage.write_s / recorded[-1].wall)
        rec = _median(recorded)
        print(
            f"{label:<20}{raw_vec.steps / raw_vec.wall:>13,.0f}{rec.steps / rec.wall:>18,.0f}"
            f"{rec.wall / raw_vec.wall:>12.2f}x{statistics.median(shares):>13.0%}"
            f"{rec.steps / rec.cpu:>21,.0f}{rec.cpu / raw_vec.cpu:>7.2f}x"
        )
        figures[f"vector {label}"] = rec.steps / rec.wall

    if args.shard_episodes:
        n = args.shard_episodes
        print(f"\nShard write path, {n} CartPole episodes (9-59 steps), median of {args.repeats}")
        print(f"{'path':<36}{'us/episode':>12}{'CPU us/episode':>16}")
        for name, run in shard_write_costs(n, args.repeats).items():
            print(f"{name:<36}{run.wall / n * 1e6:>12.1f}{run.cpu / n * 1e6:>16.1f}")
            figures[f"shard {name} us/episode"] = run.wall / n * 1e6
    return figures


if __name__ == "__main__":
    main()
