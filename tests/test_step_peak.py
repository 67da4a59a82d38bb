"""The step's predicted activation peak (passes/step_peak.py) and its place in the report."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import velora_fx
from velora_fx.passes.partition_probe import SavedSet
from velora_fx.passes.step_peak import predict_step_peak


def _graph(fn, *args) -> fx.GraphModule:
    from torch.fx.experimental.proxy_tensor import make_fx
    return make_fx(fn)(*args)


def test_liveness_walk_counts_what_is_alive_together():
    """forward: a = x @ w (an mm: materialised), b = relu(a) (pointwise, read by an mm: materialised),
    c = b @ w; outputs c and the saved b.  Backward: the saved b, t @ w.t() (an mm), the mask b > 0
    (pointwise, fused into the product: not counted) and the product (an output): the kernel that
    writes the product reads b through the mask, so b, the mm and the product are alive together."""
    x, w = torch.randn(8, 4), torch.randn(4, 4)
    fwd = _graph(lambda x, w: (lambda b: (b @ w, b))(torch.relu(x @ w)), x, w)
    bwd = _graph(lambda b, t, w: ((t @ w.t()) * (b > 0),), torch.randn(8, 4), torch.randn(8, 4), w)
    relu = next(n for n in fwd.graph.nodes if "relu" in n.name)
    saved_name = next(n.name for n in bwd.graph.find_nodes(op="placeholder"))
    tile = 8 * 4 * 4
    saved = SavedSet({saved_name: relu.name}, {}, {relu.name: tile}, fwd, bwd)
    peak = predict_step_peak(saved)
    assert peak.saved == tile
    # forward: x @ w (freed after relu reads it) overlaps relu's output, then c joins b
    assert peak.forward == 2 * tile  # a and b alive together; then b and c
    assert peak.backward == 3 * tile  # b and the mm are read by the kernel writing the product


def _log_softmax_nll(logits: torch.Tensor, targets: torch.Tensor, keep: bool = False):
    """transformers' loss as inductor sees it: the upcast logits viewed as rows, a log-softmax from
    primitive ops, the targets' entries gathered (``keep``: the log-probabilities returned too)."""
    rows = torch.ops.prims.convert_element_type(logits, torch.float32).view(-1, logits.shape[-1])
    shifted = rows - rows.amax(1, keepdim=True)
    logp = shifted - shifted.exp().sum(1, keepdim=True).log()
    loss = -logp.gather(1, targets.view(-1, 1)).mean()
    for _ in range(48):  # a graph of model size, so the loss's chain is local (``reads_far``)
        loss = loss * 1.0
    return (loss, logp) if keep else (loss,)


@pytest.mark.parametrize("keep", [False, True])
def test_fused_log_softmax_is_not_counted_unless_returned(keep):
    """The fp32 upcast (read through a view by a reduction) and the log-probabilities (read by the
    gather) are computed inside inductor's kernels: the forward's peak holds no fp32 copy of the
    logits (measured on GPT-2: saved set + the bf16 logits' gradient).  Returned, they are written."""
    logits, targets = torch.randn(4, 16, 1000, dtype=torch.bfloat16), torch.randint(0, 1000, (4, 16))
    fwd = _graph(lambda x, t: _log_softmax_nll(x, t, keep), logits, targets)
    bwd = _graph(lambda g: (g * 2,), torch.randn(()))
    peak = predict_step_peak(SavedSet({}, {}, {}, fwd, bwd))
    fp32_logits = logits.numel() * 4
    if keep:
        assert peak.forward >= fp32_logits
    else:
        assert peak.forward < fp32_logits // 8


class LM(nn.Module):
    def __init__(self, vocab=2000, d=16):
        super().__init__()
        self.emb, self.fc, self.head = nn.Embedding(vocab, d), nn.Linear(d, d), nn.Linear(d, vocab, bias=False)

    def forward(self, ids, targets):
        return F.cross_entropy(self.head(torch.tanh(self.fc(self.emb(ids)))).float().flatten(0, 1), targets.flatten())


@pytest.mark.usefixtures("strict_pass")
def test_report_predicts_the_peak_and_the_head_lowers_it():
    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (4, 64))
    backend = velora_fx.backend(codecs=["chunked_loss"], loss_chunk_size=64, compiler="eager")
    model = LM()  # the report lives as long as the model
    torch.compile(model, backend=backend)(ids, ids).backward()
    report = backend.report()
    (graph,) = report.graphs
    before, after = graph.predicted_peak["before"], graph.predicted_peak["after"]
    assert after["saved"] == graph.saved_bytes_after and before["saved"] == graph.saved_bytes_before
    assert after["peak"] >= after["saved"] and before["peak"] >= before["saved"]
    logits = 4 * 64 * 2000 * 4
    assert before["peak"] >= before["saved"] + logits // 2  # the baseline's logits sit on its peak
    assert after["peak"] < before["peak"] - logits // 2   # the head: one 64-row chunk at a time
    assert report.predicted_peak("after") == after["peak"]
    assert "predicted activation peak" in report.table()
    assert report.to_dict()["predicted_peak_after"] == after["peak"]
