"""The activation peak of one training step, predicted from a partition (forward and backward graphs).

Why: what a user hits is the peak, not the saved bytes.  The saved set is alive from the end of
forward into backward, and on top of it sit transients: forward buffers not yet freed (a loss
head's chunk), and backward's gradient buffers while the saved tensors are being consumed.  A
saved-bytes target misses those (issue 17: GPT-2's saved bytes met a 0.5 target while its peak
stayed at 0.92x).

How: a liveness walk over each graph in execution order, with every tensor's bytes from its
fake value.  A tensor is allocated when its node runs and freed after its last reader (a view
keeps its base alive); graph inputs the caller holds (weights, user inputs) are not counted.
Forward: the outputs (the saved set and the loss) stay alive at its end.  Backward starts with
the saved set alive and frees each saved tensor after its last use; its outputs (the gradients)
stay, and so does what forward returned to the caller (logits, a KV cache: the caller holds the
model's output while it calls backward).  Inductor fuses chains of pointwise ops into their
pointwise or reduction readers, so a pointwise result is counted only where inductor must write
it to memory: a graph output, an input of anything else (matmuls, attention, views, custom and
collective ops), or one read again far from where it is computed (``recompute_guard.reads_far``,
more than ``REACH`` of the graph later: a recompute chain across layers, written out for each
layer's backward).  An estimate, not a simulation of inductor's scheduler; the report shows it
next to what a benchmark measures.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx

from .graph_utils import nbytes, output_values
from .partition_probe import SavedSet, alias_base
from .recompute_guard import reads_far

__all__ = ["StepPeak", "predict_step_peak"]


@dataclass(frozen=True)
class StepPeak:
    forward: int        # activation bytes alive at the forward's highest point
    backward: int       # ... at the backward's, counting the saved set still alive then
    saved: int          # the saved set (alive between the two)

    @property
    def peak(self) -> int:
        return max(self.forward, self.backward)

    def to_dict(self) -> dict[str, int]:
        return {"forward": self.forward, "backward": self.backward, "saved": self.saved, "peak": self.peak}


def predict_step_peak(saved: SavedSet) -> StepPeak:
    """Forward and backward peaks of the partition ``saved`` (its ``fwd`` and ``bwd`` graphs)."""
    forward = _walk(saved.fwd, alive_at_start={})
    # backward's placeholders are the saved tensors, under their forward names, and the tangents
    by_name = {n.name: n for n in saved.bwd.graph.find_nodes(op="placeholder")}
    on_host = {name for name, n in by_name.items() if any(_offload_op(u) for u in n.users)}  # offloaded
    alive = {by_name[name]: saved.base_bytes[base] for name, base in saved.activations.items()
             if name in by_name and name not in on_host}
    # what forward returned to the caller (logits, a KV cache) is held through backward
    pinned = {by_name[name] for name, base in saved.activations.items() if name in by_name and base in saved.held}
    saved_bases = set(saved.activations.values())
    held = sum(size for base, size in saved.held.items() if base not in saved_bases)
    backward = held + _walk(saved.bwd, alive_at_start=alive, pinned=pinned)
    on_gpu = saved.activation_bytes - sum(saved.base_bytes[saved.activations[n]] for n in on_host
                                          if n in saved.activations)
    return StepPeak(forward, backward, on_gpu)


# velora_fx's transfer ops (velora_fx/offload/ops.py): in forward their results are tickets and host
# tensors; in backward ``reload_start`` allocates the reloaded tensor's device buffer (counted from
# there: the copy fills it before compute reaches ``reload_finish``, which returns that same buffer)
_OFFLOAD_OPS = {"offload_start", "offload_finish", "reload_start", "reload_finish"}


def _offload_op(node: fx.Node, *names: str) -> bool:
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "velora_fx" and \
        target.overloadpacket.__name__ in (names or _OFFLOAD_OPS)


_UNFUSABLE = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward"}


def _materialised(node: fx.Node, outputs: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether inductor writes ``node``'s result to memory (see the module docstring)."""
    if node in outputs or not _has_tag(node, torch.Tag.pointwise):
        return True
    if reads_far(node, order):
        return True
    return not all(_has_tag(user, torch.Tag.pointwise) or _has_tag(user, torch.Tag.reduction)
                   for user in node.users)


def _has_tag(node: fx.Node, tag: torch.Tag) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return target.overloadpacket.__name__ not in _UNFUSABLE and tag in target.tags


def _walk(gm: fx.GraphModule, alive_at_start: dict[fx.Node, int], pinned: set[fx.Node] = frozenset()) -> int:
    """The most bytes alive at once in ``gm``, starting with ``alive_at_start``; outputs and
    ``pinned`` stay."""
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    outputs = {n for n in output_values(gm) if isinstance(n, fx.Node)}
    # last reader of each storage (a view's readers count for its base)
    last_use: dict[fx.Node, int] = {}
    for node in nodes:
        for inp in node.all_input_nodes:
            base = _base(inp)
            last_use[base] = max(last_use.get(base, -1), order[node])
    alive = dict(alive_at_start)
    current = peak = sum(alive.values())
    for node in nodes:
        if _offload_op(node, "reload_start"):
            size = nbytes(node.args[0])  # the device buffer the host tensor is copied into
        elif node.op == "call_function" and _base(node) is node and not _offload_op(node) and \
                _materialised(node, outputs, order):
            size = nbytes(node)
        else:
            size = 0
        if size:
            alive[node] = size
            current += size
            peak = max(peak, current)
        for base in {_base(i) for i in node.all_input_nodes}:
            if base in alive and last_use.get(base) == order[node] and base not in outputs and base not in pinned:
                current -= alive.pop(base)
    return peak


def _base(node: fx.Node) -> fx.Node:
    if node.op == "call_function" and node.target is operator.getitem:
        return node  # one output of a multi-output op: its own storage
    base = alias_base(node)
    return base.args[0] if _offload_op(base, "reload_finish") else base  # reload_start's buffer
