"""Cauchy product (`kernels.cauchy_mult`): both backends against complex128 ground truth.

Triton runs under the interpreter here (tests/conftest.py), so its shapes stay small.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import kernels
import kernels._triton
import kernels.cauchy.reference as reference
from kernels.cauchy import cauchy_mult, cauchy_ref
from kernels.cauchy.reference import cauchy_chunked_bwd, cauchy_chunked_fwd
from tests.utils import assert_close, assert_within_budget


def make_inputs(R, H, N, M, *, dtype=torch.complex128, scale=1.0):
    """Stable poles (Re w < 0) and points near the imaginary axis, like S4's g(z) - Lambda."""
    v = torch.randn(R, H, N, dtype=torch.complex128)                                          # (R, H, N)
    w = torch.complex(-0.1 - torch.rand(H, N, dtype=torch.float64), 3 * torch.randn(H, N, dtype=torch.float64))
    z = torch.complex(0.1 * torch.randn(M, dtype=torch.float64), 3 * torch.randn(M, dtype=torch.float64))
    return v.to(dtype), (scale * z).to(dtype), (scale * w).to(dtype)


def value_and_grads(fn, v, z, w, g):
    """fn(v, z, w) and its gradients w.r.t. v, z, w for the upstream gradient g."""
    v, z, w = (t.detach().clone().requires_grad_() for t in (v, z, w))
    out = fn(v, z, w)
    return (out.detach(), *torch.autograd.grad(out, (v, z, w), g.to(out.dtype)))


def check_against_truth(fns, R, H, N, M, symmetric):
    """Each fn: complex64 within the error budget of the plain formula, complex128 to 1e-9."""
    v, z, w = make_inputs(R, H, N, M)
    g = torch.randn(R, H, M, dtype=torch.complex128)                                          # (R, H, M)
    plain = lambda a, b, c: cauchy_ref(a, b, c, symmetric)  # noqa: E731
    truth = value_and_grads(plain, v, z, w, g)
    lo = [t.to(torch.complex64) for t in (v, z, w)]
    ref32 = value_and_grads(plain, *lo, g)
    names = ("out", "grad_v", "grad_z", "grad_w")
    for fn in fns:
        for name, f, p, t in zip(names, value_and_grads(fn, *lo, g), ref32, truth):
            assert f.dtype == torch.complex64
            assert_within_budget(f, p, t, name=name)
        for name, e, t in zip(names, value_and_grads(fn, v, z, w, g), truth):
            assert e.dtype == torch.complex128
            assert_close(e, t, rtol=1e-9, atol=1e-10 * max(1.0, t.abs().max().item()), name=name)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("R", [1, 4])
@pytest.mark.parametrize("N", [1, 3, 32])
@pytest.mark.parametrize("M", [1, 17, 489])
def test_torch_backend_matches_truth(M, N, R, symmetric, monkeypatch):
    public = lambda v, z, w: cauchy_mult(v, z, w, symmetric=symmetric, backend="torch")  # noqa: E731
    check_against_truth([public], R, 5, N, M, symmetric)
    # Small tiles: 7 points (M = 17 and 489 leave a ragged last tile) and at most 64 reciprocals
    # (several tiles of rows, ragged for N = 1).
    monkeypatch.setattr(reference, "MAX_POINTS", 7)
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 64)
    check_against_truth([public], R, 5, N, M, symmetric)


# Interpreted Triton is slow: each size value and each flag appear, not their full product.
# N = 40 crosses the interpreter's pole block (32); M = 489 crosses its point block (128).
TRITON_CASES = [(1, 1, 1, False), (17, 3, 4, True), (489, 32, 4, True), (489, 3, 1, False),
                (17, 32, 1, False), (1, 3, 4, True), (17, 40, 4, True)]


