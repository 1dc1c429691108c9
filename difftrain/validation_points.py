"""When the trainer measures loss_valid (every N epochs, or several times per epoch), and its metrics.

EveryDream2's validation every_n_epochs below 1 (0.5: twice per epoch) splits each epoch into
ceil(1 / every_n_epochs) equal parts (at most one per optimizer step) and validates after each;
the last part ends with the epoch, where the epoch-end validation already runs.
"""
from __future__ import annotations

import math
from typing import Any


def mid_epoch_points(steps_per_epoch: int, validations_per_epoch: int) -> set[int]:
    """Optimizer steps into an epoch after which to validate, the epoch's end left out."""
    parts = min(steps_per_epoch, validations_per_epoch)
    return {math.ceil((part + 1) * steps_per_epoch / parts) for part in range(parts - 1)}


def validation_due(validation: Any, config: Any, progress: Any, steps_per_epoch: int, mid_epoch: bool,
                   before_training: bool = False) -> bool:
    """Whether to validate now: at an epoch's end (`progress.epoch` already counts it), after an
    optimizer step inside an epoch (`progress.batch_in_epoch` counts its micro-batches), or
    `before_training` (always, when there is a validation)."""
    if validation is None:
        return False
    if before_training:
        return True
    if not mid_epoch:
        return progress.epoch % config.validate_every_n_epochs == 0
    if config.validations_per_epoch <= 1:
        return False
    steps_in = progress.batch_in_epoch // config.gradient_accumulation_steps
    return steps_in in mid_epoch_points(steps_per_epoch, config.validations_per_epoch)


def validation_metrics(value: Any) -> dict[str, float]:
    """A task's validation_loss as metrics: a number is loss_valid; a dict (several validation
    sets, e.g. EveryDream2's extra_manual_datasets) names its own."""
    return dict(value) if isinstance(value, dict) else {"loss_valid": value}


def validation_record(value: Any, config: Any, progress: Any) -> dict[str, Any]:
    """What the trainer logs for one validation: the epoch, the losses and, with
    validation_relative_loss, each loss relative to the run's first validation."""
    metrics = validation_metrics(value)
    if config.validation_relative_loss:
        metrics.update(relative_metrics(metrics, progress.extra.setdefault("validation_start", {})))
    return {"epoch": progress.epoch, **metrics}


def relative_metrics(metrics: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """EveryDream2's use_relative_loss: each loss_valid* metric minus its first value, as
    <metric>_relative. `reference` (kept in the checkpoint's progress, so a resumed run measures
    from the same start) takes the first value of each metric it has not seen yet."""
    result = {}
    for name, value in metrics.items():
        if name.startswith("loss_valid"):
            reference.setdefault(name, value)
            result[f"{name}_relative"] = value - reference[name]
    return result


__all__ = ["mid_epoch_points", "relative_metrics", "validation_due", "validation_metrics", "validation_record"]
