"""The S4 / S4D layer: a drop-in sequence layer with convolution, recurrent and streaming modes.

The math is in docs/s4.md and docs/discretization.md. `mode="diag"` is S4D: N/2 complex modes
per channel from a diagonal init (`ssm.hippo.diag_init`), ZOH or bilinear, filter by a Vandermonde
product. `mode="dplr"` is S4: the NPLR form `A = Lambda - P P^*` of a HiPPO measure (LegS, LegT,
LagT, FouT or the mixed "hippo" init, `ssm.layers.s4_init`; docs/s4.md "NPLR forms per measure"),
bilinear, filter by Cauchy products (rank r Woodbury), with the learned `Ct = C (I - Ab^l_max)` of
S4. Both run as a recurrence (`step`, O(N) per token for both modes: `ssm.layers.s4_step`,
docs/s4.md "Streaming: diagonalized step") and in chunks with state passing (`forward(x, state)`),
and both evaluate their filter at any length and step size.

Parametrization: `Re(Lambda) = -exp(log_neg_real)` (stays negative), `Im(Lambda)` free, complex
B, C, P stored as real (..., 2) float32 tensors (optimizers and `torch.compile` see real params).
`n_ssm` copies of (Lambda, B, P) are shared by the channels (channel h uses copy `h % n_ssm`,
as in the public S4 code; None: one per channel); dt is always per channel. The parameter
`log_dt` (H,) holds `log dt` (`dt_transform="exp"`) or the inverse softplus of dt
(`dt_transform="softplus"`); `ssm.discretize.dt_from_param` maps it to dt.
A, B, P carry `_optim = {"lr": ssm_lr, "weight_decay": 0.0}` and log_dt `{"lr": dt_lr, ...}` for
`ssm.layers.params.param_groups` (lr None: no "lr" key, the optimizer's global rate). The SSM
part (filter, FFT conv, D skip, state) always runs in float32/complex64 with autocast off; only
the output projection follows autocast. Output: activation -> dropout -> Linear(channels*H, 2H)
-> GLU.

Lengths other than `l_max` (S4 only): `Ct` belongs to `l_max` and the training step size. For
another length L or rate, C is recovered by `C = Ct (I - Ab^l_max)^-1` and `Ct_L = C (I - Ab'^L)`
is used (dense O(H N^3) in complex128, independent of L). If `l_max` is not given it is fixed by
the first forward call. `l_max` is part of the state_dict (buffer `fixed_l_max`, -1 = not fixed
yet), so a reloaded layer reproduces its outputs; a checkpoint without it loads only into a layer
constructed with `l_max=...` (that value is kept), otherwise loading raises.

State (`default_state`, `step`, `forward(x, state)`): complex64, (B, H, N/2) for "diag" (one of
each conjugate pair), (B, H, N) for "dplr" (the full system in the NPLR eigenbasis).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssm import filters, hippo
from ssm.discretize import DT_TRANSFORMS, dt_from_param, dt_param_init
from ssm.fftconv import (dense_next_state, dense_state_response, diag_next_state,
                         diag_state_response, fftconv, no_autocast)
from ssm.layers.nn import activation as make_activation
from ssm.layers.nn import SequenceDropout, check_lengths, length_mask
from ssm.layers.s4_init import DPLR_INITS, dplr_init, min_rank
from ssm.layers.s4_step import dplr_step, dplr_step_system

MODES = ("diag", "dplr")


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _check_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_init(mode: str, init) -> None:
    inits = hippo.DIAG_INITS if mode == "diag" else DPLR_INITS
    if init in inits:
        return
    other = "dplr" if mode == "diag" else "diag"
    if init in (DPLR_INITS if mode == "diag" else hippo.DIAG_INITS):
        raise ValueError(f"init={init!r} is not supported with mode={mode!r} (it is a mode={other!r} init); "
                         f"mode={mode!r} supports init in {inits}")
    raise ValueError(f"init must be one of {inits} for mode={mode!r}, got {init!r}")


def _check_lr(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value < 0):
        raise ValueError(f"{name} must be None (the optimizer's global rate) or a finite float >= 0, "
                         f"got {value!r}")


def _check_n_ssm(n_ssm, d_model: int) -> int:
    """Number of (Lambda, B, P) copies: n_ssm, or d_model for None; must divide d_model."""
    if n_ssm is None:
        return d_model
    _check_int("n_ssm", n_ssm)
    if d_model % n_ssm:
        raise ValueError(f"n_ssm must divide d_model, got n_ssm={n_ssm}, d_model={d_model}")
    return n_ssm


class S4(nn.Module):
    """S4 (mode="dplr") or S4D (mode="diag") layer on (B, L, d_model) sequences.

    Options of the public S4 LRA setups (docs/s4.md, "Layer options"):
    n_ssm: None (one SSM per channel) or the number of (Lambda, B, P) copies shared by the
        channels, dividing d_model; dt stays per channel. `self.n_ssm` holds the count used.
    dt_transform: "exp" (dt = exp(log_dt)) or "softplus" (dt = softplus(log_dt)); both start
        from the same log-uniform dt in [dt_min, dt_max].
    ssm_lr / dt_lr: learning rates of A, B, P / of dt for `ssm.param_groups`, no weight decay on
        either; None is the optimizer's global rate; dt_lr="ssm_lr" (default) follows ssm_lr.
    tie_dropout: one dropout mask per (example, feature) for the whole sequence.
    """

    def __init__(self, d_model: int, d_state: int = 64, *, mode: str = "diag", init: str = "legs",
                 rank: int | None = None, bidirectional: bool = False, channels: int = 1,
                 dt_min: float = 1e-3, dt_max: float = 1e-1, discretization: str | None = None,
                 activation: str = "gelu", dropout: float = 0.0, ssm_lr: float | None = 1e-3,
                 l_max: int | None = None, backend: str = "auto", n_ssm: int | None = None,
                 dt_transform: str = "exp", dt_lr: float | None | str = "ssm_lr",
                 tie_dropout: bool = False, device=None, dtype=None):
        super().__init__()
        _check_int("d_model", d_model)
        _check_int("channels", channels)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        _check_int("d_state", d_state, 2)
        if d_state % 2:
            raise ValueError(f"d_state must be even (N/2 complex conjugate pairs), got d_state={d_state}")
        _check_init(mode, init)
        allowed = filters.DIAG_METHODS if mode == "diag" else ("bilinear",)
        discretization = allowed[0] if discretization is None else discretization
        if discretization not in allowed:
            raise ValueError(f"discretization must be one of {allowed} for mode={mode!r}, got {discretization!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if l_max is not None:
            _check_int("l_max", l_max)
        if mode == "dplr":
            rank = min_rank(init) if rank is None else rank
            _check_int("rank", rank)
            self.register_buffer("fixed_l_max", torch.tensor(-1, dtype=torch.int64, device=device))
        n = _check_n_ssm(n_ssm, d_model)
        if dt_transform not in DT_TRANSFORMS:
            raise ValueError(f"dt_transform must be one of {DT_TRANSFORMS}, got {dt_transform!r}")
        dt_lr = ssm_lr if isinstance(dt_lr, str) and dt_lr == "ssm_lr" else dt_lr
        _check_lr("ssm_lr", ssm_lr)
        _check_lr("dt_lr", dt_lr)
        self.n_ssm, self.dt_transform = n, dt_transform
        self.d_model, self.d_state, self.mode, self.rank = d_model, d_state, mode, rank
        self.init = init
        self.channels, self.bidirectional = channels, bidirectional
        self.discretization, self.l_max, self.backend, self.rate = discretization, l_max, backend, 1.0
        H, N2 = d_model, d_state // 2
        f32 = dict(device=device, dtype=torch.float32)

        if mode == "diag":
            Lam = hippo.diag_init(init, d_state)                       # (N2,)
            B = hippo.nplr("legs", d_state)[2] if init == "legs" else torch.ones(N2, dtype=torch.complex128)
        else:
            Lam, P, B = dplr_init(init, d_state, n, rank)              # (n, N2), (r, n, N2), (n, N2)
            self.P = self._ssm_param(torch.view_as_real(P), f32, ssm_lr)
        self.log_neg_real = self._ssm_param(torch.log(-Lam.real).expand(n, N2), f32, ssm_lr)
        self.imag = self._ssm_param(Lam.imag.expand(n, N2), f32, ssm_lr)
        self.B = self._ssm_param(torch.view_as_real(B.expand(n, N2)), f32, ssm_lr)
        self.log_dt = self._ssm_param(dt_param_init(H, dt_min, dt_max, dt_transform), f32, dt_lr)
        c_total = channels * (2 if bidirectional else 1)
        # C (S4: the learned Ct) ~ complex normal with unit variance
        self.C = nn.Parameter(torch.randn(c_total, H, N2, 2, **f32) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(channels, H, **f32))
        self.act = make_activation(activation)
        self.dropout = SequenceDropout(dropout, tie=tie_dropout)
        self.out = nn.Linear(channels * H, 2 * H, device=device, dtype=dtype)
        self._step_cache = None
        self._step_dense = False

    @staticmethod
    def _ssm_param(t: torch.Tensor, f32: dict, lr: float | None) -> nn.Parameter:
        p = nn.Parameter(t.to(**f32).contiguous().clone())
        p._optim = {"weight_decay": 0.0} if lr is None else {"lr": lr, "weight_decay": 0.0}
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
        """(Lambda (H, N2), B (H, N2), C (c', H, N2), P (r, H, N2) or None, dt (H,)), float32/complex64.

        Shared copies (n_ssm < d_model) are tiled to one row per channel here.
        """
        Lam = self._per_channel(torch.complex(-torch.exp(self.log_neg_real.float()), self.imag.float()))
        B = self._per_channel(torch.view_as_complex(self.B.float()))
        C = torch.view_as_complex(self.C.float())
        P = self._per_channel(torch.view_as_complex(self.P.float())) if self.mode == "dplr" else None
        return Lam, B, C, P, dt_from_param(self.log_dt.float(), self.dt_transform)

    def _per_channel(self, t: torch.Tensor) -> torch.Tensor:
        """(..., n_ssm, N2) -> (..., H, N2): channel h takes copy h % n_ssm."""
        reps = self.d_model // t.shape[-2]
        return t if reps == 1 else t.repeat(*([1] * (t.dim() - 2)), reps, 1)

    @property
    def l_max(self) -> int | None:
        """Length that relates the learned Ct to C (mode="dplr"); None until fixed."""
        return self._l_max

    @l_max.setter
    def l_max(self, value: int | None) -> None:
        self._l_max = value
        if "fixed_l_max" in self._buffers:
            with torch.no_grad():
                self.fixed_l_max.fill_(-1 if value is None else value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "fixed_l_max"
        has_layer = any(k.startswith(prefix) for k in state_dict)      # else: plain missing keys
        if self.mode == "dplr" and key not in state_dict and has_layer:
            if self.l_max is None:
                error_msgs.append(
                    f"{key} is missing from the checkpoint (saved before l_max was stored): this "
                    "mode='dplr' layer's outputs depend on the length its Ct was trained for; construct "
                    "the layer with l_max=<that length> before loading (the given value is then kept)")
            else:
                state_dict[key] = self.fixed_l_max.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.mode == "dplr":
            value = int(self.fixed_l_max)
            self._l_max = None if value < 0 else value

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
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor of shape {want}, dtype torch.complex64 "
                            f"(see default_state), got {type(state).__name__}")
        if tuple(state.shape) != want:
            raise ValueError(f"state must have shape {want} (batch, d_model, "
                             f"{'d_state/2' if self.mode == 'diag' else 'd_state'}) for mode={self.mode!r} "
                             f"(see default_state), got {tuple(state.shape)}")
        if state.dtype != torch.complex64:
            raise TypeError(f"state must have dtype torch.complex64 (see default_state), got {state.dtype}")
        if state.device != self.log_dt.device:
            raise ValueError(f"state must be on the layer's device {self.log_dt.device}, got {state.device}")

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
        a = self.act(y).reshape(Bsz, c * H, L).transpose(1, 2)         # (B, L, c*H) view
        z = self.out(self.dropout(a))                                  # (B, L, 2H); tied mask per (B, c*H)
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

    def _step_key(self, rate: float):
        """What the cached step system depends on: settings, then parameter versions/storage."""
        params = tuple((p._version, p.data_ptr(), p.device) for p in self.parameters())
        return (rate, self.l_max, self._step_dense), params

    def _recurrence(self, rate: float):
        """The step system, complex64: ("diag", z, Bb, C) with (H, N2) tensors, or for dplr
        ("dplr", z, E, F, Bb, C) (diagonal plus rank r, `ssm.layers.s4_step`) or ("dense", Ab, Bb, C).

        Cached while grad is off (inference) and the parameters are unchanged. While
        `torch.export` traces, a cache built by `setup_step` for the same rate is used as is (the
        traced parameters are fake tensors whose versions say nothing: call `setup_step` right
        before exporting).
        """
        cache = self._step_cache
        if _is_exporting():
            if cache is None or cache[0][0] != (rate, self.l_max, self._step_dense):
                raise RuntimeError(f"call setup_step(rate={rate}) on the layer before torch.export of "
                                   "a function that calls step (the step system is built outside the graph)")
            return cache[1]
        key = self._step_key(rate)
        if not torch.is_grad_enabled() and cache is not None and cache[0] == key:
            return cache[1]
        c64 = torch.complex64
        Lam, B, C, P, dt = self._params()
        if self.mode == "diag":
            log_z, Bb = filters.diag_discretize(Lam, B, dt * rate, self.discretization)
            out = ("diag", torch.exp(log_z), Bb, C)
        elif self._step_dense:
            Ab, Bbf = filters.dplr_dense(Lam, P, B, dt * rate)
            Cf = self._full_c(Lam, P, B, C, dt)
            out = ("dense", Ab.to(c64), Bbf.to(c64), Cf.to(c64))
        else:
            z, E, F, Bbf = dplr_step_system(Lam, P, B, dt * rate)
            Cf = self._full_c(Lam, P, B, C, dt)
            out = ("dplr",) + tuple(t.to(c64) for t in (z, E, F, Bbf, Cf))
        if not torch.is_grad_enabled():
            out = (out[0],) + tuple(t.detach() for t in out[1:])
            self._step_cache = (key, out)
        return out

    @torch.no_grad()
    def setup_step(self, *, rate: float | None = None, dense: bool = False) -> None:
        """Build the step system now (one O(H N^3) complex128 setup for mode="dplr").

        After this, `step(x, state)` at the same rate is a fixed sequence of tensor operations
        (no Python branching on data, no host synchronisation), which `torch.export` can trace.
        The cache is rebuilt automatically when a parameter changes (optimizer step,
        load_state_dict, `.to(device)`). `dense=True` (mode="dplr" only) steps with the dense
        N x N `Ab` instead of the O(N r) diagonal-plus-low-rank form: a reference, for checks
        and timing.
        """
        if dense and self.mode != "dplr":
            raise ValueError(f"setup_step(dense=True) needs mode='dplr', got mode={self.mode!r}")
        if self.bidirectional:
            raise ValueError("a bidirectional S4 has no recurrent state (no step, no state passing)")
        self._step_dense = bool(dense)
        self._recurrence(self.rate if rate is None else rate)

    def step(self, x_t: torch.Tensor, state: torch.Tensor, *, rate: float | None = None):
        """One time step: x_t (B, H), state (see default_state) -> (y_t (B, H), next state).

        O(H N) per token in both modes (O(H N r) for mode="dplr").
        """
        self._check_x(x_t, 2)
        self._check_state(state, x_t.shape[0])
        rate = self.rate if rate is None else rate
        with no_autocast(x_t.device.type):
            u = x_t.float()                                            # (B, H)
            kind, *system = self._recurrence(rate)
            if kind == "diag":
                z, Bb, C = system
                state = z * state + Bb * u[..., None]                  # (B, H, N2)
                y = 2 * torch.einsum("chn,bhn->bch", C, state).real    # (B, c, H)
            elif kind == "dplr":
                y, state = dplr_step(*system, state, u)                # (B, c, H), (B, H, N)
            else:
                Ab, Bb, C = system
                state = torch.einsum("hnm,bhm->bhn", Ab, state) + Bb * u[..., None]   # (B, H, N)
                y = torch.einsum("chn,bhn->bch", C, state).real        # (B, c, H)
            y = y + self.D.float() * u[:, None, :]                     # (B, c, H)
        return self._output(y.reshape(y.shape[0], -1)), state

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_state={self.d_state}, mode={self.mode!r}, "
                f"channels={self.channels}, bidirectional={self.bidirectional}, "
                f"discretization={self.discretization!r}"
                + (f", n_ssm={self.n_ssm}" if self.n_ssm != self.d_model else "")
                + (f", dt_transform={self.dt_transform!r}" if self.dt_transform != "exp" else ""))
