"""Inductor's Triton kernels for a training step, generated on a machine without a GPU: which
kernels a rewrite adds or removes and what each one writes (the fusion a GPU run gets).

Inductor generates Triton kernels for CPU tensors with ``cpu_backend="triton"``.  This script
stops short of compiling them (no GPU driver is needed; the step's values are garbage and unused)
and makes the ``cat`` lowering take its GPU branch (on CPU, inductor copies a uint8 ``cat`` with
aten's kernel, where on a GPU a reduction writes straight into its slice).  It patches private
inductor internals for the life of the process: a developer's tool, not part of velora_fx.  Needs
the ``triton`` package (torch's CUDA wheels bring it); checked on torch 2.11.0, 2.14.1 and 2.15.0.

Per regime and graph (forward, backward): the Triton kernel launches, the extern (matmul) calls,
and the kernels that compute the MLP's activation (``tanh`` for GPT-2's ``gelu_new``, SiLU for
Llama) with the buffers each writes.  The question it answers: are the few-bit codes and the
VeLoRA coefficients written by the activation's own kernel, or by a kernel of their own?

    python benchmarks/triton_codegen.py --out results/triton_codegen.json
    python benchmarks/triton_codegen.py --model llama --dtype bfloat16 --out results/triton_codegen_llama.json
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import sys
import textwrap

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import velora_fx  # noqa: E402
from models import TRANSFORMERS_DEFAULTS, build  # noqa: E402

REGIMES = {  # name -> velora_fx.backend options (None: plain inductor)
    "inductor": None,
    "velora_head": {"codecs": ("velora", "chunked_loss")},
    "default": {},
    "bytecodes": {"pack_codes": False},
    "max_memory": {"mode": "max_memory"},
}


class TritonCapture:
    """While active: inductor generates Triton code for CPU tensors, keeps each graph's output code
    in ``codes`` and runs no kernel."""

    def __init__(self) -> None:
        self.codes: list[str] = []

    def install(self) -> "TritonCapture":
        import torch._inductor.config as inductor_config
        import torch.utils._triton as triton_utils
        from torch._inductor import async_compile, graph, lowering

        inductor_config.cpu_backend = "triton"
        inductor_config.fx_graph_cache = False
        triton_utils.triton_hash_with_backend = lambda: "no-gpu"  # asks the (absent) driver otherwise
        triton_utils.triton_backend = lambda: None

        class _NoKernel:
            def run(self, *args, **kwargs):
                pass

        async_compile.AsyncCompile.triton = lambda self, name, source, *a, **k: _NoKernel()
        codegen = graph.GraphLowering.codegen
        codes = self.codes

        def keep_code(lowered):
            out = codegen(lowered)
            codes.append(getattr(out[0], "value", out[0]))
            return out

        graph.GraphLowering.codegen = keep_code
        source = textwrap.dedent(inspect.getsource(lowering.cat)).split("\n", 1)[1]  # without its decorator
        gpu_source = source.replace('cpu_device = inputs[0].get_device().type == "cpu"', "cpu_device = False")
        if gpu_source == source:
            raise RuntimeError("this torch's cat lowering has no CPU branch to switch off: update triton_codegen.py")
        namespace = dict(vars(lowering))
        exec(compile(gpu_source, "triton_codegen.cat", "exec"), namespace)  # noqa: S102 - inductor's own source
        lowering.lowerings[torch.ops.aten.cat.default] = lowering._register_lowering(
            torch.ops.aten.cat, namespace["cat"], False, lowering.ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT, False, {})
        return self


def summarize(code: str, marker: str) -> dict:
    """Launch counts of one graph's output code, and the kernels whose name or body holds ``marker``
    with the buffers they write (their ``out_ptr`` / ``in_out_ptr`` arguments at the call)."""
    call = code[code.index("def call("):]
    sources = dict(re.findall(r"^(triton_\w+) = async_compile\.triton\('\w+', '''(.*?)'''", code, re.M | re.S))
    launches = re.findall(r"^\s+(triton_\w+)\.run\((.*?), stream=", call, re.M)
    allocations = dict(re.findall(r"^\s+(buf\d+) = empty_strided_cpu\((.*?)\)$", call, re.M))
    aliases = dict(re.findall(r"^\s+(buf\d+) = reinterpret_tensor\((buf\d+),", call, re.M))
    marked = []
    for name, args in launches:
        body = sources.get(name, "")
        if marker not in body and marker not in name:
            continue
        params = re.search(r"def \w+\((.*?)\):", body).group(1).split(", ")
        values = [a.strip() for a in args.split(",")]
        written = [v for p, v in zip(params, values) if p.startswith(("out_ptr", "in_out_ptr"))]
        marked.append({"kernel": name, "writes": {w: allocations[w] if w in allocations else
                                                  f"a slice of {allocations.get(aliases.get(w), '?')}"
                                                  for w in written}})
    return {"triton_launches": len(launches), "extern_calls": len(re.findall(r"extern_kernels\.\w+\(", call)),
            "marked_kernels": marked}


def run_regime(name: str, options: dict | None, args: argparse.Namespace, capture: TritonCapture) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(args.model, args.hidden, args.layers, vocab=args.vocab, **TRANSFORMERS_DEFAULTS[args.model])
    model = model.to(getattr(torch, args.dtype))
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    backend = "inductor" if options is None else velora_fx.backend(**options)
    first = len(capture.codes)
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    graphs = [summarize(code, args.marker) for code in capture.codes[first:]]
    return {"regime": name, "options": options, "graphs": graphs}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    ap.add_argument("--model", default="gpt2", choices=sorted(TRANSFORMERS_DEFAULTS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--marker", default=None, help="text in the body or name of the kernels to list (default: "
                    "the MLP activation's, libdevice.tanh for GPT-2's gelu_new, silu for Llama)")
    ap.add_argument("--out", default="results/triton_codegen.json")
    args = ap.parse_args(argv)
    args.marker = args.marker or {"gpt2": "libdevice.tanh", "llama": "silu"}[args.model]
    capture = TritonCapture().install()
    doc = {"torch": torch.__version__, "model": f"{args.model} {args.layers} x {args.hidden}, batch {args.batch} x "
           f"{args.seq}, vocab {args.vocab}, transformers' defaults, {args.dtype} on CPU tensors",
           "regimes": [run_regime(r, REGIMES[r], args, capture) for r in args.regimes]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in doc["regimes"]:
        for i, g in enumerate(r["graphs"]):
            kernels = "; ".join(f"{k['kernel']} writes {', '.join(k['writes'].values())}" for k in g["marked_kernels"])
            print(f"{r['regime']:12s} graph {i}: {g['triton_launches']:3d} Triton launches, "
                  f"{g['extern_calls']:2d} extern calls | {kernels or '-'}")
    return doc


if __name__ == "__main__":
    main()
