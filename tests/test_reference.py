"""velora_fx.reference: the eager, paper-faithful VeLoRA used as ground truth."""
import copy
import io
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from velora_fx import reference
from velora_fx.codecs.velora import initial_vector, project, random_vector, reconstruct
from velora_fx.config import ConfigError, VeloraConfig
from velora_fx.reference import VeLoRALinear, apply_velora, weight_grad
from velora_fx.state import next_vector

KINDS = ["linear", "linear_nobias", "conv1d"]
DTYPES = [torch.float32, torch.bfloat16]


def make_layer(kind, d_in, d_out, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    if kind == "conv1d":
        layer = Conv1D(d_out, d_in)
        with torch.no_grad():
            layer.weight.normal_()
            layer.bias.normal_()
    else:
        layer = nn.Linear(d_in, d_out, bias=kind == "linear")
    return layer.to(dtype)


def run(module, x, grad_out):
    """Forward + backward; returns (y, grad_x, grad_W, grad_b) of the (possibly wrapped) layer."""
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_out)
    layer = module[0].inner if isinstance(module[0], VeLoRALinear) else module[0]
    gb = None if layer.bias is None else layer.bias.grad
    return y.detach(), x.grad, layer.weight.grad, gb


def as_out_in(grad_w, kind):
    """grad_W as [out, in] (Conv1D keeps W as [in, out])."""
    return grad_w.t() if kind == "conv1d" else grad_w


def assert_rank1_along(grad_w, v, kind, rtol, bound):
    """Every sub-token (chunk of g along the input dim) of every row of grad_W is parallel to v,
    up to rounding: ``rtol * bound`` where bound is the magnitude of the summed terms."""
    g = v.numel()
    rows = as_out_in(grad_w, kind).float().reshape(-1, g)
    u = v.float() / v.float().norm()
    residual = rows - (rows @ u)[:, None] * u[None, :]
    limit = rtol * as_out_in(bound, kind).reshape(-1, g).norm() + 1e-6
    assert residual.norm() <= limit, (residual.norm(), limit)


REL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def assert_close_to(actual, expected, bound, dtype):
    """|actual - expected| <= rel(dtype) * bound elementwise, where bound = the sum of the absolute
    values of the terms (so cancellation in low precision does not produce false alarms)."""
    assert actual.shape == expected.shape
    err = (actual.double() - expected.double()).abs()
    limit = REL[dtype] * bound.double() + 1e-6
    assert bool((err <= limit).all()), f"max excess {float((err - limit).max())}"


def linear_bounds(x, grad_out, weight, kind, v=None):
    """Magnitude bounds |grad_out| @ |W| (for grad_x) and |grad_out|ᵀ @ (|x| + |x̂|) (for grad_W, in
    W's layout; x̂ the rank-1 reconstruction with v, when given)."""
    w = weight.detach().float().abs()
    w_out_in = w.t() if kind == "conv1d" else w
    go = grad_out.float().abs().reshape(-1, grad_out.shape[-1])
    xa = x.float().abs()
    if v is not None:
        xa = xa + reconstruct(project(x.float(), v.float()), v.float()).abs()
    xa = xa.reshape(-1, x.shape[-1])
    bx = (go @ w_out_in).reshape(x.shape)
    bw = go.t() @ xa
    return bx, (bw.t() if kind == "conv1d" else bw)


@st.composite
def layer_cases(draw):
    kind = draw(st.sampled_from(KINDS))
    lead = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
    g, k, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, g * k, generator=gen) + torch.randn(g * k, generator=gen)).to(dtype)
    grad_out = torch.randn(*lead, d_out, generator=gen).to(dtype)
    return kind, g, x, grad_out, seed


# -- the core property -----------------------------------------------------------------------------
@settings(max_examples=40)
@given(layer_cases())
def test_wrapped_layer_matches_exact_except_weight_grad(case):
    kind, g, x, grad_out, seed = case
    dtype = x.dtype
    exact = nn.Sequential(make_layer(kind, x.shape[-1], grad_out.shape[-1], dtype, seed))
    model = copy.deepcopy(exact)
    assert apply_velora(model, sub_token_size=g) == ["0"]
    assert isinstance(model[0], VeLoRALinear) and model[0].sub_token_size == g

    y_ref, gx_ref, gw_ref, gb_ref = run(exact, x, grad_out)
    y, gx, gw, gb = run(model, x, grad_out)

    assert torch.equal(y, y_ref)  # same forward ops, bit for bit
    bound_x, bound_w = linear_bounds(x, grad_out, exact[0].weight, kind, model[0].v)
    assert_close_to(gx, gx_ref, bound_x, dtype)
    if gb_ref is None:
        assert gb is None
    else:
        bound_b = grad_out.float().abs().reshape(-1, grad_out.shape[-1]).sum(0)
        assert_close_to(gb, gb_ref, bound_b, dtype)

    v = model[0].v
    assert torch.equal(v, initial_vector(x, g))
    assert gw.shape == gw_ref.shape and gw.dtype == gw_ref.dtype
    formula = weight_grad(x, grad_out, v, transposed_weight=kind == "conv1d")
    assert_close_to(gw, formula, bound_w, dtype)
    assert_rank1_along(gw, v.to(dtype), kind, REL[dtype], bound_w)


