"""`python -m experiments.bench`: operator, layer and decoding benchmarks -> table, JSON, plots.

Every operator provider is checked against complex128 ground truth before it is timed; a failing
check makes the row FAILED and it is never timed. `--decode` measures autoregressive generation
instead (`experiments.bench.decode`). See BENCHMARKS.md for the commands used there.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from experiments.bench.decode import DECODE_LAYERS
from experiments.bench.selective import DEFAULT_N as SELECTIVE_N
from experiments.bench.selective import OPS as SELECTIVE_OPS

OPS = ("vandermonde", "cauchy", "fftconv") + SELECTIVE_OPS
LAYERS = ("s4d", "s4", "attention", "transformer", "mamba", "mamba2", "mamba-hf", "mamba-hf-pscan",
          "mamba-mambapy", "mamba2-hf")
PROVIDERS = ("triton", "torch", "plain", "compile", "pykeops", "mambapy")
# Selective ops and layers (run only when named): their own shapes unless --H / --N / --layer-H /
# --layer-N are given (experiments.bench.selective): layers H = d_model (preset `selective_H`), ops
# H = d_inner = 2 d_model; N = the layer's usual state size.
DEFAULT_OPS, DEFAULT_LAYERS = OPS[:3], LAYERS[:4]
SELECTIVE_PROVIDERS = ("triton", "torch", "plain", "mambapy")
MODES = ("fwd", "fwdbwd")
K = 1024
PRESETS = {  # (ops: H, N, L; layers: B, H, N, L)
    "cpu": dict(H=[256], N=[64], L=[K, 2 * K, 4 * K, 8 * K, 16 * K],
                layer_B=[1], layer_H=[256], layer_N=[64], layer_L=[K, 2 * K, 4 * K, 8 * K, 16 * K], selective_H=[256]),
    "cuda": dict(H=[256, 1024], N=[16, 64, 256], L=[K << i for i in range(7)],
                 layer_B=[16], layer_H=[1024], layer_N=[64], layer_L=[K << i for i in range(7)], selective_H=[1024]),
    "smoke": dict(H=[3], N=[8], L=[33, 128], layer_B=[1], layer_H=[16], layer_N=[4], layer_L=[64], selective_H=[32]),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (the option then falls back to a preset, said in its help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--op", nargs="*", choices=OPS, help="operators to run (no names: the first three; "
                   "selective_scan, ssd and mamba3 only when named)")
    p.add_argument("--layer", nargs="*", choices=LAYERS, help="layers to run (no names: the first four; the "
                   "selective layers and their peers only when named)")
    p.add_argument("--decode", action="store_true",
                   help="decoding benchmark instead (per-token latency and tokens/s of generation; see "
                        "the 'decoding' options)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes through every provider that can run (Triton interpreter on CPU), < 1 min; "
                        "with --decode: positions 16, 32 and 2 steps of a tiny model")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's own choice, one per core)")
    p.add_argument("--json", metavar="PATH", help="write header + every raw number (rewritten after each case)")
    p.add_argument("--plot", metavar="PATH", help="write log-log PNG plots (time vs L; memory vs L for layers)")
    p.add_argument("--markdown", metavar="PATH", help="write the results as markdown tables (for BENCHMARKS.md)")
    p.add_argument("--mem-cap-gib", type=float, default=None,
                   help="skip plain/compile cases that would materialize more, and decoding cases whose KV "
                        "cache would need more (default 6 CPU, half the GPU)")


def _add_shape_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operators and layers")
    g.add_argument("--repeats", type=int, default=None, help="max timed repeats per case (default 5 CPU, 20 CUDA)")
    g.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per case; fewer repeats when calls are slow (default 3 CPU, 1 CUDA)")
    g.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    g.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="fwd and/or fwd+bwd")
    g.add_argument("--H", type=int, nargs="+", help="operator widths")
    g.add_argument("--N", type=int, nargs="+", help="operator real state sizes (N/2 complex terms)")
    g.add_argument("--L", type=int, nargs="+", help="operator lengths")
    g.add_argument("--layer-B", type=int, nargs="+", help="layer batch sizes")
    g.add_argument("--layer-H", type=int, nargs="+", help="layer widths")
    g.add_argument("--layer-N", type=int, nargs="+", help="S4/S4D state sizes")
    g.add_argument("--layer-L", type=int, nargs="+", help="layer lengths")
    g.add_argument("--amp", choices=("none", "bf16"), default="none",
                   help="layers only: run under bf16 autocast (SDPA flash kernels on CUDA need it)")
    g.add_argument("--isolate", choices=("auto", "always", "never"), default="auto",
                   help="fresh process per case (CPU peak RSS): auto = layers on CPU only "
                        "(in --smoke only the first layer case, to keep it under a minute)")
    g.add_argument("--max-call-s", type=float, default=10.0,
                   help="skip a case when the calls at smaller L of the same series predict a call slower "
                        "than this (power law fitted to the last two L, exponent clamped to [1, 2])")
    g.add_argument("--max-layer-call-s", type=float, default=30.0, help="--max-call-s for layer cases")
    g.add_argument("--timeout", type=float, default=900.0, help="seconds per isolated case")
    g.add_argument("--peak-flops", type=float, default=None, help="override the device's FP32 FLOP/s peak")
    g.add_argument("--peak-bw", type=float, default=None, help="override the device's memory bytes/s peak")


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("decoding (--decode)",
                             "presets: positions 1K 4K 16K 64K, batch 1 16, 32 timed steps in 4 rounds (2 warm-up "
                             "steps each), d_model 256, 4 layers, d_state 64, 4 heads, vocab 256; with --smoke: "
                             "positions 16 32, batch 1 2, 2 steps in 2 rounds, d_model 16, 2 layers, d_state 8")
    g.add_argument("--decode-layers", nargs="+", choices=DECODE_LAYERS, default=list(DECODE_LAYERS))
    g.add_argument("--decode-step", choices=("fused", "inductor", "eager"), default="fused",
                   help="the timed step: ssm.decode.compile_step (fused, default; inductor: the fused step "
                        "under torch.compile, compiled before timing) or model.step (eager)")
    g.add_argument("--positions", type=int, nargs="+", help="context positions P (tokens already decoded)")
    g.add_argument("--batch", type=int, nargs="+", help="batch sizes")
    g.add_argument("--steps", type=int, help="timed decoding steps per case")
    g.add_argument("--warmup", type=int, help="untimed decoding steps before each round's timed steps")
    g.add_argument("--rounds", type=int, help="rounds over the positions of a series (the timed steps are "
                   "split between them; noise on a shared machine spreads over all positions)")
    g.add_argument("--d-model", type=int, help="model width")
    g.add_argument("--n-layers", type=int, help="number of blocks")
    g.add_argument("--d-state", type=int, help="S4/S4D state size N")
    g.add_argument("--transformer-pos", choices=("none", "rope"), default="none",
                   help="Transformer positions (rope: the cache keeps unrotated keys and rotates them every step)")


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m experiments.bench",
        description="Operator benchmarks (vandermonde, cauchy, fftconv) over providers triton / torch "
                    "(the library's chunked reference) / plain (materializing formula) / compile "
                    "(torch.compile of plain) / pykeops, and layer benchmarks (S4D, S4, SDPA attention, "
                    "Transformer+RoPE): time (median, p20-p80) and peak memory vs L. With neither --op nor "
                    "--layer, runs the S4-family set. Selective rows when named: ops selective_scan / ssd / mamba3 (SISO) "
                    "(providers triton, torch, plain = the sequential definition, mambapy = its parallel scan), layers "
                    "mamba / mamba2 and the CPU peers mamba-hf (transformers' sequential path), mamba-hf-pscan, "
                    "mamba-mambapy, mamba2-hf, B=1 d_model=256 (ops d_inner 512), N 16 / 64. Shape defaults: CPU H=256 N=64 L=1K..16K (layers B=1); "
                    "CUDA H={256,1024} N={16,64,256} L=1K..64K (layers B=16 H=1024). With --decode: "
                    "autoregressive decoding (S4D, S4, Transformer with KV cache) at context positions P.",
        formatter_class=_HelpFormatter)
    _add_run_args(p)
    _add_shape_args(p)
    _add_decode_args(p)
    args = p.parse_args(argv)
    if args.op is None and args.layer is None:
        args.op_all = args.layer_all = True
    else:
        args.op_all, args.layer_all = args.op == [], args.layer == []
    args.op = list(DEFAULT_OPS) if args.op_all else (args.op or [])
    args.layer = list(DEFAULT_LAYERS) if args.layer_all else (args.layer or [])
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


def setup_device(args) -> str | None:
    """The device to run on (None: CUDA asked for but absent); sets TRITON_INTERPRET before Triton loads."""
    import torch  # does not import Triton

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return None
    if args.decode:
        return device  # decoding steps the layers' recurrences: no Triton kernel runs
    # Triton reads TRITON_INTERPRET when first imported. The interpreter runs only in a CPU --smoke:
    # elsewhere it would make every CPU layer crawl (or interpret kernels on a GPU).
    interpret = "1" if device == "cpu" and args.smoke else "0"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != interpret:
        print("warning: Triton was imported before the runner set TRITON_INTERPRET", file=sys.stderr)
    os.environ["TRITON_INTERPRET"] = interpret
    return device


def mem_cap_bytes(args, device: str) -> float:
    import torch
    if args.mem_cap_gib is not None:
        return args.mem_cap_gib * 2**30
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory / 2
    return 6 * 2**30


def make_header(args, device: str, argv: list[str]) -> dict:
    from experiments.bench.timing import env_header
    header = env_header(device)
    header["command"] = "python -m experiments.bench " + " ".join(argv)
    header["triton_interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return header


def _peaks(args, header: dict, device: str):
    """(FLOP/s, bytes/s) peaks for the floor columns, from the device table or the command line."""
    from experiments.bench.ops import device_peaks
    peaks = device_peaks(header["device_name"]) if device == "cuda" else None
    if args.peak_flops or args.peak_bw:
        base = peaks or (None, None)
        peaks = (args.peak_flops or base[0], args.peak_bw or base[1])
        peaks = peaks if None not in peaks else None
    return peaks


def _layer_states(layer: str, args, shapes: dict) -> list:
    """State sizes of a layer's cases: S4/S4D --layer-N; selective layers and their peers their own."""
    if layer in ("s4d", "s4"):
        return shapes["layer_N"]
    if layer.startswith("mamba"):
        return args.layer_N or [SELECTIVE_N["mamba2" if layer.startswith("mamba2") else "mamba"]]
    return [None]


