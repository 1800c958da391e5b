"""Tests for tupli_jax.storage.shards: Arrow IPC shard files, on real files in tmp_path."""

from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tupli_jax._tree import leaf_names
from tupli_jax.episode import EpisodeData
from tupli_jax.storage import _shard_read, _shard_write, shards
from tupli_jax.storage.base import TupliStorageError
from tupli_jax.storage.shards import (
    Shard,
    file_checksum,
    group_by_structure,
    open_shard,
    verify_shard,
    write_shard,
    write_shard_columns,
    write_shards,
)


class Position(NamedTuple):
    row: Any
    col: Any


class GridObservation(NamedTuple):
    agent: Position
    image: Any
    walls: Any
    step: Any


# -- helpers ---------------------------------------------------------------------------------


def _structure(tree: Any) -> Any:
    """Structure with leaves as (dtype, shape); NamedTuples by name and fields, so that a
    non-importable class and its namedtuple stand-in compare equal."""
    if isinstance(tree, tuple) and hasattr(type(tree), "_fields"):
        return ("namedtuple", type(tree).__name__, tree._fields, [_structure(x) for x in tree])
    if isinstance(tree, dict):
        return ("dict", {k: _structure(v) for k, v in tree.items()})
    if isinstance(tree, list | tuple):
        return (type(tree).__name__, [_structure(x) for x in tree])
    if tree is None:
        return None
    array = np.asarray(tree)
    return ("leaf", array.dtype, array.shape)


def _assert_tree_equal(actual: Any, expected: Any) -> None:
    """Same structure, dtypes, shapes and bytes."""
    assert _structure(actual) == _structure(expected)
    pairs = zip(jax.tree_util.tree_leaves(actual), jax.tree_util.tree_leaves(expected), strict=True)
    for a, e in pairs:
        assert np.asarray(a).tobytes() == np.asarray(e).tobytes()


def _assert_episode_equal(loaded: EpisodeData, original: EpisodeData) -> None:
    _assert_tree_equal(loaded.observations, original.observations)
    _assert_tree_equal(loaded.actions, original.actions)
    _assert_tree_equal(loaded.extras, original.extras)
    _assert_tree_equal(loaded.rewards, original.rewards)
    _assert_tree_equal(loaded.discounts, original.discounts)
    assert loaded.infos == original.infos
    assert loaded.has_reset_observation == original.has_reset_observation


def _load_all(directory: Path, info: shards.ShardInfo, episodes: list[EpisodeData]) -> Shard:
    shard = open_shard(directory / info.name, info.checksum)
    for (start, stop), original in zip(info.ranges, episodes, strict=True):
        loaded = shard.episode(start, stop, original.length)
        _assert_episode_equal(loaded, original)
    return shard


def _cartpole(rng: np.random.Generator, n_steps: int, *, reset: bool = True) -> EpisodeData:
    n_obs = n_steps + 1 if reset else n_steps
    discounts = np.ones(n_steps, np.float32)
    discounts[-1] = 0.0
    return EpisodeData(
        observations=rng.standard_normal((n_obs, 4)).astype(np.float32),
        actions=rng.integers(0, 2, n_steps).astype(np.int64),
        rewards=np.ones(n_steps, np.float32),
        discounts=discounts,
        terminated=True,
        truncated=False,
        has_reset_observation=reset,
    )


def _grid_episode(rng: np.random.Generator, n_steps: int) -> EpisodeData:
    n = n_steps + 1
    obs = GridObservation(
        agent=Position(rng.integers(0, 8, n).astype(np.int32), rng.integers(0, 8, n, np.int32)),
        image=rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8),
        walls=rng.random((n, 8, 8)) < 0.3,
        step=np.arange(n, dtype=np.int64),
    )
    return EpisodeData(
        observations={"grid": obs, "time": rng.random(n), "nothing": None},
        actions={
            "move": rng.integers(0, 4, n_steps).astype(np.int32),
            "force": rng.standard_normal((n_steps, 2)).astype(np.float64),
        },
        rewards=rng.standard_normal(n_steps).astype(np.float32),
        discounts=np.ones(n_steps, np.float32),
        terminated=False,
        truncated=True,
        extras={
            "next_obs": rng.random((n_steps, 3)).astype(np.float32),
            "log": (rng.integers(0, 9, n_steps).astype(np.uint16),),
        },
        infos=[{"t": t, "msg": "ok", "vec": [1.5, 2.5]} for t in range(n_steps)],
    )


