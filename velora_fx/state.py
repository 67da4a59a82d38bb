"""Per-model VeLoRA state: the v vectors (their math and their storage), one small fp32 device
tensor per weight, owned by the model's entry in a backend, handed to the compiled graph as an input.

Why device tensors that the graph takes as inputs: the encode (init rule and projection) is then
plain aten code that inductor fuses into the kernel producing the activation, with no Python per
site per step, and it works under CUDA graphs and with inductor's FX graph cache (the generated
code never refers to the state; the state travels as an argument).

Layout: a weight ``W`` gets a tensor ``[2, 2 + max(W.shape[-2:])]``; row ``o`` is the state of
``W`` used in orientation ``o`` (0: the activation's features match ``W.shape[-1]``, as in
``nn.Linear``; 1: they match ``W.shape[-2]``, as in transformers' ``Conv1D`` or a tied ``Wᵀ``).
A row holds ``[initialised flag, v_0 .. v_{g-1}, unused..., pin]``; the pin holds a coefficient (or
a graph's sum of them) of the last step, written only so that the encodes stay in forward (see
``codecs/velora.emit_pin``).  Keying
state by the weight object (held weakly) and orientation mirrors the eager reference, where v
belongs to the module: a module called twice shares its v, two models never do.

This module owns the vectors; ``codecs/velora.py`` owns the graph code that reads them.
"""
from __future__ import annotations

import math
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["SlotKey", "ModelState", "next_vector", "slot_name", "subtokens", "initial_vector", "random_vector",
           "normalised", "random_seed", "state_shape", "StateError"]

_EPS = 1e-12
_UNIT_TOLERANCE = 1e-3  # a loaded v must be a unit vector up to this relative error


class StateError(ValueError):
    """A state (``load_state_dict``) that cannot be applied; nothing of it was applied."""


