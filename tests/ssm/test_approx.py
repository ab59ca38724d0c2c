"""Online function approximation (ssm.approx): recurrence, basis, reconstruction error vs N."""
import math

import numpy as np
import pytest
import torch

from ssm.approx import HiPPOApprox, basis
from ssm.discretize import discretize, legs_step
from ssm.hippo import MEASURES, transition
from tests.utils import assert_close

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth(L):
    """A smooth test signal sampled at the step midpoints of [0, 1] (vanishes smoothly at 0)."""
    t = (torch.arange(L, dtype=F64) + 0.5) / L
    return torch.stack([torch.sin(6 * t) * t ** 3, torch.exp(-t) * t ** 2 * torch.cos(9 * t)])  # (2, L)


def _rmse(a, b):
    # The reconstruction tests bound this approximation error, the property under test; those bounds
    # are not rounding tolerances and so are stated in each test, not in tests/utils.py.
    return float((a - b).pow(2).mean().sqrt())


@pytest.mark.parametrize("measure", ["legs", "legt"])
def test_basis_orthonormal(measure):
    x, w = np.polynomial.legendre.leggauss(30)
    s = torch.tensor((1 - x) / 2)  # ages in [0, 1] (theta = 1)
    G = basis(measure, 12, s)  # (Q, N)
    gram = G.T @ (G * torch.tensor(w / 2)[:, None])
    assert_close(gram, torch.eye(12, dtype=F64))


def test_basis_lagt_orthonormal():
    x, w = np.polynomial.laguerre.laggauss(40)  # int_0^inf e^{-x} p(x) dx
    G = basis("lagt", 10, torch.tensor(x), theta=1.0)  # (Q, N), includes e^{-x/2}
    gram = G.T @ (G * torch.tensor(w * np.exp(x))[:, None])
    assert_close(gram, torch.eye(10, dtype=F64))


def test_basis_fout_orthonormal():
    s = (torch.arange(400, dtype=F64) + 0.5) / 400  # midpoint rule is exact for trig polynomials
    G = basis("fout", 9, s)
    assert_close(G.T @ G / 400, torch.eye(9, dtype=F64))


@pytest.mark.parametrize("measure", ["legt", "lagt", "fout"])
@pytest.mark.parametrize("method", ["bilinear", "zoh", "forward_euler"])
def test_time_invariant_forward_is_the_recurrence(measure, method):
    L, N = 37, 6
    f = torch.randn(3, L, dtype=F64)
    m = HiPPOApprox(measure, N, method=method, theta=0.5, dtype=F64)
    c = m(f)
    assert c.shape == (3, L, N) and c.dtype == F64
    A, B = transition(measure, N, theta=0.5 if measure == "legt" else 1.0)
    scale = {"fout": 2 / 0.5, "lagt": 1 / 0.5}.get(measure, 1.0)
    Ab, Bb = discretize(A * scale, B * scale, 1 / L, method)
    x = torch.zeros(3, N, dtype=F64)
    for k in range(L):
        x = x @ Ab.T + f[:, k, None] * Bb
        assert_close(c[:, k], x)


@pytest.mark.parametrize("method", ["forward_euler", "bilinear", "backward_euler"])
def test_legs_forward_is_the_time_varying_recurrence(method):
    L, N = 20, 5
    f = torch.randn(2, L, dtype=F64)
    c = HiPPOApprox("legs", N, method=method, dtype=F64)(f)
    x = torch.zeros(2, N, dtype=F64)
    x[:, 0] = f[:, 0]
    assert_close(c[:, 0], x)
    for k in range(2, L + 1):
        x = legs_step(x, f[:, k - 1], k - 1, method=method)
        assert_close(c[:, k - 1], x)


@pytest.mark.parametrize("method", ["zoh", "bilinear", "backward_euler"])
def test_legs_constant_signal_is_exact(method):
    f = torch.full((1, 50), 1.7, dtype=F64)
    m = HiPPOApprox("legs", 8, method=method, dtype=F64)
    c = m(f)
    assert_close(c[0, :, 0], f[0])
    assert_close(c[0, :, 1:], torch.zeros(50, 7, dtype=F64))
    assert_close(m.reconstruct(c[:, -1], 50), f)


def test_legs_zoh_is_exact_for_piecewise_constant():
    # ZOH in log-time integrates the LegS ODE exactly: the state is the exact projection of the
    # piecewise-constant signal, so a polynomial of degree < N in the *step* values is recovered
    # on average over each step: check the projection onto g_0..g_2 by direct integration.
    L, N = 12, 6
    f = torch.randn(1, L, dtype=F64)
    c = HiPPOApprox("legs", N, method="zoh", dtype=F64)(f)[0, -1]
    x, w = np.polynomial.legendre.leggauss(10)
    exact = torch.zeros(N, dtype=F64)
    for j in range(L):  # sample j+1 on [j, j+1] of [0, L] -> x in [2j/L - 1, 2(j+1)/L - 1]
        a, b = 2 * j / L - 1, 2 * (j + 1) / L - 1
        xs = torch.tensor((b - a) / 2 * x + (a + b) / 2)
        G = basis("legs", N, (1 - xs) / 2)  # (Q, N)
        exact += float(f[0, j]) * (G * torch.tensor(w * (b - a) / 4)[:, None]).sum(0)
    assert_close(c, exact)


