"""Difference: a LoRA for what changes between an original and a target image ("copy machine").

Pass 1 trains a "copier" LoRA to reproduce the original image (prompt: "original prompt"). Pass 2
applies the copier, frozen at strength 1, and trains the difference LoRA on the target image with
the same prompt, so the difference LoRA learns only what the copier does not already explain.
Pass 2 uses the "2nd pass" settings when use_2nd_pass_settings is true.

The passes are two runs of the ordinary trainer (`run_difference`), so each has its own optimizer,
LR schedule, checkpoints and run folder (`<name>-pass1_<id>`, `<name>-pass2_<id>`), and every
training event in their metrics.jsonl carries `"pass": 1` or `2`. Pass 1 leaves the copier in its
log folder (`copier.safetensors`, full precision) and, with diff_save_1st_pass or
diff_1st_pass_only, as `<save_lora_name>_copy.safetensors` beside the LoRA. Resuming
(`resume_ckpt` a checkpoint folder, or findlast) reads the checkpoint's base_model.json: a pass-1
checkpoint finishes pass 1 and then runs pass 2; a pass-2 checkpoint reloads its copier and
finishes pass 2. diff_load_1st_pass skips pass 1 and uses that copier file instead.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.images import ImageItem
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.modes.base import check_mode_settings, lora_stack, mode_parts
from difftrain.tasks.base import FactoryFunction, StartPoint
from difftrain.tasks.sd_parts.base_model import find_lora_file, read_pointer
from difftrain.tasks.sd_parts.data import buckets_for, image_item, paired, repeated
from difftrain.tasks.sd_parts.outputs import LoraExports
from difftrain.tasks.sd_parts.stack import SDStackTask

COPIER_ADAPTER = "copier"
COPIER_FILE = "copier.safetensors"
# diff_use_diff_mask: a pixel "differs" when its mean absolute change exceeds 5 % of the [-1, 1] range.
DIFFERENCE_THRESHOLD = 0.1


def scan_pair(config: Config) -> list[ImageItem]:
    """[original, target], both captioned with the original prompt (swapped with diff_revert_original_target)."""
    original = image_item(config.original_image, "original image", config.original_prompt)
    target = image_item(config.target_image, "target image", config.original_prompt)
    if config.diff_revert_original_target:
        original, target = target, original
    if (original.width, original.height) != (target.width, target.height):
        say(f"note: the original ({original.width}x{original.height}) and target ({target.width}x"
            f"{target.height}) images differ in size; both are fitted to the original's bucket.")
    return [original, target]


class CopierExports:
    """Pass 1's exports: save_per_steps files as any LoRA run, and at the end the copier, kept for
    pass 2 in the log folder (full precision) and as <name>_copy beside the LoRA if asked."""

    def __init__(self, lora: LoraExports):
        self.lora = lora
        self.copier_path: Optional[Path] = None

    def exports_at(self, global_step: int) -> bool:
        return self.lora.exports_at(global_step)

    def after_step(self, model: nn.Module, global_step: int, log_folder: Optional[Path]) -> None:
        self.lora.after_step(model, global_step, log_folder)

    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None:
        self.lora.add_step_fields(run_dir)
        config = self.lora.config
        folder = log_folder or Path(config.logdir)
        self.copier_path = self.lora.trainable.save(model, folder / COPIER_FILE, "copier").resolve()
        if config.diff_save_1st_pass or config.diff_1st_pass_only:
            path = self.lora.write_lora_file(model, f"{self.lora.output_stem(log_folder)}_copy", log_folder)
            say(f"copier LoRA: {path}")


class DifferencePassTask(SDStackTask):
    """One pass of Difference (see the module docstring): without `copier`, pass 1 trains the copier
    on the original image; with it, pass 2 applies the copier, frozen, and trains the difference
    LoRA on the target image."""

    def __init__(self, config: Config, accelerator: Any, start: StartPoint, *,
                 copier: Optional[Path] = None):
        check_mode_settings(config)
        self.config = config
        self.pass_number = 1 if copier is None else 2
        items = scan_pair(config)
        self.stack = lora_stack(config, accelerator, start)
        self.pointer_extras = {"difference_pass": self.pass_number}
        if copier is not None:
            self.stack.trainable.add_frozen_adapter(Path(copier), COPIER_ADAPTER)
            self.pointer_extras["copier"] = str(copier)
        self.train_set = paired(items, buckets_for(config), config.seed)
        self._difference_mask: Optional[torch.Tensor] = None
        exports = LoraExports(config, self.stack.trainable, start.resumes, self.step_fields)
        self.copier_exports = CopierExports(exports) if copier is None else None
        self.parts = mode_parts(config, self.stack, start, [config.original_prompt],
                                exports=self.copier_exports or exports)

    @property
    def image_index(self) -> int:
        return self.pass_number - 1  # pass 1 trains on the original (item 0), pass 2 on the target

    @property
    def copier_path(self) -> Optional[Path]:
        """The copier pass 1 wrote when it finished (None before, and in pass 2)."""
        return self.copier_exports.copier_path if self.copier_exports else None

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        return repeated(self.image_index, self.config.batch_size)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"latents": (B, 4, h, w) of the pass's image, "cond": the original prompt's conditioning
        [, "loss_mask": (B, 1, h, w) with diff_use_diff_mask in pass 2]}."""
        batch = {"latents": self.stack.latents.means(self.train_set, indices, epoch),
                 "cond": self.stack.text.of_items(self.train_set, indices)}
        if self.pass_number == 2 and self.config.diff_use_diff_mask:
            batch["loss_mask"] = self.difference_mask().expand(len(indices), -1, -1, -1)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.objective.loss(model, batch["latents"], generator, loss_mask=batch.get("loss_mask"),
                                   **batch["cond"])[0]

    def step_fields(self, global_step: int) -> dict[str, Any]:
        return {"pass": self.pass_number}

    def difference_mask(self) -> torch.Tensor:
        """(1, 1, h, w) latent-space mask of where the target differs from the original; made once,
        as the pair is trained without flips or random crops, so every epoch sees the same pixels.

        Computed on the pixels both images are trained from (same bucket, crop and flip as their
        latents), not on the latents: a VAE spreads a local change over its receptive field. A
        pixel differs when its channel-mean absolute difference exceeds 5 % of the value range; a
        latent cell counts when any of its pixels differs, widened by one cell so the edges of a
        change count too. Identical images give an all-ones mask (nothing to single out).
        """
        if self._difference_mask is None:
            dataset = self.train_set
            pixels = [dataset.load_pixels(index, flip=choice.flip, crop_position=choice.crop_position)
                      for index, choice in ((i, dataset.augmentation(i, 0)) for i in (0, 1))]
            changed = ((pixels[1] - pixels[0]).abs().mean(dim=0) > DIFFERENCE_THRESHOLD).float()[None, None]
            latent_size = self.stack.latents.means(dataset, [1], 0).shape[-2:]
            if not bool(changed.any()):
                mask = torch.ones((1, 1, *latent_size))
            else:
                mask = torch.nn.functional.adaptive_max_pool2d(changed, latent_size)
                mask = torch.nn.functional.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
            self._difference_mask = mask.to(self.stack.device)
            say(f"difference mask: the loss covers {float(mask.mean()):.0%} of the image")
        return self._difference_mask


