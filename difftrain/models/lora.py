"""LoRA adapters on Stable Diffusion modules (through peft), saved and loaded as kohya/A1111 files.

Training uses peft's LoRA layers injected into the UNet and, optionally, the text encoders. On
disk a LoRA is one ``.safetensors`` file in the layout A1111, ComfyUI, kohya's sd-scripts and
diffusers' ``pipeline.load_lora_weights(file)`` all read::

    lora_unet_<module path, '.' -> '_'>.lora_down.weight   (rank, in)  or (rank, in, kh, kw)
    lora_unet_<...>.lora_up.weight                         (out, rank) or (out, rank, 1, 1)
    lora_unet_<...>.alpha                                  () scalar; scale = alpha / rank
    lora_te_<...>   (SD1/SD2 text encoder)   lora_te1_ / lora_te2_ (SDXL's two encoders)

plus ``ss_*`` metadata (network dim/alpha, base model version, ...) that A1111's and kohya's
tools display. lora_down is peft's lora_A and lora_up its lora_B, so the mapping is a rename.
"""

from __future__ import annotations

import json
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

ADAPTER_NAME = "default"
NETWORK_ELEMENTS = ("Full", "CrossAttention", "SelfAttention")

# What kohya's LoRA trains in a transformer block (attention projections, feed-forward, and the
# block's own in/out projections); network_element narrows it to attn1 or attn2.
_TRANSFORMER_LEAVES = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
_TEXT_ENCODER_LEAVES = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")

SS_BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def text_encoder_prefixes(family: str) -> list[str]:
    """kohya's key prefix of each text encoder, in the model's order."""
    return ["lora_te1", "lora_te2"] if family == "sdxl" else ["lora_te"]


def unet_target_modules(unet: nn.Module, network_element: str = "Full", conv_rank: int = 0,
                        blocks: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """Module names of ``unet`` that get LoRA: (linear and 1x1 layers, 3x3 convolutions).

    ``network_element``: 'Full' (attention, feed-forward and proj_in/out of every transformer
    block), 'CrossAttention' (attn2 only) or 'SelfAttention' (attn1 only). The 3x3 list (ResNet
    and down/up-sampler convolutions, TrainTrain's c3lier) is empty unless ``conv_rank`` > 0.
    ``blocks``: TrainTrain / A1111 block names (see ``unet_block_of``) to keep; empty keeps all.
    """
    if network_element not in NETWORK_ELEMENTS:
        raise ConfigError(f"network_element {network_element!r} is unknown; use one of {', '.join(NETWORK_ELEMENTS)}.")
    attention_kinds = {"Full": ("attn1", "attn2"), "CrossAttention": ("attn2",), "SelfAttention": ("attn1",)}[network_element]
    linear: list[str] = []
    convolutions: list[str] = []
    for name, module in unet.named_modules():
        if ".attentions." not in f".{name}" and not name.startswith("mid_block.attentions"):
            if conv_rank and isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1) and \
                    (".resnets." in name or "samplers." in name):
                convolutions.append(name)
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
             dtype: torch.dtype = torch.float32, adapter_name: str = ADAPTER_NAME) -> list[nn.Parameter]:
    """Inject LoRA layers (peft) into ``module`` in place; returns the new trainable parameters.

    Every other parameter of ``module`` is frozen. lora_up starts at zero, so the model's output
    is unchanged until training moves it. ``dtype`` is the LoRA weights' precision (TrainTrain's
    lora_precision), independent of the frozen weights' precision. A second ``adapter_name`` on
    the same module adds a second LoRA beside the first (see ``activate_adapters``).
    """
    from peft import LoraConfig, inject_adapter_in_model

    conv_targets = list(conv_targets)
    module.requires_grad_(False)
    rank_pattern = {re.escape(name): int(conv_rank) for name in conv_targets}
    alpha_pattern = {re.escape(name): float(conv_alpha or conv_rank) for name in conv_targets}
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets) + conv_targets,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True)
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


