"""What VeLoRA would cost each weight gradient: the planner's ``estimated_error`` per activation
group and sub-token size g, measured on the batch being compiled.

Two measurements, and the estimate is the larger (``SiteEstimator.source`` says which):

- ``gradient``: one calibration backward of the joint graph on the real batch, with the real
  output gradients of the graph's loss (tangent 1 on each scalar output, 0 elsewhere).  Per site,
  the relative squared error of the weight gradient itself, ``|Gᵀ(x - x̂)|² / |Gᵀx|²``; a group's
  is its worst site's.  Beside it, ``update_share``: the fraction of a normalised (sign) step's
  first-order loss decrease the approximation reverses, ``2 Σ|∇W|·[sign flips] / Σ_θ |∇θ|`` over
  every trained parameter, which weighs a site by how much its weights' updates matter (Adam's
  step is sign-like per element).  Not measured in a graph with no scalar output to differentiate
  (a graph break before the loss, a model returning logits), or with ``estimate="activation"``
  (no calibration backward, none of its memory).
- ``activation``: the relative energy the fixed v drops from the activation (``structural``:
  ``1 - 1/g``, with no data at all).

Why the larger: the v is fixed from the first batch, and the weight gradient at initialisation can
be unusually well aligned with it (GPT-2's tied lm_head measured a gradient error under 0.6 at
g = 4, which the default then chose, and the 3-seed loss cost rose from +0.74 % to +1.18 %,
docs/quality.md); the activation's energy is what every later batch loses.  The gradient
measurement therefore only ever makes the estimate more cautious, and ranks sites (update share).

A batch whose sub-tokens span r < g directions says nothing about the other g - r: the estimate is
then at least (g - r) / g, so a degenerate batch (constant tokens, zeros) never reads as exact.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from .._compat import int_hint, is_joint_primal, is_joint_tangent, real_tensors
from ..codecs.velora import project, reconstruct, reconstruction_error
from ..config import VeloraConfig
from ..report import exception_line
from ..state import initial_vector, random_seed, random_vector, subtokens
from .calibrate import activation_values, evaluate
from .graph_utils import CASTS, ancestors, output_values, tensor_val
from .sites import ActivationGroup, Site

__all__ = ["SiteEstimator", "structural_error", "unseen_directions"]

def structural_error(g: int) -> float:
    """The estimate without data: sub-tokens spread evenly over all directions keep 1/g of their
    energy on any fixed unit vector."""
    return 1.0 - 1.0 / g


def unseen_directions(x: Tensor, g: int) -> float:
    """(g - r) / g for the numerical rank r of ``x``'s sub-tokens of size g: the share of the
    directions this batch never visits (0 when its sub-tokens span all g)."""
    s = subtokens(x.detach(), g).reshape(-1, g).float()
    eig = torch.linalg.eigvalsh(s.T @ s)
    top = float(eig[-1]) if eig.numel() else 0.0
    if not (0.0 < top < float("inf")):
        return 1.0
    rank = int((eig > 1e-6 * top).sum())
    return (g - rank) / g


class SiteEstimator:
    """``estimator(group, g)`` -> estimated_error; ``values``: the calibration activations (of the
    groups and of ``extra`` nodes, for the element-wise codecs); ``failure``: why there is no data.

    ``gradient_sizes(group)``: the sub-token sizes to measure with the calibration backward (None:
    activation estimate only); ``num_fwd_outputs`` / ``param_indices`` locate the weight gradients."""

    def __init__(self, gm: fx.GraphModule, groups: list[ActivationGroup], real_primals, config: VeloraConfig,
                 names: dict[int, str], extra: Sequence[str] = (), *,
                 gradient_sizes: Callable[[ActivationGroup], list[int]] | None = None,
                 num_fwd_outputs: int = 0, param_indices: Sequence[int] = ()):
        self.config, self.names = config, names
        self.values: dict[str, Tensor] = {}
        self.failure = ""            # why there is no calibration data, if there is none
        self.gradient_failure = ""   # why the gradient measurement is missing, if it is
        self.gradient_raised = False  # it failed (not: this graph has no loss, a zero gradient)
        self._cache: dict[tuple, float] = {}
        self._vectors: dict[tuple[str, int], Tensor] = {}
        self._measured: dict[tuple[str, int], tuple[float, float]] = {}  # (error, update share)
        wanted = sorted({g.encode_at for g in groups} | set(extra))
        if real_primals is None or not wanted:
            return
        if gradient_sizes is not None and config.estimate == "gradient" and groups:
            try:
                with real_tensors():
                    self._calibrate_backward(gm, real_primals, groups, wanted, gradient_sizes,
                                             num_fwd_outputs, param_indices)
            except Exception as exc:  # noqa: BLE001 - no gradient data: the activation estimate
                self.values, self._measured, self._vectors = {}, {}, {}
                self.gradient_failure, self.gradient_raised = exception_line(exc), True
        if not self.values:
            try:
                with real_tensors():
                    self.values = activation_values(gm, real_primals, wanted)
            except Exception as exc:  # noqa: BLE001 - no data: structural estimate
                self.failure = exception_line(exc)

    # -- what the planner asks -----------------------------------------------------------------
    def has_data(self, group: ActivationGroup) -> bool:
        return group.encode_at in self.values

    def source(self, group: ActivationGroup, g: int) -> str:
        """Which measurement decided the estimate at g (the larger one): gradient | activation | structural."""
        gradient = self.gradient_error(group, g)
        if g == 1 or (gradient is not None and gradient >= self._activation(group, g)):
            return "gradient"
        return "activation" if self.has_data(group) else "structural"

    def gradient_error(self, group: ActivationGroup, g: int) -> float | None:
        """The weight gradients' own relative squared error at g (None: not measured)."""
        measured = self._measured.get((group.encode_at, g))
        return None if measured is None else measured[0]

    def update_share(self, group: ActivationGroup, g: int) -> float | None:
        """The fraction of a sign step's first-order loss decrease lost at g (None: not measured)."""
        measured = self._measured.get((group.encode_at, g))
        return None if measured is None else measured[1]

    def initial(self, group: ActivationGroup, g: int) -> Tensor:
        """The v the init rule installs for ``group`` at sub-token size ``g`` (fp32; computed once:
        each site of a group, the activation estimate and the planner's commit ask for it)."""
        key = (group.encode_at, g)
        if key not in self._vectors:
            with real_tensors():
                self._vectors[key] = random_vector(g, random_seed(self.names[id(group)])) \
                    if self.config.init == "random" else initial_vector(self.values[group.encode_at], g)
        return self._vectors[key]

    def __call__(self, group: ActivationGroup, g: int) -> float:
        key = (group.encode_at, g)
        if key not in self._cache:
            self._cache[key] = self._estimate(group, g)
        return self._cache[key]

    def _estimate(self, group: ActivationGroup, g: int) -> float:
        if g == 1:
            return 0.0
        gradient = self.gradient_error(group, g)
        activation = self._activation(group, g)
        return activation if gradient is None else max(gradient, activation)

    def _activation(self, group: ActivationGroup, g: int) -> float:
        """The relative energy a fixed v drops from the activation (structural without data)."""
        key = ("activation", group.encode_at, g)
        if key not in self._cache:
            x = self.values.get(group.encode_at)
            if x is None:
                self._cache[key] = structural_error(g)
            else:
                with real_tensors():
                    measured = reconstruction_error(x, self.initial(group, g))
                    # an all-zero (or non-finite) batch says nothing about later ones: the structural bound
                    self._cache[key] = structural_error(g) if measured is None else \
                        max(measured, unseen_directions(x, g))
        return self._cache[key]

    # -- the calibration backward --------------------------------------------------------------
    def _calibrate_backward(self, gm: fx.GraphModule, real_primals, groups: list[ActivationGroup],
                            wanted: list[str], sizes: Callable[[ActivationGroup], list[int]],
                            num_fwd_outputs: int, param_indices: Sequence[int]) -> None:
        tangents = _loss_tangents(gm)
        if tangents is None:
            self.gradient_failure = "no scalar output to differentiate in this graph"
            return
        nodes = {n.name: n for n in gm.graph.nodes}
        primals = [n for n in gm.graph.nodes if is_joint_primal(n)]
        grads = output_values(gm)[num_fwd_outputs:num_fwd_outputs + len(primals)]
        weight_grads = {grads[i] for i in param_indices if i < len(grads) and isinstance(grads[i], fx.Node)}
        sites = {nodes[s.grad_matmul]: (grp, s) for grp in groups for s in grp.sites}
        keep = {nodes[w] for w in wanted}
        keep |= {a for _, s in sites.values() for c in s.chain for a in nodes[c].all_input_nodes}
        needed = ancestors([*keep, *sites, *weight_grads])
        per_site: dict[tuple[str, int], list[tuple[float, float] | None]] = {}
        total_l1 = [0.0]

        def visit(node: fx.Node, env: dict[fx.Node, Any]) -> None:
            if node in weight_grads and isinstance(env[node], Tensor):
                total_l1[0] += float(env[node].float().abs().sum())
            if node in sites:
                grp, site = sites[node]
                x = env[nodes[grp.encode_at]]
                if grp.encode_at not in self.values:
                    self.values[grp.encode_at] = x
                vectors = {g: self.initial(grp, g) for g in sizes(grp)}
                for g, result in _site_errors(site, node, nodes, env, grp.encode_at, x, vectors).items():
                    per_site.setdefault((grp.encode_at, g), []).append(result)
            if node in weight_grads and all(u.op == "output" for u in node.users):
                env.pop(node)  # counted: no need to hold every weight gradient to the end

        env = evaluate(gm, real_primals, tangents, needed, keep, visit)
        self.values = {name: env[nodes[name]] for name in wanted}
        if not total_l1[0] > 0:
            self.gradient_failure = "the calibration batch's weight gradients are all zero"
            return
        for key, rows in per_site.items():
            if rows and all(r is not None for r in rows):
                self._measured[key] = (max(r[0] for r in rows), sum(r[1] for r in rows) / total_l1[0])


