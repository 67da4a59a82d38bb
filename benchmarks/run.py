"""One benchmark runner: every memory-saving approach on the same model, batch and weights, with
ratios to plain inductor measured in the same process.

Blocks are (model, size, regime): ``full`` trains every weight, ``lora`` trains PEFT LoRA r=32 on
every linear projection with the base frozen.  In a block every variant is built from the same
initial weights, compiled and warmed, then timed in interleaved rounds; the measuring (step and
host time, peak above weights + optimizer state, saved bytes, first step with compile, grad_W
cosine to an exact eager gradient) is bench_memory.py's, imported, not copied.  ``--scaling``
then finds, per memory limit (``--memory-limit-gib``, several allowed), batch and variant, the
longest of ``--scaling-seqs`` that trains within the limit, and its tokens/s, by trying it.

    python benchmarks/run.py --models llama --deadline 450 --out results/bench/llama      # GPU, ~9 min
    python benchmarks/run.py --device cpu --models llama --regimes full lora --sizes 1x64 --vocab 512 \\
        --batch 2 --seq 32 --steps 2 --rounds 1 --variants inductor velora_auto --out /tmp/br   # CPU smoke

One JSON per run, ``<out>/run.json`` (device, versions, command, git commit, every block and
scaling table), plus ``<out>/summary.md`` and, with ``--scaling``, ``scaling_<model>_<regime>_<size>.png``;
they are rewritten after every warm-up, timed block and scaling try, so a run cut off by a
wall-clock limit keeps what it measured.  benchmarks/make_docs.py turns
result directories into docs/benchmarks.md.
"""
from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: --deadline counts the whole process

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from importlib import metadata  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory as bm  # noqa: E402
import make_docs  # noqa: E402 - the scaling table and plot are drawn the same way there
from models import REFERENCE_INCLUDE, TRANSFORMERS_DEFAULTS, build, linear_weights  # noqa: E402

GiB = bm.GiB
REGIMES = ("full", "lora")
# PEFT LoRA targets: every linear projection of a block (GPT-2's c_proj is both attn.c_proj and mlp.c_proj)
LORA_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                "gpt2": ["c_attn", "c_proj", "c_fc"]}
# Default variants: ~5 compiles per block, so one model's two blocks at 12 x 1024 fit a ~9 minute slot
# on an H100 (~30 s per compile).  inductor always runs, first: every ratio is to it.
# The order is the compile order: the uncompiled ones cost seconds, the memory_budget planner the most
# (~90 s at 12 x 1024), so a --deadline cuts the costly end first.
DEFAULT_VARIANTS = ("inductor", "eager", "eager_reference", "peft_velora", "liger", "velora_auto",
                    "inductor_budget_0.5", "velora_codecs", "velora_mb0.5")
# Everything else the runner knows (a second command; see benchmarks/README.md).  liger_compiled last
# and on its own: under LoRA it hit a CUDA illegal memory access on an H100 (torch 2.11, liger 0.8.5),
# which ends the process's CUDA context (the run stops there, recorded, with exit code 3).
MORE_VARIANTS = ("inductor_budget_0.3", "inductor_budget_0.7", "velora_max_memory", "peft_velora_compiled",
                 "liger_compiled")
EXTRA_FAMILIES = ("peft_velora", "liger")  # the variants bench_memory.py does not know
SCALING_SEQS = (512, 1024, 2048, 4096, 8192)
# velora_mb<x> (the memory_budget planner) before its first measured compile, x a plain one: at 12 x 1024 on an
# H100 mb0.5 took 2.7x inductor's first step and mb0.3 4.8x (results/gpu/v6/sweep_llama)
PLANNER_FACTOR = 3.0


class ContextLost(RuntimeError):
    """A variant left the CUDA context unusable (an illegal memory access is sticky): every later
    step in this process would fail too, so the run stops and says which variant did it."""


def check_context(device: torch.device, record: dict) -> None:
    """After a failed variant: raise ContextLost if the device no longer synchronises."""
    if device.type != "cuda" or record.get("status") != "error":
        return
    try:
        torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - any failure here means the context is gone
        raise ContextLost(f"{record['model']} {record['regime']}: {record.get('error', '')[:200]} "
                          f"(then synchronize: {type(exc).__name__})") from None


# -- variants --------------------------------------------------------------------------------
def parse_variant(name: str) -> bm.Regime:
    """bench_memory's regimes, plus ``peft_velora[_compiled]`` and ``liger[_compiled]`` (preset
    ``eager`` or ``inductor``: whether the patched model is run as is or through torch.compile)."""
    for family in EXTRA_FAMILIES:
        if name in (family, family + "_compiled"):
            return bm.Regime(name, family, "inductor" if name.endswith("_compiled") else "eager")
    return bm.parse_regime(name)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _liger_monkey_patch():
    """liger_kernel's monkey_patch module, or the reason it cannot be had (a string)."""
    try:
        return importlib.import_module("liger_kernel.transformers.monkey_patch")
    except Exception as exc:  # noqa: BLE001 - ImportError, or triton failing on a machine without CUDA
        return f"liger_kernel not importable: {type(exc).__name__}: {str(exc)[:200]}"


def unavailable(regime: bm.Regime, model_name: str, setting: str, device: torch.device, call: str = "loss") -> str | None:
    """Why a variant cannot run here (recorded as such, never silently dropped), or None."""
    if regime.family == "peft_velora":
        if setting != "lora":
            return "PEFT's VeLoRA is a LoRA variant (it compresses the LoRA A input): lora regime only"
        import peft
        if not hasattr(peft, "VeloraConfig"):
            return f"peft {peft.__version__} has no VeloraConfig (LoraConfig(velora_config=...))"
    if regime.family == "liger":
        if call == "plain":
            return ("--call plain: Liger is measured through its fused linear cross-entropy on the decoder's hidden "
                    "states (LigerLoss), not through transformers' own loss; use --call loss")
        if device.type != "cuda":
            return "Liger-Kernel's kernels are Triton: CUDA only"
        mp = _liger_monkey_patch()
        if isinstance(mp, str):
            return mp
        if not hasattr(mp, f"apply_liger_kernel_to_{model_name}"):
            return (f"liger_kernel {_version('liger_kernel')} has no apply_liger_kernel_to_{model_name} "
                    f"(no {model_name} entry in its MODEL_TYPE_TO_APPLY_LIGER_FN)")
    return None


