"""Per transformers family (issue 7, for docs/models.md): what velora_fx's default plan
(``velora_fx.backend()``, mode auto) compresses and frees at a realistic size, and what that does
to peak memory and step time against the plain compiler on the same model, batch and weights.

Families: the 15 of tests/test_families.py (Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, Phi,
OPT, Falcon, BERT, RoBERTa, DistilBERT, ViT, T5, BART), here with training heads and a loss
computed from the logits inside the compiled module (``LogitsLoss``; no ``labels=``, see
docs/models.md on ``fullgraph=True``):

* decoders: next-token cross-entropy of the causal LM's logits;
* encoders (BERT, RoBERTa, DistilBERT): the ``*ForMaskedLM`` head's logits vs random targets at
  every position;
* ViT: ``ViTForImageClassification`` logits (1000 classes) vs random labels;
* T5, BART: the decoder's logits (``decoder_input_ids`` given) vs random targets.

``--scale gpu`` (the default on CUDA): decoders 12 x 1024 (16 heads, intermediate 2816, or 4 x
hidden where the family's MLP is GPT-2-style), vocab 32000, batch 4 x 1024; encoders 12 x 768
(DistilBERT 6), vocab 30522, batch 8 x 512; ViT-Base (12 x 768, 224 px, patch 16), batch 32;
T5 / BART d_model 768, 6 + 6 layers, vocab 32000, batch 8 x 512.  bf16 weights and fused AdamW on
CUDA; fp32 on the CPU.  ``--scale tiny``: the same shapes at 64 wide, 2 layers, batch 2 x 16.
Dropout is each config's transformers default.

Per family two variants, each its own copy of the same random weights, compiled, warmed and
timed by bench_memory.py's Runner (imported, not copied): ``inductor`` (``torch.compile``, or
``aot_eager_decomp_partition`` under ``--compiler eager``) and ``velora_auto``
(``velora_fx.backend()``, or ``backend(compiler="eager")``).  Recorded: parameters, the velora
report (sites, compressed sites with their setting, saved activation bytes before / after, the
planner's predicted bytes), activation bytes saved for backward as measured by saved-tensor
hooks, and on CUDA the peak allocated above the pre-step state, median ms per step over
``--rounds`` interleaved rounds of ``--steps``, and the first step (compile) time.

    python benchmarks/families.py --out results/families                 # one H100: --deadline 480 by default
    python benchmarks/families.py --scale tiny --compiler eager --out /tmp/families   # CPU smoke, ~1-2 min

Two compiles of a 12-layer model take about a minute on an H100, so one 8-minute run measures
about half the families; ``--deadline`` records the rest as skipped, and a second run with
``--resume <first>/families.json`` measures only those and writes the combined table.
``<out>/families.json`` (device, versions, command, one record per family) and
``<out>/families.md`` (the table) are rewritten after every variant, so a run cut off keeps what
it measured.
"""
from __future__ import annotations

import time

START = time.perf_counter()  # before the heavy imports: --deadline counts the whole process

import argparse  # noqa: E402
import collections  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from typing import Callable, Sequence  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_memory as bm  # noqa: E402
import run as runner  # noqa: E402
from quality import _write_json  # noqa: E402

from velora_fx.integrations import report_metrics  # noqa: E402
from velora_fx.report import _size  # noqa: E402

VARIANTS = ("inductor", "velora_auto")  # the first is the anchor of every ratio


