"""Triton Vandermonde product (SPEC sections 3 and 4): kernels, launchers, autograd.Function.

    out[r, l] = 2 Re sum_n v[r, n] exp(x[r, n] l)

Power reuse (SPEC 3): with l = c*T + t (T = BLOCK_T), exp(x l) = exp(x cT) exp(x t). A program
owns one row and a (BLOCK_C x BLOCK_T) tile of output positions; per block of N terms it builds
the power table W[n, t] = exp(x_n t) and the chunk-start powers E[c, n] = exp(x_n cT) (phases
formed in float64 and reduced mod 2 pi, so L = 64K keeps float32 accuracy), then the tile is
the real part of the matrix product (v E) @ W, i.e. two real `tl.dot`s. Transcendentals cost
N * (BLOCK_C + BLOCK_T) per program instead of N * BLOCK_C * BLOCK_T.

The backward kernel gives grad_v = 2 conj(sum_l g_l exp(x l)) and
grad_x = 2 conj(v sum_l g_l l exp(x l)); one program per (row, block of N) loops over L, so the
reduction order is fixed (no atomics, deterministic). Complex tensors never enter a kernel: the
launchers pass `torch.view_as_real` planes (interleaved real, imag).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import interpreter_on

# Test hook: when True the launchers fill outputs with NaN before the kernels run, so an element a
# kernel forgets to write shows up as NaN.
POISON_OUTPUTS = False


def _configs():
    if interpreter_on():
        # The interpreter cannot benchmark and runs programs one by one: one small config.
        return [triton.Config({"BLOCK_C": 16, "BLOCK_T": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w)
        for bc, bt, w in ((32, 64, 4), (64, 64, 4), (64, 128, 8), (128, 64, 8))
    ]


@triton.jit
def _reduced_phase(steps, xi):
    """steps * Im(x) mod 2 pi as (S, BLOCK_N): formed in float64 so a phase of 1e5 rad and more
    keeps float32 accuracy after the cast. Runs once per (program, n, step), not per term."""
    phase = steps.to(tl.float64)[:, None] * xi.to(tl.float64)[None, :]
    phase = phase - 6.283185307179586 * tl.floor(phase * 0.15915494309189535 + 0.5)
    return phase.to(xi.dtype)


@triton.jit
def _chunk_start_power(xr, xi, offs_c, BLOCK_T: tl.constexpr):
    """exp(x * c*BLOCK_T) as (BLOCK_C, BLOCK_N) real, imag."""
    start = offs_c * BLOCK_T                                                    # (BLOCK_C,)
    phase = _reduced_phase(start, xi)                                           # (BLOCK_C, BLOCK_N)
    mag = tl.exp(start.to(xr.dtype)[:, None] * xr[None, :])                    # (BLOCK_C, BLOCK_N)
    return mag * tl.cos(phase), mag * tl.sin(phase)


@triton.jit
def _block_power(xr, xi, offs_t):
    """exp(x * t) for t < BLOCK_T as (BLOCK_N, BLOCK_T) real, imag."""
    phase = tl.trans(_reduced_phase(offs_t, xi))                                # (BLOCK_N, BLOCK_T)
    mag = tl.exp(xr[:, None] * offs_t.to(xr.dtype)[None, :])                   # (BLOCK_N, BLOCK_T)
    return mag * tl.cos(phase), mag * tl.sin(phase)


@triton.autotune(configs=_configs(), key=["N", "L"])
@triton.jit
def _vandermonde_fwd_kernel(v_ptr, x_ptr, out_ptr, N, L, stride_v, stride_x, stride_out,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                # chunk indices
    offs_t = tl.arange(0, BLOCK_T)
    v_row = v_ptr + row * stride_v
    x_row = x_ptr + row * stride_x
    acc = tl.zeros((BLOCK_C, BLOCK_T), dtype=out_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        # Padded terms load v = 0 (they add nothing) and x = 0 (finite powers).
        vr = tl.load(v_row + 2 * offs_n, mask=mask_n, other=0.0)
        vi = tl.load(v_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
        xr = tl.load(x_row + 2 * offs_n, mask=mask_n, other=0.0)
        xi = tl.load(x_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
        er, ei = _chunk_start_power(xr, xi, offs_c, BLOCK_T)                   # (BLOCK_C, BLOCK_N)
        ar = vr[None, :] * er - vi[None, :] * ei                                # (BLOCK_C, BLOCK_N)
        ai = vr[None, :] * ei + vi[None, :] * er                                # (BLOCK_C, BLOCK_N)
        wr, wi = _block_power(xr, xi, offs_t)                                   # (BLOCK_N, BLOCK_T)
        # Re((ar + i ai) @ (wr + i wi)); "ieee" because tf32 would cost ~1e-3 relative error.
        acc += tl.dot(ar, wr, input_precision="ieee") - tl.dot(ai, wi, input_precision="ieee")
    offs_l = offs_c[:, None] * BLOCK_T + offs_t[None, :]                        # (BLOCK_C, BLOCK_T)
    tl.store(out_ptr + row * stride_out + offs_l, 2 * acc, mask=offs_l < L)


@triton.autotune(configs=_configs(), key=["N", "L"])
@triton.jit
def _vandermonde_bwd_kernel(g_ptr, v_ptr, x_ptr, gv_ptr, gx_ptr, N, L, stride_g, stride_v, stride_x,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, BLOCK_T)
    v_row = v_ptr + row * stride_v
    x_row = x_ptr + row * stride_x
    vr = tl.load(v_row + 2 * offs_n, mask=mask_n, other=0.0)
    vi = tl.load(v_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
    xr = tl.load(x_row + 2 * offs_n, mask=mask_n, other=0.0)
    xi = tl.load(x_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
    wr, wi = _block_power(xr, xi, offs_t)                                       # (BLOCK_N, BLOCK_T)
    tw = offs_t.to(xr.dtype)[None, :]
    wr_t = tl.trans(wr)                                                         # (BLOCK_T, BLOCK_N)
    wi_t = tl.trans(wi)
    twr_t = tl.trans(wr * tw)
    twi_t = tl.trans(wi * tw)
    # sum0 = sum_l g_l exp(x l), sum1 = sum_l g_l l exp(x l), accumulated in a fixed order.
    s0r = tl.zeros((BLOCK_N,), dtype=xr.dtype)
    s0i = tl.zeros((BLOCK_N,), dtype=xr.dtype)
    s1r = tl.zeros((BLOCK_N,), dtype=xr.dtype)
    s1i = tl.zeros((BLOCK_N,), dtype=xr.dtype)
    n_chunks = tl.cdiv(L, BLOCK_T)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_l = offs_c[:, None] * BLOCK_T + offs_t[None, :]                    # (BLOCK_C, BLOCK_T)
        g = tl.load(g_ptr + row * stride_g + offs_l, mask=offs_l < L, other=0.0).to(xr.dtype)
        pr = tl.dot(g, wr_t, input_precision="ieee")                           # (BLOCK_C, BLOCK_N)
        pi = tl.dot(g, wi_t, input_precision="ieee")
        qr = tl.dot(g, twr_t, input_precision="ieee")
        qi = tl.dot(g, twi_t, input_precision="ieee")
        er, ei = _chunk_start_power(xr, xi, offs_c, BLOCK_T)                   # (BLOCK_C, BLOCK_N)
        # Chunks past the end hold g = 0; zero E there too so an overflowing power cannot make NaN.
        valid = (offs_c < n_chunks)[:, None]
        er = tl.where(valid, er, 0.0)
        ei = tl.where(valid, ei, 0.0)
        start = (offs_c * BLOCK_T).to(xr.dtype)[:, None]                       # (BLOCK_C, 1)
        s0r += tl.sum(er * pr - ei * pi, axis=0)
        s0i += tl.sum(er * pi + ei * pr, axis=0)
        qr = start * pr + qr
        qi = start * pi + qi
        s1r += tl.sum(er * qr - ei * qi, axis=0)
        s1i += tl.sum(er * qi + ei * qr, axis=0)
    # grad_v = 2 conj(sum0); grad_x = 2 conj(v sum1).
    tl.store(gv_ptr + row * stride_v + 2 * offs_n, 2 * s0r, mask=mask_n)
    tl.store(gv_ptr + row * stride_v + 2 * offs_n + 1, -2 * s0i, mask=mask_n)
    tl.store(gx_ptr + row * stride_x + 2 * offs_n, 2 * (vr * s1r - vi * s1i), mask=mask_n)
    tl.store(gx_ptr + row * stride_x + 2 * offs_n + 1, -2 * (vr * s1i + vi * s1r), mask=mask_n)


def _empty(shape, *, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _block_n(N: int) -> int:
    # tl.dot needs every dimension >= 16; more than 64 terms per block only adds registers.
    return min(max(16, triton.next_power_of_2(N)), 64)


def vandermonde_fwd_triton(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Forward launcher: v, x complex (R, N) -> out real (R, L). No autograd."""
    R, N = v.shape
    vp = torch.view_as_real(v.resolve_conj().contiguous())                       # (R, N, 2)
    xp = torch.view_as_real(x.resolve_conj().contiguous())                       # (R, N, 2)
    out = _empty((R, L), dtype=vp.dtype, device=v.device)         # (R, L)
    if R == 0:
        return out

    def grid(meta):
        return (R, triton.cdiv(triton.cdiv(L, meta["BLOCK_T"]), meta["BLOCK_C"]))

    _vandermonde_fwd_kernel[grid](vp, xp, out, N, L, vp.stride(0), xp.stride(0), out.stride(0),
                                  BLOCK_N=_block_n(N))
    return out


