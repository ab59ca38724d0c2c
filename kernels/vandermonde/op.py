"""`torch.library` registration of the Vandermonde product (SPEC section 4) for `torch.compile`.

`torch.ops.ssmkit.vandermonde(v, x, L, backend)` and its backward
`torch.ops.ssmkit.vandermonde_backward(grad, v, x, backend)` are opaque custom ops with fake
(meta) implementations, so `torch.compile(fullgraph=True)` traces a model that uses them without
looking inside the Triton launchers. `backend` is already resolved ("triton" or "torch"); the
public dispatcher `kernels.vandermonde` validates inputs and resolves it. Triton is imported only
when the "triton" backend runs.
"""
from __future__ import annotations

import torch

from kernels.vandermonde.reference import chunked_backward, chunked_forward


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])                              # (R, N) or (R, L)


@torch.library.custom_op("ssmkit::vandermonde", mutates_args=())
def vandermonde_op(v: torch.Tensor, x: torch.Tensor, L: int, backend: str) -> torch.Tensor:
    """out[..., l] = 2 Re sum_n v[..., n] exp(x[..., n] l): complex (..., N) -> real (..., L)."""
    if backend == "triton":
        from kernels.vandermonde.triton_vandermonde import vandermonde_fwd_triton
        out = vandermonde_fwd_triton(_rows(v), _rows(x), L)       # (R, L)
    else:
        out = chunked_forward(_rows(v), _rows(x), L)              # (R, L)
    return out.reshape(*v.shape[:-1], L).contiguous()             # (..., L)


@vandermonde_op.register_fake
def _(v, x, L, backend):
    return v.new_empty((*v.shape[:-1], L), dtype=v.real.dtype)


@torch.library.custom_op("ssmkit::vandermonde_backward", mutates_args=())
def vandermonde_backward_op(grad: torch.Tensor, v: torch.Tensor, x: torch.Tensor,
                            backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_v, grad_x) of sum(grad * vandermonde(v, x, L)), complex (..., N) each."""
    if backend == "triton":
        from kernels.vandermonde.triton_vandermonde import vandermonde_bwd_triton
        gv, gx = vandermonde_bwd_triton(_rows(grad), _rows(v), _rows(x))  # (R, N) each
    else:
        gv, gx = chunked_backward(_rows(grad), _rows(v), _rows(x))        # (R, N) each
    return gv.reshape(v.shape).contiguous(), gx.reshape(x.shape).contiguous()


@vandermonde_backward_op.register_fake
def _(grad, v, x, backend):
    return torch.empty_like(v, memory_format=torch.contiguous_format), \
        torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    v, x, _, backend = inputs
    ctx.save_for_backward(v, x)
    ctx.backend = backend


def _backward(ctx, grad):
    v, x = ctx.saved_tensors
    gv, gx = torch.ops.ssmkit.vandermonde_backward(grad, v, x, ctx.backend)
    return gv, gx, None, None


vandermonde_op.register_autograd(_backward, setup_context=_setup_context)
