"""Step-form export of the selective layers (`ssm.Mamba`, `ssm.Mamba2`) and of any layer with a tuple state.

The references are independent of the export: the eager layer's own `step` loop and its
whole-sequence `forward` (the chunked scan). The ONNX files are streamed in onnxruntime for 1,000
tokens; the `torch.export` programs of `SequenceModel`s for fewer, since each program call is slow
in eager Python. Writing an ONNX file takes ~15 s on a loaded 2-core machine, so the layer files
run by default and the two `SequenceModel` files are marked slow.
"""
from typing import NamedTuple

import pytest
import torch
from torch import nn

from ssm import export
from ssm.layers.mamba import Mamba
from ssm.layers.mamba2 import Mamba2
from ssm.models import SequenceModel
from tests.utils import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
# Float32 outputs of size O(1); the step and the chunked scan sum in different orders, so the
# bound is the export target 1e-5 rather than the table's float32 atol.
STREAM_TOL = dict(rtol=1e-5, atol=1e-5)


def make_layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer = Mamba(16, 8) if kind == "mamba" else Mamba2(32, 16, headdim=8)
    return layer.eval()


def make_model(kind: str) -> SequenceModel:
    torch.manual_seed(0)
    cfg = dict(d_state=8) if kind == "mamba" else dict(d_state=16, headdim=8)
    return SequenceModel(5, vocab_size=13, d_model=16, n_layers=2, layer=kind, layer_config=cfg,
                         pooling="none").eval()


def eager_steps(module, xs):
    """Outputs of `module.step` over xs (B, L, ...) stacked along L, and the final state."""
    state, outs = module.default_state(xs.shape[0]), []
    with torch.no_grad():
        for t in range(xs.shape[1]):
            out, state = module.step(xs[:, t], state)
            outs.append(out)
    return torch.stack(outs, 1), state


