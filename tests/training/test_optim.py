"""The step driver (the optimizer's orchestration): parity with an independent float64 reference of Algorithm 1,
invariants, rank recovery, inf/NaN skipping (fp32, bf16 autocast, fp16 GradScaler), schedulers, accumulation and
checkpointing, the step's edge cases (degenerate gradients and ranks, extreme learning rates, a property-based driver)
and long runs (10000 fp32 steps, bf16 against fp32).  The step's math on its own (the integrator's functions) is
tested in test_integrator.py."""

import ast
import copy
import logging
import math
import time
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import geolora
from geolora.integrator import orthonormality_error
from tests.reference import basis_free_step, reference_step
from tests.training._helpers import TwoLayer, check_invariants, geolora_layers, loss_of, two_layer


class OneLayer(nn.Module):
    def __init__(self, n=10, m=12, bias=False):
        super().__init__()
        self.lin = nn.Linear(n, m, bias=bias)

    def forward(self, x):
        return self.lin(x)


def _layer(model, name="lin"):
    for n, m in model.named_modules():
        if isinstance(m, geolora.GeoLoRALayer) and n.endswith(name):
            return m
    raise KeyError(name)


def _factors(layer, a="default"):
    k = layer.r[a]
    return layer.geolora_U[a][:, :k], layer.geolora_S[a][:k, :k], layer.geolora_V[a][:, :k]


def _make(r=3, r_max=6, tau=0.1, s_update="sgd", dtype=torch.float64, seed=0, random_S=True, **kw):
    """One adapted Linear; Algorithm 1 (augment_every=1) unless told otherwise."""
    kw.setdefault("augment_every", 1)
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        OneLayer(),
        geolora.GeoLoRAConfig(
            r=r,
            r_max=r_max,
            tau=tau,
            lora_alpha=2 * r,
            target_modules=["lin"],
            s_update=s_update,
            init_weights=not random_S,
            **kw,
        ),
    )
    return model.to(dtype)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("random_S", [True, False])
def test_sgd_step_equals_float64_reference(seed, random_S):
    model = _make(seed=seed, random_S=random_S, tau=0.15)
    lr = 0.4
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=lr)
    layer = _layer(model)
    U0, S0, V0 = (t.detach().clone() for t in _factors(layer))
    gen = torch.Generator().manual_seed(100 + seed)
    X = torch.randn(32, 10, generator=gen, dtype=torch.float64)
    C = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    (model(X) * C).sum().backward()
    s = layer.scaling["default"]
    G_M = s * C.T @ X  # dL/dM for y = ... + s x M^T
    opt.step()
    U1, S1, V1 = (t.detach() for t in _factors(layer))
    Ur, Sr, Vr, r1 = reference_step(U0, S0, V0, G_M, lr, 0.15, 1, 6)
    assert layer.r["default"] == r1 == int(layer.geolora_rank["default"])
    M = U1 @ S1 @ V1.T
    assert torch.allclose(M, Ur @ Sr @ Vr.T, atol=1e-10)
    M_bf, r_bf = basis_free_step(U0, S0, V0, G_M, lr, 0.15, 1, 6)
    assert r_bf == r1 and torch.allclose(M, M_bf, atol=1e-10)
    # the forward uses exactly the new factors
    x = torch.randn(4, 10, dtype=torch.float64)
    assert torch.allclose(model(x), x @ (model.base_model.model.lin.base_layer.weight + s * M).T, atol=1e-10)


def _synthetic(rank=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(12, rank, generator=gen))
    q2, _ = torch.linalg.qr(torch.randn(10, rank, generator=gen))
    W = q1 @ torch.diag(torch.linspace(3.0, 1.0, rank)) @ q2.T  # rank 5, well separated from 0
    X = torch.randn(256, 10, generator=gen)
    return X, X @ W.T


