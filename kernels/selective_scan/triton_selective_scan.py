"""Triton kernels for the selective scan (Mamba), then their launchers (see `reference.py` for the
recurrence and the meaning of `saved`).

    x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,   y_t = (C_t . x_t + D u_t) * silu(z_t)

A program owns one batch row and a block of BLOCK_D channels of one group of B/C: grid
(batch, G, ceil(D / G / BLOCK_D)). It keeps the (BLOCK_D, BLOCK_N) state tile in registers
(BLOCK_N is N padded to a power of two, the padding masked) and walks the tokens one by one as the
definition does, so nothing of size (batch, L, D, N) is formed and, unlike the chunked path, no
exponent bound or decay floor is needed.

- forward: writes y (D skip and z gate applied), the state before every CHUNK-th token (`saved`)
  and the last state.
- backward: walks the chunks from the last to the first. Per chunk it recomputes the states from
  the saved one into a scratch buffer of one chunk per program (batch * D * CHUNK * BLOCK_N
  elements in all), then runs the adjoint lam_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1} backwards
  through the chunk. Per-token gradients are stored directly. The per-token B and C gradients are
  summed over the block's channels in the kernel and over the blocks of a group by the launcher;
  A, D and time-invariant B and C are summed over tokens in the kernel and over batch rows by the
  launcher, in a fixed order (no atomics: the results are bitwise reproducible).
The launchers form dt = softplus(delta + delta_bias) with torch (the chunked path's numbers) and
apply softplus's slope to the kernel's dt gradient, so the kernels take dt per token. Compute is in
the compute dtype of the chunked path (float32, or float64 when an input is).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels._triton import autotune_configs, empty_output
from kernels.selective_scan import reference
from kernels.selective_scan.reference import compute_dtype


def _fwd_configs() -> list[triton.Config]:
    # The block sizes are fixed by the launchers (they size the partials and the scratch buffer),
    # so only the warps could be tuned. Each kernel keeps the count that compiles for sm_80 and
    # sm_90 without spills in every case of `ptxas_cases`: four warps spilled 16 bytes in the
    # forward (sm_80, BLOCK_N = 64), two spilled 4 bytes in the backward (sm_80, BLOCK_N = 32).
    return autotune_configs({}, [({}, 2)])


def _bwd_configs() -> list[triton.Config]:
    return autotune_configs({}, [({}, 4)])


@triton.jit
def _layout(pid_b, g, blk, N, G, Dg, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """A program's offsets: channels (BLOCK_D,) and their mask, the state mask (BLOCK_N,), the
    (BLOCK_D, BLOCK_N) mask and offsets into a (D, N) tensor, the batch row's first element in a
    (b, D, N) tensor, and the rows of B/C (b, G, N, L) in units of L."""
    offs_l = blk * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_l < Dg
    offs_d = g * Dg + offs_l
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * N + offs_n[None, :]
    return offs_d, mask_d, mask_n, mask, dn, pid_b * (G * Dg) * N, (pid_b * G + g) * N + offs_n


@triton.autotune(configs=_fwd_configs(), key=["N", "Dg"])
@triton.jit
def _selective_scan_fwd_kernel(u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, x0_ptr, reset_ptr,
                               y_ptr, last_ptr, saved_ptr, L, N, G, Dg, chunk, n_chunks,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BC_VARY: tl.constexpr,
                               HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    # The per-token work is written out in the loop, not in helpers: the interpreter (the tests)
    # pays for every helper call; compiled, both forms are the same code.
    pid_b = tl.program_id(0).to(tl.int64)
    offs_d, mask_d, mask_n, mask, dn, row_state, bc_rows = _layout(
        pid_b, tl.program_id(1), tl.program_id(2), N, G, Dg, BLOCK_D, BLOCK_N)
    dim = G * Dg
    A = tl.load(A_ptr + dn, mask=mask, other=0.0)                               # (BLOCK_D, BLOCK_N)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)                        # (BLOCK_D,)
    B_fix = A                                                                   # unused with per-token B/C
    C_fix = A
    if not BC_VARY:
        B_fix = tl.load(B_ptr + dn, mask=mask, other=0.0)
        C_fix = tl.load(C_ptr + dn, mask=mask, other=0.0)
    tok = (pid_b * dim + offs_d) * L                                            # (BLOCK_D,) row starts
    bc = bc_rows * L                                                            # (BLOCK_N,) row starts
    x = tl.load(x0_ptr + row_state + dn, mask=mask, other=0.0)                  # (BLOCK_D, BLOCK_N)
    for k in range(n_chunks):
        tl.store(saved_ptr + (pid_b * n_chunks + k) * dim * N + dn, x, mask=mask)
        for t in range(k * chunk, tl.minimum(k * chunk + chunk, L)):
            u = tl.load(u_ptr + tok + t, mask=mask_d, other=0.0)
            dt = tl.load(dt_ptr + tok + t, mask=mask_d, other=0.0)
            if BC_VARY:
                Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0)[None, :]
                Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0)[None, :]
            else:
                Bt = B_fix
                Ct = C_fix
            if HAS_RESET:
                x = tl.where(tl.load(reset_ptr + pid_b * L + t) != 0, 0.0, x)
            x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * Bt
            y = tl.sum(x * Ct, axis=1) + Dv * u
            if HAS_Z:
                zt = tl.load(z_ptr + tok + t, mask=mask_d, other=0.0)
                y = y * zt / (1.0 + tl.exp(-zt))
            tl.store(y_ptr + tok + t, y, mask=mask_d)
    tl.store(last_ptr + row_state + dn, x, mask=mask)


@triton.jit
def _recompute(scr, x, u_ptr, dt_ptr, B_ptr, reset_ptr, tok, bc, row_r, t0, n, mask_d, mask_n, A, B_fix,
               TILE: tl.constexpr, BC_VARY: tl.constexpr, HAS_RESET: tl.constexpr):
    """Runs a chunk's n tokens from t0 on, storing the state before token t0 + j in slot j of the
    scratch tile `scr`; returns the state after the last one."""
    for j in range(n):
        tl.store(scr + j * TILE, x)
        u = tl.load(u_ptr + tok + t0 + j, mask=mask_d, other=0.0)
        dt = tl.load(dt_ptr + tok + t0 + j, mask=mask_d, other=0.0)
        if BC_VARY:
            Bt = tl.load(B_ptr + bc + t0 + j, mask=mask_n, other=0.0)[None, :]
        else:
            Bt = B_fix
        if HAS_RESET:
            x = tl.where(tl.load(reset_ptr + row_r + t0 + j) != 0, 0.0, x)
        x = tl.exp(dt[:, None] * A) * x + (dt * u)[:, None] * Bt
    return x


@triton.jit
def _chunk_bwd(scr, x, lam, gA, gD, gB_sum, gC_sum, gy_ptr, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr,
               gu_ptr, gdt_ptr, gz_ptr, gB_ptr, gC_ptr, tok, bc, gbc, row_r, t0, n, mask_d, mask_n, A, Dv, B_fix, C_fix,
               TILE: tl.constexpr, BC_VARY: tl.constexpr, HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    """The adjoint through a chunk's n tokens from the last to the first. x: the state after the
    last token; lam: dLoss/dx there from the tokens after the chunk. Stores the per-token gradients
    and returns lam passed to the state before the chunk and the updated sums."""
    for i in range(n):
        t = t0 + n - 1 - i
        xp = tl.load(scr + (n - 1 - i) * TILE)                                  # the state before token t
        u = tl.load(u_ptr + tok + t, mask=mask_d, other=0.0)
        dt = tl.load(dt_ptr + tok + t, mask=mask_d, other=0.0)
        if BC_VARY:
            Bt = tl.load(B_ptr + bc + t, mask=mask_n, other=0.0)[None, :]
            Ct = tl.load(C_ptr + bc + t, mask=mask_n, other=0.0)[None, :]
        else:
            Bt = B_fix
            Ct = C_fix
        g = tl.load(gy_ptr + tok + t, mask=mask_d, other=0.0)                   # (BLOCK_D,)
        if HAS_Z:
            zt = tl.load(z_ptr + tok + t, mask=mask_d, other=0.0)
            sig = 1.0 / (1.0 + tl.exp(-zt))
            y = tl.sum(x * Ct, axis=1) + Dv * u
            tl.store(gz_ptr + tok + t, g * y * sig * (1.0 + zt * (1.0 - sig)), mask=mask_d)
            g = g * zt * sig
        gD += g * u
        lam += g[:, None] * Ct                                                  # dLoss/dx_t
        if BC_VARY:
            tl.store(gC_ptr + gbc + t, tl.sum(g[:, None] * x, axis=0), mask=mask_n)
            tl.store(gB_ptr + gbc + t, tl.sum(lam * (dt * u)[:, None], axis=0), mask=mask_n)
        else:
            gC_sum += g[:, None] * x
            gB_sum += lam * (dt * u)[:, None]
        g_dtu = tl.sum(lam * Bt, axis=1)                                        # (BLOCK_D,)
        lam = lam * tl.exp(dt[:, None] * A)
        if HAS_RESET:
            keep = tl.load(reset_ptr + row_r + t) == 0
            xp_kept = tl.where(keep, xp, 0.0)
            lam_da = lam * xp_kept                                              # dLoss/d(dt A)
            lam = tl.where(keep, lam, 0.0)
        else:
            lam_da = lam * xp
        gA += lam_da * dt[:, None]
        tl.store(gu_ptr + tok + t, g_dtu * dt + g * Dv, mask=mask_d)
        tl.store(gdt_ptr + tok + t, tl.sum(lam_da * A, axis=1) + g_dtu * u, mask=mask_d)
        x = xp
    return lam, gA, gD, gB_sum, gC_sum


@triton.autotune(configs=_bwd_configs(), key=["N", "Dg"])
@triton.jit
def _selective_scan_bwd_kernel(gy_ptr, glast_ptr, saved_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr,
                               reset_ptr, scratch_ptr, gu_ptr, gdt_ptr, gz_ptr, gB_ptr, gC_ptr, gA_ptr, gD_ptr,
                               ginit_ptr, L, N, G, Dg, chunk, n_chunks, n_blocks,
                               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BC_VARY: tl.constexpr,
                               HAS_Z: tl.constexpr, HAS_RESET: tl.constexpr):
    pid_b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1)
    blk = tl.program_id(2)
    offs_d, mask_d, mask_n, mask, dn, row_state, bc_rows = _layout(pid_b, g, blk, N, G, Dg, BLOCK_D, BLOCK_N)
    dim = G * Dg
    A = tl.load(A_ptr + dn, mask=mask, other=0.0)                               # (BLOCK_D, BLOCK_N)
    Dv = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0)                        # (BLOCK_D,)
    B_fix = A                                                                   # unused with per-token B/C
    C_fix = A
    if not BC_VARY:
        B_fix = tl.load(B_ptr + dn, mask=mask, other=0.0)
        C_fix = tl.load(C_ptr + dn, mask=mask, other=0.0)
    tok = (pid_b * dim + offs_d) * L
    bc = bc_rows * L
    prog = (pid_b * G + g) * n_blocks + blk
    gbc = (prog * N + tl.arange(0, BLOCK_N)) * L                # B/C partials (b, G, n_blocks, N, L)
    TILE: tl.constexpr = BLOCK_D * BLOCK_N
    scr = scratch_ptr + prog * chunk * TILE + tl.arange(0, BLOCK_D)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    lam = tl.load(glast_ptr + row_state + dn, mask=mask, other=0.0)
    gA = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    gB_sum = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    gC_sum = tl.zeros((BLOCK_D, BLOCK_N), dtype=A.dtype)
    gD = tl.zeros((BLOCK_D,), dtype=A.dtype)
    for kk in range(n_chunks):
        k = n_chunks - 1 - kk
        t0 = k * chunk
        n = tl.minimum(chunk, L - t0)
        x = tl.load(saved_ptr + (pid_b * n_chunks + k) * dim * N + dn, mask=mask, other=0.0)
        x = _recompute(scr, x, u_ptr, dt_ptr, B_ptr, reset_ptr, tok, bc, pid_b * L, t0, n, mask_d, mask_n, A, B_fix,
                       TILE, BC_VARY, HAS_RESET)
        tl.debug_barrier()                                                      # scratch written before read
        lam, gA, gD, gB_sum, gC_sum = _chunk_bwd(
            scr, x, lam, gA, gD, gB_sum, gC_sum, gy_ptr, u_ptr, dt_ptr, B_ptr, C_ptr, z_ptr, reset_ptr, gu_ptr,
            gdt_ptr, gz_ptr, gB_ptr, gC_ptr, tok, bc, gbc, pid_b * L, t0, n, mask_d, mask_n, A, Dv, B_fix, C_fix,
            TILE, BC_VARY, HAS_Z, HAS_RESET)
        tl.debug_barrier()                                                      # read before the next chunk writes
    tl.store(ginit_ptr + row_state + dn, lam, mask=mask)
    tl.store(gA_ptr + row_state + dn, gA, mask=mask)                            # partials (b, D, N)
    tl.store(gD_ptr + pid_b * dim + offs_d, gD, mask=mask_d)                    # partials (b, D)
    if not BC_VARY:
        tl.store(gB_ptr + row_state + dn, gB_sum, mask=mask)
        tl.store(gC_ptr + row_state + dn, gC_sum, mask=mask)


def _blocks(N: int, Dg: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_N): N padded to a power of two; a state tile of at most 128 elements, at
    most 32 channels and no more than a group has. With 256 elements, ptxas spilled a few bytes in
    the backward at 4 and 8 warps (the per-token sums over channels of the B/C gradients); small
    tiles also mean more programs, which a scan that walks the tokens one by one needs."""
    block_n = triton.next_power_of_2(N)
    return min(max(1, 128 // block_n), 32, triton.next_power_of_2(Dg)), block_n


def _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset):
    """Contiguous kernel inputs in the compute dtype, pre = delta + delta_bias, and the launch
    constants. dt is formed here with torch's softplus (the chunked path's numbers exactly); the
    kernels take dt per token."""
    f = compute_dtype(u, delta, A, B, C)
    _, dim, L = u.shape
    G = 1 if B.dim() == 2 else B.shape[1]

    def c(x):
        return x.to(f).contiguous()

    pre = delta.to(f) + delta_bias.to(f)[:, None]                               # (b, D, L)
    t = {"u": c(u), "dt": (F.softplus(pre) if delta_softplus else pre).contiguous(), "A": c(A), "B": c(B),
         "C": c(C), "D": c(D), "x0": c(initial_state)}
    t["z"] = t["u"] if z is None else c(z)                                      # not read without z
    # One int8 per token; a one-element stand-in (never read) without resets.
    t["reset"] = reset.to(torch.int8).contiguous() if reset is not None else u.new_zeros(1, dtype=torch.int8)
    block_d, block_n = _blocks(A.shape[1], dim // G)
    const = {"BLOCK_D": block_d, "BLOCK_N": block_n, "BC_VARY": B.dim() != 2, "HAS_Z": z is not None,
             "HAS_RESET": reset is not None}
    sizes = (L, A.shape[1], G, dim // G, reference.CHUNK, -(-L // reference.CHUNK))
    return f, pre, t, sizes, const


def selective_scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset=None):
    """Forward launcher on canonical shapes (see `op.py`): y (b, D, L), the last state (b, D, N) and
    the states before every CHUNK-th token (b, ceil(L / CHUNK), D, N), all in the compute dtype."""
    f, _, t, sizes, const = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset)
    batch, dim, L = u.shape
    _, N, G, Dg, _, n_chunks = sizes
    y = empty_output((batch, dim, L), dtype=f, device=u.device)
    last = empty_output((batch, dim, N), dtype=f, device=u.device)
    saved = empty_output((batch, n_chunks, dim, N), dtype=f, device=u.device)
    if batch * dim > 0:
        grid = (batch, G, triton.cdiv(Dg, const["BLOCK_D"]))
        _selective_scan_fwd_kernel[grid](t["u"], t["dt"], t["A"], t["B"], t["C"], t["D"], t["z"], t["x0"],
                                         t["reset"], y, last, saved, *sizes, **const)
    return y, last, saved


def selective_scan_bwd_triton(gy, g_last, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                              reset=None):
    """Backward launcher: gradients w.r.t. (u, delta, A, B, C, D, z, delta_bias, initial_state) in
    the compute dtype and their inputs' shapes (z's is empty without z). The partial sums the
    kernel writes are added here in a fixed order."""
    f, pre, t, sizes, const = _prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset)
    batch, dim, L = u.shape
    _, N, G, Dg, chunk, _ = sizes
    n_blocks = triton.cdiv(Dg, const["BLOCK_D"])

    def out(*shape):
        return empty_output(shape, dtype=f, device=u.device)

    gu, gdt, g_init = out(batch, dim, L), out(batch, dim, L), out(batch, dim, N)
    gz = out(batch, dim, L) if z is not None else u.new_empty(0, dtype=f)
    gA, gD = out(batch, dim, N), out(batch, dim)                                # partials per batch row
    part = (batch, G, n_blocks, N, L) if const["BC_VARY"] else (batch, dim, N)  # per channel block / batch row
    gB, gC = out(*part), out(*part)
    scratch = u.new_empty(batch * G * n_blocks * chunk * const["BLOCK_D"] * const["BLOCK_N"], dtype=f)
    if batch * dim > 0:
        _selective_scan_bwd_kernel[(batch, G, n_blocks)](
            gy.to(f).contiguous(), g_last.to(f).contiguous(), saved.to(f).contiguous(), t["u"], t["dt"], t["A"],
            t["B"], t["C"], t["D"], t["z"], t["reset"], scratch, gu, gdt, gz if z is not None else gu, gB, gC, gA,
            gD, g_init, *sizes, n_blocks, **const)
    g_delta = gdt * torch.where(pre > 20, 1.0, torch.sigmoid(pre)) if delta_softplus else gdt   # (b, D, L)
    gB, gC = (g.sum(2) if const["BC_VARY"] else g.sum(0) for g in (gB, gC))
    return gu, g_delta, gA.sum(0), gB, gC, gD.sum(0), gz, g_delta.sum((0, 2)), g_init


def ptxas_cases() -> list:
    """What `tests/kernels/ptxas_check.py` compiles ahead of time: both kernels at the block sizes
    `_blocks` gives for N padded to 1, 16, 32, 64 and 128, with per-token and with fixed B/C
    (resets and the z gate on: the most registers), and at 16 also without the z gate."""
    cases = []
    for block_n in (1, 16, 32, 64, 128):
        for vary in (True, False):
            for has_z in ((True, False) if block_n == 16 else (True,)):
                cases.append({"BLOCK_D": _blocks(block_n, 1 << 20)[0], "BLOCK_N": block_n, "BC_VARY": vary,
                              "HAS_Z": has_z, "HAS_RESET": True})
    types = {"reset_ptr": "*i8"}
    return [(_selective_scan_fwd_kernel, cases, types), (_selective_scan_bwd_kernel, cases, types)]