# -- sizes and families ----------------------------------------------------------------------
@dataclass(frozen=True)
class Dims:
    """One model kind's shapes at one scale.  ``vocab``: ViT's number of classes;
    ``layers``: per stack for T5 / BART."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    vocab: int
    seq: int
    batch: int
    image: int = 0
    patch: int = 0


SCALES: dict[str, dict[str, Dims]] = {
    "gpu": {"decoder": Dims(1024, 12, 16, 2816, 32000, 1024, 4),
            "encoder": Dims(768, 12, 12, 3072, 30522, 512, 8),
            "vit": Dims(768, 12, 12, 3072, 1000, 0, 32, image=224, patch=16),
            "seq2seq": Dims(768, 6, 12, 3072, 32000, 512, 8)},
    "tiny": {"decoder": Dims(64, 2, 4, 176, 256, 16, 2),
             "encoder": Dims(64, 2, 4, 256, 256, 16, 2),
             "vit": Dims(64, 2, 4, 256, 10, 0, 2, image=32, patch=8),
             "seq2seq": Dims(64, 2, 4, 256, 256, 16, 2)},
}
# what a scale sets unless the command line does; the gpu deadline leaves a 10-minute slot ~2 min
PRESETS = {"gpu": dict(warmup=2, steps=5, rounds=2, deadline=480.0, compile_estimate=30.0),
           "tiny": dict(warmup=1, steps=2, rounds=1, deadline=None, compile_estimate=0.0)}


def _llama_like(d: Dims, ffn: int | None = None, **extra) -> dict:
    return dict(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=ffn or d.ffn, num_hidden_layers=d.layers,
                num_attention_heads=d.heads, num_key_value_heads=d.heads, max_position_embeddings=2 * d.seq, **extra)


def _encoder(d: Dims) -> dict:
    return dict(vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=d.ffn, num_hidden_layers=d.layers,
                num_attention_heads=d.heads, max_position_embeddings=d.seq + 2)


@dataclass(frozen=True)
class Family:
    model_class: str
    config_class: str
    kind: str                          # decoder | encoder | vit | seq2seq: the inputs, loss and Dims
    fields: Callable[[Dims], dict]     # the config's keyword arguments at these dims


FAMILIES: dict[str, Family] = {
    "llama": Family("LlamaForCausalLM", "LlamaConfig", "decoder", _llama_like),
    "qwen2": Family("Qwen2ForCausalLM", "Qwen2Config", "decoder", _llama_like),
    "mistral": Family("MistralForCausalLM", "MistralConfig", "decoder",
                      lambda d: _llama_like(d, head_dim=d.hidden // d.heads)),
    "gemma": Family("GemmaForCausalLM", "GemmaConfig", "decoder",
                    lambda d: _llama_like(d, head_dim=d.hidden // d.heads)),
    "gpt2": Family("GPT2LMHeadModel", "GPT2Config", "decoder", lambda d: dict(
        vocab_size=d.vocab, n_embd=d.hidden, n_inner=4 * d.hidden, n_layer=d.layers, n_head=d.heads,
        n_positions=2 * d.seq, bos_token_id=0, eos_token_id=0)),
    "gpt_neox": Family("GPTNeoXForCausalLM", "GPTNeoXConfig", "decoder", lambda d: dict(
        vocab_size=d.vocab, hidden_size=d.hidden, intermediate_size=4 * d.hidden, num_hidden_layers=d.layers,
        num_attention_heads=d.heads, max_position_embeddings=2 * d.seq)),
    "phi": Family("PhiForCausalLM", "PhiConfig", "decoder", lambda d: _llama_like(d, ffn=4 * d.hidden)),
    "opt": Family("OPTForCausalLM", "OPTConfig", "decoder", lambda d: dict(
        vocab_size=d.vocab, hidden_size=d.hidden, word_embed_proj_dim=d.hidden, ffn_dim=4 * d.hidden,
        num_hidden_layers=d.layers, num_attention_heads=d.heads, max_position_embeddings=2 * d.seq)),
    "falcon": Family("FalconForCausalLM", "FalconConfig", "decoder", lambda d: dict(
        vocab_size=d.vocab, hidden_size=d.hidden, num_hidden_layers=d.layers, num_attention_heads=d.heads,
        max_position_embeddings=2 * d.seq)),
    "bert": Family("BertForMaskedLM", "BertConfig", "encoder", _encoder),
    "roberta": Family("RobertaForMaskedLM", "RobertaConfig", "encoder", _encoder),
    "distilbert": Family("DistilBertForMaskedLM", "DistilBertConfig", "encoder", lambda d: dict(
        vocab_size=d.vocab, dim=d.hidden, hidden_dim=d.ffn, n_layers=max(2, d.layers // 2), n_heads=d.heads,
        max_position_embeddings=d.seq + 2)),
    "vit": Family("ViTForImageClassification", "ViTConfig", "vit", lambda d: dict(
        hidden_size=d.hidden, intermediate_size=d.ffn, num_hidden_layers=d.layers, num_attention_heads=d.heads,
        image_size=d.image, patch_size=d.patch, num_channels=3, num_labels=d.vocab)),
    "t5": Family("T5ForConditionalGeneration", "T5Config", "seq2seq", lambda d: dict(
        vocab_size=d.vocab, d_model=d.hidden, d_kv=d.hidden // d.heads, d_ff=d.ffn, num_layers=d.layers,
        num_decoder_layers=d.layers, num_heads=d.heads, decoder_start_token_id=0)),
    "bart": Family("BartForConditionalGeneration", "BartConfig", "seq2seq", lambda d: dict(
        vocab_size=d.vocab, d_model=d.hidden, encoder_layers=d.layers, decoder_layers=d.layers,
        encoder_attention_heads=d.heads, decoder_attention_heads=d.heads, encoder_ffn_dim=d.ffn,
        decoder_ffn_dim=d.ffn, max_position_embeddings=d.seq + 2)),
}
# default run order: one family of each kind first, so a --deadline still covers every kind
RUN_ORDER = ("llama", "gpt2", "bert", "vit", "t5", "qwen2", "mistral", "gemma", "gpt_neox", "phi", "opt", "falcon",
             "roberta", "distilbert", "bart")
assert sorted(RUN_ORDER) == sorted(FAMILIES)


def build_model(name: str, dims: Dims, dtype: torch.dtype) -> torch.nn.Module:
    """The family's training-head model with random weights (CPU, ``dtype``), SDPA attention,
    no KV cache in training."""
    import transformers
    family = FAMILIES[name]
    model_cls, config_cls = getattr(transformers, family.model_class), getattr(transformers, family.config_class)
    extra = {"use_cache": False} if family.kind in ("decoder", "seq2seq") else {}
    config = config_cls(attn_implementation="sdpa", **family.fields(dims), **extra)
    return model_cls(config).to(dtype).train()


def make_batch(kind: str, dims: Dims, dtype: torch.dtype, device: torch.device, seed: int) -> tuple[dict, torch.Tensor]:
    """``(model inputs, targets)`` for one step, fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    b, s, v = dims.batch, dims.seq, dims.vocab
    if kind == "decoder":
        ids = torch.randint(0, v, (b, s + 1), generator=g)
        inputs, targets = {"input_ids": ids[:, :-1]}, ids[:, 1:]
    elif kind == "vit":
        inputs = {"pixel_values": torch.randn(b, 3, dims.image, dims.image, generator=g).to(dtype)}
        targets = torch.randint(0, v, (b,), generator=g)
    else:
        inputs = {"input_ids": torch.randint(0, v, (b, s), generator=g)}
        if kind == "seq2seq":
            inputs["decoder_input_ids"] = torch.randint(0, v, (b, s), generator=g)
        targets = torch.randint(0, v, (b, s), generator=g)
    return {k: t.contiguous().to(device) for k, t in inputs.items()}, targets.contiguous().to(device)


