"""Export a causal `SequenceModel` or one layer out of Python: `torch.export` programs and ONNX files.

Two forms, both built from a trained model in eval mode and frozen (later parameter changes are
not seen):

- Step form (`StepModel`, `export_step`): one position at a time, `forward(x_t, *states) ->
  (out_t, *next_states)`, the states a flat list of real tensors with the batch first. One path
  serves every layer with `step(x_t, state)` and `default_state(batch)` whose state is a tensor or
  a (nested) tuple / list / NamedTuple of tensors of fixed shapes: the layer's own `step` is
  traced, its state flattened depth first (Mamba: conv and SSM state; Mamba-2 the same; a
  Mamba-3 layer whose state is a tuple holding its `Mamba3State` NamedTuple the same way). The
  step must be traceable by `torch.export`: no Python branch on tensor values (input checks that
  return early under `torch.compiler.is_compiling()`, as `ssm.layers.nn.check_finite` does, are
  fine), no complex tensors (ONNX has none), no in-place update of an input state.
  S4 / S4D layers take a second route, because their step is complex: a layer's state (B, H, n)
  travels as `torch.view_as_real(state)`, (B, H, n, 2). Each S4 layer's recurrence is read off
  its public `recurrence()` once (it is affine in
  the state and the input, so feeding it the basis states and a unit input gives its matrices)
  and replayed in real arithmetic: `y_t = W s_{t-1} + d u_t`, `s_t = M s_{t-1} + b u_t`, with `M`
  stored per mode (2 x 2 blocks) when the layer's transition is diagonal (S4D), as diagonal plus
  rank r when the layer steps that way (S4; the factors are checked against the probed `M`), and
  as a dense matrix otherwise. The layer's output stage (activation, projection, GLU) is the layer's own code.
- Convolution form (`ConvModel`, `export_conv`): a whole sequence at once, with the filters of
  every layer computed once at `max_len` and applied to inputs of any length L (a dynamic
  dimension, 2 <= L <= max_len). The first L taps of a filter do not depend on the length it was
  computed for (S4's length correction makes its truncated filter exact), so this equals the eager
  forward pass at every L up to float32 rounding.

`save_onnx` writes either form with `torch.onnx.export(dynamo=True)`. See docs/s4.md for the
recurrence and the convolution kernel, docs/selective.md for the selective layers' step.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ssm.fftconv import no_autocast
from ssm.models import SequenceModel

FORMS = ("step", "conv")


def _is_s4(layer) -> bool:
    """An S4-style layer: a linear time-invariant recurrence (`recurrence`) and a filter."""
    return hasattr(layer, "filter") and hasattr(layer, "recurrence")


def _check_model(model, *, streaming: bool) -> None:
    """ValueError/TypeError naming `model` when it cannot be exported in this form."""
    if not isinstance(model, SequenceModel):
        raise TypeError(f"model must be an ssm.SequenceModel, got {type(model).__name__}")
    layers = [getattr(b, "layer", b) for b in model.blocks]   # an attention block steps itself
    if not streaming:
        if not all(_is_s4(layer) for layer in layers):
            raise ValueError("model: the convolution form supports S4 / S4D layers (layer='s4' or 's4d'); "
                             f"got blocks of type {type(model.blocks[0]).__name__} (use the step form)")
        return
    for i, layer in enumerate(layers):
        if not (hasattr(layer, "step") and hasattr(layer, "default_state")):
            raise ValueError(f"model: layer {i} ({type(layer).__name__}) has no step/default_state; the step form "
                             "supports S4 / S4D, Mamba, Mamba-2 and any layer with a fixed-shape state")
        if getattr(layer, "bidirectional", False):
            raise ValueError(f"model: layer {i} is bidirectional, which has no recurrence: a step-form "
                             "export needs a causal model (bidirectional=False)")
    if model.pos is not None:
        raise ValueError(f"model: pos={model.pos_kind!r} (absolute positions) cannot stream; use pos='none'")
    if model.pooling == "cls":
        raise ValueError("model: pooling='cls' cannot stream (the CLS token follows the end of the "
                         "sequence); use pooling 'last', 'mean' or 'none'")


def _check_layer(layer) -> None:
    """TypeError/ValueError naming `model` when a bare layer has no exportable step."""
    if not isinstance(layer, nn.Module) or not all(hasattr(layer, a) for a in ("step", "default_state", "d_model")):
        raise TypeError("model must be an ssm.SequenceModel or a layer with step(x_t, state), "
                        f"default_state(batch_size) and d_model, got {type(layer).__name__}")
    if getattr(layer, "bidirectional", False):
        raise ValueError("model: the layer is bidirectional, which has no recurrence: a step-form export "
                         "needs a causal layer (bidirectional=False)")


def _leaves(state, where: str = "state") -> list:
    """The tensors of a state, depth first: a tensor, or a (nested) tuple / list / NamedTuple of them."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, (tuple, list)):
        return [t for i, s in enumerate(state) for t in _leaves(s, f"{where}[{i}]")]
    raise ValueError(f"model: the step form needs states made of tensors and tuples/lists of them; "
                     f"{where} is a {type(state).__name__} (S4 / S4D, Mamba, Mamba-2 qualify; a KV cache does not)")


