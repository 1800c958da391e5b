"""``TupliDataset``: pytupli's dataset API over a store, plus fast columnar loading.

Two views of the same episodes:

- **pytupli's tuple view** (``preview``, ``load``, ``tuples``, ``observations`` ...,
  ``as_batch_generator``, ``convert_to_tensors``): ``RLTuple`` objects built in Python, one per
  step, whose ``state`` is the observation returned by the step. Kept for compatibility; it costs
  microseconds per tuple.
- **The columnar view** (``to_numpy``, ``convert_to_d4rl_format``, ``convert_to_dataframe``):
  transition rows ``(s_t, a_t, r_t, s_t+1)`` gathered from the decoded shard columns with numpy
  index arrays, no Python per step or per episode. Episodes recorded from pytupli tuples have no
  reset observation (their ``T`` stored observations are the states *after* each step); they
  contribute the ``T - 1`` rows that are well defined, ``(state_t, a_t+1, r_t+1, state_t+1)``.

Fixes over pytupli's ``TupliDataset``: a filter set after ``load()`` takes effect (pytupli keeps
the stale tuples); ``convert_to_d4rl_format`` never takes a next observation from another episode
and keeps ``timeouts`` apart from ``terminals`` (pytupli shifts observations across episodes,
duplicates the last one and ORs the flags); no benchmark filter means every episode (pytupli
builds an OR over the stored benchmarks, so episodes whose benchmark was deleted vanish); the
``with_*`` methods share the storage instead of deep-copying it; ``set_seed`` seeds the dataset's
own RNG instead of Python's global one.

Freshness: on a ``FileStorage`` the dataset watches the catalog (``catalog_version()``, ~5 us a
check) and re-queries only after someone committed a change, so repeated ``to_numpy()`` calls
never return stale data yet cost only the gathers: the catalog query (about a microsecond per
episode) and the row plan (8 bytes per transition, plus the read-only ``episode_ids`` array
shared by those calls) are kept while the store is unchanged.
Other storages are read once per dataset (pytupli's behaviour); ``refresh()`` forgets everything.

Example:
    >>> import tempfile
    >>> from tupli_jax.episode import EpisodeData
    >>> from tupli_jax.schema import BenchmarkMetadata, BenchmarkQuery
    >>> from tupli_jax.storage.file_storage import FileStorage
    >>> store = FileStorage(tempfile.mkdtemp())
    >>> bench = store.store_benchmark(
    ...     BenchmarkQuery(hash="h", serialized="{}", metadata=BenchmarkMetadata(name="b")))
    >>> _ = store.record_episode(EpisodeData(
    ...     observations=np.arange(8, dtype=np.float32).reshape(4, 2), actions=np.array([0, 1, 0]),
    ...     rewards=np.ones(3, np.float32), discounts=np.array([1, 1, 0], np.float32),
    ...     terminated=True, truncated=False, benchmark_id=bench.id))
    >>> data = TupliDataset(store).to_numpy()
    >>> data["next_observations"][:, 0].tolist(), data["terminals"].tolist()
    ([2.0, 4.0, 6.0], [False, False, True])
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Generator, Mapping
from typing import Any

import numpy as np
import pydantic

from tupli_jax import _tree
from tupli_jax._dataset_columns import (
    _columns_from_episodes,
    _d4rl,
    _gather_columns,
    _Plan,
    _plan,
    _select_rows,
)
from tupli_jax._parsers import (
    BaseTupleParser,
    NumpyTupleParser,
    TensorflowTupleParser,
    TorchTupleParser,
    _require,
)
from tupli_jax.episode import EpisodeData
from tupli_jax.schema import (
    BaseFilter,
    BenchmarkHeader,
    EpisodeHeader,
    EpisodeItem,
    FilterAND,
    FilterIN,
    RLTuple,
)
from tupli_jax.storage.base import TupliStorage, TupliStorageError
from tupli_jax.storage.file_storage import EpisodeLocations, FileStorage

__all__ = [
    "BaseTupleParser",
    "NumpyTupleParser",
    "TensorflowTupleParser",
    "TorchTupleParser",
    "TupliDataset",
]

# ------------------------------------------------------------------------------------------------
# Change detection


class _CatalogWatch:
    """Tells whether a ``FileStorage`` catalog changed since a token was taken.

    The token is ``FileStorage.catalog_version()``, which changes with every commit (any process,
    including the storage itself). On any error a fresh ``object()`` is returned: never equal,
    so nothing cached is reused.
    """

    def __init__(self, storage: FileStorage) -> None:
        self._storage = storage

    def token(self) -> object:
        try:
            return self._storage.catalog_version()
        except TupliStorageError:
            return object()


def _as_filter(value: Any, what: str) -> BaseFilter | None:
    """``None``, a tupli_jax filter, or one of pytupli's filter objects / a filter dict."""
    if value is None or isinstance(value, BaseFilter):
        return value
    try:
        if isinstance(value, pydantic.BaseModel):
            return BaseFilter.model_validate(value.model_dump())
        if isinstance(value, Mapping):
            return BaseFilter.model_validate(dict(value))
    except pydantic.ValidationError as err:
        raise TypeError(f"{what} is not a valid filter: {err}") from None
    raise TypeError(
        f"{what} must be a filter (e.g. FilterEQ(key='metadata.seed', value=1)) or None, "
        f"received {type(value).__name__}"
    )


