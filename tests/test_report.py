"""Report.table(): a person reading it can tell every site (layer 0 from layer 1, a LoRA adapter
from its base layer) and read every reason and graph message in full, within 120 columns, while
``to_dict()`` stays as it was."""
import dataclasses

import pytest
import torch

import velora_fx
from velora_fx.report import GraphReport, Report, SiteReport

WIDTH = 120


def _site(name, decision="compressed", reason="frees saved bytes", before=8192, after=4106, g=2):
    compressed = decision == "compressed"
    return SiteReport(name=name, consumers=[name], op="mm", shape=(32, 64), dtype="float32", saved_by_baseline=True,
                      saved_forms=["mm"], bytes_before=before, bytes_after=after if compressed else before,
                      decision=decision, reason=reason, sub_token_size=g if compressed else None,
                      approximated=[name] if compressed else [], estimated_error=0.5 if compressed else 0.0,
                      predicted_bytes_after=after if compressed else None)


def _tokens(text):
    return text.split()


def _assert_readable(report, names, reasons, messages=()):
    table = report.table()
    lines = table.splitlines()
    assert "…" not in table, table
    assert max(len(line) for line in lines) <= WIDTH, table
    for name in names:  # whole, on one line: never cut, never broken
        assert any(name in line.split() for line in lines), (name, table)
    flat = "".join(table.split())
    for text in list(reasons) + list(messages):  # whole: every word (and number) intact, in order
        assert "".join(text.split()) in flat, (text, table)
        assert set(_tokens(text)) <= set(_tokens(table)), (text, table)
    return table


LONG_REASON = ("frees 1.5% of the saved bytes for approximating 12.5% of the trained weights "
               "(efficiency 0.12 < min_efficiency=0.2)")
MESSAGE = ("memory_budget: 2605123456 <= 2757138000 bytes with velora + inductor recompute "
           "(activation_memory_budget=0.4687512345) after weighing plans exact, velora, fewbit and velora+fewbit")


def _two_layer_report():
    sites, names, reasons = [], [], []
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}.self_attn"
        group = f"{prefix}.{{q_proj.lora_A.default,v_proj.lora_A.default}}"
        lora_b = [f"{prefix}.{p}.lora_B.default" for p in ("q_proj", "v_proj")]
        qkv = f"model.layers.{layer}.self_attn.{{q_proj,k_proj,v_proj}}"
        down = f"model.layers.{layer}.mlp.down_proj"
        sites += [_site(group), *[_site(n, "skipped", "num_groups=32 does not divide the feature size 4")
                                  for n in lora_b],
                  _site(qkv, "skipped", LONG_REASON), _site(down, g=4)]
        names += [group, *lora_b, qkv, down]
        reasons += [LONG_REASON, "num_groups=32 does not divide the feature size 4", "frees saved bytes"]
    graph = GraphReport(graph_id=0, status="unchanged", message=MESSAGE, sites=sites,
                        saved_bytes_before=2757138000, saved_bytes_after=2605123456)
    return Report(graphs=[graph]), names, reasons


def test_table_shows_every_full_site_name_reason_and_message():
    report, names, reasons = _two_layer_report()
    assert len(set(names)) == len(names) == 10
    table = _assert_readable(report, names, reasons, [MESSAGE])
    # both layers' rows tell themselves apart: each name is on a line of its own kind once
    for name in names:
        assert sum(name in line.split() for line in table.splitlines()) == 1, (name, table)
    assert "2605123456" in _tokens(table) and "2757138000" in _tokens(table)


def test_table_stays_one_line_per_site_when_everything_fits():
    sites = [_site("fc1"), _site("blocks.1.fc2", "skipped", "excluded by include/exclude")]
    report = Report(graphs=[GraphReport(graph_id=0, status="rewritten", sites=sites)])
    lines = report.table().splitlines()
    assert len(lines) == 2 + len(sites) + 1, report.table()  # header, rule, one line per site, total
    assert lines[2].split()[:2] == ["0", "fc1"] and lines[2].endswith("frees saved bytes")
    assert lines[3].split()[:2] == ["0", "blocks.1.fc2"] and lines[3].endswith("excluded by include/exclude")


def test_a_name_wider_than_the_table_is_wrapped_whole_after_punctuation():
    name = ".".join(f"module_{i}" for i in range(20)) + ".{q_proj,k_proj,v_proj}"  # wider than the table
    report = Report(graphs=[GraphReport(graph_id=3, status="rewritten", sites=[_site(name)])])
    lines = report.table().splitlines()
    assert max(len(line) for line in lines) <= WIDTH and "…" not in report.table()
    assert lines[2].startswith("3      module_0."), lines
    pieces = [lines[2].split()[1]]
    for line in lines[3:]:
        if "velora g=2" in line:  # the row's numbers follow its name
            break
        pieces.append(line.strip())
    assert "".join(pieces) == name and len(pieces) > 1, lines
    assert all(p.endswith((".", ",")) for p in pieces[:-1]), pieces  # broken after punctuation, nowhere else