@settings(max_examples=25)
@given(layer_cases())
def test_sub_token_size_1_is_exact(case):
    kind, _, x, grad_out, seed = case
    x, grad_out = x.float(), grad_out.float()
    exact = nn.Sequential(make_layer(kind, x.shape[-1], grad_out.shape[-1], seed=seed))
    model = copy.deepcopy(exact)
    apply_velora(model, sub_token_size=1)
    ref, out = run(exact, x, grad_out), run(model, x, grad_out)
    assert model[0].v.abs().item() == 1.0
    for a, b in zip(out, ref):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=15)
@given(layer_cases(), st.sampled_from([0.5, 2.0, 0.125]))
def test_scale_multiplies_weight_grad_only(case, scale):
    kind, g, x, grad_out, seed = case
    base = nn.Sequential(make_layer(kind, x.shape[-1], grad_out.shape[-1], x.dtype, seed))
    one, scaled = copy.deepcopy(base), copy.deepcopy(base)
    apply_velora(one, sub_token_size=g)
    apply_velora(scaled, sub_token_size=g, scale=scale)
    y1, gx1, gw1, gb1 = run(one, x, grad_out)
    ys, gxs, gws, gbs = run(scaled, x, grad_out)
    assert torch.equal(ys, y1) and torch.equal(gxs, gx1)
    assert (gbs is None and gb1 is None) or torch.equal(gbs, gb1)
    _, bound_w = linear_bounds(x, grad_out, base[0].weight, kind, scaled[0].v)
    assert_close_to(gws, gw1.float() * scale, bound_w * abs(scale), x.dtype)
    formula = weight_grad(x, grad_out, scaled[0].v, scale=scale, transposed_weight=kind == "conv1d")
    assert_close_to(gws, formula, bound_w * abs(scale), x.dtype)


def test_grad_w_is_approximate_for_g_above_1():
    # guards against a vacuous test: with g > 1 the weight gradient really changes
    exact = nn.Sequential(make_layer("linear", 16, 8))
    model = copy.deepcopy(exact)
    apply_velora(model, sub_token_size=4)
    x, go = torch.randn(32, 16), torch.randn(32, 8)
    gw_ref, gw = run(exact, x, go)[2], run(model, x, go)[2]
    assert (gw - gw_ref).norm() > 0.1 * gw_ref.norm()


# -- what is saved for backward ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("coeff_dtype", [None, torch.bfloat16])
def test_saves_only_coefficients_v_and_weight(kind, coeff_dtype):
    model = nn.Sequential(make_layer(kind, 16, 6))
    apply_velora(model, sub_token_size=4, coeff_dtype=coeff_dtype)
    weight = model[0].inner.weight
    x = torch.randn(3, 5, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    activations = [t for t in saved if not (t is weight or t.data_ptr() == weight.data_ptr())]
    shapes = sorted((tuple(t.shape), t.dtype) for t in activations)
    assert shapes == sorted([((3, 5, 4), coeff_dtype or torch.float32), ((4,), torch.float32)]), shapes
    y.sum().backward()  # and backward works from what was saved
    assert weight.grad is not None and x.grad is not None


# -- selection ------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.v_proj = nn.Linear(8, 8)
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.c_fc = Conv1D(16, 8)
        self.down_proj = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        h = self.v_proj(x) + self.q_proj(x)
        return self.norm(self.down_proj(torch.relu(self.c_fc(h))))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(8, 4)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return self.lm_head(x)


ALL = ["layers.0.v_proj", "layers.0.q_proj", "layers.0.c_fc", "layers.0.down_proj",
       "layers.1.v_proj", "layers.1.q_proj", "layers.1.c_fc", "layers.1.down_proj", "lm_head"]


@pytest.mark.parametrize("options, expected", [
    (dict(), ALL),
    (dict(include="*v_proj"), ["layers.0.v_proj", "layers.1.v_proj"]),
    (dict(include=["*v_proj", "*down_proj"]), ["layers.0.v_proj", "layers.0.down_proj", "layers.1.v_proj",
                                               "layers.1.down_proj"]),
    (dict(exclude="*lm_head*"), ALL[:-1]),
    (dict(include="layers.1.*", exclude=["*q_proj", "*c_fc"]), ["layers.1.v_proj", "layers.1.down_proj"]),
    (dict(include="*.nothing"), []),
])
def test_apply_velora_selects_by_glob(options, expected):
    net = Net()
    wrapped = apply_velora(net, sub_token_size=4, **options)
    assert sorted(wrapped) == sorted(expected)
    for name, module in net.named_modules():
        if name in expected:
            assert isinstance(module, VeLoRALinear) and module.name == name
        elif name.rsplit(".", 1)[-1] in ("v_proj", "q_proj", "c_fc", "down_proj", "lm_head"):
            assert isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, VeLoRALinear)
    assert not any(isinstance(m, VeLoRALinear) for m in net.modules() if isinstance(m, nn.LayerNorm))


