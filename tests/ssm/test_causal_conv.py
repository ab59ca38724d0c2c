"""The channels-last causal conv + SiLU (hand-written backward) against a float64 loop over taps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssm.layers.causal_conv import causal_conv_silu
from tests.utils import assert_close


def loop_truth(x, w, b, state, seq_idx):
    """y[:, t] = silu(b + sum_k w[:, k] u[t - (W-1-k)]) with u = carried inputs then x, a tap dropped
    when it reaches before t's document start (documents after the first never read the state)."""
    Bsz, L, C = x.shape
    W = w.shape[1]
    prev = torch.zeros(Bsz, W - 1, C, dtype=x.dtype) if state is None else state[..., 1:].transpose(1, 2)
    u = torch.cat([prev, x], 1)                                        # (B, W-1+L, C)
    rows = []
    for i in range(Bsz):
        start = 0
        outs = []
        for t in range(L):
            if seq_idx is not None and t > 0 and seq_idx[i, t] != seq_idx[i, t - 1]:
                start = t
            acc = torch.zeros(C, dtype=x.dtype) if b is None else b.clone()
            for k in range(W):
                src = t - (W - 1 - k)
                if src < 0 and (state is None or start > 0):
                    continue                                           # zero padding / other document
                if src >= 0 and src < start:
                    continue
                acc = acc + w[:, k] * u[i, src + W - 1]
            outs.append(F.silu(acc))
        rows.append(torch.stack(outs))
    return torch.stack(rows)                                           # (B, L, C)


CASES = [
    # (B, L, C, W, with state, packed, with bias)
    (2, 9, 5, 4, False, False, True),
    (1, 3, 4, 4, True, False, True),          # L < W with a carried state
    (2, 11, 3, 3, True, True, False),
    (2, 10, 6, 4, False, True, True),
    (1, 1, 2, 4, True, False, True),
]


@pytest.mark.parametrize("Bsz,L,C,W,with_state,packed,with_bias", CASES)
def test_forward_and_gradients_match_the_loop_float64(Bsz, L, C, W, with_state, packed, with_bias):
    g = torch.Generator().manual_seed(L * 31 + C)
    x = torch.randn(Bsz, L, C, dtype=torch.float64, generator=g)
    w = torch.randn(C, W, dtype=torch.float64, generator=g)
    b = torch.randn(C, dtype=torch.float64, generator=g) if with_bias else None
    state = torch.randn(Bsz, C, W, dtype=torch.float64, generator=g) if with_state else None
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(Bsz, L, dtype=torch.long)
        seq_idx[:, L // 3:] = 1
        seq_idx[-1, L // 3 + 2:] = 2
    inputs = [t for t in (x, w, b, state) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    out = causal_conv_silu(x, w, b, state, seq_idx)
    ref = loop_truth(x, w, b, state, seq_idx)
    assert_close(out, ref, rtol=1e-12, atol=1e-13)
    gout = torch.randn_like(ref)
    got = torch.autograd.grad(out, inputs, gout)
    want = torch.autograd.grad(ref, inputs, gout)
    for name, a, e in zip(("x", "weight", "bias", "state"), got, want):
        assert_close(a, e, rtol=1e-11, atol=1e-12, name=name)
    # the state's first column is never read: its gradient is exactly zero
    if state is not None:
        assert torch.all(got[-1][..., 0] == 0)


def test_strided_input_and_float32_match_the_conv1d_path():
    """A column slice of a wider tensor (as the layer passes it) in float32, against F.conv1d."""
    torch.manual_seed(0)
    wide = torch.randn(2, 64, 40)
    x = wide[..., 3:35]                                                # (2, 64, 32), row stride 40
    conv = torch.nn.Conv1d(32, 32, 4, groups=32, padding=3)
    ref = F.silu(conv(x.transpose(1, 2))[..., :64]).transpose(1, 2)
    out = causal_conv_silu(x, conv.weight[:, 0], conv.bias)
    assert_close(out, ref, rtol=1e-5, atol=1e-6)
