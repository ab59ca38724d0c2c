"""Long convolutions by FFT and the state algebra that lets them run in chunks (SPEC section 3).

- `fftconv`: causal `y = K * u` (and the bidirectional form, a second filter on the strictly
  future inputs) through one real FFT of length 2L, always in float32 (autocast is switched off
  here: bf16 FFTs lose the filter's tail).
- State passing, so a sequence can be processed chunk by chunk with the result of one pass:
  the zero-input response of an initial state `s` over L steps (`y_k += C Ab^(k+1) s`) and the
  state after the last step (`x_{L-1} = Ab^L s + sum_k Ab^(L-1-k) Bb u_k`), in closed form for a
  diagonal SSM (Vandermonde products) and by a chunked power scan for a dense `Ab` (S4's DPLR
  system in step form). Convention: `x_k = Ab x_{k-1} + Bb u_k`, `y_k = C x_k + D u_k`, so
  `K_l = C Ab^l Bb` starts with `C Bb` at lag 0.
"""
from __future__ import annotations

import contextlib

import torch

import kernels


def no_autocast(device_type: str):
    """Context that disables autocast for the SSM math on `device_type`."""
    if device_type in ("cpu", "cuda"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    extra = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(extra))) if extra > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


class _FFTConv(torch.autograd.Function):
    """Circular convolution of zero-padded u (..., L) with a length-2L filter, first L outputs.

    Saves the two spectra (complex, (..., L+1) each: about the size of u and the filter) so the
    backward needs one forward FFT (of the gradient) instead of three; the spectra are consumed
    in place so the 2L-long buffers die as soon as possible.
    """

    @staticmethod
    def forward(ctx, u, kk):
        L = u.shape[-1]
        u_f = torch.fft.rfft(u, n=2 * L)                                   # (..., L+1)
        k_f = torch.fft.rfft(kk, n=2 * L)                                  # (..., L+1)
        ctx.save_for_backward(u_f, k_f)
        ctx.shapes = (u.shape, kk.shape)
        return torch.fft.irfft(u_f * k_f, n=2 * L)[..., :L]               # (..., L)

    @staticmethod
    def backward(ctx, grad):
        u_f, k_f = ctx.saved_tensors
        u_shape, k_shape = ctx.shapes
        L = u_shape[-1]
        g = torch.fft.rfft(grad, n=2 * L)                                # (..., L+1)
        gu = gk = None
        if ctx.needs_input_grad[0]:
            spec = g * k_f.conj()                                          # (..., L+1)
            gu = _sum_to(torch.fft.irfft(spec, n=2 * L)[..., :L].contiguous(), u_shape)
            del spec
        if ctx.needs_input_grad[1]:
            spec = g.mul_(u_f.conj())                                      # g is not needed after this
            gk = _sum_to(torch.fft.irfft(spec, n=2 * L)[..., :k_shape[-1]].contiguous(), k_shape)
        return gu, gk


def fftconv(u: torch.Tensor, k: torch.Tensor, k_rev: torch.Tensor | None = None) -> torch.Tensor:
    """Causal convolution `y_l = sum_{m<=l} k_m u_{l-m}` along the last dim, by FFT in float32.

    u: (..., L) real; k: broadcastable to u's leading dims, (..., Lk) with Lk <= L (shorter
    filters are zero-extended). k_rev (same shape as k) is the bidirectional part: it acts on the
    strictly future inputs, `y_l += sum_{m>=0} k_rev_m u_{l+1+m}` (one FFT for both directions).
    """
    L = u.shape[-1]
    if k.shape[-1] > L or (k_rev is not None and k_rev.shape[-1] > L):
        raise ValueError(f"fftconv: filter length {k.shape[-1]} exceeds sequence length {L}")
    with no_autocast(u.device.type):
        u = u.float()
        k = k.float()
        if k_rev is not None:
            k_rev = k_rev.float()
            pad = torch.zeros(k.shape[:-1] + (2 * L - k.shape[-1] - k_rev.shape[-1],),
                              dtype=k.dtype, device=k.device)
            # lag -(m+1) of the circular length-2L convolution sits at index 2L-1-m
            k = torch.cat([k, pad, k_rev.flip(-1)], dim=-1)           # (..., 2L)
        return _FFTConv.apply(u, k)                                    # (..., L)


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
                        *, backend: str = "auto") -> torch.Tensor:
    """Zero-input response `y_k = 2 Re sum_n C_n z_n^(k+1) s_n`, k < L.

    C: (c, H, N2); log_z: (H, N2); state: (B, H, N2) complex. Returns (B, c, H, L) real.
    """
    v = C.unsqueeze(0) * (log_z.exp() * state).unsqueeze(1)            # (B, c, H, N2)
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
                         *, chunk: int = 64) -> torch.Tensor:
    """Zero-input response `y_k = Re C Ab^(k+1) s` for a dense Ab, by chunked powers.

    C: (c, H, N); Ab: (H, N, N); state: (B, H, N). Cost O(H N^2 T + B c H N L + B H N^2 L/T).
    """
    T = min(chunk, L)
    rows = [C]
    for _ in range(T - 1):
        rows.append(torch.einsum("chn,hnm->chm", rows[-1], Ab))
    CK = torch.stack(rows, dim=-2)                                     # (c, H, T, N): C Ab^j
    AT = torch.linalg.matrix_power(Ab, T)                              # (H, N, N)
    s = torch.einsum("hnm,bhm->bhn", Ab, state)                        # (B, H, N): Ab s
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
