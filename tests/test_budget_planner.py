"""``memory_budget``'s joint plan choice (passes/budget.py, passes/step_cost.py).

The planner weighs exact recompute against the codecs: each plan gets the least recompute meeting
the target, is priced by the roofline step estimate plus ``error_cost`` x its weighted error, and
the cheapest plan that meets the target wins.  Checked here: the estimate counts a matmul's FLOPs
exactly and charges recompute; the choice is the cheapest met plan and pruned plans could not have
won; a large ``error_cost`` gives the exact plan with gradients equal to plain compilation; no
``error_cost`` gives the fastest plan; the report's saved bytes are the partition's."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from pass_helpers import square_loss_step
from test_gated import GatedMLP

import velora_fx
from velora_fx import _compat
from velora_fx.passes import budget
from velora_fx.passes.budget import PlanOption, choose_plan
from velora_fx.passes.partition_probe import SavedSet
from velora_fx.passes.step_cost import estimate_step, graph_cost

CODECS = ("velora", "fewbit", "gated")


def _traced_mm(m, k, n, dtype=torch.float32):
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(lambda a, b: torch.mm(a, b).relu() + 1, tracing_mode="fake")(
        torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype))


@pytest.mark.parametrize("m,k,n", [(4, 8, 16), (32, 64, 8)])
def test_step_cost_counts_matmul_flops_and_output_bytes(m, k, n):
    gm = _traced_mm(m, k, n)
    cost = graph_cost(gm)
    assert cost.flops == 2 * m * k * n
    # the output (m x n fp32) is written and read once; relu's result fuses into the add
    assert cost.bytes == 2 * m * n * 4
    assert cost.seconds > 0


def _saved(nbytes, gm):
    return SavedSet({"a": "a"}, {}, {"a": nbytes}, gm, gm)


def test_choice_is_the_cheapest_plan_that_meets_the_target():
    """Three synthetic plans: the cheap one misses the target, the lossy one is fastest but its
    error makes it dearer than the exact one at error_cost 1, cheaper at error_cost 0."""
    small, large, other = _traced_mm(8, 8, 8), _traced_mm(64, 64, 64), _traced_mm(8, 8, 8)
    ratio = graph_cost(large).seconds / graph_cost(small).seconds
    assert ratio > 10
    options = [PlanOption("exact", large, _saved(100, large), 0.0),
               PlanOption("lossy", small, _saved(100, small), ratio),  # error worth `ratio` step times
               PlanOption("unreachable", other, _saved(10_000, other), 0.0)]
    probe = lambda gm: _saved(100 if gm is not options[2].gm else 10_000, gm)  # noqa: E731
    best, evaluated = choose_plan(options, target=500, probe=probe, baseline=_saved(100, small), error_cost=1.0)
    assert best.option.name == "exact"
    scores = {c.option.name: c for c in evaluated}
    assert not scores["unreachable"].fit.met
    assert scores["lossy"].score > best.score
    best, _ = choose_plan(options, target=500, probe=probe, baseline=_saved(100, small), error_cost=0.0)
    assert best.option.name == "lossy"
    best, _ = choose_plan(options, target=5, probe=probe, baseline=_saved(100, small), error_cost=0.0)
    assert not best.fit.met and best.fit.saved.activation_bytes == 100  # none fits: fewest bytes


def test_a_plan_is_given_up_once_a_missed_budget_costs_more_than_the_winner():
    """The lossy plan's first partition misses the target at a cost above the exact plan's fitted
    score: a lower budget recomputes more, so its search stops there (one partition, not fitted)."""
    small, medium, large = _traced_mm(8, 8, 8), _traced_mm(16, 16, 16), _traced_mm(64, 64, 64)
    medium_ratio = graph_cost(medium).seconds / graph_cost(small).seconds
    exact = PlanOption("exact", medium, _saved(1000, small), 0.0)
    lossy = PlanOption("lossy", large, _saved(1000, small), (medium_ratio - 1) / 2)  # cheap before recompute
    calls = {"exact": 0, "lossy": 0}

    def probe(gm):
        budget = _compat.current_recompute_budget()
        if gm is medium:
            calls["exact"] += 1
            return _saved(int(1000 * budget), medium)
        calls["lossy"] += 1
        return _saved(600 + int(400 * budget), large)  # misses 500 above budget 0, at a high cost
    best, evaluated = choose_plan([exact, lossy], target=500, probe=probe, baseline=_saved(100, small),
                                  error_cost=1.0)
    assert best.option.name == "exact" and best.fit.met
    (row,) = [c for c in evaluated if c.option.name == "lossy"]
    assert row.fit is None and calls["lossy"] == 1 and row.score >= best.score
    assert not row.to_dict(False)["fitted"]


def _grads(model, x, backend):
    return square_loss_step(model, x, backend)[1]


def _budget_graph(backend):
    (graph,) = backend.report().graphs
    return graph


@pytest.mark.parametrize("budget", [0.5, 0.8])
def test_budget_choice_is_consistent_with_its_report(strict_pass, budget):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    backend = velora_fx.backend(codecs=CODECS, mode="max_memory", memory_budget=budget, compiler="eager",
                                error_cost=0.0)
    _grads(model, x, backend)
    graph = _budget_graph(backend)
    plans = graph.budget_plans
    assert len(plans) >= 2 and plans[0]["plan"] == "exact", plans
    (chosen,) = [p for p in plans if p["chosen"]]
    met = [p for p in plans if p["met"]]
    if met:
        assert chosen["met"] and chosen["score"] == min(p["score"] for p in met)
        assert graph.saved_bytes_after <= graph.budget_target
    for p in plans:
        if not p["fitted"]:  # pruned: its cost before (or during) recompute already reached the winner's
            assert p["score"] >= chosen["score"]
    assert graph.saved_bytes_after == chosen["saved_bytes"]
    compressed = [s for s in graph.sites if s.decision == "compressed"]
    if chosen["plan"] == "exact":
        assert not compressed
    else:
        assert compressed and all(s.codec in chosen["plan"] for s in compressed)
    skipped_by_budget = [s for s in graph.sites if s.reason.startswith("memory_budget: plan")]
    assert all(s.decision == "skipped" for s in skipped_by_budget)


def test_large_error_cost_keeps_every_gradient_exact(strict_pass):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    ref = _grads(model, x, None)  # eager
    backend = velora_fx.backend(codecs=CODECS, mode="max_memory", memory_budget=0.5, compiler="eager",
                                error_cost=1e6)
    grads = _grads(model, x, backend)
    graph = _budget_graph(backend)
    assert [p["plan"] for p in graph.budget_plans if p["chosen"]] == ["exact"]
    assert graph.saved_bytes_after <= graph.budget_target, graph.message
    assert not [s for s in graph.sites if s.decision == "compressed"]
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_recompute_costs_more_than_keeping(strict_pass):
    """The exact plan under a tight budget recomputes: its estimate is above the baseline's."""
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    backend = velora_fx.backend(codecs=("velora",), memory_budget=0.3, compiler="eager", error_cost=1e6)
    _grads(model, x, backend)
    graph = _budget_graph(backend)
    (exact,) = [p for p in graph.budget_plans if p["plan"] == "exact"]
    assert exact["recompute_budget"] < 1.0 and exact["estimated_time_ratio"] > 1.0, exact


