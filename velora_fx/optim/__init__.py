"""Memory-lean optimizers to pair with the velora_fx backend.

* :class:`OnlineSubspaceDescent` -- Adam moments in an online-PCA-tracked rank-r subspace
  (Liang et al., NeurIPS 2024).
* :class:`NAGGS` -- semi-implicit Gauss-Seidel accelerated optimizer, one state vector per param
  (Leplat et al., arXiv:2209.14937).
* :func:`galore` / ``GaLoreBaseline`` -- thin factory over the optional ``galore-torch`` package
  (``pip install galore-torch``), imported lazily, for baseline comparisons.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from .naggs import NAGGS, naggs_stability_bound
from .subspace import OnlineSubspaceDescent, online_pca_grad, online_pca_loss

__all__ = ["OnlineSubspaceDescent", "NAGGS", "galore", "GaLoreBaseline", "naggs_stability_bound",
           "online_pca_loss", "online_pca_grad"]


def galore(params: Iterable[Any], rank: int = 128, update_proj_gap: int = 200, scale: float = 0.25,
           lr: float = 1e-3, weight_decay: float = 0.0, proj_type: str = "std", **kwargs: Any):
    """GaLore baseline (Zhao et al. 2024, arXiv:2403.03507) via ``galore_torch.GaLoreAdamW``.

    2-D tensors go to the low-rank group, everything else to a plain group.  Needs the optional
    dependency: ``pip install galore-torch``.
    """
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("velora_fx.optim.galore needs the optional 'galore' extra: "
                          "pip install galore-torch") from exc
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = params
    else:
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        low = [p for p in tensors if isinstance(p, torch.Tensor) and p.ndim == 2]
        rest = [p for p in tensors if not (isinstance(p, torch.Tensor) and p.ndim == 2)]
        groups = [g for g in ({"params": rest},
                              {"params": low, "rank": rank, "update_proj_gap": update_proj_gap, "scale": scale,
                               "proj_type": proj_type}) if g["params"]]
    kwargs.setdefault("no_deprecation_warning", True)
    return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay, **kwargs)


GaLoreBaseline = galore
