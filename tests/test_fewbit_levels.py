"""Few-bit backward math (velora_fx.codecs.fewbit_levels): the exact forward, the DP fit of the
quantised derivative, the code convention, and the eager autograd reference."""
import dataclasses
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from velora_fx.codecs import fewbit_levels as fb
from velora_fx.codecs.fewbit_levels import (FUNCTIONS, FewBitFunction, FewBitLevels, derivative,
                                            empirical_error, fewbit_apply, fit_levels, forward)

SMOOTH = tuple(n for n in FUNCTIONS if n != "relu")
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
# the functions as a model calls them, written independently of the module under test
TORCH_FN = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # transformers' QuickGELUActivation
}


@st.composite
def tensors(draw, dtypes=DTYPES):
    """Random tensor with 0-3 dims of size 0-6, values N(shift, scale^2), plus a few exact
    zeros / negative zeros."""
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    dtype = draw(st.sampled_from(dtypes))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale, shift = draw(st.floats(0.01, 10.0)), draw(st.floats(-3.0, 3.0))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift
    if x.numel():
        flat = x.view(-1)
        flat[0] = draw(st.sampled_from([0.0, -0.0, 1e-30, -1e-30, 20.0, -20.0, shift]))
    return x.to(dtype)


# -- exact forward / derivative --------------------------------------------------------------------
@given(tensors(), st.sampled_from(FUNCTIONS), st.integers(1, 4))
def test_reference_forward_is_bitwise_exact(x, name, bits):
    expected = TORCH_FN[name](x)
    assert torch.equal(forward(name, x), expected)
    y = fewbit_apply(name, x.clone().requires_grad_(), bits)
    assert y.dtype == x.dtype and y.shape == x.shape and y.requires_grad
    assert torch.equal(y.detach(), expected)


@given(tensors(dtypes=(torch.float64,)), st.sampled_from(FUNCTIONS))
def test_derivative_matches_autograd(x, name):
    x = x.requires_grad_()
    (expected,) = torch.autograd.grad(TORCH_FN[name](x).sum(), x)
    d = derivative(name, x.detach())
    assert d.dtype == torch.float64
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_derivative_dtype(dtype):
    x = torch.randn(7).to(dtype)
    assert derivative("gelu", x).dtype == dtype
    assert derivative("gelu", x, torch.float64).dtype == torch.float64


# -- relu is exact ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_relu_gradient_is_exact(dtype, bits):
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, -1e-45, 3.0, -3.0, 1e30, -1e30])
    x = torch.cat([special, torch.randn(500)]).to(dtype)
    grad = torch.randn(x.shape).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.relu(xa).backward(grad)
    fewbit_apply("relu", xb, bits).backward(grad)
    assert torch.equal(xb.grad, xa.grad)
    assert xb.grad.dtype == dtype


def test_relu_one_bit_levels_and_codes():
    levels = fit_levels("relu", 1)
    assert levels.thresholds == (0.0,) and levels.levels == (0.0, 1.0)
    assert levels.relative_error == 0.0
    x = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 2.0, -2.0, float("inf"), float("-inf")])
    assert levels.output_thresholds() == (0.0,)
    assert torch.equal(levels.encode(x), (x > 0).to(torch.uint8))
    y = torch.relu(x)
    assert torch.equal(levels.encode_output(y), (y > 0).to(torch.uint8))


@pytest.mark.parametrize("bits", [1, 2, 3, 8])
def test_relu_output_codes_equal_input_codes(bits):
    levels = fit_levels("relu", bits)
    out = levels.output_thresholds()
    assert all(t >= 0 for t in out) and all(b > a for a, b in itertools.pairwise(out))
    x = torch.cat([torch.tensor([0.0, -0.0, *levels.thresholds]), torch.randn(1000) * 2])
    assert torch.equal(levels.encode_output(torch.relu(x)), levels.encode(x))
    assert torch.equal(levels.decode(levels.encode(x)), (x > 0).float())


# -- the fitted levels -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_fit_levels_structure(name, bits):
    levels = fit_levels(name, bits)
    assert fit_levels(name, bits) is levels  # cached
    assert (levels.name, levels.bits) == (name, bits)
    assert len(levels.thresholds) == 2 ** bits - 1 and len(levels.levels) == 2 ** bits
    assert all(b > a for a, b in itertools.pairwise(levels.thresholds))
    # levels are weighted means of f' over a segment, so within f''s range
    d = derivative(name, torch.linspace(-10, 10, 20001, dtype=torch.float64))
    assert all(float(d.min()) - 1e-12 <= v <= float(d.max()) + 1e-12 for v in levels.levels)
    with pytest.raises(dataclasses.FrozenInstanceError):
        levels.bits = 5


