"""What the training processes decide together: stops, checks after each step, one-time choices.

With several processes (accelerate / torchrun), a decision taken by one process alone -- a signal
that reached it first, its own clock, a NaN in its own shard, a 'findlast' search that saw a new
folder -- would leave the others waiting forever in the next collective. Everything here is
decided once (on the main process, then shared) or in one gather that every process joins.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Callable, NamedTuple, Optional, TypeVar

import torch

from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.sharding import sharding_kind

INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
Result = TypeVar("Result")


def exit_code_of(signal_number: int) -> int:
    """The shell's exit code for a run stopped by `signal_number` (130 for Ctrl-C, 143 for SIGTERM)."""
    return INTERRUPT_EXIT_CODES.get(signal_number, 128 + signal_number)


class StopRequest:
    """First Ctrl-C / SIGTERM asks the loop to save and stop; a second Ctrl-C exits at once.

    `repeat_grace_s`: a second signal this soon after the first is the same stop delivered twice,
    not a second Ctrl-C. Multi-process launchers (torchrun, accelerate launch) forward the signal
    they get to every worker, which the terminal or Slurm has already signalled directly.
    """

    def __init__(self, repeat_grace_s: float = 0.0) -> None:
        self.signal: Optional[int] = None
        self.repeat_grace_s = repeat_grace_s
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in INTERRUPT_EXIT_CODES:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:
            if time.monotonic() - self._first_at < self.repeat_grace_s:
                return
            os._exit(INTERRUPT_EXIT_CODES.get(signum, 130))
        self.signal = signum
        self._first_at = time.monotonic()
        say(f"\n{signal.Signals(signum).name} received: saving an interrupted- checkpoint "
            "(press Ctrl-C again to quit at once).")

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def decide_on_main(state: Any, decide: Callable[[], Result]) -> Result:
    """decide() on the main process; every process returns its result or raises its error.

    `state`: accelerate's Accelerator or PartialState (is_main_process, num_processes). Deciding
    once keeps the processes consistent (one drawn seed, one checkpoint, one run folder), and
    sharing a failure stops the others instead of leaving them waiting forever for a process that
    has gone. The result must be picklable.
    """
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None, None, None]  # result, ConfigError message, other failure
    failure: Optional[BaseException] = None
    if state.is_main_process:
        try:
            outcome[0] = decide()
        except ConfigError as error:
            outcome[1] = str(error)
        except BaseException as error:
            failure, outcome[2] = error, repr(error)
    if state.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        raise ConfigError(outcome[1])
    if outcome[2] is not None:
        raise RuntimeError(f"the main process failed: {outcome[2]}")
    return outcome[0]


class StepAgreement(NamedTuple):
    """What every process knows after an optimizer step (see `agree_after_step`)."""

    loss: float  # averaged over processes
    stop_signal: int  # the signal to stop on, 0 for none
    nonfinite: bool  # some process saw a non-finite loss
    checkpoint_due: bool  # some process's clock says a timed checkpoint is due


def agree_after_step(accelerator: Any, loss: torch.Tensor, signal_number: Optional[int],
                     nonfinite: torch.Tensor, checkpoint_due: bool) -> StepAgreement:
    """The decisions all processes must take together after an optimizer step, in one gather."""
    local = torch.tensor([[0.0, float(signal_number or 0), 0.0, float(checkpoint_due)]], device=loss.device)
    local[0, 0] = loss.detach().float()
    local[0, 2] = nonfinite.float()
    table = accelerator.gather(local).cpu()  # (processes, 4)
    return StepAgreement(table[:, 0].mean().item(), int(table[:, 1].max().item()), bool(table[:, 2].any()),
                         bool(table[:, 3].any()))


def check_process_group(accelerator: Any) -> None:
    """Refuse setups that would train wrongly, before the task loads its models."""
    sharding_kind(accelerator)  # refuses Megatron-LM / FSDP1
    launched_as = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched_as > 1 and accelerator.num_processes == 1:
        # Each process would train alone and write its own run folder: refuse rather than
        # silently train N unrelated copies.
        raise ConfigError(
            f"this process was started as one of {launched_as} (WORLD_SIZE={launched_as}) but "
            "accelerate set up no process group. Without a GPU, multi-process training runs "
            "on CPU only when asked: set ACCELERATE_USE_CPU=1 in the environment.")


__all__ = ["INTERRUPT_EXIT_CODES", "StepAgreement", "StopRequest", "agree_after_step", "check_process_group",
           "decide_on_main", "exit_code_of"]
