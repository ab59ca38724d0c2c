"""The diagonal SSM of S4D: N/2 complex modes per channel (docs/s4.md, docs/discretization.md).

Parameters (protocol: `ssm.layers.ssm_base`): `Re(Lambda) = -exp(log_neg_real)` (stays
negative) and `Im(Lambda)` = `imag` (kind "A"), `B` (kind "B") and `C` (kind "C", (c', H, N/2))
stored as real (..., 2) tensors, `log_dt` (kind "dt"). The init is a diagonal HiPPO init
(`ssm.hippo.diag_init`); for "legs", B is the LegS NPLR eigenbasis B with its imaginary part
clipped to [-b_clip, b_clip] as in the public S4D code. Discretization: ZOH (default) or
bilinear, elementwise. The filter is one Vandermonde product; the state is (B, H, N/2), one
member of each conjugate pair.
"""
from __future__ import annotations

import math

import torch

from ssm import filters, hippo
from ssm.fftconv import diag_next_state, diag_state_response
from ssm.layers.ssm_base import Recurrence, SSMBase


def clip_imag(B: torch.Tensor, b_clip: float | None) -> torch.Tensor:
    """B with its imaginary part clipped to [-b_clip, b_clip] (None: unchanged)."""
    if b_clip is None:
        return B
    return torch.complex(B.real, B.imag.clamp(-b_clip, b_clip))


class DiagSSM(SSMBase):
    """S4D: `x' = diag(z) x + Bb u`, `y = 2 Re(C x')` with N/2 modes per channel."""

    def __init__(self, d_model: int, cfg, n_ssm: int, out_channels: int, device=None):
        super().__init__(d_model, cfg.d_state, n_ssm, cfg, device)
        N2 = cfg.d_state // 2
        self.state_size = N2
        self.discretization = cfg.discretization or filters.DIAG_METHODS[0]
        Lam = hippo.diag_init(cfg.init, cfg.d_state)                  # (N2,)
        if cfg.init == "legs":
            B = clip_imag(hippo.nplr("legs", cfg.d_state)[2], cfg.b_clip)
        else:
            B = torch.ones(N2, dtype=torch.complex128)
        self.add_param("log_neg_real", "A", torch.log(-Lam.real).expand(n_ssm, N2), device)
        self.add_param("imag", "A", Lam.imag.expand(n_ssm, N2), device)
        self.add_param("B", "B", torch.view_as_real(B.expand(n_ssm, N2)), device)
        # C ~ complex normal with unit variance
        self.add_param("C", "C", torch.randn(out_channels, d_model, N2, 2, device=device) * math.sqrt(0.5), device)

    def discrete(self, rate: float = 1.0):
        """(C (c', H, N2), log_z (H, N2), Bb (H, N2)) complex, log_z = log of the pole."""
        Lam = self.per_channel(torch.complex(-torch.exp(self.log_neg_real.to(self.real_dtype)),
                                             self.imag.to(self.real_dtype)))
        B = self.per_channel(self.complex_param("B"))
        log_z, Bb = filters.diag_discretize(Lam, B, self.dt(rate), self.discretization)
        return self.complex_param("C"), log_z, Bb

    def filter(self, L: int, rate: float = 1.0) -> torch.Tensor:
        C, log_z, Bb = self.discrete(rate)
        return filters.diag_filter(C, log_z, Bb, L, backend=self.backend)   # (c', H, L)

    costly_recurrence = False                     # the step system is a few elementwise ops

    def recurrence(self, rate: float = 1.0, *, dense: bool = False) -> Recurrence:
        if dense:
            raise ValueError("setup_step(dense=True) needs mode='dplr': a diagonal SSM has no dense form")
        C, log_z, Bb = self.discrete(rate)
        return Recurrence("diag", torch.exp(log_z), Bb, C)

    def state_system(self, rate: float = 1.0):
        """(C (c', H, N2), log_z (H, N2), Bb (H, N2)): what `state_response` and `next_state` use."""
        return self.discrete(rate)

    def state_response(self, state: torch.Tensor, L: int, rate: float = 1.0, *, system=None,
                       first_power: int = 1) -> torch.Tensor:
        """Zero-input response of `state` over L steps: (B, c', H, L) real (`ssm.fftconv`);
        `first_power=0` starts one step earlier (`y_k = 2 Re C z^k s`)."""
        C, log_z, _ = self.discrete(rate) if system is None else system
        return diag_state_response(C, log_z, state.to(C.dtype), L, backend=self.backend, first_power=first_power)

    def next_state(self, u: torch.Tensor, state: torch.Tensor, rate: float = 1.0,
                   lengths: torch.Tensor | None = None, *, system=None) -> torch.Tensor:
        """State after the last (real) step of u (B, H, L), padding zeroed: (B, H, N2) (`ssm.fftconv`)."""
        _, log_z, Bb = self.discrete(rate) if system is None else system
        return diag_next_state(u, log_z, Bb, state.to(log_z.dtype), lengths)
