"""Triton kernels for the chunked scan of Mamba-2 (SSD), then their launchers (`docs/ssd_op.md`,
"Chunked form").

The kernels run the generic diagonal scan, per head h of a group g(h):

    S_t = exp(a_t) S_{t-1} + u_t B_t^T        (P, N)        y_t = S_t C_t        (P,)

with a_t = logdecay_t; SSD is the case u = dt x, a = dt A (`ssd_fwd_triton` / `ssd_bwd_triton`),
and the same core serves any scan of this form (`scan_core_fwd_triton` / `scan_core_bwd_triton`).

- forward `_scan_fwd_kernel`: grid (batch * heads, blocks of BLOCK_P rows, blocks of BLOCK_N
  columns of the state). Each program walks the chunks of BLOCK_T tokens in order, keeping its
  slice of the state in registers (transposed, (BLOCK_N, BLOCK_P), so no dot needs a transpose):
  y += (Lm o C B^T) u + din o (C S_in^T) over its columns, then S = g S + (dout o u)^T B. It
  writes the state entering every chunk (`saved`) for the backward. y is a sum over the blocks of
  columns (the product with C and the masked C B^T both split over N): each block writes its part
  and the launcher adds them.
- backward, two kernels. `_scan_bwd_state_kernel` (same grid) walks the chunks in reverse with the
  state's adjoint dS (dS_in = g dS_out + sum_i din_i dy_i C_i^T) and writes the adjoint leaving
  every chunk (`dstates`) and dS0. `_scan_bwd_chunk_kernel` (grid: batch * heads * chunks, blocks
  of P, blocks of N) then differentiates each chunk on its own from its saved incoming state and
  its outgoing adjoint; no loop, so every chunk runs in parallel. du, dB, dC and the gradient of
  the log decays are partial sums (over the blocks of N, of P, and the heads of a group) that the
  launcher adds up in a fixed order: no atomics, deterministic.

Decay factors of a chunk (cs = inclusive cumsum of a inside the chunk, tot its total):
Lm[i, j] = exp(cs_i - cs_j) (j <= i), din_i = exp(cs_i), dout_j = exp(tot - cs_j), g = exp(tot).
The cumsum and its differences are formed in float64 and cast, because in float32 the difference
of two long sums loses the small differences that matter most. The gradient of the log decays
uses, for token r, sum_{i >= r > j} dseg_ij + sum_{i >= r} ddin_i din_i + sum_{j < r} ddout_j
dout_j + dg g, sums without the cancellation a reverse cumsum of row-minus-column sums would have.
A document boundary (doc changes) zeroes every factor that crosses it. float32 dots use "tf32x3"
(`DOT_PRECISION`; plain tf32 would cost ~1e-3 relative error); float64 inputs (the interpreter's
ground-truth tests) run in float64 throughout, dots "ieee".

Memory: `saved` holds one state per chunk_size tokens (b, ~L / chunk_size, H, P, N). The backward
briefly holds the state entering, and the adjoint leaving, every kernel chunk (two buffers of
(b, L / BLOCK_T, H, P, N)) and the partial sums (du: N / BLOCK_N copies of u; dB, dC: one
(b, L, H, N) per block of P).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._triton import autotune_configs, empty_output, interpreter_on

# The dots' input precision for float32 data (float64 data always uses "ieee"): "tf32x3" keeps
# float32 accuracy on the tensor cores (three tf32 products per dot); "ieee" float32 dots run on
# the FMA units, holding whole operand slices in registers (they spilled at every tile size tried).
DOT_PRECISION = "tf32x3"
# Tile limits, read at call time (tests lower MAX_BLOCK_N to get several blocks of the state's
# columns). On a GPU 16 tokens by 16 columns of the state: tf32x3 splits every dot operand in
# two, and with 32 either way the kernels spilled on sm_90. The interpreter runs programs one by
# one, so it takes wider tiles (fewer programs, same arithmetic).
MAX_BLOCK_T = 64 if interpreter_on() else 16
MAX_BLOCK_N = 64 if interpreter_on() else 16


# Autotune configs (BLOCK_P, num_warps); every one compiles for sm_80 and sm_90 without register
# spills for the BLOCK_T and BLOCK_N the launchers pass on a GPU (tests/kernels/test_ptxas.py).
def _fwd_configs() -> list[triton.Config]:
    gpu = [({"BLOCK_P": bp}, nw) for bp, nw in ((32, 2), (64, 4))]
    return autotune_configs({"BLOCK_P": 32}, gpu)


def _bwd_chunk_configs() -> list[triton.Config]:
    # 32 tokens or columns per tile spilled 1.3 KB here on sm_90 (thirteen tf32x3 dots).
    gpu = [({"BLOCK_P": bp}, 4) for bp in (16, 32)]
    return autotune_configs({"BLOCK_P": 32}, gpu)


@triton.jit
def _tile(offs_r, valid_r, stride, offs_w, W, TRANSPOSED: tl.constexpr):
    """int32 offsets and mask of the rows offs_r (tokens, `stride` elements apart) by the columns
    offs_w < W: (R, BW), or (BW, R) if TRANSPOSED. Added to a per-chunk scalar base pointer, so the
    tiles' addresses stay cheap in registers."""
    if TRANSPOSED:
        offs = offs_w[:, None] + offs_r[None, :] * stride
        mask = (offs_w < W)[:, None] & valid_r[None, :]
    else:
        offs = offs_r[:, None] * stride + offs_w[None, :]
        mask = valid_r[:, None] & (offs_w < W)[None, :]
    return offs, mask


