"""Offload to host memory: the fourth way (after keep, recompute, encode) to take a saved tensor off
the GPU between forward and backward, exact and, when the copies overlap compute, free of time.
``ops`` (the transfer ops), ``plan`` (which tensors, on the step's timeline), ``rewrite`` (into the
partitioned graphs), ``bandwidth`` (the host link, measured once)."""
from __future__ import annotations

from .plan import OffloadPlan, plan_offload  # noqa: F401
from .rewrite import apply_offload, has_transfers  # noqa: F401
from .step import OffloadStep, measured_overlap, unsupported_reason  # noqa: F401

__all__ = ["OffloadPlan", "OffloadStep", "plan_offload", "apply_offload", "has_transfers", "unsupported_reason",
           "measured_overlap"]
