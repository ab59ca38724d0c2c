"""From SSM parameters to the convolution filter `K_l = C Ab^l Bb` (docs/s4.md, "Filters").

The discretization itself lives in `ssm.discretize` (docs/discretization.md); this module only
adds what is specific to filters.
- Diagonal SSM (S4D): elementwise ZOH or bilinear discretization (`ssm.discretize.discretize_diag`
  with the pole as a logarithm, for the Vandermonde product), then one Vandermonde product
  `K = 2 Re sum_n (C_n Bb_n) z_n^l` (`kernels.vandermonde_mult`). N/2 complex modes stand for the N-dim
  real system (conjugate pairs).
- DPLR SSM (S4): `A = Lambda - P P^*` in the eigenbasis, bilinear, learned `Ct = C (I - Ab^L)`.
  The truncated generating function at the non-negative DFT frequencies is a Woodbury combination
  of Cauchy products (`kernels.cauchy_mult`, symmetric form = the full conjugate-symmetric N-dim
  system), and `K = irfft(Khat, L)`. The Nyquist point z = -1 (where g(z) is infinite) is taken
  from its limit `Khat(-1) = (dt/2) Ct B`.
- The dense full system (`Ab`, `Bb` as N x N / N complex, bilinear through
  `ssm.discretize.discretize`) for step mode and state passing, and
  the conversion between `C` and `Ct` for another length or step size. Dense work runs in
  complex128 (it is O(H N^3), independent of L) and is cast back.

Shapes: H channels, N2 = N/2 modes, c output channels, r low-rank terms; dt is (H,).
"""
from __future__ import annotations

import math

import torch
from torch.autograd.function import once_differentiable

import kernels
from ssm.discretize import discretize, discretize_diag

DIAG_METHODS = ("zoh", "bilinear")


