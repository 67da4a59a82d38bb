"""FSDP2 benchmark: velora_fx under ``fully_shard`` + torch.compile against inductor and inductor's
exact recompute, one process per device (torchrun; NCCL on GPU, gloo on CPU).

Model: ``models.llama_like`` in ``LMLoss`` (the compiled module returns the loss), bf16 params,
``fully_shard`` on every decoder layer and on the root, fused AdamW (on GPU).  Every regime
trains its own copy of the same initial weights; each rank its own batch.  Per regime: the
per-device peak memory above the pre-step state (sharded weights + optimizer state of every
regime kept alive; max over ranks), median step time and host launch time (per step the slowest
rank), global tokens/s, first step (compile) time, ratios to ``inductor``, and rank 0's velora
report.  Timing is interleaved like bench_memory.py: every regime is warmed, then each round
runs one timed block of every regime in turn (``--sequential``: one regime at a time).

How the graphs look under FSDP2: its hooks are dynamo-disabled, so dynamo breaks the graph at
every FSDP unit; each decoder layer is its own graph (transformers' layers differ in a guarded
``layer_idx``, so each layer compiles: the recompile limit is raised to fit) and the root's code
around them runs eagerly where the break falls in a loop.  ``--nested-graph-breaks`` (default on,
``torch._dynamo.config.nested_graph_breaks``) resumes tracing in the enclosing frames, which keeps
lm_head and the loss in one graph (the chunked loss head of ``velora_codecs`` needs that).

    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --warm-deadline 300 --out results/dist   # GPUs
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --device cpu --layers 1 --hidden 64 \\
        --vocab 512 --batch 2 --seq 32 --steps 2 --rounds 1 --out /tmp/bd                               # CPU smoke
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import hashlib
import json
import os
import shlex
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_memory import (_ISOLATE, CUDA_GRAPHS, GiB, BudgetInductor, Regime, _fmt, _ratio, _table,  # noqa: E402
                          add_workload_arguments, budget_patch, compile_counters, counters_since, memory_mark,
                          memory_peak, parse_regime, run_info, sync, velora_options, velora_summary)
from models import LMLoss, build  # noqa: E402

import velora_fx  # noqa: E402

REGIMES = ("inductor", "inductor_budget_0.5", "velora_auto", "velora_max_memory", "velora_codecs")
ANCHOR = "inductor"
MODEL = "llama"


# -- one regime --------------------------------------------------------------------------------
def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """``fully_shard`` every decoder layer, then the root (embedding, final norm, lm_head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def compile_regime(regime: Regime, model: torch.nn.Module, args):
    """The compiled callable, its velora backend (or None) and notes for the JSON."""
    kwargs: dict = dict(_ISOLATE)
    notes: dict = {}
    backend = None
    if regime.family == "velora":
        options = velora_options(regime, MODEL, args)
        notes["velora_options"] = options
        backend = velora_fx.backend(**options)
        notes["velora_config"] = backend.config.to_dict()
        kwargs["backend"] = backend
    elif regime.budget is not None:
        notes["activation_memory_budget"] = regime.budget
        kwargs["backend"] = BudgetInductor(regime.budget)
    return torch.compile(model, **kwargs), backend, notes


class Runner:
    """One regime, alive across rounds: its sharded copy of the initial model, its optimizer and
    its compiled callable."""

    def __init__(self, regime: Regime, base: torch.nn.Module, ids: torch.Tensor, mesh, args) -> None:
        self.regime, self.ids, self.args, self.device = regime, ids, args, ids.device
        self.model = shard(LMLoss(copy.deepcopy(base)).to(self.device), mesh)
        self.fn, self.backend, self.notes = compile_regime(regime, self.model, args)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **fused)

    def step(self) -> torch.Tensor:
        loss = self.fn(self.ids)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss

    def warm(self) -> dict:
        """The first step (dynamo + compile on every FSDP unit) and the other warm-up steps."""
        before, times, first_loss = compile_counters(), [], None
        with budget_patch(self.regime):
            for i in range(self.args.warmup):
                sync(self.device)
                t0 = time.perf_counter()
                loss = self.step()
                sync(self.device)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    first_loss = loss.item()
        return {"first_step_s": times[0], "warmup_step_s": times, "first_loss": first_loss,
                "warm_counters": counters_since(before)}

    def timed_block(self) -> dict:
        """``--steps`` steps, each from an idle device; host time stops when zero_grad returns."""
        total, host = [], []
        before = compile_counters()
        with budget_patch(self.regime):
            mem_before = memory_mark(self.device)
            for _ in range(self.args.steps):
                sync(self.device)
                t0 = time.perf_counter()
                loss = self.step()
                t1 = time.perf_counter()
                sync(self.device)
                total.append((time.perf_counter() - t0) * 1e3)
                host.append((t1 - t0) * 1e3)
            block = {"ms_all": total, "host_ms_all": host, "last_loss": loss.item()}
            block.update(memory_peak(self.device, mem_before))
        block["counters"] = counters_since(before)
        return block

    def velora_check(self) -> dict | None:
        """Rank 0's report and this rank's fingerprint of plan and v (compared across ranks)."""
        if self.backend is None:
            return None
        state = self.backend.model_state(self.model)
        digest = hashlib.sha256(json.dumps(sorted(state.plan.items())).encode())
        for name, site in sorted(self.backend.state_dict(model=self.model)["sites"].items()):
            digest.update(name.encode())
            if site["vector"] is not None:
                digest.update(site["vector"].float().numpy().tobytes())
        out = {"fingerprint": digest.hexdigest()[:16]}
        if dist.get_rank() == 0:
            out.update(velora_summary(self.backend))
            # every graph: the report's totals keep one graph per dynamo frame, and the decoder
            # layers are recompiles of one frame here
            graphs = out["report"].get("graphs", [])
            out["saved_GiB_all_graphs"] = {k: sum(g.get(f"saved_bytes_{k}") or 0 for g in graphs) / GiB
                                           for k in ("before", "after")}
        return out


