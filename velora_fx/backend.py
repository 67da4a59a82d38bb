"""The torch.compile backend: inductor, with the VeLoRA rewrite in its partition step.

Hook: inductor's ``custom_partitioner_fn`` receives the joint forward+backward graph after
inductor's own joint passes; we run the pipeline there and hand back the partition of the
rewritten graph, so decompositions, joint passes, partitioner and codegen all stay inductor's.

State: before AOTAutograd traces, the dynamo graph gets one extra input per weight matrix, its
state tensor (``state.py``), marked static like a module buffer.  The rewrite reads and updates
it with aten ops; ``binding.py`` appends the tensors of the weights each call passes.  So nothing
runs in Python per site per step, CUDA graphs work, and the generated code never depends on the
state's values.

Caches: AOTAutograd's cache, on a hit, returns compiled graphs without running the partition step,
so without our bookkeeping (slots, v, report).  The partitioner tells the cache that a training
graph is not cacheable before it has partitioned it (``_compat.NotCacheable``): the supported
bypass, which holds also when ``TORCHINDUCTOR_AUTOGRAD_CACHE=1`` forces the cache on.  Inductor's
FX graph cache keys on the partitioned graphs and still serves their generated code.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import warnings
import weakref
from typing import Any, Callable, Sequence

import torch.fx as fx
from torch import Tensor, nn

from . import _compat, distributed
from .binding import Lifted, StateBinder, lift_state, make_binding, primal_labels, trains
from .config import ConfigError, VeloraConfig
from .integrations import causal_lm
from .naming import ParamNames, find_compiled_root, unwrap_model
from .offload import OffloadStep, has_transfers, measured_overlap
from .passes.loss_head import pin_head_gradients, rewrite_loss_heads
from .passes import plan_cache
from .passes.graph_utils import tensor_leaves
from .passes.partition_probe import probe_partition
from .passes.pipeline import GraphBinding, JointContext, PipelineResult, run_pipeline
from .passes.recompute_guard import GuardResult, guard_joint, save_random_values
from .passes.step_peak import StepPeak, predict_step_peak
from .report import GraphReport, Report, SiteReport, exception_line
from .state import ModelState, StateError

__all__ = ["VeloraBackend", "backend", "default_backend"]

_SERIALS = itertools.count()




class VeloraBackend:
    """A dynamo backend: ``torch.compile(model, backend=VeloraBackend(config))``.

    Each model compiled through it owns its state (the v vectors), its plan and its reports;
    compiled free functions share one entry, "functions".  ``compiler="inductor"`` (default)
    generates code with inductor; ``compiler="eager"`` runs the same decompositions, joint passes,
    rewrite and partitioner but executes the graphs eagerly (fast to compile: tests, ``explain``).
    ``torch.compile``'s ``mode=`` / ``options=`` reach inductor (``mode="reduce-overhead"``: CUDA graphs);
    velora_fx's own options are this object's (``backend="velora"`` takes them in ``options=`` too).
    """

    def __init__(self, config: VeloraConfig | None = None, *, compiler: str = "inductor") -> None:
        if compiler not in ("inductor", "eager"):
            raise ConfigError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.config = config or VeloraConfig()
        self.compiler = compiler
        if self.config.uses("chunked_loss") and not self.config.keep_logits:
            causal_lm.install()  # transformers' causal LMs return no logits to it in training
        self._models: "weakref.WeakKeyDictionary[nn.Module, ModelState]" = weakref.WeakKeyDictionary()
        self._functions = ModelState("functions")
        self._graph_ids = itertools.count()
        self.serial = next(_SERIALS)  # names this backend's plans across ranks (created in the same order)
        self._model_ids = itertools.count()
        self._warned: set[str] = set()
        self._pending: dict[str, dict[str, Any]] = {}  # model label -> loaded entries no compiled weight holds yet

    # -- dynamo entry point ------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                 options: dict[str, Any] | None = None) -> Callable:
        inductor_options = _inductor_options(options)
        root = find_compiled_root()
        model = self.model_state(root)
        training = trains(example_inputs)
        if training and _hf_checkpointing(root):
            self.warn_once(f"velora_fx: {type(root).__name__} has transformers' gradient checkpointing on "
                           "(gradient_checkpointing_enable()): its checkpointed layers keep no activations for "
                           "velora_fx to compress, and dynamo may run them outside the compiled graphs (a graph "
                           "break); for recompute planned inside the graph use velora_fx.backend(memory_budget=...) "
                           "without it")
        heads, original = [], None
        if training and self.config.uses("chunked_loss"):
            rewritten = _compat.copy_dynamo_graph(gm)
            heads = rewrite_loss_heads(rewritten, self.config.loss_chunk_size)
            if any(h.rewritten for h in heads):
                original = self._reference(gm, list(example_inputs))
                gm = rewritten
        lifted = lift_state(gm, list(example_inputs), model) if training else None
        partitioner = _Partitioner(self, model, ParamNames(root), lifted, gm, training)
        partitioner.loss_heads, partitioner.original = heads, original
        graph = lifted.gm if lifted else gm
        inputs = lifted.example_inputs if lifted else list(example_inputs)
        try:
            compiled = self._compile(graph, inputs, partitioner, mode, inductor_options)
            outcome = partitioner.result
        finally:
            partitioner.release()
        if lifted is None:
            return compiled
        binder = StateBinder(compiled, self, lifted, outcome.state_sites if outcome else [],
                             outcome.calibration if outcome else None, outcome.report if outcome else None,
                             model.label, ParamNames(root))
        lifted.release()
        return binder

    def _compile(self, graph: fx.GraphModule, inputs: list[Any], partitioner: "_Partitioner", mode: str | None,
                 options: dict[str, Any]) -> Callable:
        if self.compiler == "inductor":
            patches = {**_mode_options(mode), **options, "custom_partitioner_fn": partitioner}
            inner = _compat.inner_compile_keeping_order(has_transfers)  # the offload plan's op order stands
            with _compat.count_autograd_cache_hits() as hits:
                compiled = _compat.compile_fx(graph, inputs, config_patches=patches, inner_compile=inner)
            if hits() and partitioner.training:
                # a cache served the graph without our partition step despite the bypass (a torch
                # that no longer asks the partitioner): never run a graph without its state
                self.warn_once("velora_fx: AOTAutograd's cache served a graph without the rewrite's bookkeeping; "
                               "compiling it again with caches disabled")
                with _compat.caches_disabled():
                    compiled = _compat.compile_fx(graph, inputs, config_patches=patches, inner_compile=inner)
            return compiled
        if mode or options:
            self.warn_once("velora_fx: compiler='eager' ignores torch.compile's mode= and options=")
        eager = _compat.aot_autograd(fw_compiler=_compat.boxed_nop_compiler, bw_compiler=_compat.boxed_nop_compiler,
                                     partition_fn=_compat.eager_partition_fn,
                                     decompositions=_compat.select_decomp_table())
        with _compat.custom_partitioner(partitioner):
            return eager(graph, inputs)

    def _reference(self, gm: fx.GraphModule, example_inputs: list[Any]) -> StepPeak | None:
        """``_baseline``, read from the plan cache when an earlier process measured this graph (the
        predicted peak of one graph is the same in every process: only its numbers are stored)."""
        key = plan_cache.key_of({"kind": "reference", "graph": plan_cache.graph_fingerprint(gm.graph, example_inputs),
                                 "device": _device_kind(example_inputs), "inductor": _compat.inductor_settings()}) \
            if plan_cache.enabled(self.config) else None
        found = plan_cache.load("reference", key) if key else None
        if found is not None:
            try:
                return StepPeak(*(int(found[k]) for k in ("forward", "backward", "saved")))
            except (KeyError, TypeError, ValueError) as exc:
                plan_cache.log.debug("velora_fx plan cache: ignoring a reference entry (%s: %s)",
                                     type(exc).__name__, exc)
        peak = self._baseline(gm, example_inputs)
        if key and peak is not None:
            plan_cache.store("reference", key, dataclasses.asdict(peak))
        return peak

    def _baseline(self, gm: fx.GraphModule, example_inputs: list[Any]) -> StepPeak | None:
        """What inductor's partition of dynamo's original graph saves and peaks at (what a rewrite
        before AOTAutograd is measured against); None if it cannot be traced."""
        found: list[StepPeak] = []

        def capture(joint, joint_inputs, **kwargs):
            saved = probe_partition(joint, joint_inputs, _compat.min_cut_rematerialization_partition, **kwargs)
            found.append(predict_step_peak(saved))
            return saved.fwd, saved.bwd

        trace = _compat.aot_autograd(fw_compiler=_compat.boxed_nop_compiler, bw_compiler=_compat.boxed_nop_compiler,
                                     partition_fn=_compat.eager_partition_fn,
                                     decompositions=_compat.select_decomp_table())
        try:
            with _compat.custom_partitioner(_CaptureOnly(capture)), _compat.autograd_cache_disabled():
                trace(_compat.copy_dynamo_graph(gm), example_inputs)
        except Exception as exc:  # noqa: BLE001 - only the report's "before" number depends on it
            self.warn_once(f"velora_fx: could not measure the unrewritten loss head's partition ({exc!r})")
            return None
        return found[0] if found else None

    # -- models, state and reports -------------------------------------------------------------
    def model_state(self, model: nn.Module | None) -> ModelState:
        """The state entry of a compiled model (created on first use); None: compiled functions."""
        if model is None:
            return self._functions
        model = unwrap_model(model)
        state = self._models.get(model)
        if state is None:
            state = ModelState(f"{type(model).__name__}#{next(self._model_ids)}")
            self._models[model] = state
        return state

    def _states(self, model: nn.Module | None) -> list[ModelState]:
        if model is not None:
            return [self.model_state(model)]
        states = list(self._models.values())
        return states + ([self._functions] if self._functions.reports or self._functions.slots else [])

    def _only(self, model: nn.Module | None, verb: str) -> ModelState:
        states = self._states(model)
        if len(states) == 1:
            return states[0]
        if not states:
            raise ValueError(f"velora_fx: no model compiled with this backend yet: pass {verb}(..., model=model)")
        raise ValueError(f"velora_fx: this backend compiled {len(states)} models: pass {verb}(..., model=model)")

    def state_dict(self, model: nn.Module | None = None) -> dict[str, Any]:
        """The v of every compressed site of ``model`` (or of the only model compiled), by site key."""
        states = self._states(model)
        sites = self._only(model, "state_dict").state_dict() if states else {}
        return {"config": self.config.to_dict(), "sites": sites}

    def load_state_dict(self, state: dict[str, Any], model: nn.Module | None = None) -> None:
        """Load vectors saved by ``state_dict``, all or nothing: every unknown site, wrong size,
        other model width or bad vector (not finite, not a unit vector) is named at once and
        nothing is applied.  Before the first compile, pass ``model=`` so keys can be checked."""
        sites = _state_sites(state)
        config = state.get("config")
        if config is not None and config.get("init") != self.config.init:
            warnings.warn(f"velora_fx: loading state saved with init={config.get('init')!r} "
                          f"into a backend with init={self.config.init!r}", stacklevel=2)
        target = self._only(model, "load_state_dict")
        names = ParamNames(unwrap_model(model))

        def resolve(name: str):
            found = names.resolve(name)
            if found is None:
                return None
            param, orientation = found
            return param, orientation, int(param.shape[-1] if orientation == 0 else param.shape[-2])

        live = {s.name for s in target.live_slots()}
        # FSDP2: between steps a module holds its sharded DTensor parameter, while compiled graphs
        # see the all-gathered one, a different object: such entries wait, by name, until a
        # compiled graph binds that weight (checked now, applied then)
        deferred = {n: e for n, e in sites.items()
                    if n not in live and distributed.is_sharded((resolve(n) or (None,))[0])}
        checked = target.check_entries({n: e for n, e in sites.items() if n not in deferred}, resolve)
        ModelState("scratch").check_entries(deferred, resolve)
        target.apply_entries(checked)
        if deferred:
            self._pending.setdefault(target.label, {}).update(deferred)

    def take_pending(self, model: ModelState, slot) -> None:
        """Load an entry ``load_state_dict`` deferred, once a compiled graph binds its weight."""
        entry = self._pending.get(model.label, {}).pop(slot.name, None)
        if entry is not None:
            model.load_state_dict({slot.name: entry}, lambda name: None)

    def state_tensors(self, model: nn.Module | None = None) -> list[Tensor]:
        """The device tensors holding the state (graph inputs that live as long as the model,
        like its buffers: memory accounting should count them with the weights)."""
        return [t for s in self._states(model) for ref, t in s.tensors.values() if ref() is not None]

    def report(self, model: nn.Module | None = None) -> Report:
        """Per compiled graph (with its id), for ``model`` or for every model compiled."""
        graphs = [g for s in self._states(model) for g in s.reports]
        for g in graphs:
            if g.offload is not None:
                g.offload["measured"] = measured_overlap(g.offload)  # the latest step's transfers
        return Report(sorted(graphs, key=lambda g: g.graph_id))

    def uuid(self, model: ModelState | None = None) -> str:
        """Stable across processes: the package source, the options and the model's plan so far."""
        payload = json.dumps({k: v for k, v in self.config.to_dict().items() if k != "plan_cache"}, sort_keys=True)
        plan = json.dumps(sorted((model.plan if model else {}).items()))
        digest = hashlib.sha256((payload + plan).encode()).hexdigest()[:16]
        return f"velora_fx:{plan_cache.source_hash()}:{digest}"

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    # -- the partition step ------------------------------------------------------------------
    def partition(self, partitioner: "_Partitioner", gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        graph_id = next(self._graph_ids)
        model, frame = partitioner.model, partitioner.frame
        num_fwd_outputs = kwargs.pop("num_fwd_outputs")
        plain = lambda: _compat.min_cut_rematerialization_partition(  # noqa: E731
            gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)
        binding = partitioner.binding(joint_inputs)
        if binding is None:
            why = ("no trainable weight matrix: nothing to compress" if partitioner.lifted is None else
                   "AOTAutograd reshaped the inputs (no one-to-one state binding): compiled as plain inductor")
            report = GraphReport(graph_id, "unchanged", why, model=model.label, frame=frame)
            for h in partitioner.loss_heads:
                unmeasured = " (bytes not measured: no weight to bind)" if h.rewritten else ""
                report.sites.append(_head_row(h, h.logits_bytes, 0 if h.rewritten else h.logits_bytes,
                                              h.reason + unmeasured))
            model.reports.append(report)
            return plain()
        head_grads = pin_head_gradients(gm, partitioner.param_indices) \
            if any(h.rewritten for h in partitioner.loss_heads) else []
        ctx = JointContext(gm, joint_inputs, num_fwd_outputs, partitioner.param_indices,
                           _compat.min_cut_rematerialization_partition, kwargs, partitioner.labels)
        graph_key = f"{self.serial}/{graph_id}"  # the same on every rank: backends and graphs come in order
        distributed.adopt_rank0_plan(model, graph_key)  # under torch.distributed: rank 0 plans, see distributed.py
        try:
            held = _held_by_other_graphs(model, frame, partitioner.module_paths()) \
                if isinstance(self.config.memory_budget, int) else 0  # only a budget in bytes is shared
            peaks: dict[str, Any] = {}
            original = partitioner.original
            offload = OffloadStep(self.config, joint_inputs, num_fwd_outputs)
            context = {"device": _device_kind(joint_inputs), "held": held, "inductor": _compat.inductor_settings(),
                       "reference": dataclasses.asdict(original) if original else None} \
                if plan_cache.enabled(self.config) and not offload.active else None  # offload: planned each time
            if self.compiler == "eager":
                save_random_values(gm)  # inductor's random prims regenerate other numbers when run eagerly
            guard = guard_joint(gm, joint_inputs, ctx.partition, num_fwd_outputs, kwargs, context is not None) \
                if self.config.memory_budget is not None else GuardResult()
            result = run_pipeline(ctx, self.config, binding, graph_id,
                                  _budget_target(self.config, original, held, peaks, head_grads, offload), context,
                                  offload.kept)
            offloaded = offload.apply(result.saved, graph_key) if offload.active else None
            if self.config.offload and not offload.active:
                self.warn_once(f"velora_fx: offload skipped: {offload.reason}")
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - never crash a compile: fall back to plain inductor
            if os.environ.get("VELORA_FX_STRICT") == "1":  # tests: surface pass bugs instead of falling back
                raise
            reason = exception_line(exc)
            self.warn_once(f"velora_fx: a graph compiled without the rewrite, as plain inductor ({reason})")
            model.reports.append(GraphReport(graph_id, "fallback", reason, model=model.label, frame=frame))
            return plain()
        finally:  # on every path, so no rank waits for a plan rank 0 never sends
            distributed.share_plan(model, graph_key)
        original = partitioner.original
        _add_loss_heads(result, partitioner.loss_heads, original.saved if original else None, head_grads)
        if not result.report.sites and not result.report.message:
            result.report.message = f"{NO_SITE} ({', '.join(self.config.codecs)})"
        if offloaded is not None:
            result.report.offload = offload.report(offloaded, graph_key)
            result.report.saved_bytes_after -= offloaded.bytes
        result.report.message = "; ".join(m for m in (result.report.message, offload.message(
            offloaded, result.saved.activation_bytes)) if m)
        before, after = original or peaks.get("reference"), predict_step_peak(result.saved)
        result.report.predicted_peak = {"before": before.to_dict() if before else None, "after": after.to_dict(),
                                        "target": peaks.get("want")}
        if peaks.get("want") is not None and after.peak > peaks["want"]:
            result.report.message = "; ".join(m for m in (result.report.message, (
                f"predicted step peak {after.peak} bytes is above the {peaks['want']} asked: what stays above the "
                f"saved set (gradients, the last transients) is {after.peak - after.saved} bytes")) if m)
        result.report.model, result.report.frame = model.label, frame
        result.report.message = "; ".join(m for m in (result.report.message, guard.message()) if m)
        if isinstance(self.config.memory_budget, int):
            result.report.message = "; ".join(m for m in (
                f"memory_budget: {self.config.memory_budget} bytes for the model, of which its other graphs save "
                f"{held}", result.report.message) if m)
        if not result.report.sites and not self.config.offload:  # offload's own plan is its report
            self.warn_once(f"velora_fx: {model.label} has no site any codec of {list(self.config.codecs)} "
                           "can compress")
        model.reports.append(result.report)
        _warn_unmatched(self, model)
        partitioner.result = result
        return result.saved.fwd, result.saved.bwd


def _state_sites(state: Any) -> dict[str, Any]:
    """The ``sites`` of a state from ``state_dict()``, or a ``StateError`` saying what is wrong with it."""
    expected = "the dict backend.state_dict() returns ({'config': ..., 'sites': {site: entry}})"
    if not isinstance(state, dict):
        raise StateError(f"velora_fx: load_state_dict takes {expected}, got {type(state).__name__}")
    unknown = sorted(map(str, set(state) - {"config", "sites"}))
    if unknown or "sites" not in state:
        what = f"unknown key(s) {unknown}" if unknown else "no 'sites'"
        raise StateError(f"velora_fx: load_state_dict takes {expected}; this one has {what}")
    if state.get("config") is not None and not isinstance(state["config"], dict):
        raise StateError(f"velora_fx: the state's 'config' must be a dict, got {type(state['config']).__name__}")
    if not isinstance(state["sites"], dict):
        raise StateError(f"velora_fx: the state's 'sites' must be a dict of site -> entry, got "
                         f"{type(state['sites']).__name__}")
    return state["sites"]


def _budget_target(config: VeloraConfig, original: StepPeak | None, held_elsewhere: int = 0,
                   seen: dict[str, Any] | None = None, keep: Sequence[str] = (), offload: OffloadStep | None = None):
    """``memory_budget`` as the saved bytes one graph may keep, from its baseline partition.

    The budget is on the step's activation peak (``passes/step_peak.py``), not on saved bytes: a
    fraction of the peak of the graph as dynamo gave it (before a loss-head rewrite, ``original``),
    or bytes for the whole step of the model, less ``held_elsewhere`` (what its other graphs save).
    The transients above the saved set (the baseline's predicted peak less its saved bytes) are
    taken as they are, so the graph may save the target peak less those.  ``seen`` receives the
    reference's predicted peak and the peak asked for (for the report).  The
    target is never below the bytes of ``keep`` (the loss head's gradients): asking for less drives
    the knapsack to 0, where inductor recomputes everything, the head's whole chunk loop included.
    ``offload`` is told the target: it measures each partition the chooser weighs by what stays on
    the device (``OffloadStep.kept``)."""
    if config.memory_budget is None:
        return None
    budget = config.memory_budget

    def target(baseline) -> int:
        if baseline.known_peak is None:
            baseline.known_peak = predict_step_peak(baseline)
        base = baseline.known_peak
        reference = original or base
        want = int(budget * reference.peak if isinstance(budget, float) else budget - held_elsewhere)
        goal = max(baseline.bytes_of(list(keep), inputs=False), want - (base.peak - base.saved))
        if seen is not None:
            seen.update(reference=reference, want=want, goal=goal)
        if offload is not None:
            offload.goal = goal
        return goal
    return target


def _device_kind(values: Sequence[Any]) -> str:
    """The device a graph runs on, as the plan cache keys it (the first tensor among ``values``)."""
    first = next(tensor_leaves(values), None)
    return _compat.device_name(first.device) if first is not None else ""


def _held_by_other_graphs(model: ModelState, frame: str, modules: set[str]) -> int:
    """Saved bytes of the model's other counted graphs (``Report.current``): a recompile of this
    graph (same frame, sites in its modules) is replaced by it, not added to it."""
    total = 0
    for g in Report(model.reports).current:
        consumers = {c for s in g.sites for c in s.consumers}
        if not (frame and g.frame == frame and consumers & modules):
            total += g.saved_bytes_after
    return total


def _add_loss_heads(result, heads: list, original_bytes: int | None, head_grads: list[str]) -> None:
    """Report rows for the loss heads rewritten before AOTAutograd, measured on the partitions:
    what the rewritten graph's baseline saves less than the original's is what the head freed."""
    report = result.report
    rewritten = [h for h in heads if h.rewritten]
    if rewritten and original_bytes is not None:
        freed = original_bytes - report.saved_bytes_before
        report.saved_bytes_before = original_bytes
    else:
        freed = None
    kept = result.saved.bytes_of(head_grads, inputs=False)
    measured = rewritten[0] if rewritten else None  # the partitions measure all heads together
    for head in heads:
        reason, before, after = head.reason, head.logits_bytes, head.logits_bytes
        if head is measured:
            after = kept
            before = freed + kept if freed is not None else head.logits_bytes
        elif head.rewritten:
            before = after = 0
            reason += f" (bytes counted with {measured.name})"
        report.sites.append(_head_row(head, before, after, reason))


# a trained graph whose site finders found nothing (the codecs in use follow)
NO_SITE = "no site in this graph for the codecs in use"


def _head_row(head, before: int, after: int, reason: str) -> SiteReport:
    return SiteReport(name=head.name, consumers=[], op="linear+cross_entropy", shape=(head.rows, head.vocab),
                      dtype="", saved_by_baseline=head.rewritten, saved_forms=[], bytes_before=before,
                      bytes_after=after, decision="compressed" if head.rewritten else "skipped", reason=reason,
                      codec="chunked_loss")


class _CaptureOnly(_compat.CustomPartitionerFn):
    """A partitioner hook for measuring only (never part of a cache key that is looked up)."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, gm, joint_inputs, **kwargs):
        return self.fn(gm, joint_inputs, **kwargs)

    def uuid(self) -> str:
        return f"velora_fx:capture:{id(self)}"


def _warn_unmatched(backend: VeloraBackend, model: ModelState) -> None:
    """A pattern that matches no site of any graph of the model so far is most likely a typo or a
    path from another naming scheme."""
    config = backend.config
    paths = [c for r in model.reports for s in r.sites for c in s.consumers]
    if not paths:
        return
    for option in ("include", "exclude"):
        for pattern in getattr(config, option):
            if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
                backend.warn_once(f"velora_fx: {option} pattern {pattern!r} matches no site of {model.label} "
                                  f"(site names are named_modules() paths, e.g. {paths[0]!r})")


def _mode_options(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    return dict(_compat.list_mode_options(mode))


class _Partitioner(_compat.CustomPartitionerFn):
    """Binds one dynamo graph (its weights, state inputs and names) to the backend's partition
    step, for one compile.  Inductor keeps this object (in its config patch and cache keys) long
    after: it holds weights only weakly and drops everything but its uuid once the compile is done;
    it pickles to its uuid only.  Before it has partitioned a training graph it tells inductor's
    caches that the graph is not cacheable (see the module docstring)."""

    def __init__(self, backend: VeloraBackend, model: ModelState, names: ParamNames, lifted: Lifted | None,
                 gm: fx.GraphModule, training: bool) -> None:
        self.backend, self.model, self.names, self.lifted = backend, model, names, lifted
        self.training = training
        self.loss_heads: list = []
        self.original: StepPeak | None = None  # the graph before the loss-head rewrite (when there was one)
        self.result: PipelineResult | None = None
        self._params = list(lifted.params) if lifted else []
        labels = primal_labels(gm)
        self.labels = labels + [None] * (len(self._params) - len(labels))
        self.frame = _compat.frame_id(gm)
        self._uuid = backend.uuid(model)
        self.partitioned = False

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        self.partitioned = True
        return self.backend.partition(self, gm, joint_inputs, **kwargs)

    @property
    def params(self) -> list[Tensor | None]:
        """The real weight of each input (None: not a parameter)."""
        return [ref() if ref is not None else None for ref in self._params]

    @property
    def param_indices(self) -> list[int]:
        return [i for i, p in enumerate(self._params) if p is not None]

    def module_paths(self) -> set[str]:
        """The module paths of this graph's weights (in the compiled model)."""
        return {self.names.module_of(p, None)[0] for p in self.params if p is not None}

    def binding(self, joint_inputs: Sequence[Any]) -> GraphBinding | None:
        """None when the joint graph's primals are not the lifted inputs one to one (AOTAutograd
        deduplicated or flattened them) or there is no state to bind."""
        primals = joint_inputs[0] if joint_inputs and isinstance(joint_inputs[0], (list, tuple)) else None
        if self.lifted is None or primals is None or len(primals) != len(self._params):
            return None
        return make_binding(self.model, self.names, self.params, self.lifted.state_index, self.lifted.real_inputs,
                            self.labels, on_slot=lambda slot: self.backend.take_pending(self.model, slot),
                            sets_v_at_call=True)

    def release(self) -> None:
        """After the compile: keep only the uuid (inductor may keep this object for good)."""
        self.backend = self.model = self.names = self.lifted = self.result = None
        self.loss_heads, self._params, self.labels = [], [], []

    def uuid(self) -> str:
        if self.training and not self.partitioned:
            raise _compat.NotCacheable("velora_fx: a training graph is cacheable only after its partition step "
                                       "(the rewrite's state and report are set there)")
        return self._uuid

    def __reduce__(self):
        return (_cache_key_only, (self.uuid(),))

    def __deepcopy__(self, memo):
        return self


def _cache_key_only(uuid: str) -> str:
    """What a pickled partitioner turns back into: its key (it is pickled for cache keys only)."""
    return uuid


def backend(config: VeloraConfig | None = None, /, **options: Any) -> VeloraBackend:
    """``torch.compile(model, backend=velora_fx.backend(mode="auto", ...))``."""
    compiler = options.pop("compiler", "inductor")
    if config is not None and options:
        raise TypeError("pass either a VeloraConfig or keyword options, not both")
    return VeloraBackend(config or VeloraConfig.from_options(**options), compiler=compiler)


_SHARED: dict[str, VeloraBackend] = {}
_BACKEND_OPTIONS = {f.name for f in dataclasses.fields(VeloraConfig)} | {"compiler"}


def default_backend(**options: Any) -> VeloraBackend:
    """The shared backend behind ``backend="velora"`` (one per set of options given through
    ``torch.compile(..., options={...})``): ``velora_fx.default_backend().report()`` shows what it
    did, ``default_backend(mode="max_memory")`` what the one with those options did.  Each model
    compiled through it has its own state and reports."""
    compiler = options.pop("compiler", "inductor")
    config = VeloraConfig.from_options(**options)
    key = json.dumps([config.to_dict(), compiler], sort_keys=True, default=str)
    if key not in _SHARED:
        _SHARED[key] = VeloraBackend(config, compiler=compiler)
    return _SHARED[key]


def velora_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, mode: str | None = None,
                   options: dict[str, Any] | None = None) -> Callable:
    """Named-backend entry point: ``torch.compile(model, backend="velora", mode=..., options={...})``;
    ``options`` may mix velora_fx's options (``mode`` is spelt ``"mode"`` there too, it picks the
    velora mode) with inductor's config options."""
    options = dict(options or {})
    ours = {k: options.pop(k) for k in list(options) if k in _BACKEND_OPTIONS}
    return default_backend(**ours)(gm, example_inputs, mode=mode, options=options)


