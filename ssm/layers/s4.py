"""The S4 / S4D layer: a drop-in sequence layer with convolution, recurrent and streaming modes.

SPEC sections 1-3. `mode="diag"` is S4D: N/2 complex modes per channel from a diagonal init
(`ssm.hippo.diag_init`), ZOH or bilinear, filter by a Vandermonde product. `mode="dplr"` is S4:
the LegS NPLR form `A = Lambda - P P^*` (rank r Woodbury), bilinear, filter by Cauchy products, with
the learned `Ct = C (I - Ab^l_max)` of S4. Both run as a recurrence (`step`) and in chunks with
state passing (`forward(x, state)`), and both evaluate their filter at any length and step size.

Parametrization: `Re(Lambda) = -exp(log_neg_real)` (stays negative), `Im(Lambda)` free, complex
B, C, P stored as real (..., 2) float32 tensors (optimizers and `torch.compile` see real params).
SSM parameters (A = log_neg_real/imag, B, P, log_dt) carry `_optim = {"lr": ssm_lr,
"weight_decay": 0.0}` for `ssm.layers.params.param_groups`. The SSM part (filter, FFT conv, D skip,
state) always runs in float32/complex64 with autocast off; only the output projection follows
autocast. Output: activation -> dropout -> Linear(channels*H, 2H) -> GLU.

Lengths other than `l_max` (S4 only): `Ct` belongs to `l_max` and the training step size. For
another length L or rate, C is recovered by `C = Ct (I - Ab^l_max)^-1` and `Ct_L = C (I - Ab'^L)`
is used (dense O(H N^3) in complex128, independent of L). If `l_max` is not given it is fixed by
the first forward call.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssm import filters, hippo
from ssm.discretize import log_dt_init
from ssm.fftconv import (dense_next_state, dense_state_response, diag_next_state,
                         diag_state_response, fftconv, no_autocast)
from ssm.layers.nn import activation as make_activation
from ssm.layers.nn import check_lengths, length_mask

MODES = ("diag", "dplr")
DPLR_INITS = ("legs",)


def _check_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


class S4(nn.Module):
    """S4 (mode="dplr") or S4D (mode="diag") layer on (B, L, d_model) sequences."""

    def __init__(self, d_model: int, d_state: int = 64, *, mode: str = "diag", init: str = "legs",
                 rank: int = 1, bidirectional: bool = False, channels: int = 1, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, discretization: str | None = None, activation: str = "gelu",
                 dropout: float = 0.0, ssm_lr: float = 1e-3, l_max: int | None = None,
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("channels", channels)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_int("d_state", d_state, 2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (N/2 complex conjugate pairs), got d_state={d_state}")
        inits = hippo.DIAG_INITS if mode == "diag" else DPLR_INITS
        if init not in inits:
            raise ValueError(f"init must be one of {inits} for mode={mode!r}, got {init!r}")
        allowed = filters.DIAG_METHODS if mode == "diag" else ("bilinear",)
        discretization = allowed[0] if discretization is None else discretization
        if discretization not in allowed:
            raise ValueError(f"discretization must be one of {allowed} for mode={mode!r}, got {discretization!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if l_max is not None:
            _check_int("l_max", l_max)
        self.d_model, self.d_state, self.mode, self.rank = d_model, d_state, mode, rank
        self.channels, self.bidirectional = channels, bidirectional
        self.discretization, self.l_max, self.backend, self.rate = discretization, l_max, backend, 1.0
        H, N2 = d_model, d_state // 2
        f32 = dict(device=device, dtype=torch.float32)

        if mode == "diag":
            Lam = hippo.diag_init(init, d_state)                       # (N2,)
            B = hippo.nplr("legs", d_state)[2] if init == "legs" else torch.ones(N2, dtype=torch.complex128)
        else:
            _check_int("rank", rank)
            Lam, P, B, _ = hippo.nplr(init, d_state)                   # (N2,), (r0, N2), (N2,)
            if rank < P.shape[0]:
                raise ValueError(f"rank must be >= {P.shape[0]} for init={init!r}, got {rank}")
            # extra low-rank rows start small but non-zero (at zero their gradient vanishes, the
            # correction being quadratic in P); -p p^* only adds damping, so A stays stable
            extra = torch.randn(rank - P.shape[0], N2, dtype=torch.complex128) * 1e-2
            P = torch.cat([P, extra])                                  # (r, N2)
            self.P = self._ssm_param(torch.view_as_real(P.expand(H, rank, N2).transpose(0, 1)), f32, ssm_lr)
        self.log_neg_real = self._ssm_param(torch.log(-Lam.real).expand(H, N2), f32, ssm_lr)
        self.imag = self._ssm_param(Lam.imag.expand(H, N2), f32, ssm_lr)
        self.B = self._ssm_param(torch.view_as_real(B.expand(H, N2)), f32, ssm_lr)
        self.log_dt = self._ssm_param(log_dt_init(H, dt_min, dt_max), f32, ssm_lr)
        c_total = channels * (2 if bidirectional else 1)
        # C (S4: the learned Ct) ~ complex normal with unit variance
        self.C = nn.Parameter(torch.randn(c_total, H, N2, 2, **f32) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(channels, H, **f32))
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(channels * H, 2 * H, device=device, dtype=dtype)
        self._step_cache = None

    @staticmethod
    def _ssm_param(t: torch.Tensor, f32: dict, lr: float) -> nn.Parameter:
        p = nn.Parameter(t.to(**f32).contiguous().clone())
        p._optim = {"lr": lr, "weight_decay": 0.0}
        return p

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(bfloat16)` on a model must not round the SSM: keep those params float32
        super()._apply(fn, recurse)
        for name in ("log_neg_real", "imag", "B", "C", "P", "D", "log_dt"):
            p = getattr(self, name, None)
            if p is not None and p.dtype in (torch.float16, torch.bfloat16):
                p.data = p.data.float()
        return self

    # ---- parameters as complex tensors ---------------------------------------------------------
    def _params(self):
        """(Lambda (H, N2), B (H, N2), C (c', H, N2), P (r, H, N2) or None, dt (H,)), float32/complex64."""
        Lam = torch.complex(-torch.exp(self.log_neg_real.float()), self.imag.float())
        B = torch.view_as_complex(self.B.float())
        C = torch.view_as_complex(self.C.float())
        P = torch.view_as_complex(self.P.float()) if self.mode == "dplr" else None
        return Lam, B, C, P, torch.exp(self.log_dt.float())

    def _fix_l_max(self, L: int) -> int:
        if self.l_max is None:
            self.l_max = L
        return self.l_max

    def _ct(self, Lam, P, B, C, dt, L: int, rate: float) -> torch.Tensor:
        """The S4 Ct for length L at step size dt*rate (see module docstring)."""
        l_max = self._fix_l_max(L)
        if L == l_max and rate == 1.0:
            return C
        Ab0, _ = filters.dplr_dense(Lam, P, B, dt)
        Cf = filters.ct_to_c(filters.full_c(C), Ab0, l_max)            # (c', H, N)
        Ab1, _ = filters.dplr_dense(Lam, P, B, dt * rate)
        return filters.c_to_ct(Cf, Ab1, L)[..., : C.shape[-1]].to(C.dtype)   # (c', H, N2)

    def filter(self, L: int, *, rate: float = 1.0) -> torch.Tensor:
        """Convolution filter K (c', H, L) real, c' = channels (x2 if bidirectional), step dt*rate."""
        _check_int("L", L)
        with no_autocast(self.log_dt.device.type):
            Lam, B, C, P, dt = self._params()
            if self.mode == "diag":
                log_z, Bb = filters.diag_discretize(Lam, B, dt * rate, self.discretization)
                return filters.diag_filter(C, log_z, Bb, L, backend=self.backend)
            Ct = self._ct(Lam, P, B, C, dt, L, rate)
            return filters.dplr_filter(Lam, P, B, Ct, dt * rate, L, backend=self.backend)

    # ---- convolution mode ----------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor, rank: int) -> None:
        want = "(B, L, %d)" % self.d_model if rank == 3 else "(B, %d)" % self.d_model
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {want}, got {got}")

    def _check_state(self, state: torch.Tensor, batch: int) -> None:
        if self.bidirectional:
            raise ValueError("a bidirectional S4 has no recurrent state (no step, no state passing)")
        n = self.d_state // 2 if self.mode == "diag" else self.d_state
        want = (batch, self.d_model, n)
        if not isinstance(state, torch.Tensor) or tuple(state.shape) != want or not state.is_complex():
            got = tuple(state.shape) if isinstance(state, torch.Tensor) else type(state).__name__
            raise ValueError(f"state must be a complex tensor of shape {want} (see default_state), got {got}")

    # Keep the input spectrum for the backward (True: fastest) or recompute it there (False: one
    # more FFT per call, 2 x B*H*L*4 bytes less kept between forward and backward).
    save_spectrum = True

    def forward(self, x: torch.Tensor, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, *, rate: float | None = None):
        """x (B, L, H) -> (y (B, L, H), next_state). next_state is None unless `state` is given.

        With `lengths` (right padding) the padded inputs are zeroed first and next_state is the
        state after each row's last real position. `rate` scales dt (default `self.rate`).
        """
        self._check_x(x, 3)
        Bsz, L, H = x.shape
        lengths = check_lengths(lengths, Bsz, L)
        rate = self.rate if rate is None else rate
        if state is not None:
            self._check_state(state, Bsz)
        c = self.channels
        next_state = None
        with no_autocast(x.device.type):
            u = x.transpose(1, 2).float()                              # (B, H, L)
            if lengths is not None:
                u = u * length_mask(lengths, L)[:, None, :]
            Lam, B, C, P, dt = self._params()
            if self.mode == "diag":
                log_z, Bb = filters.diag_discretize(Lam, B, dt * rate, self.discretization)
                K = filters.diag_filter(C, log_z, Bb, L, backend=self.backend)   # (c', H, L)
            else:
                K = filters.dplr_filter(Lam, P, B, self._ct(Lam, P, B, C, dt, L, rate), dt * rate, L,
                                        backend=self.backend)
            k, k_rev = (K[:c], K[c:]) if self.bidirectional else (K, None)   # no slice: no slice backward
            # the D skip rides in the same FFT (lag 0 of the filter)
            y = fftconv(u.unsqueeze(1), k, k_rev, self.D, save_spectrum=self.save_spectrum)  # (B, c, H, L)
            if state is not None and self.mode == "diag":
                y = y + diag_state_response(C, log_z, state.to(C.dtype), L, backend=self.backend)
                next_state = diag_next_state(u, log_z, Bb, state.to(C.dtype), lengths)
            elif state is not None:
                Ab, Bbf = filters.dplr_dense(Lam, P, B, dt * rate)
                Cf = self._full_c(Lam, P, B, C, dt)
                s128 = state.to(torch.complex128)
                y = y + dense_state_response(Cf, Ab, s128, L).to(y.dtype)
                next_state = dense_next_state(u.double(), Ab, Bbf, s128, lengths).to(state.dtype)
        return self._project(y), next_state

    def _project(self, y: torch.Tensor) -> torch.Tensor:
        """Activation, dropout and output Linear + GLU of the (B, c, H, L) SSM output -> (B, L, H).

        The Linear reads the channel-major activations through a transposed view (BLAS takes the
        transpose, no copy for B = 1), so no (B, L, c*H) copy of y is made.
        """
        Bsz, c, H, L = y.shape
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(self.out.weight.dtype)                            # model cast to bf16/fp16/fp64
        a = self.dropout(self.act(y))                                  # (B, c, H, L)
        z = self.out(a.reshape(Bsz, c * H, L).transpose(1, 2))         # (B, L, 2H)
        return nn.functional.glu(z, dim=-1)                            # (B, L, H)

    def _output(self, y: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(self.out.weight.dtype)                            # model cast to bf16/fp16/fp64
        y = self.dropout(self.act(y))                                  # (..., c*H)
        return nn.functional.glu(self.out(y), dim=-1)                  # (..., H)

    def _full_c(self, Lam, P, B, C, dt) -> torch.Tensor:
        """The recurrent C (c', H, N) complex128, recovered from Ct at l_max and the training dt."""
        if self.l_max is None:
            raise ValueError("mode='dplr' relates Ct to a length: pass l_max=... or call forward once "
                             "before using state/step")
        Ab0, _ = filters.dplr_dense(Lam, P, B, dt)
        return filters.ct_to_c(filters.full_c(C), Ab0, self.l_max)

    # ---- recurrent mode ------------------------------------------------------------------------
    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        """Zero state: (B, H, N/2) complex64 (diag) or (B, H, N) complex64 (dplr, full system)."""
        _check_int("batch_size", batch_size)
        n = self.d_state // 2 if self.mode == "diag" else self.d_state
        device = self.log_dt.device if device is None else device
        return torch.zeros(batch_size, self.d_model, n, dtype=torch.complex64, device=device)

    def _recurrence(self, rate: float):
        """(Ab, Bb, C) for one step: diag (H, N2) elementwise, dplr dense (H, N, N), complex64."""
        key = (rate, self.l_max, self.mode, tuple(p._version for p in self.parameters()))
        if not torch.is_grad_enabled() and self._step_cache is not None and self._step_cache[0] == key:
            return self._step_cache[1]
        Lam, B, C, P, dt = self._params()
        if self.mode == "diag":
            log_z, Bb = filters.diag_discretize(Lam, B, dt * rate, self.discretization)
            out = (torch.exp(log_z), Bb, C)
        else:
            Ab, Bbf = filters.dplr_dense(Lam, P, B, dt * rate)
            Cf = self._full_c(Lam, P, B, C, dt)
            out = (Ab.to(torch.complex64), Bbf.to(torch.complex64), Cf.to(torch.complex64))
        if not torch.is_grad_enabled():
            self._step_cache = (key, out)
        return out

    def step(self, x_t: torch.Tensor, state: torch.Tensor, *, rate: float | None = None):
        """One time step: x_t (B, H), state -> (y_t (B, H), next state)."""
        self._check_x(x_t, 2)
        self._check_state(state, x_t.shape[0])
        rate = self.rate if rate is None else rate
        with no_autocast(x_t.device.type):
            u = x_t.float()                                            # (B, H)
            Ab, Bb, C = self._recurrence(rate)
            state = state.to(torch.complex64)
            if self.mode == "diag":
                state = Ab * state + Bb * u[..., None]                 # (B, H, N2)
                y = 2 * torch.einsum("chn,bhn->bch", C, state).real    # (B, c, H)
            else:
                state = torch.einsum("hnm,bhm->bhn", Ab, state) + Bb * u[..., None]   # (B, H, N)
                y = torch.einsum("chn,bhn->bch", C, state).real        # (B, c, H)
            y = y + self.D.float() * u[:, None, :]                     # (B, c, H)
        return self._output(y.reshape(y.shape[0], -1)), state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, mode={self.mode!r}, "
                f"channels={self.channels}, bidirectional={self.bidirectional}, "
                f"discretization={self.discretization!r}")
