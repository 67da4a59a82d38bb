"""What each codec decision offers ``memory_budget``: one ``Candidate`` per saved tensor a codec can
compress — the decision it commits, the storages it frees, the bytes that frees, the time it costs
and the gradient error it adds.  VeLoRA/RMM decisions (``planner.Decision``) and element-wise ones
(few-bit, gated: ``codec_plan.CodecDecision``) propose the same way: each has ``encode_at``,
``saved_forms``, ``code_bytes(shape, dtype, config)`` and ``error_reach(producers)``.

Time is estimated from the codec's own traffic at the device's memory bandwidth
(``_compat.device_roofline``), not by ``step_cost`` on a rewritten graph: the latter needs a
partition of the whole graph per candidate (a min-cut of every node, 1-10 s on a 12-layer model),
which is what choosing per tensor is meant to avoid.  The traffic is counted as ``step_cost``
counts it, so that the prices predict the score the plans are then compared by: the encode writes
the codes and backward reads them (2 x their bytes); the encode's read of the tensor and the
decode's write of it take the place of the saving write and the backward read the baseline paid
for the saved tensor, and add nothing.  (On the 2-layer gated MLP of the tests, a subset chosen
this way scored within a few percent of what these prices predicted; counting the tensor's bytes
as well made every codec look 2-3x dearer than ``step_cost`` then found it.)  RMM's sketch matmuls
are not counted (their FLOPs are ~ratio x one weight-gradient matmul).  The time is a ratio to the
baseline partition's estimated step, the unit ``budget.choose_plan`` scores plans in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .._compat import device_roofline, int_hint, is_joint_primal
from ..config import VeloraConfig
from .graph_utils import CASTS, FORWARD_MATMULS, VIEW_LIKE, near_inputs, strip_views, tensor_val
from .partition_probe import SavedSet

__all__ = ["Candidate", "propose", "error_weights"]


@dataclass(frozen=True)
class Candidate:
    """Compress one saved tensor with one codec (``decision``: what choosing it commits)."""

    decision: Any                # planner.Decision | codec_plan.CodecDecision
    tensor: str                  # the joint-graph node it encodes
    codec: str
    frees: tuple[str, ...]       # the saved storages (base names) it replaces
    bytes_freed: int             # their bytes in the partition it was planned against, minus its codes
    time_ratio: float            # its encode/decode traffic's time / the baseline step's estimated time
    error: float                 # its estimated error x the share of trained weights it reaches

    def price(self, error_cost: float) -> float:
        """Estimated cost (time ratio + ``error_cost`` x error) per byte freed (inf: frees none)."""
        if self.bytes_freed <= 0:
            return math.inf
        return (self.time_ratio + error_cost * self.error) / self.bytes_freed


def propose(decisions: Sequence[Any], partition_of: Callable[[Any], SavedSet], nodes: dict[str, fx.Node],
            config: VeloraConfig, base_seconds: float, weight: Callable[[Any], float]) -> list[Candidate]:
    """A candidate per compressing decision.  ``partition_of(d)``: the partition ``d`` was planned
    against (its saved bytes are what compressing frees); ``base_seconds``: the baseline step's
    estimated time; ``weight(d)``: the share of the trained weights ``d``'s error reaches."""
    out = []
    for d in decisions:
        val = tensor_val(nodes[d.encode_at])
        shape = tuple(int_hint(s) for s in val.shape)
        partition = partition_of(d)
        names = set(d.saved_forms)
        frees = tuple(sorted({base for saved, base in partition.activations.items()
                              if saved in names or base in names}))
        tensor_bytes = sum(partition.base_bytes[b] for b in frees)
        if all(isinstance(s, int) for s in shape):
            codes = d.code_bytes(shape, val.dtype, config)
            seconds = 2 * codes / device_roofline(val.device, val.dtype)[1]
        else:  # symbolic sizes: no prediction, never chosen on price
            codes, seconds = tensor_bytes, 0.0
        out.append(Candidate(d, d.encode_at, d.codec_name, frees, tensor_bytes - codes,
                             seconds / (base_seconds or 1.0), weight(d) * float(d.estimated_error)))
    return out


def error_weights(gm: fx.GraphModule, param_indices: Sequence[int], weight_share: Callable[[list], float],
                  nodes: dict[str, fx.Node]) -> Callable[[Any], float]:
    """How much of the model a codec's error reaches: the share of the trained weights whose
    gradient it approximates (a VeLoRA/RMM site's weights; for a nonlinearity's codes, the weights
    of the matmuls that produce its input, whose gradients its derivative multiplies)."""
    primal_index = {n: i for i, n in enumerate(n for n in gm.graph.nodes if is_joint_primal(n))}
    params = set(param_indices)

    def producers(name: str) -> list["_ParamRef"]:
        """The trained weights of the forward matmuls a few cheap ops above ``name``."""
        matmuls = [nodes[n] for n in near_inputs(nodes[name], depth=6, stop=FORWARD_MATMULS)
                   if nodes[n].op == "call_function" and nodes[n].target in FORWARD_MATMULS]
        roots = (strip_views(arg, VIEW_LIKE | CASTS)[0] for m in matmuls for arg in m.all_input_nodes)
        return [_ParamRef(i) for i in sorted({primal_index.get(r) for r in roots} & params)]

    return lambda d: weight_share(d.error_reach(producers))


@dataclass(frozen=True)
class _ParamRef:
    param_index: int
