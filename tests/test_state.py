"""Per-site state: the init rules of SiteState and SiteStore's (de)serialisation."""
import gc
import io
import zlib

import pytest
import torch
from hypothesis import given, strategies as st

import velora_fx
from velora_fx.codecs.velora import initial_vector, random_vector
from velora_fx.state import SiteState, SiteStore, lookup_site


def batches(n, shape=(6, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    # distinct means, so that each batch has its own direction
    return [torch.randn(*shape, generator=gen) + torch.randn(shape[-1], generator=gen) * 3 for _ in range(n)]


def assert_unit(v):
    torch.testing.assert_close(v.norm(), torch.tensor(1.0), rtol=1e-5, atol=1e-5)


def test_fresh_state():
    s = SiteState("layers.0.fc", "first_batch")
    assert not s.initialised and s.vector is None and s.steps == 0


def test_first_batch_sets_once_and_keeps_fixed():
    s = SiteState("fc", "first_batch")
    xs = batches(4)
    v0 = s.vector_for(xs[0], 4).clone()
    assert torch.equal(v0, initial_vector(xs[0], 4))
    assert s.initialised and s.steps == 1
    for i, x in enumerate(xs[1:], start=2):
        assert torch.equal(s.vector_for(x, 4), v0)
        assert s.steps == i
    assert not torch.allclose(initial_vector(xs[1], 4), v0)  # the test would be vacuous otherwise


def test_batch_recomputes_each_call():
    s = SiteState("fc", "batch")
    for x in batches(4):
        assert torch.equal(s.vector_for(x, 4), initial_vector(x, 4))
    assert s.steps == 4


@given(seed=st.integers(0, 10_000), decay=st.sampled_from([0.5, 0.9, 0.25]))
def test_ema_moves_toward_batch_mean_and_stays_unit(seed, decay):
    s = SiteState("fc", f"ema:{decay}")
    x0, x1 = batches(2, seed=seed)
    v0 = s.vector_for(x0, 4).clone()
    assert torch.equal(v0, initial_vector(x0, 4))  # first call: the batch mean, like first_batch
    target = initial_vector(x1, 4)
    v1 = s.vector_for(x1, 4).clone()
    assert_unit(v1)
    expected = decay * v0 + (1 - decay) * target
    torch.testing.assert_close(v1, expected / expected.norm(), rtol=1e-5, atol=1e-6)
    # closer to the new batch direction than before, unless already there
    assert float(v1 @ target) >= float(v0 @ target) - 1e-6


def test_ema_half_bisects():
    s = SiteState("fc", "ema:0.5")
    x0, x1 = batches(2, seed=3)
    v0 = s.vector_for(x0, 4).clone()
    t = initial_vector(x1, 4)
    v1 = s.vector_for(x1, 4)
    torch.testing.assert_close(v1 @ v0, v1 @ t, rtol=1e-5, atol=1e-6)
    # repeated batches of the same data converge to their direction
    for _ in range(40):
        v = s.vector_for(x1, 4)
    torch.testing.assert_close(v, t, rtol=1e-4, atol=1e-4)
    assert_unit(v)


def test_ema_extremes():
    x0, x1 = batches(2, seed=5)
    keep, follow = SiteState("a", "ema:1"), SiteState("b", "ema:0")
    v_keep, _ = keep.vector_for(x0, 4).clone(), follow.vector_for(x0, 4)
    torch.testing.assert_close(keep.vector_for(x1, 4), v_keep)
    torch.testing.assert_close(follow.vector_for(x1, 4), initial_vector(x1, 4))


def test_random_deterministic_per_name_and_independent_of_x():
    xs = batches(3)
    a = SiteState("layers.0.fc", "random")
    va = a.vector_for(xs[0], 8).clone()
    assert_unit(va)
    assert torch.equal(va, random_vector(8, zlib.crc32(b"layers.0.fc")))
    assert torch.equal(a.vector_for(xs[1], 8), va)  # fixed after the first call
    b = SiteState("layers.0.fc", "random")
    assert torch.equal(b.vector_for(xs[2] * -5, 8), va)  # same name, different x -> same v
    torch.manual_seed(1234)
    c = SiteState("layers.1.fc", "random")
    assert not torch.allclose(c.vector_for(xs[0], 8), va)


def test_different_g_raises():
    s = SiteState("fc", "first_batch")
    s.vector_for(torch.randn(2, 8), 4)
    with pytest.raises(ValueError, match="fc"):
        s.vector_for(torch.randn(2, 8), 2)


# -- SiteStore ----------------------------------------------------------------------------------------
def test_store_keys_and_lookup():
    store = SiteStore("first_batch")
    key = store.key("layers.0/mlp.fc")  # a '/' in the site name survives the key
    site = lookup_site(key)
    assert site is store.get("layers.0/mlp.fc")
    assert site.name == "layers.0/mlp.fc" and site.init == "first_batch"
    other = SiteStore("first_batch")
    assert other.token != store.token
    assert lookup_site(other.key("layers.0/mlp.fc")) is not site


def test_lookup_unknown_token_raises_clear_error():
    with pytest.raises(RuntimeError, match=r"no live backend.*'fc'"):
        lookup_site("000000000000/fc")


def test_lookup_after_store_is_collected_raises():
    store = SiteStore("first_batch")
    key = store.key("fc")
    lookup_site(key)
    del store
    gc.collect()
    with pytest.raises(RuntimeError, match="garbage-collected"):
        lookup_site(key)


def _trained_store(init="first_batch"):
    store = SiteStore(init)
    xs = batches(3)
    for x in xs:
        store.get("a.fc").vector_for(x, 4)
    store.get("b.fc").vector_for(xs[0], 2)
    store.get("b.fc").vector_for(xs[1], 2)
    store.get("untouched")
    return store


@pytest.mark.parametrize("init", ["first_batch", "batch", "ema:0.9", "random"])
def test_store_state_dict_round_trip_into_fresh_store(init):
    store = _trained_store(init)
    state = store.state_dict()
    assert set(state) == {"a.fc", "b.fc", "untouched"}
    assert state["a.fc"]["steps"] == 3 and state["b.fc"]["steps"] == 2 and state["untouched"]["steps"] == 0
    assert state["untouched"]["vector"] is None
    fresh = SiteStore(init)
    fresh.load_state_dict(state)
    for name in ("a.fc", "b.fc"):
        assert torch.equal(fresh.get(name).vector, store.get(name).vector)
        assert fresh.get(name).vector.dtype == torch.float32
        assert fresh.get(name).steps == store.get(name).steps
    assert not fresh.get("untouched").initialised
    assert fresh.state_dict().keys() == state.keys()


def test_state_dict_is_a_snapshot():
    store = _trained_store("first_batch")
    state = store.state_dict()
    before = state["a.fc"]["vector"].clone()
    store.get("a.fc").vector.mul_(-1)  # in-place edit of the live vector
    assert torch.equal(state["a.fc"]["vector"], before)
    fresh = SiteStore("first_batch")
    fresh.load_state_dict(state)
    state["a.fc"]["vector"].zero_()  # editing the dict afterwards does not reach the store
    assert torch.equal(fresh.get("a.fc").vector, before)


def test_loaded_first_batch_vector_is_kept():
    store = _trained_store("first_batch")
    fresh = SiteStore("first_batch")
    fresh.load_state_dict(store.state_dict())
    loaded = fresh.get("a.fc").vector.clone()
    new_x = batches(1, seed=99)[0]
    assert torch.equal(fresh.get("a.fc").vector_for(new_x, 4), loaded)
    assert fresh.get("a.fc").steps == 4


def test_load_state_dict_overwrites_existing_sites():
    a, b = _trained_store("first_batch"), SiteStore("first_batch")
    b.get("a.fc").vector_for(-batches(1, seed=7)[0], 4)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.get("a.fc").vector, a.get("a.fc").vector)
    assert b.get("a.fc").steps == 3


def test_state_dict_survives_torch_save_weights_only():
    store = _trained_store("ema:0.5")
    buf = io.BytesIO()
    torch.save(store.state_dict(), buf)
    buf.seek(0)
    fresh = SiteStore("ema:0.5")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh.get("a.fc").vector, store.get("a.fc").vector)


def test_backend_state_dict_round_trip():
    src = velora_fx.backend(sub_token_size=4, init="ema:0.5")
    for x in batches(2):
        src.store.get("layers.0.fc").vector_for(x, 4)
    state = src.state_dict()
    assert state["config"] == src.config.to_dict()
    dst = velora_fx.backend(sub_token_size=4, init="ema:0.5")
    dst.load_state_dict(state)
    assert torch.equal(dst.store.get("layers.0.fc").vector, src.store.get("layers.0.fc").vector)
    assert dst.store.get("layers.0.fc").steps == 2
    with pytest.warns(UserWarning, match="init"):
        velora_fx.backend(sub_token_size=4, init="batch").load_state_dict(state)
