"""LoTR adapters (velora_fx.adapters): identity at init, parameter count, gradients vs an explicit
dense ΔW, merge/unmerge, errors, and training through velora_fx.backend."""
import copy

import pytest
import torch
from torch import nn

import velora_fx
from velora_fx.adapters import (LoTRLinear, apply_lotr, lotr_parameter_count, lotr_report, merge_lotr,
                                unmerge_lotr)

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def tiny_llama():
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class Block(nn.Module):
    def __init__(self, d, d_up):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, d_up, bias=False)
        self.down = nn.Linear(d_up, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.proj(x))))


class Stack(nn.Module):
    def __init__(self, d=12, d_up=20, n=3):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, d_up) for _ in range(n))
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def adapter_params(model):
    return {n for n, p in model.named_parameters() if n.startswith("lotr_factors.") or n.endswith(".core")}


def randomize_cores(model, std=0.5):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoTRLinear):
                m.core.normal_(0, std)


# --- identity at init ---------------------------------------------------------------------------

def test_llama_outputs_unchanged_and_structure():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(ids).logits
        q_weight = model.model.layers[0].self_attn.q_proj.weight
        out = apply_lotr(model, ["q_proj", "v_proj"], rank=4)(ids).logits
    assert torch.equal(out, ref)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoTRLinear) and q.weight is q_weight and q.bias is None
    assert isinstance(model.model.layers[0].self_attn.k_proj, nn.Linear)
    # one A,B pair per group, shared by every layer of the group
    assert set(model.lotr_factors.keys()) == {"q_proj", "v_proj"}
    assert model.model.layers[1].self_attn.q_proj.factors is model.lotr_factors["q_proj"]
    assert model.model.layers[0].self_attn.v_proj.factors is model.lotr_factors["v_proj"]
    names = [n for n, _ in model.named_parameters()]
    assert sum(n.endswith(".A") for n in names) == 2 and sum(n.endswith(".B") for n in names) == 2
    assert sum(k.endswith(".A") for k in model.state_dict()) == 2


def test_sequential_outputs_unchanged():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))
    x = torch.randn(4, 8)
    ref = model(x)
    apply_lotr(model, ["2", "4"], rank=3)
    # the factor container is a child of the Sequential too: it passes its input through
    assert list(model._modules)[-1] == "lotr_factors"
    assert isinstance(model[2], LoTRLinear) and isinstance(model[4], LoTRLinear) and isinstance(model[0], nn.Linear)
    assert torch.equal(model(x), ref)


# --- parameters -----------------------------------------------------------------------------------

def test_parameter_count_formula_and_trainability():
    d, d_up, n, r = 12, 20, 3, 4
    model = Stack(d, d_up, n)
    apply_lotr(model, ["proj", "up"], rank=r)
    expected = (2 * d * r + n * r * r) + (d * r + d_up * r + n * r * r)   # square group + non-square group
    assert lotr_parameter_count(model) == expected
    rep = lotr_report(model)
    assert rep["groups"]["proj"]["params"] == 2 * d * r + n * r * r
    assert rep["groups"]["up"]["layers"] == n and rep["groups"]["up"]["d_out"] == d_up
    assert rep["lotr_params"] == rep["trainable_params"] == expected
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == adapter_params(model)
    assert trainable == ({"lotr_factors.proj.A", "lotr_factors.proj.B", "lotr_factors.up.A", "lotr_factors.up.B"}
                         | {f"blocks.{i}.{t}.core" for i in range(n) for t in ("proj", "up")})
    assert not any(p.requires_grad for nm, p in model.named_parameters() if nm not in trainable)

    llama = apply_lotr(tiny_llama(), ["q_proj", "down_proj"], rank=4)
    assert lotr_parameter_count(llama) == (2 * 64 * 4 + 2 * 16) + (128 * 4 + 64 * 4 + 2 * 16)


def test_glob_patterns_and_grouping():
    model = tiny_llama()
    apply_lotr(model, ["*.mlp.down_proj", "model.layers.0.self_attn.*_proj"], rank=2)
    adapted = {n for n, m in model.named_modules() if isinstance(m, LoTRLinear)}
    assert adapted == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"} | {
        f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    assert set(model.lotr_factors.keys()) == {"mlp_down_proj", "model_layers_0_self_attn_proj"}


# --- gradients vs an explicit dense ΔW -------------------------------------------------------------

