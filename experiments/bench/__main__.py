"""`python -m experiments.bench`: operator and layer benchmarks -> table, JSON, log-log plots.

Every operator provider is checked against complex128 ground truth before it is timed; a failing
check makes the row FAILED and it is never timed. See BENCHMARKS.md for the commands used there.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

OPS = ("vandermonde", "cauchy", "fftconv")
LAYERS = ("s4d", "s4", "attention", "transformer")
PROVIDERS = ("triton", "torch", "plain", "compile", "pykeops")
MODES = ("fwd", "fwdbwd")
K = 1024
PRESETS = {  # (ops: H, N, L; layers: B, H, N, L)
    "cpu": dict(H=[256], N=[64], L=[K, 2 * K, 4 * K, 8 * K, 16 * K],
                layer_B=[1], layer_H=[256], layer_N=[64], layer_L=[K, 2 * K, 4 * K, 8 * K, 16 * K]),
    "cuda": dict(H=[256, 1024], N=[16, 64, 256], L=[K << i for i in range(7)],
                 layer_B=[16], layer_H=[1024], layer_N=[64], layer_L=[K << i for i in range(7)]),
    "smoke": dict(H=[3], N=[8], L=[33, 128], layer_B=[1], layer_H=[16], layer_N=[4], layer_L=[64]),
}


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="Operator benchmarks (vandermonde, cauchy, fftconv) over providers triton / torch "
                    "(the library's chunked reference) / plain (materializing formula) / compile "
                    "(torch.compile of plain) / pykeops, and layer benchmarks (S4D, S4, SDPA attention, "
                    "Transformer+RoPE): time (median, p20-p80) and peak memory vs L. With neither --op nor "
                    "--layer, runs everything. Shape defaults: CPU H=256 N=64 L=1K..16K (layers B=1); "
                    "CUDA H={256,1024} N={16,64,256} L=1K..64K (layers B=16 H=1024).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--op", nargs="*", choices=OPS, help="operators to run (no names: all)")
    p.add_argument("--layer", nargs="*", choices=LAYERS, help="layers to run (no names: all)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes through every provider that can run (Triton interpreter on CPU), < 1 min")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--json", metavar="PATH", help="write header + every raw number (rewritten after each case)")
    p.add_argument("--plot", metavar="PATH", help="write log-log PNG plots (time vs L; memory vs L for layers)")
    p.add_argument("--markdown", metavar="PATH", help="write the results as markdown tables (for BENCHMARKS.md)")
    p.add_argument("--repeats", type=int, default=None, help="max timed repeats per case (default 5 CPU, 20 CUDA)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per case; fewer repeats when calls are slow (default 3 CPU, 1 CUDA)")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwd+bwd")
    p.add_argument("--H", type=int, nargs="+", help="operator widths")
    p.add_argument("--N", type=int, nargs="+", help="operator real state sizes (N/2 complex terms)")
    p.add_argument("--L", type=int, nargs="+", help="operator lengths")
    p.add_argument("--layer-B", type=int, nargs="+", help="layer batch sizes")
    p.add_argument("--layer-H", type=int, nargs="+", help="layer widths")
    p.add_argument("--layer-N", type=int, nargs="+", help="S4/S4D state sizes")
    p.add_argument("--layer-L", type=int, nargs="+", help="layer lengths")
    p.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="layers only: run under bf16 autocast (SDPA flash kernels on CUDA need it)")
    p.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                   help="fresh process per case (CPU peak RSS): auto = layers on CPU only "
                        "(in --smoke only the first layer case, to keep it under a minute)")
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="skip plain/compile cases that would materialize more (default 6 CPU, half the GPU)")
    p.add_argument("--max-call-s", type=float, default=10.0,
                   help="skip a case when the calls at smaller L of the same series predict a call slower "
                        "than this (power law fitted to the last two L, exponent clamped to [1, 2])")
    p.add_argument("--max-layer-call-s", type=float, default=30.0, help="--max-call-s for layer cases")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per isolated case")
    p.add_argument("--peak-flops", type=float, default=None, help="override the device's FP32 FLOP/s peak")
    p.add_argument("--peak-bw", type=float, default=None, help="override the device's memory bytes/s peak")
    args = p.parse_args(argv)
    if args.op is None and args.layer is None:
        args.op, args.layer = [], []
        args.op_all = args.layer_all = True
    else:
        args.op_all, args.layer_all = args.op == [], args.layer == []
    args.op = list(OPS) if args.op_all else (args.op or [])
    args.layer = list(LAYERS) if args.layer_all else (args.layer or [])
    return args


def _predict_too_slow(points: list, L: int, max_call_s: float) -> str | None:
    """Reason to skip length L when the series' last timings extrapolate past `max_call_s`."""
    if not points:
        return None
    (L1, t1), (L2, t2) = (points[-2] if len(points) > 1 else (points[-1][0] / 2, points[-1][1] / 2)), points[-1]
    slope = math.log(max(t2, 1e-12) / max(t1, 1e-12)) / math.log(L2 / L1) if L2 != L1 else 1.0
    predicted = t2 * (L / L2) ** min(2.0, max(1.0, slope))
    if predicted > max_call_s:
        return f"predicted ~{predicted:.0f} s per call from L={L2} (over --max-call-s {max_call_s:g})"
    return None


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import torch  # does not import Triton

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    # Triton reads TRITON_INTERPRET when first imported. The interpreter runs only in a CPU --smoke:
    # elsewhere it would make every CPU layer crawl (or interpret kernels on a GPU).
    interpret = "1" if device == "cpu" and args.smoke else "0"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != interpret:
        print("warning: Triton was imported before the runner set TRITON_INTERPRET", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = interpret

    from experiments.bench import report
    from experiments.bench.layers import run_layer_case
    from experiments.bench.ops import device_peaks, run_op_case
    from experiments.bench.timing import env_header, run_isolated
    preset = PRESETS["smoke" if args.smoke else device]
    shapes = {k: getattr(args, k) or v for k, v in preset.items()}
    repeats = args.repeats or (3 if args.smoke else 5 if device == "cpu" else 20)
    budget = args.budget if args.budget is not None else (0.2 if args.smoke else 3.0 if device == "cpu" else 1.0)
    if args.mem_cap_gib is not None:
        mem_cap = args.mem_cap_gib * 2**30
    elif device == "cuda":
        mem_cap = torch.cuda.get_device_properties(0).total_memory / 2
    else:
        mem_cap = 6 * 2**30
    header = env_header(device)
    header["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    peaks = device_peaks(header["device_name"]) if device == "cuda" else None
    if args.peak_flops or args.peak_bw:
        base = peaks or (None, None)
        peaks = (args.peak_flops or base[0], args.peak_bw or base[1])
        peaks = peaks if None not in peaks else None
    header["peaks"] = peaks
    header["amp"] = args.amp
    header["shapes"] = shapes
    print(report.header_line(header), flush=True)

    cases = []  # layers first: the targets come from them, so an interrupted run still has them
    for op in args.op:
        for prov in args.providers:
            for mode in args.modes:
                for H in shapes["H"]:
                    for N in shapes["N"]:
                        for L in sorted(shapes["L"]):
                            cases.append(dict(kind="op", op=op, provider=prov, H=H, N=N, L=L, mode=mode))
    for layer in args.layer:
        for mode in args.modes:
            for B in shapes["layer_B"]:
                for H in shapes["layer_H"]:
                    for N in shapes["layer_N"] if layer in ("s4d", "s4") else [None]:
                        for L in sorted(shapes["layer_L"]):
                            cases.append(dict(kind="layer", layer=layer, B=B, H=H, N=N, L=L, mode=mode))
    cases.sort(key=lambda c: c["kind"] != "layer")  # stable: keeps the order within each kind
    common = dict(device=device, repeats=repeats, budget_s=budget, allow_interpreter=args.smoke,
                  mem_cap_bytes=mem_cap, peaks=peaks, amp=args.amp,
                  compile_backend="aot_eager" if args.smoke else "inductor")
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(cases), file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        bar = None
    results, too_slow, history = [], {}, {}
    first_layer = next((c for c in cases if c["kind"] == "layer"), None)
    for case in cases:
        case.update(common)
        name = case["op"] if case["kind"] == "op" else case["layer"]
        series = (case["kind"], name, case.get("provider"), case["mode"], case["H"], case["N"], case.get("B"))
        isolate = args.isolate == "always" or (args.isolate == "auto" and device == "cpu" and case["kind"] == "layer"
                                               and (not args.smoke or case is first_layer))
        why = _predict_too_slow(history.get(series, []), case["L"],
                                args.max_call_s if case["kind"] == "op" else args.max_layer_call_s)
        if series in too_slow or why:
            base = {k: case[k] for k in ("kind", "mode", "H", "N", "L") if k in case}
            extra = {k: case[k] for k in ("op", "provider", "layer", "B") if k in case}
            res = {**base, **extra, "status": "SKIPPED", "reason": too_slow.get(series, why)}
        elif isolate:
            res = run_isolated(case, timeout_s=args.timeout)
            keys = ("kind", "op", "provider", "layer", "B", "H", "N", "L", "mode")
            res = {**{k: case[k] for k in keys if k in case}, **res}
        else:
            res = run_op_case(case) if case["kind"] == "op" else run_layer_case(case)
        if res.get("status") == "OK":
            history.setdefault(series, []).append((case["L"], res["median_s"]))
        elif res.get("status") in ("TIMEOUT", "OOM"):
            too_slow[series] = f"L={case['L']}: {res['status']}"
        results.append(res)
        if device == "cuda":
            torch.cuda.empty_cache()  # each case starts from an empty cache (and recovers from OOM)
        line = (f"{case['kind']} {name} {case.get('provider', '')} {case['mode']} H={case['H']} N={case['N']} "
                f"L={case['L']}: {res['status']}" + (f" {res['median_s'] * 1e3:.2f} ms" if res["status"] == "OK"
                                                    else f" ({res.get('reason', '')})"))
        if bar is not None:
            bar.write(line, file=sys.stderr)
            bar.update(1)
        else:
            print(line, file=sys.stderr, flush=True)
        if args.json:
            report.write_json(args.json, header, results)
    if bar is not None:
        bar.close()

    op_rows = [r for r in results if r["kind"] == "op"]
    layer_rows = [r for r in results if r["kind"] == "layer"]
    if op_rows:
        print("\n## operators\n" + report.op_table(op_rows, gpu=device == "cuda"))
    if layer_rows:
        print("\n## layers (fwd: inference under no_grad; fwdbwd: gradients of input and all parameters)\n"
              + report.layer_table(layer_rows))
    if layer_rows and not args.smoke:
        print("\n## targets\n" + "\n".join(report.targets(results, device=device)))
    if args.json:
        report.write_json(args.json, header, results)
        print(f"\nJSON: {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(header, results) + "\n")
        print(f"markdown: {args.markdown}")
    if args.plot:
        print(f"plot: {args.plot}" if report.plot(args.plot, header, results) else "plot: nothing measured, no PNG")
    failed = [r for r in results if r["status"] in ("FAILED", "TIMEOUT")]
    if failed:
        print(f"\n{len(failed)} case(s) FAILED", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
