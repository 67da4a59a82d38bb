"""The torch.compile backend: inductor, with the VeLoRA rewrite in its partition step.

Hook: inductor's ``custom_partitioner_fn`` receives the joint forward+backward graph after
inductor's own joint passes; we run the pipeline there and hand back the partition of the
rewritten graph, so decompositions, joint passes, partitioner and codegen all stay inductor's.

State: before AOTAutograd traces, the dynamo graph gets one extra input per weight matrix, its
state tensor (``state.py``), marked static like a module buffer.  The rewrite reads and updates
it with aten ops; a thin wrapper appends the tensors to every call.  So nothing runs in Python
per site per step, CUDA graphs work, and the generated code never depends on the state's values.
"""
from __future__ import annotations

import fnmatch
import functools
import hashlib
import itertools
import json
import operator
import os
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import _compat, distributed
from .config import ConfigError, VeloraConfig
from .codecs.velora import random_vector
from .naming import ParamNames, find_compiled_root, module_path_from_source
from .passes.budget import target_bytes
from .passes.loss_head import pin_head_gradients, rewrite_loss_heads
from .passes.partition_probe import probe_partition
from .passes.pipeline import GraphBinding, JointContext, run_pipeline
from .passes.sites import Site
from .report import GraphReport, Report, SiteReport
from .state import ModelState, natural_orientation, random_seed, slot_name

__all__ = ["VeloraBackend", "backend", "default_backend"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SERIALS = itertools.count()


@functools.lru_cache(maxsize=1)
def _source_hash() -> str:
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(_PACKAGE_DIR)
                   for f in names if f.endswith(".py"))
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as fh:
            digest.update(fh.read())
    return digest.hexdigest()[:16]


