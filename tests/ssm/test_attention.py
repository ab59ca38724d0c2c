"""MultiHeadAttention / TransformerBlock: SDPA == explicit scores, KV cache == full pass, padding,
ALiBi, positions at the input, bad arguments."""
import math

import pytest
import torch

from ssm.layers.attention import MultiHeadAttention, TransformerBlock, alibi_slopes
from ssm.layers.positional import AbsolutePositionalEmbedding, sinusoidal_table
from tests.utils import assert_close

D, NH = 32, 4

POS_CONFIGS = [
    dict(pos="none"),
    dict(pos="rope"),
    dict(pos="rope", rope_interleaved=True, rotary_fraction=0.5),
    dict(pos="rope", rope_scaling={"type": "yarn", "factor": 4.0}, max_len=8),
    dict(pos="rope", rope_scaling={"type": "ntk", "factor": 2.0}, log_n_scaling=True, max_len=4),
    dict(pos="rope2d", grid_width=3),
    dict(pos="alibi"),
]
IDS = ["none", "rope", "rope-inter-partial", "yarn", "ntk-logn", "rope2d", "alibi"]


def _pair(causal, **kw):
    a = MultiHeadAttention(D, n_heads=NH, causal=causal, impl="sdpa", dtype=torch.float64, **kw)
    b = MultiHeadAttention(D, n_heads=NH, causal=causal, impl="explicit", dtype=torch.float64, **kw)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", POS_CONFIGS, ids=IDS)
def test_sdpa_equals_explicit(causal, kw):
    a, b = _pair(causal, **kw)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    lengths = torch.tensor([11, 6])
    for lens in (None, lengths):
        ya, sa = a(x, lengths=lens)
        yb, sb = b(x, lengths=lens)
        assert_close(ya, yb, name=f"sdpa vs explicit lengths={lens}")
        assert (sa is None) == (not causal)


def _manual_attention(mha, x, causal):
    """Textbook attention in float64 with the module's weights (no positions)."""
    b, length, _ = x.shape
    q, k, v = mha.qkv(x).view(b, length, 3, NH, D // NH).permute(2, 0, 3, 1, 4)
    s = q @ k.transpose(-1, -2) / math.sqrt(D // NH)
    if causal:
        s = s.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(b, length, D)
    return mha.out_proj(y)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_textbook_attention(causal):
    mha = MultiHeadAttention(D, n_heads=NH, causal=causal, dtype=torch.float64)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    assert_close(mha(x)[0], _manual_attention(mha, x, causal))


@pytest.mark.parametrize("kw", POS_CONFIGS + [dict(pos="rope", rope_scaling={"type": "leaky_rerope", "window": 3, "factor": 4.0})],
                         ids=IDS + ["leaky-rerope"])
def test_step_and_chunks_equal_full_causal_forward(kw):
    blk = TransformerBlock(D, n_heads=NH, causal=True, dtype=torch.float64, **kw).eval()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    full, _ = blk(x)
    state = blk.default_state(2)
    ys = []
    for t in range(4):
        y_t, state = blk.step(x[:, t], state)
        ys.append(y_t)
    y_chunk, state = blk(x[:, 4:10], state=state)  # prefill the rest as one chunk after stepping
    assert_close(torch.cat([torch.stack(ys, 1), y_chunk], 1), full, name="step/chunk vs full")
    assert state["k"].shape == (2, NH, 10, D // NH)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kw", [dict(pos="rope"), dict(pos="alibi"), dict(pos="rope", impl="explicit"),
                                dict(pos="rope", rope_scaling={"type": "rerope", "window": 2})],
                         ids=["rope", "alibi", "explicit", "rerope"])
def test_padding_does_not_leak(causal, kw):
    blk = TransformerBlock(D, n_heads=NH, causal=causal, dtype=torch.float64, **kw).eval()
    x = torch.randn(3, 12, D, dtype=torch.float64)
    lengths = torch.tensor([12, 7, 1])
    y, _ = blk(x, lengths=lengths)
    x2 = x.clone()
    for i, n in enumerate(lengths.tolist()):
        x2[i, n:] = 1e3 * torch.randn(12 - n, D, dtype=torch.float64)  # garbage in the padding
        alone, _ = blk(x[i:i + 1, :n])  # the real part on its own
        assert_close(y[i:i + 1, :n], alone, name=f"row {i} vs unpadded")
    y2, _ = blk(x2, lengths=lengths)
    for i, n in enumerate(lengths.tolist()):
        assert_close(y2[i, :n], y[i, :n], name=f"row {i} with different padding")


def test_padded_batch_keeps_decoding_per_row():
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", dtype=torch.float64).eval()
    x = torch.randn(2, 8, D, dtype=torch.float64)
    nxt = torch.randn(2, D, dtype=torch.float64)
    _, state = blk(x, lengths=torch.tensor([8, 5]))
    y_t, _ = blk.step(nxt, state)
    ref, _ = blk(torch.cat([x[1:, :5], nxt[1:, None]], 1))  # row 1 continues at position 5
    assert_close(y_t[1], ref[0, -1])


def test_alibi_slopes_and_bias():
    assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)], dtype=torch.float64))
    s6 = alibi_slopes(6)
    assert_close(s6[:4], alibi_slopes(4))
    assert_close(s6[4:], torch.tensor([2.0 ** -1.0, 2.0 ** -3.0], dtype=torch.float64))
    # one head, zero projections except identity-like values: ALiBi alone decides the weights
    mha = MultiHeadAttention(4, n_heads=1, causal=True, pos="alibi", bias=False, dtype=torch.float64)
    with torch.no_grad():
        mha.qkv.weight.zero_()
        mha.qkv.weight[8:].copy_(torch.eye(4))
        mha.out_proj.weight.copy_(torch.eye(4))
    x = torch.eye(4, dtype=torch.float64)[None]
    y, _ = mha(x)
    w = torch.softmax(-2.0 ** -8 * torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64), 0)
    assert_close(y[0, 3], w)