@pytest.mark.parametrize("r0", [1, 2, 8])
def test_rank_recovery_sgd(r0):
    """Optimal update has rank 5: ranks settle at 5 from below and above and the loss goes to ~0."""
    torch.manual_seed(0)
    base = OneLayer()
    nn.init.zeros_(base.lin.weight)
    model = peft.get_peft_model(
        base,
        geolora.GeoLoRAConfig(
            r=r0, r_max=10, lora_alpha=10, tau=0.01, target_modules=["lin"], s_update="sgd", augment_every=1
        ),
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.2)
    X, Y = _synthetic()
    for _ in range(500):
        loss = ((model(X) - Y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert geolora.get_ranks(model) == {"lin": 5}
    assert loss.item() < 1e-6
    assert opt.truncations == 500  # exactly one truncation per layer per step


def test_adam_s_update_trains_and_keeps_invariants():
    torch.manual_seed(0)
    base = OneLayer()
    nn.init.zeros_(base.lin.weight)
    model = peft.get_peft_model(
        base,
        geolora.GeoLoRAConfig(
            r=2, r_max=10, lora_alpha=10, tau=0.01, target_modules=["lin"], s_update="adam", augment_every=1
        ),
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.02)
    X, Y = _synthetic()
    first = None
    for _ in range(600):
        loss = ((model(X) - Y) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
        layer = _layer(model)
        k = layer.r["default"]
        assert 1 <= k <= 10
    assert loss.item() < 0.02 * first
    assert geolora.get_ranks(model) == {"lin": 5}
    assert orthonormality_error(layer.geolora_U["default"], k) < 1e-5
    # AdamW never touched the bases: no moments on U or V, moments of S under geolora keys
    assert not opt.state[layer.geolora_U["default"]]
    assert not opt.state[layer.geolora_V["default"]]
    assert "geolora_exp_avg" in opt.state[layer.geolora_S["default"]]


@pytest.mark.parametrize("s_update", ["sgd", "adam"])
def test_orthonormality_2000_steps_and_zero_padding(s_update):
    torch.manual_seed(0)
    model = peft.get_peft_model(
        TwoLayer(),
        geolora.GeoLoRAConfig(
            r=3, r_max=8, tau=0.05, target_modules=["a", "b"], s_update=s_update, scale_by="r", augment_every=1
        ),
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.05 if s_update == "sgd" else 5e-3)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(64, 10, generator=gen)
    y = torch.randint(0, 3, (64,), generator=gen)
    seen = set()
    for _ in range(2000):
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        opt.zero_grad()
        seen.add(tuple(geolora.get_ranks(model).values()))
    for name in ("a", "b"):
        layer = _layer(model, name)
        k = layer.r["default"]
        assert orthonormality_error(layer.geolora_U["default"], k) <= 1e-5
        assert orthonormality_error(layer.geolora_V["default"], k) <= 1e-5
        assert layer.geolora_U["default"][:, k:].abs().sum().item() == 0
        assert layer.geolora_S["default"][k:, :].abs().sum().item() == 0
    assert len(seen) > 1  # ranks moved


def _grads_run(model, opt, X, y, scaler=None, inject_inf=False):
    loss = nn.functional.cross_entropy(model(X), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        if inject_inf:
            _layer(model, "a").geolora_U["default"].grad.fill_(float("inf"))
        scaler.step(opt)
        scaler.update()
    opt.zero_grad()


def test_gradscaler_unscales_and_skips_inf():
    torch.manual_seed(0)
    m1 = peft.get_peft_model(TwoLayer(), geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"], s_update="sgd"))
    m2 = copy.deepcopy(m1)
    o1 = geolora.create_geolora_optimizer(m1, lr=0.1)
    o2 = geolora.create_geolora_optimizer(m2, lr=0.1)
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    _grads_run(m1, o1, X, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    _grads_run(m2, o2, X, y, scaler=scaler)
    for (n, p1), p2 in zip(m1.named_parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, atol=1e-6), n  # the step saw unscaled gradients
    before = {n: p.detach().clone() for n, p in m2.named_parameters()}
    _grads_run(m2, o2, X, y, scaler=scaler, inject_inf=True)
    for n, p in m2.named_parameters():
        assert torch.equal(p, before[n]), n
    assert o2.num_steps == 1


def test_lr_scheduler_moves_lambda_and_zero_lr_keeps_the_function():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        TwoLayer(), geolora.GeoLoRAConfig(r=3, tau=0.0, target_modules=["a", "b"], init_weights=False, s_update="sgd")
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0)
    X = torch.randn(8, 10)
    ref = model(X).detach()
    model(X).sum().backward()
    opt.step()
    sched.step()
    assert torch.allclose(model(X), ref, atol=1e-6)  # λ = 0 from the scheduler: M unchanged (τ = 0)


@pytest.mark.parametrize("augment_every", [1, 3])
@pytest.mark.parametrize("s_update", ["sgd", "adam"])
def test_gradient_accumulation_equals_full_batch(augment_every, s_update):
    """Two accumulated half batches give the same steps as the full batch, over a whole interval (augment,
    coefficient step, truncate) when augment_every > 1."""
    torch.manual_seed(0)
    m1 = peft.get_peft_model(
        TwoLayer(),
        geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"], s_update=s_update, augment_every=augment_every),
    )
    m2 = copy.deepcopy(m1)
    o1 = geolora.create_geolora_optimizer(m1, lr=0.1 if s_update == "sgd" else 1e-2)
    o2 = geolora.create_geolora_optimizer(m2, lr=0.1 if s_update == "sgd" else 1e-2)
    gen = torch.Generator().manual_seed(0)
    phases = []
    for _ in range(augment_every):
        X, y = torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        phases.append(o1.phase)
        nn.functional.cross_entropy(m1(X), y, reduction="sum").backward()
        o1.step()
        o1.zero_grad()
        for half in (slice(0, 8), slice(8, 16)):
            nn.functional.cross_entropy(m2(X[half]), y[half], reduction="sum").backward()
        o2.step()
        o2.zero_grad()
        # The adapted weights and ranks agree; the factors only up to the sign of a basis column (QR/SVD choose
        # signs from round-off-level differences between the accumulated and the full-batch gradient).
        for name in ("a", "b"):
            l1, l2 = _layer(m1, name), _layer(m2, name)
            assert l1.r["default"] == l2.r["default"]
            assert torch.allclose(l1.get_delta_weight("default"), l2.get_delta_weight("default"), atol=1e-5)
    assert phases == (["step"] if augment_every == 1 else ["augment", "coefficients", "truncate"])
    assert o1.truncations == o2.truncations == 2  # two layers, one truncation each
    assert geolora.get_ranks(m1) == geolora.get_ranks(m2)


def test_clipping_and_fused_adamw():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        TwoLayer(), geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"], modules_to_save=["head"])
    )
    opt = geolora.create_geolora_optimizer(model, torch.optim.AdamW, lr=1e-2, fused=True)
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    for _ in range(5):
        nn.functional.cross_entropy(model(X), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        opt.zero_grad()
    assert opt.num_steps == 5
    head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad]
    assert head and all("exp_avg" in opt.state[p] for p in head)  # AdamW updated the head


def test_optimizer_checkpoint_roundtrip_with_adam_state(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayer(), geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"], s_update="adam"))
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))

    def train(m, o, n):
        for _ in range(n):
            nn.functional.cross_entropy(m(X), y).backward()
            o.step()
            o.zero_grad()

    train(model, opt, 3)
    model.save_pretrained(tmp_path / "ad")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    train(model, opt, 3)
    # resume: a fresh base model, the adapter loaded trainable, a fresh optimizer with the saved state
    torch.manual_seed(123)
    resumed = peft.PeftModel.from_pretrained(TwoLayer(), tmp_path / "ad", is_trainable=True)
    resumed.base_model.model.load_state_dict(
        {k: v for k, v in model.base_model.model.state_dict().items() if "geolora" not in k}, strict=False
    )
    opt2 = geolora.create_geolora_optimizer(resumed, lr=1e-2)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert opt2.num_steps == 3
    train(resumed, opt2, 3)
    assert geolora.get_ranks(resumed) == geolora.get_ranks(model)
    assert torch.allclose(resumed(X), model(X), atol=1e-5)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="no GeoLoRA layers"):
        geolora.GeoLoRAOptimizer(torch.optim.SGD(OneLayer().parameters(), lr=0.1), OneLayer())
    model = peft.get_peft_model(TwoLayer(), geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"]))
    geolora.grow_capacity(model)
    head_only = torch.optim.SGD([model.base_model.model.head.weight], lr=0.1)
    with pytest.raises(ValueError, match="does not hold the GeoLoRA factors"):
        geolora.GeoLoRAOptimizer(head_only, model)
    with pytest.raises(ValueError, match="lr=-1"):
        geolora.create_geolora_optimizer(model, lr=-1)
    model.add_adapter("other", geolora.GeoLoRAConfig(r=2, target_modules=["a", "b"]))
    for m in model.modules():
        if isinstance(m, geolora.GeoLoRALayer):
            m.geolora_S["other"].requires_grad_(True)
    with pytest.raises(ValueError, match="Several GeoLoRA adapters are trainable"):
        geolora.create_geolora_optimizer(model, lr=0.1)


def _augmented_singular_values(U, S, V, G_M, lr):
    """σ of the augmented coefficient matrix of one SGD step, independently of geolora (dense, float64):
    the singular values of M_aug = U S V^T - λ (P_U G P_[V Ṽ] + P_Ũ G P_V), 2r of them."""
    r = U.shape[1]
    Qu, _ = torch.linalg.qr(torch.cat([U, G_M @ V], 1))
    Qv, _ = torch.linalg.qr(torch.cat([V, G_M.T @ U], 1))
    Ut, VV = Qu[:, r:], Qv
    M_aug = U @ S @ V.T - lr * (U @ U.T @ G_M @ VV @ VV.T + Ut @ Ut.T @ G_M @ V @ V.T)
    return torch.linalg.svdvals(M_aug)[: 2 * r]


def test_global_rank_budget():
    """rank_budget=5 over two layers: each keeps r_min = 1, then the 3 largest of all remaining singular values win,
    checked against σ computed independently from the layers' inputs and output gradients."""
    torch.manual_seed(0)
    model = peft.get_peft_model(
        TwoLayer(),
        geolora.GeoLoRAConfig(r=4, r_max=8, target_modules=["a", "b"], rank_budget=5, s_update="sgd", augment_every=1),
    ).to(torch.float64)
    lr = 0.1
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=lr)
    layers = {name: _layer(model, name) for name in ("a", "b")}
    seen = {}

    def capture(name):
        def hook(module, args, out):
            seen[name] = {"x": args[0].detach()}
            out.register_hook(lambda g: seen[name].__setitem__("dy", g.detach()))

        return hook

    for name, layer in layers.items():
        layer.register_forward_hook(capture(name))
    X, y = torch.randn(16, 10, dtype=torch.float64), torch.randint(0, 3, (16,))
    for _ in range(3):
        before = {name: [t.detach().clone() for t in _factors(layer)] for name, layer in layers.items()}
        nn.functional.cross_entropy(model(X), y).backward()
        sigmas = {}
        for name, layer in layers.items():
            G_M = layer.scaling["default"] * seen[name]["dy"].T @ seen[name]["x"]  # dL/dM
            sigmas[name] = _augmented_singular_values(*before[name], G_M, lr).tolist()
        # one value per layer is forced (r_min = 1); the other 3 of the budget go to the largest of the rest
        rest = sorted(((v, name) for name, sig in sigmas.items() for v in sig[1:8]), reverse=True)[:3]
        expected = {name: 1 + sum(1 for _, n in rest if n == name) for name in layers}
        opt.step()
        opt.zero_grad()
        assert geolora.get_ranks(model) == expected
        assert sum(expected.values()) == 5


def test_lr_overflow_from_finite_gradients_skips_the_step():
    """λ·G overflowing to inf (finite gradients, absurd λ) skips the step instead of silently zeroing it."""
    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayer(), geolora.GeoLoRAConfig(r=3, target_modules=["a", "b"], s_update="sgd"))
    opt = geolora.create_geolora_optimizer(model, lr=3e38)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    (model(torch.randn(8, 10)) * 1e3).sum().backward()
    opt.step()
    assert opt.skipped_steps == 1
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_zero_first_step_keeps_ranks():
    """A linear warm-up starts at lr = 0 while S = 0: S_aug is all zero and must not collapse every rank to r_min."""
    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayer(), geolora.GeoLoRAConfig(r=4, r_max=8, target_modules=["a", "b"]))
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, step / 5))
    X, y = torch.randn(16, 10), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(X), y).backward()
    opt.step()
    sched.step()
    assert set(geolora.get_ranks(model).values()) == {4}


