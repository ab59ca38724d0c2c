"""Discretization of `x' = A x + B u` with step dt (docs/discretization.md).

- `discretize(A, B, dt, method)` for dense `A (..., N, N)`, `B (..., N)`, real or complex: GBT
  family `Ab = (I - alpha dt A)^-1 (I + (1-alpha) dt A)`, `Bb = (I - alpha dt A)^-1 dt B`
  (forward Euler alpha=0, backward Euler alpha=1, bilinear alpha=1/2) and ZOH via one matrix
  exponential of the block matrix `dt [[A, B], [0, 0]]` (valid for singular A).
- `discretize_diag(A, B, dt, method)` for diagonal `A (..., N)` (real or complex), elementwise.
  ZOH uses `expm1` (accurate for small `dt * A`, limit `dt * B` at `A = 0`); `log=True` returns a
  logarithm of the pole `Ab` instead of `Ab` (what a Vandermonde filter needs), computed without
  forming `Ab` first.
- `expm1c(z)` and `log_pole(z, alpha) = log((1 + (1-alpha) z) / (1 - alpha z))`: complex, to
  relative accuracy for small `z` (any device, autograd included).
- `legs_step(c, u, k, method)`: one step of the time-varying LegS system `x' = (A x + B u)/t`,
  GBT with `dt/t_k = 1/k`; forward Euler uses the O(N) matvec, implicit steps a triangular solve.
- `log_dt_init(H)`: `log dt ~ U[log dt_min, log dt_max]`, one per channel; `dt_param_init` /
  `dt_from_param` store dt as `log dt` (`"exp"`) or as the inverse softplus of dt (`"softplus"`).

`dt` is a float or a tensor whose shape broadcasts against the leading (batch) dims of A, e.g.
`dt (3,)` with `A (N, N)` gives `Ab (3, N, N)`; `dt (H,)` with diagonal `A (H, N)` gives `(H, N)`.

Per-token schemes of the selective layers (docs/selective.md, docs/mamba3.md), where `dt`, `B`
and possibly `A` change from token to token:
- `selective_discretize_diag(A, B, dt, method)` / `selective_discretize(A, B, dt, method)`:
  `"exp_euler"` (`Ab = exp(dt A)`, `Bb = dt B`, what Mamba and Mamba-2 use) or `"zoh"` (exact
  for an input held constant over the step). The diagonal form broadcasts `A`, `B`, `dt`
  elementwise (no implicit trailing dim for dt: pass `dt[..., None]` for a state axis).
- `exp_trapezoid_diag(A, dt, lam)` / `exp_trapezoid(A, dt, lam)`: the exponential-trapezoidal
  rule of Mamba-3, `x_t = Ab x_{t-1} + w_prev (B u)_{t-1} + w_new (B u)_t` with
  `w_new = lam dt`, `w_prev = (1 - lam) dt exp(dt A)`.
"""
from __future__ import annotations

import functools
import math

import torch

from ssm.hippo import transition, transition_matvec

METHODS = ("forward_euler", "backward_euler", "bilinear", "gbt", "zoh")
DT_TRANSFORMS = ("exp", "softplus")
_ALPHA = {"forward_euler": 0.0, "backward_euler": 1.0, "bilinear": 0.5}


