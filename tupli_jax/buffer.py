"""Preallocated per-environment transition buffer (pure JAX, no I/O).

Layout (one environment; ``vmap`` adds a leading ``[B]`` axis to every array):

* **step rows** ``[C, ...]``, one per step since the last flush, at row ``num_steps``: the
  action, reward, discount, ``last`` flag, chosen extras and the *true* next observation (the
  final observation on a LAST step), plus the stream's step ``number``.
* **reset rows** ``[C + 1, ...]``, one per episode start, at row ``num_resets``: the reset
  observation and the ``number`` of the episode's first step. Written by ``reset`` and by a
  LAST step (auto-reset), never otherwise.

So every observation is stored exactly once (an episode has ``T`` step rows and one reset row,
``T + 1`` observations), and flushing at least every ``C`` steps never overflows: ``C`` steps
write at most ``C`` step rows and ``C + 1`` reset rows (the initial reset plus one per LAST).

Each row is encoded by a :class:`RowCodec`: small leaves are packed into one ``uint32`` word
vector (one scatter per row instead of one per leaf), large leaves are stored flattened in
their own dtype. Writes use ``.at[i].set(mode="drop")``: under ``vmap`` this is one scatter
per array with per-environment indices, which measured faster on CPU than a batch-major
``dynamic_update_slice`` on the time axis, and an index past the end is dropped, so a full
buffer is never overwritten; the host sees ``num_steps > capacity`` and reports the overflow.

Counters only grow between flushes (``num_steps`` and ``num_resets`` saturate one past the
end; ``step_number`` counts modulo ``2**32`` and the host compares numbers modulo ``2**32``).

Example:
    >>> import jax, jax.numpy as jnp
    >>> spec = BufferSpec.create(
    ...     capacity=4,
    ...     transition={"action": jax.ShapeDtypeStruct((), jnp.int32),
    ...                 "reward": jax.ShapeDtypeStruct((), jnp.float32),
    ...                 "discount": jax.ShapeDtypeStruct((), jnp.float32),
    ...                 "last": jax.ShapeDtypeStruct((), jnp.bool_),
    ...                 "next_obs": jax.ShapeDtypeStruct((3,), jnp.float32),
    ...                 "extras": {}},
    ...     observation=jax.ShapeDtypeStruct((3,), jnp.float32))
    >>> buf = spec.record_reset(spec.init(), jnp.zeros(3))
    >>> int(buf.num_resets)
    1
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BufferSpec", "BufferState", "LeafSlot", "RowCodec"]

# Leaves with at most this many uint32 words are packed into the row's word vector.
_PACK_MAX_WORDS = 64
_PACKABLE_KINDS = frozenset("biuf")  # bool, signed, unsigned, float (not complex / object)


def _describe(shape: tuple[int, ...], dtype: Any) -> str:
    return f"{np.dtype(dtype).name}{list(shape)}"


@dataclasses.dataclass(frozen=True)
class LeafSlot:
    """Where one leaf of a row lives.

    Attributes:
        path: The leaf's key path, for error messages.
        shape: Per-row shape of the leaf.
        dtype: Its dtype.
        packed: Whether it is packed into the row's ``uint32`` words.
        offset: First word (packed) or index into the large-leaf tuple (not packed).
        num_words: Number of words it takes when packed, else 0.
    """

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    packed: bool
    offset: int
    num_words: int

    @property
    def size(self) -> int:
        """Number of elements per row."""
        return int(np.prod(self.shape, dtype=np.int64))


def _words_per_element(dtype: np.dtype) -> int:
    return 2 if dtype.itemsize == 8 else 1


@dataclasses.dataclass(frozen=True)
class RowCodec:
    """Static encoding of a row pytree into ``(words [W] uint32, large leaves [n_i])``.

    Built once from an example (arrays or ``jax.ShapeDtypeStruct``); plain Python, never traced.

    Example:
        >>> import numpy as np
        >>> codec = RowCodec.from_example({"a": np.int32(0), "b": np.zeros(2, np.bool_)})
        >>> codec.num_words
        3
    """

    treedef: Any
    slots: tuple[LeafSlot, ...]
    num_words: int

    @classmethod
    def from_example(cls, example: Any) -> RowCodec:
        """Builds the codec from an example row (arrays or ShapeDtypeStructs)."""
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(example)
        slots: list[LeafSlot] = []
        num_words = 0
        num_big = 0
        for path, leaf in leaves_with_path:
            shape = tuple(int(d) for d in np.shape(leaf))
            dtype = np.dtype(leaf.dtype)
            size = int(np.prod(shape, dtype=np.int64))
            words = size * _words_per_element(dtype)
            packable = dtype.kind in _PACKABLE_KINDS and dtype.itemsize <= 8
            key = jax.tree_util.keystr(path)
            if packable and words <= _PACK_MAX_WORDS:
                slots.append(LeafSlot(key, shape, dtype, True, num_words, words))
                num_words += words
            else:
                slots.append(LeafSlot(key, shape, dtype, False, num_big, 0))
                num_big += 1
        return cls(treedef, tuple(slots), num_words)

    @property
    def big_slots(self) -> tuple[LeafSlot, ...]:
        """Slots of the large leaves, in storage order."""
        return tuple(s for s in self.slots if not s.packed)

    def check(self, row: Any, what: str) -> None:
        """Checks at trace time that ``row`` has the codec's structure, shapes and dtypes.

        Raises:
            ValueError: Structure or shape differs (message shows expected and received).
            TypeError: A dtype differs.
        """
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(row)
        if treedef != self.treedef:
            raise ValueError(
                f"{what}: expected a pytree with structure {self.treedef}, received {treedef}. "
                "The structure must stay the same from step to step (see the env's specs)."
            )
        for (path, leaf), slot in zip(leaves_with_path, self.slots, strict=True):
            shape = tuple(np.shape(leaf))
            dtype = np.dtype(jnp.result_type(leaf))
            where = f"{what}{jax.tree_util.keystr(path)}"
            if shape != slot.shape:
                raise ValueError(
                    f"{where}: expected shape {_describe(slot.shape, slot.dtype)}, received "
                    f"{_describe(shape, dtype)}. Pass one environment's value (vmap the recorder "
                    "for a batch) with the shape given by the env's specs."
                )
            if dtype != slot.dtype:
                raise TypeError(
                    f"{where}: expected dtype {slot.dtype.name}, received {dtype.name} "
                    f"({_describe(shape, dtype)}). Cast it with .astype({slot.dtype.name})."
                )

    def encode(self, row: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Encodes one row. Pure; jit/vmap-safe.

        Returns:
            ``words [W] uint32`` and the large leaves flattened to ``[n_i]``.
        """
        leaves = jax.tree_util.tree_leaves(row)
        words: list[jax.Array] = []
        big: list[jax.Array] = []
        for leaf, slot in zip(leaves, self.slots, strict=True):
            x = jnp.asarray(leaf, slot.dtype).reshape(-1)
            if not slot.packed:
                big.append(x)
            elif slot.dtype == np.bool_:
                words.append(x.astype(jnp.uint32))
            elif slot.dtype.itemsize == 4:
                words.append(jax.lax.bitcast_convert_type(x, jnp.uint32))
            elif slot.dtype.itemsize == 8:
                words.append(jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1))
            else:  # 1 or 2 bytes: keep the bit pattern, zero-extended
                narrow = jnp.uint8 if slot.dtype.itemsize == 1 else jnp.uint16
                words.append(jax.lax.bitcast_convert_type(x, narrow).astype(jnp.uint32))
        packed = jnp.concatenate(words) if words else jnp.zeros((0,), jnp.uint32)
        return packed, tuple(big)

    def empty(self, *rows: int) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        """Zero storage for rows laid out as ``rows`` (e.g. ``(R,)`` or time-major ``(T, B)``):
        ``[*rows, W]`` words and ``[*rows, n_i]`` large leaves."""
        words = jnp.zeros((*rows, self.num_words), jnp.uint32)
        big = tuple(jnp.zeros((*rows, s.size), s.dtype) for s in self.big_slots)
        return words, big

    def decode(self, words: np.ndarray, big: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Decodes stored rows on the host (numpy). Any leading axes ``[...]`` are kept.

        Args:
            words: ``[..., W]`` uint32.
            big: The large leaves, each ``[..., n_i]``.

        Returns:
            The row's leaves in flatten order, each ``[..., *shape]`` with its dtype; unflatten
            with ``self.treedef``. Leaves of 4- and 8-byte dtypes are views of ``words`` (its
            last axis must be contiguous); the others are new arrays.
        """
        lead = words.shape[:-1]
        out: list[np.ndarray] = []
        for slot in self.slots:
            if not slot.packed:
                out.append(np.asarray(big[slot.offset]).reshape(*lead, *slot.shape))
                continue
            chunk = words[..., slot.offset : slot.offset + slot.num_words]
            if slot.dtype == np.bool_:
                value = chunk != 0
            elif slot.dtype.itemsize >= 4:  # 8-byte leaves take two little-endian words each
                value = chunk.view(slot.dtype)  # a view of ``words`` (its last axis is whole)
            else:
                narrow = np.uint8 if slot.dtype.itemsize == 1 else np.uint16
                value = chunk.astype(narrow).view(slot.dtype)
            out.append(value.reshape(*lead, *slot.shape))
        return out


class BufferState(flax.struct.PyTreeNode):
    """Per-environment buffer arrays and counters (a pytree; ``vmap`` adds ``[B]`` in front).

    Attributes:
        step_words: ``[C, Ws]`` uint32 packed small leaves of the step rows.
        step_big: Large leaves of the step rows, each ``[C, n_i]``.
        reset_words: ``[C + 1, Wr]`` uint32 packed small leaves of the reset rows.
        reset_big: Large leaves of the reset rows, each ``[C + 1, n_i]``.
        num_steps: ``[]`` int32 step rows written since the last flush (saturates at C + 1).
        num_resets: ``[]`` int32 reset rows written since the last flush (saturates at C + 2).
        step_number: ``[]`` uint32 steps taken in this stream since ``reset`` (mod 2**32),
            counted whether or not recording is on.
        flush_token: ``[]`` uint32, 0 after ``reset``; set by the host at each flush so that the
            host can match its carried partial episodes to this state.
    """

    step_words: jax.Array
    step_big: tuple[jax.Array, ...]
    reset_words: jax.Array
    reset_big: tuple[jax.Array, ...]
    num_steps: jax.Array
    num_resets: jax.Array
    step_number: jax.Array
    flush_token: jax.Array


def _write(
    words: jax.Array,
    big: tuple[jax.Array, ...],
    index: jax.Array,
    row: tuple[jax.Array, tuple[jax.Array, ...]],
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    row_words, row_big = row

    # One index per environment: unique and sorted also after vmap adds the batch index, which
    # lets GPUs scatter with plain stores instead of atomics.
    def put(rows: jax.Array, value: jax.Array) -> jax.Array:
        return rows.at[index].set(value, mode="drop", unique_indices=True, indices_are_sorted=True)

    return put(words, row_words), tuple(put(b, v) for b, v in zip(big, row_big, strict=True))


@dataclasses.dataclass(frozen=True)
class BufferSpec:
    """Static buffer configuration: capacity and the two row codecs. Plain Python, never traced.

    Attributes:
        capacity: ``C``, steps per environment between flushes.
        step_codec: Codec of a step row ``{"number", **transition}``.
        reset_codec: Codec of a reset row ``{"number", "obs"}``.
        step_storage: Whether the buffer stores step rows. ``False`` for a caller that keeps
            them itself via :meth:`record_step_row` (``tj.record`` emits them as ``lax.scan``
            outputs: a time-major ``[T, B, ...]`` array written at the scan's shared index,
            cheaper than a per-environment scatter); the buffer then has 0 step rows.
    """

    capacity: int
    step_codec: RowCodec
    reset_codec: RowCodec
    step_storage: bool = True

    @classmethod
    def create(cls, capacity: int, transition: Any, observation: Any) -> BufferSpec:
        """Builds the spec from example shapes (e.g. from ``jax.eval_shape``).

        Args:
            capacity: Steps per environment between flushes (> 0).
            transition: Example transition dict (``action``, ``reward``, ``discount``, ``last``,
                ``next_obs``, ``extras``), arrays or ShapeDtypeStructs.
            observation: Example recorded observation pytree.

        Raises:
            ValueError: ``capacity`` is not a positive int.
        """
        if isinstance(capacity, bool) or not isinstance(capacity, int | np.integer) or capacity < 1:
            raise ValueError(
                f"capacity must be a positive int (steps per environment between flushes), "
                f"received {capacity!r}."
            )
        number = jax.ShapeDtypeStruct((), jnp.uint32)
        step_codec = RowCodec.from_example({"number": number, **transition})
        reset_codec = RowCodec.from_example({"number": number, "obs": observation})
        return cls(int(capacity), step_codec, reset_codec)

    @property
    def num_step_rows(self) -> int:
        """Rows of step storage: ``C`` (0 without ``step_storage``)."""
        return self.capacity if self.step_storage else 0

    @property
    def num_reset_rows(self) -> int:
        """Rows of reset storage: ``C + 1`` (the initial reset plus one per LAST step)."""
        return self.capacity + 1

    def init(self) -> BufferState:
        """Allocates an empty buffer for one environment. Pure; jit/vmap-safe."""
        step_words, step_big = self.step_codec.empty(self.num_step_rows)
        reset_words, reset_big = self.reset_codec.empty(self.num_reset_rows)
        return BufferState(
            step_words=step_words,
            step_big=step_big,
            reset_words=reset_words,
            reset_big=reset_big,
            num_steps=jnp.zeros((), jnp.int32),
            num_resets=jnp.zeros((), jnp.int32),
            step_number=jnp.zeros((), jnp.uint32),
            flush_token=jnp.zeros((), jnp.uint32),
        )

    def record_reset(self, buf: BufferState, observation: Any) -> BufferState:
        """Writes the reset row of the episode that starts now (``rec.reset``). Pure.

        Args:
            buf: Buffer of one environment.
            observation: Recorded reset observation (checked against the codec at trace time).
        """
        row = {"number": buf.step_number, "obs": observation}
        self.reset_codec.check(row, "reset row")
        reset_words, reset_big = _write(
            buf.reset_words, buf.reset_big, buf.num_resets, self.reset_codec.encode(row)
        )
        return buf.replace(
            reset_words=reset_words,
            reset_big=reset_big,
            num_resets=jnp.minimum(buf.num_resets + 1, self.num_reset_rows + 1),
        )

    def record_step(
        self, buf: BufferState, transition: Any, reset_observation: Any, last: jax.Array
    ) -> BufferState:
        """Records one step and, if ``last``, the next episode's reset row. Pure; jit/vmap-safe.

        Args:
            buf: Buffer of one environment.
            transition: ``{"action", "reward", "discount", "last", "next_obs", "extras"}`` of this
                step, ``next_obs`` being the true next (final) observation.
            reset_observation: Recorded observation the auto-reset produced (stored only if
                ``last``).
            last: ``[]`` bool, this step ended the episode.

        Returns:
            The buffer with both rows written and the counters advanced.
        """
        if not self.step_storage:
            raise ValueError(
                "this buffer keeps no step rows (step_storage=False): use record_step_row and "
                "store the returned rows yourself."
            )
        row = self._step_row(buf, transition)
        step_words, step_big = _write(buf.step_words, buf.step_big, buf.num_steps, row)
        buf = buf.replace(step_words=step_words, step_big=step_big)
        return self._advance(buf, reset_observation, last)

    def record_step_row(
        self, buf: BufferState, transition: Any, reset_observation: Any, last: jax.Array
    ) -> tuple[BufferState, tuple[jax.Array, tuple[jax.Array, ...]]]:
        """``record_step`` that returns the encoded step row instead of storing it. Pure.

        For a caller that stores step rows itself, e.g. as ``lax.scan`` outputs (time-major);
        row ``j`` since the last flush must then be handed to the flush as step row ``j``.
        The reset row and the counters are handled exactly as in ``record_step``.

        Returns:
            The buffer (reset row written, counters advanced) and the step row as
            ``(words [Ws] uint32, large leaves [n_i])``.
        """
        row = self._step_row(buf, transition)
        return self._advance(buf, reset_observation, last), row

    def _step_row(
        self, buf: BufferState, transition: Any
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        step_row = {"number": buf.step_number, **transition}
        self.step_codec.check(step_row, "recorded step")
        return self.step_codec.encode(step_row)

    def _advance(self, buf: BufferState, reset_observation: Any, last: jax.Array) -> BufferState:
        """Writes the reset row if ``last`` and advances the counters past one step."""
        next_number = buf.step_number + jnp.uint32(1)
        reset_row = {"number": next_number, "obs": reset_observation}
        self.reset_codec.check(reset_row, "reset row")
        # Non-LAST steps target the row past the end, which "drop" mode discards.
        reset_index = jnp.where(last, buf.num_resets, self.num_reset_rows + 1)
        reset_words, reset_big = _write(
            buf.reset_words, buf.reset_big, reset_index, self.reset_codec.encode(reset_row)
        )
        return buf.replace(
            reset_words=reset_words,
            reset_big=reset_big,
            num_steps=jnp.minimum(buf.num_steps + 1, self.capacity + 1),
            num_resets=jnp.minimum(
                buf.num_resets + last.astype(jnp.int32), self.num_reset_rows + 1
            ),
            step_number=next_number,
        )

    def skip_step(self, buf: BufferState) -> BufferState:
        """Counts a step taken while recording is off (no buffer writes). Pure."""
        return buf.replace(step_number=buf.step_number + jnp.uint32(1))
