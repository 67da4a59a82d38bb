"""benchmarks/run.py and benchmarks/make_docs.py end to end on a tiny model.

The scripts run in this process (``_main``: their ``main()`` with the command line in ``sys.argv``,
a fresh dynamo before and after; a subprocess would pay the interpreter's start, the imports of
torch, transformers and PEFT, and a first compile again) with ``--compiler eager`` (inductor's
partitioner and decompositions, no code generation), so both regimes and several variants take
seconds; make_docs then renders the JSON to a temporary path.
"""
import json
import pathlib
import sys

import pytest
import torch

from script_loader import load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TINY = ["--device", "cpu", "--models", "llama", "--sizes", "1x64", "--vocab", "512", "--batch", "2", "--seq", "32",
        "--steps", "2", "--rounds", "1", "--compiler", "eager"]


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    return load_script(BENCH / f"{name}.py", f"_bench_{name}")


def _main(name: str, *args: str):
    """``python benchmarks/<name>.py *args`` in this process: the script's ``main()`` with that
    command line in ``sys.argv`` (scripts read it there, and record it), between dynamo resets."""
    script = _load(name)
    argv = sys.argv
    sys.argv = [str(BENCH / f"{name}.py"), *args]
    torch._dynamo.reset()
    try:
        return script.main()
    finally:
        sys.argv = argv
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_run")
    _main("run", *TINY, "--regimes", "full", "lora", "--variants", "inductor", "eager", "velora_auto", "peft_velora",
          "liger", "--out", str(out))
    return out, json.loads((out / "run.json").read_text())


def test_run_json_has_both_regimes_with_numbers(run_dir):
    _, doc = run_dir
    assert doc["runner"] == "benchmarks/run.py" and "versions" in doc
    assert doc["command"].startswith("python benchmarks/run.py --device cpu --models llama"), doc["command"]
    assert [b["regime"] for b in doc["blocks"]] == ["full", "lora"]
    for block in doc["blocks"]:
        rows = {r["regime"]: r for r in block["rows"]}
        assert list(rows)[0] == "inductor"  # the anchor runs first
        for name in ("inductor", "eager", "velora_auto"):
            row = rows[name]
            assert row["status"] == "ok", row
            assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["saved_activation_bytes"] > 0
            assert row["vs_inductor"]["ms_per_step"] > 0 and row["grad_cos_mean"] is not None
        assert rows["inductor"]["vs_inductor"]["saved_activation_bytes"] == 1.0
        assert rows["velora_auto"]["compressed_sites"] > 0
        assert rows["liger"]["status"] == "unavailable"  # Triton kernels: CUDA only
    full, lora = doc["blocks"]
    assert lora["trainable_params"] < full["trainable_params"] and lora["lora"]["r"] == 32
    assert {r["regime"]: r for r in full["rows"]}["peft_velora"]["status"] == "unavailable"
    peft_velora = {r["regime"]: r for r in lora["rows"]}["peft_velora"]
    import peft
    if hasattr(peft, "VeloraConfig"):  # PEFT's own VeLoRA: lora_A gradients approximated, not exact
        assert peft_velora["status"] == "ok" and peft_velora["grad_cos_min"] < 0.999
    summary = (run_dir[0] / "summary.md").read_text()
    assert "## llama / full / 1x64" in summary and "## llama / lora / 1x64" in summary


def test_make_docs_renders_tables(run_dir, tmp_path):
    out, _ = run_dir
    make_docs = _load("make_docs")
    md, img = tmp_path / "docs" / "benchmarks.md", tmp_path / "docs" / "img"
    text = make_docs.main([str(out), "--out-md", str(md), "--img-dir", str(img)])
    assert md.read_text() == text
    assert "## Llama-like, full training, 1 × 64" in text and "## Llama-like, PEFT LoRA r=32, base frozen, 1 × 64" in text
    assert "| `velora_auto` |" in text and "python" in text and "run.py" in text
    assert "not measured yet" in text  # the 12 x 1024 anchors this run did not measure
    assert "Longest sequence that trains" not in text  # no scaling in this run: no scaling section
    assert not (ROOT / "docs" / "img" / "pareto_llama_full_1x64.png").exists()


