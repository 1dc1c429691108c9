"""Key mapping between diffusers state dicts and the original single-file layouts.

A "single file" is the checkpoint format of A1111 / ComfyUI / the CompVis and SGM
repositories: one flat state dict with every component under a prefix:

=========  ==================================  ==========================================
family     text encoder(s)                     UNet / VAE
=========  ==================================  ==========================================
sd1        cond_stage_model.transformer.*      model.diffusion_model.* / first_stage_model.*
           (HF CLIP layout)
sd2        cond_stage_model.model.*            same
           (OpenCLIP layout, fused in_proj)
sdxl       conditioner.embedders.0.transformer.*  (HF CLIP-L layout)
           conditioner.embedders.1.model.*        (OpenCLIP bigG layout + text_projection)
=========  ==================================  ==========================================

The UNet and VAE mappings are computed from the diffusers config (block counts and
layers per block decide the flat ``input_blocks.N`` numbering), so the same code handles the
real models and the tiny stand-ins. Every function here works on plain ``dict[str, Tensor]``;
building modules and reading files is ``difftrain.models.sd``'s job.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import torch

from difftrain.errors import ConfigError

Tensor = torch.Tensor
StateDict = dict[str, Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."

# Diffusers component name -> (single-file prefix, layout) per family. The layout says
# which text-encoder key scheme lives under the prefix.
TEXT_ENCODER_PREFIXES: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [("text_encoder", "cond_stage_model.transformer.", "hf")],
    "sd2": [("text_encoder", "cond_stage_model.model.", "openclip")],
    "sdxl": [
        ("text_encoder", "conditioner.embedders.0.transformer.", "hf"),
        ("text_encoder_2", "conditioner.embedders.1.model.", "openclip"),
    ],
}

FAMILIES = ("sd1", "sd2", "sdxl")


def detect_family(keys: Any) -> str | None:
    """The family of a single-file state dict from its key names, or None if it is not one.

    SDXL is tested first because its keys are the most specific.
    """
    keys = list(keys)
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        return "sd2"
    if any(key.startswith("cond_stage_model.transformer.") for key in keys):
        return "sd1"
    return None


# --------------------------------------------------------------------------------------
# UNet
# --------------------------------------------------------------------------------------

_UNET_RESNET_TO_ORIGINAL = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_UNET_TOP_LEVEL_TO_ORIGINAL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _per_block(value: Any, num_blocks: int) -> list[int]:
    if isinstance(value, int):
        return [value] * num_blocks
    return [int(v) for v in value]


def _resnet_part(rest: str, table: Mapping[str, str]) -> str:
    layer, _, leaf = rest.partition(".")
    if layer not in table:
        raise KeyError(rest)
    return f"{table[layer]}.{leaf}"


def unet_key_to_original(key: str, config: Mapping[str, Any]) -> str:
    """The ``model.diffusion_model.`` key (without the prefix) of a diffusers UNet key.

    The original UNet numbers its blocks flatly: ``input_blocks.0`` is conv_in, then each
    down block contributes ``layers_per_block`` (resnet, attention) pairs and, except the
    last, one downsampler; the up blocks contribute ``layers_per_block + 1`` entries each,
    the upsampler riding in the last entry after the resnet (and the attention, if any).
    """
    for diffusers_name, original_name in _UNET_TOP_LEVEL_TO_ORIGINAL.items():
        if key.startswith(diffusers_name + "."):
            return original_name + key[len(diffusers_name):]

    num_blocks = len(config["block_out_channels"])
    down_layers = _per_block(config["layers_per_block"], num_blocks)
    up_layers = [n + 1 for n in reversed(down_layers)]

    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        start = 1 + sum(n + 1 for n in down_layers[:block])
        if kind == "downsamplers":
            return f"input_blocks.{start + down_layers[block]}.0.{rest.replace('conv.', 'op.', 1)}"
        if kind == "resnets":
            return f"input_blocks.{start + layer}.0.{_resnet_part(rest, _UNET_RESNET_TO_ORIGINAL)}"
        return f"input_blocks.{start + layer}.1.{rest}"

    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * index}.{_resnet_part(rest, _UNET_RESNET_TO_ORIGINAL)}"

    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if match:
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        start = sum(up_layers[:block])
        if kind == "upsamplers":
            has_attention = "CrossAttn" in config["up_block_types"][block]
            slot = 2 if has_attention else 1
            return f"output_blocks.{start + up_layers[block] - 1}.{slot}.{rest}"
        if kind == "resnets":
            return f"output_blocks.{start + layer}.0.{_resnet_part(rest, _UNET_RESNET_TO_ORIGINAL)}"
        return f"output_blocks.{start + layer}.1.{rest}"

    raise KeyError(f"no single-file name for UNet key {key!r}")


# --------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------

_VAE_RESNET_TO_ORIGINAL = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}

_VAE_ATTENTION_TO_ORIGINAL = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


def vae_key_to_original(key: str, config: Mapping[str, Any]) -> str:
    """The ``first_stage_model.`` key (without the prefix) of a diffusers AutoencoderKL key.

    The original decoder numbers its ``up`` levels from the lowest resolution upward, the
    reverse of diffusers' ``up_blocks``.
    """
    num_levels = len(config["block_out_channels"])
    coder, _, rest = key.partition(".")
    if coder not in ("encoder", "decoder"):
        return key  # quant_conv, post_quant_conv
    if rest.startswith("conv_norm_out."):
        return f"{coder}.norm_out.{rest[len('conv_norm_out.'):]}"

    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", rest)
    if match:
        kind, index, leaf = match[1], int(match[2]), match[3]
        if kind == "resnets":
            return f"{coder}.mid.block_{index + 1}.{_resnet_part(leaf, _VAE_RESNET_TO_ORIGINAL)}"
        for diffusers_name, original_name in _VAE_ATTENTION_TO_ORIGINAL.items():
            if leaf.startswith(diffusers_name + "."):
                return f"{coder}.mid.attn_1.{original_name}{leaf[len(diffusers_name):]}"
        raise KeyError(key)

    match = re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if match:
        direction, level, kind, layer, leaf = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if direction == "up":
            level = num_levels - 1 - level
        if kind == "resnets":
            return f"{coder}.{direction}.{level}.block.{layer}.{_resnet_part(leaf, _VAE_RESNET_TO_ORIGINAL)}"
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{coder}.{direction}.{level}.{sampler}.{leaf}"

    return key  # conv_in, conv_out


def _is_vae_attention_matrix(original_key: str) -> bool:
    # The original VAE attention uses 1x1 convolutions where diffusers uses linear layers.
    return bool(re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key))


# --------------------------------------------------------------------------------------
# Text encoders
# --------------------------------------------------------------------------------------

_OPENCLIP_LAYER_TO_HF = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def canonical_text_encoder_key(key: str) -> str:
    """A CLIP text-encoder key without the ``text_model.`` wrapper prefix.

    transformers names the same weight ``text_model.encoder...`` or ``encoder...`` depending
    on the class (CLIPTextModelWithProjection vs CLIPTextModel) and the version, so all
    conversions go through this prefix-free form.
    """
    return key[len("text_model."):] if key.startswith("text_model.") else key


def hf_text_encoder_to_openclip(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Convert a CLIP text-encoder state dict (HF layout) to the OpenCLIP layout.

    q/k/v projections are fused into ``attn.in_proj_weight`` (3*D, D) and ``in_proj_bias``;
    ``text_projection.weight`` (P, D) becomes ``text_projection`` (D, P), used as ``x @ W``.
    """
    canonical = {canonical_text_encoder_key(k): v for k, v in state_dict.items()}
    converted: StateDict = {}
    layer_indices = sorted(
        {int(m[1]) for k in canonical if (m := re.match(r"encoder\.layers\.(\d+)\.", k))}
    )
    for index in layer_indices:
        hf = f"encoder.layers.{index}."
        original = f"transformer.resblocks.{index}."
        for leaf in ("weight", "bias"):
            converted[f"{original}attn.in_proj_{leaf}"] = torch.cat(
                [canonical[f"{hf}self_attn.{name}_proj.{leaf}"] for name in ("q", "k", "v")]
            )
            for openclip_name, hf_name in _OPENCLIP_LAYER_TO_HF.items():
                converted[f"{original}{openclip_name}.{leaf}"] = canonical[f"{hf}{hf_name}.{leaf}"]
    converted["token_embedding.weight"] = canonical["embeddings.token_embedding.weight"]
    converted["positional_embedding"] = canonical["embeddings.position_embedding.weight"]
    for leaf in ("weight", "bias"):
        converted[f"ln_final.{leaf}"] = canonical[f"final_layer_norm.{leaf}"]
    if "text_projection.weight" in canonical:
        converted["text_projection"] = canonical["text_projection.weight"].t().contiguous()
    return converted


