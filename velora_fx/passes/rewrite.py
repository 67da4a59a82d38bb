"""Rewrite: encode an activation in forward, decode it for its weight-gradient matmuls only.

Invariants (see README.md here): new nodes carry a fresh ``meta["val"]``, are inserted in
topological order (encode right after the activation, decode right before each consumer), and
the encoded tensors are tagged MUST_SAVE so the partitioner keeps them rather than the activation.
Only the chosen weight-gradient matmul's operand changes: forward outputs, input gradients and
bias gradients keep reading the exact activation.
"""
from __future__ import annotations

import torch.fx as fx

from .._compat import CheckpointPolicy
from ..codecs.base import Codec
from .graph_utils import create_node
from .sites import Site

__all__ = ["rewrite_group"]

_TAGS = ("partitioner_tag", "seq_nr", "fwd_nn_module_stack")


def rewrite_group(gm: fx.GraphModule, activation_name: str, sites: list[Site], codec: Codec,
                  site_key: str) -> list[str]:
    """Rewrite one activation group in place; returns the names of all encode nodes (the
    tensors meant to be saved come last)."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    activation = nodes[activation_name]
    before = set(graph.nodes)
    with graph.inserting_before(activation.next):  # keeps the encode nodes in order
        saved = codec.encode(graph, activation, site_key)
    encode_nodes = [n for n in graph.nodes if n not in before]
    # the encoded tensors are what backward reads: ask the partitioner to save them (it may still
    # compute them in backward when the activation is kept anyway; the pipeline checks that)
    for node in saved:
        node.meta["recompute"] = CheckpointPolicy.MUST_SAVE
    for site in sites:
        matmul = nodes[site.grad_matmul]
        known = set(graph.nodes)
        with graph.inserting_before(matmul):
            rebuilt = codec.decode(graph, saved, activation)
            mapping = {activation: rebuilt}
            for name in site.chain:  # replay the views/transposes on the reconstruction
                original = nodes[name]
                args, kwargs = fx.node.map_arg((original.args, original.kwargs), lambda n: mapping.get(n, n))
                mapping[original] = create_node(graph, original.target, args, kwargs, like=original)
        # decode is tangent-free, so min-cut could run it in forward and save the full-size
        # reconstruction: pin it (and the replayed views) to backward
        for node in graph.nodes:
            if node not in known:
                _copy_tags(matmul, node)
                node.meta["partitioner_tag"] = "must_be_in_backward"
        operand = matmul.args[site.operand_index]
        new_args = list(matmul.args)
        new_args[site.operand_index] = mapping[operand] if site.chain else rebuilt
        matmul.args = tuple(new_args)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return [n.name for n in encode_nodes]


def _copy_tags(src: fx.Node, dst: fx.Node) -> None:
    for key in _TAGS:
        if key in src.meta:
            dst.meta[key] = src.meta[key]