def build_cases(args, shapes: dict) -> list[dict]:
    """Operator and layer cases; layers first (the targets come from them, so an interrupted run has them)."""
    cases = []
    for op in args.op:
        sel = op in SELECTIVE_OPS
        for prov in [p for p in args.providers if (p in SELECTIVE_PROVIDERS if sel else p != "mambapy")]:
            for mode in args.modes:
                for H in (args.H or [2 * h for h in shapes["selective_H"]]) if sel else shapes["H"]:
                    for N in (args.N or [SELECTIVE_N[op]]) if sel else shapes["N"]:
                        for L in sorted(shapes["L"]):
                            cases.append(dict(kind="op", op=op, provider=prov, H=H, N=N, L=L, mode=mode))
    for layer in args.layer:
        for mode in args.modes:
            for B in shapes["layer_B"]:
                for H in (args.layer_H or shapes["selective_H"]) if layer.startswith("mamba") else shapes["layer_H"]:
                    for N in _layer_states(layer, args, shapes):
                        for L in sorted(shapes["layer_L"]):
                            cases.append(dict(kind="layer", layer=layer, B=B, H=H, N=N, L=L, mode=mode))
    cases.sort(key=lambda c: c["kind"] != "layer")  # stable: keeps the order within each kind
    return cases


class _Progress:
    """One line per finished case, through tqdm when it is installed."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            self.bar = None

    def line(self, text: str) -> None:
        if self.bar is None:
            print(text, file=sys.stderr, flush=True)
        else:
            self.bar.write(text, file=sys.stderr)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_case(case: dict, args, device: str, *, isolate: bool, skip: str | None) -> dict:
    """One case: SKIPPED with `skip`, in a fresh process, or in this one."""
    from experiments.bench.layers import run_layer_case
    from experiments.bench.ops import run_op_case
    from experiments.bench.timing import run_isolated
    if skip:
        keep = ("kind", "mode", "H", "N", "L", "op", "provider", "layer", "B")
        return {**{k: case[k] for k in keep if k in case}, "status": "SKIPPED", "reason": skip}
    if isolate:
        keys = ("kind", "op", "provider", "layer", "B", "H", "N", "L", "mode")
        # the fresh process must use --threads too (torch reads OMP_NUM_THREADS when it starts)
        env = {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)} if args.threads else None
        return {**{k: case[k] for k in keys if k in case}, **run_isolated(case, timeout_s=args.timeout, env=env)}
    return run_op_case(case) if case["kind"] == "op" else run_layer_case(case)


def run_cases(cases: list[dict], args, device: str, common: dict, header: dict) -> list[dict]:
    """Run every case in order, skipping a series after a timeout/OOM or a predicted slow call."""
    import torch

    from experiments.bench import report
    results, too_slow, history = [], {}, {}
    first_layer = next((c for c in cases if c["kind"] == "layer"), None)
    progress = _Progress(len(cases))
    for case in cases:
        case.update(common)
        name = case["op"] if case["kind"] == "op" else case["layer"]
        series = (case["kind"], name, case.get("provider"), case["mode"], case["H"], case["N"], case.get("B"))
        isolate = args.isolate == "always" or (args.isolate == "auto" and device == "cpu" and case["kind"] == "layer"
                                               and (not args.smoke or case is first_layer))
        why = _predict_too_slow(history.get(series, []), case["L"],
                                args.max_call_s if case["kind"] == "op" else args.max_layer_call_s)
        res = _run_case(case, args, device, isolate=isolate, skip=too_slow.get(series) or why)
        if res.get("status") == "OK":
            history.setdefault(series, []).append((case["L"], res["median_s"]))
        elif res.get("status") in ("TIMEOUT", "OOM"):
            too_slow[series] = f"L={case['L']}: {res['status']}"
        results.append(res)
        if device == "cuda":
            torch.cuda.empty_cache()  # each case starts from an empty cache (and recovers from OOM)
        took = f" {res['median_s'] * 1e3:.2f} ms" if res["status"] == "OK" else f" ({res.get('reason', '')})"
        progress.line(f"{case['kind']} {name} {case.get('provider', '')} {case['mode']} H={case['H']} "
                      f"N={case['N']} L={case['L']}: {res['status']}{took}")
        if args.json:
            report.write_json(args.json, header, results)
    progress.close()
    return results


def report_results(results: list[dict], args, device: str, header: dict) -> int:
    """Tables, targets, JSON, markdown, plots; the exit code (1 when a case FAILED or timed out)."""
    from experiments.bench import report
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


def run_benchmarks(args, device: str, header: dict) -> int:
    """Operators and layers: settings, cases, run, report."""
    from experiments.bench import report
    preset = PRESETS["smoke" if args.smoke else device]
    shapes = {k: getattr(args, k, None) or v for k, v in preset.items()}
    repeats = args.repeats or (3 if args.smoke else 5 if device == "cpu" else 20)
    budget = args.budget if args.budget is not None else (0.2 if args.smoke else 3.0 if device == "cpu" else 1.0)
    peaks = _peaks(args, header, device)
    header.update(peaks=peaks, amp=args.amp, shapes=shapes)
    print(report.header_line(header), flush=True)
    common = dict(device=device, repeats=repeats, budget_s=budget, allow_interpreter=args.smoke,
                  mem_cap_bytes=mem_cap_bytes(args, device), peaks=peaks, amp=args.amp,
                  compile_backend="aot_eager" if args.smoke else "inductor")
    results = run_cases(build_cases(args, shapes), args, device, common, header)
    return report_results(results, args, device, header)


def decode_config(args) -> dict:
    from experiments.bench import decode
    cfg = dict(decode.SMOKE if args.smoke else decode.DEFAULTS)
    for key, value in (("positions", args.positions), ("batch", args.batch), ("steps", args.steps),
                       ("warmup", args.warmup), ("rounds", args.rounds), ("d_model", args.d_model),
                       ("n_layers", args.n_layers), ("d_state", args.d_state)):
        if value is not None:
            cfg[key] = value
    cfg["pos"] = args.transformer_pos
    cfg["step"] = args.decode_step
    return cfg


def run_decode(args, device: str, header: dict) -> int:
    """`--decode`: every (layer, batch, position) case, then the table, targets, JSON and markdown."""
    from experiments.bench import decode, report
    cfg = decode_config(args)
    header.update(decode=cfg)
    print(report.header_line(header) + "\n# " + decode.describe(cfg), flush=True)
    results = []
    todo = decode.series(args.decode_layers, cfg["batch"])
    progress = _Progress(len(todo))
    for layer, B in todo:
        rows = decode.run_series(layer, B, cfg, device=device, mem_cap_bytes=mem_cap_bytes(args, device))
        results += rows
        progress.line("\n".join(f"decode {layer} B={B} P={r['P']}: {r['status']}" + (
            f" {r['median_s'] * 1e3:.3f} ms/token (CPU time {r['cpu_median_s'] * 1e3:.3f} ms), "
            f"{r['tokens_per_s']:.1f} tok/s" if r["status"] == "OK"
            else f" ({r.get('reason', '')})") for r in rows))
        if args.json:
            report.write_json(args.json, header, results)
    progress.close()
    print("\n## decoding\n" + decode.table(results) + "\n\n## targets\n" + "\n".join(decode.targets(results)))
    if args.json:
        print(f"\nJSON: {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(decode.markdown(header, cfg, results))
        print(f"markdown: {args.markdown}")
    return 1 if any(r["status"] == "FAILED" for r in results) else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = setup_device(args)
    if device is None:
        return 2
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    header = make_header(args, device, argv)
    if args.decode:
        return run_decode(args, device, header)
    return run_benchmarks(args, device, header)


if __name__ == "__main__":
    sys.exit(main())
