"""Importable classes for the benchmark tests (payloads name this module, so it must import).

- ``NoisyWalkEnv``: a custom ``gymnasium.Env`` holding numpy arrays and its own RNG besides
  ``np_random``; it must round-trip without ``trusted=True``.
- ``MarkerOnInitEnv``: an Env whose constructor writes a file: refused when a payload calls it.
- ``FileWriter``: a plain class whose ``__setstate__`` writes a file: refused (not an env).
- ``NotAnEnv``: a harmless plain class, still refused (not on the allow-list, no env base).
- ``GridPoint`` / ``WalkConfig``: a plain ``NamedTuple`` and dataclass (records: allowed).
- ``CheckedConfig``: a dataclass whose ``__post_init__`` writes a file: refused when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import gymnasium
import numpy as np
from gymnasium import spaces


class NoisyWalkEnv(gymnasium.Env[np.ndarray, np.int64]):
    """A point walking in ``size`` dimensions with per-dimension gains and its own noise RNG."""

    def __init__(self, size: int = 4, noise_seed: int = 0) -> None:
        self.observation_space = spaces.Box(-np.inf, np.inf, (size,), np.float32)
        self.action_space = spaces.Discrete(3)
        self.gains = np.linspace(0.5, 1.5, size).astype(np.float32)
        self.table = {0: -1.0, 1: 0.0, 2: 1.0}  # int keys must survive serialization
        self.tags = {"alpha", "beta", "gamma", "delta", "epsilon"}  # set order varies by process
        self.noise_rng = np.random.default_rng(noise_seed)
        self.position = np.zeros(size, np.float32)
        self.t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = self.np_random.normal(size=self.position.shape).astype(np.float32)
        self.t = 0
        return self.position.copy(), {}

    def step(self, action: np.int64) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        noise = self.noise_rng.normal(scale=0.1, size=self.position.shape).astype(np.float32)
        self.position = self.position + self.gains * np.float32(self.table[int(action)]) + noise
        self.t += 1
        reward = -float(np.abs(self.position).sum())
        return self.position.copy(), reward, bool(np.abs(self.position).max() > 5), self.t >= 20, {}


class MarkerOnInitEnv(gymnasium.Env[np.ndarray, np.int64]):
    """Writes ``path`` when constructed with one."""

    def __init__(self, path: str | None = None) -> None:
        if path is not None:
            Path(path).write_text("constructor ran")


class FileWriter:
    """Writes ``state['path']`` when rebuilt through ``__setstate__``."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["path"]).write_text("setstate ran")


class NotAnEnv:
    """Plain data holder."""

    def __init__(self) -> None:
        self.value = 1


class GridPoint(NamedTuple):
    """A plain record."""

    row: int
    col: int


@dataclass(frozen=True)
class WalkConfig:
    """A plain record."""

    size: int
    start: GridPoint


@dataclass
class CheckedConfig:
    """Writes ``path`` in ``__post_init__``."""

    path: str

    def __post_init__(self) -> None:
        Path(self.path).write_text("post_init ran")
