"""The plan cache (passes/plan_cache.py): a second process reads the planner's decisions instead of
searching again.

Checked here: a plan written by one process is read by another, which partitions each graph once
(the check) and never traces the unrewritten loss head again, and trains as a process with the
cache off does on the same batch (same decisions, v from its own batch, same gradients); a changed
config or graph misses; an entry that cannot be used (corrupt, another schema, a plan whose
partition saves other bytes) is ignored with a debug log and planned over; the option, the
environment variable and torch's ``force_disable_caches`` turn it off."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gated import GatedMLP

import velora_fx
from velora_fx import _compat
from velora_fx.passes import plan_cache

ROOT = Path(__file__).resolve().parent.parent
CODECS = ("velora", "fewbit", "gated", "chunked_loss")

_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import velora_fx
from velora_fx import _compat
from velora_fx.backend import VeloraBackend
from test_gated import GatedMLP
from test_loss_head import Head, _batch
from test_plan_cache import counting, summary

torch.set_num_threads(1)
seed, cache, out = int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
partitions, references = counting(_compat, "min_cut_rematerialization_partition"), counting(VeloraBackend, "_baseline")
torch.manual_seed(0)
head, mlp = Head(), GatedMLP(32, 96, layers=2)
torch.manual_seed(seed)
ids, targets = _batch()
x = torch.randn(4, 16, 32) * (1 + seed) + seed
result = {}
for name, model, options, run in (
        ("head", head, dict(codecs=("velora", "fewbit", "gated", "chunked_loss"), memory_budget=0.5),
         lambda m: m(ids, targets)),
        ("mlp", mlp, dict(codecs=("velora", "fewbit", "gated"), mode="max_memory"), lambda m: m(x).square().mean())):
    torch._dynamo.reset()
    backend = velora_fx.backend(compiler="eager", plan_cache=cache, **options)
    run(torch.compile(model, backend=backend)).backward()
    result[name] = {**summary(backend), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                    "v": {k: e["vector"].clone() for k, e in backend.state_dict()["sites"].items()}}
result["partitions"], result["references"] = partitions[0], references[0]
torch.save(result, out)
"""


def counting(owner, attr):
    """Count calls of ``owner.attr`` from now on (a list holding the count)."""
    calls, original = [0], getattr(owner, attr)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)
    setattr(owner, attr, counted)
    return calls


def summary(backend) -> dict:
    """What a plan decided (not the estimates, which come from each process's batch)."""
    (graph,) = backend.report().graphs
    return {"source": graph.plan_source, "status": graph.status, "after": graph.saved_bytes_after,
            "before": graph.saved_bytes_before, "target": graph.budget_target, "recompute": graph.recompute_budget,
            "chosen": [p["plan"] for p in graph.budget_plans if p["chosen"]],
            "sites": [(s.name, s.codec, s.decision, s.setting, s.bytes_before, s.bytes_after) for s in graph.sites],
            "peak": graph.predicted_peak, "table": backend.report().table()}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """The plan cache on (conftest turns it off for the other tests), in a directory of its own."""
    monkeypatch.delenv(plan_cache.ENV, raising=False)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "velora_fx"


def _process(tmp_path, cache_root, seed: int, cache: bool) -> dict:
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    out = tmp_path / f"out-{seed}-{int(cache)}.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TORCHINDUCTOR_", "VELORA_FX_"))}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_root), VELORA_FX_STRICT="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, str(script), str(ROOT / "tests"), str(seed), str(int(cache)), str(out)],
                   env=env, check=True, capture_output=True, text=True, cwd=tmp_path)
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_a_second_process_reads_the_plan_and_trains_as_planning_would(tmp_path):
    """Process A plans and writes; B (another batch) reads: one partition per graph, no trace of
    the unrewritten head; C plans B's batch with the cache off.  B and C decide the same, B's v is
    from its own batch (C's, not A's), and their gradients are equal."""
    cache_root = tmp_path / "cache"
    first = _process(tmp_path, cache_root, seed=0, cache=True)
    second = _process(tmp_path, cache_root, seed=1, cache=True)
    planned = _process(tmp_path, cache_root, seed=1, cache=False)
    assert first["head"]["source"] == first["mlp"]["source"] == "planned"
    assert second["head"]["source"] == second["mlp"]["source"] == "cache"
    assert planned["head"]["source"] == planned["mlp"]["source"] == "planned"
    assert second["partitions"] == 2 and second["references"] == 0, second  # one check per graph
    assert first["partitions"] > 6 and first["references"] == planned["references"] == 1
    assert "plan read from the plan cache" in second["head"]["table"]
    assert "plan read from the plan cache" not in planned["head"]["table"]
    for name in ("head", "mlp"):
        b, c = second[name], planned[name]
        for field in ("status", "after", "before", "target", "recompute", "chosen", "sites", "peak"):
            assert b[field] == c[field], (name, field)
        for param, grad in c["grads"].items():
            torch.testing.assert_close(b["grads"][param], grad, rtol=0, atol=0, msg=param)
        assert b["v"].keys() == c["v"].keys()
        for site, v in c["v"].items():
            torch.testing.assert_close(b["v"][site], v, rtol=0, atol=0)
    assert second["head"]["chosen"] and second["head"]["recompute"] < 1.0  # the budget's plan, with recompute
    assert second["mlp"]["v"] and any(not torch.equal(first["mlp"]["v"][k], v) for k, v in second["mlp"]["v"].items())
    entries = sorted(p.name.split("-")[0] for p in (cache_root / "velora_fx").iterdir())
    # plans, the head's reference peak, and the recompute guard's marks (recompute_guard.guard_joint)
    assert [e for e in entries if e != "guard"] == ["plan", "plan", "reference"] and "guard" in entries, entries


