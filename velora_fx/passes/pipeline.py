"""The pass pipeline on one joint graph: sites -> names -> baseline partition -> estimate ->
plan -> rewrite -> partition again -> verify (revert what freed nothing) -> commit -> report.
Only sequencing here; each step lives in its own module."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from .._compat import int_hint, is_joint_primal, real_tensors
from ..codecs.base import get_codec
from ..codecs.rmm import sketch_rows
from ..codecs.rmm import structural_error as rmm_structural_error
from ..codecs.velora import StateRow, emit_pin
from ..config import VeloraConfig
from ..report import GraphReport, SiteReport
from . import plan_cache
from .budget import activation_bytes
from .calibrate import calibration_graph
from .chooser import plan_under_budget
from .codec_plan import CodecDecision, codec_report, rewrite_codes
from .estimate import SiteEstimator
from .graph_utils import elementwise_sources, is_reduction, near_inputs, output_values, tensor_val, view_forms
from .partition_probe import PartitionFn, ProbeCache, SavedSet, lazy_clone, probe_partition
from .plan_replay import Planned, plan_key, replay
from .planner import RMM_PLAN, Decision, plan_groups
from .pointwise_plan import plan_pointwise
from .pointwise_sites import find_pointwise_sites
from .rewrite import rewrite_group, store_states
from .sites import ActivationGroup, Site, find_groups
from .stored_plan import plan_stored, release_taken
from .stored_sites import find_stored_sites

__all__ = ["JointContext", "GraphBinding", "StateSite", "run_pipeline", "StateReadAfterUpdate"]

_MAX_ROUNDS = 4


class StateReadAfterUpdate(RuntimeError):
    """The partition would read a state input in backward after forward updated it in place."""


@dataclass
class GraphBinding:
    """How one joint graph reaches its model: names, state slots, sticky plan, real inputs.

    ``module_path(site)`` names a site's module as the user's model does; ``slot(site, features)``
    returns the site's state slot (``state._Slot``) or None if its weight has no state input;
    ``state_primal(param_index)`` is the primal index of that weight's state tensor."""

    module_path: Callable[[Site], str]
    slot: Callable[[Site, int], Any]
    state_primal: Callable[[int], int | None]
    plan: dict[str, int] = field(default_factory=dict)
    real_primals: Sequence[Any] | None = None
    sets_v_at_call: bool = False  # the backend's binder sets a fixed v missing at compile time before the
                                  # first call (``binding.py``); else the graph sets it from its first batch


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
    cache: ProbeCache = field(default_factory=ProbeCache)

    def probe(self, gm: fx.GraphModule) -> SavedSet:
        """``gm``'s partition under the ambient knapsack budget (once per graph and budget)."""
        return self.cache.probe(gm, lambda g: probe_partition(g, self.joint_inputs, self.partition,
                                                              self.num_fwd_outputs, **self.partition_kwargs))


@dataclass(frozen=True)
class StateSite:
    """A compressed VeLoRA site as the call-time binder needs it: which primal (weight) and
    orientation its v belongs to, its sizes, and the joint-graph node of its activation."""

    param_index: int
    orientation: int
    features: int
    sub_token_size: int
    activation: str
    name: str           # its slot's name (what a weight outside any model is called)


@dataclass
class PipelineResult:
    gm: fx.GraphModule        # rewritten joint graph (the input itself when nothing changed)
    saved: SavedSet           # its partition (fwd, bwd and the saved set)
    report: GraphReport
    state_sites: list[StateSite] = field(default_factory=list)
    calibration: fx.GraphModule | None = None  # computes the state sites' activations from the primals


@dataclass
class _Rewritten:
    encode_nodes: dict[int, list[str]]   # id(decision) -> its encode nodes
    saved_nodes: dict[int, list[str]]    # id(decision) -> the encode outputs meant to be saved (c, v)
    mutated: list[str]                   # state placeholders written in place
    pointwise: dict[int, list[str]] = field(default_factory=dict)  # id(few-bit decision) -> saved codes
    copies_vector: set[int] = field(default_factory=set)  # id(decision): saves a copy of v (its state is written)


