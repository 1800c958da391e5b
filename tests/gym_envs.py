"""Importable Gymnasium envs for the adapter tests (serialized benchmarks name this module).

- ``CounterEnv``: a walk on a line that ends by termination (reaching ``target``) or by a time
  limit; numpy scalar rewards and numpy values (scalars and arrays) in ``info``.
- ``CsvEnv``: replays rewards from a csv file (the artifact the tests store through
  ``_serialize``).
- ``DictObsEnv``: dict observations with a uint8 image and a discrete position.
- ``ShiftyEnv``: float32 observations, except that for seeds divisible by 3 the second step
  returns float64 (an env whose dtype changes mid-episode).
- ``SparseInfoEnv``: ``CounterEnv`` whose ``info`` is empty except on every third step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium
import numpy as np
from gymnasium import spaces

COUNTER_ID = "TupliCounter-v0"
SHIFTY_ID = "TupliShifty-v0"
SPARSE_INFO_ID = "TupliSparseInfo-v0"


class CounterEnv(gymnasium.Env[np.ndarray, np.int64]):
    """Position on a line; action 0 steps left, 1 stays, 2 steps right; done at ``target``.

    Observations are ``[position, noise]`` (float32, noise from the seeded RNG).
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, target: int = 3) -> None:
        self.target = int(target)
        self.observation_space = spaces.Box(-100.0, 100.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(3)
        self.position = 0
        self.steps = 0

    def _obs(self) -> np.ndarray:
        noise = self.np_random.uniform(-1.0, 1.0)
        return np.array([self.position, noise], dtype=np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.position = int(self.np_random.integers(-1, 2))
        self.steps = 0
        return self._obs(), {"start": np.int64(self.position)}

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        self.position += int(action) - 1
        self.steps += 1
        terminated = self.position >= self.target
        reward = np.float64(1.0 if terminated else -0.1)
        info = {
            "steps": np.int64(self.steps),
            "distance": np.float32(self.target - self.position),
            "trace": np.array([self.position, self.steps], dtype=np.int32),
            "tag": "left" if int(action) == 0 else "other",
        }
        return self._obs(), reward, terminated, False, info


class CsvEnv(gymnasium.Env[np.ndarray, np.int64]):
    """Replays the rows of a csv file of floats: observation = row, reward = row sum * action.

    The data lives in ``self.data`` (loaded from ``csv_path``); ``_serialize`` in the tests moves
    it into an artifact and ``_deserialize`` brings it back.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, csv_path: str | Path | None = None) -> None:
        self.data: np.ndarray | None = None
        if csv_path is not None:
            self.data = np.loadtxt(csv_path, delimiter=",", dtype=np.float64, ndmin=2)
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float64)
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        assert self.data is not None, "CsvEnv has no data: load a csv first"
        self.t = 0
        return self.data[0].copy(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        assert self.data is not None
        self.t += 1
        row = self.data[self.t]
        terminated = self.t == len(self.data) - 1
        return row.copy(), float(row.sum()) * int(action), terminated, False, {}


class DictObsEnv(gymnasium.Env[dict[str, Any], np.ndarray]):
    """Dict observations (uint8 image + int position) and 2-d float actions; ends after 4 steps."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self) -> None:
        self.observation_space = spaces.Dict(
            {
                "image": spaces.Box(0, 255, shape=(3, 3), dtype=np.uint8),
                "pos": spaces.Discrete(10),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.t = 0

    def _obs(self) -> dict[str, Any]:
        image = self.np_random.integers(0, 256, size=(3, 3), dtype=np.uint8)
        return {"image": image, "pos": np.int64(self.t)}

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[dict[str, Any], float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self._obs(), float(np.sum(action)), False, self.t >= 4, {}


class ShiftyEnv(gymnasium.Env[np.ndarray, np.int64]):
    """Observations ``[t, noise]``; float32, but float64 on step 2 when the seed is divisible
    by 3. Ends by time limit (4 steps, via the registered ``max_episode_steps``)."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self) -> None:
        self.observation_space = spaces.Box(-100.0, 100.0, shape=(2,), dtype=np.float32)
        self.action_space = spaces.Discrete(2)
        self.t = 0
        self.shift = False

    def _obs(self) -> np.ndarray:
        dtype = np.float64 if self.shift and self.t == 2 else np.float32
        return np.array([self.t, self.np_random.uniform()], dtype=dtype)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        self.t = 0
        self.shift = seed is not None and seed % 3 == 0
        return self._obs(), {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        self.t += 1
        return self._obs(), float(action), False, False, {}


class SparseInfoEnv(CounterEnv):
    """``CounterEnv`` with an empty ``info`` except on every third step."""

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = super().step(action)
        return obs, reward, terminated, truncated, info if self.steps % 3 == 0 else {}


if SHIFTY_ID not in gymnasium.registry:
    gymnasium.register(SHIFTY_ID, entry_point=f"{__name__}:ShiftyEnv", max_episode_steps=4)
if SPARSE_INFO_ID not in gymnasium.registry:
    gymnasium.register(SPARSE_INFO_ID, entry_point=f"{__name__}:SparseInfoEnv", max_episode_steps=8)
if COUNTER_ID not in gymnasium.registry:
    # A string entry point: a class object in the spec would be a `py/type` that the allow-list
    # loader refuses to resolve.
    gymnasium.register(COUNTER_ID, entry_point=f"{__name__}:CounterEnv", max_episode_steps=6)
