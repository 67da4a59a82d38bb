"""End to end through real inductor code generation (slow on 2 CPU cores: a few compiles).

The rest of the suite uses compiler="eager", which runs the same decompositions, joint passes,
rewrite and partitioner; these tests make sure inductor's codegen accepts the rewritten graphs
(aten encode/decode, state inputs updated in place, MUST_SAVE tags) and that the named backend is
wired up.
"""
import pytest
import torch
import torch.nn.functional as F

import velora_fx
from pass_helpers import reference_twin, saved_activation_bytes

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("strict_pass")]


def _tiny_llama(intermediate=64):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                        attn_implementation="sdpa"))


def _loss(model, ids):
    logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def test_inductor_backend_matches_the_eager_reference_and_frees_saved_bytes():
    model, ids = _tiny_llama(), torch.randint(0, 64, (2, 16))
    backend = velora_fx.backend(num_groups=4, mode="max_memory", codecs=["velora"])
    inputs = [*model.parameters(), *model.buffers(), ids]
    plain_backend = velora_fx.backend(num_groups=4, include=["<nothing>"], compiler="eager")
    before, _ = saved_activation_bytes(torch.compile(model, backend=plain_backend), ids, params=inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    after, out = saved_activation_bytes(compiled, ids, params=inputs)
    report = backend.report()
    assert report.graphs[0].status == "rewritten" and len(report.compressed) >= 3
    assert after < before
    F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    twin = reference_twin(model, backend)
    _loss(twin, ids).backward()
    compressed = {f"{c}.weight" for s in report.compressed for c in s.approximated}
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        tol = dict(rtol=1e-3, atol=1e-5) if name in compressed else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)


def test_named_backend_uses_the_shared_default_backend_and_stays_within_max_error():
    """backend="velora" = velora_fx.backend() shared across compiles: default "auto" compresses only
    sites whose estimated error is within max_error (at g chosen per site), and its gradients are
    the eager reference's with the same v; every other gradient stays exact.  VeLoRA alone
    (``options``): the default's near-exact codecs have no eager reference twin."""
    assert velora_fx.default_backend().config.codecs == ("velora", "fewbit", "gated", "chunked_loss")
    model, ids = _tiny_llama(intermediate=32), torch.randint(0, 64, (2, 16))
    torch._dynamo.reset()
    _loss(torch.compile(model, backend="velora", options={"codecs": ["velora"]}), ids).backward()
    backend = velora_fx.default_backend(codecs=["velora"])
    report = backend.report(model)
    assert report.sites and report.compressed
    assert all(0 < s.estimated_error <= backend.config.max_error and s.sub_token_size for s in report.compressed)
    twin = reference_twin(model, backend)
    _loss(twin, ids).backward()
    compressed = {f"{c}.weight" for s in report.compressed for c in s.approximated}
    for (name, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
        tol = dict(rtol=1e-3, atol=1e-5) if name in compressed else dict(rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p.grad, q.grad, **tol, msg=name)
