"""The training loop, shared by every task (Kolmogorov score network, Stable Diffusion, LoRA modes).

A task owns its model, data and loss (`Task` below); the loop owns everything else: devices and
precision (through accelerate), optimizer and LR schedule, gradient accumulation, logging,
samples, checkpoints, exact resume, and clean stops on Ctrl-C / SIGTERM / NaN.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from difftrain.checkpoint import (FINAL_PREFIX, Progress, checkpoint_name, load_trainer_tensors, new_log_folder,
                                  read_progress, resolve_start, save_checkpoint,
                                  save_tensors_atomically, write_file_atomically)
from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.optim import make_optimizer, make_scheduler
from difftrain.sharding import model_states, models_load_whole, place_staged_files, sharding_kind
from difftrain.tasks.base import StartPoint, TaskFactory
from difftrain.tracking import NullTracker, Tracker, create_run_folder, make_run_name

INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class TrainingStopped(Exception):
    """The run cannot go on (NaN loss); the last good checkpoint stays the newest."""



def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def resolve_seed(config: Config) -> Config:
    if config.seed >= 0:
        return config
    # TrainTrain's -1: pick a seed, and record it so the run can be reproduced from config.json.
    return config.model_copy(update={"seed": int.from_bytes(os.urandom(4), "little") >> 1})


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
        _say(f"\n{signal.Signals(signum).name} received: saving an interrupted- checkpoint "
             "(press Ctrl-C again to quit at once).")

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def decide_on_main(state: Any, decide):
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


def decide_start(config: Config, task_factory: TaskFactory, state: Any = None) -> StartPoint:
    """The run's start point, resolved on the main process alone and shared with every process:
    'findlast' could otherwise see a checkpoint appear between two processes' searches."""
    if state is None:
        from accelerate import PartialState

        state = PartialState()
    from_scratch = task_factory.defaults.from_scratch
    return decide_on_main(state, lambda: resolve_start(config, from_scratch, _say))


