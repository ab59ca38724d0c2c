"""`kernels.selective_scan` with packed documents (`seq_idx`): the chunked path and the sequential
definition against separate runs of each document (float64, forward, last state and every input
gradient), resets at and inside chunk borders, the floored-decay path, and bad `seq_idx`."""
from __future__ import annotations

import pytest
import torch

import kernels.selective_scan.reference as reference
from kernels.selective_scan import selective_scan, selective_scan_ref
from tests.kernels.test_selective_scan import NAMES, make_inputs
from tests.utils import assert_close

PER_TOKEN = ("u", "delta", "z")


def labels(lengths, batch=1):
    row = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))   # (L,)
    return row.expand(batch, -1).clone()                                                  # (b, L)


def packed(fn, t, seq_idx, g_y, g_last):
    """y, last state and gradients of <y, g_y> + <last, g_last> for one packed call."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items() if v is not None}
    y, last = fn(**{k: leaves.get(k) for k in NAMES}, seq_idx=seq_idx)
    grads = torch.autograd.grad((y * g_y).sum() + (last * g_last).sum(), list(leaves.values()))
    return y.detach(), last.detach(), dict(zip(leaves, grads))


def separate(fn, t, lengths, g_y, g_last):
    """The same numbers from one call per document (row 0 of a batch of equal rows): the initial
    state feeds the first document, the last state is the last document's."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items() if v is not None}
    loss, ys, start = 0.0, [], 0
    for i, n in enumerate(lengths):
        part = {}
        for k in NAMES:
            v = leaves.get(k)
            if v is not None and (k in PER_TOKEN or (k in ("B", "C") and v.dim() == 4)):
                v = v[..., start:start + n]
            part[k] = v
        if i > 0:
            part["initial_state"] = None
        y, last = fn(**part)
        ys.append(y)
        loss = loss + (y * g_y[..., start:start + n]).sum()
        start += n
    loss = loss + (last * g_last).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return torch.cat(ys, -1).detach(), last.detach(), dict(zip(leaves, grads))


def ref_fn(**kw):
    return selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)


def fast_fn(**kw):
    return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="torch")


def compare(a, b, name):
    assert_close(a[0], b[0], name=f"{name} y")
    assert_close(a[1], b[1], name=f"{name} last state")
    assert a[2].keys() == b[2].keys()
    for k in a[2]:
        assert_close(a[2][k], b[2][k], name=f"{name} grad {k}")


@pytest.mark.parametrize("lengths,chunk,options", [
    ([1, 2, 7, 1, 12, 3], 4, {}),                        # lengths 1, 2, odd, longer than a chunk
    ([5, 3, 8, 1], 4, dict(groups=2)),                   # a reset on a chunk border (position 8)
    ([9, 1, 1, 6], 8, dict(invariant=True)),              # time-invariant B, C
    ([3, 14], 64, dict(with_z=False, with_d=False, with_bias=False)),   # one chunk holds everything
    ([6, 2, 9], 4, dict(dt_scale=3000.0)),                # per-step decays below the floor
])
@pytest.mark.parametrize("fn", [ref_fn, fast_fn], ids=["reference", "chunked"])
def test_packed_equals_separate_runs(fn, lengths, chunk, options, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", chunk)
    L = sum(lengths)
    t = make_inputs(2, 4, 3, L, **options)
    g = torch.Generator().manual_seed(7)
    g_y = torch.randn(2, 4, L, generator=g, dtype=torch.float64)
    g_last = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    got = packed(fn, t, labels(lengths, 2), g_y, g_last)
    compare(got, separate(ref_fn, t, lengths, g_y, g_last), f"{fn.__name__} {lengths}")


def test_chunked_matches_reference_with_different_rows(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 8)
    L = 23
    t = make_inputs(2, 3, 4, L)
    seq_idx = torch.stack([labels([4, 1, 11, 7])[0], labels([16, 1, 1, 5])[0]])   # (2, L)
    g = torch.Generator().manual_seed(3)
    g_y, g_last = torch.randn(2, 3, L, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g,
                                                                                      dtype=torch.float64)
    compare(packed(fast_fn, t, seq_idx, g_y, g_last), packed(ref_fn, t, seq_idx, g_y, g_last), "rows")


def test_one_document_is_the_plain_scan():
    t = make_inputs(1, 3, 2, 9)
    plain = selective_scan(**{k: t[k] for k in NAMES}, delta_softplus=True, backend="torch")
    one = selective_scan(**{k: t[k] for k in NAMES}, delta_softplus=True, backend="torch",
                         seq_idx=torch.full((1, 9), 4))
    assert torch.equal(plain, one)


@pytest.mark.parametrize("bad,err,match", [
    (torch.zeros(1, 5), TypeError, "integer"),
    (torch.zeros(1, 4, dtype=torch.long), ValueError, r"shape \(1, 5\)"),
    ([0, 0, 0, 0, 0], TypeError, "torch.Tensor"),
])
def test_bad_seq_idx(bad, err, match):
    t = make_inputs(1, 2, 2, 5)
    with pytest.raises(err, match=match):
        selective_scan(**{k: t[k] for k in NAMES}, seq_idx=bad)