# ------------------------------------------------------------------ overrides are recorded; optimizer hooks work
@pytest.mark.parametrize("how", ["create_geolora_optimizer", "GeoLoRAOptimizer", "callback"])
def test_step_overrides_are_written_into_the_saved_config(tmp_path, how):
    """An 'sgd' run must never be saved as 'adam': the values the step trains with end up in adapter_config.json."""
    import json

    model = _make(s_update="adam", dtype=torch.float32)
    if how == "create_geolora_optimizer":
        geolora.create_geolora_optimizer(model, lr=0.1, s_update="sgd")
    elif how == "GeoLoRAOptimizer":
        geolora.grow_capacity(model)
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        geolora.GeoLoRAOptimizer(base, model, s_update="sgd", tau=0.25, adam_eps=1e-6)
    else:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        geolora.grow_capacity(model)
        base = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
        args = TrainingArguments(str(tmp_path / "run"), use_cpu=True, report_to=[])
        state, control = TrainerState(), TrainerControl()
        ready = geolora.GeoLoRAOptimizer(base, model)  # built with the config's "adam"
        with pytest.raises(ValueError, match=r"GeoLoRACallback\(s_update='sgd'\) conflicts .* s_update='adam'"):
            geolora.GeoLoRACallback(s_update="sgd").on_train_begin(args, state, control, model=model, optimizer=ready)
        from accelerate import Accelerator

        wrapped = Accelerator(cpu=True).prepare_optimizer(base)  # what the Trainer hands its callbacks
        geolora.GeoLoRACallback(s_update="sgd").on_train_begin(args, state, control, model=model, optimizer=wrapped)
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["s_update"] == "sgd"
    if how == "GeoLoRAOptimizer":
        assert saved["tau"] == 0.25 and saved["adam_eps"] == 1e-6


