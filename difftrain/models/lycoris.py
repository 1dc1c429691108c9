"""LoHa adapters through the LyCORIS library (TrainTrain's network_type 'loha').

LyCORIS's LohaModule wraps a Linear or Conv2d by replacing its forward; here each one is also
registered as a child of the layer it wraps (``<layer>.loha_<adapter>``), so its parameters
belong to the model (optimizer, checkpoints, device moves) like peft's LoRA layers do.

A LoHa layer's weight change is ``(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / rank``, and 3x3
convolutions use the Tucker form (``hada_t1`` / ``hada_t2`` cores), as TrainTrain's LyCORIS
network does. On disk each layer is ``<name>.hada_w1_a``, ``.hada_w1_b``, ``.hada_w2_a``,
``.hada_w2_b`` (``.hada_t1``, ``.hada_t2``) and ``.alpha``: the keys A1111's and ComfyUI's
loaders look for.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from difftrain.errors import ConfigError

CHILD_PREFIX = "loha_"
TENSOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
# The factors that scale the weight change linearly, one per Hadamard factor.
_OUTER_FACTORS = ("hada_w1_a", "hada_w2_a")


def _module_class():
    try:
        from lycoris.modules.loha import LohaModule
    except ImportError:
        raise ConfigError("network_type 'loha' needs the LyCORIS library: pip install lycoris-lora "
                          "(it is listed in requirements.txt).") from None
    return LohaModule


def add_loha(module: nn.Module, targets: Iterable[str], rank: int, alpha: float, *,
             conv_targets: Iterable[str] = (), conv_rank: int = 0, conv_alpha: float = 0.0,
             dtype: torch.dtype = torch.float32, adapter_name: str = "default",
             trainable: bool = True, tucker: bool = True) -> list[nn.Parameter]:
    """Wrap each named layer of ``module`` with a LoHa (in place); returns the new parameters.

    ``targets`` get ``rank`` / ``alpha``, ``conv_targets`` (3x3 convolutions) ``conv_rank`` /
    ``conv_alpha`` (0: alpha = rank, LyCORIS's rule). A trainable adapter freezes the rest of
    ``module``; a frozen one (``trainable`` false: Difference's copier) leaves it as it is. The
    model's output is unchanged until training moves the weights (one factor starts at zero).
    ``tucker``: 3x3 convolutions in LyCORIS's Tucker form, as TrainTrain trains them.
    """
    loha_class = _module_class()
    layers = dict(module.named_modules())
    if trainable:
        module.requires_grad_(False)
    parameters: list[nn.Parameter] = []
    chosen = [(name, rank, alpha) for name in targets] + [(name, conv_rank, conv_alpha) for name in conv_targets]
    for name, layer_rank, layer_alpha in chosen:
        layer = layers[name]
        loha = loha_class(name, layer, 1.0, int(layer_rank), float(layer_alpha) or float(layer_rank),
                          use_tucker=tucker).to(device=layer.weight.device, dtype=dtype)
        layer.add_module(CHILD_PREFIX + adapter_name, loha)
        loha.apply_to()
        for parameter in loha.parameters():
            parameter.requires_grad_(trainable)
            parameters.append(parameter)
    return parameters


def loha_layers(module: nn.Module, adapter: str = "default") -> Iterator[tuple[str, nn.Module]]:
    """(path of the wrapped layer, its LoHa) for adapter ``adapter`` in ``module``."""
    suffix = "." + CHILD_PREFIX + adapter
    for name, child in module.named_modules():
        if name.endswith(suffix) or name == CHILD_PREFIX + adapter:
            yield name[:-len(suffix)] if name.endswith(suffix) else "", child


def has_loha(modules: Iterable[nn.Module]) -> bool:
    return any(name.rsplit(".", 1)[-1].startswith(CHILD_PREFIX)
               for module in modules for name, _ in module.named_modules())


def set_multiplier(module: nn.Module, multiplier: float, adapter: str = "default") -> None:
    for _, loha in loha_layers(module, adapter):
        loha.multiplier = float(multiplier)


def loha_tensors(key: str, loha: nn.Module, *, dtype: torch.dtype | None = None,
                 strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The file tensors of one LoHa layer named ``key``; ``strength`` is baked in (the weight
    change of the written layer is ``strength`` times this one's)."""
    factor = math.sqrt(abs(strength))
    tensors: dict[str, torch.Tensor] = {}
    for name in TENSOR_NAMES:
        value = getattr(loha, name, None)
        if value is None:
            continue
        value = value.detach()
        if name in _OUTER_FACTORS:
            value = value * (factor if name == "hada_w2_a" or strength >= 0 else -factor)
        tensors[f"{key}.{name}"] = (value if dtype is None else value.to(dtype)).cpu().contiguous()
    tensors[f"{key}.alpha"] = torch.tensor(float(loha.alpha), dtype=torch.float32)
    return tensors


def load_loha_tensors(loha: nn.Module, state: Mapping[str, torch.Tensor], key: str, source: str) -> None:
    """Copy the file's tensors of layer ``key`` into ``loha`` (exactly), with its alpha."""
    for name in TENSOR_NAMES:
        target = getattr(loha, name, None)
        given = state.get(f"{key}.{name}")
        if target is None and given is None:
            continue
        if target is None or given is None or given.shape != target.shape:
            raise ConfigError(f"LoHa file {source}: layer {key} has {name} "
                              f"{tuple(given.shape) if given is not None else 'missing'}, this network "
                              f"{tuple(target.shape) if target is not None else 'none'}; set network_rank / "
                              "network_conv_rank to the file's.")
        with torch.no_grad():
            target.copy_(given.to(target.dtype))
    alpha = state.get(f"{key}.alpha")
    if alpha is not None:
        loha.alpha.fill_(float(alpha))
        loha.scale = float(alpha) / loha.lora_dim


def loha_layer_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float, bool]]:
    """{layer: (rank, alpha, tucker)} of a LoHa state dict (alpha defaults to the rank)."""
    shapes: dict[str, tuple[int, float, bool]] = {}
    for key, value in state.items():
        if key.endswith(".hada_w1_b"):
            layer = key[:-len(".hada_w1_b")]
            rank = int(value.shape[0])
            alpha = state.get(f"{layer}.alpha")
            shapes[layer] = (rank, float(alpha) if alpha is not None else float(rank), f"{layer}.hada_t1" in state)
    return shapes
