"""Recorder cost on device and with flushing: jumanji rollouts with and without recording.

One run measures, after compilation, ``jit(scan(vmap(step)))`` of a uniform random policy
(with per-episode return/length tracking, as ``tj.record`` does) for each env and batch size:

Device only (no flush; one scan of ``--steps`` steps, outputs blocked on):

- ``unrecorded``: the env in jumanji's ``AutoResetWrapper(next_obs_in_extras=True)`` (the
  recorder resets episodes itself, so the baseline must too);
- ``recorder``: ``tj.RecordingWrapper(env, capacity=steps)`` vmapped by the caller (per-env
  step rows written into the buffer: one scatter per step), buffer filled, never flushed;
- ``time-major``: ``tj.record``'s own chunk (``pipeline._make_chunk``): a recorder without
  step storage whose step rows go into a donated ``[T, B, ...]`` store at the scan's shared
  index (no scatter, no new allocation per chunk); its reset rows stay in the per-env buffer;
- ``flashbax``: the ``unrecorded`` rollout plus ``flashbax.make_trajectory_buffer(...).add`` of
  each step's transition ``{obs, action, reward, discount, last, next_obs}`` (the smallest
  complete record a fixed-layout trajectory buffer allows: with auto-reset, the step's
  observation and the true next observation differ at episode ends, so both are kept).

With flushing to a ``FileStorage`` (``--chunks`` chunks of ``steps / chunks`` steps; a new store
in a temporary directory for every run):

- ``unrecorded, chunked``: the same chunks without recording (the baseline of this part);
- ``tj.record``: the whole job, ``RecordResult.seconds - compile_seconds`` (this includes its
  setup: storing the benchmark, resetting the envs, and the final drain and count);
- ``fetch/write``: a manual loop: run chunk k, ``rec.fetch`` it, then ``rec.write`` chunk k - 1
  on the main thread while the device computes chunk k; the last write ends the timing.

Each figure is the median over ``--repeats`` runs after one warm-up run; the modes are
interleaved inside every repeat. Ratios: the median of per-repeat ratios, then in parentheses the
ratio of the best times (least disturbed by other processes on a shared machine) and the
median time. Compile times (trace + lower + compile of the rollout) are reported separately.

Targets (B = 1024): device only <= 1.05x for Game2048 and <= 1.25x for Snake; with flushing
<= 1.15x for Game2048 and <= 1.4x for Snake.

Usage:
    PYTHONPATH=. python benchmarks_perf/bench_recorder.py
    PYTHONPATH=. python benchmarks_perf/bench_recorder.py --envs Snake-v1 --batch-sizes 1024 \\
        --steps 256 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jumanji.types import TimeStep
from jumanji.wrappers import NEXT_OBS_KEY_IN_EXTRAS, AutoResetWrapper

import tupli_jax as tj
from benchmarks_perf._envs import (
    ENV_IDS,
    Prepared,
    compile_rollout,
    make_env,
    prepare,
    record_once,
    time_run,
)

DEFAULT_STEPS = {1: 4096, 64: 1024, 1024: 256}
DEVICE_MODES = ("unrecorded", "recorder", "time-major", "flashbax")
FLUSH_MODES = ("unrecorded, chunked", "tj.record", "fetch/write")


def _flashbax(env: Any, num_envs: int, length: int) -> tuple[Callable[[], Any], Any]:
    """Flashbax trajectory buffer of ``length`` steps; returns ``(make_empty, hook)``."""
    import flashbax as fbx

    buffer = fbx.make_trajectory_buffer(
        add_batch_size=num_envs,
        sample_batch_size=1,
        sample_sequence_length=1,
        period=1,
        min_length_time_axis=1,
        max_length_time_axis=length,
    )

    def transition(observation: Any, action: Any, ts: TimeStep[Any]) -> dict[str, Any]:
        return {
            "obs": observation,
            "action": action,
            "reward": ts.reward,
            "discount": ts.discount,
            "last": ts.last(),
            "next_obs": ts.extras[NEXT_OBS_KEY_IN_EXTRAS],
        }

    def example() -> dict[str, Any]:
        state, ts = env.reset(jax.random.PRNGKey(0))
        action = env.action_spec.generate_value()
        _, ts = env.step(state, action)
        return transition(ts.observation, action, ts)

    shapes = jax.eval_shape(example)

    def make_empty() -> Any:
        return buffer.init(jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes))

    def hook(buf: Any, observation: Any, action: Any, ts: TimeStep[Any]) -> Any:
        batch = jax.tree.map(lambda x: x[:, None], transition(observation, action, ts))
        return buffer.add(buf, batch)

    return make_empty, hook


def prepare_time_major(env: Any, num_envs: int, steps: int) -> Prepared:
    """``tj.record``'s chunk: same policy and bookkeeping, step rows as scan outputs."""
    from tupli_jax.pipeline import _Carry, _empty_rows, _make_chunk, uniform_policy

    rec = tj.RecordingWrapper(env, capacity=steps)
    rec._keep_step_rows_outside()
    chunk = _make_chunk(rec, uniform_policy(env.action_spec), num_envs, steps)

    def init(key: jax.Array) -> Any:
        key, reset_key = jax.random.split(key)
        state, ts = jax.vmap(rec.reset)(jax.random.split(reset_key, num_envs))
        zeros = jnp.zeros(num_envs, jnp.float32), jnp.zeros(num_envs, jnp.int32)
        return _Carry(state, key, *zeros), ts.observation, _empty_rows(rec, num_envs, steps)

    def run(c: Any) -> tuple[Any, Any]:
        carry, (observation, outs, rows) = chunk(*c)
        return (carry, observation, rows), outs

    return compile_rollout(init, run)


