"""Fast operators for state-space models (`docs/operators.md`, `docs/selective_scan_op.md`,
`docs/ssd_op.md`): `cauchy_mult`, `vandermonde_mult` (S4 / S4D filters), `selective_scan_fn` and
`selective_state_update` (Mamba), `mamba_chunk_scan_combined` (Mamba-2; also `kernels.ssd.ssd`),
`mamba3_scan` (Mamba-3, SISO and MIMO; `docs/mamba3.md`).

Each operator lives in its own subpackage (`kernels.cauchy`, `kernels.selective_scan`, ...) laid out as
`kernels/README.md` describes. `import kernels` has no side effects: Triton is imported only when
a Triton path runs. Note: an unrelated distribution on the package index also installs a
top-level `kernels` package; this one is installed by the `ssmkit` distribution.
"""
from kernels.cauchy import cauchy_mult
from kernels.mamba3 import mamba3_scan
from kernels.selective_scan import selective_scan_fn, selective_state_update
from kernels.ssd import mamba_chunk_scan_combined
from kernels.vandermonde import vandermonde_mult

__all__ = ["cauchy_mult", "mamba3_scan", "mamba_chunk_scan_combined", "selective_scan_fn", "selective_state_update",
           "vandermonde_mult"]
