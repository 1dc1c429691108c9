"""Load and save Stable Diffusion models (SD1.x, SD2.x, SDXL), fully offline.

``load_sd`` accepts a diffusers folder, a single ``.safetensors``/``.ckpt`` file in the
original (A1111/CompVis/SGM) layout, or a bare name looked up in model folders, and returns
an ``SDModel``: the modules plus what the training code needs to know about them (family,
prediction type, a DDPM noise scheduler) and helpers to encode prompts and images.
``export_single_file`` writes the original layout back, for A1111 and ComfyUI.

Nothing here downloads. Component configs come from the file itself (our exports and the
tiny stand-ins embed them), or from ``component_configs/<family>/`` for real checkpoints;
tokenizers of real single files are built from the CLIP vocabulary shipped with the project
(``clip_vocab``).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.models import single_file as sf
from difftrain.models.metadata import EMBEDDED_CONFIG_KEY, checkpoint_metadata

COMPONENT_CONFIG_DIR = Path(__file__).parent / "component_configs"
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PREDICTION_TYPES = ("epsilon", "v_prediction")

# Accepted spellings of a family; the values are the canonical names.
FAMILY_ALIASES = {
    "sd1": "sd1", "sd15": "sd1", "sd1.5": "sd1", "v1": "sd1",
    "sd2": "sd2", "sd2-v": "sd2", "sd21": "sd2", "sd2.1": "sd2", "v2": "sd2",
    "sdxl": "sdxl", "xl": "sdxl",
}

def _text_encoder_names(family: str) -> list[str]:
    return ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]


def _tokenizer_names(family: str) -> list[str]:
    return ["tokenizer", "tokenizer_2"] if family == "sdxl" else ["tokenizer"]


def _pad_token(family: str, index: int) -> str:
    # OpenCLIP tokenizers (SD2's, SDXL's second) pad with "!" (id 0); CLIP-L pads with EOS.
    return "!" if family == "sd2" or (family == "sdxl" and index == 1) else "<|endoftext|>"


def normalize_family(family: str) -> str:
    """'sd15' -> 'sd1' etc.; raises ConfigError on an unknown name."""
    key = str(family).strip().lower().replace("_", "-")
    if key not in FAMILY_ALIASES:
        raise ConfigError(f"unknown model family {family!r}; use one of sd1, sd2, sdxl")
    return FAMILY_ALIASES[key]


# --------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------


@dataclass
class SDModel:
    """A Stable Diffusion model's modules and the facts the trainer needs about them.

    Attributes:
        unet: UNet2DConditionModel.
        vae: AutoencoderKL.
        text_encoders: [CLIPTextModel] for SD1/SD2; [CLIPTextModel, CLIPTextModelWithProjection]
            for SDXL.
        tokenizers: CLIPTokenizers, one per text encoder.
        noise_scheduler: DDPMScheduler with the model's training schedule and prediction type.
        family: 'sd1' | 'sd2' | 'sdxl'.
        prediction_type: 'epsilon' | 'v_prediction'.
        source: where it was loaded from (None when built in memory).
        scheduler_config: the inference scheduler's config (class name included) used by
            ``to_pipeline``/``save_pretrained``.
        clip_skip: SD1/SD2 text conditioning from layer -clip_skip (after the final layer norm);
            0 or 1: the last layer (EveryDream2's clip_skip; diffusers' pipelines count one less).
    """

    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    family: str
    prediction_type: str
    source: Path | None = None
    scheduler_config: dict = field(default_factory=dict)
    clip_skip: int = 0

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_pipeline(cls, pipeline, *, source: str | Path | None = None, prediction_type: str | None = None) -> "SDModel":
        """Wrap a diffusers StableDiffusion(XL)Pipeline's modules (shared, not copied)."""
        components = pipeline.components
        text_encoders = [components["text_encoder"]]
        tokenizers = [components["tokenizer"]]
        if components.get("text_encoder_2") is not None:
            text_encoders.append(components["text_encoder_2"])
            tokenizers.append(components["tokenizer_2"])
            family = "sdxl"
        else:
            family = _family_of_modules(components["unet"], components["text_encoder"])
        scheduler_config = _plain_config(components["scheduler"].config)
        scheduler_config["_class_name"] = type(components["scheduler"]).__name__
        prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
        return cls(
            unet=components["unet"],
            vae=components["vae"],
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            noise_scheduler=_noise_scheduler(scheduler_config, prediction_type),
            family=family,
            prediction_type=prediction_type,
            source=Path(source) if source is not None else None,
            scheduler_config=scheduler_config,
        )

    # -- properties -----------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for the real models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """The image side the UNet was configured for (512, 768, 1024 for the real models)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    def modules(self) -> dict[str, torch.nn.Module]:
        """The trainable modules by diffusers component name."""
        named = {"unet": self.unet, "vae": self.vae}
        for name, encoder in zip(_text_encoder_names(self.family), self.text_encoders):
            named[name] = encoder
        return named

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "SDModel":
        """Move every module in place; returns self."""
        for module in self.modules().values():
            if device is not None:
                module.to(device)
            # Casting only when needed keeps diffusers from warning about no-op casts.
            if dtype is not None and module.dtype != dtype:
                module.to(dtype)
        return self

    # -- encoding -------------------------------------------------------------------

    def tokenize(self, prompts: Sequence[str]) -> list[torch.Tensor]:
        """Token ids per tokenizer, each (B, 77) padded/truncated to the model's length."""
        ids = []
        for tokenizer in self.tokenizers:
            batch = tokenizer(
                list(prompts),
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids.append(batch.input_ids)
        return ids

    def encode_prompts(self, prompts: Sequence[str], *, time_ids: torch.Tensor | None = None) -> dict[str, Any]:
        """The UNet's conditioning keyword arguments for a batch of prompts.

        Returns:
            SD1/SD2: ``{'encoder_hidden_states': (B, 77, D)}`` (the last layer after the final
            layer norm; SD2's encoder already stops at OpenCLIP's penultimate layer).
            SDXL: ``{'encoder_hidden_states': (B, 77, D1 + D2), 'added_cond_kwargs':
            {'text_embeds': (B, P), 'time_ids': (B, 6)}}`` where the hidden states are both
            encoders' penultimate layers concatenated and ``text_embeds`` is the second
            encoder's projected pooled output. ``time_ids`` defaults to the native
            resolution without crop; pass ``sdxl_time_ids(...)`` for bucketed images.
            Pass the dict to the UNet as ``unet(x, t, **cond)``.
        """
        ids = self.tokenize(prompts)
        device = self.device
        if self.family != "sdxl":
            encoder = self.text_encoders[0]
            if self.clip_skip < 2:
                return {"encoder_hidden_states": encoder(ids[0].to(device))[0]}
            output = encoder(ids[0].to(device), output_hidden_states=True)
            final_norm = getattr(encoder, "text_model", encoder).final_layer_norm
            return {"encoder_hidden_states": final_norm(output.hidden_states[-self.clip_skip])}
        hidden_states = []
        pooled = None
        for encoder, token_ids in zip(self.text_encoders, ids):
            output = encoder(token_ids.to(device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
            pooled = output[0]  # the projected pooled embedding of CLIPTextModelWithProjection
        if time_ids is None:
            side = self.native_resolution
            time_ids = sdxl_time_ids([(side, side)] * len(prompts), [(0, 0)] * len(prompts), [(side, side)] * len(prompts))
        return {
            "encoder_hidden_states": torch.cat(hidden_states, dim=-1),
            "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(device=device, dtype=pooled.dtype)},
        }

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, 4, h, w) -> what the UNet sees: shifted (SD3-style VAEs) and multiplied by
        the VAE's scaling_factor, which brings SD's latents to about unit variance."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images from scaled latents: (B, 4, h, w) -> (B, 3, h*f, w*f) in about [-1, 1]."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents.to(device=self.vae.device, dtype=self.vae.dtype)
        return self.vae.decode(latents / self.vae.config.scaling_factor + shift).sample

    # -- conversion -----------------------------------------------------------------

    def inference_scheduler(self):
        """A fresh instance of the model's inference scheduler, with its prediction type."""
        import diffusers

        config = dict(self.scheduler_config)
        scheduler_class = getattr(diffusers, config.pop("_class_name", "EulerDiscreteScheduler"), None)
        if scheduler_class is None:
            scheduler_class = diffusers.EulerDiscreteScheduler
        config["prediction_type"] = self.prediction_type
        return scheduler_class.from_config(config)

    def to_pipeline(self):
        """A diffusers pipeline over the same module objects (no copies)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.unet,
                scheduler=self.inference_scheduler(),
            )
        return StableDiffusionPipeline(
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            unet=self.unet,
            scheduler=self.inference_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def save_pretrained(self, folder: str | Path, *, overwrite: bool = False) -> Path:
        """Write a diffusers folder that the matching pipeline class loads.

        The folder is written beside its destination and renamed into place, so a crash
        never leaves a half-written model where a complete one is expected.

        Raises:
            ConfigError: if ``folder`` exists and is not empty, unless ``overwrite``.
        """
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()) and not overwrite:
            raise ConfigError(f"{folder} already exists and is not empty; choose another folder or pass overwrite=True")
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            self.to_pipeline().save_pretrained(staging, safe_serialization=True)
            if folder.exists():
                old = folder.with_name(f".{folder.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
                staging.rename(folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return folder

    def component_configs(self) -> dict[str, dict[str, Any]]:
        """JSON-serialisable diffusers configs of every component, by component name."""
        configs = {"unet": _plain_config(self.unet.config), "vae": _plain_config(self.vae.config)}
        for name, encoder in zip(_text_encoder_names(self.family), self.text_encoders):
            configs[name] = json.loads(encoder.config.to_json_string())
        configs["scheduler"] = dict(self.scheduler_config, prediction_type=self.prediction_type)
        return configs


def sdxl_time_ids(
    original_sizes: Sequence[tuple[int, int]],
    crop_top_lefts: Sequence[tuple[int, int]],
    target_sizes: Sequence[tuple[int, int]],
) -> torch.Tensor:
    """SDXL's micro-conditioning: (B, 6) rows of (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Args:
        original_sizes: per sample, the (height, width) of the image before resizing.
        crop_top_lefts: per sample, the (top, left) of the crop taken after resizing.
        target_sizes: per sample, the (height, width) the model is trained/asked to produce.
    """
    if not (len(original_sizes) == len(crop_top_lefts) == len(target_sizes)):
        raise ValueError("sdxl_time_ids needs one original size, crop and target size per sample")
    rows = [list(o) + list(c) + list(t) for o, c, t in zip(original_sizes, crop_top_lefts, target_sizes)]
    return torch.tensor(rows, dtype=torch.float32)


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers FrozenDict config as plain JSON-compatible data."""
    # Where a module was loaded from is no part of its architecture (and not JSON).
    kept = {k: v for k, v in dict(config).items() if k not in ("_name_or_path", "_use_default_values")}
    return json.loads(json.dumps(kept, default=lambda value: list(value) if isinstance(value, (tuple, set)) else str(value)))


def _noise_scheduler(scheduler_config: Mapping[str, Any], prediction_type: str):
    from diffusers import DDPMScheduler

    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    # DDPMScheduler defaults clip_sample to True; no SD family was trained with clipping.
    config["clip_sample"] = config.get("clip_sample", False)
    config["prediction_type"] = prediction_type
    return DDPMScheduler.from_config(config)


def _family_of_modules(unet, text_encoder) -> str:
    if getattr(unet.config, "addition_embed_type", None) == "text_time":
        return "sdxl"
    # SD2 switched to OpenCLIP (exact gelu) and linear attention projections.
    if getattr(text_encoder.config, "hidden_act", "") == "gelu" or unet.config.use_linear_projection:
        return "sd2"
    return "sd1"


# --------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------


def _is_model_candidate(path: Path) -> bool:
    if path.is_dir():
        return (path / "model_index.json").exists() or (path / "config.json").exists() or (path / "unet").is_dir()
    return path.suffix.lower() in SINGLE_FILE_SUFFIXES


def resolve_model_path(name: str | Path, search_dirs: Iterable[str | Path] = (), *, what: str = "model") -> Path:
    """The file or folder a config names: the path itself if it exists, else a match in ``search_dirs``.

    A bare name may omit its suffix (``"x"`` finds ``x.safetensors``, ``x.ckpt`` or a folder
    ``x``); a unique file of that name anywhere below a search dir is also accepted.

    Raises:
        ConfigError: naming the searched folders and listing the models they hold.
    """
    name = str(name)
    if not name.strip():
        raise ConfigError(f"no {what} given (empty name)")
    direct = Path(name).expanduser()
    if direct.exists():
        return direct
    dirs = [Path(d).expanduser() for d in search_dirs if d]
    for folder in dirs:
        for candidate in [folder / name] + [folder / (name + suffix) for suffix in SINGLE_FILE_SUFFIXES]:
            if candidate.exists():
                return candidate
    for folder in dirs:
        if folder.is_dir():
            wanted = {Path(name).name} | {Path(name).name + suffix for suffix in SINGLE_FILE_SUFFIXES}
            matches = [p for p in folder.rglob("*") if p.name in wanted and _is_model_candidate(p)]
            if len(matches) == 1:
                return matches[0]
    listing = []
    for folder in dirs:
        if folder.is_dir():
            found = sorted(p.name for p in folder.iterdir() if _is_model_candidate(p))
            listing.append(f"{folder}: {', '.join(found) if found else '(no models)'}")
        else:
            listing.append(f"{folder}: (folder does not exist)")
    where = ("; searched " + "; ".join(listing)) if listing else " (and no model folders were given to search)"
    raise ConfigError(f"{what} {name!r} not found: it is not an existing path{where}. Give a full path or put the file in one of those folders.")


# --------------------------------------------------------------------------------------
# Reading single files
# --------------------------------------------------------------------------------------


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a .safetensors file, or tensors of a pickle-free-loadable .ckpt.

    ``.ckpt`` files are read with ``torch.load(weights_only=True)``: only tensors and plain
    containers are reconstructed, so a file carrying code is refused, never run. A
    ``state_dict`` sub-dictionary (PyTorch Lightning checkpoints) is unwrapped.

    Raises:
        ConfigError: truncated, corrupt, or unsafe files.
    """
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise ConfigError(
                f"cannot read {path}: {error}. The file is truncated or not a safetensors file; "
                "download or copy it again."
            ) from None
        return tensors, metadata
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(
            f"refused to load {path}: it contains Python objects other than tensors, which could "
            f"run code when unpickled ({str(error).splitlines()[0]}). Use a .safetensors version "
            "of the model, or convert this file with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise ConfigError(f"cannot read {path}: {error}. The file is truncated or not a PyTorch checkpoint.") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} holds a {type(loaded).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    return tensors, {}


# --------------------------------------------------------------------------------------
# Building modules from configs and state dicts
# --------------------------------------------------------------------------------------


def _empty_module(factory):
    """Build a module without allocating or initialising its parameters (they get assigned)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, source: Path) -> None:
    """Assign ``state`` to an empty module, refusing silently missing or surplus weights."""
    try:
        result = module.load_state_dict(dict(state), strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        first_lines = " ".join(str(error).splitlines()[:3])
        raise ConfigError(
            f"the {what} weights in {source} do not fit its architecture ({first_lines}); the file "
            "is of another model size or family than its configs say."
        ) from None
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    unexpected = [k for k in result.unexpected_keys if not k.endswith("position_ids")]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} (e.g. {', '.join(missing[:3])})")
        if unexpected:
            detail.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:3])})")
        raise ConfigError(
            f"the {what} weights in {source} do not fit its architecture: {'; '.join(detail)}. "
            "The file is incomplete, or of another model family than it was taken for."
        )
    leftover = [name for name, p in module.named_parameters() if p.is_meta]
    if leftover:
        raise ConfigError(f"the {what} weights in {source} lack {', '.join(leftover[:3])}")


