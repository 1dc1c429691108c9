"""LoRA / LoCon (peft) and LoHa (LyCORIS) adapters on Stable Diffusion modules, saved and loaded
as the kohya-format files A1111, ComfyUI, kohya's sd-scripts, TrainTrain and diffusers read.

Training uses peft's LoRA layers (or LyCORIS's LoHa, ``difftrain.models.lycoris``) injected into
the UNet and, optionally, the text encoders. On disk a network is one ``.safetensors`` file::

    <layer>.lora_down.weight   (rank, in)  or (rank, in, kh, kw)
    <layer>.lora_up.weight     (out, rank) or (out, rank, 1, 1)
    <layer>.alpha              () scalar; scale = alpha / rank
    (LoHa: <layer>.hada_w1_a, .hada_w1_b, .hada_w2_a, .hada_w2_b[, .hada_t1, .hada_t2], .alpha)

with ``<layer>`` named by ``difftrain.models.lora_keys`` (``lora_unet_...``, ``lora_te_text_model_...``,
``lora_te1_`` / ``lora_te2_`` for SDXL), plus kohya's ``ss_*`` metadata. lora_down is peft's
lora_A and lora_up its lora_B, so the mapping is a rename.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from difftrain.errors import ConfigError
from difftrain.models.lora_keys import file_key, file_keys, key_lookup, layer_of

ADAPTER_NAME = "default"
NETWORK_ELEMENTS = ("Full", "CrossAttention", "SelfAttention")

# What kohya's LoRA trains in a transformer block (attention projections, feed-forward, and the
# block's own in/out projections); network_element narrows it to attn1 or attn2.
_TRANSFORMER_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT_ENCODER_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

def text_encoder_prefixes(family: str) -> list[str]:
    """kohya's key prefix of each text encoder, in the model's order."""
    return ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]


def unet_target_modules(unet: nn.Module, network_element: str = "Full", conv_rank: int = 0,
                        blocks: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Module names of ``unet`` that get LoRA: (linear and 1x1 layers, 3x3 convolutions).

    ``network_element``: 'Full' (attention, feed-forward and proj_in/out of every transformer
    block), 'CrossAttention' (attn2 only) or 'SelfAttention' (attn1 only). ``conv_rank`` > 0 with
    'Full' adds kohya's LoCon layers (TrainTrain's c3lier): every ResNet block's time_emb_proj and
    1x1 conv_shortcut to the first list, its 3x3 convolutions and the down/up-samplers' to the second.
    ``blocks``: TrainTrain / A1111 block names (see ``unet_block_of``) to keep; empty keeps all.
    """
    if network_element not in NETWORK_ELEMENTS:
        raise ConfigError(f"network_element {network_element!r} is unknown; use one of {', '.join(NETWORK_ELEMENTS)}.")
    attention_kinds = {"Full": ("attn1", "attn2"), "CrossAttention": ("attn2",), "SelfAttention": ("attn1",)}[network_element]
    linear: list[str] = []
    convolutions: list[str] = []
    for name, module in unet.named_modules():
        if ".attentions." not in f".{name}" and not name.startswith("mid_block.attentions"):
            if conv_rank and network_element == "Full" and isinstance(module, (nn.Linear, nn.Conv2d)) and \
                    (".resnets." in name or "samplers." in name):
                # kohya's LoCon: every layer of a ResNet block or a resampler; its 3x3
                # convolutions at the conv rank, time_emb_proj and conv_shortcut at the main one.
                is_small = isinstance(module, nn.Linear) or module.kernel_size == (1, 1)
                (linear if is_small else convolutions).append(name)
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        if ".transformer_blocks." in name:
            block_part = name.split(".transformer_blocks.", 1)[1].split(".", 1)[1]  # after the block index
            kind = block_part.split(".", 1)[0]
            if kind in ("attn1", "attn2"):
                if kind in attention_kinds and block_part.split(".", 1)[1] in _TRANSFORMER_LEAVES:
                    linear.append(name)
            elif network_element == "Full" and block_part in _TRANSFORMER_LEAVES:
                linear.append(name)
        elif network_element == "Full" and name.rsplit(".", 1)[-1] in ("proj_in", "proj_out"):
            linear.append(name)
    wanted = check_block_names(blocks)
    if wanted:
        layers = layers_per_block(unet)
        linear = [name for name in linear if unet_block_of(name, layers) in wanted]
        convolutions = [name for name in convolutions if unet_block_of(name, layers) in wanted]
        if not linear and not convolutions:
            present = sorted({unet_block_of(n, layers) for n, m in unet.named_modules()
                              if isinstance(m, (nn.Linear, nn.Conv2d))} - {"BASE"}, key=BLOCK_NAMES.index)
            raise ConfigError(f"network_blocks {sorted(wanted, key=BLOCK_NAMES.index)} select no layer that "
                              f"network_element {network_element!r} trains in this UNet (its blocks: "
                              f"{', '.join(present)}); add blocks with attention, or leave network_blocks empty.")
    if not linear and not convolutions:
        raise ConfigError(f"the UNet has no layers for network_element {network_element!r}; use 'Full'.")
    return linear, convolutions


