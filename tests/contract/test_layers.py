"""GeoLoRA layers: the one-backward directions against dense float64 autograd, identity at init, unsupported layers,
and the registration of the method with PEFT."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel, get_peft_model
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

import geolora
from geolora import GeoLoRAConfig, GeoLoRALayer

R, ALPHA = 3, 6.0  # r_max = R: s = ALPHA / r_max = 2 (not 1, so a missing scale factor shows)


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(7, 5)
    if kind == "conv1d":
        return Conv1D(5, 7)  # nf=out=5, nx=in=7, weight (in, out)
    if kind == "conv2d":
        return nn.Conv2d(3, 4, kernel_size=3, stride=2, padding=1)
    raise ValueError(kind)


def _make_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "conv2d":
        return torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64)
    return torch.randn(2, 4, 7, generator=g, dtype=torch.float64)  # (batch, seq, in): tests the flattening


def _dense_forward(kind: str, base: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The adapted layer with ΔW given densely as (out, in) (Conv2d: (out, in*kh*kw))."""
    w0 = base.weight.detach()
    b = base.bias.detach()
    if kind == "linear":
        return F.linear(x, w0 + delta, b)
    if kind == "conv1d":
        return x @ (w0 + delta.T) + b
    return F.conv2d(x, w0 + delta.reshape(w0.shape), b, base.stride, base.padding, base.dilation)


def _adapted_layer(kind: str, random_s: bool) -> GeoLoRALayer:
    model = get_peft_model(
        _Holder(_make_base(kind)),
        GeoLoRAConfig(r=R, r_max=R, lora_alpha=ALPHA, target_modules=["layer"], fan_in_fan_out=kind == "conv1d"),
    )
    model = model.double()
    layer = model.base_model.model.layer
    assert isinstance(layer, GeoLoRALayer)
    if random_s:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            layer.geolora_S["default"].copy_(torch.randn(R, R, generator=g, dtype=torch.float64))  # full, not diagonal
    return layer


@pytest.mark.parametrize("random_s", [False, True], ids=["S=0", "S=random"])
@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_backward_writes_geolora_directions(kind, random_s):
    """U.grad = G_M V, V.grad = G_M^T U, S.grad = U^T G_M V with G_M = s dL/dΔW; x.grad is the true gradient."""
    layer = _adapted_layer(kind, random_s)
    U = layer.geolora_U["default"]
    S = layer.geolora_S["default"]
    V = layer.geolora_V["default"]
    s = layer.scaling["default"]
    assert s == ALPHA / R and U.dtype == torch.float64
    base = layer.get_base_layer()
    x = _make_input(kind)

    # dense float64 reference: a zero leaf D added to W0 + s U S V^T gives dL/dΔW at the current point
    Ud, Sd, Vd = U.detach(), S.detach(), V.detach()
    D = torch.zeros(U.shape[0], V.shape[0], dtype=torch.float64, requires_grad=True)
    x_ref = x.clone().requires_grad_(True)
    y_ref = _dense_forward(kind, base, x_ref, D + s * Ud @ Sd @ Vd.T)
    weights = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (y_ref * weights).sum().backward()
    G_M = s * D.grad  # (out, in)

    x_geo = x.clone().requires_grad_(True)
    y_geo = layer(x_geo)
    torch.testing.assert_close(y_geo, y_ref.detach(), rtol=1e-12, atol=1e-12)
    (y_geo * weights).sum().backward()

    tol = {"rtol": 1e-10, "atol": 1e-10}
    expected_U = G_M @ Vd  # (out, r)
    assert expected_U.abs().max() > 1e-3  # the reference is not trivially zero (even at S = 0)
    torch.testing.assert_close(U.grad, expected_U, **tol)
    torch.testing.assert_close(V.grad, G_M.T @ Ud, **tol)
    torch.testing.assert_close(S.grad, Ud.T @ G_M @ Vd, **tol)
    torch.testing.assert_close(x_geo.grad, x_ref.grad, **tol)
    if not random_s:
        # at S = 0 the true dL/dU = G_M V S^T vanishes; GeoLoRA's direction must not
        assert U.grad.norm() > 1e-3 and V.grad.norm() > 1e-3


