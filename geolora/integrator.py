"""Pure tensor math of the GeoLoRA step (Schotthöfer et al., ICLR 2025, Algorithm 1).  No nn.Module, PEFT or
transformers here.

Every function takes a leading batch dimension ``B`` (layers of the same shape stacked) and works at a fixed
*capacity* ``c``: the live rank ``r_b`` of item ``b`` may differ across the batch; columns ``>= r_b`` of ``U``, ``V``
and of the directions are zero.  Notation (one item)::

    U (m, c), V (n, c) orthonormal on the first r columns;  S (c, c) nonzero only on [:r, :r]
    K  = G_M V      (m, c)      L  = G_M^T U    (n, c)      gS = U^T G_M V   (c, c)

One step:

1. ``augment_basis``: thin QR of ``[U_r, K_r]`` gives ``Ũ`` (the new directions outside span(U)); the augmented
   basis is ``[U_r, Ũ, *]`` where ``*`` are unused orthonormal columns (their coefficients are zero).
2. ``augmented_gradient``: the gradient in augmented coordinates,
   ``[[U^T G V, U^T G Ṽ], [Ũ^T G V, 0]]``; ``augmented_coefficients`` (SGD) is ``pad(S) - λ * that``.
3. ``truncation_rank`` / ``budget_truncation_ranks``: the new ranks from the singular values.
4. ``truncate``: ``U <- [U Ũ] P[:, :r1]``, ``S <- diag(σ[:r1])``, ``V <- [V Ṽ] Q[:, :r1]``.

QR and SVD run in at least float32 whatever the input dtype; nothing divides by a singular value.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32 (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


def column_mask(ranks: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) boolean mask, True for column index < ranks[b]."""
    return torch.arange(width, device=ranks.device)[None, :] < ranks[:, None]


def _interleave_perm(ranks: torch.Tensor, cap: int) -> torch.Tensor:
    """Column permutation of ``[U (c cols), K (c cols)]`` that puts ``[U_r, K_r, zero columns...]`` first."""
    B = ranks.shape[0]
    j = torch.arange(2 * cap, device=ranks.device).expand(B, -1)  # (B, 2c) target positions
    r = ranks[:, None]
    src = torch.where(
        j < r,
        j,  # U columns 0..r-1
        torch.where(
            j < 2 * r,
            cap + (j - r),  # K columns 0..r-1
            torch.where(j < r + cap, j - r, j),  # the zero columns of U (r..c-1), then of K (c+r..2c-1)
        ),
    )
    return src