def test_dropout_and_gradients_flow():
    blk = TransformerBlock(D, n_heads=NH, causal=True, pos="rope", dropout=0.1)
    x = torch.randn(2, 6, D, requires_grad=True)
    y, _ = blk(x, lengths=torch.tensor([6, 3]))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in blk.parameters())


def test_postnorm_and_mlp_width():
    blk = TransformerBlock(D, n_heads=NH, d_mlp=24, prenorm=False, bidirectional=True)
    assert blk.mlp[0].out_features == 24
    y, state = blk(torch.randn(2, 5, D))
    assert y.shape == (2, 5, D) and state is None
    assert_close(y.mean(-1), torch.zeros(2, 5), name="mean after the final LayerNorm")


def test_absolute_positional_embedding():
    pe = AbsolutePositionalEmbedding("sinusoidal", 6)
    x = torch.zeros(2, 4, 6)
    out = pe(x, offset=3)
    assert_close(out[0, 1, 0], torch.tensor(math.sin(4.0), dtype=torch.float32))
    assert_close(out[0, 1, 3], torch.tensor(math.cos(4.0 / 10000 ** (2 / 6)), dtype=torch.float32))
    assert_close(pe(x, offset=torch.tensor([0, 3]))[1], out[1])
    assert_close(sinusoidal_table(torch.arange(3), 5)[:, -1], torch.sin(torch.arange(3) / 10000 ** 0.8))
    learned = AbsolutePositionalEmbedding("learned", 6, max_len=5)
    assert_close(learned(x, offset=1)[0], learned.weight[1:5].detach())
    with pytest.raises(ValueError, match="max_len"):
        learned(x, offset=2)
    for bad in [("rotary", 6, 4), ("learned", 6, None)]:
        with pytest.raises(ValueError):
            AbsolutePositionalEmbedding(*bad)


