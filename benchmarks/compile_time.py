"""Compile time of ``memory_budget`` planning (or, with ``--config default``, of the default backend):
velora_fx against the same compile without it.

Both sides use inductor's decompositions and min-cut partitioner without code generation
(``aot_eager_decomp_partition`` / velora_fx's ``compiler="eager"``), so the difference is
velora_fx's own work: site analysis, calibration, rewrites and the partitions its planner asks for.
The first call compiles and runs the forward; the second only runs it; compile = first - second.
Each (model, regime) runs in a fresh process, with one torch thread, and every time is given twice:
wall clock and the main thread's CPU time (``*_cpu_s``), which other work on a shared machine
disturbs much less.  The velora run also breaks its time down by stage
(inclusive wall time, and how many partitions ran inside each stage) and records the plan chosen,
so a faster planner can be checked to choose the same plan.

    python benchmarks/compile_time.py --out results/compile_time                       # 12 x 1024, CPU
    python benchmarks/compile_time.py --layers 2 --hidden 256 --out /tmp/ct           # quick look
    python benchmarks/compile_time.py --processes 2 --out /tmp/ct   # a second process on the same caches

Each (model, regime) starts from an empty cache directory of its own (``TORCHINDUCTOR_CACHE_DIR``,
which holds inductor's caches and velora_fx's plan cache), shared by its ``--processes`` runs: the
first is a cold start, the later ones read what it wrote (``--cache-dir`` to use one directory).
``--profile DIR`` writes a cProfile of each run's first call there.

On CPU the default batch is 1 x 1024 (real tensors: the calibration forward and the timed forward
run eagerly); planning itself runs on fake tensors and does not depend on the device.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import LMLoss, build  # noqa: E402

CODECS = ["velora", "fewbit", "gated", "chunked_loss"]
REGIMES = ("plain", "velora", "inductor")


class Stages:
    """Inclusive wall time of named functions, and the partitions (min-cut calls) inside each."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, float]] = {}
        self.partitions: list[dict[str, Any]] = []
        self._depth = 0

    def wrap(self, owner: Any, attr: str, label: str, partition: bool = False) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        stages = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            before = len(stages.partitions)
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
                row = stages.rows.setdefault(label, {"calls": 0, "seconds": 0.0, "cpu_s": 0.0, "partitions": 0})
                row["calls"] += 1
                row["seconds"] += elapsed
                row["cpu_s"] += cpu
                row["partitions"] += len(stages.partitions) - before
                if partition:
                    budget = torch._functorch.config.activation_memory_budget
                    stages.partitions.append({"seconds": round(elapsed, 3), "cpu_s": round(cpu, 3), "budget": budget})
        setattr(owner, attr, timed)

    def to_dict(self) -> dict[str, Any]:
        rows = {k: {**v, "seconds": round(v["seconds"], 3), "cpu_s": round(v["cpu_s"], 3)}
                for k, v in self.rows.items()}
        return {"stages": rows, "partition_calls": len(self.partitions),
                "partition_seconds": round(sum(p["seconds"] for p in self.partitions), 3),
                "partition_cpu_s": round(sum(p["cpu_s"] for p in self.partitions), 3),
                "partitions": self.partitions}


def instrument() -> Stages:
    """Time velora_fx's stages by wrapping module attributes (missing ones are skipped)."""
    import importlib
    stages = Stages()
    compat = importlib.import_module("velora_fx._compat")
    backend = importlib.import_module("velora_fx.backend")
    stages.wrap(compat, "min_cut_rematerialization_partition", "min-cut partition (all)", partition=True)
    stages.wrap(backend, "run_pipeline", "pipeline (total)")
    for attr in ("_baseline", "_baseline_bytes"):  # the name changed once
        stages.wrap(backend.VeloraBackend, attr, "loss head: unrewritten graph's partition")
    stages.wrap(backend, "rewrite_loss_heads", "loss head: rewrite")
    stages.wrap(backend, "lift_state", "state lifting")
    pipeline = importlib.import_module("velora_fx.passes.pipeline")
    for attr, label in [("find_groups", "sites: matmul"), ("find_pointwise_sites", "sites: pointwise"),
                        ("find_stored_sites", "sites: stored"), ("activation_values", "calibration"),
                        ("calibration_graph", "calibration graph"), ("plan_pointwise", "plan: pointwise"),
                        ("plan_stored", "plan: stored"), ("plan_groups", "plan: matmul"),
                        ("_apply", "rewrite + partition"), ("plan_under_budget", "memory_budget plans")]:
        stages.wrap(pipeline, attr, label)
    budget = importlib.import_module("velora_fx.passes.budget")
    stages.wrap(budget, "fit_recompute_budget", "memory_budget: knapsack fits")
    stages.wrap(budget, "estimate_step", "memory_budget: step estimates")
    return stages


