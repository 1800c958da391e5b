"""Tests of tupli_jax/checkpoint.py: orbax checkpoints of (device tree, host state) on real files.

Round trips are checked for exact equality (structure, dtypes, shapes, bytes and Python types).
The crash tests run ``tests/_checkpoint_writer.py`` in a subprocess and SIGKILL it: at random
moments during a sequence of saves, and deterministically halfway through one save.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checkpoint_writer import abstract, expected, same, same_tree
from flax import struct
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tupli_jax.checkpoint import Checkpointer

WRITER = Path(__file__).with_name("_checkpoint_writer.py")


class Pos(NamedTuple):
    row: jax.Array
    col: jax.Array


@struct.dataclass
class State:
    pos: Pos
    key: jax.Array
    count: jax.Array
    extras: dict[str, Any]
    history: list[Any]


def _state(seed: int = 0) -> State:
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return State(
        pos=Pos(jnp.arange(4, dtype=jnp.int32) + seed, jnp.full(4, seed, jnp.int8)),
        key=keys,
        count=jnp.asarray(seed, jnp.int32),
        extras={
            "flag": jnp.asarray([True, False]),
            "half": jnp.linspace(0, 1, 3).astype(jnp.bfloat16),
            "empty": jnp.zeros((4, 0, 2), jnp.float32),
        },
        history=[jnp.ones((2, 3), jnp.float32) * seed, np.arange(5, dtype=np.uint16)],
    )


def _steps_on_disk(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


@pytest.fixture
def ckpt(tmp_path: Path) -> Any:
    with Checkpointer(tmp_path / "ckpt") as checkpointer:
        yield checkpointer


# --------------------------------------------------------------------------------------------
# round trips


def test_a_tree_and_host_state_round_trip_exactly(ckpt: Checkpointer) -> None:
    tree = _state(3)
    host = {
        "carry": [[np.arange(6, dtype=np.float32).reshape(3, 2)], [np.zeros((0, 2), np.int64)]],
        "names": np.asarray(["ab", "c"]),
        "scalar": np.float32(2.5),
        "pair": (1, "a", None),
        "episodes": 12,
        "huge": 2**80,
        "rate": 0.1,
        "inf": -math.inf,
        "nested": {"ok": True, "list": [1.5, "x", False]},
    }
    ckpt.save(0, tree, host)
    restored, restored_host = ckpt.restore(0, jax.eval_shape(lambda: tree))
    assert isinstance(restored, State) and isinstance(restored.pos, Pos)
    assert same_tree(restored, tree)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree_util.tree_leaves(restored))
    assert same(restored_host, host)
    assert restored_host["carry"][1][0].shape == (0, 2)
    assert isinstance(restored_host["scalar"], np.float32) and type(restored_host["pair"]) is tuple


def test_host_nan_and_jax_arrays(ckpt: Checkpointer) -> None:
    ckpt.save(0, {}, {"nan": math.nan, "device": jnp.arange(3, dtype=jnp.int32)})
    _, host = ckpt.restore(0, {})
    assert math.isnan(host["nan"])
    assert type(host["device"]) is np.ndarray and host["device"].dtype == np.int32
    np.testing.assert_array_equal(host["device"], [0, 1, 2])


def test_restored_arrays_are_independent_and_writable(ckpt: Checkpointer) -> None:
    ckpt.save(0, {}, {"a": np.zeros(3, np.int8), "b": np.ones(3, np.int8)})
    _, host = ckpt.restore(0, {})
    host["a"][:] = 7
    np.testing.assert_array_equal(host["b"], [1, 1, 1])


def test_concrete_arrays_serve_as_the_abstract_tree(ckpt: Checkpointer) -> None:
    tree = {"x": jnp.arange(4.0), "y": np.arange(3, dtype=np.int16)}
    ckpt.save(0, tree, {})
    restored, _ = ckpt.restore(0, tree)
    assert same_tree(restored, tree)


_DTYPES = [np.float32, np.int32, np.uint8, np.bool_, np.int8, np.uint32, np.float16]


_counter = itertools.count()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One checkpointer for the property tests (each example saves the next step)."""
    with Checkpointer(tmp_path_factory.mktemp("shared"), max_to_keep=1) as checkpointer:
        yield checkpointer


