"""Float64 ground truth for an `S4` layer, built from its raw parameters without the layer's code.

Everything here is written out independently of `ssm.layers.s4`, `ssm.filters` and
`ssm.discretize`: the shared copies of (Lambda, B, P) are tiled by hand, dt is mapped by its own
formula, the dense full (conjugate-symmetric) system is discretized by a matrix exponential (ZOH)
or a linear solve (bilinear), and the filter / outputs come from explicit powers and the plain
recurrence `x_k = Ab x_{k-1} + Bb u_k`, `y_k = C x_k + D u_k` in complex128.
"""
from __future__ import annotations

import torch

C128 = torch.complex128


def params64(m):
    """(Lambda (H, N2), B (H, N2), P (r, H, N2) or None, C (c', H, N2), D (c, H), dt (H,)), 64-bit."""
    H, p = m.d_model, m.ssm
    copy = torch.arange(H) % p.log_neg_real.shape[0]                 # channel h uses copy h % n_ssm
    Lam = torch.complex(-torch.exp(p.log_neg_real.double()), p.imag.double())[copy]
    B = torch.view_as_complex(p.B.double())[copy]
    P = torch.view_as_complex(p.P.double())[:, copy] if m.mode == "dplr" else None
    C = torch.view_as_complex(p.C.double())
    raw = p.log_dt.double()
    dt = torch.exp(raw) if m.dt_transform == "exp" else torch.log1p(torch.exp(raw))
    return Lam, B, P, C, m.D.double(), dt


def full_system(Lam, B, P):
    """The N-dim conjugate-symmetric system per channel: A (H, N, N), B (H, N)."""
    A = torch.diag_embed(torch.cat([Lam, Lam.conj()], -1))           # (H, N, N)
    if P is not None:
        Pf = torch.cat([P, P.conj()], -1)                              # (r, H, N)
        A = A - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    return A, torch.cat([B, B.conj()], -1)


def discretize64(A, B, dt, method):
    """Ab (H, N, N), Bb (H, N): ZOH by one matrix exponential of [[A, B], [0, 0]] dt, or bilinear."""
    H, N, _ = A.shape
    dtc = dt.to(C128)[:, None, None]
    if method == "zoh":
        M = torch.zeros(H, N + 1, N + 1, dtype=C128)
        M[:, :N, :N], M[:, :N, N] = A * dtc, B * dtc[..., 0]
        E = torch.linalg.matrix_exp(M)
        return E[:, :N, :N], E[:, :N, N]
    eye = torch.eye(N, dtype=C128)
    lhs = eye - dtc / 2 * A
    return torch.linalg.solve(lhs, eye + dtc / 2 * A), torch.linalg.solve(lhs, dtc[..., 0] * B)


def system64(m, rate: float = 1.0):
    """(Ab, Bb, C (c', H, N)) of the layer's recurrence at step dt * rate, complex128."""
    Lam, B, P, C, _, dt = params64(m)
    A, Bf = full_system(Lam, B, P)
    method = m.discretization or ("zoh" if m.mode == "diag" else "bilinear")
    Ab, Bb = discretize64(A, Bf, dt * rate, method)
    Cf = torch.cat([C, C.conj()], -1)                                  # (c', H, N)
    if m.mode == "dplr":                                               # learned Ct = C (I - Ab0^l_max)
        Ab0, _ = discretize64(A, Bf, dt, "bilinear")
        M = torch.eye(A.shape[-1], dtype=C128) - torch.linalg.matrix_power(Ab0, int(m.l_max))
        Cf = torch.linalg.solve(M.transpose(-1, -2), Cf.unsqueeze(-1)).squeeze(-1)
    return Ab, Bb, Cf


def filter64(m, L: int, rate: float = 1.0) -> torch.Tensor:
    """K (c', H, L) float64 by explicit powers `K_l = C Ab^l Bb`."""
    Ab, x, Cf = system64(m, rate)
    rows = []
    for _ in range(L):
        rows.append(torch.einsum("chn,hn->ch", Cf, x).real)
        x = torch.einsum("hnm,hm->hn", Ab, x)
    return torch.stack(rows, -1)


