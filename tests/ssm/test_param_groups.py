"""Learning rates and weight decay per parameter kind: `ssm.param_groups` and the `param_kinds` tags.

Layers carry no optimizer settings: the SSM modules tag their parameters by kind ("A", "B", "P",
"dt", "C") in a dict on the module, and `param_groups(model, lr, wd, ssm_lr=, dt_lr=)` maps kinds
to groups. The tags must survive `copy.deepcopy` and `load_state_dict(..., assign=True)`.
"""
import copy

import pytest
import torch

import ssm
from ssm.layers.block import S4Block
from ssm.layers.params import param_groups, param_kinds
from ssm.layers.s4 import S4
from ssm.models import SequenceModel

SSM_NAMES = ("log_neg_real", "imag", "B", "P")


def _settings(model, lr=1e-2, wd=0.1, **kw):
    groups = param_groups(model, lr, wd, **kw)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()), "each parameter exactly once"
    assert all(set(g) == {"params", "lr", "weight_decay"} for g in groups)
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def _named_groups(model, **kw):
    """The groups with parameters named, so two copies of a model can be compared."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"])
            for g in param_groups(model, 1e-2, 0.1, **kw)]


@pytest.mark.parametrize("mode", ["diag", "dplr"])
@pytest.mark.parametrize("ssm_lr,dt_lr", [(2e-3, None), (None, 5e-4), (None, None), (2e-3, 3e-3)])
def test_param_groups_lr_per_kind(mode, ssm_lr, dt_lr):
    blk = S4Block(8, d_state=8, mode=mode, norm="batch", backend="torch")
    got = _settings(blk, lr=1e-2, wd=0.1, ssm_lr=ssm_lr, dt_lr=dt_lr)
    p = blk.layer.ssm
    for name in SSM_NAMES:
        if hasattr(p, name):
            assert got[id(getattr(p, name))] == (1e-2 if ssm_lr is None else ssm_lr, 0.0), name
    assert got[id(p.log_dt)] == (1e-2 if dt_lr is None else dt_lr, 0.0)
    assert got[id(p.C)] == (1e-2, 0.1) and got[id(blk.layer.out.weight)] == (1e-2, 0.1)
    assert got[id(blk.layer.out.bias)] == (1e-2, 0.0) and got[id(blk.norm.norm.weight)] == (1e-2, 0.0)
    opt = torch.optim.AdamW(param_groups(blk, 1e-2, 0.1, ssm_lr=ssm_lr, dt_lr=dt_lr), lr=123.0)
    by_id = {id(q): g for g in opt.param_groups for q in g["params"]}   # the global lr is the groups'
    assert by_id[id(p.log_dt)]["lr"] == (1e-2 if dt_lr is None else dt_lr)


def test_default_lrs_and_dt_follows_ssm_lr():
    layer = S4(8, 8, mode="dplr", backend="torch")
    assert layer.ssm.param_kinds == {"log_dt": "dt", "P": "P", "log_neg_real": "A", "imag": "A",
                                     "B": "B", "C": "C"}
    got = _settings(layer)
    for name in SSM_NAMES + ("log_dt",):
        assert got[id(getattr(layer.ssm, name))] == (1e-3, 0.0), name
    groups = param_groups(layer, 1e-2, 0.1)
    assert [len(g["params"]) for g in groups if g["lr"] == 1e-3] == [5]    # A (2), B, P, dt: one group
    assert _settings(layer, ssm_lr=2e-3)[id(layer.ssm.log_dt)] == (2e-3, 0.0)   # dt_lr follows ssm_lr
    assert _settings(layer, dt_lr=None)[id(layer.ssm.log_dt)] == (1e-2, 0.0)    # None: the global lr
    for bad in (-1.0, float("nan"), "fast"):
        with pytest.raises(ValueError, match="dt_lr"):
            param_groups(layer, 1e-2, 0.1, dt_lr=bad)
        with pytest.raises(ValueError, match="ssm_lr"):
            param_groups(layer, 1e-2, 0.1, ssm_lr=bad)


@pytest.mark.parametrize("kw", ["ssm_lr", "dt_lr"])
def test_learning_rates_are_not_layer_arguments(kw):
    for make in (lambda: S4(8, 8, **{kw: 1e-3}), lambda: S4Block(8, d_state=8, **{kw: 1e-3}),
                 lambda: SequenceModel(3, d_input=2, d_model=8, n_layers=1, layer_kwargs={kw: 1e-3})):
        with pytest.raises(TypeError, match=r"ssm\.param_groups") as info:
            make()
        assert kw in str(info.value)


def test_sequence_model_rejects_lr_keywords_naming_param_groups():
    with pytest.raises(TypeError, match=r"ssm_lr.*ssm\.param_groups"):
        SequenceModel(3, d_input=2, d_model=8, n_layers=1, ssm_lr=1e-3)


def test_param_groups_decay_vectors_decays_biases_but_never_ssm_params():
    m = ssm.S4Block(8, d_state=8, backend="torch")
    tagged = {i for i, kind in param_kinds(m).items() if kind in ("A", "B", "P", "dt")}
    assert len(tagged) == 4                                           # log_neg_real, imag, B, log_dt
    for dv in (False, True):
        groups = ssm.param_groups(m, lr=1e-2, weight_decay=0.1, decay_vectors=dv)
        wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
        assert len(wd) == sum(1 for _ in m.parameters())                 # each parameter once
        for name, p in m.named_parameters():
            if id(p) in tagged:
                assert wd[id(p)] == 0.0, name
            elif p.dim() < 2:
                assert wd[id(p)] == (0.1 if dv else 0.0), name
            else:
                assert wd[id(p)] == 0.1, name


@pytest.mark.parametrize("layer", ["s4d", "s4"])
def test_tags_survive_deepcopy_and_assign_loading(layer):
    model = SequenceModel(3, d_input=2, d_model=8, n_layers=2, layer=layer, layer_kwargs=dict(d_state=8))
    kw = dict(ssm_lr=2e-3, dt_lr=5e-4)
    want = _named_groups(model, **kw)
    assert sorted(g[1] for g in want) == [5e-4, 2e-3, 1e-2, 1e-2]
    assert _named_groups(copy.deepcopy(model), **kw) == want
    fresh = SequenceModel(3, d_input=2, d_model=8, n_layers=2, layer=layer, layer_kwargs=dict(d_state=8))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh.load_state_dict(sd, assign=True)
    assert fresh.blocks[0].layer.ssm.log_dt is not None
    assert any(fresh.blocks[0].layer.ssm.log_dt.data_ptr() == t.data_ptr() for t in sd.values())
    assert _named_groups(fresh, **kw) == want