def _compile(model, x, **options):
    torch._dynamo.reset()
    options = {"codecs": ("velora", "fewbit", "gated"), "mode": "max_memory", "memory_budget": 0.5, **options}
    backend = velora_fx.backend(compiler="eager", **options)
    torch.compile(model, backend=backend)(x).square().mean().backward()
    model.zero_grad(set_to_none=True)
    (graph,) = backend.report().graphs
    return graph


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.glob("plan-*.json")) if folder.exists() else []


def test_a_changed_config_or_graph_misses(strict_pass, cache_dir):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    assert _compile(model, x).plan_source == "planned"
    hit = counting(_compat, "min_cut_rematerialization_partition")
    assert _compile(model, x).plan_source == "cache" and hit[0] == 1
    assert len(_entries(cache_dir)) == 1
    assert _compile(model, x, memory_budget=0.4).plan_source == "planned"  # another config
    assert _compile(model, x, bits=2).plan_source == "planned"
    assert _compile(model, torch.randn(4, 8, 32)).plan_source == "planned"  # another shape
    assert _compile(GatedMLP(32, 64, layers=2), x).plan_source == "planned"  # another graph
    assert len(_entries(cache_dir)) == 5
    assert _compile(model, x, bits=2).plan_source == "cache"


def _damage(path: Path, how: str) -> None:
    data = json.loads(path.read_text())
    if how == "garbage":
        path.write_bytes(b"\x00{not json")
        return
    if how == "other schema":
        data["schema"] = plan_cache.SCHEMA + 1
    elif how == "other key":
        data["key"] = "0" * 32
    elif how == "bad decisions":
        data["entry"]["groups"] = data["entry"]["groups"][:-1]
    elif how == "decisions this graph cannot take":  # every group compressed at a size that divides nothing
        for row in data["entry"]["groups"]:
            row.update(sites=[0], g=7, codec="velora")
    else:  # a plan whose partition does not give the bytes it says
        data["entry"]["saved_bytes"] += 1
    path.write_text(json.dumps(data))


def test_an_entry_that_cannot_be_used_is_planned_over_with_a_debug_log(strict_pass, cache_dir, caplog):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)
    reference = _compile(model, x)
    (path,) = _entries(cache_dir)
    for how in ("garbage", "other schema", "other key", "bad decisions", "decisions this graph cannot take",
                "other bytes"):
        _damage(path, how)
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="velora_fx.plan_cache"):
            graph = _compile(model, x)
        assert graph.plan_source == "planned", how
        assert [r for r in caplog.records if r.name == "velora_fx.plan_cache" and r.levelno == logging.DEBUG], how
        assert graph.saved_bytes_after == reference.saved_bytes_after, how
        assert graph.recompute_budget == reference.recompute_budget, how
        assert [(s.name, s.decision) for s in graph.sites] == [(s.name, s.decision) for s in reference.sites]
        assert _entries(cache_dir) == [path] and json.loads(path.read_text())["schema"] == plan_cache.SCHEMA, how
    assert _compile(model, x).plan_source == "cache"  # written again


def test_the_option_the_environment_and_force_disable_caches_turn_it_off(strict_pass, cache_dir, monkeypatch):
    model, x = GatedMLP(32, 96, layers=2), torch.randn(4, 16, 32)

    def option():
        return contextlib.nullcontext({"plan_cache": False})

    @contextlib.contextmanager
    def environment():
        monkeypatch.setenv(plan_cache.ENV, "0")
        yield {}
        monkeypatch.delenv(plan_cache.ENV)

    @contextlib.contextmanager
    def forced():
        with torch.compiler.config.patch(force_disable_caches=True):
            yield {}
    for off in (option, environment, forced):
        with off() as options:
            assert _compile(model, x, **options).plan_source == "planned", off
        assert not _entries(cache_dir), off  # nothing written
    assert _compile(model, x).plan_source == "planned" and len(_entries(cache_dir)) == 1  # on: written
    for off in (option, environment, forced):
        with off() as options:
            assert _compile(model, x, **options).plan_source == "planned", off  # an entry there, not read
    assert _compile(model, x).plan_source == "cache"


def test_graph_fingerprints_ignore_addresses_and_see_shapes():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(a, b):
        return torch.nn.functional.silu(torch.mm(a, b))
    small = make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 2))
    again = make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 2))
    wide = make_fx(f, tracing_mode="fake")(torch.randn(4, 8), torch.randn(8, 3))
    assert plan_cache.graph_fingerprint(small.graph) == plan_cache.graph_fingerprint(again.graph)
    assert plan_cache.graph_fingerprint(small.graph) != plan_cache.graph_fingerprint(wide.graph)
    traced = torch.fx.symbolic_trace(lambda a: torch.nn.functional.silu(a))  # a Python function as a target
    assert " at 0x" in repr(next(n.target for n in traced.graph.nodes if n.op == "call_function"))
    assert " at 0x" not in plan_cache._target(next(n.target for n in traced.graph.nodes if n.op == "call_function"))
