"""Optimizers and learning-rate schedules built from a Config, under the names users write.

The names are TrainTrain's (its optimizer list and its 15 schedulers) plus any torch.optim class.
Each optimizer comes from a library made for it: torch.optim, pytorch-optimizer (D-Adaptation,
Prodigy, schedule-free, Lion, CAME, Tiger, Adam-mini), bitsandbytes (8-bit and paged: on CUDA, and
on the CPU from bitsandbytes 0.50) and transformers (Adafactor, the one TrainTrain uses). Only
EveryDream2's DoWG and AdaCoor are ours: no working package has them (difftrain/parameter_free.py).
Settings strings are TrainTrain's: `key=value` pairs separated by ';' or new lines, each value read
as a Python literal (`betas=(0.9,0.99)`, `eta_min=1e-6`, `milestones=[100,200]`), or as plain text
when it is not one (`mode=triangular2`).

Some optimizers set their own learning rate over time, so the run's schedule steps aside for them
(as in TrainTrain): the schedule-free ones (their averaged weights are the ones to evaluate and
save: see `evaluation_weights`), Adafactor with `relative_step=True`, and EveryDream2's DoWG and
AdaCoor (difftrain/parameter_free.py), which read no lr at all.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch import nn
from torch.optim import lr_scheduler as torch_schedulers

from difftrain.config import Config
from difftrain.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)


def parse_key_values(text: str, where: str) -> dict[str, Any]:
    """TrainTrain's settings string ('k=v;k=v', or one pair a line) -> {key: Python value}."""
    result: dict[str, Any] = {}
    for part in filter(None, (piece.strip() for piece in text.replace("\n", ";").split(";"))):
        key, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or not key.isidentifier():
            raise ConfigError(f"{where}: '{part}' is not of the form key=value (separate pairs with ';').")
        try:
            result[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if "=" in value:  # 'a=1 b=2': kohya separates pairs with spaces, TrainTrain does not
                raise ConfigError(f"{where}: '{part}' holds two settings; separate pairs with ';'.") from None
            result[key] = value
    return result


# ---- optimizers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer name: where its class lives and what the name itself implies."""

    name: str  # as TrainTrain's list spells it
    source: str  # "module:Class"
    package: str  # what `pip install` needs
    defaults: dict[str, Any] = field(default_factory=dict)  # the user's settings win over these
    fixed: dict[str, Any] = field(default_factory=dict)  # what the name means (SGDNesterov: nesterov)
    # "adaptive": finds its own step size, lr is a multiplier near 1; "schedule_free"; "adafactor";
    # "whole_model": takes a module instead of parameter groups (Adam-mini); "own_step": sets its own
    # step size and reads no lr (DoWG, AdaCoor).
    kind: str = "plain"


_PO, _BNB, _NESTEROV = "pytorch-optimizer", "bitsandbytes", {"momentum": 0.9}


def _spec(name: str, source: str, package: str, **extra: Any) -> OptimizerSpec:
    return OptimizerSpec(name, source, package, **extra)


OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name.lower(): spec for spec in (
    _spec("AdamW", "torch.optim:AdamW", "torch"),
    _spec("Adam", "torch.optim:Adam", "torch"),
    _spec("SGDNesterov", "torch.optim:SGD", "torch", defaults=_NESTEROV, fixed={"nesterov": True}),
    # TrainTrain turns relative_step on unless told otherwise: Adafactor then picks its own step size.
    _spec("AdaFactor", "transformers.optimization:Adafactor", "transformers",
          defaults={"relative_step": True}, kind="adafactor"),
    _spec("Lion", "pytorch_optimizer:Lion", _PO),
    _spec("Prodigy", "pytorch_optimizer:Prodigy", _PO, kind="adaptive"),
    _spec("DAdaptAdam", "pytorch_optimizer:DAdaptAdam", _PO, kind="adaptive"),
    _spec("DAdaptLion", "pytorch_optimizer:DAdaptLion", _PO, kind="adaptive"),
    _spec("DAdaptAdaGrad", "pytorch_optimizer:DAdaptAdaGrad", _PO, kind="adaptive"),
    _spec("DAdaptAdan", "pytorch_optimizer:DAdaptAdan", _PO, kind="adaptive"),
    _spec("DAdaptSGD", "pytorch_optimizer:DAdaptSGD", _PO, kind="adaptive"),
    _spec("Adam8bit", "bitsandbytes.optim:Adam8bit", _BNB),
    _spec("AdamW8bit", "bitsandbytes.optim:AdamW8bit", _BNB),
    _spec("SGDNesterov8bit", "bitsandbytes.optim:SGD8bit", _BNB, defaults=_NESTEROV,
          fixed={"nesterov": True}),
    _spec("Lion8bit", "bitsandbytes.optim:Lion8bit", _BNB),
    _spec("PagedAdamW8bit", "bitsandbytes.optim:PagedAdamW8bit", _BNB),
    _spec("PagedLion8bit", "bitsandbytes.optim:PagedLion8bit", _BNB),
    _spec("PagedAdamW", "bitsandbytes.optim:PagedAdamW", _BNB),
    _spec("PagedAdamW32bit", "bitsandbytes.optim:PagedAdamW32bit", _BNB),
    _spec("RAdamScheduleFree", "pytorch_optimizer:ScheduleFreeRAdam", _PO, kind="schedule_free"),
    _spec("AdamWScheduleFree", "pytorch_optimizer:ScheduleFreeAdamW", _PO, kind="schedule_free"),
    _spec("SGDScheduleFree", "pytorch_optimizer:ScheduleFreeSGD", _PO, kind="schedule_free"),
    _spec("CAME", "pytorch_optimizer:CAME", _PO),
    _spec("Tiger", "pytorch_optimizer:Tiger", _PO),
    _spec("AdamMini", "pytorch_optimizer:AdamMini", _PO, kind="whole_model"),
    # EveryDream2's coordinate_dowg, scalar_dowg and adacoor (difftrain/parameter_free.py says why ours)
    _spec("ScalarDoWG", "difftrain.parameter_free:ScalarDoWG", "difftrain", kind="own_step"),
    _spec("CoordinateDoWG", "difftrain.parameter_free:CoordinateDoWG", "difftrain", kind="own_step"),
    _spec("AdaCoor", "difftrain.parameter_free:AdaCoor", "difftrain", kind="own_step"),
)}
OPTIMIZER_ALIASES = {"adamw_8bit": "adamw8bit"}  # bitsandbytes' own spelling