def test_scaling_tables_per_limit_and_batch_on_the_plain_call(tmp_path):
    """--scaling with two limits and two batches on the plain transformers call: a block whose exact
    variants match the exact gradient of that call; then a table per limit with a row per (variant, batch), the larger limit reusing what fit within
    the smaller (no new try), the plot, and make_docs' scaling section.  In process (no interpreter
    start-up); on CPU no limit is enforced, so everything fits."""
    runner = _load("run")
    doc = runner.main([*TINY[:2], "--models", "llama", "--regimes", "full", "--sizes", "1x64", "--vocab", "512",
                       "--batch", "2", "--seq", "32", "--steps", "1", "--rounds", "1", "--compiler", "eager",
                       "--scaling", "--memory-limit-gib", "40", "16", "--scaling-batch", "2", "1",
                       "--scaling-seqs", "32", "--scaling-steps", "1", "--variants", "inductor", "eager",
                       "--call", "plain", "--transformers-defaults", "--out", str(tmp_path)])
    (block,) = doc["blocks"]
    assert block["call"] == "plain" and block["transformers_defaults"] == {}  # Llama: the builder's are transformers'
    for row in block["rows"]:  # the reference is the plain call's loss, under the plain model's module paths
        assert row["status"] == "ok" and row["grad_cos_min"] > 0.999, row
    args, _ = runner.parse_args(["--transformers-defaults"])
    assert runner.model_defaults("gpt2", args) == {"activation": "gelu_new", "dropout": 0.1}
    scaling = doc["scaling"]
    assert scaling["memory_limits_GiB"] == [16.0, 40.0] and scaling["batches"] == [1, 2] and not scaling["enforced"]
    assert scaling["specs"][0]["call"] == "plain" and scaling["specs"][0]["params"] > 0
    small, large = scaling["limits"]
    for table in (small, large):
        rows = {(r["variant"], r["batch"]): r for r in table["rows"]}
        assert sorted(rows) == [("eager", 1), ("eager", 2), ("inductor", 1), ("inductor", 2)]
        for (variant, batch), row in rows.items():
            assert row["status"] == "ok" and row["max_seq"] == 32 and row["capped"], row
            assert row["max_tokens"] == 32 * batch and row["tokens_per_s"] > 0 and row["context_vs_inductor"] == 1.0
            assert row["inductor_max_seq"] == 32 and row["tokens_per_s_vs_inductor"] > 0
    assert all(r["tries"] == 1 and [p["seq"] for p in r["points"]] == [32] for r in small["runs"])
    assert all(r["tries"] == 0 and r["carried"][0]["from"] == "16 GiB" for r in large["runs"])
    assert scaling["plots"] == ["scaling_llama_full_1x64.png"] and (tmp_path / "scaling_llama_full_1x64.png").stat().st_size
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("## Longest sequence that trains within") == 2 and "| `eager` | 2 | ≥32 | ≥64 |" in summary
    assert json.loads((tmp_path / "run.json").read_text())["scaling"]["limits"][1]["rows"] == large["rows"]
    make_docs = _load("make_docs")
    text = make_docs.main([str(tmp_path), "--out-md", str(tmp_path / "b.md"), "--img-dir", str(tmp_path / "img")])
    assert "### Longest sequence that trains within 16 GiB" in text and "### Longest sequence that trains within 40 GiB" in text
    assert "| llama | full | 1x64 | `inductor` | 1 | ≥32 |" in text and (tmp_path / "img" / "scaling_llama_full_1x64.png").exists()


