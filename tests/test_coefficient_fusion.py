"""Which form VeLoRA's projection takes for inductor's fusion: below the unroll threshold it sums
over blocks of 8 features when the kernel producing the activation is element-wise (a GELU, SiLU·up)
or carries only 8-wide encodes (few-bit planes), and keeps the plain sum beside other reductions (an
int8 codec's 64-wide scales, a norm's statistics), where inductor would read the activation again.
The kernels themselves are checked on generated Triton code (tests/test_triton_codegen_bench.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from velora_fx.codecs.velora import fusable_block
from velora_fx.passes.pipeline import _widths_beside

aten = torch.ops.aten
D = 64


def _trace(fn, *shapes):
    from torch._decomp import core_aten_decompositions
    return make_fx(fn, decomposition_table=core_aten_decompositions())(*(torch.randn(s) for s in shapes))


def _node(gm, target, index=-1):
    return [n for n in gm.graph.nodes if n.target == target][index]


def _activation(gm):
    """The tensor the last matmul reads (the down projection's input)."""
    return _node(gm, aten.mm.default).args[0]


def test_gelu_beside_fewbit_planes_sums_over_blocks_of_eight():
    gm = _trace(lambda x, w1, w2: F.gelu(x @ w1, approximate="tanh") @ w2, (4, D), (D, D), (D, D))
    gelu_input = _node(gm, aten.mm.default, 0)
    beside = _widths_beside(_activation(gm), {gelu_input.name: 8})
    assert beside == (8,)
    assert fusable_block(2, D, beside) == 8 and fusable_block(4, D, beside) == 8


def test_elementwise_producer_without_encodes_sums_over_blocks_of_eight():
    gm = _trace(lambda x, w1, w2: torch.relu(x @ w1) @ w2, (4, D), (D, D), (D, D))
    assert _widths_beside(_activation(gm), {}) == ()
    assert fusable_block(2, D, ()) == 8


def test_silu_up_beside_int8_scales_keeps_the_plain_sum():
    gm = _trace(lambda x, wg, wu, wd: (F.silu(x @ wg) * (x @ wu)) @ wd, (4, D), (D, D), (D, D), (D, D))
    gate, up = _node(gm, aten.mm.default, 0), _node(gm, aten.mm.default, 1)
    beside = _widths_beside(_activation(gm), {gate.name: 64, up.name: 64})
    assert sorted(beside) == [64, 64]
    assert fusable_block(2, D, beside) == 2


def test_normalised_input_keeps_the_plain_sum():
    def rms_norm_then_linear(x, w, wq):
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return h @ wq

    gm = _trace(rms_norm_then_linear, (4, D), (D,), (D, D))
    beside = _widths_beside(_activation(gm), {})
    assert 0 in beside and fusable_block(2, D, beside) == 2


@pytest.mark.parametrize("norm", [lambda x: F.layer_norm(x, (D,)), lambda x: torch.softmax(x, -1)])
def test_any_reduction_in_the_producer_counts(norm):
    gm = _trace(lambda x, w: norm(x) @ w, (4, D), (D, D))
    assert fusable_block(2, D, _widths_beside(_activation(gm), {})) == 2