# -- across ranks ------------------------------------------------------------------------------
def gather(value) -> list:
    """Every rank's ``value`` (a small picklable object), on every rank."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def rank0_says(value):
    """Rank 0's ``value`` on every rank (decisions all ranks must take together)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def attempt(fn, where: str):
    """``(result, None)`` or ``(None, error)``, the error agreed over ranks: if one rank failed,
    every rank drops the regime (ranks must keep running the same collectives)."""
    try:
        result, error = fn(), None
    except Exception as exc:  # noqa: BLE001 - recorded; the other regimes go on
        result, error = None, {"error": f"{where}: {type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    errors = [e for e in gather(error) if e is not None]
    if errors:
        return None, errors[0]
    return result, None


def merge_block(blocks: list[dict]) -> dict:
    """One timed block over ranks: per step the slowest rank, memory the largest."""
    steps = [max(b["ms_all"][i] for b in blocks) for i in range(len(blocks[0]["ms_all"]))]
    host = [max(b["host_ms_all"][i] for b in blocks) for i in range(len(blocks[0]["host_ms_all"]))]
    peaks = [b["peak_extra_GiB"] for b in blocks]
    return {"ms_all": steps, "host_ms_all": host, "ms_per_step": statistics.median(steps),
            "host_ms_per_step": statistics.median(host), "last_loss": blocks[0]["last_loss"],
            "peak_extra_GiB": None if None in peaks else max(peaks),
            "peak_GiB": None if blocks[0]["peak_GiB"] is None else max(b["peak_GiB"] for b in blocks),
            "mem_before_GiB": None if blocks[0]["mem_before_GiB"] is None else max(b["mem_before_GiB"] for b in blocks),
            "per_rank": [{k: b[k] for k in ("ms_all", "host_ms_all", "peak_extra_GiB", "peak_GiB", "mem_before_GiB")}
                         for b in blocks],
            "counters": blocks[0]["counters"]}


def aggregate(record: dict, tokens_per_step: int) -> None:
    rounds = record["rounds"]
    if not rounds:
        return
    record["ms_per_step"] = statistics.median([t for b in rounds for t in b["ms_all"]])
    record["host_ms_per_step"] = statistics.median([t for b in rounds for t in b["host_ms_all"]])
    record["ms_per_step_rounds"] = [b["ms_per_step"] for b in rounds]
    record["tokens_per_s"] = tokens_per_step / (record["ms_per_step"] / 1e3)
    peaks = [b["peak_extra_GiB"] for b in rounds]
    record["peak_extra_GiB"] = None if None in peaks else max(peaks)
    record["recompiles_in_timing"] = sum(b["counters"]["graphs"] for b in rounds)


def summarize(records: list[dict]) -> list[dict]:
    anchor = next((r for r in records if r["regime"] == ANCHOR and r.get("ms_per_step")), None)
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("regime", "status", "error", "note", "first_step_s", "ms_per_step",
                                     "ms_per_step_rounds", "host_ms_per_step", "tokens_per_s", "peak_extra_GiB",
                                     "recompiles_in_timing", "first_loss", "compressed_sites", "sites",
                                     "saved_GiB_all_graphs", "v_same_on_all_ranks")}
        row["vs_" + ANCHOR] = None if anchor is None else {
            k: _ratio(r.get(k), anchor.get(k))
            for k in ("ms_per_step", "host_ms_per_step", "tokens_per_s", "peak_extra_GiB", "first_step_s")}
        if anchor is not None and r.get("ms_per_step_rounds"):
            row["vs_" + ANCHOR]["ms_per_step_rounds"] = [
                _ratio(a, b) for a, b in zip(r["ms_per_step_rounds"], anchor["ms_per_step_rounds"])]
        rows.append(row)
    return rows


