"""Reliability (issue #6): non-finite gradients, degenerate inputs to the step, long-run numerics, checkpoints and
faults, bad input.  Each test here fails when the protection it covers is removed.

Defined results of degenerate inputs (GeoLoRAOptimizer.step, checked below):

* zero gradient: Algorithm 1 with G = 0, i.e. only the truncation of the current S: with tau = 0 the function and the
  rank stay unchanged; with tau > 0 small singular values of S are cut (never below r_min).
* gradient inside span(U) x span(V): the augmented directions carry zero coefficients, the rank does not grow,
  M_new = M - lr * G_M exactly (SGD, tau = 0).
* rank-deficient augmentation ([U, G_M V] of rank < 2r, e.g. a one-sample batch): the extra basis columns are still
  orthonormal and carry zero coefficients; the rank grows by at most rank(G_M); the result equals the float64
  reference of Algorithm 1.
* a layer never called in forward (no .grad): treated as a zero gradient.
* all singular values zero (S = 0, G = 0): the rank is kept, bases orthonormal, S = 0.
* r_min = r_max: the rank is fixed.  Capacity reached: the rank is capped at min(r_max, in, out).
* tiny lr: M changes by ~lr * ||G|| (nothing underflows to NaN).  Huge lr: S becomes huge but finite; once the model's
  loss or gradients overflow, every later step is skipped as non-finite; bases stay orthonormal, ranks in bounds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import math
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftConfig, PeftModel
from torch import nn

import geolora
from geolora.integrator import orthonormality_error
from tests.reference import reference_step

SCRIPTS = Path(__file__).parents[1] / "scripts"


# ---------------------------------------------------------------------------------------------------- helpers
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


class One(nn.Module):
    def __init__(self, n=10, m=12):
        super().__init__()
        self.lin = nn.Linear(n, m, bias=False)

    def forward(self, x):
        return self.lin(x)


def _layers(model) -> dict[str, geolora.GeoLoRALayer]:
    return {n.split(".")[-1]: m for n, m in model.named_modules() if isinstance(m, geolora.GeoLoRALayer)}


def _two_layer(s_update="sgd", **kw):
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=3, r_max=6, target_modules=["a", "b"], modules_to_save=["head"], s_update=s_update,
                                **kw)
    return peft.get_peft_model(TwoLayer(), cfg)


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


def _check_invariants(model, tol=1e-5):
    for name, layer in _layers(model).items():
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


def _loss(model, x=X16, y=Y16):
    return nn.functional.cross_entropy(model(x), y)


# ---------------------------------------------------------------------------------------------------- 1. non-finite
@pytest.mark.parametrize("factor", ["geolora_U", "geolora_S", "geolora_V", "head"])
@pytest.mark.parametrize("where", [("a",), ("a", "b")])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nonfinite_gradient_anywhere_skips_the_whole_step(factor, where, value):
    model = _two_layer(s_update="adam")
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    _loss(model).backward()
    opt.step()  # one good step first, so AdamW and the GeoLoRA moments have state that must stay untouched
    opt.zero_grad()
    snap = _snapshot(model, opt)
    _loss(model).backward()
    layers = _layers(model)
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
    _loss(model).backward()
    opt.step()  # training continues
    assert (opt.num_steps, opt.skipped_steps) == (2, 1)
    assert not torch.equal(layers["a"].geolora_S["default"], snap[0]["base_model.model.a.geolora_S.default"])
    _check_invariants(model)


def test_nonfinite_gradient_under_bf16_autocast():
    model = _two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    snap = _snapshot(model, opt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model)
    loss.backward()
    _layers(model)["b"].geolora_S["default"].grad[0, 0] = math.nan
    opt.step()
    _assert_unchanged(model, opt, snap)
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model)
    loss.backward()
    opt.step()
    assert (opt.num_steps, opt.skipped_steps) == (1, 1)
    _check_invariants(model)


def test_fp16_gradscaler_nonfinite_before_and_after_unscale():
    """fp16 autocast + GradScaler on CPU.  Before unscale the scaler itself skips; a NaN that appears after
    ``scaler.unscale_`` (e.g. produced by user code between unscale and step) is caught by GeoLoRA's own check."""
    model = _two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    layers = _layers(model)

    def scaled_backward():
        with torch.autocast("cpu", dtype=torch.float16):
            loss = _loss(model)
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
    _check_invariants(model)