def _alpha(method: str, alpha) -> float | None:
    """GBT alpha for `method` (None for ZOH), validating the pair."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "gbt":
        if alpha is None:
            raise ValueError("method='gbt' needs alpha (0 = forward Euler, 1/2 = bilinear, 1 = backward)")
        if not 0.0 <= float(alpha) <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
        return float(alpha)
    if alpha is not None:
        raise ValueError(f"alpha is only used by method='gbt', got alpha={alpha!r} with method={method!r}")
    return _ALPHA.get(method)


def _as_dt(dt, ref: torch.Tensor, check: bool = True) -> torch.Tensor:
    """dt as a real tensor on ref's device; checked positive unless `check=False`."""
    if isinstance(dt, torch.Tensor):
        if dt.is_complex():
            raise TypeError("dt must be real")
        dt_t = dt.to(device=ref.device, dtype=dt.dtype if dt.is_floating_point() else ref.real.dtype)
    elif isinstance(dt, (int, float)) and not isinstance(dt, bool):
        dt_t = torch.tensor(float(dt), device=ref.device, dtype=ref.real.dtype)
    else:
        raise TypeError(f"dt must be a float or a real tensor, got {type(dt).__name__}")
    # the check reads dt back (a device sync, a graph break under torch.compile): callers whose dt
    # is positive by construction (exp / softplus of a parameter) pass check=False
    if check and not torch.compiler.is_compiling() and not bool((dt_t.detach() > 0).all()):
        raise ValueError(f"dt must be > 0 everywhere, got min {float(dt_t.detach().min())}")
    return dt_t


def discretize(A: torch.Tensor, B: torch.Tensor, dt, method: str, *, alpha: float | None = None,
               check: bool = True):
    """Discretize dense `A (..., N, N)`, `B (..., N)` -> `(Ab (..., N, N), Bb (..., N))`.

    A and B may be real or complex (batched, e.g. one system per channel); the result has their
    promoted dtype. `check=False` skips the `dt > 0` check. Formulas: docs/discretization.md.
    """
    a = _alpha(method, alpha)
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (..., N, N), got {tuple(A.shape)}")
    N = A.shape[-1]
    if B.dim() < 1 or B.shape[-1] != N:
        raise ValueError(f"B must have shape (..., N) with N={N} matching A {tuple(A.shape)}, got {tuple(B.shape)}")
    dt_t = _as_dt(dt, A, check)
    try:
        batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-1], dt_t.shape)
    except RuntimeError as e:
        raise ValueError(f"leading dims do not broadcast: A {tuple(A.shape)}, B {tuple(B.shape)}, "
                         f"dt {tuple(dt_t.shape)}") from e
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), dt_t.dtype)
    A = A.to(dtype).expand(*batch, N, N)  # (..., N, N)
    B = B.to(dtype).expand(*batch, N)  # (..., N)
    dtm = dt_t.to(dtype).expand(batch)[..., None, None]  # (..., 1, 1)
    if a is None:  # ZOH
        M = torch.zeros(*batch, N + 1, N + 1, dtype=dtype, device=A.device)  # (..., N+1, N+1)
        M[..., :N, :N] = A * dtm
        M[..., :N, N] = B * dtm[..., 0]
        E = torch.linalg.matrix_exp(M)  # (..., N+1, N+1)
        return E[..., :N, :N], E[..., :N, N]
    eye = torch.eye(N, dtype=dtype, device=A.device)  # (N, N)
    rhs_A = eye + (1.0 - a) * dtm * A  # (..., N, N)
    rhs_B = dtm[..., 0] * B  # (..., N)
    if a == 0.0:
        return rhs_A, rhs_B
    lhs = eye - a * dtm * A  # (..., N, N)
    sol = torch.linalg.solve(lhs, torch.cat([rhs_A, rhs_B[..., None]], dim=-1))  # (..., N, N+1)
    return sol[..., :N], sol[..., N]


def expm1c(z: torch.Tensor) -> torch.Tensor:
    """`exp(z) - 1` for real or complex z, to relative accuracy also when |z| is tiny.

    torch's own `expm1` handles complex tensors on CPU and CUDA (one kernel, autograd included);
    elsewhere the same identity is written with real operations:
    `expm1(x) cos y - 2 sin^2(y/2) + i exp(x) sin y` for z = x + iy, each term accurate for small z
    where `exp(z) - 1` would cancel (docs/discretization.md, "ZOH for small dt*A").
    """
    if not z.is_complex() or z.device.type in ("cpu", "cuda"):
        return torch.expm1(z)
    return _expm1_from_real(z)


def _expm1_from_real(z: torch.Tensor) -> torch.Tensor:
    x, y = z.real, z.imag
    s = torch.sin(y / 2)
    return torch.complex(torch.expm1(x) * torch.cos(y) - 2 * s * s, torch.exp(x) * torch.sin(y))


