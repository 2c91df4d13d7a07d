"""Config validation: every bad value fails with ONE readable line naming the field (and, for a
choice, the allowed values); ``key=value`` overrides parse every field type."""

from __future__ import annotations

import dataclasses

import pytest

from hyperbit import ConfigError, ModelConfig, preset
from hyperbit.config import FFNS, LINEARS, PATHWAYS, PRESETS, parse_overrides


def config_error(**kwargs) -> str:
    """Build ModelConfig(**kwargs), expect a ConfigError, return its (one-line) message."""
    with pytest.raises(ConfigError) as info:
        ModelConfig(**kwargs)
    return one_line(info.value)


def one_line(err: Exception) -> str:
    msg = str(err)
    assert msg and "\n" not in msg, f"error message must be one line: {msg!r}"
    assert "Traceback" not in msg
    return msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("field", ["expansion_rate", "dim", "n_layers", "n_heads", "vocab_size",
                                   "max_seq_len", "ffn_hidden", "n_kv_heads"])
@pytest.mark.parametrize("bad", [0, -1])
def test_non_positive_sizes_rejected(field, bad):
    msg = config_error(**{field: bad})
    assert msg.startswith(f"{field} must be >= 1"), msg
    assert str(bad) in msg


@pytest.mark.parametrize("field", ["init_std", "norm_eps", "rope_theta"])
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_non_positive_floats_rejected(field, bad):
    msg = config_error(**{field: bad})
    assert msg.startswith(f"{field} must be > 0"), msg


def test_n_heads_must_divide_dim():
    msg = config_error(dim=64, n_heads=5)
    assert "dim=64" in msg and "n_heads=5" in msg and "divisible" in msg


def test_n_kv_heads_must_divide_n_heads():
    msg = config_error(dim=64, n_heads=4, n_kv_heads=3)
    assert "n_heads=4" in msg and "n_kv_heads=3" in msg and "divisible" in msg


def test_head_dim_must_be_even_for_rope():
    msg = config_error(dim=60, n_heads=4)  # head_dim 15
    assert "head_dim" in msg and "15" in msg and "even" in msg


@pytest.mark.parametrize("field, allowed", [("pathway", PATHWAYS), ("linear", LINEARS),
                                            ("ffn", FFNS)])
def test_unknown_choice_lists_allowed_values(field, allowed):
    msg = config_error(**{field: "nope"})
    assert msg.startswith(f"{field}='nope' is not allowed"), msg
    for value in allowed:
        assert repr(value) in msg, (value, msg)


def test_choices_are_the_documented_ones():
    assert set(PATHWAYS) == {"prenorm", "postnorm", "hc", "sequential", "parallel", "mhc", "frac"}
    assert set(LINEARS) == {"fp", "bitnet"}
    assert set(FFNS) == {"swiglu", "relu2", "moe"}


@pytest.mark.parametrize("kwargs, expected", [
    (dict(dim="64"), "dim='64' has the wrong type; expected int"),
    (dict(dim=64.0), "dim=64.0 has the wrong type; expected int"),
    (dict(dim=True), "dim=True has the wrong type; expected int"),  # bool is not an int here
    (dict(hc_dynamic=1), "hc_dynamic=1 has the wrong type; expected bool"),
    (dict(tie_embeddings="yes"), "tie_embeddings='yes' has the wrong type; expected bool"),
    (dict(n_kv_heads="2"), "n_kv_heads='2' has the wrong type; expected int | None"),
    (dict(subln=0), "subln=0 has the wrong type; expected bool | None"),
    (dict(init_std="0.02"), "init_std='0.02' has the wrong type; expected float"),
    (dict(init_std=False), "init_std=False has the wrong type; expected float"),
    (dict(pathway=1), "pathway=1 has the wrong type; expected str"),
])
def test_wrong_types_rejected(kwargs, expected):
    assert config_error(**kwargs) == expected


def test_int_accepted_for_float_fields():
    assert ModelConfig(init_std=1).init_std == 1


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("pathway", ["prenorm", "postnorm"])
def test_plain_residual_needs_one_stream(pathway, n):
    msg = config_error(pathway=pathway, expansion_rate=n)
    assert "expansion_rate must be 1" in msg and repr(pathway) in msg and "'hc'" in msg


