"""Export of S4/S4D models (`ssm.export`): torch.export programs and ONNX files against eager PyTorch.

The reference is the eager model itself (`model.step` with its complex states, `model(x)`): export
must reproduce it, so a wrong probe (a transposed transition, a missed input term, a state in the
wrong layout) or a filter truncated at the wrong length shows up as a mismatch.
"""
import pytest
import torch

from ssm import export
from ssm.models import SequenceModel
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
# Streamed outputs are O(1); float32 rounding of a reordered sum accumulates over the steps, so the
# absolute bound is the export target, 1e-5, rather than the table's float32 atol (1e-6).
STREAM_TOL = dict(rtol=1e-5, atol=1e-5)


def tiny(layer="s4d", *, tokens=True, pooling="last", bidirectional=False, **kw):
    torch.manual_seed(0)
    io = dict(vocab_size=13) if tokens else dict(d_input=3)
    lk = dict(d_state=8, bidirectional=bidirectional, **({"l_max": 32} if layer == "s4" else {}))
    return SequenceModel(5, **io, d_model=16, n_layers=2, layer=layer, pooling=pooling,
                         layer_kwargs=lk, **kw).eval()


def inputs(model, B, L, gen):
    if model.vocab_size is not None:
        return torch.randint(0, model.vocab_size, (B, L), generator=gen)
    return torch.randn(B, L, model.d_input, generator=gen)


def eager_stream(model, x):
    """Per-position outputs (L, B, d_output) and the final complex states of `model.step`."""
    state, outs = model.default_state(x.shape[0]), []
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, state = model.step(x[:, t], state)
            outs.append(out)
    return torch.stack(outs), state


CASES = [("s4d", True), ("s4", False)]


@pytest.mark.parametrize("layer,tokens", CASES)
def test_step_program_matches_eager_steps(layer, tokens):
    model = tiny(layer, tokens=tokens)
    x = inputs(model, 3, 40, torch.Generator().manual_seed(1))
    want, want_state = eager_stream(model, x)
    prog = export.export_step(model).module()
    step = export.StepModel(model)
    states = step.initial_state(3)
    with torch.no_grad():
        for t in range(x.shape[1]):
            out, *states = prog(x[:, t], *states)
            assert_close(out, want[t], **STREAM_TOL, name=f"out[{t}]")
    for got, ref in zip(states, want_state):
        assert_close(got, torch.view_as_real(ref), **STREAM_TOL, name="state")
    # a different batch size than the example's: the batch dimension is dynamic
    with torch.no_grad():
        out1 = prog(x[:1, 0], *step.initial_state(1))[0]
    assert_close(out1, want[0, :1], **STREAM_TOL)


def test_step_form_keeps_the_transition_structure():
    # S4D's transition is diagonal (2 x 2 real blocks per mode); S4 steps as diagonal plus rank r
    assert all(b.layer.form == "diag" for b in export.StepModel(tiny("s4d")).model.blocks)
    step = export.StepModel(tiny("s4"))
    assert all(b.layer.form == "lowrank" for b in step.model.blocks)
    assert step.initial_state(2)[0].shape == (2, 16, 8, 2)


def test_dense_fallback_matches_eager(monkeypatch):
    # a layer whose transition has no known structure is replayed with its dense probed matrix
    monkeypatch.setattr(export, "_lowrank", lambda layer, M: None)
    model = tiny("s4")
    step = export.StepModel(model)
    assert all(b.layer.form == "dense" for b in step.model.blocks)
    x = inputs(model, 2, 30, torch.Generator().manual_seed(7))
    want, _ = eager_stream(model, x)
    states = step.initial_state(2)
    with torch.no_grad():
        for t in range(30):
            out, *states = step(x[:, t], *states)
            assert_close(out, want[t], **STREAM_TOL, name=f"out[{t}]")


def test_state_from_a_chunked_forward_continues_in_the_step_form():
    model = tiny("s4d", pooling="none")
    gen = torch.Generator().manual_seed(2)
    x = inputs(model, 2, 24, gen)
    step = export.StepModel(model)
    with torch.no_grad():
        _, state = model(x[:, :16], state=model.default_state(2))        # prefill in convolution mode
        want, _ = model(x[:, 16:], state=state)
        states = [torch.view_as_real(s) for s in state]
        for t in range(16, 24):
            out, *states = step(x[:, t], *states)
            assert_close(out, want[:, t - 16], **STREAM_TOL, name=f"out[{t}]")


