"""Model builders for the benchmarks: transformers config classes, random weights, no downloads.

The same two builders serve CPU smoke tests (2 layers x 64 hidden) and the GPU anchors of
the team's design notes (12 layers x 1024 hidden), so every number comes from the same code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["llama_like", "gpt2_like", "build", "LMLoss", "linear_weights", "REFERENCE_INCLUDE",
           "TRANSFORMERS_DEFAULTS"]

# transformers' own config defaults where the builders' differ (GPT-2: dropout 0.1, gelu_new)
TRANSFORMERS_DEFAULTS = {"llama": {}, "gpt2": {"activation": "gelu_new", "dropout": 0.1}}

# What the eager paper baseline (velora_fx.reference.apply_velora) wraps, per family.
# Llama: the paper's LLaMA configuration (v_proj and down_proj inputs).  GPT-2 has no separate
# v_proj: its closest analogue is the fused q/k/v projection c_attn plus the MLP's down
# projection mlp.c_proj (both Conv1D), i.e. "attention input projection + MLP down projection".
REFERENCE_INCLUDE = {
    "llama": ["*v_proj", "*down_proj"],
    "gpt2": ["*attn.c_attn", "*mlp.c_proj"],
}


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def llama_like(hidden: int, layers: int, *, vocab: int = 256, heads: int | None = None,
               kv_heads: int | None = None, intermediate: int | None = None,
               max_positions: int = 2048) -> nn.Module:
    """A ``LlamaForCausalLM`` with random weights and SDPA attention.

    Defaults: head size 64, intermediate = 2.75 x hidden rounded up to a multiple of 64 (so
    VeLoRA's default 32 groups divide every feature size), untied lm_head as in LlamaConfig.
    """
    from transformers import LlamaConfig, LlamaForCausalLM
    heads = heads or max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                         intermediate_size=intermediate or _round_up(hidden * 11 // 4, 64),
                         max_position_embeddings=max_positions, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def gpt2_like(hidden: int, layers: int, *, vocab: int = 256, heads: int | None = None,
              max_positions: int = 2048, activation: str = "gelu_pytorch_tanh", dropout: float = 0.0) -> nn.Module:
    """A ``GPT2LMHeadModel`` (Conv1D projections, GELU MLP of 4 x hidden), SDPA, dropout 0.

    Dropout is off by default so that every regime computes the same function on the same batch
    (gradient comparisons are meaningful and timing has no RNG work).  The activation is GPT-2's
    tanh GELU as one op (``gelu_pytorch_tanh``); transformers' default ``gelu_new`` computes the same
    function from primitive ops, which the few-bit codec does not recognise as a GELU.
    ``activation="gelu_new", dropout=0.1``: transformers' defaults (``TRANSFORMERS_DEFAULTS``).
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads or max(1, hidden // 64),
                        n_positions=max_positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1, attn_implementation="sdpa",
                        activation_function=activation)
    return GPT2LMHeadModel(config)


def build(name: str, hidden: int, layers: int, **kwargs) -> nn.Module:
    """``build("llama" | "gpt2", hidden, layers, ...)``."""
    builders = {"llama": llama_like, "gpt2": gpt2_like}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; known: {sorted(builders)}")
    return builders[name](hidden, layers, **kwargs)


class LMLoss(nn.Module):
    """Next-token cross-entropy around a causal LM: ``forward(ids) -> scalar``.

    Keeping the loss inside the compiled module lets the compiler fuse it with the lm_head and
    keeps the fp32 logits out of eager memory; the module path prefix (``model.``) does not
    affect glob patterns such as ``*v_proj``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:  # random-token benchmarks: predict ids[t + 1] from ids[:t + 1]
            ids, targets = ids[:, :-1], ids[:, 1:]
        logits = self.model(ids).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def linear_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Weight matrices of every nn.Linear / transformers Conv1D, keyed by module path (tied
    weights once, under their first path)."""
    out, seen = {}, set()
    for name, module in model.named_modules():
        is_conv1d = type(module).__name__ == "Conv1D" and hasattr(module, "nf")
        if (isinstance(module, nn.Linear) or is_conv1d) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            out[name.removesuffix(".inner")] = module.weight  # apply_velora wraps as <path>.inner
    return out
