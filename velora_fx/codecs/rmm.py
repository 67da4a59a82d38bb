"""Randomized matmul (RMM) for a weight gradient (Bershatsky et al., 2022, "Memory-Efficient
Backpropagation through Large Linear Layers").

Forward saves ``S X`` (``k = ceil(rmm_ratio * N)`` rows) instead of the activation ``X`` (N tokens
x D).  S is a Rademacher sketch with entries ``±1/sqrt(k)``, so ``E[SᵀS] = I`` and backward's
``X̂ = Sᵀ (S X)`` gives an unbiased weight gradient ``Gᵀ X̂``.  S is never stored: forward draws
one random seed per step (an RNG op, so inductor and CUDA graphs handle it like dropout's), and
both passes rebuild S from (seed, site salt, index) with an integer hash in plain aten ops.
"""
from __future__ import annotations

import math
import zlib

import torch
import torch.fx as fx

from ..passes.graph_utils import emit as _emit
from .base import register_codec

__all__ = ["RmmCodec", "sketch_rows", "rademacher", "structural_error"]

aten, prims = torch.ops.aten, torch.ops.prims
_MASK = (1 << 31) - 1  # products of two < 2**31 numbers stay inside int64
_SEED_BYTES = 3  # the seed travels as 3 byte values (exact in any float dtype) in one extra row


def sketch_rows(tokens: int, ratio: float) -> int:
    return max(1, min(tokens, math.ceil(ratio * tokens)))


def structural_error(tokens: int, rows: int) -> float:
    """``E‖SᵀSX − X‖² / ‖X‖²`` for a Rademacher sketch when the tokens are orthogonal,
    (N − 1) / k: RMM is unbiased but noisy (compare VeLoRA's energy dropped, at most 1)."""
    return (tokens - 1) / rows


def _mix(h: torch.Tensor) -> torch.Tensor:
    """An integer hash on int64 values < 2**31 (xorshift-multiply rounds, masked to 31 bits)."""
    for mult in (0x2C1B3C6D, 0x297A2D39):
        h = torch.bitwise_and(torch.bitwise_xor(h, torch.bitwise_right_shift(h, 15)) * mult, _MASK)
    return torch.bitwise_xor(h, torch.bitwise_right_shift(h, 13))


