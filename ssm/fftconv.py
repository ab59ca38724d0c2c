"""Long convolutions by FFT and the state algebra that lets them run in chunks (docs/s4.md).

- `fftconv`: causal `y = K * u + d u` (and the bidirectional form, a second filter on the
  strictly future inputs) through real FFTs of length `fft_length(L)` (>= 2L), always in float32
  (autocast is switched off here: bf16 FFTs lose the filter's tail).
- State passing, so a sequence can be processed chunk by chunk with the result of one pass:
  the zero-input response of an initial state `s` over L steps (`y_k += C Ab^(k+1) s`) and the
  state after the last step (`x_{L-1} = Ab^L s + sum_k Ab^(L-1-k) Bb u_k`), in closed form for a
  diagonal SSM (Vandermonde products) and by a chunked power scan for a dense `Ab` (S4's DPLR
  system in step form). Convention: `x_k = Ab x_{k-1} + Bb u_k`, `y_k = C x_k + D u_k`, so
  `K_l = C Ab^l Bb` starts with `C Bb` at lag 0.
- Packed documents (docs/packing.md): `cross_document_response`, the part of a whole-row
  convolution that reaches a document from the ones before it, built from the same state algebra
  (the state crossing each document boundary and its zero-input response), so subtracting it
  leaves exactly what each document would give alone.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch.autograd.function import once_differentiable

import kernels


def no_autocast(device_type: str):
    """Context that disables autocast for the SSM math on `device_type`."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape` (size-1 dims are dropped by a view, not a sum)."""
    extra = t.dim() - len(shape)
    lead = tuple(i for i in range(extra) if t.shape[i] != 1)
    t = t.sum(dim=lead) if lead else t
    t = t.reshape(t.shape[len(t.shape) - len(shape):]) if t.dim() > len(shape) else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def fft_length(L: int) -> int:
    """FFT length for a causal convolution of length L: the smallest 2^a 3^b 5^c >= 2L.

    2L is the shortest circular length with no wrap-around for both the causal and the
    bidirectional filter; FFT libraries (MKL, pocketfft, cuFFT) are fastest on 2-, 3- and
    5-smooth lengths, while a large prime factor can cost several times more (see BENCHMARKS.md).
    """
    best = 1 << max(1, (2 * L - 1).bit_length())                 # the power of two >= 2L
    p5 = 1
    while p5 < best:                                                   # every 3^b 5^c below it,
        p35 = p5
        while p35 < best:
            m = p35
            while m < 2 * L:                                           # times the power of 2 reaching 2L
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


# Bytes per temporary in the blocked CPU path: buffers under glibc's largest mmap threshold (32 MiB)
# are reused from the heap between calls instead of being page-faulted in afresh every time.
BLOCK_BYTES = 8 << 20