def test_optimizer_hooks_work():
    """Tools that hook optimizers (register_step_pre_hook / post hooks, state-dict hooks) must work."""
    model = _make(dtype=torch.float32)
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o.num_steps)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.num_steps)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("state_dict", "geolora" in sd)))
    opt.register_load_state_dict_post_hook(lambda o: calls.append(("load", o.num_steps)))
    x = torch.randn(8, 10)
    model(x).pow(2).mean().backward()
    opt.step()
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert calls == [("pre", 0), ("post", 1), ("state_dict", True), ("load", 1)]


def test_adam_layer_keeps_the_gradient_spectrum_where_adam_flattens_it():
    """From S = 0, one step of "adam_layer" is the SGD step scaled by ONE number per layer (its second moment is the
    layer's mean), so its singular values are proportional to SGD's (the directions keep their importance); per-entry
    "adam" divides every entry by its own |g| and gives another spectrum."""

    def one_step(s_update):
        model = _make(r=3, r_max=6, tau=0.0, s_update=s_update, random_S=False)
        layer = _layer(model)
        opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1)
        gen = torch.Generator().manual_seed(3)
        X = torch.randn(32, 10, generator=gen, dtype=torch.float64)
        ((model(X) - X @ torch.randn(12, 10, generator=gen, dtype=torch.float64).T) ** 2).mean().backward()
        opt.step()
        k = layer.r["default"]
        return torch.diagonal(layer.geolora_S["default"])[:k]

    sgd, layer_adam, adam = one_step("sgd"), one_step("adam_layer"), one_step("adam")
    assert len(sgd) == len(layer_adam) == len(adam) == 6
    ratio = layer_adam / sgd
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-9, atol=0)
    flat = adam / sgd
    assert (flat.max() / flat.min()).item() > 1.5  # per-entry Adam changes the relative sizes


