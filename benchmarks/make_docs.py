"""Render benchmark result directories into docs/benchmarks.md and PNGs, so that the published
tables are produced from the JSON, never typed.

Reads run.py's ``run.json`` and bench_memory.py's outputs (``summary.json``, or the per-regime
``<model>_<regime>.json`` of older runs), in any directories given (searched recursively).
Per model / regime / size: one table per run, with ratios to plain inductor *of that run* and the
command that made it; a Pareto plot (peak vs step time, as ratios to inductor) per model / regime /
size; where run.py ``--scaling`` measured them, a table per memory limit of the longest sequence
that trains and a bar plot of it.  Combinations with no
numbers say "not measured yet".

    python benchmarks/make_docs.py results/gpu results/bench --out-md docs/benchmarks.md --img-dir docs/img
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections import defaultdict

GiB = 2**30
ANCHOR = "inductor"
EXPECTED = [(m, r, "12x1024") for m in ("llama", "gpt2") for r in ("full", "lora")]  # the anchors
MODEL_NAMES = {"llama": "Llama-like", "gpt2": "GPT-2-like"}
REGIME_NAMES = {"full": "full training", "lora": "PEFT LoRA r=32, base frozen"}


# -- loading ---------------------------------------------------------------------------------
def _command(doc: dict) -> str:
    """The recorded command as one string (older bench_memory JSON kept ``sys.argv`` as a list)."""
    command = doc.get("command")
    if isinstance(command, list):
        return "python " + shlex.join(command)
    return command or "(command not recorded)"


def _load(path: str):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


CUDA_GRAPHS = "+ro"


def _entry(run: dict, row: dict) -> dict:
    """One variant's numbers in one shape, whatever wrote them.  ``+ro`` (CUDA graph) peaks are
    dropped: replays bypass the caching allocator, so they read as ~0 and are not comparable."""
    cos = row.get("grad_cos") if isinstance(row.get("grad_cos"), dict) else {}
    ms = row.get("ms_per_step")
    name = row.get("regime") or row.get("variant") or "?"
    ro = name.endswith(CUDA_GRAPHS)
    ro_ratio = (row.get("vs_inductor+ro") or {}).get("ms_per_step") if ro else None
    tokens = run["batch"] * run["seq"] if run.get("batch") and run.get("seq") else None
    notes = [row.get("error") or row.get("note")] + (["CUDA graphs: peak not comparable"] if ro and ms else [])
    notes += [f"ms × inductor+ro {ro_ratio:.2f}"] if ro_ratio else []
    return {"variant": name, "status": row.get("status") or "ok", "note": "; ".join(n for n in notes if n) or None,
            "clean": not (row.get("error") or row.get("note")) and (row.get("status") or "ok") == "ok",
            "ms_per_step": ms, "host_ms_per_step": row.get("host_ms_per_step"),
            "peak_extra_GiB": None if ro else row.get("peak_extra_GiB"), "saved_bytes": row.get("saved_activation_bytes"),
            "first_step_s": row.get("first_step_s"),
            "tokens_per_s": row.get("tokens_per_s") or (tokens / ms * 1e3 if tokens and ms else None),
            "grad_cos_mean": row.get("grad_cos_mean", cos.get("mean")),
            "grad_cos_min": row.get("grad_cos_min", cos.get("min"))}


def _run(doc: dict, source: str, model: str, regime: str, cfg: dict, rows: list[dict], writer: str) -> dict:
    run = {"source": source, "writer": writer, "command": _command(doc), "device": doc.get("device"),
           "torch": doc.get("torch"), "git_commit": doc.get("git_commit"), "model": model, "regime": regime,
           "size": f"{cfg.get('layers')}x{cfg.get('hidden')}", "vocab": cfg.get("vocab"), "batch": cfg.get("batch"),
           "seq": cfg.get("seq"), "dtype": cfg.get("dtype"), "call": cfg.get("call"), "notes": cfg.get("notes") or []}
    run["entries"] = [_entry(run, r) for r in rows]
    return run


def load_run_json(doc: dict, source: str) -> tuple[list[dict], list[dict]]:
    """run.py: one run per block, and the rows of its scaling tables (one table per memory limit)."""
    runs = [_run(doc, source, b["model"], b["regime"], b, b.get("rows") or [], "run.py") for b in doc.get("blocks", [])]
    scaling = doc.get("scaling") or {}
    rows = [{**row, "source": source, "command": _command(doc), "device": doc.get("device"), "scaling": scaling}
            for table in scaling.get("limits", []) for row in table.get("rows", [])]
    return runs, rows


def load_bench_summary(doc: dict, source: str) -> list[dict]:
    """bench_memory.py summary.json: the full-training regime, one run per model."""
    by_model = defaultdict(list)
    for row in doc.get("rows", []):
        by_model[row.get("model")].append(row)
    return [_run(doc, source, model, "full", doc.get("config") or {}, rows, "bench_memory.py")
            for model, rows in by_model.items()]


def load_bench_records(docs: list[tuple[str, dict]], directory: str) -> list[dict]:
    """Older bench_memory.py directories without summary.json: per-regime records, grouped into
    runs by the command that wrote them."""
    groups = defaultdict(list)
    for _, doc in docs:
        groups[(_command(doc), doc.get("model"))].append(doc)
    runs = []
    for (_, model), group in groups.items():
        order = list((group[0].get("config") or {}).get("regimes") or [])
        group.sort(key=lambda d: order.index(d["regime"]) if d["regime"] in order else len(order))
        rows = [{**d, **(d.get("summary") or {})} for d in group]
        runs.append(_run(group[0], directory, model, "full", group[0].get("config") or {}, rows, "bench_memory.py"))
    return runs


def _is_bench_record(doc) -> bool:
    return isinstance(doc, dict) and all(k in doc for k in ("model", "regime", "config", "status"))


def collect(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """Every run and scaling run under ``paths`` (files or directories, searched recursively)."""
    runs, scaling = [], []
    files_by_dir = defaultdict(list)
    for path in paths:
        if os.path.isfile(path):
            files_by_dir[os.path.dirname(path) or "."].append(os.path.basename(path))
            continue
        for directory, subdirs, files in os.walk(path):
            subdirs.sort()
            files_by_dir[directory] += sorted(f for f in files if f.endswith(".json"))
    for directory, files in sorted(files_by_dir.items()):
        docs = [(f, _load(os.path.join(directory, f))) for f in sorted(set(files))]
        runners = [(f, d) for f, d in docs if isinstance(d, dict) and d.get("runner") == "benchmarks/run.py"]
        summaries = [(f, d) for f, d in docs if f == "summary.json" and isinstance(d, dict) and "rows" in d]
        for f, d in runners:
            r, s = load_run_json(d, os.path.join(directory, f))
            runs += r
            scaling += s
        if runners:
            continue
        if summaries:
            runs += load_bench_summary(summaries[0][1], os.path.join(directory, "summary.json"))
            continue
        records = [(f, d) for f, d in docs if not f.startswith("quality") and _is_bench_record(d)]
        if records:
            runs += load_bench_records(records, directory)
    return runs, scaling


# -- ratios and tables -----------------------------------------------------------------------
def _ratio(a, b):
    return a / b if a is not None and b else None


def with_ratios(run: dict) -> list[dict]:
    """Each entry with ``vs`` = its ratios to this run's inductor (None without one)."""
    anchor = next((e for e in run["entries"] if e["variant"] == ANCHOR and e["ms_per_step"]), None)
    out = []
    for e in run["entries"]:
        vs = None
        if anchor is not None:
            vs = {k: _ratio(e[k], anchor[k]) for k in ("ms_per_step", "host_ms_per_step", "peak_extra_GiB",
                                                        "saved_bytes", "tokens_per_s")}
        out.append({**e, "vs": vs})
    return out


