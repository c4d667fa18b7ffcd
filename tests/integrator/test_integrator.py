"""The pure integrator math (float64, several seeds): invariants, hand-written reference formulas and property-based
checks.  The optimizer that orchestrates it is tested in test_optim.py."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from geolora import GeoLoRAConfig
from geolora import integrator as I


def test_truncation_rank_matches_spec_example_and_is_not_idempotent():
    sigma = torch.tensor([[10.0, 10.0, 10.0, 1.5, 1.2]])
    assert I.truncation_rank(sigma, 0.1, 1, 10).item() == 4
    # applied again to the kept values it truncates further: one truncation per step matters
    assert I.truncation_rank(sigma[:, :4], 0.1, 1, 10).item() == 3


def test_truncation_rank_clamps_and_handles_zero():
    sigma = torch.tensor([[5.0, 4.0, 3.0, 2.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1e-9, 0.0, 0.0]])
    ranks = I.truncation_rank(sigma, 0.0, 2, 3)
    assert ranks.tolist() == [3, 2, 2]  # r_max caps, r_min floors, even for all-zero σ
    assert I.truncation_rank(sigma, 0.5, 1, 4).tolist()[0] == 2


def test_truncation_rank_is_scale_invariant_and_ignores_rounding_noise():
    sigma = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    for scale in (1e-30, 1.0, 1e25):
        assert I.truncation_rank(sigma * scale, 0.2, 1, 4).item() == I.truncation_rank(sigma, 0.2, 1, 4).item()
    noisy = torch.tensor([[1.0, 1.0, 1e-9, 1e-12]])
    assert I.truncation_rank(noisy, 0.0, 1, 4).item() == 2  # τ = 0 keeps real directions, not SVD rounding noise


def _orthonormal(m, r, gen):
    q, _ = torch.linalg.qr(torch.randn(m, r, generator=gen, dtype=torch.float64))
    return q


def _random_state(B, m, n, cap, ranks, gen, zero_S=False):
    U = torch.zeros(B, m, cap, dtype=torch.float64)
    V = torch.zeros(B, n, cap, dtype=torch.float64)
    S = torch.zeros(B, cap, cap, dtype=torch.float64)
    G = torch.randn(B, m, n, generator=gen, dtype=torch.float64)
    for b, r in enumerate(ranks):
        U[b, :, :r] = _orthonormal(m, r, gen)
        V[b, :, :r] = _orthonormal(n, r, gen)
        if not zero_S:
            S[b, :r, :r] = torch.randn(r, r, generator=gen, dtype=torch.float64)
    K = G @ V
    L = G.transpose(1, 2) @ U
    gS = U.transpose(1, 2) @ G @ V
    return U, S, V, G, K, L, gS


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("zero_S", [False, True])
def test_step_invariants_float64(seed, zero_S):
    gen = torch.Generator().manual_seed(seed)
    B, m, n, cap = 3, 9, 7, 5
    ranks = torch.tensor([1, 3, 5])
    U, S, V, G, K, L, gS = _random_state(B, m, n, cap, ranks.tolist(), gen, zero_S)
    Ub = I.augment_basis(U, K, ranks)
    Vb = I.augment_basis(V, L, ranks)
    for basis, old in ((Ub, U), (Vb, V)):
        Bm = basis.basis
        eye = torch.eye(Bm.shape[-1], dtype=torch.float64).expand_as(Bm.transpose(1, 2) @ Bm)
        assert torch.allclose(Bm.transpose(1, 2) @ Bm, eye, atol=1e-12)  # orthonormal augmented basis
        proj = Bm @ Bm.transpose(1, 2)
        assert torch.allclose(proj @ old, old, atol=1e-12)  # span(U_old) ⊆ span([U Ũ])
    lr = torch.full((B,), 0.3, dtype=torch.float64)
    G_aug = I.augmented_gradient(gS, K, L, Ub, Vb)
    S_aug = I.augmented_coefficients(S, G_aug, lr)
    P, sigma, Qh = torch.linalg.svd(S_aug, full_matrices=False)
    tau = 0.2
    new_ranks = I.truncation_rank(sigma, tau, 1, cap)
    tr = I.truncate(Ub.basis, Vb.basis, P, sigma, Qh, new_ranks, cap)
    assert (new_ranks < cap).any()  # so that the zero padding below is checked on a non-empty slice
    M_aug = Ub.basis @ S_aug @ Vb.basis.transpose(1, 2)
    M_new = tr.U @ tr.S @ tr.V.transpose(1, 2)
    for b in range(B):
        k = new_ranks[b].item()
        assert 1 <= k <= cap
        Uk, Vk = tr.U[b, :, :k], tr.V[b, :, :k]
        assert torch.allclose(Uk.T @ Uk, torch.eye(k, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(Vk.T @ Vk, torch.eye(k, dtype=torch.float64), atol=1e-12)
        # exact zero padding beyond the rank (an empty slice where k == cap)
        assert torch.count_nonzero(tr.U[b, :, k:]) == torch.count_nonzero(tr.V[b, :, k:]) == 0
        assert torch.count_nonzero(tr.S[b, k:]) == torch.count_nonzero(tr.S[b, :, k:]) == 0
        err = (M_aug[b] - M_new[b]).norm()
        tail = sigma[b, k:].norm()
        assert torch.allclose(err, tail, atol=1e-10)  # truncation error == discarded tail
        assert tail <= tau * sigma[b].norm() + 1e-12 or k == cap


def test_augmented_matches_independent_formula():
    """M_aug = M - λ (P_U G P_[V Ṽ] + P_Ũ G P_V) from the batched code."""
    gen = torch.Generator().manual_seed(5)
    B, m, n, cap = 2, 8, 6, 4
    ranks = torch.tensor([2, 4])
    U, S, V, G, K, L, gS = _random_state(B, m, n, cap, ranks.tolist(), gen)
    Ub, Vb = I.augment_basis(U, K, ranks), I.augment_basis(V, L, ranks)
    lam = 0.7
    S_aug = I.augmented_coefficients(S, I.augmented_gradient(gS, K, L, Ub, Vb), torch.full((B,), lam))
    M_aug = Ub.basis @ S_aug @ Vb.basis.transpose(1, 2)
    for b in range(B):
        r = ranks[b].item()
        Ur, Vr = U[b, :, :r], V[b, :, :r]
        Ut = Ub.basis[b][:, Ub.is_new[b]]
        Vt = Vb.basis[b][:, Vb.is_new[b]]
        VV = torch.cat([Vr, Vt], 1)
        expected = Ur @ S[b, :r, :r] @ Vr.T - lam * (Ur @ Ur.T @ G[b] @ VV @ VV.T + Ut @ Ut.T @ G[b] @ Vr @ Vr.T)
        assert torch.allclose(M_aug[b], expected, atol=1e-10)


def test_rank_deficient_and_zero_gradients_stay_orthonormal():
    gen = torch.Generator().manual_seed(3)
    m, cap = 10, 4
    ranks = torch.tensor([2, 2])
    U, *_ = _random_state(2, m, m, cap, [2, 2], gen)
    K = torch.zeros(2, m, cap, dtype=torch.float64)
    K[1, :, :2] = U[1, :, :2] @ torch.randn(2, 2, generator=gen, dtype=torch.float64)  # inside span(U)
    Ub = I.augment_basis(U, K, ranks)
    for b in range(2):
        Bm = Ub.basis[b]
        assert torch.isfinite(Bm).all()
        assert torch.allclose(Bm.T @ Bm, torch.eye(Bm.shape[1], dtype=torch.float64), atol=1e-12)


def test_budget_truncation_keeps_globally_largest():
    s1 = torch.tensor([[9.0, 5.0, 1.0], [8.0, 0.5, 0.1]])
    s2 = torch.tensor([[7.0, 6.0, 4.0, 3.0]])
    ones = torch.tensor(1)
    r = I.budget_truncation_ranks([s1, s2], [ones, ones], 5, [ones, ones], [torch.tensor(3), torch.tensor(4)])
    # forced: one per layer (9, 8, 7) = 3; then the next largest: 6, 5
    assert r[0].tolist() == [2, 1] and r[1].tolist() == [2]
    # per-layer costs: a rank in group 2 costs 10, in group 1 costs 1; forced 1 + 1 + 10 = 12
    costs, caps = [ones, torch.tensor(10)], [torch.tensor(3)] * 2
    # 13: the next largest value, 6 (group 2, cost 10), does not fit, and admission stops there (5 is not taken)
    r = I.budget_truncation_ranks([s1, s2], costs, 13, [ones, ones], caps)
    assert [x.tolist() for x in r] == [[1, 1], [1]]
    # 23: 6 (10) -> 22, 5 (1) -> 23, then 4 (10) does not fit
    r = I.budget_truncation_ranks([s1, s2], costs, 23, [ones, ones], caps)
    assert [x.tolist() for x in r] == [[2, 1], [2]]
    # 34: 4 (10) -> 33, then 1 (1) -> 34; group 2 is at its cap (3), so 3 is not eligible; 0.5 would not fit
    r = I.budget_truncation_ranks([s1, s2], costs, 34, [ones, ones], caps)
    assert [x.tolist() for x in r] == [[3, 1], [3]]


def _greedy_budget_reference(rows, first_costs, growth, budget, r_min, r_max):
    """Plain-Python greedy: forced r_min values per row, then values in decreasing σ (ties: row-major order), each
    charged first_cost + growth * (its index in its row), until the first one that does not fit."""
    ranks = [min(lo, hi, len(row)) for row, lo, hi in zip(rows, r_min, r_max)]
    spent = sum(k * c + growth * k * (k - 1) / 2 for k, c in zip(ranks, first_costs))
    candidates = sorted(
        (-v, i, j) for i, row in enumerate(rows) for j, v in enumerate(row) if ranks[i] <= j < min(r_max[i], len(row))
    )
    for _, i, j in candidates:
        cost = first_costs[i] + growth * j
        if spent + cost > budget:
            break
        spent += cost
        ranks[i] += 1
    return ranks, spent


def test_parameter_budget_charges_the_marginal_cost_of_each_rank_float64():
    """budget_type="params": rank k of an (m, n) layer keeps k (m + n + k) parameters, so going from rank j to j + 1
    costs m + n + 2j + 1 (first cost m + n + 1, growth 2)."""
    s1 = torch.tensor([[9.0, 5.0, 2.5, 1.0], [8.0, 6.5, 0.5, 0.1]], dtype=torch.float64)  # (m, n) = (10, 12)
    s2 = torch.tensor([[7.0, 6.0, 4.0]], dtype=torch.float64)  # (m, n) = (3, 10)
    first = [torch.tensor(23), torch.tensor(14)]
    lo, hi = [torch.tensor(1), torch.tensor(1)], [torch.tensor(4), torch.tensor(3)]
    # forced 23 + 23 + 14 = 60; then (7 is forced already) 6.5 (row 1, j=1: 25) -> 85, 6 (group 2, j=1: 16) -> 101,
    # 5 (row 0, j=1: 25) -> 126, 4 (group 2, j=2: 18) -> 144, 2.5 (row 0, j=2: 27) -> 171 > 160: stop
    r = I.budget_truncation_ranks([s1, s2], first, 160, lo, hi, cost_growth=2.0)
    assert [x.tolist() for x in r] == [[2, 2], [3]]
    assert 2 * (22 + 2) + 2 * (22 + 2) + 3 * (13 + 3) == 144  # kept: k (m + n + k) per layer
    # a flat m + n + 1 per rank (cost_growth 0, the rank budget's rule) charges 157 for rank 3 in row 0, which keeps
    # 3 * 25 + 2 * 24 + 3 * 16 = 171 parameters
    flat = I.budget_truncation_ranks([s1, s2], first, 160, lo, hi)
    assert [x.tolist() for x in flat] == [[3, 2], [3]]
    gen = torch.Generator().manual_seed(0)
    for budget in (100, 122, 150, 171, 200, 250, 300, 400):  # the forced ranks cost 122
        sig = [
            torch.sort(torch.rand(3, 5, generator=gen, dtype=torch.float64), descending=True).values,
            torch.sort(torch.rand(2, 4, generator=gen, dtype=torch.float64), descending=True).values,
        ]
        rows = [row for s in sig for row in s.tolist()]
        firsts = [23, 23, 23, 14, 14]
        mins, maxs = [1, 2, 1, 1, 1], [5, 4, 3, 4, 2]
        got = I.budget_truncation_ranks(
            sig,
            [torch.tensor(23), torch.tensor(14)],
            budget,
            [torch.tensor([1, 2, 1]), torch.tensor([1, 1])],
            [torch.tensor([5, 4, 3]), torch.tensor([4, 2])],
            cost_growth=2.0,
        )
        expected, spent = _greedy_budget_reference(rows, firsts, 2, budget, mins, maxs)
        assert torch.cat(got).tolist() == expected, budget
        forced_cost = sum(k * c + k * (k - 1) for k, c in zip([1, 2, 1, 1, 1], firsts))
        assert spent <= max(budget, forced_cost)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    data=st.data(),
    tau=st.floats(0.0, 0.95),
    lr=st.floats(1e-8, 1e4),
    seed=st.integers(0, 10_000),
)
def test_property_invariants(m, n, data, tau, lr, seed):
    cap = data.draw(st.integers(1, min(m, n)))
    r = data.draw(st.integers(1, cap))
    r_min = data.draw(st.integers(1, r))
    gen = torch.Generator().manual_seed(seed)
    U, S, V, G, K, L, gS = _random_state(1, m, n, cap, [r], gen)
    ranks = torch.tensor([r])
    Ub, Vb = I.augment_basis(U, K, ranks), I.augment_basis(V, L, ranks)
    S_aug = I.augmented_coefficients(S, I.augmented_gradient(gS, K, L, Ub, Vb), torch.tensor([lr]))
    P, sigma, Qh = torch.linalg.svd(S_aug, full_matrices=False)
    k = I.truncation_rank(sigma, tau, r_min, cap)
    tr = I.truncate(Ub.basis, Vb.basis, P, sigma, Qh, k, cap)
    kk = k.item()
    assert r_min <= kk <= cap
    for X in (tr.U[0, :, :kk], tr.V[0, :, :kk]):
        assert torch.isfinite(X).all()
        assert (X.T @ X - torch.eye(kk, dtype=torch.float64)).abs().max() < 1e-9
    assert torch.isfinite(tr.S).all()


# ------------------------------------------------------------------------- blocks, the SGD and Adam coefficient updates


def test_fit_block_pads_with_zeros_and_crops_the_top_left_block():
    x = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    padded = I.fit_block(x, 5, 6)
    assert padded.shape == (2, 5, 6) and torch.equal(padded[:, :3, :4], x)
    assert padded[:, 3:].abs().sum() == 0 and padded[:, :, 4:].abs().sum() == 0
    assert torch.equal(I.fit_block(x, 2, 3), x[:, :2, :3])
    assert torch.equal(I.fit_block(x, 2, 6)[:, :, :4], x[:, :2]) and I.fit_block(x, 2, 6)[:, :, 4:].abs().sum() == 0
    moments = I.Moments(x, 2 * x, torch.tensor([1.0, 4.0], dtype=torch.float64))
    fitted = I.fit_moments(moments, 4, 2)
    assert torch.equal(fitted.exp_avg, I.fit_block(x, 4, 2))
    assert torch.equal(fitted.exp_avg_sq, I.fit_block(2 * x, 4, 2))
    assert torch.equal(fitted.step, moments.step)
    zero = I.zero_moments(3, 2, 5, torch.float64)
    assert [t.shape for t in zero] == [(3, 2, 5), (3, 2, 5), (3,)] and all(t.abs().sum() == 0 for t in zero)


def test_fixed_basis_has_no_new_directions():
    live = I.column_mask(torch.tensor([1, 3]), 3)
    basis = torch.randn(2, 5, 3, dtype=torch.float64)
    fixed = I.fixed_basis(basis, live)
    assert fixed.basis is basis and torch.equal(fixed.is_old, live) and not fixed.is_new.any()


def _augmented_setup(seed, B=3, m=9, n=7, cap=4, ranks=(1, 2, 4)):
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.tensor(ranks)
    U, S, V, G, K, L, gS = _random_state(B, m, n, cap, ranks.tolist(), gen)
    Ub, Vb = I.augment_basis(U, K, ranks), I.augment_basis(V, L, ranks)
    return gen, ranks, U, S, V, G, Ub, Vb, I.augmented_gradient(gS, K, L, Ub, Vb)


@pytest.mark.parametrize("seed", [0, 1])
def test_sgd_coefficients_are_the_block_formula_of_algorithm_1(seed):
    """S_aug = [[S - λ U^T G V, -λ U^T G Ṽ], [-λ Ũ^T G V, 0]] block by block from the dense G, for λ as one float, a
    (B,) tensor and a (B, 1, 1) tensor; with a fixed basis (a coefficient step) it is S - λ U^T G V."""
    _, ranks, U, S, V, G, Ub, Vb, G_aug = _augmented_setup(seed)
    lams = [0.3, 0.7, 1.9]
    per_item = torch.tensor(lams, dtype=torch.float64)
    results = [I.augmented_coefficients(S, G_aug, lr) for lr in (per_item, per_item.view(-1, 1, 1))]
    for b, (lam, r) in enumerate(zip(lams, ranks.tolist())):
        Ur, Vr = U[b, :, :r], V[b, :, :r]
        Ut, Vt = Ub.basis[b][:, Ub.is_new[b]], Vb.basis[b][:, Vb.is_new[b]]
        rt, ct = Ut.shape[1], Vt.shape[1]
        expected = torch.zeros(G_aug.shape[1:], dtype=torch.float64)
        expected[:r, :r] = S[b, :r, :r] - lam * Ur.T @ G[b] @ Vr
        expected[:r, r : r + ct] = -lam * Ur.T @ G[b] @ Vt
        expected[r : r + rt, :r] = -lam * Ut.T @ G[b] @ Vr
        for got in results:
            torch.testing.assert_close(got[b], expected, rtol=0, atol=1e-12)
        one = I.augmented_coefficients(S[b : b + 1], G_aug[b : b + 1], lam)  # one Python float for the batch
        torch.testing.assert_close(one[0], expected, rtol=0, atol=1e-12)
    gS = U.transpose(1, 2) @ G @ V  # (B, c, c)
    torch.testing.assert_close(
        I.augmented_coefficients(S, gS, per_item), S - per_item[:, None, None] * gS, rtol=0, atol=0
    )


def _reference_adam(S, G, Ub, Vb, moments, lrs, wds, betas, eps, capacity, per_layer, plain_new, history):
    """Adam on the augmented coefficients entry by entry in float64 Python loops, written from the description in
    adam_coefficients' docstring (not from its code)."""
    beta1, beta2 = betas
    B, kU, kV = G.shape
    c = capacity
    S_out = torch.zeros(B, kU, kV, dtype=torch.float64)
    m_out, v_out = torch.zeros_like(S_out), torch.zeros_like(S_out)
    t_out = moments.step + 1
    for b in range(B):
        g, lr, wd = G[b], lrs[b], wds[b]
        t = float(t_out[b])
        bc1, bc2 = 1 - beta1**t, 1 - beta2**t
        if history is None:
            old_rows, old_cols = Ub.is_old[b].tolist(), Vb.is_old[b].tolist()
        else:
            h = int(history[b])
            old_rows, old_cols = [i < h for i in range(kU)], [j < h for j in range(kV)]
        m_prev = [
            [
                float(moments.exp_avg[b, i, j])
                if i < moments.exp_avg.shape[1] and j < moments.exp_avg.shape[2]
                else 0.0
                for j in range(kV)
            ]
            for i in range(kU)
        ]
        v_prev = [
            [
                float(moments.exp_avg_sq[b, i, j])
                if i < moments.exp_avg.shape[1] and j < moments.exp_avg.shape[2]
                else 0.0
                for j in range(kV)
            ]
            for i in range(kU)
        ]
        old = [[old_rows[i] and old_cols[j] for j in range(kV)] for i in range(kU)]
        cells = list(itertools.product(range(kU), range(kV)))
        m, v = {}, {}
        for i, j in cells:  # the old block: the usual Adam moments
            if old[i][j]:
                m[i, j] = beta1 * m_prev[i][j] + (1 - beta1) * float(g[i, j])
                v[i, j] = beta2 * v_prev[i][j] + (1 - beta2) * float(g[i, j]) ** 2
        n_old = sum(1 for cell in cells if old[cell[0]][cell[1]])
        v_bar = sum(v.values()) / n_old / bc2 if n_old else 0.0  # mean bias-corrected second moment
        peak = float(g.abs().max())
        for i, j in cells:  # entries without history: m̂ = g, v̂ = max(v̄, g²) (or a fresh Adam entry)
            if old[i][j]:
                continue
            gij = float(g[i, j])
            if plain_new:
                if abs(gij) <= max(1e-5, 100 * torch.finfo(torch.float64).eps) * peak:
                    m[i, j] = v[i, j] = 0.0
                else:
                    m[i, j], v[i, j] = gij * bc1, gij * gij * bc2
            else:
                m[i, j], v[i, j] = gij * bc1, max(v_bar, gij * gij) * bc2
        if per_layer:
            has_grad = (
                [Ub.is_old[b, i] or Ub.is_new[b, i] for i in range(kU)],
                [Vb.is_old[b, j] or Vb.is_new[b, j] for j in range(kV)],
            )
            live = {
                (i, j): bool(has_grad[0][i] and has_grad[1][j] and not (Ub.is_new[b, i] and Vb.is_new[b, j]))
                for i, j in cells
            }
            v_layer = sum(v[cell] for cell in cells if live[cell]) / c
        for i, j in cells:
            if per_layer:
                step = (m[i, j] / bc1) / ((v_layer / bc2) ** 0.5 + eps) if live[i, j] else 0.0
            else:
                step = (m[i, j] / bc1) / ((v[i, j] / bc2) ** 0.5 + eps)
            s_ij = float(S[b, i, j]) if i < S.shape[1] and j < S.shape[2] else 0.0
            S_out[b, i, j] = s_ij * (1 - lr * wd) - lr * step
            m_out[b, i, j], v_out[b, i, j] = m[i, j], v[i, j]
    return S_out, I.Moments(m_out, v_out, t_out)


