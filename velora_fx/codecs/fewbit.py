"""Few-bit backward of a pointwise nonlinearity (Novikov et al., 2023, "Few-Bit Backward:
Quantized Gradients of Activation Functions for Memory Footprint Reduction").

Forward is exact.  Instead of the tensor f' is evaluated from (x, or y for ReLU/sigmoid/tanh),
forward saves a ``bits``-bit code per element — the interval of the optimal piecewise-constant
fit of f' it falls in (``fewbit_levels``) — packed as ``bits`` bit planes (plane k holds bit k of
eight neighbouring codes along the last dim, one byte per eight elements: ``bits`` bytes per eight
codes), or (``pack=False``) one code per byte.  Each plane is a sum over groups of eight, which
inductor fuses into the producer's own kernel (a persistent reduction that also writes the
producer's output) and, on a GPU, writes straight into its slice of the saved buffer; a packed
word split into bytes afterwards took a kernel and a buffer of its own (docs/codecs.md).
Backward multiplies the incoming gradient by the level of each code.  All plain aten ops: the
decode fuses into the gradient's kernel.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from .._compat import real_tensors
from ..passes.graph_utils import emit as _emit, sizes
from .base import register_codec
from .fewbit_levels import FewBitLevels, empirical_error, fit_levels

__all__ = ["FewBitCodec", "packed_shape"]

aten, prims = torch.ops.aten, torch.ops.prims
_PACK = 8  # codes per plane byte: b planes of one byte hold 8 codes of b bits


def packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, ...]:
    """Shape of the saved codes of a tensor of ``shape`` (uint8): ``bits`` planes of one byte per
    eight elements, or one byte per element when the last dim is not a multiple of eight."""
    if shape and isinstance(shape[-1], int) and shape[-1] % _PACK == 0:
        return (bits, *shape[:-1], shape[-1] // _PACK)
    return tuple(shape)


def _iota(graph: fx.Graph, length: int, step: int, device, dtype: torch.dtype) -> fx.Node:
    """``[0, step, 2 step, ...]`` as the post-decomposition op inductor lowers (not arange)."""
    return _emit(graph, prims.iota.default, length, start=0, step=step, dtype=dtype, device=device,
                 requires_grad=False)


@register_codec("fewbit")
class FewBitCodec:
    """``encode(graph, t)`` -> packed uint8 codes of ``t``; ``decode(graph, packed, t, grad)`` ->
    ``grad * q(code)`` in ``grad``'s dtype.  ``domain`` says whether ``t`` is the function's input
    or its output (then the fit's thresholds are mapped through f)."""

    name = "fewbit"

    def __init__(self, function: str, bits: int, domain: str = "input", pack: bool = True):
        self.function, self.bits, self.domain, self.pack = function, bits, domain, pack
        with real_tensors():  # the fit runs once per (function, bits), also while a fake mode is active
            self.levels: FewBitLevels = fit_levels(function, bits)
            thresholds = self.levels.output_thresholds() if domain == "output" else self.levels.thresholds
        self.thresholds = tuple(float(t) for t in thresholds)

    def _packs(self, shape: tuple[int, ...]) -> bool:
        """Whether codes of a tensor of ``shape`` are saved as bit planes (else one per byte)."""
        return self.pack and packed_shape(tuple(shape), self.bits) != tuple(shape)

    def reduction_width(self, shape: tuple[int, ...]) -> int | None:
        """Each bit plane sums over groups of eight codes (none when codes are bytes)."""
        return _PACK if self._packs(shape) else None

    def uuid(self) -> str:
        return f"fewbit:{self.function}:{self.bits}:{self.domain}" + ("" if self.pack else ":byte")

    def saved_bytes(self, shape: tuple[int, ...], dtype: torch.dtype | None = None) -> int:
        """What forward saves for a tensor of ``shape``: the (packed) uint8 codes."""
        shape = tuple(int(s) for s in shape)
        return math.prod(packed_shape(shape, self.bits) if self.pack else shape)

    def error(self, t: torch.Tensor) -> float:
        """Relative energy of the derivative error on real data ``t`` (the tensor encoded)."""
        with real_tensors():
            return self._error(t)

    def _error(self, t: torch.Tensor) -> float:
        if self.domain == "input":
            return empirical_error(self.levels, t)
        y = t.double()
        exact = {"relu": lambda: (y > 0).double(), "sigmoid": lambda: y * (1 - y), "tanh": lambda: 1 - y * y}
        d = exact[self.function]()
        q = self.levels.decode(self.levels.encode_output(t.float()), torch.float64)
        denominator = float((d * d).sum())
        return float(((d - q) ** 2).sum()) / denominator if denominator > 0 else 0.0

    # -- forward -------------------------------------------------------------------------------
    def encode(self, graph: fx.Graph, t: fx.Node) -> fx.Node:
        val = t.meta["val"]
        x = t if val.dtype == torch.float32 else _emit(graph, prims.convert_element_type.default, t, torch.float32)
        compare = aten.gt.Scalar if self.levels.right_closed else aten.ge.Scalar
        codes = None
        for threshold in self.thresholds:
            step = _emit(graph, prims.convert_element_type.default, _emit(graph, compare, x, threshold), torch.int32)
            codes = step if codes is None else _emit(graph, aten.add.Tensor, codes, step)
        if not self._packs(val.shape):
            return _emit(graph, prims.convert_element_type.default, codes, torch.uint8)
        return self._pack(graph, codes, val)

    def _pack(self, graph: fx.Graph, codes: fx.Node, val: torch.Tensor) -> fx.Node:
        lead = sizes(graph, codes, range(val.dim() - 1))
        groups = _emit(graph, aten.view.default, codes, [*lead, int(val.shape[-1]) // _PACK, _PACK])
        positions = _iota(graph, _PACK, 1, val.device, torch.int32)
        planes = []
        for k in range(self.bits):  # plane k: bit k of each code, shifted to its position in the group
            shifted = _emit(graph, aten.bitwise_right_shift.Tensor_Scalar, groups, k)
            bit = _emit(graph, aten.bitwise_and.Scalar, shifted, 1)
            plane = _emit(graph, aten.sum.dim_IntList, _emit(graph, aten.bitwise_left_shift.Tensor, bit, positions),
                          [-1], dtype=torch.int32)
            planes.append(_emit(graph, aten.unsqueeze.default,
                                _emit(graph, prims.convert_element_type.default, plane, torch.uint8), 0))
        return planes[0] if len(planes) == 1 else _emit(graph, aten.cat.default, planes)

    # -- backward ------------------------------------------------------------------------------
    def decode(self, graph: fx.Graph, packed: fx.Node, like: fx.Node, grad: fx.Node,
               out_dtype: torch.dtype) -> fx.Node:
        val = like.meta["val"]
        codes = self._unpack(graph, packed, val) if packed.meta["val"].dim() == val.dim() + 1 else \
            _emit(graph, prims.convert_element_type.default, packed, torch.int32)
        levels = [float(v) for v in self.levels.levels]
        deriv = None  # levels[0] + sum_k (levels[k] - levels[k-1]) * (code >= k): no gather, one fused kernel
        for k in range(1, len(levels)):
            if levels[k] == levels[k - 1]:
                continue
            step = _emit(graph, aten.mul.Tensor, _emit(graph, prims.convert_element_type.default,
                                                       _emit(graph, aten.ge.Scalar, codes, k), torch.float32),
                         levels[k] - levels[k - 1])
            deriv = step if deriv is None else _emit(graph, aten.add.Tensor, deriv, step)
        deriv = _emit(graph, aten.add.Tensor, deriv, levels[0])
        g32 = grad if grad.meta["val"].dtype == torch.float32 else \
            _emit(graph, prims.convert_element_type.default, grad, torch.float32)
        out = _emit(graph, aten.mul.Tensor, g32, deriv)
        return out if out_dtype == torch.float32 else _emit(graph, prims.convert_element_type.default, out, out_dtype)

    def _unpack(self, graph: fx.Graph, packed: fx.Node, val: torch.Tensor) -> fx.Node:
        positions = _iota(graph, _PACK, 1, val.device, torch.int32)
        codes = None
        for k in range(self.bits):
            plane = _emit(graph, prims.convert_element_type.default, _emit(graph, aten.select.int, packed, 0, k),
                          torch.int32)
            bit = _emit(graph, aten.bitwise_and.Scalar,
                        _emit(graph, aten.bitwise_right_shift.Tensor, _emit(graph, aten.unsqueeze.default, plane, -1),
                              positions), 1)
            if k:
                bit = _emit(graph, aten.bitwise_left_shift.Tensor_Scalar, bit, k)
            codes = bit if codes is None else _emit(graph, aten.bitwise_or.Tensor, codes, bit)
        lead = sizes(graph, packed, range(1, val.dim()))  # the planes' dim comes first
        return _emit(graph, aten.view.default, codes, [*lead, int(val.shape[-1])])
