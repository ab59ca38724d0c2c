"""Export an S4 / S4D `SequenceModel` out of Python: `torch.export` programs and ONNX files.

Two forms, both built from a trained model in eval mode and frozen (later parameter changes are
not seen):

- Step form (`StepModel`, `export_step`): one position at a time, `forward(x_t, *states) ->
  (out_t, *next_states)`, one state tensor per layer. States are real: a layer's complex state
  (B, H, n) travels as `torch.view_as_real(state)`, (B, H, n, 2), because ONNX has no complex
  tensors. Each S4 layer's recurrence is read off the layer's own `step` once (it is affine in
  the state and the input, so feeding it the basis states and a unit input gives its matrices)
  and replayed in real arithmetic: `y_t = W s_{t-1} + E u_t`, `s_t = M s_{t-1} + b u_t`, with `M`
  stored per mode (2 x 2 blocks) when the layer's transition is diagonal and as a dense matrix
  otherwise. The layer's output stage (activation, projection, GLU) is the layer's own code.
- Convolution form (`ConvModel`, `export_conv`): a whole sequence at once, with the filters of
  every layer computed once at `max_len` and truncated to the input's length L (a dynamic
  dimension, 1 <= L <= max_len). The first L taps of a filter do not depend on the length it was
  computed for (S4's length correction makes its truncated filter exact), so this equals the eager
  forward pass at every L up to float32 rounding.

`save_onnx` writes either form with `torch.onnx.export(dynamo=True)`. See docs/s4.md for the
recurrence and the convolution kernel.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ssm.fftconv import fftconv, no_autocast
from ssm.models import SequenceModel

FORMS = ("step", "conv")


def _check_model(model, *, streaming: bool) -> None:
    """ValueError/TypeError naming `model` when it cannot be exported in this form."""
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model must be an ssm.SequenceModel, got {type(model).__name__}")
    layers = [getattr(b, "layer", None) for b in model.blocks]
    if not all(hasattr(layer, "filter") and hasattr(layer, "step") for layer in layers):
        raise ValueError("model: export supports S4 / S4D layers (layer='s4' or 's4d'); "
                         f"got blocks of type {type(model.blocks[0]).__name__}")
    if not streaming:
        return
    for i, layer in enumerate(layers):
        if layer.bidirectional:
            raise ValueError(f"model: layer {i} is bidirectional, which has no recurrence: a step-form "
                             "export needs a causal model (bidirectional=False)")
    if model.pos is not None:
        raise ValueError(f"model: pos={model.pos_kind!r} (absolute positions) cannot stream; use pos='none'")
    if model.pooling == "cls":
        raise ValueError("model: pooling='cls' cannot stream (the CLS token follows the end of the "
                         "sequence); use pooling 'last', 'mean' or 'none'")


class _ProbedOutput:
    """Context that makes `layer._output` the identity, so `step` returns the SSM output itself."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    def __enter__(self):
        self.layer._output = lambda y: y
        return self.layer

    def __exit__(self, *exc):
        del self.layer._output