def _skeleton(state):
    """The nesting of a state with its tensors replaced by None (kept to rebuild it from leaves)."""
    if isinstance(state, torch.Tensor):
        return None
    return type(state), [_skeleton(s) for s in state]


def _rebuild(skeleton, leaves):
    """Inverse of `_leaves` for the nesting `skeleton`; `leaves` is an iterator."""
    if skeleton is None:
        return next(leaves)
    kind, children = skeleton
    parts = [_rebuild(c, leaves) for c in children]
    return kind(*parts) if hasattr(kind, "_fields") else kind(parts)


@torch.no_grad()
def _probe(layer: nn.Module):
    """Feed `layer.step` the 2n real basis states (input 0) and the zero state (input 1).

    Returns (H, n, y (2n+1, c*H), next states as real (2n+1, H, 2n)): column k of the transition
    (in the `view_as_real` layout) and of the output functional come from basis state k; the
    last row is the response to a unit input.
    """
    layer.setup_step()
    system = layer.recurrence()
    s0 = layer.default_state(1)
    if s0.dim() != 3 or not s0.is_complex():
        raise ValueError(f"model: expected a complex (B, H, n) layer state, got {tuple(s0.shape)} {s0.dtype}")
    H, n = s0.shape[1], s0.shape[2]
    m = 2 * n
    eye = torch.eye(m, device=s0.device, dtype=torch.float32).reshape(m, 1, n, 2)
    basis = torch.view_as_complex(eye.expand(m, H, n, 2).contiguous()).to(s0.dtype)       # (2n, H, n)
    states = torch.cat([basis, torch.zeros_like(basis[:1])])                             # (2n+1, H, n)
    u = torch.zeros(m + 1, H, device=s0.device)
    u[m] = 1.0
    y, s_new = system.step(states, u)                                                     # (2n+1, c, H), (2n+1, H, n)
    y = (y + layer.D.to(y.dtype) * u[:, None, :]).reshape(m + 1, -1)                     # (2n+1, c*H)
    return H, n, y.float(), torch.view_as_real(s_new.to(s0.dtype)).reshape(m + 1, H, m).float()


@torch.no_grad()
def _lowrank(layer: nn.Module, M: torch.Tensor):
    """(z (H, n, 2), E, F (H, r, n, 2)) when the layer steps with `z x - E^T (F x)` (S4's DPLR step
    system) and that form reproduces the probed transition M (H, 2n, 2n); otherwise None."""
    system = layer.recurrence()
    if system.kind != "dplr":
        return None
    z, E, F = (t.to(torch.complex64) for t in (system.z, system.E, system.F))          # (H, n), (H, r, n) x2
    H, n = z.shape
    dense = torch.diag_embed(z) - torch.einsum("hrn,hrm->hnm", E, F)                    # (H, n, n) complex
    # column j of the complex transition is the response to the real basis state e_j
    probed = torch.view_as_complex(M.reshape(H, n, 2, n, 2)[..., 0].transpose(-1, -2).contiguous())  # (H, n, n)
    if not torch.allclose(probed, dense, rtol=1e-4, atol=1e-5 * float(dense.abs().max())):
        return None
    return tuple(torch.view_as_real(t).float().contiguous() for t in (z, E, F))


