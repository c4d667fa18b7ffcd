"""Tiny GeoLoRA models and checks shared by the optimizer, callback and saved-adapter tests (imports geolora, so it
cannot live in ``tests/conftest.py``)."""

from __future__ import annotations

import peft
import torch
from torch import nn

import geolora
from geolora.integrator import orthonormality_error


class TwoLayer(nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 12)
        self.head = nn.Linear(12, 3)
        if unused:
            self.unused = nn.Linear(10, 9)  # targeted but never called in forward

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


def geolora_layers(model) -> dict[str, geolora.GeoLoRALayer]:
    """The GeoLoRA layers of ``model`` by their last name component (``a``, ``b``, ``lin``, ...)."""
    return {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}


def two_layer(s_update="sgd", **kw):
    """:class:`TwoLayer` with GeoLoRA on ``a`` and ``b`` (r=3, r_max=6) and a trained head."""
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(
        r=3, r_max=6, target_modules=["a", "b"], modules_to_save=["head"], s_update=s_update, **kw
    )
    return peft.get_peft_model(TwoLayer(), cfg)


def check_invariants(model, tol=1e-5):
    """Ranks in bounds and recorded, factors finite, bases orthonormal, everything past the rank zero."""
    for name, layer in geolora_layers(model).items():
        a = "default"
        k = layer.r[a]
        assert layer.r_min[a] <= k <= layer.r_max[a], name
        assert int(layer.geolora_rank[a]) == k
        U, S, V = layer.geolora_U[a], layer.geolora_S[a], layer.geolora_V[a]
        for t in (U, S, V):
            assert torch.isfinite(t).all(), name
        assert orthonormality_error(U, k) <= tol and orthonormality_error(V, k) <= tol, name
        assert U[:, k:].abs().sum() == 0 and V[:, k:].abs().sum() == 0 and S[k:, :].abs().sum() == 0, name
        assert S[:, k:].abs().sum() == 0, name


X16 = torch.randn(16, 10, generator=torch.Generator().manual_seed(7))
Y16 = torch.arange(16) % 3


def loss_of(model, x=X16, y=Y16):
    return nn.functional.cross_entropy(model(x), y)
