"""``memory_budget=..., offload=True``: the option, the planner's choice, the graph rewrite, exactness.

Offload runs only on CUDA; on this CPU machine the backend skips it with a reason (checked), and the
tests that exercise the planner and the rewrite patch the device check (``unsupported_reason``) and
give a fake host bandwidth (``offload_bandwidth``): the ops then copy synchronously on CPU, which
checks the graphs (what is offloaded, where the copies go, that gradients stay exact) but not the
overlap, which only a GPU run measures (results/gpu/v12).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import velora_fx
import velora_fx.offload.step as offload_step
from velora_fx import _compat
from velora_fx.config import ConfigError, VeloraConfig
from velora_fx.offload import apply_offload, has_transfers, plan_offload
from velora_fx.offload.plan import MARGIN
from velora_fx.passes.partition_probe import probe_partition
from velora_fx.passes.step_cost import node_seconds
from velora_fx.passes.step_peak import predict_step_peak

OPS = {"offload_start", "offload_finish", "reload_start", "reload_finish"}


class MLPStack(nn.Module):
    def __init__(self, d=64, layers=4, mult=4):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, mult * d), nn.GELU(),
                                                  nn.Linear(mult * d, d)) for _ in range(layers))

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x.pow(2).mean()


def _grads(model, x, backend, steps=2):
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    out = []
    for i in range(steps):
        for p in model.parameters():
            p.grad = None
        loss = compiled(x + i)
        loss.backward()
        out.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    torch._dynamo.reset()
    return out


def _ops_in(gm):
    return [n.target.overloadpacket.__name__ for n in gm.graph.nodes
            if n.op == "call_function" and getattr(n.target, "namespace", None) == "velora_fx"
            and n.target.overloadpacket.__name__ in OPS]


# -- the option ---------------------------------------------------------------------------------
def test_offload_option_is_validated():
    with pytest.raises(ConfigError, match="offload=True needs a memory_budget"):
        VeloraConfig(offload=True)
    with pytest.raises(ConfigError, match="offload must be True or False"):
        VeloraConfig(memory_budget=0.5, offload="yes")
    for bad in (0, -1.0, float("nan"), "fast", True):
        with pytest.raises(ConfigError, match="offload_bandwidth"):
            VeloraConfig(memory_budget=0.5, offload=True, offload_bandwidth=bad)
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="offload_max_bytes"):
            VeloraConfig(memory_budget=0.5, offload=True, offload_max_bytes=bad)
    config = VeloraConfig(memory_budget=0.5, offload=True, offload_bandwidth=20, offload_max_bytes=1 << 30)
    assert config.offload_bandwidth == 20.0 and config.codecs == ("chunked_loss",)  # exact by default
    assert VeloraConfig(memory_budget=0.5).codecs == ("velora", "chunked_loss")
    assert velora_fx.backend(memory_budget=0.5, offload=False).config.offload is False


# -- the ops --------------------------------------------------------------------------------------
def test_ops_round_trip_and_fake_values():
    x = torch.randn(5, 7)
    host = torch.ops.velora_fx.offload_finish(torch.ops.velora_fx.offload_start(x), x)
    assert host.device.type == "cpu" and torch.equal(host, x) and host.data_ptr() != x.data_ptr()
    back = torch.ops.velora_fx.reload_finish(torch.ops.velora_fx.reload_start(host, x.device), host, x.device)
    assert torch.equal(back, x)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.empty(3, 4, dtype=torch.bfloat16)
        ticket = torch.ops.velora_fx.offload_start(fake)
        assert ticket.shape == () and ticket.dtype == torch.int64
        host = torch.ops.velora_fx.offload_finish(ticket, fake)
        assert host.shape == (3, 4) and host.dtype == torch.bfloat16 and host.device.type == "cpu"
        again = torch.ops.velora_fx.reload_finish(torch.ops.velora_fx.reload_start(host, fake.device), host,
                                                  torch.device("meta"))
        assert again.device.type == "meta" and again.shape == (3, 4)


# -- the backend ----------------------------------------------------------------------------------
def test_cpu_skips_offload_with_a_reason_and_keeps_the_exact_plan(strict_pass):
    model, x = MLPStack(), torch.randn(4, 64, 64)
    plain = velora_fx.backend(memory_budget=0.5, compiler="eager")
    reference = _grads(model, x, plain)
    backend = velora_fx.backend(memory_budget=0.5, offload=True, compiler="eager", codecs=plain.config.codecs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _grads(model, x, backend)
    assert any("offload skipped: the graph runs on cpu" in str(w.message) for w in caught)
    graph = backend.report().graphs[-1]
    assert "offload: skipped (the graph runs on cpu; offload needs a CUDA device" in graph.message
    assert graph.offload is None
    for (loss, grads), (ref_loss, ref_grads) in zip(got, reference):
        assert torch.equal(loss, ref_loss)
        assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))


@pytest.fixture
def any_device(monkeypatch):
    """Let offload run on CPU (synchronous copies): the planner and the rewrite, not the overlap."""
    monkeypatch.setattr(offload_step, "unsupported_reason", lambda device: None)


@pytest.mark.parametrize("compiler", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_offload_is_chosen_when_the_copies_fit_and_gradients_stay_exact(strict_pass, any_device, compiler):
    """A fast fake link: the planner offloads (earliest-produced first) and meets the target with less
    recompute; the compiled step's gradients equal plain compilation's (exact), for every step."""
    model, x = MLPStack(), torch.randn(8, 256, 64)  # the MLP's hidden activations: 2 MiB each
    reference = _grads(model, x, "inductor" if compiler == "inductor" else "aot_eager")
    backend = velora_fx.backend(memory_budget=0.5, offload=True, offload_bandwidth=1e6, compiler=compiler)
    got = _grads(model, x, backend)
    graph = backend.report().graphs[-1]
    plan = graph.offload
    assert plan is not None and plan["tensors"], graph.message
    assert plan["offloaded_bytes"] == sum(t["bytes"] for t in plan["tensors"])
    import os
    assert plan["host_limit_bytes"] == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    assert "to host memory at 1e+06 GB/s" in graph.message and "meets" in graph.message
    ends = [t["d2h_end_ms"] for t in plan["tensors"]]
    assert ends == sorted(ends) and ends[-1] <= plan["forward_ms"]
    # the report's saved bytes after are what stays on the GPU, as the predicted peak counts them
    assert graph.saved_bytes_after == graph.predicted_peak["after"]["saved"]
    assert graph.saved_bytes_after + plan["offloaded_bytes"] <= graph.saved_bytes_before
    # measured overlap of the last step: every tensor both ways; a synchronous copy hides nothing
    measured = plan["measured"]
    assert set(measured["tensors"]) == {t["tensor"] for t in plan["tensors"]}
    for row in measured["tensors"].values():
        assert row["out_copy_ms"] > 0 and row["back_copy_ms"] > 0
        assert row["out_stall_ms"] == row["out_copy_ms"] and row["back_stall_ms"] == row["back_copy_ms"]
    assert measured["hidden_share"] == 0.0
    assert measured["out_copy_ms"] == pytest.approx(sum(r["out_copy_ms"] for r in measured["tensors"].values()),
                                                    abs=1e-2)
    for (loss, grads), (ref_loss, ref_grads) in zip(got, reference):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-7)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_inductor_keeps_the_planned_order_of_graphs_with_transfers(strict_pass, any_device, monkeypatch):
    """inductor's peak-memory reorder sees a transfer op as memory-neutral and may put the wait for a
    copy right after its start (compute then stalled for every whole copy: H200, GPT-2, hidden share
    0.52).  The graphs holding transfers compile with that reorder off, every other graph with
    inductor's setting."""
    seen = []
    real = _compat.compile_fx_inner

    def spy(gm, example_inputs, **kwargs):
        seen.append((has_transfers(gm), _compat.inductor_config.reorder_for_peak_memory))
        return real(gm, example_inputs, **kwargs)

    monkeypatch.setattr(_compat, "compile_fx_inner", spy)
    model, x = MLPStack(layers=3), torch.randn(8, 256, 64)
    backend = velora_fx.backend(memory_budget=0.5, offload=True, offload_bandwidth=1e6)
    _grads(model, x, backend, steps=1)
    assert backend.report().graphs[-1].offload["tensors"]
    assert seen == [(True, False), (True, False)]  # forward, then backward
    _grads(model, x, velora_fx.backend(memory_budget=0.5), steps=1)
    assert seen[2:] == [(False, True), (False, True)]


