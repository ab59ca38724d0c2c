"""Fast autoregressive decoding: one `SequenceModel` step as few large tensor operations.

`compile_step(model)` returns a `FusedStep`: a callable `(x_t, state) -> (out_t, state)` with the
same arguments and results as `model.step`, built for inference (the model in eval mode, grad
off). It does per token what the eager step does, without the per-call work that does not
change between tokens:

- S4 / S4D blocks: the one-step system (`S4.recurrence`: z, Bb, C and the low-rank E, F of the
  DPLR form) is built once; the readout `y = 2 Re(C x)` becomes one real product-and-sum over
  the state seen as real pairs, and the state is updated in place (`x <- z x + Bb u`);
- Mamba / Mamba-2 blocks: A = -exp(A_log) and the head layout are prepared once; the convolution
  window and the SSM state are updated in place, the readout is one batched matrix product;
- Transformer blocks: their own step (use `default_state(batch, max_len=...)`, a static KV cache
  written in place, for the fast path);
- input checks, cache look-ups and defensive copies of the eager step are skipped.

The state tensors passed in are therefore modified in place (and returned); `model.step` leaves
them untouched. Parameters are read when `compile_step` is called: call it again after changing
them. `backend="inductor"` additionally wraps the fused step in `torch.compile` (needs a C++
compiler on CPU; the first call compiles). The eager `model.step` remains the reference; the
tests compare both over many tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("fused", "inductor")


def compile_step(model: nn.Module, *, backend: str = "fused") -> FusedStep:
    """A fused step function for `model` (an `ssm.SequenceModel`); see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return FusedStep(model, backend=backend)


def _s4_block_plan(block, *, real: bool = False) -> dict:
    """Everything a fused S4 block step needs, built once (no grad). `real`: the diagonal state
    update in real arithmetic (for inductor, which generates code for real tensors only and
    calls back into ATen for every complex op)."""
    layer = block.layer
    system = layer.recurrence()
    c = system.C.shape[0]
    factor = 2.0 if system.kind == "diag" else 1.0                 # diag stores N/2 conjugate pairs
    if system.kind == "dense":
        raise ValueError("compile_step: S4 layers set up with a dense step system are not supported")
    W = factor * torch.stack([system.C.real, -system.C.imag], dim=-1)   # (c, H, n, 2)
    plan = dict(kind=system.kind, z=system.z, Bb=torch.view_as_real(system.Bb), E=system.E, F=system.F, c=c,
                W=W.flatten(-2), D=layer.D.to(system.C.real.dtype), real=system.C.real.dtype)
    if real and system.kind == "diag":
        plan.update(kind="diag_real", z=torch.view_as_real(system.z).unbind(-1), Bb=plan["Bb"].unbind(-1))
    return plan


