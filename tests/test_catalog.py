"""Tests of tupli_jax/storage/catalog.py: filters compiled to SQL agree with ``schema.matches``.

Real SQLite and real shard files on temporary directories; the reference semantics is always
``[h for h in all_headers if matches(f, h.model_dump())]``.
"""

from __future__ import annotations

import json
import math
import sqlite3
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
    EPISODE_FIELDS,
    LIST,
    NAN,
    NULL,
    NUMBER,
    SCHEMA_VERSION,
    TEXT,
    UNINDEXED,
    Catalog,
    check_id,
    compile_filter,
    document_leaves,
    normalize_document,
    normalize_documents,
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


# --------------------------------------------------------------------------------------------
# batched metadata normalisation (the record_episodes fast path)


def _typed(value: Any) -> Any:
    """``value`` with every scalar tagged by its type (so ``1 != 1.0 != True``); NaN == NaN."""
    if isinstance(value, dict):
        return ("dict", [(k, _typed(v)) for k, v in value.items()])
    if isinstance(value, list):
        return ("list", [_typed(v) for v in value])
    if isinstance(value, float) and math.isnan(value):
        return ("float", "nan")
    return (type(value).__name__, value)


_NUMPY_DOCS = st.sampled_from(
    [
        {"np": np.int64(3), "f": np.float32(0.5)},
        {"arr": np.arange(3), "nested": {"x": np.bool_(True)}},
        {"t": (1, 2)},
        {1: "int key", "s": "x"},
    ]
)


@_PROPERTY
@given(docs=st.lists(_DOCS | _NUMPY_DOCS, max_size=6))
def test_normalize_documents_agrees_with_one_document_at_a_time(docs: list[Any]) -> None:
    batch = normalize_documents(docs, "metadata of episode {}")
    expected_leaves = []
    for k, doc in enumerate(docs):
        text, read_back = normalize_document(doc, "metadata")
        leaves, inexact = document_leaves(read_back)
        assert _typed(json.loads(batch.texts[k])) == _typed(json.loads(text))
        assert _typed(batch.dicts[k]) == _typed(read_back)
        assert batch.inexact[k] == inexact
        expected_leaves += [(*leaf, k) for leaf in leaves]
    assert [_typed(list(leaf)) for leaf in batch.leaves] == [
        _typed(list(leaf)) for leaf in expected_leaves
    ]


def test_normalize_documents_names_the_bad_document() -> None:
    with pytest.raises(TupliStorageError, match="metadata of episode 2"):
        normalize_documents([{}, {"a": 1}, {"x": object()}], "metadata of episode {}")
    with pytest.raises(TupliStorageError, match="metadata of episode 1 must be a dict"):
        normalize_documents([{}, [1]], "metadata of episode {}")


_FLAT_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1, 2**80]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.just("\ud800x"),
)
_FLAT_KEYS = st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=3)


