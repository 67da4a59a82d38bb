"""Ask the real partitioner what a joint graph would save (on a copy, so the graph stays intact)."""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from .._compat import is_joint_primal
from .graph_utils import clone_graph_module, nbytes, output_values, tensor_val

__all__ = ["SavedSet", "probe_partition"]

PartitionFn = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


@dataclass
class SavedSet:
    """Tensors the forward graph hands to backward, by joint-graph node name.

    Memory is counted per storage: a saved view (a q slice of a fused qkv output, a transpose)
    costs its base tensor's bytes, once however many views of it are saved."""

    activations: dict[str, str]   # saved non-input tensor -> name of the base it aliases
    inputs: dict[str, str]        # saved graph inputs (parameters, caller-held inputs) -> base
    base_bytes: dict[str, int]    # base name -> bytes
    fwd: fx.GraphModule
    bwd: fx.GraphModule

    @property
    def activation_bytes(self) -> int:
        return sum(self.base_bytes[b] for b in set(self.activations.values()))

    def _saved(self):
        yield from self.activations.items()
        yield from self.inputs.items()

    def bytes_of(self, names: Sequence[str], inputs: bool = True) -> int:
        """Bytes of the storages of ``names`` that are saved, directly or through a view
        (``inputs=False``: activations only; graph inputs live anyway)."""
        names = set(names)
        pairs = self._saved() if inputs else self.activations.items()
        bases = {base for saved, base in pairs if saved in names or base in names}
        return sum(self.base_bytes[b] for b in bases)

    def which(self, names: Sequence[str]) -> list[str]:
        """The saved tensors that are ``names`` or views of them."""
        names = set(names)
        return [saved for saved, base in self._saved() if saved in names or base in names]


def probe_partition(joint: fx.GraphModule, joint_inputs: Sequence[Any], partition: PartitionFn,
                    num_fwd_outputs: int, **kwargs: Any) -> SavedSet:
    gm = clone_graph_module(joint)
    fwd, bwd = partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    activations, inputs, base_bytes = {}, {}, {}
    for node in output_values(fwd)[num_fwd_outputs:]:
        if not isinstance(node, fx.Node) or tensor_val(node) is None:
            continue
        base = alias_base(node)
        base_bytes[base.name] = nbytes(base)
        (inputs if is_joint_primal(base) else activations)[node.name] = base.name
    return SavedSet(activations, inputs, base_bytes, fwd, bwd)


def alias_base(node: fx.Node) -> fx.Node:
    """The tensor whose storage ``node`` views (itself if it owns its storage), following the
    ops' schemas: an output with alias info (view, transpose, split...) shares its input's storage."""
    while node.op == "call_function":
        if node.target is operator.getitem:
            parent = node.args[0]
            if not _returns_alias(parent):
                break
            node = parent.args[0]
        elif _returns_alias(node):
            node = node.args[0]
        else:
            break
    return node


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write
