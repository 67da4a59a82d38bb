"""transformers causal LMs in training: no logits returned, so the exact loss head applies on the plain call.

Why: ``model(input_ids=..., labels=...)`` returns ``loss`` *and* ``logits``.  A tensor the graph
returns must be materialised, so the chunked head (``codecs/chunked_loss.py``) could not replace
``lm_head`` + cross-entropy, and the ``[tokens, vocab]`` logits with their fp32 copy stay the
largest tensors of the step.  Liger-Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy answer the same way: in training with labels the model returns ``logits=None``.

How: two class-level wrappers on transformers, installed once (``install()``, when a backend with
the head is built and transformers is imported).  Each asks *at trace time* whether dynamo is
tracing for a velora_fx backend whose head is on (``codecs`` has ``"chunked_loss"``,
``keep_logits=False``): ``torch.compiler.assume_constant_result`` runs the check while dynamo
traces and bakes in the answer, so the compiled code pays nothing, and eager models, other
backends and velora_fx backends without the head see transformers' own behaviour.

- ``ModelOutput.__post_init__``: a causal-LM output (its class name has ``CausalLM``) whose
  ``loss`` requires grad (a backward will follow) gets ``logits=None``, as if the model had been
  written that way, and no KV cache (``cache``, ``past_key_values`` in older transformers):
  transformers builds one whenever the config's ``use_cache`` is on, training included, and a
  returned cache keeps every layer's keys and values alive until the caller drops the output,
  through all of backward (Llama 12 x 1024, batch 8 x 1024: 24 blocks of 16 MiB at the measured
  peak, H200).  Evaluation (``torch.no_grad()``) and calls without labels keep both.
- ``PreTrainedModel.loss_function``: a model whose class name maps to no loss type
  (``GPT2LMHeadModel``) gets transformers' own fallback, ``ForCausalLMLoss``, without the
  ``logger.warning_once`` call that would split lm_head and the loss into two graphs (a graph
  break; the head must see both in one graph).

Opt out with ``velora_fx.backend(..., keep_logits=True)``: the model then returns its logits and
its cache as transformers does, and the report says why the head did not apply.
"""
from __future__ import annotations

import sys
import threading
import warnings
from collections import OrderedDict
from typing import Any

import torch

__all__ = ["install", "install_when_imported", "installed", "drops_logits_now", "NOTICE"]

# re-entrant: importing transformers.modeling_utils inside install() runs the post-import hook
# (_AfterImport), which calls install() again on the same thread
_LOCK = threading.RLock()
# what a causal LM's output drops in training with labels: the logits, and the KV cache ("cache" since
# transformers 5.2x, "past_key_values" before)
_DROPPED = ("logits", "cache", "past_key_values")
_INSTALLED: dict[str, Any] = {}  # what was replaced, by name (the originals)


def installed() -> bool:
    return bool(_INSTALLED)


def install() -> bool:
    """Wrap transformers' output and loss lookup (idempotent).  Returns whether they are wrapped:
    False when transformers is not imported (then no model of it can be compiled yet)."""
    if "transformers" not in sys.modules:
        return False
    with _LOCK:
        if _INSTALLED:
            return True
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.generic import ModelOutput

        if _INSTALLED:  # that import ran the post-import hook, which installed them
            return True
        post_init, loss_property = ModelOutput.__post_init__, PreTrainedModel.__dict__["loss_function"]
        ModelOutput.__post_init__ = _wrap_post_init(post_init)
        PreTrainedModel.loss_function = property(_wrap_loss_getter(loss_property.fget), loss_property.fset,
                                                 loss_property.fdel, loss_property.__doc__)
        _INSTALLED.update(post_init=post_init, loss_function=loss_property)
    return True


def install_when_imported() -> None:
    """``install()`` now if transformers is imported, else right after ``transformers.modeling_utils``
    is (a post-import hook on ``sys.meta_path``, removed once it fired).  Why: ``backend="velora"``
    is built only after dynamo traced the model, too late for these wrappers, so ``import velora_fx``
    must arrange them whichever of the two packages a script imports first."""
    if install() or any(isinstance(f, _AfterImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _AfterImport())


class _AfterImport:
    """A meta-path finder that finds nothing itself: it wraps the real loader of
    ``transformers.modeling_utils`` so that ``install()`` runs once that module has executed."""

    target = "transformers.modeling_utils"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.target:
            return None
        import contextlib
        import importlib.util

        with contextlib.suppress(ValueError):  # another thread's import may have fired it already
            sys.meta_path.remove(self)          # one shot; and the lookup below must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        run = loader.exec_module

        def exec_module(module, run=run):
            run(module)
            install()

        loader.exec_module = exec_module
        return spec


def uninstall() -> None:
    """Put transformers back as it was (tests)."""
    with _LOCK:
        if not _INSTALLED:
            return
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils.generic import ModelOutput
        ModelOutput.__post_init__ = _INSTALLED["post_init"]
        PreTrainedModel.loss_function = _INSTALLED["loss_function"]
        _INSTALLED.clear()


NOTICE = ("velora_fx: a causal LM called with labels in training returns logits=None (and no KV cache) under "
          "this backend: the exact chunked loss head computes the loss and its gradients without the [tokens, "
          "vocab] logits, as Liger-Kernel's fused loss does. Code that reads the logits in training (TRL's "
          "token accuracy, a metric) needs velora_fx.backend(keep_logits=True). Evaluation (torch.no_grad()) "
          "and calls without labels return them as before.")
_noticed = False  # NOTICE is shown once per process


@torch.compiler.assume_constant_result
def drops_logits_now() -> bool:
    """Whether dynamo is tracing, right now, for a velora_fx backend whose loss head is on.  Runs
    as plain Python while dynamo traces (its result is baked in), so the notice is shown then."""
    from ..backend import tracing_config
    global _noticed
    config = tracing_config()
    drops = config is not None and config.uses("chunked_loss") and not config.keep_logits
    if drops and not _noticed:
        _noticed = True
        warnings.warn(NOTICE, stacklevel=2)
    return drops


def _wrap_post_init(post_init):
    def __post_init__(self) -> None:
        if torch.compiler.is_compiling() and "CausalLM" in type(self).__name__:
            loss, logits = self.__dict__.get("loss"), self.__dict__.get("logits")
            if isinstance(loss, torch.Tensor) and isinstance(logits, torch.Tensor) and loss.requires_grad \
                    and drops_logits_now():
                # the dataclass __init__ already put the fields in the dict (ModelOutput.__setattr__)
                for name in _DROPPED:
                    if self.__dict__.get(name) is not None:
                        object.__setattr__(self, name, None)
                        OrderedDict.__delitem__(self, name)  # ModelOutput's own __delitem__ refuses
        post_init(self)
    __post_init__.__wrapped__ = post_init
    return __post_init__


def _wrap_loss_getter(getter):
    def loss_function(self):
        if torch.compiler.is_compiling() and "_loss_function" not in self.__dict__ \
                and _unmapped_loss_type(self) and drops_logits_now():
            from transformers.loss.loss_utils import LOSS_MAPPING
            return LOSS_MAPPING["ForCausalLM"]  # what the getter falls back to, after its warning
        return getter(self)
    loss_function.__wrapped__ = getter
    return loss_function


def _unmapped_loss_type(model: Any) -> bool:
    from transformers.loss.loss_utils import LOSS_MAPPING
    return getattr(model, "loss_type", None) not in LOSS_MAPPING
