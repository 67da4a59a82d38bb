"""What the examples share: the velora run and its optional plain-compiler baseline, a timed
training step, the per-run summary and the results table."""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch

import velora_fx


def apply_size(ap: argparse.ArgumentParser, args: argparse.Namespace, sizes: dict[str, dict[str, Any]]) -> None:
    """Fill the options the command line left out from the ``--size`` preset; a CUDA preset on a
    machine without CUDA is a usage error that says what to pass instead."""
    for key, value in sizes[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device} (from --size {args.size}) needs CUDA; pass --device cpu")


def fmt_mem(n: int | None) -> str:
    return "n/a (CPU)" if n is None else f"{n / 2**20:.1f} MiB"


def start_peak(device: Any) -> bool:
    """Reset CUDA's peak counter; True when there is one to read afterwards."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    return cuda


def timed_step(compiled: Callable, optimizer: torch.optim.Optimizer, *inputs: Any) -> tuple[float, float]:
    """One forward, backward and optimizer step: (loss, seconds).  ``loss.item()`` syncs, so the
    time is real."""
    t0 = time.perf_counter()
    loss = compiled(*inputs)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    value = loss.item()
    return value, time.perf_counter() - t0


def summary(label: str, times: list[float], losses: list[float], module: torch.nn.Module, backend: Any,
            cuda: bool) -> dict[str, Any]:
    steady = times[1:] or times
    return {
        "label": label,
        "train_loss": losses[-1],
        "first_step_s": times[0],
        "step_s": statistics.median(steady),
        "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda": cuda,  # print_runs shows times only for CUDA runs
        # read now: a backend keeps a model's state and reports only while the model is alive
        "report": backend.report(module) if isinstance(backend, velora_fx.VeloraBackend) else None,
    }


def run_regimes(args: argparse.Namespace, run: Callable[[Any, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """``run(backend, label)`` with the velora backend, then (``--compare``) with the plain
    compiler the same code path would use: inductor, or aot_eager under ``--compiler eager``."""
    runs = [run(velora_fx.backend(mode=args.mode, compiler=args.compiler), "velora")]
    if args.compare:
        torch._dynamo.reset()  # a fresh cache: the baseline compiles from scratch too
        plain = "inductor" if args.compiler == "inductor" else "aot_eager"
        runs.append(run(plain, plain))
    return runs


CPU_TIMING_NOTE = ("step times and peak memory: not shown on CPU. Step times of these small models on a few\n"
                   "shared CPU cores are host overhead and noise, not benchmark results (nor is their ratio\n"
                   "between regimes). Run on CUDA (--size gpu) for timings.")


def print_runs(runs: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """One row per run: ``columns`` are (header, key, format); on CUDA followed by the step-time and
    peak-memory columns, on CPU by a note that CPU timings are not benchmark results; then the
    velora run's report table."""
    timed = all(r.get("cuda") for r in runs)
    head = " ".join(f"{h:>{max(len(h), 8)}}" for h, _, _ in columns)
    timing_head = f" {'step (median)':>14} {'first step':>11} {'peak memory':>12}" if timed else ""
    print(f"\n{'regime':<10} {head}{timing_head}")
    for r in runs:
        cells = " ".join(f"{format(r[key], fmt):>{max(len(h), 8)}}" for h, key, fmt in columns)
        timing = (f" {r['step_s'] * 1e3:11.1f} ms {r['first_step_s']:9.1f} s {fmt_mem(r['peak_mem_bytes']):>12}"
                  if timed else "")
        print(f"{r['label']:<10} {cells}{timing}")
    if not timed:
        print(CPU_TIMING_NOTE)
    print("\n" + runs[0]["report"].table())
