"""Memory / speed / gradient-fidelity benchmark: velora_fx against eager, inductor and inductor's
own exact recompute (activation_memory_budget), on Llama-like and GPT-2-like models.

For each (model, regime): ms per training step (median), peak memory above the pre-step state,
activation bytes saved for backward (read with saved_tensors_hooks, which compiled graphs also go
through), and grad_W cosine similarity to an exact eager gradient on the same batch and weights.

    python benchmarks/bench_memory.py --out results/memory                      # GPU defaults
    python benchmarks/bench_memory.py --device cpu --layers 2 --hidden 64 --batch 2 --seq 64 --steps 2
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import REFERENCE_INCLUDE, LMLoss, build, linear_weights  # noqa: E402

import velora_fx  # noqa: E402
from velora_fx.reference import apply_velora  # noqa: E402

REGIMES = ("eager", "inductor", "inductor_budget_0.5", "velora_auto", "velora_all", "eager_reference")
GiB = 2**30


# -- measurement helpers ---------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def saved_activation_bytes(params):
    """Sum the bytes of unique storages saved for backward that are not parameters' storages.

    Compiled graphs (AOTAutograd's CompiledFunction) save through ``ctx.save_for_backward`` too,
    so the hooks see exactly what the partitioner kept (checked on CPU, torch 2.13, without a
    recompile).  Yields a dict whose ``"bytes"`` is filled in on exit.
    """
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    out = {"bytes": None, "tensors": 0}

    def pack(t):
        out["tensors"] += 1
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield out
    out["bytes"] = sum(storages.values())


def grad_cosines(weights: dict, reference: dict) -> dict:
    """Cosine of each weight matrix's gradient to the exact one; mean, min and where."""
    cos = {}
    for name, ref in reference.items():
        grad = weights[name].grad
        if grad is None:
            continue
        cos[name] = F.cosine_similarity(grad.float().flatten(), ref.to(grad.device).float().flatten(), dim=0).item()
    if not cos:
        return {"mean": None, "min": None, "argmin": None, "per_weight": {}}
    argmin = min(cos, key=cos.get)
    return {"mean": sum(cos.values()) / len(cos), "min": cos[argmin], "argmin": argmin, "per_weight": cos}


def exact_grads(base: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """Gradients of every linear weight from the eager model (same weights, upcast to ``dtype``)."""
    model = LMLoss(copy.deepcopy(base)).to(ids.device, dtype)
    model(ids).backward()
    grads = {name: w.grad.detach().to("cpu", torch.float32) for name, w in linear_weights(model).items()}
    del model
    return grads


# -- one regime ------------------------------------------------------------------------------
def prepare(regime: str, model_name: str, model: torch.nn.Module, args):
    """Returns (callable, backend or None, context manager active for the whole regime, notes)."""
    if regime == "eager":
        return model, None, contextlib.nullcontext(), {}
    if regime == "inductor":
        return torch.compile(model), None, contextlib.nullcontext(), {}
    if regime.startswith("inductor_budget_"):
        budget = float(regime.rsplit("_", 1)[1])
        patch = torch._functorch.config.patch(activation_memory_budget=budget)
        return torch.compile(model), None, patch, {"activation_memory_budget": budget}
    if regime.startswith(("velora_auto", "velora_all")):  # velora_<mode>[_budget_<x>]: composes with recompute
        mode, _, budget = regime[len("velora_"):].partition("_budget_")
        b = velora_fx.backend(num_groups=args.num_groups, mode=mode, compiler=args.compiler)
        ctx = torch._functorch.config.patch(activation_memory_budget=float(budget)) if budget else contextlib.nullcontext()
        notes = {"velora": b.config.to_dict(), **({"activation_memory_budget": float(budget)} if budget else {})}
        return torch.compile(model, backend=b), b, ctx, notes
    if regime == "eager_reference":
        include = REFERENCE_INCLUDE[model_name]
        wrapped = apply_velora(model, include=include, num_groups=args.num_groups, init="first_batch")
        return model, None, contextlib.nullcontext(), {"include": include, "wrapped": len(wrapped)}
    raise ValueError(f"unknown regime {regime!r}; known: {REGIMES} (or inductor_budget_<x>)")


def run_regime(regime: str, model_name: str, base: torch.nn.Module, ids: torch.Tensor, reference: dict, args) -> dict:
    device = ids.device
    model = LMLoss(copy.deepcopy(base)).to(device)
    fn, backend, ctx, notes = prepare(regime, model_name, model, args)
    params = list(model.parameters())
    weights = linear_weights(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    out: dict = {"notes": notes}

    def step(check=None):
        loss = fn(ids)
        loss.backward()
        if check is not None:
            check()
        optimizer.step()
        optimizer.zero_grad(set_to_none=not args.keep_grads)
        return loss

    with ctx:
        t0 = time.perf_counter()
        loss = step(check=lambda: out.update(grad_cos=grad_cosines(weights, reference)))
        sync(device)
        out["first_step_s"] = time.perf_counter() - t0  # includes dynamo + inductor compile
        out["first_loss"] = loss.item()
        for _ in range(args.warmup - 1):
            step()
        with saved_activation_bytes(params) as saved:
            step()
        out["saved_activation_bytes"] = saved["bytes"]
        out["saved_tensors"] = saved["tensors"]
        sync(device)
        if device.type == "cuda":
            gc.collect()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(args.steps):
            sync(device)
            t0 = time.perf_counter()
            loss = step()
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        out["ms_per_step"] = statistics.median(times)
        out["ms_all"] = times
        out["last_loss"] = loss.item()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            out.update(mem_before_GiB=before / GiB, peak_GiB=peak / GiB, peak_extra_GiB=(peak - before) / GiB)
        else:
            out.update(mem_before_GiB=None, peak_GiB=None, peak_extra_GiB=None)
    if backend is not None:
        report = backend.report()
        out["report"] = report.to_dict()
        out["report_saved_bytes_before"] = report.saved_bytes_before
        out["report_saved_bytes_after"] = report.saved_bytes_after
        out["compressed_sites"] = len(report.compressed)
        out["sites"] = len(report.sites)
        if args.verbose:
            print(report.table(), flush=True)
    return out


def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- summary ---------------------------------------------------------------------------------
def _ratio(a, b):
    return None if a is None or not b else a / b


def summarize(results: list[dict]) -> list[dict]:
    """One row per run with ratios to plain inductor of the same model in this run."""
    rows = []
    for r in results:
        base = next((x for x in results if x["model"] == r["model"] and x["regime"] == "inductor"
                     and x.get("status") == "ok"), None)
        row = {k: r.get(k) for k in ("model", "regime", "status", "ms_per_step", "peak_extra_GiB",
                                     "saved_activation_bytes", "first_step_s", "error")}
        row["grad_cos_mean"] = (r.get("grad_cos") or {}).get("mean")
        row["grad_cos_min"] = (r.get("grad_cos") or {}).get("min")
        for key in ("ms_per_step", "peak_extra_GiB", "saved_activation_bytes"):
            row[f"{key}_vs_inductor"] = _ratio(r.get(key), base.get(key)) if base else None
        rows.append(row)
    return rows


def _fmt(value, spec, ratio=None):
    if value is None:
        return "–"
    text = format(value, spec)
    return f"{text} ({ratio:.2f}×)" if ratio is not None else text


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | regime | ms/step (× inductor) | peak extra GiB (× inductor) | saved act. GiB (× inductor) "
             "| grad_W cos mean / min | first step s | status |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        saved = None if r["saved_activation_bytes"] is None else r["saved_activation_bytes"] / GiB
        cos = "–" if r["grad_cos_mean"] is None else f"{r['grad_cos_mean']:.4f} / {r['grad_cos_min']:.4f}"
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {(r.get('error') or '')[:80]}"
        lines.append(f"| {r['model']} | {r['regime']} | {_fmt(r['ms_per_step'], '.1f', r['ms_per_step_vs_inductor'])} "
                     f"| {_fmt(r['peak_extra_GiB'], '.2f', r['peak_extra_GiB_vs_inductor'])} "
                     f"| {_fmt(saved, '.3f', r['saved_activation_bytes_vs_inductor'])} | {cos} "
                     f"| {_fmt(r['first_step_s'], '.1f')} | {status} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Peak extra memory vs ms/step, one point per run (only if matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if r["status"] == "ok" and r["peak_extra_GiB"] is not None]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(7, 5))
    for model, marker in (("llama", "o"), ("gpt2", "s")):
        for r in (x for x in ok if x["model"] == model):
            ax.scatter(r["ms_per_step"], r["peak_extra_GiB"], marker=marker)
            ax.annotate(f"{model}:{r['regime']}", (r["ms_per_step"], r["peak_extra_GiB"]), fontsize=7)
    ax.set_xlabel("ms per step (median)")
    ax.set_ylabel("peak memory above pre-step state (GiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES),
                    help=f"subset of {REGIMES}; inductor_budget_<x> and velora_<mode>_budget_<x> take any budget")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "same"],
                    help="dtype of the exact eager gradient the cosines compare against")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=3, help="steps before timing (the first compiles)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--num-groups", type=int, default=32)
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                    help="velora_fx backend's compiler (eager: same rewrite, no codegen)")
    ap.add_argument("--keep-grads", action="store_true",
                    help="zero_grad(set_to_none=False): grads then count in the pre-step state, not the peak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    ap.add_argument("--verbose", action="store_true", help="print velora_fx explain tables")
    args = ap.parse_args()
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles and checks gradients)")

    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "velora_fx": velora_fx.__version__, "command": sys.argv,
            "config": {k: v for k, v in vars(args).items()}}
    results: list[dict] = []
    start = time.perf_counter()
    for model_name in args.models:
        torch.manual_seed(args.seed)
        base = build(model_name, args.hidden, args.layers, vocab=args.vocab,
                     max_positions=max(2048, args.seq)).to(dtype)
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(device)
        reference = exact_grads(base, ids, torch.float32 if args.ref_dtype == "float32" else dtype)
        cleanup(device)
        for regime in args.regimes:
            t0 = time.perf_counter()
            record = {**info, "model": model_name, "regime": regime,
                      "params": sum(p.numel() for p in base.parameters())}
            try:
                record.update(run_regime(regime, model_name, base, ids, reference, args), status="ok")
            except Exception as exc:  # noqa: BLE001 - record and go on with the next regime
                record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            record["wall_s"] = time.perf_counter() - t0
            cleanup(device)
            results.append(record)
            with open(os.path.join(args.out, f"{model_name}_{regime}.json"), "w") as fh:
                json.dump(record, fh, indent=1)
            cos = (record.get("grad_cos") or {}).get("min")
            print(f"[{time.perf_counter() - start:6.1f}s] {model_name:5s} {regime:20s} {record['status']:5s} "
                  f"ms={_fmt(record.get('ms_per_step'), '.1f')} peak+={_fmt(record.get('peak_extra_GiB'), '.3f')} GiB "
                  f"saved={_fmt(record.get('saved_activation_bytes'), 'd')} B cos_min={_fmt(cos, '.4f')} "
                  f"wall={record['wall_s']:.1f}s" + (f"  {record['error']}" if record["status"] != "ok" else ""),
                  flush=True)
            rows = summarize(results)  # rewritten after every run: a cut-off run still leaves a summary
            with open(os.path.join(args.out, "summary.json"), "w") as fh:
                json.dump({**info, "wall_s": time.perf_counter() - start, "rows": rows}, fh, indent=1)
            header = (f"bench_memory: {info['device']}, torch {info['torch']}, {args.dtype}, {args.layers} layers x "
                      f"{args.hidden} hidden, batch {args.batch} x {args.seq}, median of {args.steps} steps\n\n"
                      f"`{' '.join(sys.argv)}`")
            with open(os.path.join(args.out, "summary.md"), "w") as fh:
                fh.write(markdown(rows, header))
        del base, reference
        cleanup(device)
    plot(summarize(results), os.path.join(args.out, "memory_vs_time.png"))
    print(open(os.path.join(args.out, "summary.md")).read())


if __name__ == "__main__":
    main()
