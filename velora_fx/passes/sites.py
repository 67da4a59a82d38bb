"""Site analysis: matmuls of the joint graph whose saved activation feeds a weight gradient.

A *site* is one weight-gradient matmul ``mm/bmm(gradᵀ, x)`` (or ``(xᵀ, grad)``) that contributes
to a parameter's gradient, where ``x`` is (a view or transpose of) a forward activation.
Sites sharing the same activation (one norm output feeding q, k and v) form a *group*: the
activation leaves the saved set only if every one of them switches to the coefficients.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from ..naming import module_path_from_source
from .graph_utils import (CASTS, VIEW_LIKE, FORWARD_MATMULS, GRAD_PASSTHROUGH, MATMULS, SWAP_LIKE, JointFlags,
                          output_values, strip_views, swaps_last_two, tensor_val, view_forms)

__all__ = ["Site", "ActivationGroup", "find_groups"]


@dataclass
class Site:
    """One weight-gradient matmul fed by an activation."""

    module_path: str
    module_type: str
    param_index: int
    forward_op: str          # addmm / mm / bmm of the forward matmul, or "?" if not found
    grad_matmul: str         # node name of the weight-gradient mm/bmm
    operand_index: int       # which argument of grad_matmul carries the activation
    chain: list[str]         # view-like nodes from the encode point to that operand
    orientation: int = 0     # 0: features match W.shape[-1] (x Wᵀ); 1: W.shape[-2] (x W, Conv1D, tied Wᵀ)
    source_path: str = ""    # module path as dynamo's source names it (relative to the traced frame)


@dataclass
class ActivationGroup:
    """All weight-gradient uses of one activation tensor."""

    activation: str                      # node name of the activation (root, views stripped)
    encode_at: str = ""                  # node the codec encodes (root or a view of it)
    sites: list[Site] = field(default_factory=list)
    forms: list[str] = field(default_factory=list)  # activation and its view-like descendants
    is_graph_input: bool = False
    other_backward_users: list[str] = field(default_factory=list)  # non-site tangent users of a form
    unsupported: str | None = None       # why it cannot be rewritten, if so

    @property
    def name(self) -> str:
        paths = [s.module_path for s in self.sites]
        if len(set(paths)) == 1:
            return paths[0]
        prefix = _common_prefix(paths)
        leaves = [p[len(prefix):] for p in paths]
        return f"{prefix}{{{','.join(leaves)}}}" if prefix else "{" + ",".join(paths) + "}"


def _common_prefix(paths: Sequence[str]) -> str:
    parts = [p.split(".") for p in paths]
    common = []
    for chunk in zip(*parts):
        if len(set(chunk)) != 1:
            break
        common.append(chunk[0])
    if any(len(common) >= len(p) for p in parts):
        common = common[:-1]
    return ".".join(common) + "." if common else ""


def _module_of(node: fx.Node) -> tuple[str, str] | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path, mtype = list(stack.values())[-1]
    type_name = getattr(mtype, "__name__", None) or str(mtype).rsplit(".", 1)[-1].strip("'>")
    return module_path_from_source(str(path)), type_name


def _grad_matmuls(grad: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """Matmuls whose output flows (through views and adds only) into a gradient output."""
    found, visited, stack = [], set(), [grad]
    while stack:
        n = stack.pop()
        if n in visited or not isinstance(n, fx.Node):
            continue
        visited.add(n)
        if n.op == "call_function" and n.target in MATMULS:
            found.append(n)
        elif n.op == "call_function" and n.target in GRAD_PASSTHROUGH:
            stack.extend(a for a in n.args if isinstance(a, fx.Node))
    return found, visited


def _flows_only_into(node: fx.Node, allowed: set[fx.Node]) -> bool:
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for user in n.users:
            if user.op == "output":
                continue
            if user not in allowed:
                return False
            stack.append(user)
    return True


def _forward_matmul(forms: list[fx.Node], param: fx.Node, flags: JointFlags) -> fx.Node | None:
    for form in forms:
        for user in form.users:
            if user.op != "call_function" or user.target not in FORWARD_MATMULS or flags.tangent[user]:
                continue
            for other in user.args[-2:]:  # (x, W) of mm / bmm / addmm(b, x, W)
                if isinstance(other, fx.Node) and other is not form and strip_views(other, VIEW_LIKE | CASTS)[0] is param:
                    return user
    return None


def find_groups(gm: fx.GraphModule, num_fwd_outputs: int, param_indices: Sequence[int],
                primal_labels: Sequence[str | None] | None = None) -> list[ActivationGroup]:
    """Weight-gradient sites of a joint graph, grouped by the activation they read."""
    flags = JointFlags.of(gm, param_indices)
    outputs = output_values(gm)
    grads = outputs[num_fwd_outputs:num_fwd_outputs + len(flags.primals)]
    groups: dict[fx.Node, ActivationGroup] = {}
    forms_of: dict[fx.Node, list[fx.Node]] = {}
    site_nodes: dict[fx.Node, set[fx.Node]] = {}
    for index in sorted(param_indices):
        if index >= len(grads) or not isinstance(grads[index], fx.Node):
            continue
        param = flags.primals[index]
        matmuls, passthrough = _grad_matmuls(grads[index])
        for mm in matmuls:
            if not _flows_only_into(mm, passthrough):
                continue
            found = _activation_operand(mm, flags)
            if found is None:
                continue
            operand_index, root, encode_at, chain, layout_ok = found
            if root not in forms_of:
                forms_of[root] = view_forms(root)
            forms = forms_of[root]
            fwd = _forward_matmul(forms, param, flags)
            module = (_module_of(fwd) if fwd is not None else None) or _label(primal_labels, index, param)
            group = groups.setdefault(root, ActivationGroup(activation=root.name,
                                                              forms=[f.name for f in forms],
                                                              is_graph_input=root.op == "placeholder"))
            if group.sites and group.encode_at != encode_at.name:
                group.unsupported = "its weight-gradient consumers read it in different layouts"
            group.encode_at = encode_at.name
            if not layout_ok:
                group.unsupported = "unsupported layout: its weight-gradient matmul contracts the feature dim"
            group.sites.append(Site(
                module_path=module[0], module_type=module[1], param_index=index,
                forward_op=getattr(fwd.target, "__name__", str(fwd.target)).split(".")[0] if fwd is not None else "?",
                grad_matmul=mm.name, operand_index=operand_index, chain=[c.name for c in chain],
                orientation=_orientation(param, encode_at, fwd), source_path=module[0]))
            site_nodes.setdefault(root, set()).update([mm, *chain])  # chain below encode point
    for root, group in groups.items():
        used = site_nodes[root]
        others = {user for form in forms_of[root] for user in form.users
                  if user not in used and user.op != "output" and flags.tangent.get(user, False)}
        group.other_backward_users = sorted({_op_name(u) for u in others})
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(groups.values(), key=lambda g: order[g.activation])


def _activation_operand(mm: fx.Node, flags: JointFlags):
    """(operand index, activation root, encode point, chain from it, layout ok) or None.

    The root is the activation with views stripped (what the partitioner may save in any view
    form); the encode point is the highest node of the view chain whose last dim is still the
    linear's feature dim (for o_proj: the [B, T, H*hd] view of the attention output)."""
    candidates = []
    for i, operand in enumerate(mm.args[:2]):
        if not isinstance(operand, fx.Node) or flags.tangent[operand]:
            continue
        root, chain = strip_views(operand)
        if not flags.activation.get(root, False) or flags.tangent[root]:
            continue
        candidates.append((i, root, chain))
    if len(candidates) != 1:
        return None
    i, root, chain = candidates[0]
    nodes = [root, *chain]
    start, swaps = len(nodes) - 1, 0
    while start > 0:
        step = _layout_step(nodes[start])
        if step is None:
            break
        swaps += step
        start -= 1
    # the weight-grad matmul contracts over tokens: the features must stay un-contracted
    layout_ok = (i == 1 and swaps % 2 == 0) or (i == 0 and swaps % 2 == 1)
    return i, root, nodes[start], nodes[start + 1:], layout_ok


