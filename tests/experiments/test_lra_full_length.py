"""Every LRA task at its full published length: two optimizer steps of the paper preset (batch reduced)
on generated official-format files, each in its own process, with its peak memory recorded.

Slow (`--run-slow`): about 30 minutes and up to ~8 GB (the Transformer on Path-X and Retrieval,
batch 1) on a 2-core CPU. The same runs print a table with `python -m experiments.lra.cost --full-length`.
"""
from __future__ import annotations

import math

import pytest

from experiments.lra import config, presets
from experiments.lra import cost
from experiments.lra.data import load_task
from experiments.lra.tasks import task_info


def _full_shape(task: str, batch: int) -> list[int]:
    info = task_info(task)
    return [batch, 2, info.seq_len] if info.two_tower else [batch, info.seq_len]


@pytest.mark.parametrize("task", ["listops", "text", "retrieval"])
def test_generated_files_reach_the_full_length(task, tmp_path):
    root = cost.write_full_length(tmp_path, task)
    split = load_task(task, root)["train"]
    ids, label = split[0]
    assert ids.shape[-1] == task_info(task).seq_len
    if task == "listops":  # a flat [MAX ...] tree: its label is the largest digit (ids 1..10 = digits 0..9)
        assert label == int(ids[(ids >= 1) & (ids <= 10)].max()) - 1


@pytest.mark.slow
@pytest.mark.parametrize("model", config.MODELS)
@pytest.mark.parametrize("task", config.TASKS)
def test_two_paper_steps_at_full_length(task, model, tmp_path):
    data_dir = cost.write_full_length(tmp_path, task)
    batch = cost.full_length_batch(task, model)
    row = cost._subprocess_json(["--full-one", task, model, str(data_dir), "--batch", str(batch)], 3600, task, model)
    assert "error" not in row, row
    assert row["input_shape"] == _full_shape(task, batch)
    assert len(row["losses"]) == 2 and all(math.isfinite(v) for v in row["losses"])
    print(f"{task} {model}: {row['seconds']} s/step, peak RSS added {row['peak_rss_bytes'] / 2**30:.2f} GiB")


# --- the cost script's counting -------------------------------------------------------------------

def test_fft_and_cpu_attention_flops_are_counted():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(4, 1024)
    counter = FlopCounterMode(display=False, custom_mapping=cost.fft_flop_mapping())
    with counter:
        spec = torch.fft.rfft(x, n=2048)  # 4 real transforms of length 2048
        torch.fft.irfft(spec, n=2048)     # and back
    assert counter.get_total_flops() == 2 * 4 * int(2.5 * 2048 * 11)
    q, k, v = (torch.randn(2, 3, 64, 8) for _ in range(3))
    counter = FlopCounterMode(display=False, custom_mapping=cost.fft_flop_mapping())
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 3 * 64 * 64 * 8)  # q k^T and p v


def test_run_steps_match_the_public_schedules():
    # S4 ListOps: 40 epochs x 96,000 / 32 = the file's num_training_steps (120,000).
    assert cost.run_steps("listops", "s4") == presets.preset_config("listops", "s4", "paper").optim.schedule_steps
    assert cost.run_steps("pathx", "s4d") == 500_000 and cost.run_steps("image", "s4") == 180_000
    assert cost.run_steps("listops", "transformer") == 5000  # LRA num_train_steps
    row = {"task": "image", "model": "s4", "flops_step": 1e12, "flops_fwd_example": 1e9}
    # 180,000 steps x 1e12 + 200 epochs x 5,000 x 1e9, at 30% of 989 TFLOP/s
    assert cost.gpu_hours(row, 0.3) == pytest.approx((1.8e17 + 1e15) / (0.3 * 989e12) / 3600)