def make_backend(regime: str, config: str):
    """``config``: "budget" (``memory_budget=0.5`` with every codec) or "default" (``velora_fx.backend()``
    as a user calls it); velora_fx's side never generates code (``compiler="eager"``)."""
    if regime == "plain":
        from torch._dynamo.backends.debugging import aot_eager_decomp_partition
        return aot_eager_decomp_partition
    if regime == "inductor":
        return "inductor"
    import velora_fx
    if config == "default":
        return velora_fx.backend(compiler="eager")
    return velora_fx.backend(memory_budget=0.5, codecs=CODECS, compiler="eager")


def child(args) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    model = LMLoss(build(args.model, args.hidden, args.layers, vocab=args.vocab,
                         max_positions=max(2048, args.seq + 1))).to(dtype)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    stages = instrument() if args.regime == "velora" else None
    backend = make_backend(args.regime, args.config)
    compiled = torch.compile(model, backend=backend)
    profiler = None
    if args.profile:
        import cProfile
        profiler = cProfile.Profile()
        profiler.enable()
    start, start_cpu = time.perf_counter(), time.thread_time()
    compiled(ids)
    first, first_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    if profiler is not None:
        profiler.disable()
        os.makedirs(args.profile, exist_ok=True)
        profiler.dump_stats(os.path.join(args.profile, f"{args.model}-{args.regime}-{args.process}.prof"))
    start, start_cpu = time.perf_counter(), time.thread_time()
    compiled(ids)
    second, second_cpu = time.perf_counter() - start, time.thread_time() - start_cpu
    out: dict[str, Any] = {"model": args.model, "regime": args.regime, "process": args.process,
                           "first_call_s": round(first, 3),
                           "second_call_s": round(second, 3), "compile_s": round(first - second, 3),
                           "first_call_cpu_s": round(first_cpu, 3), "second_call_cpu_s": round(second_cpu, 3),
                           "compile_cpu_s": round(first_cpu - second_cpu, 3)}
    if stages is not None:
        out.update(stages.to_dict())
        out["graphs"] = [_graph_summary(g) for g in backend.report().graphs]
    return out


def _graph_summary(graph) -> dict[str, Any]:
    chosen = [p for p in graph.budget_plans or [] if p["chosen"]]
    return {"status": graph.status, "saved_bytes_before": graph.saved_bytes_before,
            "saved_bytes_after": graph.saved_bytes_after, "budget_target": graph.budget_target,
            "recompute_budget": graph.recompute_budget, "chosen": chosen[0]["plan"] if chosen else None,
            "plan_source": graph.plan_source,
            "plans": graph.budget_plans, "message": graph.message,
            "compressed": sorted(f"{s.codec}:{s.name}" for s in graph.sites if s.decision == "compressed")}