def vandermonde_bwd_triton(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher: grad real (R, L), v, x complex (R, N) -> (grad_v, grad_x) complex (R, N)."""
    R, N = v.shape
    L = grad.shape[-1]
    vp = torch.view_as_real(v.resolve_conj().contiguous())                       # (R, N, 2)
    xp = torch.view_as_real(x.resolve_conj().contiguous())                       # (R, N, 2)
    g = grad.to(vp.dtype).contiguous()                            # (R, L)
    gv = _empty(vp.shape, dtype=vp.dtype, device=v.device)        # (R, N, 2)
    gx = _empty(xp.shape, dtype=xp.dtype, device=x.device)        # (R, N, 2)
    if R > 0:
        block_n = _block_n(N)
        grid = (R, triton.cdiv(N, block_n))
        _vandermonde_bwd_kernel[grid](g, vp, xp, gv, gx, N, L, g.stride(0), vp.stride(0), xp.stride(0),
                                      BLOCK_N=block_n)
    return torch.view_as_complex(gv), torch.view_as_complex(gx)


class VandermondeTriton(torch.autograd.Function):
    """Autograd over the Triton kernels; saves only v and x (the backward recomputes powers)."""

    @staticmethod
    def forward(ctx, v, x, L):
        ctx.save_for_backward(v, x)
        return vandermonde_fwd_triton(v, x, L)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        v, x = ctx.saved_tensors
        gv, gx = vandermonde_bwd_triton(grad, v, x)
        return gv, gx, None


def vandermonde_triton(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Triton Vandermonde product with autograd: complex (..., N) -> real (..., L); no validation."""
    lead = v.shape[:-1]
    out = VandermondeTriton.apply(v.reshape(-1, v.shape[-1]), x.reshape(-1, x.shape[-1]), L)  # (R, L)
    return out.reshape(*lead, L)                                  # (..., L)
