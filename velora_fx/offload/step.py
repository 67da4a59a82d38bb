"""``memory_budget`` with ``offload=True`` on one graph: how the chooser measures a partition, then the plan.

The chooser (``passes/chooser.py``) meets a saved-bytes target with recompute and codecs.  Offload
frees bytes at no error and, when its copies overlap compute, no time, so it goes first on every
partition the chooser weighs: a partition is measured by its saved bytes less what
``plan_offload``'s copies, under cover of that partition's own compute, take off its predicted step
peak (``kept``; a copy still running at forward's peak, or reloaded before backward's, frees less
than it moves).  The knapsack search then fits recompute only for what offload cannot move, on
the partition recompute actually leaves (whose tensors and timeline differ from the baseline's),
and the codecs' plans are measured the same way.  On the partition chosen, the same plan is applied.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .. import _compat
from ..config import VeloraConfig
from ..passes.graph_utils import tensor_leaves
from ..passes.partition_probe import SavedSet
from ..passes.step_peak import predict_step_peak
from .bandwidth import device_rates, host_bandwidth
from .ops import measured
from .plan import OffloadPlan, plan_offload
from .rewrite import apply_offload, transfer_labels

__all__ = ["OffloadStep", "unsupported_reason", "measured_overlap"]

_REFITS = 2  # times a plan asks again for what its copies did not take off the peak
_NO_PEAK = "offloading it takes nothing off the predicted step peak"


def unsupported_reason(device: torch.device | None) -> str | None:
    """Why offload cannot run for graphs on ``device`` (None: it can): it needs CUDA's pinned host
    memory and a second stream to overlap copies with compute."""
    if device is None or device.type != "cuda":
        where = device.type if device is not None else "no device"
        return f"the graph runs on {where}; offload needs a CUDA device (pinned host memory, a copy stream)"
    return None


class OffloadStep:
    def __init__(self, config: VeloraConfig, joint_inputs: Sequence[Any], num_fwd_outputs: int) -> None:
        self.config = config
        self.num_fwd_outputs = num_fwd_outputs
        device = _device(joint_inputs)
        self.reason = unsupported_reason(device) if config.offload else "off"
        if self.reason is None and _compat.cuda_graphs_on():
            self.reason = ("CUDA graphs (mode='reduce-overhead') cannot capture the copies to and from host memory; "
                           "compile without it to offload")
        self.active = config.offload and self.reason is None
        self.host_limit = config.offload_max_bytes if config.offload_max_bytes is not None else _half_host_memory()
        self.bandwidth = 0.0
        if self.active:
            self.bandwidth = config.offload_bandwidth * 1e9 if config.offload_bandwidth else host_bandwidth(device)
        # the timeline's rates: the device's measured ones per matmul dtype (None off CUDA: the roofline's)
        self.rates = (lambda dtype: device_rates(device, dtype)) if device is not None and device.type == "cuda" \
            else None
        self.goal: int | None = None          # the saved bytes the target leaves this graph (set by the backend)
        self.first: OffloadPlan | None = None  # the plan on the first partition measured (before recompute)
        self._plans: dict[int, tuple[SavedSet, OffloadPlan]] = {}

    def kept(self, saved: SavedSet) -> int:
        """The chooser's measure of a partition: its saved bytes less what its offload plan takes off
        its predicted step peak (``OffloadPlan.freed``)."""
        plan = self.plan(saved)
        return saved.activation_bytes - (plan.freed if plan is not None else 0)

    def plan(self, saved: SavedSet) -> OffloadPlan | None:
        """The offload plan for a partition (computed once per partition; None: offload is off or
        there is no goal)."""
        if not self.active or self.goal is None or saved.fwd is None:
            return None
        hit = self._plans.get(id(saved))
        if hit is not None and hit[0] is saved:
            return hit[1]
        plan = self._fit(saved, saved.activation_bytes - self.goal)
        self._plans[id(saved)] = (saved, plan)  # holding the partition keeps its id from being reused
        if self.first is None:
            self.first = plan
        return plan

    def _fit(self, saved: SavedSet, need: int) -> OffloadPlan:
        """A plan whose copies take ``need`` bytes off the partition's predicted step peak, or as
        close as the link allows.  A tensor moved frees less than its bytes at the peak when its copy
        is still running there or its copy back has begun before it, so the plan asks for the
        shortfall again, up to ``_REFITS`` times; one that frees nothing at the peak is dropped."""
        def freed(plan: OffloadPlan) -> OffloadPlan:
            plan.freed = max(0, without - predict_step_peak(saved, offload=plan.chosen).peak) if plan.chosen else 0
            return plan

        plan = plan_offload(saved, self.num_fwd_outputs, need, self.bandwidth, self.host_limit, rates=self.rates)
        if not plan.chosen:  # nothing asked for, or nothing fits: no peak to predict
            plan.freed = 0
            return plan
        without = (saved.known_peak or predict_step_peak(saved)).peak
        plan = freed(plan)
        for _ in range(_REFITS):
            if not plan.chosen or plan.freed >= need:
                break
            more = freed(plan_offload(saved, self.num_fwd_outputs, need + plan.bytes - plan.freed, self.bandwidth,
                                      self.host_limit, rates=self.rates))
            if more.freed <= plan.freed:
                break
            plan = more
        if plan.chosen and not plan.freed:
            for choice in plan.chosen:
                plan.skipped[choice.name] = _NO_PEAK
            plan.chosen = []
        return plan

    def report(self, plan: OffloadPlan, label: str = "") -> dict[str, Any]:
        """The report's ``offload``: the plan on the final partition, and what offload could take from
        the first partition measured, before any recompute (with why its other tensors could not go).
        ``label``: the one ``apply`` got (``measured_overlap`` reads the transfers by it)."""
        out = plan.to_dict()
        out["label"] = label
        out["host_limit_bytes"] = self.host_limit
        first = self.first
        out["before_recompute"] = {"offloadable_bytes": first.bytes if first is not None else 0,
                                   "skipped": dict(first.skipped) if first is not None else {}}
        return out

    def apply(self, saved: SavedSet, label: str = "") -> OffloadPlan | None:
        """Offload from ``saved`` (its graphs, in place) the plan its measure counted on; ``label``
        names the graph's transfers for ``measured_overlap``."""
        plan = self.plan(saved)
        if plan is not None and plan.chosen:
            apply_offload(saved.fwd, saved.bwd, plan, label)
        self._plans.clear()
        return plan

    def message(self, plan: OffloadPlan | None, saved: int) -> str:
        if not self.config.offload:
            return ""
        if not self.active:
            return f"offload: skipped ({self.reason})"
        if plan is None:
            return "offload: nothing to offload (no memory_budget target for this graph)"
        if not plan.chosen:
            if plan.need <= 0:
                first = self.first.bytes if self.first is not None else 0
                return (f"offload: none needed on the final partition (recompute and codecs met the target; "
                        f"before recompute offload could take {first} bytes under cover of compute at "
                        f"{plan.bandwidth / 1e9:.3g} GB/s)")
            if _NO_PEAK in plan.skipped.values():
                return "offload: nothing offloaded (the copies that fit would take nothing off the predicted step peak)"
            return (f"offload: nothing offloaded (no saved tensor's copies fit inside the step's compute at "
                    f"{plan.bandwidth / 1e9:.3g} GB/s)")
        left = saved - plan.bytes
        goal = self.goal
        met = "meets" if goal is not None and saved - (plan.freed or 0) <= goal else "misses"
        return (f"offload: {plan.bytes} bytes in {len(plan.chosen)} tensors to host memory at "
                f"{plan.bandwidth / 1e9:.3g} GB/s, copies planned inside compute, taking {plan.freed} bytes off the "
                f"predicted step peak; {left} bytes stay saved on the GPU (the peak's share {met} the {goal} asked)")


