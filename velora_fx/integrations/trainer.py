"""Hugging Face ``transformers.Trainer`` integration: ``VeloraCallback``.

Use::

    from velora_fx.integrations import VeloraCallback

    callback = VeloraCallback(mode="auto", max_error=0.05)      # any velora_fx.backend() option
    trainer = Trainer(model=model, args=TrainingArguments(...),  # leave torch_compile off
                      train_dataset=ds, callbacks=[callback])
    trainer.train()
    print(callback.backend.report().table())

Why not ``TrainingArguments(torch_compile=True, torch_compile_backend="velora")``
-------------------------------------------------------------------------------------
It cannot work with the released transformers (5.24) / accelerate (1.15), whatever is registered
with dynamo.  ``Trainer.__init__`` -> ``create_accelerator_and_postprocess`` ->
``_build_accelerator_args`` (transformers/trainer.py:796) builds
``TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode, ...)``, and
the plugin validates the name against a closed enum (accelerate/utils/dataclasses.py:1096, in
``TorchDynamoPlugin.__post_init__``)::

    self.backend = DynamoBackend(self.backend.upper())

``DynamoBackend`` (accelerate/utils/dataclasses.py:690) lists only NO, EAGER, AOT_EAGER, INDUCTOR,
AOT_TS_NVFUSER, NVPRIMS_NVFUSER, CUDAGRAPHS, OFI, FX2TRT, ONNXRT, TENSORRT, AOT_TORCHXLA_TRACE_ONCE,
TORCHXLA_TRACE_ONCE, TVM, HPU_BACKEND and NEURON, so ``"velora"`` raises
``ValueError: 'VELORA' is not a valid DynamoBackend`` while the Trainer is constructed, before any
model is touched; dynamo's own registry (where ``import velora_fx`` registers ``"velora"``) is never
consulted.  The ways around it are all worse than a callback:

- naming an accepted backend and re-registering it in dynamo (e.g. ``"aot_eager"``) silently
  changes what that name means for every other ``torch.compile`` in the process;
- adding a member to accelerate's enum at runtime patches a third-party class's internals;
- a backend object cannot be passed at all: the plugin calls ``.upper()`` on it, and
  ``TrainingArguments.torch_compile_backend`` is a string field;
- even a working name would reach ``torch.compile(model, backend="velora", mode=...)``
  (accelerate/accelerator.py:2073, ``prepare_model``): the shared ``default_backend()`` with its
  default options, and ``torch_compile_mode`` is inductor's ``mode`` (not velora_fx's), so there is
  still no way to pass velora_fx options or to reach the backend's report.

So: leave ``torch_compile`` off and add ``VeloraCallback``.  (``VeloraCallback`` refuses
``torch_compile=True``: accelerate would wrap the model in a second ``torch.compile`` with its own
backend, and dynamo, tracing the outer one, would inline ours away.)

How the callback compiles
-------------------------
``Trainer._inner_training_loop`` runs ``_prepare_for_training`` (``_wrap_model`` and
``accelerator.prepare``: device placement, DDP/FSDP wrapping, mixed-precision forward patch) and
then fires ``on_train_begin`` (transformers/trainer.py:1653) with ``model=trainer.model``, the
module the prepared wrapper calls (or the FSDP wrapper itself, which the Trainer then stores as
``model``).  ``on_train_begin`` compiles that module *in place* with
``model.compile(backend=velora_fx.backend(**options))``: ``nn.Module.compile`` keeps the object
(it sets ``_compiled_call_impl``), so the Trainer's references (``model``, ``model_wrapped``,
the DDP wrapper's ``.module``, the optimizer's parameters) stay valid, the state-dict keys keep
their names (no ``_orig_mod.`` prefix), and every call the training loop makes (through any
wrapper) runs the compiled code.  A second ``train()`` does not compile again.

Reporting: at each ``on_log`` the summary numbers (``velora/saved_bytes_before``,
``velora/saved_bytes_after``, ``velora/sites``, ``velora/compressed_sites``, ``velora/graphs``)
are added to the logs dict and to the ``state.log_history`` entry the Trainer just appended (so
they reach ``trainer_state.json`` and the callbacks after this one; reporting integrations such as
wandb run before user callbacks and do not see them).  At ``on_train_end`` the per-site table
goes to ``log_report`` (``True``: ``print`` on the main process; a callable: called with the text;
``False``: nowhere) and the ``velora_fx.integrations`` logger (INFO).  The backend's vectors
(``callback.backend.state_dict()``) are not saved with Trainer checkpoints.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

from ..backend import VeloraBackend, backend as make_backend
from ..report import Report

try:  # transformers is optional for velora_fx itself
    from transformers import TrainerCallback
except ImportError as _exc:  # pragma: no cover - exercised only without transformers
    raise ImportError("velora_fx.integrations needs transformers (pip install transformers)") from _exc

__all__ = ["VeloraCallback", "compile_for_trainer", "report_metrics"]

logger = logging.getLogger("velora_fx.integrations")

_PREFIX = "velora/"


def compile_for_trainer(model: nn.Module, backend: VeloraBackend | None = None, *,
                        compile_kwargs: dict[str, Any] | None = None, **velora_options: Any) -> VeloraBackend:
    """Compile ``model`` in place (``model.compile``) through a velora_fx backend and return the backend.

    ``backend``: an existing ``VeloraBackend`` (then no ``velora_options``); otherwise one is built
    with ``velora_fx.backend(**velora_options)`` (``compiler=``, ``mode=``, ``max_error=``...).
    ``compile_kwargs`` go to ``torch.compile`` (``fullgraph``, ``dynamic``, ``mode`` (inductor's),
    ``options``).  The module object is kept, so this can be called after a Trainer (or accelerate)
    has wrapped or referenced it.
    """
    if backend is not None and velora_options:
        raise TypeError("pass either backend= or velora_fx options, not both")
    if isinstance(model, _optimized_module()):
        raise ValueError("velora_fx: the model is already a torch.compile(...) wrapper (OptimizedModule); "
                         "pass the original module")
    if getattr(model, "_compiled_call_impl", None) is not None:
        raise ValueError("velora_fx: the model was already compiled with model.compile(...)")
    backend = backend if backend is not None else make_backend(**velora_options)
    model.compile(backend=backend, **(compile_kwargs or {}))
    return backend


def report_metrics(report: Report, prefix: str = _PREFIX) -> dict[str, int]:
    """The report's summary numbers, as flat log entries."""
    current = report.current
    return {f"{prefix}saved_bytes_before": report.saved_bytes_before,
            f"{prefix}saved_bytes_after": report.saved_bytes_after,
            f"{prefix}sites": sum(len(g.sites) for g in current),
            f"{prefix}compressed_sites": sum(1 for g in current for s in g.sites if s.decision == "compressed"),
            f"{prefix}graphs": len(current)}


class VeloraCallback(TrainerCallback):
    """Compile the Trainer's model through a velora_fx backend when training starts, and log its report.

    ``VeloraCallback(**velora_options)``: any ``velora_fx.backend`` option (``compiler="eager"``,
    ``mode="max_memory"``, ``include=[...]``, ``memory_budget=0.5``...), or ``backend=`` an existing
    ``VeloraBackend``.  ``compile_kwargs``: for ``torch.compile`` (``fullgraph``, ``dynamic``, and
    inductor's ``mode``/``options``).  ``log_report``: where the per-site table goes at the end of
    training (``True``: printed on the main process; a callable taking the text; ``False``: only the
    logger).  ``log_metrics``: add the summary numbers to every log.

    ``callback.backend`` is the backend (``.report()``, ``.state_dict()``, ``.config``);
    ``callback.model`` the module it compiled; ``callback.table`` the last table logged.
    """

    def __init__(self, backend: VeloraBackend | None = None, *, log_report: bool | Callable[[str], Any] = True,
                 log_metrics: bool = True, compile_kwargs: dict[str, Any] | None = None,
                 **velora_options: Any) -> None:
        if backend is not None and velora_options:
            raise TypeError("pass either backend= or velora_fx options, not both")
        # built now, so that a bad option fails where the callback is written, not at train()
        self.backend = backend if backend is not None else make_backend(**velora_options)
        self.log_report = log_report
        self.log_metrics = log_metrics
        self.compile_kwargs = dict(compile_kwargs or {})
        self.model: nn.Module | None = None
        self.table: str | None = None

    # -- events --------------------------------------------------------------------------------
    def on_init_end(self, args, state, control, **kwargs):
        _refuse_torch_compile(args)

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        _refuse_torch_compile(args)
        if model is None:
            raise ValueError("velora_fx: VeloraCallback got no model in on_train_begin")
        if self.model is model:
            return  # a later train() call: already compiled
        if self.model is not None:
            raise ValueError("velora_fx: this VeloraCallback already compiled another model; "
                             "use one callback per Trainer")
        compile_for_trainer(model, self.backend, compile_kwargs=self.compile_kwargs)
        self.model = model
        logger.info("velora_fx: compiled %s in place through the velora backend (compiler=%r)",
                    type(model).__name__, self.backend.compiler)

    def on_log(self, args, state, control, logs: dict[str, Any] | None = None, **kwargs):
        if not self.log_metrics or logs is None or self.model is None:
            return
        report = self.backend.report()
        if not report.graphs:
            return
        metrics = report_metrics(report)
        logs.update(metrics)
        # Trainer.log appended a copy of logs (plus "step") before calling the callbacks
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.model is None:
            return
        self.table = self.backend.report().table()
        logger.info("velora_fx report:\n%s", self.table)
        if not state.is_world_process_zero:
            return
        if callable(self.log_report):
            self.log_report(self.table)
        elif self.log_report:
            print(f"velora_fx report:\n{self.table}")


def _refuse_torch_compile(args) -> None:
    if getattr(args, "torch_compile", False):
        raise ValueError(
            "velora_fx: VeloraCallback compiles the model itself; set TrainingArguments(torch_compile=False) "
            f"(torch_compile_backend={args.torch_compile_backend!r} would make accelerate wrap the model in a "
            "second torch.compile whose backend replaces velora's)")


def _optimized_module():
    from .._compat import OptimizedModule
    return OptimizedModule
