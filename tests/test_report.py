"""curves.png in every run folder (redrawn at checkpoints and at the end) and `python -m difftrain.report`:
one run's curves or several runs overlaid, from metrics.jsonl alone, whatever state it is in."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import pytest
from PIL import Image

from difftrain import curves, report
from difftrain.engine import run
from difftrain.errors import USER_ERROR_EXIT_CODE
from tests.test_trainer import only_run_folder, tiny_config, tiny_field_data  # noqa: F401 (fixture)


def legend_texts(figure) -> set[str]:
    return {text.get_text() for axes in figure.axes if axes.get_legend() for text in axes.get_legend().get_texts()}


def write_metrics(folder, records, tail: str = ""):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records) + tail)
    return folder


def training_records(steps: int, loss_scale: float = 1.0, nan_at: int = 0):
    records = []
    for step in range(1, steps + 1):
        loss = float("nan") if step == nan_at else loss_scale / step
        records.append({"step": step, "epoch": step // 10, "loss_train": loss, "lr": 1e-3 * (1 - step / steps)})
        if step % 10 == 0:
            records.append({"step": step, "epoch": step // 10, "loss_valid": loss_scale / step + 0.1})
    return records


def test_a_run_draws_curves_at_each_checkpoint_and_at_its_end(tmp_path, tiny_field_data, monkeypatch, one_thread):
    drawn_at = []
    original = curves.draw_run_folder

    def counting(run_dir, also_into=()):
        records = curves.read_metrics(run_dir / "metrics.jsonl")
        drawn_at.append(max(record["step"] for record in records))
        return original(run_dir, also_into)

    monkeypatch.setattr(curves, "draw_run_folder", counting)
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, ckpt_every_n_steps=4)) == 0
    # 10 steps: the checkpoints at steps 4 and 8 redraw; the last one (step 10) is drawn once, at the end.
    assert drawn_at == [4, 8, 10]
    (log_folder,) = (tmp_path / "logs").iterdir()
    run_curves, log_curves = only_run_folder(tmp_path) / "curves.png", log_folder / "curves.png"
    assert run_curves.read_bytes() == log_curves.read_bytes()
    with Image.open(run_curves) as picture:
        assert picture.size[0] > 400 and picture.size[1] > 300
    # No temporary file of an atomic write is left behind (".tmp-..."; earlier versions wrote ".partial").
    assert not [path for path in log_folder.iterdir() if path.name.endswith(".partial") or path.name.startswith(".tmp-")]
    # The report finds the run from its log folder: a real run's settings.json matches its config.json.
    assert report.main([str(log_folder), "--out", str(tmp_path / "from-log.png")]) == 0
    assert (tmp_path / "from-log.png").is_file()


def test_a_failed_drawing_is_one_warning_and_the_run_finishes(tmp_path, tiny_field_data, monkeypatch, caplog,
                                                              one_thread):
    def broken(*_, **__):
        raise RuntimeError("no fonts on this machine")

    monkeypatch.setattr(curves, "draw_curves", broken)
    caplog.set_level(logging.WARNING, logger="difftrain")
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, ckpt_every_n_steps=6)) == 0
    folder = only_run_folder(tmp_path)
    assert (folder / "state.pth").is_file() and not (folder / "curves.png").exists()
    warnings = [record.getMessage() for record in caplog.records if "could not draw" in record.getMessage()]
    # One line per attempt (the checkpoint at step 6, the end of the run), each naming the failure.
    assert warnings == [f"could not draw the curves of {folder.name}: RuntimeError: no fonts on this machine"] * 2


def test_report_redraws_a_run_being_written_with_nan_values(tmp_path):
    records = training_records(40, nan_at=33)
    records.append({"step": 40, "spectrum_error": float("inf"), "note": "text is not a curve"})
    folder = write_metrics(tmp_path / "runs" / "swift-river-1_abcd1234", records, tail='{"step": 41, "loss_tr')
    assert report.main([str(folder)]) == 0
    with Image.open(folder / "curves.png") as picture:
        assert picture.format == "PNG"
    figure = report.draw_one(folder, tmp_path / "again.png")
    texts = legend_texts(figure)
    assert {"loss_train (raw)", "loss_train (EMA, span 6 steps)", "loss_valid", "lr"} <= texts
    assert "loss_train not finite (step 33)" in texts
    (loss_axes, rate_axes) = figure.axes
    raw_steps = loss_axes.get_lines()[0].get_xdata()
    assert len(raw_steps) == 39 and 33 not in raw_steps and max(raw_steps) == 40  # NaN left out, cut line skipped
    assert all(math.isfinite(value) for line in loss_axes.get_lines()[:3] for value in line.get_ydata())


def test_report_also_rewrites_the_samples_page(tmp_path):
    # A run that stopped before its last sample event (or predates the page) gets it back.
    folder = write_metrics(tmp_path / "runs" / "swift-river-1_abcd1234", training_records(20))
    (folder / "samples").mkdir()
    for step in (10, 20):
        Image.new("RGB", (4, 4)).save(folder / "samples" / f"samples-gs{step:05d}.png")
    assert report.main([str(folder)]) == 0
    page = (folder / "samples.html").read_text(encoding="utf-8")
    assert page.index("samples/samples-gs00010.png") < page.index("samples/samples-gs00020.png")


def test_the_smoothed_loss_follows_the_trend_without_bias_at_the_start():
    smoothed = curves.exponential_average([2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0], span=3)
    assert smoothed[:3] == pytest.approx([2.0, 2.0, 2.0])  # debiased: not pulled toward 0 at the start
    assert all(later < earlier for earlier, later in zip(smoothed[3:], smoothed[4:])) and smoothed[-1] < 0.1


def test_the_smoothed_loss_restarts_at_each_reflow_stage():
    # A reflow stage's loss can sit orders of magnitude below the last stage's: no smearing across.
    smoothed = curves.smooth_by_stage([1, 2, 3, 4, 5, 6], [1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3], span=5, stage_ends=[3, 6])
    assert smoothed == pytest.approx([1.0, 1.0, 1.0, 1e-3, 1e-3, 1e-3])
    assert curves.smooth_by_stage([1, 2, 3], [1.0, 0.0, 0.0], span=5, stage_ends=[])[-1] > 0.1


def test_a_run_without_steps_and_a_reflow_run_are_drawn(tmp_path):
    empty = curves.draw_curves([])
    assert [axes.texts[0].get_text() for axes in empty.axes] == ["no loss logged yet", "no learning rate logged yet"]
    reflow = training_records(20) + [
        {"step": 20, "straightness": 0.05, "one_vs_n_step_distance": 0.2, "reflow_stage": 0},
        {"step": 40, "straightness": 0.01, "one_vs_n_step_distance": 0.03, "reflow_stage": 1}]
    figure = curves.draw_curves(reflow)
    assert {"end of a reflow stage", "loss_train (EMA, span 4 steps, restarted each reflow stage)"} <= legend_texts(figure)
    stages = figure.axes[2]
    assert {line.get_label(): list(line.get_xdata()) for line in stages.get_lines()} == {
        "straightness": [0, 1], "one_vs_n_step_distance": [0, 1]}


def test_compare_overlays_runs_labelled_by_their_names(tmp_path):
    first = write_metrics(tmp_path / "runs" / "swift-river-1_abcd1234", training_records(30))
    second = write_metrics(tmp_path / "runs" / "calm-lake-2_efgh5678", training_records(30, loss_scale=3.0))
    out = tmp_path / "sweep" / "summary.png"
    assert report.main(["--compare", str(first), str(second), "--out", str(out)]) == 0
    assert out.is_file()
    figure = report.draw_several([first, second], tmp_path / "again.png")
    texts = legend_texts(figure)
    for name in ("swift-river-1", "calm-lake-2"):
        assert {f"{name}: loss_train (EMA, span 5 steps)", f"{name}: loss_valid", f"{name}: lr"} <= texts
    # The runs differ, so their curves must: one line per run, not one run drawn twice.
    (first_loss, first_valid, second_loss, second_valid) = figure.axes[0].get_lines()
    assert second_loss.get_ydata()[0] == pytest.approx(3 * first_loss.get_ydata()[0])


def test_compare_leaves_out_a_run_that_has_not_started_and_says_so(tmp_path, capsys):
    started = write_metrics(tmp_path / "runs" / "swift-river-1_abcd1234", training_records(12))
    (tmp_path / "runs" / "calm-lake-2_efgh5678").mkdir()
    figure = report.draw_several(sorted((tmp_path / "runs").iterdir()), tmp_path / "sweep.png")
    assert {text.split(":")[0] for text in legend_texts(figure)} == {"swift-river-1"}
    assert "left out: '" in capsys.readouterr().err and started.exists()
    with pytest.raises(SystemExit) as stopped:
        report.main(["--compare", str(tmp_path / "runs" / "calm-lake-2_efgh5678"), str(tmp_path / "typo")])
    assert stopped.value.code == USER_ERROR_EXIT_CODE
    assert "nothing to compare" in capsys.readouterr().err


def test_a_log_folder_leads_to_its_run_folder(tmp_path, monkeypatch):
    settings = {"runs_dir": "runs", "logdir": "logs", "seed": 3}
    for name, seed in (("other-run-1_aaaa1111", 4), ("wanted-run-2_bbbb2222", 3)):
        folder = write_metrics(tmp_path / "runs" / name, training_records(12))
        (folder / "config.json").write_text(json.dumps({**settings, "seed": seed}))
    log_folder = tmp_path / "logs" / "tiny20260101-120000"
    log_folder.mkdir(parents=True)
    (log_folder / "settings.json").write_text(json.dumps(settings, indent=2))
    monkeypatch.chdir(tmp_path / "logs")  # runs_dir is relative to where the run was started, not here
    assert report.main([str(log_folder)]) == 0
    assert (tmp_path / "runs" / "wanted-run-2_bbbb2222" / "curves.png").is_file()
    assert not (tmp_path / "runs" / "other-run-1_aaaa1111" / "curves.png").exists()


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "has no metrics.jsonl"),
    (lambda root: write_metrics(root / "runs" / "a_abcd1234", []).parent, "is a folder of runs (1 found)"),
    (lambda root: ((root / "lonely").mkdir(), (root / "lonely" / "settings.json").write_text('{"runs_dir": "nowhere"}'),
                   root / "lonely")[-1], "log folders hold no metrics.jsonl"),
])
def test_bad_input_is_a_message_and_exit_2(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as stopped:
        report.main([str(make(tmp_path))])
    assert stopped.value.code == USER_ERROR_EXIT_CODE
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_the_command_line_runs_as_a_module(tmp_path):
    import subprocess
    import sys

    folder = write_metrics(tmp_path / "run_abcd1234", training_records(5))
    environment = {**os.environ, "PYTHONPATH": str(report.__file__).rsplit("/difftrain/", 1)[0]}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "difftrain.report", str(folder)], capture_output=True,
                            text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (folder / "curves.png").is_file() and "up to step 5" in result.stderr
    missing = subprocess.run([sys.executable, "-m", "difftrain.report", str(tmp_path / "nope")], capture_output=True,
                             text=True, env=environment, timeout=120)
    assert missing.returncode == USER_ERROR_EXIT_CODE and "Traceback" not in missing.stderr
    assert time.monotonic() - started < 60
