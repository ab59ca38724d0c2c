"""Vandermonde product in plain PyTorch: the ground truth and the chunked path (`backend="torch"`).

The math: `docs/operators.md`, sections "Vandermonde operator" and "Chunked references".

    out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] * l),  l = 0..L-1.

- `vandermonde_ref`: the readable formula. It materializes (..., N, L); use it with complex128
  inputs as ground truth and at small sizes only.
- `vandermonde_chunked_fwd` / `vandermonde_chunked_bwd`: the chunked path on canonical shapes
  (rows (R, N) -> (R, L)), without autograd (the custom op in `op.py` adds it). With l = c*T + t
  (power reuse), exp(x l) = exp(x cT) * exp(x t), so per row the filter is the real part of a
  small matrix product (C x N) @ (N x T), C = ceil(L / T). Memory is O(rows * (L + N * (C + T))),
  never (rows, N, L), in forward and backward (the backward recomputes the powers instead of
  saving them); rows are processed in groups so temporaries stay a few MB. The chunk-start powers
  exp(x cT) are evaluated directly (no error accumulation); every phase (Im(x) cT and Im(x) t) is
  formed in float64 and reduced mod 2 pi before the cast, so long filters (L = 64K and beyond)
  keep float32 accuracy (the plain float32 formula does not).

No Triton import here.
"""
from __future__ import annotations

import math

import torch


