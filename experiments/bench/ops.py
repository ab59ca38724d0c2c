"""Operator benchmark cases: inputs, providers, the correctness guard, FLOP/byte counts.

The ops (`docs/operators.md`), at width H, real state size N (N/2 complex terms), length L:
- vandermonde: S4D's filter. v, x complex (H, N/2) with x = dt*Lambda; out real (H, L).
- cauchy: S4's four numerators sharing poles (k00 k01 k10 k11, `docs/s4.md`): v (4, H, N/2),
  w = dt*Lambda (H, N/2), z = 2(1-omega)/(1+omega) at the L/2+1 non-negative frequencies, symmetric.
- fftconv: causal y = irfft(rfft(u, 2L) rfft(K, 2L))[:L], u (1, H, L), K (H, L) real.
Providers: `triton`, `torch` (the library's reference backend: chunked, never O(H N L)), `plain`
(the materializing PyTorch formula most public code uses; for fftconv the direct O(L^2)
convolution), `compile` (torch.compile of `plain`), `pykeops` (vandermonde and cauchy as KeOps
reductions in real arithmetic; only when pykeops is importable).
Every provider is checked against complex128 ground truth on the first rows before it is timed.
The selective ops (`selective_scan`, `ssd`, providers torch / plain / mambapy) have their own
inputs, check and floor in `experiments.bench.selective`; `run_op_case` hands them over.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Callable

import torch

from experiments.bench.selective import (
    OPS as SELECTIVE_OPS,  # own inputs, check and floor there
)

OPS = ("vandermonde", "cauchy", "fftconv")
PROVIDERS = ("triton", "torch", "plain", "compile", "pykeops", "mambapy")
N_NUMERATORS = 4  # S4's Woodbury form needs k00, k01, k10, k11 (docs/operators.md)
CHECK_ROWS = 2
BUDGET_FACTOR = 2.0  # a provider may be 2x as wrong as the plain formula at its precision, + atol
BUDGET_ATOL = 1e-6   # relative to max |truth| (float32 / complex64 inputs)

# Per op: which inputs get gradients, and the dimension that indexes channels (rows).
ROW_DIM = {"vandermonde": {"v": 0, "x": 0}, "cauchy": {"v": 1, "w": 0}, "fftconv": {"u": 1, "k": 0}}
OUT_ROW_DIM = {"vandermonde": 0, "cauchy": 1, "fftconv": 1}


class Unavailable(Exception):
    """A provider that cannot run here; the message is the reason printed in the table."""


def make_inputs(op: str, H: int, N: int, L: int, *, device: str, seed: int = 0) -> dict:
    """Realistic inputs: S4D-Lin poles Lambda_n = -1/2 + i pi n, log-uniform dt in [1e-3, 1e-1]."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if N < 2 or N % 2:
        raise ValueError(f"N (real state size) must be even and >= 2, got {N}")
    g = torch.Generator().manual_seed(seed)
    n = torch.arange(N // 2, dtype=torch.float64)
    lam = torch.complex(torch.full_like(n, -0.5), math.pi * n)                          # (N/2,)
    dt = torch.exp(torch.empty(H, 1, dtype=torch.float64).uniform_(math.log(1e-3), math.log(1e-1), generator=g))
    cplx = (lambda *s: torch.randn(*s, dtype=torch.complex128, generator=g))
    if op == "vandermonde":
        t = {"v": cplx(H, N // 2), "x": dt * lam}                                       # (H, N/2)
        out = {k: a.to(torch.complex64).to(device) for k, a in t.items()}
        out["L"] = L
        return out
    if op == "cauchy":
        M = L // 2 + 1
        omega = torch.exp(-2j * math.pi * torch.arange(M, dtype=torch.float64) / L)    # (M,)
        z = 2 * (1 - omega) / (1 + omega)                                                # (M,)
        t = {"v": cplx(N_NUMERATORS, H, N // 2), "z": z, "w": dt * lam}
        return {k: a.to(torch.complex64).to(device) for k, a in t.items()}
    u = torch.randn(1, H, L, generator=g)                                               # (1, H, L)
    decay = torch.exp(-torch.arange(L, dtype=torch.float64) / (0.1 * L))
    k = torch.randn(H, L, generator=g, dtype=torch.float64) * decay                    # (H, L)
    return {"u": u.to(device), "k": k.float().to(device)}


# ----- formulas -------------------------------------------------------------------------------

def _vandermonde_plain(v, x, L):
    from kernels.vandermonde.reference import vandermonde_ref
    return vandermonde_ref(v, x, L)                                                     # (H, L)


def _cauchy_plain(v, z, w):
    from kernels.cauchy.reference import cauchy_ref
    return cauchy_ref(v, z, w, True)                                                    # (4, H, M)


def _fft_formula(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., : u.shape[-1]]  # (1, H, L)


def _direct_conv(u, k):
    """y_l = sum_{m<=l} k_m u_{l-m} as a grouped conv1d: O(H L^2), the naive formula."""
    H, L = k.shape
    y = torch.nn.functional.conv1d(torch.nn.functional.pad(u, (L - 1, 0)), k.flip(-1).unsqueeze(1), groups=H)
    return y                                                                            # (1, H, L)


def plain_call(op: str, inp: dict) -> torch.Tensor:
    if op == "vandermonde":
        return _vandermonde_plain(inp["v"], inp["x"], inp["L"])
    if op == "cauchy":
        return _cauchy_plain(inp["v"], inp["z"], inp["w"])
    return _direct_conv(inp["u"], inp["k"])


def truth_call(op: str, inp: dict) -> torch.Tensor:
    """Ground truth (inputs already complex128/float64): the plain sums, chunked so the check
    itself stays small at L = 64K (each output point is independent, so chunking is exact)."""
    if op == "vandermonde":
        L, T = inp["L"], 4096
        outs = [_vandermonde_plain(inp["v"] * torch.exp(inp["x"] * s), inp["x"], min(T, L - s)) for s in range(0, L, T)]
        return torch.cat(outs, dim=-1)                                                  # (r, L)
    if op == "cauchy":
        z, T = inp["z"], 4096
        return torch.cat([_cauchy_plain(inp["v"], z[s:s + T], inp["w"]) for s in range(0, z.shape[0], T)], dim=-1)
    return _fft_formula(inp["u"], inp["k"])                                             # (1, r, L)


def budget_call(op: str, inp: dict) -> torch.Tensor:
    """The plain formula at the provider's precision: the yardstick of the error budget."""
    return _fft_formula(inp["u"], inp["k"]) if op == "fftconv" else plain_call(op, inp)


# ----- providers --------------------------------------------------------------------------------

def provider(op: str, name: str, *, device: str, allow_interpreter: bool,
             compile_backend: str = "inductor") -> Callable[[dict], torch.Tensor]:
    """The callable `inputs -> output` of provider `name` for `op`, or raise Unavailable(reason).
    `compile_backend`: torch.compile backend of the `compile` provider ("aot_eager" in --smoke,
    which traces the same graphs without spending ~10 s per C++ compilation)."""
    if name not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")
    if name == "triton":
        return _triton_provider(op, device=device, allow_interpreter=allow_interpreter)
    if name == "torch":
        if op == "fftconv":
            from ssm.fftconv import fftconv
            return lambda inp: fftconv(inp["u"], inp["k"])
        return _kernels_call(op, "torch")
    if name == "plain":
        return lambda inp: plain_call(op, inp)
    if name == "compile":
        return _compiled(op, compile_backend)
    if name == "mambapy":
        raise Unavailable(f"mambapy has no {op} (it is a selective-scan peer)")
    return _pykeops_provider(op)


def _kernels_call(op: str, backend: str):
    import kernels
    if op == "vandermonde":
        return lambda inp: kernels.vandermonde_mult(inp["v"], inp["x"], inp["L"], backend=backend)
    return lambda inp: kernels.cauchy_mult(inp["v"], inp["z"], inp["w"], symmetric=True, backend=backend)


def _triton_provider(op: str, *, device: str, allow_interpreter: bool):
    if op == "fftconv":
        raise Unavailable("no Triton kernel for fftconv (it is torch.fft)")
    if device == "cpu" and not allow_interpreter:
        raise Unavailable("Triton on CPU is the interpreter: run only in --smoke")
    from kernels._triton import why_not
    reason = why_not(torch.empty(0, device=device))
    if reason is not None:
        raise Unavailable(reason)
    return _kernels_call(op, "triton")


_COMPILED: dict[tuple[str, str], Callable] = {}


def _compiled(op: str, backend: str):
    # dynamic=True: one compilation serves every L (recompiling per shape costs ~10 s each on CPU)
    if (op, backend) not in _COMPILED:
        fn = {"vandermonde": _vandermonde_plain, "cauchy": _cauchy_plain, "fftconv": _direct_conv}[op]
        _COMPILED[op, backend] = torch.compile(fn, dynamic=True, backend=backend)
    f = _COMPILED[op, backend]
    if op == "vandermonde":
        return lambda inp: f(inp["v"], inp["x"], inp["L"])
    if op == "cauchy":
        return lambda inp: f(inp["v"], inp["z"], inp["w"])
    return lambda inp: f(inp["u"], inp["k"])


def _pykeops_provider(op: str):
    if op == "fftconv":
        raise Unavailable("no KeOps formula for fftconv (it is torch.fft)")
    if importlib.util.find_spec("pykeops") is None:
        raise Unavailable("pykeops is not installed")
    return _keops_vandermonde if op == "vandermonde" else _keops_cauchy


def _lazy(t: torch.Tensor, shape):
    """A KeOps LazyTensor over a contiguous copy of t viewed as `shape` (batch, i, j, dim)."""
    from pykeops.torch import LazyTensor
    return LazyTensor(t.contiguous().view(*shape))


def _keops_vandermonde(inp: dict) -> torch.Tensor:
    """2 sum_n exp(a_n l) (Re v_n cos(b_n l) - Im v_n sin(b_n l)), x = a + ib, in real arithmetic
    (KeOps has no complex type); batch dim H, i-variable l, j-variable n."""
    v, x, L = inp["v"], inp["x"], inp["L"]
    H, Nc = v.shape
    l = _lazy(torch.arange(L, dtype=x.real.dtype, device=x.device), (1, L, 1, 1))       # i: (1, L, 1, 1)
    a, b, vr, vi = (_lazy(t, (H, 1, Nc, 1)) for t in (x.real, x.imag, v.real, v.imag))  # j: (H, 1, Nc, 1)
    phase = b * l
    return 2 * ((a * l).exp() * (vr * phase.cos() - vi * phase.sin())).sum(dim=2).view(H, L)  # (H, L)


def _keops_cauchy(inp: dict) -> torch.Tensor:
    """Symmetric Cauchy sum with the R numerators as a vector dimension: 1/(z - w) once per
    (j, n) pole, real and imaginary parts of all R outputs in one reduction."""
    v, z, w = inp["v"], inp["z"], inp["w"]
    R, H, Nc = v.shape
    M = z.shape[0]
    zr, zi = (_lazy(t, (1, M, 1, 1)) for t in (z.real, z.imag))                           # i: (1, M, 1, 1)
    wr, wi = (_lazy(t, (H, 1, Nc, 1)) for t in (w.real, w.imag))                          # j: (H, 1, Nc, 1)
    vr, vi = (_lazy(t.permute(1, 2, 0), (H, 1, Nc, R)) for t in (v.real, v.imag))        # j: (H, 1, Nc, R)
    dr = zr - wr
    re, im = 0, 0
    for sign in (1, -1):  # pole w, then conj(w) with numerator conj(v)
        di = zi - sign * wi
        den = dr * dr + di * di
        ir, ii = dr / den, -di / den
        re = re + vr * ir - sign * vi * ii
        im = im + vr * ii + sign * vi * ir
    out = re.concat(im).sum(dim=2)                                                          # (H, M, 2R)
    return torch.complex(out[..., :R], out[..., R:]).permute(2, 0, 1)                      # (R, H, M)


def plain_bytes(op: str, H: int, N: int, L: int) -> int:
    """Memory the plain formula materializes (complex64 (.., N/2, L)-sized buffers; autograd keeps
    about three of them), used to skip cases that cannot fit."""
    if op == "vandermonde":
        return 3 * H * (N // 2) * L * 8
    if op == "cauchy":
        return 3 * 2 * N_NUMERATORS * H * (N // 2) * (L // 2 + 1) * 8
    return 3 * H * L * 4  # conv1d works in place of an L x L matrix


# ----- FLOP and byte counts -------------------------------------------------------------------
# Documented formulas (BENCHMARKS.md repeats them). Nc = N/2 complex terms, complex64 = 8 bytes.
# A complex multiply-accumulate counts 8 real FLOPs; a complex reciprocal 8; a real FFT of size n
# 2.5 n log2 n. Bytes are the compulsory traffic: read every input once, write every output once.
#   vandermonde fwd: 8 H Nc L FLOPs (power-reuse form, one MAC per term); 16 H Nc + 4 H L bytes
#               bwd: 16 H Nc L FLOPs (grad_v, grad_x: one MAC each);    4 H L + 32 H Nc bytes
#   cauchy (R=4, M=L/2+1, symmetric: 2 poles per term)
#               fwd: 2 H Nc M (8 + 8R) FLOPs;  8 (R H Nc + H Nc + M) + 8 R H M bytes
#               bwd: 2 H Nc M (8 + 16R) FLOPs; 8 R H M + 8 (2 R H Nc + 2 H Nc + M) bytes
#   fftconv (n=2L) fwd: H (3 * 2.5 n log2 n + 6 (L+1)) FLOPs;  12 H L bytes
#               bwd: H (3 * 2.5 n log2 n + 12 (L+1)) FLOPs; 20 H L bytes

def counts(op: str, H: int, N: int, L: int, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of one call in `mode` ("fwd" or "fwdbwd"), per the formulas above."""
    Nc, R, M = N // 2, N_NUMERATORS, L // 2 + 1
    if op == "vandermonde":
        fwd = (8.0 * H * Nc * L, 16.0 * H * Nc + 4.0 * H * L)
        bwd = (16.0 * H * Nc * L, 4.0 * H * L + 32.0 * H * Nc)
    elif op == "cauchy":
        fwd = (2.0 * H * Nc * M * (8 + 8 * R), 8.0 * (R * H * Nc + H * Nc + M) + 8.0 * R * H * M)
        bwd = (2.0 * H * Nc * M * (8 + 16 * R), 8.0 * R * H * M + 8.0 * (2 * R * H * Nc + 2 * H * Nc + M))
    elif op == "fftconv":
        n = 2 * L
        fft = 2.5 * n * math.log2(n)
        fwd = (H * (3 * fft + 6.0 * (L + 1)), 12.0 * H * L)
        bwd = (H * (3 * fft + 12.0 * (L + 1)), 20.0 * H * L)
    else:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if mode == "fwd":
        return fwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


# Datasheet peaks (FP32 on CUDA cores, HBM bandwidth) for the floor; matched by device name, in
# order. Tensor-core (TF32) kernels can beat the FP32 arithmetic floor: a fraction > 1 says so.
PEAKS = (("H200", 67e12, 4.8e12), ("H100 PCIe", 51e12, 2.0e12), ("H100", 67e12, 3.35e12),
         ("A100", 19.5e12, 1.555e12))


def device_peaks(device_name: str) -> tuple[float, float] | None:
    for key, flops, bw in PEAKS:
        if key in device_name:
            return flops, bw
    return None


# ----- the correctness guard ------------------------------------------------------------------

def _rows(op: str, inp: dict, r: int, *, dtype_of=None, grads=()) -> dict:
    out = {}
    for k, a in inp.items():
        if torch.is_tensor(a):
            d = ROW_DIM[op].get(k)
            a = a.detach() if d is None else a.detach().narrow(d, 0, r)
            a = a.to(dtype_of(a.dtype)) if dtype_of else a.clone()
            out[k] = a.requires_grad_(k in grads)
        else:
            out[k] = a
    return out


def _upcast(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _grad(out: torch.Tensor, inp: dict, names, g: torch.Tensor) -> list:
    return list(torch.autograd.grad(out, [inp[k] for k in names], g.to(out.dtype))) if names else []


def check(op: str, fn: Callable[[dict], torch.Tensor], inputs: dict, mode: str, *, rows: int = CHECK_ROWS) -> dict:
    """Compare `fn` with complex128 ground truth on the first `rows` channels: forward, and in
    mode "fwdbwd" every input gradient. Budget: err <= 2 * err(plain formula at the same
    precision) + 1e-6 * max|truth|. Returns {"ok", "reason", "errors": {name: [err, budget]},
    "upstream": the upstream gradient used (like the output)}."""
    names = tuple(ROW_DIM[op]) if mode == "fwdbwd" else ()
    full = {k: (a.detach().requires_grad_(k in names) if torch.is_tensor(a) else a) for k, a in inputs.items()}
    out = fn(full)
    if not torch.is_tensor(out):
        return {"ok": False, "reason": f"provider returned {type(out).__name__}, not a tensor", "errors": {}}
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(out.shape, dtype=out.dtype, generator=gen).to(out.device)           # like out
    got = [out] + _grad(out, full, names, g)
    r = min(rows, out.shape[OUT_ROW_DIM[op]])
    got = [out.detach().narrow(OUT_ROW_DIM[op], 0, r)] + [
        x.detach().narrow(ROW_DIM[op][k], 0, r) for k, x in zip(names, got[1:])]
    g_rows = g.narrow(OUT_ROW_DIM[op], 0, r)
    t_inp = _rows(op, inputs, r, dtype_of=_upcast, grads=names)
    t_out = truth_call(op, t_inp)
    truth = [t_out] + _grad(t_out, t_inp, names, g_rows)
    p_inp = _rows(op, inputs, r, grads=names)
    p_out = budget_call(op, p_inp)
    plain = [p_out] + _grad(p_out, p_inp, names, g_rows)
    errors, bad = {}, []
    for name, a, t, p in zip(("out",) + tuple(f"grad_{k}" for k in names), got, truth, plain):
        if a.shape != t.shape:
            return {"ok": False, "reason": f"{name}: shape {tuple(a.shape)} != expected {tuple(t.shape)}", "errors": {}}
        t = t.detach().cpu()
        e_fast = (a.cpu().to(t.dtype) - t).abs().max().item()
        e_plain = (p.detach().cpu().to(t.dtype) - t).abs().max().item()
        budget = BUDGET_FACTOR * e_plain + BUDGET_ATOL * max(1.0, t.abs().max().item())
        errors[name] = [e_fast, budget]
        if not bool(torch.isfinite(a).all()):
            bad.append(f"{name}: non-finite values")
        elif not e_fast <= budget:
            bad.append(f"{name}: error {e_fast:.2e} > budget {budget:.2e}")
    return {"ok": not bad, "reason": "; ".join(bad), "errors": errors, "upstream": g}


# ----- one case -------------------------------------------------------------------------------

def run_op_case(case: dict, *, before_timing: Callable[[], None] | None = None) -> dict:
    """Check, then time, one (op, provider, H, N, L, mode) case. Keys of `case`: op, provider, H,
    N, L, mode, device, repeats, budget_s, allow_interpreter, mem_cap_bytes, peaks,
    compile_backend. `before_timing` runs after the check's tensors are freed (the fresh-process
    runner starts its memory measurement there, so the ground truth is not counted)."""
    from experiments.bench.timing import time_case
    if case["op"] in SELECTIVE_OPS:
        from experiments.bench.selective import run_selective_op_case
        return run_selective_op_case(case, before_timing=before_timing)
    op, H, N, L, mode, device = (case[k] for k in ("op", "H", "N", "L", "mode", "device"))
    res = {"kind": "op", **{k: case[k] for k in ("op", "provider", "H", "N", "L", "mode")}}
    try:
        fn = provider(op, case["provider"], device=device, allow_interpreter=case.get("allow_interpreter", False),
                      compile_backend=case.get("compile_backend", "inductor"))
    except Unavailable as e:
        return {**res, "status": "SKIPPED", "reason": str(e)}
    if case["provider"] in ("plain", "compile"):
        need = plain_bytes(op, H, N, L)
        if need > case["mem_cap_bytes"]:
            return {**res, "status": "SKIPPED", "reason": f"would materialize ~{need / 2**30:.1f} GiB"}
    try:
        inputs = make_inputs(op, H, N, L, device=device)
        chk = check(op, fn, inputs, mode)
    except torch.cuda.OutOfMemoryError:
        return {**res, "status": "OOM", "reason": "CUDA out of memory"}
    except Exception as e:  # a provider that crashes is a FAILED row, never a crashed run
        return {**res, "status": "FAILED", "reason": f"check raised {type(e).__name__}: {str(e)[:200]}"}
    res["check"] = chk["errors"]
    if case["provider"] == "compile":
        res["compile_backend"] = case.get("compile_backend", "inductor")
    if not chk["ok"]:
        return {**res, "status": "FAILED", "reason": chk["reason"]}
    names = tuple(ROW_DIM[op]) if mode == "fwdbwd" else ()
    inp = {k: (a.detach().requires_grad_(k in names) if torch.is_tensor(a) else a) for k, a in inputs.items()}
    g = chk.pop("upstream")
    del chk
    if before_timing is not None:
        before_timing()
    if names:
        call = (lambda: torch.autograd.grad(fn(inp), [inp[k] for k in names], g))
    else:
        call = (lambda: fn(inp))
    # the check above already ran this exact call once: it is the warm-up (compilation included)
    res = time_case(res, call, device=device, case=case)
    if res["status"] != "OK":
        return res
    flops, nbytes = counts(op, H, N, L, mode)
    res.update(flops=flops, bytes=nbytes, flop_per_s=flops / res["median_s"],
               bytes_per_s=nbytes / res["median_s"])
    peaks = case.get("peaks")
    if peaks:
        floor = max(flops / peaks[0], nbytes / peaks[1])
        res.update(floor_s=floor, floor_fraction=floor / res["median_s"])
    return res
