"""`python -m experiments.export` end to end on tiny models: a plain state_dict and an LRA checkpoint."""
import json
import re

import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from experiments.export import main  # noqa: E402
from ssm.models import SequenceModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
KWARGS = {"d_output": 5, "vocab_size": 13, "d_model": 16, "n_layers": 2, "layer": "s4", "pooling": "last",
          "layer_kwargs": {"d_state": 8}}


def _diff(text: str) -> float:
    return float(re.search(r"max \|onnx - torch\| = ([0-9.e+-]+)", text).group(1))


@pytest.fixture
def state_dict_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(SequenceModel(**KWARGS).state_dict(), path)
    (tmp_path / "kwargs.json").write_text(json.dumps(KWARGS))
    return path


def test_state_dict_step_form_streams(state_dict_file, tmp_path, capsys):
    out = tmp_path / "step.onnx"
    assert main([str(state_dict_file), "--model-kwargs", str(tmp_path / "kwargs.json"), "--l-max", "64",
                 "--out", str(out), "--steps", "120", "--batch", "2"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and "step form of a state_dict model" in text
    assert re.search(r"120 steps x batch 2: \d+ tokens/s", text)
    assert _diff(text) <= 1e-5        # the export target; the file is checked against eager model.step
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x", "state_0", "state_1"]


def test_state_dict_conv_form(state_dict_file, tmp_path, capsys):
    out = tmp_path / "conv.onnx"
    assert main([str(state_dict_file), "--model-kwargs", json.dumps(KWARGS), "--l-max", "64", "--out", str(out),
                 "--form", "conv", "--max-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "conv form" in text and "tokens/s" in text and _diff(text) <= 1e-5


def test_bad_inputs_name_what_is_missing(state_dict_file, tmp_path):
    with pytest.raises(SystemExit, match="pass --model-kwargs"):
        main([str(state_dict_file), "--steps", "0"])
    with pytest.raises(SystemExit, match="need their training length: pass --l-max"):
        main([str(state_dict_file), "--model-kwargs", json.dumps(KWARGS), "--steps", "0"])
    with pytest.raises(SystemExit, match="is not a file"):
        main([str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="--form conv needs --max-len"):
        main([str(state_dict_file), "--form", "conv"])


def _lra_checkpoint(path, *, bidirectional: bool):
    """A checkpoint dict as the LRA trainer writes it (model state + config), for a tiny ListOps S4D."""
    from experiments.lra.config import Config
    from experiments.lra.models import build_model
    cfg = Config(task="listops", model_name="s4d")
    cfg.model.d_model, cfg.model.n_layers, cfg.model.ssm.d_state = 16, 1, 8
    cfg.model.bidirectional, cfg.model.pooling = bidirectional, "last"
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "state": {"step": 0}}, path)


def test_lra_checkpoint_streams(tmp_path, capsys):
    ckpt = tmp_path / "best.pt"
    _lra_checkpoint(ckpt, bidirectional=False)
    assert main([str(ckpt), "--steps", "50"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {tmp_path / 'best.onnx'}" in text and "LRA listops s4d (inputs: token ids)" in text
    assert _diff(text) <= 1e-5


def test_bidirectional_lra_checkpoint_is_refused(tmp_path):
    ckpt = tmp_path / "best.pt"
    _lra_checkpoint(ckpt, bidirectional=True)
    with pytest.raises(SystemExit, match="model: layer 0 is bidirectional"):
        main([str(ckpt), "--steps", "0"])