def _cell(value, spec: str, ratio=None) -> str:
    text = _fmt(value, spec)
    return f"{text} ({ratio:.2f}×)" if value is not None and ratio is not None else text


def markdown(rows: list[dict], info: dict, args) -> str:
    header = (f"bench_distributed (FSDP2): {info['world_size']} × {info['device']}, torch {info['torch']}, "
              f"{args.dtype}, {args.layers} layers × {args.hidden} hidden, vocab {args.vocab}, per-rank batch "
              f"{args.batch} × {args.seq}, {args.rounds} {'sequential' if args.sequential else 'interleaved'} "
              f"rounds × median of {args.steps} steps, nested graph breaks {args.nested_graph_breaks}\n\n"
              f"`{info['command']}`\n\nStep time: per step the slowest rank. Peak extra: the largest per-device "
              "peak above the pre-step state (every regime's sharded weights and optimizer state resident).")
    columns = ["regime", "first step s", "ms/step (×, rounds)", "host ms/step (×)", "tokens/s (×)",
               "peak extra GiB (×)", "first loss", "velora sites (rank 0: compressed/all, saved activations)",
               "status"]
    body = []
    for r in rows:
        vs = r["vs_" + ANCHOR] or {}
        rounds = ", ".join(_fmt(x, ".2f") for x in vs.get("ms_per_step_rounds") or [])
        ms = _cell(r["ms_per_step"], ".2f") + (f" ({vs['ms_per_step']:.2f}×: {rounds})"
                                                if vs.get("ms_per_step") is not None else "")
        saved = r.get("saved_GiB_all_graphs")
        sites = "–" if r["sites"] is None else f"{r['compressed_sites']}/{r['sites']}" + (
            f", saved {saved['before']:.3f} → {saved['after']:.3f} GiB" if saved else "") + (
            "" if r["v_same_on_all_ranks"] is None else (", v same on all ranks" if r["v_same_on_all_ranks"]
                                                         else ", v DIFFERS between ranks"))
        status = r["status"] + (f": {(r['error'] or r['note'])[:100]}" if r.get("error") or r.get("note") else "")
        if r.get("recompiles_in_timing"):
            status += f" (recompiled {r['recompiles_in_timing']}× while timed)"
        body.append([r["regime"], _fmt(r["first_step_s"], ".1f"), ms,
                     _cell(r["host_ms_per_step"], ".2f", vs.get("host_ms_per_step")),
                     _cell(r["tokens_per_s"], ".0f", vs.get("tokens_per_s")),
                     _cell(r["peak_extra_GiB"], ".3f", vs.get("peak_extra_GiB")),
                     _fmt(r["first_loss"], ".4f"), sites, status.replace("|", "/").replace("\n", " ")])
    return "\n".join([header, ""] + _table(columns, body)) + "\n"


