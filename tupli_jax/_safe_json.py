"""Safe decoding of jsonpickle env payloads: an allow-list check, then a guarded unpickler.

Private, host-side only; ``tupli_jax.benchmark`` re-exports what users need
(``deserialize_env``, ``audit_payload``, ``UnsafePayloadError``). Nothing here is traced.

Benchmarks come from other people, and ``jsonpickle.decode`` imports any module and calls any
callable a payload names. Without ``trusted=True``, ``decode`` parses the JSON and checks every
name in it *before* decoding, then decodes that same parsed data:

* Anything called (``py/function``, the callable of ``py/reduce``, ``py/type`` values, classes
  given constructor arguments) must be on a short allow-list of specific reconstruction
  helpers and data types (numpy arrays, dtypes, scalars and RNG state; jax arrays and
  ml_dtypes; jumanji specs; builtin, ``collections`` and ``datetime`` types), or be a plain
  record: a ``NamedTuple`` or a dataclass (std, chex, flax) whose methods are all generated,
  with no ``__post_init__``. Each of them is safe to call with any data, other allowed
  callables included.
* Classes rebuilt from their state (``py/object`` without constructor arguments:
  ``object.__new__``, then attributes or the class's own ``__setstate__``) may also subclass
  ``gymnasium.Env``/``Space``, ``jumanji.env.Environment``, ``jumanji.viewer.Viewer`` or
  ``jumanji.specs.Spec``, or be defined in ``jumanji.environments`` (generators, reward
  functions, viewers); a few data classes are listed by name (``EnvSpec``, matplotlib
  colormaps). ``RecordVideo`` and ``HumanRendering`` are refused (they write files or open
  windows). To check such a class its module is imported only if already imported, or
  installed and not on a deny-list of modules with import side effects or code-execution
  powers (``os``, ``subprocess``, ``antigravity``, ``test``, any ``__main__``, ...); the
  class is looked up statically and checked by its real MRO.
* ``py/mod``, ``py/repr``, unknown ``py/`` tags, ``py/reduce`` whose callable is not a literal
  allowed name (a ``py/id`` say), and ``json://`` keys that fail these checks are refused.

The unpickler then resolves names only from the checked set, re-checks names and
``py/reduce`` shapes as it goes, and refuses numpy dtypes whose pickled state contradicts their
description (forged flags or offsets make numpy read payload bytes as pointers), or object
array states with fewer items than elements (numpy reads past the list). It also keeps a
size budget: before an array (numpy or jax, or a jumanji ``BoundedArray``'s bounds), a
``bytes``/``bytearray``/``numpy.void`` of a given length, or a ``range`` is built, the bytes its
arguments ask for are added up, and the payload is refused once the total passes
``MAX_DECODED_BYTES`` (1 GiB), so a few bytes of JSON cannot ask for terabytes. Importing an
installed, non-denied module still runs its top-level code. ``trusted=True`` skips all checks,
the size budget included: only for trusted sources.

Example:
    >>> decode('{"py/reduce": [{"py/type": "builtins.range"}, {"py/tuple": [0, 3, 1]}]}')
    range(0, 3)
    >>> audit('{"py/function": "os.system"}')
    ["'os.system' (called)"]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import operator
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jsonpickle
import numpy as np
from jsonpickle import tags
from jsonpickle.errors import ClassNotFoundError
from jsonpickle.unpickler import Unpickler

from tupli_jax.storage.base import TupliStorageError

__all__ = ["MAX_DECODED_BYTES", "UnsafePayloadError", "audit", "decode"]

#: Most bytes of arrays and buffers an untrusted payload may ask for, in total (1 GiB).
MAX_DECODED_BYTES = 1 << 30


class UnsafePayloadError(TupliStorageError):
    """A stored env names a callable or class, or asks for more memory, than is allowed without
    ``trusted=True``."""


# --------------------------------------------------------------------------------------------
# Allow-lists and deny-lists
# --------------------------------------------------------------------------------------------

# Functions that rebuild data. Each is safe to call with arbitrary data arguments.
_ALLOWED_FUNCTIONS = frozenset(
    {
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray.scalar",
        "numpy.core.multiarray.scalar",
        "numpy.random._pickle.__generator_ctor",
        "numpy.random._pickle.__bit_generator_ctor",
        "numpy.random._pickle.__randomstate_ctor",
        "numpy.random.bit_generator.__pyx_unpickle_SeedSequence",
        "numpy.random.bit_generator.__pyx_unpickle_SeedlessSeedSequence",
        "jax._src.array._reconstruct_array",
    }
)

_BUILTIN_TYPES = (
    "set", "frozenset", "tuple", "list", "dict", "complex", "bytes", "bytearray", "slice",
    "range", "int", "float", "str", "bool", "object", "NoneType",
)  # fmt: skip

_NUMPY_SCALARS = (
    "bool bool_ int8 int16 int32 int64 uint8 uint16 uint32 uint64 intc uintc intp uintp "
    "longlong ulonglong float16 float32 float64 longdouble complex64 complex128 clongdouble "
    "bytes_ str_ void object_ datetime64 timedelta64"
)

_ML_DTYPES = (
    "bfloat16 float8_e3m4 float8_e4m3 float8_e4m3b11fnuz float8_e4m3fn float8_e4m3fnuz "
    "float8_e5m2 float8_e5m2fnuz float8_e8m0fnu float6_e2m3fn float6_e3m2fn float4_e2m1fn "
    "int2 int4 uint2 uint4"
)

# Data types: safe to construct (``__new__``/``__init__``) with arbitrary data arguments.
_ALLOWED_TYPES = frozenset(
    {
        *(f"builtins.{n}" for n in _BUILTIN_TYPES),
        *(f"collections.{n}" for n in ("OrderedDict", "deque", "defaultdict", "Counter")),
        *(f"datetime.{n}" for n in ("date", "datetime", "time", "timedelta", "timezone")),
        "numpy.ndarray",
        "numpy.dtype",
        *(f"numpy.{n}" for n in _NUMPY_SCALARS.split()),
        *(f"ml_dtypes.{n}" for n in _ML_DTYPES.split()),  # jax's bfloat16, float8, int4, ...
        "numpy.random._generator.Generator",
        "numpy.random.mtrand.RandomState",
        "numpy.random._pcg64.PCG64",
        "numpy.random._pcg64.PCG64DXSM",
        "numpy.random._mt19937.MT19937",
        "numpy.random._philox.Philox",
        "numpy.random._sfc64.SFC64",
        "numpy.random.bit_generator.SeedSequence",
        "numpy.random.bit_generator.SeedlessSeedSequence",
        *(f"jumanji.specs.{n}" for n in ("Array", "BoundedArray", "DiscreteArray")),
        "jumanji.specs.MultiDiscreteArray",
    }
)

# Data-only classes rebuilt from their state (never called), beyond the base-class rule.
_STATE_CLASSES = frozenset(
    {
        "gymnasium.envs.registration.EnvSpec",
        "gymnasium.envs.registration.WrapperSpec",
        "matplotlib.colors.ListedColormap",  # held by jumanji viewers
        "matplotlib.colors.LinearSegmentedColormap",
    }
)

# Bases whose subclasses may be rebuilt from their state: (module, class name).
_STATE_BASES = (
    ("gymnasium.core", "Env"),
    ("gymnasium.spaces.space", "Space"),
    ("jumanji.env", "Environment"),
    ("jumanji.viewer", "Viewer"),
    ("jumanji.specs", "Spec"),
)
_JUMANJI_COMPONENTS = "jumanji.environments."

# Env classes that write files or open windows at a path or mode taken from their state.
_DENIED_CLASSES = (
    ("gymnasium.wrappers.rendering", "RecordVideo"),
    ("gymnasium.wrappers.rendering", "HumanRendering"),
)

# Modules never imported to check a class: import side effects or code-execution powers.
_DENIED_MODULE_NAMES = (
    "__main__", "__hello__", "__phello__", "antigravity", "this", "test", "idlelib", "turtledemo",
    "turtle", "tkinter", "os", "posix", "nt", "posixpath", "ntpath", "subprocess",
    "_posixsubprocess", "shutil", "sys", "builtins", "importlib", "imp", "runpy", "code", "codeop",
    "pty", "tty", "socket", "ssl", "select", "selectors", "asyncio", "http", "urllib", "ftplib",
    "smtplib", "telnetlib", "webbrowser", "ctypes", "cffi", "multiprocessing", "concurrent",
    "threading", "_thread", "signal", "tempfile", "pathlib", "io", "_io", "glob", "fileinput",
    "pickle", "_pickle", "marshal", "shelve", "dbm", "sqlite3", "zipfile", "tarfile", "zipimport",
    "pdb", "bdb", "trace", "profile", "cProfile", "site", "sysconfig", "ensurepip", "venv", "pip",
    "setuptools", "distutils", "pkg_resources", "jsonpickle", "dill", "cloudpickle", "joblib",
    "gc", "inspect", "operator", "functools", "types", "copyreg", "copy", "logging", "platform",
    "doctest", "unittest", "timeit", "mmap", "resource", "fcntl", "pwd", "grp", "getpass",
)  # fmt: skip
_DENIED_MODULES = frozenset(_DENIED_MODULE_NAMES)

_KNOWN_TAGS = frozenset(tags.RESERVED | {tags.B64, tags.B85})
_REFUSED_TAGS = {tags.MODULE: "a module object", tags.REPR: "a repr-encoded object"}
# Tags that make jsonpickle call ``cls.__new__``/``cls()`` with payload arguments.
_CONSTRUCTOR_TAGS = (tags.NEWARGS, tags.NEWARGSEX, tags.INITARGS, tags.SEQ, "default_factory")

_CALL = "call"  # the name may be called with payload data
_STATE = "state"  # the class is only rebuilt from its state

# --------------------------------------------------------------------------------------------
# Payload checking
# --------------------------------------------------------------------------------------------


def _snippet(value: Any) -> str:
    try:
        return json.dumps(value)[:80]
    except (ValueError, TypeError, RecursionError):
        return f"<{type(value).__name__}>"


def _single(node: Any, tag: str) -> str | None:
    """The name in ``{tag: "name"}`` when ``node`` is exactly that dict, else ``None``."""
    if type(node) is dict and len(node) == 1 and isinstance(node.get(tag), str):
        return str(node[tag])
    return None


def _reduce_problem(value: Any) -> str | None:
    """Why a ``py/reduce`` list is refused (its call position must be a literal name)."""
    if type(value) is not list or not 1 <= len(value) <= 5:
        return f"a py/reduce that is not a list of 1 to 5 items: {_snippet(value)}"
    target = value[0]
    if target == tags.NEWOBJ:
        args = value[1] if len(value) > 1 else None
        seq = args.get(tags.TUPLE) if type(args) is dict and len(args) == 1 else args
        if type(seq) is not list or not seq or _single(seq[0], tags.TYPE) is None:
            return f"a py/newobj whose class is not a literal py/type: {_snippet(args)}"
        return None
    if _single(target, tags.FUNCTION) is None and _single(target, tags.TYPE) is None:
        return (
            f"a py/reduce calling {_snippet(target)} (only a literal py/function or "
            "py/type name may be called)"
        )
    return None


class _Scan:
    """Every name a parsed payload uses, with the strictest role it is used in."""

    def __init__(self) -> None:
        self.roles: dict[str, str] = {}
        self.problems: list[str] = []

    def need(self, name: Any, role: str, tag: str) -> None:
        if not isinstance(name, str):
            self.problems.append(f"a {tag} whose name is not a string: {name!r:.80}")
        elif self.roles.get(name) != _CALL:
            self.roles[name] = role

    def run(self, root: Any) -> None:
        newobj_classes: set[int] = set()
        stack = [root]
        while stack:
            node = stack.pop()
            if type(node) is list:
                stack.extend(node)
                continue
            if type(node) is not dict:
                continue
            for key in node:
                if isinstance(key, str) and key.startswith(tags.JSON_KEY):
                    try:
                        stack.append(json.loads(key[len(tags.JSON_KEY) :]))
                    except (ValueError, RecursionError):
                        self.problems.append(f"a json:// key that is not JSON: {key[:80]!r}")
                elif isinstance(key, str) and key.startswith("py/") and key not in _KNOWN_TAGS:
                    self.problems.append(f"an unknown jsonpickle tag {key!r}")
            for tag, what in _REFUSED_TAGS.items():
                if tag in node:
                    self.problems.append(f"{what} ({tag} {_snippet(node[tag])})")
            if tags.FUNCTION in node:
                self.need(node[tags.FUNCTION], _CALL, tags.FUNCTION)
            if tags.TYPE in node and id(node) not in newobj_classes:
                self.need(node[tags.TYPE], _CALL, tags.TYPE)
            if tags.OBJECT in node:
                role = _CALL if any(t in node for t in _CONSTRUCTOR_TAGS) else _STATE
                self.need(node[tags.OBJECT], role, tags.OBJECT)
            if tags.REDUCE in node:
                value = node[tags.REDUCE]
                problem = _reduce_problem(value)
                if problem is not None:
                    self.problems.append(problem)
                elif value[0] == tags.NEWOBJ:
                    args = value[1]
                    seq = args[tags.TUPLE] if type(args) is dict else args
                    newobj_classes.add(id(seq[0]))
                    # Extra arguments or list/dict items call methods of the class.
                    items = any(item is not None for item in value[3:])
                    role = _STATE if len(seq) == 1 and not items else _CALL
                    self.need(seq[0][tags.TYPE], role, tags.NEWOBJ)
            stack.extend(node.values())


def _valid_name(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and all(p.isidentifier() for p in parts)


def _denied(name: str) -> bool:
    parts = name.split(".")
    prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
    return bool(prefixes & _DENIED_MODULES) or "__main__" in parts


def _resolve_trusted(name: str) -> Any:
    """Imports an allow-listed (or caller-allowed) name the way jsonpickle would."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                obj: Any = importlib.import_module(".".join(parts[:cut]))
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            return obj
        except (ImportError, AttributeError, ValueError):
            continue
    if name == "builtins.NoneType":
        return type(None)
    raise LookupError(f"{name!r} could not be imported")


