"""GPU check of ``memory_budget=0.5, offload=True`` (CUDA only): exactness and measured overlap.

An fp32 8-layer MLP (2048 wide, 8192 tokens, so the offloaded tensors are 64-256 MiB) runs 3 steps on
new inputs under plain inductor and under velora_fx with offload; it records the weight gradients'
largest relative difference per step, what was offloaded, the report's planned timeline and measured
overlap (``offload["measured"]``: each transfer's copy time and how long compute waited for it), the
rates the backend measured and cached, and the four transfer ops' host time per round trip of a
1 MiB tensor (eager).  Writes ``offload_check.json`` to ``--out``.

    python benchmarks/offload_check.py --out results/offload_check
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import time

import torch
import torch.nn as nn

import velora_fx
from velora_fx.offload.bandwidth import _cache_dir

WIDTH, TOKENS, LAYERS = 2048, 8192, 8


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(),
                                                  nn.Linear(4 * WIDTH, WIDTH)) for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x.pow(2).mean()


def _steps(model: nn.Module, backend, inputs) -> list:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    out = []
    for x in inputs:
        for p in model.parameters():
            p.grad = None
        loss = compiled(x)
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    return out


def _host_us_per_round_trip(rounds: int = 200) -> tuple[float, bool]:
    x = torch.randn(1 << 18, device="cuda")
    ops = torch.ops.velora_fx

    def trip():
        host = ops.offload_finish(ops.offload_start(x), x)
        return ops.reload_finish(ops.reload_start(host, x.device), host, x.device)
    for _ in range(10):
        trip()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(rounds):
        back = trip()
    spent = (time.perf_counter() - began) / rounds * 1e6
    torch.cuda.synchronize()
    return spent, bool(torch.equal(back, x))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/offload_check")
    args = ap.parse_args()
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
    torch.manual_seed(0)
    model = MLP().cuda()
    inputs = [torch.randn(TOKENS, WIDTH, device="cuda") for _ in range(3)]
    reference = _steps(model, "inductor", inputs)
    backend = velora_fx.backend(memory_budget=0.5, offload=True)
    got = _steps(model, backend, inputs)
    out["grad_rel_err_per_step"] = [max(((g - r).norm() / r.norm()).item() for g, r in zip(gg, rr))
                                    for (_, gg), (_, rr) in zip(got, reference)]
    out["loss_diff"] = [abs(a - b) for (a, _), (b, _) in zip(got, reference)]
    graph = backend.report().graphs[-1]
    offload = graph.offload or {}
    out["offloaded"] = offload.get("offloaded_bytes"), len(offload.get("tensors", []))
    out["message"] = graph.message[:600]
    out["offload_report"] = {k: offload.get(k) for k in ("bandwidth_gbps", "forward_ms", "backward_ms",
                                                          "offloaded_bytes", "need_bytes", "copy_ms", "measured")}
    out["rates_cache"] = {os.path.basename(f): json.load(open(f))
                          for f in glob.glob(os.path.join(_cache_dir(), "device_rates_*"))}
    out["host_us_per_4_ops"], out["roundtrip_equal"] = _host_us_per_round_trip()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "offload_check.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
