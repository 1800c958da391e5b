"""Metadata documents of the catalog: JSON normalisation and the leaf index rows.

Every node of a header's metadata dict reachable by a dotted filter key is stored as a row
``(path, type, value, owner)`` in a side table; these helpers compute those rows. Host-side only.

Example:
    >>> document_leaves({"seed": 3})
    ([('seed', 1, 3)], False)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from tupli_jax.schema import to_builtin
from tupli_jax.storage.base import TupliStorageError

__all__ = [
    "DICT",
    "I64_MAX",
    "I64_MIN",
    "LIST",
    "NAN",
    "NULL",
    "NUMBER",
    "TEXT",
    "UNINDEXED",
    "document_leaves",
    "normalize_document",
    "scalar_leaf",
]

I64_MIN, I64_MAX = -(2**63), 2**63 - 1

# Leaf types in the metadata side tables. UNINDEXED marks a scalar SQL cannot compare exactly
# (an integer beyond 64 bits, a string that is not valid UTF-8); its owner is flagged ``inexact``
# and rechecked in Python whenever a filter is applied.
NULL, NUMBER, TEXT, LIST, DICT, UNINDEXED, NAN = range(7)


def normalize_document(doc: object, what: str) -> tuple[str, dict[str, Any]]:
    """JSON text of ``doc`` and the dict read back from it (what headers will return).

    numpy values become Python values (``to_builtin``); int, float, bool, str, None, lists and
    dicts keep their types.

    Raises:
        TupliStorageError: ``doc`` is not a dict or not JSON-serialisable.

    Example:
        >>> import numpy as np
        >>> normalize_document({"seed": np.int64(3)}, "metadata")
        ('{"seed": 3}', {'seed': 3})
    """
    if not isinstance(doc, Mapping):
        raise TupliStorageError(f"{what} must be a dict, received {type(doc).__name__}")
    try:
        text = json.dumps(to_builtin(doc))
    except (TypeError, ValueError, RecursionError) as err:
        raise TupliStorageError(
            f"{what} must be JSON-serialisable (dicts, lists, str, int, float, bool, None, numpy "
            f"values): {err}"
        ) from err
    return text, json.loads(text)


def scalar_leaf(value: Any) -> tuple[int, Any]:
    if value is None:
        return NULL, 0
    if isinstance(value, bool):
        return NUMBER, int(value)
    if isinstance(value, int):
        return (NUMBER, value) if I64_MIN <= value <= I64_MAX else (UNINDEXED, 0)
    if isinstance(value, float):
        return (NAN, 0) if math.isnan(value) else (NUMBER, value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return UNINDEXED, 0
        return TEXT, value
    if isinstance(value, list):
        return LIST, 0
    return UNINDEXED, 0


def document_leaves(doc: Mapping[str, Any]) -> tuple[list[tuple[str, int, Any]], bool]:
    """Every node of a JSON document reachable by a dotted filter key, as ``(path, type, value)``.

    A key containing ``'.'`` can never be reached (filter keys split on dots), so it and its
    subtree are left out. Returns the leaves and whether any of them is ``UNINDEXED``.

    Example:
        >>> document_leaves({"a": {"b": 1}, "c.d": 2})
        ([('a', 4, 0), ('a.b', 1, 1)], False)
    """
    leaves: list[tuple[str, int, Any]] = []
    inexact = False

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        nonlocal inexact
        for key, value in node.items():
            if "." in key:
                continue
            path = prefix + key
            if isinstance(value, Mapping):
                leaves.append((path, DICT, 0))
                walk(value, path + ".")
            else:
                kind, stored = scalar_leaf(value)
                inexact |= kind == UNINDEXED
                leaves.append((path, kind, stored))

    walk(doc, "")
    return leaves, inexact
