"""Tests of the selective scan (`kernels.selective_scan`): the chunked path against the sequential
definition run in float64 (forward, last state and every input gradient), float32 within the error
budget, gradcheck, compile, and bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

import kernels.selective_scan.reference as reference
from kernels.selective_scan import selective_scan, selective_scan_fn, selective_scan_ref
from tests.utils import assert_close, assert_within_budget

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, dim, N, L, *, groups=1, invariant=False, dtype=torch.float64, with_d=True, with_z=True,
                with_bias=True, with_state=True, dt_scale=1.0):
    """Mamba-like inputs: A = -(n + 1) jittered, dt = softplus(delta + bias) around 1e-3 .. 1e-1 (times dt_scale)."""
    g = torch.Generator().manual_seed(batch * 1000 + dim * 100 + N * 10 + L)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    dt0 = torch.exp(torch.rand(dim, generator=g, dtype=torch.float64) * math.log(100) + math.log(1e-3)) * dt_scale
    A = -(torch.arange(1, N + 1, dtype=torch.float64) * (1 + 0.1 * r(dim, N).abs()))      # (D, N)
    BC_shape = (dim, N) if invariant else (batch, groups, N, L)
    inputs = {"u": r(batch, dim, L), "delta": 0.3 * r(batch, dim, L), "A": A, "B": r(*BC_shape), "C": r(*BC_shape),
              "D": r(dim) if with_d else None, "z": r(batch, dim, L) if with_z else None,
              "delta_bias": torch.log(torch.expm1(dt0)) if with_bias else None,
              "initial_state": r(batch, dim, N) if with_state else None}
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def run(fn, inputs, g_y, g_last):
    """fn's y, last state and the gradients of <y, g_y> + <last, g_last> w.r.t. every given input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    kw = {k: leaves.get(k) for k in NAMES}
    y, last = fn(**kw)
    grads = torch.autograd.grad((y * g_y.to(y.dtype)).sum() + (last * g_last.to(last.dtype)).sum(), list(leaves.values()))
    return y.detach(), last.detach(), dict(zip(leaves, grads))


def ref_fn(**kw):
    return selective_scan_ref(**kw, delta_softplus=True, return_last_state=True)


def fast_fn(**kw):
    return selective_scan(**kw, delta_softplus=True, return_last_state=True, backend="torch")


def check_float64(inputs, name):
    batch, dim, L = inputs["u"].shape
    N = inputs["A"].shape[1]
    g_y, g_last = torch.randn(batch, dim, L, dtype=torch.float64), torch.randn(batch, dim, N, dtype=torch.float64)
    truth, fast = run(ref_fn, inputs, g_y, g_last), run(fast_fn, inputs, g_y, g_last)
    assert_close(fast[0], truth[0], name=f"{name} y")
    assert_close(fast[1], truth[1], name=f"{name} last state")
    assert set(fast[2]) == set(truth[2])
    for k in truth[2]:
        assert_close(fast[2][k], truth[2][k], name=f"{name} grad {k}")


@pytest.mark.parametrize("L", [1, 7, 16, 37, 64])
@pytest.mark.parametrize("N", [1, 16])
def test_chunked_matches_definition(L, N, monkeypatch):
    # CHUNK = 16: L = 7 is shorter than a chunk, 37 is ragged, 64 spans several chunks.
    monkeypatch.setattr(reference, "CHUNK", 16)
    check_float64(make_inputs(2, 4, N, L, groups=2), f"L={L} N={N}")


def test_large_state():
    check_float64(make_inputs(1, 2, 128, 9), "N=128")


@pytest.mark.parametrize("opts", [dict(with_d=False, with_z=False, with_bias=False, with_state=False),
                                  dict(with_z=False), dict(with_state=False), dict(invariant=True),
                                  dict(groups=3), dict(invariant=True, with_z=False, with_bias=False)])
def test_optional_inputs(opts, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 8)
    check_float64(make_inputs(2, 6, 3, 21, **opts), str(opts))


def test_one_group_three_dim_bc():
    x = make_inputs(2, 4, 3, 10)
    y1 = selective_scan(**x, delta_softplus=True, backend="torch")
    y2 = selective_scan(**{**x, "B": x["B"][:, 0], "C": x["C"][:, 0]}, delta_softplus=True, backend="torch")
    assert_close(y2, y1, name="(b, N, L) == (b, 1, N, L)")


@pytest.mark.parametrize("dt_scale", [30.0, 1e3])
def test_fast_decay_small_chunks(dt_scale, monkeypatch):
    # Large dt * A: the chunk length shrinks (and the decay floor engages at 1e3) so no factor overflows.
    monkeypatch.setattr(reference, "CHUNK", 16)
    check_float64(make_inputs(2, 4, 8, 40, dt_scale=dt_scale), f"dt x{dt_scale:g}")


