"""Physics and I/O checks of the Kolmogorov-flow generator (small grids, CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from difftrain.data import kolmogorov
from difftrain.data.kolmogorov import (
    KolmogorovParams,
    cell_centres,
    energy_spectrum,
    ensure_dataset,
    forcing_pattern,
    generate_dataset,
    render_vorticity,
    simulate_batches,
    split_sizes,
    vorticity,
)
from difftrain.errors import ConfigError


def simulate(params, num_trajectories, *, seed, device="cpu", progress=False, batch_size=64, first_index=0):
    """All kept states of trajectories first_index.. in memory: (N, keep, 2, H, W), the batches
    generate_dataset streams to disk, joined."""
    indices = list(range(first_index, first_index + num_trajectories))
    batches = simulate_batches(params, indices, seed=seed, device=torch.device(device), batch_size=batch_size,
                               progress_bar=None)
    return torch.cat([part for _, part in batches])


TURBULENT = KolmogorovParams(size=64, coarsen=1, steps=100, keep=100)


@pytest.fixture(scope="module")
def turbulent_run() -> torch.Tensor:
    """Two trajectories at Re 1000 on 64^2 for 20 time units (two drag times): (2, 100, 2, 64, 64)."""
    return simulate(TURBULENT, 2, seed=3, device="cpu", progress=False)


def spectral_derivatives(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d/dx (dim -2) and d/dy (dim -1) of a periodic field on [0, 2pi]^2, written independently
    of the module under test."""
    n = field.shape[-1]
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    k[n // 2] = 0.0
    coefficients = torch.fft.fft2(field.double())
    d_dx = torch.fft.ifft2(1j * k[:, None] * coefficients).real
    d_dy = torch.fft.ifft2(1j * k[None, :] * coefficients).real
    return d_dx, d_dy


def kinetic_energy(x: torch.Tensor) -> torch.Tensor:
    """0.5 <|u|^2> over the grid: (..., 2, H, W) -> (...)."""
    return 0.5 * x.double().square().sum(dim=-3).mean(dim=(-2, -1))


def test_velocity_stays_divergence_free(turbulent_run):
    d_u_dx, _ = spectral_derivatives(turbulent_run[:, :, 0])
    _, d_v_dy = spectral_derivatives(turbulent_run[:, :, 1])
    divergence_rms = (d_u_dx + d_v_dy).square().mean(dim=(-2, -1)).sqrt()
    gradient_rms = d_u_dx.square().mean(dim=(-2, -1)).sqrt()
    assert torch.all(divergence_rms < 1e-4 * gradient_rms)


def test_kinetic_energy_stays_bounded_and_sustained(turbulent_run):
    energy = kinetic_energy(turbulent_run)
    assert torch.isfinite(energy).all()
    # Energy balance dE/dt <= |f| sqrt(2E) - 2 drag E bounds E by <f^2> / (2 drag^2) = 25 here.
    assert energy.max() < 25.0
    # Forcing keeps the flow alive: without it drag would decay E by e^-4 over this run.
    assert energy[:, -20:].min() > 0.3
    # Statistically steady once spun up: the late mean is within a factor 2 of the middle one.
    middle, late = energy[:, 40:70].mean(), energy[:, 70:].mean()
    assert 0.5 < late / middle < 2.0


def test_energy_spectrum_looks_like_2d_turbulence(turbulent_run):
    k, spectrum = energy_spectrum(turbulent_run[:, -30:])
    assert math.isclose(spectrum.sum().item(), kinetic_energy(turbulent_run[:, -30:]).mean().item(), rel_tol=1e-9)
    # Energy sits at or above the forcing scale (2-D inverse cascade), not at small scales.
    assert 1 <= int(spectrum.argmax()) <= TURBULENT.wavenumber
    assert spectrum[: TURBULENT.wavenumber + 2].sum() > 0.8 * spectrum.sum()
    # Enstrophy-cascade range: steep decay, steeper than k^-2 (Kraichnan's k^-3 and beyond).
    inertial = slice(8, 20)
    slope = np.polyfit(np.log(k[inertial].double().numpy()), np.log(spectrum[inertial].numpy()), 1)[0]
    assert slope < -2.5


@pytest.mark.parametrize("coarsen", [1, 2])
def test_vorticity_shows_the_forcing_bands(turbulent_run, coarsen):
    size = TURBULENT.size // coarsen
    w = vorticity(kolmogorov.coarsen_mean(turbulent_run[:, -50:], coarsen))
    profile = w.double().mean(dim=(0, 1, 2))  # average over trajectories, time and x: a function of y
    y = cell_centres(size)
    # The forcing (sin 4y, 0) drives vorticity -4 cos(4y): the mean profile must be those 4 bands.
    cosine_amplitude = 2 * (profile * torch.cos(TURBULENT.wavenumber * y)).mean()
    assert cosine_amplitude < -0.5
    assert cosine_amplitude.square() / 2 > 0.7 * profile.square().mean()


def test_laminar_limit_matches_the_exact_steady_state():
    # At Re 10 Kolmogorov flow is laminar: u = A sin(k y) / (nu k^2 + drag), v = 0. This pins the
    # forcing's sign and direction and the viscosity and drag coefficients at once.
    params = KolmogorovParams(size=32, coarsen=1, steps=40, keep=1, reynolds=10.0, initial_max_velocity=1e-3)
    (final,) = simulate(params, 1, seed=0, device="cpu", progress=False)[0]
    y = cell_centres(32).float()
    amplitude = 1.0 / (params.wavenumber**2 / params.reynolds + params.drag)
    expected_u = amplitude * torch.sin(params.wavenumber * y).expand(32, 32)
    torch.testing.assert_close(final[0], expected_u, atol=1e-3, rtol=0)
    assert final[1].abs().max() < 1e-3


def test_advection_matches_an_independent_tendency():
    # Inviscid, unforced, undamped: dw/dt = -P(u . grad(w)), P the 2/3-rule truncation. Two states
    # dt apart give the left side; the right side is computed here with independent derivatives.
    n = 32
    params = KolmogorovParams(size=n, coarsen=1, steps=2, keep=2, dt=1e-3, reynolds=1e12, drag=0.0, forcing_amplitude=0.0)
    states = simulate(params, 1, seed=1, device="cpu", progress=False)[0].double()
    first, second = vorticity(states[0], method="spectral"), vorticity(states[1], method="spectral")
    middle = (states[0] + states[1]) / 2
    w_dx, w_dy = spectral_derivatives((first + second) / 2)
    k = torch.fft.fftfreq(n, 1.0 / n)
    kept_modes = (k[:, None].abs() < n / 3) & (k[None, :].abs() < n / 3)
    advection = torch.fft.ifft2(torch.fft.fft2(middle[0] * w_dx + middle[1] * w_dy) * kept_modes).real
    rate = (second - first) / params.dt
    relative_error = (rate + advection).norm() / advection.norm()
    assert relative_error < 1e-3


def test_time_integration_converges_at_fourth_order():
    def run(courant: float) -> tuple[int, torch.Tensor]:
        params = KolmogorovParams(size=32, coarsen=1, steps=5, keep=1, courant=courant, precision="float64")
        return params.substeps, simulate(params, 1, seed=0, device="cpu", progress=False).double()

    _, reference = run(0.125)
    (coarse_steps, coarse), (fine_steps, fine) = run(1.0), run(0.5)
    coarse_error, fine_error = (coarse - reference).norm(), (fine - reference).norm()
    observed_order = math.log(coarse_error / fine_error) / math.log(fine_steps / coarse_steps)
    assert observed_order > 3.3
    assert fine_error < 1e-4 * reference.norm()


def test_inviscid_unforced_flow_conserves_energy():
    params = KolmogorovParams(size=32, coarsen=1, steps=10, keep=10, reynolds=1e12, drag=0.0, forcing_amplitude=0.0)
    energy = kinetic_energy(simulate(params, 1, seed=2, device="cpu", progress=False)[0])
    assert (energy.max() - energy.min()) < 1e-3 * energy.mean()


def test_initial_condition_has_the_requested_maximum_speed():
    params = KolmogorovParams(size=32, coarsen=1, steps=1, keep=1, dt=1e-4)
    x = simulate(params, 3, seed=5, device="cpu", progress=False)[:, 0]
    max_speed = x.square().sum(dim=1).sqrt().amax(dim=(-2, -1))
    torch.testing.assert_close(max_speed, torch.full((3,), 3.0), atol=0.02, rtol=0)


SMALL = KolmogorovParams(size=32, coarsen=2, trajectories=10, steps=3, keep=2)


def test_same_seed_same_trajectories_whatever_the_batching():
    whole = simulate(SMALL, 3, seed=7, device="cpu", progress=False, batch_size=3)
    again = simulate(SMALL, 3, seed=7, device="cpu", progress=False, batch_size=3)
    one_by_one = simulate(SMALL, 3, seed=7, device="cpu", progress=False, batch_size=1)
    later_part = simulate(SMALL, 2, seed=7, device="cpu", progress=False, first_index=1)
    other_seed = simulate(SMALL, 3, seed=8, device="cpu", progress=False)
    assert whole.shape == (3, 2, 2, 16, 16) and whole.dtype == torch.float32
    assert torch.equal(whole, again)
    torch.testing.assert_close(whole, one_by_one, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[1:], later_part, atol=1e-5, rtol=0)
    assert not torch.allclose(whole, other_seed)
    assert not torch.allclose(whole[0], whole[1])


def test_coarsened_output_is_the_mean_of_the_fine_cells():
    fine = simulate(KolmogorovParams(size=32, coarsen=1, steps=2, keep=1), 1, seed=4, device="cpu", progress=False)
    coarse = simulate(KolmogorovParams(size=32, coarsen=4, steps=2, keep=1), 1, seed=4, device="cpu", progress=False)
    torch.testing.assert_close(coarse, fine.reshape(1, 1, 2, 8, 4, 8, 4).mean(dim=(4, 6)))


def test_cli_writes_the_three_splits_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "kolmogorov"
    argv = ["--out", str(out), "--size", "32", "--coarsen", "2", "--trajectories", "10", "--steps", "3", "--keep", "2", "--device", "cpu", "--quiet", "--seed", "7"]
    kolmogorov.main(argv)
    assert sorted(path.name for path in out.iterdir()) == ["test.h5", "train.h5", "valid.h5"]
    expected = {"train": 8, "valid": 1, "test": 1}
    stored = {}
    for split, count in expected.items():
        with h5py.File(out / f"{split}.h5", "r") as handle:
            assert handle["x"].shape == (count, 2, 2, 16, 16)
            assert handle["x"].dtype == np.float32
            assert handle.attrs["reynolds"] == 1000.0 and handle.attrs["coarsen"] == 2 and handle.attrs["seed"] == 7
            assert handle.attrs["split"] == split
            stored[split] = handle["x"][...]
    # The files hold trajectories 0-7, 8, 9 of the same seed, in order.
    reference = simulate(SMALL, 10, seed=7, device="cpu", progress=False)
    np.testing.assert_allclose(np.concatenate([stored["train"], stored["valid"], stored["test"]]), reference.numpy(), atol=1e-5)

    before = (out / "train.h5").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_info:
        kolmogorov.main(argv)
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "train.h5").stat().st_mtime_ns == before

    kolmogorov.main([*argv[:-1], "8", "--overwrite"])
    with h5py.File(out / "train.h5", "r") as handle:
        assert handle.attrs["seed"] == 8
    assert not list(out.glob("*.tmp"))


