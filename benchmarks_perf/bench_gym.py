"""Gymnasium recording speed: raw env vs pytupli vs Minari vs tupli_jax (same episodes, one run).

Single env: the same seeded CartPole-v1 episodes (seeds ``0 .. --episodes - 1``) with the same
pre-drawn actions are run through

- ``raw gymnasium``: the env exactly as ``gymnasium.make("CartPole-v1")`` returns it
  (``TimeLimit(OrderEnforcing(PassiveEnvChecker(CartPoleEnv)))``), no recording. The recorded
  paths below wrap this same stack, so gymnasium's own wrappers are on both sides.
- ``raw, serialized``: the same env after ``jsonpickle.encode(env, indent=4, warn=True)`` in
  this process, which is what pytupli's ``store()`` does to the env. On CPython 3.11 reading an
  object's ``__dict__`` (jsonpickle, pickle, ``copy``, ``vars``) materialises its instance dict
  for good, and attribute and method loads on it stop being specialised: CartPole's step then
  runs ~16% more instructions (callgrind). tupli_jax's ``store()`` encodes in a forked child
  (``tupli_jax._isolated``) and leaves the env as it was; this row is pytupli's baseline.
- pytupli's ``TupliEnvWrapper`` + pytupli's ``FileStorage`` (one JSON file per episode);
- Minari's ``DataCollector`` (``create_dataset`` at the end, in a temporary directory; slow, so
  ``--minari-repeats`` runs only);
- tupli_jax's ``TupliEnvWrapper`` + ``FileStorage`` (``close()`` inside the timed region, so
  every episode is on disk, fsynced, when the clock stops).

Vector envs: CartPole with ``--num-envs`` sub-envs, numpy-vectorised
(``make_vec(..., vectorization_mode="vector_entry_point")``) and ``SyncVectorEnv``, raw vs
recorded with ``TupliVectorEnvWrapper`` (``close()`` timed), the same seeded actions.

Shard write path: ``--shard-episodes`` CartPole-sized episodes (9-59 steps) written with
``group_by_structure`` + ``write_shard`` (what ``FileStorage.record_episodes`` calls),
``write_shards`` (one walk per episode) and ``write_shard_columns`` (packed columns, no episode
objects), next to the whole ``FileStorage.record_episodes`` (shards + catalog), per episode.

Every runner is timed ``--repeats`` times, interleaved (each repeat runs every runner once, in a
rotating order, so that machine noise hits all of them alike), each run in a fresh interpreter
(see ``_interleaved``). Printed: median steps/s; time ratios as the median of per-repeat
ratios ("paired", the headline: the machine's speed drifts over seconds, and the runs of one
repeat run back to back), as the ratio of median times, and of the fastest runs ("best": what
the code costs when the shared machine lets it run). Wall-clock time
is the figure; CPU time of the run's process is printed next to it because on a shared machine
other processes stretch wall time (CPU time leaves out waiting for fsync, so it flatters
tupli_jax a little). Targets (issue 4): tupli_jax <= 1.5x the raw env's
time and >= 5x pytupli's speed; vector recording >= 200k recorded steps/s.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_gym.py --episodes 1000 --repeats 7
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium
import jsonpickle
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
    """``FileStorage`` that adds up the time spent writing episodes (``record_episodes`` and
    ``record_episode_batch``: shards, fsyncs, catalog)."""

    write_s = 0.0

    def record_episodes(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().record_episodes(*args, **kwargs)
        finally:
            TimedFileStorage.write_s += time.perf_counter() - start

    def record_episode_batch(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return super().record_episode_batch(*args, **kwargs)
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
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        return Run(wall, cpu, steps, TimedFileStorage.write_s)


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed run: wall and CPU seconds, the steps (or episodes) it did and the seconds of
    it spent in ``TimedFileStorage`` writes."""

    wall: float
    cpu: float
    steps: int
    write_s: float = 0.0


def run_raw(seeds: list[int], actions: np.ndarray) -> Run:
    env = gymnasium.make("CartPole-v1")
    clock = _Clock()
    steps = _episodes(env, seeds, actions)
    return clock.stop(steps)


def run_raw_serialized(seeds: list[int], actions: np.ndarray) -> Run:
    env = gymnasium.make("CartPole-v1")
    jsonpickle.encode(env, indent=4, warn=True)  # what pytupli's store() does to the env
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


