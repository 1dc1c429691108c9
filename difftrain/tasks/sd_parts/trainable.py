"""What trains in a Stable Diffusion run: the whole UNet (`FullTrainable`) or LoRA adapters on a
frozen base (`LoraTrainable`), the module the loop wraps (`SDTrainable`), and how each is written
into and read back from a checkpoint folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.models import lora as lora_io
from difftrain.models.sd import SDModel
from difftrain.tasks.sd_parts.base_model import LoadedBase, find_lora_file
from difftrain.tasks.sd_parts.conditioning import to_device

LORA_FILE = "lora.safetensors"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FSDP_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move `module` to device and dtype; casting only when needed keeps diffusers from warning."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module


def trains_text_encoders(config: Config) -> bool:
    """network_train_text_encoder asks for it; with network_blocks given, TrainTrain trains the
    text encoders only when the list includes BASE. (Modes that train the UNet only do not ask.)"""
    if not config.network_train_text_encoder:
        return False
    blocks = lora_io.check_block_names(config.network_blocks)
    return not blocks or "BASE" in blocks


class SDTrainable(nn.Module):
    """The modules whose parameters train: the UNet, plus the text encoders when they train.

    Called like the objectives' models, ``model(x_t, timestep, **cond)`` -> (B, 4, h, w), where
    cond is either precomputed ``encoder_hidden_states`` (B, 77, D) [+ ``added_cond_kwargs``
    for SDXL], or ``captions`` (list of B strings) [+ ``time_ids`` (B, 6)] to encode with the
    trained text encoders inside this forward (so that gradients and autocast reach them).
    """

    def __init__(self, sd: SDModel, train_text_encoders: bool):
        super().__init__()
        self.unet = sd.unet
        self.text_encoders = nn.ModuleList(sd.text_encoders if train_text_encoders else [])
        self._sd = [sd]  # a list, so nn.Module does not register the frozen VAE as ours

    @property
    def _no_split_modules(self) -> list[str]:
        """FSDP's units under a TRANSFORMER_BASED_WRAP accelerate config: the UNet's attention and
        residual blocks, the text encoders' layers when they train (those of them this model has)."""
        present = {type(module).__name__ for module in self.modules()}
        return [name for name in FSDP_BLOCKS if name in present]

    def encode_captions(self, captions: Sequence[str], time_ids: Optional[torch.Tensor] = None) -> dict[str, Any]:
        return self._sd[0].encode_prompts(list(captions), time_ids=time_ids)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *, encoder_hidden_states=None,
                added_cond_kwargs=None, captions=None, time_ids=None, perturb_embeddings=None) -> torch.Tensor:
        if captions is not None:
            cond = self.encode_captions(captions, time_ids)
            encoder_hidden_states, added_cond_kwargs = cond["encoder_hidden_states"], cond.get("added_cond_kwargs")
            if perturb_embeddings is not None:  # the objective's embedding_perturbation
                encoder_hidden_states = perturb_embeddings(encoder_hidden_states)
        dtype = self.unet.conv_in.weight.dtype
        device = self.unet.conv_in.weight.device
        return self.unet(sample.to(device, dtype), timestep.to(device),
                         encoder_hidden_states=encoder_hidden_states.to(device, dtype),
                         added_cond_kwargs=to_device(added_cond_kwargs, device, dtype) if added_cond_kwargs else None,
                         return_dict=False)[0]


@dataclass(frozen=True)
class TextEncoderFreezing:
    """Which parts of a CLIP text encoder train (EveryDream2's text_encoder_freezing, resolved)."""

    trained_layers: int  # the last this many of its layers
    embeddings: bool
    final_layer_norm: bool


