"""HiPPO transition matrices, their normal-plus-low-rank (NPLR) form and diagonal inits.

The matrices and their derivation are in docs/hippo.md; how S4 uses the NPLR forms is in
docs/s4.md ("NPLR forms per measure").

Convention: `x' = A x + B u` for the translated measures ("legt", "lagt", "fout") and
`x' = (A x + B u) / t` for the scaled Legendre measure ("legs"). Everything is built in float64
(complex128 for the NPLR eigenbasis); callers cast down.

- `transition(measure, N)` -> `(A, B)` as written in docs/hippo.md.
- `rank_correction(measure, N)` -> `P (rank, N)` with `A + P^T P` normal (`min_rank(measure)` rows).
- `nplr(measure, N)` -> `(Lambda, P, B, V)`: `A = V (diag(Lambda) - P^T conj(P)) V^*` in the
  eigenbasis of the normal part, optionally keeping one member of each conjugate pair.
- `diag_init(init, N)` -> the `N // 2` diagonal (S4D) eigenvalues.
- `transition_matvec(measure, x)` -> `A @ x` in O(N) for LegS/LegT (cumulative-sum form).

Note on "fout": it is the matrix of docs/hippo.md (and of S4). Its rotation frequency of pair k
is `pi*k`, i.e. a Fourier basis on a window of length 2, but its endpoint terms (`b b^T`, `b`)
are twice those of the exact projection onto that window, so it is not an exact projection;
`ssm.approx.basis("fout")` reads it out with the window-2 Fourier basis, which is approximate.
"""
from __future__ import annotations

import math

import torch

MEASURES = ("legt", "legs", "lagt", "fout")
DIAG_INITS = ("lin", "inv", "legs", "real")
_RANK = {"legs": 1, "legt": 2, "lagt": 1, "fout": 1}
_F64 = torch.float64


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")


def _check_n(N: int, *, name: str = "N") -> None:
    if isinstance(N, bool) or not isinstance(N, int) or N < 1:
        raise ValueError(f"{name} must be a positive int, got {N!r}")


def _fout_b(N: int) -> torch.Tensor:
    b = torch.zeros(N, dtype=_F64)  # (N,)
    b[0::2] = math.sqrt(2.0)
    b[0] = 1.0
    return b


def transition(measure: str, N: int, *, theta: float = 1.0, beta: float = 1.0):
    """HiPPO `(A (N, N), B (N,))` in float64 (docs/hippo.md).

    theta: window length, used by "legt" (divides A and B). beta: input scale of "lagt".
    Both are ignored by the other measures.
    """
    _check_measure(measure)
    _check_n(N)
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    n = torch.arange(N, dtype=_F64)  # (N,)
    R = torch.sqrt(2 * n + 1)  # (N,)
    row, col = n[:, None], n[None, :]
    if measure == "legt":
        sign = torch.where(col < row, torch.ones_like(row * col), (-1.0) ** (row - col))  # (N, N)
        A = -(R[:, None] * R[None, :]) * sign / theta  # (N, N)
        B = R / theta  # (N,)
    elif measure == "legs":
        A = torch.where(row > col, -(R[:, None] * R[None, :]), torch.zeros(N, N, dtype=_F64))  # (N, N)
        A = A - torch.diag(n + 1)
        B = R.clone()  # (N,)
    elif measure == "lagt":
        A = torch.eye(N, dtype=_F64) / 2 - torch.tril(torch.ones(N, N, dtype=_F64))  # (N, N)
        B = beta * torch.ones(N, dtype=_F64)  # (N,)
    else:  # fout
        d = torch.zeros(max(N - 1, 0), dtype=_F64)  # (N-1,)
        d[1::2] = torch.arange(1, d[1::2].numel() + 1, dtype=_F64)  # d[2k-1] = k
        b = _fout_b(N)  # (N,)
        A = math.pi * (torch.diag(d, -1) - torch.diag(d, 1)) - b[:, None] * b[None, :]  # (N, N)
        B = b
    return A, B


def min_rank(measure: str) -> int:
    """Rank of the low-rank term of the measure's NPLR form (LegT: 2, the others: 1)."""
    _check_measure(measure)
    return _RANK[measure]


def rank_correction(measure: str, N: int) -> torch.Tensor:
    """Low-rank `P (rank, N)` float64 such that `A + P^T P` is normal (theta = 1)."""
    _check_measure(measure)
    _check_n(N)
    n = torch.arange(N, dtype=_F64)  # (N,)
    if measure == "legs":
        return torch.sqrt(n + 0.5)[None, :]  # (1, N)
    if measure == "legt":
        R = torch.sqrt(2 * n + 1)  # (N,)
        P = torch.zeros(2, N, dtype=_F64)  # (2, N)
        P[0, 0::2] = R[0::2]
        P[1, 1::2] = R[1::2]
        return P
    if measure == "lagt":
        return torch.full((1, N), math.sqrt(0.5), dtype=_F64)  # (1, N)
    return _fout_b(N)[None, :]  # (1, N)


def _real_basis(W: torch.Tensor, tol: float) -> torch.Tensor:
    """Orthonormal real basis (N, z) of the span of the complex columns W (N, z) of a real
    matrix's eigenspace (the span is closed under conjugation)."""
    if W.shape[1] == 0:
        return W.real
    M = torch.cat([W.real, W.imag], dim=1)  # (N, 2z)
    U, s, _ = torch.linalg.svd(M, full_matrices=False)
    return U[:, : int((s > tol * max(1.0, float(s.max()))).sum())]  # (N, z)