def test_cli_rejects_bad_parameters_with_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        kolmogorov.main(["--out", str(tmp_path), "--size", "30", "--coarsen", "4", "--quiet"])
    assert exit_info.value.code == 2
    assert "coarsen" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_failed_generation_leaves_no_files(tmp_path, monkeypatch):
    def exploding_batches(*args, **kwargs):
        raise RuntimeError("solver failed")
        yield  # a generator, like the real one

    monkeypatch.setattr(kolmogorov, "simulate_batches", exploding_batches)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path, SMALL, progress=False)
    assert not list(tmp_path.iterdir())


def test_ensure_dataset_reuses_matching_files_and_never_overwrites_other_data(tmp_path, monkeypatch):
    paths = ensure_dataset(tmp_path, SMALL, seed=1, progress=False, device="cpu")
    first_train = h5py.File(paths["train"], "r")["x"][...]

    def must_not_generate(*args, **kwargs):
        raise AssertionError("ensure_dataset regenerated files whose parameters match")

    with monkeypatch.context() as patch:
        patch.setattr(kolmogorov, "generate_dataset", must_not_generate)
        assert ensure_dataset(tmp_path, SMALL, seed=1, progress=False) == paths

    # Other simulation settings on the same folder: refused, the files stay as they were.
    changed = KolmogorovParams(size=32, coarsen=2, trajectories=10, steps=3, keep=2, drag=0.2)
    before = {path: path.read_bytes() for path in paths.values()}
    with pytest.raises(ConfigError, match=r"drag=.*another folder"):
        ensure_dataset(tmp_path, changed, seed=1, progress=False, device="cpu")
    assert {path: path.read_bytes() for path in paths.values()} == before

    # A lost split of our own data comes back identical to the first generation.
    paths["valid"].unlink()
    ensure_dataset(tmp_path, SMALL, seed=1, progress=False, device="cpu")
    assert paths["valid"].exists()
    assert np.array_equal(h5py.File(paths["train"], "r")["x"][...], first_train)

    # Asked for explicitly, other settings replace the data.
    ensure_dataset(tmp_path, changed, seed=1, progress=False, device="cpu", overwrite=True)
    with h5py.File(paths["train"], "r") as handle:
        assert handle.attrs["drag"] == 0.2