def run_pipeline(ctx: JointContext, config: VeloraConfig, binding: GraphBinding, graph_id: int = 0,
                 budget_target: Callable[[SavedSet], int] | None = None,
                 plan_context: dict[str, Any] | None = None,
                 kept: Callable[[SavedSet], int] = activation_bytes) -> PipelineResult:
    """``budget_target(baseline partition)``: the saved bytes ``memory_budget`` asks for (None: no
    budget); the plan is then chosen among exact recompute and the codecs (``budget.py``), each
    partition measured by ``kept`` (what of its saved set stays on the device: offload).
    ``plan_context``: with the plan cache on, what else decides this graph's plan (the backend's
    part of the key, ``plan_cache.py``); None: the plan cache is off."""
    ctx = dataclasses.replace(ctx, gm=lazy_clone(ctx.gm, cse=True), cache=ProbeCache())  # the partitioner's view
    groups = find_groups(ctx.gm, ctx.num_fwd_outputs, ctx.param_indices, ctx.primal_labels) \
        if config.uses("velora") or config.uses("rmm") else []
    for group in groups:
        for site in group.sites:
            site.module_path = binding.module_path(site)
    pointwise = find_pointwise_sites(ctx.gm, ctx.param_indices) if config.uses("fewbit") else []
    _unique_names(pointwise)
    stored = find_stored_sites(ctx.gm, ctx.num_fwd_outputs, ctx.param_indices) if config.uses("gated") else []
    _unique_names(stored)
    nodes = {n.name: n for n in ctx.gm.graph.nodes}
    features = {id(g): int_hint(tensor_val(nodes[g.encode_at]).shape[-1]) for g in groups}
    slots = {id(g): binding.slot(g.sites[0], features[id(g)]) for g in groups}
    names = {id(g): slots[id(g)].name if slots[id(g)] else g.name for g in groups}
    key = plan_key(ctx, config, binding, groups, [*pointwise, *stored], slots, budget_target, plan_context) \
        if plan_context is not None else None
    entry = plan_cache.load("plan", key) if key else None
    planned = None
    if entry is not None:  # the decisions of an earlier process: calibrate only what sets v
        keep = {row.get("at") for row in entry.get("groups", []) if isinstance(row, dict) and row.get("sites")
                and row.get("codec") == "velora"} if isinstance(entry.get("groups"), list) else set()
        estimate = SiteEstimator(ctx.gm, [g for g in groups if g.encode_at in keep], binding.real_primals, config,
                                 names)
        planned = replay(entry, groups, pointwise, stored, budget_target,
                         lambda ds: _rules(ds, slots, estimate, binding, config),
                         lambda ds, codes, rules: _apply(ctx, None, ds, codes, slots, rules, binding, config))
    if planned is None:
        estimate = SiteEstimator(ctx.gm, groups, binding.real_primals, config, names,
                                 [s.encode_at for s in [*pointwise, *stored]],
                                 gradient_sizes=_measured_sizes(config, features, slots, binding.plan),
                                 num_fwd_outputs=ctx.num_fwd_outputs, param_indices=ctx.param_indices)
        planned = _plan(ctx, config, binding, groups, pointwise, stored, nodes, features, slots, estimate,
                        budget_target, kept)
        for d in planned.decisions:
            _note_error_origin(d, estimate)
        if key:
            plan_cache.store("plan", key, planned.entry())
    decisions, pointwise_plan, after, done = planned.decisions, planned.pointwise, planned.after, planned.done
    baseline, rules = planned.baseline, planned.rules
    _check_state_reads(after, done.mutated)
    for d in decisions:
        if not d.compress:
            continue
        if after.which(d.group.forms):
            d.reason += "; frees nothing: another backward op still keeps the activation"
        elif _encodes_in_backward(after, done.saved_nodes[id(d)]):
            d.reason += "; frees nothing: the partitioner computes its encode in backward"
    _commit(decisions, slots, rules, estimate, binding)
    for d in pointwise_plan:
        if not d.reason.startswith("excluded"):
            binding.plan.setdefault(d.sticky_prefix + d.site.name, d.bits or 0)
    rewritten = done.encode_nodes or done.pointwise
    report = GraphReport(graph_id=graph_id, status="rewritten" if rewritten else "unchanged",
                         saved_bytes_before=baseline.activation_bytes, saved_bytes_after=after.activation_bytes,
                         message=_estimate_message(estimate), plan_source="cache" if planned.from_cache else "planned")
    if planned.budget is not None:
        budget = planned.budget
        report.budget_target, report.recompute_budget = budget["target"], budget["recompute_budget"]
        report.budget_plans = [dict(p) for p in budget["plans"]]
        report.budget_candidates = [dict(c) for c in budget.get("candidates", [])]
        report.message = "; ".join(m for m in (report.message, budget["message"]) if m)
    report.sites = [_site_report(nodes[d.group.encode_at], d, baseline, after, done.saved_nodes.get(id(d), []),
                                 slots[id(d.group)], config, id(d) in done.copies_vector) for d in decisions]
    report.sites += [codec_report(d, nodes, baseline, after, done.pointwise.get(id(d), []))
                     for d in pointwise_plan]
    state_sites = _state_sites(decisions, slots, done)
    calibration = calibration_graph(ctx.gm, sorted({s.activation for s in state_sites})) \
        if state_sites and config.init == "first_batch" else None
    return PipelineResult(planned.gm, after, report, state_sites, calibration)


