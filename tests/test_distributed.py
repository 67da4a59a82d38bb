"""Two gloo processes on CPU: the plan and v are the same on every rank, under plain compile,
DistributedDataParallel (one bucket, and several: DDPOptimizer's split subgraphs) and FSDP2
(``fully_shard`` per layer and at the root, CPU device mesh; FSDP2's hooks are dynamo-disabled, so
every FSDP unit is its own graph and identical layers reuse one); gradients match a single
process on the global batch with the same v; rank 0's ``state_dict`` resumes every rank; and the
in-graph ``batch`` / ``ema`` rules average their statistic over ranks.

Every case the selected tests need runs in one pair of spawned workers (``_worker``, one case after
the other, each from a fresh dynamo; a worker's start, torch import and first compile cost more
than most cases) and returns its results through files; the assertions and the single-process
references run in the test process."""
from __future__ import annotations

import datetime
import gc
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import velora_fx

WORLD = 2
# FSDP and resume cases: every selected site compressed at a fixed size, so a single process plans
# the same sites as the distributed run and the comparison is about v and gradients alone
FIXED = dict(compiler="eager", mode="all", num_groups=4)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.v = nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc, self.out = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.q(h) * torch.sigmoid(self.v(h))
        return self.out(torch.relu(self.fc(h))).square().mean()


class Block(nn.Module):
    def __init__(self, d: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.out(torch.relu(self.fc(self.norm(x))))


class Stack(nn.Module):
    """Root weights around two identical blocks, called without a loop: FSDP2's graph break at each
    block is then not inside a loop, so the root's code compiles too (before, between, after)."""

    def __init__(self, d: int = 32, blocks: int = 2):
        super().__init__()
        self.inp, self.head = nn.Linear(d, d), nn.Linear(d, d)
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x):
        h = self.inp(x)
        h = self.layers[0](h)
        h = self.layers[1](h)
        return self.head(h).square().mean()


class Blocks(nn.Module):
    def __init__(self, d: int = 256, blocks: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.square().mean()


def _stack() -> Stack:
    torch.manual_seed(0)
    return Stack()


def _global_batch(step: int = 0) -> torch.Tensor:
    """The same global batch on every rank and in the test process; rank r trains on its half."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(2 * WORLD, 16, 32, generator=g)
    return x * torch.arange(1, 2 * WORLD + 1).view(-1, 1, 1)  # halves differ in scale: different v per rank


def _local(x: torch.Tensor, rank: int) -> torch.Tensor:
    return x.chunk(WORLD)[rank]


def _sites(backend, model) -> dict:
    return {k: {f: (t.clone() if torch.is_tensor(t) else t) for f, t in entry.items()}
            for k, entry in backend.state_dict(model=model)["sites"].items()}


def _full_grads(model) -> dict:
    """Every parameter's gradient, gathered where FSDP2 holds only a shard (collective on every rank)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _zero_grads(model):
    for p in model.parameters():
        p.grad = None


# -- cases (run on every rank) ---------------------------------------------------------------
def _case_rank0(rank: int, wrap: str) -> tuple:
    torch.manual_seed(0)
    model = Net()
    torch.manual_seed(100 + rank)  # each rank its own data: its own first batch
    x = torch.randn(4, 16, 32) * (1 + rank)
    backend = velora_fx.backend(compiler="eager")
    if wrap == "ddp":
        run = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend))
    else:
        run = torch.compile(model, backend=backend)
    for _ in range(2):
        run(x).backward()
    plan = dict(backend.model_state(model).plan)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return plan, _sites(backend, model), grads, len(backend.report(model=model).graphs)