class VeloraBackend:
    """A dynamo backend: ``torch.compile(model, backend=VeloraBackend(config))``.

    Each model compiled through it owns its state (the v vectors), its plan and its reports;
    compiled free functions share one entry, "functions".  ``compiler="inductor"`` (default)
    generates code with inductor; ``compiler="eager"`` runs the same decompositions, joint passes,
    rewrite and partitioner but executes the graphs eagerly (fast to compile: tests, ``explain``).
    ``torch.compile``'s ``mode=`` / ``options=`` reach inductor (``mode="reduce-overhead"``: CUDA graphs).
    """

    def __init__(self, config: VeloraConfig | None = None, *, compiler: str = "inductor") -> None:
        if compiler not in ("inductor", "eager"):
            raise ConfigError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.config = config or VeloraConfig()
        self.compiler = compiler
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
        root = find_compiled_root()
        model = self.model_state(root)
        training = _trains(example_inputs)
        heads, original_bytes = [], None
        if training and self.config.uses("chunked_loss"):
            rewritten = _compat.copy_dynamo_graph(gm)
            heads = rewrite_loss_heads(rewritten, self.config.loss_chunk_size)
            if any(h.rewritten for h in heads):
                original_bytes = self._baseline_bytes(gm, list(example_inputs))
                gm = rewritten
        lifted = _lift_state(gm, list(example_inputs), model, root) if training else None
        partitioner = _Partitioner(self, model, ParamNames(root), lifted, gm)
        partitioner.loss_heads, partitioner.original_bytes = heads, original_bytes
        graph = lifted.gm if lifted else gm
        inputs = lifted.example_inputs if lifted else list(example_inputs)
        if self.compiler == "inductor":
            patches = {**_mode_options(mode), **(options or {}), "custom_partitioner_fn": partitioner}
            # AOTAutograd's cache would skip the partition step (and this pass) on a hit; inductor's
            # FX graph cache, which keys on the partitioned graphs, still serves the generated code
            with _compat.autograd_cache_disabled():
                compiled = _compat.compile_fx(graph, inputs, config_patches=patches)
        else:
            if mode or options:
                self.warn_once("velora_fx: compiler='eager' ignores torch.compile's mode= and options=")
            eager = _compat.aot_autograd(fw_compiler=_compat.boxed_nop_compiler, bw_compiler=_compat.boxed_nop_compiler,
                                         partition_fn=_compat.eager_partition_fn,
                                         decompositions=_compat.select_decomp_table())
            with _compat.custom_partitioner(partitioner), _compat.autograd_cache_disabled():
                compiled = eager(graph, inputs)
        return _StateCall(compiled, self, model, lifted) if lifted else compiled

    def _baseline_bytes(self, gm: fx.GraphModule, example_inputs: list[Any]) -> int | None:
        """Activation bytes inductor's partition of dynamo's original graph saves (what a rewrite
        before AOTAutograd is measured against); None if it cannot be traced."""
        found: list[int] = []

        def capture(joint, joint_inputs, **kwargs):
            saved = probe_partition(joint, joint_inputs, _compat.min_cut_rematerialization_partition, **kwargs)
            found.append(saved.activation_bytes)
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
        model = _compat.unwrap_compiled(model)
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
        """Load vectors saved by ``state_dict``; every unknown site or wrong size is named at once.
        Before the first compile, pass ``model=`` so keys can be checked against it."""
        if "config" in state and state["config"].get("init") != self.config.init:
            warnings.warn(f"velora_fx: loading state saved with init={state['config'].get('init')!r} "
                          f"into a backend with init={self.config.init!r}", stacklevel=2)
        target = self._only(model, "load_state_dict")
        names = ParamNames(_compat.unwrap_compiled(model))

        def resolve(name: str):
            found = names.resolve(name)
            if found is None:
                return None
            param, orientation = found
            return param, orientation, int(param.shape[-1] if orientation == 0 else param.shape[-2])

        sites = dict(state.get("sites", {}))
        live = {s.name for s in target.live_slots()}
        # FSDP2: between steps a module holds its sharded DTensor parameter, while compiled graphs
        # see the all-gathered one, a different object: such entries wait, by name, until a
        # compiled graph binds that weight (checked now on a scratch state)
        deferred = {n: e for n, e in sites.items()
                    if n not in live and distributed.is_sharded((resolve(n) or (None,))[0])}
        ModelState("scratch").load_state_dict(deferred, resolve)
        target.load_state_dict({n: e for n, e in sites.items() if n not in deferred}, resolve)
        if deferred:
            self._pending.setdefault(target.label, {}).update(deferred)

    def _take_pending(self, model: ModelState, slot) -> None:
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
        return Report(sorted(graphs, key=lambda g: g.graph_id))

    def uuid(self, model: ModelState | None = None) -> str:
        """Stable across processes: the package source, the options and the model's plan so far."""
        payload = json.dumps(self.config.to_dict(), sort_keys=True)
        plan = json.dumps(sorted((model.plan if model else {}).items()))
        digest = hashlib.sha256((payload + plan).encode()).hexdigest()[:16]
        return f"velora_fx:{_source_hash()}:{digest}"

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
            model.reports.append(GraphReport(graph_id, "unchanged", why, model=model.label, frame=frame))
            return plain()
        head_grads = pin_head_gradients(gm, partitioner.param_indices) \
            if any(h.rewritten for h in partitioner.loss_heads) else []
        ctx = JointContext(gm, joint_inputs, num_fwd_outputs, partitioner.param_indices,
                           _compat.min_cut_rematerialization_partition, kwargs, partitioner.labels)
        graph_key = f"{self.serial}/{graph_id}"  # the same on every rank: backends and graphs come in order
        distributed.adopt_rank0_plan(model, graph_key)  # under torch.distributed: rank 0 plans, see distributed.py
        try:
            result = run_pipeline(ctx, self.config, binding, graph_id, _budget_target(self.config, partitioner.original_bytes))
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - never crash a compile: fall back to plain inductor
            if os.environ.get("VELORA_FX_STRICT") == "1":  # tests: surface pass bugs instead of falling back
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.warn_once(f"velora_fx: a graph compiled without the rewrite, as plain inductor ({reason})")
            model.reports.append(GraphReport(graph_id, "fallback", reason, model=model.label, frame=frame))
            return plain()
        finally:  # on every path, so no rank waits for a plan rank 0 never sends
            distributed.share_plan(model, graph_key)
        _add_loss_heads(result, partitioner.loss_heads, partitioner.original_bytes, head_grads)
        result.report.model, result.report.frame = model.label, frame
        if not result.report.sites:
            self.warn_once(f"velora_fx: {model.label} has no site any codec of {list(self.config.codecs)} "
                           "can compress")
        model.reports.append(result.report)
        _warn_unmatched(self, model)
        return result.saved.fwd, result.saved.bwd