def test_apply_velora_whole_model_forward_exact_and_non_wrapped_grads_exact():
    exact = Net()
    model = copy.deepcopy(exact)
    wrapped = apply_velora(model, VeloraConfig(sub_token_size=4, include=["*v_proj", "*down_proj"]))
    x = torch.randn(2, 5, 8) + 0.5
    y_ref, y = exact(x), model(x)
    assert torch.equal(y, y_ref)
    y_ref.square().sum().backward()
    y.square().sum().backward()
    grads = {n.replace(".inner.", "."): p.grad for n, p in model.named_parameters()}
    wrapped_weights = {f"{w}.weight" for w in wrapped}
    for name, p in exact.named_parameters():
        if name in wrapped_weights:
            continue
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_apply_velora_rejects_non_dividing_feature_size_naming_the_module():
    net = nn.Sequential(nn.Linear(12, 4))
    with pytest.raises(ConfigError, match=r"12.*\b0\b"):
        apply_velora(net, sub_token_size=5)
    with pytest.raises(ConfigError, match="num_groups=32"):
        apply_velora(nn.Sequential(nn.Linear(12, 4)))  # default D/32


def test_apply_velora_num_groups_sets_g_per_layer():
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), Conv1D(4, 8))
    apply_velora(net, num_groups=4)
    assert net[0].sub_token_size == 4 and net[2].sub_token_size == 2
    assert net[0].v.shape == (4,) and net[2].v.shape == (2,)


def test_apply_velora_on_root_linear_fails_cleanly():
    layer = nn.Linear(4, 4)
    try:
        wrapped = apply_velora(layer, sub_token_size=2)
    except (ValueError, TypeError):
        return  # refusing a root module is fine
    assert wrapped == []
    layer.state_dict()


def test_apply_velora_twice_is_a_no_op():
    net = nn.Sequential(nn.Linear(4, 3))
    assert apply_velora(net, sub_token_size=2) == ["0"]
    assert apply_velora(net, sub_token_size=2) == []
    net(torch.randn(2, 4)).sum().backward()


# -- init rules in the reference -------------------------------------------------------------------------
def _wrapped(init, d_in=8, **options):
    net = nn.Sequential(nn.Linear(d_in, 3))
    apply_velora(net, sub_token_size=4, init=init, **options)
    return net


def test_first_batch_fixed_batch_recomputed_ema_mixed():
    xs = [torch.randn(5, 8) + 2 * torch.randn(8) for _ in range(3)]
    fb, bt, ema = _wrapped("first_batch"), _wrapped("batch"), _wrapped("ema:0.5")
    for net in (fb, bt, ema):
        assert not bool(net[0].initialised)
        net(xs[0]).sum().backward()
        assert bool(net[0].initialised)
        assert torch.equal(net[0].v, initial_vector(xs[0], 4))
    v0 = fb[0].v.clone()
    for x in xs[1:]:
        fb(x).sum().backward()
        bt(x).sum().backward()
        assert torch.equal(fb[0].v, v0)
        assert torch.equal(bt[0].v, initial_vector(x, 4))
    # ema:0.5 follows next_vector (the rule the compiled graph emits; see test_state.py)
    v = None
    for x in xs:
        v = next_vector("ema:0.5", "0", v, x, 4)
    ema(xs[1]).sum().backward()
    ema(xs[2]).sum().backward()
    torch.testing.assert_close(ema[0].v, v, rtol=1e-5, atol=1e-6)


def test_random_init_matches_compiled_site_rule():
    net = _wrapped("random")
    net(torch.randn(4, 8)).sum().backward()
    expected = random_vector(4, zlib.crc32(b"0"))
    assert torch.equal(net[0].v, expected)
    assert torch.equal(next_vector("random", "0", None, torch.randn(2, 8), 4), expected)


