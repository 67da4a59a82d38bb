"""Toy: does torch's activation offloading (should_offload marks + partitioner flags) work under
inductor on this torch, and what does it cost?  Variants: off, sync, stream, stream+sink+prefetch."""
import json, os, time, inspect, contextlib
import torch, torch.nn as nn
import torch._functorch.config as fc
from torch._functorch.partitioners import min_cut_rematerialization_partition
import torch._inductor.config as ic

out = {"torch": torch.__version__}
D, T, L = 4096, 8192, 8
class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.norm = nn.LayerNorm(D); s.up = nn.Linear(D, 2 * D); s.down = nn.Linear(2 * D, D)
    def forward(s, x):
        return x + s.down(torch.nn.functional.gelu(s.up(s.norm(x))))
class M(nn.Module):
    def __init__(s):
        super().__init__(); s.blocks = nn.ModuleList(Block() for _ in range(L))
    def forward(s, x):
        for b in s.blocks: x = b(x)
        return x.float().pow(2).mean()

marked = {}
from torch._inductor.custom_graph_pass import CustomPartitionerFn
class P(CustomPartitionerFn):
    def __init__(s, fn): s.fn = fn
    def __call__(s, *a, **k): return s.fn(*a, **k)
    def uuid(s): return None
def partitioner(mark):
    def fn(joint, joint_inputs, **kw):
        n = 0
        if mark:
            for node in joint.graph.nodes:
                if node.op == "call_function" and "tangents" not in node.name:
                    node.meta["should_offload"] = True; n += 1
        marked["n"] = n
        fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kw)
        marked["fw_ops"] = sorted({str(n.target) for n in fw.graph.nodes if n.op == "call_function" and ("offload" in str(n.target) or "device_put" in str(n.target) or "stream" in str(n.target) or "event" in str(n.target))})
        return fw, bw
    return P(fn)

def run(variant):
    torch.manual_seed(0)
    m = M().cuda().to(torch.bfloat16)
    flags = dict(enable_activation_offloading=variant != "off")
    if variant in ("stream", "stream_sink_prefetch"):
        flags["activation_offload_separate_stream"] = True
    if variant == "stream_sink_prefetch":
        flags.update(activation_offload_sink_wait=True, activation_reload_prefetch=True)
    torch._dynamo.reset()
    res = {}
    try:
        with fc.patch(**flags), ic.patch(custom_partitioner_fn=partitioner(variant != "off")), fc.patch(enable_autograd_cache=False):
            cm = torch.compile(m)
            x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
            loss = cm(x); loss.backward()
        g = [p.grad.clone() for p in m.parameters()]
        for p in m.parameters(): p.grad = None
        # eager reference
        m(x).backward(); ge = [p.grad.clone() for p in m.parameters()]
        for p in m.parameters(): p.grad = None
        res["max_rel_grad_diff"] = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(g, ge))
        base = torch.cuda.memory_allocated()
        times = []
        for i in range(8):
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); t = time.perf_counter()
            cm(x).backward(); torch.cuda.synchronize(); times.append(time.perf_counter() - t)
            for p in m.parameters(): p.grad = None
        res["step_ms"] = sorted(times)[len(times) // 2] * 1e3
        res["peak_above_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        res.update(marked)
    except Exception as e:
        import traceback; res["error"] = repr(e)[:800]; res["tb"] = traceback.format_exc()[-1500:]
    return res

for v in ("off", "sync", "stream", "stream_sink_prefetch", "off"):
    out[v + ("_2" if v in out else "")] = run(v)
    print(v, out[v + ("_2" if (v + "_2") in out else "")], flush=True)
import torch._functorch._activation_offloading.activation_offloading as ao
open(os.environ.get("OUT", "/tmp") + "/ao_211.py", "w").write(inspect.getsource(ao))
json.dump(out, open(os.environ.get("OUT", "/tmp") + "/toy.json", "w"), indent=1)
