"""Capture the joint forward+backward graph AOTAutograd hands to inductor's partitioner."""
from __future__ import annotations

from .passes.graph_utils import clone_graph_module
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import _compat

__all__ = ["JointGraph", "trace_joint"]


@dataclass
class JointGraph:
    """A joint graph with what partitioning it needs (as inductor's partitioner receives it)."""

    gm: fx.GraphModule
    joint_inputs: Sequence[Any]
    num_fwd_outputs: int
    param_indices: list[int]
    partition_kwargs: dict[str, Any] = field(default_factory=dict)
    primal_labels: list[str | None] | None = None


class _Capture(_compat.CustomPartitionerFn):
    def __init__(self, param_indices: list[int], labels: list[str | None]) -> None:
        self.param_indices, self.labels, self.graphs = param_indices, labels, []

    def __call__(self, gm, joint_inputs, **kwargs):
        num_fwd_outputs = kwargs.pop("num_fwd_outputs")
        self.graphs.append(JointGraph(clone_graph_module(gm), joint_inputs, num_fwd_outputs, list(self.param_indices),
                                      dict(kwargs), list(self.labels)))
        return _compat.min_cut_rematerialization_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

    def uuid(self):
        return None


def trace_joint(module: torch.nn.Module, *example_inputs: Any, dynamic: bool | None = False) -> JointGraph:
    """The joint graph of ``module(*example_inputs)`` after inductor's decompositions and joint
    passes — exactly what the backend's pass sees.  The module must compile to a single graph."""
    from .backend import _parameter_indices, _primal_labels

    captures: list[_Capture] = []

    def capture_backend(gm: fx.GraphModule, inputs: Sequence[Any]):
        capture = _Capture(_parameter_indices(inputs), _primal_labels(gm))
        captures.append(capture)
        compiler = _compat.aot_autograd(fw_compiler=_compat.boxed_nop_compiler, bw_compiler=_compat.boxed_nop_compiler,
                                        partition_fn=_compat.inductor_partition_fn,
                                        decompositions=_compat.select_decomp_table())
        with _compat.custom_partitioner(capture):
            return compiler(gm, inputs)

    torch._dynamo.reset()
    with torch.enable_grad():
        torch.compile(module, backend=capture_backend, dynamic=dynamic, fullgraph=True)(*example_inputs)
    graphs = [g for c in captures for g in c.graphs]
    if len(graphs) != 1:
        raise RuntimeError(f"expected one training graph, captured {len(graphs)} (does any parameter require grad?)")
    return graphs[0]
