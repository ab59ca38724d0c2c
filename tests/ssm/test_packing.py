"""Packed documents (`seq_idx`) through the layers, blocks and `SequenceModel`: a packed row gives
what separate runs of each document give, in float64, forward, final state and every gradient
(inputs and parameters); a given state feeds each row's first document; bad `seq_idx` raises; and
training on packed batches follows the same loss curve as training on padded ones."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

import ssm.fftconv as fftconv_module
from ssm.config import BlockConfig
from ssm.layers.block import S4Block, SelectiveBlock
from ssm.layers.mamba import Mamba
from ssm.layers.mamba2 import Mamba2
from ssm.layers.s4 import S4
from ssm.models import SequenceModel
from ssm.packing import seq_idx_from_cu_seqlens
from tests.utils import assert_close

H = 4
# Two rows of 20 positions: documents of length 1, 2, odd, and longer than the DPLR layers' l_max.
ROWS = ([1, 2, 5, 9, 3], [12, 1, 7])
L_MAX = 8


def labels(rows=ROWS) -> torch.Tensor:
    return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows])   # (B, L)


def _slices(rows=ROWS):
    """(row, start, length, index in row) of every document."""
    out = []
    for b, r in enumerate(rows):
        start = 0
        for i, n in enumerate(r):
            out.append((b, start, n, i))
            start += n
    return out


def _state_loss(state, g):
    if state is None:
        return 0.0
    if isinstance(state, (tuple, list)):
        return sum(_state_loss(s, gs) for s, gs in zip(state, g))
    return (state * g).real.sum()


def _row(state, b):
    return tuple(s[b:b + 1] for s in state) if isinstance(state, tuple) else state[b:b + 1]


def _cat(states):
    if isinstance(states[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*states))
    return torch.cat(states)


def packed_and_separate(layer, x, state=None, rows=ROWS):
    """(packed, separate): each (y, next_state, grads by name) for the loss <y, gy> + <state, gs>."""
    g = torch.Generator().manual_seed(11)
    gy = torch.randn(x.shape, generator=g, dtype=x.dtype)
    gs = None if state is None else (
        tuple(torch.randn(s.shape, generator=g, dtype=torch.float64).to(s.dtype) for s in state)
        if isinstance(state, tuple) else torch.randn(state.shape, generator=g, dtype=torch.complex128).to(state.dtype))
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    params = [p for _, p in layer.named_parameters()]

    def grads(loss, xl):
        gr = torch.autograd.grad(loss, [xl] + params, allow_unused=True)
        return {n: torch.zeros_like(v) if d is None else d for n, v, d in zip(names, [xl] + params, gr)}

    xp = x.detach().clone().requires_grad_()
    y, ns = layer(xp, state=state, seq_idx=labels(rows))
    packed = (y.detach(), ns, grads((y * gy).sum() + _state_loss(ns, gs), xp))

    xs = x.detach().clone().requires_grad_()
    ys, loss, finals = torch.zeros_like(x), 0.0, []
    for b, start, n, i in _slices(rows):
        last = i == len(rows[b]) - 1
        init = None if state is None else _row(state, b) if i == 0 else layer.default_state(1) if last else None
        y_doc, ns_doc = layer(xs[b:b + 1, start:start + n], state=init)
        ys[b, start:start + n] = y_doc[0].detach()
        loss = loss + (y_doc * gy[b:b + 1, start:start + n]).sum()
        if last:
            finals.append(ns_doc)
    final = None if state is None else _cat(finals)
    return packed, (ys, final, grads(loss + _state_loss(final, gs), xs))


def check(packed, separate, name, **tol):
    assert_close(packed[0], separate[0], name=f"{name} y", **tol)
    if separate[1] is not None:
        for a, b in zip(packed[1] if isinstance(packed[1], tuple) else (packed[1],),
                        separate[1] if isinstance(separate[1], tuple) else (separate[1],)):
            assert_close(a.detach(), b.detach(), name=f"{name} next state", **tol)
    for k in separate[2]:
        assert_close(packed[2][k], separate[2][k], name=f"{name} grad {k}", **tol)


def _s4(**options):
    torch.manual_seed(0)
    return S4(H, 8, backend="torch", **options).double().eval()


S4_CASES = {
    "s4d": dict(mode="diag"),
    "s4d-bidirectional": dict(mode="diag", bidirectional=True, channels=2),
    "s4-legs": dict(mode="dplr", init="legs", l_max=L_MAX),
    "s4-legt-bidirectional": dict(mode="dplr", init="legt", l_max=L_MAX, bidirectional=True),
}


# The DPLR layer's separate runs use the learned Ct directly, the packed row's boundary
# corrections use the recurrent C = Ct (I - Ab^l_max)^-1: both are exact, but the solve passes
# its condition number on to the float64 rounding (small for LegS and LegT; the Fourier measure
# at l_max = 8 agrees to about 1e-7 of its largest gradient only).
DPLR_TOL = dict(rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("path", ["documents", "row"])
@pytest.mark.parametrize("case", list(S4_CASES))
def test_s4_packed_equals_separate_runs(case, path, monkeypatch):
    # Both convolution paths: the documents as a batch of their own, and the whole row with the
    # cross-document part subtracted.
    monkeypatch.setattr(fftconv_module, "DOCUMENT_BATCH_WASTE", math.inf if path == "documents" else 0.0)
    layer = _s4(**S4_CASES[case])
    x = torch.randn(2, 20, H, dtype=torch.float64)
    state = None if layer.config.bidirectional else torch.randn_like(layer.default_state(2))
    check(*packed_and_separate(layer, x, state), case, **(DPLR_TOL if layer.config.mode == "dplr" else {}))


@pytest.mark.parametrize("cls,options", [
    (Mamba, dict(d_state=4, d_conv=4)),
    (Mamba2, dict(d_state=4, headdim=4, chunk_size=4, ngroups=2)),
], ids=["mamba", "mamba2"])
def test_selective_packed_equals_separate_runs(cls, options):
    torch.manual_seed(0)
    layer = cls(H, **options, backend="torch").double()
    x = torch.randn(2, 20, H, dtype=torch.float64)
    state = tuple(torch.randn_like(s) for s in layer.default_state(2))
    check(*packed_and_separate(layer, x, state), cls.__name__)
    check(*packed_and_separate(layer, x, None), f"{cls.__name__} without state")


@pytest.mark.parametrize("make", [
    lambda: S4Block(H, d_state=8, mode="dplr", init="legs", l_max=L_MAX, backend="torch",
                    block=BlockConfig(d_ff=8, prenorm=False)),
    lambda: SelectiveBlock(H, config=Mamba2(H, d_state=4, headdim=4, chunk_size=4).config),
], ids=["s4-block", "mamba2-block"])
def test_blocks_pass_seq_idx(make):
    torch.manual_seed(0)
    block = make().double().eval()
    check(*packed_and_separate(block, torch.randn(2, 20, H, dtype=torch.float64)), type(block).__name__, **DPLR_TOL)


@pytest.mark.parametrize("layer,options,pooling", [("s4d", dict(d_state=4, backend="torch"), "none"),
                                                   ("s4d", dict(d_state=4, backend="torch"), "last"),
                                                   ("s4", dict(d_state=4, l_max=L_MAX, init="legt", backend="torch"), "mean"),
                                                   ("mamba", dict(d_state=4), "last"),
                                                   ("mamba2", dict(d_state=4, headdim=4, chunk_size=4), "mean")])
def test_sequence_model_packed_equals_separate(layer, options, pooling):
    torch.manual_seed(0)
    model = SequenceModel(3, vocab_size=9, d_model=8, n_layers=2, layer=layer, layer_config=options,
                          pooling=pooling, pos="sinusoidal").double().eval()
    tokens = torch.randint(0, 9, (2, 20))
    out, _ = model(tokens, seq_idx=labels())
    parts = [model(tokens[b:b + 1, s:s + n])[0] for b, s, n, _ in _slices()]
    want = torch.cat(parts, 1 if pooling == "none" else 0).reshape(out.shape)
    assert_close(out, want, name=f"{layer} pooling={pooling}", **(DPLR_TOL if layer == "s4" else {}))
    if pooling != "none":
        assert out.shape == (sum(len(r) for r in ROWS), 3)


def test_sequence_model_cu_seqlens_is_one_packed_row():
    torch.manual_seed(0)
    model = SequenceModel(3, vocab_size=9, d_model=8, n_layers=1, layer="mamba2", pooling="none",
                          layer_config=dict(d_state=4, headdim=4, chunk_size=4)).double()
    tokens = torch.randint(0, 9, (1, 12))
    cu = torch.tensor([0, 1, 6, 12])
    a, _ = model(tokens, cu_seqlens=cu)
    b, _ = model(tokens, seq_idx=seq_idx_from_cu_seqlens(cu))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="batch size 1"):
        model(tokens.expand(2, -1), cu_seqlens=cu)
    with pytest.raises(ValueError, match="not both"):
        model(tokens, cu_seqlens=cu, seq_idx=seq_idx_from_cu_seqlens(cu))
    with pytest.raises(ValueError, match="must equal the sequence length 12"):
        model(tokens, cu_seqlens=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="lengths cannot be combined"):
        model(tokens, cu_seqlens=cu, lengths=torch.tensor([12]))
    with pytest.raises(ValueError, match="pooling='cls'"):
        SequenceModel(3, vocab_size=9, d_model=8, n_layers=1, pooling="cls")(tokens, cu_seqlens=cu)


@pytest.mark.parametrize("make", [lambda: S4(H, 8), lambda: Mamba(H, d_state=4), lambda: Mamba2(H, d_state=4, headdim=4)],
                         ids=["s4", "mamba", "mamba2"])
def test_bad_seq_idx_names_the_problem(make):
    layer = make()
    x = torch.randn(2, 6, H)
    good = torch.tensor([[0, 0, 1, 1, 1, 2]] * 2)
    for bad, err, match in ((good.float(), TypeError, "integer"),
                            (good[:, :5], ValueError, r"shape \(2, 6\)"),
                            (good.flip(-1), ValueError, "non-decreasing"),
                            (good.tolist(), TypeError, "tensor")):
        with pytest.raises(err, match=match):
            layer(x, seq_idx=bad)
    with pytest.raises(ValueError, match="seq_idx and lengths cannot be combined"):
        layer(x, seq_idx=good, lengths=torch.tensor([6, 6]))


def _documents(n_docs=5, max_len=7, vocab=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n_docs,), generator=g)
    docs = [torch.randint(0, vocab, (int(n),), generator=g) for n in lens]
    targets = [torch.roll(d, -1) % 3 for d in docs]                    # a per-token task
    return docs, targets


def _curve(model, docs, targets, packed: bool, steps: int = 10):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if packed:
        tokens = torch.cat(docs)[None]                                 # (1, total)
        cu = torch.tensor([0] + [len(d) for d in docs]).cumsum(0)
        target = torch.cat(targets)[None]
        mask = torch.ones_like(target, dtype=torch.bool)
        kw = dict(cu_seqlens=cu)
    else:
        n = max(len(d) for d in docs)
        tokens = torch.stack([torch.nn.functional.pad(d, (0, n - len(d))) for d in docs])   # (n_docs, n)
        target = torch.stack([torch.nn.functional.pad(t, (0, n - len(t))) for t in targets])
        lengths = torch.tensor([len(d) for d in docs])
        mask = torch.arange(n)[None] < lengths[:, None]
        kw = dict(lengths=lengths)
    losses = []
    for _ in range(steps):
        logits, _ = model(tokens, **kw)                                # (B, L, 3)
        loss = torch.nn.functional.cross_entropy(logits[mask], target[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("layer,options", [("s4d", dict(d_state=4, backend="torch")),
                                           ("mamba2", dict(d_state=4, headdim=4, chunk_size=4))])
def test_packed_training_follows_the_padded_loss_curve(layer, options):
    torch.manual_seed(0)
    model = SequenceModel(3, vocab_size=7, d_model=8, n_layers=1, layer=layer, layer_config=options, pooling="none")
    docs, targets = _documents()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        padded = _curve(copy.deepcopy(model), docs, targets, packed=False)
        packed = _curve(copy.deepcopy(model), docs, targets, packed=True)
    assert padded[-1] < padded[0]                                      # it learns something
    assert_close(packed, padded, rtol=1e-4, atol=1e-6, name=f"{layer} loss curve (float32)")
