"""Every private torch API velora_fx touches, in one place (torch 2.11 - 2.14).

Keep imports of ``torch._*`` out of every other module: when torch moves something, this is the
one file to change.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
if TORCH_VERSION < (2, 11):  # pragma: no cover - guarded by pyproject
    raise ImportError(f"velora_fx needs torch >= 2.11, found {torch.__version__}")

from torch._dynamo import list_backends, register_backend  # noqa: E402,F401
from torch._dynamo.backends.common import aot_autograd  # noqa: E402,F401
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402,F401
from torch._functorch.compile_utils import fx_graph_cse  # noqa: E402,F401
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402,F401
from torch._guards import detect_fake_mode  # noqa: E402,F401
from torch._inductor import config as inductor_config  # noqa: E402,F401
from torch._inductor.compile_fx import compile_fx  # noqa: E402,F401
from torch._inductor.compile_fx import partition_fn as inductor_partition_fn  # noqa: E402,F401
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files  # noqa: E402,F401
from torch._inductor.decomposition import select_decomp_table  # noqa: E402,F401
from torch.utils.checkpoint import CheckpointPolicy  # noqa: E402,F401

try:  # torch >= 2.13 renamed hint_int
    from torch.fx.experimental.symbolic_shapes import optimization_hint as _hint
except ImportError:  # pragma: no cover - torch 2.11/2.12
    from torch.fx.experimental.symbolic_shapes import hint_int as _hint  # type: ignore[no-redef]


def int_hint(value: Any, fallback: int = 4096) -> int:
    """A concrete int for a possibly symbolic size (for byte accounting only)."""
    if isinstance(value, int):
        return value
    try:
        return int(_hint(value, fallback=fallback))
    except Exception:  # noqa: BLE001 - unbacked or odd symbol: a guess is fine for accounting
        return fallback


def dynamo_source_name(placeholder: torch.fx.Node) -> str | None:
    """The dynamo source of a graph input (e.g. ``L['self']._modules['fc']._parameters['weight']``)."""
    arg = placeholder.meta.get("grapharg")
    source = getattr(arg, "source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def is_joint_primal(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("primals")


def is_joint_tangent(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("tangents")


def boxed_nop_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
    return make_boxed_func(gm.forward)


@contextlib.contextmanager
def custom_partitioner(partitioner: Any):
    """Make inductor's partition step call ``partitioner`` (a CustomPartitionerFn)."""
    with inductor_config.patch(custom_partitioner_fn=partitioner):
        yield


def fake_mode_of(values: Any):
    return detect_fake_mode(values)
