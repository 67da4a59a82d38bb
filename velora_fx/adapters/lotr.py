"""LoTR: low tensor rank weight adaptation (Bershatsky et al., 2024).

For a group of layers ``l = 1..L`` with weights of one shape ``(d_out, d_in)`` (e.g. every
``q_proj`` of a transformer) the update is a Tucker-2 decomposition of the stacked updates::

    ΔW_l = scale · A G_l Bᵀ        A: (d_out, r), B: (d_in, r)  shared by the group
                                   G_l: (r, r)                  one small core per layer

so a group costs ``d_in·r + d_out·r + L·r²`` trainable parameters.  The cores start at zero, so the
adapted model starts exactly at the base model; A and B start with orthonormal columns.

Each adapted layer is replaced by a :class:`LoTRLinear` that keeps the frozen base layer (its
``.weight`` / ``.bias`` stay readable) and computes ``base(x) + scale · ((x B) G_lᵀ) Aᵀ`` as three
small matmuls, so under ``velora_fx.backend`` the adapter matmuls are ordinary linear sites.  The
shared factors live once, in ``model.lotr_factors`` (an ``nn.ModuleDict`` of :class:`LoTRFactors`,
one per group); a ``LoTRLinear`` only points at its group's factors without registering them, so
``model.parameters()`` and ``state_dict()`` hold A and B once.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LoTRFactors", "LoTRFactorDict", "LoTRLinear", "apply_lotr", "merge_lotr", "unmerge_lotr",
           "lotr_parameter_count", "lotr_report", "lotr_modules"]

FACTORS_ATTR = "lotr_factors"
_MERGED_ATTR = "_lotr_merged"   # merge_lotr(keep_factors=True): path -> LoTRLinear to put back
_GLOB_CHARS = re.compile(r"[*?\[]")


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 style): weight stored as [in, out], y = x W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _shape_of(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a supported layer."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    raise TypeError(f"unsupported module type {type(module).__name__}")


class LoTRFactors(nn.Module):
    """The factors one group shares: ``A`` (d_out, r) and ``B`` (d_in, r)."""

    def __init__(self, d_in: int, d_out: int, rank: int, *, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank = d_in, d_out, rank
        self.A = nn.Parameter(torch.empty(d_out, rank, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.empty(d_in, rank, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # orthonormal columns (orthogonal_ needs float32+; init in fp32 and copy)
        for p in (self.A, self.B):
            tmp = torch.empty(p.shape, dtype=torch.float32, device=p.device)
            nn.init.orthogonal_(tmp)
            with torch.no_grad():
                p.copy_(tmp.to(p.dtype))

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"


class LoTRFactorDict(nn.ModuleDict):
    """``model.lotr_factors``: one :class:`LoTRFactors` per group.  Its ``forward`` is the identity
    because containers that call every child in turn (``nn.Sequential``) now also call it."""

    def forward(self, x: Any) -> Any:
        return x


class LoTRLinear(nn.Module):
    """A frozen base layer (``nn.Linear`` or transformers' ``Conv1D``) plus ``scale · A G Bᵀ``."""

    def __init__(self, base: nn.Module, factors: LoTRFactors, scale: float = 1.0, group: str = "") -> None:
        super().__init__()
        d_in, d_out = _shape_of(base)
        if (d_in, d_out) != (factors.d_in, factors.d_out):
            raise ValueError(f"factors are ({factors.d_in}->{factors.d_out}), layer is ({d_in}->{d_out})")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.core = nn.Parameter(torch.zeros(factors.rank, factors.rank, device=factors.A.device,
                                             dtype=factors.A.dtype))
        # not registered: A and B belong to model.lotr_factors only (parameters()/state_dict() once)
        object.__setattr__(self, "factors", factors)
        self.scale = float(scale)
        self.group = group
        self.transposed = _is_conv1d(base)
        self.in_features, self.out_features = d_in, d_out

    # code that reads the wrapped layer's tensors keeps working
    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def delta_weight(self) -> Tensor:
        """ΔW in the base layer's own layout ([out, in] for Linear, [in, out] for Conv1D)."""
        f = self.factors
        delta = self.scale * (f.A @ self.core @ f.B.T)
        return delta.T if self.transposed else delta

    def forward(self, x: Tensor) -> Tensor:
        f = self.factors
        h = torch.matmul(x, f.B)       # x B       (.., r)
        h = F.linear(h, self.core)     # (x B) Gᵀ  (.., r)
        h = F.linear(h, f.A)           # (..) Aᵀ   (.., d_out)
        if self.scale != 1.0:
            h = h * self.scale
        return self.base(x) + h

    def extra_repr(self) -> str:
        return f"group={self.group!r}, rank={self.core.shape[0]}, scale={self.scale:g}"


def _matches(path: str, pattern: str) -> bool:
    if _GLOB_CHARS.search(pattern):
        return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)
    return path == pattern or path.endswith("." + pattern)


