"""The chunked linear + cross-entropy head (velora_fx.codecs.chunked_loss).

Reference everywhere: ``F.cross_entropy(F.linear(h, W, b).float(), t, ...)`` on the flattened
rows.  For fp64 inputs the reference keeps fp64 (``.to(promote_types(dtype, fp32))``) because the
implementation does: a literal ``.float()`` would round fp64 logits to fp32.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from velora_fx.codecs.chunked_loss import linear_cross_entropy, supported_call

aten = torch.ops.aten


def reference(h, w, t, b=None, ignore_index=-100, reduction="mean"):
    logits = F.linear(h, w, b).reshape(-1, w.shape[0])
    logits = logits.to(torch.promote_types(h.dtype, torch.float32))
    return F.cross_entropy(logits, t.reshape(-1), ignore_index=ignore_index, reduction=reduction)


def make_inputs(shape, d, v, dtype, bias, seed, p_ignore=0.0, ignore_index=-100):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64) / d ** 0.5
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    t = torch.randint(0, v, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < p_ignore] = ignore_index
    leaves = [x.to(dtype).requires_grad_() if x is not None else None for x in (h, w, b)]
    return (*leaves, t)


def loss_and_grads(fn, h, w, b, t, scale=1.0, **kw):
    loss = fn(h, w, t, b, **kw)
    params = [x for x in (h, w, b) if x is not None and x.requires_grad]
    grads = torch.autograd.grad(loss * scale, params)
    return loss, grads


def assert_rel_close(actual, expected, rel):
    """Normwise: max |actual - expected| <= rel * max |expected| (grad entries may cancel to ~0,
    so an elementwise relative test would be meaningless there)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    a, e = actual.double(), expected.double()
    if torch.isnan(e).any():
        assert torch.equal(torch.isnan(a), torch.isnan(e))
        a, e = a.nan_to_num(), e.nan_to_num()
    err = (a - e).abs().max().item() if e.numel() else 0.0
    scale = e.abs().max().item() if e.numel() else 0.0
    assert err <= rel * scale + 1e-30, (err, scale)


def check_against_reference(h, w, b, t, rel, scale=1.0, **kw):
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, scale, **kw)
    kw.pop("chunk_size", None)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, scale, **kw)
    assert_rel_close(loss, ref_loss, rel)
    assert len(grads) == len(ref_grads)
    for g, rg in zip(grads, ref_grads):
        assert_rel_close(g, rg, rel)
    return loss, grads


