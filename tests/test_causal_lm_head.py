"""The exact loss head on transformers' plain call: ``torch.compile(model, backend=...)`` then
``model(input_ids=..., labels=...)`` (integrations/causal_lm.py).  In training the compiled model
returns no logits, the chunked head replaces lm_head + cross-entropy, and the loss and every
gradient equal eager's; everything else (eval, other backends, eager, ``keep_logits=True``) keeps
transformers' behaviour."""
import copy

import pytest
import torch

import velora_fx
from test_families import _DEC, _ENC, D, FF, HEADS, VOCAB, _build

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("strict_pass")

BATCH, SEQ = 2, 32  # 64 tokens: the logits outweigh the weight gradient the head keeps
# one decoder layer (test_families' models have two): the head follows the last layer whatever the
# depth, and every test here compiles one or more of these models
LAYERS = 1
_DEC, _ENC = ({**fields, "num_hidden_layers": LAYERS} for fields in (_DEC, _ENC))

FAMILIES = {
    "llama": _build("LlamaForCausalLM", "LlamaConfig", **_DEC),
    "llama_tied": _build("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, **_DEC),
    "qwen2": _build("Qwen2ForCausalLM", "Qwen2Config", **_DEC),
    "mistral": _build("MistralForCausalLM", "MistralConfig", head_dim=D // HEADS, **_DEC),
    "gemma": _build("GemmaForCausalLM", "GemmaConfig", head_dim=D // HEADS, **_DEC),  # tied
    "gpt2": _build("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=D, n_inner=FF, n_layer=LAYERS,
                   n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0),  # tied, a graph break
    "gpt_neox": _build("GPTNeoXForCausalLM", "GPTNeoXConfig", **_ENC),
    "phi": _build("PhiForCausalLM", "PhiConfig", **_DEC),  # lm_head with a bias
}


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[0, :3] = -100  # ignore_index rows
    return ids, labels


def _head_rows(backend):
    return [s for g in backend.report().graphs for s in g.sites if s.codec == "chunked_loss"]


def _cache(out):
    """The KV cache a transformers output carries (``cache``; ``past_key_values`` before 5.2x)."""
    return out.get("cache", out.get("past_key_values"))


def _eager_step(model, ids, labels):
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_plain_call_gets_the_head_with_eagers_loss_and_gradients(family):
    model = FAMILIES[family]()
    reference = copy.deepcopy(model)
    ids, labels = _batch()
    expected = _eager_step(reference, ids, labels)

    backend = velora_fx.backend(codecs=["chunked_loss"], compiler="eager", loss_chunk_size=20)  # 4 chunks, last short
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    assert out.logits is None and "logits" not in out
    assert _cache(expected) is not None and _cache(out) is None  # no KV cache held through backward either
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)

    backend_graphs = backend.report().graphs
    assert len(backend_graphs) == 1, backend.report().table()  # GPT-2's loss-type warning no longer breaks
    rows = _head_rows(backend)
    assert [(r.name, r.decision) for r in rows] == [("lm_head", "compressed")], \
        backend.report().table()


def test_bf16_plain_call_is_within_bf16_rounding():
    model = FAMILIES["llama"]()
    exact = copy.deepcopy(model)
    eager = copy.deepcopy(model).to(torch.bfloat16)
    model = model.to(torch.bfloat16)
    ids, labels = _batch(1)
    _eager_step(exact, ids, labels)
    expected = _eager_step(eager, ids, labels)
    out = torch.compile(model, backend=velora_fx.backend(codecs=["chunked_loss"], compiler="eager",
                                                         loss_chunk_size=4))(input_ids=ids, labels=labels)
    assert out.loss.dtype == expected.loss.dtype
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-2, atol=1e-2)
    out.loss.backward()
    for (name, p), (_, q), (_, r) in zip(model.named_parameters(), eager.named_parameters(),
                                         exact.named_parameters()):
        # no farther from the fp32 gradient than eager bf16 is, up to bf16 rounding
        ours, theirs = ((g.grad.float() - r.grad).norm() / r.grad.norm() for g in (p, q))
        assert ours <= theirs + 1e-2, (name, float(ours), float(theirs))


@pytest.mark.parametrize("count", ["tensor", "int"])
def test_the_head_keeps_hf_trainers_num_items_in_batch_loss(count):
    """HF Trainer passes ``num_items_in_batch`` (gradient accumulation's token count) to models that
    accept loss kwargs; transformers then sums the loss and divides by it."""
    model = FAMILIES["llama"]()
    reference = copy.deepcopy(model)
    ids, labels = _batch(3)
    items = int((labels[:, 1:] != -100).sum()) * 3  # as if three micro-batches accumulated
    items = torch.tensor(items) if count == "tensor" else items
    expected = reference(input_ids=ids, labels=labels, num_items_in_batch=items)
    expected.loss.backward()
    backend = velora_fx.backend(codecs=["chunked_loss"], compiler="eager", loss_chunk_size=20)
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=labels, num_items_in_batch=items)
    assert [r.decision for r in _head_rows(backend)] == ["compressed"] and out.logits is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_memory_budget_brings_the_head_on_the_plain_call():
    config = velora_fx.VeloraConfig(memory_budget=0.5)
    assert config.codecs == ("velora", "chunked_loss")
    # auto: the near-exact codecs and the exact head
    assert velora_fx.VeloraConfig().codecs == ("velora", "fewbit", "gated", "chunked_loss")
    assert velora_fx.VeloraConfig(mode="max_memory").codecs == velora_fx.VeloraConfig().codecs
    assert velora_fx.VeloraConfig(mode="all").codecs == ("velora",)
    assert velora_fx.VeloraConfig(memory_budget=0.5, codecs=["velora"]).codecs == ("velora",)  # explicit wins

    model = FAMILIES["llama"]()
    reference = copy.deepcopy(model)
    ids, labels = _batch(2)
    expected = _eager_step(reference, ids, labels)
    backend = velora_fx.backend(memory_budget=0.5, compiler="eager")
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert [r.decision for r in _head_rows(backend)] == ["compressed"]
    head = _head_rows(backend)[0]
    assert head.bytes_before > head.bytes_after  # the logits' bytes left the saved set


