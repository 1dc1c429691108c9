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

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.modes.base import check_mode_settings, lora_stack, mode_parts
from difftrain.objectives import randn
from difftrain.tasks.base import StartPoint
from difftrain.tasks.sd_parts.data import repeated
from difftrain.tasks.sd_parts.objective import PredictionMatch
from difftrain.tasks.sd_parts.stack import SDStackTask


class ILECOTask(SDStackTask):
    """iLECO: see the module docstring."""

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        check_mode_settings(config)
        if not config.original_prompt.strip():
            raise ConfigError("iLECO needs \"original prompt\": the concept to change (e.g. \"Mona Lisa\"); "
                              "\"target prompt\" is what it becomes (empty: the concept is erased).")
        self.config = config
        self.stack = lora_stack(config, accelerator, start)
        self.compare = PredictionMatch(config, self.stack.objective)
        self.parts = mode_parts(config, self.stack, start, [config.original_prompt])

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        return repeated(0, self.config.batch_size)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"original", "target": conditioning of each prompt for len(indices) rows}."""
        height, width = self.config.training_size()
        size = (width, height)
        return {"original": self.stack.text.of_prompt(self.config.original_prompt, len(indices), size),
                "target": self.stack.text.of_prompt(self.config.target_prompt, len(indices), size)}

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        rows = batch["original"]["encoder_hidden_states"].shape[0]
        sd, device = self.stack.sd, self.stack.device
        height, width = self.config.training_size()
        factor = sd.vae_scale_factor
        latents = randn((rows, sd.unet.config.in_channels, height // factor, width // factor), generator, device=device)
        timesteps = self.objective.sample_timesteps(rows, generator, device)
        with torch.no_grad(), self.stack.trainable.strength(0.0):
            target = model(latents, timesteps.float(), **batch["target"])
        prediction = model(latents, timesteps.float(), **batch["original"])
        return self.compare(prediction, target, timesteps)


__all__ = ["ILECOTask"]
