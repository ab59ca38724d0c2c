"""Triton kernels for the Vandermonde product, then their launchers (`docs/operators.md`,
"Vandermonde operator").

    out[r, l] = 2 Re sum_n v[r, n] exp(x[r, n] l)

Power reuse: with l = c*T + t (T = BLOCK_T), exp(x l) = exp(x cT) exp(x t). Both kernels build,
per block of N terms, the power table W[n, t] = exp(x_n t) and the chunk-start powers
E[c, n] = exp(x_n cT) (phases formed in float64 and reduced mod 2 pi, so L = 64K keeps float32
accuracy) and contract them with real `tl.dot`s ("ieee": tf32 would cost ~1e-3 relative error).
Transcendentals cost N * (BLOCK_C + BLOCK_T) per tile instead of N * BLOCK_C * BLOCK_T.

- forward: grid (rows, blocks of BLOCK_C chunks); loop over blocks of N; the tile of outputs is
  Re((v E) @ W), two dots.
- backward: grid (rows, blocks of N); loop over blocks of BLOCK_C chunks, accumulating
  Q[n, t] = sum_c E[c, n] g[c, t] and Q1[n, t] = sum_c cT E[c, n] g[c, t] (four dots whose
  operands all change from one iteration to the next); after the loop
  sum_l g_l exp(x l) = sum_t W Q and sum_l g_l l exp(x l) = sum_t W (Q1 + t Q). The loop order is
  fixed (no atomics, deterministic).
Complex tensors stop at the launchers: kernels read and write contiguous interleaved real/imaginary
planes (`torch.view_as_real`), indexed flat, so element k of a complex row lives at float offsets
2k and 2k + 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotune_configs, empty_output, planes


# Autotune configs (BLOCK_C, BLOCK_T, num_warps). Every one compiles for sm_80 and sm_90 without
# register spills or more shared memory than a block may have, for each BLOCK_N the launchers pass
# (16 or 32); tests/kernels/test_ptxas.py holds that.
def _fwd_configs() -> list[triton.Config]:
    # (64, 64, 4) and (128, 64, 8) are left out: they spilled at BLOCK_N = 32 (148-172 bytes on
    # sm_80, 16 bytes on sm_90).
    gpu = [({"BLOCK_C": bc, "BLOCK_T": bt}, nw) for bc, bt, nw in ((32, 64, 4), (64, 128, 8))]
    return autotune_configs({"BLOCK_C": 16, "BLOCK_T": 32}, gpu)


def _bwd_configs() -> list[triton.Config]:
    # Eight warps: with four, the four (BLOCK_N, BLOCK_T) accumulators and the dot operands do not
    # fit in a thread's registers at BLOCK_N = 32. (32, 64) is left out: ptxas gives it 128
    # registers on sm_90 and spills 44 bytes.
    gpu = [({"BLOCK_C": bc, "BLOCK_T": bt}, 8) for bc, bt in ((16, 64), (16, 128), (32, 32))]
    return autotune_configs({"BLOCK_C": 16, "BLOCK_T": 32}, gpu)


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


@triton.autotune(configs=_fwd_configs(), key=["N", "L"])
@triton.jit
def _vandermonde_fwd_kernel(v_ptr, x_ptr, out_ptr, N, L,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)                # chunk indices
    offs_t = tl.arange(0, BLOCK_T)
    v_row = v_ptr + row * (2 * N)
    x_row = x_ptr + row * (2 * N)
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
        # Re((ar + i ai) @ (wr + i wi))
        acc += tl.dot(ar, wr, input_precision="ieee") - tl.dot(ai, wi, input_precision="ieee")
    offs_l = offs_c[:, None] * BLOCK_T + offs_t[None, :]                        # (BLOCK_C, BLOCK_T)
    tl.store(out_ptr + row * L + offs_l, 2 * acc, mask=offs_l < L)


@triton.autotune(configs=_bwd_configs(), key=["N", "L"])
@triton.jit
def _vandermonde_bwd_kernel(g_ptr, v_ptr, x_ptr, gv_ptr, gx_ptr, N, L,
                            BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_t = tl.arange(0, BLOCK_T)
    x_row = x_ptr + row * (2 * N)
    xr = tl.load(x_row + 2 * offs_n, mask=mask_n, other=0.0)
    xi = tl.load(x_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
    # Q = sum_c E^T g and Q1 = sum_c (cT E)^T g, real and imaginary parts, (BLOCK_N, BLOCK_T) each.
    # The power table W is not needed inside the loop: a loop-invariant dot operand would stay in
    # registers (with the chunk's g shared by four dots, that spilled 6-18 KB per thread).
    q0r = tl.zeros((BLOCK_N, BLOCK_T), dtype=xr.dtype)
    q0i = tl.zeros((BLOCK_N, BLOCK_T), dtype=xr.dtype)
    q1r = tl.zeros((BLOCK_N, BLOCK_T), dtype=xr.dtype)
    q1i = tl.zeros((BLOCK_N, BLOCK_T), dtype=xr.dtype)
    n_chunks = tl.cdiv(L, BLOCK_T)
    for c0 in range(0, n_chunks, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        offs_l = offs_c[:, None] * BLOCK_T + offs_t[None, :]                    # (BLOCK_C, BLOCK_T)
        g = tl.load(g_ptr + row * L + offs_l, mask=offs_l < L, other=0.0).to(xr.dtype)
        er, ei = _chunk_start_power(xr, xi, offs_c, BLOCK_T)                   # (BLOCK_C, BLOCK_N)
        # Chunks past the end hold g = 0; zero E there too so an overflowing power cannot make NaN.
        valid = (offs_c < n_chunks)[:, None]
        er = tl.where(valid, er, 0.0)
        ei = tl.where(valid, ei, 0.0)
        start = (offs_c * BLOCK_T).to(xr.dtype)[:, None]                       # (BLOCK_C, 1)
        q0r = tl.dot(tl.trans(er), g, q0r, input_precision="ieee")
        q0i = tl.dot(tl.trans(ei), g, q0i, input_precision="ieee")
        q1r = tl.dot(tl.trans(start * er), g, q1r, input_precision="ieee")
        q1i = tl.dot(tl.trans(start * ei), g, q1i, input_precision="ieee")
    wr, wi = _block_power(xr, xi, offs_t)                                       # (BLOCK_N, BLOCK_T)
    tw = offs_t.to(xr.dtype)[None, :]                                           # (1, BLOCK_T)
    q1r += tw * q0r
    q1i += tw * q0i
    # sum0 = sum_l g_l exp(x l) = sum_t W Q, sum1 = sum_l g_l l exp(x l) = sum_t W (Q1 + t Q)
    s0r = tl.sum(wr * q0r - wi * q0i, axis=1)                                   # (BLOCK_N,)
    s0i = tl.sum(wr * q0i + wi * q0r, axis=1)
    s1r = tl.sum(wr * q1r - wi * q1i, axis=1)
    s1i = tl.sum(wr * q1i + wi * q1r, axis=1)
    v_row = v_ptr + row * (2 * N)
    vr = tl.load(v_row + 2 * offs_n, mask=mask_n, other=0.0)
    vi = tl.load(v_row + 2 * offs_n + 1, mask=mask_n, other=0.0)
    # grad_v = 2 conj(sum0); grad_x = 2 conj(v sum1).
    out = row * (2 * N) + 2 * offs_n
    tl.store(gv_ptr + out, 2 * s0r, mask=mask_n)
    tl.store(gv_ptr + out + 1, -2 * s0i, mask=mask_n)
    tl.store(gx_ptr + out, 2 * (vr * s1r - vi * s1i), mask=mask_n)
    tl.store(gx_ptr + out + 1, -2 * (vr * s1i + vi * s1r), mask=mask_n)


def _block_n(N: int) -> int:
    # tl.dot needs every dimension >= 16. Wider blocks than 32 spill registers (64 did, in the
    # forward on sm_80 and sm_90) and save no work: each block of N terms costs the same
    # transcendentals whether it is a loop step (forward) or a program (backward).
    return min(max(16, triton.next_power_of_2(N)), 32)


def vandermonde_fwd_triton(v: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    """Forward launcher: v, x complex (R, N) -> out real (R, L). No autograd."""
    R, N = v.shape
    out = empty_output((R, L), dtype=v.real.dtype, device=v.device)            # (R, L)
    if R == 0:
        return out

    def grid(meta):
        return (R, triton.cdiv(triton.cdiv(L, meta["BLOCK_T"]), meta["BLOCK_C"]))

    _vandermonde_fwd_kernel[grid](planes(v), planes(x), out, N, L, BLOCK_N=_block_n(N))
    return out


def vandermonde_bwd_triton(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward launcher: grad real (R, L), v, x complex (R, N) -> (grad_v, grad_x) complex (R, N). No autograd."""
    R, N = v.shape
    L = grad.shape[-1]
    g = grad.to(v.real.dtype).contiguous()                                      # (R, L)
    gv = empty_output(v.shape, dtype=v.dtype, device=v.device)                  # (R, N)
    gx = empty_output(x.shape, dtype=x.dtype, device=x.device)                  # (R, N)
    if R > 0:
        block_n = _block_n(N)
        _vandermonde_bwd_kernel[(R, triton.cdiv(N, block_n))](g, planes(v), planes(x), torch.view_as_real(gv),
                                                              torch.view_as_real(gx), N, L, BLOCK_N=block_n)
    return gv, gx


def ptxas_cases() -> list:
    """What `tests/kernels/ptxas_check.py` compiles ahead of time: each kernel with each BLOCK_N
    the launchers pass (16 up to 32, `_block_n`)."""
    block_n = [{"BLOCK_N": bn} for bn in (16, 32)]
    return [(_vandermonde_fwd_kernel, block_n), (_vandermonde_bwd_kernel, block_n)]
