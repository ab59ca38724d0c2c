"""Discretization: scipy agreement, diag == dense, convergence order, LegS steps, dt init.

The math: docs/discretization.md.
"""
import math

import numpy as np
import pytest
import torch
from scipy.signal import cont2discrete

from ssm.discretize import (DT_TRANSFORMS, METHODS, discretize, discretize_diag, dt_from_param,
                            dt_param_init, expm1c, legs_step, log_dt_init, log_pole)
from ssm.discretize import _expm1_from_real
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


# ---- accuracy for small dt*A ---------------------------------------------------------------------
C64, C128 = torch.complex64, torch.complex128


def _series_expm1(z: torch.Tensor, terms: int = 30) -> torch.Tensor:
    """exp(z) - 1 by its Taylor series in complex128 (|z| <= 1 here: 30 terms reach 1e-32)."""
    z = z.to(C128)
    term, out = torch.ones_like(z), torch.zeros_like(z)
    for k in range(1, terms + 1):
        term = term * z / k
        out = out + term
    return out


def _series_log1p(w: torch.Tensor, terms: int = 60) -> torch.Tensor:
    """log(1 + w) by its series in complex128 (|w| <= 0.3 here: 60 terms reach 1e-33)."""
    w = w.to(C128)
    power, out = torch.ones_like(w), torch.zeros_like(w)
    for k in range(1, terms + 1):
        power = power * w
        out = out + (-1) ** (k + 1) * power / k
    return out


def _small_z(n=4000, seed=11):
    """Complex z with |z| from 1e-8 to 0.5 and Re z <= 0 (dt * Lambda of a stable mode)."""
    g = torch.Generator().manual_seed(seed)
    mag = 10 ** (torch.rand(n, generator=g, dtype=F64) * 7.7 - 8)
    ang = (torch.rand(n, generator=g, dtype=F64) + 0.5) * math.pi     # left half plane
    return torch.polar(mag, ang)


def _max_rel(got, truth):
    return float(((got.to(C128) - truth) / truth.abs()).abs().max())


def test_expm1c_relative_accuracy():
    """torch's complex expm1 (CPU, CUDA) and the real-operation fallback, against the series."""
    z = _small_z()
    for dtype, eps in ((C128, 2.2e-16), (C64, 1.2e-7)):
        zd = z.to(dtype)
        truth = _series_expm1(zd)                                    # truth at the rounded input
        # a few ulps: the formula's terms each round once or twice
        assert _max_rel(expm1c(zd), truth) < 8 * eps, dtype
        assert _max_rel(_expm1_from_real(zd), truth) < 8 * eps, dtype
    assert _max_rel(torch.exp(z.to(C64)) - 1, _series_expm1(z)) > 1e-2   # what expm1 is for
    big = torch.tensor([3 - 40j, -20 + 1j, 0.7 + 0.7j], dtype=C128)
    assert_close(expm1c(big), torch.exp(big) - 1)
    assert_close(_expm1_from_real(big), torch.exp(big) - 1)
    zg = z[:5].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(expm1c, (zg,))
    assert torch.autograd.gradcheck(_expm1_from_real, (zg,))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_log_pole_relative_accuracy(alpha):
    z = _small_z(seed=12) * 0.5                                       # |z| <= 0.25
    truth = _series_log1p((1 - alpha) * z.to(C128)) - _series_log1p(-alpha * z.to(C128))
    assert _max_rel(log_pole(z, alpha), truth) < 1e-15
    z64 = z.to(C64)
    truth = _series_log1p((1 - alpha) * z64.to(C128)) - _series_log1p(-alpha * z64.to(C128))
    assert _max_rel(log_pole(z64, alpha), truth) < 1e-6                # a few float32 ulps
    ratio = (1 + (1 - alpha) * z64) / (1 - alpha * z64)
    assert _max_rel(torch.log(ratio), truth) > 1e-2                    # forming the ratio first
    big = torch.tensor([-0.5 + 30j, -3 + 0.1j, -0.2 - 2j], dtype=C128)
    assert_close(torch.exp(log_pole(big, alpha)), (1 + (1 - alpha) * big) / (1 - alpha * big))


@pytest.mark.parametrize("method", ["zoh", "bilinear", "forward_euler", "backward_euler"])
def test_diag_small_dt_complex64_close_to_truth(method):
    """Bb and log(Ab) in complex64 at tiny dt*Lambda stay at float32 relative accuracy."""
    g = torch.Generator().manual_seed(13)
    lam = torch.complex(-torch.rand(3, 8, generator=g, dtype=F64) - 0.1, 20 * torch.randn(3, 8, generator=g, dtype=F64))
    B = torch.randn(3, 8, generator=g, dtype=C128)
    dt = torch.tensor([1e-7, 1e-5, 1e-3], dtype=F64)
    lam32, B32, dt32 = lam.to(C64), B.to(C64), dt.float()
    log_ab, Bb = discretize_diag(lam32, B32, dt32, method, log=True)
    # truth from the rounded complex64 inputs, in complex128 by series / the dense exponential
    lam64, B64, dt64 = lam32.to(C128), B32.to(C128), dt32.double()
    z = dt64[:, None] * lam64
    a = {"zoh": None, "bilinear": 0.5, "forward_euler": 0.0, "backward_euler": 1.0}[method]
    if a is None:
        want_log, want_B = z, _series_expm1(z) / lam64 * B64
    else:
        want_log = _series_log1p((1 - a) * z) - _series_log1p(-a * z)
        want_B = dt64[:, None] * B64 / (1 - a * z)
    assert log_ab.dtype == C64 and Bb.dtype == C64
    assert _max_rel(Bb, want_B) < 1e-6
    assert _max_rel(log_ab, want_log) < 1e-6


