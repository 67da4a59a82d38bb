"""Per-site VeLoRA state (the projection vector v), owned by a backend and found by key.

The compiled graph calls ``velora_fx::encode(x, key, ...)``; the key is
``"<store token>/<site name>"`` so that each backend object keeps its own vectors, persistent
across steps, recompiles and graph breaks, and exportable with ``state_dict()``.
"""
from __future__ import annotations

import threading
import uuid
import weakref
import zlib
from typing import Any

import torch
from torch import Tensor

__all__ = ["SiteState", "SiteStore", "lookup_site", "next_vector"]

_STORES: "weakref.WeakValueDictionary[str, SiteStore]" = weakref.WeakValueDictionary()
_LOCK = threading.Lock()


class SiteState:
    """The vector v of one site and how it evolves (first_batch / batch / ema:<d> / random)."""

    def __init__(self, name: str, init: str) -> None:
        self.name = name
        self.init = init
        self.vector: Tensor | None = None  # fp32 unit vector of size g
        self.steps = 0
        self._casts: dict[torch.dtype, tuple[Tensor, Tensor]] = {}  # dtype -> (v it was cast from, cast)

    @property
    def initialised(self) -> bool:
        return self.vector is not None

    def vector_for(self, x: Tensor, g: int) -> Tensor:
        """The v to use for this batch, updated per the init rule (fp32, on x's device)."""
        fixed = self.init in ("first_batch", "random")
        if fixed and self.vector is not None and self.vector.numel() == g and self.vector.device == x.device:
            self.steps += 1  # the common case, once per site per step: no work
            return self.vector
        return self._update(x, g)

    def vector_as(self, dtype: torch.dtype) -> Tensor:
        """The current v cast to ``dtype`` (cached while v is the same tensor)."""
        source, cast = self._casts.get(dtype, (None, None))
        if source is not self.vector:
            cast = self.vector.to(dtype)
            self._casts[dtype] = (self.vector, cast)
        return cast

    def _update(self, x: Tensor, g: int) -> Tensor:
        if self.vector is not None and self.vector.numel() != g:
            raise ValueError(f"site {self.name}: stored v has size {self.vector.numel()}, graph asks for {g}")
        self.vector = next_vector(self.init, self.name, self.vector, x, g)
        self.steps += 1
        if self.vector.device != x.device:
            self.vector = self.vector.to(x.device)
        return self.vector


def next_vector(init: str, name: str, current: Tensor | None, x: Tensor, g: int) -> Tensor:
    """The init rule, shared by the backend's state and the eager reference: v for a batch ``x``
    given the current v (None before the first batch).  Returns ``current`` itself when it stays."""
    from .codecs.velora import initial_vector, random_vector

    if current is None:
        return random_vector(g, zlib.crc32(name.encode()), x.device) if init == "random" else initial_vector(x, g)
    if init == "batch":
        return initial_vector(x, g)
    if init.startswith("ema:"):
        decay = float(init.split(":", 1)[1])
        mixed = decay * current.to(x.device) + (1.0 - decay) * initial_vector(x, g)
        return mixed / mixed.norm().clamp_min(1e-12)
    return current


class SiteStore:
    """The sites of one backend (or one ``transform`` call), keyed by stable site name."""

    def __init__(self, init: str) -> None:
        self.init = init
        self.token = uuid.uuid4().hex[:12]
        self.sites: dict[str, SiteState] = {}
        with _LOCK:
            _STORES[self.token] = self

    def key(self, site: str) -> str:
        return f"{self.token}/{site}"

    def get(self, site: str) -> SiteState:
        if site not in self.sites:
            self.sites[site] = SiteState(site, self.init)
        return self.sites[site]

    def state_dict(self) -> dict[str, Any]:
        return {name: {"vector": None if s.vector is None else s.vector.detach().cpu().clone(),
                       "steps": s.steps, "init": s.init}
                for name, s in self.sites.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, entry in state.items():
            site = self.get(name)
            vec = entry.get("vector")
            site.vector = None if vec is None else torch.as_tensor(vec, dtype=torch.float32).clone()
            site.steps = int(entry.get("steps", 0))


def lookup_site(key: str) -> SiteState:
    token, _, name = key.partition("/")
    store = _STORES.get(token)
    if store is None:
        raise RuntimeError(
            f"velora_fx: no live backend owns site {name!r} (store {token}); the backend object that "
            "compiled this graph was garbage-collected — keep a reference to it while training")
    return store.get(name)
