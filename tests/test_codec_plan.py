"""The element-wise codecs' shared planning (passes/codec_plan.py).

Checked here: the few-bit and gated plans depend on ``codec_plan`` and not on each other; an error
estimate reads a bounded sample of the calibration batch, stays close to the full batch's, and is
the same under the fake mode planning runs in."""
from __future__ import annotations

import ast
import pathlib

import torch

from velora_fx.codecs.fewbit import FewBitCodec
from velora_fx.codecs.gated import Int8StorageCodec
from velora_fx.passes import codec_plan

PASSES = pathlib.Path(codec_plan.__file__).parent


def _imports(module: str) -> set[str]:
    tree = ast.parse((PASSES / f"{module}.py").read_text())
    return {node.module.lstrip(".") for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_the_codec_plans_do_not_import_each_other():
    assert "stored_plan" not in _imports("pointwise_plan")
    assert "pointwise_plan" not in _imports("stored_plan")
    assert not {"pointwise_plan", "stored_plan"} & _imports("codec_plan")


def test_error_estimates_read_a_bounded_sample_close_to_the_full_batch():
    x = torch.randn(4096, 512) * torch.linspace(0.5, 2.0, 512)  # 2M values, per-feature scales
    sample = codec_plan._sample(x)
    assert sample.numel() <= codec_plan.ERROR_SAMPLE and sample.shape[-1] == x.shape[-1]
    for codec in (FewBitCodec("gelu", 3), Int8StorageCodec()):
        full, estimate = codec.error(x), codec_plan.estimated_error(codec, x, without_data=1.0)
        assert abs(estimate - full) <= 0.05 * full, (type(codec).__name__, estimate, full)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():  # as planning runs: under AOTAutograd's fake mode, with real calibration values
        assert codec_plan.estimated_error(Int8StorageCodec(), x, without_data=1.0) == estimate
    small = torch.randn(8, 16)
    assert codec_plan._sample(small) is small
    assert codec_plan.estimated_error(Int8StorageCodec(), None, without_data=0.25) == 0.25
