"""The names LoRA files give a network's layers, and the other spellings we read back.

A LoRA file names each adapted layer ``<prefix>_<module path, '.' -> '_'>`` (kohya's rule,
which A1111, ComfyUI, kohya's sd-scripts, TrainTrain and diffusers all read). What the module
path is, is the part that differs between programs, so it is decided here and nowhere else:

* text encoders: the path of transformers' CLIPTextModel as it was when kohya wrote the rule,
  ``text_model.encoder.layers.N...``; A1111 and ComfyUI look up exactly
  ``lora_te_text_model_encoder_layers_N_...`` (SD1/SD2) and ``lora_te1_`` / ``lora_te2_`` (SDXL).
  Newer transformers releases dropped the ``text_model`` level from CLIPTextModel, so the name is
  built from the layer's path without that level and the level put back.
* UNet: the diffusers path (``lora_unet_down_blocks_0_attentions_0_...``), as kohya writes for
  SD1/SD2 and TrainTrain for every family. A1111 turns these into its own (original LDM) names
  with fixed arithmetic that places an up level's upsampler in slot 1 for the first level and
  slot 2 after it, true where the first up level has no attention (SD1/SD2) and wrong where it
  has one (SDXL). Such an upsampler is written twice: under its diffusers path and under its LDM
  name (``lora_unet_output_blocks_2_2_conv``), which A1111 finds directly. Writing it under the
  LDM name alone would not do: diffusers drops the LDM-named layers of a file that mixes both
  spellings, and TrainTrain reads diffusers paths only. ComfyUI and kohya's loader map both
  spellings to the same layer and apply it once; A1111 applies the LDM one and lists the other
  as unmatched.

Reading accepts, besides those names, the LDM spelling of every UNet layer (kohya's SDXL files)
and the text-encoder names earlier versions of this project wrote (``lora_te_encoder_layers_...``);
a layer found under two spellings must hold the same weights under both.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from torch import nn

UNET_PREFIX = "lora_unet"
TEXT_MODEL_LEVEL = "text_model."
_UPSAMPLER = re.compile(r"up_blocks\.(\d+)\.upsamplers\.0\.conv")


def is_text_encoder_prefix(prefix: str) -> bool:
    """kohya's text-encoder prefixes are lora_te, lora_te1 and lora_te2."""
    return prefix.startswith("lora_te")


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _without_text_model_level(path: str) -> str:
    return path[len(TEXT_MODEL_LEVEL):] if path.startswith(TEXT_MODEL_LEVEL) else path


def _unet_config(unet: nn.Module) -> dict[str, Any]:
    config = getattr(unet, "config", None)
    return dict(config) if config is not None else {}


def _ldm_path(module_path: str, config: dict[str, Any]) -> str | None:
    """The original (LDM / SGM) path of a diffusers UNet module, or None where there is none."""
    from difftrain.models.single_file import unet_key_to_original

    if not config.get("block_out_channels"):
        return None
    try:
        return unet_key_to_original(module_path + ".weight", config)[:-len(".weight")]
    except KeyError:
        return None


def _a1111_misplaces(module_path: str, config: dict[str, Any]) -> bool:
    """Whether A1111's diffusers-to-LDM arithmetic sends this upsampler to the wrong slot."""
    match = _UPSAMPLER.fullmatch(module_path)
    if not match:
        return False
    level = int(match[1])
    up_block_types = config.get("up_block_types") or ()
    has_attention = level < len(up_block_types) and "CrossAttn" in up_block_types[level]
    return has_attention != (level > 0)


def file_keys(prefix: str, module_path: str, root: nn.Module) -> list[str]:
    """The names a LoRA file gives the layer ``module_path`` of ``root``: the main one, then the
    copy A1111 needs where its arithmetic misplaces the layer (see the module doc)."""
    if is_text_encoder_prefix(prefix):
        return [f"{prefix}_text_model_{_underscored(_without_text_model_level(module_path))}"]
    names = [f"{prefix}_{_underscored(module_path)}"]
    config = _unet_config(root)
    if _a1111_misplaces(module_path, config):
        ldm = _ldm_path(module_path, config)
        if ldm is not None:
            names.append(f"{prefix}_{_underscored(ldm)}")
    return names


def file_key(prefix: str, module_path: str, root: nn.Module) -> str:
    """The main name a LoRA file gives the layer ``module_path`` of ``root``."""
    return file_keys(prefix, module_path, root)[0]


def accepted_keys(prefix: str, module_path: str, root: nn.Module) -> list[str]:
    """Every name under which a file may hold this layer, the written one first."""
    names = file_keys(prefix, module_path, root)
    if is_text_encoder_prefix(prefix):
        names.append(f"{prefix}_{_underscored(_without_text_model_level(module_path))}")  # before issue 17
    else:
        names.append(f"{prefix}_{_underscored(module_path)}")
        ldm = _ldm_path(module_path, _unet_config(root))
        if ldm is not None:
            names.append(f"{prefix}_{_underscored(ldm)}")  # kohya's SDXL files
    return list(dict.fromkeys(names))


def key_lookup(modules: dict[str, nn.Module], paths: dict[str, Iterable[str]]) -> dict[str, tuple[str, str]]:
    """{any accepted file name: (prefix, module path)} for the layers ``paths[prefix]`` of each
    ``modules[prefix]``."""
    lookup: dict[str, tuple[str, str]] = {}
    for prefix, root in modules.items():
        for path in paths.get(prefix, ()):
            for name in accepted_keys(prefix, path, root):
                lookup.setdefault(name, (prefix, path))
    return lookup


def layer_of(key: str) -> str:
    """The layer name of a tensor key: everything before the first '.'."""
    return key.split(".", 1)[0]
