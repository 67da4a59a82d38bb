"""Shared pytest fixtures and hypothesis settings for the velora_fx test-suite.

Kept deliberately small; add fixtures here only when several test files need them.
- ``seed`` (autouse): every test starts from ``torch.manual_seed(0)``.
- hypothesis profile "ci" (default): ``deadline=None`` because the first call of a torch op is
  slow (kernel / dispatcher warm-up), which would otherwise trip hypothesis' deadline.
  Select another profile with ``HYPOTHESIS_PROFILE=thorough``.
- the plan cache (``velora_fx/passes/plan_cache.py``) is off unless a test turns it on
  (``tests/test_plan_cache.py``): a plan another test, or an earlier run, left in the cache
  directory would otherwise replace the planning a test means to exercise.
"""
import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# under CI the examples are derandomized, so a run is reproducible; run locally (or with
# HYPOTHESIS_PROFILE=thorough) to explore new examples
settings.register_profile("ci", deadline=None, max_examples=30, derandomize=bool(os.environ.get("CI")),
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", deadline=None, max_examples=500,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
os.environ.setdefault("VELORA_FX_PLAN_CACHE", "0")


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield 0


@pytest.fixture
def strict_pass(monkeypatch):
    """Make a pass bug raise instead of silently falling back to the unrewritten graph."""
    monkeypatch.setenv("VELORA_FX_STRICT", "1")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