def rademacher(seed: torch.Tensor, salt: int, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The sketch ``S`` [rows, cols] with entries ±1/sqrt(rows), a function of (seed, salt) only.
    Eager twin of what the codec emits (tests compare both)."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=seed.device)
    h = torch.bitwise_and(idx * 0x9E3779B + seed * 0x85EBCA7 + salt, _MASK)
    bit = torch.bitwise_and(_mix(h), 1)
    return ((bit * 2 - 1).to(dtype) * rows ** -0.5).view(rows, cols)


@register_codec("rmm")
class RmmCodec:
    """encode: ``[S X; seed row]`` ((k + 1) x D); decode: ``Sᵀ (S X)`` with X's shape."""

    name = "rmm"

    def __init__(self, ratio: float, salt: str):
        self.ratio = ratio
        self.salt = zlib.crc32(salt.encode()) & 0xFFFFFF  # a different sketch per site

    def uuid(self) -> str:
        return f"rmm:{self.ratio}:{self.salt}"

    def saved_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """What forward saves for an activation of ``shape``: ``k`` sketched rows and the seed row."""
        tokens = math.prod(int(s) for s in shape[:-1])
        return (sketch_rows(tokens, self.ratio) + 1) * int(shape[-1]) * dtype.itemsize

    def _sketch(self, graph: fx.Graph, seed: fx.Node, rows: int, cols: int, dtype, device) -> fx.Node:
        idx = _emit(graph, prims.iota.default, rows * cols, start=0, step=1, dtype=torch.int64, device=device,
                    requires_grad=False)
        h = _emit(graph, aten.add.Tensor, _emit(graph, aten.mul.Tensor, idx, 0x9E3779B),
                  _emit(graph, aten.add.Tensor, _emit(graph, aten.mul.Tensor, seed, 0x85EBCA7), self.salt))
        h = _emit(graph, aten.bitwise_and.Scalar, h, _MASK)
        for mult in (0x2C1B3C6D, 0x297A2D39):
            shifted = _emit(graph, aten.bitwise_right_shift.Tensor_Scalar, h, 15)
            h = _emit(graph, aten.bitwise_and.Scalar,
                      _emit(graph, aten.mul.Tensor, _emit(graph, aten.bitwise_xor.Tensor, h, shifted), mult), _MASK)
        h = _emit(graph, aten.bitwise_xor.Tensor, h, _emit(graph, aten.bitwise_right_shift.Tensor_Scalar, h, 13))
        bit = _emit(graph, aten.bitwise_and.Scalar, h, 1)
        signs = _emit(graph, aten.sub.Tensor, _emit(graph, aten.mul.Tensor, bit, 2), 1)
        scaled = _emit(graph, aten.mul.Tensor, _emit(graph, prims.convert_element_type.default, signs, dtype),
                       rows ** -0.5)
        return _emit(graph, aten.view.default, scaled, [rows, cols])

    @staticmethod
    def _shape(activation: fx.Node) -> tuple[int, int]:
        val = activation.meta["val"]
        if any(not isinstance(s, int) for s in val.shape):
            raise ValueError("rmm needs static shapes")
        return math.prod(val.shape[:-1]), int(val.shape[-1])

    def encode(self, graph: fx.Graph, activation: fx.Node, state=None) -> tuple[list[fx.Node], None]:
        val = activation.meta["val"]
        tokens, width = self._shape(activation)
        rows = sketch_rows(tokens, self.ratio)
        if width < _SEED_BYTES:
            raise ValueError(f"rmm needs a feature size >= {_SEED_BYTES}")
        seed = _emit(graph, aten.randint.low, 0, 1 << (8 * _SEED_BYTES), [1], dtype=torch.int64,
                     device=val.device)
        seed = _emit(graph, aten.select.int, seed, 0, 0)
        flat = activation
        if not val.is_contiguous():
            flat = _emit(graph, aten.clone.default, flat, memory_format=torch.contiguous_format)
        flat = _emit(graph, aten.view.default, flat, [tokens, width])
        sketch = self._sketch(graph, seed, rows, tokens, val.dtype, val.device)
        projected = _emit(graph, aten.mm.default, sketch, flat)
        # the seed rides in the saved tensor: saved on its own, the partitioner would re-draw it
        # in backward (an RNG op without inputs looks free to recompute) and S would not match
        shifts = _emit(graph, prims.iota.default, _SEED_BYTES, start=0, step=8, dtype=torch.int64,
                       device=val.device, requires_grad=False)
        digits = _emit(graph, aten.bitwise_and.Scalar, _emit(graph, aten.bitwise_right_shift.Tensor, seed, shifts), 255)
        row = _emit(graph, aten.constant_pad_nd.default,
                    _emit(graph, prims.convert_element_type.default, digits, val.dtype), [0, width - _SEED_BYTES])
        return [_emit(graph, aten.cat.default, [projected, _emit(graph, aten.unsqueeze.default, row, 0)])], None

    def decode(self, graph: fx.Graph, saved: list[fx.Node], activation: fx.Node) -> fx.Node:
        (packed,) = saved
        val = activation.meta["val"]
        tokens, width = self._shape(activation)
        rows = int(packed.meta["val"].shape[0]) - 1
        projected = _emit(graph, aten.slice.Tensor, packed, 0, 0, rows)
        digits = _emit(graph, prims.convert_element_type.default,
                       _emit(graph, aten.slice.Tensor, _emit(graph, aten.select.int, packed, 0, rows), 0, 0, _SEED_BYTES),
                       torch.int64)
        shifts = _emit(graph, prims.iota.default, _SEED_BYTES, start=0, step=8, dtype=torch.int64,
                       device=val.device, requires_grad=False)
        seed = _emit(graph, aten.sum.default, _emit(graph, aten.bitwise_left_shift.Tensor, digits, shifts))
        sketch = self._sketch(graph, seed, rows, tokens, val.dtype, val.device)
        x_hat = _emit(graph, aten.mm.default, _emit(graph, aten.permute.default, sketch, [1, 0]), projected)
        return _emit(graph, aten.view.default, x_hat, list(val.shape))
