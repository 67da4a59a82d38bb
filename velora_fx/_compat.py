"""Every private torch API velora_fx touches, in one place (torch 2.11 - 2.15).

Keep imports of ``torch._*`` out of every other module: when torch moves something, this is the
one file to change.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Callable

import torch

TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
TESTED = ((2, 11), (2, 15))  # the range the test suite and the GPU checks ran on
if TORCH_VERSION < (2, 11):  # pragma: no cover - guarded by pyproject
    raise ImportError(f"velora_fx needs torch >= 2.11, found {torch.__version__}")
if TORCH_VERSION > TESTED[1]:  # pragma: no cover - depends on the installed torch
    import warnings as _warnings
    _warnings.warn(f"velora_fx was tested with torch 2.11 - 2.15; torch {torch.__version__} is untested "
                   "(it hooks inductor's private partitioner API)", stacklevel=2)

from torch._dynamo import list_backends, register_backend  # noqa: E402,F401
from torch._dynamo.eval_frame import OptimizedModule  # noqa: E402,F401
from torch._dynamo.backends.common import aot_autograd  # noqa: E402,F401
from torch._functorch.aot_autograd import make_boxed_func  # noqa: E402,F401
from torch._functorch.compile_utils import fx_graph_cse  # noqa: E402,F401
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402,F401
from torch._guards import detect_fake_mode  # noqa: E402,F401
from torch._inductor import config as inductor_config  # noqa: E402,F401
from torch._inductor.compile_fx import compile_fx, compile_fx_inner  # noqa: E402,F401
from torch._inductor.compile_fx import partition_fn as inductor_partition_fn  # noqa: E402,F401
from torch._inductor.custom_graph_pass import CustomPartitionerFn, get_hash_for_files  # noqa: E402,F401
from torch._inductor.decomposition import select_decomp_table  # noqa: E402,F401
from torch._inductor.virtualized import V as _inductor_virtualized  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensor  # noqa: E402
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
    """The dynamo source of a graph input (e.g. ``L['self']._modules['fc']._parameters['weight']``);
    DDPOptimizer's subgraphs carry it only as ``_dynamo_source``."""
    arg = placeholder.meta.get("grapharg")
    source = getattr(arg, "source", None) or getattr(placeholder, "_dynamo_source", None)
    if source is None:
        return None
    name = source.name
    return name() if callable(name) else name


def is_joint_primal(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("primals")


def is_joint_tangent(node: torch.fx.Node) -> bool:
    return node.op == "placeholder" and str(node.target).startswith("tangents")


def inner_compile_keeping_order(keep: Callable[[torch.fx.GraphModule], bool]) -> Callable:
    """inductor's per-graph compile (``compile_fx``'s ``inner_compile``), with its peak-memory reorder
    (``reorder_for_peak_memory``) off for the graphs where ``keep(gm)``.  Why: that reorder sees a
    transfer op as memory-neutral and may move it next to its partner (the wait for a copy right after
    the copy starts), so compute stalls for the whole copy (measured on an H200, GPT-2 12 x 1024: hidden
    share 0.52); the offload planner has already placed each op on its timeline."""
    @functools.wraps(compile_fx_inner)
    def inner(gm: torch.fx.GraphModule, example_inputs: Any, **kwargs: Any) -> Any:
        if keep(gm) and hasattr(inductor_config, "reorder_for_peak_memory"):
            with inductor_config.patch(reorder_for_peak_memory=False):
                return compile_fx_inner(gm, example_inputs, **kwargs)
        return compile_fx_inner(gm, example_inputs, **kwargs)
    return inner


def boxed_nop_compiler(gm: torch.fx.GraphModule, example_inputs: Any) -> Callable:
    return make_boxed_func(gm.forward)


@contextlib.contextmanager
def custom_partitioner(partitioner: Any):
    """Make inductor's partition step call ``partitioner`` (a CustomPartitionerFn)."""
    with inductor_config.patch(custom_partitioner_fn=partitioner):
        yield


def eager_partition_fn(gm: torch.fx.GraphModule, joint_inputs: Any, **kwargs: Any):
    """inductor's partition step (joint-graph passes + partitioner) outside ``compile_fx``, for
    ``compiler="eager"``.  Its random-op pass (``replace_random``) reads ``V.fake_mode``, which only
    ``compile_fx`` sets: without it any graph with dropout failed to compile."""
    mode = fake_mode_of(joint_inputs)
    if mode is None:
        return inductor_partition_fn(gm, joint_inputs, **kwargs)
    with _inductor_virtualized.set_fake_mode(mode):
        return inductor_partition_fn(gm, joint_inputs, **kwargs)


def fake_mode_of(values: Any):
    """The fake mode of some values, else the one of the running dynamo trace, else None."""
    mode = detect_fake_mode(values)
    if mode is None:
        ctx = torch._guards.TracingContext.try_get()
        mode = getattr(ctx, "fake_mode", None)
    return mode


def is_fake(x: Any) -> bool:
    return isinstance(x, FakeTensor)


@contextlib.contextmanager
def autograd_cache_disabled():
    """AOTAutograd's cache, if it hit, would skip the partition step (for measuring-only traces)."""
    with torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _bypass_classes() -> tuple[type, ...]:
    found: list[type] = []
    try:
        from torch._functorch._aot_autograd.autograd_cache import BypassAOTAutogradCache
        found.append(BypassAOTAutogradCache)
    except ImportError:  # pragma: no cover - moved: AOTAutograd treats any error in its key as a bypass
        pass
    try:
        from torch._inductor.codecache import BypassFxGraphCache
        found.append(BypassFxGraphCache)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found) or (Exception,)


