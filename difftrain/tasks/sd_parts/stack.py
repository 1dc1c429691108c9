"""The parts every Stable Diffusion task stands on, built in one order (`build_stack`), and the
contract methods every such task shares (`SDStackTask`): optimizer groups and checkpoint I/O,
delegated to the trainable part.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.cache import LatentCache
from difftrain.errors import ConfigError
from difftrain.models.sd import SDModel
from difftrain.tasks.base import StartPoint, TaskDefaults, TaskParts
from difftrain.tasks.sd_parts.base_model import LoadedBase, load_base
from difftrain.tasks.sd_parts.conditioning import Latents, TextConditioning, cache_folder
from difftrain.tasks.sd_parts.data import Bucket, check_bucket_sizes
from difftrain.tasks.sd_parts.objective import make_objective
from difftrain.tasks.sd_parts.outputs import output_stem
from difftrain.tasks.sd_parts.trainable import (DTYPES, FullTrainable, LoraTrainable, enable_gradient_checkpointing,
                                                model_view, parameter_groups, place)


@dataclass
class SDStack:
    """The loaded base, what trains on it, the objective, and the latents and text conditioning."""

    config: Config
    device: torch.device
    base: LoadedBase
    trainable: Union[FullTrainable, LoraTrainable]
    objective: Any
    latents: Latents
    text: TextConditioning

    @property
    def sd(self) -> SDModel:
        return self.base.sd

    @property
    def model(self) -> nn.Module:
        return self.trainable.model

    def view(self, model: nn.Module) -> SDModel:
        """The base with `model`'s trained modules in place (pipelines, saving)."""
        return model_view(self.sd, model, self.config.zero_terminal_snr)


def build_stack(config: Config, accelerator: Any, start: StartPoint, buckets: Sequence[Bucket], *, lora: bool,
                train_text_encoders: bool) -> SDStack:
    """Load the base (from start.checkpoint when resuming), add what trains, build the objective.

    Call it after the data has been scanned: a wrong folder must not cost a model load. The
    objective is built here, so a setting it refuses (rectified flow on a non-v base) is an error
    before any step or output.
    """
    device = accelerator.device
    # Frozen weights only need to run forward: half precision halves their memory on a GPU.
    frozen_dtype = DTYPES[config.model_precision] if device.type == "cuda" else torch.float32
    base = load_base(config, start)
    sd = base.sd
    if config.clip_skip >= 2:
        if sd.family == "sdxl":
            raise ConfigError("clip_skip applies to SD1/SD2 models; SDXL already conditions on its text "
                              "encoders' penultimate layers. Set clip_skip to 0.")
        sd.clip_skip = config.clip_skip
    check_bucket_sizes(buckets, sd.vae_scale_factor * 2 ** (len(sd.unet.config.block_out_channels) - 1),
                       config.resolution)
    place(sd.vae, device, torch.float32)  # fp16 VAEs (SDXL's above all) overflow to NaN
    sd.vae.requires_grad_(False).eval()
    if lora:
        trainable = LoraTrainable(base, config, device, frozen_dtype, train_text_encoders, start.resumes)
    else:
        trainable = FullTrainable(base, config, device, frozen_dtype, train_text_encoders)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(sd, train_text_encoders)
    objective = make_objective(config, sd)
    cache = LatentCache(cache_folder(config, accelerator))
    return SDStack(config, device, base, trainable, objective, Latents(sd, cache, device),
                   TextConditioning(sd, cache, device, train_text_encoders))


class SDStackTask:
    """What every Stable Diffusion task does the same way, through its `stack`: the optimizer's
    parameter groups and the checkpoint's model files. Subclasses add data, batches and loss."""

    stack: SDStack
    defaults = TaskDefaults()  # TrainTrain's LoRA modes do not warm up
    parts = TaskParts()
    # Mode-specific entries of a LoRA checkpoint's base_model.json (Difference: its pass and copier).
    pointer_extras: Mapping[str, Any] = MappingProxyType({})

    @property
    def model(self) -> nn.Module:
        return self.stack.model

    @property
    def objective(self) -> Any:
        return self.stack.objective

    def parameter_groups(self) -> list[dict[str, Any]]:
        return parameter_groups(self.model, self.stack.config.text_encoder_lr)

    def write_model(self, model: nn.Module, folder: Path) -> None:
        """'Full': a diffusers pipeline folder. LoRA: `lora.safetensors` (kohya keys, float32) and
        `base_model.json`, the pointer to the unchanged base a resume loads it from."""
        trainable = self.stack.trainable
        if isinstance(trainable, FullTrainable):
            trainable.write(self.stack.view(model), folder)
        else:
            trainable.write(model, folder, output_stem(self.stack.config), **self.pointer_extras)

    def load_model(self, model: nn.Module, folder: Path) -> None:
        self.stack.trainable.load(model, folder)

    def run_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The UNet's state_dict ('Full'), or the kohya-named LoRA tensors (LoRA modes)."""
        return self.stack.trainable.state_dict(model)


__all__ = ["SDStack", "SDStackTask", "build_stack"]