def test_host_bound_caps_what_is_offloaded(strict_pass, any_device):
    """``offload_max_bytes`` bounds the host bytes: below the smallest candidate nothing goes, and the
    skipped candidates say the bound is why."""
    model, x = MLPStack(), torch.randn(8, 256, 64)
    backend = velora_fx.backend(memory_budget=0.5, offload=True, offload_bandwidth=1e6, offload_max_bytes=1 << 20,
                                compiler="eager")
    _grads(model, x, backend, steps=1)
    plan = backend.report().graphs[-1].offload
    assert plan["host_limit_bytes"] == 1 << 20 and plan["offloaded_bytes"] == 0
    assert plan["before_recompute"]["offloadable_bytes"] == 0
    assert "the host memory bound (offload_max_bytes) is reached" in plan["before_recompute"]["skipped"].values()


def test_offload_is_not_chosen_when_the_link_is_too_slow(strict_pass, any_device):
    """A link so slow that no copy fits inside the step's compute: nothing offloaded before or after recompute, each
    candidate says why, and the plan is the exact plan without offload."""
    model, x = MLPStack(), torch.randn(8, 256, 64)
    backend = velora_fx.backend(memory_budget=0.5, offload=True, offload_bandwidth=1e-6, compiler="eager")
    _grads(model, x, backend, steps=1)
    graph = backend.report().graphs[-1]
    plan = graph.offload
    assert plan is not None and not plan["tensors"] and plan["offloaded_bytes"] == 0
    assert plan["before_recompute"]["offloadable_bytes"] == 0 and plan["measured"] is None
    assert "offload: none needed on the final partition" in graph.message
    skipped = plan["before_recompute"]["skipped"]
    assert skipped and any("would not end before forward does" in why for why in skipped.values())
    exact = velora_fx.backend(memory_budget=0.5, codecs=("chunked_loss",), compiler="eager")
    _grads(model, x, exact, steps=1)
    assert exact.report().graphs[-1].saved_bytes_after == graph.saved_bytes_after
    assert exact.report().graphs[-1].recompute_budget == graph.recompute_budget