def _group_key(pattern: str, taken: Iterable[str]) -> str:
    key = re.sub(r"[^0-9A-Za-z]+", "_", pattern).strip("_") or "group"
    taken = set(taken)
    base, i = key, 1
    while key in taken:
        i += 1
        key = f"{base}_{i}"
    return key


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def lotr_modules(model: nn.Module) -> list[tuple[str, LoTRLinear]]:
    """The ``(path, LoTRLinear)`` pairs of a model, each module once."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoTRLinear)]


def apply_lotr(model: nn.Module, target_modules: Sequence[str] | str, rank: int, alpha: float | None = None,
               share: str = "by_name", freeze_base: bool = True) -> nn.Module:
    """Adapt ``model`` in place with LoTR and return it.

    ``target_modules``: PEFT-style patterns on ``named_modules()`` paths: a plain name matches a
    path equal to it or ending in ``"." + name`` (``"q_proj"``, ``"mlp.down_proj"``); a pattern with
    ``* ? [`` is a glob on the whole path (``"*.mlp.down_proj"``, ``"model.layers.*.self_attn.q_proj"``).
    ``share="by_name"``: the modules a pattern matches form one group sharing A and B (a module
    matched by several patterns goes to the first); ``share="all"``: every matched module forms one
    group.  All modules of a group must have one (in, out) shape.  ``alpha``: the update is scaled by
    ``alpha / rank`` (``None``: 1).  ``freeze_base``: set ``requires_grad=False`` on every
    parameter of the model that is not a LoTR adapter parameter (like PEFT), so only A, B and the
    cores train.

    Calling it again on an adapted model adds adapters to *other* modules: the new groups join
    ``model.lotr_factors`` next to the earlier ones, and the earlier adapters (their A, B and cores)
    keep their ``requires_grad`` -- they stay trainable; ``freeze_base`` freezes the model's own
    weights only.  Two calls equal one call with both pattern lists (given the same RNG state).
    Adapters do not stack: if a pattern matches a module that is already a :class:`LoTRLinear`, the
    call raises ``ValueError`` naming every such module and leaves the model untouched.  A model
    merged with ``merge_lotr(model, keep_factors=True)`` is refused too (``unmerge_lotr`` would
    put the old adapters back over the new ones); unmerge it first.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    patterns = list(target_modules)
    if not patterns:
        raise ValueError("apply_lotr: target_modules is empty")
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"apply_lotr: rank must be a positive int, got {rank!r}")
    if share not in ("by_name", "all"):
        raise ValueError(f"apply_lotr: share must be 'by_name' or 'all', got {share!r}")
    scale = 1.0 if alpha is None else float(alpha) / rank
    if model.__dict__.get(_MERGED_ATTR):
        raise ValueError("apply_lotr: the model was merged with merge_lotr(model, keep_factors=True); "
                         "call unmerge_lotr(model) (or merge_lotr(model)) before adding adapters")

    # match, skipping what LoTR itself added; a module reachable by several paths is adapted once
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    paths_of: dict[int, list[str]] = {}
    adapted: list[str] = []   # matched modules that already are LoTRLinear (refused below)
    for path, module in model.named_modules(remove_duplicate=False):
        if not path or path == FACTORS_ATTR or path.startswith(FACTORS_ATTR + "."):
            continue
        pattern = next((p for p in patterns if _matches(path, p)), None)
        if pattern is None:
            continue
        if isinstance(module, LoTRLinear):
            adapted.append(path)
            continue
        if any(isinstance(m, LoTRLinear) for m in _ancestors(model, path)):
            continue  # the base layer inside an adapter
        if id(module) in paths_of:
            paths_of[id(module)].append(path)
            continue
        if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
            raise TypeError(f"apply_lotr: module {path!r} matched {pattern!r} but is a {type(module).__name__}; "
                            "LoTR supports nn.Linear and transformers' Conv1D")
        paths_of[id(module)] = [path]
        groups.setdefault(pattern if share == "by_name" else "all", []).append((path, module))
    if adapted:
        shown = ", ".join(repr(p) for p in adapted)
        raise ValueError(f"apply_lotr: module{'s' if len(adapted) > 1 else ''} {shown} "
                         f"{'are' if len(adapted) > 1 else 'is'} already LoTR-adapted (matched by "
                         f"{patterns!r}); LoTR adapters do not stack -- target other modules, or "
                         "merge_lotr(model) first")
    if not groups:
        raise ValueError(f"apply_lotr: target_modules {patterns!r} matched no module of {type(model).__name__}")

    # check shapes before touching the model
    for name, members in groups.items():
        first_path, first = members[0]
        shape = _shape_of(first)
        for path, module in members[1:]:
            if _shape_of(module) != shape:
                d_in, d_out = _shape_of(module)
                raise ValueError(f"apply_lotr: module {path!r} is ({d_in}->{d_out}) but group {name!r} shares "
                                 f"factors of ({shape[0]}->{shape[1]}) (from {first_path!r}); use separate patterns")

    container = getattr(model, FACTORS_ATTR, None)
    if container is not None and not isinstance(container, nn.ModuleDict):
        raise ValueError(f"apply_lotr: model.{FACTORS_ATTR} exists and is not an nn.ModuleDict")
    if freeze_base:
        # the model's own weights; adapters of an earlier call keep their requires_grad
        earlier = {id(p) for p in (container.parameters() if container is not None else ())}
        earlier |= {id(m.core) for _, m in lotr_modules(model)}
        for p in model.parameters():
            if id(p) not in earlier:
                p.requires_grad_(False)
    if container is None:
        container = LoTRFactorDict()
        setattr(model, FACTORS_ATTR, container)
    for name, members in groups.items():
        key = _group_key(name, container.keys())
        first = members[0][1]
        d_in, d_out = _shape_of(first)
        factors = LoTRFactors(d_in, d_out, rank, device=first.weight.device, dtype=first.weight.dtype)
        container[key] = factors
        for _, module in members:
            wrapper = LoTRLinear(module, factors, scale, group=key)
            for path in paths_of[id(module)]:
                _set_submodule(model, path, wrapper)
    return model