class LogitsLoss(torch.nn.Module):
    """``forward(targets, **inputs) -> loss``: cross-entropy of the model's logits (every position,
    or one per image) in fp32, inside the compiled graph; the model never sees ``labels``."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, targets: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(**inputs).logits
        return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


class FamilyRunner(bm.Runner):
    """bench_memory's Runner (own weights copy, fused AdamW, warm-up, saved-bytes hooks, timed
    blocks with peak memory) on a ``LogitsLoss``: the targets stand where its ``ids`` do, the
    other inputs are bound to the compiled callable."""

    def __init__(self, regime, model_name, base, targets, args, inputs: dict | None = None) -> None:
        self.inputs = inputs or {}
        super().__init__(regime, model_name, base, targets, args)

    def build_model(self, base):
        return LogitsLoss(copy.deepcopy(base)).to(self.device)

    def compile(self, model_name):
        if self.regime.family == "inductor" and self.args.compiler == "eager":
            kwargs = {**bm._ISOLATE, "backend": runner.EagerPartition(None)}
            fn, backend, notes = torch.compile(self.model, **kwargs), None, {"compile_kwargs": runner._describe(kwargs)}
        else:
            fn, backend, notes = bm.compile_model(self.regime, self.model, model_name, self.args)
        return functools.partial(fn, **self.inputs), backend, notes


# -- what the plan did -----------------------------------------------------------------------
def site_parts(name: str) -> tuple[str | None, str]:
    """``(stack, path)`` of a site without the wrapper and layer indices:
    ``model.model.layers.3.mlp.down_proj`` -> ``(None, "mlp.down_proj")``,
    ``model.decoder.block.0.layer.2.DenseReluDense.wo`` -> ``("decoder", "DenseReluDense.wo")``,
    ``model.lm_head`` -> ``(None, "lm_head")``."""
    head, brace, rest = name.removeprefix("model.").partition("{")
    parts = head.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numbered:
        return None, head + brace + rest
    stack = next((p for p in parts[:numbered[0]] if p in ("encoder", "decoder")), None)
    return stack, ".".join(parts[numbered[-1] + 1:]) + brace + rest


def describe_compressed(sites: list[dict], stacks: bool = False) -> str:
    """``mlp.down_proj ×12 (velora g=2)``, one entry per site kind, in graph order; ``stacks``:
    with the stack where the model has an encoder and a decoder (``decoder fc2 ×6 (...)``)."""
    groups: dict[str, collections.Counter] = {}
    for s in sites:
        stack, path = site_parts(s["name"])
        key = f"{stack} {path}" if stack and stacks else path
        groups.setdefault(key, collections.Counter())[s["setting"]] += 1
    parts = []
    for key, settings in groups.items():
        count = sum(settings.values())
        detail = (next(iter(settings)) if len(settings) == 1
                  else ", ".join(f"{setting} ×{n}" for setting, n in settings.items()))
        parts.append(f"{key} ×{count} ({detail})")
    return "; ".join(parts) or "nothing"


def plan_summary(backend, model: torch.nn.Module) -> dict:
    """``backend.report(model)`` as numbers: its totals (latest graph of each frame), every
    compressed site with its setting and bytes, the planner's predicted bytes, and the table."""
    report = backend.report(model)
    sites = [s for g in report.current for s in g.sites]
    compressed = [{"name": s.name, "setting": s.setting, "consumers": s.consumers, "approximated": s.approximated,
                   "bytes_before": s.bytes_before, "bytes_after": s.bytes_after,
                   "predicted_bytes_after": s.predicted_bytes_after, "estimated_error": s.estimated_error}
                  for s in sites if s.decision == "compressed"]
    predicted = [s for s in compressed if s["predicted_bytes_after"] is not None]
    # why the others were left: the reasons with their numbers taken out, counted
    skipped = collections.Counter(re.sub(r"\d+(\.\d+)?", "N", s.reason)[:120] for s in sites
                                  if s.decision != "compressed")
    stacks = len({site_parts(s.name)[0] for s in sites} - {None}) > 1
    return {**report_metrics(report, prefix=""), "compressed": compressed,
            "what": describe_compressed(compressed, stacks),
            "compressed_bytes_before": sum(s["bytes_before"] for s in compressed),
            "compressed_bytes_after": sum(s["bytes_after"] for s in compressed),
            "predicted_bytes_after": sum(s["predicted_bytes_after"] for s in predicted) if predicted else None,
            "predicted_saved_bytes_after": (report.saved_bytes_before
                                            - sum(s["bytes_before"] - s["predicted_bytes_after"] for s in predicted)
                                            if len(predicted) == len(compressed) else None),
            "skip_reasons": dict(skipped.most_common()),
            "graph_status": [g.status + (f": {g.message}" if g.message else "") for g in report.current],
            "table": report.table()}


