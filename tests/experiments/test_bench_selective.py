"""Selective rows of the benchmark runner: op checks and floors, layer peers and floors, case building."""
import importlib.util

import pytest

from experiments.bench import layers, peers, selective
from experiments.bench.__main__ import PRESETS, build_cases, parse_args

COMMON = dict(device="cpu", repeats=1, budget_s=0.0, allow_interpreter=False, mem_cap_bytes=2**30)


@pytest.mark.parametrize("op,providers", [("selective_scan", ["torch", "plain", "mambapy"]), ("ssd", ["torch", "plain"])])
def test_op_rows_pass_their_check_and_carry_floor_and_counts(op, providers):
    for provider in providers:
        if provider == "mambapy" and importlib.util.find_spec("mambapy") is None:
            continue
        res = selective.run_selective_op_case(dict(kind="op", op=op, provider=provider, H=64, N=4, L=40,
                                                   mode="fwdbwd", **COMMON))
        assert res["status"] == "OK", res
        names = ("out",) + tuple(f"grad_{k}" for k in selective.op_inputs(op, 64, 4, 1, device="cpu"))
        assert set(res["check"]) == set(names)
        assert all(err <= budget for err, budget in res["check"].values())
        assert res["x_floor"] > 0 and res["floor_median_s"] > 0
        assert (res["flops"], res["bytes"]) == selective.op_counts(op, 64, 4, 40, "fwdbwd")


def test_op_counts_follow_the_stated_formulas():
    H, N, L = 512, 16, 4096
    assert selective.op_counts("selective_scan", H, N, L, "fwd") == (7.0 * H * N * L, 4.0 * (4 * H * L + 2 * N * L
                                                                                          + H * N + 2 * H))
    fwd, both = selective.op_counts("ssd", H, 64, L, "fwd"), selective.op_counts("ssd", H, 64, L, "fwdbwd")
    assert both == (2 * fwd[0], 2 * fwd[1]) and fwd[0] == 3.0 * H * L + 2.0 * 64 * L


def test_a_wrong_provider_fails_the_check(monkeypatch):
    real = selective.op_provider

    def off_by_a_bit(op, name, device="cpu"):
        fn = real(op, name, device)
        return lambda i: fn(i) * 1.001
    monkeypatch.setattr(selective, "op_provider", off_by_a_bit)
    res = selective.run_selective_op_case(dict(kind="op", op="ssd", provider="torch", H=64, N=4, L=20,
                                               mode="fwd", **COMMON))
    assert res["status"] == "FAILED" and "out: error" in res["reason"]


def test_unknown_provider_is_skipped_with_a_reason():
    res = selective.run_selective_op_case(dict(kind="op", op="ssd", provider="mambapy", H=64, N=4, L=20,
                                               mode="fwd", **COMMON))
    assert res["status"] == "SKIPPED" and "mamba_ssm" in res["reason"]


@pytest.mark.parametrize("layer", ["mamba", "mamba2", "mamba-mambapy", "mamba2-hf"])
def test_layer_rows_time_against_their_floor(layer):
    if layer in peers.PEERS and peers.missing(layer):
        pytest.skip(peers.missing(layer))
    res = layers.run_layer_case(dict(kind="layer", layer=layer, B=1, H=32, N=8, L=48, mode="fwdbwd", **COMMON))
    assert res["status"] == "OK", res
    assert res["x_floor"] > 0 and res["floor_median_s"] > 0


def test_a_peer_that_differs_from_ssmkit_is_reported():
    m, why = selective.build_layer("mamba", 32, 8, device="cpu")
    assert why is None and selective.check_peer(m, "mamba", 32, 8, "cpu") is None
    if importlib.util.find_spec("mambapy") is None:
        pytest.skip("mambapy not installed")
    peer, _ = selective.build_layer("mamba-mambapy", 32, 8, device="cpu")
    assert selective.check_peer(peer, "mamba-mambapy", 32, 8, "cpu") is None
    computed = peer.forward
    peer.forward = lambda x: computed(x) * 1.01   # the check reloads the weights: break the computation
    assert "peer differs from ssmkit" in selective.check_peer(peer, "mamba-mambapy", 32, 8, "cpu")


def test_cases_use_the_selective_shapes_and_only_when_named():
    args = parse_args(["--smoke"])
    shapes = {k: getattr(args, k, None) or v for k, v in PRESETS["smoke"].items()}
    names = {c.get("op") or c.get("layer") for c in build_cases(args, shapes)}
    assert not names & (set(selective.OPS) | set(selective.LAYERS))
    args = parse_args(["--op", "selective_scan", "ssd", "--layer", "mamba", "mamba2-hf", "--modes", "fwdbwd"])
    shapes = {k: getattr(args, k, None) or v for k, v in PRESETS["cpu"].items()}
    cases = build_cases(args, shapes)
    ops = {(c["op"], c["provider"], c["H"], c["N"]) for c in cases if c["kind"] == "op" and c["L"] == 4096}
    assert ("selective_scan", "mambapy", 512, 16) in ops and ("ssd", "torch", 512, 64) in ops
    assert not {c["provider"] for c in cases if c["kind"] == "op"} & {"compile", "pykeops"}
    lay = {(c["layer"], c["H"], c["N"]) for c in cases if c["kind"] == "layer"}
    assert lay == {("mamba", 256, 16), ("mamba2-hf", 256, 64)}


def test_isolated_cases_get_the_thread_count(monkeypatch):
    from experiments.bench import __main__ as runner
    from experiments.bench import timing
    seen = {}

    def fake(case, *, timeout_s, env=None):
        seen["env"] = env
        return {"status": "OK"}
    monkeypatch.setattr(timing, "run_isolated", fake)
    args = parse_args(["--layer", "mamba", "--threads", "1"])
    runner._run_case(dict(kind="layer", layer="mamba", B=1, H=32, N=8, L=16, mode="fwd"), args, "cpu",
                     isolate=True, skip=None)
    assert seen["env"]["OMP_NUM_THREADS"] == "1"


def test_mamba3_op_rows_check_and_time_against_their_floor():
    # The SISO Mamba-3 scan: checked against the float64 definition (every gradient), then timed
    # next to its floor; the floor's counts add the rotation's work to the SSD floor's.
    res = selective.run_selective_op_case(dict(kind="op", op="mamba3", provider="torch", H=64, N=4, L=20,
                                               mode="fwdbwd", **COMMON))
    assert res["status"] == "OK", res
    assert set(res["check"]) == {"out", *(f"grad_{n}" for n in selective._grad_names("mamba3"))}
    assert res["x_floor"] > 0
    ssd = selective.op_counts("ssd", 128, 8, 32, "fwd")
    m3 = selective.op_counts("mamba3", 128, 8, 32, "fwd")
    assert m3[0] == ssd[0] + 6.0 * 2 * 8 * 32


def test_the_triton_provider_is_skipped_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    res = selective.run_selective_op_case(dict(kind="op", op="ssd", provider="triton", H=64, N=4, L=20,
                                               mode="fwd", **COMMON))
    assert res["status"] == "SKIPPED" and "SSMKIT_DISABLE_TRITON" in res["reason"]