@settings(max_examples=12, deadline=None)
@given(
    leaves=st.lists(
        st.tuples(
            st.sampled_from(_DTYPES),
            hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5),
        ),
        min_size=0,
        max_size=5,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_trees_of_any_shapes_and_dtypes_round_trip(
    shared: Checkpointer, leaves: list[tuple[Any, tuple[int, ...]]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tree = {
        f"leaf{i}": jnp.asarray(rng.integers(0, 100, shape).astype(dtype))
        for i, (dtype, shape) in enumerate(leaves)
    }
    step = next(_counter)
    shared.save(step, tree, {"n": len(leaves)})
    restored, host = shared.restore(step, jax.eval_shape(lambda: tree))
    assert same_tree(restored, tree) and host == {"n": len(leaves)}


_MARK = "__tupli_jax__"
_host_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float64, np.int64, np.uint8, np.bool_, np.complex64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
_host_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
    | _host_arrays
    | st.sampled_from(["float32", "float64", "int8", "uint64", "bool", "complex128"]).flatmap(
        lambda name: hnp.from_dtype(np.dtype(name)).map(np.dtype(name).type)
    )
    | hnp.arrays(dtype=np.dtype("<U3"), shape=st.integers(0, 3)),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=4).filter(lambda k: k != _MARK), inner, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=25, deadline=None)
@given(host=st.dictionaries(st.text(max_size=4).filter(lambda k: k != _MARK), _host_values))
def test_host_states_round_trip_exactly(shared: Checkpointer, host: dict[str, Any]) -> None:
    step = next(_counter)
    shared.save(step, {"x": jnp.zeros(2)}, host)
    _, restored = shared.restore(step, {"x": jax.ShapeDtypeStruct((2,), "float32")})
    assert same(restored, host)


# --------------------------------------------------------------------------------------------
# steps, retention, reopening


def test_steps_retention_and_reopening(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"  # parents are created
    with Checkpointer(directory, max_to_keep=2) as ckpt:
        assert ckpt.latest_step() is None and ckpt.all_steps() == []
        for step in (0, 1, 5, 9):
            ckpt.save(step, _state(step), {"step": step})
            assert ckpt.latest_step() == step
        assert ckpt.all_steps() == [5, 9] and _steps_on_disk(directory) == [5, 9]
    with Checkpointer(directory) as reopened:
        assert reopened.latest_step() == 9
        for step in (5, 9):
            tree, host = reopened.restore(step, jax.eval_shape(_state))
            assert same_tree(tree, _state(step)) and host == {"step": step}
        reopened.save(10, _state(10), {})
        assert reopened.all_steps() == [9, 10]


@pytest.mark.parametrize("step", [-1, 1.0, "2", True, None])
def test_bad_steps_are_refused(ckpt: Checkpointer, step: Any) -> None:
    with pytest.raises(ValueError, match="step must be an int"):
        ckpt.save(step, {}, {})
    assert ckpt.all_steps() == []


def test_steps_must_increase(ckpt: Checkpointer) -> None:
    ckpt.save(4, {"x": jnp.zeros(1)}, {})
    for step in (4, 3):
        with pytest.raises(ValueError, match=r"latest saved step is 4 and steps must increase"):
            ckpt.save(step, {"x": jnp.ones(1)}, {})
    assert ckpt.all_steps() == [4]
    ckpt.save(np.int64(5), {"x": jnp.ones(1)}, {})
    assert ckpt.latest_step() == 5


def test_bad_directory_and_options(tmp_path: Path) -> None:
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Checkpointer(file)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_to_keep"):
            Checkpointer(tmp_path / "ok", max_to_keep=bad)


def test_a_closed_checkpointer_refuses_work(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.close()
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.latest_step()


# --------------------------------------------------------------------------------------------
# errors


def test_restoring_a_missing_step_names_the_saved_steps(ckpt: Checkpointer) -> None:
    with pytest.raises(FileNotFoundError, match=r"step 0 .*saved steps are \[\]"):
        ckpt.restore(0, {})
    ckpt.save(2, {"x": jnp.zeros(1)}, {})
    with pytest.raises(FileNotFoundError, match=r"step 1 .*saved steps are \[2\]"):
        ckpt.restore(1, {"x": jax.ShapeDtypeStruct((1,), jnp.float32)})


def _mismatches() -> dict[str, tuple[Any, str]]:
    good = _state()
    return {
        "shape": (
            good.replace(pos=Pos(jnp.arange(5, dtype=jnp.int32), good.pos.col)),
            r"saved \.pos\.row int32\[4\], abstract_tree has \.pos\.row int32\[5\]",
        ),
        # orbax alone would silently cast to the requested dtype
        "dtype": (
            good.replace(count=jnp.asarray(0.0, jnp.float32)),
            r"saved \.count int32\[\], abstract_tree has \.count float32\[\]",
        ),
        "fewer leaves": (good.replace(history=[]), r"9 leaves saved, 7 in abstract_tree"),
        "other structure": (
            {"pos": {"row": good.pos.row, "col": good.pos.col}},
            r"abstract_tree has \['pos'\]\['col'\]",
        ),
    }


@pytest.mark.parametrize("case", list(_mismatches()))
def test_an_abstract_tree_that_does_not_match_is_refused(ckpt: Checkpointer, case: str) -> None:
    ckpt.save(0, _state(), {})
    other, message = _mismatches()[case]
    with pytest.raises(ValueError, match=r"step 0 .*does not match abstract_tree") as info:
        ckpt.restore(0, jax.eval_shape(lambda: other))
    assert re.search(message, str(info.value)), str(info.value)
    assert "jax.eval_shape" in str(info.value)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"k": jax.random.key(0)}, "jax.random.key_data"),
        ({"n": 3}, r"\['n'\] is a int.*jnp.asarray"),
        ({"o": np.array([None, 1], dtype=object)}, "dtype object"),
        ({"s": "text"}, "is a str"),
    ],
)
def test_bad_tree_leaves_are_refused(ckpt: Checkpointer, tree: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        ckpt.save(0, tree, {})
    assert ckpt.latest_step() is None


class _Custom:
    pass


@pytest.mark.parametrize(
    ("host", "error", "message"),
    [
        ({"s": {1, 2}}, TypeError, r"host_state\['s'\]: cannot checkpoint a set"),
        ({"c": [_Custom()]}, TypeError, r"host_state\['c'\]\[0\]: cannot checkpoint a _Custom"),
        ({"p": Pos(np.zeros(1), np.zeros(1))}, TypeError, "tree_flatten"),
        ({"d": {3: "x"}}, TypeError, "keys must be str"),
        ({"a": np.array([object()])}, TypeError, "plain dtype"),
        ({"x": {_MARK: 1}}, ValueError, "reserved"),
        ([("a", 1)], TypeError, "host_state must be a dict"),
    ],
)
def test_bad_host_states_are_refused(
    ckpt: Checkpointer, host: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        ckpt.save(0, {"x": jnp.zeros(1)}, host)
    assert ckpt.latest_step() is None


# --------------------------------------------------------------------------------------------
# SIGKILL


def _writer(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(WRITER), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _torn(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if "tmp" in p.name]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_save_killed_halfway_is_never_the_latest_step(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    proc = _writer("torn", str(directory))
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert _torn(directory), "the killed save left no temporary directory behind"
    assert _steps_on_disk(directory) == [0]
    with Checkpointer(directory) as ckpt:
        assert ckpt.latest_step() == 0
        tree, host = ckpt.restore(0, abstract())
        assert same_tree(tree, expected(0)[0]) and same(host, expected(0)[1])
        ckpt.save(1, *expected(1))
        tree, host = ckpt.restore(1, abstract())
        assert same_tree(tree, expected(1)[0]) and same(host, expected(1)[1])
    assert _torn(directory) == []  # opening the directory removed the torn save


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_saves_killed_at_random_moments_restore_exactly(tmp_path: Path) -> None:
    """Each round resumes from the latest step (the writer checks it), saves on and is killed;
    the latest step is then at least the last one reported saved, and restores exactly."""
    directory = tmp_path / "ckpt"
    rng = random.Random(2024)
    reported = -1
    for _ in range(3):
        proc = _writer("run", str(directory), "1000")
        lines: list[str] = []
        assert proc.stdout is not None
        reader = threading.Thread(
            target=lambda out=proc.stdout, sink=lines: sink.extend(x.decode() for x in out)
        )
        reader.start()
        try:
            while not lines and proc.poll() is None:  # resumed (restore checked) or saved 0
                time.sleep(0.01)
            assert lines and lines[0].startswith(("resumed", "saved")), lines
            time.sleep(rng.uniform(0.0, 1.2))  # a moment independent of the saves
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            reader.join()
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.stdout.close()
            proc.stderr.close()
        saved = [int(line.split()[1]) for line in lines if line.startswith("saved")]
        reported = max([reported, *saved])
        assert proc.returncode == -signal.SIGKILL, err.decode()
        with Checkpointer(directory) as ckpt:
            latest = ckpt.latest_step()
            assert latest is not None and reported <= latest <= reported + 1
            tree, host = ckpt.restore(latest, abstract())
            want_tree, want_host = expected(latest)
            assert same_tree(tree, want_tree) and same(host, want_host)
    assert reported >= 0  # at least one save returned (and was then found on disk)
