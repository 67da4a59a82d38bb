"""Site analysis: matmuls of the joint graph whose saved activation feeds a weight gradient.

A *site* is one weight-gradient matmul ``mm/bmm(gradᵀ, x)`` (or ``(xᵀ, grad)``) that contributes
to a parameter's gradient, where ``x`` is (a view or transpose of) a forward activation.
Sites sharing the same activation (one norm output feeding q, k and v) form a *group*: the
activation leaves the saved set only if every one of them switches to the coefficients.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import torch.fx as fx

from .graph_utils import (FORWARD_MATMULS, GRAD_PASSTHROUGH, MATMULS, SWAP_LIKE, JointFlags,
                          output_values, strip_views, swaps_last_two, tensor_val, view_forms)

__all__ = ["Site", "ActivationGroup", "find_groups", "module_path_from_source"]


@dataclass
class Site:
    """One weight-gradient matmul fed by an activation."""

    module_path: str
    module_type: str
    param_index: int
    forward_op: str          # addmm / mm / bmm of the forward matmul, or "?" if not found
    grad_matmul: str         # node name of the weight-gradient mm/bmm
    operand_index: int       # which argument of grad_matmul carries the activation
    chain: list[str]         # view-like nodes from the activation to that operand


@dataclass
class ActivationGroup:
    """All weight-gradient uses of one activation tensor."""

    activation: str                      # node name of the activation (root, views stripped)
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


_SOURCE_ITEM = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]|\[['\"]?([^'\"\]]+)['\"]?\]|\.([A-Za-z_]\w*)")


def module_path_from_source(source: str) -> str:
    """``L['self']._modules['layers']._modules['0'].q_proj`` -> ``layers.0.q_proj``: dynamo
    source / nn_module_stack strings to the module path a user writes in include/exclude."""
    items = [next(g for g in m.groups() if g is not None) for m in _SOURCE_ITEM.finditer(source)]
    if source.startswith(("L[", "G[")) and items:
        items = items[1:]  # the root local (self / model) is not part of the module path
    return ".".join(items)


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
                if isinstance(other, fx.Node) and other is not form and strip_views(other)[0] is param:
                    return user
    return None


def find_groups(gm: fx.GraphModule, num_fwd_outputs: int, param_indices: Sequence[int],
                primal_labels: Sequence[str | None] | None = None) -> list[ActivationGroup]:
    """Weight-gradient sites of a joint graph, grouped by the activation they read."""
    flags = JointFlags.of(gm, param_indices)
    outputs = output_values(gm)
    grads = outputs[num_fwd_outputs:num_fwd_outputs + len(flags.primals)]
    groups: dict[fx.Node, ActivationGroup] = {}
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
            operand_index, root, chain, layout_ok = found
            forms = view_forms(root)
            fwd = _forward_matmul(forms, param, flags)
            module = (_module_of(fwd) if fwd is not None else None) or _label(primal_labels, index, param)
            group = groups.setdefault(root, ActivationGroup(activation=root.name,
                                                              forms=[f.name for f in forms],
                                                              is_graph_input=root.op == "placeholder"))
            if not layout_ok:
                group.unsupported = f"unsupported layout at {mm.name}: feature dim is contracted"
            group.sites.append(Site(
                module_path=module[0], module_type=module[1], param_index=index,
                forward_op=getattr(fwd.target, "__name__", str(fwd.target)).split(".")[0] if fwd is not None else "?",
                grad_matmul=mm.name, operand_index=operand_index, chain=[c.name for c in chain]))
            site_nodes.setdefault(root, set()).update([mm, *chain])
    for root, group in groups.items():
        used = site_nodes[root]
        others = {user for form in view_forms(root) for user in form.users
                  if user not in used and user.op != "output" and flags.tangent.get(user, False)}
        group.other_backward_users = sorted({_op_name(u) for u in others})
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(groups.values(), key=lambda g: order[g.activation])


def _activation_operand(mm: fx.Node, flags: JointFlags):
    """(operand index, activation root, view chain, feature-dim-not-contracted) or None."""
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
    swaps = 0
    for node in chain:
        if node.target in SWAP_LIKE:
            s = swaps_last_two(node)
            if s is None:
                return i, root, chain, False
            swaps += int(s)
        else:
            before, after = tensor_val(node.args[0]), tensor_val(node)
            if before is None or after is None or before.dim() == 0 or after.dim() == 0 \
                    or before.shape[-1] != after.shape[-1]:
                return i, root, chain, False
    # weight-grad matmul contracts over tokens: the activation's features must stay un-contracted
    layout_ok = (i == 1 and swaps % 2 == 0) or (i == 0 and swaps % 2 == 1)
    return i, root, chain, layout_ok


def _label(primal_labels, index: int, param: fx.Node) -> tuple[str, str]:
    label = primal_labels[index] if primal_labels and index < len(primal_labels) else None
    if label:
        return label.rsplit(".", 1)[0] if "." in label else label, "?"
    return param.name, "?"


def _op_name(node: fx.Node) -> str:
    return getattr(node.target, "__name__", str(node.target))

