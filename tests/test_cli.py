"""The tupli-jax command line, through typer's runner and through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tupli_jax.cli import app, parse_filter
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery, FilterGEQ, matches
from tupli_jax.storage.file_storage import FileStorage

runner = CliRunner()


def _episode(length: int, seed: int, terminated: bool, benchmark_id: str) -> EpisodeData:
    rng = np.random.default_rng(seed)
    return EpisodeData(
        observations={
            "pos": rng.normal(size=(length + 1, 3)).astype(np.float32),
            "count": np.arange(length + 1, dtype=np.int32),
        },
        actions=rng.integers(0, 4, size=length).astype(np.int32),
        rewards=rng.normal(size=length).astype(np.float32),
        discounts=np.r_[np.ones(length - 1), [0.0 if terminated else 1.0]].astype(np.float32),
        terminated=terminated,
        truncated=not terminated,
        metadata={"seed": seed, "tag": "even" if seed % 2 == 0 else "odd"},
        benchmark_id=benchmark_id,
    )


@pytest.fixture
def filled(tmp_path: Path) -> tuple[Path, str, list[EpisodeData]]:
    root = tmp_path / "store"
    store = FileStorage(root)
    header = store.store_benchmark(
        BenchmarkQuery(hash="h" * 64, serialized="{}", metadata=BenchmarkMetadata(name="bench"))
    )
    episodes = [_episode(3 + i, i, i % 3 != 0, header.id) for i in range(6)]
    store.record_episodes(episodes)
    store.close()
    return root, header.id, episodes


def _invoke(*args: str) -> object:
    return runner.invoke(app, list(args))


def test_parse_filter_operators_and_values():
    f = parse_filter(["metadata.seed>=3", "metadata.tag=odd", "n_tuples in [4, 5]"])
    assert f is not None and [g.type.value for g in f.filters or []] == ["GEQ", "EQ", "IN"]
    assert [g.value for g in f.filters or []] == [3, "odd", [4, 5]]
    assert parse_filter(['metadata.tag=="3"']).value == "3"  # JSON string stays a string
    assert parse_filter([]) is None


def test_list_episodes_json_with_filter_matches_reference(filled):
    root, bench_id, episodes = filled
    result = _invoke(
        "list", "episodes", "--filter", "metadata.seed>=2", "--json", "--store", str(root)
    )
    assert result.exit_code == 0, result.output
    listed = [json.loads(line) for line in result.output.splitlines()]
    expected = [
        e
        for e in episodes
        if matches(FilterGEQ(key="metadata.seed", value=2), {"metadata": e.metadata})
    ]
    assert sorted(d["metadata"]["seed"] for d in listed) == sorted(
        e.metadata["seed"] for e in expected
    )
    assert all(d["benchmark_id"] == bench_id for d in listed)


def test_list_benchmarks_table_shows_name(filled):
    root, bench_id, _ = filled
    result = _invoke("list", "benchmarks", "--store", str(root))
    assert result.exit_code == 0
    assert "bench" in result.output and bench_id[:8] in result.output


@pytest.mark.parametrize("width", [80, 120])
def test_list_episodes_table_fits_the_terminal_with_every_value(filled, width):
    root, bench_id, _ = filled
    listed = _invoke("list", "episodes", "--json", "--store", str(root)).output.splitlines()
    result = runner.invoke(
        app, ["list", "episodes", "--store", str(root)], env={"COLUMNS": str(width)}
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= width
    for doc in map(json.loads, listed):
        (line,) = [line for line in lines if doc["id"] in line]  # the id whole, once
        end = "terminated" if doc["terminated"] else "truncated"
        assert line.split()[2:] == [str(doc["n_tuples"]), f"{doc['episode_return']:.3g}", end]
        assert bench_id[:8] in line  # cut with an ellipsis where the terminal is narrow
    assert (bench_id in result.output) == (width >= 120)


def test_show_episode_prints_header_and_shapes(filled):
    root = filled[0]
    first = json.loads(
        _invoke("list", "episodes", "--json", "--store", str(root)).output.splitlines()[0]
    )
    result = _invoke("show", first["id"], "--store", str(root))
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["kind"] == "episode" and shown["id"] == first["id"]
    n = shown["n_tuples"]
    assert shown["arrays"]["observations.pos"] == f"float32[{n + 1}, 3]"
    assert shown["arrays"]["actions"] == f"int32[{n}]"


def test_verify_and_delete(filled):
    root, bench_id, episodes = filled
    assert _invoke("verify", "--store", str(root)).exit_code == 0
    first = json.loads(
        _invoke("list", "episodes", "--json", "--store", str(root)).output.splitlines()[0]
    )
    assert _invoke("delete", first["id"], "--store", str(root)).exit_code == 0
    remaining = _invoke("list", "episodes", "--json", "--store", str(root)).output.splitlines()
    assert len(remaining) == len(episodes) - 1
    assert _invoke("delete", bench_id, "--store", str(root)).exit_code == 0
    assert _invoke("list", "episodes", "--json", "--store", str(root)).output.strip() == ""
    assert _invoke("list", "benchmarks", "--json", "--store", str(root)).output.strip() == ""


def test_verify_reports_damage_and_exits_nonzero(filled):
    root = filled[0]
    shard = next((root / "shards").glob("*.arrow"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = _invoke("verify", "--store", str(root))
    assert result.exit_code == 1
    assert shard.name in result.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["list", "episodes", "--filter", "metadata.seed"], "expected KEY OP VALUE"),
        (["show", "ffffffffffffffffffffffffffffffff"], "no benchmark, episode or artifact"),
        (["show", "../etc/passwd"], "error:"),
        (["export", "ffffffffffffffffffffffffffffffff", "--format", "npz"], "error:"),
    ],
)
def test_errors_are_one_line_without_traceback(filled, args, needle):
    root, _, _ = filled
    result = _invoke(*args, "--store", str(root))
    assert result.exit_code == 1
    assert needle in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_store_is_an_error(tmp_path: Path):
    result = _invoke("list", "benchmarks", "--store", str(tmp_path / "nowhere"))
    assert result.exit_code == 1 and "no store" in result.output
    assert not (tmp_path / "nowhere").exists()


def test_export_npz_d4rl_layout(filled, tmp_path: Path):
    root, bench_id, episodes = filled
    out = tmp_path / "d.npz"
    result = _invoke("export", bench_id, "--format", "npz", "--out", str(out), "--store", str(root))
    assert result.exit_code == 0, result.output
    data = np.load(out)
    total = sum(e.length for e in episodes)
    assert data["rewards"].shape == (total,)
    assert data["terminals"].sum() == sum(e.terminated for e in episodes)
    assert data["timeouts"].sum() == sum(e.truncated for e in episodes)
    by_id: dict[str, list[int]] = {}
    for row, episode_id in enumerate(data["episode_ids"]):
        by_id.setdefault(str(episode_id), []).append(row)
    store = FileStorage(root)
    for episode_id, rows in by_id.items():
        stored = store.load_episode(episode_id)
        np.testing.assert_array_equal(
            data["observations.pos"][rows], stored.observations["pos"][:-1]
        )
        np.testing.assert_array_equal(
            data["next_observations.pos"][rows], stored.observations["pos"][1:]
        )
        np.testing.assert_array_equal(data["actions"][rows], stored.actions)
        assert data["terminals"][rows[-1]] == stored.terminated
        assert data["timeouts"][rows[-1]] == stored.truncated
        assert not data["terminals"][rows[:-1]].any() and not data["timeouts"][rows[:-1]].any()


def test_export_parquet_readable_by_pyarrow(filled, tmp_path: Path):
    root, bench_id, episodes = filled
    out = tmp_path / "d.parquet"
    result = _invoke(
        "export", bench_id, "--format", "parquet", "--out", str(out), "--store", str(root)
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.num_rows == sum(e.length for e in episodes)
    pos = np.asarray(table.column("observations.pos").combine_chunks().flatten()).reshape(-1, 3)
    rewards = table.column("rewards").to_numpy()
    ids = table.column("episode_ids").to_pylist()
    store = FileStorage(root)
    first_rows = [i for i, e in enumerate(ids) if e == ids[0]]
    stored = store.load_episode(ids[0])
    np.testing.assert_array_equal(pos[first_rows], stored.observations["pos"][:-1])
    np.testing.assert_array_equal(rewards[first_rows], stored.rewards)


def test_export_minari_loads_with_minari(filled, tmp_path: Path, monkeypatch):
    minari = pytest.importorskip("minari")
    root, bench_id, episodes = filled
    out = tmp_path / "minari"
    result = _invoke(
        "export", bench_id, "--format", "minari", "--out", str(out), "--store", str(root)
    )
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("tupli/export-v0")
    assert dataset.total_episodes == len(episodes)
    assert dataset.total_steps == sum(e.length for e in episodes)
    loaded = list(dataset.iterate_episodes())
    lengths = sorted(len(ep.rewards) for ep in loaded)
    assert lengths == sorted(e.length for e in episodes)
    for ep in loaded:
        assert ep.observations["pos"].shape[0] == len(ep.rewards) + 1
        assert bool(ep.terminations[-1]) != bool(ep.truncations[-1])


def test_real_subprocess_lists_json(filled):
    root, bench_id, _ = filled
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tupli_jax.cli",
            "list",
            "benchmarks",
            "--json",
            "--store",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["id"] == bench_id
    bad = subprocess.run(
        [sys.executable, "-m", "tupli_jax.cli", "show", "nope", "--store", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1


def test_record_then_list_through_the_console_entry_point(tmp_path: Path):
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "tupli_jax.cli"]
    proc = subprocess.run(
        [
            *cmd,
            "record",
            "Game2048-v1",
            "--num-envs",
            "2",
            "--steps",
            "40",
            "--capacity",
            "20",
            "--store",
            str(store),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "recorded" in proc.stdout
    listed = subprocess.run(
        [*cmd, "list", "benchmarks", "--json", "--store", str(store)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    (bench,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert bench["metadata"]["name"] == "Game2048-v1"
    reopened = FileStorage(store)
    episodes = reopened.list_episodes()
    assert all(h.benchmark_id == bench["id"] for h in episodes)
    assert sum(h.n_tuples for h in episodes) <= 2 * 40
    assert reopened.verify() == []


def test_record_unknown_env_is_one_line(tmp_path: Path):
    result = _invoke("record", "NoSuchEnv-v9", "--store", str(tmp_path / "s"), "--no-progress")
    assert result.exit_code == 1
    assert "unknown env id 'NoSuchEnv-v9'" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_reader_that_leaves_early_ends_the_listing_quietly(tmp_path: Path):
    """``tupli-jax list episodes --json | head -1``: no traceback, no error line."""
    root = tmp_path / "store"
    store = FileStorage(root)
    bench = store.store_benchmark(
        BenchmarkQuery(hash="p" * 64, serialized="{}", metadata=BenchmarkMetadata(name="pipe"))
    ).id
    store.record_episodes([_episode(2, i, True, bench) for i in range(600)])  # ~250 kB of JSON
    store.close()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tupli_jax.cli", "list", "episodes", "--json", "--store", str(root)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert json.loads(first)["benchmark_id"] == bench
    assert err == ""
