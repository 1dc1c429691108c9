"""An exponential moving average of the trained weights (EveryDream2's ema_* settings).

The average itself is diffusers' `EMAModel`; this module gives it EveryDream2's meaning:

* a constant decay from the first update on (EveryDream2 blends `ema * decay + weights * (1 - decay)`
  every time; EMAModel's default warm-up would start lower), or the decay derived from
  `ema_strength_target`, the share of the starting weights left in the average at the end:
  decay = target ** (update_interval / total optimizer steps);
* an update every `ema_update_interval` optimizer steps;
* the averaged copy kept on `ema_device` ('cpu' spares GPU memory at the price of a copy per update).

The state is one safetensors file in each checkpoint folder (`ema.safetensors`: the averaged
tensors by parameter name, the update count in its metadata), so a resume continues the very
same average. `in_use()` puts the averaged weights into the model for a while (samples, exports)
and puts the trained ones back afterwards, bit for bit.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from difftrain.errors import ConfigError
from difftrain.log import say

EMA_FILE = "ema.safetensors"
EXPORT_SUFFIX = "_ema"  # EveryDream2 writes <checkpoint>_ema beside <checkpoint>


def decay_for_strength(strength_target: float, total_steps: int, update_interval: int) -> float:
    """The constant decay that leaves `strength_target` of the starting weights in the average
    after the run's updates (EveryDream2: target ** (1 / (total steps / update interval)))."""
    updates = max(total_steps, 1) / update_interval
    return strength_target ** (1.0 / updates)


@dataclass(frozen=True)
class EmaSettings:
    """What the average does, resolved from the config (see `ema_settings`)."""

    decay: float
    update_interval: int  # optimizer steps between updates
    device: torch.device
    sample_ema: bool  # samples from the averaged weights
    sample_trained: bool  # samples from the trained weights


def ema_settings(config, total_steps: int, training_device: torch.device) -> Optional[EmaSettings]:
    """EMA's settings for a run of `total_steps` optimizer steps; None when EMA is off (neither
    ema_decay_rate nor ema_strength_target is set). ema_strength_target wins, as in EveryDream2."""
    if config.ema_decay_rate is None and config.ema_strength_target is None:
        return None
    interval = config.ema_update_interval
    if config.ema_strength_target is not None:
        decay = decay_for_strength(config.ema_strength_target, total_steps, interval)
        say(f"EMA: ema_strength_target {config.ema_strength_target} over {total_steps} steps "
            f"(an update every {interval}) gives ema_decay_rate {decay:.8f}.")
    else:
        decay = config.ema_decay_rate
    device = torch.device("cpu")
    if config.ema_device == "cuda":
        if training_device.type == "cuda":
            device = training_device
        else:
            say("note: ema_device 'cuda' but training runs on the CPU; the EMA weights stay on the CPU.")
    # EveryDream2 samples the trained weights unless told to sample the average (or both).
    sample_ema = bool(config.ema_sample_ema_model)
    sample_trained = bool(config.ema_sample_nonema_model) or not sample_ema
    return EmaSettings(decay=decay, update_interval=interval, device=device, sample_ema=sample_ema,
                       sample_trained=sample_trained)


def make_ema(config, task, *, total_steps: int, device: torch.device, sharding: str,
             keep: bool) -> Optional["WeightAverage"]:
    """The run's EMA of `task.model`, or None when EMA is off or `keep` is false (only the main
    process keeps it: it samples, saves and exports). `sharding`: how the run shards the model
    ('' for not at all), where no process holds the whole weights to average: refused.
    `total_steps`: the run's optimizer steps (ema_strength_target's decay depends on them)."""
    if config.ema_decay_rate is None and config.ema_strength_target is None:
        return None
    if sharding:
        raise ConfigError(f"EMA (ema_decay_rate / ema_strength_target) needs the whole model on one process; "
                          f"this run has its {sharding}. Train without sharding, or without EMA.")
    if not keep:
        return None
    settings = ema_settings(config, total_steps, device)
    average = WeightAverage(task.model, settings)
    if config.ema_resume_model:
        source = ema_source(config.ema_resume_model, Path(config.logdir), config.project_name)
        average.start_from(lambda module: task.load_model(module, source))
        say(f"EMA: the average starts from '{source}'.")
    say(f"EMA: decay {settings.decay:.8f}, an update every {settings.update_interval} optimizer step(s), "
        f"kept on {settings.device}.")
    return average


def ema_source(name: str, logdir: Path, project: str) -> Path:
    """ema_resume_model: a model folder (an `_ema` export, EveryDream2's or ours), or 'findlast' for
    the newest one of `project` under logdir."""
    from difftrain.checkpoint import find_last_everydream2

    found = find_last_everydream2(logdir, project, ema=True) if name == "findlast" else Path(name)
    if found is None or not found.is_dir():
        where = f" (no <checkpoint>_ema folder of project '{project}' under '{logdir}')" if name == "findlast" else ""
        raise ConfigError(f"ema_resume_model '{name}': no such model folder{where}. Name a folder written as "
                          "<checkpoint>_ema, or leave ema_resume_model empty to start the average from the "
                          "starting weights.")
    return found