class RealStep(nn.Module):
    """The recurrence of one S4 layer in real arithmetic (see the module docstring).

    `step(x_t (B, H), state (B, H, n, 2)) -> (y_t (B, H), next state (B, H, n, 2))`. The transition
    is stored per mode (`form="diag"`, 2 x 2 real blocks), as diagonal plus rank r (`"lowrank"`,
    S4's O(N r) step) or as a dense (2n, 2n) real matrix per channel (`"dense"`).
    """

    def __init__(self, layer: nn.Module):
        super().__init__()
        H, n, y, s_new = _probe(layer)
        m = 2 * n
        self.channels, self.d_model, self.n = y.shape[-1] // H, H, n
        M = s_new[:m].permute(1, 2, 0)                                                     # (H, 2n out, 2n in)
        blocks = M.reshape(H, n, 2, n, 2)
        idx = torch.arange(n, device=M.device)
        off = blocks.clone()
        off[:, idx, :, idx, :] = 0
        lowrank = None if bool((off == 0).all()) else _lowrank(layer, M)
        if bool((off == 0).all()):
            self.form = "diag"
            self.register_buffer("M", blocks[:, idx, :, idx, :].permute(1, 0, 2, 3).contiguous())  # (H, n, 2, 2)
        elif lowrank is not None:
            self.form = "lowrank"
            for name, t in zip(("z", "lr_e", "lr_f"), lowrank):
                self.register_buffer(name, t)                                             # (H, n, 2), (H, r, n, 2)
        else:
            self.form = "dense"
            self.register_buffer("M", M.contiguous())                                     # (H, 2n, 2n)
        self.register_buffer("b", s_new[m].reshape(H, n, 2).contiguous())                 # (H, n, 2)
        y = y.reshape(m + 1, self.channels, H)
        self.register_buffer("W", y[:m].permute(1, 2, 0).contiguous())                    # (c, H, 2n)
        self.register_buffer("d", y[m].contiguous())                                      # (c, H)
        self.act, self.dropout, self.out = layer.act, layer.dropout, layer.out
        self._layer_output = type(layer).output

    def default_state(self, batch_size: int, device=None) -> torch.Tensor:
        device = self.b.device if device is None else device
        return torch.zeros(batch_size, self.d_model, self.n, 2, device=device)

    def _transition(self, s: torch.Tensor) -> torch.Tensor:
        """s (B, H, n, 2) -> the state before the input term, same shape."""
        if self.form == "diag":
            return (self.M * s.unsqueeze(-2)).sum(-1)
        if self.form == "dense":
            flat = s.reshape(s.shape[0], self.d_model, 2 * self.n)                         # (B, H, 2n)
            return torch.einsum("hpq,bhq->bhp", self.M, flat).reshape(s.shape)
        sr, si = s[..., 0].unsqueeze(2), s[..., 1].unsqueeze(2)                            # (B, H, 1, n)
        Fr, Fi, Er, Ei = self.lr_f[..., 0], self.lr_f[..., 1], self.lr_e[..., 0], self.lr_e[..., 1]
        fr = (Fr * sr - Fi * si).sum(-1, keepdim=True)                                     # (B, H, r, 1): F x
        fi = (Fr * si + Fi * sr).sum(-1, keepdim=True)
        cr = (fr * Er - fi * Ei).sum(2)                                                    # (B, H, n): E^T (F x)
        ci = (fr * Ei + fi * Er).sum(2)
        zr, zi = self.z[..., 0], self.z[..., 1]                                            # (H, n)
        sr, si = sr.squeeze(2), si.squeeze(2)
        return torch.stack([zr * sr - zi * si - cr, zr * si + zi * sr - ci], dim=-1)

    def step(self, x_t: torch.Tensor, state: torch.Tensor):
        Bsz = x_t.shape[0]
        with no_autocast(x_t.device.type):
            u = x_t.float()                                                                # (B, H)
            s = state.float()                                                              # (B, H, n, 2)
            flat = s.reshape(Bsz, self.d_model, 2 * self.n)                                # (B, H, 2n)
            y = torch.einsum("chk,bhk->bch", self.W, flat) + self.d * u[:, None, :]        # (B, c, H)
            s = self._transition(s) + self.b * u[:, :, None, None]
        return self._layer_output(self, y.reshape(Bsz, -1)), s