def test_forward_and_gradients_match_dense_delta():
    d_in, d_out, r, alpha = 6, 5, 3, 6.0
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, d_in), nn.Tanh(), nn.Linear(d_in, d_out))
    base = copy.deepcopy(model)
    apply_lotr(model, ["0", "4"], rank=r, alpha=alpha, share="all")
    randomize_cores(model)
    x = torch.randn(7, d_in)
    model(x).square().sum().backward()

    f = model.lotr_factors["all"]
    A, B = f.A.detach().clone().requires_grad_(), f.B.detach().clone().requires_grad_()
    G = [model[i].core.detach().clone().requires_grad_() for i in (0, 4)]
    scale = alpha / r

    def dense(which):  # explicit ΔW_l = scale·A G_l Bᵀ; factors used only by layers in `which`
        def fac(l, t):
            return t if l in which else t.detach()
        W0 = base[0].weight + scale * fac(0, A) @ G[0] @ fac(0, B).T
        W4 = base[4].weight + scale * fac(1, A) @ G[1] @ fac(1, B).T
        h = torch.tanh(x @ W0.T + base[0].bias)
        h = torch.tanh(base[2](h))
        return (h @ W4.T + base[4].bias).square().sum()

    loss = dense({0, 1})
    assert torch.allclose(model(x).square().sum(), loss, atol=1e-5, rtol=1e-5)
    gA, gB, gG0, gG1 = torch.autograd.grad(loss, [A, B, G[0], G[1]])
    assert torch.allclose(f.A.grad, gA, atol=1e-5) and torch.allclose(f.B.grad, gB, atol=1e-5)
    assert torch.allclose(model[0].core.grad, gG0, atol=1e-5)
    assert torch.allclose(model[4].core.grad, gG1, atol=1e-5)
    # A and B collect a contribution from every layer of the group: the sum of per-layer gradients
    per_layer = [torch.autograd.grad(dense({l}), [A, B]) for l in (0, 1)]
    for k, total in enumerate((f.A.grad, f.B.grad)):
        parts = [g[k] for g in per_layer]
        assert all(p.abs().max() > 1e-4 for p in parts)
        assert torch.allclose(parts[0] + parts[1], total, atol=1e-5)
    # the module's own ΔW is the same dense matrix
    assert torch.allclose(model[0].delta_weight(), scale * f.A @ model[0].core @ f.B.T)


def test_one_step_moves_cores_and_output():
    model = Stack()
    x = torch.randn(8, 12)
    apply_lotr(model, ["proj", "up", "down"], rank=4)
    before = model(x).detach()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(x).square().mean().backward()
    cores = [m.core for m in model.modules() if isinstance(m, LoTRLinear)]
    assert len(cores) == 9 and all(c.grad.abs().max() > 0 for c in cores)
    # cores start at zero, so A and B get exactly zero gradient on the first step
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.lotr_factors.parameters())
    assert all(p.grad is None for n, p in model.named_parameters() if n not in adapter_params(model))
    opt.step()
    assert all(c.abs().max() > 0 for c in cores)
    assert not torch.allclose(model(x), before)


# --- merge ----------------------------------------------------------------------------------------

def test_merge_and_unmerge():
    model = tiny_llama()
    orig_q = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    apply_lotr(model, ["q_proj", "o_proj", "up_proj"], rank=4, alpha=8.0)
    randomize_cores(model, 0.3)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        adapted = model(ids).logits
        merged = merge_lotr(copy.deepcopy(model))(ids).logits
        assert torch.allclose(merged, adapted, atol=1e-5)
        assert not torch.allclose(adapted, copy.deepcopy(model).apply(lambda m: None)(ids).logits * 0)
        m2 = merge_lotr(copy.deepcopy(model))
        assert not any(isinstance(m, LoTRLinear) for m in m2.modules()) and not hasattr(m2, "lotr_factors")
        assert type(m2.model.layers[0].self_attn.q_proj) is nn.Linear
        assert type(m2.model.layers[1].mlp.up_proj) is nn.Linear
        assert not torch.allclose(m2.model.layers[1].self_attn.q_proj.weight, orig_q)

        merge_lotr(model, keep_factors=True)
        assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
        with pytest.raises(ValueError, match="unmerge_lotr"):   # unmerge would drop new adapters
            apply_lotr(model, ["k_proj"], rank=2)
        assert torch.allclose(model(ids).logits, adapted, atol=1e-5)
        unmerge_lotr(model)
        assert isinstance(model.model.layers[1].self_attn.q_proj, LoTRLinear)
        assert torch.allclose(model.model.layers[1].self_attn.q_proj.weight, orig_q, atol=1e-6)
        assert torch.allclose(model(ids).logits, adapted, atol=1e-5)
    with pytest.raises(ValueError, match="keep_factors"):
        unmerge_lotr(model)


