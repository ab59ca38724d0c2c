"""The S4 / S4D layer: conv == step, chunked state passing, DPLR(P=0) == diag, rates, autocast, errors."""
import math

import pytest
import torch

from ssm import filters
from ssm.layers.block import S4Block
from ssm.layers.params import param_groups
from ssm.layers.s4 import S4
from tests.ssm.layer_truth import layer_params, param
from tests.utils import assert_close, run_steps

CONFIGS = [
    dict(mode="diag"),
    dict(mode="diag", discretization="bilinear", init="lin"),
    dict(mode="diag", init="inv", channels=2),
    dict(mode="dplr"),
    dict(mode="dplr", rank=2, channels=2),
]


def _layer(cfg, H=4, N=8, **kw):
    # dt up to 0.5 so the filters decay visibly within a few dozen steps
    return S4(H, N, dt_min=0.01, dt_max=0.5, backend="torch", **cfg, **kw).eval()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_conv_equals_step_and_chunks_equal_whole(cfg):
    m = _layer(cfg)
    x = torch.randn(2, 33, 4)
    with torch.no_grad():
        y, none = m(x)
        assert none is None
        s0 = 0.3 * torch.randn_like(m.default_state(2))
        y_state, s_whole = m(x, state=s0)
        y1, s1 = m(x[:, :10], state=s0)
        y2, s2 = m(x[:, 10:], state=s1)
    y_step, s_step = run_steps(m, x, m.default_state(2))
    assert_close(y_step, y, rtol=1e-5, atol=1e-5, name="step vs conv")
    y_step, s_step = run_steps(m, x, s0)
    assert_close(y_step, y_state, rtol=1e-5, atol=1e-5, name="step vs conv from a state")
    assert_close(s_step, s_whole, rtol=1e-5, atol=1e-5, name="final state")
    assert_close(torch.cat([y1, y2], 1), y_state, rtol=1e-5, atol=1e-5, name="chunked output")
    assert_close(s2, s_whole, rtol=1e-5, atol=1e-5, name="chunked state")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_lengths_padding_does_not_leak_and_state_stops_at_last_real(mode):
    m = _layer(dict(mode=mode))
    x = torch.randn(2, 20, 4)
    lengths = torch.tensor([20, 13])
    s0 = 0.3 * torch.randn_like(m.default_state(2))
    with torch.no_grad():
        y_pad, s_pad = m(x, state=s0, lengths=lengths)
        y_short, s_short = m(x[1:, :13], state=s0[1:])
    assert_close(y_pad[1:, :13], y_short, rtol=1e-5, atol=1e-5, name="real positions")
    assert_close(s_pad[1:], s_short, rtol=1e-5, atol=1e-5, name="state after the last real step")
    bi = _layer(dict(mode=mode, bidirectional=True))
    garbage = x.clone()
    garbage[1, 13:] = 100 * torch.randn(7, 4)
    with torch.no_grad():
        a, _ = bi(x, lengths=lengths)
        b, _ = bi(garbage, lengths=lengths)
        c, _ = bi(x[1:, :13])
    assert_close(b[:, :13][1:], c, rtol=1e-5, atol=1e-5, name="bidirectional, padding masked")
    assert_close(a[0], b[0], name="full row untouched")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_bidirectional_is_a_two_sided_filter(mode):
    m = _layer(dict(mode=mode, bidirectional=True, channels=1))
    L = 24
    x = torch.randn(1, L, 4, dtype=torch.float32)
    K = m.filter(L).double()                                          # (2, H, L)
    u = x[0].T.double()                                               # (H, L)
    y = torch.zeros_like(u)
    for l in range(L):
        for j in range(L):
            y[:, l] += (K[0, :, l - j] if j <= l else K[1, :, j - l - 1]) * u[:, j]
    y = y + m.D[0].double()[:, None] * u
    with torch.no_grad():
        want = m.output(y.T.float().unsqueeze(0))
        got, _ = m(x)
    assert_close(got, want, rtol=1e-5, atol=1e-5, name="bidirectional conv")
    with pytest.raises(ValueError, match="bidirectional"):
        m.step(x[:, 0], m.default_state(1))
    with pytest.raises(ValueError, match="bidirectional"):
        m(x, state=m.default_state(1))