def run_vector(mode: str, actions: np.ndarray, record: bool) -> Run:
    """``actions [steps, num_envs]`` through a ``make_vec`` CartPole, raw or recorded."""
    steps, num_envs = actions.shape
    with _tmpdir() as tmp:
        vec = gymnasium.make_vec("CartPole-v1", num_envs=num_envs, vectorization_mode=mode)
        env: Any = vec
        if record:
            env = TupliVectorEnvWrapper(
                vec, TimedFileStorage(tmp / "store"), benchmark_env=gymnasium.make("CartPole-v1")
            )
            env.store(name=f"cartpole-vec-{mode}")
        env.reset(seed=0)
        clock = _Clock()
        for action in actions:
            env.step(action)
        if record:
            env.close()
        run = clock.stop(steps * num_envs)
        if record:
            assert len(env.storage.list_episodes()) > 0
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


def _single(fn: Callable[[list[int], np.ndarray], Run]) -> Callable[[argparse.Namespace], Run]:
    def run(args: argparse.Namespace) -> Run:
        seeds = list(range(args.episodes))
        actions = np.random.default_rng(0).integers(0, 2, size=500 * args.episodes)
        return fn(seeds, actions)

    return run


def _vector(record: bool) -> Callable[[argparse.Namespace], Run]:
    def run(args: argparse.Namespace) -> Run:
        actions = np.random.default_rng(0).integers(0, 2, size=(args.vector_steps, args.num_envs))
        return run_vector(args.vector_mode, actions, record)

    return run


WORKERS: dict[str, Callable[[argparse.Namespace], Run]] = {
    "raw gymnasium": _single(run_raw),
    "raw, serialized": _single(run_raw_serialized),
    "tupli_jax TupliEnvWrapper": _single(run_tupli_jax),
    "pytupli TupliEnvWrapper": _single(run_pytupli),
    "minari DataCollector": _single(run_minari),
    "vector raw": _vector(False),
    "vector recorded": _vector(True),
}
"""The timed runs, each run by ``--worker NAME`` in a fresh interpreter."""