def _zoo_episodes(rng: np.random.Generator) -> dict[str, list[EpisodeData]]:
    def local_namedtuple_episodes() -> list[EpisodeData]:
        class Hidden(NamedTuple):  # not importable: loads as an equivalent namedtuple
            speed: Any
            ok: Any

        return [
            EpisodeData(
                Hidden(rng.random(n + 1), np.ones(n + 1, bool)),
                rng.random((n, 3)),
                np.zeros(n, np.float64),
                np.ones(n, np.float64),
                True,
                False,
            )
            for n in (1, 4)
        ]

    scalar_leaves = [
        EpisodeData(
            observations=(
                rng.random(n + 1),
                rng.random(n + 1) < 0.5,
                [rng.integers(-5, 5, n + 1).astype(np.int32)],
            ),
            actions=rng.integers(-3, 3, n).astype(np.int64),
            rewards=rng.random(n),
            discounts=np.ones(n, np.float32),
            terminated=False,
            truncated=False,
        )
        for n in (3, 1, 6)
    ]
    return {
        "cartpole": [_cartpole(rng, n) for n in (5, 1, 17)],
        "grid": [_grid_episode(rng, n) for n in (3, 7)],
        "local_namedtuple": local_namedtuple_episodes(),
        "scalar_leaves": scalar_leaves,
        "no_reset_observation": [_cartpole(rng, n, reset=False) for n in (4, 2)],
        "mixed_reset": [_cartpole(rng, 3), _cartpole(rng, 3, reset=False), _cartpole(rng, 2)],
    }


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["lz4", "zstd", None])
@pytest.mark.parametrize("zoo", sorted(_zoo_episodes(np.random.default_rng(0))))
def test_zoo_round_trip(tmp_path: Path, zoo: str, compression: str | None) -> None:
    episodes = _zoo_episodes(np.random.default_rng(1))[zoo]
    info = write_shard(tmp_path, episodes, compression=compression)
    assert _names(tmp_path) == [info.name]
    assert info.name.endswith(".arrow")
    assert info.size == (tmp_path / info.name).stat().st_size
    rows = [ep.length + int(ep.has_reset_observation) for ep in episodes]
    assert info.n_rows == sum(rows)
    assert info.ranges == [(sum(rows[:i]), sum(rows[: i + 1])) for i in range(len(rows))]
    _load_all(tmp_path, info, episodes)


def test_local_namedtuple_loads_with_same_fields(tmp_path: Path) -> None:
    episodes = _zoo_episodes(np.random.default_rng(2))["local_namedtuple"]
    info = write_shard(tmp_path, episodes)
    loaded = open_shard(tmp_path / info.name, info.checksum).episode(*info.ranges[1], n_tuples=4)
    original = episodes[1].observations
    assert type(loaded.observations) is not type(original)
    assert type(loaded.observations).__name__ == "Hidden"
    assert loaded.observations._fields == ("speed", "ok")
    np.testing.assert_array_equal(loaded.observations.speed, original.speed)
    assert loaded.observations.ok.dtype == np.bool_


def test_importable_namedtuple_keeps_its_class(tmp_path: Path) -> None:
    episode = _grid_episode(np.random.default_rng(3), 2)
    info = write_shard(tmp_path, [episode])
    loaded = open_shard(tmp_path / info.name, info.checksum).episode(0, 3, 2)
    assert type(loaded.observations["grid"]) is GridObservation
    assert type(loaded.observations["grid"].agent) is Position
    assert loaded.observations["nothing"] is None


def test_episode_scalar_fields_keep_defaults(tmp_path: Path) -> None:
    episode = _cartpole(np.random.default_rng(4), 3)
    episode.metadata, episode.id = {"seed": 1}, "abc"
    info = write_shard(tmp_path, [episode])
    loaded = open_shard(tmp_path / info.name, info.checksum).episode(0, 4, 3)
    assert (loaded.terminated, loaded.truncated, loaded.metadata, loaded.id) == (
        False,
        False,
        {},
        None,
    )


def test_loaded_episode_arrays_are_independent_copies(tmp_path: Path) -> None:
    episode = _cartpole(np.random.default_rng(5), 3)
    info = write_shard(tmp_path, [episode])
    shard = open_shard(tmp_path / info.name, info.checksum)
    loaded = shard.episode(0, 4, 3)
    loaded.observations[:] = 99.0
    np.testing.assert_array_equal(shard.episode(0, 4, 3).observations, episode.observations)
    with pytest.raises(ValueError, match="read-only"):
        shard.columns("obs")[0][0, 0] = 1.0