class _FakeTries:
    """scaling_point without a model: the peak is 1.5 GiB + GiB per 1k tokens (inductor 0.5, the other
    0.3; resident 1 GiB), a try fits if that is within the limit set last; tokens/s 1000 and 900."""

    def __init__(self, runner, monkeypatch):
        import types
        self.limit, self.tries = None, []
        monkeypatch.setattr(runner, "set_memory_limit", self.set_limit)
        monkeypatch.setattr(runner, "scaling_point", self.point)
        monkeypatch.setattr(runner, "plot_scaling", lambda doc, out: None)  # the end-to-end test draws it
        monkeypatch.setattr(runner, "make_block", lambda *a, **k: types.SimpleNamespace(base=__import__("torch").nn.Linear(2, 2)))

    def set_limit(self, device, gib):
        self.limit = gib
        return None if gib is None else gib / 100

    def point(self, regime, model_name, block, runner_cls, seq, batch, args, device):
        tokens = seq * batch
        peak = 1.5 + (0.5 if regime.name == "inductor" else 0.3) * tokens / 1024
        status = "ok" if peak <= self.limit else "oom"
        self.tries.append((self.limit, batch, regime.name, seq))
        return {"seq": seq, "batch": batch, "tokens": tokens, "status": status, "peak_GiB": peak, "resident_GiB": 1.0,
                "tokens_per_s": (1000.0 if regime.name == "inductor" else 900.0) if status == "ok" else None,
                "first_step_s": 1.0 if status == "ok" else None, "wall_s": 1.0, "error": None if status == "ok" else "OOM"}


def _fake_scaling(runner, tmp_path, *extra):
    args, variants = runner.parse_args(["--device", "cuda", "--scaling-only", "--memory-limit-gib", "16", "40",
                                        "--scaling-batch", "1", "2", "--scaling-seqs", "1024", "2048", "4096", "8192",
                                        "16384", "32768", "65536", "--variants", "inductor", "velora_auto",
                                        "--out", str(tmp_path), *extra])
    doc = {"device": "fake", "scaling": None}
    clock = runner.Clock(args.deadline, args.compile_estimate)
    runner.run_scaling([("llama", (12, 1024), "full")], variants, args, doc, clock, lambda: None)
    return {(t["memory_limit_GiB"], r["batch"], r["variant"]): r for t in doc["scaling"]["limits"] for r in t["rows"]}