def tracing_config() -> VeloraConfig | None:
    """The config of the velora_fx backend dynamo is tracing for right now (a backend object or
    ``backend="velora"`` with its ``options``), else None.  Trace time only (see
    ``integrations/causal_lm.py``)."""
    for fn in _compat.tracing_backends():
        if isinstance(fn, VeloraBackend):
            return fn.config
        if getattr(fn, "compiler_fn", None) is velora_backend:  # torch.compile's wrapper of the named backend
            options = dict((getattr(fn, "kwargs", None) or {}).get("options") or {})
            try:
                return default_backend(**{k: v for k, v in options.items() if k in _BACKEND_OPTIONS}).config
            except (TypeError, ConfigError):  # the backend call will raise it with context
                return None
    return None


def _hf_checkpointing(root: Any) -> bool:
    """Whether ``root`` is a transformers model with its gradient checkpointing on.  Newer transformers
    name it ``is_activation_checkpointing`` and warn (FutureWarning) on the old property, so the old
    one is read only where the new one does not exist."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(root), name, None), property):
            return getattr(root, name) is True
    return False


def _inductor_options(options: dict[str, Any] | None) -> dict[str, Any]:
    """``torch.compile(options=...)`` for a backend object: inductor's config options only."""
    options = dict(options or {})
    ours = sorted(k for k in options if k in _BACKEND_OPTIONS)
    if ours:
        raise ConfigError(f"torch.compile(options=...) got velora_fx option(s) {ours} for a backend object that "
                          f"already has its options: pass them to velora_fx.backend({', '.join(ours)}=...), or use "
                          "backend=\"velora\" with options={...}")
    unknown = sorted(k for k in options if not _compat.is_inductor_option(k))
    if unknown:
        raise ConfigError(f"torch.compile(options=...) got {unknown}: neither inductor config options nor "
                          f"velora_fx options ({sorted(_BACKEND_OPTIONS)})")
    return options