@pytest.mark.parametrize("name", SMOOTH)
def test_relative_error_shrinks_with_bits(name):
    errors = [fit_levels(name, bits).relative_error for bits in range(1, 5)]
    assert all(e > 0 for e in errors)
    # doubling the number of pieces should roughly quarter a smooth function's squared error
    assert all(b < 0.5 * a for a, b in itertools.pairwise(errors)), errors
    assert errors[0] < 0.25, errors
    assert errors[2] < 0.02, errors  # 3 bits: ~0.3-0.9 % for these functions
    if name in ("gelu", "gelu_tanh", "silu", "quick_gelu"):
        assert errors[2] < 0.01, errors


def test_eight_bits():
    levels = fit_levels("sigmoid", 8)
    assert len(levels.thresholds) == 255
    assert 0 < levels.relative_error < 0.1 * fit_levels("sigmoid", 4).relative_error
    x = torch.randn(5000, dtype=torch.float64)
    codes = levels.encode(x)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 255
    assert empirical_error(levels, x) < 1e-4


@pytest.mark.parametrize("name", SMOOTH)
def test_even_derivative_fits(name):
    """gelu'-1/2 and silu'-1/2 are odd: the fit is symmetric around 0.  sigmoid' and tanh' are
    even: a symmetric fit would waste a piece (both middle pieces equal), so it is lopsided."""
    levels = fit_levels(name, 2)
    t = np.array(levels.thresholds)
    if name in ("sigmoid", "tanh"):
        assert not np.allclose(t, -t[::-1])
    else:
        np.testing.assert_allclose(t, -t[::-1], atol=1e-12)
        np.testing.assert_allclose(np.array(levels.levels) + np.array(levels.levels[::-1]), 1.0,
                                   atol=1e-6)


# -- the DP is optimal -------------------------------------------------------------------------------
def weighted_sse(w, y, starts):
    total = 0.0
    for a, b in itertools.pairwise([0, *starts, len(y)]):
        level = w[a:b] @ y[a:b] / w[a:b].sum()
        total += float(w[a:b] @ (y[a:b] - level) ** 2)
    return total


@settings(max_examples=60)
@given(st.integers(1, 9), st.sampled_from([1, 2, 4]), st.integers(0, 2**31 - 1),
       st.booleans())
def test_dp_matches_brute_force(n, segments, seed, ties):
    if segments > n:
        return
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.normal(size=n))
    w = rng.uniform(0.01, 1.0, size=n)
    y = rng.integers(0, 3, size=n).astype(float) if ties else rng.normal(size=n)
    fit = fb._fit_on_grid(xs, w, y, segments)
    brute = min(weighted_sse(w, y, starts)
                for starts in itertools.combinations(range(1, n), segments - 1))
    assert len(fit.starts) == segments - 1 and len(fit.levels) == segments
    assert list(fit.starts) == sorted(set(fit.starts)) and all(0 < s < n for s in fit.starts)
    assert fit.cost == pytest.approx(weighted_sse(w, y, fit.starts), abs=1e-12)
    assert fit.cost == pytest.approx(brute, rel=1e-9, abs=1e-12)


def simple_dp_cost(w, y, segments):
    """Textbook O(K n^2) DP, one (k, j) cell at a time, for grids too large to brute-force."""
    n = len(y)
    seg = np.full((n + 1, n + 1), np.inf)
    for i in range(n):
        for j in range(i + 1, n + 1):
            level = w[i:j] @ y[i:j] / w[i:j].sum()
            seg[i, j] = w[i:j] @ (y[i:j] - level) ** 2
    best = seg[0].copy()
    for _ in range(segments - 1):
        best = np.array([np.min(best[:j] + seg[:j, j]) if j else np.inf for j in range(n + 1)])
    return best[n]


@pytest.mark.parametrize("n, segments", [(150, 3), (150, 8), (130, 16)])
def test_dp_matches_textbook_dp_on_larger_grids(n, segments):
    rng = np.random.default_rng(n + segments)
    xs = np.sort(rng.normal(size=n))
    w = rng.uniform(0.01, 1.0, size=n)
    y = np.cumsum(rng.normal(size=n))  # a rough, non-monotone curve
    fit = fb._fit_on_grid(xs, w, y, segments)
    assert fit.cost == pytest.approx(simple_dp_cost(w, y, segments), rel=1e-9)
    assert fit.cost == pytest.approx(weighted_sse(w, y, fit.starts), rel=1e-12)


def test_dp_rejects_bad_segments():
    with pytest.raises(ValueError, match="segments"):
        fb._fit_on_grid([0.0, 1.0], [1.0, 1.0], [0.0, 1.0], 3)
    with pytest.raises(ValueError, match="segments"):
        fb._fit_on_grid([0.0, 1.0], [1.0, 1.0], [0.0, 1.0], 0)


# -- encode / decode -----------------------------------------------------------------------------------
@settings(max_examples=40)
@given(tensors(dtypes=(torch.float32, torch.float64, torch.bfloat16)), st.sampled_from(FUNCTIONS),
       st.sampled_from([1, 2, 3, 4]))
