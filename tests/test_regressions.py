"""Regression tests for what users hit on the first core (issue: core v2): state per model, site
names as ``named_modules()`` paths, sticky plans, reports per graph, compile options, caches."""
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import velora_fx
from pass_helpers import Stack, reference_twin, train_step, twin_grads

pytestmark = pytest.mark.usefixtures("strict_pass")


def _step(model, x, backend, **compile_kwargs):
    fn = torch.compile(model, backend=backend, **compile_kwargs)
    out = fn(x)
    out.float().pow(2).mean().backward()
    return out


def test_two_models_on_one_backend_keep_their_own_state_and_reports():
    backend = velora_fx.backend(sub_token_size=2, mode="all", compiler="eager")
    small, wide = Stack(8, 16), Stack(16, 32)
    _step(small, torch.randn(2, 3, 8), backend)
    _step(wide, torch.randn(2, 3, 16) + 1, backend)
    _step(small, torch.randn(2, 3, 8), backend)  # the first model again: no clash with the second
    a, b = backend.state_dict(small)["sites"], backend.state_dict(wide)["sites"]
    assert set(a) == set(b) and a  # same module paths, separate state
    assert all(a[k]["features"] == 8 or a[k]["features"] == 16 for k in a)
    assert any(not torch.equal(a[k]["vector"], b[k]["vector"]) for k in a)
    assert {g.model for g in backend.report(small).graphs} != {g.model for g in backend.report(wide).graphs}
    with pytest.raises(ValueError, match="compiled 2 models"):
        backend.state_dict()


def test_named_backend_on_two_widths_and_its_report():
    # compiler="eager": what is checked is the shared backend's per-model state and report, not
    # codegen (tests/test_backend_inductor.py runs backend="velora" through inductor)
    options = {"compiler": "eager"}
    shared = velora_fx.default_backend(**options)  # the process-wide backend behind backend="velora"
    small, wide = Stack(8, 16), Stack(16, 32)
    for model, d in ((small, 8), (wide, 16)):
        torch.compile(model, backend="velora", options=options)(torch.randn(2, 4, d)).sum().backward()
    assert velora_fx.default_backend(**options) is shared
    report = shared.report(wide)
    assert report.sites and all(s.consumers[0].startswith(("inp", "blocks", "head")) for s in report.sites)
    assert shared.report(small).graphs[0].model != report.graphs[0].model


class Tied(nn.Module):
    """One weight used as W (x Wᵀ) and as Wᵀ (h W): two sites, two v's."""

    def __init__(self, d=8, h=4):
        super().__init__()
        self.w = nn.Parameter(torch.randn(h, d) / d ** 0.5)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        h = torch.relu(self.norm(x) @ self.w.t())
        return (h * 2) @ self.w


def test_a_weight_used_as_w_and_w_transposed_gets_two_states():
    model, x = Tied(), torch.randn(3, 5, 8)
    backend = velora_fx.backend(sub_token_size=2, mode="all", compiler="eager")
    _, _, grads = train_step(model, x, backend)
    sites = backend.state_dict()["sites"]
    assert set(sites) == {"w", "w:T"}
    assert sites["w"]["features"] == 8 and sites["w:T"]["features"] == 4
    assert {s.state for s in backend.report().compressed} == {"w", "w:T"}


def _tiny_llama(layers=2, checkpointing=False):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=32, attn_implementation="sdpa"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    return model


class _CheckpointedBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(d), nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        torch._dynamo.graph_break()  # the rest compiles as this block's frame: its sources lose "layers.<i>."
        return x + torch.utils.checkpoint.checkpoint(self.mlp, self.norm(x), use_reentrant=False)


