"""Attention decoding and packing: the static KV cache == full forward == dynamic cache, written in
place; packed documents (`seq_idx`) == separate runs, forward and gradients."""
import pytest
import torch

from ssm.layers.attention import MultiHeadAttention, StaticKVCache, TransformerBlock
from ssm.models import SequenceModel
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

D, NH = 32, 4

POS_CONFIGS = [
    dict(pos="none"),
    dict(pos="rope"),
    dict(pos="rope", rope_interleaved=True, rotary_fraction=0.5),
    dict(pos="rope", rope_scaling={"type": "yarn", "factor": 4.0}, max_len=8),
    dict(pos="rope", rope_scaling={"type": "ntk", "factor": 2.0}, log_n_scaling=True, max_len=4),
    dict(pos="rope2d", grid_width=3),
    dict(pos="alibi"),
    dict(pos="rope", impl="explicit"),
    dict(pos="rope", rope_scaling={"type": "leaky_rerope", "window": 3, "factor": 4.0}),
]
IDS = ["none", "rope", "rope-inter-partial", "yarn", "ntk-logn", "rope2d", "alibi", "explicit", "leaky-rerope"]


def _decode(blk, x, state, n_steps):
    """n_steps single steps, then the rest as one chunk: the outputs (B, L, H) and the state."""
    ys = []
    for t in range(n_steps):
        y_t, state = blk.step(x[:, t], state)
        ys.append(y_t[:, None])
    y_chunk, state = blk(x[:, n_steps:], state=state)
    return torch.cat(ys + [y_chunk], 1), state


@pytest.mark.parametrize("kw", POS_CONFIGS, ids=IDS)
def test_static_cache_decode_equals_full_forward_and_dynamic_cache(kw):
    torch.manual_seed(0)
    blk = TransformerBlock(D, n_heads=NH, causal=True, **kw).eval()
    x = torch.randn(2, 10, D)
    with torch.no_grad():
        full, _ = blk(x)
        cache = blk.default_state(2, max_len=12)
        static, out = _decode(blk, x, cache, 6)
        dynamic, _ = _decode(blk, x, blk.default_state(2), 6)
    assert out is cache and isinstance(cache, StaticKVCache) and cache.filled == 10
    assert_close(static, full, rtol=1e-6, atol=1e-6, name="static cache vs full forward")
    assert_close(static, dynamic, rtol=1e-6, atol=1e-6, name="static vs dynamic cache")
    assert cache.rotated == (kw["pos"] in ("rope", "rope2d") and "rerope" not in str(kw))


def test_static_cache_prefill_then_decode_in_float64():
    torch.manual_seed(1)
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", dtype=torch.float64).eval()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    full, _ = blk(x)
    cache = blk.default_state(3, max_len=9)
    y0, cache = blk(x[:, :5], state=cache)                    # prefill (SDPA's causal mask)
    ys = [blk.step(x[:, t], cache)[0][:, None] for t in range(5, 9)]
    assert_close(torch.cat([y0] + ys, 1), full, name="prefill + steps vs full")


