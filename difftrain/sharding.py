"""The whole model when it is sharded: checkpoints, samples and exports under FSDP and DeepSpeed.

With data parallelism every process holds every weight, so the main process can write a
checkpoint, draw samples or export a LoRA from its own copy while the others wait. FSDP (version 2,
`fsdp_version: 2` in the accelerate config) and DeepSpeed ZeRO split the optimizer state across
the processes, and FSDP and ZeRO stage 3 the weights too: no process has a whole model, and a
forward pass is a collective that every process must join. The classes here hide the difference
from the training loop (`model_states` picks one):

- `whole_model(model, device)`: a context giving the main process a plain module with the whole
  trained weights (None on the others, under sharded weights). Where weights are sharded, every
  process joins one gather (torch.distributed.checkpoint's state-dict helpers for FSDP, ZeRO's
  GatheredParameters for stage 3), which the main process loads into `main_copy`, a plain copy of
  the task's module made before sharding and kept in CPU memory. Samples, validation and exports
  then run on the main process as they do unsharded, and the task code needs no branch.
- `optimizer_state`: what trainer_state.pt records of the optimizer. FSDP: the whole state keyed by
  parameter name (convertible to and from data parallel's numbered layout, so a run can move
  between the two). DeepSpeed: a pointer to DeepSpeed's own per-process files, which
  `stage_files` writes (every process its part) and the checkpoint folder takes in.
- `load`: the model and optimizer state of a checkpoint, back into the (sharded) training objects.

Megatron-LM and FSDP version 1 are refused at the start, with the fix.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from difftrain.checkpoint import OPTIMIZER, OPTIMIZER_BY_NAME, OPTIMIZER_ELSEWHERE
from difftrain.errors import ConfigError

DEEPSPEED_FOLDER = "deepspeed"
DEEPSPEED_TAG = "state"


def sharding_of(distributed_type: str, fsdp_version: Optional[int]) -> str:
    """'fsdp', 'deepspeed' or 'none' for an accelerate distributed type; ConfigError for the rest."""
    name = distributed_type.rsplit(".", 1)[-1].upper()
    if name == "MEGATRON_LM":
        raise ConfigError(
            "your accelerate config selects MEGATRON_LM (tensor/pipeline parallelism for transformers); "
            "difftrain shards diffusion models with FSDP or DeepSpeed ZeRO. Choose FSDP (fsdp_version 2) or "
            "DeepSpeed in `accelerate config`, or data parallel with `--multi_gpu` (see docs/scaling.md).")
    if name == "FSDP" and fsdp_version != 2:
        raise ConfigError(
            f"your accelerate config selects FSDP version {fsdp_version}; difftrain supports FSDP version 2 "
            "(fully_shard, the version PyTorch develops). Set `fsdp_version: 2` in the accelerate config "
            "file, or add `--fsdp_version 2` to `accelerate launch` (see docs/scaling.md).")
    return {"FSDP": "fsdp", "DEEPSPEED": "deepspeed"}.get(name, "none")


def sharding_kind(accelerator) -> str:
    """sharding_of for an Accelerator (its distributed type and FSDP plugin)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    return sharding_of(str(accelerator.distributed_type), getattr(plugin, "fsdp_version", None))


