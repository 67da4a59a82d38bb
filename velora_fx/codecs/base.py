"""The codec protocol: what a compressed site saves in forward and rebuilds in backward.

A codec emits ``encode`` nodes right after the activation (forward side of the joint graph) and
``decode`` nodes right before each consumer (backward side), all plain aten ops.  The rewrite
pass tags the encoded nodes MUST_SAVE, so they are what the partitioner keeps.

Two shapes of site (see docs/codecs.md):
- weight-gradient sites (``velora``, ``rmm``): ``decode(graph, saved, activation)`` rebuilds an
  activation-shaped stand-in that only the weight-gradient matmul reads;
- derivative sites (``fewbit``): ``decode(graph, saved, like, grad, dtype)`` returns the input
  gradient ``grad * q(code)`` that replaces a nonlinearity's backward region.
The exact loss head (``chunked_loss``) is not a joint-graph codec: it is rewritten on dynamo's
graph before AOTAutograd (``passes/loss_head.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

import torch.fx as fx

__all__ = ["Codec", "register_codec", "get_codec"]


class Codec(Protocol):
    name: str

    def encode(self, graph: fx.Graph, activation: fx.Node, state: Any) -> tuple[list[fx.Node], fx.Node | None]:
        """Insert forward nodes computing what is saved instead of ``activation``; ``state`` says
        where the site's state lives in the graph.  Returns the nodes to save and the updated
        state value (None if unchanged)."""

    def decode(self, graph: fx.Graph, saved: list[fx.Node], activation: fx.Node) -> fx.Node:
        """Insert backward nodes rebuilding an approximation with ``activation``'s shape/dtype."""

    def uuid(self) -> str:
        """Identity of the codec and its options, for inductor's cache key."""

    # Optional: ``reduction_width(shape) -> int | None``, the width of the groups along the last dim
    # that the encode sums or maxes over (None: a pointwise encode).  Inductor computes such a
    # reduction in the producer's kernel only when every reduction there has the same width, so a
    # VeLoRA site fed by that producer sums over blocks of the same width or not at all.


_CODECS: dict[str, Callable[..., Codec]] = {}


def register_codec(name: str):
    def wrap(factory: Callable[..., Codec]) -> Callable[..., Codec]:
        _CODECS[name] = factory
        return factory
    return wrap


def get_codec(name: str, **options) -> Codec:
    if name not in _CODECS:
        raise ValueError(f"unknown codec {name!r}; registered: {sorted(_CODECS)}")
    return _CODECS[name](**options)
