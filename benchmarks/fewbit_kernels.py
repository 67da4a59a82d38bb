"""Few-bit codec kernels on their own: what the encode and the decode cost per layout, compiled by
inductor, against the exact GELU backward they replace (where do GPT-2's 4-5 % of step time go?).

Each layout is written as the plain torch ops the codec emits, compiled with ``torch.compile``; the
timings are CUDA-event medians over ``--iters`` calls after warm-up.  Per layout: the encode alone,
the GELU and the encode in one compiled function (what forward runs: does the encode fuse into the
GELU's kernel?), and the decode (against ``exact_backward_ms``, the GELU backward from bf16).  Layouts:

- ``packed64``: 8 codes of 3 bits packed into 3 bytes along the last dim, int64 arithmetic (v15's codec)
- ``packed32``: the same packing with int32 arithmetic (v16's codec)
- ``planar``: 3 bit-planes, one byte per 8 elements each, concatenated into one ``[3, ..., D / 8]``
  tensor (the codec since v17: on a GPU each plane is written into its slice by the GELU's kernel;
  ``benchmarks/triton_codegen.py`` shows the kernels)
- ``nibble``: 4-bit codes, 2 per byte (0.5 B per element instead of 0.375)
- ``byte``: one uint8 code per element

    python benchmarks/fewbit_kernels.py --out results/fewbit_kernels.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from velora_fx.codecs.fewbit_levels import FewBitLevels, fit_levels  # noqa: E402

BITS = 3


def make_layouts(levels: FewBitLevels):
    """Per layout, ``(encode(x), decode(codes, grad))``: the codes of the fit ``levels`` and
    ``grad * q(code)``, both as ``FewBitLevels`` computes them (compared in fp32, as the codec does)."""
    def codes_of(x, dtype):
        return levels.encode(x.float()).to(dtype)

    def gradient(codes, grad):
        return (grad.float() * levels.decode(codes)).to(grad.dtype)

    def packed(dtype):
        def encode(x):
            codes = codes_of(x, dtype)
            groups = codes.view(*x.shape[:-1], x.shape[-1] // 8, 8)
            shifts = torch.arange(0, 8 * BITS, BITS, device=x.device, dtype=dtype)
            word = (groups << shifts).sum(-1, dtype=dtype)
            parts = word.unsqueeze(-1) >> torch.arange(0, 8 * BITS, 8, device=x.device, dtype=dtype)
            return (parts & 255).to(torch.uint8)

        def decode(packed, grad):
            wide = packed.to(dtype)
            word = (wide << torch.arange(0, 8 * BITS, 8, device=grad.device, dtype=dtype)).sum(-1, dtype=dtype)
            groups = (word.unsqueeze(-1) >> torch.arange(0, 8 * BITS, BITS, device=grad.device, dtype=dtype)) & 7
            codes = groups.view(grad.shape)
            return gradient(codes, grad)
        return encode, decode

    def planar_encode(x):
        codes = codes_of(x, torch.int32)
        groups = codes.view(*x.shape[:-1], x.shape[-1] // 8, 8)
        weights = 1 << torch.arange(8, device=x.device, dtype=torch.int32)
        return torch.cat([(((groups >> b) & 1) * weights).sum(-1, dtype=torch.int32).to(torch.uint8).unsqueeze(0)
                          for b in range(BITS)])

    def planar_decode(planes, grad):
        lead, n = grad.shape[:-1], grad.shape[-1]
        position = torch.arange(8, device=grad.device, dtype=torch.int32)
        codes = None
        for b, plane in enumerate(planes):
            bit = ((plane.to(torch.int32).unsqueeze(-1) >> position) & 1) << b
            codes = bit if codes is None else codes | bit
        return gradient(codes.view(*lead, n), grad)

    def nibble_encode(x):
        codes = codes_of(x, torch.int32).view(*x.shape[:-1], x.shape[-1] // 2, 2)
        return (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8)

    def nibble_decode(packed, grad):
        wide = packed.to(torch.int32).unsqueeze(-1) >> torch.tensor([0, 4], device=grad.device, dtype=torch.int32)
        codes = (wide & 15).view(grad.shape)
        return gradient(codes, grad)

    def byte_encode(x):
        return codes_of(x, torch.int32).to(torch.uint8)

    def byte_decode(codes, grad):
        return gradient(codes.to(torch.int32), grad)

    return {"packed64": packed(torch.int64), "packed32": packed(torch.int32), "planar": (planar_encode, planar_decode),
            "nibble": (nibble_encode, nibble_decode), "byte": (byte_encode, byte_decode)}


def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def exact_backward(x, grad):
    """The baseline: GELU's backward recomputed from the saved bf16 input (what inductor runs)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        y = gelu_new(x)
    return torch.autograd.grad(y, x, grad)[0]


def time_ms(fn, *args, iters: int) -> float:
    for _ in range(3):
        fn(*args)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default="results/fewbit_kernels.json")
    args = ap.parse_args()
    levels = fit_levels("gelu_tanh", BITS)
    x = torch.randn(args.tokens, args.width, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn_like(x)
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": list(x.shape),
              "command": "python " + " ".join(sys.argv), "layouts": {}}
    exact = torch.compile(exact_backward)
    record["exact_backward_ms"] = time_ms(exact, x, grad, iters=args.iters)
    record["gelu_forward_ms"] = time_ms(torch.compile(gelu_new), x, iters=args.iters)
    record["read_x_once_ms"] = time_ms(torch.compile(lambda t: t.float().sum()), x, iters=args.iters)
    reference = None
    for name, (encode, decode) in make_layouts(levels).items():
        enc, dec = torch.compile(encode), torch.compile(decode)
        # as in a training step: forward computes the GELU and the codes of its input in one graph
        with_gelu = torch.compile(lambda t, encode=encode: (gelu_new(t), encode(t)))
        codes = enc(x)
        out = dec(codes, grad)
        reference = out if reference is None else reference
        nbytes = sum(c.numel() for c in codes) if isinstance(codes, tuple) else codes.numel()
        record["layouts"][name] = {
            "encode_ms": time_ms(enc, x, iters=args.iters), "decode_ms": time_ms(dec, codes, grad, iters=args.iters),
            "gelu_and_encode_ms": time_ms(with_gelu, x, iters=args.iters),
            "saved_bytes_per_element": nbytes / x.numel(), "equal_to_packed64": bool(torch.equal(out, reference))}
        print(name, record["layouts"][name], flush=True)
    print(json.dumps(record, indent=1))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(record, fh, indent=1)


if __name__ == "__main__":
    main()