def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _gib(value) -> str:
    """GiB with three decimals; tiny (CPU smoke) sizes in scientific notation instead of 0.000."""
    return "–" if value is None else format(value, ".3f" if value >= 0.01 or value == 0 else ".2e")


def _cell(value, spec: str, ratio) -> str:
    text = _gib(value) if spec == "gib" else _fmt(value, spec)
    return text if value is None or ratio is None else f"{text} ({ratio:.2f}×)"


def _status(e: dict) -> str:
    text = e["status"]
    if e.get("note"):
        text += ": " + str(e["note"])[:110].replace("|", "/").replace("\n", " ")
    return text


def run_table(run: dict) -> list[str]:
    header = ["variant", "ms/step (× inductor)", "host ms (×)", "peak extra GiB (×)", "saved act. GiB (×)",
              "first step s (compile)", "tokens/s", "grad_W cos mean / min", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in with_ratios(run):
        vs = e["vs"] or {}
        saved = None if e["saved_bytes"] is None else e["saved_bytes"] / GiB
        cos = "–" if e["grad_cos_mean"] is None else f"{e['grad_cos_mean']:.4f} / {_fmt(e['grad_cos_min'], '.4f')}"
        lines.append("| " + " | ".join([
            f"`{e['variant']}`", _cell(e["ms_per_step"], ".2f", vs.get("ms_per_step")),
            _cell(e["host_ms_per_step"], ".2f", vs.get("host_ms_per_step")),
            _cell(e["peak_extra_GiB"], "gib", vs.get("peak_extra_GiB")), _cell(saved, "gib", vs.get("saved_bytes")),
            _fmt(e["first_step_s"], ".1f"), _fmt(e["tokens_per_s"], ",.0f"), cos, _status(e)]) + " |")
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both time and memory, by increasing time."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


# -- plots -----------------------------------------------------------------------------------
def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        return None


def plot_pareto(runs: list[dict], title: str, path: str) -> bool:
    """Peak extra vs step time, both × inductor of the same run (runs from different machines are
    then comparable); the Pareto front over all points is drawn as a line.  One colour and marker
    per run; only clean entries (status ok, no warning such as "may have run eagerly")."""
    plt = _pyplot()
    points = [(e["vs"]["ms_per_step"], e["vs"]["peak_extra_GiB"], e["variant"], i)
              for i, run in enumerate(runs) for e in with_ratios(run)
              if e["clean"] and e["vs"] and e["vs"]["ms_per_step"] and e["vs"]["peak_extra_GiB"]]
    if plt is None or not points:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>pP*"
    for i in sorted({p[3] for p in points}):
        mine = [p for p in points if p[3] == i]
        ax.scatter([p[0] for p in mine], [p[1] for p in mine], marker=markers[i % len(markers)], s=30,
                   label=f"run {i + 1}: {_short(runs[i])}")
        for x, y, name, _ in mine:
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = pareto_front([(x, y) for x, y, _, _ in points])
    ax.plot([x for x, _ in front], [y for _, y in front], "k--", lw=0.8, label="Pareto front")
    ax.set_xlabel("step time × plain inductor (same run)")
    ax.set_ylabel("peak above weights + optimizer × plain inductor")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _short(run: dict) -> str:
    """A run's legend label: where its JSON is, and the device."""
    return f"{_source(run['source'])} ({run.get('device') or '?'})"


def _source(path: str) -> str:
    """Paths inside the working directory relative to it, others absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def plot_longest(rows: list[dict], title: str, path: str) -> bool:
    """run.py's scaling rows as bars: the longest sequence that trained per variant (and batch, where
    there are several), one group per memory limit; "≥" where the longest listed one trained."""
    plt = _pyplot()
    if plt is None or not rows:
        return False
    limits = sorted({r["memory_limit_GiB"] for r in rows})
    bars = list(dict.fromkeys((r["variant"], r["batch"]) for r in rows))
    several = len({b for _, b in bars}) > 1
    width = 0.8 / len(bars)
    fig, ax = plt.subplots(figsize=(max(7.0, 3.2 + 0.35 * len(bars) * len(limits)), 4.5))
    top = max((r["max_seq"] or 0 for r in rows), default=0) or 1
    for j, (variant, batch) in enumerate(bars):
        by_limit = {r["memory_limit_GiB"]: r for r in rows if (r["variant"], r["batch"]) == (variant, batch)}
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(limits))]
        heights = [(by_limit.get(gib) or {}).get("max_seq") or 0 for gib in limits]
        drawn = ax.bar(xs, heights, width * 0.9, label=variant + (f", batch {batch}" if several else ""))
        for x, h, gib in zip(xs, heights, limits):
            r = by_limit.get(gib) or {}
            text = (("≥" if r.get("capped") else "") + f"{h}") if h else ("none fits" if r.get("status") == "ok"
                                                                          else r.get("status") or "not run")
            ax.text(x, h or top * 0.01, text, ha="center", va="bottom", fontsize=6, rotation=90 if len(bars) > 3 else 0,
                    color=drawn.patches[0].get_facecolor())
    ax.set_xticks(range(len(limits)), [f"{gib:g} GiB" for gib in limits])
    ax.set_ylabel("longest sequence that trains")
    ax.set_ylim(0, top * 1.25)
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- document --------------------------------------------------------------------------------
def _key(run: dict) -> tuple:
    return run["model"], run["regime"], run["size"]


def _size_sort(size: str) -> tuple:
    numbers = [int(x) for x in re.findall(r"\d+", size)]
    return tuple(numbers) or (0,)


def _title(model: str, regime: str, size: str) -> str:
    return f"{MODEL_NAMES.get(model, model)}, {REGIME_NAMES.get(regime, regime)}, {size.replace('x', ' × ')}"


def _img_name(prefix: str, key: tuple) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{prefix}_{'_'.join(key)}") + ".png"


def render(runs: list[dict], scaling: list[dict], out_md: str, img_dir: str, command: str) -> str:
    os.makedirs(img_dir, exist_ok=True)
    rel_img = os.path.relpath(img_dir, os.path.dirname(os.path.abspath(out_md)))
    by_key = defaultdict(list)
    for run in runs:
        by_key[_key(run)].append(run)
    scaling_by_key = defaultdict(list)
    for s in scaling:
        scaling_by_key[(s["model"], s["regime"], s["size"])].append(s)
    keys = sorted(set(by_key) | set(EXPECTED) | set(scaling_by_key),
                  key=lambda k: (k[0] != "llama", k[0], k[1] != "full", _size_sort(k[2])))
    lines = ["# Benchmarks", "",
             f"Generated by `{command}`; do not edit by hand (rerun it after adding results).",
             "Every table is one run: its command is above it, and every ratio is to plain inductor *in that run*",
             "(same process, same weights and batch, interleaved timing). Peak extra is the peak above weights and",
             "optimizer state (gradients count in it); benchmarks/README.md defines every column.",
             "A velora variant measures what the backend did at the commit shown with its run: `velora_auto` is",
             "the default plan (with `min_efficiency` since 2b68d1f) and `velora_codecs` every codec built then",
             "(`gated` since f7ce900; the results/gpu/v4 runs record commit e553f88, the device copy's stale",
             "HEAD, but ran the working tree of f7ce900; the results/gpu/v5 runs record 0a515bb, whose velora_fx",
             "backend and codecs they ran: later commits changed only the optimizers and scripts; the",
             "results/gpu/v6 sweeps record 6915111 but ran the working tree of 947f782: the memory_budget planner",
             "and VeLoRA's weight gradient from the coefficients; in v6/sweep_gpt2 that code still emitted aten.t,",
             "which inductor refused for GPT-2's Conv1D, hence its errors, fixed before v6/sweep_gpt2b; the",
             "results/gpu/v7 run records 3b08013 but ran the working tree of the issue-16 commits: state bound",
             "to the weights at call time, measured on the plain transformers call; the results/gpu/v9 runs",
             "record 18804f9 but ran the working tree of e2acebd: the head's chunks ordered after their loss",
             "term, and the plan cache; the results/gpu/v10 runs record 59e6267-dirty: guard_first and",
             "exact_and_0.3 ran 59e6267 plus the recompute guard (the three-plan chooser), merged and lora",
             "the code of ea93b65: the guard, the per-tensor chooser, few-bit's computed matching;",
             "results/gpu/v10/README.md; the results/gpu/v11 runs record aab5f63-dirty: the issue-18 working",
             "tree, where `velora_auto` in v11/default is the v11 default (velora + fewbit + gated, the",
             "gradient-aware estimate) and `velora_nearexact` in v11/profile_* the same codecs under the",
             "earlier estimate; results/gpu/v11/README.md; the results/gpu/v12 runs record 6e9d5cd-dirty: the",
             "issue-19 working tree, offload (`velora_mb<x>offload`: memory_budget=x, offload=True) and PyTorch's",
             "eager `save_on_cpu` (`eager_offload`); results/gpu/v12/README.md; v13 and v14 say in their",
             "READMEs which code each folder ran; the results/gpu/v15 runs record 0aca61a-dirty, and",
             "`velora_auto` there is the v11 default in v15/gpt2 and v15/llama but the v15 default (with the",
             "exact loss head) in v15/gpt2_default and v15/lora: results/gpu/v15/README.md). The narrative",
             "and the comparison with the exact front: README.md, docs/codecs.md.", "",
             "| model | regime | size | runs | scaling |", "|---|---|---|---|---|"]
    for key in keys:
        n = len(by_key.get(key, []))
        lines.append(f"| {MODEL_NAMES.get(key[0], key[0])} | {key[1]} | {key[2]} | "
                     f"{n if n else 'not measured yet'} | {'yes' if scaling_by_key.get(key) else '–'} |")
    for key in keys:
        lines += ["", f"## {_title(*key)}", ""]
        key_runs = by_key.get(key, [])
        if not key_runs:
            lines.append("Not measured yet.")
        for run in key_runs:
            shape = (f"vocab {run['vocab']}, batch {run['batch']} × {run['seq']}, {run['dtype']}"
                     if run.get("vocab") else "shape not recorded")
            shape += ", the plain transformers call" if run.get("call") == "plain" else ""
            lines += ["", f"**{run['device'] or 'device not recorded'}**, torch {run['torch'] or '?'}, {shape} "
                          f"({run['writer']}, `{_source(run['source'])}`"
                          + (f", commit {run['git_commit'][:12]}" if run.get("git_commit") else "") + ")", "",
                      f"`{run['command']}`", ""]
            lines += run_table(run)
            lines += [f"- {n}" for n in run.get("notes") or []]
        if key_runs:
            name = _img_name("pareto", key)
            if plot_pareto(key_runs, _title(*key), os.path.join(img_dir, name)):
                lines += ["", f"![peak vs step time, {_title(*key)}]({rel_img}/{name})"]
        key_scaling = scaling_by_key.get(key, [])
        if key_scaling:
            lines += scaling_section(key, key_scaling, img_dir, rel_img)
    return "\n".join(lines) + "\n"


def scaling_heading(limit: float, scaling: dict) -> str:
    """A scaling table's title: the limit, the batches and the sequences tried."""
    enforced = "" if scaling.get("enforced", True) else " (not enforced on this device: everything fits)"
    seqs = scaling.get("seqs") or []
    return (f"Longest sequence that trains within {limit:g} GiB{enforced}: batch "
            f"{', '.join(map(str, scaling.get('batches') or []))}, sequences {seqs[0] if seqs else '?'}–"
            f"{seqs[-1] if seqs else '?'}" + (", the plain transformers call" if scaling.get("call") == "plain" else ""))


