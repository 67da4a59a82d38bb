"""Quality ablation: which VeLoRA sites cost validation loss, relative to exact training?

Two small Llama-like LMs trained from the same initial weights, on the same batches in the same
order, with the same schedule, once per *regime*; validation loss on fixed held-out batches
every ``--eval-every`` steps.  The exact anchor is plain inductor (regime ``inductor``).

Models (``--model``):
  byte  byte-level LM (vocab 256) on ``velora_fx.data.stdlib_text()``
  bpe   LM on a byte-level BPE vocabulary (``--vocab``, default 8192) trained locally on the
        standard library's sources incl. tests (``benchmarks/text_data.py``; cached)

Regimes (``--regimes`` and/or ``--preset``):
  inductor             exact anchor: torch.compile(model) (``aot_eager_decomp_partition`` under
                       ``--compiler eager``, the default on CPU); always run, added if missing
  eager                the model uncompiled
  eager_reference      velora_fx.reference.apply_velora on *v_proj, *down_proj (paper), uncompiled
  velora_auto          velora_fx.backend(mode="auto")
  velora_all           velora_fx.backend(mode="all")
  velora_paper         velora_fx.backend(mode="all", include=[*v_proj, *down_proj], num_groups=32)
  velora[k=v;k=v...]   velora_fx.backend(**options); keys: include / exclude (comma-separated
                       globs), g (sub_token_size), groups (num_groups), init, mode, max_error,
                       and any other backend option by its own name (value parsed as int, float,
                       true/false/none, else string).  ``velora[]``: the backend's defaults.
  e.g.  "velora[mode=all;include=*q_proj,*k_proj,*v_proj;g=16]"   (quote it: ; and * are shell syntax)

    python benchmarks/quality.py --model byte --preset ablation --parallel 7 --out results/quality_byte
    python benchmarks/quality.py --model bpe  --preset ablation --parallel 7 --out results/quality_bpe
    python benchmarks/quality.py --model byte --preset ablation --parallel 7 --estimate   # print the time estimate only
    python benchmarks/quality.py --device cpu --model byte --steps 6 --layers 1 --hidden 64 --batch 4 \\
        --seq 64 --eval-every 3 --parallel 2 --regimes inductor "velora[mode=all;include=*down_proj;g=16]" --out /tmp/q

``--parallel N`` runs the regimes as N concurrent subprocesses (one regime each) on the same
device; ``--parallel 0`` runs them one after another in this process.  A regime that fails, or
runs past ``--timeout`` seconds, is reported as failed; the others go on.
"""
from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import REFERENCE_INCLUDE, LMLoss, gpt2_like, llama_like  # noqa: E402
from text_data import bpe_corpus, default_cache_dir  # noqa: E402
from velora_fx.data import token_lm_batches  # noqa: E402

import velora_fx  # noqa: E402
from velora_fx.data import byte_lm_batches, stdlib_text  # noqa: E402

EXACT = "inductor"
DEFAULT_REGIMES = ("inductor", "velora_auto", "velora_all")
NAMED = ("inductor", "eager", "eager_reference", "velora_auto", "velora_all", "velora_paper")
_SITE_KINDS = {  # Llama-like site kinds, by the linear layers that read the activation
    "qkv": "*q_proj,*k_proj,*v_proj",
    "o": "*o_proj",
    "gate_up": "*gate_proj,*up_proj",
    "down": "*down_proj",
    "lm_head": "*lm_head",
}
PRESETS = {
    "ablation": (
        ["inductor", "velora_auto", "velora[max_error=0.75]", "velora[max_error=0.9]"]
        + [f"velora[mode=all;include={globs};g=16]" for globs in _SITE_KINDS.values()]
        + [f"velora[mode=all;g={g}]" for g in (2, 4, 8, 16, 32)]
        + [f"velora[mode=all;include=*v_proj,*down_proj;g=16;init={init}]" for init in ("first_batch", "ema:0.9")]
    ),
    "check": ["inductor", "velora_auto", "velora[mode=max_memory]"],
}
_ALIASES = {"g": "sub_token_size", "groups": "num_groups"}
_LIST_KEYS = {"include", "exclude", "codecs"}
PROGRESS = "[q] "  # lines a worker prints with this prefix are echoed by the parent


