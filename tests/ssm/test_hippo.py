"""HiPPO matrices (docs/hippo.md): exact entries, NPLR reconstruction, diagonal inits, O(N) matvec."""
import math

import numpy as np
import pytest
import torch
from scipy.special import eval_legendre

from ssm.hippo import (MEASURES, diag_init, nplr, rank_correction, transition,
                       transition_matvec)
from tests.utils import assert_close

F64 = torch.float64


def _full(Lambda, P, B, V):
    return (torch.cat([Lambda, Lambda.conj()]), torch.cat([P, P.conj()], dim=-1),
            torch.cat([B, B.conj()]), torch.cat([V, V.conj()], dim=-1))


def _rebuild(Lambda, P, V):
    return V @ (torch.diag(Lambda) - P.T @ P.conj()) @ V.conj().T  # (N, N)


@pytest.mark.parametrize("measure", MEASURES)
def test_transition_shapes_dtype(measure):
    A, B = transition(measure, 7)
    assert A.shape == (7, 7) and B.shape == (7,)
    assert A.dtype == F64 and B.dtype == F64


def test_transition_entries_small():
    r3, r5 = math.sqrt(3), math.sqrt(5)
    A, B = transition("legs", 3)
    assert_close(A, torch.tensor([[-1, 0, 0], [-r3, -2, 0], [-r5, -r3 * r5, -3]], dtype=F64))
    assert_close(B, torch.tensor([1, r3, r5], dtype=F64))
    A, B = transition("legt", 3, theta=2.0)
    expect = -torch.tensor([[1, -r3, r5], [r3, 3, -r3 * r5], [r5, r3 * r5, 5]], dtype=F64) / 2
    assert_close(A, expect)
    assert_close(B, torch.tensor([1, r3, r5], dtype=F64) / 2)
    A, B = transition("lagt", 3, beta=0.5)
    assert_close(A, torch.tensor([[-0.5, 0, 0], [-1, -0.5, 0], [-1, -1, -0.5]], dtype=F64))
    assert_close(B, torch.full((3,), 0.5, dtype=F64))
    A, B = transition("fout", 5)
    b = torch.tensor([1, 0, math.sqrt(2), 0, math.sqrt(2)], dtype=F64)
    rot = torch.zeros(5, 5, dtype=F64)
    rot[2, 1], rot[1, 2], rot[4, 3], rot[3, 4] = math.pi, -math.pi, 2 * math.pi, -2 * math.pi
    assert_close(A, rot - b[:, None] * b[None, :])
    assert_close(B, b)


def test_legt_is_the_window_projection_ode():
    # d/dt of the Legendre coefficients of f on [t-1, t] equals A c + B f(t) for a polynomial f
    # of degree < N, where truncation is exact.
    # docs/hippo.md#legt-translated-legendre-sliding-window-t---theta-t
    N, t = 6, 0.7
    coef = torch.tensor([0.3, -1.2, 0.5, 0.8, -0.4], dtype=F64)  # degree 4 < N

    def f(s):
        return sum(float(a) * s ** i for i, a in enumerate(coef))

    def fprime(s):
        return sum(i * float(a) * s ** (i - 1) for i, a in enumerate(coef) if i)

    x, w = np.polynomial.legendre.leggauss(40)
    g = np.stack([math.sqrt(2 * n + 1) * eval_legendre(n, x) for n in range(N)])  # (N, Q)

    def proj(fun, tt):
        s = tt - 1 + (x + 1) / 2
        return torch.tensor(g @ (w * fun(s)) / 2)

    c, dc = proj(f, t), proj(fprime, t)  # d/dt c = projection of f' (window moves rigidly)
    A, B = transition("legt", N)
    assert_close(A @ c + B * f(t), dc)


def test_legs_is_the_scaled_projection_ode():
    # t d/dt c = A c + B f(t) for the coefficients of f on [0, t], f polynomial.
    # docs/hippo.md#legs-scaled-legendre-uniform-measure-on-0-t
    N, t, h = 6, 1.3, 1e-4
    x, w = np.polynomial.legendre.leggauss(40)
    g = np.stack([math.sqrt(2 * n + 1) * eval_legendre(n, x) for n in range(N)])  # (N, Q)

    def f(s):
        return 0.5 - s + 0.3 * s ** 3

    def proj(tt):
        return torch.tensor(g @ (w * f(tt * (x + 1) / 2)) / 2)

    dc = (proj(t + h) - proj(t - h)) / (2 * h)
    A, B = transition("legs", N)
    # own tolerance: dc is a central difference with h = 1e-4, whose truncation error O(h^2) is
    # far above float64 rounding (measured: 1e-9)
    assert_close(A @ proj(t) + B * f(t), t * dc, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [1, 2, 3, 5, 8, 9, 16, 64])
def test_rank_correction_makes_normal(measure, N):
    A, _ = transition(measure, N)
    P = rank_correction(measure, N)
    assert P.shape == ({"legt": 2}.get(measure, 1), N) and P.dtype == F64
    M = A + P.T @ P
    assert_close(M @ M.T, M.T @ M)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [1, 3, 7, 9, 33, 64])
