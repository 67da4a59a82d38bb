"""Which saved tensors to offload, and where their transfers start and end, on a partition's timeline.

Why a timeline: a transfer is free only while the GPU has other work to do.  Each node of the
forward and backward graphs gets its roofline time (``step_cost.node_seconds``); the transfers run
one after another on one copy stream at the host link's bandwidth:

* forward: a tensor's copy to the host starts after its last forward reader and must end before
  forward does (its GPU memory is freed when the copy ends, so by the step's peak at the turn to
  backward it is gone);
* backward: its copy back must end before its first backward reader; copies are scheduled latest
  first, each as late as the one after it and its reader allow (memory held no earlier than needed).

Tensors are taken earliest-produced first (the longest window: an early layer's activation is read
last in backward) until the bytes asked for are reached, skipping any whose copies would not fit,
so every planned copy is covered by compute on the estimate (``MARGIN`` to spare).  The estimate reads low on a real
step (launch overhead, no perfect roofline), which leaves the copies more time than planned.
"""
from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from ..naming import module_path_from_source
from ..passes.graph_utils import nbytes, output_values, tensor_val
from ..passes.partition_probe import SavedSet, alias_base
from ..passes.step_cost import node_seconds

__all__ = ["OffloadChoice", "OffloadPlan", "plan_offload", "MIN_BYTES", "MARGIN"]

MIN_BYTES = 1 << 20   # below this a copy's fixed cost (~10 us and 4 op calls on the host) outweighs it
MARGIN = 1.25         # copies are planned as taking this much longer than bytes / bandwidth


@dataclass
class OffloadChoice:
    """One offloaded tensor: its forward name, bytes, and the nodes its four ops go next to."""

    name: str
    bytes: int
    module: str                 # the module that produced it (from the node's nn_module_stack), or ""
    start_after: str            # forward node the copy to host starts after (its last forward reader)
    finish_after: str           # forward node after which compute waits for that copy
    reload_before: str          # backward node the copy back starts before
    first_use: str              # backward node that reads it first (compute waits for the copy there)
    d2h_end: float              # planned end of the copy to host, seconds into forward
    reload_start: float         # planned start of the copy back, seconds into backward

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.name, "bytes": self.bytes, "module": self.module,
                "d2h_end_ms": round(self.d2h_end * 1e3, 3), "reload_start_ms": round(self.reload_start * 1e3, 3)}


@dataclass
class OffloadPlan:
    bandwidth: float                                  # bytes per second each way
    forward_seconds: float                            # the forward timeline's length
    backward_seconds: float
    need: int = 0                                     # bytes asked for
    freed: int | None = None                          # what it takes off the predicted step peak (None: not weighed)
    chosen: list[OffloadChoice] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)   # candidate -> why not

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chosen)

    def to_dict(self) -> dict[str, Any]:
        """What the report shows: the link's bandwidth, the timeline, each tensor and each skip."""
        return {"bandwidth_gbps": float(f"{self.bandwidth / 1e9:.4g}"), "need_bytes": max(self.need, 0),
                "offloaded_bytes": self.bytes, "peak_freed_bytes": self.freed,
                "forward_ms": round(self.forward_seconds * 1e3, 3),
                "backward_ms": round(self.backward_seconds * 1e3, 3),
                "copy_ms": round(self.bytes / self.bandwidth * 1e3, 3) if self.bandwidth > 0 else None,
                "tensors": [c.to_dict() for c in self.chosen], "skipped": dict(self.skipped)}


def plan_offload(saved: SavedSet, num_fwd_outputs: int, need: int, bandwidth: float,
                 host_limit: int | None = None, min_bytes: int = MIN_BYTES,
                 rates: tuple[float, float] | None = None) -> OffloadPlan:
    """Offload up to ``need`` bytes of ``saved``'s activations (its ``fwd``/``bwd`` graphs) whose
    copies the compute covers at ``bandwidth`` bytes/s, at most ``host_limit`` bytes in all.
    ``rates``: the device's measured (matmul FLOP/s, memory bytes/s) for the timeline."""
    fwd, bwd = saved.fwd, saved.bwd
    fwd_end, bwd_times = _ends(node_seconds(fwd, rates)), node_seconds(bwd, rates)
    bwd_end = _ends(bwd_times)
    bwd_start = {n: bwd_end[n] - bwd_times[n] for n in bwd_times}
    plan = OffloadPlan(bandwidth, max(fwd_end.values(), default=0.0), max(bwd_end.values(), default=0.0), need)
    if need <= 0 or bandwidth <= 0:
        return plan
    candidates = _candidates(fwd, bwd, num_fwd_outputs, min_bytes, plan.skipped)
    fwd_order = {n: i for i, n in enumerate(fwd.graph.nodes)}
    bwd_order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    fwd_nodes, bwd_nodes = list(fwd.graph.nodes), list(bwd.graph.nodes)
    fwd_ends, bwd_starts = [fwd_end[n] for n in fwd_nodes], [bwd_start[n] for n in bwd_nodes]
    taken: list[tuple[fx.Node, fx.Node, fx.Node, int, float]] = []  # (+ the planned end of its copy out)
    schedule: dict[str, float] = {}
    copy_free, total = 0.0, 0
    for node, last, first, size in sorted(candidates, key=lambda c: (fwd_order[c[1]], fwd_order[c[0]])):
        if total >= need:
            break
        if host_limit is not None and total + size > host_limit:
            plan.skipped[node.name] = "the host memory bound (offload_max_bytes) is reached"
            continue
        end = max(fwd_end[last], copy_free) + size * MARGIN / bandwidth
        if end > plan.forward_seconds:
            plan.skipped[node.name] = "its copy to the host would not end before forward does"
            continue
        tried = _reload_schedule([*taken, (node, last, first, size, end)], bwd_start, bandwidth)
        if tried is None:
            plan.skipped[node.name] = "its copy back would not end before backward reads it"
            continue
        taken.append((node, last, first, size, end))
        schedule, copy_free, total = tried, end, total + size
    for node, last, first, size, end in taken:
        wait_at = fwd_nodes[min(max(bisect.bisect_left(fwd_ends, end), fwd_order[last]), len(fwd_nodes) - 2)]
        start = schedule[node.name]
        # the node running at the planned start (the last one starting at or before it): the copy
        # starts before it, so compute reaches the copy's reader at least the copy's time later (the
        # first node starting after the planned start is late by up to a node, e.g. by a whole matmul
        # whose reader is the tensor's first reader: measured on an H200, the copy then overlapped nothing)
        before = bwd_nodes[min(max(bisect.bisect_right(bwd_starts, start) - 1, 0), bwd_order[first])]
        plan.chosen.append(OffloadChoice(node.name, size, _module(node), last.name, wait_at.name, before.name,
                                         first.name, end, start))
    return plan


