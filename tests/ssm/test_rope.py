"""RoPE frequencies vs `transformers`, rotation layouts, relative-position property, variants, base bound."""
import math

import numpy as np
import pytest
import torch

from ssm.layers import rope
from tests.utils import approx, assert_close

HD = 64
L_TRAIN = 1024


def _hf_frequencies(kind, params, *, head_dim, max_pos, seq_len=None, partial=1.0):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    p = {"rope_type": kind, "rope_theta": 10000.0, **params}
    if partial != 1.0:
        p["partial_rotary_factor"] = partial
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                   max_position_embeddings=max_pos, rope_parameters=p)
    inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](cfg, "cpu", seq_len=seq_len)
    return inv_freq.to(torch.float64), scale


_LONG = {"short_factor": [1.0 + 0.01 * i for i in range(HD // 2)],
         "long_factor": [1.0 + 0.3 * i for i in range(HD // 2)]}
SHARED = [
    ("linear", {"factor": 4.0}),
    ("dynamic", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": L_TRAIN}),
    ("yarn", {"factor": 8.0, "original_max_position_embeddings": L_TRAIN, "beta_fast": 16.0, "beta_slow": 2.0,
              "truncate": False}),
    ("yarn", {"factor": 4.0, "original_max_position_embeddings": L_TRAIN, "mscale": 0.707,
              "mscale_all_dim": 1.0}),
    ("llama3", {"factor": 8.0, "original_max_position_embeddings": L_TRAIN, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0}),
    ("longrope", {"factor": 4.0, "original_max_position_embeddings": L_TRAIN, **_LONG}),
]


@pytest.mark.parametrize("seq_len", [None, 700, 3000])
@pytest.mark.parametrize("kind,params", SHARED, ids=[f"{k}{i}" for i, (k, _) in enumerate(SHARED)])
def test_frequencies_match_transformers(kind, params, seq_len):
    # transformers' dynamic type reads the training length from max_position_embeddings
    max_pos = L_TRAIN if kind == "dynamic" else 4 * L_TRAIN
    ref, ref_scale = _hf_frequencies(kind, params, head_dim=HD, max_pos=max_pos, seq_len=seq_len)
    mine_params = dict(params, original_max_position_embeddings=L_TRAIN) if kind == "dynamic" else params
    mine, scale = rope.rope_frequencies(HD, scaling={"type": kind, **mine_params}, seq_len=seq_len)
    assert_close(mine, ref, tol="rope_vs_transformers", name=f"{kind} inv_freq")
    assert scale == approx(ref_scale, tol="float64_scalar")


def test_partial_rotary_matches_transformers():
    ref, _ = _hf_frequencies("linear", {"factor": 2.0}, head_dim=HD, max_pos=4096, partial=0.5)
    mine, _ = rope.rope_frequencies(HD // 2, scaling={"type": "linear", "factor": 2.0})
    assert_close(mine, ref, tol="rope_vs_transformers", name="partial inv_freq")


def test_plain_ntk_and_ntk_mixed_formulas():
    d, s = 16, 4.0
    plain, scale = rope.rope_frequencies(d, base=500.0)
    assert scale == 1.0
    assert_close(plain, torch.tensor([500.0 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64))
    ntk, _ = rope.rope_frequencies(d, base=500.0, scaling={"type": "ntk", "factor": s})
    base2 = 500.0 * s ** (d / (d - 2))
    assert_close(ntk, torch.tensor([base2 ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64))
    mixed, _ = rope.rope_frequencies(d, base=500.0, scaling={"type": "ntk_mixed", "factor": s})
    a = math.log(s) / (d / 2) ** 0.75
    assert_close(mixed, plain * torch.exp(-a * torch.arange(d // 2, dtype=torch.float64) ** 0.75))
    # the highest frequency is untouched, the last pair is close to theta/s (exactly at j = d/2)
    assert mixed[0] == plain[0] and plain[-1] / s < mixed[-1] < plain[-1]


def test_interpolation_variants_short_range():
    """Fast (short-range) pairs keep theta under NTK/YaRN/llama3; linear compresses all of them."""
    plain, _ = rope.rope_frequencies(HD)
    s = 8.0
    lin, _ = rope.rope_frequencies(HD, scaling={"type": "linear", "factor": s})
    assert_close(lin, plain / s)
    yarn, att = rope.rope_frequencies(HD, scaling={"type": "yarn", "factor": s, "original_max_position_embeddings": L_TRAIN})
    r = L_TRAIN * plain / (2 * math.pi)  # rotations of each pair over the training length
    assert_close(yarn[r > 32], plain[r > 32], name="yarn fast pairs kept")
    assert_close(yarn[r < 1], plain[r < 1] / s, name="yarn slow pairs interpolated")
    assert att == approx(0.1 * math.log(s) + 1, tol="float64_scalar")
    ll, _ = rope.rope_frequencies(HD, scaling={"type": "llama3", "original_max_position_embeddings": L_TRAIN})
    wavelen = 2 * math.pi / plain
    assert_close(ll[wavelen < L_TRAIN / 4], plain[wavelen < L_TRAIN / 4])
    assert_close(ll[wavelen > L_TRAIN], plain[wavelen > L_TRAIN] / 8)
    ntk, _ = rope.rope_frequencies(HD, scaling={"type": "ntk", "factor": s})
    assert ntk[0] == plain[0] and ntk[-1].item() == approx(plain[-1].item() / s, tol="float64_scalar")
    # dynamic NTK is the plain RoPE up to the training length
    dyn, _ = rope.rope_frequencies(HD, scaling={"type": "dynamic", "factor": s, "original_max_position_embeddings": L_TRAIN},
                                   seq_len=L_TRAIN // 2)
    assert_close(dyn, plain)


@pytest.mark.parametrize("bad", [{"type": "nope"}, {"factor": 2.0}, {"type": "linear"},
                                 {"type": "linear", "factor": 2.0, "scale": 3},
                                 {"type": "yarn", "factor": 2.0}, {"type": "rerope", "window": 0}, "linear"])
def test_bad_scaling_raises(bad):
    with pytest.raises(ValueError):
        rope.rope_frequencies(HD, scaling=bad)


def test_bad_head_dim_raises():
    with pytest.raises(ValueError):
        rope.rope_frequencies(7)
    with pytest.raises(ValueError):
        rope.rope_base_bound(8, 0)


def _scores(q, k, m, n, inv_freq, interleaved=False):
    qa, ka = rope.rope_angles(torch.tensor([m]), inv_freq), rope.rope_angles(torch.tensor([n]), inv_freq)
    qr = rope.apply_rotary(q[None], qa.cos(), qa.sin(), interleaved=interleaved)
    kr = rope.apply_rotary(k[None], ka.cos(), ka.sin(), interleaved=interleaved)
    return (qr * kr).sum()


@pytest.mark.parametrize("interleaved", [False, True])
def test_scores_depend_only_on_relative_position(interleaved):
    d = 12
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    inv_freq, _ = rope.rope_frequencies(d, scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    for m, n in [(5, 2), (40, 13), (1000, 3)]:
        ref = _scores(q, k, m - n, 0, inv_freq, interleaved)
        for shift in (1, 17, 3001):
            assert_close(_scores(q, k, m + shift, n + shift, inv_freq, interleaved), ref)
    # and it is a rotation: norms are preserved
    a = rope.rope_angles(torch.arange(7), inv_freq)
    x = torch.randn(7, d, dtype=torch.float64)
    assert_close(rope.apply_rotary(x, a.cos(), a.sin(), interleaved=interleaved).norm(dim=-1), x.norm(dim=-1))


def test_layouts_agree_under_permutation_and_partial_rotary():
    d, r = 16, 8
    x = torch.randn(3, 5, d, dtype=torch.float64)
    inv_freq, _ = rope.rope_frequencies(r)
    a = rope.rope_angles(torch.arange(5) + 11, inv_freq)  # offset positions
    inter = rope.apply_rotary(x, a.cos(), a.sin(), interleaved=True)
    xp = rope.interleaved_to_half(x, r)
    half = rope.apply_rotary(xp, a.cos(), a.sin())
    assert_close(rope.interleaved_to_half(inter, r), half)
    assert_close(half[..., r:], x[..., r:], name="pass-through dims")
    # explicit formula for one pair in the half layout
    i, m = 2, 3
    ang = (m + 11) * inv_freq[i]
    assert_close(half[0, m, i], xp[0, m, i] * math.cos(ang) - xp[0, m, i + r // 2] * math.sin(ang))
    assert_close(half[0, m, i + r // 2], xp[0, m, i] * math.sin(ang) + xp[0, m, i + r // 2] * math.cos(ang))


def test_axial_rope_relative_in_rows_and_columns():
    d, width = 16, 5
    inv_freq, _ = rope.rope_frequencies(d // 2)
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)

    def score(pq, pk):
        qa = rope.axial_angles(torch.tensor([pq]), inv_freq, width)
        ka = rope.axial_angles(torch.tensor([pk]), inv_freq, width)
        return (rope.apply_rotary(q[None], qa.cos(), qa.sin()) * rope.apply_rotary(k[None], ka.cos(), ka.sin())).sum()

    # (row 1, col 2) vs (row 0, col 1) == (row 3, col 4) vs (row 2, col 3): same 2D offset
    assert_close(score(1 * width + 2, 0 * width + 1), score(3 * width + 4, 2 * width + 3))
    # same 1D distance, different 2D offset: different score
    assert abs(score(7, 3) - score(9, 5)) > 1e-3
    ang = rope.axial_angles(torch.tensor([2 * width + 3]), inv_freq, width)[0]
    assert_close(ang, torch.cat([2 * inv_freq, 3 * inv_freq]))


@pytest.mark.parametrize("leak", [None, 4.0])
def test_rerope_scores_use_clipped_distance(leak):
    d, w, lq = 8, 3, 10
    q, k = torch.randn(lq, d, dtype=torch.float64), torch.randn(lq, d, dtype=torch.float64)
    inv_freq, _ = rope.rope_frequencies(d)
    pos = torch.arange(lq)
    got = rope.rerope_scores(q, k, pos, pos, inv_freq, window=w, leak=leak)
    for m in range(lq):
        for n in range(lq):
            t = m - n
            tt = t if abs(t) < w else math.copysign(w + (abs(t) - w) / (leak or math.inf), t)
            qa = rope.rope_angles(torch.tensor([tt]), inv_freq)
            expected = (rope.apply_rotary(q[m:m + 1], qa.cos(), qa.sin()) * k[n]).sum()
            assert_close(got[m, n], expected, name=f"score[{m},{n}]")


def test_log_n_scale():
    out = rope.log_n_scale(torch.tensor([1, 64, 128, 1024]), 128)
    assert_close(out, torch.tensor([1.0, 1.0, 1.0, math.log(1024) / math.log(128)], dtype=torch.float64))


def _brute_force_bound(d, L, bases):
    i = np.arange(d // 2)
    for b in bases:
        theta = b ** (-2.0 * i / d)
        if all(np.cos(m * theta).sum() >= 0 for m in range(L + 1)):
            return b
    return None


@pytest.mark.parametrize("d,L", [(16, 64), (32, 200)])
def test_rope_base_bound_vs_brute_force(d, L):
    bound = rope.rope_base_bound(d, L)
    margin = rope.base_bound_margin(d, L, np.array([bound, bound * (1 - 1e-4)]))
    assert margin[0] >= 0 > margin[1], "bound must pass and a base just below it must fail"
    # brute force: the first passing base on a dense grid lies at or just above the bound
    step = 1.002
    grid = bound / step ** 400 * step ** np.arange(800)
    bf = _brute_force_bound(d, L, grid)
    assert bf is not None and bound <= bf * (1 + 1e-6) and bf <= bound * step * (1 + 1e-9)
    # no base below the grid start passes at coarse resolution either
    low = np.logspace(0.01, math.log10(grid[0]), 300)
    assert (rope.base_bound_margin(d, L, low) < 0).all()
