"""The one tolerance table (per dtype, plus named classes) and the comparison helpers.

Ground truth is float64/complex128. A fast path is allowed at most `BUDGET_FACTOR` times the error
of the plain formula run at the fast path's precision, plus a small atol (docs/operators.md#test-contract).
"""
from __future__ import annotations

import torch

# (rtol, atol) per dtype of the tensor under test.
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.complex128: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.complex64: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (2e-3, 1e-3),
}
# Named tolerance classes for comparisons the dtype alone does not describe; (rtol, atol).
# Pass the name as `tol=` to `assert_close` or `approx`.
NAMED_TOL = {
    # `transformers` forms RoPE inverse frequencies in float32: agreement to float32 rounding only.
    "rope_vs_transformers": (1e-6, 0.0),
    # one closed-form float64 scalar reached along two paths: a few roundings, nothing accumulates.
    "float64_scalar": (1e-12, 0.0),
}
BUDGET_FACTOR = 2.0
BUDGET_ATOL = {torch.float32: 1e-6, torch.complex64: 1e-6, torch.float64: 1e-13, torch.complex128: 1e-13}


def _check_finite(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    a_nan, e_nan = torch.isnan(actual), torch.isnan(expected)
    if a_nan.any() and not torch.equal(a_nan, e_nan):
        raise AssertionError(f"{name}: {int(a_nan.sum())} NaN values in the result (expected {int(e_nan.sum())})")
    a_inf, e_inf = torch.isinf(actual), torch.isinf(expected)
    if a_inf.any() and not torch.equal(a_inf, e_inf):
        raise AssertionError(f"{name}: {int(a_inf.sum())} inf values in the result")


def tolerance(dtype: torch.dtype | None = None, tol: str | None = None) -> tuple[float, float]:
    """(rtol, atol) of the named class `tol` if given, else of `dtype` in TOL."""
    if tol is not None:
        if tol not in NAMED_TOL:
            raise KeyError(f"unknown tolerance class {tol!r}; known: {sorted(NAMED_TOL)}")
        return NAMED_TOL[tol]
    return TOL[dtype]


def approx(expected: float, *, tol: str | None = None, dtype: torch.dtype = torch.float64):
    """`pytest.approx` for Python scalars with the table's tolerances (float64 unless `tol` names a class)."""
    import pytest
    rtol, atol = tolerance(dtype, tol)
    return pytest.approx(expected, rel=rtol, abs=atol)


def assert_close(actual, expected, *, rtol: float | None = None, atol: float | None = None,
                 dtype: torch.dtype | None = None, tol: str | None = None, name: str = "tensor") -> None:
    """Assert |actual - expected| <= atol + rtol*|expected| elementwise, NaN checked first.

    Tolerances come from the named class `tol` (NAMED_TOL) if given, else from TOL by `dtype`
    (default: the dtype of `actual`); an explicit `rtol`/`atol` overrides either.
    """
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected)
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    d_rtol, d_atol = tolerance(dtype or actual.dtype, tol)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    _check_finite(actual, expected, name)
    a = actual.detach().to(torch.complex128 if actual.is_complex() or expected.is_complex() else torch.float64).cpu()
    e = expected.detach().to(a.dtype).cpu()
    ok = torch.isfinite(e)
    err = (a - e).abs()[ok]
    bound = (atol + rtol * e.abs())[ok]
    if err.numel() and not bool((err <= bound).all()):
        i = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name}: max abs err {err.max().item():.3e}, max rel err "
            f"{(err / e.abs()[ok].clamp_min(1e-300)).max().item():.3e}; worst element err "
            f"{err[i].item():.3e} > bound {bound[i].item():.3e} (rtol={rtol:g}, atol={atol:g})")


def max_error(actual, truth) -> float:
    """Max abs error of `actual` against float64/complex128 `truth`."""
    a = torch.as_tensor(actual).detach().cpu().to(torch.as_tensor(truth).dtype)
    return (a - torch.as_tensor(truth).detach().cpu()).abs().max().item() if a.numel() else 0.0


def assert_within_budget(fast, plain, truth, *, name: str = "tensor", factor: float = BUDGET_FACTOR,
                         atol: float | None = None) -> None:
    """Error budget: err(fast) <= factor * err(plain) + atol, both measured against `truth`.

    `plain` is the plain formula run at the fast path's precision; `truth` is its complex128 value.
    """
    fast = torch.as_tensor(fast)
    _check_finite(fast, torch.as_tensor(truth), name)
    if atol is None:
        atol = BUDGET_ATOL.get(fast.dtype, 1e-6) * max(1.0, torch.as_tensor(truth).abs().max().item())
    e_fast, e_plain = max_error(fast, truth), max_error(plain, truth)
    if not e_fast <= factor * e_plain + atol:
        raise AssertionError(f"{name}: error {e_fast:.3e} exceeds budget {factor}x plain error "
                             f"{e_plain:.3e} + atol {atol:.1e}")


def run_steps(layer, x: torch.Tensor, state=None):
    """Feed (B, L, H) `x` through `layer.step` one position at a time under no_grad.

    `state=None` starts from `layer.default_state(B)`. Returns (ys (B, L, H), final state).
    """
    state = layer.default_state(x.shape[0]) if state is None else state
    ys = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            y, state = layer.step(x[:, t], state)
            ys.append(y)
    return torch.stack(ys, 1), state