# --------------------------------------------------------------------------------------------
# regime specs
# --------------------------------------------------------------------------------------------
def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict]:
    """``(kind, backend options)``; kind is ``inductor``, ``eager``, ``eager_reference`` or
    ``velora``.  Raises ValueError on a malformed spec (before anything runs)."""
    spec = spec.strip()
    if spec in ("inductor", "eager", "eager_reference"):
        return spec, {}
    if spec == "velora_auto":
        return "velora", {"mode": "auto"}
    if spec == "velora_all":
        return "velora", {"mode": "all"}
    if spec == "velora_paper":
        return "velora", {"mode": "all", "include": list(REFERENCE_INCLUDE["llama"]), "num_groups": 32}
    m = re.fullmatch(r"velora\[(.*)\]", spec, flags=re.S)
    if not m:
        raise ValueError(f"unknown regime {spec!r}: use one of {NAMED} or velora[key=value;...]")
    options: dict = {}
    for item in filter(None, (part.strip() for part in m.group(1).split(";"))):
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep or not key:
            raise ValueError(f"regime {spec!r}: {item!r} is not key=value")
        key = _ALIASES.get(key, key)
        if key in options:
            raise ValueError(f"regime {spec!r}: {key!r} given twice")
        if key in _LIST_KEYS:
            options[key] = [p.strip() for p in raw.split(",") if p.strip()]
        elif key in ("init", "mode"):
            options[key] = raw
        else:
            options[key] = _value(raw)
    return "velora", options


def slug(spec: str) -> str:
    """A file-name-safe form of a regime spec, e.g. ``velora_mode-all_include-down_proj_g-16``."""
    s = spec.strip().replace("[", "_").replace("]", "")
    for old, new in (("=", "-"), (";", "_"), (",", "+"), ("*", ""), (":", "-")):
        s = s.replace(old, new)
    s = re.sub(r"_+", "_", re.sub(r"[^A-Za-z0-9.+_-]", "_", s)).strip("_.") or "regime"
    if len(s) > 100:
        s = s[:90] + "_" + hashlib.sha1(spec.encode()).hexdigest()[:8]
    return s


def expand_regimes(regimes: list[str] | None, presets: list[str] | None) -> list[str]:
    """Presets, then explicit regimes, duplicates dropped, the exact regime first."""
    specs: list[str] = []
    for name in presets or []:
        specs += PRESETS[name]
    specs += regimes or []
    if not specs:
        specs = list(DEFAULT_REGIMES)
    out: list[str] = []
    for s in (s.strip() for s in specs):
        if s not in out:
            out.append(s)
    if EXACT in out:
        out.remove(EXACT)
    return [EXACT] + out


def backend_options(spec: str, args) -> dict:
    kind, options = parse_spec(spec)
    options = dict(options)
    if kind == "velora" and args.num_groups and "num_groups" not in options and "sub_token_size" not in options:
        options["num_groups"] = args.num_groups
    return options


def prepare(spec: str, model: torch.nn.Module, args):
    """The callable to train with, the velora_fx backend (if any), and what was built."""
    kind, _ = parse_spec(spec)
    if kind == "eager":
        return model, None, {"backend": "eager"}
    if kind == "inductor":
        name = "inductor" if args.compiler == "inductor" else "aot_eager_decomp_partition"
        return torch.compile(model, backend=name), None, {"backend": name}
    if kind == "eager_reference":
        include = list(REFERENCE_INCLUDE["llama"])
        apply_velora = velora_fx.reference.apply_velora
        wrapped = apply_velora(model, include=include, num_groups=args.num_groups or 32, init="first_batch")
        return model, None, {"backend": "eager_reference", "wrapped": wrapped}
    options = backend_options(spec, args)
    backend = velora_fx.backend(compiler=args.compiler, **options)  # raises on options this checkout lacks
    return torch.compile(model, backend=backend), backend, {"backend": "velora_fx", "backend_options": options,
                                                            "compiler": args.compiler}


# --------------------------------------------------------------------------------------------
# data and model
# --------------------------------------------------------------------------------------------
def text_choice(args) -> str:
    return args.text or ("stdlib" if args.model == "byte" else "stdlib+tests")