def _import_checked(module_name: str) -> types.ModuleType:
    if module_name in sys.modules:
        return sys.modules[module_name]
    if _denied(module_name):
        raise LookupError(f"module {module_name!r} is on the deny-list")
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise LookupError(f"module {module_name!r} is not installed")
    return importlib.import_module(module_name)


def _resolve_checked(name: str) -> Any:
    """Imports a name's module under the deny-list policy; looks the rest up statically."""
    parts = name.split(".")
    module = _import_checked(parts[0])
    used = 1
    while used < len(parts):
        sub = ".".join(parts[: used + 1])
        if sub not in sys.modules:
            if "__path__" not in vars(module):  # not a package (no module __getattr__ call)
                break
            try:
                if importlib.util.find_spec(sub) is None:
                    break
            except (ImportError, ValueError):
                break
        module = _import_checked(sub)
        used += 1
    obj: Any = module
    for attr in parts[used:]:
        try:
            obj = inspect.getattr_static(obj, attr)
        except AttributeError:
            raise LookupError(f"{name!r} does not exist") from None
    return obj


def _mro(cls: type) -> tuple[type, ...]:
    mro: tuple[type, ...] = type.__dict__["__mro__"].__get__(cls)
    return mro


def _classes(pairs: Iterable[tuple[str, str]]) -> list[type]:
    found = []
    for module_name, class_name in pairs:
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):  # an optional library is missing
            continue
    return found


