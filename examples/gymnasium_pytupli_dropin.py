"""pytupli code running on tupli_jax: only the import line changes.

Records random CartPole-v1 episodes with pytupli's ``TupliEnvWrapper`` API into the embedded
tupli_jax store, filters them by episode metadata, reloads the benchmark, and records a vector
env into the same store.

Before (pytupli)::

    from pytupli.benchmark import TupliEnvWrapper
    from pytupli.schema import EpisodeMetadataCallback, FilterGEQ
    from pytupli.storage import FileStorage

After (tupli_jax)::

    from tupli_jax.gym import EpisodeMetadataCallback, FileStorage, FilterGEQ, TupliEnvWrapper

Usage:
    python examples/gymnasium_pytupli_dropin.py --store tupli_store --episodes 20
"""

from __future__ import annotations

import argparse
from typing import Any

import gymnasium as gym
import numpy as np

from tupli_jax.gym import (
    EpisodeMetadataCallback,
    FileStorage,
    FilterEQ,
    FilterGEQ,
    RLTuple,
    TupliEnvWrapper,
    TupliVectorEnvWrapper,
)


class ReturnCallback(EpisodeMetadataCallback):
    """Episode metadata computed while recording: the return so far (pytupli's interface)."""

    def __init__(self) -> None:
        self.total = 0.0

    def reset(self) -> None:
        self.total = 0.0

    def __call__(self, tuple: RLTuple) -> dict[str, Any]:
        self.total += float(tuple.reward)
        return {"return": self.total, "policy": "random"}


def main(argv: list[str] | None = None) -> dict[str, int]:
    """Runs the example; returns counts for a quick check."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", default="tupli_store", help="store directory")
    parser.add_argument("--episodes", type=int, default=20, help="episodes to record")
    parser.add_argument("--num-envs", type=int, default=4, help="sub-envs of the vector env")
    args = parser.parse_args(argv)

    storage = FileStorage(args.store)
    env = TupliEnvWrapper(gym.make("CartPole-v1"), storage, metadata_callback=ReturnCallback())
    bench_id = env.store(name="cartpole-random", description="random policy")  # returns the id
    env.action_space.seed(0)
    for episode in range(args.episodes):
        env.reset(seed=episode)
        done = False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            done = terminated or truncated
    env.close()  # writes what is still pending

    mine = FilterEQ(key="benchmark_id", value=bench_id)
    long_ones = storage.list_episodes(mine & FilterGEQ(key="metadata.return", value=20.0))
    print(f"benchmark {bench_id}: {len(env.list_episodes())} episodes, {len(long_ones)} long")
    if long_ones:
        episode = storage.load_episode(long_ones[0].id)  # columnar, reset observation included
        print(f"first long episode: observations {episode.observations.shape}")

    loaded = TupliEnvWrapper.load(storage, bench_id)  # allow-list loader, no trusted=True needed
    print(f"reloaded {loaded.env.spec.id if loaded.env.spec else loaded.env}")

    vec = gym.make_vec("CartPole-v1", num_envs=args.num_envs, vectorization_mode="sync")
    recorder = TupliVectorEnvWrapper(vec, storage, bench_id)  # same benchmark, same store
    recorder.reset(seed=100)
    rng = np.random.default_rng(0)
    for _ in range(100):
        recorder.step(rng.integers(0, 2, size=args.num_envs))
    recorder.close()
    total = len(env.list_episodes())
    print(f"after vector recording: {total} episodes")
    return {"episodes": total, "long": len(long_ones)}


if __name__ == "__main__":
    main()
