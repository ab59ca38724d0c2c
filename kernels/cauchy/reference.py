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
"""
from __future__ import annotations

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
