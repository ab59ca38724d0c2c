"""The Triton kernels of the selective scan (`kernels/selective_scan/triton_selective_scan.py`) through
the public function with backend="triton": against the sequential definition run in float64
(forward, last state and every input gradient), float32 within the error budget, packed documents,
every output element written (poisoned buffers), determinism.

Under the interpreter the programs run one by one, token by token, so the shapes are tiny: the
chunk length is lowered (`reference.CHUNK`) to reach several chunks, ragged last chunks and
sequences shorter than a chunk with a few tokens.
"""
from __future__ import annotations

import pytest
import torch

import kernels._triton
import kernels.selective_scan
import kernels.selective_scan.reference as reference
from kernels.selective_scan import selective_scan, selective_scan_ref
from tests.kernels.test_selective_scan import NAMES, make_inputs, run
from tests.utils import assert_close, assert_within_budget

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def scan(backend, softplus=True, seq_idx=None):
    """fn(**inputs) -> (y, last state): the definition ("ref") or the public function on `backend`."""
    def fn(**kw):
        if backend == "ref":
            return selective_scan_ref(**kw, delta_softplus=softplus, return_last_state=True, seq_idx=seq_idx)
        return selective_scan(**kw, delta_softplus=softplus, return_last_state=True, backend=backend, seq_idx=seq_idx)
    return fn


def on_device(inputs):
    return {k: None if v is None else v.to(DEVICE) for k, v in inputs.items()}


def check_float64(inputs, name, softplus=True, seq_idx=None):
    """backend="triton" in float64 == the definition in float64: y, last state, every gradient."""
    batch, dim, L = inputs["u"].shape
    N = inputs["A"].shape[1]
    g_y, g_last = torch.randn(batch, dim, L, dtype=torch.float64), torch.randn(batch, dim, N, dtype=torch.float64)
    truth = run(scan("ref", softplus, seq_idx), inputs, g_y, g_last)
    seq = None if seq_idx is None else seq_idx.to(DEVICE)
    fast = run(scan("triton", softplus, seq), on_device(inputs), g_y.to(DEVICE), g_last.to(DEVICE))
    assert_close(fast[0].cpu(), truth[0], name=f"{name} y")
    assert_close(fast[1].cpu(), truth[1], name=f"{name} last state")
    assert set(fast[2]) == set(truth[2])
    for k in truth[2]:
        assert_close(fast[2][k].cpu(), truth[2][k], name=f"{name} grad {k}")
    return fast


@pytest.mark.parametrize("L", [1, 6, 13])
@pytest.mark.parametrize("N", [1, 16])
def test_matches_definition(L, N, monkeypatch):
    # CHUNK = 4: L = 1 is shorter than a chunk, 6 ends in a ragged chunk, 13 spans four chunks.
    monkeypatch.setattr(reference, "CHUNK", 4)
    check_float64(make_inputs(1, 4, N, L, groups=2), f"L={L} N={N}")


@pytest.mark.parametrize("opts", [dict(with_d=False, with_z=False, with_bias=False, with_state=False),
                                  dict(invariant=True), dict(invariant=True, with_z=False, with_bias=False),
                                  dict(dim=3, groups=1), dict(softplus=False)],
                         ids=["bare", "invariant", "invariant-bare", "ragged-channels", "no-softplus"])
def test_optional_inputs(opts, monkeypatch):
    # N = 3 pads the state tile; dim = 3 pads the channel block (BLOCK_D = 4).
    monkeypatch.setattr(reference, "CHUNK", 4)
    opts = dict(opts)
    dim, softplus = opts.pop("dim", 4), opts.pop("softplus", True)
    x = make_inputs(2 if opts.get("invariant") else 1, dim, 3, 7, **{"groups": 2, **opts})
    if not softplus:                                                # dt = delta + bias, kept positive
        x["delta"], x["delta_bias"] = 0.1 * x["delta"].abs(), torch.full_like(x["delta_bias"], 0.05)
    check_float64(x, str(opts), softplus=softplus)


@pytest.mark.parametrize("N, dim", [(128, 3), (16, 12)])
def test_several_channel_blocks(N, dim, monkeypatch):
    # One group of channels split over programs: N = 128 gives BLOCK_D = 1 (three blocks), N = 16
    # gives BLOCK_D = 8 (two blocks, the second one ragged). The launcher adds the blocks' per-token
    # B and C gradients.
    monkeypatch.setattr(reference, "CHUNK", 2)
    check_float64(make_inputs(1, dim, N, 3), f"N={N} dim={dim}")


@pytest.mark.parametrize("invariant", [False, True])
def test_packed_documents(invariant, monkeypatch):
    # Resets at a chunk border (t = 4) and inside a chunk (t = 6) in row 0; row 1 has one at t = 1.
    monkeypatch.setattr(reference, "CHUNK", 4)
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 2, 2, 2], [3, 4, 4, 4, 4, 4, 4, 4, 4]])
    check_float64(make_inputs(2, 2, 3, 9, invariant=invariant), f"packed invariant={invariant}", seq_idx=seq_idx)


