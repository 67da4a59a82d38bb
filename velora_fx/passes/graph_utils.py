"""Small helpers over AOTAutograd joint graphs: op classes, dependency flags, bytes, node creation."""
from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.fx as fx

from .._compat import fake_mode_of, fx_graph_cse, int_hint, is_joint_primal, is_joint_tangent

aten = torch.ops.aten

# Ops that only re-label or copy the same values: a saved tensor reached through them is "the
# same activation" for memory purposes (GPT-2's Conv1D saves xᵀ, Linear saves view(x)).
VIEW_LIKE = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default,
    aten.t.default, aten.transpose.int, aten.permute.default, aten.clone.default,
    aten.expand.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.default,
}
# Ops that only change the shape, keeping the elements' order.
RESHAPES = {aten.view.default, aten._unsafe_view.default, aten.reshape.default}
# Layout ops that swap the last two dims when applied to a 2-D/3-D tensor.
SWAP_LIKE = {aten.t.default, aten.transpose.int, aten.permute.default}
MATMULS = {aten.mm.default, aten.bmm.default}
FORWARD_MATMULS = {aten.mm.default, aten.bmm.default, aten.addmm.default}
# ops that reduce along dims: what a norm's statistics or a softmax is made of after decomposition
REDUCTIONS = {
    aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.mean.default, aten.amax.default,
    aten.amin.default, aten.max.dim, aten.min.dim, aten.prod.dim_int, aten.var.correction,
    aten.var_mean.correction, aten.logsumexp.default, aten._softmax.default, aten._log_softmax.default,
    aten.native_layer_norm.default, aten.native_group_norm.default,
}
# dtype casts (autocast puts them on weights and on weight gradients)
CASTS = {aten._to_copy.default, torch.ops.prims.convert_element_type.default}
# velora_fx's host-transfer ops (velora_fx/offload/ops.py), by name: recognised without importing
# the offload package, which registers them
TRANSFER_OPS = ("offload_start", "offload_finish", "reload_start", "reload_finish")
# ops through which a weight-gradient matmul's output still reaches the parameter's gradient
# linearly (views, casts, accumulation of several uses)
GRAD_PASSTHROUGH = VIEW_LIKE | CASTS | {aten.add.Tensor}


def is_transfer(node: fx.Node, *names: str) -> bool:
    """Whether ``node`` calls one of velora_fx's transfer ops (of ``names``, by default any)."""
    target = node.target
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "velora_fx" and \
        target.overloadpacket.__name__ in (names or TRANSFER_OPS)


def tensor_val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def nbytes(node: fx.Node) -> int:
    val = tensor_val(node)
    if val is None:
        return 0
    return int_hint(val.numel()) * val.element_size()


def output_values(gm: fx.GraphModule) -> list[Any]:
    return list(gm.graph.find_nodes(op="output")[0].args[0])


@dataclass
class JointFlags:
    """Per-node flags of a joint graph: does it depend on tangents / on a non-parameter input."""

    tangent: dict[fx.Node, bool]
    activation: dict[fx.Node, bool]
    primals: list[fx.Node]

    @classmethod
    def of(cls, gm: fx.GraphModule, param_indices: Iterable[int]) -> "JointFlags":
        params = set(param_indices)
        primals = [n for n in gm.graph.nodes if is_joint_primal(n)]
        tangent: dict[fx.Node, bool] = {}
        activation: dict[fx.Node, bool] = {}
        for i, p in enumerate(primals):
            activation[p] = i not in params
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                tangent[node] = is_joint_tangent(node)
                activation.setdefault(node, False)
                continue
            inputs = node.all_input_nodes
            tangent[node] = any(tangent.get(i, False) for i in inputs)
            activation[node] = any(activation.get(i, False) for i in inputs)
        return cls(tangent, activation, primals)


def strip_views(node: fx.Node, through: set = VIEW_LIKE) -> tuple[fx.Node, list[fx.Node]]:
    """Walk up through view-like ops: (root, chain from root to ``node`` excluding root)."""
    chain: list[fx.Node] = []
    while node.op == "call_function" and node.target in through:
        chain.append(node)
        node = node.args[0]
    return node, list(reversed(chain))


def ancestors(targets: list[fx.Node]) -> set[fx.Node]:
    """``targets`` and every node they are computed from."""
    seen: set[fx.Node] = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def is_elementwise(node: fx.Node, random: bool = True) -> bool:
    """An op computing each output element from the same element of its inputs (a dtype cast
    included; ``random=False`` leaves out seeded ones such as dropout's ``rand``-based masks)."""
    if node.op != "call_function":
        return False
    if node.target in CASTS:
        return True
    tags = getattr(node.target, "tags", ())
    return torch.Tag.pointwise in tags and (random or torch.Tag.nondeterministic_seeded not in tags)