def test_sub_chunk_length():
    dt = torch.full((1, 2, 5), 0.1)
    assert reference._sub_chunk(dt, -torch.ones(2, 3)) == (reference.CHUNK, False)
    assert reference._sub_chunk(dt * 100, -torch.ones(2, 3))[0] == 8         # step 10: 10 * (8/2 + 1) <= 60
    assert reference._sub_chunk(dt * 1e4, -torch.ones(2, 3)) == (2, True)     # floored at 30


@pytest.mark.parametrize("invariant", [False, True])
def test_float32_within_budget(invariant):
    x64 = make_inputs(2, 8, 16, 300, groups=2, invariant=invariant)
    x32 = {k: None if v is None else v.float() for k, v in x64.items()}
    g_y, g_last = torch.randn(2, 8, 300, dtype=torch.float64), torch.randn(2, 8, 16, dtype=torch.float64)
    truth, plain, fast = run(ref_fn, x64, g_y, g_last), run(ref_fn, x32, g_y, g_last), run(fast_fn, x32, g_y, g_last)
    assert fast[0].dtype == torch.float32
    assert_within_budget(fast[0], plain[0], truth[0], name="y")
    assert_within_budget(fast[1], plain[1], truth[1], name="last state")
    for k in truth[2]:
        assert_within_budget(fast[2][k], plain[2][k], truth[2][k], name=f"grad {k}")


def test_gradcheck(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 4)
    x = make_inputs(1, 2, 2, 9, groups=2)
    leaves = tuple(x[k].requires_grad_() for k in NAMES)

    def f(*args):
        y, last = selective_scan(*args[:7], delta_bias=args[7], initial_state=args[8], delta_softplus=True,
                                 return_last_state=True, backend="torch")
        return y, last

    assert torch.autograd.gradcheck(f, leaves)


def test_name_alias_and_half_input():
    assert selective_scan_fn is selective_scan
    x = make_inputs(1, 4, 3, 5, dtype=torch.float32)
    y = selective_scan(x["u"].to(torch.bfloat16), x["delta"], x["A"], x["B"], x["C"], backend="torch")
    assert y.dtype == torch.bfloat16


def test_bad_inputs():
    x = make_inputs(2, 4, 3, 5)
    with pytest.raises(ValueError, match="delta must have shape"):
        selective_scan(x["u"], x["delta"][:, :, :4], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][:, :, :2], x["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan(x["u"], x["delta"], x["A"], torch.randn(2, 3, 3, 5, dtype=torch.float64), x["C"])
    with pytest.raises(TypeError, match="u is complex"):
        selective_scan(x["u"].to(torch.complex128), x["delta"], x["A"], x["B"], x["C"])
    with pytest.raises(ValueError, match="initial_state must have shape"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], initial_state=torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="A must be"):
        selective_scan(x["u"], x["delta"], x["A"][:3], x["B"], x["C"])
    with pytest.raises(ValueError, match="backend"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="cuda")


def test_chunked_memory_is_one_chunk(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        max_numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.max_numel = max(self.max_numel, t.numel())
            return out

    x = make_inputs(1, 8, 16, 512, dtype=torch.float32)
    leaves = {k: v.requires_grad_() for k, v in x.items() if v is not None}
    with MaxNumel() as mode:
        y = selective_scan(**leaves, delta_softplus=True, backend="torch")
        y.sum().backward()
    assert mode.max_numel <= 8 * 16 * reference.CHUNK * 2, mode.max_numel   # one chunk (b, 64, D, N), not (b, L, D, N)


def test_torch_compile_fullgraph():
    x = make_inputs(1, 4, 3, 6, dtype=torch.float32)

    def loss(u, delta, A, B, C):
        return selective_scan(u, delta, A, B, C, delta_softplus=True, backend="torch").square().sum()

    args = [x[k].requires_grad_() for k in ("u", "delta", "A", "B", "C")]
    eager = torch.autograd.grad(loss(*args), args)
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    traced = torch.autograd.grad(compiled(*args), args)
    for k, a, b in zip("u delta A B C".split(), traced, eager):
        assert_close(a, b, name=f"compiled grad {k}")


def test_opcheck():
    x = make_inputs(1, 4, 3, 6, dtype=torch.float32)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], x["initial_state"], True, "torch")
    torch.library.opcheck(torch.ops.ssmkit.selective_scan.default, args)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("q", [3, 20])
def test_step_by_step_cumsum_equals_torch_cumsum(q, reverse):
    # Both branches of the chunked path's cumulative sum (short chunks: torch.cumsum; long: adds).
    t = torch.randn(2, q, 1, 3, 4, dtype=torch.float64)
    want = torch.cumsum(t.flip(1), 1).flip(1) if reverse else torch.cumsum(t, 1)
    got = reference._cumsum_steps_(t.clone(), reverse=reverse)
    assert_close(got, want)
