"""The planner's error estimate (passes/estimate.py) against the weight-gradient error VeLoRA
really causes: with ``init="first_batch"`` the compiled step runs on the calibration batch, so the
estimate of the ``gradient`` source must equal the measured relative squared error of each weight
gradient, order sites exactly as that error does, and never read 0 on a degenerate batch."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import velora_fx
from velora_fx.passes.estimate import structural_error, unseen_directions
from pass_helpers import Stack


class WithLoss(nn.Module):
    """The loss inside the compiled graph, so the calibration backward has a loss to differentiate."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).square().mean()


def _grads(model: nn.Module, x: torch.Tensor, backend=None) -> dict[str, torch.Tensor]:
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend) if backend is not None else model
    fn(x).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _measured_errors(base: nn.Module, x: torch.Tensor, **options) -> tuple[dict[str, float], list[dict]]:
    """(weight name -> relative squared gradient error against eager, the report's compressed sites)."""
    exact = _grads(copy.deepcopy(base), x)
    backend = velora_fx.backend(compiler="eager", codecs=["velora"], **options)  # VeLoRA's error alone
    model = copy.deepcopy(base)  # alive until the report is read (the backend keeps its state weakly)
    approx = _grads(model, x, backend)
    errors = {n: float((approx[n] - exact[n]).square().sum() / exact[n].square().sum()) for n in exact}
    sites = [s for g in backend.report(model).graphs for s in g.sites
             if s.decision == "compressed" and s.codec == "velora"]
    return errors, sites


def _weight(consumer: str) -> str:
    return f"{consumer}.weight"


SITE_KINDS = {"qkv": ["*.q", "*.k", "*.v"], "o": ["*.o"], "fc1": ["*.fc1"], "fc2": ["*.fc2"], "head": ["*head"]}


def test_gradient_estimate_is_the_measured_weight_gradient_error_and_orders_sites_by_it():
    base = WithLoss(Stack(32, 64, layers=2, attention=True))
    x = torch.randn(4, 16, 32)
    estimates, measured = [], []
    for kind, include in SITE_KINDS.items():
        for g in (2, 8):
            errors, sites = _measured_errors(base, x, mode="all", include=include, sub_token_size=g)
            assert sites, (kind, g)
            for site in sites:
                worst = max(errors[_weight(c)] for c in site.approximated)
                # the group's measurement is its worst consumer's error, computed on this very batch
                assert site.gradient_error == pytest.approx(worst, rel=1e-3, abs=1e-5), (site.name, g)
                # the planner's bound is the larger of it and the activation's energy loss
                assert site.estimated_error >= site.gradient_error - 1e-6
                assert (site.error_source == "gradient") == (site.estimated_error <= site.gradient_error + 1e-6)
                estimates.append(site.gradient_error)
                measured.append(worst)
                # the other weights' gradients stay exact
                for name, err in errors.items():
                    if name not in {_weight(c) for c in site.approximated} and "blocks" in name and name.endswith(
                            ".weight") and not any(name == _weight(c) for s in sites for c in s.approximated):
                        assert err < 1e-10, name
    order = sorted(range(len(estimates)), key=lambda i: estimates[i])
    assert [measured[i] for i in order] == sorted(measured)
    assert len(set(round(e, 3) for e in estimates)) > 5  # the sites really differ


@settings(max_examples=6)
@given(d=st.sampled_from([16, 32, 48]), hidden=st.sampled_from([32, 64]), tokens=st.integers(3, 12),
       g=st.sampled_from([2, 4, 8, 16]), bias=st.booleans())
def test_gradient_estimate_matches_measurement_on_random_shapes(d, hidden, tokens, g, bias):
    base = WithLoss(Stack(d, hidden, layers=1, bias=bias))
    x = torch.randn(2, tokens, d)
    errors, sites = _measured_errors(base, x, mode="all", include=["*.fc1", "*.fc2"], sub_token_size=g)
    assert sites
    for site in sites:
        worst = max(errors[_weight(c)] for c in site.approximated)
        assert site.gradient_error == pytest.approx(worst, rel=1e-3, abs=1e-5)
        assert site.estimated_error >= site.gradient_error - 1e-6
        assert 0 < site.update_share <= 2.0


