"""`kernels.ssd` with packed documents (`seq_idx`): the sequential definition and the chunked path
against separate runs of each document, in float64, forward, final state and every input gradient
(documents of length 1, 2, odd and longer than a chunk; resets on and inside chunk borders)."""
from __future__ import annotations

import pytest
import torch

import kernels.ssd.chunked as chunked_path
from kernels.ssd import ssd, ssd_ref
from tests.kernels.test_ssd import make_inputs
from tests.utils import assert_close

PER_TOKEN = ("x", "dt", "B", "C", "z")


def labels(lengths, batch):
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))   # (L,)
    return row.expand(batch, -1).clone()                                                  # (b, L)


def chunked(t, **kw):
    return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 4, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
               initial_states=t["initial_states"], return_final_states=True, dt_softplus=True,
               backend="torch", **kw)


def sequential(t, **kw):
    return ssd_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                   initial_states=t["initial_states"], dt_softplus=True, **kw)


def _grads(t, loss):
    leaves = [v for v in t.values() if v is not None]
    return dict(zip([k for k, v in t.items() if v is not None], torch.autograd.grad(loss, leaves)))


def packed(fn, t, seq_idx, gy, gs):
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in t.items()}
    y, final = fn(leaves, seq_idx=seq_idx)
    return y.detach(), final.detach(), _grads(leaves, (y * gy).sum() + (final * gs).sum())


def separate(t, lengths, gy, gs):
    """One sequential run per document; the initial state feeds the first one only."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_() for k, v in t.items()}
    loss, ys, start = 0.0, [], 0
    for i, n in enumerate(lengths):
        part = {k: v[:, start:start + n] if k in PER_TOKEN and v is not None else v for k, v in leaves.items()}
        if i > 0:
            part["initial_states"] = None
        y, final = sequential(part)
        ys.append(y)
        loss = loss + (y * gy[:, start:start + n]).sum()
        start += n
    loss = loss + (final * gs).sum()
    return torch.cat(ys, 1).detach(), final.detach(), _grads(leaves, loss)


@pytest.mark.parametrize("lengths", [[1, 2, 7, 1, 9], [4, 4, 3], [2, 13]])
@pytest.mark.parametrize("fn,budget", [(sequential, None), (chunked, None), (chunked, 1)],
                         ids=["reference", "chunked", "chunked-one-chunk-per-block"])
def test_packed_equals_separate_runs(fn, lengths, budget, monkeypatch):
    if budget is not None:
        monkeypatch.setattr(chunked_path, "BLOCK_ELEMENTS", budget)
        monkeypatch.setattr(chunked_path, "MIN_ROWS", 1)
    L = sum(lengths)
    t = make_inputs(2, L, 2, 3, 1, 4)
    g = torch.Generator().manual_seed(5)
    gy = torch.randn(2, L, 2, 3, generator=g, dtype=torch.float64)
    gs = torch.randn(2, 2, 3, 4, generator=g, dtype=torch.float64)
    got = packed(fn, t, labels(lengths, 2), gy, gs)
    want = separate(t, lengths, gy, gs)
    for name, a, b in (("y", got[0], want[0]), ("final state", got[1], want[1])):
        assert_close(a, b, name=f"{fn.__name__} {lengths} {name}")
    assert got[2].keys() == want[2].keys()
    for k in want[2]:
        assert_close(got[2][k], want[2][k], name=f"{fn.__name__} {lengths} grad {k}")
