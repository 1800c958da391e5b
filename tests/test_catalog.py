"""Tests of tupli_jax/storage/catalog.py: filters compiled to SQL agree with ``schema.matches``.

Real SQLite and real shard files on temporary directories; the reference semantics is always
``[h for h in all_headers if matches(f, h.model_dump())]``.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    BaseFilter,
    BenchmarkMetadata,
    BenchmarkQuery,
    FilterAND,
    FilterEQ,
    FilterGEQ,
    FilterGT,
    FilterIN,
    FilterLEQ,
    FilterLT,
    FilterNE,
    FilterOR,
    matches,
)
from tupli_jax.storage import FileStorage, TupliStorageError
from tupli_jax.storage.catalog import (
    DICT,
    LIST,
    NAN,
    NULL,
    NUMBER,
    TEXT,
    UNINDEXED,
    check_id,
    document_leaves,
    normalize_document,
)

# --------------------------------------------------------------------------------------------
# helpers


def _episode(bench: str, metadata: dict[str, Any], length: int = 2, **kw: Any) -> EpisodeData:
    rewards = kw.pop("rewards", np.arange(length, dtype=np.float32))
    return EpisodeData(
        observations=np.zeros((length + 1, 2), np.float32),
        actions=np.zeros(length, np.int32),
        rewards=rewards,
        discounts=np.ones(length, np.float32),
        terminated=kw.pop("terminated", True),
        truncated=kw.pop("truncated", False),
        metadata=metadata,
        benchmark_id=bench,
    )


def _store_with(path: Path, docs: list[dict[str, Any]], **kw: Any) -> tuple[FileStorage, list[str]]:
    store = FileStorage(path)
    bench = store.store_benchmark(
        BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
    ).id
    headers = store.record_episodes([_episode(bench, d, **kw) for d in docs])
    return store, [h.id for h in headers]


def _expected(store: FileStorage, f: BaseFilter | None) -> list[str]:
    return [h.id for h in store.list_episodes() if matches(f, h.model_dump())]


def _listed(store: FileStorage, f: BaseFilter | None) -> list[str]:
    return [h.id for h in store.list_episodes(f)]


# --------------------------------------------------------------------------------------------
# unit pieces


def test_check_id_accepts_store_ids_and_refuses_everything_else() -> None:
    assert check_id("a" * 64, "episode", "s") == "a" * 64
    assert check_id("A-b_9", "episode", "s") == "A-b_9"
    bad: list[object] = ["", "a" * 65, "../x", "/etc/passwd", "a\x00b", "x' OR '1'='1", "a.b"]
    bad += ["a\n", 3, None, b"abc"]
    for value in bad:
        with pytest.raises(TupliStorageError, match="invalid episode id"):
            check_id(value, "episode", "s")


def test_normalize_document_keeps_json_types_and_converts_numpy() -> None:
    text, doc = normalize_document(
        {"i": 1, "f": 1.0, "b": True, "n": None, "l": [1, 2.5], "d": {"x": "y"}, "np": np.int32(4)},
        "metadata",
    )
    assert doc == {"i": 1, "f": 1.0, "b": True, "n": None, "l": [1, 2.5], "d": {"x": "y"}, "np": 4}
    assert type(doc["i"]) is int and type(doc["f"]) is float and type(doc["b"]) is bool
    assert type(doc["np"]) is int
    assert '"f": 1.0' in text


@pytest.mark.parametrize("bad", [{"x": object()}, [1, 2], "text", {"x": {1, 2}}])
def test_normalize_document_refuses_non_json(bad: Any) -> None:
    with pytest.raises(TupliStorageError, match="metadata"):
        normalize_document(bad, "metadata")


def test_document_leaves_types_and_unreachable_dotted_keys() -> None:
    doc = {
        "n": None,
        "i": 2,
        "t": True,
        "f": 0.5,
        "nan": math.nan,
        "s": "x",
        "l": [1],
        "d": {"e": {}},
        "big": 2**70,
        "a.b": 1,
        "sur": "\ud800",
    }
    leaves, inexact = document_leaves(doc)
    assert inexact
    assert dict((p, t) for p, t, _ in leaves) == {
        "n": NULL,
        "i": NUMBER,
        "t": NUMBER,
        "f": NUMBER,
        "nan": NAN,
        "s": TEXT,
        "l": LIST,
        "d": DICT,
        "d.e": DICT,
        "big": UNINDEXED,
        "sur": UNINDEXED,
    }
    assert document_leaves({"x": 1})[1] is False


# --------------------------------------------------------------------------------------------
# every operator on hand-made data (expected ids written out by hand)


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[FileStorage, list[str]]:
    docs = [
        {"seed": 1, "name": "a", "cfg": {"lr": 0.1}},
        {"seed": 2, "name": "b", "cfg": {"lr": 0.2}},
        {"seed": 3.0, "name": "c", "flag": True},
        {"seed": "3", "name": "d"},
        {"seed": None, "cfg": {"lr": [1, 2]}},
        {"other": 1},
    ]
    return _store_with(tmp_path / "s", docs)


def test_eq_uses_python_equality(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    assert _listed(store, FilterEQ(key="metadata.seed", value=3)) == [ids[2]]  # 3 == 3.0
    assert _listed(store, FilterEQ(key="metadata.seed", value="3")) == [ids[3]]  # '3' != 3
    assert _listed(store, FilterEQ(key="metadata.seed", value=True)) == [ids[0]]  # True == 1
    assert _listed(store, FilterEQ(key="metadata.flag", value=1)) == [ids[2]]
    assert _listed(store, FilterEQ(key="metadata.cfg.lr", value=0.2)) == [ids[1]]
    assert _listed(store, FilterEQ(key="metadata.cfg.lr", value=[1, 2])) == [ids[4]]
    assert _listed(store, FilterEQ(key="metadata.cfg", value={"lr": 0.1})) == [ids[0]]
    assert _listed(store, FilterEQ(key="metadata.missing", value=1)) == []


def test_ne_is_false_when_the_key_is_missing(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    assert _listed(store, FilterNE(key="metadata.seed", value=3)) == [
        ids[0],
        ids[1],
        ids[3],
        ids[4],
    ]
    assert _listed(store, FilterNE(key="metadata.name", value="a")) == [ids[1], ids[2], ids[3]]
    assert _listed(store, FilterNE(key="metadata.cfg.lr", value=[1, 2])) == [ids[0], ids[1]]


def test_ordering_between_incomparable_types_is_false(
    seeded: tuple[FileStorage, list[str]],
) -> None:
    store, ids = seeded
    assert _listed(store, FilterGT(key="metadata.seed", value=1)) == [ids[1], ids[2]]
    assert _listed(store, FilterGEQ(key="metadata.seed", value=2)) == [ids[1], ids[2]]
    assert _listed(store, FilterLT(key="metadata.seed", value=3)) == [ids[0], ids[1]]
    assert _listed(store, FilterLEQ(key="metadata.seed", value=3)) == [ids[0], ids[1], ids[2]]
    assert _listed(store, FilterGEQ(key="metadata.seed", value="0")) == [ids[3]]
    assert _listed(store, FilterLT(key="metadata.name", value="c")) == [ids[0], ids[1]]
    assert _listed(store, FilterGT(key="metadata.cfg", value=0)) == []
    assert _listed(store, FilterGT(key="metadata.cfg.lr", value=0.15)) == [ids[1]]


def test_in_and_combinators(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    assert _listed(store, FilterIN(key="metadata.seed", value=[1, "3", None])) == [
        ids[0],
        ids[3],
        ids[4],
    ]
    assert _listed(store, FilterIN(key="metadata.seed", value=[])) == []
    assert _listed(store, FilterIN(key="metadata.cfg.lr", value=[[1, 2], 0.1])) == [ids[0], ids[4]]
    both = FilterEQ(key="metadata.seed", value=1) & FilterEQ(key="metadata.name", value="a")
    assert _listed(store, both) == [ids[0]]
    either = FilterEQ(key="metadata.seed", value=2) | FilterEQ(key="metadata.other", value=1)
    assert _listed(store, either) == [ids[1], ids[5]]
    nested = FilterOR(filters=[FilterAND(filters=[]), FilterEQ(key="metadata.x", value=1)])
    assert _listed(store, nested) == ids
    assert _listed(store, FilterAND(filters=[])) == ids
    assert _listed(store, FilterOR(filters=[])) == []
    assert _listed(store, None) == ids


def test_header_fields_are_filterable(tmp_path: Path) -> None:
    store, ids = _store_with(tmp_path / "s", [{}, {}, {}])
    bench = store.list_episodes()[0].benchmark_id
    store.publish_episode(ids[1], "team")
    assert _listed(store, FilterEQ(key="n_tuples", value=2)) == ids
    assert _listed(store, FilterEQ(key="episode_return", value=1.0)) == ids  # rewards 0 + 1
    assert _listed(store, FilterEQ(key="terminated", value=True)) == ids
    assert _listed(store, FilterEQ(key="truncated", value=1)) == []
    assert _listed(store, FilterEQ(key="benchmark_id", value=bench)) == ids
    assert _listed(store, FilterIN(key="id", value=[ids[2], ids[0]])) == [ids[0], ids[2]]
    assert _listed(store, FilterEQ(key="published_in", value=["local_storage", "team"])) == [ids[1]]
    assert _listed(store, FilterEQ(key="n_tuples.x", value=2)) == []  # scalar has no sub-keys
    assert _listed(store, FilterNE(key="n_tuples.x", value=2)) == []


def test_large_in_lists(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    many_ids = [f"{i:032x}" for i in range(2000)] + [ids[1]]
    assert _listed(store, FilterIN(key="id", value=many_ids)) == [ids[1]]
    many_numbers = [*range(100, 2100), 2]
    assert _listed(store, FilterIN(key="metadata.seed", value=many_numbers)) == [ids[1]]
    odd_strings = [f'"{i}\\' for i in range(1000)] + ["c"]
    assert _listed(store, FilterIN(key="metadata.name", value=odd_strings)) == [ids[2]]


def test_ids_of_a_huge_filter_fall_back_to_python(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    huge = FilterIN(key="metadata.seed", value=[*range(1000, 41000), 1])
    assert _listed(store, huge) == [ids[0]]


def test_unindexable_values_are_rechecked(tmp_path: Path) -> None:
    docs = [{"v": 2**70}, {"v": 2**70 + 1}, {"v": float(2**70)}, {"v": math.nan}, {"v": "\ud800"}]
    store, ids = _store_with(tmp_path / "s", docs)
    for f in [
        FilterEQ(key="metadata.v", value=2**70),
        FilterEQ(key="metadata.v", value=float(2**70)),
        FilterGT(key="metadata.v", value=2**70),
        FilterNE(key="metadata.v", value=math.nan),
        FilterEQ(key="metadata.v", value=math.nan),
        FilterEQ(key="metadata.v", value="\ud800"),
        FilterLT(key="metadata.v", value=math.inf),
    ]:
        assert _listed(store, f) == _expected(store, f), f
    assert _listed(store, FilterEQ(key="metadata.v", value=2**70)) == [ids[0], ids[2]]


def test_nan_return_is_stored_and_filtered_like_python(tmp_path: Path) -> None:
    store, ids = _store_with(tmp_path / "s", [{}], rewards=np.array([np.nan, 1.0], np.float32))
    assert math.isnan(store.list_episodes()[0].episode_return)
    assert _listed(store, FilterNE(key="episode_return", value=1.0)) == ids
    assert _listed(store, FilterEQ(key="episode_return", value=math.nan)) == []
    assert _listed(store, FilterGT(key="episode_return", value=0)) == []


# --------------------------------------------------------------------------------------------
# hostile filters


HOSTILE_KEYS = [
    "metadata.x'; DROP TABLE episodes; --",
    'metadata."',
    "metadata.$",
    "metadata.$.a",
    "metadata[0]",
    "metadata.l[0]",
    "$",
    "",
    ".",
    "..",
    "metadata..x",
    "metadata.\x00",
    "id' OR '1'='1",
    "t.rid",
    "rid",
    "inexact",
    "metadata.%",
    "metadata.*",
]
HOSTILE_VALUES: list[Any] = [
    "' OR 1=1 --",
    '"); DROP TABLE episodes; --',
    "%",
    "_",
    "*",
    "\x00",
    "$[0]",
    ["' OR '1'='1"],
    {"$ne": 1},
]


def test_hostile_filters_return_nothing_or_raise(tmp_path: Path) -> None:
    store, ids = _store_with(tmp_path / "s", [{"x": 1, "l": [1, 2], "$": 2}, {"x": "a"}])
    for key in HOSTILE_KEYS:
        for value in HOSTILE_VALUES:
            for cls in (FilterEQ, FilterNE, FilterGT, FilterIN):
                v = value if cls is not FilterIN or isinstance(value, list) else [value]
                f = cls(key=key, value=v)
                try:
                    got = _listed(store, f)
                except TupliStorageError:
                    continue
                assert got == _expected(store, f), (key, value, cls)
    assert _listed(store, None) == ids  # nothing was dropped or changed
    assert store.verify() == []


def test_non_filter_objects_are_refused(tmp_path: Path) -> None:
    store, _ = _store_with(tmp_path / "s", [{}])
    for bad in ({"key": "id", "value": 1}, "id = 1", 3):
        with pytest.raises(TupliStorageError, match="filter"):
            store.list_episodes(bad)  # type: ignore[arg-type]
        with pytest.raises(TupliStorageError, match="filter"):
            store.list_benchmarks(bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# property tests: SQL result == matches() on every header

_KEYS = ["a", "b", "a.b", "", "$"]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.sampled_from([2**63 - 1, -(2**63), 2**63, 2**70]),
    st.floats(-3, 3, width=32),
    st.sampled_from([0.0, -0.0, 1.0, 2.5, math.inf, -math.inf, math.nan]),
    st.text(alphabet="ab1'\"é\x00%", max_size=3),
    st.just("\ud800"),
)
_VALUES = st.recursive(
    _SCALARS | st.lists(_SCALARS, max_size=2),
    lambda children: st.dictionaries(st.sampled_from(_KEYS), children, max_size=3),
    max_leaves=6,
)
_DOCS = st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=4)
_FILTER_VALUES = (
    _SCALARS.filter(lambda v: v is not None)
    | st.lists(_SCALARS, max_size=2)
    | (st.dictionaries(st.sampled_from(_KEYS), _SCALARS, max_size=1))
)


def _paths(prefix: str) -> st.SearchStrategy[str]:
    """Dotted keys under ``prefix``, mostly one level deep (where the documents have values)."""
    one = st.sampled_from([f"{prefix}.{k}" for k in _KEYS])
    deeper = st.lists(st.sampled_from(_KEYS), max_size=3).map(lambda ps: ".".join([prefix, *ps]))
    return one | one | deeper


def _filters(keys: st.SearchStrategy[str]) -> st.SearchStrategy[BaseFilter]:
    ordered = st.sampled_from([FilterEQ, FilterNE, FilterGT, FilterGEQ, FilterLT, FilterLEQ])
    leaf = st.builds(lambda cls, k, v: cls(key=k, value=v), ordered, keys, _FILTER_VALUES)
    in_leaf = st.builds(
        lambda k, v: FilterIN(key=k, value=v), keys, st.lists(_SCALARS | _FILTER_VALUES, max_size=3)
    )
    return st.recursive(
        leaf | in_leaf,
        lambda children: (
            st.lists(children, max_size=3).map(lambda fs: FilterAND(filters=fs))
            | st.lists(children, max_size=3).map(lambda fs: FilterOR(filters=fs))
        ),
        max_leaves=5,
    )


_EPISODE_KEYS = _paths("metadata") | st.sampled_from(
    [
        *("n_tuples", "episode_return", "terminated", "timeout", "truncated", "id"),
        *("published_in", "benchmark_id", "created_by", "missing", "n_tuples.x", "metadata"),
    ]
)
_PROPERTY = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


@_PROPERTY
@given(
    docs=st.lists(
        st.tuples(_DOCS, st.integers(1, 3), st.booleans(), st.sampled_from([0.0, 1.0, -2.5])),
        min_size=1,
        max_size=8,
    ),
    filters=st.lists(_filters(_EPISODE_KEYS), min_size=4, max_size=12),
)
def test_list_episodes_agrees_with_matches(
    docs: list[tuple[dict[str, Any], int, bool, float]], filters: list[BaseFilter]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(tmp)
        bench = store.store_benchmark(
            BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
        ).id
        episodes = [
            _episode(bench, doc, n, terminated=term, truncated=not term,
                     rewards=np.full(n, r, np.float32))
            for doc, n, term, r in docs
        ]  # fmt: skip
        store.record_episodes(episodes)
        everything = store.list_episodes()
        assert len(everything) == len(docs)
        for f in filters:
            expected = [h.id for h in everything if matches(f, h.model_dump())]
            assert _listed(store, f) == expected, f
            assert store._episode_locations(f).ids == expected, f
        store.close()


_OPT_TEXT = st.none() | st.text(alphabet="ab1'", max_size=2)
_BENCH_KEYS = _paths("metadata.extra") | st.sampled_from(
    [
        *("metadata.name", "metadata.description", "metadata.difficulty", "metadata.version"),
        *("metadata", "metadata.extra", "hash", "id", "published_in", "metadata.name.x", "name"),
    ]
)


@_PROPERTY
@given(
    items=st.lists(
        st.tuples(_DOCS, st.text(alphabet="ab1", max_size=2), _OPT_TEXT, _OPT_TEXT),
        min_size=1,
        max_size=8,
    ),
    filters=st.lists(_filters(_BENCH_KEYS), min_size=4, max_size=12),
)
def test_list_benchmarks_agrees_with_matches(
    items: list[tuple[dict[str, Any], str, str | None, str | None]], filters: list[BaseFilter]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(tmp)
        for i, (extra, name, difficulty, version) in enumerate(items):
            meta = BenchmarkMetadata(
                name=name, description=name * 2, difficulty=difficulty, version=version,
                extra=extra,
            )  # fmt: skip
            store.store_benchmark(BenchmarkQuery(hash=f"h{i}", serialized="{}", metadata=meta))
        everything = store.list_benchmarks()
        assert len(everything) == len(items)
        for f in filters:
            expected = [h.id for h in everything if matches(f, h.model_dump())]
            assert [h.id for h in store.list_benchmarks(f)] == expected, f
        store.close()


_ARTIFACT_KEYS = _paths("extra") | st.sampled_from(
    ["name", "description", "benchmark_id", "encoding", "hash", "extra", "metadata.name"]
)


@_PROPERTY
@given(
    items=st.lists(st.tuples(_DOCS, st.text(alphabet="ab1", max_size=2), _OPT_TEXT), max_size=8),
    filters=st.lists(_filters(_ARTIFACT_KEYS), min_size=4, max_size=12),
)
def test_list_artifacts_agrees_with_matches(
    items: list[tuple[dict[str, Any], str, str | None]], filters: list[BaseFilter]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = FileStorage(tmp)
        for i, (extra, name, bench) in enumerate(items):
            meta = ArtifactMetadata(name=name, benchmark_id=bench, extra=extra)
            store.store_artifact(f"content {i}".encode(), meta)
        everything = store.list_artifacts()
        assert len(everything) == len(items)
        for f in filters:
            expected = [h.id for h in everything if matches(f, h.model_dump())]
            assert [h.id for h in store.list_artifacts(f)] == expected, f
        store.close()
