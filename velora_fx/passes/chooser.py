"""``memory_budget``'s one chooser: per saved tensor, keep it, leave it to recompute, or encode it.

1. The exact plan (no codec but this model's earlier, sticky choices) is fitted first: the
   largest knapsack budget whose partition meets the target (``budget.fit_recompute_budget``).
2. Its fit prices recompute: the estimated step-time ratio it added over the bytes it removed
   (unfitted exact partition -> fitted one), in time ratio per byte.  Where exact meets the target
   without recompute the price is 0 (nothing to buy); where it cannot meet it, infinite.
3. Every codec decision proposes a candidate (``candidates.propose``: bytes it frees, time, weighted
   error), priced (time + ``error_cost`` x error) per byte freed.  The candidates priced below
   recompute are taken cheapest first, one per storage, until the bytes they free would meet the
   target on their own (``select``).  When none is (and recompute is needed), the codecs' cheapest
   offer (the same rule without recompute's price) is weighed instead, so the prediction that
   recompute is cheaper is checked on the real partitions (one partition when it holds: the offer's
   cost before recompute is then usually above exact's, and it is not fitted).
4. That subset is rewritten and recompute fitted for the rest; it is scored against exact as
   ``budget.choose_plan`` scores plans (estimated step time / the baseline's + ``error_cost`` x
   weighted error) and the cheaper wins; when neither meets the target, the one saving fewest bytes.

The candidates' prices are predictions from the baseline's bytes and the device's bandwidth; the
plans are then compared on their real partitions, so a subset that predicted well but partitions
badly loses to exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from ..config import VeloraConfig
from .budget import PlanOption, activation_bytes, choose_plan, fit_recompute_budget
from .candidates import Candidate, error_weights, propose
from .partition_probe import SavedSet
from .step_cost import estimate_step

__all__ = ["Selection", "select", "recompute_price", "plan_under_budget"]


@dataclass
class Selection:
    """One candidate as the chooser saw it."""

    candidate: Candidate
    price: float
    selected: bool
    why: str


def select(candidates: Sequence[Candidate], recompute: float, needed: int, error_cost: float) -> list[Selection]:
    """Candidates priced below ``recompute`` (time ratio per byte), cheapest first, one per freed
    storage, until their predicted bytes reach ``needed``; every candidate with why it was or was
    not taken, in the input's order."""
    priced = [(c.price(error_cost), i, c) for i, c in enumerate(candidates)]
    out: dict[int, Selection] = {}
    taken: set[str] = set()
    freed = 0
    for price, i, c in sorted(priced, key=lambda t: (t[0], t[1])):
        if c.bytes_freed <= 0:
            why = "frees no predicted bytes"
        elif price >= recompute:
            why = f"price {price:.3g} per byte is not below recompute's {recompute:.3g}"
        elif freed >= needed:
            why = "not needed: cheaper candidates free the bytes the target asks for"
        elif taken & set(c.frees):
            why = "a cheaper candidate already frees its storage"
        else:
            taken |= set(c.frees)
            freed += c.bytes_freed
            out[i] = Selection(c, price, True, f"price {price:.3g} per byte is below recompute's {recompute:.3g}")
            continue
        out[i] = Selection(c, price, False, why)
    return [out[i] for i in range(len(candidates))]


def recompute_price(unfitted: SavedSet, fitted: SavedSet, met: bool, base_seconds: float,
                    kept: Callable[[SavedSet], int] = activation_bytes) -> float:
    """Recompute's marginal price: the estimated step-time ratio the exact plan's fit added, per
    byte it removed from the device (``kept``; 0: no recompute was needed; inf: recompute alone
    cannot meet the target)."""
    if not met:
        return math.inf
    removed = kept(unfitted) - kept(fitted)
    if removed <= 0:
        return 0.0
    added = estimate_step(fitted.fwd, fitted.bwd).seconds - estimate_step(unfitted.fwd, unfitted.bwd).seconds
    return max(added, 0.0) / (base_seconds or 1.0) / removed


