"""Cauchy product in plain PyTorch: the ground truth and the chunked path (`backend="torch"`).

The math: `docs/operators.md`, sections "Cauchy operator" and "Chunked references".

    out[..., j] = sum_n v[..., n] / (z[j] - w[..., n])   (+ conj(v) / (z[j] - conj(w)) if symmetric)

- `cauchy_ref`: the readable formula. It materializes (..., N, M); use it with complex128 inputs
  as ground truth and at small sizes only.
- `cauchy_chunked_fwd` / `cauchy_chunked_bwd`: the chunked path on canonical shapes, without
  autograd (the custom op in `op.py` adds it). Several numerators share one set of poles (S4's
  DPLR filter, see "Woodbury at the roots of unity"): v (R, H, N), w (H, N) -> (R, H, M). Per tile
  of rows x evaluation points it forms the reciprocals 1/(z - w) once and contracts them with all
  R numerators in one batched matmul, so memory is O(R*H*M + tile) in forward and backward; the
  backward recomputes the reciprocals instead of saving them. The symmetric form is the same sum
  over the 2N poles [w, conj(w)] with numerators [v, conj(v)].

Gradients follow PyTorch's convention for holomorphic maps (grad_x = conj(df/dx) * grad_out):
    grad_v = sum_j g conj(c),   grad_w = sum_j g conj(v c^2),   grad_z = -sum_{rows, n} g conj(v c^2),
with c = 1/(z - w). Conjugates are taken with `torch.conj_physical`: lazy conj views lost their
conj bit inside a custom op traced by torch.compile (aot_eager, torch 2.13). No Triton import here.

Purely imaginary points (S4's bilinear frequencies z = i s), symmetric form, complex64 on the CPU:
`pair_block_fwd` / `pair_block_bwd` sum each conjugate pair of poles as one real-coefficient term,

    v/(z - w) + conj(v)/(z - conj(w)) = (alpha z + beta) q,   q = 1/((z - w)(z - conj(w))),
    alpha = 2 Re v,   beta = -2 Re(v conj(w)),   (z - w)(z - conj(w)) = a^2 - (s - b)(s + b) - 2i a s

(w = a + ib; the product form keeps Re D accurate near s = b), so one reciprocal serves both poles
and the numerators are real. Gradients (PyTorch's convention) with X = sum_j conj(g) z q,
Y = sum_j conj(g) q, U_k = sum_j conj(g) z^k q^2: grad_v = 2 Re X - 2 w Re Y and
grad_w = sum_R conj(v) (2 Re U_2 - 4 w Re U_1 + 2 w^2 Re U_0). For z on the imaginary axis every
term is bounded by the plain formula's terms times a small constant (|z - w| + |z - conj w| >= |z| and
>= |w| - |Re w|), so the error stays that of the plain formula. Each function is one block of rows
written as broadcasts and sums; `torch.compile` (inductor's C++ backend) turns it into one loop
that never materializes (rows, N, M). Without a working compiler the tiled path above is used.
"""
from __future__ import annotations

import os
import warnings

import torch

# Tile sizes, read at call time (tests lower MAX_POINTS to make ragged tiles). Reciprocal tile
# size in complex elements: a tile (rows, poles, points) of about 2 MiB in complex64 stays in
# cache, which made the CPU path 3-4x faster than whole-row chunks. MAX_POINTS: evaluation
# points per tile.
TILE_ELEMENTS = 1 << 18
MAX_POINTS = 512


