"""Tests of the Mamba-2 scan (`kernels.ssd.ssd`): the chunked path against the sequential float64 definition.

The truth is `ssd_ref` (a loop over time steps, autograd for its gradients) run in float64.
"""
from __future__ import annotations

import pytest
import torch

import kernels.ssd.chunked as chunked_path
from kernels.ssd import mamba_chunk_scan_combined, ssd, ssd_ref
from tests.utils import assert_close, assert_within_budget

GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def make_inputs(b, L, H, P, G, N, *, dtype=torch.float64, D_shape="h", z=True, dt_bias=True, init=True):
    """Mamba-2-like inputs: dt_raw around softplus^-1 of 0.01..0.5, A in [-4, -0.5]."""
    t = {
        "x": torch.randn(b, L, H, P),
        "dt": torch.rand(b, L, H) * 3 - 4,
        "A": -(torch.rand(H) * 3.5 + 0.5),
        "B": torch.randn(b, L, G, N),
        "C": torch.randn(b, L, G, N),
        "D": None if D_shape is None else torch.randn(H) if D_shape == "h" else torch.randn(H, P),
        "z": torch.randn(b, L, H, P) if z else None,
        "dt_bias": torch.rand(H) + 0.5 if dt_bias else None,
        "initial_states": torch.randn(b, H, P, N) if init else None,
    }
    return {k: None if v is None else v.to(dtype) for k, v in t.items()}


