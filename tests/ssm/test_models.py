"""SequenceModel: pooling respects lengths, streaming == whole, step == forward, compile, encoders."""
import pytest
import torch

from ssm.models import SequenceModel
from tests.utils import assert_close


def _model(**kw):
    base = dict(vocab_size=11, d_model=8, n_layers=2, layer_kwargs=dict(d_state=8, backend="torch"))
    base.update(kw)
    return SequenceModel(3, **base)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls", "none"])
@pytest.mark.parametrize("layer,bidirectional,norm", [("s4d", True, "batch"), ("s4", False, "layer")])
def test_padding_never_reaches_real_positions_or_pooled_features(pooling, layer, bidirectional, norm):
    m = _model(layer=layer, pooling=pooling, pos="sinusoidal",
               layer_kwargs=dict(d_state=8, bidirectional=bidirectional, norm=norm, backend="torch", d_ff=16))
    m.train()  # batch norm in training mode: statistics must skip padding too
    x = torch.randint(1, 11, (3, 21))
    lengths = torch.tensor([21, 9, 15])
    noisy = x.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.randint(1, 11, (21 - n,))
    out_a, _ = m(x, lengths=lengths)
    out_b, _ = m(noisy, lengths=lengths)
    longer = torch.cat([noisy, torch.randint(1, 11, (3, 6))], dim=1)  # extra padding columns
    out_c, _ = m(longer, lengths=lengths)
    if pooling == "none":
        for b, n in enumerate(lengths.tolist()):
            assert_close(out_b[b, :n], out_a[b, :n], rtol=1e-4, atol=1e-5, name="per position")
            assert_close(out_c[b, :n], out_a[b, :n], rtol=1e-4, atol=1e-5, name="per position, longer")
    else:
        assert_close(out_b, out_a, rtol=1e-4, atol=1e-5, name=f"{pooling} pooled")
        assert_close(out_c, out_a, rtol=1e-4, atol=1e-5, name=f"{pooling} pooled, longer")
        assert m.features(x, lengths).shape == (3, 8)
    m.eval()
    single, _ = m(x[1:2, :9])                                         # the unpadded row alone
    batched, _ = m(noisy, lengths=lengths)
    want = batched[1:2, :9] if pooling == "none" else batched[1:2]
    assert_close(single, want, rtol=1e-4, atol=1e-5, name="padded row vs alone")


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_streaming_chunks_and_steps_equal_the_whole_sequence(layer):
    m = _model(layer=layer, pooling="none", d_input=2, vocab_size=None,
               layer_kwargs=dict(d_state=8, backend="torch", dt_min=0.01, dt_max=0.3,
                                 **({"l_max": 24} if layer == "s4" else {}))).eval()
    x = torch.randn(2, 24, 2)
    with torch.no_grad():
        whole, _ = m(x)
        s = m.default_state(2)
        a, s = m(x[:, :7], state=s)
        b, s = m(x[:, 7:], state=s)
        assert_close(torch.cat([a, b], 1), whole, rtol=1e-5, atol=1e-5, name="chunks")
        s, outs = m.default_state(2), []
        for t in range(24):
            o, s = m.step(x[:, t], s)
            outs.append(o)
    assert_close(torch.stack(outs, 1), whole, rtol=1e-5, atol=1e-5, name="steps")


def _compiled_matches_eager(backend):
    m = _model(pooling="mean").eval()
    x = torch.randint(0, 11, (2, 16))
    lengths = torch.tensor([16, 10])
    with torch.no_grad():
        want, _ = m(x, lengths=lengths)
        got, _ = torch.compile(m, backend=backend)(x, lengths=lengths)
    assert_close(got, want, rtol=1e-4, atol=1e-5, name=f"compiled ({backend})")


def test_torch_compile_small_model_runs():
    """Dynamo + AOTAutograd trace the whole model (quick); inductor codegen is the slow test below."""
    _compiled_matches_eager("aot_eager")


@pytest.mark.slow
def test_torch_compile_inductor():
    _compiled_matches_eager("inductor")


