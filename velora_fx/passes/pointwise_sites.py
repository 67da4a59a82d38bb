"""Pointwise sites: a nonlinearity whose backward keeps its input (or output) only to evaluate f'.

After inductor's decompositions a GELU is a handful of aten ops, and so is its backward.  AOTAutograd
tags every node with the aten op it came from (``meta["original_aten"]``) and the forward op's
sequence number (``meta["seq_nr"]``, shared by its backward), so the forward region and the
backward region of one ``gelu`` call are found exactly, whatever the decomposition looks like.

A site is usable when its backward region reads, besides the incoming gradient, only the tensor
the derivative is a function of (``x`` for GELU/SiLU, ``y = f(x)`` for ReLU/sigmoid/tanh, whose
PyTorch backward reads the output) and computes one gradient.  The few-bit codec then saves a
code of that tensor and replaces the region's result by ``grad * q(code)``.

Nonlinearities written out of primitive ops (transformers' ``gelu_new``, ``gelu_fast``,
``quick_gelu``...) have no such op name: ``pointwise_match`` finds them by evaluating candidate
element-wise regions on a probe grid (``recognised_by="computed"``).  A computed region that
contains an op-name site (``gelu_new``'s inner ``tanh``) replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx

from ..naming import module_path_from_source
from .graph_utils import JointFlags, strip_views, tensor_val, view_forms
from .pointwise_match import ComputedRegion, find_computed_regions

__all__ = ["PointwiseSite", "find_pointwise_sites", "FORWARD_OPS"]

aten = torch.ops.aten

# forward aten op -> (its backward op, the function's name for the level fit, what backward reads).
# Keyed by name: graph copies deep-copy ``meta["original_aten"]`` into new OpOverload objects.
FORWARD_OPS = {
    "aten.gelu.default": ("aten.gelu_backward.default", "gelu", "input"),
    "aten.silu.default": ("aten.silu_backward.default", "silu", "input"),
    "aten.relu.default": ("aten.threshold_backward.default", "relu", "output"),
    "aten.sigmoid.default": ("aten.sigmoid_backward.default", "sigmoid", "output"),
    "aten.tanh.default": ("aten.tanh_backward.default", "tanh", "output"),
}


@dataclass
class PointwiseSite:
    """One nonlinearity call and the backward region computing its input gradient."""

    name: str                 # module path of the activation module (or op@node)
    function: str             # a name of fewbit_levels.FUNCTIONS (gelu, gelu_tanh, silu, quick_gelu...)
    encode_at: str            # the tensor the derivative is evaluated from (x or y)
    domain: str               # "input" or "output": which one encode_at is
    grad_in: str              # the incoming gradient (backward region's tangent-side input)
    grad_out: str             # the region node whose value is the input gradient
    region: list[str] = field(default_factory=list)  # backward region nodes
    forms: list[str] = field(default_factory=list)   # encode_at and its view-like descendants
    output: str = ""          # the forward result y
    input_forms: list[str] = field(default_factory=list)  # output domain: x's forms (the partitioner may
                                                          # keep x and recompute y for backward)
    derived: list[str] = field(default_factory=list)  # f'(x) parts of the region (tangent-free): the
                                                      # partitioner may save those instead of x
    unsupported: str | None = None
    recognised_by: str = "op"  # "op": by its aten op's name; "computed": by evaluating its region

    @property
    def kept(self) -> list[str]:
        """What the baseline may save for f': the encoded tensor, x, or f'(x) computed in forward."""
        return self.forms + self.input_forms + self.derived


def find_pointwise_sites(gm: fx.GraphModule, param_indices: Sequence[int],
                         computed: bool = True) -> list[PointwiseSite]:
    """Every nonlinearity of ``FORWARD_OPS`` with a backward region, and (``computed``) every
    element-wise region computing a function of ``fewbit_levels.FUNCTIONS``, in graph order."""
    flags = JointFlags.of(gm, param_indices)
    forward: dict[tuple, list[fx.Node]] = {}
    backward: dict[tuple, list[fx.Node]] = {}
    backward_ops = {v[0]: k for k, v in FORWARD_OPS.items()}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        op, seq = str(node.meta.get("original_aten")), node.meta.get("seq_nr")
        if seq is None or not node.all_input_nodes:  # constants (CSE shares them between regions)
            continue
        if op in FORWARD_OPS and not flags.tangent.get(node, False):
            forward.setdefault((op, seq), []).append(node)
        elif op in backward_ops:  # f'(x) itself does not depend on the tangent: only the last mul does
            backward.setdefault((backward_ops[op], seq), []).append(node)
    sites, claimed = [], []
    for key, fwd_nodes in forward.items():
        bwd_nodes = backward.get(key)
        if bwd_nodes:
            site = _site(key[0], fwd_nodes, bwd_nodes, flags)
            if site is not None:
                sites.append(site)
                claimed.append(fwd_nodes)
    if computed:
        regions = find_computed_regions(gm, flags, claimed)
        replaced = {id(site) for site, nodes in zip(sites, claimed) if any(
            set(nodes) <= set(r.forward_nodes) for r in regions)}
        sites = [s for s in sites if id(s) not in replaced] + [_computed_site(r, flags) for r in regions]
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(sites, key=lambda s: order[s.encode_at])


def _boundary_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    inside = set(nodes)
    seen: dict[fx.Node, None] = {}
    for n in nodes:
        for inp in n.all_input_nodes:
            if inp not in inside:
                seen[inp] = None
    return list(seen)


def _boundary_outputs(nodes: list[fx.Node], also_inside: Sequence[fx.Node] = ()) -> list[fx.Node]:
    inside = set(nodes) | set(also_inside)
    return [n for n in nodes if any(u not in inside for u in n.users)]


def _site(op, fwd_nodes: list[fx.Node], bwd_nodes: list[fx.Node], flags: JointFlags) -> PointwiseSite | None:
    _, function, domain = FORWARD_OPS[op]
    x_in = [n for n in _boundary_inputs(fwd_nodes) if tensor_val(n) is not None and tensor_val(n).dim() > 0]
    y_out = _boundary_outputs(fwd_nodes, bwd_nodes)  # after CSE, backward reuses forward's x*x, tanh...
    if len(x_in) != 1 or len(y_out) != 1:
        return None
    x, y = x_in[0], y_out[0]
    if function == "gelu" and any(n.target == aten.tanh.default for n in fwd_nodes):
        function = "gelu_tanh"
    name = site_name(fwd_nodes[-1], function)
    site = PointwiseSite(name=name, function=function, encode_at=(x if domain == "input" else y).name,
                         domain=domain, grad_in="", grad_out="", region=[n.name for n in bwd_nodes], output=y.name)
    root, _ = strip_views(x if domain == "input" else y)  # a saved addmm output is the view's storage
    site.forms = [f.name for f in view_forms(root)]
    if domain == "output":
        site.input_forms = [f.name for f in view_forms(strip_views(x)[0])]
    site.derived = [n.name for n in bwd_nodes if not flags.tangent.get(n, False)]
    grads = [n for n in _boundary_inputs(bwd_nodes) if flags.tangent.get(n, False)]
    outs = _boundary_outputs(bwd_nodes)
    if len(grads) != 1 or len(outs) != 1:
        site.unsupported = "its backward does not read one gradient and produce one"
        return site
    site.grad_in, site.grad_out = grads[0].name, outs[0].name
    grad_val, x_val = tensor_val(grads[0]), tensor_val(x)
    if grad_val is None or x_val is None or tuple(grad_val.shape) != tuple(x_val.shape):
        site.unsupported = "its gradient and its input differ in shape"
    elif not x_val.is_floating_point():
        site.unsupported = f"unsupported dtype {x_val.dtype}"
    return site


def _computed_site(region: ComputedRegion, flags: JointFlags) -> PointwiseSite:
    """The site of a region recognised by evaluation: codes of its input x (any function's
    thresholds are in x's domain)."""
    x, y = region.x, region.y
    site = PointwiseSite(name=site_name(y, region.function), function=region.function, encode_at=x.name,
                         domain="input", grad_in=region.grad_in.name, grad_out=region.grad_out.name,
                         region=[n.name for n in region.backward_nodes], output=y.name, recognised_by="computed")
    site.forms = [f.name for f in view_forms(strip_views(x)[0])]
    # what the baseline may save for f' instead of x: backward's own tangent-free parts and the
    # forward region's inner values backward reads (gelu_new's tanh, quick_gelu's sigmoid)
    reads = {i for n in region.backward_nodes for i in n.all_input_nodes}
    site.derived = [n.name for n in region.backward_nodes if not flags.tangent.get(n, False)] + \
        [n.name for n in region.forward_nodes if n in reads and n is not y]
    return site


def site_name(node: fx.Node, function: str) -> str:
    """The module path of the module that ran ``node`` (``function@node`` if unknown)."""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = module_path_from_source(str(list(stack.values())[-1][0]))
        if path:
            return path
    return f"{function}@{node.name}"
