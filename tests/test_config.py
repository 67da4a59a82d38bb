"""VeloraConfig and velora_fx.backend(...) option validation."""
import json

import pytest
import torch
from hypothesis import given, strategies as st

import velora_fx
from velora_fx.config import RECIPES, ConfigError, VeloraConfig

GOOD_INITS = ["first_batch", "batch", "random", "ema:0.9", "ema:0", "ema:1", "ema:0.25", "ema:.9", "ema:1.0"]
BAD_INITS = ["ema:", "ema:1.5", "foo", "", "EMA:0.5", "ema:-0.1", "ema:2", "first-batch", "ema:0.5x"]


# -- defaults and group size ---------------------------------------------------------------------
def test_defaults():
    cfg = VeloraConfig()
    assert cfg.num_groups is None and cfg.sub_token_size is None  # "auto" chooses g per site
    assert cfg.chooses_size and cfg.max_error == 0.6
    assert cfg.sub_token_size_for(64) == 2  # the paper's 32 groups where a fixed size is needed
    assert cfg.init == "first_batch"
    assert cfg.mode == "auto"
    assert cfg.scale == 1.0 and isinstance(cfg.scale, float)
    assert cfg.include == () and cfg.exclude == ()
    assert cfg.coeff_dtype is None
    assert cfg.ema_decay is None
    assert cfg.pack_codes is True  # few-bit codes packed eight to `bits` bytes


@pytest.mark.parametrize("value", [0, 1, "no", None])
def test_pack_codes_must_be_a_bool(value):
    with pytest.raises(ConfigError, match="pack_codes must be True or False"):
        VeloraConfig(pack_codes=value)


def test_sub_token_size_alone_leaves_num_groups_unset():
    cfg = VeloraConfig(sub_token_size=4)
    assert cfg.sub_token_size == 4 and cfg.num_groups is None
    assert cfg.sub_token_size_for(64) == 4


def test_num_groups_and_sub_token_size_together_rejected():
    with pytest.raises(ConfigError, match="not both"):
        VeloraConfig(num_groups=8, sub_token_size=4)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        velora_fx.backend(num_groups=8, sub_token_size=4)


@pytest.mark.parametrize("name", ["num_groups", "sub_token_size"])
@pytest.mark.parametrize("value", [0, -1, -32, 2.0, 1.5, "4", True, False, [4], torch.tensor(4)])
def test_group_size_must_be_positive_int(name, value):
    with pytest.raises(ConfigError, match=name):
        VeloraConfig(**{name: value})


@pytest.mark.parametrize("name", ["num_groups", "sub_token_size"])
@pytest.mark.parametrize("value", [1, 2, 7, 64])
def test_group_size_positive_ints_accepted(name, value):
    assert getattr(VeloraConfig(**{name: value}), name) == value


# -- init / mode ------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", GOOD_INITS)
def test_good_inits_accepted(init):
    cfg = VeloraConfig(init=init)
    assert cfg.init == init
    if init.startswith("ema:"):
        assert cfg.ema_decay == float(init.split(":")[1])
    else:
        assert cfg.ema_decay is None


@pytest.mark.parametrize("init", BAD_INITS + [None, 0.5])
def test_bad_inits_rejected(init):
    with pytest.raises(ConfigError, match="init"):
        VeloraConfig(init=init)


@pytest.mark.parametrize("mode", ["auto", "all"])
def test_good_modes(mode):
    assert VeloraConfig(mode=mode).mode == mode


@pytest.mark.parametrize("mode", ["ALL", "none", "", None, "paper"])
def test_bad_mode_rejected(mode):
    with pytest.raises(ConfigError, match="mode"):
        VeloraConfig(mode=mode)


@pytest.mark.parametrize("scale", [True, "1.0", None, [1.0]])
def test_bad_scale_rejected(scale):
    with pytest.raises(ConfigError, match="scale"):
        VeloraConfig(scale=scale)


def test_int_scale_becomes_float():
    cfg = VeloraConfig(scale=2)
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)


# -- include / exclude ------------------------------------------------------------------------------
@pytest.mark.parametrize("field", ["include", "exclude"])
def test_patterns_accept_str_or_list(field):
    assert getattr(VeloraConfig(**{field: "*.fc1"}), field) == ("*.fc1",)
    assert getattr(VeloraConfig(**{field: ["*.fc1", "head"]}), field) == ("*.fc1", "head")
    assert getattr(VeloraConfig(**{field: ("a",)}), field) == ("a",)
    assert getattr(VeloraConfig(**{field: None}), field) == ()


