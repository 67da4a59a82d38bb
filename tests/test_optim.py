"""Behaviour of velora_fx.optim: OnlineSubspaceDescent, NAGGS (and the optional GaLore factory)."""
import copy
import io
from fractions import Fraction

import pytest
import torch
from torch import nn

import velora_fx
from velora_fx.optim import NAGGS, OnlineSubspaceDescent, naggs_stability_bound, online_pca_grad, online_pca_loss



@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # tiny matrices: intra-op threads only spin-wait (70x slower on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# optimizer factories shared by the generic tests
OPTS = {
    "osd": lambda params: OnlineSubspaceDescent(params, lr=2e-2, rank=4),
    "naggs": lambda params: NAGGS(params, lr=0.3, mu=1.0, gamma=1.0),
}


def _spd(n, lo=1.0, hi=10.0, dtype=torch.float32):
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return (Q @ torch.diag(torch.linspace(lo, hi, n, dtype=torch.float64)) @ Q.T).to(dtype)


# ----------------------------------------------------------------------------- convergence
@pytest.mark.parametrize("name", ["osd", "naggs"])
def test_decreases_convex_quadratic(name):
    m, n = 16, 48
    A, B = _spd(n), torch.randn(m, n)
    f = lambda X: 0.5 * (X @ A * X).sum() - (B * X).sum()  # 0.5 tr(X A Xᵀ) - <B, X>
    f_star = f(torch.linalg.solve(A, B.T).T).item()
    X = nn.Parameter(torch.zeros(m, n))
    # rank 4 of 16 must sweep the whole space within 200 steps: P needs a fast rate here (5·lr),
    # unlike the LLM-scale default 5e-3
    opt = (OnlineSubspaceDescent([X], lr=5e-2, rank=4, proj_lr=0.25) if name == "osd"
           else NAGGS([X], lr=0.5, mu=1.0, gamma=1.0))  # α=0.5 < naggs_stability_bound(10, 1) = 1
    gap0 = f(X).item() - f_star
    for _ in range(200):
        opt.zero_grad()
        f(X).backward()
        opt.step()
    gap = f(X).item() - f_star
    assert gap < 0.05 * gap0, (gap0, gap)
    if name == "osd":
        assert opt.state[X]["exp_avg"].shape == (m, 4)  # it really ran in the subspace


@pytest.mark.parametrize("name", ["osd", "naggs"])
def test_decreases_least_squares(name):
    X = torch.randn(256, 32)
    W_true = torch.randn(16, 32)
    Y = X @ W_true.T + 0.01 * torch.randn(256, 16)
    model = nn.Linear(32, 16)
    opt = (OnlineSubspaceDescent(model.parameters(), lr=0.1, rank=4, proj_lr=0.5) if name == "osd"  # as above
           else NAGGS(model.parameters(), lr=0.3, mu=1.0, gamma=1.0))
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], losses[::30]


# ----------------------------------------------------------------------------- OSD specifics
def test_online_pca_grad_matches_autograd():
    P = torch.randn(4, 30, dtype=torch.float64, requires_grad=True)
    G = torch.randn(7, 30, dtype=torch.float64)
    for ortho in (0.0, 0.3):
        (ref,) = torch.autograd.grad(online_pca_loss(P, G, ortho), P)
        torch.testing.assert_close(online_pca_grad(P.detach(), G, ortho), ref)


def _regression_run(steps=300, **kw):
    W = nn.Parameter(0.1 * torch.randn(64, 256))
    X, Y = torch.randn(512, 256), torch.randn(512, 64)
    opt = OnlineSubspaceDescent([W], lr=1e-2, rank=8, **kw)
    for _ in range(steps):
        idx = torch.randint(0, 512, (32,))
        opt.zero_grad()
        ((X[idx] @ W.T - Y[idx]) ** 2).mean().backward()
        opt.step()
    return W, opt


