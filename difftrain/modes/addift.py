"""ADDifT and Multi-ADDifT: a LoRA that carries the difference between an original and a target
image, learned directly from the pair (no copier LoRA, unlike Difference).

Each step draws one noise and one timestep (in [train_min_timesteps, train_max_timesteps)) for a
pair. Steps alternate direction, by global step so that a resumed run alternates exactly as the
original did:

* forward (even steps): the noisy ORIGINAL, with the LoRA at +0.25, must predict what the frozen
  model (LoRA off) predicts for the noisy TARGET;
* reverse (odd steps): the noisy TARGET, with the LoRA at -0.25 * |diff_alt_ratio|, must predict
  what the frozen model predicts for the noisy ORIGINAL.

Each image is conditioned on its own prompt ("original prompt" / "target prompt"; Multi-ADDifT:
each image's caption). diff_revert_original_target swaps the two images (and prompts). TrainTrain's
reference code pairs the roles the other way round in the forward direction; its style presets
set diff_revert_original_target, which is this module's forward direction without the swap.
The training multipliers are the method's; network_strength is baked into the exported file (as
TrainTrain saves it).

Multi-ADDifT: every image `a.png` of lora_data_directory whose folder also holds
`a<diff_target_name>.<ext>` forms a pair; pairs are bucketed by the original's aspect ratio
(the target is fitted to the same bucket) and batched within a bucket.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.images import ImageItem, scan_image_folder
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.modes.base import check_mode_settings, lora_stack, mode_parts
from difftrain.tasks.base import StartPoint
from difftrain.tasks.sd_parts.data import EpochBatches, buckets_for, image_item, paired, repeated
from difftrain.tasks.sd_parts.objective import PredictionMatch
from difftrain.tasks.sd_parts.stack import SDStackTask

FORWARD_MULTIPLIER = 0.25


def direction_multiplier(step_index: int, alt_ratio: float) -> float:
    """The LoRA multiplier of the step that starts at global step `step_index` (0-based)."""
    return FORWARD_MULTIPLIER if step_index % 2 == 0 else -FORWARD_MULTIPLIER * abs(alt_ratio)


def find_pairs(items: Sequence[ImageItem], target_suffix: str, folder: str) -> list[tuple[ImageItem, ImageItem]]:
    """(original, target) pairs: `a.png` with `a<target_suffix>.<any image extension>` in its folder.

    Raises:
        ConfigError: target_suffix is empty, or no image has its target.
    """
    if not target_suffix:
        raise ConfigError("Multi-ADDifT needs diff_target_name, the suffix that names each target image "
                          "(with diff_target_name '_after', a.png pairs with a_after.png).")
    by_stem = {(item.path.parent, item.path.stem): item for item in items}
    pairs, unmatched = [], []
    for item in items:
        if item.path.stem.endswith(target_suffix):
            continue
        target = by_stem.get((item.path.parent, item.path.stem + target_suffix))
        if target is None:
            unmatched.append(item.path.name)
        else:
            pairs.append((item, target))
    if not pairs:
        names = ", ".join(sorted(item.path.name for item in items)[:6])
        raise ConfigError(f"lora_data_directory '{folder}' has no image pairs: no image a.png has its target "
                          f"a{target_suffix}.png beside it (found: {names}{', ...' if len(items) > 6 else ''}). "
                          "Rename the targets, or set diff_target_name to their suffix.")
    if unmatched:
        say(f"note: {len(unmatched)} image(s) without a '{target_suffix}' target are not used: "
            f"{', '.join(unmatched[:5])}{', ...' if len(unmatched) > 5 else ''}")
    return pairs


def scan_pairs(config: Config) -> list[tuple[ImageItem, ImageItem]]:
    """The (original, target) pairs of the run, swapped with diff_revert_original_target."""
    if config.mode == "ADDifT":
        pairs = [(image_item(config.original_image, "original image", config.original_prompt),
                  image_item(config.target_image, "target image", config.target_prompt))]
    else:
        items = scan_image_folder(config.data_root, trigger_word=config.lora_trigger_word,
                                  caption_from_filename=config.image_use_filename_as_tag,
                                  setting_name="lora_data_directory")
        pairs = find_pairs(items, config.diff_target_name, config.data_root) * config.image_num_multiply
    if config.diff_revert_original_target:
        pairs = [(target, original) for original, target in pairs]
    return pairs


class ADDifTTask(SDStackTask):
    """ADDifT (one pair from "original image" / "target image") and Multi-ADDifT (a folder of pairs)."""

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        check_mode_settings(config)
        self.config = config
        pairs = scan_pairs(config)
        self.pair_count = len(pairs)
        self.train_items = [item for pair in pairs for item in pair]
        self.stack = lora_stack(config, accelerator, start)
        if config.image_mirroring or config.flip_p:
            say("note: image_mirroring is off in ADDifT modes (a pair must be flipped together).")
        # Item 2k is pair k's original, 2k + 1 its target; both take the original's bucket.
        self.train_set = paired(self.train_items, buckets_for(config), config.seed)
        self.pair_batches = EpochBatches(self.train_set.buckets[::2], config.batch_size, config.seed)
        self.compare = PredictionMatch(config, self.stack.objective)
        self.step_multiplier = FORWARD_MULTIPLIER  # set by before_batch for each step
        self.parts = mode_parts(config, self.stack, start, [self.train_items[0].caption],
                                step_fields=self.step_fields, before_batch=self.before_batch)

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        if self.pair_count == 1:
            return repeated(0, self.config.batch_size)
        return self.pair_batches(epoch, rank, world_size)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"original" | "target": {"latents": (B, 4, h, w), "cond": UNet conditioning}} for pairs `indices`."""
        batch = {}
        for name, offset in (("original", 0), ("target", 1)):
            items = [2 * pair + offset for pair in indices]
            batch[name] = {"latents": self.stack.latents.means(self.train_set, items, epoch),
                           "cond": self.stack.text.of_items(self.train_set, items)}
        return batch

    def before_batch(self, global_step: int, epoch: int) -> None:
        self.step_multiplier = direction_multiplier(global_step, self.config.diff_alt_ratio)

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        forward = self.step_multiplier > 0
        trained, frozen = (batch["original"], batch["target"]) if forward else (batch["target"], batch["original"])
        latents, objective, strength = trained["latents"], self.objective, self.stack.trainable.strength
        timesteps = objective.sample_timesteps(latents.shape[0], generator, latents.device)
        noise = objective.sample_noise(tuple(latents.shape), generator, latents.device)
        with torch.no_grad(), strength(0.0):
            target = model(objective.add_noise(frozen["latents"], noise, timesteps), timesteps.float(),
                           **frozen["cond"])
        with strength(self.step_multiplier):
            prediction = model(objective.add_noise(latents, noise, timesteps), timesteps.float(), **trained["cond"])
        return self.compare(prediction, target, timesteps)

    def step_fields(self, global_step: int) -> dict[str, Any]:
        """The direction and multiplier of logged step `global_step` (the optimizer step that
        began at global step global_step - 1)."""
        multiplier = direction_multiplier(global_step - 1, self.config.diff_alt_ratio)
        return {"direction": "forward" if multiplier > 0 else "reverse", "lora_multiplier": multiplier}


__all__ = ["ADDifTTask", "direction_multiplier", "find_pairs", "scan_pairs"]