def test_float32_within_budget(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 8)
    x64 = make_inputs(1, 4, 16, 20, groups=2)
    x32 = {k: None if v is None else v.float() for k, v in x64.items()}
    g_y, g_last = torch.randn(1, 4, 20, dtype=torch.float64), torch.randn(1, 4, 16, dtype=torch.float64)
    truth, plain = run(scan("ref"), x64, g_y, g_last), run(scan("ref"), x32, g_y, g_last)
    fast = run(scan("triton"), on_device(x32), g_y.to(DEVICE), g_last.to(DEVICE))
    assert fast[0].dtype == torch.float32 and fast[1].dtype == torch.float32
    assert_within_budget(fast[0].cpu(), plain[0], truth[0], name="y")
    assert_within_budget(fast[1].cpu(), plain[1], truth[1], name="last state")
    for k in truth[2]:
        assert fast[2][k].dtype == torch.float32
        assert_within_budget(fast[2][k].cpu(), plain[2][k], truth[2][k], name=f"grad {k}")


def test_poison_hook_fills_nan(monkeypatch):
    # Guards the next test: with the hook on, unwritten output really is NaN.
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    assert torch.isnan(kernels._triton.empty_output((3,), dtype=torch.float64, device="cpu")).all()


@pytest.mark.parametrize("invariant", [False, True])
def test_triton_writes_every_element(invariant, monkeypatch):
    # Ragged channel block (dim 3 of BLOCK_D 4), padded states (N = 3), a ragged last chunk.
    monkeypatch.setattr(kernels._triton, "POISON_OUTPUTS", True)
    monkeypatch.setattr(reference, "CHUNK", 4)
    check_float64(make_inputs(1, 3, 3, 6, invariant=invariant), f"poisoned invariant={invariant}")


def test_backward_is_deterministic(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 2)
    x = on_device(make_inputs(1, 3, 128, 3))
    g_y, g_last = torch.randn(1, 3, 3, device=DEVICE), torch.randn(1, 3, 128, device=DEVICE)
    a, b = (run(scan("triton"), x, g_y.double(), g_last.double())[2] for _ in range(2))
    for k in NAMES:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("N", [16, 128])
def test_default_chunk_longer_sequence(N):
    # The shipped CHUNK (64): two chunks, the second ragged; two batch rows, two groups.
    check_float64(make_inputs(2, 4, N, 70, groups=2), f"L=70 N={N}")


@pytest.mark.slow
def test_gradcheck(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 2)
    x = on_device(make_inputs(1, 2, 2, 3, groups=2))
    leaves = tuple(x[k].requires_grad_() for k in NAMES)

    def f(*args):
        return selective_scan(*args[:7], delta_bias=args[7], initial_state=args[8], delta_softplus=True,
                              return_last_state=True, backend="triton")

    assert torch.autograd.gradcheck(f, leaves)


def test_half_precision_inputs():
    # bfloat16 u and z are computed in float32; y and every gradient come back in its input's dtype.
    x = on_device(make_inputs(1, 2, 4, 5, dtype=torch.float32))
    x["u"], x["z"] = x["u"].to(torch.bfloat16), x["z"].to(torch.bfloat16)
    g_y, g_last = torch.randn(1, 2, 5, device=DEVICE), torch.randn(1, 2, 4, device=DEVICE)
    fast, ref = run(scan("triton"), x, g_y, g_last), run(scan("torch"), x, g_y, g_last)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32
    assert_close(fast[0], ref[0], name="y")
    assert_close(fast[1], ref[1], rtol=1e-5, atol=1e-5, name="last state")
    for k in ref[2]:
        assert fast[2][k].dtype == x[k].dtype, k
        tol = 1e-4 if x[k].dtype == torch.float32 else None        # bfloat16: its own row of TOL
        assert_close(fast[2][k], ref[2][k], rtol=tol, atol=tol, name=f"grad {k}")


@pytest.mark.slow
def test_opcheck(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK", 2)
    x = on_device(make_inputs(1, 2, 3, 3, dtype=torch.float32))
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], x["initial_state"], True,
            "triton")
    torch.library.opcheck(torch.ops.ssmkit.selective_scan.default, args)


def test_auto_runs_the_chunked_path_on_cpu_even_under_the_interpreter(monkeypatch):
    # The interpreter is on in the test suite; "auto" must still pick the chunked path on the CPU
    # (model tests would crawl through the token-by-token kernel), and "triton" must interpret.
    from kernels._triton import choose_backend
    t = torch.zeros(2)
    assert choose_backend("auto", t) == "triton"                     # the operators' default rule
    assert choose_backend("auto", t, auto_interprets=False) == "torch"
    assert choose_backend("triton", t, auto_interprets=False) == "triton"
    import kernels.selective_scan.op as op
    seen = []
    real = op.selective_scan_op
    monkeypatch.setattr(kernels.selective_scan, "selective_scan_op", lambda *a: seen.append(a[10]) or real(*a))
    b, d, n, L = 1, 2, 3, 4
    u, delta = torch.randn(b, d, L), torch.randn(b, d, L)
    A, B, C = -torch.rand(d, n), torch.randn(b, n, L), torch.randn(b, n, L)
    kernels.selective_scan.selective_scan(u, delta, A, B, C)
    kernels.selective_scan.selective_scan(u, delta, A, B, C, backend="triton")
    assert seen == ["torch", "triton"], seen