def _loss_tangents(gm: fx.GraphModule) -> list[Tensor] | None:
    """Real tangents for the joint graph: 1 for every scalar floating output (the loss), 0 for the
    others (symbolic sizes at their hints: this batch's); None when there is no scalar output."""
    values, found = [], False
    for node in gm.graph.nodes:
        if not is_joint_tangent(node):
            continue
        val = tensor_val(node)
        if not isinstance(val, torch.Tensor):
            return None
        shape = [int_hint(s) for s in val.shape]
        scalar = val.dim() == 0 and val.dtype.is_floating_point
        found |= scalar
        values.append(torch.ones((), dtype=val.dtype, device=val.device) if scalar
                      else torch.zeros(shape, dtype=val.dtype, device=val.device))
    return values if found else None


def _site_errors(site: Site, mm: fx.Node, nodes: dict[str, fx.Node], env: dict[fx.Node, Any], encode_at: str,
                 x: Tensor, vectors: dict[int, Tensor]) -> dict[int, tuple[float, float] | None]:
    """Per g (with its v): (relative squared error of the site's weight gradient, the sign-step loss
    decrease it loses, unnormalised) with ``x``'s reconstruction in place of x; None when the exact
    weight gradient has no energy (a zero output gradient says nothing).  The exact weight gradient
    is computed once for every g."""
    x32 = x.float()
    other32 = env[mm.args[1 - site.operand_index]].float()

    def weight_grad(activation: Tensor) -> Tensor:
        previous, value = nodes[encode_at], activation
        for name in site.chain:  # the views between the encode point and the matmul, replayed
            step = nodes[name]
            if step.target not in CASTS:  # the error is measured in fp32
                args, kwargs = fx.node.map_arg((step.args, step.kwargs),
                                               lambda a: value if a is previous else env[a])
                value = step.target(*args, **kwargs)
            previous = step
        operands = [value, other32] if site.operand_index == 0 else [other32, value]
        return mm.target(*operands, *mm.args[2:])

    exact = weight_grad(x32)
    energy = float((exact * exact).sum())
    if not (0.0 < energy < float("inf")):
        return dict.fromkeys(vectors)
    out: dict[int, tuple[float, float] | None] = {}
    for g, v in vectors.items():
        v = v.to(x.device)
        delta = weight_grad(x32 - reconstruct(project(x32, v), v, torch.float32))
        flips = torch.sign(exact - delta) != torch.sign(exact)
        out[g] = (min(1.0, float((delta * delta).sum()) / energy), 2.0 * float((exact.abs() * flips).sum()))
    return out
