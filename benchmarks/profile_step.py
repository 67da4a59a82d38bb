"""Top CUDA kernels of one training step, plain inductor vs velora_fx (where does the time go?).

    python benchmarks/profile_step.py --model gpt2 --out results/profile
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import LMLoss, build  # noqa: E402

import velora_fx  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gpt2", choices=["llama", "gpt2"])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--out", default="results/profile")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    base = build(args.model, args.hidden, args.layers, vocab=256, max_positions=max(2048, args.seq)).to(torch.bfloat16)
    ids = torch.randint(0, 256, (args.batch, args.seq + 1), device="cuda")
    for name, backend in (("inductor", "inductor"), ("velora_auto", velora_fx.backend())):
        torch._dynamo.reset()
        model = LMLoss(base).cuda()
        fn = torch.compile(model, backend=backend)
        for _ in range(3):
            fn(ids).backward()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn(ids).backward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        with open(os.path.join(args.out, f"{args.model}_{name}.txt"), "w") as fh:
            fh.write(table)
        print(f"== {args.model} {name}\n{table}", flush=True)
        model.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
