"""Tests for tupli_jax._tree: the JSON pytree codec, checked against jax.tree_util."""

from __future__ import annotations

import collections
import json
import sys
import types
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax._tree import (
    compile_flatten_as,
    flatten,
    flatten_as,
    leaf_names,
    num_leaves,
    spec_key,
    specs_equal,
    structure_key,
    unflatten,
)


class Position(NamedTuple):
    row: Any
    col: Any


class Observation(NamedTuple):
    agent: Position
    grid: Any
    mask: Any


def _zoo() -> dict[str, Any]:
    return {
        "array": np.arange(6, dtype=np.int32).reshape(2, 3),
        "nested_dict": {"b": np.zeros(2), "a": {"y": np.ones(1, bool), "x": np.int8(3)}},
        "namedtuple": Observation(
            agent=Position(np.int32(1), np.int32(2)), grid=np.ones((3, 3)), mask=None
        ),
        "list_tuple": [np.float32(1.5), (np.uint8(2), [np.int64(7)]), ()],
        "none": None,
        "python_scalars": {"flag": True, "count": 3, "value": 2.5},
        "mixed": {"obs": Observation(Position(1, 2), (np.zeros(2),), [None, 4.0]), "z": []},
    }


def _assert_same_tree(a: Any, b: Any) -> None:
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()


@pytest.mark.parametrize("name", sorted(_zoo()))
def test_leaf_order_matches_jax(name: str) -> None:
    tree = _zoo()[name]
    leaves, _ = flatten(tree)
    expected = jax.tree_util.tree_leaves(tree)
    assert len(leaves) == len(expected)
    for ours, theirs in zip(leaves, expected, strict=True):
        assert isinstance(ours, np.ndarray)
        np.testing.assert_array_equal(ours, np.asarray(theirs))


@pytest.mark.parametrize("name", sorted(_zoo()))
def test_round_trip_through_json(name: str) -> None:
    tree = _zoo()[name]
    leaves, spec = flatten(tree)
    spec = json.loads(json.dumps(spec))
    rebuilt = unflatten(spec, leaves)
    _assert_same_tree(rebuilt, jax.tree_util.tree_map(np.asarray, tree))
    assert num_leaves(spec) == len(leaves)


def test_importable_namedtuple_class_is_reused() -> None:
    tree = Observation(Position(np.int32(1), np.int32(2)), np.zeros(2), None)
    leaves, spec = flatten(tree)
    rebuilt = unflatten(json.loads(json.dumps(spec)), leaves)
    assert type(rebuilt) is Observation
    assert type(rebuilt.agent) is Position
    assert rebuilt.agent.col == 2


def test_local_namedtuple_falls_back_to_equivalent_namedtuple() -> None:
    class Local(NamedTuple):
        speed: Any
        angle: Any

    leaves, spec = flatten(Local(np.float32(1.0), np.float32(-2.0)))
    rebuilt = unflatten(spec, leaves)
    assert type(rebuilt) is not Local
    assert type(rebuilt).__name__ == "Local"
    assert rebuilt._fields == ("speed", "angle")
    assert rebuilt.speed == np.float32(1.0) and rebuilt.angle == np.float32(-2.0)
    # The fallback class is shared, so two rebuilt trees have equal jax structure.
    again = unflatten(spec, leaves)
    assert type(again) is type(rebuilt)
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(rebuilt)


def test_field_mismatch_with_imported_class_falls_back() -> None:
    leaves, spec = flatten(Position(1, 2))
    spec["fields"] = ["x", "y"]
    rebuilt = unflatten(spec, leaves)
    assert type(rebuilt) is not Position
    assert (rebuilt.x, rebuilt.y) == (1, 2)


def test_unflatten_never_imports_modules() -> None:
    assert "this" not in sys.modules  # importing it would print the Zen of Python
    leaves, spec = flatten(Position(1, 2))
    spec["module"], spec["qualname"] = "this", "Position"
    rebuilt = unflatten(spec, leaves)
    assert "this" not in sys.modules
    assert rebuilt.row == 1


def test_unflatten_never_triggers_module_getattr_hooks() -> None:
    calls: list[str] = []
    module = types.ModuleType("tupli_lazy_module_for_test")

    def lazy(name: str) -> Any:
        calls.append(name)
        raise AttributeError(name)

    module.__getattr__ = lazy  # type: ignore[method-assign]
    sys.modules[module.__name__] = module
    try:
        leaves, spec = flatten(Position(1, 2))
        spec["module"] = module.__name__
        rebuilt = unflatten(spec, leaves)
    finally:
        del sys.modules[module.__name__]
    assert calls == []
    assert rebuilt._fields == ("row", "col")


