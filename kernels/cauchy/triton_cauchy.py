"""Triton kernels for the Cauchy product, then their launchers (`docs/operators.md`, "Cauchy operator").

    out[r, h, j] = sum_n v[r, h, n] / (z[j] - w[h, n])   (+ conj(v) / (z[j] - conj(w)) if SYMMETRIC)

Shapes: v (R, H, N) numerators sharing the poles w (H, N) of row h; z (M,) evaluation points.
Complex tensors stop at the launchers: kernels read and write interleaved real/imaginary planes
(`torch.view_as_real`), so element k of a complex tensor lives at float offsets 2k and 2k + 1.

- forward: grid (H, M-blocks); loop over blocks of the N poles; per (pole, point) the reciprocal
  is formed once and multiplied into all R numerators; the symmetric form adds the conjugate pole
  in the same pass.
- backward, v and w: grid (H, N-blocks); each program loops over all M blocks and reduces there.
- backward, z: grid (M-blocks, row splits); each program reduces over its rows and all poles; the
  partial sums of the splits are added in a fixed order afterwards. No atomics anywhere, so the
  results are bitwise reproducible.
Gradients follow PyTorch's convention for holomorphic maps (see `reference.py`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotune_configs, empty_output, interpreter_on, planes


def _configs(skip: tuple = ()) -> list[triton.Config]:
    """One interpreted config with wide blocks; on a GPU every (BLOCK_N, BLOCK_M) x num_warps but
    the (BLOCK_N, BLOCK_M, num_warps) in `skip`. Each compiles for sm_80 and sm_90 without register
    spills at R = 4 (tests/kernels/test_ptxas.py)."""
    gpu = [({"BLOCK_N": bn, "BLOCK_M": bm}, nw) for bn in (4, 8) for bm in (64, 128) for nw in (4, 8)
           if (bn, bm, nw) not in skip]
    return autotune_configs({"BLOCK_N": 32, "BLOCK_M": 128}, gpu)


@triton.jit
def _recip(d_re, d_im):
    """1 / (d_re + i d_im) as (real, imaginary) parts."""
    inv = 1.0 / (d_re * d_re + d_im * d_im)
    return d_re * inv, -d_im * inv


@triton.autotune(configs=_configs(), key=["N", "M", "R", "SYMMETRIC"])
@triton.jit
def _cauchy_fwd_kernel(v_ptr, z_ptr, w_ptr, out_ptr, H, N, M,
                       R: tl.constexpr, BLOCK_R: tl.constexpr, SYMMETRIC: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_h = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    z_re = tl.load(z_ptr + 2 * offs_m, mask=mask_m, other=0.0)[None, :]
    z_im = tl.load(z_ptr + 2 * offs_m + 1, mask=mask_m, other=0.0)[None, :]
    acc_re = tl.zeros((BLOCK_R, BLOCK_M), dtype=z_re.dtype)
    acc_im = tl.zeros((BLOCK_R, BLOCK_M), dtype=z_re.dtype)
    v_row = offs_r.to(tl.int64)[:, None] * (H * N) + pid_h * N
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        w_re = tl.load(w_ptr + 2 * (pid_h * N + offs_n), mask=mask_n, other=0.0)[:, None]
        w_im = tl.load(w_ptr + 2 * (pid_h * N + offs_n) + 1, mask=mask_n, other=0.0)[:, None]
        vmask = mask_r[:, None] & mask_n[None, :]
        v_re = tl.load(v_ptr + 2 * (v_row + offs_n[None, :]), mask=vmask, other=0.0)[:, :, None]
        v_im = tl.load(v_ptr + 2 * (v_row + offs_n[None, :]) + 1, mask=vmask, other=0.0)[:, :, None]
        # Padded lanes may put a pole on a point (z = 0 is common): Re(z - w) := 1 keeps their
        # reciprocal finite, and their zero numerators make them add nothing.
        d_re = tl.where(mask_n[:, None] & mask_m[None, :], z_re - w_re, 1.0)
        c_re, c_im = _recip(d_re, z_im - w_im)
        c_re = c_re[None, :, :]
        c_im = c_im[None, :, :]
        acc_re += tl.sum(v_re * c_re - v_im * c_im, axis=1)
        acc_im += tl.sum(v_re * c_im + v_im * c_re, axis=1)
        if SYMMETRIC:
            c2_re, c2_im = _recip(d_re, z_im + w_im)
            c2_re = c2_re[None, :, :]
            c2_im = c2_im[None, :, :]
            acc_re += tl.sum(v_re * c2_re + v_im * c2_im, axis=1)
            acc_im += tl.sum(v_re * c2_im - v_im * c2_re, axis=1)
    o = offs_r.to(tl.int64)[:, None] * (H * M) + pid_h * M + offs_m[None, :]
    mask = mask_r[:, None] & mask_m[None, :]
    tl.store(out_ptr + 2 * o, acc_re, mask=mask)
    tl.store(out_ptr + 2 * o + 1, acc_im, mask=mask)


@triton.jit
def _grad_sums(g_re, g_im, d_re, d_im):
    """With c = 1/d (d: (BLOCK_N, BLOCK_M) pole-to-point differences) and g (BLOCK_R, 1, BLOCK_M):
    (sum_j g conj(c), sum_j g conj(c^2)) as real/imaginary parts, each (BLOCK_R, BLOCK_N)."""
    c_re, c_im = _recip(d_re, d_im)
    s_re = (c_re * c_re - c_im * c_im)[None, :, :]
    s_im = (2.0 * c_re * c_im)[None, :, :]
    c_re = c_re[None, :, :]
    c_im = c_im[None, :, :]
    return (tl.sum(g_re * c_re + g_im * c_im, axis=2), tl.sum(g_im * c_re - g_re * c_im, axis=2),
            tl.sum(g_re * s_re + g_im * s_im, axis=2), tl.sum(g_im * s_re - g_re * s_im, axis=2))


# (8, 128) with 4 warps: ptxas gives it 128 registers on sm_80 and spills 4 bytes (symmetric form).
@triton.autotune(configs=_configs(skip=((8, 128, 4),)), key=["N", "M", "R", "SYMMETRIC"])
@triton.jit
def _cauchy_bwd_vw_kernel(g_ptr, v_ptr, z_ptr, w_ptr, gv_ptr, gw_ptr, H, N, M,
                          R: tl.constexpr, BLOCK_R: tl.constexpr, SYMMETRIC: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_h = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    w_re = tl.load(w_ptr + 2 * (pid_h * N + offs_n), mask=mask_n, other=0.0)[:, None]
    w_im = tl.load(w_ptr + 2 * (pid_h * N + offs_n) + 1, mask=mask_n, other=0.0)[:, None]
    # sv = sum_j g conj(c), st = sum_j g conj(c^2), over the poles w (and their conjugates).
    zero = tl.zeros((BLOCK_R, BLOCK_N), dtype=w_re.dtype)
    sv_re, sv_im, st_re, st_im = zero, zero, zero, zero
    g_row = offs_r.to(tl.int64)[:, None] * (H * M) + pid_h * M
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        z_re = tl.load(z_ptr + 2 * offs_m, mask=mask_m, other=0.0)[None, :]
        z_im = tl.load(z_ptr + 2 * offs_m + 1, mask=mask_m, other=0.0)[None, :]
        gmask = mask_r[:, None] & mask_m[None, :]
        g_re = tl.load(g_ptr + 2 * (g_row + offs_m[None, :]), mask=gmask, other=0.0)[:, None, :]
        g_im = tl.load(g_ptr + 2 * (g_row + offs_m[None, :]) + 1, mask=gmask, other=0.0)[:, None, :]
        # Padded lanes: finite reciprocal (see the forward) times a zero gradient.
        d_re = tl.where(mask_n[:, None] & mask_m[None, :], z_re - w_re, 1.0)
        p_re, p_im, q_re, q_im = _grad_sums(g_re, g_im, d_re, z_im - w_im)
        sv_re += p_re
        sv_im += p_im
        st_re += q_re
        st_im += q_im
        if SYMMETRIC:
            # The conjugate half enters through conj(v), conj(w): its gradient is conjugated back.
            p_re, p_im, q_re, q_im = _grad_sums(g_re, g_im, d_re, z_im + w_im)
            sv_re += p_re
            sv_im -= p_im
            st_re += q_re
            st_im -= q_im
    v_off = offs_r.to(tl.int64)[:, None] * (H * N) + pid_h * N + offs_n[None, :]
    vmask = mask_r[:, None] & mask_n[None, :]
    tl.store(gv_ptr + 2 * v_off, sv_re, mask=vmask)
    tl.store(gv_ptr + 2 * v_off + 1, sv_im, mask=vmask)
    # grad_w = sum_r conj(v) * st
    v_re = tl.load(v_ptr + 2 * v_off, mask=vmask, other=0.0)
    v_im = tl.load(v_ptr + 2 * v_off + 1, mask=vmask, other=0.0)
    gw_re = tl.sum(v_re * st_re + v_im * st_im, axis=0)
    gw_im = tl.sum(v_re * st_im - v_im * st_re, axis=0)
    tl.store(gw_ptr + 2 * (pid_h * N + offs_n), gw_re, mask=mask_n)
    tl.store(gw_ptr + 2 * (pid_h * N + offs_n) + 1, gw_im, mask=mask_n)


@triton.autotune(configs=_configs(), key=["N", "M", "R", "SYMMETRIC"])
@triton.jit
def _cauchy_bwd_z_kernel(g_ptr, v_ptr, z_ptr, w_ptr, part_ptr, H, N, M, ROWS_PER_SPLIT,
                         R: tl.constexpr, BLOCK_R: tl.constexpr, SYMMETRIC: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    z_re = tl.load(z_ptr + 2 * offs_m, mask=mask_m, other=0.0)[None, :]
    z_im = tl.load(z_ptr + 2 * offs_m + 1, mask=mask_m, other=0.0)[None, :]
    acc_re = tl.zeros((BLOCK_N, BLOCK_M), dtype=z_re.dtype)
    acc_im = tl.zeros((BLOCK_N, BLOCK_M), dtype=z_re.dtype)
    gmask = mask_r[:, None] & mask_m[None, :]
    h_start = pid_s.to(tl.int64) * ROWS_PER_SPLIT
    h_end = tl.minimum(h_start + ROWS_PER_SPLIT, H)
    for hh in range(h_start, h_end):
        g_off = offs_r.to(tl.int64)[:, None] * (H * M) + hh * M + offs_m[None, :]
        g_re = tl.load(g_ptr + 2 * g_off, mask=gmask, other=0.0)[:, None, :]
        g_im = tl.load(g_ptr + 2 * g_off + 1, mask=gmask, other=0.0)[:, None, :]
        v_row = offs_r.to(tl.int64)[:, None] * (H * N) + hh * N
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            w_re = tl.load(w_ptr + 2 * (hh * N + offs_n), mask=mask_n, other=0.0)[:, None]
            w_im = tl.load(w_ptr + 2 * (hh * N + offs_n) + 1, mask=mask_n, other=0.0)[:, None]
            vmask = mask_r[:, None] & mask_n[None, :]
            v_re = tl.load(v_ptr + 2 * (v_row + offs_n[None, :]), mask=vmask, other=0.0)[:, :, None]
            v_im = tl.load(v_ptr + 2 * (v_row + offs_n[None, :]) + 1, mask=vmask, other=0.0)[:, :, None]
            # u = sum_r conj(v) g (zero on padded lanes); grad_z -= conj(c^2) u
            u_re = tl.sum(v_re * g_re + v_im * g_im, axis=0)
            u_im = tl.sum(v_re * g_im - v_im * g_re, axis=0)
            d_re = tl.where(mask_n[:, None] & mask_m[None, :], z_re - w_re, 1.0)
            c_re, c_im = _recip(d_re, z_im - w_im)
            s_re = c_re * c_re - c_im * c_im
            s_im = 2.0 * c_re * c_im
            acc_re -= s_re * u_re + s_im * u_im
            acc_im -= s_re * u_im - s_im * u_re
            if SYMMETRIC:
                # conjugate pole with numerator conj(v): u2 = sum_r v g
                u2_re = tl.sum(v_re * g_re - v_im * g_im, axis=0)
                u2_im = tl.sum(v_re * g_im + v_im * g_re, axis=0)
                c2_re, c2_im = _recip(d_re, z_im + w_im)
                s2_re = c2_re * c2_re - c2_im * c2_im
                s2_im = 2.0 * c2_re * c2_im
                acc_re -= s2_re * u2_re + s2_im * u2_im
                acc_im -= s2_re * u2_im - s2_im * u2_re
    p_off = pid_s.to(tl.int64) * M + offs_m
    tl.store(part_ptr + 2 * p_off, tl.sum(acc_re, axis=0), mask=mask_m)
    tl.store(part_ptr + 2 * p_off + 1, tl.sum(acc_im, axis=0), mask=mask_m)


def _block_r(R: int) -> int:
    return triton.next_power_of_2(max(R, 1))


def cauchy_fwd_triton(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Forward launcher: v (R, H, N), z (M,), w (H, N) complex -> (R, H, M). No autograd."""
    R, H, N = v.shape
    M = z.shape[0]
    out = empty_output((R, H, M), dtype=v.dtype, device=v.device)          # (R, H, M)
    if out.numel() == 0:
        return out
    grid = lambda meta: (H, triton.cdiv(M, meta["BLOCK_M"]))  # noqa: E731
    _cauchy_fwd_kernel[grid](planes(v), planes(z), planes(w), torch.view_as_real(out), H, N, M,
                             R=R, BLOCK_R=_block_r(R), SYMMETRIC=symmetric)
    return out


