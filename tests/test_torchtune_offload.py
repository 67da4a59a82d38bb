"""benchmarks/torchtune_offload.py: torchtune's OffloadActivations read out of a wheel (the GPU machine
has no torchtune and no package index), with stand-ins for the imports the class does not use.

A stand-in wheel with the same imports as torchtune 0.6.1's module checks the loader here (CI has no
network for the real wheel); the class is then a working saved-tensors hook, and nothing of the
stand-ins is left in ``sys.modules``."""
import sys
import zipfile

import pytest
import torch

from script_loader import load_script
from test_bench_runner import BENCH

# the imports of torchtune/training/_activation_offloading.py (0.6.1), and a class using each name
FAKE_MODULE = '''
import psutil
import torch
import torchao
from torch.autograd.graph import saved_tensors_hooks
from torchao.dtypes.nf4tensor import NF4Tensor
from torchtune.modules import TiedLinear
from torchtune.utils import get_logger

log = get_logger("DEBUG")


class OffloadActivations(saved_tensors_hooks):
    def __init__(self, use_pin_memory=True, use_streams=True):
        self.packed = 0

        def pack(t):
            assert not isinstance(t, NF4Tensor) and psutil.virtual_memory().percent >= 0
            self.packed += 1
            return t.clone()

        super().__init__(pack, lambda t: t)
'''


@pytest.fixture()
def loader():
    sys.path.insert(0, str(BENCH))
    return load_script(BENCH / "torchtune_offload.py", "_bench_torchtune_offload")


def _wheel(path, files):
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return str(path)


def test_the_class_loads_from_a_wheel_and_hooks_saved_tensors(loader, tmp_path):
    before = set(sys.modules)
    wheel = _wheel(tmp_path / "torchtune-0.6.1-py3-none-any.whl", {loader.MODULE_PATH: FAKE_MODULE})
    hooks = loader.load_offload_activations(wheel)(use_pin_memory=False, use_streams=False)
    assert not {m for m in set(sys.modules) - before if m.split(".")[0] in ("torchtune", "torchao")}
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(4, 3)
    with hooks:
        y = (x @ w).tanh().sum()
    y.backward()
    assert hooks.packed > 0
    torch.testing.assert_close(x.grad, ((1 - (x.detach() @ w).tanh() ** 2) @ w.T))


def test_a_missing_wheel_or_module_is_named(loader, tmp_path):
    with pytest.raises(FileNotFoundError, match="torchtune wheel not found"):
        loader.load_offload_activations(str(tmp_path / "nothing.whl"))
    other = _wheel(tmp_path / "other.whl", {"other/__init__.py": ""})
    with pytest.raises(ValueError, match="no torchtune/training/_activation_offloading.py"):
        loader.load_offload_activations(other)


def test_bench_memory_skips_it_off_cuda(tmp_path):
    """The regime parses, and on a CPU run it is skipped with the reason (it copies on a CUDA stream)."""
    from test_bench_runner import _load, _main
    bm = _load("bench_memory")
    want = bm.Regime("eager_torchtune_offload", "eager", torchtune_offload=True)
    assert bm.parse_regime("eager_torchtune_offload") == want
    assert bm.parse_regime("inductor_torchtune_offload").family == "inductor"
    _main("bench_memory", "--device", "cpu", "--models", "gpt2", "--layers", "1", "--hidden", "32", "--batch", "1",
          "--seq", "16", "--vocab", "128", "--steps", "1", "--rounds", "1", "--warmup", "1", "--no-grad-cos",
          "--compiler", "eager", "--regimes", "eager", "eager_torchtune_offload", "inductor_torchtune_offload",
          "--out", str(tmp_path))
    import json
    rows = {r["regime"]: r for r in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert rows["eager"]["status"] == "ok"
    assert rows["eager_torchtune_offload"]["status"] == "skipped"
    assert "CUDA" in rows["eager_torchtune_offload"]["note"]
    assert rows["inductor_torchtune_offload"]["status"] == "skipped"
