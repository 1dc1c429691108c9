"""iLECO (instant LECO): move the concept of "original prompt" toward "target prompt", or erase it
when the target prompt is empty. No images: each step draws random latents (B, 4, h, w) at
image_size and a timestep in [train_min_timesteps, train_max_timesteps); with the LoRA on, the
UNet's prediction for the original prompt must match the frozen model's prediction (LoRA off) for
the target prompt on the same latents. The latents are fed to the UNet as the noisy sample itself,
as TrainTrain does: at the trained timesteps they stand for noisy images of any content.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from difftrain.data.images import ImageBucketDataset
from difftrain.errors import ConfigError
from difftrain.modes.base import ModeTask
from difftrain.objectives import randn


class ILECOTask(ModeTask):
    """iLECO: see the module docstring."""

    MODES = ("iLECO",)

    def _scan_data(self):
        if not self.config.original_prompt.strip():
            raise ConfigError("iLECO needs \"original prompt\": the concept to change (e.g. \"Mona Lisa\"); "
                              "\"target prompt\" is what it becomes (empty: the concept is erased).")
        return [], []

    def _build_datasets(self):
        return ImageBucketDataset([], [], seed=self.config.seed), None

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        return self.repeated(0)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"original", "target": conditioning of each prompt for len(indices) rows}."""
        height, width = self.config.training_size()
        size = (width, height)
        return {"original": self.prompt_cond(self.config.original_prompt, len(indices), size),
                "target": self.prompt_cond(self.config.target_prompt, len(indices), size)}

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        rows = batch["original"]["encoder_hidden_states"].shape[0]
        height, width = self.config.training_size()
        factor = self.sd.vae_scale_factor
        shape = (rows, self.sd.unet.config.in_channels, height // factor, width // factor)
        latents = randn(shape, generator, device=self.device)
        timesteps = self.objective.sample_timesteps(rows, generator, self.device)
        with torch.no_grad(), self.lora_strength(0.0):
            target = model(latents, timesteps.float(), **batch["target"])
        prediction = model(latents, timesteps.float(), **batch["original"])
        return self.compare(prediction, target, timesteps)

    def sample_prompts(self) -> list[str]:
        if self.config.sample_prompts:
            return super().sample_prompts()
        return [self.config.original_prompt]


__all__ = ["ILECOTask"]