def test_static_cache_is_written_in_place_and_keeps_its_buffers():
    blk = MultiHeadAttention(D, n_heads=NH, causal=True, pos="rope").eval()
    cache = blk.default_state(2, max_len=4)
    ptrs = (cache.k.data_ptr(), cache.v.data_ptr())
    with torch.no_grad():
        for _ in range(4):
            _, cache = blk.step(torch.randn(2, D), cache)
    assert (cache.k.data_ptr(), cache.v.data_ptr()) == ptrs and cache.filled == 4
    assert cache.lengths.tolist() == [4, 4] and cache.pos[0].tolist() == [0, 1, 2, 3]
    assert cache.nbytes() == 2 * 2 * NH * 4 * (D // NH) * 4
    with pytest.raises(ValueError, match="no room"):
        blk.step(torch.randn(2, D), cache)
    with pytest.raises(ValueError, match="batch, n_heads"):
        blk.step(torch.randn(3, D), blk.default_state(2, max_len=4))
    with pytest.raises(ValueError, match="max_len"):
        blk.default_state(2, max_len=0)
    with pytest.raises(ValueError, match="causal"):
        MultiHeadAttention(D, n_heads=NH, bidirectional=True).default_state(2, max_len=4)


def test_static_cache_padded_rows_continue_at_their_own_length():
    torch.manual_seed(2)
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", dtype=torch.float64).eval()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    nxt = torch.randn(2, D, dtype=torch.float64)
    lengths = torch.tensor([8, 5])
    _, dyn = blk(x, state=blk.default_state(2), lengths=lengths)
    _, st = blk(x, state=blk.default_state(2, max_len=9), lengths=lengths)
    assert not st.dense and st.lengths.tolist() == [8, 5]
    y_dyn, _ = blk.step(nxt, dyn)
    y_st, _ = blk.step(nxt, st)
    assert_close(y_st, y_dyn, name="static vs dynamic after padding")
    ref, _ = blk(torch.cat([x[1:, :5], nxt[1:, None]], 1))   # row 1 continues at position 5
    assert_close(y_st[1], ref[0, -1])


def test_sequence_model_steps_with_static_caches():
    torch.manual_seed(3)
    model = SequenceModel(7, vocab_size=7, d_model=D, n_layers=2, layer="transformer", pooling="none",
                          layer_kwargs=dict(n_heads=NH, pos="rope")).eval()
    tok = torch.randint(0, 7, (2, 6))
    with torch.no_grad():
        full, _ = model(tok)
        state = model.default_state(2, max_len=6)
        assert all(isinstance(st, StaticKVCache) for st in state)
        outs = []
        for t in range(6):
            o, state = model.step(tok[:, t], state)
            outs.append(o)
    assert_close(torch.stack(outs, 1), full, rtol=1e-6, atol=1e-6)


PACK_CONFIGS = [dict(pos="none"), dict(pos="rope"), dict(pos="rope2d", grid_width=2), dict(pos="alibi"),
                dict(pos="rope", log_n_scaling=True, max_len=3), dict(pos="rope", impl="explicit"),
                dict(pos="rope", rope_scaling={"type": "rerope", "window": 2})]
PACK_IDS = ["none", "rope", "rope2d", "alibi", "logn", "explicit", "rerope"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", PACK_CONFIGS, ids=PACK_IDS)
def test_packed_documents_equal_separate_runs_forward_and_grads(causal, kw):
    torch.manual_seed(4)
    blk = TransformerBlock(D, n_heads=NH, causal=causal, dtype=torch.float64, **kw)
    lens = [1, 2, 5, 3]                                         # one row of four documents
    seq_idx = torch.repeat_interleave(torch.arange(4), torch.tensor(lens))[None]   # (1, 11)
    x = torch.randn(1, sum(lens), D, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(1, sum(lens), D, dtype=torch.float64)
    y, _ = blk(x, seq_idx=seq_idx)
    gx, *gp = torch.autograd.grad((y * gy).sum(), [x, *blk.parameters()])
    parts = x.detach().split(lens, dim=1)
    ref_y, ref_gx, ref_gp = [], [], [torch.zeros_like(p) for p in blk.parameters()]
    for xi, gi in zip(parts, gy.split(lens, dim=1)):
        xi = xi.clone().requires_grad_(True)
        yi, _ = blk(xi)
        gxi, *gpi = torch.autograd.grad((yi * gi).sum(), [xi, *blk.parameters()])
        ref_y.append(yi.detach())
        ref_gx.append(gxi)
        ref_gp = [a + b for a, b in zip(ref_gp, gpi)]
    assert_close(y, torch.cat(ref_y, 1), name="packed forward")
    assert_close(gx, torch.cat(ref_gx, 1), name="packed grad x")
    for (name, _), a, b in zip(blk.named_parameters(), gp, ref_gp):
        assert_close(a, b, name=f"packed grad {name}")


def test_packed_batch_with_padding_and_two_rows():
    torch.manual_seed(5)
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", dtype=torch.float64).eval()
    x = torch.randn(2, 7, D, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1]])
    y, _ = blk(x, seq_idx=seq_idx, lengths=torch.tensor([7, 4]))
    assert_close(y[0, 3:5], blk(x[:1, 3:5])[0][0])
    assert_close(y[1, 1:4], blk(x[1:, 1:4])[0][0])


def test_seq_idx_bad_input():
    blk = MultiHeadAttention(D, n_heads=NH, causal=True, pos="rope")
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError, match=r"seq_idx must have shape \(2, 5\)"):
        blk(x, seq_idx=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        blk(x, seq_idx=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="non-decreasing"):
        blk(x, seq_idx=torch.tensor([[0, 1, 0, 1, 1]] * 2))
    with pytest.raises(ValueError, match="KV cache"):
        blk(x, seq_idx=torch.zeros(2, 5, dtype=torch.long), state=blk.default_state(2))
    dyn = MultiHeadAttention(D, n_heads=NH, pos="rope", rope_scaling={"type": "dynamic", "factor": 2.0}, max_len=4)
    with pytest.raises(ValueError, match="dynamic"):
        dyn(x, seq_idx=torch.zeros(2, 5, dtype=torch.long))


@pytest.mark.parametrize("kind", ["dynamic", "longrope"])
def test_static_cache_matches_dynamic_cache_for_length_dependent_scalings(kind):
    torch.manual_seed(6)
    scaling = {"type": kind, "factor": 2.0}
    if kind == "longrope":
        scaling.update(short_factor=[1.0, 1.5, 2.0, 2.5], long_factor=[2.0, 3.0, 4.0, 5.0])
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", rope_scaling=scaling, max_len=4,
                           dtype=torch.float64).eval()
    x = torch.randn(2, 9, D, dtype=torch.float64)
    cache = blk.default_state(2, max_len=9)
    assert not cache.rotated                                    # raw keys: re-rotated at every length
    static, _ = _decode(blk, x, cache, 7)
    dynamic, _ = _decode(blk, x, blk.default_state(2), 7)
    assert_close(static, dynamic, name=f"{kind}: static vs dynamic cache")


def test_static_decode_step_calls_sdpa_without_a_mask(monkeypatch):
    from ssm.layers import attention
    calls = []
    sdpa = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False):
        calls.append((tuple(k.shape), attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)

    blk = MultiHeadAttention(D, n_heads=NH, causal=True, pos="rope").eval()
    cache = blk.default_state(2, max_len=8)
    with torch.no_grad():
        blk(torch.randn(2, 5, D), state=cache)                 # prefill: SDPA's own causal mask
        monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
        blk.step(torch.randn(2, D), cache)
    assert calls == [((2, NH, 6, D // NH), True, False)]       # reads the 6 filled slots, no mask
