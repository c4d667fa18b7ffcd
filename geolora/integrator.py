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
   ``[[U^T G V, U^T G Ṽ], [Ũ^T G V, 0]]``; the new coefficients are ``augmented_coefficients`` (SGD,
   ``pad(S) - λ * that``) or ``adam_coefficients`` (an Adam step on them, with the Adam ``Moments``).
3. ``truncation_rank`` / ``budget_truncation_ranks``: the new ranks from the singular values.
4. ``truncate``: ``U <- [U Ũ] P[:, :r1]``, ``S <- diag(σ[:r1])``, ``V <- [V Ṽ] Q[:, :r1]``; ``rotate_moments``
   carries the Adam moments into the new basis (``m <- P^T m Q``).

Between augmentations (``augment_every > 1``) the coefficient steps use the same functions with a
``fixed_basis`` (every live column old, no new directions) and ``G_aug = U^T G V``.

QR and SVD run in at least float32 whatever the input dtype; nothing divides by a singular value.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch

__all__ = [
    "AugmentedBasis",
    "Moments",
    "Scalars",
    "Truncated",
    "adam_coefficients",
    "augment_basis",
    "augmented_coefficients",
    "augmented_gradient",
    "budget_truncation_ranks",
    "column_mask",
    "compute_dtype",
    "fit_block",
    "fit_moments",
    "fixed_basis",
    "orthonormality_error",
    "pad_coefficients",
    "probe_directions",
    "reorthonormalize",
    "rotate_moments",
    "truncate",
    "truncation_rank",
    "zero_moments",
]

Scalars = Union[float, torch.Tensor]
"""A per-item scalar (λ, weight decay): one Python float for the whole batch, or a tensor of ``B`` values, shaped
``(B,)`` or ``(B, 1, 1)``."""


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
    """A basis with its columns marked old (coefficients with history) or new (the augmentation's directions)."""

    basis: torch.Tensor  # (B, m, k) = [U_r, Ũ, unused]; k = min(m, 2c)
    is_old: torch.Tensor  # (B, k) True on the first r columns (the old basis)
    is_new: torch.Tensor  # (B, k) True on the Ũ columns (r .. 2r)


def fixed_basis(basis: torch.Tensor, live: torch.Tensor) -> AugmentedBasis:
    """A basis with no new directions: every live column is old (the coefficient steps inside an interval).

    Args:
        basis: (B, m, k); live: (B, k) boolean, True on each item's live columns (e.g. :func:`column_mask`).
    """
    return AugmentedBasis(basis, live, torch.zeros_like(live))


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
    top = L.to(dt).transpose(1, 2) @ Vb.basis  # (B, c, kV): rows = U columns
    left = Ub.basis.transpose(1, 2) @ K.to(dt)  # (B, kU, c): cols = V columns
    top = fit_block(top, kU, kV)
    left = fit_block(left, kU, kV)
    gS = fit_block(gS.to(dt), kU, kV)
    row_old = Ub.is_old[:, :, None]
    col_old = Vb.is_old[:, None, :]
    row_new = Ub.is_new[:, :, None]
    col_new = Vb.is_new[:, None, :]
    out = torch.where(row_old & col_old, gS, torch.zeros((), dtype=dt, device=gS.device))
    out = torch.where(row_old & col_new, top, out)
    out = torch.where(row_new & col_old, left, out)
    return out


