"""The rank-1 sub-token codec math (velora_fx.codecs.velora)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from velora_fx.codecs.velora import initial_vector, project, random_vector, reconstruct

DTYPES = [torch.float32, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


@st.composite
def cases(draw, dtypes=tuple(DTYPES)):
    """(x, g) with 1-3 leading dims of size 1-5 and D = g * k."""
    lead = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    g, k = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, g * k, generator=gen) + draw(st.floats(-2, 2))).to(dtype)
    return x, g


def unit(g, seed):
    v = torch.randn(g, generator=torch.Generator().manual_seed(seed))
    return v / v.norm()


def explicit_projection(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Orthogonal projection of each sub-token onto v, written out one sub-token at a time (fp64)."""
    g = v.numel()
    xd, vd = x.double(), v.double()
    out = torch.empty_like(xd)
    flat_x, flat_out = xd.reshape(-1, xd.shape[-1]), out.reshape(-1, xd.shape[-1])
    for row in range(flat_x.shape[0]):
        for j in range(xd.shape[-1] // g):
            s = flat_x[row, j * g:(j + 1) * g]
            flat_out[row, j * g:(j + 1) * g] = (s @ vd) / (vd @ vd) * vd
    return out


# -- project / reconstruct -------------------------------------------------------------------------
@given(cases(), st.integers(0, 1000))
def test_reconstruct_project_is_orthogonal_projection(case, vseed):
    x, g = case
    v = unit(g, vseed)
    c = project(x, v)
    assert c.shape == (*x.shape[:-1], x.shape[-1] // g) and c.dtype == x.dtype
    x_hat = reconstruct(c, v)
    assert x_hat.shape == x.shape and x_hat.dtype == x.dtype
    expected = explicit_projection(x, v.to(x.dtype).float())
    torch.testing.assert_close(x_hat.double(), expected, **TOL[x.dtype])


@given(cases(), st.integers(0, 1000))
def test_project_coefficients_are_dot_products(case, vseed):
    x, g = case
    v = unit(g, vseed)
    c = project(x, v, torch.float32)
    assert c.dtype == torch.float32
    expected = (x.double().reshape(*x.shape[:-1], -1, g) * v.to(x.dtype).double()).sum(-1)
    torch.testing.assert_close(c.double(), expected, **TOL[x.dtype])


@given(cases(), st.integers(0, 1000))
def test_projection_is_idempotent_and_residual_orthogonal(case, vseed):
    x, g = case
    x = x.float()
    v = unit(g, vseed)
    x_hat = reconstruct(project(x, v), v)
    torch.testing.assert_close(reconstruct(project(x_hat, v), v), x_hat, rtol=1e-5, atol=1e-5)
    residual = (x - x_hat).reshape(-1, g)
    torch.testing.assert_close(residual @ v, torch.zeros(residual.shape[0]), rtol=0, atol=1e-4)


@given(cases(), st.sampled_from([1.0, -1.0]))
def test_g1_reconstructs_exactly(case, sign):
    x, _ = case
    v = torch.tensor([sign])
    c = project(x, v)
    assert torch.equal(reconstruct(c, v), x)


def test_reconstruct_dtype_argument():
    v = unit(4, 0)
    c = project(torch.randn(3, 8), v, torch.bfloat16)
    assert c.dtype == torch.bfloat16
    assert reconstruct(c, v, torch.float32).dtype == torch.float32
    assert reconstruct(c, v).dtype == torch.bfloat16


def test_project_rejects_non_divisible():
    with pytest.raises(ValueError, match="does not divide"):
        project(torch.randn(2, 10), unit(4, 0))


# -- initial_vector / random_vector ------------------------------------------------------------------
@given(cases())
def test_initial_vector_is_unit_and_parallel_to_mean_subtoken(case):
    x, g = case
    v = initial_vector(x, g)
    assert v.shape == (g,) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    mean = x.double().reshape(-1, g).mean(0)
    if mean.norm() > 1e-3:
        torch.testing.assert_close(v.double(), mean / mean.norm(), rtol=1e-4, atol=1e-4)


@given(lead=st.integers(1, 5), g=st.integers(1, 8), k=st.integers(1, 6), seed=st.integers(0, 1000),
       dtype=st.sampled_from(DTYPES))
def test_initial_vector_uniform_when_mean_is_zero(lead, g, k, seed, dtype):
    # small integers: every sum is exact, so the mean of [y; -y] is exactly zero
    y = torch.randint(-8, 9, (lead, g * k), generator=torch.Generator().manual_seed(seed)).to(dtype)
    for x in (torch.cat([y, -y]), torch.zeros(lead, g * k, dtype=dtype)):
        v = initial_vector(x, g)
        torch.testing.assert_close(v, torch.full((g,), g ** -0.5), rtol=1e-6, atol=1e-6)


def test_initial_vector_ignores_autograd():
    x = torch.randn(4, 8, requires_grad=True)
    v = initial_vector(x, 4)
    assert not v.requires_grad


@given(g=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_random_vector_deterministic_unit(g, seed):
    v = random_vector(g, seed)
    assert v.shape == (g,) and v.dtype == torch.float32
    torch.testing.assert_close(v.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)
    torch.manual_seed(seed + 1)  # the global RNG must not matter
    assert torch.equal(random_vector(g, seed), v)


def test_random_vector_differs_between_seeds_and_ignores_global_rng():
    a, b = random_vector(16, 1), random_vector(16, 2)
    assert not torch.allclose(a, b)
    state = torch.get_rng_state()
    random_vector(16, 3)
    assert torch.equal(torch.get_rng_state(), state)


# -- the error estimate --------------------------------------------------------------------------------
@settings(max_examples=25)
@given(cases(dtypes=(torch.float32,)), st.integers(0, 1000))
def test_reconstruction_error_is_the_dropped_energy(case, seed):
    from velora_fx.codecs.velora import reconstruction_error
    x, g = case
    v = unit(g, seed)
    x_hat = reconstruct(project(x, v, torch.float32), v, torch.float32)
    if float((x ** 2).sum()) == 0:
        assert reconstruction_error(x, v) is None  # no energy: no information
        return
    expected = float(((x - x_hat) ** 2).sum() / (x ** 2).sum())
    assert abs(reconstruction_error(x, v) - expected) < 1e-4


def test_reconstruction_error_extremes():
    from velora_fx.codecs.velora import reconstruction_error
    v = torch.tensor([1.0, 0.0])
    assert reconstruction_error(torch.tensor([[3.0, 0.0, -2.0, 0.0]]), v) == 0.0  # every sub-token along v
    assert reconstruction_error(torch.tensor([[0.0, 3.0, 0.0, -2.0]]), v) == 1.0  # every one orthogonal
    assert reconstruction_error(torch.zeros(2, 4), v) is None  # a degenerate batch says nothing
    assert reconstruction_error(torch.full((2, 4), float("nan")), v) is None
    assert reconstruction_error(torch.randn(5, 6), torch.ones(1)) < 1e-6  # g = 1 is exact
