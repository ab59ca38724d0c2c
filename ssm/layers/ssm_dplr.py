"""The DPLR SSM of S4: `A = Lambda - P P^*` in the NPLR eigenbasis, bilinear (docs/s4.md).

Parameters (protocol: `ssm.layers.ssm_base`): `log_neg_real`, `imag` (kind "A"), `B` ("B"),
`P` ("P", (r, n_ssm, N/2)), the learned `Ct` stored as `C` ("C", (c', H, N/2)), `log_dt` ("dt").
Inits for every HiPPO measure: `ssm.layers.s4_init` (docs/s4.md "NPLR forms per measure").

**Length.** The learned `Ct = C (I - Ab^l_max)` belongs to one length `l_max`, stored in the
buffer `fixed_l_max` (the only copy, so it is saved, loaded and broadcast by DDP with the
weights). Whoever knows the data's maximum length sets it (`layer.l_max = n`; the LRA trainer
does); if nobody did, the first forward sets it to its length, with a warning (under
`torch.distributed`, to the largest length over the ranks, so every rank computes the same
function). A filter of length `L <= l_max` is the length-`l_max` filter truncated (exact: the
first L taps do not depend on the truncation length); a longer one is computed for
`l_max * 2^k >= L` by the exact doubling `Ct_2l = Ct_l (I + Ab^l)` (as the public S4 code
extends its length) and truncated, without changing the parameters. Another step size
(`rate != 1`) recovers C densely (O(H N^3) in complex128, independent of L).

The state is the full N-dim system in the eigenbasis, (B, H, N) complex; the one-step system is
diagonal plus rank r (`ssm.layers.s4_step`), O(N r) per token.
"""
from __future__ import annotations

import math
import warnings

import torch

from ssm import filters
from ssm.fftconv import dense_next_state, dense_state_response
from ssm.layers.s4_init import dplr_init
from ssm.layers.s4_step import dplr_step_system
from ssm.layers.ssm_base import Recurrence, SSMBase
from ssm.layers.ssm_diag import clip_imag


