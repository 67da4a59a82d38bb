"""Capture the joint forward+backward graph AOTAutograd hands to inductor's partitioner, with the
state inputs the backend lifts (so ``transform`` sees exactly what the backend's pass sees)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from . import _compat
from .naming import ParamNames
from .passes.graph_utils import clone_graph_module

__all__ = ["JointGraph", "trace_joint"]


@dataclass
class JointGraph:
    """A joint graph with what partitioning it needs (as inductor's partitioner receives it).

    Its last primals are the state inputs (one per weight matrix, see ``state.py``); run the
    graph with ``state_inputs`` (or, after ``transform``, with ``gm.velora_state_inputs``)."""

    gm: fx.GraphModule
    joint_inputs: Sequence[Any]
    num_fwd_outputs: int
    param_indices: list[int]
    partition_kwargs: dict[str, Any] = field(default_factory=dict)
    primal_labels: list[str | None] | None = None
    params: list[Tensor | None] = field(default_factory=list)       # the real weight of each primal
    state_index: dict[int, int] = field(default_factory=dict)       # weight primal -> state primal
    real_inputs: list[Any] | None = None                            # real values of every primal
    names: ParamNames | None = None

    @property
    def state_inputs(self) -> list[Tensor]:
        return [self.real_inputs[i] for i in sorted(self.state_index.values())] if self.real_inputs else []


def trace_joint(module: torch.nn.Module, *example_inputs: Any, dynamic: bool | None = False) -> JointGraph:
    """The joint graph of ``module(*example_inputs)`` after inductor's decompositions and joint
    passes — exactly what the backend's pass sees.  The module must compile to a single graph."""
    from .backend import VeloraBackend

    graphs: list[JointGraph] = []

    class _Capture(VeloraBackend):
        def partition(self, partitioner, gm, joint_inputs, **kwargs):
            num_fwd_outputs = kwargs.pop("num_fwd_outputs")
            lifted = partitioner.lifted
            graphs.append(JointGraph(
                clone_graph_module(gm), joint_inputs, num_fwd_outputs,
                partitioner.param_indices, dict(kwargs),
                list(partitioner.labels), list(partitioner.params), dict(lifted.state_index) if lifted else {},
                list(lifted.real_inputs) if lifted else None, partitioner.names))
            return _compat.min_cut_rematerialization_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                               **kwargs)

    capture = _Capture(compiler="eager")
    _compat.reset_dynamo()
    with torch.enable_grad():
        torch.compile(module, backend=capture, dynamic=dynamic, fullgraph=True)(*example_inputs)
    if len(graphs) != 1:
        raise RuntimeError(f"expected one training graph, captured {len(graphs)} (does any parameter require grad?)")
    return graphs[0]