# TrainTrain's and A1111's block names (the original LDM UNet's numbering): BASE is the text
# encoder, IN00 the input convolution, then each down level's layers and its downsampler; M00 the
# middle block; OUTnn each up level's layers (the upsampler belongs to a level's last layer).
# SD1/SD2 use all 26; SDXL has IN00-IN08 and OUT00-OUT08 (TrainTrain's 20-block list).
BLOCK_NAMES = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))


def check_block_names(blocks: Iterable[str]) -> set[str]:
    """The set of block names, refusing names outside ``BLOCK_NAMES`` (ConfigError)."""
    chosen = {str(block).strip().upper() for block in blocks}
    unknown = sorted(chosen - set(BLOCK_NAMES))
    if unknown:
        raise ConfigError(f"network_blocks: unknown block name(s) {unknown}; use BASE (text encoder), IN00-IN11, "
                          "M00 and OUT00-OUT11 (SDXL: IN00-IN08, M00, OUT00-OUT08), or an empty list for all.")
    return chosen


def layers_per_block(unet: nn.Module) -> int:
    config = getattr(unet, "config", None)
    value = getattr(config, "layers_per_block", 2) if config is not None else 2
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def unet_block_of(module_name: str, layers: int) -> str:
    """The block name (IN00.., M00, OUT00..) of a diffusers UNet module path.

    Down level d, layer j is IN(1 + d (layers + 1) + j) and its downsampler IN(1 + d (layers + 1)
    + layers); up level u, layer j is OUT(u (layers + 1) + j), with the upsampler on its last layer.
    Time and class embeddings, conv_in (IN00) and the output layers map to IN00 / OUT(last).
    """
    parts = module_name.split(".")
    if parts[0] == "down_blocks" and len(parts) > 3:
        level, kind, index = int(parts[1]), parts[2], int(parts[3])
        offset = layers if kind == "downsamplers" else index
        return f"IN{1 + level * (layers + 1) + offset:02d}"
    if parts[0] == "up_blocks" and len(parts) > 3:
        level, kind, index = int(parts[1]), parts[2], int(parts[3])
        offset = layers if kind == "upsamplers" else index
        return f"OUT{level * (layers + 1) + offset:02d}"
    if parts[0] == "mid_block":
        return "M00"
    if parts[0] in ("conv_norm_out", "conv_out"):
        return "OUT11"
    return "IN00"


def text_encoder_target_modules(encoder: nn.Module) -> list[str]:
    """The attention and MLP projections of a CLIP text encoder (kohya's text-encoder LoRA)."""
    return [name for name, module in encoder.named_modules()
            if isinstance(module, nn.Linear) and ".encoder.layers." in f".{name}"
            and name.rsplit(".", 1)[-1] in _TEXT_ENCODER_LEAVES]


