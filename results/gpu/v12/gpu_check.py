"""GPU check of offload: gradients against plain inductor over steps with new inputs (fp32), and the
host cost of the four ops (eager, 1 MiB tensors)."""
import json, os, time, torch, torch.nn as nn
import velora_fx
from velora_fx.offload import ops  # noqa
out = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}
D, T, L = 2048, 8192, 8
class M(nn.Module):
    def __init__(s):
        super().__init__()
        s.l = nn.ModuleList(nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)) for _ in range(L))
    def forward(s, x):
        for b in s.l: x = x + b(x)
        return x.pow(2).mean()
torch.manual_seed(0)
m = M().cuda()
xs = [torch.randn(T, D, device="cuda") for _ in range(3)]
def run(backend):
    torch._dynamo.reset()
    cm = torch.compile(m, backend=backend)
    res = []
    for x in xs:
        for p in m.parameters(): p.grad = None
        loss = cm(x); loss.backward()
        res.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    return res
ref = run("inductor")
b = velora_fx.backend(memory_budget=0.5, offload=True)
got = run(b)
errs = [max(((g - r).norm() / r.norm()).item() for g, r in zip(gg, rr)) for (_, gg), (_, rr) in zip(got, ref)]
out["grad_rel_err_per_step"] = errs
out["loss_diff"] = [abs(a - c) for (a, _), (c, _) in zip(got, ref)]
rep = b.report().graphs[-1]
out["offloaded"] = (rep.offload or {}).get("offloaded_bytes"), len((rep.offload or {}).get("tensors", []))
out["message"] = rep.message[:600]
# host cost of the ops
x = torch.randn(1 << 18, device="cuda")
for _ in range(10):
    h = torch.ops.velora_fx.offload_finish(torch.ops.velora_fx.offload_start(x), x)
    torch.ops.velora_fx.reload_finish(torch.ops.velora_fx.reload_start(h, x.device), h, x.device)
torch.cuda.synchronize(); n = 200; t = time.perf_counter()
for _ in range(n):
    h = torch.ops.velora_fx.offload_finish(torch.ops.velora_fx.offload_start(x), x)
    y = torch.ops.velora_fx.reload_finish(torch.ops.velora_fx.reload_start(h, x.device), h, x.device)
out["host_us_per_4_ops"] = (time.perf_counter() - t) / n * 1e6
torch.cuda.synchronize()
out["roundtrip_equal"] = bool(torch.equal(y, x))
print(json.dumps(out, indent=1))
json.dump(out, open(os.environ["OUT"] + "/gpu_check.json", "w"), indent=1)