def _tries(row: dict) -> str:
    """``16384 ok 13.2, 32768 oom`` plus what an earlier search settled (``≤16384 fits (16 GiB)``)."""
    carried = row.get("carried") or []
    fits = [p for p in carried if p["status"] == "ok"]
    known = [f"≤{p['seq']} fits ({p['from']})" for p in fits[-1:]]  # the longest that fit in an earlier search
    known += [f"≥{p['seq']} {p['status']} ({p['from']})" for p in carried if p["status"] != "ok"]
    tried = [f"{p['seq']} {p['status']}" + (f" {p['peak_GiB']:.1f}" if p.get("peak_GiB") else "")
             + (f" (≥{p['predicted_GiB']:.1f} predicted)" if p.get("predicted_GiB") else "")
             for p in row.get("points") or []]
    return ", ".join(known + tried) or "–"


def scaling_table(rows: list[dict]) -> list[str]:
    """run.py's scaling rows (one limit) as a table; ratios are to inductor of the same block, limit
    and batch (tokens/s at inductor's longest sequence, where the variant was measured there)."""
    header = ["model", "regime", "size", "variant", "batch", "longest seq", "tokens/step", "tokens/s", "peak GiB",
              "context × inductor", "tokens/s × inductor (at seq)", "tries (seq status peak GiB)", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        capped = "≥" if r.get("capped") else ""
        at = f" ({r['inductor_max_seq']})" if r.get("tokens_per_s_vs_inductor") is not None else ""
        status = r["status"] + (f": {str(r['note'])[:100]}" if r.get("note") else "")
        if r.get("warnings"):  # e.g. a velora plan that fell back to plain inductor at the longest sequence
            status += f" (velora_fx warned: {r['warnings'][0][:100]})"
        lines.append("| " + " | ".join([
            r["model"], r["regime"], r["size"], f"`{r['variant']}`", str(r["batch"]),
            capped + _fmt(r.get("max_seq"), "d"), capped + _fmt(r.get("max_tokens"), "d"),
            _fmt(r.get("tokens_per_s"), ",.0f"), _fmt(r.get("peak_GiB"), ".2f"),
            _fmt(r.get("context_vs_inductor"), ".2f"), _fmt(r.get("tokens_per_s_vs_inductor"), ".2f") + at,
            _tries(r), status.replace("|", "/")]).replace("\n", " ") + " |")
    return lines


def scaling_section(key: tuple, rows: list[dict], img_dir: str, rel_img: str) -> list[str]:
    """Per run.json: a table per memory limit and the bar plot of the longest sequences."""
    lines = []
    sources = list(dict.fromkeys(r["source"] for r in rows))
    for i, source in enumerate(sources):
        mine = [r for r in rows if r["source"] == source]
        for limit in sorted({r["memory_limit_GiB"] for r in mine}):
            lines += ["", f"### {scaling_heading(limit, mine[0]['scaling'])}", "",
                      f"{mine[0]['device'] or 'device not recorded'}, `{_source(source)}`: `{mine[0]['command']}`", ""]
            lines += scaling_table([r for r in mine if r["memory_limit_GiB"] == limit])
        name = _img_name("scaling", key + ((str(i + 1),) if len(sources) > 1 else ()))
        if plot_longest(mine, f"longest sequence that trains: {_title(*key)} ({mine[0]['device']})",
                        os.path.join(img_dir, name)):
            lines += ["", f"![longest sequence per memory limit, {_title(*key)}]({rel_img}/{name})"]
    return lines


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="*", default=["results/gpu"],
                    help="result directories (searched recursively) or JSON files; default results/gpu")
    ap.add_argument("--out-md", default="docs/benchmarks.md")
    ap.add_argument("--img-dir", default="docs/img")
    return ap.parse_args(argv)


