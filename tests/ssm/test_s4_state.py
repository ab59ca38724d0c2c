"""What a saved S4 layer keeps (l_max for mode="dplr") and how bad states are refused."""
import io

import pytest
import torch

from ssm.layers.s4 import S4
from tests.ssm.layer_truth import l_max_kw
from tests.utils import assert_close

H, N, L = 4, 16, 160


def _trained(mode="dplr", steps=3):
    """A tiny layer trained for a few optimizer steps at length L (which fixes its l_max)."""
    m = S4(H, N, mode=mode, backend="torch", dt_min=0.01, dt_max=0.3)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randn(2, L, H)
        loss = (m(x)[0] - x.roll(1, 1)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()


def _reload(m, **kw):
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    fresh = S4(H, N, mode=m.mode, backend="torch", **kw).eval()        # constructed without l_max
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def _chunked(m, x, chunk):
    state, ys = m.default_state(x.shape[0]), []
    with torch.no_grad():
        for s in range(0, x.shape[1], chunk):
            y, state = m(x[:, s:s + chunk], state=state)
            ys.append(y)
    return torch.cat(ys, 1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_reloaded_layer_streams_like_the_trained_one(mode):
    m = _trained(mode)
    x = torch.randn(2, L, H)
    with torch.no_grad():
        want, _ = m(x)
    fresh = _reload(m)
    if mode == "dplr":
        assert fresh.l_max == L and int(fresh.state_dict()["ssm.fixed_l_max"]) == L
    for chunk in (1, 7, 128):
        # chunked state passing recombines float32 FFT convolutions of the pieces: TOL float32
        # relative error, with an atol of 1e-5 for outputs of size ~1 (as conv vs step elsewhere)
        assert_close(_chunked(fresh, x, chunk), want, rtol=1e-5, atol=1e-5, name=f"chunks of {chunk}")
    state, ys = fresh.default_state(2), []
    with torch.no_grad():
        for t in range(L):
            y, state = fresh.step(x[:, t], state)
            ys.append(y)
    assert_close(torch.stack(ys, 1), want, rtol=1e-5, atol=1e-5, name="step")


@pytest.mark.usefixtures("one_thread")
def test_checkpoint_without_l_max_needs_l_max_at_construction():
    m = _trained()
    old = {k: v for k, v in m.state_dict().items() if k != "ssm.fixed_l_max"}   # an older checkpoint
    with pytest.raises(RuntimeError, match=r"fixed_l_max is missing.*l_max="):
        S4(H, N, mode="dplr").load_state_dict(old)
    with pytest.raises(RuntimeError, match="fixed_l_max is missing"):
        S4(H, N, mode="dplr").load_state_dict(old, strict=False)
    seq = torch.nn.Sequential(torch.nn.Linear(H, H), S4(H, N, mode="dplr"))
    seq.load_state_dict({"0." + k: v for k, v in torch.nn.Linear(H, H).state_dict().items()}, strict=False)
    assert seq[1].l_max is None                                         # layer absent: no l_max error
    fresh = S4(H, N, mode="dplr", backend="torch", l_max=L).eval()
    fresh.load_state_dict(old)
    assert fresh.l_max == L
    x = torch.randn(1, L, H)
    with torch.no_grad():
        assert_close(_chunked(fresh, x, 7), m(x)[0], rtol=1e-5, atol=1e-5, name="given l_max kept")


def test_l_max_buffer_follows_the_layer():
    m = S4(H, N, mode="dplr", backend="torch")
    assert m.l_max is None and int(m.ssm.fixed_l_max) == -1
    with torch.no_grad():
        m(torch.randn(1, 40, H))
    assert m.l_max == 40 and int(m.ssm.fixed_l_max) == 40
    m.load_state_dict(S4(H, N, mode="dplr").state_dict())              # a checkpoint saved unfixed
    assert m.l_max is None
    assert "ssm.fixed_l_max" not in S4(H, N, mode="diag").state_dict()     # diag outputs do not use it
    assert m.to(torch.bfloat16).ssm.fixed_l_max.dtype == torch.int64


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_bad_state_names_argument_expected_and_got(mode):
    m = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 16))
    n = N // 2 if mode == "diag" else N
    x, xt = torch.randn(2, 16, H), torch.randn(2, H)
    good = m.default_state(2)
    assert good.shape == (2, H, n) and good.dtype == torch.complex64
    c64 = torch.complex64
    cases = [
        (torch.zeros(2, H, n + 1, dtype=c64), ValueError,
         rf"state must have shape \(2, {H}, {n}\).*got \(2, {H}, {n + 1}\)"),
        (torch.zeros(3, H, n, dtype=c64), ValueError, r"state must have shape \(2,.*got \(3,"),
        (torch.zeros(2, H, n, dtype=torch.complex128), TypeError,
         r"state must have dtype torch.complex64.*got torch.complex128"),
        (torch.zeros(2, H, n), TypeError, r"state must have dtype torch.complex64.*got torch.float32"),
        (torch.zeros(2, H, n, dtype=c64, device="meta"), ValueError,
         r"state must be on the layer's device cpu, got meta"),
        ([0.0], TypeError, r"state must be a torch.Tensor.*got list"),
    ]
    for state, err, msg in cases:
        with pytest.raises(err, match=msg):
            m.step(xt, state)
        with pytest.raises(err, match=msg):
            m(x, state=state)