@pytest.mark.parametrize("foreign_first", [True, False])
def test_jax_and_big_endian_inputs(tmp_path: Path, foreign_first: bool) -> None:
    """Byte-swapped and jax leaves, in the first episode (layout) or a later one (fast path)."""
    obs = np.arange(12, dtype=">f4").reshape(4, 3)
    foreign = EpisodeData(
        observations={"x": obs, "j": jnp.arange(4, dtype=jnp.int32)},
        actions=jnp.zeros(3, jnp.int32),
        rewards=np.ones(3, np.float32),
        discounts=np.ones(3, np.float32),
        terminated=False,
        truncated=False,
    )
    native = EpisodeData(
        observations={"x": np.ones((3, 3), np.float32), "j": np.arange(3, dtype=np.int32)},
        actions=np.ones(2, np.int32),
        rewards=np.ones(2, np.float32),
        discounts=np.ones(2, np.float32),
        terminated=False,
        truncated=False,
    )
    episodes = [foreign, native] if foreign_first else [native, foreign]
    assert group_by_structure(episodes) == [[0, 1]]
    info = write_shard(tmp_path, episodes)
    start, stop = info.ranges[0 if foreign_first else 1]
    loaded = open_shard(tmp_path / info.name, info.checksum).episode(start, stop, 3)
    assert loaded.observations["x"].dtype == np.float32
    np.testing.assert_array_equal(loaded.observations["x"], obs)
    assert loaded.observations["j"].tolist() == [0, 1, 2, 3]
    assert type(loaded.actions) is np.ndarray and loaded.actions.dtype == np.int32


def test_zero_element_leaf(tmp_path: Path) -> None:
    episode = EpisodeData(
        {"empty": np.zeros((3, 0, 2), np.float32), "v": np.arange(3)},
        np.zeros(2, np.int8),
        np.ones(2, np.float32),
        np.ones(2, np.float32),
        False,
        True,
    )
    info = write_shard(tmp_path, [episode])
    loaded = open_shard(tmp_path / info.name, info.checksum).episode(0, 3, 2)
    _assert_episode_equal(loaded, episode)