@pytest.mark.parametrize("field", ["include", "exclude"])
@pytest.mark.parametrize("value", [5, ["ok", 3], [None]])
def test_patterns_reject_non_strings(field, value):
    with pytest.raises(ConfigError, match=field):
        VeloraConfig(**{field: value})


def test_config_is_hashable_and_list_patterns_compare_equal_to_tuples():
    a = VeloraConfig(include=["*.v_proj", "*.down_proj"])
    b = VeloraConfig(include=("*.v_proj", "*.down_proj"))
    assert a == b and hash(a) == hash(b)


def test_config_is_frozen():
    cfg = VeloraConfig()
    with pytest.raises(Exception):
        cfg.num_groups = 4  # type: ignore[misc]


# -- coeff_dtype --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [
    (None, None),
    (torch.float32, torch.float32), (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
    ("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32),
    ("torch.bfloat16", torch.bfloat16),
])
def test_coeff_dtype_accepted(value, expected):
    assert VeloraConfig(coeff_dtype=value).coeff_dtype is expected


@pytest.mark.parametrize("value", [torch.int8, torch.int32, torch.bool, torch.float64, "int8", "half_precision",
                                   "float64", 16])
def test_coeff_dtype_rejected(value):
    with pytest.raises(ConfigError, match="coeff_dtype"):
        VeloraConfig(coeff_dtype=value)


# -- unknown options ----------------------------------------------------------------------------------
def test_unknown_option_has_did_you_mean_hint():
    with pytest.raises(TypeError, match=r"num_group.*did you mean 'num_groups'"):
        VeloraConfig.from_options(num_group=4)
    with pytest.raises(TypeError, match=r"did you mean 'num_groups'"):
        velora_fx.backend(num_group=4)
    with pytest.raises(TypeError, match=r"did you mean 'sub_token_size'"):
        velora_fx.backend(sub_token_sise=4)


def test_unknown_option_without_close_match_still_named():
    with pytest.raises(TypeError, match="completely_unrelated") as info:
        VeloraConfig.from_options(completely_unrelated=1)
    assert "did you mean" not in str(info.value)


# -- serialisation ------------------------------------------------------------------------------------
@st.composite
def valid_configs(draw):
    options = {}
    group = draw(st.sampled_from(["none", "num_groups", "sub_token_size"]))
    if group != "none":
        options[group] = draw(st.integers(1, 256))
    options["init"] = draw(st.one_of(
        st.sampled_from(["first_batch", "batch", "random"]),
        st.integers(0, 1000).map(lambda n: f"ema:{n / 1000}")))
    options["scale"] = draw(st.floats(0.001, 4, allow_nan=False, allow_infinity=False))
    options["max_error"] = draw(st.floats(0, 1, allow_nan=False))
    options["mode"] = draw(st.sampled_from(["auto", "max_memory", "all"]))
    pattern = st.text(st.sampled_from("ab._*?"), min_size=1, max_size=6)
    options["include"] = draw(st.one_of(pattern, st.lists(pattern, max_size=3)))
    options["exclude"] = draw(st.lists(pattern, max_size=3))
    options["coeff_dtype"] = draw(st.sampled_from([None, torch.float32, torch.bfloat16, "float16"]))
    options["pack_codes"] = draw(st.booleans())
    return options


@given(valid_configs())
def test_to_dict_from_dict_round_trip(options):
    cfg = VeloraConfig.from_options(**options)
    d = cfg.to_dict()
    again = VeloraConfig.from_dict(d)
    assert again == cfg
    assert again.to_dict() == d
    # to_dict is plain data: it survives JSON
    assert VeloraConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_to_dict_contents():
    d = VeloraConfig(sub_token_size=8, coeff_dtype=torch.bfloat16, include="*.fc1").to_dict()
    assert d["sub_token_size"] == 8 and d["num_groups"] is None
    assert d["coeff_dtype"] == "bfloat16"
    assert d["include"] == ["*.fc1"] and d["exclude"] == []
    assert d["version"] == 4 and d["max_error"] == 0.6 and d["min_efficiency"] == 0.2


