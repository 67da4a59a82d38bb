"""Rewrite: encode an activation in forward, decode it for its weight-gradient matmuls only.

Invariants (see README.md here): new nodes carry a fresh ``meta["val"]``, are inserted in
topological order (encode right after the activation, decode right before each consumer), and
the encoded tensors are tagged MUST_SAVE so the partitioner keeps them rather than the activation.
Only the chosen weight-gradient matmul's operand changes: forward outputs, input gradients and
bias gradients keep reading the exact activation.  State updates are functional values; the
pipeline writes each weight's final state back with one ``copy_`` (see ``store_states``).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .._compat import CheckpointPolicy
from ..codecs.velora import StateRow
from .graph_utils import FORWARD_MATMULS, create_node, view_forms
from .sites import Site

__all__ = ["rewrite_group", "store_states"]


def _first_matmul_reading(activation: fx.Node) -> fx.Node | None:
    """The first matmul (in graph order: the forward one) that reads the activation or a view of
    it.  A codec may encode after it (``encodes_after_forward_matmul``): inductor lowers nodes in
    graph order, so the matmul then realises the activation before the encode reads it."""
    readers = [u for form in view_forms(activation) for u in form.users if u.target in FORWARD_MATMULS]
    if not readers:
        return None
    order = {n: i for i, n in enumerate(activation.graph.nodes)}
    return min(readers, key=order.__getitem__)

_TAGS = ("partitioner_tag", "seq_nr", "fwd_nn_module_stack")


def rewrite_group(gm: fx.GraphModule, activation_name: str, sites: list[Site], codec, state: StateRow | None
                  ) -> tuple[list[str], list[str], fx.Node | None]:
    """Rewrite one activation group in place.  Returns the names of its forward (encode) nodes,
    of the nodes meant to be saved, and the node holding the weight's updated state (None if the
    state is not updated)."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    activation = nodes[activation_name]
    before = set(graph.nodes)
    insert_at = activation.next
    while insert_at.op == "placeholder":  # a graph input: encode after every input is defined
        insert_at = insert_at.next
    forward_matmul = _first_matmul_reading(activation)
    if forward_matmul is not None and getattr(codec, "encodes_after_forward_matmul", lambda _: False)(activation):
        insert_at = forward_matmul.next
    if state is not None and state.tensor.op != "placeholder" and _comes_after(state.tensor, insert_at.prev):
        insert_at = state.tensor.next  # an earlier update of the same weight's state, later in the graph
    with graph.inserting_before(insert_at):
        saved, new_state = codec.encode(graph, activation, state)
    encode_nodes = [n for n in graph.nodes if n not in before]
    # the encoded tensors are what backward reads: ask the partitioner to save them (it may still
    # compute them in backward when the activation is kept anyway; the pipeline checks that)
    for node in saved:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    factored = getattr(codec, "factored_matmul", None)
    for site in sites:
        matmul = nodes[site.grad_matmul]
        known = set(graph.nodes)
        with graph.inserting_before(matmul):
            direct = factored(graph, saved, activation, matmul, site.operand_index, [nodes[n] for n in site.chain]) \
                if factored is not None else None
        if direct is not None:  # the weight gradient from the encoded form itself (no reconstruction)
            _pin_to_backward(graph, known, matmul)
            matmul.replace_all_uses_with(direct)
            graph.erase_node(matmul)
            continue
        with graph.inserting_before(matmul):
            rebuilt = codec.decode(graph, saved, activation)
            mapping = {activation: rebuilt}
            for name in site.chain:  # replay the views/transposes on the reconstruction
                original = nodes[name]
                args, kwargs = fx.node.map_arg((original.args, original.kwargs), lambda n: mapping.get(n, n))
                mapping[original] = create_node(graph, original.target, args, kwargs, like=original)
        _pin_to_backward(graph, known, matmul)
        operand = matmul.args[site.operand_index]
        new_args = list(matmul.args)
        new_args[site.operand_index] = mapping[operand] if site.chain else rebuilt
        matmul.args = tuple(new_args)
    return [n.name for n in encode_nodes], [n.name for n in saved], new_state


def store_states(gm: fx.GraphModule, updates: dict[fx.Node, fx.Node]) -> list[str]:
    """Write each state placeholder's final value back in place (``copy_`` right after it is
    computed; the partitioner keeps mutations in forward).  Returns the copy nodes' names."""
    graph = gm.graph
    names = []
    for placeholder, value in updates.items():
        with graph.inserting_after(value):
            copy = graph.call_function(torch.ops.aten.copy_.default, (placeholder, value))
        copy.meta["val"] = placeholder.meta["val"]
        names.append(copy.name)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return names


def _comes_after(a: fx.Node, b: fx.Node) -> bool:
    node = b.next
    while node.op != "root":
        if node is a:
            return True
        node = node.next
    return False


def _pin_to_backward(graph: fx.Graph, known: set[fx.Node], matmul: fx.Node) -> None:
    """Tag the nodes added since ``known`` like ``matmul`` and pin them to backward: a decode (or a
    matmul on the coefficients) is tangent-free where it reads only saved tensors, so min-cut could
    run it in forward and save its full-size result."""
    for node in graph.nodes:
        if node not in known:
            _copy_tags(matmul, node)
            node.meta["partitioner_tag"] = "must_be_in_backward"


def _copy_tags(src: fx.Node, dst: fx.Node) -> None:
    for key in _TAGS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