def cauchy_ref(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """The readable formula; materializes (..., N, M). v: (..., N), z: (M,), w broadcastable to v."""
    r = v.unsqueeze(-1) / (z - w.unsqueeze(-1))                             # (..., N, M)
    if symmetric:
        r = r + v.conj().unsqueeze(-1) / (z - w.conj().unsqueeze(-1))       # (..., N, M)
    return r.sum(dim=-2)                                                    # (..., M)


def _poles(v: torch.Tensor, w: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major numerators (H, R, P) and poles (H, P); P = 2N with the conjugate poles appended."""
    vh = v.permute(1, 0, 2)                                                 # (H, R, N)
    if symmetric:
        vh = torch.cat([vh, torch.conj_physical(vh)], dim=-1)               # (H, R, 2N)
        w = torch.cat([w, torch.conj_physical(w)], dim=-1)                  # (H, 2N)
    return vh.contiguous(), w.contiguous()


def _tiles(H: int, P: int, M: int) -> tuple[int, int]:
    points = min(M, MAX_POINTS)
    rows = max(1, TILE_ELEMENTS // max(1, P * points))
    return min(H, rows), max(1, points)


def cauchy_chunked_fwd(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """v (R, H, N), z (M,), w (H, N) -> (R, H, M), tile by tile, without autograd."""
    if use_pair_path(v, z, w, symmetric):
        out = cauchy_pairs_fwd(v, z, w)
        if out is not None:
            return out
    R, H, _ = v.shape
    M = z.shape[0]
    vh, wp = _poles(v, w, symmetric)                                        # (H, R, P), (H, P)
    P = wp.shape[-1]
    out = torch.empty(R, H, M, dtype=v.dtype, device=v.device)              # (R, H, M)
    out_h = out.permute(1, 0, 2)                                            # (H, R, M) view
    hb, mb = _tiles(H, P, M)
    wcol = wp.unsqueeze(-1)                                                 # (H, P, 1)
    # One reused tile buffer: fresh multi-MiB allocations cost a page fault per page.
    buf = torch.empty(hb, P, mb, dtype=v.dtype, device=v.device)            # (hb, P, mb)
    for h0 in range(0, H, hb):
        h1 = min(H, h0 + hb)
        for m0 in range(0, M, mb):
            m1 = min(M, m0 + mb)
            c = buf[:h1 - h0, :, :m1 - m0]                                  # (hb, P, mb)
            torch.sub(z[m0:m1], wcol[h0:h1], out=c).reciprocal_()
            out_h[h0:h1, :, m0:m1] = torch.bmm(vh[h0:h1], c)                # (hb, R, mb)
    return out


def cauchy_chunked_bwd(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                       symmetric: bool = False, need_z: bool = True
                       ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(grad_v (R, H, N), grad_z (M,) or None, grad_w (H, N)) for grad (R, H, M), tile by tile."""
    if not need_z and use_pair_path(v, z, w, symmetric):
        res = cauchy_pairs_bwd(grad, v, z, w)
        if res is not None:
            return res[0], None, res[1]
    R, H, N = v.shape
    M = z.shape[0]
    vh, wp = _poles(v, w, symmetric)                                        # (H, R, P), (H, P)
    P = wp.shape[-1]
    gh = torch.conj_physical(grad.permute(1, 0, 2)).contiguous()            # (H, R, M): conj(g)
    # conj(grad_v) = sum_j conj(g) c and conj(T) = sum_j conj(g) c^2, both from one matmul
    # against the stacked tile [c, c^2]; conjugating small results beats conjugating tiles.
    acc = torch.zeros(H, R, 2 * P, dtype=v.dtype, device=v.device)          # (H, R, 2P)
    gz = torch.zeros(M, dtype=v.dtype, device=v.device) if need_z else None  # (M,)
    hb, mb = _tiles(H, P, M)
    wcol = wp.unsqueeze(-1)                                                 # (H, P, 1)
    buf = torch.empty(hb, 2 * P, mb, dtype=v.dtype, device=v.device)        # (hb, 2P, mb)
    for h0 in range(0, H, hb):
        h1 = min(H, h0 + hb)
        for m0 in range(0, M, mb):
            m1 = min(M, m0 + mb)
            cc = buf[:h1 - h0, :, :m1 - m0]                                 # (hb, 2P, mb)
            c, c2 = cc[:, :P], cc[:, P:]                                    # (hb, P, mb) views
            torch.sub(z[m0:m1], wcol[h0:h1], out=c)
            c.reciprocal_()
            torch.mul(c, c, out=c2)
            g = gh[h0:h1, :, m0:m1]                                         # (hb, R, mb)
            acc[h0:h1].baddbmm_(g, cc.transpose(1, 2))                      # (hb, R, 2P)
            if need_z:
                # conj(grad_z) = -sum_{h, p} c^2 * sum_r conj(g) v
                u = torch.bmm(vh[h0:h1].transpose(1, 2), g)                 # (hb, P, mb)
                gz[m0:m1] -= (u * c2).sum(dim=(0, 1))                       # (mb,)
    acc = torch.conj_physical(acc)                                          # (H, R, 2P)
    gv_h = acc[..., :P]                                                     # (H, R, P)
    gw = (torch.conj_physical(vh) * acc[..., P:]).sum(dim=1)                # (H, P)
    if symmetric:
        # The conjugate half enters through conj(v), conj(w): its gradient is conjugated back.
        gv_h = gv_h[..., :N] + torch.conj_physical(gv_h[..., N:])           # (H, R, N)
        gw = gw[..., :N] + torch.conj_physical(gw[..., N:])                 # (H, N)
    gv = gv_h.permute(1, 0, 2).contiguous()                                 # (R, H, N)
    return gv, (torch.conj_physical(gz) if need_z else None), gw.contiguous()


# ---- purely imaginary points: conjugate pairs in real arithmetic, compiled on the CPU ------------

# The compiled pair path runs for CPU complex64 symmetric products at z = i s with at least
# PAIR_MIN_WORK = H * N * M terms (smaller ones are not worth a compilation); SSMKIT_CPU_COMPILE=0
# turns it off. PAIR_ROWS: channels per compiled call (the eager fallback inside a traced graph
# then stays at ~10 temporaries of PAIR_ROWS * N * M floats). Numerators go in groups of four.
# PAIR_POINTS: points per backward call (longer sums make inductor switch to a slower cascade sum).
PAIR_MIN_WORK = 1 << 21
PAIR_ROWS = 16
PAIR_POINTS = 4096
_GROUP = 4
_compiled: dict = {}


def pair_block_fwd(al: torch.Tensor, be: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   s: torch.Tensor) -> torch.Tensor:
    """al, be (G, h, N, 1) = 2 Re v, -2 Re(v conj w); a, b (h, N, 1) = Re w, Im w; s (M,) -> (G, h, M, 2)."""
    x = a * a - (s - b) * (s + b)                                          # (h, N, M): Re D
    y = 2 * a * s                                                          # (h, N, M): -Im D
    t = 1 / (x * x + y * y)                                                # (h, N, M): 1/|D|^2
    qr, qi = x * t, y * t                                                  # (h, N, M): q = 1/D
    rows = []
    for r in range(al.shape[0]):
        ar, ai = (al[r] * qr).sum(-2), (al[r] * qi).sum(-2)                # (h, M): sum alpha q
        br, bi = (be[r] * qr).sum(-2), (be[r] * qi).sum(-2)                # (h, M): sum beta q
        rows.append(torch.stack([br - s * ai, bi + s * ar], dim=-1))       # (h, M, 2): (alpha z + beta) q
    return torch.stack(rows)                                               # (G, h, M, 2)


def pair_block_bwd(gr: torch.Tensor, gi: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                   s: torch.Tensor) -> torch.Tensor:
    """gr, gi (G, h, 1, M) = Re g, Im g; a, b (h, N, 1); s (M,) -> (5, G, h, N): Re Y, Re X, Re U_0..2."""
    x = a * a - (s - b) * (s + b)                                          # (h, N, M)
    y = 2 * a * s
    t = 1 / (x * x + y * y)
    qr, qi = x * t, y * t                                                  # (h, N, M): q
    pr, pi = qr * qr - qi * qi, 2 * qr * qi                                # (h, N, M): q^2
    out = []
    for r in range(gr.shape[0]):
        g0, g1 = gr[r], gi[r]                                              # (h, 1, M)
        sg0, sg1 = s * g0, s * g1                                          # (h, 1, M): conj(g) z = sg1 + i sg0
        out.append(torch.stack([
            (g0 * qr + g1 * qi).sum(-1),                                   # Re Y
            (sg1 * qr - sg0 * qi).sum(-1),                                 # Re X
            (g0 * pr + g1 * pi).sum(-1),                                   # Re U_0
            (sg1 * pr - sg0 * pi).sum(-1),                                 # Re U_1
            -(s * sg0 * pr + s * sg1 * pi).sum(-1),                        # Re U_2
        ]))                                                                # (5, h, N)
    return torch.stack(out, dim=1)                                         # (5, G, h, N)


def _kernel(fn):
    """`fn` compiled by inductor (C++ on the CPU), once per process; None when compiling failed."""
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, fullgraph=True)
    return _compiled[fn.__name__]


def _run_compiled(fn, *args):
    """The compiled block, or None (and the pair path off for this process) if it cannot compile."""
    global _PAIR_BROKEN
    try:
        with torch.no_grad():
            return _kernel(fn)(*args)
    except Exception as e:  # no C++ compiler, unsupported platform: keep the tiled path
        _PAIR_BROKEN = True
        warnings.warn(f"cauchy_mult: compiling the CPU pair kernel failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); using the tiled PyTorch path", RuntimeWarning, stacklevel=3)
        return None


_PAIR_BROKEN = False


def use_pair_path(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool) -> bool:
    """True when the compiled pair path applies: CPU, complex64, symmetric, large, z purely imaginary."""
    if (not symmetric or _PAIR_BROKEN or v.device.type != "cpu" or v.dtype != torch.complex64
            or os.environ.get("SSMKIT_CPU_COMPILE", "1") == "0"):
        return False
    H, N = w.shape
    if H * N * z.shape[0] < PAIR_MIN_WORK:
        return False
    return not bool(torch.any(z.real != 0))


def _pair_inputs(v: torch.Tensor, w: torch.Tensor, z: torch.Tensor):
    """(2 Re v, -2 Re(v conj w)) as (R', H, N, 1) with R padded to a multiple of four; a, b (H, N, 1); s (M,)."""
    R = v.shape[0]
    pad = -R % _GROUP
    al = torch.nn.functional.pad(2 * v.real, (0, 0, 0, 0, 0, pad))        # (R', H, N)
    be = torch.nn.functional.pad(-2 * (v * w.conj()).real, (0, 0, 0, 0, 0, pad))
    return (al.unsqueeze(-1), be.unsqueeze(-1), w.real.unsqueeze(-1).contiguous(),
            w.imag.unsqueeze(-1).contiguous(), z.imag.contiguous())


def cauchy_pairs_fwd(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """Symmetric product at purely imaginary z by the compiled pair blocks: (R, H, M), or None."""
    R, H, _ = v.shape
    al, be, a, b, s = _pair_inputs(v, w, z)
    out = torch.empty(R, H, z.shape[0], dtype=v.dtype, device=v.device)   # (R, H, M)
    ov = torch.view_as_real(out)                                           # (R, H, M, 2)
    for h0 in range(0, H, PAIR_ROWS):
        hs = slice(h0, min(H, h0 + PAIR_ROWS))
        for r0 in range(0, R, _GROUP):
            rs = slice(r0, r0 + _GROUP)
            blk = _run_compiled(pair_block_fwd, al[rs, hs], be[rs, hs], a[hs], b[hs], s)
            if blk is None:
                return None
            ov[rs, hs] = blk[:min(R, r0 + _GROUP) - r0]                  # (g, h, M, 2)
    return out


def cauchy_pairs_bwd(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor, w: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(grad_v (R, H, N), grad_w (H, N)) of the symmetric product at purely imaginary z, or None."""
    R, H, N = v.shape
    g = torch.view_as_real(grad)                                           # (R, H, M, 2)
    _, _, a, b, s = _pair_inputs(v[:1], w, z)
    sums = torch.empty(5, R, H, N, dtype=v.real.dtype, device=v.device)   # (5, R, H, N)
    M = s.shape[0]
    step = -(-M // -(-M // PAIR_POINTS))                                   # balanced point blocks
    for h0 in range(0, H, PAIR_ROWS):
        hs = slice(h0, min(H, h0 + PAIR_ROWS))
        for r0 in range(0, R, _GROUP):
            r1 = min(R, r0 + _GROUP)
            gb = torch.nn.functional.pad(g[r0:r1, hs], (0, 0, 0, 0, 0, 0, 0, r0 + _GROUP - r1))   # (4, h, M, 2)
            for m0 in range(0, M, step):
                ms = slice(m0, min(M, m0 + step))
                gr, gi = (gb[:, :, ms, k].unsqueeze(-2).contiguous() for k in (0, 1))   # (4, h, 1, m)
                blk = _run_compiled(pair_block_bwd, gr, gi, a[hs], b[hs], s[ms])
                if blk is None:
                    return None
                if m0 == 0:
                    sums[:, r0:r1, hs] = blk[:, :r1 - r0]                  # (5, g, h, N)
                else:
                    sums[:, r0:r1, hs] += blk[:, :r1 - r0]
    re_y, re_x, u0, u1, u2 = sums                                          # (R, H, N) each
    gv = 2 * re_x - 2 * w * re_y                                           # (R, H, N)
    gw = (v.conj() * (2 * u2 - 4 * w * u1 + 2 * (w * w) * u0)).sum(0)     # (H, N)
    return gv, gw
