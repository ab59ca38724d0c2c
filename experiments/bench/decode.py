"""Decoding benchmark: per-token latency and tokens per second of autoregressive generation with
`ssm.SequenceModel` (`python -m experiments.bench --decode`).

Each case is (layer, batch B, context position P). The model is a causal token model
(`vocab_size` tokens in, one logit per token out, pooling "none") of `n_layers` blocks at width
`d_model`. To measure at position P without generating P tokens, the state is set first:

- `s4d` / `s4`: a random complex state of the layer's shape (the state of an S4 layer has the same
  size at every position, so its values do not change the cost of a step);
- `transformer`: a KV cache holding P random keys and values (and their positions) per layer,
  which is what P decoded tokens leave behind; the cache grows by one entry per step.

Then `warmup` steps run untimed and timed steps follow, each feeding the argmax of the previous
step's logits (greedy generation); the positions of a series take turns over `rounds` rounds. A
case's number is the median per-token latency (time of one `model.step` for the whole batch);
tokens/s = B / median. The targets: S4D's per-token cost stays flat with P, and S4D decodes
>= 10x faster than the Transformer at P = 16K.

The Transformer's KV cache (`ssm.layers.attention`) appends by concatenation, so each step also
copies the whole cache of every layer: part of its per-token cost grows with P for that reason.
"""
from __future__ import annotations

import statistics
import time

import torch

DECODE_LAYERS = ("s4d", "s4", "transformer")
DEFAULTS = dict(positions=[1024, 4096, 16384, 65536], batch=[1, 16], steps=32, warmup=2, rounds=4,
                d_model=256, n_layers=4, d_state=64, n_heads=4, vocab=256)
SMOKE = dict(positions=[16, 32], batch=[1, 2], steps=2, warmup=1, rounds=2, d_model=16, n_layers=2, d_state=8,
             n_heads=2, vocab=11)
TARGET_P, TARGET_RATIO, FLAT_RATIO = 16384, 10.0, 1.5


def build_model(layer: str, cfg: dict, *, device: str) -> torch.nn.Module:
    """The benchmarked model: `cfg` holds d_model, n_layers, d_state, n_heads, vocab, pos."""
    from ssm.models import SequenceModel
    if layer == "transformer":
        kwargs = dict(n_heads=cfg["n_heads"], causal=True, pos=cfg.get("pos", "none"))
    else:
        kwargs = dict(d_state=cfg["d_state"])
        if layer == "s4":
            kwargs["l_max"] = cfg["positions"][0]                     # S4 relates Ct to a length
    model = SequenceModel(cfg["vocab"], vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                          layer=layer, layer_kwargs=kwargs, pooling="none", device=device)
    return model.eval()


def kv_cache_bytes(cfg: dict, B: int, P: int) -> int:
    """float32 keys + values of all layers at position P."""
    return 2 * B * P * cfg["d_model"] * cfg["n_layers"] * 4


