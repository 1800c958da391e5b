"""Tests of ``tupli_jax.benchmark``: safe env loading, hashing, and benchmark storage operations.

Hostile payloads are hand-written jsonpickle JSON that tries to create a marker file (or delete a
directory); each test checks the marker never appears, and the ``trusted=True`` runs show the
same payloads really do what they try (so the refusals are not vacuous). Round trips compare the
loaded env with the original by stepping both with the same seeds and actions.
"""

from __future__ import annotations

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
import gymnasium
import jax
import jax.numpy as jnp
import jsonpickle
import jumanji
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax.benchmark import (
    UnsafePayloadError,
    _GuardedUnpickler,
    audit_payload,
    benchmark_hash,
    delete_benchmark,
    deserialize_env,
    load_env,
    publish_benchmark,
    serialize_env,
    store_benchmark,
)
from tupli_jax.schema import (
    ArtifactMetadata,
    BenchmarkMetadata,
    Episode,
    FilterEQ,
    RLTuple,
)
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.file_storage import FileStorage

GYM_IDS = ["CartPole-v1", "Pendulum-v1", "MountainCar-v0"]
JUMANJI_IDS = ["Game2048-v1", "Snake-v1", "Maze-v0"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def fn(name: str) -> dict[str, Any]:
    return {"py/function": name}


def ty(name: str) -> dict[str, Any]:
    return {"py/type": name}


def tup(*items: Any) -> dict[str, Any]:
    return {"py/tuple": list(items)}


def call(target: Any, *args: Any, state: Any = None) -> dict[str, Any]:
    reduce = [target, tup(*args)]
    if state is not None:
        reduce.append(state)
    return {"py/reduce": reduce}


def made_gym(env_id: str, seed: int = 0, steps: int = 3) -> gymnasium.Env[Any, Any]:
    env = gymnasium.make(env_id)
    env.reset(seed=seed)
    env.action_space.seed(seed)
    for _ in range(steps):
        env.step(env.action_space.sample())
    return env


def rollout(env: gymnasium.Env[Any, Any], actions: list[Any], seed: int | None) -> list[Any]:
    """Observations and rewards of a reset (seeded or continuing the env's RNG) and steps."""
    obs, _ = env.reset(seed=seed)
    out: list[Any] = [np.asarray(obs)]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        out.extend([np.asarray(obs), float(reward), terminated, truncated])
        if terminated or truncated:
            obs, _ = env.reset()
            out.append(np.asarray(obs))
    return out


def assert_same_rollout(a: list[Any], b: list[Any]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if isinstance(x, np.ndarray):
            np.testing.assert_array_equal(x, y)
        else:
            assert x == y


def assert_trees_equal(a: Any, b: Any) -> None:
    leaves_a, tree_a = jax.tree_util.tree_flatten(a)
    leaves_b, tree_b = jax.tree_util.tree_flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def cartpole_payload_with(evil: Any) -> str:
    """A real CartPole payload with ``evil`` added as an attribute of the innermost env."""
    data = json.loads(serialize_env(made_gym("CartPole-v1")))
    node = data
    while not node["py/object"].endswith("CartPoleEnv"):
        node = node["env"]
    node["evil"] = evil
    return json.dumps(data)


@pytest.fixture
def store(tmp_path: Path) -> FileStorage:
    return FileStorage(tmp_path / "store")


# --------------------------------------------------------------------------------------------
# round trips that must load without trusted=True
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_id", GYM_IDS)
def test_gym_envs_round_trip_untrusted_and_behave_identically(env_id: str) -> None:
    env = made_gym(env_id)
    loaded = deserialize_env(serialize_env(env))
    assert [type(e).__name__ for e in _chain(loaded)] == [type(e).__name__ for e in _chain(env)]
    assert loaded.spec == env.spec
    actions = [env.action_space.sample() for _ in range(40)]
    # Without a seed the loaded env continues the original's RNG state; then with a seed.
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))
    assert_same_rollout(rollout(loaded, actions, 7), rollout(env, actions, 7))


def _chain(env: Any) -> list[Any]:
    chain = [env]
    while isinstance(chain[-1], gymnasium.Wrapper):
        chain.append(chain[-1].env)
    return chain