def _channel_blocks(rows: int, per_row_bytes: int, device: torch.device) -> list[slice]:
    """Slices of the channel dim so each FFT temporary stays under BLOCK_BYTES (CPU only)."""
    step = rows if device.type != "cpu" else max(1, min(rows, BLOCK_BYTES // max(1, per_row_bytes)))
    return [slice(s, min(s + step, rows)) for s in range(0, rows, step)]


class _ConvSkip(torch.autograd.Function):
    """y = first L outputs of the circular length-n convolution of zero-padded u with k, + d u.

    u: (..., H, L), k: (..., H, Lk), d: k's leading shape or None; the leading dims broadcast.
    The skip is folded into the filter (`d` at lag 0 adds `d` to every frequency of the filter
    spectrum), so its gradient is lag 0 of the filter gradient. On the CPU the work runs in blocks
    of channels (see BLOCK_BYTES); each spectral product is one pass, and the saved spectra are
    conjugated in place once the forward is done with them, so the backward needs no conjugate
    copies. Saved: the filter spectrum and either the input spectrum (`save_spectrum`) or u (the
    backward then recomputes its FFT). Broadcast dims are summed in the frequency domain (one
    inverse FFT per filter row).
    """

    @staticmethod
    def forward(ctx, u, k, d, n, save_spectrum):
        L, H = u.shape[-1], u.shape[-2]
        if k.shape[-2] != H:
            raise ValueError(f"fftconv: u has {H} channels (dim -2) but k has {k.shape[-2]}")
        lead = torch.broadcast_shapes(u.shape[:-2], k.shape[:-2])
        y = u.new_empty(lead + (H, L))                                  # (..., H, L)
        saved_u, saved_k = [], []
        for hs in _channel_blocks(H, 4 * n * max(1, math.prod(lead)), u.device):
            u_f = torch.fft.rfft(u[..., hs, :], n=n)                    # (..., h, n/2+1)
            k_f = torch.fft.rfft(k[..., hs, :], n=n)
            if d is not None:
                k_f += d[..., hs].unsqueeze(-1)
            if not save_spectrum and u_f.shape[:-2] == lead:
                prod = u_f.mul_(k_f)                                    # u_f is not needed any more
            else:
                prod = u_f * k_f
            y[..., hs, :] = torch.fft.irfft(prod, n=n)[..., :L]
            del prod
            saved_u.append(u_f.conj_physical_() if save_spectrum else u[..., hs, :])
            saved_k.append(k_f.conj_physical_())
        ctx.save_for_backward(*saved_u, *saved_k)
        ctx.meta = (n, save_spectrum, u.shape, k.shape, None if d is None else d.shape)
        return y

    @staticmethod
    def backward(ctx, grad):
        if torch.is_grad_enabled():
            raise RuntimeError("the fused float32 FFT convolution (ssm.fftconv) has no double backward; "
                               "a float64 layer (`.double()`) computes through plain differentiable ops")
        return _ConvSkip._backward(ctx, grad)

    @staticmethod
    @once_differentiable  # the saved spectra come from the forward without autograd history
    def _backward(ctx, grad):
        n, save_spectrum, u_shape, k_shape, d_shape = ctx.meta
        saved = ctx.saved_tensors
        saved_u, saved_k = saved[: len(saved) // 2], saved[len(saved) // 2:]
        L, H = u_shape[-1], u_shape[-2]
        need_u, need_k, need_d = ctx.needs_input_grad[:3]
        gu = grad.new_empty(u_shape) if need_u else None
        gk = grad.new_empty(k_shape) if need_k else None
        gd = grad.new_empty(k_shape[:-1]) if need_d else None
        lead = grad.shape[:-2]
        for hs, us, k_fc in zip(_channel_blocks(H, 4 * n * max(1, math.prod(lead)), grad.device),
                                saved_u, saved_k):
            g = torch.fft.rfft(grad[..., hs, :], n=n)                   # (..., h, n/2+1)
            if need_k or need_d:
                u_fc = us if save_spectrum else torch.fft.rfft(us, n=n).conj_physical_()
                gk_full = torch.fft.irfft(_sum_to(g * u_fc, k_fc.shape), n=n)   # (..., h, n)
                del u_fc
                if need_k:
                    gk[..., hs, :] = gk_full[..., :k_shape[-1]]
                if need_d:
                    gd[..., hs] = gk_full[..., 0]
            if need_u:
                spec = g.mul_(k_fc) if g.shape == torch.broadcast_shapes(g.shape, k_fc.shape) else g * k_fc
                gu[..., hs, :] = torch.fft.irfft(_sum_to(spec, us.shape[:-1] + spec.shape[-1:]), n=n)[..., :L]
        return gu, gk, None if gd is None else _sum_to(gd, d_shape), None, None


def fftconv(u: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None = None,
            d: torch.Tensor | None = None, *, save_spectrum: bool = True) -> torch.Tensor:
    """Causal convolution `y_l = sum_{m<=l} k_m u_{l-m}` (+ `d u_l`) along the last dim, by FFT in float32.

    u: (..., L) real; k: broadcastable to u's leading dims, (..., Lk) with Lk <= L (shorter
    filters are zero-extended). k_rev (same shape as k) is the bidirectional part: it acts on the
    strictly future inputs, `y_l += sum_{m>=0} k_rev_m u_{l+1+m}` (one FFT for both directions).
    d (k's leading shape) is the skip term, computed inside the same FFT. `save_spectrum=False`
    keeps u instead of its spectrum for the backward (less memory, one more FFT there).
    """
    L = u.shape[-1]
    if k.shape[-1] > L or (k_rev is not None and k_rev.shape[-1] > L):
        raise ValueError(f"fftconv: filter length {k.shape[-1]} exceeds sequence length {L}")
    n = fft_length(int(L))
    if u.dtype == torch.float64:
        return _fftconv_plain(u, k, k_rev, d, n)
    with no_autocast(u.device.type):
        u, k = u.float(), k.float()
        vector = u.dim() == 1 and k.dim() == 1
        u, k = (u if u.dim() > 1 else u.unsqueeze(0)), (k if k.dim() > 1 else k.unsqueeze(0))
        if u.shape[-2] != k.shape[-2]:                                 # channel dim broadcast
            H = max(u.shape[-2], k.shape[-2])
            u, k = u.expand(u.shape[:-2] + (H, L)), k.expand(k.shape[:-2] + (H, k.shape[-1]))
        if k_rev is not None:
            k_rev = k_rev.float()
            pad = torch.zeros(k.shape[:-1] + (n - k.shape[-1] - k_rev.shape[-1],),
                              dtype=k.dtype, device=k.device)
            # lag -(m+1) of the circular length-n convolution sits at index n-1-m
            k = torch.cat([k, pad, k_rev.flip(-1)], dim=-1)           # (..., n)
        y = _ConvSkip.apply(u, k, None if d is None else d.float(), n, save_spectrum)   # (..., L)
        return y[0] if vector else y


def _fftconv_plain(u, k, k_rev, d, n: int) -> torch.Tensor:
    """The same convolution in float64 from differentiable torch ops: the path of `.double()`
    layers, through which `gradcheck`, double backward and `torch.func` transforms work."""
    L = u.shape[-1]
    k = k.to(u.dtype)
    if k_rev is not None:
        pad = torch.zeros(k.shape[:-1] + (n - k.shape[-1] - k_rev.shape[-1],), dtype=k.dtype, device=k.device)
        k = torch.cat([k, pad, k_rev.to(u.dtype).flip(-1)], dim=-1)   # (..., n)
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :L]
    return y if d is None else y + d.to(u.dtype).unsqueeze(-1) * u


def roll_left_padded(u: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Move each right-padded row of u (B, ..., L) so its real part ends at index L-1.

    Padding must already be zero. Feeding the result to a causal SSM gives, at the last index,
    the state after each row's last real input (up to the decay of the initial state).
    """
    L = u.shape[-1]
    idx = (torch.arange(L, device=u.device) + lengths.to(u.device)[:, None]) % L   # (B, L)
    idx = idx.view((u.shape[0],) + (1,) * (u.dim() - 2) + (L,)).expand_as(u)
    return torch.gather(u, -1, idx)                                    # (B, ..., L)


# ---- diagonal SSM (S4D): N/2 complex modes per channel ------------------------------------------

def diag_state_response(C: torch.Tensor, log_z: torch.Tensor, state: torch.Tensor, L: int,
                        *, backend: str = "auto", first_power: int = 1) -> torch.Tensor:
    """Zero-input response `y_k = 2 Re sum_n C_n z_n^(k+p) s_n`, k < L, p = `first_power` (1 or 0).

    C: (c, H, N2); log_z: (H, N2); state: (B, H, N2) complex. Returns (B, c, H, L) real.
    """
    s = state if first_power == 0 else log_z.exp() * state             # (B, H, N2)
    v = C.unsqueeze(0) * s.unsqueeze(1)                                # (B, c, H, N2)
    return kernels.vandermonde_mult(v, log_z.expand_as(v), L, backend=backend)   # (B, c, H, L)


def diag_next_state(u: torch.Tensor, log_z: torch.Tensor, Bb: torch.Tensor, state: torch.Tensor,
                    lengths: torch.Tensor | None = None, *, chunk: int = 512) -> torch.Tensor:
    """State after the last (real) step: `z^len s + sum_k z^(len-1-k) Bb u_k`.

    u: (B, H, L) real (padding zeroed); log_z, Bb: (H, N2); state: (B, H, N2). Powers are taken
    by `exp` of the exponent chunk by chunk, so memory is O(B H N chunk), never O(H N L).
    """
    Bsz, H, L = u.shape
    if lengths is not None:
        u = roll_left_padded(u, lengths)
        steps = lengths.to(u.device, log_z.real.dtype)                 # (B,)
    else:
        steps = torch.full((Bsz,), float(L), device=u.device, dtype=log_z.real.dtype)
    acc = torch.zeros(Bsz, H, log_z.shape[-1], dtype=log_z.dtype, device=u.device)
    for s in range(0, L, chunk):
        e = min(s + chunk, L)
        expo = torch.arange(L - 1 - s, L - 1 - e, -1, device=u.device, dtype=log_z.real.dtype)
        powers = torch.exp(log_z.unsqueeze(-1) * expo)                 # (H, N2, T)
        acc = acc + torch.einsum("bht,hnt->bhn", u[..., s:e].to(log_z.dtype), powers)
    decay = torch.exp(log_z.unsqueeze(0) * steps[:, None, None])       # (B, H, N2)
    return decay * state + Bb * acc                                    # (B, H, N2)


# ---- dense SSM (S4 in step form): full N x N complex transition per channel ----------------------

def _batched_power(Ab: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Ab^steps[b] for each batch row: Ab (H, N, N), steps (B,) int -> (B, H, N, N)."""
    uniq, inv = torch.unique(steps, return_inverse=True)
    powers = torch.stack([torch.linalg.matrix_power(Ab, int(p)) for p in uniq.tolist()])
    return powers[inv]                                                 # (B, H, N, N)


def dense_state_response(C: torch.Tensor, Ab: torch.Tensor, state: torch.Tensor, L: int,
                         *, chunk: int = 64, first_power: int = 1) -> torch.Tensor:
    """Zero-input response `y_k = Re C Ab^(k+p) s` for a dense Ab, p = `first_power` (1 or 0), by
    chunked powers.

    C: (c, H, N); Ab: (H, N, N); state: (B, H, N). Cost O(H N^2 T + B c H N L + B H N^2 L/T).
    """
    T = min(chunk, L)
    rows = [C]
    for _ in range(T - 1):
        rows.append(torch.einsum("chn,hnm->chm", rows[-1], Ab))
    CK = torch.stack(rows, dim=-2)                                     # (c, H, T, N): C Ab^j
    AT = torch.linalg.matrix_power(Ab, T)                              # (H, N, N)
    s = state if first_power == 0 else torch.einsum("hnm,bhm->bhn", Ab, state)   # (B, H, N): Ab^p s
    out = []
    for start in range(0, L, T):
        n = min(T, L - start)
        out.append(torch.einsum("chtn,bhn->bcht", CK[:, :, :n], s).real)   # (B, c, H, n)
        s = torch.einsum("hnm,bhm->bhn", AT, s)
    return torch.cat(out, dim=-1)                                      # (B, c, H, L)


def dense_next_state(u: torch.Tensor, Ab: torch.Tensor, Bb: torch.Tensor, state: torch.Tensor,
                     lengths: torch.Tensor | None = None, *, chunk: int = 64) -> torch.Tensor:
    """State after the last (real) step for a dense Ab: `Ab^len s + sum_k Ab^(len-1-k) Bb u_k`.

    u: (B, H, L) real; Ab: (H, N, N); Bb: (H, N); state: (B, H, N). Chunks of T steps use the
    Krylov block `[Ab^j Bb]_{j<T}` and carry the state with `Ab^T`.
    """
    Bsz, H, L = u.shape
    if lengths is not None:
        u = roll_left_padded(u, lengths)
        decay = _batched_power(Ab, lengths.to(torch.long))             # (B, H, N, N)
        x = torch.einsum("bhnm,bhm->bhn", decay, state)
    else:
        x = torch.einsum("hnm,bhm->bhn", torch.linalg.matrix_power(Ab, L), state)
    T = min(chunk, L)
    cols = [Bb]
    for _ in range(T - 1):
        cols.append(torch.einsum("hnm,hm->hn", Ab, cols[-1]))
    KB = torch.stack(cols, dim=-1)                                     # (H, N, T): Ab^j Bb
    AT = torch.linalg.matrix_power(Ab, T)
    acc = torch.zeros_like(x)                                          # (B, H, N)
    for start in range(0, L, T):
        n = min(T, L - start)
        piece = u[..., start:start + n].flip(-1).to(Ab.dtype)          # (B, H, n): newest first
        A_n = AT if n == T else torch.linalg.matrix_power(Ab, n)
        acc = torch.einsum("hnm,bhm->bhn", A_n, acc) + torch.einsum("hnt,bht->bhn", KB[..., :n], piece)
    return x + acc                                                     # (B, H, N)


# ---- packed documents -------------------------------------------------------------------------

def document_spans(seq_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(starts, lengths), each (B, K) int64 with K the most documents in a row: where each row's
    k-th document starts and how long it is (rows with fewer documents: length 0)."""
    from ssm.packing import doc_starts

    Bsz, L = seq_idx.shape
    start = doc_starts(seq_idx)                                        # (B, L) bool
    rank = torch.cumsum(start.long(), dim=1) - 1                       # (B, L): document ordinal
    K = int(rank[:, -1].max()) + 1
    ar = torch.arange(L, device=seq_idx.device).expand(Bsz, L)        # (B, L)
    starts = torch.full((Bsz, K), L, dtype=torch.long, device=seq_idx.device)
    starts.scatter_reduce_(1, rank, ar, reduce="amin")
    lengths = torch.zeros(Bsz, K, dtype=torch.long, device=seq_idx.device)
    lengths.scatter_add_(1, rank, torch.ones_like(rank))
    return starts, lengths


def _span_index(start: torch.Tensor, length: torch.Tensor, T: int, L: int):
    """Positions start + j, j < T, clamped into the row, and whether j < length: (B, T) each."""
    j = torch.arange(T, device=start.device)
    return (start[:, None] + j).clamp(max=L - 1), j < length[:, None]


def cross_document_response(u: torch.Tensor, seq_idx: torch.Tensor, advance, response,
                            zero_state: torch.Tensor) -> torch.Tensor:
    """The part of the whole-row causal SSM convolution of u (B, H, L) that each position receives
    from earlier documents of its row: (B, c, H, L), zero in every row's first document.

    For a position k steps into a document that starts at a, that part is the zero-input response
    of the row's state after a steps (no resets), `C Ab^(k+1) x_(a-1)`, so it is computed per
    document boundary: the state is carried from boundary to boundary with
    `advance(segment (B, H, T), state, lengths (B,)) -> state` (the previous document, right
    padded) and its response read with `response(state, T) -> (B, c, H, T)`. One step per
    document index (K - 1 for K documents in the longest row), each over the longest document of
    that index.
    """
    Bsz, H, L = u.shape
    starts, lengths = document_spans(seq_idx)                          # (B, K) each
    out, state = None, zero_state
    for k in range(1, starts.shape[1]):
        T_prev = int(lengths[:, k - 1].max())
        idx, real = _span_index(starts[:, k - 1], lengths[:, k - 1], T_prev, L)
        seg = u.gather(-1, idx[:, None, :].expand(Bsz, H, T_prev)) * real[:, None, :].to(u.dtype)   # (B, H, T)
        state = advance(seg, state, lengths[:, k - 1])                 # (B, H, n): after document k-1
        T = int(lengths[:, k].max())
        idx, real = _span_index(starts[:, k], lengths[:, k], T, L)
        r = response(state, T) * real[:, None, None, :].to(u.dtype)   # (B, c, H, T)
        if out is None:
            out = u.new_zeros(Bsz, r.shape[1], H, L)
        out = out.scatter_add(-1, idx[:, None, None, :].expand_as(r), r.to(u.dtype))
    return out if out is not None else u.new_zeros(Bsz, 1, H, L)


# Per-document convolution is used when the documents, padded to the longest one, hold at most
# this many times the row's positions (read at call time; tests set it to 0 or inf to pick a
# path). Measured on the CPU (S4D, H = 64, N = 64, 32 documents of 500-2,000 tokens in 21 rows of
# 2,000, fwd+bwd): documents 0.43 s, row + cross-document correction 1.29 s, padded batch 0.39 s;
# there the documents with the rows' filler hold 2.5x the row's positions.
DOCUMENT_BATCH_WASTE = 4.0


def document_fftconv(u: torch.Tensor, seq_idx: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None,
                     d: torch.Tensor | None, *, save_spectrum: bool = True) -> torch.Tensor | None:
    """`fftconv` of every document of the packed rows u (B, H, L) on its own, from a zero state:
    (B, c, H, L), or None when padding the documents to the longest one would cost more than
    `DOCUMENT_BATCH_WASTE` times the row's positions (then convolve the row and subtract
    `cross_document_response`).

    The documents become one right-padded batch (n_docs, H, T), T the longest document, convolved
    with the first T lags of the filters (exact: the filters are causal, and the anti-causal part
    only reads later inputs, which are zero past the document's end), and go back to their
    positions. Cost: FFTs of length ~2T instead of ~2L, no loop over documents.
    """
    Bsz, H, L = u.shape
    starts, lengths = document_spans(seq_idx)                          # (B, K) each
    real_doc = lengths > 0                                             # (B, K)
    row = torch.arange(Bsz, device=u.device)[:, None].expand_as(starts)[real_doc]   # (n,)
    start, length = starts[real_doc], lengths[real_doc]                # (n,) each
    T = int(length.max())
    if length.numel() * T > DOCUMENT_BATCH_WASTE * Bsz * L:
        return None
    idx, real = _span_index(start, length, T, L)                       # (n, T) each
    seg = u.transpose(1, 2)[row[:, None], idx]                         # (n, T, H)
    seg = (seg * real[..., None].to(u.dtype)).transpose(1, 2)          # (n, H, T)
    k_rev = None if k_rev is None else k_rev[..., :T]
    y = fftconv(seg.unsqueeze(1), k[..., :T], k_rev, d, save_spectrum=save_spectrum)   # (n, c, H, T)
    c = y.shape[1]
    flat = (row[:, None] * L + idx)[real]                              # (m,) positions of real tokens
    out = y.new_zeros(Bsz * L, c, H).index_put((flat,), y.permute(0, 3, 1, 2)[real])   # (B*L, c, H)
    return out.view(Bsz, L, c, H).permute(0, 2, 3, 1)                  # (B, c, H, L)
