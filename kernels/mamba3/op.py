"""`torch.library` registration of the Mamba-3 scan core and its autograd, so `torch.compile` can trace it.

The core is the diagonal scan every Mamba-3 variant reduces to (docs/mamba3.md, "Chunked form"):
`S_t = exp(logdecay_t) S_{t-1} + sum_k u_{t,k} Bt_{t,k}^T`, `y_{t,k} = S_t Ct_{t,k}`, k < r
(SISO: r = 1). The rotations, trapezoid weights, skip and gate around it are plain differentiable
torch ops in `reference.py` / `mimo.py`; only the core is opaque. Canonical shapes, backend resolved:

- `ssmkit::mamba3_scan_core(u (b, L, H, r, P), logdecay (b, L, H), Bt, Ct (b, L, H, r, N),
  S0 (b, H, P, N), doc (b, L) int64 counter or None, chunk_size, backend)
  -> (y (b, L, H, r, P), final (b, H, P, N), saved)`, `saved` the states the backward restarts from;
- `ssmkit::mamba3_scan_core_backward(dy, dfinal, saved, u, logdecay, Bt, Ct, S0, doc, chunk_size,
  backend) -> (du, dlogdecay, dBt, dCt, dS0)`.

Both have fake implementations; the forward's autograd formula calls the backward op, so compiled
graphs keep both opaque. Documents (`doc`): where the counter changes the state restarts from zero
(S0 feeds the first document). Backends:

- "torch": SISO (r = 1) runs the SSD operator's generic chunked scan (`kernels/ssd/chunked.py`,
  one group per head); rank r > 1 runs the chunked path below, with an explicit backward
  (autograd does not record inside a custom op's implementation): chunks of Q tokens, grouped in
  blocks of `chunks_per_block` chunks so temporaries stay within `BLOCK_ELEMENTS`; the forward
  keeps only each block's incoming state (`saved`, (b, K, H, P, N), K blocks), the backward
  recomputes one block at a time from it, last block first, so memory stays linear in L.
- "triton": the generic scan core of `kernels/ssd/triton_ssd.py` (imported when it runs), one B, C
  per head (G = H); `saved` holds the state entering each kernel chunk. Rank r > 1 is folded into
  a rank-1 scan of 2r tokens per step (`_fold`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kernels.ssd.chunked import saved_blocks, scan_chunked_bwd, scan_chunked_fwd

# Largest temporary of one block (b, K, Q, Q, H, r, r) in elements; read at call time (tests lower it).
BLOCK_ELEMENTS = 1 << 22


def chunks_per_block(b: int, H: int, r: int, Q: int, P: int, N: int) -> int:
    per_chunk = b * H * (Q * Q * r * r + Q * r * (P + N) + P * N)
    return max(1, BLOCK_ELEMENTS // per_chunk)


def _chunked(t, Q):
    """(b, L, ...) -> (b, c, Q, ...), zero-padded at the end (zero decay and input: no change)."""
    pad = (-t.shape[1]) % Q
    if pad:
        t = torch.cat([t, t.new_zeros((t.shape[0], pad) + t.shape[2:])], dim=1)
    return t.unflatten(1, (-1, Q))


def _chunked_doc(doc, Q):
    """Counters (b, L) -> (b, c, Q); padding repeats the last one (padded tokens join the last document)."""
    pad = (-doc.shape[1]) % Q
    return torch.cat([doc, doc[:, -1:].expand(-1, pad)], dim=1).unflatten(1, (-1, Q))


def _decays(ld, doc, doc_before):
    """Decay factors of the chunks of one block from ld (b, K, Q, H) (K chunks).

    Returns Lm (b, K, Q_i, Q_j, H) = exp(a_i - a_j) for j <= i in one document, start (b, K, Q, H)
    = exp(a_i) where token i still sees the incoming state, end (b, K, Q, H) = exp(a_Q - a_j) where
    token j reaches the chunk's last state, chunk (b, K, H) = exp(a_Q) where the incoming state
    survives the chunk; a is the inclusive cumsum of ld in the chunk, taken in float64 (in float32
    the small differences a_i - a_j, the ones that matter most, would lose their digits).
    """
    Q = ld.shape[2]
    a = torch.cumsum(ld.double(), dim=2)                                   # (b, K, Q, H)
    keep = torch.ones(Q, Q, dtype=torch.bool, device=ld.device).tril()    # (Q, Q)
    if doc is not None:
        keep = keep & (doc[..., :, None] == doc[..., None, :])             # (b, K, Q, Q)
    Lm = torch.exp(torch.where(keep[..., None], a[:, :, :, None] - a[:, :, None, :], -math.inf)).to(ld.dtype)
    start = torch.exp(a).to(ld.dtype)                                      # (b, K, Q, H)
    end = torch.exp(a[:, :, -1:] - a).to(ld.dtype)                         # (b, K, Q, H)
    chunk = torch.exp(a[:, :, -1]).to(ld.dtype)                            # (b, K, H)
    if doc is not None:
        before = torch.cat([doc_before[:, None], doc[:, :-1, -1]], dim=1)  # (b, K): the token before each chunk
        start = start * (doc == before[..., None])[..., None]
        end = end * (doc == doc[..., -1:])[..., None]
        chunk = chunk * (doc[..., -1] == before)[..., None]
    return Lm, start, end, chunk


def _states(u, Bt, S, end, chunk):
    """Chunk-start states of one block: (S_in (b, K, H, P, N), the state after the block)."""
    s = torch.einsum("bcjhmp,bcjhmn->bchpn", u * end[..., None, None], Bt)  # (b, K, H, P, N)
    S_in = torch.empty_like(s)
    for k in range(s.shape[1]):
        S_in[:, k] = S
        S = chunk[:, k, :, None, None] * S + s[:, k]                       # (b, H, P, N)
    return S_in, S


def _block_fwd(u, ld, Bt, Ct, S, doc, doc_before):
    """One block of K chunks: u (b, K, Q, H, r, P), ld (b, K, Q, H), Bt, Ct (b, K, Q, H, r, N),
    incoming S (b, H, P, N) -> (y (b, K, Q, H, r, P), outgoing S)."""
    Lm, start, end, chunk = _decays(ld, doc, doc_before)
    S_in, S = _states(u, Bt, S, end, chunk)
    CB = torch.einsum("bcihkn,bcjhmn->bcijhkm", Ct, Bt)                    # (b, K, Q, Q, H, r, r)
    y = torch.einsum("bcijhkm,bcjhmp->bcihkp", CB * Lm[..., None, None], u)  # (b, K, Q, H, r, P)
    return y + torch.einsum("bcihkn,bchpn->bcihkp", Ct * start[..., None, None], S_in), S


def _blocks(b, L, H, r, P, N, Q):
    c = -(-L // Q)
    k = chunks_per_block(b, H, r, Q, P, N)
    return [slice(i, min(i + k, c)) for i in range(0, c, k)]


def _doc_before(docs, blk):
    return None if docs is None else (docs[:, 0, 0] if blk.start == 0 else docs[:, blk.start - 1, -1])


def core_chunked_fwd(u, ld, Bt, Ct, S0, doc, chunk_size):
    """The core by chunks (canonical shapes, see the module docstring); no autograd.
    Returns (y (b, L, H, r, P), final (b, H, P, N), saved (b, K, H, P, N))."""
    b, L, H, r, P = u.shape
    us, lds, Bs, Cs = (_chunked(t, chunk_size) for t in (u, ld, Bt, Ct))
    docs = None if doc is None else _chunked_doc(doc, chunk_size)
    y, S, saved = torch.empty_like(us), S0, []
    for blk in _blocks(b, L, H, r, P, Bt.shape[-1], chunk_size):
        saved.append(S)
        d = None if docs is None else docs[:, blk]
        y[:, blk], S = _block_fwd(us[:, blk], lds[:, blk], Bs[:, blk], Cs[:, blk], S, d, _doc_before(docs, blk))
    return y.flatten(1, 2)[:, :L], S, torch.stack(saved, dim=1)


def _inter_bwd(dy, dS, S_in, Ct, start, chunk):
    """Adjoint of the incoming-state term and of the state passing: returns (dCt, dstart, ds, dchunk,
    gradient of the block's incoming state); ds (b, K, H, P, N) is the gradient of each chunk's sum."""
    # Two-operand contractions, scaled on the small side: a three-operand einsum would form
    # (Q, P, N) products per chunk.
    dyS = torch.einsum("bchpn,bcihkp->bcihkn", S_in, dy)                   # (b, K, Q, H, r, N)
    dCt = dyS * start[..., None, None]
    dstart = (dyS * Ct).sum((-1, -2))                                      # (b, K, Q, H)
    dS_in = torch.einsum("bcihkn,bcihkp->bchpn", Ct * start[..., None, None], dy)  # (b, K, H, P, N)
    ds, dchunk = torch.empty_like(S_in), torch.empty_like(chunk)
    for k in reversed(range(S_in.shape[1])):
        ds[:, k] = dS
        dchunk[:, k] = (dS * S_in[:, k]).sum((-1, -2))
        dS = dS_in[:, k] + chunk[:, k, :, None, None] * dS                # (b, H, P, N)
    return dCt, dstart, ds, dchunk, dS


def _block_bwd(dy, dS, u, ld, Bt, Ct, S, doc, doc_before):
    """Adjoint of `_block_fwd` (recomputed from the block's incoming S): dy (b, K, Q, H, r, P) and the
    gradient dS of the outgoing state -> (du, dld, dBt, dCt, gradient of the incoming state)."""
    Lm, start, end, chunk = _decays(ld, doc, doc_before)
    S_in, _ = _states(u, Bt, S, end, chunk)
    dCt, dstart, ds, dchunk, dS = _inter_bwd(dy, dS, S_in, Ct, start, chunk)
    dsB = torch.einsum("bchpn,bcjhmn->bcjhmp", ds, Bt)                     # (b, K, Q, H, r, P)
    du = dsB * end[..., None, None]
    dend = (dsB * u).sum((-1, -2))                                         # (b, K, Q, H)
    dBt = torch.einsum("bchpn,bcjhmp->bcjhmn", ds, u * end[..., None, None])  # (b, K, Q, H, r, N)
    M = torch.einsum("bcihkn,bcjhmn->bcijhkm", Ct, Bt) * Lm[..., None, None]  # (b, K, Q, Q, H, r, r)
    dM = torch.einsum("bcihkp,bcjhmp->bcijhkm", dy, u)                     # gradient of M
    du = du + torch.einsum("bcijhkm,bcihkp->bcjhmp", M, dy)
    dCB = dM * Lm[..., None, None]
    dCt = dCt + torch.einsum("bcijhkm,bcjhmn->bcihkn", dCB, Bt)
    dBt = dBt + torch.einsum("bcijhkm,bcihkn->bcjhmn", dCB, Ct)
    g = (dM * M).sum((-1, -2))                                             # (b, K, Q_i, Q_j, H): d a_i, -d a_j
    da = (g.sum(3) - g.sum(2) + dstart * start - dend * end).double()     # (b, K, Q, H)
    da[:, :, -1] += ((dend * end).sum(2) + dchunk * chunk).double()
    dld = torch.flip(torch.cumsum(torch.flip(da, (2,)), dim=2), (2,)).to(ld.dtype)  # adjoint of the cumsum
    return du, dld, dBt, dCt, dS


def core_chunked_bwd(dy, dfinal, saved, u, ld, Bt, Ct, S0, doc, chunk_size):
    """Gradients of `core_chunked_fwd` (one block at a time, last block first); no autograd.
    Returns (du, dlogdecay, dBt, dCt, dS0) in the inputs' shapes."""
    b, L, H, r, P = u.shape
    Q = chunk_size
    us, lds, Bs, Cs, dys = (_chunked(t, Q) for t in (u, ld, Bt, Ct, dy))
    docs = None if doc is None else _chunked_doc(doc, Q)
    grads = [torch.empty_like(t) for t in (us, lds, Bs, Cs)]
    dS = dfinal
    blocks = _blocks(b, L, H, r, P, Bt.shape[-1], Q)
    for i in reversed(range(len(blocks))):
        blk = blocks[i]
        d = None if docs is None else docs[:, blk]
        *g, dS = _block_bwd(dys[:, blk], dS, us[:, blk], lds[:, blk], Bs[:, blk], Cs[:, blk], saved[:, i], d,
                            _doc_before(docs, blk))
        for out, gi in zip(grads, g):
            out[:, blk] = gi
    return (*(t.flatten(1, 2)[:, :L] for t in grads), dS)


def _fold(u, ld, Bt, Ct, doc, chunk_size):
    """Rank r > 1 as a rank-1 scan of 2r tokens per step, for the Triton core: r tokens add
    u_{t,k} Bt_{t,k}^T (the first one decays the state), then r tokens read S_t Ct_{t,k} and add
    nothing. u (b, 2rL, H, P), ld (b, 2rL, H), B, C (b, 2rL, H, N) with G = H, doc, chunk length."""
    b, L, H, r, P = u.shape
    z = torch.zeros_like
    u2 = torch.cat([u, z(u)], dim=3).transpose(2, 3).reshape(b, 2 * r * L, H, P)
    B2 = torch.cat([Bt, z(Bt)], dim=3).transpose(2, 3).reshape(b, 2 * r * L, H, -1)
    C2 = torch.cat([z(Ct), Ct], dim=3).transpose(2, 3).reshape(b, 2 * r * L, H, -1)
    ld2 = torch.cat([ld[:, :, None], ld.new_zeros(b, L, 2 * r - 1, H)], dim=2).reshape(b, 2 * r * L, H)
    doc2 = None if doc is None else doc.repeat_interleave(2 * r, dim=1)
    return u2, ld2, B2, C2, doc2, 2 * r * chunk_size


def _unfold(t, r, part):
    """(b, 2rL, H, W) of the folded scan -> (b, L, H, r, W): the update tokens (part 0) or the reads (1)."""
    b, L2, H, W = t.shape
    return t.view(b, L2 // (2 * r), 2 * r, H, W)[:, :, part * r:(part + 1) * r].transpose(2, 3)


def _triton_fwd(u, ld, Bt, Ct, S0, doc, chunk_size):
    from kernels.ssd.triton_ssd import scan_core_fwd_triton
    r = u.shape[3]
    if r == 1:
        y, final, saved = scan_core_fwd_triton(u[..., 0, :], ld, Bt[..., 0, :], Ct[..., 0, :], S0, doc, chunk_size)
        return y[..., None, :], final, saved
    u2, ld2, B2, C2, doc2, Q2 = _fold(u, ld, Bt, Ct, doc, chunk_size)
    y, final, saved = scan_core_fwd_triton(u2, ld2, B2, C2, S0, doc2, Q2)
    return _unfold(y, r, 1), final, saved


def _triton_bwd(dy, dfinal, saved, u, ld, Bt, Ct, S0, doc, chunk_size):
    from kernels.ssd.triton_ssd import scan_core_bwd_triton
    r = u.shape[3]
    if r == 1:
        du, dld, dB, dC, dS0 = scan_core_bwd_triton(dy[..., 0, :], dfinal, saved, u[..., 0, :], ld, Bt[..., 0, :],
                                                    Ct[..., 0, :], S0, doc, chunk_size)
        return du[..., None, :], dld, dB[..., None, :], dC[..., None, :], dS0
    u2, ld2, B2, C2, doc2, Q2 = _fold(u, ld, Bt, Ct, doc, chunk_size)
    dy2 = torch.cat([torch.zeros_like(dy), dy], dim=3).transpose(2, 3).reshape(u2.shape)
    du, dld, dB, dC, dS0 = scan_core_bwd_triton(dy2, dfinal, saved, u2, ld2, B2, C2, S0, doc2, Q2)
    dld = dld.view(*ld.shape[:2], 2 * r, -1)[:, :, 0]
    return _unfold(du, r, 0), dld, _unfold(dB, r, 0), _unfold(dC, r, 1), dS0


def _torch_fwd(u, ld, Bt, Ct, S0, doc, chunk_size):
    """The chunked path: SISO through the SSD operator's generic chunked scan (one group per head;
    its per-head layout avoids this module's einsum copies), rank r > 1 through `core_chunked_fwd`."""
    if u.shape[3] > 1:
        return core_chunked_fwd(u, ld, Bt, Ct, S0, doc, chunk_size)
    y, final, starts = scan_chunked_fwd(u[..., 0, :], ld, Bt[..., 0, :], Ct[..., 0, :], S0, doc, chunk_size)
    return y[..., None, :], final, starts.transpose(0, 1)


def _torch_bwd(dy, dfinal, saved, u, ld, Bt, Ct, S0, doc, chunk_size):
    if u.shape[3] > 1:
        return core_chunked_bwd(dy, dfinal, saved, u, ld, Bt, Ct, S0, doc, chunk_size)
    du, dld, dB, dC, dS0 = scan_chunked_bwd(dy[..., 0, :], dfinal, u[..., 0, :], ld, Bt[..., 0, :], Ct[..., 0, :],
                                            S0, doc, chunk_size, saved.transpose(0, 1))
    return du[..., None, :], dld, dB[..., None, :], dC[..., None, :], dS0


def _check_backend(backend: str) -> None:
    if backend not in ("torch", "triton"):
        raise ValueError(f"ssmkit::mamba3_scan_core: backend must be 'torch' or 'triton', got {backend!r}")


@torch.library.custom_op("ssmkit::mamba3_scan_core", mutates_args=())
def mamba3_scan_core_op(u: torch.Tensor, logdecay: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor,
                        S0: torch.Tensor, doc: torch.Tensor | None, chunk_size: int,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_backend(backend)
    fwd = _triton_fwd if backend == "triton" else _torch_fwd
    y, final, saved = fwd(u, logdecay, Bt, Ct, S0, doc, chunk_size)
    return (y.to(u.dtype).contiguous(), final.to(u.dtype, copy=True).contiguous(),
            saved.to(u.dtype).contiguous())


def _saved_count(b, L, H, r, P, N, chunk_size, backend):
    """K, the number of states the forward saves (block starts; kernel chunk starts for Triton)."""
    if backend == "triton":
        from kernels.ssd.triton_ssd import saved_chunks
        return saved_chunks(L, chunk_size) if r == 1 else saved_chunks(2 * r * L, 2 * r * chunk_size)
    if r == 1:
        return saved_blocks(b, L, H, P, N, chunk_size)
    chunks = -(-L // chunk_size)
    return -(-chunks // chunks_per_block(b, H, r, chunk_size, P, N))


@mamba3_scan_core_op.register_fake
def _core_fake(u, logdecay, Bt, Ct, S0, doc, chunk_size, backend):
    b, L, H, r, P = u.shape
    N = Bt.shape[-1]
    K = _saved_count(b, L, H, r, P, N, chunk_size, backend)
    return torch.empty_like(u, memory_format=torch.contiguous_format), u.new_empty(b, H, P, N), \
        u.new_empty(b, K, H, P, N)


@torch.library.custom_op("ssmkit::mamba3_scan_core_backward", mutates_args=())
def mamba3_scan_core_backward_op(dy: torch.Tensor, dfinal: torch.Tensor, saved: torch.Tensor, u: torch.Tensor,
                                 logdecay: torch.Tensor, Bt: torch.Tensor, Ct: torch.Tensor, S0: torch.Tensor,
                                 doc: torch.Tensor | None, chunk_size: int,
                                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    _check_backend(backend)
    bwd = _triton_bwd if backend == "triton" else _torch_bwd
    grads = bwd(dy, dfinal, saved, u, logdecay, Bt, Ct, S0, doc, chunk_size)
    # Fresh, contiguous tensors: an output of a custom op may not alias an input (dS0 can be dfinal).
    return tuple(g.to(x.dtype, copy=True).contiguous() for g, x in zip(grads, (u, logdecay, Bt, Ct, S0)))


@mamba3_scan_core_backward_op.register_fake
def _core_backward_fake(dy, dfinal, saved, u, logdecay, Bt, Ct, S0, doc, chunk_size, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (u, logdecay, Bt, Ct, S0))


def _setup_context(ctx, inputs, output):
    u, logdecay, Bt, Ct, S0, doc, chunk_size, backend = inputs
    ctx.save_for_backward(u, logdecay, Bt, Ct, S0, doc, output[2])
    ctx.chunk_size, ctx.backend = chunk_size, backend


def _backward(ctx, dy, dfinal, _dsaved):
    u, logdecay, Bt, Ct, S0, doc, saved = ctx.saved_tensors
    # An output the loss does not use may arrive as None (compiled graphs do not materialize it).
    dy = torch.zeros_like(u) if dy is None else dy
    dfinal = torch.zeros_like(S0) if dfinal is None else dfinal
    grads = mamba3_scan_core_backward_op(dy, dfinal, saved, u, logdecay, Bt, Ct, S0, doc, ctx.chunk_size,
                                         ctx.backend)
    return (*grads, None, None, None)


mamba3_scan_core_op.register_autograd(_backward, setup_context=_setup_context)


def scan_core(u, logdecay, Bt, Ct, S0, chunk_size: int, doc=None, *, backend: str = "torch"):
    """`reference.chunked_scan` through the custom op: same arguments and results (SISO u (b, L, H, P),
    Bt, Ct (b, L, H, N), or rank r with an extra r axis before P / N), differentiable by the op's
    autograd. `doc` (b, L) labels, non-decreasing: they become a counter that grows where they change."""
    siso = u.dim() == 4
    if siso:
        u, Bt, Ct = u[..., None, :], Bt[..., None, :], Ct[..., None, :]
    if doc is not None:
        doc = F.pad(torch.cumsum((doc[:, 1:] != doc[:, :-1]).long(), dim=1), (1, 0))  # (b, L)
    L = u.shape[1]
    # A sequence shorter than a chunk would be padded to a whole chunk (work ~ chunk^2): use the
    # smallest power of two that holds it; the result does not depend on the chunk size.
    if not isinstance(L, torch.SymInt) and L < chunk_size:
        chunk_size = 1 << max(L - 1, 0).bit_length()
    y, final, _ = mamba3_scan_core_op(u.contiguous(), logdecay.contiguous(), Bt.contiguous(), Ct.contiguous(),
                                      S0.contiguous(), doc, chunk_size, backend)
    return (y[..., 0, :] if siso else y), final
