"""Layer options: shared SSMs (n_ssm), dt parameterization, dropout tied across the sequence, and
use inside `nn.Sequential` (learning rates per parameter kind: test_param_groups.py)."""
import math

import pytest
import torch
from torch import nn

import ssm
from ssm import filters
from ssm.discretize import dt_from_param, dt_param_init
from ssm.layers.block import S4Block
from ssm.layers.nn import SequenceDropout, SequenceOnly
from ssm.layers.s4 import S4
from tests.ssm.layer_truth import filter64, layer_params, ssm_outputs64
from tests.utils import assert_close

# Float32 layer outputs against float64 truth or against each other use rtol = atol = 1e-5: the
# layer's documented conv == step agreement (docs/s4.md), looser than TOL[float32] because an
# output sums L filter taps and N/2 modes, each rounded in float32.


def _steps(m, x):
    s, ys = m.default_state(x.shape[0]), []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, s = m.step(x[:, t], s)
            ys.append(y)
    return torch.stack(ys, 1)


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


# ---- n_ssm ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [dict(mode="diag"), dict(mode="diag", discretization="bilinear", channels=2),
                                 dict(mode="dplr"), dict(mode="dplr", rank=2, channels=2)],
                         ids=["diag", "diag-bilinear-c2", "dplr", "dplr-r2-c2"])
