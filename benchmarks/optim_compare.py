"""Optimizer and adapter comparison (issue 8, item 6): AdamW, GaLore, Online Subspace Descent and
NAG-GS pre-training a ~58 M-parameter Llama-like LM on offline text for one token budget, then
LoRA vs LoTR fine-tuning at (about) equal trainable parameters.

Why these choices:

* **Model.** ``models.llama_like`` with GaLore's "60M" LLaMA shape (8 layers x 512 hidden, 8 heads,
  intermediate 1376, untied lm_head, vocab 32000): 58.1 M parameters, of which 32.8 M are the
  embedding and lm_head and 25.3 M the 2-D hidden weights.  Same shape as the papers' smallest
  model, so the rank (128) and GaLore's recipe carry over.
* **Tokens.** A 32000-entry byte-level BPE trained locally on the text (``text_data.bpe_corpus``,
  cached; ~10-30 s once).  BPE rather than bytes because a byte LM spends a 60 M model on spelling
  and would not look like the papers' setting; 32000 (not 8192) to keep the papers' vocabulary
  and parameter split.
* **Text.** Pre-training: the standard library's ``.py`` sources *with* tests minus
  ``pydoc_data/topics.py`` (9.9 MB on the H100 machine's Python 3.12: 2.43 M tokens, so the
  16.4 M-token budget is 7.1 epochs and AdamW's validation loss bottoms out at step ~700 --
  tables show the final and the minimum); the last 5 % (by position) is validation.  Fine-tuning: the Language
  Reference help topics (``pydoc_data.topics``, ``examples/finetune_lora.finetune_corpus``),
  prose the pre-training never saw; last 10 % is validation.
* **Same everything but the optimizer.** One random init, the same batches in the same order, the
  same warmup (10 %) + cosine (to 10 %) schedule on every learning rate, grad clip 1.0, bf16
  autocast with fp32 weights, no weight decay (GaLore's setting; NAG-GS's decay is L2 so 0 keeps
  them comparable).  The compiled module returns the loss (lm_head and cross-entropy in the graph).
* **Learning rates** (fixed by default, ``--lr-sweep`` to check them):
  AdamW 1e-3 (GaLore paper's 60M baseline);
  GaLore lr 1e-2 with scale 0.25, rank 128, projection refresh every 200 steps on the 2-D hidden
  weights (the paper's 60M recipe; update size lr·scale = 2.5e-3);
  OSD the same lr / scale / rank (its paper trains with GaLore's recipe), P by Adam at the
  optimizer's default ``proj_lr`` 5e-3 following the schedule (the authors' code; the paper's
  5·lr = 0.05 at this lr stalled training: val loss 6.09 against AdamW's 4.02, H100 run of
  2026-11-26);
  both low-rank methods keep embeddings, lm_head and norms on plain AdamW at the AdamW baseline's
  1e-3, so only the treatment of the hidden matrices differs;
  NAG-GS α = 0.1, μ = 0.02, γ = 1.  Its step on a steady gradient is a/(2μ)·g with
  a = α/(1 + α) (``naggs_effective_lr``), so μ, not α, sets the step size; with the authors'
  μ = 1 it is < 0.5·g and a fresh transformer barely trains.  CPU sweeps of μ ∈ {0.1, 0.033, 0.01}:
  best 0.033 at 0.17 M and 1.3 M parameters (150-200 steps), best 0.01 on this 58 M model in a
  40-step check; 0.02 (step 2.3·g, momentum time ~11 steps) sits between, on the stable side.
* **Measured.** Validation loss every ``--eval-every`` steps (eager module, same fixed held-out
  batches); optimizer-state bytes (every tensor in ``optimizer.state``, including GaLore's
  projection matrices, split into hidden-matrix and other parameters); step time with
  ``torch.cuda.synchronize()`` around each step (median; mean incl. GaLore's SVD refreshes gives
  tokens/s); peak CUDA memory over training steps (evaluations excluded); memory resident after a
  step (weights + optimizer state).
* **Fine-tuning.** The AdamW-trained weights, frozen; PEFT LoRA r=8 (alpha 16) on
  q/k/v/o/gate/up/down vs ``apply_lotr`` on the same modules with the rank whose parameter count
  is closest to LoRA's (per name, factors shared by the 8 layers: ``d_in·r + d_out·r + 8·r²``;
  rank 50: 628,000 vs LoRA's 624,640); AdamW 1e-3 for both; 150 steps x 8 x 256 (110 k tokens of
  text, so ~3 epochs).

Time: the default run is sized for one H100 in under ~8 minutes with every compile (estimate
in the README); ``--deadline`` seconds (from start) stops starting new runs, a run still going at
``deadline + grace`` is cut (recorded as such).  Results are rewritten after every run.

    python benchmarks/optim_compare.py --out results/optim                   # GPU default
    python benchmarks/optim_compare.py --device cpu --tiny --out /tmp/oc     # CPU smoke (< 2 min)
    python benchmarks/optim_compare.py --lr-sweep --optimizers naggs --skip-finetune --out /tmp/sweep
    python benchmarks/optim_compare.py --replot results/optim/results.json --out results/optim  # redraw

Output in ``--out``: ``results.json`` (device, versions, commit, command, config, curves, every
number, errors with tracebacks), ``summary.md`` (tables), ``loss_curves.png`` (if matplotlib).
"""
from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
for _p in (_HERE, os.path.join(_ROOT, "examples")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from models import LMLoss, llama_like  # noqa: E402
from text_data import _documents, bpe_corpus, default_cache_dir  # noqa: E402

import velora_fx  # noqa: E402
from velora_fx.data import stdlib_text, token_lm_batches  # noqa: E402
from velora_fx.optim import NAGGS, OnlineSubspaceDescent  # noqa: E402

OPTIMIZERS = ("adamw", "galore", "osd", "naggs")
ADAPTERS = ("lora", "lotr")
FINETUNE_FILE = b"# file: pydoc_data/topics.py\n"

# Presets; any flag given on the command line wins.  "gpu": the issue's run on one H100;
# "tiny": a CPU smoke test on 2 cores (~1 min, mostly compiles and the small BPE).
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=32000, seq=256, batch=64, steps=1000,
                eval_every=100, val_batches=16, rank=128, galore_gap=200, max_bytes=None,
                ft_steps=150, ft_batch=8, ft_eval_every=25, ft_val_batches=8, backend="inductor"),
    "tiny": dict(hidden=64, layers=2, heads=4, intermediate=176, vocab=512, seq=64, batch=8, steps=16,
                 eval_every=8, val_batches=2, rank=16, galore_gap=8, max_bytes=2_000_000,
                 ft_steps=6, ft_batch=4, ft_eval_every=3, ft_val_batches=2, backend="aot_eager_decomp_partition"),
}


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def pretrain_text(max_bytes: int | None) -> bytes:
    """The stdlib sources with tests, without the fine-tune corpus (``pydoc_data/topics.py``)."""
    text = stdlib_text(max_bytes, include_tests=True)
    start = text.find(FINETUNE_FILE)
    if start >= 0:
        end = text.find(b"\n# file: ", start + 1)
        text = text[:start] + (text[end + 1:] if end >= 0 else b"")
    return text