def _budget_target(config: VeloraConfig, original_bytes: int | None):
    """``memory_budget`` in bytes, as a function of the baseline partition's saved bytes (a
    fraction counts from the graph before the loss-head rewrite, when there was one)."""
    if config.memory_budget is None:
        return None
    return lambda baseline: target_bytes(config.memory_budget, original_bytes if original_bytes is not None else baseline)


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
        report.sites.append(SiteReport(
            name=head.name, consumers=[], op="linear+cross_entropy", shape=(head.rows, head.vocab),
            dtype="", saved_by_baseline=head.rewritten, saved_forms=[], bytes_before=before, bytes_after=after,
            decision="compressed" if head.rewritten else "skipped", reason=reason, codec="chunked_loss"))


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


@dataclass
class _Lifted:
    """The dynamo graph with one state input per weight, and what to pass for them."""

    gm: fx.GraphModule
    example_inputs: list[Any]
    state_tensors: list[Tensor]
    state_index: dict[int, int]          # input index of a weight -> input index of its state
    real_inputs: list[Any] | None        # real values of every input (None: some are fake, no calibration)
    inputs: list[Any]                    # the inputs with the real weights (for binding and names)


def _trains(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in example_inputs)


def _has_state(x: Any) -> bool:
    return (isinstance(x, nn.Parameter) and x.requires_grad and x.dim() >= 2 and x.is_floating_point()
            and not _compat.is_fake(x))


def _lift_state(gm: fx.GraphModule, example_inputs: list[Any], model: ModelState,
                root: nn.Module | None = None) -> _Lifted | None:
    real = _real_weights(gm, example_inputs, root)
    weights = [i for i, x in enumerate(real) if _has_state(x)]
    if not weights:
        return None
    tensors = [model.tensor_for(real[i]) for i in weights]
    new_gm = _compat.copy_dynamo_graph(gm)
    fake_mode = _compat.fake_mode_of(list(example_inputs))
    fakes = [_compat.static_fake(fake_mode, t) for t in tensors]
    _compat.append_static_inputs(new_gm, [f"velora_state_{i}" for i in weights], fakes)
    n = len(example_inputs)
    calibration = None if any(_compat.is_fake(x) for x in real) else real + tensors
    return _Lifted(new_gm, example_inputs + fakes, tensors, {w: n + k for k, w in enumerate(weights)},
                   calibration, real + tensors)


def _real_weights(gm: fx.GraphModule, example_inputs: list[Any], root: nn.Module | None) -> list[Any]:
    """The inputs, with each fake one that is a parameter of ``root`` (by its dynamo source)
    replaced by that parameter.  DDPOptimizer compiles its bucket subgraphs on fake copies of
    everything, the weights included; state belongs to the real weight."""
    if root is None or not any(_compat.is_fake(x) for x in example_inputs):
        return list(example_inputs)
    params = dict(root.named_parameters(remove_duplicate=False))
    out = list(example_inputs)
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        source = _compat.dynamo_source_name(node) if i < len(out) and _compat.is_fake(out[i]) else None
        param = params.get(module_path_from_source(source)) if source else None
        if param is not None and param.shape == out[i].shape and param.dtype == out[i].dtype:
            out[i] = param
    return out