class RealStep(nn.Module):
    """The recurrence of one S4 layer in real arithmetic (see the module docstring).

    `step(x_t (B, H), state (B, H, n, 2)) -> (y_t (B, H), next state (B, H, n, 2))`.
    """

    @torch.no_grad()
    def __init__(self, layer: nn.Module):
        super().__init__()
        setup = getattr(layer, "setup_step", None)
        if callable(setup):
            setup()
        s0 = layer.default_state(1)
        if s0.dim() != 3 or not s0.is_complex():
            raise ValueError(f"model: expected a complex (B, H, n) layer state, got {tuple(s0.shape)} {s0.dtype}")
        H, n = s0.shape[1], s0.shape[2]
        m = 2 * n
        eye = torch.eye(m, device=s0.device, dtype=torch.float32).reshape(m, 1, n, 2)
        basis = torch.view_as_complex(eye.expand(m, H, n, 2).contiguous()).to(s0.dtype)     # (2n, H, n)
        states = torch.cat([basis, torch.zeros_like(basis[:1])])                           # (2n+1, H, n)
        u = torch.zeros(m + 1, H, device=s0.device)
        u[m] = 1.0                                                                         # unit input, zero state
        with _ProbedOutput(layer):
            y, s_new = layer.step(u, states)                                               # (2n+1, c*H), (2n+1, H, n)
        self.channels, self.d_model, self.n = y.shape[-1] // H, H, n
        s_new = torch.view_as_real(s_new.to(s0.dtype)).reshape(m + 1, H, m).float()        # (2n+1, H, 2n)
        M = s_new[:m].permute(1, 2, 0)                                                     # (H, 2n out, 2n in)
        blocks = M.reshape(H, n, 2, n, 2)
        off = blocks.clone()
        idx = torch.arange(n, device=M.device)
        off[:, idx, :, idx, :] = 0
        self.diagonal = bool((off == 0).all())
        if self.diagonal:
            self.register_buffer("M", blocks[:, idx, :, idx, :].permute(1, 0, 2, 3).contiguous())  # (H, n, 2, 2)
        else:
            self.register_buffer("M", M.contiguous())                                     # (H, 2n, 2n)
        self.register_buffer("b", s_new[m].reshape(H, n, 2).contiguous())                 # (H, n, 2)
        y = y.float().reshape(m + 1, self.channels, H)
        self.register_buffer("W", y[:m].permute(1, 2, 0).contiguous())                    # (c, H, 2n)
        self.register_buffer("E", y[m].contiguous())                                      # (c, H)
        self.act, self.dropout, self.out = layer.act, layer.dropout, layer.out
        self._layer_output = type(layer)._output

    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        device = self.M.device if device is None else device
        return torch.zeros(batch_size, self.d_model, self.n, 2, device=device)

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        Bsz = x_t.shape[0]
        with no_autocast(x_t.device.type):
            u = x_t.float()                                                                # (B, H)
            s = state.float()                                                              # (B, H, n, 2)
            flat = s.reshape(Bsz, self.d_model, 2 * self.n)                                # (B, H, 2n)
            y = torch.einsum("chk,bhk->bch", self.W, flat) + self.E * u[:, None, :]        # (B, c, H)
            if self.diagonal:
                s = (self.M * s.unsqueeze(-2)).sum(-1)                                     # (B, H, n, 2)
            else:
                s = torch.einsum("hpq,bhq->bhp", self.M, flat).reshape(s.shape)            # (B, H, n, 2)
            s = s + self.b * u[:, :, None, None]
        return self._layer_output(self, y.reshape(Bsz, -1)), s


class StepModel(nn.Module):
    """Step form of a causal S4/S4D `SequenceModel`: `forward(x_t, *states) -> (out_t, *states)`.

    x_t: token ids (B,) or features (B, d_input); out_t (B, d_output) is the model's output at this
    position before pooling (pooling "last": the classifier's output after the last token; "mean":
    the classifier's output is the mean of the streamed outputs, the decoder being affine).
    States: one (B, H, n, 2) real tensor per layer, `torch.view_as_real` of the layer's state, so
    a state from `model(x, state=...)` continues here after `view_as_real`.
    """

    def __init__(self, model: SequenceModel):
        super().__init__()
        _check_model(model, streaming=True)
        model = copy.deepcopy(model).eval()
        model.pooling = "none"   # the copy only steps: per-position outputs
        for block in model.blocks:
            block.layer = RealStep(block.layer)
        self.model = model
        self.eval()

    def initial_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        return tuple(b.layer.default_state(batch_size, device) for b in self.model.blocks)

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        dev = self.model.decoder.weight.device
        if self.model.vocab_size is not None:
            return torch.zeros(batch_size, dtype=torch.long, device=dev)
        return torch.zeros(batch_size, self.model.d_input, device=dev)

    def forward(self, x_t: torch.Tensor, *states: torch.Tensor):
        out, new = self.model.step(x_t, list(states))
        return (out, *new)


class FrozenConv(nn.Module):
    """Convolution mode of one S4 layer with its filter computed once at `max_len`."""

    @torch.no_grad()
    def __init__(self, layer: nn.Module, max_len: int):
        super().__init__()
        # one tap more than any input uses: slicing never takes the whole buffer, so torch.export
        # does not specialize the length to max_len
        self.register_buffer("K", layer.filter(max_len + 1).float().contiguous())          # (c', H, max_len+1)
        self.register_buffer("D", layer.D.detach().float().clone())                       # (c, H)
        self.channels, self.bidirectional = layer.channels, layer.bidirectional
        self.act, self.dropout, self.out = layer.act, layer.dropout, layer.out
        self._layer_output = type(layer)._output

    def forward(self, x: torch.Tensor, state=None, lengths=None):
        if state is not None or lengths is not None:
            raise ValueError("the convolution export takes full sequences: no state, no lengths")
        Bsz, L, H = x.shape
        c = self.channels
        with no_autocast(x.device.type):
            u = x.transpose(1, 2).float()                                                  # (B, H, L)
            K = self.K[..., :L]
            y = fftconv(u.unsqueeze(1), K[:c], K[c:] if self.bidirectional else None)      # (B, c, H, L)
            y = y + self.D[:, :, None] * u.unsqueeze(1)
        return self._layer_output(self, y.permute(0, 3, 1, 2).reshape(Bsz, L, c * H)), None