def test_skip_warning_once_per_occurrence_rate_limited(caplog, monkeypatch):
    model = _two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    clock = iter([100.0, 101.0, 102.0, 130.0])
    monkeypatch.setattr(geolora.optim.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.WARNING, logger="geolora.optim"):
        for _ in range(4):
            _loss(model).backward()
            _layers(model)["a"].geolora_S["default"].grad[0, 0] = math.nan
            opt.step()
            opt.zero_grad()
    warnings = [r.getMessage() for r in caplog.records if "inf/NaN" in r.getMessage()]
    assert len(warnings) == 2  # at t=100 and t=130; the two in between are counted, not logged
    assert "(2 more since the last warning)" in warnings[1]
    assert opt.skipped_steps == 4 and opt.num_steps == 0


# ---------------------------------------------------------------------------------------------------- 2. degenerate
def _one(r=3, r_max=6, r_min=1, tau=0.0, init_weights=False, s_update="sgd", n=10, m=12, dtype=torch.float64,
         augment_every=1):
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=r, r_max=r_max, r_min=r_min, tau=tau, lora_alpha=r_max, target_modules=["lin"],
                                s_update=s_update, init_weights=init_weights, augment_every=augment_every)
    model = peft.get_peft_model(One(n, m), cfg).to(dtype)
    return model, _layers(model)["lin"]


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
    _check_invariants(model, 1e-6)


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
    _check_invariants(model, 1e-6)


def test_rank_deficient_augmentation_matches_reference():
    model, layer = _one(r=3, r_max=8, tau=1e-8)
    k = layer.r["default"]
    U0, S0, V0 = (t.detach().clone() for t in (layer.geolora_U["default"], layer.geolora_S["default"],
                                                layer.geolora_V["default"]))
    opt = geolora.create_geolora_optimizer(model, lr=0.4)
    g = torch.Generator().manual_seed(2)
    x, c = torch.randn(1, 10, generator=g, dtype=torch.float64), torch.randn(1, 12, generator=g, dtype=torch.float64)
    (model(x) * c).sum().backward()  # one sample: G has rank 1, [U, G V] has rank r + 1 < 2r
    opt.step()
    G_M = layer.scaling["default"] * c.T @ x
    Ur, Sr, Vr, r1 = reference_step(U0, S0, V0, G_M, 0.4, 1e-8, 1, 8)
    assert layer.r["default"] <= k + 1
    torch.testing.assert_close(_M(layer), Ur @ Sr @ Vr.T, rtol=0, atol=1e-6)
    _check_invariants(model, 1e-6)


@pytest.mark.parametrize("s_update", ["sgd", "adam"])
def test_layer_never_called_is_a_zero_gradient(s_update):
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=3, r_max=6, r_min=2, target_modules=["a", "b", "unused"], s_update=s_update)
    model = peft.get_peft_model(TwoLayer(unused=True), cfg)
    opt = geolora.create_geolora_optimizer(model, lr=1e-2)
    for _ in range(3):
        _loss(model).backward()
        assert _layers(model)["unused"].geolora_S["default"].grad is None
        opt.step()
        opt.zero_grad()
    unused = _layers(model)["unused"]
    assert unused.r["default"] == 3  # S = 0 and G = 0: all singular values zero -> the rank is kept
    assert unused.geolora_S["default"].abs().sum() == 0
    assert opt.num_steps == 3 and opt.skipped_steps == 0
    _check_invariants(model)


def test_all_singular_values_zero_or_denormal():
    model, layer = _one(r=3, r_min=2, init_weights=True, dtype=torch.float32)
    opt = geolora.create_geolora_optimizer(model, lr=0.1)
    (0.0 * model(torch.randn(2, 10)).sum()).backward()
    opt.step()  # S = 0, G = 0: nothing to rank, the rank is kept
    assert layer.r["default"] == 3
    _check_invariants(model)
    with torch.no_grad():
        layer.geolora_S["default"][:2, :2] = torch.diag(torch.tensor([1e-41, 1e-44]))  # fp32 denormals
    opt.zero_grad()
    (0.0 * model(torch.randn(2, 10)).sum()).backward()
    opt.step()
    assert layer.r["default"] == 2
    _check_invariants(model)


