"""Models and filter semantics of tupli_jax.schema, checked against pytupli where it is right."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tupli_jax import schema
from tupli_jax.schema import (
    EpisodeHeader,
    EpisodeItem,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterGT,
    FilterIN,
    FilterLEQ,
    FilterLT,
    FilterNE,
    FilterOR,
    FilterType,
    RLTuple,
    matches,
)

pytupli_storage = pytest.importorskip("pytupli.storage")
pytupli_schema = pytest.importorskip("pytupli.schema")

KEYS = ["a", "b", "c"]
scalars = st.one_of(
    st.integers(-3, 3),
    st.floats(-3, 3, allow_nan=False),
    st.booleans(),
    st.sampled_from(["x", "y", "1", ""]),
)
documents = st.recursive(
    st.dictionaries(st.sampled_from(KEYS), scalars, max_size=3),
    lambda inner: st.dictionaries(st.sampled_from(KEYS), st.one_of(scalars, inner), max_size=3),
    max_leaves=8,
)
dotted_keys = st.lists(st.sampled_from(KEYS), min_size=1, max_size=3).map(".".join)
LEAVES = [FilterEQ, FilterNE, FilterGEQ, FilterLEQ, FilterGT, FilterLT]
leaf_filters = st.builds(
    lambda cls, key, value: cls(key=key, value=value),
    st.sampled_from(LEAVES),
    dotted_keys,
    scalars,
)
filters = st.recursive(
    leaf_filters,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda fs: FilterAND(filters=fs)),
        st.lists(inner, max_size=3).map(lambda fs: FilterOR(filters=fs)),
    ),
    max_leaves=6,
)


def _to_pytupli(f: schema.BaseFilter) -> Any:
    return pytupli_schema.BaseFilter.model_validate(f.model_dump())


def _comparable_everywhere(f: schema.BaseFilter, doc: dict[str, Any]) -> bool:
    """Whether every ordering leaf compares compatible types (pytupli raises otherwise)."""
    if f.type in (FilterType.AND, FilterType.OR):
        return all(_comparable_everywhere(g, doc) for g in f.filters or [])
    if f.type in (FilterType.EQ, FilterType.NE):
        return True
    value = schema.get_path(doc, f.key or "")
    if schema.is_missing(value):
        return True
    try:
        _ = value < f.value
    except TypeError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(doc=documents, f=filters)
def test_matches_agrees_with_pytupli_where_pytupli_is_defined(doc: dict, f: schema.BaseFilter):
    if not _comparable_everywhere(f, doc):
        return
    pytupli_fs = object.__new__(pytupli_storage.FileStorage)  # only its filter compiler is used
    reference = pytupli_fs.convert_filter_to_function(_to_pytupli(f))
    expected = reference(doc)
    # Where pytupli's comparisons are defined it follows Python, as ours must; the cases where
    # pytupli raises (incomparable types) are excluded above.
    assert matches(f, doc) == expected


@settings(max_examples=200, deadline=None)
@given(doc=documents, key=dotted_keys, values=st.lists(scalars, max_size=4))
def test_in_is_or_of_eq(doc: dict, key: str, values: list):
    expected = any(matches(FilterEQ(key=key, value=v), doc) for v in values)
    assert matches(FilterIN(key=key, value=values), doc) == expected


@settings(max_examples=200, deadline=None)
@given(doc=documents, f=leaf_filters)
def test_missing_key_makes_every_leaf_false(doc: dict, f: schema.BaseFilter):
    missing = f.model_copy(update={"key": "zz." + (f.key or "")})
    assert matches(missing, doc) is False


def test_python_equality_rules():
    assert matches(FilterEQ(key="k", value=1), {"k": True})
    assert matches(FilterEQ(key="k", value=1.0), {"k": 1})
    assert not matches(FilterEQ(key="k", value="1"), {"k": 1})
    assert matches(FilterNE(key="k", value="1"), {"k": 1})
    assert not matches(FilterNE(key="k", value=1), {})


def test_incomparable_ordering_makes_only_that_leaf_false():
    doc = {"k": "text", "n": 5}
    assert not matches(FilterGEQ(key="k", value=1), doc)
    assert matches(FilterGEQ(key="k", value=1) | FilterGT(key="n", value=4), doc)
    assert not matches(FilterLT(key="k", value=None or 0), doc)


def test_dotted_keys_are_literal_dict_keys():
    doc = {"metadata": {"a": {"b": 2}}, "metadata.a.b": 99}
    assert matches(FilterEQ(key="metadata.a.b", value=2), doc)
    assert not matches(FilterEQ(key="metadata.a.b", value=99), doc)
    assert not matches(FilterEQ(key="metadata.a.0", value=2), {"metadata": {"a": [2]}})


def test_empty_combinators():
    assert matches(FilterAND(filters=[]), {})
    assert not matches(FilterOR(filters=[]), {})


def test_operators_flatten_like_pytupli():
    a, b, c = (FilterEQ(key=k, value=1) for k in "abc")
    both = a & b & c
    assert both.type is FilterType.AND and len(both.filters or []) == 3
    either = a | (b | c)
    assert either.type is FilterType.OR and len(either.filters or []) == 3
    expected = pytupli_schema.FilterEQ(key="a", value=1) & pytupli_schema.FilterEQ(key="b", value=1)
    assert (a & b).model_dump() == expected.model_dump()


def test_leaf_filters_need_key_and_value_and_in_needs_a_list():
    with pytest.raises(ValidationError):
        FilterEQ(key="a")
    with pytest.raises(ValidationError):
        FilterIN(key="a", value=3)


def test_apply_prefix_and_from_list():
    f = FilterEQ(key="seed", value=1) & FilterGT(key="n", value=2)
    f.apply_prefix("metadata")
    assert [g.key for g in f.filters or []] == ["metadata.seed", "metadata.n"]
    headers = [
        EpisodeHeader.create_new(
            benchmark_id=f"b{i}",
            metadata={},
            n_tuples=1,
            terminated=True,
            timeout=False,
            created_by="me",
        )
        for i in range(2)
    ]
    f_or = FilterOR.from_list(headers, on_key="benchmark_id", from_key="benchmark_id")
    assert [g.value for g in f_or.filters] == ["b0", "b1"]


def test_rl_tuple_accepts_numpy_and_python_values():
    t = RLTuple.from_env_step(
        np.arange(3, dtype=np.float32),
        1,
        np.float64(0.5),
        np.bool_(True),
        False,
        {"x": np.int64(3), "y": np.ones(2)},
    )
    assert t.state == [0.0, 1.0, 2.0] and t.action == 1 and t.reward == 0.5
    assert t.terminal is True and t.timeout is False
    assert t.info == {"x": 3, "y": [1.0, 1.0]}


def test_episode_header_is_pytupli_compatible():
    header = EpisodeHeader.create_new(
        benchmark_id="b",
        metadata={"k": 1},
        n_tuples=3,
        terminated=False,
        timeout=True,
        created_by="me",
    )
    assert header.truncated is True
    assert header.published_in == ["me"]
    theirs = pytupli_schema.EpisodeHeader.model_validate(header.model_dump())
    assert theirs.id == header.id and theirs.timeout is True
    ours = EpisodeHeader.model_validate(theirs.model_dump())
    assert ours.truncated is True and ours.n_tuples == 3


def test_episode_item_derives_counts_from_tuples():
    tuples = [
        RLTuple(state=[0], action=0, reward=1.0),
        RLTuple(state=[1], action=1, reward=1.0, terminal=True),
    ]
    item = EpisodeItem.create_new(benchmark_id="b", metadata={}, tuples=tuples, created_by="me")
    assert item.n_tuples == 2 and item.terminated is True and item.timeout is False
