"""Length-extrapolation study: train at L_train, evaluate at 1x, 2x, 4x, 8x L_train.

Task, models and outputs: docs/rope.md#the-extrapolation-study.

    python -m experiments.extrapolation --preset cpu --out results/extrapolation
    python -m experiments.extrapolation --preset tiny --out /tmp/x --steps 20    # any Config field

Task: fixed-lag copy. Tokens are uniform over `vocab` symbols and the target at position t is the
input at t - lag (positions t < lag are not scored). The rule is the same at every length, so any
drop at longer lengths is the model's, not the task's. One attention head looking `lag` tokens back
(RoPE) or an SSM delay line (S4/S4D) solves it within a few hundred steps. It also separates the
RoPE variants: positional interpolation squeezes the distance `lag` into `lag / s`, so short-range
precision suffers, while far-away keys are what plain RoPE never saw. ALiBi's bias only decays
with distance and cannot single out one offset, so it learns this task slowly (an honest weak spot
of ALiBi, not a tuning accident: it stays near 0.3 accuracy after 600 steps in the CPU preset).

Models (causal, `ssm.models.SequenceModel`, pooling "none"): S4D, S4, Transformer + ALiBi, and
one Transformer trained with plain RoPE that is evaluated training-free under each RoPE variant:
plain, linear interpolation, NTK-aware, YaRN (factor s = L_eval / L_train for each length) and
ReRoPE (window `rerope_window`). Output in `--out`: metrics.jsonl (streamed), results.json,
results.md (table) and extrapolation.png; a trained model is checkpointed (`ckpt_<model>.pt`) and
reused by a rerun with the same configuration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ssm.layers.params import param_groups
from ssm.models import SequenceModel

TRAINED = ("s4d", "s4", "rope", "alibi")
ROPE_EVAL = ("rope", "rope-linear", "rope-ntk", "rope-yarn", "rope-rerope")


@dataclass
class Config:
    L_train: int = 64
    lag: int = 8
    vocab: int = 16
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_state: int = 32
    steps: int = 600
    batch: int = 32
    lr: float = 3e-3
    ssm_lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 50
    factors: tuple = (1, 2, 4, 8)
    eval_batch: int = 16
    eval_batches: int = 2
    models: tuple = TRAINED
    rerope_window: int = 0  # 0: L_train // 4
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # 0: leave torch's default
    backend: str = "auto"  # S4/S4D filter backend ("auto" | "triton" | "torch")


PRESETS = {
    "tiny": dict(L_train=16, lag=2, vocab=8, d_model=16, n_layers=1, n_heads=2, d_state=8, steps=8, batch=8,
                 warmup=2, factors=(1, 2), eval_batch=4, eval_batches=1, threads=1),
    # one thread: these matrices are too small to gain from a second one, and it keeps the run
    # steady when the cores are shared
    "cpu": dict(steps=600, threads=1),
    "gpu": dict(L_train=256, lag=16, vocab=32, d_model=128, n_layers=4, n_heads=8, d_state=64, steps=4000,
                batch=64, lr=1e-3, warmup=200, eval_batch=8, eval_batches=16,
                device="cuda"),
}


def make_batch(cfg: Config, batch: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, L) and targets (B, L): target[t] = x[t - lag], -100 (ignored) for t < lag."""
    x = torch.randint(0, cfg.vocab, (batch, length), generator=generator)  # (B, L)
    y = torch.full_like(x, -100)
    y[:, cfg.lag:] = x[:, : length - cfg.lag]
    return x, y


def rope_scaling(variant: str, cfg: Config, length: int) -> dict | None:
    """The RoPE scaling a plain-RoPE model is evaluated with at `length` (training free)."""
    s = length / cfg.L_train
    if variant == "rope":
        return None
    if variant == "rope-linear":
        return {"type": "linear", "factor": s}
    if variant == "rope-ntk":
        return {"type": "ntk", "factor": s}
    if variant == "rope-yarn":
        return {"type": "yarn", "factor": s, "original_max_position_embeddings": cfg.L_train}
    if variant == "rope-rerope":
        return {"type": "rerope", "window": cfg.rerope_window or max(cfg.L_train // 4, cfg.lag + 1)}
    raise ValueError(f"unknown RoPE variant {variant!r}; allowed: {ROPE_EVAL}")


def build(name: str, cfg: Config, *, scaling: dict | None = None) -> SequenceModel:
    """A causal next-token model; `name` in TRAINED."""
    if name in ("s4d", "s4"):
        kw = dict(d_state=cfg.d_state, backend=cfg.backend)
        if name == "s4":
            kw["l_max"] = cfg.L_train                                  # the length S4's Ct belongs to
        layer = name
    elif name in ("rope", "alibi"):
        kw = dict(n_heads=cfg.n_heads, causal=True, pos=name, max_len=cfg.L_train)
        if scaling is not None:
            kw["rope_scaling"] = scaling
        layer = "transformer"
    else:
        raise ValueError(f"unknown model {name!r}; allowed: {TRAINED}")
    return SequenceModel(cfg.vocab, vocab_size=cfg.vocab, d_model=cfg.d_model, n_layers=cfg.n_layers, layer=layer,
                         layer_kwargs=kw, pooling="none", device=cfg.device)


def _log(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def train(name: str, cfg: Config, out: Path, *, progress: bool = True) -> SequenceModel:
    """Train (or load the checkpoint of a run with the same config) and return the model."""
    from tqdm.auto import tqdm

    ckpt = out / f"ckpt_{name}.pt"
    model = build(name, cfg)
    cfg_dict = dataclasses.asdict(cfg)
    if ckpt.exists():
        saved = torch.load(ckpt, map_location=cfg.device, weights_only=False)
        if saved["config"] == cfg_dict:
            model.load_state_dict(saved["model"])
            _log(out / "metrics.jsonl", {"model": name, "event": "loaded_checkpoint"})
            return model
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.weight_decay, ssm_lr=cfg.ssm_lr))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * min(i / cfg.steps, 1.0))))
    model.train()
    bar = tqdm(range(cfg.steps), desc=f"train {name}", disable=not progress, leave=False)
    t0 = time.perf_counter()
    for i in bar:
        x, y = (t.to(cfg.device) for t in make_batch(cfg, cfg.batch, cfg.L_train, gen))
        logits, _ = model(x)  # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if i % 20 == 0 or i == cfg.steps - 1:
            bar.set_postfix(loss=f"{loss.item():.3f}")
            _log(out / "metrics.jsonl", {"model": name, "step": i, "loss": loss.item(),
                                         "seconds": time.perf_counter() - t0})
    torch.save({"config": cfg_dict, "model": model.state_dict()}, ckpt)
    return model


