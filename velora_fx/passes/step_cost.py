"""A roofline estimate of one training step's time, from its partitioned forward and backward graphs.

``memory_budget`` compares plans that meet a target in different ways: exact recompute (extra
matmuls and pointwise work in backward) and codecs (encode in forward, decode in backward, no
recompute).  Both show up as nodes of the partitioned graphs, so one estimate prices both:

* matmul-like ops (everything torch's flop counter has a formula for: mm, addmm, bmm, attention)
  cost their FLOPs at the device's matmul rate in their own result's dtype (a bf16 model still runs
  small fp32 matmuls, e.g. Llama's rotary frequencies, at a tenth of the bf16 rate);
* every other op costs the bytes it writes to memory at the device's bandwidth, counted only where
  inductor cannot fuse the write away: a graph output (a saved tensor or a gradient), or an input
  of a matmul-like op; each such reader (and, for an output, the graph that reads it) pays the
  bytes again.  A view costs its base's storage; graph inputs are already in memory (a saved
  tensor is paid where forward writes it).

It is an estimate for ranking plans of the same graph, not a profiler: the pointwise chains inductor
fuses into one kernel are charged once, at their materialised results.  The report's
``budget_plans`` carry the estimate; docs/codecs.md (v6) puts it beside measured step times (it
reads low, most for recompute).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Callable

import torch
import torch.fx as fx
from torch.utils.flop_counter import flop_registry

from .._compat import device_roofline, int_hint
from .graph_utils import nbytes, tensor_val
from .partition_probe import alias_base

__all__ = ["StepCost", "estimate_step", "graph_cost", "node_seconds"]


@dataclass(frozen=True)
class StepCost:
    flops: int          # matmul-like FLOPs of forward + backward
    bytes: int          # bytes written (and read again) by the rest
    seconds: float      # the roofline sum at the device's rates

    def __add__(self, other: "StepCost") -> "StepCost":
        return StepCost(self.flops + other.flops, self.bytes + other.bytes, self.seconds + other.seconds)


def estimate_step(fwd: fx.GraphModule, bwd: fx.GraphModule) -> StepCost:
    return graph_cost(fwd) + graph_cost(bwd)


Rates = Callable[[torch.dtype], "tuple[float, float]"]  # dtype -> (matmul FLOP/s, memory bytes/s)


def graph_cost(gm: fx.GraphModule) -> StepCost:
    flops, moved = _work(gm)
    return StepCost(sum(flops.values()), sum(moved.values()), sum(_seconds(gm, flops, moved, None).values()))


def node_seconds(gm: fx.GraphModule, rates: Rates | None = None) -> dict[fx.Node, float]:
    """``graph_cost``'s estimate split over the nodes, in graph order (a timeline for overlapping
    transfers with compute): a matmul-like node its FLOPs, a materialised tensor its bytes (charged
    at the node that owns the storage).  ``rates(dtype)``: (matmul FLOP/s, memory bytes/s) measured
    on the device, for absolute times (default: the roofline's)."""
    flops, moved = _work(gm)
    return _seconds(gm, flops, moved, rates)


def _seconds(gm: fx.GraphModule, flops: dict[fx.Node, int], moved: dict[fx.Node, int],
             rates: Rates | None) -> dict[fx.Node, float]:
    """Each node's time: its FLOPs at the matmul rate of its result's dtype, its bytes at the
    memory rate (of the graph's dtype)."""
    device, dtype = _device_and_dtype(gm)
    rates = rates or (lambda d: device_roofline(device, d))
    bytes_per_s = rates(dtype)[1]

    def matmul_seconds(node: fx.Node, count: int) -> float:
        val = node.meta.get("val")
        node_dtype = val.dtype if isinstance(val, torch.Tensor) and val.is_floating_point() else dtype
        return count / rates(node_dtype)[0]
    return {n: (matmul_seconds(n, flops[n]) if n in flops else 0.0) + moved.get(n, 0) / bytes_per_s
            for n in gm.graph.nodes}


def _work(gm: fx.GraphModule) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """Per node: matmul FLOPs, and bytes written and read again (at the storage's owner)."""
    outputs: set[fx.Node] = set()
    fx.node.map_arg(gm.graph.find_nodes(op="output")[0].args, outputs.add)
    flops, reads = {}, {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        counted = _flops(node)
        if counted is not None:
            flops[node] = counted
        readers = sum(1 for u in node.users if _flops_formula(u) is not None) + (node in outputs)
        if readers:
            base = alias_base(node)  # a view costs its base's storage
            reads[base] = reads.get(base, 0) + readers
    moved = {b: nbytes(b) * (1 + n) for b, n in reads.items()  # written once, read by each reader
             if b.op == "call_function" and b not in flops}  # matmul outputs: in their FLOPs
    return flops, moved


def _flops_formula(node: fx.Node):
    packet = getattr(node.target, "overloadpacket", None)
    if packet is None:
        return None
    return flop_registry.get(packet) or _CPU_ATTENTION.get(packet.__name__)


def _cpu_attention(per_score: int, query_arg: int):
    """The CPU flash-attention ops torch's counter has no formula for: ``per_score`` FLOPs per
    (query, key, head-dim) triple — 4 forward (QKᵀ and PV), 10 backward (its recompute and grads);
    the query is argument ``query_arg`` and the key the next one."""
    def formula(*args, out_val=None, **kwargs):
        query, key = args[query_arg], args[query_arg + 1]
        *batch, queries, dim = query.shape
        return per_score * math.prod(batch) * queries * key.shape[-2] * dim
    return formula


_CPU_ATTENTION = {"_scaled_dot_product_flash_attention_for_cpu": _cpu_attention(4, 0),
                  "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_attention(10, 1)}


def _flops(node: fx.Node) -> int | None:
    """FLOPs of a matmul-like node from its inputs' shapes (None: not matmul-like)."""
    formula = _flops_formula(node)
    if formula is None:
        return None
    value = lambda a: tensor_val(a) if isinstance(a, fx.Node) else a  # noqa: E731
    args = [value(a) for a in node.args]
    kwargs = {k: value(v) for k, v in node.kwargs.items()}
    try:
        return int_hint(formula(*args, **kwargs, out_val=node.meta.get("val")), fallback=0)
    except Exception:  # noqa: BLE001 - an odd signature: price it as memory traffic instead
        return None


def _device_and_dtype(gm: fx.GraphModule) -> tuple[torch.device, torch.dtype]:
    """The device of the graph's tensors and the floating dtype its matmuls most likely run in."""
    device, dtype = torch.device("cpu"), torch.float32
    for node in gm.graph.find_nodes(op="placeholder"):
        val = tensor_val(node)
        if val is not None and val.is_floating_point():
            device, dtype = val.device, val.dtype
            if val.dim() >= 2:  # a weight: the matmul dtype
                break
    return device, dtype
