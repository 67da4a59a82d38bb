"""Site names as users write them: the ``named_modules()`` paths of the model they compiled.

Dynamo names graph inputs by their source relative to the frame it traced (``L['self']...``):
after a graph break or inside HF gradient checkpointing the frame is a submodule, so the prefix
(``model.layers.0.``) is lost, and PEFT's wrappers add ``__dict__`` hops.  The weights themselves
are the same objects everywhere, so we name a site by where its weight lives in the model that
``torch.compile`` was called on (found on the call stack), and fall back to a cleaned source
name for compiled free functions.
"""
from __future__ import annotations

import re
import sys
import weakref
from torch import Tensor, nn

__all__ = ["find_compiled_root", "ParamNames", "module_path_from_source", "unwrap_model"]

_ROOT = re.compile(r"^[LG]\[['\"][^'\"]+['\"]\](\[\d+\])*")
_SOURCE_ITEM = re.compile(r"\._(?:modules|parameters|buffers)\[['\"]([^'\"]+)['\"]\]|\[['\"]?([^'\"\]]+)['\"]?\]|\.(\w+)")
_LOCAL = re.compile(r"^[LG]\[['\"]([^'\"]+)['\"]\]")
_NOISE = {"__dict__", "_modules", "_parameters", "_buffers"}


def module_path_from_source(source: str) -> str:
    """``L['self']._modules['layers']._modules['0'].q_proj`` -> ``layers.0.q_proj``.  The root
    local (the compiled module itself) is dropped; ``__dict__``/``_modules`` hops are removed.  A
    source that is not a module attribute (a function argument ``L['w']``) keeps its local name."""
    rest = _ROOT.sub("", source)
    parts = [next(g for g in m.groups() if g is not None) for m in _SOURCE_ITEM.finditer(rest)]
    parts = [p for p in parts if p not in _NOISE]
    if not parts:
        local = _LOCAL.match(source)
        return local.group(1) if local and local.group(1) != "self" else ""
    return ".".join(parts)


def unwrap_model(model: nn.Module | None) -> nn.Module | None:
    """The user's model inside ``torch.compile`` and ``DistributedDataParallel`` wrappers (in either
    order), so state and names are the same however the model was wrapped."""
    from ._compat import OptimizedModule

    while True:
        if isinstance(model, OptimizedModule):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def find_compiled_root() -> nn.Module | None:
    """The model ``torch.compile`` was applied to, from the call stack of the running compile or
    call: the outermost ``OptimizedModule`` or module compiled with ``Module.compile()``, unwrapped
    (``unwrap_model``).  None for compiled functions.  Only torch's own module-call frames are
    read: reading a frame's locals snapshots them, and a snapshot of a user's frame would keep its
    locals (a model the user deletes) alive until that frame ends."""
    frame, found = sys._getframe(1), None
    codes = _module_call_codes()
    while frame is not None:
        if frame.f_code in codes:
            owner = frame.f_locals.get("self")
            if isinstance(owner, codes[frame.f_code]):
                if hasattr(owner, "_orig_mod"):
                    found = owner._orig_mod
                elif getattr(owner, "_compiled_call_impl", None) is not None:
                    found = owner
        frame = frame.f_back
    return unwrap_model(found)


def _module_call_codes() -> dict:
    """Code objects of the frames that call a module (``self`` is the module called)."""
    from ._compat import OptimizedModule

    return {OptimizedModule.__call__.__code__: OptimizedModule,
            nn.Module._wrapped_call_impl.__code__: nn.Module, nn.Module._call_impl.__code__: nn.Module}


class ParamNames:
    """Where each weight of a root module lives: every qualified name (tied weights have several)."""

    def __init__(self, root: nn.Module | None) -> None:
        self.root_ref = weakref.ref(root) if root is not None else None
        self._names: dict[int, list[str]] = {}
        if root is not None:
            for name, p in root.named_parameters(remove_duplicate=False):
                self._names.setdefault(id(p), []).append(name)

    @property
    def root(self) -> nn.Module | None:
        return self.root_ref() if self.root_ref is not None else None

    def names_of(self, param: Tensor) -> list[str]:
        return self._names.get(id(param), [])

    def module_of(self, param: Tensor, hint: str | None, label: str | None = None) -> tuple[str, str, nn.Module | None]:
        """(module path, parameter leaf name, module) of a weight; ``hint`` is the source-derived
        path of the module that used it (picks among tied names), ``label`` the source-derived
        path of the weight itself (used when the weight is not in the root, e.g. compiled functions)."""
        names = self.names_of(param)
        if names:
            chosen = names[0]
            if hint:
                for name in names:
                    module = name.rpartition(".")[0]
                    if module == hint or module.endswith("." + hint):
                        chosen = name
                        break
            path, _, leaf = chosen.rpartition(".")
            return path, leaf, self._submodule(path)
        if label:
            path, _, leaf = label.rpartition(".")
            return path, leaf, None
        return hint or "", "weight", None

    def _submodule(self, path: str) -> nn.Module | None:
        root = self.root
        if root is None:
            return None
        try:
            return root.get_submodule(path) if path else root
        except AttributeError:
            return None

    def resolve(self, slot_name: str) -> tuple[Tensor, int] | None:
        """The weight and orientation a state key names (see ``state.slot_name``), if any."""
        from .state import natural_orientation

        root = self.root
        if root is None:
            return None
        base, transposed = (slot_name[:-2], True) if slot_name.endswith(":T") else (slot_name, False)
        params = dict(root.named_parameters(remove_duplicate=False))
        for candidate in (f"{base}.weight" if base else "weight", base):
            p = params.get(candidate)
            if p is not None and p.dim() >= 2:
                natural = natural_orientation(self._submodule(candidate.rpartition(".")[0]))
                return p, (1 - natural) if transposed else natural
        return None

