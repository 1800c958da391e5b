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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pydantic_core import PydanticSerializationError, to_json

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
    "Documents",
    "document_leaves",
    "normalize_document",
    "normalize_documents",
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


class Documents(NamedTuple):
    """What ``normalize_documents`` computes for a batch of metadata dicts, one entry each.

    Attributes:
        texts: JSON text per document (the catalog's ``metadata`` column).
        dicts: The dict read back from each text (what headers return; fresh objects).
        leaves: ``(path, type, value, k)`` leaf-index rows, ``k`` the document's position.
        inexact: Per document, whether a leaf is ``UNINDEXED`` (rechecked in Python).
    """

    texts: list[str]
    dicts: list[dict[str, Any]]
    leaves: list[tuple[str, int, Any, int]]
    inexact: list[bool]


def _flat_leaves(
    doc: dict[Any, Any], k: int
) -> tuple[list[tuple[str, int, Any, int]], bool] | None:
    """Leaf rows of a flat dict with ``str`` keys and plain scalar values, else ``None``.

    ``scalar_leaf`` inlined for the exact types ``str``, ``int``, ``float``, ``bool`` and
    ``None`` (the hot path of ``record_episodes``: ~0.3 us per key).
    """
    rows: list[tuple[str, int, Any, int]] = []
    inexact = False
    for key, value in doc.items():
        if type(key) is not str:
            return None
        reachable = "." not in key  # a dotted key can never be filtered on: no leaf
        kind = type(value)
        if kind is int:
            leaf = (NUMBER, value) if I64_MIN <= value <= I64_MAX else (UNINDEXED, 0)
        elif kind is str:
            leaf = (TEXT, value) if value.isascii() else scalar_leaf(value)
        elif kind is float:
            leaf = (NUMBER, value) if value == value else (NAN, 0)
        elif kind is bool:
            leaf = (NUMBER, int(value))
        elif value is None:
            leaf = (NULL, 0)
        else:
            return None
        if reachable:
            rows.append((key, leaf[0], leaf[1], k))
            inexact |= leaf[0] == UNINDEXED
    return rows, inexact


def normalize_documents(docs: Sequence[object], what: str) -> Documents:
    """``normalize_document`` + ``document_leaves`` for a batch, with fast paths.

    An empty dict costs no JSON at all; a flat dict with ``str`` keys and plain ``str``, ``int``,
    ``float``, ``bool`` or ``None`` values (the usual episode metadata) is encoded once by
    pydantic-core (5x faster than ``json.dumps``; the same values when read back) and not
    decoded: its read-back dict is a copy of it. Anything else (numpy values, nesting, other key
    types) goes through ``normalize_document``.

    Args:
        docs: The documents (each should be a dict).
        what: Names a document in error messages, formatted with its index, e.g.
            ``"metadata of episode {}"``.

    Returns:
        ``Documents`` with one text, dict and ``inexact`` flag per document, and the leaf rows of
        all documents tagged with the document's index.

    Raises:
        TupliStorageError: A document is not a dict or not JSON-serialisable (its index named).

    Example:
        >>> docs = normalize_documents([{}, {"seed": 3}], "metadata {}")
        >>> docs.texts, docs.leaves
        (['{}', '{"seed":3}'], [('seed', 1, 3, 1)])
    """
    texts: list[str] = []
    dicts: list[dict[str, Any]] = []
    leaves: list[tuple[str, int, Any, int]] = []
    inexact: list[bool] = []
    for k, doc in enumerate(docs):
        flat = _flat_leaves(doc, k) if type(doc) is dict else None
        if flat is not None:
            assert isinstance(doc, dict)
            if doc:
                try:
                    texts.append(to_json(doc).decode())
                except PydanticSerializationError:  # lone surrogates: json escapes them
                    texts.append(json.dumps(doc))
            else:
                texts.append("{}")
            dicts.append(dict(doc))
            leaves += flat[0]
            inexact.append(flat[1])
            continue
        text, read_back = normalize_document(doc, what.format(k))
        found, odd = document_leaves(read_back)
        texts.append(text)
        dicts.append(read_back)
        leaves.extend((*leaf, k) for leaf in found)
        inexact.append(odd)
    return Documents(texts, dicts, leaves, inexact)