def test_error_cost_is_validated():
    with pytest.raises(velora_fx.ConfigError, match="error_cost"):
        velora_fx.backend(error_cost=-1)


def test_attention_is_priced_by_its_flops():
    """Attention is priced by its FLOPs (4 per query-key-dim triple forward), also for the CPU
    kernels torch's flop counter has no formula for, and with keys longer than queries."""
    from torch.fx.experimental.proxy_tensor import make_fx
    q, kv = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 32, 8)
    gm = make_fx(lambda a, b: torch.nn.functional.scaled_dot_product_attention(a, b, b),
                 tracing_mode="fake")(q, kv)
    assert isinstance(gm, fx.GraphModule)
    assert estimate_step(gm, gm).flops == 2 * 4 * (2 * 4 * 16 * 32 * 8)


def test_report_table_lists_the_plans(strict_pass):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    backend = velora_fx.backend(codecs=CODECS, memory_budget=0.5, compiler="eager")
    _grads(model, x, backend)
    table = backend.report().table()
    plans = _budget_graph(backend).budget_plans
    assert sum(line.startswith("  * plan ") for line in table.splitlines()) == 1
    for p in plans:
        assert f"plan {p['plan']}:" in table


def _bisection(curve, current: int, target: int) -> float | None:
    """The search ``fit_recompute_budget`` replaced: the floor, then 5 halvings of [0, 1]."""
    if current <= target:
        return 1.0
    if curve(0.0) > target:
        return None
    low, high, best = 0.0, 1.0, 0.0
    for _ in range(5):
        mid = (low + high) / 2
        if curve(mid) <= target:
            low = best = mid
        else:
            high = mid
    return best


