"""The pass pipeline on one joint graph: sites -> baseline partition -> plan -> rewrite ->
partition again -> verify (auto: revert what freed nothing) -> report.  Only sequencing here."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch.fx as fx

from ..codecs.base import get_codec
from ..config import VeloraConfig
from ..report import GraphReport, SiteReport
from ..state import SiteStore
from .._compat import int_hint
from .graph_utils import clone_graph_module, tensor_val
from .partition_probe import PartitionFn, SavedSet, probe_partition
from .planner import Decision, plan_groups
from .rewrite import rewrite_group
from .sites import find_groups

__all__ = ["JointContext", "run_pipeline"]

_MAX_ROUNDS = 4


@dataclass
class JointContext:
    """A joint graph and what the partitioner needs to split it."""

    gm: fx.GraphModule
    joint_inputs: Sequence[Any]
    num_fwd_outputs: int
    param_indices: Sequence[int]
    partition: PartitionFn
    partition_kwargs: dict[str, Any]
    primal_labels: Sequence[str | None] | None = None

    def probe(self, gm: fx.GraphModule) -> SavedSet:
        return probe_partition(gm, self.joint_inputs, self.partition, self.num_fwd_outputs, **self.partition_kwargs)


@dataclass
class PipelineResult:
    gm: fx.GraphModule        # rewritten joint graph (the input itself when nothing changed)
    saved: SavedSet           # its partition (fwd, bwd and the saved set)
    report: GraphReport


def run_pipeline(ctx: JointContext, config: VeloraConfig, store: SiteStore, graph_id: int = 0) -> PipelineResult:
    ctx = dataclasses.replace(ctx, gm=clone_graph_module(ctx.gm, cse=True))  # the partitioner's view
    groups = find_groups(ctx.gm, ctx.num_fwd_outputs, ctx.param_indices, ctx.primal_labels)
    baseline = ctx.probe(ctx.gm)
    decisions = plan_groups(groups, baseline, config)
    result_gm, after, encoded = ctx.gm, baseline, {}
    for _ in range(_MAX_ROUNDS):
        chosen = [d for d in decisions if d.compress]
        if not chosen:
            result_gm, after, encoded = ctx.gm, baseline, {}
            break
        result_gm = clone_graph_module(ctx.gm)
        encoded = {id(d): _rewrite(result_gm, d, config, store) for d in chosen}
        after = ctx.probe(result_gm)
        if config.mode == "all" or not _revert_unpaid(chosen, after, encoded):
            break
    if config.mode == "auto" and encoded and after.activation_bytes >= baseline.activation_bytes:
        for d in decisions:
            if d.compress:
                d.sites, d.reason = [], "no net gain in saved bytes on the real partition"
        result_gm, after, encoded = ctx.gm, baseline, {}
    report = GraphReport(graph_id=graph_id, status="rewritten" if encoded else "unchanged",
                         saved_bytes_before=baseline.activation_bytes, saved_bytes_after=after.activation_bytes)
    for d in decisions:
        if d.compress and _encodes_in_backward(after, encoded[id(d)]):
            d.reason += "; its encode runs in backward (nothing saved for it)"
    report.sites = [_site_report(ctx.gm, d, baseline, after, encoded.get(id(d), []), config) for d in decisions]
    return PipelineResult(result_gm, after, report)


def _rewrite(gm: fx.GraphModule, decision: Decision, config: VeloraConfig, store: SiteStore) -> list[str]:
    group = decision.group
    activation = next(n for n in gm.graph.nodes if n.name == group.encode_at)
    g = config.sub_token_size_for(int(tensor_val(activation).shape[-1]), group.name)
    codec = get_codec("velora", sub_token_size=g, coeff_dtype=config.coeff_dtype, scale=config.scale)
    store.get(group.name)
    return rewrite_group(gm, group.encode_at, decision.sites, codec, store.key(group.name))


def _encodes_in_backward(saved: SavedSet, encode_names: list[str]) -> bool:
    """The partitioner placed (part of) the encode in the backward graph."""
    names = set(encode_names)
    return any(n.op == "call_function" and n.name in names for n in saved.bwd.graph.nodes)


def _revert_unpaid(chosen: list[Decision], after: SavedSet, encoded: dict[int, list[str]]) -> bool:
    """Drop groups that freed nothing on the real partition; True if any was dropped.

    Either the activation is still saved (another backward op keeps it), or the partitioner
    moved the encode into backward on a recomputed activation: then exact recompute is what
    frees the memory, and approximating the gradient buys nothing."""
    dropped = False
    for d in chosen:
        still = after.which(d.group.forms)
        if still:
            d.sites, d.reason = [], f"still saved after rewrite (as {', '.join(still)}): another backward op keeps it"
        elif _encodes_in_backward(after, encoded[id(d)]):
            d.sites, d.reason = [], "partitioner recomputes it in backward instead: exact recompute frees it as well"
        else:
            continue
        dropped = True
    return dropped


def _site_report(gm: fx.GraphModule, d: Decision, baseline: SavedSet, after: SavedSet,
                 encoded: list[str], config: VeloraConfig) -> SiteReport:
    group = d.group
    activation = next(n for n in gm.graph.nodes if n.name == group.encode_at)
    val = tensor_val(activation)
    before_forms = baseline.which(group.forms)
    bytes_before = baseline.bytes_of(group.forms)
    if d.compress:
        bytes_after = after.bytes_of(group.forms) + after.bytes_of(encoded)
    else:
        bytes_after = bytes_before
    g = config.sub_token_size_for(int(val.shape[-1]), group.name) if d.compress else None
    return SiteReport(
        name=group.name, consumers=[s.module_path for s in group.sites],
        op="/".join(sorted({s.forward_op for s in group.sites})),
        shape=tuple(int_hint(s) for s in val.shape), dtype=str(val.dtype).replace("torch.", ""),
        saved_by_baseline=bool(before_forms), saved_forms=before_forms, bytes_before=bytes_before,
        bytes_after=bytes_after, decision="compressed" if d.compress else "skipped", reason=d.reason,
        sub_token_size=g, approximated=[s.module_path for s in d.sites])