@pytest.mark.parametrize("measure,method,theta", [("legs", "bilinear", 1.0), ("legs", "zoh", 1.0),
                                                  ("legt", "bilinear", 1.0), ("legt", "zoh", 0.5)])
def test_reconstruction_error_falls_with_N(measure, method, theta):
    L = 400
    f = _smooth(L)
    errs = []
    for N in (2, 4, 8, 16):
        m = HiPPOApprox(measure, N, method=method, theta=theta, dtype=F64)
        c = m(f)
        n = round(theta * L)
        errs.append(_rmse(m.reconstruct(c[:, -1], n, dt=1 / L), f[:, -n:]))
    # strictly falling until the discretization floor (~1e-4 at L = 400) is reached
    floor = 1e-4
    assert all(b < a or b < floor for a, b in zip(errs, errs[1:])), errs
    assert errs[0] > 0.05 and errs[-1] < 1e-3 and errs[2] < 0.1 * errs[1], errs


def test_legs_reconstruction_at_intermediate_times():
    L = 300
    f = _smooth(L)
    m = HiPPOApprox("legs", 16, method="bilinear", dtype=F64)
    c = m(f)
    for k in (60, 150, 300):
        assert _rmse(m.reconstruct(c[:, k - 1], k), f[:, :k]) < 2e-3
        assert _rmse(m.reconstruct(c[:, k - 1], 20, k=k), f[:, k - 20:k]) < 2e-3


def test_lagt_and_fout_reconstruct_recent_history():
    L = 400
    t = (torch.arange(L, dtype=F64) + 0.5) / L
    f = (torch.sin(6 * t) * t ** 3)[None]  # (1, L)
    errs = {}
    for measure, theta in (("lagt", 0.02), ("fout", 0.5)):
        for N in (4, 32):
            m = HiPPOApprox(measure, N, method="zoh", theta=theta, dtype=F64)
            n = 100 if measure == "fout" else 40
            errs[measure, N] = _rmse(m.reconstruct(m(f)[:, -1], n, dt=1 / L), f[:, -n:])
    assert errs["lagt", 32] < 0.3 * errs["lagt", 4] and errs["lagt", 32] < 1e-2, errs
    assert errs["fout", 32] < 0.3 * errs["fout", 4] and errs["fout", 32] < 0.1, errs


def test_float32_and_gradients():
    f = _smooth(64).float().requires_grad_(True)
    m = HiPPOApprox("legt", 8)
    c = m(f)
    assert c.dtype == torch.float32
    c.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    c64 = HiPPOApprox("legt", 8, dtype=F64)(f.detach().double())
    assert_close(c, c64.float())


def test_errors():
    with pytest.raises(ValueError, match="measure must be one of"):
        HiPPOApprox("legendre", 4)
    with pytest.raises(ValueError, match="method must be one of"):
        HiPPOApprox("legt", 4, method="euler")
    with pytest.raises(ValueError, match="dt must be > 0"):
        HiPPOApprox("legt", 4, dt=0.0)
    m = HiPPOApprox("legt", 4, theta=0.5)
    with pytest.raises(ValueError, match=r"shape \(B, L\)"):
        m(torch.zeros(5))
    c = m(torch.zeros(2, 10))
    with pytest.raises(ValueError, match="pass dt=1/L"):
        m.reconstruct(c[:, -1], 5)
    with pytest.raises(ValueError, match="exceeds the window"):
        m.reconstruct(c[:, -1], 10, dt=0.1)
    with pytest.raises(ValueError, match=r"c must have shape \(\.\.\., 4\)"):
        m.reconstruct(c[:, -1, :3], 5, dt=0.1)
    legs = HiPPOApprox("legs", 4)
    with pytest.raises(ValueError, match="exceeds the k=3"):
        legs.reconstruct(torch.zeros(4), 5, k=3)
    with pytest.raises(ValueError, match="measure must be one of"):
        basis("foo", 3, torch.zeros(2))
    assert set(MEASURES) == {"legs", "legt", "lagt", "fout"}
    assert math.isfinite(float(basis("lagt", 3, torch.tensor(5.0)).sum()))


def test_gbt_alpha():
    with pytest.raises(ValueError, match="alpha is required"):
        HiPPOApprox("legt", 4, method="gbt")
    with pytest.raises(ValueError, match="alpha is required"):
        HiPPOApprox("legt", 4, alpha=0.5)
    f = torch.randn(1, 30, dtype=F64)
    for measure in ("legs", "legt"):
        a = HiPPOApprox(measure, 5, method="gbt", alpha=0.5, dtype=F64)(f)
        b = HiPPOApprox(measure, 5, method="bilinear", dtype=F64)(f)
        assert_close(a, b)
