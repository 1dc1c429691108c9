"""Kolmogorov-flow trajectories: the training data of the sda Kolmogorov experiment.

The flow is 2-D incompressible Navier-Stokes on the periodic square [0, 2pi]^2, solved in
vorticity form with a pseudo-spectral method:

    dw/dt + u . grad(w) = nu lap(w) - drag w + curl(f),   f = (A sin(k y), 0),   nu = 1 / Re

so the vorticity forcing is curl(f) = -A k cos(k y). The defaults are the paper's (Reynolds 1000,
forcing wavenumber 4, linear drag 0.1, 256^2 grid, dt 0.2, 128 states of which the last 64 are kept,
coarsened x4 to 64^2, 1024 trajectories split 80/10/10).

Array layout, shared with every consumer of these files: a velocity field is a tensor
(..., 2, H, W) where channel 0 is u (the x-velocity) and channel 1 is v (the y-velocity); dim -2
indexes x and dim -1 indexes y, at cell centres x_i = 2pi (i + 1/2) / H, y_j = 2pi (j + 1/2) / W.
The forcing therefore varies along the last dim only (see ``forcing_pattern``), which is the
layout jax-cfd (and so sda) uses; in a rendered image (rows = dim -2) the 4 forcing bands are
vertical. Vorticity is dv/dx - du/dy (sda plots the opposite sign).

At Re 1000 single snapshots are dominated by vortices; the bands are the mean flow: averaged
over x and time the vorticity is almost purely -c cos(4 y) (99% of the mean profile's variance
in the CPU quickstart data, amplitude ~1.5 against a snapshot rms of ~4).

Run ``python -m difftrain.data.kolmogorov --help`` for the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from difftrain import log
from difftrain.errors import ConfigError, exit_on_user_error

logger = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# Bump whenever the numbers a given parameter set produces change, so ensure_dataset never
# reuses files written by an older solver.
GENERATOR_VERSION = 1

# RK4's stability region reaches 2.83 on the imaginary axis; with the 2/3 rule the largest
# resolved wavenumber is N/3, so advection is stable roughly while u_max dt / h <= 2.83 * 3 / (2 pi) ~ 1.35.
# Past this the run is no longer trustworthy even if it has not blown up yet.
_COURANT_LIMIT = 1.3


@dataclass(frozen=True)
class KolmogorovParams:
    """Everything that determines the generated numbers (with the seed), paper defaults.

    Attributes:
        size: simulation grid is size x size.
        coarsen: stored fields are mean-pooled by this factor (size must be divisible by it).
        trajectories: number of trajectories ``generate_dataset`` writes (split 80/10/10).
        steps: states computed after the initial condition, one every ``dt``.
        keep: the last ``keep`` of those states are stored (the rest is spin-up).
        dt: time between stored states; the solver takes inner sub-steps (see ``substeps``).
        reynolds: Reynolds number; the kinematic viscosity is 1 / reynolds.
        wavenumber: forcing wavenumber k of f = (A sin(k y), 0).
        forcing_amplitude: A.
        drag: linear drag coefficient (damps velocity as -drag * u).
        initial_max_velocity: the random initial velocity is scaled to this maximum speed.
        initial_peak_wavenumber: wavenumber where the initial field's energy peaks.
        courant: target u_bound * dt_inner / h, which fixes the number of inner sub-steps.
        velocity_bound: speed assumed when choosing the sub-steps (jax-cfd's choice for this
            flow; measured peaks are ~4-5.5); the solver checks the real speed every stored step
            and raises if the actual Courant number ever exceeds the stability limit.
        precision: "float32" (default, what jax-cfd uses) or "float64".
    """

    size: int = 256
    coarsen: int = 4
    trajectories: int = 1024
    steps: int = 128
    keep: int = 64
    dt: float = 0.2
    reynolds: float = 1000.0
    wavenumber: int = 4
    forcing_amplitude: float = 1.0
    drag: float = 0.1
    initial_max_velocity: float = 3.0
    initial_peak_wavenumber: float = 4.0
    courant: float = 0.5
    velocity_bound: float = 5.0
    precision: str = "float32"

    def __post_init__(self) -> None:
        def fail(field: str, problem: str, fix: str) -> None:
            raise ConfigError(f"Kolmogorov parameter {field}={getattr(self, field)!r}: {problem}; {fix}.")

        for field in ("size", "coarsen", "trajectories", "steps", "keep", "wavenumber"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                fail(field, "must be a positive integer", "pass e.g. the paper's value")
        for field in ("dt", "reynolds", "initial_max_velocity", "courant", "velocity_bound"):
            if not getattr(self, field) > 0:
                fail(field, "must be positive", "pass a positive number")
        if self.drag < 0:
            fail("drag", "must be >= 0", "pass 0 for no drag or the paper's 0.1")
        if self.size < 8:
            fail("size", "is too small to resolve any flow", "use at least 32 (the paper uses 256)")
        if self.size % self.coarsen:
            fail("coarsen", f"does not divide size={self.size}", "pick a divisor, e.g. 4 for 256")
        if self.keep > self.steps:
            fail("keep", f"exceeds steps={self.steps}", "keep at most as many states as are computed")
        if self.precision not in ("float32", "float64"):
            fail("precision", "is not a known precision", "use 'float32' or 'float64'")
        if self.wavenumber >= self.size // 3:
            fail("wavenumber", f"is not resolved on a {self.size}^2 grid", "use a larger size")

    @property
    def output_size(self) -> int:
        """Side of the stored fields: size // coarsen."""
        return self.size // self.coarsen

    @property
    def substeps(self) -> int:
        """Inner solver steps per stored step, from the Courant target and the velocity bound."""
        grid_spacing = 2 * math.pi / self.size
        return max(1, math.ceil(self.dt * self.velocity_bound / (self.courant * grid_spacing)))

    def to_dict(self) -> dict[str, int | float | str]:
        """The parameters as plain JSON/HDF5-friendly values."""
        return dataclasses.asdict(self)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cell_centres(size: int) -> torch.Tensor:
    """Coordinates 2pi (i + 1/2) / size of the cell centres, shape (size,), float64."""
    return (torch.arange(size, dtype=torch.float64) + 0.5) * (2 * math.pi / size)


