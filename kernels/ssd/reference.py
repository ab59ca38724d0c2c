"""The Mamba-2 scan (SSD) in plain PyTorch: the sequential definition and its shared pieces.

The math: `docs/ssd_op.md`. Per head h (head dim P, state N, scalar A_h < 0) of a group g(h):

    S_t[h] = exp(dt_t[h] A_h) S_{t-1}[h] + dt_t[h] x_t[h] B_t[g]^T        (P, N)
    y_t[h] = S_t[h] C_t[g] + D_h x_t[h],   then y_t *= silu(z_t) when z is given

- `effective_dt`: dt_raw -> dt (bias, softplus, clamp to dt_limit).
- `segment_ids`: packed documents -> a counter that grows by one where `seq_idx` changes.
- `skip_and_gate`: the D skip and the z gate, applied after the scan.
- `ssd_ref`: the readable loop over time steps; run it in float64 as ground truth (small L only).

- `ssd_chunked_fwd` / `ssd_chunked_bwd`: the chunked path (`backend="torch"`) of the scan itself
  (no dt transform, D or z: the public function applies those with plain torch ops), no autograd
  (the custom op in `op.py` adds it). No loop over time steps: chunks of Q tokens are batched,
  grouped into blocks of `chunks_per_block` chunks so temporaries stay within `BLOCK_ELEMENTS`;
  only the state passing loops over chunks. The backward saves nothing from the forward: it
  recomputes each block from the block's incoming state.

No Triton here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def effective_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, dt_softplus: bool,
                 dt_limit: tuple[float, float]) -> torch.Tensor:
    """dt (b, L, H) -> clamp(softplus(dt + dt_bias)) with the clamp always applied, as the public
    Mamba-2 operator does: with the default limit (0, inf) a negative dt becomes 0."""
    if dt_bias is not None:
        dt = dt + dt_bias                                          # (b, L, H)
    if dt_softplus:
        dt = F.softplus(dt)                                        # (b, L, H)
    lo, hi = dt_limit
    return dt.clamp(min=lo, max=None if math.isinf(hi) else hi)   # (b, L, H)


def segment_ids(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) document labels -> (b, L) int64 counter, 0 at t = 0, +1 wherever the label changes.

    Equal counters mean "same document, no reset in between", even if a label comes back later.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).long()           # (b, L-1)
    return F.pad(torch.cumsum(change, dim=1), (1, 0))              # (b, L)


def skip_and_gate(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None,
                  z: torch.Tensor | None) -> torch.Tensor:
    """y + D x, then times silu(z): y, x, z (b, L, H, P); D (H,) or (H, P)."""
    if D is not None:
        y = y + x * (D.unsqueeze(-1) if D.dim() == 1 else D)       # (b, L, H, P)
    if z is not None:
        y = y * F.silu(z)                                          # (b, L, H, P)
    return y


def ssd_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
            dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """The sequential definition, one time step at a time; returns (y (b, L, H, P), final (b, H, P, N)).

    x (b, L, H, P), dt (b, L, H), A (H,), B, C (b, L, G, N), initial_states (b, H, P, N),
    seq_idx (b, L) int: the state is reset to zero before every token whose label differs from
    its predecessor's (initial_states feeds the first document of each row). Differentiable by
    autograd; use float64 inputs for ground truth.
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2:]
    dt = effective_dt(dt, dt_bias, dt_softplus, dt_limit)          # (b, L, H)
    Bh = B.repeat_interleave(H // G, dim=2)                        # (b, L, H, N)
    Ch = C.repeat_interleave(H // G, dim=2)                        # (b, L, H, N)
    S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states  # (b, H, P, N)
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)               # (b,)
            S = S * keep[:, None, None, None]                                      # (b, H, P, N)
        decay = torch.exp(dt[:, t] * A)                                            # (b, H)
        inp = (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(-2)  # (b, H, P, N)
        S = decay[:, :, None, None] * S + inp                                      # (b, H, P, N)
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))                      # (b, H, P)
    y = torch.stack(ys, dim=1)                                     # (b, L, H, P)
    return skip_and_gate(y, x, D, z), S


# Temporaries of one block of chunks stay near this many elements (tests lower it to get several
# blocks); read at call time.
BLOCK_ELEMENTS = 1 << 22
# The chunked path's own chunk length: at most this many tokens, whatever chunk size the caller
# asked for (the result does not depend on it). The work inside a chunk grows with its length
# (Q x Q decay and score matrices per head) while the state passing shrinks; on the CPU 64 tokens
# cost ~2.4x less than the public default 256 (fwd+bwd, H = 8, P = N = 64, L = 4096). Read at call
# time.
MAX_CHUNK = 64


