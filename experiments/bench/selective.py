"""Benchmark cases of the selective operators (`selective_scan`, `ssd`, `mamba3` = the SISO
`mamba3_scan`) and layers (Mamba, Mamba-2, peers).

Shapes: an op row's H is the scan's channel count (d_inner = expand * d_model; `ssd` splits it
into heads of P = 64), N the state size, batch 1. A layer row's H is d_model, N the state size;
the layer is `ssm.Mamba(H, N)` / `ssm.Mamba2(H, N, headdim=64)` (expand 2) or a peer
(`experiments.bench.peers`) holding the same weights.

Correctness before timing:
- ops: every provider, on the first CHECK_L tokens (a causal prefix, so the check is exact and
  small), output and every input gradient against the float64 sequential definition; allowed
  error 2x that of the same definition run in float32, plus 1e-6 x max |truth| (the operator
  error budget of the other ops).
- layers: a peer's output on the first CHECK_L tokens against the ssmkit layer's (which the test
  suite checks against float64): relative error <= PEER_RTOL.

Floors (what no implementation can avoid; timed in the same loop as the case, alternating):
- op: the scan's compulsory elementwise work. selective_scan (a diagonal A per channel: every
  algorithm forms every per-token state element (b, l, channel, n)): one pass over them without
  the recurrence's dependency, exp(dt A), dt u B + exp(dt A) h and the readout C h, 7 FLOPs per
  state element. ssd (one scalar decay per head: the chunked algorithm forms states only at chunk
  boundaries, with matrix products): one elementwise pass over its inputs and output, y-sized
  x (dt + D) and the B, C read, 3 FLOPs per (token, channel) and 2 per (token, n); its floor is the
  memory traffic. mamba3 (SISO; the same chunked algorithm as ssd): the ssd floor plus what the
  data-dependent rotation adds, one cumulative sum of the angles and one rotation of B and C per
  head, 6 FLOPs per (token, head, n). fwd: one pass; fwd+bwd: two (the backward revisits them at least once). The
  row also carries these `flops` and the compulsory `bytes` (every input read once and every
  output written once, float32).
- layer: the projections forward + backward (input, weight and bias gradients; Mamba: in_proj,
  x_proj, dt_proj, out_proj; Mamba-2: in_proj, out_proj) plus one forward pass of the op floor
  above. The depthwise convolution, gate, norm and the recurrence's sequential dependency are not in it.
"""
from __future__ import annotations

import math

import torch

OPS = ("selective_scan", "ssd", "mamba3")
LAYERS = ("mamba", "mamba2", "mamba-hf", "mamba-hf-pscan", "mamba-mambapy", "mamba2-hf")
PROVIDERS = ("torch", "triton", "plain", "mambapy")
DEFAULT_N = {"selective_scan": 16, "ssd": 64, "mamba3": 64, "mamba": 16, "mamba2": 64}
HEADDIM = 64
CHECK_L = 256
PEER_RTOL = 1e-4
FLOOR_CHUNK = 256


def layer_kind(name: str) -> str:
    """"mamba" or "mamba2": the ssmkit layer a row (ours or a peer) implements."""
    return "mamba2" if name.startswith("mamba2") else "mamba"


# ----- operator inputs, providers, floor --------------------------------------------------------