@pytest.mark.parametrize("per_layer", [False, True], ids=["adam", "adam_layer"])
@pytest.mark.parametrize("plain_new", [False, True], ids=["capped-new", "plain-new"])
@pytest.mark.parametrize("history", [False, True], ids=["all-old", "probes"])
@pytest.mark.parametrize("seed", [0, 1])
def test_adam_coefficients_match_a_hand_written_float64_formula(per_layer, plain_new, history, seed):
    gen, ranks, U, S, V, G, Ub, Vb, G_aug = _augmented_setup(seed)
    B, kU, kV = G_aug.shape
    cap = 4
    # moments with history at the capacity (cropped or padded to the augmented shape inside), different step counts
    moments = I.Moments(
        torch.randn(B, cap, cap, generator=gen, dtype=torch.float64),
        torch.rand(B, cap, cap, generator=gen, dtype=torch.float64),
        torch.tensor([0.0, 3.0, 11.0], dtype=torch.float64),
    )
    hist = torch.clamp(ranks - 1, min=0) if history else None  # e.g. probes: fewer coefficients with history
    if plain_new:  # an entry whose gradient is rounding noise next to the item's largest, outside the old block
        G_aug = G_aug.clone()
        G_aug[2, 0, 5] = 1e-9 * G_aug[2].abs().max()
    lrs, wds = [0.05, 0.2, 0.01], [0.0, 0.1, 0.3]
    betas, eps = (0.85, 0.99), 1e-6
    expected_S, expected = _reference_adam(
        S, G_aug, Ub, Vb, moments, lrs, wds, betas, eps, cap, per_layer, plain_new, hist
    )
    got_S, got = I.adam_coefficients(
        S,
        G_aug,
        Ub,
        Vb,
        moments,
        torch.tensor(lrs, dtype=torch.float64),
        torch.tensor(wds, dtype=torch.float64),
        betas=betas,
        eps=eps,
        capacity=cap,
        per_layer=per_layer,
        plain_new=plain_new,
        history=hist,
    )
    torch.testing.assert_close(got_S, expected_S, rtol=1e-12, atol=1e-13)
    for x, y in zip(got, expected):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)
    if plain_new:
        assert got.exp_avg[2, 0, 5] == got.exp_avg_sq[2, 0, 5] == 0 and got_S[2, 0, 5] == 0  # the noise stays 0
    # one Python float λ and weight decay for the whole batch: the same as a tensor of equal values
    one_S, one = I.adam_coefficients(
        S,
        G_aug,
        Ub,
        Vb,
        moments,
        0.2,
        0.1,
        betas=betas,
        eps=eps,
        capacity=cap,
        per_layer=per_layer,
        plain_new=plain_new,
        history=hist,
    )
    ref_S, ref = I.adam_coefficients(
        S,
        G_aug,
        Ub,
        Vb,
        moments,
        torch.full((B, 1, 1), 0.2, dtype=torch.float64),
        torch.full((B,), 0.1, dtype=torch.float64),
        betas=betas,
        eps=eps,
        capacity=cap,
        per_layer=per_layer,
        plain_new=plain_new,
        history=hist,
    )
    torch.testing.assert_close(one_S, ref_S, rtol=0, atol=1e-15)