def _case_ddp_buckets(rank: int) -> dict:
    """4 blocks of ~1 MiB of fp32 weights, 1 MiB buckets: DDPOptimizer splits the graph and
    compiles every bucket's subgraph on fake inputs (weights included)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(256) for _ in range(4)])
    backend = velora_fx.backend(compiler="eager")
    run = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend), bucket_cap_mb=1)
    for step in range(2):
        torch.manual_seed(100 * step + rank)
        run(torch.randn(2, 8, 256) * (1 + rank)).square().mean().backward()
    return {"plan": dict(backend.model_state(model).plan), "sites": _sites(backend, model),
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "graphs": len(backend.report(model=model).graphs)}


def _case_compiled_ddp(rank: int, order: str) -> dict:
    """``torch.compile(DDP(model))`` (PyTorch's documented order: dynamo compiles each block's frame,
    DDPOptimizer its bucket subgraphs on fake inputs) or ``DDP(torch.compile(model))``; each rank
    its own data; the all-reduced weight gradients after each of two steps."""
    torch.manual_seed(0)
    model = Blocks()
    backend = velora_fx.backend(**FIXED)
    if order == "compile_ddp":
        run = torch.compile(nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1), backend=backend)
    else:
        run = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend), bucket_cap_mb=1)
    out = {"grads": [], "sites": []}
    for step in range(2):
        _zero_grads(model)
        run(_local(_ddp_batch(step), rank)).backward()
        out["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        out["sites"].append(_sites(backend, model))
    return out


def _ddp_batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(2 * WORLD, 8, 256, generator=g)
    return x * torch.arange(1, 2 * WORLD + 1).view(-1, 1, 1) + torch.arange(2 * WORLD).view(-1, 1, 1)


def _case_fsdp(rank: int) -> dict:
    model = _fsdp(_stack())
    backend = velora_fx.backend(include=["*.fc", "head"], **FIXED)
    run = torch.compile(model, backend=backend)
    run(_local(_global_batch(), rank)).backward()
    return {"sites": _sites(backend, model), "grads": _full_grads(model),
            "reported": [s.name for s in backend.report(model=model).compressed]}


def _case_fsdp_offload(rank: int) -> dict:
    """FSDP2 with ``memory_budget=0.9, offload=True`` and without offload, on this rank's own batch.
    Offload needs CUDA; here the device check is lifted and the ops copy synchronously (the plan and
    the rewrite per rank, not the overlap)."""
    import velora_fx.offload.step as offload_step
    x = torch.randn(2, 512, 256, generator=torch.Generator().manual_seed(7 + rank))  # fc outputs: 2 MiB
    out = {}
    check = offload_step.unsupported_reason
    offload_step.unsupported_reason = lambda device: None
    try:
        for name, options in (("offload", dict(offload=True, offload_bandwidth=1e6)), ("exact", {})):
            torch._dynamo.reset()
            torch.manual_seed(0)
            model = _fsdp(Stack(256))
            # 0.9: each FSDP unit is its own small graph, whose peak its gradients' transients dominate
            backend = velora_fx.backend(memory_budget=0.9, compiler="eager", codecs=("chunked_loss",), **options)
            torch.compile(model, backend=backend)(x).backward()
            out[name] = {"grads": _full_grads(model), "offloaded": [
                g.offload["offloaded_bytes"] for g in backend.report(model=model).graphs if g.offload]}
    finally:
        offload_step.unsupported_reason = check
    return out


def _case_resume(rank: int, wrap: str, tmp: str) -> dict:
    """A trains one step and rank 0 saves its state; B loads it on every rank before its compile,
    C after its own compile (on other data); then all take one more step on the same batch."""
    def build():
        return _fsdp(_stack()) if wrap == "fsdp" else _stack()

    def compiled(model, backend):
        if wrap == "fsdp":
            return torch.compile(model, backend=backend)
        return nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend))

    first, other, nxt = (_local(_global_batch(step), rank) for step in (0, 1, 2))
    model_a = build()
    backend_a = velora_fx.backend(**FIXED)
    run_a = compiled(model_a, backend_a)
    run_a(first).backward()
    path = os.path.join(tmp, "velora_state.pt")
    if rank == 0:
        torch.save(backend_a.state_dict(model=model_a), path)
    dist.barrier()
    saved = torch.load(path, weights_only=False)
    _zero_grads(model_a)
    run_a(nxt).backward()
    out = {"saved": saved["sites"], "grads_a": _full_grads(model_a)}

    model_b = build()
    backend_b = velora_fx.backend(**FIXED)
    backend_b.load_state_dict(saved, model=model_b)  # before compile (FSDP2: sharded weights now)
    run_b = compiled(model_b, backend_b)  # kept alive: DDP's reducer all-reduces during backward
    run_b(nxt).backward()
    out.update(sites_b=_sites(backend_b, model_b), grads_b=_full_grads(model_b))

    model_c = build()
    backend_c = velora_fx.backend(**FIXED)
    run_c = compiled(model_c, backend_c)
    run_c(other).backward()  # its own first batch: its own v
    out["own_c"] = _sites(backend_c, model_c)
    backend_c.load_state_dict(saved, model=model_c)  # after compile
    _zero_grads(model_c)
    run_c(nxt).backward()
    out.update(sites_c=_sites(backend_c, model_c), grads_c=_full_grads(model_c))
    return out


def _case_rank_mean(rank: int) -> dict:
    """``batch`` and ``ema:0.9``: three steps on each rank's own half of three global batches."""
    out = {}
    for init in ("batch", "ema:0.9"):
        torch.manual_seed(0)
        model = Net()
        backend = velora_fx.backend(compiler="eager", mode="all", num_groups=4, init=init)
        run = torch.compile(model, backend=backend)
        for step in range(3):
            run(_local(_global_batch(step), rank)).backward()
        out[init] = _sites(backend, model)
    return out


