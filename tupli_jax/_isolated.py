"""Running a pure text-producing function in a forked child, so it leaves no trace on this process.

Host-side only. Why: jsonpickle reads the ``__dict__`` of every object it encodes. On CPython
3.11 and 3.12 that replaces the object's inline attribute values with a real dict for the rest
of its life, and every later attribute access on it takes a slower path: storing a Gymnasium
benchmark (``TupliEnvWrapper.store()``, pytupli's too) made each later CartPole ``step`` ~16%
dearer in instructions (callgrind; 10-20% in wall time). Encoding in a fork of the process
leaves the parent's objects as they were; the child sends the text back through a pipe.

A fork is used only where it is safe and cheap: Linux, a single Python thread (no lock another
thread could hold in the child), no JAX backend started (XLA's threads), and not disabled with
the environment variable ``TUPLI_JAX_FORK_ENCODE=0``. Anything else, and any child that raises,
warns or dies, returns ``None``: the caller then runs the function in-process, which gives the
same text, or the real exception and warnings.

Example:
    >>> text = run_in_fork(lambda: "encoded")
    >>> text in ("encoded", None)
    True
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable

__all__ = ["fork_is_safe", "run_in_fork"]

ENV_VAR = "TUPLI_JAX_FORK_ENCODE"


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
        and hasattr(os, "fork")
        and os.environ.get(ENV_VAR, "1") != "0"
        and threading.active_count() == 1
        and not _jax_started()
    )


def _child(fn: Callable[[], str], write_fd: int) -> None:
    """Runs in the child: writes ``fn()``'s UTF-8 bytes and exits 0, or exits 1. Never returns."""
    code = 1
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            text = fn()
        if not caught and isinstance(text, str):
            view = memoryview(text.encode("utf-8", "surrogatepass"))
            while view:
                view = view[os.write(write_fd, view) :]
            code = 0
    except BaseException:  # the parent re-runs fn in-process and sees the real error
        code = 1
    finally:
        os._exit(code)


def run_in_fork(fn: Callable[[], str]) -> str | None:
    """``fn()`` computed in a forked child, or ``None`` if not forked or the child failed.

    ``fn`` must be pure as far as the caller is concerned: whatever it changes happens in the
    child only. The child's warnings count as a failure (so the caller's in-process re-run
    shows them), as does any exception or a result that is not a ``str``.

    Args:
        fn: A function of no arguments that returns text.

    Returns:
        The text, or ``None``: run ``fn`` in-process instead.

    Example:
        >>> run_in_fork(lambda: "x" * 3) in ("xxx", None)
        True
    """
    if not fork_is_safe():
        return None
    read_fd, write_fd = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_fd)
        os.close(write_fd)
        return None
    if pid == 0:  # pragma: no cover - the child; its outcome is checked by the parent
        os.close(read_fd)
        _child(fn, write_fd)
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            data = pipe.read()
        _, status = os.waitpid(pid, 0)
    except BaseException:  # e.g. KeyboardInterrupt while waiting: leave no child behind
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        raise
    if os.waitstatus_to_exitcode(status) != 0:
        return None
    return data.decode("utf-8", "surrogatepass")
