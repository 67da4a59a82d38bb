"""One plan and one v on every rank (DDP, FSDP2: data parallel under torch.distributed).

Each rank compiles its own graphs from its own first batch, so ``auto``'s per-site choices
(estimated errors) and the compile-time ``first_batch`` v would differ between ranks. Rank 0
decides. Plan: ranks > 0 wait for rank 0's plan of each graph and adopt it as their sticky plan
before running the pass; it travels through the process group's key-value store, keyed by
backend and graph, not by a collective, because the partition step runs in the middle of the
model's own collectives (broadcasts there hung 2-process gloo runs now and then). State: the
first call of a compiled graph with a set of weights (``binding.StateBinder``) sets the v those
weights lack from this rank's batch, then takes rank 0's state tensors, eagerly, before it runs: a
v set at compile time from each rank's own batch, at the first call (DDPOptimizer compiles its
bucket subgraphs on fake inputs; dynamo reuses one block's graph for the others under
``torch.compile(DDP(model))``), or loaded, becomes rank 0's before any gradient uses it.  Rank 0's
first batch is one sample of the distribution every rank draws from, and broadcasting (rather than
averaging) keeps the rule "the paper's first batch" literal.  So ``state_dict()`` is the same on
every rank from the first step, and rank 0's report is the one that explains the plan (the others
list its decisions as kept from the model's first plan, with estimated errors from their own batch).

The in-graph rules ``batch`` and ``ema:<d>`` update v from the batch every step; their statistic
(the mean sub-token) is averaged over ranks in graph (``emit_rank_mean``: one functional
all-reduce of g floats per site per step, in forward), so v stays identical on every rank and is
the v of the global batch.

Under FSDP2 (``fully_shard``) its hooks are not traced: every FSDP unit is its own graph, whose
weights are the all-gathered parameters FSDP puts on the module for the call (stable objects, so
state is keyed by them; ``load_state_dict`` before the first compile holds entries for the
sharded parameters by name until a graph binds them).  Byte counts are per rank and per graph:
the activations of this rank's batch that the graph saves for backward.  The all-gathered
weights (freed and re-gathered by FSDP itself) and the unit's input are graph inputs and are not
counted, nor are the sharded gradients and optimizer state; the state tensors are per unsharded
weight, on every rank (``2 × (2 + max(W.shape))`` fp32).

Assumptions: SPMD data parallelism over the default process group: every rank creates its
backends and compiles and runs the same graphs in the same order (a backend or a graph on some
ranks only, e.g. ``velora_fx.explain`` on rank 0 alone, shifts the plan keys: ranks > 0 would
wait for a plan that never comes, until the store's timeout).
"""
from __future__ import annotations

import pickle
from typing import Iterable

import torch
import torch.distributed as dist
import torch.fx as fx

from . import _compat
from .state import ModelState

__all__ = ["active", "is_sharded", "adopt_rank0_plan", "share_plan", "share_tensors", "emit_rank_mean"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_sharded(x: object) -> bool:
    """A DTensor: what FSDP2 leaves on a module between its calls (compiled graphs see the
    all-gathered plain parameter instead)."""
    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def adopt_rank0_plan(model: ModelState, graph: str) -> None:
    """Ranks > 0: wait for rank 0's plan of this graph and make it theirs (sticky).

    Through the process group's key-value store, not a collective: the partition step runs in
    the middle of the model's own collectives (DDP's, FSDP's), and rank 0 never waits."""
    if active() and dist.get_rank() != 0:
        model.plan.update(pickle.loads(_compat.default_store().get(_plan_key(graph))))


def share_plan(model: ModelState, graph: str) -> None:
    """Rank 0: publish its plan of this graph after planning (``adopt_rank0_plan`` reads it)."""
    if active() and dist.get_rank() == 0:
        _compat.default_store().set(_plan_key(graph), pickle.dumps(dict(model.plan)))


def _plan_key(graph: str) -> str:
    return f"velora_fx/plan/{graph}"


def share_tensors(tensors: Iterable[torch.Tensor | None]) -> None:
    """Every rank: overwrite these state tensors with rank 0's (same order on every rank; eager,
    at a graph's first call, never inside a compile)."""
    if not active():
        return
    seen: set[int] = set()
    for tensor in tensors:
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        with torch.no_grad():
            dist.broadcast(tensor, src=0)


def emit_rank_mean(graph: fx.Graph, stat: fx.Node) -> fx.Node:
    """``stat`` averaged over all ranks, in graph (a functional all-reduce that AOTAutograd and
    inductor treat as an ordinary op; gloo has no AVG, hence sum / world size); ``stat`` itself
    outside torch.distributed."""
    if not active():
        return stat
    from .passes.graph_utils import create_node

    all_reduce, wait = _compat.functional_all_reduce_sum()
    total = create_node(graph, all_reduce, (stat, "sum", _compat.world_group_name()))
    total = create_node(graph, wait, (total,))
    return create_node(graph, torch.ops.aten.div.Tensor, (total, float(dist.get_world_size())))