def test_offload_and_recompute_are_fitted_together(strict_pass, any_device):
    """Offload is measured on each partition the knapsack search tries, so recompute covers only what
    offload cannot move: the more host memory offload may use, the less recompute (a higher knapsack
    budget), and every plan meets the target with what stays on the device."""
    model, x = MLPStack(), torch.randn(8, 256, 64)  # hidden activations of 2 MiB each
    budgets = []
    for limit in (0, 2 << 20, 4 << 20, None):
        backend = velora_fx.backend(memory_budget=0.3, offload=True, offload_bandwidth=1e6,
                                    offload_max_bytes=limit, compiler="eager")
        _grads(model, x, backend, steps=1)
        graph = backend.report().graphs[-1]
        plan = graph.offload
        assert graph.saved_bytes_after <= graph.budget_target, graph.message
        assert graph.saved_bytes_after == graph.predicted_peak["after"]["saved"]
        assert limit is None or plan["offloaded_bytes"] <= limit
        # credited with what it takes off the predicted peak, never more than it moves
        assert plan["offloaded_bytes"] == 0 or 0 < plan["peak_freed_bytes"] <= plan["offloaded_bytes"]
        budgets.append((graph.recompute_budget, plan["offloaded_bytes"]))
    assert budgets == sorted(budgets), budgets  # more host memory: more offloaded and less recompute
    assert budgets[0][1] == 0 and budgets[-1][0] > budgets[0][0] and budgets[-1][1] > 2 << 20

# -- the planner on a partition ------------------------------------------------------------------
class _Capture(_compat.CustomPartitionerFn):
    """Records the partition inductor's partitioner makes (and makes it)."""

    def __init__(self):
        self.captured = {}

    def __call__(self, gm, joint_inputs, **kwargs):
        self.captured["saved"] = probe_partition(gm, joint_inputs, _compat.min_cut_rematerialization_partition,
                                                 **kwargs)
        self.captured["num_fwd_outputs"] = kwargs["num_fwd_outputs"]
        return _compat.min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)

    def uuid(self):
        return f"test_offload:{id(self)}"