def log_pole(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """Complex `log((1 + (1-alpha) z) / (1 - alpha z))`: the log of the GBT pole of `dt*A = z`.

    Real part `log1p((2x + (1-2 alpha)|z|^2) / |1 - alpha z|^2) / 2` and imaginary part
    `atan2((1-alpha) y, 1 + (1-alpha) x) + atan2(alpha y, 1 - alpha x)`, so a pole near 1 keeps
    its relative accuracy (forming the ratio first and taking its log would not).
    """
    z = z if z.is_complex() else torch.complex(z, torch.zeros_like(z))
    x, y = z.real, z.imag
    b = 1.0 - alpha
    den = (1 - alpha * x) ** 2 + (alpha * y) ** 2  # |1 - alpha z|^2
    re = 0.5 * torch.log1p((2 * x + (1 - 2 * alpha) * (x * x + y * y)) / den)
    im = torch.atan2(b * y, 1 + b * x) + torch.atan2(alpha * y, 1 - alpha * x)
    return torch.complex(re, im)


def discretize_diag(A: torch.Tensor, B: torch.Tensor, dt, method: str, *, alpha: float | None = None,
                    log: bool = False, check: bool = True):
    """Discretize diagonal `A (..., N)` (real or complex), `B (..., N)` elementwise.

    ZOH: `Ab = exp(dt A)`, `Bb = expm1(dt A) / A * B` (limit `dt * B` at `A == 0`, where the
    gradient with respect to A is taken as 0).
    GBT: `Ab = (1 + (1-alpha) dt A) / (1 - alpha dt A)`, `Bb = dt B / (1 - alpha dt A)`.
    `log=True` returns `(log Ab, Bb)` with a complex `log Ab` such that `exp(l log Ab) = Ab^l`
    (for ZOH exactly `dt A`). `check=False` skips the `dt > 0` check. docs/discretization.md.
    """
    a = _alpha(method, alpha)
    if A.dim() < 1:
        raise ValueError(f"A must have shape (..., N), got {tuple(A.shape)}")
    try:
        torch.broadcast_shapes(A.shape, B.shape)
    except RuntimeError as e:
        raise ValueError(f"B {tuple(B.shape)} does not broadcast with A {tuple(A.shape)}") from e
    dtr = _as_dt(dt, A, check)
    try:
        torch.broadcast_shapes(A.shape[:-1], dtr.shape)
    except RuntimeError as e:
        raise ValueError(f"dt {tuple(dtr.shape)} does not broadcast with the leading dims of A "
                         f"{tuple(A.shape)}") from e
    dtv = dtr[..., None]  # (..., 1)
    dtA = dtv * A  # (..., N)
    if a is None:
        # expm1(dt A) / A rather than dt * expm1(dt A) / (dt A): autograd's d/d(dt) is then
        # exp(dt A) B, free of the cancellation a quotient by dt A would bring; the double `where` gives the
        # limit dt * B at A == 0 and keeps the unused branch finite (no NaN gradient there)
        zero = A == 0
        Bb = torch.where(zero, dtv.to(dtA.dtype), expm1c(dtA) / torch.where(zero, torch.ones_like(A), A)) * B
        if log:
            return (dtA if dtA.is_complex() else torch.complex(dtA, torch.zeros_like(dtA))), Bb
        return torch.exp(dtA), Bb  # (..., N) each
    denom = 1.0 - a * dtA  # (..., N)
    Bb = dtv * B / denom
    if log:
        return log_pole(dtA, a), Bb
    return (1.0 + (1.0 - a) * dtA) / denom, Bb


def legs_step(c: torch.Tensor, u: torch.Tensor, k: int, *, method: str = "bilinear",
              alpha: float | None = None) -> torch.Tensor:
    """One step `k -> k+1` of the time-varying LegS system `x' = (A x + B u)/t` (docs/discretization.md).

    c (..., N) the state at t_k = k (k >= 1), u (...) the input; the step is the GBT formula with
    `dt/t_k = 1/k`. Forward Euler is O(N) (`c + (A c + B u)/k` via the cumulative-sum matvec);
    implicit steps solve the lower-triangular `(I - alpha A / k)`. ZOH is not offered here: a
    time-varying step has no single exponential (use the dense `discretize` with dt = 1/k).
    """
    a = _alpha(method, alpha)
    if a is None:
        raise ValueError("legs_step supports the GBT methods, not 'zoh'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (t_k = k), got {k!r}")
    if c.dim() < 1:
        raise ValueError(f"c must have shape (..., N), got {tuple(c.shape)}")
    if u.shape != c.shape[:-1]:
        raise ValueError(f"u must have shape {tuple(c.shape[:-1])} (c without its last dim), got {tuple(u.shape)}")
    N = c.shape[-1]
    h = 1.0 / k
    A, Bv = _legs_matrices(N, c.device, c.dtype)  # (N, N) lower triangular, (N,)
    explicit = c + (1.0 - a) * h * transition_matvec("legs", c) + h * Bv * u[..., None]  # (..., N)
    if a == 0.0:
        return explicit
    lhs = torch.eye(N, dtype=c.dtype, device=c.device) - a * h * A  # (N, N)
    sol = torch.linalg.solve_triangular(lhs, explicit.reshape(-1, N).T, upper=False)  # (N, prod(...))
    return sol.T.reshape(c.shape)


@functools.lru_cache(maxsize=16)
def _legs_matrices(N: int, device, dtype):
    A, B = transition("legs", N)
    return A.to(device=device, dtype=dtype), B.to(device=device, dtype=dtype)


def log_dt_init(H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, *, generator=None, device=None):
    """`log dt (H,)` float32 with `log dt ~ U[log dt_min, log dt_max]` (docs/discretization.md)."""
    if isinstance(H, bool) or not isinstance(H, int) or H < 1:
        raise ValueError(f"H must be a positive int, got {H!r}")
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got dt_min={dt_min!r}, dt_max={dt_max!r}")
    r = torch.rand(H, generator=generator, dtype=torch.float32)  # (H,)
    log_dt = r * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)  # (H,)
    return log_dt.to(device) if device is not None else log_dt


