"""A JSON-serialisable pytree codec (host side, numpy only).

Shards and the catalog must describe observation/action structures in plain JSON, readable by any
process, without pickling and without importing user code. ``flatten`` turns a pytree of arrays
into a list of numpy leaves plus a ``TreeSpec`` (a JSON-serialisable dict); ``unflatten`` rebuilds
the tree. Leaf order equals ``jax.tree_util.tree_leaves`` order (dict keys sorted, NamedTuple
fields in declaration order, ``None`` an empty node), so columns written here line up with what
JAX code sees.

Spec nodes (``"kind"``):

- ``"leaf"``: an array-like value; with ``leading_axis=True`` also ``"dtype"`` (numpy name) and
  ``"shape"`` (per-row shape, the leading axis removed).
- ``"none"``: ``None`` (no leaves).
- ``"dict"``: ``"keys"`` (sorted ``str`` keys; an ``OrderedDict`` keeps its order, as in jax)
  and ``"children"``.
- ``"list"`` / ``"tuple"``: ``"children"``.
- ``"namedtuple"``: ``"module"``, ``"qualname"``, ``"fields"`` and ``"children"``.

Example:
    >>> import numpy as np
    >>> leaves, spec = flatten({"b": np.zeros(3), "a": (np.ones(2), None)})
    >>> [leaf.tolist() for leaf in leaves]
    [[1.0, 1.0], [0.0, 0.0, 0.0]]
    >>> leaf_names(spec, "obs")
    ['obs.a.0', 'obs.b']
    >>> unflatten(spec, leaves)["a"][1] is None
    True
"""

from __future__ import annotations

import collections
import json
import sys
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "TreeSpec",
    "compile_flatten_as",
    "dtype_name",
    "flatten",
    "flatten_as",
    "leaf_names",
    "num_leaves",
    "spec_key",
    "specs_equal",
    "structure_key",
    "unflatten",
]

TreeSpec = dict[str, Any]
"""JSON-serialisable description of a pytree structure (see the module docstring)."""