def run_child(model: str, regime: str, args, cache_dir: str, process: int = 1) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--model", model, "--regime", regime,
           "--layers", str(args.layers), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--batch", str(args.batch), "--seq", str(args.seq), "--dtype", args.dtype, "--process", str(process),
           "--config", args.config]
    if args.profile:
        cmd += ["--profile", os.path.abspath(args.profile)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TORCHINDUCTOR_CACHE_DIR": cache_dir}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"model": model, "regime": regime, "process": process, "error": done.stderr[-3000:]}
    return json.loads(lines[-1])


def summary(results: list[dict[str, Any]]) -> str:
    lines = ["| model | regime | compile s (CPU s) | partitions | partition s (CPU s) | status | chosen plan | "
             "saved / target |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("process", 1) > 1:
            r = {**r, "regime": f"{r['regime']} (process {r['process']})"}
        if "error" in r:
            lines.append(f"| {r['model']} | {r['regime']} | error | | | | | |")
            continue
        graphs = r.get("graphs") or [{}]
        g = graphs[0]
        saved = f"{g.get('saved_bytes_after')} / {g.get('budget_target')}" if g else ""
        parts = f"{r['partition_seconds']:.1f} ({r['partition_cpu_s']:.1f})" if "partition_seconds" in r else ""
        lines.append(f"| {r['model']} | {r['regime']} | {r['compile_s']:.1f} ({r['compile_cpu_s']:.1f}) | "
                     f"{r.get('partition_calls', '')} | {parts} | {_status(g)} | {g.get('chosen', '')} | "
                     f"{saved} |")
    by = {(r["model"], r["regime"], r.get("process", 1)): r for r in results if "error" not in r}
    for model, process in sorted({(r["model"], r.get("process", 1)) for r in results}):
        plain, velora = by.get((model, "plain", process)), by.get((model, "velora", process))
        if plain and velora:
            added = velora["compile_cpu_s"] - plain["compile_cpu_s"]
            which = f" (process {process}: caches from process 1)" if process > 1 else ""
            lines.append(f"\n{model}{which}: velora_fx adds {added:.1f} CPU s to a {plain['compile_cpu_s']:.1f} CPU s "
                         f"compile ({velora['compile_cpu_s'] / plain['compile_cpu_s']:.2f}x; wall "
                         f"{velora['compile_s']:.1f} s vs {plain['compile_s']:.1f} s)")
            for name, row in sorted(velora["stages"].items(), key=lambda kv: -kv[1]["cpu_s"]):
                lines.append(f"  {name}: {row['cpu_s']:.2f} CPU s ({row['seconds']:.2f} s) in {row['calls']} call(s), "
                             f"{row['partitions']} partition(s)")
    return "\n".join(lines) + "\n"


def _status(graph: dict[str, Any]) -> str:
    source = graph.get("plan_source")
    return f"{graph.get('status', '')}{' (plan from the cache)' if source == 'cache' else ''}"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2"])
    ap.add_argument("--regimes", nargs="+", default=["plain", "velora"], choices=REGIMES)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--config", default="budget", choices=["budget", "default"],
                    help="velora_fx's options: memory_budget=0.5 with every codec, or the default backend()")
    ap.add_argument("--out", default="results/compile_time")
    ap.add_argument("--processes", type=int, default=1,
                    help="runs of each (model, regime), each in a fresh process on the same cache directory")
    ap.add_argument("--cache-dir", default=None,
                    help="TORCHINDUCTOR_CACHE_DIR for every run (default: an empty one per model and regime)")
    ap.add_argument("--profile", default=None, help="write a cProfile of each run's first call to this directory")
    ap.add_argument("--process", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--regime", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return []
    os.makedirs(args.out, exist_ok=True)
    results = []
    for model in args.models:
        for regime in args.regimes:
            with tempfile.TemporaryDirectory(prefix="velora_ct_") as fresh:
                for process in range(1, args.processes + 1):
                    results.append(run_child(model, regime, args, args.cache_dir or fresh, process))
                    print(json.dumps({k: v for k, v in results[-1].items() if k not in ("partitions", "graphs")}),
                          flush=True)
    hidden = ("child", "model", "regime", "process")
    info = {"torch": torch.__version__, "args": {k: v for k, v in vars(args).items() if k not in hidden},
            "cpus": os.cpu_count()}
    with open(os.path.join(args.out, "compile_time.json"), "w") as fh:
        json.dump({"info": info, "results": results}, fh, indent=1)
    text = summary(results)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
