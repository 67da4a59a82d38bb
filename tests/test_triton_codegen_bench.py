"""benchmarks/triton_codegen.py: inductor's Triton kernels, generated without a GPU.  The few-bit
codes of GPT-2's ``gelu_new`` are written by the activation's own kernel, as bit planes straight
into the saved buffer, and cost the forward no kernel launch over VeLoRA + the head alone; the
VeLoRA coefficients of the down projection's input (g = 2) are written by that kernel too (GELU
beside few-bit planes; Llama's SiLU·up without int8 codes), not by a kernel reading it again.

Needs a CUDA build of torch and the ``triton`` package it brings (not a GPU; CI's CPU wheel has neither).
The script patches inductor for its whole process, so it runs in a subprocess."""
import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest
import torch

SCRIPT = pathlib.Path(__file__).parents[1] / "benchmarks" / "triton_codegen.py"


def _run(tmp_path, *args):
    out = tmp_path / "codegen.json"
    subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(out)], check=True, capture_output=True,
                   timeout=900)
    return {r["regime"]: r["graphs"] for r in json.loads(out.read_text())["regimes"]}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.version.cuda is None,
                    reason="needs a CUDA build of torch and the triton package it brings")
def test_fewbit_codes_are_written_by_the_activations_kernel(tmp_path):
    regimes = _run(tmp_path, "--regimes", "velora_head", "default")
    forward, head_forward = regimes["default"][0], regimes["velora_head"][0]
    assert forward["triton_launches"] == head_forward["triton_launches"], (forward, head_forward)
    # the kernels that compute the GELU (torch 2.12 also recomputes it in the VeLoRA projection's)
    planes = {k["kernel"]: [w for w in k["writes"].values() if "torch.uint8" in w] for k in forward["marked_kernels"]}
    writers = [k for k, written in planes.items() if written]
    assert len(writers) == 1, forward
    assert len(planes[writers[0]]) == 3 and all(w.startswith("a slice of (3,") for w in planes[writers[0]]), forward


def _coefficient_slices(kernel: dict) -> list[str]:
    """What a kernel writes into the blocked [..., D/8, 4] coefficients (g = 2: 4 sub-tokens a block)."""
    return [w for w in kernel["writes"].values() if w.startswith("a slice of (") and w.split("), (")[0].endswith(", 4")]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.version.cuda is None,
                    reason="needs a CUDA build of torch and the triton package it brings")
def test_coefficients_are_written_by_the_activations_kernel(tmp_path):
    gpt2 = _run(tmp_path, "--regimes", "default", "max_memory")
    for regime in ("default", "max_memory"):
        (gelu,) = [k for k in gpt2[regime][0]["marked_kernels"] if _coefficient_slices(k)]
        assert len(_coefficient_slices(gelu)) == 4, gelu
        assert sum("torch.uint8" in w for w in gelu["writes"].values()) == 3, gelu  # and the few-bit planes
    llama = _run(tmp_path, "--model", "llama", "--dtype", "bfloat16", "--regimes", "velora_head", "default")
    (silu,) = [k for k in llama["velora_head"][0]["marked_kernels"] if _coefficient_slices(k)]
    assert len(_coefficient_slices(silu)) == 4, silu
    # beside the int8 gate/up codes' 64-wide scales the plain sum stays (a kernel of its own)
    assert not any(_coefficient_slices(k) for k in llama["default"][0]["marked_kernels"]), llama["default"]
