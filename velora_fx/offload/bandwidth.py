"""What the offload timeline needs measured on the device, once per device and process (and kept
on disk): the host link's copy bandwidth and the device's own matmul and memory rates.

Why measured: the transfers must fit inside compute in absolute time, and inductor's datasheet
rates (what ``step_cost`` ranks plans with) are not absolute times on every torch/triton.  Host link:
pinned memory both ways, 256 MiB copies on a side stream, the slower direction's best of three.
Device: a 4096^3 matmul in the graph's dtype and a 256 MiB device copy, best of three.  Measured on
real tensors: inside the partition step a fake mode is active, under which the copies take no time
(that gave 650-1370 GB/s on an H200 whose link gives 55 GB/s, and a 2.7x slower step).  Kept under
the inductor cache dir's ``velora_fx/`` by device name, so later processes skip the ~0.3 s.
"""
from __future__ import annotations

import functools
import json
import os

import torch

from .._compat import real_tensors

__all__ = ["host_bandwidth", "device_rates"]

_BYTES = 256 << 20


@functools.cache
def host_bandwidth(device: torch.device) -> float:
    """Bytes per second a pinned host <-> ``device`` copy reaches (the slower direction)."""
    def measure() -> float:
        gpu = torch.empty(_BYTES, dtype=torch.uint8, device=device)
        host = torch.empty(_BYTES, dtype=torch.uint8, pin_memory=True)
        d2h = _best_seconds(device, lambda: host.copy_(gpu, non_blocking=True))
        h2d = _best_seconds(device, lambda: gpu.copy_(host, non_blocking=True))
        return _BYTES / max(d2h, h2d)
    return _cached(device, "host_bytes_per_second", measure)


@functools.cache
def device_rates(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float, float]:
    """(matmul FLOP/s in ``dtype``, memory bytes/s) measured on ``device``."""
    def matmul() -> float:
        a = torch.randn(4096, 4096, device=device, dtype=dtype)
        return 2 * 4096**3 / _best_seconds(device, lambda: a @ a)

    def memory() -> float:
        src = torch.empty(_BYTES, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        return 2 * _BYTES / _best_seconds(device, lambda: dst.copy_(src))  # read and write
    return (_cached(device, f"matmul_flops_{str(dtype).replace('torch.', '')}", matmul),
            _cached(device, "memory_bytes_per_second", memory))


def _best_seconds(device: torch.device, op) -> float:
    """The best of three timed runs of ``op`` on a side stream (after one warm-up), by CUDA events."""
    stream = torch.cuda.Stream(device=device)
    best = float("inf")
    with torch.cuda.stream(stream):
        op()
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            op()
            end.record(stream)
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return best


def _cached(device: torch.device, key: str, measure) -> float:
    name = torch.cuda.get_device_name(device).replace(" ", "_")
    path = os.path.join(_cache_dir(), f"device_rates_{name}.json")
    try:
        with open(path) as f:
            known = json.load(f)
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)) and known[key] > 0:
        return float(known[key])
    with real_tensors():  # the partition step runs under a fake mode: fake copies take no time
        value = float(measure())
    known = known if isinstance(known, dict) else {}
    known[key] = value
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(known, f, indent=1)
    except OSError:
        pass
    return value


def _cache_dir() -> str:
    from ..passes.plan_cache import cache_dir
    return cache_dir()