def load_data(args, verbose: bool = False, device: str | None = None):
    """``(make_train_batches(), val_batches, vocab, meta)``; identical in every process."""
    device = torch.device(device or args.device)
    text = stdlib_text(args.max_bytes, include_tests=text_choice(args) == "stdlib+tests")
    if args.model == "byte":
        def batches(split, seed):
            return byte_lm_batches(text, args.batch, args.seq, split=split, seed=seed, device=device)
        vocab, meta = 256, {"kind": "byte", "vocab_size": 256, "tokens": len(text)}
    else:
        ids, meta = bpe_corpus(text, args.vocab, cache_dir=args.cache_dir, tokenizer=args.tokenizer, verbose=verbose)

        def batches(split, seed):
            return token_lm_batches(ids, args.batch, args.seq, split=split, seed=seed, device=device)
        vocab = meta["vocab_size"]
    meta = {**meta, "text": text_choice(args), "text_bytes": len(text)}
    meta["epochs"] = args.steps * args.batch * args.seq / (0.95 * meta["tokens"])
    val_gen = batches("val", args.seed + 1)
    val_batches = [next(val_gen) for _ in range(args.val_batches)]
    return (lambda: batches("train", args.seed)), val_batches, vocab, meta


def build_model(args, vocab: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    heads = min(args.heads, max(1, args.hidden // 16))
    if args.arch == "gpt2":  # Conv1D projections (c_attn, c_proj, c_fc), GELU MLP of 4 x hidden
        return LMLoss(gpt2_like(args.hidden, args.layers, vocab=vocab, heads=heads, max_positions=max(512, args.seq)))
    return LMLoss(llama_like(args.hidden, args.layers, vocab=vocab, heads=heads, intermediate=args.intermediate,
                             max_positions=max(512, args.seq)))


# --------------------------------------------------------------------------------------------
# one regime
# --------------------------------------------------------------------------------------------
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


def _report_fields(backend) -> dict:
    report = backend.report()
    d = report.to_dict()
    sites = [s for g in d.get("graphs", []) for s in g.get("sites", [])]
    compressed = [s for s in sites if s.get("decision") == "compressed"]
    out = {"report": d, "compressed_sites": len(compressed), "sites": len(sites),
           "approximated_weights": sum(len(s.get("approximated") or []) for s in compressed),
           "graph_status": [g.get("status") for g in d.get("graphs", [])],
           "report_saved_bytes_before": d.get("saved_bytes_before"),
           "report_saved_bytes_after": d.get("saved_bytes_after")}
    sizes = sorted({s["sub_token_size"] for s in compressed if s.get("sub_token_size") is not None})
    if sizes:
        out["sub_token_sizes"] = sizes
    errors = [s["estimated_error"] for s in compressed if isinstance(s.get("estimated_error"), (int, float))]
    if errors:
        out["estimated_error_max"], out["estimated_error_mean"] = max(errors), sum(errors) / len(errors)
    return out


def run_regime(spec: str, base: torch.nn.Module, make_train, val_batches, args, partial_path: str | None = None) -> dict:
    device = torch.device(args.device)
    model = copy.deepcopy(base).to(device)
    fn, backend, built = prepare(spec, model, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    train = make_train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast)

    curve = {"step": [], "val_loss": [], "train_loss": []}
    pending: list[torch.Tensor] = []
    out: dict = dict(built)
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
            print(f"{PROGRESS}{spec}: compiled, first step {out['first_step_s']:.1f} s", flush=True)
            t_mark = time.perf_counter()
        if step % args.eval_every == 0 or step == args.steps:
            train_loss = torch.stack(pending).float().mean().item()  # syncs
            train_time += time.perf_counter() - t_mark
            pending.clear()
            val = evaluate(model, val_batches, autocast)
            curve["step"].append(step)
            curve["val_loss"].append(val)
            curve["train_loss"].append(train_loss)
            print(f"{PROGRESS}{spec}: step {step:5d}  train {train_loss:.4f}  val {val:.4f}", flush=True)
            if not math.isfinite(val):
                raise FloatingPointError(f"validation loss is {val} at step {step}")
            if partial_path:  # a regime cut off later still leaves its curve so far
                _write_json(partial_path, {**out, "status": "running", "curve": curve,
                                           "ms_per_step": 1e3 * train_time / max(1, step - 1)})
            t_mark = time.perf_counter()
    out.update(curve=curve, final_val_loss=curve["val_loss"][-1], min_val_loss=min(curve["val_loss"]),
               wall_s=time.perf_counter() - t_start, ms_per_step=1e3 * train_time / max(1, args.steps - 1))
    if device.type == "cuda":
        out["peak_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if backend is not None:
        out.update(_report_fields(backend))
    return out


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def run_one(spec: str, base, make_train, val_batches, args, info: dict, path: str) -> dict:
    """Run a regime, catching its error; write and return its record."""
    record = {**info, "regime": spec, "slug": slug(spec)}
    t0 = time.perf_counter()
    try:
        record.update(run_regime(spec, base, make_train, val_batches, args, partial_path=path), status="ok")
    except Exception as exc:  # noqa: BLE001 - record it and go on with the next regime
        partial = _read_json(path) or {}
        record.update({k: v for k, v in partial.items() if k in ("curve", "first_step_s", "backend_options")})
        record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        print(f"{PROGRESS}{spec}: {record['error'][:300]}", flush=True)
    record["regime_wall_s"] = time.perf_counter() - t0
    _write_json(path, record)
    return record


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# worker subprocess and the parallel pool
# --------------------------------------------------------------------------------------------
def worker_main(payload_json: str) -> None:
    payload = json.loads(payload_json)
    args = argparse.Namespace(**payload["args"])
    if payload.get("threads"):
        torch.set_num_threads(payload["threads"])
    make_train, val_batches, vocab, _ = load_data(args)
    base = build_model(args, vocab)
    base.load_state_dict(torch.load(payload["init_state"], map_location="cpu"))
    record = run_one(payload["regime"], base, make_train, val_batches, args, payload["info"], payload["json"])
    sys.exit(0 if record["status"] == "ok" else 3)


def _tail(path: str, chars: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - chars))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _kill(proc: subprocess.Popen) -> None:
    """End a worker and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _die_with_parent() -> None:  # runs in the worker before exec (Linux): SIGTERM when the parent dies
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_parallel(specs: list[str], args, info: dict, init_state: str, on_record) -> None:
    n = max(1, args.parallel)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // min(n, len(specs)))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))  # n compiles share the CPU cores
    pending, running = list(specs), {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below: end the workers
    try:
        while pending or running:
            while pending and len(running) < n:
                spec = pending.pop(0)
                name = slug(spec)
                path, log = (os.path.join(args.out, f"quality_{name}{ext}") for ext in (".json", ".log"))
                if os.path.exists(path):
                    os.remove(path)
                payload = {"args": vars(args), "regime": spec, "json": path, "init_state": init_state,
                           "threads": threads, "info": info}
                fh = open(log, "w")
                proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(payload)],
                                        stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
                running[spec] = dict(proc=proc, log=log, fh=fh, path=path, t0=time.time(), pos=0)
                print(f"started {spec} (pid {proc.pid}, log {log})", flush=True)
            time.sleep(0.5)
            for spec, job in list(running.items()):
                _echo_progress(job)
                rc = job["proc"].poll()
                timed_out = rc is None and args.timeout and time.time() - job["t0"] > args.timeout
                if rc is None and not timed_out:
                    continue
                if timed_out:
                    _kill(job["proc"])
                job["fh"].close()
                _echo_progress(job)
                on_record(_collect(spec, job, info, rc, timed_out, args.timeout))
                del running[spec]
    finally:
        for job in running.values():
            _kill(job["proc"])


def _echo_progress(job: dict) -> None:
    try:
        with open(job["log"], "rb") as fh:
            fh.seek(job["pos"])
            data = fh.read()
    except OSError:
        return
    cut = data.rfind(b"\n") + 1
    job["pos"] += cut
    for line in data[:cut].decode(errors="replace").splitlines():
        if line.startswith(PROGRESS):
            print("  " + line[len(PROGRESS):], flush=True)


def _collect(spec: str, job: dict, info: dict, rc, timed_out: bool, timeout) -> dict:
    record = _read_json(job["path"])
    wall = time.time() - job["t0"]
    if record is not None and record.get("status") == "ok" and rc == 0:
        record["process_wall_s"] = wall
        return record
    base = {**info, "regime": spec, "slug": slug(spec)}
    record = {**base, **(record or {})}
    if timed_out:
        record.update(status="error", error=f"timeout: killed after {timeout} s")
    elif record.get("status") != "error":
        record.update(status="error", error=f"worker exited with code {rc} without a result")
    record.update(process_wall_s=wall, log_tail=_tail(job["log"]))
    _write_json(job["path"], record)
    print(f"  {spec}: FAILED ({record['error'][:200]})", flush=True)
    return record


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------
def _exact(records):
    return next((r for r in records if r["regime"] == EXACT and r["status"] == "ok"), None)


def summary_rows(records: list[dict]) -> list[dict]:
    exact = _exact(records)
    rows = []
    for r in records:
        row = {"regime": r["regime"], "slug": r.get("slug"), "status": r["status"]}
        if r["status"] == "ok":
            row.update(final_val_loss=r["final_val_loss"], min_val_loss=r.get("min_val_loss"),
                       ms_per_step=r["ms_per_step"], first_step_s=r.get("first_step_s"))
            if exact:
                row["relative_to_exact_pct"] = 100 * (r["final_val_loss"] / exact["final_val_loss"] - 1)
            for key in ("compressed_sites", "sites", "approximated_weights", "sub_token_sizes",
                        "report_saved_bytes_before", "report_saved_bytes_after",
                        "estimated_error_max", "estimated_error_mean", "peak_memory_GiB"):
                if key in r:
                    row[key] = r[key]
        else:
            row["error"] = r.get("error")
            if r.get("curve", {}).get("val_loss"):
                row["last_val_loss"], row["last_step"] = r["curve"]["val_loss"][-1], r["curve"]["step"][-1]
        rows.append(row)
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| regime | final val loss | vs exact | sites compressed | weights approx. | saved act. after / before "
             "| g | est. error max | ms/step | compile + 1st step s | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = f"`{r['regime']}`"
        if r["status"] != "ok":
            err = (r.get("error") or "").replace("|", "/").replace("\n", " ")[:120]
            last = f" (last val {r['last_val_loss']:.4f} at step {r['last_step']})" if "last_val_loss" in r else ""
            lines.append(f"| {name} | – | – | – | – | – | – | – | – | – | failed: {err}{last} |")
            continue
        rel = f"{r['relative_to_exact_pct']:+.2f} %" if "relative_to_exact_pct" in r else "–"
        sites = f"{r['compressed_sites']} / {r['sites']}" if "sites" in r else "–"
        weights = str(r.get("approximated_weights", "–"))
        before, after = r.get("report_saved_bytes_before"), r.get("report_saved_bytes_after")
        ratio = f"{after / before:.2f}" if before else "–"
        g = ",".join(map(str, r.get("sub_token_sizes", []))) or "–"
        first = f"{r['first_step_s']:.0f}" if r.get("first_step_s") is not None else "–"
        err = f"{r['estimated_error_max']:.2f}" if "estimated_error_max" in r else "–"
        lines.append(f"| {name} | {r['final_val_loss']:.4f} | {rel} | {sites} | {weights} | {ratio} | {g} | {err} "
                     f"| {r['ms_per_step']:.1f} | {first} | ok |")
    return "\n".join(lines) + "\n"


def write_summary(records: list[dict], specs: list[str], info: dict, args) -> str:
    order = {s: i for i, s in enumerate(specs)}
    records = sorted(records, key=lambda r: order.get(r["regime"], len(order)))
    rows = summary_rows(records)
    summary = {**info, "regimes": specs, "rows": rows,
               "final_val_loss": {r["regime"]: r.get("final_val_loss") for r in rows},
               "relative_to_exact": {r["regime"]: r["relative_to_exact_pct"] / 100 for r in rows
                                     if "relative_to_exact_pct" in r},
               "files": {r["regime"]: f"quality_{r['slug']}.json" for r in rows}}
    _write_json(os.path.join(args.out, "quality_summary.json"), summary)
    d = info["data"]
    model = (f"byte-level (vocab 256)" if args.model == "byte"
             else f"{d['kind'].upper()} vocab {d['vocab_size']}")
    header = (f"quality: {info['device']}, torch {info['torch']}, {'GPT-2' if getattr(args, 'arch', 'llama') == 'gpt2' else 'Llama'}-like {args.layers} x {args.hidden}, "
              f"{model}, {info['params'] / 1e6:.1f} M params, batch {args.batch} x {args.seq}, {args.steps} steps "
              f"({d['epochs']:.2f} epochs of {d['text']}), {'fp32' if args.no_autocast else 'bf16 autocast'}, "
              f"compiler {args.compiler}, parallel {args.parallel} (ms/step is measured under that sharing)"
              f"\n\n`{shlex.join(info['command'])}`")
    text = markdown(rows, header)
    with open(os.path.join(args.out, "quality_summary.md"), "w") as fh:
        fh.write(text)
    return text


# --------------------------------------------------------------------------------------------
# GPU time estimate (a cost model with guessed constants, not a measurement)
# --------------------------------------------------------------------------------------------
H100 = dict(tflops=300e12,       # achieved bf16 matmul rate on these small GEMMs (peak ~990)
            bandwidth=2.0e12,    # achieved HBM bandwidth of the elementwise kernels (peak ~3.3)
            share=0.85,          # throughput kept when several processes time-slice one GPU
            cpu_step_ms=5.0,     # host time of one step: inductor launches, clip, AdamW (foreach)
            startup_s=15.0,      # python + torch + transformers imports, CUDA context, data
            compile_s=20.0, compile_per_layer_s=5.0,  # one cold inductor compile, alone on the CPU
            velora_compile=1.3,  # the rewrite's extra partitioner work
            compile_contention=0.08,  # +8 % compile time per other process compiling at once
            velora_step=1.15,    # encode/decode kernels of a compressed regime
            eval_s=2.0)          # all evaluations of one regime


def estimate_seconds(args, specs: list[str], vocab: int, hw: dict = H100) -> dict:
    """Simulated wall time of the run on one H100: compile phase, then training steps whose GPU
    work is shared by all processes training at that moment (processor sharing)."""
    h, layers, inter = args.hidden, args.layers, args.intermediate
    tokens, seq = args.batch * args.seq, args.seq
    params_layer = 4 * h * h + 3 * h * inter
    params = layers * params_layer + 2 * vocab * h
    flops = 6 * tokens * (layers * params_layer + vocab * h) + layers * 7 * tokens * seq * h
    act_bytes = tokens * layers * 2 * (14 * h + 6 * inter) * 3 + tokens * vocab * 14
    gpu_ms = 1e3 * (flops / hw["tflops"] + (act_bytes + 36 * params) / hw["bandwidth"])
    n = max(1, args.parallel)
    jobs = []
    for spec in specs:
        velora = parse_spec(spec)[0] == "velora"
        jobs.append({"compile": (hw["compile_s"] + hw["compile_per_layer_s"] * layers)
                     * (hw["velora_compile"] if velora else 1.0),
                     "gpu_ms": gpu_ms * (hw["velora_step"] if velora else 1.0), "steps": args.steps})
    t, dt, queue, active = 0.0, 0.25, list(jobs), []
    while queue or active:
        while queue and len(active) < n:
            job = queue.pop(0)
            job.update(phase="start", left=hw["startup_s"] + hw["eval_s"])
            active.append(job)
        compiling = sum(j["phase"] == "compile" for j in active)
        training = [j for j in active if j["phase"] == "train"]
        gpu_load = sum(j["gpu_ms"] for j in training)
        step_ms = max(hw["cpu_step_ms"], gpu_load / (hw["share"] if len(training) > 1 else 1.0))
        for j in active:
            if j["phase"] == "start":
                j["left"] -= dt
                if j["left"] <= 0:
                    j.update(phase="compile", left=j["compile"])
            elif j["phase"] == "compile":
                j["left"] -= dt / (1 + hw["compile_contention"] * max(0, compiling - 1))
                if j["left"] <= 0:
                    j.update(phase="train", left=j["steps"])
            else:
                j["left"] -= dt * 1e3 / step_ms
                if j["left"] <= 0:
                    j["phase"] = "done"
        active = [j for j in active if j["phase"] != "done"]
        t += dt
    alone_ms = max(hw["cpu_step_ms"], gpu_ms)
    return {"total_s": t, "gpu_ms_per_step_alone": gpu_ms, "ms_per_step_alone": alone_ms,
            "params_M": params / 1e6, "gflop_per_step": flops / 1e9}


def print_estimate(args, specs, vocab) -> dict:
    est = estimate_seconds(args, specs, vocab)
    prep = 20.0 if args.model == "bpe" else 3.0  # tokenizer training + encoding, first run only
    print(f"estimate (one H100, cost model with guessed constants, see H100 in quality.py): "
          f"{len(specs)} regimes, --parallel {max(1, args.parallel)}, {args.steps} steps of "
          f"{args.batch} x {args.seq} on {args.layers} x {args.hidden} (vocab {vocab}, {est['params_M']:.1f} M params, "
          f"{est['gflop_per_step']:.0f} GFLOP/step, ~{est['ms_per_step_alone']:.1f} ms/step alone): "
          f"about {(est['total_s'] + prep) / 60:.1f} min", flush=True)
    return est


# --------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default="byte", choices=["byte", "bpe"])
    ap.add_argument("--arch", default="llama", choices=["llama", "gpt2"],
                    help="Llama-like (default) or GPT-2-like (Conv1D sites c_attn, attn.c_proj, c_fc, mlp.c_proj)")
    ap.add_argument("--regimes", nargs="+", default=None, help=f"named regimes {NAMED} or velora[key=value;...] specs")
    ap.add_argument("--preset", nargs="+", default=None, choices=sorted(PRESETS),
                    help="ablation: %d regimes; check: %s" % (len(PRESETS["ablation"]), ", ".join(PRESETS["check"])))
    ap.add_argument("--parallel", type=int, default=1, help="concurrent worker processes (0: in this process)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per regime in a worker (0: none)")
    ap.add_argument("--estimate", action="store_true", help="print the H100 time estimate and exit")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--val-batches", type=int, default=16)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192, help="--model bpe: vocabulary size")
    ap.add_argument("--tokenizer", default="auto", choices=["auto", "bpe", "word"],
                    help="--model bpe: BPE via the tokenizers package (auto: if importable) or word-level")
    ap.add_argument("--text", default=None, choices=["stdlib", "stdlib+tests"],
                    help="training text (default: stdlib for byte, stdlib+tests for bpe)")
    ap.add_argument("--cache-dir", default=default_cache_dir(), help="tokenised corpus cache")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (at most steps / 10)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--num-groups", type=int, default=None,
                    help="num_groups for velora regimes that set neither g nor groups (default: the backend's)")
    ap.add_argument("--compiler", default=None, choices=["inductor", "eager"],
                    help="inductor (default on CUDA) or eager (default on CPU: no codegen; the exact "
                         "regime then uses aot_eager_decomp_partition)")
    ap.add_argument("--no-autocast", action="store_true", help="train in fp32 (default: bf16 autocast)")
    ap.add_argument("--max-bytes", type=int, default=None, help="truncate the stdlib text (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="default: results/quality_<model>")
    args = ap.parse_args()
    args.compiler = args.compiler or ("inductor" if args.device.startswith("cuda") else "eager")
    args.out = args.out or f"results/quality_{args.model}"
    specs = expand_regimes(args.regimes, args.preset)
    try:
        for spec in specs:
            parse_spec(spec)
    except ValueError as exc:
        ap.error(str(exc))
    slugs = [slug(s) for s in specs]
    if len(set(slugs)) != len(slugs):
        ap.error(f"two regimes map to the same file name: {slugs}")
    if args.estimate:
        print_estimate(args, specs, 256 if args.model == "byte" else args.vocab)
        return

    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    # builds the BPE cache once, before any worker starts; workers put the batches on the device
    make_train, val_batches, vocab, data_meta = load_data(args, verbose=True,
                                                          device="cpu" if args.parallel > 0 else None)
    base = build_model(args, vocab)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "velora_fx": velora_fx.__version__, "command": sys.argv,
            "config": vars(args), "data": data_meta, "params": sum(p.numel() for p in base.parameters())}
    print(f"{info['device']}: {args.model} model, {data_meta['tokens'] / 1e6:.2f} M tokens "
          f"({data_meta['epochs']:.2f} epochs), {info['params'] / 1e6:.1f} M params, {len(specs)} regimes", flush=True)
    if device.type == "cuda":
        print_estimate(args, specs, vocab)
    records: list[dict] = []

    def on_record(record: dict) -> None:
        records.append(record)
        write_summary(records, specs, info, args)

    t0 = time.perf_counter()
    if args.parallel <= 0:
        for spec in specs:
            on_record(run_one(spec, base, make_train, val_batches, args, info,
                              os.path.join(args.out, f"quality_{slug(spec)}.json")))
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    else:
        tmp = tempfile.mkdtemp(prefix="velora_quality_")
        try:
            init_state = os.path.join(tmp, "init.pt")
            torch.save(base.state_dict(), init_state)  # every worker starts from these weights
            run_parallel(specs, args, info, init_state, on_record)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    info["total_wall_s"] = time.perf_counter() - t0
    print(write_summary(records, specs, info, args))
    print(f"total {info['total_wall_s']:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