def test_constant_batch_never_reads_exact():
    """Every token identical: sub-tokens span few directions, and first_batch's v fits them
    exactly; the estimate keeps the unseen directions' structural share instead of 0."""
    base = WithLoss(Stack(32, 64, layers=1))
    x = torch.randn(1, 1, 32).expand(4, 16, 32).contiguous()
    _, sites = _measured_errors(base, x, mode="all", sub_token_size=8)
    assert sites
    for site in sites:
        features = site.shape[-1]
        spanned = min(8, features // 8)  # one token's sub-tokens span at most D/g directions
        assert site.estimated_error >= (8 - spanned) / 8 - 1e-6, site.name
        assert site.estimated_error > 0.05, site.name


def test_loss_outside_the_graph_uses_the_activation_estimate():
    """A compiled model that returns activations (the loss computed outside) has no loss to
    differentiate: its estimate is the activation energy VeLoRA drops."""
    model = Stack(32, 64, layers=1)
    backend = velora_fx.backend(compiler="eager", mode="all", include=["*.fc2"], sub_token_size=4, codecs=["velora"])
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(2, 8, 32)).square().mean().backward()
    sites = [s for g in backend.report(model).graphs for s in g.sites if s.decision == "compressed"]
    assert sites and all(s.error_source == "activation" and s.estimated_error > 0.3 for s in sites)


def test_zero_output_gradient_falls_back_to_the_activation_estimate():
    """A loss that does not depend on the output (every label ignored, a zero loss weight) gives
    zero weight gradients: nothing to measure, so the estimate is the activation's, not 0."""
    class ZeroLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = Stack(32, 64, layers=1)

        def forward(self, x):
            return self.net(x).square().mean() * 0.0

    model = ZeroLoss()
    backend = velora_fx.backend(compiler="eager", mode="all", sub_token_size=4, codecs=["velora"])
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(2, 8, 32)).backward()
    sites = [s for g in backend.report(model).graphs for s in g.sites if s.decision == "compressed"]
    assert sites
    for site in sites:
        assert site.error_source == "activation" and site.gradient_error is None
        assert site.estimated_error > 0.3  # ~1 - 1/4 for random activations


def test_unseen_directions():
    assert unseen_directions(torch.zeros(8, 16), 4) == 1.0
    assert unseen_directions(torch.randn(64, 16), 4) == 0.0
    assert unseen_directions(torch.ones(8, 16), 4) == structural_error(4)


def test_activation_estimate_option_skips_the_backward():
    base = WithLoss(Stack(32, 64, layers=1))
    x = torch.randn(2, 8, 32)
    _, sites = _measured_errors(base, x, mode="all", include=["*.fc2"], sub_token_size=4, estimate="activation")
    assert sites and all(s.error_source == "activation" and s.update_share is None and s.gradient_error is None
                         for s in sites)
    with pytest.raises(velora_fx.ConfigError, match="estimate"):
        velora_fx.backend(estimate="hessian")


def test_a_failing_calibration_backward_falls_back_to_the_activation_estimate(monkeypatch):
    """Never a crash: if the calibration backward cannot run, the activations still give an estimate,
    and the report says why the gradient measurement is missing."""
    import velora_fx.passes.estimate as estimate

    def broken(*args, **kwargs):
        raise RuntimeError("cannot run this op eagerly")

    monkeypatch.setattr(estimate, "_site_errors", broken)
    model = WithLoss(Stack(32, 64, layers=1))
    backend = velora_fx.backend(compiler="eager", mode="all", include=["*.fc2"], sub_token_size=4, codecs=["velora"])
    torch._dynamo.reset()
    torch.compile(model, backend=backend)(torch.randn(2, 8, 32)).backward()
    (graph,) = backend.report(model).graphs
    sites = [s for s in graph.sites if s.decision == "compressed"]
    assert sites and all(s.error_source == "activation" and s.estimated_error > 0.3 for s in sites)
    assert "no calibration backward (RuntimeError: cannot run this op eagerly)" in graph.message
