"""Stable Diffusion fine-tuning (SD1.x, SD2.x, SDXL) on a folder of captioned images: the whole UNet
('Full') or LoRA adapters ('LoRA').

Assembled from difftrain.tasks.sd_parts: the data source scans the folder and buckets the images,
the stack loads the base and adds what trains, the conditioning part caches latents and text
embeddings, the objective is the base's own (epsilon / v) or rectified flow through the v bridge;
samples, the held-out loss, reflow and (LoRA) the exported files are the task's optional parts.

Order of work, chosen so that mistakes cost nothing: the data folder is scanned first (a missing
or empty data_root is an error before gigabytes of weights load), then the model is loaded, then
the objective is built (rectified flow on a non-v base is refused before any step is taken).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.registry import modes_of
from difftrain.tasks.base import StartPoint, TaskDefaults, TaskParts
from difftrain.data.images import rated_dataset_fraction, repeat_by_multiply
from difftrain.tasks.sd_parts.data import (ImageEpochBatches, bucketed, buckets_for, extra_validation_sets,
                                          scan_captioned_images)
from difftrain.tasks.sd_parts.outputs import LoraExports
from difftrain.tasks.sd_parts.objective import make_objective
from difftrain.tasks.sd_parts.reflow import SDReflow
from difftrain.tasks.sd_parts.reload import EpochSettingsReload
from difftrain.tasks.sd_parts.samples import SDSamples, SDValidation
from difftrain.tasks.sd_parts.stack import SDStackTask, build_stack
from difftrain.tasks.sd_parts.trainable import trains_text_encoders
from difftrain.vocab.everydream2 import epoch_settings

MODES = modes_of(f"{__name__}:SDTask")  # Full and LoRA (difftrain.registry)


class SDTask(SDStackTask):
    """Fine-tune a Stable Diffusion model on a folder of captioned images (see the module docstring)."""

    # EveryDream2 warms a full fine-tune up over 2% of the decay; TrainTrain's LoRA does not warm up.
    defaults = TaskDefaults(warmup_fraction=0.02)

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        if config.mode not in MODES:
            raise ConfigError(f"mode '{config.mode}' is not trained by {type(self).__name__}; it trains "
                              f"{' or '.join(repr(m) for m in MODES)}.")
        self.config = config
        train_items, valid_items = scan_captioned_images(config)  # data first: a wrong folder costs no load
        # EveryDream2's multiply: whole repeats always train, a fraction is drawn each epoch.
        train_items, chances = repeat_by_multiply(train_items)
        buckets = buckets_for(config)
        lora = config.mode != "Full"
        if lora:
            self.defaults = TaskDefaults(warmup_fraction=0.0)
        self.stack = stack = build_stack(config, accelerator, start, buckets, lora=lora,
                                         train_text_encoders=trains_text_encoders(config))
        if lora:  # ss_tag_frequency of the exported files
            stack.trainable.training_images = [(str(item.path.parent), item.caption) for item in train_items]
        self.train_set = bucketed(train_items, buckets, config.seed, caption_dropout=config.caption_dropout,
                                  flip_p=max(config.flip_p, 0.5 if config.image_mirroring else 0.0),
                                  shuffle_tags=config.shuffle_tags, keep_tags=config.keep_tags)
        self.valid_set = bucketed(valid_items, buckets, config.seed) if valid_items else None
        rated = (lambda epoch: rated_dataset_fraction(epoch, config.max_epochs,
                                                      config.rated_dataset_target_dropout_percent)) \
            if config.rated_dataset else None
        self.batches = ImageEpochBatches(self.train_set, chances, config.batch_size, config.seed, rated)
        self.reflow = SDReflow(stack.model, stack.objective, self.train_set, self.valid_set or self.train_set,
                               stack.latents, stack.text, config.batch_size, config.seed)
        extra_sets = extra_validation_sets(config, buckets, train_items)
        self.parts = TaskParts(
            samples=SDSamples(config, stack.view, stack.objective, stack.device, [i.caption for i in train_items]),
            validation=SDValidation(self.valid_set, config.batch_size, stack.latents, stack.text, stack.objective,
                                    extra_sets)
            if self.valid_set is not None or extra_sets else None,
            exports=LoraExports(config, stack.trainable, start.resumes) if lora else None,
            flow=self.reflow if config.rectified_flow else None,
            before_batch=EpochSettingsReload(config, stack.objective, lambda changed: make_objective(changed, stack.sd),
                                             epoch_settings) if config.reload_settings_from else None)

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        if self.reflow.active:
            return self.reflow.epoch_batches(epoch, rank, world_size)
        return self.batches(epoch, rank, world_size)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"mean", "std": latent posterior (B, 4, h, w), "cond": UNet conditioning [, "loss_scale": (B,)]},
        or a reflow pair batch {"x0", "noise", "cond"}."""
        if self.reflow.active:
            return self.reflow.collate(indices)
        stats = self.stack.latents.posterior(self.train_set, indices, epoch)
        captions = [self.train_set.caption(i, epoch) for i in indices]
        device = self.stack.device
        batch = {"mean": stats["mean"].to(device), "std": stats["std"].to(device),
                 "cond": self.stack.text(captions, self.stack.text.time_ids(self.train_set, indices))}
        scales = [self.train_set.items[i].loss_scale for i in indices]
        if any(scale != 1.0 for scale in scales):  # EveryDream2's loss_scale.txt
            batch["loss_scale"] = torch.tensor(scales, dtype=torch.float32, device=device)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if "x0" in batch:  # reflow: the coupling (noise, endpoint) is given
            return self.reflow.loss(model, batch, generator)
        latents = self.stack.latents.scaled(batch["mean"], batch["std"], generator)
        return self.objective.loss(model, latents, generator, sample_weights=batch.get("loss_scale"),
                                   **batch["cond"])[0]


__all__ = ["MODES", "SDTask"]
