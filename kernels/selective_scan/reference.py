"""Selective scan (Mamba) in plain PyTorch: the sequential definition and the chunked CPU path.

Per token t, channel d, state n (the input term is Euler, dt * B, as in published checkpoints):

    dt_t[d]   = softplus(delta_t[d] + delta_bias[d])        (or without softplus)
    x_t[d, n] = exp(dt_t[d] A[d, n]) x_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d]
    y_t[d]    = sum_n C_t[n] x_t[d, n] + D[d] u_t[d],       then y_t *= silu(z_t[d]) if z is given

- `selective_scan_ref`: the definition, a plain loop over t. Run in float64 it is the ground truth.
- Packed documents: `reset` (b, L) bool marks the tokens before which the state restarts from
  zero (`resets_from_seq_idx`); the initial state feeds each row's first document only.
- `selective_scan_chunked_fwd` / `selective_scan_chunked_bwd`: the same numbers without a Python
  loop over time steps and without any (batch, L, D, N) tensor; no autograd (the custom op in
  `op.py` adds it).

Chunked form. With c_t = A * sum_{r<=t} dt_r (the decay accumulated since the chunk start),
inside a chunk

    x_t = exp(c_t) x_0 + sum_{s<=t} exp(c_t - c_s) w_s,     w_s = dt_s B_s u_s,

which factorizes into elementwise products and one cumulative sum over the chunk:
x_t = exp(ct_t) (exp(c_m) x_0 + cumsum_s exp(-ct_s) w_s) with ct = c - c_m, measured from the
chunk's middle step m. Centering halves the exponents: the factors stay in
[exp(-LIM), exp(LIM)] as long as step * (q/2 + 1) <= LIM, where step = max |dt A| over the input.
The chunk length q is therefore the largest power of two <= CHUNK that keeps that bound
(`_sub_chunk`; LIM = 60 in float32, where exp overflows at 88, and 600 in float64). Per-step decays
exp(dt A) below exp(-DECAY_FLOOR) are rounded up to it (e^-30 in float32, e^-60 in float64: below
the rounding of the state they multiply), so step <= DECAY_FLOOR for decaying systems and q >= 4 in
float32 whatever the data. The cumulative sums of dt are taken in float64, so the exponents are
accurate to float32 rounding. The backward runs the adjoint recurrence
lam_t = C_t gy_t + exp(dt_{t+1} A) lam_{t+1} the same way, reversed in time, recomputing the
chunk's states from its saved start state: memory is the inputs, the states at every CHUNK-th step
(batch, L / CHUNK, D, N) and one chunk of temporaries (batch, CHUNK, D, N).

Layout inside: time-major chunks (batch, q, G, D/G, N) so the cumulative sums run over contiguous
rows, with B and C chunks (batch, q, G, 1, N) broadcast over the channels of their group (or, when
time-invariant, (1, 1, 1, D, N)). No Triton import here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Chunk length (a power of two): states are saved every CHUNK steps for the backward, and the
# sub-chunks the exponent bound allows divide it. Read at call time (tests lower it).
CHUNK = 64
LIM = {torch.float32: 60.0, torch.float64: 600.0}
DECAY_FLOOR = {torch.float32: 30.0, torch.float64: 60.0}
LOOP_MIN_STEPS = 16   # chunk length from which `_cumsum_steps_` adds step by step (read at call time)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precisions are computed in float32)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _dt(delta, delta_bias, delta_softplus):
    dt = delta if delta_bias is None else delta + delta_bias[:, None]  # (b, D, L)
    return F.softplus(dt) if delta_softplus else dt


def resets_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """(b, L) document labels -> (b, L) bool, True where the label differs from the previous token's."""
    reset = torch.zeros_like(seq_idx, dtype=torch.bool)            # (b, L)
    reset[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return reset


def _per_channel(M: torch.Tensor, dim: int) -> torch.Tensor:
    """B or C as (batch, D, N, L) from (batch, G, N, L): the group's rows repeated per channel."""
    return M.repeat_interleave(dim // M.shape[1], dim=1)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, seq_idx=None):
    """The definition, one token at a time. u, delta, z (b, D, L); A (D, N); B, C (D, N) or
    (b, G, N, L) or (b, N, L); D, delta_bias (D,); initial_state (b, D, N); seq_idx (b, L) int:
    the state restarts from zero before every token whose label differs from its predecessor's.
    Returns y (b, D, L) in u's dtype [, last state (b, D, N) in the compute dtype]."""
    f = compute_dtype(u, delta, A, B, C)
    batch, dim, L = u.shape
    dtype_in = u.dtype
    u, A = u.to(f), A.to(f)
    dt = _dt(delta.to(f), None if delta_bias is None else delta_bias.to(f), delta_softplus)  # (b, D, L)
    Bs = [M.to(f) if M.dim() == 2 else _per_channel((M if M.dim() == 4 else M[:, None]).to(f), dim)
          for M in (B, C)]                                          # (D, N) or (b, D, N, L) each
    x = u.new_zeros(batch, dim, A.shape[1]) if initial_state is None else initial_state.to(f)  # (b, D, N)
    ys = []
    for t in range(L):
        if seq_idx is not None and t > 0:
            x = x * (seq_idx[:, t] == seq_idx[:, t - 1]).to(f)[:, None, None]   # (b, D, N)
        Bt, Ct = (M if M.dim() == 2 else M[..., t] for M in Bs)     # (D, N) or (b, D, N)
        x = torch.exp(dt[..., t, None] * A) * x + (dt[..., t] * u[..., t])[..., None] * Bt  # (b, D, N)
        ys.append((x * Ct).sum(-1))                                 # (b, D)
    y = torch.stack(ys, dim=-1)                                     # (b, D, L)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    y = y.to(dtype_in)
    return (y, x) if return_last_state else y


def _cumsum_steps_(t: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum of t (b, q, ...) over dim 1, in place (t is returned): one add of a whole
    time step per step. On the CPU `torch.cumsum` over a non-last dimension of these tensors is
    ~5x slower than this loop (3.6 ms against 0.6 ms at q = 64, D = 512, N = 16, one thread); it
    was a third of the Mamba layer's time. Chunks shorter than LOOP_MIN_STEPS (large dt A forces
    them) use `torch.cumsum`, whose cost there is below the loop's per-step overhead."""
    if t.shape[1] < LOOP_MIN_STEPS:                                  # short chunks: per-op cost wins
        return t.copy_(torch.cumsum(t.flip(1), 1).flip(1)) if reverse else t.cumsum_(1)
    steps = range(t.shape[1] - 2, -1, -1) if reverse else range(1, t.shape[1])
    for i in steps:
        t[:, i] += t[:, i + 1] if reverse else t[:, i - 1]
    return t


def _sub_chunk(dt: torch.Tensor, A: torch.Tensor) -> tuple[int, bool]:
    """The chunk length q (a power of two <= CHUNK with step * (q/2 + 1) <= LIM, step the largest
    per-step |dt A| after the floor) and whether the floor is reached anywhere."""
    floor = DECAY_FLOOR[dt.dtype]
    lo, hi = dt * A.amin(dim=-1)[:, None], dt * A.amax(dim=-1)[:, None]      # (b, D, L) each
    decay = float(torch.minimum(lo, hi).neg().amax().clamp_min(0))
    grow = float(torch.maximum(lo, hi).amax().clamp_min(0))
    step = max(min(decay, floor), grow)
    q = CHUNK
    while q > 1 and step * (q // 2 + 1) > LIM[dt.dtype]:
        q //= 2
    return q, decay > floor


class _Inputs:
    """The whole-sequence inputs in the chunk layout: per-token tensors (b, L, G, Dg, 1), B and C
    as (b, L, G, 1, N) or (1, 1, 1, D, N), A (G, Dg, N)."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset=None):
        f = compute_dtype(u, delta, A, B, C)
        batch, dim, L = u.shape
        self.f, self.L, self.N = f, L, A.shape[1]
        self.G = 1 if B.dim() == 2 else B.shape[1]
        shape = (batch, L, self.G, dim // self.G, 1)
        self.pre = delta.to(f) if delta_bias is None else delta.to(f) + delta_bias.to(f)[:, None]  # (b, D, L)
        dt = F.softplus(self.pre) if delta_softplus else self.pre  # (b, D, L)
        self.q, self.floored = _sub_chunk(dt, A.to(f))
        self.dt = dt.transpose(1, 2).reshape(shape)                 # (b, L, G, Dg, 1)
        self.u = u.to(f).transpose(1, 2).reshape(shape)             # (b, L, G, Dg, 1)
        self.z = None if z is None else z.to(f).transpose(1, 2).reshape(shape)
        self.D = D.to(f).reshape(self.G, -1, 1)                     # (G, Dg, 1)
        self.A = A.to(f).reshape(self.G, -1, self.N)                # (G, Dg, N)
        self.B, self.C = (self._bc(M, batch, dim) for M in (B, C))
        self.floor = -DECAY_FLOOR[f]
        self.reset = None if reset is None or not bool(reset.any()) else reset   # (b, L) bool

    def _bc(self, M, batch, dim):
        if M.dim() == 2:
            return M.to(self.f).reshape(1, 1, 1, dim, self.N)       # (1, 1, 1, D, N)
        return M.to(self.f).permute(0, 3, 1, 2)[:, :, :, None, :]   # (b, L, G, 1, N) view

    def chunk(self, M, sl):
        return M if M.shape[1] == 1 else M[:, sl]


def _factors(inp: _Inputs, sl: slice):
    """For the chunk `sl`: exp(ct) (b, q, G, Dg, N), exp(c_m) (b, G, Dg, N) and the per-step decay
    exponent dt A (b, q, G, Dg, N), floored. Without the floor, c = A * cumsum(dt) needs a
    cumulative sum over (b, q, D) only."""
    dt = inp.dt[:, sl]                                              # (b, q, G, Dg, 1)
    dA = dt * inp.A                                                 # (b, q, G, Dg, N)
    m = (dt.shape[1] - 1) // 2
    if inp.floored:
        dA = dA.clamp_min(inp.floor)
        S = _cumsum_steps_(dA.to(torch.float64, copy=True))         # (b, q, G, Dg, N)
        ct, cm = S - S[:, m:m + 1], S[:, m]
    else:
        S = torch.cumsum(dt.double(), dim=1)                        # (b, q, G, Dg, 1)
        ct, cm = (S - S[:, m:m + 1]).to(inp.f) * inp.A, S[:, m].to(inp.f) * inp.A
    return torch.exp(ct.to(inp.f)), torch.exp(cm.to(inp.f)), dA


def _chunk_resets(inp: _Inputs, sl: slice):
    """The resets inside chunk `sl`, or None: (reset (b, q) bool, start (b, q), nxt (b, q)) with
    start[t] the last reset position <= t (0 if none) and nxt[t] the first one > t (q if none)."""
    if inp.reset is None:
        return None
    r = inp.reset[:, sl]                                            # (b, q)
    q = r.shape[1]
    ar = torch.arange(q, device=r.device).expand_as(r)              # (b, q)
    start = torch.cummax(torch.where(r, ar, 0), dim=1).values       # (b, q)
    after = torch.where(r, ar, q).flip(1).cummin(dim=1).values.flip(1)   # (b, q): first reset >= t
    nxt = torch.cat([after[:, 1:], torch.full_like(after[:, :1], q)], dim=1)   # (b, q)
    return r, start, nxt


def _rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (b, q+1, ...) picked per row at index (b, q) along dim 1 -> (b, q, ...)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], index]


def _states(inp: _Inputs, sl: slice, x0: torch.Tensor):
    """The states of one chunk from its start state x0 (b, G, Dg, N): x (b, q, G, Dg, N), exp(ct), dt A.

    With resets, the cumulative sum is taken per segment (the total before the segment's start is
    subtracted) and x0 reaches only the tokens before the chunk's first reset."""
    e, em, dA = _factors(inp, sl)
    w = (inp.dt[:, sl] * inp.u[:, sl]) * inp.chunk(inp.B, sl)      # (b, q, G, Dg, N)
    h = _cumsum_steps_(w.div_(e))                                   # (b, q, G, Dg, N)
    resets = _chunk_resets(inp, sl)
    if resets is None:
        h += (em * x0)[:, None]
        return h.mul_(e), e, dA
    r, start, _ = resets
    before = _rows(F.pad(h, (0, 0) * (h.dim() - 2) + (1, 0)), start)   # (b, q, G, Dg, N)
    carried = (torch.cummax(r.long(), dim=1).values == 0).to(h.dtype)  # (b, q): no reset yet
    h = h - before + carried[:, :, None, None, None] * (em * x0)[:, None]
    return h.mul_(e), e, dA


def _gated(inp: _Inputs, sl: slice, y: torch.Tensor) -> torch.Tensor:
    y = y + inp.D * inp.u[:, sl]                                    # (b, q, G, Dg, 1)
    return y if inp.z is None else y * F.silu(inp.z[:, sl])


def _spans(inp: _Inputs):
    return [slice(t, min(t + inp.q, inp.L)) for t in range(0, inp.L, inp.q)]


def selective_scan_chunked_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset=None):
    """Forward on canonical shapes (see `op.py`): returns y (b, D, L) in the compute dtype, the last
    state (b, D, N) and the states before every CHUNK-th step (b, ceil(L / CHUNK), D, N).
    reset (b, L) bool or None: the state restarts from zero before the marked tokens."""
    inp = _Inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset)
    batch, dim, L = u.shape
    x = initial_state.to(inp.f).reshape(batch, inp.G, -1, inp.N)    # (b, G, Dg, N)
    y = torch.empty(batch, L, inp.G, dim // inp.G, 1, dtype=inp.f, device=u.device)  # (b, L, G, Dg, 1)
    saved = torch.empty(batch, -(-L // CHUNK), inp.G, dim // inp.G, inp.N, dtype=inp.f, device=u.device)
    for sl in _spans(inp):
        if sl.start % CHUNK == 0:
            saved[:, sl.start // CHUNK] = x
        xs = _states(inp, sl, x)[0]                                 # (b, q, G, Dg, N)
        y[:, sl] = _gated(inp, sl, (xs * inp.chunk(inp.C, sl)).sum(-1, keepdim=True))
        x = xs[:, -1]
    return (y.reshape(batch, L, dim).transpose(1, 2).contiguous(), x.reshape(batch, dim, inp.N),
            saved.reshape(batch, -1, dim, inp.N))


def _chunk_bwd(inp: _Inputs, sl: slice, x0, gout, carry, grads: dict):
    """Backward through one chunk: fills the chunk's slices of the per-token gradients, adds to the
    summed ones and returns the adjoint passed to the previous chunk's last state (b, G, Dg, N)."""
    xs, e, dA = _states(inp, sl, x0)                                # (b, q, G, Dg, N) each
    dt, u, Bc, Cc = inp.dt[:, sl], inp.u[:, sl], inp.chunk(inp.B, sl), inp.chunk(inp.C, sl)
    gy = gout
    if inp.z is not None:
        y = (xs * Cc).sum(-1, keepdim=True) + inp.D * u             # (b, q, G, Dg, 1)
        sig = torch.sigmoid(inp.z[:, sl])
        grads["z"][:, sl] = gout * y * sig * (1 + inp.z[:, sl] * (1 - sig))
        gy = gout * inp.z[:, sl] * sig
    grads["D"] += (gy * u).sum((0, 1))
    _accumulate(grads, "C", (gy * xs).sum_to_size(Cc.shape), sl)
    r = (gy * Cc).mul_(e)                                           # (b, q, G, Dg, N)
    r[:, -1] += carry * e[:, -1]
    lam = _cumsum_steps_(r, reverse=True)                           # (b, q, G, Dg, N)
    resets = _chunk_resets(inp, sl)
    if resets is not None:                                          # sum only up to the segment's end
        lam = lam - _rows(F.pad(lam, (0, 0) * (lam.dim() - 2) + (0, 1)), resets[2])
    lam = lam.div_(e)                                               # dLoss/dx_t
    dtu = dt * u                                                    # (b, q, G, Dg, 1)
    _accumulate(grads, "B", (lam * dtu).sum_to_size(Bc.shape), sl)
    g_dtu = (lam * Bc).sum(-1, keepdim=True)                        # (b, q, G, Dg, 1)
    a = torch.exp(dA)                                               # (b, q, G, Dg, N)
    carry_out = a[:, 0] * lam[:, 0]                                 # (b, G, Dg, N)
    prev = torch.cat([x0[:, None], xs[:, :-1]], dim=1)              # (b, q, G, Dg, N)
    if resets is not None:
        keep = (~resets[0]).to(prev.dtype)[:, :, None, None, None]  # (b, q, 1, 1, 1)
        prev = prev * keep                                          # the state before a reset is dropped
        carry_out = carry_out * keep[:, 0]
    g_dA = lam.mul_(a).mul_(prev)                                   # (b, q, G, Dg, N)
    if inp.floored:
        g_dA.masked_fill_(dt * inp.A < inp.floor, 0.0)
    grads["A"] += (g_dA * dt).sum((0, 1))
    grads["dt"][:, sl] = (g_dA * inp.A).sum(-1, keepdim=True) + g_dtu * u
    grads["u"][:, sl] = g_dtu * dt + gy * inp.D
    return carry_out


def _accumulate(grads: dict, name: str, g: torch.Tensor, sl: slice) -> None:
    """Time-varying B/C gradients go to their chunk's slice, time-invariant ones are summed."""
    if grads[name].shape[1] == 1:
        grads[name] += g
    else:
        grads[name][:, sl] = g


def _block_starts(inp: _Inputs, saved: torch.Tensor, k: int):
    """The chunks of block k (CHUNK steps) and their start states, recomputed from the saved one."""
    spans = [sl for sl in _spans(inp) if sl.start // CHUNK == k]
    starts = [saved[:, k]]
    for sl in spans[:-1]:
        starts.append(_states(inp, sl, starts[-1])[0][:, -1])
    return spans, starts


def selective_scan_chunked_bwd(gy, g_last, saved, u, delta, A, B, C, D, z, delta_bias, initial_state,
                               delta_softplus, reset=None):
    """Gradients of the forward above w.r.t. (u, delta, A, B, C, D, z, delta_bias, initial_state),
    each in the compute dtype and its input's shape (empty for z when z is None). `saved` is the
    forward's third output; gy (b, D, L) and g_last (b, D, N) are the output gradients."""
    inp = _Inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reset)
    batch, dim, L = u.shape
    G, N, f = inp.G, inp.N, inp.f
    tok = (batch, L, G, dim // G, 1)
    grads = {"u": u.new_empty(tok, dtype=f), "dt": u.new_empty(tok, dtype=f),
             "z": u.new_empty(tok if z is not None else (0,), dtype=f),
             "A": u.new_zeros(inp.A.shape, dtype=f), "D": u.new_zeros(inp.D.shape, dtype=f)}
    for name, M in (("B", inp.B), ("C", inp.C)):
        grads[name] = u.new_zeros(M.shape, dtype=f) if M.shape[1] == 1 else u.new_empty(M.shape, dtype=f)
    g = gy.to(f).transpose(1, 2).reshape(tok)                        # (b, L, G, Dg, 1)
    carry = g_last.to(f).reshape(batch, G, dim // G, N)             # (b, G, Dg, N)
    saved = saved.to(f).reshape(batch, -1, G, dim // G, N)          # (b, K, G, Dg, N)
    for k in reversed(range(saved.shape[1])):
        spans, starts = _block_starts(inp, saved, k)
        for sl, x0 in zip(reversed(spans), reversed(starts)):
            carry = _chunk_bwd(inp, sl, x0, g[:, sl], carry, grads)
    return _grads_out(inp, grads, carry, u, B, C, delta_bias, delta_softplus)


def _grads_out(inp: _Inputs, grads: dict, carry, u, B, C, delta_bias, delta_softplus):
    batch, dim, L = u.shape

    def back(t):                                                    # (b, L, G, Dg, 1) -> (b, D, L)
        return t.reshape(batch, L, dim).transpose(1, 2).contiguous()

    g_delta = back(grads["dt"])                                     # (b, D, L)
    if delta_softplus:
        g_delta = g_delta * torch.where(inp.pre > 20, 1.0, torch.sigmoid(inp.pre))
    g_bias = g_delta.sum((0, 2)) if delta_bias is not None else g_delta.new_zeros(dim)
    gB, gC = (g.reshape(M.shape) if M.dim() == 2 else g[:, :, :, 0].permute(0, 2, 3, 1).contiguous()
              for g, M in ((grads["B"], B), (grads["C"], C)))
    gz = back(grads["z"]) if grads["z"].numel() else grads["z"]
    return (back(grads["u"]), g_delta, grads["A"].reshape(dim, inp.N), gB, gC, grads["D"].reshape(dim), gz,
            g_bias, carry.reshape(batch, dim, inp.N))
