"""Train a small ViT on scikit-learn's handwritten digits with the velora_fx backend.

Offline: ``sklearn.datasets.load_digits`` ships inside scikit-learn (1,797 grey 8x8 images of the
digits 0-9); the model is a random-init ``ViTForImageClassification`` (patch 2: 16 patches + CLS).
A fixed 80/20 train/validation split; validation accuracy is printed after every epoch.
``--compare`` trains the same model (same init, same batches) with plain ``torch.compile``.

The compiled module returns the loss, not the logits (``LossModule``); evaluation runs on the
uncompiled module (same weights, no extra compile).

    pip install scikit-learn                             # the data set
    python examples/vit_classify.py                      # small: ~30 s on 2 CPU cores, ~0.9 val accuracy
    python examples/vit_classify.py --compare            # + the same training with plain inductor
    python examples/vit_classify.py --compiler eager     # same rewrite, no codegen: fast to start
    python examples/vit_classify.py --size gpu --compare # hidden 768, 12 layers, batch 512 on CUDA
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import apply_size, print_runs, run_regimes, start_peak, summary, timed_step  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "small": dict(hidden=64, layers=2, heads=4, intermediate=128, batch_size=64, epochs=10, device="cpu"),
    "gpu": dict(hidden=768, layers=12, heads=12, intermediate=3072, batch_size=512, epochs=30, device="cuda"),
}


class LossModule(torch.nn.Module):
    """``forward(pixels, labels) -> loss``: the classifier head and cross-entropy are compiled too."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.model(pixel_values=pixels).logits.float(), labels)


def load_digits_split(val_fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_val, y_val)``: images as ``(N, 1, 8, 8)`` float, standardized with the
    training split's mean and std; a seeded permutation decides the split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("vit_classify.py needs scikit-learn for its data set (sklearn.datasets.load_digits): "
                 "pip install scikit-learn")
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = int(len(y) * val_fraction)
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return x[train], y[train], x[val], y[val]


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads,
                       intermediate_size=args.intermediate, num_labels=10, attn_implementation="sdpa")
    return ViTForImageClassification(config)


@torch.no_grad()
def evaluate(module: LossModule, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """``(loss, accuracy)`` over all of ``x``, on the uncompiled module."""
    was_training = module.training
    module.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        logits = module.model(pixel_values=xb).logits.float()
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(-1) == yb).sum().item()
    module.train(was_training)
    return loss_sum / len(y), correct / len(y)


def train(init: torch.nn.Module, data: tuple[torch.Tensor, ...], args: argparse.Namespace, backend: Any,
          label: str) -> dict[str, Any]:
    """Train a copy of ``init`` through ``torch.compile(..., backend=backend)``."""
    from tqdm.auto import tqdm
    x_train, y_train, x_val, y_val = data
    module = LossModule(copy.deepcopy(init)).to(args.device).train()
    compiled = torch.compile(module, backend=backend)
    optimizer = torch.optim.AdamW(module.parameters(), lr=args.lr, weight_decay=0.01)
    per_epoch = len(y_train) // args.batch_size  # full batches only: one compiled shape
    total = min(args.steps, per_epoch * args.epochs) if args.steps else per_epoch * args.epochs
    generator = torch.Generator().manual_seed(args.seed)  # the same batches for every regime
    cuda = start_peak(args.device)
    times, losses, history, step = [], [], [], 0
    with tqdm(total=total, desc=f"{label}: compiling", disable=args.quiet) as bar:
        for epoch in range(1, args.epochs + 1):
            order = torch.randperm(len(y_train), generator=generator)
            for b in range(per_epoch):
                if step == total:
                    break
                idx = order[b * args.batch_size:(b + 1) * args.batch_size]
                xb, yb = x_train[idx].to(args.device), y_train[idx].to(args.device)
                loss, seconds = timed_step(compiled, optimizer, xb, yb)
                losses.append(loss)
                times.append(seconds)
                step += 1
                if step == 1:
                    bar.set_description(f"{label}: epoch {epoch}")
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update()
            val_loss, val_acc = evaluate(module, x_val, y_val, args.batch_size)
            history.append({"epoch": epoch, "step": step, "train_loss": losses[-1], "val_loss": val_loss,
                            "val_acc": val_acc})
            bar.write(f"{label}: epoch {epoch:3d}  step {step:5d}  train loss {losses[-1]:.4f}  "
                      f"val loss {val_loss:.4f}  val accuracy {val_acc:.3f}")
            if step == total:
                break
            bar.set_description(f"{label}: epoch {epoch + 1}")
    return {**summary(label, times, losses, module, backend, cuda), "history": history,
            "val_loss": history[-1]["val_loss"], "val_acc": history[-1]["val_acc"]}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="preset for the flags below (small: 2 CPU cores; gpu: CUDA)")
    ap.add_argument("--compare", action="store_true", help="also train with plain torch.compile")
    ap.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                    help="velora_fx's code generator (eager: same rewrite, graphs run eagerly); the "
                         "--compare baseline uses backend 'inductor' or 'aot_eager' to match")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--steps", type=int, default=None, help="stop after this many steps (default: all epochs)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--device", help="default: cpu for --size small, cuda for --size gpu")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--mode", choices=("auto", "max_memory", "all"), default="auto", help="velora_fx mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    apply_size(ap, args, SIZES)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()
    data = load_digits_split(args.val_fraction, args.seed)
    if len(data[1]) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(data[1])} training images")
    torch.manual_seed(args.seed)
    init = build_model(args)
    print(f"data: sklearn digits, {len(data[1])} train / {len(data[3])} val images (1x8x8, 10 classes) | "
          f"model: ViT {sum(p.numel() for p in init.parameters()) / 1e6:.3f} M params (hidden {args.hidden}, "
          f"{args.layers} layers, patch 2) on {args.device}")

    runs = run_regimes(args, lambda backend, label: train(init, data, args, backend, label))
    print_runs(runs, [("val acc", "val_acc", ".3f"), ("val loss", "val_loss", ".4f"),
                      ("train loss", "train_loss", ".4f")])
    report = runs[0]["report"]
    total = time.perf_counter() - start
    print(f"\ntotal {total:.1f} s")
    return {"runs": runs, "report": report, "total_s": total}


if __name__ == "__main__":
    main(sys.argv[1:])
