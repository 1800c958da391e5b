"""Every script in examples/ runs at a small size, as a user runs it (a subprocess).

After each run the store the example wrote is opened here and checked against what the example
printed: the episode and transition counts, the dataset's row count, and ``verify()``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jumanji
import numpy as np
import pytest

from tupli_jax import FileStorage, FilterEQ
from tupli_jax.dataset import TupliDataset

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

# Small-size arguments of every example (``--store`` is added by the test).
SMALL_ARGS: dict[str, list[str]] = {
    "record_jumanji.py": ["--env", "Game2048-v1", "--num-envs", "8", "--steps", "300"],
    "gymnasium_pytupli_dropin.py": ["--episodes", "5", "--num-envs", "2"],
}


def _run(script: str, args: list[str]) -> str:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr[-4000:]}"
    return done.stdout


def test_every_example_has_a_small_run() -> None:
    scripts = {p.name for p in EXAMPLES.glob("*.py")}
    assert scripts == set(SMALL_ARGS), "add the new example's small-size arguments to SMALL_ARGS"


@pytest.mark.parametrize(
    "env_id",
    [
        "Game2048-v1",
        "Snake-v1",
    ],
)
def test_record_jumanji(tmp_path: Path, env_id: str) -> None:
    store_dir = tmp_path / "store"
    args = ["--env", env_id, "--num-envs", "8", "--steps", "300", "--capacity", "64"]
    out = _run("record_jumanji.py", [*args, "--store", str(store_dir)])

    printed = re.search(r"recorded (\d+) episodes \((\d+) transitions.*benchmark (\w+)", out)
    assert printed is not None, out
    episodes, transitions, bench_id = int(printed[1]), int(printed[2]), printed[3]
    rows = re.search(r"to_numpy: (\d+) rows from (\d+) episodes", out)
    assert rows is not None, out

    store = FileStorage(store_dir)
    assert store.verify() == []
    headers = store.list_episodes(FilterEQ(key="benchmark_id", value=bench_id))
    assert episodes >= 1
    assert len(headers) == episodes == int(rows[2])
    assert sum(h.n_tuples for h in headers) == transitions == int(rows[1])
    # At most 8 envs x 300 steps were taken; every stored transition is one of them.
    assert transitions <= 8 * 300

    data = TupliDataset(store).to_numpy()
    assert data["rewards"].shape == (transitions,)
    assert int(np.count_nonzero(data["terminals"] | data["timeouts"])) == episodes
    assert len(set(data["episode_ids"].tolist())) == episodes
    # Observations keep the env's pytree, leaf shapes and dtypes (from its spec, not the store).
    spec = jumanji.make(env_id).observation_spec.generate_value()
    for obs in (data["observations"], data["next_observations"]):
        assert str(jax.tree.structure(obs)) == str(jax.tree.structure(spec))
        for leaf, want in zip(jax.tree.leaves(obs), jax.tree.leaves(spec), strict=True):
            assert leaf.shape == (transitions, *np.shape(want))
            assert leaf.dtype == np.asarray(want).dtype
    # Within an episode, row t's next observation is row t + 1's observation.
    same = data["episode_ids"][1:] == data["episode_ids"][:-1]
    assert same.sum() == transitions - episodes
    for now, nxt in zip(
        jax.tree.leaves(data["observations"]),
        jax.tree.leaves(data["next_observations"]),
        strict=True,
    ):
        np.testing.assert_array_equal(nxt[:-1][same], now[1:][same])


def test_gymnasium_pytupli_dropin(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    out = _run(
        "gymnasium_pytupli_dropin.py",
        [*SMALL_ARGS["gymnasium_pytupli_dropin.py"], "--store", str(store_dir)],
    )
    total = re.search(r"after vector recording: (\d+) episodes", out)
    assert total is not None, out
    store = FileStorage(store_dir)
    assert store.verify() == []
    # 5 single-env episodes, then 2 CartPole sub-envs x 100 steps finish at least one more.
    assert int(total[1]) == len(store.list_episodes()) > 5
