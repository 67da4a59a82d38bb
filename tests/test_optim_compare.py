"""benchmarks/optim_compare.py runs end to end on CPU (tiny model, a handful of steps): a run per
optimizer with finite losses and state bytes, and LoRA / LoTR at matched trainable counts."""
import importlib.util
import json
import math
import pathlib

import pytest
import torch

from script_loader import load_script

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "optim_compare.py"


def _load():
    return load_script(SCRIPT, "_optim_compare")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def test_optim_compare_tiny(tmp_path):
    pytest.importorskip("transformers")
    oc = _load()
    oc.main(["--device", "cpu", "--tiny", "--steps", "4", "--eval-every", "2", "--ft-steps", "2",
             "--ft-eval-every", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "summary.md").exists()
    assert data["meta"]["command"] and data["config"]["steps"] == 4 and data["model"]["params"] > 0

    runs = data["phase1"]["runs"]
    assert set(runs) == set(oc.OPTIMIZERS)
    expected = ["adamw", "osd", "naggs"] + (["galore"] if _has("galore_torch") else [])
    for name in expected:
        run = runs[name]
        assert run["status"] == "ok", (name, run.get("error"), run.get("traceback"))
        assert run["curve"]["step"] == [2, 4]
        assert all(math.isfinite(v) for v in run["curve"]["val_loss"]), name
        assert math.isfinite(run["final_val_loss"]) and run["final_val_loss"] < math.log(data["model"]["vocab"]) + 1
        assert run["state_bytes"]["total"] > 0 and run["step_ms_median"] > 0
    if not _has("galore_torch"):  # recorded, not fatal
        assert runs["galore"]["status"] == "error" and "galore" in runs["galore"]["error"]
    # low-rank state on the hidden matrices is smaller than AdamW's (rank 16 < 64)
    assert runs["osd"]["state_bytes"]["hidden"] < runs["adamw"]["state_bytes"]["hidden"]
    # same init, same batches: the first training step's loss is the same for every optimizer
    first = [runs[n]["first_train_loss"] for n in expected]
    assert first == pytest.approx([first[0]] * len(first), rel=1e-5)

    if not _has("peft"):
        pytest.skip("peft not installed: phase 2 (LoRA vs LoTR) not checked")
    p2 = data["phase2"]
    lora, lotr = p2["runs"]["lora"], p2["runs"]["lotr"]
    for run in (lora, lotr):
        assert run["status"] == "ok", run.get("error")
        assert all(math.isfinite(v) for v in run["curve"]["val_loss"])
        # adapters start at the base model: step-0 validation loss identical
        assert run["curve"]["step"][0] == 0
    assert lora["curve"]["val_loss"][0] == pytest.approx(lotr["curve"]["val_loss"][0], rel=1e-6)
    assert lora["trainable_params"] == p2["lora_params_formula"]
    assert lotr["trainable_params"] == lotr["lotr_parameter_count"] == p2["lotr_params_formula"]
    assert abs(lotr["trainable_params"] / lora["trainable_params"] - 1) < 0.10