class _StateCall:
    """The compiled graph, called with the state tensors of the weights each call passes.

    Dynamo reuses a compiled graph for every module whose code and guards match: the frames of a
    stack's identical layers after a graph break (FSDP2 breaks at every ``fully_shard`` module; a
    graph break in a loop; per-layer ``compile``), so a call's weights need not be those it was
    compiled with.  State belongs to the weight: other weights get their own state tensors and
    slots, copied from the compiled weights' slots (same sub-token size; v: ``first_batch`` starts
    from the compiled module's v, ``random`` from its own seed, ``batch`` / ``ema`` from its own
    batch in graph).  Under torch.distributed, the first call with a set of weights takes rank 0's
    state before and after it runs (eager broadcasts, outside any compile: a v set at compile time
    from each rank's own batch, and one the graph sets from it, become rank 0's).  Per call: one
    dict lookup by the weights' ids (an entry leaves when a weight dies)."""

    def __init__(self, compiled: Callable, backend: VeloraBackend, model: ModelState, lifted: _Lifted) -> None:
        self.compiled, self.backend, self.model = compiled, backend, model
        self.positions = sorted(lifted.state_index)
        self.weights = operator.itemgetter(*self.positions) if len(self.positions) > 1 else \
            (lambda args, i=self.positions[0]: (args[i],))
        weights = self.weights(lifted.inputs)
        self.origin = [weakref.ref(w) for w in weights]
        self.compiled_state = lifted.state_tensors
        self.bound: dict[tuple[int, ...], list[Tensor]] = {}
        self.unsynced: set[tuple[int, ...]] = set()
        self._refs: list[weakref.ref] = []
        self._remember(weights, lifted.state_tensors)

    def __call__(self, *args):
        key = tuple(map(id, self.weights(args)))
        state = self.bound.get(key)
        if state is None:
            if any(_compat.is_fake(w) for w in self.weights(args)):  # DDPOptimizer's fake first call
                return self.compiled(*args, *self.compiled_state)
            state = self._bind(args)
        if key not in self.unsynced:
            return self.compiled(*args, *state)
        # the first call with these weights under torch.distributed: rank 0's v before the call
        # uses it (set at compile time or loaded), and after it (v the graph set from this batch)
        self.unsynced.discard(key)
        distributed.share_tensors(state)
        out = self.compiled(*args, *state)
        distributed.share_tensors(state)
        return out

    def _remember(self, weights: Sequence[Tensor], state: list[Tensor]) -> None:
        key = tuple(map(id, weights))
        forget = lambda _ref, bound=self.bound: bound.pop(key, None)  # noqa: E731 - ids are reused
        self.bound[key] = state
        self._refs += [weakref.ref(w, forget) for w in weights]
        if distributed.active():
            self.unsynced.add(key)

    def _bind(self, args: Sequence[Any]) -> list[Tensor]:
        root = find_compiled_root()  # the model this call runs under
        model, names = self.backend.model_state(root), ParamNames(root)
        init = self.backend.config.init
        tensors = []
        for weight, origin in zip(self.weights(args), (r() for r in self.origin)):
            state = model.tensor_for(weight)
            tensors.append(state)
            if origin is None or origin is weight:
                continue
            path, leaf, module = names.module_of(weight, None)
            for src in [s for s in list(self.model.slots.values()) if s.param_ref() is origin]:
                name = slot_name(path, leaf or "weight", src.orientation, natural_orientation(module)) \
                    if path or leaf else src.name
                slot = model.register_slot(weight, src.orientation, name, src.features)
                self.backend._take_pending(model, slot)
                g, o = src.sub_token_size, src.orientation
                if g is None:
                    continue
                if slot.sub_token_size not in (None, g):
                    raise ValueError(f"velora_fx: {slot.name!r} holds a v of size {slot.sub_token_size}, but the "
                                     f"graph dynamo reuses for it was compiled for {src.name!r} with size {g}")
                slot.sub_token_size = g
                with torch.no_grad():
                    if state[o, 0] > 0:
                        continue  # loaded
                    if init == "random":
                        state[o, 1:1 + g].copy_(random_vector(g, random_seed(slot.name)).to(state.device))
                        state[o, 0] = 1.0
                    elif init == "first_batch":
                        state[o].copy_(src.tensor[o])
        self._remember(self.weights(args), tensors)
        return tensors


def _mode_options(mode: str | None) -> dict[str, Any]:
    if mode is None or mode == "default":
        return {}
    return dict(_compat.list_mode_options(mode))


