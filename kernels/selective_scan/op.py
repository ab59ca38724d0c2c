"""`torch.library` registration of the selective scan and its autograd, so `torch.compile` can trace it.

Two custom ops on canonical shapes (u, delta, z (b, D, L); A (D, N); B, C (D, N) or (b, G, N, L);
D, delta_bias (D,); initial_state (b, D, N); reset (b, L) bool or None, True before the tokens where
the state restarts from zero (packed documents); the public function fills absent D, delta_bias and
initial_state with zeros, and passes z as None when absent), the backend already resolved:
- `ssmkit::selective_scan(...) -> (y (b, D, L), last_state (b, D, N), saved (b, K, D, N))`, where
  `saved` holds the states before every CHUNK-th token (K = ceil(L / CHUNK)) for the backward;
- `ssmkit::selective_scan_backward(gy, g_last, saved, inputs...)` -> one gradient per input
  (z's is empty when z is None).
Both have fake implementations; the forward's autograd formula calls the backward op, so compiled
graphs keep both opaque. Triton is imported only when the Triton backend runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.selective_scan import reference
from kernels.selective_scan.reference import compute_dtype, selective_scan_chunked_bwd, selective_scan_chunked_fwd


@torch.library.custom_op("ssmkit::selective_scan", mutates_args=())
def selective_scan_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor, z: Optional[torch.Tensor], delta_bias: torch.Tensor,
                      initial_state: torch.Tensor, delta_softplus: bool, backend: str,
                      reset: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from kernels.selective_scan.triton_selective_scan import selective_scan_fwd_triton
        y, last, saved = selective_scan_fwd_triton(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                                   reset)
    else:
        y, last, saved = selective_scan_chunked_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                                    reset)
    # The last state is a view into the last chunk; a copy gives it its own storage like the fake.
    return y.to(u.dtype).contiguous(), last.clone(memory_format=torch.contiguous_format), saved.contiguous()


@selective_scan_op.register_fake
def _selective_scan_fake(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, backend, reset=None):
    f = compute_dtype(u, delta, A, B, C)
    batch, dim, L = u.shape
    K = -(-L // reference.CHUNK)
    return (u.new_empty(u.shape), u.new_empty((batch, dim, A.shape[1]), dtype=f),
            u.new_empty((batch, K, dim, A.shape[1]), dtype=f))


@torch.library.custom_op("ssmkit::selective_scan_backward", mutates_args=())
def selective_scan_backward_op(gy: torch.Tensor, g_last: torch.Tensor, saved: torch.Tensor, u: torch.Tensor,
                               delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                               D: torch.Tensor, z: Optional[torch.Tensor], delta_bias: torch.Tensor,
                               initial_state: torch.Tensor, delta_softplus: bool, backend: str,
                               reset: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
    args = (gy, g_last, saved, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reset)
    if backend == "triton":
        from kernels.selective_scan.triton_selective_scan import selective_scan_bwd_triton
        grads = selective_scan_bwd_triton(*args)
    else:
        grads = selective_scan_chunked_bwd(*args)
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [g.to(x.dtype).contiguous() if x is not None else g.new_empty(0) for g, x in zip(grads, inputs)]


@selective_scan_backward_op.register_fake
def _selective_scan_backward_fake(gy, g_last, saved, u, delta, A, B, C, D, z, delta_bias, initial_state,
                                  delta_softplus, backend, reset=None):
    inputs = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return [torch.empty_like(x, memory_format=torch.contiguous_format) if x is not None else u.new_empty(0)
            for x in inputs]


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, backend, reset = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, output[2], reset)
    ctx.delta_softplus, ctx.backend = delta_softplus, backend


def _backward(ctx, gy, g_last, _g_saved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved, reset = ctx.saved_tensors
    gy = torch.zeros_like(u) if gy is None else gy
    g_last = torch.zeros_like(initial_state) if g_last is None else g_last
    grads = selective_scan_backward_op(gy, g_last, saved, u, delta, A, B, C, D, z, delta_bias, initial_state,
                                       ctx.delta_softplus, ctx.backend, reset)
    gz = grads[6] if z is not None else None
    return (*grads[:6], gz, *grads[7:], None, None, None)


selective_scan_op.register_autograd(_backward, setup_context=_setup_context)
