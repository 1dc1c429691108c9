"""The training loop, shared by every task (difftrain.tasks.base.Task): `Trainer.run` reads top to bottom.

A task owns its model, data and loss, and declares what else it can do (`task.parts`: samples,
validation, exports, a flow for reflow); the loop owns everything else: devices and precision
(through accelerate), optimizer and LR schedule, gradient accumulation, logging, samples,
checkpoints and exact resume (difftrain.checkpointer), reflow stages (difftrain.reflow), and
clean stops on Ctrl-C / SIGTERM / NaN that every process agrees on (difftrain.processes).
"""

from __future__ import annotations

import math
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from difftrain.checkpoint import FINAL_PREFIX, Progress, resolve_start, save_tensors_atomically
from difftrain.checkpointer import Checkpointer, Training
from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.ema import make_ema
from difftrain.optim import (OptimizerPair, clip_gradients, evaluation_weights, logged_learning_rates, make_optimizer,
                             make_scheduler, step_schedule)
from difftrain.processes import (StopRequest, agree_after_step, check_process_group, decide_on_main,
                                 exit_code_of)
from difftrain.reflow import ReflowStages, run_length
from difftrain.sharding import model_states, models_load_whole
from difftrain.tasks.base import StartPoint, TaskFactory
from difftrain.tracking import open_run_outputs
from difftrain.validation_points import validation_due, validation_record


class TrainingStopped(Exception):
    """The run cannot go on (NaN loss); the last good checkpoint stays the newest."""


def resolve_seed(config: Config) -> Config:
    if config.seed >= 0:
        return config
    # TrainTrain's -1: pick a seed, and record it so the run can be reproduced from config.json.
    return config.model_copy(update={"seed": int.from_bytes(os.urandom(4), "little") >> 1})


def decide_start(config: Config, task_factory: TaskFactory, state: Any = None) -> StartPoint:
    """The run's start point, resolved on the main process alone and shared with every process:
    'findlast' could otherwise see a checkpoint appear between two processes' searches."""
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    from_scratch = task_factory.defaults.from_scratch
    return decide_on_main(state, lambda: resolve_start(config, from_scratch, say))


def mixed_precision(config: Config) -> str:
    """accelerate's mixed_precision for config's: 'auto' is bf16 where the GPU has it, else off."""
    if config.mixed_precision != "auto":
        return config.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def nonfinite_message(loss_value: float, progress: Progress, last_checkpoint: Optional[Path]) -> str:
    """What to tell the user when the loss stops being finite: where, what to change, what is kept."""
    value = loss_value if not math.isfinite(loss_value) else \
        "non-finite (in an accumulated micro-batch or on another process)"
    return (f"the loss became {value} at epoch {progress.epoch}, step {progress.global_step}. Lower lr, "
            "enable clip_grad_norm, or check the data; the last good checkpoint is "
            f"'{last_checkpoint or 'none (no checkpoint was saved yet)'}'.")


def samples_as_asked(draw: Callable[[Any], dict[str, Any]], ema: Any, whole: Any) -> dict[str, Any]:
    """`draw(whole)`'s images and metrics from the trained weights and, as ema_sample_* say, from the
    EMA (keys ending in '_ema', as EveryDream2 marks its EMA samples)."""
    if ema is None:
        return draw(whole)
    images = draw(whole) if ema.settings.sample_trained else {}
    if ema.settings.sample_ema:
        with ema.in_use():
            images.update({f"{key}_ema": value for key, value in draw(whole).items()})
    return images


