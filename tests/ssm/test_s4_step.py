"""S4 streaming: the O(N r) DPLR step against a dense complex128 recurrence over 10,000 steps,
the step cache (reuse, invalidation), state exchange with chunked forward, and torch.export."""
import pytest
import torch

from ssm import filters
from ssm.layers.s4 import S4
from ssm.layers.s4_step import dplr_step_system
from tests.ssm.layer_truth import l_max_kw, layer_params, param
from tests.utils import assert_close, run_steps

H, N = 4, 16


def _layer(init="legs", **kw):
    return S4(H, N, mode="dplr", init=init, backend="torch", l_max=64, **kw).eval()


def _dense_reference(m, x):
    """Outputs of m over x (B, L, H) by the dense complex128 recurrence x_k = Ab x_{k-1} + Bb u_k,
    y_k = Re(C x_k) + D u_k, built from the parameters with `filters.dplr_dense` (a dense solve)."""
    with torch.no_grad():
        Lam, B, Ct, P, dt = (t.cdouble() if t.is_complex() else t.double() for t in layer_params(m))
        Ab, Bb = filters.dplr_dense(Lam, P, B, dt)                      # (H, N, N), (H, N)
        C = filters.ct_to_c(filters.full_c(Ct), Ab, m.l_max)            # (c, H, N)
        s = torch.zeros(x.shape[0], H, N, dtype=torch.complex128)
        ys = []
        for t in range(x.shape[1]):
            u = x[:, t].double()                                        # (B, H)
            s = torch.einsum("hnm,bhm->bhn", Ab, s) + Bb * u[..., None]
            ys.append(torch.einsum("chn,bhn->bch", C, s).real + m.D.double() * u[:, None, :])
        y = torch.stack(ys, 1)                                          # (B, L, c, H)
        return m.output(y.transpose(-1, -2).reshape(x.shape[0], x.shape[1], -1).float()), s


def test_dplr_step_system_is_the_dense_bilinear_system():
    m = _layer("legt", rank=3)
    Lam, B, _, P, dt = (t.detach().cdouble() if t.is_complex() else t.detach().double() for t in layer_params(m))
    z, E, F, Bb = dplr_step_system(Lam, P, B, dt)
    Ab_ref, Bb_ref = filters.dplr_dense(Lam, P, B, dt)
    assert_close(torch.diag_embed(z) - E.transpose(-1, -2) @ F, Ab_ref, name="Ab = diag(z) - E^T F")
    assert_close(Bb, Bb_ref, name="Bb")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("init", ["legs", "legt", pytest.param("fout", marks=pytest.mark.slow),
                                  pytest.param("lagt", marks=pytest.mark.slow)])
def test_step_equals_dense_float64_step_over_10000_steps(init):
    m = _layer(init, dt_min=1e-3, dt_max=1e-1)
    x = torch.randn(2, 10_000, H)
    y, s = run_steps(m, x)
    y_ref, s_ref = _dense_reference(m, x)
    # target 1e-5. LagT's A is one Jordan block: any float32 recurrence of it (the dense complex64
    # step too) amplifies rounding, measured 4e-5 after 3,000 and 1.3e-4 after 10,000 steps at N=64
    tol = 3e-4 if init == "lagt" else 1e-5
    assert_close(y, y_ref, rtol=0, atol=tol, name=f"{init}: 10,000 steps")
    assert_close(s, s_ref.to(s.dtype), rtol=1e-5, atol=tol, name=f"{init}: state after 10,000 steps")


def test_step_reuses_its_cache_and_setup_step_builds_it():
    m = _layer()
    m.setup_step()
    cache = m._step_cache
    assert cache is not None and cache[1][0] == "dplr"
    run_steps(m, torch.randn(1, 3, H))
    assert m._step_cache is cache
    m.setup_step(dense=True)
    assert m._step_cache[1][0] == "dense"
    with pytest.raises(ValueError, match="dense=True"):
        S4(H, N, mode="diag").setup_step(dense=True)


