"""VeLoRA's rank-1 sub-token codec: the math, and the aten code the rewritten graph runs.

Forward keeps ``c = subtokens(x) @ v`` (one scalar per sub-token of size g); backward rebuilds
``x̂ = c ⊗ v`` for the weight gradient alone.  Sub-tokens are contiguous chunks of the last
(feature) dimension, as in the paper's released code.

In the compiled graph everything is plain aten: the init rule reads the site's state row (a
graph input, see ``state.py``) branch-free, the projection is a multiply-and-sum that inductor
fuses into the kernel producing ``x``, and the new state is written back with one ``copy_`` (with v
fixed, the graph writes one pin, ``emit_pin``, where possible into a state no site reads).
"""
from __future__ import annotations

import math

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor

from .._compat import unroll_reductions_threshold
from ..distributed import emit_rank_mean
from ..state import initial_vector, random_vector, subtokens
from ..passes.graph_utils import RESHAPES, SWAP_LIKE, emit as _emit, sizes, swaps_last_two
from .base import register_codec

__all__ = ["project", "reconstruct", "initial_vector", "random_vector", "reconstruction_error", "StateRow",
           "VeloraCodec", "emit_pin"]

aten, prims = torch.ops.aten, torch.ops.prims
_EPS = 1e-12
_FP16_MAX = 65504.0