# -- one family ------------------------------------------------------------------------------
def expected_family_s(records: list[dict], args) -> float:
    """Seconds the next family should take: the median wall of the measured ones, at least two
    compiles at ``--compile-estimate``."""
    walls = [r["wall_s"] for r in records if r.get("status") == "ok" and not r.get("resumed")]
    return max([2 * args.compile_estimate] + ([statistics.median(walls)] if walls else []))


def run_family(name: str, args, record: dict, save: Callable[[], None]) -> None:
    """Build, warm both variants, time ``--rounds`` interleaved rounds; the record is filled in
    place and saved after every step of that.  Raises run.ContextLost if CUDA is gone."""
    t0 = time.perf_counter()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    family = FAMILIES[name]
    dims = SCALES[args.scale][family.kind]
    torch.manual_seed(args.seed)
    base = build_model(name, dims, dtype)
    inputs, targets = make_batch(family.kind, dims, dtype, device, args.seed)
    record.update(params=sum(p.numel() for p in base.parameters()), dims=asdict(dims),
                  model_config=base.config.to_dict(), tokens=targets.numel())
    bm.log(START, f"{name}: {family.model_class} {record['params'] / 1e6:.1f} M params, inputs "
                  + ", ".join(f"{k} {tuple(v.shape)}" for k, v in inputs.items()))
    runner_cls = functools.partial(FamilyRunner, inputs=inputs)
    runners = {}
    for regime in map(bm.parse_regime, VARIANTS):
        variant = record["variants"][regime.name]
        if args.deadline is not None and time.perf_counter() - START > args.deadline:
            bm.skip(variant, f"not started: past --deadline {args.deadline:g} s", START)
            continue
        with warnings.catch_warnings(record=True) as caught:  # velora_fx warns when a graph falls back
            warnings.simplefilter("always")
            run = bm.warm_regime(regime, name, base, targets, None, variant, args, START, runner_cls=runner_cls)
        variant["warnings"] = sorted({str(w.message)[:300] for w in caught if "velora" in str(w.message)})
        variant.pop("report", None)  # bench_memory's copy of the report; the plan below is the model's
        if run is not None:
            runners[regime.name] = run
            if run.backend is not None:
                record["plan"] = plan_summary(run.backend, run.model)
        save()
        runner.check_context(device, variant)
    for round_index in range(args.rounds):
        for key in list(runners):
            if not bm.time_block(runners[key], record["variants"][key], round_index, START):
                del runners[key]
            save()
            runner.check_context(device, record["variants"][key])
    del runners, base, inputs, targets
    bm.cleanup(device)
    finish(record, time.perf_counter() - t0)