@triton.jit
def _state(offs_p, offs_n, P, N, TRANSPOSED: tl.constexpr):
    """Offsets and mask of the (BLOCK_P, BLOCK_N) slice of a (P, N) state, or of its transpose
    (BLOCK_N, BLOCK_P) if TRANSPOSED."""
    return _tile(offs_p, offs_p < P, N, offs_n, N, TRANSPOSED)


@triton.jit
def _chunk_decays(a_ptr, doc_ptr, i, h, t0, L, H, dtype: tl.constexpr, HAS_DOC: tl.constexpr,
                  BLOCK_T: tl.constexpr):
    """The chunk's decay factors (module docstring): Lm (T, T), din (T,), dout (T,), g scalar,
    with the tokens past L given a = 0 (they carry nothing)."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    a = tl.load(a_ptr + (i * L + offs_t) * H + h, mask=offs_t < L, other=0.0).to(tl.float64)
    cs = tl.cumsum(a, 0)                                                   # (T,) float64
    tot = tl.sum(a, 0)
    keep = offs_t[:, None] >= offs_t[None, :]                              # (T, T)
    din = tl.exp(cs.to(dtype))
    dout = tl.exp((tot - cs).to(dtype))
    g = tl.exp(tot.to(dtype))
    if HAS_DOC:
        # Tokens past L take the last token's document, so they do not cut the chunk's tail.
        d = tl.load(doc_ptr + i * L + tl.minimum(offs_t, L - 1))
        d_prev = tl.load(doc_ptr + i * L + tl.maximum(t0 - 1, 0))
        d_last = tl.load(doc_ptr + i * L + tl.minimum(t0 + BLOCK_T - 1, L - 1))
        keep = keep & (d[:, None] == d[None, :])
        din = tl.where(d == d_prev, din, 0.0)
        dout = tl.where(d == d_last, dout, 0.0)
        g = tl.where(d_last == d_prev, g, 0.0)
    seg = (cs[:, None] - cs[None, :]).to(dtype)                            # (T, T)
    Lm = tl.exp(tl.where(keep, seg, float("-inf")))                       # (T, T)
    return Lm, din, dout, g


# long: one chunk's forward is a handful of dots sharing the loaded tiles; split into helpers it
# would reload them.
@triton.autotune(configs=_fwd_configs(), key=["P", "N", "BLOCK_T", "BLOCK_N", "HAS_DOC", "STORE_Y"])
@triton.jit
def _scan_fwd_kernel(u_ptr, a_ptr, B_ptr, C_ptr, init_ptr, doc_ptr, y_ptr, final_ptr, states_ptr,
                     L, H, G, P, N, batch, n_segs, seg_chunks, save_every,
                     HAS_DOC: tl.constexpr, STORE_Y: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program (batch row, head, segment; block of P; block of N) runs chunks seg * seg_chunks ..
    from the state init[batch row, segment, head] ((b, n_segs, H, P, N)) and writes the state
    entering every chunk c with c % save_every == 0 to states[c // save_every]. STORE_Y: also y
    (its part over this block of N) and the final state (the forward: one segment); without it
    only the states (the backward's recomputation, one segment per saved state)."""
    pid = tl.program_id(0).to(tl.int64)
    bh, seg = pid // n_segs, pid % n_segs
    nb = tl.program_id(2).to(tl.int64)
    i, h = bh // H, bh % H
    grp = h // (H // G)
    dtype = u_ptr.dtype.element_ty
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)          # int32: tile offsets stay 32-bit
    offs_r = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(L, BLOCK_T)
    n_saved = tl.cdiv(n_chunks, save_every)
    # This program's part of y: the terms of its BLOCK_N columns of the state.
    y_ptr += nb * batch * L * H * P
    # The state is kept transposed, St = S^T (BLOCK_N, BLOCK_P), so no dot needs a transpose.
    st_offs, st_mask = _state(offs_p, offs_n, P, N, True)
    St = tl.load(init_ptr + ((i * n_segs + seg) * H + h) * P * N + st_offs, mask=st_mask, other=0.0)
    first = seg * seg_chunks
    for c in tl.range(first, tl.minimum(first + seg_chunks, n_chunks), num_stages=1):
        t0 = c * BLOCK_T
        if c % save_every == 0:
            tl.store(states_ptr + ((i * n_saved + c // save_every) * H + h) * P * N + st_offs, St, mask=st_mask)
        Lm, din, dout, g = _chunk_decays(a_ptr, doc_ptr, i, h, t0, L, H, dtype, HAS_DOC, BLOCK_T)
        valid = t0 + offs_r < L
        x_ptr = ((i * L + t0) * H + h) * P                                 # token t0 of u and y
        bc_ptr = ((i * L + t0) * G + grp) * N                              # token t0 of B and C
        x_offs, x_mask = _tile(offs_r, valid, H * P, offs_p, P, False)
        u = tl.load(u_ptr + x_ptr + x_offs, mask=x_mask, other=0.0)        # (T, BLOCK_P)
        nt_offs, nt_mask = _tile(offs_r, valid, G * N, offs_n, N, True)
        Bt = tl.load(B_ptr + bc_ptr + nt_offs, mask=nt_mask, other=0.0)    # (BLOCK_N, T)
        if STORE_Y:
            n_offs, n_mask = _tile(offs_r, valid, G * N, offs_n, N, False)
            Cm = tl.load(C_ptr + bc_ptr + n_offs, mask=n_mask, other=0.0)  # (T, BLOCK_N)
            M = tl.dot(Cm, Bt, input_precision=PRECISION) * Lm             # (T, T)
            y = tl.dot(M, u, input_precision=PRECISION)                    # (T, BLOCK_P)
            y += din[:, None] * tl.dot(Cm, St, input_precision=PRECISION)
            tl.store(y_ptr + x_ptr + x_offs, y, mask=x_mask)
        St = tl.dot(Bt, u * dout[:, None], g * St, input_precision=PRECISION)
    if STORE_Y:
        tl.store(final_ptr + bh * P * N + st_offs, St, mask=st_mask)


@triton.jit
def _logdecay_grad(dM, M, ddin, din, ddout, dout, dg, g, BLOCK_T: tl.constexpr):
    """Gradient w.r.t. the chunk's log decays a (T,) from those of its decay factors
    (module docstring): dseg = dM o M, ddin, ddout (T,), dg scalar."""
    dseg = dM * M                                                          # (T, T), zero above the diagonal
    before = tl.cumsum(dseg, 1) - dseg                                     # [i, r] = sum_{j < r} dseg_ij
    rows = tl.arange(0, BLOCK_T)
    da = tl.sum(tl.where(rows[:, None] >= rows[None, :], before, 0.0), 0)  # (T,)
    win = ddin * din
    wout = ddout * dout
    da += tl.cumsum(win, 0, reverse=True) + (tl.cumsum(wout, 0) - wout)
    return da + dg * g


@triton.autotune(configs=_fwd_configs(), key=["P", "N", "BLOCK_T", "BLOCK_N", "HAS_DOC"])
@triton.jit
def _scan_bwd_state_kernel(dy_ptr, dfinal_ptr, a_ptr, C_ptr, doc_ptr, dstates_ptr, dS0_ptr, L, H, G, P, N,
                           HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """The state's adjoint, chunk by chunk in reverse: dstates[c] = dS_out of chunk c, then
    dS_in = g dS_out + sum_i din_i dy_i C_i^T; dS0 after the first chunk. Kept transposed."""
    bh = tl.program_id(0).to(tl.int64)
    i, h = bh // H, bh % H
    grp = h // (H // G)
    dtype = dy_ptr.dtype.element_ty
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_T)
    n_chunks = tl.cdiv(L, BLOCK_T)
    st_offs, st_mask = _state(offs_p, offs_n, P, N, True)
    dSt = tl.load(dfinal_ptr + bh * P * N + st_offs, mask=st_mask, other=0.0)   # (BLOCK_N, BLOCK_P)
    for k in tl.range(0, n_chunks, num_stages=1):
        c = n_chunks - 1 - k
        t0 = c * BLOCK_T
        tl.store(dstates_ptr + ((i * n_chunks + c) * H + h) * P * N + st_offs, dSt, mask=st_mask)
        _, din, _, g = _chunk_decays(a_ptr, doc_ptr, i, h, t0, L, H, dtype, HAS_DOC, BLOCK_T)
        valid = t0 + offs_r < L
        x_offs, x_mask = _tile(offs_r, valid, H * P, offs_p, P, False)
        dy = tl.load(dy_ptr + ((i * L + t0) * H + h) * P + x_offs, mask=x_mask, other=0.0)   # (T, BLOCK_P)
        nt_offs, nt_mask = _tile(offs_r, valid, G * N, offs_n, N, True)
        Ct = tl.load(C_ptr + ((i * L + t0) * G + grp) * N + nt_offs, mask=nt_mask, other=0.0)  # (BLOCK_N, T)
        dSt = tl.dot(Ct, dy * din[:, None], g * dSt, input_precision=PRECISION)
    tl.store(dS0_ptr + bh * P * N + st_offs, dSt, mask=st_mask)


# long: the backward of one chunk needs every recomputed tile of its forward at once; split into
# helpers it would reload or recompute them.
@triton.autotune(configs=_bwd_chunk_configs(), key=["P", "N", "BLOCK_T", "BLOCK_N", "HAS_DOC"])
@triton.jit
def _scan_bwd_chunk_kernel(dy_ptr, saved_ptr, dstates_ptr, u_ptr, a_ptr, B_ptr, C_ptr, doc_ptr,
                           du_ptr, da_ptr, dB_ptr, dC_ptr, L, H, G, P, N, batch,
                           HAS_DOC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr):
    """The gradients of one chunk (grid: batch * heads * chunks, blocks of P, blocks of N) from
    its incoming state (saved) and its outgoing state's adjoint (dstates)."""
    n_chunks = tl.cdiv(L, BLOCK_T)
    pid = tl.program_id(0).to(tl.int64)
    bh, c = pid // n_chunks, pid % n_chunks
    pb = tl.program_id(1).to(tl.int64)
    nb = tl.program_id(2).to(tl.int64)
    i, h = bh // H, bh % H
    grp = h // (H // G)
    dtype = u_ptr.dtype.element_ty
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)          # int32: tile offsets stay 32-bit
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_T)
    t0 = c * BLOCK_T
    # This program's partial sums: du (n_nblocks, b, L, H, P) over the blocks of N; da
    # (n_pblocks * n_nblocks, b, L, H); dB, dC (n_pblocks, b, L, H, N) over the blocks of P.
    du_ptr += nb * batch * L * H * P
    part = pb * batch + i
    part_a = (pb * tl.num_programs(2) + nb) * batch + i
    st_offs, st_mask = _state(offs_p, offs_n, P, N, True)
    s_offs, s_mask = _state(offs_p, offs_n, P, N, False)
    state = ((i * n_chunks + c) * H + h) * P * N
    S_int = tl.load(saved_ptr + state + st_offs, mask=st_mask, other=0.0)      # (BLOCK_N, BLOCK_P)
    S_in = tl.load(saved_ptr + state + s_offs, mask=s_mask, other=0.0)         # (BLOCK_P, BLOCK_N)
    dSt = tl.load(dstates_ptr + state + st_offs, mask=st_mask, other=0.0)      # (BLOCK_N, BLOCK_P)
    Lm, din, dout, g = _chunk_decays(a_ptr, doc_ptr, i, h, t0, L, H, dtype, HAS_DOC, BLOCK_T)
    valid = t0 + offs_r < L
    x_offs, x_mask = _tile(offs_r, valid, H * P, offs_p, P, False)
    xt_offs, xt_mask = _tile(offs_r, valid, H * P, offs_p, P, True)
    n_offs, n_mask = _tile(offs_r, valid, G * N, offs_n, N, False)
    nt_offs, nt_mask = _tile(offs_r, valid, G * N, offs_n, N, True)
    x_ptr = ((i * L + t0) * H + h) * P
    bc_ptr = ((i * L + t0) * G + grp) * N
    u = tl.load(u_ptr + x_ptr + x_offs, mask=x_mask, other=0.0)            # (T, BLOCK_P)
    ut = tl.load(u_ptr + x_ptr + xt_offs, mask=xt_mask, other=0.0)         # (BLOCK_P, T)
    dy = tl.load(dy_ptr + x_ptr + x_offs, mask=x_mask, other=0.0)          # (T, BLOCK_P)
    Bm = tl.load(B_ptr + bc_ptr + n_offs, mask=n_mask, other=0.0)          # (T, BLOCK_N)
    Bt = tl.load(B_ptr + bc_ptr + nt_offs, mask=nt_mask, other=0.0)        # (BLOCK_N, T)
    M = tl.dot(tl.load(C_ptr + bc_ptr + n_offs, mask=n_mask, other=0.0), Bt, input_precision=PRECISION) * Lm
    dM = tl.dot(dy, ut, input_precision=PRECISION)                         # (T, T)
    dCB = dM * Lm
    V = tl.dot(Bm, dSt, input_precision=PRECISION)                         # (T, BLOCK_P): dS_out B_j
    du = tl.dot(tl.trans(M), dy, input_precision=PRECISION) + dout[:, None] * V
    tl.store(du_ptr + x_ptr + x_offs, du, mask=x_mask)
    ddout = tl.sum(u * V, 1)                                               # (T,)
    dC = tl.dot(dCB, Bm, input_precision=PRECISION)
    dC = tl.dot(dy * din[:, None], S_in, dC, input_precision=PRECISION)    # (T, BLOCK_N)
    part_ptr = ((part * L + t0) * H + h) * N                               # token t0 of dB, dC parts
    pn_offs, _ = _tile(offs_r, valid, H * N, offs_n, N, False)
    tl.store(dC_ptr + part_ptr + pn_offs, dC, mask=n_mask)
    Ct = tl.load(C_ptr + bc_ptr + nt_offs, mask=nt_mask, other=0.0)        # (BLOCK_N, T)
    dBt = tl.dot(Ct, dCB, input_precision=PRECISION)
    dBt = tl.dot(dSt, ut * dout[None, :], dBt, input_precision=PRECISION)  # (BLOCK_N, T)
    pnt_offs, _ = _tile(offs_r, valid, H * N, offs_n, N, True)
    tl.store(dB_ptr + part_ptr + pnt_offs, dBt, mask=nt_mask)
    Cm = tl.load(C_ptr + bc_ptr + n_offs, mask=n_mask, other=0.0)          # (T, BLOCK_N)
    ddin = tl.sum(dy * tl.dot(Cm, S_int, input_precision=PRECISION), 1)    # (T,)
    dg = tl.sum(tl.sum(dSt * S_int, 1), 0)
    da = _logdecay_grad(dM, M, ddin, din, ddout, dout, dg, g, BLOCK_T)
    tl.store(da_ptr + ((part_a * L + t0) * H + h) + offs_r * H, da, mask=valid)


def _block_t(chunk_size: int) -> int:
    # tl.dot needs every dimension >= 16; the result does not depend on the chunk length, and the
    # work per token that does not grow with it (the state's) is the larger part.
    return min(max(16, triton.next_power_of_2(int(chunk_size))), MAX_BLOCK_T)


def _save_every(chunk_size: int) -> int:
    """Kernel chunks per saved state: about one saved state per chunk_size tokens."""
    return max(1, int(chunk_size) // _block_t(chunk_size))


def saved_chunks(L, chunk_size: int):
    """K, the number of states `scan_core_fwd_triton` saves for a sequence of L tokens: one per
    chunk_size tokens (rounded down to a multiple of the kernel chunk), at least one per kernel
    chunk of 16 to MAX_BLOCK_T tokens."""
    n_chunks = -(-L // _block_t(chunk_size))
    return -(-n_chunks // _save_every(chunk_size))


def _block_n(N: int) -> int:
    return min(max(16, triton.next_power_of_2(N)), MAX_BLOCK_N)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _precision(ct: torch.dtype) -> str:
    return "ieee" if ct == torch.float64 else DOT_PRECISION


def _doc_arg(doc, fallback):
    """The document counter as contiguous int64, or a placeholder pointer when there is none."""
    return (fallback, False) if doc is None else (doc.to(torch.int64).contiguous(), True)


def _sum_parts(parts: torch.Tensor) -> torch.Tensor:
    """Partial sums (n, ...) -> (...), in a fixed order; no copy when n == 1."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


def scan_core_fwd_triton(u, logdecay, B, C, S0, doc, chunk_size):
    """`S_t = exp(logdecay_t) S_{t-1} + u_t B_t^T`, `y_t = S_t C_t`, per batch row and head.

    u (b, L, H, P); logdecay (b, L, H) (the log of the decay, <= 0 in practice); B, C (b, L, G, N)
    with G dividing H, head h using group h // (H // G) (G == H: one B, C per head); S0
    (b, H, P, N) the state before the first token, or None for zeros; doc (b, L) int,
    non-decreasing, or None: the state restarts from zero before every token whose doc differs
    from its predecessor's (S0 feeds the first document only); chunk_size: tokens per chunk
    (the kernels use min(max(16, next power of two), MAX_BLOCK_T); the result does not depend
    on it). Returns (y (b, L, H, P), final (b, H, P, N), saved (b, K, H, P, N)), computed and
    returned in float64 for float64 u, else float32 (inputs of other dtypes are converted);
    final is the state after token L; saved holds K = `saved_chunks(L, chunk_size)` states, the
    state entering every chunk_size-th token (about; exactly every `_save_every(chunk_size)`
    kernel chunks), for `scan_core_bwd_triton`, which recomputes the states in between. No autograd.
    All tensors on one device (CUDA, or CPU under the interpreter)."""
    b, L, H, P = u.shape
    G, N = B.shape[-2:]
    ct = _compute_dtype(u)
    u, logdecay, B, C = (t.to(ct).contiguous() for t in (u, logdecay, B, C))
    S0 = u.new_zeros(b, H, P, N) if S0 is None else S0.to(ct).contiguous()
    block_t, block_n = _block_t(chunk_size), _block_n(N)
    n_nb = triton.cdiv(N, block_n)
    y = empty_output((n_nb, b, L, H, P), dtype=ct, device=u.device)
    final = empty_output((b, H, P, N), dtype=ct, device=u.device)
    saved = empty_output((b, saved_chunks(L, chunk_size), H, P, N), dtype=ct, device=u.device)
    if b * H * P == 0 or L == 0:
        return y.zero_().sum(0), final.copy_(S0), saved
    doc, has_doc = _doc_arg(doc, logdecay)

    def grid(meta):
        return (b * H, triton.cdiv(P, meta["BLOCK_P"]), n_nb)

    n_chunks = triton.cdiv(L, block_t)
    _scan_fwd_kernel[grid](u, logdecay, B, C, S0, doc, y, final, saved, L, H, G, P, N, b, 1, n_chunks,
                           _save_every(chunk_size), HAS_DOC=has_doc, STORE_Y=True, PRECISION=_precision(ct),
                           BLOCK_T=block_t, BLOCK_N=block_n)
    return _sum_parts(y), final, saved


def _chunk_states(saved, u, logdecay, B, C, doc, chunk_size, flags):
    """The state entering every kernel chunk (b, n_chunks, H, P, N), recomputed from `saved` (one
    state every `_save_every` chunks), each saved state's segment in parallel; `saved` itself
    when it already holds them all."""
    b, L, H, P = u.shape
    G, N = B.shape[-2:]
    every = _save_every(chunk_size)
    if every == 1:
        return saved
    n_segs = saved.shape[1]
    states = empty_output((b, triton.cdiv(L, flags["BLOCK_T"]), H, P, N), dtype=u.dtype, device=u.device)

    def grid(meta):
        return (b * H * n_segs, triton.cdiv(P, meta["BLOCK_P"]), triton.cdiv(N, flags["BLOCK_N"]))

    _scan_fwd_kernel[grid](u, logdecay, B, C, saved, doc, u, u, states, L, H, G, P, N, b, n_segs, every, 1,
                           STORE_Y=False, **flags)
    return states


def scan_core_bwd_triton(dy, dfinal, saved, u, logdecay, B, C, S0, doc, chunk_size):
    """Gradients of <dy, y> + <dfinal, final> of `scan_core_fwd_triton` (same u, logdecay, B, C,
    S0, doc, chunk_size, and the `saved` it returned; saved=None recomputes it).

    dy (b, L, H, P); dfinal (b, H, P, N) or None for zeros. Returns (du (b, L, H, P), dlogdecay
    (b, L, H), dB (b, L, G, N), dC (b, L, G, N), dS0 (b, H, P, N)) in the compute dtype (float64
    for float64 u, else float32); dS0 is returned even when S0 is None. Deterministic: the partial
    sums (over the blocks of P and N of the state and the heads of a group) are added by torch in
    a fixed order. No autograd."""
    b, L, H, P = u.shape
    G, N = B.shape[-2:]
    ct = _compute_dtype(u)
    if saved is None:
        saved = scan_core_fwd_triton(u, logdecay, B, C, S0, doc, chunk_size)[2]
    u, logdecay, B, C, dy, saved = (t.to(ct).contiguous() for t in (u, logdecay, B, C, dy, saved))
    dfinal = u.new_zeros(b, H, P, N) if dfinal is None else dfinal.to(ct).contiguous()
    block_t, block_n = _block_t(chunk_size), _block_n(N)
    n_nb = triton.cdiv(N, block_n)
    K = triton.cdiv(L, block_t)
    # Room for the most blocks of P any config makes; the launch fills the first n_pb.
    most = triton.cdiv(P, min(c.kwargs["BLOCK_P"] for c in _scan_bwd_chunk_kernel.configs))
    du = empty_output((n_nb, b, L, H, P), dtype=ct, device=u.device)
    dS0 = empty_output((b, H, P, N), dtype=ct, device=u.device)
    dstates = empty_output((b, K, H, P, N), dtype=ct, device=u.device)
    da = empty_output((most * n_nb, b, L, H), dtype=ct, device=u.device)
    dB = empty_output((most, b, L, H, N), dtype=ct, device=u.device)
    dC = empty_output((most, b, L, H, N), dtype=ct, device=u.device)
    if b * H * P == 0 or L == 0:
        z = u.new_zeros(b, L, G, N)
        return du.zero_().sum(0), logdecay.new_zeros(b, L, H), z, z.clone(), dS0.copy_(dfinal)
    doc, has_doc = _doc_arg(doc, logdecay)
    flags = {"HAS_DOC": has_doc, "PRECISION": _precision(ct), "BLOCK_T": block_t, "BLOCK_N": block_n}

    def grid(meta):
        return (b * H, triton.cdiv(P, meta["BLOCK_P"]), n_nb)

    _scan_bwd_state_kernel[grid](dy, dfinal, logdecay, C, doc, dstates, dS0, L, H, G, P, N, **flags)

    def chunk_grid(meta):
        return (b * H * K, triton.cdiv(P, meta["BLOCK_P"]), n_nb)

    states = _chunk_states(saved, u, logdecay, B, C, doc, chunk_size, flags)
    _scan_bwd_chunk_kernel[chunk_grid](dy, states, dstates, u, logdecay, B, C, doc, du, da, dB, dC, L, H, G, P, N, b,
                                       **flags)
    n_pb = triton.cdiv(P, _scan_bwd_chunk_kernel.best_config.kwargs["BLOCK_P"])
    dB = _sum_parts(dB[:n_pb]).view(b, L, G, H // G, N).sum(3)            # (b, L, G, N)
    dC = _sum_parts(dC[:n_pb]).view(b, L, G, H // G, N).sum(3)            # (b, L, G, N)
    return _sum_parts(du), _sum_parts(da[:n_pb * n_nb]), dB, dC, dS0


def ssd_fwd_triton(x, dt, A, B, C, initial_states, doc, chunk_size):
    """The SSD scan (`ssd_chunked_fwd`'s arguments) on the core: u = dt x, logdecay = dt A.
    Returns (y (b, L, H, P), final (b, H, P, N), saved) in float64 for float64 x, else float32."""
    ct = _compute_dtype(x)
    dt = dt.to(ct)
    u = x.to(ct) * dt.unsqueeze(-1)                                        # (b, L, H, P)
    return scan_core_fwd_triton(u, dt * A.to(ct), B, C, initial_states, doc, chunk_size)


def ssd_bwd_triton(dy, dfinal, saved, x, dt, A, B, C, initial_states, doc, chunk_size):
    """Gradients of <dy, y> + <dfinal, final> of `ssd_fwd_triton` (its `saved`, or None to recompute)
    -> (dx, ddt, dA, dB, dC, dinitial_states), as `ssd_chunked_bwd` returns them."""
    ct = _compute_dtype(x)
    x, dt, A = x.to(ct), dt.to(ct), A.to(ct)
    u = x * dt.unsqueeze(-1)                                               # (b, L, H, P)
    du, da, dB, dC, dS0 = scan_core_bwd_triton(dy, dfinal, saved, u, dt * A, B, C, initial_states, doc,
                                               chunk_size)
    dx = du * dt.unsqueeze(-1)                                             # (b, L, H, P)
    ddt = (du * x).sum(-1) + da * A                                        # (b, L, H)
    dA = (da.double() * dt.double()).sum((0, 1)).to(ct)                    # (H,)
    return dx, ddt, dA, dB, dC, dS0


def ptxas_cases() -> list:
    """What `tests/kernels/ptxas_check.py` compiles ahead of time: each kernel with the tiles the
    launchers pass on a GPU (BLOCK_T = MAX_BLOCK_T = 16 for every chunk_size, BLOCK_N =
    MAX_BLOCK_N = 16 for every N) and float32's dot precision, with and without documents; the
    forward kernel also in its states-only form (the backward's recomputation)."""
    tiles = {"PRECISION": "tf32x3", "BLOCK_T": 16, "BLOCK_N": 16}
    bwd = [{"HAS_DOC": doc, **tiles} for doc in (True, False)]
    fwd = [{"HAS_DOC": doc, "STORE_Y": y, **tiles} for doc in (True, False) for y in (True, False)]
    types = {"doc_ptr": "*i64"}
    return [(_scan_fwd_kernel, fwd, types), (_scan_bwd_state_kernel, bwd, types),
            (_scan_bwd_chunk_kernel, bwd, types)]