def test_first_adam_step_from_zero_moments_is_lr_sign_g_on_the_old_block_and_capped_on_the_new():
    """Adam's first step of an entry with history is λ sign(g) (up to ε); an entry of a new direction moves by
    λ g / sqrt(max(v̄, g²)): at most λ, less for a gradient weaker than the old block's typical one."""
    _, ranks, U, S, V, G, Ub, Vb, G_aug = _augmented_setup(3)
    B = G_aug.shape[0]
    zero = I.zero_moments(B, 4, 4, torch.float64)
    S0 = torch.zeros_like(S)
    S1, moments = I.adam_coefficients(S0, G_aug, Ub, Vb, zero, 0.1, betas=(0.9, 0.999), eps=1e-12, capacity=4)
    old = Ub.is_old[:, :, None] & Vb.is_old[:, None, :]
    new = (Ub.is_old[:, :, None] & Vb.is_new[:, None, :]) | (Ub.is_new[:, :, None] & Vb.is_old[:, None, :])
    torch.testing.assert_close(S1[old], -0.1 * torch.sign(G_aug[old]), rtol=1e-9, atol=0)
    assert (S1[new].abs() <= 0.1 * (1 + 1e-12)).all() and (S1[new].abs() < 0.1 * (1 - 1e-3)).any()
    assert torch.equal(moments.step, torch.ones(B, dtype=torch.float64))