def finish(record: dict, wall_s: float) -> None:
    """The family's status and its velora-vs-anchor ratios (bench_memory's, from the records)."""
    variants = record["variants"]
    record["wall_s"] = wall_s
    bad = [f"{k}: {bm._status_cell(v)}" for k, v in variants.items() if v["status"] != "ok"]
    record["status"] = "ok" if not bad else ("skipped" if all(v["status"] == "skipped" for v in variants.values())
                                             else "error")
    if bad:
        record["note"] = "; ".join(bad)
    anchor, velora = (variants[k] for k in VARIANTS)
    record["vs_" + VARIANTS[0]] = bm.ratios(velora, anchor) if anchor["status"] == velora["status"] == "ok" else None


def new_family_record(name: str) -> dict:
    family = FAMILIES[name]
    return {"family": name, "model_class": family.model_class, "kind": family.kind, "status": "pending",
            "variants": {v.name: bm.new_record({}, name, v, 0) for v in map(bm.parse_regime, VARIANTS)}}


# -- output ----------------------------------------------------------------------------------
def _cell(value, spec: str, ratio, unit: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{unit}" + ("" if ratio is None else f" ({ratio:.2f}×)")


def family_row(r: dict) -> list[str]:
    plan = r.get("plan") or {}
    anchor, velora = (r["variants"][k] for k in VARIANTS)
    vs = r.get("vs_" + VARIANTS[0]) or {}
    before, after = plan.get("saved_bytes_before"), plan.get("saved_bytes_after")
    saved = "–" if before is None else (f"{_size(before)} → {_size(after)}"
                                        + (f" ({after / before:.2f}×)" if before else ""))
    status = r["status"] + (f": {r['note']}" if r.get("note") else "")
    counters = velora.get("warm_counters") or {}
    if counters.get("graph_breaks"):
        status += f" ({counters['graphs']} graphs, {counters['graph_breaks']} breaks)"
    return [r["family"], "–" if not r.get("params") else f"{r['params'] / 1e6:.1f} M",
            "–" if not plan else f"{plan['compressed_sites']} / {plan['sites']}", plan.get("what", "–"), saved,
            _cell(velora.get("peak_extra_GiB"), ".2f", vs.get("peak_extra_GiB"), " GiB"),
            _cell(velora.get("ms_per_step"), ".1f", vs.get("ms_per_step")),
            f"{bm._fmt(velora.get('first_step_s'), '.1f')} / {bm._fmt(anchor.get('first_step_s'), '.1f')}",
            status[:160].replace("|", "/").replace("\n", " ")]


def markdown(doc: dict) -> str:
    plain = "aot_eager_decomp_partition" if doc["config"]["compiler"] == "eager" else "inductor"
    velora = "velora_fx.backend()" if doc["config"]["compiler"] != "eager" else 'velora_fx.backend(compiler="eager")'
    lines = [f"# velora_fx's default plan per family: {doc['device']}, torch {doc['torch']}, "
             f"transformers {doc['transformers']}, {doc['config']['dtype']}", "", f"`{doc['command']}`", "",
             f"Scale `{doc['config']['scale']}`; `{velora}` against `{plain}` on the same weights and batch; ratios "
             f"are to `{plain}`. Wall {bm._fmt(doc.get('wall_s'), '.0f')} s.", ""]
    header = ["family", "params", "sites compressed / all", "what is compressed", "saved activations before → after",
              "peak extra (× baseline)", "ms/step (× baseline)", "first step s velora / baseline", "status"]
    order = {name: i for i, name in enumerate(FAMILIES)}
    records = sorted(doc["records"], key=lambda r: order.get(r["family"], len(order)))
    lines += bm._table(header, [family_row(r) for r in records])
    lines += ["", "Saved activations: the velora report's totals (activation bytes the partition saves for backward, "
                  "before and after the rewrite). Peak extra: CUDA max_memory_allocated during a timed block above "
                  "what was allocated before it (activations, gradients, optimizer temporaries); – on CPU. ms/step: "
                  "median over the timed steps. First step: compile + one step."]
    lines += [f"- {r['family']}: from `{r['resumed']}`" for r in records if r.get("resumed")]
    if doc.get("aborted"):
        lines += ["", f"**{doc['aborted']}**"]
    return "\n".join(lines) + "\n"


def saver(doc: dict, out: str) -> Callable[[], None]:
    def save() -> None:
        doc["wall_s"] = time.perf_counter() - START
        _write_json(os.path.join(out, "families.json"), doc)
        with open(os.path.join(out, "families.md"), "w") as fh:
            fh.write(markdown(doc))
    return save


# -- main ------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", choices=list(FAMILIES), default=list(RUN_ORDER),
                    help="in run order (default: one of each kind first)")
    ap.add_argument("--scale", choices=sorted(SCALES),
                    help="gpu (default on CUDA) or tiny (CPU smoke; default without CUDA)")
    ap.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                    help="inductor: velora_fx.backend() vs inductor; eager: backend(compiler='eager') vs "
                         "aot_eager_decomp_partition (no code generation)")
    ap.add_argument("--deadline", type=float, metavar="SECONDS",
                    help="from process start: a family expected to end later is skipped, recorded (gpu scale: 480)")
    ap.add_argument("--compile-estimate", type=float, metavar="SECONDS",
                    help="one compile + first step before one is measured (gpu: 30, tiny: 0)")
    ap.add_argument("--resume", metavar="JSON", help="a previous families.json: its ok families are kept, not rerun")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="weights and AdamW state (default bfloat16 on CUDA, float32 on the CPU)")
    for flag in ("warmup", "steps", "rounds"):
        ap.add_argument(f"--{flag}", type=int, help="default from --scale (gpu: 2, 5, 2; tiny: 1, 2, 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results/families")
    ap.add_argument("--verbose", action="store_true", help="print velora_fx report tables")
    args = ap.parse_args(argv)
    args.scale = args.scale or ("gpu" if args.device.startswith("cuda") else "tiny")
    for key, value in PRESETS[args.scale].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.families = list(dict.fromkeys(args.families))
    if min(args.warmup, args.steps, args.rounds) < 1:
        ap.error("--warmup, --steps and --rounds must be >= 1")
    args.num_groups, args.keep_grads = None, False  # what bench_memory's Runner and compile_model read
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    os.makedirs(args.out, exist_ok=True)
    device = torch.device(args.device)
    doc = {**runner.run_info(args, device), "runner": "benchmarks/families.py", "main_argv": argv,
           "command": shlex.join(["python", "benchmarks/families.py", *argv]), "deadline_s": args.deadline,
           "variants": {"inductor": ("aot_eager_decomp_partition" if args.compiler == "eager"
                                     else "torch.compile (inductor)"),
                        "velora_auto": f"velora_fx.backend({'compiler=eager' if args.compiler == 'eager' else ''})"},
           "scale": {k: asdict(v) for k, v in SCALES[args.scale].items()}, "records": []}
    kept = {}
    if args.resume:
        with open(args.resume) as fh:
            kept = {r["family"]: {**r, "resumed": args.resume} for r in json.load(fh)["records"] if r["status"] == "ok"}
    save = saver(doc, args.out)
    for name in args.families:
        if name in kept:
            doc["records"].append(kept[name])
            continue
        record = new_family_record(name)
        doc["records"].append(record)
        expected = expected_family_s(doc["records"], args)
        elapsed = time.perf_counter() - START
        if doc.get("aborted"):
            record.update(status="skipped", note=doc["aborted"])
        elif args.deadline is not None and elapsed + expected > args.deadline:
            record.update(status="skipped", note=f"not started: at {elapsed:.0f} s, expected {expected:.0f} s more, "
                                                 f"past --deadline {args.deadline:g} s")
        else:
            try:
                run_family(name, args, record, save)
            except runner.ContextLost as exc:
                doc["aborted"] = f"stopped: the CUDA context was lost after {exc}; later families did not run"
                record.update(status="error", note=doc["aborted"])
            except Exception as exc:  # noqa: BLE001 - recorded; the next family still runs
                record.update(status="error", note=f"{type(exc).__name__}: {str(exc)[:300]}",
                              traceback=traceback.format_exc())
                bm.cleanup(device)
        bm.log(START, f"{name}: {record['status']}" + (f" ({record['note'][:200]})" if record.get("note") else "")
                      + (f", {record['plan']['what']}" if record.get("plan") else ""))
        save()
    save()
    print("\n" + markdown(doc), flush=True)
    bm.log(START, f"done: {os.path.join(args.out, 'families.json')}")
    return doc


if __name__ == "__main__":
    main()
