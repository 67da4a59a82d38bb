"""Put an ``OffloadPlan`` into the partitioned forward and backward graphs (in place).

Forward: ``offload_start`` after the tensor's last forward reader, ``offload_finish`` where the plan
says the copy has ended; forward returns the host tensor in the saved tensor's place (the same
position, so AOTAutograd's bookkeeping is unchanged).  Backward: its placeholder now holds the host
tensor; ``reload_start`` where the plan starts the copy back, ``reload_finish`` right before the
first reader, whose readers then read the reloaded tensor.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..passes.graph_utils import create_node, is_transfer, tensor_val
from . import ops as _ops  # noqa: F401  (registers torch.ops.velora_fx.offload_*)
from .plan import OffloadPlan

__all__ = ["apply_offload", "transfer_labels", "has_transfers"]


def apply_offload(fwd: fx.GraphModule, bwd: fx.GraphModule, plan: OffloadPlan, label: str = "") -> None:
    """``label``: a prefix naming this graph's transfers (``transfer_labels``) for ``ops.measured``."""
    f_nodes = {n.name: n for n in fwd.graph.nodes}
    b_nodes = {n.name: n for n in bwd.graph.nodes}
    output = fwd.graph.find_nodes(op="output")[0]
    replaced: dict[fx.Node, fx.Node] = {}
    for choice in plan.chosen:
        node = f_nodes[choice.name]
        with fwd.graph.inserting_after(f_nodes[choice.start_after]):
            ticket = create_node(fwd.graph, torch.ops.velora_fx.offload_start.default,
                                 (node, transfer_labels(label, choice.name)[0]))
        finish_after = f_nodes[choice.finish_after]
        order = {n: i for i, n in enumerate(fwd.graph.nodes)}
        if order[finish_after] < order[ticket]:
            finish_after = ticket
        with fwd.graph.inserting_after(finish_after):
            host = create_node(fwd.graph, torch.ops.velora_fx.offload_finish.default, (ticket, node))
        replaced[node] = host

        placeholder = b_nodes[choice.name]
        device = tensor_val(placeholder).device
        placeholder.meta["val"] = host.meta["val"]
        placeholder.meta.pop("tensor_meta", None)
        readers = list(placeholder.users)
        with bwd.graph.inserting_before(_after_placeholders(bwd, b_nodes[choice.reload_before])):
            back = create_node(bwd.graph, torch.ops.velora_fx.reload_start.default,
                               (placeholder, device, transfer_labels(label, choice.name)[1]))
        with bwd.graph.inserting_before(b_nodes[choice.first_use]):
            value = create_node(bwd.graph, torch.ops.velora_fx.reload_finish.default, (back, placeholder, device))
        for reader in readers:
            reader.replace_input_with(placeholder, value)
    output.args = (tuple(replaced.get(n, n) if isinstance(n, fx.Node) else n for n in output.args[0]),) \
        + tuple(output.args[1:])
    for gm in (fwd, bwd):
        gm.graph.lint()
        gm.recompile()


def has_transfers(gm: fx.GraphModule) -> bool:
    """Whether ``gm`` holds one of the transfer ops (its op order is then the plan's: see
    ``_compat.inner_compile_keeping_order``)."""
    return any(node.op == "call_function" and is_transfer(node) for node in gm.graph.nodes)


def transfer_labels(label: str, tensor: str) -> tuple[str, str]:
    """The labels of a tensor's copy to the host and back (empty without a graph label: unmeasured)."""
    return (f"{label}/{tensor}/out", f"{label}/{tensor}/back") if label else ("", "")


def _after_placeholders(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """``node``, or the first node after the placeholders if ``node`` is one."""
    if node.op != "placeholder":
        return node
    return next(n for n in gm.graph.nodes if n.op != "placeholder")
