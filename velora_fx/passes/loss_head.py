"""The loss head, exact: ``cross_entropy(linear(h, W).float(), y)`` -> ``linear_cross_entropy``.

This rewrite runs on dynamo's graph, before AOTAutograd: at the torch level the head is three
nodes with explicit options, while after decomposition it is dozens of aten ops.  The replacement
(``codecs/chunked_loss.py``) walks the rows in chunks and computes the loss and every gradient in
forward, so no full logits (nor their fp32 copy) are ever alive and lm_head runs once per chunk;
AOTAutograd traces it like any autograd.Function.

Matched only when nothing else reads the logits (a model that returns them must materialise
them anyway: ``integrations/causal_lm.py`` makes transformers' causal LMs return none in
training), the logits are reshaped on their leading dims only, and no autocast changes the
matmul's dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from .._compat import LINEAR_FUNCTIONS, CheckpointPolicy, dynamo_source_name
from ..codecs.chunked_loss import linear_cross_entropy, supported_call
from ..naming import module_path_from_source

__all__ = ["LossHead", "rewrite_loss_heads", "pin_head_gradients"]

_LINEAR = set(LINEAR_FUNCTIONS)
_CROSS_ENTROPY = {F.cross_entropy}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "contiguous"}
_ESCAPES = ("the logits are also used elsewhere (returned by the model?): transformers' causal LMs return none "
            "in training unless keep_logits=True; another model needs a function that returns only the loss")
_BROKEN = ("the logits are an input of this graph: a graph break separates lm_head from the loss "
           "(TORCH_LOGS=graph_breaks shows where)")


@dataclass
class LossHead:
    """One matched (or refused) lm_head + cross-entropy."""

    name: str                 # the lm_head's module path (dynamo's source)
    rewritten: bool
    reason: str
    rows: int = 0             # N: tokens scored
    vocab: int = 0            # V
    logits_bytes: int = 0     # the full logits in the matmul's dtype (what the baseline holds)
    chunk_size: int = 0


def _example(node: Any):
    return node.meta.get("example_value") if isinstance(node, fx.Node) else None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_upcast(node: fx.Node) -> bool:
    if node.op != "call_method":
        return False
    if node.target == "float":
        return True
    return node.target == "to" and any(a is torch.float32 for a in (*node.args[1:], *node.kwargs.values()))


def _walk_to_linear(start: fx.Node) -> tuple[fx.Node | None, list[fx.Node], str]:
    """Follow the CE input up through reshapes and one upcast to a linear; every hop must have
    one user.  Returns (linear, chain, reason if refused)."""
    chain, node = [], start
    while True:
        if len(node.users) != 1:
            return None, chain, _ESCAPES
        if node.op == "call_function" and node.target in _LINEAR:
            return node, chain, ""
        if node.op == "call_method" and (node.target in _RESHAPE_METHODS or _is_upcast(node)):
            chain.append(node)
            node = node.args[0]
            if not isinstance(node, fx.Node):
                return None, chain, "unexpected reshape"
            continue
        if node.op == "placeholder":
            return None, chain, _BROKEN
        return None, chain, f"the logits come from {node.target}, not a linear layer"


def _head_name(linear: fx.Node, weight: Any) -> str:
    """The lm_head's module path (from the call's module stack: a tied weight's own source names
    the embedding), else the weight's source."""
    stack = linear.meta.get("nn_module_stack")
    if stack:
        path = module_path_from_source(str(list(stack.values())[-1][0]))
        if path:
            return path
    return _source_name(weight) if isinstance(weight, fx.Node) else "?"


def _source_name(weight: fx.Node) -> str:
    source = dynamo_source_name(weight) if weight.op == "placeholder" else None
    path = module_path_from_source(source) if source else None
    return (path or weight.name).removesuffix(".weight")


def rewrite_loss_heads(gm: fx.GraphModule, chunk_size: int) -> list[LossHead]:
    """Rewrite every matching head of dynamo's graph ``gm`` in place; returns what was found."""
    found = []
    for ce in list(gm.graph.nodes):
        if ce.op != "call_function" or ce.target not in _CROSS_ENTROPY:
            continue
        head = _rewrite(gm, ce, chunk_size)
        if head is not None:
            found.append(head)
    if any(h.rewritten for h in found):
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return found