def onnx_stream(path, module, xs):
    ort = pytest.importorskip("onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    ins, outs = export.onnx_names(module, "step")
    assert [i.name for i in sess.get_inputs()] == ins and [o.name for o in sess.get_outputs()] == outs
    states, got = [s.numpy() for s in export.StepModel(module).initial_state(xs.shape[0])], []
    for t in range(xs.shape[1]):
        out, *states = sess.run(None, dict(zip(ins, [xs[:, t].numpy(), *states])))
        got.append(torch.from_numpy(out))
    return torch.stack(got, 1), [torch.from_numpy(s) for s in states]


def _need_onnx():
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_onnx_layer_streams_1000_tokens_like_eager_step_and_forward(tmp_path, kind):
    _need_onnx()
    layer = make_layer(kind)
    path = export.save_onnx(layer, str(tmp_path / "step.onnx"))
    xs = torch.randn(2, 1000, layer.d_model, generator=torch.Generator().manual_seed(1))
    got, got_state = onnx_stream(path, layer, xs)
    want, want_state = eager_steps(layer, xs)
    assert_close(got, want, **STREAM_TOL, name="onnx vs step")
    for g, w in zip(got_state, export.StepModel(layer).flat_state(want_state)):
        assert_close(g, w, **STREAM_TOL, name="state vs step")
    with torch.no_grad():
        fwd, fwd_state = layer(xs, state=layer.default_state(2))
    assert_close(got, fwd, **STREAM_TOL, name="onnx vs forward")
    for g, w in zip(got_state, fwd_state):
        assert_close(g, w, **STREAM_TOL, name="state vs forward")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_onnx_sequence_model_streams_1000_tokens(tmp_path, kind):
    _need_onnx()
    model = make_model(kind)
    path = export.save_onnx(model, str(tmp_path / "step.onnx"))
    ids = torch.randint(0, 13, (2, 1000), generator=torch.Generator().manual_seed(2))
    got, _ = onnx_stream(path, model, ids)
    want, _ = eager_steps(model, ids)
    assert_close(got, want, **STREAM_TOL, name="onnx vs step")
    with torch.no_grad():
        assert_close(got, model(ids)[0], **STREAM_TOL, name="onnx vs forward")


@pytest.mark.parametrize("kind", ["mamba", "mamba2"])
def test_sequence_model_program_matches_step_and_forward(kind):
    model = make_model(kind)
    prog = export.export_step(model).module()
    ids = torch.randint(0, 13, (3, 20), generator=torch.Generator().manual_seed(3))
    step = export.StepModel(model)
    states, got = step.initial_state(3), []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            out, *states = prog(ids[:, t], *states)
            got.append(out)
        fwd, fwd_state = model(ids, state=model.default_state(3))
    got = torch.stack(got, 1)
    assert_close(got, eager_steps(model, ids)[0], **STREAM_TOL, name="program vs step")
    assert_close(got, fwd, **STREAM_TOL, name="program vs forward")
    for g, w in zip(states, step.flat_state(fwd_state)):
        assert_close(g, w, **STREAM_TOL, name="state")


def test_state_from_a_forward_continues_in_the_step_form():
    layer = make_layer("mamba2")
    gen = torch.Generator().manual_seed(4)
    head, tail = torch.randn(2, 37, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    step = export.StepModel(layer)
    prog = export.export_step(layer).module()
    with torch.no_grad():
        _, state = layer(head, state=layer.default_state(2))
        want, _ = layer(torch.cat([head, tail], 1))
        flat = step.flat_state(state)
        for t in range(tail.shape[1]):
            out, *flat = prog(tail[:, t], *flat)
            assert_close(out, want[:, 37 + t], **STREAM_TOL, name=f"out[{t}]")


class Inner(NamedTuple):
    a: torch.Tensor   # (B, H)
    b: torch.Tensor   # (B, H, 2)


class NestedStateLayer(nn.Module):
    """A toy causal layer whose state nests a NamedTuple in a tuple, as a Mamba-3 layer's may."""

    def __init__(self, d_model: int = 4):
        super().__init__()
        self.d_model = d_model
        self.w = nn.Parameter(torch.linspace(0.1, 0.9, d_model))

    def default_state(self, batch_size: int, device=None):
        H = self.d_model
        return (torch.zeros(batch_size, H, 3, device=device),
                Inner(torch.zeros(batch_size, H, device=device), torch.zeros(batch_size, H, 2, device=device)))

    def step(self, x_t, state):
        window, inner = state
        window = torch.cat([window[..., 1:], x_t[..., None]], -1)                       # (B, H, 3)
        a = self.w * inner.a + x_t                                                     # (B, H)
        b = torch.stack([inner.b[..., 1], a], -1)                                      # (B, H, 2)
        return a + window.sum(-1) + b[..., 0], (window, Inner(a, b))


def test_generic_path_flattens_nested_named_tuple_states():
    layer = NestedStateLayer().eval()
    assert export.onnx_names(layer, "step") == (["x", "state_0", "state_1", "state_2"],
                                                ["out", "next_state_0", "next_state_1", "next_state_2"])
    step = export.StepModel(layer)
    rebuilt = step.unflat_state(step.initial_state(2))
    assert isinstance(rebuilt[1], Inner) and rebuilt[1].b.shape == (2, 4, 2)
    prog = export.export_step(layer).module()
    xs = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(5))
    want, _ = eager_steps(layer, xs)
    states = step.initial_state(2)
    for t in range(xs.shape[1]):
        out, *states = prog(xs[:, t], *states)
        assert_close(out, want[:, t], name=f"out[{t}]")


class GrowingStateLayer(NestedStateLayer):
    def default_state(self, batch_size: int, device=None):
        return torch.zeros(batch_size, self.d_model, 0, device=device)

    def step(self, x_t, state):
        return x_t, torch.cat([state, x_t[..., None]], -1)


def test_unexportable_models_are_rejected_naming_the_argument():
    with pytest.raises(ValueError, match=r"model: the state changes shape"):
        export.StepModel(GrowingStateLayer())
    with pytest.raises(ValueError, match=r"model: the step form needs states made of tensors.*KV cache"):
        export.StepModel(SequenceModel(3, vocab_size=5, d_model=16, n_layers=1, layer="transformer",
                                       layer_kwargs=dict(causal=True), pooling="none"))
    with pytest.raises(TypeError, match=r"model must be an ssm.SequenceModel or a layer with step"):
        export.StepModel(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model: the convolution form supports S4 / S4D"):
        export.ConvModel(make_model("mamba2"), 16)
    with pytest.raises(ValueError, match=r"model: pooling='cls'"):
        export.StepModel(SequenceModel(3, vocab_size=5, d_model=16, n_layers=1, layer="mamba", pooling="cls"))
