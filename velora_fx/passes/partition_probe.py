"""Ask the real partitioner what a joint graph would save (on a copy, so the graph stays intact)."""
from __future__ import annotations

from .graph_utils import clone_graph_module
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .._compat import is_joint_primal
from .graph_utils import nbytes, output_values, tensor_val

__all__ = ["SavedSet", "probe_partition"]

PartitionFn = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


@dataclass
class SavedSet:
    """Tensors the forward graph hands to backward, by joint-graph node name."""

    activations: dict[str, int]   # non-input saved tensors -> bytes
    inputs: dict[str, int]        # saved graph inputs (parameters, caller-held inputs) -> bytes
    fwd: fx.GraphModule
    bwd: fx.GraphModule

    @property
    def activation_bytes(self) -> int:
        return sum(self.activations.values())

    def bytes_of(self, names: Sequence[str]) -> int:
        return sum(self.activations.get(n, 0) + self.inputs.get(n, 0) for n in names)

    def which(self, names: Sequence[str]) -> list[str]:
        return [n for n in names if n in self.activations or n in self.inputs]


def probe_partition(joint: fx.GraphModule, joint_inputs: Sequence[Any], partition: PartitionFn,
                    num_fwd_outputs: int, **kwargs: Any) -> SavedSet:
    gm = clone_graph_module(joint)
    fwd, bwd = partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    activations, inputs = {}, {}
    for node in output_values(fwd)[num_fwd_outputs:]:
        if not isinstance(node, fx.Node) or tensor_val(node) is None:
            continue
        (inputs if is_joint_primal(node) else activations)[node.name] = nbytes(node)
    return SavedSet(activations, inputs, fwd, bwd)
