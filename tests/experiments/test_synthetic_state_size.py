"""State-size accounting vs the state objects the layers actually return after streaming."""
import pytest
import torch

import ssm
from experiments.synthetic import state_bytes, state_entries
from ssm.layers.attention import TransformerBlock

D_MODEL, N_LAYERS, VOCAB = 16, 2, 7


def _held_bytes(tree) -> int:
    """Bytes of every tensor in a state tree, counted from the tensors themselves."""
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(_held_bytes(v) for v in tree.values())
    return sum(_held_bytes(v) for v in tree)


def _model(layer: str, **layer_kwargs):
    return ssm.SequenceModel(3, vocab_size=VOCAB, d_model=D_MODEL, n_layers=N_LAYERS, layer=layer,
                             layer_kwargs=layer_kwargs, pooling="none").eval()


def _streamed(model, ids: torch.Tensor):
    """State after feeding ids (B, L) one token at a time through `model.step`."""
    state = model.default_state(ids.shape[0])
    with torch.no_grad():
        for t in range(ids.shape[1]):
            _, state = model.step(ids[:, t], state)
    return state


@pytest.mark.parametrize("layer,layer_kwargs,per_layer", [
    ("s4d", dict(d_state=10), D_MODEL * 5 * 8),   # N/2 = 5 complex64 pairs per channel
    ("s4", dict(d_state=6, l_max=32), D_MODEL * 6 * 8),  # DPLR: the full N-dim complex64 state
])
@pytest.mark.parametrize("seq_len", [1, 13])
def test_ssm_state_matches_the_streamed_state(layer, layer_kwargs, per_layer, seq_len):
    model = _model(layer, **layer_kwargs)
    ids = torch.randint(0, VOCAB, (1, seq_len))
    held = _held_bytes(_streamed(model, ids))
    assert state_bytes(model, seq_len=seq_len) == held == N_LAYERS * per_layer
    assert state_bytes(model) == held  # a fixed-size state needs no length
    assert not any(e.grows for e in state_entries(model))


@pytest.mark.parametrize("seq_len", [1, 9])
def test_attention_cache_matches_prefill_and_step_streaming(seq_len):
    model = _model("transformer", causal=True, n_heads=2)
    ids = torch.randint(0, VOCAB, (2, seq_len))
    with torch.no_grad():
        _, prefilled = model(ids, state=model.default_state(2))
    streamed = _streamed(model, ids)
    assert state_bytes(model, batch_size=2, seq_len=seq_len) == _held_bytes(prefilled) == _held_bytes(streamed)
    assert state_bytes(model, batch_size=2, seq_len=seq_len) == 2 * state_bytes(model, seq_len=seq_len)


def test_attention_kv_part_follows_the_module_attributes():
    model = _model("transformer", causal=True, n_heads=4)
    seq_len = 21
    blocks = [b for b in model.blocks if isinstance(b, TransformerBlock)]
    kv = sum(2 * b.attn.n_heads * b.attn.head_dim * seq_len * b.attn.qkv.weight.element_size() for b in blocks)
    assert kv == 2 * N_LAYERS * seq_len * D_MODEL * 4
    entries = state_entries(model, seq_len=seq_len)
    assert sum(e.bytes for e in entries if e.path.endswith(("['k']", "['v']"))) == kv
    # Each cached token also keeps its position (int64) and a validity flag (bool).
    assert state_bytes(model, seq_len=seq_len) == kv + N_LAYERS * seq_len * (8 + 1)
    assert all(e.grows for e in entries)


def test_attention_cache_in_half_precision_halves_the_kv_part():
    model = _model("transformer", causal=True, n_heads=2).to(torch.float16)
    assert state_bytes(model, seq_len=10) == 2 * N_LAYERS * 10 * D_MODEL * 2 + N_LAYERS * 10 * 9


def test_growing_cache_needs_seq_len_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="seq_len"):
        state_bytes(_model("transformer", causal=True, n_heads=2))
    with pytest.raises(ValueError, match="batch_size"):
        state_bytes(_model("s4d", d_state=4), batch_size=0)
    with pytest.raises(TypeError, match="default_state"):
        state_bytes(torch.nn.Linear(2, 2))
