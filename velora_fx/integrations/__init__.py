"""Integrations with the libraries models are trained with.

- ``causal_lm``: transformers' causal LMs return no logits in training under a backend with the
  exact loss head, so the head applies on the plain ``model(input_ids=..., labels=...)`` call.
- ``trainer``: ``VeloraCallback`` for ``transformers.Trainer`` (imported on first use: importing
  transformers' Trainer takes seconds, and the backend itself only needs ``causal_lm``).
"""
from __future__ import annotations

from typing import Any

__all__ = ["VeloraCallback", "compile_for_trainer", "report_metrics"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