class ConvModel(nn.Module):
    """Convolution form of an S4/S4D `SequenceModel`: `forward(x (B, L[, d_input])) -> out`,
    the model's `forward(x)[0]` (pooled as configured) for 1 <= L <= max_len."""

    def __init__(self, model: SequenceModel, max_len: int):
        super().__init__()
        _check_model(model, streaming=False)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
            raise ValueError(f"max_len must be an int >= 2, got {max_len!r}")
        model = copy.deepcopy(model).eval()
        for block in model.blocks:
            block.layer = FrozenConv(block.layer, max_len)
        self.model, self.max_len = model, max_len
        self.eval()

    def example_input(self, batch_size: int = 1, length: int | None = None) -> torch.Tensor:
        L = min(self.max_len, 16) if length is None else length
        dev = self.model.decoder.weight.device
        if self.model.vocab_size is not None:
            return torch.zeros(batch_size, L, dtype=torch.long, device=dev)
        return torch.zeros(batch_size, L, self.model.d_input, device=dev)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


def _step_dynamic(step: StepModel):
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # forward(x_t, *states): the states are one variadic argument, so their shapes form one tuple
    return step, (step.example_input(2), *step.initial_state(2)), ({0: batch}, tuple(
        {0: batch} for _ in step.model.blocks))


def _conv_dynamic(conv: ConvModel):
    # the minimum length is 2: torch.export treats sizes 0 and 1 as special and would not keep L symbolic
    length = torch.export.Dim("length", min=2, max=conv.max_len)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    x = conv.example_input(2, min(conv.max_len, 16))
    return conv, (x,), ({0: batch, 1: length},)


def export_step(model: SequenceModel) -> torch.export.ExportedProgram:
    """`torch.export` program of the step form (`StepModel`), dynamic batch size."""
    step, args, dyn = _step_dynamic(StepModel(model))
    with torch.no_grad():
        return torch.export.export(step, args, dynamic_shapes=dyn)


def export_conv(model: SequenceModel, max_len: int) -> torch.export.ExportedProgram:
    """`torch.export` program of the convolution form (`ConvModel`), dynamic batch and length."""
    conv, args, dyn = _conv_dynamic(ConvModel(model, max_len))
    with torch.no_grad():
        return torch.export.export(conv, args, dynamic_shapes=(dyn[0],))


def onnx_names(model: SequenceModel, form: str) -> tuple[list[str], list[str]]:
    """Input and output names of the ONNX graph `save_onnx` writes."""
    if form == "conv":
        return ["x"], ["out"]
    n = len(model.blocks)
    return ["x"] + [f"state_{i}" for i in range(n)], ["out"] + [f"next_state_{i}" for i in range(n)]


def save_onnx(model: SequenceModel, path: str, *, form: str = "step", max_len: int | None = None) -> str:
    """Write the step form (or, with form="conv", the convolution form up to `max_len`) as ONNX.

    Uses the dynamo-based `torch.onnx.export` (opset 18+; the FFT becomes ONNX `DFT`). The conv
    form's intermediate shape annotations are dropped before saving: onnxruntime 1.32 rejects the
    exporter's annotation of the inverse real DFT's output ("Shape mismatch attempting to re-use
    buffer") and infers the shapes itself without them.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form == "step":
        module, args, dyn = _step_dynamic(StepModel(model))
    else:
        if max_len is None:
            raise ValueError("form='conv' needs max_len (the longest input the file will accept)")
        module, args, dyn = _conv_dynamic(ConvModel(model, max_len))
    inputs, outputs = onnx_names(model, form)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamic_shapes=dyn, input_names=inputs, output_names=outputs,
                                    dynamo=True, verbose=False)
    proto = program.model_proto
    if form == "conv":
        del proto.graph.value_info[:]
    import onnx
    onnx.save(proto, path)
    return path