def elementwise_sources(node: fx.Node) -> set[fx.Node]:
    """``node`` and every tensor it is computed from through element-wise and view-like ops alone,
    the first other op's output included: what inductor can compute in one kernel."""
    seen, stack = {node}, [node]
    while stack:
        n = stack.pop()
        if n is not node and not (is_elementwise(n) or (n.op == "call_function" and n.target in VIEW_LIKE)):
            continue
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def is_reduction(node: fx.Node) -> bool:
    """A reducing op, or one output of it (``var_mean``'s mean)."""
    if node.op == "call_function" and node.target is operator.getitem:
        node = node.args[0]
    return node.op == "call_function" and node.target in REDUCTIONS


def near_inputs(node: fx.Node, depth: int = 4, stop: set = MATMULS) -> set[str]:
    """Names of the tensors ``node`` is computed from by at most ``depth`` cheap ops: the walk
    goes up through every op but those in ``stop`` (whose names it still includes)."""
    seen, frontier = set(), [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for inp in n.all_input_nodes:
                if inp.name not in seen:
                    seen.add(inp.name)
                    if inp.op == "call_function" and inp.target not in stop:
                        nxt.append(inp)
        frontier = nxt
    return seen


def view_forms(root: fx.Node) -> list[fx.Node]:
    """``root`` and every node reachable from it through view-like ops only."""
    forms, stack = [], [root]
    while stack:
        n = stack.pop()
        forms.append(n)
        stack.extend(u for u in n.users if u.op == "call_function" and u.target in VIEW_LIKE and u.args[0] is n)
    return forms


def swaps_last_two(node: fx.Node) -> bool | None:
    """True if a SWAP_LIKE node swaps the last two dims, False if it keeps them, None if neither."""
    val_in, val_out = tensor_val(node.args[0]), tensor_val(node)
    if val_in is None or val_out is None:
        return None
    nd = val_in.dim()
    if node.target is aten.t.default:
        return nd == 2
    if node.target is aten.transpose.int:
        d0, d1 = sorted(d % nd for d in node.args[1:3])
        return (d0, d1) == (nd - 2, nd - 1) or (None if d1 >= nd - 2 else False)
    perm = [d % nd for d in node.args[1]]
    if perm == list(range(nd)):
        return False
    if perm == list(range(nd - 2)) + [nd - 1, nd - 2]:
        return True
    return None


def create_node(graph: fx.Graph, target: Any, args: tuple, kwargs: dict | None = None,
                like: fx.Node | None = None) -> fx.Node:
    """Insert a call_function node at the graph's insertion point with a fresh ``meta["val"]``."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    if like is not None:
        for key in ("partitioner_tag", "nn_module_stack", "fwd_nn_module_stack", "seq_nr", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    fake_args, fake_kwargs = torch.fx.node.map_arg((args, kwargs), lambda n: n.meta.get("val"))
    if target is operator.getitem:
        node.meta["val"] = fake_args[0][fake_args[1]]
        return node
    mode = fake_mode_of(list(tensor_leaves((fake_args, fake_kwargs)))) or _graph_fake_mode(graph)
    with mode if mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def emit(graph: fx.Graph, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """``create_node`` with the op's arguments spelled out (what the codecs write)."""
    return create_node(graph, target, args, kwargs)


def sizes(graph: fx.Graph, node: fx.Node, dims: range) -> list:
    """Sizes of ``node``'s ``dims`` as graph arguments: ints, or sym_size nodes for symbolic dims."""
    shape = node.meta["val"].shape
    return [shape[d] if isinstance(shape[d], int) else create_node(graph, aten.sym_size.int, (node, d))
            for d in dims]


def _graph_fake_mode(graph: fx.Graph):
    """The fake mode of a graph's inputs (for ops without tensor arguments, e.g. ``full``)."""
    values = [n.meta.get("val") for n in graph.find_nodes(op="placeholder")]
    return fake_mode_of([v for v in values if isinstance(v, torch.Tensor)])


def tensor_leaves(tree: Any):
    """The tensors in a nest of lists, tuples and dicts, in order."""
    if isinstance(tree, (list, tuple)):
        for t in tree:
            yield from tensor_leaves(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from tensor_leaves(t)
    elif isinstance(tree, torch.Tensor):
        yield tree



def clone_graph_module(gm: fx.GraphModule, cse: bool = False) -> fx.GraphModule:
    """A new GraphModule with a copied graph (same node names, shallow-copied meta) that shares
    gm's attributes.  ``copy.deepcopy(gm)`` would also copy constants, which fails for fake ones.
    ``cse=True`` also merges identical computations, as the min-cut partitioner does first (under
    autocast, q, k and v each cast the shared norm output: one cast after CSE, one site group)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree spec deprecation noise on copy
        graph = fx_graph_cse(gm.graph) if cse else copy.deepcopy(gm.graph)
    clone = fx.GraphModule(gm, graph)
    clone.meta = dict(getattr(gm, "meta", {}))
    return clone
