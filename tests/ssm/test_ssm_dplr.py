"""The DPLR parameterization (`ssm.layers.ssm_dplr`, S4): its LegS init against the public
definition, the length `l_max` its learned Ct belongs to, and every HiPPO measure: the matrix at
init, the filter against a dense float64 recurrence in the measure's own basis, conv == step ==
chunks, and the rank/init errors."""
import warnings

import pytest
import torch

from ssm import hippo
from ssm.discretize import discretize
from ssm.layers.s4 import S4
from ssm.layers.s4_init import REAL_FLOOR, nplr_basis, real_floor_shift
from tests.ssm.layer_truth import layer_params, legs_public, mode_signs, ssm_outputs64
from tests.utils import assert_close, run_steps

F32 = torch.finfo(torch.float32).eps
H, N = 3, 8


def test_legs_init_is_the_public_clipped_eigenbasis():
    """Lambda, P, B equal the LegS NPLR form computed here from the definition (numpy), Im(B)
    clipped to [-2, 2]; one unit factor per mode (eigenvector gauge) shared by P and B."""
    lam, P, B = legs_public(N)
    Lam_l, B_l, _, P_l, _ = (t.detach().cdouble() for t in layer_params(S4(H, N, mode="dplr")))
    u = mode_signs(B_l[0], B)
    assert bool((u.abs() == 1).all())
    for name, got, want in (("Lambda", Lam_l, lam), ("B", B_l, u * B), ("P", P_l[0], u * P)):
        assert_close(got, want.expand(H, -1), rtol=0, atol=2 * F32 * float(want.abs().max()), name=name)


def _layer(**kw):
    return S4(H, N, mode="dplr", backend="torch", dt_min=0.01, dt_max=0.3, **kw).eval()


@pytest.mark.parametrize("L", [40, 16, 9])
def test_forward_at_any_length_equals_the_float64_recurrence(L):
    """l_max = 16: longer inputs extend the filter by exact doubling, shorter ones truncate it;
    either way the outputs equal the float64 recurrence of the system whose C is recovered from
    Ct at l_max, and neither l_max nor any parameter changes."""
    m = _layer(l_max=16)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(2, L, H)
    with torch.no_grad():
        y, _ = m(x)
        want = m.output(ssm_outputs64(m, x).float())
    assert_close(y, want, rtol=1e-5, atol=1e-5, name=f"L={L} vs float64 recurrence")
    assert m.l_max == 16
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        assert_close(m.filter(min(L, 16)), m.filter(16)[..., : min(L, 16)], name="truncated l_max filter")


def test_unset_l_max_is_fixed_by_the_first_forward_with_one_warning():
    m = _layer()
    assert m.l_max is None and int(m.ssm.fixed_l_max) == -1
    C = m.ssm.C.detach().clone()
    with pytest.warns(UserWarning, match="l_max was not set") as rec:
        with torch.no_grad():
            m(torch.randn(1, 4, H))
    assert len([w for w in rec if "l_max" in str(w.message)]) == 1
    assert m.l_max == 4 and int(m.ssm.fixed_l_max) == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            m(torch.randn(1, 4, H))
            m(torch.randn(1, 20, H))                                  # longer: extended, not refixed
    assert m.l_max == 4 and torch.equal(m.ssm.C, C)


def test_l_max_setter_writes_the_buffer_and_validates():
    m = _layer()
    m.l_max = 32
    assert int(m.ssm.fixed_l_max) == 32 and m.ssm.l_max == 32 and m.state_dict()["ssm.fixed_l_max"] == 32
    m.l_max = None
    assert m.l_max is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="l_max"):
            m.l_max = bad


# --- every HiPPO measure ---

INITS = ["legs", "legt", "lagt", "fout", "hippo"]
MH, MN = 4, 16  # the per-measure tests' sizes


def _measure_layer(init, **kw):
    # dt up to 0.5 so the filters decay visibly within a few dozen steps
    kw.setdefault("dt_min", 0.01)
    kw.setdefault("dt_max", 0.5)
    return S4(MH, MN, mode="dplr", init=init, backend="torch", **kw).eval()