def test_dplr_with_zero_low_rank_equals_diag_layer():
    L = 32
    d = _layer(dict(mode="diag", discretization="bilinear"))
    s = _layer(dict(mode="dplr"), l_max=L)
    with torch.no_grad():
        for name in ("log_neg_real", "imag", "B", "log_dt", "D"):
            param(s, name).copy_(param(d, name))
        s.out.load_state_dict(d.out.state_dict())
        s.ssm.P.zero_()
        Lam, B, C, _, dt = layer_params(d)
        log_z, _ = filters.diag_discretize(Lam, B, dt, "bilinear")
        s.ssm.C.copy_(torch.view_as_real(C * (1 - torch.exp(log_z * L))))
        x = torch.randn(2, L, 4)
        assert_close(s(x)[0], d(x)[0], rtol=1e-5, atol=1e-5, name="S4(P=0) vs S4D bilinear")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_filter_any_length_and_rate(mode):
    m = _layer(dict(mode=mode), **({"l_max": 20} if mode == "dplr" else {}))
    with torch.no_grad():
        K20 = m.filter(20)
        # K_l = C Ab^l Bb does not depend on L: a longer filter extends the shorter one
        assert_close(m.filter(45)[..., :20], K20, rtol=1e-4, atol=1e-5, name="longer filter")
        Lam, B, C, P, dt = (None if t is None else t.cdouble() if t.is_complex() else t.double()
                            for t in layer_params(m))
    if mode == "diag":
        log_z, Bb = filters.diag_discretize(Lam, B, 2 * dt, "zoh")
        want = filters.diag_filter(C, log_z, Bb, 30, backend="torch")
    else:
        Cf = filters.ct_to_c(filters.full_c(C), filters.dplr_dense(Lam, P, B, dt)[0], 20)
        Ab, Bb = filters.dplr_dense(Lam, P, B, 2 * dt)
        x, rows = Bb, []
        for _ in range(30):
            rows.append(torch.einsum("chn,hn->ch", Cf, x).real)
            x = torch.einsum("hnm,hm->hn", Ab, x)
        want = torch.stack(rows, -1)
    with torch.no_grad():
        assert_close(m.filter(30, rate=2.0), want, rtol=1e-4, atol=1e-5, name="rate 2")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_gradients_finite_and_reach_every_parameter(mode):
    m = S4(8, 16, mode=mode, channels=2, backend="torch")
    x = torch.randn(2, 64, 8, requires_grad=True)
    y, _ = m(x)
    y.square().mean().backward()
    for name, p in list(m.named_parameters()) + [("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0 or name == "P", name


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_bf16_autocast_training_step_keeps_ssm_params_float32(mode):
    blk = S4Block(8, d_state=8, mode=mode, d_ff=16, norm="batch", backend="torch")
    opt = torch.optim.AdamW(param_groups(blk, 1e-3, 0.05))
    x = torch.randn(2, 40, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = blk(x)
        loss = y.float().square().mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in blk.parameters() if p.grad is not None)
    opt.step()
    for name in ("log_neg_real", "imag", "B", "C", "log_dt", "D"):
        assert param(blk.layer, name).dtype == torch.float32, name
    assert torch.isfinite(loss)


def test_param_groups_ssm_params_get_ssm_lr_and_no_decay():
    m = S4Block(8, d_state=8, mode="dplr", backend="torch")
    groups = param_groups(m, 1e-2, 0.1, ssm_lr=2e-3)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in m.parameters())
    by_id = {id(p): g for g in groups for p in g["params"]}
    for name in ("log_neg_real", "imag", "B", "P", "log_dt"):
        g = by_id[id(param(m.layer, name))]
        assert g["lr"] == 2e-3 and g["weight_decay"] == 0.0, name
    assert by_id[id(m.layer.out.weight)]["weight_decay"] == 0.1
    assert by_id[id(m.layer.out.bias)]["weight_decay"] == 0.0
    assert by_id[id(m.layer.ssm.C)]["lr"] == 1e-2


def test_bad_input_raises_value_error_naming_the_shape():
    m = S4(4, 8, backend="torch")
    with pytest.raises(ValueError, match=r"\(B, L, 4\)"):
        m(torch.randn(2, 10, 5))
    with pytest.raises(ValueError, match=r"\(B, L, 4\)"):
        m(torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        m.step(torch.randn(2, 3), m.default_state(2))
    with pytest.raises(ValueError, match="state must"):
        m(torch.randn(2, 10, 4), state=torch.zeros(2, 4, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 10, 4), lengths=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="d_state"):
        S4(4, 7, mode="diag")
    with pytest.raises(ValueError, match="mode"):
        S4(4, 8, mode="dense")
    with pytest.raises(ValueError, match="init"):
        S4(4, 8, init="fourier")
    with pytest.raises(ValueError, match="init"):
        S4(4, 8, mode="dplr", init="lin")
    with pytest.raises(ValueError, match="discretization"):
        S4(4, 8, mode="dplr", discretization="zoh")
    with pytest.raises(ValueError, match="activation"):
        S4(4, 8, activation="swish")


def test_dt_init_range():
    m = S4(64, 8, dt_min=1e-3, dt_max=1e-1)
    dt = m.ssm.log_dt.exp()
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 1e-1 * (1 + 1e-6)
    assert math.isclose(float(-m.ssm.log_neg_real.detach().exp().mean()), -0.5, rel_tol=1e-6)  # LegS: Re = -1/2


def test_half_precision_model_keeps_ssm_params_float32():
    blk = S4Block(8, d_state=8, mode="dplr", backend="torch").to(torch.bfloat16)
    for name in ("log_neg_real", "imag", "B", "P", "C", "D", "log_dt"):
        assert param(blk.layer, name).dtype == torch.float32, name
    assert blk.layer.out.weight.dtype == torch.bfloat16
    y, _ = blk(torch.randn(2, 16, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_default_backend_path_conv_equals_step(mode):
    """backend="auto" (the Triton interpreter under the test conftest) at a tiny size."""
    m = S4(2, 4, mode=mode, dt_min=0.05, dt_max=0.5).eval()
    x = torch.randn(1, 12, 2)
    with torch.no_grad():
        y, _ = m(x)
    assert_close(run_steps(m, x, m.default_state(1))[0], y, rtol=1e-5, atol=1e-5, name=f"{mode} auto")
    m(x)[0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


# ---- call contract and validation ----------------------------------------------------------------
def test_state_and_lengths_are_keyword_only():
    x, lengths = torch.randn(2, 6, 4), torch.tensor([6, 3])
    for m in (S4(4, 8, backend="torch"), S4Block(4, d_state=8, backend="torch")):
        with pytest.raises(TypeError, match=r"keyword arguments only.*forward\(x, state=\.\.\., lengths=\.\.\.\)"):
            m(x, m.default_state(2))
        with pytest.raises(TypeError, match=r"state=\.\.\., lengths=\.\.\."):
            m(x, None, lengths)


def test_backend_and_rate_are_validated_naming_them():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        S4(4, 8, backend="cuda")
    m = _layer(dict(mode="diag"))
    x = torch.randn(1, 5, 4)
    for bad in (0, -1, "2", float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rate must be a finite number > 0"):
            m(x, rate=bad)
        with pytest.raises(ValueError, match="rate"):
            m.filter(5, rate=bad)
        with pytest.raises(ValueError, match="rate"):
            m.step(x[:, 0], m.default_state(1), rate=bad)
        with pytest.raises(ValueError, match="rate"):
            m.rate = bad
    assert m.rate == 1.0


@pytest.mark.parametrize("mode", ["diag", "dplr"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_non_finite_inputs_padding_is_selected_away_real_positions_raise(mode, bidirectional):
    kw = {"l_max": 12} if mode == "dplr" else {}
    m = _layer(dict(mode=mode, bidirectional=bidirectional), **kw)
    x, lengths = torch.randn(2, 12, 4), torch.tensor([12, 7])
    poisoned = x.clone()
    poisoned[1, 7:] = float("nan")
    poisoned[1, 9, 2] = float("inf")
    with torch.no_grad():
        want, _ = m(x, lengths=lengths)
        got, _ = m(poisoned, lengths=lengths)
    assert_close(got[1, :7], want[1, :7], name="real positions with NaN/Inf padding")
    assert_close(got[0], want[0], name="full row")
    bad = x.clone()
    bad[1, 5, 3] = float("nan")
    with pytest.raises(ValueError, match="batch 1, position 5, feature 3"):
        m(bad, lengths=lengths)
    with pytest.raises(ValueError, match="non-finite"):
        m(bad)
    unchecked = _layer(dict(mode=mode, bidirectional=bidirectional, check_finite=False), **kw)
    with torch.no_grad():
        y, _ = unchecked(bad)                                          # no check: the NaN spreads
    assert torch.isnan(y).any()


# ---- float64 layers: exact gradients -------------------------------------------------------------
def _float64_call(mode):
    kw = {"l_max": 6} if mode == "dplr" else {}
    m = S4(2, 4, mode=mode, dt_min=0.05, dt_max=0.5, backend="torch", **kw).double()
    names, values = zip(*m.named_parameters())
    x = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in values]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))[0]

    return m, f, (x, *params)


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_float64_layer_gradcheck_input_and_every_parameter(mode):
    m, f, inputs = _float64_call(mode)
    assert f(*inputs).dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert torch.autograd.gradcheck(f, inputs)


def test_float64_layer_gradgradcheck_on_the_input():
    _, f, (x, *params) = _float64_call("diag")
    assert torch.autograd.gradgradcheck(lambda x: f(x, *params), (x,))