def test_r_min_equals_r_max_and_capacity_reached():
    torch.manual_seed(0)
    cfg = geolora.GeoLoRAConfig(r=3, r_max=3, r_min=3, tau=0.5, target_modules=["a"], s_update="sgd")
    fixed = peft.get_peft_model(TwoLayer(), cfg)
    opt = geolora.create_geolora_optimizer(fixed, lr=1.0)
    for _ in range(4):
        _loss(fixed).backward()
        opt.step()
        opt.zero_grad()
        assert geolora.get_ranks(fixed) == {"a": 3}
    _check_invariants(fixed)
    # capacity: r_max above min(in, out) is capped; tau = 0 wants every direction
    model, layer = _one(r=4, r_max=32, n=5, m=7, tau=0.0, dtype=torch.float32)
    assert layer.r_max["default"] == 5
    opt = geolora.create_geolora_optimizer(model, lr=1.0)
    for _ in range(3):
        model(torch.randn(16, 5)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
        assert layer.r["default"] == 5 == layer.capacity("default")
    _check_invariants(model)


@pytest.mark.parametrize("lr", [1e-30, 1e30])
def test_extreme_learning_rates(lr):
    model = _two_layer()
    opt = geolora.create_geolora_optimizer(model, lr=lr)
    M0 = {n: _M(layer) for n, layer in _layers(model).items()}
    for _ in range(3):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
    _check_invariants(model)
    if lr < 1:
        for n, layer in _layers(model).items():
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
    cfg = geolora.GeoLoRAConfig(r=r, r_max=r_max, r_min=r_min, tau=tau, target_modules=["lin"], s_update=s_update,
                                init_weights=data.draw(st.booleans()))
    model = peft.get_peft_model(One(n, m), cfg)
    opt = geolora.create_geolora_optimizer(model, lr=10.0**log_lr)
    layer = _layers(model)["lin"]
    for _ in range(2):
        out = model(torch.randn(batch, n))
        ((0.0 if zero_grad else 1.0) * out.pow(2).sum()).backward()
        opt.step()
        opt.zero_grad()
        k = layer.r["default"]
        assert min(r_min, n, m) <= k <= min(r_max, n, m)
    _check_invariants(model, tol=1e-4)
    assert opt.num_steps + opt.skipped_steps == 2


# ---------------------------------------------------------------------------------------------------- 3. long run
class _Synthetic:
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
    feed = _Synthetic(layer)
    worst, ranks, t0 = 0.0, set(), time.perf_counter()
    for i in range(10_000):
        feed(i)
        opt.step()
        opt.zero_grad()
        if i % 1000 == 999:
            k = layer.r["default"]
            ranks.add(k)
            worst = max(worst, orthonormality_error(layer.geolora_U["default"], k),
                        orthonormality_error(layer.geolora_V["default"], k))
    elapsed = time.perf_counter() - t0
    print(f"\n10000 fp32 steps: {elapsed:.1f} s, max|U^T U - I| = {worst:.2e}, ranks seen {sorted(ranks)}")
    assert worst <= 1e-5
    assert opt.num_steps == 10_000 and opt.skipped_steps == 0
    _check_invariants(model)


def test_bf16_factors_stay_finite_and_close_to_fp32():
    def run(dtype, steps=1000):
        model, layer = _one(r=2, r_max=4, tau=0.05, n=6, m=5, init_weights=True, dtype=torch.float32)
        if dtype is not torch.float32:
            model.to(dtype)
            for name in ("geolora_U", "geolora_S", "geolora_V"):  # the layer keeps fp32 factors: force them
                params = getattr(layer, name)
                params["default"] = nn.Parameter(params["default"].detach().to(dtype))
        opt = geolora.create_geolora_optimizer(model, lr=0.05)
        feed = _Synthetic(layer)
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
    print(f"\nbf16 vs fp32 after 1000 steps: rel ||dM|| = {rel:.2e}, loss {loss16[-1]:.4f} vs {loss32[-1]:.4f} "
          f"(rel {loss_gap:.2e}), max|U^T U - I| bf16 {orth16:.1e} fp32 {orth32:.1e}")
    assert rel < 0.05 and loss_gap < 0.05
    assert orth16 < 2e-2


# ---------------------------------------------------------------------------------------------------- 4. checkpoints
def _load_script():
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPTS / "kill_resume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fork(fn, *args, log: Path):
    """Run ``fn(*args)`` in a forked child (imports are inherited, so no interpreter start-up); its stdout lines come
    back through a pipe.  The child is a real process: SIGKILL stops it at an arbitrary instruction."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            sys.stdout = os.fdopen(w, "w", buffering=1)
            fn(*args)
        except BaseException:
            log.write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    return pid, os.fdopen(r)


def _run_until(pid, pipe, predicate=None):
    """Read the child's lines; SIGKILL it at the first line matching ``predicate``.  Returns (lines, killed)."""
    lines = []
    for line in pipe:
        lines.append(line.strip())
        if predicate is not None and predicate(lines[-1]):
            os.kill(pid, signal.SIGKILL)
            break
    pipe.close()
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0), f"child failed, status {status}"
    return lines, killed


