"""``memory_budget``: one choice between keeping, recomputing and encoding, at least estimated cost.

The planner offers a few *plans* for a graph: exact (no codec; only the model's earlier,
sticky codec choices), the matmul codecs alone (velora / rmm), and every codec the config allows.
For each plan the partitioner's knapsack (``activation_memory_budget``) is searched for the
largest budget — the least recompute — that meets the target (``fit_recompute_budget``).  Each
fitted plan is priced as

    estimated step time / the baseline partition's + ``error_cost`` x its gradient error

(``step_cost.py``'s roofline; the error is each codec's ``estimated_error`` weighted by the share of
the trained weights whose gradient it touches), and the cheapest plan that meets the target wins.
A codec is thus used only where it is cheaper than exact recompute by more than the gradient
error it costs.  A plan whose cost before any recompute is already above the best is not fitted.
When no plan can meet the target, the one with the fewest saved bytes is used and the report
says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .._compat import is_joint_primal, recompute_budget
from .graph_utils import CASTS, FORWARD_MATMULS, VIEW_LIKE, near_inputs, strip_views
from .partition_probe import SavedSet
from .planner import Decision
from .step_cost import StepCost, estimate_step

__all__ = ["BudgetFit", "PlanOption", "PlanChoice", "choose_plan", "plan_under_budget", "target_bytes",
           "fit_recompute_budget"]

_STEPS = 5  # bisection steps on the knapsack budget (1/32 resolution; each is one partition)


@dataclass
class BudgetFit:
    target: int                 # saved bytes asked for
    recompute_budget: float     # activation_memory_budget used (1.0: no extra recompute)
    saved: SavedSet             # the partition chosen
    met: bool

    def message(self, plan: str = "codecs") -> str:
        got = self.saved.activation_bytes
        how = f"{plan} alone" if self.recompute_budget >= 1.0 else \
            f"{plan} + inductor recompute (activation_memory_budget={self.recompute_budget:.3g})"
        if self.met:
            return f"memory_budget: {got} <= {self.target} bytes with {how}"
        return f"memory_budget: {self.target} bytes is not reachable; best reachable {got} bytes with {how}"


def target_bytes(budget: float | int, baseline_bytes: int, held_elsewhere: int = 0) -> int:
    """A fraction of this graph's baseline saved bytes, or what is left of a budget in bytes (one
    total for the model) after ``held_elsewhere``, the bytes its other graphs save."""
    return int(budget * baseline_bytes) if isinstance(budget, float) else max(0, int(budget) - held_elsewhere)


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
    fit: BudgetFit | None    # None: not fitted (its cost before recompute was already too high)
    cost: StepCost
    time_ratio: float        # estimated step time / the baseline partition's
    score: float             # time_ratio + error_cost * error

    def to_dict(self, chosen: bool) -> dict[str, Any]:
        fit = self.fit
        return {"plan": self.option.name, "chosen": chosen, "fitted": fit is not None,
                "met": bool(fit and fit.met), "saved_bytes": fit.saved.activation_bytes if fit else None,
                "recompute_budget": fit.recompute_budget if fit else None,
                "estimated_time_ratio": round(self.time_ratio, 4), "error": round(self.option.error, 6),
                "score": round(self.score, 4), "estimated_flops": self.cost.flops,
                "estimated_bytes_moved": self.cost.bytes}


def choose_plan(options: Sequence[PlanOption], target: int, probe: Callable[[fx.GraphModule], SavedSet],
                baseline: SavedSet, error_cost: float) -> tuple[PlanChoice, list[PlanChoice]]:
    """The cheapest option that meets ``target`` saved bytes (or, if none can, the one reaching the
    fewest bytes), and every option as evaluated.  ``probe(gm)`` partitions ``gm`` under the
    ambient knapsack budget; ``baseline`` is the unmodified graph's partition (the time unit)."""
    base = estimate_step(baseline.fwd, baseline.bwd).seconds or 1.0
    evaluated: list[PlanChoice] = []
    best: PlanChoice | None = None
    for option in options:
        unfitted = estimate_step(option.saved.fwd, option.saved.bwd)
        floor = unfitted.seconds / base + error_cost * option.error  # recompute only adds work
        if best is not None and floor >= best.score:
            evaluated.append(PlanChoice(option, None, unfitted, unfitted.seconds / base, floor))
            continue
        fit = fit_recompute_budget(lambda: probe(option.gm), option.saved, target)
        cost = estimate_step(fit.saved.fwd, fit.saved.bwd)
        choice = PlanChoice(option, fit, cost, cost.seconds / base, cost.seconds / base + error_cost * option.error)
        evaluated.append(choice)
        if fit.met and (best is None or choice.score < best.score):
            best = choice
    if best is None:  # nothing meets the target: the fewest saved bytes, then the cheapest
        fitted = [c for c in evaluated if c.fit is not None]
        best = min(fitted, key=lambda c: (c.fit.saved.activation_bytes, c.score))
    return best, evaluated


