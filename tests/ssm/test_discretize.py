"""Discretization: scipy agreement, diag == dense, convergence order, LegS steps, dt init.

The math: docs/discretization.md.
"""
import math

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssm.discretize import (METHODS, discretize, discretize_diag, legs_step,
                            log_dt_init)
from ssm.hippo import transition
from tests.utils import assert_close

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")
SCIPY = [("forward_euler", "euler", None), ("backward_euler", "backward_diff", None),
         ("bilinear", "bilinear", None), ("gbt", "gbt", 0.3), ("gbt", "gbt", 0.0), ("zoh", "zoh", None)]


def _stable(N, *, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g, dtype=F64)
    shift = torch.linalg.eigvals(A).real.max() + 0.3
    return A - shift * torch.eye(N, dtype=F64), torch.randn(N, generator=g, dtype=F64)


@pytest.mark.parametrize("method,scipy_method,alpha", SCIPY)
@pytest.mark.parametrize("N,dt,seed", [(1, 0.5, 0), (4, 0.1, 1), (7, 0.03, 2), (12, 1.3, 3)])
def test_matches_scipy(method, scipy_method, alpha, N, dt, seed):
    A, B = _stable(N, seed=seed)
    Ab, Bb = discretize(A, B, dt, method, alpha=alpha)
    kw = {} if alpha is None else {"alpha": alpha}
    ad, bd, *_ = cont2discrete((A.numpy(), B.numpy()[:, None], np.zeros((1, N)), np.zeros((1, 1))),
                               dt, method=scipy_method, **kw)
    assert Ab.dtype == F64 and Ab.shape == (N, N) and Bb.shape == (N,)
    assert_close(Ab, torch.from_numpy(ad))
    assert_close(Bb, torch.from_numpy(bd[:, 0]))


@pytest.mark.parametrize("method", ["forward_euler", "backward_euler", "bilinear", "zoh"])
def test_hippo_matches_scipy(method):
    scipy_name = {"forward_euler": "euler", "backward_euler": "backward_diff"}.get(method, method)
    for measure in ("legs", "legt", "lagt", "fout"):
        A, B = transition(measure, 9)
        Ab, Bb = discretize(A, B, 0.01, method)
        ad, bd, *_ = cont2discrete((A.numpy(), B.numpy()[:, None], np.zeros((1, 9)), np.zeros((1, 1))),
                                   0.01, method=scipy_name)
        assert_close(Ab, torch.from_numpy(ad), name=measure)
        assert_close(Bb, torch.from_numpy(bd[:, 0]), name=measure)


def test_zoh_singular_A():
    A = torch.zeros(3, 3, dtype=F64)
    A[0, 1] = 1.0  # nilpotent: exp(dt A) = I + dt A, Bb = dt B + dt^2/2 A B
    B = torch.tensor([0.0, 1.0, 2.0], dtype=F64)
    Ab, Bb = discretize(A, B, 0.5, "zoh")
    assert_close(Ab, torch.eye(3, dtype=F64) + 0.5 * A)
    assert_close(Bb, 0.5 * B + 0.125 * A @ B)


@pytest.mark.parametrize("method", ["forward_euler", "backward_euler", "bilinear", "zoh"])
def test_broadcast_dt(method):
    A, B = _stable(5, seed=4)
    dt = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    Ab, Bb = discretize(A, B, dt, method)
    assert Ab.shape == (3, 5, 5) and Bb.shape == (3, 5)
    for i in range(3):
        Ai, Bi = discretize(A, B, float(dt[i]), method)
        assert_close(Ab[i], Ai)
        assert_close(Bb[i], Bi)
    # per-channel systems (H, N, N) with dt (H,)
    A2 = torch.stack([A, 2 * A])
    Ab2, Bb2 = discretize(A2, B, dt[:2], method)
    assert Ab2.shape == (2, 5, 5)
    assert_close(Ab2[1], discretize(2 * A, B, 0.2, method)[0])


@pytest.mark.parametrize("method,alpha", [("forward_euler", None), ("backward_euler", None),
                                          ("bilinear", None), ("gbt", 0.7), ("zoh", None)])
