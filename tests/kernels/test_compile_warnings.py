"""`torch.compile` of code that calls the public operators warns about nothing in `kernels/`.

Dynamo traces the dispatch code (`kernels/_triton.py`) on every compile; a construct it only
half supports there (a `functools.lru_cache` wrapper was one) shows up as a warning per compile.
"""
from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import torch

import kernels
from tests.utils import assert_close

KERNELS_DIR = Path(kernels.__file__).resolve().parent
FILE_NAMES = sorted({p.name for p in KERNELS_DIR.rglob("*.py")})
# Dynamo names the user's code as 'file.py:line' in its messages.
MENTION = re.compile(r"\b(" + "|".join(re.escape(n) for n in FILE_NAMES) + r"):\d+")


def _about_the_library(filename: str, message: str) -> bool:
    in_library = Path(filename).resolve().is_relative_to(KERNELS_DIR) if filename else False
    return in_library or bool(MENTION.search(message))


def test_mention_pattern_sees_a_library_file():
    # Guards the test below: the pattern matches the way dynamo named the file it warned about.
    assert _about_the_library("torch/_dynamo/variables/functions.py",
                              "Dynamo detected a call to a `functools.lru_cache`-wrapped function at '_triton.py:36'.")
    assert not _about_the_library("torch/_dynamo/variables/functions.py", "something at 'unrelated_module.py:3'")


def test_compile_warns_about_nothing_in_kernels(caplog):
    v = torch.randn(3, 4, dtype=torch.complex64)
    x = torch.complex(-torch.rand(3, 4), torch.rand(3, 4))
    vc = torch.randn(4, 2, 3, dtype=torch.complex64)
    wc = torch.complex(-torch.rand(2, 3), torch.randn(2, 3))
    zc = torch.complex(torch.zeros(5), torch.randn(5))

    def f(v, x, vc, zc, wc):
        # backend="auto": the dispatch code (why_not, choose_backend) is traced too.
        return kernels.vandermonde_mult(v, x, 16).sum() + kernels.cauchy_mult(vc, zc, wc, symmetric=True).abs().sum()

    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="torch"):
        warnings.simplefilter("always")
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(v, x, vc, zc, wc)
    assert_close(out, f(v, x, vc, zc, wc), name="compiled")
    ours = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught if _about_the_library(w.filename, str(w.message))]
    ours += [f"log {r.name}: {r.getMessage()}" for r in caplog.records
             if _about_the_library(r.pathname, r.getMessage())]
    assert not ours, "warnings about kernels/ under torch.compile:\n" + "\n".join(ours)
