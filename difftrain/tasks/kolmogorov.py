"""The Kolmogorov-flow experiment (sda): a score network over windows of velocity fields.

Wiring only: the data comes from `difftrain.data`, the network from `difftrain.models.score`, the
diffusion math from `difftrain.sde`. Needs no downloaded weights, which makes it our quickstart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.fields import TrajectoryDataset
from difftrain.data.kolmogorov import (KolmogorovParams, dataset_paths, draw_spectra, energy_spectrum, ensure_dataset,
                                       render_vorticity, spectrum_error, vorticity)
from difftrain.figures import drawing, figure_to_image
from difftrain.models.score import ScoreUNet
from difftrain.objectives import RectifiedFlowObjective
from difftrain.sampling import sample_flow_euler
from difftrain.sde import VPSDE
from difftrain.tasks.base import StartPoint, TaskDefaults, TaskParts

MODEL_FILE = "model.safetensors"
VALIDATION_SEED = 12345  # fixed noise and times, so loss_valid is comparable between epochs
MAX_VALIDATION_ITEMS = 256
SHEET_ROWS = 4  # trajectories per set on the vorticity sheet; the spectrum uses all num_samples
SET_GAP_PIXELS = 16  # between the data rows and the generated rows (cells are 2 px apart)


def build_score_network(config: Config) -> ScoreUNet:
    return ScoreUNet(window=config.window, embedding=config.embedding,
                     hidden_channels=config.hidden_channels, hidden_blocks=config.hidden_blocks,
                     kernel_size=config.kernel_size, activation=config.activation,
                     forcing_wavenumber=config.simulation.wavenumber)


def epoch_permutation_batches(num_items: int, batch_size: int, seed: int, epoch: int,
                              rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's batches of one epoch: a permutation drawn from (seed, epoch) alone.

    Being a pure function of (seed, epoch) is what makes resume exact: a resumed run redraws the
    same order and skips the batches it already consumed. Every rank gets the same number of
    batches (the remainder that cannot be split evenly is dropped).
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    global_batch = batch_size * world_size
    usable = num_items // global_batch * global_batch
    return [order[start + rank * batch_size: start + (rank + 1) * batch_size]
            for start in range(0, usable, global_batch)]


def evenly_spaced_windows(dataset: TrajectoryDataset, count: int, window: int) -> torch.Tensor:
    """`count` windows evenly spaced through `dataset` (the same ones every call), cycling when it
    holds fewer: (count, window, 2, H, W). What the samples are judged against."""
    spaced = torch.linspace(0, max(len(dataset), count) - 1, count).long().tolist()
    return dataset.batch([index % len(dataset) for index in spaced]).float().unflatten(1, (window, 2))


def stacked(images: Sequence[Any], gap: int = SET_GAP_PIXELS) -> Any:
    """PIL images one above the other on white, `gap` pixels apart (left-aligned)."""
    from PIL import Image

    width = max(image.width for image in images)
    height = sum(image.height for image in images) + gap * (len(images) - 1)
    canvas, top = Image.new("RGB", (width, height), (255, 255, 255)), 0
    for image in images:
        canvas.paste(image, (0, top))
        top += image.height + gap
    return canvas


def band_score(fields: torch.Tensor, wavenumber: int) -> float:
    """Cosine similarity of the mean vorticity profile along y (fields (..., H, W), y last) with
    -cos(k y): how clearly the forcing's bands show."""
    profile = fields.reshape(-1, *fields.shape[-2:]).mean(dim=(0, 1))
    width = profile.shape[-1]
    y = (torch.arange(width, dtype=profile.dtype) + 0.5) * (2 * torch.pi / width)
    return float(torch.nn.functional.cosine_similarity(profile, -torch.cos(wavenumber * y), dim=0))


