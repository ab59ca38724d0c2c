"""The Mamba-3 scan core as custom ops (`kernels/mamba3/op.py`): values and every gradient against
float64 sequential references for both backends (torch; triton under the interpreter), the ops'
registration (opcheck), the dispatch, and `torch.compile(fullgraph=True)` of `mamba3_scan` and of
the `ssm.Mamba3` layer, forward and backward, with both ops opaque.

Ground truth: `mamba3_ref` / `mamba3_mimo_ref` (the step loop), and for the core alone the plain
recurrence written out below. Compiled tests use the "aot_eager" backend: it runs AOTAutograd
(the joint forward/backward trace where a custom op's backward must hold up) without inductor's
C++ compile, which takes minutes on a shared CPU.
"""
import logging
import warnings

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import kernels.mamba3.op as m3op
import kernels.ssd.chunked as ssd_chunked
from kernels.mamba3 import mamba3_mimo_ref, mamba3_ref, mamba3_scan
from kernels.mamba3.op import (
    mamba3_scan_core_backward_op,
    mamba3_scan_core_op,
    scan_core,
)
from tests.kernels.test_compile_warnings import _about_the_library
from tests.kernels.test_mamba3 import MIMO_NAMES, NAMES, _grads, inputs, mimo_inputs
from tests.utils import assert_close

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
STATE_NAMES = ("y", "ssm", "B_prev", "x_prev", "cos angle")
INIT_NAMES = ("angle0", "ssm0", "B_prev0", "x_prev0")


def _ssd_blocks(monkeypatch, budget):
    """The same block budget for the SSD chunked scan, which the SISO core runs on."""
    monkeypatch.setattr(ssd_chunked, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(ssd_chunked, "MIN_ROWS", 1)


def _compare(got, got_g, want, want_g, names):
    for name, a, e in zip(STATE_NAMES, got, want):
        assert_close(a, e, name=name)
    assert len(got_g) == len(want_g)
    for name, a, e in zip(names, got_g, want_g):
        assert_close(a, e, name=f"d{name}")


@pytest.mark.parametrize("L,Q,blocks", [(1, 8, False), (17, 4, False), (17, 4, True), (12, 64, False)])
@pytest.mark.parametrize("with_state", [False, True])
def test_siso_op_matches_sequential(L, Q, blocks, with_state, monkeypatch):
    """mamba3_scan (backend torch: the custom op) == mamba3_ref in float64, output, final state and
    every gradient; `blocks` lowers the block budget so the op runs several blocks of one chunk."""
    if blocks:
        monkeypatch.setattr(m3op, "BLOCK_ELEMENTS", 1)
        _ssd_blocks(monkeypatch, 1)  # SISO runs the SSD chunked scan
    kw, init = inputs(L=L, state=with_state, seed=L)
    want, want_g = _grads(mamba3_ref, kw, init)
    got, got_g = _grads(lambda **a: mamba3_scan(**a, chunk_size=Q, return_final_state=True, backend="torch"),
                        kw, init)
    _compare(got, got_g, want, want_g, NAMES + (INIT_NAMES if with_state else ()))


@pytest.mark.parametrize("L,Q,r", [(1, 4, 2), (13, 4, 3), (9, 16, 1)])
def test_mimo_op_matches_sequential(L, Q, r, monkeypatch):
    monkeypatch.setattr(m3op, "BLOCK_ELEMENTS", 2000)  # a few chunks per block
    _ssd_blocks(monkeypatch, 2000)  # SISO runs the SSD chunked scan
    kw, init = mimo_inputs(L=L, r=r, seed=L + r)
    want, want_g = _grads(mamba3_mimo_ref, kw, init)
    got, got_g = _grads(lambda **a: mamba3_scan(**a, chunk_size=Q, return_final_state=True, backend="torch"),
                        kw, init)
    _compare(got, got_g, want, want_g, MIMO_NAMES + INIT_NAMES)


@pytest.mark.parametrize("mimo", [False, True])
def test_packed_documents_through_the_op(mimo, monkeypatch):
    """seq_idx with boundaries inside a chunk, on a chunk edge and on a block edge (one chunk per block)."""
    monkeypatch.setattr(m3op, "BLOCK_ELEMENTS", 1)
    _ssd_blocks(monkeypatch, 1)  # SISO runs the SSD chunked scan
    kw, init = mimo_inputs(L=19, seed=13) if mimo else inputs(L=19, seed=13)
    ref = mamba3_mimo_ref if mimo else mamba3_ref
    seq = torch.tensor([[0] * 4 + [1] * 8 + [5] * 7, [2] * 3 + [3] * 16])
    want, want_g = _grads(lambda **a: ref(**a, seq_idx=seq), kw, init)
    got, got_g = _grads(lambda **a: mamba3_scan(**a, seq_idx=seq, chunk_size=4, return_final_state=True,
                                                backend="torch"), kw, init)
    _compare(got, got_g, want, want_g, (MIMO_NAMES if mimo else NAMES) + INIT_NAMES)


def core_sequential(u, ld, Bt, Ct, S0, doc):
    """S_t = exp(ld_t) S_{t-1} + sum_k u_{t,k} Bt_{t,k}^T (restarting from 0 where doc changes),
    y_{t,k} = S_t Ct_{t,k}; u (b, L, H, r, P), Bt, Ct (b, L, H, r, N)."""
    S, ys = S0, []
    for t in range(u.shape[1]):
        if doc is not None and t > 0:
            S = torch.where((doc[:, t] != doc[:, t - 1])[:, None, None, None], 0.0, S)
        S = torch.exp(ld[:, t])[..., None, None] * S + torch.einsum("bhkp,bhkn->bhpn", u[:, t], Bt[:, t])
        ys.append(torch.einsum("bhpn,bhkn->bhkp", S, Ct[:, t]))
    return torch.stack(ys, dim=1), S


def core_inputs(b=2, L=11, H=3, r=2, P=2, N=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, H, r, P, generator=g, dtype=F64), -2 * torch.rand(b, L, H, generator=g, dtype=F64),
            torch.randn(b, L, H, r, N, generator=g, dtype=F64), torch.randn(b, L, H, r, N, generator=g, dtype=F64),
            torch.randn(b, H, P, N, generator=g, dtype=F64))


