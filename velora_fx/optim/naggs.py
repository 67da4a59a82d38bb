r"""NAG-GS (Leplat, Merkulov, Katrutsa, Bershatsky, Tsymboi, Oseledets, arXiv:2209.14937).

Why: an accelerated (Nesterov-like) method whose only extra state is one vector v per parameter
(same memory as SGD+momentum), obtained by a semi-implicit Gauss-Seidel discretisation of the
accelerated SDE; the implicit treatment of the linear terms lets it take much larger steps
than the explicit (Euler) discretisation while staying stable.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["NAGGS", "naggs_stability_bound"]


def naggs_stability_bound(L: float, mu: float, gamma: float | None = None) -> float:
    r"""Largest α for which the NAG-GS iteration on f(x) = ½ xᵀAx, spec(A) ⊂ (0, L], is stable when
    γ is held at ``gamma`` (default: its fixed point γ = μ).

    Derived (Jury criterion on the 2x2 iteration matrix, see :class:`NAGGS`):
    stable iff α²(L − 2μ) − 2α(μ + γ) − 4γ < 0, i.e. for L > 2μ
    α < [μ + γ + √((μ − γ)² + 4γ(L − μ))] / (L − 2μ); for L <= 2μ every α > 0 is stable.
    """
    g = mu if gamma is None else gamma
    if L <= 2 * mu:
        return float("inf")
    return (mu + g + ((mu - g) ** 2 + 4 * g * (L - mu)) ** 0.5) / (L - 2 * mu)


class NAGGS(Optimizer):
    r"""NAG-GS: semi-implicit Gauss-Seidel integration of the accelerated Nesterov flow.

    Flow (paper, deterministic part):  dx = (v − x) dt,  dv = (μ/γ)(x − v) dt − (1/γ)∇f(x) dt,
    dγ = (μ − γ) dt.  One step of size α (= ``lr``), Gauss-Seidel order γ → x → v, linear terms
    implicit, gradient taken at the freshly updated x:

        a       = α / (1 + α)
        γ_{k+1} = (1 − a) γ_k + a μ                       (implicit Euler on dγ)
        x_{k+1} = (1 − a) x_k + a v_k                     (= (x_k + α v_k)/(1 + α))
        v_{k+1} = (γ_{k+1} v_k + αμ x_{k+1} − α ∇f(x_{k+1})) / (γ_{k+1} + αμ)
                = (1 − b) v_k + b (x_{k+1} − ∇f(x_{k+1})/μ),   b = αμ / (γ_{k+1} + αμ)

    A PyTorch step owns the gradient at the *current* parameters, so each ``step()`` performs the
    v-update (with the stored γ_{k+1}), then γ_{k+2}, then x_{k+2}: the same sequence as above, cut
    at a different place.  Initialisation v_0 = x_0 makes x_1 = x_0 exactly, so the first ``step()``
    starts at "v_1" and the iterates coincide with the algorithm run from (x_0, v_0 = x_0, γ_0).

    ``weight_decay`` adds wd·x to the gradient (L2; it raises the strong convexity the method sees).
    Defaults lr=1e-2, mu=1.0, gamma=1.0 are those of the authors' PyTorch release (their README's
    quadratic example uses α=0.05, μ=1, γ=1.5).

    Each line is the implicit (Gauss-Seidel: newest values on the right) Euler step of the flow, e.g.
    x_{k+1} − x_k = α(v_k − x_{k+1}) and γ_{k+1} − γ_k = α(μ − γ_{k+1}).

    Stability on f = ½ xᵀAx with spec(A) ⊂ [μ, L] at the fixed point γ = μ: the paper studies the
    spectral radius of the 2x2 iteration matrix of this scheme; applying the Jury criterion to it
    (det = γ/((γ+αμ)(1+α)) < 1 always; trace condition gives the bound) yields
    α < (2μ + 2√(μ(L − μ))) / (L − 2μ) for L > 2μ, and stability for every α when L <= 2μ
    (:func:`naggs_stability_bound`; sharpness checked in tests).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, mu: float = 1.0, gamma: float = 1.0,
                 weight_decay: float = 0.0):
        if lr <= 0:
            raise ValueError(f"invalid lr (alpha): {lr}")
        if mu <= 0:
            raise ValueError(f"invalid mu: {mu}")
        if gamma <= 0:
            raise ValueError(f"invalid gamma: {gamma}")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay: {weight_decay}")
        super().__init__(params, dict(lr=lr, mu=mu, gamma=gamma, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            alpha, mu, wd = group["lr"], group["mu"], group["weight_decay"]
            a = alpha / (1.0 + alpha)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("NAGGS does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["v"] = p.detach().clone(memory_format=torch.preserve_format)   # v_0 = x_0
                    state["gamma"] = (1 - a) * group["gamma"] + a * mu                   # γ_1
                g = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                v, gamma = state["v"], state["gamma"]
                b = alpha * mu / (gamma + alpha * mu)
                v.mul_(1 - b).add_(p, alpha=b).add_(g, alpha=-b / mu)       # v_{k+1}
                state["gamma"] = (1 - a) * gamma + a * mu                   # γ_{k+2}
                p.mul_(1 - a).add_(v, alpha=a)                              # x_{k+2}
                state["step"] += 1
        return loss
