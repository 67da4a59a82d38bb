"""Two gloo processes on CPU: the plan and v come from rank 0 on every rank, under plain compile
and under DistributedDataParallel wrapping a compiled model (DDP's graph-splitting optimizer is
active; this model fits one bucket).  FSDP2 is not covered yet."""
from __future__ import annotations

import datetime
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import velora_fx

WORLD = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.q, self.v = nn.Linear(32, 32), nn.Linear(32, 32)
        self.fc, self.out = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        h = self.norm(x)
        h = x + self.q(h) * torch.sigmoid(self.v(h))
        return self.out(torch.relu(self.fc(h))).square().mean()


def _worker(rank: int, tmp: str, wrap: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = Net()
        torch.manual_seed(100 + rank)  # each rank its own data: its own first batch
        x = torch.randn(4, 16, 32) * (1 + rank)
        backend = velora_fx.backend(compiler="eager")
        if wrap == "ddp":
            run = nn.parallel.DistributedDataParallel(torch.compile(model, backend=backend))
        else:
            run = torch.compile(model, backend=backend)
        for _ in range(2):
            run(x).backward()
        state = {k: {f: (t.clone() if torch.is_tensor(t) else t) for f, t in entry.items()}
                 for k, entry in backend.state_dict(model=model)["sites"].items()}
        plan = dict(backend.model_state(model).plan)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.save((plan, state, grads, len(backend.report(model=model).graphs)), os.path.join(tmp, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run(wrap: str) -> dict:
    """Results travel through files: a multiprocessing Manager would fork the test process, whose
    threads (inductor's compile pool from earlier tests) can deadlock a fork."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, wrap), nprocs=WORLD, join=True)
        return {rank: torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD)}


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_plan_and_v_come_from_rank0(wrap):
    results = _run(wrap)
    (plan0, state0, grads0, graphs0), (plan1, state1, grads1, graphs1) = results[0], results[1]
    assert plan0 == plan1 and any(plan0.values())  # something is compressed, the same everywhere
    assert state0.keys() == state1.keys() and state0
    for key in state0:  # every field of every site (v, its size...) identical
        assert state0[key].keys() == state1[key].keys(), key
        for field, value in state0[key].items():
            same = torch.equal(value, state1[key][field]) if torch.is_tensor(value) else value == state1[key][field]
            assert same, (key, field)
    if wrap == "ddp":
        assert graphs0 == graphs1 >= 1
        for name in grads0:  # DDP averaged the gradients
            torch.testing.assert_close(grads0[name], grads1[name])