def project(x: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Coefficients ``c[..., j] = <x[..., j*g:(j+1)*g], v>``: shape ``[..., D/g]``, accumulated
    in fp32 (and clamped to fp16's range when stored as fp16, so they never overflow to inf)."""
    g = v.numel()
    c = (subtokens(x, g).float() * v.float().to(x.device)).sum(-1)
    dtype = dtype or x.dtype
    if dtype == torch.float16:
        c = c.clamp(-_FP16_MAX, _FP16_MAX)
    return c.to(dtype)


def reconstruct(c: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x̂ = c ⊗ v`` flattened back to ``[..., D]`` (D = c.shape[-1] * g)."""
    dtype = dtype or c.dtype
    x_hat = c.to(dtype).unsqueeze(-1) * v.to(dtype)
    return x_hat.flatten(-2)


def reconstruction_error(x: Tensor, v: Tensor) -> float | None:
    """Relative energy VeLoRA drops from ``x``: ``1 - |c ⊗ v|² / |x|²`` (0 when exact).  For a
    gradient that is not aligned with the dropped part, it is also the expected relative error
    (squared) of the weight gradient — the ``estimated_error`` the planner bounds.  None when ``x``
    says nothing (no energy, or not finite: a zero-initialised branch), so the caller can fall
    back to the structural bound instead of reading "exact" from an all-zero batch."""
    s = subtokens(x.detach(), v.numel()).reshape(-1, v.numel()).float()
    energy = float((s * s).sum())
    if not (0.0 < energy < float("inf")):
        return None
    kept = float(((s @ v.float().to(s.device)) ** 2).sum())
    return min(1.0, max(0.0, 1.0 - kept / energy))


@dataclass
class StateRow:
    """Where a site's v lives in the graph: the current value of its weight's state tensor
    (a placeholder, or the result of an earlier update in the same graph) and the row."""

    tensor: fx.Node
    orientation: int
    update: str        # "none" (v already set), "first_batch", "batch", "ema:<decay>"
    written: bool = True  # this graph writes the state tensor: what backward reads of it must be a copy


def _emit_normalised(graph: fx.Graph, u: fx.Node, g: int) -> fx.Node:
    norm = _emit(graph, aten.sqrt.default, _emit(graph, aten.sum.default, _emit(graph, aten.mul.Tensor, u, u)))
    ok = _emit(graph, aten.logical_and.default, _emit(graph, aten.gt.Scalar, norm, _EPS),
               _emit(graph, aten.lt.Scalar, norm, float("inf")))
    unit = _emit(graph, aten.div.Tensor, u, _emit(graph, aten.clamp_min.default, norm, _EPS))
    uniform = _emit(graph, aten.full.default, [g], g ** -0.5, dtype=torch.float32,
                    device=u.meta["val"].device, pin_memory=False)
    return _emit(graph, aten.where.self, ok, unit, uniform)


def _emit_subtokens_f32(graph: fx.Graph, x: fx.Node, g: int) -> fx.Node:
    """``x`` as fp32 ``[..., D/g, g]`` (a view when x is contiguous).  Viewed, then cast: a cast
    between two views kept torch 2.11's inductor from fusing a bf16 producer into the sums."""
    val = x.meta["val"]
    if not val.is_contiguous():
        x = _emit(graph, aten.clone.default, x, memory_format=torch.contiguous_format)
    shape = [*sizes(graph, x, range(val.dim() - 1)), int(val.shape[-1]) // g, g]
    view = _emit(graph, aten.view.default, x, shape)
    return view if val.dtype == torch.float32 else _emit(graph, prims.convert_element_type.default, view,
                                                             torch.float32)


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    if node.meta["val"].dtype == dtype:
        return node
    return _emit(graph, prims.convert_element_type.default, node, dtype)


def _first_element(graph: fx.Graph, coeff: fx.Node) -> fx.Node:
    return _cast(graph, _emit(graph, aten.select.int, _emit(graph, aten.view.default, coeff, [-1]), 0, 0),
                 torch.float32)


def emit_pin(graph: fx.Graph, state: fx.Node, coefficients: list[fx.Node]) -> fx.Node:
    """``state`` with its pin (the last element of row 0, never read) set to the sum of each
    site's first coefficient.  Why: the write is a forward mutation, so this data dependency makes
    min-cut compute every coefficient in forward (``MUST_SAVE`` alone does not stop it from
    recomputing them in backward from a kept activation).  One element for the whole graph: one
    small kernel, and every other state tensor stays unwritten, so backward reads its v in place
    (no copy of v per site).  Insert after the last coefficient."""
    total = _first_element(graph, coefficients[0])
    for coeff in coefficients[1:]:
        total = _emit(graph, aten.add.Tensor, total, _first_element(graph, coeff))
    row = _emit(graph, aten.select.int, state, 0, 0)
    new_row = _emit(graph, aten.select_scatter.default, row, total, 0, int(row.meta["val"].shape[0]) - 1)
    return _emit(graph, aten.select_scatter.default, state, new_row, 0, 0)


@register_codec("velora")
class VeloraCodec:
    """Rank-1 sub-token projection of one activation (one v per activation group).

    encode: ``v = rule(state row, x)``; ``c = sum(subtokens(x) * v, -1)`` (fp32 accumulation);
            returns ``[c, v]`` to save and the updated state tensor (row: flag, v, pin), or None
            when v stays (rule "none": the pipeline pins the coefficients, ``emit_pin``)
    decode: ``x̂ = view(c[..., None] * v, [..., D]) * scale`` in the activation's dtype."""

    name = "velora"

    def __init__(self, sub_token_size: int, coeff_dtype: torch.dtype | None = None, scale: float = 1.0,
                 beside: tuple[int, ...] = ()):
        self.sub_token_size = sub_token_size
        self.coeff_dtype = coeff_dtype
        self.scale = scale
        self.beside = tuple(sorted(set(beside)))  # reduction widths of other encodes in x's producer

    def saved_bytes(self, shape: tuple[int, ...], dtype: torch.dtype, copies_vector: bool = True) -> int:
        """What forward saves for an activation of ``shape``: one coefficient per sub-token (in
        ``coeff_dtype``, default the activation's) and a copy of v (fp32, g floats) unless
        backward reads v from its unwritten state input (``copies_vector=False``)."""
        numel = math.prod(int(s) for s in shape)
        coeff = torch.empty((), dtype=self.coeff_dtype or dtype).element_size()
        return numel // self.sub_token_size * coeff + (self.sub_token_size * 4 if copies_vector else 0)

    def encode(self, graph: fx.Graph, activation: fx.Node, state: StateRow) -> tuple[list[fx.Node], fx.Node | None]:
        g = self.sub_token_size
        row = _emit(graph, aten.select.int, state.tensor, 0, state.orientation)
        v_old = _emit(graph, aten.slice.Tensor, row, 0, 1, 1 + g)
        if state.update == "none":
            # saved for backward: a view of the state input where no write can change it under backward
            v = _emit(graph, aten.clone.default, v_old) if state.written else v_old
        else:
            v = self._emit_rule(graph, state.update, row, v_old, _emit_subtokens_f32(graph, activation, g))
        dtype = self.coeff_dtype or activation.meta["val"].dtype
        block = self._block(activation)
        if block == g:
            subtokens = _emit_subtokens_f32(graph, activation, g)
            coeff = self._emit_stored(graph, _emit(graph, aten.sum.dim_IntList,
                                                   _emit(graph, aten.mul.Tensor, subtokens, v), [-1]), dtype)
        else:
            coeff = self._emit_blocked(graph, _emit_subtokens_f32(graph, activation, block), v, block, dtype)
        if state.update == "none":  # v stays: the pipeline pins this graph's coefficients at once (emit_pin)
            return [coeff, v], None
        new_state = self._emit_store(graph, state, row, v, _first_element(graph, coeff))
        return [coeff, v], new_state

    def encodes_after_forward_matmul(self, activation: fx.Node) -> bool:
        """Whether the encode should follow the forward matmul that reads x: where the sums are a
        reduction that fuses with x's producer (blocks, or g >= 8, beside no other width).  The
        matmul realises x first and the sums read that buffer, fused into the producer's kernel;
        placed before it, they inline the unrealised producer (a GELU) and compute it a second
        time in a kernel of their own (torch 2.11, 2.12).  Beside a norm the plain sum keeps its
        place: there inductor fused it into the norm's kernel."""
        block = self._block(activation)
        return block >= unroll_reductions_threshold() and all(width == block for width in self.beside)

    def _block(self, activation: fx.Node) -> int:
        return fusable_block(self.sub_token_size, int(activation.meta["val"].shape[-1]), self.beside)

    def _emit_stored(self, graph: fx.Graph, coeff: fx.Node, dtype: torch.dtype) -> fx.Node:
        """fp32 coefficients in the stored dtype (clamped to fp16's range when fp16)."""
        if dtype == torch.float16:
            coeff = _emit(graph, aten.clamp_max.default, _emit(graph, aten.clamp_min.default, coeff, -_FP16_MAX), _FP16_MAX)
        return _cast(graph, coeff, dtype)

    def _emit_blocked(self, graph: fx.Graph, blocks: fx.Node, v: fx.Node, block: int,
                      dtype: torch.dtype) -> fx.Node:
        """The same coefficients as ``block // g`` sums over blocks of ``block`` features, one per
        sub-token of the block (v at its place, the rest selected away: adding exact zeros changes no
        rounding at g = 2), stacked in the ``[..., D/g]`` layout's memory as ``[..., D/block, block/g]``.

        Why: inductor turns a sum over fewer than ``unroll_reductions_threshold`` (8) elements into
        a pointwise kernel over D/g elements a token, which cannot fuse with the D-element kernel
        that produces x (a GELU, SiLU·up), so x is read from memory once more.  A sum over a block
        of 8 is a reduction covering every element of x once: the producer's kernel computes it,
        as it does the few-bit planes (same 8-wide block), and writes each coefficient into its
        place of the saved buffer."""
        g = self.sub_token_size
        per_block = block // g
        device = v.meta["val"].device
        ones = _emit(graph, aten.full.default, [g], 1.0, dtype=torch.float32, device=device, pin_memory=False)
        zero = _emit(graph, aten.scalar_tensor.default, 0.0, dtype=torch.float32, device=device)
        planes = []
        for j in range(per_block):
            pad = [j * g, block - (j + 1) * g]
            inside = _emit(graph, aten.gt.Scalar, _emit(graph, aten.constant_pad_nd.default, ones, pad, 0.0), 0.5)
            # the other sub-tokens are selected away, not multiplied by 0: an inf there stays out
            mine = _emit(graph, aten.where.self, inside, blocks, zero)
            placed = _emit(graph, aten.constant_pad_nd.default, v, pad, 0.0)
            coeff = _emit(graph, aten.sum.dim_IntList, _emit(graph, aten.mul.Tensor, mine, placed), [-1])
            planes.append(_emit(graph, aten.unsqueeze.default, self._emit_stored(graph, coeff, dtype), -1))
        # saved as [..., D/block, block/g], the [..., D/g] layout's memory: a view of it would be
        # recomputed in backward from this node, and the saved node is what the report counts
        return _emit(graph, aten.cat.default, planes, -1)

    def _emit_rule(self, graph: fx.Graph, rule: str, row: fx.Node, v_old: fx.Node, subtokens: fx.Node) -> fx.Node:
        g = self.sub_token_size
        flat = _emit(graph, aten.view.default, subtokens, [-1, g])
        mean = _emit(graph, aten.mean.dim, flat, [0])
        if rule != "first_batch":  # a v updated every step: from the global batch (distributed.py)
            mean = emit_rank_mean(graph, mean)
        fresh = _emit_normalised(graph, mean, g)
        if rule == "batch":
            return fresh
        initialised = _emit(graph, aten.gt.Scalar, _emit(graph, aten.select.int, row, 0, 0), 0.0)
        if rule == "first_batch":
            kept = v_old
        else:  # "ema:<decay>": normalise(decay * v + (1 - decay) * fresh)
            decay = float(rule.split(":", 1)[1])
            mixed = _emit(graph, aten.add.Tensor, _emit(graph, aten.mul.Tensor, v_old, decay),
                          _emit(graph, aten.mul.Tensor, fresh, 1.0 - decay))
            kept = _emit_normalised(graph, mixed, g)
        return _emit(graph, aten.where.self, initialised, kept, fresh)

    def _emit_store(self, graph: fx.Graph, state: StateRow, row: fx.Node, v: fx.Node, pin: fx.Node) -> fx.Node:
        """The state tensor with this row replaced by ``[1, v, (unused...), pin]`` (an updated v)."""
        g = self.sub_token_size
        width = int(row.meta["val"].shape[0])
        device = v.meta["val"].device
        one = _emit(graph, aten.full.default, [1], 1.0, dtype=torch.float32, device=device, pin_memory=False)
        parts = [one, v]
        if 1 + g < width - 1:
            parts.append(_emit(graph, aten.slice.Tensor, row, 0, 1 + g, width - 1))
        parts.append(_emit(graph, aten.view.default, pin, [1]))
        new_row = _emit(graph, aten.cat.default, parts)
        return _emit(graph, aten.select_scatter.default, state.tensor, new_row, 0, state.orientation)

    def decode(self, graph: fx.Graph, saved: list[fx.Node], activation: fx.Node) -> fx.Node:
        coeff, v = saved
        dtype = activation.meta["val"].dtype
        outer = _emit(graph, aten.mul.Tensor, _emit(graph, aten.unsqueeze.default, _cast(graph, coeff, dtype), -1),
                      _cast(graph, v, dtype))
        lead = activation.meta["val"].dim() - 1  # the blocked layout has one more dim before the features
        x_hat = _emit(graph, aten.view.default, outer, [*sizes(graph, coeff, range(lead)),
                                                        int(activation.meta["val"].shape[-1])])
        return _emit(graph, aten.mul.Tensor, x_hat, self.scale) if self.scale != 1.0 else x_hat

    def factored_matmul(self, graph: fx.Graph, saved: list[fx.Node], activation: fx.Node, matmul: fx.Node,
                        operand_index: int, chain: list[fx.Node]) -> fx.Node | None:
        """The weight gradient straight from the coefficients, never building x̂ (None: not this form).

        With x̂ = C ⊗ v (C: [N, D/g] coefficients, v: [g]), ``gradᵀ x̂`` is ``(gradᵀ C) ⊗ v``: a
        matmul g times smaller along the features, then a broadcast multiply.  It also skips
        writing and reading the [N, D] reconstruction.  Handled: a 2-D ``mm`` whose operand is the
        activation flattened to [N, D] (``mm(gradᵀ, x)``, nn.Linear) or its transpose
        (``mm(xᵀ, grad)``, GPT-2's Conv1D)."""
        if matmul.target is not aten.mm.default:
            return None
        features = int(activation.meta["val"].shape[-1])
        axis = _feature_axis(activation, chain)
        if axis is None or (operand_index, axis) not in ((1, 1), (0, 0)):
            return None
        coeff, v = saved
        g, dtype = self.sub_token_size, activation.meta["val"].dtype
        flat = _emit(graph, aten.view.default, _cast(graph, coeff, dtype), [-1, features // g])
        v = _cast(graph, v, dtype)
        if operand_index == 1:  # mm(gradᵀ [out, N], x [N, D]) -> (gradᵀ C) [out, D/g] ⊗ v
            small = _emit(graph, aten.mm.default, matmul.args[0], flat)
            outer = _emit(graph, aten.mul.Tensor, _emit(graph, aten.unsqueeze.default, small, -1), v)
            shape = [small.meta["val"].shape[0], features]
        else:                   # mm(xᵀ [D, N], grad [N, out]) -> v ⊗ (Cᵀ grad) [D/g, out]
            # permute, not aten.t: the joint graph is past inductor's decompositions, which lower t
            small = _emit(graph, aten.mm.default, _emit(graph, aten.permute.default, flat, [1, 0]), matmul.args[1])
            outer = _emit(graph, aten.mul.Tensor, _emit(graph, aten.unsqueeze.default, small, 1),
                          _emit(graph, aten.view.default, v, [1, g, 1]))
            shape = [features, small.meta["val"].shape[1]]
        result = _emit(graph, aten.view.default, outer, shape)
        return _emit(graph, aten.mul.Tensor, result, self.scale) if self.scale != 1.0 else result

    def uuid(self) -> str:
        return (f"velora:g={self.sub_token_size}:dtype={self.coeff_dtype}:scale={self.scale}:beside={self.beside}"
                ":factored")


def fusable_block(g: int, features: int, beside: tuple[int, ...] = ()) -> int:
    """The block the projection sums over: g itself, or for g below inductor's
    ``unroll_reductions_threshold`` the smallest multiple of g at or above it that divides the
    features.  g when none does, or when ``beside`` (the widths other encodes reduce over in the
    kernel producing x: few-bit planes 8, int8 scales 64) holds another width: inductor would
    fuse the producer into one of the two reductions and read x again for the other (measured
    on generated code: Llama's SiLU·up beside int8 gate/up scales took one more kernel)."""
    threshold = unroll_reductions_threshold()
    if g >= threshold:
        return g
    block = g * -(-threshold // g)
    if features % block or any(width != block for width in beside):
        return g
    return block


_PASS = {aten.alias.default, aten.clone.default}


def _feature_axis(activation: fx.Node, chain: list[fx.Node]) -> int | None:
    """Where the activation's feature axis ends up in a 2-D matmul operand reached through
    ``chain`` (reshapes that keep the features last, 2-D transposes); None for any other form."""
    features = activation.meta["val"].shape[-1]
    axis = activation.meta["val"].dim() - 1  # features last
    for node in chain:
        val_in, val_out = node.args[0].meta["val"], node.meta["val"]
        if node.target in _PASS:
            continue
        if node.target in RESHAPES:
            if axis != val_in.dim() - 1 or val_out.shape[-1] != features:
                return None
            axis = val_out.dim() - 1
        elif node.target in SWAP_LIKE and val_in.dim() == 2 and swaps_last_two(node):
            axis = 1 - axis
        else:
            return None
    operand = chain[-1] if chain else activation
    return axis if operand.meta["val"].dim() == 2 else None