def _plan(ctx: JointContext, config: VeloraConfig, binding: GraphBinding, groups: list[ActivationGroup],
          pointwise: list, stored: list, nodes: dict[str, fx.Node], features: dict, slots: dict,
          estimate: SiteEstimator, budget_target: Callable[[SavedSet], int] | None,
          kept: Callable[[SavedSet], int] = activation_bytes) -> Planned:
    """Plan the graph: baseline partition, the codecs' plans verified on the real partition (reverting
    what frees nothing), and under ``memory_budget`` the cheapest of exact recompute and the codecs."""
    baseline = ctx.probe(ctx.gm)
    pointwise_plan = plan_pointwise(pointwise, baseline, config, estimate.values, binding.plan)
    taken = {f for d in pointwise_plan if d.compress for f in d.site.forms}
    pointwise_plan += plan_stored(stored, baseline, config, estimate.values, binding.plan, taken)
    weight_share = _weight_shares(ctx)
    for _ in range(_MAX_ROUNDS):
        # VeLoRA plans against the partition with the chosen few-bit codes: once a nonlinearity
        # keeps only codes of its input, the partitioner saves its output for the next matmul
        # (GELU's output for GPT-2's c_proj), which is then worth compressing
        release_taken(pointwise_plan, baseline, config, estimate.values)
        fewbit = [d for d in pointwise_plan if d.compress]  # few-bit and gated (stored) sites
        planning = ctx.probe(_with_pointwise(ctx.gm, fewbit)) if fewbit else baseline
        decisions = plan_groups(groups, planning, config, estimate, lambda g: features[id(g)], binding.plan,
                                lambda g: slots[id(g)].sub_token_size if slots[id(g)] is not None else None,
                                lambda g: _rmm_error(nodes[g.encode_at], config) if config.uses("rmm") else None,
                                weight_share)
        _share_sizes(decisions, slots, estimate)
        rules = _rules(decisions, slots, estimate, binding, config)
        apply = lambda: _apply(ctx, baseline, decisions, fewbit, slots, rules, binding, config)  # noqa: E731
        result_gm, after, done = apply()
        for _ in range(_MAX_ROUNDS - 1):
            if config.mode == "all" or not _revert_unpaid(nodes, [d for d in decisions if d.compress], planning,
                                                          after, done):
                break
            result_gm, after, done = apply()
        if config.mode == "all" or not _revert_unpaid_pointwise(nodes, fewbit, baseline, planning, after, done):
            break
    if config.mode != "all" and (done.encode_nodes or done.pointwise) and \
            after.activation_bytes >= baseline.activation_bytes:
        unpaid = [d for d in [*decisions, *pointwise_plan] if d.compress and not d.sticky]
        for d in unpaid:
            d.skip("no net gain in saved bytes on the real partition")
        if unpaid:
            fewbit = [d for d in pointwise_plan if d.compress]
            result_gm, after, done = _apply(ctx, baseline, decisions, fewbit, slots, rules, binding, config)
    budget = None
    if budget_target is not None:
        result_gm, after, done, (best, evaluated, candidates) = plan_under_budget(
            ctx, baseline, planning, decisions, pointwise_plan, (result_gm, after, done), weight_share, nodes,
            budget_target(baseline), config,
            lambda subset: _apply(ctx, baseline, [d for d in decisions if id(d) in subset],
                                  [d for d in pointwise_plan if id(d) in subset], slots, rules, binding, config),
            kept)
        budget = {"target": best.fit.target, "recompute_budget": best.fit.recompute_budget,
                  "plans": [c.to_dict(c is best) for c in evaluated], "candidates": candidates,
                  "message": best.fit.message(best.option.name)}
    return Planned(decisions, pointwise_plan, result_gm, after, done, baseline, rules, budget)