def _distributed(paths: list[str]) -> str:
    """bench_distributed.py runs (FSDP2 on several GPUs): their own summary.md, verbatim (the
    table already carries the device, the command and ratios to inductor in the same run)."""
    found = []
    for path in paths:
        for root, _, files in sorted(os.walk(path)) if os.path.isdir(path) else []:
            if "bench_distributed.json" in files and "summary.md" in files:
                found.append(os.path.join(root, "summary.md"))
    if not found:
        return "\n## Several GPUs (FSDP2)\n\nNot measured yet.\n"
    parts = ["", "## Several GPUs (FSDP2, `benchmarks/bench_distributed.py`)", ""]
    for summary in found:
        with open(summary) as fh:
            parts += [f"From `{summary}`:", "", fh.read().strip(), ""]
    return "\n".join(parts) + "\n"


def main(argv=None) -> str:
    args = parse_args(argv)
    runs, scaling = collect(args.paths)
    command = "python benchmarks/make_docs.py " + shlex.join(
        list(args.paths) + ["--out-md", args.out_md, "--img-dir", args.img_dir])
    text = render(runs, scaling, args.out_md, args.img_dir, command) + _distributed(args.paths)
    os.makedirs(os.path.dirname(os.path.abspath(args.out_md)), exist_ok=True)
    with open(args.out_md, "w") as fh:
        fh.write(text)
    print(f"{args.out_md}: {len(runs)} runs, {len(scaling)} scaling runs", file=sys.stderr)
    return text


if __name__ == "__main__":
    main()
