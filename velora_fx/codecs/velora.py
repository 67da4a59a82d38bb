"""VeLoRA's rank-1 sub-token codec: the math, and the custom op the rewritten graph calls.

Forward keeps ``c = subtokens(x) @ v`` (one scalar per sub-token of size g); backward rebuilds
``x̂ = c ⊗ v`` for the weight gradient alone.  Sub-tokens are contiguous chunks of the last
(feature) dimension, as in the paper's released code.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor

from ..passes.graph_utils import create_node
from ..state import lookup_site
from .base import register_codec

__all__ = ["project", "reconstruct", "initial_vector", "random_vector", "encode_op", "VeloraCodec"]

aten, prims = torch.ops.aten, torch.ops.prims
_EPS = 1e-12


def _subtokens(x: Tensor, g: int) -> Tensor:
    if x.shape[-1] % g:
        raise ValueError(f"sub-token size {g} does not divide the feature size {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def project(x: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Coefficients ``c[..., j] = <x[..., j*g:(j+1)*g], v>``: shape ``[..., D/g]``.

    One GEMV over all sub-tokens (it runs on the host once per site per step inside the encode
    op, so it skips matmul's shape dispatch); ``v`` already in x's dtype costs no cast."""
    g = v.numel()
    c = torch.mv(_subtokens(x, g).reshape(-1, g), v.to(x.dtype)).view(*x.shape[:-1], x.shape[-1] // g)
    return c if dtype is None or c.dtype == dtype else c.to(dtype)


def reconstruct(c: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``x̂ = c ⊗ v`` flattened back to ``[..., D]`` (D = c.shape[-1] * g)."""
    dtype = dtype or c.dtype
    x_hat = c.to(dtype).unsqueeze(-1) * v.to(dtype)
    return x_hat.flatten(-2)


def initial_vector(x: Tensor, g: int) -> Tensor:
    """The paper's v: normalised mean of all sub-tokens of ``x`` (fp32).  Falls back to the
    uniform unit vector when the mean vanishes, so v is always a unit vector."""
    mean = _subtokens(x.detach(), g).reshape(-1, g).float().mean(0)
    return _normalised(mean)


def random_vector(g: int, seed: int, device: torch.device | str = "cpu") -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return _normalised(torch.randn(g, generator=gen)).to(device)


def _normalised(u: Tensor) -> Tensor:
    norm = u.norm()
    if not torch.isfinite(norm) or norm <= _EPS:
        return torch.full_like(u, u.numel() ** -0.5)
    return u / norm


@torch.library.custom_op("velora_fx::encode", mutates_args=())
def encode_op(x: Tensor, site: str, sub_token_size: int, coeff_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Forward half of the codec in a compiled graph: the site's v for this step (updated from
    ``x`` per its init rule) and the coefficients ``subtokens(x) @ v``.

    Opaque on purpose: the partitioner cannot recompute it, so it runs once per step, in forward,
    and its (small) outputs are what gets saved.  v is returned too, so backward reconstructs with
    exactly the v forward used; reconstruction itself is plain aten ops that inductor fuses."""
    state = lookup_site(site)
    v = state.vector_for(x, sub_token_size)
    return project(x, state.vector_as(x.dtype), coeff_dtype), v.clone()


@encode_op.register_fake
def _(x: Tensor, site: str, sub_token_size: int, coeff_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    c = x.new_empty((*x.shape[:-1], x.shape[-1] // sub_token_size), dtype=coeff_dtype)
    return c, x.new_empty((sub_token_size,), dtype=torch.float32)


def _cast(graph: fx.Graph, node: fx.Node, dtype: torch.dtype) -> fx.Node:
    if node.meta["val"].dtype == dtype:
        return node
    return create_node(graph, prims.convert_element_type.default, (node, dtype), like=node)


def _sizes(graph: fx.Graph, node: fx.Node, dims: range) -> list:
    """Sizes of ``node`` as graph arguments: ints, or sym_size nodes for symbolic dims."""
    shape = node.meta["val"].shape
    return [shape[d] if isinstance(shape[d], int) else create_node(graph, aten.sym_size.int, (node, d))
            for d in dims]


@register_codec("velora")
class VeloraCodec:
    """Rank-1 sub-token projection of one activation (one v per activation group).

    encode: ``c, v = velora_fx::encode(x)`` (opaque, stateful)
    decode: ``x̂ = view(c[..., None] * v, [..., D]) * scale`` in the activation's dtype (aten)."""

    name = "velora"

    def __init__(self, sub_token_size: int, coeff_dtype: torch.dtype | None = None, scale: float = 1.0):
        self.sub_token_size = sub_token_size
        self.coeff_dtype = coeff_dtype
        self.scale = scale

    def encode(self, graph: fx.Graph, activation: fx.Node, site_key: str) -> list[fx.Node]:
        dtype = self.coeff_dtype or activation.meta["val"].dtype
        enc = create_node(graph, torch.ops.velora_fx.encode.default,
                          (activation, site_key, self.sub_token_size, dtype), like=activation)
        return [create_node(graph, operator.getitem, (enc, i), like=activation) for i in (0, 1)]

    def decode(self, graph: fx.Graph, saved: list[fx.Node], activation: fx.Node) -> fx.Node:
        coeff, v = saved
        dtype = activation.meta["val"].dtype
        node = lambda target, *args: create_node(graph, target, args)  # noqa: E731
        outer = node(aten.mul.Tensor, node(aten.unsqueeze.default, _cast(graph, coeff, dtype), -1), _cast(graph, v, dtype))
        ndim = coeff.meta["val"].dim()
        x_hat = node(aten.view.default, outer, [*_sizes(graph, coeff, range(ndim - 1)),
                                                 int(coeff.meta["val"].shape[-1]) * self.sub_token_size])
        return node(aten.mul.Tensor, x_hat, self.scale) if self.scale != 1.0 else x_hat

    def uuid(self) -> str:
        return f"velora:g={self.sub_token_size}:dtype={self.coeff_dtype}:scale={self.scale}"
