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
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.models import lora as lora_io
from difftrain.modes.base import ModeTask, image_item
from difftrain.tasks.base import FactoryFunction, StartPoint, TaskDefaults

COPIER_ADAPTER = "copier"
COPIER_FILE = "copier.safetensors"
# diff_use_diff_mask: a pixel "differs" when its mean absolute change exceeds 5 % of the [-1, 1] range.
DIFFERENCE_THRESHOLD = 0.1


class CopierTask(ModeTask):
    """Pass 1: the copier LoRA, trained to denoise the original image."""

    MODES = ("Difference",)
    PASS = 1

    def _scan_data(self):
        config = self.config
        original = image_item(config.original_image, "original image", config.original_prompt)
        target = image_item(config.target_image, "target image", config.original_prompt)
        if config.diff_revert_original_target:
            original, target = target, original
        if (original.width, original.height) != (target.width, target.height):
            print(f"note: the original ({original.width}x{original.height}) and target ({target.width}x"
                  f"{target.height}) images differ in size; both are fitted to the original's bucket.",
                  file=sys.stderr)
        return [original, target], []

    def _build_datasets(self):
        from difftrain.data.buckets import nearest_bucket
        from difftrain.data.images import ImageBucketDataset

        original = self.train_items[0]
        bucket = nearest_bucket(original.width, original.height, self.buckets)
        return ImageBucketDataset(self.train_items, [bucket, bucket], seed=self.config.seed), None

    @property
    def image_index(self) -> int:
        return 0  # the original image; pass 2 trains on item 1, the target

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        return self.repeated(self.image_index)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"latents": (B, 4, h, w) of the pass's image, "cond": the original prompt's conditioning}."""
        return {"latents": self.latents_of(indices, epoch),
                "cond": self._cond([self.train_set.items[i].caption for i in indices],
                                   self._time_ids(self.train_set, indices))}

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        return self.objective.loss(model, batch["latents"], generator, loss_mask=batch.get("loss_mask"),
                                   **batch["cond"])[0]

    def pointer_extras(self) -> dict[str, Any]:
        return {"difference_pass": self.PASS}

    def step_metrics(self, global_step: int) -> dict[str, Any]:
        return {"pass": self.PASS}

    def sample_prompts(self) -> list[str]:
        if self.config.sample_prompts:
            return super().sample_prompts()
        return [self.config.original_prompt]

    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None:
        """Keep the copier for pass 2 (log folder), and as <name>_copy beside the LoRA if asked."""
        from difftrain.modes.outputs import add_step_fields

        if run_dir is not None:
            add_step_fields(run_dir / "metrics.jsonl", self.step_metrics)
        folder = log_folder or Path(self.config.logdir)
        state = lora_io.lora_state_dict(self._lora_modules(model))
        self.copier_path = lora_io.save_lora_file(folder / COPIER_FILE, state, self._lora_metadata("copier"),
                                                  overwrite=True).resolve()
        if self.config.diff_save_1st_pass or self.config.diff_1st_pass_only:
            path = self.write_lora_file(model, f"{self.output_stem(log_folder)}_copy", log_folder)
            print(f"copier LoRA: {path}", file=sys.stderr)


class DifferencePassTask(CopierTask):
    """Pass 2: the difference LoRA on the target image, with the copier applied and frozen."""

    PASS = 2

    def __init__(self, config: Config, accelerator: Any, start: StartPoint, *, copier: Path):
        self.copier_path = Path(copier)
        super().__init__(config, accelerator, start)
        self._difference_mask: Optional[torch.Tensor] = None

    @property
    def image_index(self) -> int:
        return 1

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
            latent_size = self.latents_of([1], 0).shape[-2:]
            if not bool(changed.any()):
                mask = torch.ones((1, 1, *latent_size))
            else:
                mask = torch.nn.functional.adaptive_max_pool2d(changed, latent_size)
                mask = torch.nn.functional.max_pool2d(mask, kernel_size=3, stride=1, padding=1)
            self._difference_mask = mask.to(self.device)
            print(f"difference mask: the loss covers {float(mask.mean()):.0%} of the image", file=sys.stderr)
        return self._difference_mask

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        batch = super().collate(indices, epoch)
        if self.config.diff_use_diff_mask:
            batch["loss_mask"] = self.difference_mask().expand(len(indices), -1, -1, -1)
        return batch

    def _build_lora(self):
        model = super()._build_lora()
        state, _ = lora_io.read_lora_file(self.copier_path)
        lora_io.add_lora_from_state(self.sd.unet, "lora_unet", state, str(self.copier_path),
                                    adapter_name=COPIER_ADAPTER, dtype=torch.float32)
        lora_io.activate_adapters([self.sd.unet], [COPIER_ADAPTER, lora_io.ADAPTER_NAME])
        return model

    def pointer_extras(self) -> dict[str, Any]:
        return {"difference_pass": self.PASS, "copier": str(self.copier_path)}

    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None:
        ModeTask.finish(self, model, log_folder, run_dir)


def _resume_pointer(start: StartPoint) -> dict[str, Any]:
    """The base_model.json of the checkpoint the run resumes ({} when it starts from a base model)."""
    from difftrain.tasks.sd import BASE_POINTER_FILE

    folder = start.checkpoint
    if folder is None:
        return {}
    pointer_file = folder / BASE_POINTER_FILE
    pointer = json.loads(pointer_file.read_text(encoding="utf-8")) if pointer_file.is_file() else {}
    if pointer.get("mode") != "Difference":
        raise ConfigError(f"checkpoint '{folder}' was not made by a Difference run; resume it with its own mode, "
                          "or start this run from a base model.")
    return pointer


def run_difference(config: Config, start: StartPoint, program: str = "difftrain") -> int:
    """Train both passes (see the module docstring) from `start` (resolved once by the engine);
    returns the exit code of the last run."""
    from difftrain.tracking import make_run_name
    from difftrain.trainer import Trainer

    checkpoint, pointer = start.checkpoint, _resume_pointer(start)
    second_start = start
    name = config.run_name or make_run_name(Path(config.runs_dir))
    second = config.for_second_pass().model_copy(update={"run_name": f"{name}-pass2"})
    if checkpoint is not None and pointer.get("difference_pass") == 2:
        copier = Path(pointer["copier"])
    else:
        if config.diff_load_1st_pass:
            copier = _find_copier(config)
        else:
            first = Trainer(config.model_copy(update={"run_name": f"{name}-pass1"}), CopierTask, program=program,
                            start=start)
            code = first.run()
            if code:
                return code
            copier = first.task.copier_path
            if config.diff_1st_pass_only:
                return 0
        if checkpoint is not None:  # pass 1 resumed from its checkpoint; pass 2 starts from the base
            second = second.model_copy(update={"resume_ckpt": pointer["model"], "vae": pointer.get("vae") or "",
                                               "te": pointer.get("te") or ""})
            second_start = StartPoint(base=pointer["model"])
    factory = FactoryFunction(functools.partial(DifferencePassTask, copier=copier), DifferencePassTask.defaults)
    return Trainer(second, factory, program=program, start=second_start).run()


def _find_copier(config: Config) -> Path:
    from difftrain.models.sd import resolve_model_path

    dirs = [d for d in (config.lora_dir, str(Path(config.models_dir) / "lora") if config.models_dir else "") if d]
    try:
        return resolve_model_path(config.diff_load_1st_pass, dirs, what="LoRA").resolve()
    except ConfigError as error:
        raise ConfigError(f"diff_load_1st_pass: {error}") from None


class DifferenceMode:
    """What task_factory returns for mode Difference: a mode that runs two trainer runs.

    The engine calls `run_mode(config, start, program=...)` instead of building a Trainer around it.
    """

    defaults = TaskDefaults(from_scratch=False, warmup_fraction=0.0)

    run_mode = staticmethod(run_difference)


__all__ = ["CopierTask", "DifferenceMode", "DifferencePassTask", "run_difference"]
