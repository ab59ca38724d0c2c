"""The S4 / S4D layer: a drop-in sequence layer with convolution, recurrent and streaming modes.

The layer owns the parts every S4-style SSM shares: the skip `D`, the FFT convolution with the
SSM's filter, state passing between chunks, the one-token `step`, and the output projection
(activation -> dropout -> Linear(channels*H, 2H) -> GLU). The SSM itself is a parameterization
module behind one protocol (`ssm.layers.ssm_base`): `mode="diag"` builds `DiagSSM` (S4D,
`ssm.layers.ssm_diag`), `mode="dplr"` builds `DPLRSSM` (S4, `ssm.layers.ssm_dplr`); the layer
never branches on the mode after construction. Settings and defaults: `ssm.config.S4Config`
(docs/s4.md "Layer options"); math: docs/s4.md and docs/discretization.md.

The SSM part (filter, FFT conv, D skip, state) runs in float32/complex64 with autocast off, or in
float64/complex128 after `.double()`; only the output projection follows autocast.

Packed documents (`seq_idx`, docs/packing.md): the documents are convolved as one right-padded
batch of their own (`ssm.fftconv.document_fftconv`), unless padding them to the longest one would
waste too much; then the whole row is convolved at once and the part that crosses document
boundaries (in both directions when bidirectional) is subtracted exactly, from the state at each
boundary (`ssm.fftconv.cross_document_response`).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ssm import filters, hippo
from ssm.config import S4Config, build, keyword_signature
from ssm.fftconv import cross_document_response, document_fftconv, fftconv, no_autocast
from ssm.layers.nn import (ConfigAttributes, SequenceDropout, activation, check_finite, check_lengths, keyword_only,
                          length_mask)
from ssm.layers.s4_init import DPLR_INITS, min_rank
from ssm.layers.ssm_base import check_rate
from ssm.layers.ssm_diag import DiagSSM
from ssm.layers.ssm_dplr import DPLRSSM
from ssm.packing import check_seq_idx

MODES = ("diag", "dplr")
BACKENDS = ("auto", "torch", "triton")

_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def _check_int(name: str, value, lo: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_config(cfg: S4Config, d_model: int) -> int:
    """Validate every setting (ValueError naming it); returns the number of (A, B, P) copies."""
    _check_int("d_model", d_model)
    _check_int("channels", cfg.channels)
    if cfg.mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {cfg.mode!r}")
    _check_int("d_state", cfg.d_state, 2)
    if cfg.d_state % 2:
        raise ValueError(f"d_state must be even (N/2 complex conjugate pairs), got d_state={cfg.d_state}")
    inits, other = (hippo.DIAG_INITS, DPLR_INITS) if cfg.mode == "diag" else (DPLR_INITS, hippo.DIAG_INITS)
    if cfg.init not in inits:
        where = f" (it is a mode={'dplr' if cfg.mode == 'diag' else 'diag'!r} init)" if cfg.init in other else ""
        raise ValueError(f"init={cfg.init!r} is not supported with mode={cfg.mode!r}{where}; "
                         f"mode={cfg.mode!r} supports init in {inits}")
    allowed = filters.DIAG_METHODS if cfg.mode == "diag" else ("bilinear",)
    if cfg.discretization is not None and cfg.discretization not in allowed:
        raise ValueError(f"discretization must be one of {allowed} for mode={cfg.mode!r}, got {cfg.discretization!r}")
    if cfg.mode == "diag":
        for name in ("rank", "l_max"):
            if getattr(cfg, name) is not None:
                raise ValueError(f"{name}={getattr(cfg, name)!r} has no meaning with mode='diag' (S4D has no "
                                 f"low-rank term and no length-bound C); leave it None or use mode='dplr'")
    else:
        if cfg.rank is not None:
            _check_int("rank", cfg.rank)
        if cfg.l_max is not None:
            _check_int("l_max", cfg.l_max)
    if not isinstance(cfg.dropout, (int, float)) or not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {cfg.dropout!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {cfg.backend!r}")
    if cfg.b_clip is not None and not (isinstance(cfg.b_clip, (int, float)) and cfg.b_clip > 0):
        raise ValueError(f"b_clip must be None or a number > 0, got {cfg.b_clip!r}")
    if cfg.n_ssm is None:
        return d_model
    _check_int("n_ssm", cfg.n_ssm)
    if d_model % cfg.n_ssm:
        raise ValueError(f"n_ssm must divide d_model, got n_ssm={cfg.n_ssm}, d_model={d_model}")
    return cfg.n_ssm


class S4(ConfigAttributes, nn.Module):
    """S4 (mode="dplr") or S4D (mode="diag") layer on (B, L, d_model) sequences.

    `S4(d_model, d_state=64, *, mode="diag", ...)`: every keyword is a field of `S4Config` (its
    defaults live there); `S4(d_model, config=S4Config(...))` takes a whole config. `self.ssm` is
    the parameterization module, `self.config` the settings used.
    """

    def __init__(self, d_model: int, d_state: int | None = None, *, config: S4Config | None = None,
                 device=None, dtype=None, **options):
        super().__init__()
        if d_state is not None:
            options["d_state"] = d_state
        cfg = build(S4Config, config, options, "S4")
        n_ssm = _check_config(cfg, d_model)
        self.config, self.d_model, self.rate = cfg, d_model, 1.0
        out_channels = cfg.channels * (2 if cfg.bidirectional else 1)
        if cfg.mode == "diag":
            self.ssm = DiagSSM(d_model, cfg, n_ssm, out_channels, device=device)
        else:
            self.ssm = DPLRSSM(d_model, cfg, n_ssm, out_channels, cfg.rank or min_rank(cfg.init), device=device)
        self.D = nn.Parameter(torch.randn(cfg.channels, d_model, device=device, dtype=torch.float32))
        self.act = activation(cfg.activation)
        self.dropout = SequenceDropout(cfg.dropout, tie=cfg.tie_dropout)
        self.out = nn.Linear(cfg.channels * d_model, 2 * d_model, device=device, dtype=dtype)
        self._step_cache = None
        self._step_dense = False
        self._warned_grad_step = False

    def _apply(self, fn, recurse=True):
        # `.half()` / `.to(bfloat16)` must not round the skip D (part of the float32 SSM math)
        super()._apply(fn, recurse)
        if self.D.dtype in (torch.float16, torch.bfloat16):
            self.D.data = self.D.data.float()
        return self

    @property
    def rank(self) -> int | None:
        """mode="dplr": the low-rank size in use (the measure's own rank when not given); else None."""
        return getattr(self.ssm, "rank", None)

    @property
    def l_max(self) -> int | None:
        """mode="dplr": the length the learned Ct belongs to (settable; `ssm.layers.ssm_dplr`)."""
        return getattr(self.ssm, "l_max", None)

    @l_max.setter
    def l_max(self, value: int | None) -> None:
        if not hasattr(self.ssm, "l_max"):
            raise ValueError("l_max has no meaning with mode='diag' (S4D has no length-bound C)")
        self.ssm.l_max = value

    @property
    def n_ssm(self) -> int:
        return self.ssm.n_ssm

    @property
    def rate(self) -> float:
        """dt multiplier used when a call does not pass `rate` (2.0: half the sampling rate)."""
        return self._rate

    @rate.setter
    def rate(self, value) -> None:
        self._rate = check_rate(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # checkpoints written before the parameterization modules: `<prefix>B` -> `<prefix>ssm.B`
        for name in ("log_neg_real", "imag", "B", "C", "P", "log_dt", "fixed_l_max"):
            if prefix + name in state_dict and prefix + "ssm." + name not in state_dict:
                state_dict[prefix + "ssm." + name] = state_dict.pop(prefix + name)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def filter(self, L: int, *, rate: float | None = None) -> torch.Tensor:
        """Convolution filter K (c', H, L) real, c' = channels (x2 if bidirectional), step dt*rate."""
        _check_int("L", L)
        rate = self.rate if rate is None else check_rate(rate)
        with no_autocast(self.D.device.type):
            return self.ssm.filter(L, rate)

    # ---- checks --------------------------------------------------------------------------------
    def _check_x(self, x: torch.Tensor, rank: int, lengths=None) -> None:
        want = "(B, L, %d)" % self.d_model if rank == 3 else "(B, %d)" % self.d_model
        if not isinstance(x, torch.Tensor) or x.dim() != rank or x.shape[-1] != self.d_model:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must have shape {want}, got {got}")
        if x.shape[0] == 0 or (rank == 3 and x.shape[1] == 0):
            raise ValueError(f"x must have batch size and length >= 1, got shape {tuple(x.shape)}")
        if self.config.check_finite:
            check_finite(x, lengths, "x")

    def _check_state(self, state: torch.Tensor, batch: int) -> None:
        if self.config.bidirectional:
            raise ValueError("a bidirectional S4 has no recurrent state (no step, no state passing)")
        want = (batch, self.d_model, self.ssm.state_size)
        dtype = self.ssm.complex_dtype
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"state must be a torch.Tensor of shape {want}, dtype {dtype} "
                            f"(see default_state), got {type(state).__name__}")
        if tuple(state.shape) != want:
            raise ValueError(f"state must have shape {want} (batch, d_model, state size) for "
                             f"mode={self.config.mode!r} (see default_state), got {tuple(state.shape)}")
        if state.dtype != dtype:
            raise TypeError(f"state must have dtype {dtype} (see default_state), got {state.dtype}")
        if state.device != self.D.device:
            raise ValueError(f"state must be on the layer's device {self.D.device}, got {state.device}")

    # Keep the input spectrum for the backward (True: fastest) or recompute it there (False: one
    # more FFT per call, 2 x B*H*L*4 bytes less kept between forward and backward).
    save_spectrum = True

    # ---- convolution mode ----------------------------------------------------------------------
    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None, rate: float | None = None,
                seq_idx: torch.Tensor | None = None):
        """x (B, L, H) -> (y (B, L, H), next_state). next_state is None unless `state` is given.

        With `lengths` (right padding) the padded inputs are replaced by zeros (selected, so a
        NaN there never reaches a real output) and next_state is the state after each row's last
        real position. `rate` scales dt (default `self.rate`). With `seq_idx` (B, L) (packed
        documents, not combined with `lengths`) every document gives what it would alone, except
        that `state` feeds each row's first document; next_state is the last document's.
        """
        Bsz, L = x.shape[:2] if isinstance(x, torch.Tensor) and x.dim() == 3 else (0, 0)
        lengths = check_lengths(lengths, Bsz, L) if Bsz else lengths
        if seq_idx is not None and Bsz:
            if lengths is not None:
                raise ValueError("seq_idx and lengths cannot be combined: a packed row has no right padding "
                                 "(put any padding in a document of its own)")
            seq_idx = check_seq_idx(seq_idx, Bsz, L)
        self._check_x(x, 3, lengths)
        rate = self.rate if rate is None else check_rate(rate)
        if state is not None:
            self._check_state(state, Bsz)
        c, ssm = self.config.channels, self.ssm
        next_state = None
        with no_autocast(x.device.type):
            u = x.transpose(1, 2).to(ssm.real_dtype)                  # (B, H, L)
            if lengths is not None:
                u = torch.where(length_mask(lengths, L)[:, None, :], u, 0.0)
            K = ssm.filter(L, rate)                                    # (c', H, L)
            k, k_rev = (K[:c], K[c:]) if self.config.bidirectional else (K, None)
            # the D skip rides in the same FFT (lag 0 of the filter)
            y = None if seq_idx is None else document_fftconv(u, seq_idx, k, k_rev, self.D,
                                                              save_spectrum=self.save_spectrum)
            if y is None:
                y = fftconv(u.unsqueeze(1), k, k_rev, self.D, save_spectrum=self.save_spectrum)  # (B, c, H, L)
                if seq_idx is not None:
                    y = y - self._cross_documents(u, seq_idx, rate).to(y.dtype)
            if state is not None:
                y = y + self._from_state(state, L, rate, seq_idx).to(y.dtype)
                if seq_idx is not None:                                # the last document's own state
                    last = seq_idx == seq_idx[:, -1:]                  # (B, L)
                    u = u * last[:, None, :].to(u.dtype)
                    state = state * last[:, :1, None].to(state.dtype)  # kept when it is also the first
                next_state = ssm.next_state(u, state, rate, lengths).to(state.dtype)
        return self._project(y), next_state

    def _from_state(self, state: torch.Tensor, L: int, rate: float, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """What `state` adds to the outputs (B, c, H, L): every position, or the first document's."""
        r = self.ssm.state_response(state, L, rate)                    # (B, c, H, L)
        if seq_idx is None:
            return r
        return r * (seq_idx == seq_idx[:, :1])[:, None, None, :].to(r.dtype)

    def _cross_documents(self, u: torch.Tensor, seq_idx: torch.Tensor, rate: float) -> torch.Tensor:
        """What the whole-row convolution of u (B, H, L) passes between documents: (B, c, H, L).

        Causal side: the response of the state after the previous documents; bidirectional: also
        the anti-causal filter's reach into later documents, the same computation on the reversed
        row (its filter starts at lag 0 of the future, hence `first_power=0`).
        """
        c, ssm = self.config.channels, self.ssm
        system = ssm.state_system(rate)
        zero = ssm.default_state(u.shape[0], u.device)

        def advance(seg, s, n):
            return ssm.next_state(seg, s, rate, n, system=system)

        def side(channels, first_power):
            sub = (system[0][channels],) + tuple(system[1:])
            return lambda s, T: ssm.state_response(s, T, rate, system=sub, first_power=first_power)

        out = cross_document_response(u, seq_idx, advance, side(slice(0, c), 1), zero)
        if self.config.bidirectional:
            rev = cross_document_response(u.flip(-1), -seq_idx.flip(-1), advance, side(slice(c, 2 * c), 0), zero)
            out = out + rev.flip(-1)
        return out

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

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """The output projection of one position's SSM output y (..., c*H) -> (..., H)."""
        if not torch.is_autocast_enabled(y.device.type):
            y = y.to(self.out.weight.dtype)                            # model cast to bf16/fp16/fp64
        y = self.dropout(self.act(y))                                  # (..., c*H)
        return nn.functional.glu(self.out(y), dim=-1)                  # (..., H)

    # ---- recurrent mode ------------------------------------------------------------------------
    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        """Zero state (B, H, n) complex: n = N/2 (diag) or N (dplr, the full system)."""
        _check_int("batch_size", batch_size)
        return self.ssm.default_state(batch_size, device)

    def recurrence(self, rate: float | None = None):
        """The one-step system (`ssm.layers.ssm_base.Recurrence`) used by `step` and `ssm.export`.

        Cached while grad is off and the parameters are unchanged. While `torch.export` traces,
        the cache built by `setup_step` for the same rate is used as is (the traced parameters are
        fake tensors whose versions say nothing: call `setup_step` right before exporting).
        """
        rate = self.rate if rate is None else check_rate(rate)
        cache = self._step_cache
        if _is_exporting():                            # l_max is not read here: its buffer is a fake tensor
            if cache is None or (cache[0][0][0], cache[0][0][2]) != (rate, self._step_dense):
                raise RuntimeError(f"call setup_step(rate={rate}) on the layer before torch.export of "
                                   "a function that calls step (the step system is built outside the graph)")
            return cache[1]
        settings = (rate, self.l_max, self._step_dense)
        key = settings, tuple((p._version, p.data_ptr(), p.device) for p in self.parameters())
        if not torch.is_grad_enabled() and cache is not None and cache[0] == key:
            return cache[1]
        system = self.ssm.recurrence(rate, dense=self._step_dense)
        if not torch.is_grad_enabled():
            system = system.detach()
            self._step_cache = (key, system)
        elif self.ssm.costly_recurrence and not self._warned_grad_step:
            self._warned_grad_step = True
            warnings.warn(f"S4 ({type(self.ssm).__name__}) step with grad enabled rebuilds its O(N^3) step "
                          "system at every call, so gradients reach the parameters; for generation wrap "
                          "the loop in torch.no_grad() (the system is then built once and cached)", stacklevel=3)
        return system

    @torch.no_grad()
    def setup_step(self, *, rate: float | None = None, dense: bool = False) -> None:
        """Build the step system now (one O(H N^3) complex128 setup for mode="dplr").

        After this, `step(x, state)` at the same rate is a fixed sequence of tensor operations,
        which `torch.export` can trace; the cache is rebuilt when a parameter changes.
        `dense=True` (mode="dplr" only) steps with the dense N x N `Ab`: a reference.
        """
        if self.config.bidirectional:
            raise ValueError("a bidirectional S4 has no recurrent state (no step, no state passing)")
        self._step_dense = bool(dense)
        try:
            self.recurrence(rate)
        except ValueError:
            self._step_dense = False
            raise

    def step(self, x_t: torch.Tensor, state: torch.Tensor, *, rate: float | None = None):
        """One time step: x_t (B, H), state (see default_state) -> (y_t (B, H), next state).

        O(H N) per token for mode="diag", O(H N r) for mode="dplr".
        """
        self._check_x(x_t, 2)
        self._check_state(state, x_t.shape[0])
        with no_autocast(x_t.device.type):
            u = x_t.to(self.ssm.real_dtype)                            # (B, H)
            y, state = self.recurrence(rate).step(state, u)            # (B, c, H), (B, H, n)
            y = y + self.D.to(u.dtype) * u[:, None, :]                 # (B, c, H)
        return self.output(y.reshape(y.shape[0], -1)), state

    def extra_repr(self) -> str:
        cfg = self.config
        return (f"d_model={self.d_model}, d_state={cfg.d_state}, mode={cfg.mode!r}, init={cfg.init!r}, "
                f"channels={cfg.channels}, bidirectional={cfg.bidirectional}"
                + (f", n_ssm={self.n_ssm}" if self.n_ssm != self.d_model else "")
                + (f", dt_transform={cfg.dt_transform!r}" if cfg.dt_transform != "exp" else ""))


S4.__init__.__signature__ = keyword_signature(S4.__init__, S4Config, after="config")
