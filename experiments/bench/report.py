"""Benchmark output: header line, fixed-width tables, the JSON file with every raw number, log-log
PNG plots (time vs L per provider / layer, memory vs L for layers) and the check of the targets
(BENCHMARKS.md). Layer rows of S4/S4D also carry `x floor` (time over the floor timed alongside)
and `x act` (peak memory over the activations the backward needs; see experiments/bench/layers.py);
selective op and layer rows carry `x floor` too (experiments/bench/selective.py defines their floors).
"""
from __future__ import annotations

import json
import os


def header_line(h: dict) -> str:
    return (f"# device: {h['device_name']} | torch {h['torch']} | triton {h['triton']} | commit {h['commit']} "
            f"| {h['date']}" + (f" | layers under {h['amp']} autocast" if h.get("amp", "none") != "none" else "")
            + f"\n# command: {h['command']}")


def _ms(r: dict, key: str) -> str:
    return f"{r[key] * 1e3:.3f}" if key in r else "-"


def _mib(r: dict) -> str:
    return f"{r['mem_bytes'] / 2**20:.1f}" if r.get("mem_bytes") is not None else "-"


def _note(r: dict) -> str:
    if r.get("status") != "OK":
        return f"{r.get('status')}: {r.get('reason', '')}"
    return f"n={r['repeats']}"


def _fmt(rows: list[list[str]], heads: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(heads, *rows)]
    def line(cells):
        return "  ".join(c.rjust(w) if i < len(cells) - 1 else c for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(heads), line(["-" * w for w in widths])] + [line(r) for r in rows])


def op_table(results: list[dict], *, gpu: bool) -> str:
    heads = ["op", "provider", "mode", "H", "N", "L", "median ms", "p20 ms", "p80 ms", "mem MiB"]
    floor = any("x_floor" in r for r in results)  # the selective ops time their floor alongside
    if floor:
        heads += ["floor ms", "x floor"]
    if gpu:
        heads += ["GFLOP/s", "GB/s", "floor %"]
    heads += ["note"]
    rows = []
    for r in results:
        row = [r["op"], r["provider"], r["mode"], str(r["H"]), str(r["N"]), str(r["L"]),
               _ms(r, "median_s"), _ms(r, "p20_s"), _ms(r, "p80_s"), _mib(r)]
        if floor:
            row += [_ms(r, "floor_median_s"), _x(r.get("x_floor"))]
        if gpu:
            row += [f"{r['flop_per_s'] / 1e9:.1f}" if "flop_per_s" in r else "-",
                    f"{r['bytes_per_s'] / 1e9:.1f}" if "bytes_per_s" in r else "-",
                    f"{100 * r['floor_fraction']:.1f}" if "floor_fraction" in r else "-"]
        rows.append(row + [_note(r)])
    return _fmt(rows, heads)


def x_act(r: dict) -> float | None:
    """Peak memory over the activation bytes the layer's backward needs (None when either is missing)."""
    if r.get("mem_bytes") is None or not r.get("activation_bytes"):
        return None
    return r["mem_bytes"] / r["activation_bytes"]


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def layer_table(results: list[dict]) -> str:
    heads = ["layer", "mode", "B", "H", "N", "L", "median ms", "p20 ms", "p80 ms", "floor ms", "x floor",
             "x floor cpu", "peak MiB", "act MiB", "x act", "note"]
    rows = [[r["layer"], r["mode"], str(r["B"]), str(r["H"]), "-" if r["N"] is None else str(r["N"]), str(r["L"]),
             _ms(r, "median_s"), _ms(r, "p20_s"), _ms(r, "p80_s"), _ms(r, "floor_median_s"), _x(r.get("x_floor")),
             _x(r.get("x_floor_cpu")), _mib(r),
             f"{r['activation_bytes'] / 2**20:.1f}" if r.get("activation_bytes") else "-", _x(x_act(r)), _note(r)]
            for r in results]
    return _fmt(rows, heads)


def _find(results, **kw):
    for r in results:
        if r.get("kind") == "layer" and r.get("status") == "OK" and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def targets(results: list[dict], *, device: str) -> list[str]:
    """The issues' targets, checked against the rows that were measured (absent rows say so)."""
    out = []
    if device == "cpu":
        for layer, f_max, m_max in (("s4d", 1.5, 350), ("s4", 2.0, 500)):
            r = _find(results, layer=layer, mode="fwdbwd", B=1, H=256, N=64, L=16384)
            if r is None or r.get("x_floor") is None:
                out.append(f"{layer} fwd+bwd B=1 H=256 N=64 L=16384 (<= {f_max}x floor, <= {m_max} MB): not measured")
                continue
            mem = r.get("mem_bytes")
            ok = r["x_floor"] <= f_max and mem is not None and mem / 1e6 <= m_max
            out.append(f"{layer} fwd+bwd B=1 H=256 N=64 L=16384: {r['x_floor']:.2f}x floor "
                       f"(cpu time {_x(r.get('x_floor_cpu'))}x), {'-' if mem is None else f'{mem / 1e6:.0f}'} MB, "
                       f"{_x(x_act(r))}x activations (target <= {f_max}x, <= {m_max} MB): {'MET' if ok else 'MISSED'}")
        for layer, t_max, m_max in (("s4d", 1.0, 500), ("s4", 3.5, 1024)):
            r = _find(results, layer=layer, mode="fwdbwd", B=1, H=256, N=64, L=16384)
            if r is None:
                out.append(f"{layer} fwd+bwd B=1 H=256 N=64 L=16384 (<= {t_max} s, < {m_max} MB): not measured")
                continue
            mem = r.get("mem_bytes")
            ok = r["median_s"] <= t_max and mem is not None and mem / 1e6 < m_max
            out.append(f"{layer} fwd+bwd B=1 H=256 N=64 L=16384: {r['median_s']:.3f} s, "
                       f"{'-' if mem is None else f'{mem / 1e6:.0f}'} MB (target <= {t_max} s, < {m_max} MB): "
                       f"{'MET' if ok else 'MISSED'}")
        key = dict(mode="fwdbwd", H=256, L=8192)
    else:
        key = dict(mode="fwdbwd", B=16, H=1024, L=16384)
    s, a = _find(results, layer="s4d", **key), _find(results, layer="attention", **key)
    desc = ", ".join(f"{k}={v}" for k, v in key.items())
    if s is None or a is None:
        out.append(f"s4d vs attention ({desc}): not measured")
    else:
        ratio = a["median_s"] / s["median_s"]
        line = (f"s4d vs attention ({desc}): {s['median_s']:.3f} s vs {a['median_s']:.3f} s, "
                f"{ratio:.1f}x (target >= 10x)")
        if device != "cpu" and s.get("mem_bytes") and a.get("mem_bytes"):
            line += f"; memory {s['mem_bytes'] / a['mem_bytes']:.3f} of attention's (target <= 0.1)"
        out.append(line + (": MET" if ratio >= 10 else ": MISSED"))
    return out


