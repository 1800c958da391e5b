"""Encoding in a forked child (``tupli_jax._isolated``): same text, env objects left untouched.

The fork paths run in fresh interpreters (a pytest worker may have started JAX, which turns
forking off); each script prints one JSON object that the tests check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tupli_jax import _isolated

ROOT = Path(__file__).resolve().parents[1]

# Stores a CartPole benchmark through the wrapper, then reports which env objects had their
# ``__dict__`` materialised (seen through gc.get_referents, which does not materialise it), and
# whether the stored text and hash equal an in-process encoding made afterwards.
STORE_SCRIPT = """
import gc, json, sys, tempfile
import gymnasium
from tupli_jax import benchmark as b
from tupli_jax.gym import FileStorage, TupliEnvWrapper
from tupli_jax.schema import BenchmarkMetadata

def materialised(obj, key):
    return any(type(r) is dict and key in r for r in gc.get_referents(obj))

env = gymnasium.make("CartPole-v1")
env.reset(seed=3)
storage = FileStorage(tempfile.mkdtemp())
wrapper = TupliEnvWrapper(env, storage)
forked = b._isolated.fork_is_safe()
bid = wrapper.store(name="cp", metadata={"k": 1})
chain, e = [], env
while hasattr(e, "env"):
    chain.append(materialised(e, "env"))
    e = e.env
chain.append(materialised(e, "gravity"))
stored = storage.load_benchmark(bid)
meta = BenchmarkMetadata(name="cp", description="", difficulty=None, version=None,
                         extra={"k": 1})  # as store() builds it (same fields set)
print(json.dumps({
    "forked": forked,
    "materialised": chain,
    "same_text": stored.serialized == b._encode_here(env, indent=4, warn=True),
    "hash_in_process": __import__("hashlib").sha256(
        b._encode_here([env, meta], indent=None, warn=False).encode()).hexdigest() == stored.hash,
}))
"""

# run_in_fork's contract, checked in a fresh single-threaded interpreter.
CONTRACT_SCRIPT = r"""
import json, os, random, signal, threading, warnings
from tupli_jax._isolated import fork_is_safe, run_in_fork

seen = []
def side_effect():
    seen.append(1)
    return "done"

def warns():
    warnings.warn("careful")
    return "text"

def raises():
    raise ValueError("boom")

big = "\u00e9\u4e2d\ud800" + "x" * 3_000_000
out = {
    "safe": fork_is_safe(),
    "big": run_in_fork(lambda: big) == big,
    "side_effect": [run_in_fork(side_effect), seen],
    "warns": run_in_fork(warns),
    "raises": run_in_fork(raises),
    "not_str": run_in_fork(lambda: b"bytes"),
}
stop = threading.Event()
worker = threading.Thread(target=stop.wait)
worker.start()
out["with_thread"] = [fork_is_safe(), run_in_fork(lambda: "t")]
stop.set()
worker.join()
out["after_thread"] = run_in_fork(lambda: "t")

# A lock held by a thread that threading does not count (as a native pool's could be): the
# child blocks on it forever; the parent gives up after the timeout and kills the child.
import _thread, time
lock = _thread.allocate_lock()
lock.acquire()
_thread.start_new_thread(lambda: (time.sleep(30), lock.release()), ())
def blocked():
    with lock:
        return "never"
start = time.monotonic()
out["timeout"] = [run_in_fork(blocked, timeout_s=1.0), round(time.monotonic() - start)]

# The child gets this process's global random state (fork would reseed it).
random.seed(5)
expected = random.random()
random.seed(5)
out["random"] = [run_in_fork(lambda: repr(random.random())), repr(expected)]

# A child killed by a signal; children reaped by someone else (SIGCHLD ignored).
out["killed"] = run_in_fork(lambda: os.kill(os.getpid(), signal.SIGKILL) or "x")
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
out["sigchld_ignored"] = run_in_fork(lambda: "y")
signal.signal(signal.SIGCHLD, signal.SIG_DFL)
out["after"] = run_in_fork(lambda: "z")
out["zombies"] = [p for p in os.listdir("/proc") if p.isdigit()
                  and open(f"/proc/{p}/stat").read().split()[3] == str(os.getpid())]

import jax.numpy as jnp
jnp.zeros(1).block_until_ready()
out["with_jax"] = [fork_is_safe(), run_in_fork(lambda: "j")]
print(json.dumps(out))
"""


def _run(script: str, **env: str) -> dict[str, Any]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environ,
        check=True,
        timeout=300,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or sys.version_info >= (3, 13),
    reason="forks on Linux with CPython < 3.13 only",
)


@linux_only
def test_store_leaves_the_env_objects_untouched_and_stores_the_in_process_text() -> None:
    out = _run(STORE_SCRIPT)
    assert out["forked"] is True
    assert out["materialised"] == [False] * len(out["materialised"])
    assert len(out["materialised"]) >= 2  # wrappers and the CartPoleEnv itself
    assert out["same_text"] is True
    assert out["hash_in_process"] is True


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="detector for CPython 3.11-3.12")
def test_without_the_fork_the_encoding_materialises_the_dicts() -> None:
    """The detector of the test above sees the effect the fork avoids."""
    out = _run(STORE_SCRIPT, TUPLI_JAX_FORK_ENCODE="0")
    assert out["forked"] is False
    assert all(out["materialised"])
    assert out["same_text"] is True
    assert out["hash_in_process"] is True


@linux_only
def test_run_in_fork_contract() -> None:
    out = _run(CONTRACT_SCRIPT)
    assert out["safe"] is True
    assert out["big"] is True  # 3 MB through the pipe, non-ASCII and a lone surrogate intact
    assert out["side_effect"] == ["done", []]  # the child's changes stay in the child
    assert out["warns"] is None and out["raises"] is None and out["not_str"] is None
    assert out["with_thread"] == [False, None]
    assert out["after_thread"] == "t"
    assert out["timeout"][0] is None and out["timeout"][1] < 10  # gave up after ~1 s
    assert out["random"][0] == out["random"][1]
    assert out["killed"] is None
    assert out["sigchld_ignored"] is None  # status unknown: the caller encodes in-process
    assert out["after"] == "z"
    assert out["zombies"] == []  # every child was reaped (the timed-out one killed first)
    assert out["with_jax"] == [False, None]


@pytest.fixture
def forkable(monkeypatch: pytest.MonkeyPatch) -> None:
    """This worker may have started JAX already (which turns forking off): pretend it has not,
    and check that forking is on, so the tests below see only the condition they change."""
    monkeypatch.setattr(_isolated, "_jax_started", lambda: False)
    monkeypatch.delenv(_isolated.ENV_VAR, raising=False)
    if threading.active_count() != 1:
        pytest.skip("this worker runs other threads")
    assert _isolated.fork_is_safe() is True


@linux_only
@pytest.mark.usefixtures("forkable")
def test_disabled_by_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_isolated.ENV_VAR, "0")
    assert _isolated.fork_is_safe() is False
    assert _isolated.run_in_fork(lambda: "x") is None


@linux_only
@pytest.mark.usefixtures("forkable")
def test_a_running_thread_turns_forking_off() -> None:
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert _isolated.fork_is_safe() is False
        assert _isolated.run_in_fork(lambda: "x") is None
    finally:
        stop.set()
        worker.join()
