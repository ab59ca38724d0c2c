"""The DPLR parameterization (`ssm.layers.ssm_dplr`, S4): its LegS init against the public
definition, and the length `l_max` its learned Ct belongs to. Per-measure math: test_s4_measures.py."""
import warnings

import pytest
import torch

from ssm.layers.s4 import S4
from tests.ssm.layer_truth import layer_params, legs_public, mode_signs, ssm_outputs64
from tests.utils import assert_close

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