def test_ensure_dataset_uses_the_users_own_files_as_they_are(tmp_path, monkeypatch):
    paths = kolmogorov.dataset_paths(tmp_path)
    for count, path in zip((4, 1, 1), paths.values()):
        with h5py.File(path, "w") as handle:
            handle["x"] = np.zeros((count, 5, 2, 8, 8), dtype="float32")
    before = {path: path.read_bytes() for path in paths.values()}
    monkeypatch.setattr(kolmogorov, "generate_dataset", lambda *a, **k: pytest.fail("user data overwritten"))
    assert ensure_dataset(tmp_path, SMALL, seed=1, progress=False) == paths
    assert {path: path.read_bytes() for path in paths.values()} == before
    # One of the user's files missing: generating would mix data, so it is refused.
    paths["test"].unlink()
    with pytest.raises(ConfigError, match="would replace"):
        ensure_dataset(tmp_path, SMALL, seed=1, progress=False)


def test_split_sizes_follow_80_10_10():
    assert split_sizes(1024) == {"train": 819, "valid": 102, "test": 103}
    assert split_sizes(10) == {"train": 8, "valid": 1, "test": 1}
    with pytest.raises(ConfigError, match="split empty"):
        generate_dataset("/nonexistent/never/created", KolmogorovParams(trajectories=4), progress=False)