def _worker(rank: int, tmp: str, cases: list) -> None:
    torch.set_num_threads(1)  # as torchrun's default: two ranks' intra-op threads on 2 cores only spin-wait
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        for i, (case, *args) in enumerate(cases):
            torch._dynamo.reset()  # each case compiles from scratch, as in workers of its own
            case_dir = os.path.join(tmp, str(i))
            os.makedirs(case_dir, exist_ok=True)
            run = {"rank0": _case_rank0, "ddp_buckets": _case_ddp_buckets, "fsdp": _case_fsdp,
                   "fsdp_offload": _case_fsdp_offload,
                   "compiled_ddp": _case_compiled_ddp,
                   "resume": lambda r, wrap: _case_resume(r, wrap, case_dir), "rank_mean": _case_rank_mean}[case]
            result = run(rank, *args)
            path = os.path.join(case_dir, f"rank{rank}.pt")
            torch.save(result, path + ".part")
            os.replace(path + ".part", path)  # a case's file exists only once complete
            del result, run
            gc.collect()  # DDP reducers and FSDP hooks of this case's models go before the next
            dist.barrier()
    finally:
        dist.destroy_process_group()


# the worker case each test asserts on, from the test's parameters
CASE_OF = {
    "test_plan_and_v_come_from_rank0": lambda p: ("rank0", p["wrap"]),
    "test_ddp_multi_bucket_subgraphs_share_plan_and_v": lambda p: ("ddp_buckets",),
    "test_compiled_ddp_uses_rank0s_v_from_the_first_step": lambda p: ("compiled_ddp", p["order"]),
    "test_fsdp2_gradients_match_one_process_on_the_global_batch": lambda p: ("fsdp",),
    "test_fsdp2_offload_plans_per_rank_and_keeps_gradients_exact": lambda p: ("fsdp_offload",),
    "test_rank0_state_dict_resumes_every_rank": lambda p: ("resume", p["wrap"]),
    "test_batch_and_ema_average_their_statistic_over_ranks": lambda p: ("rank_mean",),
}


def _case_of(item) -> tuple:
    return CASE_OF[item.originalname](item.callspec.params if hasattr(item, "callspec") else {})


@pytest.fixture(scope="module")
def all_results(request) -> tuple[dict, BaseException | None]:
    """Runs the cases of every selected test of this module in one spawn.  Results travel through
    files: a multiprocessing Manager would fork the test process, whose threads (inductor's compile
    pool from earlier tests) can deadlock a fork.  A failing case stops the workers; its test and
    those of the cases after it fail with the workers' error."""
    cases = list(dict.fromkeys(_case_of(item) for item in request.session.items
                               if item.module.__name__ == __name__ and item.originalname in CASE_OF))
    results, error = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            mp.spawn(_worker, args=(tmp, cases), nprocs=WORLD, join=True)
        except Exception as exc:
            error = exc
        for i, case in enumerate(cases):
            paths = [os.path.join(tmp, str(i), f"rank{rank}.pt") for rank in range(WORLD)]
            if all(os.path.exists(path) for path in paths):
                results[case] = {rank: torch.load(path, weights_only=False) for rank, path in enumerate(paths)}
    return results, error