def vandermonde_ref(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """The readable formula; materializes (..., N, L). Use complex128 inputs for ground truth."""
    l = torch.arange(L, device=x.device, dtype=x.real.dtype)      # (L,)
    vander = torch.exp(x.unsqueeze(-1) * l)                         # (..., N, L)
    return 2 * torch.einsum("...n,...nl->...l", v, vander).real    # (..., L)


def default_block(L: int) -> int:
    """Width T of the power table: the power of two nearest sqrt(L), so C = L/T is close to T."""
    return 1 << max(0, round(math.log2(max(L, 1)) / 2))


def reduced_phase(xi: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Im(x) * step mod 2 pi: (R, N) x (S,) -> (R, N, S) in the dtype of xi.

    The product can reach Im(x) * L (1e5 rad and more); formed in float64 and reduced before the
    cast, the float32 result is accurate to float32 rounding of the reduced angle.
    """
    phase = xi.double().unsqueeze(-1) * steps.double()                               # (R, N, S)
    return (phase - torch.round(phase / (2 * math.pi)) * (2 * math.pi)).to(xi.dtype)  # (R, N, S)


def decay(arg: torch.Tensor) -> torch.Tensor:
    """exp(arg) for arg = Re(x) * step <= 0, with results below ~1e-35 (float32) set to exactly 0.

    CPU exp is ~15x slower when it produces subnormals, and those terms are negligible anyway.
    """
    floor = -80.0 if arg.dtype == torch.float32 else -700.0
    return torch.where(arg > floor, torch.exp(arg.clamp_min(floor)), 0.0)


def chunk_start_powers(x: torch.Tensor, C: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(x * c*T) for c = 0..C-1, evaluated directly: (R, N) -> real, imag planes (R, C, N)."""
    start = torch.arange(C, device=x.device, dtype=x.real.dtype) * T                 # (C,)
    mag = decay(x.real.unsqueeze(-2) * start.unsqueeze(-1))                           # (R, C, N)
    phase = reduced_phase(x.imag, start).transpose(-1, -2)                            # (R, C, N)
    return mag * torch.cos(phase), mag * torch.sin(phase)


def block_powers(x: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(x * t) for t = 0..T-1: (R, N) -> real, imag planes (R, N, T).

    Real planes because torch's complex exp on CPU is ~10x slower than exp, cos and sin.
    """
    t = torch.arange(T, device=x.device, dtype=x.real.dtype)     # (T,)
    mag = decay(x.real.unsqueeze(-1) * t)                         # (R, N, T)
    phase = reduced_phase(x.imag, t)                              # (R, N, T)
    return mag * torch.cos(phase), mag * torch.sin(phase)


# Tile sizes, read at call time (tests set TABLE_WIDTH to make ragged chunks). TABLE_WIDTH: the
# width T of the power table; None picks the power of two nearest sqrt(L). ROW_BUDGET: rows per
# step bound the temporaries to ~2**18 power-table entries (a few MB, cache-friendly).
TABLE_WIDTH: int | None = None
ROW_BUDGET = 1 << 18


def _split(L: int) -> tuple[int, int]:
    T = default_block(L) if TABLE_WIDTH is None else min(TABLE_WIDTH, L)
    return T, -(-L // T)


def _row_slices(R: int, N: int, C: int, T: int):
    step = max(1, ROW_BUDGET // (N * (C + T)))
    return [slice(r, min(r + step, R)) for r in range(0, R, step)]


def _forward_rows(v: torch.Tensor, x: torch.Tensor, L: int, T: int, C: int) -> torch.Tensor:
    er, ei = chunk_start_powers(x, C, T)                          # (r, C, N) each
    vr, vi = v.real.unsqueeze(-2), v.imag.unsqueeze(-2)           # (r, 1, N) each
    # 2 Re(a @ w) = 2 (Re a @ Re w - Im a @ Im w), a = v E: one real matmul with 2N inner terms.
    a2 = torch.cat([vr * er - vi * ei, -(vr * ei + vi * er)], dim=-1)  # (r, C, 2N)
    w2 = torch.cat(block_powers(x, T), dim=-2)                    # (r, 2N, T)
    out = torch.bmm(a2, w2).reshape(-1, C * T)                    # (r, C*T)
    return 2 * out[:, :L]                                         # (r, L)


def vandermonde_chunked_fwd(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """out = 2 Re sum_n v exp(x l) by power reuse: (R, N) complex -> (R, L) real, no autograd."""
    T, C = _split(L)
    R, N = v.shape
    out = torch.empty(R, L, device=v.device, dtype=v.real.dtype)  # (R, L)
    for rows in _row_slices(R, N, C, T):
        out[rows] = _forward_rows(v[rows], x[rows], L, T, C)
    return out


def _backward_rows(g: torch.Tensor, v: torch.Tensor, x: torch.Tensor, T: int, C: int):
    wr, wi = block_powers(x, T)                                  # (r, N, T) each
    t = torch.arange(T, device=x.device, dtype=x.real.dtype)     # (T,)
    w4 = torch.cat([wr, wi, wr * t, wi * t], dim=-2)             # (r, 4N, T)
    s = torch.bmm(g, w4.transpose(-1, -2))                       # (r, C, 4N)
    s0r, s0i, s1r, s1i = s.chunk(4, dim=-1)                      # (r, C, N) each
    s0 = torch.complex(s0r, s0i)                                 # (r, C, N): sum_t g exp(x t)
    s1 = torch.complex(s1r, s1i)                                 # (r, C, N): sum_t g t exp(x t)
    e = torch.complex(*chunk_start_powers(x, C, T))              # (r, C, N)
    start = (torch.arange(C, device=x.device, dtype=x.real.dtype) * T).unsqueeze(-1)  # (C, 1)
    sum0 = (e * s0).sum(dim=-2)                                  # (r, N)
    sum1 = (e * (start * s0 + s1)).sum(dim=-2)                   # (r, N)
    return 2 * sum0.conj(), 2 * (v * sum1).conj()


def vandermonde_chunked_bwd(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of sum_l grad_l out_l w.r.t. v and x (PyTorch's conjugate convention):

        grad_v = 2 sum_l g_l conj(exp(x l)),   grad_x = 2 sum_l g_l l conj(v exp(x l)).

    With l = cT + t: sum_l g_l exp(x l) l^k = sum_c exp(x cT) sum_t g[c, t] (cT + t)^k exp(x t),
    so both sums are one real matmul of g (C x T) with the power table (T x 4N).
    """
    R, L = grad.shape
    T, C = _split(L)
    N = v.shape[-1]
    gv, gx = torch.empty_like(v), torch.empty_like(x)            # (R, N) each
    for rows in _row_slices(R, N, C, T):
        g = torch.nn.functional.pad(grad[rows].to(v.real.dtype), (0, C * T - L))  # (r, C*T)
        gv[rows], gx[rows] = _backward_rows(g.reshape(-1, C, T), v[rows], x[rows], T, C)
    return gv, gx