def test_the_default_backend_brings_the_exact_head():
    """``velora_fx.backend()`` with no options: the exact head applies on the plain call (no logits
    in training with labels; the loss and lm_head's weight gradient equal eager's: both read only
    exact values), and ``keep_logits=True`` keeps transformers' output."""
    model = FAMILIES["llama"]()
    reference, kept = copy.deepcopy(model), copy.deepcopy(model)
    ids, labels = _batch(4)
    expected = _eager_step(reference, ids, labels)
    backend = velora_fx.backend(compiler="eager")
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    assert out.logits is None and _cache(out) is None
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(model.lm_head.weight.grad, reference.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    assert [r.decision for r in _head_rows(backend)] == ["compressed"]
    torch._dynamo.reset()
    out = torch.compile(kept, backend=velora_fx.backend(compiler="eager", keep_logits=True))(
        input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (BATCH, SEQ, VOCAB)


def test_named_backend_gets_the_head_too():
    model = FAMILIES["gpt2"]()
    ids, labels = _batch(3)
    options = {"codecs": ["chunked_loss"], "compiler": "eager"}
    out = torch.compile(model, backend="velora", options=options)(input_ids=ids, labels=labels)
    assert out.logits is None
    backend = velora_fx.default_backend(**options)
    assert [r.decision for r in _head_rows(backend)] == ["compressed"]


def test_named_backend_gets_the_head_when_velora_fx_is_imported_before_transformers():
    """``import velora_fx`` first, transformers after: the wrappers must still be in place before
    dynamo traces (``backend="velora"`` is built only after the trace)."""
    import subprocess
    import sys
    script = """
import torch, velora_fx
from velora_fx.integrations import causal_lm
assert "transformers" not in __import__("sys").modules and not causal_lm.installed()
from transformers import LlamaConfig, LlamaForCausalLM
assert causal_lm.installed()
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
model = LlamaForCausalLM(cfg)
ids = torch.randint(0, 512, (2, 32))
eager = model(input_ids=ids, labels=ids).loss
out = torch.compile(model, backend="velora", options={"codecs": ["chunked_loss"], "compiler": "eager"})(
    input_ids=ids, labels=ids)
assert out.logits is None, "the head did not apply"
torch.testing.assert_close(out.loss, eager)
print("OK")
"""
    env = {**__import__("os").environ, "VELORA_FX_STRICT": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env,
                          cwd=str(__import__("pathlib").Path(velora_fx.__file__).parents[1]))
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_a_backend_built_after_a_partial_transformers_import_does_not_hang():
    """``import velora_fx``, then ``from transformers import <a config>`` (transformers is imported,
    ``modeling_utils`` not yet), then the default backend: ``install()`` imports ``modeling_utils``,
    whose post-import hook calls ``install()`` again on the same thread.  It deadlocked on a plain
    lock (v15); the wrappers must end installed exactly once."""
    import subprocess
    import sys
    script = """
import velora_fx
from transformers import GPT2Config
import sys
assert "transformers.modeling_utils" not in sys.modules
from velora_fx.integrations import causal_lm
backend = velora_fx.backend()
from transformers.utils.generic import ModelOutput
assert causal_lm.installed()
original = causal_lm._INSTALLED["post_init"]
assert original.__qualname__ == "ModelOutput.__post_init__", original.__qualname__  # not a wrapper of a wrapper
assert ModelOutput.__post_init__.__qualname__.startswith("_wrap_post_init")
print("OK")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          cwd=str(__import__("pathlib").Path(velora_fx.__file__).parents[1]))
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]


def test_dropping_the_logits_is_announced_once_naming_keep_logits(monkeypatch):
    """Code that reads the logits in training (TRL's SFTTrainer computes token accuracy from them)
    would fail on None without saying why: the first drop shows a notice naming the option."""
    import warnings

    from velora_fx.integrations import causal_lm
    monkeypatch.setattr(causal_lm, "_noticed", False)
    ids, labels = _batch(5)

    def notices(**options):
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(FAMILIES["llama"](), backend=velora_fx.backend(compiler="eager", **options))(
                input_ids=ids, labels=labels)
        return out, [w for w in caught if str(w.message) == causal_lm.NOTICE]

    for options in ({"keep_logits": True}, {"codecs": ["velora"]}):  # logits kept: nothing to announce
        out, shown = notices(**options)
        assert out.logits is not None and not shown
    out, shown = notices()
    assert out.logits is None and len(shown) == 1 and "keep_logits=True" in causal_lm.NOTICE
    out, shown = notices()
    assert out.logits is None and not shown  # once per process


def test_transformers_gradient_checkpointing_is_named_and_the_gradients_stay_eagers():
    """With ``gradient_checkpointing_enable()`` the layers keep nothing to compress (and transformers
    5.2x graph-breaks there): the backend says so once, and training stays exact where it is exact."""
    import warnings
    ids, labels = _batch(6)
    for checkpointing in (False, True):
        model = FAMILIES["llama"]()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.train()
        reference = copy.deepcopy(model)
        expected = _eager_step(reference, ids, labels)
        torch._dynamo.reset()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = torch.compile(model, backend=velora_fx.backend(codecs=["chunked_loss"], compiler="eager"))(
                input_ids=ids, labels=labels)
            out.loss.backward()
        named = [w for w in caught if "gradient checkpointing on" in str(w.message)]
        assert len(named) == (1 if checkpointing else 0), [str(w.message) for w in caught]
        # read without transformers' deprecation warning for is_gradient_checkpointing (5.2x)
        assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_keep_logits_returns_them_and_the_report_says_why():
    model = FAMILIES["llama"]()
    ids, labels = _batch(4)
    backend = velora_fx.backend(codecs=["chunked_loss"], compiler="eager", keep_logits=True)
    out = torch.compile(model, backend=backend)(input_ids=ids, labels=labels)
    assert out.logits is not None and out.logits.shape == (BATCH, SEQ, VOCAB)
    assert _cache(out) is not None  # transformers' outputs as they are, the KV cache too
    (row,) = _head_rows(backend)
    assert row.decision == "skipped" and "keep_logits" in row.reason


def test_gpt2_with_its_graph_break_reports_why_the_head_cannot_apply():
    model = FAMILIES["gpt2"]()
    ids, labels = _batch(5)
    backend = velora_fx.backend(codecs=["chunked_loss"], compiler="eager", keep_logits=True)
    torch.compile(model, backend=backend)(input_ids=ids, labels=labels).loss.backward()
    graphs = backend.report().graphs
    assert len(graphs) == 2  # transformers' own behaviour: the loss-type warning breaks the graph
    (row,) = _head_rows(backend)
    assert row.decision == "skipped" and "graph break" in row.reason


def test_evaluation_and_calls_without_labels_keep_their_logits():
    model = FAMILIES["llama"]()
    reference = copy.deepcopy(model).eval()
    ids, labels = _batch(6)
    compiled = torch.compile(model, backend=velora_fx.backend(codecs=["chunked_loss"], compiler="eager"))
    model.eval()
    with torch.no_grad():
        out, expected = compiled(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    assert set(out.keys()) == set(expected.keys())  # the KV cache too
    model.train()
    assert compiled(input_ids=ids).logits.shape == (BATCH, SEQ, VOCAB)  # no labels: no loss to fuse into


def test_other_backends_and_eager_keep_transformers_behaviour():
    velora_fx.backend(codecs=["chunked_loss"], compiler="eager")  # installs the wrappers
    from velora_fx.integrations import causal_lm
    assert causal_lm.installed()
    model = FAMILIES["gpt2"]()
    ids, labels = _batch(7)
    assert model(input_ids=ids, labels=labels).logits.shape == (BATCH, SEQ, VOCAB)
    out = torch.compile(model, backend="aot_eager")(input_ids=ids, labels=labels)
    assert out.logits.shape == (BATCH, SEQ, VOCAB)
    # a velora backend without the head (the default has it since v15)
    without = velora_fx.backend(compiler="eager", codecs=("velora", "fewbit", "gated"))
    out = torch.compile(copy.deepcopy(model), backend=without)(input_ids=ids, labels=labels)
    assert out.logits is not None
