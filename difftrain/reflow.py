"""Reflow: straighten a rectified flow by retraining on its own (noise, endpoint) couplings.

Each reflow stage simulates the current model from fresh noise to its endpoints, stores the
pairs on disk, and trains on them with the same flow loss as stage 0
(``RectifiedFlowObjective.flow_loss(model, x0=endpoint, noise=noise, flow_time)``). Time
convention as in ``difftrain.objectives``: s = 1 noise, s = 0 data, velocity = noise - data.

Pair shards are safetensors files written atomically (temp file + rename) with a JSON manifest,
so an interrupted generation resumes without recomputing finished shards.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator, Mapping, NamedTuple, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from difftrain.atomic_files import write_file_atomically
from difftrain.errors import ConfigError
from difftrain.figures import drawing
from difftrain.log import say
from difftrain.sampling import Cond, euler_flow_path

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "difftrain.reflow_pairs"
MANIFEST_VERSION = 1
_COND_PREFIX = "cond/"
BEFORE_SAMPLES_NAME = "probe_before_stage.safetensors"  # in a stage's pairs folder: its "before" samples


def _shard_name(index: int) -> str:
    return f"pairs-{index:05d}.safetensors"


def _flatten_cond(cond: Mapping[str, Any], prefix: str = _COND_PREFIX) -> dict[str, torch.Tensor]:
    flat: dict[str, torch.Tensor] = {}
    for key, value in cond.items():
        if "/" in key:
            raise ValueError(f"condition key {key!r} may not contain '/' (used as the nesting separator)")
        if isinstance(value, Mapping):
            flat.update(_flatten_cond(value, f"{prefix}{key}/"))
        elif isinstance(value, torch.Tensor):
            flat[f"{prefix}{key}"] = value
        else:
            raise ValueError(f"condition {prefix}{key} is a {type(value).__name__}; only tensors can be stored")
    return flat


def _unflatten_cond(flat: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = key[len(_COND_PREFIX) :].split("/")
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def _write_json_atomically(path: Path, payload: Mapping[str, Any]) -> None:
    text = json.dumps(payload, indent=2) + "\n"
    write_file_atomically(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _shard_matches(path: Path, noise: torch.Tensor) -> bool:
    """True when ``path`` is a finished shard simulated from exactly this ``noise``.

    Comparing the stored noise (not just the row count) catches a resume whose noise stream
    changed, e.g. another seed, whose old endpoints would no longer pair with the new noise.
    """
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as shard:
            if "x0" not in shard.keys():
                return False
            stored = shard.get_tensor("noise")
    except Exception:  # noqa: BLE001 - an unreadable shard is simply regenerated
        return False
    expected = noise.detach().to("cpu", stored.dtype)
    return stored.shape == expected.shape and torch.equal(stored, expected)


def _next_batch(batches: Iterator[Any], name: str, index: int) -> Any:
    try:
        return next(batches)
    except StopIteration:
        raise ValueError(f"{name} ran out at batch {index}; it must yield one entry per noise batch") from None


@dataclass(frozen=True)
class ReflowGeneration:
    """What ``generate_reflow_pairs`` did: shards generated now, shards kept, pairs in total."""

    generated_shards: int
    skipped_shards: int
    num_pairs: int
    manifest_path: Path


def generate_reflow_pairs(
    velocity_fn: Callable[..., torch.Tensor],
    noise_batches: Iterable[torch.Tensor],
    steps: int,
    cond_batches: Iterable[Cond | None] | None,
    out_dir: str | os.PathLike[str],
    *,
    cfg_scale: float = 1.0,
    uncond_batches: Iterable[Cond] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> ReflowGeneration:
    """Simulate ``velocity_fn`` from each noise batch and store (noise, endpoint, cond) shards.

    Args:
        velocity_fn: ``velocity_fn(z, flow_time, **cond)`` (see ``RectifiedFlowObjective.velocity_fn``).
        noise_batches: iterable of noise tensors (B, ...); shard i comes from the i-th batch.
            Make it deterministic (seeded) so a resumed generation pairs shards with the same noise.
        steps: Euler steps per simulation (``ReflowSchedule.simulation_steps``).
        cond_batches: iterable of keyword inputs per batch (nested dicts of tensors with
            batch dim B), or None for an unconditional model.
        out_dir: folder for ``pairs-NNNNN.safetensors`` and ``manifest.json``.
        cfg_scale, uncond_batches: classifier-free guidance during simulation.
        storage_dtype: dtype of the stored tensors (default: as produced).

    A readable shard on disk that was made from the same noise is kept and its batch is not
    simulated (any other file of that name is replaced); a manifest written with other ``steps`` or ``cfg_scale`` is refused (its pairs would come
    from a different flow). Only the main process should call this. Returns a ReflowGeneration.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    settings = {"sample_steps": int(steps), "cfg_scale": float(cfg_scale)}
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text(encoding="utf-8"))
        recorded = {key: previous.get(key) for key in settings}
        if recorded != settings:
            raise ConfigError(
                f"{out} holds reflow pairs made with {recorded}, not {settings}; delete that "
                "folder or point the run at a fresh one to regenerate the pairs."
            )

    cond_iter = iter(cond_batches) if cond_batches is not None else None
    uncond_iter = iter(uncond_batches) if uncond_batches is not None else None
    shards: list[dict[str, Any]] = []
    generated = skipped = 0
    for index, noise in enumerate(noise_batches):
        cond = dict(_next_batch(cond_iter, "cond_batches", index) or {}) if cond_iter is not None else {}
        uncond = _next_batch(uncond_iter, "uncond_batches", index) if uncond_iter is not None else None
        shard_path = out / _shard_name(index)
        if _shard_matches(shard_path, noise):
            skipped += 1
        else:
            states, _ = euler_flow_path(velocity_fn, noise, steps, cfg_scale=cfg_scale, cond=cond, uncond=uncond)
            tensors = {"noise": noise, "x0": states[-1], **_flatten_cond(cond)}
            tensors = {
                key: value.detach().to("cpu", storage_dtype or value.dtype).contiguous()
                for key, value in tensors.items()
            }
            metadata = {"format": MANIFEST_FORMAT, "index": str(index), **{
                key: str(value) for key, value in settings.items()
            }}
            write_file_atomically(shard_path, lambda temporary, tensors=tensors, metadata=metadata: save_file(
                tensors, str(temporary), metadata=metadata))
            generated += 1
        shards.append({"file": shard_path.name, "num_pairs": int(noise.shape[0])})
        _write_json_atomically(
            manifest_path,
            {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **settings, "complete": False, "shards": shards},
        )
    _write_json_atomically(
        manifest_path,
        {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, **settings, "complete": True, "shards": shards},
    )
    return ReflowGeneration(generated, skipped, sum(shard["num_pairs"] for shard in shards), manifest_path)


