"""Tests of ``tupli_jax._safe_json``: the allow-list, the guarded unpickler and the size budget.

Payloads go through the public ``deserialize_env`` / ``audit_payload`` of ``tupli_jax.benchmark``.
Hostile payloads are hand-written jsonpickle JSON that tries to create a marker file (or delete a
directory); each test checks the marker never appears, and the ``trusted=True`` runs show the
same payloads really do what they try (so the refusals are not vacuous). Oversized payloads are
a few hundred bytes of JSON asking for a terabyte; the same payloads load when they ask for little.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import envs_for_tests
import jax.numpy as jnp
import jsonpickle
import numpy as np
import pytest
from _payloads import call, fn, made_gym, tup
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tupli_jax import _safe_json
from tupli_jax._safe_json import _GuardedUnpickler
from tupli_jax.benchmark import (
    MAX_DECODED_BYTES,
    UnsafePayloadError,
    audit_payload,
    deserialize_env,
    serialize_env,
)
from tupli_jax.storage.base import TupliStorageError

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def ty(name: str) -> dict[str, Any]:
    return {"py/type": name}


def cartpole_payload_with(evil: Any) -> str:
    """A real CartPole payload with ``evil`` added as an attribute of the innermost env."""
    data = json.loads(serialize_env(made_gym("CartPole-v1")))
    node = data
    while not node["py/object"].endswith("CartPoleEnv"):
        node = node["env"]
    node["evil"] = evil
    return json.dumps(data)


# --------------------------------------------------------------------------------------------
# admission rules
# --------------------------------------------------------------------------------------------


def test_plain_records_load_untrusted_but_records_with_hooks_do_not(tmp_path: Path) -> None:
    config = envs_for_tests.WalkConfig(3, envs_for_tests.GridPoint(1, 2))
    assert deserialize_env(serialize_env([config, config.start])) == [config, config.start]
    called = call(ty("envs_for_tests.WalkConfig"), 4, call(ty("envs_for_tests.GridPoint"), 0, 1))
    assert deserialize_env(json.dumps(called)) == envs_for_tests.WalkConfig(
        4, envs_for_tests.GridPoint(0, 1)
    )
    marker = tmp_path / "marker"
    hooked = json.dumps(call(ty("envs_for_tests.CheckedConfig"), str(marker)))
    with pytest.raises(UnsafePayloadError, match="CheckedConfig"):
        deserialize_env(hooked)
    assert not marker.exists()
    deserialize_env(hooked, trusted=True)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# hostile payloads
# --------------------------------------------------------------------------------------------

# (id, builder(marker, victim_dir) -> payload object, whether trusted decoding hits the marker)
Builder = Callable[[str, str], Any]
HOSTILE: list[tuple[str, Builder, bool]] = [
    ("os.system", lambda m, v: call(fn("os.system"), f"touch {m}"), True),
    ("eval", lambda m, v: call(fn("builtins.eval"), f"open({m!r}, 'w').close()"), True),
    ("exec", lambda m, v: call(fn("builtins.exec"), f"open({m!r}, 'w').close()"), True),
    ("Popen", lambda m, v: call(ty("subprocess.Popen"), ["touch", m]), False),
    ("check_call", lambda m, v: call(fn("subprocess.check_call"), ["touch", m]), True),
    ("open", lambda m, v: call(fn("builtins.open"), m, "w"), True),
    ("rmtree", lambda m, v: call(fn("shutil.rmtree"), v), True),
    ("savetxt", lambda m, v: call(fn("numpy.savetxt"), m, [1.0, 2.0]), True),
    ("memmap", lambda m, v: call(ty("numpy.memmap"), m, "uint8", "w+", 0, tup(4)), True),
    (
        "memmap-subtype",
        lambda m, v: call(
            fn("numpy._core.multiarray._reconstruct"), ty("numpy.memmap"), tup(0), "b"
        ),
        False,
    ),
    (
        "function-arg-jax",
        lambda m, v: call(
            fn("jax._src.array._reconstruct_array"), fn("os.system"), tup(f"touch {m}"), {}, {}
        ),
        True,
    ),
    (
        "function-arg-rng",
        lambda m, v: call(
            fn("numpy.random._pickle.__generator_ctor"), f"touch {m}", fn("os.system")
        ),
        True,
    ),
    (
        "defaultdict-factory",
        lambda m, v: {"py/object": "collections.defaultdict", "default_factory": fn("os.system")},
        False,
    ),
    (
        "newobj-setstate",
        lambda m, v: {
            "py/reduce": ["py/newobj", tup(ty("envs_for_tests.FileWriter")), {"path": m}]
        },
        True,
    ),
    (
        "newobj-not-a-type",
        lambda m, v: [
            call(ty("collections.OrderedDict")),
            {"py/reduce": ["py/newobj", tup({"py/id": 1}), {"path": m}]},
        ],
        False,
    ),
    (
        "py/id-callable",
        lambda m, v: [call(ty("builtins.list")), {"py/reduce": [{"py/id": 1}, tup()]}],
        False,
    ),
    ("py/repr", lambda m, v: {"py/repr": f"os/os.system('touch {m}')"}, False),
    ("py/mod", lambda m, v: {"py/mod": "os/os"}, False),
    ("env-constructor", lambda m, v: call(ty("envs_for_tests.MarkerOnInitEnv"), m), True),
    (
        "env-newargs",
        lambda m, v: {"py/object": "envs_for_tests.MarkerOnInitEnv", "py/newargs": tup(m)},
        False,
    ),
    (
        "setstate-writer",
        lambda m, v: {"py/object": "envs_for_tests.FileWriter", "py/state": {"path": m}},
        True,
    ),
    ("not-an-env", lambda m, v: {"py/object": "envs_for_tests.NotAnEnv"}, False),
    (
        "record-video",
        lambda m, v: {"py/object": "gymnasium.wrappers.rendering.RecordVideo", "video_folder": m},
        False,
    ),
    (
        "json-key",
        lambda m, v: {"json://" + json.dumps(call(fn("os.system"), f"touch {m}")): 1},
        True,
    ),
    ("unknown-tag", lambda m, v: {"py/evil": "os.system"}, False),
    (
        "nested-in-env",
        lambda m, v: json.loads(cartpole_payload_with(call(fn("os.system"), f"touch {m}"))),
        True,
    ),
]


@pytest.mark.parametrize(("case", "builder", "hits"), HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_payload_is_refused_and_runs_nothing(
    case: str, builder: Builder, hits: bool, tmp_path: Path
) -> None:
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    payload = json.dumps(builder(str(marker), str(victim)))
    with pytest.raises(UnsafePayloadError) as refused:
        deserialize_env(payload)
    assert "trusted=True" in str(refused.value)
    assert audit_payload(payload)  # lists the problem without running anything
    assert not marker.exists()
    assert victim.is_dir()


@pytest.mark.parametrize(
    ("case", "builder"),
    [(c, b) for c, b, hits in HOSTILE if hits],
    ids=[c for c, _, h in HOSTILE if h],
)
def test_trusted_decoding_does_run_the_hostile_payload(
    case: str, builder: Builder, tmp_path: Path
) -> None:
    """The same payloads decoded with trusted=True do their harm: the refusals above are real."""
    marker, victim = tmp_path / "marker", tmp_path / "victim"
    victim.mkdir()
    payload = json.dumps(builder(str(marker), str(victim)))
    # Some payloads fail after doing their harm (e.g. while rebuilding the result).
    with contextlib.suppress(TupliStorageError):
        deserialize_env(payload, trusted=True)
    assert marker.exists() or not victim.exists()


def test_py_repr_is_never_evaluated_even_when_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    payload = json.dumps({"py/repr": "os/os.system('touch marker')"})
    with pytest.raises(UnsafePayloadError, match="py/repr"):
        deserialize_env(payload)
    deserialize_env(payload, trusted=True)  # decodes with safe=True: never evals
    assert not (tmp_path / "marker").exists()
    with pytest.warns(DeprecationWarning):
        jsonpickle.decode(payload, safe=False)  # what the refusal protects against
    assert (tmp_path / "marker").exists()


def test_import_module_payload_never_imports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    module = "tupli_marker_module_benchmark_test"
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    payload = json.dumps(call(fn("importlib.import_module"), module))
    with pytest.raises(UnsafePayloadError, match=r"importlib\.import_module"):
        deserialize_env(payload)
    assert not marker.exists() and module not in sys.modules
    deserialize_env(payload, trusted=True)
    assert marker.exists()
    sys.modules.pop(module, None)


@pytest.mark.parametrize("module", ["antigravity", "this"])
def test_deny_listed_modules_are_never_imported_to_check_a_class(module: str) -> None:
    if module in sys.modules:
        pytest.skip(f"{module} was already imported by something else")
    with pytest.raises(UnsafePayloadError, match=module):
        deserialize_env(json.dumps({"py/object": f"{module}.SomeEnv"}))
    assert module not in sys.modules


def test_guarded_unpickler_refuses_unvetted_names_on_its_own(tmp_path: Path) -> None:
    """Second layer: even if the pre-check missed a name, the unpickler refuses it."""
    marker = tmp_path / "marker"
    unpickler = _GuardedUnpickler({})
    for node in (
        call(fn("os.system"), f"touch {marker}"),
        {"py/type": "subprocess.Popen"},
        {"py/object": "envs_for_tests.FileWriter", "py/state": {"path": str(marker)}},
        {"py/mod": "os/os"},
        {"py/reduce": [{"py/id": 0}, tup()]},
    ):
        with pytest.raises(UnsafePayloadError):
            unpickler.restore(node)
    assert not marker.exists()


def test_allow_trusts_named_callables_only(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    payload = json.dumps(
        {"py/object": "envs_for_tests.FileWriter", "py/state": {"path": str(marker)}}
    )
    with pytest.raises(UnsafePayloadError):
        deserialize_env(payload, allow=["envs_for_tests.NotAnEnv"])
    assert not marker.exists()
    deserialize_env(payload, allow=["envs_for_tests.FileWriter"])
    assert marker.exists()
    with pytest.raises(TypeError, match="dotted names"):
        deserialize_env(payload, allow=["not a name"])


MARK, VICTIM = "MARKERPATH", "VICTIMPATH"
# Payloads that hurt when decoded unguarded (the table above), nested below at random.
HARM = [b(MARK, VICTIM) for c, b, hits in HOSTILE if hits and c != "nested-in-env"]
NAMES = [
    "os.system",
    "builtins.open",
    "numpy.savetxt",
    "envs_for_tests.MarkerOnInitEnv",
    "envs_for_tests.FileWriter",
    "numpy._core.multiarray._reconstruct",
    "numpy.dtype",
    "builtins.list",
    "collections.OrderedDict",
    "jax._src.array._reconstruct_array",
    "numpy.random._pickle.__generator_ctor",
    "envs_for_tests.NoisyWalkEnv",
]
names = st.sampled_from(NAMES)
leaves = st.sampled_from(HARM) | st.sampled_from([MARK, f"touch {MARK}", "w", 0, 1, None])


def _hostile_tree(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    args = st.lists(children, max_size=3)
    return st.one_of(
        st.lists(children, max_size=3),
        st.builds(lambda n, a: call(fn(n), *a), names, args),
        st.builds(lambda n, a: call(ty(n), *a), names, args),
        st.builds(lambda t, a: {"py/reduce": [t, tup(*a)]}, children, args),
        st.builds(lambda n, s: {"py/reduce": ["py/newobj", tup(ty(n)), s]}, names, children),
        st.builds(lambda n, s: {"py/object": n, "py/state": s}, names, children),
        st.builds(lambda n, a: {"py/object": n, "py/newargs": tup(*a)}, names, args),
        st.builds(lambda k, a: {"py/reduce": [{"py/id": k}, tup(*a)]}, st.integers(0, 4), args),
        st.builds(lambda c: {"json://" + json.dumps(c): 1}, children),
        st.builds(lambda k, c: {k: c}, st.sampled_from(["a", "py/state", "env"]), children),
    )


@settings(max_examples=300, deadline=None)
@given(st.recursive(leaves, _hostile_tree, max_leaves=6))
def test_no_payload_runs_anything_untrusted(tree: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        marker, victim = Path(tmp) / "marker", Path(tmp) / "victim"
        victim.mkdir()
        payload = json.dumps(tree).replace(MARK, str(marker)).replace(VICTIM, str(victim))
        with contextlib.suppress(TupliStorageError):  # never another exception type
            deserialize_env(payload)
        assert not marker.exists()
        assert victim.is_dir()


def test_numpy_and_jax_arrays_of_every_dtype_round_trip_untrusted() -> None:
    import ml_dtypes

    zoo = {
        "f4": np.arange(3, dtype=np.float32),
        "u8": np.arange(4, dtype=np.uint8),
        "bool": np.array([True, False]),
        "str": np.array(["ab", "c"]),
        "bytes": np.array([b"x"]),
        "datetime": np.array(["2020-01-01"], dtype="M8[ns]"),
        "complex": np.array([1 + 2j]),
        "struct": np.arange(2 * 12, dtype=np.uint8).view([("a", "i4"), ("b", "f4", (2,))]),
        "aligned": np.zeros(2, dtype=np.dtype([("a", "i1"), ("b", "f8")], align=True)),
        "offsets": np.zeros(
            2, np.dtype({"names": ["a"], "formats": ["i4"], "offsets": [4], "itemsize": 12})
        ),
        "titles": np.zeros(1, dtype=np.dtype({"names": ["a"], "formats": ["i4"], "titles": ["T"]})),
        "object": np.array([1, "x", None], dtype=object),
        "object-field": np.array([(1, "x")], dtype=[("a", "i8"), ("b", "O")]),
        "bfloat16": np.arange(3).astype(ml_dtypes.bfloat16),
        "int4": np.arange(3).astype(ml_dtypes.int4),
        "scalar": np.float32(2.5),
        "empty": np.zeros((0, 3)),
        "jax": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "jax-bf16": jnp.arange(3, dtype=jnp.bfloat16),
    }
    loaded = deserialize_env(serialize_env(zoo))
    assert loaded.keys() == zoo.keys()
    for name, value in zoo.items():
        got = loaded[name]
        assert type(got) is type(value), name
        assert np.asarray(got).dtype == np.asarray(value).dtype, name
        assert str(np.asarray(got)) == str(np.asarray(value)), name  # also for object fields


FORGED_DTYPE_SCRIPT = textwrap.dedent(
    """
    import base64, json
    from tupli_jax.benchmark import deserialize_env
    from tupli_jax.storage.base import TupliStorageError

    def dtype(code, state):
        return {"py/reduce": [{"py/type": "numpy.dtype"}, {"py/tuple": [code, False, True]},
                              {"py/tuple": state}]}

    i8 = dtype("i8", [3, "<", None, None, None, -1, -1, 0])
    obj = lambda flags: dtype("O8", [3, "|", None, None, None, -1, -1, flags])
    def struct(b_type, b_offset, flags):
        fields = {"a": {"py/tuple": [i8, 0]}, "b": {"py/tuple": [b_type, b_offset]}}
        return dtype("V16", [3, "|", None, {"py/tuple": ["a", "b"]}, fields, 16, 1, flags])
    def array(dt, n_bytes):
        data = {"py/b64": base64.b64encode(b"A" * n_bytes).decode()}
        return {"py/reduce": [
            {"py/function": "numpy._core.multiarray._reconstruct"},
            {"py/tuple": [{"py/type": "numpy.ndarray"}, {"py/tuple": [0]}, {"py/b64": "Yg=="}]},
            {"py/tuple": [1, {"py/tuple": [1]}, dt, False, data]}]}
    cases = [array(struct(obj(63), 8, 0), 16), array(obj(0), 8), array(struct(i8, 4096, 0), 16)]
    for case in cases:
        try:
            print(repr(deserialize_env(json.dumps(case))))
        except TupliStorageError as exc:
            print("refused:", type(exc).__name__)
    """
)


def test_forged_numpy_dtypes_are_refused_not_read_as_pointers() -> None:
    """A dtype hiding an object field (or reaching past its itemsize) would make numpy read
    payload bytes as pointers: the decoder must refuse it. Run apart: a regression crashes."""
    root = Path(__file__).resolve().parents[1]
    environ = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", FORGED_DTYPE_SCRIPT], capture_output=True, text=True, env=environ
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["refused:", "UnsafePayloadError"] * 3


SHORT_ITEM_LIST_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from tupli_jax.benchmark import deserialize_env
    from tupli_jax.storage.base import TupliStorageError

    for payload in json.load(sys.stdin):
        try:
            print(repr(deserialize_env(payload)))
        except TupliStorageError as exc:
            print("refused:", type(exc).__name__)
    """
)


