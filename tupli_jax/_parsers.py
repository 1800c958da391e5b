"""The tuple parsers of ``TupliDataset.convert_to_tensors`` (pytupli's API). Host side only.

``BaseTupleParser`` and its numpy, PyTorch and TensorFlow subclasses turn the tuple view's
per-tuple lists into arrays or tensors; ``_require`` imports the framework with an
ImportError naming the package to install. Split out of ``tupli_jax.dataset``, which re-exports
the parser classes: import them from there.
"""

from __future__ import annotations

from typing import Any, ClassVar


class BaseTupleParser:
    """Turns the tuple view's lists into arrays/tensors of some framework (pytupli's API).

    Example:
        >>> class ListParser(BaseTupleParser):
        ...     @classmethod
        ...     def parse_lists(cls, obs, act, rew, term, trunc):
        ...         return obs, act, rew, term, trunc
    """

    @classmethod
    def parse_lists(
        cls,
        obs: list[Any],
        act: list[Any],
        rew: list[float],
        term: list[bool],
        trunc: list[bool],
    ) -> tuple[Any, ...]:
        """Converts per-tuple lists (observations, actions, rewards, terminals, timeouts)."""
        raise NotImplementedError(
            f"{cls.__name__}.parse_lists is not implemented; subclass BaseTupleParser and "
            "override parse_lists (or use NumpyTupleParser)"
        )


class _FrameworkParser(BaseTupleParser):
    """``parse_lists`` for a framework whose constructor takes ``dtype=``: observations,
    actions and rewards as ``float32``, the two flags as ``bool``. Subclasses name the module,
    its constructor and its bool dtype; the module is imported on first use (ImportError naming
    the package when it is missing)."""

    _module: ClassVar[str]
    _constructor: ClassVar[str]
    _bool: ClassVar[str] = "bool"

    @classmethod
    def parse_lists(
        cls,
        obs: list[Any],
        act: list[Any],
        rew: list[float],
        term: list[bool],
        trunc: list[bool],
    ) -> tuple[Any, ...]:
        """Converts the lists with the framework's constructor (float32 / bool)."""
        lib = _require(cls._module, cls._module)
        make, f32, boolean = getattr(lib, cls._constructor), lib.float32, getattr(lib, cls._bool)
        return (
            make(obs, dtype=f32),
            make(act, dtype=f32),
            make(rew, dtype=f32),
            make(term, dtype=boolean),
            make(trunc, dtype=boolean),
        )


class NumpyTupleParser(_FrameworkParser):
    """numpy arrays: observations, actions and rewards ``float32 [N, ...]``, flags ``bool [N]``.

    Example:
        >>> obs, *_ = NumpyTupleParser.parse_lists([[1, 2]], [0], [1.0], [False], [True])
        >>> obs.dtype, obs.shape
        (dtype('float32'), (1, 2))
    """

    _module, _constructor, _bool = "numpy", "array", "bool_"


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this conversion needs the '{package}' package, which is not installed: "
            f"pip install {package}"
        ) from err


class TorchTupleParser(_FrameworkParser):
    """PyTorch tensors (float32 / bool) made with ``torch.tensor``; needs ``torch`` (ImportError
    naming it otherwise).

    Example:
        >>> # obs, act, rew, term, trunc = dataset.convert_to_tensors(TorchTupleParser)
    """

    _module, _constructor = "torch", "tensor"


class TensorflowTupleParser(_FrameworkParser):
    """TensorFlow tensors (float32 / bool) made with ``tf.constant``; needs ``tensorflow``
    (ImportError naming it otherwise).

    Example:
        >>> # obs, act, rew, term, trunc = dataset.convert_to_tensors(TensorflowTupleParser)
    """

    _module, _constructor = "tensorflow", "constant"