def diag_discretize(Lambda: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh"):
    """Elementwise discretization of a diagonal SSM -> (log_z, Bb), both (H, N2) complex.

    log_z is a logarithm of the discrete pole z = Ab (exact `dt*Lambda` for ZOH), so that
    `exp(log_z * l) = z^l` for every integer l. dt (H,) must be positive (not checked here).
    """
    if method not in DIAG_METHODS:
        raise ValueError(f"discretization must be one of {DIAG_METHODS} for mode='diag', got {method!r}")
    return discretize_diag(Lambda, B, dt, method, log=True, check=False)


def diag_filter(C: torch.Tensor, log_z: torch.Tensor, Bb: torch.Tensor, L: int,
                *, backend: str = "auto") -> torch.Tensor:
    """S4D filter: C (c, H, N2), log_z and Bb (H, N2) -> K (c, H, L) real."""
    v = C * Bb                                                         # (c, H, N2)
    return kernels.vandermonde_mult(v, log_z.expand_as(v), L, backend=backend)   # (c, H, L)


def dplr_filter(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, Ct: torch.Tensor,
                dt: torch.Tensor, L: int, *, backend: str = "auto") -> torch.Tensor:
    """S4 filter from the DPLR form (docs/s4.md, "Filters"): K (c, H, L) real.

    Lambda, B: (H, N2); P: (r, H, N2); Ct: (c, H, N2) (the learned `C (I - Ab^L)`); all describe
    one of each conjugate pair of the full system (`Pf = [P, conj P]`, `A = diag(Lf) - Pf^T conj Pf`).
    """
    c, r = Ct.shape[0], P.shape[0]
    H, N2 = Lambda.shape
    real = Lambda.real.dtype
    M = L // 2 + 1
    n_cauchy = M - 1 if L % 2 == 0 else M                              # Nyquist handled apart
    j = torch.arange(n_cauchy, device=Lambda.device, dtype=torch.float64)
    omega = torch.polar(torch.ones_like(j), -2 * math.pi * j / L)      # (M',) roots of unity
    # (1 - omega) / (1 + omega) = i tan(pi j / L): formed exactly on the imaginary axis, where the
    # Cauchy product has its fast CPU path
    t = torch.complex(torch.zeros_like(j), torch.tan(math.pi * j / L)).to(Lambda.dtype)   # (M',) g = (2/dt) t
    # scale by dt/2 so the Cauchy nodes t are shared by all channels: 1/(g - Lam) = (dt/2)/(t - dt Lam/2)
    half_dt = (dt / 2).to(real)[:, None]                               # (H, 1)
    w = half_dt * Lambda                                               # (H, N2)
    Pc = P.conj()
    nums = [
        (Ct * B).reshape(c, H, N2),                                    # k00: Ct.B
        (Ct.unsqueeze(1) * P.unsqueeze(0)).reshape(c * r, H, N2),      # k01: Ct.P_j
        (Pc * B).reshape(r, H, N2),                                    # k10: conj(P_i).B
        (Pc.unsqueeze(1) * P.unsqueeze(0)).reshape(r * r, H, N2),      # k11: conj(P_i).P_j
    ]
    v = torch.cat(nums, dim=0) * half_dt                               # (S, H, N2)
    k = kernels.cauchy_mult(v, t, w, symmetric=True, backend=backend)       # (S, H, M')
    scale = (2 / (1 + omega)).to(k.dtype)                              # (M',)
    if r == 1 and k.dtype == torch.complex64:
        nyq = dt.to(real) * (Ct * B).sum(-1).real if n_cauchy < M else None   # (c, H): (dt/2) Ctf.Bf
        return torch.fft.irfft(_Woodbury1.apply(k, scale, nyq), n=L)  # (c, H, L)
    k00, k01, k10, k11 = torch.split(k, [c, c * r, r, r * r], dim=0)
    if r == 1:
        khat = k00 - k01 * k10 / (1 + k11)                             # (c, H, M')
    else:
        k01 = k01.reshape(c, r, H, -1).permute(2, 3, 0, 1)             # (H, M', c, r)
        k10 = k10.reshape(r, H, -1).permute(1, 2, 0).unsqueeze(-1)     # (H, M', r, 1)
        k11 = k11.reshape(r, r, H, -1).permute(2, 3, 0, 1)             # (H, M', r, r)
        eye = torch.eye(r, dtype=k11.dtype, device=k11.device)
        corr = k01 @ torch.linalg.solve(eye + k11, k10)                # (H, M', c, 1)
        khat = k00 - corr.squeeze(-1).permute(2, 0, 1)                 # (c, H, M')
    khat = khat * scale                                                # (c, H, M')
    if n_cauchy < M:
        nyq = dt.to(real) * (Ct * B).sum(-1).real                     # (c, H): (dt/2) Ctf.Bf
        khat = torch.cat([khat, nyq.to(khat.dtype).unsqueeze(-1)], dim=-1)   # (c, H, M)
    return torch.fft.irfft(khat, n=L)                                  # (c, H, L)


class _Woodbury1(torch.autograd.Function):
    """Rank-1 Woodbury combination, scaled, with the Nyquist value appended, in one output buffer:
    k (2c+2, H, M') = [k00 (c), k01 (c), k10, k11] -> khat (c, H, M' (+1)),
    khat = scale (k00 - k01 k10 / (1 + k11)) (+ nyq (c, H) real at the end).

    The backward needs only k01, e = k10 / (1 + k11) and 1 + k11 (saved as new tensors, so the
    Cauchy output is freed after the forward); with Gs = g conj(scale) (PyTorch's convention):
    grad k00 = Gs, grad k01 = -Gs conj(e), grad k10 = -sum_c Gs conj(k01 / (1 + k11)),
    grad k11 = -grad k10 conj(e), grad nyq = Re g at the last frequency.
    """

    @staticmethod
    def forward(ctx, k, scale, nyq):
        c = (k.shape[0] - 2) // 2
        Mc = k.shape[-1]
        k00, k01, k10, k11 = k[:c], k[c:2 * c], k[2 * c], k[2 * c + 1]
        den = k11 + 1                                                  # (H, M')
        out = k.new_empty(c, k.shape[1], Mc + (nyq is not None))       # (c, H, M)
        body = out[..., :Mc]
        torch.mul(k01, k10, out=body).div_(den)                        # (c, H, M'): k01 k10 / (1 + k11)
        torch.sub(k00, body, out=body).mul_(scale)                     # (c, H, M')
        if nyq is not None:
            out[..., Mc] = nyq
        ctx.save_for_backward(k01.clone(), k10 / den, den, scale)
        ctx.has_nyq = nyq is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        k01, e, den, scale = ctx.saved_tensors
        c, Mc = k01.shape[0], k01.shape[-1]
        gk = g.new_empty((2 * c + 2,) + k01.shape[1:])                 # (2c+2, H, M')
        gs = torch.mul(g[..., :Mc], scale.conj(), out=gk[:c])           # (c, H, M'): grad k00
        torch.mul(gs, e.conj(), out=gk[c:2 * c]).neg_()                # grad k01
        f = torch.div(k01, den).conj_physical_()                       # (c, H, M'): conj(k01 / (1 + k11))
        torch.sum(f.mul_(gs), dim=0, out=gk[2 * c]).neg_()             # grad k10
        torch.mul(gk[2 * c], e.conj(), out=gk[2 * c + 1]).neg_()       # grad k11
        g_nyq = g[..., Mc].real.contiguous() if ctx.has_nyq and ctx.needs_input_grad[2] else None
        return gk, None, g_nyq


def dplr_dense(Lambda: torch.Tensor, P: torch.Tensor, B: torch.Tensor, dt: torch.Tensor):
    """Full conjugate-symmetric system, bilinear: (Ab (H, N, N), Bb (H, N)) complex128."""
    Lf = torch.cat([Lambda, Lambda.conj()], dim=-1).to(torch.complex128)   # (H, N)
    Pf = torch.cat([P, P.conj()], dim=-1).to(torch.complex128)             # (r, H, N)
    Bf = torch.cat([B, B.conj()], dim=-1).to(torch.complex128)             # (H, N)
    A = torch.diag_embed(Lf) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())  # (H, N, N)
    return discretize(A, Bf, dt.to(torch.float64), "bilinear", check=False)


def full_c(Ct: torch.Tensor) -> torch.Tensor:
    """(c, H, N2) half -> (c, H, N) conjugate-symmetric full output vector, complex128."""
    return torch.cat([Ct, Ct.conj()], dim=-1).to(torch.complex128)


def ct_to_c(Ctf: torch.Tensor, Ab: torch.Tensor, L: int) -> torch.Tensor:
    """Recover C from Ct = C (I - Ab^L): Ctf (c, H, N), Ab (H, N, N) -> C (c, H, N)."""
    eye = torch.eye(Ab.shape[-1], dtype=Ab.dtype, device=Ab.device)
    M = eye - torch.linalg.matrix_power(Ab, L)                         # (H, N, N)
    # C M = Ct  <=>  M^T C^T = Ct^T, solved per channel
    return torch.linalg.solve(M.transpose(-1, -2).unsqueeze(0), Ctf.unsqueeze(-1)).squeeze(-1)


def c_to_ct(Cf: torch.Tensor, Ab: torch.Tensor, L: int) -> torch.Tensor:
    """Ct = C (I - Ab^L): Cf (c, H, N), Ab (H, N, N) -> (c, H, N)."""
    return Cf - torch.einsum("chn,hnm->chm", Cf, torch.linalg.matrix_power(Ab, L))