def add_lora(module: nn.Module, targets: list[str], rank: int, alpha: float, *,
             conv_targets: Iterable[str] = (), conv_rank: int = 0, conv_alpha: float = 0.0,
             dtype: torch.dtype = torch.float32, adapter_name: str = ADAPTER_NAME,
             network_type: str = "lierla") -> list[nn.Parameter]:
    """Add adapters to the named layers of ``module`` in place; returns the new trainable parameters.

    LoRA (peft) for 'lierla' and 'c3lier', LoHa (LyCORIS, ``difftrain.models.lycoris``) for
    'loha'. Every other parameter of ``module`` is frozen. The model's output is unchanged until
    training moves the weights (lora_up starts at zero). ``dtype`` is the adapter weights'
    precision (TrainTrain's lora_precision), independent of the frozen weights'. A second
    ``adapter_name`` on the same module adds a second adapter beside the first (see
    ``activate_adapters``).
    """
    if network_type == "loha":
        from difftrain.models import lycoris

        return lycoris.add_loha(module, targets, rank, alpha, conv_targets=conv_targets, conv_rank=conv_rank,
                                conv_alpha=conv_alpha, dtype=dtype, adapter_name=adapter_name)
    from peft import LoraConfig, inject_adapter_in_model

    conv_targets = list(conv_targets)
    module.requires_grad_(False)
    rank_pattern = {re.escape(name): int(conv_rank) for name in conv_targets}
    alpha_pattern = {re.escape(name): float(conv_alpha or conv_rank) for name in conv_targets}
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets) + conv_targets,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True)
    with warnings.catch_warnings():
        # A second adapter beside the trained one is the point there, not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    parameters = []
    for name, parameter in module.named_parameters():
        if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name:
            parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(True)
            parameters.append(parameter)
    return parameters