class Trainer:
    """Runs one task to the end (or to a stop), writing logs/, runs/ and checkpoints."""

    def __init__(self, config: Config, task_factory: TaskFactory, *, program: str = "difftrain",
                 start: Optional[StartPoint] = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.program = program
        self.accelerator = Accelerator(mixed_precision=mixed_precision(config),
                                       gradient_accumulation_steps=config.gradient_accumulation_steps)
        self.is_main = self.accelerator.is_main_process
        check_process_group(self.accelerator)
        # A drawn seed (-1) must be the main process's on every process: the data order is cut
        # into per-process shards from it, and config.json records it.
        seed = decide_on_main(self.accelerator, lambda: resolve_seed(config).seed)
        self.config = config if seed == config.seed else config.model_copy(update={"seed": seed})
        set_seed(self.config.seed)
        # `start`: already decided by a caller that runs several trainers (a mode made of several runs).
        self.start = start if start is not None else decide_start(self.config, task_factory, self.accelerator)
        with models_load_whole(self.accelerator):
            self.task = task_factory(self.config, self.accelerator, self.start)

    # ---- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train; returns the process exit code (0, or 130/143 after an interrupt)."""
        config, accelerator, task = self.config, self.accelerator, self.task
        self.parts = parts = task.parts
        if config.rectified_flow and parts.flow is None:
            raise ConfigError(f"rectified_flow is not available for task '{config.task}' with mode "
                              f"'{config.mode}'. Turn rectified_flow off.")
        rank, world = accelerator.process_index, accelerator.num_processes
        optimizer = make_optimizer(config, task.parameter_groups())
        self.length = length = run_length(config, len(task.epoch_batches(0, rank, world)), world)
        units = length.max_epochs if config.scheduler_interval == "epoch" else length.total_steps
        self.scheduler = make_scheduler(config, optimizer, units, task.defaults.warmup_fraction)
        self.states = model_states(accelerator, task.model, config)  # before prepare: FSDP shards in place
        OptimizerPair.check_unsharded(optimizer, self.states.description)
        self.model, self.optimizer = accelerator.prepare(task.model, optimizer)
        self.ema = make_ema(config, task, total_steps=length.total_steps, device=accelerator.device,
                            sharding=self.states.description, keep=self.is_main)
        for line in (self.states.description, length.reflow_warning):
            if line and self.is_main:
                say(line)
        device = accelerator.device
        # Each process draws its own noise, from a stream the checkpoints keep.
        self.generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
        self.generator.manual_seed(config.seed * 1000 + rank)
        self.saver = Checkpointer(config, accelerator, self.states, task,
                                  Training(self.model, self.optimizer, self.scheduler, self.generator, self.ema),
                                  resumed=self.start.checkpoint)
        self.progress = Progress(seed=config.seed, project_name=config.project_name, task=config.task)
        self.last_loss: Optional[float] = None  # the last optimizer step's, agreed by all processes
        # The steps of the last samples and the last validation: neither is done twice at one step.
        self.sampled_at: Optional[int] = None
        self.validated_at: Optional[int] = None
        if self.start.checkpoint is not None:
            self.progress = self.saver.resume(self.start.checkpoint)

        self.outputs = open_run_outputs(config, self.is_main, lambda decide: decide_on_main(accelerator, decide))
        self.saver.write_into(self.outputs)
        self.stages = None if parts.flow is None else \
            ReflowStages(parts.flow, length.schedule, config, accelerator, self.states,
                         evaluation=lambda: evaluation_weights(self.optimizer))
        # Noted on every micro-batch, not raised at once: every process must stop at the same step
        # (`_after_optimizer_step`), or the others would wait forever for this one's gradients. A
        # device tensor, so that a GPU step does not wait for the host.
        self.nonfinite_seen = torch.zeros((), dtype=torch.bool, device=device)
        self.bar = self._progress_bar(length.total_steps, self.progress.global_step)
        self.epoch_steps = length.steps_per_epoch
        if (config.validate_before_training or config.validation_relative_loss) and self.start.checkpoint is None:
            self._validate(before_training=True)
        if config.sample_before_training and parts.samples is not None and self.start.checkpoint is None:
            self._log_samples()
        with StopRequest(repeat_grace_s=2.0 if world > 1 else 0.0) as stop:
            try:
                stopping = self._train(stop)
                saved = self._finish(stopping)
            finally:
                self.bar.close()
                self.outputs.close()  # the last curves.png, then the tracker
        with self._result_model() as whole:
            if whole is not None:
                if self.outputs.run_dir is not None:
                    save_tensors_atomically(self.outputs.run_dir / "state.pth", task.run_state_dict(whole))
                say(self.outputs.summary(saved))
        accelerator.wait_for_everyone()  # as in Checkpointer.save: leave together, after state.pth
        accelerator.end_training()
        return exit_code_of(stopping) if stopping else 0

    def _train(self, stop: StopRequest) -> int:
        """Epochs until the run's length or an agreed stop; returns the stop's signal number, or 0."""
        progress, length, task = self.progress, self.length, self.task
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        while progress.epoch < length.max_epochs and progress.global_step < length.total_steps:
            if self.stages is not None:
                self.stages.enter_epoch(progress, self.model, self.outputs)
            self.model.train()
            batches = task.epoch_batches(progress.epoch, rank, world)
            # this epoch's optimizer steps (reflow epochs, multiply and rated epochs differ from epoch 0's)
            self.epoch_steps = max(1, len(batches) // self.config.gradient_accumulation_steps)
            stopping = 0
            for index in range(progress.batch_in_epoch, len(batches)):
                loss = self._micro_step(task.collate(batches[index], progress.epoch))
                progress.batch_in_epoch = index + 1
                if not self.accelerator.sync_gradients:
                    continue  # accumulating: the optimizer step comes with a later micro-batch
                stopping, leave_epoch = self._after_optimizer_step(loss, stop.signal)
                if leave_epoch:
                    break
            if stopping:
                return stopping
            if length.epoch_complete(progress.batch_in_epoch, len(batches), progress.global_step):
                self._end_epoch()
        return 0

    def _micro_step(self, batch: Any) -> torch.Tensor:
        """Forward and backward of one micro-batch; the optimizer steps once per accumulation."""
        accelerator, progress = self.accelerator, self.progress
        if self.parts.before_batch is not None:
            self.parts.before_batch(progress.global_step, progress.epoch)
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                loss = self.task.loss(self.model, batch, self.generator)
            self.nonfinite_seen = self.nonfinite_seen | ~torch.isfinite(loss.detach())
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.config.clip_grad_norm:
                clip_gradients(accelerator, self.model, self.optimizer, self.config.clip_grad_norm,
                               self.config.clip_grad_norm_per_model)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def _after_optimizer_step(self, loss: torch.Tensor, signal_number: Optional[int]) -> tuple[int, bool]:
        """Count the step, log it, and take the decisions every process takes together. Returns
        (signal to stop on or 0, whether the epoch's loop ends here)."""
        config, progress, parts = self.config, self.progress, self.parts
        progress.global_step += 1
        if self.ema is not None:
            self.ema.after_optimizer_step(progress.global_step)
        agreed = agree_after_step(self.accelerator, loss, signal_number, self.nonfinite_seen,
                                  self.saver.due_by_clock())
        if agreed.nonfinite:
            raise TrainingStopped(nonfinite_message(agreed.loss, progress, self.saver.last_checkpoint))
        self.last_loss = agreed.loss
        if config.scheduler_interval == "step":
            step_schedule(self.scheduler, agreed.loss)  # reduce_on_plateau steps on the agreed loss
        self._log_step(agreed.loss)
        if parts.samples is not None and config.sample_steps and progress.global_step % config.sample_steps == 0:
            self._log_samples()
        self._validate(mid_epoch=True)
        if parts.exports is not None and parts.exports.exports_at(progress.global_step):
            with self._result_model() as whole:
                if whole is not None:
                    parts.exports.after_step(whole, progress.global_step, self.outputs.log_folder)
        if agreed.stop_signal:
            return agreed.stop_signal, True
        if agreed.checkpoint_due or self.saver.due_at_step(progress.global_step):
            self.saver.save(progress)
        leave = progress.global_step >= self.length.total_steps or \
            self.length.ends_stage0_mid_epoch(progress.global_step, progress.epoch)
        return 0, leave

    def _end_epoch(self) -> None:
        progress = self.progress
        progress.epoch += 1
        progress.batch_in_epoch = 0
        if self.config.scheduler_interval == "epoch":
            step_schedule(self.scheduler, self.last_loss)
        self._validate()
        if self.stages is not None:
            self.stages.after_epoch(progress, self.model, self.outputs.tracker)
        if self.saver.due_at_epoch(progress.epoch):
            self.saver.save(progress)

    def _finish(self, stopping: int):
        """After the last step: the interrupted- or last- checkpoint; after a completed run, the
        final samples and the task's exports. Returns the checkpoint folder (main process)."""
        if stopping:
            saved = self.saver.save(self.progress, "interrupted-")
            self.bar.close()
            if self.is_main:
                say(f"stopped by {signal.Signals(stopping).name}; resume with --resume_ckpt \"{saved}\"")
            return saved
        saved = self.saver.save(self.progress, "" if self.config.no_prepend_last else FINAL_PREFIX)
        self.bar.close()
        # The end's samples, unless sample_steps drew them at this very step.
        if self.parts.samples is not None and self.sampled_at != self.progress.global_step:
            self._log_samples()
        if self.parts.exports is not None:
            with self._result_model() as whole:
                if whole is not None:
                    self.parts.exports.finish(whole, self.outputs.log_folder, self.outputs.run_dir)
        return saved

    # ---- pieces -----------------------------------------------------------------------------------
    def _log_step(self, loss_value: float) -> None:
        progress, rates = self.progress, logged_learning_rates(self.scheduler, self.optimizer)
        lr = rates["lr"]
        self.outputs.tracker.log({"epoch": progress.epoch, "loss_train": loss_value, **rates}, step=progress.global_step)
        # refresh=False: redrawing is bar.update's job, throttled by tqdm's mininterval.
        self.bar.set_postfix(epoch=progress.epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        self.bar.update(1)

    def _progress_bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    disable=not self.is_main, desc=self.config.project_name)

    def _validate(self, mid_epoch: bool = False, before_training: bool = False) -> None:
        """loss_valid when due; `before_training`: the start point use_relative_loss measures from
        (EveryDream2 validates once before its first step)."""
        validation, progress = self.parts.validation, self.progress
        if self.validated_at == progress.global_step or \
                not validation_due(validation, self.config, progress, self.epoch_steps, mid_epoch, before_training):
            return  # e.g. max_steps ending reflow's stage 0 at a mid-epoch point, then the epoch's end
        self.validated_at = progress.global_step  # on every process: all gather the model together
        with self._evaluating() as whole:
            value = validation.validation_loss(whole) if whole is not None else None
        if value is not None:
            self.outputs.tracker.log(validation_record(value, self.config, progress), step=progress.global_step)

    def _log_samples(self) -> None:
        self.sampled_at = self.progress.global_step  # on every process: all gather the model together
        # Without autocast: the samples' own pipelines choose their precision.
        with self._evaluating(autocast=False) as whole:
            if whole is None:
                return
            samples = samples_as_asked(self.parts.samples.samples, self.ema, whole)  # images and metrics
        self.outputs.save_samples(samples, self.progress.global_step)

    @contextmanager
    def _evaluating(self, autocast: bool = True) -> Iterator[Any]:
        """states.evaluating with the weights a user gets (below)."""
        with evaluation_weights(self.optimizer), self.states.evaluating(self.model, autocast=autocast) as whole:
            yield whole

    @contextmanager
    def _result_model(self) -> Iterator[Any]:
        """The whole model (None off the main process) with the weights a user gets: a schedule-free
        optimizer's average (optim.evaluation_weights); checkpoints keep the training weights (exact resume)."""
        with evaluation_weights(self.optimizer), self.states.whole_model(self.model) as whole:
            yield whole
