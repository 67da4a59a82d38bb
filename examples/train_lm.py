"""Train a tiny byte-level Llama-like LM on the Python standard library with velora_fx.

The whole recipe is one line: ``torch.compile(model, backend=velora_fx.backend(...))``.  The
script trains for a few steps, prints what the backend compressed (``print(b.report())``) and a
validation loss.  Everything is offline: random-init model from ``LlamaConfig``, text from the
local stdlib sources.

    python examples/train_lm.py                       # inductor, ~30 steps (about 50 s on 2 CPU cores)
    python examples/train_lm.py --compiler eager      # same rewrite, no codegen: fast to start
    python examples/train_lm.py --mode all --num-groups 16 --steps 200 --device cuda
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import velora_fx
from velora_fx.data import byte_lm_batches, stdlib_text


class CausalLM(torch.nn.Module):
    """``forward(inputs, targets) -> loss``: the loss lives inside the compiled region, so
    inductor fuses it with the lm_head and the fp32 logits never exist in eager memory."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         intermediate_size=args.intermediate, max_position_embeddings=max(args.seq_len, 512),
                         attn_implementation="sdpa")
    return CausalLM(LlamaForCausalLM(config))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches, n: int) -> float:
    """Mean loss over ``n`` fixed validation batches, on the uncompiled module (same weights):
    evaluation then needs no extra (inference) compile."""
    model.eval()
    losses = [model(x, y).item() for x, y in (next(batches) for _ in range(n))]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=352)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mode", choices=("auto", "max_memory", "all"), default="auto",
                    help="auto: sites that free enough saved bytes within max_error (g chosen per site); "
                         "max_memory: every site that frees bytes (g chosen within max_error); all: every "
                         "weight-gradient site")
    ap.add_argument("--num-groups", type=int, default=None,
                    help="fix g = D / num_groups for every site (default: auto and max_memory choose; all uses 32)")
    ap.add_argument("--max-error", type=float, default=None,
                    help="auto's and max_memory's bound on the estimated error")
    ap.add_argument("--compiler", choices=("inductor", "eager"), default="inductor")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--val-batches", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    text = stdlib_text()
    train = byte_lm_batches(text, args.batch_size, args.seq_len, split="train", seed=args.seed, device=args.device)
    model = build_model(args).to(args.device)
    print(f"data: {len(text) / 1e6:.1f} MB of stdlib source | model: "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params on {args.device}")

    options = {k: v for k, v in dict(num_groups=args.num_groups, max_error=args.max_error).items() if v is not None}
    backend = velora_fx.backend(mode=args.mode, compiler=args.compiler, **options)
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)

    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        inputs, targets = next(train)
        loss = compiled(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.2f} s"
                  f"{', includes compile' if step == 1 else ''})", flush=True)

    print("\n" + str(backend.report()) + "\n")
    val = byte_lm_batches(text, args.batch_size, args.seq_len, split="val", seed=args.seed + 1, device=args.device)
    print(f"validation loss {validation_loss(model, val, args.val_batches):.4f} "
          f"(uniform over bytes: {torch.log(torch.tensor(256.0)).item():.4f})")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
