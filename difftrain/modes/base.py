"""What TrainTrain's LoRA modes share beyond plain LoRA training (difftrain.tasks.sd.SDTask):
the LoRA multiplier switched per forward pass, a loss that compares two predictions, images named
by a config key, and batches that repeat one example."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.images import IMAGE_EXTENSIONS, ImageItem
from difftrain.errors import ConfigError
from difftrain.models import lora as lora_io
from difftrain.objectives import elementwise_loss
from difftrain.tasks.base import StartPoint, TaskDefaults
from difftrain.tasks.sd import SDTask


def image_item(path_text: str, setting: str, caption: str) -> ImageItem:
    """The image a config key names (e.g. "original image"), as an ImageItem with `caption`.

    Raises:
        ConfigError: the key is empty, the file is missing, or it is not a readable image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    if not path_text.strip():
        raise ConfigError(f"'{setting}' is empty; this mode trains on an image pair: set \"original image\" "
                          "and \"target image\" to image files.")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ConfigError(f"'{setting}' {str(path)!r} does not exist (or is a folder); give the path of an image "
                          f"file ({' '.join(sorted(IMAGE_EXTENSIONS))}).")
    try:
        with Image.open(path) as image:
            width, height = ImageOps.exif_transpose(image).size
    except (OSError, UnidentifiedImageError) as error:
        raise ConfigError(f"'{setting}' {str(path)!r} is not a readable image ({error}).") from None
    return ImageItem(path=path, caption=caption, width=width, height=height)


class ModeTask(SDTask):
    """Base of the TrainTrain modes other than LoRA: UNet LoRA only, no held-out loss."""

    defaults = TaskDefaults(from_scratch=False, warmup_fraction=0.0)

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        if config.rectified_flow:
            raise ConfigError(f"rectified_flow is not available in mode {config.mode}; it trains a LoRA against the "
                              "model's own predictions. Turn rectified_flow off.")
        super().__init__(config, accelerator, start)
        self._compare = elementwise_loss(config.loss_function)

    def unet_lora_modules(self) -> list[nn.Module]:
        return [self.sd.unet]

    @contextmanager
    def lora_strength(self, value: float) -> Iterator[None]:
        """Run the UNet with the trained LoRA at strength `value` (0: the frozen model), then go
        back to network_strength, which samples and exports use."""
        lora_io.set_multiplier(self.unet_lora_modules(), value)
        try:
            yield
        finally:
            lora_io.set_multiplier(self.unet_lora_modules(), self.multiplier)

    def compare(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """loss_function between two predictions (B, C, h, w), averaged per sample, min-SNR weighted,
        then over the batch: TrainTrain's loss, with the frozen prediction as the target."""
        per_sample = self._compare(prediction.float(), target.float()).mean(dim=tuple(range(1, prediction.dim())))
        return (per_sample * self.objective.loss_weights(timesteps).to(per_sample.device)).mean()

    def repeated(self, index: int) -> list[list[int]]:
        """One batch of `batch_size` copies of item `index` (a single example, fresh noise per row)."""
        return [[index] * self.config.batch_size]

    def prompt_cond(self, prompt: str, count: int, size: tuple[int, int]) -> dict[str, Any]:
        """Frozen-text-encoder conditioning of `prompt`, `count` rows, for images of (width, height)."""
        time_ids = None
        if self.family == "sdxl":
            from difftrain.models.sd import sdxl_time_ids

            height_width = (size[1], size[0])
            time_ids = sdxl_time_ids([height_width] * count, [(0, 0)] * count, [height_width] * count)
        return self._frozen_text_cond([prompt] * count, time_ids)

    def latents_of(self, indices: Sequence[int], epoch: int) -> torch.Tensor:
        """Scaled VAE latents (B, 4, h, w) of training items: the posterior mean, so that a pair's two
        images differ only by their content, not by two posterior draws."""
        stats = self._latent_stats(self.train_set, indices, epoch)
        return self._scaled_latents(stats["mean"].to(self.device), None)

    def validation_loss(self, model: nn.Module) -> Optional[float]:
        return None
