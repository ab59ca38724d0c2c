"""Mamba-3 ablation on running parity, at CPU scale; optional layer timing against Mamba-2.

    python -m experiments.mamba3_ablation --out mamba3_ablation.json --plot mamba3_ablation.png
    python -m experiments.mamba3_ablation --timing        # fwd+bwd at B=1, d_model=256, L=4096

Four configurations of a small `ssm.layers.mamba3.Mamba3` stack, each trained from the same seed on
running parity (`experiments.synthetic.state_tracking`; the label at t is the XOR of bits 0..t):
- `trapezoid`: the layer as published (learned trapezoid weight lam, rotary state, SISO);
- `euler`: lam fixed to 1, the exponential-Euler end point (Mamba-2's discretization);
- `real`: no rotation (theta = 0), a real state with positive decay only;
- `mimo`: `trapezoid` with a rank-`--mimo-rank` state update.
Reported per configuration: accuracy on fresh sequences of the training length and of
`--eval-len` (length generalization), final training loss, parameters and wall time. Writes the
table as JSON (and prints it) and a plot of evaluation accuracy during training. Why these
ablations: docs/mamba3.md ("Ablation").
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.synthetic.state_tracking import ParityConfig, generate_parity
from ssm.layers.mamba2 import Mamba2
from ssm.layers.mamba3 import Mamba3

CONFIGS = ("trapezoid", "euler", "real", "mimo")


class AblatedMamba3(Mamba3):
    """Mamba3 with the trapezoid weight pinned to 1 (`euler`) and/or the rotation removed (`real`)."""

    def __init__(self, *args, euler: bool = False, real: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.euler, self.real = euler, real

    def _project(self, u):
        p = super()._project(u)
        if self.euler:
            p["lam"] = torch.ones_like(p["lam"])
        if self.real:
            p["theta"] = torch.zeros_like(p["theta"])
        return p


class ParityModel(nn.Module):
    """Embedding -> n residual blocks (LayerNorm -> layer) -> LayerNorm -> 2-way head per position."""

    def __init__(self, config: str, args):
        super().__init__()
        opts = dict(d_state=args.d_state, headdim=args.headdim, chunk_size=args.chunk_size, rope_fraction=1.0,
                    is_mimo=config == "mimo", mimo_rank=args.mimo_rank)
        self.embed = nn.Embedding(2, args.d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(args.d_model) for _ in range(args.layers))
        self.layers = nn.ModuleList(AblatedMamba3(args.d_model, euler=config == "euler", real=config == "real",
                                                  **opts) for _ in range(args.layers))
        self.out_norm = nn.LayerNorm(args.d_model)
        self.head = nn.Linear(args.d_model, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)                                         # (B, L, d_model)
        for norm, layer in zip(self.norms, self.layers):
            h = h + layer(norm(h))[0]
        return self.head(self.out_norm(h))                             # (B, L, 2)


def batch(n: int, seq_len: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = ParityConfig(seq_len=seq_len, mode="running")
    xs, ys = zip(*(generate_parity(cfg, rng) for _ in range(n)))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))   # (n, L) each


@torch.no_grad()
def accuracy(model: nn.Module, seq_len: int, n: int, seed: int) -> float:
    x, y = batch(n, seq_len, np.random.default_rng(seed))
    return float((model(x).argmax(-1) == y).float().mean())


def train(config: str, args) -> dict:
    """Train one configuration; returns its row of the table and its evaluation curve."""
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = ParityModel(config, args)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warm = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to 0
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i, args.steps) / args.steps)))
    curve, start, loss = [], time.perf_counter(), float("nan")
    for step in range(1, args.steps + 1):
        x, y = batch(args.batch, args.seq_len, rng)
        loss_t = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss_t.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss = float(loss_t.detach())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, accuracy(model, args.seq_len, 128, seed=10_000)))
            print(f"  {config:9s} step {step:4d}  loss {loss:.4f}  acc@{args.seq_len} {curve[-1][1]:.3f}", flush=True)
    return {"config": config, "params": sum(p.numel() for p in model.parameters()),
            "final_loss": round(loss, 4), f"acc@{args.seq_len}": round(accuracy(model, args.seq_len, 256, 20_000), 4),
            f"acc@{args.eval_len}": round(accuracy(model, args.eval_len, 256, 30_000), 4),
            "wall_s": round(time.perf_counter() - start, 1), "curve": curve}


def time_layers(args) -> list[dict]:
    """fwd+bwd wall time of Mamba-3 (SISO, MIMO) and Mamba-2 at B=1, d_model=256, L=4096, float32."""
    rows = []
    x = torch.randn(1, 4096, 256)
    layers = {"Mamba3 SISO": Mamba3(256), f"Mamba3 MIMO r={args.mimo_rank}": Mamba3(256, is_mimo=True,
              mimo_rank=args.mimo_rank, chunk_size=64 // args.mimo_rank), "Mamba2": Mamba2(256)}
    for name, layer in layers.items():
        times = []
        for i in range(args.repeats + 1):
            xi = x.clone().requires_grad_()
            t0 = time.perf_counter()
            layer(xi)[0].sum().backward()
            if i:  # the first run is the warm-up
                times.append(time.perf_counter() - t0)
        rows.append({"layer": name, "median_s": round(float(np.median(times)), 3),
                     "min_s": round(min(times), 3), "max_s": round(max(times), 3), "repeats": args.repeats})
        print(f"  {name:16s} median {rows[-1]['median_s']:.3f} s  (min {rows[-1]['min_s']:.3f}, "
              f"max {rows[-1]['max_s']:.3f})", flush=True)
    return rows


def plot(rows: list[dict], path: str, seq_len: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in rows:
        steps, acc = zip(*row["curve"])
        ax.plot(steps, acc, marker="o", label=row["config"])
    ax.set(xlabel="training step", ylabel=f"accuracy, running parity, L={seq_len}", ylim=(0.4, 1.02))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m experiments.mamba3_ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS), help="configurations to train")
    p.add_argument("--steps", type=int, default=400, help="training steps per configuration")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=32, help="training sequence length")
    p.add_argument("--eval-len", type=int, default=128, help="length of the generalization test")
    p.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (the plotted curve)")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--d-state", type=int, default=16)
    p.add_argument("--headdim", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mimo-rank", type=int, default=4)
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny shapes: one is fastest)")
    p.add_argument("--out", default="mamba3_ablation.json", help="JSON table")
    p.add_argument("--plot", default="mamba3_ablation.png", help="PNG plot of accuracy during training")
    p.add_argument("--timing", action="store_true", help="time the layers (fwd+bwd, L=4096) instead of training")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per layer with --timing")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    header = {"torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args)}
    if args.timing:
        result = {**header, "timing": time_layers(args)}
    else:
        rows = [train(c, args) for c in args.configs]
        keys = [k for k in rows[0] if k != "curve"]
        print(" ".join(f"{k:>11s}" for k in keys))
        for row in rows:
            print(" ".join(f"{str(row[k]):>11s}" for k in keys))
        plot(rows, args.plot, args.seq_len)
        result = {**header, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}" + ("" if args.timing else f" and {args.plot}"))


if __name__ == "__main__":
    main()