def add_lora(model: torch.nn.Module, model_name: str, args, velora: bool = False) -> torch.nn.Module:
    """PEFT LoRA r=``--lora-rank`` (alpha 2r, no dropout) on every projection, base frozen.

    ``init_lora_weights=False`` draws B at random too: with PEFT's default B = 0 the first step's
    gradient of every A is zero and the grad_W cosines would say nothing.  PEFT keeps adapters in
    fp32 over a bf16 base (``autocast_adapter_dtype``), as in ordinary LoRA training.
    ``velora``: PEFT's own VeLoRA variant on every LoRA A (``--num-groups`` groups, default the
    paper's 32; the projection is fixed from the first batch, like velora_fx's ``first_batch``).
    """
    from peft import LoraConfig, get_peft_model
    extra = {}
    if velora:
        from peft import VeloraConfig
        extra["velora_config"] = VeloraConfig(num_groups=args.num_groups or 32, init_type="batch_average_once")
    config = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                        target_modules=LORA_TARGETS[model_name], fan_in_fan_out=model_name == "gpt2",
                        init_lora_weights=False, task_type="CAUSAL_LM", **extra)
    with warnings.catch_warnings():  # transformers deprecation noise raised from inside peft
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


def liger_patch(hf_model: torch.nn.Module, model_name: str) -> dict:
    """Apply Liger-Kernel's kernels to one model instance (its defaults: RoPE, RMSNorm, SwiGLU) and
    undo what it did to the modeling module's globals, returning those globals.  Its fused linear
    cross-entropy is called by ``LigerLoss`` instead of through Liger's replacement ``forward`` of
    the HF model, which tracks transformers' keyword arguments version by version and would not
    see through the PEFT wrapper.

    ``apply_liger_kernel_to_<model>(model=...)`` patches the instance, but also replaces module
    globals (``apply_rotary_pos_emb``, the RMSNorm and MLP classes) for every model of the
    process: left in place, every other variant would run Liger's RoPE.  The runner swaps them
    back in around this variant's steps only (``global_patch``)."""
    mp = _liger_monkey_patch()
    module = importlib.import_module(type(hf_model).__module__)
    before = dict(vars(module))
    getattr(mp, f"apply_liger_kernel_to_{model_name}")(model=hf_model, fused_linear_cross_entropy=False)
    patched = {k: v for k, v in vars(module).items() if before.get(k, _MISSING) is not v}
    for key in patched:
        if key in before:
            setattr(module, key, before[key])
        else:
            delattr(module, key)
    return {"module": module, "globals": patched}


_MISSING = object()


