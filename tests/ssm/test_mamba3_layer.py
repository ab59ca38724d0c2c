"""ssm.Mamba3: public checkpoint layout, the public module's formulas, streaming, padding, bad input.

The public-module cross-check writes the module's forward out token by token here, in the public
tensor layouts, from the formulas of `mamba_ssm/modules/mamba3.py` (state-spaces/mamba) and the
step references of its kernel tests; each formula below names its source. Nothing of the layer or
of `kernels.mamba3` is used to compute the expected values.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from ssm.config import Mamba3Config
from ssm.layers.mamba3 import Mamba3
from tests.utils import assert_close

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = dict(d_state=8, headdim=4, expand=2, chunk_size=5)
VARIANTS = {
    "siso": {},
    "siso_norm_groups": dict(is_outproj_norm=True, ngroups=2),
    "mimo": dict(is_mimo=True, mimo_rank=3, rope_fraction=1.0),
    "mimo_norm": dict(is_mimo=True, mimo_rank=2, is_outproj_norm=True, ngroups=2),
}


def public_shapes(d_model, d_state=128, expand=2, headdim=64, ngroups=1, rope_fraction=0.5,
                  is_mimo=False, mimo_rank=4, is_outproj_norm=False, **_):
    """Parameter names and shapes as the public module's __init__ creates them."""
    d_inner, r = expand * d_model, (mimo_rank if is_mimo else 1)
    H = d_inner // headdim
    split = int(d_state * rope_fraction)
    S = (split - split % 2) // 2
    shapes = {"in_proj.weight": (2 * d_inner + 2 * d_state * ngroups * r + 3 * H + S, d_model),
              "dt_bias": (H,), "B_bias": (H, r, d_state), "C_bias": (H, r, d_state),
              "B_norm.weight": (d_state,), "C_norm.weight": (d_state,), "D": (H,),
              "out_proj.weight": (d_model, d_inner)}
    if is_mimo:
        shapes.update({name: (H, r, headdim) for name in ("mimo_x", "mimo_z", "mimo_o")})
    if is_outproj_norm:
        shapes["norm.weight"] = (d_inner,)
    return shapes


def random_checkpoint(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(s, generator=g, dtype=F64) * 0.5 for k, s in shapes.items()}
    sd["in_proj.weight"] /= math.sqrt(shapes["in_proj.weight"][1])
    return sd


def _rotate(v, phi, pairs):
    """Rotate the index pairs (i0[k], i1[k]) of v (..., N) by phi (..., S)."""
    i0, i1 = pairs
    out = v.clone()
    c, s = torch.cos(phi), torch.sin(phi)
    out[..., i0] = v[..., i0] * c - v[..., i1] * s
    out[..., i1] = v[..., i0] * s + v[..., i1] * c
    return out