@pytest.mark.parametrize("dtype", [F64, torch.complex128])
def test_diag_equals_dense(method, alpha, dtype):
    g = torch.Generator().manual_seed(5)
    lam = -torch.rand(3, 6, generator=g, dtype=F64) - 0.1  # (H, N)
    if dtype == torch.complex128:
        lam = torch.complex(lam, 10 * torch.randn(3, 6, generator=g, dtype=F64))
    B = torch.randn(3, 6, generator=g, dtype=F64).to(dtype)
    dt = torch.tensor([0.01, 0.1, 0.5], dtype=F64)
    Ab, Bb = discretize_diag(lam, B, dt, method, alpha=alpha)
    Ad, Bd = discretize(torch.diag_embed(lam), B, dt, method, alpha=alpha)
    assert Ab.shape == (3, 6) and Ab.dtype == dtype
    assert_close(Ab, torch.diagonal(Ad, dim1=-2, dim2=-1).to(dtype))
    assert_close(Bb, Bd.to(dtype))


def test_diag_zoh_zero_eigenvalue():
    lam = torch.tensor([0.0, -1.0], dtype=F64)
    B = torch.tensor([2.0, 1.0], dtype=F64)
    Ab, Bb = discretize_diag(lam, B, 0.25, "zoh")
    assert_close(Ab, torch.tensor([1.0, math.exp(-0.25)], dtype=F64))
    assert_close(Bb, torch.tensor([0.5, 1 - math.exp(-0.25)], dtype=F64))


def _simulate_error(method, dt, T=1.0):
    """Max error at t=T of the discrete recurrence vs the exact solution for u(t) = cos(3t)."""
    A, B = transition("legt", 4)
    L = round(T / dt)
    Ab, Bb = discretize(A, B, dt, method)
    # Exact: x(T) = int_0^T exp(A (T-s)) B u(s) ds by high-order Gauss quadrature on 64 panels.
    xg, wg = np.polynomial.legendre.leggauss(20)
    exact = torch.zeros(4, dtype=F64)
    edges = np.linspace(0, T, 65)
    for a, b in zip(edges[:-1], edges[1:]):
        s = torch.tensor((b - a) / 2 * xg + (a + b) / 2)
        E = torch.linalg.matrix_exp(A * (T - s)[:, None, None])  # (Q, N, N)
        exact += ((E @ B) * (torch.cos(3 * s) * torch.tensor(wg) * (b - a) / 2)[:, None]).sum(0)
    # sample u at the midpoint of each step for ZOH/bilinear (their natural second-order point)
    t = (torch.arange(L, dtype=F64) + 0.5) * dt
    x = torch.zeros(4, dtype=F64)
    for uk in torch.cos(3 * t):
        x = Ab @ x + Bb * uk
    return float((x - exact).abs().max())


@pytest.mark.parametrize("method,order", [("bilinear", 2), ("zoh", 2), ("backward_euler", 1)])
def test_convergence_order(method, order):
    errs = [_simulate_error(method, dt) for dt in (1 / 50, 1 / 100, 1 / 200)]
    rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
    assert all(abs(r - order) < 0.25 for r in rates), (errs, rates)


def test_zoh_is_exact_for_piecewise_constant_input():
    A, B = transition("legs", 6)
    Ab, Bb = discretize(A, B, 0.05, "zoh")
    x = torch.zeros(6, dtype=F64)
    us = [0.3, -1.0, 2.0]
    for u in us:
        x = Ab @ x + Bb * u
    # exact: the ODE with constant input u over each step, each solved by a fine expm
    y = torch.zeros(6, dtype=F64)
    for u in us:
        M = torch.zeros(7, 7, dtype=F64)
        M[:6, :6], M[:6, 6] = A * 0.05, B * u * 0.05
        y = (torch.linalg.matrix_exp(M / 64).matrix_power(64) @ torch.cat([y, torch.ones(1, dtype=F64)]))[:6]
    assert_close(x, y)


@pytest.mark.parametrize("method,alpha", [("forward_euler", None), ("backward_euler", None),
                                          ("bilinear", None), ("gbt", 0.25)])
