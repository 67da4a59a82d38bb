"""The report's predicted bytes (what each codec says it stores) equal the bytes measured on the
real partition after the rewrite, for every codec with a prediction; the table shows both."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import velora_fx


class GatedBlock(nn.Module):
    """A SwiGLU MLP (gated sites; VeLoRA on down) plus a GELU MLP (few-bit + VeLoRA on fc2)."""

    def __init__(self, d, hidden):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, hidden), nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.down(F.silu(self.gate(h)) * self.up(h))
        return x + self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


@settings(max_examples=6, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # shrinking recompiles: minutes
@given(tokens=st.integers(2, 12), d=st.sampled_from([16, 32]), hidden=st.sampled_from([64, 128]),
       g=st.sampled_from([2, 4]), bits=st.integers(1, 4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_predicted_bytes_equal_the_partition(strict_pass, tokens, d, hidden, g, bits, dtype):
    torch._dynamo.reset()  # one forward code object, many shapes: keep them static
    torch.manual_seed(0)
    model = GatedBlock(d, hidden).to(dtype)
    x = torch.randn(2, tokens, d, dtype=dtype)
    report = velora_fx.explain(model, x, codecs=("velora", "fewbit", "gated"), mode="max_memory",
                               sub_token_size=g, bits=bits)
    compressed = [s for s in report.sites if s.decision == "compressed"]
    assert {s.codec for s in compressed} == {"velora", "fewbit", "gated"}, report.table()
    for s in compressed:
        assert s.predicted_bytes_after is not None, s.name
        assert s.bytes_after == s.predicted_bytes_after, (s.name, s.codec, s.bytes_after, s.predicted_bytes_after)
    assert "pred." in report.table()


def test_skipped_sites_predict_nothing(strict_pass):
    model = GatedBlock(16, 64)
    report = velora_fx.explain(model, torch.randn(2, 4, 16), exclude=["*"])
    assert report.sites and all(s.predicted_bytes_after is None for s in report.sites)
