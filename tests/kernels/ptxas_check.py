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


# Every module of Triton kernels; one that does not exist (yet) is skipped. Each defines
# `ptxas_cases()` -> [(kernel, [launcher constexprs, ...], {argument: ptx type, ...}), ...]: the
# (autotuned or plain `@triton.jit`) kernel, each value its launchers give the constexprs outside
# the autotune config, and the types of the arguments that are not float32 pointers or i32
# (e.g. {"seq_ptr": "*i32", "scale": "fp32"}).
KERNEL_MODULES = ("kernels.vandermonde.triton_vandermonde", "kernels.cauchy.triton_cauchy",
                  "kernels.selective_scan.triton_selective_scan", "kernels.ssd.triton_ssd",
                  "kernels.mamba3.triton_mamba3")


def _cases(modules=KERNEL_MODULES):
    """(kernel, launcher constexprs, argument types) of every module in `modules`."""
    import importlib
    import importlib.util
    out = []
    for name in modules:
        if importlib.util.find_spec(name) is None:
            continue
        for case in importlib.import_module(name).ptxas_cases():
            kernel, extras, types = (*case, {})[:3]
            out.append((kernel, extras, types))
    return out


def _configs(kernel):
    """(jit function, [(constexprs, num_warps), ...]) of an autotuned or a plain kernel."""
    if hasattr(kernel, "configs"):
        return kernel.fn, [(c.kwargs, c.num_warps) for c in kernel.configs]
    return kernel, [({}, 4)]


def _signature(fn, types: dict | None = None) -> dict:
    """Argument types: constexprs, float32 pointers (`*_ptr`) and i32 unless `types` says otherwise."""
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    sig = {a: "constexpr" if a in constexprs else "*fp32" if a.endswith("_ptr") else "i32" for a in fn.arg_names}
    unknown = set(types or {}) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{fn.__name__}: ptxas_cases names arguments it does not have: {sorted(unknown)}")
    return {**sig, **(types or {})}


def compile_one(fn, constexprs: dict, num_warps: int, arch: int, types: dict | None = None) -> dict:
    """Compile `fn` for sm_`arch`; ptxas's report and the shared memory as a dict."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        k = triton.compile(ASTSource(fn, _signature(fn, types), constexprs=constexprs),
                           target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    m = _REPORT.search(log.getvalue())
    if m is None:
        raise RuntimeError(f"no ptxas report for {fn.__name__} {constexprs}: {log.getvalue()[-2000:]}")
    stack, spill_stores, spill_loads, regs = map(int, m.groups())
    return {"regs": regs, "stack": stack, "spill_stores": spill_stores, "spill_loads": spill_loads,
            "shared": k.metadata.shared, "shared_limit": SMEM_LIMIT[arch]}


def plan(archs: list[int], first_only: bool, modules=KERNEL_MODULES) -> list[tuple]:
    """Every compile to run: (jit function, constexprs, num_warps, arch, argument types, row)."""
    out = []
    for kernel, extras, types in _cases(modules):
        fn, configs = _configs(kernel)
        configs = configs[:1] if first_only else configs
        for arch, (cfg, warps), extra in itertools.product(archs, configs, extras[:1] if first_only else extras):
            row = {"kernel": fn.__name__, "arch": arch, **extra, **cfg, "num_warps": warps}
            out.append((fn, {**extra, **cfg}, warps, arch, types, row))
    return out


def run(archs: list[int], first_only: bool, modules=KERNEL_MODULES):
    todo = plan(archs, first_only, modules)
    # The first line says what is planned, so a caller can tell a dropped compile from a missing one.
    print(json.dumps({"planned": len(todo), "kernels": sorted({r[-1]["kernel"] for r in todo})}), flush=True)
    for fn, constexprs, warps, arch, types, row in todo:
        t0 = time.perf_counter()
        row = {**row, **compile_one(fn, constexprs, warps, arch, types)}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(row), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--first", action="store_true", help="only the first autotune config and launcher case")
    parser.add_argument("--modules", nargs="+", choices=KERNEL_MODULES, default=list(KERNEL_MODULES),
                        help="only these kernel modules (default: all)")
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
    run(args.arch, args.first, tuple(args.modules))
    return 0


if __name__ == "__main__":
    sys.exit(main())
