"""`python -m experiments.export`: write the ONNX file of a saved causal model and stream it in onnxruntime.

Checkpoints:
- an LRA run's `best.pt` / `last.pt` (`experiments.lra.train`): a dict with the run's `config` and
  the classifier's `model` state; the model is rebuilt from the config and its `SequenceModel`
  backbone is exported (single-sequence tasks only; the two-tower Retrieval model does not stream);
- a plain `state_dict` of an `ssm.SequenceModel`, with the constructor's keyword arguments given by
  `--model-kwargs` (a JSON object, inline or a file name).

Any causal `SequenceModel` streams: S4 / S4D, Mamba, Mamba-2 (and any layer whose step state is a
tensor or a tuple of tensors). The step form (default) takes one input per call and carries the
layer states as a flat list (see `ssm.export.StepModel` and `onnx_names`); the streaming loop
feeds random inputs for `--steps` steps, prints tokens per second, and checks the first steps
against eager PyTorch. `--form conv` writes the convolution form (whole sequences up to
`--max-len`, S4 / S4D only) instead. Needs the `export` extra (`pip install -e ".[export]"`: onnx,
onnxruntime, onnxscript).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

CHECK_STEPS = 100


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Checkpoints are read with torch.load(weights_only=False): open only "
                                       "files you trust.\n\n" + __doc__.split("\n\n", 1)[1])
    p.add_argument("checkpoint", help="LRA checkpoint (best.pt / last.pt) or a SequenceModel state_dict file")
    p.add_argument("--model-kwargs", metavar="JSON", help="SequenceModel keyword arguments for a plain state_dict: "
                   "a JSON object or a .json file, e.g. '{\"d_output\": 10, \"vocab_size\": 256, \"layer\": \"s4d\", "
                   "\"pooling\": \"last\"}'")
    p.add_argument("--out", metavar="PATH", help="ONNX file to write (default: the checkpoint's name with .onnx)")
    p.add_argument("--form", choices=("step", "conv"), default="step",
                   help="step: one position per call with states in and out; conv: whole sequences (default step)")
    p.add_argument("--max-len", type=int, help="conv form: the longest input the file accepts")
    p.add_argument("--l-max", type=int, help="S4 (mode='dplr') layers: the training length l_max, for "
                   "checkpoints that do not record it (S4 relates its learned C to it)")
    p.add_argument("--batch", type=int, default=1, help="streams decoded together (default 1)")
    p.add_argument("--steps", type=int, default=1000, help="streaming steps to time (0: only write the file)")
    p.add_argument("--threads", type=int, default=1, help="threads for torch and onnxruntime (default 1)")
    return p


def _read_kwargs(text: str | None, path: str) -> dict:
    if text is None:
        raise ValueError(f"{path} holds a plain state_dict: pass --model-kwargs with the SequenceModel arguments")
    if os.path.exists(text):
        with open(text) as f:
            text = f.read()
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-kwargs is neither a file nor valid JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model-kwargs must be a JSON object, got {type(kwargs).__name__}")
    return kwargs


def _s4_layers(model) -> list:
    return [b.layer for b in model.blocks if getattr(getattr(b, "layer", None), "mode", None) == "dplr"]


def _lra_backbone(ckpt: dict, path: str, l_max: int | None):
    """The SequenceModel inside an LRA checkpoint, weights loaded, plus a note on its inputs."""
    from experiments.lra.config import config_from_dict
    from experiments.lra.models import LRAClassifier, build_model

    cfg = config_from_dict(ckpt["config"])
    model = build_model(cfg)
    if not isinstance(model, LRAClassifier):
        raise ValueError(f"{path}: task {cfg.task!r} is a two-tower model (two documents, one label); "
                         "only single-sequence tasks stream")
    for layer in _s4_layers(model.backbone) if l_max is not None else []:
        layer.l_max = l_max
    model.load_state_dict(ckpt["model"])
    note = "inputs: pixel value / 255 as one real feature" if model.real_pixels else "inputs: token ids"
    return model.backbone, f"LRA {cfg.task} {cfg.model_name} ({note})"


def load_model(path: str, model_kwargs: str | None = None, l_max: int | None = None):
    """(SequenceModel in eval mode, description) from an LRA checkpoint or a plain state_dict."""
    from ssm.models import SequenceModel

    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path!r} is not a file")
    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "config" in obj and "model" in obj:
        model, desc = _lra_backbone(obj, path, l_max)
    elif isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        model = SequenceModel(**_read_kwargs(model_kwargs, path))
        for layer in _s4_layers(model) if l_max is not None else []:
            layer.l_max = l_max
        model.load_state_dict(obj)
        desc = "state_dict"
    else:
        raise ValueError(f"{path}: neither an LRA checkpoint (keys 'config' and 'model') nor a state_dict")
    for layer in _s4_layers(model):
        if layer.l_max is None and l_max is None:
            raise ValueError(f"{path}: S4 layers need their training length: pass --l-max")
        if layer.l_max is None:   # recorded as "not fixed yet" (-1): the given length applies
            layer.l_max = l_max
    return model.eval(), desc


def random_inputs(model, batch: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """(steps, batch) token ids or (steps, batch, d_input) features."""
    if model.vocab_size is not None:
        return torch.randint(0, model.vocab_size, (steps, batch), generator=gen)
    return torch.rand(steps, batch, model.d_input, generator=gen)


def _session(path: str, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def stream(path: str, model, *, batch: int, steps: int, threads: int) -> dict:
    """Stream `steps` random inputs through the ONNX step file; time it and check the first steps
    against eager `model.step`. Returns tokens/s, seconds per step and the largest difference."""
    from ssm.export import StepModel, onnx_names
    sess = _session(path, threads)
    names = onnx_names(model, "step")[0]
    xs = random_inputs(model, batch, steps, torch.Generator().manual_seed(0))
    states = [s.numpy() for s in StepModel(model).initial_state(batch)]
    # the step form streams per-position outputs whatever the pooling (mean pooling: their mean)
    model = copy.deepcopy(model)
    model.pooling = "none"
    eager = model.default_state(batch)
    diff, t0 = 0.0, time.perf_counter()
    for t in range(steps):
        out, *states = sess.run(None, dict(zip(names, [xs[t].numpy(), *states])))
        if t < CHECK_STEPS:
            pause = time.perf_counter()
            with torch.no_grad():
                want, eager = model.step(xs[t], eager)
            diff = max(diff, float((torch.from_numpy(out) - want).abs().max()))
            t0 += time.perf_counter() - pause      # the check is not part of the timing
    seconds = time.perf_counter() - t0
    return {"tokens_per_s": batch * steps / seconds, "s_per_step": seconds / steps,
            "checked_steps": min(steps, CHECK_STEPS), "max_abs_diff": diff}


def run_conv(path: str, model, *, batch: int, max_len: int, threads: int) -> dict:
    """One whole sequence of max_len through the ONNX conv file, timed and compared with eager."""
    sess = _session(path, threads)
    x = random_inputs(model, batch, max_len, torch.Generator().manual_seed(0)).transpose(0, 1).contiguous()
    t0 = time.perf_counter()
    out = sess.run(None, {"x": x.numpy()})[0]
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        want = model(x)[0]
    return {"tokens_per_s": batch * max_len / seconds, "seconds": seconds,
            "max_abs_diff": float((torch.from_numpy(out) - want).abs().max())}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in ("batch", "threads"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.form == "conv" and args.max_len is None:
        raise SystemExit("--form conv needs --max-len")
    from ssm.export import save_onnx
    try:
        model, desc = load_model(args.checkpoint, args.model_kwargs, args.l_max)
        out = args.out or os.path.splitext(args.checkpoint)[0] + ".onnx"
        save_onnx(model, out, form=args.form, max_len=args.max_len)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.2f} MiB): {args.form} form of a {desc} model, "
          f"{sum(p.numel() for p in model.parameters())} parameters")
    if args.form == "conv":
        r = run_conv(out, model, batch=args.batch, max_len=args.max_len, threads=args.threads)
        print(f"onnxruntime: batch {args.batch} x {args.max_len} positions in {r['seconds'] * 1e3:.1f} ms: "
              f"{r['tokens_per_s']:.0f} tokens/s; max |onnx - torch| = {r['max_abs_diff']:.2e}")
    elif args.steps > 0:
        r = stream(out, model, batch=args.batch, steps=args.steps, threads=args.threads)
        print(f"onnxruntime streaming: {args.steps} steps x batch {args.batch}: {r['tokens_per_s']:.0f} tokens/s "
              f"({r['s_per_step'] * 1e3:.3f} ms per step, {args.threads} thread(s)); max |onnx - torch| = "
              f"{r['max_abs_diff']:.2e} over the first {r['checked_steps']} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