def _ends(seconds: dict[fx.Node, float]) -> dict[fx.Node, float]:
    """Each node's end on a graph's timeline, from its nodes' times in graph order."""
    clock, out = 0.0, {}
    for node, spent in seconds.items():
        clock += spent
        out[node] = clock
    return out


def _candidates(fwd: fx.GraphModule, bwd: fx.GraphModule, num_fwd_outputs: int, min_bytes: int,
                skipped: dict[str, str]) -> list[tuple[fx.Node, fx.Node, fx.Node, int]]:
    """Saved activations whose storage the copy frees, contiguous, large enough, and read in backward:
    (forward node, the last forward reader of its storage or itself, its first backward reader, bytes).
    A saved view qualifies when it spans its base's whole storage (a reshape of a matmul's output,
    as transformers' projections save them) and no other output shares that storage."""
    outputs = output_values(fwd)
    held = {alias_base(n) for n in outputs[:num_fwd_outputs] if isinstance(n, fx.Node)}
    placeholders = {n.name: n for n in bwd.graph.find_nodes(op="placeholder")}
    order = {n: i for i, n in enumerate(fwd.graph.nodes)}
    bwd_order = {n: i for i, n in enumerate(bwd.graph.nodes)}
    sharing: dict[fx.Node, set[fx.Node]] = {}  # storage -> the distinct outputs on it
    for o in outputs:
        if isinstance(o, fx.Node):
            sharing.setdefault(alias_base(o), set()).add(o)
    on_storage: dict[fx.Node, list[fx.Node]] = {}  # storage -> the forward nodes on it (itself, its views)
    for n in fwd.graph.nodes:
        if n.op == "call_function":
            on_storage.setdefault(alias_base(n), []).append(n)
    seen: set[fx.Node] = set()
    found = []
    for node in outputs[num_fwd_outputs:]:
        if not isinstance(node, fx.Node) or node in seen:
            continue
        seen.add(node)
        val = tensor_val(node)
        why = None
        if val is None or node.op != "call_function":
            continue  # a symbolic size, or a graph input (weights live anyway)
        base = alias_base(node)
        if node.target is operator.getitem and alias_base(node.args[0]) is not node.args[0]:
            why = "a view of another tensor"
        elif base is not node and base.op != "call_function":
            why = "a view of a graph input (the caller holds its memory)"
        elif base is not node and nbytes(base) != nbytes(node):
            why = "a view of part of another tensor's storage"
        elif base in held or sum(1 for o in outputs if o is node) > 1:
            why = "forward also returns it to the caller"
        elif len(sharing[base]) > 1:
            why = "another saved tensor shares its storage (its memory would stay on the GPU)"
        elif not val.is_contiguous():
            why = "not contiguous"
        elif nbytes(node) < min_bytes:
            why = f"smaller than {min_bytes} bytes"
        elif node.name not in placeholders or not placeholders[node.name].users:
            why = "backward does not read it"
        if why:
            skipped[node.name] = why
            continue
        views = on_storage[base]
        readers = [u for n in views for u in n.users if u.op != "output" and u not in views]
        last = max(readers, key=order.__getitem__) if readers else node
        last = max(last, node, key=order.__getitem__)
        first = min(placeholders[node.name].users, key=bwd_order.__getitem__)
        found.append((node, last, first, nbytes(node)))
    return found


def _reload_schedule(taken, bwd_start: dict[fx.Node, float], bandwidth: float) -> dict[str, float] | None:
    """Start time of each copy back (latest first, each ending before its reader starts and before
    the next copy starts); None if one would have to start before backward does."""
    starts: dict[str, float] = {}
    nxt = float("inf")
    for node, _, first, size, _ in sorted(taken, key=lambda t: bwd_start[t[2]], reverse=True):
        start = min(bwd_start[first], nxt) - size * MARGIN / bandwidth
        if start < 0:
            return None
        starts[node.name] = nxt = start
    return starts


def _module(node: fx.Node) -> str:
    """The module path of the module that produced ``node`` (as site names spell it), or ""."""
    stack = node.meta.get("nn_module_stack")
    return module_path_from_source(str(list(stack.values())[-1][0])) if stack else ""
