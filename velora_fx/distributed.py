"""One plan and one v on every rank (DDP / FSDP2 under torch.distributed).

Each rank compiles its own graphs from its own first batch, so ``auto``'s per-site choices
(estimated errors) and the compile-time ``first_batch`` v would differ between ranks.  Rank 0
decides: the other ranks wait for rank 0's plan and adopt it as their sticky plan before running
the pass, and after it every rank takes rank 0's state tensors.  Rank 0's first batch is one
sample of the same distribution every rank draws from, and broadcasting (rather than averaging)
keeps the rule "the paper's first batch" literal.  Ranks compile the same graphs in the same
order (SPMD), so the collectives match.  The in-graph rules ``batch`` and ``ema`` still update v
from each rank's own batch every step: they are not synchronised (documented limitation).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._compat import real_tensors
from .state import ModelState

__all__ = ["active", "adopt_rank0_plan", "share_plan", "share_state"]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def adopt_rank0_plan(model: ModelState) -> None:
    """Ranks > 0: wait for rank 0's plan of this graph and make it theirs (sticky)."""
    if active() and dist.get_rank() != 0:
        received = [None]
        with real_tensors():  # the partition step runs under AOTAutograd's fake mode
            dist.broadcast_object_list(received, src=0)
        model.plan.update(received[0])


def share_plan(model: ModelState) -> None:
    """Rank 0: send its plan after planning (pairs with ``adopt_rank0_plan``)."""
    if active() and dist.get_rank() == 0:
        with real_tensors():
            dist.broadcast_object_list([dict(model.plan)], src=0)


def share_state(model: ModelState) -> None:
    """Every rank: take rank 0's state tensors (v), in slot-name order."""
    if not active():
        return
    seen: set[int] = set()
    for slot in sorted(model.slots.values(), key=lambda s: s.name):
        tensor = slot.tensor
        if tensor is None or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        with torch.no_grad(), real_tensors():
            dist.broadcast(tensor, src=0)
