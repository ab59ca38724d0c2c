"""`torch.library` registration of the Vandermonde product and its autograd, so `torch.compile` can trace it.

Two custom ops on canonical shapes, v and x (R, N), with the backend already resolved by
`vandermonde_mult` ("triton" or "torch"):
- `ssmkit::vandermonde(v, x, L, backend) -> (R, L)` real
- `ssmkit::vandermonde_backward(grad, v, x, backend) -> (grad_v, grad_x)`, each (R, N) complex.
Both have fake (meta) implementations; the forward's autograd formula calls the backward op, so
compiled graphs keep both opaque. Triton is imported only when a Triton backend runs.
"""
from __future__ import annotations

import torch

from kernels.vandermonde.reference import vandermonde_chunked_bwd, vandermonde_chunked_fwd


@torch.library.custom_op("ssmkit::vandermonde", mutates_args=())
def vandermonde_op(v: torch.Tensor, x: torch.Tensor, L: int, backend: str) -> torch.Tensor:
    if backend == "triton":
        from kernels.vandermonde.triton_vandermonde import vandermonde_fwd_triton
        return vandermonde_fwd_triton(v, x, L)
    return vandermonde_chunked_fwd(v, x, L)


@vandermonde_op.register_fake
def _vandermonde_fake(v, x, L, backend):
    return v.new_empty((v.shape[0], L), dtype=v.real.dtype)


@torch.library.custom_op("ssmkit::vandermonde_backward", mutates_args=())
def vandermonde_backward_op(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "triton":
        from kernels.vandermonde.triton_vandermonde import vandermonde_bwd_triton
        gv, gx = vandermonde_bwd_triton(grad, v, x)
    else:
        gv, gx = vandermonde_chunked_bwd(grad, v, x)
    return gv.contiguous(), gx.contiguous()                       # (R, N) each, like the fake


@vandermonde_backward_op.register_fake
def _vandermonde_backward_fake(grad, v, x, backend):
    return torch.empty_like(v, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    v, x, _, backend = inputs
    ctx.save_for_backward(v, x)
    ctx.backend = backend


def _backward(ctx, grad):
    v, x = ctx.saved_tensors
    gv, gx = vandermonde_backward_op(grad, v, x, ctx.backend)
    return gv, gx, None, None


vandermonde_op.register_autograd(_backward, setup_context=_setup_context)
