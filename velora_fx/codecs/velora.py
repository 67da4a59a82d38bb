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

__all__ = ["project", "reconstruct", "initial_vector", "random_vector", "encode_op", "decode_op", "VeloraCodec"]

OP_NAME = "velora_fx::encode"
_EPS = 1e-12


def _subtokens(x: Tensor, g: int) -> Tensor:
    if x.shape[-1] % g:
        raise ValueError(f"sub-token size {g} does not divide the feature size {x.shape[-1]}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // g, g)


def project(x: Tensor, v: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Coefficients ``c[..., j] = <x[..., j*g:(j+1)*g], v>``: shape ``[..., D/g]``."""
    g = v.numel()
    c = torch.matmul(_subtokens(x, g), v.to(x.dtype))
    return c if dtype is None else c.to(dtype)


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


@torch.library.custom_op(OP_NAME, mutates_args=())
def encode_op(x: Tensor, site: str, sub_token_size: int, coeff_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Forward half of the codec inside a compiled graph: updates the site's v (per its init
    rule) from ``x`` and returns ``(coefficients, v)``; v (g floats) is saved beside the
    coefficients so backward reconstructs with exactly the v forward used."""
    v = lookup_site(site).vector_for(x, sub_token_size)
    return project(x, v, coeff_dtype), v.clone()


@encode_op.register_fake
def _(x: Tensor, site: str, sub_token_size: int, coeff_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    c = x.new_empty((*x.shape[:-1], x.shape[-1] // sub_token_size), dtype=coeff_dtype)
    return c, x.new_empty((sub_token_size,), dtype=torch.float32)


@torch.library.custom_op("velora_fx::decode", mutates_args=())
def decode_op(coeff: Tensor, v: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    """Backward half: ``x̂ = scale · (c ⊗ v)`` with the activation's dtype and shape [..., D]."""
    x_hat = reconstruct(coeff, v, dtype)
    return x_hat * scale if scale != 1.0 else x_hat


@decode_op.register_fake
def _(coeff: Tensor, v: Tensor, dtype: torch.dtype, scale: float) -> Tensor:
    return coeff.new_empty((*coeff.shape[:-1], coeff.shape[-1] * v.shape[0]), dtype=dtype)


@register_codec("velora")
class VeloraCodec:
    """Rank-1 sub-token projection of one activation (one v per activation group)."""

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
        return create_node(graph, torch.ops.velora_fx.decode.default,
                           (coeff, v, activation.meta["val"].dtype, self.scale))

    def uuid(self) -> str:
        return f"velora:g={self.sub_token_size}:dtype={self.coeff_dtype}:scale={self.scale}"