def test_finish_interval_truncates_once_and_rotates_the_adam_moments():
    """finish_interval() inside an open interval: one truncation per layer, the next step starts a new interval, and
    the first moment keeps its meaning in the new basis (U m Vᵀ unchanged when nothing is cut, tau = 0)."""
    model = _make(r=2, r_max=6, tau=0.0, s_update="adam", augment_every=5, random_S=False)
    layer = _layer(model)
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # augment, one coefficient step: the interval is open
        X = torch.randn(16, 10, generator=gen, dtype=torch.float64)
        (model(X) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert opt.mid_interval and opt.phase == "coefficients"

    def first_moment_in_weight_space():
        k = layer.r["default"]
        m = opt.state[layer.geolora_S["default"]]["geolora_exp_avg"][0].double()[:k, :k]
        return layer.geolora_U["default"][:, :k] @ m @ layer.geolora_V["default"][:, :k].T

    before = first_moment_in_weight_space()
    truncations = opt.truncations
    assert opt.finish_interval()
    assert opt.truncations == truncations + 1 and not opt.mid_interval and opt.phase == "augment"
    torch.testing.assert_close(first_moment_in_weight_space(), before, rtol=1e-5, atol=1e-8)  # moments kept in fp32
    assert not opt.finish_interval()  # nothing open: a no-op


# ------------------------------------------------------------------------------------------------------- the tau ramp


def _ramp_step_taus(opt, model, steps):
    """tau used by each step's truncation (read from the optimizer right before the step)."""
    taus = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        taus.append(opt.current_tau)
        model(torch.randn(8, 10, generator=gen, dtype=torch.float64)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return taus


def test_tau_ramps_linearly_over_the_ratio_of_the_training_steps():
    model = _make(tau=0.2, tau_warmup_ratio=0.25)
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1, num_training_steps=40)
    assert opt.tau_warmup == 10  # round(0.25 * 40)
    taus = _ramp_step_taus(opt, model, 12)
    assert taus[:10] == pytest.approx([0.2 * (k + 1) / 10 for k in range(10)])
    assert taus[10:] == pytest.approx([0.2, 0.2])


def test_tau_warmup_steps_overrides_the_ratio_and_zero_disables_the_ramp():
    model = _make(tau=0.2, tau_warmup_steps=4)
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1, num_training_steps=1000)
    assert _ramp_step_taus(opt, model, 5) == pytest.approx([0.05, 0.1, 0.15, 0.2, 0.2])
    model = _make(tau=0.2, tau_warmup_steps=0)
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1, num_training_steps=1000)
    assert _ramp_step_taus(opt, model, 2) == pytest.approx([0.2, 0.2])


def test_ramp_ratio_without_the_number_of_training_steps_warns_once_and_applies_full_tau():
    model = _make(tau=0.2, tau_warmup_ratio=0.25)
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1)
    with pytest.warns(UserWarning, match=r"tau_warmup_ratio=0.25 .*num_training_steps") as record:
        taus = _ramp_step_taus(opt, model, 3)
    assert taus == pytest.approx([0.2] * 3)
    assert sum("tau_warmup_ratio" in str(w.message) for w in record) == 1
    with pytest.raises(ValueError, match=r"num_training_steps=-1 is invalid"):
        opt.num_training_steps = -1


def test_the_default_has_no_ramp_and_needs_no_number_of_training_steps(recwarn):
    model = _make(tau=0.2, augment_every=1)
    assert model.peft_config["default"].tau_warmup_ratio == 0.0
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1)
    assert _ramp_step_taus(opt, model, 2) == pytest.approx([0.2, 0.2])
    assert not [w for w in recwarn if "tau_warmup" in str(w.message)]


def test_ramp_resumes_where_it_was():
    """The ramp is a function of the step counter and the saved total: a fresh optimizer loaded from a state dict
    continues it (in a custom loop that does not pass the total again, too)."""
    model = _make(tau=0.2, tau_warmup_ratio=0.25)
    opt = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1, num_training_steps=40)
    _ramp_step_taus(opt, model, 5)
    sd = copy.deepcopy(opt.state_dict())
    fresh = geolora.create_geolora_optimizer(model, torch.optim.SGD, lr=0.1)
    fresh.load_state_dict(sd)
    assert fresh.num_training_steps == 40 and fresh.current_tau == pytest.approx(opt.current_tau) == pytest.approx(0.12)


# ----------------------------------------------------------------------- edge cases: non-finite gradients skip the step
def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    state = copy.deepcopy(opt.state_dict())
    return params, buffers, state


def _assert_unchanged(model, opt, snap):
    params, buffers, state = snap
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), n  # bit-identical
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    now = opt.state_dict()
    for pid, s in state["state"].items():
        for k, v in s.items():
            assert torch.equal(torch.as_tensor(now["state"][pid][k]), torch.as_tensor(v)), (pid, k)