class StepModel(nn.Module):
    """Step form of a causal `SequenceModel` or of one layer: `forward(x_t, *states) -> (out_t, *states)`.

    For a `SequenceModel`, x_t is token ids (B,) or features (B, d_input) and out_t (B, d_output)
    the model's output at this position before pooling (pooling "last": the classifier's output
    after the last token; "mean": the classifier's output is the mean of the streamed outputs, the
    decoder being affine). For a layer (anything with `step(x_t, state)`, `default_state(batch)`
    and `d_model`, e.g. `ssm.Mamba`, `ssm.Mamba2`), x_t and out_t are (B, d_model).

    States travel as a flat list of tensors, each with the batch first: an S4 / S4D layer's state is
    one (B, H, n, 2) real tensor, `torch.view_as_real` of its complex state (its recurrence is
    replayed by `RealStep`); any other layer keeps its own `step` and its state, a tensor or a
    (nested) tuple / list / NamedTuple of tensors, is flattened depth first (`flat_state`,
    `unflat_state` convert). Such a state must keep its shapes from step to step.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, SequenceModel):
            _check_model(model, streaming=True)
            model = copy.deepcopy(model).eval()
            model.pooling = "none"   # the copy only steps: per-position outputs
            for block in model.blocks:
                if _is_s4(getattr(block, "layer", None)):
                    block.layer = RealStep(block.layer)
        else:
            _check_layer(model)
            model = copy.deepcopy(model).eval()
            model = RealStep(model) if _is_s4(model) else model
        self.model = model
        self.eval()
        state = self.model.default_state(1)
        leaves = _leaves(state)
        self._skeleton = _skeleton(state)
        self._check_fixed_shapes(leaves)

    @torch.no_grad()
    def _check_fixed_shapes(self, leaves: list) -> None:
        new = _leaves(self.model.step(self.example_input(1), self.unflat_state(leaves))[1])
        if [tuple(t.shape) for t in new] != [tuple(t.shape) for t in leaves]:
            raise ValueError("model: the state changes shape from one step to the next (a growing cache?): "
                             f"{[tuple(t.shape) for t in leaves]} -> {[tuple(t.shape) for t in new]}")

    def flat_state(self, state) -> tuple[torch.Tensor, ...]:
        """A state of the exported model or layer (S4 layers: the real `RealStep` layout) -> flat tuple."""
        return tuple(_leaves(state))

    def unflat_state(self, flat):
        """Inverse of `flat_state`."""
        return _rebuild(self._skeleton, iter(flat))

    def initial_state(self, batch_size: int, device=None) -> tuple[torch.Tensor, ...]:
        return self.flat_state(self.model.default_state(batch_size, device))

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        if not isinstance(self.model, SequenceModel):
            p = next(self.model.buffers() if isinstance(self.model, RealStep) else self.model.parameters())
            return torch.zeros(batch_size, self.model.d_model, device=p.device, dtype=p.dtype)
        dev = self.model.decoder.weight.device
        if self.model.vocab_size is not None:
            return torch.zeros(batch_size, dtype=torch.long, device=dev)
        return torch.zeros(batch_size, self.model.d_input, device=dev, dtype=self.model.decoder.weight.dtype)

    def forward(self, x_t: torch.Tensor, *states: torch.Tensor):
        out, new = self.model.step(x_t, self.unflat_state(states))
        return (out, *_leaves(new))


class FrozenConv(nn.Module):
    """Convolution mode of one S4 layer with its filter computed once at `max_len`.

    The FFT has one fixed power-of-two size `n_fft >= 2 max_len` whatever the input length:
    onnxruntime's DFT loses accuracy at other sizes (errors up to ~6e-4 at L = 1000, against
    ~3e-6 at L = 1024, when the size was 2L), and a constant size keeps torch.export from
    specializing the length. Causal taps sit at indices [0, max_len), the bidirectional filter's
    taps (lags -1, -2, ...) at the end of the buffer; an input of length L <= max_len, zero-padded
    to n_fft, never wraps around into [0, L).
    """

    @torch.no_grad()
    def __init__(self, layer: nn.Module, max_len: int):
        super().__init__()
        K = layer.filter(max_len).float()                                                  # (c', H, max_len)
        c = layer.channels
        self.n_fft = 2 * (1 << (max_len - 1).bit_length())
        kk = K.new_zeros(c, K.shape[1], self.n_fft)
        kk[..., :max_len] = K[:c]
        if layer.bidirectional:
            kk[..., self.n_fft - max_len:] = K[c:].flip(-1)                                # lag -(m+1) at n_fft-1-m
        self.register_buffer("K", kk.contiguous())                                        # (c, H, n_fft)
        self.register_buffer("D", layer.D.detach().float().clone())                       # (c, H)
        self.channels = c
        self.act, self.dropout, self.out = layer.act, layer.dropout, layer.out
        self._layer_output = type(layer).output

    def forward(self, x: torch.Tensor, state=None, lengths=None):
        if state is not None or lengths is not None:
            raise ValueError("the convolution export takes full sequences: no state, no lengths")
        Bsz, L, H = x.shape
        c = self.channels
        with no_autocast(x.device.type):
            u = x.transpose(1, 2).float()                                                  # (B, H, L)
            u_f = torch.fft.rfft(u.unsqueeze(1), n=self.n_fft)                             # (B, 1, H, n/2+1)
            k_f = torch.fft.rfft(self.K, n=self.n_fft)                                     # (c, H, n/2+1)
            y = torch.fft.irfft(u_f * k_f, n=self.n_fft)[..., :L]                          # (B, c, H, L)
            y = y + self.D[:, :, None] * u.unsqueeze(1)
        return self._layer_output(self, y.permute(0, 3, 1, 2).reshape(Bsz, L, c * H)), None


class ConvModel(nn.Module):
    """Convolution form of an S4/S4D `SequenceModel`: `forward(x (B, L[, d_input])) -> out`,
    the model's `forward(x)[0]` (pooled as configured) for 2 <= L <= max_len."""

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
    states = step.initial_state(2)
    return step, (step.example_input(2), *states), ({0: batch}, tuple({0: batch} for _ in states))


