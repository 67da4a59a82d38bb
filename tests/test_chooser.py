"""``memory_budget``'s one chooser (passes/chooser.py, passes/candidates.py).

Checked here: the greedy selection never takes a candidate priced at or above recompute, takes the
cheapest first, one per storage, and frees the bytes asked for whenever the cheaper candidates can
(hypothesis); on a real graph, a candidate made cheaper than recompute is chosen and one made dearer
is not, and the report's candidate rows say so with the bytes the partition and the codec's own
accounting give; an exact plan trains exactly; a plan row says whether it was skipped or given up."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pass_helpers import square_loss_step
from test_budget_planner import _saved, _traced_mm
from test_gated import GatedMLP

import velora_fx
from velora_fx import _compat
from velora_fx.passes import chooser
from velora_fx.passes.budget import PlanOption, choose_plan
from velora_fx.passes.candidates import Candidate
from velora_fx.passes.chooser import recompute_price, select
from velora_fx.passes.graph_utils import tensor_val
from velora_fx.passes.step_cost import graph_cost

CODECS = ("velora", "fewbit", "gated")


def _candidate(i: int, freed: int, time: float, error: float = 0.0, frees: tuple[str, ...] | None = None):
    return Candidate(decision=i, tensor=f"t{i}", codec="gated", frees=frees or (f"t{i}",), bytes_freed=freed,
                     time_ratio=time, error=error)


# -- the selection ----------------------------------------------------------------------------------

def test_select_takes_what_is_cheaper_than_recompute_cheapest_first():
    cheap, dear, cheaper = _candidate(0, 100, 0.01), _candidate(1, 100, 1.0), _candidate(2, 100, 0.001)
    picks = select([cheap, dear, cheaper], recompute=1e-3, needed=150, error_cost=1.0)
    assert [s.selected for s in picks] == [True, False, True]
    assert "not below recompute" in picks[1].why
    # enough freed by the cheapest one: the next is not needed
    picks = select([cheap, dear, cheaper], recompute=1e-3, needed=100, error_cost=1.0)
    assert [s.selected for s in picks] == [False, False, True] and picks[0].why.startswith("not needed")
    # the error counts at error_cost: a cheap but lossy candidate is priced out
    picks = select([_candidate(0, 100, 0.0, error=1.0)], recompute=1e-3, needed=100, error_cost=1.0)
    assert not picks[0].selected
    assert select([_candidate(0, 100, 0.0, error=1.0)], recompute=1e-3, needed=100, error_cost=0.0)[0].selected


def test_select_takes_one_candidate_per_storage_and_none_that_frees_nothing():
    a, b = _candidate(0, 100, 0.001, frees=("x",)), _candidate(1, 100, 0.002, frees=("x",))
    none = _candidate(2, 0, 0.0)
    picks = select([a, b, none], recompute=1.0, needed=1000, error_cost=1.0)
    assert [s.selected for s in picks] == [True, False, False]
    assert "already frees its storage" in picks[1].why and picks[2].why == "frees no predicted bytes"


_lists = st.lists(st.tuples(st.integers(-10, 1000), st.floats(0, 1), st.floats(0, 1)), max_size=12)


@given(items=_lists, recompute=st.floats(0, 0.01) | st.just(math.inf), needed=st.integers(-10, 5000),
       error_cost=st.sampled_from([0.0, 1.0, 10.0]))
def test_selection_never_pays_more_than_recompute_and_meets_the_target_when_it_can(items, recompute, needed,
                                                                                    error_cost):
    candidates = [_candidate(i, freed, time, error) for i, (freed, time, error) in enumerate(items)]
    picks = select(candidates, recompute, needed, error_cost)
    chosen = [s for s in picks if s.selected]
    assert all(s.price < recompute and s.candidate.bytes_freed > 0 for s in chosen)
    cheaper = [c for c in candidates if c.bytes_freed > 0 and c.price(error_cost) < recompute]
    freed = sum(s.candidate.bytes_freed for s in chosen)
    if sum(c.bytes_freed for c in cheaper) >= needed:
        assert freed >= needed
    else:
        assert len(chosen) == len(cheaper)  # all of them, recompute does the rest
    if chosen:  # cheapest first, and no more than needed: without the dearest pick the target is missed
        dearest = max(s.price for s in chosen)
        assert all(c.price(error_cost) >= dearest for c in cheaper if c not in [s.candidate for s in chosen])
        assert freed - max(s.candidate.bytes_freed for s in chosen if s.price == dearest) < needed


def test_recompute_price_is_the_fits_time_per_byte_removed():
    small, large = _traced_mm(8, 8, 8), _traced_mm(64, 64, 64)
    base = graph_cost(small).seconds * 2  # estimate_step(fwd, bwd) of the baseline: both graphs
    unfitted, fitted = _saved(1000, small), _saved(400, large)
    added = 2 * (graph_cost(large).seconds - graph_cost(small).seconds)
    assert recompute_price(unfitted, fitted, True, base) == pytest.approx(added / base / 600)
    assert recompute_price(unfitted, unfitted, True, base) == 0.0  # nothing recomputed: nothing to buy
    assert recompute_price(unfitted, fitted, False, base) == math.inf  # recompute alone cannot meet it


# -- plan rows: skipped and given up ---------------------------------------------------------------

def test_plan_rows_say_skipped_or_given_up():
    """Exact fits; the lossy plan's first partition misses the target at a cost past exact's (given
    up); the expensive plan costs more than exact before any recompute (skipped)."""
    small, medium, large = _traced_mm(8, 8, 8), _traced_mm(16, 16, 16), _traced_mm(64, 64, 64)
    medium_ratio = graph_cost(medium).seconds / graph_cost(small).seconds
    exact = PlanOption("exact", medium, _saved(1000, small), 0.0)
    lossy = PlanOption("lossy", large, _saved(1000, small), (medium_ratio - 1) / 2)
    expensive = PlanOption("expensive", large, _saved(1000, large), 0.0)

    def probe(gm):
        budget = _compat.current_recompute_budget()
        return _saved(int(1000 * budget), medium) if gm is medium else _saved(600 + int(400 * budget), large)
    best, evaluated = choose_plan([exact, lossy, expensive], target=500, probe=probe, baseline=_saved(100, small),
                                  error_cost=1.0)
    rows = {c.option.name: c.to_dict(c is best) for c in evaluated}
    assert best.option.name == "exact"
    assert rows["exact"]["status"] == "fitted" and rows["exact"]["fitted"]
    assert rows["lossy"]["status"] == "given up" and not rows["lossy"]["fitted"]
    assert rows["expensive"]["status"] == "skipped" and not rows["expensive"]["fitted"]
    from velora_fx.report import GraphReport, Report
    table = Report([GraphReport(0, "unchanged", budget_plans=list(rows.values()))]).table()
    assert "plan lossy: given up" in table and "plan expensive: not fitted" in table


# -- on a real graph --------------------------------------------------------------------------------

@pytest.fixture
def priced(monkeypatch):
    """Set candidates' prices: ``prices[codec] = (time_ratio, error)`` replaces the estimate, and
    every proposed candidate is recorded with the partition it was priced against."""
    prices, seen = {}, []
    original = chooser.propose

    def propose(decisions, partition_of, nodes, config, base_seconds, weight):
        out = []
        for c in original(decisions, partition_of, nodes, config, base_seconds, weight):
            val = tensor_val(nodes[c.tensor])  # what the codec's own accounting says, before any skip
            codes = c.decision.code_bytes(tuple(int(s) for s in val.shape), val.dtype, config)
            seen.append((c, partition_of(c.decision), codes, c.decision.site.name if c.codec == "gated" else None))
            if c.codec in prices:
                c = dataclasses.replace(c, time_ratio=prices[c.codec][0], error=prices[c.codec][1])
            out.append(c)
        return out
    monkeypatch.setattr(chooser, "propose", propose)
    return prices, seen


def _compile(**options):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    backend = velora_fx.backend(codecs=CODECS, mode="max_memory", compiler="eager", **options)
    grads = square_loss_step(model, x, backend)[1]
    (graph,) = backend.report().graphs
    return model, x, graph, grads


def test_a_candidate_cheaper_than_recompute_is_chosen_and_a_dearer_one_is_not(strict_pass, priced):
    prices, seen = priced
    prices["gated"] = (0.0, 0.0)    # free: below any recompute price
    prices["velora"] = (100.0, 0.0)  # a hundred steps' time: above it
    _, _, graph, _ = _compile(memory_budget=0.5, error_cost=1.0)
    rows = graph.budget_candidates
    assert rows and {r["codec"] for r in rows} >= {"gated", "velora"}
    recompute = rows[0]["recompute_price"]
    assert recompute is not None and recompute > 0
    for r in rows:
        if r["codec"] == "gated" and r["bytes_freed"] > 0:
            assert r["selected"] and r["price"] == 0.0 and "below recompute" in r["why"], r
        if r["codec"] == "velora" and r["bytes_freed"] > 0:
            assert not r["selected"] and r["price"] > recompute and "not below recompute" in r["why"], r
    (weighed,) = [p for p in graph.budget_plans if p["plan"] != "exact"]
    assert weighed["plan"] == "gated"  # the selected subset, weighed against exact
    assert graph.budget_plans[0]["plan"] == "exact" and graph.budget_plans[0]["status"] == "fitted"
    compressed = {s.name for s in graph.sites if s.decision == "compressed"}
    chosen = [r for r in rows if r["chosen"]]
    assert bool(chosen) == weighed["chosen"] and all(r["selected"] for r in chosen)
    # a chosen row is a compressed site, and the rest say why memory_budget skipped them
    names = {c.tensor: name for c, _, _, name in seen if name is not None}
    assert {names[r["tensor"]] for r in chosen} == {n for n in compressed if n in names.values()}
    for s in graph.sites:
        if s.name in names.values() and s.name not in compressed and s.reason.startswith("memory_budget"):
            assert "memory_budget: plan '" in s.reason


def test_candidate_rows_are_the_partitions_bytes_less_the_codecs_own(strict_pass, priced):
    _, seen = priced
    _, _, graph, _ = _compile(memory_budget=0.7, error_cost=0.0)  # int8 gate/up meet it alone, and win
    rows = {r["tensor"]: r for r in graph.budget_candidates}
    assert len(rows) == len(seen) > 0
    for c, partition, codes, _ in seen:
        assert c.bytes_freed == partition.bytes_of(c.decision.saved_forms, inputs=False) - codes
        assert rows[c.tensor]["bytes_freed"] == c.bytes_freed and rows[c.tensor]["codec"] == c.codec
        assert rows[c.tensor]["frees"] == sorted({partition.activations[n] for n in partition.which(
            c.decision.saved_forms) if n in partition.activations})
    by_name = {name: rows[c.tensor] for c, _, _, name in seen if name is not None}
    assert any(s.decision == "compressed" and s.codec == "gated" for s in graph.sites), graph.budget_plans
    for s in graph.sites:  # a chosen gated site's report predicts the same bytes, by the codec's accounting
        if s.decision == "compressed" and s.codec == "gated":
            assert by_name[s.name]["chosen"]
            assert by_name[s.name]["bytes_freed"] == s.bytes_before - s.predicted_bytes_after, s


def test_an_exact_plan_trains_exactly(strict_pass, priced):
    prices, _ = priced
    prices.update({codec: (100.0, 1.0) for codec in CODECS})  # every codec dearer than recompute
    model, x, graph, grads = _compile(memory_budget=0.5, error_cost=1e6)
    ref = square_loss_step(model, x, None)[1]
    assert [p["plan"] for p in graph.budget_plans if p["chosen"]] == ["exact"]
    assert graph.budget_candidates and not any(r["selected"] or r["chosen"] for r in graph.budget_candidates)
    assert not [s for s in graph.sites if s.decision == "compressed"]
    assert graph.saved_bytes_after <= graph.budget_target, graph.message
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-6, msg=name)
