"""Decoding benchmark: per-token latency and tokens per second of autoregressive generation with
`ssm.SequenceModel` (`python -m experiments.bench --decode`), against the memory-traffic floor.

Each case is (layer, batch B, context position P). The model is a causal token model
(`vocab_size` tokens in, one logit per token out, pooling "none") of `n_layers` blocks at width
`d_model`. Every model decodes through `ssm.decode.compile_step` (the fused step; the eager
`model.step` with `cfg["step"] = "eager"`). Before anything is timed, the step is checked
against the model's full forward pass on a short random sequence; a model whose step disagrees
gets FAILED rows and is never timed. To measure at position P without generating P tokens, the
state is set first:

- `s4d` / `s4` / `mamba` / `mamba2`: a random state of the layer's shape (the state has the same
  size at every position, so its values do not change the cost of a step);
- `transformer`: a static KV cache (`default_state(B, max_len=...)`, written in place) holding P
  random keys and values per layer, which is what P decoded tokens leave behind.

Then `warmup` steps run untimed and timed steps follow, each feeding the argmax of the previous
step's logits (greedy generation); the positions of a series take turns over `rounds` rounds. A
case's number is the median per-token latency (one step for the whole batch); tokens/s = B /
median.

The floor of a step is its memory traffic divided by the memory bandwidth measured in the same
process (a large tensor copy, `measure_bandwidth`; wall-clock and CPU time each with the bandwidth
measured on that clock): every weight read once (of the embedding only
the B rows used), the recurrent state read and written once, and for the Transformer its KV cache
up to P read once. `x floor` = median / floor. Targets: S4D's per-token cost flat in P, S4D >= 10x
faster than the Transformer at P = 16K, S4D <= 0.3 ms/token at B = 1 (4 layers, d_model 256) and
the Transformer within 2x of the time to read its KV cache once.
"""
from __future__ import annotations

import statistics
import time

import torch

DECODE_LAYERS = ("s4d", "s4", "transformer", "mamba", "mamba2")
DEFAULTS = dict(positions=[1024, 4096, 16384, 65536], batch=[1, 16], steps=32, warmup=2, rounds=4,
                d_model=256, n_layers=4, d_state=64, mamba_d_state=16, n_heads=4, vocab=256, step="fused",
                bw_bytes=256 * 2**20)
SMOKE = dict(positions=[16, 32], batch=[1, 2], steps=2, warmup=1, rounds=2, d_model=16, n_layers=2, d_state=8,
             mamba_d_state=4, n_heads=2, vocab=11, step="fused", bw_bytes=16 * 2**20)
TARGET_P, TARGET_RATIO, FLAT_RATIO = 16384, 10.0, 1.5
S4D_TARGET_S, CACHE_TARGET_RATIO = 0.3e-3, 2.0
CHECK_LEN, CHECK_TOL = 8, 1e-4
_BANDWIDTH: dict = {}


def build_model(layer: str, cfg: dict, *, device: str) -> torch.nn.Module:
    """The benchmarked model: `cfg` holds d_model, n_layers, d_state, n_heads, vocab, pos."""
    from ssm.models import SequenceModel
    if layer == "transformer":
        kwargs = dict(n_heads=cfg["n_heads"], causal=True, pos=cfg.get("pos", "none"))
    elif layer == "mamba":
        kwargs = dict(d_state=cfg.get("mamba_d_state", 16))
    else:
        kwargs = dict(d_state=cfg["d_state"])
        if layer == "s4":
            kwargs["l_max"] = cfg["positions"][0]                     # S4 relates Ct to a length
        if layer == "mamba2" and cfg["d_model"] < 64:
            kwargs["headdim"] = cfg["d_model"] // 2                   # tiny smoke widths
    model = SequenceModel(cfg["vocab"], vocab_size=cfg["vocab"], d_model=cfg["d_model"], n_layers=cfg["n_layers"],
                          layer=layer, layer_kwargs=kwargs, pooling="none", device=device)
    return model.eval()


def step_function(model, cfg: dict):
    """The step that is timed: the fused step (default), the fused step compiled by inductor
    (compiled at its first call, during the correctness check), or the eager `model.step`."""
    if cfg.get("step", "fused") == "eager":
        return model.step
    from ssm.decode import compile_step
    return compile_step(model, backend="inductor" if cfg.get("step") == "inductor" else "fused")


