"""Calibration: the sites' real activations on the batch being compiled, for the error estimate
and for compile-time initialisation of v.

Dynamo hands the backend the real inputs of the call it compiles (the first batch) and the real
weights.  Running the joint graph on them eagerly — the forward part as far as the site
activations, or forward and backward for the gradient estimate (``estimate.py``) — costs one eager
pass per compile and gives the planner data instead of a guess.  The RNG state is restored
afterwards, so training randomness is unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from .._compat import is_joint_primal, is_joint_tangent
from .graph_utils import ancestors

__all__ = ["activation_values", "calibration_graph", "evaluate"]


def activation_values(gm: fx.GraphModule, real_primals: Sequence[Any], names: Sequence[str]) -> dict[str, Tensor]:
    """The values of the nodes ``names`` of a joint graph, computed from real primal inputs.
    Raises if a needed node cannot run eagerly (the caller then falls back to no data)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    targets = [nodes[n] for n in names]
    env = evaluate(gm, real_primals, None, ancestors(targets), set(targets))
    return {t.name: env[t] for t in targets}


def evaluate(gm: fx.GraphModule, real_primals: Sequence[Any], real_tangents: Sequence[Any] | None,
             needed: set[fx.Node], keep: set[fx.Node],
             visit: Callable[[fx.Node, dict[fx.Node, Any]], None] | None = None) -> dict[fx.Node, Any]:
    """Run the ``needed`` nodes of a joint graph eagerly, in graph order, on real primals (and
    tangents, for backward nodes), freeing each value after its last needed use unless it is in
    ``keep``; ``visit(node, env)`` sees every computed node while its inputs are still alive.
    Returns the values left (``keep`` among them).  No autograd, no autocast, RNG state restored."""
    primals = [n for n in gm.graph.nodes if is_joint_primal(n)]
    if len(primals) != len(real_primals):
        raise ValueError(f"{len(primals)} primals but {len(real_primals)} real inputs")
    env: dict[fx.Node, Any] = dict(zip(primals, real_primals))
    if real_tangents is not None:
        tangents = [n for n in gm.graph.nodes if is_joint_tangent(n)]
        if len(tangents) != len(real_tangents):
            raise ValueError(f"{len(tangents)} tangents but {len(real_tangents)} values")
        env.update(zip(tangents, real_tangents))
    last_use = _last_uses(gm, needed)
    devices = sorted({t.device.index for t in real_primals if isinstance(t, Tensor) and t.device.type == "cuda"
                      and t.device.index is not None})
    with torch.no_grad(), torch.random.fork_rng(devices=devices), _no_autocast():
        for node in gm.graph.nodes:
            if node not in needed or node.op not in ("call_function", "get_attr"):
                continue
            if node.op == "get_attr":  # a lifted constant
                env[node] = _fetch_attr(gm, str(node.target))
                continue
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda a: env[a])
            env[node] = node.target(*args, **kwargs)
            if visit is not None:
                visit(node, env)
            for dead in last_use.get(node, ()):
                if dead not in keep:
                    env.pop(dead, None)
    return env


def calibration_graph(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A small copy of ``gm`` that computes only the nodes ``names`` from the primals (every primal
    kept, so real inputs line up; no metadata, so no fake tensors are kept alive).  A compiled graph
    that dynamo reuses for other weights (another instance of the module class, another layer) keeps
    one, to set their v from their own first batch when they first run (``binding.py``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    needed = ancestors([nodes[n] for n in names])
    graph, env = fx.Graph(), {}
    for node in gm.graph.nodes:
        if is_joint_primal(node) or (node in needed and node.op in ("call_function", "get_attr")):
            env[node] = graph.node_copy(node, lambda n: env[n])
            env[node].meta = {}
    graph.output(tuple(env[nodes[n]] for n in names))
    return fx.GraphModule(gm, graph)


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _last_uses(gm: fx.GraphModule, needed: set[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """node -> inputs whose last needed use it is (to free values as soon as possible)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        if node in needed:
            for inp in node.all_input_nodes:
                last[inp] = node
    out: dict[fx.Node, list[fx.Node]] = {}
    for inp, user in last.items():
        out.setdefault(user, []).append(inp)
    return out


@contextlib.contextmanager
def _no_autocast():
    """The joint graph already holds autocast's casts explicitly; the user's autocast context
    (active while dynamo compiles) must not cast its aten ops again."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if device_type == "cpu" or torch.cuda.is_available():
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
