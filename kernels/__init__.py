"""Fast operators for state-space models: `cauchy_mult` and `vandermonde_mult` (`docs/operators.md`).

Each operator lives in its own subpackage (`kernels.cauchy`, `kernels.vandermonde`) laid out as
`kernels/README.md` describes. `import kernels` has no side effects: Triton is imported only when
a Triton path runs. Note: an unrelated distribution on the package index also installs a
top-level `kernels` package; this one is installed by the `ssmkit` distribution.
"""
from kernels.cauchy import cauchy_mult
from kernels.vandermonde import vandermonde_mult

__all__ = ["cauchy_mult", "vandermonde_mult"]