def test_transformer_backbone_accepts_the_same_calls():
    pytest.importorskip("ssm.layers.attention")
    m = SequenceModel(3, vocab_size=11, d_model=8, n_layers=1, layer="transformer",
                      layer_kwargs=dict(n_heads=2), pooling="cls", pos="learned", max_len=32)
    x = torch.randint(0, 11, (2, 12))
    out, _ = m(x, lengths=torch.tensor([12, 5]))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        SequenceModel(2, vocab_size=5, d_input=3)
    with pytest.raises(ValueError, match="layer"):
        SequenceModel(2, vocab_size=5, layer="lstm")
    with pytest.raises(ValueError, match="pooling"):
        SequenceModel(2, vocab_size=5, pooling="max")
    m = _model(d_input=2, vocab_size=None)
    with pytest.raises(ValueError, match=r"\(B, L, 2\)"):
        m(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="token ids"):
        _model()(torch.randn(2, 5))
    with pytest.raises(ValueError, match="step"):
        _model(pooling="mean").step(torch.tensor([1, 2]), None)


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_layer_options_through_layer_kwargs(layer):
    """The public-LRA layer options reach every block; one AdamW step with their groups runs."""
    from ssm.layers.params import param_groups
    kw = dict(d_state=8, backend="torch", n_ssm=1, dt_transform="softplus",
              tie_dropout=True, bidirectional=True, norm="batch")
    m = _model(layer=layer, dropout=0.1, layer_kwargs=kw).train()
    for blk in m.blocks:
        assert blk.layer.n_ssm == 1 and blk.layer.dt_transform == "softplus" and blk.drop.tie
        assert blk.layer.ssm.log_neg_real.shape == (1, 4)
    groups = param_groups(m, 1e-2, 0.05, ssm_lr=1e-3, dt_lr=None)
    dt_ids = {id(b.layer.ssm.log_dt) for b in m.blocks}
    dt_groups = [g for g in groups if any(id(p) in dt_ids for p in g["params"])]
    assert len(dt_groups) == 1 and dt_groups[0]["lr"] == 1e-2 and dt_groups[0]["weight_decay"] == 0.0
    opt = torch.optim.AdamW(groups)
    x = torch.randint(0, 11, (3, 20))
    out, _ = m(x, lengths=torch.tensor([20, 12, 7]))
    out.square().mean().backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in m.parameters())


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_nan_in_padding_changes_nothing_and_nan_at_a_real_position_is_named(layer):
    """Padded inputs are replaced by selection (a NaN * 0 would still be NaN): real outputs and the
    mean over real positions stay finite and equal; a NaN at a real position raises."""
    kw = dict(layer=layer, d_input=2, vocab_size=None)
    lengths = torch.tensor([12, 7])
    x = torch.randn(2, 12, 2)
    poisoned = x.clone()
    poisoned[1, 7:] = float("nan")
    for pooling in ("mean", "none"):
        torch.manual_seed(1)
        m = _model(pooling=pooling, **kw).eval()
        with torch.no_grad():
            want, _ = m(x, lengths=lengths)
            got, _ = m(poisoned, lengths=lengths)
        if pooling == "none":
            want, got = want[1, :7], got[1, :7]
        assert_close(got, want, name=f"{pooling}: NaN in padding")
    bad = x.clone()
    bad[1, 4, 0] = float("nan")
    with pytest.raises(ValueError, match="batch 1, position 4"):
        m(bad, lengths=lengths)


def test_step_with_a_state_list_of_the_wrong_length_raises():
    m = _model(pooling="last", d_input=2, vocab_size=None).eval()
    state = m.default_state(2)
    with pytest.raises(ValueError, match=r"list of 2 layer states.*got 1 states"):
        m.step(torch.randn(2, 2), state[:1])
    with pytest.raises(ValueError, match=r"list of 2 layer states.*got 3 states"):
        m.step(torch.randn(2, 2), state + state[:1])
    with pytest.raises(ValueError, match=r"list of 2 layer states"):
        m(torch.randn(2, 5, 2), state=state[:1])


def test_forward_state_and_lengths_are_keyword_only():
    m = _model(pooling="none", d_input=2, vocab_size=None)
    with pytest.raises(TypeError, match=r"forward\(x, lengths=\.\.\., state=\.\.\.\)"):
        m(torch.randn(2, 5, 2), torch.tensor([5, 3]))


@pytest.mark.parametrize("bidirectional", [None, True, False])
def test_bidirectional_argument_sets_every_block(bidirectional):
    m = _model(layer="s4d", bidirectional=bidirectional)
    want = False if bidirectional is None else bidirectional               # causal by default
    assert all(b.layer.config.bidirectional is want for b in m.blocks)
    t = SequenceModel(3, vocab_size=11, d_model=8, n_layers=1, layer="transformer",
                      layer_kwargs=dict(n_heads=2), bidirectional=bidirectional)
    assert t.blocks[0].attn.config.bidirectional is want
