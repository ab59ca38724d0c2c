"""FFT convolution (+ skip) and the closed-form state algebra (docs/s4.md) against direct float64 loops."""
import pytest
import torch

from ssm.fftconv import (dense_next_state, dense_state_response, diag_next_state,
                         diag_state_response, fftconv, roll_left_padded)
from tests.utils import assert_close


def _direct_conv(u, k, k_rev=None):
    L = u.shape[-1]
    y = torch.zeros(torch.broadcast_shapes(u.shape[:-1], k.shape[:-1]) + (L,), dtype=u.dtype)
    y = [y[..., i] for i in range(L)]
    for l in range(L):
        for m in range(min(l + 1, k.shape[-1])):
            y[l] = y[l] + k[..., m] * u[..., l - m]
        if k_rev is not None:
            for m in range(L - 1 - l):
                y[l] = y[l] + k_rev[..., m] * u[..., l + 1 + m]
    return torch.stack(y, dim=-1)


@pytest.mark.parametrize("L", [1, 17, 64])
def test_causal_and_bidirectional_match_direct(L):
    u = torch.randn(2, 3, L)
    k, k_rev = torch.randn(3, L), torch.randn(3, L)
    u64, k64, k_rev64 = u.double(), k.double(), k_rev.double()        # the truth sees the same numbers
    atol = 3e-7 * L  # fftconv runs in float32 on purpose: rounding grows with the sum length
    assert_close(fftconv(u, k), _direct_conv(u64, k64), dtype=torch.float32, atol=atol, name="causal")
    assert_close(fftconv(u, k, k_rev), _direct_conv(u64, k64, k_rev64), dtype=torch.float32, atol=atol,
                 name="bidirectional")
    short = k[..., : max(1, L // 3)]
    assert_close(fftconv(u, short), _direct_conv(u64, k64[..., : max(1, L // 3)]), dtype=torch.float32,
                 atol=atol, name="short filter")
    # float64 inputs take the plain differentiable float64 path (the path of `.double()` layers)
    assert fftconv(u64, k64, k_rev64).dtype == torch.float64
    assert_close(fftconv(u64, k64, k_rev64), _direct_conv(u64, k64, k_rev64), name="float64 path")


def test_fftconv_float32_under_autocast_and_bad_length():
    u, k = torch.randn(1, 2, 32), torch.randn(2, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fftconv(u.bfloat16(), k)
    assert y.dtype == torch.float32
    with pytest.raises(ValueError, match="filter length"):
        fftconv(u, torch.randn(2, 33))


def _diag_system(H=3, N2=4):
    log_z = torch.complex(-torch.rand(H, N2, dtype=torch.float64) * 0.3 - 0.01,
                          torch.randn(H, N2, dtype=torch.float64))
    return log_z, torch.randn(H, N2, dtype=torch.complex128), torch.randn(2, H, N2, dtype=torch.complex128)


def test_roll_left_padded():
    u = torch.tensor([[1.0, 2.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    out = roll_left_padded(u, torch.tensor([2, 4]))
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 1.0, 2.0], [1.0, 2.0, 3.0, 4.0]]))


@pytest.mark.parametrize("with_lengths", [False, True])
def test_diag_state_algebra_matches_recurrence(with_lengths):
    log_z, Bb, C = _diag_system()
    Bsz, L = 2, 37
    u = torch.randn(Bsz, 3, L, dtype=torch.float64)
    lengths = torch.tensor([37, 20]) if with_lengths else None
    if with_lengths:
        u[1, :, 20:] = 0
    s0 = torch.randn(Bsz, 3, 4, dtype=torch.complex128)
    z, x, ys, finals = log_z.exp(), s0.clone(), [], []
    for k in range(L):
        x = z * x + Bb * u[..., k, None]
        ys.append(2 * torch.einsum("chn,bhn->bch", C, (z ** (k + 1)) * s0).real)
        finals.append(x.clone())
    want_state = torch.stack([finals[(int(lengths[b]) if with_lengths else L) - 1][b] for b in range(Bsz)])
    assert_close(diag_next_state(u, log_z, Bb, s0, lengths, chunk=8), want_state, name="next state")
    assert_close(diag_state_response(C, log_z, s0, L, backend="torch"), torch.stack(ys, -1), name="zero-input")


@pytest.mark.parametrize("with_lengths", [False, True])
def test_dense_state_algebra_matches_recurrence(with_lengths):
    H, N, Bsz, L = 2, 5, 2, 23
    Ab = torch.randn(H, N, N, dtype=torch.complex128) * 0.3
    Bb = torch.randn(H, N, dtype=torch.complex128)
    C = torch.randn(3, H, N, dtype=torch.complex128)
    u = torch.randn(Bsz, H, L, dtype=torch.float64)
    lengths = torch.tensor([9, 23]) if with_lengths else None
    if with_lengths:
        u[0, :, 9:] = 0
    s0 = torch.randn(Bsz, H, N, dtype=torch.complex128)
    x, zs, ys, finals = s0.clone(), s0.clone(), [], []
    for k in range(L):
        x = torch.einsum("hnm,bhm->bhn", Ab, x) + Bb * u[..., k, None]
        zs = torch.einsum("hnm,bhm->bhn", Ab, zs)
        ys.append(torch.einsum("chn,bhn->bch", C, zs).real)
        finals.append(x.clone())
    want_state = torch.stack([finals[(int(lengths[b]) if with_lengths else L) - 1][b] for b in range(Bsz)])
    assert_close(dense_next_state(u, Ab, Bb, s0, lengths, chunk=4), want_state, name="next state")
    assert_close(dense_state_response(C, Ab, s0, L, chunk=6), torch.stack(ys, -1), name="zero-input")


@pytest.mark.parametrize("bidirectional", [False, True])
def test_fftconv_gradients_match_autograd_of_the_direct_sum(bidirectional):
    u = torch.randn(2, 1, 3, 11, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    k_rev = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True) if bidirectional else None
    g = torch.randn(2, 2, 3, 11, dtype=torch.float64)
    inputs = [u, k] + ([k_rev] if bidirectional else [])
    got = torch.autograd.grad((fftconv(u, k, k_rev) * g).sum(), inputs)
    want = torch.autograd.grad((_direct_conv(u, k, k_rev) * g).sum(), inputs)
    for name, a, b in zip(("u", "k", "k_rev"), got, want):
        assert_close(a, b, dtype=torch.float32, atol=1e-5, name=f"grad {name}")


# ---- the fused convolution + skip (the S4 forward path) ---------------------------------------

def _direct_conv_skip(u, k, d, k_rev=None):
    """Plain float64 composition: direct causal (and anti-causal) sum, then the skip d * u."""
    return _direct_conv(u, k, k_rev) + d.unsqueeze(-1) * u


@pytest.mark.parametrize("save_spectrum", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("blocked", [False, True])
def test_conv_skip_forward_and_gradients_match_direct_float64(monkeypatch, save_spectrum, bidirectional, blocked):
    import ssm.fftconv as fc
    if blocked:  # one channel per block: the block loop and its gradient assembly run
        monkeypatch.setattr(fc, "BLOCK_BYTES", 1)
    B, c, H, L = 2, 2, 3, 13
    # float32 inputs: the fused float32 path (float64 inputs take the plain float64 path)
    u = torch.randn(B, 1, H, L, requires_grad=True)
    k = torch.randn(c, H, L, requires_grad=True)
    k_rev = torch.randn(c, H, L, requires_grad=True) if bidirectional else None
    d = torch.randn(c, H, requires_grad=True)
    g = torch.randn(B, c, H, L, dtype=torch.float64)
    inputs = [u, k, d] + ([k_rev] if bidirectional else [])
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    y = fftconv(u, k, k_rev, d, save_spectrum=save_spectrum)
    u64, k64, d64 = inputs64[:3]
    want_y = _direct_conv_skip(u64, k64, d64, inputs64[3] if bidirectional else None)
    assert y.dtype == torch.float32
    atol = 3e-7 * L  # float32 FFT on purpose (module docstring); rounding grows with the sum length
    assert_close(y, want_y, dtype=torch.float32, atol=atol, name="y")
    got = torch.autograd.grad((y * g.float()).sum(), inputs)
    want = torch.autograd.grad((want_y * g).sum(), inputs64)
    for name, a, b in zip(("u", "k", "d", "k_rev"), got, want):
        assert a.shape == b.shape, name
        assert_close(a, b, dtype=torch.float32, atol=1e-5, name=f"grad {name}")


def test_conv_skip_short_filter_broadcast_and_vector():
    u = torch.randn(4, 1, 20, dtype=torch.float64, requires_grad=True)     # broadcast over 3 filter rows
    k = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    d = torch.randn(3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 20, dtype=torch.float64)
    y = fftconv(u, k, d=d)
    want_y = _direct_conv_skip(u, k, d)
    assert_close(y, want_y, dtype=torch.float32, atol=1e-5, name="y")
    for name, a, b in zip("ukd", torch.autograd.grad((y * g).sum(), [u, k, d]),
                          torch.autograd.grad((want_y * g).sum(), [u, k, d])):
        assert_close(a, b, dtype=torch.float32, atol=1e-5, name=f"grad {name}")
    v, w = torch.randn(9, dtype=torch.float64), torch.randn(9, dtype=torch.float64)
    assert fftconv(v, w).shape == (9,)
    assert_close(fftconv(v, w), _direct_conv(v[None], w[None])[0], dtype=torch.float32, atol=1e-5, name="1-D")


def test_fft_length_is_the_smallest_5_smooth_length_of_at_least_2L():
    from ssm.fftconv import fft_length

    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for L in list(range(1, 300)) + [1000, 10007, 16384, 65536]:
        n = fft_length(L)
        assert n >= 2 * L and smooth(n), (L, n)
        assert not any(smooth(m) for m in range(2 * L, n)), (L, n)
    assert fft_length(16384) == 32768 and fft_length(10007) == 20250


def test_conv_skip_compiles_forward_and_backward():
    u = torch.randn(2, 1, 3, 16, requires_grad=True)
    k = torch.randn(1, 3, 16, requires_grad=True)
    d = torch.randn(1, 3, requires_grad=True)

    def f(u, k, d):
        return (fftconv(u, k, d=d) ** 2).sum()

    want = torch.autograd.grad(f(u, k, d), [u, k, d])
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", fullgraph=True)(u, k, d), [u, k, d])
    for a, b in zip(got, want):
        assert_close(a, b, rtol=1e-5, atol=1e-5, name="compiled gradient")
