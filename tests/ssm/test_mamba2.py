"""`ssm.layers.mamba2.Mamba2` against a float64 per-token loop written here from the recurrence.

Per token: in_proj -> [z0, x0, z, xBC, dt]; causal conv (window of d_conv inputs) + SiLU on xBC;
dt = clamp(softplus(dt + dt_bias)); per head S = exp(dt A) S + dt x B^T, y = S C + D x; gated
RMSNorm over ngroups groups (or y * silu(z)); the gated-MLP channels; out_proj.
"""
import pytest
import torch
import torch.nn.functional as F

from ssm.config import Mamba2Config
from ssm.layers.mamba2 import Mamba2
from ssm.layers.params import param_groups
from tests.utils import assert_close, run_steps

H, N, W, P = 8, 6, 4, 4
CONFIGS = [dict(), dict(ngroups=2, D_has_hdim=True, bias=True), dict(rmsnorm=False, d_ssm=8),
           dict(norm_before_gate=True, dt_limit=(0.05, 0.5), ngroups=4)]


def truth(m, p: dict, x: torch.Tensor, state=None):
    """Per-token loop from the math; m gives the settings, p the parameters by name."""
    cfg = m.config
    Bsz, L, _ = x.shape
    nh, G, d_ssm = m.nheads, cfg.ngroups, m.d_ssm
    d_mlp, conv_dim = m.d_inner - d_ssm, d_ssm + 2 * G * N
    window = x.new_zeros(Bsz, conv_dim, W) if state is None else state[0]
    S = x.new_zeros(Bsz, nh, P, N) if state is None else state[1]
    A = -torch.exp(p["A_log"])                                          # (nh,)
    D = p["D"].view(nh, P) if cfg.D_has_hdim else p["D"][:, None]       # (nh, P|1)
    group = torch.arange(nh) // (nh // G)                                # head -> group
    ys = []
    for t in range(L):
        zx = x[:, t] @ p["in_proj.weight"].T + p.get("in_proj.bias", 0.0)
        z0, x0, z, xbc, dt = zx.split([d_mlp, d_mlp, d_ssm, conv_dim, nh], -1)
        window = torch.cat([window[:, :, 1:], xbc[:, :, None]], -1)     # (B, conv_dim, W)
        v = F.silu((window * p["conv1d.weight"][:, 0]).sum(-1) + p["conv1d.bias"])
        xs, b, c = v.split([d_ssm, G * N, G * N], -1)
        xs, b, c = xs.view(Bsz, nh, P), b.view(Bsz, G, N)[:, group], c.view(Bsz, G, N)[:, group]
        dt = F.softplus(dt + p["dt_bias"]).clamp(*cfg.dt_limit)          # (B, nh)
        S = torch.exp(dt * A)[:, :, None, None] * S + (dt[:, :, None] * xs)[..., None] * b[:, :, None, :]
        y = ((S * c[:, :, None, :]).sum(-1) + D * xs).reshape(Bsz, d_ssm)   # (B, d_ssm)
        if cfg.rmsnorm:
            g = y if cfg.norm_before_gate else y * F.silu(z)
            g = g.view(Bsz, G, -1)
            g = (g / torch.sqrt(g.square().mean(-1, keepdim=True) + cfg.norm_eps)).reshape(Bsz, d_ssm)
            y = g * p["norm.weight"] * (F.silu(z) if cfg.norm_before_gate else 1.0)
        else:
            y = y * F.silu(z)
        y = torch.cat([F.silu(z0) * x0, y], -1)
        ys.append(y @ p["out_proj.weight"].T + p.get("out_proj.bias", 0.0))
    return torch.stack(ys, 1), (window, S)


def _layer(**kw):
    m = Mamba2(H, N, d_conv=W, headdim=P, chunk_size=8, backend="torch", **kw)
    with torch.no_grad():   # larger steps and a random D and norm weight exercise more
        m.dt_bias.add_(2.0)
        m.D.normal_()
        if m.config.rmsnorm:
            m.norm.weight.normal_()
    return m


def _params64(m, grad=False):
    return {k: v.detach().double().clone().requires_grad_(grad) for k, v in m.named_parameters()}