# -- eval / no_grad -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_no_grad_behaves_like_inner_and_does_not_initialise(kind):
    exact = nn.Sequential(make_layer(kind, 8, 3))
    net = copy.deepcopy(exact)
    apply_velora(net, sub_token_size=4)
    x = torch.randn(2, 3, 8)
    for mode in ("train", "eval"):
        getattr(net, mode)()
        with torch.no_grad():
            assert torch.equal(net(x), exact(x))
        with torch.inference_mode():
            assert torch.equal(net(x), exact(x))
        assert not bool(net[0].initialised) and not net[0].v.any()


def test_no_grad_does_not_update_batch_v():
    net = _wrapped("batch")
    net(torch.randn(4, 8) + 1).sum().backward()
    v = net[0].v.clone()
    with torch.no_grad():
        net(torch.randn(4, 8) - 5)
    assert torch.equal(net[0].v, v)


def test_frozen_weight_uses_inner_module():
    exact = nn.Sequential(nn.Linear(8, 3))
    net = copy.deepcopy(exact)
    apply_velora(net, sub_token_size=4)
    net[0].inner.weight.requires_grad_(False)
    exact[0].weight.requires_grad_(False)
    x = torch.randn(4, 8)
    net(x).sum().backward()
    exact(x).sum().backward()
    assert not bool(net[0].initialised)
    torch.testing.assert_close(net[0].inner.bias.grad, exact[0].bias.grad)


@pytest.mark.parametrize("init", ["first_batch", "batch", "ema:0.5"])
def test_eval_mode_with_grad_evolves_v_like_training(init):
    """The backend sees only the training graph (not module.training), so the reference lets v
    evolve on every gradient-carrying forward, eval mode included: the two stay comparable."""
    x1, x2 = torch.randn(4, 8) + 1, torch.randn(4, 8) - 5
    in_eval, in_train = _wrapped(init), _wrapped(init)
    for net in (in_eval, in_train):
        net(x1).sum().backward()
    v_after_first = in_train[0].v.clone()
    in_eval.eval()
    in_eval(x2)
    in_train(x2)
    torch.testing.assert_close(in_eval[0].v, in_train[0].v)
    assert torch.equal(in_eval[0].v, v_after_first) == (init == "first_batch")


# -- state_dict ------------------------------------------------------------------------------------------------
def test_v_buffers_go_through_state_dict():
    src = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), Conv1D(5, 3))
    apply_velora(src, VeloraConfig(sub_token_size=1, include="0"))
    apply_velora(src, VeloraConfig(sub_token_size=3, include="2"))
    src(torch.randn(4, 8) + 1).sum().backward()
    state = src.state_dict()
    for key in ("0.v", "0.initialised", "0.weight", "0.bias", "2.v", "2.initialised", "2.weight"):
        assert key in state
    assert state["0.v"].shape == (1,) and state["2.v"].shape == (3,) and bool(state["2.initialised"])

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    dst = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), Conv1D(5, 3))
    apply_velora(dst, VeloraConfig(sub_token_size=1, include="0"))
    apply_velora(dst, VeloraConfig(sub_token_size=3, include="2"))
    dst.load_state_dict(torch.load(buf, weights_only=True))
    for i in (0, 2):
        assert torch.equal(dst[i].v, src[i].v) and bool(dst[i].initialised)
    # the loaded v is the one used (first_batch: not re-initialised from the next batch)
    x = torch.randn(6, 8) - 3
    dst(x).sum().backward()
    assert torch.equal(dst[2].v, src[2].v)


def test_reference_module_exports():
    for name in reference.__all__:
        assert hasattr(reference, name)


def test_gpt2_conv1d_sites_in_a_tiny_transformers_model():
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    exact = GPT2Model(cfg)
    model = copy.deepcopy(exact)
    wrapped = apply_velora(model, sub_token_size=4, include=["*c_attn", "*mlp.c_proj"])
    assert sorted(wrapped) == ["h.0.attn.c_attn", "h.0.mlp.c_proj"]
    ids = torch.randint(0, 64, (2, 10))
    probe = torch.randn(2, 10, 32)
    out_ref = exact(ids).last_hidden_state
    out = model(ids).last_hidden_state
    assert torch.equal(out, out_ref)
    (out_ref * probe).sum().backward()
    (out * probe).sum().backward()
    grads = {n.replace(".inner.", "."): p.grad for n, p in model.named_parameters()}
    for name, p in exact.named_parameters():
        if name in ("h.0.attn.c_attn.weight", "h.0.mlp.c_proj.weight"):
            site = model.get_submodule(name.rsplit(".", 1)[0])
            assert grads[name].shape == p.grad.shape
            rows = grads[name].t().reshape(-1, 4)  # Conv1D W is [in, out]
            residual = rows - (rows @ site.v)[:, None] * site.v
            assert residual.norm() <= 1e-5 * rows.norm()
        else:  # every other gradient is exact (grad_x and grad_b are exact through the wrapped layers)
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