@st.composite
def cases(draw):
    n = draw(st.integers(1, 64))
    if draw(st.booleans()):
        bsz = draw(st.sampled_from([k for k in range(1, n + 1) if n % k == 0]))
        shape = (bsz, n // bsz)                                  # leading [B, T]
    else:
        shape = (n,)
    return dict(
        shape=shape,
        d=draw(st.integers(1, 24)),
        v=draw(st.integers(1, 80)),
        chunk_size=draw(st.one_of(st.integers(1, 70), st.sampled_from([n, n + 1, 4096]))),
        bias=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        p_ignore=draw(st.sampled_from([0.0, 0.3, 0.8])),
        ignore_index=draw(st.sampled_from([-100, 0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@given(case=cases())
def test_matches_reference(dtype, rel, case):
    h, w, b, t = make_inputs(case["shape"], case["d"], case["v"], dtype, case["bias"], case["seed"],
                             case["p_ignore"], case["ignore_index"])
    loss, grads = check_against_reference(h, w, b, t, rel, chunk_size=case["chunk_size"],
                                          reduction=case["reduction"], ignore_index=case["ignore_index"])
    assert loss.dtype == torch.promote_types(dtype, torch.float32) and loss.dim() == 0
    assert grads[0].shape == h.shape


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_all_ignored(reduction, chunk_size):
    h, w, b, t = make_inputs((2, 5), 6, 11, torch.float64, True, 0, p_ignore=1.0)
    loss, grads = check_against_reference(h, w, b, t, 1e-12, chunk_size=chunk_size, reduction=reduction)
    # like PyTorch: sum -> 0, mean -> nan (0/0); the gradients are exactly zero either way
    assert torch.isnan(loss).item() if reduction == "mean" else loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [1, 2])
def test_half_precision_against_reference(dtype, reduction, seed):
    # Tolerance: bf16 keeps an 8-bit significand (fp16 11 bits): relative rounding u = 2^-8
    # (2^-11).  Both paths compute the same fp32 grad_logits and round them to the input dtype,
    # but at different points: the reference's matmuls round each full product once, while here
    # grad_W/grad_b are rounded once per chunk and then summed in fp32 (and a grad_logits entry
    # right at a rounding boundary may land on the other side).  So an entry may differ by a few
    # ulps *of the magnitudes summed*, which can be far larger than the (cancelling) result: we
    # bound |ours - ref| <= 8u * (|G| |X|) with G the exact fp64 logits gradient and X the other
    # matmul operand (measured: <= 2u over 30 seeds), plus a few subnormal spacings because the
    # small per-chunk fp16 partials of a mean loss underflow to subnormals.  The loss is reduced
    # in fp32 from the same input-dtype logits: at most ~1 ulp of the largest logit apart.
    u = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    subnormal = torch.finfo(dtype).smallest_normal * 2 * u
    h, w, b, t = make_inputs((3, 40), 32, 300, dtype, True, seed, p_ignore=0.2)
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, chunk_size=16, reduction=reduction)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, reduction=reduction)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)

    hd, wd, bd = h.detach().double().reshape(-1, 32), w.detach().double(), b.detach().double()
    logits = hd @ wd.T + bd
    valid = t.reshape(-1) != -100
    G = torch.softmax(logits, -1) - F.one_hot(t.reshape(-1).clamp(min=0), 300).double()
    G = G * valid[:, None]
    if reduction == "mean":
        G = G / valid.sum()
    bounds = [(G.abs() @ wd.abs()).reshape(h.shape), G.abs().T @ hd.abs(), G.abs().sum(0)]
    for g, rg, bound in zip(grads, ref_grads, bounds):
        assert ((g.double() - rg.double()).abs() <= 8 * u * bound + 8 * subnormal).all()
    assert abs(loss.item() - ref_loss.item()) <= u * logits.abs().max().item()
    # and our result is about as close to the exact fp64 gradient as the reference is
    exact = [G @ wd, G.T @ hd, G.sum(0)]
    for g, rg, e in zip(grads, ref_grads, exact):
        e = e.reshape(g.shape)
        assert (g.double() - e).norm() <= 2 * (rg.double() - e).norm() + u * e.norm()


@pytest.mark.parametrize("n,chunk_size", [(8192, 1024), (4096, 128)])   # the backend's default chunk; 32 chunks
def test_half_precision_error_does_not_grow_with_chunks(n, chunk_size):
    # Normwise error against the exact fp64 gradients of the same bf16 inputs, in units of the
    # unchunked bf16 reference's error.  That one rounds grad_logits and the full product once
    # each; the chunked weight gradient also rounds each chunk's product to bf16 (like eager), and
    # those roundings add up to about one more: <= sqrt(2) of the reference (measured 1.2-1.3x).
    # Summing the chunks in bf16 rounds the running sum once per chunk: 1.8x at 8 chunks, 3.4x at 32.
    d, v = 64, 512
    h, w, b, t = make_inputs((n,), d, v, torch.bfloat16, True, 11)
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, chunk_size=chunk_size)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t)
    hd, wd, bd = (x.detach().double().requires_grad_() for x in (h, w, b))
    exact_loss, exact = loss_and_grads(reference, hd, wd, bd, t)

    def err(x, e):
        return ((x.double() - e).norm() / e.norm()).item()
    for name, g, rg, e in zip("hwb", grads, ref_grads, exact):
        assert g.dtype == torch.bfloat16
        assert err(g, e) <= 1.5 * err(rg, e), (name, err(g, e), err(rg, e))
    # the loss is summed in fp32 across chunks: as close to exact as the reference's
    assert loss.dtype == ref_loss.dtype == torch.float32
    ref_err = abs(ref_loss.item() - exact_loss.item())
    assert abs(loss.item() - exact_loss.item()) <= 2 * ref_err + 1e-6 * exact_loss.item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_dtype_fp32_for_fp64_inputs(reduction):
    # fp64 logits ``.float()`` (what the graph rewrite passes for such a model): loss and softmax
    # in fp32 as in the reference, the gradients back in fp64
    h, w, b, t = make_inputs((3, 7), 10, 17, torch.float64, True, 12, p_ignore=0.3)
    loss, grads = loss_and_grads(linear_cross_entropy, h, w, b, t, chunk_size=5, reduction=reduction,
                                 loss_dtype=torch.float32)
    ref_loss = F.cross_entropy(F.linear(h, w, b).reshape(-1, 17).float(), t.reshape(-1), reduction=reduction)
    ref_grads = torch.autograd.grad(ref_loss, (h, w, b))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float64 for g in grads)
    assert_rel_close(loss, ref_loss, 1e-6)
    for g, rg in zip(grads, ref_grads):
        assert_rel_close(g, rg, 1e-6)
    with pytest.raises(ValueError, match="loss_dtype"):
        linear_cross_entropy(h, w, t, b, loss_dtype=torch.bfloat16)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_weight_only_hidden_grad(bias):
    h, w, b, t = make_inputs((4, 5), 8, 13, torch.float64, bias, 2, p_ignore=0.2)
    w.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x, lambda x: x):
        loss = linear_cross_entropy(h, w, t, b, chunk_size=3)
    assert saved == [torch.Size([20, 8])]          # only grad_hidden is computed and kept
    loss.backward()
    assert w.grad is None and (b is None or b.grad is None)
    ref_h = h.detach().clone().requires_grad_()
    reference(ref_h, w, t, b).backward()
    assert_rel_close(h.grad, ref_h.grad, 1e-12)


