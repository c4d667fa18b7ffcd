"""Probe directions (``GeoLoRAConfig.explore_rank``): the forward of each interval's augmentation step adds ``p``
random orthonormal columns to U and V with zero coefficients.  The output is unchanged, the backward gives the
gradient on them, and the step is GeoLoRA's augmentation of the widened (same) adapter."""

import copy

import peft
import pytest
import torch
from torch import nn

import geolora
from geolora import integrator as I


def _orthonormal(m, r, gen):
    q, _ = torch.linalg.qr(torch.randn(m, r, dtype=torch.float64, generator=gen))
    return q


def test_probe_directions_are_orthonormal_after_the_rank_and_zero_elsewhere():
    gen = torch.Generator().manual_seed(0)
    m, cap, p = 20, 6, 4
    ranks = torch.tensor([1, 3, 6])
    U = torch.zeros(3, m, cap, dtype=torch.float64)
    for b, r in enumerate(ranks.tolist()):
        U[b, :, :r] = _orthonormal(m, r, gen)
    probes, widened = I.probe_directions(U, ranks, p, torch.Generator().manual_seed(1))
    assert widened.tolist() == [5, 6, 6]  # r + p, capped at the capacity
    for b, (r, w) in enumerate(zip(ranks.tolist(), widened.tolist())):
        assert probes[b, :, :r].abs().sum() == 0 and probes[b, :, w:].abs().sum() == 0
        full = U[b] + probes[b]
        gram = full[:, :w].T @ full[:, :w]
        assert torch.allclose(gram, torch.eye(w, dtype=torch.float64), atol=1e-12), b
    again, _ = I.probe_directions(U, ranks, p, torch.Generator().manual_seed(1))
    assert torch.equal(probes, again)  # a function of the factors and the seed
    none, same = I.probe_directions(U, ranks, 0, torch.Generator().manual_seed(1))
    assert none.abs().max() == 0 and torch.equal(same, ranks)


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 10)

    def forward(self, x):
        return self.lin(x)


class OneConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Conv2d(3, 10, 2)  # the (10, 12) matrix view: the same shapes as OneLayer

    def forward(self, x):
        return self.lin(x.view(-1, 3, 2, 2)).flatten(1)


def _model(r=2, r_max=8, base=OneLayer, **kw):
    torch.manual_seed(0)
    kw.setdefault("augment_every", 3)
    config = geolora.GeoLoRAConfig(r=r, r_max=r_max, target_modules=["lin"], init_weights=False, **kw)
    model = peft.get_peft_model(base(), config).double()
    return model, model.base_model.model.lin


def test_probes_leave_the_output_unchanged_and_the_gradient_on_them_is_g_times_the_probe():
    model, layer = _model()
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    assert opt.phase == "augment" and "default" in layer.geolora_probe  # set for the first forward
    PU, PV, width = layer.geolora_probe["default"]
    assert width == 2 + 4
    x = torch.randn(16, 12, dtype=torch.float64)
    y = model(x)
    probe = layer.geolora_probe.pop("default")
    with torch.no_grad():
        plain = model(x)
    layer.geolora_probe["default"] = probe
    assert torch.allclose(y, plain, atol=1e-14, rtol=0)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    G = layer.scaling["default"] * dy.T @ x  # (out, in): the gradient of the adapted weight, times s
    assert torch.allclose(layer.geolora_U["default"].grad[:, 2:6], G @ PV[:, 2:6], atol=1e-12)
    assert torch.allclose(layer.geolora_V["default"].grad[:, 2:6], G.T @ PU[:, 2:6], atol=1e-12)
    U = layer.geolora_U["default"].detach() + PU
    V = layer.geolora_V["default"].detach() + PV
    assert torch.allclose(layer.geolora_S["default"].grad[:6, :6], U[:, :6].T @ G @ V[:, :6], atol=1e-12)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 12, dtype=torch.float64, generator=g), torch.randn(16, 10, dtype=torch.float64, generator=g)


def _train_step(model, opt, seed):
    x, t = _batch(seed)
    ((model(x) - t) ** 2).mean().backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("base", [OneLayer, OneConv], ids=["linear", "conv2d"])
