"""Invariants of the pure integrator math (float64, several seeds) and property-based checks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
        sig = [torch.sort(torch.rand(3, 5, generator=gen, dtype=torch.float64), descending=True).values,
               torch.sort(torch.rand(2, 4, generator=gen, dtype=torch.float64), descending=True).values]
        rows = [row for s in sig for row in s.tolist()]
        firsts = [23, 23, 23, 14, 14]
        mins, maxs = [1, 2, 1, 1, 1], [5, 4, 3, 4, 2]
        got = I.budget_truncation_ranks(
            sig, [torch.tensor(23), torch.tensor(14)], budget,
            [torch.tensor([1, 2, 1]), torch.tensor([1, 1])], [torch.tensor([5, 4, 3]), torch.tensor([4, 2])],
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
