"""GPU smoke check: the backend under real inductor on CUDA agrees with the eager reference,
trains under CUDA graphs (``mode="reduce-overhead"``) with the same state updates and gradients as
without them, and what "auto" finds on a Llama-like and a GPT-2-like model (explain tables).

    python benchmarks/gpu_smoke.py --out results/smoke            # add --no-explain to skip the big models
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import velora_fx
from velora_fx.reference import apply_velora


def _models(hidden: int, layers: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=(hidden * 11 // 4 + 63) // 64 * 64,
                                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                         num_key_value_heads=max(1, hidden // 64), max_position_embeddings=2048,
                                         attn_implementation="sdpa"))
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=hidden, n_layer=layers, n_head=max(1, hidden // 64),
                                      n_positions=2048, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="sdpa"))
    return {"llama": llama, "gpt2": gpt2}


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).logits


def _loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def check_against_reference(name, model, ids, mode):
    """Compiled (inductor, mode=all, one v per linear group) vs eager reference (same v)."""
    compiled_model, ref_model = copy.deepcopy(model), copy.deepcopy(model)
    b = velora_fx.backend(num_groups=8, mode=mode, max_error=1.0)
    loss = _loss(torch.compile(compiled_model, backend=b), ids)
    loss.backward()
    report = b.report()
    # eager reference with the backend's v for every compressed linear
    vectors = {}
    for site, entry in b.state_dict()["sites"].items():
        if entry["vector"] is not None:
            vectors[site] = entry["vector"]
    compressed = {c: s.state for s in report.compressed for c in s.approximated}
    wrapped = apply_velora(ref_model, num_groups=8, include=list(compressed) or ["<none>"], init="first_batch")
    assert sorted(wrapped) == sorted(compressed), (wrapped, compressed)
    for path in wrapped:
        mod = ref_model.get_submodule(path)
        mod.v.copy_(vectors[compressed[path]].to(mod.v.device))
        mod.initialised.fill_(True)
    ref_loss = _loss(ref_model, ids)
    ref_loss.backward()
    worst = {}
    for (n, p), (_, q) in zip(compiled_model.named_parameters(), ref_model.named_parameters()):
        if p.grad is None:
            continue
        cos = F.cosine_similarity(p.grad.float().flatten(), q.grad.float().flatten(), 0).item()
        rel = ((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12)).item()
        worst[n] = (cos, rel)
    lowest = min(worst.items(), key=lambda kv: kv[1][0])
    return {"model": name, "mode": mode, "loss": loss.item(), "ref_loss": ref_loss.item(),
            "min_grad_cos_vs_reference": lowest[1][0], "at": lowest[0],
            "max_rel_err": max(v[1] for v in worst.values()), "compressed": len(report.compressed)}


def check_second_instance(name, model, ids, mode=None):
    """Two instances of one class on one backend (dynamo runs the first's graph for the second,
    CUDA graphs with ``mode="reduce-overhead"``): the second trains on its own v, which the eager
    reference sets from the second's own first batch, and on the reference's gradients."""
    torch._dynamo.reset()
    first, second = copy.deepcopy(model), copy.deepcopy(model)
    b = velora_fx.backend(num_groups=8, mode="all", max_error=1.0)
    kwargs = {"mode": mode} if mode else {}
    other = ids.roll(1, 0).flip(1)
    for m, batch in ((first, ids), (second, other), (first, other), (second, ids)):
        if mode:
            torch.compiler.cudagraph_mark_step_begin()
        m.zero_grad(set_to_none=True)
        _loss(torch.compile(m, backend=b, **kwargs), batch).backward()
    compressed = {c: s.state for s in b.report(model=second).compressed for c in s.approximated}
    reference = copy.deepcopy(model)
    apply_velora(reference, num_groups=8, include=sorted(compressed) or ["<none>"], init="first_batch")
    _loss(reference, other)  # the reference's first batch sets its v, as the second model's did
    reference.zero_grad(set_to_none=True)
    _loss(reference, ids).backward()  # the second model's second step
    ours = b.state_dict(model=second)["sites"]
    v_err = max((ours[state]["vector"].to(ids.device) - reference.get_submodule(path).v).abs().max().item()
                for path, state in compressed.items())
    rel = max(((p.grad.float() - q.grad.float()).norm() / q.grad.float().norm().clamp_min(1e-12)).item()
              for (_, p), (_, q) in zip(second.named_parameters(), reference.named_parameters()) if q.grad is not None)
    v_first = b.state_dict(model=first)["sites"]
    differs = any(not torch.equal(v_first[k]["vector"], ours[k]["vector"]) for k in ours)
    return {"model": name, "mode": mode, "compressed": len(compressed), "max_v_err_vs_own_first_batch": v_err,
            "max_grad_rel_err_vs_reference": rel, "v_differs_from_first_instance": differs}


def check_cudagraphs(name, model, ids, init="ema:0.9", steps=3):
    """The same training steps with and without CUDA graphs: same v after every step, same grads."""
    runs = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = copy.deepcopy(model)
        b = velora_fx.backend(num_groups=8, mode="all", init=init)
        fn = torch.compile(m, backend=b, mode=mode) if mode else torch.compile(m, backend=b)
        vs, grads = [], []
        for step in range(steps):
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            batch = ids.roll(step, 0) if step else ids
            m.zero_grad(set_to_none=True)
            _loss(fn, batch).backward()
            vs.append({k: e["vector"].clone() for k, e in b.state_dict()["sites"].items() if e["vector"] is not None})
            grads.append({n: p.grad.detach().float().clone() for n, p in m.named_parameters() if p.grad is not None})
        from torch._dynamo.utils import counters
        runs[mode] = (vs, grads, dict(counters["inductor"]))
    (v0, g0, _), (v1, g1, c1) = runs[None], runs["reduce-overhead"]
    v_diff = max((a[k] - b[k]).abs().max().item() for a, b in zip(v0, v1) for k in a)
    v_moved = max((v0[-1][k] - v0[0][k]).abs().max().item() for k in v0[0])
    rel = max(((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-12)).item() for a, b in zip(g0, g1) for n in a)
    return {"model": name, "init": init, "max_v_diff_cudagraphs": v_diff, "v_moved_over_steps": v_moved,
            "max_grad_rel_diff_cudagraphs": rel, "cudagraph_skips": c1.get("cudagraph_skips", 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/smoke")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--no-explain", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "torch": torch.__version__,
            "command": " ".join(sys.argv)}
    results = {"info": info, "checks": [], "explain": {}}
    torch.manual_seed(0)
    small = _models(128, 2)
    ids = torch.randint(0, 256, (4, 128), device=dev)
    for name, model in small.items():
        for mode in ("all", "auto"):
            t = time.time()
            results["checks"].append(check_against_reference(name, Logits(model.to(dev)), ids, mode))
            results["checks"][-1]["seconds"] = time.time() - t
            print(results["checks"][-1], flush=True)
        for check in ([check_cudagraphs, lambda *a: check_second_instance(*a, mode="reduce-overhead")]
                      if dev == "cuda" else []) + [check_second_instance]:
            t = time.time()
            results["checks"].append(check(name, Logits(model.to(dev)), ids))
            results["checks"][-1]["seconds"] = time.time() - t
            print(results["checks"][-1], flush=True)
    with open(os.path.join(args.out, "smoke.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    if args.no_explain:
        return
    big = _models(args.hidden, args.layers)
    ids = torch.randint(0, 256, (args.batch, args.seq), device=dev)
    for name, model in big.items():
        model = Logits(model.to(dev, torch.bfloat16))
        t = time.time()
        report = velora_fx.explain(model, ids)
        print(f"== {name} ({time.time() - t:.1f}s)\n{report}", flush=True)
        results["explain"][name] = report.to_dict()
        del model
        torch.cuda.empty_cache() if dev == "cuda" else None
    with open(os.path.join(args.out, "smoke.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