def _s4_layer_step(block, plan: dict, x_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """The S4 layer's output for one position (B, H); `state` (B, H, n) advanced in place."""
    u = x_t.to(plan["real"])                                       # (B, H)
    if plan["kind"] == "diag_real":
        sr = torch.view_as_real(state)                             # (B, H, n, 2)
        (zr, zi), (br, bi), (a, b) = plan["z"], plan["Bb"], sr.unbind(-1)
        u1 = u.unsqueeze(-1)                                       # (B, H, 1)
        sr.copy_(torch.stack([zr * a - zi * b + br * u1, zr * b + zi * a + bi * u1], dim=-1))
    else:
        if plan["kind"] == "dplr":
            Fx = (plan["F"] * state.unsqueeze(2)).sum(-1)         # (B, H, r)
            corr = (Fx.unsqueeze(-1) * plan["E"]).sum(-2)         # (B, H, n)
            state.mul_(plan["z"]).sub_(corr)
        else:
            state.mul_(plan["z"])
        sr = torch.view_as_real(state)                             # (B, H, n, 2)
        sr.addcmul_(plan["Bb"], u[..., None, None])               # + Bb u, real input: no complex copy of u
    sr = sr.flatten(-2)                                           # (B, H, 2n)
    y = (sr.unsqueeze(1) * plan["W"]).sum(-1)                     # (B, c, H)
    y = torch.addcmul(y, plan["D"], u.unsqueeze(1))               # (B, c, H)
    return block.layer.output(y.reshape(y.shape[0], -1))          # (B, H)


def _s4_block_step(block, plan: dict, x_t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    if block.prenorm:
        x_t = x_t + _s4_layer_step(block, plan, block.norm.step(x_t), state)
        if block.ff is not None:
            x_t = x_t + block.ff(block.norm_ff.step(x_t))
        return x_t
    x_t = block.norm.step(x_t + _s4_layer_step(block, plan, x_t, state))
    if block.ff is not None:
        x_t = block.norm_ff.step(x_t + block.ff(x_t))
    return x_t


def _shift_in(conv_state: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Slide the convolution window (B, C, W) left by one and append u (B, C), in place."""
    conv_state.copy_(torch.cat([conv_state[..., 1:], u.unsqueeze(-1).to(conv_state.dtype)], -1))
    return conv_state


def _conv_out(conv, conv_state: torch.Tensor, dtype) -> torch.Tensor:
    out = (conv_state.to(dtype) * conv.weight[:, 0, :]).sum(-1)   # (B, C)
    return F.silu(out if conv.bias is None else out + conv.bias)


def _mamba_plan(layer) -> dict:
    f = layer._state_dtype()
    return dict(A=-torch.exp(layer.A_log.to(f)), D=layer.D.to(f), bias=layer.dt_proj.bias.to(f), f=f,
                split=[layer.dt_rank, layer.config.d_state, layer.config.d_state])


def _mamba_step(layer, plan: dict, x_t: torch.Tensor, state: tuple) -> torch.Tensor:
    conv_state, ssm_state = state
    u, z = layer.in_proj(x_t).chunk(2, dim=-1)                    # (B, D) each
    v = _conv_out(layer.conv1d, _shift_in(conv_state, u), u.dtype)   # (B, D)
    dt_raw, Bm, Cm = layer.x_proj(v).split(plan["split"], dim=-1)  # (B, R|N|N)
    f = plan["f"]
    dt = F.softplus(F.linear(dt_raw, layer.dt_proj.weight).to(f) + plan["bias"])   # (B, D)
    vf = v.to(f)
    ssm_state.mul_(torch.exp(dt.unsqueeze(-1) * plan["A"]))       # (B, D, N)
    ssm_state.addcmul_((dt * vf).unsqueeze(-1), Bm.to(f).unsqueeze(1))
    y = torch.bmm(ssm_state, Cm.to(f).unsqueeze(-1)).squeeze(-1)  # (B, D)
    y = torch.addcmul(y, plan["D"], vf) * F.silu(z.to(f))
    return layer.out_proj(y.to(x_t.dtype))                        # (B, d_model)


def _mamba2_plan(layer) -> dict:
    cfg, f = layer.config, layer._state_dtype()
    H, P, G = layer.nheads, cfg.headdim, cfg.ngroups
    D = layer.D.to(f).view(H, P) if cfg.D_has_hdim else layer.D.to(f)[:, None].expand(H, P)
    return dict(A=-torch.exp(layer.A_log.to(f)), D=D, dt_bias=layer.dt_bias.to(f), f=f, H=H, P=P, G=G,
                N=cfg.d_state, limit=tuple(cfg.dt_limit))


def _mamba2_step(layer, plan: dict, x_t: torch.Tensor, state: tuple) -> torch.Tensor:
    conv_state, ssm_state = state
    H, P, G, N, f = plan["H"], plan["P"], plan["G"], plan["N"], plan["f"]
    z0, x0, z, xBC, dt = layer._split(layer.in_proj(x_t))         # (B, .) each
    xBC = _conv_out(layer.conv1d, _shift_in(conv_state, xBC), xBC.dtype)   # (B, conv_dim)
    xs, Bm, Cm = xBC.split([layer.d_ssm, G * N, G * N], dim=-1)
    dt = F.softplus(dt.to(f) + plan["dt_bias"]).clamp(*plan["limit"])   # (B, H)
    Bh = Bm.to(f).view(-1, G, 1, N).repeat_interleave(H // G, dim=1)   # (B, H, 1, N)
    Ch = Cm.to(f).view(-1, G, N, 1).repeat_interleave(H // G, dim=1)   # (B, H, N, 1)
    xf = xs.to(f).view(-1, H, P)                                  # (B, H, P)
    ssm_state.mul_(torch.exp(dt * plan["A"])[..., None, None])    # (B, H, P, N)
    ssm_state.addcmul_((dt.unsqueeze(-1) * xf).unsqueeze(-1), Bh)
    y = torch.matmul(ssm_state, Ch).squeeze(-1)                   # (B, H, P)
    y = torch.addcmul(y, plan["D"], xf)
    if not layer.config.rmsnorm:
        y = y * F.silu(z.to(f).view(-1, H, P))
    return layer._output(y.flatten(-2).to(x_t.dtype), z, z0, x0)  # (B, d_model)


def _selective_block_step(block, fn, plan: dict, x_t: torch.Tensor, state: tuple) -> torch.Tensor:
    if block.prenorm:
        return x_t + fn(block.layer, plan, block.norm.step(x_t), state)
    return block.norm.step(x_t + fn(block.layer, plan, x_t, state))


class FusedStep:
    """`model.step` for inference with in-place state updates; built by `compile_step`."""

    def __init__(self, model: nn.Module, *, backend: str = "fused"):
        from ssm.layers.attention import TransformerBlock
        from ssm.layers.block import S4Block, SelectiveBlock
        from ssm.layers.mamba import Mamba
        from ssm.layers.mamba2 import Mamba2
        if not all(hasattr(model, a) for a in ("blocks", "encoder", "norm", "decoder", "step")):
            raise TypeError(f"compile_step needs an ssm.SequenceModel, got {type(model).__name__}")
        if model.training:
            raise ValueError("compile_step needs the model in eval mode (call model.eval()): the fused step "
                             "has no dropout and uses running norm statistics")
        if model.pos is not None or model.pooling not in ("none", "last"):
            raise ValueError("compile_step needs pos='none' and pooling 'none' or 'last' (as model.step does)")
        self.model, self.backend = model, backend
        self._layers = []
        with torch.no_grad():
            for block in model.blocks:
                if isinstance(block, S4Block):
                    plan = _s4_block_plan(block, real=backend == "inductor")
                    self._layers.append((_s4_block_step, (block, plan)))
                elif isinstance(block, SelectiveBlock) and isinstance(block.layer, (Mamba, Mamba2)):
                    mamba = isinstance(block.layer, Mamba)
                    fn, plan = (_mamba_step, _mamba_plan) if mamba else (_mamba2_step, _mamba2_plan)
                    self._layers.append((_selective_block_step, (block, fn, plan(block.layer))))
                elif isinstance(block, (TransformerBlock, SelectiveBlock)):
                    # No fused form (attention with a static cache is already few large ops;
                    # Mamba-3): the block's own step, whose returned state is used.
                    self._layers.append((None, (block,)))
                else:
                    raise TypeError(f"compile_step: no step for block {type(block).__name__}")
        self._fn = self._step
        if backend == "inductor":
            self._fn = torch.compile(self._step, backend="inductor", dynamic=False)

    def _step(self, x_t: torch.Tensor, state: list):
        m = self.model
        h = m.encoder(x_t)                                         # (B, H)
        out_state = []
        for (fn, args), s in zip(self._layers, state):
            if fn is None:
                h, s = args[0].step(h, s)
            else:
                h = fn(*args, h, s)
            out_state.append(s)
        return m.decoder(m.norm(h)), out_state

    def __call__(self, x_t: torch.Tensor, state: list):
        """x_t: token ids (B,) or features (B, d_input); state: `model.default_state(B)` (per-layer
        states, advanced in place) -> (out_t (B, d_output), state)."""
        if not isinstance(state, (list, tuple)) or len(state) != len(self._layers):
            raise ValueError(f"state must be a list of {len(self._layers)} layer states (model.default_state)")
        with torch.no_grad():
            return self._fn(x_t, list(state))
