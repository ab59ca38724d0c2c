"""One benchmark case in a fresh process: `python -m experiments.bench.child '<case json>'`.

Prints one JSON line: the case's result plus `mem_bytes`, the peak RSS during the timed calls
minus the RSS just before them. Before that point come the imports, one warm-up run of the same
case at L <= WARM_L and the case's own correctness check (its ground truth is not counted). The
kernel's peak mark is reset there (/proc/self/clear_refs); where that is not allowed, the growth
of ru_maxrss is used instead (it under-reports cases smaller than an earlier peak). The warm-up
keeps one-time costs out of the number: lazy imports inside the first call (Triton alone adds
~150 MB), thread pools, FFT plans. On CUDA the in-process CUDA peak is kept.
The runner uses it for CPU memory: the peak RSS of a fresh process per case.
"""
from __future__ import annotations

import json
import sys

WARM_L = 64


def main(argv: list[str]) -> int:
    case = json.loads(argv[0])
    import torch  # noqa: F401  (part of the baseline)
    from experiments.bench.timing import max_rss_bytes, reset_peak_rss, rss_now_bytes, rss_peak_bytes
    if case["kind"] == "layer":
        from experiments.bench.layers import preload, run_layer_case as run
        preload(case["layer"])
    else:
        import kernels  # noqa: F401
        from experiments.bench.ops import run_op_case as run
    run({**case, "L": min(case["L"], WARM_L), "repeats": 1, "budget_s": 0.0})
    mark = {}

    def start_measuring():
        mark["exact"] = reset_peak_rss()
        mark["base"] = rss_now_bytes() if mark["exact"] else max_rss_bytes()

    res = run(case, before_timing=start_measuring)
    exact, base = mark.get("exact", False), mark.get("base", 0)
    if case["device"] == "cpu" and res.get("status") == "OK":
        res["rss_base_bytes"] = base
        res["warm_L"] = min(case["L"], WARM_L)
        res["mem_method"] = "VmHWM - VmRSS after reset" if exact else "ru_maxrss growth"
        res["mem_bytes"] = (rss_peak_bytes() if exact else max_rss_bytes()) - base
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