def public_forward(sd, u, d_state, headdim, ngroups=1, rope_fraction=0.5, is_mimo=False, mimo_rank=4,
                   is_outproj_norm=False, A_floor=1e-4, **_):
    """The public module's output for the checkpoint `sd` and input u (b, L, d_model), float64."""
    b, L, _ = u.shape
    N, G, P, r = d_state, ngroups, headdim, (mimo_rank if is_mimo else 1)
    H, d_inner = sd["D"].shape[0], sd["out_proj.weight"].shape[1]
    S = (int(N * rope_fraction) - int(N * rope_fraction) % 2) // 2
    # module forward: in_proj, split in the order [z, x, B, C, dd_dt, dd_A, trap, angles]
    z, x, B, C, dd_dt, dd_A, trap, ang = torch.split(
        u @ sd["in_proj.weight"].T, [d_inner, d_inner, N * G * r, N * G * r, H, H, H, S], dim=-1)
    # module forward: "b l (r g n) -> b l r g n", B_norm / C_norm = RMSNorm(d_state, eps=1e-5)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w
    B = rms(B.reshape(b, L, r, G, N), sd["B_norm.weight"]).repeat_interleave(H // G, dim=3)  # (b, L, r, H, N)
    C = rms(C.reshape(b, L, r, G, N), sd["C_norm.weight"]).repeat_interleave(H // G, dim=3)
    # module forward: A = clamp(-heavy_tail(dd_A), max=-A_floor), DT = softplus(dd_dt + dt_bias)
    A = -torch.where(dd_A >= 0, 1 + dd_A, 1 / (1 - dd_A.clamp_max(0))).clamp_min(A_floor)
    DT = F.softplus(dd_dt + sd["dt_bias"])  # (b, L, H)
    # module step: SISO rotate_pairwise=True (pairs 2k, 2k+1); MIMO the tilelang layout (k, N/2 + k)
    k = torch.arange(S)
    pairs = (k, N // 2 + k) if is_mimo else (2 * k, 2 * k + 1)
    ones = torch.ones(H, r, P, dtype=F64)
    mx, mz, mo = (sd["mimo_x"], sd["mimo_z"], sd["mimo_o"]) if is_mimo else (ones, ones, ones)
    angle = torch.zeros(b, H, S, dtype=F64)
    ssm = torch.zeros(b, H, P, N, dtype=F64)
    k_state, v_state = torch.zeros(b, H, r, N, dtype=F64), torch.zeros(b, H, r, P, dtype=F64)
    xs, zs = x.reshape(b, L, H, P), z.reshape(b, L, H, P)
    outs = []
    for t in range(L):
        # step references (mamba3_siso_step_ref, mamba3_MIMO_step_ref): angle += tanh(a) dt pi mod 2 pi
        angle = angle + torch.tanh(ang[:, t])[:, None] * DT[:, t, :, None] * math.pi
        angle = angle - 2 * math.pi * torch.floor(angle / (2 * math.pi))
        q = _rotate(C[:, t].transpose(1, 2) + sd["C_bias"], angle[:, :, None], pairs)  # (b, H, r, N)
        kk = _rotate(B[:, t].transpose(1, 2) + sd["B_bias"], angle[:, :, None], pairs)
        v = torch.einsum("bhp,hrp->bhrp", xs[:, t], mx)  # MIMO_V up-projection
        lam = torch.sigmoid(trap[:, t])
        alpha = torch.exp(A[:, t] * DT[:, t])
        beta, gamma = (1 - lam) * DT[:, t] * alpha, lam * DT[:, t]
        ssm = (alpha[..., None, None] * ssm + beta[..., None, None] * torch.einsum("bhrn,bhrp->bhpn", k_state, v_state)
               + gamma[..., None, None] * torch.einsum("bhrn,bhrp->bhpn", kk, v))
        out = torch.einsum("bhpn,bhrn->bhrp", ssm, q) + sd["D"][:, None, None] * v
        zr = torch.einsum("bhp,hrp->bhrp", zs[:, t], mz)
        if is_outproj_norm:
            # RMSNormGated(d_inner, group_size=headdim, norm_before_gate=True): norm(y) * w * silu(z)
            w = sd["norm.weight"].reshape(H, P)[:, None]
            out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + 1e-5) * w * F.silu(zr)
        else:
            out = out * zr * torch.sigmoid(zr)
        outs.append(torch.einsum("bhrp,hrp->bhp", out, mo).reshape(b, d_inner))
        k_state, v_state = kk, v
    return torch.stack(outs, 1) @ sd["out_proj.weight"].T


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_public_checkpoint_loads_and_matches_public_formulas(variant):
    opts = {**SMALL, **VARIANTS[variant]}
    shapes = public_shapes(16, **opts)
    layer = Mamba3(16, **opts).double()
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == shapes
    sd = random_checkpoint(shapes)
    layer.load_state_dict(sd, strict=True)
    u = torch.randn(2, 11, 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    y, _ = layer(u)
    assert_close(y, public_forward(sd, u, **opts), name=f"{variant}: layer vs public formulas")


@pytest.mark.parametrize("variant", ["siso", "mimo"])
def test_whole_equals_chunks_equals_step_float32(variant):
    torch.manual_seed(2)
    opts = {**SMALL, "chunk_size": 16, **VARIANTS[variant]}
    layer = Mamba3(16, **opts)
    layer.load_state_dict({k: v.float() for k, v in random_checkpoint(public_shapes(16, **opts), 3).items()})
    L = 150
    u = torch.randn(2, L, 16)
    whole, whole_state = layer(u, state=layer.default_state(2))
    for size in (1, 7, 128):
        st, ys = layer.default_state(2), []
        for i in range(0, L, size):
            y, st = layer(u[:, i:i + size], state=st)
            ys.append(y)
        assert_close(torch.cat(ys, 1), whole, atol=1e-5, rtol=1e-5, name=f"chunks of {size}")
        for name, a, e in zip(("angle", "ssm", "B_prev", "x_prev"), st, whole_state):
            assert_close(torch.cos(a) if name == "angle" else a, torch.cos(e) if name == "angle" else e,
                         atol=1e-5, rtol=1e-5, name=f"chunks of {size}: {name}")
    st, ys = layer.default_state(2), []
    for t in range(L):
        y, st = layer.step(u[:, t], st)
        ys.append(y)
    assert_close(torch.stack(ys, 1), whole, atol=1e-5, rtol=1e-5, name="token by token")


@pytest.mark.parametrize("variant", ["siso", "mimo_norm"])
def test_lengths_padding(variant):
    opts = {**SMALL, **VARIANTS[variant]}
    layer = Mamba3(16, **opts).double()
    layer.load_state_dict(random_checkpoint(public_shapes(16, **opts), 4))
    u = torch.randn(2, 9, 16, dtype=F64)
    lengths = torch.tensor([9, 4])
    y, st = layer(u, state=layer.default_state(2), lengths=lengths)
    y1, st1 = layer(u[1:, :4], state=layer.default_state(1))
    assert_close(y[1, :4], y1[0], name="y at real positions")
    for name, a, e in zip(("angle", "ssm", "B_prev", "x_prev"), st, st1):
        assert_close(a[1:], e, name=f"final {name} of the short row")


def test_gradients_flow_to_every_parameter():
    layer = Mamba3(16, **SMALL, **VARIANTS["mimo_norm"]).double()
    layer(torch.randn(1, 6, 16, dtype=F64))[0].square().sum().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_config_and_bad_input():
    layer = Mamba3(16, config=Mamba3Config(**SMALL))
    assert layer.d_state == 8 and layer.nheads == 8 and layer.rank == 1
    with pytest.raises(TypeError, match="d_stat"):
        Mamba3(16, d_stat=8)
    with pytest.raises(ValueError, match="headdim"):
        Mamba3(16, d_state=8, headdim=5)
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(16, d_state=8, headdim=4, rope_fraction=0.25)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 5, 15))
    st = layer.default_state(2)
    with pytest.raises(ValueError, match="ssm must have shape"):
        layer(torch.randn(2, 5, 16), state=st._replace(ssm=st.ssm[:, :1]))
    with pytest.raises(TypeError, match="state must be a tuple"):
        layer.step(torch.randn(2, 16), st[:2])


@pytest.mark.parametrize("variant", ["siso", "mimo"])
def test_seq_idx_packs_documents(variant):
    opts = {**SMALL, **VARIANTS[variant]}
    layer = Mamba3(16, **opts).double()
    layer.load_state_dict(random_checkpoint(public_shapes(16, **opts), 5))
    u = torch.randn(1, 12, 16, dtype=F64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 7])
    y, st = layer(u, state=layer.default_state(1), seq_idx=seq_idx)
    first, _ = layer(u[:, :5])
    second, second_st = layer(u[:, 5:], state=layer.default_state(1))
    assert_close(y, torch.cat([first, second], 1), name="packed == separate")
    for name, a, e in zip(("angle", "ssm", "B_prev", "x_prev"), st, second_st):
        assert_close(a, e, name=f"final {name}")
    with pytest.raises(ValueError, match="seq_idx and lengths"):
        layer(u, seq_idx=seq_idx, lengths=torch.tensor([12]))


