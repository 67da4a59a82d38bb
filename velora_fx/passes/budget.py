"""``memory_budget``'s two measures: the least recompute that meets a target, and a plan's price.

``fit_recompute_budget`` searches the partitioner's knapsack (``activation_memory_budget``) for
the largest budget — the least recompute — whose partition of a graph meets the target saved
bytes.  ``choose_plan`` fits each of a few *plans* (a graph with some codecs rewritten) that way
and prices it as

    estimated step time / the baseline partition's + ``error_cost`` x its gradient error

(``step_cost.py``'s roofline; the error is each codec's ``estimated_error`` weighted by the share of
the trained weights whose gradient it touches); the cheapest plan that meets the target wins.
A plan whose cost before any recompute is already at the best's is not fitted ("skipped"), and
one whose search meets a budget that misses the target at a cost above the best (with a little
slack) is "given up": a lower budget recomputes more.  When no plan can meet the target, the one
with the fewest saved bytes is used and the report says so.  Which plans to weigh is the
chooser's (``chooser.py``): exact, and the codec candidates priced below recompute.

What a partition is measured by is ``kept(saved)``, the saved bytes that stay on the device: its
saved activations by default; with ``offload=True`` less what offload, with copies under cover
of that very partition's compute, takes off its predicted step peak (``offload/step.py``), so
recompute is fitted only for what offload cannot free, on each partition the search tries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .._compat import recompute_budget
from .partition_probe import SavedSet
from .step_cost import StepCost, estimate_step

__all__ = ["BudgetFit", "PlanOption", "PlanChoice", "choose_plan", "target_bytes", "fit_recompute_budget",
           "activation_bytes"]

_STEPS = 5  # the knapsack budget is searched on a grid of 1/2**_STEPS (each probe is one partition)
# step-time ratio a lower budget may undercut a higher one by (the knapsack's curve is ragged: up to
# 0.002 measured on the 12-layer models); a plan is given up only this far past the winner's score
_PRUNE_SLACK = 0.01
# a partition below a switch budget that meets the target within this share of it ends the search
# when the next grid budget is expected to miss (``_settled``): certifying that costs one more
# partition of the whole graph; one grid step is 6-8 % of a 0.5 target on the 12-layer models
_CLOSE = 0.08


@dataclass
class BudgetFit:
    target: int                 # saved bytes asked for
    recompute_budget: float     # activation_memory_budget used (1.0: no extra recompute)
    saved: SavedSet             # the partition chosen
    met: bool
    kept: int | None = None     # its saved bytes that stay on the device (None: all of them)

    @property
    def kept_bytes(self) -> int:
        return self.saved.activation_bytes if self.kept is None else self.kept

    def message(self, plan: str = "codecs") -> str:
        got = self.kept_bytes
        how = f"{plan} alone" if self.recompute_budget >= 1.0 else \
            f"{plan} + inductor recompute (activation_memory_budget={self.recompute_budget:.3g})"
        if self.met:
            return f"memory_budget: {got} <= {self.target} bytes with {how}"
        return f"memory_budget: {self.target} bytes is not reachable; best reachable {got} bytes with {how}"


def target_bytes(budget: float | int, baseline_bytes: int, held_elsewhere: int = 0) -> int:
    """A fraction of this graph's baseline saved bytes, or what is left of a budget in bytes (one
    total for the model) after ``held_elsewhere``, the bytes its other graphs save."""
    return int(budget * baseline_bytes) if isinstance(budget, float) else max(0, int(budget) - held_elsewhere)


def activation_bytes(saved: SavedSet) -> int:
    """The default measure of a partition: all its saved activations stay on the device."""
    return saved.activation_bytes


def fit_recompute_budget(probe: Callable[[], SavedSet], current: SavedSet, target: int,
                         give_up: Callable[[SavedSet], bool] | None = None,
                         kept: Callable[[SavedSet], int] = activation_bytes) -> BudgetFit | None:
    """The largest knapsack budget on a 1/32 grid whose partition meets ``target`` (the least
    recompute): a budget where it does next to one where it does not, as bisection found, with
    fewer partitions (each one is a min-cut of the whole graph); ``probe()`` partitions the
    rewritten graph under the ambient budget.

    The search keeps that bracket and narrows it where the saved bytes say the boundary is
    (``_next_budget``); after two guesses that did not halve it, it halves.  Budget 0 (recompute
    all: no activation is saved) opens the bracket as an assumption and is partitioned only when
    no budget on the grid meets the target, to say how close it comes.  A budget below a switch
    that meets the target within ``_CLOSE`` ends the search when the budget's proportion says the
    next grid budget misses (``_settled``: one partition fewer, the same answer on a straight stretch).
    ``give_up(partition)``, asked after each partition that misses the target, ends the search (None) when true.
    ``kept(partition)``: the bytes measured against the target (see the module's docstring)."""
    size = kept(current)
    if size <= target:
        return BudgetFit(target, 1.0, current, True, size)
    top = 2 ** _STEPS
    seen: dict[int, SavedSet] = {top: current}
    sizes: dict[int, int] = {top: size}
    lo, hi, best, slow = 0, top, None, 0
    while hi - lo > 1:
        k, guided = _next_budget(lo, hi, seen, sizes, target, top, slow >= 2)
        with recompute_budget(k / top):
            saved = seen[k] = probe()
        sizes[k] = size = kept(saved)
        width = hi - lo
        if size <= target:
            lo, best = k, BudgetFit(target, k / top, saved, True, size)
            if _settled(k, saved, size, target, top):
                break
        elif give_up is not None and give_up(saved):
            return None
        else:
            hi = k
        slow = 0 if guided or slow >= 2 or 2 * (hi - lo) <= width else slow + 1  # two poor guesses: halve
    if best is not None:
        return best
    with recompute_budget(0.0):
        floor = probe()
    size = kept(floor)
    return BudgetFit(target, 0.0, floor, size <= target, size)


def _settled(k: int, saved: SavedSet, got: int, target: int, top: int) -> bool:
    """Whether budget ``k``, which meets the target, is the answer without partitioning ``k + 1``:
    ``k + 1`` is on the same knapsack stretch (below a switch budget, where saved bytes grow about
    in proportion to the budget), the proportion says it misses, and ``k`` (``got`` bytes) is within
    ``_CLOSE``."""
    below_switch = any(k < math.floor(t * top) for t in saved.switches)
    return k > 0 and below_switch and got >= (1 - _CLOSE) * target and got * (k + 1) > target * k


def _next_budget(lo: int, hi: int, seen: dict[int, SavedSet], sizes: dict[int, int], target: int, top: int,
                 halve: bool) -> tuple[int, bool]:
    """The grid index to partition next inside the bracket (lo meets the target, hi does not), and
    whether a switch budget chose it.

    Saved bytes against the knapsack budget are near-linear stretches, flat above the switch
    budgets where the partitioner returns a whole recompute level, with jumps at those
    (``SavedSet.switches``, known once a partition below 1 ran; from the highest one up to 1, where
    the default level returns, the bytes are flat).  So, from the lowest switch up: if the bracket
    spans one, try the first budget above it (flat, cheap to partition: its min-cuts are shared),
    then the last one below it; but where lo met the target below a switch, first scale lo's bytes
    to the target (the knapsack saves about budget x the default level).
    Else follow the line through the bracket's ends (before any budget
    met the target: through the two lowest that missed it, or through zero at budget 0), or halve.
    ``sizes``: each partitioned budget's measured bytes (``kept``)."""
    switches = sorted({t for s in seen.values() for t in s.switches})
    lasts = [math.floor(t * top) for t in switches]  # the last grid budget at or below each switch
    stretch = [last for last in lasts if lo < last < hi]  # switches between the bracket's ends
    if lo in seen and lo > 0 and stretch and 0 < sizes[lo] <= target:
        # below a switch the knapsack saves about budget x the default level: scale lo's bytes, if
        # that stays below the switch (else the switch rule below brackets the jump)
        k = math.floor(lo * target / sizes[lo])
        if k < stretch[0]:
            return max(k, lo + 1), False
    if lasts and lo > lasts[-1]:
        lasts.append(top - 1)  # lo is on the flat stretch below 1
    for last in lasts:
        if lo < last + 1 < hi:
            return last + 1, True
        if last + 1 == hi and lo < last:
            return last, True
    if halve:
        return (lo + hi) // 2, False
    x1, y1 = hi, sizes[hi]
    above = [k for k in seen if k > hi and not any(hi / top <= t < k / top for t in switches) and k < top]
    if lo in seen or not above:  # between the bracket's ends
        x0, y0 = lo, sizes[lo] if lo in seen else 0
    else:  # on from the two lowest partitions that miss the target
        x0, y0 = min(above), sizes[min(above)]
    if y1 == y0 or (y1 - y0) * (x1 - x0) <= 0:  # flat or falling: no line to follow
        return (lo + hi) // 2, False
    k = x1 + math.floor((target - y1) * (x1 - x0) / (y1 - y0))
    return min(max(k, lo + 1), hi - 1), False


@dataclass
class PlanOption:
    """One way to compress a graph before recompute closes the rest of the gap."""

    name: str                # e.g. "exact", "velora", "velora+fewbit+gated"
    gm: fx.GraphModule       # the joint graph with this plan's codecs
    saved: SavedSet          # its partition under the ambient knapsack budget
    error: float             # weighted estimated gradient error (0: exact)
    payload: Any = None      # what the caller needs to commit it


@dataclass
class PlanChoice:
    option: PlanOption
    fit: BudgetFit | None    # None: not fitted (see ``status``)
    cost: StepCost
    time_ratio: float        # estimated step time / the baseline partition's
    score: float             # time_ratio + error_cost * error
    # "fitted"; "skipped": its cost before any recompute was already at the best plan's, so it was
    # not fitted; "given up": its search met a budget that missed the target at a cost past the best's
    status: str = "fitted"

    def to_dict(self, chosen: bool) -> dict[str, Any]:
        fit = self.fit
        return {"plan": self.option.name, "chosen": chosen, "fitted": fit is not None, "status": self.status,
                "met": bool(fit and fit.met), "saved_bytes": fit.kept_bytes if fit else None,
                "recompute_budget": fit.recompute_budget if fit else None,
                "estimated_time_ratio": round(self.time_ratio, 4), "error": round(self.option.error, 6),
                "score": round(self.score, 4), "estimated_flops": self.cost.flops,
                "estimated_bytes_moved": self.cost.bytes}


def choose_plan(options: Sequence[PlanOption], target: int, probe: Callable[[fx.GraphModule], SavedSet],
                baseline: SavedSet, error_cost: float,
                kept: Callable[[SavedSet], int] = activation_bytes) -> tuple[PlanChoice, list[PlanChoice]]:
    """The cheapest option that meets ``target`` saved bytes (or, if none can, the one reaching the
    fewest bytes), and every option as evaluated.  ``probe(gm)`` partitions ``gm`` under the
    ambient knapsack budget; ``baseline`` is the unmodified graph's partition (the time unit);
    ``kept``: the bytes of a partition measured against the target."""
    base = estimate_step(baseline.fwd, baseline.bwd).seconds or 1.0
    evaluated: list[PlanChoice] = []
    best: PlanChoice | None = None
    for option in options:
        unfitted = estimate_step(option.saved.fwd, option.saved.bwd)
        floor = unfitted.seconds / base + error_cost * option.error  # recompute only adds work
        if best is not None and floor >= best.score:
            evaluated.append(PlanChoice(option, None, unfitted, unfitted.seconds / base, floor, "skipped"))
            continue
        missed: list[PlanChoice] = []

        def give_up(saved: SavedSet, option: PlanOption = option, missed: list = missed) -> bool:
            """A budget that missed the target recomputes less than any that meets it: past the
            winner's score (with slack for the knapsack's ragged curve), the plan cannot win."""
            cost = estimate_step(saved.fwd, saved.bwd)
            missed.append(PlanChoice(option, None, cost, cost.seconds / base,
                                     cost.seconds / base + error_cost * option.error, "given up"))
            return best is not None and missed[-1].score >= best.score + _PRUNE_SLACK
        fit = fit_recompute_budget(lambda option=option: probe(option.gm), option.saved, target, give_up, kept)
        if fit is None:
            evaluated.append(missed[-1])
            continue
        cost = estimate_step(fit.saved.fwd, fit.saved.bwd)
        choice = PlanChoice(option, fit, cost, cost.seconds / base, cost.seconds / base + error_cost * option.error)
        evaluated.append(choice)
        if fit.met and (best is None or choice.score < best.score):
            best = choice
    if best is None:  # nothing meets the target: the fewest saved bytes, then the cheapest
        fitted = [c for c in evaluated if c.fit is not None]
        best = min(fitted, key=lambda c: (c.fit.kept_bytes, c.score))
    return best, evaluated