@pytest.mark.parametrize("factor", ["geolora_U", "geolora_S", "geolora_V", "head"])
@pytest.mark.parametrize("where", [("a",), ("a", "b")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_anywhere_skips_the_whole_step(factor, where, value):
    model = two_layer(s_update="adam")
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    loss_of(model).backward()
    opt.step()  # one good step first, so AdamW and the GeoLoRA moments have state that must stay untouched
    opt.zero_grad()
    snap = _snapshot(model, opt)
    loss_of(model).backward()
    layers = geolora_layers(model)
    if factor == "head":
        head = [p for n, p in model.named_parameters() if "modules_to_save" in n and p.requires_grad][0]
        head.grad.view(-1)[0] = value
    else:
        for name in where:
            getattr(layers[name], factor)["default"].grad.view(-1)[-1] = value
    opt.step()
    _assert_unchanged(model, opt, snap)
    assert (opt.num_steps, opt.skipped_steps) == (1, 1)
    opt.zero_grad()
    loss_of(model).backward()
    opt.step()  # training continues
    assert (opt.num_steps, opt.skipped_steps) == (2, 1)
    assert not torch.equal(layers["a"].geolora_S["default"], snap[0]["base_model.model.a.geolora_S.default"])
    check_invariants(model)


def test_nonfinite_gradient_under_bf16_autocast():
    model = two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    snap = _snapshot(model, opt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model)
    loss.backward()
    geolora_layers(model)["b"].geolora_S["default"].grad[0, 0] = math.nan
    opt.step()
    _assert_unchanged(model, opt, snap)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(model)
    loss.backward()
    opt.step()
    assert (opt.num_steps, opt.skipped_steps) == (1, 1)
    check_invariants(model)


def test_fp16_gradscaler_nonfinite_before_and_after_unscale():
    """fp16 autocast + GradScaler on CPU.  Before unscale the scaler itself skips; a NaN that appears after
    ``scaler.unscale_`` (e.g. produced by user code between unscale and step) is caught by GeoLoRA's own check."""
    model = two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layers = geolora_layers(model)

    def scaled_backward():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_of(model)
        scaler.scale(loss).backward()

    snap = _snapshot(model, opt)
    scaled_backward()
    layers["a"].geolora_U["default"].grad[0, 0] = math.inf  # scaled gradient overflow
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_unchanged(model, opt, snap)
    assert scaler.get_scale() == 2.0**7

    scaled_backward()
    scaler.unscale_(opt)
    layers["b"].geolora_V["default"].grad[0, 0] = math.nan  # after the scaler's inf check
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1

    scaled_backward()
    scaler.step(opt)
    scaler.update()
    assert opt.num_steps == 1
    check_invariants(model)


def test_skip_warning_once_per_occurrence_rate_limited(caplog, monkeypatch):
    model = two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    clock = iter([100.0, 101.0, 102.0, 130.0])
    monkeypatch.setattr(geolora.optim.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger="geolora.optim"):
        for _ in range(4):
            loss_of(model).backward()
            geolora_layers(model)["a"].geolora_S["default"].grad[0, 0] = math.nan
            opt.step()
            opt.zero_grad()
    warnings = [r.getMessage() for r in caplog.records if "inf/NaN" in r.getMessage()]
    assert len(warnings) == 2  # at t=100 and t=130; the two in between are counted, not logged
    assert "(2 more since the last warning)" in warnings[1]
    assert opt.skipped_steps == 4 and opt.num_steps == 0


# ---------------------------------------------------------------------------------------- edge cases: degenerate inputs
# Defined results of degenerate inputs to GeoLoRAOptimizer.step (each checked below):
#
# * zero gradient: Algorithm 1 with G = 0, i.e. only the truncation of the current S: with tau = 0 the function and
#   the rank stay unchanged; with tau > 0 small singular values of S are cut (never below r_min).
# * gradient inside span(U) x span(V): the augmented directions carry zero coefficients, the rank does not grow,
#   M_new = M - lr * G_M exactly (SGD, tau = 0).
# * rank-deficient augmentation ([U, G_M V] of rank < 2r, e.g. a one-sample batch): the extra basis columns are still
#   orthonormal and carry zero coefficients; the rank grows by at most rank(G_M); the result equals the float64
#   reference of Algorithm 1.
# * a layer never called in forward (no .grad): treated as a zero gradient.
# * all singular values zero (S = 0, G = 0): the rank is kept, bases orthonormal, S = 0.
# * r_min = r_max: the rank is fixed.  Capacity reached: the rank is capped at min(r_max, in, out).
# * tiny lr: M changes by ~lr * ||G|| (nothing underflows to NaN).  Huge lr: S becomes huge but finite; once the
#   model's loss or gradients overflow, every later step is skipped as non-finite; bases stay orthonormal, ranks in
#   bounds.
def _one(
    r=3, r_max=6, r_min=1, tau=0.0, init_weights=False, s_update="sgd", n=10, m=12, dtype=torch.float64, augment_every=1
):
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(
        r=r,
        r_max=r_max,
        r_min=r_min,
        tau=tau,
        lora_alpha=r_max,
        target_modules=["lin"],
        s_update=s_update,
        init_weights=init_weights,
        augment_every=augment_every,
    )
    model = peft.get_peft_model(OneLayer(n, m), cfg).to(dtype)
    return model, geolora_layers(model)["lin"]


def _M(layer):
    k = layer.r["default"]
    U, S, V = layer.geolora_U["default"][:, :k], layer.geolora_S["default"][:k, :k], layer.geolora_V["default"][:, :k]
    return (U @ S @ V.T).detach().clone()


def test_zero_gradient_keeps_function_and_rank_at_tau_0():
    model, layer = _one()
    opt = geolora.create_geolora_optimizer(model, lr=0.5)
    M0, r0 = _M(layer), layer.r["default"]
    (0.0 * model(torch.randn(4, 10, dtype=torch.float64)).sum()).backward()
    opt.step()
    assert layer.r["default"] == r0
    torch.testing.assert_close(_M(layer), M0, rtol=0, atol=1e-12)
    check_invariants(model, 1e-6)


def test_gradient_inside_the_span_does_not_grow_the_rank():
    model, layer = _one(tau=1e-8)  # tau = 0 would keep the numerically-zero singular values of the empty directions
    opt = geolora.create_geolora_optimizer(model, lr=0.3)
    geolora.grow_capacity(model)
    k = layer.r["default"]
    U, V = layer.geolora_U["default"][:, :k].detach(), layer.geolora_V["default"][:, :k].detach()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, k, generator=g, dtype=torch.float64) @ V.T  # rows in span(V)
    C = torch.randn(8, k, generator=g, dtype=torch.float64) @ U.T  # dL/dy rows in span(U)
    M0 = _M(layer)
    (model(X) * C).sum().backward()
    opt.step()
    G_M = layer.scaling["default"] * C.T @ X
    assert layer.r["default"] <= k
    torch.testing.assert_close(_M(layer), M0 - 0.3 * G_M, rtol=0, atol=1e-6)  # U, V: fp32-exact orthonormal
    check_invariants(model, 1e-6)


def test_rank_deficient_augmentation_matches_reference():
    model, layer = _one(r=3, r_max=8, tau=1e-8)
    k = layer.r["default"]
    U0, S0, V0 = (
        t.detach().clone() for t in (layer.geolora_U["default"], layer.geolora_S["default"], layer.geolora_V["default"])
    )
    opt = geolora.create_geolora_optimizer(model, lr=0.4)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 10, generator=g, dtype=torch.float64), torch.randn(1, 12, generator=g, dtype=torch.float64)
    (model(x) * c).sum().backward()  # one sample: G has rank 1, [U, G V] has rank r + 1 < 2r
    opt.step()
    G_M = layer.scaling["default"] * c.T @ x
    Ur, Sr, Vr, r1 = reference_step(U0, S0, V0, G_M, 0.4, 1e-8, 1, 8)
    assert layer.r["default"] <= k + 1
    torch.testing.assert_close(_M(layer), Ur @ Sr @ Vr.T, rtol=0, atol=1e-6)
    check_invariants(model, 1e-6)


