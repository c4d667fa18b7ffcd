"""GeoLoRAConfig: validation (errors name the field and the bad value; fuzzed kwargs and adapter_config.json give
only such errors, or a warning for an unknown key), serialisation, help metadata."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import pickle
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import geolora
from geolora import GeoLoRAConfig


def _msg(field: str, value) -> str:
    """The start of every validation message: ``GeoLoRAConfig.<field>=<repr(value)> is invalid``."""
    return re.escape(f"GeoLoRAConfig.{field}={value!r} is invalid")


# ---------------------------------------------------------------------------------------------------- defaults
def test_defaults_and_derived_values():
    cfg = GeoLoRAConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    assert cfg.peft_type is PeftType.GEOLORA
    assert cfg.r_max == 8  # default 2 * r
    assert cfg.scale_by == "r_max" and cfg.scaling == 1.0  # lora_alpha / r_max: independent of the initial rank
    assert GeoLoRAConfig(r=2, r_max=8, lora_alpha=8).scaling == GeoLoRAConfig(r=8, r_max=8, lora_alpha=8).scaling
    assert GeoLoRAConfig(r=4, lora_alpha=8, scale_by="r").scaling == 2.0  # lora_alpha / r, the old rule
    assert cfg.target_modules == {"query", "value"}
    assert cfg.rank_pattern == {}
    assert GeoLoRAConfig(rank_pattern=None).rank_pattern == {}
    assert GeoLoRAConfig(adam_betas=[0.8, 0.9]).adam_betas == (0.8, 0.9)


def test_valid_edge_values_are_accepted():
    cfg = GeoLoRAConfig(r=1, r_min=1, r_max=1, tau=0.0, lora_dropout=0.0, rank_budget=1, reorthonormalize_every=0)
    assert (cfg.r, cfg.r_min, cfg.r_max, cfg.tau) == (1, 1, 1, 0.0)
    cfg = GeoLoRAConfig(r=4, r_min=4, tau=0.999, lora_alpha=0.5, rank_pattern={"q": 8, r"layer\.\d+\.v": 1})
    assert cfg.r_min == 4 and cfg.rank_pattern == {"q": 8, r"layer\.\d+\.v": 1}


# ---------------------------------------------------------------------------------------------------- ValueErrors
VALUE_ERRORS = [
    ({"r": 0}, "r", 0, "must be > 0"),
    ({"r": -3}, "r", -3, "must be > 0"),
    ({"r_min": 0}, "r_min", 0, "must be >= 1"),
    ({"r": 4, "r_min": 5}, "r_min", 5, "must be <= r (r=4)"),
    ({"r": 8, "r_max": 4}, "r", 8, "must be <= r_max (r_max=4)"),
    ({"tau": -0.1}, "tau", -0.1, "must be in [0, 1)"),
    ({"tau": 1.0}, "tau", 1.0, "must be in [0, 1)"),
    ({"tau": 1.5}, "tau", 1.5, "must be in [0, 1)"),
    ({"tau": math.nan}, "tau", math.nan, "must be in [0, 1)"),
    ({"lora_alpha": 0}, "lora_alpha", 0, "must be a finite number > 0"),
    ({"lora_alpha": -1.0}, "lora_alpha", -1.0, "must be a finite number > 0"),
    ({"lora_alpha": math.inf}, "lora_alpha", math.inf, "must be a finite number > 0"),
    ({"lora_dropout": -0.1}, "lora_dropout", -0.1, "must be in [0, 1)"),
    ({"lora_dropout": 1.0}, "lora_dropout", 1.0, "must be in [0, 1)"),
    ({"bias": "lora_only"}, "bias", "lora_only", "must be one of ('none', 'all', 'geolora_only')"),
    ({"s_update": "adamw"}, "s_update", "adamw", "must be one of ('adam', 'adam_layer', 'sgd')"),
    ({"adam_betas": (0.9,)}, "adam_betas", (0.9,), "expected two floats in [0, 1)"),
    ({"adam_betas": (0.9, 1.0)}, "adam_betas", (0.9, 1.0), "expected two floats in [0, 1)"),
    ({"adam_betas": "ab"}, "adam_betas", "ab", "expected two floats in [0, 1)"),
    ({"adam_eps": 0.0}, "adam_eps", 0.0, "must be a float > 0"),
    ({"adam_eps": -1e-8}, "adam_eps", -1e-8, "must be a float > 0"),
    ({"rank_budget": 0}, "rank_budget", 0, "must be > 0"),
    ({"budget_type": "flops"}, "budget_type", "flops", "must be one of ('rank', 'params')"),
    ({"reorthonormalize_every": -1}, "reorthonormalize_every", -1, "expected an int >= 0"),
    ({"reorthonormalize_every": 1.5}, "reorthonormalize_every", 1.5, "expected an int >= 0"),
    ({"sync_factors_every": -2}, "sync_factors_every", -2, "expected an int >= 0"),
    ({"tau_warmup_ratio": -0.1}, "tau_warmup_ratio", -0.1, "expected a float in [0, 1]"),
    ({"tau_warmup_ratio": 1.5}, "tau_warmup_ratio", 1.5, "expected a float in [0, 1]"),
    ({"tau_warmup_steps": -1}, "tau_warmup_steps", -1, "expected an int >= 0"),
    ({"tau_warmup_steps": 2.5}, "tau_warmup_steps", 2.5, "expected an int >= 0"),
    ({"r": 4, "rank_pattern": {"query": 0}}, "rank_pattern['query']", 0, "ranks must be ints in [1, r_max=8]"),
    ({"r": 4, "rank_pattern": {"query": 9}}, "rank_pattern['query']", 9, "ranks must be ints in [1, r_max=8]"),
    ({"r": 4, "rank_pattern": {"query": 2.0}}, "rank_pattern['query']", 2.0, "ranks must be ints"),
    ({"r": 4, "rank_pattern": {"query": True}}, "rank_pattern['query']", True, "ranks must be ints"),
    ({"layers_pattern": "layer"}, "layers_pattern", "layer", "needs layers_to_transform"),
    (
        {"target_modules": ".*query", "layers_to_transform": [0]},
        "layers_to_transform",
        [0],
        "cannot be used when target_modules is a regex str",
    ),
]


@pytest.mark.parametrize(("kwargs", "field", "value", "reason"), VALUE_ERRORS)
def test_value_errors_name_field_and_value(kwargs, field, value, reason):
    with pytest.raises(ValueError, match=_msg(field, value) + ".*" + re.escape(reason)):
        GeoLoRAConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------- TypeErrors
TYPE_ERRORS = [
    ({"r": "8"}, "r", "8"),
    ({"r": 8.0}, "r", 8.0),
    ({"r": True}, "r", True),
    ({"r_max": 16.0}, "r_max", 16.0),
    ({"r_min": "1"}, "r_min", "1"),
    ({"tau": "0.1"}, "tau", "0.1"),
    ({"tau": None}, "tau", None),
    ({"lora_alpha": "8"}, "lora_alpha", "8"),
    ({"lora_dropout": "0.1"}, "lora_dropout", "0.1"),
    ({"fan_in_fan_out": 1}, "fan_in_fan_out", 1),
    ({"init_weights": "yes"}, "init_weights", "yes"),
    ({"static_shapes": None}, "static_shapes", None),
    ({"rank_budget": "10"}, "rank_budget", "10"),
    ({"rank_pattern": [("query", 2)]}, "rank_pattern", [("query", 2)]),
    ({"rank_pattern": {3: 2}}, "rank_pattern", 3),
    ({"target_modules": 5}, "target_modules", 5),
    ({"modules_to_save": "classifier"}, "modules_to_save", "classifier"),
]


@pytest.mark.parametrize(("kwargs", "field", "value"), TYPE_ERRORS)
def test_type_errors_name_field_and_value(kwargs, field, value):
    with pytest.raises(TypeError, match=_msg(field, value)):
        GeoLoRAConfig(**kwargs)


def test_invalid_value_in_saved_json_is_rejected_on_load(tmp_path):
    GeoLoRAConfig(r=4, target_modules=["query"]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["tau"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=_msg("tau", 2.0)):
        PeftConfig.from_pretrained(str(tmp_path))


# -------------------------------------------------------------------------------------------------------------- fuzzing
_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.one_of(st.integers(-1, 9), st.text(max_size=3), st.floats(0, 1)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 20), st.floats(), st.text(max_size=2)), max_size=2),
    st.sampled_from(["sgd", "adam", "rank", "params", "none", "all", "geolora_only", "SEQ_CLS", "query"]),
    st.tuples(st.floats(0, 1.2), st.floats(0, 1.2)),
)
_FIELDS = [
    "r",
    "r_max",
    "r_min",
    "tau",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "bias",
    "fan_in_fan_out",
    "init_weights",
    "rank_pattern",
    "s_update",
    "adam_betas",
    "adam_eps",
    "rank_budget",
    "budget_type",
    "reorthonormalize_every",
    "sync_factors_every",
    "static_shapes",
    "task_type",
    "inference_mode",
]


def _names_a_field(exc: Exception, fields) -> bool:
    msg = str(exc)
    # the bad field first ("GeoLoRAConfig.r_min=5 is invalid"), or a field it conflicts with ("... (r_max=4)")
    return any(f"{f}=" in msg or f"{f}[" in msg for f in fields) or ("task_type" in fields and "task type" in msg)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(_FIELDS), _ODD, min_size=1, max_size=4))
def test_fuzz_config_kwargs_only_clear_errors(kwargs):
    try:
        cfg = geolora.GeoLoRAConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        assert _names_a_field(exc, kwargs), f"{kwargs} -> {exc!r}"
        return
    assert 1 <= cfg.r_min <= cfg.r <= cfg.r_max and 0 <= cfg.tau < 1
    json.dumps(cfg.to_dict(), default=sorted)  # what save_pretrained writes


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(st.sampled_from(_FIELDS + ["knob_from_the_future", "another_new_key"]), _ODD, max_size=3),
    drop=st.lists(st.sampled_from(["r", "tau", "r_max", "rank_pattern", "s_update", "target_modules"]), max_size=2),
)
def test_fuzz_adapter_config_json_only_clear_errors_or_warning(tmp_path_factory, changes, drop):
    d = tmp_path_factory.mktemp("cfg")
    geolora.GeoLoRAConfig(r=4, target_modules=["query"]).save_pretrained(str(d))
    data = json.loads((d / "adapter_config.json").read_text())
    data.update(changes)
    for key in drop:
        data.pop(key, None)  # missing keys take their defaults
    (d / "adapter_config.json").write_text(json.dumps(data))
    unknown = [k for k in changes if k not in _FIELDS]
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            cfg = PeftConfig.from_pretrained(str(d))
        except (ValueError, TypeError) as exc:
            assert _names_a_field(exc, changes), f"{changes} -> {exc!r}"
            return
    assert isinstance(cfg, geolora.GeoLoRAConfig)
    for key in unknown:  # a key from a newer version: warned about, dropped, still working
        assert any(key in str(w.message) for w in caught), key
        assert not hasattr(cfg, key)


# ---------------------------------------------------------------------------------------------------- serialisation
def _rich_config() -> GeoLoRAConfig:
    return GeoLoRAConfig(
        r=4,
        r_max=6,
        r_min=2,
        tau=0.25,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        bias="geolora_only",
        rank_pattern={"bert.encoder.layer.0.attention.self.query": 3},
        s_update="sgd",
        adam_betas=(0.8, 0.99),
        rank_budget=12,
        budget_type="params",
        reorthonormalize_every=10,
        static_shapes=True,
        task_type="SEQ_CLS",
    )


def test_to_dict_json_roundtrip(tmp_path):
    cfg = _rich_config()
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "GEOLORA"
    assert sorted(raw["target_modules"]) == ["query", "value"]

    for loader in (PeftConfig.from_pretrained, GeoLoRAConfig.from_pretrained):
        loaded = loader(str(tmp_path))
        assert type(loaded) is GeoLoRAConfig
        assert loaded.peft_type is PeftType.GEOLORA
        assert loaded.to_dict() == cfg.to_dict()
        assert loaded.adam_betas == (0.8, 0.99) and isinstance(loaded.adam_betas, tuple)

    from_dict = GeoLoRAConfig(**{k: v for k, v in cfg.to_dict().items()})
    assert from_dict.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("make", [GeoLoRAConfig, _rich_config], ids=["default", "rich"])
def test_to_dict_equals_the_saved_json(tmp_path, make):
    """PEFT's own test_config.py::test_from_json_file: ``to_dict()`` is what adapter_config.json holds (adam_betas
    a list there); sets are written as lists by PEFT, so compare those as sets."""
    cfg = make()
    cfg.save_pretrained(tmp_path)
    raw = GeoLoRAConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    as_dict = cfg.to_dict()
    for name in ("target_modules", "exclude_modules"):
        if isinstance(as_dict[name], set):
            as_dict[name], raw[name] = sorted(as_dict[name]), sorted(raw[name])
    assert as_dict == raw
    assert as_dict["adam_betas"] == list(cfg.adam_betas) and isinstance(as_dict["adam_betas"], list)
    if make is GeoLoRAConfig:  # exactly PEFT's assertion (no sets in a default config)
        assert cfg.to_dict() == GeoLoRAConfig.from_json_file(str(tmp_path / "adapter_config.json"))
    # the config itself keeps a tuple, and to_dict() does not alias the config's own containers
    assert isinstance(cfg.adam_betas, tuple)
    cfg.to_dict()["rank_pattern"]["x"] = 1
    assert "x" not in cfg.rank_pattern


def test_copy_and_pickle_roundtrip():
    cfg = _rich_config()
    for clone in (copy.copy(cfg), copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg))):
        assert type(clone) is GeoLoRAConfig
        assert clone.to_dict() == cfg.to_dict()
        assert clone.peft_type is PeftType.GEOLORA
    deep = copy.deepcopy(cfg)
    deep.rank_pattern["other"] = 1
    assert "other" not in cfg.rank_pattern


def test_unknown_keys_in_adapter_config_warn_but_load(tmp_path, cnn, tiny_specs):
    """A key from a newer version in adapter_config.json: PEFT warns and drops it, the adapter still loads."""
    model = get_peft_model(cnn, GeoLoRAConfig(r=2, target_modules=["conv"], init_weights=False))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    data = json.loads(path.read_text())
    data["knob_from_the_future"] = 3
    path.write_text(json.dumps(data))

    with pytest.warns(UserWarning, match=r"Unexpected keyword arguments \['knob_from_the_future'\]"):
        cfg = PeftConfig.from_pretrained(str(tmp_path))
    assert isinstance(cfg, GeoLoRAConfig) and not hasattr(cfg, "knob_from_the_future")

    with pytest.warns(UserWarning, match="knob_from_the_future"):
        loaded = PeftModel.from_pretrained(tiny_specs["cnn"].build(), str(tmp_path))
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- metadata
def test_every_field_has_help_metadata():
    own = set(GeoLoRAConfig.__annotations__)
    assert {"r", "r_max", "r_min", "tau", "s_update", "rank_pattern", "rank_budget"} <= own
    missing = []
    for f in dataclasses.fields(GeoLoRAConfig):
        help_text = f.metadata.get("help")
        if f.name in own and not (isinstance(help_text, str) and len(help_text) > 10):
            missing.append(f.name)
    assert not missing, f"fields without help metadata: {missing}"


def test_config_is_exported_and_registered():
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING

    assert geolora.GeoLoRAConfig is GeoLoRAConfig
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.GEOLORA] is GeoLoRAConfig
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.GEOLORA] == "geolora_"


def test_scale_by_is_validated_and_an_adapter_saved_before_it_loads_with_the_old_rule(tmp_path):
    """Adapters saved before ``scale_by`` existed were trained with s = lora_alpha / r: they must load with it, and
    give the outputs they gave when saved; a config written now records its rule explicitly."""
    import json

    import peft
    import torch
    from torch import nn

    with pytest.raises(ValueError, match=_msg("scale_by", "rank")):
        GeoLoRAConfig(scale_by="rank")

    def base():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(10, 12), nn.Tanh(), nn.Linear(12, 4))

    old = peft.get_peft_model(
        base(), GeoLoRAConfig(r=2, r_max=6, lora_alpha=8, scale_by="r", init_weights=False, target_modules=["0", "2"])
    )
    x = torch.randn(5, 10)
    expected = old(x)
    old.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert saved["scale_by"] == "r"
    del saved["scale_by"]  # what an adapter written before the field looks like
    path.write_text(json.dumps(saved))
    loaded = peft.PeftModel.from_pretrained(base(), tmp_path)
    assert loaded.peft_config["default"].scale_by == "r"
    assert {m.scaling["default"] for m in loaded.modules() if hasattr(m, "geolora_S")} == {4.0}
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
