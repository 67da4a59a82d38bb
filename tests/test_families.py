"""One table-driven check over transformers model families (tiny random configs, CPU): the backend
in ``mode="all"`` (every selected site compressed, g = 2) with ``compiler="eager"`` (inductor's
decompositions and partitioner, no codegen) must keep the forward output and every gradient that
is not an approximated weight's exact, give approximated weights the eager reference's gradient
with the same v, and name its sites by real ``named_modules()`` paths."""
import copy

import pytest
import torch

import velora_fx
from pass_helpers import reference_twin

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("strict_pass")

VOCAB, D, FF, HEADS, LAYERS, BATCH, SEQ = 96, 32, 64, 2, 2, 2, 8


def _no_dropout(config):
    """Every dropout / pdrop / layerdrop probability of the config (and its sub-configs) to 0."""
    for key, value in list(vars(config).items()):
        if any(k in key for k in ("dropout", "pdrop", "layerdrop")) and (value is None or type(value) in (int, float)):
            setattr(config, key, 0.0)
        elif isinstance(value, transformers.PretrainedConfig):
            _no_dropout(value)
    return config


def _build(model_name, config_name, attn="sdpa", **fields):
    def build():
        model_cls, config_cls = getattr(transformers, model_name, None), getattr(transformers, config_name, None)
        if model_cls is None or config_cls is None:
            pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
        config = _no_dropout(config_cls(attn_implementation=attn, **fields))
        torch.manual_seed(0)
        model = model_cls(config).train()
        # HF's 0.02 init leaves q/k weight gradients ~1e-5 (BART's encoder ~1e-9), at or under
        # atol=1e-5, where the comparisons below would check nothing; at 1/sqrt(d) all are > 1e-3
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, D ** -0.5)
        assert model.config._attn_implementation == attn
        return model
    return build


def _ids(**extra):
    def make():
        inputs = {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ))}
        inputs.update({k: torch.randint(0, VOCAB, (BATCH, n)) for k, n in extra.items()})
        return inputs
    return make


def _pixels():
    return {"pixel_values": torch.randn(BATCH, 3, 8, 8)}


_DEC = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=32)
_ENC = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, max_position_embeddings=32)