def write_outputs(records: list[dict], info: dict, args, start: float) -> None:
    """``bench_distributed.json`` and ``summary.md`` (rank 0), rewritten after every phase."""
    if dist.get_rank() != 0:
        return
    rows = summarize(records)
    with open(os.path.join(args.out, "bench_distributed.json"), "w") as fh:
        json.dump({**info, "wall_s": time.perf_counter() - start, "rows": rows, "records": records}, fh, indent=1)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(markdown(rows, info, args))


def log(start: float, text: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)


# -- driver ------------------------------------------------------------------------------------
def warm_regime(regime: Regime, base, ids, mesh, record: dict, args, start: float):
    t0 = time.perf_counter()
    holder: dict = {}

    def build_and_warm():
        holder["runner"] = Runner(regime, base, ids, mesh, args)
        record["notes"] = holder["runner"].notes
        return holder["runner"].warm()

    warmed, error = attempt(build_and_warm, "compile/warm-up")
    runner = holder.get("runner")
    if error is None:
        per_rank = gather(warmed)
        record.update(per_rank[0], status="ok", first_step_s=max(w["first_step_s"] for w in per_rank),
                      first_step_s_per_rank=[w["first_step_s"] for w in per_rank])
        check, check_error = attempt(runner.velora_check, "velora report")
        if check_error is not None:
            record["report_error"] = check_error["error"]
        elif check is not None:
            prints = gather(check.pop("fingerprint"))
            record["v_same_on_all_ranks"] = len(set(prints)) == 1
            if dist.get_rank() == 0:
                record.update(check)
                if args.verbose:
                    print(runner.backend.report().table(), flush=True)
    else:
        record.update(status="error", **error)
        runner = None
    record["wall_s"] += time.perf_counter() - t0
    log(start, f"{regime.name:22s} warm  {record['status']:5s} first={_fmt(record.get('first_step_s'), '.1f')}s"
               + (f"  {record.get('error')}" if record["status"] == "error" else ""))
    return runner


def time_block(runner: Runner, record: dict, round_index: int, tokens_per_step: int, start: float) -> bool:
    t0 = time.perf_counter()
    block, error = attempt(runner.timed_block, f"round {round_index + 1}")
    if error is not None:
        record.update(status="error", **error)
    else:
        merged = merge_block(gather(block))
        record["rounds"].append({"round": round_index + 1, **merged})
        aggregate(record, tokens_per_step)
    record["wall_s"] += time.perf_counter() - t0
    b = record["rounds"][-1] if error is None else {}
    log(start, f"{record['regime']:22s} round {round_index + 1} "
               + (f"ms={b['ms_per_step']:.2f} host={b['host_ms_per_step']:.2f} "
                  f"peak+={_fmt(b['peak_extra_GiB'], '.3f')} GiB" if error is None else f"error  {record['error']}"))
    return error is None


