"""``memory_budget``: after the codecs, close the remaining gap with inductor's own exact recompute.

The codecs run first (each one frees bytes at a cost in gradient error but no recompute); if the
saved set is still above the target, the partitioner's knapsack (``activation_memory_budget``)
is searched for the largest budget — the least recompute — that meets it.  When even full
recompute cannot, the smallest reachable saved set is used and the report says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .._compat import recompute_budget
from .partition_probe import SavedSet

__all__ = ["BudgetFit", "target_bytes", "fit_recompute_budget"]

_STEPS = 6  # bisection steps on the knapsack budget (1/64 resolution)


@dataclass
class BudgetFit:
    target: int                 # saved bytes asked for
    recompute_budget: float     # activation_memory_budget used (1.0: no extra recompute)
    saved: SavedSet             # the partition chosen
    met: bool

    def message(self) -> str:
        got = self.saved.activation_bytes
        how = "codecs alone" if self.recompute_budget >= 1.0 else \
            f"codecs + inductor recompute (activation_memory_budget={self.recompute_budget:.3g})"
        if self.met:
            return f"memory_budget: {got} <= {self.target} bytes with {how}"
        return f"memory_budget: {self.target} bytes is not reachable; best reachable {got} bytes with {how}"


def target_bytes(budget: float | int, baseline_bytes: int) -> int:
    """A fraction of the baseline partition's saved bytes, or bytes."""
    return int(budget * baseline_bytes) if isinstance(budget, float) else int(budget)


def fit_recompute_budget(probe: Callable[[], SavedSet], current: SavedSet, target: int) -> BudgetFit:
    """``probe()`` partitions the rewritten graph under the ambient knapsack budget."""
    if current.activation_bytes <= target:
        return BudgetFit(target, 1.0, current, True)
    with recompute_budget(0.0):
        floor = probe()
    if floor.activation_bytes > target:
        return BudgetFit(target, 0.0, floor, False)
    low, high, best = 0.0, 1.0, BudgetFit(target, 0.0, floor, True)
    for _ in range(_STEPS):
        mid = (low + high) / 2
        with recompute_budget(mid):
            saved = probe()
        if saved.activation_bytes <= target:
            low, best = mid, BudgetFit(target, mid, saved, True)
        else:
            high = mid
    return best
