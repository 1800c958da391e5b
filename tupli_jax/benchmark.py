"""Benchmarks: env serialization, hashing, and store/load/publish/delete.

Shared by the JAX ``RecordingWrapper`` (jumanji envs) and the Gymnasium adapter. Envs are stored
as jsonpickle JSON, as pytupli stores them, so pytupli payloads load here and ours load in
pytupli. Host-side only: nothing here is traced or jitted.

Loading is the security-critical part: benchmarks come from other people, and
``jsonpickle.decode`` imports any module and calls any callable a payload names. Without
``trusted=True``, ``deserialize_env`` (and ``load_env``) checks every name in the payload
against an allow-list before decoding, decodes with an unpickler that resolves only the checked
names, and refuses payloads that ask for more than ``MAX_DECODED_BYTES`` (1 GiB) of arrays and
buffers. The rules are in the private ``tupli_jax._safe_json``; ``audit_payload`` lists what
keeps a payload from loading. ``trusted=True`` skips all checks: only for trusted sources.

Example:
    >>> import jumanji
    >>> from tupli_jax.storage.file_storage import FileStorage
    >>> store = FileStorage("tupli_store")  # doctest: +SKIP
    >>> bench_id = store_benchmark(store, jumanji.make("Snake-v1"), name="snake")  # doctest: +SKIP
    >>> env = load_env(store, bench_id)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from collections.abc import Iterable, Sequence
from typing import Any

import jsonpickle
import pydantic
from jsonpickle import tags
from jsonpickle.pickler import Pickler

from tupli_jax import _isolated, _safe_json
from tupli_jax._safe_json import MAX_DECODED_BYTES, UnsafePayloadError
from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery, FilterEQ
from tupli_jax.storage.base import TupliStorage, TupliStorageError

__all__ = [
    "MAX_DECODED_BYTES",
    "UnsafePayloadError",
    "audit_payload",
    "benchmark_hash",
    "delete_benchmark",
    "deserialize_env",
    "load_env",
    "publish_benchmark",
    "serialize_env",
    "store_benchmark",
]


# --------------------------------------------------------------------------------------------
# Serialization and hashing
# --------------------------------------------------------------------------------------------


def _viewer_mode(obj: Any) -> str | None:
    """The render mode of a jumanji matplotlib viewer, whose bound ``_display`` jsonpickle drops."""
    viewer = sys.modules.get("jumanji.viewer")
    base = getattr(viewer, "MatplotlibViewer", None)
    if base is None or not isinstance(obj, base):
        return None
    display = vars(obj).get("_display")
    if isinstance(display, types.MethodType) and display.__self__ is obj:
        names = {"_display_rgb_array": "rgb_array", "_display_human": "human"}
        return names.get(display.__func__.__name__)
    return None


def _canonical_order(items: Iterable[Any]) -> list[Any]:
    """Set elements in an order independent of ``PYTHONHASHSEED`` (for deterministic hashes)."""
    values = list(items)
    try:
        return sorted(values)
    except TypeError:
        return sorted(values, key=lambda v: (type(v).__module__, type(v).__qualname__, repr(v)))


class _EnvPickler(Pickler):
    """jsonpickle's Pickler, with sets in a canonical order and jumanji viewers' render mode.

    jsonpickle writes sets in iteration order, which depends on the string hash seed: pytupli's
    hash of a pydantic model (its ``__pydantic_fields_set__``) differs between processes.
    """

    def _get_flattener(self, obj: Any) -> Any:
        if type(obj) is set and self.unpicklable:
            return lambda s: {tags.SET: [self._flatten(v) for v in _canonical_order(s)]}
        return super()._get_flattener(obj)

    def _flatten_obj_instance(self, obj: Any) -> Any:
        if type(obj) is frozenset and self.unpicklable:  # what its __reduce__ gives, ordered
            items = (self._flatten(frozenset), self._flatten((_canonical_order(obj),)))
            return {tags.REDUCE: list(items)}
        data = super()._flatten_obj_instance(obj)
        mode = _viewer_mode(obj)
        if mode is not None and isinstance(data, dict) and "_display" not in data:
            data["_display"] = mode
        return data


def _encode(value: Any, *, indent: int | None, warn: bool) -> str:
    """jsonpickle JSON of ``value``, encoded in a forked child where that is safe.

    Encoding reads every object's ``__dict__``, which on CPython 3.11-3.12 slows every later
    attribute access on the env (``tupli_jax._isolated``); a fork leaves them untouched. The
    text is the same either way; errors and warnings come from an in-process re-run.
    """
    text = _isolated.run_in_fork(lambda: _encode_here(value, indent=indent, warn=warn))
    return text if text is not None else _encode_here(value, indent=indent, warn=warn)


def _encode_here(value: Any, *, indent: int | None, warn: bool) -> str:
    try:
        pickler = _EnvPickler(keys=True, warn=warn)
        return str(jsonpickle.encode(value, indent=indent, context=pickler))
    except Exception as exc:
        raise TupliStorageError(
            f"could not serialize {type(value).__name__} with jsonpickle: {type(exc).__name__}: "
            f"{exc}; make the env's attributes picklable, or pass serialized= explicitly"
        ) from exc


def serialize_env(env: Any) -> str:
    """Encodes an env as jsonpickle JSON (pytupli's format; non-string dict keys kept).

    Like pytupli's ``jsonpickle.encode(env, indent=4, warn=True)``, with ``keys=True`` so that
    int-keyed dicts (FrozenLake's ``P``) survive, and jumanji viewers keep their render mode.
    Attributes jsonpickle cannot encode become ``None`` with a warning. Host-side only.

    Args:
        env: A Gymnasium env (wrappers included) or a jumanji ``Environment``.

    Returns:
        The JSON text.

    Raises:
        TupliStorageError: jsonpickle failed on the env.

    Example:
        >>> import gymnasium as gym
        >>> serialize_env(gym.make("CartPole-v1")).startswith("{")
        True
    """
    return _encode(env, indent=4, warn=True)


def benchmark_hash(env: Any, metadata: BenchmarkMetadata) -> str:
    """SHA-256 hex digest of the jsonpickle encoding of ``[env, metadata]``, as pytupli hashes.

    Deterministic across processes for the same env state and metadata.

    Example:
        >>> import gymnasium as gym
        >>> len(benchmark_hash(gym.make("CartPole-v1"), BenchmarkMetadata(name="cp")))
        64
    """
    if not isinstance(metadata, BenchmarkMetadata):
        raise TypeError(
            f"benchmark_hash expects a BenchmarkMetadata, received {type(metadata).__name__}; "
            "build one with BenchmarkMetadata(name=...)"
        )
    return hashlib.sha256(_encode([env, metadata], indent=None, warn=False).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Loading (the checks are in tupli_jax._safe_json)
# --------------------------------------------------------------------------------------------


def audit_payload(payload: str, *, allow: Iterable[str] = ()) -> list[str]:
    """Lists what keeps a payload from loading without ``trusted=True`` (empty: loads as is).

    Imports only what ``deserialize_env`` would import to check the payload; calls nothing.
    The size budget is only counted while decoding: a payload asking for more than
    ``MAX_DECODED_BYTES`` is refused by ``deserialize_env`` even when this list is empty.

    Example:
        >>> audit_payload('{"py/function": "os.system"}')
        ["'os.system' (called)"]
    """
    return _safe_json.audit(payload, allow=allow)


def deserialize_env(payload: str, *, trusted: bool = False, allow: Iterable[str] = ()) -> Any:
    """Rebuilds an env from ``serialize_env`` (or pytupli) JSON, refusing unsafe payloads.

    Without ``trusted`` nothing off the allow-list is called or imported, and no more than
    ``MAX_DECODED_BYTES`` of arrays and buffers is built (see ``tupli_jax._safe_json``);
    registered Gymnasium and jumanji envs, custom ``gymnasium.Env`` subclasses from importable
    modules, and numpy/jax arrays and RNGs load as they are.

    Args:
        payload: The JSON text (``Benchmark.serialized``).
        trusted: Decode with plain jsonpickle semantics: the payload may import and call
            anything. Only for payloads from sources you trust.
        allow: Extra dotted names (``"mypkg.make_table"``) to trust like the built-in
            allow-list: they may be imported, called with payload data and rebuilt.

    Returns:
        The env.

    Raises:
        UnsafePayloadError: The payload names something not allowed (the message lists it),
            or asks for more than ``MAX_DECODED_BYTES`` of arrays and buffers in total.
        TupliStorageError: The payload is not JSON, or decoding failed.

    Example:
        >>> import gymnasium as gym
        >>> env = deserialize_env(serialize_env(gym.make("CartPole-v1")))
        >>> env.spec.id
        'CartPole-v1'
    """
    return _safe_json.decode(payload, trusted=trusted, allow=allow)


# --------------------------------------------------------------------------------------------
# Storage operations
# --------------------------------------------------------------------------------------------


def store_benchmark(
    storage: TupliStorage,
    env: Any,
    *,
    name: str,
    description: str = "",
    difficulty: str | None = None,
    version: str | None = None,
    metadata: dict[str, Any] | None = None,
    serialized: str | None = None,
) -> str:
    """Stores an env as a benchmark and returns its id; an identical one returns the existing id.

    The hash covers the env's encoding and all metadata, so the same env state with the same
    metadata dedups to one benchmark (also across processes, through the storage).

    Args:
        storage: Any ``TupliStorage``.
        env: The env to store (its current state, RNGs included).
        name: Benchmark name.
        description: Free text.
        difficulty: Optional difficulty label.
        version: Optional version label.
        metadata: Extra JSON-able metadata (``BenchmarkMetadata.extra``).
        serialized: A ready serialization of ``env`` (default: ``serialize_env(env)``).

    Returns:
        The benchmark id.

    Raises:
        TupliStorageError: Invalid metadata, an unencodable env, or a storage failure.

    Example:
        >>> # bench_id = store_benchmark(store, jumanji.make("Snake-v1"), name="snake")
    """
    try:
        meta = BenchmarkMetadata(
            name=name,
            description=description,
            difficulty=difficulty,
            version=version,
            extra=dict(metadata or {}),
        )
    except (pydantic.ValidationError, TypeError, ValueError) as exc:
        raise TupliStorageError(
            f"invalid benchmark metadata: {exc}; expected name: str, description: str, "
            "difficulty/version: str or None, metadata: dict"
        ) from exc
    if serialized is None:
        serialized = serialize_env(env)
    elif not isinstance(serialized, str):
        raise TupliStorageError(
            f"serialized must be JSON text, received {type(serialized).__name__}"
        )
    query = BenchmarkQuery(hash=benchmark_hash(env, meta), serialized=serialized, metadata=meta)
    return storage.store_benchmark(query).id


def load_env(
    storage: TupliStorage, benchmark_id: str, *, trusted: bool = False, allow: Iterable[str] = ()
) -> Any:
    """Loads a stored benchmark's env (see ``deserialize_env`` for ``trusted`` and ``allow``).

    Raises:
        UnsafePayloadError: The stored env needs ``trusted=True`` (the message says why).
        TupliStorageError: Unknown id, or the stored env cannot be rebuilt.

    Example:
        >>> # env = load_env(store, bench_id)
    """
    payload = storage.load_benchmark(benchmark_id).serialized
    return deserialize_env(payload, trusted=trusted, allow=allow)


def publish_benchmark(storage: TupliStorage, benchmark_id: str, publish_in: str = "global") -> None:
    """Adds ``publish_in`` to the benchmark's ``published_in`` groups.

    Example:
        >>> # publish_benchmark(store, bench_id)
    """
    storage.publish_benchmark(benchmark_id, publish_in)


def _related_artifacts(payload: str) -> list[str]:
    """pytupli's ``env.unwrapped.related_artifacts`` ids, read from the JSON without decoding."""
    try:
        root = json.loads(payload)
    except (ValueError, RecursionError):
        return []
    found: list[str] = []
    stack = [root]
    while stack:
        node = stack.pop()
        if type(node) is list:
            stack.extend(node)
        elif type(node) is dict:
            ids = node.get("related_artifacts")
            if tags.OBJECT in node and type(ids) is list:
                found.extend(i for i in ids if isinstance(i, str) and i not in found)
            stack.extend(node.values())
    return found


def delete_benchmark(
    storage: TupliStorage,
    benchmark_id: str,
    *,
    delete_artifacts: bool = False,
    delete_episodes: bool = True,
    related_artifacts: Sequence[str] = (),
) -> None:
    """Deletes a benchmark, by default its episodes, and optionally its related artifacts.

    Episodes are found with ``list_episodes(FilterEQ(key="benchmark_id", value=id))`` without
    loading their tuples. With ``delete_artifacts`` and no ``related_artifacts`` given, the ids
    pytupli keeps in ``env.unwrapped.related_artifacts`` are read from the stored JSON (the env
    is not decoded).

    Raises:
        TupliStorageError: Unknown benchmark id (nothing is deleted) or a storage failure.

    Example:
        >>> # delete_benchmark(store, bench_id, delete_episodes=True)
    """
    artifacts = list(related_artifacts)
    if delete_artifacts and not artifacts:
        artifacts = _related_artifacts(storage.load_benchmark(benchmark_id).serialized)
    elif not storage.list_benchmarks(FilterEQ(key="id", value=benchmark_id)):
        storage.load_benchmark(benchmark_id)  # raises the storage's "not found" error
    if delete_episodes:
        episodes = storage.list_episodes(FilterEQ(key="benchmark_id", value=benchmark_id))
        ids = [episode.id for episode in episodes]
        batch = getattr(storage, "delete_episodes", None)
        if callable(batch) and ids:
            batch(ids)  # FileStorage: one transaction
        else:
            for episode_id in ids:
                storage.delete_episode(episode_id)
    storage.delete_benchmark(benchmark_id)
    if delete_artifacts:
        for artifact_id in artifacts:
            storage.delete_artifact(artifact_id)
