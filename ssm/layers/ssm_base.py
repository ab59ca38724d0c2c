"""The protocol every S4-style SSM parameterization follows, and the parts they share.

A parameterization (`DiagSSM` in `ssm.layers.ssm_diag`, `DPLRSSM` in `ssm.layers.ssm_dplr`) owns
its parameters and answers five questions for the layer around it (`ssm.layers.s4.S4`), which
does the projection, the convolution and the streaming and never asks which kind it holds:

- `filter(L, rate)`: the convolution filter K (c', H, L) at step size `dt * rate`;
- `recurrence(rate)`: a public description of the one-step system (`Recurrence`), used by
  `step` and by `ssm.export`;
- `state_size`, `default_state(batch)`: the recurrent state, (B, H, state_size) complex;
- `state_response(state, L, rate)`: what an initial state adds to the outputs of L steps;
- `next_state(u, state, rate, lengths)`: the state after a chunk of inputs;
- `state_system(rate)`: the tensors the two above need, `(C (c', H, n), transition, Bb)`, built
  once and passed back as `system=` when they are called many times in one forward (packed
  documents: one call per document boundary, `ssm.fftconv.cross_document_response`); slicing
  its C selects output channels.

Parameters are tagged by kind in `param_kinds` (name -> "A", "B", "C", "dt", "P"); the tags live
on the module, so they survive `copy.deepcopy` and `load_state_dict(..., assign=True)`, and
`ssm.param_groups` maps kinds to learning rates and weight decay.

Precision: the SSM computes in float32 / complex64 unless its parameters were cast to float64
(`layer.double()`), which computes everything in float64 / complex128 (for `gradcheck`).
Half-precision casts leave the SSM parameters in float32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from ssm.discretize import dt_from_param, dt_param_init


class Recurrence(NamedTuple):
    """One step `x' = Ab x + Bb u`, `y = Re(C x')` (diag: `y = 2 Re(C x')` over N/2 pairs).

    kind: "diag" (Ab = diag(z)), "dplr" (Ab = diag(z) - E^T F, rank r) or "dense" (Ab an N x N matrix).
    z: (H, n) for diag/dplr, Ab (H, n, n) for dense; Bb (H, n); C (c', H, n);
    E, F: (H, r, n) for dplr, else None.
    """

    kind: str
    z: torch.Tensor
    Bb: torch.Tensor
    C: torch.Tensor
    E: torch.Tensor | None = None
    F: torch.Tensor | None = None

    def step(self, state: torch.Tensor, u: torch.Tensor):
        """state (B, H, n) complex, u (B, H) real -> (y (B, c', H) real, next state)."""
        u = u[..., None].to(state.dtype)                               # (B, H, 1)
        if self.kind == "diag":
            state = self.z * state + self.Bb * u                       # (B, H, n)
            return 2 * torch.einsum("chn,bhn->bch", self.C, state).real, state
        if self.kind == "dplr":
            Fx = (self.F * state.unsqueeze(2)).sum(-1)                 # (B, H, r)
            corr = Fx[..., 0, None] * self.E[:, 0]                     # (B, H, n)
            for k in range(1, self.E.shape[1]):
                corr = corr + Fx[..., k, None] * self.E[:, k]
            state = self.z * state - corr + self.Bb * u                # (B, H, n)
        else:
            state = torch.einsum("hnm,bhm->bhn", self.z, state) + self.Bb * u   # (B, H, n)
        return torch.einsum("chn,bhn->bch", self.C, state).real, state

    def detach(self) -> "Recurrence":
        return Recurrence(self.kind, *(None if t is None else t.detach() for t in self[1:]))


def check_rate(rate) -> float:
    """`rate` (dt multiplier) as a float; ValueError unless it is a finite number > 0."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a finite number > 0 (dt is multiplied by it), got {rate!r}")
    return float(rate)


class SSMBase(nn.Module):
    """Shared parameter handling: `n_ssm` copies of (A, B, P) tiled over H channels, dt per channel."""

    param_kinds: dict[str, str]
    state_size: int

    def __init__(self, d_model: int, d_state: int, n_ssm: int, cfg, device=None):
        super().__init__()
        self.d_model, self.d_state, self.n_ssm = d_model, d_state, n_ssm
        self.dt_transform = cfg.dt_transform
        self.backend = cfg.backend
        self.param_kinds = {}
        self.add_param("log_dt", "dt", dt_param_init(d_model, cfg.dt_min, cfg.dt_max, cfg.dt_transform), device)

    def add_param(self, name: str, kind: str, t: torch.Tensor, device=None) -> None:
        """Register `t` as float32 parameter `name` of the given kind ("A", "B", "C", "dt", "P")."""
        self.register_parameter(name, nn.Parameter(t.to(device=device, dtype=torch.float32).contiguous().clone()))
        self.param_kinds[name] = kind

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(bfloat16)` must not round the SSM: keep its parameters float32
        super()._apply(fn, recurse)
        for p in self.parameters(recurse=False):
            if p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    @property
    def real_dtype(self) -> torch.dtype:
        return torch.float64 if self.log_dt.dtype == torch.float64 else torch.float32

    @property
    def complex_dtype(self) -> torch.dtype:
        return torch.complex128 if self.real_dtype == torch.float64 else torch.complex64

    def complex_param(self, name: str) -> torch.Tensor:
        """A stored (..., 2) real parameter as complex, in the compute precision."""
        return torch.view_as_complex(getattr(self, name).to(self.real_dtype))

    def per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n_ssm, N2) -> (..., H, N2): channel h takes copy h % n_ssm."""
        reps = self.d_model // t.shape[-2]
        return t if reps == 1 else t.repeat(*([1] * (t.dim() - 2)), reps, 1)

    def dt(self, rate: float = 1.0) -> torch.Tensor:
        """Step sizes (H,) in the compute precision, times `rate`."""
        return dt_from_param(self.log_dt.to(self.real_dtype), self.dt_transform) * rate

    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        device = self.log_dt.device if device is None else device
        return torch.zeros(batch_size, self.d_model, self.state_size, dtype=self.complex_dtype, device=device)