def kv_cache_bytes(cfg: dict, B: int, P: int) -> int:
    """float32 keys + values of all layers at position P."""
    return 2 * B * P * cfg["d_model"] * cfg["n_layers"] * 4


def empty_state(model, layer: str, B: int, max_len: int, *, device: str) -> list:
    """A fresh decoding state: static KV caches of `max_len` slots for the Transformer."""
    if layer == "transformer":
        return [blk.default_state(B, device=device, max_len=max_len) for blk in model.blocks]
    return model.default_state(B, device=device)


def prefilled_state(model, layer: str, B: int, P: int, *, device: str, gen: torch.Generator,
                    room: int = 64) -> list:
    """The state after P tokens, filled with random values of the right shape (module docstring);
    a Transformer cache gets `room` free slots for the steps that follow."""
    state = empty_state(model, layer, B, P + room, device=device)
    if layer != "transformer":
        return [tuple(_rand_like(t, gen) for t in s) if isinstance(s, tuple) else _rand_like(s, gen) for s in state]
    for cache in state:
        cache.k[:, :, :P] = torch.randn(cache.k[:, :, :P].shape, device=device, generator=gen)
        cache.v[:, :, :P] = torch.randn(cache.v[:, :, :P].shape, device=device, generator=gen)
        cache.pos[:, :P] = torch.arange(P, device=device)
        cache.valid[:, :P] = True
        cache.lengths.fill_(P)
        cache.filled = P
    return state


def _rand_like(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(t.shape, dtype=t.dtype, device=t.device, generator=gen) * 0.1


def check_step(model, layer: str, step, cfg: dict, *, device: str) -> str | None:
    """None when `step` reproduces the full forward pass on a random sequence, else the reason."""
    gen = torch.Generator(device).manual_seed(7)
    tok = torch.randint(0, cfg["vocab"], (2, CHECK_LEN), device=device, generator=gen)
    with torch.no_grad():
        full, _ = model(tok)                                           # (2, L, vocab)
        state = empty_state(model, layer, 2, CHECK_LEN, device=device)
        outs = []
        for t in range(CHECK_LEN):
            out, state = step(tok[:, t], state)
            outs.append(out)
    err = (torch.stack(outs, 1) - full).abs().max().item()
    scale = full.abs().max().item()
    if not err <= CHECK_TOL * max(scale, 1.0):
        return f"step disagrees with the forward pass: max error {err:.3g} (scale {scale:.3g}); not timed"
    return None


def measure_bandwidth(device: str, nbytes: int = 256 * 2**20, repeats: int = 5) -> tuple[float, float]:
    """Memory bandwidth in bytes/s on the wall clock and on this process's CPU time: the best of
    `repeats` copies of a `nbytes` tensor (read + write counted), measured once per process, device
    and size. On a shared machine the CPU-time figure is the steadier one (time spent waiting for
    a core is not counted); the floors use each clock with its own bandwidth."""
    if (device, nbytes) in _BANDWIDTH:
        return _BANDWIDTH[device, nbytes]
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    wall = cpu = float("inf")
    for _ in range(repeats + 1):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        dst.copy_(src)
        _sync(device)
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    # on CUDA the host thread mostly waits: its CPU time says nothing about the device's bandwidth
    cpu = wall if device == "cuda" else max(cpu, 1e-9)
    _BANDWIDTH[device, nbytes] = (2 * nbytes / wall, 2 * nbytes / cpu)
    return _BANDWIDTH[device, nbytes]


def traffic_bytes(model, layer: str, cfg: dict, B: int, P: int) -> int:
    """Bytes one step must move at least: weights once (B rows of the embedding), the state read
    and written once, and the KV cache up to P read once (module docstring)."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("encoder"))
    weights += B * model.encoder.weight.shape[1] * model.encoder.weight.element_size()
    if layer == "transformer":
        return weights + kv_cache_bytes(cfg, B, P)
    state = model.default_state(B, device="meta")
    flat = [t for s in state for t in (s if isinstance(s, tuple) else (s,))]
    return weights + 2 * sum(t.numel() * t.element_size() for t in flat)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_decode(step, state: list, tok: torch.Tensor, *, steps: int, warmup: int,
                device: str) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each of `steps` greedy steps after `warmup` untimed ones.

    CPU time counts only the time this process ran, so on a shared machine it is the steadier of
    the two (with one thread it is close to the step's own cost); tokens/s use wall-clock time.
    """
    wall, cpu = [], []
    for i in range(warmup + steps):
        _sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        out, state = step(tok, state)
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
            "warmup": cfg["warmup"], "rounds": rounds, "step": cfg.get("step", "fused"), "times_s": times,
            "cpu_times_s": cpu}


