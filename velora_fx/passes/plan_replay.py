"""The plan cache's side of the pipeline: a graph's plan as a record (``Planned``), the key an
entry is stored under (``plan_key``), and an earlier process's entry applied to this graph
(``replay``): its decisions rebuilt, rewritten and partitioned once, and kept only if that
partition saves exactly the bytes the entry says.  The cache's files live in ``plan_cache``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch.fx as fx

from .._compat import real_tensors, recompute_budget
from ..config import VeloraConfig
from . import plan_cache
from .codec_plan import CodecDecision
from .partition_probe import SavedSet
from .planner import Decision
from .pointwise_plan import PointwiseDecision
from .sites import ActivationGroup
from .step_peak import StepPeak
from .stored_plan import StoredDecision

if TYPE_CHECKING:
    from .pipeline import GraphBinding, JointContext

__all__ = ["Planned", "plan_key", "replay"]


@dataclass
class Planned:
    """A graph's plan: the decisions, the rewritten graph and its final partition."""

    decisions: list[Decision]
    pointwise: list[CodecDecision]       # few-bit and gated decisions, one per site
    gm: fx.GraphModule
    after: SavedSet
    done: Any                            # pipeline._Rewritten
    baseline: SavedSet
    rules: dict[int, str]
    budget: dict[str, Any] | None = None  # memory_budget: the report's target, recompute budget, plans, message
    from_cache: bool = False

    def entry(self) -> dict[str, Any]:
        """What the plan cache stores (``replay`` reads it): decisions, not state."""
        base = self.baseline
        return {
            "groups": [{"at": d.group.encode_at, "sites": [i for i, s in enumerate(d.group.sites)
                                                            if any(s is t for t in d.sites)],
                        "codec": d.codec, "g": d.sub_token_size, "error": float(d.estimated_error),
                        "source": d.error_source, "share": d.update_share, "gradient": d.gradient_error,
                        "reason": d.reason, "sticky": d.sticky} for d in self.decisions],
            "codes": [{"at": d.site.encode_at, "codec": d.codec_name, "compress": d.compress, "bits": d.bits,
                       "error": float(d.estimated_error), "reason": d.reason, "sticky": d.sticky,
                       **({"pack": d.pack} if hasattr(d, "pack") else {})}
                      for d in self.pointwise],
            "baseline": {"activations": base.activations, "inputs": base.inputs, "base_bytes": base.base_bytes,
                         "peak": dataclasses.asdict(base.known_peak) if base.known_peak is not None else None},
            "saved_bytes": self.after.activation_bytes,
            "budget": self.budget,
        }


def plan_key(ctx: JointContext, config: VeloraConfig, binding: GraphBinding, groups: list[ActivationGroup],
              sites: list, slots: dict, budget_target, context: dict[str, Any]) -> str:
    """The plan cache's key of this graph (``plan_cache.py``): everything the decisions follow from
    but the calibration batch."""
    return plan_cache.key_of({
        "kind": "plan", "graph": plan_cache.graph_fingerprint(ctx.gm.graph),
        "config": {k: v for k, v in config.to_dict().items() if k != "plan_cache"},
        "sticky": sorted(binding.plan.items()), "calibrated": binding.real_primals is not None,
        "v_at_call": binding.sets_v_at_call, "num_fwd_outputs": ctx.num_fwd_outputs,
        "params": list(ctx.param_indices), "labels": list(ctx.primal_labels or []),
        "partition": ctx.partition_kwargs, "budget": budget_target is not None,
        "groups": [(g.name, g.encode_at, [s.module_path for s in g.sites]) for g in groups],
        "sites": [(s.name, s.encode_at) for s in sites],
        "slots": [(slots[id(g)].name, slots[id(g)].sub_token_size, _initialised(slots[id(g)]))
                  if slots[id(g)] is not None else None for g in groups],
        **context})