def text_encoder_freezing(config: Config, layer_count: int) -> TextEncoderFreezing:
    """EveryDream2's rule (optimizer/optimizers.py, _apply_text_encoder_freeze): unfreeze_last_n_layers
    wins over freeze_front_n_layers (negative: all but the last -N); when fewer than all layers
    train the embeddings freeze too, unless freeze_embeddings says otherwise; the final layer norm
    trains unless freeze_final_layer_norm."""
    trained = config.text_encoder_unfreeze_last_n_layers
    front = config.text_encoder_freeze_front_n_layers
    if trained is None and front is not None:
        trained = -front if front < 0 else layer_count - front
        if trained <= 0:
            raise ConfigError(f"text_encoder_freeze_front_n_layers {front} leaves none of the text encoder's "
                              f"{layer_count} layers to train; use a number below {layer_count}, or "
                              "disable_textenc_training to train no text encoder at all.")
    trained = layer_count if trained is None else min(trained, layer_count)
    embeddings = trained == layer_count if config.text_encoder_freeze_embeddings is None \
        else not config.text_encoder_freeze_embeddings
    return TextEncoderFreezing(trained, embeddings, not config.text_encoder_freeze_final_layer_norm)


def freeze_text_encoder_parts(encoder: nn.Module, config: Config) -> None:
    """Freeze what `text_encoder_freezing` says of a CLIP text encoder whose weights all train now.
    When any part freezes, an SDXL encoder's text projection (outside EveryDream2's rule, which
    knows SD1/SD2 encoders only) freezes with it."""
    text_model = getattr(encoder, "text_model", encoder)  # transformers 5 flattened CLIPTextModel
    layers = text_model.encoder.layers
    parts = text_encoder_freezing(config, len(layers))
    if parts == TextEncoderFreezing(len(layers), True, True):
        return
    encoder.requires_grad_(False)
    text_model.embeddings.requires_grad_(parts.embeddings)
    layers[len(layers) - parts.trained_layers:].requires_grad_(True)
    text_model.final_layer_norm.requires_grad_(parts.final_layer_norm)
    frozen = [f"layers 1-{len(layers) - parts.trained_layers}"] if parts.trained_layers < len(layers) else []
    frozen += [name for name, trains in (("embeddings", parts.embeddings),
                                         ("final layer norm", parts.final_layer_norm)) if not trains]
    say(f"text encoder ({len(layers)} layers): {', '.join(frozen)} frozen.")


FREEZING_SETTINGS = ("text_encoder_unfreeze_last_n_layers", "text_encoder_freeze_front_n_layers",
                     "text_encoder_freeze_embeddings", "text_encoder_freeze_final_layer_norm")


def note_unused_freezing(config: Config, reason: str) -> None:
    """One note when text-encoder freezing is set but nothing it freezes trains."""
    given = [name for name in FREEZING_SETTINGS if getattr(config, name) not in (None, False)]
    if given:
        say(f"note: {', '.join(given)} have no effect: {reason}.")


def model_view(sd: SDModel, model: SDTrainable, zero_terminal_snr: bool) -> SDModel:
    """`sd` with the (possibly unwrapped) trained modules of `model` in place, for pipelines and saving."""
    encoders = list(model.text_encoders) if len(model.text_encoders) else sd.text_encoders
    scheduler_config = dict(sd.scheduler_config)
    if zero_terminal_snr:
        # Inference must use the schedule the model was trained on, starting from its last step.
        scheduler_config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return dataclasses.replace(sd, unet=model.unet, text_encoders=encoders, scheduler_config=scheduler_config)


