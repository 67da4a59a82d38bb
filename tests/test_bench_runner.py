"""benchmarks/run.py and benchmarks/make_docs.py end to end on a tiny model.

The runner goes through a subprocess (it owns dynamo's state and may call sys.exit) with
``--compiler eager`` (inductor's partitioner and decompositions, no code generation), so both
regimes and several variants take seconds; make_docs then renders the JSON to a temporary path.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from script_loader import load_script

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TINY = ["--device", "cpu", "--models", "llama", "--sizes", "1x64", "--vocab", "512", "--batch", "2", "--seq", "32",
        "--steps", "2", "--rounds", "1", "--compiler", "eager"]


def _load(name: str):
    sys.path.insert(0, str(BENCH))
    return load_script(BENCH / f"{name}.py", f"_bench_{name}")


def _run(out, *extra) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), *TINY, *extra, "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_run")
    doc = _run(out, "--regimes", "full", "lora", "--variants", "inductor", "eager", "velora_auto", "peft_velora", "liger")
    return out, doc


def test_run_json_has_both_regimes_with_numbers(run_dir):
    _, doc = run_dir
    assert doc["runner"] == "benchmarks/run.py" and "python" in doc["command"] and "versions" in doc
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
    assert not (ROOT / "docs" / "img" / "pareto_llama_full_1x64.png").exists()


def test_scaling_only_tries_each_sequence(tmp_path):
    doc = _run(tmp_path, "--regimes", "full", "--variants", "inductor", "--scaling-only", "--scaling-seqs", "16", "32")
    assert doc["blocks"] == []
    (run,) = doc["scaling"]["runs"]
    assert [p["seq"] for p in run["points"]] == [16, 32] and run["max_seq"] == 32 and run["max_tokens"] == 64


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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    args = ["--device", "cpu", "--models", "gpt2", "--layers", "1", "--hidden", "64", "--vocab", "512", "--batch", "2",
            "--seq", "32", "--steps", "2", "--rounds", "1", "--compiler", "eager", "--no-grad-cos", "--call", "plain",
            "--transformers-defaults", "--regimes", "eager", "velora_auto", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(BENCH / "bench_memory.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["regime"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert records["eager"]["status"] == records["velora_auto"]["status"] == "ok", records
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["call"] == "plain"
    velora = json.loads((tmp_path / "gpt2_velora_auto.json").read_text())
    eager = json.loads((tmp_path / "gpt2_eager.json").read_text())
    assert velora["compressed_sites"] > 0 and abs(velora["first_loss"] - eager["first_loss"]) < 0.5
