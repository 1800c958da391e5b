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

Each figure is the median of ``--repeats`` runs (the recorders are interleaved in each repeat so
that machine noise hits all of them alike). Targets: tupli_jax <= 1.5x the raw env's time and
>= 5x pytupli's speed; vector recording >= 200k recorded steps/s.

Usage:
    python benchmarks_perf/bench_gym.py --episodes 300 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
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

from tupli_jax.gym import FileStorage, TupliEnvWrapper, TupliVectorEnvWrapper


class TimedFileStorage(FileStorage):
    """``FileStorage`` that adds up the time spent in ``record_episodes`` (the disk writes)."""

    write_s = 0.0

    def record_episodes(self, episodes: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().record_episodes(episodes)
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


def run_raw(seeds: list[int], actions: np.ndarray) -> tuple[float, int]:
    env = gymnasium.make("CartPole-v1")
    start = time.perf_counter()
    steps = _episodes(env, seeds, actions)
    return time.perf_counter() - start, steps


def run_tupli_jax(seeds: list[int], actions: np.ndarray) -> tuple[float, int]:
    with _tmpdir() as tmp:
        env = TupliEnvWrapper(gymnasium.make("CartPole-v1"), TimedFileStorage(tmp / "store"))
        env.store(name="cartpole-bench")
        start = time.perf_counter()
        steps = _episodes(env, seeds, actions)
        env.close()  # every episode is on disk
        elapsed = time.perf_counter() - start
        assert len(env.storage.list_episodes()) == len(seeds)
    return elapsed, steps


def run_pytupli(seeds: list[int], actions: np.ndarray) -> tuple[float, int]:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper
    from pytupli.storage import FileStorage as PytupliStorage

    logging.getLogger("pytupli").setLevel(logging.WARNING)
    with _tmpdir() as tmp:
        storage = PytupliStorage(str(tmp / "store"))
        env = PytupliWrapper(gymnasium.make("CartPole-v1"), storage)
        env.store(name="cartpole-bench")
        start = time.perf_counter()
        steps = _episodes(env, seeds, actions)
        elapsed = time.perf_counter() - start
        assert len(storage.list_episodes()) == len(seeds)
    return elapsed, steps


def run_minari(seeds: list[int], actions: np.ndarray) -> tuple[float, int]:
    with _tmpdir() as tmp:
        os.environ["MINARI_DATASETS_PATH"] = str(tmp)
        import minari

        # "arrow": the default "hdf5" format needs h5py, which is not installed here.
        env = minari.DataCollector(gymnasium.make("CartPole-v1"), data_format="arrow")
        start = time.perf_counter()
        steps = _episodes(env, seeds, actions)
        dataset = env.create_dataset(dataset_id="cartpole/bench-v0", algorithm_name="random")
        elapsed = time.perf_counter() - start
        assert dataset.total_episodes == len(seeds)
        env.close()
    return elapsed, steps


def run_vector(mode: str, num_envs: int, steps: int, record: bool) -> tuple[float, int]:
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
        start = time.perf_counter()
        for action in actions:
            env.step(action)
        if record:
            env.close()
        elapsed = time.perf_counter() - start
    return elapsed, steps * num_envs


def _median(runs: list[tuple[float, int]]) -> tuple[float, int]:
    return statistics.median(r[0] for r in runs), runs[0][1]


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the benchmark, prints the table and returns the figures (steps/s by name)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=300, help="CartPole episodes per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per recorder (median)")
    parser.add_argument("--num-envs", type=int, default=64, help="sub-envs of the vector env")
    parser.add_argument("--vector-steps", type=int, default=2000, help="vector steps per run")
    parser.add_argument("--skip-minari", action="store_true", help="leave Minari out")
    parser.add_argument("--skip-pytupli", action="store_true", help="leave pytupli out")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")

    seeds = list(range(args.episodes))
    actions = np.random.default_rng(0).integers(0, 2, size=500 * args.episodes)
    single: dict[str, Callable[[list[int], np.ndarray], tuple[float, int]]] = {
        "raw gymnasium": run_raw,
        "tupli_jax TupliEnvWrapper": run_tupli_jax,
    }
    if not args.skip_pytupli:
        single["pytupli TupliEnvWrapper"] = run_pytupli
    if not args.skip_minari:
        single["minari DataCollector"] = run_minari
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in single}
    write_shares = []
    for _ in range(args.repeats):
        for name, fn in single.items():
            TimedFileStorage.write_s = 0.0
            runs[name].append(fn(seeds, actions))
            if name == "tupli_jax TupliEnvWrapper":
                write_shares.append(TimedFileStorage.write_s / runs[name][-1][0])
    results = {name: _median(r) for name, r in runs.items()}
    raw_time, steps = results["raw gymnasium"]
    pyt = results.get("pytupli TupliEnvWrapper")
    figures: dict[str, float] = {}
    print(f"\nCartPole-v1, {args.episodes} episodes, {steps} steps, median of {args.repeats}")
    print(f"{'recorder':<28}{'steps/s':>12}{'time vs raw':>14}{'speed vs pytupli':>18}")
    for name, (elapsed, n) in results.items():
        assert n == steps, "every recorder must run the same steps"
        vs_pyt = f"{pyt[0] / elapsed:.2f}x" if pyt else "-"
        print(f"{name:<28}{n / elapsed:>12,.0f}{elapsed / raw_time:>13.2f}x{vs_pyt:>18}")
        figures[name] = n / elapsed
    share = statistics.median(write_shares)
    print(f"tupli_jax: {share:.0%} of its time is FileStorage.record_episodes (disk writes)")

    print(f"\nCartPole-v1 vector env, {args.num_envs} sub-envs, {args.vector_steps} steps")
    print(
        f"{'vector env':<28}{'raw steps/s':>14}{'recorded steps/s':>18}{'time vs raw':>14}"
        f"{'disk writes':>15}"
    )
    for mode, label in (("vector_entry_point", "numpy-vectorised"), ("sync", "SyncVectorEnv")):
        raw = _median(
            [run_vector(mode, args.num_envs, args.vector_steps, False) for _ in range(args.repeats)]
        )
        recorded, shares = [], []
        for _ in range(args.repeats):
            TimedFileStorage.write_s = 0.0
            recorded.append(run_vector(mode, args.num_envs, args.vector_steps, True))
            shares.append(TimedFileStorage.write_s / recorded[-1][0])
        rec = _median(recorded)
        raw_rate, rec_rate = raw[1] / raw[0], rec[1] / rec[0]
        print(
            f"{label:<28}{raw_rate:>14,.0f}{rec_rate:>18,.0f}{rec[0] / raw[0]:>13.2f}x"
            f"{statistics.median(shares):>15.0%}"
        )
        figures[f"vector {label}"] = rec[1] / rec[0]
    return figures


if __name__ == "__main__":
    main()