@pytest.mark.parametrize("kw,tol", [
    (dict(proj_optimizer="adam", proj_lr=1e-3), 0.1),         # pure online-PCA loss, Adam on P
    (dict(proj_optimizer="sgd", proj_lr=5e-2), 0.01),         # pure online-PCA loss, SGD on P
    (dict(proj_optimizer="adam", proj_lr=5e-2, proj_ortho=1.0), 0.02),  # paper's ||PPᵀ-I|| regulariser
])
def test_osd_projection_stays_near_orthonormal(kw, tol):
    W, opt = _regression_run(**kw)
    P = opt.state[W]["proj"]
    assert P.shape == (8, 256)
    assert (P @ P.T - torch.eye(8)).norm() < tol


def test_osd_projection_initialised_from_svd_and_moves():
    W = nn.Parameter(torch.randn(20, 40))
    G = torch.randn(20, 40)
    opt = OnlineSubspaceDescent([W], lr=1e-3, rank=3, proj_lr=0.0)  # proj_lr=0 -> P stays at its SVD init
    W.grad = G.clone()
    opt.step()
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(opt.state[W]["proj"], Vh[:3])
    opt2 = OnlineSubspaceDescent([W], lr=1e-3, rank=3, proj_lr=1e-2)
    W.grad = G.clone()
    opt2.step()
    W.grad = torch.randn(20, 40)
    opt2.step()
    assert not torch.allclose(opt2.state[W]["proj"], Vh[:3])  # online update, no SVD restart


@pytest.mark.parametrize("shape", [(64, 256), (256, 64)])
def test_osd_state_shapes_and_bytes(shape):
    W = nn.Parameter(torch.randn(*shape))
    W.grad = torch.randn(*shape)
    osd = OnlineSubspaceDescent([W], rank=8)
    osd.step()
    st = osd.state[W]
    assert st["exp_avg"].shape == (64, 8) and st["exp_avg_sq"].shape == (64, 8)
    assert st["proj"].shape == (8, 256)
    W2 = nn.Parameter(torch.randn(*shape))
    W2.grad = torch.randn(*shape)
    adamw = torch.optim.AdamW([W2])
    adamw.step()
    adam_bytes = sum(v.numel() * v.element_size() for v in adamw.state[W2].values()
                     if torch.is_tensor(v) and v.numel() > 1)  # moments only (not the scalar step)
    # AdamW: 2·64·256 floats; OSD: 2·64·8 (moments) + 8·256 (P) + 2·8·256 (Adam on P)
    assert osd.optimizer_state_bytes() == 4 * (2 * 64 * 8 + 3 * 8 * 256)
    expected_ratio = (2 * 64 * 256) / (2 * 64 * 8 + 3 * 8 * 256)  # ≈ 4.57
    assert adam_bytes / osd.optimizer_state_bytes() == pytest.approx(expected_ratio, rel=1e-9)
    sgd = OnlineSubspaceDescent([W], rank=8, proj_optimizer="sgd")
    sgd.step()
    assert adam_bytes / sgd.optimizer_state_bytes() == pytest.approx(
        (2 * 64 * 256) / (2 * 64 * 8 + 8 * 256), rel=1e-9)  # 8x


def test_osd_update_lies_in_subspace():
    W = nn.Parameter(torch.randn(16, 40))
    before = W.detach().clone()
    opt = OnlineSubspaceDescent([W], lr=1e-2, rank=3, proj_lr=0.0)
    W.grad = torch.randn(16, 40)
    opt.step()
    P = opt.state[W]["proj"]
    delta = W.detach() - before
    torch.testing.assert_close(delta @ P.T @ P, delta, atol=1e-6, rtol=1e-5)


def test_osd_fallbacks_to_adamw():
    model = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 32))  # min dims 8 <= rank 8 -> AdamW
    big = nn.Linear(40, 20)
    opt = OnlineSubspaceDescent([{"params": model.parameters()},
                                 {"params": big.parameters(), "subspace": False}], rank=8)
    for p in list(model.parameters()) + list(big.parameters()):
        p.grad = torch.randn_like(p)
    opt.step()
    for p in list(model.parameters()) + list(big.parameters()):
        st = opt.state[p]
        assert "proj" not in st and st["exp_avg"].shape == p.shape