@contextmanager
def models_load_whole(accelerator) -> Iterator[None]:
    """Around the task's model loading. Under DeepSpeed ZeRO-3, transformers' from_pretrained
    partitions every model it loads (zero.Init: accelerate registers its DeepSpeed config with
    transformers whatever zero3_init_flag says), the frozen text encoders included, which then run
    outside DeepSpeed's engine with empty weights. Tasks load whole models; prepare partitions what
    trains."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def model_states(accelerator, module: nn.Module, config) -> "ReplicatedStates":
    """The whole-model access that fits the accelerator; `module` is the task's trainable module
    BEFORE accelerator.prepare (FSDP shards it in place)."""
    kind = sharding_kind(accelerator)
    if kind == "fsdp":
        return FSDPStates(accelerator, module)
    if kind == "deepspeed":
        return DeepSpeedStates(accelerator, module, config)
    return ReplicatedStates(accelerator)


def _state_dict_options(**flags: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**flags)


def _read_error(folder: Path, error: BaseException) -> ConfigError:
    detail = " ".join(str(error).split())
    detail = detail if len(detail) <= 300 else detail[:300] + " ..."
    return ConfigError(f"checkpoint '{folder}' cannot be resumed by this setup ({detail}).")


class ReplicatedStates:
    """Every process holds the whole model (one process, data parallel)."""

    description = ""  # said at the start when not empty

    def __init__(self, accelerator) -> None:
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process

    @contextmanager
    def whole_model(self, model: nn.Module, device: Optional[torch.device] = None) -> Iterator[Optional[nn.Module]]:
        """The whole trained module on the main process, on `device` if given; None on the others.

        Every process must enter it: under sharding the gather is a collective.
        """
        yield self.accelerator.unwrap_model(model) if self.is_main else None

    @contextmanager
    def evaluating(self, model: nn.Module, autocast: bool = True) -> Iterator[Optional[nn.Module]]:
        """`whole_model` on the accelerator's device, in eval mode, without gradients, under autocast
        unless told otherwise; back to train mode after. Every process must enter it."""
        model.eval()
        try:
            with self.whole_model(model, self.accelerator.device) as whole, torch.no_grad(), \
                    (self.accelerator.autocast() if autocast else nullcontext()):
                yield whole
        finally:
            model.train()

    def optimizer_state(self, model: nn.Module, optimizer) -> Optional[dict[str, Any]]:
        """{key: state} for trainer_state on the main process (None elsewhere); collective."""
        return {OPTIMIZER: optimizer.state_dict()} if self.is_main else None

    def stage_files(self, model: nn.Module, staging: Path) -> Optional[Path]:
        """Write files that every process contributes to a checkpoint (collective); their folder."""
        return None

    def load(self, model: nn.Module, optimizer, folder: Path, saved: dict[str, Any],
             read_into: Callable[[nn.Module], None], decide_on_main) -> None:
        """Restore a checkpoint's model (`read_into(module)` reads the task's files into a plain
        module) and optimizer state; every process calls it."""
        _refuse_deepspeed_state(saved, folder, "without DeepSpeed")
        module = self.accelerator.unwrap_model(model)
        read_into(module)
        if OPTIMIZER in saved:
            optimizer.load_state_dict(saved[OPTIMIZER])
        else:  # an FSDP checkpoint
            optimizer.load_state_dict(by_position(saved[OPTIMIZER_BY_NAME], parameter_names(module, optimizer)))


class FSDPStates(ReplicatedStates):
    """FSDP version 2: weights, gradients and optimizer state sharded (DTensor) over the processes."""

    def __init__(self, accelerator, module: nn.Module) -> None:
        super().__init__(accelerator)
        self.description = f"model and optimizer state sharded with FSDP over {accelerator.num_processes} processes"
        # On the main process only, in CPU memory: it costs one model's worth of RAM there, the
        # same as the full state dict a sharded save gathers anyway.
        self.main_copy = copy.deepcopy(module).to("cpu") if self.is_main else None

    @contextmanager
    def whole_model(self, model: nn.Module, device: Optional[torch.device] = None) -> Iterator[Optional[nn.Module]]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
        with _loaded_main_copy(self.main_copy, full, model.training, device) as whole:
            yield whole

    def optimizer_state(self, model: nn.Module, optimizer) -> Optional[dict[str, Any]]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, _inner(optimizer),
                                         options=_state_dict_options(full_state_dict=True, cpu_offload=True))
        return {OPTIMIZER_BY_NAME: state} if self.is_main else None

    def load(self, model: nn.Module, optimizer, folder: Path, saved: dict[str, Any],
             read_into: Callable[[nn.Module], None], decide_on_main) -> None:
        """The main process reads into its plain copy (through `decide_on_main`, so that a failure
        there reaches every process instead of leaving them waiting) and broadcasts each full
        tensor; every process keeps its shard."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        _refuse_deepspeed_state(saved, folder, "with FSDP")
        decide_on_main(lambda: read_into(self.main_copy))
        full = self.main_copy.state_dict() if self.is_main else {}
        set_model_state_dict(model, full, options=_state_dict_options(full_state_dict=True, broadcast_from_rank0=True))
        if OPTIMIZER_BY_NAME in saved:
            state = saved[OPTIMIZER_BY_NAME]
        else:  # a data-parallel checkpoint
            state = by_name(saved[OPTIMIZER], parameter_names(self.accelerator.unwrap_model(model), optimizer))
        set_optimizer_state_dict(model, _inner(optimizer), state, options=_state_dict_options(full_state_dict=True))


