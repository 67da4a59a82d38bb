"""QLoRA under torch.compile (docs/models.md): a small random-weight Llama (512 wide, 4 layers,
vocab 32000) saved and reloaded with bitsandbytes 4-bit NF4 weights (bf16 compute), PEFT LoRA
(r 8 on q/k/v/o/gate/up/down, dropout 0), trained a few AdamW steps eagerly and under
``torch.compile`` with ``"inductor"``, ``velora_fx.backend()`` and
``velora_fx.backend(compiler="eager")``.  Each variant reloads the same saved weights, starts
LoRA from the same seed and sees the same batches; recorded per variant: losses, the first
step's LoRA gradients against eager's (max |diff| / max |eager|; at step 1 only ``lora_B`` has a
gradient, B starting at zero), the exception (type and first 500 characters) if it fails, graph
counts, peak memory, and for velora the report table.  Results: docs/models.md, QLoRA.

    pip install --no-deps .whl/bitsandbytes-*.whl .whl/peft-*.whl .whl/accelerate-*.whl
    python benchmarks/qlora_gpu.py --out results/qlora          # CUDA; about 80 s on an H100
    python benchmarks/qlora_gpu.py --device cpu --steps 2 --batch 1 --seq 32 --variants eager velora_eager
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback

import sys

import torch

import velora_fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import LMLoss  # noqa: E402  (next-token cross-entropy inside the compiled module)

VARIANTS = ("eager", "inductor", "velora", "velora_eager")  # eager is the reference


def save_base(path: str, args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2 * args.seq,
                         use_cache=False, attn_implementation="sdpa")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def load_qlora(path: str, args):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": args.device}, attn_implementation="sdpa")
    torch.manual_seed(args.seed + 1)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora).train()


def run_variant(name: str, path: str, batches: list[torch.Tensor], args, ref_grads: dict | None) -> dict:
    rec: dict = {"variant": name, "losses": []}
    backend = None
    try:
        model = LMLoss(load_qlora(path, args))
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        rec["trainable_params"] = sum(p.numel() for p in trainable.values())
        opt = torch.optim.AdamW(trainable.values(), lr=1e-3)
        if name == "eager":
            step = model
        else:
            backend = {"inductor": "inductor", "velora": velora_fx.backend(),
                       "velora_eager": velora_fx.backend(compiler="eager")}[name]
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            step = torch.compile(model, backend=backend)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = []
        for i, ids in enumerate(batches):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step(ids)
            loss.backward()
            if i == 0:
                grads = {n: p.grad.detach().float().clone() for n, p in trainable.items() if p.grad is not None}
                rec["grads_missing"] = len(trainable) - len(grads)
                if ref_grads is not None:
                    rec["first_grads_rel_err"] = max(
                        ((grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                        for n, g in ref_grads.items() if n in grads) if grads else None
                else:
                    rec["_grads"] = grads
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            rec["losses"].append(loss.item())
        later = sorted(times[1:])
        rec.update(status="ok", first_step_s=times[0], ms_per_step=1e3 * later[len(later) // 2] if later else None,
                   peak_GiB=torch.cuda.max_memory_allocated() / 2**30 if cuda else None)
    except Exception as exc:  # noqa: BLE001 - recorded
        rec.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}",
                   traceback=traceback.format_exc()[-3000:])
    if name != "eager":
        stats = torch._dynamo.utils.counters
        rec["dynamo"] = {"graphs": stats["stats"].get("unique_graphs", 0),
                         "graph_breaks": sum(stats["graph_break"].values()),
                         "break_reasons": [str(k)[:300] for k in list(stats["graph_break"])[:5]]}
    if backend is not None and not isinstance(backend, str):
        try:
            report = backend.report()
            rec["report"] = report.table()
            rec["compressed_sites"] = [s.name for s in report.compressed]
        except Exception as exc:  # noqa: BLE001
            rec["report"] = f"report() failed: {type(exc).__name__}: {exc}"
    return rec


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/qlora")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    args = ap.parse_args(argv)
    import bitsandbytes
    import peft
    import transformers
    doc = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else args.device,
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__, "bitsandbytes": bitsandbytes.__version__},
           "config": vars(args), "records": []}
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(0, 32000, (args.batch, args.seq + 1), generator=g).to(args.device)
               for _ in range(args.steps)]
    os.makedirs(args.out, exist_ok=True)
    ref = None
    with tempfile.TemporaryDirectory() as path:
        save_base(path, args)
        for name in ["eager"] + [v for v in args.variants if v != "eager"]:
            rec = run_variant(name, path, batches, args, None if ref is None else ref.get("_grads"))
            if name == "eager":
                ref = rec
            elif ref and ref["status"] == rec["status"] == "ok":
                rec["max_loss_diff_vs_eager"] = max(abs(a - b) for a, b in zip(rec["losses"], ref["losses"]))
            doc["records"].append({k: v for k, v in rec.items() if k != "_grads"})
            print(name, rec["status"], rec.get("error", ""), rec["losses"], flush=True)
            with open(os.path.join(args.out, "qlora.json"), "w") as fh:
                json.dump(doc, fh, indent=1)
    for rec in doc["records"]:
        if rec.get("report"):
            print(f"--- {rec['variant']} report\n{rec['report']}")
    return doc


if __name__ == "__main__":
    main()
