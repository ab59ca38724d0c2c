"""Tests of the Vandermonde product (`kernels.vandermonde_mult`): both backends against complex128 truth.

Triton runs under the interpreter on CPU (tests/conftest.py), so grids stay tiny.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
import kernels._triton
import kernels.vandermonde.reference as reference
from kernels.vandermonde import vandermonde_ref
from tests.utils import assert_close, assert_within_budget

BACKENDS = ("torch", "triton")
# Triton runs on CPU tensors under the interpreter; with SSMKIT_TEST_COMPILED=1 (tests/conftest.py)
# it runs compiled on CUDA, so the Triton cases move their tensors there.
TRITON_DEVICE = "cuda" if os.environ.get("SSMKIT_TEST_COMPILED") == "1" and torch.cuda.is_available() else "cpu"


def device_for(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def s4d_inputs(rows, N, *, dtype=torch.complex64, dt_min=1e-3, dt_max=1e-1, leading=(), device="cpu"):
    """Realistic inputs: x = dt * lambda with S4D-Lin lambda = -1/2 + i pi n, v random."""
    shape = (*leading, rows, N)
    n = torch.arange(N, dtype=torch.float64)
    lam = torch.complex(torch.full_like(n, -0.5), math.pi * n)                          # (N,)
    log_dt = torch.rand(*leading, rows, 1, dtype=torch.float64) * math.log(dt_max / dt_min) + math.log(dt_min)
    x = (torch.exp(log_dt) * lam).to(dtype)                                              # (..., rows, N)
    v = torch.randn(shape, dtype=torch.complex128).to(dtype)                             # (..., rows, N)
    return v.to(device), x.to(device)


def value_and_grads(fn, v, x, g):
    """fn(v, x) and the gradients of sum(fn(v, x) * g) w.r.t. v and x."""
    v = v.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    out = fn(v, x)
    gv, gx = torch.autograd.grad((out * g.to(out.dtype)).sum(), (v, x))
    return out.detach(), gv, gx


def check_against_truth(fn, v, x, L, *, name):
    """Forward and both gradients of `fn` within the error budget of the plain complex64 formula."""
    g = torch.randn(*v.shape[:-1], L, dtype=torch.float64, device=v.device)
    truth = value_and_grads(lambda a, b: vandermonde_ref(a, b, L), v.to(torch.complex128), x.to(torch.complex128), g)
    plain = value_and_grads(lambda a, b: vandermonde_ref(a, b, L), v, x, g)
    fast = value_and_grads(fn, v, x, g)
    assert fast[0].dtype == (torch.float32 if v.dtype == torch.complex64 else torch.float64)
    for what, f, p, t in zip(("out", "grad_v", "grad_x"), fast, plain, truth):
        assert f.shape == t.shape, f"{name} {what}: shape {tuple(f.shape)} != {tuple(t.shape)}"
        assert_within_budget(f, p, t, name=f"{name} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N", [1, 3, 32])
@pytest.mark.parametrize("L", [1, 17, 489])
def test_matches_truth_complex64(backend, L, N):
    v, x = s4d_inputs(5, N, device=device_for(backend))
    check_against_truth(lambda a, b: kernels.vandermonde_mult(a, b, L, backend=backend), v, x, L,
                        name=f"{backend} L={L} N={N}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_truth_complex128(backend):
    L = 489
    v, x = s4d_inputs(3, 5, dtype=torch.complex128, device=device_for(backend))
    g = torch.randn(3, L, dtype=torch.float64, device=v.device)
    truth = value_and_grads(lambda a, b: vandermonde_ref(a, b, L), v, x, g)
    fast = value_and_grads(lambda a, b: kernels.vandermonde_mult(a, b, L, backend=backend), v, x, g)
    assert fast[0].dtype == torch.float64
    for what, f, t in zip(("out", "grad_v", "grad_x"), fast, truth):
        assert_close(f, t, name=f"{backend} complex128 {what}")


@pytest.mark.parametrize("block", [None, 1, 4, 7, 64])
def test_chunked_block_sizes(block, monkeypatch):
    # Any table width T gives the same sums; T = 7 leaves a ragged last chunk.
    monkeypatch.setattr(reference, "TABLE_WIDTH", block)
    v, x = s4d_inputs(3, 4, dtype=torch.complex128)
    L = 45
    g = torch.randn(3, L, dtype=torch.float64)
    check = value_and_grads(lambda a, b: kernels.vandermonde_mult(a, b, L, backend="torch"), v, x, g)
    truth = value_and_grads(lambda a, b: vandermonde_ref(a, b, L), v, x, g)
    for what, c, t in zip(("out", "grad_v", "grad_x"), check, truth):
        assert_close(c, t, name=f"chunked block={block} {what}")


def test_gradcheck_triton_function():
    v, x = s4d_inputs(1, 2, dtype=torch.complex128, device=TRITON_DEVICE)
    x = x + 0.05j * torch.randn(1, 2, dtype=torch.complex128, device=x.device)  # distinct, non-trivial phases
    v.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.vandermonde_mult(a, b, 5, backend="triton"), (v, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_public_op(backend):
    v, x = s4d_inputs(3, 3, dtype=torch.complex128, dt_min=0.05, dt_max=0.5, device=device_for(backend))
    v.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.vandermonde_mult(a, b, 11, backend=backend), (v, x),
                                    fast_mode=True)


def test_gradcheck_chunked_function(monkeypatch):
    monkeypatch.setattr(reference, "TABLE_WIDTH", 4)  # L = 13: three full chunks and a ragged one
    v, x = s4d_inputs(2, 3, dtype=torch.complex128, dt_min=0.05, dt_max=0.5)
    v.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: kernels.vandermonde_mult(a, b, 13, backend="torch"), (v, x))


def test_poison_hook_fills_nan(monkeypatch):
    # Guards the next test: with the hook on, unwritten output really is NaN (both planes).
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    for dtype in (torch.float32, torch.complex64):
        buf = kernels._triton.empty_output((3,), dtype=dtype, device="cpu")
        assert torch.isnan(torch.view_as_real(buf) if dtype.is_complex else buf).all()


def test_triton_writes_every_element(monkeypatch):
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    # L spans several tiles with a ragged end, N spans several BLOCK_N blocks with a ragged end.
    for L, N in ((545, 3), (40, 70)):
        v, x = s4d_inputs(3, N, device=TRITON_DEVICE)
        vg, xg = v.clone().requires_grad_(), x.clone().requires_grad_()
        out = kernels.vandermonde_mult(vg, xg, L, backend="triton")
        gv, gx = torch.autograd.grad(out, (vg, xg), torch.randn(3, L, device=v.device))
        out = out.detach()
        for name, t in (("out", out), ("grad_v", gv), ("grad_x", gx)):
            assert torch.isfinite(torch.view_as_real(t) if t.is_complex() else t).all(), f"{name} L={L} N={N}"
        assert_within_budget(out, vandermonde_ref(v, x, L),
                             vandermonde_ref(v.to(torch.complex128), x.to(torch.complex128), L), name=f"out L={L} N={N}")


def test_triton_backward_deterministic():
    v, x = s4d_inputs(3, 5, device=TRITON_DEVICE)
    g = torch.randn(3, 300, device=v.device)
    fn = lambda a, b: kernels.vandermonde_mult(a, b, 300, backend="triton")  # noqa: E731
    first = value_and_grads(fn, v, x, g)[1:]
    second = value_and_grads(fn, v, x, g)[1:]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dt_min,dt_max", [(1e-6, 1e-5), (1.0, 10.0), (1e3, 1e4)])
def test_extreme_dt(backend, dt_min, dt_max):
    # Tiny dt: |z| ~ 1 and slow phases; huge dt: exp underflows to exactly 0 after a few steps.
    v, x = s4d_inputs(3, 6, dt_min=dt_min, dt_max=dt_max, device=device_for(backend))
    check_against_truth(lambda a, b: kernels.vandermonde_mult(a, b, 300, backend=backend), v, x, 300,
                        name=f"{backend} dt in [{dt_min:g}, {dt_max:g}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_filter_near_unit_circle(backend):
    # Re(x) ~ -1e-6 .. 0 and L = 65,536: nothing decays, phases reach ~1e5 rad. The plain float32
    # formula loses the phase; the chunk-start powers (float64 phase) must stay within its budget.
    L = 65536
    x = torch.complex(-1e-6 * torch.rand(1, 4, dtype=torch.float64), 3 * torch.randn(1, 4, dtype=torch.float64))
    v = torch.randn(1, 4, dtype=torch.complex128)
    v, x = v.to(device_for(backend), torch.complex64), x.to(device_for(backend), torch.complex64)
    truth = vandermonde_ref(v.to(torch.complex128), x.to(torch.complex128), L)     # (1, L)
    out = kernels.vandermonde_mult(v, x, L, backend=backend)
    assert_within_budget(out, vandermonde_ref(v, x, L), truth, name=f"{backend} L=65536")
    # Stronger than the budget: float32-level accuracy relative to the filter's size.
    assert (out.double() - truth).abs().max() <= 1e-5 * truth.abs().max()


def test_long_filter_backward_chunked():
    L = 65536
    v, x = s4d_inputs(2, 3, dt_min=1e-5, dt_max=1e-4)
    check_against_truth(lambda a, b: kernels.vandermonde_mult(a, b, L, backend="torch"), v, x, L, name="torch L=65536")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims(backend):
    v, x = s4d_inputs(3, 4, leading=(2,), device=device_for(backend))
    out = kernels.vandermonde_mult(v, x, 20, backend=backend)
    assert out.shape == (2, 3, 20)
    flat = kernels.vandermonde_mult(v.reshape(6, 4), x.reshape(6, 4), 20, backend=backend)
    assert_close(out.reshape(6, 20), flat, name="leading dims")
    check_against_truth(lambda a, b: kernels.vandermonde_mult(a, b, 20, backend=backend), v, x, 20, name="leading dims")
    one_d = kernels.vandermonde_mult(v[0, 0], x[0, 0], 20, backend=backend)
    assert one_d.shape == (20,)
    assert_close(one_d, out[0, 0], name="1-d input")


@pytest.mark.parametrize("backend", BACKENDS)
def test_conjugate_and_strided_views(backend):
    # Lazy-conjugate, non-contiguous inputs give the same numbers as materialized copies.
    v, x = s4d_inputs(4, 6, device=device_for(backend))
    vv, xx = v.conj()[:, ::2], x.conj()[:, ::2]                                   # (4, 3) views
    dense = vv.resolve_conj().contiguous(), xx.resolve_conj().contiguous()
    assert_close(kernels.vandermonde_mult(vv, xx, 30, backend=backend), kernels.vandermonde_mult(*dense, 30, backend=backend),
                 name=f"{backend} views")


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any aten op produces."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_chunked_never_materializes_rows_n_l():
    H, N, L = 4, 32, 4096
    v, x = s4d_inputs(H, N)
    v.requires_grad_()
    x.requires_grad_()
    with _MaxNumel() as mode:
        out = kernels.vandermonde_mult(v, x, L, backend="torch")
        out.backward(torch.randn(H, L))
    # The biggest tensors are the (H, L) output/grad and the (H, L/T, 4N) power sums, T = 64.
    assert mode.max_numel <= H * max(L, 4 * N * (L // 64 + 64)), mode.max_numel
    assert mode.max_numel < H * N * L // 8


def test_torch_compile_fullgraph():
    def loss(v, x):
        return kernels.vandermonde_mult(v, x, 33, backend="torch").square().sum()

    v, x = s4d_inputs(3, 4)
    eager = value_and_grads(lambda a, b: loss(a, b).reshape(1), v, x, torch.ones(1))
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    traced = value_and_grads(lambda a, b: compiled(a, b).reshape(1), v, x, torch.ones(1))
    for what, a, b in zip(("loss", "grad_v", "grad_x"), traced, eager):
        assert_close(a, b, name=f"compiled {what}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    v, x = s4d_inputs(2, 3, device=device_for(backend))
    torch.library.opcheck(torch.ops.ssmkit.vandermonde.default, (v, x, 9, backend))


def test_auto_and_env_switch(monkeypatch):
    v, x = s4d_inputs(2, 3, device=TRITON_DEVICE)
    # The interpreter is on in the test suite, so "auto" runs Triton here.
    assert torch.equal(kernels.vandermonde_mult(v, x, 50), kernels.vandermonde_mult(v, x, 50, backend="triton"))
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    assert torch.equal(kernels.vandermonde_mult(v, x, 50), kernels.vandermonde_mult(v, x, 50, backend="torch"))
    with pytest.raises(RuntimeError, match="SSMKIT_DISABLE_TRITON"):
        kernels.vandermonde_mult(v, x, 50, backend="triton")


def test_bad_input_raises():
    v, x = s4d_inputs(2, 3)
    with pytest.raises(TypeError, match="v must be complex"):
        kernels.vandermonde_mult(v.real, x, 4)
    with pytest.raises(TypeError, match="x must be complex"):
        kernels.vandermonde_mult(v, x.real, 4)
    with pytest.raises(TypeError, match="same dtype"):
        kernels.vandermonde_mult(v, x.to(torch.complex128), 4)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        kernels.vandermonde_mult([1j], x, 4)
    with pytest.raises(TypeError, match="L must be an int"):
        kernels.vandermonde_mult(v, x, 4.0)
    with pytest.raises(ValueError, match="L must be >= 1"):
        kernels.vandermonde_mult(v, x, 0)
    with pytest.raises(ValueError, match=r"v \(2, 3\) and x \(2, 4\)"):
        kernels.vandermonde_mult(v, torch.zeros(2, 4, dtype=torch.complex64), 4)
    with pytest.raises(ValueError, match="N \\(last dim\\)"):
        kernels.vandermonde_mult(v[:, :0], x[:, :0], 4)
    with pytest.raises(ValueError, match="same shape"):
        kernels.vandermonde_mult(v[0, 0], x[0, 0].reshape(1), 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.vandermonde_mult(v, x, 4, backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled Triton only (SSMKIT_TEST_COMPILED=1)")
def test_cuda_s4d_size():
    # The S4D filter size the GPU targets are stated for, compiled; truth materializes ~2 GB on the GPU.
    L = 16384
    v, x = s4d_inputs(256, 32, device="cuda")
    check_against_truth(lambda a, b: kernels.vandermonde_mult(a, b, L, backend="triton"), v, x, L, name="cuda S4D size")
