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
    elif kill_in == "shard":
        original_write = _episodes.write_shards

        def write_shards(*args: Any, **kwargs: Any) -> Any:
            result = original_write(*args, **kwargs)
            if due():
                _die()
            return result

        _episodes.write_shards = write_shards  # type: ignore[assignment]
    elif kill_in == "commit":
        original_record = FileStorage.record_episodes

        def record_episodes(self: Any, episodes: Any, **kwargs: Any) -> Any:
            headers = original_record(self, episodes, **kwargs)
            if episodes and due():
                _die()
            return headers

        FileStorage.record_episodes = record_episodes  # type: ignore[method-assign]


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