def test_infos_round_trip_and_null_for_episodes_without(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    with_infos = _cartpole(rng, 3)
    with_infos.infos = [{"a": np.float32(0.5)}, {}, {"nested": {"k": [1, 2]}}]
    without = _cartpole(rng, 2)
    info = write_shard(tmp_path, [with_infos, without])
    shard = open_shard(tmp_path / info.name, info.checksum)
    assert shard.episode(0, 4, 3).infos == [{"a": 0.5}, {}, {"nested": {"k": [1, 2]}}]
    assert shard.episode(4, 7, 2).infos is None
    table = pa.ipc.open_file(tmp_path / info.name).read_all()
    assert table.column("info").to_pylist() == [
        '{"a": 0.5}',
        "{}",
        '{"nested": {"k": [1, 2]}}',
        None,
        None,
        None,
        None,
    ]


def test_no_info_column_without_infos(tmp_path: Path) -> None:
    info = write_shard(tmp_path, [_cartpole(np.random.default_rng(7), 3)])
    names = pa.ipc.open_file(tmp_path / info.name).schema.names
    assert names == ["obs", "act", "reward", "discount"]


# -- columns, gather, layout -------------------------------------------------------------------


def test_columns_and_gather_follow_row_layout(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    episodes = [_grid_episode(rng, 2), _grid_episode(rng, 3)]
    info = write_shard(tmp_path, episodes)
    shard = open_shard(tmp_path / info.name, info.checksum)
    assert shard.n_rows == 3 + 4
    names = leaf_names(shard.obs_spec, "obs")
    image = shard.columns("obs")[names.index("obs.grid.image")]
    expected = np.concatenate([ep.observations["grid"].image for ep in episodes])
    assert image.shape == (7, 8, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, expected)
    # An action column has zeros on the row after each episode's last step.
    act_names = leaf_names(shard.action_spec, "act")
    move = shard.columns("act")[act_names.index("act.move")]
    zero = np.zeros(1, np.int32)
    np.testing.assert_array_equal(
        move, np.concatenate([episodes[0].actions["move"], zero, episodes[1].actions["move"], zero])
    )
    reward = shard.columns("reward")[0]
    np.testing.assert_array_equal(reward[[2, 6]], [0.0, 0.0])
    gathered = shard.gather("obs", np.array([6, 0]))
    assert type(gathered["grid"]) is GridObservation
    np.testing.assert_array_equal(
        gathered["grid"].walls,
        np.stack(
            [episodes[1].observations["grid"].walls[3], episodes[0].observations["grid"].walls[0]]
        ),
    )
    np.testing.assert_array_equal(shard.gather("reward", np.array([4])), episodes[1].rewards[1:2])
    extras = shard.gather("ext", np.array([1]))
    np.testing.assert_array_equal(extras["log"][0], episodes[0].extras["log"][0][1:2])
    with pytest.raises(TupliStorageError, match="out of range"):
        shard.gather("obs", np.array([7]))
    with pytest.raises(TupliStorageError, match="unknown column group"):
        shard.columns("observations")


def test_group_by_structure(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    a1, a2 = _cartpole(rng, 3), _cartpole(rng, 5, reset=False)
    b = _grid_episode(rng, 2)
    c = _cartpole(rng, 3)
    c.observations = c.observations.astype(np.float64)
    d = _cartpole(rng, 4)
    d.observations = {"x": d.observations}
    groups = group_by_structure([a1, b, c, a2, d, b])
    assert groups == [[0, 3], [1, 5], [2], [4]]
    for group in groups:
        write_shard(tmp_path, [[a1, b, c, a2, d, b][i] for i in group])
    assert len(_names(tmp_path)) == 4


def test_many_record_batches_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_shard_write, "_MAX_BATCH_BYTES", 2000)  # forces several IPC record batches
    rng = np.random.default_rng(16)
    episodes = [_grid_episode(rng, n) for n in (5, 9, 3)]
    info = write_shard(tmp_path, episodes)
    with pa.ipc.open_file(tmp_path / info.name) as reader:
        assert reader.num_record_batches > 2
    shard = _load_all(tmp_path, info, episodes)
    walls = shard.columns("obs")[leaf_names(shard.obs_spec, "obs").index("obs.grid.walls")]
    expected = np.concatenate([ep.observations["grid"].walls for ep in episodes])
    np.testing.assert_array_equal(walls, expected)


def test_pyarrow_alone_reads_the_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(10)
    episodes = [_grid_episode(rng, 2), _grid_episode(rng, 1)]
    info = write_shard(tmp_path, episodes)
    with pa.ipc.open_file(tmp_path / info.name) as reader:
        table = reader.read_all()
        schema = reader.schema
    assert table.num_rows == 5
    meta = json.loads(schema.metadata[b"tupli_jax"])
    assert meta["format"] == "tupli_jax.shard" and meta["version"] == shards.FORMAT_VERSION
    field = schema.field("obs.grid.image")
    assert field.type == pa.list_(pa.uint8(), 192)
    assert json.loads(field.metadata[b"tupli_jax.shape"]) == [8, 8, 3]
    image = np.array(table.column("obs.grid.image").to_pylist(), np.uint8).reshape(5, 8, 8, 3)
    np.testing.assert_array_equal(image[3:], episodes[1].observations["grid"].image)
    assert table.column("reward").to_pylist()[:2] == episodes[0].rewards.tolist()
    assert schema.field("obs.grid.walls").type == pa.list_(pa.bool_(), 64)


# -- validation ------------------------------------------------------------------------------


def _bad_batches() -> dict[str, tuple[list[EpisodeData], str]]:
    rng = np.random.default_rng(11)

    def ep(**changes: Any) -> EpisodeData:
        episode = _cartpole(rng, 3)
        for key, value in changes.items():
            setattr(episode, key, value)
        return episode

    empty = EpisodeData(
        np.zeros((1, 4), np.float32),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
        True,
        False,
    )
    other = ep(observations=rng.standard_normal((4, 5)).astype(np.float32))
    return {
        "empty": ([ep(), empty], r"episode 1 is empty"),
        "obs_length": (
            [ep(observations=np.zeros((3, 4), np.float32))],
            r"episode 0: observations has leading length 3; expected 4",
        ),
        "action_length": (
            [ep(), ep(actions=np.zeros(4, np.int64))],
            r"episode 1: actions has leading length 4; expected 3",
        ),
        "discount_length": ([ep(discounts=np.ones(2, np.float32))], r"discounts.*expected 3"),
        "extras_length": ([ep(extras={"k": np.zeros(2)})], r"episode 0: extras\.k .*expected 3"),
        "infos_length": ([ep(infos=[{}])], r"episode 0: infos has 1 entries; expected"),
        "infos_json": ([ep(infos=[{}, {"f": object()}, {}])], r"episode 0: infos\[1\]"),
        "structure": ([ep(), ep(), other], r"episode 2 has a different structure.*obs:float32\["),
        "dtype": (
            [ep(observations=np.zeros((4, 2), np.complex64))],
            r"episode 0: observations has dtype complex64",
        ),
        "string_leaf": (
            [ep(actions=np.array(["a", "b", "c"]))],
            r"episode 0: actions has dtype str",
        ),
        "scalar_reward": ([ep(rewards=np.float32(1.0))], r"episode 0: rewards: .*scalar"),
        "tree_reward": ([ep(rewards={"r": np.ones(3)})], r"rewards is a dict; expected one array"),
        "unknown_node": ([ep(observations={"x": {1, 2}})], r"episode 0: observations: .*set"),
        "not_episode": ([ep(), {"observations": []}], r"episode 1 is a dict; expected"),
        "extras_not_dict": ([ep(extras=[np.zeros(3)])], r"extras is a list; expected a dict"),
        "no_episodes": ([], r"no episodes"),
    }


@pytest.mark.parametrize("case", sorted(_bad_batches()))
def test_invalid_batches_raise_and_write_nothing(tmp_path: Path, case: str) -> None:
    episodes, message = _bad_batches()[case]
    with pytest.raises(TupliStorageError, match=message):
        write_shard(tmp_path, episodes)
    assert _names(tmp_path) == []


def test_unknown_compression_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TupliStorageError, match="compression 'gzip'"):
        write_shard(tmp_path, [_cartpole(np.random.default_rng(12), 2)], compression="gzip")
    assert _names(tmp_path) == []


def test_io_failure_removes_temporary_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(TupliStorageError, match="No space left"):
        write_shard(tmp_path, [_cartpole(np.random.default_rng(13), 2)])
    assert _names(tmp_path) == []


# -- damage and the cache --------------------------------------------------------------------


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, shards.ShardInfo, list[EpisodeData]]:
    rng = np.random.default_rng(14)
    episodes = [_cartpole(rng, n) for n in (30, 40, 50)]
    info = write_shard(tmp_path, episodes)
    return tmp_path / info.name, info, episodes


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksum_is_crc32_of_the_file(written: Any) -> None:
    path, info, _ = written
    assert info.checksum == f"{zlib.crc32(path.read_bytes()):08x}" == file_checksum(path)
    assert verify_shard(path, info.checksum, expected_rows=info.n_rows) == []