def test_frozen_bias_trainable_weight():
    h, w, b, t = make_inputs((9,), 8, 13, torch.float64, True, 3)
    b.requires_grad_(False)
    h.requires_grad_(False)
    check_against_reference(h, w, b, t, 1e-12, chunk_size=4)   # grads of w only


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_grad_output_scaling(dtype, rel, reduction):
    h, w, b, t = make_inputs((3, 7), 10, 17, dtype, True, 4, p_ignore=0.3)
    loss = linear_cross_entropy(h, w, t, b, chunk_size=5, reduction=reduction)
    (loss * 3.5).backward()
    ours = [x.grad for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    (reference(h, w, t, b, reduction=reduction) * 3.5).backward()
    for g, x in zip(ours, (h, w, b)):
        assert_rel_close(g, x.grad, rel)


def test_no_grad_mode_computes_loss_only():
    h, w, b, t = make_inputs((2, 6), 8, 13, torch.float64, True, 5)
    saved = []
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x) or x, lambda x: x):
        loss = linear_cross_entropy(h, w, t, b, chunk_size=5)
    assert saved == [] and loss.grad_fn is None
    assert_rel_close(loss, reference(h, w, t, b).detach(), 1e-12)


class _Shapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        shapes = [o.shape for o in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(o, torch.Tensor)]
        self.ops.append((func, shapes))
        return out


def test_never_materialises_logits_and_backward_has_no_matmul():
    n, d, v, chunk = 24, 8, 50, 5
    h, w, b, t = make_inputs((n,), d, v, torch.float32, True, 6, p_ignore=0.2)
    saved = []
    with _Shapes() as fwd, torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.shape) or x,
                                                                     lambda x: x):
        loss = linear_cross_entropy(h, w, t, b, chunk_size=chunk)
    numels = [s.numel() for _, shapes in fwd.ops for s in shapes]
    # nothing logits-sized: the largest tensor is a [chunk, V] slice or an input-sized gradient
    assert max(numels) == max(chunk * v, v * d, n * d) < n * v
    assert any(tuple(s) == (chunk, v) for _, shapes in fwd.ops for s in shapes)
    assert sorted(saved) == sorted([torch.Size([n, d]), torch.Size([v, d]), torch.Size([v])])
    with _Shapes() as bwd:
        loss.backward()
    assert not any(f in (aten.mm.default, aten.addmm.default, aten.bmm.default) for f, _ in bwd.ops)


def _boxed_nop(graphs):
    from functorch.compile import make_boxed_func

    def compiler(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm)
    return compiler


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_aot_function_nop_compiler(reduction):
    from torch._functorch.aot_autograd import aot_function
    n, d, v, chunk = 14, 6, 40, 4
    h, w, b, t = make_inputs((2, 7), d, v, torch.float32, True, 7, p_ignore=0.3)
    fw, bw = [], []

    def fn(h, w, b, t):
        return linear_cross_entropy(h, w, t, b, chunk_size=chunk, reduction=reduction)

    traced = aot_function(fn, fw_compiler=_boxed_nop(fw), bw_compiler=_boxed_nop(bw))
    loss, grads = loss_and_grads(lambda h, w, t, b: traced(h, w, b, t), h, w, b, t, scale=2.0)
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, scale=2.0, reduction=reduction)
    assert_rel_close(loss, ref_loss, 1e-5)
    for g, rg in zip(grads, ref_grads):
        assert_rel_close(g, rg, 1e-5)
    # traced with fake tensors: the chunk loop is unrolled, no [N, V] logits in the forward graph,
    # and the backward graph (default partitioner) only scales the saved gradients
    (fw_gm,), (bw_gm,) = fw, bw
    fw_shapes = [tuple(nd.meta["val"].shape) for nd in fw_gm.graph.nodes
                 if isinstance(nd.meta.get("val"), torch.Tensor)]
    assert (n, v) not in fw_shapes and (chunk, v) in fw_shapes
    assert not any(nd.target in (aten.mm.default, aten.addmm.default) for nd in bw_gm.graph.nodes)


