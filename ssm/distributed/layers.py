"""Sequence layers that run on one shard of a sequence split along L over ranks.

`context_parallel` (in `ssm.distributed`) turns a layer into one of the classes here by
changing its class in place (parameters, names and `state_dict` keys stay as they are, as
`torch.distributed.fsdp.fully_shard` does); `forward` then takes this rank's contiguous shard.

The math (docs/distributed.md, "State exchange"): a causal SSM's final state is affine in its
initial state, `final(h) = s_r + T_r h`, with `s_r` the shard's final state from a zero start and
`T_r` its transfer (Ab^{L_r} for an LTI system, the per-(batch, head) product of the decays for a
selective one). So the state entering rank r is `h_r = T_{r-1} h_{r-1} + s_{r-1}`, `h_0 = 0`.
Each rank computes `s_r` (and, for a selective layer, `sum dt` over its shard, which gives
`T_r`), all ranks all-gather them in one state-sized collective, each rank evaluates the
recurrence for the ranks before it, then runs its shard from `h_r` (S4: its convolution plus the
zero-input response of `h_r`; Mamba, Mamba-2: the layer's forward from `state=h_r`), which is
exact. LTI transfers are rebuilt on every rank from the parameters and the shard lengths, so
only states travel.
Mamba and Mamba-2 also need the previous shard's last `d_conv - 1` inputs for their causal
convolution; they travel in one more small collective before the state exchange.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.ssd.reference import effective_dt
from ssm import filters
from ssm.distributed.comm import all_gather_ints, all_gather_tensors, rank_and_size, tie
from ssm.fftconv import fftconv, no_autocast
from ssm.layers.mamba import Mamba, causal_conv
from ssm.layers.mamba2 import Mamba2
from ssm.layers.nn import keyword_only
from ssm.layers.s4 import S4
from ssm.layers.ssm_base import check_rate
from ssm.layers.ssm_diag import DiagSSM
from ssm.layers.ssm_dplr import DPLRSSM


def _refuse(state, lengths, seq_idx) -> None:
    for name, value, why in (
            ("state", state, "a sharded sequence starts from a zero state on rank 0"),
            ("lengths", lengths, "right padding would sit on the last rank only; pass whole sequences"),
            ("seq_idx", seq_idx, "packed documents crossing shard boundaries are not supported")):
        if value is not None:
            raise ValueError(f"{name} must be None under context parallelism ({why})")


def _check_x(x, d_model: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != d_model or 0 in x.shape[:2]:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be this rank's shard of shape (B, L_r, {d_model}) with B, L_r >= 1, got {got}")


def incoming_state(rows: list[list[torch.Tensor]], rank: int, transfer, zero: torch.Tensor) -> torch.Tensor:
    """h_rank from every rank's gathered row (row[0] = s_q): h <- T_q h + s_q for q < rank.

    `transfer(q, h)` applies T_q. The result depends on the gathered rows on every rank, rank 0
    included (see `tie`), so every rank runs the gather's backward.
    """
    h = zero + tie(rows[0])
    for q in range(rank):
        h = transfer(q, h) + rows[q][0]
    return h


def diag_final_state(u: torch.Tensor, log_z: torch.Tensor, Bb: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
    """S4D's state after u from a zero state, `sum_k z^(L-1-k) Bb u_k`: (B, H, N2) complex.

    u: (B, H, L) real; log_z, Bb: (H, N2) complex. Horner over chunks of T steps with one table
    of z^0..z^(T-1): O(H N T) exponentials in all (the state-passing path in `ssm.fftconv` takes
    one per step), and autograd keeps O(B H (L + N L / T)) values instead of O(H N L).
    """
    L = u.shape[-1]
    T = min(chunk, L)
    steps = torch.arange(T - 1, -1, -1, device=u.device, dtype=log_z.real.dtype)   # (T,)
    table = torch.exp(log_z.unsqueeze(-1) * steps)                       # (H, N2, T): z^(T-1-t)
    acc = torch.zeros(u.shape[0], *log_z.shape, dtype=log_z.dtype, device=u.device)   # (B, H, N2)
    for start in range(0, L, T):
        n = min(T, L - start)
        piece = u[..., start:start + n].to(log_z.dtype)                  # (B, H, n)
        acc = acc * torch.exp(log_z * n) + torch.einsum("bht,hnt->bhn", piece, table[..., T - n:])
    return Bb * acc                                                     # (B, H, N2)


def _s4_boundary(ssm, u: torch.Tensor, rate: float, sizes: list[int]):
    """(s_rank (B, H, n), transfer) for S4's two parameterizations: the diagonal S4D system with
    T_q = diag(z)^{L_q}, or the dense form of the DPLR system with T_q = Ab^{L_q} (complex128)."""
    if isinstance(ssm, DiagSSM):
        _, log_z, Bb = ssm.discrete(rate)                               # (H, N2) each
        return diag_final_state(u, log_z, Bb), lambda q, h: torch.exp(log_z * sizes[q]) * h
    if not isinstance(ssm, DPLRSSM):
        raise TypeError(f"context parallelism knows DiagSSM and DPLRSSM, got {type(ssm).__name__}")
    zero = ssm.default_state(u.shape[0], u.device)
    s = ssm.next_state(u, zero, rate).to(zero.dtype)                    # (B, H, N)
    Lam, P, B, _, dt = ssm.params()
    Ab, _ = filters.dplr_dense(Lam, P, B, dt * rate)                    # (H, N, N) complex128
    powers = {n: torch.linalg.matrix_power(Ab, n) for n in set(sizes)}  # at most two shard lengths
    return s, lambda q, h: torch.einsum("hnm,bhm->bhn", powers[sizes[q]], h.to(Ab.dtype))   # (B, H, N)


class ContextParallelS4(S4):
    """`ssm.S4` (S4D or S4, causal) on this rank's shard of a sequence split over `cp_group`."""

    cp_group = None

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state=None, lengths=None, rate: float | None = None, seq_idx=None):
        """x: this rank's shard (B, L_r, H) -> (y (B, L_r, H), None)."""
        _refuse(state, lengths, seq_idx)
        self._check_x(x, 3)                            # every check before the first collective
        if self.config.bidirectional:
            raise ValueError("context parallelism supports causal S4 layers only (bidirectional=True "
                             "would need a second, reverse-time state exchange)")
        if isinstance(self.ssm, DPLRSSM) and self.l_max is None:
            raise ValueError("mode='dplr' under context parallelism: set layer.l_max (model.set_l_max) to the "
                             "full sequence length first, so every rank uses the same learned Ct")
        rate = self.rate if rate is None else check_rate(rate)
        rank, _ = rank_and_size(self.cp_group)
        sizes = all_gather_ints(x.shape[1], self.cp_group, x.device)
        ssm, L = self.ssm, x.shape[1]
        with no_autocast(x.device.type):
            zero = ssm.default_state(x.shape[0], x.device)              # (B, H, n)
            u = x.transpose(1, 2).to(ssm.real_dtype)                    # (B, H, L_r)
            s, transfer = _s4_boundary(ssm, u, rate, sizes)             # s_rank (B, H, n)
            rows = all_gather_tensors([s], self.cp_group)
            h = incoming_state(rows, rank, transfer, zero)
            # S4.forward from state h, less the shard's final state, which nobody needs
            y = fftconv(u.unsqueeze(1), ssm.filter(L, rate), None, self.D, save_spectrum=self.save_spectrum)
            y = y + ssm.state_response(h.to(zero.dtype), L, rate).to(y.dtype)   # (B, c, H, L_r)
        return self._project(y), None