# -- the vectors ----------------------------------------------------------------------------------
def subtokens(x: Tensor, g: int) -> Tensor:
    """``x`` as ``[..., D/g, g]``: contiguous chunks of the feature dimension, as in the paper's code."""
    if x.shape[-1] % g:
        raise ValueError(f"sub-token size {g} does not divide the feature size {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def normalised(u: Tensor) -> Tensor:
    """``u / |u|``; the uniform unit vector when ``u`` vanishes or is not finite (v is always a unit vector)."""
    norm = u.norm()
    ok = (norm > _EPS) & (norm < float("inf"))
    return torch.where(ok, u / norm.clamp_min(_EPS), torch.full_like(u, u.numel() ** -0.5))


def initial_vector(x: Tensor, g: int) -> Tensor:
    """The paper's v: normalised mean of all sub-tokens of ``x`` (fp32)."""
    mean = subtokens(x.detach(), g).reshape(-1, g).float().mean(0)
    return normalised(mean)


def random_vector(g: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return normalised(torch.randn(g, generator=gen)).to(device)


def random_seed(name: str) -> int:
    """The seed of ``init="random"`` for a site name (stable across processes)."""
    return zlib.crc32(name.encode())


def next_vector(init: str, name: str, current: Tensor | None, x: Tensor, g: int) -> Tensor:
    """The init rule of the eager reference: v for a batch ``x`` given the current v (None before
    the first batch).  Returns ``current`` itself when it stays.  The compiled graph emits the same
    rule as branch-free aten code (``codecs.velora.VeloraCodec.encode``)."""
    if current is None:
        return random_vector(g, random_seed(name), x.device) if init == "random" else initial_vector(x, g)
    if init == "batch":
        return initial_vector(x, g)
    if init.startswith("ema:"):
        decay = float(init.split(":", 1)[1])
        return normalised(decay * current.to(x.device) + (1.0 - decay) * initial_vector(x, g))
    return current


# -- storage --------------------------------------------------------------------------------------
def state_shape(param: Tensor) -> tuple[int, int]:
    """The state tensor of a weight: one row per orientation, wide enough for either."""
    return 2, 2 + max(param.shape[-2:])


@dataclass(frozen=True)
class SlotKey:
    """Which weight (by identity) and which orientation a state row belongs to."""

    param_id: int
    orientation: int


def slot_name(module_path: str, param_leaf: str, orientation: int, natural: int = 0) -> str:
    """The state key of a slot: the module path for its usual weight and orientation (what users
    see in ``named_modules()``), else the parameter path, suffixed ``:T`` for the other orientation."""
    base = module_path if param_leaf == "weight" else (f"{module_path}.{param_leaf}" if module_path else param_leaf)
    return base if orientation == natural else f"{base}:T"


@dataclass
class _Slot:
    name: str
    owner: "ModelState"
    param_ref: "weakref.ref[Tensor]"
    orientation: int
    features: int                          # the activation's feature size D for this orientation
    sub_token_size: int | None = None      # fixed once a plan compresses it (or a state is loaded)

    @property
    def tensor(self) -> Tensor | None:
        """The weight's current state tensor (it is replaced if the weight moves device)."""
        ref, state = self.owner.tensors.get(id(self.param_ref()), (None, None))
        return state if ref is not None and ref() is self.param_ref() else None

    @property
    def initialised(self) -> bool:
        tensor = self.tensor
        return tensor is not None and bool(tensor[self.orientation, 0] > 0)

    def set_vector(self, v: Tensor | None) -> None:
        """Install ``v`` (None: clear, so the graph's init rule sets it) and fix the sub-token size."""
        row = self.tensor[self.orientation]
        with torch.no_grad():
            row.zero_()
            if v is not None:
                row[1:1 + v.numel()].copy_(v.to(device=row.device, dtype=row.dtype))
                row[0] = 1.0
                self.sub_token_size = v.numel()


@dataclass
class ModelState:
    """The state of one compiled model (or of the free functions a backend compiled): the device
    state per weight, slot names, the sticky per-group plan and the reports of its graphs.
    Weights are held weakly: a deleted model's entries leave with it."""

    label: str
    tensors: dict[int, tuple["weakref.ref[Tensor]", Tensor]] = field(default_factory=dict)  # id(weight) -> state
    slots: dict[SlotKey, _Slot] = field(default_factory=dict)
    plan: dict[str, int] = field(default_factory=dict)   # group name -> g (0: skipped)
    reports: list = field(default_factory=list)

    # -- device tensors -------------------------------------------------------------------------
    def tensor_for(self, param: Tensor) -> Tensor:
        """The state tensor of a weight (created zeroed on its device on first use)."""
        ref, state = self.tensors.get(id(param), (None, None))
        if ref is not None and ref() is not param:  # a dead weight's id was reused
            state = None
        shape = state_shape(param)
        if state is None or state.device != param.device or tuple(state.shape) != shape:
            fresh = torch.zeros(shape, dtype=torch.float32, device=param.device)
            if state is not None and state.shape == fresh.shape:
                fresh.copy_(state)
            state = fresh
            self.tensors[id(param)] = (weakref.ref(param, self._forget(id(param))), state)
        return state

    def _forget(self, key: int) -> Callable[[Any], None]:
        """A weakref callback that drops a dead weight's state and slots (not a later weight's that
        reuses the id)."""
        owner = weakref.ref(self)

        def forget(ref: weakref.ref) -> None:
            state = owner()
            if state is None:
                return
            if state.tensors.get(key, (None,))[0] is ref:
                del state.tensors[key]
            for slot_key in [k for k, s in state.slots.items() if k.param_id == key and s.param_ref() is None]:
                del state.slots[slot_key]
        return forget

    def slot_of(self, param: Tensor, orientation: int) -> _Slot | None:
        slot = self.slots.get(SlotKey(id(param), orientation))
        return slot if slot is not None and slot.param_ref() is param else None

    def register_slot(self, param: Tensor, orientation: int, name: str, features: int) -> _Slot:
        slot = self.slot_of(param, orientation)
        if slot is None:
            taken = {s.name for s in self.live_slots(with_tensor=False)}
            unique, n = name, 2
            while unique in taken:
                unique, n = f"{name}#{n}", n + 1
            self.tensor_for(param)
            slot = _Slot(unique, self, weakref.ref(param), orientation, features)
            self.slots[SlotKey(id(param), orientation)] = slot
        return slot

    def live_slots(self, with_tensor: bool = True) -> list[_Slot]:
        return [s for s in self.slots.values()
                if s.param_ref() is not None and (not with_tensor or s.tensor is not None)]

    # -- (de)serialisation ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = {}
        for slot in self.live_slots():
            if slot.sub_token_size is None:
                continue
            row = slot.tensor[slot.orientation].detach()
            out[slot.name] = {"vector": row[1:1 + slot.sub_token_size].cpu().clone() if slot.initialised else None,
                              "sub_token_size": slot.sub_token_size, "features": slot.features,
                              "orientation": slot.orientation}
        return out

    def check_entries(self, sites: Any, resolve: Callable[[str], tuple[Tensor, int, int] | None]
                      ) -> list[tuple[str, Any, Tensor | None]]:
        """Validate entries of ``state_dict()["sites"]`` without changing anything.  Returns
        ``(name, slot or (param, orientation, features), v)`` per entry; raises ``StateError`` naming
        every problem.  ``resolve(name)`` finds weights not compiled yet."""
        if not isinstance(sites, dict):
            raise StateError(f"velora_fx: 'sites' must be a dict of site name -> entry, got {type(sites).__name__}")
        by_name = {s.name: s for s in self.live_slots()}
        problems, checked = [], []
        for name, entry in sites.items():
            target = by_name.get(name)
            if target is None:
                found = resolve(name) if isinstance(name, str) else None
                if found is None:
                    problems.append(f"{name!r}: no such site in this model")
                    continue
                target = found
            features = target.features if isinstance(target, _Slot) else target[2]
            orientation = target.orientation if isinstance(target, _Slot) else target[1]
            compiled_g = target.sub_token_size if isinstance(target, _Slot) else None
            problem, v = _check_entry(entry, features, orientation, compiled_g)
            if problem:
                problems.append(f"{name!r}: {problem}")
            else:
                checked.append((name, target, v))
        if problems:
            raise StateError("velora_fx: load_state_dict refused the state (nothing was loaded):\n  "
                             + "\n  ".join(problems))
        return checked

    def apply_entries(self, checked: list[tuple[str, Any, Tensor | None]]) -> None:
        """Apply what ``check_entries`` accepted."""
        for name, target, v in checked:
            slot = target if isinstance(target, _Slot) else self.register_slot(target[0], target[1], name, target[2])
            slot.set_vector(v)

    def load_state_dict(self, sites: Any, resolve: Callable[[str], tuple[Tensor, int, int] | None]) -> None:
        """Load vectors by slot name, all or nothing."""
        self.apply_entries(self.check_entries(sites, resolve))


def _check_entry(entry: Any, features: int, orientation: int, compiled_g: int | None) -> tuple[str, Tensor | None]:
    """(problem or '', v as fp32) for one saved entry against the site it would load into."""
    if isinstance(entry, dict):
        unknown = set(entry) - {"vector", "sub_token_size", "features", "orientation"}
        if unknown:
            return f"unknown field(s) {sorted(unknown)}", None
        vec = entry.get("vector")
    else:
        vec, entry = entry, {}
    saved_features = entry.get("features")
    if saved_features is not None and saved_features != features:
        return (f"saved for feature size {saved_features}, but this model's site has feature size {features} "
                "(a state of another model width)"), None
    if entry.get("orientation") is not None and entry["orientation"] != orientation:
        return f"saved for orientation {entry['orientation']}, but this model uses the weight in orientation {orientation}", None
    if vec is None:
        return "", None
    try:
        v = torch.as_tensor(vec, dtype=torch.float32).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        return f"vector is not a tensor of numbers ({exc})", None
    g = v.numel()
    if entry.get("sub_token_size") is not None and entry["sub_token_size"] != g:
        return f"v has size {g} but the entry says sub_token_size {entry['sub_token_size']}", None
    if g < 1 or features % g:
        return f"v has size {g}, which does not divide the feature size {features}", None
    if compiled_g is not None and compiled_g != g:
        return f"v has size {g}, but the compiled graph uses sub-token size {compiled_g}", None
    if not bool(torch.isfinite(v).all()):
        return "v is not finite (NaN or inf)", None
    norm = float(v.norm())
    if not math.isclose(norm, 1.0, rel_tol=_UNIT_TOLERANCE):
        return f"v must be a unit vector, its norm is {norm:.6g}", None
    return "", v


def natural_orientation(module: nn.Module | None) -> int:
    """0 for nn.Linear-like weights ([out, in]); 1 for transformers' Conv1D ([in, out])."""
    return 1 if module is not None and type(module).__name__ == "Conv1D" else 0
