"""The ``gated`` codec: int8 storage of a gated MLP's gate and up projections.

Forward exact; every gradient equals an eager autograd.Function that stores the same int8 codes;
the saved set holds codes + scales of exactly the predicted size; weight gradients of the MLP
input stay exact; inductor's CPU codegen agrees with the eager pass (slow)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import velora_fx
from pass_helpers import square_loss_step
from velora_fx.codecs.gated import Int8StorageCodec, dequantize, group_size, quantize, scale_dtype

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


class _GatedReference(torch.autograd.Function):
    """h = act(g) * u whose backward reads int8 copies of g and u (the codec's eager twin)."""

    @staticmethod
    def forward(ctx, g, u, act):
        ctx.act = act
        ctx.save_for_backward(*quantize(g), *quantize(u))
        ctx.like = (torch.empty_like(g), torch.empty_like(u))
        return ACTS[act](g) * u

    @staticmethod
    def backward(ctx, grad):
        gq, gs, uq, us = ctx.saved_tensors
        g_hat = dequantize(gq, gs, ctx.like[0]).detach().requires_grad_()
        u_hat = dequantize(uq, us, ctx.like[1])
        with torch.enable_grad():
            a = ACTS[ctx.act](g_hat)
            (grad_g,) = torch.autograd.grad(a, g_hat, grad * u_hat)
        return grad_g, grad * a.detach(), None


class GatedMLP(nn.Module):
    def __init__(self, d, hidden, act="silu", layers=2, reference=False):
        super().__init__()
        self.gate = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(hidden, d, bias=False) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.act, self.reference = act, reference

    def forward(self, x):
        for gate, up, down in zip(self.gate, self.up, self.down):
            h = self.norm(x)
            g, u = gate(h), up(h)
            mixed = _GatedReference.apply(g, u, self.act) if self.reference else ACTS[self.act](g) * u
            x = x + down(mixed)
        return x


_step = square_loss_step


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), features=st.sampled_from([1, 7, 64, 128, 96]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), scale=st.floats(1e-3, 1e3))
def test_quantize_round_trip_is_within_half_a_step(rows, features, dtype, scale):
    x = (torch.randn(rows, features) * scale).to(dtype)
    x[0, 0] = 0.0
    codes, scales = quantize(x)
    g = group_size(features)
    assert codes.dtype == torch.int8 and codes.shape == (rows, features // g, g)
    # no wrap-around: the largest magnitude of each group maps to +-127 (126.5 before rounding)
    wide = (x.float().reshape(rows, features // g, g) / scales.float())
    assert wide.abs().max() < 127.0 and codes.abs().max() <= 127
    assert scales.dtype == scale_dtype(dtype) and scales.shape == (rows, features // g, 1)
    back = dequantize(codes, scales, x)
    assert back.shape == x.shape and back.dtype == x.dtype
    step = scales.float().expand_as(codes).reshape(x.shape)
    # half a step of rounding, plus the scale's own rounding to x's dtype and the cast back
    tolerance = 0.5 * step + 2 * torch.finfo(dtype).eps * x.float().abs() + 1e-30
    assert ((back.float() - x.float()).abs() <= tolerance * 1.01).all()
    assert torch.equal(quantize(torch.zeros(2, 64))[0], torch.zeros(2, 1, 64, dtype=torch.int8))


@settings(max_examples=8, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking recompiles: minutes
@given(act=st.sampled_from(sorted(ACTS)), batch=st.integers(1, 3), tokens=st.integers(1, 9),
       d=st.sampled_from([8, 16]), hidden=st.sampled_from([64, 128, 48]))
def test_forward_exact_and_gradients_equal_the_reference(strict_pass, act, batch, tokens, d, hidden):
    # float64: eager's kernels and the decomposed graph compute g alike to ~1e-16, so both quantise
    # the same values (in fp32 an int8 code can flip where they round g differently)
    torch.manual_seed(0)
    model = GatedMLP(d, hidden, act).double()
    twin = GatedMLP(d, hidden, act, reference=True).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(batch, tokens, d, dtype=torch.float64)
    backend = velora_fx.backend(codecs=("gated",), compiler="eager")
    out, grads = _step(model, x, backend)
    plain_out, exact = _step(model, x, velora_fx.backend(codecs=("gated",), exclude=["*"], compiler="eager"))
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)  # forward untouched
    sites = [s for s in backend.report().sites if s.codec == "gated"]
    assert len(sites) == 4 and all(s.decision == "compressed" for s in sites), backend.report().table()
    _, ref = _step(twin, x)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-7, atol=1e-10, msg=name)
        assert (ref[name] - exact[name]).norm() <= 0.05 * exact[name].norm(), name  # and it is small


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saved_bytes_match_the_codec_prediction(strict_pass, dtype):
    torch.manual_seed(0)
    model = GatedMLP(16, 128, "silu", layers=1).to(dtype)
    x = torch.randn(2, 8, 16, dtype=dtype)
    backend = velora_fx.backend(codecs=("gated",), compiler="eager")
    _step(model, x, backend)
    sites = [s for s in backend.report().sites if s.codec == "gated"]
    assert {s.name for s in sites} == {"gate.0", "up.0"}
    element = torch.empty((), dtype=dtype).element_size()
    for s in sites:
        assert s.decision == "compressed" and s.bits == 8
        assert s.bytes_before == 16 * 128 * element
        assert s.bytes_after == Int8StorageCodec().saved_bytes((16, 128), dtype) == 16 * 128 + 16 * 2 * element
        # (two scales of 64 features per row: bf16 for bf16 tensors, fp32 for fp32 ones)


def test_with_velora_the_mlp_input_gradients_are_untouched_and_down_is_a_site(strict_pass):
    """gate/up weight gradients read the norm output, not g or u: exact unless VeLoRA takes them."""
    torch.manual_seed(0)
    model = GatedMLP(16, 128, "silu", layers=1)
    x = torch.randn(2, 8, 16)
    backend = velora_fx.backend(codecs=("velora", "gated"), compiler="eager", include=["*down*", "*gate*", "*up*"],
                                min_efficiency=0.0, max_error=1.0)
    _step(model, x, backend)
    table = backend.report().table()
    by = {(s.name, s.codec): s for s in backend.report().sites}
    assert by[("down.0", "velora")].decision == "compressed", table
    assert by[("gate.0", "gated")].decision == "compressed", table


def test_a_tensor_a_weight_gradient_also_reads_is_left_alone(strict_pass):
    """g also feeds a linear layer, whose weight gradient reads g: int8 codes cannot replace it
    there (that is VeLoRA's kind of site), so the gate output is not a stored site; up still is."""
    class Tapped(GatedMLP):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.tap = nn.Linear(64, 16)

        def forward(self, x):
            g = self.gate[0](x)
            return self.down[0](F.silu(g) * self.up[0](x)) + self.tap(g)

    torch.manual_seed(0)
    model = Tapped(16, 64, layers=1)
    x = torch.randn(2, 4, 16)
    backend = velora_fx.backend(codecs=("gated",), compiler="eager")
    _, grads = _step(model, x, backend)
    gated = {s.name: s for s in backend.report().sites if s.codec == "gated"}
    assert "gate.0" not in gated and gated["up.0"].decision == "compressed", backend.report().table()
    _, exact = _step(model, x)
    torch.testing.assert_close(grads["tap.weight"], exact["tap.weight"])  # its weight gradient is exact


@pytest.mark.slow
def test_inductor_codegen_matches_eager_pass(strict_pass):
    torch.manual_seed(0)
    model = GatedMLP(16, 128, "silu", layers=1).double()  # float64: both quantise the same g
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    eager_backend = velora_fx.backend(codecs=("gated",), compiler="eager")
    out_e, grads_e = _step(model, x, eager_backend)
    out_i, grads_i = _step(model, x, velora_fx.backend(codecs=("gated",)))
    torch.testing.assert_close(out_i, out_e)
    assert eager_backend.report().compressed
    for name in grads_e:
        torch.testing.assert_close(grads_i[name], grads_e[name], rtol=1e-7, atol=1e-10, msg=name)
