"""Per-model VeLoRA state: one small fp32 device tensor per weight, owned by the model's entry in
a backend, handed to the compiled graph as an input.

Why device tensors that the graph takes as inputs: the encode (init rule and projection) is then
plain aten code that inductor fuses into the kernel producing the activation, with no Python per
site per step, and it works under CUDA graphs and with inductor's FX graph cache (the generated
code never refers to the state; the state travels as an argument).

Layout: a weight ``W`` gets a tensor ``[2, 2 + max(W.shape[-2:])]``; row ``o`` is the state of
``W`` used in orientation ``o`` (0: the activation's features match ``W.shape[-1]``, as in
``nn.Linear``; 1: they match ``W.shape[-2]``, as in transformers' ``Conv1D`` or a tied ``Wᵀ``).
A row holds ``[initialised flag, v_0 .. v_{g-1}, unused..., pin]``; the pin is one coefficient of
the last step, written only so that the encode stays in forward (see ``codecs/velora.py``).  Keying state by weight and
orientation mirrors the eager reference, where v belongs to the module: a module called twice
shares its v, two models never do.
"""
from __future__ import annotations

import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SlotKey", "ModelState", "next_vector", "slot_name"]


def next_vector(init: str, name: str, current: Tensor | None, x: Tensor, g: int) -> Tensor:
    """The init rule of the eager reference: v for a batch ``x`` given the current v (None before
    the first batch).  Returns ``current`` itself when it stays.  The compiled graph emits the same
    rule as branch-free aten code (``codecs.velora.emit_vector_update``)."""
    from .codecs.velora import _normalised, initial_vector, random_vector

    if current is None:
        return random_vector(g, random_seed(name), x.device) if init == "random" else initial_vector(x, g)
    if init == "batch":
        return initial_vector(x, g)
    if init.startswith("ema:"):
        decay = float(init.split(":", 1)[1])
        return _normalised(decay * current.to(x.device) + (1.0 - decay) * initial_vector(x, g))
    return current


def random_seed(name: str) -> int:
    """The seed of ``init="random"`` for a site name (stable across processes)."""
    return zlib.crc32(name.encode())


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


@dataclass
class ModelState:
    """The state of one compiled model (or of the free functions a backend compiled): the device
    state per weight, slot names, the sticky per-group plan and the reports of its graphs."""

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
        size = 2 + max(param.shape[-2:])
        if state is None or state.device != param.device or state.shape[-1] != size:
            fresh = torch.zeros(2, size, dtype=torch.float32, device=param.device)
            if state is not None and state.shape == fresh.shape:
                fresh.copy_(state)
            state = fresh
            self.tensors[id(param)] = (weakref.ref(param), state)
        return state

    def register_slot(self, param: Tensor, orientation: int, name: str, features: int) -> _Slot:
        key = SlotKey(id(param), orientation)
        slot = self.slots.get(key)
        if slot is None or slot.param_ref() is not param:
            taken = {s.name for k, s in self.slots.items() if k != key and s.param_ref() is not None}
            unique, n = name, 2
            while unique in taken:
                unique, n = f"{name}#{n}", n + 1
            self.tensor_for(param)
            slot = _Slot(unique, self, weakref.ref(param), orientation, features)
            self.slots[key] = slot
        return slot

    def live_slots(self) -> list[_Slot]:
        return [s for s in self.slots.values() if s.param_ref() is not None and s.tensor is not None]

    # -- (de)serialisation ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        out = {}
        for slot in self.live_slots():
            if slot.sub_token_size is None:
                continue
            row = slot.tensor[slot.orientation].detach()
            initialised = bool(row[0] > 0)
            out[slot.name] = {"vector": row[1:1 + slot.sub_token_size].cpu().clone() if initialised else None,
                              "sub_token_size": slot.sub_token_size, "features": slot.features,
                              "orientation": slot.orientation}
        return out

    def load_state_dict(self, sites: dict[str, Any], resolve) -> None:
        """Load vectors by slot name.  ``resolve(name) -> (param, orientation, features) | None``
        finds slots not compiled yet.  Every mismatch is named at once."""
        by_name = {s.name: s for s in self.live_slots()}
        problems, loads = [], []
        for name, entry in sites.items():
            vec = entry.get("vector") if isinstance(entry, dict) else entry
            slot = by_name.get(name)
            if slot is None:
                found = resolve(name)
                if found is None:
                    problems.append(f"{name!r}: no such site in this model")
                    continue
                param, orientation, features = found
                slot = self.register_slot(param, orientation, name, features)
            if vec is None:
                loads.append((slot, None))
                continue
            vec = torch.as_tensor(vec, dtype=torch.float32).flatten()
            g = vec.numel()
            if g < 1 or slot.features % g:
                problems.append(f"{name!r}: v has size {g}, which does not divide the feature size {slot.features}")
            elif slot.sub_token_size is not None and slot.sub_token_size != g:
                problems.append(f"{name!r}: v has size {g}, but the compiled graph uses sub-token size "
                                f"{slot.sub_token_size}")
            else:
                loads.append((slot, vec))
        if problems:
            raise ValueError("velora_fx: load_state_dict found mismatches:\n  " + "\n  ".join(problems))
        for slot, vec in loads:
            row = slot.tensor[slot.orientation]
            with torch.no_grad():
                row.zero_()
                if vec is not None:
                    row[1:1 + vec.numel()].copy_(vec.to(row.device))
                    row[0] = 1.0
                    slot.sub_token_size = vec.numel()


def natural_orientation(module: nn.Module | None) -> int:
    """0 for nn.Linear-like weights ([out, in]); 1 for transformers' Conv1D ([in, out])."""
    return 1 if module is not None and type(module).__name__ == "Conv1D" else 0