@pytest.mark.parametrize("s_update", ["sgd", "adam"])
def test_layer_never_called_is_a_zero_gradient(s_update):
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=3, r_max=6, r_min=2, target_modules=["a", "b", "unused"], s_update=s_update)
    model = peft.get_peft_model(TwoLayer(unused=True), cfg)
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    for _ in range(3):
        loss_of(model).backward()
        assert geolora_layers(model)["unused"].geolora_S["default"].grad is None
        opt.step()
        opt.zero_grad()
    unused = geolora_layers(model)["unused"]
    assert unused.r["default"] == 3  # S = 0 and G = 0: all singular values zero -> the rank is kept
    assert unused.geolora_S["default"].abs().sum() == 0
    assert opt.num_steps == 3 and opt.skipped_steps == 0
    check_invariants(model)


def test_all_singular_values_zero_or_denormal():
    model, layer = _one(r=3, r_min=2, init_weights=True, dtype=torch.float32)
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    (0.0 * model(torch.randn(2, 10)).sum()).backward()
    opt.step()  # S = 0, G = 0: nothing to rank, the rank is kept
    assert layer.r["default"] == 3
    check_invariants(model)
    with torch.no_grad():
        layer.geolora_S["default"][:2, :2] = torch.diag(torch.tensor([1e-41, 1e-44]))  # fp32 denormals
    opt.zero_grad()
    (0.0 * model(torch.randn(2, 10)).sum()).backward()
    opt.step()
    assert layer.r["default"] == 2
    check_invariants(model)


def test_r_min_equals_r_max_and_capacity_reached():
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=3, r_max=3, r_min=3, tau=0.5, target_modules=["a"], s_update="sgd")
    fixed = peft.get_peft_model(TwoLayer(), cfg)
    opt = geolora.create_geolora_optimizer(fixed, lr=1.0)
    for _ in range(4):
        loss_of(fixed).backward()
        opt.step()
        opt.zero_grad()
        assert geolora.get_ranks(fixed) == {"a": 3}
    check_invariants(fixed)
    # capacity: r_max above min(in, out) is capped; tau = 0 wants every direction
    model, layer = _one(r=4, r_max=32, n=5, m=7, tau=0.0, dtype=torch.float32)
    assert layer.r_max["default"] == 5
    opt = geolora.create_geolora_optimizer(model, lr=1.0)
    for _ in range(3):
        model(torch.randn(16, 5)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        assert layer.r["default"] == 5 == layer.capacity("default")
    check_invariants(model)


@pytest.mark.parametrize("lr", [1e-30, 1e30])
def test_extreme_learning_rates(lr):
    model = two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=lr)
    M0 = {n: _M(layer) for n, layer in geolora_layers(model).items()}
    for _ in range(3):
        loss_of(model).backward()
        opt.step()
        opt.zero_grad()
    check_invariants(model)
    if lr < 1:
        for n, layer in geolora_layers(model).items():
            torch.testing.assert_close(_M(layer), M0[n], rtol=0, atol=1e-20)
    else:
        assert opt.num_steps >= 1 and opt.num_steps + opt.skipped_steps == 3  # diverged: later steps skipped


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 7),
    m=st.integers(1, 7),
    data=st.data(),
    tau=st.floats(0.0, 0.99),
    log_lr=st.floats(-12, 8),
    s_update=st.sampled_from(["sgd", "adam"]),
    batch=st.integers(1, 3),
    zero_grad=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_driver_end_to_end(n, m, data, tau, log_lr, s_update, batch, zero_grad, seed):
    """GeoLoRAOptimizer on a tiny nn.Linear: any shape, rank bounds, tau and lr keep the invariants."""
    r = data.draw(st.integers(1, 4))
    r_max = data.draw(st.integers(r, 6))
    r_min = data.draw(st.integers(1, r))
    torch.manual_seed(seed)
    cfg = geolora.GeoLoRAConfig(
        r=r,
        r_max=r_max,
        r_min=r_min,
        tau=tau,
        target_modules=["lin"],
        s_update=s_update,
        init_weights=data.draw(st.booleans()),
    )
    model = peft.get_peft_model(OneLayer(n, m), cfg)
    opt = geolora.create_geolora_optimizer(model, lr=10.0**log_lr)
    layer = geolora_layers(model)["lin"]
    for _ in range(2):
        out = model(torch.randn(batch, n))
        ((0.0 if zero_grad else 1.0) * out.pow(2).sum()).backward()
        opt.step()
        opt.zero_grad()
        k = layer.r["default"]
        assert min(r_min, n, m) <= k <= min(r_max, n, m)
    check_invariants(model, tol=1e-4)
    assert opt.num_steps + opt.skipped_steps == 2