class Trainer:
    """Runs one task to the end (or to a stop), writing logs/, runs/ and checkpoints."""

    def __init__(self, config: Config, task_factory: TaskFactory, *, program: str = "difftrain",
                 start: Optional[StartPoint] = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.program = program
        precision = config.mixed_precision
        if precision == "auto":
            precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
        self.accelerator = Accelerator(mixed_precision=precision,
                                       gradient_accumulation_steps=config.gradient_accumulation_steps)
        self.is_main = self.accelerator.is_main_process
        self._check_process_group()
        # A drawn seed (-1) must be the main process's on every process: the data order is cut
        # into per-process shards from it, and config.json records it.
        seed = self._decide_on_main(lambda: resolve_seed(config).seed)
        self.config = config if seed == config.seed else config.model_copy(update={"seed": seed})
        set_seed(self.config.seed)
        self.logdir = Path(self.config.logdir)
        self.main_log_folder: Optional[Path] = None  # the main process's, known on every process
        # `start`: already decided by a caller that runs several trainers (Difference's passes).
        self.start = start if start is not None else decide_start(self.config, task_factory, self.accelerator)
        with models_load_whole(self.accelerator):
            self.task = task_factory(self.config, self.accelerator, self.start)

    # ---- run ------------------------------------------------------------------------------------
    def run(self) -> int:
        """Train; returns the process exit code (0, or 130/143 after an interrupt)."""
        from accelerate.utils import gather_object

        config, accelerator, task = self.config, self.accelerator, self.task
        parts = task.parts
        if config.rectified_flow and parts.flow is None:
            raise ConfigError(f"rectified_flow is not available for task '{config.task}' with mode "
                              f"'{config.mode}'. Turn rectified_flow off.")
        device = accelerator.device
        progress = Progress(seed=config.seed, project_name=config.project_name, task=config.task)
        model = task.model
        optimizer = make_optimizer(config, task.parameter_groups())
        rank, world = accelerator.process_index, accelerator.num_processes
        micro_per_epoch = len(task.epoch_batches(0, rank, world))
        if micro_per_epoch == 0:
            raise ConfigError(f"batch_size {config.batch_size} x {world} process(es) is larger than the "
                              "training set; lower batch_size or add data.")
        accumulation = config.gradient_accumulation_steps
        steps_per_epoch = max(1, micro_per_epoch // accumulation)
        stage0_steps = config.max_steps or steps_per_epoch * config.max_epochs
        stage0_epochs = math.ceil(stage0_steps / steps_per_epoch) if config.max_steps else config.max_epochs
        schedule = self._reflow_schedule(stage0_epochs)
        # Each reflow epoch trains on reflow_gen_batches batches of generated pairs, split over processes.
        reflow_steps_per_epoch = max(1, config.reflow_gen_batches // world // accumulation)
        total_steps = stage0_steps + config.reflow_steps * config.reflow_train_epochs * reflow_steps_per_epoch
        max_epochs = schedule.total_epochs
        units = max_epochs if config.scheduler_interval == "epoch" else total_steps
        scheduler = make_scheduler(config, optimizer, units, task.defaults.warmup_fraction)
        self.states = states = model_states(accelerator, model, config)  # before prepare: FSDP shards in place
        model, optimizer = accelerator.prepare(model, optimizer)
        if states.description and self.is_main:
            _say(states.description)
        generator = torch.Generator(device=device if device.type == "cuda" else "cpu")
        generator.manual_seed(config.seed * 1000 + rank)

        if self.start.checkpoint is not None:
            progress = self._resume(model, optimizer, scheduler, generator)

        run_dir, tracker, log_folder = self._open_outputs()
        ckpts_dir = log_folder / "ckpts" if log_folder else None
        # EveryDream2: with no save interval at all, save every 20 minutes.
        no_interval = not (config.save_every_n_epochs or config.ckpt_every_n_steps)
        ckpt_minutes = config.ckpt_every_n_minutes or (20.0 if no_interval else 0.0)
        last_save = time.monotonic()
        last_checkpoint: Optional[Path] = self.start.checkpoint

        def checkpoint(prefix: str = "") -> Optional[Path]:
            nonlocal last_save, last_checkpoint
            accelerator.wait_for_everyone()
            last_save = time.monotonic()
            # Each process draws its own noise; all the streams are kept so that a resumed
            # multi-process run draws exactly what the uninterrupted one would have.
            streams = gather_object([(generator.get_state(), torch.get_rng_state())])
            progress.extra["world_size"] = world
            saved = None
            name = checkpoint_name(config.project_name, progress, prefix)
            optimizer_state = states.optimizer_state(model, optimizer)  # collective under FSDP
            # DeepSpeed's files, one part per process, wait beside the checkpoint until it takes them in.
            staged = states.stage_files(model, Path(self.main_log_folder) / "ckpts" / f".tmp-{name}-parts")
            with states.whole_model(model) as whole:
                if self.is_main and ckpts_dir is not None:
                    def write_model(folder: Path) -> None:
                        task.write_model(whole, folder)
                        place_staged_files(staged, folder)

                    state = {**optimizer_state, "scheduler": scheduler.state_dict(),
                             "generator": generator.get_state(), "cpu_rng": torch.get_rng_state(),
                             "generator_per_rank": [stream[0] for stream in streams],
                             "cpu_rng_per_rank": [stream[1] for stream in streams]}
                    if accelerator.scaler is not None:
                        state["scaler"] = accelerator.scaler.state_dict()
                    saved = last_checkpoint = save_checkpoint(ckpts_dir, name, progress, state, write_model,
                                                              config.model_dump(mode="json"))
                    if staged is not None:
                        shutil.rmtree(staged, ignore_errors=True)  # a checkpoint of that name existed
            # Nobody moves on before the checkpoint is complete: after an interrupt a process that
            # exits first makes torchrun stop the others, the main one in the middle of writing.
            accelerator.wait_for_everyone()
            return saved

        bar = self._progress_bar(total_steps, progress.global_step)
        exit_code = 0
        stopping = 0  # the signal all processes agreed to stop on (0: none)
        nonfinite_seen = torch.zeros((), dtype=torch.bool, device=accelerator.device)
        with StopRequest(repeat_grace_s=2.0 if world > 1 else 0.0) as stop:
            try:
                while progress.epoch < max_epochs and progress.global_step < total_steps:
                    if parts.flow is not None:
                        self._enter_stage(schedule, progress, model, log_folder, tracker)
                    model.train()
                    batches = task.epoch_batches(progress.epoch, rank, world)
                    for index in range(progress.batch_in_epoch, len(batches)):
                        batch = task.collate(batches[index], progress.epoch)
                        if parts.before_batch is not None:
                            parts.before_batch(progress.global_step, progress.epoch)
                        with accelerator.accumulate(model):
                            with accelerator.autocast():
                                loss = task.loss(model, batch, generator)
                            # Noted, not raised: every process must stop at the same step (below),
                            # or the others would wait forever for this one's gradients. Kept as a
                            # device tensor so a GPU step does not wait for the host here.
                            nonfinite_seen = nonfinite_seen | ~torch.isfinite(loss.detach())
                            accelerator.backward(loss)
                            if accelerator.sync_gradients and config.clip_grad_norm:
                                accelerator.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
                            optimizer.step()
                            optimizer.zero_grad(set_to_none=True)
                        progress.batch_in_epoch = index + 1
                        if not accelerator.sync_gradients:
                            continue
                        if config.scheduler_interval == "step":
                            scheduler.step()
                        progress.global_step += 1
                        checkpoint_due = bool(ckpt_minutes) and time.monotonic() - last_save >= ckpt_minutes * 60
                        loss_value, stopping, any_nonfinite, checkpoint_due = self._agree(
                            loss, stop.signal, nonfinite_seen, checkpoint_due)
                        if any_nonfinite:
                            value = loss_value if not math.isfinite(loss_value) else \
                                "non-finite (in an accumulated micro-batch or on another process)"
                            raise TrainingStopped(
                                f"the loss became {value} at epoch {progress.epoch}, step "
                                f"{progress.global_step}. Lower lr, enable clip_grad_norm, or check "
                                "the data; the last good checkpoint is "
                                f"'{last_checkpoint or 'none (no checkpoint was saved yet)'}'.")
                        lr = scheduler.get_last_lr()[0]
                        tracker.log({"epoch": progress.epoch, "loss_train": loss_value, "lr": lr},
                                    step=progress.global_step)
                        # refresh=False: redrawing is bar.update's job, throttled by tqdm's mininterval.
                        bar.set_postfix(epoch=progress.epoch, loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                        bar.update(1)
                        if parts.samples is not None and config.sample_steps and \
                                progress.global_step % config.sample_steps == 0:
                            self._log_samples(model, tracker, progress.global_step, run_dir, log_folder)
                        if parts.exports is not None and parts.exports.exports_at(progress.global_step):
                            with states.whole_model(model) as whole:
                                if whole is not None:
                                    parts.exports.after_step(whole, progress.global_step, log_folder)
                        if stopping:
                            break
                        if checkpoint_due or \
                                (config.ckpt_every_n_steps and progress.global_step % config.ckpt_every_n_steps == 0):
                            checkpoint()
                        if progress.global_step >= total_steps:
                            break
                        if progress.global_step == stage0_steps and schedule.reflow_steps and \
                                progress.epoch < schedule.max_epochs:
                            break  # max_steps ended stage 0 inside an epoch: go on to reflow
                    if stopping:
                        break
                    if progress.batch_in_epoch >= len(batches) or progress.global_step == stage0_steps:
                        progress.epoch += 1
                        progress.batch_in_epoch = 0
                        if config.scheduler_interval == "epoch":
                            scheduler.step()
                        self._validate(model, tracker, progress)
                        if parts.flow is not None and (progress.epoch == max_epochs or
                                                      schedule.position(progress.epoch).epoch_in_stage == 0):
                            self._measure_flow(model, tracker, progress)
                        if config.save_every_n_epochs and progress.epoch % config.save_every_n_epochs == 0:
                            checkpoint()
                if stopping:
                    saved = checkpoint("interrupted-")
                    exit_code = INTERRUPT_EXIT_CODES.get(stopping, 128 + stopping)
                    bar.close()
                    if self.is_main:
                        _say(f"stopped by {signal.Signals(stopping).name}; resume with "
                             f"--resume_ckpt \"{saved}\"")
                else:
                    saved = checkpoint(FINAL_PREFIX)
                    bar.close()
                    if parts.samples is not None:
                        self._log_samples(model, tracker, progress.global_step, run_dir, log_folder)
                    if parts.exports is not None:
                        with states.whole_model(model) as whole:
                            if whole is not None:
                                parts.exports.finish(whole, log_folder, run_dir)
            finally:
                bar.close()
                tracker.close()
        with states.whole_model(model) as whole:
            if whole is not None:
                if run_dir is not None:
                    save_tensors_atomically(run_dir / "state.pth", task.run_state_dict(whole))
                self._print_summary(run_dir, log_folder, saved)
        accelerator.wait_for_everyone()  # as in checkpoint(): leave together, after state.pth
        accelerator.end_training()
        return exit_code

    # ---- pieces -----------------------------------------------------------------------------------
    def _reflow_schedule(self, stage0_epochs: int):
        from difftrain.reflow import ReflowSchedule

        config = self.config
        if config.reflow_steps and not config.rectified_flow:
            raise ConfigError("reflow_steps needs rectified_flow: reflow straightens a rectified flow. "
                              "Add --rectified_flow or set reflow_steps to 0.")
        return ReflowSchedule(max_epochs=stage0_epochs, reflow_steps=config.reflow_steps,
                              reflow_train_epochs=config.reflow_train_epochs,
                              reflow_sample_steps=config.reflow_sample_steps,
                              sample_steps=config.sample_steps, reflow_gen_batches=config.reflow_gen_batches,
                              batch_size=config.batch_size)

    def _enter_stage(self, schedule, progress: Progress, model, log_folder: Optional[Path], tracker) -> None:
        """Point the task at this epoch's training data: the data set, or a reflow stage's pairs.

        Pairs live under the log folder of the run that generated them; the path travels in the
        checkpoint, so a resumed run trains on the very same pairs instead of regenerating them.
        """
        from difftrain.reflow import ReflowPairDataset, ReflowSchedule, generate_reflow_pairs

        position = schedule.position(progress.epoch)
        progress.stage, progress.epoch_in_stage = position.stage, position.epoch_in_stage
        if position.stage == 0:
            self.task.parts.flow.use_reflow_pairs(None)
            return
        if "reflow_root" not in progress.extra:
            progress.extra["reflow_root"] = str((log_folder or self.main_log_folder or
                                                 Path(self.config.logdir)) / "reflow")
        pairs_dir = ReflowSchedule.pairs_dir(progress.extra["reflow_root"], position.stage)
        if position.needs_new_pairs and progress.batch_in_epoch == 0:
            with self._evaluating(model) as whole:
                if whole is not None:
                    _say(f"reflow {position.stage}/{schedule.reflow_steps}: generating "
                         f"{schedule.samples_per_iteration} pairs with {schedule.simulation_steps} Euler steps")
                    velocity = self.task.parts.flow.flow_velocity_fn(whole)
                    noise, cond = self.task.parts.flow.reflow_inputs(position.stage, self.config.reflow_gen_batches)
                    generate_reflow_pairs(velocity, noise, schedule.simulation_steps, cond, pairs_dir)
            self.accelerator.wait_for_everyone()
        self.task.parts.flow.use_reflow_pairs(ReflowPairDataset(pairs_dir))

    def _measure_flow(self, model, tracker, progress: Progress) -> None:
        """Straightness and 1-step vs N-step distance on fixed noise, at the end of each stage."""
        from difftrain.reflow import one_step_vs_n_step_distance, straightness

        with self._evaluating(model) as whole:
            if whole is None:
                return
            velocity = self.task.parts.flow.flow_velocity_fn(whole)
            noise, cond = self.task.parts.flow.flow_probe()
            steps = self.config.sample_inference_steps
            metrics = {"straightness": straightness(velocity, noise, steps, cond=cond),
                       "one_vs_n_step_distance": one_step_vs_n_step_distance(velocity, noise, steps, cond=cond),
                       "reflow_stage": progress.stage}
        tracker.log(metrics, step=progress.global_step)
        _say(f"after stage {progress.stage}: straightness {metrics['straightness']:.4f}, "
             f"1-step vs {steps}-step distance {metrics['one_vs_n_step_distance']:.4f}")

    def _resume(self, model, optimizer, scheduler, generator) -> Progress:
        folder = self.start.checkpoint
        assert folder is not None
        progress = read_progress(folder)
        if progress.task and progress.task != self.config.task:
            raise ConfigError(f"checkpoint '{folder}' was made by a '{progress.task}' run; this config "
                              f"trains '{self.config.task}'. Pick a checkpoint of this task.")
        if progress.project_name and progress.project_name != self.config.project_name:
            _say(f"note: resuming a checkpoint of project '{progress.project_name}' in project "
                 f"'{self.config.project_name}'.")
        saved_config = folder / "config.json"
        if saved_config.is_file():
            import json

            before = json.loads(saved_config.read_text(encoding="utf-8"))
            for key in ("batch_size", "gradient_accumulation_steps", "data_root", "seed"):
                if key in before and before[key] != getattr(self.config, key):
                    _say(f"warning: {key} changed from {before[key]!r} to {getattr(self.config, key)!r} "
                         "since the checkpoint; the data order after resume cannot match the "
                         "original run exactly.")

        def read_into(module: nn.Module) -> None:
            try:
                self.task.load_model(module, folder)
            except RuntimeError as error:  # load_state_dict: missing/unexpected keys, shape mismatches
                detail = " ".join(str(error).split())
                detail = detail if len(detail) <= 300 else detail[:300] + " ..."
                raise ConfigError(
                    f"checkpoint '{folder}' does not fit the network this config builds ({detail}). Resume "
                    f"with the settings it was trained with (its config.json, e.g. "
                    f"'python train.py --config {folder / 'config.json'} --resume_ckpt {folder}'), or start a "
                    "new run without resume_ckpt.") from None

        state = load_trainer_tensors(folder)
        self.states.load(model, optimizer, folder, state, read_into, self._decide_on_main)
        scheduler.load_state_dict(state["scheduler"])
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        per_rank = state.get("generator_per_rank")
        if per_rank is not None and len(per_rank) == world:
            generator.set_state(per_rank[rank])
            torch.set_rng_state(state["cpu_rng_per_rank"][rank])
        else:
            generator.set_state(state["generator"])
            torch.set_rng_state(state["cpu_rng"])
        saved_world = progress.extra.get("world_size", 1)
        if saved_world != world and self.is_main:
            _say(f"warning: the checkpoint was saved by {saved_world} process(es), this run has "
                 f"{world}; each process's share of the data and its noise differ, so the run "
                 "cannot continue exactly as the original would have.")
        if "scaler" in state and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.is_main:
            _say(f"resumed from '{folder}' at epoch {progress.epoch}, step {progress.global_step}.")
        return progress

    def _open_outputs(self):
        """(run folder, tracker, log folder), made by the main process alone (one run name, one
        folder); the others get (None, NullTracker(), None) and the log folder's path in
        `self.main_log_folder`."""
        opened: dict[str, Any] = {}

        def open_on_main() -> str:
            config = self.config
            runs_dir = Path(config.runs_dir)
            name = config.run_name or make_run_name(runs_dir)
            run_dir, run_id = create_run_folder(runs_dir, name, config.model_dump(mode="json"))
            log_folder = new_log_folder(self.logdir, config.project_name)
            settings = config.model_dump_json(indent=2)
            write_file_atomically(log_folder / "settings.json",
                                  lambda temp: temp.write_text(settings, encoding="utf-8"))
            tracker = Tracker(run_dir, run_name=name, run_id=run_id,
                              project=config.wandb_project or config.project_name,
                              config=config.model_dump(mode="json"), use_wandb=config.tracker == "wandb",
                              wandb_mode=config.wandb_mode, log_folder=log_folder)
            _say(f"run folder: {run_dir}")
            opened.update(run_dir=run_dir, tracker=tracker, log_folder=log_folder)
            return str(log_folder)

        self.main_log_folder = Path(self._decide_on_main(open_on_main))
        if not self.is_main:
            return None, NullTracker(), None
        return opened["run_dir"], opened["tracker"], opened["log_folder"]

    def _decide_on_main(self, decide):
        return decide_on_main(self.accelerator, decide)

    def _check_process_group(self) -> None:
        sharding_kind(self.accelerator)  # refuses Megatron-LM / FSDP1 before the task loads its models
        launched_as = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched_as > 1 and self.accelerator.num_processes == 1:
            # Each process would train alone and write its own run folder: refuse rather than
            # silently train N unrelated copies.
            raise ConfigError(
                f"this process was started as one of {launched_as} (WORLD_SIZE={launched_as}) but "
                "accelerate set up no process group. Without a GPU, multi-process training runs "
                "on CPU only when asked: set ACCELERATE_USE_CPU=1 in the environment.")

    def _agree(self, loss: torch.Tensor, signal_number: Optional[int], nonfinite: torch.Tensor,
               checkpoint_due: bool) -> tuple[float, int, bool, bool]:
        """What all processes must decide together after an optimizer step, in one gather:
        (loss averaged over processes, signal to stop on or 0, whether any process saw a
        non-finite loss, whether any process's clock says a timed checkpoint is due).

        A decision taken by one process alone (a signal that reached it first, its own clock, a
        NaN in its own shard) would leave the others waiting forever in the next collective.
        """
        local = torch.tensor([[0.0, float(signal_number or 0), 0.0, float(checkpoint_due)]],
                             device=loss.device)
        local[0, 0] = loss.detach().float()
        local[0, 2] = nonfinite.float()
        table = self.accelerator.gather(local).cpu()  # (processes, 4)
        return (table[:, 0].mean().item(), int(table[:, 1].max().item()), bool(table[:, 2].any()),
                bool(table[:, 3].any()))

    def _progress_bar(self, total: int, initial: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                    disable=not self.is_main, desc=self.config.project_name)

    @contextmanager
    def _evaluating(self, model, autocast: bool = True) -> Iterator[Optional[nn.Module]]:
        """The whole model on the main process (None on the others, which must enter too: under
        sharding this is a gather), on the accelerator's device, in eval mode without gradients."""
        model.eval()
        try:
            with self.states.whole_model(model, self.accelerator.device) as whole, torch.no_grad(), \
                    (self.accelerator.autocast() if autocast else nullcontext()):
                yield whole
        finally:
            model.train()

    def _validate(self, model, tracker, progress: Progress) -> None:
        if progress.epoch % self.config.validate_every_n_epochs:
            return
        with self._evaluating(model) as whole:
            validation = self.task.parts.validation
            value = validation.validation_loss(whole) if whole is not None and validation is not None else None
        if value is not None:
            tracker.log({"epoch": progress.epoch, "loss_valid": value}, step=progress.global_step)

    def _log_samples(self, model, tracker, step: int, run_dir: Optional[Path], log_folder: Optional[Path]) -> None:
        # Without autocast: the samples' own pipelines choose their precision.
        with self._evaluating(model, autocast=False) as whole:
            if whole is None:
                return
            images = self.task.parts.samples.samples(whole)  # images and metrics
        pictures = {key: value for key, value in images.items() if hasattr(value, "save")}
        numbers = {key: value for key, value in images.items() if not hasattr(value, "save")}
        for folder in filter(None, (run_dir, log_folder)):
            (folder / "samples").mkdir(exist_ok=True)
            for key, image in pictures.items():
                image.save(folder / "samples" / f"{key}-gs{step:05d}.png")
        if pictures or numbers:
            tracker.log(numbers, step=step, images={"samples": list(pictures.values())} if pictures else None)

    def _print_summary(self, run_dir, log_folder, checkpoint_folder) -> None:
        lines = ["", "done."]
        if run_dir is not None:
            lines.append(f"run folder: {run_dir}")
            lines.append("  config.json, state.pth, metrics.jsonl, samples/")
        if log_folder is not None:
            lines.append(f"log folder: {log_folder}")
        if checkpoint_folder is not None:
            lines.append(f"checkpoint: {checkpoint_folder}")
        _say("\n".join(lines))
