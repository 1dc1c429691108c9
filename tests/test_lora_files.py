"""LoRA, LoCon and LoHa files load whole in A1111, ComfyUI and kohya's sd-scripts (issue 17).

Each program's look-up rule is written out below, in our words, from its source:

* ComfyUI (comfy/lora.py, model_lora_keys_unet / model_lora_keys_clip; comfy/utils.py,
  unet_to_diffusers): a UNet layer is found as ``lora_unet_`` + its original (LDM) module path,
  or as ``lora_unet_`` + its diffusers path, which ComfyUI translates by counting blocks from the
  model's config (an upsampler sits after the ResNet, and after the attention where the level
  has one). A text-encoder layer is found only as ``lora_te_text_model_encoder_layers_<N>_<part>``
  (SD1 / SD2; ``lora_te1_`` too for CLIP-L) or ``lora_te1_`` / ``lora_te2_`` (SDXL), where part
  is one of mlp_fc1, mlp_fc2, self_attn_{q,k,v,out}_proj. Keys it does not find are dropped
  with a "lora key not loaded" warning.
* A1111 (extensions-builtin/Lora/networks.py): the layer name goes through
  convert_diffusers_name_to_compvis, which turns diffusers paths into LDM names with fixed
  arithmetic (input block 1 + level * (layers + 1) + index; an up level's upsampler in slot 1
  for level 0, slot 2 after it; A1111 writes layers = 2, the value of every real SD UNet),
  ``lora_te_text_model_...`` into ``transformer_text_model_...`` (SD1) or the OpenCLIP names
  (SD2), ``lora_te2_...`` into ``1_model_transformer_resblocks_...``. The result must name a
  module of the loaded model; failing that, a ``_q_proj`` / ``_k_proj`` / ``_v_proj`` suffix is
  cut (OpenCLIP's fused attention), then ``lora_unet`` is replaced by ``diffusion_model`` and
  ``lora_te1_text_model`` by ``0_transformer_text_model``. Unmatched keys are dropped. A layer is
  taken by the LoRA module type with lora_up.weight and lora_down.weight, by the LoHa type with
  hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b.
* kohya's sd-scripts (networks/lora.py): its network is made of every Linear and Conv2d inside
  Transformer2DModel blocks (and, with conv_dim, inside ResnetBlock2D, Downsample2D and
  Upsample2D), named ``lora_unet_`` + path, and of every Linear in CLIPAttention / CLIPMLP,
  named ``lora_te[1|2]_`` + path in transformers' CLIPTextModel (``text_model.encoder...``).
  Its SD1/SD2 UNet uses diffusers paths, its SDXL UNet the original LDM ones; loading an SDXL
  file it first renames diffusers paths to LDM ones (convert_diffusers_to_sai_if_needed).
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from torch import nn

from difftrain.errors import ConfigError
from difftrain.models import lora as lora_io

NETWORK_TYPES = ("lierla", "c3lier", "loha")
CLIP_PARTS = ("mlp_fc1", "mlp_fc2", "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")


# ---- the tiny models and the networks on them --------------------------------------------------------

def _load(folder):
    from difftrain.models.sd import load_sd

    return load_sd(folder)


@pytest.fixture(scope="module")
def sd15(tiny_sd15):
    return _load(tiny_sd15)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    return _load(tiny_sdxl)


def _single_file_modules(folder) -> set[str]:
    """Module paths (parameter key minus its last part) of the model's A1111 single file."""
    from safetensors import safe_open

    from difftrain.tiny import single_file_path

    with safe_open(str(single_file_path(folder)), framework="pt") as handle:
        return {key.rsplit(".", 1)[0] for key in handle.keys()}


def _build(sd, network_type: str, strength_seed: int = 0, *, rank: int = 2, alpha: float = 1.0):
    """A fresh copy of ``sd``'s UNet and text encoders with the network on them, its weights
    random (not the zero start), as {prefix: module}."""
    import copy

    unet = copy.deepcopy(sd.unet)
    encoders = [copy.deepcopy(encoder) for encoder in sd.text_encoders]
    conv_rank = 0 if network_type == "lierla" else 2
    linear, convolutions = lora_io.unet_target_modules(unet, "Full", conv_rank)
    lora_io.add_lora(unet, linear, rank, alpha, conv_targets=convolutions, conv_rank=conv_rank, conv_alpha=1.0,
                     network_type=network_type)
    for encoder in encoders:
        lora_io.add_lora(encoder, lora_io.text_encoder_target_modules(encoder), rank, alpha, network_type=network_type)
    modules = {"lora_unet": unet, **dict(zip(lora_io.text_encoder_prefixes(sd.family), encoders))}
    generator = torch.Generator().manual_seed(strength_seed)
    with torch.no_grad():
        for module in modules.values():
            for name, parameter in module.named_parameters():
                if parameter.requires_grad:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return modules