def test_from_dict_rejects_unknown_keys():
    d = VeloraConfig().to_dict()
    d["num_group"] = 4
    with pytest.raises(TypeError, match="did you mean"):
        VeloraConfig.from_dict(d)


# -- sub_token_size_for -----------------------------------------------------------------------------
@given(g=st.integers(1, 16), k=st.integers(1, 16))
def test_sub_token_size_for_divisible(g, k):
    assert VeloraConfig(num_groups=k).sub_token_size_for(g * k) == g
    assert VeloraConfig(sub_token_size=g).sub_token_size_for(g * k) == g


@pytest.mark.parametrize("options", [dict(num_groups=5), dict(sub_token_size=5)])
def test_sub_token_size_for_names_size_and_site(options):
    cfg = VeloraConfig(**options)
    with pytest.raises(ConfigError) as info:
        cfg.sub_token_size_for(12, "layers.3.mlp.down_proj")
    message = str(info.value)
    assert "12" in message and "layers.3.mlp.down_proj" in message
    assert "5" in message
    with pytest.raises(ConfigError, match="12"):
        cfg.sub_token_size_for(12)


def test_default_num_groups_needs_multiple_of_32():
    assert VeloraConfig().sub_token_size_for(1024) == 32
    with pytest.raises(ConfigError, match="num_groups=32"):
        VeloraConfig().sub_token_size_for(48, "fc")


# -- selects ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("include, exclude, path, expected", [
    ((), (), "anything.at.all", True),
    ((), (), "", True),
    (("*.v_proj",), (), "model.layers.0.self_attn.v_proj", True),
    (("*.v_proj",), (), "model.layers.0.self_attn.q_proj", False),
    (("*.v_proj",), (), "v_proj", False),  # '*.v_proj' needs a dot before v_proj
    (("*v_proj",), (), "v_proj", True),
    (("*v_proj", "*down_proj"), (), "model.layers.1.mlp.down_proj", True),
    (("*v_proj", "*down_proj"), (), "model.layers.1.mlp.up_proj", False),
    ((), ("*lm_head*",), "lm_head", False),
    ((), ("*lm_head*",), "model.layers.0.fc", True),
    (("layers.?.fc",), (), "layers.3.fc", True),
    (("layers.?.fc",), (), "layers.10.fc", False),
    (("layers.[01].fc",), (), "layers.1.fc", True),
    (("layers.[01].fc",), (), "layers.2.fc", False),
    (("*.fc*",), ("*.fc2",), "layers.0.fc1", True),
    (("*.fc*",), ("*.fc2",), "layers.0.fc2", False),  # exclude wins over include
    (("*.FC1",), (), "layers.0.fc1", False),  # case sensitive
])
def test_selects_glob_semantics(include, exclude, path, expected):
    assert VeloraConfig(include=include, exclude=exclude).selects(path) is expected


@given(st.lists(st.text(st.sampled_from("ab."), max_size=6), max_size=4), st.text(st.sampled_from("ab."), max_size=6))
def test_selects_exclude_everything_and_include_everything(paths, path):
    assert VeloraConfig(include="*").selects(path)
    assert not VeloraConfig(exclude="*").selects(path)
    # an exact-name include selects exactly the names listed
    if paths:
        assert VeloraConfig(include=paths).selects(path) is (path in paths)


# -- recipes ------------------------------------------------------------------------------------------
def test_recipe_paper():
    cfg = VeloraConfig.from_recipe_name("paper")
    assert cfg.num_groups == 32 and cfg.init == "first_batch" and cfg.mode == "all"
    assert cfg.selects("model.layers.0.self_attn.v_proj")
    assert cfg.selects("model.layers.0.mlp.down_proj")
    for other in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head"):
        assert not cfg.selects(other)


def test_recipe_auto():
    cfg = VeloraConfig.from_recipe_name("auto")
    assert cfg.num_groups is None and cfg.init == "first_batch" and cfg.mode == "auto" and cfg.chooses_size
    cfg = VeloraConfig.from_recipe_name("max_memory")
    assert cfg.num_groups is None and cfg.mode == "max_memory" and cfg.chooses_size
    assert not VeloraConfig(mode="max_memory", num_groups=32).chooses_size
    assert cfg.include == () and cfg.exclude == ()