def _core_grads(fn, args):
    args = [a.clone().requires_grad_() for a in args]
    y, S = fn(*args)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=F64)).sum() for o in (y, S))
    return [y, S, *torch.autograd.grad(loss, args)]


@pytest.mark.parametrize("L,Q,budget", [(1, 4, None), (11, 4, 1), (11, 3, 500), (11, 16, None)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("r", [1, 2])
def test_core_matches_plain_recurrence(L, Q, budget, packed, r, monkeypatch):
    """The core op alone (y, final, du, dlogdecay, dBt, dCt, dS0) == the plain recurrence, with ragged
    last chunks and blocks (budget: elements per block, None = the default); r = 1 runs on the SSD
    operator's chunked scan, r = 2 on this module's own path."""
    if budget is not None:
        monkeypatch.setattr(m3op, "BLOCK_ELEMENTS", budget)
        _ssd_blocks(monkeypatch, budget)  # SISO runs the SSD chunked scan
    args = core_inputs(L=L, r=r, seed=L + Q)
    doc = torch.stack([torch.arange(L) >= L // 2, torch.arange(L) >= 2]).long() * 3 if packed else None
    want = _core_grads(lambda *a: core_sequential(*a, doc), args)
    got = _core_grads(lambda *a: scan_core(*a, Q, doc), args)
    for name, a, e in zip(("y", "final", "du", "dlogdecay", "dBt", "dCt", "dS0"), got, want):
        assert_close(a, e, name=name)


# The fourth opcheck test, "test_aot_dispatch_dynamic", traces the op under AOTAutograd with
# dynamic shapes (10-20 s here): the slow set runs it, the compiled tests below cover AOTAutograd.
QUICK_OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("packed", [False, True])
def test_opcheck_and_gradcheck(packed):
    u, ld, Bt, Ct, S0 = core_inputs(b=1, L=5, H=2, r=2, P=2, N=3, seed=3)
    doc = torch.tensor([[0, 0, 1, 1, 1]]) if packed else None
    torch.library.opcheck(mamba3_scan_core_op, (u, ld, Bt, Ct, S0, doc, 2, "torch"), test_utils=QUICK_OPCHECK)
    args = [t.requires_grad_() for t in (u.clone(), ld.clone(), Bt.clone(), Ct.clone(), S0.clone())]
    assert torch.autograd.gradcheck(lambda *a: mamba3_scan_core_op(*a, doc, 2, "torch")[:2], args)
    with pytest.raises(ValueError, match="backend"):
        mamba3_scan_core_op(u, ld, Bt, Ct, S0, None, 2, "cuda")


@pytest.mark.slow
def test_opcheck_aot_dispatch_dynamic():
    u, ld, Bt, Ct, S0 = core_inputs(b=1, L=5, H=2, r=2, P=2, N=3, seed=3)
    torch.library.opcheck(mamba3_scan_core_op, (u, ld, Bt, Ct, S0, torch.tensor([[0, 0, 1, 1, 1]]), 2, "torch"))


class OpRecorder:
    """A compile backend: AOTAutograd (as "aot_eager") that records which ssmkit ops each graph calls."""

    def __init__(self):
        self.forward, self.backward = set(), set()

    def _record(self, into):
        def compiler(gm, example_inputs):
            into.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
            return make_boxed_func(gm.forward)
        return compiler

    def backend(self):
        return aot_autograd(fw_compiler=self._record(self.forward), bw_compiler=self._record(self.backward))


def _check_opaque(rec):
    assert "ssmkit.mamba3_scan_core.default" in rec.forward, sorted(rec.forward)
    assert "ssmkit.mamba3_scan_core_backward.default" in rec.backward, sorted(rec.backward)


def test_layer_compiles_fullgraph_forward_and_backward(caplog):
    """ssm.Mamba3 (SISO, streaming state) under torch.compile(fullgraph=True): a graph break raises.
    Output, next state and every parameter's gradient equal eager; both ops stay opaque; no warning
    about kernels/."""
    import ssm
    torch.manual_seed(0)
    layer = ssm.Mamba3(8, d_state=4, headdim=4, chunk_size=4, dtype=F64)
    x = torch.randn(2, 7, 8, dtype=F64)

    def run(fn):
        layer.zero_grad()
        y, st = fn(x, state=layer.default_state(2))
        (y.sin().sum() + st.ssm.square().sum()).backward()
        return [y, st.ssm] + [p.grad.clone() for p in layer.parameters()]

    want = run(layer)
    rec = OpRecorder()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="torch"):
        warnings.simplefilter("always")
        got = run(torch.compile(layer, backend=rec.backend(), fullgraph=True))
    for i, (a, e) in enumerate(zip(got, want)):
        assert_close(a, e, name=f"compiled output/gradient {i}")
    _check_opaque(rec)
    ours = [str(w.message) for w in caught if _about_the_library(w.filename, str(w.message))]
    ours += [r.getMessage() for r in caplog.records if _about_the_library(r.pathname, r.getMessage())]
    assert not ours, ours


@pytest.mark.slow  # four more compiles (30-60 s on a shared CPU)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mimo", [False, True])
def test_scan_compiles_fullgraph_with_packing(mimo, backend):
    """mamba3_scan with seq_idx and an initial state, compiled fullgraph: equals eager, both ops opaque."""
    kw, init = mimo_inputs(b=2, L=9, H=2, G=1, r=2, seed=15) if mimo else inputs(b=2, L=9, H=2, G=1, seed=15)
    seq = torch.tensor([[0] * 3 + [1] * 6, [4] * 9])

    def fn(**a):
        return mamba3_scan(**a, seq_idx=seq, chunk_size=4, return_final_state=True, backend=backend)

    want, want_g = _grads(fn, kw, init)
    rec = OpRecorder()
    got, got_g = _grads(torch.compile(fn, backend=rec.backend(), fullgraph=True), kw, init)
    _compare(got, got_g, want, want_g, (MIMO_NAMES if mimo else NAMES) + INIT_NAMES)
    _check_opaque(rec)


def test_unused_outputs_and_fresh_gradients():
    """A loss of y alone (final unused) and of the final state alone both differentiate; the
    backward op's outputs never alias its inputs (a custom op may not return an input)."""
    args = core_inputs(L=6, seed=9)
    for pick in (0, 1):
        leaves = [a.clone().requires_grad_() for a in args]
        out = scan_core(*leaves, 4)[pick]
        grads = torch.autograd.grad(out.sum(), leaves)
        want = core_sequential(*[a.clone().requires_grad_() for a in args], None)
        assert all(torch.isfinite(g).all() for g in grads)
        assert_close(out, want[pick], name=f"output {pick}")
    dy, dfinal = torch.ones(2, 6, 3, 2, 2, dtype=F64), torch.ones(2, 3, 2, 5, dtype=F64)
    _, _, saved = mamba3_scan_core_op(*args, None, 4, "torch")
    grads = mamba3_scan_core_backward_op(dy, dfinal, saved, *args, None, 4, "torch")
    assert all(g.data_ptr() not in (dy.data_ptr(), dfinal.data_ptr()) for g in grads)


# Backend "triton": the generic scan core of kernels/ssd/triton_ssd.py, under the interpreter on CPU.

@pytest.mark.parametrize("L,Q,r,packed", [(1, 4, 1, False), (11, 4, 1, True), (7, 16, 2, True)])
def test_triton_core_matches_plain_recurrence(L, Q, r, packed):
    """The op's Triton backend (rank r > 1 folded into 2r tokens per step) == the plain recurrence:
    y, final state and every gradient, float64."""
    args = core_inputs(L=L, r=r, H=2, seed=L + Q)
    doc = torch.stack([torch.arange(L) >= L // 2, torch.arange(L) >= 2]).long() * 3 if packed else None
    want = _core_grads(lambda *a: core_sequential(*a, doc), args)
    got = _core_grads(lambda *a: scan_core(*a, Q, doc, backend="triton"), args)
    for name, a, e in zip(("y", "final", "du", "dlogdecay", "dBt", "dCt", "dS0"), got, want):
        assert_close(a, e, name=name)


@pytest.mark.parametrize("mimo", [False, True])
def test_triton_scan_matches_sequential(mimo):
    """mamba3_scan(backend="triton") == mamba3_ref / mamba3_mimo_ref in float64, with an initial
    state and packed documents: output, final state and every gradient."""
    kw, init = mimo_inputs(b=2, L=6, H=2, G=1, r=2, seed=21) if mimo else inputs(b=2, L=6, H=2, G=1, seed=21)
    ref = mamba3_mimo_ref if mimo else mamba3_ref
    seq = torch.tensor([[0] * 2 + [1] * 4, [3] * 6])
    want, want_g = _grads(lambda **a: ref(**a, seq_idx=seq), kw, init)
    got, got_g = _grads(lambda **a: mamba3_scan(**a, seq_idx=seq, chunk_size=4, return_final_state=True,
                                                backend="triton"), kw, init)
    _compare(got, got_g, want, want_g, (MIMO_NAMES if mimo else NAMES) + INIT_NAMES)


def test_dispatch(monkeypatch):
    """"auto" keeps CPU tensors on the chunked path even under the interpreter; "triton" interprets
    them, or raises with the reason when Triton is disabled."""
    import kernels.mamba3 as m3
    seen = []
    real = m3.scan_core
    monkeypatch.setattr(m3, "scan_core", lambda *a, backend: seen.append(backend) or real(*a, backend=backend))
    kw, _ = inputs(b=1, L=3, H=2, G=1, seed=22)
    want = mamba3_ref(**kw)[0]
    for backend in ("auto", "torch", "triton"):
        assert_close(mamba3_scan(**kw, backend=backend), want, name=f"backend {backend}")
    assert seen == ["torch", "torch", "triton"]
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="SSMKIT_DISABLE_TRITON"):
        mamba3_scan(**kw, backend="triton")
