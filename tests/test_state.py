"""Per-model state: the in-graph init rules against the reference's ``next_vector``, slots,
naming and (de)serialisation."""
import io

import pytest
import torch
import torch.fx as fx
from hypothesis import example, given, settings, strategies as st
from torch import nn

import velora_fx
from velora_fx.codecs.velora import StateRow, VeloraCodec, emit_pin, fusable_block, initial_vector, project
from velora_fx.passes.rewrite import store_states
from velora_fx.state import ModelState, next_vector, slot_name


def batches(n, shape=(6, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    # distinct means, so that each batch has its own direction
    return [torch.randn(*shape, generator=gen) + torch.randn(shape[-1], generator=gen) * 3 for _ in range(n)]


def encode_graph(shape, g, rule, width, orientation=0, dtype=torch.float32):
    """A graph ``(x, state) -> (c, v)`` made of the codec's emitted aten code, state updated in place
    (rule "none" updates nothing: the pipeline pins the graph's coefficients, ``emit_pin``)."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(shape, dtype=dtype)
    state = graph.placeholder("state")
    state.meta["val"] = torch.empty(2, width)
    (c, v), new_state = VeloraCodec(g).encode(graph, x, StateRow(state, orientation, rule))
    graph.output((c, v))
    gm = fx.GraphModule(nn.Module(), graph)
    store_states(gm, {state: new_state} if new_state is not None else {})
    return gm


@settings(max_examples=25)
@example(rule="ema:0.5", g=2, steps=4, orientation=0, seed=459)  # v within 1e-5 of the reference, c within 3e-5
@example(rule="ema:0.5", g=2, steps=3, orientation=0, seed=391)  # v off by 3.8e-6 in a 0.055 component (torch 2.12)
@given(rule=st.sampled_from(["first_batch", "batch", "ema:0.5", "ema:0.9", "ema:0", "ema:1"]),
       g=st.sampled_from([1, 2, 4, 8]), steps=st.integers(1, 4), orientation=st.integers(0, 1),
       seed=st.integers(0, 1000))
def test_in_graph_rule_matches_the_reference_rule(rule, g, steps, orientation, seed):
    xs = batches(steps, shape=(5, 8), seed=seed)
    gm = encode_graph((5, 8), g, rule, width=2 + 8, orientation=orientation)
    state = torch.zeros(2, 10)
    current = None
    for x in xs:
        c, v = gm(x, state)
        expected = next_vector(rule, "site", current, x, g)
        # v is a unit vector: its fp32 rounding is ~1e-6 of its norm, which the EMA's renormalisation can
        # multiply when v and the batch's mean point apart; a wrong rule is off by ~0.1
        torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
        # c is the projection on the v the graph used (v's own 1e-5 from the reference, times |x| up to
        # ~10 here, is not c's error)
        torch.testing.assert_close(c.reshape(5, -1), project(x, v), rtol=1e-5, atol=1e-5)
        current = expected
        assert state[orientation, 0] == 1.0  # initialised flag
        torch.testing.assert_close(state[orientation, 1:1 + g], expected)
        assert torch.all(state[1 - orientation] == 0)  # the other orientation's row is untouched
        assert torch.all(state[orientation, 1 + g:-1] == 0)
        torch.testing.assert_close(state[orientation, -1], c.flatten()[0])  # the pin


def _fixed_v_graph(written, coefficient_count=1):
    """``(x, state) -> (c..., v)`` for rule "none" with the graph's pin (``emit_pin``) in ``state``
    (``written``) or in a second, unread state tensor."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    x.meta["val"] = torch.empty(3, 8)
    state = graph.placeholder("state")
    state.meta["val"] = torch.empty(2, 10)
    other = graph.placeholder("other")
    other.meta["val"] = torch.empty(2, 10)
    coefficients = []
    for _ in range(coefficient_count):
        (c, v), new_state = VeloraCodec(4).encode(graph, x, StateRow(state, 0, "none", written=written))
        assert new_state is None  # a fixed v writes nothing itself
        coefficients.append(c)
    host = state if written else other
    gm = fx.GraphModule(nn.Module(), graph)
    graph.output((*coefficients, v))
    with graph.inserting_before(graph.output_node()):
        pinned = emit_pin(graph, host, coefficients)
    store_states(gm, {host: pinned})
    return gm


@pytest.mark.parametrize("written", [False, True])
def test_rule_none_reads_v_and_the_graph_writes_one_pin(written):
    gm = _fixed_v_graph(written, coefficient_count=3)
    state, other = torch.zeros(2, 10), torch.zeros(2, 10)
    state[0, 0], state[0, 1:5] = 1.0, torch.tensor([0.5, 0.5, 0.5, 0.5])
    before = state.clone()
    x = torch.randn(3, 8)
    *cs, v = gm(x, state, other)
    torch.testing.assert_close(v, before[0, 1:5])
    for c in cs:
        torch.testing.assert_close(c.reshape(3, -1), project(x, v))
    host = state if written else other
    torch.testing.assert_close(host[0, -1], sum(c.flatten()[0] for c in cs))  # the one pin: all coefficients
    host[0, -1] = 0.0
    assert torch.equal(state, before) and torch.equal(other, torch.zeros(2, 10))  # nothing else written
    # what backward reads of a written state is a copy; an unwritten state's v is read in place
    v.zero_()
    assert torch.equal(state[0, 1:5], before[0, 1:5]) == written


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 9), blocks=st.integers(1, 5), extra=st.sampled_from([0, 1]),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 1000))
def test_coefficients_below_the_unroll_threshold_are_the_plain_sum(g, blocks, extra, lead, dtype, seed):
    """Below inductor's unroll threshold the codec sums over blocks of 8 features (one masked sum per
    sub-token, so the producer's kernel can compute them): the stored coefficients are the plain
    projection's, in its memory layout; bitwise at g <= 2, where no addition changes order."""
    features = g * (8 // g if g < 8 and 8 % g == 0 else 1) * blocks + extra * g
    block = fusable_block(g, features)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(*lead, features, generator=gen) * 4).to(dtype)
    v = torch.nn.functional.normalize(torch.randn(g, generator=gen), dim=0)
    gm = encode_graph(tuple(lead) + (features,), g, "none", width=g + 2, dtype=dtype)
    state = torch.zeros(2, g + 2)
    state[0, 0], state[0, 1:1 + g] = 1.0, v
    c, _ = gm(x, state)
    expected = project(x, v)
    assert c.dtype == dtype and c.is_contiguous()
    if block == g:
        assert c.shape == expected.shape
    else:
        assert g < 8 and block % g == 0 and c.shape == (*lead, features // block, block // g)
    if g <= 2:
        assert torch.equal(c.reshape(expected.shape), expected)
    else:
        torch.testing.assert_close(c.reshape(expected.shape), expected)


def test_an_inf_stays_in_its_own_sub_token():
    """The block's other sub-tokens are selected away, not multiplied by zero (inf * 0 is nan)."""
    assert fusable_block(2, 16) == 8
    x = torch.randn(3, 16)
    x[1, 5] = float("inf")
    v = torch.tensor([0.6, 0.8])
    gm = encode_graph((3, 16), 2, "none", width=4)
    state = torch.zeros(2, 4)
    state[0, 0], state[0, 1:3] = 1.0, v
    c, _ = gm(x, state)
    c = c.reshape(3, 8)
    assert torch.isinf(c[1, 2]) and torch.isfinite(c[1, [0, 1, 3, 4, 5, 6, 7]]).all()
    torch.testing.assert_close(c, project(x, v))


def test_block_sizes():
    # inductor unrolls sums over fewer than 8 elements into pointwise code; 8 and up stay reductions
    assert [fusable_block(g, 4096) for g in (1, 2, 4, 8, 16, 32)] == [8, 8, 8, 8, 16, 32]
    assert fusable_block(3, 4095) == 9 and fusable_block(6, 4092) == 12 and fusable_block(5, 4100) == 10
    assert fusable_block(3, 12) == 3  # no multiple of 3 at or above 8 divides 12: the plain sum
    assert fusable_block(2, 12) == 2


def test_degenerate_batches_give_the_uniform_unit_vector():
    gm = encode_graph((3, 8), 4, "batch", width=10)
    state = torch.zeros(2, 10)
    _, v = gm(torch.zeros(3, 8), state)
    torch.testing.assert_close(v, torch.full((4,), 0.5))
    _, v = gm(torch.full((3, 8), float("nan")), state)
    torch.testing.assert_close(v, torch.full((4,), 0.5))


def test_fp16_coefficients_never_overflow():
    gm = encode_graph((2, 8), 8, "first_batch", width=10, dtype=torch.float16)
    x = torch.full((2, 8), 60000.0, dtype=torch.float16)
    c, _ = gm(x, torch.zeros(2, 10))
    assert c.dtype == torch.float16 and torch.isfinite(c).all()
    assert torch.isfinite(project(x, initial_vector(x, 8), torch.float16)).all()


# -- ModelState -------------------------------------------------------------------------------------
def test_slots_are_per_weight_and_orientation_and_names_are_unique():
    state = ModelState("m")
    w = nn.Parameter(torch.randn(6, 4))
    a = state.register_slot(w, 0, "fc", 4)
    b = state.register_slot(w, 1, "fc:T", 6)
    assert a is state.register_slot(w, 0, "ignored", 4)
    assert a.tensor is b.tensor and a.tensor.shape == (2, 8)
    other = nn.Parameter(torch.randn(6, 4))
    c = state.register_slot(other, 0, "fc", 4)  # a second weight asking for a taken name
    assert c.name == "fc#2" and c.tensor is not a.tensor


def test_slot_names():
    assert slot_name("model.layers.0.mlp.down_proj", "weight", 0) == "model.layers.0.mlp.down_proj"
    assert slot_name("transformer.h.0.attn.c_attn", "weight", 1, natural=1) == "transformer.h.0.attn.c_attn"
    assert slot_name("lm_head", "weight", 1) == "lm_head:T"
    assert slot_name("", "w", 0) == "w"
    assert slot_name("block", "proj", 0) == "block.proj"


def _trained(init="first_batch", sizes=(4, 4)):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    backend = velora_fx.backend(sub_token_size=sizes[0], compiler="eager", mode="all", init=init)
    torch._dynamo.reset()
    fn = torch.compile(model, backend=backend)
    for x in batches(2, shape=(3, 8)):
        fn(x).sum().backward()
    return model, backend


@pytest.mark.parametrize("init", ["first_batch", "batch", "ema:0.5", "random"])
def test_backend_state_dict_round_trip_through_torch_save(init):
    model, backend = _trained(init)
    state = backend.state_dict()
    assert set(state["sites"]) == {"0", "2"} and state["config"] == backend.config.to_dict()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = velora_fx.backend(sub_token_size=4, compiler="eager", mode="all", init=init)
    fresh.load_state_dict(torch.load(buf, weights_only=True), model=model)
    got = fresh.state_dict(model)["sites"]
    for name, entry in state["sites"].items():
        assert torch.equal(got[name]["vector"], entry["vector"]), name


def test_loaded_first_batch_vector_is_used_and_kept():
    model, backend = _trained("first_batch")
    state = backend.state_dict()
    state["sites"]["2"]["vector"] = -state["sites"]["2"]["vector"]
    fresh = velora_fx.backend(sub_token_size=4, compiler="eager", mode="all")
    fresh.load_state_dict(state, model=model)
    torch._dynamo.reset()
    torch.compile(model, backend=fresh)(batches(1, shape=(3, 8), seed=9)[0]).sum().backward()
    assert torch.equal(fresh.state_dict()["sites"]["2"]["vector"], state["sites"]["2"]["vector"])


def test_load_state_dict_names_every_mismatch_when_called():
    model, backend = _trained()
    state = backend.state_dict()
    state["sites"]["nope"] = {"vector": torch.ones(4) / 2}
    state["sites"]["0"] = {"vector": torch.ones(3)}
    state["sites"]["2"] = {"vector": torch.ones(2) / 2 ** 0.5}  # divides 8, but the graph uses 4
    with pytest.raises(ValueError) as err:
        backend.load_state_dict(state)
    message = str(err.value)
    assert "'nope': no such site" in message and "'0': v has size 3" in message and "'2'" in message


def test_load_before_compile_needs_the_model_and_checks_it():
    backend = velora_fx.backend(compiler="eager")
    with pytest.raises(ValueError, match="model="):
        backend.load_state_dict({"sites": {"fc": {"vector": torch.ones(2)}}})
    model = nn.Sequential(nn.Linear(8, 6))
    with pytest.raises(ValueError, match="'1': no such site"):
        backend.load_state_dict({"sites": {"1": {"vector": torch.ones(2)}}}, model=model)
    backend.load_state_dict({"sites": {"0": {"vector": torch.ones(2) / 2 ** 0.5}}}, model=model)
    assert backend.state_dict(model)["sites"]["0"]["sub_token_size"] == 2


def test_load_warns_on_another_init():
    model, backend = _trained("ema:0.5")
    with pytest.warns(UserWarning, match="init"):
        velora_fx.backend(sub_token_size=4, init="batch").load_state_dict(backend.state_dict(), model=model)


def test_slots_read_the_current_state_tensor_of_their_weight():
    state = ModelState("m")
    w = nn.Parameter(torch.randn(4, 8))
    slot = state.register_slot(w, 0, "fc", 8)
    slot.tensor[0, 0], slot.sub_token_size = 1.0, 2
    slot.tensor[0, 1:3] = torch.tensor([0.6, 0.8])
    w.data = w.data[:, :6].contiguous()  # a different shape: a fresh state tensor, old values dropped
    assert state.tensor_for(w).shape == (2, 8) and slot.tensor is state.tensor_for(w)
    w2 = nn.Parameter(torch.randn(4, 8))
    slot2 = state.register_slot(w2, 0, "fc2", 8)
    slot2.tensor[0, 0], slot2.sub_token_size = 1.0, 2
    slot2.tensor[0, 1:3] = torch.tensor([0.6, 0.8])
    moved = state.tensor_for(w2)  # same device and shape: the same tensor
    assert moved is slot2.tensor and state.state_dict()["fc2"]["vector"].tolist() == pytest.approx([0.6, 0.8])
