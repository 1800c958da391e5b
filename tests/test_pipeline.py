"""tj.record: the whole job equals a plain-Python reference loop, and resumes exactly once."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jumanji
import numpy as np
import pytest

import tupli_jax as tj
from tupli_jax import _tree, pipeline
from tupli_jax.pipeline import uniform_policy
from tupli_jax.schema import FilterEQ
from tupli_jax.testing import FakeEnv

JOB = Path(__file__).with_name("_record_job.py")


def _canonical(
    observations: Any, actions: Any, rewards: Any, terminated: bool, truncated: bool
) -> bytes:
    digest = hashlib.sha256()
    for group in (observations, actions, rewards):
        for leaf in _tree.flatten(group)[0]:
            leaf = np.ascontiguousarray(leaf)
            digest.update(f"{leaf.dtype}{leaf.shape}".encode())
            digest.update(leaf.tobytes())
    digest.update(bytes([terminated, truncated]))
    return digest.digest()


def stored_episodes(store: tj.FileStorage, benchmark_id: str) -> list[bytes]:
    out = []
    for header in store.list_episodes(FilterEQ(key="benchmark_id", value=benchmark_id)):
        ep = store.load_episode(header.id)
        assert header.n_tuples == ep.length
        out.append(_canonical(ep.observations, ep.actions, ep.rewards, ep.terminated, ep.truncated))
    return sorted(out)


def reference_episodes(
    env: Any, num_envs: int, num_steps: int, seed: int
) -> tuple[list[bytes], int]:
    """Complete episodes of a step-by-step loop over the raw env with manual resets."""
    policy = uniform_policy(env.action_spec)
    reset, step = jax.jit(env.reset), jax.jit(env.step)
    key, reset_key = jax.random.split(jax.random.PRNGKey(seed))
    pairs = [reset(k) for k in jax.random.split(reset_key, num_envs)]
    states = [s for s, _ in pairs]
    observations = [ts.observation for _, ts in pairs]
    running: list[dict[str, list]] = [
        {"obs": [jax.device_get(o)], "act": [], "rew": []} for o in observations
    ]
    episodes, unfinished = [], 0
    for _ in range(num_steps):
        key, act_key = jax.random.split(key)
        act_keys = jax.random.split(act_key, num_envs)
        for i in range(num_envs):
            action = policy(act_keys[i], observations[i])
            states[i], ts = step(states[i], action)
            ep = running[i]
            ep["obs"].append(jax.device_get(ts.observation))
            ep["act"].append(np.asarray(action))
            ep["rew"].append(np.asarray(ts.reward))
            observations[i] = ts.observation
            if bool(ts.last()):
                stack = lambda xs: jax.tree.map(lambda *a: np.stack(a), *xs)  # noqa: E731
                terminated = float(ts.discount) == 0.0
                episodes.append(
                    _canonical(
                        stack(ep["obs"]),
                        np.stack(ep["act"]),
                        np.stack(ep["rew"]),
                        terminated,
                        not terminated,
                    )
                )
                states[i], ts = reset(jax.random.split(states[i].key)[0])
                observations[i] = ts.observation
                running[i] = {"obs": [jax.device_get(ts.observation)], "act": [], "rew": []}
    unfinished = sum(len(ep["act"]) for ep in running)
    return sorted(episodes), unfinished


@pytest.fixture(params=["cut while storing", "one after the other"])
def writer_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of tj.record's writer: cutting chunk k + 1 while storing chunk k, or not."""
    if request.param == "one after the other":
        monkeypatch.setattr(pipeline, "_OVERLAP", False)
    return str(request.param)


@pytest.mark.parametrize("capacity", [16, 7])
def test_record_equals_reference_loop_on_fake_env(tmp_path: Path, capacity: int, writer_mode: str):
    env = FakeEnv(time_limit=9)
    store = tj.FileStorage(tmp_path / "store")
    result = tj.record(
        env, storage=store, num_envs=3, num_steps=40, seed=5, capacity=capacity, progress=False
    )
    expected, unfinished = reference_episodes(env, 3, 40, 5)
    assert stored_episodes(store, result.benchmark_id) == expected
    assert result.num_episodes == len(expected)
    assert result.num_unfinished_steps == unfinished
    assert result.num_transitions + unfinished == 3 * 40
    assert store.verify() == []