def plan_under_budget(ctx, baseline: SavedSet, decisions: list[Decision], pointwise_plan: list, planned: tuple,
                      weight_share, nodes: dict[str, fx.Node], target: int, error_cost: float,
                      apply: Callable[[set[int]], tuple]) -> tuple:
    """``memory_budget``: exact, the matmul codecs alone, or every planned codec, each with the least
    recompute that meets ``target``; the cheapest wins.  Codec choices the winner does not use are
    skipped and say why; the model's earlier (sticky) choices are in every plan.  ``ctx`` is the
    pipeline's JointContext, ``planned`` its (graph, partition, rewrite) with every planned codec,
    ``apply(ids)`` builds the same for a subset of decisions (by ``id``).  Returns the winner's
    graph, fitted partition and rewrite, and (winner, every plan as evaluated)."""
    chosen = [d for d in [*decisions, *pointwise_plan] if d.compress]
    sticky = {id(d) for d in chosen if d.sticky}
    matmul = sticky | {id(d) for d in decisions if d.compress}
    everything = {id(d) for d in chosen}
    share = _error_weights(ctx, weight_share, nodes)
    error = lambda subset: sum(share(d) * d.estimated_error for d in chosen if id(d) in subset)  # noqa: E731
    names = {id(d): (d.codec if isinstance(d, Decision) else d.codec_name) for d in chosen}
    options, seen = [], set()
    for subset in (sticky, matmul, everything):
        key = frozenset(subset)
        if key in seen:
            continue
        seen.add(key)
        built = planned if subset == everything else apply(subset)
        name = "+".join(sorted({names[i] for i in subset - sticky})) or "exact"
        if sticky and subset != sticky:
            name += " (+ this model's earlier choices)"
        elif sticky:
            name = "this model's earlier choices"
        options.append(PlanOption(name, built[0], built[1], error(subset), (subset, built)))
    best, evaluated = choose_plan(options, target, ctx.probe, baseline, error_cost)
    subset, (gm, _, done) = best.option.payload
    for d in chosen:
        if id(d) not in subset:
            d.skip(f"memory_budget: plan '{best.option.name}' meets it at a lower estimated cost")
    return gm, best.fit.saved, done, (best, evaluated)


def _error_weights(ctx, weight_share, nodes: dict[str, fx.Node]) -> Callable[[Any], float]:
    """How much of the model a codec's error reaches: the share of the trained weights whose
    gradient it approximates (a VeLoRA/RMM site's weights; for a nonlinearity's codes, the weights
    of the matmuls that produce its input, whose gradients its derivative multiplies)."""
    primal_index = {n: i for i, n in enumerate(n for n in ctx.gm.graph.nodes if is_joint_primal(n))}
    params = set(ctx.param_indices)

    def producers(node: fx.Node) -> list["_ParamRef"]:
        """The trained weights of the forward matmuls a few cheap ops above ``node``."""
        matmuls = [nodes[n] for n in near_inputs(node, depth=6, stop=FORWARD_MATMULS)
                   if nodes[n].op == "call_function" and nodes[n].target in FORWARD_MATMULS]
        roots = (strip_views(arg, VIEW_LIKE | CASTS)[0] for m in matmuls for arg in m.all_input_nodes)
        return [_ParamRef(i) for i in sorted({primal_index.get(r) for r in roots} & params)]

    def weight(d) -> float:
        if isinstance(d, Decision):
            return weight_share(d.sites)
        return weight_share(producers(nodes[d.site.encode_at]))
    return weight


@dataclass(frozen=True)
class _ParamRef:
    param_index: int
