"""Online function approximation with HiPPO: signal -> coefficients -> signal.

The math: docs/hippo.md#online-approximation-and-reconstruction (measures and readout) and
docs/discretization.md (the steps).

- `basis(measure, N, s)` evaluates the functions that the state coefficients multiply, at the
  "age" `s` of a point (how long before the current time it lies).
- `HiPPOApprox(measure, N)` runs the discretized recurrence over a signal `(B, L)` and returns the
  coefficients after every sample `(B, L, N)`; `.reconstruct(c, length)` rebuilds the last `length`
  samples from the coefficients at one time.

Time conventions (chosen so that every step is exact where it can be):
- Sample k (1-based) of a time-invariant system holds `u_k` on `((k-1) dt, k dt]`; its point is the
  midpoint, age `(k_now - k + 1/2) dt`. The state starts at 0 (the signal is 0 before time 0).
  Default `dt = 1/L`: the whole signal spans one time unit, so with the default `theta = 1` the LegT
  / FouT window is exactly the whole signal.
- `theta` is the memory horizon in time units for every time-invariant measure: the LegT window,
  the FouT window (the "fout" matrix of `ssm.hippo.transition` has window 2, so it is rescaled by
  `2/theta`), and the LagT time scale (`A/theta, B/theta`, measure `exp(-s/theta)`).
- LegS (time-varying) holds sample k on `[k-1, k]` (unit steps, dt irrelevant). The state after the
  first sample is set to its exact projection `u_1 e_0` on `[0, 1]`; step `k-1 -> k` is the
  GBT step with `dt/t_{k-1} = 1/(k-1)` (`ssm.discretize.legs_step`). Its ZOH is exact: with
  `tau = ln t` the system is time-invariant, so the step is a ZOH of length `ln(k/(k-1))`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ssm.discretize import METHODS, discretize, legs_step
from ssm.hippo import MEASURES, transition

_F64 = torch.float64


def _legendre(x: torch.Tensor, N: int) -> torch.Tensor:
    """Normalized Legendre `sqrt(2n+1) P_n(x)` for n < N, x (...) -> (..., N) (three-term recurrence)."""
    p = [torch.ones_like(x), x]
    for n in range(1, N - 1):
        p.append(((2 * n + 1) * x * p[n] - n * p[n - 1]) / (n + 1))
    P = torch.stack(p[:N], dim=-1)  # (..., N)
    return P * torch.sqrt(2 * torch.arange(N, dtype=x.dtype, device=x.device) + 1)


def _laguerre(x: torch.Tensor, N: int) -> torch.Tensor:
    """Laguerre `L_n(x)` for n < N, x (...) -> (..., N)."""
    p = [torch.ones_like(x), 1 - x]
    for n in range(1, N - 1):
        p.append(((2 * n + 1 - x) * p[n] - n * p[n - 1]) / (n + 1))
    return torch.stack(p[:N], dim=-1)  # (..., N)


def _scan_lti(f: torch.Tensor, Ab: torch.Tensor, Bb: torch.Tensor, *, chunk: int) -> torch.Tensor:
    """All states of `c_k = Ab c_{k-1} + Bb u_k` (c_0 = 0): f (B, L) -> (B, L, N).

    Per chunk of T steps: `c_{k0+i} = Ab^{i+1} c_{k0-1} + sum_{j<=i} Ab^{i-j} Bb u_{k0+j}`, i.e. one
    product with the stacked powers and one causal (Toeplitz) contraction, instead of T matmuls.
    """
    Bsz, L = f.shape
    N = Ab.shape[-1]
    T = min(chunk, L)
    pows = [torch.eye(N, dtype=Ab.dtype, device=Ab.device)]
    for _ in range(T):
        pows.append(Ab @ pows[-1])
    P = torch.stack(pows[1:])  # (T, N, N): Ab^1 .. Ab^T
    K = torch.stack([Bb] + [p @ Bb for p in pows[1:T]])  # (T, N): Ab^j Bb, j = 0..T-1
    i = torch.arange(T, device=f.device)
    lag = i[:, None] - i[None, :]  # (T, T)
    M = torch.where((lag >= 0)[..., None], K[lag.clamp(min=0)], K.new_zeros(()))  # (T, T, N)
    c = f.new_zeros(Bsz, N)  # (B, N)
    out = []
    for k0 in range(0, L, T):
        u = f[:, k0:k0 + T]  # (B, t)
        t = u.shape[1]
        block = torch.einsum("bn,imn->bim", c, P[:t]) + torch.einsum("bj,ijn->bin", u, M[:t, :t])  # (B, t, N)
        out.append(block)
        c = block[:, -1]
    return torch.cat(out, dim=1)  # (B, L, N)


def basis(measure: str, N: int, s: torch.Tensor, *, theta: float = 1.0, beta: float = 1.0) -> torch.Tensor:
    """Reconstruction functions at age `s (...)` -> `(..., N)`; the signal is `basis @ c`.

    - legs: `s` is the age as a fraction of the history, in [0, 1]: `f(t (1 - s)) ~ sum c_n g_n(1 - 2s)`.
    - legt: `f(t - s) ~ sum c_n g_n(1 - 2 s/theta)`, s in [0, theta] (g: orthonormal Legendre).
    - lagt: `f(t - s) ~ sum c_n L_n(s/theta) exp(-s/(2 theta)) / beta`, s >= 0.
    - fout: `f(t - s) ~ c_0 + sum_k sqrt2 (c_{2k} cos(2 pi k s/theta) - c_{2k-1} sin(2 pi k s/theta))`,
      s in [0, theta]. The "fout" ODE is not an exact projection (its endpoint term is twice that of
      one), so this readout is approximate even for band-limited signals
      (docs/hippo.md#fout-translated-fourier).
    """
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    s = torch.as_tensor(s, dtype=_F64) if not torch.is_tensor(s) else s
    if measure == "legs":
        return _legendre(1 - 2 * s, N)
    if measure == "legt":
        return _legendre(1 - 2 * s / theta, N)
    if measure == "lagt":
        x = s / theta
        return _laguerre(x, N) * torch.exp(-x / 2)[..., None] / beta
    x = 2 * math.pi * s / theta  # (...)
    k = torch.div(torch.arange(N, device=s.device) + 1, 2, rounding_mode="floor").to(s.dtype)  # (N,)
    ang = x[..., None] * k  # (..., N)
    is_sin = (torch.arange(N, device=s.device) % 2 == 1)
    out = torch.where(is_sin, -math.sqrt(2) * torch.sin(ang), math.sqrt(2) * torch.cos(ang))  # (..., N)
    out[..., 0] = 1.0
    return out


class HiPPOApprox(nn.Module):
    """Online approximation of a signal `(B, L)` by a HiPPO state of size N at every step.

    measure: "legs" (time-varying, whole history), "legt", "lagt", "fout" (time-invariant).
    method: any of `ssm.discretize.METHODS` ("gbt" takes `alpha`).
    dt: step of the time-invariant systems; None means `1/L` for a signal of length L.
    theta: memory horizon in time units (see the module docstring); beta: LagT input scale.
    alpha: GBT parameter for method="gbt". chunk: steps per block of the scan (see `_scan_lti`).

    Cost: time-invariant measures run a chunked scan (a few batched matmuls per `chunk` steps);
    LegS is a loop of one small matmul per step (step matrices built per chunk by one batched
    solve), about 2 s for L = 10,000, N = 64 on one CPU thread (forward Euler, O(N) steps: 0.7 s).
    Tiny ops do not profit from threads: on CPU `torch.set_num_threads(1)` is much faster here.
    """

    def __init__(self, measure: str, N: int, *, method: str = "bilinear", dt: float | None = None,
                 theta: float = 1.0, beta: float = 1.0, alpha: float | None = None,
                 chunk: int = 64, device=None, dtype=None):
        super().__init__()
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if (method == "gbt") != (alpha is not None):
            raise ValueError(f"alpha is required with method='gbt' and only used by it, got method={method!r}, "
                             f"alpha={alpha!r}")
        if dt is not None and not dt > 0:
            raise ValueError(f"dt must be > 0 (or None for 1/L), got {dt!r}")
        if not theta > 0:
            raise ValueError(f"theta must be > 0, got {theta!r}")
        self.measure, self.N, self.method, self.alpha = measure, N, method, alpha
        self.dt, self.theta, self.beta = dt, float(theta), float(beta)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.chunk = chunk
        A, B = transition(measure, N, theta=theta if measure == "legt" else 1.0, beta=beta)
        if measure == "fout":
            A, B = A * (2.0 / theta), B * (2.0 / theta)
        elif measure == "lagt":
            A, B = A / theta, B / theta
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("A", A.to(device=device, dtype=dtype), persistent=False)  # (N, N)
        self.register_buffer("B", B.to(device=device, dtype=dtype), persistent=False)  # (N,)
        self._cache: dict = {}

    def extra_repr(self) -> str:
        return f"{self.measure}, N={self.N}, method={self.method}, dt={self.dt}, theta={self.theta}"

    def step_size(self, L: int) -> float:
        """The dt used for a signal of length L (time-invariant measures)."""
        return self.dt if self.dt is not None else 1.0 / L

    def discrete(self, dt: float):
        """`(Ab (N, N), Bb (N,))` of the time-invariant system, computed in float64 once per dt."""
        key = (float(dt), self.A.device, self.A.dtype)
        if key not in self._cache:
            A, B = transition(self.measure, self.N, theta=self.theta if self.measure == "legt" else 1.0,
                              beta=self.beta)
            scale = {"fout": 2.0 / self.theta, "lagt": 1.0 / self.theta}.get(self.measure, 1.0)
            Ab, Bb = discretize(A * scale, B * scale, dt, self.method, alpha=self.alpha)
            self._cache = {key: (Ab.to(self.A), Bb.to(self.A))}
        return self._cache[key]

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """Coefficients after every sample: f (B, L) real -> c (B, L, N)."""
        if f.dim() != 2 or f.shape[1] < 1:
            raise ValueError(f"f must have shape (B, L) with L >= 1, got {tuple(f.shape)}")
        if f.is_complex():
            raise TypeError("f must be a real signal")
        f = f.to(self.A)
        if self.measure == "legs":
            return self._legs(f)
        Ab, Bb = self.discrete(self.step_size(f.shape[1]))
        return _scan_lti(f, Ab, Bb, chunk=self.chunk)

    def _legs(self, f: torch.Tensor) -> torch.Tensor:
        Bsz, L = f.shape
        c = f.new_zeros(Bsz, self.N)  # (B, N)
        c[:, 0] = f[:, 0]
        out = [c]
        if self.method == "forward_euler":  # O(N) per step, no matrices at all
            for k in range(2, L + 1):
                c = legs_step(c, f[:, k - 1], k - 1, method=self.method)  # (B, N)
                out.append(c)
            return torch.stack(out, dim=1)  # (B, L, N)
        # Implicit GBT / ZOH: the step matrices of a chunk of steps come from one batched solve
        # (or matrix exponential), then each step is one small matmul.
        A, B = transition("legs", self.N)
        for k0 in range(2, L + 1, self.chunk):
            ks = torch.arange(k0, min(k0 + self.chunk, L + 1), dtype=_F64)  # (T,)
            h = torch.log(ks / (ks - 1)) if self.method == "zoh" else 1.0 / (ks - 1)  # (T,)
            Ab, Bb = discretize(A, B, h, self.method, alpha=self.alpha)  # (T, N, N), (T, N)
            AbT, Bb = Ab.transpose(-1, -2).to(f), Bb.to(f)
            for j, k in enumerate(range(k0, k0 + ks.numel())):
                c = torch.addmm(f[:, k - 1, None] * Bb[j], c, AbT[j])  # (B, N)
                out.append(c)
        return torch.stack(out, dim=1)  # (B, L, N)

    def reconstruct(self, c: torch.Tensor, length: int, *, k: int | None = None,
                    dt: float | None = None) -> torch.Tensor:
        """Rebuild the last `length` samples (oldest first) from the state c (..., N) -> (..., length).

        legs: `k` is the number of samples the state has seen (default `length`: the whole
        history); `length <= k`. Time-invariant measures: `dt` defaults to the module's dt and must
        be given when that is None (pass `1/L`); legt/fout need `length * dt <= theta`.
        """
        if c.shape[-1] != self.N:
            raise ValueError(f"c must have shape (..., {self.N}), got {tuple(c.shape)}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive int, got {length!r}")
        j = torch.arange(length, 0, -1, device=c.device, dtype=c.real.dtype) - 0.5  # (length,) ages
        if self.measure == "legs":
            k = length if k is None else k
            if length > k:
                raise ValueError(f"length={length} exceeds the k={k} samples a LegS state has seen")
            s = j / k
        else:
            dt = self.dt if dt is None else dt
            if dt is None:
                raise ValueError("dt is needed: this module uses dt = 1/L, so pass dt=1/L")
            if self.measure in ("legt", "fout") and length * dt > self.theta * (1 + 1e-9):
                raise ValueError(f"length * dt = {length * dt:g} exceeds the window theta={self.theta:g}")
            s = j * dt
        G = basis(self.measure, self.N, s, theta=self.theta, beta=self.beta)  # (length, N)
        return c @ G.to(c.dtype).T  # (..., length)