class DPLRSSM(SSMBase):
    """S4: diagonal plus low-rank A, bilinear discretization, Cauchy filter, learned Ct."""

    def __init__(self, d_model: int, cfg, n_ssm: int, out_channels: int, rank: int, device=None):
        Lam, P, B = dplr_init(cfg.init, cfg.d_state, n_ssm, rank)      # (n, N2), (r, n, N2), (n, N2)
        super().__init__(d_model, cfg.d_state, n_ssm, cfg, device)
        N2 = cfg.d_state // 2
        self.state_size, self.rank = cfg.d_state, rank
        self.add_param("P", "P", torch.view_as_real(P), device)
        self.add_param("log_neg_real", "A", torch.log(-Lam.real), device)
        self.add_param("imag", "A", Lam.imag, device)
        self.add_param("B", "B", torch.view_as_real(clip_imag(B, cfg.b_clip)), device)
        # Ct ~ complex normal with unit variance
        self.add_param("C", "C", torch.randn(out_channels, d_model, N2, 2, device=device) * math.sqrt(0.5), device)
        self.register_buffer("fixed_l_max", torch.tensor(-1 if cfg.l_max is None else cfg.l_max,
                                                         dtype=torch.int64, device=device))
        self._l_max_cache = None

    # ---- the length Ct belongs to ----------------------------------------------------------------
    @property
    def l_max(self) -> int | None:
        """Length the learned Ct belongs to; None until set (read from the buffer `fixed_l_max`)."""
        key = (self.fixed_l_max._version, self.fixed_l_max.data_ptr())
        if self._l_max_cache is None or self._l_max_cache[0] != key:
            value = int(self.fixed_l_max)
            self._l_max_cache = (key, None if value < 0 else value)
        return self._l_max_cache[1]

    @l_max.setter
    def l_max(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"l_max must be None or an int >= 1, got {value!r}")
        with torch.no_grad():
            self.fixed_l_max.fill_(-1 if value is None else value)

    def _ensure_l_max(self, L: int) -> int:
        if self.l_max is not None:
            return self.l_max
        if torch.compiler.is_compiling():
            raise RuntimeError("mode='dplr': set layer.l_max before compiling (it is fixed by the first "
                               "eager forward otherwise)")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([L], device=self.fixed_l_max.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            L = int(t)
        warnings.warn(f"S4 (mode='dplr'): l_max was not set, so the first forward fixed it to L={L}; its "
                      "learned Ct belongs to that length. Set layer.l_max (e.g. the data's maximum "
                      "length) before training; longer inputs are handled exactly but cost more.",
                      stacklevel=4)
        self.l_max = L
        return L

    # ---- parameters, filter, recurrence ----------------------------------------------------------
    def params(self):
        """(Lambda (H, N2), P (r, H, N2), B (H, N2), Ct (c', H, N2), dt (H,)) in compute precision."""
        real = self.real_dtype
        Lam = self.per_channel(torch.complex(-torch.exp(self.log_neg_real.to(real)), self.imag.to(real)))
        return (Lam, self.per_channel(self.complex_param("P")), self.per_channel(self.complex_param("B")),
                self.complex_param("C"), self.dt())

    def _full_c(self, Lam, P, B, Ct, dt) -> torch.Tensor:
        """The recurrent C (c', H, N) complex128 from Ct at l_max and the training dt."""
        if self.l_max is None:
            raise ValueError("mode='dplr' relates Ct to a length: set layer.l_max (or run one forward) "
                             "before using state or step")
        Ab0, _ = filters.dplr_dense(Lam, P, B, dt)
        return filters.ct_to_c(filters.full_c(Ct), Ab0, self.l_max)

    def filter(self, L: int, rate: float = 1.0) -> torch.Tensor:
        Lam, P, B, Ct, dt = self.params()
        l_max = self._ensure_l_max(L)
        if rate != 1.0:
            Ab1, _ = filters.dplr_dense(Lam, P, B, dt * rate)
            Ct = filters.c_to_ct(self._full_c(Lam, P, B, Ct, dt), Ab1, L)[..., : Ct.shape[-1]].to(Ct.dtype)
            return filters.dplr_filter(Lam, P, B, Ct, dt * rate, L, backend=self.backend)
        n = l_max
        if L > l_max:
            Ab, _ = filters.dplr_dense(Lam, P, B, dt)
            Ctf, power = filters.full_c(Ct), torch.linalg.matrix_power(Ab, l_max)   # (c', H, N), (H, N, N)
            while n < L:                                               # Ct_2n = Ct_n (I + Ab^n)
                Ctf = Ctf + torch.einsum("chn,hnm->chm", Ctf, power)
                power, n = power @ power, 2 * n
            Ct = Ctf[..., : Ct.shape[-1]].to(Ct.dtype)
        return filters.dplr_filter(Lam, P, B, Ct, dt, n, backend=self.backend)[..., :L]   # (c', H, L)

    costly_recurrence = True                      # an O(H N^3) complex128 setup

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "fixed_l_max"
        if key not in state_dict and any(k.startswith(prefix) for k in state_dict):
            if self.l_max is None:
                error_msgs.append(
                    f"{key} is missing from the checkpoint (saved before l_max was stored): this "
                    "mode='dplr' layer's outputs depend on the length its Ct was trained for; construct "
                    "the layer with l_max=<that length> before loading (the given value is then kept)")
            else:
                state_dict[key] = self.fixed_l_max.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def recurrence(self, rate: float = 1.0, *, dense: bool = False) -> Recurrence:
        Lam, P, B, Ct, dt = self.params()
        Cf = self._full_c(Lam, P, B, Ct, dt)
        cd = self.complex_dtype
        if dense:
            Ab, Bb = filters.dplr_dense(Lam, P, B, dt * rate)
            return Recurrence("dense", Ab.to(cd), Bb.to(cd), Cf.to(cd))
        z, E, F, Bb = dplr_step_system(Lam, P, B, dt * rate)
        return Recurrence("dplr", z.to(cd), Bb.to(cd), Cf.to(cd), E.to(cd), F.to(cd))

    # ---- state passing ---------------------------------------------------------------------------
    def _dense(self, rate: float):
        Lam, P, B, Ct, dt = self.params()
        Ab, Bb = filters.dplr_dense(Lam, P, B, dt * rate)              # complex128
        return self._full_c(Lam, P, B, Ct, dt), Ab, Bb

    def state_system(self, rate: float = 1.0):
        """(C (c', H, N), Ab (H, N, N), Bb (H, N)) complex128: what `state_response` and
        `next_state` use (one O(H N^3) setup)."""
        return self._dense(rate)

    def state_response(self, state: torch.Tensor, L: int, rate: float = 1.0, *, system=None,
                       first_power: int = 1) -> torch.Tensor:
        """Zero-input response `y_k = Re C Ab^(k+1) s`, k < L: (B, c', H, L) (`ssm.fftconv`);
        `first_power=0` starts one step earlier (`y_k = Re C Ab^k s`)."""
        C, Ab, _ = self._dense(rate) if system is None else system
        return dense_state_response(C, Ab, state.to(Ab.dtype), L, first_power=first_power).to(self.real_dtype)

    def next_state(self, u: torch.Tensor, state: torch.Tensor, rate: float = 1.0,
                   lengths: torch.Tensor | None = None, *, system=None) -> torch.Tensor:
        """State after the last (real) step of u (B, H, L): (B, H, N) (`ssm.fftconv`), in complex128."""
        _, Ab, Bb = self._dense(rate) if system is None else system
        s = dense_next_state(u.double(), Ab, Bb, state.to(Ab.dtype), lengths)
        return s.to(self.complex_dtype)