def prefilled_state(model, layer: str, B: int, P: int, *, device: str, gen: torch.Generator) -> list:
    """The state after P tokens, filled with random values of the right shape (module docstring)."""
    state = model.default_state(B, device=device)
    if layer != "transformer":
        return [torch.randn(s.shape, dtype=s.dtype, device=device, generator=gen) * 0.1 for s in state]
    out = []
    for s in state:
        nh, hd = s["k"].shape[1], s["k"].shape[3]
        k = torch.randn(B, nh, P, hd, device=device, generator=gen)
        v = torch.randn(B, nh, P, hd, device=device, generator=gen)
        pos = torch.arange(P, device=device).expand(B, P).contiguous()
        out.append({"k": k, "v": v, "pos": pos, "valid": torch.ones(B, P, dtype=torch.bool, device=device)})
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(model, state: list, tok: torch.Tensor, *, steps: int, warmup: int,
                device: str) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of `steps` greedy steps after `warmup` untimed ones.

    CPU time counts only the time this process ran, so on a shared machine it is the steadier of
    the two (with one thread it is close to the step's own cost); tokens/s use wall-clock time.
    """
    wall, cpu = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out, state = model.step(tok, state)
        tok = out.argmax(-1)                                           # (B,) the next input
        _sync(device)
        if i >= warmup:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    return wall, cpu


def _row(layer: str, B: int, P: int, device: str, times: list[float], cpu: list[float], cfg: dict,
         rounds: int) -> dict:
    ts = sorted(times)
    med = statistics.median(ts)
    return {"kind": "decode", "layer": layer, "B": B, "P": P, "device": device, "status": "OK", "median_s": med,
            "p20_s": ts[round(0.2 * (len(ts) - 1))], "p80_s": ts[round(0.8 * (len(ts) - 1))],
            "cpu_median_s": statistics.median(cpu), "tokens_per_s": B / med, "steps": len(ts),
            "warmup": cfg["warmup"], "rounds": rounds, "times_s": times, "cpu_times_s": cpu}


def run_series(layer: str, B: int, cfg: dict, *, device: str, mem_cap_bytes: float) -> list[dict]:
    """All positions of one (layer, B): result rows (status OK / SKIPPED / FAILED / OOM), one per P.

    The positions are measured in `rounds` interleaved rounds (each prefills again, warms up and
    times its share of the steps), so a slow spell of a shared machine spreads over all positions
    instead of landing on one. One model (fixed seed) serves every position.
    """
    rows, todo = {}, []
    for P in sorted(cfg["positions"]):
        if layer == "transformer" and 2 * kv_cache_bytes(cfg, B, P) > mem_cap_bytes:
            # a step writes the grown cache of one layer next to the old one, and the caller keeps
            # the old state list until the step returns: about twice the cache at the peak
            rows[P] = {"kind": "decode", "layer": layer, "B": B, "P": P, "device": device, "status": "SKIPPED",
                       "reason": f"KV cache {kv_cache_bytes(cfg, B, P) / 2**30:.1f} GiB (x2 while stepping) "
                                 "over --mem-cap-gib"}
        else:
            todo.append(P)
    rounds = max(1, min(cfg.get("rounds", 1), cfg["steps"]))
    per_round = -(-cfg["steps"] // rounds)
    times, cpu = {P: [] for P in todo}, {P: [] for P in todo}
    try:
        torch.manual_seed(0)
        model = build_model(layer, cfg, device=device)
        for r in range(rounds):
            for P in todo:
                gen = torch.Generator(device).manual_seed(1000 * r + P)
                state = prefilled_state(model, layer, B, P, device=device, gen=gen)
                tok = torch.randint(0, cfg["vocab"], (B,), device=device, generator=gen)
                wall, used = time_decode(model, state, tok, steps=per_round, warmup=cfg["warmup"], device=device)
                times[P] += wall
                cpu[P] += used
                del state
    except Exception as e:
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        status, reason = ("OOM", "CUDA out of memory") if oom else ("FAILED", f"{type(e).__name__}: {str(e)[:200]}")
        for P in todo:
            rows[P] = {"kind": "decode", "layer": layer, "B": B, "P": P, "device": device, "status": status,
                       "reason": reason}
        return [rows[P] for P in sorted(rows)]
    params = sum(p.numel() for p in model.parameters())
    for P in todo:
        rows[P] = {**_row(layer, B, P, device, times[P], cpu[P], cfg, rounds), "params": params}
    return [rows[P] for P in sorted(rows)]


def series(layers, batches) -> list[tuple[str, int]]:
    return [(layer, B) for layer in layers for B in batches]


def _get(rows, layer, B, P):
    return next((r for r in rows if (r["layer"], r["B"], r["P"]) == (layer, B, P) and r["status"] == "OK"), None)


def _ratio_line(what: str, a: dict, b: dict, key: str, target: float, *, flat: bool = False) -> str:
    ratio = b[key] / a[key]
    ok = ratio <= target if flat else ratio >= target
    return f"{what} ({'cpu' if key.startswith('cpu') else 'wall'}): {ratio:.2f}{'' if flat else 'x'}: " + (
        "PASS" if ok else "MISS")


def targets(rows: list[dict]) -> list[str]:
    """PASS/MISS lines, on wall-clock and on CPU time: S4D flat in P (max/min of the per-token
    medians over P <= FLAT_RATIO) and S4D vs Transformer at P = TARGET_P (>= TARGET_RATIO)."""
    out = []
    for B in dict.fromkeys(r["B"] for r in rows):
        s4d = [r for r in rows if r["layer"] == "s4d" and r["B"] == B and r["status"] == "OK"]
        if len(s4d) >= 2:
            for key in ("median_s", "cpu_median_s"):
                lo, hi = min(s4d, key=lambda r: r[key]), max(s4d, key=lambda r: r[key])
                out.append(_ratio_line(f"s4d B={B} flat over P={s4d[0]['P']}..{s4d[-1]['P']}: max/min "
                                       f"{lo[key] * 1e3:.3g}..{hi[key] * 1e3:.3g} ms (<= {FLAT_RATIO})",
                                       lo, hi, key, FLAT_RATIO, flat=True))
        s, t = _get(rows, "s4d", B, TARGET_P), _get(rows, "transformer", B, TARGET_P)
        if s is None or t is None:
            out.append(f"s4d vs transformer B={B} P={TARGET_P}: not measured")
            continue
        for key in ("median_s", "cpu_median_s"):
            out.append(_ratio_line(f"s4d vs transformer B={B} P={TARGET_P}: {s[key] * 1e3:.3g} vs "
                                   f"{t[key] * 1e3:.3g} ms/token (>= {TARGET_RATIO:g}x)", s, t, key, TARGET_RATIO))
    return out


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "OK":
        return r["status"].lower()
    return f"{r['median_s'] * 1e3:.3g} / {r['cpu_median_s'] * 1e3:.3g} ms ({r['tokens_per_s']:.4g} tok/s)"


def table(rows: list[dict]) -> str:
    """Markdown table: one row per (layer, B), one column per position P."""
    Ps = sorted({r["P"] for r in rows})
    out = ["| layer | B | " + " | ".join(f"P={P}" for P in Ps) + " |", "|---|---|" + "---|" * len(Ps)]
    for layer, B in dict.fromkeys((r["layer"], r["B"]) for r in rows):
        out.append(f"| {layer} | {B} | " + " | ".join(_cell(_get_any(rows, layer, B, P)) for P in Ps) + " |")
    notes = [f"- {r['layer']} B={r['B']} P={r['P']}: {r['status']} ({r.get('reason', '')})"
             for r in rows if r["status"] != "OK"]
    return "\n".join(out + ([""] + notes if notes else []))


def _get_any(rows, layer, B, P):
    return next((r for r in rows if (r["layer"], r["B"], r["P"]) == (layer, B, P)), None)


def describe(cfg: dict) -> str:
    return (f"model: SequenceModel vocab={cfg['vocab']} d_model={cfg['d_model']} n_layers={cfg['n_layers']} "
            f"(s4d/s4: d_state={cfg['d_state']}; transformer: {cfg['n_heads']} heads, pos={cfg.get('pos', 'none')}, "
            f"KV cache float32); median of {cfg['steps']} greedy steps in {cfg.get('rounds', 1)} interleaved rounds "
            f"(each after {cfg['warmup']} warm-up steps); "
            "cell = per-token latency of one batch step, wall-clock / process CPU time, "
            "and tokens/s = B / wall-clock latency")


def markdown(header: dict, cfg: dict, rows: list[dict]) -> str:
    return "\n".join([f"Device: {header['device_name']}; torch {header['torch']}; commit {header['commit']}; "
                      f"{header['date']}", f"Command: `{header['command']}`", "", describe(cfg), "",
                      table(rows), "", *[f"- {line}" for line in targets(rows)], ""])
