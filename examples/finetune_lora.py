"""PEFT LoRA fine-tuning of a small Llama-like byte-level LM with the velora_fx backend.

Two phases, both offline (random-init model from ``LlamaConfig``, text from the local Python):

1. **Pre-training** (exact, eager, all weights trained) on the standard library's ``.py`` sources
   (``velora_fx.data.stdlib_text``) minus ``pydoc_data/topics.py``.
2. **LoRA fine-tuning** (``peft.LoraConfig``, r=8 on all seven projections q/k/v/o/gate/up/down,
   base weights frozen) on a different corpus: the Python *Language Reference* -- the English
   help texts of ``pydoc_data.topics`` (what ``help("if")`` prints; ~0.46 MB of prose and grammar
   that phase 1 never saw).  The fine-tune runs through
   ``torch.compile(loss_module, backend=velora_fx.backend(...))``; ``--compare`` runs the same
   fine-tune (same weights, same batches) with plain ``torch.compile`` for reference: losses side by
   side, and step times and peak memory on CUDA only (CPU step times of this tiny model are host
   overhead and noise, not benchmark results, so they are not printed).

The compiled module returns the loss, not the logits (``LossModule``): the cross-entropy is part of
the compiled graph.  Validation runs on the uncompiled module (same weights, no extra compile).

    python examples/finetune_lora.py                      # small: ~45 s on 2 CPU cores (mostly the compile)
    python examples/finetune_lora.py --compare            # + the same fine-tune with plain inductor
    python examples/finetune_lora.py --compiler eager     # same rewrite, no codegen: fast to start
    python examples/finetune_lora.py --size gpu --compare # hidden 1024, 12 layers, seq 1024 on CUDA
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from velora_fx.data import byte_lm_batches, stdlib_text

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import apply_size, print_runs, run_regimes, start_peak, summary, timed_step  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# --size presets; any flag given explicitly on the command line wins
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(hidden=64, layers=2, heads=4, intermediate=176, seq_len=64, batch_size=8,
                  pretrain_steps=150, steps=100, val_batches=8, device="cpu"),
    "gpu": dict(hidden=1024, layers=12, heads=16, intermediate=2816, seq_len=1024, batch_size=8,
                pretrain_steps=300, steps=200, val_batches=16, device="cuda"),
}


class LossModule(torch.nn.Module):
    """``forward(inputs, targets) -> loss`` around a (PEFT-wrapped) causal LM: compiling this puts
    the lm_head and the cross-entropy in the graph, and the fp32 logits never reach eager memory."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def pretrain_corpus() -> bytes:
    """The stdlib ``.py`` sources without ``pydoc_data/topics.py`` (the fine-tune corpus)."""
    text = stdlib_text()
    start = text.find(b"# file: pydoc_data/topics.py\n")
    if start >= 0:
        end = text.find(b"\n# file: ", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else b"")
    return text


def finetune_corpus() -> bytes:
    """The Language Reference help topics (``pydoc_data.topics``), in sorted topic order."""
    from pydoc_data.topics import topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, max_position_embeddings=max(args.seq_len, 512),
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def add_lora(model: torch.nn.Module, args: argparse.Namespace, velora: bool = False) -> torch.nn.Module:
    """PEFT LoRA r=``args.rank`` (alpha 2r, no dropout) on ``LORA_TARGETS``.  ``velora``: PEFT's own
    VeLoRA variant on every LoRA A (``VeloraConfig``, ``args.num_groups`` groups if set, else the
    paper's 32; projection fixed from the first training batch), run as an autograd.Function."""
    from peft import LoraConfig, get_peft_model
    extra = {}
    if velora:
        from peft import VeloraConfig
        extra["velora_config"] = VeloraConfig(num_groups=getattr(args, "num_groups", None) or 32,
                                              init_type="batch_average_once")
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM", **extra)
    with warnings.catch_warnings():  # transformers 5 deprecation noise raised from inside peft
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


@torch.no_grad()
def validation_loss(module: torch.nn.Module, data: bytes, args: argparse.Namespace) -> float:
    """Mean loss over the same ``val_batches`` held-out batches every call (fixed seed)."""
    batches = byte_lm_batches(data, args.batch_size, args.seq_len, split="val", seed=args.seed + 1,
                              device=args.device)
    was_training = module.training
    module.eval()
    losses = [module(x, y).item() for x, y in (next(batches) for _ in range(args.val_batches))]
    module.train(was_training)
    return sum(losses) / len(losses)


def pretrain(model: torch.nn.Module, data: bytes, args: argparse.Namespace) -> float:
    """Exact (eager, uncompressed) training of every weight; returns the last training loss."""
    from tqdm.auto import tqdm
    module = LossModule(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.pretrain_lr, weight_decay=0.0)
    batches = byte_lm_batches(data, args.batch_size, args.seq_len, split="train", seed=args.seed,
                              device=args.device)
    loss = torch.tensor(float("nan"))
    with tqdm(range(args.pretrain_steps), desc="pre-train (exact)", disable=args.quiet) as bar:
        for _ in bar:
            loss = module(*next(batches))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return loss.item()