def plan_under_budget(ctx, baseline: SavedSet, planning: SavedSet, decisions: list, pointwise_plan: list,
                      planned: tuple, weight_share, nodes: dict[str, fx.Node], target: int, config: VeloraConfig,
                      apply: Callable[[set[int]], tuple],
                      kept: Callable[[SavedSet], int] = activation_bytes) -> tuple:
    """``memory_budget`` on one graph.  ``ctx``: the pipeline's JointContext; ``planning``: the
    partition the VeLoRA/RMM decisions were planned against (with the few-bit codes chosen);
    ``planned``: (graph, partition, rewrite) with every planned codec; ``apply(ids)`` builds the
    same for a subset of decisions (by ``id``); ``kept(partition)``: its bytes measured against
    ``target`` (``budget.py``).  Decisions not in the winning plan are skipped and
    say why.  Returns the winner's graph, fitted partition and rewrite, and (winner, every plan as
    evaluated, every candidate's report row)."""
    chosen = [d for d in [*decisions, *pointwise_plan] if d.compress]
    sticky = {id(d) for d in chosen if d.sticky}
    everything = {id(d) for d in chosen}
    matmul = {id(d) for d in decisions}
    weight = error_weights(ctx.gm, ctx.param_indices, weight_share, nodes)
    error = lambda subset: sum(weight(d) * d.estimated_error for d in chosen if id(d) in subset)  # noqa: E731
    build = lambda subset: planned if subset == everything else apply(subset)  # noqa: E731
    base_seconds = estimate_step(baseline.fwd, baseline.bwd).seconds or 1.0

    exact_built = build(sticky)
    exact = PlanOption(_name(sticky, sticky, chosen), exact_built[0], exact_built[1], error(sticky),
                       (sticky, exact_built))
    fit = fit_recompute_budget(lambda: ctx.probe(exact.gm), exact.saved, target, kept=kept)
    price = recompute_price(exact.saved, fit.saved, fit.met, base_seconds, kept)
    proposed = propose([d for d in chosen if not d.sticky],
                       lambda d: planning if id(d) in matmul else baseline, nodes, config, base_seconds, weight)
    needed = kept(exact.saved) - target
    selections = select(proposed, price, needed, config.error_cost)
    subset = sticky | {id(s.candidate.decision) for s in selections if s.selected}
    if subset == sticky and needed > 0:  # none priced below recompute: check that on the real partition
        offer = {id(s.candidate.decision) for s in select(proposed, math.inf, needed, config.error_cost) if s.selected}
        subset |= offer
        for s in selections:
            if id(s.candidate.decision) in offer:
                s.why += "; weighed anyway, in the codecs' cheapest offer"
    options = [exact]
    if subset != sticky:
        built = build(subset)
        options.append(PlanOption(_name(subset, sticky, chosen), built[0], built[1], error(subset), (subset, built)))
    best, evaluated = choose_plan(options, target, ctx.probe, baseline, config.error_cost, kept)
    won, (gm, _, done) = best.option.payload
    for s in selections:
        d = s.candidate.decision
        if id(d) not in won:
            why = s.why if not s.selected else \
                f"the selected candidates' plan scored {evaluated[-1].score:.4g}, exact {evaluated[0].score:.4g}"
            d.skip(f"memory_budget: plan '{best.option.name}' meets it at a lower estimated cost ({why})")
    rows = [_row(s, price, id(s.candidate.decision) in won) for s in selections]
    return gm, best.fit.saved, done, (best, evaluated, rows)


def _name(subset: set[int], sticky: set[int], chosen: list) -> str:
    """A plan's name as the report has always called it: its codecs, or "exact"."""
    names = {id(d): d.codec_name for d in chosen}
    name = "+".join(sorted({names[i] for i in subset - sticky})) or "exact"
    if sticky and subset != sticky:
        return name + " (+ this model's earlier choices)"
    return "this model's earlier choices" if sticky else name


def _row(s: Selection, recompute: float, chosen: bool) -> dict[str, Any]:
    c = s.candidate
    return {"tensor": c.tensor, "codec": c.codec, "frees": list(c.frees), "bytes_freed": c.bytes_freed,
            "estimated_time_ratio": _sig(c.time_ratio), "error": round(c.error, 6), "price": _sig(s.price),
            "recompute_price": _sig(recompute), "selected": s.selected, "chosen": chosen, "why": s.why}


def _sig(x: float) -> float | None:
    """Four significant digits; None for infinity (frees nothing; recompute cannot meet the target)."""
    return float(f"{x:.4g}") if math.isfinite(x) else None

