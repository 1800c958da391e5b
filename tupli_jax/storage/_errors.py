"""``guarded``: raw sqlite, OS, pyarrow and validation errors become ``TupliStorageError``.

Every public method of a store is wrapped, so callers see one error type whose message names the
action and the store.

Example:
    >>> class Store:
    ...     root = "tupli_store"
    ...     @guarded("load the episode")
    ...     def load(self) -> None:
    ...         raise OSError("disk gone")
    >>> try:
    ...     Store().load()
    ... except TupliStorageError as err:
    ...     print(err)
    could not load the episode in store 'tupli_store': OSError: disk gone
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import pyarrow as pa
import pydantic

from tupli_jax.storage.base import TupliStorageError

__all__ = ["guarded"]


class _HasRoot(Protocol):
    @property
    def root(self) -> Any: ...


_S = TypeVar("_S", bound=_HasRoot)
_P = ParamSpec("_P")
_R = TypeVar("_R")
_RAW_ERRORS = (
    sqlite3.Error,
    OSError,
    pa.ArrowException,
    pydantic.ValidationError,
    ValueError,
    TypeError,
    KeyError,
    OverflowError,
    RecursionError,
)


def guarded(
    action: str,
) -> Callable[[Callable[Concatenate[_S, _P], _R]], Callable[Concatenate[_S, _P], _R]]:
    """Turns raw sqlite/OS/pyarrow/validation errors into ``TupliStorageError`` with context."""

    def decorate(fn: Callable[Concatenate[_S, _P], _R]) -> Callable[Concatenate[_S, _P], _R]:
        @functools.wraps(fn)
        def wrapper(self: _S, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            try:
                return fn(self, *args, **kwargs)
            except TupliStorageError:
                raise
            except _RAW_ERRORS as err:
                raise TupliStorageError(
                    f"could not {action} in store '{self.root}': {type(err).__name__}: {err}"
                ) from err

        return wrapper

    return decorate