def test_to_dict_is_unchanged():
    report, _, _ = _two_layer_report()
    site = report.graphs[0].sites[0]
    d = site.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(SiteReport)} | {"bytes_freed"}
    assert d["name"] == site.name and d["reason"] == site.reason and d["shape"] == [32, 64]
    assert d["bytes_freed"] == site.bytes_before - site.bytes_after
    g = report.to_dict()["graphs"][0]
    assert list(g) == ["graph_id", "model", "frame", "status", "message", "saved_bytes_before",
                       "saved_bytes_after", "budget_target", "recompute_budget", "budget_plans", "budget_candidates",
                       "predicted_peak", "plan_source", "offload", "sites"]
    assert g["offload"] is None  # set only with offload=True (tests/test_offload.py)
    assert g["message"] == MESSAGE
    assert list(report.to_dict()) == ["saved_bytes_before", "saved_bytes_after", "predicted_peak_before",
                                      "predicted_peak_after", "totals_count", "graphs"]


# --- a real model: a tiny two-layer Llama, README's own example ---------------------------------

@pytest.fixture(scope="module")
def llama_v_proj_report():
    """``include=["*.v_proj"]`` on a two-layer Llama (one compile, shared: compiling is the slow part)."""
    transformers = pytest.importorskip("transformers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VELORA_FX_STRICT", "1")  # a pass bug raises instead of falling back
        torch._dynamo.reset()
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
        model = transformers.LlamaForCausalLM(config)
        ids = torch.randint(0, 128, (2, 8))
        backend = velora_fx.backend(compiler="eager", include=["*.v_proj"])
        torch.compile(model, backend=backend)(input_ids=ids, labels=ids).loss.backward()
        torch._dynamo.reset()
    return backend.report()


def test_llama_table_names_both_layers_and_gives_full_reasons(llama_v_proj_report):
    report = llama_v_proj_report
    names = [s.name for s in report.sites if s.codec == "velora"]  # the weight-gradient sites
    assert len(set(names)) == len(names) == 9, names
    assert len({(s.codec, s.name) for s in report.sites}) == len(report.sites)  # with the default's other codecs
    for layer in (0, 1):
        for name in ("self_attn.{q_proj,k_proj,v_proj}", "self_attn.o_proj", "mlp.{gate_proj,up_proj}",
                     "mlp.down_proj"):
            assert f"model.layers.{layer}.{name}" in names, names
    _assert_readable(report, names, [s.reason for s in report.sites])


def test_include_v_proj_skip_reason_agrees_with_the_decision(llama_v_proj_report):
    """v_proj shares the norm output with q_proj and k_proj, which keep it saved, so the group is
    skipped; its reason must say so (and that v_proj stays exact), not talk of compressing."""
    report = llama_v_proj_report
    for layer in (0, 1):
        (site,) = [s for s in report.sites if s.name == f"model.layers.{layer}.self_attn.{{q_proj,k_proj,v_proj}}"]
        assert site.decision == "skipped", report.table()
        reason = site.reason
        assert "compressing" not in reason and "stays exact" in reason, reason
        assert reason.startswith(f"model.layers.{layer}.self_attn.v_proj shares its input with unselected "), reason
        for other in ("q_proj", "k_proj"):
            assert f"model.layers.{layer}.self_attn.{other}" in reason, reason


def test_a_graph_without_sites_says_so():
    """A trained graph with weights but no site (an embedding and a norm: no matmul, nonlinearity,
    gated projection or loss head) reads as unchanged *with* the reason, not a blank line."""
    from velora_fx.backend import NO_SITE

    class EmbedNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.norm = torch.nn.Embedding(50, 16), torch.nn.LayerNorm(16)

        def forward(self, ids):
            return self.norm(self.embed(ids)).square().mean()

    torch._dynamo.reset()
    backend = velora_fx.backend(compiler="eager")
    model = EmbedNorm()  # held: a model's reports go with it
    torch.compile(model, backend=backend)(torch.randint(0, 50, (2, 8))).backward()
    (graph,) = backend.report().graphs
    assert graph.status == "unchanged" and not graph.sites
    assert graph.message == f"{NO_SITE} (velora, fewbit, gated, chunked_loss)"
    assert graph.message in " ".join(backend.report().table().split())  # the table wraps long messages
