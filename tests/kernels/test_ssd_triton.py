"""Tests of the Triton kernels of the Mamba-2 scan (`kernels/ssd/triton_ssd.py`), under the interpreter.

Two levels, each against an independent float64 computation with autograd for the gradients:
- the generic scan core `scan_core_fwd_triton` / `scan_core_bwd_triton` against the plain
  recurrence S_t = exp(a_t) S_{t-1} + u_t B_t^T, y_t = S_t C_t written out below;
- the public `ssd(..., backend="triton")` against `ssd_ref`.
"""
from __future__ import annotations

import pytest
import torch

import kernels._triton as kt
import kernels.ssd.triton_ssd as triton_ssd_module
from kernels.ssd import ssd
from kernels.ssd.triton_ssd import scan_core_bwd_triton, scan_core_fwd_triton
from tests.kernels.test_ssd import compare, make_inputs, run, sequential
from tests.utils import assert_close, assert_within_budget


def recurrence(u, a, B, C, S0, doc):
    """The scan one token at a time: u (b, L, H, P), a (b, L, H), B, C (b, L, G, N), S0 (b, H, P, N)."""
    H, G = u.shape[2], B.shape[2]
    Bh, Ch = B.repeat_interleave(H // G, 2), C.repeat_interleave(H // G, 2)       # (b, L, H, N)
    S, ys = S0, []
    for t in range(u.shape[1]):
        if doc is not None and t > 0:
            S = S * (doc[:, t] == doc[:, t - 1]).to(u.dtype)[:, None, None, None]  # (b, H, P, N)
        S = torch.exp(a[:, t])[..., None, None] * S + u[:, t, :, :, None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", S, Ch[:, t]))                    # (b, H, P)
    return torch.stack(ys, 1), S


def core_inputs(b, L, H, P, G, N, *, docs, dtype=torch.float64):
    t = {"u": torch.randn(b, L, H, P), "a": -torch.rand(b, L, H) * 2, "B": torch.randn(b, L, G, N),
         "C": torch.randn(b, L, G, N), "S0": torch.randn(b, H, P, N)}
    t = {k: v.to(dtype) for k, v in t.items()}
    doc = torch.sort(torch.randint(0, docs, (b, L)), dim=1).values if docs > 1 else None
    return t, doc


def core_truth(t, doc):
    leaves = [v.clone().requires_grad_() for v in t.values()]
    y, S = recurrence(*leaves, doc)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(y.shape, generator=g, dtype=y.dtype)
    dS = torch.randn(S.shape, generator=g, dtype=S.dtype)
    grads = torch.autograd.grad((y * dy).sum() + (S * dS).sum(), leaves)
    return (y.detach(), S.detach(), grads), (dy, dS)


def core_triton(t, doc, dy, dS, Q):
    y, final, saved = scan_core_fwd_triton(t["u"], t["a"], t["B"], t["C"], t["S0"], doc, Q)
    grads = scan_core_bwd_triton(dy, dS, saved, t["u"], t["a"], t["B"], t["C"], t["S0"], doc, Q)
    return y, final, grads


@pytest.mark.parametrize("b,L,H,P,G,N,Q,docs", [
    (1, 1, 2, 3, 1, 4, 64, 1),      # one token
    (1, 37, 4, 3, 2, 5, 16, 3),     # odd L, ragged last chunk, two groups, documents
    (1, 20, 3, 40, 3, 16, 32, 1),   # G == H (per-head B, C), two blocks of P
    (1, 33, 2, 2, 1, 1, 16, 4),     # N = 1
])
def test_core_matches_recurrence(b, L, H, P, G, N, Q, docs):
    t, doc = core_inputs(b, L, H, P, G, N, docs=docs)
    (y, S, grads), (dy, dS) = core_truth(t, doc)
    y2, S2, grads2 = core_triton(t, doc, dy, dS, Q)
    assert_close(y2, y, name="y")
    assert_close(S2, S, name="final state")
    for name, a, e in zip(("du", "dlogdecay", "dB", "dC", "dS0"), grads2, grads):
        assert_close(a, e, name=name)


def test_core_with_gpu_tiles(monkeypatch):
    # The tiles a GPU uses (16 tokens, 16 columns of the state): several blocks of N, the last one
    # ragged, and the partial sums over them; one state saved per 32 tokens, so the backward
    # recomputes the ones in between (two segments, the last one short).
    monkeypatch.setattr(triton_ssd_module, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(triton_ssd_module, "MAX_BLOCK_N", 16)
    t, doc = core_inputs(1, 45, 2, 3, 1, 40, docs=3)
    (y, S, grads), (dy, dS) = core_truth(t, doc)
    y2, S2, grads2 = core_triton(t, doc, dy, dS, 32)
    assert_close(y2, y, name="y")
    assert_close(S2, S, name="final state")
    for name, a, e in zip(("du", "dlogdecay", "dB", "dC", "dS0"), grads2, grads):
        assert_close(a, e, name=name)


def test_core_without_initial_state_and_recomputed_saved():
    t, doc = core_inputs(1, 19, 2, 3, 1, 6, docs=2)
    (y, S, grads), (dy, dS) = core_truth({**t, "S0": torch.zeros_like(t["S0"])}, doc)
    y2, S2, _ = scan_core_fwd_triton(t["u"], t["a"], t["B"], t["C"], None, doc, 16)
    assert_close(y2, y, name="y")
    assert_close(S2, S, name="final state")
    grads2 = scan_core_bwd_triton(dy, dS, None, t["u"], t["a"], t["B"], t["C"], None, doc, 16)
    for name, a, e in zip(("du", "dlogdecay", "dB", "dC", "dS0"), grads2, grads):
        assert_close(a, e, name=name)


def triton_ssd(t, **kw):
    return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], kw.pop("chunk_size"), D=t["D"], z=t["z"],
               dt_bias=t["dt_bias"], initial_states=t["initial_states"], return_final_states=True,
               backend="triton", **kw)


@pytest.mark.parametrize("b,L,H,P,G,N,Q,init", [
    (1, 1, 2, 3, 1, 4, 8, True),       # one token
    (2, 17, 4, 3, 2, 5, 16, False),    # odd L, two groups, no initial state
    (1, 5, 2, 2, 1, 16, 64, True),     # L < chunk_size
    (1, 40, 2, 4, 1, 1, 16, True),     # N = 1, L not a multiple of the chunk
    (1, 6, 2, 2, 2, 64, 4, False),     # N = 64, one head per group
])
def test_ssd_triton_matches_reference(b, L, H, P, G, N, Q, init):
    t = make_inputs(b, L, H, P, G, N, init=init)
    kw = dict(dt_softplus=True)
    compare(run(triton_ssd, t, chunk_size=Q, **kw), run(sequential, t, **kw), f"L={L} N={N} G={G} Q={Q}")


def test_ssd_triton_seq_idx():
    t = make_inputs(2, 21, 2, 3, 1, 4, D_shape="hp")
    seq_idx = torch.tensor([[0] * 3 + [1] * 2 + [2] * 16, [5] * 17 + [0] * 4])
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    compare(run(triton_ssd, t, chunk_size=16, **kw), run(sequential, t, **kw), "packed")


def test_ssd_triton_float32_within_budget():
    t = make_inputs(1, 72, 4, 8, 2, 16)
    kw = dict(dt_softplus=True)
    truth = run(sequential, t, **kw)
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    fast, plain = run(triton_ssd, t32, chunk_size=32, **kw), run(sequential, t32, **kw)
    assert fast[0].dtype == torch.float32
    assert_within_budget(fast[0], plain[0], truth[0], name="y")
    assert_within_budget(fast[1], plain[1], truth[1], name="final state")
    for k in truth[2]:
        assert_within_budget(fast[2][k], plain[2][k], truth[2][k], name=f"grad {k}")


def test_poisoned_outputs_are_all_written(monkeypatch):
    monkeypatch.setattr(kt, "POISON_OUTPUTS", True)
    assert torch.isnan(kt.empty_output((2,), dtype=torch.float64, device="cpu")).all()
    t, doc = core_inputs(1, 18, 2, 20, 2, 3, docs=2)
    (y, S, grads), (dy, dS) = core_truth(t, doc)
    y2, S2, grads2 = core_triton(t, doc, dy, dS, 16)
    for name, a, e in zip(("y", "final", "du", "dlogdecay", "dB", "dC", "dS0"), (y2, S2, *grads2), (y, S, *grads)):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, name=name)
    m = make_inputs(1, 7, 2, 3, 1, 4)
    compare(run(triton_ssd, m, chunk_size=4), run(sequential, m), "ssd poisoned")
    # The GPU's tiles: several blocks of N and the recomputed states between the saved ones.
    monkeypatch.setattr(triton_ssd_module, "MAX_BLOCK_T", 16)
    monkeypatch.setattr(triton_ssd_module, "MAX_BLOCK_N", 16)
    t, doc = core_inputs(1, 40, 2, 3, 1, 20, docs=2)
    (y, S, grads), (dy, dS) = core_truth(t, doc)
    y2, S2, grads2 = core_triton(t, doc, dy, dS, 32)
    for name, a, e in zip(("y", "final", "du", "dlogdecay", "dB", "dC", "dS0"), (y2, S2, *grads2), (y, S, *grads)):
        assert_close(a, e, name=f"{name} (GPU tiles)")


def test_backward_is_deterministic():
    t, doc = core_inputs(1, 24, 2, 20, 2, 5, docs=2, dtype=torch.float32)
    dy, dS = torch.randn_like(t["u"]), torch.randn_like(t["S0"])
    first, second = (core_triton(t, doc, dy, dS, 16)[2] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_opcheck_triton():
    t = make_inputs(1, 6, 2, 2, 1, 3, dtype=torch.float32)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    torch.library.opcheck(torch.ops.ssmkit.ssd.default,
                          (t["x"], t["dt"].abs(), t["A"], t["B"], t["C"], t["initial_states"], doc, 4, "triton"))


@pytest.mark.slow
@pytest.mark.parametrize("N", [128])
def test_ssd_triton_wide_state(N):
    t = make_inputs(1, 70, 2, 8, 1, N)
    kw = dict(dt_softplus=True)
    compare(run(triton_ssd, t, chunk_size=64, **kw), run(sequential, t, **kw), f"N={N}")