def test_leading_axis_records_dtype_and_row_shape() -> None:
    tree = {"img": np.zeros((5, 8, 8, 3), np.uint8), "flag": np.zeros(5, bool)}
    _, spec = flatten(tree, leading_axis=True)
    assert spec["children"][0] == {"kind": "leaf", "dtype": "bool", "shape": []}
    assert spec["children"][1] == {"kind": "leaf", "dtype": "uint8", "shape": [8, 8, 3]}
    _, plain = flatten(tree)
    assert "dtype" not in plain["children"][0]


def test_leading_axis_rejects_scalars() -> None:
    with pytest.raises(ValueError, match=r"'a\.b' is a scalar"):
        flatten({"a": {"b": 1.0}}, leading_axis=True)


def test_jax_arrays_become_numpy() -> None:
    leaves, spec = flatten({"x": jnp.arange(3, dtype=jnp.int32)}, leading_axis=True)
    assert type(leaves[0]) is np.ndarray
    assert leaves[0].tolist() == [0, 1, 2]
    assert spec["children"][0]["dtype"] == "int32"


def test_unknown_container_raises_type_error_naming_it() -> None:
    class Box:
        pass

    with pytest.raises(TypeError, match=r"Box.*'a\.1'"):
        flatten({"a": [1, Box()]})
    with pytest.raises(TypeError, match="set"):
        flatten({1, 2})
    with pytest.raises(TypeError, match="str"):
        flatten({"a": "text"})


def test_non_string_dict_key_raises_type_error() -> None:
    with pytest.raises(TypeError, match="expected str keys"):
        flatten({1: np.zeros(1)})


def test_ordered_dict_keeps_jax_order() -> None:
    tree = collections.OrderedDict([("b", np.int32(1)), ("a", np.int32(2))])
    leaves, spec = flatten(tree)
    assert [int(x) for x in leaves] == [int(x) for x in jax.tree_util.tree_leaves(tree)] == [1, 2]
    assert list(unflatten(spec, leaves)) == ["b", "a"]


def test_leaf_names() -> None:
    tree = {"pos": Position(1, 2), "seq": [3, (4,)], "a.b%": 5, "gone": None}
    _, spec = flatten(tree)
    assert leaf_names(spec, "obs") == [
        "obs.a%2Eb%25",
        "obs.pos.row",
        "obs.pos.col",
        "obs.seq.0",
        "obs.seq.1.0",
    ]
    assert leaf_names(flatten(np.zeros(2))[1], "reward") == ["reward"]
    assert leaf_names(flatten({"x": 1})[1], "") == ["x"]


def test_specs_equal() -> None:
    a = flatten({"x": np.zeros((4, 2), np.float32)}, leading_axis=True)[1]
    b = flatten({"x": np.zeros((9, 2), np.float32)}, leading_axis=True)[1]
    c = flatten({"x": np.zeros((4, 3), np.float32)}, leading_axis=True)[1]
    d = flatten({"x": np.zeros((4, 2), np.float64)}, leading_axis=True)[1]
    assert specs_equal(a, b)
    assert not specs_equal(a, c)
    assert not specs_equal(a, d)
    assert specs_equal(a, flatten({"x": 0})[1])  # structure-only spec: leaves not compared
    assert not specs_equal(flatten([1, 2])[1], flatten((1, 2))[1])
    assert not specs_equal(flatten(Position(1, 2))[1], flatten((1, 2))[1])
    assert not specs_equal(flatten([1, 2])[1], flatten([1, 2, 3])[1])
    assert spec_key(a) == spec_key(b) != spec_key(c)


def test_flatten_as() -> None:
    tree = {"p": Position(np.zeros(3, np.int32), np.zeros(3, np.int32)), "img": np.zeros((3, 2))}
    _, spec = flatten(tree, leading_axis=True)
    other = {"img": np.ones((7, 2)), "p": Position(np.ones(7, np.int32), np.ones(7, np.int32))}
    leaves = flatten_as(spec, other)
    assert leaves is not None
    assert [leaf.shape for leaf in leaves] == [(7, 2), (7,), (7,)]
    assert flatten_as(spec, {**other, "img": np.ones((7, 3))}) is None
    assert flatten_as(spec, {**other, "img": np.ones((7, 2), np.float32)}) is None
    assert flatten_as(spec, {**other, "p": (np.ones(7, np.int32), np.ones(7, np.int32))}) is None
    assert flatten_as(spec, {"img": np.ones((7, 2))}) is None
    assert flatten_as(spec, {**other, "extra": None}) is None


