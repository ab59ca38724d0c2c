"""The diagonal parameterization (`ssm.layers.ssm_diag`, S4D): its init against the public
definition, and the settings it refuses. Layer-level math shared with DPLR: test_s4.py."""
import pytest
import torch

from ssm.layers.s4 import S4
from tests.ssm.layer_truth import layer_params, legs_public, mode_signs
from tests.utils import assert_close

F32 = torch.finfo(torch.float32).eps


@pytest.mark.parametrize("N", [8, 16])
def test_legs_init_is_the_public_clipped_eigenbasis(N):
    """Lambda and B equal the LegS eigenbasis computed here from the definition (numpy), with
    Im(B) clipped to [-2, 2]; b_clip=None keeps the exact V^* B. Float32 storage: 2 ulp."""
    lam, _, B = legs_public(N)
    _, _, B_exact = legs_public(N, b_clip=None)
    assert bool((B_exact.imag.abs() > 2).any())                        # the clip does bite at this N
    for b_clip, want_B in ((2.0, B), (None, B_exact)):
        Lam_l, B_l, *_ = layer_params(S4(3, N, mode="diag", b_clip=b_clip))
        assert_close(Lam_l.detach().cdouble(), lam.expand(3, -1), rtol=0, atol=2 * F32 * float(lam.abs().max()),
                     name="Lambda")
        u = mode_signs(B_l[0], want_B)
        assert bool((u.abs() == 1).all())
        assert_close(B_l.detach().cdouble(), (u * want_B).expand(3, -1), rtol=0,
                     atol=2 * F32 * float(want_B.abs().max()), name=f"B (b_clip={b_clip})")


@pytest.mark.parametrize("kw", [dict(rank=1), dict(l_max=32)])
def test_diag_refuses_dplr_only_settings(kw):
    (name,) = kw
    with pytest.raises(ValueError, match=rf"{name}=.*no meaning with mode='diag'"):
        S4(4, 8, mode="diag", **kw)
    m = S4(4, 8, mode="diag")
    with pytest.raises(ValueError, match="l_max has no meaning with mode='diag'"):
        m.l_max = 16
    assert m.l_max is None