def fit_block(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Zero-pad or crop the last two dims of ``x`` to (rows, cols) (the top-left block is kept)."""
    x = x[..., :rows, :cols]
    pr, pc = rows - x.shape[-2], cols - x.shape[-1]
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x


def pad_coefficients(S: torch.Tensor, kU: int, kV: int) -> torch.Tensor:
    """``S`` (B, c, c) placed in the top-left corner of a (B, kU, kV) matrix, in compute precision."""
    return fit_block(S.to(compute_dtype(S.dtype)), kU, kV)


def _per_item(x: Scalars, dtype: torch.dtype) -> Scalars:
    """A Python float as it is; a tensor of B values as (B, 1, 1) in ``dtype`` (broadcasts over an item's matrix)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype).reshape(-1, 1, 1)
    return x


def augmented_coefficients(S: torch.Tensor, G_aug: torch.Tensor, lr: Scalars) -> torch.Tensor:
    """Algorithm 1 (SGD): ``S_aug = [[S - λ U^T G V, -λ U^T G Ṽ], [-λ Ũ^T G V, 0]]``.

    With a :func:`fixed_basis` (a coefficient step inside an interval) ``G_aug`` is ``U^T G V`` and this is
    ``S - λ U^T G V``.

    Args:
        S: (B, c, c) coefficients (zero beyond each item's rank).
        G_aug: (B, kU, kV) from :func:`augmented_gradient`, in compute precision.
        lr: learning rates λ (see :data:`Scalars`).

    Returns (B, kU, kV) in ``G_aug``'s dtype.
    """
    kU, kV = G_aug.shape[-2:]
    return pad_coefficients(S, kU, kV) - _per_item(lr, G_aug.dtype) * G_aug


class Moments(NamedTuple):
    """Adam moments of the coefficients of a batch of layers, in the coordinates of their current bases."""

    exp_avg: torch.Tensor  # (B, rows, cols) first moment m
    exp_avg_sq: torch.Tensor  # (B, rows, cols) second moment v (non-negative)
    step: torch.Tensor  # (B,) float, Adam steps taken (for the bias correction)


def zero_moments(batch: int, rows: int, cols: int, dtype: torch.dtype, device=None) -> Moments:
    """Fresh moments: ``m = v = 0``, no steps taken."""
    zeros = torch.zeros(batch, rows, cols, dtype=dtype, device=device)
    return Moments(zeros, zeros.clone(), torch.zeros(batch, dtype=dtype, device=device))


def fit_moments(moments: Moments, rows: int, cols: int) -> Moments:
    """The moments zero-padded or cropped to (rows, cols) (see :func:`fit_block`); the step count is unchanged."""
    return Moments(fit_block(moments.exp_avg, rows, cols), fit_block(moments.exp_avg_sq, rows, cols), moments.step)


def adam_coefficients(
    S: torch.Tensor,
    G_aug: torch.Tensor,
    Ub: AugmentedBasis,
    Vb: AugmentedBasis,
    moments: Moments,
    lr: Scalars,
    weight_decay: Scalars = 0.0,
    *,
    betas: tuple[float, float],
    eps: float,
    capacity: int,
    per_layer: bool = False,
    plain_new: bool = False,
    history: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Moments]:
    """Adam on S in the augmented coordinates (``s_update="adam"``, or ``"adam_layer"`` with ``per_layer``).

    Moments live in the (U, V) coordinates of the current basis; entries of the old block (old rows and old columns,
    or the first ``history`` of each) have history and take a bias-corrected Adam step.  Entries of the new
    directions (the blocks ``U^T G Ṽ`` and ``Ũ^T G V``) have no history: they take one preconditioned step
    ``g / sqrt(max(v̄, g²))`` with ``v̄`` the mean bias-corrected second moment of the item's old block (0 without
    one), so a new direction enters with a size that reflects how strong its gradient is relative to the layer's
    usual gradients, capped at Adam's unit step (plain Adam would give every new entry the same size ``lr`` and make
    the truncation unable to tell strong directions from noise).  Their moments start there (``m̂ = g``,
    ``v̂ = max(v̄, g²)``).  Decoupled weight decay (AdamW): ``S <- S (1 - λ wd)`` before the step.  After a
    truncation, :func:`rotate_moments` carries the moments into the new basis.

    Args:
        S: (B, c, c) coefficients.
        G_aug: (B, kU, kV) the gradient in augmented coordinates (:func:`augmented_gradient`; ``U^T G V`` with a
            :func:`fixed_basis`), in compute precision.
        Ub, Vb: the augmented (or fixed) bases, whose ``is_old`` / ``is_new`` masks say which entries have history.
        moments: the item's moments, any (rows, cols) (padded or cropped to (kU, kV) here), in ``G_aug``'s dtype.
        lr, weight_decay: λ and the weight decay (see :data:`Scalars`).
        betas, eps: Adam's ``(β1, β2)`` and ε.
        capacity: the layers' capacity ``c``: ``per_layer``'s second moment is the sum over the live entries divided
            by it.
        per_layer: one second moment per layer (``"adam_layer"``) instead of one per entry.
        plain_new: new entries start as fresh Adam entries (first step ``λ sign(g)``), and those whose gradient is
            rounding noise relative to the item's largest stay 0 (the interval augmentation).
        history: (B,) ranks whose coefficients have moments, when fewer than the bases' old columns (probe
            directions are old columns of the widened basis but new coefficients).

    Returns ``(S_aug (B, kU, kV), the updated moments (B, kU, kV), step + 1)``.
    """
    beta1, beta2 = betas
    dt, device = G_aug.dtype, G_aug.device
    kU, kV = G_aug.shape[-2:]
    m, v = (x.to(device=device, dtype=dt) for x in moments[:2])
    t = moments.step.to(device=device, dtype=dt) + 1
    lr, weight_decay = _per_item(lr, dt), _per_item(weight_decay, dt)
    if history is None:
        old = Ub.is_old[:, :, None] & Vb.is_old[:, None, :]
    else:
        old = column_mask(history, kU)[:, :, None] & column_mask(history, kV)[:, None, :]
    zero = G_aug.new_zeros(())
    bc1 = (1 - beta1**t)[:, None, None]
    bc2 = (1 - beta2**t)[:, None, None]
    m = torch.where(old, fit_block(m, kU, kV), zero).lerp_(G_aug, 1 - beta1)  # β1 m + (1 - β1) g on the old block
    v = torch.where(old, fit_block(v, kU, kV), zero).mul_(beta2).add_(G_aug * G_aug, alpha=1 - beta2)
    oldf = old.to(dt)
    v_bar = (v * oldf).sum((-2, -1), keepdim=True) / oldf.sum((-2, -1), keepdim=True).clamp_min(1.0)
    m = torch.where(old, m, G_aug * bc1)  # new entries: m̂ = g
    # new entries: v̂ = max(v̄, g²): a step g / sqrt(v̄) for directions weaker than the layer's typical gradient,
    # capped at Adam's unit step for stronger ones (v̄ can be tiny right after S = 0)
    if plain_new:  # interval augmentation: a new entry starts as a fresh Adam entry (first step lr * sign(g))
        # ... unless its gradient is rounding noise (e.g. the arbitrary extra columns QR returns for a
        # rank-deficient K): Adam would blow noise up to a full step; those entries stay 0 (m = v = 0)
        peak = G_aug.abs().amax((-2, -1), keepdim=True)
        noise = G_aug.abs() <= max(1e-5, 100 * torch.finfo(dt).eps) * peak
        new_noise = ~old & noise
        m = torch.where(new_noise, zero, m)
        v = torch.where(old, v, torch.where(new_noise, zero, G_aug * G_aug * bc2))
    else:
        v = torch.where(old, v, torch.maximum(v_bar.expand_as(v), G_aug * G_aug * bc2))
    if per_layer:
        # one second moment per layer: the mean over its coefficients that have a gradient (old block and the
        # new off-diagonal blocks), so each coefficient moves in proportion to its momentum and the singular
        # values keep ranking the directions by importance (per-entry Adam moves every entry by ~lr per step,
        # which flattens the spectrum and leaves the truncation nothing to cut)
        rows = Ub.is_old | Ub.is_new
        cols = Vb.is_old | Vb.is_new
        live = (rows[:, :, None] & cols[:, None, :]) & ~(Ub.is_new[:, :, None] & Vb.is_new[:, None, :])
        livef = live.to(v.dtype)
        # normalised by the capacity, not the live count: a mean over the live entries would shrink as the rank
        # grows (the new entries' gradients are small) and so enlarge the steps of every entry, the strong ones too
        v_layer = (v * livef).sum((-2, -1), keepdim=True) / float(capacity)
        direction = (m / bc1) / ((v_layer / bc2).sqrt() + eps) * livef
    else:
        direction = (m / bc1) / ((v / bc2).sqrt_() + eps)
    S_pad = pad_coefficients(S, kU, kV) * (1 - lr * weight_decay)
    return S_pad - lr * direction, Moments(m, v, t)


def rotate_moments(moments: Moments, P: torch.Tensor, Q: torch.Tensor) -> Moments:
    """Adam moments carried into the basis ``U_new = Ub P``, ``V_new = Vb Q`` (after :func:`truncate`).

    ``m <- P^T m Q`` (the first moment as a matrix in weight space, ``Ub m Vb^T``, is kept wherever ``P``, ``Q``
    span the basis) and ``v <- (P∘P)^T v (Q∘Q)`` (squared weights: ``v`` stays non-negative, and exact for a
    signed permutation); columns of ``P``, ``Q`` that are zero (beyond the new rank) give zero moments.

    Args:
        moments: (B, kU, kV) in the coordinates of ``Ub``, ``Vb``.
        P: (B, kU, c), Q: (B, kV, c) e.g. :class:`Truncated`'s ``P``, ``Q``.

    Returns (B, c, c) moments; the step count is unchanged.
    """
    m, v, t = moments
    return Moments(P.transpose(1, 2) @ m @ Q, (P * P).transpose(1, 2) @ v @ (Q * Q), t)


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
    """The factors after a truncation, and the rotations that map the augmented coordinates to the new ones."""

    U: torch.Tensor  # (B, m, c)
    S: torch.Tensor  # (B, c, c)
    V: torch.Tensor  # (B, n, c)
    P: torch.Tensor  # (B, kU, c) left singular vectors kept (zero beyond rank), for rotating optimizer state
    Q: torch.Tensor  # (B, kV, c)


def truncate(
    Ub: torch.Tensor,
    Vb: torch.Tensor,
    P: torch.Tensor,
    sigma: torch.Tensor,
    Qh: torch.Tensor,
    ranks: torch.Tensor,
    cap: int,
) -> Truncated:
    """``U <- Ub P[:, :r1]``, ``S <- diag(σ[:r1])``, ``V <- Vb Q[:, :r1]``, zero-padded to capacity ``cap``.

    Args:
        Ub: (B, m, kU), Vb: (B, n, kV) augmented bases; ``P, sigma, Qh`` the SVD of S_aug (``torch.linalg.svd``,
        ``full_matrices=False``); ranks: (B,) new ranks (<= cap).
    """
    mask = column_mask(ranks, cap).to(P.dtype)  # (B, c)
    Pk = fit_block(P, P.shape[-2], cap) * mask[:, None, :]  # (B, kU, c)
    Qk = fit_block(Qh.transpose(1, 2), Qh.shape[-1], cap) * mask[:, None, :]  # (B, kV, c)
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