def set_multiplier(modules: Iterable[nn.Module], multiplier: float, adapter: str = ADAPTER_NAME) -> None:
    """Scale adapter ``adapter``'s output by ``multiplier`` (kohya's / A1111's LoRA strength).

    The effective scale becomes multiplier * alpha / rank; 0 gives exactly the frozen model.
    """
    for module in modules:
        for _, layer in _lora_layers(module, adapter):
            layer.set_scale(adapter, float(multiplier))


def activate_adapters(modules: Iterable[nn.Module], adapters: list[str], trainable: str = ADAPTER_NAME) -> None:
    """Make every adapter in ``adapters`` add its output (summed), with only ``trainable`` training.

    peft's set_adapter marks all active adapters trainable; a frozen one (Difference's copier)
    must stay frozen, so requires_grad is set here explicitly.
    """
    from peft.tuners.lora import LoraLayer

    for module in modules:
        for layer in module.modules():
            if not isinstance(layer, LoraLayer):
                continue
            layer.set_adapter(list(adapters))
            for adapter in adapters:
                if adapter in layer.lora_A:
                    for part in (layer.lora_A[adapter], layer.lora_B[adapter]):
                        part.requires_grad_(adapter == trainable)


def add_lora_from_state(module: nn.Module, prefix: str, state: Mapping[str, torch.Tensor], source: str, *,
                        adapter_name: str, dtype: torch.dtype = torch.float32) -> None:
    """Add a LoRA adapter shaped like the kohya-named ``state`` (its layers, ranks and alphas) to
    ``module`` and load it, frozen. Used for a LoRA trained elsewhere (Difference's copier).

    Raises:
        ConfigError: the file has no layer of ``module`` (another model family or prefix).
    """
    names = {f"{prefix}_{name.replace('.', '_')}": name for name, _ in module.named_modules() if name}
    shapes = {key: shape for key, shape in lora_layer_shapes(state).items() if key.startswith(prefix + "_")}
    unknown = sorted(set(shapes) - set(names))
    if not shapes or unknown:
        raise ConfigError(f"LoRA file {source} does not fit this model ({'no ' + prefix + ' layers' if not shapes else 'unknown layers such as ' + unknown[0]}); "
                          "use a LoRA trained on the same base model family.")
    targets = [names[key] for key in shapes]
    modules = dict(module.named_modules())
    linear = [t for t in targets if not (isinstance(modules[t], nn.Conv2d) and modules[t].kernel_size != (1, 1))]
    convolutions = [t for t in targets if t not in linear]
    from peft import LoraConfig, inject_adapter_in_model

    rank_pattern = {re.escape(names[key]): rank for key, (rank, _) in shapes.items()}
    alpha_pattern = {re.escape(names[key]): alpha for key, (_, alpha) in shapes.items()}
    first_rank, first_alpha = next(iter(shapes.values()))
    config = LoraConfig(r=first_rank, lora_alpha=first_alpha, target_modules=linear + convolutions,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, init_lora_weights=True)
    with warnings.catch_warnings():
        # A second adapter beside the trained one is the point here, not an accident.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, module, adapter_name=adapter_name)
    for name, parameter in module.named_parameters():
        if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name:
            parameter.data = parameter.data.to(dtype)
            parameter.requires_grad_(False)
    load_lora_state_dict({prefix: module}, {k: v for k, v in state.items() if k.startswith(prefix + "_")},
                         source, adapter=adapter_name)


def lora_state_dict(modules: Mapping[str, nn.Module], dtype: torch.dtype | None = None,
                    adapter: str = ADAPTER_NAME) -> dict[str, torch.Tensor]:
    """kohya-named LoRA tensors of the peft layers in ``modules`` ({key prefix: module}).

    Args:
        modules: e.g. ``{"lora_unet": unet, "lora_te": text_encoder}``.
        dtype: precision of the weights (None keeps theirs); alphas are always float32.

    Returns:
        ``{prefix_<path>.lora_down.weight, .lora_up.weight, .alpha}`` on the CPU.
    """
    state: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        for name, layer in _lora_layers(module, adapter):
            key = f"{prefix}_{name.replace('.', '_')}"
            down = layer.lora_A[adapter].weight.detach()
            up = layer.lora_B[adapter].weight.detach()
            state[f"{key}.lora_down.weight"] = (down if dtype is None else down.to(dtype)).cpu().contiguous()
            state[f"{key}.lora_up.weight"] = (up if dtype is None else up.to(dtype)).cpu().contiguous()
            state[f"{key}.alpha"] = torch.tensor(float(layer.lora_alpha[adapter]), dtype=torch.float32)
    return state