def ssm_outputs64(m, x: torch.Tensor, rate: float = 1.0) -> torch.Tensor:
    """The SSM part (before activation and output projection) for x (B, L, H): (B, L, c*H) float64,
    by the plain recurrence from a zero state (causal layers only)."""
    Ab, Bb, Cf = system64(m, rate)
    _, _, _, _, D, _ = params64(m)
    u = x.double()
    s = torch.zeros(u.shape[0], *Bb.shape, dtype=C128)                 # (B, H, N)
    ys = []
    for t in range(u.shape[1]):
        s = torch.einsum("hnm,bhm->bhn", Ab, s) + Bb * u[:, t, :, None]
        y = torch.einsum("chn,bhn->bch", Cf, s).real + D * u[:, t, None, :]   # (B, c, H)
        ys.append(y.reshape(y.shape[0], -1))
    return torch.stack(ys, 1)                                          # (B, L, c*H)


def layer_params(m):
    """(Lambda (H, N2), B (H, N2), C (c', H, N2), P (r, H, N2) or None, dt (H,)) of an `S4` layer's
    SSM in its compute precision; for mode="dplr" C is the learned Ct (it belongs to `l_max`)."""
    p = m.ssm
    if m.mode == "dplr":
        Lam, P, B, Ct, dt = p.params()
        return Lam, B, Ct, P, dt
    real = p.real_dtype
    Lam = p.per_channel(torch.complex(-torch.exp(p.log_neg_real.to(real)), p.imag.to(real)))
    return Lam, p.per_channel(p.complex_param("B")), p.complex_param("C"), None, p.dt()


def param(m, name: str) -> torch.Tensor:
    """A parameter of an `S4` layer by its name: `D` lives on the layer, the rest on `m.ssm`."""
    return m.D if name == "D" else getattr(m.ssm, name)


def l_max_kw(mode: str, n: int) -> dict:
    """`{"l_max": n}` for mode="dplr" (its Ct belongs to a length); mode="diag" refuses l_max."""
    return {"l_max": n} if mode == "dplr" else {}


def legs_public(N: int, b_clip: float | None = 2.0):
    """LegS in the eigenbasis of its normal part, from the definition alone (numpy, float64):
    `A_nk = -sqrt(2n+1) sqrt(2k+1)` (n > k), `-(n+1)` (n = k); `B_n = sqrt(2n+1)`;
    `P_n = sqrt(n + 1/2)`; `A + P P^T = -I/2 + skew`; eigenvectors V of the skew part, one per
    conjugate pair (Im(Lambda) > 0, increasing); returns (Lambda, V^* P, clip(V^* B)) as complex128
    tensors of shape (N/2,), Im(B) clipped to [-b_clip, b_clip]. Eigenvectors are defined up to a
    unit factor per mode: compare through `mode_signs`."""
    import numpy as np

    n = np.arange(N)
    r = np.sqrt(2 * n + 1)
    A = -np.tril(np.outer(r, r), -1) - np.diag(n + 1.0)
    P = np.sqrt(n + 0.5)
    skew = A + np.outer(P, P) + 0.5 * np.eye(N)
    mu, V = np.linalg.eigh(1j * skew)                                  # skew v = -i mu v
    lam = -0.5 - 1j * mu
    keep = np.argsort(np.where(lam.imag > 0, lam.imag, np.inf))[: N // 2]
    V, lam = V[:, keep], lam[keep]
    B = V.conj().T @ r
    if b_clip is not None:
        B = B.real + 1j * np.clip(B.imag, -b_clip, b_clip)
    return tuple(torch.from_numpy(np.ascontiguousarray(t)) for t in (lam, V.conj().T @ P, B))


def mode_signs(got_B: torch.Tensor, want_B: torch.Tensor) -> torch.Tensor:
    """Per-mode factor u with `got = u * want` read off Re(B) (unaffected by the Im clip)."""
    return torch.sign(got_B.real.detach().double() / want_B.real)
