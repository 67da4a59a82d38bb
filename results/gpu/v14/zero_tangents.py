"""Is Llama's unattributed 884 MiB the cache's and logits' zero gradients? Peak with use_cache on/off."""
import json, os, sys, time, torch
sys.path.insert(0, "benchmarks")
from models import llama_like, gpt2_like
res = {}
for name in ["llama_cache", "llama_nocache", "gpt2_cache"]:
    torch.manual_seed(0)
    m = (llama_like(1024, 12, vocab=32000) if name.startswith("llama") else gpt2_like(1024, 12, vocab=32000, activation="gelu_new", dropout=0.1))
    m.config.use_cache = not name.endswith("nocache")
    m = m.to("cuda", torch.bfloat16).train()
    opt = torch.optim.AdamW(m.parameters(), fused=True)
    f = torch.compile(m)
    ids = torch.randint(0, 32000, (8, 1025), device="cuda")
    for i in range(4):
        if i == 3:
            torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); before = torch.cuda.memory_allocated()
        out = f(input_ids=ids[:, :-1], labels=ids[:, :-1])
        keys = list(out.keys())
        loss = out.loss; del out
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    res[name] = {"peak_extra_GiB": (torch.cuda.max_memory_allocated() - before) / 2**30, "outputs": keys}
    print(name, res[name], flush=True)
    del m, opt, f; torch._dynamo.reset(); torch.cuda.empty_cache()
json.dump(res, open(os.path.join(os.environ["OUT"], "zero_tangents.json"), "w"), indent=1)
