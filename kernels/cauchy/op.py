"""`torch.library` registration of the Cauchy product and its autograd, so `torch.compile` can trace it.

Two custom ops on canonical shapes, v (R, H, N), z (M,), w (H, N), with the backend already
resolved by `cauchy_mult` ("triton" or "torch"):
- `ssmkit::cauchy(v, z, w, symmetric, backend) -> (R, H, M)`
- `ssmkit::cauchy_backward(grad, v, z, w, symmetric, backend, need_v, need_z, need_w)
   -> (grad_v, grad_z, grad_w)`; a gradient that was not asked for comes back empty (shape (0,)).
Both have fake (meta) implementations; the forward's autograd formula calls the backward op, so
compiled graphs keep both opaque. Triton is imported only when a Triton backend runs.
"""
from __future__ import annotations

import torch

from kernels.cauchy.reference import cauchy_chunked_bwd, cauchy_chunked_fwd


@torch.library.custom_op("ssmkit::cauchy", mutates_args=())
def cauchy_op(v: torch.Tensor, z: torch.Tensor, w: torch.Tensor, symmetric: bool, backend: str) -> torch.Tensor:
    if backend == "triton":
        from kernels.cauchy.triton_cauchy import cauchy_fwd_triton
        return cauchy_fwd_triton(v, z, w, symmetric)
    return cauchy_chunked_fwd(v, z, w, symmetric)


@cauchy_op.register_fake
def _cauchy_fake(v, z, w, symmetric, backend):
    return v.new_empty(v.shape[0], v.shape[1], z.shape[0])


@torch.library.custom_op("ssmkit::cauchy_backward", mutates_args=())
def cauchy_backward_op(grad: torch.Tensor, v: torch.Tensor, z: torch.Tensor, w: torch.Tensor,
                       symmetric: bool, backend: str, need_v: bool, need_z: bool, need_w: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad = grad.resolve_conj().contiguous()
    if backend == "triton":
        from kernels.cauchy.triton_cauchy import cauchy_bwd_triton
        gv, gz, gw = cauchy_bwd_triton(grad, v, z, w, symmetric, need_v or need_w, need_z)
    else:
        gv, gz, gw = cauchy_chunked_bwd(grad, v, z, w, symmetric, need_z)
    return (gv if need_v else v.new_empty(0)), (gz if need_z else z.new_empty(0)), (gw if need_w else w.new_empty(0))


@cauchy_backward_op.register_fake
def _cauchy_backward_fake(grad, v, z, w, symmetric, backend, need_v, need_z, need_w):
    return (v.new_empty(v.shape if need_v else (0,)), z.new_empty(z.shape if need_z else (0,)),
            w.new_empty(w.shape if need_w else (0,)))


def _setup_context(ctx, inputs, output):
    v, z, w, symmetric, backend = inputs
    ctx.save_for_backward(v, z, w)
    ctx.symmetric, ctx.backend = symmetric, backend


def _backward(ctx, grad):
    v, z, w = ctx.saved_tensors
    need_v, need_z, need_w = ctx.needs_input_grad[:3]
    gv, gz, gw = cauchy_backward_op(grad, v, z, w, ctx.symmetric, ctx.backend, need_v, need_z, need_w)
    return (gv if need_v else None), (gz if need_z else None), (gw if need_w else None), None, None


cauchy_op.register_autograd(_backward, setup_context=_setup_context)