def _rules(decisions: list[Decision], slots: dict, estimate: SiteEstimator, binding: GraphBinding,
           config: VeloraConfig) -> dict[int, str]:
    return {id(d): _update_rule(config, slots[id(d.group)], estimate.has_data(d.group), binding.sets_v_at_call)
            for d in decisions}


def _state_sites(decisions: list[Decision], slots: dict, done: "_Rewritten") -> list[StateSite]:
    """The rewritten VeLoRA sites whose v lives in a weight's state (one per weight and orientation)."""
    out: dict[tuple[int, int], StateSite] = {}
    for d in decisions:
        slot = slots[id(d.group)]
        if d.codec != "velora" or slot is None or id(d) not in done.saved_nodes:
            continue
        index = d.group.sites[0].param_index
        out.setdefault((index, slot.orientation), StateSite(index, slot.orientation, slot.features,
                                                            d.sub_token_size, d.group.encode_at, slot.name))
    return list(out.values())


def _measured_sizes(config: VeloraConfig, features: dict, slots: dict,
                    sticky: dict[str, int]) -> Callable[[ActivationGroup], list[int]]:
    """The sub-token sizes the calibration backward measures for a group: those the planner may
    choose, its state's, and an earlier plan's."""
    def sizes(group: ActivationGroup) -> list[int]:
        d = features[id(group)]
        chosen = set(config.candidate_sizes(d))
        slot = slots[id(group)]
        if slot is not None and slot.sub_token_size:
            chosen.add(slot.sub_token_size)
        chosen.add(sticky.get(group.name, 0))
        return sorted(g for g in chosen if g > 1 and d % g == 0)
    return sizes


def _weight_shares(ctx: JointContext) -> Callable[[list[Site]], float]:
    """``share(sites)``: the fraction of this graph's trained weight elements (parameters with a
    gradient output) that the sites' weights hold; tied weights count once."""
    primals = [n for n in ctx.gm.graph.nodes if is_joint_primal(n)]
    grads = output_values(ctx.gm)[ctx.num_fwd_outputs:ctx.num_fwd_outputs + len(primals)]
    sizes: dict[int, int] = {}
    for i in ctx.param_indices:
        if i < len(grads) and isinstance(grads[i], fx.Node) and isinstance(tensor_val(primals[i]), torch.Tensor):
            sizes[i] = int_hint(tensor_val(primals[i]).numel())
    total = sum(sizes.values())

    def share(sites: list[Site]) -> float:
        return sum(sizes.get(i, 0) for i in {s.param_index for s in sites}) / total if total else 0.0
    return share


def _rmm_error(activation: fx.Node, config: VeloraConfig) -> float | None:
    shape = tensor_val(activation).shape
    if any(not isinstance(s, int) for s in shape):
        return None
    tokens = math.prod(shape[:-1])
    return rmm_structural_error(tokens, sketch_rows(tokens, config.rmm_ratio))


def _unique_names(sites: list) -> None:
    """A module applied twice (one activation module shared by layers) gets ``name#2``..."""
    seen: dict[str, int] = {}
    for site in sites:
        seen[site.name] = seen.get(site.name, 0) + 1
        if seen[site.name] > 1:
            site.name = f"{site.name}#{seen[site.name]}"


def _with_pointwise(gm: fx.GraphModule, chosen: list[CodecDecision]) -> fx.GraphModule:
    out = lazy_clone(gm)
    rewrite_codes(out, chosen)
    return out


def _revert_unpaid_pointwise(nodes: dict[str, fx.Node], chosen: list[CodecDecision], baseline: SavedSet,
                             planning: SavedSet, after: SavedSet, done: "_Rewritten") -> bool:
    """Drop few-bit sites that freed nothing: the encoded tensor is still saved, its codes are
    computed in backward, or the partitioner saved the function's output (or its input) in
    its place.  True if any was dropped (the caller plans VeLoRA again without them)."""
    dropped = False
    encoded = {n for names in done.pointwise.values() for n in names}
    newly_saved = set(after.activations) - set(planning.activations) - encoded
    for d in chosen:
        if d.sticky:
            continue
        site = d.site
        output_forms = sorted(({f.name for f in view_forms(nodes[site.output])} | {site.output}) - set(site.forms))
        traded = after.which(output_forms) and not baseline.which(output_forms)  # saved now, not before
        if after.which(site.forms + site.input_forms):
            d.skip("another backward op keeps it (still saved after the rewrite)")
        elif _encodes_in_backward(after, done.pointwise[id(d)]):
            d.skip("exact recompute frees it as well (the partitioner encodes it in backward)")
        elif traded:
            d.skip("the partitioner saves the function's output instead (no VeLoRA site takes it)")
        elif newly_saved & near_inputs(nodes[site.encode_at]):
            d.skip("the partitioner saves its input instead")
        else:
            continue
        dropped = True
    return dropped