class ReflowPairDataset(torch.utils.data.Dataset):
    """Pairs written by ``generate_reflow_pairs``: item i is
    ``{"x0": endpoint (...), "noise": noise (...), "cond": nested dict of tensors}``.

    Rows are read lazily from the memory-mapped shards, so the set need not fit in memory.
    An unfinished generation is refused unless ``require_complete=False``.
    """

    def __init__(self, out_dir: str | os.PathLike[str], *, require_complete: bool = True) -> None:
        self.root = Path(out_dir)
        manifest_path = self.root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ConfigError(
                f"no reflow pairs in {self.root} ({MANIFEST_NAME} is missing); generate them "
                "with generate_reflow_pairs first."
            )
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ConfigError(f"{manifest_path} is not a reflow-pair manifest (format {manifest.get('format')!r}).")
        if require_complete and not manifest.get("complete"):
            raise ConfigError(
                f"reflow pair generation in {self.root} was interrupted; resume it (finished "
                "shards are kept) before training on the pairs."
            )
        self.sample_steps = int(manifest["sample_steps"])
        self.shard_paths = [self.root / shard["file"] for shard in manifest["shards"]]
        self._row_starts: list[int] = []
        total = 0
        for shard in manifest["shards"]:
            self._row_starts.append(total)
            total += int(shard["num_pairs"])
        self._length = total

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self._length <= index < self._length:
            raise IndexError(f"pair {index} out of range for {self._length} pairs")
        index %= self._length
        shard_index = bisect.bisect_right(self._row_starts, index) - 1
        row = index - self._row_starts[shard_index]
        with safe_open(str(self.shard_paths[shard_index]), framework="pt") as shard:
            values = {key: shard.get_slice(key)[row : row + 1][0] for key in shard.keys()}
        cond = _unflatten_cond({key: value for key, value in values.items() if key.startswith(_COND_PREFIX)})
        return {"x0": values["x0"], "noise": values["noise"], "cond": cond}


