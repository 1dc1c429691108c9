"""The Kolmogorov samples judged against the data: the energy spectrum and `spectrum_error`
against analytic fields, and the sample event's sheet (data above generated, one colour scale),
spectrum figure and numbers, in the run folder and the metrics."""

from __future__ import annotations

import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.data.kolmogorov import energy_spectrum, render_vorticity, scored_shells, spectrum_error, vorticity
from difftrain.engine import run
from tests.test_trainer import only_run_folder, tiny_config, tiny_field_data  # noqa: F401 (fixture)

SIZE = 32


def grid(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell-centre coordinates x (dim -2) and y (dim -1) of [0, 2pi]^2, as (size, size) tensors."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) * (2 * math.pi / size)
    return centres[:, None].expand(size, size), centres[None, :].expand(size, size)


def single_mode(kx: int, ky: int, amplitude: float, size: int = SIZE) -> torch.Tensor:
    """Velocity (2, N, N) with u = amplitude cos(kx x + ky y), v = 0: kinetic energy amplitude^2 / 4."""
    x, y = grid(size)
    u = amplitude * torch.cos(kx * x + ky * y)
    return torch.stack([u, torch.zeros_like(u)])


def test_a_single_fourier_mode_puts_all_its_energy_in_its_shell():
    # |(3, 4)| = 5: all of 0.5 <u^2> = 2.5^2 / 4 in shell 5, nothing anywhere else.
    k, energy = energy_spectrum(single_mode(3, 4, amplitude=2.5))
    assert k.tolist() == list(range(SIZE // 2 + 1))
    assert math.isclose(energy[5].item(), 2.5**2 / 4, rel_tol=1e-12)
    assert torch.all(torch.cat([energy[:5], energy[6:]]) < 1e-20)
    # A diagonal mode (|k| = sqrt(8) ~ 2.83) lands in the nearest integer shell, 3.
    _, diagonal = energy_spectrum(single_mode(2, 2, amplitude=1.0))
    assert int(diagonal.argmax()) == 3 and math.isclose(diagonal[3].item(), 0.25, rel_tol=1e-12)


def test_the_shells_sum_to_the_mean_kinetic_energy_parseval():
    fields = torch.randn(3, 2, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    _, energy = energy_spectrum(fields)
    mean_kinetic_energy = 0.5 * fields.square().sum(dim=-3).mean()
    assert math.isclose(energy.sum().item(), mean_kinetic_energy.item(), rel_tol=1e-12)


def test_spectrum_error_is_zero_for_the_same_set_and_the_relative_error_otherwise():
    fields = torch.randn(4, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert scored_shells(SIZE) == range(1, SIZE // 4 + 1) and scored_shells(64) == range(1, 17)
    assert spectrum_error(fields, fields.clone()) == 0.0
    # 1.1 times the velocity is 1.21 times the energy in every shell: a 21% error everywhere.
    assert math.isclose(spectrum_error(1.1 * fields, fields), 0.21, rel_tol=1e-9)
    # A different set of the same statistics differs by sampling noise: small but not zero.
    other = torch.randn(4, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    assert 0.0 < spectrum_error(other, fields) < 0.5


def test_spectrum_error_looks_only_up_to_half_nyquist():
    base = torch.randn(2, SIZE, SIZE, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    # Energy added at |k| = 12 > 32 / 4 is outside the scored shells; at |k| = 8 it is inside.
    assert spectrum_error(base + single_mode(12, 0, 3.0), base) < 1e-12
    assert spectrum_error(base + single_mode(0, 8, 3.0), base) > 0.1
    with pytest.raises(ValueError, match="one shape"):
        spectrum_error(base[..., :16, :16], base)


def tiny_task(tmp_path, data, **changes):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.kolmogorov import KolmogorovTask

    config = tiny_config(tmp_path, data, **changes)
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1,
                          wait_for_everyone=lambda: None)
    return KolmogorovTask(config, cpu, StartPoint())


def test_the_sheet_shows_the_data_above_the_samples_on_the_data_colour_scale(tmp_path, tiny_field_data):
    task = tiny_task(tmp_path, tiny_field_data, num_samples=5)
    results = task.samples(task.model)
    assert set(results) == {"samples", "spectrum", "band_score", "spectrum_error"}
    assert results["spectrum_error"] > 0 and math.isfinite(results["spectrum_error"])
    assert isinstance(results["spectrum"], Image.Image) and min(results["spectrum"].size) > 100
    # The data rows: the same 5 validation windows every event, drawn with their 99th percentile
    # (all 5 set the scale; the sheet shows the first 4 of each set).
    from difftrain.tasks.kolmogorov import SHEET_ROWS, evenly_spaced_windows

    data = evenly_spaced_windows(task.valid_set, 5, task.config.window)
    assert data.shape == (5, 2, 2, 16, 16) and SHEET_ROWS == 4
    data_vorticity = vorticity(data)
    data_rows = render_vorticity(data_vorticity[:4], vmax=float(data_vorticity.abs().flatten().quantile(0.99)))
    sheet = results["samples"]
    # 16 x 16 cells are drawn 8x (128 px) with 2 px gaps: 4 data rows, a 16 px band, 4 generated rows.
    assert sheet.size == (2 * 128 + 2, 2 * (4 * 128 + 3 * 2) + 16)
    assert (np.asarray(sheet)[data_rows.size[1]:data_rows.size[1] + 16] == 255).all()
    top = np.asarray(sheet)[: data_rows.size[1]]
    assert np.array_equal(top, np.asarray(data_rows))
    # The untrained network's samples are not the data.
    assert not np.array_equal(np.asarray(sheet)[-data_rows.size[1]:], top)


def test_a_failed_spectrum_figure_is_one_warning_and_the_numbers_stay(tmp_path, tiny_field_data, monkeypatch,
                                                                      caplog):
    from difftrain.tasks import kolmogorov as task_module

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(task_module, "draw_spectra", broken)
    task = tiny_task(tmp_path, tiny_field_data, num_samples=1)
    caplog.set_level(logging.WARNING, logger="difftrain")
    caplog.clear()  # building the task may have logged (at INFO, when an earlier test set the level)
    results = task.samples(task.model)
    assert set(results) == {"samples", "band_score", "spectrum_error"}
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == [
        "could not draw the Kolmogorov energy spectrum: RuntimeError: no fonts"]


def test_a_run_writes_the_sheet_and_spectrum_and_logs_spectrum_error(tmp_path, tiny_field_data):
    assert run(tiny_config(tmp_path, tiny_field_data, max_epochs=1, sample_steps=4, num_samples=1)) == 0
    folder = only_run_folder(tmp_path)
    (log_folder,) = (tmp_path / "logs").iterdir()
    for samples in (folder / "samples", log_folder / "samples"):
        names = sorted(path.name for path in samples.iterdir())
        # Every 4 steps and at the end (10 steps).
        assert names == [f"{key}-gs{step:05d}.png" for key in ("samples", "spectrum") for step in (4, 8, 10)]
    events = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    judged = [event for event in events if "spectrum_error" in event]
    assert [event["step"] for event in judged] == [4, 8, 10]
    assert all(event["spectrum_error"] > 0 and -1 <= event["band_score"] <= 1 for event in judged)



def test_the_judged_preset_trains_the_quickstart_network_on_the_quickstart_flow_judged_on_enough_states():
    from pathlib import Path

    from difftrain.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    judged, quickstart = (load_config(configs / name) for name in ("kolmogorov_judged.json", "quickstart.json"))
    # Same network and flow, so its figures say how good the quickstart's model gets with time.
    for key in ("window", "embedding", "hidden_channels", "hidden_blocks", "kernel_size", "activation"):
        assert getattr(judged, key) == getattr(quickstart, key), key
    same_flow = ("size", "coarsen", "steps", "keep", "reynolds", "wavenumber", "drag")
    assert all(getattr(judged.simulation, key) == getattr(quickstart.simulation, key) for key in same_flow)
    # Its own data folder (more trajectories: ensure_dataset would refuse the quickstart's folder).
    assert judged.data_root != quickstart.data_root and judged.simulation.trajectories > quickstart.simulation.trajectories
    assert judged.sample_steps > 0 and judged.num_samples >= 16
