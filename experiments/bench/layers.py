"""Layer benchmark cases (issue 7): S4D, S4, an SDPA attention layer and a Transformer block with
RoPE at equal width, forward (inference, under no_grad) and forward+backward (all parameters and
the input), time and peak memory.

- `s4d`: `ssm.layers.s4.S4(H, N, mode="diag")`; `s4`: `S4(H, N, mode="dplr")` (SPEC section 3),
  each at its constructor defaults (causal, default init and discretization).
- `attention`: `ssm.layers.attention.MultiHeadAttention` (SDPA, bidirectional), head dim 64.
- `transformer`: `ssm.layers.attention.TransformerBlock(pos="rope")` (pre-norm, GELU MLP), head dim 64.
Memory: on CUDA `max_memory_allocated` above the allocation before the call; on CPU the runner
measures peak RSS growth in a fresh process per case (`experiments.bench.child`).
"""
from __future__ import annotations

import importlib.util

import torch

LAYERS = ("s4d", "s4", "attention", "transformer")
HEAD_DIM = 64
_MODULE = {"s4d": "ssm.layers.s4", "s4": "ssm.layers.s4", "attention": "ssm.layers.attention",
           "transformer": "ssm.layers.attention"}


class Missing(Exception):
    """The layer's module is not in the tree yet."""


def preload(layer: str) -> None:
    """Import what the case needs (so a fresh process's RSS baseline includes the imports)."""
    if importlib.util.find_spec(_MODULE[layer]) is None:
        raise Missing(f"{_MODULE[layer].replace('.', '/')}.py is not in the tree")
    importlib.import_module(_MODULE[layer])


def build(layer: str, H: int, N: int | None, *, device: str) -> torch.nn.Module:
    """The layer at width H; N (state size) is used by s4d/s4 only (None for attention layers)."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    preload(layer)
    n_heads = max(1, H // HEAD_DIM)
    if layer in ("s4d", "s4"):
        from ssm.layers.s4 import S4
        return S4(H, N, mode="diag" if layer == "s4d" else "dplr", device=device)
    from ssm.layers.attention import MultiHeadAttention, TransformerBlock
    if layer == "attention":
        return MultiHeadAttention(H, n_heads=n_heads, device=device)
    return TransformerBlock(H, n_heads=n_heads, pos="rope", device=device)


def _forward(m: torch.nn.Module, x: torch.Tensor, amp: str) -> torch.Tensor:
    if amp == "bf16":  # SDPA's flash kernels need 16-bit inputs; the S4 layers keep SSM math in float32
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = m(x)
    else:
        out = m(x)
    return out[0] if isinstance(out, tuple) else out                                    # (B, L, H)


def run_layer_case(case: dict, *, before_timing=None) -> dict:
    """Sanity-check, then time, one (layer, B, H, N, L, mode) case. Keys of `case`: layer, B, H,
    N, L, mode, device, repeats, budget_s, amp ("none" | "bf16": autocast around the layer).
    `before_timing` runs after the first (checked) call, before the timed ones."""
    from experiments.bench.timing import time_case
    layer, B, H, N, L, mode, device = (case[k] for k in ("layer", "B", "H", "N", "L", "mode", "device"))
    amp = case.get("amp", "none")
    res = {"kind": "layer", "amp": amp, **{k: case[k] for k in ("layer", "B", "H", "N", "L", "mode")}}
    try:
        m = build(layer, H, N, device=device)
    except Missing as e:
        return {**res, "status": "SKIPPED", "reason": str(e)}
    except Exception as e:
        return {**res, "status": "FAILED", "reason": f"construction raised {type(e).__name__}: {str(e)[:200]}"}
    res["params"] = sum(p.numel() for p in m.parameters())
    gen = torch.Generator(device).manual_seed(0)  # on the device: no multi-GB host copies
    x = torch.randn(B, L, H, generator=gen, device=device)                             # (B, L, H)
    params = [p for p in m.parameters() if p.requires_grad]
    if mode == "fwd":
        def call():
            with torch.no_grad():
                return _forward(m, x, amp)
    else:
        x.requires_grad_(True)
        g = torch.randn(B, L, H, generator=gen, device=device)                         # (B, L, H)

        def call():
            return torch.autograd.grad(_forward(m, x, amp), [x] + params, g)
    try:
        out = call()
        outs = [out] if mode == "fwd" else list(out)
        if mode == "fwd" and tuple(out.shape) != (B, L, H):
            return {**res, "status": "FAILED", "reason": f"output shape {tuple(out.shape)} != {(B, L, H)}"}
        if not all(bool(torch.isfinite(t).all()) for t in outs):
            return {**res, "status": "FAILED", "reason": "non-finite output or gradient"}
        del out, outs
    except torch.cuda.OutOfMemoryError:
        return {**res, "status": "OOM", "reason": "CUDA out of memory"}
    except Exception as e:
        return {**res, "status": "FAILED", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    if before_timing is not None:
        before_timing()
    return time_case(res, call, device=device, case=case)