def test_gym_payload_is_plain_jsonpickle_for_pytupli_readers() -> None:
    env = made_gym("CartPole-v1")
    payload = serialize_env(env)
    assert payload == jsonpickle.encode(env, indent=4)  # pytupli's own encoding, byte for byte
    plain = jsonpickle.decode(payload)
    actions = [env.action_space.sample() for _ in range(10)]
    assert_same_rollout(rollout(plain, actions, 3), rollout(env, actions, 3))


def test_pytupli_payload_loads_untrusted() -> None:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper

    env = made_gym("Pendulum-v1")
    payload = PytupliWrapper(env, storage=None).serialize_env(env)  # type: ignore[arg-type]
    loaded = deserialize_env(payload)
    assert loaded.unwrapped.related_artifacts == []
    actions = [env.action_space.sample() for _ in range(10)]
    assert_same_rollout(rollout(loaded, actions, 1), rollout(env, actions, 1))


def test_custom_env_subclass_round_trips_untrusted() -> None:
    env = envs_for_tests.NoisyWalkEnv(size=3, noise_seed=11)
    env.reset(seed=2)
    env.step(np.int64(2))
    loaded = deserialize_env(serialize_env(env))
    assert type(loaded) is envs_for_tests.NoisyWalkEnv
    assert loaded.table == {0: -1.0, 1: 0.0, 2: 1.0}  # int keys kept
    np.testing.assert_array_equal(loaded.gains, env.gains)
    actions = [np.int64(a) for a in [0, 2, 2, 1, 0, 2, 1, 1, 0, 2] * 3]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))
    assert_same_rollout(rollout(loaded, actions, 5), rollout(env, actions, 5))


@pytest.fixture(scope="module")
def jumanji_envs() -> dict[str, Any]:
    return {env_id: jumanji.make(env_id) for env_id in JUMANJI_IDS}


@pytest.mark.parametrize("env_id", JUMANJI_IDS)
def test_jumanji_envs_round_trip_untrusted(env_id: str, jumanji_envs: dict[str, Any]) -> None:
    env = jumanji_envs[env_id]
    loaded = deserialize_env(serialize_env(env))
    assert type(loaded) is type(env)
    # jumanji's own env code needs standard promotion (conftest turns on the strict rules).
    # Unjitted: the loaded env reuses the primitives the original compiled (jit would not).
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        key = jax.random.PRNGKey(3)
        state_a, ts_a = env.reset(key)
        state_b, ts_b = loaded.reset(key)
        assert_trees_equal((state_a, ts_a), (state_b, ts_b))
        mask = np.asarray(ts_a.observation.action_mask).reshape(-1)
        action = jnp.asarray(int(np.flatnonzero(mask)[-1]), jnp.int32)
        assert_trees_equal(env.step(state_a, action), loaded.step(state_b, action))
    spec_a, spec_b = env.observation_spec, loaded.observation_spec
    assert_trees_equal(spec_b.generate_value(), spec_a.generate_value())


# Beyond the three above, envs whose classes need each admission rule: chex dataclasses called
# (MultiCVRP) or rebuilt (SearchAndRescue, BinPack), a generator with no base (LevelBased-
# Foraging), matplotlib colormaps in viewers (CVRP). Sokoban downloads its levels when made;
# MMST holds a closure jsonpickle cannot encode (not loadable even with trusted=True).
JUMANJI_MORE = [
    "MultiCVRP-v0",
    "SearchAndRescue-v0",
    "BinPack-v2",
    "LevelBasedForaging-v0",
    "CVRP-v1",
]


def assert_same_as_plain_jsonpickle(payload: str, loaded: Any) -> None:
    """The guarded loader rebuilds exactly what unguarded jsonpickle rebuilds."""
    plain = jsonpickle.decode(payload, keys=True)
    assert serialize_env(loaded) == serialize_env(plain)


@pytest.mark.parametrize("env_id", JUMANJI_MORE)
def test_more_jumanji_envs_load_untrusted(env_id: str) -> None:
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        env = jumanji.make(env_id)  # some constructors need jumanji's usual promotion rules
    payload = serialize_env(env)
    assert audit_payload(payload) == []
    loaded = deserialize_env(payload)
    assert type(loaded) is type(env)
    assert_same_as_plain_jsonpickle(payload, loaded)


@pytest.mark.parametrize(
    "env_id", ["Acrobot-v1", "FrozenLake-v1", "CliffWalking-v1", "Blackjack-v1", "Taxi-v4"]
)
def test_more_gym_envs_round_trip_untrusted(env_id: str) -> None:
    env = made_gym(env_id)
    payload = serialize_env(env)
    loaded = deserialize_env(payload)
    assert_same_as_plain_jsonpickle(payload, loaded)
    actions = [env.action_space.sample() for _ in range(30)]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))


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