def test_sequential_needs_two_streams():
    assert "expansion_rate must be 2" in config_error(pathway="sequential", expansion_rate=4)
    assert ModelConfig(pathway="sequential", expansion_rate=2).expansion_rate == 2


def test_parallel_needs_at_least_two_streams():
    assert "expansion_rate must be >= 2" in config_error(pathway="parallel", expansion_rate=1)


def test_from_dict_rejects_unknown_keys_and_lists_allowed():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_dict({"dim": 64, "n_layer": 2, "hc_tahn": True})
    msg = one_line(info.value)
    assert "['hc_tahn', 'n_layer']" in msg
    assert "'n_layers'" in msg and "'hc_tanh'" in msg and "'expansion_rate'" in msg


def test_from_dict_round_trips():
    cfg = ModelConfig(dim=64, n_heads=4, n_kv_heads=2, pathway="hc", expansion_rate=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_lists_allowed():
    with pytest.raises(ConfigError) as info:
        preset("olmo-7b")
    msg = one_line(info.value)
    assert "'olmo-7b'" in msg
    for name in PRESETS:
        assert repr(name) in msg


def test_preset_overrides_are_validated():
    assert preset("tiny", pathway="hc", expansion_rate=4).expansion_rate == 4
    with pytest.raises(ConfigError, match="pathway='hcc' is not allowed"):
        preset("tiny", pathway="hcc")
    with pytest.raises(ConfigError, match=r"unknown model config key\(s\) \['layers'\]"):
        preset("tiny", layers=3)


def test_derived_defaults():
    cfg = ModelConfig(dim=96, n_heads=4).resolved()
    assert cfg.n_kv_heads == 4
    assert cfg.ffn_hidden == 256  # 8/3 * 96 = 256, already a multiple of 64
    assert ModelConfig(dim=64).resolved().ffn_hidden == 192  # 170.7 rounded up to a multiple of 64
    assert cfg.subln is False and ModelConfig(linear="bitnet").resolved().subln is True
    assert ModelConfig(linear="bitnet", subln=False).resolved().subln is False


def test_derived_fields_stay_derived_through_replace_from_dict_and_overrides():
    """A config holds only what was specified: every way of changing one gives the config that
    building it fresh gives (the derived fields follow the new values)."""
    base = preset("small")  # n_kv_heads, ffn_hidden and subln derived
    changes = [dict(linear="bitnet"), dict(dim=512, n_heads=8), dict(n_heads=8)]
    for change in changes:
        fresh = preset("small", **change)
        pairs = [f"{k}={v}" for k, v in change.items()]
        assert dataclasses.replace(base, **change) == fresh, change
        assert parse_overrides(base, pairs) == fresh, change
        assert ModelConfig.from_dict({**base.to_dict(), **change}) == fresh, change
        assert dataclasses.replace(base, **change).resolved() == fresh.resolved(), change
    bitnet = dataclasses.replace(base, linear="bitnet").resolved()
    assert bitnet.subln is True and bitnet.ffn_hidden == 704
    wide = dataclasses.replace(base, dim=512, n_heads=8).resolved()
    assert wide.ffn_hidden == 1408 and wide.n_kv_heads == 8
    # a field that was set stays set, whatever else changes
    pinned = ModelConfig(subln=False, ffn_hidden=100, n_kv_heads=2)
    moved = dataclasses.replace(pinned, linear="bitnet", dim=512).resolved()
    assert (moved.subln, moved.ffn_hidden, moved.n_kv_heads) == (False, 100, 2)
    # nothing else is kept: the config is its fields
    assert set(vars(base)) == {f.name for f in dataclasses.fields(ModelConfig)}
    # resolving is idempotent and a resolved config round-trips as it is
    assert base.resolved().resolved() == base.resolved()
    assert ModelConfig.from_dict(base.resolved().to_dict()) == base.resolved()


# --- parse_overrides ------------------------------------------------------------------------------

def test_overrides_parse_every_type():
    base = ModelConfig()
    cfg = parse_overrides(base, [
        "dim=128",               # int
        "init_std=0.01",         # float
        "rope_theta=5e5",        # float, exponent form
        "tie_embeddings=true",   # bool
        "hc_tanh=off",           # bool, other spelling
        "pathway=hc",            # str
        "model.expansion_rate=4",  # `model.` prefix
        " n_layers = 3 ",        # whitespace around key and value
    ])
    assert (cfg.dim, cfg.init_std, cfg.rope_theta) == (128, 0.01, 5e5)
    assert type(cfg.dim) is int and type(cfg.init_std) is float
    assert cfg.tie_embeddings is True and cfg.hc_tanh is False
    assert (cfg.pathway, cfg.expansion_rate, cfg.n_layers) == ("hc", 4, 3)
    assert base.dim == 256 and base.pathway == "prenorm"  # the input config is not mutated


@pytest.mark.parametrize("raw, expected", [("1", True), ("yes", True), ("on", True), ("True", True),
                                           ("0", False), ("no", False), ("FALSE", False)])
def test_override_bool_spellings(raw, expected):
    assert parse_overrides(ModelConfig(), [f"tie_embeddings={raw}"]).tie_embeddings is expected


def test_override_none_for_optional_fields():
    cfg = parse_overrides(ModelConfig(n_heads=4, n_kv_heads=2, subln=True),
                          ["n_kv_heads=none", "subln=None"]).resolved()
    assert cfg.n_kv_heads == 4  # None -> derived from n_heads again
    assert cfg.subln is False  # None -> derived from linear="fp"


def test_no_overrides_is_identity():
    cfg = preset("tiny", pathway="hc", expansion_rate=2)
    assert parse_overrides(cfg, []) == cfg


def test_overrides_rederive_defaulted_fields():
    # Fields left at their derived default follow the overridden values ...
    assert parse_overrides(ModelConfig(), ["linear=bitnet"]).resolved().subln is True
    assert (parse_overrides(ModelConfig(dim=64), ["dim=128"]).resolved().ffn_hidden
            == ModelConfig(dim=128).resolved().ffn_hidden)
    assert parse_overrides(ModelConfig(n_heads=4), ["n_heads=8"]).resolved().n_kv_heads == 8
    # ... while explicitly set ones are kept.
    assert parse_overrides(preset("tiny"), ["n_heads=8"]).resolved().n_kv_heads == 2
    assert parse_overrides(ModelConfig(ffn_hidden=100), ["dim=128"]).resolved().ffn_hidden == 100
    assert parse_overrides(ModelConfig(subln=False), ["linear=bitnet"]).resolved().subln is False


def test_override_bad_key_lists_allowed():
    with pytest.raises(ConfigError) as info:
        parse_overrides(ModelConfig(), ["model.dimm=64"])
    msg = one_line(info.value)
    assert msg.startswith("unknown model config key 'dimm'"), msg
    assert "'dim'" in msg and "'expansion_rate'" in msg


@pytest.mark.parametrize("pair, expected", [
    ("dim=abc", "dim='abc' is not a valid int"),
    ("dim=1.5", "dim='1.5' is not a valid int"),
    ("dim=none", "dim='none' is not a valid int"),
    ("init_std=small", "init_std='small' is not a valid float"),
    ("tie_embeddings=maybe", "tie_embeddings='maybe' is not a valid bool"),
    ("n_kv_heads=two", "n_kv_heads='two' is not a valid int | None"),
])
def test_override_bad_value(pair, expected):
    with pytest.raises(ConfigError) as info:
        parse_overrides(ModelConfig(), [pair])
    assert one_line(info.value) == expected


def test_override_missing_equals():
    with pytest.raises(ConfigError) as info:
        parse_overrides(ModelConfig(), ["dim", "n_layers=2"])
    assert one_line(info.value) == "override 'dim' must look like key=value"


def test_override_values_are_validated():
    with pytest.raises(ConfigError, match="pathway='resnet' is not allowed; choose one of"):
        parse_overrides(ModelConfig(), ["pathway=resnet"])
    with pytest.raises(ConfigError, match="expansion_rate must be 1 for pathway='prenorm'"):
        parse_overrides(ModelConfig(), ["expansion_rate=2"])
    with pytest.raises(ConfigError, match="expansion_rate must be >= 1, got 0"):
        parse_overrides(ModelConfig(pathway="hc", expansion_rate=2), ["expansion_rate=0"])
