"""jsonpickle payload builders and env fixtures shared by the serialization tests."""

from __future__ import annotations

from typing import Any

import gymnasium


def fn(name: str) -> dict[str, Any]:
    return {"py/function": name}


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
