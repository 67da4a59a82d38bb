"""Which allocations are alive at a step's measured CUDA peak, and which line made each.

Why: a peak in GiB says nothing about *what* holds it.  The planner predicts a peak from the
partitioned graphs (``velora_fx.passes.step_peak``); to check that prediction, and to find buffers
a kernel keeps that nobody asked for, we record the caching allocator's history over one step
(``torch.cuda.memory._record_memory_history``), replay its alloc/free events, take the moment the
blocks allocated during the step peak, and name each live block by the innermost frame in
inductor's generated code (or, failing that, the innermost frame outside torch), with that
line's source text.

    from peak_attribution import attribute_peak
    summary = attribute_peak(lambda: model(**batch).loss.backward(), torch.device("cuda"))

Blocks allocated before the step and freed during it are not subtracted (they were not recorded),
so the peak reported here is the peak of what the step itself allocated.
"""
from __future__ import annotations

import linecache
from collections import Counter
from typing import Callable

import torch

MiB = 2 ** 20


def _frame_of(frames: list[dict]) -> dict | None:
    """The innermost frame in inductor's generated code, else the innermost outside torch."""
    for frame in frames:
        name = frame.get("filename", "")
        if "torchinductor" in name or "/inductor_cache" in name:
            return frame
    for frame in frames:
        name = frame.get("filename", "")
        if name.endswith(".py") and "/torch/" not in name and "peak_attribution" not in name:
            return frame
    return frames[0] if frames else None


def _where(frames: list[dict]) -> str:
    frame = _frame_of(frames)
    if frame is None:
        return "?"
    line = linecache.getline(frame["filename"], frame["line"]).strip()
    short = frame["filename"].rsplit("/", 1)[-1]
    return f"{short}:{frame['line']} {frame.get('name', '')}: {line[:160]}"


def live_at_peak(trace: list[dict]) -> tuple[int, list[dict], dict | None]:
    """Replay one device's allocator trace: (peak bytes above the start, blocks alive then, the
    allocation that reached the peak)."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: list[dict] = []
    last = None
    for event in trace:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak, last = current, list(live.values()), event
        elif action in ("free_requested", "free_completed") and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]   # whichever of the two comes first
    return peak, at_peak, last


def attribute_peak(step: Callable[[], object], device: torch.device, top: int = 40) -> dict:
    """Run ``step`` once with the allocator's history on; the peak and its largest live blocks."""
    torch.cuda.synchronize(device)
    torch.cuda.memory._record_memory_history(max_entries=500_000, stacks="python")
    try:
        step()
        torch.cuda.synchronize(device)
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    index = device.index if device.index is not None else torch.cuda.current_device()
    peak, blocks, last = live_at_peak(snapshot["device_traces"][index])
    by_line: Counter = Counter()
    count: Counter = Counter()
    sizes: dict[str, Counter] = {}
    for block in blocks:
        where = _where(block.get("frames", []))
        by_line[where] += block["size"]
        count[where] += 1
        sizes.setdefault(where, Counter())[round(block["size"] / MiB, 2)] += 1
    rows = [{"MiB": round(size / MiB, 1), "blocks": count[where], "where": where,
             "block_MiB": dict(sizes[where].most_common(4))}
            for where, size in by_line.most_common(top)]
    return {"peak_MiB": round(peak / MiB, 1), "live_blocks": len(blocks), "total_live_MiB":
            round(sum(b["size"] for b in blocks) / MiB, 1),
            "peak_reached_by": _where(last.get("frames", [])) if last else None, "largest": rows}