def test_state_dict_names_and_shapes_match_the_public_module():
    m = Mamba2(32, 16, headdim=16, ngroups=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    conv_dim = 64 + 2 * 2 * 16
    assert shapes == {"dt_bias": (4,), "A_log": (4,), "D": (4,), "in_proj.weight": (64 + conv_dim + 4, 32),
                      "conv1d.weight": (conv_dim, 1, 4), "conv1d.bias": (conv_dim,), "norm.weight": (64,),
                      "out_proj.weight": (32, 64)}
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert Mamba2Config().d_state == 128 and Mamba2Config().chunk_size == 256


@pytest.mark.parametrize("kw", CONFIGS)
def test_forward_and_gradients_float64_match_loop(kw):
    m = _layer(**kw).double()
    nh = m.nheads
    x = torch.randn(2, 11, H, dtype=torch.float64, requires_grad=True)
    s0 = (torch.randn(2, m.conv_dim, W, dtype=torch.float64), 0.3 * torch.randn(2, nh, P, N, dtype=torch.float64))
    s_in = tuple(t.clone().requires_grad_(True) for t in s0)
    y, s = m(x, state=s_in)
    gy = torch.randn_like(y)
    ((y * gy).sum() + s[1].sum() + s[0].square().sum()).backward()
    p = _params64(m, grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    s_ref = tuple(t.clone().requires_grad_(True) for t in s0)
    want, (w_end, S_end) = truth(m, p, x2, s_ref)
    ((want * gy).sum() + S_end.sum() + w_end.square().sum()).backward()
    assert_close(y, want, name="y")
    assert_close(s[0], w_end, name="conv_state")
    assert_close(s[1], S_end, name="ssm_state")
    assert_close(x.grad, x2.grad, name="grad x")
    for i in range(2):
        assert_close(s_in[i].grad, s_ref[i].grad, name=f"grad state[{i}]")
    for name, q in m.named_parameters():
        assert_close(q.grad, p[name].grad, name=f"grad {name}")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("kw", CONFIGS[:2])
def test_chunks_and_steps_equal_the_whole_sequence_float32(kw):
    m = _layer(**kw)
    x = torch.randn(2, 150, H)
    with torch.no_grad():
        want, end = m(x, state=m.default_state(2))
    truth64, _ = truth(m, _params64(m), x.double())
    # float32 against float64 truth: outputs of size ~1 after 150 recurrent steps
    assert_close(want, truth64, rtol=1e-5, atol=1e-5, name="whole vs float64 loop")
    for chunk in (1, 7, 128):
        state, ys = m.default_state(2), []
        with torch.no_grad():
            for i in range(0, 150, chunk):
                y, state = m(x[:, i:i + chunk], state=state)
                ys.append(y)
        assert_close(torch.cat(ys, 1), want, rtol=1e-5, atol=1e-5, name=f"chunks of {chunk}")
        assert_close(state[1], end[1], rtol=1e-5, atol=1e-6, name=f"ssm_state, chunks of {chunk}")
        assert_close(state[0], end[0], rtol=1e-5, atol=1e-6, name=f"conv_state, chunks of {chunk}")
    y, state = run_steps(m, x)
    assert_close(y, want, rtol=1e-5, atol=1e-5, name="steps")
    assert_close(state[1], end[1], rtol=1e-5, atol=1e-6, name="ssm_state after steps")


def test_lengths_padding_matches_each_row_alone():
    m = _layer(ngroups=2).double()
    L, lengths = 13, torch.tensor([13, 6, 1])
    x = torch.randn(3, L, H, dtype=torch.float64)
    x[1, 6:] = float("nan")
    x[2, 1:] = float("inf")
    s0 = (torch.randn(3, m.conv_dim, W, dtype=torch.float64),
          0.3 * torch.randn(3, m.nheads, P, N, dtype=torch.float64))
    y, (conv, S) = m(x, state=s0, lengths=lengths)
    p = _params64(m)
    for b, n in enumerate(lengths.tolist()):
        want, (w_end, S_end) = truth(m, p, x[b:b + 1, :n], (s0[0][b:b + 1], s0[1][b:b + 1]))
        assert_close(y[b:b + 1, :n], want, name=f"row {b} outputs")
        assert_close(conv[b:b + 1], w_end, name=f"row {b} conv_state")
        assert_close(S[b:b + 1], S_end, name=f"row {b} ssm_state")


@pytest.mark.parametrize("kw", CONFIGS)
def test_every_parameter_receives_gradient(kw):
    m = _layer(**kw)
    y, s = m(torch.randn(2, 12, H), state=m.default_state(2))
    (y.square().sum() + s[1].sum()).backward()
    for name, q in m.named_parameters():
        assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0, name


def test_param_kinds_and_groups():
    m = Mamba2(H, N, headdim=P)
    groups = param_groups(m, lr=1e-2, weight_decay=0.1, ssm_lr=1e-3)
    where = {id(q): g for g in groups for q in g["params"]}
    for q in (m.A_log, m.dt_bias):
        assert where[id(q)]["lr"] == 1e-3 and where[id(q)]["weight_decay"] == 0.0
    assert where[id(m.D)]["weight_decay"] == 0.0
    assert m.param_kinds == {"A_log": "A", "dt_bias": "dt", "D": "D"}


@pytest.mark.parametrize("kw, match", [
    (dict(headdim=5), "headdim"), (dict(ngroups=3), "ngroups"), (dict(d_ssm=40), "d_ssm"),
    (dict(A_init_range=(0, 1)), "A_init_range"), (dict(dt_limit=(1.0, 0.5)), "dt_limit"),
    (dict(chunk_size=0), "chunk_size"), (dict(backend="x"), "backend"), (dict(conv_init=-1), "conv_init"),
])
def test_bad_settings_raise_naming_them(kw, match):
    with pytest.raises(ValueError, match=match):
        Mamba2(H, N, **{"headdim": P, **kw})


def test_bad_inputs_raise_naming_them():
    m = _layer()
    with pytest.raises(TypeError, match="head_dim"):
        Mamba2(H, head_dim=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 8\)"):
        m(torch.randn(2, 5))
    with pytest.raises(TypeError, match="keyword"):
        m(torch.randn(2, 5, H), m.default_state(2))
    with pytest.raises(ValueError, match="ssm_state"):
        m.step(torch.randn(2, H), (torch.zeros(2, m.conv_dim, W), torch.zeros(2, m.nheads, N, P)))
    with pytest.raises(ValueError, match="lengths"):
        m(torch.randn(2, 5, H), lengths=torch.tensor([0, 1]))


def test_torch_compile_fullgraph_matches_eager():
    """The layer's hand-written autograd pieces (conv, gated norm) and the SSD custom op trace
    without graph breaks; compiled forward and gradients equal eager."""
    m = _layer()
    x = torch.randn(2, 40, H, requires_grad=True)
    y, _ = m(x)
    want = torch.autograd.grad(y.square().sum(), [x, *m.parameters()])
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    y2, _ = compiled(x)
    got = torch.autograd.grad(y2.square().sum(), [x, *m.parameters()])
    assert_close(y2, y, rtol=1e-5, atol=1e-6, name="compiled y")
    for (name, _), a, e in zip([("x", None), *m.named_parameters()], got, want):
        assert_close(a, e, rtol=1e-4, atol=1e-5, name=f"compiled grad {name}")