# ---- the programs' rules (see the module docstring) -------------------------------------------------

def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _level_layout(unet) -> tuple[int, list[bool], list[bool]]:
    """(layers per level, whether each down level has attention, whether each up level has)."""
    config = unet.config
    layers = config.layers_per_block if isinstance(config.layers_per_block, int) else config.layers_per_block[0]
    return (layers, ["CrossAttn" in kind for kind in config.down_block_types],
            ["CrossAttn" in kind for kind in config.up_block_types])


_RESNET_PARTS = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
                 "conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}


def comfy_diffusers_to_ldm(path: str, unet) -> str | None:
    """ComfyUI's unet_to_diffusers, read backwards: the LDM path of a diffusers UNet path."""
    layers, _, up_attention = _level_layout(unet)
    match = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", path)
    if match:
        side, level, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if side == "down":
            start = 1 + (layers + 1) * level
            if kind == "downsamplers":
                return f"input_blocks.{start + layers}.0.{rest.replace('conv', 'op', 1)}"
            block = f"input_blocks.{start + index}"
        else:
            start = (layers + 1) * level
            if kind == "upsamplers":
                return f"output_blocks.{start + layers}.{2 if up_attention[level] else 1}.{rest}"
            block = f"output_blocks.{start + index}"
        if kind == "attentions":
            return f"{block}.1.{rest}"
        part, _, leaf = rest.partition(".")
        return f"{block}.0.{_RESNET_PARTS[part]}" + (f".{leaf}" if leaf else "") if part in _RESNET_PARTS else None
    match = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", path)
    if match:
        if match[1] == "attentions":
            return f"middle_block.1.{match[3]}"
        part, _, leaf = match[3].partition(".")
        return f"middle_block.{2 * int(match[2])}.{_RESNET_PARTS[part]}" + (f".{leaf}" if leaf else "")
    return None


def comfyui_names(sd, folder) -> set[str]:
    """Every layer name ComfyUI's key map holds for this model (both text-encoder prefixes)."""
    ldm = {path[len("model.diffusion_model."):] for path in _single_file_modules(folder)
           if path.startswith("model.diffusion_model.")}
    names = {"lora_unet_" + _underscored(path) for path in ldm}
    for path, module in sd.unet.named_modules():
        if getattr(module, "weight", None) is not None and comfy_diffusers_to_ldm(path, sd.unet) in ldm:
            names.add("lora_unet_" + _underscored(path))
    prefixes = {"sd1": ["lora_te", "lora_te1"], "sd2": ["lora_te"], "sdxl": ["lora_te1", "lora_te2"]}[sd.family]
    for index, prefix in enumerate(prefixes):
        encoder = sd.text_encoders[min(index, len(sd.text_encoders) - 1)]
        layers = encoder.config.num_hidden_layers
        names |= {f"{prefix}_text_model_encoder_layers_{n}_{part}" for n in range(layers) for part in CLIP_PARTS}
    return names


def a1111_convert(key: str, layers: int, is_sd2: bool) -> str:
    """A1111's convert_diffusers_name_to_compvis with the block count per level as a parameter."""
    step = layers + 1
    resnet = {"conv1": "in_layers_2", "conv2": "out_layers_3", "time_emb_proj": "emb_layers_1",
              "conv_shortcut": "skip_connection"}

    def suffix(kind, rest):
        return resnet.get(rest, rest) if kind == "resnets" else rest

    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[1]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * step + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{suffix(m[1], m[3])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * step + int(m[3])}_"
                   f"{1 if m[2] == 'attentions' else 0}_{suffix(m[2], m[4])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{layers + 1 + int(m[1]) * step}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{layers + int(m[1]) * step}_{2 if int(m[1]) > 0 else 1}_conv"),
    ]
    for pattern, build in rules:
        match = re.match(pattern, key)
        if match:
            return build(match)
    openclip = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "self_attn": "attn"}
    match = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if match and not is_sd2:
        return f"transformer_text_model_encoder_layers_{match[1]}_{match[2]}"
    match = match or re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if match:
        part = next((match[2].replace(a, b) for a, b in openclip.items() if a in match[2]), match[2])
        lead = "" if key.startswith("lora_te_") else "1_"
        return f"{lead}model_transformer_resblocks_{match[1]}_{part}"
    return key