def run(fn, inputs, *, grads=True, **kwargs):
    """fn's (y, final) and the gradients of a random projection of both w.r.t. every given input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
    full = {k: leaves.get(k) for k in inputs}
    y, final = fn(full, **kwargs)
    if not grads:
        return y.detach(), final.detach(), {}
    g = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gs = torch.randn(final.shape, generator=g, dtype=torch.float64).to(final.dtype)
    out = torch.autograd.grad((y * gy).sum() + (final * gs).sum(), list(leaves.values()))
    return y.detach(), final.detach(), dict(zip(leaves, out))


def chunked(t, *, chunk_size, **kw):
    return ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
               initial_states=t["initial_states"], return_final_states=True, backend="torch", **kw)


def sequential(t, **kw):
    return ssd_ref(t["x"], t["dt"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                   initial_states=t["initial_states"], **kw)


def compare(fast, truth, name, check=assert_close):
    check(fast[0], truth[0], name=f"{name} y")
    check(fast[1], truth[1], name=f"{name} final state")
    assert fast[2].keys() == truth[2].keys()
    for k in truth[2]:
        check(fast[2][k], truth[2][k], name=f"{name} grad {k}")


@pytest.mark.parametrize("b,L,H,P,G,N,Q", [
    (1, 1, 2, 3, 1, 4, 8),       # one token
    (2, 17, 4, 3, 2, 5, 8),      # odd L, ragged last chunk, two groups
    (1, 5, 2, 2, 1, 16, 16),     # L < chunk_size
    (2, 32, 2, 4, 1, 1, 8),      # N = 1, L a multiple of the chunk
    (1, 9, 2, 2, 2, 128, 4),     # N = 128 (tiny otherwise), one head per group
])
def test_chunked_matches_sequential(b, L, H, P, G, N, Q):
    t = make_inputs(b, L, H, P, G, N)
    kw = dict(dt_softplus=True)
    compare(run(chunked, t, chunk_size=Q, **kw), run(sequential, t, **kw), f"L={L} N={N} G={G} Q={Q}")


@pytest.mark.parametrize("options", [
    dict(D_shape=None, z=False, dt_bias=False, init=False),
    dict(D_shape="hp", z=True, dt_bias=False, init=True),
    dict(D_shape="h", z=False, dt_bias=True, init=False),
])
@pytest.mark.parametrize("dt_softplus,dt_limit", [(False, (0.0, float("inf"))), (True, (0.05, 0.3))])
def test_optional_inputs_and_dt_limit(options, dt_softplus, dt_limit):
    t = make_inputs(2, 19, 4, 3, 2, 6, **options)
    if not dt_softplus:
        t["dt"] = t["dt"].abs() / 8   # positive steps, so the default clamp at 0 changes nothing
    kw = dict(dt_softplus=dt_softplus, dt_limit=dt_limit)
    compare(run(chunked, t, chunk_size=8, **kw), run(sequential, t, **kw), f"{options} {kw}")


def test_negative_dt_is_clamped_to_zero():
    t = make_inputs(1, 6, 2, 2, 1, 3, z=False, D_shape=None, dt_bias=False)
    compare(run(chunked, t, chunk_size=4), run(sequential, t), "raw dt < 0")
    zero_dt = dict(t, dt=torch.zeros_like(t["dt"]))
    assert_close(run(chunked, t, chunk_size=4, grads=False)[0], run(chunked, zero_dt, chunk_size=4, grads=False)[0])


@pytest.mark.parametrize("budget", [1, 3000])
def test_several_blocks(budget, monkeypatch):
    # A tiny element budget gives one chunk per block, so the sweeps across blocks are exercised.
    monkeypatch.setattr(chunked_path, "BLOCK_ELEMENTS", budget)
    monkeypatch.setattr(chunked_path, "MIN_ROWS", 1)
    t = make_inputs(2, 45, 2, 3, 1, 4)
    seq_idx = torch.tensor([[0] * 20 + [1] * 25, [3] * 7 + [0] * 38])
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    compare(run(chunked, t, chunk_size=6, **kw), run(sequential, t, **kw), f"budget={budget}")


def test_backward_without_saved_block_states_sweeps_forward(monkeypatch):
    """The backward recomputes the block-start states itself when the forward's are not given:
    same gradients as with them (and those are checked against the definition above)."""
    monkeypatch.setattr(chunked_path, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(chunked_path, "MIN_ROWS", 1)
    t = make_inputs(2, 21, 2, 3, 1, 4)
    x, B, C, S0 = t["x"], t["B"], t["C"], t["initial_states"]
    dt = torch.rand(2, 21, 2, dtype=torch.float64) * 0.5
    doc = torch.tensor([[0] * 9 + [1] * 12, [0] * 21])
    y, final, starts = chunked_path.ssd_chunked_fwd(x, dt, t["A"], B, C, S0, doc, 4)
    assert starts.shape[0] == chunked_path.saved_blocks(2, 21, 2, 3, 4, 4) == 6
    dy, dfinal = torch.randn_like(y), torch.randn_like(final)
    with_saved = chunked_path.ssd_chunked_bwd(dy, dfinal, x, dt, t["A"], B, C, S0, doc, 4, starts)
    swept = chunked_path.ssd_chunked_bwd(dy, dfinal, x, dt, t["A"], B, C, S0, doc, 4)
    for name, a, e in zip(("x", "dt", "A", "B", "C", "initial state"), with_saved, swept):
        assert_close(a, e, name=name)


def packed_documents(lengths, H=2, P=3, G=1, N=4):
    t = make_inputs(1, sum(lengths), H, P, G, N)
    labels = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]   # (1, L)
    return t, labels


def test_seq_idx_matches_reference_with_resets():
    t, seq_idx = packed_documents([1, 2, 7, 1, 5])
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    compare(run(chunked, t, chunk_size=4, **kw), run(sequential, t, **kw), "packed")


def test_seq_idx_packed_equals_separate_runs():
    lengths = [1, 2, 7, 3]
    t, seq_idx = packed_documents(lengths)
    y, final, _ = run(chunked, t, chunk_size=4, grads=False, dt_softplus=True, seq_idx=seq_idx)
    start = 0
    for i, n in enumerate(lengths):
        part = {k: (v[:, start:start + n] if v is not None and v.dim() >= 3 and k != "initial_states" else v)
                for k, v in t.items()}
        if i > 0:
            part["initial_states"] = None   # only the first document sees the initial state
        y_doc, final_doc, _ = run(chunked, part, chunk_size=4, grads=False, dt_softplus=True)
        assert_close(y[:, start:start + n], y_doc, name=f"document {i} (length {n})")
        start += n
    assert_close(final, final_doc, name="final state = last document's")


def test_label_that_comes_back_still_resets():
    t = make_inputs(1, 9, 2, 2, 1, 3)
    back = torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0, 0]])
    distinct = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    a = run(chunked, t, chunk_size=4, grads=False, seq_idx=back)
    b = run(chunked, t, chunk_size=4, grads=False, seq_idx=distinct)
    assert_close(a[0], b[0], name="y")


def test_step_by_step_equals_chunked():
    # The one-token recurrence S = exp(dt A) S + dt x B^T, y = S C + D x, fed its own state.
    t = make_inputs(2, 13, 4, 3, 2, 5)
    y, final, _ = run(chunked, t, chunk_size=4, grads=False, dt_softplus=True)
    S = t["initial_states"]
    for i in range(13):
        step = {k: (v[:, i:i + 1] if v is not None and v.dim() >= 3 and k != "initial_states" else v)
                for k, v in t.items()}
        y_i, S = sequential(dict(step, initial_states=S), dt_softplus=True)
        assert_close(y[:, i:i + 1], y_i, name=f"token {i}")
    assert_close(final, S, name="final state")


@pytest.mark.parametrize("N,Q", [(16, 16), (64, 64)])
def test_float32_within_budget(N, Q):
    t = make_inputs(1, 72, 4, 8, 2, N)
    kw = dict(dt_softplus=True)
    truth = run(sequential, t, **kw)
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    fast, plain = run(chunked, t32, chunk_size=Q, **kw), run(sequential, t32, **kw)
    assert fast[0].dtype == torch.float32
    assert_within_budget(fast[0], plain[0], truth[0], name="y")
    assert_within_budget(fast[1], plain[1], truth[1], name="final state")
    for k in truth[2]:
        assert_within_budget(fast[2][k], plain[2][k], truth[2][k], name=f"grad {k}")


def test_float32_within_budget_under_steep_decay():
    """Decays that sum to hundreds inside one chunk: seg = cs_i - cs_j must keep an error relative
    to itself (cs formed in float32 alone would put errors of ulp(|cs|) ~ 3e-5 into every factor)."""
    t = make_inputs(1, 64, 2, 4, 1, 8)
    t["A"] = -(torch.rand(2, dtype=torch.float64) * 8 + 8)      # A in [-16, -8]
    t["dt"] = torch.rand(1, 64, 2, dtype=torch.float64) * 2 - 3   # dt = softplus(raw + bias) ~ 0.1..0.9
    truth = run(sequential, t, dt_softplus=True)
    t32 = {k: None if v is None else v.float() for k, v in t.items()}
    fast, plain = run(chunked, t32, chunk_size=64, dt_softplus=True), run(sequential, t32, dt_softplus=True)
    assert_within_budget(fast[0], plain[0], truth[0], name="y")
    for k in truth[2]:
        assert_within_budget(fast[2][k], plain[2][k], truth[2][k], name=f"grad {k}")


def test_bfloat16_runs_in_float32():
    t = {k: None if v is None else v.float() for k, v in make_inputs(1, 10, 2, 4, 1, 8).items()}
    y, final = chunked({**t, "x": t["x"].bfloat16(), "z": t["z"].bfloat16()}, chunk_size=4)
    assert y.dtype == torch.bfloat16 and final.dtype == torch.float32
    ref = sequential({**t, "x": t["x"].bfloat16().float(), "z": t["z"].bfloat16().float()})[0]
    assert_close(y.float(), ref, rtol=2e-2, atol=2e-2, name="bf16 y")


def test_gradcheck():
    t = make_inputs(1, 6, 2, 2, 1, 2, D_shape="hp")
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]])
    names = [k for k in GRAD_NAMES if t[k] is not None]

    def fn(*args):
        full = dict(zip(names, args))
        y, final = ssd(full["x"], full["dt"], full["A"], full["B"], full["C"], 3, D=full["D"], z=full["z"],
                       dt_bias=full["dt_bias"], initial_states=full["initial_states"], seq_idx=seq_idx,
                       dt_softplus=True, return_final_states=True, backend="torch")
        return y, final

    args = [t[k].clone().requires_grad_() for k in names]
    assert torch.autograd.gradcheck(fn, args)


def test_alias_and_default_return():
    assert mamba_chunk_scan_combined is ssd
    t = make_inputs(1, 5, 2, 2, 1, 3)
    y = ssd(t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    assert isinstance(y, torch.Tensor) and y.shape == t["x"].shape


def test_backends_agree_and_auto_follows_the_environment(monkeypatch):
    # "auto" keeps CPU tensors on the chunked path, also under the interpreter; "triton" interprets.
    t = make_inputs(1, 5, 2, 2, 1, 3)
    args = (t["x"], t["dt"], t["A"], t["B"], t["C"], 4)
    chunked = ssd(*args, backend="torch")
    assert_close(ssd(*args, backend="triton"), chunked, name="triton vs torch")
    assert torch.equal(ssd(*args), chunked)
    monkeypatch.setenv("SSMKIT_DISABLE_TRITON", "1")
    assert torch.equal(ssd(*args), chunked)
    with pytest.raises(RuntimeError, match="backend='triton'"):
        ssd(*args, backend="triton")


def test_torch_compile_fullgraph():
    t = make_inputs(1, 6, 2, 2, 1, 3, dtype=torch.float32)

    def loss(x, B):
        y, final = ssd(x, t["dt"], t["A"], B, t["C"], 4, D=t["D"], z=t["z"], dt_bias=t["dt_bias"],
                       initial_states=t["initial_states"], dt_softplus=True, return_final_states=True,
                       backend="torch")
        return y.square().sum() + final.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for fn_name, fn in (("eager", loss), ("compiled", compiled)):
        x, B = t["x"].clone().requires_grad_(), t["B"].clone().requires_grad_()
        value = fn(x, B)
        grads = torch.autograd.grad(value, (x, B))
        if fn_name == "eager":
            expected = (value.detach(), *grads)
        else:
            for what, a, e in zip(("loss", "grad x", "grad B"), (value.detach(), *grads), expected):
                assert_close(a, e, name=f"compiled {what}")


def test_opcheck():
    t = make_inputs(1, 6, 2, 2, 1, 3, dtype=torch.float32)
    doc = torch.tensor([[0, 0, 1, 1, 1, 2]])
    torch.library.opcheck(torch.ops.ssmkit.ssd.default,
                          (t["x"], t["dt"].abs(), t["A"], t["B"], t["C"], t["initial_states"], doc, 4, "torch"))


def test_bad_input_raises():
    t = make_inputs(1, 5, 4, 2, 2, 3)
    x, dt, A, B, C = t["x"], t["dt"], t["A"], t["B"], t["C"]
    cases = [
        (TypeError, "x must be a torch.Tensor", lambda: ssd(x.tolist(), dt, A, B, C, 4)),
        (TypeError, "dt must be a floating tensor", lambda: ssd(x, dt.long(), A, B, C, 4)),
        (TypeError, "seq_idx must be an integer", lambda: ssd(x, dt, A, B, C, 4, seq_idx=dt[..., 0])),
        (ValueError, r"x must have shape \(batch, seqlen", lambda: ssd(x[0], dt, A, B, C, 4)),
        (ValueError, r"dt must have shape \(1, 5, 4\), got \(1, 5, 3\)", lambda: ssd(x, dt[..., :3], A, B, C, 4)),
        (ValueError, r"A must have shape \(4,\)", lambda: ssd(x, dt, A[:2], B, C, 4)),
        (ValueError, "ngroups must divide nheads", lambda: ssd(x, dt, A, B[:, :, :1].expand(1, 5, 3, 3), C, 4)),
        (ValueError, r"C must have shape \(1, 5, 2, 3\)", lambda: ssd(x, dt, A, B, C[..., :2], 4)),
        (ValueError, r"D must have shape \(4,\) or \(4, 2\)", lambda: ssd(x, dt, A, B, C, 4, D=A[:3])),
        (ValueError, r"z must have shape", lambda: ssd(x, dt, A, B, C, 4, z=x[:, :4])),
        (ValueError, r"initial_states must have shape \(1, 4, 2, 3\)",
         lambda: ssd(x, dt, A, B, C, 4, initial_states=torch.zeros(1, 4, 3, 2, dtype=x.dtype))),
        (ValueError, r"seq_idx must have shape \(1, 5\)", lambda: ssd(x, dt, A, B, C, 4, seq_idx=torch.zeros(1, 4).long())),
        (ValueError, "chunk_size must be an int >= 1", lambda: ssd(x, dt, A, B, C, 0)),
        (ValueError, "dt_limit must be a pair", lambda: ssd(x, dt, A, B, C, 4, dt_limit=(1.0, 0.5))),
        (ValueError, "cu_seqlens", lambda: ssd(x, dt, A, B, C, 4, cu_seqlens=torch.tensor([0, 5]))),
        (ValueError, "backend must be one of", lambda: ssd(x, dt, A, B, C, 4, backend="cuda")),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_chunked_path_caps_its_chunk(monkeypatch):
    # The chunked path runs chunks of at most MAX_CHUNK tokens whatever the caller asks (here 4
    # instead of 16, with a ragged last chunk and a document boundary inside a chunk).
    monkeypatch.setattr(chunked_path, "MAX_CHUNK", 4)
    t = make_inputs(1, 23, 2, 3, 1, 4)
    seq_idx = torch.tensor([[0] * 10 + [1] * 13])
    kw = dict(dt_softplus=True, seq_idx=seq_idx)
    seen = []
    real = chunked_path._canonical
    monkeypatch.setattr(chunked_path, "_canonical", lambda *a: seen.append(a[-1]) or real(*a))
    compare(run(chunked, t, chunk_size=16, **kw), run(sequential, t, **kw), "capped")
    assert seen and set(seen) == {4}, seen