class KolmogorovTask:
    """The score network on windows of Kolmogorov trajectories: VP-SDE epsilon loss, or with
    `rectified_flow` the velocity of the straight path from data (s=0) to noise (s=1), the
    network's time input being s itself (timestep_scale 1, same as the VP-SDE's t in [0, 1])."""

    # Built from nothing: resume_ckpt can only name one of our checkpoints; a constant lr from step 0.
    defaults = TaskDefaults(from_scratch=True, warmup_fraction=0.0)

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        self.config = config
        self.device = accelerator.device
        data_root = Path(config.data_root)
        params = KolmogorovParams(**config.simulation.model_dump())
        paths = dataset_paths(data_root)
        if accelerator.is_main_process:
            # Reuses matching files, generates missing ones, refuses to overwrite other data.
            ensure_dataset(data_root, params, seed=0)
        accelerator.wait_for_everyone()
        self.train_set = TrajectoryDataset(paths["train"], config.window)
        self.valid_set = TrajectoryDataset(paths["valid"], config.window)
        self.model = build_score_network(config)
        self.sde = VPSDE()
        self.flow = RectifiedFlowObjective(time_sampling=config.timestep_sampling, timestep_scale=1.0) \
            if config.rectified_flow else None
        self.pairs: Optional[Any] = None  # a ReflowPairDataset while a reflow stage trains
        # The trainer loads a checkpoint's weights itself (load_model); `start` has nothing else for us.
        self.parts = TaskParts(samples=self, validation=self, flow=self if self.flow is not None else None)

    # ---- data ---------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        items = len(self.pairs) if self.pairs is not None else len(self.train_set)
        return epoch_permutation_batches(items, self.config.batch_size, self.config.seed, epoch, rank, world_size)

    def collate(self, indices: Sequence[int], epoch: int) -> Any:
        if self.pairs is not None:
            pairs = [self.pairs[i] for i in indices]
            return {"x0": torch.stack([p["x0"] for p in pairs]).to(self.device),
                    "noise": torch.stack([p["noise"] for p in pairs]).to(self.device)}
        return self.train_set.batch(indices).to(self.device)

    # ---- objective ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        if self.flow is None:
            return self.sde.loss(model, batch, generator)
        if isinstance(batch, dict):  # reflow: the coupling (noise, endpoint) is given
            flow_time = self.flow.sample_flow_time(batch["x0"].shape[0], generator, self.device)
            return self.flow.flow_loss(model, batch["x0"], batch["noise"], flow_time)[0]
        return self.flow.loss(model, batch, generator)[0]

    def _loss_with_fixed_draws(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.flow is None:
            return self.sde.loss(model, batch, generator)
        return self.flow.loss(model, batch, generator)[0]

    def validation_loss(self, model: nn.Module) -> Optional[float]:
        count = min(len(self.valid_set), MAX_VALIDATION_ITEMS)
        if count == 0:
            return None
        # Evenly spaced items and one fixed generator: the same noise and times every epoch.
        indices = torch.linspace(0, len(self.valid_set) - 1, count).long().tolist()
        generator = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED)
        total, seen = 0.0, 0
        for start in range(0, count, self.config.batch_size):
            chunk = indices[start:start + self.config.batch_size]
            batch = self.valid_set.batch(chunk).to(self.device)
            total += self._loss_with_fixed_draws(model, batch, generator).item() * len(chunk)
            seen += len(chunk)
        return total / seen

    def samples(self, model: nn.Module) -> dict[str, Any]:
        """`num_samples` generated trajectories of `window` states against as many validation
        windows (evenly spaced through the valid set, the same ones every event):

        - "samples": the vorticity sheet, validation rows above generated rows (the first
          SHEET_ROWS of each, a wider white band between the sets), one colour scale (the data's 99th percentile of |vorticity|, so
          generated noise shows as saturation);
        - "spectrum": log-log kinetic-energy spectra of both sets (`draw_spectra`);
        - `spectrum_error`: mean relative error of the generated shell energies against the
          data's over k = 1 .. size/4 (`difftrain.data.kolmogorov.spectrum_error`);
        - `band_score`: the cosine similarity between the samples' x-averaged vorticity profile
          and the profile -cos(k y) the forcing imprints (about 0.8-0.95 for the quickstart's
          data, ~0 for noise).
        A picture that cannot be drawn is one warning; the numbers are returned regardless."""
        generated = self._generate(model)  # (samples, window, 2, H, W)
        data = evenly_spaced_windows(self.valid_set, generated.shape[0], self.config.window)
        generated_vorticity, data_vorticity = vorticity(generated), vorticity(data)
        results: dict[str, Any] = {
            "band_score": band_score(generated_vorticity, self.config.simulation.wavenumber),
            "spectrum_error": spectrum_error(generated, data),
        }
        with drawing("the Kolmogorov vorticity sheet"):
            scale = float(data_vorticity.abs().flatten().quantile(0.99))
            results["samples"] = stacked([render_vorticity(data_vorticity[:SHEET_ROWS], vmax=scale),
                                          render_vorticity(generated_vorticity[:SHEET_ROWS], vmax=scale)])
        with drawing("the Kolmogorov energy spectrum"):
            count = generated.shape[0] * generated.shape[1]
            spectra = {f"validation data ({count} states)": energy_spectrum(data)[1],
                       f"generated ({count} states)": energy_spectrum(generated)[1]}
            figure = draw_spectra(spectra, generated.shape[-1],
                                  title=f"spectrum_error {results['spectrum_error']:.3f}")
            results["spectrum"] = figure_to_image(figure)
        return results

    def _generate(self, model: nn.Module) -> torch.Tensor:
        """`num_samples` windows drawn with `sample_inference_steps` steps from seeded noise:
        (samples, window, 2, H, W) on the CPU."""
        example = self.train_set[0]
        shape = (self.config.num_samples, *example.shape)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        if self.flow is None:
            x = self.sde.sample(model, shape, self.config.sample_inference_steps, generator, self.device)
        else:
            noise = torch.randn(shape, generator=generator, device=self.device)
            x = sample_flow_euler(self.flow.velocity_fn(model), noise, self.config.sample_inference_steps)
        return x.float().cpu().unflatten(1, (self.config.window, 2))

    # ---- rectified flow and reflow -------------------------------------------------------------------
    def flow_velocity_fn(self, model: nn.Module):
        assert self.flow is not None
        return self.flow.velocity_fn(model)

    def _noise(self, count: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn((count, *self.train_set[0].shape), generator=generator).to(self.device)

    def flow_probe(self) -> tuple[torch.Tensor, None]:
        return self._noise(16, VALIDATION_SEED), None

    def reflow_inputs(self, stage: int, batches: int) -> tuple[list[torch.Tensor], None]:
        # Seeded by (seed, stage): a generation resumed after a crash pairs shards with the same noise.
        return [self._noise(self.config.batch_size, self.config.seed * 1000 + stage * 100 + index)
                for index in range(batches)], None

    def use_reflow_pairs(self, pairs: Optional[Any]) -> None:
        self.pairs = pairs

    def render_flow_states(self, batches: Sequence[torch.Tensor]) -> list[Any]:
        """Flow states (B, window * 2, H, W) as pictures: the vorticity of the first state of the first 4
        trajectories of each batch in a row, all on one colour scale so 1-step and N-step samples compare."""
        fields = [vorticity(x[:4, :2].float().cpu().unflatten(1, (1, 2)))[:, 0] for x in batches]  # (<=4, H, W)
        vmax = float(torch.cat([f.flatten() for f in fields]).abs().quantile(0.99)) or None
        return [render_vorticity(f, vmax=vmax, min_cell_pixels=96) for f in fields]

    # ---- persistence ------------------------------------------------------------------------------
    def write_model(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_FILE),
                  metadata={"format": "pt", "task": "kolmogorov"})

    def load_model(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import load_file

        # Read on the CPU: accelerate names the device 'cpu:0' in a multi-process CPU run, which
        # safetensors refuses; load_state_dict copies onto the model's own device anyway.
        model.load_state_dict(load_file(str(folder / MODEL_FILE), device="cpu"))

    def run_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