def _conv_state_in(layer, cls, x: torch.Tensor, rank: int, group, zero_state: tuple) -> torch.Tensor:
    """The convolution state entering this shard: the previous shard's last d_conv - 1 inputs
    run through the layer's own state passing (rank 0: zeros)."""
    k = layer.config.d_conv - 1
    conv0 = zero_state[0]
    if k == 0:
        return conv0
    tails = all_gather_tensors([x[:, x.shape[1] - k:]], group)          # (B, k, d_model) per rank
    if rank == 0:
        return conv0 + tie(tails[0])
    _, (conv_in, _) = cls.forward(layer, tails[rank - 1][0], state=zero_state)
    return conv_in                                                      # (B, C, d_conv)


def _check_shards(layer, sizes: list[int]) -> None:
    k = layer.config.d_conv - 1
    if min(sizes) < k:
        raise ValueError(f"every shard must have at least d_conv - 1 = {k} positions (the convolution "
                         f"reads that far back), got shard lengths {sizes}")


def _selective_forward(layer, cls, x: torch.Tensor, state, lengths, seq_idx):
    """The selective layers on a shard: run from a zero state for this shard's final state s_r,
    exchange (s_r, the shard's summed dt), then run again from the incoming state."""
    _refuse(state, lengths, seq_idx)
    _check_x(x, layer.d_model)
    rank, _ = rank_and_size(layer.cp_group)
    _check_shards(layer, all_gather_ints(x.shape[1], layer.cp_group, x.device))
    zero = layer.default_state(x.shape[0], x.device)
    conv_in = _conv_state_in(layer, cls, x, rank, layer.cp_group, zero)
    _, (_, s) = cls.forward(layer, x, state=(conv_in, zero[1]))       # this shard's final state from zero
    dt = layer._cp_dt(x, conv_in)                                    # (B, L_r, C): the shard's step sizes
    rows = all_gather_tensors([s, dt.sum(1)], layer.cp_group)        # s_q, sum dt_q (B, C) per rank
    h = incoming_state(rows, rank, lambda q, h: layer._cp_decay(rows[q][1], h), zero[1])
    y, _ = cls.forward(layer, x, state=(conv_in, h.to(zero[1].dtype)))
    return y, None


