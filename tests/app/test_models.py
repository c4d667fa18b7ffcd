"""geolora.app.models: the packaged-model lookup and the one adapter-size formula on GeoLoRA, LoRA and AdaLoRA."""

from __future__ import annotations

import sys
import types

import peft
import pytest
import torch
import transformers

import geolora
from geolora.app import models as gm
from geolora.app.data import DataError
from geolora.model import iter_geolora_layers


def _tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24, vocab_size=50, num_labels=2
    )
    return transformers.BertForSequenceClassification(cfg)


TARGETS = ["query", "value", "intermediate.dense"]
# (out, in) of the targets of _tiny_bert: 2 layers x (query 16x16, value 16x16, intermediate 24x16)
SHAPES = {"query": (16, 16), "value": (16, 16), "intermediate.dense": (24, 16)}


def _shape(name: str) -> tuple[int, int]:
    return next(v for k, v in SHAPES.items() if name.endswith(k))


def test_geolora_sizes_follow_the_formula_at_the_live_ranks():
    model = peft.get_peft_model(
        _tiny_bert(), geolora.GeoLoRAConfig(r=2, r_max=4, target_modules=TARGETS, modules_to_save=["classifier"])
    )
    layers = [name for name, _ in iter_geolora_layers(model)]
    first = layers[0]
    for name, layer in geolora.find_geolora_layers(model):  # one layer at another live rank
        if name.endswith(first):
            layer.r["default"] = 3
    sizes = gm.adapter_parameters(model, "geolora")
    assert set(sizes["per_layer"]) == set(layers) and len(layers) == 6
    for name in layers:
        out, in_ = _shape(name)
        r = 3 if name == first else 2
        assert sizes["ranks"][name] == r
        assert sizes["per_rank"][name] == out + in_
        assert sizes["per_layer"][name] == r * (out + in_) + r * r  # U, S, V
    assert sizes["adapter"] == sum(sizes["per_layer"].values())
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert head == 16 * 2 + 2 and sizes["head"] == head and sizes["kept"] == sizes["adapter"] + head
    assert sizes["capacity"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sizes["total_rank"] == 13 and sizes["num_layers"] == 6
    assert gm.layer_ranks(model, "geolora") == sizes["ranks"] == geolora.get_ranks(model)


def test_lora_sizes_are_the_factor_sizes():
    model = peft.get_peft_model(_tiny_bert(), peft.LoraConfig(r=4, target_modules=TARGETS))
    sizes = gm.adapter_parameters(model, "lora")
    expected = {}
    for name, m in model.named_modules():
        if isinstance(m, peft.tuners.lora.LoraLayer):
            expected[name.removeprefix("base_model.model.")] = (
                m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
            )
    assert sizes["per_layer"] == expected and len(expected) == 6
    assert all(sizes["per_rank"][n] == sum(_shape(n)) for n in expected)
    assert gm.layer_ranks(model, "lora") == dict.fromkeys(expected, 4)


def test_adalora_counts_only_the_unmasked_triplets():
    config = peft.AdaLoraConfig(init_r=6, target_r=4, total_step=10, target_modules=TARGETS)
    model = peft.get_peft_model(_tiny_bert(), config)
    names = [
        n.removeprefix("base_model.model.")
        for n, m in model.named_modules()
        if isinstance(m, peft.tuners.adalora.AdaLoraLayer)
    ]
    before = gm.adapter_parameters(model, "adalora")  # no allocation yet: every triplet is live
    assert before["ranks"] == dict.fromkeys(names, 6)
    assert all(before["per_layer"][n] == 6 * (sum(_shape(n)) + 1) for n in names)  # A, E, B
    masked = names[0]
    model.peft_config["default"].rank_pattern = {f"{masked}.lora_E.default": [True, False, True, False, False, False]}
    after = gm.adapter_parameters(model, "adalora")
    assert after["ranks"][masked] == 2 and after["per_layer"][masked] == 2 * (sum(_shape(masked)) + 1)
    assert after["capacity"] == before["capacity"]  # masked triplets still train; they are only sliced on save
    assert gm.layer_ranks(model, "adalora") == after["ranks"]


def test_parameter_counts_from_shapes():
    layers = [gm.LayerShape("a", 16, 8, 3), gm.LayerShape("b", 4, 32, 6)]
    assert gm.parameter_counts(layers, initial_rank=5) == {
        "geolora_params": 3 * 24 + 9 + 6 * 36 + 36,
        "exported_lora_params": 3 * 24 + 6 * 36,
        "lora_initial_rank_params": 5 * 24 + 4 * 36,  # min(r0, out, in)
        "total_rank": 9,
        "num_layers": 2,
    }
    with pytest.raises(ValueError, match=r"method='dora' is not one of"):
        gm.layer_parameters("dora", 2, 10)


def test_resolve_model_finds_packaged_copies(monkeypatch, tmp_path):
    package = types.ModuleType("geolora_test_packaged")
    package.get_model_path = lambda: tmp_path
    entry = ("geolora_test_packaged", "geolora-test-packaged==0.1", "someone/packaged")
    monkeypatch.setitem(gm.BUILTIN_MODELS, "packaged", entry)
    monkeypatch.setitem(gm.BUILTIN_MODELS, "someone/packaged", entry)
    assert gm.resolve_model("some/hub-id") == "some/hub-id" and gm.hub_id("some/hub-id") == "some/hub-id"
    monkeypatch.setitem(sys.modules, "geolora_test_packaged", None)  # not installed
    with pytest.raises(gm.ModelError, match=r"'packaged' ships in the package 'geolora-test-packaged'.*make assets"):
        gm.resolve_model("packaged")
    assert gm.resolve_model("someone/packaged") == "someone/packaged"  # its Hub id stays a Hub id
    monkeypatch.setitem(sys.modules, "geolora_test_packaged", package)
    assert gm.resolve_model("packaged") == gm.resolve_model("someone/packaged") == str(tmp_path)
    assert gm.is_packaged("packaged") and gm.hub_id("packaged") == "someone/packaged"
    assert issubclass(gm.ModelError, DataError)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(gm.ModelError, match=r"cannot load model '.*nowhere' for text classification"):
        gm.load_base_model(str(tmp_path / "nowhere"), "text", ["a", "b"])
    with pytest.raises(gm.ModelError, match=r"cannot load the image processor of '.*nowhere'"):
        gm.load_preprocessor(str(tmp_path / "nowhere"), "image")
