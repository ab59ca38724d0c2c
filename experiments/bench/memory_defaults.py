"""Peak memory of the S4 / S4D layers as a user sees it: one fresh process per case, glibc's default
malloc settings (no mmap-threshold change, no `malloc_trim`), peak RSS minus RSS just before the call.

    python -m experiments.bench.memory_defaults --layers s4d s4 --threads 1 2 --json out.json

Each case runs `python -m experiments.bench.memory_defaults --child '<case json>'` with the MALLOC_*
environment variables removed. The child imports torch and ssm, builds `S4(H, N, mode=...)` (S4:
`l_max = L`), makes the input and upstream gradient, runs `--warmup-L` once (default 64: lazy imports,
thread pools, FFT plans; 0 turns it off), and then makes `--calls` calls at the case's shape.
Before each call it resets the kernel's peak-RSS mark (/proc/self/clear_refs) and reads VmRSS; after
it, VmHWM. `mem_mb` lists peak minus start per call (MB = 1e6 bytes): the first is what one call
costs a fresh process, later ones show what the allocator kept from the first. `time_s` is the wall
time of each call, `cpu_s` the process CPU time. Mode `fwdbwd` takes gradients of the input and all
parameters; `fwd` runs under `no_grad`. Prints one line per case and, with --json, writes all results.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def child(case: dict) -> dict:
    """One case in this (fresh) process; see the module docstring."""
    import torch

    torch.set_num_threads(case["threads"])
    from experiments.bench.timing import (  # no malloc changes
        reset_peak_rss,
        rss_now_bytes,
        rss_peak_bytes,
    )
    from ssm.layers.s4 import S4

    B, H, N, L = case["B"], case["H"], case["N"], case["L"]
    torch.manual_seed(0)
    layer = S4(H, N, mode="diag" if case["layer"] == "s4d" else "dplr")
    if case["layer"] == "s4":
        layer.l_max = L
    params = list(layer.parameters())

    def make(length):
        x = torch.randn(B, length, H, requires_grad=case["mode"] == "fwdbwd")       # (B, L, H)
        return x, torch.randn(B, length, H)                                         # upstream gradient

    def call(x, g):
        if case["mode"] == "fwd":
            with torch.no_grad():
                layer(x)
        else:
            torch.autograd.grad(layer(x)[0], [x] + params, g)

    if case["warmup_L"]:
        call(*make(min(L, case["warmup_L"])))
    x, g = make(L)
    res = {**case, "mem_mb": [], "time_s": [], "cpu_s": [], "exact_peak": True}
    for _ in range(case["calls"]):
        res["exact_peak"] &= reset_peak_rss()
        base = rss_now_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        call(x, g)
        res["time_s"].append(round(time.perf_counter() - t0, 4))
        res["cpu_s"].append(round(time.process_time() - c0, 4))
        res["mem_mb"].append(round((rss_peak_bytes() - base) / 1e6, 1))
    res["rss_after_mb"] = round(rss_now_bytes() / 1e6, 1)
    return res


def run_case(case: dict, timeout_s: float) -> dict:
    """`case` in a fresh process with glibc's default malloc settings."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["OMP_NUM_THREADS"] = str(case["threads"])
    cmd = [sys.executable, "-m", "experiments.bench.memory_defaults", "--child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
        return {**case, "status": "TIMEOUT"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return {**json.loads(line), "status": "OK"}
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {**case, "status": "FAILED", "reason": tail[:300]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.bench.memory_defaults",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", nargs="+", default=["s4d", "s4"], choices=["s4d", "s4"])
    p.add_argument("--B", type=int, nargs="+", default=[1], help="batch sizes")
    p.add_argument("--H", type=int, default=256)
    p.add_argument("--N", type=int, default=64, help="state size (d_state)")
    p.add_argument("--L", type=int, nargs="+", default=[16384], help="sequence lengths")
    p.add_argument("--threads", type=int, nargs="+", default=[1], help="torch threads per case")
    p.add_argument("--modes", nargs="+", default=["fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--calls", type=int, default=2, help="measured calls per process")
    p.add_argument("--warmup-L", type=int, default=64, help="length of the warm-up call (0: none)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per case")
    p.add_argument("--timeout-s", type=float, default=900.0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    results = []
    for layer in args.layers:
        for B in args.B:
            for L in args.L:
                for th in args.threads:
                    for mode in args.modes:
                        for rep in range(args.repeats):
                            case = {"layer": layer, "B": B, "H": args.H, "N": args.N, "L": L, "threads": th,
                                    "mode": mode, "calls": args.calls, "warmup_L": args.warmup_L}
                            r = run_case(case, args.timeout_s)
                            results.append(r)
                            mem = r.get("mem_mb", r.get("reason", r["status"]))
                            print(f"{layer:4s} {mode:6s} B={B} H={args.H} N={args.N} L={L} threads={th} "
                                  f"rep={rep}: peak-RSS growth MB per call {mem}, time s {r.get('time_s')}",
                                  flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["status"] == "OK" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
