"""The loss head alone: ``cross_entropy(linear(h, W).float(), t)`` forward + backward, plain inductor
against the chunked head (``codecs=["chunked_loss"]``) at several chunk sizes, interleaved rounds.

What it answers (issue 17): does the head cost step time (target: within 2 % of inductor's) and
how much of the loss's memory does it hold (target: <= 5 % of inductor's peak above the inputs)?

    python benchmarks/bench_head.py --out results/gpu/v8/head          # GPU, ~2 min
    python benchmarks/bench_head.py --device cpu --rows 512 --vocab 2048 --hidden 64 --chunks 128 \\
        --rounds 1 --steps 2 --out /tmp/head                             # CPU smoke

One JSON, ``<out>/head.json``: device, versions, command, per variant ms per step (median over
rounds), peak above the inputs, first step (compile) and the relative error of every gradient
against an fp32 reference.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import velora_fx  # noqa: E402
from velora_fx.codecs import chunked_loss  # noqa: E402

from peak_attribution import attribute_peak  # noqa: E402

GiB = 2 ** 30


def head_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w).float(), t)


class Head(torch.nn.Module):
    """lm_head + loss as a model has it: the weight a parameter (so the backend binds it)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())

    def forward(self, h, t):
        return head_loss(h, self.weight, t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def variants(chunks: list[int], unfused: bool) -> dict:
    out = {"inductor": lambda: "inductor"}
    for c in chunks:
        out[f"head_c{c}"] = (lambda c=c: velora_fx.backend(codecs=["chunked_loss"], loss_chunk_size=c))
    if unfused and chunks:
        out[f"head_c{chunks[0]}_unfused"] = (lambda c=chunks[0]: velora_fx.backend(codecs=["chunked_loss"],
                                                                                    loss_chunk_size=c))
    return out


def use_accumulation(name: str, device: torch.device, dtype: torch.dtype) -> None:
    """The ``_unfused`` variants sum grad_W in two steps (product, then add), the others as the
    head decides (the matmul's epilogue where the device has it)."""
    chunked_loss._FUSED_ADDMM.clear()
    if name.endswith("_unfused"):
        chunked_loss._FUSED_ADDMM[(device.type, torch.float32, dtype)] = False


def run_variant(name, make_backend, h0, w0, t, device):
    """Build and compile one variant, run its first step; returns (fn, h, weight, first step s)."""
    torch._dynamo.reset()
    use_accumulation(name, device, h0.dtype)
    head = Head(w0)
    fn = torch.compile(head, backend=make_backend())
    h, w = h0.detach().clone().requires_grad_(), head.weight
    _sync(device)
    start = time.perf_counter()
    fn(h, t).backward()
    _sync(device)
    return fn, h, w, time.perf_counter() - start


def timed(fn, h, w, t, steps, device) -> tuple[float, float | None]:
    """ms per step and peak GiB above what was allocated before the steps."""
    h.grad = w.grad = None
    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    if before is not None:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        h.grad = w.grad = None
        fn(h, t).backward()
    _sync(device)
    ms = (time.perf_counter() - start) / steps * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - before) / GiB if before is not None else None
    return ms, peak


def rel_error(got, ref) -> float:
    return float((got.float() - ref).norm() / ref.norm())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rows", type=int, default=8192, help="tokens N (batch x sequence)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--no-unfused", action="store_true", help="skip the unfused-accumulation comparison")
    ap.add_argument("--attribute", action="store_true",
                    help="CUDA: record one more step per variant and name the blocks alive at its peak")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    h0 = (torch.randn(args.rows, args.hidden, generator=gen) * 0.5).to(device, dtype)
    w0 = (torch.randn(args.vocab, args.hidden, generator=gen) * args.hidden ** -0.5).to(device, dtype)
    t = torch.randint(0, args.vocab, (args.rows,), generator=gen).to(device)
    t[: args.rows // 10] = -100

    hr, wr = h0.float().requires_grad_(), w0.float().requires_grad_()
    head_loss(hr, wr, t).backward()  # fp32 reference gradients

    compiled, records = {}, {}
    for name, make in variants(args.chunks, not args.no_unfused).items():
        fn, h, w, first = run_variant(name, make, h0, w0, t, device)
        records[name] = {"first_step_s": first, "ms": [], "peak_GiB": [],
                         "grad_h_rel_error": rel_error(h.grad, hr.grad), "grad_w_rel_error": rel_error(w.grad, wr.grad)}
        compiled[name] = (fn, h, w)
    for _ in range(args.rounds):  # A B A B: every variant once per round
        for name, (fn, h, w) in compiled.items():
            use_accumulation(name, device, dtype)
            ms, peak = timed(fn, h, w, t, args.steps, device)
            records[name]["ms"].append(ms)
            records[name]["peak_GiB"].append(peak)
    if args.attribute and device.type == "cuda":
        for name, (fn, h, w) in compiled.items():
            use_accumulation(name, device, dtype)
            h.grad = w.grad = None
            records[name]["peak_attribution"] = attribute_peak(lambda: fn(h, t).backward(), device)
    base = statistics.median(records["inductor"]["ms"])
    base_peak = records["inductor"]["peak_GiB"][-1]
    for r in records.values():
        r["ms_per_step"] = statistics.median(r["ms"])
        r["time_ratio"] = r["ms_per_step"] / base
        r["peak_ratio"] = r["peak_GiB"][-1] / base_peak if base_peak else None
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
           "shape": {"rows": args.rows, "hidden": args.hidden, "vocab": args.vocab, "dtype": args.dtype},
           "rounds": args.rounds, "steps": args.steps, "variants": records}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head.json"), "w") as fh:
        json.dump(doc, fh, indent=1)
    for name, r in records.items():
        peak = f"{r['peak_GiB'][-1]:.3f} GiB ({r['peak_ratio']:.3f}x)" if r["peak_ratio"] is not None else "-"
        print(f"{name:22s} {r['ms_per_step']:8.2f} ms ({r['time_ratio']:.3f}x)  peak {peak}  "
              f"first {r['first_step_s']:.1f} s  err h {r['grad_h_rel_error']:.2e} W {r['grad_w_rel_error']:.2e}")
    return doc


if __name__ == "__main__":
    main()
