"""Mamba-3: chunked == sequential (SISO and MIMO), step == sequential, the full-sequence form, the LTI limit.

The math: docs/mamba3.md. Ground truth is float64. Two independent computations check the step
form itself: the full-sequence (attention-like) form written here with complex rotations, and the
time-invariant limit, a diagonal SSM with poles `A + i theta` through the S4D filter path.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from kernels.mamba3 import (
    Mamba3State,
    default_state,
    mamba3_chunked,
    mamba3_mimo_chunked,
    mamba3_mimo_ref,
    mamba3_mimo_step,
    mamba3_ref,
    mamba3_scan,
    mamba3_step,
    rotate_pairs,
)
from ssm.discretize import exp_trapezoid_diag
from ssm.fftconv import fftconv
from ssm.filters import diag_filter
from tests.utils import assert_close

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")
NAMES = ("x", "dt", "A", "B", "C", "lam", "theta", "D", "z", "B_bias", "C_bias")


def inputs(b=2, L=17, H=4, G=2, P=3, N=6, S=2, *, seed=0, dtype=F64, state=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    def u(*shape):
        return torch.rand(*shape, generator=g, dtype=dtype)

    kw = {"x": r(b, L, H, P), "dt": u(b, L, H) * 0.6 + 0.02, "A": -u(b, L, H) * 2 - 0.05,
          "B": r(b, L, G, N), "C": r(b, L, G, N), "lam": u(b, L, H), "theta": r(b, L, H, S) * 2,
          "D": r(H), "z": r(b, L, H, P), "B_bias": r(H, N), "C_bias": r(H, N)}
    init = Mamba3State(u(b, H, S) * 2 * math.pi, r(b, H, P, N), r(b, H, N), r(b, H, P)) if state else None
    return kw, init


def _grads(fn, kw, init, seed=1):
    """Output, final state and the gradients of a fixed random loss w.r.t. every input."""
    kw = {k: v.clone().requires_grad_() for k, v in kw.items()}
    init = None if init is None else Mamba3State(*(s.clone().requires_grad_() for s in init))
    y, st = fn(**kw, initial_state=init)
    g = torch.Generator().manual_seed(seed)
    # the angle enters the loss through cos/sin only: its value mod 2 pi is what both paths share
    outs = [y, st.ssm, st.B_prev, st.x_prev, torch.cos(st.angle)]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    leaves = list(kw.values()) + ([] if init is None else list(init))
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("L,Q", [(1, 8), (17, 8), (17, 1), (40, 16), (12, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_matches_sequential_fwd_and_grads(L, Q, with_state):
    kw, init = inputs(L=L, state=with_state)
    want, want_g = _grads(mamba3_ref, kw, init)
    got, got_g = _grads(lambda **a: mamba3_chunked(**a, chunk_size=Q), kw, init)
    for name, a, e in zip(("y", "ssm", "B_prev", "x_prev", "cos angle"), got, want):
        assert_close(a, e, name=name)
    names = NAMES + (("angle0", "ssm0", "B_prev0", "x_prev0") if with_state else ())
    for name, a, e in zip(names, got_g, want_g):
        assert_close(a, e, name=f"d{name}")


def test_chunked_gradcheck():
    kw, init = inputs(b=1, L=5, H=2, G=1, P=2, N=4, S=1, seed=3)
    keys = list(kw)

    def fn(*args):
        y, st = mamba3_chunked(**dict(zip(keys, args[:len(keys)])), initial_state=Mamba3State(*args[len(keys):]),
                               chunk_size=2)
        return y, st.ssm

    args = tuple(t.clone().requires_grad_() for t in (*kw.values(), *init))
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("split", [1, 9])
def test_state_handoff_step_and_chunked(split):
    """Decoding token by token from a prefix's state, or chunking the rest, reproduces one pass."""
    kw, init = inputs(L=14, seed=4)
    full, full_state = mamba3_ref(**kw, initial_state=init)
    seq = {k: v for k, v in kw.items() if v.dim() >= 3}
    head = {**kw, **{k: v[:, :split] for k, v in seq.items()}}
    tail = {**kw, **{k: v[:, split:] for k, v in seq.items()}}
    _, state = mamba3_ref(**head, initial_state=init)
    ys, st = [], state
    for t in range(14 - split):
        y, st = mamba3_step(**{k: (v[:, t] if k in seq else v) for k, v in tail.items()}, state=st)
        ys.append(y)
    assert_close(torch.stack(ys, 1), full[:, split:], name="step after prefix")
    _, cstate = mamba3_chunked(**head, initial_state=init, chunk_size=4)
    y2, st2 = mamba3_chunked(**tail, initial_state=cstate, chunk_size=4)
    assert_close(y2, full[:, split:], name="chunked after prefix")
    for a, e, name in zip((st.ssm, st.B_prev, st2.ssm, st2.B_prev), (full_state.ssm, full_state.B_prev) * 2,
                          ("step ssm", "step B_prev", "chunked ssm", "chunked B_prev")):
        assert_close(a, e, name=name)