def parameter_groups(model: SDTrainable, text_encoder_lr: float) -> list[dict[str, Any]]:
    """The UNet's trainable parameters, and the text encoders' (at text_encoder_lr when set); a
    group without parameters (a frozen UNet) is left out. "module" names each group's owner."""
    unet = [p for p in model.unet.parameters() if p.requires_grad]
    text = [p for p in model.text_encoders.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": unet, "module": "unet"}] if unet else []
    if text:
        groups.append({"params": text, "module": "text_encoder", **({"lr": text_encoder_lr} if text_encoder_lr else {})})
    return groups


def enable_gradient_checkpointing(sd: SDModel, text_encoders_too: bool) -> None:
    sd.unet.enable_gradient_checkpointing()
    if text_encoders_too:
        for encoder in sd.text_encoders:
            encoder.gradient_checkpointing_enable()


class FullTrainable:
    """'Full': the UNet (and the text encoders when they train) in float32; a checkpoint is a
    diffusers pipeline folder (see `write`)."""

    is_lora = False

    def __init__(self, base: LoadedBase, config: Config, device: torch.device, frozen_dtype: torch.dtype,
                 train_text_encoders: bool):
        sd = base.sd
        self.config = config
        if not train_text_encoders:
            note_unused_freezing(config, "the text encoder does not train (disable_textenc_training)")
        place(sd.unet, device, torch.float32).requires_grad_(config.train_unet)
        # A frozen UNet still carries the text encoders' gradients; EveryDream2 keeps it in training
        # mode only when gradient checkpointing needs it.
        sd.unet.train(config.train_unet or config.gradient_checkpointing)
        for encoder in sd.text_encoders:
            if train_text_encoders:
                place(encoder, device, torch.float32).requires_grad_(True).train()
                freeze_text_encoder_parts(encoder, config)
            else:
                place(encoder, device, frozen_dtype).requires_grad_(False).eval()
        self.model = SDTrainable(sd, train_text_encoders)

    def write(self, view: SDModel, folder: Path) -> None:
        """A diffusers pipeline folder (StableDiffusionPipeline / StableDiffusionXLPipeline
        .from_pretrained(folder) loads it), the trained UNet in float32 so a resume is exact; with
        save_full_precision also `<project_name>.safetensors`, the A1111 single file."""
        view.save_pretrained(folder, overwrite=True)
        if self.config.save_full_precision:
            from difftrain.models.sd import export_single_file

            export_single_file(view, folder / f"{self.config.project_name}.safetensors", dtype=None)

    def load(self, model: SDTrainable, folder: Path) -> None:
        """Restore exactly what `write` wrote into `folder`."""
        from safetensors.torch import load_file

        modules = {"unet": model.unet}
        if len(model.text_encoders):
            modules.update(zip(["text_encoder", "text_encoder_2"][:len(model.text_encoders)], model.text_encoders))
        for name, module in modules.items():
            files = sorted((folder / name).glob("*.safetensors"))
            if not files:
                raise ConfigError(f"checkpoint '{folder}' lacks {name}/*.safetensors; it is incomplete or not "
                                  "a Full-mode Stable Diffusion checkpoint.")
            state: dict[str, torch.Tensor] = {}
            for file in files:
                state.update(load_file(str(file)))
            result = module.load_state_dict(state, strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
            if missing:
                raise ConfigError(f"checkpoint '{folder}': {name} lacks {len(missing)} weight(s) "
                                  f"(e.g. {missing[0]}); it does not match this model.")

    def state_dict(self, model: SDTrainable) -> dict[str, torch.Tensor]:
        """The UNet's weights, on the CPU."""
        return {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}


def conv_rank_alpha(config: Config) -> tuple[int, float]:
    """3x3-convolution rank and alpha: c3lier and loha fall back to network_rank / network_alpha
    (TrainTrain's rule for a conv rank or alpha of 0); lierla gets them only when set."""
    if config.network_type in ("c3lier", "loha"):
        return config.network_conv_rank or config.network_rank, config.network_conv_alpha or config.network_alpha
    return config.network_conv_rank, config.network_conv_alpha or float(config.network_conv_rank)


class LoraTrainable:
    """LoRA adapters on the frozen base's UNet (and text encoders when they train).

    A checkpoint holds `lora.safetensors` (kohya/A1111 keys, float32) and the base pointer. The
    adapter trains (and samples) at strength 1 except inside `strength(value)`; network_strength
    is baked into the exported files, as TrainTrain does (`save(..., strength=)`).
    `training_images`: (folder, caption) of each training image, for ss_tag_frequency.
    """

    is_lora = True

    def __init__(self, base: LoadedBase, config: Config, device: torch.device, frozen_dtype: torch.dtype,
                 train_text_encoders: bool, resuming: bool):
        sd, self.config, self.base = base.sd, config, base
        note_unused_freezing(config, f"mode {config.mode} trains LoRA adapters; text-encoder freezing applies to "
                                     "mode Full")
        place(sd.unet, device, frozen_dtype)
        for encoder in sd.text_encoders:
            place(encoder, device, frozen_dtype).requires_grad_(False).eval()
        self._add_unet_adapter(sd.unet)
        if train_text_encoders:
            for encoder in sd.text_encoders:
                lora_io.add_lora(encoder, lora_io.text_encoder_target_modules(encoder), config.network_rank,
                                 config.network_alpha, dtype=DTYPES[config.lora_precision],
                                 network_type=config.network_type)
        self.model = SDTrainable(sd, train_text_encoders)
        self.train_text_encoders = train_text_encoders
        if config.network_resume and not resuming:
            self.load_file(find_lora_file(config, config.network_resume, "network_resume"))
        self.multiplier = 1.0
        self.training_images: list[tuple[str, str]] = []
        self.started_at, self.session_id = time.time(), random.SystemRandom().randrange(2 ** 31)
        lora_io.set_multiplier(self.modules(self.model).values(), self.multiplier)

    def _add_unet_adapter(self, unet: nn.Module) -> None:
        config = self.config
        element = config.network_element
        if config.network_type == "loha" and element != "Full":
            say(f"note: network_element {element!r} has no effect with network_type 'loha' (as in TrainTrain); "
                "the LoHa covers every layer LoCon does.")
            element = "Full"
        conv_rank, conv_alpha = conv_rank_alpha(config)
        linear, convolutions = lora_io.unet_target_modules(unet, element, conv_rank, blocks=config.network_blocks)
        lora_io.add_lora(unet, linear, config.network_rank, config.network_alpha, conv_targets=convolutions,
                         conv_rank=conv_rank, conv_alpha=conv_alpha, dtype=DTYPES[config.lora_precision],
                         network_type=config.network_type)

    def modules(self, model: SDTrainable) -> dict[str, nn.Module]:
        """The modules that carry the trained adapter, by kohya key prefix."""
        modules: dict[str, nn.Module] = {"lora_unet": model.unet}
        if self.train_text_encoders:
            modules.update(zip(lora_io.text_encoder_prefixes(self.base.family), model.text_encoders))
        return modules

    def load_file(self, path: Path, model: Optional[SDTrainable] = None) -> None:
        """Load a LoRA file's weights into the trained adapter."""
        state, _ = lora_io.read_lora_file(path)
        lora_io.load_lora_state_dict(self.modules(model or self.model), state, str(path))

    def add_frozen_adapter(self, path: Path, name: str) -> None:
        """Apply the LoRA file `path` to the UNet at strength 1, frozen, beside the trained adapter."""
        state, _ = lora_io.read_lora_file(path)
        lora_io.add_lora_from_state(self.model.unet, "lora_unet", state, str(path), adapter_name=name,
                                    dtype=torch.float32)
        lora_io.activate_adapters([self.model.unet], [name, lora_io.ADAPTER_NAME])

    @contextmanager
    def strength(self, value: float) -> Iterator[None]:
        """Run with the trained adapter at strength `value` (0: the frozen model), then go back to 1."""
        modules = list(self.modules(self.model).values())
        lora_io.set_multiplier(modules, value)
        try:
            yield
        finally:
            lora_io.set_multiplier(modules, self.multiplier)

    def metadata(self, output_name: str) -> dict[str, str]:
        """The kohya / A1111 metadata of an exported file (ss_* keys)."""
        config = self.config
        conv_rank, conv_alpha = conv_rank_alpha(config)
        return lora_io.lora_metadata(
            family=self.base.family, rank=config.network_rank, alpha=config.network_alpha, output_name=output_name,
            conv_rank=conv_rank, conv_alpha=conv_alpha, prediction_type=self.base.prediction_type,
            base_model=str(self.base.source.get("model") or ""), trains_text_encoder=self.train_text_encoders,
            network_type=config.network_type,
            extra={**self._training_metadata(),
                   "ss_network_element": config.network_element,
                   "ss_network_strength": str(config.network_strength), "ss_training_mode": config.mode,
                   "ss_network_blocks": json.dumps(list(config.network_blocks)),
                   "ss_min_timestep": str(config.min_timestep), "ss_max_timestep": str(config.max_timestep)})

    def _training_metadata(self) -> dict[str, str]:
        """kohya's ss_* facts about the training run (optimizer, schedule, precision, captions)."""
        from accelerate.state import AcceleratorState

        config = self.config
        # the precision the loop runs in ("auto" resolved), once its Accelerator exists
        precision = AcceleratorState().mixed_precision if AcceleratorState._shared_state else config.mixed_precision
        size = tuple(config.image_height_width or (config.resolution, config.resolution))
        return lora_io.kohya_training_metadata(
            session_id=self.session_id, started_at=self.started_at, optimizer=config.optimizer,
            optimizer_args=config.optimizer_settings, lr_scheduler=config.lr_scheduler, mixed_precision=str(precision),
            learning_rate=config.lr, text_encoder_lr=config.text_encoder_lr or config.lr, seed=config.seed,
            max_train_steps=config.max_steps, resolution=size, captions=self.training_images,
            batch_size=config.batch_size, gradient_accumulation_steps=config.gradient_accumulation_steps,
            gradient_checkpointing=config.gradient_checkpointing, lr_warmup_steps=config.lr_warmup_steps or 0,
            noise_offset=config.noise_offset, min_snr_gamma=config.min_snr_gamma or 0.0,
            zero_terminal_snr=config.zero_terminal_snr, max_grad_norm=config.clip_grad_norm or 0.0)

    def save(self, model: SDTrainable, path: Path, output_name: str, dtype: Optional[torch.dtype] = None,
             overwrite: bool = True, strength: float = 1.0) -> Path:
        """Write the trained adapter of `model` to `path` (kohya keys, `dtype` or float32), with
        `strength` baked in (exports: network_strength; checkpoints: 1, so a resume is exact)."""
        state = lora_io.lora_state_dict(self.modules(model), strength=strength)
        return lora_io.save_lora_file(path, state, self.metadata(output_name), dtype=dtype, overwrite=overwrite)

    def write(self, model: SDTrainable, folder: Path, output_name: str, **pointer_extras: Any) -> None:
        """A checkpoint folder: lora.safetensors and base_model.json (the base is not copied). The
        user-facing LoRA file is the exports' (difftrain.tasks.sd_parts.outputs), not this."""
        self.save(model, folder / LORA_FILE, output_name)
        self.base.write_pointer(folder, self.config.mode, **pointer_extras)

    def load(self, model: SDTrainable, folder: Path) -> None:
        """Restore exactly what `write` wrote into `folder`."""
        self.load_file(folder / LORA_FILE, model)
        lora_io.set_multiplier(self.modules(model).values(), self.multiplier)

    def state_dict(self, model: SDTrainable) -> dict[str, torch.Tensor]:
        """The trained adapter's tensors under kohya names."""
        return lora_io.lora_state_dict(self.modules(model))


__all__ = ["DTYPES", "FullTrainable", "LORA_FILE", "LoraTrainable", "SDTrainable", "conv_rank_alpha",
           "enable_gradient_checkpointing", "model_view", "parameter_groups", "place", "trains_text_encoders",
           "freeze_text_encoder_parts", "text_encoder_freezing"]
