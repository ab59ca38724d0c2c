"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 without register spills and
within the shared memory a block may use (no GPU needed; see `ptxas_check.py`).

On a GPU a spill is local-memory traffic, usually in the innermost loop; a block over the
shared-memory limit does not launch. The default test compiles the first autotune config of each
kernel for sm_90 (about 30 s on 2 busy cores); `--run-slow` compiles every kernel, every autotune
config and every launcher case for both architectures (112 compiles: about 4 minutes on 2 shared
cores, 10 under heavy load).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# The kernels that must be in the report: the operators' modules declare them (`ptxas_cases`), so
# a module that stopped declaring one, or failed to import, would otherwise shrink the check.
EXISTING = ("_vandermonde_fwd_kernel", "_vandermonde_bwd_kernel", "_cauchy_fwd_kernel", "_cauchy_bwd_vw_kernel",
            "_cauchy_bwd_z_kernel", "_selective_scan_fwd_kernel", "_selective_scan_bwd_kernel",
            "_scan_fwd_kernel", "_scan_bwd_state_kernel", "_scan_bwd_chunk_kernel")


def _compile_report(*args: str) -> list[dict]:
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    res = subprocess.run([sys.executable, "-m", "tests.kernels.ptxas_check", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)
    if res.returncode == 3:
        pytest.skip("this Triton version has a different ahead-of-time compile API")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    planned, rows = lines[0], lines[1:]
    # Every planned compile reported, and every kernel module of kernels/ took part.
    assert len(rows) == planned["planned"], (len(rows), planned)
    assert {r["kernel"] for r in rows} == set(planned["kernels"])
    assert set(EXISTING) <= set(planned["kernels"]), sorted(set(EXISTING) - set(planned["kernels"]))
    return rows


def _problems(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        what = {k: v for k, v in r.items() if k not in ("regs", "stack", "spill_stores", "spill_loads", "shared",
                                                        "shared_limit", "seconds")}
        if r["spill_stores"] or r["spill_loads"]:
            out.append(f"{what}: {r['spill_stores']} bytes spill stores, {r['spill_loads']} bytes spill loads "
                       f"({r['regs']} registers)")
        if r["shared"] > r["shared_limit"]:
            out.append(f"{what}: {r['shared']} bytes of shared memory > {r['shared_limit']}")
    return out


def test_problem_detection():
    # Guards the tests below: a spill or too much shared memory is reported.
    ok = {"kernel": "k", "arch": 90, "regs": 128, "stack": 32, "spill_stores": 0, "spill_loads": 0,
          "shared": 1024, "shared_limit": 2048}
    assert _problems([ok]) == []
    assert len(_problems([{**ok, "spill_loads": 4}, {**ok, "shared": 4096}])) == 2


def test_first_configs_compile_for_sm90_without_spills():
    rows = _compile_report("--arch", "90", "--first")
    assert not _problems(rows), "\n".join(_problems(rows))


@pytest.mark.slow
def test_every_kernel_and_config_compiles_for_sm80_and_sm90_without_spills():
    rows = _compile_report("--arch", "90", "80")
    # At least the Vandermonde and Cauchy compiles: 2 archs x (2 x 2 + 3 x 2, (8 + 7 + 8) x 2) = 112.
    assert sum(r["kernel"].startswith(("_vandermonde", "_cauchy")) for r in rows) == 112
    assert not _problems(rows), "\n".join(_problems(rows))