def _text_encoder_state_for_module(module: torch.nn.Module, canonical: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical (prefix-free) CLIP keys renamed to what this transformers class expects."""
    wrapped = any(k.startswith("text_model.") for k in module.state_dict().keys())
    if not wrapped:
        return dict(canonical)
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in canonical.items()}


def _build_unet(config: Mapping[str, Any]):
    from diffusers import UNet2DConditionModel

    return _empty_module(lambda: UNet2DConditionModel.from_config(dict(config)))


def _build_vae(config: Mapping[str, Any]):
    from diffusers import AutoencoderKL

    return _empty_module(lambda: AutoencoderKL.from_config(dict(config)))


def _build_text_encoder(config: Mapping[str, Any], with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_config = CLIPTextConfig(**{k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "model_type")})
    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _empty_module(lambda: model_class(clip_config))


def _shipped_configs(family: str, prediction_type: str) -> dict[str, dict[str, Any]]:
    variant = {"sd1": "sd1", "sdxl": "sdxl"}.get(family) or ("sd2-768-v" if prediction_type == "v_prediction" else "sd2-512")
    folder = COMPONENT_CONFIG_DIR / variant
    configs = {}
    for path in sorted(folder.glob("*.json")):
        configs[path.stem] = json.loads(path.read_text(encoding="utf-8"))
    return configs


def _tokenizers_from_files(files_by_name: Mapping[str, Mapping[str, str]], names: list[str]) -> list:
    from transformers import CLIPTokenizer

    tokenizers = []
    for name in names:
        with tempfile.TemporaryDirectory() as folder:
            for file_name, text in files_by_name[name].items():
                (Path(folder) / Path(file_name).name).write_text(text, encoding="utf-8")
            tokenizers.append(CLIPTokenizer.from_pretrained(folder, local_files_only=True))
    return tokenizers


def _load_tokenizer_folder(folder: Path, pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, pad_token=pad_token)


def _find_tokenizers(family: str, config_from: Path | None, source: Path) -> list:
    """Tokenizers for a real single file: from a diffusers folder the caller names, else the CLIP
    vocabulary shipped with difftrain (difftrain.models.clip_vocab).

    All SD tokenizers share CLIP's BPE vocabulary; they differ only in the padding token,
    which is set per family here, so either source serves every family.
    """
    count = len(_tokenizer_names(family))
    if config_from is not None:
        candidates = [config_from / "tokenizer", config_from / "tokenizer_2", config_from]
        folders = [c for c in candidates if c.is_dir() and any(c.glob("*.json"))]
        if not folders:
            raise ConfigError(f"config_from={config_from} holds no tokenizer (expected a diffusers folder with tokenizer/)")
        try:
            return [_load_tokenizer_folder(folders[min(i, len(folders) - 1)], _pad_token(family, i)) for i in range(count)]
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load a CLIP tokenizer from {config_from}: {error}") from None
    from difftrain.models.clip_vocab import standard_clip_tokenizer

    return [standard_clip_tokenizer(_pad_token(family, i)) for i in range(count)]


def _configs_from_folder(folder: Path, family: str) -> dict[str, dict[str, Any]]:
    """Component configs of a diffusers folder, by component name."""
    names = {"unet": "config.json", "vae": "config.json", "scheduler": "scheduler_config.json"}
    names.update({name: "config.json" for name in _text_encoder_names(family)})
    configs = {}
    for name, file_name in names.items():
        path = folder / name / file_name
        if not path.exists():
            raise ConfigError(f"config_from={folder} lacks {name}/{file_name}; give a complete diffusers folder of a {family} model")
        configs[name] = json.loads(path.read_text(encoding="utf-8"))
    return configs


def _read_embedded_description(metadata: Mapping[str, str], path: Path) -> dict[str, Any] | None:
    text = metadata.get(EMBEDDED_CONFIG_KEY)
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{path}: the embedded model description is not valid JSON ({error})") from None


def _prediction_type_from_metadata(metadata: Mapping[str, str]) -> str | None:
    value = metadata.get("modelspec.prediction_type")
    if value in PREDICTION_TYPES:
        return value
    if metadata.get("ss_v_parameterization", "").lower() == "true":  # kohya's trainers
        return "v_prediction"
    return None


def _load_single_file(
    path: Path,
    *,
    family: str | None,
    prediction_type: str | None,
    config_from: Path | None,
) -> SDModel:
    tensors, metadata = read_state_dict(path)
    detected = sf.detect_family(tensors.keys())
    if detected is None:
        raise ConfigError(
            f"{path} is not a Stable Diffusion checkpoint: none of its {len(tensors)} keys starts with "
            "cond_stage_model.transformer (SD1), cond_stage_model.model (SD2) or conditioner.embedders (SDXL). "
            "LoRA, VAE or text-encoder files go in their own config keys."
        )
    if family is not None and detected != family:
        raise ConfigError(f"{path} is an {detected} checkpoint, but an {family} model was asked for; use a matching model or family")
    description = _read_embedded_description(metadata, path)
    file_prediction_type = description.get("prediction_type") if description else _prediction_type_from_metadata(metadata)
    if prediction_type is None:
        prediction_type = file_prediction_type
    if prediction_type is None:
        if detected == "sd2":
            # The keys of SD2-base (512, epsilon) and SD2.x-768 (v) files are identical.
            say(
                f"note: {path.name} is an SD2 checkpoint that does not state its prediction type; "
                "assuming v-prediction (SD2.x 768). For SD2-base 512 models set the prediction "
                "type to epsilon (model_v_pred false)."
            )
            prediction_type = "v_prediction"
        else:
            prediction_type = "epsilon"

    # Tokenizers first: failing on them should not cost loading gigabytes of weights.
    if description is not None and description.get("tokenizers"):
        tokenizers = _tokenizers_from_files(description["tokenizers"], _tokenizer_names(detected))
    else:
        tokenizers = _find_tokenizers(detected, config_from, path)
    if description is not None:
        configs = description["configs"]
    elif config_from is not None:
        configs = _configs_from_folder(config_from, detected)
    else:
        configs = _shipped_configs(detected, prediction_type)

    unet = _build_unet(configs["unet"])
    vae = _build_vae(configs["vae"])
    encoder_names = _text_encoder_names(detected)
    text_encoders = [
        _build_text_encoder(configs[name], with_projection=(name == "text_encoder_2")) for name in encoder_names
    ]
    expected = {"unet": list(unet.state_dict().keys()), "vae": list(vae.state_dict().keys())}
    components = sf.original_to_components(detected, tensors, configs, expected)
    _load_into(unet, components["unet"], "UNet", path)
    _load_into(vae, components["vae"], "VAE", path)
    for name, encoder in zip(encoder_names, text_encoders):
        _load_into(encoder, _text_encoder_state_for_module(encoder, components[name]), name, path)

    scheduler_config = dict(configs.get("scheduler") or {})
    scheduler_config.setdefault("_class_name", "EulerDiscreteScheduler")
    for module in [unet, vae, *text_encoders]:
        module.eval()
    return SDModel(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=_noise_scheduler(scheduler_config, prediction_type),
        family=detected,
        prediction_type=prediction_type,
        source=path,
        scheduler_config=scheduler_config,
    )


def _load_folder(path: Path, *, prediction_type: str | None) -> SDModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if not (path / "unet").is_dir():
        raise ConfigError(f"{path} is not a diffusers Stable Diffusion folder (no unet/ subfolder); give a pipeline folder or a single checkpoint file")
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", local_files_only=True)
        text_encoders = [CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)]
        tokenizers = [CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)]
        if (path / "text_encoder_2").is_dir():
            text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", local_files_only=True))
            tokenizers.append(CLIPTokenizer.from_pretrained(path / "tokenizer_2", local_files_only=True))
        scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot load the diffusers folder {path}: {error}") from None
    family = "sdxl" if len(text_encoders) == 2 else _family_of_modules(unet, text_encoders[0])
    prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
    for module in [unet, vae, *text_encoders]:
        module.eval()
    return SDModel(
        unet=unet,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=_noise_scheduler(scheduler_config, prediction_type),
        family=family,
        prediction_type=prediction_type,
        source=path,
        scheduler_config=scheduler_config,
    )


# --------------------------------------------------------------------------------------
# Replacing the VAE or a text encoder
# --------------------------------------------------------------------------------------


def load_vae(source: Path, reference_config: Mapping[str, Any]):
    """An AutoencoderKL from a diffusers folder or a single file (original or diffusers keys).

    Single files take the architecture of ``reference_config`` (the model's own VAE), which
    holds for every SD VAE (they differ in weights and scaling factor, not shape).
    """
    from diffusers import AutoencoderKL

    if source.is_dir():
        folder = source / "vae" if (source / "vae" / "config.json").exists() else source
        try:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot load the VAE folder {source}: {error}") from None
    tensors, _ = read_state_dict(source)
    if any(k.startswith(sf.VAE_PREFIX) for k in tensors):
        tensors = {k[len(sf.VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(sf.VAE_PREFIX)}
    # EMA copies and the training loss' discriminator are not part of the model.
    tensors = {k: v for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}
    vae = _build_vae(reference_config)
    expected = list(vae.state_dict().keys())
    if not any("down_blocks" in k for k in tensors):
        flat = {sf.VAE_PREFIX + k: v for k, v in tensors.items()}
        tensors = _vae_from_original(flat, reference_config, expected)
    _load_into(vae, tensors, "VAE", source)
    return vae.eval()


def _vae_from_original(flat: Mapping[str, torch.Tensor], config: Mapping[str, Any], expected: list[str]) -> dict[str, torch.Tensor]:
    state = {}
    missing = []
    for key in expected:
        original = sf.VAE_PREFIX + sf.vae_key_to_original(key, config)
        if original not in flat:
            missing.append(original)
            continue
        value = flat[original]
        if value.ndim == 4 and key.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")):
            value = value[:, :, 0, 0]
        state[key] = value
    sf._raise_if_missing("VAE", missing)
    return state


def _canonical_text_encoder_state(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported text-encoder file layout to canonical HF CLIP keys, and its layout name.

    The layout ('hf' or 'openclip') tells which SDXL encoder a file is for when the shapes
    alone cannot (SDXL's second encoder is the OpenCLIP one).
    """
    for prefix in ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "cond_stage_model.model.", "conditioner.embedders.1.model."):
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            break
    if any(k.startswith("transformer.resblocks.") for k in tensors):
        return sf.openclip_text_encoder_to_hf(tensors), "openclip"
    return {sf.canonical_text_encoder_key(k): v for k, v in tensors.items() if not k.endswith("position_ids")}, "hf"


def replace_text_encoder(model: SDModel, source: Path) -> None:
    """Replace the text encoder(s) of ``model`` whose architecture matches ``source``.

    ``source`` is a diffusers pipeline folder (its text_encoder[_2] subfolders replace
    ours), a text-encoder folder with config.json, or a single file in HF, A1111 or OpenCLIP
    layout. A single file replaces the one encoder whose weight shapes it matches exactly.
    """
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    names = _text_encoder_names(model.family)
    if source.is_dir():
        replaced = False
        for index, name in enumerate(names):
            folder = source / name
            if (folder / "config.json").exists():
                model_class = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                model.text_encoders[index] = model_class.from_pretrained(folder, local_files_only=True).eval()
                replaced = True
        if replaced:
            return
        tensors = {}
        for weights in sorted(source.glob("*.safetensors")):
            tensors.update(read_state_dict(weights)[0])
    else:
        tensors = read_state_dict(source)[0]
    canonical, layout = _canonical_text_encoder_state(tensors)
    order = list(range(len(model.text_encoders)))
    if model.family == "sdxl" and (layout == "openclip" or "text_projection.weight" in canonical):
        order.reverse()  # the OpenCLIP / projected one is SDXL's second encoder
    for index in order:
        encoder = model.text_encoders[index]
        own = {sf.canonical_text_encoder_key(k): v for k, v in encoder.state_dict().items() if not k.endswith("position_ids")}
        own_layers = {k for k in own if k != "text_projection.weight"}
        given = {k: v for k, v in canonical.items() if k in own}
        if own_layers <= set(given) and all(given[k].shape == own[k].shape for k in given):
            state = _text_encoder_state_for_module(encoder, {**own, **given})
            encoder.load_state_dict(state, strict=False)
            return
    raise ConfigError(
        f"the text encoder {source} fits none of this {model.family} model's text encoders "
        "(different layer names or sizes); use one made for this model family"
    )


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def load_sd(
    source: str | Path,
    *,
    family: str | None = None,
    prediction_type: str | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    search_dirs: Iterable[str | Path] = (),
    vae_search_dirs: Iterable[str | Path] | None = None,
    text_encoder_search_dirs: Iterable[str | Path] | None = None,
    config_from: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> SDModel:
    """Load a Stable Diffusion model from a diffusers folder, a single file, or a bare name.

    Args:
        source: a diffusers pipeline folder; a ``.safetensors``/``.ckpt`` single file in the
            A1111 layout; or a bare file/folder name looked up in ``search_dirs``.
        family: 'sd1' | 'sd2' | 'sdxl' (aliases such as 'sd15' accepted) to demand; a
            mismatch raises. Single files are identified from their keys either way.
        prediction_type: 'epsilon' | 'v_prediction', overriding what the model says. SD2
            single files without a self-description default to v_prediction (with a note),
            as SD2-base and SD2.x-768 cannot be told apart from their keys.
        vae: a VAE (folder or single file, or a bare name in ``vae_search_dirs``) replacing
            the model's.
        text_encoder: a text encoder (folder or single file, or a bare name in
            ``text_encoder_search_dirs``) replacing the matching one of the model's.
        search_dirs: folders where a bare ``source`` name is looked up (in order);
            ``vae_search_dirs``/``text_encoder_search_dirs`` default to it.
        config_from: for a single file that does not describe itself (a real A1111
            checkpoint), a diffusers folder of the same family whose component configs and
            tokenizers are used. Without it the standard configs in ``component_configs/``
            are used, and tokenizers built from the shipped CLIP vocabulary (clip_vocab).
        dtype, device: where the modules end up.

    Raises:
        ConfigError: missing, truncated, corrupt or unsafe files; family mismatches;
            weights that do not fit the architecture; no tokenizer available offline.
    """
    demanded_family = normalize_family(family) if family is not None else None
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, not {prediction_type!r}")
    search_dirs = list(search_dirs)
    path = resolve_model_path(source, search_dirs, what="model")
    if path.is_dir():
        model = _load_folder(path, prediction_type=prediction_type)
        if demanded_family is not None and model.family != demanded_family:
            raise ConfigError(f"{path} is an {model.family} model, but an {demanded_family} model was asked for; use a matching model or family")
    else:
        reference = None
        if config_from is not None and str(config_from).strip():
            reference = resolve_model_path(config_from, search_dirs, what="config_from folder")
        model = _load_single_file(path, family=demanded_family, prediction_type=prediction_type, config_from=reference)
    if vae is not None and str(vae).strip():
        vae_path = resolve_model_path(vae, search_dirs if vae_search_dirs is None else vae_search_dirs, what="VAE")
        model.vae = load_vae(vae_path, _plain_config(model.vae.config))
    if text_encoder is not None and str(text_encoder).strip():
        dirs = search_dirs if text_encoder_search_dirs is None else text_encoder_search_dirs
        replace_text_encoder(model, resolve_model_path(text_encoder, dirs, what="text encoder"))
    return model.to(device=device, dtype=dtype)


def export_single_file(
    model: SDModel,
    path: str | Path,
    *,
    dtype: torch.dtype | None = torch.float16,
    metadata: Mapping[str, str] | None = None,
    embed_tokenizers: bool = True,
) -> Path:
    """Write ``model`` as one ``.safetensors`` file in the original (A1111/ComfyUI) layout.

    The file also carries the component configs (and, by default, the tokenizer files) in
    its metadata, so ``load_sd`` reloads it exactly with no network. The write is atomic.

    Args:
        model: the model to export.
        path: destination ``.safetensors`` file.
        dtype: tensor dtype in the file (fp16 by default, like published checkpoints);
            None keeps each tensor's dtype.
        metadata: extra string metadata (e.g. training settings) stored alongside.
        embed_tokenizers: False leaves the tokenizers out (a few MB for real models).
    """
    from safetensors.torch import save_file

    path = Path(path)
    components = {}
    for name, module in model.modules().items():
        state = module.state_dict()
        if name.startswith("text_encoder"):
            state = {sf.canonical_text_encoder_key(k): v for k, v in state.items() if not k.endswith("position_ids")}
        components[name] = state
    configs = model.component_configs()
    flat = sf.components_to_original(model.family, components, configs)
    flat = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous() for k, v in flat.items()}
    tokenizers = dict(zip(_tokenizer_names(model.family), model.tokenizers)) if embed_tokenizers else None
    file_metadata = checkpoint_metadata(model.family, model.prediction_type, configs, tokenizers)
    for key, value in (metadata or {}).items():
        file_metadata[str(key)] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        save_file(flat, staging, metadata=file_metadata)
        # mkstemp creates the file private (0600); give it the permissions a plain write would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o666 & ~umask)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.remove(staging)
    return path