def _ancestors(model: nn.Module, path: str) -> list[nn.Module]:
    out, parts = [], path.split(".")
    for i in range(1, len(parts)):
        try:
            out.append(model.get_submodule(".".join(parts[:i])))
        except AttributeError:
            break
    return out


@torch.no_grad()
def merge_lotr(model: nn.Module, keep_factors: bool = False) -> nn.Module:
    """Fold each ``scale · A G_l Bᵀ`` into its base weight and put the plain base layers back.

    ``keep_factors=False``: ``model.lotr_factors`` is removed, the model is a plain model again.
    ``keep_factors=True``: factors and adapters are kept (off the module tree) so
    :func:`unmerge_lotr` can subtract the update and restore the adapters.
    """
    merged: dict[str, LoTRLinear] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoTRLinear):
            merged[path] = module
    if not merged:
        raise ValueError("merge_lotr: the model has no LoTR adapters")
    done: set[int] = set()
    for path, module in merged.items():
        if id(module) not in done:
            module.base.weight.add_(module.delta_weight().to(module.base.weight.dtype))
            done.add(id(module))
        _set_submodule(model, path, module.base)
    if keep_factors:
        object.__setattr__(model, _MERGED_ATTR, merged)
    else:
        if hasattr(model, FACTORS_ATTR):
            delattr(model, FACTORS_ATTR)
        model.__dict__.pop(_MERGED_ATTR, None)
    return model


@torch.no_grad()
def unmerge_lotr(model: nn.Module) -> nn.Module:
    """Reverse ``merge_lotr(model, keep_factors=True)``: subtract the updates, restore the adapters."""
    merged = model.__dict__.get(_MERGED_ATTR)
    if not merged:
        raise ValueError("unmerge_lotr: the model was not merged with merge_lotr(model, keep_factors=True)")
    done: set[int] = set()
    for path, module in merged.items():
        if id(module) not in done:
            module.base.weight.sub_(module.delta_weight().to(module.base.weight.dtype))
            done.add(id(module))
        _set_submodule(model, path, module)
    del model.__dict__[_MERGED_ATTR]
    return model


def lotr_report(model: nn.Module) -> dict[str, Any]:
    """Per group: member paths, shape, rank, L, parameter count (``d_in·r + d_out·r + L·r²``); and
    totals: LoTR parameters, trainable and all parameters of the model."""
    container = getattr(model, FACTORS_ATTR, None)
    groups: dict[str, dict[str, Any]] = {}
    members: dict[int, list[str]] = {}
    for path, m in lotr_modules(model):
        members.setdefault(id(m.factors), []).append(path)
    if container is not None:
        for key, f in container.items():
            paths = members.get(id(f), [])
            r, n = f.rank, len(paths)
            groups[key] = {"modules": paths, "d_in": f.d_in, "d_out": f.d_out, "rank": r, "layers": n,
                           "params": f.d_in * r + f.d_out * r + n * r * r}
    params = list(model.parameters())
    return {"groups": groups,
            "lotr_params": sum(g["params"] for g in groups.values()),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "total_params": sum(p.numel() for p in params)}


def lotr_parameter_count(model: nn.Module) -> int:
    """Trainable LoTR parameters: Σ over groups of ``d_in·r + d_out·r + L·r²`` (counted from the tensors)."""
    container = getattr(model, FACTORS_ATTR, None)
    seen: set[int] = set()
    total = 0
    tensors = list(container.parameters()) if container is not None else []
    tensors += [m.core for _, m in lotr_modules(model)]
    for p in tensors:
        if id(p) not in seen and p.requires_grad:
            seen.add(id(p))
            total += p.numel()
    return total