def test_recipe_overrides_and_errors():
    cfg = VeloraConfig.from_recipe_name("paper", init="ema:0.9", num_groups=16)
    assert cfg.init == "ema:0.9" and cfg.num_groups == 16 and cfg.mode == "all"
    with pytest.raises(ConfigError, match="unknown recipe"):
        VeloraConfig.from_recipe_name("papr")
    with pytest.raises(TypeError, match="did you mean"):
        VeloraConfig.from_recipe_name("auto", num_group=8)
    assert {"paper", "auto", "max_memory"} <= set(RECIPES)


def test_recipe_override_with_sub_token_size():
    cfg = VeloraConfig.from_recipe_name("paper", sub_token_size=4)
    assert cfg.sub_token_size == 4 and cfg.num_groups is None


# -- velora_fx.backend(...) takes the same options ----------------------------------------------------
@pytest.mark.parametrize("options", [
    dict(num_groups=8), dict(sub_token_size=4), dict(mode="all"), dict(mode="auto"),
    dict(init="first_batch"), dict(init="batch"), dict(init="ema:0.9"), dict(init="random"),
    dict(scale=1.0), dict(include=["*.v_proj"]), dict(exclude=["*lm_head*"]), dict(include="*.fc"),
    dict(coeff_dtype="bfloat16"), dict(num_groups=4, init="ema:0", scale=0.5, mode="all"),
])
def test_backend_accepts_config_options(options):
    b = velora_fx.backend(**options)
    assert callable(b)
    assert b.config == VeloraConfig.from_options(**options)
    assert callable(b.state_dict) and callable(b.load_state_dict)


@pytest.mark.parametrize("options", [
    dict(num_groups=0), dict(sub_token_size=-2), dict(init="ema:1.5"), dict(init="foo"),
    dict(mode="sometimes"), dict(coeff_dtype=torch.int32), dict(include=[1]), dict(scale=0), dict(scale=-1.0),
    dict(max_error=-0.1), dict(max_error=float("nan")), dict(scale="1"),
])
def test_backend_rejects_bad_options(options):
    with pytest.raises(ConfigError):
        velora_fx.backend(**options)


def test_backend_config_object_and_compiler():
    cfg = VeloraConfig(num_groups=4)
    assert velora_fx.backend(cfg).config is cfg
    assert velora_fx.backend().config == VeloraConfig()
    assert velora_fx.backend(compiler="eager").compiler == "eager"
    with pytest.raises(TypeError):
        velora_fx.backend(cfg, num_groups=8)
    with pytest.raises(ConfigError, match="compiler"):
        velora_fx.backend(compiler="tvm")


def test_backend_registered_by_name():
    import torch._dynamo

    assert "velora" in torch._dynamo.list_backends(exclude_tags=())
    assert callable(torch._dynamo.lookup_backend("velora"))


def test_public_api_names():
    for name in ("backend", "transform", "explain"):
        assert callable(getattr(velora_fx, name))
    assert hasattr(velora_fx, "reference")
    assert velora_fx.ConfigError is ConfigError and velora_fx.VeloraConfig is VeloraConfig


# -- codec options (issue 6) ---------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(codecs=("velora", "zip")), "unknown codec"),
    (dict(codecs=()), "non-empty"),
    (dict(bits=0), "bits"),
    (dict(bits=9), "bits"),
    (dict(rmm_ratio=0.0), "rmm_ratio"),
    (dict(rmm_ratio=1.5), "rmm_ratio"),
    (dict(memory_budget=1.5), "memory_budget"),
    (dict(memory_budget=0), "memory_budget"),
    (dict(memory_budget=True), "memory_budget"),
    (dict(loss_chunk_size=0), "loss_chunk_size"),
])
def test_codec_options_are_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        VeloraConfig(**kwargs)


def test_codec_options_round_trip():
    config = VeloraConfig(codecs=["velora", "fewbit", "velora"], bits=2, memory_budget=0.5)
    assert config.codecs == ("velora", "fewbit") and config.uses("fewbit") and not config.uses("rmm")
    assert VeloraConfig.from_dict(config.to_dict()) == config
    assert VeloraConfig(memory_budget=2**30).memory_budget == 2**30  # bytes as an int
