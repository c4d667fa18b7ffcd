"""A parameter budget (``budget_type="params"``) counts exactly the adapter parameters that are kept and saved."""

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import geolora
from geolora.model import iter_geolora_layers

BUDGET = 150


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(12, 10)
        self.b = nn.Linear(10, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _kept(layer) -> int:
    """U (out, k) + S (k, k, saved in full) + V (in, k) of one layer at its live rank k."""
    k = layer.r["default"]
    return k * (layer.out_features + layer.in_features + k)


@pytest.mark.parametrize("augment_every", [1, 3])
def test_parameter_budget_is_never_exceeded_in_training_or_in_the_saved_adapter(tmp_path, augment_every):
    """Every truncation keeps the budget; with an interval (k > 1) the augmented directions inside it are not yet
    judged, so the budget holds after each interval's last step and after ``finish_interval`` (what is saved)."""
    torch.manual_seed(0)
    config = geolora.GeoLoRAConfig(
        r=4,
        r_max=8,
        target_modules=["a", "b"],
        rank_budget=BUDGET,
        budget_type="params",
        s_update="sgd",
        augment_every=augment_every,
    )
    model = peft.get_peft_model(Net(), config)
    layers = dict(iter_geolora_layers(model))
    opt = geolora.create_geolora_optimizer(model, lr=0.5)
    X, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    checked = 0
    for _ in range(5 * augment_every + 1):  # ends one step into an open interval when augment_every > 1
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        opt.zero_grad()
        if opt.mid_interval:
            continue
        checked += 1
        kept = sum(_kept(layer) for layer in layers.values())
        assert kept <= BUDGET, geolora.get_ranks(model)
        # and it is used: admission stopped at a value whose rank did not fit, i.e. one that costs more than what is
        # left (the marginal cost of rank k -> k + 1 is m + n + 2k + 1), unless every layer is at its r_max (b: 3)
        growable = [
            layer.out_features + layer.in_features + 2 * layer.r["default"] + 1
            for layer in layers.values()
            if layer.r["default"] < layer.r_max["default"]
        ]
        assert not growable or kept + max(growable) > BUDGET, geolora.get_ranks(model)
    assert checked == 5 + (augment_every == 1)
    if augment_every > 1:
        assert opt.mid_interval and sum(_kept(layer) for layer in layers.values()) > BUDGET  # augmented, open
        assert opt.finish_interval() and not opt.mid_interval
        kept = sum(_kept(layer) for layer in layers.values())
        assert kept <= BUDGET
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    factors = {k: v for k, v in saved.items() if k.rsplit(".", 1)[-1] in ("geolora_U", "geolora_S", "geolora_V")}
    assert len(factors) == 6
    assert sum(v.numel() for v in factors.values()) == kept <= BUDGET
