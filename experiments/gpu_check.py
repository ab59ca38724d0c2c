"""`python -m experiments.gpu_check OUT_DIR`: the checks that need a GPU, in one run of < 8 minutes.

On one CUDA device (sized for an H100/H200) and with what is already installed (it installs
nothing), it runs, each step as a subprocess with its own time limit:

1. `tests-compiled`: the operator tests with the Triton kernels compiled for the GPU
   (`SSMKIT_TEST_COMPILED=1 pytest tests/kernels -q`; tests/conftest.py then leaves the Triton
   interpreter off and the kernel tests put their Triton inputs on CUDA);
2. `ops`: the operator grid of `python -m experiments.bench --op` (vandermonde, cauchy, fftconv;
   every provider checked against the reference before timing);
3. `layers-fp32` and `layers-bf16`: the layer grid of `python -m experiments.bench --layer`, in
   float32 and under bf16 autocast (`--amp bf16`).

The default grids are cut to fit the time limit (`--full` runs the runner's own CUDA presets,
which take much longer). Each step's output, exit code and time go to OUT_DIR/gpu_check.json and
OUT_DIR/gpu_check.md (rewritten after every step), next to the benchmark JSON / markdown files.
`--dry-run` prints the plan and runs nothing. Without CUDA the command stops with exit code 2
and says so. Exit code 1 when a step fails or runs out of time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

STEPS = ("tests-compiled", "ops", "layers-fp32", "layers-bf16")
K = 1024
OPS_GRID = ["--H", "1024", "--N", "64", "256", "--L", str(K), str(4 * K), str(16 * K), str(64 * K),
            "--providers", "triton", "torch", "plain", "--budget", "0.2", "--repeats", "10"]
LAYER_GRID = ["--layer-B", "16", "--layer-H", "1024", "--layer-N", "64", "--layer-L", str(K), str(4 * K),
              str(16 * K), "--budget", "0.2", "--repeats", "10"]
TIMEOUTS = {"tests-compiled": 200, "ops": 120, "layers-fp32": 60, "layers-bf16": 60}
TAIL = 4000


def plan(out_dir: Path, *, full: bool, steps: list[str]) -> list[dict]:
    """The steps to run: name, command (argv), extra environment, time limit in seconds."""
    py = sys.executable
    bench = [py, "-m", "experiments.bench", "--device", "cuda"]
    out = []
    for name in steps:
        env = {}
        if name == "tests-compiled":
            cmd = [py, "-m", "pytest", "tests/kernels", "-q", "-p", "no:cacheprovider",
                   f"--junitxml={out_dir / 'tests_compiled.xml'}"]
            env = {"SSMKIT_TEST_COMPILED": "1", "TRITON_INTERPRET": "0"}
        elif name == "ops":
            cmd = bench + ["--op"] + ([] if full else OPS_GRID)
        else:
            amp = "bf16" if name == "layers-bf16" else "none"
            cmd = bench + ["--layer", "--amp", amp] + ([] if full else LAYER_GRID)
        if name != "tests-compiled":
            stem = name.replace("-", "_")
            cmd += ["--json", str(out_dir / f"{stem}.json"), "--markdown", str(out_dir / f"{stem}.md")]
        out.append({"name": name, "cmd": cmd, "env": env, "timeout_s": None if full else TIMEOUTS[name]})
    return out


def run_step(step: dict, cwd: Path) -> dict:
    """Run one step; its exit code, PASS / FAIL / TIMEOUT, wall time and the tail of its output."""
    env = {**os.environ, **step["env"]}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(step["cmd"], cwd=cwd, env=env, capture_output=True, text=True, check=False,
                              timeout=step["timeout_s"])
        rc, text = proc.returncode, proc.stdout + proc.stderr
        status = "PASS" if rc == 0 else "FAIL"
    except subprocess.TimeoutExpired as e:
        rc, status = None, "TIMEOUT"
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (e.stdout, e.stderr))
    return {"name": step["name"], "command": " ".join(step["cmd"]), "env": step["env"], "timeout_s": step["timeout_s"],
            "status": status, "returncode": rc, "wall_s": round(time.perf_counter() - t0, 1), "output_tail": text[-TAIL:]}


def _summary_line(result: dict) -> str:
    lines = [x for x in result["output_tail"].splitlines() if x.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) < 200 else last[:200] + "..."


def markdown(header: dict, results: list[dict], out_dir: Path) -> str:
    out = [f"# GPU check: {header['device_name']}", "",
           f"torch {header['torch']}, triton {header['triton']}, commit {header['commit']}, {header['date']}",
           f"Command: `{header['command']}`", "", "| step | status | time (s) | last line |", "|---|---|---|---|"]
    out += [f"| {r['name']} | {r['status']} | {r['wall_s']} | {_summary_line(r).replace('|', '/')} |" for r in results]
    for r in results:
        md = out_dir / f"{r['name'].replace('-', '_')}.md"
        if md.exists():
            out += ["", f"## {r['name']}", "", md.read_text()]
    return "\n".join(out) + "\n"


def write(out_dir: Path, header: dict, results: list[dict]) -> None:
    (out_dir / "gpu_check.json").write_text(json.dumps({"header": header, "steps": results}, indent=1))
    (out_dir / "gpu_check.md").write_text(markdown(header, results, out_dir))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check",
                                description=__doc__.split("\n\n")[0] + " See the module docstring for the steps.")
    p.add_argument("out_dir", help="folder for gpu_check.json / .md and the benchmark outputs (created)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (commands, time limits) and exit")
    p.add_argument("--full", action="store_true", help="the benchmark runner's full CUDA presets, no time limits")
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS), help="steps to run, in order")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    out_dir = Path(args.out_dir).resolve()
    steps = plan(out_dir, full=args.full, steps=args.steps)
    if args.dry_run:
        total = sum(s["timeout_s"] or 0 for s in steps)
        for s in steps:
            env = " ".join(f"{k}={v}" for k, v in s["env"].items())
            limit = "no limit" if s["timeout_s"] is None else f"limit {s['timeout_s']} s"
            print(f"{s['name']} ({limit}): {env + ' ' if env else ''}{' '.join(s['cmd'])}")
        print(f"total time limit: {total} s" if not args.full else "total: no time limit (--full)")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("experiments.gpu_check: no CUDA device is available (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, CUDA build {torch.version.cuda}): this check needs an NVIDIA GPU",
              file=sys.stderr)
        return 2
    from experiments.bench.timing import env_header
    out_dir.mkdir(parents=True, exist_ok=True)
    header = env_header("cuda")
    header["command"] = "python -m experiments.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv)
    root = Path(__file__).resolve().parent.parent
    results = []
    for step in steps:
        print(f"[gpu_check] {step['name']} ...", flush=True)
        results.append(run_step(step, root))
        r = results[-1]
        print(f"[gpu_check] {r['name']}: {r['status']} in {r['wall_s']} s: {_summary_line(r)}", flush=True)
        write(out_dir, header, results)
    print(f"[gpu_check] wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}")
    return 0 if all(r["status"] == "PASS" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