def _check_transform(transform: str) -> None:
    if transform not in DT_TRANSFORMS:
        raise ValueError(f"dt_transform must be one of {DT_TRANSFORMS}, got {transform!r}")


def dt_param_init(H: int, dt_min: float = 1e-3, dt_max: float = 1e-1, transform: str = "exp", *,
                  generator=None, device=None) -> torch.Tensor:
    """The stored dt parameter (H,) float32 for `dt_from_param`, dt log-uniform in [dt_min, dt_max].

    `"exp"` stores `log dt` (exactly `log_dt_init`); `"softplus"` stores `dt + log(-expm1(-dt))`,
    the inverse of softplus, computed in float64 from the same draw, so both give the same dt.
    """
    _check_transform(transform)
    log_dt = log_dt_init(H, dt_min, dt_max, generator=generator, device=device)  # (H,)
    if transform == "exp":
        return log_dt
    dt = torch.exp(log_dt.double())  # (H,)
    return (dt + torch.log(-torch.expm1(-dt))).float()


def dt_from_param(param: torch.Tensor, transform: str = "exp") -> torch.Tensor:
    """dt from its stored parameter: `exp(param)` or `softplus(param)` (both > 0)."""
    _check_transform(transform)
    return torch.exp(param) if transform == "exp" else torch.nn.functional.softplus(param)


SELECTIVE_METHODS = ("exp_euler", "zoh")


def _selective_method(method: str) -> None:
    if method not in SELECTIVE_METHODS:
        raise ValueError(f"method must be one of {SELECTIVE_METHODS}, got {method!r}")


