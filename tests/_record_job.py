"""A checkpointed tj.record job for the kill-and-resume tests (run as a subprocess).

Usage: python _record_job.py STORE CKPT [--kill-in checkpoint|shard|commit --kill-at N]

With ``--kill-in`` the process SIGKILLs itself on the N-th call of the chosen step:
``checkpoint`` halfway through writing a checkpoint's array file (orbax has not finalized it),
``shard`` after a shard file is written but before the catalog transaction, ``commit`` right after
a batch is committed to the catalog but before the next checkpoint records it.
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import tupli_jax as tj
from tupli_jax import checkpoint
from tupli_jax.storage import _episodes
from tupli_jax.storage.file_storage import FileStorage
from tupli_jax.testing import FakeEnv


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(kill_in: str, kill_at: int) -> None:
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == kill_at

    if kill_in == "checkpoint":
        original_save = checkpoint._BlobHandler.save

        def save(self: Any, directory: Any, args: Any) -> None:
            if due():
                with open(os.fspath(directory / checkpoint._BLOB), "wb") as f:
                    f.write(b"\1" * 1000)
                    f.flush()
                    os.fsync(f.fileno())
                _die()
            original_save(self, directory, args)

        checkpoint._BlobHandler.save = save  # type: ignore[method-assign]
    elif kill_in == "shard":  # both shard writers of the episode write path
        for name in ("write_shards", "write_shard_columns"):
            setattr(_episodes, name, _dying_after(getattr(_episodes, name), due))
    elif kill_in == "commit":  # both episode write methods of FileStorage

        def dying(original: Any) -> Any:
            def record(self: Any, episodes: Any, **kwargs: Any) -> Any:
                headers = original(self, episodes, **kwargs)
                if len(episodes) and due():
                    _die()
                return headers

            return record

        FileStorage.record_episodes = dying(FileStorage.record_episodes)  # type: ignore[method-assign]
        FileStorage.record_episode_batch = dying(FileStorage.record_episode_batch)  # type: ignore[method-assign]


def _dying_after(original: Any, due: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if due():
            _die()
        return result

    return call


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("ckpt")
    parser.add_argument("--kill-in", choices=["checkpoint", "shard", "commit"])
    parser.add_argument("--kill-at", type=int, default=1)
    args = parser.parse_args()
    if args.kill_in:
        _arm(args.kill_in, args.kill_at)
    result = tj.record(
        FakeEnv(time_limit=9),
        storage=FileStorage(args.store),
        num_envs=8,
        num_steps=400,
        seed=3,
        capacity=20,
        checkpoint_dir=args.ckpt,
        checkpoint_every=2,
        progress=False,
    )
    print(f"episodes={result.num_episodes} resumed_from_chunk={result.resumed_from_chunk}")


if __name__ == "__main__":
    main()
