"""LoRA fine-tuning quality (issue 7): what velora_fx's compressed LoRA costs in validation loss
against exact LoRA and against PEFT's own VeLoRA variant, and what it buys in memory and time.

Why: velora_fx approximates the weight gradients of the LoRA A matrices (their saved inputs are
stored as rank-1 sub-token projections).  The memory benchmarks (run.py, bench_memory.py) show
the bytes; this run shows whether a model fine-tuned that way is as good, on a task with a real
distribution shift, with every other variable held fixed.

How (everything offline, ``examples/finetune_lora.py``'s pieces, imported, not copied):

1. **Pre-train once, exactly** (eager, all weights) a random-init byte-level Llama-like LM on the
   standard library's ``.py`` sources minus ``pydoc_data/topics.py``; keep that base.
2. **Fine-tune** for every seed in ``--seeds`` every regime from that same base, with the same LoRA
   init (PEFT r=8, alpha 16, on q/k/v/o/gate/up/down) and the same batches, on a corpus the
   pre-training never saw: the Python Language Reference help texts (``pydoc_data.topics``).

* ``inductor``: exact LoRA, ``torch.compile(backend="inductor")`` (``aot_eager`` under
  ``--compiler eager``); the anchor of every Δ and ratio.
* ``peft_velora``: PEFT's VeLoRA variant, ``LoraConfig(velora_config=VeloraConfig(num_groups=32,
  init_type="batch_average_once"))``, run **uncompiled** (its autograd.Function is the eager path);
  recorded as unavailable where peft has no ``VeloraConfig``.
* ``velora_auto``: the exact LoRA model through ``velora_fx.backend(mode="auto")``.
* ``velora_max_memory``: the same through ``velora_fx.backend(mode="max_memory")`` (every site
  that frees bytes, at 32 groups).

Opt-in regimes (``--regimes``), for the question a large paired difference on one seed raises (bias
or noise?):

* ``exact_eager``: exact LoRA, uncompiled: the same math with other floating-point rounding.  Its
  Δ to ``inductor`` is the noise floor of the paired difference (fine-tuning amplifies rounding).
* ``velora_site=<glob>``: ``velora_fx.backend(mode="all", include=[<glob>])``: one site kind
  compressed at the default size, e.g. ``velora_site=*q_proj.lora_A*`` (a per-site ablation; under
  LoRA the sites are the adapters' A and B projections, and B's r-wide input has no room for 32
  groups: ``mode="all"`` refuses it with a ConfigError)..

Recorded per regime and seed: validation loss before (LoRA at init: the base) and after, the last
training loss, median step time (first step excluded) and the first step (compile) time, CUDA peak
memory of the steps after the first above what was allocated after it (base + its copy + adapters +
optimizer state; the first step, which compiles and calibrates, is recorded apart), trainable
parameters, and velora_fx's report (sites compressed, saved activation bytes before/after).
Per regime: means over seeds, validation loss Δ vs exact LoRA, ratios of time and memory to it.
On CUDA the fp32 matmuls use TF32 (``--matmul-precision high``), the same for every regime.

    python benchmarks/lora_quality.py --compiler eager --out /tmp/lq               # CPU smoke, ~40 s on 2 cores
    python benchmarks/lora_quality.py --size gpu --out results/lora_quality        # one H100, ~4-5 min

``--deadline SECONDS`` (from process start; the gpu preset: 480) starts a fine-tune only if its
expected time fits; what does not is recorded as skipped.  ``<out>/lora_quality.json`` (device,
versions, command, every run, the per-regime summary) and ``<out>/lora_quality.md`` (the table) are
rewritten after every run, so a run cut off keeps what it measured.
"""
from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: --deadline counts the whole process

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
for _p in (_HERE, os.path.join(os.path.dirname(_HERE), "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_memory as bm  # noqa: E402
import finetune_lora as fl  # noqa: E402
import run as runner  # noqa: E402
from quality import _write_json  # noqa: E402
from _harness import apply_size  # noqa: E402

import velora_fx  # noqa: E402

REGIMES = ("inductor", "peft_velora", "velora_auto", "velora_max_memory")
OPT_IN = ("exact_eager",)  # and velora_site=<glob>
SITE_PREFIX = "velora_site="
ANCHOR = "inductor"
DESCRIPTIONS = {
    "inductor": "exact LoRA, torch.compile({plain})",
    "exact_eager": "exact LoRA, uncompiled (other float rounding: its delta to inductor is the noise floor)",
    "peft_velora": "PEFT VeloraConfig(num_groups={groups}, init_type=batch_average_once), uncompiled (eager)",
    "velora_auto": "velora_fx.backend(mode=auto{compiler})",
    "velora_max_memory": "velora_fx.backend(mode=max_memory{compiler})",
}

# --size presets; any flag given on the command line wins.  "gpu": pre-training ~400 x 8192 tokens
# and 8 fine-tunes of 200 steps on one H100 with 3 compiles per seed, ~4-5 min in all.
SIZES: dict[str, dict[str, Any]] = {
    "small": dict(hidden=64, layers=2, heads=4, intermediate=192, seq_len=64, batch_size=8,
                  pretrain_steps=150, steps=60, val_batches=8, device="cpu", deadline=None,
                  matmul_precision="highest", compile_estimate=20.0),
    "gpu": dict(hidden=768, layers=8, heads=12, intermediate=2048, seq_len=512, batch_size=16,
                pretrain_steps=400, steps=200, val_batches=16, device="cuda", deadline=480.0,
                matmul_precision="high", compile_estimate=40.0),
}


# -- one fine-tune ---------------------------------------------------------------------------
def regime_backend(regime: str, args: argparse.Namespace) -> tuple[Any, bool]:
    """(what ``finetune`` compiles with, or None: uncompiled; whether it is PEFT's VeLoRA)."""
    if regime == "inductor":
        return ("inductor" if args.compiler == "inductor" else "aot_eager"), False
    if regime == "peft_velora":
        return None, True
    if regime == "exact_eager":
        return None, False
    if regime.startswith(SITE_PREFIX):
        return velora_fx.backend(mode="all", include=[regime.removeprefix(SITE_PREFIX)], compiler=args.compiler), False
    mode = regime.removeprefix("velora_")
    return velora_fx.backend(mode=mode, compiler=args.compiler), False


def describe(regime: str, args: argparse.Namespace) -> str:
    plain = "inductor" if args.compiler == "inductor" else "aot_eager"
    compiler = "" if args.compiler == "inductor" else f", compiler={args.compiler}"
    if regime.startswith(SITE_PREFIX):
        return f"velora_fx.backend(mode=all, include=['{regime.removeprefix(SITE_PREFIX)}']{compiler})"
    return DESCRIPTIONS[regime].format(plain=plain, compiler=compiler, groups=args.num_groups or 32)


def regime_name(value: str) -> str:
    """``--regimes`` values: the named regimes, or ``velora_site=<glob>``."""
    if value in REGIMES or value in OPT_IN or (value.startswith(SITE_PREFIX) and len(value) > len(SITE_PREFIX)):
        return value
    raise argparse.ArgumentTypeError(f"unknown regime {value!r}: one of {[*REGIMES, *OPT_IN]} or "
                                     f"{SITE_PREFIX}<glob of site names>")


def report_summary(report: velora_fx.Report | None) -> dict | None:
    """velora_fx's report as numbers: sites, compressed sites, graphs, saved bytes before/after,
    the compressed sites with their codec settings, and the printed table."""
    if report is None:
        return None
    from velora_fx.integrations import report_metrics
    return {**report_metrics(report, prefix=""),
            "compressed": [{"name": s.name, "setting": s.setting, "estimated_error": s.estimated_error}
                           for s in report.compressed],
            "table": report.table()}


def finetune_run(base: torch.nn.Module, text: bytes, args: argparse.Namespace, regime: str, seed: int) -> dict:
    """One regime, one seed: ``finetune_lora.finetune`` on a copy of ``base``, as a record."""
    backend, peft_velora = regime_backend(regime, args)
    seeded = argparse.Namespace(**{**vars(args), "seed": seed})
    t0 = time.perf_counter()
    result = fl.finetune(base, text, seeded, backend, regime, velora=peft_velora, val_before=True)
    peak, step_s = result.pop("peak_mem_bytes"), result.pop("step_s")
    result.update(status="ok", compiled=backend is not None, wall_s=time.perf_counter() - t0, step_ms=step_s * 1e3,
                  peak_bytes=peak, peak_extra_bytes=None if peak is None else peak - result["resident_bytes"],
                  report=report_summary(result["report"]))
    return result


def expected_seconds(regime: str, runs: list[dict], args: argparse.Namespace, pretrain_step_s: float) -> float:
    """What a fine-tune of ``regime`` should take: its compile (as measured for it before, else
    the longest compile so far, at least ``--compile-estimate``; 2 s uncompiled) plus its steps at
    the step time measured for it (else the slowest so far, else the pre-training's) and the two
    validations (a forward: ~1/3 of a step each batch)."""
    ok = [r for r in runs if r["status"] == "ok"]
    mine = [r for r in ok if r["regime"] == regime]
    if regime in ("peft_velora", "exact_eager"):
        compile_s = 2.0
    else:
        compiled = [r["first_step_s"] for r in ok if r["compiled"]]
        compile_s = max([r["first_step_s"] for r in mine] or [max([args.compile_estimate] + compiled)])
    step_s = max([r["step_ms"] / 1e3 for r in (mine or ok)] or [pretrain_step_s])
    return compile_s + args.steps * step_s + 2 * args.val_batches * step_s / 3


# -- summary and output ----------------------------------------------------------------------
def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[dict], regimes: Sequence[str]) -> list[dict]:
    """One row per regime: means over its ok seeds, and against exact LoRA (``inductor``) over the
    seeds both have: Δ val loss in %, loss drop (before - after) as % of exact LoRA's, ratios."""
    rows = []
    anchor = {r["seed"]: r for r in runs if r["regime"] == ANCHOR and r["status"] == "ok"}
    for regime in regimes:
        mine = [r for r in runs if r["regime"] == regime]
        ok = [r for r in mine if r["status"] == "ok"]
        paired = [(r, anchor[r["seed"]]) for r in ok if r["seed"] in anchor]
        row = {"regime": regime, "seeds": [r["seed"] for r in ok], "val_loss_per_seed": [r["val_loss"] for r in ok],
               "status": ", ".join(f"{s} {sum(r['status'] == s for r in mine)}/{len(mine)}"
                                   for s in dict.fromkeys(r["status"] for r in mine)) or "not run",
               "notes": sorted({bm._status_cell(r) for r in mine if r["status"] != "ok"})}
        for key in ("val_loss_before", "val_loss", "train_loss", "step_ms", "first_step_s", "peak_extra_bytes",
                    "trainable_params"):
            row[key] = _mean([r.get(key) for r in ok])
        row["first_step_s_per_seed"] = [r["first_step_s"] for r in ok]
        reports = [r["report"] for r in ok if r.get("report")]
        for key in ("sites", "compressed_sites", "saved_bytes_before", "saved_bytes_after"):
            row[key] = _mean([rep[key] for rep in reports]) if reports else None
        if paired:
            mine_loss, exact_loss = _mean([a["val_loss"] for a, _ in paired]), _mean([b["val_loss"] for _, b in paired])
            drop = _mean([a["val_loss_before"] - a["val_loss"] for a, _ in paired])
            exact_drop = _mean([b["val_loss_before"] - b["val_loss"] for _, b in paired])
            row.update(paired_seeds=[a["seed"] for a, _ in paired],
                       delta_vs_inductor_pct=100 * (mine_loss / exact_loss - 1),
                       loss_drop_vs_inductor_pct=100 * drop / exact_drop if exact_drop else None,
                       step_vs_inductor=_ratio(_mean([a["step_ms"] for a, _ in paired]),
                                               _mean([b["step_ms"] for _, b in paired])),
                       peak_vs_inductor=_ratio(_mean([a["peak_extra_bytes"] for a, _ in paired]),
                                               _mean([b["peak_extra_bytes"] for _, b in paired])))
        rows.append(row)
    return rows


def _with_ratio(value: float | None, spec: str, ratio: float | None) -> str:
    return bm._fmt(value, spec) + (f" ({ratio:.2f}×)" if value is not None and ratio is not None else "")


def summary_markdown(doc: dict) -> str:
    cfg, model, pre = doc["config"], doc.get("model", {}), doc.get("pretrain", {})
    lines = [f"# LoRA fine-tuning quality: {doc['device']}, torch {doc['torch']}", "", f"`{doc['command']}`", "",
             "transformers {transformers}, peft {peft}, velora_fx {velora_fx}, commit {commit}, wall {wall} s".format(
                 transformers=doc["versions"].get("transformers"), peft=doc["versions"].get("peft"),
                 velora_fx=doc["versions"].get("velora_fx"), commit=doc.get("git_commit"),
                 wall=bm._fmt(doc.get("wall_s"), ".0f")), ""]
    if model:
        lines += [f"Model: byte-level Llama-like {cfg['layers']} x {cfg['hidden']} (heads {cfg['heads']}, intermediate "
                  f"{cfg['intermediate']}), {model['params'] / 1e6:.2f} M parameters, fp32 on {cfg['device']} "
                  f"(matmul precision {cfg['matmul_precision']}). Pre-trained exactly (eager AdamW lr "
                  f"{cfg['pretrain_lr']:g}) for {cfg['pretrain_steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} "
                  f"on {doc['data']['pretrain']}: last train loss {bm._fmt(pre.get('train_loss'), '.4f')}, fine-tune "
                  f"val loss {bm._fmt(pre.get('val_loss'), '.4f')} (uniform: {math.log(256):.4f}).", "",
                  f"Fine-tune: PEFT LoRA r={cfg['rank']} (alpha {2 * cfg['rank']}) on {', '.join(fl.LORA_TARGETS)}, "
                  f"AdamW lr {cfg['lr']:g}, {cfg['steps']} steps x {cfg['batch_size']} x {cfg['seq_len']} on "
                  f"{doc['data']['finetune']}; seeds {cfg['seeds']} (LoRA init and batch order); validation: "
                  f"{cfg['val_batches']} fixed held-out batches per seed.", ""]
    header = ["regime", "runs as", "val loss before", "val loss after: mean (per seed)", "Δ vs exact LoRA",
              "loss drop vs exact", "ms/step (× inductor)", "peak extra MiB (× inductor)", "first step s (per seed)",
              "sites compressed", "saved act. MiB before → after", "status"]
    rows = []
    for row in doc.get("summary", []):
        per_seed = ", ".join(f"{v:.4f}" for v in row["val_loss_per_seed"])
        peak = None if row["peak_extra_bytes"] is None else row["peak_extra_bytes"] / 2**20
        saved = ("–" if row["saved_bytes_before"] is None else
                 f"{row['saved_bytes_before'] / 2**20:.1f} → {row['saved_bytes_after'] / 2**20:.1f}")
        sites = "–" if row["sites"] is None else f"{row['compressed_sites']:.0f} / {row['sites']:.0f}"
        delta, drop = row.get("delta_vs_inductor_pct"), row.get("loss_drop_vs_inductor_pct")
        status = row["status"] + "".join(f"; {n}" for n in row["notes"])
        rows.append([row["regime"], doc["regimes"][row["regime"]], bm._fmt(row["val_loss_before"], ".4f"),
                     f"{bm._fmt(row['val_loss'], '.4f')} ({per_seed})" if per_seed else "–",
                     bm._fmt(delta, "+.2f") + (" %" if delta is not None else ""),
                     bm._fmt(drop, ".1f") + (" %" if drop is not None else ""),
                     _with_ratio(row["step_ms"], ".1f", row.get("step_vs_inductor")),
                     _with_ratio(peak, ".1f", row.get("peak_vs_inductor")),
                     ", ".join(f"{s:.1f}" for s in row["first_step_s_per_seed"]) or "–", sites, saved,
                     status.replace("|", "/").replace("\n", " ")])
    lines += bm._table(header, rows)
    lines += ["", "Δ vs exact LoRA: mean val loss after over the seeds both ran, relative to `inductor`'s. Loss drop "
                  "vs exact: (before − after) as % of exact LoRA's (100 %: the same improvement). Peak extra: CUDA "
                  "max_memory_allocated over the fine-tune's steps after the first, minus what was allocated after "
                  "the first (activations and gradients, above weights and optimizer state; the first step, which "
                  "compiles and calibrates, is in the JSON as first_step_peak_extra_bytes); – on CPU. First step "
                  "includes the compile (a later seed may hit inductor's caches). Sites and saved bytes: velora_fx's "
                  "report (`backend.report(module)`)."]
    if doc.get("aborted"):
        lines += ["", f"**{doc['aborted']}**"]
    return "\n".join(lines) + "\n"


def save(doc: dict, out: str) -> None:
    """Rewrite lora_quality.json (atomically: a kill mid-write keeps the previous one) and .md."""
    doc["wall_s"] = time.perf_counter() - START
    doc["summary"] = summarize(doc["runs"], doc["config"]["regimes"])
    _write_json(os.path.join(out, "lora_quality.json"), doc)
    with open(os.path.join(out, "lora_quality.md"), "w") as fh:
        fh.write(summary_markdown(doc))


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="small",
                    help="preset for the model / data / time flags (small: CPU; gpu: one H100, ~4-5 min)")
    ap.add_argument("--out", default="results/lora_quality", help="folder for lora_quality.json and .md")
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), type=regime_name,
                    help=f"in run order: {', '.join(REGIMES)} (default), or opt-in {', '.join(OPT_IN)}, "
                         f"{SITE_PREFIX}<glob>")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1],
                    help="fine-tune seeds (LoRA init, batch order, validation batches); the first also pre-trains")
    ap.add_argument("--pretrain-seed", type=int,
                    help="seed of the base model's init and pre-training batches (default: the first of --seeds); "
                         "processes that split the seeds between them pass the same one to share the base")
    ap.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                    help="velora_fx's code generator; the inductor regime uses 'inductor' or 'aot_eager' to match")
    ap.add_argument("--deadline", type=float, help="seconds from start: a fine-tune that would end later is skipped")
    ap.add_argument("--compile-estimate", type=float,
                    help="seconds a compile is assumed to take before one is measured (small: 20, gpu: 40)")
    for flag in ("steps", "pretrain_steps", "batch_size", "seq_len", "hidden", "layers", "heads", "intermediate",
                 "val_batches"):
        ap.add_argument("--" + flag.replace("_", "-"), type=int)
    ap.add_argument("--device", help="default: cpu for --size small, cuda for --size gpu")
    ap.add_argument("--matmul-precision", choices=("highest", "high", "medium"),
                    help="torch.set_float32_matmul_precision (gpu preset: high = TF32)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--num-groups", type=int, default=None, help="PEFT VeLoRA's num_groups (default 32)")
    ap.add_argument("--lr", type=float, default=2e-3, help="LoRA learning rate")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3)
    ap.add_argument("--progress", action="store_true", help="progress bars")
    args = ap.parse_args(argv)
    apply_size(ap, args, SIZES)
    args.quiet = not args.progress
    args.seed = args.seeds[0] if args.pretrain_seed is None else args.pretrain_seed
    args.regimes = list(dict.fromkeys(args.regimes))
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    doc = {**runner.run_info(args, device), "runner": "benchmarks/lora_quality.py",
           "main_argv": list(sys.argv[1:] if argv is None else argv), "deadline_s": args.deadline,
           "regimes": {r: describe(r, args) for r in args.regimes}, "runs": []}
    doc["config"] = {k: v for k, v in vars(args).items() if k != "quiet"}
    torch.manual_seed(args.seed)
    pre_text, ft_text = fl.pretrain_corpus(), fl.finetune_corpus()
    doc["data"] = {"pretrain": f"stdlib .py sources minus pydoc_data/topics.py ({len(pre_text) / 1e6:.1f} MB)",
                   "finetune": f"pydoc_data.topics, the Language Reference help texts ({len(ft_text) / 1e6:.2f} MB)"}
    base = fl.build_model(args).to(device)
    doc["model"] = {"params": sum(p.numel() for p in base.parameters()), "config": base.config.to_dict()}
    bm.log(START, f"{doc['device']}: {doc['model']['params'] / 1e6:.2f} M params ({args.layers} x {args.hidden}, "
                  f"seq {args.seq_len}, batch {args.batch_size}); out {args.out}")
    save(doc, args.out)

    t0 = time.perf_counter()
    pre_loss = fl.pretrain(base, pre_text, args) if args.pretrain_steps > 0 else float("nan")
    pretrain_s = time.perf_counter() - t0
    base.eval()
    doc["pretrain"] = {"train_loss": pre_loss, "seconds": pretrain_s,
                       "val_loss": fl.validation_loss(fl.LossModule(base), ft_text, args)}
    pretrain_step_s = pretrain_s / max(1, args.pretrain_steps)
    bm.log(START, f"pre-trained {args.pretrain_steps} steps in {pretrain_s:.1f} s: train loss {pre_loss:.4f}, "
                  f"fine-tune val loss {doc['pretrain']['val_loss']:.4f}")
    save(doc, args.out)

    peft_reason = (runner.unavailable(runner.parse_variant("peft_velora"), "llama", "lora", device)
                   if "peft_velora" in args.regimes else None)
    for seed in args.seeds:
        for regime in args.regimes:
            record = {"regime": regime, "seed": seed, "runs_as": doc["regimes"][regime]}
            expected = expected_seconds(regime, doc["runs"], args, pretrain_step_s)
            elapsed = time.perf_counter() - START
            if doc.get("aborted"):
                record.update(status="skipped", note=doc["aborted"])
            elif regime == "peft_velora" and peft_reason:
                record.update(status="unavailable", note=peft_reason)
            elif args.deadline is not None and elapsed + expected > args.deadline:
                record.update(status="skipped", note=f"not started: at {elapsed:.0f} s, expected {expected:.0f} s "
                                                     f"more, past --deadline {args.deadline:g} s")
            else:
                bm.cleanup(device)
                try:
                    record.update(finetune_run(base, ft_text, args, regime, seed))
                except Exception as exc:  # noqa: BLE001 - recorded; the other regimes still run
                    record.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                                  traceback=traceback.format_exc())
                    if device.type == "cuda":
                        try:
                            torch.cuda.synchronize(device)
                        except Exception:  # noqa: BLE001 - a sticky CUDA error: nothing later can run
                            doc["aborted"] = f"stopped: the CUDA context was lost in {regime} seed {seed}"
            doc["runs"].append(record)
            if record["status"] == "ok":
                bm.log(START, f"{regime:18s} seed {seed}: val loss {record['val_loss_before']:.4f} -> "
                              f"{record['val_loss']:.4f} (train, last 20 steps: "
                              f"{statistics.fmean(record['train_losses'][-20:]):.4f}; adapter norm "
                              f"{record['trainable_norm']:.2f}), {record['step_ms']:.1f} ms/step, first step "
                              f"{record['first_step_s']:.1f} s, peak extra "
                              + ("n/a (CPU)" if record["peak_extra_bytes"] is None
                                 else f"{record['peak_extra_bytes'] / 2**20:.1f} MiB"))
            else:
                bm.log(START, f"{regime:18s} seed {seed}: {bm._status_cell(record)}")
            save(doc, args.out)
    bm.cleanup(device)
    save(doc, args.out)
    print("\n" + summary_markdown(doc), flush=True)
    bm.log(START, f"done: {os.path.join(args.out, 'lora_quality.json')}")
    return doc


if __name__ == "__main__":
    main()