def test_osd_fallback_matches_torch_adamw():
    """Parameters OSD leaves to AdamW (biases, small matrices, ``subspace=False`` groups) are stepped
    by torch's own AdamW code: bitwise equal to ``torch.optim.AdamW`` over several steps, moments
    included, also when a subspace weight shares their group."""
    torch.manual_seed(0)
    shapes = [(5, 4), (7,), (3, 8, 2), (8, 30)]       # (8, 30): min dim 8 <= rank 8 -> AdamW
    big = nn.Parameter(torch.randn(24, 40))            # a subspace weight in the first group
    mine = [nn.Parameter(torch.randn(*s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in mine]
    other = nn.Parameter(torch.randn(6, 20))            # a subspace=False group
    other_ref = nn.Parameter(other.detach().clone())
    a = OnlineSubspaceDescent([{"params": mine[:2] + [big] + mine[2:]},
                               {"params": [other], "subspace": False, "lr": 3e-3, "weight_decay": 0.0}],
                              lr=1e-2, rank=8, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    b = torch.optim.AdamW([{"params": ref}, {"params": [other_ref], "lr": 3e-3, "weight_decay": 0.0}],
                          lr=1e-2, weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    for _ in range(6):
        for p, q in zip(mine + [other], ref + [other_ref]):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
        big.grad = torch.randn_like(big)
        a.step()
        b.step()
        for p, q in zip(mine + [other], ref + [other_ref]):
            assert torch.equal(p, q)
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(a.state[p][key], b.state[q][key]), key
    assert "proj" in a.state[big] and not any("proj" in a.state[p] for p in mine + [other])


def test_osd_target_callable_with_names():
    model = nn.Sequential(nn.Linear(32, 24), nn.Linear(24, 32))
    opt = OnlineSubspaceDescent(model.named_parameters(), rank=4, target=lambda name: name.startswith("0."))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert "proj" in opt.state[model[0].weight]
    assert "proj" not in opt.state[model[1].weight]


# ----------------------------------------------------------------------------- NAG-GS specifics
# Hand computation, f(x) = ½·h·x² with h = 2, x0 = 1, α = 1/2, μ = 1, γ0 = 2 (a = α/(1+α) = 1/3):
#   γ1 = (2/3)·2 + 1/3 = 5/3
#   k=1: g = 2·1 = 2,  b = αμ/(γ1+αμ) = 3/13, v1 = (10/13)·1 + (3/13)(1 - 2) = 7/13,
#        γ2 = (2/3)(5/3)+1/3 = 13/9,  x2 = (2/3)·1 + (1/3)(7/13) = 11/13
#   k=2: g = 22/13, b = 9/35, v2 = (26/35)(7/13) + (9/35)(11/13 - 22/13) = 83/455,
#        γ3 = 35/27, x3 = (2/3)(11/13) + (1/3)(83/455) = 853/1365
#   k=3: g = 1706/1365, b = 27/97, v3 = (70/97)(249/1365) + (27/97)(-853/1365) = -1867/44135,
#        γ4 = 97/81, x4 = (2/3)(853/1365) + (1/3)(-1867/44135) = 159881/397215
HAND = [(Fraction(11, 13), Fraction(7, 13), Fraction(13, 9)),
        (Fraction(853, 1365), Fraction(83, 455), Fraction(35, 27)),
        (Fraction(159881, 397215), Fraction(-1867, 44135), Fraction(97, 81))]


def _naggs_1d(weight_decay=0.0, h=2.0):
    x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = NAGGS([x], lr=0.5, mu=1.0, gamma=2.0, weight_decay=weight_decay)
    out = []
    for _ in range(3):
        opt.zero_grad()
        (0.5 * h * x * x).sum().backward()
        opt.step()
        out.append((x.item(), opt.state[x]["v"].item(), opt.state[x]["gamma"]))
    return out


def test_naggs_matches_hand_computed_steps():
    for (x, v, g), (hx, hv, hg) in zip(_naggs_1d(), HAND):
        assert x == pytest.approx(float(hx), abs=1e-12)
        assert v == pytest.approx(float(hv), abs=1e-12)
        assert g == pytest.approx(float(hg), abs=1e-12)


def test_naggs_weight_decay():
    # wd·x is added to the gradient: f ≡ 0 with wd = 2 must follow the h = 2 hand trajectory exactly
    for (x, v, g), (hx, hv, hg) in zip(_naggs_1d(weight_decay=2.0, h=0.0), HAND):
        assert (x, v, g) == pytest.approx((float(hx), float(hv), float(hg)), abs=1e-12)
    # and decays weights towards 0 when the loss is flat
    w = nn.Parameter(torch.full((3, 3), 5.0))
    opt = NAGGS([w], lr=0.5, weight_decay=0.5)
    for _ in range(50):
        w.grad = torch.zeros_like(w)
        opt.step()
    assert w.abs().max() < 0.5


@pytest.mark.parametrize("L,mu", [(10.0, 1.0), (100.0, 1.0)])
def test_naggs_stability_bound_is_sharp(L, mu):
    bound = naggs_stability_bound(L, mu)
    finals = []
    for factor in (0.9, 1.1):
        x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
        opt = NAGGS([x], lr=factor * bound, mu=mu, gamma=mu)
        for _ in range(300):
            opt.zero_grad()
            (0.5 * L * x * x).sum().backward()
            opt.step()
        finals.append(abs(x.item()))
    assert finals[0] < 1e-3
    assert not finals[1] < 1.0  # diverges (inf/nan/large) above the bound


# ----------------------------------------------------------------------------- conventions
def _mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.mark.parametrize("name", ["osd", "naggs"])
def test_state_dict_round_trip(name):
    data = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(5)]
    model = _mlp()
    opt = OPTS[name](model.parameters())

    def train(m, o, batches):
        for x, y in batches:
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()

    train(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    model2 = copy.deepcopy(model)
    opt2 = OPTS[name](model2.parameters())
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    if name == "osd":
        assert "proj" in opt2.state[model2[0].weight]
    train(model, opt, data[3:])
    train(model2, opt2, data[3:])
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["osd", "naggs"])
def test_closure(name):
    model = _mlp()
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    opt = OPTS[name](model.parameters())
    calls = []

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        calls.append(loss.item())
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor) and first.item() == calls[0]
    for _ in range(10):
        opt.step(closure)
    assert len(calls) == 11 and calls[-1] < calls[0]


def _train(opt, model, x, y, steps):
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", ["osd", "naggs"])
def test_trains_compiled_model_with_backend(name):
    torch._dynamo.reset()
    model = torch.compile(_mlp(), backend=velora_fx.backend(compiler="eager"))
    opt = OPTS[name](model.parameters())
    x, y = torch.randn(32, 16), torch.randn(32, 4)
    losses = _train(opt, model, x, y, steps=5)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    if name == "osd":
        assert "proj" in opt.state[model._orig_mod[0].weight]


def test_galore_factory():
    pytest.importorskip("galore_torch")
    from velora_fx.optim import galore
    model = nn.Linear(32, 16)
    opt = galore(model.parameters(), rank=4, update_proj_gap=10, scale=0.25, lr=1e-2)
    x, y = torch.randn(64, 32), torch.randn(64, 16)
    losses = _train(opt, model, x, y, steps=5)
    assert losses[-1] < losses[0]
    assert opt.state[model.weight]["exp_avg"].numel() == 4 * 32  # low-rank moments


def test_osd_stacked_step_equals_one_optimizer_per_weight():
    """Weights of one shape are stepped together (batched matmuls); the result must equal stepping
    each weight with its own optimizer, for both orientations and with a weight of another shape."""
    torch.manual_seed(0)
    shapes = [(24, 40), (24, 40), (40, 24), (40, 24), (16, 40)]
    together = [nn.Parameter(torch.randn(*s)) for s in shapes]
    alone = [nn.Parameter(w.detach().clone()) for w in together]
    kw = dict(lr=1e-2, rank=4, weight_decay=0.1, proj_lr=1e-2, proj_ortho=0.5)
    opt = OnlineSubspaceDescent(together, **kw)
    singles = [OnlineSubspaceDescent([w], **kw) for w in alone]
    for _ in range(5):
        grads = [torch.randn(*s) for s in shapes]
        for w, g in zip(together, grads):
            w.grad = g.clone()
        for w, g in zip(alone, grads):
            w.grad = g.clone()
        opt.step()
        for o in singles:
            o.step()
    for a, b, o in zip(together, alone, singles):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(opt.state[a]["proj"], o.state[b]["proj"], rtol=1e-5, atol=1e-6)
