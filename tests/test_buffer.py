"""Tests of tupli_jax.buffer: row codec, trace-time checks, writes, counters, overflow."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax.buffer import BufferSpec, RowCodec

DTYPES = [
    np.bool_,
    np.int8,
    np.uint8,
    np.int16,
    np.uint16,
    np.float16,
    ml_dtypes.bfloat16,
    np.int32,
    np.uint32,
    np.float32,
]


def _random(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    bits = rng.integers(0, 2 ** (8 * dtype.itemsize), shape, dtype=np.uint64)
    values = bits.astype(f"u{dtype.itemsize}").view(dtype)  # any bit pattern, NaNs included
    return np.asarray(values)


def _bits(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    return x if x.dtype == np.bool_ else x.view(f"u{x.dtype.itemsize}")


class _Pair(NamedTuple):
    small: Any
    big: Any


@settings(max_examples=25, deadline=None)
@given(
    leaves=st.lists(
        st.tuples(
            st.sampled_from(DTYPES),
            st.lists(st.integers(1, 4), max_size=2).map(tuple),
            st.booleans(),
        ),
        min_size=1,
        max_size=4,
    ),
    rows=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_codec_round_trips_bit_for_bit(
    leaves: list[tuple[Any, tuple[int, ...], bool]], rows: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    example = {}
    for i, (dtype, shape, big) in enumerate(leaves):
        full = (*shape, 70) if big else shape  # 70 elements per row is past the packing limit
        example[f"leaf{i}"] = _Pair(small=_random(rng, full, dtype), big=np.zeros((), np.float32))
    codec = RowCodec.from_example(example)
    values = [
        jax.tree.map(lambda x: _random(rng, np.shape(x), x.dtype), example) for _ in range(rows)
    ]
    encoded = [codec.encode(v) for v in values]
    words = np.stack([np.asarray(w) for w, _ in encoded])
    big = [np.stack([np.asarray(b[i]) for _, b in encoded]) for i in range(len(codec.big_slots))]
    decoded = codec.treedef.unflatten(codec.decode(words, big))
    for r, value in enumerate(values):
        for want, got in zip(jax.tree.leaves(value), jax.tree.leaves(decoded), strict=True):
            assert got.dtype == want.dtype and got.shape[1:] == want.shape
            np.testing.assert_array_equal(_bits(got[r]), _bits(want))


def test_codec_packs_small_leaves_and_keeps_big_ones_apart() -> None:
    codec = RowCodec.from_example(
        {"a": np.zeros((), np.int32), "b": np.zeros(3, np.bool_), "c": np.zeros((8, 9), np.float32)}
    )
    assert codec.num_words == 4
    assert [s.packed for s in codec.slots] == [True, True, False]
    assert codec.big_slots[0].shape == (8, 9)


def test_codec_round_trips_64_bit_leaves() -> None:
    with jax.enable_x64(True):
        value = {"f": np.array([1.5, -np.inf], np.float64), "i": np.array(-(2**40), np.int64)}
        codec = RowCodec.from_example(value)
        words, big = codec.encode(value)
        assert codec.num_words == 6 and not big
        decoded = codec.treedef.unflatten(codec.decode(np.asarray(words)[None], []))
    np.testing.assert_array_equal(decoded["f"][0], value["f"])
    assert decoded["i"][0] == value["i"] and decoded["i"].dtype == np.int64


def test_check_reports_expected_and_received() -> None:
    codec = RowCodec.from_example({"obs": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(ValueError, match=r"expected shape float32\[3\], received float32\[4\]"):
        codec.check({"obs": jnp.zeros(4, jnp.float32)}, "row")
    with pytest.raises(TypeError, match=r"expected dtype float32, received int32"):
        codec.check({"obs": jnp.zeros(3, jnp.int32)}, "row")
    with pytest.raises(ValueError, match="structure"):
        codec.check({"obs": jnp.zeros(3, jnp.float32), "extra": jnp.zeros(())}, "row")
    codec.check({"obs": jnp.zeros(3, jnp.float32)}, "row")  # the right row passes


# -- BufferSpec ------------------------------------------------------------------------------

OBS = {
    "pos": jax.ShapeDtypeStruct((2,), jnp.float32),
    "img": jax.ShapeDtypeStruct((9, 9), jnp.uint8),
}


def _spec(capacity: int) -> BufferSpec:
    transition = {
        "action": jax.ShapeDtypeStruct((), jnp.int32),
        "reward": jax.ShapeDtypeStruct((), jnp.float32),
        "discount": jax.ShapeDtypeStruct((), jnp.float32),
        "last": jax.ShapeDtypeStruct((), jnp.bool_),
        "next_obs": OBS,
        "extras": {},
    }
    return BufferSpec.create(capacity, transition, OBS)


def _obs(value: float) -> dict[str, jax.Array]:
    return {"pos": jnp.full(2, value, jnp.float32), "img": jnp.full((9, 9), value, jnp.uint8)}


def _transition(i: int, last: bool) -> dict[str, Any]:
    return {
        "action": jnp.int32(i),
        "reward": jnp.float32(i),
        "discount": jnp.float32(0.0 if last else 1.0),
        "last": jnp.bool_(last),
        "next_obs": _obs(i + 1),
        "extras": {},
    }


def _steps(spec: BufferSpec, buf: Any) -> dict[str, np.ndarray]:
    codec = spec.step_codec
    words = np.asarray(buf.step_words)
    return codec.treedef.unflatten(codec.decode(words, [np.asarray(b) for b in buf.step_big]))


def _resets(spec: BufferSpec, buf: Any) -> dict[str, np.ndarray]:
    codec = spec.reset_codec
    words = np.asarray(buf.reset_words)
    return codec.treedef.unflatten(codec.decode(words, [np.asarray(b) for b in buf.reset_big]))


@pytest.mark.parametrize("capacity", [0, -1, 2.5, True, "8"])
def test_capacity_must_be_a_positive_int(capacity: Any) -> None:
    with pytest.raises(ValueError, match="capacity"):
        _spec(capacity)


def test_init_allocates_capacity_rows_from_shapes() -> None:
    spec = _spec(5)
    shapes = jax.eval_shape(spec.init)
    assert shapes.step_words.shape == (5, spec.step_codec.num_words)
    assert shapes.reset_words.shape == (6, spec.reset_codec.num_words)
    assert [b.shape for b in shapes.step_big] == [(5, 81)]
    assert shapes.step_big[0].dtype == jnp.uint8


def test_rows_and_counters_follow_the_steps() -> None:
    spec = _spec(4)
    record = jax.jit(spec.record_step)
    buf = spec.record_reset(spec.init(), _obs(0))
    pattern = [False, True, False]
    for i, last in enumerate(pattern):
        buf = record(buf, _transition(i, last), _obs(100 + i), jnp.bool_(last))
    steps, resets = _steps(spec, buf), _resets(spec, buf)
    assert int(buf.num_steps) == 3 and int(buf.num_resets) == 2 and int(buf.step_number) == 3
    np.testing.assert_array_equal(steps["number"][:3], [0, 1, 2])
    np.testing.assert_array_equal(steps["last"][:3], pattern)
    np.testing.assert_array_equal(steps["action"][:3], [0, 1, 2])
    np.testing.assert_array_equal(steps["next_obs"]["pos"][:3, 0], [1, 2, 3])
    np.testing.assert_array_equal(steps["next_obs"]["img"][:3, 0, 0], [1, 2, 3])
    # Reset rows: the initial reset (first step number 0) and the one after the LAST step 1.
    np.testing.assert_array_equal(resets["number"][:2], [0, 2])
    np.testing.assert_array_equal(resets["obs"]["pos"][:2, 0], [0, 101])


def test_full_buffer_drops_writes_and_flags_overflow() -> None:
    spec = _spec(2)
    record = jax.jit(spec.record_step)
    buf = spec.record_reset(spec.init(), _obs(0))
    for i in range(5):
        buf = record(buf, _transition(i, True), _obs(50 + i), jnp.bool_(True))
    steps, resets = _steps(spec, buf), _resets(spec, buf)
    np.testing.assert_array_equal(steps["action"], [0, 1])  # never overwritten
    np.testing.assert_array_equal(resets["obs"]["pos"][:, 0], [0, 50, 51])
    assert int(buf.num_steps) == 3 > spec.capacity  # saturated one past the end: overflow flag
    assert int(buf.num_resets) == 4 > spec.num_reset_rows
    assert int(buf.step_number) == 5


def test_vmapped_envs_write_their_own_rows() -> None:
    spec = _spec(3)
    bufs = jax.vmap(lambda o: spec.record_reset(spec.init(), o))(
        jax.tree.map(lambda x: jnp.stack([x, x + 1]), _obs(0))
    )
    record = jax.jit(jax.vmap(spec.record_step))
    lasts = jnp.array([True, False])
    batch = jax.tree.map(lambda *x: jnp.stack(x), _transition(7, True), _transition(8, False))
    batch["last"] = lasts
    bufs = record(bufs, batch, jax.tree.map(lambda x: jnp.stack([x, x]), _obs(9)), lasts)
    np.testing.assert_array_equal(bufs.num_resets, [2, 1])
    np.testing.assert_array_equal(np.asarray(bufs.num_steps), [1, 1])
    words = np.asarray(bufs.reset_words)
    codec = spec.reset_codec
    resets = codec.treedef.unflatten(codec.decode(words, [np.asarray(b) for b in bufs.reset_big]))
    np.testing.assert_array_equal(resets["obs"]["pos"][:, :2, 0], [[0, 9], [1, 0]])


def test_skip_step_writes_nothing() -> None:
    spec = _spec(3)
    buf = spec.record_reset(spec.init(), _obs(1))
    skipped = spec.skip_step(buf)
    assert int(skipped.step_number) == 1
    unchanged = skipped.replace(step_number=jnp.uint32(0))
    for a, b in zip(jax.tree.leaves(buf), jax.tree.leaves(unchanged), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_number_wraps_modulo_2_32() -> None:
    spec = _spec(3)
    buf = spec.init().replace(step_number=jnp.uint32(2**32 - 1))
    buf = spec.record_step(buf, _transition(0, True), _obs(0), jnp.bool_(True))
    assert int(buf.step_number) == 0
    assert int(_resets(spec, buf)["number"][0]) == 0
    assert int(_steps(spec, buf)["number"][0]) == 2**32 - 1


def test_write_checks_the_row_at_trace_time() -> None:
    spec = _spec(3)
    bad = _transition(0, False)
    bad["action"] = jnp.float32(0)
    with pytest.raises(TypeError, match=r"\['action'\]: expected dtype int32, received float32"):
        jax.jit(spec.record_step)(spec.init(), bad, _obs(0), jnp.bool_(False))
    with pytest.raises(ValueError, match=r"expected shape float32\[2\], received float32\[3\]"):
        spec.record_reset(spec.init(), {"pos": jnp.zeros(3), "img": jnp.zeros((9, 9), jnp.uint8)})