def write_json(path: str, header: dict, results: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"header": header, "results": results}, f, indent=1)
    os.replace(tmp, path)


def plot(path: str, header: dict, results: list[dict]) -> bool:
    """Log-log plots: one panel per (op, mode) with time vs L per provider (and H, N when several),
    then layer time vs L and layer memory vs L per mode. Returns False when nothing was measured."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.get("status") == "OK"]
    panels = []  # (title, ylabel, {label: [(L, y)]})
    for op in dict.fromkeys(r["op"] for r in ok if r["kind"] == "op"):
        for mode in ("fwd", "fwdbwd"):
            rs = [r for r in ok if r["kind"] == "op" and r["op"] == op and r["mode"] == mode]
            multi = len({(r["H"], r["N"]) for r in rs}) > 1
            series = {}
            for r in rs:
                lab = r["provider"] + (f" H={r['H']} N={r['N']}" if multi else "")
                series.setdefault(lab, []).append((r["L"], r["median_s"]))
            if series:
                title = f"{op} {mode}" + ("" if multi else f" (H={rs[0]['H']}, N={rs[0]['N']})")
                panels.append((title, "time (s)", series))
    for mode in ("fwd", "fwdbwd"):
        rs = [r for r in ok if r["kind"] == "layer" and r["mode"] == mode]
        for what, key, unit in (("time", "median_s", "time (s)"), ("peak memory", "mem_bytes", "memory (MiB)")):
            series = {}
            for r in rs:
                if r.get(key) is not None and r[key] > 0:
                    y = r[key] / 2**20 if key == "mem_bytes" else r[key]
                    series.setdefault(f"{r['layer']} B={r['B']} H={r['H']}", []).append((r["L"], y))
            if series:
                panels.append((f"layers {mode}: {what}", unit, series))
    if not panels:
        return False
    cols = min(3, len(panels))
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, (title, ylabel, series) in zip(axes.flat, panels):
        for lab, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("L")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{header['device_name']} | torch {header['torch']} | commit {header['commit']} | {header['date']}",
                 fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(header: dict, results: list[dict]) -> str:
    """Tables for BENCHMARKS.md: one row per (op, provider, mode) or (layer, mode), one column per
    L; cells are median ms (layers: median ms / peak MiB), or the status when not measured."""
    def cell(r, mem):
        if r is None:
            return ""
        if r.get("status") != "OK":
            return r.get("status", "").lower()
        t = f"{r['median_s'] * 1e3:.4g}"
        t += f" / {r['mem_bytes'] / 2**20:.4g}" if mem and r.get("mem_bytes") is not None else ""
        if r.get("x_floor") is not None:
            t += f" ({r['x_floor']:.2f}x floor" + (f", {x_act(r):.2f}x act" if x_act(r) is not None else "") + ")"
        return t

    out = [f"Device: {header['device_name']}; torch {header['torch']}; triton {header['triton']}; "
           f"commit {header['commit']}; {header['date']}", f"Command: `{header['command']}`", ""]
    for kind, keys, mem, unit in (("op", ("op", "H", "N", "provider", "mode"), False, "median ms"),
                                  ("layer", ("layer", "B", "H", "N", "mode"), True,
                                   "median ms / peak MiB (x floor, x act)")):
        rows = [r for r in results if r.get("kind") == kind]
        if not rows:
            continue
        Ls = sorted({r["L"] for r in rows})
        out += [f"| {' | '.join(keys)} | " + " | ".join(f"L={L} ({unit})" for L in Ls) + " |",
                "|" + "---|" * (len(keys) + len(Ls))]
        for key in dict.fromkeys(tuple(r.get(k) for k in keys) for r in rows):
            by_L = {r["L"]: r for r in rows if tuple(r.get(k) for k in keys) == key}
            out.append("| " + " | ".join("-" if k is None else str(k) for k in key) + " | "
                       + " | ".join(cell(by_L.get(L), mem) for L in Ls) + " |")
        out.append("")
    return "\n".join(out)