def _partition(model, x):
    """The min-cut partition of ``model``'s joint graph (forward and backward graphs, saved set)."""
    capture = _Capture()
    torch._dynamo.reset()
    with _compat.custom_partitioner(capture), _compat.autograd_cache_disabled():
        torch.compile(model, backend="inductor")(x).backward()
    torch._dynamo.reset()
    return capture.captured["saved"], capture.captured["num_fwd_outputs"]


@settings(max_examples=6, deadline=None)
@given(layers=st.integers(2, 5), width=st.sampled_from([32, 64]), bandwidth=st.sampled_from([1e9, 1e11, 1e13]),
       need_share=st.floats(0.1, 1.0), limit_share=st.one_of(st.none(), st.floats(0.0, 1.0)))
def test_plan_keeps_its_invariants(layers, width, bandwidth, need_share, limit_share):
    """For random stacks, links and targets: copies to the host run one after another and end before
    forward does; copies back end before their first reader, start no earlier than backward and no later
    than planned (before the node running at the planned start); the
    earliest-produced tensors go first; partial views, non-contiguous and small tensors are never chosen;
    the host bound and the need are kept (the need overshot by one tensor at most)."""
    torch.manual_seed(0)
    saved, num_fwd_outputs = _partition(MLPStack(width, layers), torch.randn(2, 128, width))
    total = saved.activation_bytes
    need = int(need_share * total)
    limit = None if limit_share is None else int(limit_share * total)
    plan = plan_offload(saved, num_fwd_outputs, need, bandwidth, limit, min_bytes=1 << 14)
    order = {n.name: i for i, n in enumerate(saved.fwd.graph.nodes)}
    border = {n.name: i for i, n in enumerate(saved.bwd.graph.nodes)}
    fwd_nodes = {n.name: n for n in saved.fwd.graph.nodes}
    bwd_seconds = node_seconds(saved.bwd)
    bwd_start, elapsed = {}, 0.0
    for n, spent in bwd_seconds.items():
        bwd_start[n.name], elapsed = elapsed, elapsed + spent
    clock = 0.0
    for c in plan.chosen:
        node = fwd_nodes[c.name]
        assert node.meta["val"].is_contiguous() and c.bytes >= 1 << 14
        assert order[c.start_after] <= order[c.finish_after]
        assert border[c.reload_before] <= border[c.first_use]
        # the copy back starts before the node running at its planned start, not after it
        assert bwd_start[c.reload_before] <= c.reload_start + 1e-12
        assert c.d2h_end <= plan.forward_seconds + 1e-12 and c.reload_start >= 0
        assert c.d2h_end >= clock + c.bytes * MARGIN / bandwidth - 1e-12  # one copy after another
        clock = c.d2h_end
    if limit is not None:
        assert plan.bytes <= limit
    largest = max((c.bytes for c in plan.chosen), default=0)
    assert plan.bytes < need + largest or not plan.chosen
    starts = [order[c.start_after] for c in plan.chosen]
    assert starts == sorted(starts)


def test_plan_rewrite_runs_exactly_and_the_peak_counts_only_the_gpu():
    """The rewritten forward and backward graphs compute what the originals do; the predicted step
    peak's saved set drops by the offloaded bytes."""
    torch.manual_seed(0)
    model, x = MLPStack(64, 3), torch.randn(2, 128, 64)
    saved, num_fwd_outputs = _partition(model, x)
    before = predict_step_peak(saved)
    plan = plan_offload(saved, num_fwd_outputs, saved.activation_bytes, 1e15, min_bytes=1 << 14)
    assert plan.chosen
    _assert_rewrite_is_exact(saved, num_fwd_outputs, plan)
    assert sorted(set(_ops_in(saved.fwd))) == ["offload_finish", "offload_start"]
    assert sorted(set(_ops_in(saved.bwd))) == ["reload_finish", "reload_start"]
    assert len(_ops_in(saved.fwd)) == 2 * len(plan.chosen)
    after = predict_step_peak(saved)
    assert after.saved == before.saved - plan.bytes