# Methods jsonpickle calls on a rebuilt object (state, list items, dict items, py/seq).
_REBUILD_METHODS = ("__setstate__", "append", "extend", "add", "__setitem__")


def _is_plain_namedtuple(cls: type) -> bool:
    """A ``NamedTuple`` with the generated ``__new__``: calling it only builds a tuple."""
    if type(cls) is not type or tuple not in _mro(cls) or "_fields" not in dir(cls):
        return False
    new = getattr(cls.__new__, "__globals__", {})
    custom = any(name in vars(k) for k in _mro(cls)[:-2] for name in _REBUILD_METHODS)
    init = inspect.getattr_static(cls, "__init__", None)
    return new.get("_tuple_new") is tuple.__new__ and init is object.__init__ and not custom


def _is_generated(function: Any) -> bool:
    """Whether a method was generated by ``dataclasses`` (possibly wrapped by ``chex``)."""
    chex_file = getattr(sys.modules.get("chex._src.dataclass"), "__file__", None)
    for _ in range(4):
        code = getattr(function, "__code__", None)
        if code is None:
            return False
        if code.co_filename == "<string>":  # dataclasses builds its methods with exec
            return True
        if chex_file is None or code.co_filename != chex_file:
            return False
        function = getattr(function, "__wrapped__", None)
        if function is None:  # chex's own method (its __setstate__ only updates __dict__)
            return True
    return False


