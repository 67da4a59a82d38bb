"""Eager, paper-faithful VeLoRA: ground truth for tests and the eager baseline in benchmarks.

``VeLoRALinearFunction`` saves only the sub-token coefficients; backward computes grad_x and
grad_b exactly and grad_W from ``x̂ = c ⊗ v``.  ``apply_velora`` wraps nn.Linear and transformers'
Conv1D modules of a model in place.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .codecs.velora import project, reconstruct
from .config import VeloraConfig
from .state import next_vector

__all__ = ["VeLoRALinearFunction", "velora_linear", "weight_grad", "VeLoRALinear", "apply_velora"]


def weight_grad(x: Tensor, grad_out: Tensor, v: Tensor, scale: float = 1.0, transposed_weight: bool = False) -> Tensor:
    """The reference formula: grad_W = grad_outᵀ · (c ⊗ v) (or its transpose for Conv1D's W[in, out])."""
    x_hat = reconstruct(project(x, v.float().to(x.device), torch.float32), v.float().to(x.device), torch.float32)
    gw = grad_out.reshape(-1, grad_out.shape[-1]).float().t() @ x_hat.reshape(-1, x.shape[-1]) * scale
    return gw.t() if transposed_weight else gw


class VeLoRALinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b for Conv1D) saving only ``c = subtokens(x) · v``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor, scale: float,
                transposed_weight: bool, coeff_dtype: torch.dtype | None) -> Tensor:
        w = weight if transposed_weight else weight.t()
        y = x @ w if bias is None else torch.addmm(bias, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)
        with torch.no_grad():
            coeff = project(x, v, coeff_dtype)
        ctx.save_for_backward(coeff, v, weight)
        ctx.meta = (x.dtype, x.shape, scale, transposed_weight, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        coeff, v, weight = ctx.saved_tensors
        dtype, shape, scale, transposed, has_bias = ctx.meta
        grad_x = grad_w = grad_b = None
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ (weight.t() if transposed else weight)).reshape(shape)
        if ctx.needs_input_grad[1]:
            x_hat = reconstruct(coeff, v, dtype).reshape(-1, shape[-1])
            if scale != 1.0:
                x_hat = x_hat * scale
            grad_w = x_hat.t() @ g2 if transposed else g2.t() @ x_hat
        if has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None, None, None, None


def velora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, v: Tensor, scale: float = 1.0,
                  transposed_weight: bool = False, coeff_dtype: torch.dtype | None = None) -> Tensor:
    return VeLoRALinearFunction.apply(x, weight, bias, v, scale, transposed_weight, coeff_dtype)


class VeLoRALinear(nn.Module):
    """Wraps an nn.Linear (or transformers Conv1D) so its weight gradient uses VeLoRA."""

    def __init__(self, inner: nn.Module, name: str, config: VeloraConfig) -> None:
        super().__init__()
        self.inner, self.name, self.config = inner, name, config
        self.transposed = not isinstance(inner, nn.Linear)  # Conv1D keeps W as [in, out]
        features = inner.weight.shape[0] if self.transposed else inner.weight.shape[1]
        self.sub_token_size = config.sub_token_size_for(features, name)
        device = inner.weight.device
        self.register_buffer("v", torch.zeros(self.sub_token_size, device=device), persistent=True)
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool, device=device), persistent=True)
        # checkpoints keep the wrapped module's keys ("fc.weight", not "fc.inner.weight"), and a
        # checkpoint of the plain model loads (v and its flag then keep their current values)
        self._register_state_dict_hook(_drop_inner_prefix)
        self._register_load_state_dict_pre_hook(self._add_inner_prefix)

    @property
    def weight(self) -> Tensor:
        """The wrapped module's weight (code such as T5's reads ``self.wo.weight``)."""
        return self.inner.weight

    @property
    def bias(self) -> Tensor | None:
        return self.inner.bias

    def _add_inner_prefix(self, state_dict, prefix, *args) -> None:
        for name in list(self.inner.state_dict(keep_vars=True)):
            if prefix + name in state_dict and prefix + "inner." + name not in state_dict:
                state_dict[prefix + "inner." + name] = state_dict.pop(prefix + name)
        for name in ("v", "initialised"):
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())

    def _vector(self, x: Tensor) -> Tensor:
        # v evolves on every forward that carries gradients, whatever ``self.training`` says: the
        # compiled backend only sees the training graph, and the two must agree
        with torch.no_grad():
            current = self.v if bool(self.initialised) else None
            new = next_vector(self.config.init, self.name, current, x, self.sub_token_size)
            if new is not current:
                self.v.copy_(new)
                self.initialised.fill_(True)
        return self.v

    def forward(self, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and self.inner.weight.requires_grad):
            return self.inner(x)
        weight, bias = self.inner.weight, self.inner.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):  # cast like autocast's linear, outside the Function
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            return velora_linear(x, weight, bias, self._vector(x), self.config.scale, self.transposed,
                                 self.config.coeff_dtype)


def _drop_inner_prefix(module: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "inner.")]:
        state_dict[prefix + key[len(prefix + "inner."):]] = state_dict.pop(key)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def apply_velora(model: nn.Module, config: VeloraConfig | None = None, **options) -> list[str]:
    """Swap selected nn.Linear / Conv1D modules of ``model`` for VeLoRALinear, in place.
    Returns the module paths wrapped.  ``include``/``exclude`` globs select as in the backend."""
    config = config or VeloraConfig.from_options(**options)
    if isinstance(model, VeLoRALinear) or not model._modules:
        raise ValueError("apply_velora wraps the submodules of a model; wrap a bare layer in a container first")
    wrapped = {id(m.inner) for m in model.modules() if isinstance(m, VeLoRALinear)}
    targets = [(name, m) for name, m in model.named_modules()
               if name and (isinstance(m, nn.Linear) or _is_conv1d(m)) and id(m) not in wrapped
               and config.selects(name)]
    for name, module in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, VeLoRALinear(module, name, config))
    return [name for name, _ in targets]