def test_the_probed_step_is_geolora_s_augmentation_of_the_widened_adapter(base):
    """float64, sgd: the step with probes equals the explore_rank=0 step of a copy whose U, V hold the probes as live
    columns with zero coefficients (rank r + p): the same adapter, widened."""
    model, layer = _model(s_update="sgd", base=base)
    opt = geolora.create_geolora_optimizer(model, lr=5e-2)
    PU, PV, width = layer.geolora_probe["default"]
    ref, ref_layer = _model(s_update="sgd", explore_rank=0, base=base)
    ref_opt = geolora.create_geolora_optimizer(ref, lr=5e-2)
    with torch.no_grad():
        ref_layer.geolora_U["default"].copy_(layer.geolora_U["default"] + PU)
        ref_layer.geolora_V["default"].copy_(layer.geolora_V["default"] + PV)
        ref_layer.geolora_S["default"].copy_(layer.geolora_S["default"])
    ref_layer.set_rank("default", width)
    assert not ref_layer.geolora_probe
    _train_step(model, opt, 0)
    _train_step(ref, ref_opt, 0)
    assert layer.r["default"] == ref_layer.r["default"] > 2
    assert torch.allclose(layer.get_delta_weight("default"), ref_layer.get_delta_weight("default"), atol=1e-12)
    assert not layer.geolora_probe  # cleared for the interval's coefficient steps
    _train_step(model, opt, 1)
    _train_step(model, opt, 2)  # the interval's truncation: probes again for the next augmentation
    assert "default" in layer.geolora_probe


@pytest.mark.parametrize("kw", [{"augment_every": 1}, {"explore_rank": 0}], ids=["every-step", "explore-0"])
def test_no_probes_under_algorithm_1_or_explore_rank_0(kw):
    model, layer = _model(**kw)
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    for seed in range(4):
        assert not layer.geolora_probe
        _train_step(model, opt, seed)


def test_a_resumed_optimizer_draws_the_same_probes():
    model, layer = _model()
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    for seed in range(3):  # one interval: the next step augments
        _train_step(model, opt, seed)
    assert opt.phase == "augment"
    expected = layer.geolora_probe["default"]
    resumed, resumed_layer = _model()
    geolora.grow_capacity(resumed)
    resumed.load_state_dict(model.state_dict())
    resumed_opt = geolora.create_geolora_optimizer(resumed, lr=1e-2)
    resumed_opt.load_state_dict(opt.state_dict())
    got = resumed_layer.geolora_probe["default"]
    assert got[2] == expected[2] and torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    _train_step(model, opt, 3)
    _train_step(resumed, resumed_opt, 3)
    assert torch.equal(layer.get_delta_weight("default"), resumed_layer.get_delta_weight("default"))


def test_clear_probes_and_a_deep_copy():
    model, layer = _model()
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    twin = copy.deepcopy(model)  # a copy keeps its own probes; an optimizer built on it sets them afresh
    opt.clear_probes()
    assert not layer.geolora_probe
    _train_step(model, opt, 0)  # an augmentation without probes still runs
    assert opt.num_steps == 1
    twin_layer = twin.base_model.model.lin
    assert "default" in twin_layer.geolora_probe


def test_explore_rank_is_validated_recorded_and_old_adapters_load_with_0(tmp_path):
    with pytest.raises(ValueError, match="explore_rank"):
        geolora.GeoLoRAConfig(explore_rank=-1)
    with pytest.raises(ValueError, match="explore_rank"):
        geolora.GeoLoRAConfig(explore_rank=1.5)
    assert geolora.GeoLoRAConfig().explore_rank == 4
    model, _ = _model(explore_rank=3)
    model.save_pretrained(tmp_path / "new")
    assert peft.PeftConfig.from_pretrained(tmp_path / "new").explore_rank == 3
    old = geolora.GeoLoRAConfig(target_modules=["lin"]).to_dict()
    del old["explore_rank"]
    assert geolora.GeoLoRAConfig(**old).explore_rank == 0  # saved before the field: trained without probes