@contextlib.contextmanager
def global_patch(module, values: dict):
    """Set module globals for the duration (Liger's RoPE while its variant runs)."""
    old = {k: getattr(module, k, _MISSING) for k in values}
    for k, v in values.items():
        setattr(module, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is _MISSING:
                delattr(module, k)
            else:
                setattr(module, k, v)


class LigerLoss(torch.nn.Module):
    """``forward(ids) -> loss`` with Liger's fused linear cross-entropy (the kernel its
    ``lce_forward`` calls): lm_head and loss chunk by chunk, so the logits never exist.  Same
    targets as models.LMLoss, and the same module paths (``model.`` + the (PEFT) model), so the
    grad_W cosines line up with the exact reference."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        hf = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        hidden = hf.base_model(input_ids=ids[:, :-1]).last_hidden_state  # the decoder, without lm_head
        return liger_fused_linear_cross_entropy(hidden.flatten(0, 1), hf.lm_head.weight, ids[:, 1:].flatten())


class EagerPartition:
    """``--compiler eager`` for the plain compiled variants: inductor's decompositions and
    partitioner, no code generation (what velora_fx's ``compiler="eager"`` does on its side), so
    a CPU smoke run compares like with like in seconds.  One object per variant: the memory budget
    is not in dynamo's guards (see bench_memory.BudgetInductor)."""

    def __init__(self, budget: float | None) -> None:
        self.budget = budget

    def __call__(self, gm, example_inputs, **_):
        from torch._dynamo.backends.debugging import aot_eager_decomp_partition
        patch = (contextlib.nullcontext() if self.budget is None
                 else torch._functorch.config.patch(activation_memory_budget=self.budget))
        with patch:
            return aot_eager_decomp_partition(gm, example_inputs)


# -- one block -------------------------------------------------------------------------------
@dataclass
class Block:
    """A (model, size, regime) and its initial weights (on the CPU; each variant copies them)."""

    model: str
    setting: str                      # full | lora
    layers: int
    hidden: int
    raw: torch.nn.Module              # the HF model, before LoRA
    base: torch.nn.Module             # what the plain variants copy: raw, or raw + LoRA
    lora_state: dict | None = None    # the LoRA weights every LoRA variant loads
    args: argparse.Namespace | None = field(default=None, repr=False)

    @property
    def reference_include(self) -> list[str] | None:
        """The paper's sites; under LoRA their A projections (the base has no weight gradient)."""
        if self.setting != "lora":
            return None
        return [glob + ".lora_A.*" for glob in REFERENCE_INCLUDE[self.model]]

    def wrap(self, hf_model: torch.nn.Module, velora: bool = False) -> torch.nn.Module:
        """The regime's model around a fresh copy of ``raw`` (LoRA with this block's weights)."""
        if self.setting != "lora":
            return hf_model
        model = add_lora(hf_model, self.model, self.args, velora=velora)
        _, unexpected = model.load_state_dict(self.lora_state, strict=False)
        if unexpected:
            raise RuntimeError(f"LoRA weights did not load: unexpected {unexpected[:3]}")
        return model


def model_defaults(model_name: str, args) -> dict:
    """The builder's keyword arguments for ``--transformers-defaults`` (bench_memory.py's: models.TRANSFORMERS_DEFAULTS)."""
    return dict(TRANSFORMERS_DEFAULTS[model_name]) if args.transformers_defaults else {}


def exact_grads_plain(base: torch.nn.Module, ids: torch.Tensor, dtype: torch.dtype) -> dict:
    """bench_memory.exact_grads for ``--call plain``: the same loss as the plain call
    (``model(input_ids=, labels=).loss``, transformers shifting the labels) and the module paths the
    plain variants train under (no ``LMLoss`` prefix), so the cosines line up."""
    model = copy.deepcopy(base).to(ids.device, dtype)
    model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss.backward()
    grads = {name: w.grad.detach().float() for name, w in linear_weights(model).items() if w.grad is not None}
    del model
    return grads


def make_block(model_name: str, setting: str, layers: int, hidden: int, args, max_positions: int) -> Block:
    torch.manual_seed(args.seed)
    raw = build(model_name, hidden, layers, vocab=args.vocab, max_positions=max_positions,
                **model_defaults(model_name, args)).to(getattr(torch, args.dtype))
    block = Block(model_name, setting, layers, hidden, raw, raw, args=args)
    if setting == "lora":
        torch.manual_seed(args.seed + 1)
        block.base = add_lora(copy.deepcopy(raw), model_name, args)
        block.lora_state = {k: v for k, v in block.base.state_dict().items() if "lora_" in k}
    return block


class BlockRunner(bm.Runner):
    """bench_memory's Runner (timing, peak, saved bytes, cosines) with this runner's variants:
    LoRA models, Liger, PEFT's VeLoRA, the LoRA paper sites and ``--compiler eager``."""

    def __init__(self, regime, model_name, base, ids, args, block: Block | None = None) -> None:
        self.block, self.model_name, self.liger = block, model_name, None
        super().__init__(regime, model_name, base, ids, args)

    def build_model(self, base):
        family = self.regime.family
        if family == "liger":
            hf = copy.deepcopy(self.block.raw)
            self.liger = liger_patch(hf, self.model_name)
            with self.context():  # the LoRA wrap and the first forward see Liger's globals
                return LigerLoss(self.block.wrap(hf)).to(self.device)
        if family == "peft_velora":
            model = self.block.wrap(copy.deepcopy(self.block.raw), velora=True)
            return (model if bm.plain_call(self.args) else bm.LMLoss(model)).to(self.device)
        return super().build_model(base)

    def _compile_kwargs(self, budget: float | None) -> dict:
        kwargs = dict(bm._ISOLATE)
        if self.args.compiler == "eager":
            if self.regime.cudagraphs:
                raise ValueError("+ro (CUDA graphs) needs --compiler inductor")
            kwargs["backend"] = EagerPartition(budget)
        elif budget is not None:
            kwargs["backend"] = bm.BudgetInductor(budget)
        if self.regime.cudagraphs:
            kwargs["mode"] = "reduce-overhead"
        return kwargs

    def compile(self, model_name):
        family = self.regime.family
        if family in EXTRA_FAMILIES:
            notes = {"liger_globals": sorted(self.liger["globals"])} if self.liger else {}
            if family == "peft_velora":
                notes["peft_velora_config"] = {"num_groups": self.args.num_groups or 32, "init_type": "batch_average_once",
                                               "targets": LORA_TARGETS[model_name]}
            if self.regime.preset == "eager":
                return self.model, None, notes
            kwargs = self._compile_kwargs(None)
            return torch.compile(self.model, **kwargs), None, {**notes, "compile_kwargs": _describe(kwargs)}
        if family == "inductor" and self.args.compiler == "eager":
            kwargs = self._compile_kwargs(self.regime.budget)
            return torch.compile(self.model, **kwargs), None, {"compile_kwargs": _describe(kwargs),
                                                               "activation_memory_budget": self.regime.budget}
        return bm.compile_model(self.regime, self.model, model_name, self.args, include=self.block.reference_include)

    def context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(super().context())
        if self.liger:
            stack.enter_context(global_patch(self.liger["module"], self.liger["globals"]))
        return stack


def _describe(kwargs: dict) -> dict:
    return {k: (v if isinstance(v, (str, int, float, bool)) else type(v).__name__) for k, v in kwargs.items()}


def block_rows(doc: dict) -> list[dict]:
    """bench_memory's summary rows (ratios to this block's inductor) plus tokens/s and compile."""
    rows = bm.summarize(doc["variants"])
    tokens = doc["batch"] * doc["seq"]
    for row, record in zip(rows, doc["variants"]):
        row["tokens_per_s"] = tokens / row["ms_per_step"] * 1e3 if row["ms_per_step"] else None
        row["compile_s"] = record.get("first_step_s")  # dynamo + compile + the first step
    return rows


def _planner(regime: bm.Regime) -> bool:
    """A velora_mb<x> variant: velora_fx's memory_budget planner, whose compile takes a few plain ones."""
    return regime.family == "velora" and (regime.preset or "").startswith("mb")


@dataclass
class Clock:
    """``--deadline`` bookkeeping: each remaining block gets an equal share of the time left, and a
    variant starts compiling only if its expected compile (the median one measured so far, at least
    ``--compile-estimate``, at least the same variant's in an earlier block or try; a velora_mb
    variant not yet measured: the slowest velora_mb one measured, else ``PLANNER_FACTOR`` times the
    plain estimate, as the memory_budget planner takes ~3x a plain compile) plus the block's timing
    fits its share."""

    deadline: float | None
    compile_estimate: float
    compiled_first_steps: list = field(default_factory=list)
    by_variant: dict = field(default_factory=dict)

    def now(self) -> float:
        return time.perf_counter() - START

    def block_end(self, blocks_left: int) -> float | None:
        if self.deadline is None:
            return None
        return self.now() + max(0.0, self.deadline - self.now()) / max(1, blocks_left)

    def expected_compile(self, regime: bm.Regime) -> float:
        if regime.family in ("eager", "eager_reference") or regime.preset == "eager":
            return 5.0
        measured = statistics.median(self.compiled_first_steps) if self.compiled_first_steps else 0.0
        estimate = max(self.compile_estimate, measured)
        if _planner(regime) and regime.name not in self.by_variant:
            planners = [t for name, t in self.by_variant.items() if _planner(parse_variant(name))]
            estimate = max(planners) if planners else estimate * PLANNER_FACTOR
        return max(estimate, self.by_variant.get(regime.name, 0.0))

    def measured(self, regime: bm.Regime, first_step_s: float) -> None:
        if self.expected_compile(regime) > 5.0:  # compiled variants only
            if not _planner(regime):  # the median is a plain compile's
                self.compiled_first_steps.append(first_step_s)
            self.by_variant[regime.name] = max(first_step_s, self.by_variant.get(regime.name, 0.0))

    def past_deadline(self) -> bool:
        return self.deadline is not None and self.now() > self.deadline


def timing_estimate(records: list[dict], args) -> float:
    """Seconds the timed rounds of the warmed variants will take (their warm-up steps' median)."""
    total = 0.0
    for r in records:
        later = (r.get("warmup_step_s") or [])[1:]
        if r.get("status") == "ok" and later:
            total += args.rounds * (args.steps + 1) * statistics.median(later)
    return total + 2.0 * args.rounds  # gc + sync per block


def run_block(spec: tuple, variants: list[bm.Regime], args, doc: dict, clock: Clock, blocks_left: int, save) -> None:
    """Warm every available variant of one block (within its share of the deadline), then time
    ``--rounds`` interleaved rounds; the document is saved after every step of that."""
    model_name, (layers, hidden), setting = spec
    device = torch.device(args.device)
    block = make_block(model_name, setting, layers, hidden, args, max_positions=max(2048, args.seq))
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=generator).to(device)
    reference = None
    if args.grad_cos:
        exact = exact_grads_plain if bm.plain_call(args) else bm.exact_grads
        reference = exact(block.base, ids, torch.float32 if args.ref_dtype == "float32" else block.raw.dtype)
    bm.cleanup(device)
    params = sum(p.numel() for p in block.base.parameters())
    trainable = sum(p.numel() for p in block.base.parameters() if p.requires_grad)
    records = {v.name: bm.new_record({}, model_name, v, params) for v in variants}
    entry = {"model": model_name, "regime": setting, "size": f"{layers}x{hidden}", "layers": layers, "hidden": hidden,
             "vocab": args.vocab, "batch": args.batch, "seq": args.seq, "dtype": args.dtype, "call": args.call,
             "transformers_defaults": model_defaults(model_name, args), "params": params,
             "trainable_params": trainable, "lora": None if setting != "lora" else
             {"r": args.lora_rank, "alpha": 2 * args.lora_rank, "targets": LORA_TARGETS[model_name],
              "init_lora_weights": False, "adapter_dtype": str(next(v for v in block.lora_state.values()).dtype)},
             "variants": list(records.values()), "rows": [], "notes": []}
    doc["blocks"].append(entry)
    end = clock.block_end(blocks_left)
    label = f"{model_name}/{setting}/{layers}x{hidden}"
    bm.log(START, f"block {label}: {params / 1e6:.1f} M params ({trainable / 1e6:.2f} M trained)"
                  + ("" if end is None else f", warm-up until {end:.0f} s"))
    runner_cls = functools.partial(BlockRunner, block=block)
    runners = {}
    for regime in variants:
        record = records[regime.name]
        reason = unavailable(regime, model_name, setting, device, args.call)
        if reason:
            record.update(status="unavailable", note=reason)
            bm.log(START, f"{label} {regime.name:24s} unavailable ({reason})")
            continue
        needed = clock.expected_compile(regime) + timing_estimate(list(records.values()), args)
        if end is not None and clock.now() + needed > end:
            bm.skip(record, f"not started: --deadline {args.deadline:g} s (block share ends at {end:.0f} s)", START)
            continue
        runner = bm.warm_regime(regime, model_name, block.base, ids, reference, record, args, START, runner_cls=runner_cls)
        entry["rows"] = block_rows(entry)
        save()
        check_context(device, record)
        if runner is not None:
            runners[regime.name] = runner
            if record.get("first_step_s"):
                clock.measured(regime, record["first_step_s"])
    entry["rows"] = block_rows(entry)
    save()
    for round_index in range(args.rounds):
        if round_index and clock.past_deadline():
            entry["notes"].append(f"timed {round_index} of {args.rounds} rounds: past --deadline {args.deadline:g} s")
            break
        for name in list(runners):
            if not bm.time_block(runners[name], records[name], round_index, START):
                del runners[name]
            entry["rows"] = block_rows(entry)
            save()
            check_context(device, records[name])
    del runners, reference, block
    bm.cleanup(device)


# -- scaling ---------------------------------------------------------------------------------
FIT_SHARE = 0.9  # a search jumps past the next doubling only to sequences predicted to fit in this share of the limit


def _is_oom(record: dict) -> bool:
    text = f"{record.get('error', '')}\n{record.get('traceback', '')}"
    return "OutOfMemoryError" in text or "out of memory" in text.lower()


def set_memory_limit(device: torch.device, gib: float | None) -> float | None:
    """Cap the caching allocator at ``gib`` (None: lift the cap) so that "fits" means fits in that
    much; returns the fraction of the device set (CUDA only, None elsewhere)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    fraction = 1.0 if gib is None else min(1.0, gib * GiB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, index)
    return fraction


@dataclass
class SeqSearch:
    """Where the longest fitting sequence of one (variant, limit, batch) can still be, over the sorted
    ``seqs``: every index <= ``lo`` fits, every index >= ``hi`` does not (-1 and ``len(seqs)``: not known).

    Each try narrows it; the search is over when nothing lies between.  With no failure above, it
    climbs to the next listed sequence of at least twice the length (doubling), or further, to the
    longest that ``fits`` predicts from the peaks measured so far; below a failure it bisects.  On a
    list of doublings (the default) that is: one step up at a time, stop at the first failure."""

    seqs: list[int]
    lo: int = -1
    hi: int | None = None

    def __post_init__(self) -> None:
        if self.hi is None:
            self.hi = len(self.seqs)

    def done(self) -> bool:
        return self.lo + 1 >= self.hi

    def fit(self, index: int) -> None:
        self.lo = max(self.lo, index)

    def fail(self, index: int) -> None:
        self.hi = min(self.hi, index)

    def clamp(self, index: int) -> int:
        return min(max(index, self.lo + 1), self.hi - 1)

    def next_index(self, fits=None) -> int:
        """The next sequence to try (``fits(seq)``: whether it is predicted to fit, or None)."""
        if self.hi < len(self.seqs):
            return (self.lo + self.hi) // 2
        step = 0 if self.lo < 0 else next((i for i in range(self.lo + 1, self.hi)
                                           if self.seqs[i] >= 2 * self.seqs[self.lo]), self.hi - 1)
        further = [i for i in range(step + 1, self.hi) if fits is not None and fits(self.seqs[i])]
        return max([step] + further)


def predicted_peak(fits: list[dict], tokens: int) -> tuple[float | None, float | None]:
    """``(over-estimate, lower bound)`` of the peak GiB at ``tokens`` from fitting tries of the same
    variant (a peak does not depend on the limit it was measured within).

    Over-estimate: the smallest peak measured at as many tokens or more; beyond them, the longest
    try's peak above its resident weights + optimizer scaled by the tokens (its constant part, the
    gradients, is scaled too: too high).  Lower bound, beyond every try only: the line through the
    two longest (memory grows at least linearly with the length at a fixed batch, so beyond them it
    is at or above the line: pass one batch's tries); None with fewer than two."""
    pts = sorted({p["tokens"]: p for p in fits if p.get("peak_GiB") is not None}.values(), key=lambda p: p["tokens"])
    above = [p["peak_GiB"] for p in pts if p["tokens"] >= tokens]
    if not pts or above:
        return min(above, default=None), None
    top = pts[-1]
    resident = top.get("resident_GiB") or 0.0
    over = resident + (top["peak_GiB"] - resident) * tokens / top["tokens"]
    low = None
    if len(pts) >= 2:
        a, b = pts[-2], pts[-1]
        low = b["peak_GiB"] + (b["peak_GiB"] - a["peak_GiB"]) * (tokens - b["tokens"]) / (b["tokens"] - a["tokens"])
    return over, low


def run_scaling(specs: list[tuple], variants: list[bm.Regime], args, doc: dict, clock: Clock, save) -> None:
    """For each block, memory limit (ascending), batch (ascending) and variant (inductor first): the
    longest of ``--scaling-seqs`` that trains within the limit (``SeqSearch``), each try a fresh
    model, compile and a few steps (``scaling_point``); one variant resident at a time, so the limit
    is the variant's.  What a search learnt carries over to the same variant's later searches: a
    sequence that fit within a smaller limit fits a larger one (reused, not tried again); one that
    failed at a smaller batch fails at a larger one (not tried)."""
    device = torch.device(args.device)
    scaled = argparse.Namespace(**{**vars(args), "warmup": args.scaling_warmup, "steps": args.scaling_steps})
    tables = [{"memory_limit_GiB": gib, "memory_fraction": None, "runs": [], "rows": []} for gib in args.memory_limit_gib]
    doc["scaling"] = {"memory_limits_GiB": args.memory_limit_gib, "enforced": device.type == "cuda",
                      "batches": args.scaling_batch, "seqs": args.scaling_seqs, "warmup": args.scaling_warmup,
                      "steps": args.scaling_steps, "start": args.scaling_start,
                      "predicted_oom_margin": args.scaling_predicted_oom, "fit_share": FIT_SHARE, "call": args.call,
                      "specs": [], "limits": tables, "plots": []}
    try_s: dict[str, float] = {}  # variant -> its slowest try so far (the deadline's estimate)
    for model_name, (layers, hidden), setting in specs:
        block = make_block(model_name, setting, layers, hidden, args, max_positions=max(2048, *args.scaling_seqs) + 1)
        size = f"{layers}x{hidden}"
        doc["scaling"]["specs"].append({
            "model": model_name, "regime": setting, "size": size, "vocab": args.vocab, "dtype": args.dtype,
            "call": args.call, "transformers_defaults": model_defaults(model_name, args),
            "params": sum(p.numel() for p in block.base.parameters()),
            "trainable_params": sum(p.numel() for p in block.base.parameters() if p.requires_grad)})
        runner_cls = functools.partial(BlockRunner, block=block)
        history: dict[str, list[dict]] = {v.name: [] for v in variants}  # every point of this block, per variant
        for table in tables:
            table["memory_fraction"] = set_memory_limit(device, table["memory_limit_GiB"])
            for batch in args.scaling_batch:
                for regime in variants:
                    run = {"model": model_name, "regime": setting, "size": size, "variant": regime.name, "batch": batch,
                           "memory_limit_GiB": table["memory_limit_GiB"], "status": "ok", "note": None,
                           "points": [], "carried": [], "max_seq": None, "max_tokens": None, "capped": False,
                           "tries": 0, "try_s": 0.0}
                    table["runs"].append(run)
                    reason = unavailable(regime, model_name, setting, device, args.call)
                    if reason:
                        run.update(status="unavailable", note=reason)
                    else:
                        done = [r for r in table["runs"][:-1] if (r["model"], r["regime"], r["size"], r["batch"])
                                == (model_name, setting, size, batch) and r["max_seq"] is not None]
                        start = {"smallest": None, "anchor": next((r["max_seq"] for r in done if r["variant"] == bm.ANCHOR),
                                                                  None),
                                 "previous": max((r["max_seq"] for r in done), default=None)}[args.scaling_start]
                        search_variant(run, regime, block, runner_cls, batch, start, history[regime.name], scaled,
                                       device, clock, try_s, save)
                    table["rows"] = scaling_rows(table["runs"])
                    plot_scaling(doc, args.out)
                    save()
        del block
        bm.cleanup(device)
    set_memory_limit(device, None)


def search_variant(run: dict, regime, block, runner_cls, batch: int, start: int | None, history: list[dict], args,
                   device, clock: Clock, try_s: dict, save) -> None:
    """One variant's search at one (limit, batch) into ``run``; ``history``: this variant's points so far."""
    seqs, limit = args.scaling_seqs, run["memory_limit_GiB"]
    enforced = device.type == "cuda"
    search = SeqSearch(list(seqs))
    bound = None
    for p in history:  # what earlier searches settled
        index = seqs.index(p["seq"])
        if p["status"] == "ok" and p["batch"] == batch and p["limit_GiB"] <= limit:
            search.fit(index)
            run["carried"].append({**p, "from": f"{p['limit_GiB']:g} GiB"})
        elif (p["status"] != "ok" and p["batch"] <= batch and (p["limit_GiB"] >= limit or p["status"] == "error")
              and index < search.hi):
            search.fail(index)
            bound = p
    if bound is not None:
        run["carried"].append({**bound, "from": f"batch {bound['batch']}, {bound['limit_GiB']:g} GiB"})
    all_fits = [p for p in history if p["status"] == "ok"]  # peaks do not depend on the limit
    same_batch = [p for p in all_fits if p["batch"] == batch]

    def fits(seq: int) -> bool:
        over, _ = predicted_peak(all_fits, batch * seq)
        return enforced and over is not None and over <= FIT_SHARE * limit

    first = True
    while not search.done():
        if first and start is not None and start in seqs:
            index = search.clamp(seqs.index(start))
        else:
            index = search.next_index(fits)
        first = False
        seq = seqs[index]
        _, low = predicted_peak(same_batch, batch * seq)
        margin = args.scaling_predicted_oom
        if enforced and margin and low is not None and low > margin * limit:
            point = {"seq": seq, "batch": batch, "tokens": batch * seq, "status": "predicted_oom", "predicted_GiB": low,
                     "limit_GiB": limit}
            run["points"].append(point)
            history.append(point)
            search.fail(index)
            bm.log(START, f"scaling {run['model']}/{run['regime']} {regime.name:22s} b{batch} seq {seq:6d}: not tried, "
                          f"predicted >= {low:.1f} GiB > {margin:g} x {limit:g} GiB")
            continue
        expected = 1.15 * (try_s.get(regime.name) or clock.expected_compile(regime) + 5.0)  # its own slowest try
        if clock.deadline is not None and clock.now() + expected > clock.deadline:
            run.update(status="cut", note=f"not tried from seq {seq}: --deadline {clock.deadline:g} s "
                                          f"(a try is expected to take {expected:.0f} s)")
            break
        point = scaling_point(regime, run["model"], block, runner_cls, seq, batch, args, device)
        point["limit_GiB"] = limit
        run["points"].append(point)
        history.append(point)
        run["tries"] += 1
        run["try_s"] += point["wall_s"]
        try_s[regime.name] = max(try_s.get(regime.name, 0.0), point["wall_s"])
        bm.log(START, f"scaling {run['model']}/{run['regime']} {regime.name:22s} b{batch} seq {seq:6d} "
                      f"within {limit:g} GiB: {point['status']} peak={bm._fmt(point['peak_GiB'], '.2f')} GiB "
                      f"tok/s={bm._fmt(point['tokens_per_s'], '.0f')} ({point['wall_s']:.0f} s)")
        if point["status"] == "ok":
            search.fit(index)
            all_fits.append(point)
            same_batch.append(point)
            if point.get("first_step_s"):
                clock.measured(regime, point["first_step_s"])
        else:
            search.fail(index)
            if point["status"] != "oom":
                run.update(status=point["status"], note=point["error"])
                break
        save()
    if search.lo >= 0:
        run.update(max_seq=seqs[search.lo], max_tokens=batch * seqs[search.lo], capped=search.lo == len(seqs) - 1)
    elif run["status"] == "ok":
        run["note"] = f"even {seqs[0]} does not fit"


def scaling_point(regime, model_name, block, runner_cls, seq, batch, args, device) -> dict:
    """One try: build, compile, warm and time at (batch, seq); status ok / oom / error / skipped."""
    t0 = time.perf_counter()
    bm.cleanup(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, args.vocab, (batch, seq + 1), generator=generator).to(device)
    record = bm.new_record({}, model_name, regime, 0)
    with warnings.catch_warnings(record=True) as caught:  # velora_fx falls back to plain inductor with a warning
        warnings.simplefilter("always")
        runner = bm.warm_regime(regime, model_name, block.base, ids, None, record, args, START, runner_cls=runner_cls)
        if runner is not None:
            bm.time_block(runner, record, 0, START)
    del runner, ids
    check_context(device, record)
    peak = torch.cuda.max_memory_allocated(device) / GiB if device.type == "cuda" else None
    reserved = torch.cuda.max_memory_reserved(device) / GiB if device.type == "cuda" else None
    status = record["status"] if record["status"] in ("ok", "skipped") else ("oom" if _is_oom(record) else "error")
    bm.cleanup(device)
    ms = record.get("ms_per_step")
    rounds = record.get("rounds") or [{}]
    return {"seq": seq, "batch": batch, "tokens": seq * batch, "status": status, "peak_GiB": peak,
            "peak_reserved_GiB": reserved, "resident_GiB": rounds[0].get("mem_before_GiB"),
            "peak_extra_GiB": record.get("peak_extra_GiB"), "ms_per_step": ms,
            "tokens_per_s": seq * batch / ms * 1e3 if ms else None,
            "first_step_s": record.get("first_step_s"), "wall_s": time.perf_counter() - t0,
            "saved_activation_bytes": record.get("saved_activation_bytes"),
            "sites": record.get("sites"), "compressed_sites": record.get("compressed_sites"),
            "warnings": sorted({str(w.message)[:300] for w in caught if "velora_fx" in str(w.message)}),
            "error": None if status == "ok" else (record.get("error") or record.get("note") or "")[:300]}


def scaling_rows(runs: list[dict]) -> list[dict]:
    """One row per run: the longest sequence, its tokens/s and peak, and ratios to inductor of the
    same block, limit and batch: longest context, and tokens/s at inductor's longest sequence
    (where the variant was measured there, in this search or a carried one)."""
    def measured(run: dict) -> dict:
        return {p["seq"]: p for p in run["carried"] + run["points"] if p["status"] == "ok"}

    def compact(p: dict) -> dict:
        return {k: p[k] for k in ("seq", "status", "peak_GiB", "predicted_GiB", "from") if p.get(k) is not None}

    anchors = {(r["model"], r["regime"], r["size"], r["batch"]): r for r in runs if r["variant"] == bm.ANCHOR}
    rows = []
    for r in runs:
        anchor = anchors.get((r["model"], r["regime"], r["size"], r["batch"]))
        at = anchor["max_seq"] if anchor else None
        mine, best = measured(r), measured(r).get(r["max_seq"]) or {}
        base = measured(anchor).get(at) if at else None
        other = mine.get(at) if at else None
        rows.append({**{k: r[k] for k in ("model", "regime", "size", "variant", "batch", "memory_limit_GiB", "status",
                                          "note", "max_seq", "max_tokens", "capped", "tries", "try_s")},
                     "tokens_per_s": best.get("tokens_per_s"), "peak_GiB": best.get("peak_GiB"),
                     "peak_reserved_GiB": best.get("peak_reserved_GiB"), "compressed_sites": best.get("compressed_sites"),
                     "warnings": best.get("warnings") or [], "inductor_max_seq": at,
                     "context_vs_inductor": bm._ratio(r["max_seq"], at),
                     "tokens_per_s_vs_inductor": bm._ratio((other or {}).get("tokens_per_s"),
                                                           (base or {}).get("tokens_per_s")),
                     "points": [compact(p) for p in r["points"]], "carried": [compact(p) for p in r["carried"]]})
    return rows


def plot_scaling(doc: dict, out: str) -> None:
    """``scaling_<model>_<regime>_<size>.png`` in ``out``: the longest sequence per variant, one
    group of bars per limit (make_docs.plot_longest; nothing without matplotlib)."""
    rows = [row for table in doc["scaling"]["limits"] for row in table["rows"]]
    for key in dict.fromkeys((r["model"], r["regime"], r["size"]) for r in rows):
        name = make_docs._img_name("scaling", key)
        title = (f"{make_docs._title(*key)}: longest sequence that trains ({doc['device']}"
                 + ("" if doc["scaling"]["enforced"] else ", limits not enforced") + ")")
        if make_docs.plot_longest([r for r in rows if (r["model"], r["regime"], r["size"]) == key], title,
                                  os.path.join(out, name)) and name not in doc["scaling"]["plots"]:
            doc["scaling"]["plots"].append(name)


# -- output ----------------------------------------------------------------------------------
def summary_markdown(doc: dict) -> str:
    """bench_memory's table per block (plus tokens/s), and a scaling table per memory limit."""
    parts = [f"# benchmarks/run.py: {doc['device']}, torch {doc['torch']}, {doc['config']['dtype']}\n\n"
             f"`{doc['command']}`\n"] + ([f"**{doc['aborted']}**\n"] if doc.get("aborted") else [])
    for b in doc["blocks"]:
        header = (f"## {b['model']} / {b['regime']} / {b['size']}: vocab {b['vocab']}, batch {b['batch']} x {b['seq']}, "
                  f"{b['params'] / 1e6:.1f} M params, {b['trainable_params'] / 1e6:.2f} M trained"
                  + (", the plain transformers call" if b.get("call") == "plain" else "")
                  + (f", {b['transformers_defaults']}" if b.get("transformers_defaults") else ""))
        parts.append(bm.markdown(b["rows"], header))
        tps = [f"{r['regime']} {r['tokens_per_s']:.0f}" for r in b["rows"] if r.get("tokens_per_s")]
        if tps:
            parts.append("tokens/s: " + ", ".join(tps) + "\n")
        parts += [f"- {n}\n" for n in b["notes"]]
    scaling = doc.get("scaling")
    if scaling:
        for table in scaling["limits"]:
            parts += ["## " + make_docs.scaling_heading(table["memory_limit_GiB"], scaling) + "\n",
                      "\n".join(make_docs.scaling_table(table["rows"])) + "\n"]
        parts += [f"![longest sequence per limit]({name})\n" for name in scaling["plots"]]
    return "\n".join(parts)


def saver(doc: dict, out: str):
    """Rewrite run.json (atomically: a kill mid-write leaves the previous one) and summary.md."""
    def save() -> None:
        doc["wall_s"] = time.perf_counter() - START
        path = os.path.join(out, "run.json")
        with open(path + ".tmp", "w") as fh:
            json.dump(doc, fh, indent=1, default=str)
        os.replace(path + ".tmp", path)
        with open(os.path.join(out, "summary.md"), "w") as fh:
            fh.write(summary_markdown(doc))
    return save


def run_info(args, device: torch.device) -> dict:
    info = bm.run_info(args, device)
    info["runner"] = "benchmarks/run.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.abspath(sys.argv[0])
    if script.startswith(root + os.sep):  # the command as one would type it in the checkout
        info["command"] = shlex.join(["python", os.path.relpath(script, root)] + sys.argv[1:])
    info["versions"] = {"torch": torch.__version__}  # the build's own name (a CUDA wheel's metadata drops +cu130)
    info["versions"].update((name, _version(name)) for name in ("transformers", "peft", "liger_kernel", "accelerate",
                                                                "triton"))
    info["versions"]["velora_fx"] = bm.velora_fx.__version__  # also run from a checkout (PYTHONPATH), not installed
    info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return info


# -- CLI -------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r} is not LAYERSxHIDDEN, e.g. 12x1024")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["llama"], choices=["llama", "gpt2"])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES,
                    help="full: every weight trained; lora: PEFT LoRA on every projection, base frozen")
    ap.add_argument("--sizes", nargs="+", type=parse_size, default=[(12, 1024)], metavar="LAYERSxHIDDEN")
    ap.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                    help=f"default {' '.join(DEFAULT_VARIANTS)}; also {' '.join(MORE_VARIANTS)}, any bench_memory.py "
                         "regime (velora_<preset>[_budget_<x>], inductor_budget_<x>, +ro); inductor is always run first")
    bm.add_workload_arguments(ap, shape=False, warmup=2, unit="variant")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "same"])
    ap.add_argument("--no-grad-cos", dest="grad_cos", action="store_false")
    ap.add_argument("--num-groups", type=int, default=None,
                    help="pin num_groups for velora variants and eager_reference; PEFT's VeLoRA uses it too (default 32)")
    ap.add_argument("--compiler", default="inductor", choices=["inductor", "eager"],
                    help="eager: no code generation for every compiled variant (inductor's partitioner and "
                         "decompositions only): fast CPU smoke runs")
    ap.add_argument("--keep-grads", action="store_true")
    # the same two options as bench_memory.py's (which defines them in its own parse_args); Runner reads args.call
    ap.add_argument("--call", default="loss", choices=["loss", "plain"],
                    help="loss: a wrapper returning the loss (models.LMLoss); plain: the compiled transformers model "
                         "itself, model(input_ids=..., labels=...).loss, as users and the HF Trainer call it")
    ap.add_argument("--transformers-defaults", action="store_true",
                    help="transformers' own config defaults where the builders differ (GPT-2: dropout 0.1, gelu_new)")
    ap.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                    help="wall-clock budget from process start: blocks share it, a variant is compiled only if it "
                         "is expected to fit, rounds after the first stop at it (skips are recorded)")
    ap.add_argument("--compile-estimate", type=float, default=None, metavar="SECONDS",
                    help="expected compile + first step of a compiled variant before one has been measured "
                         "(default 30 on CUDA, 0 on CPU); the largest measured one is used after that")
    ap.add_argument("--scaling", action="store_true",
                    help="after the blocks: per memory limit, batch and variant, the longest of --scaling-seqs that "
                         "trains within the limit")
    ap.add_argument("--scaling-only", action="store_true", help="--scaling without the timed blocks")
    ap.add_argument("--memory-limit-gib", nargs="+", type=float, default=[24.0], metavar="GIB",
                    help="one scaling table per limit (CUDA: torch.cuda.set_per_process_memory_fraction; CPU: not "
                         "enforced, every sequence fits)")
    ap.add_argument("--scaling-seqs", nargs="+", type=int, default=list(SCALING_SEQS))
    ap.add_argument("--scaling-batch", nargs="+", type=int, default=None, metavar="BATCH",
                    help="batch sizes, each its own search (default: --batch)")
    ap.add_argument("--scaling-start", default="anchor", choices=["anchor", "previous", "smallest"],
                    help="a variant's first try at a (limit, batch): inductor's longest sequence there (anchor: its "
                         "tokens/s ratio is then measured), the longest any earlier variant reached (previous), or "
                         "the search's own start (smallest)")
    ap.add_argument("--scaling-predicted-oom", type=float, default=None, metavar="MARGIN",
                    help="do not try a sequence whose peak, extrapolated along the line through the variant's two "
                         "longest fitting sequences at that batch, exceeds MARGIN x the limit (recorded as "
                         "predicted_oom); off by default")
    ap.add_argument("--scaling-warmup", type=int, default=1)
    ap.add_argument("--scaling-steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/bench")
    ap.add_argument("--verbose", action="store_true", help="print velora_fx report tables")
    args = ap.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1 or args.scaling_warmup < 1 or args.scaling_steps < 1:
        ap.error("--warmup, --steps, --rounds, --scaling-warmup and --scaling-steps must be >= 1")
    names = list(dict.fromkeys(["inductor"] + [v for v in args.variants if v != "inductor"]))
    try:
        variants = [parse_variant(n) for n in names]
    except ValueError as exc:
        ap.error(str(exc))
    args.variants = names
    args.scaling = args.scaling or args.scaling_only
    args.scaling_seqs = sorted(set(args.scaling_seqs))
    args.scaling_batch = sorted(set(args.scaling_batch or [args.batch]))
    args.memory_limit_gib = sorted(set(args.memory_limit_gib))
    if min(args.scaling_seqs) < 1 or min(args.scaling_batch) < 1 or min(args.memory_limit_gib) <= 0:
        ap.error("--scaling-seqs and --scaling-batch must be >= 1, --memory-limit-gib > 0")
    if args.scaling_predicted_oom is not None and args.scaling_predicted_oom < 1:
        ap.error("--scaling-predicted-oom is a margin over the limit: >= 1")
    if args.compile_estimate is None:
        args.compile_estimate = 30.0 if args.device.startswith("cuda") else 0.0
    args.sequential = False  # bench_memory's Runner reads these
    args.warm_deadline = None
    return args, variants


def main(argv=None) -> dict:
    args, variants = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    if not bm._ISOLATE and hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(variants))
    doc = {**run_info(args, device), "deadline_s": args.deadline, "blocks": [], "scaling": None}
    save = saver(doc, args.out)
    clock = Clock(args.deadline, args.compile_estimate)
    specs = [(m, size, setting) for m in args.models for size in args.sizes for setting in args.regimes]
    try:
        if not args.scaling_only:
            for i, spec in enumerate(specs):
                run_block(spec, variants, args, doc, clock, len(specs) - i, save)
        save()
        if args.scaling:
            run_scaling(specs, variants, args, doc, clock, save)
    except ContextLost as exc:
        doc["aborted"] = f"stopped: the CUDA context was lost after {exc}; later variants and blocks did not run"
        bm.log(START, doc["aborted"])
    save()
    bm.log(START, f"done: {os.path.join(args.out, 'run.json')}")
    print(summary_markdown(doc))
    if doc.get("aborted"):
        sys.exit(3)
    return doc


if __name__ == "__main__":
    main()