class DeepSpeedStates(ReplicatedStates):
    """DeepSpeed ZeRO: stage 1/2 shard the optimizer state (and gradients), stage 3 the weights too.

    The optimizer state stays in DeepSpeed's own files (one per process, written by
    engine.save_checkpoint), inside our checkpoint folder and under its manifest; they are read
    back with weights_only=True, allowing the three plain DeepSpeed classes they hold.
    """

    def __init__(self, accelerator, module: nn.Module, config) -> None:
        super().__init__(accelerator)
        plugin = accelerator.state.deepspeed_plugin
        self.stage = int(plugin.zero_stage or 0)
        self.description = (f"optimizer state sharded with DeepSpeed ZeRO stage {self.stage} over "
                            f"{accelerator.num_processes} processes")
        configure_deepspeed(plugin, config, accelerator.num_processes)
        self.main_copy = copy.deepcopy(module).to("cpu") if self.is_main and self.stage == 3 else None

    @contextmanager
    def whole_model(self, model: nn.Module, device: Optional[torch.device] = None) -> Iterator[Optional[nn.Module]]:
        if self.stage < 3:  # the weights are whole on every process
            with super().whole_model(model, device) as whole:
                yield whole
            return
        import deepspeed

        module = self.accelerator.unwrap_model(model)
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            full = {key: value.detach().cpu().clone() for key, value in module.state_dict().items()} \
                if self.is_main else {}
        with _loaded_main_copy(self.main_copy, full, model.training, device) as whole:
            yield whole

    def optimizer_state(self, model: nn.Module, optimizer) -> Optional[dict[str, Any]]:
        return {OPTIMIZER_ELSEWHERE: DEEPSPEED_FOLDER} if self.is_main else None

    def stage_files(self, model: nn.Module, staging: Path) -> Optional[Path]:
        # Frozen weights (a LoRA's base model) are not copied: the task's own files point to them.
        model.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False, exclude_frozen_parameters=True)
        self.accelerator.wait_for_everyone()  # every part written before the main process moves them
        return staging

    def load(self, model: nn.Module, optimizer, folder: Path, saved: dict[str, Any],
             read_into: Callable[[nn.Module], None], decide_on_main) -> None:
        if saved.get(OPTIMIZER_ELSEWHERE) != DEEPSPEED_FOLDER:
            raise ConfigError(f"checkpoint '{folder}' was saved without DeepSpeed; its optimizer state cannot "
                              "be split into ZeRO partitions. Resume it with the setup that saved it (data "
                              "parallel or FSDP), or start a new run from its weights.")
        # The task's files first (frozen base, LoRA pointer...), then DeepSpeed's: the trained
        # weights at full precision and each process's part of the optimizer state.
        if self.stage < 3:  # stage 3's weights are partitioned: DeepSpeed's files carry them
            read_into(self.accelerator.unwrap_model(model))
        model.checkpoint_engine = _weights_only_checkpoint_engine()
        try:
            loaded, _ = model.load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG,
                                              load_module_strict=False, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
        except (RuntimeError, KeyError, ValueError, OSError) as error:
            raise _read_error(folder, error) from None
        if loaded is None:
            raise ConfigError(f"checkpoint '{folder}' lacks DeepSpeed's files ({DEEPSPEED_FOLDER}/); it is "
                              "incomplete. Resume from another checkpoint.")