def forcing_pattern(size: int, wavenumber: int = 4) -> torch.Tensor:
    """The x-velocity forcing sin(k y) sampled on a (size, size) grid, float32.

    It varies along the last dim only (dim -1 indexes y); a score network that wants the
    forcing as an extra input channel should append exactly this.
    """
    return torch.sin(wavenumber * cell_centres(size)).float().expand(size, size).clone()


class _SpectralSolver:
    """Integrating-factor RK4 on the rfft2 coefficients of the vorticity, batched.

    Viscosity and drag are linear and diagonal in Fourier space, so they are integrated exactly
    by the factor exp(-(nu k^2 + drag) t); only advection and forcing go through RK4, which keeps
    the step limited by advection alone (viscosity at k ~ 85 would otherwise force tiny steps).
    The state is kept 2/3-dealiased, so the truncated nonlinear term conserves energy and
    enstrophy exactly: an under-resolved grid piles energy up at small scales but cannot blow up.
    """

    def __init__(self, params: KolmogorovParams, device: torch.device) -> None:
        self.params = params
        self.device = device
        self.real_dtype = torch.float64 if params.precision == "float64" else torch.float32
        n = params.size
        wavenumbers_x = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
        wavenumbers_y = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64)
        kx = wavenumbers_x[:, None].expand(n, n // 2 + 1)
        ky = wavenumbers_y[None, :].expand(n, n // 2 + 1)
        k_squared = kx**2 + ky**2
        # Square 2/3 truncation: products of two kept modes alias only onto discarded ones.
        self.dealias = ((kx.abs() < n / 3) & (ky.abs() < n / 3)).to(device)
        inverse_k_squared = torch.where(k_squared > 0, 1.0 / k_squared.clamp(min=1.0), 0.0)
        complex_dtype = torch.complex128 if params.precision == "float64" else torch.complex64
        self.complex_dtype = complex_dtype
        self.ikx = (1j * kx).to(device=device, dtype=complex_dtype)
        self.iky = (1j * ky).to(device=device, dtype=complex_dtype)
        self.inverse_k_squared = inverse_k_squared.to(device=device, dtype=self.real_dtype)

        self.dt_inner = params.dt / params.substeps
        decay_rate = k_squared / params.reynolds + params.drag
        self.full_step_decay = torch.exp(-decay_rate * self.dt_inner).to(device, self.real_dtype)
        self.half_step_decay = torch.exp(-decay_rate * self.dt_inner / 2).to(device, self.real_dtype)

        y = cell_centres(n)[None, :].expand(n, n)
        # curl of (A sin(k y), 0) is -dA sin(k y)/dy = -A k cos(k y).
        vorticity_forcing = -params.forcing_amplitude * params.wavenumber * torch.cos(params.wavenumber * y)
        self.forcing_hat = (torch.fft.rfft2(vorticity_forcing) * self.dealias.cpu()).to(device, complex_dtype)

    def velocity_hat(self, vorticity_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(u_hat, v_hat) from w_hat via the stream function: lap(psi) = -w, u = dpsi/dy, v = -dpsi/dx."""
        stream_hat = vorticity_hat * self.inverse_k_squared
        return self.iky * stream_hat, -self.ikx * stream_hat

    def tendency(self, vorticity_hat: torch.Tensor) -> torch.Tensor:
        """Advection plus forcing in Fourier space, -(u . grad w)^ + curl(f)^ (dealiased)."""
        n = self.params.size
        u_hat, v_hat = self.velocity_hat(vorticity_hat)
        stacked = torch.stack((u_hat, v_hat, vorticity_hat), dim=1)
        u, v, w = torch.fft.irfft2(stacked, s=(n, n)).unbind(dim=1)
        # Divergence form: u.grad(w) = div(u w) because div(u) = 0 holds exactly here.
        fluxes_hat = torch.fft.rfft2(torch.stack((u * w, v * w), dim=1))
        advection_hat = self.ikx * fluxes_hat[:, 0] + self.iky * fluxes_hat[:, 1]
        return (self.forcing_hat - advection_hat) * self.dealias

    def step(self, w_hat: torch.Tensor) -> torch.Tensor:
        """One inner step of length dt_inner (integrating-factor RK4)."""
        dt, half, full = self.dt_inner, self.half_step_decay, self.full_step_decay
        k1 = self.tendency(w_hat)
        k2 = self.tendency(half * (w_hat + dt / 2 * k1))
        k3 = self.tendency(half * w_hat + dt / 2 * k2)
        k4 = self.tendency(full * w_hat + dt * half * k3)
        return full * w_hat + dt / 6 * (full * k1 + 2 * half * (k2 + k3) + k4)

    def velocity(self, w_hat: torch.Tensor) -> torch.Tensor:
        """Physical velocity (B, 2, n, n) from vorticity coefficients (B, n, n//2+1)."""
        n = self.params.size
        return torch.fft.irfft2(torch.stack(self.velocity_hat(w_hat), dim=1), s=(n, n))

    def initial_vorticity_hat(self, trajectory_seeds: Sequence[int]) -> torch.Tensor:
        """Filtered random fields scaled to the initial maximum speed, (B, n, n//2+1).

        White noise is drawn on the CPU in float64 from one generator per trajectory, so a
        trajectory's initial condition depends on (seed, index) only: not on the device, the
        batch size, or which other trajectories share its batch.
        """
        params, n = self.params, self.params.size
        noise = torch.stack([
            torch.randn(n, n, generator=torch.Generator().manual_seed(trajectory_seed), dtype=torch.float64)
            for trajectory_seed in trajectory_seeds
        ])
        kx = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)[:, None]
        ky = torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64)[None, :]
        k = torch.sqrt(kx**2 + ky**2)
        # Per-mode speed amplitude (k/kp)^2 exp(-(k/kp)^2) peaks at kp and vanishes at k = 0;
        # |w_hat| = k |u_hat| for a divergence-free field.
        relative = k / params.initial_peak_wavenumber
        speed_amplitude = relative**2 * torch.exp(-(relative**2))
        vorticity_hat = torch.fft.rfft2(noise) * (k * speed_amplitude) * self.dealias.cpu()
        stream_hat = vorticity_hat * torch.where(k > 0, 1.0 / k.clamp(min=1.0) ** 2, 0.0)
        velocity = torch.fft.irfft2(torch.stack((1j * ky * stream_hat, -1j * kx * stream_hat), dim=1), s=(n, n))
        max_speed = velocity.square().sum(dim=1).sqrt().amax(dim=(-2, -1))
        vorticity_hat = vorticity_hat * (params.initial_max_velocity / max_speed)[:, None, None]
        return vorticity_hat.to(self.device, self.complex_dtype)


def coarsen_mean(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Mean-pool the last two dims by ``factor``: (..., H, W) -> (..., H/factor, W/factor).

    On the cell-centred grid a coarse cell's mean sits exactly at the coarse cell centre.
    """
    if factor == 1:
        return x
    *batch, height, width = x.shape
    pooled = x.reshape(*batch, height // factor, factor, width // factor, factor)
    return pooled.mean(dim=(-3, -1))


def _trajectory_seed(seed: int, index: int) -> int:
    """A 63-bit generator seed for trajectory ``index`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]) >> 1


def simulate_batches(
    params: KolmogorovParams,
    indices: Sequence[int],
    *,
    seed: int,
    device: torch.device,
    batch_size: int,
    progress_bar=None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset into ``indices``, velocities (B, keep, 2, H', W') float32 CPU) per batch."""
    solver = _SpectralSolver(params, device)
    for offset in range(0, len(indices), batch_size):
        batch_indices = indices[offset : offset + batch_size]
        with _cpu_threads_for(params, device):
            saved = _simulate_one_batch(solver, [_trajectory_seed(seed, index) for index in batch_indices], progress_bar)
        yield offset, saved


@contextmanager
def _cpu_threads_for(params: KolmogorovParams, device: torch.device) -> Iterator[None]:
    """Run small CPU simulations single-threaded, restoring the thread count afterwards.

    FFTs of 128^2 and below gain little from intra-op threads and lose badly when the cores are
    shared (CI, a laptop running other jobs), because OpenMP threads wait on each other.
    Measured on 2 cores at 64^2: quiet machine, batch 64, two threads 1.3x faster; with two
    other busy processes, two threads 3.3x slower at batch 64 and 13-30x slower at batch 2.
    """
    if device.type != "cpu" or params.size > 128:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _simulate_one_batch(solver: _SpectralSolver, trajectory_seeds: list[int], progress_bar) -> torch.Tensor:
    """Kept velocities (B, keep, 2, H', W') float32 on CPU for one batch of trajectories."""
    params = solver.params
    grid_spacing = 2 * math.pi / params.size
    first_kept_step = params.steps - params.keep + 1
    w_hat = solver.initial_vorticity_hat(trajectory_seeds)
    saved = torch.empty(len(trajectory_seeds), params.keep, 2, params.output_size, params.output_size)
    for step in range(1, params.steps + 1):
        for _ in range(params.substeps):
            w_hat = solver.step(w_hat)
        velocity = solver.velocity(w_hat)
        max_speed = float(velocity.square().sum(dim=1).sqrt().amax())
        courant = max_speed * solver.dt_inner / grid_spacing
        if not math.isfinite(max_speed) or courant > _COURANT_LIMIT:
            raise RuntimeError(
                f"Kolmogorov solver became unstable at step {step} (max speed {max_speed:.3g}, "
                f"Courant number {courant:.3g} > {_COURANT_LIMIT}); raise velocity_bound "
                f"(now {params.velocity_bound}) or lower courant (now {params.courant})."
            )
        if step >= first_kept_step:
            coarse = coarsen_mean(velocity, params.coarsen)
            saved[:, step - first_kept_step] = coarse.to("cpu", torch.float32)
        if progress_bar is not None:
            progress_bar.update(1)
    return saved


def _make_progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="kolmogorov steps", unit="step", dynamic_ncols=True)


def vorticity(x: torch.Tensor, *, method: str = "centred") -> torch.Tensor:
    """Vorticity dv/dx - du/dy of periodic velocity fields.

    ``method="centred"`` (default) uses second-order centred differences with periodic wrap,
    as sda does for its figures: on coarsened (mean-pooled) data it is the robust choice,
    because pooling aliases small-scale energy that a spectral derivative would amplify into
    pixel-level speckle. ``method="spectral"`` differentiates in Fourier space, exact for
    band-limited fields such as the solver's uncoarsened output (the Nyquist mode of an
    even-sized grid has no sign-defined derivative and is dropped).

    Args:
        x: (..., 2, H, W) velocity on the cell-centred grid of [0, 2pi]^2; channel 0 is u
            (x-velocity, along dim -2), channel 1 is v (along dim -1).
        method: "centred" or "spectral".
    Returns:
        (..., H, W) vorticity, float64 if x is float64 else float32.
    """
    if x.ndim < 3 or x.shape[-3] != 2:
        raise ValueError(f"vorticity expects (..., 2, H, W) velocity, got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    u, v = x[..., 0, :, :], x[..., 1, :, :]
    if method == "centred":
        dv_dx = (v.roll(-1, dims=-2) - v.roll(1, dims=-2)) * (height / (4 * math.pi))
        du_dy = (u.roll(-1, dims=-1) - u.roll(1, dims=-1)) * (width / (4 * math.pi))
        return dv_dx - du_dy
    if method != "spectral":
        raise ValueError(f"vorticity method must be 'centred' or 'spectral', got {method!r}")
    kx = _derivative_wavenumbers(height, full=True, device=x.device)[:, None]
    ky = _derivative_wavenumbers(width, full=False, device=x.device)[None, :]
    vorticity_hat = 1j * kx * torch.fft.rfft2(v) - 1j * ky * torch.fft.rfft2(u)
    return torch.fft.irfft2(vorticity_hat, s=(height, width))


def _derivative_wavenumbers(n: int, *, full: bool, device: torch.device) -> torch.Tensor:
    wavenumbers = torch.fft.fftfreq(n, 1.0 / n) if full else torch.fft.rfftfreq(n, 1.0 / n)
    if n % 2 == 0:
        wavenumbers[n // 2] = 0.0
    return wavenumbers.to(device)


def energy_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell-summed kinetic energy spectrum of periodic velocity fields, averaged over batch dims.

    Args:
        x: (..., 2, N, N) velocity.
    Returns:
        (k, E): integer shell wavenumbers 0..N//2, shape (N//2 + 1,), and E(k), same shape,
        float64, with sum(E) equal to the mean kinetic energy 0.5 <|u|^2> over the grid.
    """
    n = x.shape[-1]
    if x.shape[-2] != n or x.shape[-3] != 2:
        raise ValueError(f"energy_spectrum expects (..., 2, N, N) velocity, got shape {tuple(x.shape)}")
    coefficients = torch.fft.fft2(x.to(torch.float64)) / (n * n)
    energy_density = 0.5 * coefficients.abs().square().sum(dim=-3)
    energy_density = energy_density.reshape(-1, n, n).mean(dim=0)
    wavenumbers = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    shell = torch.sqrt(wavenumbers[:, None] ** 2 + wavenumbers[None, :] ** 2).round().long().clamp(max=n // 2)
    spectrum = torch.zeros(n // 2 + 1, dtype=torch.float64).index_add_(0, shell.flatten(), energy_density.flatten().cpu())
    return torch.arange(n // 2 + 1), spectrum



def scored_shells(size: int) -> range:
    """The wavenumber shells `spectrum_error` compares on a size x size grid: k = 1 .. size // 4
    inclusive (half the Nyquist wavenumber size / 2). Above that, mean-pooled data and the
    network's pixel-scale noise dominate, and shell sums get few modes near the corners."""
    return range(1, size // 4 + 1)


def spectrum_error(generated: torch.Tensor, data: torch.Tensor) -> float:
    """Mean relative error of the shell energies, mean over k in `scored_shells(N)` of
    |E_gen(k) - E_data(k)| / E_data(k), with E from `energy_spectrum` (each set's shells averaged
    over its states). 0 for identical sets; a shell where the data hold no energy counts as
    relative to the smallest positive float (so any generated energy there is a huge error).

    Args:
        generated, data: (..., 2, N, N) velocity fields; the leading dims may differ, N must not.
    """
    if generated.shape[-3:] != data.shape[-3:]:
        raise ValueError(f"spectrum_error compares fields of one shape, got {tuple(generated.shape[-3:])} "
                         f"and {tuple(data.shape[-3:])}")
    shells = list(scored_shells(data.shape[-1]))
    generated_energy = energy_spectrum(generated)[1][shells]
    data_energy = energy_spectrum(data)[1][shells]
    relative = (generated_energy - data_energy).abs() / data_energy.clamp(min=torch.finfo(torch.float64).tiny)
    return float(relative.mean())


def draw_spectra(spectra: dict[str, torch.Tensor], size: int, title: str = ""):
    """A log-log figure of shell energy E(k) against wavenumber k >= 1, one labelled curve per
    entry of `spectra` (name -> E from `energy_spectrum`), the shells `spectrum_error` scores
    shaded. Returns the matplotlib Figure (see difftrain.figures)."""
    from difftrain.figures import new_figure

    figure = new_figure(5.0, 3.6)
    axes = figure.add_subplot()
    for (name, energy), style in zip(spectra.items(), ("-", "--", ":", "-.")):
        wavenumbers = torch.arange(len(energy))
        positive = (wavenumbers >= 1) & (energy > 0)  # a log axis cannot show k = 0 or empty shells
        axes.loglog(wavenumbers[positive].numpy(), energy[positive].numpy(), style, marker=".", label=name)
    shells = scored_shells(size)
    # Three decades under the scored shells' lowest energy: a dealiased tail near 1e-15 would
    # otherwise squeeze the range that is judged into the top of the plot.
    scored = torch.cat([energy[shells.start:shells.stop] for energy in spectra.values()])
    if bool((scored > 0).any()):
        axes.set_ylim(bottom=float(scored[scored > 0].min()) / 1e3)
    axes.axvspan(shells.start, shells.stop - 1, color="0.9", zorder=0, label=f"scored: k = 1..{shells.stop - 1}")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes.set_xticks([2**power for power in range(int(math.log2(max(size // 2, 1))) + 1)])
    axes.xaxis.set_major_formatter(ScalarFormatter())  # 1 2 4 8 16, not 2 x 10^0
    axes.xaxis.set_minor_formatter(NullFormatter())
    axes.set_xlabel("wavenumber k")
    axes.set_ylabel("kinetic energy E(k)")
    axes.set_title(title, fontsize="medium")
    axes.legend(fontsize="small")
    return figure

# Anchors of the diverging colormap, from -vmax to +vmax: deep blue, light blue, white, light red,
# deep red. White at zero makes the sign of the vorticity readable at a glance.
_DIVERGING_ANCHORS = np.array(
    [[22, 58, 130], [90, 150, 205], [247, 247, 247], [230, 125, 95], [150, 20, 35]], dtype=np.float64
)


def _diverging_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [-1, 1] to uint8 RGB, shape (..., 3), by piecewise-linear interpolation."""
    positions = (np.clip(values, -1.0, 1.0) + 1.0) / 2.0 * (len(_DIVERGING_ANCHORS) - 1)
    lower = np.minimum(np.floor(positions).astype(np.int64), len(_DIVERGING_ANCHORS) - 2)
    weight = (positions - lower)[..., None]
    colors = (1 - weight) * _DIVERGING_ANCHORS[lower] + weight * _DIVERGING_ANCHORS[lower + 1]
    return np.round(colors).astype(np.uint8)


def render_vorticity(w: torch.Tensor | np.ndarray, *, vmax: float | None = None, min_cell_pixels: int = 128, gap: int = 2):
    """Draw vorticity fields as a grid image with a blue-white-red diverging colormap.

    Args:
        w: (rows, cols, H, W) vorticity, e.g. trajectories x time; (cols, H, W) and (H, W) are
            taken as one row / one cell. Image rows follow dim -2, image columns dim -1.
        vmax: value drawn fully saturated (symmetric around 0); by default the 99th percentile
            of |w|, so a few extreme pixels do not wash the picture out.
        min_cell_pixels: each cell is upscaled by an integer factor to at least this many pixels.
        gap: pixels of white between cells.
    Returns:
        a PIL RGB image.
    """
    from PIL import Image

    values = w.detach().to("cpu", torch.float64).numpy() if isinstance(w, torch.Tensor) else np.asarray(w, dtype=np.float64)
    while values.ndim < 4:
        values = values[None]
    if values.ndim != 4:
        raise ValueError(f"render_vorticity expects (rows, cols, H, W), got shape {values.shape}")
    rows, cols, height, width = values.shape
    if vmax is None:
        vmax = float(np.percentile(np.abs(values), 99)) if values.size else 1.0
    if not vmax > 0 or not math.isfinite(vmax):
        vmax = 1.0
    scale = max(1, math.ceil(min_cell_pixels / max(height, width)))
    cells = _diverging_colors(values / vmax).repeat(scale, axis=2).repeat(scale, axis=3)
    cell_height, cell_width = height * scale, width * scale
    canvas = np.full((rows * cell_height + (rows - 1) * gap, cols * cell_width + (cols - 1) * gap, 3), 255, dtype=np.uint8)
    for row in range(rows):
        for col in range(cols):
            top, left = row * (cell_height + gap), col * (cell_width + gap)
            canvas[top : top + cell_height, left : left + cell_width] = cells[row, col]
    return Image.fromarray(canvas)  # uint8 (H, W, 3) is RGB


def split_sizes(num_trajectories: int) -> dict[str, int]:
    """Trajectories per split: the first 80% train, the next 10% valid, the rest test."""
    train_end = int(SPLIT_FRACTIONS[0] * num_trajectories)
    valid_end = int((SPLIT_FRACTIONS[0] + SPLIT_FRACTIONS[1]) * num_trajectories)
    return {"train": train_end, "valid": valid_end - train_end, "test": num_trajectories - valid_end}


def dataset_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where ``generate_dataset`` writes each split: ``{"train": out_dir/train.h5, ...}``."""
    return {split: Path(out_dir) / f"{split}.h5" for split in SPLITS}


def _expected_attributes(params: KolmogorovParams, seed: int) -> dict[str, int | float | str]:
    return {**params.to_dict(), "seed": seed, "generator": "difftrain.data.kolmogorov", "generator_version": GENERATOR_VERSION}


_LAYOUT_NOTE = (
    "x[n, t, c, i, j]: velocity of trajectory n at stored step t; c=0 u (x-velocity), c=1 v "
    "(y-velocity); i indexes x, j indexes y, cell centres 2pi(i+1/2)/H; forcing sin(k y) on u."
)


def generate_dataset(
    out_dir: str | Path,
    params: KolmogorovParams,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 64,
) -> dict[str, Path]:
    """Simulate ``params.trajectories`` flows and write ``train.h5``, ``valid.h5``, ``test.h5``.

    Each file holds dataset ``x`` of shape (n_split, keep, 2, H', W') float32 and the generation
    parameters (plus seed and generator version) as HDF5 attributes. Batches are streamed to
    ``*.h5.tmp`` files that replace the targets only once everything succeeded, so an interrupted
    run never leaves a half-written dataset behind.

    Raises:
        ConfigError: a target exists and ``overwrite`` is false, or the split would be empty.
    """
    import h5py

    paths = dataset_paths(out_dir)
    sizes = split_sizes(params.trajectories)
    if min(sizes.values()) == 0:
        raise ConfigError(
            f"trajectories={params.trajectories} leaves a split empty ({sizes}); "
            "use at least 6 trajectories so train/valid/test each get one."
        )
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing and not overwrite:
        raise ConfigError(
            f"refusing to overwrite existing dataset file(s) {', '.join(existing)}; "
            "pass --overwrite (overwrite=True) or choose another output folder."
        )
    if batch_size < 1:
        raise ConfigError(f"batch size {batch_size} must be a positive integer.")
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else default_device()
    attributes = _expected_attributes(params, seed)
    temporary = {split: path.with_name(path.name + ".tmp") for split, path in paths.items()}
    split_starts, start = {}, 0
    for split in SPLITS:
        split_starts[split] = start
        start += sizes[split]

    files = {}
    bar = _make_progress_bar(math.ceil(params.trajectories / batch_size) * params.steps, progress)
    try:
        for split in SPLITS:
            handle = h5py.File(temporary[split], "w")
            files[split] = handle
            shape = (sizes[split], params.keep, 2, params.output_size, params.output_size)
            handle.create_dataset("x", shape=shape, dtype="float32", chunks=(1, *shape[1:]))
            handle.attrs.update({**attributes, "split": split, "first_trajectory": split_starts[split], "layout": _LAYOUT_NOTE})
        indices = list(range(params.trajectories))
        for offset, batch in simulate_batches(params, indices, seed=seed, device=device, batch_size=batch_size, progress_bar=bar):
            _write_batch(files, split_starts, sizes, offset, batch.numpy())
        for handle in files.values():
            handle.close()
        for split in SPLITS:
            os.replace(temporary[split], paths[split])
    finally:
        if bar is not None:
            bar.close()
        for handle in files.values():
            if handle.id.valid:
                handle.close()
        for path in temporary.values():
            path.unlink(missing_ok=True)
    return paths


def _write_batch(files, split_starts: dict[str, int], sizes: dict[str, int], offset: int, batch: np.ndarray) -> None:
    """Scatter trajectories [offset, offset + len(batch)) into the split files they belong to."""
    for split in SPLITS:
        lo = max(offset, split_starts[split])
        hi = min(offset + len(batch), split_starts[split] + sizes[split])
        if lo < hi:
            files[split]["x"][lo - split_starts[split] : hi - split_starts[split]] = batch[lo - offset : hi - offset]


def _stored_attribute_mismatch(path: Path, expected: dict[str, int | float | str]) -> str | None:
    """Why ``path`` cannot be reused for ``expected`` attributes, or None if it can."""
    import h5py

    if not path.exists():
        return f"{path} does not exist"
    try:
        with h5py.File(path, "r") as handle:
            if "x" not in handle:
                return f"{path} has no dataset 'x'"
            stored = dict(handle.attrs)
    except OSError as error:
        return f"{path} is not a readable HDF5 file ({error})"
    for key, value in expected.items():
        if key not in stored:
            return f"{path} lacks attribute {key!r}"
        stored_value = stored[key]
        stored_value = stored_value.decode() if isinstance(stored_value, bytes) else stored_value
        if isinstance(value, str) or isinstance(stored_value, str):
            same = str(stored_value) == str(value)
        else:
            same = float(stored_value) == float(value)
        if not same:
            return f"{path} was generated with {key}={stored_value!r}, wanted {value!r}"
    return None


def _generated_by_us(path: Path) -> bool:
    """Whether ``path`` is an HDF5 file this module wrote (it carries our ``generator`` attribute)."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            stored = handle.attrs.get("generator")
    except OSError:
        return False
    stored = stored.decode() if isinstance(stored, bytes) else stored
    return stored == "difftrain.data.kolmogorov"


def ensure_dataset(
    out_dir: str | Path,
    params: KolmogorovParams,
    *,
    seed: int = 0,
    progress: bool = True,
    device: str | torch.device | None = None,
    batch_size: int = 64,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Return the split files in ``out_dir``, generating them when there are none.

    - All three files generated here with ``params`` and ``seed``: reused (a quickstart pays for
      generation once).
    - All three present but not written by this module: the user's own data, used as it is (the
      ``simulation`` settings then do not apply, and the log says so).
    - None present, or only some, each generated here with the same parameters: generated
      (the same seed reproduces the files that are there, so nothing is lost).
    - Anything else (files from other parameters, a mix of foreign and missing files) would be
      overwritten, so it is a ConfigError unless ``overwrite`` is true.
    """
    out_dir = Path(out_dir)
    paths = dataset_paths(out_dir)
    expected = _expected_attributes(params, seed)
    present = {split: path for split, path in paths.items() if path.exists()}
    mismatches = {split: _stored_attribute_mismatch(path, expected) for split, path in present.items()}
    if len(present) == len(paths) and not any(mismatches.values()):
        logger.info("reusing Kolmogorov dataset in %s", out_dir)
        return paths
    if len(present) == len(paths) and not any(_generated_by_us(path) for path in present.values()):
        logger.warning("training on the existing train/valid/test.h5 in %s as they are (not generated by "
                       "difftrain, so the config's 'simulation' settings do not apply)", out_dir)
        return paths
    conflicting = [reason for reason in mismatches.values() if reason]
    if conflicting and not overwrite:
        raise ConfigError(
            f"data_root '{out_dir}' already holds Kolmogorov data that this config would replace: "
            f"{conflicting[0]}. Point data_root at another folder (each set of 'simulation' settings "
            "needs its own), or delete those files to generate them again.")
    reason = conflicting[0] if conflicting else f"{', '.join(sorted(set(paths) - set(present)))} missing"
    logger.info("generating Kolmogorov dataset in %s: %s", out_dir, reason)
    return generate_dataset(out_dir, params, seed=seed, overwrite=True, progress=progress, device=device,
                            batch_size=batch_size)


def build_argument_parser() -> argparse.ArgumentParser:
    """The command-line interface; every default is KolmogorovParams' (the paper's)."""
    defaults = KolmogorovParams()
    parser = argparse.ArgumentParser(
        prog="python -m difftrain.data.kolmogorov",
        description=(
            "Generate Kolmogorov-flow trajectories (2-D Navier-Stokes, periodic, sin(k y) forcing) "
            "and write train.h5 / valid.h5 / test.h5 (80/10/10) with dataset x of shape "
            "(N, keep, 2, size/coarsen, size/coarsen) float32. Defaults reproduce the sda paper; "
            "they are sized for a GPU. A CPU quickstart (~12 s on 2 cores): --size 64 --coarsen 2 "
            "--trajectories 24 --steps 64 --keep 32."
        ),
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--size", type=int, default=defaults.size, help="simulation grid side (default %(default)s)")
    parser.add_argument("--coarsen", type=int, default=defaults.coarsen, help="mean-pool factor of the stored fields (default %(default)s)")
    parser.add_argument("--trajectories", type=int, default=defaults.trajectories, help="number of trajectories, split 80/10/10 (default %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="states simulated after the initial condition (default %(default)s)")
    parser.add_argument("--keep", type=int, default=defaults.keep, help="the last KEEP states are stored (default %(default)s)")
    parser.add_argument("--dt", type=float, default=defaults.dt, help="time between stored states (default %(default)s)")
    parser.add_argument("--reynolds", type=float, default=defaults.reynolds, help="Reynolds number, viscosity 1/Re (default %(default)s)")
    parser.add_argument("--wavenumber", type=int, default=defaults.wavenumber, help="forcing wavenumber k of sin(k y) (default %(default)s)")
    parser.add_argument("--drag", type=float, default=defaults.drag, help="linear drag coefficient (default %(default)s)")
    parser.add_argument("--courant", type=float, default=defaults.courant, help="target Courant number of the inner sub-steps (default %(default)s)")
    parser.add_argument("--precision", choices=("float32", "float64"), default=defaults.precision, help="solver precision (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same data (default %(default)s)")
    parser.add_argument("--batch", type=int, default=64, help="trajectories simulated at once; does not change the data (default %(default)s)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda or cpu (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing train/valid/test.h5 in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    """Command-line entry point; user mistakes exit with status 2 and a one-line message."""
    program = "python -m difftrain.data.kolmogorov"
    log.setup()
    with exit_on_user_error(program):
        args = build_argument_parser().parse_args(argv)
        params = KolmogorovParams(
            size=args.size, coarsen=args.coarsen, trajectories=args.trajectories, steps=args.steps,
            keep=args.keep, dt=args.dt, reynolds=args.reynolds, wavenumber=args.wavenumber,
            drag=args.drag, courant=args.courant, precision=args.precision,
        )
        try:
            device = torch.device(args.device) if args.device is not None else default_device()
        except RuntimeError as error:
            raise ConfigError(f"--device {args.device!r} is not a torch device ({error}); use e.g. cpu or cuda.") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {args.device} requested but CUDA is not available; use --device cpu.")
        paths = generate_dataset(args.out, params, seed=args.seed, overwrite=args.overwrite, progress=not args.quiet, device=device, batch_size=args.batch)
        sizes = split_sizes(params.trajectories)
        for split, path in paths.items():
            log.say(f"{path}: {sizes[split]} trajectories x {params.keep} steps x 2 x {params.output_size} x {params.output_size}")
        return paths


if __name__ == "__main__":
    main()