def a1111_modules(sd, folder) -> set[str]:
    """A1111's network_layer_mapping: the loaded model's module names, '.' -> '_'."""
    names = set()
    for path in _single_file_modules(folder):
        for parent, wrapped in (("model.", ""), ("cond_stage_model.", ""), ("conditioner.embedders.", "")):
            if path.startswith(parent):
                names.add(_underscored(wrapped + path[len(parent):]))
    # an OpenCLIP attention is one module whose in_proj_weight holds q, k and v
    return names | {name[:-len("_in_proj")] for name in names if name.endswith("_in_proj")}


def a1111_finds(layer: str, mapping: set[str], sd) -> bool:
    layers, _, _ = _level_layout(sd.unet)
    key = a1111_convert(layer, layers, sd.family == "sd2")
    if key in mapping:
        return True
    match = re.match(r"(.*)_([qkv]_proj)$", key)
    if match and match[1] in mapping:
        return True
    if "lora_unet" in layer:
        return layer.replace("lora_unet", "diffusion_model") in mapping
    if "lora_te1_text_model" in layer:
        return layer.replace("lora_te1_text_model", "0_transformer_text_model") in mapping or \
            layer.replace("lora_te1_text_model", "transformer_text_model") in mapping
    return False


def kohya_names(sd, network_type: str) -> set[str]:
    """The layer names kohya's network has for this model (SDXL: LDM paths)."""
    blocks = ["Transformer2DModel"] + ([] if network_type == "lierla" else ["ResnetBlock2D", "Downsample2D", "Upsample2D"])
    names = set()
    for path, module in sd.unet.named_modules():
        if type(module).__name__ in blocks:
            for child, layer in module.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d)):
                    full = f"{path}.{child}"
                    if sd.family == "sdxl":
                        full = comfy_diffusers_to_ldm(full, sd.unet)
                    names.add("lora_unet_" + _underscored(full))
    prefixes = ["lora_te1", "lora_te2"] if sd.family == "sdxl" else ["lora_te"]
    for prefix, encoder in zip(prefixes, sd.text_encoders):
        names |= {f"{prefix}_text_model_encoder_layers_{n}_{part}"
                  for n in range(encoder.config.num_hidden_layers) for part in CLIP_PARTS}
    return names


def kohya_reads_as(layer: str, sd) -> str:
    """kohya's SDXL loader renames diffusers UNet paths to LDM ones before looking them up."""
    if sd.family != "sdxl" or not layer.startswith("lora_unet_") or not re.search("(down|up)_blocks|mid_block", layer):
        return layer
    by_underscored = {_underscored(path): path for path, _ in sd.unet.named_modules() if path}
    path = by_underscored[layer[len("lora_unet_"):]]
    return "lora_unet_" + _underscored(comfy_diffusers_to_ldm(path, sd.unet))