def test_scaling_search_doubles_jumps_bisects_and_carries(tmp_path, monkeypatch):
    """The search on a fake memory model (no compile): inductor climbs from the shortest sequence,
    jumping as far as the measured peak predicts, and stops at the first OOM; the other variant starts
    at inductor's longest; the larger limit starts above what fit within the smaller one; a larger
    batch bisects below the smaller batch's OOM; --scaling-predicted-oom skips the last try."""
    runner = _load("run")
    fake = _FakeTries(runner, monkeypatch)
    rows = _fake_scaling(runner, tmp_path)
    tried = {}
    for limit, batch, variant, seq in fake.tries:
        tried.setdefault((limit, batch, variant), []).append(seq)
    assert tried[(16, 1, "inductor")] == [1024, 8192, 16384, 32768]      # jump from the first peak, then 1 OOM
    assert tried[(16, 1, "velora_auto")] == [16384, 32768, 65536]        # starts at inductor's longest
    assert tried[(16, 2, "inductor")] == [4096, 8192, 16384]             # below batch 1's OOM at 32768: bisect
    assert tried[(16, 2, "velora_auto")] == [8192, 16384, 32768]
    assert tried[(40, 1, "inductor")] == [65536]                         # 16384 fit within 16 GiB: jump from there
    assert tried[(40, 1, "velora_auto")] == [65536]
    assert tried[(40, 2, "inductor")] == [32768, 65536]
    expected = {(16, 1, "inductor"): 16384, (16, 1, "velora_auto"): 32768, (16, 2, "inductor"): 8192,
                (16, 2, "velora_auto"): 16384, (40, 1, "inductor"): 65536, (40, 1, "velora_auto"): 65536,
                (40, 2, "inductor"): 32768, (40, 2, "velora_auto"): 65536}
    assert {k: r["max_seq"] for k, r in rows.items()} == expected
    assert rows[(40, 1, "inductor")]["capped"] and not rows[(16, 1, "inductor")]["capped"]
    velora = rows[(16, 1, "velora_auto")]
    assert velora["context_vs_inductor"] == 2.0 and velora["tokens_per_s_vs_inductor"] == 0.9
    assert velora["inductor_max_seq"] == 16384 and velora["tries"] == 3 and velora["peak_GiB"] == 1.5 + 0.3 * 32
    assert rows[(40, 2, "velora_auto")]["carried"] == [  # reused, not tried again: 8192 and 16384 fit within 16 GiB
        {"seq": 8192, "status": "ok", "peak_GiB": 1.5 + 0.3 * 16, "from": "16 GiB"},
        {"seq": 16384, "status": "ok", "peak_GiB": 1.5 + 0.3 * 32, "from": "16 GiB"}]
    assert [p["status"] for p in rows[(16, 2, "inductor")]["carried"]] == ["oom"]  # the bound from batch 1

    fake.tries.clear()
    rows = _fake_scaling(runner, tmp_path, "--scaling-predicted-oom", "1.05")
    assert [s for limit, b, v, s in fake.tries if (limit, b, v) == (16, 1, "inductor")] == [1024, 8192, 16384]
    last = rows[(16, 1, "inductor")]["points"][-1]
    assert last["status"] == "predicted_oom" and last["seq"] == 32768 and last["predicted_GiB"] == 17.5
    assert rows[(16, 1, "inductor")]["max_seq"] == 16384

    fake.tries.clear()
    rows = _fake_scaling(runner, tmp_path, "--scaling-start", "smallest", "--memory-limit-gib", "16")
    assert [s for limit, b, v, s in fake.tries if (b, v) == (1, "velora_auto")] == [1024, 16384, 32768, 65536]
    assert rows[(16, 1, "velora_auto")]["max_seq"] == 32768 and list(rows) == [(16, 1, "inductor"), (16, 1, "velora_auto"),
                                                                              (16, 2, "inductor"), (16, 2, "velora_auto")]

    clock = runner.Clock(None, 30.0)  # a try's expected time before it has one of its own
    mb05, mb03, inductor = (runner.parse_variant(n) for n in ("velora_mb0.5", "velora_mb0.3", "inductor"))
    assert clock.expected_compile(mb05) == 90.0  # the planner: 3x a plain compile until one is measured
    clock.measured(inductor, 20.0)
    clock.measured(mb05, 100.0)
    assert clock.expected_compile(mb03) == 100.0 and clock.expected_compile(inductor) == 30.0

    fake.tries.clear()
    rows = _fake_scaling(runner, tmp_path, "--deadline", "0")
    assert not fake.tries and {r["status"] for r in rows.values()} == {"cut"}
    assert "--deadline" in rows[(16, 1, "inductor")]["note"]


def test_pareto_front_and_variant_names():
    make_docs = _load("make_docs")
    assert make_docs.pareto_front([(1.0, 1.0), (1.1, 0.9), (1.2, 0.95), (1.3, 0.5)]) == [(1.0, 1.0), (1.1, 0.9), (1.3, 0.5)]
    runner = _load("run")
    assert runner.parse_variant("liger_compiled").family == "liger"
    assert runner.parse_variant("velora_mb0.5").preset == "mb0.5"
    bm = _load("bench_memory")
    args, _ = runner.parse_args(["--variants", "inductor"])
    assert bm.velora_options(runner.parse_variant("velora_mb0.5"), "llama", args)["memory_budget"] == 0.5
    fast = bm.velora_options(runner.parse_variant("velora_mb0.3fast"), "llama", args)
    assert fast["memory_budget"] == 0.3 and fast["error_cost"] == 0.0
    chunked = bm.velora_options(runner.parse_variant("velora_mb0.5c256"), "llama", args)
    assert chunked["loss_chunk_size"] == 256 and "error_cost" not in chunked
    assert runner.parse_size("12x1024") == (12, 1024)
    # a share of plain inductor's measured peak: the budget in bytes, and a clear error without that peak
    of_inductor = bm.parse_regime("velora_mb0.5offload_of_inductor")
    assert bm.velora_options(of_inductor, "llama", args, anchor_peak=3_000_000_001) == \
        {"memory_budget": 1_500_000_000, "offload": True}
    with pytest.raises(ValueError, match="'inductor' regime measured"):
        bm.velora_options(of_inductor, "llama", args)


