"""Models and checks shared by the pass tests: small graphs and an eager reference twin."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import velora_fx
from velora_fx.reference import VeLoRALinear, apply_velora

ACTS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class Block(nn.Module):
    """A small transformer-ish block: norm -> shared-input projections (q/k/v) -> attention or
    elementwise mix -> o_proj, residual, norm -> fc1 -> act -> fc2, residual."""

    def __init__(self, d, hidden, act="relu", attention=False, bias=True, heads=2):
        super().__init__()
        self.attention, self.heads = attention, heads
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d, bias=bias) for _ in range(3))
        self.o = nn.Linear(d, d, bias=bias)
        self.fc1, self.fc2 = nn.Linear(d, hidden, bias=bias), nn.Linear(hidden, d, bias=bias)
        self.act = ACTS[act]()

    def forward(self, x):
        h = self.norm1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        if self.attention:
            b, t, d = q.shape
            split = lambda z: z.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
            a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
            a = a.transpose(1, 2).reshape(b, t, d)
        else:
            a = q * torch.sigmoid(k) + v
        x = x + self.o(a)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class Stack(nn.Module):
    def __init__(self, d, hidden, layers=1, **kw):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(Block(d, hidden, **kw) for _ in range(layers))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        x = self.inp(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


def train_step(model, x, backend=None, autocast=None):
    """One forward+backward (compiled with ``backend`` if given); returns output and grads."""
    if backend is not None:
        torch._dynamo.reset()  # hypothesis draws many graphs through one forward code object
    fn = torch.compile(model, backend=backend) if backend is not None else model
    x = x.detach().clone().requires_grad_()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        out = fn(x)
        loss = (out.float() ** 2).mean()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad.detach(), grads


def square_loss_step(model, x, backend=None):
    """Compile with ``backend`` (fresh dynamo), one ``out.square().mean()`` backward; returns the
    output and the parameter gradients, and clears them for the next call."""
    torch._dynamo.reset()
    run = torch.compile(model, backend=backend) if backend is not None else model
    out = run(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def reference_twin(model: nn.Module, backend: velora_fx.VeloraBackend) -> nn.Module:
    """An eager copy of ``model`` where every linear the backend compressed uses the eager
    reference with the very v the backend used (so the two must agree to rounding)."""
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.grad = None
    target = model if model in backend._models else None  # None: the backend's only entry (e.g. a function)
    sites = backend.state_dict(target)["sites"]
    compressed = {c: s.state for s in backend.report(target).compressed for c in s.approximated}
    if not compressed:
        return twin
    wrapped = apply_velora(twin, include=sorted(compressed), sub_token_size=1,
                           scale=backend.config.scale, coeff_dtype=backend.config.coeff_dtype)
    assert sorted(wrapped) == sorted(compressed), (wrapped, compressed)
    for path in wrapped:
        vec = sites[compressed[path]]["vector"]
        old = twin.get_submodule(path)
        new = VeLoRALinear(old.inner, path, velora_fx.VeloraConfig(sub_token_size=vec.numel(),
                                                                  scale=backend.config.scale,
                                                                  coeff_dtype=backend.config.coeff_dtype))
        new.v.copy_(vec)
        new.initialised.fill_(True)
        parent, _, leaf = path.rpartition(".")
        setattr(twin.get_submodule(parent) if parent else twin, leaf, new)
    return twin


def twin_grads(twin, x, autocast=None):
    out, gx, grads = train_step(twin, x, autocast=autocast)
    return out, gx, {n.replace(".inner.", "."): g for n, g in grads.items()}


def saved_activation_bytes(fn, *inputs, params=()):
    """Bytes of distinct storages that autograd saves for backward (parameters excluded),
    measured with ``torch.autograd.graph.saved_tensors_hooks`` around one forward."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*inputs)
    return sum(seen.values()), out
