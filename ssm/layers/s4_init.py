"""Initial DPLR parameters of an S4 layer (`mode="dplr"`) for every HiPPO measure.

Each measure's transition matrix is written as `A = V (diag(Lambda) - P^T conj(P)) V^*` by
`ssm.hippo.nplr` (V unitary); the layer stores `Lambda`, `P`, `B` in that eigenbasis, one member
of each conjugate pair (docs/s4.md, "NPLR forms per measure").

- "legs": rank 1, `Re(Lambda) = -1/2`.
- "legt": rank 2, at the public S4 time scale: the layer uses `A/2`, `B/2` of the LegT matrix of
  docs/hippo.md (window 1), i.e. LegT with window 2, as the public S4 code does ("for timescale
  correctness"); in NPLR form `Lambda/2`, `P / sqrt(2)`, `B/2` (`LEGT_SCALE`).
- "lagt", "fout": rank 1. Their normal part is skew, `Re(Lambda) = 0`. The layer
  parametrizes `Re(Lambda) = -exp(log_neg_real) < 0`, so the real part is floored at
  `-REAL_FLOOR` (the same floor as the original S4 code): the layer's matrix is
  `A - REAL_FLOOR * I`, a shift that multiplies the filter by `exp(-REAL_FLOOR * dt * l)`.
- "hippo": S4's mixed init, the first `ceil(H/2)` channels LegS and the others FouT (both rank 1).

"lagt" is accepted: its A is one Jordan block (eigenvalue -1/2, multiplicity N), so float32
rounding of the parameters moves its eigenvalues far (to [-3.4, -0.07] at N=64) while the matrix
itself and its impulse response stay within float32 rounding; the layer never diagonalizes A.
"""
from __future__ import annotations

import torch

from ssm import hippo

DPLR_INITS = ("legs", "legt", "lagt", "fout", "hippo")
REAL_FLOOR = 1e-4
LEGT_SCALE = 0.5        # the layer's LegT is the measure's (A, B) times this (public S4 convention)


def measure_nplr(measure: str, N: int):
    """`(Lambda, P, B)` of a measure as the layer uses it (LegT scaled by LEGT_SCALE), complex128."""
    Lam, P, B, _ = hippo.nplr(measure, N)                              # (N2,), (r0, N2), (N2,)
    if measure == "legt":
        Lam, P, B = Lam * LEGT_SCALE, P * LEGT_SCALE ** 0.5, B * LEGT_SCALE
    return Lam, P, B


def channel_measures(init: str, H: int) -> list[str]:
    """The HiPPO measure of each of the H channels for a DPLR init."""
    if init not in DPLR_INITS:
        raise ValueError(f"init must be one of {DPLR_INITS} for mode='dplr', got {init!r}")
    if init == "hippo":
        n_legs = (H + 1) // 2
        return ["legs"] * n_legs + ["fout"] * (H - n_legs)
    return [init] * H


def min_rank(init: str) -> int:
    """Smallest low-rank size the init needs (LegT: 2, the others: 1)."""
    return max(hippo.min_rank(m) for m in set(channel_measures(init, 2)))


def dplr_init(init: str, N: int, H: int, rank: int):
    """`(Lambda (H, N/2), P (rank, H, N/2), B (H, N/2))` complex128 for H channels.

    Rows of P beyond the measure's own rank start small and random (1e-2 scale, shared by the
    channels): at zero their gradient would vanish, the correction being quadratic in P, and
    `-p p^*` only adds damping, so A stays stable.
    """
    need = min_rank(init)
    if rank < need:
        raise ValueError(f"rank must be >= {need} for init={init!r} (its NPLR form has rank {need}), "
                         f"got {rank}")
    N2 = N // 2
    forms = {}
    for m in set(channel_measures(init, H)):
        Lam, P, B = measure_nplr(m, N)                                 # (N2,), (r0, N2), (N2,)
        Lam = torch.complex(Lam.real.clamp(max=-REAL_FLOOR), Lam.imag)
        forms[m] = (Lam, P, B)
    ms = channel_measures(init, H)
    Lam = torch.stack([forms[m][0] for m in ms])                       # (H, N2)
    B = torch.stack([forms[m][2] for m in ms])                     # (H, N2)
    P0 = torch.stack([forms[m][1] for m in ms], dim=1)                 # (need, H, N2)
    extra = torch.randn(rank - need, N2, dtype=torch.complex128) * 1e-2
    P = torch.cat([P0, extra[:, None, :].expand(rank - need, H, N2)])  # (rank, H, N2)
    return Lam, P, B


def nplr_basis(init: str, N: int, H: int) -> torch.Tensor:
    """Full unitary NPLR basis per channel, `V (H, N, N)` complex128 (`[V_half, conj V_half]`)."""
    out = []
    for m in channel_measures(init, H):
        V = hippo.nplr(m, N)[3]                                        # (N, N2)
        out.append(torch.cat([V, V.conj()], dim=1))                    # (N, N)
    return torch.stack(out)


def real_floor_shift(init: str, N: int, H: int) -> torch.Tensor:
    """Per channel, how far the layer's A sits below the measure's A (`A_layer = A - shift I`).

    Returns `(H,)` float64: REAL_FLOOR where the measure's normal part is skew, else 0.
    """
    shift = []
    for m in channel_measures(init, H):
        c = float(measure_nplr(m, N)[0].real.max())                    # Re(Lambda), one value
        shift.append(max(0.0, c + REAL_FLOOR))
    return torch.tensor(shift, dtype=torch.float64)
