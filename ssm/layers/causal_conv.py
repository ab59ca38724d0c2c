"""Causal depthwise convolution + SiLU on channels-last input, with a hand-written backward.

`causal_conv_silu(x, weight, bias, conv_state, seq_idx)`: x (B, L, C) -> silu(conv(x)) (B, L, C),
the same function as `ssm.layers.mamba.causal_conv` on the transposed input, computed as W shifted
multiply-adds along L instead of `F.conv1d` on (B, C, L). On the CPU the depthwise `conv1d` and its
backward cost several times the work (the Mamba-2 layer's in_proj output is channels-last, so the
old path also paid two transposing copies and a SiLU backward on a strided tensor).

The backward keeps x (usually a view of the in_proj output, alive anyway), the small state, the
weights and the pre-activation (one (B, L, C) tensor; recomputing it cost more than its memory).
"""
from __future__ import annotations

import torch

from ssm.packing import positions


def tap_masks(seq_idx: torch.Tensor, W: int, with_state: bool, dtype: torch.dtype) -> torch.Tensor:
    """(W, B, L, 1) multipliers: tap `back` (reading u_{t-back}) counts at t when it stays inside
    t's document (the first document may also reach into the carried state)."""
    pos = positions(seq_idx)                                           # (B, L)
    first = seq_idx == seq_idx[:, :1]                                  # (B, L)
    masks = [((pos >= back) | first) if with_state else (pos >= back) for back in range(W)]
    return torch.stack(masks).to(dtype).unsqueeze(-1)                 # (W, B, L, 1)


def _window(x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """The inputs the taps read: x itself (offset 0: taps before t = 0 read zeros) or the carried
    W-1 inputs followed by x (offset W-1)."""
    if state is None:
        return x, 0
    prev = state[..., 1:].transpose(1, 2).to(x.dtype)                 # (B, W-1, C)
    return torch.cat([prev, x], dim=1), prev.shape[1]                 # (B, W-1+L, C)


def _taps(L: int, W: int, off: int):
    """(k, back, out slice start lo, window slice) for every tap that reads something."""
    for back in range(W):
        lo = max(0, back - off)                                        # first t with t - back >= -off
        if lo < L:
            yield W - 1 - back, back, lo, slice(lo - back + off, L - back + off)


def _pre(window, off, L, weight, bias, masks):
    """conv(x) before the SiLU: (B, L, C). The tap at t itself (back = 0) covers every t and is
    never masked: it makes the output (with the bias) in one pass, the others are added to it."""
    W = weight.shape[1]
    taps = list(_taps(L, W, off))
    k, _, _, src = taps[0]
    w = weight[:, k].to(window.dtype)
    if bias is None:
        pre = torch.mul(window[:, src], w)                             # (B, L, C)
    else:
        pre = torch.addcmul(bias.to(window.dtype), window[:, src], w)  # (B, L, C)
    for k, back, lo, src in taps[1:]:
        w = weight[:, k].to(window.dtype)                              # (C,)
        if masks is None:
            pre[:, lo:].addcmul_(window[:, src], w)
        else:
            pre[:, lo:].addcmul_(window[:, src] * w, masks[back][:, lo:])
    return pre


class _CausalConvSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, state, masks):
        window, off = _window(x, state)
        pre = _pre(window, off, x.shape[1], weight, bias, masks)
        ctx.save_for_backward(x, weight, bias, state, masks, pre)
        return torch.nn.functional.silu(pre)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gout):
        x, weight, bias, state, masks, pre = ctx.saved_tensors
        L, W = x.shape[1], weight.shape[1]
        window, off = _window(x, state)
        g = torch.ops.aten.silu_backward(gout, pre)                     # (B, L, C): gout silu'(pre)
        need_dwin = ctx.needs_input_grad[0] or ctx.needs_input_grad[3]
        dwin = torch.zeros_like(window) if need_dwin and off else None
        dw = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        for k, back, lo, src in _taps(L, W, off):
            gk = g[:, lo:] if masks is None else g[:, lo:] * masks[back][:, lo:]   # (B, L - lo, C)
            if need_dwin and dwin is None:                             # back = 0 without a state: every t
                dwin = gk * weight[:, k].to(g.dtype)
            elif need_dwin:
                dwin[:, src].addcmul_(gk, weight[:, k].to(g.dtype))
            if dw is not None:
                dw[:, k] = (gk * window[:, src]).sum((0, 1)).to(dw.dtype)
        dbias = g.sum((0, 1)).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        dx = dstate = None
        if dwin is not None:
            dx = dwin[:, off:] if ctx.needs_input_grad[0] else None
            if state is not None and ctx.needs_input_grad[3]:
                dstate = torch.zeros_like(state)
                dstate[..., 1:] = dwin[:, :off].transpose(1, 2).to(state.dtype)
        return dx, dw, dbias, dstate, None


def causal_conv_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     conv_state: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """silu(causal depthwise conv) of x (B, L, C) with weight (C, W) (a Conv1d's weight[:, 0]),
    bias (C,) or None, continuing from conv_state (B, C, W) (its last W-1 columns are the inputs
    before x[:, 0]). With seq_idx (B, L) no tap reaches back past its token's document start (the
    first document may still reach into conv_state). Returns (B, L, C) contiguous."""
    W = weight.shape[1]
    masks = None if seq_idx is None else tap_masks(seq_idx, W, conv_state is not None, x.dtype)
    return _CausalConvSiLU.apply(x, weight, bias, conv_state, masks)