def test_record_game2048_counts_and_reference(tmp_path: Path):
    env = jumanji.make("Game2048-v1")
    store = tj.FileStorage(tmp_path / "store")
    with jax.numpy_dtype_promotion("standard"):  # jumanji itself is not strict-promotion clean
        result = tj.record(
            env, storage=store, num_envs=2, num_steps=60, seed=1, capacity=32, progress=False
        )
        expected, unfinished = reference_episodes(env, 2, 60, 1)
    assert stored_episodes(store, result.benchmark_id) == expected
    assert result.num_transitions + result.num_unfinished_steps == 2 * 60
    assert result.num_unfinished_steps == unfinished


class _Writer:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))


def test_writer_receives_every_episode_and_throughput(tmp_path: Path):
    store = tj.FileStorage(tmp_path / "store")
    writer = _Writer()
    result = tj.record(
        FakeEnv(time_limit=6),
        storage=store,
        num_envs=4,
        num_steps=30,
        seed=2,
        capacity=8,
        progress=False,
        writer=writer,
    )
    returns = sorted(v for tag, v, _ in writer.scalars if tag == "episode/return")
    lengths = [v for tag, v, _ in writer.scalars if tag == "episode/length"]
    headers = store.list_episodes(FilterEQ(key="benchmark_id", value=result.benchmark_id))
    assert returns == pytest.approx(sorted(h.episode_return for h in headers))
    assert sorted(lengths) == sorted(h.n_tuples for h in headers)
    throughput = [v for tag, v, _ in writer.scalars if tag == "throughput/transitions_per_s"]
    assert len(throughput) == 4 and all(v > 0 for v in throughput)  # chunks: 8, 8, 8, 6


class _FailingStore(tj.FileStorage):
    """Fails the ``fail_at``-th batch (1-based) like a full disk; counts what it stored."""

    def __init__(self, root: Path, fail_at: int) -> None:
        super().__init__(root)
        self.fail_at, self.calls, self.stored = fail_at, 0, 0

    def record_episode_batch(self, batch: Any, batch_id: str | None = None) -> Any:
        self.calls += 1
        if self.calls == self.fail_at:
            raise OSError(28, "No space left on device")
        headers = super().record_episode_batch(batch, batch_id=batch_id)
        self.stored += len(headers)
        return headers


@pytest.mark.parametrize("fail_at", [1, 3])
def test_a_failing_store_stops_the_job_with_its_error(
    tmp_path: Path, fail_at: int, writer_mode: str
):
    store = _FailingStore(tmp_path / "store", fail_at)
    with pytest.raises(OSError, match="No space left"):
        tj.record(
            FakeEnv(time_limit=5), storage=store, num_envs=3, num_steps=40, seed=3, capacity=4,
            progress=False,
        )  # fmt: skip
    assert store.calls == fail_at  # no batch after the failed one was attempted
    (bench,) = store.list_benchmarks()
    # Exactly the episodes complete within the chunks (4 steps each) stored before the failure.
    expected, _ = reference_episodes(FakeEnv(time_limit=5), 3, 4 * (fail_at - 1), 3)
    stored = stored_episodes(store, bench.id)
    assert stored == expected
    assert len(stored) == store.stored
    assert store.verify() == []