@pytest.mark.parametrize("kw", [
    dict(n_heads=5), dict(pos="sinusoidal"), dict(impl="flash"), dict(dropout=1.0),
    dict(pos="none", rope_scaling={"type": "linear", "factor": 2.0}),
    dict(pos="rope", rope_scaling={"type": "bogus"}),
    dict(pos="rope", rope_scaling={"type": "yarn", "factor": 2.0}),  # no training length anywhere
    dict(pos="rope", rope_scaling={"type": "rerope", "window": 4}, impl="sdpa"),
    dict(pos="rope", rotary_fraction=0.1), dict(pos="rope2d"), dict(pos="rope2d", grid_width=4, n_heads=8, rotary_fraction=0.5),
    dict(log_n_scaling=True),
])
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        TransformerBlock(D, **{"n_heads": NH, **kw})


def test_bad_call_arguments_raise():
    blk = TransformerBlock(D, n_heads=NH, causal=False)
    x = torch.randn(2, 5, D)
    with pytest.raises(ValueError):
        blk(x[0])
    with pytest.raises(ValueError):
        blk(x, lengths=torch.tensor([5, 0]))
    with pytest.raises(ValueError):
        blk(x, lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="causal"):
        blk(x, state=blk.default_state(2))


def test_causal_by_default_and_causal_keyword_maps_to_bidirectional():
    x = torch.randn(2, 5, D, dtype=torch.float64)
    blk = TransformerBlock(D, n_heads=NH, dtype=torch.float64).eval()
    assert blk.attn.config.bidirectional is False
    y, cache = blk(x)                                                 # causal: the KV cache comes back
    assert cache is not None
    with torch.no_grad():
        y_prefix, _ = blk(x[:, :3])
    assert_close(y[:, :3], y_prefix, name="causal: a prefix does not see the future")
    assert TransformerBlock(D, n_heads=NH, causal=False).attn.config.bidirectional is True
    assert TransformerBlock(D, n_heads=NH, causal=True).attn.config.bidirectional is False
    assert MultiHeadAttention(D, n_heads=NH).config.bidirectional is False
    assert TransformerBlock(D, n_heads=NH, bidirectional=True)(x.float())[1] is None
    with pytest.raises(ValueError, match="contradicts"):
        TransformerBlock(D, n_heads=NH, causal=True, bidirectional=True)
    with pytest.raises(TypeError, match=r"state=\.\.\., lengths=\.\.\."):
        blk(x, None)


def test_sequence_model_transformer_layer_streams():
    from ssm.models import SequenceModel
    model = SequenceModel(7, vocab_size=11, d_model=D, n_layers=2, layer="transformer", pooling="none",
                          layer_kwargs=dict(n_heads=NH, causal=True, pos="rope",
                                            rope_scaling={"type": "yarn", "factor": 2.0}, max_len=4),
                          dtype=torch.float64).eval()
    x = torch.randint(0, 11, (2, 6))
    full, _ = model(x)
    state = model.default_state(2)
    steps = []
    for t in range(6):
        out_t, state = model.step(x[:, t], state)
        steps.append(out_t)
    assert_close(torch.stack(steps, 1), full)
    pooled = SequenceModel(3, vocab_size=11, d_model=D, n_layers=1, layer="transformer", pos="sinusoidal",
                           layer_kwargs=dict(n_heads=NH))
    assert pooled(x, lengths=torch.tensor([6, 2]))[0].shape == (2, 3)


def test_yarn_frequencies_and_scale_reach_the_logits():
    from ssm.layers import rope
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4}
    mha = MultiHeadAttention(D, n_heads=NH, causal=True, pos="rope", rope_scaling=scaling, dtype=torch.float64)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    b, length, hd = 2, 7, D // NH
    q, k, v = mha.qkv(x).view(b, length, 3, NH, hd).permute(2, 0, 3, 1, 4)
    inv_freq, att = rope.rope_frequencies(hd, scaling=scaling)
    assert att > 1.1
    ang = rope.rope_angles(torch.arange(length), inv_freq)
    q, k = (rope.apply_rotary(t, att * ang.cos(), att * ang.sin()) for t in (q, k))
    s = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    ref = mha.out_proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, length, D))
    assert_close(mha(x)[0], ref)
