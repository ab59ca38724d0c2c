"""`torch.library` registration of the SSD scan and its autograd, so `torch.compile` can trace it.

Two custom ops on the canonical shapes of `ssd_chunked_fwd` (`chunked.py`), backend resolved:
- `ssmkit::ssd(x, dt, A, B, C, initial_states?, doc?, chunk_size, backend) -> (y, final_state, saved)`
- `ssmkit::ssd_backward(dy, dfinal, saved, x, dt, A, B, C, initial_states?, doc?, chunk_size, backend)
  -> (dx, ddt, dA, dB, dC, dinitial_states)` (dinitial_states is zeros-shaped when there is none)
dt is the transformed step (the public function applies bias, softplus and clamp, and the D skip
and z gate, with plain torch ops). `saved` is what the backward keeps from the forward: for
backend "triton" one state per chunk_size tokens (b, K, H, P, N) (`triton_ssd.py`); for the
chunked path the state entering each block of chunks (n_blocks, b, H, P, N)
(`chunked.saved_blocks`). Both ops have fake implementations; the forward's autograd formula
calls the backward op, so compiled graphs keep both opaque.
Triton is imported only when the Triton backend runs.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.ssd.chunked import saved_blocks, ssd_chunked_bwd, ssd_chunked_fwd


@torch.library.custom_op("ssmkit::ssd", mutates_args=())
def ssd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           initial_states: Optional[torch.Tensor], doc: Optional[torch.Tensor], chunk_size: int,
           backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from kernels.ssd.triton_ssd import ssd_fwd_triton
        y, final, saved = ssd_fwd_triton(x, dt, A, B, C, initial_states, doc, chunk_size)
    else:
        y, final, saved = ssd_chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size)
    return y.to(x.dtype).contiguous(), final.to(x.dtype).contiguous(), saved.contiguous()


def _saved_shape(x, B, chunk_size, backend):
    b, L, H, P = x.shape
    N = B.shape[-1]
    if backend != "triton":
        return (saved_blocks(b, L, H, P, N, chunk_size), b, H, P, N)
    from kernels.ssd.triton_ssd import saved_chunks
    return (b, saved_chunks(L, chunk_size), H, P, N)


@ssd_op.register_fake
def _ssd_fake(x, dt, A, B, C, initial_states, doc, chunk_size, backend):
    b, _, H, P = x.shape
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(b, H, P, B.shape[-1]),
            x.new_empty(_saved_shape(x, B, chunk_size, backend)))


@torch.library.custom_op("ssmkit::ssd_backward", mutates_args=())
def ssd_backward_op(dy: torch.Tensor, dfinal: torch.Tensor, saved: torch.Tensor, x: torch.Tensor,
                    dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    initial_states: Optional[torch.Tensor], doc: Optional[torch.Tensor], chunk_size: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from kernels.ssd.triton_ssd import ssd_bwd_triton
        grads = ssd_bwd_triton(dy, dfinal, saved, x, dt, A, B, C, initial_states, doc, chunk_size)
    else:
        grads = ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size, saved)
    return tuple(g.to(t.dtype).contiguous() for g, t in zip(grads, (x, dt, A, B, C, dfinal)))


@ssd_backward_op.register_fake
def _ssd_backward_fake(dy, dfinal, saved, x, dt, A, B, C, initial_states, doc, chunk_size, backend):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(x), like(dt), like(A), like(B), like(C), like(dfinal)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, initial_states, doc, chunk_size, backend = inputs
    ctx.save_for_backward(x, dt, A, B, C, initial_states, doc, output[2])
    ctx.chunk_size, ctx.backend = chunk_size, backend


def _backward(ctx, dy, dfinal, _dsaved):
    x, dt, A, B, C, initial_states, doc, saved = ctx.saved_tensors
    b, _, H, P = x.shape
    dy = torch.zeros_like(x) if dy is None else dy
    dfinal = x.new_zeros(b, H, P, B.shape[-1]) if dfinal is None else dfinal
    dx, ddt, dA, dB, dC, dinit = ssd_backward_op(dy, dfinal, saved, x, dt, A, B, C, initial_states, doc,
                                                 ctx.chunk_size, ctx.backend)
    return dx, ddt, dA, dB, dC, (dinit if initial_states is not None else None), None, None, None


ssd_op.register_autograd(_backward, setup_context=_setup_context)
