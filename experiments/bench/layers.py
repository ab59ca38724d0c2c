"""Layer benchmark cases: S4D, S4, an SDPA attention layer and a Transformer block with RoPE at
equal width, forward (inference, under no_grad) and forward+backward (all parameters and the
input), time and peak memory.

- `s4d`: `ssm.layers.s4.S4(H, N, mode="diag")`; `s4`: `S4(H, N, mode="dplr")` (docs/s4.md),
  each at its constructor defaults (causal, default init and discretization).
- `attention`: `ssm.layers.attention.MultiHeadAttention` (SDPA, causal), head dim 64.
- `transformer`: `ssm.layers.attention.TransformerBlock(pos="rope")` (pre-norm, GELU MLP), head dim 64.
- `mamba`, `mamba2` (`ssm.Mamba(H, N)`, `ssm.Mamba2(H, N, headdim=64)`) and their CPU peers
  `mamba-hf`, `mamba-hf-pscan`, `mamba-mambapy`, `mamba2-hf`: `experiments.bench.selective`
  (shapes, the peers' correctness check against ssmkit, and the selective layers' floor).
SDPA: the attention rows call `F.scaled_dot_product_attention` without a mask (`is_causal`), so
PyTorch picks its fastest kernel for the device and dtype (on the CPU the fused flash kernel; on
CUDA flash under bf16, memory-efficient in float32); each row records the SDPA kernels its call
ran (`sdpa`, from the profiler, one extra untimed call).
Memory: on CUDA `max_memory_allocated` above the allocation before the call; on CPU the runner
measures peak RSS growth in a fresh process per case (`experiments.bench.child`), over one call of
the layer alone made after the timed calls.

Floor (s4d / s4): the layer's irreducible work at the same shapes, timed in the same loop as the
layer (alternating, `timing.time_interleaved`): the output Linear (c*H -> 2H on (B, L, c*H))
forward + backward (input, weight and bias gradients), and the FFTs the convolution needs at the
layer's FFT length n = `ssm.fftconv.fft_length(L)`: forward rfft of the input (B*H rows) and of
the filter (c*H rows), irfft of the product (B*c*H rows); fwd+bwd adds rfft of the output
gradient (B*c*H rows), irfft of the input gradient (B*H rows) and of the filter gradient (c*H
rows). `x_floor` = layer median / floor median. Not in the floor: filter generation (Vandermonde /
Cauchy), activation, GLU, products, copies; the floor's calls allocate their outputs like the layer's.

Activations (s4d / s4): the tensors the layer must keep between forward and backward, besides its
input x (held by the caller and enough for the convolution's backward): the filter K (c' x H x L
float32, c' = c, x2 if bidirectional; its spectrum may stand in for it), the SSM output y that the
activation's backward needs (B x c*H x L float32) and the Linear output that GLU's backward needs
(B x L x 2H, the Linear's dtype). `x_act` = peak memory / these bytes. Fwd rows use the same bytes.
"""
from __future__ import annotations

import importlib.util

import torch

from experiments.bench import selective

LAYERS = ("s4d", "s4", "attention", "transformer") + selective.LAYERS
HEAD_DIM = 64
_MODULE = {"s4d": "ssm.layers.s4", "s4": "ssm.layers.s4", "attention": "ssm.layers.attention",
           "transformer": "ssm.layers.attention", "mamba": "ssm.layers.mamba", "mamba2": "ssm.layers.mamba2"}
_PEER_MODULES = {"mamba-hf": ("transformers.models.mamba.modeling_mamba",),
                 "mamba-hf-pscan": ("transformers.models.mamba.modeling_mamba", "mambapy.pscan"),
                 "mamba-mambapy": ("mambapy.mamba",), "mamba2-hf": ("transformers.models.mamba2.modeling_mamba2",)}


def preload(layer: str) -> None:
    """Import what the case needs (so a fresh process's RSS baseline includes the imports)."""
    importlib.import_module(_MODULE.get(layer, _MODULE[selective.layer_kind(layer)]))
    for name in _PEER_MODULES.get(layer, ()):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            importlib.import_module(name)