class NormLinear(nn.Module):
    """Saves the LayerNorm output as a 2-D reshape (a view spanning its whole storage), as
    transformers' projections on [batch, tokens, hidden] inputs do."""

    def __init__(self, d=64):
        super().__init__()
        self.norm, self.fc, self.out = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return (x + self.out(torch.relu(self.fc(self.norm(x))))).square().mean()


def test_a_saved_reshape_of_a_whole_tensor_is_offloaded_exactly():
    """A saved view that spans its base's whole storage (no other output on it) is offloaded (its
    memory goes when the copy ends); a view of a graph input is not; the rewrite stays exact."""
    from velora_fx.passes.partition_probe import alias_base
    torch.manual_seed(0)
    saved, num_fwd_outputs = _partition(NormLinear(), torch.randn(2, 256, 64))
    plan = plan_offload(saved, num_fwd_outputs, saved.activation_bytes, 1e15, min_bytes=1 << 14)
    nodes = {n.name: n for n in saved.fwd.graph.nodes}
    views = [c.name for c in plan.chosen if alias_base(nodes[c.name]) is not nodes[c.name]]
    assert views, (plan.chosen, plan.skipped)
    _assert_rewrite_is_exact(saved, num_fwd_outputs, plan)


def _assert_rewrite_is_exact(saved, num_fwd_outputs, plan):
    """Rewrite ``saved``'s graphs with ``plan`` (in place) and check that forward and backward compute
    bitwise what the originals do on the same real inputs."""
    import copy
    fwd, bwd = copy.deepcopy(saved.fwd), copy.deepcopy(saved.bwd)
    apply_offload(saved.fwd, saved.bwd, plan)
    inputs = [torch.randn(n.meta["val"].shape, dtype=n.meta["val"].dtype) if n.meta["val"].is_floating_point()
              else torch.zeros(n.meta["val"].shape, dtype=n.meta["val"].dtype)
              for n in fwd.graph.find_nodes(op="placeholder")]
    want, got = fwd(*inputs), saved.fwd(*inputs)
    assert len(want) == len(got)
    assert all(torch.equal(a, b) for a, b in zip(want, got) if isinstance(a, torch.Tensor))
    tangents = [torch.ones(()) for _ in range(num_fwd_outputs)]
    saved_values = list(want[num_fwd_outputs:])
    names = [n.name for n in bwd.graph.find_nodes(op="placeholder")]
    assert len(names) == len(saved_values) + len(tangents)
    grads_want = bwd(*saved_values, *tangents)
    grads_got = saved.bwd(*list(got[num_fwd_outputs:]), *tangents)
    assert all(torch.equal(a, b) for a, b in zip(grads_want, grads_got) if isinstance(a, torch.Tensor))


def test_a_reloaded_tensor_counts_from_its_reload_start():
    """The peak counts a reloaded tensor from ``reload_start``, which allocates its device buffer
    (counting it from ``reload_finish`` read GPT-2's backward peak low).  With every copy back started
    at the top of backward, the backward peak is the one without offload; started later, it is no
    higher, and the forward's is unchanged."""
    import dataclasses
    torch.manual_seed(0)
    saved, num_fwd_outputs = _partition(MLPStack(64, 3), torch.randn(2, 128, 64))
    before = predict_step_peak(saved)
    plan = plan_offload(saved, num_fwd_outputs, saved.activation_bytes, 1e15, min_bytes=1 << 14)
    assert plan.chosen
    top = next(n.name for n in saved.bwd.graph.nodes if n.op != "placeholder")
    import copy
    early = copy.copy(saved)
    early.fwd, early.bwd = copy.deepcopy(saved.fwd), copy.deepcopy(saved.bwd)
    apply_offload(early.fwd, early.bwd, dataclasses.replace(
        plan, chosen=[dataclasses.replace(c, reload_before=top) for c in plan.chosen]))
    apply_offload(saved.fwd, saved.bwd, plan)
    at_top, planned = predict_step_peak(early), predict_step_peak(saved)
    assert at_top.backward == before.backward and at_top.forward == planned.forward
    assert planned.backward <= at_top.backward


@settings(max_examples=6, deadline=None)
@given(layers=st.integers(1, 4), width=st.sampled_from([32, 64]), view=st.booleans(),
       bandwidth=st.sampled_from([1e11, 1e13, 1e15]), need_share=st.floats(0.1, 1.0))