def _spawn(name: str, args: argparse.Namespace, extra: list[str] | None = None) -> Run:
    """Runs worker ``name`` once in a fresh interpreter (see ``_interleaved``)."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        name,
        "--episodes",
        str(args.episodes),
        "--num-envs",
        str(args.num_envs),
        "--vector-steps",
        str(args.vector_steps),
        *(extra or []),
    ]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {name!r} failed:\n{done.stdout}\n{done.stderr}")
    return Run(**json.loads(done.stdout.strip().splitlines()[-1]))


def _interleaved(
    names: list[str],
    args: argparse.Namespace,
    limits: dict[str, int] | None = None,
    extra: list[str] | None = None,
) -> dict[str, list[Run]]:
    """Runs every worker ``args.repeats`` times (``limits`` caps some) in a rotating order,
    each run in a fresh interpreter: CPython's specialising interpreter shares its per-function
    state between all objects in a process, so a serialized env (unspecialised attribute loads)
    would slow down a fresh one run in the same process, and the other way round."""
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for k in range(args.repeats):
        for name in names[k % len(names) :] + names[: k % len(names)]:
            if len(runs[name]) < (limits or {}).get(name, args.repeats):
                runs[name].append(_spawn(name, args, extra))
    return runs


def _ratio(runs: list[Run], base: list[Run], how: str = "paired") -> float:
    """``time(runs) / time(base)``.

    ``"paired"`` (the headline): the median over repeats of the ratio of the two runs of one
    repeat, which ran within seconds of each other; this machine's speed drifts by up to 2x
    over seconds (a shared VM: the same raw CartPole loop takes 0.23-0.58 s from one run to
    the next), and pairing cancels what the two runs of a repeat share. ``"wall"`` /
    ``"cpu"``: ratio of the medians of wall / CPU seconds. ``"best"``: ratio of the fastest
    wall times.
    """
    median = statistics.median
    if how == "paired":
        return median(r.wall / b.wall for r, b in zip(runs, base, strict=False))
    if how == "best":
        return min(r.wall for r in runs) / min(b.wall for b in base)
    return median(getattr(r, how) for r in runs) / median(getattr(b, how) for b in base)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Runs the benchmark, prints the tables and returns the figures (steps/s by name)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=1000, help="CartPole episodes per run")
    parser.add_argument("--repeats", type=int, default=7, help="runs per recorder (median)")
    parser.add_argument("--minari-repeats", type=int, default=1, help="runs of Minari (slow)")
    parser.add_argument("--num-envs", type=int, default=64, help="sub-envs of the vector env")
    parser.add_argument("--vector-steps", type=int, default=2000, help="vector steps per run")
    parser.add_argument(
        "--shard-episodes", type=int, default=10_000, help="episodes per shard write (0: skip)"
    )
    parser.add_argument("--skip-minari", action="store_true", help="leave Minari out")
    parser.add_argument("--skip-pytupli", action="store_true", help="leave pytupli out")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--vector-mode", default="vector_entry_point", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.worker:  # one timed run in this (fresh) interpreter, printed as JSON
        print(json.dumps(dataclasses.asdict(WORKERS[args.worker](args))))
        return {}
    print(f"load average before: {os.getloadavg()}")

    names = ["raw gymnasium", "raw, serialized", "tupli_jax TupliEnvWrapper"]
    if not args.skip_pytupli:
        names.append("pytupli TupliEnvWrapper")
    if not args.skip_minari:
        names.append("minari DataCollector")
    runs = _interleaved(names, args, {"minari DataCollector": args.minari_repeats})
    raw, ser = runs["raw gymnasium"], runs["raw, serialized"]
    pyt = runs.get("pytupli TupliEnvWrapper")
    figures: dict[str, float] = {}
    steps = raw[0].steps
    print(f"\nCartPole-v1, {args.episodes} episodes, {steps} steps, {args.repeats} repeats")
    print("time ratios: paired = median of per-repeat ratios (headline); medians = ratio of")
    print("median times; best = ratio of fastest times; CPU = ratio of median CPU times")
    print(
        f"{'runner':<27}{'steps/s':>9}{'| vs raw: paired':>17}{'medians':>9}{'best':>7}"
        f"{'| vs raw ser.':>14}{'| vs pytupli: paired':>21}{'medians':>9}{'best':>7}"
        f"{'| CPU vs raw':>13}"
    )
    for name, rs in runs.items():
        assert all(r.steps == steps for r in rs), "every runner must run the same steps"
        wall = statistics.median(r.wall for r in rs)
        speed = [f"{_ratio(pyt, rs, how):.2f}x" if pyt else "-" for how in ("paired", "wall")]
        speed.append(f"{_ratio(pyt, rs, 'best'):.2f}x" if pyt else "-")
        print(
            f"{name:<27}{steps / wall:>9,.0f}{_ratio(rs, raw):>16.2f}x"
            f"{_ratio(rs, raw, 'wall'):>8.2f}x{_ratio(rs, raw, 'best'):>6.2f}x"
            f"{_ratio(rs, ser):>13.2f}x{speed[0]:>21}{speed[1]:>9}{speed[2]:>7}"
            f"{_ratio(rs, raw, 'cpu'):>12.2f}x"
        )
        figures[name] = steps / wall
    tj = runs["tupli_jax TupliEnvWrapper"]
    share = statistics.median(r.write_s / r.wall for r in tj)
    print(f"tupli_jax: {share:.0%} of its wall time is FileStorage writes (shards, fsync, catalog)")
    figures["tupli_jax time vs raw"] = _ratio(tj, raw)
    figures["tupli_jax time vs raw, serialized"] = _ratio(tj, ser)
    if pyt:
        figures["tupli_jax speed vs pytupli"] = _ratio(pyt, tj)

    print(f"\nCartPole-v1 vector env, {args.num_envs} sub-envs, {args.vector_steps} steps")
    print(
        f"{'vector env':<20}{'raw steps/s':>13}{'recorded steps/s':>18}{'time vs raw':>13}"
        f"{'disk writes':>13}{'| CPU: rec. steps/s':>21}{'vs raw':>8}"
    )
    for mode, label in (("vector_entry_point", "numpy-vectorised"), ("sync", "SyncVectorEnv")):
        vruns = _interleaved(["vector raw", "vector recorded"], args, extra=["--vector-mode", mode])
        raw_vec, rec = _median(vruns["vector raw"]), _median(vruns["vector recorded"])
        recorded = vruns["vector recorded"]
        print(
            f"{label:<20}{raw_vec.steps / raw_vec.wall:>13,.0f}{rec.steps / rec.wall:>18,.0f}"
            f"{_ratio(recorded, vruns['vector raw'], 'wall'):>12.2f}x"
            f"{statistics.median(r.write_s / r.wall for r in recorded):>13.0%}"
            f"{rec.steps / rec.cpu:>21,.0f}"
            f"{_ratio(recorded, vruns['vector raw'], 'cpu'):>7.2f}x"
        )
        figures[f"vector {label}"] = rec.steps / rec.wall

    if args.shard_episodes:
        n = args.shard_episodes
        print(f"\nShard write path, {n} CartPole episodes (9-59 steps), median of {args.repeats}")
        print(f"{'path':<36}{'us/episode':>12}{'CPU us/episode':>16}")
        for name, run in shard_write_costs(n, args.repeats).items():
            print(f"{name:<36}{run.wall / n * 1e6:>12.1f}{run.cpu / n * 1e6:>16.1f}")
            figures[f"shard {name} us/episode"] = run.wall / n * 1e6
    print(f"\nload average after: {os.getloadavg()}")
    return figures


if __name__ == "__main__":
    main()