class FlowProbe(NamedTuple):
    """What one probe of the flow from fixed noise measures (see probe_flow)."""

    straightness: float
    one_step: torch.Tensor
    many_steps: torch.Tensor

    @property
    def distance(self) -> float:
        """Mean squared distance (over batch and elements) between the 1-step and the N-step
        samples: how much reflow has bought one-step sampling."""
        return float(((self.one_step.float() - self.many_steps.float()) ** 2).mean())


@torch.no_grad()
def probe_flow(
    velocity_fn: Callable[..., torch.Tensor],
    z_noise: torch.Tensor,
    steps: int,
    *,
    cfg_scale: float = 1.0,
    cond: Cond | None = None,
    uncond: Cond | None = None,
) -> FlowProbe:
    """Straightness and the 1-step and ``steps``-step Euler samples (each like ``z_noise``, (B, ...)).

    One ``steps``-step path gives both the straightness and the N-step sample, so the model is
    evaluated ``steps`` + 1 times. Straightness S (0 means perfectly straight) is the mean over the
    ``steps`` Euler evaluations of E||(z_noise - x_final) - v(z_s, s)||^2, where z_noise - x_final
    is the straight displacement per unit flow time (the path runs from the noise at s = 1 to
    x_final at s = 0) and ||.||^2 is averaged over elements, so values compare across resolutions
    (Liu et al. 2022 use the sum).
    """
    guided = {"cfg_scale": cfg_scale, "cond": cond, "uncond": uncond}
    states, velocities = euler_flow_path(velocity_fn, z_noise, steps, **guided)
    straight = (states[0] - states[-1]).float()
    one_step = euler_flow_path(velocity_fn, z_noise, 1, **guided)[0][-1]
    return FlowProbe(float(((velocities.float() - straight) ** 2).mean()), one_step, states[-1])


@dataclass(frozen=True)
class StagePosition:
    """Where a global epoch falls: stage 0 is the initial flow training, 1.. are reflow stages."""

    stage: int
    epoch_in_stage: int
    stage_start_epoch: int
    stage_epochs: int

    @property
    def is_reflow(self) -> bool:
        return self.stage > 0

    @property
    def needs_new_pairs(self) -> bool:
        """True on a reflow stage's first epoch: its pairs must exist before training on them."""
        return self.is_reflow and self.epoch_in_stage == 0


# Optimizer steps per reflow iteration below which reflow barely straightens the flow: on
# configs/quickstart_reflow.json two iterations of 1 step leave straightness 0.035, of 4 steps 0.013
# (README, "Rectified flow and reflow").
FEW_REFLOW_STEPS = 4


def reflow_effort_warning(reflow_steps: int, gen_batches: int, train_epochs: int, steps_per_iteration: int,
                          batch_size: int) -> Optional[str]:
    """One warning when each reflow iteration trains too few steps to straighten much (the seed's
    defaults, --reflow_gen_batches 1 --reflow_train_epochs 1, train one), naming the flags to raise."""
    if not reflow_steps or steps_per_iteration >= FEW_REFLOW_STEPS:
        return None
    return (f"warning: each reflow iteration trains {steps_per_iteration} optimizer step(s) on "
            f"{gen_batches * batch_size} generated pairs (reflow_gen_batches {gen_batches} x batch_size "
            f"{batch_size}, reflow_train_epochs {train_epochs}), too few to straighten the flow much. Raise "
            "--reflow_gen_batches (more pairs) and --reflow_train_epochs (more passes over them): "
            "configs/quickstart_reflow.json uses --reflow_gen_batches 16 --reflow_train_epochs 3 "
            "(the README's reflow section has the measurements).")


