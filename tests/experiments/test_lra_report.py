"""LRA report: the markdown table puts measured test accuracies next to the published ones."""
from __future__ import annotations

import json

import pytest

from experiments.lra import report


def _result(folder, task, model, acc, preset="cpu-small", **extra):
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps(
        {"task": task, "model": model, "preset": preset, "test_acc": acc, "majority_rate": 0.17,
         "best_val_acc": acc, "test_mean_len": 61.4, "steps": 10, "train_seconds": 90.0, "completed": True, **extra}))
    return folder


def test_table_rows_and_averages(tmp_path, capsys):
    runs = tmp_path / "runs"
    _result(runs / "a", "listops", "s4d", 0.4123)
    _result(runs / "b", "listops", "transformer", 0.25)
    for i, task in enumerate(("listops", "text", "retrieval", "image", "pathfinder", "pathx")):
        _result(tmp_path / "paper" / task, task, "s4", 0.5 + 0.05 * i, preset="paper")
    text = report.main([str(runs), *(str(p) for p in sorted((tmp_path / "paper").iterdir()))])
    assert text == capsys.readouterr().out.rstrip("\n")
    lines = text.splitlines()
    assert lines[0] == "| model | ListOps | Text | Retrieval | Image | Pathfinder | Path-X | Avg |"
    # Published rows, with the LRA average (Path-X failure counts as 50).
    assert "| Transformer (LRA paper) (published) | 36.37 | 64.27 | 57.46 | 42.44 | 71.40 | fail | 53.66 |" in lines
    assert "| S4 (updated, LegS) (published) | 59.60 | 86.82 | 90.90 | 88.65 | 94.20 | 96.35 | 86.09 |" in lines
    assert "| S4D-LegS (published) | 60.47 | 86.18 | 89.46 | 88.19 | 93.06 | 91.95 | 84.89 |" in lines
    assert "| S4D (cpu-small, this repo) | 41.23 | - | - | - | - | - | - |" in lines
    assert "| Transformer (cpu-small, this repo) | 25.00 | - | - | - | - | - | - |" in lines
    # All six tasks measured: the row gets its average (0.5 .. 0.75 -> 62.50).
    assert "| S4 (paper, this repo) | 50.00 | 55.00 | 60.00 | 65.00 | 70.00 | 75.00 | 62.50 |" in lines
    assert "| a | listops | s4d | cpu-small | 41.23 | 17.00 | 41.23 | 61 | 10 | 1.5 min | yes |" in lines
    assert "not comparable with the published numbers" in text


def test_missing_and_bad_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="no result.json"):
        report.find_results([tmp_path])
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "result.json").write_text(json.dumps({"task": "listops"}))
    with pytest.raises(ValueError, match="not an LRA result file"):
        report.find_results([tmp_path / "x"])


def _metrics(folder, records):
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_unfinished_run_folders_are_skipped_with_a_note(tmp_path, capsys):
    runs = tmp_path / "runs"
    _result(runs / "done", "listops", "s4d", 0.5)
    unfinished = runs / "running"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")
    _metrics(unfinished, [{"split": "train", "step": 1, "loss": 2.0}, {"split": "train", "step": 40, "loss": 1.5}])
    # Both ways of naming runs: the parent folder, and each folder (`report runs/*`).
    for argv in ([str(runs)], [str(runs / "done"), str(unfinished)]):
        text = report.main([*argv, "--no-plots"])
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"note: skipping {unfinished}: unfinished run, no result.json yet (last logged step 40)"]
        assert "| S4D (cpu-small, this repo) | 50.00 |" in text
    # `report runs/*` also catches files and folders that are no runs: one note each, no abort.
    (runs / "summary.md").write_text("x")
    (runs / "data").mkdir()
    report.main([str(p) for p in sorted(runs.iterdir())] + ["--no-plots"])
    assert capsys.readouterr().err.strip().splitlines() == [
        f"note: skipping {runs / 'data'}: no result.json in it or its subfolders",
        f"note: skipping {unfinished}: unfinished run, no result.json yet (last logged step 40)",
        f"note: skipping {runs / 'summary.md'}: not a run folder or result.json"]
    with pytest.raises(FileNotFoundError, match="no result.json"):
        report.main([str(tmp_path / "empty_dir_that_is_no_run")])


def test_curves_png_for_every_run(tmp_path, capsys):
    from PIL import Image

    runs = tmp_path / "runs"
    for name, task in (("a", "listops"), ("b", "text")):
        folder = _result(runs / name, task, "s4d", 0.5)
        _metrics(folder, [{"split": "train", "step": s, "loss": 2.0 / s} for s in range(1, 11)]
                 + [{"split": "val", "step": s, "loss": 1.0 / s, "acc": 0.1 * s} for s in (5, 10)]
                 + [{"split": "test", "step": 10, "loss": 0.1, "acc": 0.9}])
    report.main([str(runs)])
    err = capsys.readouterr().err
    for name in ("a", "b"):
        png = runs / name / "curves.png"
        assert f"wrote {png}" in err
        with Image.open(png) as im:
            im.verify()  # a complete, valid PNG
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 100
    assert report._curves(runs / "a")["val_acc"] == [(5, 50.0), (10, 100.0)]
