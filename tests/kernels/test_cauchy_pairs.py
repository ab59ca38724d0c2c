"""The CPU pair path of the Cauchy product (symmetric form at purely imaginary points, complex64).

Ground truth: the plain formula `cauchy_ref` in complex128; the fast path is held to the error
budget of the same formula in complex64. The default tests run the pair blocks eagerly (the
compiled kernel is the same code through inductor); the slow test compiles them.
"""
from __future__ import annotations

import pytest
import torch

import kernels.cauchy.reference as reference
from kernels.cauchy import cauchy_mult, cauchy_ref
from ssm import filters
from tests.utils import assert_close, assert_within_budget


@pytest.fixture
def eager_pairs(monkeypatch):
    """Route every large-enough call through the pair path, running its blocks without compiling."""
    monkeypatch.setattr(reference, "PAIR_MIN_WORK", 0)
    monkeypatch.setattr(reference, "_run_compiled", lambda fn, *args: fn(*args))
    monkeypatch.delenv("SSMKIT_CPU_COMPILE", raising=False)


def s4_like(R, H, N, M, *, extreme=False):
    """S4-like poles dt*Lambda/2 and points i*tan(pi j / L) (complex128); with `extreme`, points
    at 0, on a pole's imaginary part, and |z| = 1e4, and a pole with |w| = 1e3."""
    L = 2 * M
    j = torch.arange(M, dtype=torch.float64)
    z = torch.complex(torch.zeros(M, dtype=torch.float64), torch.tan(torch.pi * j / L))     # (M,)
    dt = torch.exp(torch.rand(H, dtype=torch.float64) * 4.6 - 6.9)                            # (H,)
    n = torch.arange(N, dtype=torch.float64)
    lam = torch.complex(-0.5 - torch.rand(H, N, dtype=torch.float64), torch.pi * n * (1 + torch.rand(H, N, dtype=torch.float64)))
    w = dt[:, None] / 2 * lam                                                                  # (H, N)
    if extreme:
        z[1], z[2] = 1j * w[0, 1].imag, 1e4j
        w[1, 0] = complex(-3.0, 1e3)
    v = torch.randn(R, H, N, dtype=torch.complex128)                                          # (R, H, N)
    return v, z, w


def grads(fn, v, z, w, g):
    """fn(v, z, w) and its gradients w.r.t. v and w (z is a constant, as in S4)."""
    v, w = v.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    out = fn(v, z, w)
    return (out.detach(), *torch.autograd.grad(out, (v, w), g.to(out.dtype)))


def check(R, H, N, M, extreme=False):
    torch.manual_seed(R * 1000 + H * 10 + N)
    v, z, w = s4_like(R, H, N, M, extreme=extreme)
    g = torch.randn(R, H, M, dtype=torch.complex128)
    plain = lambda a, b, c: cauchy_ref(a, b, c, True)  # noqa: E731
    fast = lambda a, b, c: cauchy_mult(a, b, c, symmetric=True, backend="torch")  # noqa: E731
    lo = [t.to(torch.complex64) for t in (v, z, w)]
    truth, ref32, got = grads(plain, v, z, w, g), grads(plain, *lo, g), grads(fast, *lo, g)
    for name, f, p, t in zip(("out", "grad_v", "grad_w"), got, ref32, truth):
        assert f.dtype == torch.complex64
        assert_within_budget(f, p, t, name=name)


@pytest.mark.parametrize("R,H,N,M", [(1, 1, 1, 2), (4, 3, 5, 17), (5, 19, 3, 40), (9, 2, 32, 300)])
def test_pair_path_matches_truth(R, H, N, M, eager_pairs):
    assert reference.use_pair_path(*[torch.zeros(1, H, N, dtype=torch.complex64)],
                                   torch.zeros(M, dtype=torch.complex64), torch.zeros(H, N, dtype=torch.complex64), True)
    check(R, H, N, M)


def test_pair_path_extreme_points(eager_pairs):
    check(4, 3, 6, 50, extreme=True)


def test_point_blocks_and_row_blocks(eager_pairs, monkeypatch):
    # Ragged channel blocks (7 = 3 + 3 + 1) and point blocks in the backward (40 = 14 + 14 + 12).
    monkeypatch.setattr(reference, "PAIR_ROWS", 3)
    monkeypatch.setattr(reference, "PAIR_POINTS", 16)
    check(6, 7, 4, 40)


def test_other_cases_keep_the_tiled_path(eager_pairs):
    v, z, w = (t.to(torch.complex64) for t in s4_like(2, 2, 3, 8))
    assert reference.use_pair_path(v, z, w, True)
    assert not reference.use_pair_path(v, z, w, False)                                      # not symmetric
    assert not reference.use_pair_path(v.to(torch.complex128), z.to(torch.complex128), w.to(torch.complex128), True)
    z_off = z.clone()
    z_off[3] = z_off[3] + 1e-3                                                              # one point off the axis
    assert not reference.use_pair_path(v, z_off, w, True)


def test_compile_failure_falls_back(monkeypatch):
    monkeypatch.setattr(reference, "PAIR_MIN_WORK", 0)
    monkeypatch.setattr(reference, "_PAIR_BROKEN", False)
    monkeypatch.setattr(reference, "_compiled", {})

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    v, z, w = (t.to(torch.complex64) for t in s4_like(3, 2, 4, 9))
    with pytest.warns(RuntimeWarning, match="compiling the CPU pair kernel failed"):
        out = cauchy_mult(v, z, w, symmetric=True, backend="torch")
    assert reference._PAIR_BROKEN
    assert_within_budget(out, cauchy_ref(v, z, w, True), cauchy_ref(*(t.to(torch.complex128) for t in (v, z, w)), True))


def test_dplr_filter_same_on_both_paths(eager_pairs, monkeypatch):
    # The S4 filter and its gradients through the pair path equal the tiled path's.
    torch.manual_seed(3)
    H, N2, L, c, r = 3, 4, 64, 2, 2
    Lam = torch.complex(-0.5 - torch.rand(H, N2), 3 * torch.randn(H, N2))
    P, B = torch.randn(r, H, N2, dtype=torch.complex64), torch.randn(H, N2, dtype=torch.complex64)
    Ct, dt = torch.randn(c, H, N2, dtype=torch.complex64), torch.rand(H) * 0.1 + 1e-3
    leaves = [t.requires_grad_() for t in (Lam, P, B, Ct, dt)]
    gK = torch.randn(c, H, L)

    def run():
        K = filters.dplr_filter(*leaves, L, backend="torch")
        return (K.detach(), *torch.autograd.grad(K, leaves, gK))
    pair = run()
    monkeypatch.setattr(reference, "PAIR_MIN_WORK", 1 << 62)
    tiled = run()
    for name, a, b in zip(("K", "Lambda", "P", "B", "Ct", "dt"), pair, tiled):
        assert_close(a, b, rtol=2e-4, atol=2e-5 * max(1.0, b.abs().max().item()), name=name)


@pytest.mark.slow
def test_compiled_pair_blocks_match_truth(monkeypatch):
    # Compiles both blocks with inductor (tens of seconds on 2 cores, cached on disk afterwards).
    monkeypatch.setattr(reference, "PAIR_MIN_WORK", 0)
    monkeypatch.delenv("SSMKIT_CPU_COMPILE", raising=False)
    check(4, 20, 32, 600)
    check(5, 3, 7, 33, extreme=True)
    assert not reference._PAIR_BROKEN