def finetune_text() -> bytes:
    """``examples/finetune_lora.finetune_corpus``: the Language Reference help topics."""
    from finetune_lora import finetune_corpus
    return finetune_corpus()


def encode_with(meta: dict, text: bytes) -> torch.Tensor:
    """Ids of ``text`` under the vocabulary ``bpe_corpus`` built (``meta`` is its metadata)."""
    kind = meta["kind"]
    if kind == "byte":
        return torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.int16)
    with open(os.path.join(meta["cache"], "tokenizer.json")) as fh:
        tok_json = fh.read()
    if kind == "word":
        import text_data
        vocab = json.loads(tok_json)["vocab"]
        index = {w: i for i, w in enumerate(vocab)}
        ids = [index.get(w, 0) for w in text_data._WORD_RE.findall(text.decode("utf-8", errors="replace"))]
    else:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tok_json)
        ids = [i for enc in tok.encode_batch(_documents(text)) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.int16 if meta["vocab_size"] <= 2**15 else torch.int32)


def load_corpora(args) -> dict:
    """Token ids of both corpora under one vocabulary trained on the pre-training text."""
    t0 = time.perf_counter()
    pre = pretrain_text(args.max_bytes)
    ft = finetune_text()
    if args.tokenizer == "byte":
        pre_ids = torch.frombuffer(bytearray(pre), dtype=torch.uint8).to(torch.int16)
        meta = {"kind": "byte", "vocab_size": 256, "tokens": len(pre_ids), "text_bytes": len(pre)}
    else:
        pre_ids, meta = bpe_corpus(pre, args.vocab, cache_dir=args.cache_dir, tokenizer=args.tokenizer)
    ft_ids = encode_with(meta, ft)
    meta = {**meta, "text": "stdlib .py incl. tests, minus pydoc_data/topics.py", "text_bytes": len(pre),
            "finetune_text": "pydoc_data.topics (Language Reference help texts)", "finetune_bytes": len(ft),
            "finetune_tokens": len(ft_ids), "prepare_s": time.perf_counter() - t0}
    return {"pre": pre_ids, "ft": ft_ids, "meta": meta, "vocab": int(meta["vocab_size"])}


def batches(ids: torch.Tensor, batch: int, seq: int, split: str, seed: int, val_fraction: float, device):
    return token_lm_batches(ids, batch, seq, split=split, seed=seed, val_fraction=val_fraction, device=device)


def fixed_val(ids, batch, seq, n, seed, val_fraction, device) -> list:
    gen = batches(ids, batch, seq, "val", seed, val_fraction, device)
    return [next(gen) for _ in range(n)]


# --------------------------------------------------------------------------------------------
# model, optimizers, schedule
# --------------------------------------------------------------------------------------------
def build_base(args, vocab: int) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    return llama_like(args.hidden, args.layers, vocab=vocab, heads=args.heads, intermediate=args.intermediate,
                      max_positions=max(512, args.seq))


def is_hidden_matrix(name: str, p: torch.Tensor) -> bool:
    """2-D weights inside the decoder layers: what GaLore / OSD project (not embeddings, lm_head)."""
    return p.ndim == 2 and ".layers." in f".{name}"


def param_split(module: torch.nn.Module) -> tuple[list, list]:
    hidden, other = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (hidden if is_hidden_matrix(name, p) else other).append(p)
    return hidden, other


def optimizer_lr(name: str, args) -> float:
    return {"adamw": args.lr_adamw, "galore": args.lr_galore, "osd": args.lr_osd, "naggs": args.lr_naggs}[name]


