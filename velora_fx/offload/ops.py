"""The four custom ops that move a saved tensor to host memory in forward and back in backward.

Why our own ops: torch 2.11's ``enable_activation_offloading`` (the partitioner's flag) either copies
synchronously into pageable memory (measured on an H200: a toy 8-layer MLP step 43 -> 155 ms, peak
unchanged) or, with ``activation_offload_separate_stream``, fails to compile under inductor
(``streams.record_stream``'s fake implementation); torch 2.13's ``ao::offload`` ops are the same idea
as these.  Ours run on every torch this package supports, with one behaviour.

Each transfer is split in two ops joined by a *ticket* (a 0-d CPU tensor), so the graph has only
plain data flow (no aliasing, no mutation) and the copy overlaps the compute between the two:

    forward:   ticket = offload_start(x)         D2H copy of x on the transfer stream
               host   = offload_finish(ticket, x)  compute stream waits for the copy; x may be freed
    backward:  ticket = reload_start(host)       GPU buffer allocated, H2D copy on the transfer stream
               x      = reload_finish(ticket)    compute stream waits for the copy

``offload_finish`` takes ``x`` so that inductor keeps x's buffer (and reuses it for nothing else)
until the copy has finished.  One transfer stream per device keeps D2H and H2D in order, so a
pinned buffer is never handed to a later copy before the earlier copies on it have run.
Host buffers come from torch's caching host allocator (pinned, reused once freed and once the copies
recorded on them have finished), so after the first step no host memory is allocated.  On a device
other than CUDA the ops copy synchronously (the tests run them on CPU).

Measured overlap: each transfer carries a ``label``; its copy is bracketed by timing events on the
transfer stream, and the finish op records one on the compute stream where compute arrives.  Compute
stalled for as long as the copy ended after that arrival.  ``measured(labels)`` reads the latest
transfer of each label (synchronising on its events); a synchronous copy stalls for its whole time.
"""
from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["offload_start", "offload_finish", "reload_start", "reload_finish", "measured"]

_streams: dict[torch.device, Any] = {}
_pending: dict[int, tuple] = {}  # ticket -> (result, events, device, source kept alive, label)
_done: dict[str, tuple] = {}     # label -> the latest transfer's (copy start, copy end, compute arrival) or seconds
_lock = threading.Lock()
_tickets = itertools.count(1)


def _transfer_stream(device: torch.device):
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device=device)
    return _streams[device]


def _ticket(result: Tensor, label: str, events: Any, device: torch.device | None = None,
            source: Tensor | None = None) -> Tensor:
    """Park a transfer's result: with the (start, end) events its copy recorded on ``device``'s
    transfer stream, or the seconds a synchronous copy took."""
    key = next(_tickets)
    with _lock:
        _pending[key] = (result, events, device, source, label)
    return torch.tensor(key, dtype=torch.int64)


def _redeem(ticket: Tensor) -> Tensor:
    """The parked result; the compute stream waits for its copy first (recording where it arrived)."""
    with _lock:
        result, events, device, _, label = _pending.pop(int(ticket))
    if isinstance(events, tuple):
        compute = torch.cuda.current_stream(device)
        arrival = torch.cuda.Event(enable_timing=True)
        arrival.record(compute)
        compute.wait_event(events[1])
        events = (*events, arrival)
    if label:
        with _lock:
            _done[label] = events
    return result


def _timed_copy(stream, dst: Tensor, src: Tensor) -> tuple:
    """``dst.copy_(src)`` on ``stream`` between two timing events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        dst.copy_(src, non_blocking=True)
        end.record(stream)
    return start, end


def _synchronous(copy, label: str) -> Tensor:
    """A ticket for a copy made now (devices other than CUDA), with the seconds it took."""
    began = time.perf_counter()
    out = copy()
    return _ticket(out, label, time.perf_counter() - began)


def measured(labels) -> dict[str, dict[str, float]]:
    """The latest transfer of each of ``labels`` that ran: its copy time and how long compute waited
    for it (ms).  Synchronises on those transfers' events."""
    with _lock:
        found = {label: _done[label] for label in labels if label in _done}
    out = {}
    for label, events in found.items():
        if isinstance(events, tuple):
            start, end, arrival = events
            end.synchronize()
            arrival.synchronize()
            copy, stall = start.elapsed_time(end), max(arrival.elapsed_time(end), 0.0)
        else:  # a synchronous copy: compute waited for all of it
            copy = stall = events * 1e3
        out[label] = {"copy_ms": copy, "stall_ms": stall}
    return out


@torch.library.custom_op("velora_fx::offload_start", mutates_args=())
def offload_start(x: Tensor, label: str = "") -> Tensor:
    """Start copying ``x`` to host memory; returns a ticket for ``offload_finish``."""
    if x.device.type != "cuda":
        return _synchronous(lambda: x.to("cpu", copy=True).contiguous(), label)
    stream = _transfer_stream(x.device)
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)  # from torch's caching host allocator
    stream.wait_stream(torch.cuda.current_stream(x.device))
    return _ticket(host, label, _timed_copy(stream, host, x), x.device)


@offload_start.register_fake
def _(x: Tensor, label: str = "") -> Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("velora_fx::offload_finish", mutates_args=())
def offload_finish(ticket: Tensor, x: Tensor) -> Tensor:
    """The host copy of ``x`` once the copy finished (the compute stream waits for it); ``x`` is an
    argument only to keep its buffer alive until then."""
    return _redeem(ticket)


@offload_finish.register_fake
def _(ticket: Tensor, x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device="cpu")


@torch.library.custom_op("velora_fx::reload_start", mutates_args=())
def reload_start(host: Tensor, device: torch.device, label: str = "") -> Tensor:
    """Start copying ``host`` back to ``device``; returns a ticket for ``reload_finish``."""
    if device.type != "cuda":
        return _synchronous(lambda: host.to(device, copy=True), label)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)  # on the compute stream
    stream = _transfer_stream(out.device)
    stream.wait_stream(torch.cuda.current_stream(out.device))  # out's memory is free on the compute stream
    return _ticket(out, label, _timed_copy(stream, out, host), out.device, host)


@reload_start.register_fake
def _(host: Tensor, device: torch.device, label: str = "") -> Tensor:
    return torch.empty((), dtype=torch.int64, device="cpu")


@torch.library.custom_op("velora_fx::reload_finish", mutates_args=())
def reload_finish(ticket: Tensor, like: Tensor, device: torch.device) -> Tensor:
    """The reloaded tensor once its copy finished.  ``like`` (the host tensor) gives the fake
    value's shape and dtype; it is not read."""
    return _redeem(ticket)


@reload_finish.register_fake
def _(ticket: Tensor, like: Tensor, device: torch.device) -> Tensor:
    return torch.empty(like.shape, dtype=like.dtype, device=device)