def nplr(measure: str, N: int, *, half: bool = True):
    """Normal-plus-low-rank form of HiPPO `A` (theta = beta = 1), complex128 (docs/hippo.md).

    Returns `(Lambda, P, B, V)` with `A = V (diag(Lambda) - P^T conj(P)) V^*` and `B_orig = V B`
    when half=False (shapes (N,), (rank, N), (N,), (N, N); any N). With half=True (N even) only one
    member of each conjugate pair is kept, shapes (N//2,), (rank, N//2), (N//2,), (N, N//2), ordered
    by increasing imaginary part (>= 0); the identities hold with `[X, conj X]` concatenations.
    """
    _check_measure(measure)
    _check_n(N)
    if half and N % 2:
        raise ValueError(f"nplr(half=True) needs an even N (conjugate pairs), got N={N}; use half=False")
    A, B = transition(measure, N)
    P = rank_correction(measure, N)  # (rank, N)
    M = A + P.T @ P  # (N, N) normal: c*I + skew
    c = float(torch.diagonal(M).mean())
    S = (M - M.T) / 2  # (N, N)
    sym_err = float((M - S - c * torch.eye(N, dtype=_F64)).abs().max())
    if sym_err > 1e-8 * max(1.0, float(M.abs().max())):
        raise RuntimeError(f"{measure}: A + P^T P is not c*I + skew (error {sym_err:.2e})")
    # S v = i*nu v  <=>  (iS) v = -nu v; eigh of the Hermitian iS is accurate in float64.
    mu, V = torch.linalg.eigh(1j * S.to(torch.complex128))  # (N,), (N, N)
    if half:
        tol = 1e-9 * max(1.0, float(mu.abs().max()))
        keep = mu < -tol  # Im(Lambda) = -mu > 0
        V_pos = V[:, keep]  # (N, npos)
        lam_pos = c - 1j * mu[keep].to(torch.complex128)  # (npos,)
        zero = mu.abs() <= tol
        Z = _real_basis(V[:, zero], 1e-8)  # (N, nz) real, nz even
        if Z.shape[1] % 2 or 2 * V_pos.shape[1] + Z.shape[1] != N:
            raise RuntimeError(f"{measure}: cannot pair the eigenvalues of N={N} into conjugates")
        V_zero = (Z[:, 0::2] + 1j * Z[:, 1::2]) / math.sqrt(2)  # (N, nz/2)
        lam_zero = torch.full((V_zero.shape[1],), c, dtype=torch.complex128)
        V = torch.cat([V_zero, V_pos], dim=1)  # (N, N//2)
        Lambda = torch.cat([lam_zero, lam_pos])  # (N//2,)
        order = torch.argsort(Lambda.imag, stable=True)
        V, Lambda = V[:, order], Lambda[order]
    else:
        Lambda = c - 1j * mu.to(torch.complex128)  # (N,)
    P_out = P.to(torch.complex128) @ V.conj()  # (rank, N') : the columns of V^* P^T
    B_out = V.conj().T @ B.to(torch.complex128)  # (N',)
    return Lambda, P_out, B_out, V


def diag_init(init: str, N: int) -> torch.Tensor:
    """Diagonal (S4D) eigenvalues, `N // 2` values complex128 (docs/hippo.md); N must be even."""
    if init not in DIAG_INITS:
        raise ValueError(f"init must be one of {DIAG_INITS}, got {init!r}")
    _check_n(N)
    if N % 2:
        raise ValueError(f"diag_init needs an even N (N//2 conjugate pairs), got N={N}")
    n = torch.arange(N // 2, dtype=_F64)  # (N//2,)
    if init == "lin":
        return torch.complex(torch.full_like(n, -0.5), math.pi * n)
    if init == "inv":
        return torch.complex(torch.full_like(n, -0.5), (N / math.pi) * (N / (2 * n + 1) - 1))
    if init == "real":
        return torch.complex(-(n + 1), torch.zeros_like(n))
    return nplr("legs", N, half=True)[0]


def transition_matvec(measure: str, x: torch.Tensor, *, theta: float = 1.0) -> torch.Tensor:
    """`A @ x` for x (..., N) in O(N) per vector for "legs" / "legt" (docs/hippo.md, structure).

    LegS: `A = diag(n) - tril(R R^T)`, so `A x = n*x - R * cumsum(R*x)`.
    LegT: `A[n,k] = -(R_n R_k / theta) * (1 if k < n else (-1)^n (-1)^k)`, an exclusive prefix sum
    plus a sign-weighted suffix sum. `R = sqrt(2n+1)`.
    """
    if measure not in ("legs", "legt"):
        raise ValueError(f"transition_matvec supports measure 'legs' or 'legt', got {measure!r}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"x must have shape (..., N) with N >= 1, got {tuple(x.shape)}")
    N = x.shape[-1]
    n = torch.arange(N, device=x.device, dtype=x.real.dtype)  # (N,)
    R = torch.sqrt(2 * n + 1)  # (N,)
    Rx = R * x  # (..., N)
    if measure == "legs":
        return n * x - R * torch.cumsum(Rx, dim=-1)  # (..., N)
    sgn = 1.0 - 2.0 * (n % 2)  # (-1)^n
    prefix = torch.cumsum(Rx, dim=-1) - Rx  # (..., N) sum_{k<n}
    suffix = torch.flip(torch.cumsum(torch.flip(sgn * Rx, (-1,)), dim=-1), (-1,))  # sum_{k>=n}
    return -(R / theta) * (prefix + sgn * suffix)  # (..., N)
