"""Compile every Triton kernel ahead of time for sm_80 / sm_90 and read ptxas's resource report.

No GPU is needed: `triton.compile` with a `GPUTarget` runs the whole pipeline down to the cubin,
with the ptxas that Triton bundles and the flags Triton itself passes; `TRITON_DUMP_PTXAS_LOG=1`
makes Triton print ptxas's `-v` report (registers, stack frame, spill stores and loads), and
`metadata.shared` is the shared memory a block asks for. Each autotune config is compiled with
each value the launchers give the other constexprs (`CASES`), for float32 data.

    TRITON_INTERPRET=0 python -m tests.kernels.ptxas_check [--arch 90 80] [--first]

prints one JSON line per compiled kernel. Run in a fresh process with the interpreter off: the
test suite turns it on, and Triton reads that switch once, at import.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time

# Shared memory a block may use (opt-in maximum): sm_80 (A100) 163 KB, sm_90 (H100/H200) 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_REPORT = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
                     r".*?Used (\d+) registers", re.S)


def _cases():
    """(autotuned kernel, constexpr values the launchers choose besides the autotune config)."""
    from kernels.cauchy import triton_cauchy as tc
    from kernels.vandermonde import triton_vandermonde as tv
    # The launchers' BLOCK_N: 16 up to 32 in both Vandermonde kernels (`_block_n`).
    vandermonde = [{"BLOCK_N": bn} for bn in (16, 32)]
    # S4 with one output channel and rank 1 sums R = 4 numerators (one block of 4 rows).
    cauchy = [{"R": 4, "BLOCK_R": 4, "SYMMETRIC": s} for s in (True, False)]
    return [(tv._vandermonde_fwd_kernel, vandermonde), (tv._vandermonde_bwd_kernel, vandermonde),
            (tc._cauchy_fwd_kernel, cauchy), (tc._cauchy_bwd_vw_kernel, cauchy), (tc._cauchy_bwd_z_kernel, cauchy)]


def _signature(fn) -> dict:
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    return {a: "constexpr" if a in constexprs else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}


def compile_one(fn, constexprs: dict, num_warps: int, arch: int) -> dict:
    """Compile `fn` for sm_`arch`; ptxas's report and the shared memory as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, _signature(fn), constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    m = _REPORT.search(log.getvalue())
    if m is None:
        raise RuntimeError(f"no ptxas report for {fn.__name__} {constexprs}: {log.getvalue()[-2000:]}")
    stack, spill_stores, spill_loads, regs = map(int, m.groups())
    return {"regs": regs, "stack": stack, "spill_stores": spill_stores, "spill_loads": spill_loads,
            "shared": k.metadata.shared, "shared_limit": SMEM_LIMIT[arch]}


def run(archs: list[int], first_only: bool):
    for tuner, extras in _cases():
        configs = tuner.configs[:1] if first_only else tuner.configs
        for arch, cfg, extra in itertools.product(archs, configs, extras[:1] if first_only else extras):
            t0 = time.perf_counter()
            row = {"kernel": tuner.fn.__name__, "arch": arch, **extra, **cfg.kwargs, "num_warps": cfg.num_warps}
            row.update(compile_one(tuner.fn, {**extra, **cfg.kwargs}, cfg.num_warps, arch))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--first", action="store_true", help="only the first autotune config and launcher case")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("set TRITON_INTERPRET=0: the interpreter has no ahead-of-time compiler")
    # Triton prints ptxas's report only when it really compiles: a fresh cache for this process.
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="ssmkit-ptxas-")
    import inspect

    from triton.compiler import ASTSource
    if "constexprs" not in inspect.signature(ASTSource).parameters:
        print("this Triton version has a different ahead-of-time compile API", file=sys.stderr)
        return 3
    run(args.arch, args.first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