@pytest.mark.parametrize("augment_every", [1, 10])
def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path, augment_every):
    """Checkpoints every 7 steps: with augment_every = 10 most of them, and so most resumes, fall inside an
    interval (after its augmentation, before its truncation)."""
    kr = _load_script()
    total, every = 120, 7
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    log = tmp_path / "child.log"
    _run_until(*_fork(kr.train, ref_dir, total, every, augment_every, log=log))
    assert not log.exists(), log.read_text() if log.exists() else ""
    rng = random.Random(int(os.environ.get("GEOLORA_KILL_SEED", "6")))
    starts, kills = [], 0
    for _ in range(4):
        target = rng.randint(1, total - 1)
        lines, killed = _run_until(
            *_fork(kr.train, run_dir, total, every, augment_every, log=log),
            lambda line, t=target: line.startswith("step") and int(line.split()[1]) >= t,
        )
        starts.append(int(lines[0].split()[1]))
        kills += killed
    lines, killed = _run_until(*_fork(kr.train, run_dir, total, every, augment_every, log=log))
    assert not killed and not log.exists()
    starts.append(int(lines[0].split()[1]))
    assert kills >= 3 and max(starts) > 0, (kills, starts)  # really killed, really resumed from checkpoints
    ref = json.loads((ref_dir / "result.json").read_text())
    res = json.loads((run_dir / "result.json").read_text())
    assert ref["start"] == 0 and res["start"] > 0 and res["num_steps"] == ref["num_steps"] == total
    assert res["ranks"] == ref["ranks"]
    assert res["loss"] == pytest.approx(ref["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A small trained adapter on disk (ranks differ per layer) and the factory of its base model."""
    d = tmp_path_factory.mktemp("saved")
    model = _two_layer(tau=0.3)
    opt = geolora.create_geolora_optimizer(model, lr=0.5)
    for _ in range(5):
        _loss(model).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(d / "adapter")
    expected = model(X16).detach()
    return d / "adapter", expected, geolora.get_ranks(model)


def _copy_adapter(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _load(path):
    torch.manual_seed(0)
    return PeftModel.from_pretrained(TwoLayer(), str(path))


def test_adapter_files_are_written_atomically(saved_adapter, tmp_path, monkeypatch):
    """A save that dies while writing either file leaves the previous complete adapter in place."""
    import safetensors.torch

    src, expected, ranks = saved_adapter
    d = _copy_adapter(src, tmp_path / "a")
    model = _load(d)
    real_save_file = safetensors.torch.save_file

    def dying_save_file(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # the process "dies" half way through its write
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt

    import peft.peft_model as pm

    original = getattr(pm.safe_save_file, "__wrapped__", pm.safe_save_file)
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    if original is not pm.safe_save_file:  # the GeoLoRA hook is installed: it writes through save_file
        pass
    else:  # no hook: PEFT's own writer (bound at import) dies the same way
        monkeypatch.setattr(pm, "safe_save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(d)
    monkeypatch.undo()
    torch.testing.assert_close(_load(d)(X16), expected, rtol=0, atol=1e-6)
    assert not [f for f in os.listdir(d) if f.endswith(".tmp")]  # the temporary file was removed

    def dying_dumps(*args, **kwargs):
        raise KeyboardInterrupt

    import peft.config as pc

    with monkeypatch.context() as mp:
        real_open = open

        def dying_open(path, mode="r", *args, **kwargs):  # PEFT's config writer: open(...,"w") then write
            f = real_open(path, mode, *args, **kwargs)
            if "w" in mode and str(path).endswith("adapter_config.json"):
                f.close()
                raise KeyboardInterrupt  # dies after truncating, before writing
            return f

        mp.setattr(pc, "open", dying_open, raising=False)
        with pytest.raises(KeyboardInterrupt):
            model.peft_config["default"].save_pretrained(str(d))
    assert json.loads((d / "adapter_config.json").read_text())["rank_pattern"] == ranks


def test_truncated_or_corrupted_weights_name_the_file(saved_adapter, tmp_path):
    src, _, _ = saved_adapter
    d = _copy_adapter(src, tmp_path / "t")
    f = d / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 9])
    match = r"cannot read the adapter weights file '.*adapter_model\.safetensors'.*truncated"
    with pytest.raises(ValueError, match=match):
        _load(d)
    # a flipped value inside the data: the header is fine, the values are not
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("b.geolora_U"))
    tensors[key][0, 0] = math.nan
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 'b' in '.*adapter_model\.safetensors': geolora_U contains inf/NaN"):
        _load(d)
    tensors = load_file(src / "adapter_model.safetensors")
    tensors[key] = tensors[key] * 3.0
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"layer 'b' in .*geolora_U is not orthonormal"):
        _load(d)


def test_rank_pattern_disagreeing_with_tensors_names_file_and_layer(saved_adapter, tmp_path):
    src, _, ranks = saved_adapter
    d = _copy_adapter(src, tmp_path / "r")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["rank_pattern"]["a"] = ranks["a"] % 6 + 1
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"layer 'a' in '.*adapter_model\.safetensors' has rank {ranks['a']} but "
                                         rf"the rank_pattern of adapter_config\.json .* says {ranks['a'] % 6 + 1}"):
        _load(d)


