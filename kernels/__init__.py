"""Fast operators for state-space models: Vandermonde and Cauchy products (SPEC section 4).

`import kernels` has no side effects: Triton is imported only when a Triton path runs.
Note: an unrelated distribution on the package index also installs a top-level `kernels`
package; this one is installed by the `ssmkit` distribution.
"""
from kernels.cauchy import cauchy
from kernels.vandermonde import vandermonde

__all__ = ["cauchy", "vandermonde"]