def _as_complex_pairs(v, S):
    """(..., N) -> complex pairs (..., S) and the unrotated rest (..., N - 2S)."""
    return torch.complex(v[..., 0:2 * S:2], v[..., 1:2 * S:2]), v[..., 2 * S:]


def full_sequence_form(x, dt, A, B, C, lam, theta, D, z, B_bias, C_bias):
    """y_t = sum_{s<=t} (Ct_t . Bt_s) exp(sum_{s<r<=t} dt_r A_r) w_s x_s
             - ((C_t + b_C) . (B_t + b_B)) (1 - lam_{t+1}) dt_{t+1} x_t + D x_t,
    w_s = lam_s dt_s + (1 - lam_{s+1}) dt_{s+1}, dt_L = 0; rotations as complex phases."""
    L, H = x.shape[1:3]
    S = theta.shape[-1]
    Bh = B.repeat_interleave(H // B.shape[2], dim=2) + B_bias  # (b, L, H, N)
    Ch = C.repeat_interleave(H // C.shape[2], dim=2) + C_bias
    phase = torch.polar(torch.ones_like(theta), torch.cumsum(theta * dt[..., None], dim=1))  # (b, L, H, S)
    bp, brest = _as_complex_pairs(Bh, S)
    cp, crest = _as_complex_pairs(Ch, S)
    score = (torch.einsum("bthk,bshk->bhts", (cp * phase).conj(), bp * phase).real
             + torch.einsum("bthk,bshk->bhts", crest, brest))  # (b, H, t, s)
    logdec = torch.cumsum(dt * A, dim=1).transpose(1, 2)  # (b, H, L)
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    decay = torch.exp(torch.where(causal, logdec[..., :, None] - logdec[..., None, :], -math.inf))
    nxt = F.pad(((1 - lam) * dt)[:, 1:], (0, 0, 0, 1))  # (b, L, H): (1 - lam_{t+1}) dt_{t+1}
    w = lam * dt + nxt  # (b, L, H)
    y = torch.einsum("bhts,bsh,bshp->bthp", score * decay, w, x)
    y = y - ((Ch * Bh).sum(-1) * nxt)[..., None] * x + D[:, None] * x
    return y * F.silu(z)


def test_full_sequence_form_equals_step_form():
    kw, _ = inputs(L=21, seed=5)
    y, _ = mamba3_ref(**kw)
    assert_close(y, full_sequence_form(**kw), name="full-sequence form")


@pytest.mark.parametrize("lam", [0.3, 0.5, 1.0])
def test_time_invariant_limit_is_a_diagonal_ssm(lam):
    """Constant dt, A, theta, lam, B, C; no biases, D, z: y = K * x with the filter of the diagonal
    SSM with poles A + i theta_k (one per rotated pair) and A (each unrotated dim), discretized by
    the exponential-trapezoidal rule: K_l = C Ab^l w_new B + [l >= 1] C Ab^(l-1) w_prev B."""
    L, N, S, dt, A = 64, 7, 2, 0.3, -0.4
    g = torch.Generator().manual_seed(6)
    theta = torch.tensor([0.9, -2.1], dtype=F64)
    Bv, Cv = torch.randn(N, generator=g, dtype=F64), torch.randn(N, generator=g, dtype=F64)
    x = torch.randn(1, L, 1, 1, generator=g, dtype=F64)
    one = torch.ones(1, L, 1, dtype=F64)
    y, _ = mamba3_ref(x, dt * one, A * one, Bv.expand(1, L, 1, N), Cv.expand(1, L, 1, N), lam * one,
                      theta.expand(1, L, 1, S))
    bp, brest = _as_complex_pairs(Bv, S)
    cp, crest = _as_complex_pairs(Cv, S)
    # Ct_t . Bt_s = Re(c conj(b) e^{i theta dt (t - s)}) per pair: the mode c conj(b) with pole A + i theta
    poles = torch.cat([torch.complex(torch.full((S,), A, dtype=F64), theta),
                       torch.full((N - 2 * S,), A, dtype=F64).to(torch.complex128)])  # (N2,)
    vb = torch.cat([bp.conj(), brest.to(torch.complex128)])  # (N2,)
    vc = torch.cat([cp, crest.to(torch.complex128)]) / 2  # (N2,): diag_filter takes 2 Re
    _, w_new, w_prev = exp_trapezoid_diag(poles, dt, lam)
    log_z = (dt * poles)[None]  # (1, N2)
    K_new = diag_filter(vc[None, None], log_z, (w_new * vb)[None], L, backend="torch")  # (1, 1, L)
    K_prev = diag_filter(vc[None, None], log_z, (w_prev * vb)[None], L, backend="torch")
    K = (K_new + F.pad(K_prev, (1, 0))[..., :L])[0, 0]  # (L,)
    u = x[0, :, 0, 0]  # (L,)
    want = torch.stack([(K[:t + 1].flip(0) * u[:t + 1]).sum() for t in range(L)])  # float64 causal conv
    assert_close(y[0, :, 0, 0], want, rtol=1e-10, atol=1e-10, name="LTI limit (float64)")
    n = 2 * L  # zero-padded FFT convolution in float64 (ssm.fftconv itself convolves in float32)
    y_fft = torch.fft.irfft(torch.fft.rfft(u, n) * torch.fft.rfft(K, n), n)[:L]
    assert_close(y[0, :, 0, 0], y_fft, rtol=1e-10, atol=1e-10, name="LTI limit via float64 FFT convolution")
    y32 = fftconv(u.float(), K.float())  # the library's convolution runs in float32
    assert_close(y32, want, rtol=1e-4, atol=1e-5, dtype=torch.float32, name="LTI limit via fftconv")


def test_default_state_is_zero_history():
    kw, _ = inputs(L=6, seed=7)
    b, _, H, P = kw["x"].shape
    zero = default_state(b, H, P, kw["B"].shape[-1], kw["theta"].shape[-1], dtype=F64)
    assert_close(mamba3_ref(**kw, initial_state=zero)[0], mamba3_ref(**kw)[0], name="y")


def test_bad_inputs():
    kw, init = inputs(L=5)
    with pytest.raises(ValueError, match="dt must have shape"):
        mamba3_ref(**{**kw, "dt": kw["dt"][..., :1]})
    with pytest.raises(ValueError, match="B and C"):
        mamba3_chunked(**{**kw, "B": torch.zeros(2, 5, 3, 6, dtype=F64)})
    with pytest.raises(ValueError, match="theta"):
        mamba3_chunked(**{**kw, "theta": torch.zeros(2, 5, 4, 4, dtype=F64)})
    with pytest.raises(ValueError, match="state"):
        mamba3_chunked(**kw, initial_state=Mamba3State(*init[:3], init[3][..., :1]))
    with pytest.raises(ValueError, match="chunk_size"):
        mamba3_chunked(**kw, chunk_size=0)


MIMO_NAMES = ("x", "dt", "A", "B", "C", "lam", "theta", "mimo_x", "mimo_z", "mimo_o", "D", "z", "B_bias", "C_bias")


def mimo_inputs(b=2, L=13, H=4, G=2, P=3, N=6, S=2, r=3, *, seed=0, state=True):
    """SISO inputs plus r copies of B, C and their biases, and the up/down projections."""
    kw, init = inputs(b, L, H, G, P, N, S, seed=seed, state=state)
    g = torch.Generator().manual_seed(seed + 100)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    kw.update(B=rn(b, L, r, G, N), C=rn(b, L, r, G, N), B_bias=rn(H, r, N), C_bias=rn(H, r, N),
              mimo_x=rn(H, r, P), mimo_z=rn(H, r, P), mimo_o=rn(H, r, P))
    if init is not None:
        init = init._replace(B_prev=rn(b, H, r, N))
    return {k: kw[k] for k in MIMO_NAMES}, init


@pytest.mark.parametrize("L,Q,r", [(1, 4, 2), (13, 4, 3), (9, 16, 1), (21, 8, 2)])
@pytest.mark.parametrize("with_state", [False, True])
def test_mimo_chunked_matches_sequential_fwd_and_grads(L, Q, r, with_state):
    kw, init = mimo_inputs(L=L, r=r, state=with_state, seed=L + r)
    want, want_g = _grads(mamba3_mimo_ref, kw, init)
    got, got_g = _grads(lambda **a: mamba3_mimo_chunked(**a, chunk_size=Q), kw, init)
    for name, a, e in zip(("y", "ssm", "B_prev", "x_prev", "cos angle"), got, want):
        assert_close(a, e, name=name)
    names = MIMO_NAMES + (("angle0", "ssm0", "B_prev0", "x_prev0") if with_state else ())
    for name, a, e in zip(names, got_g, want_g):
        assert_close(a, e, name=f"d{name}")


def test_mimo_per_copy_outputs_and_handoff():
    """Without mimo_o the r outputs come back; a prefix's state continued by steps equals one pass."""
    kw, init = mimo_inputs(L=10, seed=8)
    kw = {**kw, "mimo_o": None}
    full, full_state = mamba3_mimo_ref(**kw, initial_state=init)
    assert full.shape == (2, 10, 4, 3, 3)
    assert_close(mamba3_mimo_chunked(**kw, initial_state=init, chunk_size=3)[0], full, name="per-copy y")
    seq = {"x", "dt", "A", "B", "C", "lam", "theta", "z"}
    _, st = mamba3_mimo_chunked(**{k: v[:, :4] if k in seq else v for k, v in kw.items()}, initial_state=init,
                                chunk_size=3)
    ys = []
    for t in range(4, 10):
        y, st = mamba3_mimo_step(**{k: v[:, t] if k in seq else v for k, v in kw.items()}, state=st)
        ys.append(y)
    assert_close(torch.stack(ys, 1), full[:, 4:], name="steps after a chunked prefix")
    assert_close(st.ssm, full_state.ssm, name="final ssm")


def test_mimo_rank_one_is_siso():
    """r = 1 with unit projections and interleaved pairs is the SISO scan."""
    kw, init = inputs(L=11, seed=9)
    one = torch.ones(4, 1, 3, dtype=F64)
    mk = {**kw, "B": kw["B"][:, :, None], "C": kw["C"][:, :, None], "B_bias": kw["B_bias"][:, None],
          "C_bias": kw["C_bias"][:, None], "mimo_x": one, "mimo_z": one, "mimo_o": one}
    y, st = mamba3_mimo_chunked(**mk, initial_state=init._replace(B_prev=init.B_prev[:, :, None]), chunk_size=4,
                                half=False)
    want, want_st = mamba3_ref(**kw, initial_state=init)
    assert_close(y, want, name="y")
    assert_close(st.B_prev[:, :, 0], want_st.B_prev, name="B_prev")


def test_half_split_rotation_is_a_permutation_of_interleaved():
    g = torch.Generator().manual_seed(10)
    v, phi = torch.randn(5, 8, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])  # interleaved position 2i <- i, 2i+1 <- 4+i
    assert_close(rotate_pairs(v, phi, half=True)[:, perm], rotate_pairs(v[:, perm], phi), name="rotation")


def test_scan_dispatch_and_checks():
    kw, init = inputs(L=7, seed=11)
    y, _ = mamba3_scan(**kw, initial_state=init, chunk_size=3, return_final_state=True)
    assert_close(y, mamba3_ref(**kw, initial_state=init)[0], name="mamba3_scan SISO")
    mk, minit = mimo_inputs(L=7, seed=12)
    assert_close(mamba3_scan(**mk, initial_state=minit, chunk_size=3), mamba3_mimo_ref(**mk, initial_state=minit)[0],
                 name="mamba3_scan MIMO")
    y32 = mamba3_scan(**{k: v.float() for k, v in kw.items()}, chunk_size=3)
    assert y32.dtype == torch.float32
    with pytest.raises(ValueError, match="x must have shape"):
        mamba3_scan(**{**kw, "x": kw["x"][0]})
    with pytest.raises(ValueError, match="B must have shape"):
        mamba3_scan(**{**kw, "B": kw["B"][0]})
    with pytest.raises(ValueError, match="needs mimo_x"):
        mamba3_scan(**{**mk, "mimo_x": None})
    with pytest.raises(ValueError, match="D must have shape"):
        mamba3_scan(**{**kw, "D": kw["D"][:2]})
    with pytest.raises(ValueError, match="mimo_o must have shape"):
        mamba3_scan(**{**mk, "mimo_o": mk["mimo_o"][:, :1]})
    with pytest.raises(TypeError, match="theta must be a torch.Tensor"):
        mamba3_scan(**{**kw, "theta": 1.0})
    with pytest.raises(ValueError, match="backend must be one of"):
        mamba3_scan(**kw, backend="cuda")


@pytest.mark.parametrize("mimo", [False, True])
def test_packed_documents_equal_separate_runs(mimo):
    """seq_idx: chunked == sequential (values and gradients), and each document == a run of its own."""
    kw, init = mimo_inputs(L=19, seed=13) if mimo else inputs(L=19, seed=13)
    ref, chunked = (mamba3_mimo_ref, mamba3_mimo_chunked) if mimo else (mamba3_ref, mamba3_chunked)
    seq = torch.tensor([[0] * 4 + [1] * 8 + [5] * 7, [2] * 19])
    want, want_g = _grads(lambda **a: ref(**a, seq_idx=seq), kw, init)
    got, got_g = _grads(lambda **a: chunked(**a, seq_idx=seq, chunk_size=6), kw, init)
    names = ("y", "ssm", "B_prev", "x_prev", "cos angle") + tuple(f"d{k}" for k in kw) + ("dangle0", "dssm0",
                                                                                      "dB_prev0", "dx_prev0")
    assert len(names) == len(got) + len(got_g)
    for name, a, e in zip(names, got + list(got_g), want + list(want_g)):
        assert_close(a, e, name=name)
    seqd = {k for k, v in kw.items() if v is not None and v.dim() >= 3 and v.shape[:2] == (2, 19)}
    y, st = ref(**kw, initial_state=init, seq_idx=seq)
    for lo, hi, state in ((0, 4, Mamba3State(*(s[:1] for s in init))), (4, 12, None), (12, 19, None)):
        alone, alone_st = ref(**{k: v[:1, lo:hi] if k in seqd else v for k, v in kw.items()}, initial_state=state)
        assert_close(y[:1, lo:hi], alone, name=f"document [{lo}, {hi})")
    assert_close(st.ssm[:1], alone_st.ssm, name="final state = the last document's")



@pytest.mark.slow  # dynamo tracing of the unrolled chunk loop: over a minute on a shared CPU
def test_scan_traces_under_torch_compile():
    """mamba3_scan traced whole (fullgraph) by torch.compile equals eager, values and gradients."""
    mk, minit = mimo_inputs(b=1, L=9, seed=15)
    want, want_g = _grads(lambda **a: mamba3_scan(**a, chunk_size=4, return_final_state=True), mk, minit)
    compiled = torch.compile(lambda **a: mamba3_scan(**a, chunk_size=4, return_final_state=True),
                             backend="aot_eager", fullgraph=True)
    got, got_g = _grads(compiled, mk, minit)
    for i, (a, e) in enumerate(zip(got + list(got_g), want + list(want_g))):
        assert_close(a, e, name=f"compiled output/gradient {i}")
