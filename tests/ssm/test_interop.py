"""Tiny random `transformers` Mamba / Mamba-2 causal LMs converted to `ssm.interop.MambaLM`."""
import pytest
import torch

from ssm.interop import MambaLM, from_transformers, to_transformers_state_dict
from tests.utils import assert_close

transformers = pytest.importorskip("transformers")

V, D, L, NEW = 50, 16, 21, 32


def _hf(kind):
    torch.manual_seed(0)
    if kind == "mamba":
        cfg = transformers.MambaConfig(vocab_size=V, hidden_size=D, state_size=5, num_hidden_layers=2,
                                       conv_kernel=4, expand=2, time_step_rank=3)
        model = transformers.MambaForCausalLM(cfg)
    else:
        cfg = transformers.Mamba2Config(vocab_size=V, hidden_size=D, state_size=6, num_hidden_layers=2,
                                        conv_kernel=4, expand=2, head_dim=8, num_heads=4, n_groups=2,
                                        chunk_size=8)
        model = transformers.Mamba2ForCausalLM(cfg)
    with torch.no_grad():   # random A, D, norm weights and larger steps, so every part matters
        for name, p in model.named_parameters():
            if name.endswith(("A_log", ".D", "norm.weight", "norm_f.weight")):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith(("dt_bias", "dt_proj.bias")):
                p.add_(1.5)
    return model.eval()


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_converted_model_gives_the_same_logits_and_greedy_text(kind):
    hf = _hf(kind)
    lm = from_transformers(hf, backend="torch").eval()
    ids = torch.randint(0, V, (2, L))
    with torch.no_grad():
        want = hf(ids).logits
        got, _ = lm(ids)
    # two float32 implementations of the same network: 1e-4 relative to the logits' scale
    scale = want.abs().max().item()
    assert_close(got, want, rtol=1e-4, atol=1e-4 * scale, name="logits")
    with torch.no_grad():
        want_ids = hf.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert torch.equal(lm.generate(ids, NEW), want_ids)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_round_trip_gives_back_the_state_dict(kind):
    hf = _hf(kind)
    back = to_transformers_state_dict(from_transformers(hf))
    want = hf.state_dict()
    assert set(back) == set(want)
    for key, value in want.items():
        assert torch.equal(back[key], value), key
    fresh = type(hf)(hf.config)
    fresh.load_state_dict(back, strict=True)


def test_lm_chunk_then_steps_equal_forward():
    lm = MambaLM(V, D, 2, layer="mamba2", layer_options=dict(d_state=4, headdim=8, chunk_size=4, backend="torch"))
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        want, _ = lm(ids)
        first, state = lm(ids[:, :5], state=lm.default_state(2))
        got = [first]
        for t in range(5, 9):
            logit, state = lm.step(ids[:, t], state)
            got.append(logit[:, None])
    assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5, name="chunk + steps")


def test_bad_arguments_raise_naming_them():
    with pytest.raises(ValueError, match="layer"):
        MambaLM(V, D, 1, layer="s4")
    with pytest.raises(ValueError, match="model must be"):
        from_transformers(torch.nn.Linear(2, 2))
    lm = MambaLM(V, D, 1, layer_options=dict(backend="torch"))
    with pytest.raises(ValueError, match="ids"):
        lm(torch.randn(2, 3))
    with pytest.raises(ValueError, match="state must be a list of 1"):
        lm(torch.randint(0, V, (2, 3)), state=[])
