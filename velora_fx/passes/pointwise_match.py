"""Pointwise sites recognised by what they compute, not by the name of one op.

transformers writes most of its GELUs out of primitive ops: ``gelu_new`` (GPT-2's default) is
``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))``, ``gelu_fast`` the same with other
constants and association, ``quick_gelu`` is ``x * sigmoid(1.702 x)``, ``gelu_python`` spells out
``erf``.  In the joint graph they are chains of ``mul``/``add``/``pow``/``tanh``... with no
``aten.gelu`` anywhere, so ``pointwise_sites``' op-name path cannot see them (or sees only their
inner ``tanh``/``sigmoid``, a site whose codes free nothing since the outer product still keeps x).

A candidate region is found structurally and then *evaluated*:

1. forward: from a floating tensor ``x`` (an activation), the element-wise forward ops computed
   from ``x`` and constants alone; a region is such a set ending in one ``y`` (of ``x``'s shape)
   whose other nodes feed nothing outside it in forward.
2. backward: the backward nodes sharing the region's ``seq_nr``s (AOTAutograd gives an op's
   backward its forward's sequence number), plus the additions that accumulate their partial
   gradients of ``x``.  They must read one incoming gradient and, besides it, only ``x``, the
   region's nodes and constants, and produce one gradient of ``x``'s shape.
3. evaluation: the region is run on a float64 probe grid over [-8, 8] (real tensors, casts between
   float dtypes read as the identity, so the function is compared, not its rounding) and compared
   with every function of ``fewbit_levels.FUNCTIONS``; on a match within ``TOLERANCE`` the backward
   region is run too, with a gradient of ones, and must give that function's derivative.

Only then is it a site, encoded from ``x`` (domain "input": any function's thresholds are in
``x``'s domain).  The op-name path stays first: a region equal to an op-name site's is left to it,
and a region that contains one (the ``tanh`` of ``gelu_new``) replaces it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.fx as fx

from .._compat import real_tensors
from ..codecs.fewbit_levels import FUNCTIONS, derivative, forward
from .graph_utils import CASTS, RESHAPES, JointFlags, is_elementwise, tensor_val

__all__ = ["ComputedRegion", "find_computed_regions", "match_function", "probe_grid", "PROBE_POINTS", "TOLERANCE"]

aten = torch.ops.aten

# the probe: an even number of points, so 0 (relu's kink) is not one of them; few enough that
# float64 tanh/erf stay single-threaded (above ~1100 elements they split across threads, and with
# the 2 cores busy one call took 12 ms instead of 30 us)
PROBE_POINTS = 1000
PROBE_HALF_WIDTH = 8.0
# |f(x) - ref(x)| <= TOLERANCE * (1 + |ref(x)|) on every probe point.  The region runs in float64,
# so a faithful spelling matches to ~1e-15 (FastGELU's 0.7978845608 for sqrt(2/pi): ~3e-12); the
# closest distinct pair of FUNCTIONS (gelu and gelu_tanh) differ by 4.7e-4 somewhere on the grid
TOLERANCE = 1e-6
MAX_REGION = 48  # element-wise nodes reachable from one x (a nonlinearity is a handful)


@dataclass
class ComputedRegion:
    """A matched region: ``x -> forward_nodes -> y`` and its backward ``grad_in -> ... -> grad_out``."""

    function: str                 # the name in fewbit_levels.FUNCTIONS it computes
    x: fx.Node
    y: fx.Node
    forward_nodes: list[fx.Node]  # graph order, y last
    backward_nodes: list[fx.Node]  # graph order, grad_out last
    grad_in: fx.Node
    grad_out: fx.Node


# -- the probe -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _probe() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The grid, and every function's values and derivative on it."""
    with real_tensors(), torch.no_grad():
        grid = torch.linspace(-PROBE_HALF_WIDTH, PROBE_HALF_WIDTH, PROBE_POINTS, dtype=torch.float64)
        return grid, {name: forward(name, grid) for name in FUNCTIONS}, \
            {name: derivative(name, grid) for name in FUNCTIONS}


def _close(value: torch.Tensor, reference: torch.Tensor) -> bool:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(reference.shape):
        return False
    value = value.to(torch.float64)
    if not bool(torch.isfinite(value).all()):
        return False
    return bool(((value - reference).abs() <= TOLERANCE * (1.0 + reference.abs())).all())


def match_function(values: torch.Tensor) -> str | None:
    """The function of ``FUNCTIONS`` whose values on the probe grid (``probe_grid()``) are
    ``values``, within ``TOLERANCE``; None if none is."""
    _, references, _ = _probe()
    with real_tensors():
        for name, reference in references.items():
            if _close(values, reference):
                return name
    return None