def make_optimizer(name: str, module: torch.nn.Module, args, factor: float = 1.0):
    """``(optimizer, description, hyper-parameters)``.  ``factor`` (the LR sweep's) multiplies the
    main learning rate: AdamW's; the hidden matrices' for GaLore / OSD (their other parameters keep
    ``--lr-other``); for NAG-GS it divides μ, since its step on a steady gradient is
    a/(2μ)·g with a = α/(1 + α) < 1 (see :func:`naggs_effective_lr`): α alone cannot scale it."""
    lr = optimizer_lr(name, args) * (factor if name != "naggs" else 1.0)
    hyper = {"lr": lr, "factor": factor}
    hidden, other = param_split(module)
    cuda = args.device.startswith("cuda")
    betas, eps, wd = (0.9, 0.999), 1e-8, args.weight_decay
    lr_other = args.lr_other if args.lr_other is not None else args.lr_adamw
    if name == "adamw":
        opt = torch.optim.AdamW(hidden + other, lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=cuda)
        desc = f"torch.optim.AdamW(lr={lr:g}, fused={cuda})"
    elif name == "galore":
        from velora_fx.optim import galore
        groups = [{"params": other, "lr": lr_other},
                  {"params": hidden, "lr": lr, "rank": args.rank, "update_proj_gap": args.galore_gap,
                   "scale": args.galore_scale, "proj_type": "std"}]
        opt = galore(groups, lr=lr, weight_decay=wd, betas=betas, eps=eps)
        hyper["scale"] = args.galore_scale
        desc = (f"velora_fx.optim.galore(rank={args.rank}, update_proj_gap={args.galore_gap}, "
                f"scale={args.galore_scale}, lr={lr:g}; other params AdamW lr={lr_other:g})")
    elif name == "osd":
        groups = [{"params": other, "lr": lr_other, "subspace": False}, {"params": hidden, "lr": lr}]
        opt = OnlineSubspaceDescent(groups, lr=lr, rank=args.rank, betas=betas, eps=eps, weight_decay=wd,
                                    scale=args.osd_scale, proj_lr=args.osd_proj_lr, proj_ortho=args.osd_proj_ortho,
                                    proj_optimizer=args.osd_proj_optimizer)
        hyper["scale"] = args.osd_scale
        proj = f"{args.osd_proj_lr:g}·lr_t/lr_0"
        desc = (f"OnlineSubspaceDescent(rank={args.rank}, scale={args.osd_scale}, lr={lr:g}, proj_lr={proj}, "
                f"proj_optimizer={args.osd_proj_optimizer}, proj_ortho={args.osd_proj_ortho}; "
                f"other params AdamW lr={lr_other:g})")
    elif name == "naggs":
        mu = args.naggs_mu / factor
        opt = NAGGS(hidden + other, lr=lr, mu=mu, gamma=args.naggs_gamma, weight_decay=wd)
        hyper.update(mu=mu, gamma=args.naggs_gamma, effective_lr=naggs_effective_lr(lr, mu))
        desc = (f"NAGGS(lr(alpha)={lr:g}, mu={mu:g}, gamma={args.naggs_gamma:g}; "
                f"steady-gradient step {hyper['effective_lr']:.3g}·g)")
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    for g in opt.param_groups:  # what the schedule scales (OSD's P rate follows lr by itself)
        g["base_lr"] = g["lr"]
    return opt, desc, hyper


def naggs_effective_lr(alpha: float, mu: float) -> float:
    """NAG-GS's step per iteration under a constant gradient g, once γ = μ (then b = a = α/(1 + α)).

    With x⁺ − x = a(v − x) and v⁺ − v = a(x⁺ − v − g/μ), a steady drift s of both x and v needs
    v − x = s/a and s = a(−s/a − g/μ), so s = −a/(2μ)·g.  α sets the momentum time (~1/a steps),
    μ the step size: at the authors' μ = 1 the step stays below g/2 whatever α, far below the
    SGD step a freshly initialised transformer needs (per-weight gradients ~1e-4 after clipping)."""
    a = alpha / (1 + alpha)
    return a / (2 * mu)


