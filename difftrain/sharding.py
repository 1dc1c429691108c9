"""The whole model when FSDP shards it: checkpoints, samples and exports under `accelerate` FSDP.

With data parallelism every process holds every weight, so the main process can write a
checkpoint, draw samples or export a LoRA from its own copy while the others wait. FSDP (version 2,
`fsdp_version: 2` in the accelerate config) splits each weight and its optimizer state across the
processes: no process has a whole model, and a forward pass is a collective that every process
must join. `ModelStates` hides the difference from the training loop:

- `whole_model(model, device)`: a context giving the main process a plain module with the whole
  trained weights (None on the others). Unsharded, that is the trained module itself. Sharded, every
  process joins one gather of the full state dict (torch.distributed.checkpoint's state-dict
  helpers), which the main process loads into `main_copy`, a plain copy of the task's module made
  before sharding and kept in CPU memory. Samples, validation and exports then run on the main
  process as they do unsharded, and the task code needs no FSDP branch.
- `optimizer_state` / `load_optimizer_state`: the optimizer's state as one file on the main process
  (keyed by parameter name when sharded, so it loads back into any number of processes' shards).
- `load_model`: the task reads its checkpoint into the main copy; the main process then sends each
  full tensor to the others, which keep their shards.

DeepSpeed, Megatron-LM and FSDP version 1 are refused at the start, with the fix.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from difftrain.errors import ConfigError

OPTIMIZER_BY_NAME = "optimizer_by_name"  # trainer_state key of a sharded run's optimizer state


def sharding_of(distributed_type: str, fsdp_version: Optional[int]) -> bool:
    """True for FSDP version 2 (shards), False for no sharding; ConfigError for what is not supported."""
    name = distributed_type.rsplit(".", 1)[-1].upper()
    if name in ("DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(
            f"your accelerate config selects {name}; difftrain shards through PyTorch FSDP instead. Choose "
            "FSDP with fsdp_version 2 in `accelerate config` (or `accelerate launch --use_fsdp --fsdp_version 2 "
            "...`), or data parallel with `--multi_gpu` (see docs/scaling.md).")
    if name == "FSDP" and fsdp_version != 2:
        raise ConfigError(
            f"your accelerate config selects FSDP version {fsdp_version}; difftrain supports FSDP version 2 "
            "(fully_shard, the version PyTorch develops). Set `fsdp_version: 2` in the accelerate config "
            "file, or add `--fsdp_version 2` to `accelerate launch` (see docs/scaling.md).")
    return name == "FSDP"


def _state_dict_options(**flags: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**flags)


class ModelStates:
    """Whole-model access for the training loop, the same calls with or without sharding."""

    def __init__(self, accelerator, module: nn.Module) -> None:
        """`module`: the task's trainable module, BEFORE accelerator.prepare shards it."""
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        self.accelerator = accelerator
        self.sharded = sharding_of(str(accelerator.distributed_type), getattr(plugin, "fsdp_version", None))
        self.is_main = accelerator.is_main_process
        # A plain copy on the main process only, in CPU memory (it costs one model's worth of RAM
        # there, the same as the full state dict a sharded save gathers anyway).
        self.main_copy: Optional[nn.Module] = None
        if self.sharded and self.is_main:
            self.main_copy = copy.deepcopy(module).to("cpu")

    @contextmanager
    def whole_model(self, model: nn.Module, device: Optional[torch.device] = None) -> Iterator[Optional[nn.Module]]:
        """The whole trained module on the main process, on `device` if given (None elsewhere).

        Every process must enter it (sharded, the gather is a collective). Unsharded, every process
        gets its own replica, so work that each replica may do (validation) still can.
        """
        if not self.sharded:
            yield self.accelerator.unwrap_model(model)
            return
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_state_dict_options(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            yield None
            return
        assert self.main_copy is not None
        self.main_copy.load_state_dict(full)
        del full
        was_training = model.training
        self.main_copy.train(was_training)
        try:
            yield self.main_copy.to(device) if device is not None else self.main_copy
        finally:
            self.main_copy.to("cpu")  # give the accelerator's memory back to training

    def optimizer_state(self, model: nn.Module, optimizer) -> Optional[dict[str, Any]]:
        """{key: state} to store in trainer_state on the main process (None elsewhere); collective."""
        if not self.sharded:
            return {"optimizer": optimizer.state_dict()} if self.is_main else None
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        state = get_optimizer_state_dict(model, _inner(optimizer),
                                         options=_state_dict_options(full_state_dict=True, cpu_offload=True))
        return {OPTIMIZER_BY_NAME: state} if self.is_main else None

    def load_optimizer_state(self, model: nn.Module, optimizer, saved: dict[str, Any]) -> None:
        """Restore what optimizer_state stored (every process reads the same trainer_state), also
        across the two layouts: a data-parallel run can go on under FSDP and the other way round."""
        names = parameter_names(self.accelerator.unwrap_model(model), optimizer)
        if not self.sharded:
            state = saved.get("optimizer") or by_position(saved[OPTIMIZER_BY_NAME], names)
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = saved.get(OPTIMIZER_BY_NAME) or by_name(saved["optimizer"], names)
        set_optimizer_state_dict(model, _inner(optimizer), state, options=_state_dict_options(full_state_dict=True))

    def load_model(self, model: nn.Module, read_into: Callable[[nn.Module], None], decide_on_main) -> None:
        """`read_into(module)` fills a plain module from a checkpoint folder.

        Unsharded, each process reads into its own replica. Sharded, the main process reads into
        its plain copy (through `decide_on_main`, so that a failure there reaches every process
        instead of leaving them waiting) and then broadcasts each full tensor; every process keeps
        its shard.
        """
        if not self.sharded:
            read_into(self.accelerator.unwrap_model(model))
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        decide_on_main(lambda: read_into(self.main_copy))
        full = self.main_copy.state_dict() if self.is_main else {}
        set_model_state_dict(model, full, options=_state_dict_options(full_state_dict=True,
                                                                      broadcast_from_rank0=True))


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