# ---- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("network_type", NETWORK_TYPES)
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_layer_written_is_one_a1111_comfyui_and_kohya_look_up(family, network_type, request):
    folder = request.getfixturevalue(f"tiny_{family}")
    sd = request.getfixturevalue(family)
    state = lora_io.lora_state_dict(_build(sd, network_type))
    layers = {key.split(".", 1)[0] for key in state}
    parts = {key.split(".", 1)[1] for key in state}
    expected_parts = ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"} if network_type == "loha"
                      else {"lora_down.weight", "lora_up.weight", "alpha"})
    assert expected_parts <= parts <= expected_parts | {"hada_t1", "hada_t2"}
    prefixes = {"sd15": {"lora_unet", "lora_te"}, "sdxl": {"lora_unet", "lora_te1", "lora_te2"}}[family]
    assert {re.match(r"lora_(unet|te\d?)", layer)[0] for layer in layers} == prefixes

    # the whole network is written: every adapted module, once (plus A1111's copy, below)
    from difftrain.models.lora_keys import file_keys

    modules = _build(sd, network_type)
    written = [file_keys(prefix, name, module) for prefix, module in modules.items()
               for name, _, _ in lora_io._adapted_layers(module, "default")]
    assert sorted(name for names in written for name in names) == sorted(layers)

    comfy = comfyui_names(sd, folder)
    assert sorted(layers - comfy) == []
    mapping = a1111_modules(sd, folder)
    assert [names for names in written if not any(a1111_finds(name, mapping, sd) for name in names)] == []
    kohya = kohya_names(sd, network_type)
    assert sorted({kohya_reads_as(layer, sd) for layer in layers} - kohya) == []
    copies = [names for names in written if len(names) > 1]
    assert all(not a1111_finds(main, mapping, sd) for main, _ in copies)  # why the copy is there
    upsampler = "up_blocks.0.upsamplers.0.conv"
    assert copies == ([["lora_unet_" + _underscored(upsampler),
                        "lora_unet_" + _underscored(comfy_diffusers_to_ldm(upsampler, sd.unet))]]
                      if family == "sdxl" and network_type != "lierla" else [])
    for main, copy in copies:
        assert all(torch.equal(state[key], state[key.replace(main, copy)]) for key in state if key.startswith(main + "."))


def test_text_encoder_names_are_the_same_whatever_layout_transformers_gives_clip(sd15):
    encoder = sd15.text_encoders[0]
    flat = {name for name, _ in encoder.named_modules()}
    wrapper = nn.Module()
    wrapper.text_model = encoder  # the layout transformers had before CLIPTextModel lost this level
    nested = [name for name in lora_io.text_encoder_target_modules(wrapper)]
    assert nested and all(name.startswith("text_model.") and name[len("text_model."):] in flat for name in nested)
    from difftrain.models.lora_keys import file_key

    assert sorted(file_key("lora_te", name, wrapper) for name in nested) == \
        sorted(file_key("lora_te", name, encoder) for name in lora_io.text_encoder_target_modules(encoder))
    assert all(file_key("lora_te", name, wrapper).startswith("lora_te_text_model_encoder_layers_") for name in nested)


def _unet_output(unet, sd, seed=0):
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    sample = torch.randn(1, config.in_channels, 16, 16, generator=generator)
    context = torch.randn(1, 77, config.cross_attention_dim, generator=generator)
    extra = {}
    if sd.family == "sdxl":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, sd.text_encoders[1].config.projection_dim,
                                                                 generator=generator),
                                      "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(sample, 10, encoder_hidden_states=context, **extra).sample


@pytest.mark.parametrize("network_type", NETWORK_TYPES)
def test_a_saved_network_loads_back_exactly(tmp_path, sdxl, network_type):
    trained = _build(sdxl, network_type, strength_seed=1)
    path = lora_io.save_lora_file(tmp_path / "net.safetensors", lora_io.lora_state_dict(trained),
                                  lora_io.lora_metadata(family="sdxl", rank=2, alpha=1.0, output_name="net",
                                                        network_type=network_type))
    state, metadata = lora_io.read_lora_file(path)
    fresh = _build(sdxl, network_type, strength_seed=2)
    assert not torch.equal(_unet_output(fresh["lora_unet"], sdxl), _unet_output(trained["lora_unet"], sdxl))
    lora_io.load_lora_state_dict(fresh, state, str(path))
    torch.testing.assert_close(_unet_output(fresh["lora_unet"], sdxl), _unet_output(trained["lora_unet"], sdxl))
    again = lora_io.lora_state_dict(fresh)
    assert again.keys() == state.keys() and all(torch.equal(again[key], state[key]) for key in state)
    assert metadata["ss_network_module"] == ("lycoris.kohya" if network_type == "loha" else "networks.lora")


def _weight_change(state: dict, layer: str) -> torch.Tensor:
    """The change a file's layer makes to its weight, computed as A1111 and ComfyUI do."""
    alpha = float(state[f"{layer}.alpha"])
    if f"{layer}.lora_down.weight" in state:
        down, up = state[f"{layer}.lora_down.weight"], state[f"{layer}.lora_up.weight"]
        return (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0]
    halves = []
    for half in ("1", "2"):
        a, b = state[f"{layer}.hada_w{half}_a"], state[f"{layer}.hada_w{half}_b"]
        core = state.get(f"{layer}.hada_t{half}")
        # Tucker form (3x3 convolutions): the core joins the rank axes, a and b the channels
        halves.append(a @ b if core is None else torch.einsum("i j ..., j r, i p -> p r ...", core, b, a))
    return halves[0] * halves[1] * alpha / state[f"{layer}.hada_w1_b"].shape[0]


