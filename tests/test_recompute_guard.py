"""The recompute guard (passes/recompute_guard.py): under a low knapsack budget the partitioner
recomputes the residual stream in backward as one chain across layers; the guard marks what that
chain would recompute far from its readers MUST_SAVE, and the step-peak predictor counts such a
chain and what the caller holds (step_peak.py)."""
import copy

import pytest
import torch

import velora_fx
from velora_fx._compat import CheckpointPolicy, aot_autograd, boxed_nop_compiler, recompute_budget, select_decomp_table
from velora_fx._compat import min_cut_rematerialization_partition as min_cut
from velora_fx.passes.partition_probe import SavedSet, lazy_clone, probe_partition
from velora_fx.passes.recompute_guard import BUDGETS, far_recomputed, guard_recompute_chains, save_random_values
from velora_fx.passes.step_peak import predict_step_peak

LAYERS, D = 4, 16


def _joint(model, x):
    """The joint graph AOTAutograd partitions for ``model(x).square().mean()`` and a probe of it."""
    seen = {}

    def partition(gm, joint_inputs, **kwargs):
        if len(gm.graph.nodes) > len(seen["gm"].graph.nodes if seen else ()):  # the decoder, not the loss graph
            seen.update(gm=lazy_clone(gm), inputs=joint_inputs, kwargs=dict(kwargs))
        return min_cut(gm, joint_inputs, **kwargs)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=boxed_nop_compiler, bw_compiler=boxed_nop_compiler, partition_fn=partition,
                           decompositions=select_decomp_table())  # inductor's decompositions, as it partitions
    torch.compile(model, backend=backend)(input_ids=x, labels=x).loss.backward()
    kwargs = dict(seen["kwargs"])
    num_fwd_outputs = kwargs.pop("num_fwd_outputs")
    probe = lambda gm: probe_partition(gm, seen["inputs"], min_cut, num_fwd_outputs, **kwargs)  # noqa: E731
    probe.joint_inputs, probe.num_fwd_outputs, probe.kwargs = seen["inputs"], num_fwd_outputs, kwargs
    return seen["gm"], probe


def _gpt2(layers=LAYERS):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=layers, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)  # transformers' defaults: dropout 0.1
    return transformers.GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def stack_joint():
    torch.manual_seed(0)
    return _joint(_gpt2(), torch.randint(0, 256, (2, 32)))


def test_a_low_budget_recomputes_the_residual_stream_far_from_its_readers(stack_joint):
    joint, probe = stack_joint
    with recompute_budget(1.0):
        assert far_recomputed(probe(joint), joint) == []  # the default partition keeps the stream
    with recompute_budget(0.25):
        far = far_recomputed(probe(joint), joint)
    adds = [n for n in far if n.target == torch.ops.aten.add.Tensor]
    assert len(adds) >= LAYERS - 1, [n.name for n in far]  # a residual sum per layer, recomputed as one chain


def test_the_guard_marks_the_chain_and_its_budgets_recompute_none_of_it(stack_joint):
    joint, probe = stack_joint
    joint = lazy_clone(joint)  # the marks go on a copy (the fixture's graph stays unmarked)
    with recompute_budget(1.0):
        default = probe(joint).activation_bytes
    result = guard_recompute_chains(joint, probe)
    assert result.kept and result.bytes > 0 and "recompute guard" in result.message()
    assert all(n.target == torch.ops.aten.add.Tensor or "mul" in n.name for n in joint.graph.nodes
               if n.name in result.kept)  # residual sums and dropout products
    marked = {n.name for n in joint.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE}
    assert marked == set(result.kept)
    for budget in BUDGETS:
        with recompute_budget(budget):
            saved = probe(joint)
        assert far_recomputed(saved, joint, random_only=True) == [], budget  # no chain through the masks left
        recomputed = {n.name for n in saved.bwd.graph.nodes if n.op == "call_function"}
        assert not recomputed & set(result.kept), budget  # backward reads them, never recomputes them
    with recompute_budget(1.0):
        assert probe(joint).activation_bytes == default  # the default partition kept them anyway


