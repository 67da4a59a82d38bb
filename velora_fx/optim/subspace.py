"""Online Subspace Descent (Liang, Liu, Chen, Liu, NeurIPS 2024, arXiv:2408.12857).

Why: Adam keeps two full-size moments per weight matrix (2·m·n floats).  Projecting each gradient
onto a rank-r subspace keeps the moments in the small space (2·m·r), like GaLore, but instead of a
periodic SVD the projection P follows the gradients by one optimizer step per training step on an
online-PCA loss -- cheap, and it never jumps (the paper's Hamiltonian-descent argument needs a
continuously moving P, not SVD restarts).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.adamw import adamw as _torch_adamw

__all__ = ["OnlineSubspaceDescent", "online_pca_loss", "online_pca_grad"]


def online_pca_loss(P: torch.Tensor, G: torch.Tensor, ortho: float = 0.0) -> torch.Tensor:
    """L(P) = ||G - G Pᵀ P||_F² + ortho·||P Pᵀ - I||_F² for P (r x n), G (m x n).  Reference only
    (the optimizer uses the closed-form gradient :func:`online_pca_grad`)."""
    E = G - (G @ P.T) @ P
    loss = (E * E).sum()
    if ortho:
        D = P @ P.T - torch.eye(P.shape[0], dtype=P.dtype, device=P.device)
        loss = loss + ortho * (D * D).sum()
    return loss


def online_pca_grad(P: torch.Tensor, G: torch.Tensor, ortho: float = 0.0) -> torch.Tensor:
    """Closed-form ∇_P of :func:`online_pca_loss`, without forming the n x n matrix GᵀG.

    With S = G Pᵀ (m x r):  ∇ = -4 SᵀG + 2 (P Pᵀ) SᵀG + 2 (SᵀS) P  [+ 4·ortho·(P Pᵀ - I) P].
    Cost O(m·n·r); derived from L = tr A - 2 tr(P A Pᵀ) + tr(P A Pᵀ P Pᵀ), A = GᵀG.
    """
    S = G @ P.mT                      # m x r   (leading batch dims allowed throughout)
    StG = S.mT @ G                    # r x n   (= P A)
    PPt = P @ P.mT                    # r x r
    grad = -4.0 * StG + 2.0 * (PPt @ StG) + 2.0 * ((S.mT @ S) @ P)
    if ortho:
        grad = grad + 4.0 * ortho * ((PPt - torch.eye(P.shape[-2], dtype=P.dtype, device=P.device)) @ P)
    return grad


class OnlineSubspaceDescent(Optimizer):
    r"""Online Subspace Descent with Adam in the subspace (Liang et al. 2024, arXiv:2408.12857).

    For a 2-D parameter W whose gradient G is (after an optional transpose) s x l with s <= l and
    s > ``rank`` (and >= ``min_dim``), a projection P (rank x l) is kept:

    * init (first step only): P = top-``rank`` right singular vectors of G (one ``torch.linalg.svd``);
    * R = G Pᵀ (s x rank); Adam moments on R only -> state is s x rank, not s x l;
    * W ← W(1 - lr·wd) - lr·scale·(m̂ / (√v̂ + eps)) P       (decoupled weight decay, AdamW style);
    * G̃ = G / ||G||_F;  P ← one Adam (or SGD) step on the online-PCA loss
      ||G̃ - G̃ PᵀP||_F² (+ ``proj_ortho``·||PPᵀ - I||_F², the paper's optional regulariser),
      gradient in closed form (:func:`online_pca_grad`).  No periodic SVD.

    Everything else (biases, norms, small matrices, groups with ``subspace=False`` or params for which
    ``target`` says False) gets plain AdamW, stepped by torch's own functional
    ``torch.optim.adamw.adamw`` with ``torch.optim.AdamW``'s default flags (torch picks foreach or
    single-tensor the same way; ``step`` is a CPU scalar tensor as torch keeps it): bitwise equal to
    ``torch.optim.AdamW`` with the same lr, betas, eps and weight_decay (note OSD's default
    weight_decay is 0, AdamW's 1e-2).  ``target(name_or_param) -> bool`` is called with the
    parameter name when the optimizer was given ``named_parameters()``, else with the tensor.

    P's step is ``proj_lr · lr_t / lr_0`` (lr_0: the group's lr when the optimizer was built), so it
    follows whatever schedule drives ``lr``, as in the authors' code.  The default 5e-3 is their
    code's rate (1 / update_proj_gap at gap 200); the paper's "5 × W's rate" gives the same at
    lr 1e-3.  It is *not* tied to lr by default: at GaLore's lr 1e-2, 5·lr = 0.05 moves Adam's P by
    more than its own entries (~1/√l) per step, and a 58 M Llama then stalled at val loss 6.1 where
    AdamW reached 3.9 (H100, benchmarks/optim_compare.py, docs/optim.md).

    Measured drift of P (64 x 256, rank 8, 300 steps at lr 1e-2): ||PPᵀ - I|| is 0.03 with Adam at
    ``proj_lr=1e-3``, 0.15 at the default 5e-3 and about 1 at 5e-2; ``proj_ortho=1`` or
    ``proj_optimizer="sgd"`` keep it below 0.04.  A drifting P rescales the effective step.
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, rank: int = 128,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 scale: float = 1.0, proj_lr: float = 5e-3, proj_optimizer: str = "adam",
                 proj_ortho: float = 0.0, min_dim: int = 0, subspace: bool = True,
                 target: Callable[[Any], bool] | None = None):
        if lr < 0:
            raise ValueError(f"invalid lr: {lr}")
        if rank < 1:
            raise ValueError(f"invalid rank: {rank}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas: {betas}")
        if proj_optimizer not in ("adam", "sgd"):
            raise ValueError(f"proj_optimizer must be 'adam' or 'sgd', got {proj_optimizer!r}")
        if proj_lr < 0:
            raise ValueError(f"invalid proj_lr: {proj_lr}")
        self._target = target
        defaults = dict(lr=lr, rank=rank, betas=tuple(betas), eps=eps, weight_decay=weight_decay, scale=scale,
                        proj_lr=proj_lr, proj_optimizer=proj_optimizer, proj_ortho=proj_ortho, min_dim=min_dim,
                        subspace=subspace)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("proj_lr_base_lr", group["lr"])  # lr_0 of ``proj_lr · lr_t / lr_0``

    # -- helpers --------------------------------------------------------------------------------
    def _uses_subspace(self, group: dict, p: torch.Tensor, name: str | None) -> bool:
        if not group["subspace"] or p.ndim != 2:
            return False
        small = min(p.shape)
        if small <= group["rank"] or small < group["min_dim"]:
            return False
        if self._target is not None:
            return bool(self._target(name if name is not None else p))
        return True

    def optimizer_state_bytes(self) -> int:
        """Bytes held by all state tensors (moments, projections)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values()
                   if torch.is_tensor(v))

    # -- step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}
        for group in self.param_groups:
            names = group.get("param_names")
            plain: list[torch.Tensor] = []   # this group's AdamW parameters, stepped together below
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("OnlineSubspaceDescent does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:
                    name = names[i] if names is not None else None
                    if self._uses_subspace(group, p, name):
                        self._init_subspace(state, group, p)
                    else:   # as torch.optim.AdamW's lazy init (capturable=False, fused=False)
                        state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if "proj" in state:
                    key = (id(group), tuple(p.shape), p.dtype, p.device, state["step"])
                    buckets.setdefault(key, []).append((p, state))
                else:
                    plain.append(p)
            if plain:
                self._adamw_step(plain, group)
        groups = {id(g): g for g in self.param_groups}
        for key, items in buckets.items():
            self._subspace_step(items, groups[key[0]])
        return loss

    @staticmethod
    def _oriented(g: torch.Tensor, transposed: bool) -> torch.Tensor:
        return g.T if transposed else g

    def _init_subspace(self, state: dict, group: dict, p: torch.Tensor) -> None:
        transposed = p.shape[0] > p.shape[1]          # project the larger side: G' = (s x l), s <= l
        G = self._oriented(p.grad, transposed).float()
        _, _, Vh = torch.linalg.svd(G, full_matrices=False)
        r = group["rank"]
        s = G.shape[0]
        state["step"] = 0
        state["transposed"] = transposed
        state["proj"] = Vh[:r].contiguous().to(p.dtype)                       # r x l
        state["exp_avg"] = torch.zeros(s, r, dtype=p.dtype, device=p.device)  # s x r
        state["exp_avg_sq"] = torch.zeros(s, r, dtype=p.dtype, device=p.device)
        if group["proj_optimizer"] == "adam":
            state["proj_exp_avg"] = torch.zeros_like(state["proj"])
            state["proj_exp_avg_sq"] = torch.zeros_like(state["proj"])

    @staticmethod
    def _adam_direction(m: torch.Tensor, v: torch.Tensor, g: torch.Tensor, betas, eps: float, step: int):
        b1, b2 = betas
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bc1 = 1 - b1 ** step
        bc2 = 1 - b2 ** step
        return (m / bc1) / ((v / bc2).sqrt_().add_(eps))

    def _adamw_step(self, params: list[torch.Tensor], group: dict) -> None:
        """Plain AdamW for ``params`` (one group) through torch's functional AdamW: the same kernels,
        op order and foreach/fused choice as ``torch.optim.AdamW`` with default flags, hence
        bitwise-equal results."""
        states = [self.state[p] for p in params]
        for st in states:
            if not torch.is_tensor(st["step"]):  # a state saved when the step was a Python int
                st["step"] = torch.tensor(float(st["step"]), dtype=_scalar_dtype())
        b1, b2 = group["betas"]
        _torch_adamw(params, [p.grad for p in params], [st["exp_avg"] for st in states],
                     [st["exp_avg_sq"] for st in states], [], [st["step"] for st in states],
                     foreach=None, capturable=False, differentiable=False, fused=None,
                     has_complex=any(torch.is_complex(p) for p in params),
                     amsgrad=False, beta1=b1, beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"],
                     eps=group["eps"], maximize=False)

    def _subspace_step(self, items: list[tuple[torch.Tensor, dict]], group: dict) -> None:
        """One step for every subspace weight of one group with one shape, stacked: a transformer's
        q/k/v/o (or its MLP matrices) share a shape, so the ~25 small kernels per weight become ~25
        batched ones per shape -- a per-weight loop left the step host-bound at 3x AdamW's time."""
        params = [p for p, _ in items]
        states = [st for _, st in items]
        transposed = states[0]["transposed"]
        for st in states:
            st["step"] += 1
        step, lr = states[0]["step"], group["lr"]

        def stacked(key: str) -> torch.Tensor:
            return torch.stack([st[key] for st in states])

        G = torch.stack([self._oriented(p.grad, transposed) for p in params])      # b x s x l
        P = stacked("proj")                                                          # b x r x l
        m, v = stacked("exp_avg"), stacked("exp_avg_sq")                             # b x s x r
        d = self._adam_direction(m, v, G @ P.mT, group["betas"], group["eps"], step)
        update = d @ P                                                               # back-projected
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        torch._foreach_add_(params, [u.T if transposed else u for u in update.unbind(0)],
                            alpha=-lr * group["scale"])

        # one optimizer step on the online-PCA loss of each normalised gradient (no host sync: a
        # zero gradient gives a zero step; a non-finite one has already poisoned W above)
        norms = torch.linalg.vector_norm(G.flatten(1), dim=1).clamp_min(torch.finfo(G.dtype).tiny)
        gP = online_pca_grad(P, G / norms[:, None, None], group["proj_ortho"])
        base = group.get("proj_lr_base_lr") or lr
        proj_lr = group["proj_lr"] * (lr / base if base else 1.0)
        written = [("exp_avg", m), ("exp_avg_sq", v)]
        if group["proj_optimizer"] == "adam":
            pm, pv = stacked("proj_exp_avg"), stacked("proj_exp_avg_sq")
            gP = self._adam_direction(pm, pv, gP, group["betas"], group["eps"], step)
            written += [("proj_exp_avg", pm), ("proj_exp_avg_sq", pv)]
        P.add_(gP, alpha=-proj_lr)
        written.append(("proj", P))
        for key, value in written:
            torch._foreach_copy_([st[key] for st in states], list(value.unbind(0)))


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives its ``step`` tensors (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _expected_state_numel(shape: tuple[int, int], rank: int, proj_optimizer: str = "adam") -> int:
    """State floats for one subspace parameter (used in docs/tests): 2·s·r moments + (1 or 3)·r·l for P."""
    s, l = sorted(shape)
    return 2 * s * rank + (3 if proj_optimizer == "adam" else 1) * rank * l