@pytest.mark.parametrize("network_type", ["lierla", "loha"])
def test_network_strength_is_baked_into_the_saved_weights(sd15, network_type):
    modules = _build(sd15, network_type)
    one = lora_io.lora_state_dict(modules)
    layers = sorted({key.split(".", 1)[0] for key in one})
    assert any(f"{layer}.hada_t1" in one for layer in layers) == (network_type == "loha")
    for strength in (2.0, 0.5, -1.0):
        scaled = lora_io.lora_state_dict(modules, strength=strength)
        for layer in layers:
            torch.testing.assert_close(_weight_change(scaled, layer), strength * _weight_change(one, layer))
            assert torch.equal(scaled[f"{layer}.alpha"], one[f"{layer}.alpha"])


def test_c3lier_covers_kohya_locon_layers_at_their_ranks(sd15):
    linear, convolutions = lora_io.unet_target_modules(sd15.unet, "Full", conv_rank=2)
    ours = {"lora_unet_" + _underscored(name) for name in linear + convolutions}
    assert ours == {name for name in kohya_names(sd15, "c3lier") if name.startswith("lora_unet_")}
    assert any(name.endswith("time_emb_proj") for name in linear)
    assert any(name.endswith("conv_shortcut") for name in linear)
    modules = dict(sd15.unet.named_modules())
    assert all(modules[name].kernel_size == (3, 3) for name in convolutions)
    plain, none = lora_io.unet_target_modules(sd15.unet, "Full", conv_rank=0)
    assert not none and not any(".resnets." in name for name in plain)
    attn2, _ = lora_io.unet_target_modules(sd15.unet, "CrossAttention", conv_rank=2)
    assert attn2 and all(".attn2." in name for name in attn2)  # TrainTrain: the element filter wins


def _rename_layers(state: dict, rename) -> dict:
    return {rename(key.split(".", 1)[0]) + "." + key.split(".", 1)[1]: value for key, value in state.items()}


def test_files_of_earlier_versions_and_kohya_sdxl_files_load(sdxl):
    trained = _build(sdxl, "c3lier", strength_seed=3)
    state = lora_io.lora_state_dict(trained)
    # before issue 17: text encoders without 'text_model', every UNet layer under its diffusers path
    old = _rename_layers(state, lambda layer: layer.replace("_text_model_", "_").replace(
        "lora_unet_output_blocks_2_2_conv", "lora_unet_up_blocks_0_upsamplers_0_conv"))
    assert old.keys() != state.keys() and any(key.startswith("lora_te1_encoder_layers_0_") for key in old)
    # kohya's SDXL files: every UNet layer under its LDM path
    unet_paths = {_underscored(path): path for path, _ in sdxl.unet.named_modules() if path}

    def to_ldm(layer):
        if not layer.startswith("lora_unet_") or layer[len("lora_unet_"):] not in unet_paths:
            return layer
        return "lora_unet_" + _underscored(comfy_diffusers_to_ldm(unet_paths[layer[len("lora_unet_"):]], sdxl.unet))

    kohya = _rename_layers(state, to_ldm)
    assert any(key.startswith("lora_unet_input_blocks_") for key in kohya)
    for variant in (old, kohya):
        fresh = _build(sdxl, "c3lier", strength_seed=4)
        lora_io.load_lora_state_dict(fresh, variant, "variant")
        loaded = lora_io.lora_state_dict(fresh)
        assert all(torch.equal(loaded[key], state[key]) for key in state)


def test_a_file_that_does_not_fit_is_refused_with_the_reason(sd15):
    lora = lora_io.lora_state_dict(_build(sd15, "lierla"))
    loha_network = _build(sd15, "loha")
    with pytest.raises(ConfigError, match="network_type"):
        lora_io.load_lora_state_dict(loha_network, lora, "lora.safetensors")
    twice = dict(lora)
    twice.update(_rename_layers({k: v + 1 for k, v in lora.items() if k.startswith("lora_te_")},
                                lambda layer: layer.replace("_text_model_", "_")))
    with pytest.raises(ConfigError, match="twice"):
        lora_io.load_lora_state_dict(_build(sd15, "lierla"), twice, "twice.safetensors")
    fewer = {k: v for k, v in lora.items() if not k.startswith("lora_te_")}
    with pytest.raises(ConfigError, match="not in it"):
        lora_io.load_lora_state_dict(_build(sd15, "lierla"), fewer, "fewer.safetensors")