@pytest.mark.parametrize("kind", ["linear", "conv1d", "conv2d"])
def test_backward_directions_with_live_rank_below_capacity(kind):
    """After grow_capacity (zero columns beyond the rank) the directions of the live columns are unchanged and the
    gradients of the padding columns are zero or absent."""
    layer = _adapted_layer(kind, random_s=True)
    x = _make_input(kind)
    w = None

    def directions():
        nonlocal w
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        if w is None:
            w = torch.randn(y.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        (y * w).sum().backward()
        return [p.grad.clone() for p in (layer.geolora_U["default"], layer.geolora_S["default"])]

    gU, gS = directions()
    layer.zero_grad(set_to_none=True)
    layer.grow_capacity("default", R + 2)
    assert layer.capacity("default") == R + 2 and layer.r["default"] == R
    gU2, gS2 = directions()
    torch.testing.assert_close(gU2[:, :R], gU, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gS2[:R, :R], gS, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(gU2[:, R:]) == 0 and torch.count_nonzero(gS2[R:, :]) == 0


def test_grow_capacity_after_backward_is_refused_and_changes_nothing():
    """Regression: the refusal used to come after U had already been padded, leaving U, S, V at different widths."""
    layer = _adapted_layer("linear", random_s=True)
    layer(_make_input("linear")).sum().backward()
    before = {name: getattr(layer, name)["default"].detach().clone() for name in layer.adapter_layer_names}
    with pytest.raises(RuntimeError, match=r"grow_capacity\(\) must run before the first backward pass"):
        layer.grow_capacity("default", R + 2)
    for name, value in before.items():
        assert torch.equal(getattr(layer, name)["default"], value), name


# ---------------------------------------------------------------------------------------------------- identity at init
@pytest.mark.parametrize("name", ["bert", "gpt2", "vit", "cnn"])
def test_identity_at_init(name, tiny_specs):
    spec = tiny_specs[name]
    model = spec.build()
    inputs = spec.inputs()
    with torch.no_grad():
        expected = spec.forward(model, inputs)
    peft_model = get_peft_model(model, GeoLoRAConfig(r=2, target_modules=list(spec.target_modules)))
    layers = [m for m in peft_model.modules() if isinstance(m, GeoLoRALayer)]
    assert len(layers) >= 2
    for layer in layers:
        U, S, V = (layer.geolora_U["default"], layer.geolora_S["default"], layer.geolora_V["default"])
        assert torch.count_nonzero(S) == 0
        torch.testing.assert_close(U.T @ U, torch.eye(2), rtol=0, atol=1e-6)
        torch.testing.assert_close(V.T @ V, torch.eye(2), rtol=0, atol=1e-6)
    with torch.no_grad():
        out = spec.forward(peft_model, inputs)
    assert torch.equal(out, expected)


# ---------------------------------------------------------------------------------------------------- unsupported
def test_embedding_target_raises_naming_module_and_type(bert):
    cfg = GeoLoRAConfig(r=2, target_modules=["word_embeddings"])
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.word_embeddings' of type torch\.nn\.modules\..*Embedding"):
        get_peft_model(bert, cfg)


def test_layernorm_target_raises_naming_module_and_type(bert):
    cfg = GeoLoRAConfig(r=2, target_modules=r".*embeddings\.LayerNorm")
    with pytest.raises(TypeError, match=r"'bert\.embeddings\.LayerNorm' of type torch\.nn\..*LayerNorm"):
        get_peft_model(bert, cfg)


def test_grouped_conv_raises(tiny_specs):
    model = tiny_specs["cnn"].build(groups=2)
    with pytest.raises(TypeError, match=r"'pointwise' \(nn\.Conv2d with groups=2\)"):
        get_peft_model(model, GeoLoRAConfig(r=2, target_modules=["pointwise"]))


def test_non_zero_padding_mode_conv_raises():
    model = _Holder(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(TypeError, match=r"'layer' \(nn\.Conv2d with padding_mode='reflect'\)"):
        get_peft_model(model, GeoLoRAConfig(r=2, target_modules=["layer"]))


# ---------------------------------------------------------------------------------------------------- registration
def _geolora_members() -> list:
    return [m for m in PeftType if m.name == "GEOLORA"]


def test_peft_type_is_a_real_enum_member():
    member = PeftType.GEOLORA
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member.name == "GEOLORA" and member.value == "GEOLORA" and member == "GEOLORA"
    assert PeftType("GEOLORA") is member and PeftType["GEOLORA"] is member
    assert _geolora_members() == [member]
    assert "GEOLORA" in PeftType._value2member_map_
    # transformers' adapter integration assumes prefix == peft_type.value.lower() + "_"
    assert geolora.GeoLoRAModel.prefix == member.value.lower() + "_"
    import pickle

    assert pickle.loads(pickle.dumps(member)) is member


def _save_and_reload_cnn(tmp_path, tiny_specs) -> None:
    spec = tiny_specs["cnn"]
    model = get_peft_model(spec.build(), geolora.GeoLoRAConfig(r=2, target_modules=["conv"], init_weights=False))
    x = spec.inputs()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(spec.build(), str(tmp_path))
    assert isinstance(loaded.peft_config["default"], geolora.GeoLoRAConfig)
    torch.testing.assert_close(spec.forward(loaded, x), spec.forward(model, x), rtol=0, atol=1e-6)


def test_import_twice_and_reload_keep_working(tmp_path, tiny_specs):
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    member = PeftType.GEOLORA
    assert importlib.import_module("geolora") is geolora
    # registering again (what a second import of a re-executed module does) is a no-op, not an error
    geolora._compat.register_geolora(
        geolora.GeoLoRAConfig, geolora.GeoLoRAModel, check_weights=geolora.model.check_saved_adapter
    )
    reloaded = importlib.reload(geolora)
    assert reloaded is geolora
    assert PeftType.GEOLORA is member and _geolora_members() == [member]
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is geolora.GeoLoRAConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is geolora.GeoLoRAModel
    assert geolora.GeoLoRAConfig().peft_type is member
    _save_and_reload_cnn(tmp_path, tiny_specs)


LOAD_WITHOUT_IMPORT = """
import json, sys
from peft import PeftConfig, PeftModel
from conftest import make_cnn

result = {}
for what, load in [("PeftConfig.from_pretrained", lambda: PeftConfig.from_pretrained("adapter")),
                   ("PeftModel.from_pretrained", lambda: PeftModel.from_pretrained(make_cnn(), "adapter"))]:
    try:
        load()
        result[what] = {"ok": True}
    except Exception as exc:
        result[what] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
result["geolora_imported"] = "geolora" in sys.modules
json.dump(result, open("result.json", "w"))
"""


def test_loading_without_import_geolora_fails(tmp_path, tiny_specs, fresh_python):
    """Without ``import geolora`` PEFT has no GEOLORA entry: loading fails with ``KeyError: 'GEOLORA'``.

    PEFT has no plugin discovery, so nothing of geolora runs in that process and the message cannot be improved from
    here (it does not tell the user to ``import geolora``; the README must).  This test documents the behaviour.
    """
    spec = tiny_specs["cnn"]
    model = get_peft_model(spec.build(), GeoLoRAConfig(r=2, target_modules=["conv"]))
    model.save_pretrained(tmp_path / "adapter")
    result = fresh_python.run_ok(LOAD_WITHOUT_IMPORT, tmp_path)
    assert result.pop("geolora_imported") is False
    for what, outcome in result.items():
        assert outcome["ok"] is False, what
        assert outcome["type"] == "KeyError", (what, outcome)
        assert re.search("GEOLORA", outcome["message"]), (what, outcome)


def test_merge_into_an_integer_base_weight_is_refused_before_anything_changes():
    """A base weight GeoLoRA cannot add a float update to (here int8, as a quantized base without its own GeoLoRA
    layer type would store it): merge_and_unload refuses naming the layer, and the weight is untouched."""
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
        geolora.GeoLoRAConfig(r=2, target_modules=["0", "1"], init_weights=False),
    )
    base = model.base_model.model[1].get_base_layer()
    base.weight = torch.nn.Parameter(torch.randint(-5, 5, (8, 8), dtype=torch.int8), requires_grad=False)
    before = base.weight.detach().clone()
    with pytest.raises(ValueError, match=r"cannot merge into layer '1': its weight is a Tensor \(torch.int8\)"):
        model.merge_and_unload()
    assert torch.equal(base.weight, before)
    assert not any(m.merged for m in model.modules() if isinstance(m, geolora.GeoLoRALayer))