def _share_sizes(decisions: list[Decision], slots: dict, estimate) -> None:
    """Groups whose weights share a state row (a module called twice) share its v, hence its g;
    a group whose weight has no state input cannot be compressed."""
    first: dict[int, int] = {}
    for d in decisions:
        slot = slots[id(d.group)]
        if not d.compress or d.codec == "rmm":  # rmm keeps no state
            continue
        if slot is None:
            d.skip("its weight has no state input (not a floating-point matrix)")
            continue
        g = first.setdefault(id(slot), d.sub_token_size)
        if g != d.sub_token_size:
            d.sub_token_size, d.estimated_error = g, estimate(d.group, g)


def _update_rule(config: VeloraConfig, slot, has_data: bool, set_at_call: bool) -> str:
    """In-graph update of v: none when v is fixed and known before the graph runs (set now at
    compile time from the calibration batch, loaded, set by an earlier graph, or set by the
    backend's binder before the first call), else the init rule."""
    if config.init == "batch" or config.init.startswith("ema:"):
        return config.init
    if slot is not None and (config.init == "random" or has_data or set_at_call or _initialised(slot)):
        return "none"
    return "first_batch"


def _initialised(slot) -> bool:
    with real_tensors():
        return slot.initialised


def _apply(ctx: JointContext, baseline: SavedSet | None, decisions: list[Decision], fewbit: list[CodecDecision],
           slots: dict, rules: dict, binding: GraphBinding, config: VeloraConfig
           ) -> tuple[fx.GraphModule, SavedSet, _Rewritten]:
    """Rewrite the chosen sites on a fresh copy and partition it (the input when none is chosen)."""
    chosen = [d for d in decisions if d.compress]
    fewbit = [d for d in fewbit if d.compress]
    if not chosen and not fewbit:  # (no baseline: a cached plan, under its knapsack budget)
        return ctx.gm, baseline if baseline is not None else ctx.probe(ctx.gm), _Rewritten({}, {}, [])
    gm = lazy_clone(ctx.gm)
    widths = _reduction_widths(gm, fewbit)
    pointwise = rewrite_codes(gm, fewbit) if fewbit else {}
    done = _rewrite(gm, chosen, slots, rules, binding, config, widths) if chosen else _Rewritten({}, {}, [])
    done.pointwise = pointwise
    return gm, ctx.probe(gm), done


def _reduction_widths(gm: fx.GraphModule, chosen: list[CodecDecision]) -> dict[str, int]:
    """The tensors the element-wise codecs encode with a reduction (by name), and its width."""
    nodes = {n.name: n for n in gm.graph.nodes}
    widths = {}
    for d in chosen:
        reduction_width = getattr(d.codec(), "reduction_width", None)
        val = tensor_val(nodes.get(d.site.encode_at))
        width = reduction_width(tuple(int_hint(s) for s in val.shape)) if reduction_width and val is not None else None
        if width:
            widths[d.site.encode_at] = width
    return widths


def _widths_beside(activation: fx.Node, widths: dict[str, int]) -> tuple[int, ...]:
    """The widths of the reductions in the kernel that produces ``activation``: of the encodes of
    the tensors it is computed from by element-wise ops, and 0 for a reduction of the model's own
    there (a norm's statistics: VeLoRA's sums over the normalised output do not fuse with it)."""
    return tuple(widths[n.name] if n.name in widths else 0 for n in elementwise_sources(activation)
                 if n.name in widths or is_reduction(n))


