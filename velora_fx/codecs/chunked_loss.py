"""Exact, memory-lean ``linear + cross-entropy`` head (fused lm_head + loss).

Why: in a causal LM the logits ``[tokens, vocab]`` (and their fp32 copy made for a stable
softmax) are the largest single activation of a training step -- with a 32000-entry vocabulary
they dwarf every hidden state.  Saving them for backward costs ``N * V`` elements; inductor's
recompute-instead-of-save answer re-runs the whole ``lm_head`` matmul in backward.  Here the
head runs *once*: the forward walks the rows in chunks and, per chunk, computes the logits, the
loss contribution and right away the gradients of the loss w.r.t. ``hidden``, ``weight`` and
``bias``; only those gradients (the size of the inputs, not of the logits) survive to backward,
which merely scales them by ``grad_output``.  Peak extra memory is a few ``[chunk, V]`` buffers.

Prior art: the fused / chunked linear cross-entropy idea, e.g. Liger-Kernel's
``FusedLinearCrossEntropy`` and Wijmans et al., "Cut Your Losses in Large-Vocabulary Language
Models" (Apple, 2024).  This is an independent plain-PyTorch implementation written to be
traceable by AOTAutograd / ``make_fx`` with fake tensors: static shapes, no ``.item()``, no
data-dependent Python control flow (the chunk loop is unrolled at trace time from the static N).

Numerics mirror ``F.cross_entropy(F.linear(h, W, b).to(loss_dtype), t, ...)``: the matmuls run in
the input dtype, log-softmax in ``loss_dtype`` (fp32 for ``.float()``), the logits gradient
(already scaled by ``1/count`` for ``mean``, as the reference does before its cast) is cast back
to the input dtype before the two matmuls.  Each chunk's ``grad_W`` product is summed into an
accumulator of at least fp32 (``grad_b`` likewise) that is cast to the parameter's dtype once at
the end: summing in bf16 would round the running sum once per chunk (relative error growing with
the chunk count, 3x eager's at 32 chunks).  On CUDA the bf16/fp16 product goes straight into the
fp32 sum (the matmul's epilogue adds it); elsewhere it is rounded to the input dtype first, as
eager's is.  The loss defaults to ``promote_types(dtype, fp32)`` (fp64 stays fp64); the graph
rewrite passes the unrewritten loss's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["linear_cross_entropy", "supported_call", "LinearCrossEntropyFunction", "SUPPORTED_REDUCTIONS"]

SUPPORTED_REDUCTIONS = ("mean", "sum")


def supported_call(reduction: str = "mean", label_smoothing: float = 0.0, weight=None) -> str | None:
    """None if a ``cross_entropy`` call with these options can be replaced by
    :func:`linear_cross_entropy`, else a short reason naming the unsupported option."""
    if reduction not in SUPPORTED_REDUCTIONS:
        return f"reduction={reduction!r} not supported (only {'/'.join(SUPPORTED_REDUCTIONS)})"
    if label_smoothing != 0.0:
        return f"label_smoothing={label_smoothing!r} not supported (only 0.0)"
    if weight is not None:
        return "weight (class weights) not supported"
    return None


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 for bf16/fp16/fp32, fp64 stays fp64
    return torch.promote_types(dtype, torch.float32)


@torch.library.custom_op("velora_fx::chunk_accumulate_", mutates_args=("acc",))
def _accumulate_(acc: Tensor, part: Tensor) -> None:
    """``acc += part`` as one opaque op.  Why not ``acc.add_(part)``: inductor inlines a chain of
    pointwise adds into one kernel at the end, which keeps every chunk's ``[V, D]`` partial alive
    (as much memory as the logits); an opaque op runs (in place) per chunk and frees the partial."""
    acc.add_(part)


@torch.library.custom_op("velora_fx::chunk_after", mutates_args=())
def _after(x: Tensor, after: list[Tensor]) -> Tensor:
    """A copy of ``x`` (a chunk's rows, small) that exists only once every tensor in ``after`` is
    written: the next chunk's logits start after everything that reads the previous chunk's logits
    has run (its gradient sums, its ``grad_h`` rows, its loss term).  Without this order inductor
    ran several chunks' logits kernels ahead of their consumers; and on CUDA it fused every chunk's
    target-logit gather into the one kernel that adds the chunks' losses at the end, so each
    chunk's ``[C, V]`` logits stayed alive to the last chunk (measured on an H200: 5 of them at
    2048 rows, 625 MiB, more than the unchunked head's logits)."""
    return x.clone()


@_after.register_fake
def _(x: Tensor, after: list[Tensor]) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("velora_fx::chunk_finish", mutates_args=())
def _finish(acc: Tensor, dtype: torch.dtype) -> Tensor:
    """The summed gradient in the parameter's dtype, as a tensor of its own.  Why an op: the sum is
    an output of the functionalized in-place accumulation (a getitem), a same-dtype cast is removed
    as a no-op, and min-cut recomputes a getitem even when it is tagged MUST_SAVE: under a recompute
    budget it ran the whole chunk loop again in backward (fp32 models)."""
    return acc.to(dtype, copy=True)


@_finish.register_fake
def _(acc: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(acc, dtype=dtype)


_FUSED_ADDMM: dict[tuple, bool] = {}  # (device type, acc dtype, input dtype) -> cuBLAS takes out_dtype


@torch.library.custom_op("velora_fx::chunk_addmm_", mutates_args=("acc",))
def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with the sum in ``acc``'s dtype, as one opaque op (see ``_accumulate_``).
    Where the device's matmul can write a wider output (cuBLAS: bf16/fp16 inputs, fp32 C, beta=1)
    the product is added in the matmul's epilogue: no ``[V, D]`` partial in the input dtype is
    written and read back per chunk (that round trip cost ~4 % of a step at a 32000 vocabulary)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    key = (acc.device.type, acc.dtype, a.dtype)
    if _FUSED_ADDMM.get(key, acc.is_cuda):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            _FUSED_ADDMM[key] = True
            return
        except (RuntimeError, TypeError, NotImplementedError):  # no such kernel here: the two-step sum
            _FUSED_ADDMM[key] = False
    acc.add_(a @ b)


def _chunked_forward(h: Tensor, w: Tensor, b: Tensor | None, t: Tensor, ignore_index: int,
                     reduction: str, chunk_size: int, need_h: bool, need_w: bool, need_b: bool,
                     loss_dtype: torch.dtype):
    """h [N, D], w [V, D], b [V] | None, t [N].  Returns (loss, grad_h, grad_w, grad_b); the
    gradients are those of ``loss`` itself (i.e. for ``mean`` already divided by count), or None.
    ``loss_dtype``: log-softmax, loss and its reduction (the reference's logits upcast)."""
    n, d = h.shape
    v = w.shape[0]
    acc = loss_dtype                                 # log-softmax and the loss
    grad_acc = _acc_dtype(w.dtype)                   # weight/bias gradient sums across chunks
    valid = t != ignore_index                        # [N] bool
    count = valid.sum().to(acc)                      # 0-dim; 0 -> mean is nan like PyTorch
    need_grad = need_h or need_w or need_b
    if reduction == "mean":
        # PyTorch's all-ignored mean: loss nan, gradients 0 (every row is masked out anyway)
        grad_scale = 1.0 / count.clamp(min=1)
    else:
        grad_scale = None

    total = torch.zeros((), dtype=acc, device=h.device)
    # grad_h needs no sum across chunks: each row's product runs once, over the whole vocabulary
    grad_h = torch.empty_like(h, memory_format=torch.contiguous_format) if need_h else None
    grad_w = torch.zeros((v, d), dtype=grad_acc, device=w.device) if need_w else None
    grad_b = torch.zeros((v,), dtype=grad_acc, device=w.device) if (need_b and b is not None) else None

    columns = torch.arange(v, device=h.device)
    for start in range(0, n, chunk_size):            # static n: unrolled at trace time
        stop = min(start + chunk_size, n)
        hc = h[start:stop]
        if start:
            hc = _after(hc, after)
        tc = t[start:stop]
        vc = valid[start:stop]
        logits = hc @ w.t() if b is None else torch.addmm(b, hc, w.t())   # input dtype, [C, V]
        # each reader upcasts for itself: one fp32 copy with three readers is a [C, V] fp32 buffer
        # inductor writes out; an upcast per reader fuses into it (the values are the same)
        lse = torch.logsumexp(logits.to(acc), dim=-1)        # [C]
        safe_t = torch.where(vc, tc, torch.zeros_like(tc)).unsqueeze(1)
        tgt = logits.gather(1, safe_t).squeeze(1).to(acc)
        vf = vc.to(acc)
        total = total + ((lse - tgt) * vf).sum()
        after = [total]                              # what the next chunk waits for (``_after``)
        if not need_grad:
            continue
        # d(row loss)/d logits = softmax - onehot(target), zero on ignored rows
        p = (logits.to(acc) - lse.unsqueeze(1)).exp_()
        del logits
        # minus onehot(target) as a compare, not a scatter: inductor fuses it with the exp, the scaling
        # and the cast into one kernel that reads the chunk's logits once and writes g once
        p.sub_((columns == safe_t).to(acc))
        row_scale = vf if grad_scale is None else vf * grad_scale
        p.mul_(row_scale.unsqueeze(1))
        g = p.to(h.dtype)                            # the reference casts grad_logits back here
        del p
        if need_h:
            rows = g @ w
            grad_h[start:stop].copy_(rows)
            after.append(rows)
        if need_w:
            _addmm_(grad_w, g.t(), hc)
            after.append(grad_w)
        if grad_b is not None:
            _accumulate_(grad_b, g.sum(0, dtype=grad_acc))
            after.append(grad_b)
        del g

    loss = total / count if reduction == "mean" else total
    if grad_w is not None:
        grad_w = _finish(grad_w, w.dtype)
    if grad_b is not None:
        grad_b = _finish(grad_b, b.dtype)
    return loss, grad_h, grad_w, grad_b


def _anchor(loss: Tensor, grads: list[Tensor]) -> Tensor:
    """``loss + 0 * (one element of each gradient)``: the same value, but the gradients become
    part of what the forward output needs.  Otherwise the min-cut partitioner treats them as
    backward-only work and may move the whole chunk loop (lm_head included) into backward, or save
    the per-chunk logits gradients instead (N x V: nothing freed).  A non-finite gradient makes
    the loss nan, which only ever happens when the loss itself overflowed."""
    if not grads:
        return loss
    probe = sum(g.reshape(-1)[0].to(loss.dtype) for g in grads)
    return loss + probe * 0.0


class LinearCrossEntropyFunction(torch.autograd.Function):
    """``apply(h2d, weight, bias_or_None, target1d, ignore_index, reduction, chunk_size,
    need_h, need_w, need_b, loss_dtype)``; prefer :func:`linear_cross_entropy`.  The ``need_*``
    flags are decided by the caller (grad mode and ``requires_grad``) because ``forward`` runs
    under no-grad and must know up front which gradients to compute."""

    @staticmethod
    def forward(ctx, h, w, b, t, ignore_index, reduction, chunk_size, need_h, need_w, need_b, loss_dtype):
        loss, grad_h, grad_w, grad_b = _chunked_forward(h, w, b, t, ignore_index, reduction, chunk_size,
                                                        need_h, need_w, need_b, loss_dtype)
        loss = _anchor(loss, [g for g in (grad_h, grad_w, grad_b) if g is not None])
        ctx.has = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.save_for_backward(*[g for g in (grad_h, grad_w, grad_b) if g is not None])
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        grads = []
        for has in ctx.has:
            if has:
                g = next(saved)
                grads.append(g * grad_output)   # 0-dim: keeps g's dtype
            else:
                grads.append(None)
        return (*grads, None, None, None, None, None, None, None, None)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None, *,
                         ignore_index: int = -100, reduction: str = "mean", chunk_size: int = 4096,
                         loss_dtype: torch.dtype | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias).float(), target, ignore_index=...,
    reduction=...)`` without materialising the ``[N, V]`` logits (N = rows of ``hidden``).

    ``hidden`` is ``[..., D]``, ``target`` ``[...]`` (same leading shape), ``weight`` ``[V, D]``,
    ``bias`` ``[V]``.  ``reduction`` is ``"mean"`` (over non-ignored targets; nan if all are
    ignored) or ``"sum"``.  ``chunk_size`` rows are processed at a time; the lm_head matmul runs
    once per chunk in forward and never in backward.  Returns a 0-dim loss in ``loss_dtype``
    (float32 or float64: the dtype the logits are cast to before the loss), by default
    ``promote_types(hidden.dtype, float32)``.
    """
    reason = supported_call(reduction)
    if reason is not None:
        raise ValueError(reason)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if loss_dtype is None:
        loss_dtype = _acc_dtype(hidden.dtype)
    if loss_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"loss_dtype must be torch.float32 or torch.float64, got {loss_dtype!r}")
    if not hidden.is_floating_point():
        raise ValueError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)} "
                         "(expected hidden [..., D] and weight [V, D])")
    if tuple(hidden.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"leading shape of hidden {tuple(hidden.shape[:-1])} does not match target "
                         f"{tuple(target.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} does not match weight's V={weight.shape[0]}")
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and tensor.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {tensor.dtype} differs from hidden dtype {hidden.dtype} "
                             "(F.linear would fail too; cast explicitly)")

    h2 = hidden.reshape(-1, hidden.shape[-1])
    t1 = target.reshape(-1)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and hidden.requires_grad
    need_w = grad_on and weight.requires_grad
    need_b = grad_on and bias is not None and bias.requires_grad
    return LinearCrossEntropyFunction.apply(h2, weight, bias, t1, ignore_index, reduction, chunk_size,
                                            need_h, need_w, need_b, loss_dtype)
