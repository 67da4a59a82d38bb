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
it to memory: a graph output, an input of anything else (matmuls, attention, custom and
collective ops), or one read again far from where it is computed (``recompute_guard.reads_far``,
more than ``REACH`` of the graph later: a recompute chain across layers, written out for each
layer's backward).  Readers are found through views (inductor reindexes a view of a pointwise
value inside the reader's kernel), and a gather or index reads its source's values in its own
kernel: a loss's fp32 log-softmax, read by the gather that picks the targets' entries, is never
written out (H200, GPT-2 12 x 1024, batch 8 x 1024: counting it and the fp32 upcast that a view
separates from its reduction put the baseline's predicted peak 0.49 GiB above the measured one;
the measured peak is the saved set plus the bf16 logits' gradient).  Transfers to the host
(``offload``) count as placed: an offloaded tensor is freed where its copy ends and allocated again
where its copy back starts.  An estimate, not a simulation of inductor's scheduler (inductor keeps a
graph with transfers in its order: ``_compat.inner_compile_keeping_order``); the report shows it
next to what a benchmark measures.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx

from .graph_utils import is_transfer, nbytes, output_values
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


def predict_step_peak(saved: SavedSet, offload: Sequence[Any] = ()) -> StepPeak:
    """Forward and backward peaks of the partition ``saved`` (its ``fwd`` and ``bwd`` graphs).

    ``offload``: transfers planned but not yet put into the graphs (``OffloadChoice``s: a saved
    tensor's name, the forward node after which its copy to the host has ended and the backward node
    before which its copy back starts), counted as the rewrite will place them: the tensor is freed
    after that forward node and allocated again at that backward node."""
    f_nodes = {n.name: n for n in saved.fwd.graph.nodes} if offload else {}
    released = {_base(f_nodes[c.name]): f_nodes[c.finish_after] for c in offload}
    forward = _walk(saved.fwd, alive_at_start={}, released=released)
    # backward's placeholders are the saved tensors, under their forward names, and the tangents
    by_name = {n.name: n for n in saved.bwd.graph.find_nodes(op="placeholder")}
    on_host = {name for name, n in by_name.items() if any(is_transfer(u) for u in n.users)}  # offloaded
    on_host |= {c.name for c in offload}
    alive = {by_name[name]: saved.base_bytes[base] for name, base in saved.activations.items()
             if name in by_name and name not in on_host}
    b_nodes = {n.name: n for n in saved.bwd.graph.nodes} if offload else {}
    reloaded: dict[fx.Node, list[tuple[fx.Node, int]]] = {}
    for c in offload:
        reloaded.setdefault(b_nodes[c.reload_before], []).append((by_name[c.name], c.bytes))
    # what forward returned to the caller (logits, a KV cache) is held through backward
    pinned = {by_name[name] for name, base in saved.activations.items() if name in by_name and base in saved.held}
    saved_bases = set(saved.activations.values())
    held = sum(size for base, size in saved.held.items() if base not in saved_bases)
    backward = held + _walk(saved.bwd, alive_at_start=alive, pinned=pinned, reloaded=reloaded)
    on_gpu = saved.activation_bytes - sum(saved.base_bytes[saved.activations[n]] for n in on_host
                                          if n in saved.activations)
    return StepPeak(forward, backward, on_gpu)


_UNFUSABLE = {"mm", "addmm", "bmm", "baddbmm", "convolution", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
              "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward", "_efficient_attention_forward"}


# readers inductor lowers to a load of their data input at computed indices, inlining a pointwise
# producer there (the log-softmax a loss's gather reads is never written out)
_INDEXED_LOADS = {"gather", "index", "_unsafe_index"}


def _materialised(node: fx.Node, outputs: set[fx.Node], order: dict[fx.Node, int]) -> bool:
    """Whether inductor writes ``node``'s result to memory (see the module docstring); ``order``: the
    positions of the graph's compute nodes (transfers left out)."""
    if node in outputs or not _has_tag(node, torch.Tag.pointwise):
        return True
    readers = _readers_through_views(node, outputs)
    if readers is None:  # a view of it is a graph output
        return True
    if not all(_has_tag(r, torch.Tag.pointwise) or _has_tag(r, torch.Tag.reduction) or _indexed_load_of(r, node)
               for r in readers):
        return True  # read by a kernel it cannot fuse into (a matmul, a transfer, ...)
    return reads_far(node, order, readers=readers)


def _readers_through_views(node: fx.Node, outputs: set[fx.Node]) -> list[fx.Node] | None:
    """The ops that read ``node``'s values, looking through views of it (inductor reindexes a view
    of a pointwise value inside its reader's kernel); None when a view of it is a graph output."""
    readers, stack = [], list(node.users)
    while stack:
        user = stack.pop()
        if user.op == "call_function" and alias_base(user) is not user:
            if user in outputs:
                return None
            stack.extend(user.users)
        else:
            readers.append(user)
    return readers


def _indexed_load_of(reader: fx.Node, node: fx.Node) -> bool:
    """``reader`` gathers from ``node`` (possibly through views) rather than taking it as indices."""
    target = reader.target
    if reader.op != "call_function" or not isinstance(target, torch._ops.OpOverload) or \
            target.overloadpacket.__name__ not in _INDEXED_LOADS:
        return False
    source = reader.args[0]
    return isinstance(source, fx.Node) and alias_base(source) is alias_base(node)


def _has_tag(node: fx.Node, tag: torch.Tag) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return target.overloadpacket.__name__ not in _UNFUSABLE and tag in target.tags


def _walk(gm: fx.GraphModule, alive_at_start: dict[fx.Node, int], pinned: set[fx.Node] = frozenset(),
          released: dict[fx.Node, fx.Node] | None = None,
          reloaded: dict[fx.Node, list[tuple[fx.Node, int]]] | None = None) -> int:
    """The most bytes alive at once in ``gm``, starting with ``alive_at_start``; outputs and
    ``pinned`` stay, except the outputs ``released`` frees after a given node (copied to the host);
    ``reloaded`` allocates tensors (with their bytes) when a given node is reached (copied back)."""
    released, reloaded = released or {}, reloaded or {}
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    outputs = {n for n in output_values(gm) if isinstance(n, fx.Node)}
    # how far a value is read is measured in compute nodes: transfers put into the graph must not move
    # a value across ``REACH`` (the chooser's prediction before the rewrite equals the one after it)
    compute_order = {n: i for i, n in enumerate(n for n in nodes if not is_transfer(n))}
    sizes = {node: _allocates(node, outputs, compute_order) for node in nodes}
    # where a node's inputs are read: at the node itself if it is a kernel; a pointwise value fused
    # into its readers, or a view, is read inside its readers' kernels, so what it reads stays alive
    # until the last of those runs (a loss's logits stay while the kernel writing their gradient runs)
    read_at: dict[fx.Node, int] = {}
    read_in_graph: dict[fx.Node, int] = {}  # the same, leaving out what the graph's output reads (-1)
    for node in reversed(nodes):
        inline = node.op == "call_function" and not sizes[node] and node.users and \
            (_base(node) is not node or _has_tag(node, torch.Tag.pointwise))
        read_at[node] = max(read_at[user] for user in node.users) if inline else order[node]
        read_in_graph[node] = max(read_in_graph[user] for user in node.users) if inline else \
            -1 if node.op == "output" else order[node]
    frees: dict[int, list[fx.Node]] = {}
    last_use: dict[fx.Node, int] = {}
    last_read: dict[fx.Node, int] = {}  # the same, not counting the graph's output
    for node in nodes:  # the last kernel reading each storage (a view's readers count for its base)
        for inp in node.all_input_nodes:
            base = _base(inp)
            last_use[base] = max(last_use.get(base, -1), read_at[node])
            last_read[base] = max(last_read.get(base, -1), read_in_graph[node])
    for base, at in last_use.items():
        if base not in outputs and base not in pinned:
            frees.setdefault(at, []).append(base)
    for base, after in released.items():
        frees.setdefault(max(last_read.get(base, order[base]), order[after]), []).append(base)
    alive = dict(alive_at_start)
    current = peak = sum(alive.values())
    for node in nodes:
        for tensor, size in reloaded.get(node, ()):
            alive[tensor] = size
            current += size
            peak = max(peak, current)
        if sizes[node]:
            alive[node] = sizes[node]
            current += sizes[node]
            peak = max(peak, current)
        for base in frees.get(order[node], ()):
            if base in alive:
                current -= alive.pop(base)
    return peak


# velora_fx's transfer ops (``graph_utils.is_transfer``): in forward their results are tickets and host
# tensors; in backward ``reload_start`` allocates the reloaded tensor's device buffer (counted from
# there: the copy fills it before compute reaches ``reload_finish``, which returns that same buffer)
def _allocates(node: fx.Node, outputs: set[fx.Node], order: dict[fx.Node, int]) -> int:
    """The bytes ``node`` allocates on the device when it runs (0 for views and fused values)."""
    if is_transfer(node, "reload_start"):
        return nbytes(node.args[0])  # the device buffer the host tensor is copied into
    if node.op == "call_function" and _base(node) is node and not is_transfer(node) and \
            _materialised(node, outputs, order):
        return nbytes(node)
    return 0


def _base(node: fx.Node) -> fx.Node:
    if node.op == "call_function" and node.target is operator.getitem:
        return node  # one output of a multi-output op: its own storage
    base = alias_base(node)
    return base.args[0] if is_transfer(base, "reload_finish") else base  # reload_start's buffer
