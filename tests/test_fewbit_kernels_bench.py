"""benchmarks/fewbit_kernels.py times few-bit layouts on a GPU; here (CPU, eager) each layout must
decode to the codec's own gradient, so the timings compare equal work."""
import pathlib

import pytest
import torch
from script_loader import load_script

from velora_fx.codecs.fewbit_levels import fit_levels

bench = load_script(pathlib.Path(__file__).parents[1] / "benchmarks" / "fewbit_kernels.py", "fewbit_kernels")


@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 32)])
def test_every_layout_decodes_to_the_codecs_gradient(shape):
    levels = fit_levels("gelu_tanh", bench.BITS)
    x = (3 * torch.randn(shape)).bfloat16()
    grad = torch.randn(shape).bfloat16()
    expected = (grad.float() * levels.decode(levels.encode(x.float()), torch.float32)).bfloat16()
    sizes = {}
    for name, (encode, decode) in bench.make_layouts(levels).items():
        codes = encode(x)
        torch.testing.assert_close(decode(codes, grad), expected, rtol=0, atol=0, msg=name)
        sizes[name] = sum(c.numel() for c in codes) if isinstance(codes, tuple) else codes.numel()
    n = x.numel()
    assert sizes == {"packed64": 3 * n // 8, "packed32": 3 * n // 8, "planar": 3 * n // 8, "nibble": n // 2, "byte": n}
