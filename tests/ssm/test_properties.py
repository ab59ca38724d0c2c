"""Properties of the S4 layer and the masked norm against independent float64 / torch references.

- The layer's own diagonal discretization (ZOH and bilinear), seen through its filter and its
  outputs, against the dense float64 system of `tests/ssm/layer_truth.py`.
- `forward(x, rate=r)` (and `layer.rate = r`) against stepping at rate r and against the float64
  recurrence at step `dt * r`.
- `MaskedNorm`'s batch-norm running mean / variance and outputs against `nn.BatchNorm1d` fed only
  the real (unpadded) positions.
"""
import pytest
import torch
from torch import nn

from ssm.layers.nn import MaskedNorm, length_mask
from ssm.layers.s4 import S4
from tests.ssm.layer_truth import filter64, l_max_kw, ssm_outputs64
from tests.utils import assert_close


# Float32 layer outputs against float64 truth or against each other use rtol = atol = 1e-5: the
# layer's documented conv == step agreement (docs/s4.md), looser than TOL[float32] because an
# output sums L filter taps and N/2 modes, each rounded in float32.
def _steps(m, x, rate=None):
    s, ys = m.default_state(x.shape[0]), []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, s = m.step(x[:, t], s, rate=rate)
            ys.append(y)
    return torch.stack(ys, 1)


# A float32 filter of length L carries the rounding of L products of float32 poles (the
# Vandermonde reference reduces the phase, but |K| and the sum over N/2 modes still round):
# relative 1e-5 of the largest tap, far below the ~20x error of a wrong Bb.
def _assert_filter(K, truth, name):
    assert_close(K, truth, rtol=1e-5, atol=1e-5 * truth.abs().max().item(), name=name)


@pytest.mark.parametrize("cfg", [dict(), dict(discretization="bilinear", init="lin"),
                                 dict(init="inv", channels=2), dict(bidirectional=True)],
                         ids=["zoh-legs", "bilinear-lin", "zoh-inv-c2", "zoh-bidirectional"])
def test_default_diag_layer_discretization_against_float64(cfg):
    """Default dt range [1e-3, 1e-1]: filter and outputs equal the dense float64 system's."""
    m = S4(8, 16, mode="diag", backend="torch", **cfg).eval()
    L = 48
    with torch.no_grad():
        _assert_filter(m.filter(L), filter64(m, L), "filter")
        _assert_filter(m.filter(L, rate=3.0), filter64(m, L, rate=3.0), "filter at rate 3")
    if cfg.get("bidirectional"):
        return
    x = torch.randn(2, L, 8)
    with torch.no_grad():
        want = m.output(ssm_outputs64(m, x).float())
        assert_close(m(x)[0], want, rtol=1e-5, atol=1e-5, name="forward vs float64 recurrence")
        assert_close(_steps(m, x), want, rtol=1e-5, atol=1e-5, name="step vs float64 recurrence")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
@pytest.mark.parametrize("rate", [0.5, 2.0])
def test_forward_at_rate_equals_stepping_at_rate(mode, rate):
    m = S4(4, 8, mode=mode, dt_min=0.01, dt_max=0.3, backend="torch", **l_max_kw(mode, 32)).eval()
    x = torch.randn(2, 32, 4)
    with torch.no_grad():
        y = m(x, rate=rate)[0]
        want = m.output(ssm_outputs64(m, x, rate=rate).float())
        assert_close(y, want, rtol=1e-5, atol=1e-5, name="forward(rate) vs float64 recurrence")
        assert_close(_steps(m, x, rate=rate), y, rtol=1e-5, atol=1e-5, name="step(rate) vs forward(rate)")
        assert (y - m(x)[0]).abs().max() > 1e-3                       # the rate does change the output
        m.rate = rate                                                  # the attribute is the default
        assert_close(m(x)[0], y, name="layer.rate")
        assert_close(_steps(m, x), y, rtol=1e-5, atol=1e-5, name="step with layer.rate")


def test_masked_batch_norm_running_stats_equal_batchnorm_on_real_positions():
    H = 5
    norm = MaskedNorm(H, kind="batch", momentum=0.2)
    ref = nn.BatchNorm1d(H, momentum=0.2)
    with torch.no_grad():                                             # non-trivial affine part
        norm.norm.weight.uniform_(0.5, 2.0)
        norm.norm.bias.normal_()
        ref.load_state_dict(norm.norm.state_dict())
    for lengths in ([7, 3, 5], [2, 7, 1], [7, 7, 6]):
        lengths = torch.tensor(lengths)
        x = 3 * torch.randn(3, 7, H) + torch.arange(H)                 # padding holds values too
        mask = length_mask(lengths, 7)                                 # (B, L)
        y = norm(x, lengths)
        y_ref = ref(x[mask])                                           # (n_real, H)
        assert_close(y[mask], y_ref, name="training output at real positions")
        assert_close(norm.norm.running_mean, ref.running_mean, name="running mean")
        assert_close(norm.norm.running_var, ref.running_var, name="running var")
        assert int(norm.norm.num_batches_tracked) == int(ref.num_batches_tracked)
    norm.eval()
    ref.eval()
    x = torch.randn(2, 4, H)
    assert_close(norm(x, torch.tensor([4, 2])), ref(x.reshape(-1, H)).reshape(2, 4, H), name="eval")
    assert_close(norm.step(x[:, 0]), ref(x[:, 0]), name="eval step")