def prepare_device(mode: str, env: Any, num_envs: int, steps: int) -> Prepared:
    """The rollout of one device-only mode."""
    auto = AutoResetWrapper(env, next_obs_in_extras=True)
    if mode == "unrecorded":
        return prepare(auto, num_envs, steps)
    if mode == "recorder":
        return prepare(tj.RecordingWrapper(env, capacity=steps), num_envs, steps)
    if mode == "time-major":
        return prepare_time_major(env, num_envs, steps)
    make_empty, hook = _flashbax(auto, num_envs, steps)
    return prepare(auto, num_envs, steps, extra=make_empty, hook=hook)


class ManualLoop:
    """``rec.fetch`` / ``rec.write`` overlapped by hand (write k - 1 while chunk k computes)."""

    def __init__(self, env: Any, num_envs: int, capacity: int) -> None:
        self.rec = tj.RecordingWrapper(env, capacity=capacity)
        self.capacity = capacity
        self.prepared = prepare(self.rec, num_envs, capacity)

    def time(self, key: jax.Array, chunks: int) -> float:
        """Seconds of ``chunks`` chunks, each stored in a new store (setup not timed)."""
        root = tempfile.mkdtemp(prefix="bench_recorder_")
        try:
            self.rec.storage = tj.FileStorage(root)
            self.rec.store(name="bench")
            carry = jax.block_until_ready(self.prepared.init(key))
            start = time.perf_counter()
            pending = None
            for k in range(chunks):
                carry, _ = self.prepared.run(carry)
                state, fetched = self.rec.fetch(carry.env_state, num_steps=self.capacity)
                carry = carry._replace(env_state=state)
                if pending is not None:  # the device computes chunk k meanwhile
                    self.rec.write(pending, batch_id=f"chunk:{k}")
                pending = fetched
            if pending is not None:
                self.rec.write(pending, batch_id=f"chunk:{chunks}")
            jax.block_until_ready(carry)
            return time.perf_counter() - start
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _ratios(times: dict[str, list[float]], mode: str, base: str) -> tuple[float, float]:
    """Median of per-repeat ratios, and the ratio of the best times."""
    median = statistics.median(t / b for t, b in zip(times[mode], times[base], strict=True))
    return median, min(times[mode]) / min(times[base])


def _fmt(ratio: tuple[float, float], seconds: float) -> str:
    return f"{ratio[0]:.2f}x ({ratio[1]:.2f}x; {seconds * 1e3:.1f} ms)"


def bench_device(env_id: str, num_envs: int, steps: int, repeats: int) -> dict[str, Any]:
    """Device-only figures for one env and batch size."""
    env = make_env(env_id)
    prepared = {m: prepare_device(m, env, num_envs, steps) for m in DEVICE_MODES}
    key = jax.random.PRNGKey(1)
    for p in prepared.values():  # warm-up
        time_run(p, key)
    times: dict[str, list[float]] = {m: [] for m in DEVICE_MODES}
    for _ in range(repeats):
        for mode, p in prepared.items():
            times[mode].append(time_run(p, key))
    return {
        "times": {m: statistics.median(t) for m, t in times.items()},
        "ratios": {m: _ratios(times, m, "unrecorded") for m in DEVICE_MODES[1:]},
        "compile": {m: p.compile_s for m, p in prepared.items()},
    }


