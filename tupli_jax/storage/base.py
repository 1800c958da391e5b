"""The storage interface (pytupli's ``TupliStorage``) and its error type."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from tupli_jax.episode import EpisodeBatch, EpisodeData
from tupli_jax.schema import (
    ArtifactMetadata,
    ArtifactMetadataItem,
    BaseFilter,
    Benchmark,
    BenchmarkHeader,
    BenchmarkQuery,
    Episode,
    EpisodeHeader,
    EpisodeItem,
)

__all__ = ["TupliStorage", "TupliStorageError"]


class TupliStorageError(Exception):
    """Raised for every storage failure: unknown ids, bad input, damaged files.

    The message names the id and the store, says what was expected and what to do.
    """


class TupliStorage(ABC):
    """pytupli's storage interface, plus the columnar episode methods of tupli_jax."""

    # -- benchmarks -----------------------------------------------------------------------
    @abstractmethod
    def store_benchmark(self, benchmark_query: BenchmarkQuery) -> BenchmarkHeader:
        """Stores a benchmark; an existing benchmark with the same hash is returned instead."""

    @abstractmethod
    def load_benchmark(self, uri: str) -> Benchmark:
        """Loads a benchmark with its serialized env."""

    @abstractmethod
    def list_benchmarks(self, filter: BaseFilter | None = None) -> list[BenchmarkHeader]:
        """Lists benchmark headers passing ``filter``."""

    @abstractmethod
    def publish_benchmark(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the benchmark's ``published_in`` groups."""

    @abstractmethod
    def delete_benchmark(self, uri: str) -> None:
        """Deletes a benchmark (its episodes stay unless deleted separately)."""

    # -- artifacts ------------------------------------------------------------------------
    @abstractmethod
    def store_artifact(self, artifact: bytes, metadata: ArtifactMetadata) -> ArtifactMetadataItem:
        """Stores bytes; an artifact with identical content is returned instead."""

    @abstractmethod
    def load_artifact(self, uri: str, **kwargs: object) -> bytes:
        """Loads an artifact's bytes."""

    @abstractmethod
    def list_artifacts(self, filter: BaseFilter | None = None) -> list[ArtifactMetadataItem]:
        """Lists artifact headers passing ``filter``."""

    @abstractmethod
    def publish_artifact(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the artifact's ``published_in`` groups."""

    @abstractmethod
    def delete_artifact(self, uri: str) -> None:
        """Deletes an artifact."""

    # -- episodes -------------------------------------------------------------------------
    @abstractmethod
    def record_episode(self, episode: Episode | EpisodeData) -> EpisodeHeader:
        """Stores one episode (durable when this returns)."""

    @abstractmethod
    def record_episodes(
        self, episodes: Sequence[Episode | EpisodeData], *, batch_id: str | None = None
    ) -> list[EpisodeHeader]:
        """Stores a batch of episodes all-or-nothing; headers come back in input order.

        With ``batch_id``, a batch already committed under that id is not written again: the
        call returns that batch's headers instead (what makes re-running a job chunk safe).
        """

    def record_episode_batch(
        self, batch: EpisodeBatch, *, batch_id: str | None = None
    ) -> Sequence[EpisodeHeader]:
        """Stores the episodes of a packed ``EpisodeBatch`` (``record_episodes`` semantics).

        The default converts the batch to ``EpisodeData`` views; ``FileStorage`` writes the
        columns directly (and may return the headers as a lazy sequence).
        """
        return self.record_episodes(batch.episodes(), batch_id=batch_id)

    @abstractmethod
    def has_batch(self, batch_id: str) -> bool:
        """Whether a batch recorded with ``batch_id`` is committed."""

    @abstractmethod
    def load_episode(self, episode_id: str) -> EpisodeData:
        """Loads one episode in columnar form."""

    @abstractmethod
    def publish_episode(self, uri: str, publish_in: str = "global") -> None:
        """Adds ``publish_in`` to the episode's ``published_in`` groups."""

    @abstractmethod
    def list_episodes(
        self, filter: BaseFilter | None = None, include_tuples: bool = False
    ) -> list[EpisodeHeader] | list[EpisodeItem]:
        """Lists episode headers (or full items with tuples) passing ``filter``."""

    @abstractmethod
    def delete_episode(self, uri: str) -> None:
        """Deletes an episode."""
