"""The chunked loss head (rewritten before AOTAutograd) and the memory_budget planner: loss and
gradients equal the unrewritten graph, saved bytes drop on the real partition, refusals say why."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import velora_fx


class Head(nn.Module):
    """A tiny LM: embedding -> one MLP block -> lm_head -> next-token cross-entropy."""

    def __init__(self, vocab=300, d=32, bias=False, smoothing=0.0, return_logits=False, reduction="mean",
                 upcast=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.lm_head = nn.Linear(d, vocab, bias=bias)
        self.smoothing, self.return_logits, self.reduction = smoothing, return_logits, reduction
        self.upcast = upcast

    def forward(self, ids, targets):
        h = self.emb(ids)
        h = h + self.proj(F.gelu(self.fc(h)))
        logits = self.lm_head(h)
        flat = logits.flatten(0, 1)
        loss = F.cross_entropy(flat.float() if self.upcast else flat, targets.flatten(),
                               label_smoothing=self.smoothing, reduction=self.reduction)
        return (loss, logits) if self.return_logits else loss


def _batch(vocab=300, b=2, t=37):
    ids = torch.randint(0, vocab, (b, t + 1))
    targets = ids[:, 1:].clone()
    targets[0, :5] = -100  # ignored positions
    return ids[:, :-1], targets


def _step(model, backend, ids, targets, autocast=False):
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = torch.compile(model, backend=backend)(ids, targets)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _plain():
    """The same decompositions and partitioner, no rewrite (the reference for exactness)."""
    return velora_fx.backend(include=["nothing"], compiler="eager")


@pytest.mark.parametrize("chunk,bias,reduction", [(16, False, "mean"), (7, True, "mean"), (1000, False, "sum")])
def test_loss_and_grads_equal_the_unrewritten_graph(strict_pass, chunk, bias, reduction):
    model = Head(bias=bias, reduction=reduction)
    ids, targets = _batch()
    with pytest.warns(UserWarning, match="matches no site"):
        ref_loss, ref = _step(model, _plain(), ids, targets)
    backend = velora_fx.backend(codecs=("chunked_loss",), loss_chunk_size=chunk, compiler="eager")
    loss, grads = _step(model, backend, ids, targets)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
    (row,) = [s for s in backend.report().sites if s.codec == "chunked_loss"]
    assert row.decision == "compressed" and row.name == "lm_head"
    report = backend.report()
    assert report.saved_bytes_after < report.saved_bytes_before  # measured on both partitions
    assert row.bytes_freed == report.saved_bytes_before - report.saved_bytes_after


def test_autocast_matches(strict_pass):
    model = Head()
    ids, targets = _batch()
    with pytest.warns(UserWarning, match="matches no site"):
        ref_loss, ref = _step(model, _plain(), ids, targets, autocast=True)
    backend = velora_fx.backend(codecs=("chunked_loss",), loss_chunk_size=16, compiler="eager")
    loss, grads = _step(model, backend, ids, targets, autocast=True)
    assert backend.report().compressed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-3, atol=1e-3)
    for name in ref:  # bf16 matmuls: per-chunk rounding of the weight gradient
        torch.testing.assert_close(grads[name], ref[name], rtol=2e-2, atol=2e-3, msg=name)


@pytest.mark.parametrize("dtype,upcast", [(torch.float32, True), (torch.bfloat16, True), (torch.float16, True),
                                          (torch.float64, True), (torch.float64, False)])
def test_loss_dtype_is_eagers(strict_pass, dtype, upcast):
    """The rewritten loss has the dtype of the unrewritten one (``.float()``: fp32 for every model,
    fp64 included; no upcast: the model's); its gradients keep the parameters' dtype."""
    model = Head(upcast=upcast).to(dtype)
    ids, targets = _batch()
    eager = model(ids, targets)
    with pytest.warns(UserWarning, match="matches no site"):
        ref_loss, ref = _step(model, _plain(), ids, targets)
    backend = velora_fx.backend(codecs=("chunked_loss",), loss_chunk_size=16, compiler="eager")
    loss, grads = _step(model, backend, ids, targets)
    assert backend.report().compressed
    assert loss.dtype == ref_loss.dtype == eager.dtype == (torch.float32 if upcast else dtype)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)     # both reduce the same logits
    tol = {torch.float64: 1e-6, torch.float32: 1e-5}.get(dtype, 2e-2)   # 16-bit: per-chunk roundings
    for name in ref:
        assert grads[name].dtype == dtype, name
        torch.testing.assert_close(grads[name], ref[name], rtol=tol, atol=tol / 10, msg=name)


@pytest.mark.parametrize("kwargs,reason", [
    (dict(return_logits=True), "also used elsewhere"),
    (dict(smoothing=0.1), "label_smoothing"),
])
def test_refused_heads_say_why_and_stay_exact(strict_pass, kwargs, reason):
    model = Head(**kwargs)
    ids, targets = _batch()
    backend = velora_fx.backend(codecs=("chunked_loss",), compiler="eager")
    _step(model, backend, ids, targets)
    (row,) = [s for s in backend.report().sites if s.codec == "chunked_loss"]
    assert row.decision == "skipped" and reason in row.reason, row.reason


def test_memory_budget_is_met_with_recompute(strict_pass):
    model = Head()
    ids, targets = _batch()
    with pytest.warns(UserWarning, match="matches no site"):
        _, ref = _step(model, _plain(), ids, targets)
    backend = velora_fx.backend(codecs=("chunked_loss",), memory_budget=0.3, compiler="eager")
    _, grads = _step(model, backend, ids, targets)
    (graph,) = backend.report().graphs
    # the budget is on the step's predicted peak: 0.3 of the unrewritten graph's, less the transients
    # the rewritten baseline keeps above its saved set
    peaks = graph.predicted_peak
    assert peaks["target"] == int(0.3 * peaks["before"]["peak"])
    assert 0 <= graph.budget_target < peaks["target"]
    assert graph.saved_bytes_after <= graph.budget_target, graph.message
    # the head's weight gradient stays saved: recomputing it would run the chunk loop again in backward
    (row,) = [s for s in graph.sites if s.codec == "chunked_loss"]
    assert row.bytes_after >= model.lm_head.weight.numel() * 4, row
    assert graph.recompute_budget is not None and graph.recompute_budget < 1.0
    for name in ref:  # exact codec + exact recompute: exact gradients
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def _saved(nbytes):
    from velora_fx.passes.partition_probe import SavedSet
    return SavedSet({"a": "a"}, {}, {"a": nbytes}, None, None)


def test_budget_search_takes_the_least_recompute_that_fits():
    """The knapsack budget is bisected for the largest value (least recompute) meeting the target;
    an unreachable target returns the smallest saved set and says so."""
    from velora_fx import _compat
    from velora_fx.passes.budget import fit_recompute_budget

    def probe():  # saved bytes grow with the knapsack budget, as inductor's do
        return _saved(100 + int(1000 * _compat.current_recompute_budget()))

    fit = fit_recompute_budget(probe, _saved(1100), target=600)
    assert fit.met and fit.saved.activation_bytes <= 600 and 0.45 <= fit.recompute_budget <= 0.5
    fit = fit_recompute_budget(probe, _saved(1100), target=50)
    assert not fit.met and fit.saved.activation_bytes == 100 and "not reachable" in fit.message()
    fit = fit_recompute_budget(probe, _saved(1100), target=2000)
    assert fit.met and fit.recompute_budget == 1.0


@pytest.mark.slow
def test_inductor_codegen_matches(strict_pass):
    model = Head()
    ids, targets = _batch()
    with pytest.warns(UserWarning, match="matches no site"):  # the reference needs no codegen of its own
        ref_loss, ref = _step(model, _plain(), ids, targets)
    backend = velora_fx.backend(codecs=("chunked_loss",), loss_chunk_size=16)
    loss, grads = _step(model, backend, ids, targets)
    assert backend.report().compressed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-4, atol=1e-5, msg=name)


class _HFLoss(nn.Module):
    """A transformers causal LM whose compiled forward returns only the loss (logits stay inside)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, targets):
        logits = self.model(ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def test_tied_gpt2_head_is_exact_and_named_lm_head(strict_pass):
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=200, n_embd=32, n_layer=1, n_head=2, n_positions=64, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_pytorch_tanh")
    model = _HFLoss(GPT2LMHeadModel(config))  # lm_head.weight is wte.weight
    ids, targets = _batch(vocab=200, t=20)
    with pytest.warns(UserWarning, match="matches no site"):
        ref_loss, ref = _step(model, _plain(), ids, targets)
    backend = velora_fx.backend(codecs=("chunked_loss",), loss_chunk_size=9, compiler="eager")
    loss, grads = _step(model, backend, ids, targets)
    (row,) = [s for s in backend.report().sites if s.codec == "chunked_loss"]
    assert row.decision == "compressed" and row.name == "model.lm_head"
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