# the inserted transfers once moved a residual add across ``REACH`` (its reads counted in graph nodes,
# transfers included): the rewritten forward's peak read 665600 bytes against the plan's 731136
@example(layers=3, width=32, view=False, bandwidth=1e13, need_share=1.0)
def test_a_planned_offload_is_predicted_as_the_rewrite_runs(layers, width, view, bandwidth, need_share):
    """The chooser weighs a partition by the peak its offload plan leaves, before the plan is in the
    graphs: ``predict_step_peak(saved, offload=plan.chosen)`` equals the prediction on the rewritten
    graphs, for random stacks (saved reshapes of whole tensors included), links and needs."""
    import copy
    torch.manual_seed(0)
    model = nn.Sequential(*[NormLinear(width) for _ in range(layers)]) if view else MLPStack(width, layers)
    if view:
        model.forward = lambda x, blocks=list(model): sum(b(x) for b in blocks)
    saved, num_fwd_outputs = _partition(model, torch.randn(2, 256, width))
    plan = plan_offload(saved, num_fwd_outputs, int(need_share * saved.activation_bytes), bandwidth,
                        min_bytes=1 << 14)
    virtual = predict_step_peak(saved, offload=plan.chosen)
    rewritten = copy.copy(saved)
    rewritten.fwd, rewritten.bwd = copy.deepcopy(saved.fwd), copy.deepcopy(saved.bwd)
    apply_offload(rewritten.fwd, rewritten.bwd, plan)
    assert virtual == predict_step_peak(rewritten)
    if plan.chosen:
        assert virtual.saved == predict_step_peak(saved).saved - plan.bytes


def test_node_seconds_sums_to_the_step_estimate():
    from velora_fx.passes.step_cost import graph_cost
    saved, _ = _partition(MLPStack(64, 2), torch.randn(2, 64, 64))
    for gm in (saved.fwd, saved.bwd):
        assert sum(node_seconds(gm).values()) == pytest.approx(graph_cost(gm).seconds, rel=1e-9)


# -- the two rate bugs the GPU runs found (results/gpu/v12/failure_modes) --------------------------
def test_rates_are_measured_on_real_tensors_and_cached(tmp_path, monkeypatch):
    """The partition step runs under a fake mode, where a timed copy takes no time (the link read
    650-1370 GB/s on an H200): the measurement must run on real tensors, once, then come from disk."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from velora_fx.offload import bandwidth
    monkeypatch.setattr(bandwidth, "_cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    calls = []

    def measure():
        calls.append(torch.empty(4))
        return 55e9

    device = torch.device("cuda", 0)
    with FakeTensorMode():
        assert bandwidth._cached(device, "host_bytes_per_second", measure) == 55e9
    assert len(calls) == 1 and not isinstance(calls[0], FakeTensor)
    assert bandwidth._cached(device, "host_bytes_per_second", measure) == 55e9 and len(calls) == 1
    assert (tmp_path / "device_rates_Test_GPU.json").exists()


def test_each_matmul_is_timed_at_its_own_dtypes_rate():
    """A bf16 model runs a small fp32 matmul first (Llama's rotary frequencies) and an fp32 state
    input: each matmul is timed at its own result's dtype's rate.  Timing every matmul at the first
    one's dtype (fp32) made an H200 Llama forward 12x too long and the step 2.55x slower (v13)."""
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda state, f, x, w: (state.sum(), f @ f, x @ w))(
        torch.zeros(4, 4), torch.randn(4, 4), torch.randn(64, 128, dtype=torch.bfloat16),
        torch.randn(128, 64, dtype=torch.bfloat16))
    rates = {torch.float32: (1e12, 1e12), torch.bfloat16: (1e14, 1e12)}
    seconds = node_seconds(gm, rates.__getitem__)
    mms = [n for n in gm.graph.nodes if n.target == torch.ops.aten.mm.default]
    assert seconds[mms[0]] == pytest.approx(2 * 4**3 / 1e12 + 0)  # its result is read by nobody: FLOPs only
    assert seconds[mms[1]] == pytest.approx(2 * 64 * 128 * 64 / 1e14)