@pytest.fixture
def results(request, all_results) -> dict:
    """This test's case: its result on each rank."""
    done, error = all_results
    case = _case_of(request.node)
    if case not in done:
        pytest.fail(f"the workers did not finish case {case}: {error}")
    return done[case]


# -- assertions --------------------------------------------------------------------------------
def _assert_same_sites(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a, (sorted(a), sorted(b))
    for key in a:  # every field of every site (v, its size...) identical
        assert a[key].keys() == b[key].keys(), key
        for field, value in a[key].items():
            same = torch.equal(value, b[key][field]) if torch.is_tensor(value) else value == b[key][field]
            assert same, (key, field, value, b[key][field])


def _assert_grads(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name, **tol)


def _single_process(model: nn.Module, options: dict, batches, state: dict | None = None):
    """The reference: one process, the unsharded model, the global batches; ``state``: rank 0's v."""
    backend = velora_fx.backend(**options)
    if state is not None:
        backend.load_state_dict({"sites": state}, model=model)
    run = torch.compile(model, backend=backend)
    for x in batches:
        run(x).backward()
    return model, backend


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_plan_and_v_come_from_rank0(wrap, results):
    (plan0, state0, grads0, graphs0), (plan1, state1, grads1, graphs1) = results[0], results[1]
    assert plan0 == plan1 and any(plan0.values())  # something is compressed, the same everywhere
    _assert_same_sites(state0, state1)
    if wrap == "ddp":
        assert graphs0 == graphs1 >= 1
        _assert_grads(grads0, grads1)  # DDP averaged the gradients


def test_ddp_multi_bucket_subgraphs_share_plan_and_v(results):
    r0, r1 = results[0], results[1]
    assert r0["graphs"] == r1["graphs"] > 1  # DDPOptimizer split the graph
    assert r0["plan"] == r1["plan"] and any(g > 0 for g in r0["plan"].values()), r0["plan"]
    _assert_same_sites(r0["sites"], r1["sites"])  # v set in graph, then rank 0's after the first call
    assert all(s["vector"] is not None for s in r0["sites"].values())
    _assert_grads(r0["grads"], r1["grads"])


@pytest.mark.parametrize("order", ["compile_ddp", "ddp_compile"])
def test_compiled_ddp_uses_rank0s_v_from_the_first_step(order, results):
    """Both orders: from the first step on, every rank approximates with rank 0's v (from rank 0's
    own first batch), so the all-reduced weight gradient of a site is rank 1 per sub-token."""
    r0, r1 = results[0], results[1]
    torch.manual_seed(0)
    _, alone = _single_process(Blocks(), FIXED, [_local(_ddp_batch(0), 0)])
    rank0_own = alone.state_dict()["sites"]
    assert set(rank0_own) == {"layers.0.fc", "layers.0.out", "layers.1.fc", "layers.1.out"}
    for step in range(2):
        _assert_same_sites(r0["sites"][step], r1["sites"][step])
        assert set(r0["sites"][step]) == set(rank0_own)
        for name, entry in r0["sites"][step].items():
            torch.testing.assert_close(entry["vector"], rank0_own[name]["vector"], rtol=1e-5, atol=1e-6)
            grad = r0["grads"][step][f"{name}.weight"]
            svals = torch.linalg.svdvals(grad.reshape(-1, entry["sub_token_size"]).double())
            assert svals[1] <= 1e-5 * svals[0], (order, step, name, svals[:3])  # every row parallel to v
        _assert_grads(r0["grads"][step], r1["grads"][step])


def test_fsdp2_gradients_match_one_process_on_the_global_batch(results):
    r0, r1 = results[0], results[1]
    _assert_same_sites(r0["sites"], r1["sites"])
    # layers.1 ran the graph compiled for layers.0 (dynamo reuses it): its own state, its v from
    # its own first batch (rank 0's), as one process compiling the whole model on rank 0's half sets it
    assert set(r0["sites"]) == {"layers.0.fc", "layers.1.fc", "head"}
    assert {"layers.0.fc", "layers.1.fc", "head"} <= set(r0["reported"])  # each layer reported under its path
    _, rank0_alone = _single_process(_stack(), dict(include=["*.fc", "head"], **FIXED), [_local(_global_batch(), 0)])
    alone = rank0_alone.state_dict()["sites"]
    for name in r0["sites"]:
        torch.testing.assert_close(r0["sites"][name]["vector"], alone[name]["vector"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(r0["sites"]["layers.1.fc"]["vector"], r0["sites"]["layers.0.fc"]["vector"])
    _assert_grads(r0["grads"], r1["grads"], rtol=0, atol=0)  # full_tensor: one gradient

    x = _global_batch()
    model, _ = _single_process(_stack(), dict(include=["*.fc", "head"], **FIXED), [x], state=r0["sites"])
    single = {n: p.grad for n, p in model.named_parameters()}
    _assert_grads(r0["grads"], single, rtol=1e-5, atol=1e-6)  # approximated and exact sites alike
    exact = _stack()
    exact(x).backward()
    for name, p in exact.named_parameters():
        approximated = name.rpartition(".")[0] in r0["sites"] and name.endswith("weight")
        if approximated:  # not vacuous: VeLoRA really changed these weight gradients
            assert not torch.allclose(p.grad, single[name], rtol=1e-3, atol=1e-5), name
        else:
            torch.testing.assert_close(p.grad, single[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fsdp2_offload_plans_per_rank_and_keeps_gradients_exact(results):
    """Under FSDP2 each rank plans offload for its own graphs (every FSDP unit is a graph): tensors are
    offloaded on every rank, and the gathered gradients equal those of the same budget without offload."""
    for rank in range(WORLD):
        got = results[rank]
        assert any(b > 0 for b in got["offload"]["offloaded"]), got["offload"]["offloaded"]
        assert got["offload"]["offloaded"] == results[0]["offload"]["offloaded"]  # the same plan on every rank
        _assert_grads(got["offload"]["grads"], got["exact"]["grads"], rtol=1e-5, atol=1e-7)
    _assert_grads(results[0]["offload"]["grads"], results[1]["offload"]["grads"], rtol=0, atol=0)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp"])
def test_rank0_state_dict_resumes_every_rank(wrap, results):
    r0, r1 = results[0], results[1]
    saved = r0["saved"]
    assert set(saved) == {"inp", "layers.0.fc", "layers.0.out", "layers.1.fc", "layers.1.out", "head"}
    for r in (r0, r1):
        _assert_same_sites(r["sites_b"], saved)  # loaded before compile
        _assert_same_sites(r["sites_c"], saved)  # loaded after compile
        assert not all(torch.equal(r["own_c"][k]["vector"], saved[k]["vector"]) for k in saved)
        _assert_grads(r["grads_b"], r["grads_a"], rtol=1e-6, atol=1e-7)
        _assert_grads(r["grads_c"], r["grads_a"], rtol=1e-6, atol=1e-7)
    _assert_grads(r0["grads_b"], r1["grads_b"])


def test_batch_and_ema_average_their_statistic_over_ranks(results):
    r0, r1 = results[0], results[1]
    for init in ("batch", "ema:0.9"):
        _assert_same_sites(r0[init], r1[init])  # different data on each rank, one v
        torch.manual_seed(0)
        _, backend = _single_process(Net(), dict(compiler="eager", mode="all", num_groups=4, init=init),
                                     [_global_batch(step) for step in range(3)])
        single = backend.state_dict()["sites"]
        assert single.keys() == r0[init].keys()
        for key in single:  # the v of the global batch
            torch.testing.assert_close(r0[init][key]["vector"], single[key]["vector"], rtol=1e-5, atol=1e-6)
