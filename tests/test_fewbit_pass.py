"""The few-bit codec as a graph pass: forward exact, input gradients equal the eager reference,
the saved set holds packed codes instead of the nonlinearity's input, and sites that free nothing
are reverted."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from torch import nn

import velora_fx
from pass_helpers import square_loss_step
from velora_fx.codecs.fewbit_levels import FewBitFunction, fit_levels

FUNCTIONS = {
    "gelu": (lambda t: F.gelu(t), "input"),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), "input"),
    "silu": (F.silu, "input"),
    "relu": (F.relu, "output"),
    "sigmoid": (torch.sigmoid, "output"),
    "tanh": (torch.tanh, "output"),
}


class _OutputDomain(torch.autograd.Function):
    """Reference for functions whose PyTorch backward reads y: codes of y with the mapped
    thresholds (what the pass encodes), levels of the same fit."""

    @staticmethod
    def forward(ctx, x, name, bits):
        ctx.levels = fit_levels(name, bits)
        y = FUNCTIONS[name][0](x)
        ctx.save_for_backward(ctx.levels.encode_output(y))
        return y

    @staticmethod
    def backward(ctx, grad):
        (codes,) = ctx.saved_tensors
        return (grad.float() * ctx.levels.decode(codes)).to(grad.dtype), None, None


class MLP(nn.Module):
    """``frozen_proj``: the matmul after the nonlinearity has no weight gradient, so nothing but
    f' needs the nonlinearity's input or output in backward (few-bit codes alone free it)."""

    def __init__(self, d, hidden, function, bits=None, layers=2, frozen_proj=False):
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(d, hidden) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(hidden, d) for _ in range(layers))
        self.proj.requires_grad_(not frozen_proj)
        self.function, self.bits = function, bits  # bits: the eager reference twin

    def act(self, h):
        f, domain = FUNCTIONS[self.function]
        if self.bits is None:
            return f(h)
        if domain == "input":
            return FewBitFunction.apply(h, self.function, self.bits)
        return _OutputDomain.apply(h, self.function, self.bits)

    def forward(self, x):
        for fc, proj in zip(self.fc, self.proj):
            x = x + proj(self.act(fc(x)))
        return x


_step = square_loss_step


@settings(max_examples=10, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking recompiles: minutes
@example(function="relu", bits=4, batch=3, tokens=7, d=8, hidden=16, pack=False)
@given(function=st.sampled_from(sorted(FUNCTIONS)), bits=st.integers(1, 4), batch=st.integers(1, 3),
       tokens=st.integers(1, 9), d=st.sampled_from([8, 12]), hidden=st.sampled_from([16, 24, 32]),
       pack=st.booleans())
def test_forward_exact_and_input_grads_equal_reference(strict_pass, function, bits, batch, tokens, d, hidden, pack):
    torch.manual_seed(0)
    model = MLP(d, hidden, function, frozen_proj=True)
    twin = MLP(d, hidden, function, bits=bits, frozen_proj=True)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(batch, tokens, d)
    backend = velora_fx.backend(codecs=("fewbit",), bits=bits, mode="max_memory", compiler="eager", pack_codes=pack)
    out, grads = _step(model, x, backend)
    # forward is exact: bitwise the same graph without the rewrite (eager's fused kernels round
    # differently from the decomposition, so the comparison is against the compiled graph)
    plain_out, _ = _step(model, x, velora_fx.backend(codecs=("fewbit",), exclude=["*"], compiler="eager"))
    ref_out, ref_grads = _step(twin, x)
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    report = backend.report()
    sites = [s for s in report.sites if s.codec == "fewbit"]
    if function == "relu" and not pack:
        # ReLU's backward needs only y > 0, which the partitioner keeps as a 1-byte mask: a byte of
        # code per element frees nothing, and the site is reverted
        assert sites and all(s.decision == "skipped" and "no net gain" in s.reason for s in sites), report.table()
    else:
        assert [s for s in sites if s.decision == "compressed"], report.table()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_relu_one_bit_is_exact(strict_pass):
    model = MLP(16, 32, "relu", frozen_proj=True)
    x = torch.randn(2, 5, 16)
    x[0, 0, :4] = 0.0  # ties at the kink: relu'(0) = 0 in PyTorch
    backend = velora_fx.backend(codecs=("fewbit",), bits=1, compiler="eager")
    _, grads = _step(model, x, backend)
    _, exact = _step(model, x)
    assert backend.report().compressed
    for name in grads:
        assert torch.equal(grads[name], exact[name]), name


@pytest.mark.parametrize("bits,width,pack", [(3, 64, True), (2, 64, True), (4, 20, True), (3, 64, False)])
def test_saved_bytes_are_packed_codes(strict_pass, bits, width, pack):
    model = MLP(16, width, "gelu_tanh", layers=1, frozen_proj=True)
    x = torch.randn(2, 8, 16)
    backend = velora_fx.backend(codecs=("fewbit",), bits=bits, compiler="eager", pack_codes=pack)
    _step(model, x, backend)
    (site,) = [s for s in backend.report().sites if s.codec == "fewbit"]
    numel = 2 * 8 * width
    packed = numel * bits // 8 if width % 8 == 0 and pack else numel  # one uint8 per code when D % 8 != 0
    assert site.decision == "compressed" and site.bytes_before == numel * 4
    assert site.bytes_after == packed == site.predicted_bytes_after
    assert site.setting == f"fewbit {bits}b" + ("" if pack else "/byte")


def test_codes_pair_with_velora_on_the_next_matmul(strict_pass):
    """GPT-2's MLP: with codes for GELU's input, its output is saved for c_proj's weight gradient,
    which VeLoRA then compresses; together they free more than either alone."""
    model = MLP(32, 128, "gelu_tanh", layers=2)
    x = torch.randn(4, 16, 32)
    totals = {}
    for codecs in (("velora",), ("fewbit",), ("velora", "fewbit")):
        backend = velora_fx.backend(codecs=codecs, compiler="eager")
        _step(model, x, backend)
        totals[codecs] = backend.report().saved_bytes_after
        before = backend.report().saved_bytes_before
    assert totals[("velora", "fewbit")] < min(totals[("velora",)], totals[("fewbit",)]) < before


class KeepsInput(nn.Module):
    """x feeds GELU and, multiplied by GELU's output, another backward op: codes free nothing."""

    def __init__(self):
        super().__init__()
        self.fc, self.proj = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc(x)
        return self.proj(F.gelu(h) * h)


