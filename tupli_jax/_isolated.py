"""Running a pure text-producing function in a forked child, so it leaves no trace on this process.

Host-side only. Why: jsonpickle reads the ``__dict__`` of every object it encodes. On CPython
3.11 and 3.12 that replaces the object's inline attribute values with a real dict for the rest
of its life, and every later attribute access on it takes a slower path: storing a Gymnasium
benchmark (``TupliEnvWrapper.store()``, pytupli's too) made each later CartPole ``step`` ~16%
dearer in instructions (callgrind; 10-20% in wall time). Encoding in a fork of the process
leaves the parent's objects as they were; the child sends the text back through a pipe.
CPython 3.13 keeps inline values when a ``__dict__`` is read, so there is nothing to avoid.

A fork is used only where it is safe and cheap: Linux, CPython < 3.13, a single Python thread
(no Python-level lock another thread could hold in the child), no JAX backend started (XLA's
thread pools), and not disabled with the environment variable ``TUPLI_JAX_FORK_ENCODE=0``.
Idle native pools (OpenBLAS) are tolerated, as ``multiprocessing``'s fork start method does;
should a native lock still block the child, the parent gives up after ``TIMEOUT_S`` seconds.
Anything else, and any child that raises, warns, dies or times out, gives ``None``: the caller
then runs the function in-process, which gives the same text, or the real error and warnings.
The child gets the parent's ``random`` state (which ``fork`` would reseed) and ignores SIGINT
and SIGTERM (the parent kills it if it is interrupted itself).

Example:
    >>> text = run_in_fork(lambda: "encoded")
    >>> text in ("encoded", None)
    True
"""

from __future__ import annotations

import os
import random
import select
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable

__all__ = ["ENV_VAR", "TIMEOUT_S", "fork_is_safe", "run_in_fork"]

ENV_VAR = "TUPLI_JAX_FORK_ENCODE"
TIMEOUT_S = 60.0
"""Seconds the parent waits for the child's text before killing it (then: in-process)."""

_BLOCKED = {signal.SIGINT, signal.SIGTERM}


def _jax_started() -> bool:
    """Whether a JAX backend (and so its thread pools) exists; ``True`` when unsure."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except Exception:  # a JAX without this function: assume the worst
        return True


def fork_is_safe() -> bool:
    """Whether ``run_in_fork`` would fork now (see the module docstring for the conditions).

    Example:
        >>> isinstance(fork_is_safe(), bool)
        True
    """
    return (
        sys.platform.startswith("linux")
        and sys.version_info < (3, 13)
        and hasattr(os, "fork")
        and os.environ.get(ENV_VAR, "1") != "0"
        and threading.active_count() == 1
        and not _jax_started()
    )


def _child(fn: Callable[[], str], write_fd: int, state: object) -> None:
    """Runs in the child: writes ``fn()``'s UTF-8 bytes and exits 0, or exits 1. Never returns."""
    code = 1
    try:
        random.setstate(state)  # type: ignore[arg-type]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = fn()
        if not caught and isinstance(text, str):
            view = memoryview(text.encode("utf-8", "surrogatepass"))
            while view:
                view = view[os.write(write_fd, view) :]
            code = 0
    finally:
        os._exit(code)


def _fork() -> int:
    """``os.fork()`` with SIGINT and SIGTERM blocked in the child; CPython 3.12's warning about
    forking a process with (idle, native) threads silenced: see the module docstring."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _BLOCKED)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*multi-threaded.*fork", DeprecationWarning)
            pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        raise
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    return pid


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything until EOF, or ``None`` once ``deadline`` (``time.monotonic``) has passed."""
    chunks: list[bytes] = []
    poller = select.poll()
    poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        if not poller.poll(left * 1000):
            continue
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def run_in_fork(fn: Callable[[], str], timeout_s: float = TIMEOUT_S) -> str | None:
    """``fn()`` computed in a forked child, or ``None`` if not forked or the child failed.

    ``fn`` must be pure as far as the caller is concerned: whatever it changes happens in the
    child only. The child's warnings count as a failure (so the caller's in-process re-run
    shows them), as does any exception, a result that is not a ``str``, a child killed by a
    signal, or no answer within ``timeout_s`` seconds (the child is then killed).

    Args:
        fn: A function of no arguments that returns text.
        timeout_s: Seconds to wait for the child.

    Returns:
        The text, or ``None``: run ``fn`` in-process instead.

    Example:
        >>> run_in_fork(lambda: "x" * 3) in ("xxx", None)
        True
    """
    if not fork_is_safe():
        return None
    state = random.getstate()
    read_fd, write_fd = os.pipe()
    try:
        pid = _fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid == 0:  # pragma: no cover - the child; its outcome is checked by the parent
        try:
            os.close(read_fd)
            _child(fn, write_fd, state)
        finally:
            os._exit(1)
    reaped = False
    try:
        os.close(write_fd)
        try:
            data = _read_all(read_fd, time.monotonic() + timeout_s)
        finally:
            os.close(read_fd)
        if data is None:  # no answer in time: a native lock may block the child
            return None
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # reaped by someone else (SIGCHLD ignored or handled)
            reaped = True
            return None
        reaped = True
        if os.waitstatus_to_exitcode(status) != 0:
            return None
        return data.decode("utf-8", "surrogatepass")
    finally:
        if not reaped:  # timed out, or interrupted while waiting: leave no child behind
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