def measured_overlap(offload: dict[str, Any]) -> dict[str, Any] | None:
    """What the latest step's transfers of a graph measured (from its report's ``offload``): per
    tensor and in all, each direction's copy time and how long compute waited for it, and the share
    of copy time hidden behind compute.  None before any step ran (or without labels)."""
    names = [t["tensor"] for t in offload.get("tensors", [])]
    labels = {name: transfer_labels(offload.get("label", ""), name) for name in names}
    times = measured([label for pair in labels.values() for label in pair if label])
    if not times:
        return None
    tensors, totals = {}, {"out": [0.0, 0.0], "back": [0.0, 0.0]}
    for name, pair in labels.items():
        row = {}
        for direction, label in zip(("out", "back"), pair):
            if label in times:
                copy, stall = times[label]["copy_ms"], times[label]["stall_ms"]
                row[f"{direction}_copy_ms"], row[f"{direction}_stall_ms"] = round(copy, 3), round(stall, 3)
                totals[direction][0] += copy
                totals[direction][1] += stall
        tensors[name] = row
    copied = sum(c for c, _ in totals.values())
    stalled = sum(s for _, s in totals.values())
    return {**{f"{d}_{k}": round(v[i], 3) for d, v in totals.items() for i, k in enumerate(("copy_ms", "stall_ms"))},
            "hidden_share": round(1 - stalled / copied, 4) if copied > 0 else None, "tensors": tensors}


def _half_host_memory() -> int | None:
    """Half of this machine's physical memory: the default bound on one graph's offloaded bytes
    (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


def _device(values: Sequence[Any]) -> torch.device | None:
    """The device of the first floating tensor among ``values`` (a weight or an activation)."""
    return next((t.device for t in tensor_leaves(values) if t.is_floating_point()), None)