class _CheckpointedStack(nn.Module):
    """What HF gradient checkpointing made of a decoder (before transformers 5.25, whose
    checkpointed layers dynamo no longer traces, docs/models.md): a frame per layer after a graph
    break, the layer's MLP in a non-reentrant checkpoint."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp, self.head = nn.Linear(d, d), nn.Linear(d, d)
        self.layers = nn.ModuleList(_CheckpointedBlock(d) for _ in range(2))

    def forward(self, x):
        h = self.inp(x)
        h = self.layers[0](h)
        h = self.layers[1](h)
        return self.head(h)


def test_site_names_are_named_modules_paths_even_across_graph_breaks():
    model = _CheckpointedStack()
    backend = velora_fx.backend(mode="all", sub_token_size=2, compiler="eager", include=["layers.*.mlp.*"])
    ids = torch.randn(2, 8, 16)
    torch.compile(model, backend=backend)(ids).float().pow(2).mean().backward()
    modules = dict(model.named_modules())
    sites = backend.report().sites
    assert sites and all(c in modules for s in sites for c in s.consumers), [s.name for s in sites]
    compressed = backend.report().compressed
    assert compressed and all(".mlp." in c for s in compressed for c in s.approximated)
    assert set(backend.state_dict()["sites"]) <= set(modules)
    # and the gradients under checkpointing are the eager reference's with the same v
    twin = reference_twin(model, backend)
    twin(ids).float().pow(2).mean().backward()
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_peft_lora_sites_use_the_peft_model_paths_and_defaults_do_not_abort_at_r8():
    peft = pytest.importorskip("peft")
    base = _tiny_llama(layers=1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    backend = velora_fx.backend(compiler="eager")  # defaults: auto, g chosen per site
    ids = torch.randint(0, 64, (2, 16))
    torch.compile(model, backend=backend)(input_ids=ids).logits.float().pow(2).mean().backward()
    modules = dict(model.named_modules())
    sites = backend.report().sites
    assert sites and all(c in modules for s in sites for c in s.consumers), [s.name for s in sites]
    assert any("lora_B" in c for s in sites for c in s.consumers)  # the adapters' weight-gradient sites
    assert not any("__dict__" in s.name for s in sites)
    # include with named_modules() paths selects exactly those sites
    only = velora_fx.backend(compiler="eager", mode="all", sub_token_size=2, include=["*.lora_A.default"])
    torch.compile(model, backend=only)(input_ids=ids).logits.float().pow(2).mean().backward()
    assert only.report().compressed and all(".lora_A.default" in c for s in only.report().compressed
                                              for c in s.approximated)


def test_include_matching_nothing_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(Stack(8, 16), torch.randn(2, 3, 8),
                   velora_fx.backend(sub_token_size=2, compiler="eager", include=["layers.*.q_proj"]))
    assert any("matches no site" in str(w.message) and "layers.*.q_proj" in str(w.message) for w in caught)


def test_a_recompile_keeps_the_plan_and_report_totals_count_the_latest_graph():
    model = Stack(8, 16)
    backend = velora_fx.backend(sub_token_size=2, compiler="eager", mode="max_memory", codecs=["velora"])
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    for batch in (2, 3, 5):  # the second shape recompiles with dynamic shapes
        fn(torch.randn(batch, 4, 8)).pow(2).mean().backward()
    graphs = backend.report().graphs
    assert len(graphs) >= 2 and len({g.frame for g in graphs}) == 1
    first, last = graphs[0], graphs[-1]
    assert [(s.name, s.decision, s.sub_token_size) for s in first.sites] == \
           [(s.name, s.decision, s.sub_token_size) for s in last.sites]
    assert all(s.reason.startswith(("kept from this model's first plan", "skipped by this model's first plan",
                                    "excluded")) for s in last.sites)
    report = backend.report()
    assert report.saved_bytes_before == last.saved_bytes_before  # not the sum of every compile
    assert "latest of each frame" in report.table()


def test_explain_passes_keyword_inputs_and_leaves_other_compiled_models_alone():
    model = Stack(8, 16)
    backend = velora_fx.backend(sub_token_size=2, compiler="eager", mode="all")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    fn(torch.randn(2, 3, 8)).sum().backward()
    graphs = len(backend.report().graphs)

    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, *, shift):
            return self.fc(torch.relu(x + shift))

    report = velora_fx.explain(Keyword(), torch.randn(2, 8), shift=1.0, mode="all", sub_token_size=4)
    assert [s.name for s in report.sites] == ["fc"]
    fn(torch.randn(2, 3, 8)).sum().backward()  # same shapes: no recompile of the first model
    assert len(backend.report().graphs) == graphs


def test_mode_and_options_reach_inductor_with_the_object_and_by_name(monkeypatch):
    from velora_fx import _compat
    seen = []
    real = _compat.compile_fx

    def spy(gm, inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(_compat, "compile_fx", spy)
    model, x = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), torch.randn(3, 8)
    torch._dynamo.reset()
    torch.compile(model, backend=velora_fx.backend(), mode="reduce-overhead")(x).sum().backward()
    torch._dynamo.reset()
    torch.compile(model, backend="velora", options={"max_autotune": False})(x).sum().backward()
    assert seen[0].get("triton.cudagraphs") is True and seen[1].get("max_autotune") is False


@pytest.mark.slow
def test_generated_code_has_no_velora_op_and_gradients_match_the_reference():
    from torch._inductor.utils import run_and_get_code
    model, x = Stack(8, 16, act="gelu"), torch.randn(2, 3, 8)
    backend = velora_fx.backend(sub_token_size=2, mode="all")
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    _, code = run_and_get_code(lambda: fn(x).pow(2).mean().backward())
    assert code and not any("velora" in c for c in code)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    _, _, ref = twin_grads(reference_twin(model, backend), x)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref[n], rtol=1e-4, atol=1e-5)


def test_reference_keeps_weight_reachable_and_state_dict_keys():
    from velora_fx.reference import apply_velora
    model = nn.Sequential(nn.Linear(8, 4))
    keys = set(model.state_dict())
    apply_velora(model, sub_token_size=2)
    assert model[0].weight is model[0].inner.weight and model[0].bias is model[0].inner.bias
    assert keys <= set(model.state_dict()), set(model.state_dict())
    out = model(torch.randn(3, 8))
    assert out.shape == (3, 4) and F.linear(torch.zeros(1, 8), model[0].weight).shape == (1, 4)


@pytest.mark.slow
def test_fp16_coefficients_compile_under_inductor(strict_pass):
    """fp16 coefficients are clamped to fp16's range; ``aten.clamp`` after decomposition has no
    inductor lowering ("both a fallback and a decomp"), so the clamp is clamp_min + clamp_max."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).half()
    x = torch.randn(4, 8, 16, dtype=torch.float16)
    backend = velora_fx.backend(mode="max_memory", sub_token_size=4, codecs=["velora"])
    torch.compile(model, backend=backend)(x).float().square().mean().backward()
    assert backend.report().compressed
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_report_totals_count_each_layer_compiled_from_one_frame():
    """FSDP2 compiles every decoder layer as a recompile of one dynamo frame: totals must count
    each layer's graph once, while a recompile of the same layer (new shapes) still replaces it."""
    from velora_fx.report import GraphReport, Report, SiteReport

    def graph(graph_id, layer, before):
        site = SiteReport(name=f"layers.{layer}.mlp.down_proj", consumers=[f"layers.{layer}.mlp.down_proj"],
                          op="mm", shape=(4, 8), dtype="float32", saved_by_baseline=True, saved_forms=["mm"],
                          bytes_before=before, bytes_after=before // 2, decision="compressed", reason="")
        return GraphReport(graph_id=graph_id, status="rewritten", sites=[site], saved_bytes_before=before,
                           saved_bytes_after=before // 2, model="M#0", frame="frame-7")

    report = Report(graphs=[graph(0, 0, 100), graph(1, 1, 100), graph(2, 2, 100)])
    assert report.saved_bytes_before == 300 and len(report.current) == 3
    report.graphs.append(graph(3, 1, 60))  # layer 1 recompiled for a new shape
    assert report.saved_bytes_before == 260 and [g.graph_id for g in report.current] == [0, 2, 3]


def test_eager_compiler_handles_dropout(strict_pass):
    """compiler="eager" runs inductor's joint passes outside compile_fx; its random-op pass needs
    inductor's fake mode, and without it any graph with dropout failed to compile (BackendCompilerFailed:
    'NullHandler' object does not support the context manager protocol).  The pass must still apply,
    and the inverted-dropout scaling must survive: with p=0.5 about half the hidden units are zeroed
    and the rest doubled, so the output differs from eval mode while its bias gradient stays exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    x = torch.randn(32, 8)
    backend = velora_fx.backend(compiler="eager", mode="all", sub_token_size=4)
    out = torch.compile(model, backend=backend)(x)
    out.sum().backward()
    report = backend.report(model)
    assert [s.decision for s in report.sites] == ["compressed", "compressed"]
    assert torch.isfinite(out).all() and not torch.allclose(out, model.eval()(x))
    torch.testing.assert_close(model[3].bias.grad, torch.full((4,), 32.0))  # d(sum)/d(bias) = batch size


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_inductor_lowers_the_factored_weight_gradient(strict_pass, family):
    """The weight gradient computed from the coefficients must lower in inductor for both layouts
    (GPT-2's Conv1D, ``xᵀ grad``, once emitted ``aten.t``, which inductor's lowering refuses after
    decomposition); gradients equal the eager-compiled pass."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    from models import LMLoss, build
    model = LMLoss(build(family, 32, 1, vocab=64))
    ids = torch.randint(0, 64, (2, 16))
    grads = {}
    for compiler in ("inductor", "eager"):
        torch._dynamo.reset()
        backend = velora_fx.backend(mode="all", sub_token_size=4, compiler=compiler)
        torch.compile(model, backend=backend)(ids).backward()
        assert len(backend.report().compressed) >= 4
        grads[compiler] = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    for name, g in grads["inductor"].items():
        torch.testing.assert_close(g, grads["eager"][name], rtol=1e-4, atol=1e-5, msg=name)
