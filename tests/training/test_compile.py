"""torch.compile with static shapes: ranks change, the compiled model does not recompile."""

import peft
import pytest
import torch
from torch import nn

import geolora


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(10, 16)
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


@pytest.mark.parametrize("augment_every", [1, 4])
def test_compiled_static_shapes_do_not_recompile(augment_every):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = peft.get_peft_model(
        Net(),
        geolora.GeoLoRAConfig(
            r=2,
            r_max=8,
            tau=0.05,
            target_modules=["a", "b"],
            static_shapes=True,
            s_update="sgd",
            augment_every=augment_every,
        ),
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.5)
    X, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    eager_ref = model(X).detach()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=False)
    assert torch.allclose(compiled(X), eager_ref, atol=1e-6)
    seen = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(15):
            nn.functional.cross_entropy(compiled(X), y).backward()
            opt.step()
            opt.zero_grad()
            seen.add(tuple(geolora.get_ranks(model).values()))
    assert len(seen) > 1  # ranks changed while the graph stayed the same
    # the static-shape forward equals the sliced eager forward
    for m in model.modules():
        if isinstance(m, geolora.GeoLoRALayer):
            m.static_shapes = False
    assert torch.allclose(compiled._orig_mod(X), model(X), atol=1e-6)