@_PROPERTY
@given(docs=st.lists(st.dictionaries(_FLAT_KEYS, _FLAT_VALUES, max_size=4), min_size=1, max_size=4))
def test_flat_metadata_round_trips_with_its_types(docs: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store, ids = _store_with(Path(tmp), docs)
        headers = store.list_episodes()
        assert [h.id for h in headers] == ids
        for doc, header in zip(docs, headers, strict=True):
            assert _typed(header.metadata) == _typed(doc)
            assert _typed(store.load_episode(header.id).metadata) == _typed(doc)
        store.close()


def test_the_written_headers_equal_the_listed_ones(tmp_path: Path) -> None:
    docs = [{}, {"seed": 1, "tag": "é", "x": 2.5}, {"cfg": {"lr": np.float32(0.5)}}]
    store = FileStorage(tmp_path / "s")
    bench = store.store_benchmark(
        BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
    ).id
    written = store.record_episodes(
        [
            _episode(bench, d, n, rewards=np.full(n, 0.25, np.float32))
            for d, n in zip(docs, [1, 2, 3], strict=True)
        ]
    )
    listed = store.list_episodes()
    assert [h.model_dump() for h in written] == [h.model_dump() for h in listed]
    assert [h.episode_return for h in listed] == [0.25, 0.5, 0.75]
    assert listed[2].metadata == {"cfg": {"lr": 0.5}}


# --------------------------------------------------------------------------------------------
# bounds on one key: one range scan, the same answers


def test_bounds_on_one_path_compile_to_one_range_scan() -> None:
    seed = "SELECT owner FROM episode_leaves WHERE path = ? AND type = 1"
    both = FilterGEQ(key="metadata.seed", value=10) & FilterLT(key="metadata.seed", value=20.5)
    sql = compile_filter(both, EPISODE_FIELDS)
    assert sql.text.count(seed) == 1 and "value >= ? AND value < ?" in sql.text
    assert sql.params == ("seed", 10, 20.5, "seed") and sql.exact
    nested = FilterAND(
        filters=[
            FilterEQ(key="benchmark_id", value="b"),
            FilterAND(filters=[FilterGT(key="metadata.seed", value=1), both]),
        ]
    )
    sql = compile_filter(nested, EPISODE_FIELDS)
    assert sql.text.count(seed) == 1 and "t.benchmark_id = ?" in sql.text
    mixed = FilterGEQ(key="metadata.seed", value=1) & FilterLT(key="metadata.seed", value="z")
    assert compile_filter(mixed, EPISODE_FIELDS).text.count("SELECT owner") == 4  # two classes
    either = FilterGEQ(key="metadata.seed", value=1) | FilterLT(key="metadata.seed", value=5)
    assert compile_filter(either, EPISODE_FIELDS).text.count(seed) == 2  # OR is not merged


def test_range_filters_on_hand_made_data(seeded: tuple[FileStorage, list[str]]) -> None:
    store, ids = seeded
    between = FilterGEQ(key="metadata.seed", value=1) & FilterLT(key="metadata.seed", value=3)
    assert _listed(store, between) == [ids[0], ids[1]]
    closed = FilterGT(key="metadata.seed", value=1) & FilterLEQ(key="metadata.seed", value=3)
    assert _listed(store, closed) == [ids[1], ids[2]]  # 3.0 <= 3; '3' is a str
    text = FilterGEQ(key="metadata.seed", value="0") & FilterLT(key="metadata.seed", value="4")
    assert _listed(store, text) == [ids[3]]
    empty = FilterGT(key="metadata.seed", value=2) & FilterLT(key="metadata.seed", value=2)
    assert _listed(store, empty) == []
    pinned = FilterEQ(key="metadata.seed", value=2) & FilterGEQ(key="metadata.seed", value=True)
    assert _listed(store, pinned) == [ids[1]]


_X_VALUES = st.one_of(
    st.integers(-3, 3),
    st.floats(-3, 3),
    st.sampled_from([math.nan, math.inf, -math.inf, 2**63, 2**70, -(2**70)]),
    st.booleans(),
    st.none(),
    st.text(alphabet="ab1", max_size=2),
    st.just("\ud800"),
    st.lists(st.integers(0, 2), max_size=2),
    st.just({"y": 1}),
)
_BOUND_VALUES = st.one_of(
    st.integers(-4, 4),
    st.floats(-4, 4),
    st.sampled_from([math.nan, math.inf, 2**63, 2**70]),
    st.booleans(),
    st.text(alphabet="ab1", max_size=2),
)


def _bounds(key: str) -> st.SearchStrategy[BaseFilter]:
    ops = st.sampled_from([FilterEQ, FilterGT, FilterGEQ, FilterLT, FilterLEQ])
    return st.builds(lambda cls, v: cls(key=key, value=v), ops, _BOUND_VALUES)


@_PROPERTY
@given(
    values=st.lists(st.none() | _X_VALUES, min_size=1, max_size=10),
    conjunctions=st.lists(
        st.tuples(
            st.lists(_bounds("metadata.x"), min_size=2, max_size=4),
            st.none() | _bounds("metadata.y"),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_merged_bounds_agree_with_matches(
    values: list[Any], conjunctions: list[tuple[list[BaseFilter], BaseFilter | None, bool]]
) -> None:
    docs = [{} if v is None else {"x": v, "y": i % 3} for i, v in enumerate(values)]
    with tempfile.TemporaryDirectory() as tmp:
        store, ids = _store_with(Path(tmp), docs)
        for bounds, other, nest in conjunctions:
            operands: list[BaseFilter] = list(bounds) + ([other] if other is not None else [])
            f: BaseFilter = FilterAND(filters=operands)
            if nest:  # the same conjunction, as nested ANDs
                f = FilterAND(
                    filters=[FilterAND(filters=operands[:1]), FilterAND(filters=operands[1:])]
                )
            expected = [
                i
                for i, h in zip(ids, store.list_episodes(), strict=True)
                if matches(f, h.model_dump())
            ]
            assert _listed(store, f) == expected, f
            assert store._episode_locations(f).ids == expected, f
        store.close()


# --------------------------------------------------------------------------------------------
# schema migration


_V1_EPISODES = """
CREATE TABLE episodes_v1 (
    rid INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, benchmark_id TEXT NOT NULL,
    shard TEXT NOT NULL, row_start INTEGER NOT NULL, row_stop INTEGER NOT NULL,
    n_tuples INTEGER NOT NULL, episode_return REAL, terminated INTEGER NOT NULL,
    timeout INTEGER NOT NULL, truncated INTEGER NOT NULL, metadata TEXT NOT NULL,
    created_by TEXT NOT NULL, created_at TEXT NOT NULL, published_in TEXT NOT NULL,
    inexact INTEGER NOT NULL)
"""


def _downgrade_to_version_1(path: Path) -> None:
    """Rewrites a catalog in the version-1 shape (shard names, no flags, no episode blocks)."""
    with sqlite3.connect(path) as conn:
        conn.execute(_V1_EPISODES)
        conn.execute(
            "INSERT INTO episodes_v1 SELECT e.rid, e.id, e.benchmark_id, s.name, e.row_start, "
            "e.row_stop, e.n_tuples, e.episode_return, e.terminated, e.timeout, e.truncated, "
            "e.metadata, e.created_by, e.created_at, e.published_in, e.inexact "
            "FROM episodes e JOIN shards s ON s.rid = e.shard_rid"
        )
        conn.execute("DROP TABLE episodes")
        conn.execute("ALTER TABLE episodes_v1 RENAME TO episodes")
        conn.execute("CREATE INDEX episodes_benchmark ON episodes(benchmark_id)")
        conn.execute("CREATE INDEX episodes_shard ON episodes(shard)")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
        conn.execute("DROP TABLE episode_blocks")  # version 1 had no blocks
        conn.execute("DELETE FROM meta WHERE key = 'episode_blocks'")
    conn.close()


def test_a_version_1_catalog_is_migrated_on_open(tmp_path: Path) -> None:
    store = FileStorage(tmp_path / "s")
    bench = store.store_benchmark(
        BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b"))
    ).id
    image = EpisodeData(
        observations={"img": np.ones((3, 2, 2), np.uint8)}, actions=np.zeros(2, np.int32),
        rewards=np.ones(2, np.float32), discounts=np.ones(2, np.float32), terminated=False,
        truncated=True, metadata={"seed": 5}, benchmark_id=bench,
    )  # fmt: skip
    store.record_episodes([_episode(bench, {"seed": k}, k + 1) for k in range(3)] + [image])
    store.delete_episode(store.list_episodes()[1].id)
    headers = [h.model_dump() for h in store.list_episodes()]
    before = store._episode_locations()
    store.close()
    _downgrade_to_version_1(tmp_path / "s" / "catalog.sqlite")
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        assert "shard" in {r[1] for r in conn.execute("PRAGMA table_info(episodes)")}
    conn.close()

    reopened = FileStorage(tmp_path / "s")
    assert [h.model_dump() for h in reopened.list_episodes()] == headers
    after = reopened._episode_locations()
    assert after.ids == before.ids and after.shard_paths == before.shard_paths
    for name in ("shard_index", "row_start", "row_stop", "n_tuples", "terminated", "truncated"):
        np.testing.assert_array_equal(getattr(after, name), getattr(before, name))
    assert reopened.load_episode(headers[-1]["id"]).observations["img"].shape == (3, 2, 2)
    assert _listed(reopened, FilterGEQ(key="metadata.seed", value=2)) == [
        headers[1]["id"],
        headers[2]["id"],
    ]
    assert reopened.verify() == []
    new = reopened.record_episode(_episode(bench, {"seed": 9}))
    assert _listed(reopened, FilterEQ(key="metadata.seed", value=9)) == [new.id]
    assert reopened._catalog.query("SELECT value FROM meta WHERE key = 'schema_version'") == [
        (str(SCHEMA_VERSION),)
    ]
    reopened.close()


def test_a_newer_catalog_is_refused(tmp_path: Path) -> None:
    FileStorage(tmp_path / "s").close()
    with sqlite3.connect(tmp_path / "s" / "catalog.sqlite") as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(TupliStorageError, match="upgrade tupli_jax"):
        FileStorage(tmp_path / "s")


def test_the_wal_file_is_cut_back_after_a_big_transaction(tmp_path: Path) -> None:
    """Expanding many episode runs is one big transaction; the WAL file must not keep its size
    (``journal_size_limit``) once a later write restarts it."""
    catalog = Catalog(tmp_path / "catalog.sqlite", "store")
    wal = tmp_path / "catalog.sqlite-wal"
    with catalog.write() as conn:
        conn.execute("INSERT INTO meta VALUES ('big', ?)", (b"x" * (24 << 20),))
    assert wal.stat().st_size > 24 << 20
    for k in range(3):  # the next writes restart the checkpointed WAL
        with catalog.write() as conn:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('small', ?)", (str(k),))
    assert wal.stat().st_size <= 4 << 20
