"""The frozen base of a Stable Diffusion run: what it is loaded from (the user's model, or the model
files of the checkpoint being resumed) and the loaded SDModel.

A LoRA checkpoint does not copy its base (often gigabytes): it holds `base_model.json`, a pointer
to the base (model, VAE, text encoder, family, prediction type, and mode-specific entries), from
which a resume loads the base again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.models.sd import SDModel, load_sd, resolve_model_path
from difftrain.tasks.base import StartPoint

BASE_POINTER_FILE = "base_model.json"


def _unless_none(name: str) -> str:
    """TrainTrain presets write "None" for 'no separate VAE / text encoder'."""
    return "" if name.strip().lower() in ("none", "") else name


def search_dirs(config: Config, specific: str, subfolder: str) -> list[str]:
    """Folders a bare file name is looked up in: the specific folder setting, <models_dir>/<subfolder>, '.'."""
    models_dir = config.models_dir
    return [d for d in (specific, str(Path(models_dir) / subfolder) if models_dir else "", ".") if d]


def find_lora_file(config: Config, name: str, setting: str) -> Path:
    """A LoRA file named by `setting`: a path, or a bare name in lora_dir / <models_dir>/lora."""
    try:
        return resolve_model_path(name, search_dirs(config, config.lora_dir, "lora"), what="LoRA")
    except ConfigError as error:
        raise ConfigError(f"{setting}: {error}") from None


def read_pointer(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's base_model.json; {} when it has none (a Full checkpoint holds its model)."""
    path = checkpoint / BASE_POINTER_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def prediction_override(config: Config) -> Optional[str]:
    value = config.resolved_prediction_type()
    return None if value == "auto" else value


@dataclass
class LoadedBase:
    """Where the base comes from (`source`: model, vae, te, family, prediction_type) and the loaded model."""

    sd: SDModel
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.sd.family

    @property
    def prediction_type(self) -> str:
        return self.sd.prediction_type

    def pointer(self, mode: str, **extras: Any) -> dict[str, Any]:
        """The base_model.json of a LoRA checkpoint of this run."""
        pointer = {key: self.source.get(key) for key in ("model", "vae", "te")}
        pointer.update(family=self.family, prediction_type=self.prediction_type, mode=mode, **extras)
        return pointer

    def write_pointer(self, folder: Path, mode: str, **extras: Any) -> None:
        (folder / BASE_POINTER_FILE).write_text(json.dumps(self.pointer(mode, **extras), indent=2), encoding="utf-8")


def base_source(config: Config, start: StartPoint) -> dict[str, Any]:
    """What the model is loaded from: the start's base (with the config's VAE and text encoder),
    or the model files of the checkpoint it resumes."""
    checkpoint = start.checkpoint
    if checkpoint is not None:
        pointer = read_pointer(checkpoint)
        if pointer:  # a LoRA checkpoint: the base lives elsewhere, unchanged
            return pointer
        if not (checkpoint / "unet").is_dir():
            raise ConfigError(f"checkpoint '{checkpoint}' holds no Stable Diffusion model (no unet/ or "
                              f"{BASE_POINTER_FILE}); it was made by another task.")
        # A Full checkpoint is a complete diffusers folder, VAE and text encoders included.
        return {"model": str(checkpoint), "vae": "", "te": "", "family": config.family,
                "prediction_type": prediction_override(config)}
    model = start.base
    if not model.strip():
        raise ConfigError("no base model given: set \"model\" (resume_ckpt) to a checkpoint file or folder, "
                          "or to a bare file name found in the checkpoint folder (--ckpt-dir, or "
                          "<--models-dir>/StableDiffusion).")
    return {"model": model, "vae": _unless_none(config.vae), "te": _unless_none(config.te),
            "family": config.family, "prediction_type": prediction_override(config)}


def load_base(config: Config, start: StartPoint) -> LoadedBase:
    """Load the base of the run; its source records where the files really are (for pointers)."""
    source = base_source(config, start)
    family = source.get("family")
    vae_dirs = search_dirs(config, config.vae_dir, "VAE")
    sd = load_sd(source["model"], family=None if family in (None, "auto") else family,
                 prediction_type=prediction_override(config) or source.get("prediction_type"),
                 vae=source.get("vae") or None, text_encoder=source.get("te") or None,
                 search_dirs=search_dirs(config, config.ckpt_dir, "StableDiffusion"), vae_search_dirs=vae_dirs,
                 text_encoder_search_dirs=search_dirs(config, config.te_dir, "TextEncoders"))
    if sd.source is not None:
        source = dict(source, model=str(Path(sd.source).resolve()))
    if source.get("vae"):
        source["vae"] = str(resolve_model_path(source["vae"], vae_dirs).resolve())
    return LoadedBase(sd, source)


__all__ = ["BASE_POINTER_FILE", "LoadedBase", "base_source", "find_lora_file", "load_base", "read_pointer",
           "search_dirs"]
