"""Timing, memory and environment helpers: the one measurement module of the benchmark runner (see
BENCHMARKS.md) and the LRA cost script (`experiments.lra.cost`).

- CUDA: device events around each call after a warm-up; peak memory from `max_memory_allocated`.
- CPU: `time.perf_counter` around each call after a warm-up; peak memory is the growth of
  `ru_maxrss` in a FRESH process running one case (`run_isolated` -> `experiments.bench.child`).
- Repeats adapt to a per-case time budget so slow cases (the materializing formula at large L)
  still finish: the first timed call decides how many more fit, never fewer than one in total.
- Layers with a floor (the S4 layers' irreducible Linear + FFT work) time it in the same loop,
  alternating with the layer (`time_interleaved`), and report the ratio; on the CPU also in process
  CPU time. CPU memory is then measured over one more call with `exact_heap_accounting` on.
- Peak resident memory added by a stretch of code: `RssPeak` (reset the kernel's peak mark, read it
  back; `ru_maxrss` growth where the reset is not allowed).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def env_header(device: str) -> dict:
    """Device, library versions, git commit and date: the header line of every report."""
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
    else:
        name = (f"cpu {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                f"{torch.get_num_threads()} threads")
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"device": device, "device_name": name, "torch": torch.__version__, "triton": triton_version,
            "commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "command": "python -m experiments.bench " + " ".join(sys.argv[1:])}


def git_commit() -> str:
    """Short hash of HEAD, with '+dirty' when the tree has uncommitted changes; 'unknown' outside git."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def summarize(times: list[float]) -> dict:
    """Median and p20-p80 spread (seconds) of repeated timings."""
    ts = sorted(times)
    q = (lambda p: ts[min(len(ts) - 1, max(0, round(p * (len(ts) - 1))))])
    return {"median_s": statistics.median(ts), "p20_s": q(0.2), "p80_s": q(0.8), "min_s": ts[0], "max_s": ts[-1],
            "repeats": len(ts), "times_s": times}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], object], *, device: str, repeats: int, budget_s: float, warmup: int = 1) -> dict:
    """Warm up, then time up to `repeats` calls, as many as fit in `budget_s` (at least one)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = [_time_once(fn, device)]
    extra = min(repeats - 1, int(budget_s / max(times[0], 1e-9)) - 1)
    for _ in range(max(0, extra)):
        times.append(_time_once(fn, device))
    return summarize(times)


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak CUDA memory allocated by one call of `fn`, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_interleaved(call: Callable[[], object], floor: Callable[[], object], *, device: str, repeats: int,
                     budget_s: float) -> dict:
    """Time `call` (already warmed up) and `floor` alternately, so both see the same machine load.

    Returns `call`'s summary plus `floor_*` (the floor's median and raw times), `x_floor` (median
    call / median floor) and, on the CPU, the same for process CPU time (`cpu_*`), which a busy
    machine inflates less than wall time (single-threaded it excludes time spent waiting for a core).
    """
    floor()
    _sync(device)
    wall, fwall, cpu, fcpu = [], [], [], []
    for i in range(max(1, repeats)):
        for fn, w, c in ((call, wall, cpu), (floor, fwall, fcpu)):
            c0 = time.process_time()
            w.append(_time_once(fn, device))
            c.append(time.process_time() - c0)
        if i == 0:
            repeats = min(repeats, max(1, int(budget_s / max(wall[0] + fwall[0], 1e-9))))
        if len(wall) >= repeats:
            break
    out = summarize(wall)
    out.update(floor_median_s=statistics.median(fwall), floor_times_s=fwall,
               x_floor=statistics.median(wall) / statistics.median(fwall))
    if device == "cpu":
        out.update(cpu_median_s=statistics.median(cpu), cpu_times_s=cpu, floor_cpu_median_s=statistics.median(fcpu),
                   floor_cpu_times_s=fcpu, x_floor_cpu=statistics.median(cpu) / statistics.median(fcpu),
                   loadavg=list(os.getloadavg()))
    return out


def time_case(res: dict, call: Callable[[], object], *, device: str, case: dict,
              floor: Callable[[], object] | None = None) -> dict:
    """Time `call` (already run once: that was the warm-up) into `res`; on CUDA add its peak memory.
    With `floor`, the floor is timed in the same loop, call and floor alternating (`time_interleaved`).

    Returns `res` with status OK, or a copy with status OOM / FAILED and the reason.
    """
    try:
        if floor is None:
            res.update(time_fn(call, device=device, repeats=case["repeats"], budget_s=case["budget_s"], warmup=0))
        else:
            res.update(time_interleaved(call, floor, device=device, repeats=case["repeats"],
                                        budget_s=case["budget_s"]))
        if device == "cuda":
            res["mem_bytes"] = cuda_peak_bytes(call)
    except torch.cuda.OutOfMemoryError:
        return {**res, "status": "OOM", "reason": "CUDA out of memory"}
    except Exception as e:
        return {**res, "status": "FAILED", "reason": f"timing raised {type(e).__name__}: {str(e)[:200]}"}
    return {**res, "status": "OK"}


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0). Without it, a
    transient peak during the imports would hide a smaller case's peak. False when unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_kib("VmHWM") <= _proc_status_kib("VmRSS") + 1024
    except OSError:
        return False


def rss_now_bytes() -> int:
    return _proc_status_kib("VmRSS") * 1024


def rss_peak_bytes() -> int:
    return _proc_status_kib("VmHWM") * 1024


class RssPeak:
    """Peak resident memory added since construction: VmHWM minus VmRSS after resetting the peak
    mark where Linux allows it (`reset_peak_rss`), else the growth of `ru_maxrss` (which misses a
    peak smaller than an earlier one). `method` says which was used."""

    def __init__(self):
        self.exact = reset_peak_rss()
        self.base = rss_now_bytes() if self.exact else max_rss_bytes()
        self.method = "VmHWM - VmRSS after reset" if self.exact else "ru_maxrss growth"

    def added(self) -> int:
        return max((rss_peak_bytes() if self.exact else max_rss_bytes()) - self.base, 0)


def exact_heap_accounting() -> bool:
    """Make RSS follow live memory from here on (glibc only): hand free heap pages back to the OS
    (`malloc_trim`) and serve every allocation of 64 KiB or more by its own mapping, unmapped when
    freed (`mallopt(M_MMAP_THRESHOLD)`). Without this, buffers freed by earlier calls stay resident
    and a later call that reuses them shows no RSS growth for them. Slows allocation: call it only
    after the timed calls. False where glibc is not found."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_mmap_threshold = -3
        ok = libc.mallopt(m_mmap_threshold, 64 * 1024) == 1
        libc.malloc_trim(0)
        return ok
    except (OSError, AttributeError):
        return False


def run_isolated(case: dict, *, timeout_s: float, env: dict | None = None) -> dict:
    """Run one case in a fresh Python process (`python -m experiments.bench.child`) and return its
    result; a crash, an out-of-memory kill or a timeout comes back as a FAILED/TIMEOUT result."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "experiments.bench.child", json.dumps(case)]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {"status": "TIMEOUT", "reason": f"fresh process exceeded {timeout_s:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    if proc.returncode == -9:  # the kernel's OOM killer sends SIGKILL
        return {"status": "OOM", "reason": "fresh process was killed (SIGKILL): out of memory"}
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"status": "FAILED", "reason": f"fresh process died (exit {proc.returncode}): {tail[:300]}"}