def replay(entry: dict[str, Any], groups: list[ActivationGroup], pointwise: list, stored: list,
           budget_target: Callable[[SavedSet], int] | None, rules_of: Callable[[list[Decision]], dict[int, str]],
           apply: Callable[[list[Decision], list[CodecDecision], dict[int, str]], tuple]) -> Planned | None:
    """An earlier process's plan of this graph applied and partitioned once; None (planning follows)
    if the entry does not fit this graph or its partition does not save the bytes the entry says."""
    try:
        decisions = [_decision_from(row, group) for row, group in _pairs(entry["groups"], groups)]
        codes = [_code_from(row, d) for row, d in _pairs(entry["codes"], [
            *(PointwiseDecision(s) for s in pointwise), *(StoredDecision(s) for s in stored)])]
        base = entry["baseline"]
        peak = base.get("peak")
        baseline = SavedSet({str(k): str(v) for k, v in base["activations"].items()},
                            {str(k): str(v) for k, v in base["inputs"].items()},
                            {str(k): int(v) for k, v in base["base_bytes"].items()}, None, None,
                            known_peak=StepPeak(*(int(peak[k]) for k in ("forward", "backward", "saved")))
                            if peak is not None else None)
        saved_bytes, budget = int(entry["saved_bytes"]), entry["budget"]
        recompute = None if budget is None else float(budget["recompute_budget"])
        if budget is not None:
            budget = {"target": int(budget["target"]), "recompute_budget": recompute,
                      "plans": [dict(p) for p in budget["plans"]],
                      "candidates": [dict(c) for c in budget.get("candidates", [])], "message": str(budget["message"])}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        plan_cache.log.debug("velora_fx plan cache: an entry that does not fit this graph (%s: %s); planning",
                             type(exc).__name__, exc)
        return None
    if (budget is None) != (budget_target is None) or (budget is not None and baseline.known_peak is None):
        plan_cache.log.debug("velora_fx plan cache: the entry has no memory_budget plan; planning")
        return None
    if budget is not None and budget_target(baseline) != budget["target"]:
        plan_cache.log.debug("velora_fx plan cache: the entry was planned for another target; planning")
        return None
    rules = rules_of(decisions)
    try:
        with recompute_budget(recompute if recompute is not None and recompute < 1.0 else None):
            gm, after, done = apply(decisions, [d for d in codes if d.compress], rules)
    except Exception as exc:  # noqa: BLE001 - decisions this graph cannot take: plan it instead
        plan_cache.log.debug("velora_fx plan cache: the cached decisions do not apply here (%s: %s); planning",
                             type(exc).__name__, exc)
        return None
    if after.activation_bytes != saved_bytes:
        plan_cache.log.debug("velora_fx plan cache: the cached plan saves %d bytes here, the entry says %d; planning",
                             after.activation_bytes, saved_bytes)
        return None
    return Planned(decisions, codes, gm, after, done, baseline, rules, budget, from_cache=True)


def _pairs(rows: list, items: list) -> list[tuple[dict, Any]]:
    if not isinstance(rows, list) or len(rows) != len(items) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{len(rows) if isinstance(rows, list) else rows!r} rows for {len(items)} sites")
    return list(zip(rows, items))


def _decision_from(row: dict, group: ActivationGroup) -> Decision:
    if row["at"] != group.encode_at or row["codec"] not in ("velora", "rmm"):
        raise ValueError(f"group {row['at']!r} ({row['codec']!r}) where this graph has {group.encode_at!r}")
    g = row["g"]
    if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
        raise ValueError(f"sub-token size {g!r}")
    indices = [int(i) for i in row["sites"]]
    if any(not 0 <= i < len(group.sites) for i in indices):
        raise ValueError(f"consumers {indices} of a group of {len(group.sites)}")
    source, share, gradient = row.get("source"), row.get("share"), row.get("gradient")
    return Decision(group, [group.sites[i] for i in indices], str(row["reason"]), g,
                    float(row["error"]), bool(row["sticky"]), row["codec"],
                    str(source) if source is not None else None,
                    float(gradient) if gradient is not None else None, float(share) if share is not None else None)


def _code_from(row: dict, d: CodecDecision) -> CodecDecision:
    if row["at"] != d.site.encode_at or row["codec"] != d.codec_name:
        raise ValueError(f"site {row['at']!r} ({row['codec']!r}) where this graph has {d.site.encode_at!r}")
    bits = row["bits"]
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, int)):
        raise ValueError(f"bits {bits!r}")
    d.compress, d.reason, d.bits = bool(row["compress"]), str(row["reason"]), bits
    d.estimated_error, d.sticky = float(row["error"]), bool(row["sticky"])
    if "pack" in row:  # few-bit's layout
        d.pack = bool(row["pack"])
    return d


def _initialised(slot) -> bool:
    with real_tensors():
        return slot.initialised
