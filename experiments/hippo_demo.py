"""HiPPO online function approximation demo: signal -> N coefficients per step -> signal.

Runs three built-in signals (a random smooth process, a chirp, a piecewise signal with jumps),
all of length L (default 10,000), through `ssm.approx.HiPPOApprox` for every measure and state
size N, reconstructs the memory window at the final step from the N coefficients, and prints the
RMS reconstruction error per (signal, measure, N). Writes into --out:
  errors.md   the table (markdown), errors.json the raw numbers, hippo_demo.png signal vs
  reconstruction at the largest N.

Windows: the signal spans one time unit (dt = 1/L). LegS reconstructs the whole history; LegT and
FouT the last --theta time units; LagT (exponentially decaying memory, time scale --lagt-theta)
the last 5*lagt-theta time units.

Example: python -m experiments.hippo_demo --length 10000 --N 8 16 32 64 --out results/hippo_demo
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from ssm.approx import HiPPOApprox
from ssm.discretize import METHODS
from ssm.hippo import MEASURES

SIGNALS = ("smooth", "chirp", "piecewise")


def make_signals(L: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Three float64 signals of length L sampled at the step midpoints of [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.arange(L, dtype=torch.float64) + 0.5) / L  # (L,)
    # Random smooth process: random Fourier features with a Gaussian-decaying spectrum.
    freqs = torch.arange(1, 41, dtype=torch.float64)  # (F,)
    amp = torch.randn(40, generator=g, dtype=torch.float64) * torch.exp(-(freqs / 12) ** 2)  # (F,)
    phase = 2 * math.pi * torch.rand(40, generator=g, dtype=torch.float64)  # (F,)
    smooth = (amp * torch.cos(2 * math.pi * freqs * t[:, None] + phase)).sum(-1)  # (L,)
    chirp = torch.sin(2 * math.pi * (2 * t + 6 * t ** 2))  # (L,) frequency rises from 2 to 14
    # Piecewise: constant and linear pieces with jumps at random points.
    cuts = torch.sort(torch.rand(5, generator=g, dtype=torch.float64)).values  # (5,)
    piece = torch.bucketize(t, cuts)  # (L,)
    level = torch.randn(6, generator=g, dtype=torch.float64)  # (6,)
    slope = torch.randn(6, generator=g, dtype=torch.float64)  # (6,)
    piecewise = level[piece] + slope[piece] * (t - 0.5)  # (L,)
    return {"smooth": smooth, "chirp": chirp, "piecewise": piecewise}


def _window(measure: str, L: int, theta: float, lagt_theta: float) -> int:
    """Number of final samples each measure is asked to reconstruct."""
    if measure == "legs":
        return L
    span = 5 * lagt_theta if measure == "lagt" else theta
    return max(1, min(L, int(span * L)))


def _model(measure: str, N: int, args) -> HiPPOApprox:
    theta = args.lagt_theta if measure == "lagt" else args.theta
    return HiPPOApprox(measure, N, method=args.method, theta=theta, dtype=torch.float64)


def run(args) -> dict:
    """Approximate every signal with every (measure, N); return errors and reconstructions."""
    sig = make_signals(args.length, seed=args.seed)
    names = list(sig)
    f = torch.stack([sig[n] for n in names])  # (S, L)
    L = args.length
    errors: dict = {n: {m: {} for m in args.measures} for n in names}
    recon: dict = {}
    timing: dict = {}
    for measure in args.measures:
        n_win = _window(measure, L, args.theta, args.lagt_theta)
        for N in args.N:
            model = _model(measure, N, args)
            t0 = time.perf_counter()
            c = model(f)  # (S, L, N)
            timing[f"{measure}/N={N}"] = time.perf_counter() - t0
            r = model.reconstruct(c[:, -1], n_win, dt=1.0 / L)  # (S, n_win)
            rmse = (r - f[:, -n_win:]).pow(2).mean(-1).sqrt()  # (S,)
            for i, n in enumerate(names):
                errors[n][measure][N] = float(rmse[i])
            if N == max(args.N):
                recon[measure] = r
    return {"signals": sig, "errors": errors, "recon": recon, "timing": timing}


def format_table(errors: dict, measures, Ns) -> str:
    head = "| signal | measure | " + " | ".join(f"N={N}" for N in Ns) + " |"
    lines = [head, "|" + "---|" * (2 + len(Ns))]
    for sname, per in errors.items():
        for m in measures:
            lines.append(f"| {sname} | {m} | " + " | ".join(f"{per[m][N]:.2e}" for N in Ns) + " |")
    return "\n".join(lines)


def plot(result: dict, args, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sig = result["signals"]
    L = args.length
    t = (torch.arange(L, dtype=torch.float64) + 0.5) / L
    fig, axes = plt.subplots(len(sig), 1, figsize=(11, 3 * len(sig)), squeeze=False)
    colors = {"legs": "tab:blue", "legt": "tab:orange", "lagt": "tab:green", "fout": "tab:red"}
    for ax, (i, (name, f)) in zip(axes[:, 0], enumerate(sig.items())):
        ax.plot(t, f, color="black", lw=2.5, alpha=0.35, label="signal")
        for m, r in result["recon"].items():
            n_win = r.shape[-1]
            ax.plot(t[-n_win:], r[i], color=colors.get(m), lw=1.0, label=f"{m} (N={max(args.N)})")
        ax.set_title(f"{name}: reconstruction at the final step (L={L}, method={args.method})")
        ax.set_xlabel("t")
        ax.legend(loc="upper left", fontsize=8, ncol=5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.hippo_demo", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join("results", "hippo_demo"), help="output folder (default %(default)s)")
    p.add_argument("--length", type=int, default=10_000, help="signal length L (default %(default)s)")
    p.add_argument("--N", type=int, nargs="+", default=[8, 16, 32, 64], help="state sizes (default %(default)s)")
    p.add_argument("--measures", nargs="+", default=list(MEASURES), choices=MEASURES,
                   help="HiPPO measures (default: all)")
    p.add_argument("--method", default="bilinear", choices=[m for m in METHODS if m != "gbt"],
                   help="discretization (default %(default)s; LegS 'zoh' is exact but slow at large L)")
    p.add_argument("--theta", type=float, default=0.5,
                   help="LegT/FouT window in time units; the signal spans 1 (default %(default)s)")
    p.add_argument("--lagt-theta", type=float, default=0.02, help="LagT time scale (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random signals (default %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.length < 2:
        raise SystemExit("--length must be >= 2")
    if not 0 < args.theta <= 1 or not args.lagt_theta > 0:
        raise SystemExit("--theta must lie in (0, 1] and --lagt-theta must be > 0")
    if any(N < 1 for N in args.N):
        raise SystemExit("--N values must be >= 1")
    os.makedirs(args.out, exist_ok=True)
    # The recurrences are long loops of tiny ops: intra-op threads only add synchronization.
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    result = run(args)
    table = format_table(result["errors"], args.measures, args.N)
    print(f"HiPPO reconstruction RMSE at the final step (L={args.length}, method={args.method}, "
          f"LegT/FouT window {args.theta}, LagT time scale {args.lagt_theta})")
    print(table)
    with open(os.path.join(args.out, "errors.md"), "w") as fh:
        fh.write(table + "\n")
    with open(os.path.join(args.out, "errors.json"), "w") as fh:
        json.dump({"config": vars(args), "rmse": result["errors"], "seconds": result["timing"]}, fh, indent=1)
    if not args.no_plot:
        plot(result, args, os.path.join(args.out, "hippo_demo.png"))
    print(f"wrote {args.out}/errors.md, errors.json" + ("" if args.no_plot else ", hippo_demo.png")
          + f" in {time.perf_counter() - t0:.1f}s")
    return result


if __name__ == "__main__":
    main()
