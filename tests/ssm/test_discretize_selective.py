"""Per-token schemes of the selective layers, checked against the ODE itself.

Ground truth: `x' = A x + g(s)` over one step `[0, dt]` solved by `scipy.integrate.solve_ivp`
(DOP853, complex state, tight tolerances), i.e. the variation-of-constants integral
`x(dt) = e^{A dt} x(0) + int_0^dt e^{A(dt-s)} g(s) ds`. What each scheme gets exactly right is
derived in docs/mamba3.md ("Exponential-trapezoidal discretization").
"""
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.integrate import solve_ivp

from ssm.discretize import (
    SELECTIVE_METHODS,
    exp_trapezoid,
    exp_trapezoid_diag,
    selective_discretize,
    selective_discretize_diag,
)
from tests.utils import assert_close

F64, C128 = torch.float64, torch.complex128
pytestmark = pytest.mark.usefixtures("one_thread")


def _ode(A: np.ndarray, x0: np.ndarray, g, dt: float) -> np.ndarray:
    """x(dt) of `x' = A x + g(s)`, x(0) = x0 (A dense (N, N), real or complex)."""
    sol = solve_ivp(lambda s, x: A @ x + g(s), (0.0, dt), x0.astype(np.complex128), method="DOP853",
                    rtol=1e-13, atol=1e-15)
    assert sol.success
    return sol.y[:, -1]