@pytest.mark.parametrize("n_ssm", [1, 2])
def test_shared_ssm_filter_and_step_equal_float64_truth(cfg, n_ssm):
    H, N, L = 4, 8, 24
    extra = {"l_max": L} if cfg["mode"] == "dplr" else {}
    m = S4(H, N, n_ssm=n_ssm, dt_min=0.01, dt_max=0.5, backend="torch", **extra, **cfg).eval()
    N2, r, p = N // 2, cfg.get("rank", 1), m.ssm
    assert p.log_neg_real.shape == p.imag.shape == (n_ssm, N2)
    assert p.B.shape == (n_ssm, N2, 2) and p.log_dt.shape == (H,)
    if cfg["mode"] == "dplr":
        assert p.P.shape == (r, n_ssm, N2, 2)
    with torch.no_grad():
        # distinct copies, so a wrong channel -> copy assignment cannot pass
        p.imag.add_(torch.randn_like(p.imag))
        p.B.add_(torch.randn_like(p.B))
        K = m.filter(L)
        assert_close(K, filter64(m, L).float(), rtol=1e-5, atol=1e-5 * K.abs().max().item(),
                     name="filter vs dense C Ab^l Bb")
        x = torch.randn(2, L, H)
        y = m(x)[0]
        assert_close(y, m.output(ssm_outputs64(m, x).float()), rtol=1e-5, atol=1e-5, name="conv vs float64")
    assert_close(_steps(m, x), y, rtol=1e-5, atol=1e-5, name="step vs conv")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_shared_ssm_reduces_parameters_and_bidirectional_works(mode):
    H, N, r = 8, 16, 2
    kw = dict(mode=mode, bidirectional=True, channels=2, backend="torch")
    if mode == "dplr":
        kw.update(rank=r, l_max=16)
    full, shared = S4(H, N, **kw), S4(H, N, n_ssm=2, **kw)
    per_copy = (N // 2) * (1 + 1 + 2) + (r * (N // 2) * 2 if mode == "dplr" else 0)
    assert _n_params(full) - _n_params(shared) == (H - 2) * per_copy
    assert full.ssm.log_neg_real.shape == (H, N // 2)                       # None: one SSM per channel
    with torch.no_grad():
        shared.ssm.imag.add_(torch.randn_like(shared.ssm.imag))
        K = shared.filter(16)
    assert K.shape == (4, H, 16)
    assert_close(K, filter64(shared, 16).float(), rtol=1e-5, atol=1e-5 * K.abs().max().item(), name="bi")
    y, _ = shared(torch.randn(2, 16, H))
    y.square().mean().backward()
    for name in ("log_neg_real", "imag", "B"):
        assert getattr(shared.ssm, name).grad.abs().sum() > 0, name


def test_n_ssm_must_divide_d_model():
    with pytest.raises(ValueError, match=r"n_ssm=3.*d_model=8"):
        S4(8, 8, n_ssm=3)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="n_ssm"):
            S4(8, 8, n_ssm=bad)
    with pytest.raises(ValueError, match="n_ssm"):
        S4Block(6, d_state=8, n_ssm=4)


# ---- dt_transform --------------------------------------------------------------------------------
def test_dt_init_is_the_same_for_both_transforms():
    torch.manual_seed(3)
    e = S4(256, 8, dt_min=1e-4, dt_max=1e-1)
    torch.manual_seed(3)
    s = S4(256, 8, dt_min=1e-4, dt_max=1e-1, dt_transform="softplus")
    dt_e, dt_s = layer_params(e)[-1].detach(), layer_params(s)[-1].detach()
    assert_close(dt_s, dt_e, rtol=1e-6, atol=0, name="softplus init vs exp init")  # float32 rounding
    assert float(dt_s.min()) >= 1e-4 * (1 - 1e-6) and float(dt_s.max()) <= 1e-1 * (1 + 1e-6)
    # the stored parameter really is the inverse softplus, and log-uniform in float64
    g = torch.Generator().manual_seed(0)
    raw = dt_param_init(4000, 1e-3, 1e-1, "softplus", generator=g)
    dt = torch.log1p(torch.exp(raw.double()))
    a, b = math.log(1e-3), math.log(1e-1)
    assert abs(float(dt.log().mean()) - (a + b) / 2) < 0.05
    assert abs(float(dt.log().std()) - (b - a) / math.sqrt(12)) < 0.05


@pytest.mark.parametrize("transform", ["exp", "softplus"])
def test_dt_transform_gradcheck_float64(transform):
    """d K / d raw through dt_from_param, discretization and filter, in float64."""
    g = torch.Generator().manual_seed(1)
    Lam = torch.complex(-torch.rand(2, 3, generator=g, dtype=torch.float64) - 0.1,
                        torch.randn(2, 3, generator=g, dtype=torch.float64))
    B = torch.randn(2, 3, generator=g, dtype=torch.complex128)
    C = torch.randn(1, 2, 3, generator=g, dtype=torch.complex128)
    raw = dt_param_init(2, 0.05, 0.5, transform, generator=g).double().requires_grad_(True)

    def kernel(p):
        log_z, Bb = filters.diag_discretize(Lam, B, dt_from_param(p, transform), "zoh")
        return filters.diag_filter(C, log_z, Bb, 7, backend="torch")

    assert torch.autograd.gradcheck(kernel, (raw,))
    sp = dt_from_param(raw, transform)
    sp.sum().backward()
    want = torch.exp(raw) if transform == "exp" else torch.sigmoid(raw)   # d dt / d raw
    assert_close(raw.grad, want.detach(), name="d dt / d raw")


def test_softplus_layer_gradient_is_chain_rule_of_exp_layer():
    """Same dt in both layers: dL/draw (softplus) = dL/dlog_dt (exp) / dt * sigmoid(raw)."""
    e = S4(6, 8, dt_min=0.01, dt_max=0.3, backend="torch")
    s = S4(6, 8, dt_min=0.01, dt_max=0.3, dt_transform="softplus", backend="torch")
    s.load_state_dict(e.state_dict())
    with torch.no_grad():
        dt = torch.exp(e.ssm.log_dt.double())
        s.ssm.log_dt.copy_((dt + torch.log(-torch.expm1(-dt))).float())
    x = torch.randn(2, 20, 6)
    for m in (e, s):
        m(x)[0].square().mean().backward()
    want = e.ssm.log_dt.grad.double() / dt * torch.sigmoid(s.ssm.log_dt.double())
    # float32 layers: the two runs differ by the float32 rounding of dt itself
    assert_close(s.ssm.log_dt.grad, want.float(), rtol=1e-4, atol=1e-7, name="softplus grad")


def test_bad_dt_transform():
    with pytest.raises(ValueError, match="dt_transform"):
        S4(4, 8, dt_transform="relu")
    with pytest.raises(ValueError, match="dt_transform"):
        dt_from_param(torch.zeros(2), "sigmoid")


# ---- dropout tied across the sequence ------------------------------------------------------------
def test_tied_dropout_mask_is_constant_along_the_sequence():
    p = 0.3
    x = torch.ones(64, 50, 32)
    y = SequenceDropout(p, tie=True).train()(x)
    assert torch.equal(y, y[:, :1].expand_as(y))                        # one mask per (example, feature)
    kept = y[:, 0] != 0
    assert_close(y[:, 0][kept], torch.full((int(kept.sum()),), 1 / (1 - p)), name="scale 1/(1-p)")
    n = kept.numel()                                                   # 2048 Bernoulli(0.7) draws
    assert abs(float(kept.float().mean()) - (1 - p)) < 4 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(SequenceDropout(p, tie=True).eval()(x), x)
    one_step = SequenceDropout(p, tie=True).train()(x[:, 0])          # (B, H): elementwise
    assert bool(one_step.eq(0).any()) and bool(one_step.ne(0).any())


def test_untied_dropout_is_plain_elementwise_dropout():
    x = torch.randn(4, 30, 8)
    torch.manual_seed(5)
    y = SequenceDropout(0.5).train()(x)
    torch.manual_seed(5)
    assert torch.equal(y, nn.Dropout(0.5).train()(x))
    zeros = y == 0
    assert not torch.equal(zeros, zeros[:, :1].expand_as(zeros))       # pattern varies along L


@pytest.mark.parametrize("tie", [True, False])
def test_block_dropouts_follow_tie_dropout(tie):
    blk = S4Block(8, d_state=8, dropout=0.5, d_ff=16, tie_dropout=tie, backend="torch").train()
    drops = [blk.layer.dropout, blk.drop, blk.ff[2]]
    assert all(isinstance(d, SequenceDropout) and d.tie is tie for d in drops)
    masks = []

    def hook(mod, inp, out):
        masks.append((out == 0) & (inp[0] != 0))

    handles = [d.register_forward_hook(hook) for d in drops]
    blk(torch.randn(3, 40, 8))
    for h in handles:
        h.remove()
    assert len(masks) == 4                                            # blk.drop runs after S4 and after FF
    for mk in masks:
        constant = torch.equal(mk, mk[:, :1].expand_as(mk))
        assert constant is tie and mk.any()


# ---- nn.Sequential -------------------------------------------------------------------------------
def test_sequence_only_in_nn_sequential_equals_direct_use():
    s4, blk = S4(8, 8, backend="torch").eval(), S4Block(8, d_state=8, mode="dplr", backend="torch").eval()
    seq = nn.Sequential(ssm.SequenceOnly(s4), nn.GELU(), SequenceOnly(blk), nn.Linear(8, 3)).eval()
    x = torch.randn(2, 16, 8)
    with torch.no_grad():
        want = seq[3](blk(seq[1](s4(x)[0]))[0])
        assert_close(seq(x), want, name="Sequential vs direct")
        lengths = torch.tensor([16, 9])
        assert_close(SequenceOnly(s4)(x, lengths=lengths), s4(x, lengths=lengths)[0], name="kwargs pass")
    assert "SequenceOnly" in ssm.__all__
    with pytest.raises(TypeError, match="layer"):
        SequenceOnly(lambda t: (t, None))


def test_package_all_lists_exactly_what_it_serves():
    served = set(ssm._EXPORTS) | set(ssm._MODULES)                   # what __getattr__ resolves
    assert sorted(ssm.__all__) == sorted(served) and len(set(ssm.__all__)) == len(ssm.__all__)
    for name in ssm.__all__:
        assert getattr(ssm, name) is not None
    for name in ("filters", "fftconv", "layers", "SequenceOnly", "SequenceDropout"):
        assert name in ssm.__all__
    with pytest.raises(AttributeError, match="no attribute"):
        ssm.not_a_name