def _is_plain_dataclass(cls: type) -> bool:
    """A dataclass (std, chex or flax) whose methods are generated: a record, safe to build."""
    mro = _mro(cls)[:-1]
    if not any("__dataclass_fields__" in vars(k) for k in mro):
        return False
    custom = ("__post_init__", "__new__", "__del__", *_REBUILD_METHODS[1:])
    if any(name in vars(k) for k in mro for name in custom):
        return False
    for name in ("__init__", "__setstate__", "__setattr__"):
        method = next((vars(k)[name] for k in mro if name in vars(k)), None)
        if method is not None and not _is_generated(method):
            return False
    return True


def _is_state_class(cls: type) -> bool:
    """Env-side classes that may be rebuilt from their state (``object.__new__`` + attributes)."""
    mro = _mro(cls)
    if any(denied in mro for denied in _classes(_DENIED_CLASSES)):
        return False
    if any(base in mro for base in _classes(_STATE_BASES)):
        return True
    # jumanji's env packages hold only env components (generators, reward functions, viewers,
    # types): pure JAX code with no import side effects and no custom __setstate__.
    return str(vars(cls).get("__module__", "")).startswith(_JUMANJI_COMPONENTS)


def _vet(data: Any, allow: Iterable[str]) -> tuple[dict[str, Any], list[str]]:
    """Checks every name in parsed payload ``data``; returns the resolved names and problems."""
    scan = _Scan()
    scan.run(data)
    extra = set(allow)
    problems = list(scan.problems)
    pending: dict[str, str] = {}
    for name, role in scan.roles.items():
        if name in extra or name in _ALLOWED_FUNCTIONS or name in _ALLOWED_TYPES:
            continue
        if role == _STATE and name in _STATE_CLASSES:
            continue
        if not _valid_name(name) or _denied(name):
            problems.append(f"{name!r} ({'called' if role == _CALL else 'rebuilt'})")
        else:
            pending[name] = role
    if problems:  # refuse before importing anything
        return {}, problems
    vetted: dict[str, Any] = {}
    for name, role in scan.roles.items():
        try:
            if name not in pending:
                vetted[name] = _resolve_trusted(name)
                continue
            obj = _resolve_checked(name)
        except LookupError as exc:
            problems.append(f"{name!r} ({exc})")
            continue
        ok = isinstance(obj, type) and (
            _is_plain_namedtuple(obj)
            or _is_plain_dataclass(obj)
            or (role == _STATE and _is_state_class(obj))
        )
        if ok:
            vetted[name] = obj
        else:
            what = "called" if role == _CALL else "rebuilt from its state"
            problems.append(f"{name!r} ({what}; not an allowed class)")
    for name, obj in vetted.items():  # jsonpickle treats anything named __newobj__ specially
        if getattr(obj, "__name__", "") == "__newobj__":
            problems.append(f"{name!r} (named __newobj__)")
    return vetted, problems