def test_mean_pooling_is_the_mean_of_streamed_outputs():
    model = tiny("s4d", pooling="mean")
    x = inputs(model, 2, 20, torch.Generator().manual_seed(3))
    step = export.StepModel(model)
    states, outs = step.initial_state(2), []
    with torch.no_grad():
        for t in range(20):
            out, *states = step(x[:, t], *states)
            outs.append(out)
        assert_close(torch.stack(outs).mean(0), model(x)[0], **STREAM_TOL)


@pytest.mark.parametrize("layer,tokens,pooling,bidirectional",
                         [("s4d", True, "mean", True), ("s4", False, "last", True)])
def test_conv_program_matches_eager_at_every_length(layer, tokens, pooling, bidirectional):
    model = tiny(layer, tokens=tokens, pooling=pooling, bidirectional=bidirectional)
    prog = export.export_conv(model, 64).module()
    gen = torch.Generator().manual_seed(4)
    for L in (2, 17, 32, 64):   # 32 = the S4 layers' l_max; others use S4's length correction
        x = inputs(model, 2, L, gen)
        with torch.no_grad():
            assert_close(prog(x), model(x)[0], name=f"L={L}")


def test_bad_models_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match=r"model: layer 0 is bidirectional.*no recurrence"):
        export.StepModel(tiny("s4d", bidirectional=True))
    with pytest.raises(ValueError, match=r"model: .*S4 / S4D"):
        export.StepModel(SequenceModel(3, vocab_size=5, d_model=16, n_layers=1, layer="transformer",
                                       layer_kwargs=dict(causal=True), pooling="none"))
    with pytest.raises(ValueError, match=r"model: pos='learned'"):
        export.StepModel(tiny("s4d", pos="learned", max_len=40))
    with pytest.raises(ValueError, match=r"model: pooling='cls'"):
        export.StepModel(tiny("s4d", pooling="cls"))
    with pytest.raises(TypeError, match=r"model must be an ssm.SequenceModel"):
        export.StepModel(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"max_len must be an int >= 2"):
        export.ConvModel(tiny("s4d"), 1)
    with pytest.raises(ValueError, match=r"form must be one of"):
        export.save_onnx(tiny("s4d"), "unused.onnx", form="scan")
    with pytest.raises(ValueError, match=r"form='conv' needs max_len"):
        export.save_onnx(tiny("s4d"), "unused.onnx", form="conv")


def _onnx_session(path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("layer,tokens", CASES)
def test_onnx_step_matches_eager_over_1000_steps(tmp_path, layer, tokens):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = tiny(layer, tokens=tokens)
    path = export.save_onnx(model, str(tmp_path / "step.onnx"))
    sess = _onnx_session(path)
    ins, outs = export.onnx_names(model, "step")
    assert [i.name for i in sess.get_inputs()] == ins and [o.name for o in sess.get_outputs()] == outs
    x = inputs(model, 2, 1000, torch.Generator().manual_seed(5))
    want, want_state = eager_stream(model, x)
    states = [s.numpy() for s in export.StepModel(model).initial_state(2)]
    got = []
    for t in range(x.shape[1]):
        out, *states = sess.run(None, dict(zip(ins, [x[:, t].numpy(), *states])))
        got.append(torch.from_numpy(out))
    assert_close(torch.stack(got), want, **STREAM_TOL)
    for s, ref in zip(states, want_state):
        assert_close(torch.from_numpy(s), torch.view_as_real(ref), **STREAM_TOL, name="state")


def test_onnx_conv_matches_eager_at_every_length(tmp_path):
    # S4 and S4D give the same graph here (the filters are constants), so one model covers both;
    # the causal path with pooling "none" is the one the torch.export test above leaves out
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    model = tiny("s4", tokens=False, pooling="none")
    sess = _onnx_session(export.save_onnx(model, str(tmp_path / "conv.onnx"), form="conv", max_len=256))
    gen = torch.Generator().manual_seed(6)
    # non-power-of-two lengths too: an FFT of size 2L lost accuracy in onnxruntime's DFT there
    for L in (2, 17, 100, 250, 256):
        x = inputs(model, 2, L, gen)
        with torch.no_grad():
            want = model(x)[0]
        assert_close(torch.from_numpy(sess.run(None, {"x": x.numpy()})[0]), want, name=f"L={L}")