class NotCacheable(*_bypass_classes()):  # type: ignore[misc]
    """Raised while a cache key is computed: both AOTAutograd's and inductor's FX graph cache take
    it as "bypass the cache for this graph" (their own exceptions), never as a failure."""


@contextlib.contextmanager
def count_autograd_cache_hits():
    """Yields a function returning how many AOTAutograd cache hits happened inside the block."""
    from torch._dynamo.utils import counters
    start = counters["aot_autograd"]["autograd_cache_hit"]
    yield lambda: counters["aot_autograd"]["autograd_cache_hit"] - start


@contextlib.contextmanager
def caches_disabled():
    """Every compile cache off (``torch.compiler.config.force_disable_caches``)."""
    with torch.compiler.config.patch(force_disable_caches=True):
        yield


def inductor_cache_dir() -> str:
    """Inductor's cache directory: ``TORCHINDUCTOR_CACHE_DIR`` when set, else torch's per-user default
    (read at each call; unlike torch's ``cache_dir()`` this neither creates it nor sets the variable)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    return os.path.abspath(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir())


def caches_forced_off() -> bool:
    """``torch.compiler.config.force_disable_caches`` (inductor's ``force_disable_caches`` is its alias)."""
    return bool(torch.compiler.config.force_disable_caches)


def partitioner_settings() -> dict[str, Any]:
    """functorch's config options (what the min-cut partitioner reads), without the cache switches."""
    return {k: v for k, v in torch._functorch.config.save_config_portable().items() if "cache" not in k}


def inductor_settings() -> dict[str, Any]:
    """inductor's config options as they are now (its joint-graph passes read them), without the
    cache switches and directories."""
    return {k: v for k, v in inductor_config.save_config_portable().items()
            if "cache" not in k and not k.endswith(("_dir", "_path"))}


def unroll_reductions_threshold() -> int:
    """Sums over fewer elements than this, inductor turns into pointwise code (no reduction)."""
    return int(getattr(inductor_config, "unroll_reductions_threshold", 8))


def device_name(device: torch.device) -> str:
    """The device kind a plan is priced for: the GPU's name on CUDA (``device_roofline`` reads its
    datasheet), else the device type."""
    if device.type == "cuda":
        try:
            return f"cuda:{torch.cuda.get_device_name(device.index or 0)}"
        except Exception:  # noqa: BLE001 - no driver at hand: the type alone
            return "cuda"
    return device.type


def is_inductor_option(name: str) -> bool:
    """Whether ``name`` is one of inductor's config options (what ``torch.compile(options=)`` sets)."""
    return name in inductor_config.get_config_copy()


def dynamo_real_value(placeholder: torch.fx.Node) -> Any:
    """The real value dynamo saw for a graph input (it keeps a weak reference), or None."""
    arg = placeholder.meta.get("grapharg")
    if arg is None:
        return None
    try:
        return arg.example
    except Exception:  # noqa: BLE001 - the value died, or no example: unknown
        return None


def list_mode_options(mode: str) -> dict[str, Any]:
    """inductor's options for a ``torch.compile(mode=...)`` string."""
    return torch._inductor.list_mode_options(mode)


def frame_id(gm: torch.fx.GraphModule) -> str:
    """Dynamo's frame id of a graph (a recompile of the same code keeps it), or ''."""
    compile_id = getattr(gm, "meta", {}).get("dynamo_compile_id")
    frame = getattr(compile_id, "frame_id", None)
    return "" if frame is None else str(frame)


def copy_dynamo_graph(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of a dynamo graph module that AOTAutograd still recognises as dynamo's (placeholders
    keep ``_dynamo_source``, the module keeps ``meta`` and ``_param_name_to_source``).  Dynamo
    reads its own graph after the backend returns, so we must not edit it in place."""
    graph, env = torch.fx.Graph(), {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
        if hasattr(node, "_dynamo_source"):
            env[node]._dynamo_source = node._dynamo_source
    new = torch.fx.GraphModule(gm, graph)
    new.meta = dict(getattr(gm, "meta", {}))
    if hasattr(gm, "_param_name_to_source"):
        new._param_name_to_source = gm._param_name_to_source
    return new


def static_fake(fake_mode: Any, tensor: torch.Tensor) -> torch.Tensor:
    """A fake twin with static sizes (so AOTAutograd does not make the state's shape symbolic)."""
    if fake_mode is None:
        return tensor
    return fake_mode.from_tensor(tensor, static_shapes=True)


def append_static_inputs(gm: torch.fx.GraphModule, names: list[str], values: list[torch.Tensor]) -> None:
    """Add graph inputs that AOTAutograd and CUDA graphs treat like module buffers: static
    addresses (cudagraphs neither copies them nor refuses their in-place update), no dynamo source."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    for name, value in zip(names, values):
        with gm.graph.inserting_after(last):
            node = gm.graph.placeholder(name)
        node._dynamo_source = None
        node.meta["example_value"] = value
        node.meta["tensor_dict"] = {"_dynamo_static_input_type": "unguarded"}
        last = node
    gm.recompile()


def real_tensors():
    """Leave the ambient fake mode (the partition step runs under AOTAutograd's) to touch real
    state tensors and real inputs."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    return unset_fake_temporarily()


# what dynamo records for nn.Linear / F.linear
LINEAR_FUNCTIONS = (torch._C._nn.linear, torch.nn.functional.linear)


@contextlib.contextmanager
def recompute_budget(budget: float | None):
    """inductor's knapsack: the partitioner keeps at most ``budget`` of what it would save
    (``torch._functorch.config.activation_memory_budget``); None: leave it as it is."""
    if budget is None:
        yield
    else:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            yield


# (matmul FLOP/s, memory bytes/s) when the device cannot say: an H100's bf16 dense rate and HBM3
# bandwidth; only their ratio matters for ranking plans of one graph
_FALLBACK_ROOFLINE = (800e12, 3.0e12)


def device_roofline(device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """The matmul rate and memory bandwidth of ``device`` for ``dtype`` (inductor's datasheet
    numbers on CUDA; a fixed H100-like balance elsewhere)."""
    return _cuda_roofline(device.index or 0, dtype) if device.type == "cuda" else _FALLBACK_ROOFLINE


@functools.cache
def _cuda_roofline(index: int, dtype: torch.dtype) -> tuple[float, float]:
    try:
        from torch._inductor.utils import get_device_tflops, get_gpu_dram_gbps
        with torch.cuda.device(index):
            tflops, gbps = float(get_device_tflops(dtype)), float(get_gpu_dram_gbps())
        if tflops > 0 and gbps > 0:
            return tflops * 1e12, gbps * 1e9
    except Exception:  # noqa: BLE001 - no datasheet, no triton: the fixed balance
        pass
    return _FALLBACK_ROOFLINE


def cuda_graphs_on() -> bool:
    """Whether inductor compiles the current graph for CUDA graphs (``mode="reduce-overhead"``)."""
    return bool(inductor_config.triton.cudagraphs)


def current_recompute_budget() -> float:
    return float(torch._functorch.config.activation_memory_budget)


def reset_dynamo() -> None:
    torch._dynamo.reset()


def functional_all_reduce_sum() -> tuple[Any, Any]:
    """The aten-level functional collectives (all_reduce, wait_tensor) a rewritten graph can call:
    inductor and AOTAutograd trace, partition and lower them like any other op."""
    import torch.distributed._functional_collectives  # noqa: F401  (registers their fake kernels)
    ops = torch.ops._c10d_functional
    return ops.all_reduce.default, ops.wait_tensor.default


def world_group_name() -> str:
    """The name functional collectives use for the default process group."""
    return torch.distributed.group.WORLD.group_name


def default_store() -> Any:
    """The default process group's key-value store (plans travel through it, see distributed.py)."""
    return torch.distributed.distributed_c10d._get_default_store()


_BACKEND_WRAPPER_ATTRS = ("_torchdynamo_orig_backend", "compiler_fn", "backend_compile_fn", "func")


def tracing_backends() -> list[Any]:
    """The backend of the dynamo trace running on this thread, with every wrapper around it
    (dynamo's debug wrapper, ``torch.compile``'s ``_TorchCompileWrapper``, DDPOptimizer,
    ``functools.partial``), outermost first; [] when dynamo is not tracing.  Only meaningful
    when called at trace time (``torch.compiler.assume_constant_result``)."""
    import inspect

    from torch._dynamo import symbolic_convert
    tx = getattr(symbolic_convert.tls, "current_tx", None)
    fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    chain: list[Any] = []
    while fn is not None and len(chain) < 16 and not any(fn is c for c in chain):
        chain.append(fn)
        if inspect.ismethod(fn):
            fn = fn.__self__
            continue
        fn = next((getattr(fn, a) for a in _BACKEND_WRAPPER_ATTRS if getattr(fn, a, None) is not None), None)
    return chain