def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES),
                    help=f"in timing order; default {REGIMES}; any inductor_budget_<x> or velora_<preset> of "
                         "bench_memory.py (no CUDA graphs, no eager regimes)")
    add_workload_arguments(ap, rounds=3, batch_help="per rank", device_choices=["cuda", "cpu"])
    ap.add_argument("--sequential", action="store_true",
                    help="one regime at a time (warm, its rounds, free it, torch._dynamo.reset()): less memory")
    ap.add_argument("--warm-deadline", type=float, default=None, metavar="SECONDS",
                    help="compile no further regime once this many seconds have passed (rank 0's clock), so a run "
                         "under a wall-clock limit still reaches its timed rounds (skips are recorded)")
    ap.add_argument("--no-nested-graph-breaks", dest="nested_graph_breaks", action="store_false",
                    help="leave torch._dynamo.config.nested_graph_breaks off (lm_head and the loss then compile "
                         "as separate graphs: no chunked loss head)")
    ap.add_argument("--num-groups", type=int, default=None, help="pin num_groups for every velora regime")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                    help="velora_fx backend's compiler (eager: same rewrite, no codegen)")
    ap.add_argument("--pg-timeout", type=float, default=600, help="seconds a collective may wait (a rank that "
                                                                  "failed alone would otherwise hang the others)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/dist")
    ap.add_argument("--verbose", action="store_true", help="print rank 0's velora report tables")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")
    if len(set(args.regimes)) != len(args.regimes):
        ap.error("--regimes lists a regime twice")
    try:
        regimes = [parse_regime(name) for name in args.regimes]
    except ValueError as exc:
        ap.error(str(exc))
    for r in regimes:
        if r.family not in ("inductor", "velora") or r.cudagraphs:
            ap.error(f"{r.name!r}: only compiled regimes without {CUDA_GRAPHS!r} (FSDP2 hooks run eagerly)")
    return args, regimes


def main() -> None:
    args, regimes = parse_args()
    if "RANK" not in os.environ:
        sys.exit("run under torchrun: torchrun --nproc_per_node <devices> benchmarks/bench_distributed.py ...")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=args.pg_timeout))
    try:
        run(args, regimes, device)
    finally:
        dist.destroy_process_group()


def run(args, regimes: list[Regime], device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    start = time.perf_counter()
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world,))
    if hasattr(torch._dynamo.config, "nested_graph_breaks"):
        torch._dynamo.config.nested_graph_breaks = args.nested_graph_breaks
    elif args.nested_graph_breaks:
        args.nested_graph_breaks = None  # this torch has no such option: recorded as such
    # every decoder layer is its own graph and recompiles (guarded layer_idx): room for all of them,
    # per regime where torch.compile isolates recompiles, else for all regimes together
    per_regime = 2 * args.layers + 8
    limit = per_regime if _ISOLATE else per_regime * len(regimes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit,
                                                           limit * len(regimes))
    os.makedirs(args.out, exist_ok=True)
    info = run_info(args, device)
    info.update(world_size=world, process_group=dist.get_backend(),
                command=f"torchrun --nproc_per_node {world} " + shlex.join(sys.argv),
                devices=gather(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"))
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    base = build(MODEL, args.hidden, args.layers, vocab=args.vocab, max_positions=max(2048, args.seq)).to(dtype)
    generator = torch.Generator().manual_seed(args.seed * 1000 + rank)  # each rank its own batch
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(device)
    params = sum(p.numel() for p in base.parameters())
    tokens_per_step = world * args.batch * args.seq
    records = [{"regime": r.name, "status": "pending", "rounds": [], "wall_s": 0.0, "params": params,
                "sites": None, "compressed_sites": None, "v_same_on_all_ranks": None} for r in regimes]
    by_name = {r["regime"]: r for r in records}
    log(start, f"{world} ranks on {info['device']}, {params / 1e6:.1f} M params, {tokens_per_step} tokens/step")
    for group in ([[r] for r in regimes] if args.sequential else [regimes]):
        runners = {}
        for regime in group:
            record = by_name[regime.name]
            late = args.warm_deadline is not None and time.perf_counter() - start > args.warm_deadline
            if rank0_says(late):
                record.update(status="skipped", note=f"not compiled: past --warm-deadline {args.warm_deadline:g} s")
                log(start, f"{regime.name:22s} skipped ({record['note']})")
                continue
            runner = warm_regime(regime, base, ids, mesh, record, args, start)
            if runner is not None:
                runners[regime.name] = runner
            gc.collect()
            write_outputs(records, info, args, start)
        for round_index in range(args.rounds):
            for name in list(runners):
                if not time_block(runners[name], by_name[name], round_index, tokens_per_step, start):
                    del runners[name]
                    gc.collect()
                write_outputs(records, info, args, start)
        del runners
        cleanup(device)
    write_outputs(records, info, args, start)
    log(start, "done")
    if rank == 0:
        with open(os.path.join(args.out, "summary.md")) as fh:
            print(fh.read())


if __name__ == "__main__":
    main()
