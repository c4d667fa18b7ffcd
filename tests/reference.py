"""Independent float64 reference of one GeoLoRA step (Algorithm 1, SGD, of Schotthöfer et al., ICLR 2025), written
from the paper's algorithm only.

Dense and per layer, no batching, no capacity padding: used to check geolora's batched implementation.
"""

from __future__ import annotations

import torch


def reference_step(U, S, V, G_M, lr, tau, r_min, r_max):
    """One step on float64 tensors. U (m, r), S (r, r), V (n, r), G_M = dL/dM (m, n). Returns U, S, V, rank."""
    r = U.shape[1]
    K = G_M @ V  # (m, r)
    L = G_M.T @ U  # (n, r)
    S1 = S - lr * (U.T @ G_M @ V)
    Qu, _ = torch.linalg.qr(torch.cat([U, K], 1))
    Qv, _ = torch.linalg.qr(torch.cat([V, L], 1))
    Ut, Vt = Qu[:, r:], Qv[:, r:]
    top = torch.cat([S1, -lr * (U.T @ G_M @ Vt)], 1)
    bottom = torch.cat([-lr * (Ut.T @ G_M @ V), torch.zeros(Ut.shape[1], Vt.shape[1], dtype=U.dtype)], 1)
    S_aug = torch.cat([top, bottom], 0)
    P, sig, Qh = torch.linalg.svd(S_aug)
    total = sig.norm()
    r1 = len(sig)
    for k in range(len(sig) + 1):
        if sig[k:].norm() <= tau * total:
            r1 = k
            break
    r1 = max(min(r1, r_max, len(sig)), min(r_min, len(sig)))
    U1 = torch.cat([U, Ut], 1) @ P[:, :r1]
    V1 = torch.cat([V, Vt], 1) @ Qh.T[:, :r1]
    return U1, torch.diag(sig[:r1]), V1, r1


def basis_free_step(U, S, V, G_M, lr, tau, r_min, r_max):
    """M_new = best rank-r1 approximation of M - lr (P_U G P_[V Ṽ] + P_Ũ G P_V): the same step written without
    bases (P_X = X X^T; ``[U Ũ] S_aug [V Ṽ]^T`` equals that matrix, so its truncated SVD is the step's result)."""
    r = U.shape[1]
    Qu, _ = torch.linalg.qr(torch.cat([U, G_M @ V], 1))
    Qv, _ = torch.linalg.qr(torch.cat([V, G_M.T @ U], 1))
    Ut, Vt = Qu[:, r:], Qv[:, r:]
    PU, PUt = U @ U.T, Ut @ Ut.T
    PV, PVVt = V @ V.T, torch.cat([V, Vt], 1) @ torch.cat([V, Vt], 1).T
    M_aug = U @ S @ V.T - lr * (PU @ G_M @ PVVt + PUt @ G_M @ PV)
    Pm, sig, Qm = torch.linalg.svd(M_aug)
    _, _, _, r1 = reference_step(U, S, V, G_M, lr, tau, r_min, r_max)
    return Pm[:, :r1] @ torch.diag(sig[:r1]) @ Qm[:r1], r1