def test_object_array_states_with_too_few_items_are_refused() -> None:
    """numpy's ``__setstate__`` reads one list item per element without checking the list's
    length: a short list makes it read past the list. Run apart: a regression crashes."""
    short = tup(1, tup(4096), dtype_node("O8", 63), False, [None])
    as_jax_args = tup(ty("numpy.ndarray"), tup(0), {"py/b64": "Yg=="})
    payloads = [
        reconstruct(short),
        call(ty("numpy.float64"), [1.0, 2.0], state=short),  # a numpy scalar type builds an array
        {"py/object": "numpy.ndarray", "py/newargs": tup(tup(0)), "py/state": short},
        call(
            fn("jax._src.array._reconstruct_array"),
            fn("numpy._core.multiarray._reconstruct"),
            as_jax_args,
            short,
            {"weak_type": False},
        ),
    ]
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", SHORT_ITEM_LIST_SCRIPT],
        input=json.dumps([json.dumps(p) for p in payloads]),
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["refused:", "UnsafePayloadError"] * len(payloads)
    full = reconstruct(tup(1, tup(3), dtype_node("O8", 63), False, [1, "x", None]))
    assert deserialize_env(json.dumps(full)).tolist() == [1, "x", None]


def test_bad_payloads_raise_storage_errors() -> None:
    with pytest.raises(TupliStorageError, match="JSON"):
        deserialize_env("{not json")
    with pytest.raises(TupliStorageError, match="received bytes"):
        deserialize_env(b"{}")  # type: ignore[arg-type]
    with pytest.raises(TupliStorageError, match=r"nested too deeply|not valid JSON"):
        deserialize_env("[" * 100_000 + "]" * 100_000)
    with pytest.raises(TupliStorageError, match="nested too deeply"):
        depth = sys.getrecursionlimit() * 3 // 5  # json parses it; restoring takes 3 frames a level
        deserialize_env("[" * depth + "]" * depth)
    with pytest.raises(TupliStorageError, match="not installed"):
        deserialize_env(json.dumps({"py/object": "no_such_module_xyz.Env"}), trusted=True)
    with pytest.raises(UnsafePayloadError, match="no_such_module_xyz"):
        deserialize_env(json.dumps({"py/object": "no_such_module_xyz.Env"}))