def test_make_docs_reads_bench_memory_summary(tmp_path):
    """bench_memory.py's summary.json (full regime): ratios recomputed against its inductor row."""
    make_docs = _load("make_docs")
    rows = [{"model": "gpt2", "regime": "inductor", "status": "ok", "ms_per_step": 20.0, "host_ms_per_step": 10.0,
             "peak_extra_GiB": 4.0, "saved_activation_bytes": 2**31, "first_step_s": 20.0},
            {"model": "gpt2", "regime": "velora_auto", "status": "ok", "ms_per_step": 21.0, "host_ms_per_step": 12.0,
             "peak_extra_GiB": 3.0, "saved_activation_bytes": 2**30, "first_step_s": 25.0}]
    src = tmp_path / "res"
    src.mkdir()
    (src / "summary.json").write_text(json.dumps({
        "device": "X", "torch": "2.x", "command": "python benchmarks/bench_memory.py --models gpt2",
        "config": {"layers": 12, "hidden": 1024, "vocab": 32000, "batch": 8, "seq": 1024, "dtype": "bfloat16"},
        "rows": rows}))
    text = make_docs.main([str(src), "--out-md", str(tmp_path / "b.md"), "--img-dir", str(tmp_path / "img")])
    assert "`python benchmarks/bench_memory.py --models gpt2`" in text
    assert "| `velora_auto` | 21.00 (1.05×) |" in text and "3.000 (0.75×)" in text


def test_a_lost_cuda_context_stops_the_run(monkeypatch):
    """An illegal memory access is sticky: after a failed variant the runner checks that the device
    still synchronises and stops (recorded) instead of failing every later variant."""
    import torch
    runner = _load("run")
    record = {"model": "llama", "regime": "liger_compiled", "status": "error", "error": "AcceleratorError: CUDA error"}
    runner.check_context(torch.device("cpu"), record)  # nothing to check off CUDA

    def broken(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "synchronize", broken)
    with pytest.raises(runner.ContextLost, match="liger_compiled"):
        runner.check_context(torch.device("cuda"), record)
    runner.check_context(torch.device("cuda"), {**record, "status": "ok"})  # only after a failure


def test_bench_memory_trains_the_plain_transformers_call(tmp_path):
    """``--call plain --transformers-defaults``: the compiled GPT-2 itself, dropout 0.1 and gelu_new,
    trained on ``model(input_ids=..., labels=...).loss``; velora plans it like the wrapped model."""
    args = ["--device", "cpu", "--models", "gpt2", "--layers", "1", "--hidden", "64", "--vocab", "512", "--batch", "2",
            "--seq", "32", "--steps", "2", "--rounds", "1", "--compiler", "eager", "--no-grad-cos", "--call", "plain",
            "--transformers-defaults", "--regimes", "eager", "velora_auto", "--out", str(tmp_path)]
    _main("bench_memory", *args)
    records = {r["regime"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert records["eager"]["status"] == records["velora_auto"]["status"] == "ok", records
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["call"] == "plain"
    velora = json.loads((tmp_path / "gpt2_velora_auto.json").read_text())
    eager = json.loads((tmp_path / "gpt2_eager.json").read_text())
    assert velora["compressed_sites"] > 0 and abs(velora["first_loss"] - eager["first_loss"]) < 0.5