def test_site_whose_input_stays_saved_is_reverted(strict_pass):
    model = KeepsInput()
    x = torch.randn(2, 6, 8)
    backend = velora_fx.backend(codecs=("fewbit",), compiler="eager")
    _, grads = _step(model, x, backend)
    _, exact = _step(model, x, velora_fx.backend(codecs=("fewbit",), exclude=["*"], compiler="eager"))
    (site,) = [s for s in backend.report().sites if s.codec == "fewbit"]
    assert site.decision == "skipped" and ("keeps" in site.reason or "saved" in site.reason), site.reason
    for name in grads:
        assert torch.equal(grads[name], exact[name]), name


def test_include_exclude_apply_to_activation_modules(strict_pass):
    model = MLP(8, 16, "silu", frozen_proj=True)
    x = torch.randn(2, 4, 8)
    backend = velora_fx.backend(codecs=("fewbit",), exclude=["*"], compiler="eager")
    _step(model, x, backend)
    assert all(s.decision == "skipped" for s in backend.report().sites)


@pytest.mark.slow
@pytest.mark.parametrize("pack", [True, False])
def test_inductor_codegen_matches_eager_pass(strict_pass, pack):
    """Packing (shifts, masks) or one code per byte, and the decode, through inductor's CPU codegen."""
    model = MLP(16, 64, "gelu_tanh", frozen_proj=True)
    x = torch.randn(2, 8, 16)
    eager_backend = velora_fx.backend(codecs=("fewbit",), compiler="eager", pack_codes=pack)
    out_e, grads_e = _step(model, x, eager_backend)
    out_i, grads_i = _step(model, x, velora_fx.backend(codecs=("fewbit",), pack_codes=pack))
    torch.testing.assert_close(out_i, out_e)
    assert eager_backend.report().compressed
    for name in grads_e:
        torch.testing.assert_close(grads_i[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_codes_one_per_byte_are_encoded_in_the_nonlinearitys_kernel(strict_pass):
    """``pack_codes=False``: the codes are element-wise like GELU, and inductor (CPU codegen) writes
    them from the kernel that computes GELU: the forward has as many kernels as without few-bit."""
    import re

    from torch._inductor.utils import run_and_get_code
    model = MLP(16, 64, "gelu_tanh", layers=1, frozen_proj=True)
    x = torch.randn(2, 8, 16)
    kernels = {}
    for name, options in (("exact", {"exclude": ["*"]}), ("byte", {"pack_codes": False})):
        torch._dynamo.reset()
        backend = velora_fx.backend(codecs=("fewbit",), **options)
        _, (forward, *_) = run_and_get_code(lambda: _step(model, x, backend))
        kernels[name] = [k for k in re.findall(r"^(cpp_fused_\w+) = ", forward, re.M)]
    assert len(kernels["byte"]) == len(kernels["exact"]), kernels
    gelu = [k for k in kernels["byte"] if "gelu" in k or "tanh" in k]
    assert gelu and "uint8_t*" in forward.split(gelu[0])[1].split("\n")[0], forward
