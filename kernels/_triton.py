"""What every operator shares about Triton: whether it can run, and the launchers' helpers.

Dispatch (see `kernels/README.md`): Triton runs on CUDA tensors, or on CPU tensors when the
interpreter is on (`TRITON_INTERPRET=1`, set before Triton is first imported).
`SSMKIT_DISABLE_TRITON=1` forces the chunked PyTorch path everywhere. Nothing here imports Triton
at module import time: `autotune_configs` imports it when a Triton module asks for its configs.

`POISON_OUTPUTS` is the one test hook of the launchers: when True, `empty_output` fills the
buffers a kernel is to overwrite with NaN, so an element a kernel forgets to write shows up.
"""
from __future__ import annotations

import importlib.util
import os

import torch

DISABLE_ENV = "SSMKIT_DISABLE_TRITON"
BACKENDS = ("auto", "triton", "torch")
# Looked up once at import: a cached function here would be traced by torch.compile on every
# compile (dynamo warns about `functools.lru_cache` wrappers), a module constant is not.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
POISON_OUTPUTS = False


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


def why_not(*tensors: torch.Tensor) -> str | None:
    """Why Triton cannot run on these tensors, or None when it can."""
    if disabled_by_env():
        return f"{DISABLE_ENV} is set"
    if not TRITON_INSTALLED:
        return "triton is not installed"
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        return f"tensors are on different devices: {sorted(devices)}"
    device = devices.pop() if devices else "cpu"
    if device == "cuda":
        return None
    if device == "cpu":
        return None if interpreter_on() else "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before import)"
    return f"unsupported device {device!r}"


def choose_backend(backend: str, *tensors: torch.Tensor, auto_interprets: bool = True) -> str:
    """Resolve `backend` ("auto" | "triton" | "torch") to "triton" or "torch".

    `auto_interprets=False`: "auto" takes the chunked path for CPU tensors even when the
    interpreter is on (only an explicit "triton" runs it). The selective operators' kernels walk
    the sequence token by token, which the interpreter runs at tens of milliseconds per token and
    program: every model test would crawl, while their own tests ask for "triton" by name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = why_not(*tensors)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    if reason is None and not auto_interprets and all(t.device.type == "cpu" for t in tensors):
        return "torch"
    return "torch" if reason is not None else "triton"


def autotune_configs(interpreted: dict, gpu: list[tuple[dict, int]]) -> list:
    """`triton.Config`s for `@triton.autotune`: under the interpreter only `interpreted` (it cannot
    benchmark, and runs programs one by one, so its cost grows with the number of programs and
    loop iterations, not with block widths); on a GPU each (block sizes, num_warps) of `gpu`."""
    import triton
    if interpreter_on():
        return [triton.Config(interpreted, num_warps=4)]
    return [triton.Config(blocks, num_warps=warps) for blocks, warps in gpu]


def planes(x: torch.Tensor) -> torch.Tensor:
    """A complex tensor as the contiguous real planes (..., 2) a kernel reads (conj resolved)."""
    return torch.view_as_real(x.resolve_conj().contiguous())


def empty_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer a kernel overwrites completely; NaN-filled while `POISON_OUTPUTS` is on."""
    if POISON_OUTPUTS:
        nan = float("nan")
        return torch.full(shape, complex(nan, nan) if dtype.is_complex else nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