def _conv_dynamic(conv: ConvModel):
    # the minimum length is 2: torch.export treats sizes 0 and 1 as special and would not keep L symbolic
    length = torch.export.Dim("length", min=2, max=conv.max_len)
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    x = conv.example_input(2, min(conv.max_len, 16))
    return conv, (x,), ({0: batch, 1: length},)


def export_step(model: nn.Module) -> torch.export.ExportedProgram:
    """`torch.export` program of the step form (`StepModel`), dynamic batch size."""
    step, args, dyn = _step_dynamic(StepModel(model))
    with torch.no_grad():
        return torch.export.export(step, args, dynamic_shapes=dyn)


def export_conv(model: SequenceModel, max_len: int) -> torch.export.ExportedProgram:
    """`torch.export` program of the convolution form (`ConvModel`), dynamic batch and length."""
    conv, args, dyn = _conv_dynamic(ConvModel(model, max_len))
    with torch.no_grad():
        return torch.export.export(conv, args, dynamic_shapes=(dyn[0],))


def onnx_names(model: nn.Module, form: str) -> tuple[list[str], list[str]]:
    """Input and output names of the ONNX graph `save_onnx` writes.

    Step form of a `SequenceModel`: `state_{i}` for block i's state when it is one tensor,
    `state_{i}_{j}` for the j-th tensor (depth first) of a tuple state; of a layer: `state` or
    `state_{j}`. Outputs: `out` and the same names with `next_` in front.
    """
    if form == "conv":
        return ["x"], ["out"]
    state = model.default_state(1)
    if isinstance(model, SequenceModel):
        names = [f"state_{i}" if isinstance(s, torch.Tensor) else f"state_{i}_{j}"
                 for i, s in enumerate(state) for j in range(len(_leaves(s)))]
    else:
        names = ["state"] if isinstance(state, torch.Tensor) else [f"state_{j}" for j in range(len(_leaves(state)))]
    return ["x", *names], ["out", *(f"next_{n}" for n in names)]


def save_onnx(model: nn.Module, path: str, *, form: str = "step", max_len: int | None = None) -> str:
    """Write the step form (or, with form="conv", the convolution form up to `max_len`) as ONNX.

    Uses the dynamo-based `torch.onnx.export` (the FFT becomes ONNX `DFT`). Returns `path`.
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
    program.save(path)
    return path
