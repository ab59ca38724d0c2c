"""Tests of `selective_state_update` (one decoding token, both layouts) against one step of the
sequential selective-scan definition in float64 (an independent code path), and of its input checks."""
from __future__ import annotations

import pytest
import torch

from kernels.selective_scan import selective_scan_ref, selective_state_update
from tests.utils import assert_close, assert_within_budget


def one_step_truth(state, x, dt, A, B, C, D, z, dt_bias, softplus):
    """The next state and y from one step of `selective_scan_ref` on flattened channels, float64."""
    batch, N = state.shape[0], state.shape[-1]
    d = lambda t: None if t is None else t.double()  # noqa: E731
    flat = lambda t: None if t is None else d(t).reshape(batch, -1)  # noqa: E731
    Bs = (B if B.dim() == 3 else B[:, None]).double()[..., None]   # (batch, G, N, 1)
    Cs = (C if C.dim() == 3 else C[:, None]).double()[..., None]
    y, last = selective_scan_ref(flat(x)[..., None], flat(dt)[..., None], d(A).reshape(-1, N), Bs, Cs,
                                 None if D is None else d(D).reshape(-1), None if z is None else flat(z)[..., None],
                                 None if dt_bias is None else d(dt_bias).reshape(-1), softplus, True,
                                 d(state).reshape(batch, -1, N))
    return last.reshape(state.shape), y[..., 0].reshape(x.shape)


def inputs(layout, *, groups=1, dtype=torch.float64, full=True):
    batch, N = 3, 5
    if layout == "mamba":
        lead, A = (batch, 8), -torch.rand(8, N, dtype=torch.float64) - 0.5                       # (D, N)
        BC = (batch, N) if groups == 1 else (batch, groups, N)
    else:
        lead = (batch, 4, 3)
        A = (-torch.rand(4, 1, 1, dtype=torch.float64) - 0.5).expand(4, 3, N)                     # stride 0
        BC = (batch, groups, N)
    out = {"state": torch.randn(*lead, N), "x": torch.randn(lead), "dt": torch.randn(lead) * 0.5, "A": A,
           "B": torch.randn(BC), "C": torch.randn(BC), "D": torch.randn(lead[1:]) if full else None,
           "z": torch.randn(lead) if full else None, "dt_bias": torch.randn(lead[1:]) * 0.1 if full else None}
    return {k: None if v is None else v.to(dtype) for k, v in out.items()}


@pytest.mark.parametrize("layout,groups", [("mamba", 1), ("mamba", 2), ("mamba2", 1), ("mamba2", 2), ("mamba2", 4)])
@pytest.mark.parametrize("full", [True, False])
def test_matches_one_scan_step(layout, groups, full):
    x = inputs(layout, groups=groups, full=full)
    want_state, want_y = one_step_truth(**x, softplus=full)
    state = x.pop("state").clone()
    y = selective_state_update(state, **x, dt_softplus=full)
    assert_close(state, want_state, name="state")
    assert_close(y, want_y, name="y")


@pytest.mark.parametrize("layout", ["mamba", "mamba2"])
def test_float32_within_budget(layout):
    x64 = inputs(layout, groups=1 if layout == "mamba" else 2)
    x32 = {k: None if v is None else v.float() for k, v in x64.items()}
    want_state, want_y = one_step_truth(**x64, softplus=True)
    plain_state, plain_y = one_step_truth(**{**x32}, softplus=True)
    state = x32.pop("state").clone()
    y = selective_state_update(state, **x32, dt_softplus=True)
    assert y.dtype == torch.float32
    assert_within_budget(state, plain_state.float(), want_state, name="state")
    assert_within_budget(y, plain_y.float(), want_y, name="y")


def test_bad_inputs():
    x = inputs("mamba2", groups=2)
    state = x.pop("state")
    with pytest.raises(ValueError, match="x must have shape"):
        selective_state_update(state, **{**x, "x": x["x"][:, :2]})
    with pytest.raises(ValueError, match="B must be"):
        selective_state_update(state, **{**x, "B": torch.randn(3, 3, 5, dtype=torch.float64)})
    with pytest.raises(TypeError, match="real floating"):
        selective_state_update(state, **{**x, "C": x["C"].to(torch.complex128)})
    with pytest.raises(ValueError, match="state must be"):
        selective_state_update(state[0, 0], **x)