def test_jumanji_viewer_keeps_its_render_mode() -> None:
    from jumanji.environments.logic.game_2048.env import Game2048
    from jumanji.environments.logic.game_2048.viewer import Game2048Viewer

    env = Game2048(viewer=Game2048Viewer("2048", board_size=4, render_mode="rgb_array"))
    loaded = deserialize_env(serialize_env(env))
    with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
        state, _ = env.reset(jax.random.PRNGKey(0))
    frame = loaded.render(state)
    assert isinstance(frame, np.ndarray) and frame.ndim == 3
    np.testing.assert_array_equal(frame, env.render(state))
    loaded.close()
    env.close()


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
# hashing
# --------------------------------------------------------------------------------------------

HASH_SCRIPT = textwrap.dedent(
    """
    import envs_for_tests, gymnasium, jumanji
    from tupli_jax.benchmark import benchmark_hash
    from tupli_jax.schema import BenchmarkMetadata
    meta = BenchmarkMetadata(name="h", description="d", version="1",
                             extra={"tags": ["b", "a"], "cfg": {"x": 1.5, "y": None}})
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    print(benchmark_hash(env, meta))
    print(benchmark_hash(jumanji.make("Snake-v1"), meta))
    print(benchmark_hash(envs_for_tests.NoisyWalkEnv(), meta))
    """
)


def test_hash_is_deterministic_across_processes(jumanji_envs: dict[str, Any]) -> None:
    meta = BenchmarkMetadata(
        name="h",
        description="d",
        version="1",
        extra={"tags": ["b", "a"], "cfg": {"x": 1.5, "y": None}},
    )
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    here = [
        benchmark_hash(env, meta),
        benchmark_hash(jumanji_envs["Snake-v1"], meta),
        benchmark_hash(envs_for_tests.NoisyWalkEnv(), meta),
    ]
    root = Path(__file__).resolve().parents[1]
    environ = {
        **os.environ,
        "PYTHONHASHSEED": "12345",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
    }
    result = subprocess.run(
        [sys.executable, "-c", HASH_SCRIPT], capture_output=True, text=True, env=environ, check=True
    )
    assert result.stdout.split() == here


def test_hash_changes_with_env_state_and_metadata() -> None:
    meta = BenchmarkMetadata(name="a")
    env = gymnasium.make("CartPole-v1")
    env.reset(seed=0)
    base = benchmark_hash(env, meta)
    assert len(base) == 64 and int(base, 16) >= 0
    assert benchmark_hash(env, meta) == base
    assert benchmark_hash(env, BenchmarkMetadata(name="b")) != base
    assert benchmark_hash(env, BenchmarkMetadata(name="a", extra={"k": 1})) != base
    other = gymnasium.make("CartPole-v1")
    other.reset(seed=1)
    assert benchmark_hash(other, meta) != base
    with pytest.raises(TypeError, match="BenchmarkMetadata"):
        benchmark_hash(env, {"name": "a"})  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# storage operations
# --------------------------------------------------------------------------------------------


def _episode(benchmark_id: str, n: int) -> Episode:
    tuples = [RLTuple(state=[float(i)], action=0, reward=1.0) for i in range(n)]
    tuples[-1] = RLTuple(state=[float(n)], action=0, reward=1.0, terminal=True)
    return Episode(benchmark_id=benchmark_id, metadata={"n": n}, tuples=tuples)


def test_store_load_round_trip_and_dedup(store: FileStorage) -> None:
    env = made_gym("CartPole-v1")
    first = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 0})
    again = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 0})
    other = store_benchmark(store, env, name="cp", description="d", metadata={"seed": 1})
    assert first == again != other
    assert sorted(h.id for h in store.list_benchmarks()) == sorted({first, other})
    header = store.load_benchmark(first)
    assert header.metadata.extra == {"seed": 0} and header.metadata.description == "d"
    loaded = load_env(store, first)
    actions = [env.action_space.sample() for _ in range(20)]
    assert_same_rollout(rollout(loaded, actions, None), rollout(env, actions, None))