# TrainTrain builds D-Adaptation, Prodigy and Lion from dadaptation, prodigyopt and lion-pytorch,
# so its users' settings strings use those packages' spellings; pytorch-optimizer names them so:
RENAMED_SETTINGS = {"decouple": "weight_decouple", "use_bias_correction": "bias_correction"}
# ... and these of theirs change nothing here (logging, kernels, memory layout):
NO_EFFECT_SETTINGS = {"log_every": "printing", "fsdp_in_use": "FSDP bookkeeping",
                      "slice_p": "memory use", "use_triton": "the kernel used"}


def find_optimizer(name: str) -> OptimizerSpec:
    """A name from TrainTrain's list (any case) or any torch.optim class -> its spec."""
    key = OPTIMIZER_ALIASES.get(name.lower(), name.lower())
    if key in OPTIMIZERS:
        return OPTIMIZERS[key]
    for attr in dir(torch.optim):
        candidate = getattr(torch.optim, attr)
        if attr.lower() == key and isinstance(candidate, type) and issubclass(candidate, torch.optim.Optimizer):
            return OptimizerSpec(attr, f"torch.optim:{attr}", "torch")
    names = [spec.name for spec in OPTIMIZERS.values()]
    raise ConfigError(f"optimizer '{name}' is unknown.{did_you_mean(name, names)} Use one of "
                      f"{', '.join(names)}, or another torch.optim class name.")