def _layout_step(node: fx.Node) -> int | None:
    """1 if ``node`` swaps the last two dims, 0 if it keeps the last (feature) dim as is,
    None if it reshapes features (the chain above it is not token-major with the same features)."""
    if node.target in SWAP_LIKE:
        swapped = swaps_last_two(node)
        return None if swapped is None else int(swapped)
    before, after = tensor_val(node.args[0]), tensor_val(node)
    if before is None or after is None or before.dim() == 0 or after.dim() == 0:
        return None
    return 0 if before.shape[-1] == after.shape[-1] else None


def _orientation(param: fx.Node, encode_at: fx.Node, fwd: fx.Node | None) -> int:
    """0 if the activation's features match the weight's last dim (x Wᵀ, nn.Linear), 1 if they
    match the one before (x W: Conv1D, a tied Wᵀ).  Square weights: the forward matmul decides."""
    w, x = tensor_val(param), tensor_val(encode_at)
    if w is None or x is None or w.dim() < 2:
        return 0
    features = x.shape[-1]
    last, before = w.shape[-1] == features, w.shape[-2] == features
    if last != before:
        return 0 if last else 1
    if fwd is not None:
        for operand in fwd.args[-2:]:
            if not isinstance(operand, fx.Node):
                continue
            root, chain = strip_views(operand, VIEW_LIKE | CASTS)
            if root is param:
                swaps = sum(1 for n in chain if n.target in SWAP_LIKE and swaps_last_two(n))
                return 0 if swaps % 2 else 1
    return 0


def _label(primal_labels, index: int, param: fx.Node) -> tuple[str, str]:
    label = primal_labels[index] if primal_labels and index < len(primal_labels) else None
    if label:
        return label.rsplit(".", 1)[0] if "." in label else label, "?"
    return param.name, "?"


def _op_name(node: fx.Node) -> str:
    """``_scaled_dot_product_flash_attention_backward.default`` -> ``scaled_dot_product_flash_attention_backward``."""
    name = getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0].lstrip("_")

