"""The user-facing verbs besides ``backend``: ``transform`` and ``explain``."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from . import _compat
from .backend import VeloraBackend
from .config import VeloraConfig
from .passes.pipeline import JointContext, run_pipeline
from .report import Report
from .state import SiteStore
from .tracing import JointGraph

__all__ = ["transform", "explain"]


def transform(joint: JointGraph | fx.GraphModule, joint_inputs: Any = None, *, num_fwd_outputs: int | None = None,
              param_indices: list[int] | None = None, store: SiteStore | None = None,
              config: VeloraConfig | None = None, **options: Any) -> tuple[fx.GraphModule, Report]:
    """Apply the VeLoRA rewrite to a joint forward+backward graph (see ``trace_joint``).

    Returns the rewritten joint graph (the input is left untouched) and its report.  Split it with
    any partitioner (e.g. ``min_cut_rematerialization_partition``); the encoded tensors are
    tagged MUST_SAVE.  The returned module keeps its site state alive as ``gm.velora_store``.
    """
    if isinstance(joint, JointGraph):
        joint_inputs = joint.joint_inputs if joint_inputs is None else joint_inputs
        num_fwd_outputs = joint.num_fwd_outputs if num_fwd_outputs is None else num_fwd_outputs
        param_indices = joint.param_indices if param_indices is None else param_indices
        partition_kwargs, labels, gm = joint.partition_kwargs, joint.primal_labels, joint.gm
    else:
        gm, partition_kwargs, labels = joint, {}, None
    if joint_inputs is None or num_fwd_outputs is None or param_indices is None:
        raise TypeError("transform needs joint_inputs, num_fwd_outputs and param_indices (or a JointGraph)")
    if config is not None and options:
        raise TypeError("pass either config= or keyword options, not both")
    config = config or VeloraConfig.from_options(**options)
    store = store or SiteStore(config.init)
    ctx = JointContext(gm, joint_inputs, num_fwd_outputs, list(param_indices),
                       _compat.min_cut_rematerialization_partition, dict(partition_kwargs), labels)
    result = run_pipeline(ctx, config, store)  # works on a copy: result.gm is never the input
    result.gm.velora_store = store
    return result.gm, Report([result.report])


def explain(model: torch.nn.Module, *example_inputs: Any, compiler: str = "eager", **options: Any) -> Report:
    """Compile ``model`` on ``example_inputs`` with the given options and report, per site, what
    the baseline partition saves and what the rewrite would save instead.

    ``compiler="eager"`` (default) runs inductor's decompositions, joint passes and partitioner
    (so the decisions are inductor's) without code generation; pass ``"inductor"`` to build it all.
    Parameters' ``.grad`` are untouched: no backward runs.
    """
    backend = VeloraBackend(VeloraConfig.from_options(**options), compiler=compiler)
    torch._dynamo.reset()
    with torch.enable_grad():
        torch.compile(model, backend=backend)(*example_inputs)
    torch._dynamo.reset()
    return backend.report()