def test_unflatten_rejects_wrong_leaf_count_and_bad_specs() -> None:
    _, spec = flatten([1, 2])
    with pytest.raises(ValueError, match="got 1 leaves; the spec describes 2"):
        unflatten(spec, [1])
    with pytest.raises(ValueError, match="invalid TreeSpec"):
        unflatten({"kind": "pickle"}, [])
    with pytest.raises(ValueError, match="invalid NamedTuple field names"):
        unflatten(
            {
                "kind": "namedtuple",
                "module": "m",
                "qualname": "T",
                "fields": ["a; import os"],
                "children": [{"kind": "leaf"}],
            },
            [1],
        )


# -- property test: random structures -------------------------------------------------------

_leaf = st.sampled_from(["bool", "int8", "uint8", "int32", "int64", "float32", "float64"]).map(
    lambda dtype: ("leaf", dtype)
)
_keys = st.text(alphabet="abc._%", min_size=1, max_size=3)
_trees = st.recursive(
    _leaf | st.just(("none",)),
    lambda children: (
        st.dictionaries(_keys, children, max_size=3).map(lambda d: ("dict", d))
        | st.lists(children, max_size=3).map(lambda xs: ("list", xs))
        | st.lists(children, max_size=3).map(lambda xs: ("tuple", xs))
        | st.tuples(children, children).map(lambda xs: ("pos", list(xs)))
    ),
    max_leaves=8,
)


def _build(template: Any, rng: np.random.Generator) -> Any:
    kind = template[0]
    if kind == "leaf":
        return rng.integers(0, 2, size=(2, 3)).astype(template[1])
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _build(v, rng) for k, v in template[1].items()}
    children = [_build(v, rng) for v in template[1]]
    if kind == "pos":
        return Position(*children)
    return tuple(children) if kind == "tuple" else children


@settings(max_examples=60, deadline=None)
@given(template=_trees, seed=st.integers(0, 2**16))
def test_property_round_trip_and_jax_order(template: Any, seed: int) -> None:
    tree = _build(template, np.random.default_rng(seed))
    leaves, spec = flatten(tree, leading_axis=True)
    expected = jax.tree_util.tree_leaves(tree)
    assert len(leaves) == len(expected) == num_leaves(spec)
    for ours, theirs in zip(leaves, expected, strict=True):
        assert ours is theirs  # numpy leaves pass through untouched, in jax's order
    spec = json.loads(json.dumps(spec))
    _assert_same_tree(unflatten(spec, leaves), tree)
    assert len(leaf_names(spec, "obs")) == len(set(leaf_names(spec, "obs"))) == len(leaves)
    assert flatten_as(spec, tree) is not None


# -- compiled flatten_as and structure keys ----------------------------------------------------


def _reference_flatten_as(spec: Any, tree: Any) -> list[np.ndarray] | None:
    """flatten_as by definition: the tree flattens to an equal spec (structure, dtypes, shapes)."""
    try:
        leaves, other = flatten(tree, leading_axis=True)
    except (TypeError, ValueError):
        return None
    return leaves if specs_equal(spec, other) else None


def _perturbations(tree: Any, rng: np.random.Generator) -> list[Any]:
    """Trees that differ from ``tree`` in one place (or not at all: the leading axis)."""
    out: list[Any] = []
    leaves, spec = flatten(tree)
    for i, leaf in enumerate(leaves):
        for change in (
            lambda a: a.astype(np.float16 if a.dtype != np.float16 else np.float32),
            lambda a: a[:, :1] if a.ndim > 1 else a[:, None],  # another per-row shape
            lambda a: a[0],  # no leading axis
            lambda a: np.concatenate([a, a]),  # another leading length: still matches
            lambda a: a.astype(a.dtype.newbyteorder()),  # same dtype name: still matches
            lambda a: jnp.asarray(a) if a.dtype.itemsize < 8 else a.tolist(),
        ):
            changed = list(leaves)
            changed[i] = change(leaf)
            out.append(unflatten(spec, changed))
    if isinstance(tree, dict):
        out += [{**tree, "zz": None}, {k: v for k, v in list(tree.items())[1:]}]
        out.append(collections.defaultdict(list, tree))
    if isinstance(tree, list):
        out += [tuple(tree), [*tree, None]]
    if type(tree) is tuple:
        out += [list(tree), tree[:-1]]
    if isinstance(tree, Position):
        out += [tuple(tree), Position(tree.col, tree.row)]
    out.append(None if tree is not None else np.zeros((2, 3)))
    return out