@pytest.mark.parametrize(
    "overrides, field",
    [({"size": 30, "coarsen": 4}, "coarsen"), ({"keep": 10, "steps": 5}, "keep"), ({"dt": 0.0}, "dt"), ({"precision": "half"}, "precision")],
)
def test_invalid_parameters_are_config_errors(overrides, field):
    with pytest.raises(ConfigError, match=field):
        KolmogorovParams(**overrides)


def test_paper_defaults():
    params = KolmogorovParams()
    assert (params.size, params.coarsen, params.output_size, params.steps, params.keep) == (256, 4, 64, 128, 64)
    assert (params.reynolds, params.wavenumber, params.drag, params.dt, params.trajectories) == (1000.0, 4, 0.1, 0.2, 1024)
    assert params.initial_max_velocity == 3.0


def test_vorticity_of_known_fields():
    n = 32
    x = cell_centres(n)[:, None].expand(n, n)
    y = cell_centres(n)[None, :].expand(n, n)
    velocity = torch.stack((torch.sin(2 * y), torch.cos(3 * x))).float()
    expected = -3 * torch.sin(3 * x) - 2 * torch.cos(2 * y)
    torch.testing.assert_close(vorticity(velocity[None, None], method="spectral"), expected.float()[None, None], atol=1e-4, rtol=0)
    # Centred differences damp wavenumber k by sin(k h) / (k h).
    h = 2 * math.pi / n
    damped = -3 * math.sin(3 * h) / (3 * h) * torch.sin(3 * x) - 2 * math.sin(2 * h) / (2 * h) * torch.cos(2 * y)
    torch.testing.assert_close(vorticity(velocity), damped.float(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="method"):
        vorticity(velocity, method="upwind")


def test_forcing_pattern_varies_along_the_last_dim():
    pattern = forcing_pattern(16, 4)
    assert pattern.shape == (16, 16)
    assert torch.equal(pattern[0], pattern[5])
    torch.testing.assert_close(pattern[0], torch.sin(4 * cell_centres(16)).float())


def test_render_vorticity_grid_and_colors():
    fields = torch.zeros(2, 3, 8, 8)
    fields[0, 0] = 1.0
    fields[1, 2] = -1.0
    image = render_vorticity(fields, vmax=1.0, min_cell_pixels=32, gap=2)
    assert image.size == (3 * 32 + 2 * 2, 2 * 32 + 2)
    pixels = np.asarray(image).astype(int)
    red, white, blue = pixels[5, 5], pixels[5, 40], pixels[40, 2 * 34 + 5]
    assert red[0] > red[2] + 80 and blue[2] > blue[0] + 80
    assert (white > 240).all()


@pytest.mark.slow
def test_quickstart_data_shows_the_four_bands():
    # The simulation settings the quickstart really uses (configs/quickstart.json).
    from difftrain.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.json")
    params = KolmogorovParams(**config.simulation.model_dump())
    x = simulate(params, 8, seed=0, device="cpu", progress=False)
    assert x.shape == (8, params.keep, 2, 32, 32)
    profile = vorticity(x).double().mean(dim=(0, 1, 2))
    cosine_amplitude = 2 * (profile * torch.cos(params.wavenumber * cell_centres(32))).mean()
    assert cosine_amplitude < -0.8
    assert cosine_amplitude.square() / 2 > 0.8 * profile.square().mean()
