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
from difftrain.data.kolmogorov import KolmogorovParams, dataset_paths, ensure_dataset, render_vorticity, vorticity
from difftrain.models.score import ScoreUNet
from difftrain.sde import VPSDE

MODEL_FILE = "model.safetensors"
VALIDATION_SEED = 12345  # fixed noise and times, so loss_valid is comparable between epochs
MAX_VALIDATION_ITEMS = 256


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


class KolmogorovTask:
    """Epsilon-prediction training of the score network on windows of Kolmogorov trajectories."""

    def __init__(self, config: Config, accelerator: Any):
        self.config = config
        self.device = accelerator.device
        data_root = Path(config.data_root)
        params = KolmogorovParams(**config.simulation.model_dump())
        paths = dataset_paths(data_root)
        if not all(path.exists() for path in paths.values()):
            if accelerator.is_main_process:
                print(f"generating Kolmogorov data in '{data_root}' (once; later runs reuse it)")
                ensure_dataset(data_root, params, seed=0)
            accelerator.wait_for_everyone()
        self.train_set = TrajectoryDataset(paths["train"], config.window)
        self.valid_set = TrajectoryDataset(paths["valid"], config.window)
        self.model = build_score_network(config)
        self.sde = VPSDE()

    # ---- data ---------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        return epoch_permutation_batches(len(self.train_set), self.config.batch_size, self.config.seed,
                                         epoch, rank, world_size)

    def collate(self, indices: Sequence[int], epoch: int) -> torch.Tensor:
        return torch.stack([self.train_set[i] for i in indices]).to(self.device)

    # ---- objective ----------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.sde.loss(model, batch, generator)

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
            batch = torch.stack([self.valid_set[i] for i in chunk]).to(self.device)
            total += self.sde.loss(model, batch, generator).item() * len(chunk)
            seen += len(chunk)
        return total / seen

    def samples(self, model: nn.Module) -> dict[str, Any]:
        """`num_samples` trajectories of `window` states, as one vorticity image."""
        example = self.train_set[0]
        shape = (self.config.num_samples, *example.shape)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        x = self.sde.sample(model, shape, self.config.sample_inference_steps, generator, self.device)
        states = x.float().cpu().unflatten(1, (self.config.window, 2))  # (samples, window, 2, H, W)
        return {"vorticity": render_vorticity(vorticity(states))}

    # ---- persistence ------------------------------------------------------------------------------
    def write_model(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / MODEL_FILE),
                  metadata={"format": "pt", "task": "kolmogorov"})

    def load_model(self, model: nn.Module, folder: Path) -> None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(folder / MODEL_FILE), device=str(self.device)))

    def run_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