def test_adam_layer_step_does_not_grow_with_the_live_rank():
    """The same gradient on one coefficient, the other live coefficients with zero gradient: the step of that
    coefficient is the same at live rank 2 and 8 (the second moment is divided by the capacity; a mean over the live
    entries would shrink with the rank and enlarge the step 4x here)."""
    cfg = GeoLoRAConfig()
    steps = []
    for rank in (2, 8):
        U = torch.linalg.qr(torch.randn(1, 12, rank, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(1, 10, rank, dtype=torch.float64))[0]
        live = I.column_mask(torch.tensor([rank]), rank)
        G = torch.zeros(1, rank, rank, dtype=torch.float64)
        G[0, 0, 0] = 0.5
        S = torch.zeros_like(G)
        S_new, _ = I.adam_coefficients(
            S,
            G,
            I.fixed_basis(U, live),
            I.fixed_basis(V, live),
            I.zero_moments(1, 8, 8, torch.float64),
            0.1,
            0.0,
            betas=cfg.adam_betas,
            eps=cfg.adam_eps,
            capacity=8,
            per_layer=True,
        )
        steps.append(float(S_new[0, 0, 0]))
    assert steps[0] == pytest.approx(steps[1], rel=1e-9) and steps[0] < 0, steps


# --------------------------------------------------------------------------------------------- the moments' rotation


def _random_orthogonal(B, k, gen):
    return torch.linalg.qr(torch.randn(B, k, k, generator=gen, dtype=torch.float64))[0]


def test_rotate_moments_is_the_hand_written_formula():
    gen = torch.Generator().manual_seed(0)
    B, kU, kV, c = 2, 5, 4, 3
    m = torch.randn(B, kU, kV, generator=gen, dtype=torch.float64)
    v = torch.rand(B, kU, kV, generator=gen, dtype=torch.float64)
    P = torch.randn(B, kU, c, generator=gen, dtype=torch.float64)
    Q = torch.randn(B, kV, c, generator=gen, dtype=torch.float64)
    t = torch.tensor([2.0, 5.0], dtype=torch.float64)
    got = I.rotate_moments(I.Moments(m, v, t), P, Q)
    for b, k, q in itertools.product(range(B), range(c), range(c)):
        m_kq = sum(P[b, i, k] * m[b, i, j] * Q[b, j, q] for i in range(kU) for j in range(kV))
        v_kq = sum(P[b, i, k] ** 2 * v[b, i, j] * Q[b, j, q] ** 2 for i in range(kU) for j in range(kV))
        torch.testing.assert_close(got.exp_avg[b, k, q], m_kq, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.exp_avg_sq[b, k, q], v_kq, rtol=1e-12, atol=1e-14)
    assert torch.equal(got.step, t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_moments_rotated_into_a_basis_of_the_same_span_and_back_are_recovered(seed):
    """Rotating into ``Ub P``, ``Vb Q`` (the same spans: P, Q orthogonal) keeps the first moment as a matrix in weight
    space, ``Ub m Vb^T``, and rotating back recovers m; v stays non-negative, and for a signed permutation (a
    reordering of the basis, e.g. the SVD sorting the directions) it is recovered too."""
    gen = torch.Generator().manual_seed(seed)
    B, m_dim, n_dim, k = 2, 9, 8, 4
    Ub = torch.stack([_orthonormal(m_dim, k, gen) for _ in range(B)])
    Vb = torch.stack([_orthonormal(n_dim, k, gen) for _ in range(B)])
    moments = I.Moments(
        torch.randn(B, k, k, generator=gen, dtype=torch.float64),
        torch.rand(B, k, k, generator=gen, dtype=torch.float64),
        torch.ones(B, dtype=torch.float64),
    )
    P, Q = _random_orthogonal(B, k, gen), _random_orthogonal(B, k, gen)
    rotated = I.rotate_moments(moments, P, Q)
    torch.testing.assert_close(
        (Ub @ P) @ rotated.exp_avg @ (Vb @ Q).transpose(1, 2),
        Ub @ moments.exp_avg @ Vb.transpose(1, 2),
        rtol=0,
        atol=1e-12,
    )
    back = I.rotate_moments(rotated, P.transpose(1, 2), Q.transpose(1, 2))
    torch.testing.assert_close(back.exp_avg, moments.exp_avg, rtol=0, atol=1e-12)
    assert (rotated.exp_avg_sq >= 0).all()
    perm = torch.stack([torch.randperm(k, generator=gen) for _ in range(B)])
    signs = torch.where(torch.rand(B, k, generator=gen) < 0.5, -1.0, 1.0).to(torch.float64)
    Pp = torch.eye(k, dtype=torch.float64)[perm] * signs[:, None, :]  # signed permutations
    Qp = torch.eye(k, dtype=torch.float64)[perm.flip(-1)]
    there = I.rotate_moments(moments, Pp, Qp)
    back = I.rotate_moments(there, Pp.transpose(1, 2), Qp.transpose(1, 2))
    torch.testing.assert_close(back.exp_avg, moments.exp_avg, rtol=0, atol=0)
    torch.testing.assert_close(back.exp_avg_sq, moments.exp_avg_sq, rtol=0, atol=0)
    assert not torch.equal(there.exp_avg_sq, moments.exp_avg_sq)  # it did move


def test_moments_follow_a_truncation_and_are_cut_to_the_new_rank():
    """After a step and its truncation, the rotated first moment in weight space is the old one projected onto the
    kept directions (all of it when nothing is cut), and zero beyond the new rank."""
    _, ranks, U, S, V, G, Ub, Vb, G_aug = _augmented_setup(4)
    gen = torch.Generator().manual_seed(9)
    B, kU, kV = G_aug.shape
    cap = 4
    S_aug = I.augmented_coefficients(S, G_aug, 0.3)
    P, sigma, Qh = torch.linalg.svd(S_aug, full_matrices=False)
    moments = I.Moments(
        torch.randn(B, kU, kV, generator=gen, dtype=torch.float64),
        torch.rand(B, kU, kV, generator=gen, dtype=torch.float64),
        torch.ones(B, dtype=torch.float64),
    )
    for new_ranks in (torch.tensor([1, 2, 3]), torch.tensor([2, 4, 4])):
        tr = I.truncate(Ub.basis, Vb.basis, P, sigma, Qh, new_ranks, cap)
        rotated = I.rotate_moments(moments, tr.P, tr.Q)
        assert rotated.exp_avg.shape == (B, cap, cap)
        for b, k in enumerate(new_ranks.tolist()):
            assert rotated.exp_avg[b, k:].abs().sum() == rotated.exp_avg[b, :, k:].abs().sum() == 0
            assert rotated.exp_avg_sq[b, k:].abs().sum() == rotated.exp_avg_sq[b, :, k:].abs().sum() == 0
            Pu = tr.U[b] @ tr.U[b].T  # projections onto the kept directions
            Pv = tr.V[b] @ tr.V[b].T
            weight = Ub.basis[b] @ moments.exp_avg[b] @ Vb.basis[b].T
            torch.testing.assert_close(tr.U[b] @ rotated.exp_avg[b] @ tr.V[b].T, Pu @ weight @ Pv, rtol=0, atol=1e-12)
