"""Short quality run: does training with velora_fx reach the loss of exact training?

A byte-level Llama-like LM on the Python standard library's sources (``velora_fx.data``), the
same initial weights, data order and schedule for every regime; validation loss on fixed
held-out batches every ``--eval-every`` steps.  The exact anchor is plain inductor.

    python benchmarks/quality.py --out results/quality                  # GPU defaults (6 x 512, 1500 steps)
    python benchmarks/quality.py --device cpu --steps 10 --layers 1 --hidden 64 --batch 4 --eval-every 5

Budget: on an H100 the 6 x 512 model at batch 32 x 256 is launch-bound (roughly 10-20 ms per
step), so 1500 steps take well under a minute per regime and the inductor compile (~30-60 s)
dominates; 3 regimes should fit in about 6 minutes.  If not, lower --steps (the schedule scales).
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import REFERENCE_INCLUDE, LMLoss, llama_like  # noqa: E402

import velora_fx  # noqa: E402
from velora_fx.data import byte_lm_batches, stdlib_text  # noqa: E402
from velora_fx.reference import apply_velora  # noqa: E402

REGIMES = ("inductor", "velora_auto", "velora_all")
EXTRA_REGIMES = ("eager", "velora_paper", "eager_reference")
EXACT = "inductor"


def prepare(regime: str, model: torch.nn.Module, args):
    """The callable to train with, and the velora_fx backend (if any) for its report."""
    if regime == "eager":
        return model, None
    if regime == "inductor":
        return torch.compile(model), None
    if regime.startswith("velora_"):
        options = dict(num_groups=args.num_groups, compiler=args.compiler)
        if regime == "velora_paper":  # the paper's LLaMA sites (v_proj, down_proj), all of them
            options.update(mode="all", include=REFERENCE_INCLUDE["llama"])
        else:
            options.update(mode=regime.split("_", 1)[1])
        backend = velora_fx.backend(**options)
        return torch.compile(model, backend=backend), backend
    if regime == "eager_reference":
        apply_velora(model, include=REFERENCE_INCLUDE["llama"], num_groups=args.num_groups, init="first_batch")
        return model, None
    raise ValueError(f"unknown regime {regime!r}; known: {REGIMES + EXTRA_REGIMES}")


def lr_lambda(args):
    """Linear warmup, then cosine decay to 10 % of the peak learning rate."""
    warmup = max(1, min(args.warmup, args.steps // 10))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_batches, autocast) -> float:
    """Mean validation loss on the uncompiled module (same weights, no inference compile)."""
    model.eval()
    with autocast():
        losses = [model(x, y).float() for x, y in val_batches]
    model.train()
    return torch.stack(losses).mean().item()


def run_regime(regime: str, base: torch.nn.Module, text: bytes, val_batches, args) -> dict:
    device = torch.device(args.device)
    model = copy.deepcopy(base).to(device)
    fn, backend = prepare(regime, model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    train = byte_lm_batches(text, args.batch, args.seq, split="train", seed=args.seed, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    curve = {"step": [], "val_loss": [], "train_loss": []}
    pending: list[torch.Tensor] = []
    out: dict = {}
    t_start = time.perf_counter()
    train_time = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        x, y = next(train)
        with autocast():
            loss = fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())
        if step == 1:
            pending[-1].item()  # sync: the first step (with the compile) is timed on its own
            out["first_step_s"] = time.perf_counter() - t0
            t_mark = time.perf_counter()
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = torch.stack(pending).float().mean().item()  # syncs
            train_time += time.perf_counter() - t_mark
            pending.clear()
            val = evaluate(model, val_batches, autocast)
            curve["step"].append(step)
            curve["val_loss"].append(val)
            curve["train_loss"].append(train_loss)
            print(f"  {regime:16s} step {step:5d}  train {train_loss:.4f}  val {val:.4f}", flush=True)
            t_mark = time.perf_counter()
    out.update(curve=curve, final_val_loss=curve["val_loss"][-1], wall_s=time.perf_counter() - t_start,
               ms_per_step=1e3 * train_time / max(1, args.steps - 1))
    if backend is not None:
        report = backend.report()
        out.update(report=report.to_dict(), compressed_sites=len(report.compressed), sites=len(report.sites),
                   report_saved_bytes_before=report.saved_bytes_before,
                   report_saved_bytes_after=report.saved_bytes_after)
    return out


def markdown(records: list[dict], header: str) -> str:
    exact = next((r for r in records if r["regime"] == EXACT and r["status"] == "ok"), None)
    lines = [header, "", "| regime | final val loss | vs exact (inductor) | ms/step | sites compressed | status |",
             "|---|---|---|---|---|---|"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['regime']} | – | – | – | – | error: {r['error'][:80]} |")
            continue
        rel = (f"{100 * (r['final_val_loss'] / exact['final_val_loss'] - 1):+.2f} %" if exact else "–")
        sites = f"{r['compressed_sites']} / {r['sites']}" if "sites" in r else "–"
        lines.append(f"| {r['regime']} | {r['final_val_loss']:.4f} | {rel} | {r['ms_per_step']:.1f} | {sites} | ok |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES + EXTRA_REGIMES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (at most steps / 10)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--num-groups", type=int, default=32)
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "eager"])
    ap.add_argument("--no-autocast", action="store_true", help="train in fp32 (default: bf16 autocast)")
    ap.add_argument("--max-bytes", type=int, default=None, help="truncate the stdlib text (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/quality")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    text = stdlib_text(args.max_bytes)
    val_gen = byte_lm_batches(text, args.batch, args.seq, split="val", seed=args.seed + 1, device=device)
    val_batches = [next(val_gen) for _ in range(args.val_batches)]
    torch.manual_seed(args.seed)
    heads = min(args.heads, max(1, args.hidden // 16))
    base = LMLoss(llama_like(args.hidden, args.layers, heads=heads, intermediate=args.intermediate,
                             max_positions=max(512, args.seq)))
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "velora_fx": velora_fx.__version__, "command": sys.argv,
            "config": vars(args), "text_bytes": len(text), "params": sum(p.numel() for p in base.parameters())}
    print(f"{info['device']}: {len(text) / 1e6:.1f} MB text, {info['params'] / 1e6:.1f} M params", flush=True)
    records = []
    for regime in args.regimes:
        record = {**info, "regime": regime}
        try:
            record.update(run_regime(regime, base, text, val_batches, args), status="ok")
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next regime
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"  {regime}: {record['error']}", flush=True)
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        records.append(record)
        with open(os.path.join(args.out, f"quality_{regime}.json"), "w") as fh:
            json.dump(record, fh, indent=1)
        exact = next((r for r in records if r["regime"] == EXACT and r["status"] == "ok"), None)
        summary = {**info, "final_val_loss": {r["regime"]: r.get("final_val_loss") for r in records},
                   "relative_to_exact": {r["regime"]: (r["final_val_loss"] / exact["final_val_loss"] - 1)
                                         for r in records if exact and r["status"] == "ok"}}
        with open(os.path.join(args.out, "quality_summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
        header = (f"quality: {info['device']}, torch {info['torch']}, byte-level Llama-like {args.layers} x "
                  f"{args.hidden}, batch {args.batch} x {args.seq}, {args.steps} steps, "
                  f"{'fp32' if args.no_autocast else 'bf16 autocast'}\n\n`{' '.join(sys.argv)}`")
        with open(os.path.join(args.out, "quality_summary.md"), "w") as fh:
            fh.write(markdown(records, header))
    print(open(os.path.join(args.out, "quality_summary.md")).read())


if __name__ == "__main__":
    main()