def _parse(payload: Any) -> Any:
    if not isinstance(payload, str):
        raise TupliStorageError(
            f"expected a serialized env (jsonpickle JSON text), received "
            f"{type(payload).__name__}; pass Benchmark.serialized"
        )
    try:
        return json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise TupliStorageError(
            f"the serialized env is not valid JSON ({exc}); the stored benchmark is damaged"
        ) from exc


def audit(payload: str, *, allow: Iterable[str] = ()) -> list[str]:
    """Lists what keeps a payload from loading without ``trusted=True`` (see ``audit_payload``)."""
    return _vet(_parse(payload), allow)[1]


# --------------------------------------------------------------------------------------------
# Size budget
# --------------------------------------------------------------------------------------------

# numpy's ``_reconstruct`` (``numpy._core.multiarray`` and its ``numpy.core`` alias).
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]

# ``sizer(args, kwargs)``: the bytes a call with these restored payload arguments allocates.
_Sizer = Callable[[Any, Mapping[str, Any]], int]


_LIST_PICKLE = 0x02  # numpy's NPY_LIST_PICKLE dtype flag: items are pickled as a list


def _elements(shape: Any) -> int:
    """The number of elements of an array of ``shape`` (an int or a sequence of ints)."""
    if isinstance(shape, int | np.integer):
        shape = (shape,)
    elif isinstance(shape, str | bytes) or len(shape) > 64:  # numpy: at most 64 dimensions
        raise TypeError(f"expected a shape tuple, received {type(shape).__name__}")
    return math.prod(max(0, operator.index(dim)) for dim in tuple(shape))


def _array_bytes(shape: Any, dtype: Any) -> int:
    """Bytes of an array of ``shape`` and ``dtype``, computed without building it."""
    return _elements(shape) * np.dtype(dtype).itemsize


def _array_state_bytes(state: Any) -> int:
    """Bytes that ``ndarray.__setstate__(state)`` allocates (0: not an array's state).

    Also refuses an item list shorter than the array: numpy's ``__setstate__`` reads one list
    item per element without checking the list's length, so it would read past the list's end
    (a crash, or worse).
    """
    if type(state) not in (tuple, list) or len(state) not in (4, 5):
        return 0  # ([version,] shape, dtype, is_fortran, data); numpy refuses anything else
    shape, dtype, data = state[-4], state[-3], state[-1]
    if not isinstance(dtype, np.dtype):
        return 0  # numpy refuses it too
    count = _elements(shape)
    if dtype.flags & _LIST_PICKLE and isinstance(data, list) and len(data) < count:
        raise UnsafePayloadError(
            f"refused a numpy array state with {len(data)} items for {count} elements; the "
            "payload is forged or damaged"
        )
    return count * dtype.itemsize


def _shaped_bytes(args: Any, kwargs: Mapping[str, Any]) -> int:
    """``ndarray(shape, dtype=None, ...)`` and ``BoundedArray(shape, dtype, ...)``."""
    shape = args[0] if len(args) > 0 else kwargs["shape"]
    return _array_bytes(shape, args[1] if len(args) > 1 else kwargs.get("dtype"))