def _rewrite(gm: fx.GraphModule, chosen: list[Decision], slots: dict, rules: dict, binding: GraphBinding,
             config: VeloraConfig, widths: dict[str, int] | None = None) -> _Rewritten:
    placeholders = [n for n in gm.graph.nodes if is_joint_primal(n)]
    nodes = {n.name: n for n in gm.graph.nodes}
    current: dict[fx.Node, fx.Node] = {}  # state placeholder -> its latest value in the graph
    encode_nodes, saved_nodes = {}, {}
    written, pin_host = _written_states(chosen, placeholders, binding, rules)
    pinned: list[str] = []  # the coefficients of the sites whose v stays (rule "none")
    copies: set[int] = set()  # the sites whose state is written: they save a copy of v
    for d in chosen:
        site = d.group.sites[0]
        if d.codec == "rmm":
            codec = get_codec("rmm", ratio=config.rmm_ratio, salt=d.group.name)
            names, saved, _ = rewrite_group(gm, d.group.encode_at, d.sites, codec, None)
            encode_nodes[id(d)], saved_nodes[id(d)] = names, saved
            continue
        placeholder = placeholders[binding.state_primal(site.param_index)]
        slot = slots[id(d.group)]
        state = StateRow(current.get(placeholder, placeholder), slot.orientation, rules[id(d)],
                         written=placeholder in written)
        codec = get_codec("velora", sub_token_size=d.sub_token_size, coeff_dtype=config.coeff_dtype,
                          scale=config.scale, beside=_widths_beside(nodes[d.group.encode_at], widths or {}))
        names, saved, new_state = rewrite_group(gm, d.group.encode_at, d.sites, codec, state)
        encode_nodes[id(d)], saved_nodes[id(d)] = names, saved
        if new_state is not None:
            current[placeholder] = new_state
        else:
            pinned.append(saved[0])
        if placeholder in written:
            copies.add(id(d))
    if pinned:
        host = current.get(pin_host, pin_host)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        wanted = set(pinned)
        coefficients = [n for n in gm.graph.nodes if n.name in wanted]
        with gm.graph.inserting_before(max([host, *coefficients], key=order.__getitem__).next):
            current[pin_host] = emit_pin(gm.graph, host, coefficients)
    store_states(gm, current)
    return _Rewritten(encode_nodes, saved_nodes, [p.name for p in current], copies_vector=copies)


def _written_states(chosen: list[Decision], placeholders: list[fx.Node], binding: GraphBinding, rules: dict
                    ) -> tuple[set[fx.Node], fx.Node | None]:
    """The state placeholders this graph writes, and the one that takes the graph's pin: the
    state of a weight no site here reads (every weight has one), else a state an update rule
    writes anyway, else the first fixed-v site's.  Every other state stays unwritten, so backward
    reads its v in place instead of a copy."""
    def state_of(d: Decision) -> fx.Node:
        return placeholders[binding.state_primal(d.group.sites[0].param_index)]

    velora = [d for d in chosen if d.codec != "rmm"]
    fixed = [state_of(d) for d in velora if rules[id(d)] == "none"]
    written = [state_of(d) for d in velora if rules[id(d)] != "none"]
    if not fixed:
        return set(written), None
    read = set(fixed) | set(written)
    # every weight's state: state_primal maps a primal that is a weight to its state's primal, others to None
    states = [placeholders[s] for s in map(binding.state_primal, range(len(placeholders))) if s is not None]
    unread = [state for state in states if state not in read]
    host = (unread or written or fixed)[0]
    return set(written) | {host}, host


def _encodes_in_backward(saved: SavedSet, coefficients: list[str]) -> bool:
    """The partitioner computes the coefficients in the backward graph (from a kept activation)."""
    names = set(coefficients[:1])
    return any(n.op == "call_function" and n.name in names for n in saved.bwd.graph.nodes)


def _check_state_reads(saved: SavedSet, mutated: list[str]) -> None:
    """No backward node may read a state input that forward updated in place."""
    read = {n.name for n in saved.bwd.graph.find_nodes(op="placeholder")} & set(mutated)
    if read:
        raise StateReadAfterUpdate(f"backward would read updated state input(s) {sorted(read)}")


