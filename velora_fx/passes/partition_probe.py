"""Ask the real partitioner what a joint graph would save (on a copy, so the graph stays intact).

Planning partitions many variants of one graph, so a probe is kept cheap: the copy and the
partitioner's forward and backward modules are lazy graph modules (their Python code is generated
only if they ever run, as inductor's own partition step does), and ``ProbeCache`` answers a
graph it has partitioned before under the same knapsack budget without partitioning it again.
"""
from __future__ import annotations

import contextlib
import copy
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .._compat import fx_graph_cse, is_joint_primal
from .graph_utils import nbytes, output_values, tensor_val
from .min_cut_memo import MinCutMemo, graph_digest, shared_min_cuts

__all__ = ["SavedSet", "probe_partition", "ProbeCache", "graph_key", "lazy_clone"]

PartitionFn = Callable[..., tuple[fx.GraphModule, fx.GraphModule]]


@dataclass
class SavedSet:
    """Tensors the forward graph hands to backward, by joint-graph node name.

    Memory is counted per storage: a saved view (a q slice of a fused qkv output, a transpose)
    costs its base tensor's bytes, once however many views of it are saved."""

    activations: dict[str, str]   # saved non-input tensor -> name of the base it aliases
    inputs: dict[str, str]        # saved graph inputs (parameters, caller-held inputs) -> base
    base_bytes: dict[str, int]    # base name -> bytes
    fwd: fx.GraphModule | None  # None: read from the plan cache (saved names and bytes only)
    bwd: fx.GraphModule | None
    switches: tuple[float, ...] = ()  # knapsack budgets where this graph's partition jumps (min_cut_memo)
    known_peak: Any = None  # its predicted step peak (``step_peak.StepPeak``) once computed, or read from
                            # the plan cache (``plan_cache``: a baseline stored without its graphs)
    held: dict[str, int] = field(default_factory=dict)  # storages forward returns to the caller (base ->
                                                        # bytes): the caller holds them through backward

    @property
    def activation_bytes(self) -> int:
        return sum(self.base_bytes[b] for b in set(self.activations.values()))

    def _saved(self):
        yield from self.activations.items()
        yield from self.inputs.items()

    def bytes_of(self, names: Sequence[str], inputs: bool = True) -> int:
        """Bytes of the storages of ``names`` that are saved, directly or through a view
        (``inputs=False``: activations only; graph inputs live anyway)."""
        names = set(names)
        pairs = self._saved() if inputs else self.activations.items()
        bases = {base for saved, base in pairs if saved in names or base in names}
        return sum(self.base_bytes[b] for b in bases)

    def which(self, names: Sequence[str]) -> list[str]:
        """The saved tensors that are ``names`` or views of them."""
        names = set(names)
        return [saved for saved, base in self._saved() if saved in names or base in names]


def probe_partition(joint: fx.GraphModule, joint_inputs: Sequence[Any], partition: PartitionFn,
                    num_fwd_outputs: int, **kwargs: Any) -> SavedSet:
    with lazy_graph_modules():
        gm = lazy_clone(joint)
        fwd, bwd = partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
    activations, inputs, base_bytes, held = {}, {}, {}, {}
    for node in output_values(fwd)[:num_fwd_outputs]:
        base = alias_base(node) if isinstance(node, fx.Node) and tensor_val(node) is not None else None
        if base is not None and not is_joint_primal(base):
            held[base.name] = nbytes(base)
    for node in output_values(fwd)[num_fwd_outputs:]:
        if not isinstance(node, fx.Node) or tensor_val(node) is None:
            continue
        base = alias_base(node)
        base_bytes[base.name] = nbytes(base)
        (inputs if is_joint_primal(base) else activations)[node.name] = base.name
    return SavedSet(activations, inputs, base_bytes, fwd, bwd, held=held)


def alias_base(node: fx.Node) -> fx.Node:
    """The tensor whose storage ``node`` views (itself if it owns its storage), following the
    ops' schemas: an output with alias info (view, transpose, split...) shares its input's storage."""
    while node.op == "call_function":
        if node.target is operator.getitem:
            parent = node.args[0]
            if not _returns_alias(parent):
                break
            node = parent.args[0]
        elif _returns_alias(node):
            node = node.args[0]
        else:
            break
    return node


def _returns_alias(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.returns or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    info = schema.returns[0].alias_info
    return info is not None and not info.is_write


@dataclass
class ProbeCache:
    """Partitions of one pipeline run by (graph content, knapsack budget): plans often build the
    same graph twice (VeLoRA choosing nothing on top of the few-bit codes, a plan equal to the
    verified one), and a repeated probe returns the first one's ``SavedSet``.  The partitioner's
    min-cuts are shared across probes too (``min_cut_memo``): a graph partitioned under several
    knapsack budgets solves its budget-independent min-cuts once."""

    entries: dict[tuple[str, float], SavedSet] = field(default_factory=dict)
    min_cuts: MinCutMemo = field(default_factory=MinCutMemo)
    hits: int = 0

    def probe(self, gm: fx.GraphModule, run: Callable[[fx.GraphModule], SavedSet]) -> SavedSet:
        key = (graph_key(gm), float(torch._functorch.config.activation_memory_budget))
        found = self.entries.get(key)
        if found is not None:
            self.hits += 1
            return found
        with shared_min_cuts(self.min_cuts) as memo:
            memo.begin()
            saved = run(gm)
            saved.switches = memo.switches()
        self.entries[key] = saved
        return saved


def graph_key(gm: fx.GraphModule) -> str:
    """A digest of ``gm``'s graph as the partitioner reads it (``min_cut_memo.graph_digest``)."""
    return graph_digest(gm.graph)


def lazy_clone(gm: fx.GraphModule, cse: bool = False) -> fx.GraphModule:
    """``graph_utils.clone_graph_module`` (same node names, shallow-copied meta, shared attributes;
    ``cse``: identical computations merged), but the copy generates its Python code only if it is
    ever called."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree spec deprecation noise on copy
        graph = fx_graph_cse(gm.graph) if cse else copy.deepcopy(gm.graph)
    with lazy_graph_modules():
        clone = _make_graph_module(gm, graph)
    clone.meta = dict(getattr(gm, "meta", {}))
    return clone


try:  # torch's lazy graph modules (inductor's partition step uses them): private, so optional
    from torch.fx._lazy_graph_module import _make_graph_module, _use_lazy_graph_module
except ImportError:  # pragma: no cover - a torch without them: plain modules
    _make_graph_module = fx.GraphModule

    def _use_lazy_graph_module(should_use: bool):
        return contextlib.nullcontext()


def lazy_graph_modules():
    """Graph modules made inside (by the partitioner, by ``lazy_clone``) generate code on first call."""
    return _use_lazy_graph_module(True)