def build(layer: str, H: int, N: int | None, *, device: str) -> torch.nn.Module:
    """The layer at width H; N (state size) is used by s4d/s4 only (None for attention layers)."""
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    preload(layer)
    if layer in selective.LAYERS:
        m, why = selective.build_layer(layer, H, N, device=device)
        if m is None:
            raise LookupError(why)
        return m
    n_heads = max(1, H // HEAD_DIM)
    if layer in ("s4d", "s4"):
        from ssm.layers.s4 import S4
        return S4(H, N, mode="diag" if layer == "s4d" else "dplr", device=device)
    from ssm.layers.attention import MultiHeadAttention, TransformerBlock
    if layer == "attention":
        return MultiHeadAttention(H, n_heads=n_heads, device=device)
    return TransformerBlock(H, n_heads=n_heads, pos="rope", device=device)


def activation_bytes(layer: str, B: int, H: int, L: int, *, channels: int = 1, bidirectional: bool = False,
                     out_itemsize: int = 4) -> int | None:
    """Bytes an S4/S4D layer must keep for its backward besides its input (module docstring)."""
    if layer not in ("s4d", "s4"):
        return None
    c_filter = channels * (2 if bidirectional else 1)
    return 4 * c_filter * H * L + 4 * B * channels * H * L + out_itemsize * B * L * 2 * H


def floor_call(layer: str, B: int, H: int, L: int, *, mode: str, device: str, channels: int = 1,
               dtype: torch.dtype = torch.float32):
    """The S4/S4D floor (module docstring) as a callable, or None for other layers."""
    if layer not in ("s4d", "s4"):
        return None
    try:
        from ssm.fftconv import fft_length
    except ImportError:  # a tree from before the FFT length choice: the length it used, 2L
        def fft_length(L):
            return 2 * L
    n, c = fft_length(L), channels
    gen = torch.Generator(device).manual_seed(1)
    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen, device=device, dtype=dt)
    lin = torch.nn.Linear(c * H, 2 * H, device=device, dtype=dtype)
    a = rnd(B, L, c * H, dt=dtype)                                                       # (B, L, cH)
    u, k = rnd(B, H, L), rnd(c, H, L)                                                    # (B, H, L), (c, H, L)
    F = n // 2 + 1
    prod = rnd(B, c, H, F, dt=torch.complex64)                     # spectra to invert: inputs, not timed work
    if mode == "fwd":
        def call():
            with torch.no_grad():
                lin(a)
                torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n), torch.fft.irfft(prod, n=n)
        return call
    a.requires_grad_(True)
    gz, gy = rnd(B, L, 2 * H, dt=dtype), rnd(B, c, H, L)                                 # (B, L, 2H), (B, c, H, L)
    spec_u, spec_k = rnd(B, H, F, dt=torch.complex64), rnd(c, H, F, dt=torch.complex64)
    params = [a, lin.weight, lin.bias]

    def call():
        torch.autograd.grad(lin(a), params, gz)
        torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n), torch.fft.irfft(prod, n=n)     # forward
        torch.fft.rfft(gy, n=n), torch.fft.irfft(spec_u, n=n), torch.fft.irfft(spec_k, n=n)   # backward
    return call


def _forward(m: torch.nn.Module, x: torch.Tensor, amp: str) -> torch.Tensor:
    if amp == "bf16":  # SDPA's flash kernels need 16-bit inputs; the S4 layers keep SSM math in float32
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
            out = m(x)
    else:
        out = m(x)
    return out[0] if isinstance(out, tuple) else out                                    # (B, L, H)


def sdpa_kernels(call) -> list[str]:
    """The scaled-dot-product-attention kernels (aten ops) one `call()` runs, from the profiler."""
    from torch.profiler import profile
    with profile() as prof:
        call()
    return sorted({e.name for e in prof.events() if "scaled_dot_product" in e.name and e.name != "aten::scaled_dot_product_attention"})


def run_layer_case(case: dict, *, before_timing=None) -> dict:
    """Sanity-check, then time, one (layer, B, H, N, L, mode) case. Keys of `case`: layer, B, H,
    N, L, mode, device, repeats, budget_s, amp ("none" | "bf16": autocast around the layer).
    S4/S4D cases also time their floor (interleaved) and report `x_floor` and `activation_bytes`.
    `before_timing` (CPU memory mark) runs after the timed calls, before one more call of the
    layer alone, so the floor's buffers never count in the layer's peak."""
    from experiments.bench.timing import time_case
    layer, B, H, N, L, mode, device = (case[k] for k in ("layer", "B", "H", "N", "L", "mode", "device"))
    amp = case.get("amp", "none")
    res = {"kind": "layer", "amp": amp, **{k: case[k] for k in ("layer", "B", "H", "N", "L", "mode")}}
    try:
        m = build(layer, H, N, device=device)
        why = selective.check_peer(m, layer, H, N, device) if layer in selective.LAYERS else None
        if why:
            return {**res, "status": "FAILED", "reason": why}
    except LookupError as e:
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
        if layer in ("attention", "transformer"):
            res["sdpa"] = sdpa_kernels(call)
    except torch.cuda.OutOfMemoryError:
        return {**res, "status": "OOM", "reason": "CUDA out of memory"}
    except Exception as e:
        return {**res, "status": "FAILED", "reason": f"{type(e).__name__}: {str(e)[:200]}"}
    floor = None
    if layer in ("s4d", "s4"):
        floor = floor_call(layer, B, H, L, mode=mode, device=device, channels=m.channels,
                           dtype=m.out.weight.dtype)
        res["activation_bytes"] = activation_bytes(layer, B, H, L, channels=m.channels,
                                                   bidirectional=m.bidirectional,
                                                   out_itemsize=torch.finfo(m.out.weight.dtype).bits // 8)
    elif layer in selective.LAYERS:
        floor = selective.layer_floor(selective.layer_kind(layer), B, H, N, L, mode=mode, device=device)
    res = time_case(res, call, device=device, case=case, floor=floor)
    if before_timing is not None and res.get("status") == "OK":
        # CPU memory: one call of the layer alone, after the timed (interleaved) calls, with the
        # heap made to follow live memory (buffers cached by the timed calls would hide growth)
        from experiments.bench.timing import exact_heap_accounting
        res["mem_heap"] = "malloc_trim + mmap threshold 64 KiB" if exact_heap_accounting() else "default"
        before_timing()
        call()
    return res
