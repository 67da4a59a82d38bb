"""Plan and rewrite the pointwise (few-bit) sites of a joint graph.

Planning is partition-aware in the same way as for VeLoRA: a nonlinearity is only a candidate
when the baseline partition saves the tensor its derivative reads; the pipeline verifies on the
real partition afterwards and reverts sites that freed nothing (the tensor is still kept by
another backward op, or the partitioner saved the function's output instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx as fx

from .._compat import CheckpointPolicy, int_hint
from ..codecs.fewbit import FewBitCodec
from ..config import VeloraConfig
from ..report import SiteReport
from .graph_utils import tensor_val
from .partition_probe import SavedSet
from .pointwise_sites import PointwiseSite

__all__ = ["PointwiseDecision", "plan_pointwise", "rewrite_pointwise", "pointwise_report"]

STICKY_PREFIX = "fewbit:"


@dataclass
class PointwiseDecision:
    site: PointwiseSite
    compress: bool = False
    reason: str = ""
    bits: int | None = None
    estimated_error: float = 0.0
    sticky: bool = False
    codec_name: str = "fewbit"
    sticky_prefix: str = STICKY_PREFIX

    def skip(self, reason: str) -> "PointwiseDecision":
        self.compress, self.reason, self.bits = False, reason, None
        return self

    def codec(self) -> FewBitCodec:
        return FewBitCodec(self.site.function, self.bits, self.site.domain)


def plan_pointwise(sites: list[PointwiseSite], baseline: SavedSet, config: VeloraConfig, values: dict,
                   sticky: dict[str, int]) -> list[PointwiseDecision]:
    """``values``: calibration values by node name (for ``estimated_error``); ``sticky``: the
    model's plan so far (``fewbit:<name>`` -> bits, 0 = skipped)."""
    decisions = []
    for site in sites:
        d = PointwiseDecision(site)
        decisions.append(d)
        if decided_before_planning(d, config, sticky, STICKY_PREFIX + site.name,
                                   lambda bits: _compress(d, bits, values, "kept from this model's first plan")):
            continue
        if not baseline.which(site.kept):
            d.skip("not saved by the baseline partition")
        else:
            _compress(d, config.bits, values, f"frees its saved {site.domain} ({config.bits}-bit codes)")
            if config.mode == "auto" and d.estimated_error > config.max_error:
                error = d.estimated_error
                d.skip(f"estimated error {error:.2f} at {config.bits} bits is above max_error={config.max_error:g}")
                d.estimated_error = error
    return decisions


def decided_before_planning(d: PointwiseDecision, config: VeloraConfig, sticky: dict[str, int], key: str,
                            keep: Callable[[int], None]) -> bool:
    """What every pointwise-like site decides first: include/exclude, unsupported, and the model's
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


def _compress(d: PointwiseDecision, bits: int, values: dict, reason: str) -> None:
    d.compress, d.bits, d.reason = True, bits, reason
    data = values.get(d.site.encode_at)
    d.estimated_error = d.codec().error(data) if data is not None else d.codec().levels.relative_error


def rewrite_pointwise(gm: fx.GraphModule, chosen: list[PointwiseDecision]) -> dict[int, list[str]]:
    """Rewrite in place; returns id(decision) -> [name of the saved codes]."""
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    saved: dict[int, list[str]] = {}
    for d in chosen:
        if d.codec_name == "gated":
            from .stored_plan import rewrite_stored  # the stored sites ride on this pipeline
            saved[id(d)] = rewrite_stored(gm, d)
            continue
        codec = d.codec()
        t, grad_in, grad_out = nodes[d.site.encode_at], nodes[d.site.grad_in], nodes[d.site.grad_out]
        insert_at = t.next
        while insert_at.op == "placeholder":
            insert_at = insert_at.next
        with graph.inserting_before(insert_at):
            packed = codec.encode(graph, t)
        packed.meta["recompute"] = CheckpointPolicy.MUST_SAVE
        known = set(graph.nodes)
        with graph.inserting_before(grad_out):
            grad = codec.decode(graph, packed, t, grad_in, tensor_val(grad_out).dtype)
        for node in graph.nodes:
            if node not in known:
                for key in ("partitioner_tag", "seq_nr", "fwd_nn_module_stack"):
                    if key in grad_out.meta:
                        node.meta[key] = grad_out.meta[key]
                node.meta["partitioner_tag"] = "must_be_in_backward"
        grad_out.replace_all_uses_with(grad)
        saved[id(d)] = [packed.name]
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return saved


def pointwise_report(d: PointwiseDecision, nodes: dict[str, fx.Node], baseline: SavedSet, after: SavedSet,
                     saved: list[str]) -> SiteReport:
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
        reason=d.reason, approximated=[f"{site.name} ({_what_is_approximated(d)})"] if d.compress else [],
        estimated_error=round(float(d.estimated_error), 6), codec=d.codec_name, bits=d.bits,
        predicted_bytes_after=d.codec().saved_bytes(tuple(int_hint(s) for s in val.shape), val.dtype)
        if d.compress else None)


def _what_is_approximated(d: PointwiseDecision) -> str:
    return "input gradients of its elementwise consumers" if d.codec_name == "gated" else "input gradient"
