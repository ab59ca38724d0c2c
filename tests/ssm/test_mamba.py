"""`ssm.layers.mamba.Mamba` against a float64 per-token loop written here from the recurrence.

The loop reads the layer's parameters by their public names and applies, token by token: in_proj,
the causal depthwise convolution (a window of the last d_conv inputs), SiLU, x_proj, dt_proj +
softplus, the Euler-gain recurrence x = exp(dt A) x + dt B u, y = C x + D u, the gate, out_proj.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from ssm.config import MambaConfig
from ssm.layers.mamba import Mamba
from ssm.layers.params import param_groups
from tests.utils import assert_close, run_steps

H, N, W = 8, 5, 4


def _linear(v, p, name):
    return v @ p[name + ".weight"].T + p.get(name + ".bias", 0.0)


def truth(p: dict, x: torch.Tensor, state=None):
    """Per-token loop from the math; p: parameters by name. x (B, L, H) -> (y, (window, h))."""
    Bsz, L, _ = x.shape
    D = p["D"].shape[0]
    R = p["dt_proj.weight"].shape[1]
    window = x.new_zeros(Bsz, D, W) if state is None else state[0]
    h = x.new_zeros(Bsz, D, N) if state is None else state[1]
    A = -torch.exp(p["A_log"])                                          # (D, N)
    ys = []
    for t in range(L):
        uz = _linear(x[:, t], p, "in_proj")                              # (B, 2D)
        u, z = uz[:, :D], uz[:, D:]
        window = torch.cat([window[:, :, 1:], u[:, :, None]], -1)       # (B, D, W)
        v = (window * p["conv1d.weight"][:, 0]).sum(-1) + p.get("conv1d.bias", 0.0)
        v = v * torch.sigmoid(v)                                        # (B, D)
        proj = v @ p["x_proj.weight"].T                                 # (B, R + 2N)
        dt = F.softplus(proj[:, :R] @ p["dt_proj.weight"].T + p["dt_proj.bias"])   # (B, D)
        b, c = proj[:, R:R + N], proj[:, R + N:]                        # (B, N)
        h = torch.exp(dt[:, :, None] * A) * h + dt[:, :, None] * b[:, None, :] * v[:, :, None]
        y = (h * c[:, None, :]).sum(-1) + p["D"] * v                    # (B, D)
        ys.append(_linear(y * z * torch.sigmoid(z), p, "out_proj"))     # (B, H)
    return torch.stack(ys, 1), (window, h)


def _layer(**kw):
    m = Mamba(H, N, d_conv=W, backend="torch", **kw)
    with torch.no_grad():   # the default dt init is tiny; larger steps and a random A exercise more
        m.dt_proj.bias.add_(2.0)
        m.A_log.add_(0.3 * torch.randn_like(m.A_log))
        m.D.normal_()
    return m


def _params64(m, grad=False):
    return {k: v.detach().double().clone().requires_grad_(grad) for k, v in m.named_parameters()}


def test_state_dict_names_and_shapes_match_the_public_module():
    m = Mamba(32, 16)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"A_log": (64, 16), "D": (64,), "in_proj.weight": (128, 32), "conv1d.weight": (64, 1, 4),
                      "conv1d.bias": (64,), "x_proj.weight": (2 + 32, 64), "dt_proj.weight": (64, 2),
                      "dt_proj.bias": (64,), "out_proj.weight": (32, 64)}
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).expand(64, 16))
    assert torch.equal(m.D, torch.ones(64))
    dt = F.softplus(m.dt_proj.bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-6) and dt.max() <= 0.1 * (1 + 1e-6)
    assert m.dt_proj.weight.abs().max() <= 2 ** -0.5
    assert set(inspect.signature(Mamba).parameters) >= {"d_model", "d_state", "dt_rank", "dt_init_floor", "bias"}


def test_forward_float64_matches_loop():
    m = _layer().double()
    x = torch.randn(2, 19, H, dtype=torch.float64)
    y, none = m(x)
    assert none is None
    want, _ = truth(_params64(m), x)
    assert_close(y, want, name="y")


def test_gradients_float64_match_loop():
    m = _layer(bias=True).double()
    x = torch.randn(2, 9, H, dtype=torch.float64, requires_grad=True)
    s0 = (torch.randn(2, 2 * H, W, dtype=torch.float64), 0.3 * torch.randn(2, 2 * H, N, dtype=torch.float64))
    s_in = tuple(t.clone().requires_grad_(True) for t in s0)
    y, s = m(x, state=s_in)
    gy = torch.randn_like(y)
    ((y * gy).sum() + s[1].sum() + s[0].square().sum()).backward()
    p = _params64(m, grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    s_ref = tuple(t.clone().requires_grad_(True) for t in s0)
    want, (w_end, h_end) = truth(p, x2, s_ref)
    ((want * gy).sum() + h_end.sum() + w_end.square().sum()).backward()
    assert_close(y, want, name="y")
    assert_close(s[0], w_end, name="conv_state")
    assert_close(s[1], h_end, name="ssm_state")
    assert_close(x.grad, x2.grad, name="grad x")
    for i in range(2):
        assert_close(s_in[i].grad, s_ref[i].grad, name=f"grad state[{i}]")
    for name, q in m.named_parameters():
        assert_close(q.grad, p[name].grad, name=f"grad {name}")


def _chunked(m, x, chunk):
    state, ys = m.default_state(x.shape[0]), []
    with torch.no_grad():
        for s in range(0, x.shape[1], chunk):
            y, state = m(x[:, s:s + chunk], state=state)
            ys.append(y)
    return torch.cat(ys, 1), state


@pytest.mark.usefixtures("one_thread")
def test_chunks_and_steps_equal_the_whole_sequence_float32():
    m = _layer()
    x = torch.randn(2, 150, H)
    with torch.no_grad():
        want, end = m(x, state=m.default_state(2))
    truth64, (_, h64) = truth(_params64(m), x.double())
    # float32 against float64 truth: outputs of size ~1 after 150 recurrent steps
    assert_close(want, truth64, rtol=1e-5, atol=1e-5, name="whole vs float64 loop")
    for chunk in (1, 7, 128):
        y, state = _chunked(m, x, chunk)
        assert_close(y, want, rtol=1e-5, atol=1e-5, name=f"chunks of {chunk}")
        assert_close(state[1], end[1], rtol=1e-5, atol=1e-6, name=f"ssm_state, chunks of {chunk}")
        assert_close(state[0], end[0], rtol=1e-5, atol=1e-6, name=f"conv_state, chunks of {chunk}")
    y, state = run_steps(m, x)
    assert_close(y, want, rtol=1e-5, atol=1e-5, name="steps")
    assert_close(state[1], h64.float(), rtol=1e-5, atol=1e-6, name="ssm_state after steps")


def test_step_does_not_modify_the_given_state():
    m = _layer()
    state = tuple(torch.randn(2, 2 * H, k) for k in (W, N))
    copy = tuple(s.clone() for s in state)
    m.step(torch.randn(2, H), state)
    assert all(torch.equal(a, b) for a, b in zip(state, copy))


def test_lengths_padding_matches_each_row_alone():
    m = _layer().double()
    L, lengths = 13, torch.tensor([13, 6, 1])
    x = torch.randn(3, L, H, dtype=torch.float64)
    x[1, 6:] = float("nan")                     # padding never reaches a real position
    x[2, 1:] = float("inf")
    s0 = (torch.randn(3, 2 * H, W, dtype=torch.float64), 0.3 * torch.randn(3, 2 * H, N, dtype=torch.float64))
    y, (conv, h) = m(x, state=s0, lengths=lengths)
    p = _params64(m)
    for b, n in enumerate(lengths.tolist()):
        want, (w_end, h_end) = truth(p, x[b:b + 1, :n], (s0[0][b:b + 1], s0[1][b:b + 1]))
        assert_close(y[b:b + 1, :n], want, name=f"row {b} outputs")
        assert_close(conv[b:b + 1], w_end, name=f"row {b} conv_state")
        assert_close(h[b:b + 1], h_end, name=f"row {b} ssm_state")
    assert not torch.isnan(y[:, :1]).any()


def test_every_parameter_receives_gradient():
    m = _layer(bias=True)
    x = torch.randn(2, 12, H)
    y, s = m(x, state=m.default_state(2))
    (y.square().sum() + s[1].sum()).backward()
    for name, q in m.named_parameters():
        assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0, name


def test_param_kinds_and_groups():
    m = Mamba(H, N)
    groups = param_groups(m, lr=1e-2, weight_decay=0.1, ssm_lr=1e-3)
    where = {id(q): g for g in groups for q in g["params"]}
    assert where[id(m.A_log)]["lr"] == 1e-3 and where[id(m.A_log)]["weight_decay"] == 0.0
    assert where[id(m.dt_proj.bias)]["lr"] == 1e-3 and where[id(m.dt_proj.bias)]["weight_decay"] == 0.0
    assert where[id(m.D)]["weight_decay"] == 0.0
    assert where[id(m.in_proj.weight)]["weight_decay"] == 0.1
    assert m.param_kinds == {"A_log": "A", "D": "D"} and m.dt_proj.param_kinds == {"bias": "dt"}


def test_config_and_options_build_the_same_layer():
    torch.manual_seed(1)
    a = Mamba(H, config=MambaConfig(d_state=3, dt_rank=2, expand=3))
    torch.manual_seed(1)
    b = Mamba(H, 3, dt_rank=2, expand=3)
    assert a.config == b.config and a.dt_rank == 2 and b.d_inner == 3 * H
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert Mamba(40).dt_rank == math.ceil(40 / 16)


@pytest.mark.parametrize("kw, match", [
    (dict(d_state=0), "d_state"), (dict(d_conv=0), "d_conv"), (dict(expand=1.5), "expand"),
    (dict(dt_rank=0), "dt_rank"), (dict(dt_init="zero"), "dt_init"), (dict(dt_min=0.2), "dt_min"),
    (dict(backend="cuda"), "backend"), (dict(dt_scale=-1.0), "dt_scale"),
])
def test_bad_settings_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba(H, **kw)


def test_bad_inputs_raise_naming_them():
    m = _layer()
    with pytest.raises(TypeError, match="d_stat"):
        Mamba(H, d_stat=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 8\)"):
        m(torch.randn(2, 5, H + 1))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 8\)"):
        m.step(torch.randn(2, 1, H), m.default_state(2))
    with pytest.raises(TypeError, match="keyword"):
        m(torch.randn(2, 5, H), m.default_state(2))
    with pytest.raises(ValueError, match="conv_state"):
        m(torch.randn(2, 5, H), state=(torch.zeros(2, 2 * H, W - 1), torch.zeros(2, 2 * H, N)))
    with pytest.raises(ValueError, match="ssm_state"):
        m.step(torch.randn(2, H), (torch.zeros(2, 2 * H, W), torch.zeros(2, 2 * H, N + 1)))
    with pytest.raises(TypeError, match="state must be a pair"):
        m(torch.randn(2, 5, H), state=torch.zeros(2, 2 * H, N))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 5, H), lengths=torch.tensor([6, 1]))
    with pytest.raises(ValueError, match="non-finite"):
        m(torch.full((1, 3, H), float("nan")))
