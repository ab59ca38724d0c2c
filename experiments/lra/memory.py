"""Peak memory of one training step, estimated before training, and the check that refuses a run
that will not fit.

Measured on a deep copy of the model (so neither the model, its buffers or caches, nor any random
number stream is touched) at the run's full sequence length and autocast, once at batch 1 and once
at batch 2, then modelled as linear in the batch B:

    peak(B) = parameters + optimizer state + step(1) + (step(2) - step(1)) * (B - 1)

with AdamW's state counted as two tensors per parameter and `step(b)` what one forward + backward
adds at batch b:

- *Tensor bytes*, always: the step runs on fake tensors (`FakeTensorMode`: shapes and dtypes
  without storage) under a dispatch mode that adds up the bytes of every tensor created and
  subtracts them when it is freed. It allocates nothing (so it also prices runs that could never
  fit, such as Path-X attention) and takes about a second, plus a few seconds the first time in a
  process. It misses kernel workspaces and allocator overhead, so on CPU it is multiplied by
  `CPU_OVERHEAD`: a real batch-16 step (batch 8 for the Transformer) at length 2,000 with
  d_model=128 and 2 layers grew the resident memory by 1.66x (S4D), 1.61x (S4) and 1.18x
  (Transformer) its tensor bytes. The resident size of small real steps cannot replace this:
  the C allocator reuses freed memory without growing it.
- *Measured*, on CUDA and only when the tensor-byte estimate fits: real steps (after a warm-up)
  with the caching allocator's peak, `torch.cuda.max_memory_allocated`. The larger of the two is used.

`HEADROOM` leaves room for what neither sees (data loader, interpreter).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Fraction of the available memory a run may plan to use; the rest is left for the data loader,
# the interpreter and allocator behaviour the estimate does not model.
HEADROOM = 0.9
# CPU steps' resident growth over their tensor bytes, rounded up from the measured 1.18-1.66x
# (module docstring).
CPU_OVERHEAD = 2.0
GIB = 2 ** 30


class _PeakTracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while the mode is active."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self._seen = 0, 0, set()

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    nbytes = storage.nbytes()
                    self._seen.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


@dataclass
class Estimate:
    """Bytes of one training step as a function of the batch; `how` says which measurement it is."""

    params: int  # parameters and buffers
    optimizer: int  # AdamW: two state tensors per parameter
    step_1: int  # what forward + backward adds at batch 1 (activations, gradients, workspaces)
    per_example: int  # growth of that per additional example
    how: str

    def peak(self, batch: int) -> int:
        return self.params + self.optimizer + self.step_1 + self.per_example * max(batch - 1, 0)


def _loss(model, x, y, amp: bool, state=None):
    from torch.func import functional_call

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x, None) if state is None else functional_call(model, state, (x, None))
    return torch.nn.functional.cross_entropy(logits.float(), y)  # lengths=None: every position is real


def _tensor_bytes(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, amp: bool) -> int:
    """Peak tensor bytes created by forward + backward on a fake batch of ids of `shape`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Integer scalars stay real: a layer may read one as a setting (the S4 length `fixed_l_max`),
    # which a fake tensor cannot answer; they hold no memory worth counting.
    state = {name: t if (t.dim() == 0 and not t.is_floating_point()) else fake_mode.from_tensor(t)
             for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    params = [state[name] for name, p in model.named_parameters() if p.requires_grad]
    with fake_mode:
        x = torch.ones(shape, dtype=torch.long, device=device)  # id 1 is a real token in every vocabulary
        y = torch.zeros(shape[0], dtype=torch.long, device=device)
    tracker = _PeakTracker()
    with fake_mode, tracker:
        grads = torch.autograd.grad(_loss(model, x, y, amp, state), params, allow_unused=True)
        del grads
    return tracker.peak


def _measured_bytes(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device, amp: bool) -> int:
    """CUDA memory a real forward + backward on a batch of ids of `shape` adds at its peak."""
    x = torch.ones(shape, dtype=torch.long, device=device)
    y = torch.zeros(shape[0], dtype=torch.long, device=device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    _loss(model, x, y, amp).backward()
    torch.cuda.synchronize(device)
    grown = torch.cuda.max_memory_allocated(device) - base
    model.zero_grad(set_to_none=True)
    return max(grown, 0)


def _fixed_bytes(model: torch.nn.Module) -> tuple[int, int]:
    params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    optim = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params, optim


def _without_value_checks(probe: torch.nn.Module) -> torch.nn.Module:
    """Prepare the probe for fake tensors, which have no values: turn off the layers' input-value
    checks (`check_finite`, which allocate nothing worth counting) and read every S4 length once
    (`l_max` is kept in a buffer and remembered after its first read)."""
    for module in probe.modules():
        if hasattr(module, "fixed_l_max"):
            module.l_max  # noqa: B018  (the read is the point)
        settings = getattr(module, "config", None)
        if dataclasses.is_dataclass(settings) and hasattr(settings, "check_finite"):
            settings.check_finite = False
    return probe


def tensor_estimate(model: torch.nn.Module, *, seq_shape: tuple[int, ...], device: torch.device,
                    amp: bool) -> Estimate:
    """Lower-bound estimate from tensor bytes alone; `seq_shape` is one example's ids ((L,) or (2, L))."""
    # A copy: layers may cache things on their first call (S4 fixes its kernel length), which must
    # not leak from the probe's full-length batch into the run.
    probe = _without_value_checks(copy.deepcopy(model).train())
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        b1 = _tensor_bytes(probe, (1, *seq_shape), device, amp)
        b2 = _tensor_bytes(probe, (2, *seq_shape), device, amp)
    if device.type == "cpu":
        b1, b2 = int(CPU_OVERHEAD * b1), int(CPU_OVERHEAD * b2)
        return Estimate(*_fixed_bytes(model), step_1=b1, per_example=max(b2 - b1, 0),
                        how=f"tensor bytes x{CPU_OVERHEAD:g} CPU overhead")
    return Estimate(*_fixed_bytes(model), step_1=b1, per_example=max(b2 - b1, 0), how="tensor bytes")


def measured_estimate(model: torch.nn.Module, *, seq_shape: tuple[int, ...], device: torch.device,
                      amp: bool) -> Estimate:
    """Estimate from real CUDA steps at batch 1 and 2 (after a warm-up step)."""
    if device.type != "cuda":
        raise ValueError(f"measured_estimate needs a CUDA device, got {device}")
    probe = copy.deepcopy(model).train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        _measured_bytes(probe, (1, *seq_shape), device, amp)  # warm-up: one-off costs stay out
        m1 = _measured_bytes(probe, (1, *seq_shape), device, amp)
        m2 = _measured_bytes(probe, (2, *seq_shape), device, amp)
    return Estimate(*_fixed_bytes(model), step_1=m1, per_example=max(m2 - m1, 0), how="measured steps")


def larger(a: Estimate, b: Estimate) -> Estimate:
    """Component-wise maximum of two estimates of the same model."""
    return Estimate(a.params, a.optimizer, max(a.step_1, b.step_1), max(a.per_example, b.per_example),
                    how=f"max of {a.how} and {b.how}")


def available_bytes(device: torch.device) -> tuple[int, str]:
    """Memory a run can still use on `device`, and a description of where the number comes from."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)} ({total / GIB:.1f} GiB total)"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"


def check_fits(est: Estimate, *, batch: int, device: torch.device, processes: int = 1,
               force: bool = False) -> str:
    """Return a one-line summary, or raise MemoryError (unless `force`) when the step will not fit.

    `processes` is how many training processes share this memory (CPU torchrun ranks). Parameters
    are already allocated, so they count as used in `available_bytes` and are not asked for twice.
    """
    avail, where = available_bytes(device)
    need = processes * (est.peak(batch) - est.params)
    budget = HEADROOM * avail
    line = (f"estimated peak memory per step {est.peak(batch) / GIB:.2f} GiB at batch {batch} ({est.how}: "
            f"parameters {est.params / GIB:.2f} + optimizer {est.optimizer / GIB:.2f} + step "
            f"{(est.step_1 + est.per_example * (batch - 1)) / GIB:.2f} GiB"
            f"{f', x{processes} processes' if processes > 1 else ''}); available {avail / GIB:.2f} GiB ({where})")
    if need <= budget or force:
        return line + (" -- over budget, continuing because of --force" if need > budget else "")
    fixed = processes * (est.peak(1) - est.params - est.per_example)
    fits = int((budget - fixed) // (processes * est.per_example)) if est.per_example > 0 else 0
    hint = (f"try --data.batch_size={fits}" if fits >= 1 else
            "it does not fit even at batch 1: lower --data.max_len or the model size")
    raise MemoryError(f"{line}: this run needs {need / GIB:.2f} GiB but {HEADROOM:.0%} of the available memory "
                      f"is {budget / GIB:.2f} GiB; {hint}, or pass --force to start anyway")