def _measure_matrices(init):
    """HiPPO (A (MH, MN, MN), B (MH, MN)) of each channel, float64, straight from `hippo.transition`.

    LegT is taken at the public S4 time scale: A and B halved (window 2), as the layer uses it."""
    ms = ["legs"] * ((MH + 1) // 2) + ["fout"] * (MH // 2) if init == "hippo" else [init] * MH
    A, B = zip(*(tuple(0.5 * t for t in hippo.transition(m, MN)) if m == "legt" else hippo.transition(m, MN)
                 for m in ms))
    return torch.stack(A), torch.stack(B)


def _layer_matrices(m):
    """The layer's continuous (A, B) rebuilt densely from its float32 parameters (complex128 math)
    and taken back to the measure's basis with the unitary NPLR basis V: (MH, MN, MN), (MH, MN)."""
    Lam, B, _, P, _ = (t.detach() for t in layer_params(m))
    Lf = torch.cat([Lam, Lam.conj()], -1).cdouble()                    # (MH, MN)
    Pf = torch.cat([P, P.conj()], -1).cdouble()                        # (r, MH, MN)
    Bf = torch.cat([B, B.conj()], -1).cdouble()                        # (MH, MN)
    A_eig = torch.diag_embed(Lf) - torch.einsum("rhi,rhj->hij", Pf, Pf.conj())
    V = nplr_basis(m.init, MN, MH)                                    # (MH, MN, MN)
    A = V @ A_eig @ V.conj().transpose(-1, -2)
    Bo = (V @ Bf.unsqueeze(-1)).squeeze(-1)
    assert A.imag.abs().max() < 1e-10 and Bo.imag.abs().max() < 1e-10  # real systems
    return A.real, Bo.real


@pytest.mark.parametrize("init", INITS)
def test_layer_matrix_is_the_measure_matrix(init):
    m = _measure_layer(init, b_clip=None)                                       # the exact eigenbasis B
    A, B = _layer_matrices(m)
    A_ref, B_ref = _measure_matrices(init)
    shift = real_floor_shift(init, MN, MH)                                # REAL_FLOOR where Re(Lambda) = 0
    A_ref = A_ref - shift[:, None, None] * torch.eye(MN, dtype=torch.float64)
    # the parameters are float32 roundings of the float64 NPLR form; rebuilt through the unitary
    # basis the error measured is about one float32 ulp of the largest entry: allow 8
    ulp = torch.finfo(torch.float32).eps
    assert_close(A, A_ref, rtol=0, atol=8 * ulp * float(A_ref.abs().max()), name=f"{init} A")
    assert_close(B, B_ref, rtol=0, atol=8 * ulp * float(B_ref.abs().max()), name=f"{init} B")
    if init != "legs":
        assert float(shift.max()) == pytest.approx(REAL_FLOOR)          # the floor is the only shift
    assert m.ssm.rank == (2 if init == "legt" else 1) and m.ssm.P.shape[0] == m.ssm.rank


@pytest.mark.parametrize("init", INITS)
def test_filter_equals_dense_float64_recurrence_in_the_measure_basis(init):
    L = 40
    m = _measure_layer(init, l_max=L)
    A, B = _layer_matrices(m)                                           # (MH, MN, MN), (MH, MN) float64
    dt = m.ssm.log_dt.detach().double().exp()
    Ab, Bb = discretize(A, B, dt, "bilinear")                           # dense float64, per channel
    V = nplr_basis(init, MN, MH)
    Ct = torch.view_as_complex(m.ssm.C.detach()).cdouble()                  # (c, MH, N2): the learned Ct
    Ct = torch.einsum("chn,hmn->chm", torch.cat([Ct, Ct.conj()], -1), V.conj())   # (c, MH, MN): Ctf V^*
    eye = torch.eye(MN, dtype=torch.float64)
    # Ct = C (I - Ab^L)  =>  C = Ct (I - Ab^L)^-1
    C = torch.linalg.solve((eye - torch.linalg.matrix_power(Ab, L)).transpose(-1, -2).cdouble(),
                           Ct.unsqueeze(-1)).squeeze(-1)                # (c, MH, MN)
    x, rows = Bb.cdouble(), []
    for _ in range(L):
        rows.append(torch.einsum("chn,hn->ch", C, x).real)
        x = torch.einsum("hnm,hm->hn", Ab.cdouble(), x)
    want = torch.stack(rows, -1)                                        # (c, MH, L)
    with torch.no_grad():
        got = m.filter(L)
    # float32 Cauchy + irfft (TOL float32) on filters of size ~1; the rebuilt A differs from the
    # layer's exact float32 system by the rounding above, well inside this
    assert_close(got, want.float(), rtol=1e-4, atol=1e-5 * float(want.abs().max()), name=f"{init} filter")


@pytest.mark.parametrize("init", INITS)
def test_conv_equals_step_equals_chunks(init):
    m = _measure_layer(init, channels=2)
    x = torch.randn(2, 33, MH)
    with torch.no_grad():
        y, _ = m(x)
        s0 = 0.3 * torch.randn_like(m.default_state(2))
        y_state, s_whole = m(x, state=s0)
        y1, s1 = m(x[:, :10], state=s0)
        y2, s2 = m(x[:, 10:], state=s1)
    # FouT's normal part has an eigenvalue at 0 (the mean state): at DC the Woodbury correction of
    # the float32 Cauchy filter cancels a 1/REAL_FLOOR pole, which costs the conv path ~3e-5 at
    # dt = 0.5 (1e-6 at the default dt <= 0.1); the step is accurate to 1e-6 (test_s4_step)
    tol = 1e-4 if init in ("fout", "hippo") else 1e-5
    assert_close(run_steps(m, x, m.default_state(2))[0], y, rtol=1e-5, atol=tol, name="step vs conv")
    y_step, s_step = run_steps(m, x, s0)
    assert_close(y_step, y_state, rtol=1e-5, atol=tol, name="step vs conv from a state")
    assert_close(s_step, s_whole, rtol=1e-5, atol=1e-5, name="final state")
    assert_close(torch.cat([y1, y2], 1), y_state, rtol=1e-5, atol=tol, name="chunked output")
    assert_close(s2, s_whole, rtol=1e-5, atol=1e-5, name="chunked state")


def test_rank_defaults_to_the_measure_and_smaller_is_refused():
    for measure in hippo.MEASURES:
        assert hippo.min_rank(measure) == hippo.rank_correction(measure, 6).shape[0]
    assert S4(2, 8, mode="dplr", init="legt").ssm.rank == 2
    assert S4(2, 8, mode="dplr").ssm.rank == 1
    assert S4(2, 8, mode="dplr", init="fout", rank=3).ssm.P.shape[0] == 3
    with pytest.raises(ValueError, match=r"rank must be >= 2 for init='legt'"):
        S4(2, 8, mode="dplr", init="legt", rank=1)
    with pytest.raises(ValueError, match="rank"):
        S4(2, 8, mode="dplr", rank=0)


def test_legs_default_is_the_legs_nplr_form():
    """The default init keeps its numbers: float32 roundings of `hippo.nplr("legs")`, rank 1, with
    Im(B) clipped to [-2, 2] (b_clip=2.0, the default); b_clip=None keeps the exact B."""
    m = S4(3, 8, mode="dplr").ssm
    Lam, P, B, _ = hippo.nplr("legs", 8)
    assert torch.equal(m.log_neg_real.detach(), torch.log(-Lam.real).float().expand(3, 4))
    assert torch.equal(m.imag.detach(), Lam.imag.float().expand(3, 4))
    assert torch.equal(m.P.detach(), torch.view_as_real(P.expand(3, 1, 4).transpose(0, 1)).float())
    clipped = torch.complex(B.real, B.imag.clamp(-2.0, 2.0))
    assert torch.equal(m.B.detach(), torch.view_as_real(clipped.expand(3, 4)).float())
    exact = S4(3, 8, mode="dplr", b_clip=None).ssm
    assert torch.equal(exact.B.detach(), torch.view_as_real(B.expand(3, 4)).float())


def test_mixed_hippo_init_is_legs_then_fout():
    m = S4(5, 8, mode="dplr", init="hippo")
    legs, fout = hippo.nplr("legs", 8)[0], hippo.nplr("fout", 8)[0]
    assert torch.equal(m.ssm.imag.detach()[:3], legs.imag.float().expand(3, 4))
    assert torch.equal(m.ssm.imag.detach()[3:], fout.imag.float().expand(2, 4))


@pytest.mark.parametrize("mode,init", [("diag", "legt"), ("diag", "hippo"), ("dplr", "lin"),
                                       ("dplr", "real")])
def test_unsupported_measure_mode_pair_names_both(mode, init):
    with pytest.raises(ValueError, match=rf"init={init!r} is not supported with mode={mode!r}"):
        S4(2, 8, mode=mode, init=init)
