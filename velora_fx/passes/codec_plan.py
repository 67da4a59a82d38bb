"""What the element-wise codecs' plans share: few-bit (``pointwise_plan``) and gated int8 storage
(``stored_plan``) decide per tensor in the same way and are verified, reported and rewritten alike.

One decision type (``CodecDecision``: the tensor, the codec, its estimated error, why), the checks
every site passes first (``decided_before_planning``), the error estimate on a bounded sample of
the calibration batch (``estimated_error``), one rewrite loop (``rewrite_codes``) that asks each
decision to rewrite itself, and one report row (``codec_report``).  Each codec's module depends on
this one only, never on the other's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .._compat import int_hint, real_tensors
from ..config import VeloraConfig
from ..report import SiteReport
from .graph_utils import tensor_val
from .partition_probe import SavedSet

__all__ = ["CodecDecision", "decided_before_planning", "estimated_error", "rewrite_codes", "codec_report",
           "ERROR_SAMPLE"]

# elements of the calibration tensor an error estimate reads (whole rows, evenly spaced): an energy
# ratio over a quarter million values is within a fraction of a percent of the full batch's, and
# the estimate stays cheap (float64 work) however large the batch is
ERROR_SAMPLE = 1 << 18


@dataclass
class CodecDecision:
    """Compress one site's saved tensor with an element-wise codec, or not, and why."""

    site: Any
    compress: bool = False
    reason: str = ""
    bits: int | None = None
    estimated_error: float = 0.0
    sticky: bool = False
    codec_name: str = ""
    sticky_prefix: str = ""

    def skip(self, reason: str) -> "CodecDecision":
        self.compress, self.reason, self.bits = False, reason, None
        return self

    def codec(self) -> Any:
        raise NotImplementedError

    def rewrite(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> list[str]:
        """Encode in forward, decode in backward (``nodes``: the graph's nodes before any rewrite,
        by name); returns the names of what forward saves instead."""
        raise NotImplementedError

    def approximates(self) -> str:
        """Which gradients the codec's error reaches (the report's words)."""
        raise NotImplementedError

    # what ``candidates.propose`` reads, as VeLoRA/RMM decisions have it
    @property
    def encode_at(self) -> str:
        return self.site.encode_at

    @property
    def saved_forms(self) -> list[str]:
        return self.site.kept

    def code_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, config: VeloraConfig) -> int:
        """What forward saves instead of the tensor (the codec's own accounting)."""
        return self.codec().saved_bytes(shape, dtype)

    def error_reach(self, producers: Callable[[str], list]) -> list:
        """Whose gradients its error reaches: the weights of the matmuls that produce the encoded
        tensor (``producers(node)``), whose gradients the approximated derivative multiplies."""
        return producers(self.site.encode_at)


def decided_before_planning(d: CodecDecision, config: VeloraConfig, sticky: dict[str, int], key: str,
                            keep: Callable[[int], None]) -> bool:
    """What every element-wise site decides first: include/exclude, unsupported, and the model's
    sticky plan (``keep(value)`` re-applies a kept choice).  True if decided."""
    if not config.selects(d.site.name):
        d.skip("excluded by include/exclude")
    elif d.site.unsupported:
        d.skip(d.site.unsupported)
    elif key in sticky:
        d.sticky = True
        if sticky[key]:
            keep(sticky[key])
        else:
            d.skip("skipped by this model's first plan")
    else:
        return False
    return True


def estimated_error(codec: Any, data: torch.Tensor | None, without_data: float) -> float:
    """``codec.error`` on (a sample of) the calibration values, or ``without_data``."""
    if data is None:
        return without_data
    with real_tensors():  # planning runs under AOTAutograd's fake mode; the values are real
        return codec.error(_sample(data))


def _sample(x: torch.Tensor) -> torch.Tensor:
    """At most about ``ERROR_SAMPLE`` elements of ``x``: evenly spaced whole rows (a row keeps the
    per-group structure codecs quantise along the last dim)."""
    if x.dim() < 2 or x.numel() <= ERROR_SAMPLE:
        return x
    rows = x.reshape(-1, x.shape[-1])
    return rows[::math.ceil(x.numel() / ERROR_SAMPLE)]


def rewrite_codes(gm: fx.GraphModule, chosen: list[CodecDecision]) -> dict[int, list[str]]:
    """Rewrite every chosen decision in place; returns id(decision) -> names of its saved codes."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    saved = {id(d): d.rewrite(gm, nodes) for d in chosen}
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return saved


def codec_report(d: CodecDecision, nodes: dict[str, fx.Node], baseline: SavedSet, after: SavedSet,
                 saved: list[str]) -> SiteReport:
    """The report row of an element-wise codec's site (few-bit or gated)."""
    site = d.site
    val = tensor_val(nodes[site.encode_at])
    kept = site.kept
    before = baseline.bytes_of(kept)
    after_bytes = after.bytes_of(kept) + after.bytes_of(saved, inputs=False) if d.compress else before
    return SiteReport(
        name=site.name, consumers=[site.name], op=site.function,
        shape=tuple(int_hint(s) for s in val.shape), dtype=str(val.dtype).replace("torch.", ""),
        saved_by_baseline=bool(baseline.which(kept)), saved_forms=baseline.which(kept),
        bytes_before=before, bytes_after=after_bytes, decision="compressed" if d.compress else "skipped",
        reason=d.reason, approximated=[f"{site.name} ({d.approximates()})"] if d.compress else [],
        estimated_error=round(float(d.estimated_error), 6), codec=d.codec_name, bits=d.bits,
        pack_codes=getattr(d, "pack", None) if d.compress else None,
        predicted_bytes_after=d.codec().saved_bytes(tuple(int_hint(s) for s in val.shape), val.dtype)
        if d.compress else None)