def finetune(base: torch.nn.Module, data: bytes, args: argparse.Namespace, backend: Any,
             label: str, velora: bool = False, val_before: bool = False) -> dict[str, Any]:
    """LoRA fine-tune a copy of ``base`` through ``torch.compile(..., backend=backend)``, or
    uncompiled when ``backend`` is None.  ``velora``: PEFT's VeLoRA variant (``add_lora``);
    ``val_before``: also the validation loss of the adapted model before its first step.
    ``resident_bytes``: CUDA memory allocated when the peak counter was last reset, after the first
    step (None on CPU); ``first_step_peak_extra_bytes``: the first step's peak above what was allocated
    before it."""
    from tqdm.auto import tqdm
    torch.manual_seed(args.seed)  # same LoRA init for every regime
    model = add_lora(copy.deepcopy(base), args, velora=velora)
    module = LossModule(model).train()
    compiled = module if backend is None else torch.compile(module, backend=backend)
    before = {"val_loss_before": validation_loss(module, data, args)} if val_before else {}
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    batches = byte_lm_batches(data, args.batch_size, args.seq_len, split="train", seed=args.seed,
                              device=args.device)
    cuda = start_peak(args.device)
    resident = torch.cuda.memory_allocated() if cuda else None
    first_peak = None
    times, losses = [], []
    with tqdm(range(args.steps), desc=f"{label}: compiling", disable=args.quiet) as bar:
        for step in bar:
            loss, seconds = timed_step(compiled, optimizer, *next(batches))
            losses.append(loss)
            times.append(seconds)
            if step == 0:
                bar.set_description(f"{label}: fine-tune")
                if cuda and args.steps > 1:
                    # the first step compiles and calibrates, and creates the optimizer's state: its peak
                    # is its own; the peak reported is a training step's, above weights and optimizer state
                    first_peak = torch.cuda.max_memory_allocated() - resident
                    start_peak(args.device)
                    resident = torch.cuda.memory_allocated()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    trained = torch.cat([p.detach().flatten().float() for p in params])
    return {**summary(label, times, losses, module, backend, cuda), **before,
            "val_loss": validation_loss(module, data, args), "trainable_params": sum(p.numel() for p in params),
            # the curve and the adapters' size tell a diverged or collapsed fine-tune from a noisy one
            "train_losses": losses, "trainable_norm": torch.linalg.vector_norm(trained).item(),
            "resident_bytes": resident, "first_step_peak_extra_bytes": first_peak}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="preset for the flags below (small: 2 CPU cores, about 30 s, a minute with --compare; gpu: CUDA)")
    ap.add_argument("--compare", action="store_true", help="also fine-tune with plain torch.compile (losses; step times on CUDA only)")
    ap.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                    help="velora_fx's code generator (eager: same rewrite, graphs run eagerly); the "
                         "--compare baseline uses backend 'inductor' or 'aot_eager' to match")
    ap.add_argument("--steps", type=int, help="LoRA fine-tuning steps")
    ap.add_argument("--pretrain-steps", type=int, help="exact pre-training steps (0: skip)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--val-batches", type=int)
    ap.add_argument("--device", help="default: cpu for --size small, cuda for --size gpu")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--mode", choices=("auto", "max_memory", "all"), default="auto", help="velora_fx mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    apply_size(ap, args, SIZES)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    pre_text, ft_text = pretrain_corpus(), finetune_corpus()
    base = build_model(args).to(args.device)
    print(f"pre-train corpus: stdlib .py sources, {len(pre_text) / 1e6:.1f} MB | fine-tune corpus: "
          f"pydoc_data.topics (Language Reference), {len(ft_text) / 1e6:.2f} MB")
    print(f"model: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M params (hidden {args.hidden}, "
          f"{args.layers} layers, seq {args.seq_len}, batch {args.batch_size}) on {args.device}")

    pre_loss = pretrain(base, pre_text, args) if args.pretrain_steps > 0 else float("nan")
    base.eval()
    before = validation_loss(LossModule(base), ft_text, args)
    print(f"after pre-training ({args.pretrain_steps} steps): train loss {pre_loss:.4f}, "
          f"fine-tune val loss {before:.4f} (uniform over bytes: {math.log(256):.4f})")

    runs = run_regimes(args, lambda backend, label: finetune(base, ft_text, args, backend, label))
    print(f"\nLoRA r={args.rank} on {', '.join(LORA_TARGETS)}: {runs[0]['trainable_params']:,} trainable "
          f"params, {args.steps} steps")
    print_runs(runs, [("val loss", "val_loss", ".4f"), ("train loss", "train_loss", ".4f")])
    report = runs[0]["report"]
    total = time.perf_counter() - start
    print(f"\ntotal {total:.1f} s")
    return {"pretrain_loss": pre_loss, "val_loss_before": before, "runs": runs, "report": report,
            "total_s": total}


if __name__ == "__main__":
    main(sys.argv[1:])