def openclip_text_encoder_to_hf(state_dict: Mapping[str, Tensor], num_layers: int | None = None) -> StateDict:
    """Convert an OpenCLIP text tower (keys without prefix) to canonical HF CLIP keys.

    ``num_layers`` keeps only the first N resblocks: SD2's diffusers text encoder has 23
    layers because SD2 conditions on the penultimate layer of a 24-layer OpenCLIP-H.
    Unrelated keys (``logit_scale``, ``attn_mask``, the vision tower) are ignored.
    """
    converted: StateDict = {}
    for key, value in state_dict.items():
        match = re.match(r"transformer\.resblocks\.(\d+)\.(.+)", key)
        if match:
            index, leaf = int(match[1]), match[2]
            if num_layers is not None and index >= num_layers:
                continue
            hf = f"encoder.layers.{index}."
            fused = re.match(r"attn\.in_proj_(weight|bias)", leaf)
            if fused:
                for name, chunk in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                    converted[f"{hf}self_attn.{name}_proj.{fused[1]}"] = chunk.contiguous()
                continue
            for openclip_name, hf_name in _OPENCLIP_LAYER_TO_HF.items():
                if leaf.startswith(openclip_name + "."):
                    converted[hf + hf_name + leaf[len(openclip_name):]] = value
                    break
            continue
        if key == "token_embedding.weight":
            converted["embeddings.token_embedding.weight"] = value
        elif key == "positional_embedding":
            converted["embeddings.position_embedding.weight"] = value
        elif key.startswith("ln_final."):
            converted["final_layer_norm." + key[len("ln_final."):]] = value
        elif key == "text_projection":
            converted["text_projection.weight"] = value.t().contiguous()
    return converted