def test_nplr_full_rebuilds_A(measure, N):
    A, B = transition(measure, N)
    Lambda, P, Bv, V = nplr(measure, N, half=False)
    assert Lambda.shape == (N,) and V.shape == (N, N) and Bv.shape == (N,)
    assert Lambda.dtype == torch.complex128
    assert_close(V.conj().T @ V, torch.eye(N, dtype=torch.complex128))
    # own tolerances, absolute (rtol=0: entries near 0 get no relative slack). The rebuilt A's bound
    # grows with N because the eigendecomposition's round-off grows with ||A|| ~ N (measured: 5e-13
    # at N = 64); V @ Bv keeps 1e-10, tighter than the table for entries of B >= 1 (measured: 3e-14).
    assert_close(_rebuild(Lambda, P, V), A.to(torch.complex128), rtol=0, atol=1e-10 * max(1, N))
    assert_close(V @ Bv, B.to(torch.complex128), rtol=0, atol=1e-10)


@pytest.mark.parametrize("measure", MEASURES)
@pytest.mark.parametrize("N", [2, 4, 6, 16, 64, 100])
def test_nplr_half_rebuilds_A(measure, N):
    A, B = transition(measure, N)
    Lambda, P, Bv, V = nplr(measure, N, half=True)
    rank = rank_correction(measure, N).shape[0]
    assert Lambda.shape == (N // 2,) and P.shape == (rank, N // 2)
    assert Bv.shape == (N // 2,) and V.shape == (N, N // 2)
    assert bool((Lambda.imag >= 0).all())
    Lf, Pf, Bf, Vf = _full(Lambda, P, Bv, V)
    assert_close(Vf.conj().T @ Vf, torch.eye(N, dtype=torch.complex128))
    # own tolerances as in test_nplr_full_rebuilds_A (measured: 1.3e-12 at N = 100, 2e-13 for V @ B)
    assert_close(_rebuild(Lf, Pf, Vf), A.to(torch.complex128), rtol=0, atol=1e-10 * N)
    assert_close(Vf @ Bf, B.to(torch.complex128), rtol=0, atol=1e-10)


def test_nplr_legs_real_part():
    Lambda = nplr("legs", 32)[0]
    assert_close(Lambda.real, torch.full((16,), -0.5, dtype=F64))


def test_nplr_errors():
    with pytest.raises(ValueError, match="even N"):
        nplr("legs", 5, half=True)
    with pytest.raises(ValueError, match="measure must be one of"):
        nplr("foo", 4)


def test_diag_init_values():
    N = 8
    n = torch.arange(4, dtype=F64)
    assert_close(diag_init("lin", N), torch.complex(-0.5 * torch.ones(4, dtype=F64), math.pi * n))
    inv = diag_init("inv", N)
    assert_close(inv.imag, (N / math.pi) * (N / (2 * n + 1) - 1))
    assert_close(inv.real, torch.full((4,), -0.5, dtype=F64))
    assert_close(diag_init("real", N), torch.complex(-(n + 1), torch.zeros(4, dtype=F64)))
    legs = diag_init("legs", N)
    assert legs.shape == (4,) and legs.dtype == torch.complex128
    assert_close(legs, nplr("legs", N)[0])
    # legs eigenvalues are those of the normal part A + P^T P of LegS
    A, _ = transition("legs", N)
    P = rank_correction("legs", N)
    ev = torch.linalg.eigvals(A + P.T @ P)
    ev = ev[ev.imag >= 0]
    assert_close(torch.sort(ev.imag).values, torch.sort(legs.imag).values)


def test_diag_init_errors():
    with pytest.raises(ValueError, match="even N"):
        diag_init("lin", 7)
    with pytest.raises(ValueError, match="init must be one of"):
        diag_init("hippo", 8)


@pytest.mark.parametrize("bad", ["LegS", "legendre", ""])
def test_unknown_measure(bad):
    with pytest.raises(ValueError, match="legt.*legs.*lagt.*fout"):
        transition(bad, 4)
    with pytest.raises(ValueError, match="measure must be one of"):
        rank_correction(bad, 4)


def test_bad_sizes():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="N must be a positive int"):
            transition("legs", bad)
    with pytest.raises(ValueError, match="theta"):
        transition("legt", 4, theta=0.0)


@pytest.mark.parametrize("measure", ["legs", "legt"])
@pytest.mark.parametrize("N", [1, 2, 5, 17, 64])
def test_matvec_matches_dense(measure, N):
    theta = 0.37 if measure == "legt" else 1.0
    A, _ = transition(measure, N, theta=theta)
    x = torch.randn(3, 4, N, dtype=F64)
    assert_close(transition_matvec(measure, x, theta=theta), x @ A.T)
    xc = torch.randn(2, N, dtype=torch.complex128)
    assert_close(transition_matvec(measure, xc, theta=theta), xc @ A.T.to(xc.dtype))
    x32 = x.float()
    # own tolerance: in float32 the cumulative sums of N terms of size up to ~N round at every
    # partial sum, so the absolute error grows like N^2 (measured: 3x the float32 table at N = 64)
    assert_close(transition_matvec(measure, x32, theta=theta), (x @ A.T).float(), rtol=1e-4,
                 atol=1e-5 * N * N)


def test_matvec_errors():
    with pytest.raises(ValueError, match="legs"):
        transition_matvec("fout", torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        transition_matvec("legs", torch.zeros(()))
