"""``memory_budget`` with ``offload=True`` on one graph: offload's credit to the chooser, then the plan.

The chooser (``passes/chooser.py``) meets a saved-bytes target with recompute and codecs.  Offload
frees bytes at no error and, when its copies overlap compute, no time, so it goes first: the bytes
the baseline partition can offload under cover of compute are credited to the target the chooser
meets (with enough credit it keeps everything: no recompute, no codec), and on the partition the
chooser returns, ``plan_offload`` takes off what is left above the real target.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .. import _compat
from ..config import VeloraConfig
from ..passes.graph_utils import FORWARD_MATMULS, tensor_leaves
from ..passes.partition_probe import SavedSet
from .bandwidth import device_rates, host_bandwidth
from .plan import OffloadPlan, plan_offload
from .rewrite import apply_offload

__all__ = ["OffloadStep", "unsupported_reason"]


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
        self.device = device
        self.host_limit = config.offload_max_bytes if config.offload_max_bytes is not None else _half_host_memory()
        self.bandwidth = 0.0
        if self.active:
            self.bandwidth = config.offload_bandwidth * 1e9 if config.offload_bandwidth else host_bandwidth(device)
        self.credit_plan: OffloadPlan | None = None

    def credit(self, baseline: SavedSet, need: int) -> int:
        """Bytes of ``baseline`` that could be offloaded under cover of compute, up to ``need``."""
        if not self.active or need <= 0 or baseline.fwd is None:
            return 0
        self.credit_plan = plan_offload(baseline, self.num_fwd_outputs, need, self.bandwidth,
                                        self.host_limit, rates=self._rates(baseline))
        return self.credit_plan.bytes

    def report(self, plan: OffloadPlan) -> dict[str, Any]:
        """The report's ``offload``: the plan on the final partition, and the credit the chooser got
        from the baseline partition (with why the baseline's other tensors could not go)."""
        out = plan.to_dict()
        out["host_limit_bytes"] = self.host_limit
        credit = self.credit_plan
        out["credit_bytes"] = credit.bytes if credit is not None else 0
        out["credit_skipped"] = dict(credit.skipped) if credit is not None else {}
        return out

    def apply(self, saved: SavedSet, goal: int) -> OffloadPlan:
        """Offload from ``saved`` (its graphs, in place) what it holds above ``goal`` bytes."""
        plan = plan_offload(saved, self.num_fwd_outputs, saved.activation_bytes - goal, self.bandwidth,
                            self.host_limit, rates=self._rates(saved))
        if plan.chosen:
            apply_offload(saved.fwd, saved.bwd, plan)
        return plan

    def _rates(self, saved: SavedSet):
        """The device's measured rates in the dtype the forward's matmuls run in (None off CUDA:
        the roofline's)."""
        if self.device is None or self.device.type != "cuda":
            return None
        return device_rates(self.device, _matmul_dtype(saved.fwd))

    def message(self, plan: OffloadPlan | None, goal: int | None, saved: int) -> str:
        if not self.config.offload:
            return ""
        if not self.active:
            return f"offload: skipped ({self.reason})"
        if plan is None:
            return "offload: nothing to offload (no memory_budget target for this graph)"
        if not plan.chosen:
            if plan.need <= 0:
                credit = self.credit_plan.bytes if self.credit_plan is not None else 0
                return (f"offload: none needed on the final partition (recompute and codecs met the target; the "
                        f"baseline could offload {credit} bytes under cover of compute at "
                        f"{plan.bandwidth / 1e9:.3g} GB/s)")
            return (f"offload: nothing offloaded (no saved tensor's copies fit inside the step's compute at "
                    f"{plan.bandwidth / 1e9:.3g} GB/s)")
        left = saved - plan.bytes
        met = "meets" if goal is not None and left <= goal else "misses"
        return (f"offload: {plan.bytes} bytes in {len(plan.chosen)} tensors to host memory at "
                f"{plan.bandwidth / 1e9:.3g} GB/s, copies planned inside compute; {left} bytes stay saved on the "
                f"GPU ({met} the {goal} asked)")


def _half_host_memory() -> int | None:
    """Half of this machine's physical memory: the default bound on one graph's offloaded bytes
    (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return None


def _matmul_dtype(gm) -> torch.dtype:
    """The dtype of the first matmul's result in ``gm`` (under autocast not the weights' dtype)."""
    for node in gm.graph.nodes:
        if node.target in FORWARD_MATMULS:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor):
                return val.dtype
    return torch.float32


def _device(values: Sequence[Any]) -> torch.device | None:
    """The device of the first floating tensor among ``values`` (a weight or an activation)."""
    return next((t.device for t in tensor_leaves(values) if t.is_floating_point()), None)
