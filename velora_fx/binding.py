"""State bound to the weights each call passes: lifting state inputs into the dynamo graph, and
the call-time binder around the compiled graph.

Dynamo reuses a compiled graph for every module whose code and guards match, and parameters are
graph inputs: another instance of the same class, a stack's identical layers after a graph break
(FSDP2 breaks at every ``fully_shard`` module; ``torch.compile(DDP(model))`` compiles each block as
its own frame), a per-layer ``compile``.  So nothing may be bound to "the model compiled" at
compile time.  Each call's weights are looked up (one dict lookup by their ids); the first call
with a set of weights registers their slots in the state of the model that call runs under (found
on the call stack), sets a fixed v they lack from *their own* first batch (one eager run of the
graph's forward part as far as the compressed activations: ``calibrate.calibration_graph``), and
under torch.distributed takes rank 0's state tensors before it runs.  Nothing here holds a weight
strongly: a deleted model is freed, its state with it.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn

from . import _compat, distributed
from .naming import ParamNames, find_compiled_root, module_path_from_source
from .passes.calibrate import activation_values
from .passes.pipeline import GraphBinding, StateSite
from .passes.sites import Site
from .report import GraphReport
from .state import ModelState, initial_vector, natural_orientation, normalised, random_seed, random_vector, slot_name, \
    state_shape

__all__ = ["Lifted", "lift_state", "StateBinder", "make_binding", "primal_labels", "trains"]


@dataclass
class Lifted:
    """The dynamo graph with one state input per weight, and what to pass for them."""

    gm: fx.GraphModule
    example_inputs: list[Any] | None
    state_index: dict[int, int]                  # input index of a weight -> input index of its state
    real_inputs: list[Any] | None                # real values of every input (None: some are fake, no calibration)
    params: list["weakref.ref[Tensor] | None"] = field(default_factory=list)  # each input's real parameter

    @property
    def weights(self) -> list["weakref.ref[Tensor]"]:
        """The weights that have a state input, in input order."""
        return [self.params[i] for i in sorted(self.state_index)]

    def release(self) -> None:
        """Drop every reference to the batch and the weights (inductor may keep the partitioner alive)."""
        self.example_inputs = self.real_inputs = None


def trains(example_inputs: Sequence[Any]) -> bool:
    return torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in example_inputs)


def _has_state(x: Any) -> bool:
    return (isinstance(x, nn.Parameter) and x.requires_grad and x.dim() >= 2 and x.is_floating_point()
            and not _compat.is_fake(x))


def lift_state(gm: fx.GraphModule, example_inputs: list[Any], model: ModelState) -> Lifted | None:
    real = real_weights(gm, example_inputs)
    weights = [i for i, x in enumerate(real) if _has_state(x)]
    if not weights:
        return None
    tensors = [model.tensor_for(real[i]) for i in weights]
    new_gm = _compat.copy_dynamo_graph(gm)
    fake_mode = _compat.fake_mode_of(list(example_inputs))
    fakes = [_compat.static_fake(fake_mode, t) for t in tensors]
    _compat.append_static_inputs(new_gm, [f"velora_state_{i}" for i in weights], fakes)
    n = len(example_inputs)
    # dynamo passes a dynamic size as a SymInt; the calibration runs eagerly on its value in this call
    calibration = None if any(_compat.is_fake(x) for x in real) else \
        [_compat.int_hint(x) if isinstance(x, torch.SymInt) else x for x in real] + tensors
    params = [weakref.ref(x) if isinstance(x, nn.Parameter) else None for x in real] + [None] * len(tensors)
    return Lifted(new_gm, example_inputs + fakes, {w: n + k for k, w in enumerate(weights)}, calibration, params)


def real_weights(gm: fx.GraphModule, example_inputs: list[Any]) -> list[Any]:
    """The inputs, with each fake one that stands for a real parameter replaced by it (dynamo keeps
    a weak reference to every input's real value).  DDPOptimizer compiles its bucket subgraphs on
    fake copies of everything, the weights included; state belongs to the real weight."""
    out = list(example_inputs)
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        if i < len(out) and _compat.is_fake(out[i]):
            real = _compat.dynamo_real_value(node)
            if isinstance(real, nn.Parameter) and real.shape == out[i].shape and real.dtype == out[i].dtype:
                out[i] = real
    return out


class StateBinder:
    """The compiled graph, called with the state tensors of the weights each call passes.

    ``sites``: the compressed sites whose v lives in a weight's state (by input position);
    ``calibration``: the graph that computes their activations (for ``init="first_batch"``)."""

    def __init__(self, compiled: Callable, backend: Any, lifted: Lifted, sites: Sequence[StateSite],
                 calibration: fx.GraphModule | None, report: GraphReport | None, compiled_for: str,
                 names: ParamNames) -> None:
        self.compiled, self.backend = compiled, backend
        self.sites, self.calibration = list(sites), calibration
        self.report, self.compiled_for = report, compiled_for
        self.compiled_paths = [names.module_of(w(), None)[0] for w in lifted.weights]  # where its weights live
        positions = sorted(lifted.state_index)
        self.weights = operator.itemgetter(*positions) if len(positions) > 1 else \
            (lambda args, i=positions[0]: (args[i],))
        # DDPOptimizer runs every bucket's compiled graph once on fake inputs: it gets throwaway
        # zero states of these shapes (never a live model's, which a fake run must not touch)
        self.state_specs = [(state_shape(w()), w().device) for w in lifted.weights]
        self.bound: dict[tuple[int, ...], list[Tensor]] = {}

    def __call__(self, *args):
        weights = self.weights(args)
        state = self.bound.get(tuple(map(id, weights)))
        if state is None:
            if any(_compat.is_fake(w) for w in weights):
                return self.compiled(*args, *(torch.zeros(shape, device=device) for shape, device in self.state_specs))
            state = self._bind(args, weights)
        return self.compiled(*args, *state)

    def _bind(self, args: Sequence[Any], weights: Sequence[Tensor]) -> list[Tensor]:
        """First call with these weights: their slots in the model this call runs under, a fixed v
        they lack, rank 0's state on every rank."""
        root = find_compiled_root()
        model, names = self.backend.model_state(root), ParamNames(root)
        tensors = [model.tensor_for(w) for w in weights]
        unset = []
        for site in self.sites:
            weight = args[site.param_index]
            slot = model.slot_of(weight, site.orientation)
            if slot is None:
                # the compiled weight's module picks among tied names (GPT-2's lm_head is wte)
                path, leaf, module = names.module_of(weight, site.name.removesuffix(":T"))
                name = slot_name(path, leaf, site.orientation, natural_orientation(module)) \
                    if names.names_of(weight) else site.name  # outside any model: the compiled weight's name
                slot = model.register_slot(weight, site.orientation, name, site.features)
                self.backend.take_pending(model, slot)
            if slot.sub_token_size not in (None, site.sub_token_size):
                raise ValueError(f"velora_fx: {slot.name!r} holds a v of size {slot.sub_token_size}, but the graph "
                                 f"dynamo reuses for it was compiled with sub-token size {site.sub_token_size}")
            slot.sub_token_size = site.sub_token_size
            if not slot.initialised:
                unset.append((slot, site))
        if unset:
            self._set_vectors(unset, list(args) + tensors)
        self._report_reuse(model, [names.module_of(w, None)[0] for w in weights])
        distributed.share_tensors(tensors)  # the v each rank set from its own batch becomes rank 0's
        key = tuple(map(id, weights))
        forget = lambda _ref, bound=self.bound: bound.pop(key, None)  # noqa: E731 - ids are reused
        self.bound[key] = tensors
        for w in weights:
            weakref.finalize(w, forget, None)
        return tensors

    def _report_reuse(self, model: ModelState, paths: list[str]) -> None:
        """Weights other than the compiled ones running this graph (another instance of the class,
        another layer of a stack) get the graph's report under their own module paths: what is
        approximated and saved for them is reported, and counted, like for the compiled weights."""
        if self.report is None or (model.label == self.compiled_for and paths == self.compiled_paths):
            return
        rename = _path_rename(self.compiled_paths, paths)
        sites = [dataclasses.replace(s, name=rename(s.name), consumers=[rename(c) for c in s.consumers],
                                     approximated=[rename(c) for c in s.approximated],
                                     state=rename(s.state) if s.state else s.state) for s in self.report.sites]
        consumers = {c for s in sites for c in s.consumers}
        if any(r.graph_id == self.report.graph_id and {c for s in r.sites for c in s.consumers} == consumers
               for r in model.reports):
            return
        whose = self.compiled_for if model.label != self.compiled_for else "other weights of this model"
        note = f"dynamo runs this graph, compiled for {whose}, with these weights and their own state"
        model.reports.append(dataclasses.replace(self.report, model=model.label, sites=sites,
                                                 message="; ".join(m for m in (note, self.report.message) if m)))

    def _set_vectors(self, unset: list, primals: list[Any]) -> None:
        """v for slots without one: ``random`` from the slot's name, ``first_batch`` from this call's
        activations (the batch these weights see first); ``batch``/``ema`` are set by the graph."""
        init = self.backend.config.init
        if init == "random":
            for slot, site in unset:
                slot.set_vector(random_vector(site.sub_token_size, random_seed(slot.name)))
            return
        if init != "first_batch":
            return
        try:
            values = activation_values(self.calibration, primals, sorted({s.activation for _, s in unset}))
        except Exception as exc:  # noqa: BLE001 - a v is still needed: the uniform unit vector, said loudly
            values = {}
            warnings.warn(f"velora_fx: could not compute the first-batch v of {[s.name for s, _ in unset]} "
                          f"({type(exc).__name__}: {exc}); they use the uniform unit vector", stacklevel=4)
        for slot, site in unset:
            x = values.get(site.activation)
            g = site.sub_token_size
            slot.set_vector(initial_vector(x, g) if x is not None else normalised(torch.zeros(g)))


def _path_rename(old: list[str], new: list[str]) -> Callable[[str], str]:
    """``layers.0.mlp.down`` -> ``layers.1.mlp.down`` when every weight moved by one prefix (what
    differs before their common ending); the identity otherwise (names then stay the compiled ones)."""
    moves = set()
    for a, b in zip(old, new):
        if a == b:
            continue
        common = 0
        while common < min(len(a), len(b)) and a[len(a) - 1 - common] == b[len(b) - 1 - common]:
            common += 1
        while common and a[len(a) - common] != ".":  # the common ending starts at a path separator
            common -= 1
        moves.add((a[:len(a) - common], b[:len(b) - common]))
    if len(moves) != 1:
        return lambda name: name
    (before, after), = moves
    return lambda name: after + name[len(before):] if name.startswith(before) else name


def make_binding(model: ModelState, names: ParamNames, params: list[Tensor | None], state_index: dict[int, int],
                 real_inputs: list[Any] | None, labels: Sequence[str | None] = (),
                 on_slot: Callable[[Any], None] | None = None, sets_v_at_call: bool = False) -> GraphBinding:
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
                        real_primals=real_inputs, sets_v_at_call=sets_v_at_call)


def primal_labels(gm: fx.GraphModule) -> list[str | None]:
    labels = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = _compat.dynamo_source_name(node)
        labels.append(module_path_from_source(source) if source else None)
    return labels