def _system(kind: str, N: int, seed: int):
    """(A as given to the function under test, A as a dense numpy matrix, B, x0)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "diag_real":
        A = -torch.rand(N, generator=g, dtype=F64) * 3 - 0.1
        dense = np.diag(A.numpy())
    elif kind == "diag_complex":
        A = torch.complex(-torch.rand(N, generator=g, dtype=F64) * 2 - 0.1, torch.randn(N, generator=g, dtype=F64) * 4)
        dense = np.diag(A.numpy())
    else:
        A = torch.randn(N, N, generator=g, dtype=F64)
        A = A - (torch.linalg.eigvals(A).real.max() + 0.5) * torch.eye(N, dtype=F64)
        dense = A.numpy()
    B = torch.randn(N, generator=g, dtype=F64)
    x0 = torch.randn(N, generator=g, dtype=F64)
    return A, dense, B, x0


def _apply(A, Ab, x0):
    """Ab x0 for a diagonal (elementwise) or dense Ab."""
    return Ab * x0 if A.dim() == 1 else Ab @ x0.to(Ab.dtype)


KINDS = ["diag_real", "diag_complex", "dense"]


def _euler_zoh(kind, A, B, dt, method):
    fn = selective_discretize if kind == "dense" else selective_discretize_diag
    return fn(A, B, dt, method)


def _trapezoid(kind, A, dt, lam):
    fn = exp_trapezoid if kind == "dense" else exp_trapezoid_diag
    return fn(A, dt, lam)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dt", [0.05, 0.7])
def test_zoh_is_exact_for_constant_input(kind, dt):
    A, dense, B, x0 = _system(kind, 5, seed=1)
    u = 0.8
    Ab, Bb = _euler_zoh(kind, A, B, dt, "zoh")
    got = _apply(A, Ab, x0) + Bb * u
    want = _ode(dense, x0.numpy(), lambda s: B.numpy() * u, dt)
    assert_close(got.to(C128), torch.from_numpy(want), rtol=1e-10, atol=1e-12, name="zoh step")


@pytest.mark.parametrize("kind", KINDS)
def test_exp_euler_local_error_is_minus_half_dt_squared_A_B_u(kind):
    """With x(0) = 0 and constant u the exact step is `(dt + dt^2 A/2 + ...) B u`; Euler keeps
    `dt B u`, so its error is `-dt^2/2 A B u + O(dt^3)`: local order 2, global order 1."""
    A, dense, B, _ = _system(kind, 4, seed=2)
    u = 1.3
    errs = []
    for dt in (0.02, 0.01, 0.005):
        _, Bb = _euler_zoh(kind, A, B, dt, "exp_euler")
        assert_close(Bb, dt * B, name="euler input gain")
        want = _ode(dense, np.zeros(4), lambda s: B.numpy() * u, dt)
        err = Bb.numpy() * u - want
        lead = -dt * dt / 2 * (dense @ B.numpy()) * u
        assert np.abs(err - lead).max() <= 2 * dt ** 3 * np.abs(dense @ dense @ B.numpy()).max() * u
        errs.append(np.abs(err).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(rates - 2) < 0.1), rates


def _linear_integrand_forcing(dense: np.ndarray, dt: float, p: np.ndarray, q: np.ndarray):
    """g(s) = e^{-A(dt-s)} (p + q s): the integrand e^{A(dt-s)} g(s) = p + q s is linear in s."""
    return lambda s: scipy.linalg.expm(-dense * (dt - s)) @ (p + q * s)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lam", [0.5, 0.2, 1.0])
def test_trapezoid_error_on_linear_integrand(kind, lam):
    """Trapezoid with weights (1-lam, lam) on `int_0^dt (p + q s) ds = p dt + q dt^2/2` gives
    `p dt + lam q dt^2`: exact at lam = 1/2, off by exactly `(lam - 1/2) q dt^2` otherwise."""
    A, dense, _, x0 = _system(kind, 4, seed=3)
    g = torch.Generator().manual_seed(4)
    p = torch.randn(4, generator=g, dtype=F64).numpy()
    q = torch.randn(4, generator=g, dtype=F64).numpy()
    dt = 0.3
    forcing = _linear_integrand_forcing(dense, dt, p, q)
    Ab, w_new, w_prev = _trapezoid(kind, A, dt, lam)
    g0 = torch.from_numpy(forcing(0.0)).to(C128)
    g1 = torch.from_numpy(forcing(dt)).to(C128)
    got = _apply(A, Ab.to(C128), x0.to(C128)) + _apply(A, w_prev.to(C128), g0) + w_new * g1
    want = _ode(dense, x0.numpy(), forcing, dt) + (lam - 0.5) * q * dt * dt
    assert_close(got, torch.from_numpy(want), rtol=1e-10, atol=1e-12, name=f"trapezoid lam={lam}")


@pytest.mark.parametrize("kind", ["diag_complex", "dense"])
@pytest.mark.parametrize("lam,order", [(0.5, 3), (0.25, 2)])
def test_trapezoid_local_order_on_smooth_input(kind, lam, order):
    """Smooth forcing g(s) = B cos(3 (t0 + s)): local error O(dt^3) at lam = 1/2, O(dt^2) else."""
    A, dense, B, x0 = _system(kind, 4, seed=5)
    t0 = 0.4

    def forcing(s):
        return B.numpy() * math.cos(3 * (t0 + s))

    errs = []
    for dt in (0.04, 0.02, 0.01):
        Ab, w_new, w_prev = _trapezoid(kind, A, dt, lam)
        g0, g1 = (torch.from_numpy(forcing(s)).to(C128) for s in (0.0, dt))
        got = _apply(A, Ab.to(C128), x0.to(C128)) + _apply(A, w_prev.to(C128), g0) + w_new * g1
        errs.append(np.abs(got.numpy() - _ode(dense, x0.numpy(), forcing, dt)).max())
    rates = np.log2(np.array(errs[:-1]) / np.array(errs[1:]))
    assert np.all(np.abs(rates - order) < 0.15), rates


@pytest.mark.parametrize("kind", KINDS)
def test_trapezoid_at_lam_one_is_exp_euler(kind):
    A, _, B, _ = _system(kind, 3, seed=6)
    Ab, w_new, w_prev = _trapezoid(kind, A, 0.2, 1.0)
    Ae, Be = _euler_zoh(kind, A, B, 0.2, "exp_euler")
    assert_close(Ab, Ae, name="Ab")
    assert torch.count_nonzero(w_prev) == 0
    assert_close(w_new * B, Be, name="input gain")


@pytest.mark.parametrize("complex_A", [False, True])
def test_zoh_small_A_limit(complex_A):
    """`(exp(dt A) - 1)/A` against its series `dt sum_k (dt A)^k / (k+1)!` down to A = 0."""
    mags = torch.tensor([0.0, 1e-300, 1e-18, 1e-9, 1e-5, 1e-3], dtype=F64)
    A = -mags if not complex_A else torch.complex(-mags, 0.7 * mags)
    dt = 0.3
    B = torch.ones_like(A)
    _, Bb = selective_discretize_diag(A, B, dt, "zoh")
    z = dt * A
    series = dt * sum(z ** k / math.factorial(k + 1) for k in range(8))
    assert_close(Bb, series, rtol=1e-15, atol=0.0, name="zoh gain near A = 0")
    assert Bb[0] == dt
    A32 = A.to(torch.complex64 if complex_A else torch.float32)
    _, Bb32 = selective_discretize_diag(A32, B.to(A32.dtype), dt, "zoh")
    assert_close(Bb32, series, rtol=2e-7, atol=0.0, dtype=A32.dtype, name="float32 zoh gain")


@pytest.mark.parametrize("complex_A", [False, True])
def test_zoh_gradients_near_A_zero(complex_A):
    """d Bb / dA = dt^2 phi'(dt A) with phi(z) = (e^z - 1)/z, phi'(z) = sum_k (k+1) z^k / (k+2)!;
    d Bb / d dt = exp(dt A). Magnitudes on both sides of the series/closed-form switch."""
    mags = torch.tensor([0.0, 1e-12, 1e-6, 0.3, 0.33, 0.34, 2.0], dtype=F64)  # dt A in [0, 0.6]
    A = (-mags if not complex_A else torch.complex(-mags, 0.5 * mags)).requires_grad_()
    dt = torch.full((7,), 0.3, dtype=F64, requires_grad=True)
    _, Bb = selective_discretize_diag(A, torch.ones_like(A.detach()), dt, "zoh")
    gA, gdt = torch.autograd.grad(Bb.real.sum(), (A, dt))
    z = (dt * A).detach()
    dphi = sum((k + 1) / float(math.factorial(k + 2)) * z ** k for k in range(25))
    want_A = 0.3 ** 2 * dphi
    assert_close(gA, want_A.conj() if complex_A else want_A, rtol=1e-13, atol=0.0, name="dBb/dA")
    assert_close(gdt, torch.exp(z).real, rtol=1e-14, atol=0.0, name="dBb/ddt")
    assert torch.autograd.gradcheck(
        lambda a, d: selective_discretize_diag(a, torch.ones_like(a), d, "zoh", check=False)[1],
        (A.detach()[1:].clone().requires_grad_(), dt.detach()[1:].clone().requires_grad_()))


def test_dense_zoh_with_singular_A():
    A = torch.zeros(3, 3, dtype=F64)
    B = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    Ab, Bb = selective_discretize(A, B, 0.25, "zoh")
    assert_close(Ab, torch.eye(3, dtype=F64), name="Ab")
    assert_close(Bb, 0.25 * B, name="Bb")


@pytest.mark.parametrize("kind", ["diag_real", "diag_complex"])
@pytest.mark.parametrize("scheme", [*SELECTIVE_METHODS, "exp_trapezoid"])
def test_dense_equals_diag_on_a_diagonal_matrix(kind, scheme):
    A, _, B, _ = _system(kind, 6, seed=7)
    dt = torch.tensor([0.05, 0.4], dtype=F64)  # two tokens
    lam = torch.tensor([0.3, 0.9], dtype=F64)
    if scheme == "exp_trapezoid":
        diag = exp_trapezoid_diag(A, dt[:, None], lam[:, None])
        dense = exp_trapezoid(torch.diag_embed(A), dt, lam)
        assert_close(dense[1], diag[1][:, 0], name="w_new")
        for d, m in ((diag[0], dense[0]), (diag[2], dense[2])):
            assert_close(m, torch.diag_embed(d), name=scheme)
        return
    Ab, Bb = selective_discretize_diag(A, B, dt[:, None], scheme)
    Ad, Bd = selective_discretize(torch.diag_embed(A), B, dt, scheme)
    assert_close(Ad, torch.diag_embed(Ab), name="Ab")
    assert_close(Bd, Bb.to(Bd.dtype), name="Bb")


def test_per_token_broadcasting():
    """A (H, N) per channel, B (B, L, 1, N) per token, dt (B, L, H, 1) per token and channel."""
    Bsz, L, H, N = 2, 5, 3, 4
    A = -torch.rand(H, N, dtype=F64) - 0.1
    B = torch.randn(Bsz, L, 1, N, dtype=F64)
    dt = torch.rand(Bsz, L, H, 1, dtype=F64) + 0.01
    for method in SELECTIVE_METHODS:
        Ab, Bb = selective_discretize_diag(A, B, dt, method)
        assert Ab.shape == Bb.shape == (Bsz, L, H, N)
        assert_close(Bb[1, 2, 0], selective_discretize_diag(A[0], B[1, 2, 0], dt[1, 2, 0], method)[1], name=method)
    Ab, w_new, w_prev = exp_trapezoid_diag(A, dt, 0.5)
    assert Ab.shape == w_prev.shape == (Bsz, L, H, N) and w_new.shape == (Bsz, L, H, 1)
    Ad, wd_new, wd_prev = exp_trapezoid(torch.diag_embed(A[0]), dt[..., 0, 0], 0.5)
    assert Ad.shape == wd_prev.shape == (Bsz, L, N, N) and wd_new.shape == (Bsz, L)


def test_bad_inputs():
    A = -torch.rand(3, 4, dtype=F64)
    with pytest.raises(ValueError, match="method"):
        selective_discretize_diag(A, A, 0.1, "bilinear")
    with pytest.raises(ValueError, match="dt"):
        selective_discretize_diag(A, A, -0.1, "zoh")
    with pytest.raises(ValueError, match="broadcast"):
        selective_discretize_diag(A, A, torch.ones(5, dtype=F64), "exp_euler")
    with pytest.raises(ValueError, match="lam"):
        exp_trapezoid_diag(A, 0.1, 1.5)
    with pytest.raises(TypeError, match="lam"):
        exp_trapezoid_diag(A, 0.1, "half")
    with pytest.raises(ValueError, match=r"A must have shape \(\.\.\., N, N\)"):
        selective_discretize(A, A[0], 0.1, "zoh")
    with pytest.raises(ValueError, match="B must have shape"):
        selective_discretize(torch.eye(3, dtype=F64), A[0], 0.1, "exp_euler")
    with pytest.raises(ValueError, match="leading dims"):
        exp_trapezoid(torch.eye(3, dtype=F64).expand(2, 3, 3), torch.ones(4, dtype=F64), 0.5)
