"""What TrainTrain's modes beyond plain LoRA choose alike: a LoRA on the UNet of a frozen base (no
rectified flow, no held-out loss), TrainTrain's buckets, and samples of the mode's own prompt."""

from __future__ import annotations

from typing import Any, Callable, Sequence

from difftrain.config import Config
from difftrain.log import say
from difftrain.tasks.base import StartPoint, TaskParts
from difftrain.tasks.sd_parts.data import buckets_for
from difftrain.tasks.sd_parts.objective import refuse_rectified_flow
from difftrain.tasks.sd_parts.outputs import LoraExports, no_step_fields
from difftrain.tasks.sd_parts.samples import SDSamples
from difftrain.tasks.sd_parts.stack import SDStack, build_stack


def check_mode_settings(config: Config) -> None:
    """Refusals common to the modes, made before anything is read or loaded."""
    refuse_rectified_flow(config)


def lora_stack(config: Config, accelerator: Any, start: StartPoint) -> SDStack:
    """The frozen base with a trained LoRA on its UNet; these modes never train the text encoders."""
    if config.network_train_text_encoder:
        say(f"note: network_train_text_encoder applies to modes LoRA and Full; mode {config.mode} "
            "trains the UNet only.")
    return build_stack(config, accelerator, start, buckets_for(config), lora=True, train_text_encoders=False)


def mode_parts(config: Config, stack: SDStack, start: StartPoint, default_prompts: Sequence[str], *,
               step_fields: Callable[[int], dict[str, Any]] = no_step_fields, exports: Any = None,
               before_batch: Any = None) -> TaskParts:
    """Samples (sample_prompts, else `default_prompts`) and the LoRA exports (`exports`, or the
    ordinary LoRA files with the mode's `step_fields`)."""
    samples = SDSamples(config, stack.view, stack.objective, stack.device, default_prompts)
    if exports is None:
        exports = LoraExports(config, stack.trainable, start.resumes, step_fields)
    return TaskParts(samples=samples, exports=exports, before_batch=before_batch)


__all__ = ["check_mode_settings", "lora_stack", "mode_parts"]
