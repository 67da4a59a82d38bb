"""Memory / speed / gradient-fidelity benchmark: velora_fx against eager, inductor and inductor's
own exact recompute (activation_memory_budget), on Llama-like and GPT-2-like models.

Per (model, regime): wall time of the first step (compile included), ms per training step, the
host time to launch one step, peak memory above the pre-step state, activation bytes saved for
backward (read with saved_tensors_hooks, which compiled graphs also go through), grad_W cosine to
an exact eager gradient on the same batch and weights, and the velora_fx report.

Timing is interleaved: every regime is compiled and warmed once (its own copy of the same initial
weights and its own optimizer, all kept alive), then each of ``--rounds`` rounds runs one timed
block of every regime in order (A B C A B C ...).  Drift of the machine (clocks, thermals,
neighbours) then lands on every regime alike instead of on whichever happened to run last, and
the per-round ratios show how far one round's ratio can be trusted.

    python benchmarks/bench_memory.py --models llama --out results/memory                   # GPU
    python benchmarks/bench_memory.py --device cpu --layers 1 --hidden 64 --batch 2 --seq 32 --vocab 512 \\
        --steps 2 --rounds 2 --regimes inductor velora_auto velora_paper --out /tmp/bm          # CPU smoke
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import inspect
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import REFERENCE_INCLUDE, TRANSFORMERS_DEFAULTS, LMLoss, build, linear_weights  # noqa: E402
from peak_attribution import attribute_peak  # noqa: E402
from torchtune_offload import load_offload_activations, wheel_path  # noqa: E402

import velora_fx  # noqa: E402
from velora_fx.reference import apply_velora  # noqa: E402

REGIMES = ("eager", "inductor", "inductor_budget_0.5", "inductor_budget_0.7", "velora_paper", "velora_auto",
           "velora_max_memory", "velora_all", "eager_reference")
CUDA_GRAPHS = "+ro"  # suffix: torch.compile(..., mode="reduce-overhead")
ANCHOR, ANCHOR_RO = "inductor", "inductor" + CUDA_GRAPHS
TORCHTUNE_OFFLOAD = "_torchtune_offload"  # eager_torchtune_offload, inductor_torchtune_offload: under its hooks
OF_ANCHOR = "_of_inductor"  # a budget regime's suffix: its memory_budget is a share of ANCHOR's measured peak
GiB = 2**30

# Every regime compiles the same LMLoss.forward code object.  Without isolation, their cache
# entries share one recompile limit (8 by default: a 9th regime would silently run eager) and
# each call walks the other regimes' guards first (host time that depends on the regime order).
_ISOLATE = {"isolate_recompiles": True} if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {}


# -- regimes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Regime:
    """A parsed regime name: ``eager``, ``eager_reference``, ``inductor[_budget_<x>][+ro]`` or
    ``velora_<preset>[_budget_<x>][+ro]``."""

    name: str
    family: str                  # eager | eager_reference | eager_offload | inductor | velora
    preset: str | None = None    # velora: paper | auto | any other backend mode (max_memory, all, ...)
    budget: float | None = None  # torch._functorch.config.activation_memory_budget while it compiles and runs
    cudagraphs: bool = False     # "+ro": mode="reduce-overhead" (CUDA graphs)
    torchtune_offload: bool = False  # under torchtune's OffloadActivations hooks (``torchtune_offload.py``)

    @property
    def warmup_floor(self) -> int:
        """CUDA-graph trees run a function eagerly once, record it on the second call and replay
        from the third: fewer warm-up steps would put the recording inside a timed block."""
        return 3 if self.cudagraphs else 1


def parse_regime(name: str) -> Regime:
    """Parse a regime name; raises ValueError for names no rule covers (modes are the backend's to judge)."""
    base, ro = (name[:-len(CUDA_GRAPHS)], True) if name.endswith(CUDA_GRAPHS) else (name, False)
    if base in ("eager", "eager_reference", "eager_offload"):
        if ro:
            raise ValueError(f"{name!r}: reduce-overhead needs a compiled regime")
        return Regime(name, base)
    if base in ("eager" + TORCHTUNE_OFFLOAD, "inductor" + TORCHTUNE_OFFLOAD):  # torchtune's recipes: eager or compiled
        if ro:
            raise ValueError(f"{name!r}: torchtune's offload copies on a stream CUDA graphs cannot capture")
        return Regime(name, base[:-len(TORCHTUNE_OFFLOAD)], torchtune_offload=True)
    head, sep, budget = base.partition("_budget_")
    budget_value = float(budget) if sep else None
    if head == "inductor":
        return Regime(name, "inductor", None, budget_value, ro)
    if head.startswith("velora_") and len(head) > len("velora_"):
        return Regime(name, "velora", head[len("velora_"):], budget_value, ro)
    raise ValueError(f"unknown regime {name!r}; known: {REGIMES}, inductor_budget_<x>, "
                     f"velora_<preset>[_budget_<x>], each compiled one with an optional {CUDA_GRAPHS!r}")


def velora_options(regime: Regime, model_name: str, args, include: list[str] | None = None,
                   anchor_peak: int | None = None) -> dict:
    """Keyword options of ``velora_fx.backend`` for a velora regime.

    ``codecs``: VeLoRA + few-bit + gated (int8 gate/up) + chunked loss head; ``nearexact``: the same without
    the head; ``head``: the chunked loss head alone; ``bytecodes``: the defaults with ``pack_codes=False``;
    ``codecs=<a>,<b>``: those codecs (``velora_codecs=velora,chunked_loss``);
    ``mb<x>``: those codecs under ``memory_budget=x`` (the planner weighs them against inductor's
    exact recompute, ``error_cost`` 1); ``mb<x>fast``: the same with ``error_cost=0`` (the plan with
    the least estimated step time, whatever its gradient error); ``mb<x>exact``: the exact chunked
    loss head alone under the budget (exact gradients: recompute closes the rest); ``mb<x>offload``: the
    budget with ``offload=True`` and the backend's defaults for it (exact); a ``c<rows>`` suffix sets
    ``loss_chunk_size`` (``velora_mb0.5c256``).  An ``_of_inductor`` suffix (``velora_mb0.5offload_of_inductor``)
    passes the budget in bytes: ``x`` times the peak plain inductor's last warm-up step measured in this
    run (``anchor_peak``), as a user aiming at a share of the peak they had before would; without it the
    fraction is of velora_fx's own program, which returns no logits (docs/offload.md, Limits).

    ``auto`` passes nothing, so the backend's own defaults (mode and sub-token sizes) are what is
    measured; ``paper`` is the paper's sites at the paper's 32 groups, every one compressed; any
    other preset is passed as the backend's ``mode``.  ``--num-groups`` pins the size when given.
    ``include`` replaces the paper's sites (``REFERENCE_INCLUDE[model_name]``), e.g. for a LoRA model.
    """
    all_codecs = ["velora", "fewbit", "gated", "chunked_loss"]
    if regime.preset == "auto":
        options: dict = {}
    elif regime.preset == "codecs":  # every lossy-or-exact codec that is built, default planning
        options = {"codecs": all_codecs}
    elif regime.preset == "nearexact":  # VeLoRA's default planning plus the near-exact codecs (few-bit, int8 gated)
        options = {"codecs": ["velora", "fewbit", "gated"]}
    elif regime.preset == "head":    # the exact chunked loss head alone
        options = {"codecs": ["chunked_loss"]}
    elif regime.preset == "bytecodes":  # the defaults with few-bit codes one per byte (pack_codes=False)
        options = {"pack_codes": False}
    elif regime.preset.startswith("codecs="):  # default planning with these codecs: velora_codecs=velora,chunked_loss
        options = {"codecs": regime.preset[len("codecs="):].split(",")}
    elif regime.preset.startswith("mb"):  # memory_budget planner: velora_mb0.5, velora_mb0.5fast, velora_mb0.5c256
        match = re.fullmatch(r"mb([0-9.]+)(fast|exact|offload)?(?:c(\d+))?(_of_inductor)?", regime.preset)
        if match is None:
            raise ValueError(f"velora_{regime.preset}: expected "
                             "velora_mb<budget>[fast|exact|offload][c<loss chunk rows>][_of_inductor]")
        budget: float | int = float(match.group(1))
        if match.group(4):
            if anchor_peak is None:
                raise ValueError(f"velora_{regime.preset}: needs the peak of the {ANCHOR!r} regime measured "
                                 "earlier in this run (list it first; a CUDA device)")
            budget = int(budget * anchor_peak)
        exact = match.group(2) == "exact"
        options = {"codecs": ["chunked_loss"] if exact else all_codecs, "memory_budget": budget}
        if match.group(2) == "offload":  # the backend's defaults with offload (exact: keep, recompute, offload, head)
            options = {"memory_budget": budget, "offload": True}
        if match.group(2) == "fast":
            options["error_cost"] = 0.0
        if match.group(3):
            options["loss_chunk_size"] = int(match.group(3))
    elif regime.preset == "paper":
        options = {"mode": "all", "include": list(include or REFERENCE_INCLUDE[model_name]), "num_groups": 32}
    else:
        options = {"mode": regime.preset}
    if args.num_groups is not None:
        options["num_groups"] = args.num_groups
    if args.compiler != "inductor":
        options["compiler"] = args.compiler
    return options


def compile_model(regime: Regime, model: torch.nn.Module, model_name: str, args, include: list[str] | None = None,
                  anchor_peak: int | None = None):
    """The callable a regime trains with, its velora backend (or None) and notes for the JSON.
    ``include``: the paper's sites for ``eager_reference`` / ``velora_paper`` when not the model's
    ``REFERENCE_INCLUDE`` (benchmarks/run.py passes the LoRA A projections of those sites);
    ``anchor_peak``: plain inductor's measured peak, for ``_of_inductor`` budgets."""
    fn, backend, notes = _compile(regime, model, model_name, args, include, anchor_peak)
    if regime.torchtune_offload:  # torchtune's offload: a copy stream, pinned memory (Runner.context)
        notes.update(saved_tensors_hooks="torchtune OffloadActivations(use_pin_memory=True, use_streams=True)",
                     torchtune_wheel=wheel_path(getattr(args, "torchtune_wheel", None)))
    return fn, backend, notes


def _compile(regime: Regime, model: torch.nn.Module, model_name: str, args, include, anchor_peak):
    if regime.family == "eager":
        return model, None, {}
    if regime.family == "eager_offload":  # PyTorch's eager offload: every saved tensor to pinned host memory
        return model, None, {"saved_tensors_hooks": "torch.autograd.graph.save_on_cpu(pin_memory=True)"}
    if regime.family == "eager_reference":
        include = list(include or REFERENCE_INCLUDE[model_name])
        options = {} if args.num_groups is None else {"num_groups": args.num_groups}
        wrapped = apply_velora(model, include=include, init="first_batch", **options)
        return model, None, {"include": include, "wrapped": len(wrapped)}
    kwargs = dict(_ISOLATE)
    if regime.cudagraphs:
        kwargs["mode"] = "reduce-overhead"
    notes: dict = {"compile_kwargs": dict(kwargs)}
    if regime.budget is not None:
        notes["activation_memory_budget"] = regime.budget
    backend = None
    if regime.family == "velora":
        options = velora_options(regime, model_name, args, include, anchor_peak)
        notes["velora_options"] = options
        backend = velora_fx.backend(**options)
        with contextlib.suppress(Exception):  # the config's shape is the backend's business
            notes["velora_config"] = backend.config.to_dict()
        kwargs["backend"] = backend
    elif regime.budget is not None:
        kwargs["backend"] = BudgetInductor(regime.budget)
    return torch.compile(model, **kwargs), backend, notes


class BudgetInductor:
    """Plain inductor compiled under an ``activation_memory_budget``.  A backend object of its own,
    so dynamo does not hand this regime another regime's cached graph (the budget is not part of
    dynamo's guards: with ``backend="inductor"`` every budget regime reused the first compile)."""

    def __init__(self, budget: float) -> None:
        self.budget = budget

    def __call__(self, gm, example_inputs, mode=None, options=None):
        from torch._inductor.compile_fx import compile_fx
        patches = dict(torch._inductor.list_mode_options(mode)) if mode not in (None, "default") else {}
        patches.update(options or {})
        with torch._functorch.config.patch(activation_memory_budget=self.budget):
            return compile_fx(gm, example_inputs, config_patches=patches)


def budget_patch(regime: Regime):
    """The partitioner's memory budget for this regime, entered around its warm-up and each of
    its timed blocks only, so that no other regime's compile (or recompile) sees it."""
    if regime.budget is None:
        return contextlib.nullcontext()
    return torch._functorch.config.patch(activation_memory_budget=regime.budget)


# -- measurement helpers ---------------------------------------------------------------------
def plain_call(args) -> bool:
    return getattr(args, "call", "loss") == "plain"


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
    """Cosine of each weight matrix's gradient to the exact one; mean, min and where.

    All cosines are stacked and read back at once: one device sync instead of one per weight.
    """
    names = [n for n in reference if n in weights and weights[n].grad is not None]
    if not names:
        return {"mean": None, "min": None, "argmin": None, "per_weight": {}}
    values = torch.stack([F.cosine_similarity(weights[n].grad.float().flatten(),
                                              reference[n].to(weights[n].grad.device).flatten(), dim=0)
                          for n in names]).tolist()
    cos = dict(zip(names, values))
    argmin = min(cos, key=cos.get)
    return {"mean": sum(values) / len(values), "min": cos[argmin], "argmin": argmin, "per_weight": cos}


def exact_grads(base: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """Gradients of every trained linear weight from the eager model (same weights, upcast to
    ``dtype``); frozen weights (a LoRA model's base) have none and are left out.

    Kept on the benchmark device in fp32: the cosines then need no host round trip per regime.
    """
    model = LMLoss(copy.deepcopy(base)).to(ids.device, dtype)
    model(ids).backward()
    grads = {name: w.grad.detach().float() for name, w in linear_weights(model).items() if w.grad is not None}
    del model
    return grads


def compile_counters() -> dict:
    """Dynamo / inductor event counts, read before and after a phase to tell what happened in it
    (a recompile inside a timed block, graphs CUDA graphs refused)."""
    from torch._dynamo.utils import counters
    return {"graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def counters_since(before: dict) -> dict:
    now = compile_counters()
    return {k: now[k] - before[k] for k in now}


def pinned_allocs(device: torch.device) -> dict | None:
    """cudaHostAlloc calls and their time so far (None off CUDA).  A step that offloads should reuse
    the pinned pool; a call inside a timed block can block the host until the device is idle, so the
    copies it issues start late (a suspect for copies to the host that stall compute)."""
    if device.type != "cuda" or not hasattr(torch.cuda, "host_memory_stats"):
        return None
    stats = torch.cuda.host_memory_stats()
    return {"calls": stats.get("num_host_alloc", 0), "us": stats.get("host_alloc_time.total", 0)}


def pinned_allocs_since(before: dict | None, device: torch.device) -> dict | None:
    if before is None:
        return None
    now = pinned_allocs(device)
    return {k: now[k] - before[k] for k in now}


def memory_mark(device: torch.device) -> int | None:
    """Allocated bytes right before a timed block, with the peak counter reset (None off CUDA).

    Other regimes' models and optimizer states stay resident; they are constant across the
    block, so they cancel in the peak-minus-before difference."""
    if device.type != "cuda":
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def cudagraph_pool_bytes(device: torch.device) -> int | None:
    """Bytes reserved by private (CUDA-graph) memory pools.  Replays do not allocate through the
    caching allocator, so ``peak_extra`` of a ``+ro`` regime misses most of what its graphs use;
    this pool is where that memory lives (one per device, shared by all ``+ro`` regimes)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        segments = torch.cuda.memory_snapshot()
    except Exception:  # noqa: BLE001 - a diagnostic: never worth a regime's timings
        return None
    return sum(seg["total_size"] for seg in segments
               if seg.get("device", index) == index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0))


def memory_peak(device: torch.device, before: int | None) -> dict:
    if before is None:
        return {"mem_before_GiB": None, "peak_GiB": None, "peak_extra_GiB": None,
                "reserved_GiB": None, "cudagraph_pool_GiB": None}
    peak = torch.cuda.max_memory_allocated(device)
    return {"mem_before_GiB": before / GiB, "peak_GiB": peak / GiB, "peak_extra_GiB": (peak - before) / GiB,
            "reserved_GiB": torch.cuda.memory_reserved(device) / GiB,
            "cudagraph_pool_GiB": _scaled(cudagraph_pool_bytes(device), GiB)}


def _scaled(value, scale):
    return None if value is None else value / scale


def velora_summary(backend) -> dict:
    """The backend's report as JSON plus the counts the summary shows.  Read defensively: the
    report grows fields (per-site ``estimated_error``) and must never cost a run its timings."""
    report = backend.report().to_dict()
    sites = [s for g in report.get("graphs", []) for s in g.get("sites", [])]
    compressed = [s for s in sites if s.get("decision") == "compressed"]
    errors = [s["estimated_error"] for s in compressed if isinstance(s.get("estimated_error"), (int, float))]
    return {"report": report, "sites": len(sites), "compressed_sites": len(compressed),
            "report_saved_bytes_before": report.get("saved_bytes_before"),
            "report_saved_bytes_after": report.get("saved_bytes_after"),
            "predicted_peak_before_GiB": _scaled(report.get("predicted_peak_before"), GiB),
            "predicted_peak_after_GiB": _scaled(report.get("predicted_peak_after"), GiB),
            "estimated_error_mean": sum(errors) / len(errors) if errors else None,
            "estimated_error_max": max(errors) if errors else None}


# -- one regime ------------------------------------------------------------------------------
class Runner:
    """One regime, alive across rounds: its own copy of the initial model, its optimizer and its
    compiled callable, so later timed blocks run on the already-compiled code.

    ``build_model``, ``compile`` and ``context`` are the hooks benchmarks/run.py overrides for
    variants this script does not know (LoRA, Liger, PEFT's VeLoRA); the optimizer takes only
    trainable parameters, so a frozen base holds no optimizer state.
    """

    def __init__(self, regime: Regime, model_name: str, base: torch.nn.Module, ids: torch.Tensor, args,
                 anchor_peak: int | None = None) -> None:
        self.regime, self.ids, self.args, self.device = regime, ids, args, ids.device
        self.anchor_peak = anchor_peak  # plain inductor's measured peak (``_of_inductor`` budgets)
        self.model = self.build_model(base)
        self.fn, self.backend, self.notes = self.compile(model_name)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4, **fused)

    def build_model(self, base: torch.nn.Module) -> torch.nn.Module:
        """This regime's own copy of the initial weights: a module ``forward(ids) -> loss``, or with
        ``--call plain`` the transformers model itself."""
        model = copy.deepcopy(base)
        return (model if plain_call(self.args) else LMLoss(model)).to(self.device)

    def compile(self, model_name: str):
        """``(callable, velora backend or None, notes)`` for ``self.model``."""
        return compile_model(self.regime, self.model, model_name, self.args, anchor_peak=self.anchor_peak)

    def context(self):
        """Entered around the warm-up and around each timed block (the regime's memory budget;
        ``eager_offload``: PyTorch's ``save_on_cpu`` hooks; ``*_torchtune_offload``: one torchtune
        ``OffloadActivations`` for the whole run, as torchtune's recipes keep one)."""
        if self.regime.family == "eager_offload":
            return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")
        if self.regime.torchtune_offload:
            if getattr(self, "_torchtune_hooks", None) is None:
                wheel = wheel_path(getattr(self.args, "torchtune_wheel", None))
                if wheel is None:
                    raise ValueError(f"{self.regime.name} needs --torchtune-wheel (or $VELORA_TORCHTUNE_WHEEL): "
                                     "see benchmarks/torchtune_offload.py")
                self._torchtune_hooks = load_offload_activations(wheel)(use_pin_memory=True, use_streams=True)
            return self._torchtune_hooks
        return budget_patch(self.regime)

    def step(self, check=None) -> torch.Tensor:
        """One training step; ``check`` runs between backward and the optimizer (fresh grads)."""
        if self.regime.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        if plain_call(self.args):  # as users and the HF Trainer call it: transformers shifts the labels
            loss = self.fn(input_ids=self.ids[:, :-1], labels=self.ids[:, :-1]).loss
        else:
            loss = self.fn(self.ids)
        loss.backward()
        if check is not None:
            check()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.args.keep_grads)
        return loss

    def warm(self, reference: dict | None) -> dict:
        """First step (compile, and grad cosines on the untouched weights), the other warm-up
        steps, then one step under saved-tensor hooks, so no timed block pays for any of it."""
        out: dict = {}
        weights = linear_weights(self.model)

        def check():
            t0 = time.perf_counter()
            out["grad_cos"] = grad_cosines(weights, reference)
            out["grad_cos_s"] = time.perf_counter() - t0

        before = compile_counters()
        times = []
        with self.context():
            warmup, mark = max(self.args.warmup, self.regime.warmup_floor), None
            for i in range(warmup):
                sync(self.device)
                mark = memory_mark(self.device) if i == warmup - 1 else None
                t0 = time.perf_counter()
                loss = self.step(check if i == 0 and reference is not None else None)
                sync(self.device)
                times.append(time.perf_counter() - t0)
                if i == 0:
                    out["first_loss"] = loss.item()
            if mark is not None:  # the last warm-up step's peak (what ``_of_inductor`` budgets are a share of)
                out["warm_peak_extra_bytes"] = torch.cuda.max_memory_allocated(self.device) - mark
            with saved_activation_bytes(list(self.model.parameters())) as saved:
                self.step()
            sync(self.device)
        out["first_step_s"] = times[0] - out.get("grad_cos_s", 0.0)  # dynamo + compile, not our cosines
        out["warmup_step_s"] = times
        out["saved_activation_bytes"], out["saved_tensors"] = saved["bytes"], saved["tensors"]
        out["warm_counters"] = counters_since(before)
        return out

    def timed_block(self) -> dict:
        """``--steps`` steps.  Each starts on an idle device (sync before the timer); the host time
        stops when zero_grad returns, before the closing sync, so it is the CPU cost of launching
        the step, and the wall time after the sync is the step's full time."""
        total, host = [], []
        before_counters, before_pinned = compile_counters(), pinned_allocs(self.device)
        with self.context():
            mem_before = memory_mark(self.device)
            for _ in range(self.args.steps):
                sync(self.device)
                t0 = time.perf_counter()
                loss = self.step()
                t1 = time.perf_counter()
                sync(self.device)
                t2 = time.perf_counter()
                host.append((t1 - t0) * 1e3)
                total.append((t2 - t0) * 1e3)
            block = {"ms_per_step": statistics.median(total), "host_ms_per_step": statistics.median(host),
                     "ms_all": total, "host_ms_all": host, "last_loss": loss.item()}
            block.update(memory_peak(self.device, mem_before))
        block["counters"] = counters_since(before_counters)
        block["pinned_host_allocs"] = pinned_allocs_since(before_pinned, self.device)
        return block


# -- records ---------------------------------------------------------------------------------
def new_record(info: dict, model_name: str, regime: Regime, params: int) -> dict:
    return {**info, "model": model_name, "regime": regime.name, "params": params, "status": "pending",
            "rounds": [], "wall_s": 0.0}


def fail(record: dict, where: str, exc: BaseException) -> None:
    record.update(status="error", error=f"{where}: {type(exc).__name__}: {exc}", traceback=traceback.format_exc())


def aggregate(record: dict) -> None:
    """Overall numbers from the timed blocks: medians of all steps pooled, peak memory the largest."""
    rounds = record["rounds"]
    if not rounds:
        return
    for key, all_key in (("ms_per_step", "ms_all"), ("host_ms_per_step", "host_ms_all")):
        record[key] = statistics.median([t for b in rounds for t in b[all_key]])
        record[f"{key}_rounds"] = [b[key] for b in rounds]
    peaks = [b["peak_extra_GiB"] for b in rounds]
    record["peak_extra_GiB"] = None if None in peaks else max(peaks)
    record["cudagraph_pool_GiB"] = rounds[-1]["cudagraph_pool_GiB"]
    record["recompiles_in_timing"] = sum(b["counters"]["graphs"] for b in rounds)
    record["last_loss"] = rounds[-1]["last_loss"]


def _ratio(a, b):
    return None if a is None or not b else a / b


def ratios(record: dict, anchor: dict | None) -> dict | None:
    """Ratios to an anchor regime: overall, and per round (same round index, i.e. adjacent in time
    when interleaved)."""
    if anchor is None:
        return None
    out = {key: _ratio(record.get(key), anchor.get(key))
           for key in ("ms_per_step", "host_ms_per_step", "peak_extra_GiB", "saved_activation_bytes")}
    for key in ("ms_per_step", "host_ms_per_step"):
        out[f"{key}_rounds"] = [_ratio(a[key], b[key]) for a, b in zip(record["rounds"], anchor["rounds"])]
    return out


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, regime), with ratios to inductor of the same model in this run, and for
    ``+ro`` regimes to ``inductor+ro`` too (CUDA graphs against CUDA graphs)."""
    by_key = {(r["model"], r["regime"]): r for r in records}
    rows = []
    for r in records:
        row = {k: r.get(k) for k in ("model", "regime", "status", "error", "note", "first_step_s", "ms_per_step",
                                     "ms_per_step_rounds", "host_ms_per_step", "host_ms_per_step_rounds",
                                     "peak_extra_GiB", "cudagraph_pool_GiB", "saved_activation_bytes",
                                     "recompiles_in_timing", "sites", "compressed_sites",
                                     "estimated_error_mean", "estimated_error_max")}
        row["grad_cos_mean"] = (r.get("grad_cos") or {}).get("mean")
        row["grad_cos_min"] = (r.get("grad_cos") or {}).get("min")
        row["vs_" + ANCHOR] = ratios(r, by_key.get((r["model"], ANCHOR)))
        if r["regime"].endswith(CUDA_GRAPHS):
            row["vs_" + ANCHOR_RO] = ratios(r, by_key.get((r["model"], ANCHOR_RO)))
        rows.append(row)
    return rows


# -- output ----------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _with_ratio(value, spec: str, ratio) -> str:
    text = _fmt(value, spec)
    return f"{text} ({ratio:.2f}×)" if value is not None and ratio is not None else text


def _ratio_cell(vs: dict | None, key: str) -> str:
    """``1.05 (1.04, 1.06)``: overall ratio, then each round's."""
    if not vs or vs.get(key) is None:
        return "–"
    per_round = ", ".join(_fmt(x, ".2f") for x in vs.get(f"{key}_rounds") or [])
    return f"{vs[key]:.2f}" + (f" ({per_round})" if per_round else "")


def _status_cell(r: dict) -> str:
    status = r["status"]
    if r.get("error") or r.get("note"):
        status += ": " + (r.get("error") or r.get("note"))[:100].replace("|", "/").replace("\n", " ")
    if r.get("recompiles_in_timing"):
        status += f" (recompiled {r['recompiles_in_timing']}× while timed)"
    return status


def _sites_cell(r: dict) -> str:
    """``2/5 (est. err ≤ 0.83)``: compressed of all sites, and the largest estimated error the
    backend reported for a compressed one (when it reports one)."""
    if r["sites"] is None:
        return "–"
    worst = r.get("estimated_error_max")
    return f"{r['compressed_sites']}/{r['sites']}" + ("" if worst is None else f" (est. err ≤ {worst:.2f})")


def _main_row(r: dict) -> list[str]:
    vs = r.get("vs_" + ANCHOR) or {}
    ro = r.get("vs_" + ANCHOR_RO)
    saved = None if r["saved_activation_bytes"] is None else r["saved_activation_bytes"] / GiB
    return [r["model"], r["regime"], _fmt(r["first_step_s"], ".1f"),
            _fmt(r["ms_per_step"], ".2f"), _ratio_cell(vs, "ms_per_step"),
            _fmt(r["host_ms_per_step"], ".2f"), _ratio_cell(vs, "host_ms_per_step"),
            "–" if not ro else f"{_fmt(ro['ms_per_step'], '.2f')} / {_fmt(ro['host_ms_per_step'], '.2f')}",
            _with_ratio(r["peak_extra_GiB"], ".3f", vs.get("peak_extra_GiB")),
            _with_ratio(saved, ".3f", vs.get("saved_activation_bytes")),
            "–" if r["grad_cos_mean"] is None else f"{r['grad_cos_mean']:.4f} / {r['grad_cos_min']:.4f}",
            _sites_cell(r),
            _status_cell(r)]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def markdown(rows: list[dict], header: str) -> str:
    """The summary table, the per-round medians behind its ratios, and the ``+ro`` memory caveat."""
    columns = ["model", "regime", "first step s", "ms/step", "ms × inductor (rounds)", "host ms/step",
               "host × inductor (rounds)", "ms / host × inductor+ro", "peak extra GiB (×)", "saved act. GiB (×)",
               "grad_W cos mean / min", "velora sites", "status"]
    lines = [header, ""] + _table(columns, [_main_row(r) for r in rows])
    rounds = max((len(r["ms_per_step_rounds"] or []) for r in rows), default=0)
    if rounds:
        per_round = []
        for r in rows:
            cells = [f"{_fmt(a, '.2f')} / {_fmt(b, '.2f')}"
                     for a, b in zip(r["ms_per_step_rounds"] or [], r["host_ms_per_step_rounds"] or [])]
            per_round.append([r["model"], r["regime"]] + cells + ["–"] * (rounds - len(cells)))
        lines += ["", "Per-round medians, ms/step / host ms/step:", ""]
        lines += _table(["model", "regime"] + [f"round {i + 1}" for i in range(rounds)], per_round)
    pools = [r["cudagraph_pool_GiB"] for r in rows if r["regime"].endswith(CUDA_GRAPHS) and r.get("cudagraph_pool_GiB")]
    if pools:
        lines += ["", "`+ro` rows: CUDA-graph replays do not allocate through the caching allocator, so their peak "
                      "extra is not comparable to the other rows; the CUDA-graph pool, shared by all `+ro` regimes "
                      f"of the process, reserved {max(pools):.3f} GiB."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Peak extra memory vs ms/step, one point per run (only if matplotlib is installed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if r["ms_per_step"] is not None and r["peak_extra_GiB"] is not None]
    if not ok:
        return
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for model, marker in (("llama", "o"), ("gpt2", "s")):
        for r in (x for x in ok if x["model"] == model):
            ax.scatter(r["ms_per_step"], r["peak_extra_GiB"], marker=marker)
            ax.annotate(f"{model}:{r['regime']}", (r["ms_per_step"], r["peak_extra_GiB"]), fontsize=7)
    ax.set_xlabel("ms per step (median over all rounds)")
    ax.set_ylabel("peak memory above pre-step state (GiB)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _file_name(model_name: str, regime: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{model_name}_{regime}") + ".json"


def write_outputs(records: list[dict], info: dict, args, start: float) -> None:
    """Per-regime JSON, summary.json and summary.md, rewritten after every block so that a run cut
    off mid-way still leaves everything measured so far."""
    rows = summarize(records)
    for record, row in zip(records, rows):
        with open(os.path.join(args.out, _file_name(record["model"], record["regime"])), "w") as fh:
            json.dump({**record, "summary": row}, fh, indent=1)
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump({**info, "wall_s": time.perf_counter() - start, "rows": rows}, fh, indent=1)
    header = (f"bench_memory: {info['device']}, torch {info['torch']}, {args.dtype}, {args.layers} layers x "
              f"{args.hidden} hidden, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
              f"{args.rounds} {'sequential' if args.sequential else 'interleaved'} rounds x median of {args.steps} "
              f"steps\n\n`{info['command']}`")
    with open(os.path.join(args.out, "summary.md"), "w") as fh:
        fh.write(markdown(rows, header))


# -- driver ----------------------------------------------------------------------------------
def cleanup(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def log(start: float, text: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {text}", flush=True)


def skip(record: dict, note: str, start: float) -> None:
    record.update(status="skipped", note=note)
    log(start, f"{record['model']:5s} {record['regime']:24s} skipped ({note})")


def warm_regime(regime: Regime, model_name: str, base, ids, reference, record: dict, args, start: float,
                runner_cls=None, anchor_peak: int | None = None):
    """Build, compile and warm one regime; returns its Runner (``runner_cls``, default ``Runner``),
    or None (failure recorded).  ``anchor_peak``: plain inductor's measured peak, passed on to a
    regime whose budget is a share of it (``_of_inductor``)."""
    t0 = time.perf_counter()
    if regime.cudagraphs and ids.device.type != "cuda":
        skip(record, "reduce-overhead (CUDA graphs) needs a CUDA device", start)
        return None
    if regime.torchtune_offload and ids.device.type != "cuda":
        skip(record, "torchtune's OffloadActivations needs a CUDA device (it copies on a CUDA stream)", start)
        return None
    runner = None
    try:
        extra = {"anchor_peak": anchor_peak} if OF_ANCHOR in regime.name else {}
        runner = (runner_cls or Runner)(regime, model_name, base, ids, args, **extra)
        record["notes"] = runner.notes
        record.update(runner.warm(reference), status="ok")
        if regime.family in ("inductor", "velora") and not record["warm_counters"]["graphs"]:
            record["note"] = "dynamo compiled no graph during warm-up: this regime may have run eagerly"
    except Exception as exc:  # noqa: BLE001 - record it and go on with the next regime
        fail(record, "compile/warm-up", exc)
    if runner is not None and runner.backend is not None:
        try:
            record.update(velora_summary(runner.backend))
            if args.verbose:
                print(runner.backend.report().table(), flush=True)
        except Exception as exc:  # noqa: BLE001
            record["report_error"] = f"{type(exc).__name__}: {exc}"
    record["wall_s"] += time.perf_counter() - t0
    cos = (record.get("grad_cos") or {}).get("min")
    log(start, f"{model_name:5s} {regime.name:24s} warm  {record['status']:5s} "
               f"first={_fmt(record.get('first_step_s'), '.1f')}s "
               f"saved={_fmt(record.get('saved_activation_bytes'), 'd')} B cos_min={_fmt(cos, '.4f')}"
               + (f"  {record['error']}" if record["status"] == "error" else ""))
    return runner if record["status"] == "ok" else None


def time_block(runner: Runner, record: dict, round_index: int, start: float) -> bool:
    """One timed block of one regime into its record; False (failure recorded) if it broke."""
    t0 = time.perf_counter()
    try:
        block = runner.timed_block()
    except Exception as exc:  # noqa: BLE001
        fail(record, f"round {round_index + 1}", exc)
        ok = False
    else:
        record["rounds"].append({"round": round_index + 1, **block})
        aggregate(record)
        ok = True
    record["wall_s"] += time.perf_counter() - t0
    b = record["rounds"][-1] if ok else {}
    log(start, f"{record['model']:5s} {record['regime']:24s} round {round_index + 1} "
               + (f"ms={b['ms_per_step']:.2f} host={b['host_ms_per_step']:.2f} "
                  f"peak+={_fmt(b['peak_extra_GiB'], '.3f')} GiB" if ok else f"error  {record['error']}"))
    return ok


def attribute_step(runner: Runner, record: dict) -> None:
    """One more step with the allocator's history on: what is alive at its peak (after the timed
    rounds, so it costs them nothing)."""
    try:
        with runner.context():
            record["peak_attribution"] = attribute_peak(runner.step, runner.device)
    except Exception as exc:  # noqa: BLE001 - a diagnostic
        record["peak_attribution"] = {"error": f"{type(exc).__name__}: {exc}"}


def profile_step(runner: Runner, record: dict, top: int = 30) -> None:
    """One profiled step after the rounds: the CUDA kernels that take the most time (where a
    regime's step time goes, kernel by kernel, against inductor's), how many kernels and launch
    calls the step makes, and the host ops with the most self CPU time (a launch-bound step)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with runner.context():
            runner.step()
            sync(runner.device)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                runner.step()
                sync(runner.device)
        averages = prof.key_averages()
        events = [e for e in averages if e.device_time_total > 0]
        total = sum(e.self_device_time_total for e in events)
        events.sort(key=lambda e: e.self_device_time_total, reverse=True)
        launches = [e for e in averages if "LaunchKernel" in e.key or "cudaMemcpy" in e.key or "cudaMemset" in e.key]
        host = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
        record["profile"] = {"cuda_ms": total / 1e3, "top": [
            {"kernel": e.key[:140], "ms": round(e.self_device_time_total / 1e3, 3), "calls": e.count}
            for e in events[:top]],
            "kernels": sum(e.count for e in events), "launch_calls": {e.key: e.count for e in launches},
            "host_top": [{"op": e.key[:140], "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 3), "calls": e.count}
                         for e in host[:top]]}
    except Exception as exc:  # noqa: BLE001 - a diagnostic
        record["profile"] = {"error": f"{type(exc).__name__}: {exc}"}


def run_model(model_name: str, regimes: list[Regime], args, info: dict, records: list[dict], start: float) -> None:
    """All regimes of one model: warm every regime of a group, then ``--rounds`` rounds over the
    group.  One group of all regimes (interleaved), or one group per regime with ``--sequential``."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    defaults = TRANSFORMERS_DEFAULTS[model_name] if args.transformers_defaults else {}
    base = build(model_name, args.hidden, args.layers, vocab=args.vocab, max_positions=max(2048, args.seq),
                 **defaults).to(dtype)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(device)
    reference = None
    if args.grad_cos:
        reference = exact_grads(base, ids, torch.float32 if args.ref_dtype == "float32" else dtype)
    cleanup(device)
    params = sum(p.numel() for p in base.parameters())
    model_records = {r.name: new_record(info, model_name, r, params) for r in regimes}
    records.extend(model_records.values())
    for group in ([[r] for r in regimes] if args.sequential else [regimes]):
        runners = {}
        for regime in group:
            if args.warm_deadline is not None and time.perf_counter() - start > args.warm_deadline:
                skip(model_records[regime.name], f"not compiled: past --warm-deadline {args.warm_deadline:g} s", start)
                continue
            anchor = model_records.get(ANCHOR, {}).get("warm_peak_extra_bytes")
            runner = warm_regime(regime, model_name, base, ids, reference, model_records[regime.name], args, start,
                                 anchor_peak=anchor)
            if runner is not None:
                runners[regime.name] = runner
            else:
                gc.collect()
            write_outputs(records, info, args, start)
        for round_index in range(args.rounds):
            for name in list(runners):
                if not time_block(runners[name], model_records[name], round_index, start):
                    del runners[name]
                    gc.collect()
                write_outputs(records, info, args, start)
        if args.attribute and device.type == "cuda":
            for name, runner in runners.items():
                attribute_step(runner, model_records[name])
            write_outputs(records, info, args, start)
        if args.profile and device.type == "cuda":
            for name, runner in runners.items():
                profile_step(runner, model_records[name])
            write_outputs(records, info, args, start)
        del runners
        cleanup(device)
    del base, reference
    cleanup(device)


def _git_commit() -> str | None:
    """The checkout's commit (+ "-dirty"), so a result can be traced to its code; None outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("-dirty" if dirty else "")) or None


def run_info(args, device: torch.device) -> dict:
    """What every JSON carries: machine, versions, and the exact command."""
    import transformers
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "velora_fx": velora_fx.__version__,
            "velora_fx_path": os.path.dirname(velora_fx.__file__), "git_commit": _git_commit(), "argv": sys.argv,
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
            "config": dict(vars(args))}


def add_workload_arguments(ap: argparse.ArgumentParser, *, shape: bool = True, warmup: int = 3, rounds: int = 2,
                           unit: str = "regime", batch_help: str | None = None, device_choices=None) -> None:
    """The options every GPU benchmark here shares, defined once: device and dtype, the model shape
    (``--layers``/``--hidden`` unless the caller has its own, e.g. run.py's ``--sizes``), vocabulary,
    batch and sequence, and the interleaved timing (``--warmup``/``--steps``/``--rounds``)."""
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=device_choices)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    if shape:
        ap.add_argument("--layers", type=int, default=12)
        ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=8, help=batch_help)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=warmup,
                    help="steps before timing (the first compiles; +ro takes >= 3)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per block")
    ap.add_argument("--rounds", type=int, default=rounds, help=f"timed blocks per {unit}, interleaved across {unit}s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES),
                    help=f"in timing order; from {REGIMES}; inductor_budget_<x> and velora_<preset>[_budget_<x>] "
                         f"take any budget, and any compiled regime takes the suffix {CUDA_GRAPHS!r} (CUDA graphs)")
    add_workload_arguments(ap)
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "same"],
                    help="dtype of the exact eager gradient the cosines compare against")
    ap.add_argument("--no-grad-cos", dest="grad_cos", action="store_false",
                    help="skip the exact eager gradient and the cosines (saves one eager fp32 step and its memory)")
    ap.add_argument("--sequential", action="store_true",
                    help="one regime at a time (warm, all its rounds, free it): less memory, no interleaving")
    ap.add_argument("--warm-deadline", type=float, default=None, metavar="SECONDS",
                    help="compile no further regime once this many seconds have passed (counted after the imports), "
                         "so that a run with a wall-clock limit still reaches its timed rounds (skips are recorded)")
    ap.add_argument("--num-groups", type=int, default=None,
                    help="pin num_groups for every velora regime and eager_reference (default: the backend's choice)")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                    help="velora_fx backend's compiler (eager: same rewrite, no codegen)")
    ap.add_argument("--call", default="loss", choices=["loss", "plain"],
                    help="loss: a wrapper returning the loss (models.LMLoss); plain: the compiled transformers model "
                         "itself, model(input_ids=..., labels=...).loss, as users and the HF Trainer call it")
    ap.add_argument("--attribute", action="store_true",
                    help="CUDA: after the rounds, one more step per regime naming the blocks alive at its peak")
    ap.add_argument("--profile", action="store_true",
                    help="CUDA: after the rounds, one profiled step per regime (top kernels by device time, kernel "
                         "and launch counts, top host ops by self CPU time)")
    ap.add_argument("--transformers-defaults", action="store_true",
                    help="transformers' own config defaults where the builders differ (GPT-2: dropout 0.1, gelu_new)")
    ap.add_argument("--keep-grads", action="store_true",
                    help="zero_grad(set_to_none=False): grads then count in the pre-step state, not the peak")
    ap.add_argument("--torchtune-wheel", default=None, metavar="PATH",
                    help="*_torchtune_offload regimes: a torchtune wheel to load OffloadActivations from (default: "
                         "$VELORA_TORCHTUNE_WHEEL; benchmarks/torchtune_offload.py says why a wheel)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results")
    ap.add_argument("--verbose", action="store_true", help="print velora_fx report tables")
    args = ap.parse_args(argv)
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step compiles and checks gradients)")
    if args.steps < 1 or args.rounds < 1:
        ap.error("--steps and --rounds must be >= 1")
    if len(set(args.regimes)) != len(args.regimes):
        ap.error("--regimes lists a regime twice")
    try:
        regimes = [parse_regime(name) for name in args.regimes]
    except ValueError as exc:
        ap.error(str(exc))
    return args, regimes


def main() -> None:
    args, regimes = parse_args()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if not _ISOLATE and hasattr(torch._dynamo.config, "recompile_limit"):  # older torch: one shared limit
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(regimes))
    info = run_info(args, device)
    records: list[dict] = []
    start = time.perf_counter()
    for model_name in args.models:
        run_model(model_name, regimes, args, info, records, start)
    write_outputs(records, info, args, start)
    plot(summarize(records), os.path.join(args.out, "memory_vs_time.png"))
    log(start, "done")
    with open(os.path.join(args.out, "summary.md")) as fh:
        print(fh.read())


if __name__ == "__main__":
    main()