@torch.no_grad()
def evaluate(model: SequenceModel, cfg: Config, length: int) -> dict:
    """Accuracy / loss over scored positions, and accuracy on positions >= L_train only."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1000 + length)  # same data for every model
    correct = total = beyond_c = beyond_t = 0
    loss_sum = 0.0
    for _ in range(cfg.eval_batches):
        x, y = (t.to(cfg.device) for t in make_batch(cfg, cfg.eval_batch, length, gen))
        logits, _ = model(x)  # (B, L, V)
        scored = y >= 0  # (B, L)
        hit = (logits.argmax(-1) == y) & scored
        loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        correct, total = correct + int(hit.sum()), total + int(scored.sum())
        beyond_c += int(hit[:, cfg.L_train:].sum())
        beyond_t += int(scored[:, cfg.L_train:].sum())
    return {"acc": correct / total, "loss": loss_sum / total,
            "acc_beyond_train": beyond_c / beyond_t if beyond_t else None}


def run(cfg: Config, out: Path, *, progress: bool = True) -> dict:
    """Train every model in `cfg.models`, evaluate at each factor; write results; return them."""
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, out, progress=progress)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, out: Path, *, progress: bool) -> dict:
    from tqdm.auto import tqdm

    lengths = [cfg.L_train * f for f in cfg.factors]
    results: dict[str, dict] = {}
    for name in cfg.models:
        model = train(name, cfg, out, progress=progress)
        variants = ROPE_EVAL if name == "rope" else (name,)
        for variant in tqdm(variants, desc=f"eval {name}", disable=not progress, leave=False):
            results[variant] = {}
            for length in lengths:
                m = model
                if name == "rope":
                    m = build("rope", cfg, scaling=rope_scaling(variant, cfg, length))
                    m.load_state_dict(model.state_dict())
                res = evaluate(m, cfg, length)
                results[variant][length] = res
                _log(out / "metrics.jsonl", {"model": variant, "eval_length": length, **res})
    payload = {"config": dataclasses.asdict(cfg), "lengths": lengths, "results": results}
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text(markdown_table(payload))
    plot(payload, out / "extrapolation.png")
    return payload


def markdown_table(payload: dict) -> str:
    cfg, lengths = payload["config"], payload["lengths"]
    head = "| model | " + " | ".join(f"{n // cfg['L_train']}x ({n})" for n in lengths) + " |"
    lines = [f"Fixed-lag copy (lag {cfg['lag']}, vocab {cfg['vocab']}), trained at L = {cfg['L_train']} "
             f"for {cfg['steps']} steps; accuracy on scored positions (chance {1 / cfg['vocab']:.3f}).", "",
             head, "|" + "---|" * (len(lengths) + 1)]
    for name, per_len in payload["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{per_len[n]['acc']:.3f}" for n in lengths) + " |")
    return "\n".join(lines) + "\n"


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = payload["lengths"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, per_len in payload["results"].items():
        ax.plot(lengths, [per_len[n]["acc"] for n in lengths], marker="o",
                linestyle="--" if name.startswith("rope-") else "-", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.axvline(payload["config"]["L_train"], color="gray", lw=0.8)
    ax.set_xlabel("evaluation length")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"length extrapolation (trained at L = {payload['config']['L_train']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse_value(text: str, default):
    if isinstance(default, tuple):
        return tuple(type(default[0])(v) if default else v for v in text.split(",") if v)
    return type(default)(text)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m experiments.extrapolation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                    help="tiny: seconds (smoke test); cpu: about 2 minutes on an idle 2-core machine (under 10 when shared); gpu: larger, on CUDA")
    ap.add_argument("--out", required=True, type=Path, help="results folder")
    ap.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    for f in dataclasses.fields(Config):
        ap.add_argument(f"--{f.name}", default=None, metavar=type(f.default).__name__.upper(),
                        help=f"override (default {f.default!r}; tuples comma-separated)")
    args = ap.parse_args(argv)
    cfg = Config(**PRESETS[args.preset])
    for f in dataclasses.fields(Config):
        text = getattr(args, f.name)
        if text is not None:
            cfg = dataclasses.replace(cfg, **{f.name: _parse_value(text, getattr(cfg, f.name))})
    bad = set(cfg.models) - set(TRAINED)
    if bad:
        ap.error(f"--models: unknown {sorted(bad)}; allowed: {TRAINED}")
    if not 1 <= cfg.lag < cfg.L_train:
        ap.error(f"--lag must be in [1, L_train), got {cfg.lag}")
    payload = run(cfg, args.out, progress=not args.no_progress)
    print(markdown_table(payload))
    return payload


if __name__ == "__main__":
    main()