class _Partitioner(_compat.CustomPartitionerFn):
    """Binds one dynamo graph (its weights, state inputs and names) to the backend's partition
    step.  Pickles to its uuid only: inductor puts it into its cache key."""

    def __init__(self, backend: VeloraBackend, model: ModelState, names: ParamNames, lifted: _Lifted | None,
                 gm: fx.GraphModule) -> None:
        self.backend, self.model, self.names, self.lifted = backend, model, names, lifted
        inputs = lifted.inputs if lifted else []
        self.params = [x if isinstance(x, nn.Parameter) else None for x in inputs]
        labels = _primal_labels(gm)
        self.labels = labels + [None] * (len(inputs) - len(labels))
        self.frame = _compat.frame_id(gm)
        self._uuid = backend.uuid(model)

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        try:
            return self.backend.partition(self, gm, joint_inputs, **kwargs)
        finally:
            self.release_inputs()

    @property
    def param_indices(self) -> list[int]:
        return [i for i, p in enumerate(self.params) if p is not None]

    def binding(self, joint_inputs: Sequence[Any]) -> GraphBinding | None:
        """None when the joint graph's primals are not the lifted inputs one to one (AOTAutograd
        deduplicated or flattened them) or there is no state to bind."""
        primals = joint_inputs[0] if joint_inputs and isinstance(joint_inputs[0], (list, tuple)) else None
        if self.lifted is None or primals is None or len(primals) != len(self.params):
            return None
        return make_binding(self.model, self.names, self.params, self.lifted.state_index, self.lifted.real_inputs,
                            self.labels, on_slot=lambda slot: self.backend._take_pending(self.model, slot))

    def release_inputs(self) -> None:
        """Drop the references to the calibration batch (inductor may keep this object alive)."""
        if self.lifted is not None:
            self.lifted.real_inputs = self.lifted.example_inputs = None
            self.lifted.inputs = [x if isinstance(x, nn.Parameter) else None for x in self.lifted.inputs]

    def uuid(self) -> str:
        return self._uuid

    def __reduce__(self):
        return (_cache_key_only, (self._uuid,))

    def __deepcopy__(self, memo):
        return self


def make_binding(model: ModelState, names: ParamNames, params: list[Tensor | None], state_index: dict[int, int],
                 real_inputs: list[Any] | None, labels: Sequence[str | None] = (),
                 on_slot: Callable[[Any], None] | None = None) -> GraphBinding:
    """How a joint graph with lifted state inputs reaches ``model``: names, slots, plan, real inputs.
    ``labels`` are the source-derived paths of the inputs (for weights outside a root module);
    ``on_slot`` sees every slot the pass binds (before it plans)."""

    def module_of(site: Site):
        label = labels[site.param_index] if site.param_index < len(labels) else None
        return names.module_of(params[site.param_index], site.source_path or None, label)

    def module_path(site: Site) -> str:
        path, leaf, _ = module_of(site)
        return path or leaf or site.module_path  # a weight of the root itself: its own name

    def slot(site: Site, features: int):
        if site.param_index not in state_index:
            return None
        path, leaf, module = module_of(site)
        if not (path or leaf):
            path, leaf = site.module_path, "weight"
        name = slot_name(path, leaf or "weight", site.orientation, natural_orientation(module))
        with _compat.real_tensors():
            found = model.register_slot(params[site.param_index], site.orientation, name, features)
            if on_slot is not None:
                on_slot(found)
            return found

    return GraphBinding(module_path=module_path, slot=slot, state_primal=state_index.get, plan=model.plan,
                        real_primals=real_inputs)


def _cache_key_only(uuid: str) -> str:
    """What a pickled partitioner turns back into: its key (it is pickled for cache keys only)."""
    return uuid


def _primal_labels(gm: fx.GraphModule) -> list[str | None]:
    labels = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = _compat.dynamo_source_name(node)
        labels.append(module_path_from_source(source) if source else None)
    return labels


def backend(config: VeloraConfig | None = None, /, **options: Any) -> VeloraBackend:
    """``torch.compile(model, backend=velora_fx.backend(mode="auto", ...))``."""
    compiler = options.pop("compiler", "inductor")
    if config is not None and options:
        raise TypeError("pass either a VeloraConfig or keyword options, not both")
    return VeloraBackend(config or VeloraConfig.from_options(**options), compiler=compiler)


_DEFAULT: VeloraBackend | None = None


def default_backend() -> VeloraBackend:
    """The shared backend behind ``backend="velora"``: ``velora_fx.default_backend().report()``
    shows what it did (each model compiled through it has its own state and reports)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VeloraBackend()
    return _DEFAULT


def velora_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """Named-backend entry point (``torch.compile(model, backend="velora", mode=...)``)."""
    return default_backend()(gm, example_inputs, **kwargs)
