"""SSM -> convolution filter (docs/s4.md, "Filters"): both forms against `C Ab^l Bb` by direct powers
in float64, and the diagonal discretization the filters use against its plain formula."""
import pytest
import torch

from ssm import filters
from tests.utils import assert_close


def _random_dplr(H=3, N2=4, r=1, c=2):
    Lam = torch.complex(-torch.rand(H, N2, dtype=torch.float64) - 0.1, torch.randn(H, N2, dtype=torch.float64) * 3)
    P = torch.randn(r, H, N2, dtype=torch.complex128) * 0.5
    B = torch.randn(H, N2, dtype=torch.complex128)
    Ct = torch.randn(c, H, N2, dtype=torch.complex128)
    dt = torch.rand(H, dtype=torch.float64) * 0.5 + 0.05
    return Lam, P, B, Ct, dt


def _powers(C, Ab, Bb, L):
    x, out = Bb.clone(), []
    for _ in range(L):
        out.append(torch.einsum("chn,hn->ch", C, x))
        x = torch.einsum("hnm,hm->hn", Ab, x)
    return torch.stack(out, dim=-1)                                   # (c, H, L) complex


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
@pytest.mark.parametrize("L", [1, 17, 64])
def test_diag_filter_equals_direct_powers(method, L):
    Lam, _, B, C, dt = _random_dplr()
    log_z, Bb = filters.diag_discretize(Lam, B, dt, method)
    dtA = dt[:, None] * Lam
    z = torch.exp(dtA) if method == "zoh" else (1 + dtA / 2) / (1 - dtA / 2)
    want = torch.stack([2 * (C * Bb * z ** l).sum(-1).real for l in range(L)], dim=-1)
    assert_close(filters.diag_filter(C, log_z, Bb, L, backend="torch"), want, name=f"diag {method}")


@pytest.mark.parametrize("r", [1, 2])
@pytest.mark.parametrize("L", [1, 16, 17, 64])
def test_dplr_filter_equals_direct_powers(r, L):
    Lam, P, B, Ct, dt = _random_dplr(r=r)
    K = filters.dplr_filter(Lam, P, B, Ct, dt, L, backend="torch")
    Ab, Bb = filters.dplr_dense(Lam, P, B, dt)
    C = filters.ct_to_c(filters.full_c(Ct), Ab, L)
    want = _powers(C, Ab, Bb, L)
    assert want.imag.abs().max() < 1e-10                              # conjugate symmetry => real K
    assert_close(K, want.real, name=f"dplr r={r} L={L}")


def test_dplr_dense_is_the_full_bilinear_system():
    Lam, P, B, _, dt = _random_dplr(H=2, N2=3, r=2)
    Ab, Bb = filters.dplr_dense(Lam, P, B, dt)
    Lf, Pf = torch.cat([Lam, Lam.conj()], -1), torch.cat([P, P.conj()], -1)
    A = torch.diag_embed(Lf) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    I = torch.eye(6, dtype=A.dtype)
    for h in range(2):
        lhs = I - dt[h] / 2 * A[h]
        assert_close(lhs @ Ab[h], I + dt[h] / 2 * A[h], name="Ab")
        assert_close(lhs @ Bb[h], dt[h] * torch.cat([B[h], B[h].conj()]), name="Bb")


def test_ct_c_roundtrip():
    Lam, P, B, Ct, dt = _random_dplr()
    Ab, _ = filters.dplr_dense(Lam, P, B, dt)
    Ctf = filters.full_c(Ct)
    assert_close(filters.c_to_ct(filters.ct_to_c(Ctf, Ab, 40), Ab, 40), Ctf, name="roundtrip")


@pytest.mark.parametrize("L", [16, 17])
def test_dplr_with_zero_low_rank_equals_diag_bilinear(L):
    Lam, P, B, C, dt = _random_dplr()
    log_z, Bb = filters.diag_discretize(Lam, B, dt, "bilinear")
    Ct = C * (1 - torch.exp(log_z * L))                               # Ct = C (I - Ab^L), diagonal
    K_dplr = filters.dplr_filter(Lam, torch.zeros_like(P), B, Ct, dt, L, backend="torch")
    assert_close(K_dplr, filters.diag_filter(C, log_z, Bb, L, backend="torch"), name="P=0")


def test_filters_in_complex64_close_to_truth():
    Lam, P, B, Ct, dt = _random_dplr(r=2)
    L = 256
    truth = filters.dplr_filter(Lam, P, B, Ct, dt, L, backend="torch")
    K32 = filters.dplr_filter(Lam.to(torch.complex64), P.to(torch.complex64), B.to(torch.complex64),
                              Ct.to(torch.complex64), dt.float(), L, backend="torch")
    assert K32.dtype == torch.float32
    assert_close(K32, truth, rtol=1e-4, atol=1e-4 * truth.abs().max().item(), name="dplr complex64")


def test_filters_auto_backend_matches_reference():
    """The dispatchers' default path (Triton interpreter under the test conftest) at a tiny size."""
    Lam, P, B, Ct, dt = (t.to(torch.complex64) if t.is_complex() else t.float() for t in _random_dplr(H=2, N2=4))
    for L in (8, 9):
        want = filters.dplr_filter(Lam, P, B, Ct, dt, L, backend="torch")
        assert_close(filters.dplr_filter(Lam, P, B, Ct, dt, L), want, rtol=1e-4, atol=1e-5, name="dplr auto")
        log_z, Bb = filters.diag_discretize(Lam, B, dt, "zoh")
        want = filters.diag_filter(Ct, log_z, Bb, L, backend="torch")
        assert_close(filters.diag_filter(Ct, log_z, Bb, L), want, rtol=1e-4, atol=1e-5, name="diag auto")


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_diag_discretize_equals_plain_formula(method):
    """The pole's log and Bb the layer uses, against the textbook formulas in complex128."""
    Lam, _, B, _, dt = _random_dplr()
    log_z, Bb = filters.diag_discretize(Lam, B, dt, method)
    dtA = dt[:, None] * Lam
    if method == "zoh":
        z, want_B = torch.exp(dtA), (torch.exp(dtA) - 1) / Lam * B
    else:
        z, want_B = (1 + dtA / 2) / (1 - dtA / 2), dt[:, None] * B / (1 - dtA / 2)
    assert_close(Bb, want_B, name="Bb")
    assert_close(torch.exp(log_z), z, name="pole")


def test_diag_discretize_small_dt_in_complex64():
    """dt = 1e-6 in complex64: Bb keeps float32 relative accuracy (exp(dt A) - 1 would lose ~all)."""
    Lam, _, B, _, _ = _random_dplr()
    dt = torch.full((Lam.shape[0],), 1e-6, dtype=torch.float64)
    Lam32, B32, dt32 = Lam.to(torch.complex64), B.to(torch.complex64), dt.float()
    z = dt32.double()[:, None] * Lam32.to(torch.complex128)
    want = dt32.double()[:, None] * (1 + z / 2 + z * z / 6) * B32.to(torch.complex128)  # |z| < 1e-5
    want_bilinear = dt32.double()[:, None] * B32.to(torch.complex128) / (1 - z / 2)
    for method, want_B in (("zoh", want), ("bilinear", want_bilinear)):
        _, Bb = filters.diag_discretize(Lam32, B32, dt32, method)
        assert_close(Bb, want_B.to(torch.complex64), name=method)