def test_a_failing_cut_stops_the_job_with_its_error(
    tmp_path: Path, writer_mode: str, monkeypatch: pytest.MonkeyPatch
):
    calls = []
    cut = tj.RecordingWrapper._cut

    def failing_cut(self: Any, pending: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("cut failed")
        return cut(self, pending)

    monkeypatch.setattr(tj.RecordingWrapper, "_cut", failing_cut)
    store = tj.FileStorage(tmp_path / "store")
    with pytest.raises(MemoryError, match="cut failed"):
        tj.record(
            FakeEnv(time_limit=5), storage=store, num_envs=3, num_steps=40, seed=3, capacity=4,
            progress=False,
        )  # fmt: skip
    assert len(calls) == 3  # nothing cut after the failure
    (bench,) = store.list_benchmarks()
    expected, _ = reference_episodes(FakeEnv(time_limit=5), 3, 8, 3)  # the 2 chunks cut
    assert stored_episodes(store, bench.id) == expected


def test_bad_arguments_raise(tmp_path: Path):
    store = tj.FileStorage(tmp_path / "store")
    with pytest.raises(ValueError, match="num_envs"):
        tj.record(FakeEnv(), storage=store, num_envs=0, num_steps=3, progress=False)


def _run_job(
    store: Path, ckpt: Path, *extra: str, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(JOB), str(store), str(ckpt), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def _benchmark_episodes(root: Path) -> list[bytes]:
    store = tj.FileStorage(root)
    (bench,) = store.list_benchmarks()
    return stored_episodes(store, bench.id)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    root = tmp_path_factory.mktemp("clean")
    proc = _run_job(root / "store", root / "ckpt")
    assert proc.returncode == 0, proc.stderr
    return _benchmark_episodes(root / "store")


@pytest.mark.parametrize("kill_in", ["checkpoint", "shard", "commit"])
def test_kill_at_a_chosen_point_then_resume_is_exactly_once(
    tmp_path: Path, uninterrupted, kill_in: str
):
    store, ckpt = tmp_path / "store", tmp_path / "ckpt"
    killed = _run_job(store, ckpt, "--kill-in", kill_in, "--kill-at", "3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = _run_job(store, ckpt)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_from_chunk=None" not in resumed.stdout
    assert _benchmark_episodes(store) == uninterrupted
    assert tj.FileStorage(store).verify() == []


def test_kill_at_random_moments_then_resume_is_exactly_once(tmp_path: Path, uninterrupted):
    store, ckpt = tmp_path / "store", tmp_path / "ckpt"
    rng = np.random.default_rng(0)
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(JOB), str(store), str(ckpt)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "JAX_PLATFORMS": "cpu"},
        )
        time.sleep(float(rng.uniform(2.0, 6.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = _run_job(store, ckpt)
    assert final.returncode == 0, final.stderr
    assert _benchmark_episodes(store) == uninterrupted
    assert tj.FileStorage(store).verify() == []


def test_resume_with_other_arguments_is_refused(tmp_path: Path):
    store, ckpt = tmp_path / "store", tmp_path / "ckpt"
    tj.record(
        FakeEnv(),
        storage=tj.FileStorage(store),
        num_envs=2,
        num_steps=10,
        capacity=5,
        checkpoint_dir=ckpt,
        progress=False,
    )
    with pytest.raises(ValueError, match="same num_steps and capacity"):
        tj.record(
            FakeEnv(),
            storage=tj.FileStorage(store),
            num_envs=2,
            num_steps=12,
            capacity=5,
            checkpoint_dir=ckpt,
            progress=False,
        )


def test_uniform_policy_covers_spec_kinds():
    from jumanji import specs

    key = jax.random.PRNGKey(0)
    multi = specs.MultiDiscreteArray(num_values=jnp.array([2, 5]), dtype=jnp.int32)
    values = np.stack([uniform_policy(multi)(k, None) for k in jax.random.split(key, 200)])
    assert values.shape == (200, 2) and values[:, 0].max() == 1 and values[:, 1].max() == 4
    assert values.min() == 0
    bounded = specs.BoundedArray((3,), jnp.float32, -1.0, 2.0)
    floats = np.stack([uniform_policy(bounded)(k, None) for k in jax.random.split(key, 200)])
    assert floats.min() >= -1.0 and floats.max() <= 2.0 and floats.std() > 0.3
    with pytest.raises(TypeError, match="unbounded"):
        uniform_policy(specs.Array((2,), jnp.float32))