def test_pickled_weights_are_never_unpickled(saved_adapter, tmp_path):
    """Only safetensors is written; an adapter_model.bin (pickle) is read with torch.load(weights_only=True), so a
    malicious pickle is refused instead of executed."""
    src, _, _ = saved_adapter
    assert sorted(p.name for p in src.iterdir() if p.name.startswith("adapter_model")) == ["adapter_model.safetensors"]
    d = _copy_adapter(src, tmp_path / "p")
    (d / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"x": Evil()}, d / "adapter_model.bin")
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        _load(d)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------- 5. bad input
_ODD = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.one_of(st.integers(-1, 9), st.text(max_size=3), st.floats(0, 1)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.one_of(st.integers(-2, 20), st.floats(), st.text(max_size=2)), max_size=2),
    st.sampled_from(["sgd", "adam", "rank", "params", "none", "all", "geolora_only", "SEQ_CLS", "query"]),
    st.tuples(st.floats(0, 1.2), st.floats(0, 1.2)),
)
_FIELDS = ["r", "r_max", "r_min", "tau", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
           "layers_to_transform", "layers_pattern", "modules_to_save", "bias", "fan_in_fan_out", "init_weights",
           "rank_pattern", "s_update", "adam_betas", "adam_eps", "rank_budget", "budget_type", "reorthonormalize_every",
           "sync_factors_every", "static_shapes", "task_type", "inference_mode"]


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


def test_callback_keeps_a_user_optimizer_off_the_bases(tmp_path):
    """The user hands the Trainer an AdamW with weight decay over ALL trainables (U and V included): the callback
    wraps it, so the bases never get momentum or decay and stay orthonormal."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = _two_layer(s_update="adam")
    geolora.grow_capacity(model)
    user_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, weight_decay=0.5)
    class AcceleratedLike:  # the interface of accelerate's AcceleratedOptimizer that the callback uses
        def __init__(self, optimizer):
            self.optimizer, self.scaler = optimizer, None

        def step(self):
            self.optimizer.step()

        def zero_grad(self):
            self.optimizer.zero_grad()

    wrapped = AcceleratedLike(user_opt)
    cb = geolora.GeoLoRACallback()
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=model, optimizer=wrapped)
    assert isinstance(wrapped.optimizer, geolora.GeoLoRAOptimizer)
    for _ in range(5):
        _loss(model).backward()
        wrapped.step()
        wrapped.zero_grad()
    for layer in _layers(model).values():
        assert not user_opt.state[layer.geolora_U["default"]] and not user_opt.state[layer.geolora_V["default"]]
    _check_invariants(model)


def test_callback_refuses_two_trainable_adapters(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    model = _two_layer()
    model.add_adapter("other", geolora.GeoLoRAConfig(r=2, target_modules=["a", "b"]))
    for layer in _layers(model).values():
        layer.geolora_S["other"].requires_grad_(True)
    args = TrainingArguments(str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match=r"Several GeoLoRA adapters are trainable at once \(\['default', 'other'\]\)"):
        geolora.GeoLoRACallback().on_init_end(args, TrainerState(), TrainerControl(), model=model)


def test_export_of_unloaded_or_unknown_adapter_is_a_clear_error(tmp_path):
    model = _two_layer()
    with pytest.raises(ValueError, match=r"no adapter named 'nope' \(adapters: \['default'\]\)"):
        geolora.export_as_lora(model, tmp_path / "x", adapter_name="nope")
    merged = model.merge_and_unload()
    with pytest.raises(ValueError, match="has no PEFT adapters .* merge_and_unload"):
        geolora.export_as_lora(merged, tmp_path / "y")
    assert not (tmp_path / "y").exists()