def _curves():
    """Saved bytes against the knapsack budget as inductor's look: linear stretches, plateaus (a
    recompute level that holds over a range of budgets) and jumps between them."""
    yield lambda b: int(1000 * b)
    yield lambda b: int(1000 * b) if b <= 0.42 else 750           # knapsack, then a plateau above target
    yield lambda b: int(400 * b) if b <= 0.3 else 600 if b <= 0.7 else 900
    yield lambda b: 0 if b < 0.9 else 1000                       # one jump near the top
    yield lambda b: int(5 + 1000 * b * b)
    for seed in range(60):  # random monotone step curves
        rng = torch.Generator().manual_seed(seed)
        points = torch.rand(int(torch.randint(1, 10, (1,), generator=rng)), generator=rng).tolist()
        jumps = (torch.rand(len(points), generator=rng) ** 3).tolist()
        slope = float(torch.rand(1, generator=rng)) * (seed % 2)
        yield lambda b, p=points, j=jumps, s=slope: int(1000 * (s * b + sum(x for q, x in zip(p, j) if b >= q)))


def test_budget_search_finds_what_bisection_found_in_fewer_partitions():
    """On monotone curves the guided search returns bisection's budget (the largest on the 1/32 grid
    that meets the target), and partitions less often on average (no floor partition unless the
    grid has no answer)."""
    ours, theirs = [], []
    for curve in _curves():
        top = curve(1.0)
        for target in (0, top // 7, top // 3, top // 2, 2 * top // 3, top - 1):
            calls = [0]

            def probe(curve=curve, calls=calls):
                calls[0] += 1
                return _saved(curve(_compat.current_recompute_budget()), None)
            fit = budget.fit_recompute_budget(probe, _saved(top + 1, None), target)
            expected = _bisection(curve, top + 1, target)
            assert (fit.recompute_budget if fit.met else None) == expected, (target, fit)
            assert fit.saved.activation_bytes <= target or not fit.met
            assert calls[0] <= 15  # at most three partitions per halving
            ours.append(calls[0])
            theirs.append(6)
    assert sum(ours) < 0.85 * sum(theirs), (sum(ours), sum(theirs))


def test_budget_search_on_inductors_curve_takes_few_partitions():
    """Saved bytes as inductor's knapsack gives them (12-layer Llama-like, exact plan, per 1/32 of
    budget): a ragged near-linear stretch up to a switch budget, flat levels above it, the default
    level at 1.  Once a partition below 1 has named the switches (13.5/32, 15.5/32), the search
    tries the budgets on either side of the jump: three partitions where bisection took six."""
    ragged = [0, 82, 97, 112, 127, 142, 157, 106, 121, 136, 151, 101, 115, 131]
    curve = ragged + [334, 334] + [360] * 16 + [611]
    calls = []

    def probe():
        k = round(_compat.current_recompute_budget() * 32)
        calls.append(k)
        saved = _saved(curve[k], None)
        saved.switches = () if k in (0, 32) else (15.5 / 32,) if k > 15 else (13.5 / 32, 15.5 / 32)
        return saved
    fit = budget.fit_recompute_budget(probe, _saved(curve[32], None), 240)
    assert fit.met and fit.recompute_budget == 13 / 32 and calls == [12, 14, 13]
    calls.clear()
    fit = budget.fit_recompute_budget(probe, _saved(curve[32], None), 366)  # the flat level meets it
    assert fit.met and fit.recompute_budget == 31 / 32 and calls == [19, 31]


def test_budget_search_on_a_linear_curve_takes_two_partitions():
    calls = [0]

    def probe():
        calls[0] += 1
        return _saved(int(1000 * _compat.current_recompute_budget()), None)
    fit = budget.fit_recompute_budget(probe, _saved(1000, None), 600)
    assert fit.met and fit.recompute_budget == 19 / 32 and calls[0] == 2


def _measured(points: dict[int, int], switches: tuple[float, ...], top_bytes: int):
    """A probe replaying the exact plan's partitions measured on compile_time.py's 12-layer models."""
    calls = []

    def probe():
        k = round(_compat.current_recompute_budget() * 32)
        calls.append(k)
        saved = _saved(points[k], None)
        saved.switches = switches
        return saved
    return probe, calls, _saved(top_bytes, None)


@pytest.mark.parametrize("points, switches, top_bytes, target, answer, before", [
    ({9: 136314880, 12: 180879360, 13: 195559424, 14: 334073856}, (0.4212, 0.4755), 610635776, 189031936,
     12, [9, 14, 13, 12]),  # Llama
    ({9: 151519232, 11: 185073664, 12: 218628096, 13: 235405312, 14: 346755072}, (0.4301, 0.471), 654684160,
     196280320, 11, [9, 14, 13, 11, 12]),  # GPT-2
])
def test_budget_search_scales_below_a_switch_and_stops_close_to_the_target(
        monkeypatch, points, switches, top_bytes, target, answer, before):
    """Below a switch the search scales a met budget's bytes to the target and stops at a budget
    within ``_CLOSE`` whose next grid budget the proportion says misses: two partitions, the
    budget the search without these rules found (on the partitions measured on the 12-layer
    models, the knapsack budget and so the plan ``memory_budget`` chooses there are unchanged)."""
    probe, calls, current = _measured(points, switches, top_bytes)
    fit = budget.fit_recompute_budget(probe, current, target)
    assert fit.met and fit.recompute_budget == answer / 32 and calls == [9, answer]
    monkeypatch.setattr(budget, "_settled", lambda *a: False)
    monkeypatch.setattr(budget, "_CLOSE", -1.0)
    calls.clear()
    fit = budget.fit_recompute_budget(probe, current, target)
    assert fit.met and fit.recompute_budget == answer / 32 and len(calls) < len(before) and calls[0] == 9


def test_budget_search_fits_what_the_kept_measure_leaves():
    """With a ``kept`` measure (offload: what a partition keeps on the device once offload took what
    its compute covers), the search fits recompute to that measure on each partition: here offload
    takes up to 300 bytes of any partition, so a target of 600 needs partitions of 900 bytes, not 600."""
    def probe():
        return _saved(int(1000 * _compat.current_recompute_budget()), None)

    def kept(saved):
        return max(600, saved.activation_bytes - 300)
    fit = budget.fit_recompute_budget(probe, _saved(1000, None), 600, kept=kept)
    assert fit.met and fit.recompute_budget == 28 / 32 and fit.kept_bytes == 600
    assert fit.saved.activation_bytes == 875 and "600 <= 600 bytes" in fit.message()
    alone = budget.fit_recompute_budget(probe, _saved(1000, None), 600)
    assert alone.recompute_budget == 19 / 32 and alone.kept_bytes == alone.saved.activation_bytes
    assert budget.fit_recompute_budget(probe, _saved(1000, None), 600, kept=lambda s: 0).recompute_budget == 1.0