def lora_layer_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, float]]:
    """{kohya layer key: (rank, alpha)} of a LoRA state dict (alpha defaults to the rank)."""
    shapes: dict[str, tuple[int, float]] = {}
    for key, value in state.items():
        if key.endswith(".lora_down.weight"):
            layer = key[:-len(".lora_down.weight")]
            alpha = state.get(f"{layer}.alpha")
            shapes[layer] = (int(value.shape[0]), float(alpha) if alpha is not None else float(value.shape[0]))
    return shapes


def load_lora_state_dict(modules: Mapping[str, nn.Module], state: Mapping[str, torch.Tensor], source: str,
                         adapter: str = ADAPTER_NAME) -> None:
    """Copy kohya-named LoRA tensors into the peft layers of ``modules`` (in place, exactly).

    Raises:
        ConfigError: the file's layers, ranks or alphas do not match this network (another
            base model family, network_element or rank), naming the first differences.
    """
    expected: dict[str, tuple[Any, str]] = {}
    for prefix, module in modules.items():
        for name, layer in _lora_layers(module, adapter):
            expected[f"{prefix}_{name.replace('.', '_')}"] = (layer, name)
    given = {key.split(".", 1)[0] for key in state}
    missing = sorted(set(expected) - given)
    surplus = sorted(given - set(expected))
    if missing or surplus:
        detail = []
        if missing:
            detail.append(f"{len(missing)} layer(s) of this network are not in it (e.g. {', '.join(missing[:2])})")
        if surplus:
            detail.append(f"it has {len(surplus)} layer(s) this network lacks (e.g. {', '.join(surplus[:2])})")
        raise ConfigError(f"LoRA file {source} does not fit this network: {'; '.join(detail)}. Use the same base "
                          "model family, network_element, network_conv_rank and network_train_text_encoder "
                          "it was trained with.")
    for key, (layer, name) in expected.items():
        down, up = state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"]
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


def lora_metadata(*, family: str, rank: int, alpha: float, output_name: str, conv_rank: int = 0,
                  conv_alpha: float = 0.0, prediction_type: str = "epsilon", base_model: str = "",
                  trains_text_encoder: bool = False, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The ``ss_*`` metadata kohya's trainers write and A1111 / ComfyUI display (all strings)."""
    network_args = {"conv_dim": str(conv_rank), "conv_alpha": str(conv_alpha)} if conv_rank else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_network_args": json.dumps(network_args),
        "ss_base_model_version": SS_BASE_MODEL_VERSION.get(family, family),
        "ss_sd_model_name": Path(base_model).name if base_model else "",
        "ss_output_name": output_name,
        "ss_v2": str(family == "sd2"),
        "ss_v_parameterization": str(prediction_type == "v_prediction"),
        "ss_network_train_unet_only": str(not trains_text_encoder),
        "ss_training_finished_at": str(time.time()),
        "modelspec.architecture": {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2/lora",
                                   "sdxl": "stable-diffusion-xl-v1-base/lora"}.get(family, family),
        "modelspec.prediction_type": prediction_type,
    }
    for key, value in (extra or {}).items():
        metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    return metadata


def save_lora_file(path: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                   dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Write a kohya-format LoRA ``.safetensors`` atomically.

    Args:
        dtype: precision of the lora_down/lora_up weights (save_precision); alphas stay float32.
        overwrite: replace an existing file; otherwise an existing file raises ConfigError.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"LoRA file {path} already exists; set save_overwrite true to replace it, or "
                          "choose another save_lora_name.")
    tensors = {key: (value.to(dtype) if dtype is not None and not key.endswith(".alpha") else value)
               .detach().cpu().contiguous() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(tensors, staging, metadata=dict(metadata))
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