def _optimizer_class(spec: OptimizerSpec) -> type:
    module_name, class_name = spec.source.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        when = "; without a CUDA GPU, version 0.50 or later" if spec.package == _BNB else ""
        raise ConfigError(f"optimizer '{spec.name}' needs the {spec.package} package; install it "
                          f"(pip install {spec.package}{when}) or choose another optimizer.") from None
    if not hasattr(module, class_name):
        raise ConfigError(f"optimizer '{spec.name}': the installed {spec.package} has no {class_name}; "
                          f"upgrade it (pip install -U {spec.package}).")
    if spec.package == _BNB and not torch.cuda.is_available():
        _check_bitsandbytes_on_cpu(spec)
    return getattr(module, class_name)


BITSANDBYTES_CPU_SINCE = (0, 50)  # its CPU optimizer kernels came in 0.50.0 (bitsandbytes PR #1901)


def _check_bitsandbytes_on_cpu(spec: OptimizerSpec) -> None:
    import bitsandbytes

    version = bitsandbytes.__version__
    if tuple(int(part) for part in re.findall(r"\d+", version)[:2]) < BITSANDBYTES_CPU_SINCE:
        plain = spec.name.replace("Paged", "").replace("8bit", "").replace("32bit", "")
        raise ConfigError(f"optimizer '{spec.name}': bitsandbytes {version} runs its 8-bit and paged optimizers "
                          "on CUDA only, and this machine has no CUDA device. bitsandbytes 0.50 or later also "
                          f"runs them on the CPU (pip install -U bitsandbytes); or use '{plain}'.")
    if spec.name.startswith("Paged"):
        logger.info("%s: paging moves optimizer state between GPU and CPU memory; without CUDA it has no "
                    "effect (bitsandbytes runs the same optimizer unpaged).", spec.name)


def _settings_of(function: Any, skip: tuple[str, ...]) -> list[str]:
    """The keyword arguments a class or function names (not **kwargs, which would swallow typos)."""
    parameters = inspect.signature(function).parameters.values()
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.name not in skip]


def _optimizer_settings(config: Config, spec: OptimizerSpec, optimizer_class: type) -> dict[str, Any]:
    text = config.optimizer_settings
    given = parse_key_values(text, "optimizer_settings")
    allowed = _settings_of(optimizer_class.__init__, ("self", "params", "model", "lr"))
    settings = dict(spec.defaults)
    for key, value in given.items():
        if spec.package == _PO and key in NO_EFFECT_SETTINGS:
            logger.info("optimizer_settings: '%s' has no effect here (it only changes %s in the package "
                        "TrainTrain used).", key, NO_EFFECT_SETTINGS[key])
            continue
        key = RENAMED_SETTINGS.get(key, key) if spec.package == _PO else key
        if key not in allowed:
            hint = " Set the learning rate with lr (train_learning_rate)." if key == "lr" else \
                did_you_mean(key, allowed)
            raise ConfigError(f"optimizer_settings '{text}': {spec.name} has no setting '{key}'.{hint} "
                              f"Its settings: {', '.join(allowed)}.")
        if key in spec.fixed and value != spec.fixed[key]:
            raise ConfigError(f"optimizer_settings '{text}': {spec.name} means {key}={spec.fixed[key]}; "
                              "choose another optimizer for a different value.")
        settings[key] = value
    settings.update(spec.fixed)
    if config.weight_decay is not None:
        if "weight_decay" in allowed:
            settings.setdefault("weight_decay", config.weight_decay)
        else:
            logger.info("weight_decay has no effect: %s has no weight decay.", spec.name)
    return settings