def cauchy_bwd_triton(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                      symmetric: bool = False, need_vw: bool = True, need_z: bool = True
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Backward launcher: (grad_v (R, H, N), grad_z (M,), grad_w (H, N)) for grad (R, H, M), each
    None where not asked for. No autograd."""
    R, H, N = v.shape
    M = z.shape[0]
    g, vp, zp, wp = planes(grad), planes(v), planes(z), planes(w)
    gv = gz = gw = None
    if need_vw:
        gv = empty_output(v.shape, dtype=v.dtype, device=v.device)         # (R, H, N)
        gw = empty_output(w.shape, dtype=w.dtype, device=w.device)         # (H, N)
        if M == 0 or R == 0:
            gv.zero_()
            gw.zero_()
        elif gv.numel():
            grid = lambda meta: (H, triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
            _cauchy_bwd_vw_kernel[grid](g, vp, zp, wp, torch.view_as_real(gv), torch.view_as_real(gw),
                                        H, N, M, R=R, BLOCK_R=_block_r(R), SYMMETRIC=symmetric)
    if need_z:
        gz = empty_output(z.shape, dtype=z.dtype, device=z.device)         # (M,)
        if gz.numel():
            # Split the rows so that enough programs run in parallel; each split writes its own
            # partial row, summed below in a fixed order (deterministic, no atomics).
            splits = max(1, min(H, 1 if interpreter_on() else 64))
            rows = triton.cdiv(max(H, 1), splits)
            splits = triton.cdiv(max(H, 1), rows)
            part = torch.empty(splits, M, dtype=z.dtype, device=z.device)   # (S, M)
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), splits)  # noqa: E731
            _cauchy_bwd_z_kernel[grid](g, vp, zp, wp, torch.view_as_real(part), H, N, M, rows,
                                       R=R, BLOCK_R=_block_r(R), SYMMETRIC=symmetric)
            torch.sum(part, dim=0, out=gz)                                   # (M,)
    return gv, gz, gw


def ptxas_cases() -> list:
    """What `tests/kernels/ptxas_check.py` compiles ahead of time: S4 with one output channel and
    rank 1 sums R = 4 numerators (one block of 4 rows), symmetric or not."""
    cases = [{"R": 4, "BLOCK_R": 4, "SYMMETRIC": s} for s in (True, False)]
    return [(_cauchy_fwd_kernel, cases), (_cauchy_bwd_vw_kernel, cases), (_cauchy_bwd_z_kernel, cases)]