def _revert_unpaid(nodes: dict[str, fx.Node], chosen: list[Decision], baseline: SavedSet, after: SavedSet,
                   done: _Rewritten) -> bool:
    """Drop groups that freed nothing on the real partition; True if any was dropped.

    The activation is still saved (another backward op keeps it); or the partitioner computes the
    coefficients in backward from a kept activation (exact recompute frees it as well); or it now
    saves the activation's input instead, to recompute the activation for another backward op
    (tanh's output traded for its input).  Approximating the gradient buys nothing then.
    Sticky groups stay."""
    encoded = {n for names in done.saved_nodes.values() for n in names}
    newly_saved = set(after.activations) - set(baseline.activations) - encoded
    dropped = False
    for d in chosen:
        if d.sticky:
            continue
        if after.which(d.group.forms):
            d.skip("another backward op keeps it (still saved after the rewrite)")
        elif _encodes_in_backward(after, done.saved_nodes[id(d)]):
            d.skip("exact recompute frees it as well (the partitioner recomputes it in backward)")
        elif newly_saved and near_inputs(nodes[d.group.activation]) & newly_saved:
            d.skip("the partitioner saves its input instead, to recompute it for another backward op")
        else:
            continue
        dropped = True
    return dropped


def _commit(decisions: list[Decision], slots: dict, rules: dict, estimate: SiteEstimator,
            binding: GraphBinding) -> None:
    """Record the plan (sticky for later graphs of the model) and set v now where it is known
    (else the binder sets it before the first call, or the graph's rule in its first call)."""
    for d in decisions:
        if d.reason.startswith("excluded"):
            continue
        binding.plan.setdefault(d.group.name, RMM_PLAN if d.compress and d.codec == "rmm" else d.sub_token_size or 0)
        slot = slots[id(d.group)]
        if not d.compress or slot is None or d.codec == "rmm":
            continue
        slot.sub_token_size = d.sub_token_size
        known = estimate.config.init == "random" or estimate.has_data(d.group)
        if rules[id(d)] == "none" and known and not _initialised(slot):
            with real_tensors():
                slot.set_vector(estimate.initial(d.group, d.sub_token_size))


def _site_report(activation: fx.Node, d: Decision, baseline: SavedSet, after: SavedSet, encoded: list[str],
                 slot, config: VeloraConfig, copies_vector: bool) -> SiteReport:
    group = d.group
    val = tensor_val(activation)
    before_forms = baseline.which(group.forms)
    bytes_before = baseline.bytes_of(group.forms)
    bytes_after = after.bytes_of(group.forms) + after.bytes_of(encoded, inputs=False) if d.compress else bytes_before
    return SiteReport(
        name=group.name, consumers=[s.module_path for s in group.sites],
        op="/".join(sorted({s.forward_op for s in group.sites})),
        shape=tuple(int_hint(s) for s in val.shape), dtype=str(val.dtype).replace("torch.", ""),
        saved_by_baseline=bool(before_forms), saved_forms=before_forms, bytes_before=bytes_before,
        bytes_after=bytes_after, decision="compressed" if d.compress else "skipped", reason=d.reason,
        sub_token_size=d.sub_token_size, approximated=[s.module_path for s in d.sites],
        estimated_error=round(float(d.estimated_error), 6), codec=d.codec if d.compress else "velora",
        state=slot.name if slot is not None and d.compress and d.codec == "velora" else None,
        predicted_bytes_after=get_codec("velora", sub_token_size=d.sub_token_size, coeff_dtype=config.coeff_dtype)
        .saved_bytes(tuple(int_hint(s) for s in val.shape), val.dtype, copies_vector=copies_vector)
        if d.compress and d.codec == "velora" and all(isinstance(int_hint(s), int) for s in val.shape) else None,
        error_source=d.error_source if d.compress else None, update_share=d.update_share if d.compress else None,
        gradient_error=d.gradient_error if d.compress else None)


def _estimate_message(estimate: SiteEstimator) -> str:
    if estimate.failure:
        return f"estimated_error is structural (1 - 1/g): calibration failed ({estimate.failure})"
    if estimate.gradient_raised:
        return f"estimated_error from the activations alone: no calibration backward ({estimate.gradient_failure})"
    return ""


def _note_error_origin(d: Decision, estimate: SiteEstimator) -> None:
    """Where a compressed VeLoRA site's estimated_error comes from, and its update share."""
    if d.compress and d.codec == "velora" and d.sub_token_size:
        g = d.sub_token_size
        share, gradient = estimate.update_share(d.group, g), estimate.gradient_error(d.group, g)
        d.error_source = estimate.source(d.group, g)
        d.update_share = None if share is None else round(share, 6)
        d.gradient_error = None if gradient is None else round(gradient, 6)