def _as_lam(lam, ref: torch.Tensor, check: bool) -> torch.Tensor:
    """The trapezoid weight as a real tensor, checked to lie in [0, 1] unless `check=False`."""
    if isinstance(lam, torch.Tensor):
        if lam.is_complex() or not lam.is_floating_point():
            raise TypeError(f"lam must be a real floating tensor, got {lam.dtype}")
        lam_t = lam.to(ref.device)
    elif isinstance(lam, (int, float)) and not isinstance(lam, bool):
        lam_t = torch.tensor(float(lam), device=ref.device, dtype=ref.real.dtype)
    else:
        raise TypeError(f"lam must be a float or a real tensor, got {type(lam).__name__}")
    if check and not torch.compiler.is_compiling():
        bad = (lam_t.detach() < 0) | (lam_t.detach() > 1)
        if bool(bad.any()):
            raise ValueError(f"lam must lie in [0, 1], got values in [{float(lam_t.min())}, {float(lam_t.max())}]")
    return lam_t


# Below |dt A| = _SERIES_RADIUS the ZOH gain is a Taylor polynomial: the closed form's value is
# accurate there, but autograd's d/dA of `expm1(dt A) / A` cancels (relative error eps/|dt A|).
_SERIES_RADIUS = 0.1
_SERIES_TERMS = 10  # 0.1^10 / 11! < 3e-18: the polynomial is exact to float64 rounding


def _zoh_gain(A: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
    """`(exp(dt A) - 1) / A` elementwise (broadcast of A and dt), `dt` at `A == 0`.

    Large `|dt A|`: `expm1(dt A) / A` (its d/d(dt) is `exp(dt A)`, free of cancellation). Small:
    `dt sum_k (dt A)^k / (k+1)!` by Horner. Each branch sees only inputs it is valid for (double
    `where`), so neither can put a NaN into the other's gradient.
    """
    dtA = dt * A
    small = dtA.abs() < _SERIES_RADIUS
    z = torch.where(small, dtA, torch.zeros_like(dtA))
    poly = torch.full_like(z, 1.0 / math.factorial(_SERIES_TERMS))
    for k in range(_SERIES_TERMS - 1, 0, -1):
        poly = poly * z + 1.0 / math.factorial(k)
    safe = torch.where(small, torch.ones_like(dtA), A.to(dtA.dtype).expand_as(dtA))
    return torch.where(small, dt * poly, expm1c(torch.where(small, torch.zeros_like(dtA), dtA)) / safe)


def selective_discretize_diag(A: torch.Tensor, B: torch.Tensor, dt, method: str, *,
                              check: bool = True):
    """Per-token discretization of a diagonal `A` -> `(Ab, Bb)`, all elementwise.

    `A`, `B` and `dt` broadcast against each other (e.g. `A (H, N)`, `B (B, L, 1, N)`,
    `dt (B, L, H, 1)` give `(B, L, H, N)`); A and B real or complex.
    `"exp_euler"`: `Ab = exp(dt A)`, `Bb = dt B`. `"zoh"`: `Ab = exp(dt A)`,
    `Bb = (exp(dt A) - 1) / A B`, by `expm1`, with the limit `dt B` at `A == 0`.
    `check=False` skips the `dt > 0` check (a device sync).
    """
    _selective_method(method)
    dt_t = _as_dt(dt, A, check)
    try:
        torch.broadcast_shapes(A.shape, B.shape, dt_t.shape)
    except RuntimeError as e:
        raise ValueError(f"A {tuple(A.shape)}, B {tuple(B.shape)} and dt {tuple(dt_t.shape)} "
                         f"do not broadcast") from e
    Ab = torch.exp(dt_t * A)  # (...)
    if method == "exp_euler":
        return Ab, dt_t * B
    return Ab, _zoh_gain(A, dt_t) * B


def _dense_shapes(A: torch.Tensor, B: torch.Tensor | None, **scalars: torch.Tensor) -> torch.Size:
    """Broadcast leading shape of a dense `A (..., N, N)`, `B (..., N)` and per-system scalars."""
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"A must have shape (..., N, N), got {tuple(A.shape)}")
    N = A.shape[-1]
    shapes = {"A": A.shape[:-2], **{k: v.shape for k, v in scalars.items()}}
    if B is not None:
        if B.dim() < 1 or B.shape[-1] != N:
            raise ValueError(f"B must have shape (..., N) with N={N} matching A {tuple(A.shape)}, "
                             f"got {tuple(B.shape)}")
        shapes["B"] = B.shape[:-1]
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError as e:
        raise ValueError("leading dims do not broadcast: "
                         + ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())) from e