def bench_flush(
    env_id: str, num_envs: int, steps: int, chunks: int, repeats: int
) -> dict[str, Any]:
    """Figures with flushing to a FileStorage every chunk, for one env and batch size."""
    env = make_env(env_id)
    capacity = steps // chunks
    steps = capacity * chunks
    base = prepare(AutoResetWrapper(env, next_obs_in_extras=True), num_envs, capacity)
    manual = ManualLoop(env, num_envs, capacity)
    key = jax.random.PRNGKey(1)
    time_run(base, key, chunks)  # warm-up
    manual.time(key, chunks)
    first = record_once(env, num_envs, steps, capacity)
    record_compile, episodes = first["compile"], first["episodes"]
    times: dict[str, list[float]] = {m: [] for m in FLUSH_MODES}
    for _ in range(repeats):
        times["unrecorded, chunked"].append(time_run(base, key, chunks))
        times["tj.record"].append(record_once(env, num_envs, steps, capacity)["seconds"])
        times["fetch/write"].append(manual.time(key, chunks))
    return {
        "capacity": capacity,
        "steps": steps,
        "episodes": episodes,
        "times": {m: statistics.median(t) for m, t in times.items()},
        "ratios": {m: _ratios(times, m, "unrecorded, chunked") for m in FLUSH_MODES[1:]},
        "compile": {"unrecorded": base.compile_s, "tj.record": record_compile},
    }


def _machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"jax {jax.__version__}, devices {jax.devices()}, load average {load[0]:.1f}"
    )


def main(argv: list[str] | None = None) -> None:
    """Runs the benchmark and prints two markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", default=",".join(ENV_IDS), help="comma-separated env ids")
    parser.add_argument("--batch-sizes", default="1,64,1024", help="comma-separated B")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"steps per env per run (default per B: {DEFAULT_STEPS}, else 1024)",
    )
    parser.add_argument("--chunks", type=int, default=8, help="flushes per run (flush part)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure")
    parser.add_argument("--no-flush", action="store_true", help="skip the flushing part")
    args = parser.parse_args(argv)
    envs = [e for e in args.envs.split(",") if e]
    sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    print(_machine())
    print(f"command: {args}")

    print("\n### Device only (no flush)\n")
    print(
        "| env | B | steps | unrecorded | transitions/s | recorder | time-major | flashbax "
        "| compile s (unrec / rec / time-major / fbx) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for env_id in envs:
        for num_envs in sizes:
            steps = args.steps or DEFAULT_STEPS.get(num_envs, 1024)
            r = bench_device(env_id, num_envs, steps, args.repeats)
            t, ratio, c = r["times"], r["ratios"], r["compile"]
            rate = num_envs * steps / t["unrecorded"]
            print(
                f"| {env_id} | {num_envs} | {steps} | {t['unrecorded'] * 1e3:.1f} ms "
                f"| {rate / 1e6:.3f}M | {_fmt(ratio['recorder'], t['recorder'])} "
                f"| {_fmt(ratio['time-major'], t['time-major'])} "
                f"| {_fmt(ratio['flashbax'], t['flashbax'])} "
                f"| {c['unrecorded']:.1f} / {c['recorder']:.1f} / {c['time-major']:.1f} "
                f"/ {c['flashbax']:.1f} |",
                flush=True,
            )
    if args.no_flush:
        return

    print(f"\n### Flushing to FileStorage every chunk ({args.chunks} chunks)\n")
    print(
        "| env | B | steps (chunk) | episodes | unrecorded, chunked | tj.record "
        "| fetch/write | compile s (unrec / record) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for env_id in envs:
        for num_envs in sizes:
            steps = args.steps or DEFAULT_STEPS.get(num_envs, 1024)
            r = bench_flush(env_id, num_envs, steps, args.chunks, args.repeats)
            t, ratio, c = r["times"], r["ratios"], r["compile"]
            print(
                f"| {env_id} | {num_envs} | {r['steps']} ({r['capacity']}) | {r['episodes']} "
                f"| {t['unrecorded, chunked'] * 1e3:.1f} ms "
                f"| {_fmt(ratio['tj.record'], t['tj.record'])} "
                f"| {_fmt(ratio['fetch/write'], t['fetch/write'])} | {c['unrecorded']:.1f} / "
                f"{c['tj.record']:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