def probe_directions(
    U: torch.Tensor, ranks: torch.Tensor, p: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random orthonormal probe columns orthogonal to each item's ``U_r``, placed in columns ``r .. r + p' - 1``.

    Args:
        U: (B, m, c) bases, zero beyond each item's rank; ranks: (B,) int64; p: probes per item (``p' = min(p, c -
        r)``, fewer where the capacity is nearly full); generator: the random source (on U's device).

    Returns ``(probes (B, m, c), widened ranks (B,) = r + p')``: ``U + probes`` is orthonormal on its first
    ``r + p'`` columns and zero beyond.  Gaussian columns, projected off ``span(U_r)`` twice (classical Gram-Schmidt
    needs the second pass in float32), then orthonormalised by QR.
    """
    B, m, c = U.shape
    dt = compute_dtype(U.dtype)
    p = max(0, min(p, c, m))
    widened = torch.clamp(ranks + p, max=c)
    if p == 0:
        return torch.zeros_like(U), widened
    Uc = U.to(dt)
    X = torch.randn(B, m, p, dtype=dt, device=U.device, generator=generator)
    for _ in range(2):
        X = X - Uc @ (Uc.transpose(1, 2) @ X)
    Q, _ = torch.linalg.qr(X)  # (B, m, p)
    j = torch.arange(c, device=U.device)[None, :]  # (1, c)
    source = (j - ranks[:, None]).clamp(0, p - 1)  # (B, c): probe column placed at column j
    placed = torch.gather(Q, 2, source[:, None, :].expand(B, m, c))
    mask = (j >= ranks[:, None]) & (j < widened[:, None])
    return (placed * mask[:, None, :].to(dt)).to(U.dtype), widened


class AugmentedBasis(NamedTuple):
    basis: torch.Tensor  # (B, m, k) = [U_r, Ũ, unused]; k = min(m, 2c)
    is_old: torch.Tensor  # (B, k) True on the first r columns (the old basis)
    is_new: torch.Tensor  # (B, k) True on the Ũ columns (r .. 2r)


def augment_basis(U: torch.Tensor, K: torch.Tensor, ranks: torch.Tensor) -> AugmentedBasis:
    """Thin QR of ``[U_r, K_r]`` for every batch item (Algorithm 1, line "Ũ = qr([U, G V])").

    Args:
        U: (B, m, c) current bases, zero beyond each item's rank.
        K: (B, m, c) directions ``G_M V`` (zero beyond the rank because V is).
        ranks: (B,) int64 live ranks.

    Returns the augmented basis whose first ``r`` columns are exactly ``U_r`` and whose next ``min(r, m - r)`` columns
    are orthonormal, orthogonal to ``U_r``, and span the part of ``K_r`` outside ``span(U_r)``.  If ``K`` is rank
    deficient (zero gradient, gradient inside the span) the extra columns are still orthonormal; their coefficients
    come out as ~0.
    """
    B, m, cap = U.shape
    dt = compute_dtype(U.dtype)
    stacked = torch.cat([U.to(dt), K.to(dt)], dim=-1)  # (B, m, 2c)
    perm = _interleave_perm(ranks, cap)  # (B, 2c)
    stacked = torch.gather(stacked, 2, perm[:, None, :].expand(B, m, 2 * cap))
    Q, _ = torch.linalg.qr(stacked)  # (B, m, k)
    k = Q.shape[-1]
    is_old = column_mask(ranks, k)  # (B, k)
    is_new = column_mask(torch.clamp(2 * ranks, max=k), k) & ~is_old
    # keep the old basis exactly (Q's first r columns equal ±U up to rounding)
    U_pad = torch.nn.functional.pad(U.to(dt), (0, max(0, k - cap)))[..., :k]  # (B, m, k)
    basis = torch.where(is_old[:, None, :], U_pad, Q)
    return AugmentedBasis(basis, is_old, is_new)


def augmented_gradient(
    gS: torch.Tensor, K: torch.Tensor, L: torch.Tensor, Ub: AugmentedBasis, Vb: AugmentedBasis
) -> torch.Tensor:
    """The GeoLoRA gradient in augmented coordinates, (B, kU, kV)::

        [[U^T G V,  U^T G Ṽ],
         [Ũ^T G V,  0      ]]      (zero on the unused rows/columns)

    from the three one-backward directions only (``U^T G Ṽ = L^T Ṽ``, ``Ũ^T G V = Ũ^T K``).
    """
    dt = Ub.basis.dtype
    kU, kV = Ub.basis.shape[-1], Vb.basis.shape[-1]
    cap = K.shape[-1]
    top = L.to(dt).transpose(1, 2) @ Vb.basis  # (B, c, kV): rows = U columns
    left = Ub.basis.transpose(1, 2) @ K.to(dt)  # (B, kU, c): cols = V columns
    top = _fit(top, kU, kV)
    left = _fit(left, kU, kV)
    gS = _fit(gS.to(dt), kU, kV)
    row_old = Ub.is_old[:, :, None]
    col_old = Vb.is_old[:, None, :]
    row_new = Ub.is_new[:, :, None]
    col_new = Vb.is_new[:, None, :]
    out = torch.where(row_old & col_old, gS, torch.zeros((), dtype=dt, device=gS.device))
    out = torch.where(row_old & col_new, top, out)
    out = torch.where(row_new & col_old, left, out)
    del cap
    return out


def _fit(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad or crop the last two dims of ``x`` to (rows, cols)."""
    x = x[..., :rows, :cols]
    pr, pc = rows - x.shape[-2], cols - x.shape[-1]
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x


def pad_coefficients(S: torch.Tensor, kU: int, kV: int) -> torch.Tensor:
    """``S`` (B, c, c) placed in the top-left corner of a (B, kU, kV) matrix, in compute precision."""
    return _fit(S.to(compute_dtype(S.dtype)), kU, kV)


def augmented_coefficients(S: torch.Tensor, G_aug: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 (SGD): ``S_aug = [[S - λ U^T G V, -λ U^T G Ṽ], [-λ Ũ^T G V, 0]]``.

    Args:
        S: (B, c, c); G_aug: (B, kU, kV) from :func:`augmented_gradient`; lr: (B,) learning rates λ.
    """
    kU, kV = G_aug.shape[-2:]
    return pad_coefficients(S, kU, kV) - lr.to(G_aug.dtype)[:, None, None] * G_aug


def truncation_rank(
    sigma: torch.Tensor,
    tau: float,
    r_min: int | torch.Tensor,
    r_max: int | torch.Tensor,
    current: torch.Tensor | None = None,
) -> torch.Tensor:
    """Smallest k with ``||σ[k:]||_2 <= τ ||σ||_2``, clamped to ``[r_min, min(r_max, len(σ))]``.

    Vectorised over the batch: tail norms by a reversed cumulative sum, no host synchronisation.
    ``sigma``: (B, K) non-negative, non-increasing.  Returns (B,) int64.  Where all of σ is zero (S = 0 and a zero
    step, e.g. the first step of a linear warm-up with lr = 0) there is nothing to rank: the item keeps ``current``
    (its rank before the step) if given, instead of collapsing to ``r_min``.
    """
    dt = compute_dtype(sigma.dtype)
    sigma = sigma.to(dt)
    # the rule is scale invariant: normalise by σ_0 so squaring cannot overflow (huge λ) or underflow
    sq = (sigma / sigma[..., :1].clamp_min(torch.finfo(dt).tiny)) ** 2
    tail = torch.flip(torch.cumsum(torch.flip(sq, [-1]), -1), [-1])  # tail[k] = sum_{j>=k} σ_j²
    # numerically-zero values (rounding noise of the SVD) never count as rank, even with τ = 0
    floor = (sigma.shape[-1] * torch.finfo(dt).eps) ** 2
    threshold = max(tau * tau, floor) * tail[..., :1]
    ranks = (tail > threshold).sum(-1)
    if current is not None:
        ranks = torch.where(sigma[..., 0] > 0, ranks, current.to(ranks.dtype))
    hi = torch.as_tensor(r_max, device=sigma.device).clamp(max=sigma.shape[-1])
    lo = torch.as_tensor(r_min, device=sigma.device)
    return torch.maximum(torch.minimum(ranks, hi), torch.minimum(lo, hi)).to(torch.int64)


def budget_truncation_ranks(
    sigmas: Sequence[torch.Tensor],
    costs: Sequence[torch.Tensor],
    budget: float,
    r_min: Sequence[torch.Tensor],
    r_max: Sequence[torch.Tensor],
    cost_growth: float = 0.0,
) -> list[torch.Tensor]:
    """Global-budget truncation (the paper's budget variant): keep the largest singular values across all layers.

    Each layer keeps at least ``r_min`` values; further values are admitted in decreasing order of σ while the
    total cost stays within ``budget`` and each layer stays within ``r_max``; admission stops at the first value
    that does not fit.  The ``j``-th value of a layer (0-based) costs ``costs + cost_growth * j``, so a layer at
    rank ``k`` costs ``k * costs + cost_growth * k (k - 1) / 2`` in total.

    For a rank budget ``costs = 1``, ``cost_growth = 0``.  For a parameter budget ``costs = m + n + 1`` and
    ``cost_growth = 2``: rank ``k`` then costs ``k (m + n + k)``, exactly the ``U`` (m, k), ``V`` (n, k) and full
    ``S`` (k, k) that are kept and saved (going from rank ``k`` to ``k + 1`` adds ``m + n + 2k + 1``).

    Vectorised, no host synchronisation.

    Args:
        sigmas: per group, (B_g, K_g) singular values (non-increasing per row).
        costs: per group, (B_g,) or scalar cost of the first rank of that layer.
        budget: total cost allowed.
        r_min, r_max: per group, (B_g,) int64 bounds.
        cost_growth: how much each further rank of a layer costs more than the previous one.

    Returns per group (B_g,) int64 ranks.
    """
    device = sigmas[0].device
    Kmax = max(s.shape[-1] for s in sigmas)
    vals, cost_rows, lo_rows, hi_rows, sizes = [], [], [], [], []
    for s, c, lo, hi in zip(sigmas, costs, r_min, r_max):
        B, K = s.shape
        vals.append(torch.nn.functional.pad(s.to(torch.float64), (0, Kmax - K), value=-1.0))
        cost_rows.append(c.to(torch.float64).expand(B))
        hi_rows.append(torch.clamp(hi.expand(B), max=K))
        lo_rows.append(torch.minimum(lo.expand(B), hi_rows[-1]))
        sizes.append(B)
    val = torch.cat(vals)  # (N, Kmax)
    cost = torch.cat(cost_rows)  # (N,)
    lo = torch.cat(lo_rows)
    hi = torch.cat(hi_rows)
    N = val.shape[0]
    idx = torch.arange(Kmax, device=device)[None, :].expand(N, Kmax)
    # cost of the j-th value of each layer; within a layer σ is non-increasing and the sort below is stable, so a
    # layer's values are admitted in the order of j and each admitted value is charged its own (marginal) cost
    value_cost = cost[:, None] + float(cost_growth) * idx.to(torch.float64)  # (N, Kmax)
    forced = idx < lo[:, None]
    eligible = (idx < hi[:, None]) & ~forced & (val >= 0)
    remaining = budget - (value_cost * forced).sum()
    flat_val = torch.where(eligible, val, torch.full_like(val, -1.0)).flatten()
    flat_cost = value_cost.flatten()
    order = torch.argsort(flat_val, descending=True, stable=True)
    cum = torch.cumsum(flat_cost[order] * (flat_val[order] >= 0), 0)
    admitted_sorted = (cum <= remaining) & (flat_val[order] >= 0)
    # admit a prefix only: stop at the first value that does not fit
    admitted_sorted = torch.cumprod(admitted_sorted.to(torch.int64), 0).bool()
    admitted = torch.zeros_like(admitted_sorted)
    admitted[order] = admitted_sorted
    extra = admitted.view(N, Kmax).sum(-1)
    ranks = (lo + extra).to(torch.int64)
    return list(torch.split(ranks, sizes))


class Truncated(NamedTuple):
    U: torch.Tensor  # (B, m, c)
    S: torch.Tensor  # (B, c, c)
    V: torch.Tensor  # (B, n, c)
    P: torch.Tensor  # (B, kU, c) left singular vectors kept (zero beyond rank), for rotating optimizer state
    Q: torch.Tensor  # (B, kV, c)


def truncate(
    Ub: torch.Tensor, Vb: torch.Tensor, P: torch.Tensor, sigma: torch.Tensor, Qh: torch.Tensor, ranks: torch.Tensor,
    cap: int,
) -> Truncated:
    """``U <- Ub P[:, :r1]``, ``S <- diag(σ[:r1])``, ``V <- Vb Q[:, :r1]``, zero-padded to capacity ``cap``.

    Args:
        Ub: (B, m, kU), Vb: (B, n, kV) augmented bases; ``P, sigma, Qh`` the SVD of S_aug (``torch.linalg.svd``,
        ``full_matrices=False``); ranks: (B,) new ranks (<= cap).
    """
    mask = column_mask(ranks, cap).to(P.dtype)  # (B, c)
    Pk = _fit(P, P.shape[-2], cap) * mask[:, None, :]  # (B, kU, c)
    Qk = _fit(Qh.transpose(1, 2), Qh.shape[-1], cap) * mask[:, None, :]  # (B, kV, c)
    sig = torch.nn.functional.pad(sigma, (0, max(0, cap - sigma.shape[-1])))[..., :cap] * mask
    U = Ub @ Pk  # (B, m, c)
    V = Vb @ Qk  # (B, n, c)
    S = torch.diag_embed(sig)  # (B, c, c)
    return Truncated(U, S, V, Pk, Qk)


def reorthonormalize(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor, ranks: torch.Tensor):
    """QR both bases and absorb the triangular factors into S: ``U S V^T = Q_U (R_U S R_V^T) Q_V^T``.

    Columns beyond each rank stay zero.  Used periodically against floating-point drift.
    """
    dt = compute_dtype(U.dtype)
    cap = U.shape[-1]
    mask = column_mask(ranks, cap).to(dt)
    Qu, Ru = torch.linalg.qr(U.to(dt))
    Qv, Rv = torch.linalg.qr(V.to(dt))
    # fix signs so that R has a non-negative diagonal (keeps the basis close to the old one)
    su = torch.where(torch.diagonal(Ru, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(dt)
    sv = torch.where(torch.diagonal(Rv, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(dt)
    Qu, Ru = Qu * su[:, None, :], Ru * su[:, :, None]
    Qv, Rv = Qv * sv[:, None, :], Rv * sv[:, :, None]
    Qu = Qu * mask[:, None, :]
    Qv = Qv * mask[:, None, :]
    S_new = (Ru @ S.to(dt) @ Rv.transpose(1, 2)) * mask[:, :, None] * mask[:, None, :]
    return Qu, S_new, Qv


def orthonormality_error(U: torch.Tensor, rank: int) -> float:
    """max |U_r^T U_r - I| of one basis (for tests and diagnostics)."""
    Ur = U[:, :rank].double()
    return (Ur.T @ Ur - torch.eye(rank, dtype=torch.float64, device=U.device)).abs().max().item()
