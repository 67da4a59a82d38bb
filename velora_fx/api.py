"""The user-facing verbs besides ``backend``: ``transform`` and ``explain``."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
import torch.fx as fx

from . import _compat
from .backend import VeloraBackend
from .binding import make_binding
from .config import VeloraConfig
from .naming import ParamNames
from .passes.pipeline import JointContext, run_pipeline
from .report import Report
from .state import ModelState
from .tracing import JointGraph

__all__ = ["transform", "explain"]

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(VeloraConfig)}


def transform(joint: JointGraph, *, config: VeloraConfig | None = None, **options: Any
              ) -> tuple[fx.GraphModule, Report]:
    """Apply the joint-graph rewrites (VeLoRA, RMM, few-bit; by ``codecs``) to a joint
    forward+backward graph from ``velora_fx.trace_joint``.

    Returns the rewritten joint graph (the input is left untouched) and its report.  Split it with
    any partitioner (e.g. ``min_cut_rematerialization_partition``); the encoded tensors are tagged
    MUST_SAVE.  The graph's last primals are the state inputs: pass ``gm.velora_state_inputs``
    (fresh state, owned by ``gm.velora_state``) where ``joint.state_inputs`` were.
    """
    if not isinstance(joint, JointGraph):
        raise TypeError("transform takes the JointGraph of velora_fx.trace_joint (it carries the state inputs "
                        f"the rewrite reads), got {type(joint).__name__}")
    if config is not None and options:
        raise TypeError("pass either config= or keyword options, not both")
    config = config or VeloraConfig.from_options(**options)
    if config.uses("chunked_loss") or config.memory_budget is not None:
        warnings.warn("velora_fx.transform: chunked_loss (rewritten before AOTAutograd) and memory_budget (a "
                      "partition choice) act in the backend only; transform applies velora, rmm and fewbit",
                      stacklevel=2)
    state = ModelState("transform")
    real = list(joint.real_inputs) if joint.real_inputs is not None else None
    fresh = {}
    for weight, index in joint.state_index.items():
        fresh[index] = state.tensor_for(joint.params[weight])
        if real is not None:
            real[index] = fresh[index]
    binding = make_binding(state, joint.names or ParamNames(None), joint.params, joint.state_index, real,
                           joint.primal_labels or ())
    ctx = JointContext(joint.gm, joint.joint_inputs, joint.num_fwd_outputs, list(joint.param_indices),
                       _compat.min_cut_rematerialization_partition, dict(joint.partition_kwargs), joint.primal_labels)
    result = run_pipeline(ctx, config, binding)  # works on a copy: result.gm is never the input
    result.report.model = state.label
    result.gm.velora_state = state
    result.gm.velora_state_inputs = [fresh[i] for i in sorted(fresh)]
    return result.gm, Report([result.report])


def explain(model: torch.nn.Module, *args: Any, config: VeloraConfig | None = None, compiler: str = "eager",
            **kwargs: Any) -> Report:
    """Compile ``model(*args, **kwargs)`` once with a fresh backend and report, per site, what the
    baseline partition saves and what the rewrite saves instead.

    Keyword arguments that are ``VeloraConfig`` options (``mode``, ``max_error``, ``include``...)
    configure the backend; the others go to the model.  ``compiler="eager"`` (default) runs
    inductor's decompositions, joint passes and partitioner (so the decisions are inductor's)
    without code generation; ``"inductor"`` builds it all.  No backward runs, parameters' ``.grad``
    are untouched, other compiled models keep their compiled code and state.
    """
    options = {k: kwargs.pop(k) for k in list(kwargs) if k in _CONFIG_FIELDS}
    if config is not None and options:
        raise TypeError("pass either config= or option keywords, not both")
    backend = VeloraBackend(config or VeloraConfig.from_options(**options), compiler=compiler)
    with torch.enable_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    return backend.report()