def test_diag_zoh_limit_and_gradients_near_zero():
    """At A = 0: Bb = dt * B with finite gradients; near 0 the gradients match float64 truth."""
    lam = torch.tensor([0.0, -1e-9, -1.0], dtype=F64, requires_grad=True)
    dt = torch.tensor(0.25, dtype=F64, requires_grad=True)
    B = torch.tensor([2.0, 1.0, 1.0], dtype=F64)
    Ab, Bb = discretize_diag(lam, B, dt, "zoh")
    assert_close(Bb.detach()[:2], torch.tensor([0.5, 0.25 * (1 - 0.25e-9 / 2)], dtype=F64))
    Bb.sum().backward()
    # d Bb / d dt = exp(dt A) B exactly; d Bb / dA = (dt exp(dt A) A - expm1(dt A)) / A^2 B
    assert_close(dt.grad, (torch.exp(0.25 * lam.detach()) * B).sum())
    assert torch.isfinite(lam.grad).all() and float(lam.grad[0]) == 0.0   # the limit branch
    assert_close(lam.grad[1:], torch.tensor([0.25 ** 2 / 2, 1 - 1.25 * math.exp(-0.25)], dtype=F64),
                 rtol=1e-6, atol=1e-12)                               # eps / |dt A| = 4e-7 at A = -1e-9
    lam0 = torch.tensor([-1e-3, -0.5, 2.0], dtype=C128, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, d: discretize_diag(a, B, d, "zoh")[1], (lam0, dt.detach().requires_grad_(True)))
    cz = torch.zeros(2, dtype=C128)
    _, Bc = discretize_diag(cz, torch.ones(2, dtype=C128), 0.5, "zoh")
    assert_close(Bc, torch.full((2,), 0.5, dtype=C128))


@pytest.mark.parametrize("method", ["zoh", "bilinear", "gbt"])
def test_diag_log_output_is_a_logarithm_of_ab(method):
    alpha = 0.2 if method == "gbt" else None
    g = torch.Generator().manual_seed(14)
    lam = torch.complex(-torch.rand(2, 5, generator=g, dtype=F64), 30 * torch.randn(2, 5, generator=g, dtype=F64))
    B = torch.randn(2, 5, generator=g, dtype=C128)
    dt = torch.tensor([0.01, 0.4], dtype=F64)
    Ab, Bb = discretize_diag(lam, B, dt, method, alpha=alpha)
    log_ab, Bb2 = discretize_diag(lam, B, dt, method, alpha=alpha, log=True)
    assert_close(Bb2, Bb)
    for l in (1, 2, 7):                                               # any branch: integer powers agree
        assert_close(torch.exp(l * log_ab), Ab ** l)
    real_log, _ = discretize_diag(-torch.rand(4, dtype=F64), torch.ones(4, dtype=F64), 0.1, method,
                                  alpha=alpha, log=True)
    assert real_log.is_complex()
    for f in (lambda a: discretize_diag(a, B, dt, method, alpha=alpha, log=True)[0],):
        assert torch.autograd.gradcheck(f, (lam.clone().requires_grad_(True),))


def test_dense_complex_batched_per_channel():
    """Complex (H, N, N) systems with dt (H,): each channel equals its own discretization."""
    g = torch.Generator().manual_seed(15)
    A = torch.randn(3, 4, 4, generator=g, dtype=C128) - 2 * torch.eye(4, dtype=C128)
    B = torch.randn(3, 4, generator=g, dtype=C128)
    dt = torch.tensor([0.05, 0.2, 0.7], dtype=torch.float32)
    for method in ("zoh", "bilinear"):
        Ab, Bb = discretize(A, B, dt, method, check=False)
        assert Ab.dtype == C128 and Ab.shape == (3, 4, 4)
        for h in range(3):
            M = torch.zeros(5, 5, dtype=C128)
            M[:4, :4], M[:4, 4] = A[h] * float(dt[h]), B[h] * float(dt[h])
            if method == "zoh":
                E = torch.linalg.matrix_exp(M)
                want = E[:4, :4], E[:4, 4]
            else:
                lhs = torch.eye(4, dtype=C128) - M[:4, :4] / 2
                want = (torch.linalg.solve(lhs, torch.eye(4, dtype=C128) + M[:4, :4] / 2),
                        torch.linalg.solve(lhs, M[:4, 4]))
            assert_close(Ab[h], want[0])
            assert_close(Bb[h], want[1])
    # check=False only skips the dt > 0 test
    with pytest.raises(ValueError, match="dt must be > 0"):
        discretize(A, B, -dt, "zoh")


def test_dt_param_transforms():
    assert DT_TRANSFORMS == ("exp", "softplus")
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert torch.equal(dt_param_init(100, 1e-3, 1e-1, "exp", generator=g1),
                       log_dt_init(100, 1e-3, 1e-1, generator=g2))
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    raw = dt_param_init(100, 1e-4, 1e-1, "softplus", generator=g1)
    want = torch.exp(log_dt_init(100, 1e-4, 1e-1, generator=g2).double())
    assert_close(torch.log1p(torch.exp(raw.double())), want, rtol=1e-6, atol=0)   # float32 storage
    assert_close(dt_from_param(raw, "softplus"), want.float(), rtol=1e-6, atol=0)
    x = torch.randn(5, dtype=F64, requires_grad=True)
    for t in DT_TRANSFORMS:
        assert torch.autograd.gradcheck(lambda p: dt_from_param(p, t), (x,))
    with pytest.raises(ValueError, match="dt_transform"):
        dt_param_init(3, transform="identity")
