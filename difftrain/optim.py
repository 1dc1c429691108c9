"""Optimizers and learning-rate schedules built from a Config (names as users write them)."""

from __future__ import annotations

from typing import Any

import torch

from difftrain.config import Config
from difftrain.errors import ConfigError


def parse_key_values(text: str, where: str) -> dict[str, Any]:
    """'k=v;k=v' (TrainTrain optimizer/scheduler settings) -> dict with Python literals."""
    import ast

    result: dict[str, Any] = {}
    for part in filter(None, (piece.strip() for piece in text.split(";"))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{where}: '{part}' is not of the form key=value (separate pairs with ';').")
        try:
            result[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            result[key.strip()] = value.strip()
    return result


def make_optimizer(config: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """AdamW by default; AdamW8bit through bitsandbytes on CUDA; any torch.optim class by name."""
    settings = parse_key_values(config.optimizer_settings, "optimizer_settings")
    settings.setdefault("weight_decay", config.weight_decay)
    name = config.optimizer
    if name.lower() in ("adamw8bit", "adamw_8bit"):
        try:
            import bitsandbytes  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("optimizer 'AdamW8bit' needs the bitsandbytes package and a CUDA GPU; "
                              "install bitsandbytes or use 'AdamW'.") from None
        return bitsandbytes.optim.AdamW8bit(groups, lr=config.lr, **settings)
    if name.lower() == "lion":
        try:
            from lion_pytorch import Lion  # type: ignore[import-not-found]
        except ImportError:
            raise ConfigError("optimizer 'Lion' needs the lion-pytorch package; install it or use 'AdamW'.") from None
        return Lion(groups, lr=config.lr, **settings)
    matches = [attr for attr in dir(torch.optim) if attr.lower() == name.lower()]
    optimizer_class = getattr(torch.optim, matches[0], None) if matches else None
    if not isinstance(optimizer_class, type) or not issubclass(optimizer_class, torch.optim.Optimizer):
        raise ConfigError(f"optimizer '{name}' is unknown; use AdamW, AdamW8bit, Adam, SGD, Lion or "
                          "another torch.optim class name.")
    if optimizer_class is torch.optim.SGD:
        settings.pop("weight_decay") if settings.get("weight_decay") == config.weight_decay else None
    try:
        return optimizer_class(groups, lr=config.lr, **settings)
    except TypeError as error:
        raise ConfigError(f"optimizer_settings '{config.optimizer_settings}' do not fit {name}: {error}.") from None


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, total_units: int):
    """diffusers' get_scheduler; a unit is an optimizer step or an epoch (scheduler_interval)."""
    from diffusers.optimization import get_scheduler

    decay = config.lr_decay_steps or total_units
    warmup = config.lr_warmup_steps
    if warmup is None:
        warmup = 0 if config.mode != "Full" or config.task == "kolmogorov" else int(0.02 * decay)
    extra = parse_key_values(config.lr_scheduler_settings, "lr_scheduler_settings")
    unknown = set(extra) - {"num_cycles", "power"}
    if unknown:
        raise ConfigError(f"lr_scheduler_settings: unknown setting(s) {sorted(unknown)}; "
                          "only num_cycles and power exist.")
    return get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                         num_training_steps=decay,
                         num_cycles=int(extra.get("num_cycles", config.lr_num_cycles)),
                         power=float(extra.get("power", config.lr_power)))
