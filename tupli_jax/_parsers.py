"""The tuple parsers of ``TupliDataset.convert_to_tensors`` (pytupli's API). Host side only.

``BaseTupleParser`` and its numpy, PyTorch and TensorFlow subclasses turn the tuple view's
per-tuple lists into arrays or tensors; ``_require`` imports an optional framework with an
ImportError naming the package to install. Split out of ``tupli_jax.dataset``, which re-exports
the parser classes: import them from there.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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


class NumpyTupleParser(BaseTupleParser):
    """numpy arrays: observations, actions and rewards ``float32 [N, ...]``, flags ``bool [N]``.

    Example:
        >>> obs, *_ = NumpyTupleParser.parse_lists([[1, 2]], [0], [1.0], [False], [True])
        >>> obs.dtype, obs.shape
        (dtype('float32'), (1, 2))
    """

    @classmethod
    def parse_lists(
        cls,
        obs: list[Any],
        act: list[Any],
        rew: list[float],
        term: list[bool],
        trunc: list[bool],
    ) -> tuple[np.ndarray, ...]:
        """Converts the lists with ``np.array`` (float32 / bool)."""
        return (
            np.array(obs, dtype=np.float32),
            np.array(act, dtype=np.float32),
            np.array(rew, dtype=np.float32),
            np.array(term, dtype=np.bool_),
            np.array(trunc, dtype=np.bool_),
        )


def _require(module: str, package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"this conversion needs the '{package}' package, which is not installed: "
            f"pip install {package}"
        ) from err


def _convert(make: Any, f32: Any, boolean: Any, *lists: list[Any]) -> tuple[Any, ...]:
    """``make(x, dtype=...)`` of observations, actions, rewards (float32) and the two flags."""
    obs, act, rew, term, trunc = lists
    return (
        make(obs, dtype=f32),
        make(act, dtype=f32),
        make(rew, dtype=f32),
        make(term, dtype=boolean),
        make(trunc, dtype=boolean),
    )


class TorchTupleParser(BaseTupleParser):
    """PyTorch tensors (float32 / bool); needs ``torch`` (ImportError naming it otherwise).

    Example:
        >>> # obs, act, rew, term, trunc = dataset.convert_to_tensors(TorchTupleParser)
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
        """Converts the lists with ``torch.tensor``."""
        torch = _require("torch", "torch")
        return _convert(torch.tensor, torch.float32, torch.bool, obs, act, rew, term, trunc)


class TensorflowTupleParser(BaseTupleParser):
    """TensorFlow tensors (float32 / bool); needs ``tensorflow`` (ImportError naming it otherwise).

    Example:
        >>> # obs, act, rew, term, trunc = dataset.convert_to_tensors(TensorflowTupleParser)
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
        """Converts the lists with ``tf.constant``."""
        tf = _require("tensorflow", "tensorflow")
        return _convert(tf.constant, tf.float32, tf.bool, obs, act, rew, term, trunc)