def test_the_predictor_counts_a_chain_and_what_the_caller_holds(stack_joint):
    joint, probe = stack_joint
    with recompute_budget(0.25):
        saved = probe(joint)
    peak = predict_step_peak(saved)
    chain = far_recomputed(saved, joint)
    biggest = max(t.meta["val"].numel() * t.meta["val"].element_size() for t in chain)
    assert peak.backward >= saved.activation_bytes + biggest  # a recomputed sum alive beside the saved set
    held = SavedSet(saved.activations, saved.inputs, saved.base_bytes, saved.fwd, saved.bwd,
                    held={**saved.held, "another_output": 1 << 20})
    assert predict_step_peak(held).backward == peak.backward + (1 << 20)  # held through all of backward
    assert predict_step_peak(held).forward == peak.forward


def _budget_step(model, ids):
    backend = velora_fx.backend(memory_budget=0.3, codecs=["chunked_loss"], plan_cache=False)  # inductor
    torch._dynamo.reset()
    torch.manual_seed(3)  # the same dropout masks in both runs
    torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
    return backend, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.usefixtures("strict_pass")
def test_the_guard_changes_what_is_saved_not_the_gradients(monkeypatch):
    """GPT-2 with dropout under a budget, compiled by inductor (whose regenerated masks are
    forward's: ``compiler="eager"`` saves random values instead, see ``save_random_values``): the
    guard reports what it keeps, and the gradients equal those of the same budget without it."""
    torch.manual_seed(1)
    model, ids = _gpt2(layers=3), torch.randint(0, 256, (2, 32))
    twin = copy.deepcopy(model)
    backend, guarded = _budget_step(model, ids)
    assert any("recompute guard: keeps" in g.message for g in backend.report().graphs), backend.report().table()
    from velora_fx.passes.recompute_guard import GuardResult
    import sys
    monkeypatch.setattr(sys.modules["velora_fx.backend"], "guard_joint", lambda *args, **kwargs: GuardResult())
    backend, plain = _budget_step(twin, ids)
    assert not any("recompute guard" in g.message for g in backend.report().graphs)
    for name, grad in guarded.items():
        torch.testing.assert_close(grad, plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_eager_runs_save_random_values():
    """Run without inductor's code generation, a regenerated mask would not be forward's."""
    joint, probe = _joint(_gpt2(layers=1), torch.randint(0, 256, (2, 32)))
    joint = lazy_clone(joint)
    assert save_random_values(joint) > 0
    random = [n for n in joint.graph.nodes if n.op == "call_function" and hasattr(n.target, "tags")
              and torch.Tag.nondeterministic_seeded in n.target.tags and n.meta["val"].dim() > 0]
    assert random and all(n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE for n in random)
    with recompute_budget(0.25):
        bwd = probe(joint).bwd
    assert not [n for n in bwd.graph.nodes if n.name in {r.name for r in random} and n.op == "call_function"]


def test_a_chain_without_random_numbers_is_left_to_the_knapsack():
    """Without dropout the residual chain is cheap pointwise work: nothing is marked."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_layer=LAYERS, n_embd=64, n_head=2, vocab_size=256, n_positions=64,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()  # eval: no dropout op in the graph at all
    joint, probe = _joint(model, torch.randint(0, 256, (2, 32)))
    with recompute_budget(0.25):
        assert far_recomputed(probe(joint), joint)  # the chain is there...
    assert guard_recompute_chains(lazy_clone(joint), probe).kept == []  # ...and left alone


def test_the_marks_are_read_back_from_the_plan_cache(tmp_path, monkeypatch, stack_joint):
    """A second compile of the same graph reads the guard's marks instead of partitioning for them."""
    from velora_fx.passes import recompute_guard
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    joint, probe = stack_joint
    partitions = []

    def counting(gm, *args, **kwargs):
        partitions.append(1)
        return min_cut(gm, *args, **kwargs)
    args = (probe.joint_inputs, counting, probe.num_fwd_outputs, probe.kwargs)
    first = recompute_guard.guard_joint(lazy_clone(joint), *args, cache=True)
    used = len(partitions)
    second_graph = lazy_clone(joint)
    second = recompute_guard.guard_joint(second_graph, *args, cache=True)
    assert used == len(BUDGETS) + 1 and len(partitions) == used  # the second read the cache (1: the default)
    assert second.kept == first.kept and second.bytes == first.bytes
    marked = [n.name for n in second_graph.graph.nodes if n.meta.get("recompute") == CheckpointPolicy.MUST_SAVE]
    assert sorted(marked) == sorted(first.kept)