def configure_deepspeed(plugin, config, num_processes: int) -> None:
    """Fill what accelerate leaves to the data loaders (which difftrain does not hand it), and make
    DeepSpeed's settings agree with ours: one batch size, one accumulation, one clipping."""
    ds = plugin.deepspeed_config
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"your DeepSpeed config has a '{owned}' section; difftrain builds the {owned} "
                              f"from its own settings ({'optimizer, lr' if owned == 'optimizer' else 'lr_scheduler'}). "
                              f"Remove '{owned}' from the DeepSpeed config.")
    ours = {"train_micro_batch_size_per_gpu": config.batch_size,
            "gradient_accumulation_steps": config.gradient_accumulation_steps,
            "gradient_clipping": float(config.clip_grad_norm or 0.0)}
    for key, value in ours.items():
        theirs = ds.get(key, "auto")
        if theirs in ("auto", None):
            ds[key] = value
        elif float(theirs) != float(value):
            raise ConfigError(f"your DeepSpeed config sets {key} {theirs}, the difftrain config "
                              f"{value}; set it in one place (difftrain's config) and put \"auto\" in the "
                              "DeepSpeed config.")
    ds["train_batch_size"] = config.batch_size * config.gradient_accumulation_steps * num_processes


def _weights_only_checkpoint_engine():
    """DeepSpeed's torch checkpoint engine, reading with weights_only=True (its own reads unpickle
    anything) and allowing only the plain DeepSpeed classes its files hold."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def place_staged_files(staged: Optional[Path], folder: Path) -> None:
    """Move files from stage_files into a checkpoint folder being written."""
    if staged is not None:
        shutil.move(str(staged), str(folder / DEEPSPEED_FOLDER))


def _refuse_deepspeed_state(saved: dict[str, Any], folder: Path, how: str) -> None:
    if OPTIMIZER_ELSEWHERE in saved:
        raise ConfigError(f"checkpoint '{folder}' was saved by a DeepSpeed run; its optimizer state is in "
                          f"DeepSpeed's own files and cannot be resumed {how}. Resume it under DeepSpeed "
                          "(the same accelerate config).")


@contextmanager
def _loaded_main_copy(main_copy: Optional[nn.Module], full: dict[str, torch.Tensor], training: bool,
                      device: Optional[torch.device]) -> Iterator[Optional[nn.Module]]:
    if main_copy is None:  # not the main process
        yield None
        return
    main_copy.load_state_dict(full)
    main_copy.train(training)
    try:
        yield main_copy.to(device) if device is not None else main_copy
    finally:
        main_copy.to("cpu")  # give the accelerator's memory back to training


def _inner(optimizer):
    """The torch optimizer inside accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def parameter_names(module: nn.Module, optimizer) -> list[str]:
    """The name of each parameter the optimizer updates, in the optimizer's order."""
    # Names as torch.distributed.checkpoint writes them: without the prefixes that wrappers
    # (activation checkpointing, torch.compile, FSDP version 1) put into named_parameters.
    name_of = {id(parameter): _clean_name(name) for name, parameter in module.named_parameters()}
    return [name_of[id(parameter)] for group in _inner(optimizer).param_groups for parameter in group["params"]]


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """torch.optim's state_dict (parameters numbered in the optimizer's order) -> keyed by parameter
    name, the layout of torch.distributed.checkpoint's full optimizer state dict."""
    return {"state": {names[index]: value for index, value in state["state"].items()},
            "param_groups": [{**group, "params": [names[index] for index in group["params"]]}
                             for group in state["param_groups"]]}


def by_position(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of by_name, for torch.optim's load_state_dict."""
    position = {name: index for index, name in enumerate(names)}
    return {"state": {position[name]: value for name, value in state["state"].items()},
            "param_groups": [{**group, "params": [position[name] for name in group["params"]]}
                             for group in state["param_groups"]]}


WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