def _jax_array_bytes(args: Any, kwargs: Mapping[str, Any]) -> int:
    """``jax._src.array._reconstruct_array(fun, args, arr_state, aval_state)``."""
    inner = _sizer(args[0])
    return (inner(args[1], {}) if inner is not None else 0) + _array_state_bytes(args[2])


def _length_bytes(args: Any, kwargs: Mapping[str, Any]) -> int:
    """``bytes(n)``, ``bytearray(n)``, ``numpy.void(n)``: ``n`` zero bytes."""
    is_length = len(args) > 0 and isinstance(args[0], int | np.integer)
    return max(0, operator.index(args[0])) if is_length else 0


def _range_bytes(args: Any, kwargs: Mapping[str, Any]) -> int:
    """``range(...)``: lazy itself, but ``list``, ``bytes``, ... would expand it."""
    return 8 * len(range(*args))


def _sizer(target: Any) -> _Sizer | None:
    """How many bytes calling ``target`` allocates from its arguments (``None``: not sized).

    Sized are the allowed callables that turn a small argument into a large allocation.
    """
    if target is _NP_RECONSTRUCT:
        return lambda args, kwargs: _array_bytes(args[1], args[2])
    jax_array = sys.modules.get("jax._src.array")
    if jax_array is not None and target is getattr(jax_array, "_reconstruct_array", None):
        return _jax_array_bytes
    if not isinstance(target, type):
        return None
    # Exact classes: subclasses take other arguments (jumanji's MultiDiscreteArray a num_values
    # array, already charged when it was built).
    bounded = getattr(sys.modules.get("jumanji.specs"), "BoundedArray", None)
    if target is np.ndarray or (bounded is not None and target is bounded):
        return _shaped_bytes
    mro = _mro(target)
    if bytes in mro or bytearray in mro or np.void in mro:
        return _length_bytes
    return _range_bytes if target is range else None


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class _EnvUnpickler(Unpickler):
    """jsonpickle's Unpickler, plus restoring the render mode of jumanji viewers."""

    def _restore_object_instance(self, obj: Any, cls: Any, class_name: str = "") -> Any:
        instance = super()._restore_object_instance(obj, cls, class_name)
        viewer = sys.modules.get("jumanji.viewer")
        base = getattr(viewer, "MatplotlibViewer", None)
        if base is not None and isinstance(instance, base):
            mode = vars(instance).get("_display", "human")
            if mode == "rgb_array":
                instance._display = instance._display_rgb_array
            elif mode == "human":
                instance._display = instance._display_human
        return instance


def _same_dtype(a: np.dtype[Any], b: np.dtype[Any]) -> bool:
    return bool(
        a == b
        and a.flags == b.flags
        and a.itemsize == b.itemsize
        and a.alignment == b.alignment
        and a.isalignedstruct == b.isalignedstruct
    )