@pytest.mark.slow  # the dynamo ONNX export of one layer takes one to two minutes on a shared CPU
@pytest.mark.parametrize("variant", ["siso", "mimo_norm"])
def test_onnx_step_streams_1000_tokens(variant, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from ssm.export import onnx_names, save_onnx
    torch.manual_seed(6)
    layer = Mamba3(16, **SMALL, **VARIANTS[variant]).eval()
    path = save_onnx(layer, str(tmp_path / "mamba3.onnx"))
    session = ort.InferenceSession(path)
    names = onnx_names(layer, "step")[0][1:]
    x = torch.randn(2, 1000, 16)
    state = layer.default_state(2)
    feed = [s.numpy() for s in state]
    with torch.no_grad():
        for t in range(1000):
            y, state = layer.step(x[:, t], state)
            out, *feed = session.run(None, {"x": x[:, t].numpy(), **dict(zip(names, feed))})
            assert_close(torch.from_numpy(out), y, rtol=1e-5, atol=1e-5, name=f"token {t}")
    for name, a, e in zip(("angle", "ssm", "B_prev", "x_prev"), map(torch.from_numpy, feed), state):
        if name == "angle":  # compared on the circle: 2 pi - eps and 0 are the same angle
            a, e = torch.polar(torch.ones_like(a), a), torch.polar(torch.ones_like(e), e)
        assert_close(a, e, rtol=1e-5, atol=1e-5, name=f"state {name} after 1000 tokens")
