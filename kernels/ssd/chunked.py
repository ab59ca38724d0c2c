"""The chunked path of the SSD scan (`backend="torch"`, the CPU default), and the generic scan it
generalizes, in plain PyTorch without autograd (the custom op in `op.py` adds it). The math:
`docs/ssd_op.md`, "Chunked form" and "The chunked path on the CPU".

- `ssd_chunked_fwd` / `ssd_chunked_bwd`: the scan itself (no dt transform, D or z: the public
  function applies those with plain torch ops).
- `scan_chunked_fwd` / `scan_chunked_bwd`: `S_t = exp(a_t) S_{t-1} + u_t B_t^T`, `y_t = S_t C_t`
  with a per-token log-decay a (the SISO Mamba-3 scan runs on it).

No loop over time steps: chunks of Q tokens are batched, grouped into blocks of `chunks_per_block`
chunks so temporaries stay within `BLOCK_ELEMENTS`; only the state passing loops over chunks (and
the per-head Q x Q matrices over heads). The forward returns the state entering each block; the
backward recomputes each block from it. Tested against `reference.ssd_ref` in float64.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Temporaries of one block of chunks stay near this many elements (tests lower it to get several
# blocks); read at call time. 2^20 floats (4 MB) per temporary keeps the layer's peak memory low and
# the block's working set near the cache; larger blocks were not faster on the CPU.
BLOCK_ELEMENTS = 1 << 20
# The chunked path's own chunk length: at most this many tokens, whatever chunk size the caller
# asked for (the result does not depend on it). The work inside a chunk grows with its length
# (Q x Q decay and score matrices per head) while the state passing shrinks; on the CPU 64 tokens
# cost ~2.4x less than the public default 256 (fwd+bwd, H = 8, P = N = 64, L = 4096). Read at call
# time.
MAX_CHUNK = 64


# At least this many (batch row, chunk) pairs per block, whatever BLOCK_ELEMENTS says: the per-head
# Q x Q matrices are built in a Python loop over heads, which must stay cheap next to their work.
MIN_ROWS = 16


def chunks_per_block(b: int, H: int, Q: int, P: int, N: int) -> int:
    per_chunk = b * H * (Q * max(Q, P) + P * N)
    return max(1, -(-MIN_ROWS // b), BLOCK_ELEMENTS // per_chunk)


# Layout inside a block of K chunks: the batch and chunk axes merged into one, n = b K. Token-major
# tensors x, u, y (n, Q, H, P) and B, C (n, Q, G, N) keep the caller's layout: a group's R = H/G heads
# sit side by side as one (Q, R P) matrix, so the per-group products (chunk states, the incoming
# state's output) are plain batched matmuls. The per-head Q x Q matrices (decays, scores) are built
# one head at a time, (n, Q, Q), used and dropped: no (n, H, Q, Q) tensor is ever formed.


class _Decays:
    """A block's decay factors from a = dt A (n, Q, H) and the document counters doc (n, Q).

    cs = inclusive cumsum of a over the chunk, in float64; seg[i, j] = cs_i - cs_j is taken in
    float64 and rounded once (a float32 cs would carry an error of ulp(|cs|) into every factor).
    din (H, n, Q) = exp(cs_i) where token i still sees the incoming state; dout (H, n, Q) =
    exp(tot - cs_j) where token j reaches the chunk's final state; g (H, n) = exp(tot) where the
    incoming state survives the chunk; tot = cs at the chunk's last token.
    """

    def __init__(self, a, doc, before):
        n, Q, H = a.shape
        self.dtype = a.dtype
        cs = torch.cumsum(a.double(), dim=1).permute(2, 0, 1).contiguous()   # (H, n, Q)
        self.cs = cs
        tot = cs[..., -1:]                                                     # (H, n, 1)
        mask = torch.ones(Q, Q, dtype=torch.bool, device=a.device).tril()     # (Q, Q)
        din, dout, g = torch.exp(cs), torch.exp(tot - cs), torch.exp(tot[..., 0])
        if doc is not None:
            mask = mask & (doc.unsqueeze(-1) == doc.unsqueeze(-2))             # (n, Q, Q)
            din = din * (doc == before[:, None])
            dout = dout * (doc == doc[:, -1:])
            g = g * (doc[:, -1] == before)
        self.out_of_reach = ~mask
        self.din, self.dout, self.g = din.to(a.dtype), dout.to(a.dtype), g.to(a.dtype)

    def causal(self, h):
        """Lm[i, j] = exp(cs_i - cs_j) for j <= i in one document, else 0: (n, Q, Q) for head h."""
        cs = self.cs[h]
        seg = (cs.unsqueeze(-1) - cs.unsqueeze(-2)).to(self.dtype)            # (n, Q, Q)
        return seg.masked_fill_(self.out_of_reach, -math.inf).exp_()


def _log_decay(dt, A):
    """a = dt A (SSD), or A itself when dt is None (the generic scan: A is the per-token log-decay)."""
    return A if dt is None else dt * A


def _groups(t, G):
    """(n, Q, H, P) token-major -> (n, G, Q, R P): a group's heads side by side (a view when G = 1)."""
    n, Q, H, P = t.shape
    return t.reshape(n, Q, G, (H // G) * P).transpose(1, 2)


def _gmm(a, b):
    """(n, G, X, Y) @ (n, G, Y, Z) -> (n, G, X, Z). For G > 1 one bmm per group on the strided
    views (a 4-D matmul would copy both operands into contiguous batches first)."""
    n, G = a.shape[:2]
    if G == 1:
        return a @ b
    out = torch.empty(G, n, a.shape[2], b.shape[3], dtype=a.dtype, device=a.device)
    for g in range(G):
        torch.bmm(a[:, g], b[:, g], out=out[g])
    return out.transpose(0, 1)


def _heads(t, H):
    """(n, G, Q, R P) -> (n, Q, H, P) token-major (a view when G = 1)."""
    n, G, Q, RP = t.shape
    return t.transpose(1, 2).reshape(n, Q, H, RP * G // H)


def _token_major(t):
    """(H, n, Q) per-head factors -> (n, Q, H, 1) to scale token-major (n, Q, H, P) tensors
    (contiguous: a broadcast over a permuted view is several times slower)."""
    return t.permute(1, 2, 0).contiguous().unsqueeze(-1)


def _pass_states(S, s, g):
    """Scan over the K chunks of each row: S_in[k] = S, then S = g[k] S + s[k].
    S (b, H, P, N), s (b, K, H, P, N) (overwritten by S_in: no second buffer of that size),
    g (b, K, H) -> (S_in (b, K, H, P, N), S)."""
    for k in range(s.shape[1]):
        nxt = torch.addcmul(s[:, k], g[:, k, :, None, None], S)             # (b, H, P, N)
        s[:, k] = S
        S = nxt
    return s, S


def _states(x, dt, B, dec, S, b):
    """Chunk states s = sum_j dout_j dt_j x_j B_j^T (dt None: x is u = dt x already) and the
    incoming state of every chunk. Returns (S_in (n, H, P, N), outgoing S (b, H, P, N),
    wu = x dt dout (n, Q, H, P))."""
    n, Q, H, P = x.shape
    G, N = B.shape[-2:]
    factor = dec.dout if dt is None else dec.dout * dt.permute(2, 0, 1)
    wu = x * _token_major(factor)                                              # (n, Q, H, P)
    s = _gmm(_groups(wu, G).transpose(-1, -2), B.transpose(1, 2))           # (n, G, R P, N)
    g = dec.g.t().reshape(b, n // b, H)                                        # (b, K, H)
    S_in, S = _pass_states(S, s.reshape(b, n // b, H, P, N), g)
    return S_in.view(n, H, P, N), S, wu


def _block_fwd(x, dt, A, B, C, doc, before, S, out=None):
    """One block: x (n, Q, H, P), dt (n, Q, H), B, C (n, Q, G, N), doc (n, Q) or None, before (n,),
    incoming S (b, H, P, N) -> (y (n, Q, H, P), outgoing S); y is written into `out` (b, K, Q, H, P)
    when that is contiguous. With dt None, x is u and A the per-token log-decay a (n, Q, H)."""
    n, Q, H, P = x.shape
    G, N = B.shape[-2:]
    R = H // G
    dec = _Decays(_log_decay(dt, A), doc, before)
    S_in, S, _ = _states(x, dt, B, dec, S, S.shape[0])
    Ct = C.transpose(1, 2)                                                    # (n, G, Q, N)
    CB = _gmm(Ct, B.permute(0, 2, 3, 1))                                    # (n, G, Q, Q)
    dt_h = None if dt is None else dt.permute(2, 0, 1).unsqueeze(-2)         # (H, n, 1, Q)
    y_heads = torch.empty(H, n, Q, P, dtype=x.dtype, device=x.device)        # head-major: plain bmm outputs
    for h in range(H):
        M = dec.causal(h).mul_(CB[:, h // R])                                 # (n, Q, Q)
        if dt_h is not None:
            M.mul_(dt_h[h])                                                   # u = dt x folded in
        torch.bmm(M, x[:, :, h], out=y_heads[h])
    Ys = _heads(_gmm(Ct, S_in.view(n, G, R * P, N).transpose(-1, -2)), H)     # (n, Q, H, P)
    if out is None or not out.is_contiguous():
        return torch.addcmul(y_heads.permute(1, 2, 0, 3), Ys, _token_major(dec.din)), S
    torch.addcmul(y_heads.permute(1, 2, 0, 3), Ys, _token_major(dec.din), out=out.view(n, Q, H, P))
    return out, S


def _reverse_pass(dS, e, g):
    """Adjoint of `_pass_states`: dS_out[k] = dS, then dS = g[k] dS + e[k]; returns (dS_out, dS)
    (dS_out overwrites e)."""
    for k in reversed(range(e.shape[1])):
        nxt = torch.addcmul(e[:, k], g[:, k, :, None, None], dS)            # (b, H, P, N)
        e[:, k] = dS
        dS = nxt
    return e, dS


def _seg_grad(dseg):
    """d loss / d a_r from the gradient of seg[i, j] = a_{j+1} + ... + a_i (n, Q, Q): the sum of
    dseg over the rectangle i >= r > j, summed directly (no difference of large partial sums) and
    in float64 (up to Q^2 / 4 terms; the result is a float64 (n, Q))."""
    row = torch.cumsum(dseg, dim=-1, dtype=torch.float64).tril_(-1)       # [i, c] = sum_{j <= c} dseg, i > c
    col = row.sum(-2)                                                      # (n, Q): c = r - 1
    return torch.nn.functional.pad(col[:, :-1], (1, 0))                   # (n, Q): a_0 never enters seg


# long: one block's backward reads best as one piece: every gradient reuses the recomputed forward.
def _block_bwd(dy, dS, x, dt, A, B, C, doc, before, S):
    """Backward of `_block_fwd`: dy (n, Q, H, P), dS (b, H, P, N) the gradient of the outgoing
    state -> (dx, ddt, dA, dB, dC, gradient of the incoming state). With dt None (x is u, A the
    per-token log-decay): (du, da (n, Q, H), None, dB, dC, dS)."""
    n, Q, H, P = x.shape
    G, N = B.shape[-2:]
    R, b = H // G, S.shape[0]
    dec = _Decays(_log_decay(dt, A), doc, before)
    S_in, _, wu = _states(x, dt, B, dec, S, b)
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)                             # (n, G, Q, N)
    S_g = S_in.view(n, G, R * P, N)
    # The incoming state: y_i += din_i S_in C_i.
    dyd = dy * _token_major(dec.din)                                          # (n, Q, H, P)
    e = _gmm(_groups(dyd, G).transpose(-1, -2), Ct).reshape(b, n // b, H, P, N)
    dS_out, dS = _reverse_pass(dS, e, dec.g.t().reshape(b, n // b, H))
    dS_g = dS_out.view(n, G, R * P, N)
    ddin = torch.linalg.vecdot(_heads(_gmm(Ct, S_g.transpose(-1, -2)), H), dy) # (n, Q, H)
    dC = _gmm(_groups(dyd, G), S_g)                                         # (n, G, Q, N)
    del dyd
    # The chunk's state s = sum_j dout_j u_j B_j^T, u = dt x.
    V = _heads(_gmm(Bt, dS_g.transpose(-1, -2)), H)                           # (n, Q, H, P)
    xV = torch.linalg.vecdot(V, x)                                            # (n, Q, H): ddout / dt
    dB = _gmm(_groups(wu, G), dS_g)                                          # (n, G, Q, N)
    del wu
    dg = torch.linalg.vecdot(dS_out.view(n, H, -1), S_in.view(n, H, -1))     # (n, H)
    # Inside the chunk, head by head: y = M u with M = Lm o CB; dM = dy u^T, du = M^T dy.
    CB = _gmm(Ct, Bt.transpose(-1, -2))                                       # (n, G, Q, Q)
    dCB = torch.zeros_like(CB)
    da = torch.empty(H, n, Q, dtype=torch.float64, device=x.device)
    dt_h = None if dt is None else dt.permute(2, 0, 1).unsqueeze(-2)         # (H, n, 1, Q)
    du_heads = torch.empty(H, n, Q, P, dtype=x.dtype, device=x.device)       # head-major: plain bmm outputs
    for h in range(H):
        Lm = dec.causal(h)                                                    # (n, Q, Q)
        M = Lm * CB[:, h // R]
        dM = dy[:, :, h] @ x[:, :, h].transpose(-1, -2)                       # (n, Q, Q)
        if dt_h is not None:
            dM.mul_(dt_h[h])
        torch.bmm(M.transpose(-1, -2), dy[:, :, h], out=du_heads[h])
        dCB[:, h // R].addcmul_(dM, Lm)
        da[h] = _seg_grad(dM.mul_(M))
    dC = dC.add_(_gmm(dCB, Bt))
    dB = dB.add_(_gmm(dCB.transpose(-1, -2), Ct))
    du = torch.addcmul(du_heads.permute(1, 2, 0, 3), V, _token_major(dec.dout))   # (n, Q, H, P)
    del du_heads, V
    # The factors din, dout, g through cs = cumsum(a) (float64: small tensors).
    ddout = xV if dt is None else xV * dt                                     # (n, Q, H)
    ddin_h, ddout_h = ddin.permute(2, 0, 1).double(), ddout.permute(2, 0, 1).double()   # (H, n, Q)
    dcs = ddin_h * dec.din.double() - ddout_h * dec.dout.double()
    dcs[..., -1] += (ddout_h * dec.dout.double()).sum(-1) + (dg.t() * dec.g).double()
    da += torch.flip(torch.cumsum(torch.flip(dcs, [-1]), -1), [-1])
    da = da.permute(1, 2, 0)                                                  # (n, Q, H)
    if dt is None:
        return du, da.to(x.dtype), None, _heads_t(dB), _heads_t(dC), dS
    # u = dt x: ddt gets x . du, plus xV dout from the chunk state's own dependence on u.
    ddt = (da * A.double()).to(x.dtype) + torch.linalg.vecdot(du, x)         # (n, Q, H)
    dA = (da * dt.double()).sum((0, 1)).to(x.dtype)                           # (H,)
    dx = du.mul_(dt.unsqueeze(-1))                                            # (n, Q, H, P)
    return dx, ddt, dA, _heads_t(dB), _heads_t(dC), dS


def _heads_t(t):
    """(n, G, Q, N) -> (n, Q, G, N)."""
    return t.transpose(1, 2)


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


def _layout(b, L, H, P, N, chunk_size):
    """(Q, c, k): the chunk length used, the number of chunks and the chunks per block."""
    Q = min(chunk_size, MAX_CHUNK)
    return Q, -(-L // Q), chunks_per_block(b, H, Q, P, N)


def _blocks(x, N, chunk_size):
    """The blocks of chunks as slices over the chunk axis."""
    _, c, k = _layout(*x.shape, N, chunk_size)
    return [slice(i, min(i + k, c)) for i in range(0, c, k)]


def _block_steps(dts, dt, A, blk):
    """(dt, A) of block `blk` for `_block_fwd` / `_block_bwd`: SSD's step and A, or (None, the
    block's log-decay) for the generic scan (then `dts` holds the log-decay)."""
    return (None, _merged(dts, blk)) if dt is None else (_merged(dts, blk), A)


def _merged(t, blk):
    """Block `blk` of a chunked (b, c, Q, ...) tensor as (b K, Q, ...) (a view when it can be)."""
    t = t[:, blk]
    return t.reshape(-1, *t.shape[2:])


def _block_docs(docs, blk):
    """(doc (n, Q), counter before each chunk (n,)) for block `blk`, or (None, None)."""
    if docs is None:
        return None, None
    d = docs[:, blk]                                                        # (b, K, Q)
    first = docs[:, 0, :1] if blk.start == 0 else docs[:, blk.start - 1, -1:]   # (b, 1)
    before = torch.cat([first, d[:, :-1, -1]], dim=1)                      # (b, K)
    return d.reshape(-1, d.shape[-1]), before.reshape(-1)


def saved_blocks(b, L, H, P, N, chunk_size) -> int:
    """How many block-start states `ssd_chunked_fwd` returns for these shapes (symbolic-size safe)."""
    _, c, k = _layout(b, L, H, P, N, chunk_size)
    return -(-c // k)


def _chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size):
    """`ssd_chunked_fwd`, or with dt None the generic scan: x is u and A the log-decay (b, L, H)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    Q = min(chunk_size, MAX_CHUNK)
    xs, dts, Bs, Cs, docs = _canonical(x, A if dt is None else dt, B, C, doc, Q)
    S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states.to(x.dtype)
    y = torch.empty_like(xs)                                               # (b, c, Q, H, P)
    starts = []
    for blk in _blocks(x, N, chunk_size):
        starts.append(S)
        d, before = _block_docs(docs, blk)
        yb, S = _block_fwd(_merged(xs, blk), *_block_steps(dts, dt, A, blk), _merged(Bs, blk),
                           _merged(Cs, blk), d, before, S, out=y[:, blk])
        if yb.data_ptr() != y[:, blk].data_ptr():
            y[:, blk] = yb.view(b, -1, *yb.shape[1:])
    return y.reshape(b, -1, H, P)[:, :L], S, torch.stack(starts)


def ssd_chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size):
    """The scan y_t = S_t C_t by chunks: x (b, L, H, P), dt (b, L, H) (already transformed), A (H,),
    B, C (b, L, G, N), initial_states (b, H, P, N) or None, doc (b, L) int64 counter or None.
    Returns (y (b, L, H, P), final state (b, H, P, N), the state entering each block
    (`saved_blocks`, b, H, P, N), which spares the backward a forward sweep). No autograd."""
    return _chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size)


def scan_chunked_fwd(u, logdecay, B, C, initial_states, doc, chunk_size):
    """The generic scan S_t = exp(logdecay_t) S_{t-1} + u_t B_t^T, y_t = S_t C_t by the same chunks:
    u (b, L, H, P), logdecay (b, L, H), B, C (b, L, G, N); returns what `ssd_chunked_fwd` returns."""
    return _chunked_fwd(u, None, logdecay, B, C, initial_states, doc, chunk_size)


def _chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size, starts=None):
    """`ssd_chunked_bwd`, or with dt None the generic scan's (dA is then the log-decay's gradient)."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    Q = min(chunk_size, MAX_CHUNK)
    xs, dts, Bs, Cs, docs = _canonical(x, A if dt is None else dt, B, C, doc, Q)
    dys = _chunked(dy.to(x.dtype), Q)
    blocks = _blocks(x, N, chunk_size)
    if starts is None or starts.shape[0] != len(blocks):
        S = x.new_zeros(b, H, P, N) if initial_states is None else initial_states.to(x.dtype)
        starts = [S]
        for blk in blocks[:-1]:
            d, before = _block_docs(docs, blk)
            dt_b, A_b = _block_steps(dts, dt, A, blk)
            dec = _Decays(_log_decay(dt_b, A_b), d, before)
            S = _states(_merged(xs, blk), dt_b, _merged(Bs, blk), dec, S, b)[1]
            starts.append(S)
    grads = [torch.empty_like(t) for t in (xs, dts, Bs, Cs)]
    dA = None if dt is None else A.new_zeros(H, dtype=x.dtype)
    dS = dfinal.to(x.dtype)
    for blk, S in reversed(list(zip(blocks, starts))):
        d, before = _block_docs(docs, blk)
        dx, ddt, dA_blk, dB, dC, dS = _block_bwd(_merged(dys, blk), dS, _merged(xs, blk),
                                                  *_block_steps(dts, dt, A, blk), _merged(Bs, blk),
                                                  _merged(Cs, blk), d, before, S.to(x.dtype))
        for grad, part in zip(grads, (dx, ddt, dB, dC)):
            grad[:, blk] = part.reshape(b, -1, *part.shape[1:])
        if dA is not None:
            dA = dA + dA_blk
    dx, ddt, dB, dC = (t.reshape(b, -1, *t.shape[3:])[:, :L] for t in grads)
    return dx, ddt, dA, dB, dC, dS


def ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size, starts=None):
    """Gradients of <dy, y> + <dfinal, final> from `ssd_chunked_fwd` w.r.t. x, dt, A, B, C and the
    initial state (zeros when it is None). The blocks run backward, each recomputed from its
    incoming state: `starts` as the forward returned them, or (None) from a forward sweep here."""
    return _chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size, starts)


def scan_chunked_bwd(dy, dfinal, u, logdecay, B, C, initial_states, doc, chunk_size, starts=None):
    """Gradients of `scan_chunked_fwd`: (du, dlogdecay, dB, dC, dinitial_states)."""
    du, dld, _, dB, dC, dS = _chunked_bwd(dy, dfinal, u, None, logdecay, B, C, initial_states, doc, chunk_size,
                                          starts)
    return du, dld, dB, dC, dS
