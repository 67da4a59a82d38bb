"""Plan and rewrite the pointwise (few-bit) sites of a joint graph.

Planning is partition-aware in the same way as for VeLoRA: a nonlinearity is only a candidate
when the baseline partition saves the tensor its derivative reads; the pipeline verifies on the
real partition afterwards and reverts sites that freed nothing (the tensor is still kept by
another backward op, or the partitioner saved the function's output instead).  What this shares
with the gated codec (decision type, first checks, error estimate, rewrite loop, report row) lives
in ``codec_plan``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from .._compat import CheckpointPolicy
from ..codecs.fewbit import FewBitCodec
from ..config import VeloraConfig
from .codec_plan import CodecDecision, decided_before_planning, estimated_error
from .graph_utils import tensor_val
from .partition_probe import SavedSet
from .pointwise_sites import PointwiseSite

__all__ = ["PointwiseDecision", "plan_pointwise"]

STICKY_PREFIX = "fewbit:"


@dataclass
class PointwiseDecision(CodecDecision):
    codec_name: str = "fewbit"
    sticky_prefix: str = STICKY_PREFIX
    pack: bool = True  # config.pack_codes: eight codes to ``bits`` bytes, or one code per byte

    def codec(self) -> FewBitCodec:
        return FewBitCodec(self.site.function, self.bits, self.site.domain, self.pack)

    def rewrite(self, gm: fx.GraphModule, nodes: dict[str, fx.Node]) -> list[str]:
        """Save the codes of the tensor f' reads; backward multiplies the gradient by their levels."""
        graph, codec = gm.graph, self.codec()
        t, grad_in, grad_out = nodes[self.site.encode_at], nodes[self.site.grad_in], nodes[self.site.grad_out]
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
        return [packed.name]

    def approximates(self) -> str:
        return "input gradient"


def plan_pointwise(sites: list[PointwiseSite], baseline: SavedSet, config: VeloraConfig, values: dict,
                   sticky: dict[str, int]) -> list[PointwiseDecision]:
    """``values``: calibration values by node name (for ``estimated_error``); ``sticky``: the
    model's plan so far (``fewbit:<name>`` -> bits, 0 = skipped)."""
    decisions = []
    for site in sites:
        d = PointwiseDecision(site, pack=config.pack_codes)
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


def _compress(d: PointwiseDecision, bits: int, values: dict, reason: str) -> None:
    d.compress, d.bits, d.reason = True, bits, reason
    codec = d.codec()
    d.estimated_error = estimated_error(codec, values.get(d.site.encode_at), codec.levels.relative_error)
