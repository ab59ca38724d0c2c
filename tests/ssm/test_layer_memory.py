"""The S4 / S4D forward path (FFT convolution with the D skip folded in, activation, Linear, GLU):
equal to a plain float64 composition of the same ops, forward and gradients; and what it keeps for
the backward, counted with saved-tensor hooks against a bound in B*H*L."""
import pytest
import torch

from ssm.layers.s4 import S4
from tests.utils import assert_close

CONFIGS = [
    dict(mode="diag"),
    dict(mode="diag", channels=2, bidirectional=True),
    dict(mode="dplr"),
]


def _direct_causal(u, k):
    """y_l = sum_{m<=l} k_m u_{l-m}: u (B, H, L), k (c, H, L) -> (B, c, H, L), by a direct sum."""
    L = u.shape[-1]
    y = torch.zeros(u.shape[0], k.shape[0], u.shape[1], L, dtype=u.dtype)
    for m in range(L):
        y[..., m:] = y[..., m:] + k[None, :, :, m, None] * u[:, None, :, : L - m]
    return y


def _reference(m: S4, x: torch.Tensor) -> torch.Tensor:
    """The layer's math as a plain float64 composition (shares only the filter with the layer)."""
    c, (Bsz, L, H) = m.channels, x.shape
    K = m.filter(L).double()                                           # (c', H, L)
    u = x.double().transpose(1, 2)                                     # (B, H, L)
    y = _direct_causal(u, K[:c]) + m.D.double()[None, :, :, None] * u[:, None]
    if m.bidirectional:                                                # future inputs: flip, convolve, flip
        y = y + _direct_causal(torch.nn.functional.pad(u.flip(-1), (1, 0))[..., :L], K[c:]).flip(-1)
    a = torch.nn.functional.gelu(y).permute(0, 3, 1, 2).reshape(Bsz, L, c * H)
    z = a @ m.out.weight.double().T + m.out.bias.double()
    return z[..., :H] * torch.sigmoid(z[..., H:])                      # GLU


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_forward_and_gradients_equal_float64_composition(cfg):
    torch.manual_seed(0)
    m = S4(4, 8, dt_min=0.01, dt_max=0.5, backend="torch", **cfg)
    x = torch.randn(2, 24, 4, requires_grad=True)
    g = torch.randn(2, 24, 4, dtype=torch.float64)
    params = [x] + [p for p in m.parameters()]
    y, _ = m(x)
    want = _reference(m, x)
    assert_close(y, want, rtol=1e-4, atol=1e-5, name="output")  # float32 FFT over L terms vs float64 sums
    got = torch.autograd.grad((y.double() * g).sum(), params)
    ref = torch.autograd.grad((want * g).sum(), params)
    names = ["x"] + [n for n, _ in m.named_parameters()]
    for name, a, b in zip(names, got, ref):
        scale = b.abs().max().item()
        # float32 path vs float64 reference: 1e-4 of the largest gradient entry (sums over B*L terms)
        assert_close(a, b, rtol=1e-4, atol=1e-4 * max(scale, 1e-3), name=f"grad {name}")


def _saved_bytes(m: S4, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of m(x), less x and params."""
    skip = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y, _ = m(x)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["diag", "dplr"])
@pytest.mark.parametrize("save_spectrum", [True, False])
def test_saved_for_backward_stays_within_the_bound(mode, save_spectrum):
    Bsz, H, L = 2, 16, 512
    m = S4(H, 8, mode=mode, backend="torch")
    m.save_spectrum = save_spectrum
    x = torch.randn(Bsz, L, H, requires_grad=True)
    F = L + 1                                                          # rfft bins at FFT length 2L
    # what this design keeps (4-byte floats, 8-byte complex): the input spectrum (or nothing: x is
    # the input), the filter spectrum, the SSM output (activation backward), the activation (Linear
    # weight gradient) and the Linear output (GLU backward); plus the filter's small parameter tensors.
    # S4's filter also keeps what its rank-1 Woodbury backward needs: k01, k10 / (1 + k11) and
    # 1 + k11 at L/2 frequencies, 8-byte complex: 8 * 3 * H * L/2 bytes (the four Cauchy sums
    # themselves are freed after the forward).
    filter_terms = 8 * 3 * H * (L // 2) if mode == "dplr" else 0
    bound = (8 * Bsz * H * F if save_spectrum else 0) + 8 * H * F + 4 * Bsz * H * L * (1 + 1 + 2) + filter_terms
    saved = _saved_bytes(m, x)
    assert saved <= bound + 64 * 1024, (saved, bound)
    # and not much less: the count sees the big tensors (else the bound tests nothing)
    assert saved >= 0.9 * bound, (saved, bound)