# --------------------------------------------------------------------------------------
# Whole checkpoints
# --------------------------------------------------------------------------------------


def components_to_original(
    family: str,
    components: Mapping[str, Mapping[str, Tensor]],
    configs: Mapping[str, Mapping[str, Any]],
) -> StateDict:
    """Flatten diffusers component state dicts into one single-file state dict.

    Args:
        family: 'sd1', 'sd2' or 'sdxl'.
        components: {'unet': sd, 'vae': sd, 'text_encoder': sd[, 'text_encoder_2': sd]}.
        configs: the diffusers configs of 'unet' and 'vae' (the mapping depends on them).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}")
    flat: StateDict = {}
    for key, value in components["unet"].items():
        flat[UNET_PREFIX + unet_key_to_original(key, configs["unet"])] = value
    for key, value in components["vae"].items():
        original = vae_key_to_original(key, configs["vae"])
        if _is_vae_attention_matrix(original) and value.ndim == 2:
            value = value[:, :, None, None]
        flat[VAE_PREFIX + original] = value
    for name, prefix, layout in TEXT_ENCODER_PREFIXES[family]:
        state = components[name]
        if layout == "hf":
            for key, value in state.items():
                flat[prefix + "text_model." + canonical_text_encoder_key(key)] = value
        else:
            for key, value in hf_text_encoder_to_openclip(state).items():
                flat[prefix + key] = value
    return flat


def original_to_components(
    family: str,
    flat: Mapping[str, Tensor],
    configs: Mapping[str, Mapping[str, Any]],
    expected_keys: Mapping[str, Any],
) -> dict[str, StateDict]:
    """Split a single-file state dict into diffusers component state dicts.

    Args:
        family: 'sd1', 'sd2' or 'sdxl'.
        flat: the single-file state dict (any extra keys such as EMA copies are ignored).
        configs: diffusers configs of 'unet', 'vae' and each text encoder.
        expected_keys: for 'unet' and 'vae', the state-dict keys of the target diffusers
            modules; the mapping is built from them, so a missing weight is reported by name.

    Returns:
        {'unet': sd, 'vae': sd, 'text_encoder': sd[, 'text_encoder_2': sd]}, text-encoder
        keys in canonical form (see ``canonical_text_encoder_key``).

    Raises:
        ConfigError: when weights the model needs are missing from the file.
    """
    components: dict[str, StateDict] = {}
    for name, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX)):
        to_original = unet_key_to_original if name == "unet" else vae_key_to_original
        state: StateDict = {}
        missing = []
        for key in expected_keys[name]:
            original = prefix + to_original(key, configs[name])
            if original not in flat:
                missing.append(original)
                continue
            value = flat[original]
            if name == "vae" and _is_vae_attention_matrix(original) and value.ndim == 4:
                value = value[:, :, 0, 0]
            state[key] = value
        _raise_if_missing(name, missing)
        components[name] = state

    for name, prefix, layout in TEXT_ENCODER_PREFIXES[family]:
        sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
        if layout == "hf":
            state = {
                canonical_text_encoder_key(k): v for k, v in sub.items() if not k.endswith("position_ids")
            }
        else:
            state = openclip_text_encoder_to_hf(sub, configs[name]["num_hidden_layers"])
        if not state:
            _raise_if_missing(name, [prefix + "*"])
        components[name] = state
    return components


def _raise_if_missing(component: str, missing: list[str]) -> None:
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(
            f"the checkpoint lacks {len(missing)} {component} weight(s) ({shown}); it is "
            "incomplete or of another architecture than its keys suggest. Use a complete "
            "checkpoint, or pass family=/the matching model explicitly."
        )
