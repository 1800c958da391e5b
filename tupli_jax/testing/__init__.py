"""Test helpers users can run on their own environments: ``FakeEnv`` and contract checks."""

from tupli_jax.testing.contract import check_env_contract, sample_action
from tupli_jax.testing.fakes import FakeEnv, FakeObservation, FakeState

__all__ = ["FakeEnv", "FakeObservation", "FakeState", "check_env_contract", "sample_action"]
