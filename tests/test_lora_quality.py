"""benchmarks/lora_quality.py runs end to end on CPU (tiny model, ``--compiler eager``, a few steps):
every regime fine-tunes from the same pre-trained base, and the velora regimes compress."""
import json
import math
import pathlib

import pytest
import torch

from script_loader import load_script

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "lora_quality.py"
TINY = ["--compiler", "eager", "--hidden", "64", "--layers", "1", "--heads", "4", "--intermediate", "128",
        "--seq-len", "32", "--batch-size", "4", "--pretrain-steps", "3", "--steps", "3", "--val-batches", "2",
        "--seeds", "0"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_lora_quality_tiny(tmp_path):
    pytest.importorskip("peft")
    lq = load_script(SCRIPT, "_lora_quality")
    lq.main(TINY + ["--out", str(tmp_path)])
    doc = json.loads((tmp_path / "lora_quality.json").read_text())
    md = (tmp_path / "lora_quality.md").read_text()
    assert doc["command"] and doc["versions"]["peft"] and doc["config"]["steps"] == 3
    assert "| regime |" in md and "velora_max_memory" in md

    runs = {r["regime"]: r for r in doc["runs"]}
    assert set(runs) == set(lq.REGIMES) and len(doc["runs"]) == len(lq.REGIMES)
    import peft
    if not hasattr(peft, "VeloraConfig"):  # recorded, not fatal
        assert runs.pop("peft_velora")["status"] == "unavailable"
    for name, run in runs.items():
        assert run["status"] == "ok", (name, run.get("error"), run.get("traceback"))
        for key in ("val_loss_before", "val_loss", "train_loss", "step_ms", "first_step_s"):
            assert math.isfinite(run[key]), (name, key, run[key])
        assert run["val_loss"] < math.log(256) + 1 and run["trainable_params"] > 0
        # the loss curve and the adapters' norm, what tells a collapsed fine-tune from a noisy one
        assert len(run["train_losses"]) == 3 and run["train_losses"][-1] == run["train_loss"], name
        assert run["trainable_norm"] > 0, name
    # one base, one LoRA init (B = 0): every regime starts from the same validation loss
    before = runs["inductor"]["val_loss_before"]
    assert before == pytest.approx(doc["pretrain"]["val_loss"], rel=1e-6)
    for name, run in runs.items():
        assert run["val_loss_before"] == pytest.approx(before, rel=1e-6), name
        assert run["trainable_params"] == runs["inductor"]["trainable_params"], name
    assert runs["inductor"]["compiled"] and ("peft_velora" not in runs or not runs["peft_velora"]["compiled"])
    for name in ("velora_auto", "velora_max_memory"):
        report = runs[name]["report"]
        assert report["compressed_sites"] > 0 and report["compressed"], name
        assert report["saved_bytes_after"] < report["saved_bytes_before"], name
    assert runs["inductor"]["report"] is None

    rows = {r["regime"]: r for r in doc["summary"]}
    assert rows["inductor"]["delta_vs_inductor_pct"] == pytest.approx(0.0)
    assert math.isfinite(rows["velora_auto"]["delta_vs_inductor_pct"])


def test_lora_quality_deadline_skips_and_records(tmp_path):
    """A deadline already past: pre-training runs, every fine-tune is recorded as skipped."""
    lq = load_script(SCRIPT, "_lora_quality")
    doc = lq.main(TINY + ["--regimes", "inductor", "velora_auto", "--seeds", "0", "1", "--deadline", "0",
                          "--out", str(tmp_path)])
    assert [(r["regime"], r["seed"], r["status"]) for r in doc["runs"]] == [
        ("inductor", 0, "skipped"), ("velora_auto", 0, "skipped"), ("inductor", 1, "skipped"),
        ("velora_auto", 1, "skipped")]
    assert all("--deadline" in r["note"] for r in doc["runs"])
    assert "skipped 2/2" in (tmp_path / "lora_quality.md").read_text()


def test_lora_quality_opt_in_regimes(tmp_path):
    """The noise-floor regime (exact LoRA, uncompiled) and a per-site ablation regime run, from the
    same base; the ablation compresses only the sites its glob names; unknown regimes are refused."""
    pytest.importorskip("peft")
    lq = load_script(SCRIPT, "_lora_quality")
    with pytest.raises(SystemExit):
        lq.parse_args(TINY + ["--regimes", "velora_site="])
    lq.main(TINY + ["--out", str(tmp_path), "--regimes", "inductor", "exact_eager", "velora_site=*q_proj.lora_A*"])
    doc = json.loads((tmp_path / "lora_quality.json").read_text())
    runs = {r["regime"]: r for r in doc["runs"]}
    assert set(runs) == {"inductor", "exact_eager", "velora_site=*q_proj.lora_A*"}
    assert all(r["status"] == "ok" for r in runs.values()), [(k, r.get("error")) for k, r in runs.items()]
    assert not runs["exact_eager"]["compiled"] and runs["exact_eager"]["report"] is None
    assert runs["exact_eager"]["val_loss_before"] == pytest.approx(runs["inductor"]["val_loss_before"], rel=1e-6)
    compressed = [s["name"] for s in runs["velora_site=*q_proj.lora_A*"]["report"]["compressed"]]
    assert compressed and all("q_proj.lora_A" in name for name in compressed), compressed
    assert "include=['*q_proj.lora_A*']" in doc["regimes"]["velora_site=*q_proj.lora_A*"]
    rows = {r["regime"]: r for r in doc["summary"]}
    assert math.isfinite(rows["exact_eager"]["delta_vs_inductor_pct"])
