"""The one place that knows whether Triton can run (CONVENTIONS: Dispatch).

Triton runs on CUDA tensors, or on CPU tensors when the interpreter is on (`TRITON_INTERPRET=1`,
set before Triton is first imported). `SSMKIT_DISABLE_TRITON=1` forces the PyTorch reference
path everywhere. Nothing here imports Triton at module import time.
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

DISABLE_ENV = "SSMKIT_DISABLE_TRITON"
BACKENDS = ("auto", "triton", "torch")


def interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def why_not(*tensors: torch.Tensor) -> str | None:
    """Why Triton cannot run on these tensors, or None when it can."""
    if disabled_by_env():
        return f"{DISABLE_ENV} is set"
    if not triton_installed():
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


def choose_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Resolve `backend` ("auto" | "triton" | "torch") to "triton" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    reason = why_not(*tensors)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run: {reason}")
        return "triton"
    return "torch" if reason is not None else "triton"