@dataclass(frozen=True)
class ReflowSchedule:
    """Epoch arithmetic of rectified-flow training with ``reflow_steps`` reflow stages.

    Stage 0 trains ``max_epochs`` epochs on data; each of stages 1..reflow_steps trains
    ``reflow_train_epochs`` epochs on ``samples_per_iteration`` freshly generated pairs.
    Field names follow the train.py flags.
    """

    max_epochs: int
    reflow_steps: int = 0
    reflow_train_epochs: int = 1
    reflow_sample_steps: int = 0
    sample_steps: int = 0
    reflow_gen_batches: int = 1
    batch_size: int = 1

    def __post_init__(self) -> None:
        for name in ("max_epochs", "reflow_steps", "reflow_sample_steps", "sample_steps"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"--{name} is {getattr(self, name)}; it must be 0 or more.")
        for name in ("reflow_gen_batches", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name} is {getattr(self, name)}; it must be at least 1.")
        if self.reflow_steps > 0 and self.reflow_train_epochs < 1:
            raise ConfigError(
                f"--reflow_train_epochs is {self.reflow_train_epochs}; each of the "
                f"{self.reflow_steps} reflow steps needs at least 1 epoch (or set --reflow_steps 0)."
            )

    @property
    def simulation_steps(self) -> int:
        """Euler steps per pair: reflow_sample_steps, else sample_steps, else 50."""
        return self.reflow_sample_steps or self.sample_steps or 50

    @property
    def samples_per_iteration(self) -> int:
        """Pairs generated per reflow stage: reflow_gen_batches * batch_size."""
        return self.reflow_gen_batches * self.batch_size

    @property
    def num_stages(self) -> int:
        return 1 + self.reflow_steps

    @property
    def total_epochs(self) -> int:
        return self.max_epochs + self.reflow_steps * self.reflow_train_epochs

    def stage_epochs(self, stage: int) -> int:
        if not 0 <= stage < self.num_stages:
            raise ValueError(f"stage {stage} outside 0..{self.num_stages - 1}")
        return self.max_epochs if stage == 0 else self.reflow_train_epochs

    def stage_start_epoch(self, stage: int) -> int:
        """Global epoch at which ``stage`` begins."""
        self.stage_epochs(stage)
        return 0 if stage == 0 else self.max_epochs + (stage - 1) * self.reflow_train_epochs

    def position(self, global_epoch: int) -> StagePosition:
        """Stage and epoch-within-stage of a 0-based ``global_epoch`` < total_epochs (for resume)."""
        if not 0 <= global_epoch < self.total_epochs:
            raise ValueError(f"epoch {global_epoch} outside the schedule's 0..{self.total_epochs - 1}")
        if global_epoch < self.max_epochs:
            stage = 0
        else:
            stage = 1 + (global_epoch - self.max_epochs) // self.reflow_train_epochs
        start = self.stage_start_epoch(stage)
        return StagePosition(stage, global_epoch - start, start, self.stage_epochs(stage))

    @staticmethod
    def pairs_dir(root: str | os.PathLike[str], stage: int) -> Path:
        """Folder holding the generated pairs of reflow ``stage`` (>= 1) under ``root``."""
        if stage < 1:
            raise ValueError("stage 0 trains on data and has no generated pairs")
        return Path(root) / f"reflow_stage_{stage:02d}"


# ---- the training loop's view: how long a run is, and what happens at stage boundaries ----------------

@dataclass(frozen=True)
class RunLength:
    """How long a run trains: stage 0 (max_steps, or max_epochs of the data), then the reflow stages."""

    steps_per_epoch: int
    stage0_steps: int
    total_steps: int
    schedule: ReflowSchedule
    reflow_warning: Optional[str] = None  # said once at the start (reflow_effort_warning)

    @property
    def max_epochs(self) -> int:
        return self.schedule.total_epochs

    def ends_stage0_mid_epoch(self, global_step: int, epoch: int) -> bool:
        """max_steps ended stage 0 inside an epoch: the epoch ends here and reflow begins."""
        return global_step == self.stage0_steps and bool(self.schedule.reflow_steps) and epoch < self.schedule.max_epochs

    def epoch_complete(self, batch_in_epoch: int, batches: int, global_step: int) -> bool:
        return batch_in_epoch >= batches or global_step == self.stage0_steps