def schedule(step: int, steps: int, warmup_frac: float, min_frac: float) -> float:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine to ``min_frac`` (step is 0-based)."""
    warmup = max(1, int(round(warmup_frac * steps)))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def _tensor_bytes(value: Any, depth: int = 0) -> int:
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, depth + 1) for v in value.values())
    if depth < 2 and hasattr(value, "__dict__") and not isinstance(value, type):  # GaLoreProjector
        return sum(_tensor_bytes(v, depth + 1) for v in vars(value).values())
    return 0


def state_bytes(opt: torch.optim.Optimizer, hidden_ids: set[int]) -> dict:
    """Bytes of every tensor in ``opt.state`` (projectors' matrices included), by parameter kind."""
    out = {"total": 0, "hidden": 0, "other": 0}
    for p, st in opt.state.items():
        n = _tensor_bytes(st)
        out["total"] += n
        out["hidden" if id(p) in hidden_ids else "other"] += n
    if hasattr(opt, "optimizer_state_bytes"):
        out["optimizer_state_bytes()"] = opt.optimizer_state_bytes()
    return out


def compile_module(module: torch.nn.Module, args):
    """``(callable, backend object or None)`` for ``--backend``."""
    if args.backend == "eager":
        return module, None
    if args.backend in ("velora", "velora_eager"):
        backend = velora_fx.backend(compiler="eager" if args.backend == "velora_eager" else "inductor")
        return torch.compile(module, backend=backend), backend
    return torch.compile(module, backend=args.backend), None


# --------------------------------------------------------------------------------------------
# one training run (shared by both phases)
# --------------------------------------------------------------------------------------------
class Cut(Exception):
    """The hard deadline passed during a run."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(module: torch.nn.Module, val: list, autocast: Callable) -> float:
    """Mean loss of the uncompiled module on the fixed validation batches (no inference compile)."""
    was = module.training
    module.eval()
    with autocast():
        losses = [module(x, y).float() for x, y in val]
    module.train(was)
    return torch.stack(losses).mean().item()


def train(label: str, module: torch.nn.Module, opt: torch.optim.Optimizer, train_iter, val: list, steps: int,
          eval_every: int, args, hidden_ids: set[int], record: dict, on_progress: Callable[[], None]) -> None:
    """Train ``steps`` steps, filling ``record`` as it goes (so a cut or failed run keeps its curve)."""
    device = torch.device(args.device)
    params = [p for p in module.parameters() if p.requires_grad]
    fn, backend = compile_module(module, args)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.no_autocast))
    curve = record.setdefault("curve", {"step": [], "tokens": [], "val_loss": [], "train_loss": []})
    times, losses = [], []
    tokens_per_step = record["tokens_per_step"]
    hard = args.deadline + args.grace

    def log_eval(step: int) -> None:
        val_loss = evaluate(module, val, autocast)
        window = losses[-eval_every:] if step else []
        curve["step"].append(step)
        curve["tokens"].append(step * tokens_per_step)
        curve["val_loss"].append(val_loss)
        curve["train_loss"].append(sum(window) / len(window) if window else None)
        print(f"  {label}: step {step:5d}  val {val_loss:.4f}" + (f"  train {curve['train_loss'][-1]:.4f}"
                                                                 if window else ""), flush=True)
        if not math.isfinite(val_loss):
            raise FloatingPointError(f"validation loss is {val_loss} at step {step}")

    if args.eval_at_start:
        log_eval(0)
    train_peak = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps):
        if time.perf_counter() - START > hard:
            raise Cut(f"hard deadline ({hard:.0f} s from start) reached after {step} of {steps} steps")
        set_lr(opt, schedule(step, steps, args.warmup_frac, args.min_lr_frac))
        x, y = next(train_iter)
        _sync(device)
        t0 = time.perf_counter()
        with autocast():
            loss = fn(x, y)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step == 0:
            record["first_step_s"] = times[0]
            record["first_train_loss"] = losses[0]  # same init and batch: equal across optimizers
            record["state_bytes"] = state_bytes(opt, hidden_ids)
            if device.type == "cuda":
                record["resident_after_step_bytes"] = torch.cuda.memory_allocated(device)
            print(f"  {label}: first step (compile) {times[0]:.1f} s, optimizer state "
                  f"{record['state_bytes']['total'] / 2**20:.1f} MiB", flush=True)
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"training loss is {losses[-1]} at step {step + 1}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            if device.type == "cuda":  # training peak only: evaluations do not count
                train_peak = max(train_peak, torch.cuda.max_memory_allocated(device))
            log_eval(step + 1)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            steady = times[1:] or times
            record.update(steps_done=step + 1, step_ms_median=1e3 * statistics.median(steady),
                          step_ms_mean=1e3 * statistics.fmean(steady),
                          tokens_per_s=tokens_per_step / statistics.fmean(steady),
                          peak_memory_bytes=train_peak or None, train_loss_last=losses[-1])
            on_progress()
    record["state_bytes"] = state_bytes(opt, hidden_ids)  # final (GaLore / OSD build theirs lazily)
    record["final_val_loss"] = curve["val_loss"][-1]
    record["min_val_loss"] = min(curve["val_loss"])
    record["step_times_ms"] = [round(1e3 * t, 3) for t in times]
    if backend is not None:
        report = backend.report()
        record["velora_report"] = report.to_dict() if hasattr(report, "to_dict") else str(report)


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------
# phases
# --------------------------------------------------------------------------------------------
class Runner:
    """Holds the results and the time budget; every run goes through :meth:`run`."""

    def __init__(self, args, results: dict) -> None:
        self.args, self.results = args, results
        self.device = torch.device(args.device)
        self.walls: dict[str, list[float]] = {"pretrain": [], "finetune": [], "sweep": []}

    def elapsed(self) -> float:
        return time.perf_counter() - START

    def predicted(self, kind: str) -> float:
        walls = self.walls[kind]
        return 0.0 if not walls else 1.1 * min(walls)

    def run(self, kind: str, label: str, record: dict, body: Callable[[dict], None]) -> dict:
        """Run ``body(record)`` unless the deadline says no; catch, record and go on."""
        left = self.args.deadline - self.elapsed()
        need = self.predicted(kind)
        if left <= 0 or need > left:
            record.update(status="skipped", error=f"deadline: {left:.0f} s left of --deadline {self.args.deadline:g}, "
                                                  f"a {kind} run took ~{need:.0f} s")
            print(f"{label}: skipped ({record['error']})", flush=True)
            write_outputs(self.results, self.args)
            return record
        print(f"\n{label} ({self.elapsed():.0f} s elapsed)", flush=True)
        t0 = time.perf_counter()
        record["status"] = "running"
        try:
            body(record)
            record["status"] = "ok"
        except Cut as exc:
            record.update(status="cut", error=str(exc))
            print(f"  {label}: cut ({exc})", flush=True)
        except Exception as exc:  # noqa: BLE001 - record it and go on with the next run
            record.update(status="error", error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
            print(f"  {label}: FAILED {record['error'][:300]}", flush=True)
        record["wall_s"] = time.perf_counter() - t0
        if record["status"] == "ok":
            self.walls[kind].append(record["wall_s"])
        release(self.device)
        write_outputs(self.results, self.args)
        return record


def pretrain_run(runner: Runner, name: str, base_state: dict, data: dict, val: list, steps: int, factor: float,
                 keep: dict | None, record: dict) -> None:
    args = runner.args
    device = runner.device

    def body(rec: dict) -> None:
        model = build_base(args, data["vocab"])
        model.load_state_dict(base_state)
        module = LMLoss(model).to(device).train()
        hidden_ids = {id(p) for p in param_split(module)[0]}
        opt, desc, hyper = make_optimizer(name, module, args, factor)
        rec.update(optimizer=desc, steps=steps, **hyper)
        train_iter = batches(data["pre"], args.batch, args.seq, "train", args.seed, 0.05, device)
        train(rec["label"], module, opt, train_iter, val, steps, min(args.eval_every, steps), args, hidden_ids,
              rec, lambda: write_outputs(runner.results, args))
        if keep is not None:
            keep["state"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    record.update(label=record.get("label", name), tokens_per_step=args.batch * args.seq)
    runner.run("sweep" if record.get("sweep") else "pretrain", record["label"], record, body)


def phase1(runner: Runner, data: dict, base_state: dict) -> dict | None:
    """Pre-train with each optimizer; returns the AdamW-trained weights (or another run's) for phase 2."""
    args = runner.args
    device = runner.device
    p1 = runner.results["phase1"]
    val = fixed_val(data["pre"], args.batch, args.seq, args.val_batches, args.seed + 1, 0.05, device)
    kept: dict[str, dict] = {}
    for name in args.optimizers:
        factor = 1.0
        if args.lr_sweep:
            sweep = p1["sweeps"].setdefault(name, [])
            sweep_steps = args.sweep_steps or max(10, args.steps // 5)
            for f in args.sweep_factors:
                rec = {"label": f"{name} sweep x{f:g}", "sweep": True}
                sweep.append(rec)
                pretrain_run(runner, name, base_state, data, val, sweep_steps, f, None, rec)
            done = [r for r in sweep if r.get("status") == "ok"]
            if done:
                factor = min(done, key=lambda r: r["final_val_loss"])["factor"]
                print(f"{name}: the sweep picks x{factor:g}", flush=True)
        keep = {} if name == "adamw" or not kept else None  # a CPU copy of the weights for phase 2
        rec = p1["runs"].setdefault(name, {"label": name})
        pretrain_run(runner, name, base_state, data, val, args.steps, factor, keep, rec)
        if rec.get("status") == "ok" and keep is not None and "state" in keep:
            kept[name] = keep["state"]
    if "adamw" in kept:
        p1["finetune_base"] = "adamw"
        return kept["adamw"]
    if kept:
        name = next(iter(kept))
        p1["finetune_base"] = name
        return kept[name]
    return None


def lora_targets() -> list[str]:
    from finetune_lora import LORA_TARGETS
    return list(LORA_TARGETS)


def adapter_counts(model: torch.nn.Module, targets: Sequence[str], lora_rank: int) -> dict:
    """LoRA's trainable count at ``lora_rank`` and the LoTR rank that comes closest to it."""
    shapes: dict[str, list[tuple[int, int]]] = {t: [] for t in targets}
    for path, m in model.named_modules():
        for t in targets:
            if isinstance(m, torch.nn.Linear) and (path == t or path.endswith("." + t)):
                shapes[t].append((m.in_features, m.out_features))
    lora = sum(lora_rank * (i + o) for s in shapes.values() for i, o in s)

    def lotr(r: int) -> int:  # per group: d_in·r + d_out·r + L·r²
        return sum(s[0][0] * r + s[0][1] * r + len(s) * r * r for s in shapes.values() if s)
    cap = min(min(i, o) for s in shapes.values() for i, o in s)
    best = min(range(1, cap + 1), key=lambda r: abs(lotr(r) - lora))
    return {"lora_params_formula": lora, "lotr_rank": best, "lotr_params_formula": lotr(best)}


def phase2(runner: Runner, data: dict, base_weights: dict | None) -> None:
    """LoRA vs LoTR fine-tuning of the pre-trained weights on the Language Reference corpus."""
    args = runner.args
    device = runner.device
    p2 = runner.results["phase2"]
    if base_weights is None:
        p2["status"] = "skipped"
        p2["error"] = "no pre-trained weights (every phase-1 run failed or was skipped)"
        return
    targets = lora_targets()
    try:  # shapes only: no weights needed
        with torch.device("meta"):
            probe = build_base(args, data["vocab"])
    except Exception:  # noqa: BLE001 - a transformers that cannot build on meta
        probe = build_base(args, data["vocab"])
    counts = adapter_counts(probe, targets, args.lora_rank)
    lotr_rank = args.lotr_rank or counts["lotr_rank"]
    p2.update(targets=targets, lora_rank=args.lora_rank, **counts)
    p2["lotr_rank"] = lotr_rank
    val = fixed_val(data["ft"], args.ft_batch, args.seq, args.ft_val_batches, args.seed + 1, 0.1, device)
    del probe

    def body_for(kind: str) -> Callable[[dict], None]:
        def body(rec: dict) -> None:
            model = build_base(args, data["vocab"])
            model.load_state_dict(base_weights)
            torch.manual_seed(args.seed)  # adapter init
            if kind == "lora":
                from finetune_lora import add_lora
                model = add_lora(model, argparse.Namespace(rank=args.lora_rank))
                rec["adapter"] = f"peft LoRA r={args.lora_rank}, alpha={2 * args.lora_rank}, dropout 0"
            else:
                from velora_fx.adapters import apply_lotr, lotr_parameter_count
                apply_lotr(model, targets, rank=lotr_rank)
                rec["adapter"] = f"apply_lotr rank={lotr_rank}, alpha=None (scale 1), factors shared per name"
                rec["lotr_parameter_count"] = lotr_parameter_count(model)
            module = LMLoss(model).to(device).train()
            trainable = [p for p in module.parameters() if p.requires_grad]
            rec["trainable_params"] = sum(p.numel() for p in trainable)
            rec["total_params"] = sum(p.numel() for p in module.parameters())
            lr = args.ft_lr if kind == "lora" or args.lotr_lr is None else args.lotr_lr
            opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0, fused=device.type == "cuda")
            for g in opt.param_groups:
                g["base_lr"] = g["lr"]
            rec.update(optimizer=f"torch.optim.AdamW(lr={lr:g})", lr=lr, steps=args.ft_steps)
            train_iter = batches(data["ft"], args.ft_batch, args.seq, "train", args.seed, 0.1, device)
            ft_args = argparse.Namespace(**{**vars(args), "eval_at_start": True})
            train(kind, module, opt, train_iter, val, args.ft_steps, min(args.ft_eval_every, args.ft_steps), ft_args,
                  set(), rec, lambda: write_outputs(runner.results, args))
        return body

    for kind in args.adapters:
        rec = p2["runs"].setdefault(kind, {"label": kind, "tokens_per_step": args.ft_batch * args.seq})
        runner.run("finetune", kind, rec, body_for(kind))
    done = [p2["runs"][k] for k in ADAPTERS if p2["runs"].get(k, {}).get("trainable_params")]
    if len(done) == 2:
        a, b = (r["trainable_params"] for r in done)
        p2["trainable_ratio_lotr_over_lora"] = b / a


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _mib(n) -> str:
    return "–" if n is None else f"{n / 2**20:.1f}"


def _gib(n) -> str:
    return "–" if n is None else f"{n / 2**30:.2f}"


def _status(r: dict) -> str:
    """A run's status cell: the status, and the first 100 characters of its error if any."""
    status = r.get("status", "?")
    if r.get("error"):
        status += ": " + r["error"].replace("|", "/").replace("\n", " ")[:100]
    return status


def _f(x, fmt: str) -> str:
    return "–" if x is None else format(x, fmt)


def hp_label(r: dict) -> str:
    if r.get("lr") is None:
        return "–"
    if "mu" in r:
        return f"α {r['lr']:g}, μ {r['mu']:g}"
    return f"lr {r['lr']:g}" + (f" × scale {r['scale']:g}" if "scale" in r else "")


def summary_markdown(results: dict) -> str:
    meta, cfg, model = results["meta"], results["config"], results.get("model", {})
    data = results.get("data", {})
    lines = [f"# Optimizer / adapter comparison ({meta.get('device')})", "",
             f"`{meta.get('command')}`", "",
             f"torch {meta.get('torch')}, transformers {meta.get('transformers')}, peft {meta.get('peft')}, "
             f"galore-torch {meta.get('galore_torch')}, commit {meta.get('git_commit')}, "
             f"wall {_f(meta.get('wall_s'), '.0f')} s", ""]
    if model:
        lines += [f"Model: Llama-like {cfg['layers']} x {cfg['hidden']} (heads {cfg['heads']}, intermediate "
                  f"{cfg['intermediate']}), vocab {model.get('vocab')}: **{model['params'] / 1e6:.2f} M parameters** "
                  f"({model['embedding_params'] / 1e6:.2f} M embedding + lm_head, "
                  f"{model['hidden_matrix_params'] / 1e6:.2f} M "
                  f"in 2-D hidden weights). Backend `{cfg['backend']}`, "
                  f"{'fp32' if cfg['no_autocast'] else 'bf16 autocast'}.", ""]
    if data:
        lines += [f"Data: {data.get('kind')} vocabulary {data.get('vocab_size')}; pre-training {data.get('text')}, "
                  f"{data.get('tokens', 0) / 1e6:.2f} M tokens (5 % validation); "
                  f"fine-tuning {data.get('finetune_text')}, "
                  f"{data.get('finetune_tokens', 0) / 1e3:.0f} k tokens (10 % validation).", ""]
    p1 = results["phase1"]
    budget = cfg["steps"] * cfg["batch"] * cfg["seq"]
    lines += [f"## Phase 1: pre-training, {cfg['steps']} steps x {cfg['batch']} x {cfg['seq']} = "
              f"{budget / 1e6:.1f} M tokens"
              + (f" ({budget / (0.95 * data['tokens']):.2f} epochs)" if data.get("tokens") else ""), "",
              "| optimizer | final val loss | min val loss | optimizer state MiB (hidden / other) | state × AdamW "
              "| median step ms | mean step ms | tokens/s | peak GiB | resident GiB | compile + 1st step s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    adamw_state = p1["runs"].get("adamw", {}).get("state_bytes", {}).get("total")
    for name, r in p1["runs"].items():
        sb = r.get("state_bytes") or {}
        ratio = f"{sb['total'] / adamw_state:.2f}" if sb.get("total") is not None and adamw_state else "–"
        status = _status(r)
        lines.append(f"| {name} ({hp_label(r)}) | {_f(r.get('final_val_loss'), '.4f')} "
                     f"| {_f(r.get('min_val_loss'), '.4f')} "
                     f"| {_mib(sb.get('total'))} ({_mib(sb.get('hidden'))} / {_mib(sb.get('other'))}) | {ratio} "
                     f"| {_f(r.get('step_ms_median'), '.1f')} | {_f(r.get('step_ms_mean'), '.1f')} "
                     f"| {_f(r.get('tokens_per_s'), ',.0f')} | {_gib(r.get('peak_memory_bytes'))} "
                     f"| {_gib(r.get('resident_after_step_bytes'))} | {_f(r.get('first_step_s'), '.1f')} | {status} |")
    lines += ["", "Optimizers: " + "; ".join(f"{n}: `{r['optimizer']}`" for n, r in p1["runs"].items()
                                            if r.get("optimizer")), ""]
    if p1.get("sweeps"):
        lines += ["LR sweep (final val loss at the sweep's steps): " + "; ".join(
            f"{n}: " + ", ".join(f"x{r.get('factor', 0):g} → {_f(r.get('final_val_loss'), '.4f')}" for r in rs)
            for n, rs in p1["sweeps"].items()), ""]
    p2 = results["phase2"]
    lines += [f"## Phase 2: fine-tuning ({p1.get('finetune_base', '–')}-trained base, frozen), "
              f"{cfg['ft_steps']} steps x {cfg['ft_batch']} x {cfg['seq']}", ""]
    if p2.get("error") and not p2.get("runs"):
        lines += [f"{p2.get('status')}: {p2['error']}", ""]
    lines += ["| adapter | rank | trainable params | val loss before | final val loss | min val loss | median step ms "
              "| tokens/s | peak GiB | compile + 1st step s | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, r in p2.get("runs", {}).items():
        rank = p2.get("lora_rank") if kind == "lora" else p2.get("lotr_rank")
        before = r.get("curve", {}).get("val_loss", [None])[0] if r.get("curve", {}).get("val_loss") else None
        status = _status(r)
        lines.append(f"| {kind} | {rank} | {_f(r.get('trainable_params'), ',')} | {_f(before, '.4f')} "
                     f"| {_f(r.get('final_val_loss'), '.4f')} | {_f(r.get('min_val_loss'), '.4f')} "
                     f"| {_f(r.get('step_ms_median'), '.1f')} | {_f(r.get('tokens_per_s'), ',.0f')} "
                     f"| {_gib(r.get('peak_memory_bytes'))} | {_f(r.get('first_step_s'), '.1f')} | {status} |")
    if p2.get("lora_params_formula"):
        lines += ["", f"Parameter match: LoRA r={p2['lora_rank']} → {p2['lora_params_formula']:,}; LoTR rank "
                      f"{p2['lotr_rank']} → {p2['lotr_params_formula']:,} (Σ per name d_in·r + d_out·r + L·r²)."]
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['where']}: {e['error']}" for e in results["errors"]]
    if results.get("plot"):
        lines += ["", f"Plot: {results['plot']}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: str) -> str:
    """``loss_curves.png``: validation loss vs tokens (phase 1) and vs step (phase 2)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib not installed (redraw with --replot results.json)"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results["phase1"]["runs"].items():
        c = r.get("curve") or {}
        if c.get("val_loss"):
            axes[0].plot([t / 1e6 for t in c["tokens"]], c["val_loss"], marker=".", label=f"{name} ({hp_label(r)})")
    axes[0].set(xlabel="training tokens (M)", ylabel="validation loss", title="pre-training")
    for kind, r in results["phase2"].get("runs", {}).items():
        c = r.get("curve") or {}
        if c.get("val_loss"):
            axes[1].plot(c["step"], c["val_loss"], marker=".",
                         label=f"{kind} ({r.get('trainable_params', 0) / 1e3:.0f} k trainable)")
    axes[1].set(xlabel="fine-tuning step", ylabel="validation loss", title="fine-tuning (frozen base)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    params = results.get("model", {}).get("params", 0)
    fig.suptitle(f"{results['meta'].get('device')}: {params / 1e6:.1f} M-param Llama-like")
    fig.tight_layout()
    path = os.path.join(out_dir, "loss_curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return "loss_curves.png"


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, default=str)
    os.replace(tmp, path)


def write_outputs(results: dict, args, final: bool = False) -> None:
    results["meta"]["wall_s"] = time.perf_counter() - START
    if final:
        results["plot"] = plot(results, args.out)
    _write_json(os.path.join(args.out, "results.json"), results)
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(summary_markdown(results))


def environment(args) -> dict:
    def version(mod: str):
        try:
            from importlib.metadata import version as v
            return v(mod)
        except Exception:  # noqa: BLE001
            return None

    def git(*cmd: str):
        try:
            return subprocess.run(["git", *cmd], cwd=_ROOT, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except Exception:  # noqa: BLE001
            return None
    device = torch.device(args.device)
    status = git("status", "--porcelain")
    cpu = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version("transformers"),
            "peft": version("peft"), "galore_torch": version("galore-torch"), "tokenizers": version("tokenizers"),
            "velora_fx": velora_fx.__version__, "python": platform.python_version(),
            "git_commit": git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "command": shlex.join(["python", "benchmarks/optim_compare.py", *args.argv]),
            "argv": args.argv, "started": time.strftime("%Y-%m-%d %H:%M:%S")}


# --------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/optim_compare")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke preset (2 x 64 model, few steps)")
    ap.add_argument("--backend", choices=("inductor", "velora", "velora_eager", "aot_eager_decomp_partition",
                                          "aot_eager", "eager"),
                    help="torch.compile backend: inductor (default); velora = velora_fx.backend(), velora_eager = "
                         "velora_fx.backend(compiler='eager'); aot_eager_decomp_partition (--tiny's default: "
                         "inductor's decompositions and partitioner without codegen, ~35 s less per graph on "
                         "2 cores); eager = no compile")
    ap.add_argument("--deadline", type=float, default=400.0,
                    help="seconds from start after which no new run starts (default 400)")
    ap.add_argument("--grace", type=float, default=45.0, help="a run still going at deadline + grace is cut")
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--adapters", nargs="*", default=list(ADAPTERS), choices=ADAPTERS)
    ap.add_argument("--skip-finetune", action="store_true")
    # model / data
    for flag in ("hidden", "layers", "heads", "intermediate", "vocab", "seq", "batch", "steps", "eval_every",
                 "val_batches", "rank", "galore_gap", "ft_steps", "ft_batch", "ft_eval_every", "ft_val_batches"):
        ap.add_argument("--" + flag.replace("_", "-"), type=int, default=None)
    ap.add_argument("--max-bytes", type=int, default=None, help="truncate the pre-training text")
    ap.add_argument("--tokenizer", default="bpe", choices=("bpe", "word", "byte", "auto"))
    ap.add_argument("--cache-dir", default=default_cache_dir())
    # optimizers
    ap.add_argument("--lr-adamw", type=float, default=1e-3)
    ap.add_argument("--lr-galore", type=float, default=1e-2, help="GaLore lr of the hidden matrices")
    ap.add_argument("--lr-osd", type=float, default=1e-2, help="OSD lr of the hidden matrices")
    ap.add_argument("--lr-naggs", type=float, default=0.1, help="NAG-GS step alpha")
    ap.add_argument("--lr-other", type=float, default=None,
                    help="GaLore / OSD lr of embeddings, lm_head and norms (default: --lr-adamw)")
    ap.add_argument("--galore-scale", type=float, default=0.25)
    ap.add_argument("--osd-scale", type=float, default=0.25)
    ap.add_argument("--osd-proj-lr", type=float, default=5e-3,
                    help="P's rate at the schedule's peak (the optimizer's default, the authors' code)")
    ap.add_argument("--osd-proj-optimizer", default="adam", choices=("adam", "sgd"))
    ap.add_argument("--osd-proj-ortho", type=float, default=0.0)
    ap.add_argument("--naggs-mu", type=float, default=0.02,
                    help="NAG-GS μ: sets its step, a/(2μ)·g (the authors' release: 1.0; see the docstring)")
    ap.add_argument("--naggs-gamma", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--warmup-frac", type=float, default=0.1)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--no-autocast", action="store_true", help="fp32 (default on CPU); bf16 autocast on CUDA")
    ap.add_argument("--lr-sweep", action="store_true",
                    help="before each full run, short runs at lr x --sweep-factors; the best is used")
    ap.add_argument("--sweep-factors", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    ap.add_argument("--sweep-steps", type=int, default=None, help="default: steps // 5")
    # fine-tuning
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--lotr-rank", type=int, default=None, help="default: the rank matching LoRA's parameter count")
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--lotr-lr", type=float, default=None, help="default: --ft-lr")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", metavar="RESULTS_JSON",
                    help="only redraw loss_curves.png and summary.md from a results.json, into --out")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    preset = PRESETS["tiny" if args.tiny else "gpu"]
    for key, value in preset.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.device.startswith("cuda") and not torch.cuda.is_available() and not args.replot:
        ap.error(f"--device {args.device} needs CUDA; pass --device cpu (and --tiny)")
    if not args.device.startswith("cuda"):
        args.no_autocast = True  # bf16 autocast on CPU is slow and not what the GPU run measures
    if args.skip_finetune:
        args.adapters = []
    args.eval_at_start = False
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.replot:
        with open(args.replot) as fh:
            results = json.load(fh)
        out = args.out  # the results may sit in a read-only folder
        os.makedirs(out, exist_ok=True)
        results["plot"] = plot(results, out)
        with open(os.path.join(out, "summary.md"), "w") as fh:
            fh.write(summary_markdown(results))
        print(results["plot"])
        return results
    os.makedirs(args.out, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("argv",)}
    results: dict = {"meta": environment(args), "config": config, "phase1": {"runs": {}, "sweeps": {}},
                     "phase2": {"runs": {}}, "errors": []}
    print(f"{results['meta']['device']}, torch {torch.__version__}; out: {args.out}", flush=True)
    write_outputs(results, args)
    try:
        data = load_corpora(args)
    except Exception as exc:  # noqa: BLE001 - nothing can run without data; record why
        results["errors"].append({"where": "data", "error": f"{type(exc).__name__}: {exc}",
                                  "traceback": traceback.format_exc()})
        write_outputs(results, args, final=True)
        raise
    results["data"] = data["meta"]
    base = build_base(args, data["vocab"])
    n_emb = base.model.embed_tokens.weight.numel() + base.lm_head.weight.numel()
    n_hidden = sum(p.numel() for n, p in base.named_parameters() if is_hidden_matrix(n, p))
    results["model"] = {"params": sum(p.numel() for p in base.parameters()), "embedding_params": n_emb,
                        "hidden_matrix_params": n_hidden, "vocab": data["vocab"], "config": base.config.to_dict()}
    base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
    del base
    budget = args.steps * args.batch * args.seq
    print(f"data: {data['meta']['kind']} vocab {data['vocab']}, "
          f"{data['meta']['tokens'] / 1e6:.2f} M pre-training tokens, "
          f"{data['meta']['finetune_tokens'] / 1e3:.0f} k fine-tune tokens ({data['meta']['prepare_s']:.1f} s)\n"
          f"model: {results['model']['params'] / 1e6:.2f} M params ({n_emb / 1e6:.2f} M embedding + lm_head, "
          f"{n_hidden / 1e6:.2f} M hidden matrices); budget {budget / 1e6:.1f} M tokens "
          f"({args.steps} steps x {args.batch} x {args.seq}); backend {args.backend}", flush=True)
    write_outputs(results, args)

    runner = Runner(args, results)
    weights = phase1(runner, data, base_state)
    if args.adapters:
        try:
            phase2(runner, data, weights)
        except Exception as exc:  # noqa: BLE001 - e.g. peft missing: record, keep phase 1's results
            results["phase2"].update(status="error", error=f"{type(exc).__name__}: {exc}")
            results["errors"].append({"where": "phase2", "error": f"{type(exc).__name__}: {exc}",
                                      "traceback": traceback.format_exc()})
    for phase in ("phase1", "phase2"):
        for name, r in results[phase].get("runs", {}).items():
            if r.get("status") not in ("ok", None):
                results["errors"].append({"where": f"{phase}/{name}", "error": r.get("error"),
                                          "traceback": r.get("traceback")})
    write_outputs(results, args, final=True)
    print("\n" + summary_markdown(results), flush=True)
    print(f"total {time.perf_counter() - START:.0f} s; results in {args.out}", flush=True)
    return results


if __name__ == "__main__":
    main()
