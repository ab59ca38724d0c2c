"""Context parallelism (`ssm.distributed`): a sequence split over 2 and 4 CPU processes (gloo)
gives the single-process outputs and gradients, and each rank sends state-sized messages only.

The workers are forked after the parent has run the single-process models, so they start with
torch and the kernels already imported; each sets one thread before any tensor work.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ssm
from ssm.distributed import (
    context_parallel,
    gather_sequence,
    reduce_gradients,
    remove_context_parallel,
    shard_sequence,
    shard_sizes,
)
from tests.utils import assert_close

B, D_IN, D_MODEL, D_OUT, N_LAYERS = 2, 5, 16, 3, 2
CONFIGS = {
    "s4d": dict(d_state=8, backend="torch"),
    "s4": dict(d_state=8, backend="torch"),
    "mamba2": dict(d_state=8, headdim=8, expand=2, chunk_size=8, backend="torch"),
    "mamba": dict(d_state=4, backend="torch"),
}
L_MAX = 80  # S4 (DPLR): every run fixes the length its Ct belongs to


def _model(kind: str) -> ssm.SequenceModel:
    torch.manual_seed(0)
    m = ssm.SequenceModel(D_OUT, d_input=D_IN, d_model=D_MODEL, n_layers=N_LAYERS, layer=kind,
                          layer_config=dict(CONFIGS[kind]), pooling="none")
    if kind == "s4":
        m.set_l_max(L_MAX)
    return m


def _data(L: int):
    g = torch.Generator().manual_seed(L)
    return torch.randn(B, L, D_IN, generator=g), torch.randn(B, L, D_OUT, generator=g)


def _single(kind: str, L: int) -> dict:
    """The whole sequence in one process: the expected values."""
    m = _model(kind)
    x, w = _data(L)
    x.requires_grad_(True)
    y, _ = m(x)
    (y * w).sum().backward()
    return dict(y=y.detach(), gx=x.grad, gp={n: p.grad for n, p in m.named_parameters()})


class _ByteCounter:
    """Wraps the collectives this rank may call and adds up the bytes it hands to them."""

    NAMES = ("all_gather", "all_reduce", "all_gather_into_tensor", "reduce_scatter", "all_to_all", "send",
             "isend", "broadcast")

    def __init__(self):
        self.bytes, self.counting = 0, False
        for name in self.NAMES:
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, fn):
        def counted(*args, **kwargs):
            if self.counting:
                sent = args[1] if fn.__name__ == "all_gather" else args[0]
                self.bytes += sum(t.numel() * t.element_size() for t in (sent if isinstance(sent, list) else [sent]))
            return fn(*args, **kwargs)
        counted.__name__ = fn.__name__
        return counted


def _run_case(kind: str, L: int, counter: _ByteCounter) -> dict:
    m = context_parallel(_model(kind))
    x, w = _data(L)
    x.requires_grad_(True)
    counter.counting = True
    y, _ = m(shard_sequence(x))
    (y * shard_sequence(w)).sum().backward()
    counter.counting, sent = False, counter.bytes
    counter.bytes = 0
    full = gather_sequence(y.detach())
    reduce_gradients(m)
    grads = {n: p.grad for n, p in m.named_parameters()}
    remove_context_parallel(m)
    return dict(y=full, gx=x.grad, gp=grads, bytes=sent,
                classes=sorted({type(b.layer).__name__ for b in m.blocks}))


def _gathered_loss_grad(L: int) -> torch.Tensor:
    """Input gradient when every rank computes the loss on the gathered outputs (S4D)."""
    m = context_parallel(_model("s4d"))
    x, w = _data(L)
    x.requires_grad_(True)
    y, _ = m(shard_sequence(x))
    (gather_sequence(y) * w).sum().backward()
    return x.grad


def _refusals() -> list[str]:
    """The error messages of the configurations context parallelism must refuse."""
    cases = [
        lambda: context_parallel(ssm.SequenceModel(2, d_input=3, d_model=8, n_layers=1, layer="transformer",
                                                   layer_config=dict(n_heads=2), pooling="none")),
        lambda: context_parallel(ssm.SequenceModel(2, d_input=3, d_model=8, n_layers=1, pooling="mean")),
        lambda: context_parallel(ssm.S4(8, 4, bidirectional=True))(torch.randn(1, 5, 8)),
        lambda: context_parallel(ssm.S4(8, 4, mode="dplr"))(torch.randn(1, 5, 8)),
        lambda: context_parallel(ssm.S4(8, 4))(torch.randn(1, 5, 8), lengths=torch.tensor([5])),
    ]
    messages = []
    for case in cases:
        try:
            case()
            messages.append("no error")
        except ValueError as e:
            messages.append(str(e))
    return messages


def _worker(rank: int, world: int, port: int, cases: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = _ByteCounter()
    results = {case: _run_case(*case, counter) for case in cases}
    if world == 2:
        results["refusals"] = _refusals()
        results["gathered_grad"] = _gathered_loss_grad(37)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _launch(world: int, cases: list, tmp_path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(world, port, cases, str(tmp_path)), nprocs=world, join=True,
                       start_method="fork")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def _close(actual, expected, name):
    scale = max(1.0, float(expected.abs().max()))
    assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale, name=name)


def _check_case(results: list[dict], case: tuple, world: int) -> None:
    kind, L = case
    want = _single(kind, L)
    sizes = shard_sizes(L, world)
    starts = [sum(sizes[:r]) for r in range(world)]
    for r, res in enumerate(results):
        got = res[case]
        _close(got["y"], want["y"], f"{kind} world={world} rank {r}: output")
        sl = slice(starts[r], starts[r] + sizes[r])
        _close(got["gx"][:, sl], want["gx"][:, sl], f"{kind} world={world} rank {r}: input gradient")
        assert not got["gx"][:, :starts[r]].any() and not got["gx"][:, sl.stop:].any()
        for name, g in want["gp"].items():
            _close(got["gp"][name], g, f"{kind} world={world} rank {r}: gradient of {name}")


def _state_bytes(kind: str, world: int) -> int:
    """Bytes one rank hands to collectives for one forward + backward of the model (fp32)."""
    cfg = CONFIGS[kind]
    if kind in ("s4d", "s4"):
        n = D_MODEL * (cfg["d_state"] // 2 if kind == "s4d" else cfg["d_state"])
        state, tail = B * n * 2 * 4, 0                                  # complex state as 2 floats
    else:
        d_inner = 2 * D_MODEL
        heads = d_inner // cfg["headdim"] if kind == "mamba2" else d_inner
        n = d_inner * cfg["d_state"]                                    # heads * headdim = d_inner for Mamba-2
        state, tail = (B * n + B * heads) * 4, B * 3 * D_MODEL * 4       # + sum of dt; d_conv - 1 = 3 inputs
    per_layer = 8 + (state + tail) * (1 + world)                        # lengths; gathers; their all-reduces
    return N_LAYERS * per_layer


CASES_2 = [("s4d", 37), ("s4", 37), ("mamba2", 37), ("mamba", 37)]
CASES_4 = [("s4d", 37), ("s4", 37), ("mamba2", 37)]
LONGER = [("s4d", 75), ("mamba2", 75)]     # for the byte count only


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("the workers are forked (no fork start method on this platform)")
    for kind in CONFIGS:
        _single(kind, 9)                      # import every lazily imported module before forking
    return {w: _launch(w, cases, tmp_path_factory.mktemp(f"world{w}")) for w, cases in ((2, CASES_2 + LONGER), (4, CASES_4))}


@pytest.mark.parametrize("world,case", [(2, c) for c in CASES_2] + [(4, c) for c in CASES_4])
def test_matches_single_process(runs, world, case):
    _check_case(runs[world], case, world)
    restored = {"mamba": "Mamba", "mamba2": "Mamba2"}.get(case[0], "S4")
    assert runs[world][0][case]["classes"] == [restored]


@pytest.mark.parametrize("kind", ["s4d", "mamba2"])
def test_bytes_sent_are_state_sized(runs, kind):
    for res in runs[2]:
        short, long = res[(kind, 37)]["bytes"], res[(kind, 75)]["bytes"]
        assert short == long == _state_bytes(kind, 2)


def test_gather_sequence_gradient_sums_the_ranks_losses(runs):
    """Each of the 2 ranks takes the whole-sequence loss on the gathered outputs: twice the gradient."""
    want = _single("s4d", 37)["gx"]
    sizes = shard_sizes(37, 2)
    for r, res in enumerate(runs[2]):
        sl = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
        _close(res["gathered_grad"][:, sl], 2 * want[:, sl], f"rank {r}: input gradient through gather_sequence")


def test_refusals_name_the_reason(runs):
    for msg, want in zip(runs[2][0]["refusals"], ("attention", "pooling", "bidirectional", "l_max", "lengths")):
        assert want in msg, msg


def test_shard_sizes_cover_the_sequence():
    for L in (4, 37, 1 << 20):
        for world in (1, 2, 3, 4):
            sizes = shard_sizes(L, world)
            assert sum(sizes) == L and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_diag_final_state_matches_state_passing():
    """The zero-start final state of S4D against `ssm.fftconv.diag_next_state`, float64, ragged chunks."""
    from ssm.distributed.layers import diag_final_state
    from ssm.fftconv import diag_next_state
    g = torch.Generator().manual_seed(3)
    H, N2, L = 3, 5, 23
    log_z = torch.complex(-torch.rand(H, N2, generator=g, dtype=torch.float64) * 0.3,
                          torch.randn(H, N2, generator=g, dtype=torch.float64)).requires_grad_(True)
    Bb = torch.randn(H, N2, 2, generator=g, dtype=torch.float64)
    Bb = torch.view_as_complex(Bb).requires_grad_(True)
    u = torch.randn(2, H, L, generator=g, dtype=torch.float64, requires_grad=True)
    got = diag_final_state(u, log_z, Bb, chunk=7)
    want = diag_next_state(u, log_z, Bb, torch.zeros(2, H, N2, dtype=torch.complex128))
    assert_close(got, want, name="final state")
    w = torch.randn(2, H, N2, 2, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad(torch.view_as_real(s).mul(w).sum(), (u, log_z, Bb)) for s in (got, want)]
    for a, b, name in zip(*grads, ("u", "log_z", "Bb")):
        assert_close(a, b, name=f"gradient of {name}")
