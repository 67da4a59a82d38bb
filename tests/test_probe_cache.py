"""Cheap partition probes (passes/partition_probe.py, passes/min_cut_memo.py).

``memory_budget`` partitions one graph under many knapsack budgets.  Checked here: with the
partitioner's min-cuts shared between those partitions, every partition is the one a plain
partitioner call gives, and fewer min-cuts are solved; a probe cache answers a graph it has seen
under the same budget, and only then; probes leave the graph they are given untouched."""
from __future__ import annotations

import torch
from test_gated import GatedMLP

import velora_fx
from velora_fx import _compat
from velora_fx.passes.min_cut_memo import shared_min_cuts
from velora_fx.passes.partition_probe import ProbeCache, lazy_clone, probe_partition

BUDGETS = [0.0, 0.15, 0.3, 0.45, 0.6, 0.8, 1.0, 0.3]


def _joint():
    return velora_fx.trace_joint(GatedMLP(32, 96, layers=3), torch.randn(4, 16, 32))


def _probe(joint, gm, budget):
    with _compat.recompute_budget(budget):
        return probe_partition(gm, joint.joint_inputs, _compat.min_cut_rematerialization_partition,
                               joint.num_fwd_outputs, **joint.partition_kwargs)


def _summary(saved):
    """What a partition decided: the saved tensors and both graphs' nodes."""
    return (sorted(saved.activations.items()), sorted(saved.inputs.items()),
            [(n.name, str(n.target)) for n in saved.fwd.graph.nodes],
            [(n.name, str(n.target)) for n in saved.bwd.graph.nodes])


def _count_min_cuts(monkeypatch) -> list[int]:
    from torch._functorch import partitioners
    calls, original = [0], partitioners.solve_min_cut

    def counted(joint_graph, node_info, min_cut_options, dont_ban=None):
        calls[0] += 1
        return original(joint_graph, node_info, min_cut_options, dont_ban)
    monkeypatch.setattr(partitioners, "solve_min_cut", counted)
    return calls


def test_shared_min_cuts_give_the_partitioners_own_partitions(monkeypatch):
    joint = _joint()
    calls = _count_min_cuts(monkeypatch)
    plain = [_summary(_probe(joint, joint.gm, b)) for b in BUDGETS]
    solved_plain = calls[0]
    with shared_min_cuts() as memo:
        shared = [_summary(_probe(joint, joint.gm, b)) for b in BUDGETS]
    assert shared == plain
    assert memo.solutions and calls[0] - solved_plain < solved_plain, (calls[0], solved_plain)
    assert {len(s[0]) for s in plain} != {len(plain[0][0])}  # the budgets do change the partition


def test_probe_cache_answers_the_same_graph_under_the_same_budget_only():
    joint = _joint()
    cache = ProbeCache()
    run = lambda gm: _probe(joint, gm, _compat.current_recompute_budget())  # noqa: E731
    first = cache.probe(lazy_clone(joint.gm), run)
    again = cache.probe(lazy_clone(joint.gm), run)  # another copy of the same graph
    assert again is first and cache.hits == 1
    with _compat.recompute_budget(0.3):
        other = cache.probe(joint.gm, run)
    assert other is not first and cache.hits == 1
    changed = lazy_clone(joint.gm)
    mm = next(n for n in changed.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.mm.default)
    mm.meta["recompute"] = torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE  # the partitioner reads tags
    assert cache.probe(changed, run) is not first and cache.hits == 1


def test_probes_leave_their_graph_untouched():
    joint = _joint()
    before = [(n.name, n.op, str(n.target), n.args) for n in joint.gm.graph.nodes]
    code = joint.gm.code
    for budget in (0.3, 1.0):
        _probe(joint, joint.gm, budget)
    assert [(n.name, n.op, str(n.target), n.args) for n in joint.gm.graph.nodes] == before
    assert joint.gm.code == code