def _lora_layers(module: nn.Module, adapter: str = ADAPTER_NAME) -> Iterable[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, layer in module.named_modules():
        if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
            yield name, layer


def _adapted_layers(module: nn.Module, adapter: str) -> Iterable[tuple[str, Any, str]]:
    """(layer path, adapter layer, 'lora' or 'loha') of every layer adapter ``adapter`` adapts."""
    from difftrain.models import lycoris

    for name, layer in _lora_layers(module, adapter):
        yield name, layer, "lora"
    for name, layer in lycoris.loha_layers(module, adapter):
        yield name, layer, "loha"


def set_multiplier(modules: Iterable[nn.Module], multiplier: float, adapter: str = ADAPTER_NAME) -> None:
    """Scale adapter ``adapter``'s output by ``multiplier`` (kohya's / A1111's LoRA strength).

    The effective scale becomes multiplier * alpha / rank; 0 gives exactly the frozen model.
    """
    from difftrain.models import lycoris

    for module in modules:
        for _, layer in _lora_layers(module, adapter):
            layer.set_scale(adapter, float(multiplier))
        lycoris.set_multiplier(module, multiplier, adapter)


def activate_adapters(modules: Iterable[nn.Module], adapters: list[str], trainable: str = ADAPTER_NAME) -> None:
    """Make every adapter in ``adapters`` add its output (summed), with only ``trainable`` training.

    peft's set_adapter marks all active adapters trainable; a frozen one (Difference's copier)
    must stay frozen, so requires_grad is set here explicitly. LoHa adapters always add.
    """
    from peft.tuners.lora import LoraLayer

    from difftrain.models import lycoris

    for module in modules:
        for layer in module.modules():
            if not isinstance(layer, LoraLayer):
                continue
            layer.set_adapter(list(adapters))
            for adapter in adapters:
                if adapter in layer.lora_A:
                    for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                        part.requires_grad_(adapter == trainable)
        for adapter in adapters:
            for _, loha in lycoris.loha_layers(module, adapter):
                loha.requires_grad_(adapter == trainable)


def add_lora_from_state(module: nn.Module, prefix: str, state: Mapping[str, torch.Tensor], source: str, *,
                        adapter_name: str, dtype: torch.dtype = torch.float32) -> None:
    """Add an adapter shaped like the LoRA or LoHa ``state`` (its layers, ranks and alphas) to
    ``module`` and load it, frozen. Used for a network trained elsewhere (Difference's copier).

    Raises:
        ConfigError: the file has no layer of ``module`` (another model family or prefix).
    """
    from difftrain.models import lycoris

    lookup = key_lookup({prefix: module}, {prefix: [name for name, _ in module.named_modules() if name]})
    shapes = {key: (rank, alpha) for key, (rank, alpha) in lora_layer_shapes(state).items()}
    is_loha = not shapes
    if is_loha:
        loha_shapes = lycoris.loha_layer_shapes(state)
        shapes = {key: (rank, alpha) for key, (rank, alpha, _) in loha_shapes.items()}
    shapes = {key: value for key, value in shapes.items() if key.startswith(prefix + "_")}
    unknown = sorted(set(shapes) - set(lookup))
    if not shapes or unknown:
        raise ConfigError(f"LoRA file {source} does not fit this model ({'no ' + prefix + ' layers' if not shapes else 'unknown layers such as ' + unknown[0]}); "
                          "use a LoRA trained on the same base model family.")
    paths: dict[str, str] = {}
    for key in shapes:  # one adapter per layer, however many spellings the file has for it
        if lookup[key][1] not in paths.values():
            paths[key] = lookup[key][1]
    shapes = {key: shapes[key] for key in paths}
    if is_loha:
        for key, (rank, alpha) in shapes.items():
            lycoris.add_loha(module, [paths[key]], rank, alpha, dtype=dtype, adapter_name=adapter_name,
                             trainable=False, tucker=loha_shapes[key][2])
    else:
        from peft import LoraConfig, inject_adapter_in_model

        first_rank, first_alpha = next(iter(shapes.values()))
        config = LoraConfig(r=first_rank, lora_alpha=first_alpha, target_modules=list(paths.values()),
                            rank_pattern={re.escape(paths[k]): rank for k, (rank, _) in shapes.items()},
                            alpha_pattern={re.escape(paths[k]): alpha for k, (_, alpha) in shapes.items()},
                            init_lora_weights=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(config, module, adapter_name=adapter_name)
        for name, parameter in module.named_parameters():
            if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name:
                parameter.data = parameter.data.to(dtype)
                parameter.requires_grad_(False)
    load_lora_state_dict({prefix: module}, {k: v for k, v in state.items() if layer_of(k).startswith(prefix + "_")},
                         source, adapter=adapter_name)


def _signed_root(strength: float) -> tuple[float, float]:
    """Factors for (up, down) whose product is ``strength``: TrainTrain multiplies both by
    sqrt(strength); a negative strength keeps its sign on the up weight."""
    root = math.sqrt(abs(strength))
    return (root if strength >= 0 else -root), root


def lora_state_dict(modules: Mapping[str, nn.Module], dtype: torch.dtype | None = None,
                    adapter: str = ADAPTER_NAME, strength: float = 1.0) -> dict[str, torch.Tensor]:
    """The adapter tensors of ``modules`` ({key prefix: module}) under the names LoRA files use.

    Args:
        modules: e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``.
        dtype: precision of the weights (None keeps theirs); alphas are always float32.
        strength: TrainTrain's network_strength, baked in: the written network changes each
            layer ``strength`` times as much as the trained one (1 for checkpoints).

    Returns:
        LoRA: ``{<layer>.lora_down.weight, .lora_up.weight, .alpha}``; LoHa: ``{<layer>.hada_w1_a,
        .hada_w1_b, .hada_w2_a, .hada_w2_b[, .hada_t1, .hada_t2], .alpha}``; on the CPU. Layer
        names follow ``difftrain.models.lora_keys.file_key``.
    """
    from difftrain.models import lycoris

    up_factor, down_factor = _signed_root(strength)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, layer, kind in _adapted_layers(module, adapter):
            for key in file_keys(prefix, name, module):
                if kind == "loha":
                    state.update(lycoris.loha_tensors(key, layer, dtype=dtype, strength=strength))
                    continue
                down = layer.lora_A[adapter].weight.detach() * down_factor
                up = layer.lora_B[adapter].weight.detach() * up_factor
                state[f"{key}.lora_down.weight"] = (down if dtype is None else down.to(dtype)).cpu().contiguous()
                state[f"{key}.lora_up.weight"] = (up if dtype is None else up.to(dtype)).cpu().contiguous()
                state[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32)
    return state


def lora_layer_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """{LoRA layer name: (rank, alpha)} of a LoRA state dict (alpha defaults to the rank)."""
    shapes: dict[str, tuple[int, float]] = {}
    for key, value in state.items():
        if key.endswith(".lora_down.weight"):
            layer = key[:-len(".lora_down.weight")]
            alpha = state.get(f"{layer}.alpha")
            shapes[layer] = (int(value.shape[0]), float(alpha) if alpha is not None else float(value.shape[0]))
    return shapes


def _same_layer_tensors(state: Mapping[str, torch.Tensor], first: str, second: str) -> bool:
    """Whether two spellings of one layer hold the same tensors (a copy written for A1111)."""
    parts = {key[len(first):] for key in state if layer_of(key) == first}
    return parts == {key[len(second):] for key in state if layer_of(key) == second} and \
        all(torch.equal(state[first + part], state[second + part]) for part in parts)


def _match_layers(modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], source: str,
                  adapter: str) -> dict[str, tuple[Any, str]]:
    """{file layer name: (adapter layer, kind)}, refusing a file that does not fit the network."""
    layers = {(prefix, name): (layer, kind) for prefix, module in modules.items()
              for name, layer, kind in _adapted_layers(module, adapter)}
    paths: dict[str, list[str]] = {}
    for prefix, name in layers:
        paths.setdefault(prefix, []).append(name)
    lookup = key_lookup(dict(modules), paths)
    matched: dict[str, tuple[Any, str]] = {}
    first_spelling: dict[tuple[str, str], str] = {}
    surplus, twice = [], []
    for key in sorted({layer_of(key) for key in state}):
        if key not in lookup:
            surplus.append(key)
        elif lookup[key] in first_spelling:
            if not _same_layer_tensors(state, first_spelling[lookup[key]], key):
                twice.append(key)
        else:
            first_spelling[lookup[key]] = key
            matched[key] = layers[lookup[key]]
    found = set(first_spelling)
    missing = sorted(file_key(prefix, name, modules[prefix]) for prefix, name in set(layers) - found)
    if missing or surplus or twice:
        detail = []
        if missing:
            detail.append(f"{len(missing)} layer(s) of this network are not in it (e.g. {', '.join(missing[:2])})")
        if surplus:
            detail.append(f"it has {len(surplus)} layer(s) this network lacks (e.g. {', '.join(surplus[:2])})")
        if twice:
            detail.append(f"it holds layer {twice[0]} twice, under two spellings with different weights")
        raise ConfigError(f"LoRA file {source} does not fit this network: {'; '.join(detail)}. Use the same base "
                          "model family, network_type, network_element, network_conv_rank and "
                          "network_train_text_encoder it was trained with.")
    return matched


def load_lora_state_dict(modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], source: str,
                         adapter: str = ADAPTER_NAME) -> None:
    """Copy a LoRA or LoHa file's tensors into the adapter layers of ``modules`` (in place, exactly).

    Layers may be named as this project writes them, as kohya's sd-scripts does (SDXL's UNet
    under its LDM names) or as earlier versions of this project did (``lora_te_encoder_...``).

    Raises:
        ConfigError: the file's layers, ranks or alphas do not match this network (another
            base model family, network_type, network_element or rank), naming the first differences.
    """
    from difftrain.models import lycoris

    for key, (layer, kind) in _match_layers(modules, state, source, adapter).items():
        if kind == "loha":
            lycoris.load_loha_tensors(layer, state, key, source)
            continue
        down, up = state.get(f"{key}.lora_down.weight"), state.get(f"{key}.lora_up.weight")
        if down is None or up is None:
            raise ConfigError(f"LoRA file {source}: layer {key} is not a LoRA layer (no lora_down/lora_up); "
                              "set network_type to the file's (a LoHa file: 'loha').")
        target_down, target_up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        if down.shape != target_down.shape or up.shape != target_up.shape:
            raise ConfigError(f"LoRA file {source}: layer {key} has rank {down.shape[0]}, this network "
                              f"{target_down.shape[0]}; set network_rank / network_conv_rank to the file's.")
        alpha_key = f"{key}.alpha"
        if alpha_key in state and float(state[alpha_key]) != float(layer.lora_alpha[adapter]):
            # peft keeps the scale as alpha / rank; a different alpha changes it.
            layer.lora_alpha[adapter] = float(state[alpha_key])
            layer.scaling[adapter] = float(state[alpha_key]) / layer.r[adapter]
        with torch.no_grad():
            target_down.copy_(down.to(target_down.dtype))
            target_up.copy_(up.to(target_up.dtype))