# ------------------------------------------------------------------------------------------------
# The dataset


class _Nothing:
    """Marks a selection that is empty without asking the store (a benchmark filter matched no
    benchmark)."""


_NOTHING = _Nothing()


class TupliDataset:
    """Filters, loads, samples and converts the episodes of a store (pytupli's API, fixed).

    The ``with_*`` methods return a new dataset sharing the storage; a dataset never changes its
    filters. Selection: benchmarks passing the benchmark filter (all benchmarks when there is
    none), episodes of those benchmarks passing the episode filter (every episode when there is
    no benchmark filter), and steps passing the tuple filter.

    Args:
        storage: The store to read (``FileStorage`` for the columnar fast path; any
            ``TupliStorage`` with ``load_episode`` otherwise).
        info: Free-form information about the dataset, kept as ``self.info``.

    Attributes:
        storage: The store.
        info: As given.

    Example:
        >>> # ds = TupliDataset(store).with_episode_filter(FilterGEQ(key="n_tuples", value=50))
        >>> # batch = ds.to_numpy()   # dict of arrays, no load() needed
    """

    def __init__(self, storage: TupliStorage, info: dict[str, Any] | None = None) -> None:
        self.storage = storage
        self.info = info
        self._benchmark_filter: BaseFilter | None = None
        self._episode_filter: BaseFilter | None = None
        self._tuple_filter_fcn: Callable[[RLTuple], bool] | None = None
        self._rng = random.Random()
        self._watch = _watch_for(storage)
        self._level = 0  # 1 after preview(), 2 after load(): what the attributes show
        self._clear()

    def _clear(self) -> None:
        self._benchmarks: list[BenchmarkHeader] | None = None
        self._headers: list[EpisodeHeader] | None = None
        self._items: list[EpisodeItem] | None = None
        self._tuples: list[RLTuple] | None = None
        self._plan: _Plan | None = None
        self._token: object = object()

    def _sync(self) -> None:
        """Drops what was read from the store if it changed since (see the module docs); a
        storage without change detection is read once per dataset (pytupli's behaviour)."""
        if self._watch is None:
            return
        token = self._watch.token()
        if token != self._token:
            self._clear()
            self._token = token

    def refresh(self) -> None:
        """Forgets everything read from the store; the next access reads it again.

        Example:
            >>> # ds.refresh(); ds.preview()
        """
        self._clear()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_watch"] = None  # rebuilt by __setstate__
        for name in ("_benchmarks", "_headers", "_items", "_tuples", "_plan"):
            state[name] = None  # read again after unpickling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._watch = _watch_for(self.storage)
        self._clear()

    def __repr__(self) -> str:
        return (
            f"TupliDataset({self.storage!r}, benchmark_filter={self._benchmark_filter}, "
            f"episode_filter={self._episode_filter}, tuple_filter={self._tuple_filter_fcn})"
        )

    def _derive(self, **changes: Any) -> TupliDataset:
        new = TupliDataset.__new__(TupliDataset)
        new.__dict__.update(self.__dict__)  # shares the storage and the catalog watch
        new._rng = copy.deepcopy(self._rng)
        for name, value in changes.items():
            setattr(new, name, value)
        new._clear()
        return new

    # -- filters ----------------------------------------------------------------------------

    def with_benchmark_filter(self, filter: BaseFilter | None) -> TupliDataset:
        """A new dataset selecting the episodes of the benchmarks passing ``filter``.

        Args:
            filter: A benchmark filter (keys as in ``list_benchmarks``, e.g.
                ``metadata.name``); ``None`` selects every episode.

        Example:
            >>> # ds.with_benchmark_filter(FilterEQ(key="metadata.name", value="cartpole"))
        """
        return self._derive(_benchmark_filter=_as_filter(filter, "the benchmark filter"))

    def with_episode_filter(self, filter: BaseFilter | None) -> TupliDataset:
        """A new dataset keeping only episodes passing ``filter`` (AND the benchmark filter).

        Example:
            >>> # ds.with_episode_filter(FilterEQ(key="metadata.seed", value=3))
        """
        return self._derive(_episode_filter=_as_filter(filter, "the episode filter"))

    def with_tuple_filter(self, filter_fcn: Callable[[RLTuple], bool] | None) -> TupliDataset:
        """A new dataset keeping only steps whose ``RLTuple`` passes ``filter_fcn``.

        A Python callable cannot be compiled: it is evaluated on materialised tuples (the slow
        path, microseconds per step), also by ``to_numpy``.

        Example:
            >>> # ds.with_tuple_filter(lambda t: t.reward > 0)
        """
        if filter_fcn is not None and not callable(filter_fcn):
            raise TypeError(
                f"the tuple filter must be a callable RLTuple -> bool or None, received "
                f"{type(filter_fcn).__name__}"
            )
        return self._derive(_tuple_filter_fcn=filter_fcn)

    def _resolved_filter(self) -> BaseFilter | _Nothing | None:
        if self._benchmark_filter is None:
            return self._episode_filter
        ids = [b.id for b in self._get_benchmarks()]
        if not ids:
            return _NOTHING
        by_benchmark = FilterIN(key="benchmark_id", value=ids)
        if self._episode_filter is None:
            return by_benchmark
        return FilterAND(filters=[by_benchmark, self._episode_filter])

    # -- reading (cached until the store changes) ---------------------------------------------

    def _get_benchmarks(self) -> list[BenchmarkHeader]:
        self._sync()
        if self._benchmarks is None:
            self._benchmarks = self.storage.list_benchmarks(self._benchmark_filter)
        return self._benchmarks

    def _get_headers(self) -> list[EpisodeHeader]:
        self._sync()
        if self._headers is None:
            selection = self._resolved_filter()
            found = [] if isinstance(selection, _Nothing) else self.storage.list_episodes(selection)
            self._headers = list(found)
        return self._headers

    def _get_items(self) -> list[EpisodeItem]:
        self._sync()
        if self._items is None:
            selection = self._resolved_filter()
            if isinstance(selection, _Nothing):
                self._items = []
            else:
                found = self.storage.list_episodes(selection, include_tuples=True)
                self._items = list(found)  # type: ignore[arg-type]
        return self._items

    def _get_tuples(self) -> list[RLTuple]:
        self._sync()
        if self._tuples is None:
            keep = self._tuple_filter_fcn
            self._tuples = [
                t for item in self._get_items() for t in item.tuples if keep is None or keep(t)
            ]
        return self._tuples

    def _get_plan(self) -> _Plan:
        self._sync()
        if self._plan is None:
            assert isinstance(self.storage, FileStorage)
            selection = self._resolved_filter()
            if isinstance(selection, _Nothing):
                locations = _NO_LOCATIONS
            else:
                locations = self.storage._episode_locations(selection)
            self._plan = _plan(locations)
        return self._plan

    @property
    def benchmarks(self) -> list[BenchmarkHeader]:
        """Headers of the selected benchmarks (empty until ``preview()`` or ``load()``)."""
        return list(self._get_benchmarks()) if self._level >= 1 else []

    @property
    def episodes(self) -> list[EpisodeHeader] | list[EpisodeItem]:
        """Selected episodes: headers after ``preview()``, items with tuples after ``load()``."""
        if self._level >= 2:
            return list(self._get_items())
        return list(self._get_headers()) if self._level >= 1 else []

    @property
    def tuples(self) -> list[RLTuple]:
        """Selected tuples (empty until ``load()``), tuple filter applied."""
        return list(self._get_tuples()) if self._level >= 2 else []

    @property
    def observations(self) -> list[Any]:
        """``state`` of every loaded tuple (the observation returned by its step)."""
        return [t.state for t in self.tuples]

    @property
    def actions(self) -> list[Any]:
        """``action`` of every loaded tuple."""
        return [t.action for t in self.tuples]

    @property
    def rewards(self) -> list[float]:
        """``reward`` of every loaded tuple."""
        return [t.reward for t in self.tuples]

    @property
    def terminals(self) -> list[bool]:
        """``terminal`` of every loaded tuple."""
        return [t.terminal for t in self.tuples]

    @property
    def timeouts(self) -> list[bool]:
        """``timeout`` of every loaded tuple."""
        return [t.timeout for t in self.tuples]

    @property
    def infos(self) -> list[dict[str, Any]]:
        """``info`` of every loaded tuple."""
        return [t.info for t in self.tuples]

    def preview(self) -> list[EpisodeHeader]:
        """Headers of the selected episodes, without reading any shard.

        Example:
            >>> # [h.n_tuples for h in ds.preview()]
        """
        self._level = max(self._level, 1)
        return list(self._get_headers())

    def load(self) -> None:
        """Loads the selected episodes' tuples (pytupli's tuple view), tuple filter applied.

        Afterwards ``episodes`` holds ``EpisodeItem``s and ``tuples`` the kept tuples. Not
        needed for ``to_numpy``.

        Example:
            >>> # ds.load(); len(ds.tuples)
        """
        self._level = 2
        self._get_tuples()

    # -- sampling ---------------------------------------------------------------------------

    def set_seed(self, seed: int) -> None:
        """Seeds this dataset's RNG (``sample_episodes``, shuffled batches); derived datasets
        start from a copy of it. Unlike pytupli, Python's global ``random`` is left alone.

        Example:
            >>> # ds.set_seed(0); ds.sample_episodes(2)
        """
        self._rng.seed(seed)

    def as_batch_generator(
        self, batch_size: int, shuffle: bool = False
    ) -> Generator[list[RLTuple], None, None]:
        """Loads the tuples and yields them in lists of ``batch_size`` (the last may be shorter).

        Example:
            >>> # for batch in ds.as_batch_generator(256, shuffle=True): ...
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, received {batch_size!r}")
        self.load()
        tuples = self.tuples
        if shuffle:
            self._rng.shuffle(tuples)
        return (tuples[i : i + batch_size] for i in range(0, len(tuples), batch_size))

    def sample_episodes(self, n_samples: int) -> list[EpisodeHeader] | list[EpisodeItem]:
        """``min(n_samples, len(episodes))`` distinct episodes drawn at random (headers, or
        items after ``load()``).

        Example:
            >>> # ds.set_seed(1); [e.id for e in ds.sample_episodes(3)]
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 0:
            raise ValueError(f"n_samples must be an int >= 0, received {n_samples!r}")
        self._level = max(self._level, 1)
        episodes = self.episodes
        return self._rng.sample(episodes, min(n_samples, len(episodes)))

    # -- columnar view ----------------------------------------------------------------------

    def to_numpy(self) -> dict[str, Any]:
        """The selected transitions as columns, gathered from the shards without Python loops.

        Rows are ``(s_t, a_t, r_t, s_t+1)`` in time order within each episode, episodes in
        catalog (recording) order. An episode recorded with its reset observation contributes
        ``T`` rows; one recorded from pytupli tuples (no reset observation) contributes the
        ``T - 1`` well-defined rows ``(state_t, a_t+1, r_t+1, state_t+1)``. ``load()`` is not
        needed. A tuple filter is applied on materialised tuples (slow path): a row is kept when
        the tuple with the same action and reward (whose ``state`` is the row's next
        observation) passes.

        Returns:
            A dict with
            ``observations`` / ``next_observations``: the observation pytree, each leaf
            ``[N, ...]``; ``actions``: the action pytree, leaves ``[N, ...]``; ``rewards``
            ``[N]``; ``terminals`` (terminated) and ``timeouts`` (truncated): bool ``[N]``, set
            only on an episode's last row; ``episode_ids``: ``[N]`` object array of id ``str``,
            read-only and shared by the calls that find the store unchanged.
            Leaf dtypes are the stored ones (promoted with ``np.result_type`` when episodes
            differ). With no rows at all and no episode to take a structure from, every array
            is empty ``[0]``.

        Raises:
            ValueError: The selected episodes do not share one observation/action structure.
            TupliStorageError: A shard is missing or damaged.

        Example:
            >>> # data = TupliDataset(store).to_numpy(); data["observations"].shape
        """
        if isinstance(self.storage, FileStorage):
            plan = self._get_plan()
            columns = _gather_columns(plan)
            ids, has_reset = plan.locations.ids, plan.locations.has_reset
        else:
            episodes = self._episode_datas()
            columns = _columns_from_episodes(episodes)
            ids = [str(e.id) for e in episodes]
            has_reset = np.array([e.has_reset_observation for e in episodes], np.bool_)
        if self._tuple_filter_fcn is not None:
            columns = _select_rows(columns, self._tuple_mask(ids, has_reset.tolist()))
        return columns

    def _episode_datas(self) -> list[EpisodeData]:
        """The selected episodes through ``load_episode`` (storages without shards)."""
        load = getattr(self.storage, "load_episode", None)
        if load is None:
            raise TypeError(
                f"to_numpy needs a storage with load_episode (a tupli_jax TupliStorage); "
                f"{type(self.storage).__name__} has none: use load() and the tuple view instead"
            )
        return [load(h.id) for h in self._get_headers()]

    def _tuple_mask(self, ids: list[str], has_reset: list[bool]) -> np.ndarray:
        """Per ``to_numpy`` row: does its tuple pass the tuple filter (slow path)."""
        keep = self._tuple_filter_fcn
        assert keep is not None
        by_id = {item.id: item.tuples for item in self._get_items()}
        parts = [np.zeros((0,), np.bool_)]
        for episode_id, reset in zip(ids, has_reset, strict=True):
            tuples = by_id.get(episode_id)
            if tuples is None:
                raise TupliStorageError(
                    f"episode '{episode_id}' disappeared from the store while the dataset was "
                    "being read; call to_numpy() again"
                )
            kept = tuples if reset else tuples[1:]
            parts.append(np.fromiter((bool(keep(t)) for t in kept), np.bool_, len(kept)))
        return np.concatenate(parts)

    def convert_to_tensors(
        self, parser: type[BaseTupleParser] = NumpyTupleParser
    ) -> tuple[Any, ...]:
        """The tuple view as ``parser`` arrays: observations (tuple states), actions, rewards,
        terminals, timeouts. Loads the tuples if needed (pytupli returned empty arrays).

        Example:
            >>> # obs, act, rew, term, trunc = ds.convert_to_tensors()
        """
        self.load()
        tuples = self.tuples
        return parser.parse_lists(
            [t.state for t in tuples],
            [t.action for t in tuples],
            [t.reward for t in tuples],
            [t.terminal for t in tuples],
            [t.timeout for t in tuples],
        )

    def convert_to_d4rl_format(self) -> dict[str, Any]:
        """D4RL's layout from the columnar view: ``observations``, ``actions``,
        ``next_observations``, ``rewards`` (float32), ``terminals`` and ``timeouts`` (bool, kept
        apart). Single-array observations and actions become float32 ``[N, ...]`` as in
        pytupli; pytree observations keep their structure and dtypes. Next observations never
        come from another episode.

        Example:
            >>> # d = ds.convert_to_d4rl_format(); d["observations"].dtype -> float32
        """
        return _d4rl(self.to_numpy())

    def convert_to_dataframe(self) -> Any:
        """A pandas DataFrame, one row per transition: the D4RL columns plus ``episode_ids``.
        Pytree leaves become columns ``observations.<leaf path>``. Needs ``pandas``.

        Example:
            >>> # df = ds.convert_to_dataframe(); df.groupby("episode_ids").rewards.sum()
        """
        pd = _require("pandas", "pandas")
        columns = self.to_numpy()
        d4rl = _d4rl(columns)
        frame: dict[str, Any] = {}
        for key in ("observations", "actions", "next_observations"):
            value = d4rl[key]
            if isinstance(value, np.ndarray):
                frame[key] = list(value)
                continue
            leaves, spec = _tree.flatten(value)
            for name, leaf in zip(_tree.leaf_names(spec, key), leaves, strict=True):
                frame[name] = list(leaf)
        for key in ("rewards", "terminals", "timeouts"):
            frame[key] = d4rl[key]
        frame["episode_ids"] = columns["episode_ids"]
        return pd.DataFrame(frame)


def _watch_for(storage: Any) -> _CatalogWatch | None:
    if isinstance(storage, FileStorage):
        return _CatalogWatch(storage)
    return None


_NO_LOCATIONS = EpisodeLocations(
    ids=[],
    benchmark_ids=[],
    shard_paths=[],
    shard_checksums=[],
    shard_index=np.zeros((0,), np.int64),
    row_start=np.zeros((0,), np.int64),
    row_stop=np.zeros((0,), np.int64),
    n_tuples=np.zeros((0,), np.int64),
    terminated=np.zeros((0,), np.bool_),
    truncated=np.zeros((0,), np.bool_),
)