def _rebuilt_dtype(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype built again from its public description (never from pickle state)."""
    if dtype.subdtype is not None:
        base, shape = dtype.subdtype
        return np.dtype((_rebuilt_dtype(base), shape))
    if dtype.fields is not None and dtype.names is not None:
        fields = [dtype.fields[name] for name in dtype.names]
        spec: Any = {
            "names": list(dtype.names),
            "formats": [_rebuilt_dtype(field[0]) for field in fields],
            "offsets": [field[1] for field in fields],
            "itemsize": dtype.itemsize,
        }
        if any(len(field) > 2 for field in fields):
            spec["titles"] = [field[2] if len(field) > 2 else None for field in fields]
        return np.dtype(spec, align=dtype.isalignedstruct)
    for description in (dtype.str, dtype.type):  # ml_dtypes (bfloat16) need the type
        try:
            rebuilt = np.dtype(description)
        except TypeError:
            continue
        if _same_dtype(rebuilt, dtype):
            return rebuilt
    raise ValueError(f"dtype {dtype!r} does not match its own description")


def _check_numpy(value: Any) -> None:
    """Refuses dtypes whose pickled state contradicts their description.

    ``numpy.dtype.__setstate__`` trusts the flags and offsets it is given: a dtype with an object
    field but without the object flags makes numpy read payload bytes as object pointers.
    """
    dtype = value if isinstance(value, np.dtype) else getattr(value, "dtype", None)
    if not isinstance(value, np.dtype | np.ndarray | np.generic) or not isinstance(dtype, np.dtype):
        return
    try:
        same = _same_dtype(_rebuilt_dtype(dtype), dtype)
    except (TypeError, ValueError):
        same = False
    if not same:
        raise UnsafePayloadError(
            f"refused a numpy dtype whose pickled state contradicts its description "
            f"({dtype!r}, flags {dtype.flags}); the payload is forged or damaged"
        )


_GUARDED_METHODS = (
    "_restore_function",
    "_restore_type",
    "_restore_object",
    "_restore_reduce",
    "_restore_module",
    "_restore_repr_safe",
    "_restore_repr",
    "_restore_object_instance",
    "_restore_tags",  # picks the restore function of every node: the size checks hook in there
    "reset",
)


class _GuardedUnpickler(_EnvUnpickler):
    """Resolves only vetted names; re-checks names and py/reduce shapes while restoring.

    It also keeps the size budget: the arguments of a sized callable (see ``_sizer``), and every
    ``__setstate__`` state shaped like a numpy array's, are measured once jsonpickle has restored
    them and before it uses them, and more than ``max_bytes`` in total is refused. Their payload
    nodes are registered, and ``_restore_tags`` wraps such a node's restore function with the
    check.
    """

    def __init__(self, vetted: Mapping[str, Any], max_bytes: int | None = None) -> None:
        super().__init__(keys=True, safe=True, on_missing="error")
        self._vetted = dict(vetted)
        self._max_bytes = MAX_DECODED_BYTES if max_bytes is None else max_bytes

    def reset(self) -> None:
        super().reset()
        self._checks: dict[int, Callable[[Any], None]] = {}
        self._charged = 0

    def _check(self, obj: Any, tag: str) -> None:
        name = obj.get(tag)
        if not isinstance(name, str) or name not in self._vetted:
            raise UnsafePayloadError(f"refused {tag} {name!r:.80} while decoding (not vetted)")

    def _restore_function(self, obj: Any) -> Any:
        self._check(obj, tags.FUNCTION)
        return self._vetted[obj[tags.FUNCTION]]

    def _restore_type(self, obj: Any) -> Any:
        self._check(obj, tags.TYPE)
        return self._vetted[obj[tags.TYPE]]

    def _restore_object(self, obj: Any) -> Any:
        self._check(obj, tags.OBJECT)
        cls = self._vetted[obj[tags.OBJECT]]
        if tags.NEWARGSEX in obj:  # jsonpickle's order: newargsex, newargs, initargs
            pair = obj[tags.NEWARGSEX]
            if type(pair) is list and len(pair) == 2:
                self._size_call(cls, pair[0], pair[1])
        elif tags.NEWARGS in obj or tags.INITARGS in obj:
            self._size_call(cls, obj.get(tags.NEWARGS, obj.get(tags.INITARGS)))
        if tags.STATE in obj:
            self._size_array_state(cls, obj[tags.STATE])
        value = super()._restore_object(obj)
        _check_numpy(value)
        return value

    def _restore_reduce(self, obj: Any) -> Any:
        items = obj.get(tags.REDUCE)
        problem = _reduce_problem(items)
        if problem is not None:
            raise UnsafePayloadError(f"refused {problem} while decoding")
        if items[0] == tags.NEWOBJ:  # cls.__new__(cls, *args[1:]), cls a literal py/type
            seq = items[1][tags.TUPLE] if type(items[1]) is dict else items[1]
            target = self._vetted.get(seq[0][tags.TYPE])
            self._size_call(target, items[1], skip=1)
        else:  # target(*args), target a literal py/function or py/type
            name = _single(items[0], tags.FUNCTION) or _single(items[0], tags.TYPE)
            target = self._vetted.get(str(name))
            if len(items) > 1:
                self._size_call(target, items[1])
        if len(items) > 2:
            self._size_array_state(target, items[2])
        value = super()._restore_reduce(obj)
        _check_numpy(value)  # before an array's __setstate__ can use a forged dtype
        return value

    def _restore_module(self, obj: Any) -> Any:
        raise UnsafePayloadError(f"refused py/mod {obj.get(tags.MODULE)!r:.80} while decoding")

    def _restore_repr_safe(self, obj: Any) -> Any:
        raise UnsafePayloadError(f"refused py/repr {obj.get(tags.REPR)!r:.80} while decoding")

    _restore_repr = _restore_repr_safe

    # --- size budget -----------------------------------------------------------------------

    def _restore_tags(self, obj: Any, *rest: Any) -> Any:
        restore = super()._restore_tags(obj, *rest)
        check = self._checks.pop(id(obj), None) if self._checks else None
        if check is None:
            return restore

        def checked(node: Any) -> Any:
            value = restore(node)
            check(value)
            return value

        return checked

    def _when_restored(self, node: Any, check: Callable[[Any], None]) -> None:
        """Runs ``check`` on the restored value of payload ``node`` before jsonpickle uses it."""
        if type(node) in (dict, list) and node:
            self._checks[id(node)] = check  # the parsed payload outlives the restore
        else:
            check(node)  # other JSON values restore to themselves (or are left as they are)

    def _size_call(self, target: Any, args: Any, kwargs: Any = None, skip: int = 0) -> None:
        """Charges a call of ``target`` with the arguments in nodes ``args`` and ``kwargs``."""
        sizer = _sizer(target)
        if sizer is None:
            return

        def charge(args: Any, kwargs: Any) -> None:
            self._charge(target, lambda: sizer(args[skip:], kwargs))

        if kwargs:  # jsonpickle restores kwargs only when there are some, after the args
            given: list[Any] = [()]
            self._when_restored(args, lambda value: given.append(value))
            self._when_restored(kwargs, lambda value: charge(given[-1], value))
        else:
            self._when_restored(args, lambda value: charge(value, {}))

    def _size_array_state(self, target: Any, state: Any) -> None:
        """Checks and charges node ``state`` if it is an array's state (whatever ``target`` is:
        ``numpy.float64([...])`` returns an array too)."""
        self._when_restored(
            state, lambda value: self._charge(target, lambda: _array_state_bytes(value))
        )

    def _charge(self, target: Any, measure: Callable[[], int]) -> None:
        name = f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"
        try:
            size = measure()
        except UnsafePayloadError:
            raise
        except Exception as exc:
            raise UnsafePayloadError(
                f"refused a {name} whose size cannot be told from its arguments "
                f"({type(exc).__name__}: {exc!s:.80}); the payload is forged or damaged"
            ) from None
        self._charged += size
        if self._charged > self._max_bytes:
            raise UnsafePayloadError(
                f"refused to load the stored env: its arrays and buffers would take more than "
                f"the {self._max_bytes} bytes allowed to an untrusted payload ({size} bytes for "
                f"a {name}, {self._charged} in all). If you trust the source of this "
                "benchmark, pass trusted=True."
            )


def _restore(unpickler: Any, data: Any, classes: Mapping[str, Any] | None) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return unpickler.restore(data, reset=True, classes=dict(classes or {}) or None)
    except TupliStorageError:
        raise
    except ClassNotFoundError as exc:  # a BaseException in jsonpickle
        raise TupliStorageError(
            f"the stored env names a class that is not installed here or cannot be created "
            f"({exc}); install the package that defines it"
        ) from None
    except RecursionError as exc:
        raise TupliStorageError("the serialized env is nested too deeply to load") from exc
    except Exception as exc:
        raise TupliStorageError(
            f"the stored env could not be rebuilt: {type(exc).__name__}: {exc}"
        ) from exc


def decode(payload: str, *, trusted: bool = False, allow: Iterable[str] = ()) -> Any:
    """Rebuilds an env from jsonpickle JSON, refusing unsafe payloads (see ``deserialize_env``).

    Raises:
        UnsafePayloadError: The payload names something not allowed, or asks for more than
            ``MAX_DECODED_BYTES`` of arrays and buffers.
        TupliStorageError: The payload is not JSON, or decoding failed.
        TypeError: ``allow`` holds something that is not a dotted name.
    """
    data = _parse(payload)
    if trusted:
        return _restore(_EnvUnpickler(keys=True, safe=True, on_missing="error"), data, None)
    allowed = list(allow)
    bad = [a for a in allowed if not isinstance(a, str) or not _valid_name(a)]
    if bad:
        raise TypeError(
            f"allow expects dotted names like 'mypkg.MyClass', received {bad!r:.120}; pass "
            "strings naming module-level callables or classes"
        )
    missing = [m for m in _GUARDED_METHODS if not callable(getattr(Unpickler, m, None))]
    if missing:
        raise TupliStorageError(
            f"this jsonpickle {jsonpickle.__version__} lacks {missing} that the safe loader "
            "guards; install jsonpickle 4.x, or pass trusted=True for a trusted source"
        )
    vetted, problems = _vet(data, allowed)
    if problems:
        raise UnsafePayloadError(
            "refused to load the stored env: it names "
            + "; ".join(problems[:10])
            + (f"; and {len(problems) - 10} more" if len(problems) > 10 else "")
            + ". Expected only allow-listed data types, functions, and env classes "
            "(gymnasium.Env, gymnasium.Space, jumanji Environment/Viewer/Spec subclasses). If "
            "you trust the source of this benchmark, pass trusted=True (or allow=[names])."
        )
    return _restore(_GuardedUnpickler(vetted), data, vetted)