_NODE_KINDS = frozenset({"leaf", "none", "dict", "list", "tuple", "namedtuple"})
# Namedtuple classes built for structures whose class is not imported here; cached so that two
# unflattened trees of the same structure share one class (and compare equal as jax treedefs).
_FALLBACK_CLASSES: dict[tuple[str, tuple[str, ...]], type] = {}
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """``dtype.name``, cached (numpy computes it in Python, ~5 us a call)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and isinstance(getattr(type(value), "_fields", None), tuple)


def _is_leaf(value: Any) -> bool:
    return isinstance(value, np.ndarray | np.generic | bool | int | float | complex) or (
        hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype")
    )


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def flatten(tree: Any, *, leading_axis: bool = False) -> tuple[list[np.ndarray], TreeSpec]:
    """Flattens a pytree into numpy leaves (in ``jax.tree_util.tree_leaves`` order) and a spec.

    Args:
        tree: Nested dicts (``str`` keys), lists, tuples, NamedTuples and ``None`` with array-like
            leaves (numpy arrays and scalars, Python ``bool``/``int``/``float``, jax arrays).
        leading_axis: When true every leaf must have a leading (row) axis ``[N, ...]``; the spec
            then records each leaf's dtype and per-row shape ``...``.

    Returns:
        ``(leaves, spec)``: leaves as ``np.ndarray`` (jax arrays are copied to host with
        ``np.asarray``) and a JSON-serialisable ``TreeSpec``.

    Raises:
        TypeError: A node is neither a supported container nor array-like, or a dict key is not
            a ``str``.
        ValueError: ``leading_axis`` is true and a leaf is a scalar.

    Not jit-safe (host code). Example:
        >>> leaves, spec = flatten((np.zeros((5, 2), np.float32),), leading_axis=True)
        >>> spec["children"][0]
        {'kind': 'leaf', 'dtype': 'float32', 'shape': [2]}
    """
    leaves: list[np.ndarray] = []
    spec = _flatten(tree, "", leaves, leading_axis)
    return leaves, spec


def _flatten(node: Any, path: str, leaves: list[np.ndarray], leading_axis: bool) -> TreeSpec:
    if type(node) is np.ndarray and (node.ndim or not leading_axis):  # fast path, most leaves
        leaves.append(node)
        if not leading_axis:
            return {"kind": "leaf"}
        return {"kind": "leaf", "dtype": dtype_name(node.dtype), "shape": list(node.shape[1:])}
    if node is None:
        return {"kind": "none"}
    if isinstance(node, dict):
        keys = list(node.keys())
        for key in keys:
            if not isinstance(key, str):
                raise TypeError(
                    f"dict at '{path or '<root>'}' has key {key!r} of type {type(key).__name__}; "
                    "expected str keys (the structure is stored as JSON): rename the key"
                )
        if not isinstance(node, collections.OrderedDict):  # jax keeps OrderedDict's order
            keys.sort()
        children = [_flatten(node[k], _join(path, k), leaves, leading_axis) for k in keys]
        return {"kind": "dict", "keys": keys, "children": children}
    if _is_namedtuple(node):
        cls = type(node)
        fields = list(cls._fields)
        children = [
            _flatten(value, _join(path, name), leaves, leading_axis)
            for name, value in zip(fields, node, strict=True)
        ]
        return {
            "kind": "namedtuple",
            "module": cls.__module__,
            "qualname": cls.__qualname__,
            "fields": fields,
            "children": children,
        }
    if type(node) is tuple or type(node) is list:
        kind = "tuple" if type(node) is tuple else "list"
        children = [
            _flatten(value, _join(path, str(i)), leaves, leading_axis)
            for i, value in enumerate(node)
        ]
        return {"kind": kind, "children": children}
    if _is_leaf(node):
        array = np.asarray(node)
        leaves.append(array)
        if not leading_axis:
            return {"kind": "leaf"}
        if array.ndim == 0:
            raise ValueError(
                f"leaf '{path or '<root>'}' is a scalar; expected an array with a leading "
                "(row/time) axis [N, ...]: stack the values over time first"
            )
        return {"kind": "leaf", "dtype": dtype_name(array.dtype), "shape": list(array.shape[1:])}
    raise TypeError(
        f"unsupported pytree node of type {type(node).__module__}.{type(node).__qualname__} at "
        f"'{path or '<root>'}'; expected dict, list, tuple, NamedTuple, None or an array-like "
        "leaf: convert it to one of these (e.g. a dataclass to a dict)"
    )


def flatten_as(spec: TreeSpec, tree: Any) -> list[np.ndarray] | None:
    """Flattens ``tree`` if it has exactly the structure, dtypes and per-row shapes of ``spec``.

    For one tree; to flatten many trees of one structure, compile the check once with
    ``compile_flatten_as``. ``spec`` must come from ``flatten(..., leading_axis=True)``.

    Returns:
        The leaves (as ``flatten`` returns them), or ``None`` if ``tree`` does not match.

    Example:
        >>> _, spec = flatten({"a": np.zeros((2, 3))}, leading_axis=True)
        >>> len(flatten_as(spec, {"a": np.ones((5, 3))})), flatten_as(spec, {"a": np.ones(5)})
        (1, None)
    """
    return compile_flatten_as(spec)(tree)


_MISSING = object()
_COMPILED: collections.OrderedDict[str, Callable[[Any], list[np.ndarray] | None]] = (
    collections.OrderedDict()
)  # by spec_key, most recently used last
_COMPILED_MAX = 128
_COMPILED_LOCK = threading.Lock()


def compile_flatten_as(spec: TreeSpec) -> Callable[[Any], list[np.ndarray] | None]:
    """``flatten_as`` for one ``spec``, compiled once into a flat function for many trees.

    Compiled functions are cached by ``spec_key`` (128 most recent specs). The spec is turned
    into straight-line Python (as ``collections.namedtuple`` and
    ``dataclasses`` generate their methods): one local variable per node, no recursion, no
    lookups in the spec. Only generated identifiers appear in the source; dict keys, dtypes,
    shapes and classes are passed as constants, so no string from a spec or a tree is ever
    executed. A leaf costs an identity test on its dtype (a name comparison only for
    non-native byte order), an ``ndim`` and a per-row shape comparison; NamedTuple classes are
    compared by module, qualname and fields once per class, then by identity.

    Args:
        spec: A spec from ``flatten(..., leading_axis=True)`` (leaves carry dtype and shape).

    Returns:
        ``fn(tree) -> leaves | None``, exactly ``flatten_as(spec, tree)``.

    Raises:
        ValueError: ``spec`` is malformed or has leaves without dtype/shape.

    Not jit-safe (host code). Example:
        >>> _, spec = flatten((np.zeros((2, 3), np.float32),), leading_axis=True)
        >>> leaves_of = compile_flatten_as(spec)
        >>> [leaf.shape for leaf in leaves_of((np.ones((7, 3), np.float32),))]
        [(7, 3)]
        >>> leaves_of((np.ones((7, 3)),)) is None  # float64, not float32
        True
    """
    key = spec_key(spec)
    with _COMPILED_LOCK:
        function = _COMPILED.get(key)
        if function is not None:
            _COMPILED.move_to_end(key)
            return function
    code = _FlattenCode()  # ~1 ms (Python's compile): hence the cache
    code.emit(spec, "v0")
    function = code.build()
    with _COMPILED_LOCK:
        _COMPILED[key] = function
        while len(_COMPILED) > _COMPILED_MAX:
            _COMPILED.popitem(last=False)
    return function


def _as_leaf(node: Any) -> np.ndarray | None:
    """A non-``np.ndarray`` leaf as an array, or None where ``flatten`` would not take it."""
    if not _is_leaf(node) or _is_namedtuple(node):
        return None
    return np.asarray(node)


def _namedtuple_matcher(spec: TreeSpec, accepted: list[type]) -> Callable[[Any], bool]:
    module, qualname, fields = spec.get("module"), spec.get("qualname"), spec.get("fields")

    def matches(node: Any) -> bool:
        cls = type(node)
        if (
            _is_namedtuple(node)
            and cls.__qualname__ == qualname
            and cls.__module__ == module
            and list(cls._fields) == fields
        ):
            accepted.append(cls)
            return True
        return False

    return matches


class _FlattenCode:
    """Source lines and constants of one ``compile_flatten_as`` function."""

    def __init__(self) -> None:
        self.lines = ["def flatten_tree(v0):"]
        self.namespace: dict[str, Any] = {
            "ndarray": np.ndarray,
            "MISSING": _MISSING,
            "dict_get": dict.get,
            "dtype_name": dtype_name,
            "as_leaf": _as_leaf,
        }
        self.leaves: list[str] = []
        self.count = 0

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def _const(self, value: Any) -> str:
        name = self._name("c")
        self.namespace[name] = value
        return name

    def _line(self, text: str) -> None:
        self.lines.append("    " + text)

    def _unpack(self, var: str, children: list[TreeSpec]) -> None:
        names = [self._name("v") for _ in children]
        if names:
            self._line(f"{', '.join(names)}, = {var}")
        for child, name in zip(children, names, strict=True):
            self.emit(child, name)

    def emit(self, spec: TreeSpec, var: str) -> None:
        kind = _check_node(spec)
        if kind == "leaf":
            name, shape = spec.get("dtype"), spec.get("shape")
            if not isinstance(name, str) or not isinstance(shape, list):
                raise ValueError(
                    f"leaf spec {spec!r:.200} has no dtype/shape; expected a spec from "
                    "flatten(..., leading_axis=True)"
                )
            try:
                native: np.dtype[Any] | None = np.dtype(name)
            except TypeError:
                native = None  # no array has it: the name comparison below fails
            dtype, dname = self._const(native), self._const(name)
            row_shape, ndim = self._const(tuple(shape)), len(shape) + 1
            self._line(f"if type({var}) is not ndarray:")
            self._line(f"    {var} = as_leaf({var})")
            self._line(f"    if {var} is None: return None")
            self._line(
                f"if ({var}.dtype is not {dtype} and dtype_name({var}.dtype) != {dname}) "
                f"or {var}.ndim != {ndim} or {var}.shape[1:] != {row_shape}: return None"
            )
            self.leaves.append(var)
            return
        if kind == "none":
            self._line(f"if {var} is not None: return None")
            return
        children: list[TreeSpec] = spec["children"]
        n = len(children)
        if kind == "dict":
            keys = spec.get("keys")
            if not isinstance(keys, list) or len(keys) != n:
                raise ValueError(
                    f"invalid TreeSpec dict node (keys/children disagree): {spec!r:.200}"
                )
            self._line(f"if not isinstance({var}, dict) or len({var}) != {n}: return None")
            for key, child in zip(keys, children, strict=True):
                value = self._name("v")
                # dict.get: a defaultdict must not grow a missing key
                self._line(f"{value} = dict_get({var}, {self._const(key)}, MISSING)")
                self._line(f"if {value} is MISSING: return None")
                self.emit(child, value)
            return
        if kind == "namedtuple":
            accepted: list[type] = []  # classes already found to match
            known = self._const(accepted)
            matches = self._const(_namedtuple_matcher(spec, accepted))
            self._line(f"if type({var}) not in {known} and not {matches}({var}): return None")
            self._line(f"if len({var}) != {n}: return None")
        else:
            sequence = self._const(tuple if kind == "tuple" else list)
            self._line(f"if type({var}) is not {sequence} or len({var}) != {n}: return None")
        self._unpack(var, children)

    def build(self) -> Callable[[Any], list[np.ndarray] | None]:
        self._line(f"return [{', '.join(self.leaves)}]")
        source = "\n".join(self.lines)
        exec(compile(source, "<tupli_jax._tree.compile_flatten_as>", "exec"), self.namespace)
        function: Callable[[Any], list[np.ndarray] | None] = self.namespace["flatten_tree"]
        return function


def structure_key(tree: Any) -> Hashable:
    """A cheap hashable key of a tree's structure, leaf dtypes and per-row shapes.

    Equal keys imply equal ``flatten(..., leading_axis=True)`` specs (so trees can be grouped by
    key in O(N)); the converse does not hold (dicts with another key order, equal NamedTuple
    classes defined twice, byte-swapped dtypes get other keys but equal specs). Leaves that are
    not ``np.ndarray`` get a key unique to that object, which is still sound.

    Example:
        >>> structure_key({"a": np.zeros((3, 2))}) == structure_key({"a": np.ones((9, 2))})
        True
        >>> structure_key((np.zeros(3),)) == structure_key([np.zeros(3)])
        False
    """
    cls = type(tree)
    if cls is np.ndarray:
        return (tree.dtype, tree.shape[1:] if tree.ndim else None)
    if tree is None:
        return None
    if isinstance(tree, dict):
        return (cls, tuple(tree), tuple([structure_key(v) for v in tree.values()]))
    if cls is tuple or cls is list or _is_namedtuple(tree):
        return (cls, tuple([structure_key(v) for v in tree]))
    return (cls, id(tree))


def _check_node(spec: Any) -> str:
    if not isinstance(spec, dict) or spec.get("kind") not in _NODE_KINDS:
        raise ValueError(
            f"invalid TreeSpec node {spec!r:.200}; expected a dict with 'kind' in "
            f"{sorted(_NODE_KINDS)}: the spec is damaged or from another program"
        )
    kind: str = spec["kind"]
    if kind in ("dict", "list", "tuple", "namedtuple") and not isinstance(
        spec.get("children"), list
    ):
        raise ValueError(f"invalid TreeSpec {kind} node without a 'children' list: {spec!r:.200}")
    return kind


def num_leaves(spec: TreeSpec) -> int:
    """Number of leaves described by ``spec``.

    Example:
        >>> num_leaves(flatten({"a": 1, "b": [2, None]})[1])
        2
    """
    kind = _check_node(spec)
    if kind == "leaf":
        return 1
    if kind == "none":
        return 0
    return sum(num_leaves(child) for child in spec["children"])


def unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> Any:
    """Rebuilds the tree described by ``spec`` with ``leaves`` in flatten order.

    NamedTuples use their original class if it is already imported (``sys.modules`` is consulted;
    nothing is ever imported, since specs may come from files written by others) and its fields
    match; otherwise an equivalent ``collections.namedtuple`` with the same name and fields.

    Args:
        spec: A ``TreeSpec`` from ``flatten``.
        leaves: Exactly ``num_leaves(spec)`` values, placed as given.

    Returns:
        The rebuilt pytree.

    Raises:
        ValueError: The number of leaves does not match or the spec is malformed.

    Example:
        >>> leaves, spec = flatten([np.int32(1), {"x": np.zeros(2)}])
        >>> unflatten(spec, [7, 8])
        [7, {'x': 8}]
    """
    expected = num_leaves(spec)
    if len(leaves) != expected:
        raise ValueError(
            f"unflatten got {len(leaves)} leaves; the spec describes {expected}: pass the "
            "leaves returned by flatten for this spec"
        )
    iterator = iter(leaves)
    return _unflatten(spec, iterator)


def _unflatten(spec: TreeSpec, leaves: Any) -> Any:
    kind = spec["kind"]
    if kind == "leaf":
        return next(leaves)
    if kind == "none":
        return None
    children = [_unflatten(_valid(child), leaves) for child in spec["children"]]
    if kind == "list":
        return children
    if kind == "tuple":
        return tuple(children)
    if kind == "dict":
        keys = spec.get("keys")
        if not isinstance(keys, list) or len(keys) != len(children):
            raise ValueError(f"invalid TreeSpec dict node (keys/children disagree): {spec!r:.200}")
        return dict(zip(keys, children, strict=True))
    cls = _namedtuple_class(spec, len(children))
    return cls(*children)


def _valid(spec: Any) -> TreeSpec:
    _check_node(spec)
    result: TreeSpec = spec
    return result


def _lookup_imported(module_name: str, qualname: str) -> Any:
    """Finds an already-imported object by module and qualname without triggering any import.

    Uses ``__dict__`` lookups only, so module ``__getattr__`` hooks (lazy imports) never run.
    """
    module = sys.modules.get(module_name)
    if module is None:
        return None
    obj: Any = module
    for part in qualname.split("."):
        namespace = getattr(obj, "__dict__", None)
        if namespace is None or not hasattr(namespace, "get"):
            return None
        obj = namespace.get(part)
        if obj is None:
            return None
    return obj


def _namedtuple_class(spec: TreeSpec, n_children: int) -> type:
    module, qualname, fields = spec.get("module"), spec.get("qualname"), spec.get("fields")
    if (
        not isinstance(module, str)
        or not isinstance(qualname, str)
        or not isinstance(fields, list)
        or not all(isinstance(f, str) for f in fields)
        or len(fields) != n_children
    ):
        raise ValueError(f"invalid TreeSpec namedtuple node: {spec!r:.200}")
    cls = _lookup_imported(module, qualname)
    if (
        isinstance(cls, type)
        and issubclass(cls, tuple)
        and tuple(getattr(cls, "_fields", ())) == tuple(fields)
    ):
        return cls
    name = qualname.rsplit(".", 1)[-1]
    if not name.isidentifier():
        name = "Record"
    key = (name, tuple(fields))
    cached = _FALLBACK_CLASSES.get(key)
    if cached is not None:
        return cached
    try:
        fallback: type = collections.namedtuple(name, fields)  # type: ignore[misc]
    except ValueError as err:
        raise ValueError(f"invalid NamedTuple field names {fields!r} in TreeSpec: {err}") from None
    fallback.__module__ = __name__
    _FALLBACK_CLASSES[key] = fallback
    return fallback


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(".", "%2E")


def leaf_names(spec: TreeSpec, prefix: str) -> list[str]:
    """Dotted names of the leaves in flatten order, e.g. ``"obs.agent_position.row"``.

    Dict keys and NamedTuple fields name their children, list/tuple children use their index.
    ``"%"`` and ``"."`` inside a key are written ``%25`` and ``%2E`` so names stay unique.

    Args:
        spec: A ``TreeSpec``.
        prefix: Name of the root (a root leaf is named ``prefix`` itself); may be empty.

    Example:
        >>> leaf_names(flatten({"a": (1, 2), "b.c": 3})[1], "obs")
        ['obs.a.0', 'obs.a.1', 'obs.b%2Ec']
    """
    names: list[str] = []
    _leaf_names(spec, prefix, names)
    return names


def _leaf_names(spec: TreeSpec, path: str, names: list[str]) -> None:
    kind = _check_node(spec)
    if kind == "leaf":
        names.append(path)
        return
    if kind == "none":
        return
    children = spec["children"]
    if kind == "dict":
        parts = [_escape(str(k)) for k in spec.get("keys", [])]
    elif kind == "namedtuple":
        parts = [_escape(str(f)) for f in spec.get("fields", [])]
    else:
        parts = [str(i) for i in range(len(children))]
    if len(parts) != len(children):
        raise ValueError(f"invalid TreeSpec {kind} node (names/children disagree): {spec!r:.200}")
    for part, child in zip(parts, children, strict=True):
        _leaf_names(child, _join(path, part), names)


def specs_equal(a: TreeSpec, b: TreeSpec) -> bool:
    """Whether two specs describe the same structure (and the same leaf dtypes/shapes).

    Structure means node kinds, dict keys, list/tuple lengths, NamedTuple module, qualname and
    fields. Leaf ``dtype`` and ``shape`` are compared where both specs record them (specs from
    ``flatten(..., leading_axis=True)``).

    Example:
        >>> specs_equal(flatten({"a": 1})[1], flatten({"a": np.zeros(3)})[1])
        True
        >>> specs_equal(flatten({"a": 1})[1], flatten({"b": 1})[1])
        False
    """
    if not isinstance(a, dict) or not isinstance(b, dict) or a.get("kind") != b.get("kind"):
        return False
    kind = a.get("kind")
    if kind == "leaf":
        return all(a[k] == b[k] for k in ("dtype", "shape") if k in a and k in b)
    if kind == "none":
        return True
    for key in ("keys", "module", "qualname", "fields"):
        if a.get(key) != b.get(key):
            return False
    children_a, children_b = a.get("children"), b.get("children")
    if not isinstance(children_a, list) or not isinstance(children_b, list):
        return False
    return len(children_a) == len(children_b) and all(
        specs_equal(x, y) for x, y in zip(children_a, children_b, strict=True)
    )


def spec_key(spec: TreeSpec) -> str:
    """A canonical JSON string of ``spec``; equal keys mean identical specs (for grouping).

    Example:
        >>> spec_key(flatten([1])[1]) == spec_key(flatten([2.0])[1])
        True
    """
    return json.dumps(spec, sort_keys=True, separators=(",", ":"))
