"""The planner's decisions across processes: a second process that compiles the same graph under the
same options reads the first one's plan instead of searching again (issue 17: ``memory_budget``'s
search partitions the whole joint graph a dozen times, most of a first step's added compile time).

What is stored is the *decisions* (per site group: codec, sub-token size, which consumers, the
reason; per element-wise site: its bits; the knapsack budget chosen) and what the report says
about the partitions the first process measured (the baseline's saved set and predicted peak, the
budget's plans, the saved bytes the final partition gave).  Never the state: each process sets v
from its own first batch.  The pipeline applies the decisions, partitions once, and uses the plan
only if that partition saves exactly the bytes the entry says; else it plans as usual and writes
the entry again.  A decision made on the first process's calibration batch (``auto``'s error
bound) is kept as that process made it, as a model's later graphs keep its first plan.

Key: a digest of the joint graph as the partitioner reads it (nodes, targets, arguments, save tags,
each input's dtype, shape and strides), the config, the model's sticky plan so far, the state the
planner reads (a loaded v's size), the partitioner's options, torch's and velora_fx's versions
(its sources' hash), a schema number, and what the backend adds (the device kind, inductor's
options, the budget's reference).  One small JSON file per key under ``<inductor cache dir>/velora_fx/`` (the directory
``TORCHINDUCTOR_CACHE_DIR`` names), written atomically.  Off with ``VeloraConfig(plan_cache=False)``,
``VELORA_FX_PLAN_CACHE=0``, or torch's ``force_disable_caches``.  A file that cannot be read, from
another schema or for another key, is ignored (a debug log on ``velora_fx.plan_cache``).

The backend keeps a second kind of entry here: the predicted peak of a graph as dynamo gave it,
before the loss-head rewrite (``reference``), keyed the same way by dynamo's graph.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from typing import Any, Iterable

import torch
import torch.fx as fx

from .. import _compat
from .min_cut_memo import node_key

__all__ = ["SCHEMA", "enabled", "cache_dir", "graph_fingerprint", "key_of", "load", "store", "source_hash"]

SCHEMA = 1  # bump when an entry's meaning changes in a way the source hash would not show
ENV = "VELORA_FX_PLAN_CACHE"
log = logging.getLogger("velora_fx.plan_cache")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@functools.lru_cache(maxsize=1)
def source_hash() -> str:
    """A digest of velora_fx's sources (a plan from other code is another plan)."""
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(_PACKAGE_DIR)
                   for f in names if f.endswith(".py"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


def enabled(config: Any) -> bool:
    """Whether plans are read and written: the config's ``plan_cache``, unless ``VELORA_FX_PLAN_CACHE=0``
    or torch's caches are forced off."""
    if not getattr(config, "plan_cache", True):
        return False
    if os.environ.get(ENV, "").strip().lower() in ("0", "false", "off", "no"):
        return False
    return not _compat.caches_forced_off()


def cache_dir() -> str:
    return os.path.join(_compat.inductor_cache_dir(), "velora_fx")


def _stable(value: Any) -> str:
    """``repr`` without memory addresses (a function's repr names where it lives in this process)."""
    return _ADDRESS.sub("", repr(value))


def _target(target: Any) -> str:
    if isinstance(target, str):
        return target
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        return str(target)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if name:
        return f"{getattr(target, '__module__', '')}.{name}"
    return _stable(target)


def _meta(value: Any) -> Any:
    """What a graph input's example value says about the graph: dtype, device, sizes (symbols and
    their hints), strides, whether it wants a gradient."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.device.type, [str(s) for s in value.shape],
                [_compat.int_hint(s) for s in value.shape], [_compat.int_hint(s) for s in value.stride()],
                bool(value.requires_grad), isinstance(value, torch.nn.Parameter))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value), _compat.int_hint(value) if isinstance(value, torch.SymInt) else None)
    if isinstance(value, (list, tuple)):
        return [_meta(v) for v in value]
    return type(value).__name__ if value is not None else None


def graph_fingerprint(graph: fx.Graph, inputs: Iterable[Any] | None = None) -> str:
    """A digest of ``graph`` that is the same in another process for the same graph: each node's name,
    op, target (by qualified name), arguments and save tags, and each input's dtype, device, sizes and
    strides (``inputs``, in placeholder order, else the placeholders' example values)."""
    given = list(inputs) if inputs is not None else None
    digest = hashlib.sha256()
    index = 0
    for node in graph.nodes:
        item = node_key(node, _target)
        if node.op == "placeholder":
            value = given[index] if given is not None and index < len(given) else \
                node.meta.get("val", node.meta.get("example_value"))
            item += (_meta(value),)
            index += 1
        digest.update(_stable(item).encode())
    return digest.hexdigest()


def environment() -> dict[str, Any]:
    """What every entry's key holds: schema, torch, velora_fx, the partitioner's options."""
    return {"schema": SCHEMA, "torch": torch.__version__, "torch_git": getattr(torch.version, "git_version", ""),
            "velora_fx": source_hash(), "partitioner": _compat.partitioner_settings()}


def key_of(material: dict[str, Any]) -> str:
    """The key of an entry: a digest of ``material`` and ``environment()``."""
    text = json.dumps({**material, "environment": environment()}, sort_keys=True, default=_stable)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _path(kind: str, key: str) -> str:
    return os.path.join(cache_dir(), f"{kind}-{key}.json")


def load(kind: str, key: str) -> dict[str, Any] | None:
    """The entry of ``kind`` stored under ``key``, or None (none, or one that cannot be used: logged)."""
    path = _path(kind, key)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # unreadable, not JSON
        log.debug("velora_fx plan cache: ignoring %s (%s: %s)", path, type(exc).__name__, exc)
        return None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("kind") != kind \
            or data.get("key") != key or not isinstance(data.get("entry"), dict):
        what = data.get("schema") if isinstance(data, dict) else type(data).__name__
        log.debug("velora_fx plan cache: ignoring %s (another schema, kind or key: %r)", path, what)
        return None
    return data["entry"]


def store(kind: str, key: str, entry: dict[str, Any]) -> None:
    """Write an entry atomically (a temporary file renamed over the old one); never raises."""
    folder = cache_dir()
    try:
        os.makedirs(folder, exist_ok=True)
        text = json.dumps({"schema": SCHEMA, "kind": kind, "key": key, "entry": entry})
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{kind}-{key}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)  # as a plain open() would leave it (mkstemp's file is the owner's only)
            os.replace(tmp, _path(kind, key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except (OSError, TypeError, ValueError) as exc:  # read-only directory, a value JSON cannot hold
        log.debug("velora_fx plan cache: could not write %s entry %s (%s: %s)", kind, key, type(exc).__name__, exc)