def test_store_uses_given_serialization_and_rejects_bad_metadata(store: FileStorage) -> None:
    env = envs_for_tests.NoisyWalkEnv()
    custom = serialize_env(envs_for_tests.NoisyWalkEnv(size=2))
    bench_id = store_benchmark(store, env, name="walk", serialized=custom)
    assert store.load_benchmark(bench_id).serialized == custom
    assert load_env(store, bench_id).position.shape == (2,)
    with pytest.raises(TupliStorageError, match="metadata"):
        store_benchmark(store, env, name="walk", metadata=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(TupliStorageError, match="serialized"):
        store_benchmark(store, env, name="walk", serialized=b"{}")  # type: ignore[arg-type]


def test_load_env_refuses_unsafe_stored_payload_unless_trusted(
    store: FileStorage, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    evil = cartpole_payload_with(call(fn("os.system"), f"touch {marker}"))
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="evil", serialized=evil)
    with pytest.raises(UnsafePayloadError, match=r"os\.system"):
        load_env(store, bench_id)
    assert not marker.exists()
    load_env(store, bench_id, trusted=True)
    assert marker.exists()


def test_publish_benchmark(store: FileStorage) -> None:
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="cp")
    publish_benchmark(store, bench_id, publish_in="team")
    assert "team" in store.load_benchmark(bench_id).published_in
    with pytest.raises(TupliStorageError):
        publish_benchmark(store, "0" * 32)


class SpyStorage(FileStorage):
    """A real FileStorage that records how episodes were listed."""

    listed: list[bool]

    def list_episodes(self, filter: Any = None, include_tuples: bool = False) -> Any:
        self.listed = [*getattr(self, "listed", []), include_tuples]
        return super().list_episodes(filter, include_tuples=include_tuples)


def test_delete_benchmark_removes_its_episodes_only(tmp_path: Path) -> None:
    store = SpyStorage(tmp_path / "store")
    keep = store_benchmark(store, made_gym("CartPole-v1"), name="keep")
    drop = store_benchmark(store, made_gym("Pendulum-v1"), name="drop")
    kept = [store.record_episode(_episode(keep, n)).id for n in (2, 3)]
    for n in (1, 4, 5):
        store.record_episode(_episode(drop, n))
    delete_benchmark(store, drop)
    assert store.listed == [False]  # episodes found without loading tuples
    assert sorted(h.id for h in store.list_episodes()) == sorted(kept)
    assert [h.id for h in store.list_benchmarks()] == [keep]
    with pytest.raises(TupliStorageError):
        store.load_benchmark(drop)


def test_delete_benchmark_can_keep_episodes_and_refuses_unknown_ids(store: FileStorage) -> None:
    bench_id = store_benchmark(store, made_gym("CartPole-v1"), name="cp")
    episode = store.record_episode(_episode(bench_id, 3)).id
    with pytest.raises(TupliStorageError):
        delete_benchmark(store, "f" * 32)
    assert [h.id for h in store.list_episodes()] == [episode]
    delete_benchmark(store, bench_id, delete_episodes=False)
    assert [h.id for h in store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))] == [
        episode
    ]
    assert store.list_benchmarks() == []


def test_delete_benchmark_deletes_related_artifacts(store: FileStorage) -> None:
    from pytupli.benchmark import TupliEnvWrapper as PytupliWrapper

    artifacts = [
        store.store_artifact(data, ArtifactMetadata(name=name)).id
        for name, data in [("a", b"1,2"), ("b", b"3,4"), ("c", b"5,6")]
    ]
    env = made_gym("CartPole-v1")
    given_id = store_benchmark(store, env, name="given")
    delete_benchmark(store, given_id, delete_artifacts=True, related_artifacts=artifacts[:1])
    assert sorted(a.id for a in store.list_artifacts()) == sorted(artifacts[1:])
    # pytupli keeps the ids on env.unwrapped.related_artifacts; they are read from the JSON.
    wrapper = PytupliWrapper(env, storage=None)  # type: ignore[arg-type]
    wrapper._serialize = lambda e: (e, artifacts[1:2])  # type: ignore[method-assign]
    payload = wrapper.serialize_env(env)
    pytupli_id = store_benchmark(store, env, name="pytupli", serialized=payload)
    delete_benchmark(store, pytupli_id, delete_artifacts=False)
    assert len(store.list_artifacts()) == 2
    again = store_benchmark(store, env, name="pytupli", serialized=payload)
    delete_benchmark(store, again, delete_artifacts=True)
    assert [a.id for a in store.list_artifacts()] == artifacts[2:]