def probe_grid() -> torch.Tensor:
    """The float64 points a region is evaluated on (``PROBE_POINTS`` over [-8, 8], 0 excluded)."""
    return _probe()[0].clone()


# -- structure -------------------------------------------------------------------------------------
def _backward_side(gm: fx.GraphModule, flags: JointFlags) -> set[fx.Node]:
    """Tangent-dependent nodes, and tangent-free ones that only backward work reads (``x * x``
    for a derivative): told apart structurally, users before producers."""
    back: set[fx.Node] = set()
    for node in reversed(gm.graph.nodes):
        if node.op == "output":
            continue
        if flags.tangent.get(node, False):
            back.add(node)
        elif node.op == "call_function" and node.users and all(u in back for u in node.users):
            back.add(node)
    return back


def _constants(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes computed from literals alone (``full``, ``scalar_tensor``...), never random."""
    out: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        tags = getattr(node.target, "tags", ())
        if torch.Tag.nondeterministic_seeded in tags:
            continue
        if all(i in out for i in node.all_input_nodes):
            out.add(node)
    return out


def _closure(x: fx.Node, back: set[fx.Node], constants: set[fx.Node]) -> list[fx.Node]:
    """Forward element-wise nodes computed from ``x`` and constants only (at most MAX_REGION)."""
    inside = {x}
    found: list[fx.Node] = []
    frontier = [x]
    while frontier and len(found) < MAX_REGION:
        node = frontier.pop()
        for user in node.users:
            if user in inside or user in back or not is_elementwise(user, random=False):
                continue
            if all(i in inside or i in constants for i in user.all_input_nodes):
                inside.add(user)
                found.append(user)
                frontier.append(user)
    return found


def _region_of(y: fx.Node, closure: set[fx.Node]) -> list[fx.Node]:
    """``y`` and its ancestors inside ``closure``."""
    seen = {y}
    stack = [y]
    while stack:
        for i in stack.pop().all_input_nodes:
            if i in closure and i not in seen:
                seen.add(i)
                stack.append(i)
    return list(seen)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    va, vb = tensor_val(a), tensor_val(b)
    return va is not None and vb is not None and tuple(va.shape) == tuple(vb.shape)


def _backward_region(region: set[fx.Node], x: fx.Node, by_seq: dict, back: set[fx.Node], constants: set[fx.Node],
                     flags: JointFlags, order: dict[fx.Node, int],
                     forward_seqs: set[int]) -> tuple[list[fx.Node], fx.Node, fx.Node] | None:
    """(backward nodes, incoming gradient, gradient of x), or None if they do not form one
    gradient-in, gradient-out region reading only x, the forward region and constants."""
    seqs = {n.meta.get("seq_nr") for n in region}
    if None in seqs:
        return None
    # torch 2.14 folds an identity op into its producer (``1 / d`` traces as ``reciprocal(d) * 1``,
    # and the surviving node carries the ``* 1``'s seq_nr), so the producer's own seq_nr has no
    # forward node left while its backward nodes keep it: the chain's gaps with no forward node
    # anywhere in the graph belong to it
    seqs |= {s for s in range(min(seqs), max(seqs) + 1) if s not in forward_seqs}
    nodes = {n for s in seqs for n in by_seq.get(s, ())}
    # ... and the folded op's backward is then only a reshape of the incoming gradient: the
    # gradient enters after it
    for node in [n for n in nodes if n.target in RESHAPES]:
        source = node.args[0]
        if isinstance(source, fx.Node) and source not in nodes and flags.tangent.get(source, False):
            nodes.discard(node)
    if not any(flags.tangent.get(n, False) for n in nodes):
        return None
    grown = True
    while grown:  # the additions accumulating partial gradients of x (they carry another seq_nr)
        grown = False
        for node in list(nodes):
            for user in node.users:
                if user not in nodes and user in back and user.target == aten.add.Tensor and \
                        all(i in nodes for i in user.all_input_nodes):
                    nodes.add(user)
                    grown = True
    grads, outs = [], []
    for node in nodes:
        for i in node.all_input_nodes:
            if i in nodes or i in grads:
                continue
            if flags.tangent.get(i, False):
                grads.append(i)
            elif i is not x and i not in region and i not in constants:
                return None  # reads another forward value: not a function of x alone
        if any(u not in nodes for u in node.users):
            outs.append(node)
    if len(grads) != 1 or len(outs) != 1 or not flags.tangent.get(outs[0], False):
        return None
    return sorted(nodes, key=order.__getitem__), grads[0], outs[0]


# -- evaluation ------------------------------------------------------------------------------------
def _run(node: fx.Node, env: dict[fx.Node, object]):
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = dict(fx.node.map_arg(node.kwargs, env.__getitem__))
    if node.target in CASTS:  # a float -> float cast is the identity here: compare the function
        dtype = kwargs.get("dtype", args[1] if len(args) > 1 else None)
        if isinstance(args[0], torch.Tensor) and args[0].is_floating_point() and \
                (dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point)):
            return args[0]
    if isinstance(kwargs.get("dtype"), torch.dtype) and kwargs["dtype"].is_floating_point:
        kwargs["dtype"] = torch.float64
    if "device" in kwargs:
        kwargs["device"] = torch.device("cpu")
    if node.target == torch.ops.prims.convert_element_type.default and len(args) > 1 and \
            isinstance(args[1], torch.dtype) and args[1].is_floating_point:
        args = (args[0], torch.float64, *args[2:])
    return node.target(*args, **kwargs)


def _evaluate(nodes: Iterable[fx.Node], env: dict[fx.Node, object], constants: set[fx.Node]) -> None:
    def need(n: fx.Node) -> None:
        if n in env:
            return
        for i in n.all_input_nodes:
            need(i)
        env[n] = _run(n, env)

    for node in nodes:
        for i in node.all_input_nodes:
            if i not in env and i in constants:
                need(i)
        env[node] = _run(node, env)


def _recognise(x: fx.Node, region: list[fx.Node], y: fx.Node, backward: list[fx.Node], grad_in: fx.Node,
               grad_out: fx.Node, constants: set[fx.Node]) -> str | None:
    grid, _, derivatives = _probe()
    try:
        with real_tensors(), torch.no_grad():
            env: dict[fx.Node, object] = {x: grid}
            _evaluate(region, env, constants)
            function = match_function(env[y])
            if function is None:
                return None
            env[grad_in] = torch.ones_like(grid)
            _evaluate(backward, env, constants)
            if not _close(env[grad_out], derivatives[function]):
                return None
            return function
    except Exception:  # noqa: BLE001 - an op that does not run on the probe: not recognised
        return None


# -- the search ------------------------------------------------------------------------------------
def find_computed_regions(gm: fx.GraphModule, flags: JointFlags,
                          claimed: Iterable[Iterable[fx.Node]] = ()) -> list[ComputedRegion]:
    """Regions computing a function of ``FUNCTIONS``, their backward computing its derivative.

    ``claimed``: the forward nodes of op-name sites.  A region inside claimed nodes is left to
    its op-name site; one partly overlapping a claimed set is skipped; one containing whole
    claimed sets is returned (the caller drops those sites)."""
    claimed = [set(c) for c in claimed]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    back = _backward_side(gm, flags)
    constants = _constants(gm)
    claimed_by: dict[fx.Node, int] = {n: k for k, nodes in enumerate(claimed) for n in nodes}
    all_claimed = set(claimed_by)
    by_seq: dict = {}
    forward_seqs = {n.meta.get("seq_nr") for n in gm.graph.nodes if n not in back}
    for node in gm.graph.nodes:
        if node in back and node.op == "call_function" and node.all_input_nodes:
            seq = node.meta.get("seq_nr")
            if seq is not None:
                by_seq.setdefault(seq, []).append(node)
    covered: set[fx.Node] = set()
    found: list[ComputedRegion] = []
    for x in gm.graph.nodes:
        val = tensor_val(x)
        if x in back or x in constants or val is None or not val.is_floating_point() or val.dim() == 0 \
                or not flags.activation.get(x, False):
            continue
        closure = _closure(x, back, constants)
        if not closure:
            continue
        inside = set(closure)
        for y in sorted(closure, key=order.__getitem__, reverse=True):  # the largest region first
            if y in covered or not _same_shape(x, y) or not tensor_val(y).is_floating_point():
                continue
            region = _region_of(y, inside)
            members = set(region)
            if members & covered or any(u not in members and u not in back for n in region if n is not y
                                        for u in n.users):
                continue  # an inner value feeds other forward work: not a function's private chain
            touched = {claimed_by[n] for n in region if n in claimed_by}
            if members <= all_claimed or any(not claimed[k] <= members for k in touched):
                continue  # an op-name site's own region (or a part of one)
            if not any(n.target not in CASTS for n in region):
                continue
            bwd = _backward_region(members, x, by_seq, back, constants, flags, order, forward_seqs)
            if bwd is None:
                continue
            backward, grad_in, grad_out = bwd
            if not _same_shape(grad_in, x) or not _same_shape(grad_out, x):
                continue
            region = sorted(region, key=order.__getitem__)
            function = _recognise(x, region, y, backward, grad_in, grad_out, constants)
            if function is None:
                continue
            covered |= members
            found.append(ComputedRegion(function, x, y, region, backward, grad_in, grad_out))
    return found