def _bad_rows(layer, B, Ps, device, status, reason) -> dict:
    return {P: {"kind": "decode", "layer": layer, "B": B, "P": P, "device": device, "status": status,
                "reason": reason} for P in Ps}


def _floor_fields(model, layer: str, cfg: dict, B: int, P: int, row: dict, bw: tuple[float, float]) -> dict:
    traffic = traffic_bytes(model, layer, cfg, B, P)
    out = {"params": sum(p.numel() for p in model.parameters()), "bandwidth_bytes_per_s": bw[0],
           "bandwidth_cpu_bytes_per_s": bw[1], "floor_bytes": traffic, "floor_s": traffic / bw[0],
           "floor_cpu_s": traffic / bw[1], "x_floor": row["median_s"] * bw[0] / traffic,
           "x_floor_cpu": row["cpu_median_s"] * bw[1] / traffic}
    if layer == "transformer":
        out["cache_read_s"] = kv_cache_bytes(cfg, B, P) / bw[0]
        out["cache_read_cpu_s"] = kv_cache_bytes(cfg, B, P) / bw[1]
    return out


def run_series(layer: str, B: int, cfg: dict, *, device: str, mem_cap_bytes: float) -> list[dict]:
    """All positions of one (layer, B): result rows (status OK / SKIPPED / FAILED / OOM), one per P.

    The step is checked against the forward pass first (FAILED rows, nothing timed, if it
    disagrees). The positions are measured in `rounds` interleaved rounds (each prefills again,
    warms up and times its share of the steps), so a slow spell of a shared machine spreads over
    all positions instead of landing on one. One model (fixed seed) serves every position.
    """
    rounds = max(1, min(cfg.get("rounds", 1), cfg["steps"]))
    per_round = -(-cfg["steps"] // rounds)
    room = cfg["warmup"] + per_round
    rows, todo = {}, []
    for P in sorted(cfg["positions"]):
        if layer == "transformer" and kv_cache_bytes(cfg, B, P + room) > mem_cap_bytes:
            rows.update(_bad_rows(layer, B, [P], device, "SKIPPED", f"KV cache {kv_cache_bytes(cfg, B, P) / 2**30:.1f} "
                                  "GiB over --mem-cap-gib"))
        else:
            todo.append(P)
    times, cpu = {P: [] for P in todo}, {P: [] for P in todo}
    try:
        torch.manual_seed(0)
        model = build_model(layer, cfg, device=device)
        step = step_function(model, cfg)
        reason = check_step(model, layer, step, cfg, device=device)
        if reason is not None:
            rows.update(_bad_rows(layer, B, todo, device, "FAILED", reason))
            return [rows[P] for P in sorted(rows)]
        bw = measure_bandwidth(device, cfg.get("bw_bytes", 256 * 2**20))
        for r in range(rounds):
            for P in todo:
                gen = torch.Generator(device).manual_seed(1000 * r + P)
                state = prefilled_state(model, layer, B, P, device=device, gen=gen, room=room)
                tok = torch.randint(0, cfg["vocab"], (B,), device=device, generator=gen)
                wall, used = time_decode(step, state, tok, steps=per_round, warmup=cfg["warmup"], device=device)
                times[P] += wall
                cpu[P] += used
                del state
    except Exception as e:
        oom = isinstance(e, torch.cuda.OutOfMemoryError)
        status, reason = ("OOM", "CUDA out of memory") if oom else ("FAILED", f"{type(e).__name__}: {str(e)[:200]}")
        rows.update(_bad_rows(layer, B, todo, device, status, reason))
        return [rows[P] for P in sorted(rows)]
    for P in todo:
        row = _row(layer, B, P, device, times[P], cpu[P], cfg, rounds)
        rows[P] = {**row, **_floor_fields(model, layer, cfg, B, P, row, bw)}
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
    medians over P <= FLAT_RATIO), S4D vs Transformer at P = TARGET_P (>= TARGET_RATIO), S4D at
    B = 1 under S4D_TARGET_S, and the Transformer within CACHE_TARGET_RATIO of the time to read its
    KV cache once at the measured bandwidth (rows that carry it)."""
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
        else:
            for key in ("median_s", "cpu_median_s"):
                out.append(_ratio_line(f"s4d vs transformer B={B} P={TARGET_P}: {s[key] * 1e3:.3g} vs "
                                       f"{t[key] * 1e3:.3g} ms/token (>= {TARGET_RATIO:g}x)", s, t, key, TARGET_RATIO))
        for key in ("median_s", "cpu_median_s") if B == 1 and s4d else ():
            worst = max(r[key] for r in s4d)
            out.append(f"s4d B=1 per token ({'cpu' if key.startswith('cpu') else 'wall'}, worst P): "
                       f"{worst * 1e3:.3g} ms (<= {S4D_TARGET_S * 1e3:g} ms): "
                       + ("PASS" if worst <= S4D_TARGET_S else "MISS"))
        for t in (r for r in rows if r["layer"] == "transformer" and r["B"] == B and "cache_read_s" in r):
            for key in ("median_s", "cpu_median_s"):
                ratio = t[key] / t["cache_read_cpu_s" if key.startswith("cpu") else "cache_read_s"]
                out.append(f"transformer B={B} P={t['P']} vs reading its KV cache once "
                           f"({'cpu' if key.startswith('cpu') else 'wall'}): {ratio:.2f}x "
                           f"(<= {CACHE_TARGET_RATIO:g}x): " + ("PASS" if ratio <= CACHE_TARGET_RATIO else "MISS"))
    return out


def _cell(r: dict | None) -> str:
    if r is None:
        return ""
    if r["status"] != "OK":
        return r["status"].lower()
    floor = f"; {r['x_floor']:.3g}x / {r['x_floor_cpu']:.3g}x floor" if "x_floor" in r else ""
    return f"{r['median_s'] * 1e3:.3g} / {r['cpu_median_s'] * 1e3:.3g} ms ({r['tokens_per_s']:.4g} tok/s{floor})"


def table(rows: list[dict]) -> str:
    """Markdown table: one row per (layer, B), one column per position P."""
    Ps = sorted({r["P"] for r in rows})
    out = ["| layer | B | " + " | ".join(f"P={P}" for P in Ps) + " |", "|---|---|" + "---|" * len(Ps)]
    for layer, B in dict.fromkeys((r["layer"], r["B"]) for r in rows):
        out.append(f"| {layer} | {B} | " + " | ".join(_cell(_get_any(rows, layer, B, P)) for P in Ps) + " |")
    notes = [f"- {r['layer']} B={r['B']} P={r['P']}: {r['status']} ({r.get('reason', '')})"
             for r in rows if r["status"] != "OK"]
    bw = next((r for r in rows if "bandwidth_bytes_per_s" in r), None)
    if bw is not None:
        notes.append(f"- measured memory bandwidth (one large tensor copy, read + write): "
                     f"{bw['bandwidth_bytes_per_s'] / 1e9:.3g} GB/s wall-clock, "
                     f"{bw['bandwidth_cpu_bytes_per_s'] / 1e9:.3g} GB/s on CPU time")
    return "\n".join(out + ([""] + notes if notes else []))


def _get_any(rows, layer, B, P):
    return next((r for r in rows if (r["layer"], r["B"], r["P"]) == (layer, B, P)), None)


def describe(cfg: dict) -> str:
    return (f"model: SequenceModel vocab={cfg['vocab']} d_model={cfg['d_model']} n_layers={cfg['n_layers']} "
            f"(s4d/s4/mamba2: d_state={cfg['d_state']}; mamba: d_state={cfg.get('mamba_d_state', 16)}; "
            f"transformer: {cfg['n_heads']} heads, pos={cfg.get('pos', 'none')}, static KV cache float32); "
            f"{cfg.get('step', 'fused')} step (ssm.decode.compile_step), checked against the forward pass "
            f"before timing; median of {cfg['steps']} greedy steps in {cfg.get('rounds', 1)} interleaved rounds "
            f"(each after {cfg['warmup']} warm-up steps); "
            "cell = per-token latency of one batch step, wall-clock / process CPU time, "
            "tokens/s = B / wall-clock latency, and x floor = wall-clock / CPU time over the floor "
            "(bytes moved / measured bandwidth)")


def markdown(header: dict, cfg: dict, rows: list[dict]) -> str:
    return "\n".join([f"Device: {header['device_name']}; torch {header['torch']}; commit {header['commit']}; "
                      f"{header['date']}", f"Command: `{header['command']}`", "", describe(cfg), "",
                      table(rows), "", *[f"- {line}" for line in targets(rows)], ""])