def _rewrite(gm: fx.GraphModule, ce: fx.Node, chunk_size: int) -> LossHead | None:
    logits, target = _arg(ce, 0, "input", None), _arg(ce, 1, "target", None)
    if not isinstance(logits, fx.Node) or not isinstance(target, fx.Node):
        return None
    linear, chain, reason = _walk_to_linear(logits)
    if linear is None:
        return LossHead("?", False, reason) if chain or logits.op == "call_function" else None
    hidden, weight = linear.args[0], _arg(linear, 1, "weight", None)
    bias = _arg(linear, 2, "bias", None)
    head = LossHead(_head_name(linear, weight), False, "", chunk_size=chunk_size)
    legacy = _arg(ce, 3, "size_average", None) is not None or _arg(ce, 5, "reduce", None) is not None
    reason = ("legacy size_average/reduce arguments" if legacy else "") or \
        supported_call(_arg(ce, 6, "reduction", "mean"), _arg(ce, 7, "label_smoothing", 0.0),
                       _arg(ce, 2, "weight", None)) or _check(ce, logits, linear, hidden, weight, bias, chain, head)
    if reason:
        head.reason = reason
        return head
    ignore_index = _arg(ce, 4, "ignore_index", -100)
    reduction = _arg(ce, 6, "reduction", "mean")
    compute = _example(linear).dtype  # autocast: the matmul runs in bf16/fp16 from fp32 inputs
    with gm.graph.inserting_before(ce):
        width = _example(hidden).shape[-1]
        if compute != _example(hidden).dtype:
            hidden, weight = (gm.graph.call_method("to", (n, compute)) for n in (hidden, weight))
            bias = gm.graph.call_method("to", (bias, compute)) if bias is not None else None
        rows = gm.graph.call_method("reshape", (hidden, -1, width))
        flat_target = gm.graph.call_method("reshape", (target, -1))
        # the loss in the dtype the unrewritten graph computes it in (fp64 logits ``.float()``: fp32)
        loss = gm.graph.call_function(linear_cross_entropy, (rows, weight, flat_target),
                                      {"bias": bias, "ignore_index": ignore_index, "reduction": reduction,
                                       "chunk_size": chunk_size, "loss_dtype": _example(logits).dtype})
    loss.meta.update({k: v for k, v in ce.meta.items() if k != "example_value"})
    if "example_value" in ce.meta:
        loss.meta["example_value"] = ce.meta["example_value"]
    ce.replace_all_uses_with(loss)
    gm.graph.erase_node(ce)
    head.rewritten, head.reason = True, f"chunked loss head ({chunk_size} rows at a time)"
    return head


def _check(ce: fx.Node, logits: fx.Node, linear: fx.Node, hidden: Any, weight: Any, bias: Any,
           chain: list[fx.Node], head: LossHead) -> str:
    """Why the head cannot be rewritten exactly ("" if it can); fills the head's sizes."""
    if not isinstance(hidden, fx.Node) or not isinstance(weight, fx.Node):
        return "its input or weight is not a tensor of the graph"
    values = [_example(n) for n in (logits, linear, hidden, weight, _arg(ce, 1, "target", None))]
    if any(not isinstance(v, torch.Tensor) for v in values):
        return "no example values to check shapes against"
    ce_in, out, h, w, t = values
    if any(not isinstance(s, int) for v in values for s in v.shape):
        return "dynamic shapes (the chunk loop is unrolled for a static row count)"
    if bias is not None and not isinstance(bias, fx.Node):
        return "its bias is not a tensor of the graph"
    if ce_in.dim() != 2 or t.dim() != 1 or ce_in.shape[0] != t.shape[0]:
        return "the logits are not [tokens, vocab] with [tokens] targets"
    if out.shape[-1] != ce_in.shape[-1] or math.prod(out.shape[:-1]) != ce_in.shape[0] or \
            math.prod(h.shape[:-1]) != ce_in.shape[0]:
        return "the logits are reshaped across the vocabulary dim"
    if h.dtype != w.dtype or (out.dtype != h.dtype and out.dtype not in (torch.bfloat16, torch.float16)):
        return f"unsupported dtypes ({h.dtype} x {w.dtype} -> {out.dtype})"
    if ce_in.dtype != torch.float32 and ce_in.dtype != torch.float64 and not any(_is_upcast(c) for c in chain):
        return f"the loss runs in {ce_in.dtype} (the chunked head computes it in fp32: not the same numbers)"
    head.rows, head.vocab = int(ce_in.shape[0]), int(ce_in.shape[1])
    head.logits_bytes = head.rows * head.vocab * out.element_size()
    kept = (w.numel() + (head.vocab if bias is not None else 0)) * w.element_size() + h.numel() * h.element_size()
    # the baseline keeps at least the log-probabilities in the loss's dtype for cross-entropy's backward
    stored = head.rows * head.vocab * max(out.element_size(), ce_in.element_size())
    if stored <= kept:
        return (f"frees nothing at this size: the logits ({stored} bytes) are no larger than the "
                f"gradients the head keeps instead ({kept} bytes: {head.rows} tokens against a {head.vocab}-entry "
                "vocabulary)")
    return ""


def pin_head_gradients(gm: fx.GraphModule, param_indices) -> list[str]:
    """In the joint graph of a rewritten head, tag the gradients its forward computed MUST_SAVE.

    Its backward is ``saved_grad * grad_output`` with a 0-dim ``grad_output``.  Min-cut may
    otherwise prefer saving the per-chunk logits gradients (N x V) and running the weight
    gradient matmuls in backward when N x V looks cheaper than V x D + N x D (few tokens): that
    frees nothing.  Returns the tagged nodes' names (the head's saved tensors, for the report)."""
    from .graph_utils import JointFlags, tensor_val
    flags = JointFlags.of(gm, param_indices)
    pinned = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.mul.Tensor or len(node.args) != 2:
            continue
        a, b = node.args
        for grad, scale in ((a, b), (b, a)):
            g, s = tensor_val(grad), tensor_val(scale)
            if g is None or s is None or s.dim() != 0 or g.dim() == 0:
                continue
            if flags.tangent.get(scale, False) and not flags.tangent.get(grad, True):
                grad.meta["recompute"] = CheckpointPolicy.MUST_SAVE
                pinned.append(grad.name)
    return pinned