# ------------------------------------------------------------------------------------------------------------ long runs
class _SyntheticGradients:
    """Writes the GeoLoRA directions of G_M = s * (M_scaled - W) + noise into .grad directly (what the layer's
    backward writes for a squared loss), so a long run costs only the step."""

    def __init__(self, layer, seed=0):
        self.layer = layer
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(layer.out_features, layer.in_features, generator=g)
        self.noise = torch.randn(64, layer.out_features, layer.in_features, generator=g) * 0.05

    def __call__(self, i):
        a = "default"
        L = self.layer
        U, S, V = (p.detach().float() for p in (L.geolora_U[a], L.geolora_S[a], L.geolora_V[a]))
        s = L.scaling[a]
        G = s * (s * U @ S @ V.T - self.W) + self.noise[i % 64]
        for p, d in ((L.geolora_U[a], G @ V), (L.geolora_V[a], G.T @ U), (L.geolora_S[a], U.T @ G @ V)):
            p.grad = d.to(p.dtype)
        return ((s * U @ S @ V.T - self.W) ** 2).sum().item()


def test_10000_fp32_steps_stay_orthonormal():
    model, layer = _one(r=2, r_max=4, tau=0.05, n=6, m=5, init_weights=True, dtype=torch.float32)
    opt = geolora.create_geolora_optimizer(model, lr=0.05)
    feed = _SyntheticGradients(layer)
    worst, ranks, t0 = 0.0, set(), time.perf_counter()
    for i in range(10_000):
        feed(i)
        opt.step()
        opt.zero_grad()
        if i % 1000 == 999:
            k = layer.r["default"]
            ranks.add(k)
            worst = max(
                worst,
                orthonormality_error(layer.geolora_U["default"], k),
                orthonormality_error(layer.geolora_V["default"], k),
            )
    elapsed = time.perf_counter() - t0
    print(f"\n10000 fp32 steps: {elapsed:.1f} s, max|U^T U - I| = {worst:.2e}, ranks seen {sorted(ranks)}")
    assert worst <= 1e-5
    assert opt.num_steps == 10_000 and opt.skipped_steps == 0
    check_invariants(model)


def test_bf16_factors_stay_finite_and_close_to_fp32():
    def run(dtype, steps=1000):
        model, layer = _one(r=2, r_max=4, tau=0.05, n=6, m=5, init_weights=True, dtype=torch.float32)
        if dtype is not torch.float32:
            model.to(dtype)
            for name in ("geolora_U", "geolora_S", "geolora_V"):  # the layer keeps fp32 factors: force them
                params = getattr(layer, name)
                params["default"] = nn.Parameter(params["default"].detach().to(dtype))
        opt = geolora.create_geolora_optimizer(model, lr=0.05)
        feed = _SyntheticGradients(layer)
        losses = []
        for i in range(steps):
            losses.append(feed(i))
            opt.step()
            opt.zero_grad()
        k = layer.r["default"]
        assert layer.geolora_U["default"].dtype == dtype
        return _M(layer).float() * layer.scaling["default"], losses, orthonormality_error(layer.geolora_U["default"], k)

    M32, loss32, orth32 = run(torch.float32)
    M16, loss16, orth16 = run(torch.bfloat16)
    assert all(math.isfinite(v) for v in loss16) and torch.isfinite(M16).all()
    rel = ((M16 - M32).norm() / M32.norm()).item()
    loss_gap = abs(loss16[-1] - loss32[-1]) / loss32[-1]
    print(
        f"\nbf16 vs fp32 after 1000 steps: rel ||dM|| = {rel:.2e}, loss {loss16[-1]:.4f} vs {loss32[-1]:.4f} "
        f"(rel {loss_gap:.2e}), max|U^T U - I| bf16 {orth16:.1e} fp32 {orth32:.1e}"
    )
    assert rel < 0.05 and loss_gap < 0.05
    assert orth16 < 2e-2


# ---------------------------------------------------------------------------------------------------- module shape


def test_the_optimizer_marks_itself_and_imports_at_the_top_only():
    """``runs_geolora_step`` is how the layers' plain-optimizer guard recognises GeoLoRA's step without importing this
    module; optim and the math it calls have no function-level imports (no hidden import cycles)."""
    assert geolora.GeoLoRAOptimizer.runs_geolora_step is True
    opt = geolora.create_geolora_optimizer(_make(dtype=torch.float32), lr=0.1)
    assert opt.runs_geolora_step is True
    for module in (geolora.optim, geolora.integrator, geolora.distributed):
        tree = ast.parse(Path(module.__file__).read_text())
        nested = [
            (module.__name__, inner.lineno)
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            for inner in ast.walk(node)
            if isinstance(inner, (ast.Import, ast.ImportFrom))
        ]
        assert not nested, nested
