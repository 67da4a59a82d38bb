"""benchmarks/compile_time.py with ``--config default``: it times the default backend, not the budget's
planner, and breaks velora_fx's compile down by stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "compile_time.py")


def test_compile_time_default_config_times_the_default_backend(tmp_path):
    cmd = [sys.executable, SCRIPT, "--config", "default", "--models", "llama", "--regimes", "plain", "velora",
           "--layers", "1", "--hidden", "64", "--vocab", "256", "--seq", "32", "--out", str(tmp_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    doc = json.loads((tmp_path / "compile_time.json").read_text())
    assert doc["info"]["args"]["config"] == "default"
    plain, velora = doc["results"]
    assert "error" not in plain and "error" not in velora, (plain.get("error"), velora.get("error"))
    graph = velora["graphs"][0]
    # the default plans per site without a budget, and compresses the MLP (int8 gate/up, VeLoRA down)
    assert graph["status"] == "rewritten" and graph["budget_target"] is None and not graph["plans"]
    assert "velora:model.model.layers.0.mlp.down_proj" in graph["compressed"]
    assert velora["partition_calls"] >= 1 and velora["stages"]["pipeline (total)"]["calls"] == 1
    assert "velora_fx adds" in (tmp_path / "summary.md").read_text()