def test_dense_and_dplr_steps_agree():
    m = _layer("legt")
    x = torch.randn(2, 50, H)
    y_dplr, s_dplr = run_steps(m, x)
    m.setup_step(dense=True)
    y_dense, s_dense = run_steps(m, x)
    assert_close(y_dplr, y_dense, rtol=1e-5, atol=1e-5, name="dplr vs dense step")
    assert_close(s_dplr, s_dense, rtol=1e-5, atol=1e-5, name="states")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_optimizer_step_and_load_state_dict_invalidate_the_step_cache(mode):
    m = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 32))
    x = torch.randn(2, 32, H)
    xt = torch.randn(2, H)
    m.eval().setup_step()
    with torch.no_grad():
        before, _ = m.step(xt, m.default_state(2))
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m(x)[0].square().mean().backward()
    opt.step()
    m.eval()
    fresh = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 32)).eval()
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        after, _ = m.step(xt, m.default_state(2))
        want, _ = fresh.step(xt, fresh.default_state(2))
    assert (after - before).abs().max() > 1e-4                         # the optimizer step shows
    assert_close(after, want, name="cached step after an optimizer step == a fresh layer")
    other = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 32)).eval()
    with torch.no_grad():
        other.step(xt, other.default_state(2))                        # fills other's cache
        other.load_state_dict(m.state_dict())
        got, _ = other.step(xt, other.default_state(2))
    assert_close(got, want, name="step after load_state_dict")


@pytest.mark.parametrize("init", ["legs", "fout"])
def test_states_pass_between_step_and_chunked_forward(init):
    m = _layer(init)
    x = torch.randn(2, 30, H)
    with torch.no_grad():
        y_whole, s_whole = m(x, state=m.default_state(2))
        y1, s1 = m(x[:, :11], state=m.default_state(2))                       # forward -> step
        y2, s2 = run_steps(m, x[:, 11:20], s1)
        y3, s3 = m(x[:, 20:], state=s2)                                       # step -> forward
    tol = 1e-4 if init == "fout" else 1e-5                              # FouT conv: see test_ssm_dplr
    assert_close(torch.cat([y1, y2, y3], 1), y_whole, rtol=1e-5, atol=tol, name="outputs")
    assert_close(s3, s_whole, rtol=1e-5, atol=1e-5, name="final state")


@pytest.mark.parametrize("mode", ["diag", "dplr"])
def test_step_after_setup_step_exports_and_matches_eager(mode):
    m = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 32)).eval()
    m.setup_step()

    class Step(torch.nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, x, state):
            return self.layer.step(x, state)

    x, s = torch.randn(2, H), 0.1 * torch.randn_like(m.default_state(2))
    ep = torch.export.export(Step(m), (x, s))
    targets = {str(n.target) for g in ep.graph_module.modules() if isinstance(g, torch.fx.GraphModule)
               for n in g.graph.nodes if n.op == "call_function"}
    assert "aten.mul.Tensor" in targets                                 # the step itself is traced
    assert not any("linalg" in t or "local_scalar" in t for t in targets), targets   # cache, no .item()
    with torch.no_grad():
        y_ep, s_ep = ep.module()(x, s)
        y, s_next = m.step(x, s)
    assert_close(y_ep, y, rtol=1e-5, atol=1e-5, name="exported step")
    assert_close(s_ep, s_next, rtol=1e-5, atol=1e-5, name="exported state")
    bare = S4(H, N, mode=mode, backend="torch", **l_max_kw(mode, 32)).eval()
    with pytest.raises(RuntimeError, match=r"call setup_step\(rate=1.0\)"):
        torch.export.export(Step(bare), (x, s))


def test_step_with_grad_reaches_the_ssm_parameters():
    m = _layer("legt").train()
    m.setup_step()                                                      # a cache must not cut the graph
    y, s = m.step(torch.randn(2, H), m.default_state(2))
    y2, _ = m.step(torch.randn(2, H), s)
    (y2.square().sum() + y.square().sum()).backward()
    for name in ("log_neg_real", "imag", "B", "P", "C", "log_dt"):
        g = param(m, name).grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, name