def test_diffusers_loads_every_layer_of_an_sd15_lora_with_its_text_encoder(tmp_path, sd15, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    modules = _build(sd15, "c3lier", strength_seed=5)
    path = lora_io.save_lora_file(tmp_path / "net.safetensors", lora_io.lora_state_dict(modules, strength=1.5), {})
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    pipeline.load_lora_weights(str(path))
    lora_io.set_multiplier(modules.values(), 1.5)
    torch.testing.assert_close(_unet_output(pipeline.unet, sd15), _unet_output(modules["lora_unet"], sd15),
                               atol=1e-5, rtol=1e-4)
    tokens = torch.tensor([[49406, 3, 4, 49407] + [49407] * 73])
    with torch.no_grad():
        ours = modules["lora_te"](tokens.clamp(max=modules["lora_te"].config.vocab_size - 1)).last_hidden_state
        theirs = pipeline.text_encoder(tokens.clamp(max=modules["lora_te"].config.vocab_size - 1)).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-4)


def test_metadata_has_what_kohya_writes(tmp_path, sd15):
    training = lora_io.kohya_training_metadata(
        session_id=1234, started_at=1700000000.5, optimizer="AdamW", optimizer_args="weight_decay=0.01",
        lr_scheduler="cosine", mixed_precision="bf16", learning_rate=1e-4, seed=7, max_train_steps=100,
        resolution=(512, 768), captions=[("data/cats", "a cat, Sitting"), ("data/cats", "a cat"), ("data/dogs", "")],
        batch_size=2, gradient_accumulation_steps=3)
    metadata = lora_io.lora_metadata(family="sd2", rank=4, alpha=2.0, output_name="mine", conv_rank=2,
                                     conv_alpha=1.0, prediction_type="v_prediction", extra=training)
    assert json.loads(metadata["ss_tag_frequency"]) == {"cats": {"a cat": 2, "sitting": 1}, "dogs": {}}
    assert json.loads(metadata["ss_dataset_dirs"]) == {"cats": {"n_repeats": 1, "img_count": 2},
                                                       "dogs": {"n_repeats": 1, "img_count": 1}}
    assert metadata["ss_optimizer"] == "AdamW(weight_decay=0.01)" and metadata["ss_lr_scheduler"] == "cosine"
    assert metadata["ss_mixed_precision"] == "bf16" and metadata["ss_session_id"] == "1234"
    assert metadata["ss_training_started_at"] == "1700000000.5" and metadata["ss_num_train_images"] == "3"
    assert metadata["ss_resolution"] == "(768, 512)" and metadata["ss_total_batch_size"] == "6"
    assert metadata["ss_base_model_version"] == "sd_v2_v" and metadata["ss_v2"] == "True"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert all(isinstance(value, str) for value in metadata.values())
    # sshs_model_hash: sha256 of the tensor bytes after the header, as A1111's addnet hash reads it
    path = lora_io.save_lora_file(tmp_path / "mine.safetensors", lora_io.lora_state_dict(_build(sd15, "lierla")),
                                  metadata)
    data = path.read_bytes()
    _, written = lora_io.read_lora_file(path)
    assert written["sshs_model_hash"] == hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{8}", written["sshs_legacy_hash"])


@pytest.mark.parametrize("preset", ["LoRA.json", "Difference_Use2ndPass.json", "ADDifT_Style_XL.json", "iLECO.json"])
def test_save_as_json_writes_traintrain_keys_that_load_back_as_the_same_run(preset, tmp_path):
    from pathlib import Path

    from difftrain.vocab import traintrain
    from difftrain.vocab.traintrain_export import traintrain_settings

    shipped = json.loads((Path(__file__).parent / "real_files" / "traintrain" / preset).read_text(encoding="utf-8"))
    shipped.update({"model": "base.safetensors", "image_size(height, width)": "512,768"})
    config = traintrain.load(None, data=shipped, say_notes=False)
    written = traintrain_settings(config)
    assert set(written) <= set(traintrain.TABLE.rows)  # TrainTrain's names only
    assert written["image_size(height, width)"] == "512,768"
    (tmp_path / "run.json").write_text(json.dumps(written), encoding="utf-8")
    again = traintrain.load(tmp_path / "run.json", say_notes=False)
    assert again.model_dump() == config.model_dump()


