"""Stored sites: a matmul output that backward reads only through elementwise formulas.

In a gated MLP, ``h = act(g) * u``: backward reads ``g`` (for ``act(g)`` and ``act'(g)``) and ``u``
(for ``grad_h * u``) in pointwise ops only, and no weight gradient reads them (those read the MLP
input).  Such a tensor can be stored lossily (the ``gated`` codec) without touching a weight
gradient or any forward value.  Backward users are told from forward ones structurally: a user
that no forward output depends on is backward work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from .._compat import CheckpointPolicy
from .graph_utils import (VIEW_LIKE, ancestors, FORWARD_MATMULS, JointFlags, is_elementwise, output_values, tensor_val,
                          view_forms)
from .pointwise_sites import site_name

__all__ = ["StoredSite", "find_stored_sites"]


@dataclass
class StoredSite:
    """One matmul output, its view forms, and the backward nodes that read them."""

    name: str                 # module path of the projection that computes it
    encode_at: str            # the matmul output (root of the forms)
    forms: list[str] = field(default_factory=list)
    derived: list[str] = field(default_factory=list)  # forward values computed elementwise from it alone
                                                      # (sigmoid(g), silu(g)), in graph order
    readers: dict[str, list[str]] = field(default_factory=dict)  # form or derived -> backward readers
    anchor: int = -1          # index of the forward output its codes are tied to (see stored_plan)
    unsupported: str | None = None
    function: str = "int8"    # what the report shows as the op
    domain: str = "stored"
    input_forms: list[str] = field(default_factory=list)  # (the pointwise pipeline's fields)

    @property
    def output(self) -> str:
        return self.encode_at

    @property
    def kept(self) -> list[str]:
        """What the baseline may save for backward's reads: the tensor, a view, or a derived value."""
        return self.forms + self.derived


def _forward_side(gm: fx.GraphModule, num_fwd_outputs: int) -> set[fx.Node]:
    """Every node a forward output depends on."""
    return ancestors([o for o in output_values(gm)[:num_fwd_outputs] if isinstance(o, fx.Node)])


def _anchor(gm: fx.GraphModule, num_fwd_outputs: int) -> int:
    """The first forward output that is a floating-point value computed in the graph (-1: none);
    never a view, which AOTAutograd may regenerate from an input it aliases."""
    for i, out in enumerate(output_values(gm)[:num_fwd_outputs]):
        val = tensor_val(out) if isinstance(out, fx.Node) else None
        if out is not None and isinstance(out, fx.Node) and out.op == "call_function" and \
                out.target not in VIEW_LIKE and isinstance(val, torch.Tensor) and val.is_floating_point():
            return i
    return -1



def _derived(forms: list[fx.Node], forward: set[fx.Node], flags: JointFlags) -> list[fx.Node]:
    """Forward nodes computed elementwise from ``forms`` and constants only (after CSE, backward
    reads forward's ``sigmoid(g)`` rather than recomputing it)."""
    inside = set(forms)
    out: list[fx.Node] = []
    frontier = list(forms)
    while frontier:
        nxt = []
        for n in frontier:
            for u in n.users:
                if u in inside or u not in forward or not is_elementwise(u):
                    continue
                if all(i in inside or not flags.activation.get(i, False) for i in u.all_input_nodes):
                    inside.add(u)
                    out.append(u)
                    nxt.append(u)
        frontier = nxt
    order = {n: i for i, n in enumerate(forms[0].graph.nodes)}
    return sorted(out, key=order.__getitem__)


def find_stored_sites(gm: fx.GraphModule, num_fwd_outputs: int, param_indices: Sequence[int]) -> list[StoredSite]:
    """Matmul outputs computed from activations whose backward readers are all elementwise."""
    flags = JointFlags.of(gm, param_indices)
    forward = _forward_side(gm, num_fwd_outputs)
    nodes = {n.name: n for n in gm.graph.nodes}
    anchor = _anchor(gm, num_fwd_outputs)
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in FORWARD_MATMULS or node not in forward:
            continue
        if flags.tangent.get(node, False) or not flags.activation.get(node, False):
            continue
        if node.meta.get("recompute") == CheckpointPolicy.MUST_SAVE:
            continue  # pinned exact by another pass (the chunked loss head's gradients)
        forms = view_forms(node)
        derived = _derived(forms, forward, flags)
        readers = {f.name: [u.name for u in f.users if u not in forward and u.op != "output"]
                   for f in [*forms, *derived]}
        readers = {k: v for k, v in readers.items() if v}
        if not readers:
            continue
        if any(not is_elementwise(nodes[r]) for names in readers.values() for r in names):
            continue  # a weight gradient or attention backward reads it: not this codec's kind of site
        site = StoredSite(name=site_name(node, "matmul"), encode_at=node.name, forms=[f.name for f in forms],
                          derived=[d.name for d in derived], readers=readers, anchor=anchor)
        val = tensor_val(node)
        if anchor < 0:
            site.unsupported = "no floating-point forward output to tie its codes to"
        elif val is None or not val.is_floating_point():
            site.unsupported = f"unsupported dtype {getattr(val, 'dtype', None)}"
        elif any(not isinstance(s, int) for s in val.shape):
            site.unsupported = "dynamic shape"
        sites.append(site)
    return sites