@pytest.mark.parametrize("M,N,R,symmetric", TRITON_CASES)
def test_triton_backend_matches_truth(M, N, R, symmetric):
    fn = lambda v, z, w: cauchy_mult(v, z, w, symmetric=symmetric, backend="triton")  # noqa: E731
    check_against_truth([fn], R, 3, N, M, symmetric)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_triton_function(symmetric):
    # fast_mode checks random projections of the Jacobian: few interpreted launches.
    v, z, w = (t.requires_grad_() for t in make_inputs(2, 2, 3, 5))
    fn = lambda a, b, c: cauchy_mult(a, b, c, symmetric=symmetric, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, z, w), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck_chunked_function(symmetric, monkeypatch):
    monkeypatch.setattr(reference, "MAX_POINTS", 2)  # M = 5: tiles of 2, 2 and 1 points
    v, z, w = (t.requires_grad_() for t in make_inputs(2, 3, 3, 5))
    fn = lambda a, b, c: cauchy_mult(a, b, c, symmetric=symmetric, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (v, z, w), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_leading_numerator_dims_share_poles():
    v, z, w = make_inputs(4 * 2, 3, 5, 11)
    v = v.reshape(4, 2, 3, 5)                                                                 # (4, 2, H, N)
    w = w[:, :5].expand(2, 3, 5).clone()                                                      # (2, H, N)
    for backend in ("torch", "triton"):
        out = cauchy_mult(v, z, w, symmetric=True, backend=backend)
        assert out.shape == (4, 2, 3, 11)
        for r in range(4):
            assert_close(out[r], cauchy_ref(v[r], z, w, True), name=f"{backend} numerator {r}")


def test_poison_hook_fills_nan(monkeypatch):
    # Guards the next test: with the hook on, the launchers' buffers are NaN in both planes.
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    buf = kernels._triton.empty_output((3, 2), dtype=torch.complex64, device="cpu")
    assert torch.isnan(torch.view_as_real(buf)).all()


def test_triton_outputs_fully_overwritten(monkeypatch):
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    v, z, w = make_inputs(3, 3, 5, 150, dtype=torch.complex64)
    g = torch.randn(3, 3, 150, dtype=torch.complex64)
    fn = lambda a, b, c: cauchy_mult(a, b, c, symmetric=True, backend="triton")  # noqa: E731
    out, gv, gz, gw = value_and_grads(fn, v, z, w, g)
    assert_close(out, cauchy_chunked_fwd(v, z, w, True), rtol=1e-4, atol=1e-5, name="out")
    ev, ez, ew = cauchy_chunked_bwd(g, v, z, w, True, True)
    for name, a, e in (("grad_v", gv, ev), ("grad_z", gz, ez), ("grad_w", gw, ew)):
        assert_close(a, e, rtol=1e-4, atol=1e-4 * e.abs().max().item(), name=name)


def test_triton_backward_is_deterministic():
    v, z, w = make_inputs(4, 5, 3, 40, dtype=torch.complex64)
    g = torch.randn(4, 5, 40, dtype=torch.complex64)
    fn = lambda a, b, c: cauchy_mult(a, b, c, symmetric=True, backend="triton")  # noqa: E731
    first = value_and_grads(fn, v, z, w, g)[1:]
    second = value_and_grads(fn, v, z, w, g)[1:]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_but_valid_inputs(backend):
    # Poles 1e-4 away from points, a pole at |w| = 1e6, points at 0 and at |z| = 1e4.
    v, z, w = make_inputs(2, 2, 3, 20)
    z[0], z[1], z[2] = 0.0, w[0, 0] + 1e-4j, 1e4j
    w[1, 2] = complex(-1e6, 3e5)
    g = torch.randn(2, 2, 20, dtype=torch.complex128)
    plain = lambda a, b, c: cauchy_ref(a, b, c, True)  # noqa: E731
    fn = lambda a, b, c: cauchy_mult(a, b, c, symmetric=True, backend=backend)  # noqa: E731
    truth = value_and_grads(plain, v, z, w, g)
    lo = [t.to(torch.complex64) for t in (v, z, w)]
    for name, f, p, t in zip(("out", "grad_v", "grad_z", "grad_w"), value_and_grads(fn, *lo, g),
                             value_and_grads(plain, *lo, g), truth):
        assert torch.isfinite(torch.view_as_real(f)).all(), name
        assert_within_budget(f, p, t, name=name)


@pytest.mark.parametrize("dt", [1e-4, 1e-1])
def test_s4_frequencies_at_length_65536(dt):
    # S4: points g(z_j) = 2 (1 - z_j) / (1 + z_j) = -2i tan(pi j / L) for the L/2 + 1
    # non-negative frequencies (j = L/2, the pole of g, is left out), poles dt * Lambda.
    L, N = 65536, 4
    j = torch.arange(L // 2, dtype=torch.float64)
    z = torch.complex(torch.zeros_like(j), -2 * torch.tan(torch.pi * j / L))                 # (M,)
    n = torch.arange(N, dtype=torch.float64)
    w = (dt * torch.complex(-0.5 * torch.ones(2, N, dtype=torch.float64), torch.pi * n.expand(2, N)))  # (2, N)
    v = torch.randn(4, 2, N, dtype=torch.complex128)                                          # (4, 2, N)
    # Each point is independent (no phase grows with j), so interpreted Triton sees a subset
    # that keeps the extremes: every 64th point and the last 8 (|z| up to 5e4).
    subset = torch.cat([torch.arange(0, z.shape[0], 64), torch.arange(z.shape[0] - 8, z.shape[0])])
    for backend, zb in (("torch", z), ("triton", z[subset])):
        truth = cauchy_ref(v, zb, w, True)
        lo = [t.to(torch.complex64) for t in (v, zb, w)]
        out = cauchy_mult(*lo, symmetric=True, backend=backend)
        assert torch.isfinite(torch.view_as_real(out)).all()
        assert_within_budget(out, cauchy_ref(*lo, True), truth, name=f"{backend} out")
    lo = [t.to(torch.complex64) for t in (v, z, w)]
    g = torch.randn(4, 2, z.shape[0], dtype=torch.complex128)
    ref_grads = value_and_grads(lambda a, b, c: cauchy_ref(a, b, c, True), *lo, g)
    fast_grads = value_and_grads(lambda a, b, c: cauchy_mult(a, b, c, symmetric=True, backend="torch"), *lo, g)
    true_grads = value_and_grads(lambda a, b, c: cauchy_ref(a, b, c, True), v, z, w, g)
    for name, f, p, t in zip(("out", "grad_v", "grad_z", "grad_w"), fast_grads, ref_grads, true_grads):
        assert torch.isfinite(torch.view_as_real(f)).all(), name
        assert_within_budget(f, p, t, name=name)


def test_bad_inputs_raise():
    v, z, w = make_inputs(1, 2, 3, 4, dtype=torch.complex64)
    with pytest.raises(TypeError, match="v must be complex64 or complex128"):
        cauchy_mult(v.real, z, w)
    with pytest.raises(TypeError, match="share one dtype"):
        cauchy_mult(v, z.to(torch.complex128), w)
    with pytest.raises(ValueError, match=r"z must have shape \(M,\)"):
        cauchy_mult(v, z.reshape(2, 2), w)
    with pytest.raises(ValueError, match=r"v must have shape .*got v \(1, 2, 3\) and w \(2, 4\)"):
        cauchy_mult(v, z, w[:, :2].repeat(1, 2))
    with pytest.raises(ValueError, match="backend must be one of"):
        cauchy_mult(v, z, w, backend="cuda")
    with pytest.raises(TypeError, match="symmetric must be a bool"):
        cauchy_mult(v, z, w, symmetric=1)


def test_dispatch(monkeypatch):
    v, z, w = make_inputs(1, 2, 3, 4, dtype=torch.complex64)
    assert torch.equal(kernels.cauchy_mult(v, z, w), cauchy_mult(v, z, w, backend="triton"))
    for backend in ("torch", "triton"):
        lazy = cauchy_mult(v.conj(), z.conj(), w.conj(), symmetric=True, backend=backend)
        assert torch.equal(lazy, cauchy_mult(*(t.conj().resolve_conj() for t in (v, z, w)), symmetric=True,
                                        backend=backend))
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    with pytest.raises(RuntimeError, match="SSMKIT_DISABLE_TRITON"):
        cauchy_mult(v, z, w, backend="triton")
    assert torch.equal(cauchy_mult(v, z, w), cauchy_mult(v, z, w, backend="torch"))


def test_empty_shapes():
    v, z, w = make_inputs(2, 3, 4, 5, dtype=torch.complex64)
    assert cauchy_mult(v, z[:0], w).shape == (2, 3, 0)
    assert cauchy_mult(v[:, :0], z, w[:0]).shape == (2, 0, 5)
    assert torch.equal(cauchy_mult(v[..., :0], z, w[..., :0], backend="torch"), torch.zeros(2, 3, 5, dtype=torch.complex64))


def test_torch_compile_fullgraph():
    v, z, w = make_inputs(4, 3, 5, 9, dtype=torch.complex64)

    def f(a, b, c):
        return cauchy_mult(a, b, c, symmetric=True, backend="torch").abs().square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager = value_and_grads(f, v, z, w, torch.ones((), dtype=torch.float32))
    traced = value_and_grads(compiled, v, z, w, torch.ones((), dtype=torch.float32))
    for name, a, e in zip(("loss", "grad_v", "grad_z", "grad_w"), traced, eager):
        assert_close(a, e, rtol=1e-5, atol=1e-5 * e.abs().max().item(), name=name)


@pytest.mark.slow
def test_cpu_path_memory_at_s4_size():
    # S4 layer size: H = 256, N = 64 (32 pairs), L = 16384 -> M = 8193 points, 4 numerators.
    # Materializing (H, N, M) alone would take 1.1 GB (complex64); the tiled path stays far below.
    code = (
        "import resource, torch\n"
        "from kernels.cauchy import cauchy_mult\n"
        "R, H, N, M = 4, 256, 32, 8193\n"
        "v = torch.randn(R, H, N, dtype=torch.complex64, requires_grad=True)\n"
        "w = torch.complex(-torch.rand(H, N), torch.randn(H, N)).requires_grad_()\n"
        "z = torch.complex(torch.zeros(M), torch.linspace(0, 100, M))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "out = cauchy_mult(v, z, w, symmetric=True, backend='torch')\n"
        "out.real.sum().backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    growth_mb = float(res.stdout.strip().splitlines()[-1])
    assert growth_mb < 500, f"RSS grew by {growth_mb:.0f} MB"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    v, z, w = make_inputs(2, 2, 3, 5, dtype=torch.complex64)
    torch.library.opcheck(torch.ops.ssmkit.cauchy.default, (v, z, w, True, backend))