def run_length(config: Any, micro_batches_per_epoch: int, processes: int) -> RunLength:
    """The RunLength of `config` when each process draws `micro_batches_per_epoch` per epoch."""
    if micro_batches_per_epoch == 0:
        raise ConfigError(f"batch_size {config.batch_size} x {processes} process(es) is larger than the "
                          "training set; lower batch_size or add data.")
    if config.reflow_steps and not config.rectified_flow:
        raise ConfigError("reflow_steps needs rectified_flow: reflow straightens a rectified flow. "
                          "Add --rectified_flow or set reflow_steps to 0.")
    accumulation = config.gradient_accumulation_steps
    steps_per_epoch = max(1, micro_batches_per_epoch // accumulation)
    stage0_steps = config.max_steps or steps_per_epoch * config.max_epochs
    stage0_epochs = math.ceil(stage0_steps / steps_per_epoch) if config.max_steps else config.max_epochs
    schedule = ReflowSchedule(max_epochs=stage0_epochs, reflow_steps=config.reflow_steps,
                              reflow_train_epochs=config.reflow_train_epochs,
                              reflow_sample_steps=config.reflow_sample_steps, sample_steps=config.sample_steps,
                              reflow_gen_batches=config.reflow_gen_batches, batch_size=config.batch_size)
    # Each reflow epoch trains on reflow_gen_batches batches of generated pairs, split over processes.
    reflow_steps_per_epoch = max(1, config.reflow_gen_batches // processes // accumulation)
    total_steps = stage0_steps + config.reflow_steps * config.reflow_train_epochs * reflow_steps_per_epoch
    warning = reflow_effort_warning(config.reflow_steps, config.reflow_gen_batches, config.reflow_train_epochs,
                                    reflow_steps_per_epoch * config.reflow_train_epochs, config.batch_size)
    return RunLength(steps_per_epoch, stage0_steps, total_steps, schedule, warning)


class ReflowStages:
    """Reflow around the training loop: before each epoch, point the task's flow at that epoch's
    data (the data set, or a stage's pairs, generated on the stage's first epoch); after the last
    epoch of each stage, measure how straight the flow has become.

    `states`: difftrain.sharding's model states (`evaluating` hands the main process the whole model).

    Each reflow stage also leaves a picture, samples/reflow_stage<k>-gs<step>.png: the flow probe's
    noise sampled in 1 step and in sample_inference_steps steps, by the model before the stage (drawn
    when the stage starts, kept beside its pairs so a resumed run still has it) and after it.
    """

    def __init__(self, flow: Any, schedule: ReflowSchedule, config: Any, accelerator: Any, states: Any,
                 evaluation: Callable[[], ContextManager[Any]] = nullcontext) -> None:
        self.flow, self.schedule, self.config = flow, schedule, config
        self.accelerator, self.states = accelerator, states
        # The weights that are the result (a schedule-free optimizer's average: optim.evaluation_weights)
        # generate the pairs and are measured, as they are sampled and exported.
        self.evaluation = evaluation
        self.outputs: Any = None  # the run's outputs, from enter_epoch: after_epoch saves each stage's picture there

    def enter_epoch(self, progress: Any, model: torch.nn.Module, outputs: Any) -> None:
        """Set progress.stage / epoch_in_stage and the training data of epoch `progress.epoch`.

        Pairs live under the log folder of the run that generated them; the path travels in the
        checkpoint, so a resumed run trains on the very same pairs instead of regenerating them.
        """
        self.outputs = outputs
        position = self.schedule.position(progress.epoch)
        progress.stage, progress.epoch_in_stage = position.stage, position.epoch_in_stage
        if position.stage == 0:
            self.flow.use_reflow_pairs(None)
            return
        if "reflow_root" not in progress.extra:
            progress.extra["reflow_root"] = str((outputs.log_folder or outputs.main_log_folder or
                                                 Path(self.config.logdir)) / "reflow")
        pairs_dir = ReflowSchedule.pairs_dir(progress.extra["reflow_root"], position.stage)
        if position.needs_new_pairs and progress.batch_in_epoch == 0:
            with self.evaluation(), self.states.evaluating(model) as whole:
                if whole is not None:
                    say(f"reflow {position.stage}/{self.schedule.reflow_steps}: generating "
                        f"{self.schedule.samples_per_iteration} pairs with {self.schedule.simulation_steps} Euler steps")
                    velocity = self.flow.flow_velocity_fn(whole)
                    self._keep_before_samples(velocity, pairs_dir)
                    noise, cond = self.flow.reflow_inputs(position.stage, self.config.reflow_gen_batches)
                    generate_reflow_pairs(velocity, noise, self.schedule.simulation_steps, cond, pairs_dir)
            self.accelerator.wait_for_everyone()
        self.flow.use_reflow_pairs(ReflowPairDataset(pairs_dir))

    def after_epoch(self, progress: Any, model: torch.nn.Module, tracker: Any) -> None:
        """At the end of each stage (progress.epoch just counted the finished epoch): straightness and
        1-step vs N-step distance on fixed noise, and (reflow stages) the before/after picture."""
        epoch = progress.epoch
        if not (epoch == self.schedule.total_epochs or self.schedule.position(epoch).epoch_in_stage == 0):
            return
        with self.evaluation(), self.states.evaluating(model) as whole:
            if whole is None:
                return
            velocity = self.flow.flow_velocity_fn(whole)
            noise, cond = self.flow.flow_probe()
            steps = self.config.sample_inference_steps
            probe = probe_flow(velocity, noise, steps, cond=cond)
            metrics = {"straightness": probe.straightness, "one_vs_n_step_distance": probe.distance,
                       "reflow_stage": progress.stage}
        tracker.log(metrics, step=progress.global_step)
        say(f"after stage {progress.stage}: straightness {metrics['straightness']:.4f}, "
            f"1-step vs {steps}-step distance {metrics['one_vs_n_step_distance']:.4f}")
        if progress.stage > 0 and self.outputs is not None:
            with drawing(f"the picture of reflow stage {progress.stage}"), torch.no_grad():
                picture = self._stage_picture(progress, (probe.one_step, probe.many_steps))
                self.outputs.save_samples({f"reflow_stage{progress.stage}": picture}, progress.global_step)

    # ---- the picture of each stage: 1 step beside N steps, before the stage above after it -------------
    def _keep_before_samples(self, velocity: Callable[..., torch.Tensor], pairs_dir: Path) -> None:
        """The probe sampled by the model the stage starts from, kept in the stage's folder."""
        with drawing(f"the samples before {pairs_dir.name}"):
            noise, cond = self.flow.flow_probe()
            steps = self.config.sample_inference_steps
            probe = probe_flow(velocity, noise, steps, cond=cond)
            pairs_dir.mkdir(parents=True, exist_ok=True)
            path = pairs_dir / BEFORE_SAMPLES_NAME
            tensors = {key: value.detach().cpu().contiguous()
                       for key, value in {"one_step": probe.one_step, "many_steps": probe.many_steps}.items()}
            write_file_atomically(path, lambda temporary: save_file(tensors, str(temporary),
                                                                   metadata={"steps": str(steps)}))

    def _stage_picture(self, progress: Any, after: tuple[torch.Tensor, torch.Tensor]) -> Any:
        from difftrain.sheets import labelled_sheet

        stage = progress.stage
        root = progress.extra.get("reflow_root")
        before = _read_samples(ReflowSchedule.pairs_dir(root, stage) / BEFORE_SAMPLES_NAME,
                               self.config.sample_inference_steps) if root else None
        batches = [*(before or ()), *after]
        pictures = self.flow.render_flow_states(batches)
        rows = [pictures[start:start + 2] for start in range(0, len(pictures), 2)]
        labels = ([f"before stage {stage}"] if before else []) + [f"after stage {stage}"]
        return labelled_sheet(rows, labels, ["1 step", f"{self.config.sample_inference_steps} steps"])



def _read_samples(path: Path, steps: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as stored:
        if stored.metadata().get("steps") != str(steps):
            return None
        return stored.get_tensor("one_step"), stored.get_tensor("many_steps")


__all__ = [
    "FlowProbe",
    "ReflowGeneration",
    "ReflowPairDataset",
    "ReflowSchedule",
    "ReflowStages",
    "RunLength",
    "StagePosition",
    "generate_reflow_pairs",
    "probe_flow",
    "run_length",
]
