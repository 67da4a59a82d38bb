"""The example scripts run end to end (tiny settings): examples/finetune_lora.py, examples/vit_classify.py.

The ``compiler="eager"`` runs (same rewrite and partitioner, no codegen) take seconds; the inductor
runs compile real kernels and are marked slow.
"""
import math
import pathlib
import sys

import pytest
import torch

from script_loader import load_script

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    return load_script(EXAMPLES / f"{name}.py", f"_example_{name}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_report(report) -> None:
    assert report.graphs, "the velora backend compiled no graph"
    assert report.compressed, "nothing compressed"
    assert report.saved_bytes_after < report.saved_bytes_before
    assert "sites compressed" in report.table()


def _check_finetune(result, labels) -> None:
    assert math.isfinite(result["pretrain_loss"]) and math.isfinite(result["val_loss_before"])
    assert [r["label"] for r in result["runs"]] == labels
    for run in result["runs"]:
        for key in ("train_loss", "val_loss", "step_s", "first_step_s"):
            assert math.isfinite(run[key]) and run[key] >= 0, (run["label"], key, run[key])
        assert run["val_loss"] < math.log(256) + 1  # near or below uniform over bytes: not diverged
        assert run["trainable_params"] > 0
    _check_report(result["report"])
    # the LoRA adapters (not the frozen base weights) are what gets approximated; the exact loss
    # head (on by default since v15) replaces the frozen lm_head's logits without approximating
    approximated = [s for s in result["report"].compressed if s.codec != "chunked_loss"]
    assert approximated and all("lora_" in s.name for s in approximated)


def _check_vit(result, labels) -> None:
    assert [r["label"] for r in result["runs"]] == labels
    for run in result["runs"]:
        assert math.isfinite(run["train_loss"]) and math.isfinite(run["val_loss"])
        assert isinstance(run["val_acc"], float) and 0.0 <= run["val_acc"] <= 1.0
        assert run["history"] and all(0.0 <= h["val_acc"] <= 1.0 for h in run["history"])
    _check_report(result["report"])


def test_finetune_lora_eager_compare(capsys):
    result = _load("finetune_lora").main(["--steps", "3", "--pretrain-steps", "3", "--val-batches", "2",
                                          "--compiler", "eager", "--compare", "--quiet"])
    _check_finetune(result, ["velora", "aot_eager"])
    out = capsys.readouterr().out
    assert "val loss" in out and "activations saved for backward" in out
    # CPU step times (velora vs the baseline) are noise: no timing columns, a note saying so instead
    assert "step (median)" not in out and " ms " not in out and "first step" not in out
    assert "not benchmark results" in out


def _harness():
    return load_script(EXAMPLES / "_harness.py", "_example_harness")


class _Report:
    def table(self):
        return "<report table>"


def _fake_run(label, cuda):
    return {"label": label, "val_loss": 1.25, "step_s": 0.0157 if label == "velora" else 0.0546,
            "first_step_s": 3.0, "peak_mem_bytes": 2**20 if cuda else None, "cuda": cuda, "report": _Report()}


@pytest.mark.parametrize("cuda", [False, True])
def test_print_runs_times_only_on_gpu(capsys, cuda):
    _harness().print_runs([_fake_run("velora", cuda), _fake_run("inductor", cuda)], [("val loss", "val_loss", ".4f")])
    out = capsys.readouterr().out
    assert "1.2500" in out and "<report table>" in out
    if cuda:
        assert "step (median)" in out and "15.7 ms" in out and "54.6 ms" in out and "1.0 MiB" in out
        assert "not benchmark results" not in out
    else:
        assert "step (median)" not in out and "15.7" not in out and "54.6" not in out
        assert "not benchmark results" in out


def test_vit_classify_eager_compare(capsys):
    pytest.importorskip("sklearn")
    result = _load("vit_classify").main(["--steps", "3", "--compiler", "eager", "--compare", "--quiet"])
    _check_vit(result, ["velora", "aot_eager"])
    out = capsys.readouterr().out
    assert "val accuracy" in out and "activations saved for backward" in out


def test_vit_classify_epochs_and_accuracy_per_epoch(capsys):
    """Two short epochs (batch 512 -> 2 steps each): one accuracy line per epoch."""
    pytest.importorskip("sklearn")
    result = _load("vit_classify").main(["--epochs", "2", "--batch-size", "512", "--compiler", "eager", "--quiet"])
    history = result["runs"][0]["history"]
    assert [h["epoch"] for h in history] == [1, 2] and [h["step"] for h in history] == [2, 4]
    assert capsys.readouterr().out.count("val accuracy") == 2


def test_vit_classify_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn -> ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit) as exc:
        _load("vit_classify").main(["--steps", "1", "--compiler", "eager", "--quiet"])
    assert "pip install scikit-learn" in str(exc.value.code)


@pytest.mark.slow
def test_finetune_lora_inductor():
    result = _load("finetune_lora").main(["--steps", "3", "--pretrain-steps", "3", "--val-batches", "2", "--quiet"])
    _check_finetune(result, ["velora"])


@pytest.mark.slow
def test_vit_classify_inductor():
    pytest.importorskip("sklearn")
    result = _load("vit_classify").main(["--steps", "3", "--quiet"])
    _check_vit(result, ["velora"])
