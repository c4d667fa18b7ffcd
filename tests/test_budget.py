"""A parameter budget (``budget_type="params"``) counts exactly the adapter parameters that are kept and saved."""

import peft
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


def test_parameter_budget_is_never_exceeded_in_training_or_in_the_saved_adapter(tmp_path):
    torch.manual_seed(0)
    config = geolora.GeoLoRAConfig(
        r=4, r_max=8, target_modules=["a", "b"], rank_budget=BUDGET, budget_type="params", s_update="sgd"
    )
    model = peft.get_peft_model(Net(), config)
    layers = dict(iter_geolora_layers(model))
    opt = geolora.create_geolora_optimizer(model, lr=0.5)
    X, y = torch.randn(32, 12), torch.randint(0, 3, (32,))
    for _ in range(5):
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        opt.zero_grad()
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
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    factors = {k: v for k, v in saved.items() if k.rsplit(".", 1)[-1] in ("geolora_U", "geolora_S", "geolora_V")}
    assert len(factors) == 6
    assert sum(v.numel() for v in factors.values()) == kept <= BUDGET