def op_inputs(op: str, H: int, N: int, L: int, *, device: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device)
    if op == "selective_scan":
        A = -torch.arange(1, N + 1, dtype=torch.float32).expand(H, N).contiguous().to(device)   # (D, N)
        return dict(u=rnd(1, H, L), delta=rnd(1, H, L, scale=0.5), A=A, B=rnd(1, N, L), C=rnd(1, N, L),
                    D=rnd(H), z=rnd(1, H, L), delta_bias=rnd(H, scale=0.5) - 3.0)
    if H % HEADDIM:
        raise ValueError(f"{op}: H (channels) must be a multiple of the head size {HEADDIM}, got {H}")
    nh = H // HEADDIM
    if op == "mamba3":
        dt = torch.nn.functional.softplus(rnd(1, L, nh, scale=0.5) - 3.0)
        return dict(x=rnd(1, L, nh, HEADDIM), dt=dt, A=-torch.rand(1, L, nh, generator=g).to(device) * 4 - 0.5,
                    B=rnd(1, L, 1, N), C=rnd(1, L, 1, N), lam=torch.rand(1, L, nh, generator=g).to(device),
                    theta=rnd(1, L, nh, N // 2), D=rnd(nh))
    return dict(x=rnd(1, L, nh, HEADDIM), dt=rnd(1, L, nh, scale=0.5), A=-torch.linspace(1, 16, nh).to(device),
                B=rnd(1, L, 1, N), C=rnd(1, L, 1, N), D=rnd(nh), dt_bias=rnd(nh, scale=0.5) - 3.0)


def _prefix(op: str, inp: dict, L: int) -> dict:
    time_dim = {"selective_scan": {"u": 2, "delta": 2, "B": 2, "C": 2, "z": 2}, "ssd": {"x": 1, "dt": 1, "B": 1, "C": 1},
                "mamba3": {k: 1 for k in ("x", "dt", "A", "B", "C", "lam", "theta")}}
    return {k: (v.narrow(time_dim[op][k], 0, L) if k in time_dim[op] else v) for k, v in inp.items()}


def _reference(op: str, inp: dict) -> torch.Tensor:
    if op == "selective_scan":
        from kernels.selective_scan.reference import selective_scan_ref
        i = inp
        return selective_scan_ref(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"], i["delta_bias"], True)
    if op == "mamba3":
        from kernels.mamba3.reference import mamba3_ref
        i = inp
        return mamba3_ref(i["x"], i["dt"], i["A"], i["B"], i["C"], i["lam"], i["theta"], D=i["D"])[0]
    from kernels.ssd.reference import ssd_ref
    i = inp
    return ssd_ref(i["x"], i["dt"], i["A"], i["B"], i["C"], i["D"], dt_bias=i["dt_bias"], dt_softplus=True)[0]


def _mambapy_scan(inp: dict) -> torch.Tensor:
    """The selective scan the way `mambapy` / `transformers(use_mambapy=True)` run it: discretize
    every (l, d, n) state element, then `mambapy.pscan` (L padded to a power of two inside)."""
    from mambapy.pscan import pscan
    u, B, C = inp["u"], inp["B"], inp["C"]
    dt = torch.nn.functional.softplus(inp["delta"] + inp["delta_bias"][:, None]).transpose(1, 2)   # (b, L, D)
    dA = torch.exp(dt.unsqueeze(-1) * inp["A"])                                                  # (b, L, D, N)
    dBu = (dt * u.transpose(1, 2)).unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2)               # (b, L, D, N)
    hs = pscan(dA, dBu)                                                                          # (b, L, D, N)
    y = (hs @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)                      # (b, D, L)
    y = y + inp["D"][:, None] * u
    return y * torch.nn.functional.silu(inp["z"])


def op_provider(op: str, name: str, device: str = "cpu"):
    """inputs -> output for provider `name`; raises LookupError(reason) when it cannot run."""
    if name in ("torch", "triton"):
        from kernels._triton import why_not
        reason = why_not(torch.zeros(0, device=device)) if name == "triton" else None
        if reason is not None:
            raise LookupError(f"triton: {reason}")
        if op == "selective_scan":
            from kernels.selective_scan import selective_scan
            return lambda i: selective_scan(i["u"], i["delta"], i["A"], i["B"], i["C"], i["D"], i["z"],
                                            i["delta_bias"], True, backend=name)
        if op == "mamba3":
            from kernels.mamba3 import mamba3_scan
            return lambda i: mamba3_scan(i["x"], i["dt"], i["A"], i["B"], i["C"], i["lam"], i["theta"], D=i["D"],
                                         backend=name)
        from kernels.ssd import ssd
        return lambda i: ssd(i["x"], i["dt"], i["A"], i["B"], i["C"], 256, i["D"], dt_bias=i["dt_bias"],
                             dt_softplus=True, backend=name)
    if name == "plain":
        return lambda i: _reference(op, i)
    if name == "mambapy":
        import importlib.util
        if op != "selective_scan":
            raise LookupError("mambapy has no CPU Mamba-2 scan (its mamba2 module needs mamba_ssm)")
        if importlib.util.find_spec("mambapy") is None:
            raise LookupError("mambapy is not installed")
        return _mambapy_scan
    raise LookupError(f"no {name!r} provider for {op} (selective ops: {PROVIDERS})")


def op_counts(op: str, H: int, N: int, L: int, mode: str) -> tuple[float, float]:
    """(FLOPs, bytes) of the op floor (module docstring) for one call, batch 1."""
    passes = 1 if mode == "fwd" else 2
    if op == "selective_scan":
        flops = 7.0 * H * N * L
        nbytes = 4.0 * (3 * H * L + 2 * N * L + H * N + 2 * H) + 4.0 * H * L
    else:
        flops = 3.0 * H * L + 2.0 * N * L
        nbytes = 4.0 * (H * L + 2 * (H // HEADDIM) * L + 2 * N * L) + 4.0 * H * L
        if op == "mamba3":
            nh = H // HEADDIM
            flops += 6.0 * nh * N * L
            nbytes += 4.0 * (2 * nh * L + nh * L * N // 2)                 # A, lam, theta
    return passes * flops, passes * nbytes


def scan_pass(op: str, inp: dict):
    """One pass of the op's compulsory elementwise work (module docstring), chunked along L."""
    if op == "selective_scan":
        A = inp["A"]
        def one():
            for s in range(0, inp["u"].shape[-1], FLOOR_CHUNK):
                dt, u = inp["delta"][..., s:s + FLOOR_CHUNK], inp["u"][..., s:s + FLOOR_CHUNK]   # (b, D, l)
                Bm, Cm = inp["B"][..., s:s + FLOOR_CHUNK], inp["C"][..., s:s + FLOOR_CHUNK]      # (b, N, l)
                a = torch.exp(dt.unsqueeze(-1) * A[:, None, :])                                   # (b, D, l, N)
                h = torch.addcmul(a, (dt * u).unsqueeze(-1), Bm.transpose(1, 2).unsqueeze(1))    # (b, D, l, N)
                (h * Cm.transpose(1, 2).unsqueeze(1)).sum(-1)                                     # (b, D, l)
        return one

    def one():
        x, dt, D = inp["x"], inp["dt"], inp["D"]                                                 # (b, L, H, P), (b, L, H)
        torch.addcmul(x * D[:, None], x, dt.unsqueeze(-1))                                       # (b, L, H, P)
        (inp["B"] * inp["C"]).sum(-1)                                                            # (b, L, 1)
        if op == "mamba3":                                                                       # angles, rotations
            phi = torch.cumsum(inp["theta"] * dt.unsqueeze(-1), dim=1)                          # (b, L, H, N/2)
            c, s_ = torch.cos(phi), torch.sin(phi)
            for M in (inp["B"], inp["C"]):
                m = M.unflatten(-1, (-1, 2))                                                     # (b, L, 1, N/2, 2)
                m[..., 0] * c - m[..., 1] * s_, m[..., 0] * s_ + m[..., 1] * c
    return one


def _grad_names(op: str) -> tuple[str, ...]:
    return tuple(op_inputs(op, HEADDIM, 2, 1, device="cpu"))


def check_op(op: str, fn, inputs: dict, mode: str) -> dict:
    """The op check of the module docstring; {"ok", "reason", "errors": {name: [err, budget]}}."""
    names = _grad_names(op) if mode == "fwdbwd" else ()
    pre = _prefix(op, inputs, min(CHECK_L, inputs["u" if op == "selective_scan" else "x"].shape[-1 if op == "selective_scan" else 1]))
    def run(f, dtype):
        i = {k: v.detach().to(dtype).requires_grad_(k in names) for k, v in pre.items()}
        out = f(i)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out)
        return [out.detach()] + (list(torch.autograd.grad(out, [i[k] for k in names], g)) if names else [])
    got, truth, plain = run(fn, torch.float32), run(lambda i: _reference(op, i), torch.float64), \
        run(lambda i: _reference(op, i), torch.float32)
    errors, bad = {}, []
    for name, a, t, p in zip(("out",) + tuple(f"grad_{k}" for k in names), got, truth, plain):
        e = (a.double() - t).abs().max().item()
        budget = 2.0 * (p.double() - t).abs().max().item() + 1e-6 * max(1.0, t.abs().max().item())
        errors[name] = [e, budget]
        if not (e <= budget):
            bad.append(f"{name}: error {e:.2e} > budget {budget:.2e}")
    return {"ok": not bad, "reason": "; ".join(bad), "errors": errors}


def run_selective_op_case(case: dict, *, before_timing=None) -> dict:
    """Check, then time (interleaved with the op floor), one selective op case."""
    from experiments.bench.timing import time_case
    op, H, N, L, mode, device = (case[k] for k in ("op", "H", "N", "L", "mode", "device"))
    res = {"kind": "op", **{k: case[k] for k in ("op", "provider", "H", "N", "L", "mode")}}
    try:
        fn = op_provider(op, case["provider"], device)
    except LookupError as e:
        return {**res, "status": "SKIPPED", "reason": str(e)}
    try:
        inputs = op_inputs(op, H, N, L, device=device)
        chk = check_op(op, fn, inputs, mode)
    except Exception as e:  # noqa: BLE001  a provider that crashes is a FAILED row, never a crashed run
        return {**res, "status": "FAILED", "reason": f"check raised {type(e).__name__}: {str(e)[:200]}"}
    res["check"] = chk["errors"]
    if not chk["ok"]:
        return {**res, "status": "FAILED", "reason": chk["reason"]}
    names = _grad_names(op) if mode == "fwdbwd" else ()
    inp = {k: v.detach().requires_grad_(k in names) for k, v in inputs.items()}
    if before_timing is not None:
        before_timing()
    if names:
        out = fn(inp)
        g = torch.randn_like(out)
        call = (lambda: torch.autograd.grad(fn(inp), [inp[k] for k in names], g))
    else:
        call = (lambda: fn(inp))
    call()
    one = scan_pass(op, {k: v.detach() for k, v in inputs.items()})
    floor = one if mode == "fwd" else (lambda: (one(), one()))
    res = time_case(res, call, device=device, case=case, floor=floor)
    if res["status"] == "OK":
        flops, nbytes = op_counts(op, H, N, L, mode)
        res.update(flops=flops, bytes=nbytes, flop_per_s=flops / res["median_s"], bytes_per_s=nbytes / res["median_s"])
    return res


# ----- layers -----------------------------------------------------------------------------------

def layer_floor(kind: str, B: int, H: int, N: int, L: int, *, mode: str, device: str):
    """The layer floor (module docstring): projections fwd+bwd plus one op-floor pass (fwd rows:
    the projections' forward only)."""
    D = 2 * H
    gen = torch.Generator(device).manual_seed(1)
    def rnd(*s):
        return torch.randn(*s, generator=gen, device=device)
    if kind == "mamba":
        R = math.ceil(H / 16)
        lins = [torch.nn.Linear(H, 2 * D, bias=False), torch.nn.Linear(D, R + 2 * N, bias=False),
                torch.nn.Linear(R, D), torch.nn.Linear(D, H, bias=False)]
        op, inp = "selective_scan", op_inputs("selective_scan", D, N, L, device=device)
    else:
        nh = D // HEADDIM
        lins = [torch.nn.Linear(H, 2 * D + 2 * N + nh, bias=False), torch.nn.Linear(D, H, bias=False)]
        op, inp = "ssd", op_inputs("ssd", D, N, L, device=device)
    lins = [m.to(device) for m in lins]
    xs = [rnd(B, L, m.in_features).requires_grad_(True) for m in lins]
    gs = [rnd(B, L, m.out_features) for m in lins]
    one = scan_pass(op, inp)

    def call():
        for m, x, g in zip(lins, xs, gs):
            if mode == "fwd":
                with torch.no_grad():
                    m(x)
            else:
                torch.autograd.grad(m(x), [x, *m.parameters()], g)
        one()
    return call


def check_peer(m, name: str, H: int, N: int, device: str) -> str | None:
    """None, or why peer `m` does not reproduce the ssmkit layer (ours pass: None)."""
    if name in ("mamba", "mamba2"):
        return None
    from experiments.bench import peers
    ref = peers.ours(layer_kind(name), H, N, device=device)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, CHECK_L, H, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        want, got = ref(x)[0], m(x)
    got = got[0] if isinstance(got, tuple) else got
    err = float((got - want).abs().max() / want.abs().max())
    return None if err <= PEER_RTOL else f"peer differs from ssmkit: relative error {err:.2e} > {PEER_RTOL:g}"


def build_layer(name: str, H: int, N: int, *, device: str):
    """(module, None) or (None, reason it cannot run)."""
    from experiments.bench import peers
    torch.manual_seed(0)
    mine = peers.ours(layer_kind(name), H, N, device=device)
    if name in ("mamba", "mamba2"):
        return mine, None
    try:
        return peers.build(name, H, N, device=device, weights_from=mine), None
    except peers.PeerUnavailable as e:
        return None, str(e)
