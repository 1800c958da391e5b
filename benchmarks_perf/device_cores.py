"""Runs a benchmark script with XLA's CPU threads on cores of their own: an accelerator stand-in.

On a CPU-only machine the "device" (XLA's CPU client) and the host side of recording (the
writer thread, Arrow's threads, SQLite) share the same cores, and XLA's thread pool uses all of
them: on a 2-core VM the unrecorded CartPole-like rollout even runs ~2x slower on XLA's two
threads than on one, and every millisecond the writer takes slows it down. On a GPU or TPU host
the device leaves the host's cores to the host. This launcher gives the script that layout:

1. it restricts the process to the first ``N`` cores, starts JAX's CPU client (XLA sizes its
   thread pool from that mask, and its threads keep it);
2. it moves the main thread, and so every thread it starts later (``tj.record``'s writer,
   Arrow's pool), to the remaining cores;
3. it runs the script as ``__main__`` with the remaining arguments.

Both sides of a benchmark's ratio (recorded and unrecorded) then run their device part on the
same ``N`` cores, and only the recorded side has host work on the others.

Usage:
    PYTHONPATH=. python benchmarks_perf/device_cores.py 1 benchmarks_perf/bench_record.py
    PYTHONPATH=. python benchmarks_perf/device_cores.py 1 benchmarks_perf/bench_record.py \\
        --envs CartPole --repeats 3
"""

from __future__ import annotations

import os
import runpy
import sys


def split(device_cores: int) -> tuple[list[int], list[int]]:
    """Starts JAX's CPU client on the first ``device_cores`` cores, moves this thread to the rest.

    Must run before anything initialises a JAX backend (importing jumanji does). Returns the
    device cores and the host cores.
    """
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= device_cores < len(cores):
        raise SystemExit(
            f"device cores must be between 1 and {len(cores) - 1} (this process may run on "
            f"{len(cores)} cores), received {device_cores}"
        )
    device, host = cores[:device_cores], cores[device_cores:]
    os.sched_setaffinity(0, device)
    import jax  # after the mask is set: the client's threads inherit it
    import jax._src.xla_bridge as xla_bridge

    if xla_bridge.backends_are_initialized():
        raise SystemExit("a JAX backend was started before the cores were split")
    jax.block_until_ready(jax.jit(lambda x: x + 1)(jax.numpy.zeros(8)))
    os.sched_setaffinity(0, host)
    return device, host


def main(argv: list[str]) -> None:
    """``device_cores.py N SCRIPT [ARGS...]``."""
    if len(argv) < 2 or not argv[0].isdigit():
        raise SystemExit(__doc__)
    device, host = split(int(argv[0]))
    threads = len(os.listdir("/proc/self/task"))
    print(f"device (XLA) on cores {device}; host threads on cores {host}; {threads} threads")
    sys.argv = argv[1:]
    runpy.run_path(argv[1], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