class WeightAverage:
    """The EMA of `module`'s trainable parameters (those with requires_grad), by name."""

    def __init__(self, module: nn.Module, settings: EmaSettings):
        from diffusers.training_utils import EMAModel

        self.settings = settings
        self.module = module
        self.names = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
        if not self.names:
            raise ConfigError("EMA (ema_decay_rate / ema_strength_target) found no trained weights to "
                              "average; turn EMA off for this run.")
        # min_decay = decay and update_after_step = -1: the same decay from the very first update,
        # as EveryDream2 blends (EMAModel would otherwise copy the weights once and then warm up).
        self.average = EMAModel(self._parameters(), decay=settings.decay, min_decay=settings.decay,
                                update_after_step=-1, use_ema_warmup=False)
        self.average.to(settings.device)

    def _parameters(self) -> list[nn.Parameter]:
        by_name = dict(self.module.named_parameters())
        return [by_name[name] for name in self.names]

    @property
    def updates(self) -> int:
        return self.average.optimization_step

    def after_optimizer_step(self, global_step: int) -> bool:
        """Blend the weights in when `global_step` (optimizer steps so far) is an update step."""
        if global_step % self.settings.update_interval:
            return False
        parameters = self._parameters()
        if any(parameter.device != self.settings.device for parameter in parameters):
            # EMAModel blends tensor by tensor on one device; EveryDream2 copies to ema_device too.
            # requires_grad marks them as trained (EMAModel copies untrained ones instead of blending).
            parameters = [parameter.detach().to(self.settings.device).requires_grad_()
                          for parameter in parameters]
        self.average.step(parameters)
        return True

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().contiguous() for name, tensor in zip(self.names, self.average.shadow_params)}

    def save(self, folder: Path) -> Path:
        """Write the average into a checkpoint folder (float32 as trained, so a resume is exact)."""
        from safetensors.torch import save_file

        path = Path(folder) / EMA_FILE
        save_file({name: tensor.cpu() for name, tensor in self.state_tensors().items()}, str(path),
                  metadata={"updates": str(self.updates), "decay": repr(self.settings.decay),
                            "update_interval": str(self.settings.update_interval)})
        return path

    def load(self, folder: Path) -> None:
        """Continue the average a checkpoint folder holds; ConfigError when it has none or another
        model's (a checkpoint of a run without EMA, or of a different network)."""
        from safetensors import safe_open

        path = Path(folder) / EMA_FILE
        if not path.is_file():
            raise ConfigError(f"checkpoint '{folder}' has no {EMA_FILE}: it was saved by a run without EMA. "
                              "Continue it without ema_decay_rate / ema_strength_target, or start a new run.")
        with safe_open(str(path), framework="pt") as handle:
            stored, metadata = set(handle.keys()), handle.metadata() or {}
            missing, unexpected = sorted(set(self.names) - stored), sorted(stored - set(self.names))
            if missing or unexpected:
                raise ConfigError(f"'{path}' does not fit this run's trained weights (missing: "
                                  f"{missing[:3]}, unexpected: {unexpected[:3]}); resume with the settings "
                                  "it was trained with.")
            tensors = [handle.get_tensor(name).to(self.settings.device) for name in self.names]
        self.average.shadow_params = tensors
        self.average.optimization_step = int(metadata.get("updates", "0"))

    def start_from(self, load: Callable[[nn.Module], None]) -> None:
        """Start the average from other weights (EveryDream2's ema_resume_model): `load(module)` puts
        them into the module, they are copied, and the module's own weights come back exactly."""
        parameters = self._parameters()
        self.average.store(parameters)
        try:
            load(self.module)
            self.average.shadow_params = [parameter.detach().to(self.settings.device, copy=True)
                                          for parameter in self._parameters()]
        finally:
            self.average.restore(parameters)

    def export_beside(self, checkpoint_folder: Path, write_model: Callable[[nn.Module, Path], None]) -> Path:
        """EveryDream2's `<checkpoint>_ema` beside a checkpoint folder: `write_model(module, folder)`
        (the task's own model files) with the averaged weights, complete or absent."""
        import os
        import shutil

        from difftrain.checkpoint import TEMP_PREFIX

        target = checkpoint_folder.with_name(checkpoint_folder.name + EXPORT_SUFFIX)
        if target.exists():
            return target
        temp = target.with_name(f"{TEMP_PREFIX}{target.name}-{os.getpid()}")
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
        try:
            with self.in_use() as averaged:
                write_model(averaged, temp)
            os.replace(temp, target)
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        return target

    @contextmanager
    def in_use(self) -> Iterator[nn.Module]:
        """The module holding the averaged weights for the duration (the trained ones come back after)."""
        parameters = self._parameters()
        self.average.store(parameters)
        try:
            self.average.copy_to(parameters)
            yield self.module
        finally:
            self.average.restore(parameters)