def test_legs_step_matches_dense(method, alpha):
    N = 11
    A, B = transition("legs", N)
    c = torch.randn(2, 3, N, dtype=F64)
    u = torch.randn(2, 3, dtype=F64)
    for k in (1, 2, 7, 1000):
        Ab, Bb = discretize(A, B, 1.0 / k, method, alpha=alpha)
        assert_close(legs_step(c, u, k, method=method, alpha=alpha), c @ Ab.T + Bb * u[..., None])
    # forward Euler is c_{k+1} = (I + A/k) c_k + B u_k / k (docs/discretization.md, LegS)
    if method == "forward_euler":
        k = 5
        expect = c @ (torch.eye(N, dtype=F64) + A / k).T + B * u[..., None] / k
        assert_close(legs_step(c, u, k, method=method), expect)


def test_legs_step_keeps_constant():
    # c = u e_0 is the exact LegS state of a constant signal; every GBT step preserves it
    c = torch.zeros(2, 8, dtype=F64)
    c[:, 0] = torch.tensor([1.5, -2.0])
    for method in ("forward_euler", "backward_euler", "bilinear"):
        assert_close(legs_step(c, c[:, 0], 3, method=method), c)


def test_log_dt_init():
    g = torch.Generator().manual_seed(1)
    log_dt = log_dt_init(5000, 1e-3, 1e-1, generator=g)
    assert log_dt.shape == (5000,) and log_dt.dtype == torch.float32
    assert float(log_dt.min()) >= math.log(1e-3) and float(log_dt.max()) <= math.log(1e-1)
    # uniform in log space: mean and spread of U[a, b]
    a, b = math.log(1e-3), math.log(1e-1)
    assert abs(float(log_dt.mean()) - (a + b) / 2) < 0.05
    assert abs(float(log_dt.std()) - (b - a) / math.sqrt(12)) < 0.05
    g2 = torch.Generator().manual_seed(1)
    assert torch.equal(log_dt_init(5000, generator=g2), log_dt)


def test_errors():
    A, B = _stable(3, seed=0)
    with pytest.raises(ValueError, match="method must be one of"):
        discretize(A, B, 0.1, "euler")
    with pytest.raises(ValueError, match="method must be one of"):
        discretize_diag(A[0], B, 0.1, "tustin")
    for bad_dt in (0.0, -0.1, torch.tensor([0.1, -0.2])):
        with pytest.raises(ValueError, match="dt must be > 0"):
            discretize(A, B, bad_dt, "bilinear")
        with pytest.raises(ValueError, match="dt must be > 0"):
            discretize_diag(A[0], B, bad_dt, "zoh")
    with pytest.raises(ValueError, match="needs alpha"):
        discretize(A, B, 0.1, "gbt")
    with pytest.raises(ValueError, match="only used by method='gbt'"):
        discretize(A, B, 0.1, "zoh", alpha=0.5)
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., N, N\)"):
        discretize(A[:, :2], B, 0.1, "zoh")
    with pytest.raises(ValueError, match="B must have shape"):
        discretize(A, B[:2], 0.1, "zoh")
    with pytest.raises(ValueError, match="broadcast"):
        discretize(A.expand(2, 3, 3), B, torch.full((4,), 0.1), "zoh")
    with pytest.raises(ValueError, match="broadcast"):
        discretize_diag(torch.ones(2, 3), torch.ones(2, 3), torch.full((4,), 0.1), "zoh")
    with pytest.raises(TypeError, match="dt"):
        discretize(A, B, "0.1", "zoh")
    with pytest.raises(ValueError, match="k must be an int"):
        legs_step(torch.zeros(4), torch.zeros(()), 0)
    with pytest.raises(ValueError, match="zoh"):
        legs_step(torch.zeros(4), torch.zeros(()), 1, method="zoh")
    with pytest.raises(ValueError, match="dt_min"):
        log_dt_init(4, 0.1, 0.01)
    assert set(METHODS) == {"forward_euler", "backward_euler", "bilinear", "gbt", "zoh"}


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_gradients(method):
    g = torch.Generator().manual_seed(7)
    lam = torch.complex(-torch.rand(4, generator=g, dtype=F64) - 0.1,
                        torch.randn(4, generator=g, dtype=F64)).requires_grad_(True)
    Bd = torch.randn(4, generator=g, dtype=torch.complex128, requires_grad=True)
    dt = torch.tensor([0.05, 0.3], dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize_diag(a.expand(2, 4), b, d, method), (lam, Bd, dt))
    A, B = _stable(3, seed=8)
    A.requires_grad_(True)
    B.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, d: discretize(a, b, d, method), (A, B, dt))
