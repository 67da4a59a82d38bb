"""Int8 storage of a gated MLP's gate and up projections (SwiGLU, GeGLU) — the ``gated`` codec.

The backward of ``h = act(g) * u`` reads ``g`` (for ``act(g)`` and ``act'(g)``) and ``u``: two
[tokens, intermediate] tensors that min-cut keeps even under a tight activation budget, because
recomputing them means running the gate and up matmuls again.  Forward is exact; it saves each
of them as int8 codes with one absmax scale per ``group`` contiguous features (in the tensor's
bf16 for 16-bit tensors): ``1 + 2 / group`` bytes per element instead of 2 (bf16).  Backward dequantises and
evaluates the exact formulas on the dequantised values, so only the input gradients of the
elementwise product and of the activation carry the rounding error (relative error ~0.3-1 %,
measured per tensor as ``estimated_error``).  The same codec serves any matmul output that only
elementwise backward formulas read (a plain MLP's pre-activation).

Idea from activation-compressed training (ActNN, Chen et al. 2021; fp8/int8 activation storage
in COAT and Jetfire); written here as plain aten ops so inductor fuses the encode into the
matmul's epilogue and the decode into the backward kernel that reads it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .._compat import real_tensors
from ..passes.graph_utils import emit as _emit
from .base import register_codec

__all__ = ["Int8StorageCodec", "quantize", "dequantize", "scale_dtype", "GROUP"]

aten, prims = torch.ops.aten, torch.ops.prims
GROUP = 64       # features per scale
# amax maps to 126.5, not 127: the scale is rounded to the tensor's dtype (bf16: 2^-8 relative),
# and 126.5 * (1 + 2^-8) < 127 still rounds to at most 127, so no clamp is needed (inductor has no
# lowering for aten.clamp after decomposition)
_QDIV = 126.5
_TINY = 1e-30    # keeps an all-zero group's scale positive (a normal number in bf16 and fp32)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scales of 16-bit tensors are bf16 (fp16's range cannot hold a tiny group's scale); of
    32/64-bit tensors fp32."""
    return torch.bfloat16 if dtype in (torch.float16, torch.bfloat16) else torch.float32


def group_size(features: int, group: int = GROUP) -> int:
    """``group`` when it divides the feature size, else one scale per row."""
    return group if features % group == 0 else features


def quantize(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference: ``(codes int8 [..., F/G, G], scales [..., F/G, 1] in scale_dtype)``."""
    g = group_size(x.shape[-1], group)
    xg = x.float().reshape(*x.shape[:-1], x.shape[-1] // g, g)
    scale = (xg.abs().amax(-1, keepdim=True) / _QDIV + _TINY).to(scale_dtype(x.dtype))
    codes = (xg * scale.float().reciprocal()).round().to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Eager reference: the stand-in for ``like`` rebuilt from ``quantize``'s output."""
    return (codes.float() * scale.float()).reshape(like.shape).to(like.dtype)


@register_codec("gated")
class Int8StorageCodec:
    """``encode(graph, t)`` -> ``[codes, scale]`` (what forward saves instead of ``t``);
    ``decode(graph, saved, t)`` -> ``t``'s stand-in, same shape and dtype, for backward's reads."""

    name = "gated"
    bits = 8

    def __init__(self, group: int = GROUP):
        if group < 1:
            raise ValueError(f"gated: group must be >= 1, got {group}")
        self.group = group

    def uuid(self) -> str:
        return f"gated:int8:{self.group}"

    def error(self, t: torch.Tensor) -> float:
        """Relative (Frobenius) error of the stand-in on real values."""
        with real_tensors():  # planning runs under AOTAutograd's fake mode
            codes, scale = quantize(t, self.group)
            err = dequantize(codes, scale, t).float() - t.float()
            return float(err.norm() / t.float().norm().clamp_min(1e-30))

    def reduction_width(self, shape: tuple[int, ...]) -> int:
        """The scale is a max over each group of features."""
        return group_size(int(shape[-1]), self.group)

    def saved_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        numel = math.prod(int(s) for s in shape)
        scales = numel // group_size(int(shape[-1]), self.group)
        return numel + scales * torch.empty((), dtype=scale_dtype(dtype)).element_size()

    def encode(self, graph: fx.Graph, t: fx.Node) -> list[fx.Node]:
        val = t.meta["val"]
        shape = [int(s) for s in val.shape]
        g = group_size(shape[-1], self.group)
        x = t if val.dtype == torch.float32 else _emit(graph, prims.convert_element_type.default, t, torch.float32)
        xg = _emit(graph, aten.view.default, x, [*shape[:-1], shape[-1] // g, g])
        amax = _emit(graph, aten.amax.default, _emit(graph, aten.abs.default, xg), [-1], True)
        scale32 = _emit(graph, aten.add.Tensor, _emit(graph, aten.div.Tensor, amax, _QDIV), _TINY)
        stored = scale_dtype(val.dtype)
        scale = _emit(graph, prims.convert_element_type.default, scale32, stored) \
            if stored != torch.float32 else scale32
        used = scale if stored == torch.float32 else \
            _emit(graph, prims.convert_element_type.default, scale, torch.float32)
        scaled = _emit(graph, aten.mul.Tensor, xg, _emit(graph, aten.reciprocal.default, used))
        codes = _emit(graph, prims.convert_element_type.default, _emit(graph, aten.round.default, scaled), torch.int8)
        return [codes, scale]

    def decode(self, graph: fx.Graph, saved: list[fx.Node], like: fx.Node) -> fx.Node:
        codes, scale = saved
        val = like.meta["val"]
        wide = _emit(graph, aten.mul.Tensor, _emit(graph, prims.convert_element_type.default, codes, torch.float32),
                     _emit(graph, prims.convert_element_type.default, scale, torch.float32)
                     if scale.meta["val"].dtype != torch.float32 else scale)
        flat = _emit(graph, aten.view.default, wide, [int(s) for s in val.shape])
        return flat if val.dtype == torch.float32 else _emit(graph, prims.convert_element_type.default, flat, val.dtype)