def chunks_per_block(b: int, H: int, Q: int, P: int, N: int) -> int:
    per_chunk = b * H * (Q * max(Q, P) + P * N)
    return max(1, BLOCK_ELEMENTS // per_chunk)


def _decays(dt, A, doc, doc_before):
    """The chunk's decay factors from dt (b, K, Q, H) and the document counters.

    Returns Lm (b, K, H, Q, Q) = exp(cs_i - cs_j) for j <= i in one document, din (b, K, H, Q) =
    exp(cs_i) where token i still sees the incoming state, dout (b, K, H, Q) = exp(tot - cs_j)
    where token j reaches the chunk's final state, g (b, K, H) = exp(tot) where the incoming state
    survives the chunk; cs is the inclusive cumsum of dt A in the chunk, tot its last value.
    The cumsum and its differences are taken in float64: in float32 cs_i - cs_j would lose the
    small differences that matter most.
    """
    Q = dt.shape[2]
    cs = torch.cumsum(dt.double() * A.double(), dim=2).transpose(2, 3)   # (b, K, H, Q)
    tot = cs[..., -1:]                                                     # (b, K, H, 1)
    mask = torch.ones(Q, Q, dtype=torch.bool, device=dt.device).tril()    # (Q, Q)
    if doc is not None:
        mask = (mask & (doc.unsqueeze(-1) == doc.unsqueeze(-2))).unsqueeze(2)  # (b, K, 1, Q, Q)
    seg = (cs.unsqueeze(-1) - cs.unsqueeze(-2)).to(dt.dtype)              # (b, K, H, Q, Q)
    Lm = seg.masked_fill_(~mask, -math.inf).exp_()                        # (b, K, H, Q, Q)
    din = torch.exp(cs).to(dt.dtype)                                       # (b, K, H, Q)
    dout = torch.exp(tot - cs).to(dt.dtype)                                # (b, K, H, Q)
    g = torch.exp(tot[..., 0]).to(dt.dtype)                                # (b, K, H)
    if doc is not None:
        before = torch.cat([doc_before[:, None], doc[:, :-1, -1]], dim=1)  # (b, K)
        din = din * (doc == before[..., None]).unsqueeze(2)
        dout = dout * (doc == doc[..., -1:]).unsqueeze(2)
        g = g * (doc[..., -1] == before).unsqueeze(-1)
    return Lm, din, dout, g


def _stack(t, G):
    """(b, K, Q, H, P) -> (b, K, G, Q, R*P): the R heads of a group side by side (copy)."""
    b, K, Q, H, P = t.shape
    return t.reshape(b, K, Q, G, (H // G) * P).transpose(2, 3)


def _unstack(t, H):
    """(b, K, G, Q, R*P) -> (b, K, Q, H, P)."""
    b, K, G, Q, RP = t.shape
    return t.transpose(2, 3).reshape(b, K, Q, H, RP * G // H)


def _intra(Lm, B, C, G):
    """M = Lm o (C B^T) per head: (b, K, H, Q, Q), and C B^T (b, K, G, Q, Q)."""
    b, K, H, Q, _ = Lm.shape
    CB = C.transpose(2, 3) @ B.permute(0, 1, 3, 4, 2)                      # (b, K, G, Q, Q)
    M = (Lm.view(b, K, G, H // G, Q, Q) * CB.unsqueeze(3)).view(b, K, H, Q, Q)
    return M, CB


def _pass_states(S, s, g):
    """Scan over the K chunks: S_in[k] = S, then S = g[k] S + s[k]. Returns (S_in (b, K, H, P, N), S)."""
    S_in = torch.empty_like(s)                                             # (b, K, H, P, N)
    for k in range(s.shape[1]):
        S_in[:, k] = S
        S = g[:, k, :, None, None] * S + s[:, k]                           # (b, H, P, N)
    return S_in, S


def _block_states(x, dt, A, B, doc, doc_before, S):
    """Chunk states of one block: (S_in (b, K, H, P, N), S after the block, decays, u = dt x)."""
    b, K, Q, H, P = x.shape
    G, N = B.shape[-2:]
    Lm, din, dout, g = _decays(dt, A, doc, doc_before)
    u = x * dt.unsqueeze(-1)                                               # (b, K, Q, H, P)
    wu = _stack(u * dout.transpose(2, 3).unsqueeze(-1), G)                 # (b, K, G, Q, R*P)
    s = (wu.transpose(-1, -2) @ B.transpose(2, 3)).view(b, K, H, P, N)     # (b, K, H, P, N)
    S_in, S = _pass_states(S, s, g)
    return S_in, S, (Lm, din, dout, g), u


def _block_fwd(x, dt, A, B, C, doc, doc_before, S):
    """One block of K chunks: x (b, K, Q, H, P), dt (b, K, Q, H), B, C (b, K, Q, G, N), incoming
    S (b, H, P, N) -> (y (b, K, Q, H, P), outgoing S)."""
    b, K, Q, H, P = x.shape
    G, N = B.shape[-2:]
    S_in, S, (Lm, din, _, _), u = _block_states(x, dt, A, B, doc, doc_before, S)
    M, _ = _intra(Lm, B, C, G)
    y = (M @ u.transpose(2, 3)).transpose(2, 3)                            # (b, K, Q, H, P)
    Ys = C.transpose(2, 3) @ S_in.view(b, K, G, -1, N).transpose(-1, -2)   # (b, K, G, Q, R*P)
    return y + _unstack(Ys, H) * din.transpose(2, 3).unsqueeze(-1), S


def _chunked(t, Q, value=0.0):
    """(b, L, ...) -> (b, c, Q, ...) padded at the end with `value`."""
    L = t.shape[1]
    c = -(-L // Q)
    if c * Q != L:
        pad = [0, 0] * (t.dim() - 2) + [0, c * Q - L]
        t = F.pad(t, pad, value=value)
    return t.reshape(t.shape[0], c, Q, *t.shape[2:])


def _canonical(x, dt, B, C, doc, Q):
    xs, dts, Bs, Cs = (_chunked(t, Q) for t in (x, dt, B, C))
    # Padding repeats the last counter, so padded tokens (dt = 0, x = 0) join the last document.
    docs = None if doc is None else _chunked(doc, Q, 0).clone()
    if docs is not None and docs.shape[1] * Q != doc.shape[1]:
        docs.view(docs.shape[0], -1)[:, doc.shape[1]:] = doc[:, -1:]
    return xs, dts, Bs, Cs, docs


def _blocks(x, Q, N):
    b, L, H, P = x.shape
    c = -(-L // Q)
    k = chunks_per_block(b, H, Q, P, N)
    return [slice(i, min(i + k, c)) for i in range(0, c, k)]


def _doc_before(docs, blk):
    return docs[:, 0, 0] if blk.start == 0 else docs[:, blk.start - 1, -1]


def ssd_chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size):
    """The scan y_t = S_t C_t by chunks: x (b, L, H, P), dt (b, L, H) (already transformed), A (H,),
    B, C (b, L, G, N), initial_states (b, H, P, N) or None, doc (b, L) int64 counter or None.
    Returns (y (b, L, H, P), final state (b, H, P, N)). No autograd."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    chunk_size = min(chunk_size, MAX_CHUNK)
    xs, dts, Bs, Cs, docs = _canonical(x, dt, B, C, doc, chunk_size)
    S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states.to(x.dtype)
    y = torch.empty_like(xs)                                               # (b, c, Q, H, P)
    for blk in _blocks(x, chunk_size, N):
        d, before = (None, None) if docs is None else (docs[:, blk], _doc_before(docs, blk))
        y[:, blk], S = _block_fwd(xs[:, blk], dts[:, blk], A, Bs[:, blk], Cs[:, blk], d, before, S)
    return y.reshape(b, -1, H, P)[:, :L], S


def _reverse_pass(dS, e, g):
    """Adjoint of `_pass_states`: dS_out[k] = dS, then dS = g[k] dS + e[k]; returns (dS_out, dS)."""
    dS_out = torch.empty_like(e)                                           # (b, K, H, P, N)
    for k in reversed(range(e.shape[1])):
        dS_out[:, k] = dS
        dS = g[:, k, :, None, None] * dS + e[:, k]                         # (b, H, P, N)
    return dS_out, dS


def _cumsum_grad(dM, M, ddin, din, ddout, dout, dg, g):
    """Gradient of the loss w.r.t. a = dt A (b, K, H, Q) from the gradients of the decay factors,
    through cs = cumsum(a): dcs_i = sum_j dM M [i, j] - sum_j dM M [j, i] + ... (float64)."""
    # Summed in float64: each dseg[i, j] enters row sum i and column sum j, and those cancel in the
    # reverse cumsum for every pair on one side of position r; in float32 the cancellation leaves
    # rounding noise of the size of all the terms, not of the result.
    dseg = (dM * M).double()                                               # (b, K, H, Q, Q)
    dcs = dseg.sum(-1) - dseg.sum(-2)                                      # (b, K, H, Q)
    dcs = dcs + (ddin * din).double() - (ddout * dout).double()
    dtot = (ddout * dout).double().sum(-1) + (dg * g).double()             # (b, K, H)
    dcs[..., -1] += dtot
    return torch.flip(torch.cumsum(torch.flip(dcs, [-1]), -1), [-1])      # (b, K, H, Q)


# long: one block's backward reads best as one piece: every gradient reuses the recomputed forward.
def _block_bwd(dy, dS, x, dt, A, B, C, doc, doc_before, S):
    """Backward of `_block_fwd`: dy (b, K, Q, H, P), dS (b, H, P, N) the gradient of the outgoing
    state -> (dx, ddt, dA, dB, dC, gradient of the incoming state)."""
    b, K, Q, H, P = x.shape
    G, N = B.shape[-2:]
    S_in, _, (Lm, din, dout, g), u = _block_states(x, dt, A, B, doc, doc_before, S)
    M, _ = _intra(Lm, B, C, G)
    Bt, Ct = B.transpose(2, 3), C.transpose(2, 3)                          # (b, K, G, Q, N)
    S_st = S_in.view(b, K, G, -1, N)                                       # (b, K, G, R*P, N)
    dyd = _stack(dy * din.transpose(2, 3).unsqueeze(-1), G)                # (b, K, G, Q, R*P)
    e = (dyd.transpose(-1, -2) @ Ct).view(b, K, H, P, N)                   # (b, K, H, P, N)
    dS_out, dS = _reverse_pass(dS, e, g)
    dS_st = dS_out.view(b, K, G, -1, N)                                    # (b, K, G, R*P, N)
    # Inside the chunk: y = M u with M = Lm o CB.
    dyh, uh = dy.transpose(2, 3), u.transpose(2, 3)                        # (b, K, H, Q, P)
    dM = dyh @ uh.transpose(-1, -2)                                        # (b, K, H, Q, Q)
    du = (M.transpose(-1, -2) @ dyh).transpose(2, 3)                       # (b, K, Q, H, P)
    dCB = (dM * Lm).view(b, K, G, H // G, Q, Q).sum(3)                     # (b, K, G, Q, Q)
    dC = dCB @ Bt + dyd @ S_st                                             # (b, K, G, Q, N)
    # The incoming state's term y_i += din_i S_in C_i.
    Ys = _unstack(Ct @ S_st.transpose(-1, -2), H)                          # (b, K, Q, H, P)
    ddin = (dy * Ys).sum(-1).transpose(2, 3)                               # (b, K, H, Q)
    # The chunk's state s = sum_j dout_j u_j B_j^T.
    V = _unstack(Bt @ dS_st.transpose(-1, -2), H)                          # (b, K, Q, H, P)
    doutq = dout.transpose(2, 3).unsqueeze(-1)                             # (b, K, Q, H, 1)
    du = du + V * doutq
    ddout = (u * V).sum(-1).transpose(2, 3)                                # (b, K, H, Q)
    dB = dCB.transpose(-1, -2) @ Ct + _stack(u * doutq, G) @ dS_st         # (b, K, G, Q, N)
    dg = (dS_out * S_in).sum((-1, -2))                                     # (b, K, H)
    da = _cumsum_grad(dM, M, ddin, din, ddout, dout, dg, g).transpose(2, 3)  # (b, K, Q, H)
    ddt = (da * A.double()).to(x.dtype) + (du * x).sum(-1)                 # (b, K, Q, H)
    dA = (da * dt.double()).sum((0, 1, 2)).to(x.dtype)                     # (H,)
    dx = du * dt.unsqueeze(-1)                                             # (b, K, Q, H, P)
    return dx, ddt, dA, dB.transpose(2, 3), dC.transpose(2, 3), dS


def ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size):
    """Gradients of <dy, y> + <dfinal, final> from `ssd_chunked_fwd` w.r.t. x, dt, A, B, C and the
    initial state (zeros when it is None). First a forward sweep keeps only the state entering
    each block; then the blocks run backward, each recomputed from its incoming state."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    Q = min(chunk_size, MAX_CHUNK)
    xs, dts, Bs, Cs, docs = _canonical(x, dt, B, C, doc, Q)
    dys = _chunked(dy.to(x.dtype), Q)
    blocks = _blocks(x, Q, N)
    S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states.to(x.dtype)
    starts = [S]
    for blk in blocks[:-1]:
        d, before = (None, None) if docs is None else (docs[:, blk], _doc_before(docs, blk))
        S = _block_states(xs[:, blk], dts[:, blk], A, Bs[:, blk], d, before, S)[1]
        starts.append(S)
    grads = [torch.empty_like(t) for t in (xs, dts, Bs, Cs)]
    dA = A.new_zeros(H, dtype=x.dtype)
    dS = dfinal.to(x.dtype)
    for blk, S in reversed(list(zip(blocks, starts))):
        d, before = (None, None) if docs is None else (docs[:, blk], _doc_before(docs, blk))
        dx, ddt, dA_blk, dB, dC, dS = _block_bwd(dys[:, blk], dS, xs[:, blk], dts[:, blk], A, Bs[:, blk],
                                                  Cs[:, blk], d, before, S)
        for grad, part in zip(grads, (dx, ddt, dB, dC)):
            grad[:, blk] = part
        dA = dA + dA_blk
    dx, ddt, dB, dC = (t.reshape(b, -1, *t.shape[3:])[:, :L] for t in grads)
    return dx, ddt, dA, dB, dC, dS