def test_audit_payload_is_empty_for_loadable_envs() -> None:
    assert audit_payload(serialize_env(made_gym("MountainCar-v0"))) == []
    problems = audit_payload(cartpole_payload_with(call(fn("os.system"), "true")))
    assert problems == ["'os.system' (called)"]


# --------------------------------------------------------------------------------------------
# size budget
# --------------------------------------------------------------------------------------------

HUGE = 1 << 40  # elements or bytes: far beyond MAX_DECODED_BYTES, and beyond this machine


def dtype_node(code: str, flags: int) -> dict[str, Any]:
    """numpy's own jsonpickle encoding of ``np.dtype(code)`` (object dtypes have flags 63)."""
    return call(ty("numpy.dtype"), code, False, True, state=tup(3, "|", *[None] * 3, -1, -1, flags))


def reconstruct(state: Any) -> dict[str, Any]:
    """An array as numpy pickles it: ``_reconstruct(ndarray, (0,), b"b")``, then ``state``."""
    b = {"py/b64": "Yg=="}
    return call(
        fn("numpy._core.multiarray._reconstruct"), ty("numpy.ndarray"), tup(0), b, state=state
    )


def bytes_state(n: int) -> dict[str, Any]:
    """``ndarray.__setstate__`` state of ``n`` bytes (of real data only when ``n`` is small)."""
    data = {"py/b64": base64.b64encode(bytes(n if n <= 64 else 1)).decode()}
    return tup(1, tup(n), dtype_node("u1", 0), False, data)