def selective_discretize(A: torch.Tensor, B: torch.Tensor, dt, method: str, *, check: bool = True):
    """Per-token discretization of a dense `A (..., N, N)`, `B (..., N)` -> `(Ab, Bb)`.

    `dt` broadcasts against the leading dims. `"exp_euler"`: `Ab = matrix_exp(dt A)`, `Bb = dt B`.
    `"zoh"`: one matrix exponential of `dt [[A, B], [0, 0]]` (as `discretize`; singular A is fine).
    """
    _selective_method(method)
    dt_t = _as_dt(dt, A, check)
    batch = _dense_shapes(A, B, dt=dt_t)
    if method == "zoh":
        return discretize(A, B, dt_t, "zoh", check=False)
    dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), dt_t.dtype)
    dtv = dt_t.to(dtype).expand(batch)  # (...)
    Ab = torch.linalg.matrix_exp(dtv[..., None, None] * A.to(dtype))  # (..., N, N)
    return Ab, dtv[..., None] * B.to(dtype)  # (..., N, N), (..., N)


def exp_trapezoid_diag(A: torch.Tensor, dt, lam, *, check: bool = True):
    """Exponential-trapezoidal coefficients for a diagonal `A`: `(Ab, w_new, w_prev)`.

    The step is `x_t = Ab x_t-1 + w_prev g_(t-1) + w_new g_t` with the forcing `g = B u` at the
    two ends of the step: the trapezoid rule (weight `lam` on the new end, `1 - lam` on the old
    one) on the variation-of-constants integral, `Ab = exp(dt A)`, `w_new = lam dt`,
    `w_prev = (1 - lam) dt exp(dt A)`. `lam = 1` is exponential Euler. A, dt, lam broadcast
    elementwise; `w_new` has the broadcast shape of dt and lam only.
    """
    dt_t = _as_dt(dt, A, check)
    lam_t = _as_lam(lam, A, check)
    try:
        torch.broadcast_shapes(A.shape, dt_t.shape, lam_t.shape)
    except RuntimeError as e:
        raise ValueError(f"A {tuple(A.shape)}, dt {tuple(dt_t.shape)} and lam {tuple(lam_t.shape)} "
                         f"do not broadcast") from e
    Ab = torch.exp(dt_t * A)  # (...)
    return Ab, lam_t * dt_t, (1 - lam_t) * dt_t * Ab


def exp_trapezoid(A: torch.Tensor, dt, lam, *, check: bool = True):
    """Exponential-trapezoidal coefficients for a dense `A (..., N, N)`: `(Ab, w_new, w_prev)`.

    `Ab = matrix_exp(dt A)` and `w_prev = (1 - lam) dt Ab` are `(..., N, N)`, `w_new = lam dt` is
    `(...)` (a scalar per system); `dt` and `lam` broadcast against the leading dims of A.
    """
    dt_t = _as_dt(dt, A, check)
    lam_t = _as_lam(lam, A, check)
    batch = _dense_shapes(A, None, dt=dt_t, lam=lam_t)
    dtype = torch.promote_types(A.dtype, torch.promote_types(dt_t.dtype, lam_t.dtype))
    dtv = dt_t.to(dtype).expand(batch)  # (...)
    lamv = lam_t.to(dtype).expand(batch)  # (...)
    Ab = torch.linalg.matrix_exp(dtv[..., None, None] * A.to(dtype))  # (..., N, N)
    return Ab, lamv * dtv, ((1 - lamv) * dtv)[..., None, None] * Ab