@pytest.mark.parametrize("bias", [False, True])
def test_torch_compile_aot_eager(bias):
    torch._dynamo.reset()
    h, w, b, t = make_inputs((3, 5), 8, 21, torch.float32, bias, 8, p_ignore=0.3)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def fn(h, w, t, b):
        return linear_cross_entropy(h, w, t, b, chunk_size=4)

    try:
        loss, grads = loss_and_grads(fn, h, w, b, t, scale=3.5)
    finally:
        torch._dynamo.reset()
    ref_loss, ref_grads = loss_and_grads(reference, h, w, b, t, scale=3.5)
    assert_rel_close(loss, ref_loss, 1e-5)
    for g, rg in zip(grads, ref_grads):
        assert_rel_close(g, rg, 1e-5)


@pytest.mark.parametrize("reduction", ["none", "max", "avg"])
def test_unsupported_reduction_raises(reduction):
    h, w, b, t = make_inputs((4,), 3, 5, torch.float32, False, 0)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction=reduction)
    assert "reduction" in supported_call(reduction)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.0, "8", None, True])
def test_bad_chunk_size_raises(chunk_size):
    h, w, b, t = make_inputs((4,), 3, 5, torch.float32, False, 0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=chunk_size)


def test_supported_call():
    assert supported_call("mean") is None and supported_call("sum", 0.0, None) is None
    assert "label_smoothing" in supported_call("mean", label_smoothing=0.1)
    assert "weight" in supported_call("mean", weight=torch.ones(5))
    assert "reduction" in supported_call("none")


def test_shape_and_dtype_mismatch_raise():
    h, w, b, t = make_inputs((2, 4), 3, 5, torch.float32, True, 0)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(h, w, t.reshape(-1), b)
    with pytest.raises(ValueError, match="dtype"):
        linear_cross_entropy(h, w.detach().double(), t, b)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_next_chunk_waits_for_every_reader_of_the_previous_logits(weight_grad):
    """Each chunk's logits may be freed before the next chunk's are computed only if everything that
    reads them (log-sum-exp, the target gather, the loss term, the gradient) runs first. On CUDA
    inductor fused every chunk's target gather into the final loss sum when only the gradient sums
    ordered the chunks, and all chunks' logits stayed alive (H200, results/gpu/v9/head)."""
    from torch._functorch.aot_autograd import aot_function
    d, v, chunk = 6, 40, 4
    h, w, b, t = make_inputs((3, 5), d, v, torch.float32, True, 9, p_ignore=0.2)
    w.requires_grad_(weight_grad)
    fw = []
    traced = aot_function(lambda h, w, b, t: linear_cross_entropy(h, w, t, b, chunk_size=chunk),
                          fw_compiler=_boxed_nop(fw), bw_compiler=_boxed_nop([]))
    traced(h, w, b, t).backward()
    graph = fw[0].graph
    logits = [nd for nd in graph.nodes if nd.target in (aten.mm.default, aten.addmm.default)
              and tuple(nd.meta["val"].shape)[-1] == v and nd.meta["val"].shape[0] <= chunk]
    waits = [nd for nd in graph.nodes if nd.target is torch.ops.velora_fx.chunk_after.default]
    assert len(logits) == 4 and len(waits) == 3  # 15 rows in chunks of 4

    def ancestors(node):
        seen, todo = set(), [node]
        while todo:
            for inp in todo.pop().all_input_nodes:
                if inp not in seen:
                    seen.add(inp)
                    todo.append(inp)
        return seen

    for previous, wait in zip(logits, waits):
        before = ancestors(wait)
        readers = [u for u in previous.users if u.op == "call_function"]
        assert readers and all(u in before for u in readers), [u for u in readers if u not in before]