def jax_array(n: int) -> dict[str, Any]:
    args = tup(ty("numpy.ndarray"), tup(0), {"py/b64": "Yg=="})
    state = bytes_state(n)
    return call(
        fn("jax._src.array._reconstruct_array"),
        fn("numpy._core.multiarray._reconstruct"),
        args,
        state,
        {"weak_type": False},
    )


# Small JSON asking for n bytes (n elements of u1 or n objects) along every path that builds an
# array or buffer from a size; each is loadable without trusted=True when n is small.
SIZED: list[tuple[str, Callable[[int], Any]]] = [
    ("ndarray-call", lambda n: call(ty("numpy.ndarray"), tup(n), "u1")),
    (
        "ndarray-newargsex",
        lambda n: {
            "py/object": "numpy.ndarray",
            "py/newargsex": [tup(), {"shape": tup(n), "dtype": "u1"}],
        },
    ),
    ("ndarray-newargs", lambda n: {"py/object": "numpy.ndarray", "py/newargs": tup(tup(n), "O")}),
    (
        "ndarray-initargs",
        lambda n: {"py/object": "numpy.ndarray", "py/initargs": tup(tup(n), "u1")},
    ),
    ("ndarray-newobj", lambda n: {"py/reduce": ["py/newobj", tup(ty("numpy.ndarray"), n, "O")]}),
    (
        "reconstruct-shape",
        lambda n: call(fn("numpy._core.multiarray._reconstruct"), ty("numpy.ndarray"), tup(n), "O"),
    ),
    ("reconstruct-state", lambda n: reconstruct(bytes_state(n))),
    (
        "py/object-state",
        lambda n: {
            "py/object": "numpy.ndarray",
            "py/newargs": tup(tup(0)),
            "py/state": bytes_state(n),
        },
    ),
    ("shape-by-py/id", lambda n: [[n], {"py/reduce": [ty("numpy.ndarray"), {"py/id": 1}]}]),
    ("shape-as-deque", lambda n: call(ty("numpy.ndarray"), call(ty("collections.deque"), [n]))),
    ("jax-array", jax_array),
    ("bounded-spec", lambda n: call(ty("jumanji.specs.BoundedArray"), tup(n), "u1", 0, 1)),
    ("bytes", lambda n: call(ty("builtins.bytes"), n)),
    ("bytearray", lambda n: call(ty("builtins.bytearray"), n)),
    ("numpy-bytes", lambda n: call(ty("numpy.bytes_"), n)),
    ("numpy-void", lambda n: call(ty("numpy.void"), n)),
    ("list-of-range", lambda n: call(ty("builtins.list"), call(ty("builtins.range"), n // 8))),
]


@pytest.mark.parametrize(("case", "build"), SIZED, ids=[c for c, _ in SIZED])
def test_payloads_asking_for_huge_arrays_or_buffers_are_refused(
    case: str, build: Callable[[int], Any]
) -> None:
    small = deserialize_env(json.dumps(build(64)))  # the same path loads when small
    assert small is not None
    payload = json.dumps(build(HUGE))
    assert len(payload) < 2000
    with pytest.raises(UnsafePayloadError, match=r"arrays and buffers.*trusted=True") as refused:
        deserialize_env(payload)
    assert f"{MAX_DECODED_BYTES} bytes" in str(refused.value)
    assert audit_payload(payload) == []  # sizes are only known while decoding


def test_size_limit_is_inclusive_and_trusted_skips_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_safe_json, "MAX_DECODED_BYTES", 4096)
    assert deserialize_env(json.dumps(call(ty("numpy.ndarray"), tup(4096), "u1"))).nbytes == 4096
    over = json.dumps(call(ty("numpy.ndarray"), tup(1025), "f4"))  # 4100 bytes
    with pytest.raises(UnsafePayloadError, match=r"4100 bytes for a numpy\.ndarray"):
        deserialize_env(over)
    assert deserialize_env(over, trusted=True).shape == (1025,)
    # A zero-strided view of one byte: no memory, but 2**40 bytes as far as a reader can tell.
    view = call(ty("numpy.ndarray"), tup(HUGE), "u1", {"py/b64": "AA=="}, 0, tup(0))
    with pytest.raises(UnsafePayloadError):
        deserialize_env(json.dumps(view))
    assert deserialize_env(json.dumps(view), trusted=True).nbytes == HUGE


def test_sizes_that_cannot_be_told_are_refused() -> None:
    for payload in (
        call(ty("numpy.ndarray"), "not a shape"),
        call(ty("numpy.ndarray"), tup(1.5)),
        call(ty("builtins.range"), 1 << 70),  # len() overflows
        call(fn("numpy._core.multiarray._reconstruct"), ty("numpy.ndarray")),
    ):
        with pytest.raises(UnsafePayloadError, match="size cannot be told"):
            deserialize_env(json.dumps(payload))


ARRAY_DTYPES = ["u1", "i4", "f8", "c16", "U3", "O", "bool", [("a", "i2"), ("b", "f4", (2,))]]


@st.composite
def real_arrays(draw: st.DrawFn) -> Any:
    dtype = np.dtype(draw(st.sampled_from(ARRAY_DTYPES)))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=6))
    array = np.zeros(shape, dtype)
    if dtype in (np.uint8, np.int32) and draw(st.booleans()):
        return jnp.asarray(array)  # a jax array: charged once, for its numpy state
    return array


@settings(max_examples=40, deadline=None)
@given(st.lists(real_arrays(), max_size=4), st.integers(0, 3000))
def test_real_arrays_load_exactly_when_their_total_size_fits(arrays: list[Any], limit: int) -> None:
    """The budget counts what numpy reports: the sum of ``nbytes`` over the arrays."""
    payload = serialize_env(arrays)
    total = sum(int(np.asarray(a).nbytes) for a in arrays)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_safe_json, "MAX_DECODED_BYTES", limit)
        if total <= limit:
            loaded = deserialize_env(payload)
            assert [type(a) for a in loaded] == [type(a) for a in arrays]
            assert [np.asarray(a).shape for a in loaded] == [np.asarray(a).shape for a in arrays]
        else:
            with pytest.raises(UnsafePayloadError, match=f"more than the {limit} bytes"):
                deserialize_env(payload)
