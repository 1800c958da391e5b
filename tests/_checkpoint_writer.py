"""A checkpointing job for tests/test_checkpoint.py, run as a subprocess (not a test module).

Usage:
    python tests/_checkpoint_writer.py run DIR STOP
    python tests/_checkpoint_writer.py torn DIR

``run`` resumes from the latest step in ``DIR`` (checking that it restores exactly what
``expected(step)`` gives; exit status 3 otherwise, printing ``resumed k``), then saves steps
``k + 1 .. STOP - 1`` (or from 0), printing ``saved k`` after each save returns. ``torn`` saves
step 0, then kills itself with SIGKILL halfway through saving step 1.

The saved state is a function of the step alone (``expected``): about 17 MB of device arrays in a
flax dataclass with a NamedTuple, raw uint32 keys, a zero-size leaf, and a host state of a few
hundred small numpy arrays plus JSON values.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np
from flax import struct

import tupli_jax.checkpoint as checkpoint_module
from tupli_jax.checkpoint import Checkpointer

B = 1024


class Obs(NamedTuple):
    """An observation node (as jumanji's)."""

    grid: Any
    pos: Any


@struct.dataclass
class JobState:
    """A job's device state: observations, keys, counters and a zero-size buffer."""

    obs: Obs
    keys: Any
    step: Any
    done: Any
    empty: Any


def expected(step: int) -> tuple[JobState, dict[str, Any]]:
    """The tree and host state that step ``step`` saves (numpy arrays; a function of ``step``)."""
    rng = np.random.default_rng([11, step])
    tree = JobState(
        obs=Obs(
            grid=rng.standard_normal((B, 64, 64), dtype=np.float32),
            pos=rng.integers(0, 64, (B, 2), dtype=np.int32),
        ),
        keys=rng.integers(0, 2**32, (B, 2), dtype=np.uint32),
        step=np.asarray(step, np.int32),
        done=rng.random(B) < 0.5,
        empty=np.zeros((B, 0), np.float32),
    )
    carry = [
        [rng.standard_normal((int(rng.integers(0, 30)), 4)).astype(np.float32) for _ in range(2)]
        for _ in range(200)
    ]
    host = {
        "step": step,
        "carry": carry,
        "episodes": int(rng.integers(0, 10**6)),
        "seed": (step, "seed", np.int64(step * 7)),
        "rate": float(rng.random()),
    }
    return tree, host


def abstract() -> Any:
    """The abstract tree, as a job builds it with ``jax.eval_shape``."""
    return jax.eval_shape(lambda: expected(0)[0])


def same(a: Any, b: Any) -> bool:
    """Exact equality of two host values or trees: types, structure, dtypes, shapes, bytes."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, np.ndarray | jax.Array | np.generic):
        if isinstance(a, np.generic) != isinstance(b, np.generic):
            return False
        x, y = np.asarray(a), np.asarray(b)
        return x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
    return type(a) is type(b) and repr(a) == repr(b)


def same_tree(restored: Any, saved: Any) -> bool:
    """Exact equality of a restored tree and the saved one (structure, dtypes, bytes)."""
    leaves_r, def_r = jax.tree_util.tree_flatten(restored)
    leaves_s, def_s = jax.tree_util.tree_flatten(saved)
    return def_r == def_s and all(
        np.asarray(x).dtype == np.asarray(y).dtype
        and np.asarray(x).shape == np.asarray(y).shape
        and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(leaves_r, leaves_s, strict=True)
    )


def main(argv: list[str]) -> None:
    mode, directory = argv[0], argv[1]
    ckpt = Checkpointer(directory, max_to_keep=2)
    if mode == "run":
        stop = int(argv[2])
        latest = ckpt.latest_step()
        start = 0
        if latest is not None:
            tree, host = ckpt.restore(latest, abstract())
            want_tree, want_host = expected(latest)
            if not (same_tree(tree, want_tree) and same(host, want_host)):
                print(f"step {latest} restored other values than it saved", flush=True)
                raise SystemExit(3)
            print(f"resumed {latest}", flush=True)
            start = latest + 1
        for step in range(start, stop):
            ckpt.save(step, *expected(step))
            print(f"saved {step}", flush=True)
    elif mode == "torn":
        ckpt.save(0, *expected(0))

        def die_halfway(self: Any, directory: Any, args: Any) -> None:
            with open(os.fspath(directory / "arrays.bin"), "wb") as file:
                file.write(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint_module._BlobHandler.save = die_halfway  # type: ignore[method-assign]
        ckpt.save(1, *expected(1))
        raise SystemExit("still alive after SIGKILL")
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    ckpt.close()


if __name__ == "__main__":
    main(sys.argv[1:])