def make_optimizer(config: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer config.optimizer names, over parameter groups [{"params": [...], "lr"?: ...}].

    The text encoders' groups (`is_text_encoder_group`) are built from `text_encoder_config`: when
    that asks for another optimizer, settings or weight decay than the UNet's, they get an optimizer
    of their own and both step as one OptimizerPair (as EveryDream2 builds one for each model).
    """
    text_config = text_encoder_config(config)
    roles = is_text_encoder_group(groups)
    unet_groups = [group for group, is_text in zip(groups, roles) if not is_text]
    text_groups = [group for group, is_text in zip(groups, roles) if is_text]
    if not unet_groups:  # the text encoder trains alone
        return _make_one(text_config, groups)
    own = config.text_encoder_own_optimizer and find_optimizer(config.optimizer).kind in SHARED_STEP_SIZE
    if not text_groups or (_same_optimizer(config, text_config) and not own):
        return _make_one(config, groups)
    pair = OptimizerPair(_make_one(config, unet_groups), _make_one(text_config, text_groups))
    for optimizer, settings in zip(pair.optimizers, (config, text_config)):
        if is_schedule_free(optimizer) or optimizer.param_groups[0].get("relative_step"):
            raise ConfigError(f"optimizer '{settings.optimizer}' sets its own learning rate over time, so it "
                              "cannot run beside a second optimizer under one schedule; give the text encoder "
                              "the same optimizer, settings and weight decay as the UNet, or choose another.")
    return pair


# Kinds whose step size adapts over all of an optimizer's parameters together: one optimizer for the
# UNet and the text encoder trains otherwise than one for each (text_encoder_own_optimizer).
SHARED_STEP_SIZE = ("adaptive", "own_step")


def is_text_encoder_group(groups: list[dict[str, Any]]) -> list[bool]:
    """For each parameter group, whether it holds text-encoder parameters: named by its "module" entry
    (SD tasks); in groups without names, every group after the first."""
    if any("module" in group for group in groups):
        return [group.get("module") == "text_encoder" for group in groups]
    return [index > 0 for index in range(len(groups))]


def logged_learning_rates(scheduler: Any, optimizer: Any) -> dict[str, float]:
    """The step's learning rates as logged: `lr` (the UNet's, or the one group's) and, when text
    encoders train in groups of their own, `lr_text_encoder` (EveryDream2's "lr text encoder")."""
    rates = scheduler.get_last_lr()
    groups = optimizer.param_groups
    text = is_text_encoder_group(groups) if len(groups) == len(rates) and len(rates) > 1 else [False] * len(rates)
    others = [rate for rate, is_text in zip(rates, text) if not is_text]
    logged = {"lr": (others or rates)[0]}
    text_rates = [rate for rate, is_text in zip(rates, text) if is_text]
    if text_rates:
        logged["lr_text_encoder"] = text_rates[0]
    return logged


def clip_gradients(accelerator: Any, model: nn.Module, optimizer: Any, max_norm: float, per_model: bool) -> None:
    """Clip before the optimizer step: one norm over the whole model, or with `per_model` one norm per
    model the parameter groups name ("module": the UNet, the text encoders), as EveryDream2 clips each
    of its two optimizers' parameters. Sharded runs clip as a whole: FSDP and DeepSpeed compute the
    norm over shards themselves and take no subsets."""
    from accelerate.utils import DistributedType

    if not per_model or accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        accelerator.clip_grad_norm_(model.parameters(), max_norm)
        return
    accelerator.unscale_gradients()  # once: a mixed-precision scaler may unscale each optimizer only once a step
    for parameters in parameters_by_model(optimizer.param_groups).values():
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)


def parameters_by_model(groups: list[dict[str, Any]]) -> dict[str, list[nn.Parameter]]:
    """The groups' parameters gathered by the model their "module" entry names (unnamed: "model")."""
    gathered: dict[str, list[nn.Parameter]] = {}
    for group in groups:
        gathered.setdefault(group.get("module", "model"), []).extend(group["params"])
    return gathered


def text_encoder_config(config: Config) -> Config:
    """The settings the text encoders' optimizer is built from: the UNet's, with text_encoder_* over them."""
    update: dict[str, Any] = {"optimizer": config.text_encoder_optimizer or config.optimizer}
    if config.text_encoder_optimizer_settings is not None:
        update["optimizer_settings"] = config.text_encoder_optimizer_settings
    if config.text_encoder_weight_decay is not None:
        update["weight_decay"] = config.text_encoder_weight_decay
    return config.model_copy(update=update)


def _same_optimizer(config: Config, other: Config) -> bool:
    return (find_optimizer(config.optimizer).name == find_optimizer(other.optimizer).name
            and parse_key_values(config.optimizer_settings, "optimizer_settings")
            == parse_key_values(other.optimizer_settings, "text_encoder_optimizer_settings")
            and config.weight_decay == other.weight_decay)


class OptimizerPair(torch.optim.Optimizer):
    """The UNet's optimizer and the text encoders', stepped as one optimizer.

    Its param_groups are the two optimizers' own group dicts (UNet's first), so one LR schedule with
    a multiplier per group, accelerate and the gradient scaler reach every parameter through it. Its
    state dict holds each optimizer's own state dict, so a resume restores both exactly. Sharded
    states (FSDP, DeepSpeed) are not supported: `check_unsharded`.
    """

    KEYS = ("unet", "text_encoders")

    def __init__(self, unet: torch.optim.Optimizer, text_encoders: torch.optim.Optimizer) -> None:
        self.optimizers = (unet, text_encoders)
        super().__init__([*unet.param_groups, *text_encoders.param_groups], defaults={})
        self._share_groups()

    def _share_groups(self) -> None:
        # load_state_dict gives each optimizer new group dicts; the pair must hold those very dicts,
        # or the schedule would set learning rates the optimizers never read.
        self.param_groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {key: optimizer.state_dict() for key, optimizer in zip(self.KEYS, self.optimizers)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != set(self.KEYS):
            raise ValueError("the saved optimizer state is one optimizer's, and this run trains the text "
                             "encoder with an optimizer of its own (text_encoder_optimizer and the like)")
        for key, optimizer in zip(self.KEYS, self.optimizers):
            optimizer.load_state_dict(state_dict[key])
        self._share_groups()

    @staticmethod
    def check_unsharded(optimizer: Any, sharding: str) -> None:
        """A ConfigError when `optimizer` is a pair and the run shards its state (`sharding` not empty)."""
        if isinstance(optimizer, OptimizerPair) and sharding:
            raise ConfigError(f"the text encoder's own optimizer (text_encoder_optimizer, ..._settings, "
                              f"..._weight_decay, ..._own_optimizer) cannot be used with {sharding}; give the "
                              "text encoder the UNet's optimizer settings and set text_encoder_own_optimizer "
                              "false, or train without sharding.")


def _make_one(config: Config, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    spec = find_optimizer(config.optimizer)
    optimizer_class = _optimizer_class(spec)
    settings = _optimizer_settings(config, spec, optimizer_class)
    groups = [dict(group) for group in groups]
    lr: Optional[float] = config.lr
    if spec.kind == "adafactor" and settings.get("relative_step"):
        # Adafactor then computes its own step size and refuses an lr, per group too.
        logger.info("AdaFactor with relative_step=True chooses its own learning rate: lr and the text "
                    "encoder's lr have no effect (relative_step=False uses them).")
        lr = None
        for group in groups:
            group.pop("lr", None)
    if spec.kind == "own_step":
        logger.info("%s sets its own step size: lr and the learning-rate schedule have no effect on it.",
                    spec.name)
    if spec.kind == "adaptive" and max(group.get("lr", config.lr) for group in groups) <= 0.1:
        logger.info("%s scales its own step size: lr multiplies it and is usually about 1.0, not %g.",
                    spec.name, config.lr)
    try:
        if spec.kind == "whole_model":
            return _whole_model_optimizer(optimizer_class, groups, config.lr, settings)
        return optimizer_class(groups, lr=lr, **settings)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"optimizer_settings '{config.optimizer_settings}' do not fit {spec.name}: "
                          f"{error}.") from None


def _whole_model_optimizer(optimizer_class: type, groups: list[dict[str, Any]], lr: float,
                           settings: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam-mini partitions a module's named parameters itself. It gets a module holding exactly the
    trainable tensors (the same objects, one list per group), so it treats each tensor as one block
    (its per-head and embedding rules need a transformer's own names), and per-group lrs are restored."""
    holder = nn.Module()
    for index, group in enumerate(groups):
        holder.add_module(f"group{index}", nn.ParameterList(group["params"]))
    optimizer = optimizer_class(holder, lr=lr, **settings)
    lr_of = {id(p): group.get("lr", lr) for group in groups for p in group["params"]}
    for group in optimizer.param_groups:
        group["lr"] = lr_of[id(group["params"][0])]
    return optimizer


def is_schedule_free(optimizer: Any) -> bool:
    """A schedule-free optimizer (wrapped by accelerate or not): it keeps training and averaged weights."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return callable(getattr(inner, "eval", None)) and "train_mode" in inner.param_groups[0]


@contextmanager
def evaluation_weights(optimizer: Any) -> Iterator[None]:
    """Inside: the model holds the weights to evaluate and save. A schedule-free optimizer trains one
    sequence of weights and averages another; the average is the result, so sampling, validation and
    exports must happen inside this block. Other optimizers: nothing changes."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if not is_schedule_free(inner):
        yield
        return
    inner.eval()
    try:
        yield
    finally:
        inner.train()


# ---- learning-rate schedules --------------------------------------------------------------------
# TrainTrain's schedulers built from torch.optim.lr_scheduler, with TrainTrain's defaults for what a
# user leaves out ("run" is filled with the run's length in schedule units).
TORCH_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "cosine_annealing": ("CosineAnnealingLR", {"T_max": "run"}),
    "cosine_annealing_with_restarts": ("CosineAnnealingWarmRestarts", {"T_0": 10}),
    "exponential": ("ExponentialLR", {"gamma": 0.9}),
    "step": ("StepLR", {"step_size": 10}),
    "multi_step": ("MultiStepLR", {"milestones": [30, 60, 90]}),
    "reduce_on_plateau": ("ReduceLROnPlateau", {"mode": "min"}),
    "cyclic": ("CyclicLR", {"base_lr": 1e-5, "max_lr": 1e-3, "mode": "triangular"}),
    "one_cycle": ("OneCycleLR", {"max_lr": 1e-3, "total_steps": "run"}),
}
# diffusers' get_scheduler names, and the one setting each takes from lr_scheduler_settings.
DIFFUSERS_SCHEDULERS: dict[str, Optional[str]] = {
    "linear": None, "cosine": None, "cosine_with_restarts": "num_cycles", "polynomial": "power",
    "constant": None, "constant_with_warmup": None, "piecewise_constant": "step_rules",
}
SCHEDULERS = [*DIFFUSERS_SCHEDULERS, *TORCH_SCHEDULERS]
_USES_WARMUP = {"linear", "cosine", "cosine_with_restarts", "polynomial", "constant_with_warmup"}


class TrainingLossPlateau(torch_schedulers.ReduceLROnPlateau):
    """ReduceLROnPlateau on the training loss: the loop calls step(loss) (`wants_loss`).
    (TrainTrain called step() with no value, which torch refuses.)"""

    wants_loss = True
    _warned = False

    def step(self, metrics: Any = None, epoch: Any = None) -> None:  # type: ignore[override]
        if metrics is None:
            if not self._warned:
                logger.warning("reduce_on_plateau: the training loop passed no loss value, so the "
                               "learning rate stays where it is.")
                self._warned = True
            return
        super().step(float(metrics))


def step_schedule(scheduler: Any, loss_value: Optional[float]) -> None:
    """One step of the learning-rate schedule. reduce_on_plateau (TrainingLossPlateau, `wants_loss`)
    steps on the training loss, the value all processes agreed on; every other schedule on time."""
    if isinstance(scheduler, TrainingLossPlateau) and scheduler.wants_loss:
        scheduler.step(loss_value)
    else:
        scheduler.step()


class OptimizerOwnLR(torch_schedulers.LambdaLR):
    """The schedule of an optimizer that sets its own learning rate: reports it, changes nothing.
    Adafactor's relative step is read from its state (transformers' AdafactorSchedule reads it only
    while gradients exist, and our loop clears them before the schedule steps)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.adafactor = bool(optimizer.param_groups[0].get("relative_step"))
        if self.adafactor:  # its groups hold lr=None; the reported value starts at 0
            for group in optimizer.param_groups:
                group["initial_lr"] = 0.0
        super().__init__(optimizer, lambda _: 1.0)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        if not self.adafactor:
            return list(self.base_lrs)
        optimizer: Any = self.optimizer
        states = [optimizer.state[group["params"][0]] for group in optimizer.param_groups]
        return [float(optimizer._get_lr(group, state)) if "step" in state else 0.0
                for group, state in zip(optimizer.param_groups, states)]


def parse_step_rules(rules: str) -> list[tuple[float, int]]:
    """kohya/diffusers step rules 'f1:s1,f2:s2,...,f_last' -> [(f1, s1), ..., (f_last, inf)].
    lr x f1 before step s1, x f2 before step s2 (s are absolute step numbers), x f_last after."""
    example = "write 'factor:step,...,factor', e.g. '1:100,0.5:200,0.1' (x1 before step 100, x0.5 " \
              "before step 200, x0.1 after)"
    *bounded, last = [piece.strip() for piece in rules.split(",")]
    result: list[tuple[float, int]] = []
    try:
        for piece in bounded:
            factor, step = piece.split(":")
            result.append((float(factor), int(step)))
        result.append((float(last), math.inf))  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(f"lr_step_rules '{rules}' (train_lr_step_rules) is not valid: {example}.") from None
    if any(b[1] <= a[1] for a, b in zip(result, result[1:])):
        raise ConfigError(f"lr_step_rules '{rules}': the steps must increase; {example}.")
    return result


def make_scheduler(config: Config, optimizer: torch.optim.Optimizer, total_units: int,
                   warmup_fraction: float = 0.0):
    """The learning-rate schedule config.lr_scheduler names. A unit is an optimizer step or an
    epoch (scheduler_interval); total_units is the run's length in those units. `warmup_fraction`:
    the task's warm-up when lr_warmup_steps is unset, as a fraction of the decay (TaskDefaults)."""
    decay = config.lr_decay_steps or total_units
    warmup = config.lr_warmup_steps
    if warmup is None:
        warmup = int(warmup_fraction * decay)
    name, settings = config.lr_scheduler, parse_key_values(config.lr_scheduler_settings, "lr_scheduler_settings")
    if getattr(optimizer, "param_groups", None) and (
            is_schedule_free(optimizer) or optimizer.param_groups[0].get("relative_step")
            or getattr(optimizer, "sets_own_step_size", False)):
        used = {"lr_scheduler": name != "constant", "lr_scheduler_settings": bool(settings),
                "lr_warmup_steps": warmup > 0, "lr_step_rules": bool(config.lr_step_rules)}
        for key in (key for key, set_ in used.items() if set_):
            logger.info("%s has no effect: %s sets its own learning rate over time.", key,
                        type(optimizer).__name__)
        return OptimizerOwnLR(optimizer)
    if config.lr_step_rules and name != "piecewise_constant":
        logger.info("lr_step_rules has no effect: only lr_scheduler 'piecewise_constant' reads it.")
    if warmup and name not in _USES_WARMUP:
        logger.info("lr_warmup_steps has no effect: lr_scheduler '%s' has no warm-up.", name)
    unet = (name, warmup, decay)
    text = (config.text_encoder_lr_scheduler or name,
            warmup if config.text_encoder_lr_warmup_steps is None else config.text_encoder_lr_warmup_steps,
            config.text_encoder_lr_decay_steps or decay)
    schedules = [text if is_text else unet for is_text in is_text_encoder_group(optimizer.param_groups)]
    if set(schedules) != {unet}:
        if name in TORCH_SCHEDULERS:
            raise ConfigError(f"the text encoder's own schedule ('{text[0]}', {text[1]} warm-up steps, decay over "
                              f"{text[2]}) needs lr_scheduler to be one of diffusers' schedules too, not "
                              f"'{name}'; change one of them.")
        return _per_group_schedule(config, optimizer, settings, schedules)
    if name in TORCH_SCHEDULERS:
        return _torch_scheduler(config, optimizer, settings, decay)
    return _diffusers_scheduler(config, optimizer, settings, warmup, decay)


def _per_group_schedule(config: Config, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                        schedules: list[tuple[str, int, int]]) -> torch_schedulers.LambdaLR:
    """EveryDream2's text-encoder schedule: each group follows its (schedule name, warm-up, decay),
    the UNet's or the text encoders'; one LambdaLR holds a multiplier per group."""
    def multiplier(name: str, warmup: int, decay: int):
        probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        schedule = _diffusers_scheduler(config.model_copy(update={"lr_scheduler": name}), probe, settings,
                                        warmup, decay)
        return schedule.lr_lambdas[0]

    return torch_schedulers.LambdaLR(optimizer, [multiplier(*schedule) for schedule in schedules])


def _torch_scheduler(config: Config, optimizer: torch.optim.Optimizer, settings: dict[str, Any], run: int):
    name = config.lr_scheduler
    class_name, defaults = TORCH_SCHEDULERS[name]
    scheduler_class = TrainingLossPlateau if name == "reduce_on_plateau" else getattr(torch_schedulers, class_name)
    allowed = _settings_of(getattr(torch_schedulers, class_name).__init__,
                           ("self", "optimizer", "last_epoch", "verbose", "scale_fn"))
    for key in settings:
        if key not in allowed:
            raise ConfigError(f"lr_scheduler_settings '{config.lr_scheduler_settings}': '{key}' is not a "
                              f"setting of {name}.{did_you_mean(key, allowed)} Its settings: {', '.join(allowed)}.")
    arguments = {key: run if value == "run" else value for key, value in defaults.items()} | settings
    for key in ("max_lr", "base_lr"):
        if key in arguments and key not in settings:
            logger.info("%s uses %s=%g (TrainTrain's default), not lr; set %s in lr_scheduler_settings "
                        "to change it.", name, key, arguments[key], key)
    try:
        return scheduler_class(optimizer, **arguments)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"lr_scheduler_settings '{config.lr_scheduler_settings}' do not fit {name} "
                          f"({class_name}): {error}.") from None


def _diffusers_scheduler(config: Config, optimizer: torch.optim.Optimizer, settings: dict[str, Any],
                         warmup: int, decay: int):
    from diffusers.optimization import get_scheduler

    name, takes = config.lr_scheduler, DIFFUSERS_SCHEDULERS[config.lr_scheduler]
    known = {key for key in DIFFUSERS_SCHEDULERS.values() if key}
    for key in settings:
        if key not in known:
            raise ConfigError(f"lr_scheduler_settings '{config.lr_scheduler_settings}': '{key}' is not a "
                              f"setting of {name}.{did_you_mean(key, sorted(known))} "
                              f"{name} takes {takes or 'no settings'}.")
        if key != takes:
            logger.info("lr_scheduler_settings: '%s' has no effect with lr_scheduler '%s'.", key, name)
    step_rules = str(settings.get("step_rules", config.lr_step_rules))
    if name == "piecewise_constant":
        if not step_rules:
            raise ConfigError("lr_scheduler 'piecewise_constant' needs lr_step_rules (train_lr_step_rules), "
                              "e.g. '1:100,0.5:200,0.1'.")
        parse_step_rules(step_rules)
    return get_scheduler(name, optimizer, step_rules=step_rules or None, num_warmup_steps=warmup,
                         num_training_steps=decay,
                         num_cycles=int(settings.get("num_cycles", config.lr_num_cycles)),
                         power=float(settings.get("power", config.lr_power)))