def test_a_loha_run_exports_network_strength_baked_kohya_metadata_and_traintrain_json(tmp_path, tiny_sd15, one_thread):
    """A whole run: LoHa trains, the export is network_strength times the checkpoint's network, its
    metadata carries the captions' tags, save_as_json writes TrainTrain's keys."""
    from PIL import Image

    from difftrain.config import validate_config_dict
    from difftrain.engine import run
    from difftrain.vocab import traintrain

    images = tmp_path / "cats"
    images.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30)]):
        Image.new("RGB", (64, 64), colour).save(images / f"{index}.png")
        (images / f"{index}.txt").write_text("a cat, Red" if index == 0 else "a cat", encoding="utf-8")
    settings = {"task": "sd", "mode": "LoRA", "resume_ckpt": str(tiny_sd15), "data_root": str(images),
                "resolution": 64, "max_steps": 2, "batch_size": 2, "lr": 1e-2, "seed": 3, "sample_steps": 0,
                "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"),
                "ckpt_every_n_minutes": 0, "project_name": "lohatest", "network_type": "loha", "network_rank": 2,
                "network_alpha": 1.0, "network_strength": 2.0, "save_precision": "fp32", "save_as_json": True,
                "lora_dir": str(tmp_path / "loras"), "save_lora_name": "cat"}
    assert run(validate_config_dict(settings)) == 0
    exported, metadata = lora_io.read_lora_file(tmp_path / "loras" / "cat.safetensors")
    (log_folder,) = (tmp_path / "logs").iterdir()
    (checkpoint,) = (log_folder / "ckpts").glob("last-*")
    trained, _ = lora_io.read_lora_file(checkpoint / "lora.safetensors")
    assert exported.keys() == trained.keys() and any(key.endswith(".hada_w2_b") for key in exported)
    layers = sorted({key.split(".", 1)[0] for key in exported})
    moved = [layer for layer in layers if _weight_change(trained, layer).abs().max() > 0]
    assert moved  # the run trained something
    for layer in layers:
        torch.testing.assert_close(_weight_change(exported, layer), 2.0 * _weight_change(trained, layer))
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"])["algo"] == "loha"
    assert json.loads(metadata["ss_tag_frequency"]) == {"cats": {"a cat": 2, "red": 1}}
    assert metadata["ss_optimizer"] == "AdamW" and metadata["ss_mixed_precision"] == "no"
    assert float(metadata["ss_training_started_at"]) <= float(metadata["ss_training_finished_at"])
    saved = json.loads((tmp_path / "loras" / "cat.json").read_text(encoding="utf-8"))
    assert set(saved) <= set(traintrain.TABLE.rows)
    assert saved["network_type"] == "loha" and saved["network_strength"] == 2.0


@pytest.mark.parametrize("network_type", ["lierla", "loha"])
def test_a_frozen_copier_adds_to_the_trained_network(sd15, network_type):
    """Difference's second pass: the copier file applied, frozen, beside the adapter that trains."""
    copier = lora_io.lora_state_dict({"lora_unet": _build(sd15, network_type, strength_seed=6)["lora_unet"]})
    alone = _build(sd15, network_type, strength_seed=7)["lora_unet"]
    both = _build(sd15, network_type, strength_seed=7)["lora_unet"]
    lora_io.add_lora_from_state(both, "lora_unet", copier, "copier.safetensors", adapter_name="copier")
    lora_io.activate_adapters([both], ["copier", "default"])
    trainable = {name for name, parameter in both.named_parameters() if parameter.requires_grad}
    assert trainable == {name for name, parameter in alone.named_parameters() if parameter.requires_grad}
    # a layer of the UNet now changes its weight by the sum of the two networks' changes
    trained = lora_io.lora_state_dict({"lora_unet": alone})
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    layer = "lora_unet_" + _underscored(path)
    original = dict(sd15.unet.named_modules())[path]
    weight = original.weight + _weight_change(trained, layer) + _weight_change(copier, layer)
    x = torch.randn(3, original.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dict(both.named_modules())[path](x), nn.functional.linear(x, weight, original.bias))