def test_encode_decode_match_bucketize(x, name, bits):
    levels = fit_levels(name, bits)
    # also exactly on every threshold, as rounded to x's dtype
    x = torch.cat([x.reshape(-1), torch.tensor(levels.thresholds, dtype=torch.float64).to(x.dtype)])
    boundaries = torch.tensor(levels.thresholds, dtype=torch.float64).to(x.dtype)
    # right=True counts boundaries <= x; right=False counts boundaries < x (relu's convention)
    expected = torch.bucketize(x, boundaries, right=not levels.right_closed)
    codes = levels.encode(x)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    assert torch.equal(codes.long(), expected)
    table = torch.tensor(levels.levels, dtype=torch.float64)
    torch.testing.assert_close(levels.decode(codes, torch.float64), table[expected],
                               rtol=0, atol=1e-15)
    torch.testing.assert_close(levels.decode(codes), table[expected].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
@pytest.mark.parametrize("bits", [1, 3, 4])
def test_output_domain_codes(name, bits):
    levels = fit_levels(name, bits)
    out = levels.output_thresholds()
    assert all(b > a for a, b in itertools.pairwise(out))
    x = torch.randn(20000, dtype=torch.float64) * 2
    assert torch.equal(levels.encode_output(forward(name, x)), levels.encode(x))


@pytest.mark.parametrize("name", ["gelu", "gelu_tanh", "silu", "quick_gelu"])
def test_output_thresholds_need_monotone_function(name):
    with pytest.raises(ValueError, match="not monotone"):
        fit_levels(name, 2).output_thresholds()


# -- the eager reference ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", FUNCTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_saves_only_uint8_codes(name, dtype):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 5).to(dtype).requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fewbit_apply(name, x, 3)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, x.shape)]
    y.backward(torch.ones_like(y))
    assert x.grad.dtype == dtype
    # the autograd.Function itself (what fewbit_apply wraps) behaves the same
    x2 = x.detach().clone().requires_grad_()
    FewBitFunction.apply(x2, name, 3).backward(torch.ones_like(y))
    assert torch.equal(x2.grad, x.grad)


@pytest.mark.parametrize("name", SMOOTH)
def test_grad_error_shrinks_with_bits(name):
    x = torch.randn(20000, dtype=torch.float64)
    grad = torch.randn(20000, dtype=torch.float64)
    xe = x.clone().requires_grad_()
    TORCH_FN[name](xe).backward(grad)
    errors = []
    for bits in range(1, 5):
        xq = x.clone().requires_grad_()
        fewbit_apply(name, xq, bits).backward(grad)
        errors.append(float(((xq.grad - xe.grad) ** 2).sum() / (xe.grad ** 2).sum()))
        # with independent grads the relative grad error estimates the N(0,1) relative error
        assert errors[-1] == pytest.approx(fit_levels(name, bits).relative_error, rel=0.2)
        assert empirical_error(fit_levels(name, bits), x) == pytest.approx(
            fit_levels(name, bits).relative_error, rel=0.2)
    assert all(b < a for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_backward_in_low_precision(dtype):
    x = torch.randn(4000)
    grad = torch.randn(4000)
    levels = fit_levels("gelu", 3)
    xq = x.to(dtype).requires_grad_()
    fewbit_apply("gelu", xq, 3).backward(grad.to(dtype))
    expected = (grad.to(dtype).double() * levels.decode(levels.encode(x.to(dtype)), torch.float64))
    torch.testing.assert_close(xq.grad.double(), expected.to(dtype).double(),
                               rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)


def test_empirical_error_edge_cases():
    assert empirical_error(fit_levels("relu", 1), -torch.rand(10)) == 0.0  # f' == 0 everywhere
    assert empirical_error(fit_levels("gelu", 1), torch.zeros(0)) == 0.0
    levels = fit_levels("gelu", 1)
    x = torch.tensor([5.0])  # one element, q = level of the top piece
    expected = (float(derivative("gelu", x, torch.float64)) - levels.levels[1]) ** 2 \
        / float(derivative("gelu", x, torch.float64)) ** 2
    assert empirical_error(levels, x) == pytest.approx(expected)


# -- validation ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [0, 9, -1, 2.5, True, "3", None])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        fit_levels("gelu", bits)
    with pytest.raises(ValueError, match="bits"):
        fewbit_apply("gelu", torch.randn(3), bits)


@pytest.mark.parametrize("call", [
    lambda: fit_levels("swish", 2),
    lambda: fewbit_apply("GELU", torch.randn(3)),
    lambda: forward("softplus", torch.randn(3)),
    lambda: derivative("elu", torch.randn(3)),
])
def test_unknown_name_lists_functions(call):
    with pytest.raises(ValueError, match="unknown function") as info:
        call()
    assert all(name in str(info.value) for name in FUNCTIONS)


def test_levels_validate_their_shape():
    with pytest.raises(ValueError, match="thresholds"):
        FewBitLevels("gelu", 1, (0.0, 1.0), (0.0, 1.0), 0.0)
    with pytest.raises(ValueError, match="increasing"):
        FewBitLevels("gelu", 2, (0.0, 0.0, 1.0), (0.0, 0.5, 0.5, 1.0), 0.0)
