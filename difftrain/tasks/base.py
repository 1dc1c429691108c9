"""What a task gives the training loop: the contract every task keeps, and the optional parts.

The loop (difftrain.trainer) knows tasks only through this module. Every task has the few
methods of `Task`. What only some tasks can do -- draw samples, compute a held-out loss, export
files during and after the run, follow a rectified flow for reflow -- is an optional *part*: the
task's `parts` says which it has, as typed objects or None. The loop asks `parts.samples is not
None`, never `hasattr(task, ...)`, so what a task offers is written down where the task is built.

The start point of a run (a base model, a checkpoint to continue, or nothing for a model trained
from scratch) is decided once, on the main process, before any task is built (`StartPoint`); every
process receives the same value and no task resolves `resume_ckpt` again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

# StartPoint is the checkpoint module's value (it resolves resume_ckpt into one); the contract hands it
# to every task factory, so tasks import it from here.
from difftrain.checkpoint import StartPoint  # noqa: F401

if TYPE_CHECKING:  # annotations only: the contract loads without torch (the launcher imports no torch)
    import torch
    from torch import nn


@dataclass(frozen=True)
class TaskDefaults:
    """What a task decides for settings the user left unset (the loop itself knows no task names).

    `from_scratch`: the task builds its network from nothing, so `resume_ckpt` can only name a
    checkpoint (any other value is a mistake, not a base model).
    `warmup_fraction`: lr_warmup_steps when unset, as a fraction of the decay steps.
    """

    from_scratch: bool = False
    warmup_fraction: float = 0.0


class Samples(Protocol):
    """Images and numbers to log at sample_steps and at the end of a run (main process)."""

    def samples(self, model: nn.Module) -> dict[str, Any]: ...


class Validation(Protocol):
    """A held-out loss, or None when there is no held-out data (main process, eval mode)."""

    def validation_loss(self, model: nn.Module) -> Optional[float | dict[str, float]]:
        """loss_valid, or {metric name: loss} when there are several validation sets."""


class Exports(Protocol):
    """Files for the user beside the checkpoints: during the run (e.g. TrainTrain's save_per_steps)
    and once at its end (not after an interrupt). Main process, with the whole model.

    `exports_at` is asked on every process before `after_step`: under sharding, handing over the
    whole model is a collective gather, so all processes must agree whether it happens.
    """

    def exports_at(self, global_step: int) -> bool: ...
    def after_step(self, model: nn.Module, global_step: int, log_folder: Optional[Path]) -> None: ...
    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None: ...


class Flow(Protocol):
    """A rectified flow the reflow stages can follow (velocity_fn(z, s, **cond) in
    difftrain.objectives' time convention)."""

    def flow_velocity_fn(self, model: nn.Module) -> Callable[..., torch.Tensor]: ...
    def flow_probe(self) -> tuple[torch.Tensor, Optional[dict[str, Any]]]: ...  # fixed noise, cond
    def reflow_inputs(self, stage: int, batches: int) -> tuple[list[torch.Tensor], Optional[list[Any]]]: ...
    def use_reflow_pairs(self, pairs: Optional[Any]) -> None: ...  # None: train on the data again
    def render_flow_states(self, batches: Sequence[torch.Tensor]) -> list[Any]: ...  # one PIL image per batch


@dataclass(frozen=True)
class TaskParts:
    """The optional capabilities of a task; None where the task has no such part.

    `before_batch(global_step, epoch)` runs before each micro-batch (ADDifT picks its direction
    from the step, so a resumed run alternates exactly as the original did).
    """

    samples: Optional[Samples] = None
    validation: Optional[Validation] = None
    exports: Optional[Exports] = None
    flow: Optional[Flow] = None
    before_batch: Optional[Callable[[int, int], None]] = None


class Task(Protocol):
    """What every task gives the loop. Batches are lists of item indices drawn by `epoch_batches`."""

    model: nn.Module  # the module whose parameters train (wrapped by accelerate)
    defaults: TaskDefaults
    parts: TaskParts

    def parameter_groups(self) -> list[dict[str, Any]]: ...
    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]: ...
    def collate(self, indices: Sequence[int], epoch: int) -> Any: ...
    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...
    def write_model(self, model: nn.Module, folder: Path) -> None: ...
    def load_model(self, model: nn.Module, folder: Path) -> None: ...
    def run_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]: ...


class TaskFactory(Protocol):
    """Builds the task of a run: factory(config, accelerator, start) -> Task. A task class is one.

    `defaults` is read before the task exists: the start point depends on `from_scratch`. The
    built task's own `defaults` may refine the rest from its config (the warmup of a LoRA run).
    """

    defaults: TaskDefaults

    def __call__(self, config: Any, accelerator: Any, start: StartPoint) -> Task: ...


@dataclass(frozen=True)
class FactoryFunction:
    """A task factory made of a function (a closure, a partial) and the defaults of what it builds."""

    build: Callable[[Any, Any, StartPoint], Task]
    defaults: TaskDefaults

    def __call__(self, config: Any, accelerator: Any, start: StartPoint) -> Task:
        return self.build(config, accelerator, start)


__all__ = ["Exports", "FactoryFunction", "Flow", "Samples", "StartPoint", "Task", "TaskDefaults", "TaskFactory",
           "TaskParts", "Validation"]