@settings(max_examples=60, deadline=None)
@given(template=_trees, seed=st.integers(0, 2**16))
def test_property_compiled_flatten_as_agrees_with_flatten(template: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tree = _build(template, rng)
    _, spec = flatten(tree, leading_axis=True)
    spec = json.loads(json.dumps(spec))  # as read from a file
    compiled = compile_flatten_as(spec)
    for candidate in [tree, _build(template, rng), *_perturbations(tree, rng)]:
        expected = _reference_flatten_as(spec, candidate)
        received = compiled(candidate)
        assert (received is None) == (expected is None), candidate
        if expected is not None and received is not None:
            assert len(received) == len(expected)
            for ours, theirs in zip(received, expected, strict=True):
                assert type(ours) is np.ndarray
                assert ours.dtype == theirs.dtype and ours.tobytes() == theirs.tobytes()
        assert flatten_as(spec, candidate) is None if expected is None else True


def test_compiled_flatten_as_is_cached_per_spec() -> None:
    _, spec = flatten({"a": np.zeros((2, 3))}, leading_axis=True)
    _, same = flatten({"a": np.ones((9, 3))}, leading_axis=True)
    _, other = flatten({"a": np.ones((9, 4))}, leading_axis=True)
    assert compile_flatten_as(spec) is compile_flatten_as(same)
    assert compile_flatten_as(spec) is not compile_flatten_as(other)


def test_compiled_flatten_as_treats_names_as_data() -> None:
    """Keys, field names and class names that look like code are compared, never executed."""
    hostile = "x'] or __import__('os').system('echo pwned') or ['"
    Odd = collections.namedtuple("Odd", ["a_b", "c"])
    tree = {hostile: np.zeros((2, 1)), 'q"\n\\': Odd(np.zeros(2), None)}
    _, spec = flatten(tree, leading_axis=True)
    node = next(c for c in spec["children"] if c["kind"] == "namedtuple")
    node["qualname"] = hostile
    assert compile_flatten_as(spec)(tree) is None  # the class's real qualname differs
    node["qualname"] = "Odd"
    leaves = compile_flatten_as(spec)(tree)
    assert leaves is not None and [leaf.shape for leaf in leaves] == [(2,), (2, 1)]


def test_compiled_flatten_as_does_not_grow_a_defaultdict() -> None:
    _, spec = flatten({"a": np.zeros((2, 1)), "b": np.zeros((2, 1))}, leading_axis=True)
    tree = collections.defaultdict(lambda: np.zeros((2, 1)), {"a": np.zeros((2, 1)), "c": 1})
    assert compile_flatten_as(spec)(tree) is None
    assert sorted(tree) == ["a", "c"]


def test_compiled_flatten_as_needs_a_spec_with_leaf_dtypes() -> None:
    with pytest.raises(ValueError, match="no dtype/shape"):
        compile_flatten_as(flatten({"a": 1})[1])
    with pytest.raises(ValueError, match="invalid TreeSpec"):
        compile_flatten_as({"kind": "pickle"})


def test_structure_key_groups_like_specs() -> None:
    a = {"x": np.zeros((3, 2), np.float32), "p": Position(np.zeros(3), None)}
    b = {"x": np.ones((7, 2), np.float32), "p": Position(np.ones(7), None)}
    assert structure_key(a) == structure_key(b)
    assert hash(structure_key(a)) == hash(structure_key(b))
    different = [
        {"x": np.zeros((3, 3), np.float32), "p": Position(np.zeros(3), None)},
        {"x": np.zeros((3, 2), np.float64), "p": Position(np.zeros(3), None)},
        {"x": np.zeros((3, 2), np.float32), "p": (np.zeros(3), None)},
        {"x": np.zeros((3, 2), np.float32), "q": Position(np.zeros(3), None)},
        {"x": np.zeros(2, np.float32)[0], "p": Position(np.zeros(3), None)},
    ]
    for tree in different:
        assert structure_key(tree) != structure_key(a)


@settings(max_examples=60, deadline=None)
@given(templates=st.lists(_trees, min_size=1, max_size=4), picks=st.lists(st.integers(0, 3)))
def test_property_equal_structure_keys_mean_equal_specs(
    templates: list[Any], picks: list[int]
) -> None:
    rng = np.random.default_rng(len(picks))
    trees = [_build(templates[i % len(templates)], rng) for i in picks] + [
        _build(t, rng) for t in templates
    ]
    for x in trees:
        for y in trees:
            if structure_key(x) == structure_key(y):
                assert spec_key(flatten(x, leading_axis=True)[1]) == spec_key(
                    flatten(y, leading_axis=True)[1]
                )
    # the same template always gives the same key (ndarray leaves only)
    for template in templates:
        assert structure_key(_build(template, rng)) == structure_key(_build(template, rng))