def ss_base_model_version(family: str, prediction_type: str) -> str:
    """kohya's ss_base_model_version: sd_v1 / sd_v2, '_v' added for v-prediction; sdxl_base_v1-0."""
    if family == "sdxl":
        return "sdxl_base_v1-0"
    version = {"sd1": "sd_v1", "sd2": "sd_v2"}.get(family, family)
    return version + ("_v" if prediction_type == "v_prediction" else "")


def _modelspec_architecture(family: str, prediction_type: str) -> str:
    """kohya's modelspec.architecture of a LoRA (Stability AI's model-spec names)."""
    if family == "sd2":
        base = "stable-diffusion-v2-768-v" if prediction_type == "v_prediction" else "stable-diffusion-v2-512"
    else:
        base = {"sd1": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base"}.get(family, family)
    return base + "/lora"


def lora_metadata(*, family: str, rank: int, alpha: float, output_name: str, conv_rank: int = 0,
                  conv_alpha: float = 0.0, prediction_type: str = "epsilon", base_model: str = "",
                  trains_text_encoder: bool = False, network_type: str = "lierla",
                  extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The network's ``ss_*`` / ``modelspec.*`` metadata as kohya's trainers write it (all strings),
    which A1111, ComfyUI and kohya's tools read; ``extra`` (e.g. ``kohya_training_metadata``) is
    added, non-strings as JSON.

    LoRA and LoCon are kohya's ``networks.lora`` (LoCon with conv_dim / conv_alpha network args);
    LoHa is LyCORIS's ``lycoris.kohya`` with ``algo: loha``.
    """
    network_args: dict[str, str] = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if conv_rank else {}
    if network_type == "loha":
        network_args["algo"] = "loha"
    metadata = {
        "ss_network_module": "lycoris.kohya" if network_type == "loha" else "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": ss_base_model_version(family, prediction_type),
        "ss_sd_model_name": Path(base_model).name if base_model else "",
        "ss_output_name": output_name,
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_network_train_unet_only": str(not trains_text_encoder),
        "ss_training_finished_at": str(time.time()),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": _modelspec_architecture(family, prediction_type),
        "modelspec.implementation": ("https://github.com/Stability-AI/generative-models" if family == "sdxl"
                                     else "diffusers"),
        "modelspec.title": output_name,
        "modelspec.prediction_type": "v" if prediction_type == "v_prediction" else "epsilon",
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def tag_frequency(captions: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """kohya's ss_tag_frequency: per image folder name, how many captions hold each tag (a
    caption's comma-separated parts, stripped and lower-cased), from (folder, caption) pairs."""
    frequency: dict[str, dict[str, int]] = {}
    for folder, caption in captions:
        counts = frequency.setdefault(Path(folder).name, {})
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return frequency


def kohya_training_metadata(*, session_id: int, started_at: float, optimizer: str, optimizer_args: str = "",
                            lr_scheduler: str, mixed_precision: str, learning_rate: float,
                            text_encoder_lr: float | None = None, seed: int, max_train_steps: int,
                            resolution: tuple[int, int], captions: Iterable[tuple[str, str]], batch_size: int,
                            gradient_accumulation_steps: int = 1, gradient_checkpointing: bool = False,
                            lr_warmup_steps: int = 0, noise_offset: float = 0.0, min_snr_gamma: float = 0.0,
                            zero_terminal_snr: bool = False, max_grad_norm: float = 0.0) -> dict[str, str]:
    """The training facts kohya's train_network writes as ``ss_*`` metadata, in its spellings.

    ``session_id`` is kohya's random integer naming one training session; ``started_at`` a
    Unix time; ``optimizer`` a class or TrainTrain optimizer name (kohya writes
    ``name(args)`` when there are optimizer arguments); ``mixed_precision`` 'no', 'fp16' or
    'bf16'; ``resolution`` (height, width), written as kohya's "(width, height)"; ``captions``
    one (image folder, caption) pair per training image, for ss_tag_frequency and the folders'
    image counts.
    """
    captions = list(captions)
    images_per_folder: dict[str, int] = {}
    for folder, _ in captions:
        images_per_folder[Path(folder).name] = images_per_folder.get(Path(folder).name, 0) + 1
    values: dict[str, Any] = {
        "ss_session_id": int(session_id),
        "ss_training_started_at": float(started_at),
        "ss_optimizer": optimizer + (f"({optimizer_args})" if optimizer_args else ""),
        "ss_lr_scheduler": lr_scheduler,
        "ss_lr_warmup_steps": int(lr_warmup_steps),
        "ss_mixed_precision": mixed_precision,
        "ss_learning_rate": float(learning_rate),
        "ss_unet_lr": float(learning_rate),
        "ss_text_encoder_lr": float(learning_rate if text_encoder_lr is None else text_encoder_lr),
        "ss_seed": int(seed),
        "ss_max_train_steps": int(max_train_steps),
        "ss_resolution": f"({int(resolution[1])}, {int(resolution[0])})",
        "ss_num_train_images": len(captions),
        "ss_batch_size_per_device": int(batch_size),
        "ss_total_batch_size": int(batch_size) * int(gradient_accumulation_steps),
        "ss_gradient_accumulation_steps": int(gradient_accumulation_steps),
        "ss_gradient_checkpointing": bool(gradient_checkpointing),
        "ss_noise_offset": float(noise_offset),
        "ss_min_snr_gamma": float(min_snr_gamma),
        "ss_zero_terminal_snr": bool(zero_terminal_snr),
        "ss_max_grad_norm": float(max_grad_norm),
        "ss_tag_frequency": json.dumps(tag_frequency(captions)),
        "ss_dataset_dirs": json.dumps({folder: {"n_repeats": 1, "img_count": count}
                                       for folder, count in images_per_folder.items()}),
    }
    # kohya turns every value into a string with str(): True, 0.0001, 42.
    return {key: value if isinstance(value, str) else str(value) for key, value in values.items()}


def kohya_hashes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's sshs_model_hash / sshs_legacy_hash (the hashes sd-webui-additional-networks and
    A1111 list LoRAs by): over the file as written with only its ss_* metadata."""
    import hashlib

    from safetensors.torch import save

    data = save(dict(state), {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_size = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header_size:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def save_lora_file(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                   dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a kohya-format LoRA ``.safetensors`` atomically (with kohya's sshs_* hashes when the
    metadata is kohya's).

    Args:
        dtype: precision of the lora_down/lora_up weights (save_precision); alphas stay float32.
        overwrite: replace an existing file; otherwise an existing file raises ConfigError.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"LoRA file {path} already exists; set save_overwrite true to replace it, or "
                          "choose another save_lora_name.")
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, value in state.items():
        value = (value.to(dtype) if dtype is not None and not key.endswith(".alpha") else value).detach().cpu()
        # a layer written under two names (lora_keys.file_keys) must not share memory on disk
        pointer = value.untyped_storage().data_ptr()
        tensors[key] = value.clone() if pointer in storages else value.contiguous()
        storages.add(pointer)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        metadata = dict(metadata)
        if "ss_network_module" in metadata:
            metadata.update(kohya_hashes(tensors, metadata))
        save_file(tensors, staging, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes the file private; give it the permissions an ordinary write would.
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path


def read_lora_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kohya-format LoRA file (safetensors only: never unpickled)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ConfigError(f"LoRA file {path} is not a .safetensors file; only safetensors LoRAs are read "
                          "(pickled .pt/.ckpt files could run code).")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise ConfigError(f"cannot read LoRA file {path}: {error}.") from None
