"""The GeoLoRA step reads device values on the host exactly once per optimizer step (the new ranks and the inf/NaN
flag, one ``tolist()``).  torch.cuda.set_sync_debug_mode is GPU-only, so on CPU we count the Python-level device-to-
host conversions (item, tolist, bool/int/float/index of a tensor) made from geolora's own code."""

import sys
from pathlib import Path

import peft
import pytest
import torch
from torch import nn

import geolora

GEOLORA_DIR = str(Path(geolora.__file__).parent)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 16)
        self.c = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))))


@pytest.fixture
def host_reads(monkeypatch):
    calls = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(GEOLORA_DIR):
                calls.append((_name, caller, sys._getframe(1).f_lineno))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("augment_every", [1, 3])
@pytest.mark.parametrize("kw", [{"s_update": "adam"}, {"s_update": "sgd"}, {"rank_budget": 12, "s_update": "adam"}])
def test_one_host_read_per_step(host_reads, kw, augment_every):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Net(),
        geolora.GeoLoRAConfig(
            r=3,
            r_max=6,
            tau=0.05,
            target_modules=["a", "b", "c"],
            modules_to_save=["head"],
            augment_every=augment_every,
            **kw,
        ),
    )
    opt = geolora.create_geolora_optimizer(model, lr=1e-2, weight_decay=0.01)
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    steps = 6  # with augment_every = 3: two whole intervals (augment, coefficients, truncate)
    phases = []
    for _ in range(steps):
        nn.functional.cross_entropy(model(X), y).backward()
        phases.append(opt.phase)
        before = len(host_reads)
        opt.step()
        assert [c[0] for c in host_reads[before:]] == ["tolist"], host_reads[before:]
        opt.zero_grad()
    assert opt.num_steps == steps
    assert set(phases) == ({"step"} if augment_every == 1 else {"augment", "coefficients", "truncate"})
