"""`torch.library` registration of the SSD scan and its autograd, so `torch.compile` can trace it.

Two custom ops on the canonical shapes of `ssd_chunked_fwd` (`reference.py`), backend resolved:
- `ssmkit::ssd(x, dt, A, B, C, initial_states?, doc?, chunk_size, backend) -> (y, final_state)`
- `ssmkit::ssd_backward(dy, dfinal, x, dt, A, B, C, initial_states?, doc?, chunk_size, backend)
  -> (dx, ddt, dA, dB, dC, dinitial_states)` (dinitial_states is zeros-shaped when there is none)
dt is the transformed step (the public function applies bias, softplus and clamp, and the D skip
and z gate, with plain torch ops). Both ops have fake implementations; the forward's autograd
formula calls the backward op, so compiled graphs keep both opaque. Only the chunked path
exists: the operator has no Triton kernels yet.
"""
from __future__ import annotations

from typing import Optional

import torch

from kernels.ssd.reference import ssd_chunked_bwd, ssd_chunked_fwd


def _only_torch(backend: str) -> None:
    # The schema carries the backend so Triton kernels can be added without changing it; this
    # operator has none yet, and `ssd` never resolves to "triton".
    if backend != "torch":
        raise ValueError(f"ssmkit::ssd: backend must be 'torch' (no Triton kernels), got {backend!r}")


@torch.library.custom_op("ssmkit::ssd", mutates_args=())
def ssd_op(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
           initial_states: Optional[torch.Tensor], doc: Optional[torch.Tensor], chunk_size: int,
           backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    _only_torch(backend)
    y, final = ssd_chunked_fwd(x, dt, A, B, C, initial_states, doc, chunk_size)
    return y.contiguous(), final.contiguous()


@ssd_op.register_fake
def _ssd_fake(x, dt, A, B, C, initial_states, doc, chunk_size, backend):
    b, _, H, P = x.shape
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(b, H, P, B.shape[-1])


@torch.library.custom_op("ssmkit::ssd_backward", mutates_args=())
def ssd_backward_op(dy: torch.Tensor, dfinal: torch.Tensor, x: torch.Tensor, dt: torch.Tensor,
                    A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, initial_states: Optional[torch.Tensor],
                    doc: Optional[torch.Tensor], chunk_size: int,
                    backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor]:
    _only_torch(backend)
    grads = ssd_chunked_bwd(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size)
    return tuple(t.contiguous() for t in grads)


@ssd_backward_op.register_fake
def _ssd_backward_fake(dy, dfinal, x, dt, A, B, C, initial_states, doc, chunk_size, backend):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    return like(x), like(dt), like(A), like(B), like(C), like(dfinal)


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, initial_states, doc, chunk_size, backend = inputs
    ctx.save_for_backward(x, dt, A, B, C, initial_states, doc)
    ctx.chunk_size, ctx.backend = chunk_size, backend


def _backward(ctx, dy, dfinal):
    x, dt, A, B, C, initial_states, doc = ctx.saved_tensors
    dx, ddt, dA, dB, dC, dinit = ssd_backward_op(dy, dfinal, x, dt, A, B, C, initial_states, doc,
                                                 ctx.chunk_size, ctx.backend)
    return dx, ddt, dA, dB, dC, (dinit if initial_states is not None else None), None, None, None


ssd_op.register_autograd(_backward, setup_context=_setup_context)
