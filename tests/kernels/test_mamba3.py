"""Mamba-3 (SISO): chunked == sequential, step == sequential, the full-sequence form, the LTI limit.

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
    mamba3_ref,
    mamba3_step,
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