class ContextParallelMamba2(Mamba2):
    """`ssm.Mamba2` on this rank's shard of a sequence split over `cp_group`."""

    cp_group = None

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state=None, lengths=None, seq_idx=None):
        """x: this rank's shard (B, L_r, d_model) -> (y (B, L_r, d_model), None)."""
        return _selective_forward(self, Mamba2, x, state, lengths, seq_idx)

    def _cp_dt(self, x: torch.Tensor, conv_in: torch.Tensor) -> torch.Tensor:
        f, H = self._state_dtype(), self.nheads
        bias = None if self.in_proj.bias is None else self.in_proj.bias[-H:]
        dt_raw = F.linear(x, self.in_proj.weight[-H:], bias)            # (B, L_r, H): in_proj's last H outputs
        return effective_dt(dt_raw.to(f), self.dt_bias.to(f), True, tuple(self.config.dt_limit))

    def _cp_decay(self, dt_sum: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        A = -torch.exp(self.A_log.to(dt_sum.dtype))                     # (H,)
        return torch.exp(A * dt_sum)[..., None, None] * h               # h (B, H, P, N)


class ContextParallelMamba(Mamba):
    """`ssm.Mamba` on this rank's shard of a sequence split over `cp_group`."""

    cp_group = None

    @keyword_only("state", "lengths")
    def forward(self, x: torch.Tensor, *, state=None, lengths=None, seq_idx=None):
        """x: this rank's shard (B, L_r, d_model) -> (y (B, L_r, d_model), None)."""
        return _selective_forward(self, Mamba, x, state, lengths, seq_idx)

    def _cp_dt(self, x: torch.Tensor, conv_in: torch.Tensor) -> torch.Tensor:
        f, R = self._state_dtype(), self.dt_rank
        u = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)[0]          # (B, D, L_r)
        v = causal_conv(u, self.conv1d, conv_in)                        # (B, D, L_r)
        dt_raw = self.x_proj(v.transpose(1, 2))[..., :R]                # (B, L_r, R)
        return F.softplus(F.linear(dt_raw, self.dt_proj.weight).to(f) + self.dt_proj.bias.to(f))   # (B, L_r, D)

    def _cp_decay(self, dt_sum: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        A = -torch.exp(self.A_log.to(dt_sum.dtype))                     # (D, N)
        return torch.exp(A * dt_sum[..., None]) * h                     # h (B, D, N)


CONTEXT_PARALLEL = {S4: ContextParallelS4, Mamba2: ContextParallelMamba2, Mamba: ContextParallelMamba}