CASES = [
    ("llama", _build("LlamaForCausalLM", "LlamaConfig", **_DEC), _ids()),
    ("qwen2", _build("Qwen2ForCausalLM", "Qwen2Config", **_DEC), _ids()),
    ("mistral", _build("MistralForCausalLM", "MistralConfig", head_dim=D // HEADS, **_DEC), _ids()),
    ("gemma", _build("GemmaForCausalLM", "GemmaConfig", head_dim=D // HEADS, **_DEC), _ids()),
    ("gpt2", _build("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=D, n_inner=FF, n_layer=LAYERS,
                    n_head=HEADS, n_positions=32, bos_token_id=0, eos_token_id=0), _ids()),
    ("gpt_neox", _build("GPTNeoXForCausalLM", "GPTNeoXConfig", **_ENC), _ids()),
    ("phi", _build("PhiForCausalLM", "PhiConfig", **_DEC), _ids()),
    ("opt", _build("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=D, word_embed_proj_dim=D,
                   ffn_dim=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   max_position_embeddings=32), _ids()),
    ("falcon", _build("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=D,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=32), _ids()),
    ("bert", _build("BertModel", "BertConfig", **_ENC), _ids()),
    ("roberta", _build("RobertaModel", "RobertaConfig", **{**_ENC, "max_position_embeddings": 40}), _ids()),
    ("distilbert", _build("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=D, hidden_dim=FF,
                          n_layers=LAYERS, n_heads=HEADS, max_position_embeddings=32), _ids()),
    ("vit", _build("ViTModel", "ViTConfig", hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
                   num_attention_heads=HEADS, image_size=8, patch_size=2, num_channels=3), _pixels),
    ("t5", _build("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=D, d_kv=D // HEADS, d_ff=FF,
                  num_layers=1, num_decoder_layers=1, num_heads=HEADS, relative_attention_num_buckets=8,
                  decoder_start_token_id=0), _ids(decoder_input_ids=SEQ)),
    ("bart", _build("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=D,
                    encoder_layers=1, decoder_layers=1, encoder_attention_heads=HEADS,
                    decoder_attention_heads=HEADS, encoder_ffn_dim=FF, decoder_ffn_dim=FF,
                    max_position_embeddings=32), _ids(decoder_input_ids=SEQ)),
]


def _outputs(out):
    """The main output (logits or last hidden state), plus the pooler's output where the model has
    one (BERT, RoBERTa, ViT), so the pooler's dense layer - a compressed site - gets a gradient."""
    main = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    pooled = getattr(out, "pooler_output", None)
    return [main] if pooled is None else [main, pooled]


def _loss(out):
    """mean(out²) with a fixed random weight per element: a plain mean(out²) of a LayerNorm output
    (DistilBERT's last hidden state) is a constant ≈ 1, whose weight gradients are rounding noise."""
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    return (out.float() * weight).pow(2).mean()


def _step(fn, inputs):
    outs = _outputs(fn(**inputs))
    sum(_loss(o) for o in outs).backward()
    return [o.detach() for o in outs]


def _grads(model):
    """Gradients by parameter object (tied weights are one entry) and by the first name."""
    return {id(p): (name.replace(".inner.", "."), p.grad) for name, p in model.named_parameters()}


@pytest.mark.parametrize("name,build,make_inputs", CASES, ids=[c[0] for c in CASES])
def test_family_forward_and_gradients_match_eager_and_reference(name, build, make_inputs):
    torch._dynamo.reset()
    model = build()
    eager = copy.deepcopy(model)
    inputs = make_inputs()

    backend = velora_fx.backend(mode="all", sub_token_size=2, compiler="eager")
    out = _step(torch.compile(model, backend=backend), inputs)
    expected = _step(eager, inputs)
    # 1. the forward outputs are exact
    torch.testing.assert_close(out, expected)

    # 4. something is compressed, and sites are named by the model's named_modules() paths
    report = backend.report(model)
    modules = dict(model.named_modules())
    assert report.compressed, report.table()
    assert all(c in modules for s in report.sites for c in s.consumers), [s.consumers for s in report.sites]
    approximated = {c for s in report.compressed for c in s.approximated}
    assert approximated <= set(modules), approximated
    # by object, so a tied weight (lm_head = embeddings) counts under whichever name it has
    compressed = {id(model.get_submodule(c).weight) for c in approximated}

    # 2. every gradient that is not an approximated weight's is the eager model's
    got, want = _grads(model), _grads(eager)
    exact = [(key, pname) for key, (pname, _) in got.items() if key not in compressed]
    assert len(exact) + len(compressed) == len(got)
    eager_by_name = {pname: g for pname, g in want.values()}
    for key, pname in exact:
        g, ref = got[key][1], eager_by_name[pname]
        assert (g is None) == (ref is None), pname
        if g is not None:
            torch.testing.assert_close(g, ref, msg=lambda m: f"{name} {pname}: {m}")

    # 3. approximated weights get the eager reference's gradient with the same v
    twin = reference_twin(model, backend)
    _step(twin, inputs)
    twin_by_name = {pname: g for pname, g in _grads(twin).values()}
    for key in compressed:
        pname, g = got[key]
        torch.testing.assert_close(g, twin_by_name[pname], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"{name} {pname}: {m}")
    # and the rewrite is live: rank-1 sub-tokens at g = 2 change every one of those gradients
    unchanged = [got[key][0] for key in compressed if torch.allclose(got[key][1], eager_by_name[got[key][0]])]
    assert not unchanged, unchanged


def test_t5_with_hf_checkpointing_compiles_every_block_with_the_documented_fix():
    """docs/models.md: under HF gradient checkpointing T5Attention sets ``requires_grad`` on its
    zeros position bias inside the checkpoint (decoder block 0's cross-attention), dynamo abandons
    that checkpoint and block 0 runs eagerly.  With T5Attention's flag off and ``use_cache=False``
    every block must be in the compiled graph, with the eager loss and gradients."""
    t5_attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention
    build = next(b for name, b, _ in CASES if name == "t5")
    model = build()
    model.gradient_checkpointing_enable()
    for module in model.modules():
        if isinstance(module, t5_attention):
            module.gradient_checkpointing = False
    reference = copy.deepcopy(model)
    inputs = {"input_ids": torch.randint(0, VOCAB, (BATCH, SEQ)), "labels": torch.randint(0, VOCAB, (BATCH, SEQ))}
    expected = reference(**inputs, use_cache=False).loss
    expected.backward()
    backend = velora_fx.backend(compiler="eager", max_error=0.0)
    loss = torch.compile(model, backend=backend)(**inputs, use_cache=False).loss
    loss.backward()
    torch.testing.assert_close(loss, expected)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=lambda m, name=name: f"{name}: {m}")
    blocks = {".".join(c.split(".")[:3]) for s in backend.report(model).sites for c in s.consumers}
    assert {"encoder.block.0", "decoder.block.0"} <= blocks  # the case builds one block per stack