# The engine's one trainer run, handed to multi-run modes: train(config, factory, start) -> (exit code, task).
TrainOnce = Callable[[Config, Any, StartPoint], tuple[int, Any]]


def _resume_pointer(start: StartPoint) -> dict[str, Any]:
    """The base_model.json of the checkpoint the run resumes ({} when it starts from a base model)."""
    if start.checkpoint is None:
        return {}
    pointer = read_pointer(start.checkpoint)
    if pointer.get("mode") != "Difference":
        raise ConfigError(f"checkpoint '{start.checkpoint}' was not made by a Difference run; resume it with its "
                          "own mode, or start this run from a base model.")
    return pointer


def run_difference(config: Config, start: StartPoint, train: TrainOnce) -> int:
    """Train both passes (see the module docstring) from `start` (resolved once by the engine);
    returns the exit code of the last run. `train` is the engine's one trainer run: a mode sits
    below the loop and never builds a Trainer itself."""
    from difftrain.tracking import make_run_name

    pointer = _resume_pointer(start)
    name = config.run_name or make_run_name(Path(config.runs_dir))
    second, second_start = config.for_second_pass().model_copy(update={"run_name": f"{name}-pass2"}), start
    if pointer.get("difference_pass") == 2:
        copier = Path(pointer["copier"])
    else:
        if config.diff_load_1st_pass:
            copier = find_lora_file(config, config.diff_load_1st_pass, "diff_load_1st_pass").resolve()
        else:
            code, first_task = train(config.model_copy(update={"run_name": f"{name}-pass1"}), DifferencePassTask,
                                     start)
            if code:
                return code
            copier = first_task.copier_path
            if config.diff_1st_pass_only:
                return 0
        if start.resumes:  # pass 1 resumed from its checkpoint; pass 2 starts from the base
            second = second.model_copy(update={"resume_ckpt": pointer["model"], "vae": pointer.get("vae") or "",
                                               "te": pointer.get("te") or ""})
            second_start = StartPoint(base=pointer["model"])
    factory = FactoryFunction(functools.partial(DifferencePassTask, copier=copier), DifferencePassTask.defaults)
    code, _ = train(second, factory, second_start)
    return code


__all__ = ["COPIER_FILE", "CopierExports", "DifferencePassTask", "run_difference", "scan_pair"]
