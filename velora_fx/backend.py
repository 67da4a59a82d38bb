"""The torch.compile backend: inductor, with the VeLoRA rewrite in its partition step.

Hook: inductor's ``custom_partitioner_fn`` receives the joint forward+backward graph after
inductor's own joint passes; we run the pipeline there and hand back the partition of the
rewritten graph, so decompositions, joint passes, partitioner and codegen all stay inductor's.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from . import _compat
from .config import ConfigError, VeloraConfig
from .passes.pipeline import JointContext, run_pipeline
from .passes.sites import module_path_from_source
from .report import GraphReport, Report
from .state import SiteStore

__all__ = ["VeloraBackend", "backend"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


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

    Owns the per-site state (the v vectors) and the reports of every graph it compiled.
    ``compiler="inductor"`` (default) generates code with inductor; ``compiler="eager"`` runs the
    same decompositions, joint passes, rewrite and partitioner but executes the graphs eagerly
    (fast to compile: for tests and ``explain``).
    """

    def __init__(self, config: VeloraConfig | None = None, *, compiler: str = "inductor") -> None:
        if compiler not in ("inductor", "eager"):
            raise ConfigError(f"compiler must be 'inductor' or 'eager', got {compiler!r}")
        self.config = config or VeloraConfig()
        self.compiler = compiler
        self.store = SiteStore(self.config.init)
        self.reports: list[GraphReport] = []
        self._graph_ids = itertools.count()
        self._warned: set[str] = set()

    # -- dynamo entry point ------------------------------------------------------------------
    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        partitioner = _Partitioner(self, _parameter_indices(example_inputs), _primal_labels(gm))
        if self.compiler == "inductor":
            return _compat.compile_fx(gm, example_inputs, config_patches={"custom_partitioner_fn": partitioner})
        eager = _compat.aot_autograd(fw_compiler=_compat.boxed_nop_compiler, bw_compiler=_compat.boxed_nop_compiler,
                                     partition_fn=_compat.inductor_partition_fn,
                                     decompositions=_compat.select_decomp_table())
        with _compat.custom_partitioner(partitioner):
            return eager(gm, example_inputs)

    # -- state and reports -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "sites": self.store.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "config" in state and state["config"].get("init") != self.config.init:
            warnings.warn(f"velora_fx: loading state saved with init={state['config'].get('init')!r} "
                          f"into a backend with init={self.config.init!r}", stacklevel=2)
        self.store.load_state_dict(state.get("sites", {}))

    def report(self) -> Report:
        return Report(list(self.reports))

    def uuid(self) -> str:
        payload = json.dumps(self.config.to_dict(), sort_keys=True)
        return f"velora_fx:{_source_hash()}:{self.store.token}:{payload}"

    def warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, stacklevel=3)

    # -- the partition step ------------------------------------------------------------------
    def partition(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], param_indices: list[int] | None,
                  primal_labels: list[str | None] | None, **kwargs: Any):
        graph_id = next(self._graph_ids)
        num_fwd_outputs = kwargs.pop("num_fwd_outputs")
        if param_indices is None:
            static = kwargs.get("static_lifetime_input_indices") or []
            param_indices, primal_labels = list(static), None
        ctx = JointContext(gm, joint_inputs, num_fwd_outputs, param_indices,
                           _compat.min_cut_rematerialization_partition, kwargs, primal_labels)
        try:
            result = run_pipeline(ctx, self.config, self.store, graph_id)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - never crash a compile: fall back to plain inductor
            if os.environ.get("VELORA_FX_STRICT") == "1":  # tests: surface pass bugs instead of falling back
                raise
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.warn_once(f"velora_fx: a graph compiled without the rewrite, as plain inductor ({reason})")
            self.reports.append(GraphReport(graph_id, "fallback", reason))
            return _compat.min_cut_rematerialization_partition(gm, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                               **kwargs)
        self.reports.append(result.report)
        return result.saved.fwd, result.saved.bwd


class _Partitioner(_compat.CustomPartitionerFn):
    """Binds one dynamo graph's parameter layout to the backend's partition step."""

    def __init__(self, backend: VeloraBackend, param_indices: list[int] | None,
                 primal_labels: list[str | None] | None) -> None:
        self.backend, self.param_indices, self.primal_labels = backend, param_indices, primal_labels

    def __call__(self, gm: fx.GraphModule, joint_inputs: Sequence[Any], **kwargs: Any):
        indices, labels = self.param_indices, self.primal_labels
        primals = joint_inputs[0] if joint_inputs and isinstance(joint_inputs[0], (list, tuple)) else None
        if primals is not None and indices is not None and len(primals) != len(labels or primals):
            indices = labels = None  # AOT reshaped the inputs (subclasses, tokens): trust its static indices
        return self.backend.partition(gm, joint_inputs, indices, labels, **kwargs)

    def uuid(self) -> str:
        return self.backend.uuid()


def _parameter_indices(example_inputs: Sequence[Any]) -> list[int]:
    return [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]


def _primal_labels(gm: fx.GraphModule) -> list[str | None]:
    labels = []
    for node in gm.graph.find_nodes(op="placeholder"):
        source = _compat.dynamo_source_name(node)
        labels.append(module_path_from_source(source) if source else None)
    return labels


def backend(config: VeloraConfig | None = None, /, **options: Any) -> VeloraBackend:
    """``torch.compile(model, backend=velora_fx.backend(num_groups=32, mode="auto", ...))``."""
    compiler = options.pop("compiler", "inductor")
    if config is not None and options:
        raise TypeError("pass either a VeloraConfig or keyword options, not both")
    return VeloraBackend(config or VeloraConfig.from_options(**options), compiler=compiler)


_DEFAULT: VeloraBackend | None = None


def default_backend() -> VeloraBackend:
    """The shared backend behind ``backend="velora"`` (state persists across compiles)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = VeloraBackend()
    return _DEFAULT


def velora_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Named-backend entry point (``torch.compile(model, backend="velora")``)."""
    return default_backend()(gm, example_inputs)