def test_byte_flip_is_detected(written: Any) -> None:
    path, info, _ = written
    _flip_middle_byte(path)
    with pytest.raises(TupliStorageError, match=rf"shard '.*{info.name}' is damaged"):
        open_shard(path, info.checksum)
    problems = verify_shard(path, info.checksum)
    assert len(problems) == 1 and "damaged" in problems[0]


def test_truncation_is_detected(written: Any) -> None:
    path, info, _ = written
    with open(path, "r+b") as file:
        file.truncate(info.size // 2)
    with pytest.raises(TupliStorageError, match="damaged"):
        open_shard(path, info.checksum)
    assert verify_shard(path, info.checksum) != []


def test_missing_file_is_detected(written: Any) -> None:
    path, info, _ = written
    path.unlink()
    with pytest.raises(TupliStorageError, match="missing"):
        open_shard(path, info.checksum)
    assert "missing" in verify_shard(path, info.checksum)[0]
    with pytest.raises(TupliStorageError, match="cannot read"):
        file_checksum(path)


def test_damage_after_a_successful_open_is_not_hidden_by_the_cache(written: Any) -> None:
    path, info, _ = written
    first = open_shard(path, info.checksum)
    assert open_shard(path, info.checksum) is first  # cached while the file is unchanged
    # File timestamps are coarse (a clock tick of a few ms): wait so the write below gets a
    # new mtime, as any later damage would.
    time.sleep(0.05)
    _flip_middle_byte(path)
    with pytest.raises(TupliStorageError, match="damaged"):
        open_shard(path, info.checksum)
    path.write_bytes(path.read_bytes())  # still damaged after another rewrite
    with pytest.raises(TupliStorageError, match="damaged"):
        open_shard(path, info.checksum)


def test_wrong_checksum_is_refused_even_when_cached(written: Any) -> None:
    path, info, _ = written
    open_shard(path, info.checksum)
    with pytest.raises(TupliStorageError, match="checksum"):
        open_shard(path, "00000000" if info.checksum != "00000000" else "11111111")


def test_file_with_matching_checksum_but_not_a_shard(tmp_path: Path) -> None:
    path = tmp_path / "junk.arrow"
    path.write_bytes(b"not an arrow file at all")
    with pytest.raises(TupliStorageError, match="not a readable tupli_jax shard"):
        open_shard(path, file_checksum(path))
    plain = tmp_path / "plain.arrow"
    with pa.ipc.new_file(plain, pa.schema([("x", pa.int64())])) as writer:
        writer.write_table(pa.table({"x": [1, 2]}))
    problems = verify_shard(plain, file_checksum(plain))
    assert len(problems) == 1 and "no tupli_jax metadata" in problems[0]


def test_verify_reports_row_count_mismatch(written: Any) -> None:
    path, info, _ = written
    problems = verify_shard(path, info.checksum, expected_rows=info.n_rows + 1)
    assert len(problems) == 1 and f"expects {info.n_rows + 1}" in problems[0]


def test_bad_row_ranges_are_refused(written: Any) -> None:
    path, info, _ = written
    shard = open_shard(path, info.checksum)
    for start, stop, n in [
        (0, 31, 29),
        (0, 31, 32),
        (0, 1, 0),
        (-1, 30, 30),
        (150, 200, 49),
        (5, 5, 0),
    ]:
        with pytest.raises(TupliStorageError, match="is not an episode"):
            shard.episode(start, stop, n)


def test_cache_stays_bounded(tmp_path: Path) -> None:
    shards.clear_shard_cache()
    rng = np.random.default_rng(15)
    infos = [
        write_shard(tmp_path, [_cartpole(rng, 2)])
        for _ in range(_shard_read._CACHE_MAX_ENTRIES + 3)
    ]
    opened = [open_shard(tmp_path / i.name, i.checksum) for i in infos]
    assert len(_shard_read._cache) == _shard_read._CACHE_MAX_ENTRIES
    assert open_shard(tmp_path / infos[-1].name, infos[-1].checksum) is opened[-1]
    assert open_shard(tmp_path / infos[0].name, infos[0].checksum) is not opened[0]


# -- property test ---------------------------------------------------------------------------

_DTYPES = [
    "bool",
    "uint8",
    "int8",
    "int16",
    "uint32",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
]
_row_shapes = st.lists(st.integers(1, 3), max_size=2).map(tuple)
_leaf_templates = st.tuples(st.just("leaf"), st.sampled_from(_DTYPES), _row_shapes)
_templates = st.recursive(
    _leaf_templates | st.just(("none",)),
    lambda children: (
        st.dictionaries(
            st.text("ab_.", min_size=1, max_size=2), children, min_size=1, max_size=3
        ).map(lambda d: ("dict", d))
        | st.lists(children, min_size=1, max_size=3).map(lambda xs: ("tuple", xs))
        | st.lists(children, min_size=1, max_size=2).map(lambda xs: ("list", xs))
        | st.tuples(children, children).map(lambda xs: ("pos", list(xs)))
    ),
    max_leaves=6,
)


def _random_leaf(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    kind = np.dtype(dtype).kind
    if kind == "b":
        return rng.random(shape) < 0.5
    if kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    values = rng.standard_normal(shape) * 1e3
    special = [np.nan, -0.0, np.inf][: values.size]
    values.flat[: len(special)] = special  # must survive bit for bit
    return values.astype(dtype)


def _instantiate(template: Any, rng: np.random.Generator, n: int) -> Any:
    kind = template[0]
    if kind == "leaf":
        return _random_leaf(rng, template[1], (n, *template[2]))
    if kind == "none":
        return None
    if kind == "dict":
        return {k: _instantiate(v, rng, n) for k, v in template[1].items()}
    children = [_instantiate(v, rng, n) for v in template[1]]
    if kind == "pos":
        return Position(*children)
    return tuple(children) if kind == "tuple" else children


@settings(max_examples=40, deadline=None)
@given(
    obs=_templates,
    act=_templates,
    ext=st.dictionaries(st.sampled_from(["next_obs", "mask"]), _templates, max_size=2),
    reward=_leaf_templates,
    lengths=st.lists(
        st.tuples(st.integers(1, 6), st.booleans(), st.booleans()), min_size=1, max_size=4
    ),
    compression=st.sampled_from(["lz4", "zstd", None]),
    seed=st.integers(0, 2**16),
)
def test_property_random_batches_round_trip(
    tmp_path_factory: pytest.TempPathFactory,
    obs: Any,
    act: Any,
    ext: dict[str, Any],
    reward: Any,
    lengths: list[tuple[int, bool, bool]],
    compression: str | None,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    directory = tmp_path_factory.mktemp("prop")
    episodes = []
    for n, reset, with_infos in lengths:
        episodes.append(
            EpisodeData(
                observations=_instantiate(obs, rng, n + 1 if reset else n),
                actions=_instantiate(act, rng, n),
                rewards=_random_leaf(rng, reward[1], (n, *reward[2])),
                discounts=rng.random(n).astype(np.float32),
                terminated=False,
                truncated=False,
                extras={k: _instantiate(v, rng, n) for k, v in ext.items()},
                infos=[{"t": t} for t in range(n)] if with_infos else None,
                has_reset_observation=reset,
            )
        )
    info = write_shard(directory, episodes, compression=compression)
    shards.clear_shard_cache()
    shard = _load_all(directory, info, episodes)
    assert verify_shard(directory / info.name, info.checksum, info.n_rows) == []
    # Every observation column is the plain concatenation of the episodes' leaves.
    for i, column in enumerate(shard.columns("obs")):
        expected = np.concatenate(
            [jax.tree_util.tree_leaves(ep.observations)[i] for ep in episodes]
        )
        assert column.shape == expected.shape and column.tobytes() == expected.tobytes()


# -- fast batch path: first error, write_shards, write_shard_columns --------------------------


def test_batch_error_names_the_first_bad_episode(tmp_path: Path) -> None:
    """The vectorised checks find problems by kind; the message still names the first one."""
    rng = np.random.default_rng(20)
    episodes = [_cartpole(rng, 3) for _ in range(5)]
    episodes[1].infos = [{"bad": object()}, {}, {}]  # found last by the fast path
    episodes[3].actions = np.zeros(7, np.int64)  # a length error, found before infos
    episodes[4].observations = episodes[4].observations.astype(np.float64)  # structure
    with pytest.raises(TupliStorageError, match=r"^episode 1: infos\[0\]"):
        write_shard(tmp_path, episodes)
    episodes[1].infos = None
    with pytest.raises(TupliStorageError, match=r"^episode 3: actions has leading length 7"):
        write_shard(tmp_path, episodes)
    assert _names(tmp_path) == []


def test_group_by_structure_many_interleaved(tmp_path: Path) -> None:
    rng = np.random.default_rng(21)
    kinds = rng.integers(0, 3, 200)
    makers = [
        lambda: _cartpole(rng, int(rng.integers(1, 5))),
        lambda: _grid_episode(rng, int(rng.integers(1, 4))),
        lambda: _cartpole(rng, int(rng.integers(1, 5)), reset=False),  # same layout as kind 0
    ]
    episodes = [makers[k]() for k in kinds]
    expected_cart = [i for i, k in enumerate(kinds) if k != 1]
    expected_grid = [i for i, k in enumerate(kinds) if k == 1]
    first_is_cart = kinds[0] != 1
    expected = [expected_cart, expected_grid] if first_is_cart else [expected_grid, expected_cart]
    assert group_by_structure(episodes) == expected


def test_group_by_structure_dict_key_order_is_one_group() -> None:
    rng = np.random.default_rng(22)
    a, b = _cartpole(rng, 2), _cartpole(rng, 3)
    a.observations = {"x": a.observations, "y": np.arange(3)}
    b.observations = {"y": np.arange(4), "x": b.observations}  # another insertion order
    assert group_by_structure([a, b, a, b]) == [[0, 1, 2, 3]]


def test_write_shards_groups_and_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(23)
    episodes = [
        _cartpole(rng, 3),
        _grid_episode(rng, 2),
        _cartpole(rng, 4, reset=False),
        _grid_episode(rng, 5),
        _cartpole(rng, 1),
    ]
    written = write_shards(tmp_path, episodes, compression="zstd", fsync_directory=False)
    assert [indices for indices, _ in written] == [[0, 2, 4], [1, 3]]
    assert sorted(_names(tmp_path)) == sorted(info.name for _, info in written)
    for indices, info in written:
        _load_all(tmp_path, info, [episodes[i] for i in indices])
    assert write_shards(tmp_path, []) == []


def test_write_shards_validates_every_group_before_writing(tmp_path: Path) -> None:
    rng = np.random.default_rng(24)
    bad = _grid_episode(rng, 3)
    bad.discounts = np.ones(2, np.float32)
    with pytest.raises(TupliStorageError, match=r"^episode 2: discounts has leading length 2"):
        write_shards(tmp_path, [_cartpole(rng, 3), _grid_episode(rng, 2), bad])
    with pytest.raises(TupliStorageError, match=r"^episode 1 is a dict"):
        write_shards(tmp_path, [_cartpole(rng, 3), {"observations": []}])
    complex_obs = _cartpole(rng, 2)
    complex_obs.observations = complex_obs.observations.astype(np.complex64)
    with pytest.raises(TupliStorageError, match=r"^episode 1: observations has dtype complex64"):
        write_shards(tmp_path, [_cartpole(rng, 3), complex_obs])
    assert _names(tmp_path) == []


def _packed(episodes: list[EpisodeData]) -> dict[str, Any]:
    """The columns of ``episodes`` packed back to back, as write_shard_columns takes them."""

    def cat(trees: list[Any]) -> Any:
        return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs), *trees)

    return {
        "observations": cat([e.observations for e in episodes]),
        "actions": cat([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "discounts": np.concatenate([e.discounts for e in episodes]),
        "extras": cat([e.extras for e in episodes]),
        "n_tuples": np.array([e.length for e in episodes]),
        "has_reset_observation": np.array([e.has_reset_observation for e in episodes]),
        "infos": [e.infos for e in episodes],
    }


def test_write_shard_columns_writes_the_same_file_as_write_shard(tmp_path: Path) -> None:
    rng = np.random.default_rng(25)
    episodes = [_grid_episode(rng, n) for n in (3, 1, 6)]
    episodes[1].has_reset_observation = False
    episodes[1].observations = jax.tree_util.tree_map(lambda x: x[1:], episodes[1].observations)
    episodes[2].infos = None
    from_columns = write_shard_columns(tmp_path / "a", **_packed(episodes))
    from_episodes = write_shard(tmp_path / "b", episodes)
    assert from_columns.ranges == from_episodes.ranges == [(0, 4), (4, 5), (5, 12)]
    assert from_columns.starts.tolist() == [0, 4, 5] and from_columns.stops.tolist() == [4, 5, 12]
    assert from_columns != from_episodes  # other file names
    assert from_columns == dataclasses.replace(from_columns, starts=from_columns.starts.copy())
    assert from_columns != dataclasses.replace(from_columns, stops=np.array([4, 5, 11]))
    assert (tmp_path / "a" / from_columns.name).read_bytes() == (
        tmp_path / "b" / from_episodes.name
    ).read_bytes()
    _load_all(tmp_path / "a", from_columns, episodes)


def test_write_shard_columns_scalar_has_reset_and_defaults(tmp_path: Path) -> None:
    info = write_shard_columns(
        tmp_path,
        observations=np.arange(10, dtype=np.float32).reshape(5, 2),
        actions=np.array([1, 0, 1]),
        rewards=np.array([1.0, 2.0, 3.0], np.float32),
        discounts=np.array([1.0, 0.0, 1.0], np.float32),
        n_tuples=[2, 1],
    )
    shard = open_shard(tmp_path / info.name, info.checksum)
    first, second = shard.episode(0, 3, 2), shard.episode(3, 5, 1)
    assert first.observations.tolist() == [[0, 1], [2, 3], [4, 5]]
    assert first.actions.tolist() == [1, 0] and second.actions.tolist() == [1]
    assert second.rewards.tolist() == [3.0] and second.observations.tolist() == [[6, 7], [8, 9]]
    assert shard.columns("act")[0].tolist() == [1, 0, 0, 1, 0]  # a zero on observation-only rows
    assert first.extras == {} and first.infos is None


def _bad_columns() -> dict[str, tuple[dict[str, Any], str]]:
    base: dict[str, Any] = {
        "observations": np.zeros((5, 2), np.float32),
        "actions": np.zeros(3, np.int64),
        "rewards": np.ones(3, np.float32),
        "discounts": np.ones(3, np.float32),
        "n_tuples": np.array([2, 1]),
    }
    return {
        "empty_episode": ({**base, "n_tuples": np.array([3, 0])}, r"episode 1 is empty"),
        "no_episodes": ({**base, "n_tuples": np.array([], np.int64)}, r"non-empty 1-D integer"),
        "float_counts": ({**base, "n_tuples": np.array([2.0, 1.0])}, r"dtype float64"),
        "obs_rows": (
            {**base, "observations": np.zeros((4, 2), np.float32)},
            r"observations has leading length 4; expected 5 = sum\(n_tuples \+ has_reset",
        ),
        "action_rows": (
            {**base, "actions": {"a": np.zeros(4, np.int64)}},
            r"actions\.a has leading length 4; expected 3 = sum\(n_tuples\)",
        ),
        "reset_shape": (
            {**base, "has_reset_observation": np.array([True, False, True])},
            r"has_reset_observation must be a bool or a bool array of shape \(2,\)",
        ),
        "extras_type": ({**base, "extras": [np.zeros(3)]}, r"extras is a list; expected a dict"),
        "infos_count": ({**base, "infos": [None]}, r"infos has 1 entries; expected None or one"),
        "infos_steps": ({**base, "infos": [[{}], None]}, r"episode 0: infos has 1 entries"),
        "dtype": (
            {**base, "rewards": np.ones(3, np.complex64)},
            r"rewards has dtype complex64",
        ),
        "reward_tree": ({**base, "rewards": (np.ones(3),)}, r"rewards is a tuple; expected one"),
    }


@pytest.mark.parametrize("case", sorted(_bad_columns()))
def test_write_shard_columns_refuses_bad_input(tmp_path: Path, case: str) -> None:
    columns, message = _bad_columns()[case]
    with pytest.raises(TupliStorageError, match=message):
        write_shard_columns(tmp_path, **columns)
    assert not tmp_path.exists() or _names(tmp_path) == []


@settings(max_examples=25, deadline=None)
@given(
    obs=_templates,
    act=_templates,
    lengths=st.lists(st.tuples(st.integers(1, 5), st.booleans()), min_size=1, max_size=5),
    seed=st.integers(0, 2**16),
)
def test_property_columns_and_episodes_paths_agree(
    tmp_path_factory: pytest.TempPathFactory,
    obs: Any,
    act: Any,
    lengths: list[tuple[int, bool]],
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    directory = tmp_path_factory.mktemp("columns")
    episodes = [
        EpisodeData(
            observations=_instantiate(obs, rng, n + 1 if reset else n),
            actions=_instantiate(act, rng, n),
            rewards=rng.random(n).astype(np.float32),
            discounts=rng.random(n).astype(np.float32),
            terminated=False,
            truncated=False,
            has_reset_observation=reset,
        )
        for n, reset in lengths
    ]
    a = write_shard_columns(directory / "a", **_packed(episodes))
    b = write_shard(directory / "b", episodes)
    assert a.ranges == b.ranges and a.n_rows == b.n_rows
    assert (directory / "a" / a.name).read_bytes() == (directory / "b" / b.name).read_bytes()
    _load_all(directory / "a", a, episodes)
