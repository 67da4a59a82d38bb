"""Keep the knapsack from recomputing chains that run across layers through regenerated random numbers.

Why: under a low ``activation_memory_budget`` the min-cut partitioner may drop every layer's
residual ``h_i`` and recompute it in backward from the embeddings and every layer's output.  That
is one chain, and backward must run it at its start (the last layer needs ``h_L`` first, which
needs every ``h_i`` before it), so every ``h_i`` is materialised at once and stays alive until its
own layer's backward reads it.  With dropout on the residual branches the chain also regenerates
every dropout mask, work the knapsack prices at nothing (its runtime estimate counts FLOPs of
matmuls): GPT-2 12 x 1024 with transformers' default dropout, H200, one 13 ms backward kernel
regenerating 25 masks, and a measured peak 1.3 GiB above the prediction.  Torch's own
``ban_recompute_used_far_apart`` heuristic is meant for this, but the partitioner turns it off
when a memory budget is set.

How: partition at a few falling knapsack budgets (``BUDGETS``), find the forward values that
backward recomputes from regenerated random numbers and reads again far from where it computes
them (more than ``REACH`` of the backward graph later), and mark their storages ``MUST_SAVE`` in
the joint graph, so every budget keeps them and recomputes the rest next to its readers.  Falling
budgets mark the fewest: at 0.5 the chain is the residual stream alone; at budget 0 everything is
recomputed from the inputs and everything is far.  Only floating-point values computed from
tensors are marked (masks and constants are cheap to regenerate next to their readers once the
chain is cut), and nothing the default partition (budget 1) already recomputes far away.  A chain
without random numbers (Llama) is left to the knapsack: it costs pointwise work, and its memory is
in the step-peak prediction (``step_peak``: a value read far from where it is computed is counted);
keeping it would cost that memory at every budget (Llama, H200: 336 MiB, 0.53x -> 0.60x of the peak
for 1.14x -> 1.08x of the time).  The marks are kept in the plan cache (``plan_cache``) under the
graph's fingerprint, so a second process partitions nothing for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .._compat import CheckpointPolicy, is_joint_primal, is_joint_tangent, recompute_budget
from . import plan_cache
from .graph_utils import nbytes, tensor_val
from .partition_probe import PartitionFn, SavedSet, alias_base, probe_partition

__all__ = ["REACH", "BUDGETS", "GuardResult", "reads_far", "far_recomputed", "guard_recompute_chains", "guard_joint",
           "save_random_values"]

# a recomputed value whose last backward reader is further than this share of the backward graph
# from where backward computes it spans layers (a layer of a 12-layer model is ~8 % of it)
REACH = 0.25
BUDGETS = (0.5, 0.25, 0.125)


@dataclass
class GuardResult:
    kept: list[str] = field(default_factory=list)  # joint-graph nodes marked MUST_SAVE
    bytes: int = 0                                   # their storage

    def message(self) -> str:
        if not self.kept:
            return ""
        return (f"recompute guard: keeps {len(self.kept)} tensors ({self.bytes / 2**20:.0f} MiB) the knapsack would "
                "recompute in one chain across layers, alive at once in backward")


def reads_far(node: fx.Node, position: dict[fx.Node, int], reach: float = REACH,
              readers: Sequence[fx.Node] | None = None) -> bool:
    """Whether ``node``'s last reader (of ``readers``, by default its users) is more than ``reach``
    of its graph (``position``: every node's index) after it."""
    readers = list(node.users) if readers is None else readers
    return bool(readers) and max(position[u] for u in readers) - position[node] > reach * len(position)


def far_recomputed(saved: SavedSet, joint: fx.GraphModule, reach: float = REACH,
                   random_only: bool = False) -> list[fx.Node]:
    """The joint graph's storages that ``saved``'s backward recomputes and reads again more than
    ``reach`` of its length later (floating-point, computed from tensors), in graph order;
    ``random_only``: only those it recomputes from regenerated random numbers."""
    bwd = list(saved.bwd.graph.nodes)
    position = {n: i for i, n in enumerate(bwd)}
    tangent: set[fx.Node] = set()
    random: set[fx.Node] = set()
    for node in bwd:
        if is_joint_tangent(node) or any(a in tangent for a in node.all_input_nodes):
            tangent.add(node)
        if _is_random(node) or any(a in random for a in node.all_input_nodes):
            random.add(node)
    joint_nodes = {n.name: n for n in joint.graph.nodes}
    far: dict[fx.Node, None] = {}
    for node in bwd:
        if node.op != "call_function" or node in tangent or node.name not in joint_nodes or \
                (random_only and node not in random) or not reads_far(node, position, reach):
            continue
        base = alias_base(joint_nodes[node.name])
        val = tensor_val(base)
        if base.op != "call_function" or is_joint_primal(base) or val is None or not val.is_floating_point() or \
                not any(tensor_val(a) is not None for a in base.all_input_nodes):
            continue
        far[base] = None
    order = {n: i for i, n in enumerate(joint.graph.nodes)}
    return sorted(far, key=order.__getitem__)


def _is_random(node: fx.Node) -> bool:
    """A random op: aten's seeded ones (dropout, rand...) or inductor's seed and philox prims.
    Not attention: its ops carry the seeded tag for their ``dropout_p``, and a chain through them
    regenerates no mask here (a model without dropout, Llama, would count as random)."""
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.__name__.split(".")[0]
    if "attention" in name:
        return False
    return torch.Tag.nondeterministic_seeded in target.tags or target.namespace == "prims" and \
        name in ("inductor_random", "inductor_randint", "inductor_seeds", "inductor_lookup_seed")


def guard_recompute_chains(joint: fx.GraphModule, probe: Callable[[fx.GraphModule], SavedSet]) -> GuardResult:
    """Mark, in ``joint``, what ``far_recomputed`` finds at each of ``BUDGETS`` ``MUST_SAVE``
    (``probe(gm)`` partitions ``gm`` under the ambient budget)."""
    result = GuardResult()
    with recompute_budget(1.0):  # what the default partition already recomputes far away stays as it is
        default = set(far_recomputed(probe(joint), joint, random_only=True))
    for budget in BUDGETS:
        with recompute_budget(budget):
            far = [n for n in far_recomputed(probe(joint), joint, random_only=True)
                   if n.meta.get("recompute") != CheckpointPolicy.MUST_SAVE and n not in default]
        for node in far:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            result.kept.append(node.name)
            result.bytes += nbytes(node)
    return result


def guard_joint(joint: fx.GraphModule, joint_inputs: Sequence[Any], partition: PartitionFn, num_fwd_outputs: int,
                partition_kwargs: dict[str, Any], cache: bool) -> GuardResult:
    """``guard_recompute_chains`` on the joint graph the backend partitions; ``cache``: read and
    write the marks in the plan cache."""
    key = plan_cache.key_of({"kind": "guard", "graph": plan_cache.graph_fingerprint(joint.graph, joint_inputs),
                             "reach": REACH, "budgets": BUDGETS}) if cache else None
    found = plan_cache.load("guard", key) if key else None
    nodes = {n.name: n for n in joint.graph.nodes}
    if found is not None and isinstance(found.get("kept"), list) and all(k in nodes for k in found["kept"]):
        result = GuardResult()
        for name in found["kept"]:
            nodes[name].meta["recompute"] = CheckpointPolicy.MUST_SAVE
            result.kept.append(name)
            result.bytes += nbytes(nodes[name])
        return result
    result = guard_recompute_chains(joint, lambda gm: probe_partition(gm, joint_inputs, partition, num_fwd_outputs,
                                                                     **partition_kwargs))
    if key:
        plan_cache.store("guard", key, {"kept": result.kept})
    return result


def save_random_values(joint: fx.GraphModule) -> int:
    """Mark every random value of ``joint`` ``MUST_SAVE``; returns how many.  For graphs run
    without inductor's code generation (``compiler="eager"``): there inductor's random prims
    ignore their seed, so a mask the partition regenerates in backward is not forward's (a wrong
    gradient through dropout); saved, backward reads forward's."""
    marked = 0
    for node in joint.graph.nodes:
        if _is_random(node) and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].dim() > 0:
            node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
            marked += 1
    return marked