def test_conv1d_identity_and_merge():
    model = nn.Sequential(Conv1D(10, 6), nn.GELU(), Conv1D(10, 10), nn.GELU(), Conv1D(10, 10))  # Conv1D(nf=out, nx=in)
    x = torch.randn(3, 4, 6)
    ref = model(x)
    apply_lotr(model, ["[24]"], rank=2)
    assert torch.equal(model(x), ref)
    assert lotr_parameter_count(model) == 2 * 10 * 2 + 2 * 4
    randomize_cores(model)
    adapted = model(x).detach()
    merge_lotr(model)
    assert isinstance(model[2], Conv1D) and torch.allclose(model(x), adapted, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------------

def test_errors():
    model = Stack()
    with pytest.raises(ValueError, match=r"nope.*\*\.missing"):
        apply_lotr(model, ["nope", "*.missing"], rank=2)
    with pytest.raises(ValueError, match=r"blocks\.0\.up"):   # (12->20) and (12->12) in one group
        apply_lotr(model, ["blocks.0.*"], rank=2)
    with pytest.raises(ValueError, match="blocks.0.up"):
        apply_lotr(model, ["proj", "up"], rank=2, share="all")
    seq = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(TypeError, match=r"'1'.*LayerNorm"):
        apply_lotr(seq, ["1"], rank=2)
    # nothing was touched by the failed calls
    assert not hasattr(model, "lotr_factors") and all(p.requires_grad for p in model.parameters())
    apply_lotr(model, ["proj"], rank=2)
    with pytest.raises(ValueError, match="already LoTR-adapted"):
        apply_lotr(model, ["proj"], rank=2)
    apply_lotr(model, ["down"], rank=2)   # a second call adds a group
    assert set(model.lotr_factors.keys()) == {"proj", "down"}
    with pytest.raises(ValueError, match="rank"):
        apply_lotr(Stack(), ["proj"], rank=0)


def test_second_call_keeps_first_adapter_trainable():
    """Two calls (``proj``, then ``down``) are the same adapted model as one call with both patterns:
    the same trainable parameters, and bitwise-equal weights and outputs after a few SGD steps.  The
    second call's ``freeze_base`` freezes the model's own weights, never the first call's adapters."""
    torch.manual_seed(0)
    base = Stack()
    x, y = torch.randn(8, 12), torch.randn(8, 5)

    def trained(calls):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        for patterns in calls:
            apply_lotr(model, patterns, rank=3)
        randomize_cores(model, 0.3)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    torch.manual_seed(2)
    twice = trained([["proj"], ["down"]])
    torch.manual_seed(2)
    once = trained([["proj", "down"]])
    trainable = {n for n, p in twice.named_parameters() if p.requires_grad}
    assert trainable == adapter_params(twice) == {n for n, p in once.named_parameters() if p.requires_grad}
    assert {"lotr_factors.proj.A", "blocks.0.proj.core"} <= trainable   # the first call's adapter
    assert lotr_parameter_count(twice) == lotr_parameter_count(once) == lotr_report(twice)["trainable_params"]
    for (na, a), (nb, b) in zip(twice.named_parameters(), once.named_parameters()):
        assert na == nb and torch.equal(a, b), na
    assert torch.equal(twice(x), once(x))


def test_second_call_on_adapted_modules_refused_untouched():
    model = apply_lotr(Stack(), ["proj"], rank=2)
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"blocks\.0\.proj.*blocks\.1\.proj.*blocks\.2\.proj.*already LoTR-adapted"):
        apply_lotr(model, ["down", "proj"], rank=2)
    assert set(model.lotr_factors.keys()) == {"proj"} and not isinstance(model.blocks[0].down, LoTRLinear)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    assert all(torch.equal(after[n], t) and after[n].requires_grad == rg for n, (t, rg) in before.items())


# --- under velora_fx.backend ------------------------------------------------------------------------

def test_explain_names_lotr_sites():
    model = apply_lotr(tiny_llama(), ["q_proj", "v_proj"], rank=4)
    randomize_cores(model)
    ids = torch.randint(0, 128, (2, 16))
    report = velora_fx.explain(model, ids)
    print(report.table())
    consumers = {c for s in report.sites if s.codec == "velora" for c in s.consumers}  # weight-gradient sites
    # x B (shared B of both groups reads the same normed hidden state), (xB) Gᵀ per layer, (..) Aᵀ
    assert {"lotr_factors.q_proj", "lotr_factors.v_proj"} <= consumers
    assert {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qv"} <= consumers
    assert any(s.name == "lotr_factors.{q_proj,v_proj}" for s in report.sites)
    # frozen base weights need no weight gradient, so they are no site
    assert not any(c.endswith(".base") or "k_proj" in c or "mlp" in c for c in consumers)
    assert all(p.grad is None for p in model.parameters())


def test_compiled_training_through_velora_backend():
    torch._dynamo.reset()
    model = apply_lotr(tiny_llama().train(), ["q_proj", "v_proj"], rank=4, alpha=8.0)
    compiled = torch.compile(model, backend=velora_fx.backend(compiler="eager"))
    ids = torch.randint(0, 128, (4, 16))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > losses[1] > losses[2], losses
    adapters = adapter_params(model)
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (name in adapters), name
    assert all(model.lotr_factors[g].A.grad.abs().max() > 0 for g in ("q_proj", "v_proj"))
    torch._dynamo.reset()
