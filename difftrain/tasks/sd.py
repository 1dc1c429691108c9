"""Stable Diffusion fine-tuning (SD1.x, SD2.x, SDXL): the whole UNet ('Full') or LoRA adapters ('LoRA').

Wiring only. Images, captions and buckets come from `difftrain.data`, latents and text embeddings
are cached by `difftrain.data.cache`, models are loaded by `difftrain.models.sd`, LoRA layers and
files are `difftrain.models.lora`, the loss is `difftrain.objectives` (epsilon / v, or rectified
flow through the v bridge), samples come from the diffusers pipeline over the trained modules (or
`difftrain.sampling`'s flow Euler sampler).

Order of work in `SDTask.__init__`, chosen so that mistakes cost nothing: the data folder is
scanned first (a missing or empty data_root is an error before gigabytes of weights load), then
the model is loaded, then the objective is built (rectified flow on a non-v base is refused
before any step is taken).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.buckets import (RESOLUTION_CLASSES, BucketBatchSampler, assign_buckets, make_buckets,
                                    make_buckets_traintrain)
from difftrain.data.cache import LatentCache, encode_images_cached, fingerprint_module, text_embedding_key
from difftrain.data.images import (ImageBucketDataset, ImageItem, repeat_by_multiply, scan_image_folder,
                                   trained_in_epoch)
from difftrain.errors import ConfigError
from difftrain.models import lora as lora_io
from difftrain.models.sd import SDModel, load_sd, sdxl_time_ids
from difftrain.objectives import DiffusionObjective, pretrained_flow_objective, randn, rescale_zero_terminal_snr
from difftrain.tasks.base import StartPoint, TaskDefaults, TaskParts

LORA_FILE = "lora.safetensors"
BASE_POINTER_FILE = "base_model.json"
VALIDATION_SEED = 12345  # fixed noise and timesteps, so loss_valid is comparable between evaluations
MAX_VALIDATION_ITEMS = 256
SAMPLE_GUIDANCE_SCALE = 7.5  # diffusers' default for these pipelines
FLOW_PROBE_ITEMS = 4
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- data ------------------------------------------------------------------------------------------

def buckets_for(config: Config) -> list[tuple[int, int]]:
    """Bucket shapes (width, height) for the config.

    TrainTrain's modes (LoRA, ADDifT, ...) follow TrainTrain (image_size, image_buckets_step, image_min_length,
    image_max_ratio); 'Full' follows EveryDream2's resolution classes (256..1536). Below 256,
    which no real model trains at, a single square bucket is used so that small test models
    and previews can run.
    """
    resolution = config.resolution
    if config.mode != "Full":
        height, width = config.training_size()  # TrainTrain's image_size(height, width): its area is the budget
        return make_buckets_traintrain((width, height), config.image_buckets_step,
                                       min(config.image_min_length, height, width), config.image_max_ratio)
    if resolution < RESOLUTION_CLASSES[0]:
        if resolution % 8:
            raise ConfigError(f"resolution {resolution} is not a multiple of 8; the VAE works on 8x8 blocks.")
        return [(resolution, resolution)]
    return make_buckets(resolution)


def split_validation(items: list[ImageItem], fraction: float, seed: int) -> tuple[list[ImageItem], list[ImageItem]]:
    """(train, validation): a seeded random `fraction` of the items held out (at least one when
    fraction > 0, at least one left to train on)."""
    if fraction <= 0:
        return items, []
    count = min(len(items) - 1, max(1, round(len(items) * fraction)))
    if count < 1:
        raise ConfigError(f"validation_fraction {fraction} leaves no image to train on ({len(items)} image(s)); "
                          "add images, set validation_fraction to 0, or use validation_root.")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    held_out = set(order[:count])
    return ([item for i, item in enumerate(items) if i not in held_out],
            [item for i, item in enumerate(items) if i in held_out])


def _unless_none(name: str) -> str:
    """TrainTrain presets write "None" for 'no separate VAE / text encoder'."""
    return "" if name.strip().lower() in ("none", "") else name


def _stack_nested(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {key: _stack_nested([value[key] for value in values]) for key in values[0]}
    return torch.stack(values)


def _to(value: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    if isinstance(value, dict):
        return {key: _to(item, device, dtype) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)
    return value


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Move `module` to device and dtype; casting only when needed keeps diffusers from warning."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters() if p.is_floating_point()):
        module.to(dtype)
    return module


def image_grid(images: list[Any]):
    """PIL images of one size in a near-square grid."""
    from PIL import Image

    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image, ((index % columns) * width, (index // columns) * height))
    return grid


# ---- the trained module -------------------------------------------------------------------------

FSDP_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")


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
                         added_cond_kwargs=_to(added_cond_kwargs, device, dtype) if added_cond_kwargs else None,
                         return_dict=False)[0]


def _unfreeze_last_layers(encoder: nn.Module, count: int) -> None:
    """Train only a CLIP text encoder's last `count` layers and its final layer norm (EveryDream2's
    unfreeze_last_n_layers; the embeddings freeze too when fewer than all layers train)."""
    text_model = getattr(encoder, "text_model", encoder)  # transformers 5 flattened CLIPTextModel
    layers = text_model.encoder.layers
    if count >= len(layers):
        return
    encoder.requires_grad_(False)
    for layer in layers[len(layers) - count:]:
        layer.requires_grad_(True)
    text_model.final_layer_norm.requires_grad_(True)


# ---- the task -------------------------------------------------------------------------------------

class SDTask:
    """Fine-tune a Stable Diffusion model on a folder of captioned images (see the module docstring).

    TrainTrain's other modes (difftrain.modes) subclass it: they replace the data (`_scan_data`,
    `epoch_batches`, `collate`) and the loss, and keep the model, LoRA and export machinery.
    """

    MODES: tuple[str, ...] = ("Full", "LoRA")
    # EveryDream2 warms a full fine-tune up over 2% of the decay; TrainTrain's LoRA modes do not warm up.
    defaults = TaskDefaults(from_scratch=False, warmup_fraction=0.02)

    def __init__(self, config: Config, accelerator: Any, start: StartPoint):
        if config.mode not in self.MODES:
            raise ConfigError(f"mode '{config.mode}' is not trained by {type(self).__name__}; it trains "
                              f"{' or '.join(repr(m) for m in self.MODES)}.")
        self.config = config
        self.device = accelerator.device
        self.is_lora = config.mode != "Full"
        if self.is_lora:
            self.defaults = TaskDefaults(from_scratch=False, warmup_fraction=0.0)
        on_cuda = self.device.type == "cuda"
        # Frozen weights only need to run forward: half precision halves their memory on a GPU.
        self.frozen_dtype = DTYPES[config.model_precision] if on_cuda else torch.float32

        # 1. data first: a wrong folder must not cost a model load.
        self.train_items, self.valid_items = self._scan_data()
        # EveryDream2's multiply: whole repeats always train, a fraction is drawn each epoch.
        self.train_items, self.train_chances = repeat_by_multiply(self.train_items)
        self.buckets = buckets_for(config)

        # 2. the model: a base, or the model files of a checkpoint being resumed.
        self.start = start
        self.checkpoint = start.checkpoint
        self.base = self._base_source()
        self.sd = self._load_base()
        if config.clip_skip >= 2:
            if self.sd.family == "sdxl":
                raise ConfigError("clip_skip applies to SD1/SD2 models; SDXL already conditions on its text "
                                  "encoders' penultimate layers. Set clip_skip to 0.")
            self.sd.clip_skip = config.clip_skip
        self.family, self.prediction_type = self.sd.family, self.sd.prediction_type
        self._check_bucket_sizes()
        self.train_text_encoders = self._trains_text_encoders()
        place(self.sd.vae, self.device, torch.float32)  # fp16 VAEs (SDXL's above all) overflow to NaN
        self.sd.vae.requires_grad_(False).eval()
        if self.is_lora:
            self.model = self._build_lora()
        else:
            self.model = self._build_full()
        if config.gradient_checkpointing:
            self.sd.unet.enable_gradient_checkpointing()
            if self.train_text_encoders:
                for encoder in self.sd.text_encoders:
                    encoder.gradient_checkpointing_enable()

        # 3. the objective, checked before training starts.
        self.objective = self._build_objective()

        # 4. data sets and caches.
        self.train_set, self.valid_set = self._build_datasets()
        self.cache = LatentCache(self._cache_folder(config, accelerator))
        self.vae_fingerprint = fingerprint_module(self.sd.vae)
        # clip_skip changes the embeddings, not the weights: cached ones of another layer must not match.
        self.text_fingerprint = "+".join(fingerprint_module(e) for e in self.sd.text_encoders) + \
            (f"+clip_skip{config.clip_skip}" if config.clip_skip >= 2 else "")
        self._samplers: dict[tuple[int, int], BucketBatchSampler] = {}
        self.pairs: Optional[Any] = None
        self._pair_shapes: Optional[list[tuple[int, ...]]] = None
        self.output_lora_path = self._output_lora_path() if self.is_lora else None
        self.multiplier = config.network_strength
        if self.is_lora:
            lora_io.set_multiplier(self._lora_modules(self.model).values(), self.multiplier)

    @property
    def parts(self) -> TaskParts:
        return TaskParts(samples=self, validation=self, exports=self,
                         flow=self if self.config.rectified_flow else None)

    # ---- setup ----------------------------------------------------------------------------------------
    @staticmethod
    def _cache_folder(config: Config, accelerator: Any) -> Optional[str]:
        """cache_dir; with several processes and none given, a disk cache under logdir that all of
        them share. In memory, each process would encode again the images another process met
        in an earlier epoch, since each epoch deals the batches out anew."""
        if config.cache_dir:
            return config.cache_dir
        processes = accelerator.num_processes
        if processes == 1:
            return None
        shared = str(Path(config.logdir) / "latent_cache")
        if accelerator.is_main_process:
            _say(f"note: {processes} processes and no cache_dir: latents and text embeddings "
                 f"are cached in '{shared}', shared by all of them (set cache_dir to choose the folder).")
        return shared

    def _scan_data(self) -> tuple[list[ImageItem], list[ImageItem]]:
        config = self.config
        setting = "data_root" if config.mode == "Full" else "lora_data_directory"
        from_filename = config.mode == "Full" or config.image_use_filename_as_tag
        items = scan_image_folder(config.data_root, trigger_word=config.lora_trigger_word,
                                  caption_from_filename=from_filename, setting_name=setting)
        if config.validation_root:
            valid = scan_image_folder(config.validation_root, trigger_word=config.lora_trigger_word,
                                      caption_from_filename=from_filename, setting_name="validation_root")
            train = items
        else:
            train, valid = split_validation(items, config.validation_fraction, config.seed)
        return train * config.image_num_multiply, valid[:MAX_VALIDATION_ITEMS]

    def _build_datasets(self) -> tuple[ImageBucketDataset, Optional[ImageBucketDataset]]:
        """(training set, held-out set or None), each image in its nearest bucket."""
        config = self.config
        flip_p = max(config.flip_p, 0.5 if config.image_mirroring else 0.0)
        train = ImageBucketDataset(self.train_items, assign_buckets(
            [(i.width, i.height) for i in self.train_items], self.buckets), seed=config.seed, flip_p=flip_p,
            caption_dropout=config.caption_dropout, shuffle_tags=config.shuffle_tags, keep_tags=config.keep_tags)
        valid = ImageBucketDataset(self.valid_items, assign_buckets(
            [(i.width, i.height) for i in self.valid_items], self.buckets), seed=config.seed) if self.valid_items else None
        return train, valid

    def _search_dirs(self, specific: str, subfolder: str) -> list[str]:
        models_dir = self.config.models_dir
        return [d for d in (specific, str(Path(models_dir) / subfolder) if models_dir else "", ".") if d]

    def _base_source(self) -> dict[str, Any]:
        """What the model is loaded from: the config's base, or a checkpoint's own model files."""
        config = self.config
        if self.checkpoint is not None:
            pointer = self.checkpoint / BASE_POINTER_FILE
            if pointer.is_file():  # a LoRA checkpoint: the base lives elsewhere, unchanged
                return json.loads(pointer.read_text(encoding="utf-8"))
            if not (self.checkpoint / "unet").is_dir():
                raise ConfigError(f"checkpoint '{self.checkpoint}' holds no Stable Diffusion model (no unet/ or "
                                  f"{BASE_POINTER_FILE}); it was made by another task.")
            # A Full checkpoint is a complete diffusers folder, VAE and text encoders included.
            return {"model": str(self.checkpoint), "vae": "", "te": "", "family": config.family,
                    "prediction_type": self._prediction_override()}
        model = self.start.base
        if not model.strip():
            raise ConfigError("no base model given: set \"model\" (resume_ckpt) to a checkpoint file or folder, "
                              "or to a bare file name found in the checkpoint folder (--ckpt-dir, or "
                              "<--models-dir>/StableDiffusion).")
        return {"model": model, "vae": _unless_none(config.vae), "te": _unless_none(config.te),
                "family": config.family, "prediction_type": self._prediction_override()}

    def _prediction_override(self) -> Optional[str]:
        value = self.config.resolved_prediction_type()
        return None if value == "auto" else value

    def _load_base(self) -> SDModel:
        config, base = self.config, self.base
        family = base.get("family")
        sd = load_sd(base["model"], family=None if family in (None, "auto") else family,
                     prediction_type=self._prediction_override() or base.get("prediction_type"),
                     vae=base.get("vae") or None, text_encoder=base.get("te") or None,
                     search_dirs=self._search_dirs(config.ckpt_dir, "StableDiffusion"),
                     vae_search_dirs=self._search_dirs(config.vae_dir, "VAE"),
                     text_encoder_search_dirs=self._search_dirs(config.te_dir, "TextEncoders"))
        # Remember where the base really is, for LoRA checkpoints' pointer files.
        if sd.source is not None:
            self.base = dict(base, model=str(Path(sd.source).resolve()))
        if base.get("vae"):
            from difftrain.models.sd import resolve_model_path

            self.base["vae"] = str(resolve_model_path(base["vae"], self._search_dirs(config.vae_dir, "VAE")).resolve())
        return sd

    def _check_bucket_sizes(self) -> None:
        multiple = self.sd.vae_scale_factor * 2 ** (len(self.sd.unet.config.block_out_channels) - 1)
        bad = [b for b in self.buckets if b[0] % multiple or b[1] % multiple]
        if bad:
            raise ConfigError(f"resolution {self.config.resolution} gives bucket(s) {bad[:3]} whose sides are not "
                              f"multiples of {multiple}, which this model needs; pick another resolution.")

    def _build_full(self) -> SDTrainable:
        sd = self.sd
        place(sd.unet, self.device, torch.float32).requires_grad_(True).train()
        for encoder in sd.text_encoders:
            if self.train_text_encoders:
                place(encoder, self.device, torch.float32).requires_grad_(True).train()
                if self.config.text_encoder_unfreeze_last_n_layers is not None:
                    _unfreeze_last_layers(encoder, self.config.text_encoder_unfreeze_last_n_layers)
            else:
                place(encoder, self.device, self.frozen_dtype).requires_grad_(False).eval()
        return SDTrainable(sd, self.train_text_encoders)

    def _trains_text_encoders(self) -> bool:
        """TrainTrain trains the text encoders only in LoRA mode, and only when network_blocks
        (if given) includes BASE; network_train_text_encoder asks for it."""
        config = self.config
        if not config.network_train_text_encoder:
            return False
        if config.mode not in ("Full", "LoRA"):
            _say(f"note: network_train_text_encoder applies to modes LoRA and Full; mode {config.mode} "
                 "trains the UNet only.")
            return False
        blocks = lora_io.check_block_names(config.network_blocks)
        return not blocks or "BASE" in blocks

    def _conv_rank_alpha(self, config: Config) -> tuple[int, float]:
        """3x3-convolution rank and alpha: c3lier falls back to network_rank / network_alpha
        (TrainTrain's rule for a conv rank or alpha of 0); lierla gets them only when set."""
        if config.network_type == "c3lier":
            return (config.network_conv_rank or config.network_rank,
                    config.network_conv_alpha or config.network_alpha)
        return config.network_conv_rank, config.network_conv_alpha or float(config.network_conv_rank)

    def _add_unet_lora(self, config: Config, adapter_name: str = lora_io.ADAPTER_NAME) -> None:
        if config.network_type == "loha":
            raise ConfigError("network_type 'loha' (LyCORIS) is not available in this version; use 'lierla' "
                              "(LoRA) or 'c3lier' (LoRA with 3x3 convolutions, network_conv_rank).")
        conv_rank, conv_alpha = self._conv_rank_alpha(config)
        linear, convolutions = lora_io.unet_target_modules(self.sd.unet, config.network_element, conv_rank,
                                                           blocks=config.network_blocks)
        lora_io.add_lora(self.sd.unet, linear, config.network_rank, config.network_alpha, conv_targets=convolutions,
                         conv_rank=conv_rank, conv_alpha=conv_alpha, dtype=DTYPES[config.lora_precision],
                         adapter_name=adapter_name)

    def _build_lora(self) -> SDTrainable:
        config, sd = self.config, self.sd
        place(sd.unet, self.device, self.frozen_dtype)
        for encoder in sd.text_encoders:
            place(encoder, self.device, self.frozen_dtype).requires_grad_(False).eval()
        self._add_unet_lora(config)
        if self.train_text_encoders:
            for encoder in sd.text_encoders:
                lora_io.add_lora(encoder, lora_io.text_encoder_target_modules(encoder), config.network_rank,
                                 config.network_alpha, dtype=DTYPES[config.lora_precision])
        model = SDTrainable(sd, self.train_text_encoders)
        if config.network_resume and self.checkpoint is None:
            path = self.find_lora_file(config.network_resume, "network_resume")
            state, _ = lora_io.read_lora_file(path)
            lora_io.load_lora_state_dict(self._lora_modules(model), state, str(path))
        return model

    def find_lora_file(self, name: str, setting: str) -> Path:
        """A LoRA file named by `setting`: a path, or a bare name in lora_dir / <models_dir>/lora."""
        from difftrain.models.sd import resolve_model_path

        try:
            return resolve_model_path(name, self._search_dirs(self.config.lora_dir, "lora"), what="LoRA")
        except ConfigError as error:
            raise ConfigError(f"{setting}: {error}") from None

    def _lora_modules(self, model: SDTrainable) -> dict[str, nn.Module]:
        modules: dict[str, nn.Module] = {"lora_unet": model.unet}
        if self.train_text_encoders:
            modules.update(zip(lora_io.text_encoder_prefixes(self.family), model.text_encoders))
        return modules

    def _build_objective(self):
        config = self.config
        alphas_cumprod = self.sd.noise_scheduler.alphas_cumprod
        if config.zero_terminal_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        if config.rectified_flow:
            unused = [name for name in ("pyramid_noise_discount", "embedding_perturbation") if getattr(config, name)]
            if unused:
                raise ConfigError(f"{', '.join(unused)} apply to the epsilon / v objective, not to rectified_flow; "
                                  "set them to 0 or rectified_flow to false.")
            if config.sample_prompts.lower().endswith(".json"):
                raise ConfigError("sample_prompts: EveryDream2's .json sample settings drive the diffusers "
                                  "pipeline, which rectified_flow does not sample with; give a .txt of prompts.")
            return pretrained_flow_objective(self.prediction_type, alphas_cumprod,
                                             time_sampling=config.timestep_sampling,
                                             loss_function=config.loss_function)
        return DiffusionObjective(alphas_cumprod, self.prediction_type, min_snr_gamma=config.min_snr_gamma,
                                  noise_offset=config.noise_offset, min_timestep=config.min_timestep,
                                  max_timestep=config.max_timestep, loss_function=config.loss_function,
                                  pyramid_noise_discount=config.pyramid_noise_discount,
                                  embedding_perturbation=config.embedding_perturbation)

    def _output_lora_path(self) -> Optional[Path]:
        """Where the finished LoRA goes: lora_dir, else <models_dir>/lora; None means the run's log folder."""
        config = self.config
        folder = config.lora_dir or (str(Path(config.models_dir) / "lora") if config.models_dir else "")
        if not folder:
            return None
        path = Path(folder) / f"{self.output_stem()}.safetensors"
        if not (config.save_lora_name or config.run_name):
            return path  # named after the log folder, which is new
        # A resumed run may meet its own earlier output; the write then picks a free name instead.
        if path.exists() and not config.save_overwrite and self.checkpoint is None:
            raise ConfigError(f"LoRA file {path} already exists; set save_overwrite true to replace it, or "
                              "choose another save_lora_name.")
        return path

    # ---- data -----------------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        unet = [p for p in self.model.unet.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": unet}]
        text = [p for p in self.model.text_encoders.parameters() if p.requires_grad]
        if text:
            group: dict[str, Any] = {"params": text}
            if self.config.text_encoder_lr:
                group["lr"] = self.config.text_encoder_lr
            groups.append(group)
        return groups

    def _sampler(self, keys: Sequence[Any], rank: int, world: int) -> BucketBatchSampler:
        return BucketBatchSampler(list(keys), self.config.batch_size, seed=self.config.seed,
                                  num_replicas=world, rank=rank)

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> Sequence[Sequence[int]]:
        if self.pairs is not None:
            if self._pair_shapes is None:
                self._pair_shapes = [tuple(self.pairs[i]["x0"].shape) for i in range(len(self.pairs))]
            return self._sampler(self._pair_shapes, rank, world_size).epoch_batches(epoch)
        if any(chance < 1.0 for chance in self.train_chances):
            trained = trained_in_epoch(self.train_chances, self.config.seed, epoch)
            batches = self._sampler([self._batch_key(i) for i in trained], rank, world_size).epoch_batches(epoch)
            return [[trained[position] for position in batch] for batch in batches]
        key = (rank, world_size)
        if key not in self._samplers:
            self._samplers[key] = self._sampler([self._batch_key(i) for i in range(len(self.train_set))],
                                                rank, world_size)
        return self._samplers[key].epoch_batches(epoch)

    def _batch_key(self, index: int) -> Any:
        """Items batch together when they share a bucket, and a batch_id (EveryDream2's batch_id.txt) if any."""
        batch_id = self.train_set.items[index].batch_id
        bucket = self.train_set.buckets[index]
        return (batch_id, bucket) if batch_id else bucket

    def _encode_latent_stats(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        vae = self.sd.vae
        distribution = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist
        return {"mean": distribution.mean.float(), "std": distribution.std.float()}

    def _latent_stats(self, dataset: ImageBucketDataset, indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        return encode_images_cached(self.cache, dataset, indices, model_fingerprint=self.vae_fingerprint,
                                    encode=self._encode_latent_stats, epoch=epoch)

    def _time_ids(self, dataset: ImageBucketDataset, indices: Sequence[int]) -> Optional[torch.Tensor]:
        """SDXL's (B, 6) size conditioning: original size, where the center crop sat, bucket size."""
        if self.family != "sdxl":
            return None
        originals, crops, targets = [], [], []
        for index in indices:
            item = dataset.items[index]
            width, height = dataset.buckets[index]
            scale = max(width / item.width, height / item.height)
            resized = (max(width, round(item.width * scale)), max(height, round(item.height * scale)))
            originals.append((item.height, item.width))
            crops.append((round(0.5 * (resized[1] - height)), round(0.5 * (resized[0] - width))))
            targets.append((height, width))
        return sdxl_time_ids(originals, crops, targets)

    def _frozen_text_cond(self, captions: Sequence[str], time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """Conditioning from the frozen text encoders, each caption encoded once and cached."""
        rows = []
        for caption in captions:
            def compute(caption=caption):
                with torch.no_grad():
                    cond = self.sd.encode_prompts([caption])
                tensors = {"encoder_hidden_states": cond["encoder_hidden_states"][0].float()}
                if "added_cond_kwargs" in cond:
                    tensors["text_embeds"] = cond["added_cond_kwargs"]["text_embeds"][0].float()
                return tensors
            rows.append(self.cache.get_or_compute(
                text_embedding_key(caption=caption, model_fingerprint=self.text_fingerprint), compute))
        cond: dict[str, Any] = {"encoder_hidden_states": torch.stack([r["encoder_hidden_states"] for r in rows])}
        if self.family == "sdxl":
            cond["added_cond_kwargs"] = {"text_embeds": torch.stack([r["text_embeds"] for r in rows]),
                                         "time_ids": time_ids}
        return _to(cond, self.device)

    def _cond(self, captions: Sequence[str], time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        if self.train_text_encoders:
            return {"captions": list(captions), **({"time_ids": time_ids} if time_ids is not None else {})}
        return self._frozen_text_cond(captions, time_ids)

    def collate(self, indices: Sequence[int], epoch: int) -> dict[str, Any]:
        """{"mean", "std": latent posterior (B, 4, h, w), "cond": UNet conditioning}, or a reflow
        pair batch {"x0", "noise", "cond"}."""
        if self.pairs is not None:
            pairs = [self.pairs[i] for i in indices]
            return _to({"x0": _stack_nested([p["x0"] for p in pairs]), "noise": _stack_nested([p["noise"] for p in pairs]),
                        "cond": _stack_nested([p["cond"] for p in pairs])}, self.device)
        stats = self._latent_stats(self.train_set, indices, epoch)
        captions = [self.train_set.caption(i, epoch) for i in indices]
        batch = {"mean": stats["mean"].to(self.device), "std": stats["std"].to(self.device),
                 "cond": self._cond(captions, self._time_ids(self.train_set, indices))}
        scales = [self.train_set.items[i].loss_scale for i in indices]
        if any(scale != 1.0 for scale in scales):  # EveryDream2's loss_scale.txt
            batch["loss_scale"] = torch.tensor(scales, dtype=torch.float32, device=self.device)
        return batch

    def _scaled_latents(self, mean: torch.Tensor, std: Optional[torch.Tensor], generator=None) -> torch.Tensor:
        """Scaled latents: a posterior sample drawn from `generator`, or the mean when std is None."""
        config = self.sd.vae.config
        latents = mean if std is None else mean + std * randn(mean.shape, generator, device=mean.device)
        shift = getattr(config, "shift_factor", None) or 0.0
        return (latents - shift) * config.scaling_factor

    # ---- objective ------------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        if "x0" in batch:  # reflow: the coupling (noise, endpoint) is given
            flow_time = self.objective.sample_flow_time(batch["x0"].shape[0], generator, self.device)
            return self.objective.flow_loss(model, batch["x0"], batch["noise"], flow_time, **batch["cond"])[0]
        latents = self._scaled_latents(batch["mean"], batch["std"], generator)
        return self.objective.loss(model, latents, generator, sample_weights=batch.get("loss_scale"),
                                   **batch["cond"])[0]

    def validation_loss(self, model: nn.Module) -> Optional[float]:
        """Loss on the held-out images with the posterior mean and seeded noise / timesteps, so
        two evaluations differ only by the weights. None without a validation set."""
        if self.valid_set is None:
            return None
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(self.valid_set.buckets):
            groups.setdefault(bucket, []).append(index)
        total, seen, number = 0.0, 0, 0
        for bucket in sorted(groups):
            members = groups[bucket]
            for start in range(0, len(members), self.config.batch_size):
                chunk = members[start:start + self.config.batch_size]
                stats = self._latent_stats(self.valid_set, chunk, 0)
                latents = self._scaled_latents(stats["mean"].to(self.device), None)
                draws = self.objective.fixed_validation_draws(tuple(latents.shape), VALIDATION_SEED + number, self.device)
                cond = self._cond([self.valid_set.items[i].caption for i in chunk], self._time_ids(self.valid_set, chunk))
                total += self.objective.loss(model, latents, **draws, **cond)[0].item() * len(chunk)
                seen += len(chunk)
                number += 1
        return total / seen

    # ---- samples ----------------------------------------------------------------------------------------
    def sample_prompts(self) -> list[str]:
        """Prompts from the sample_prompts file (one per line), else the first training captions."""
        path = self.config.sample_prompts
        if path:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError as error:
                raise ConfigError(f"sample_prompts file '{path}' cannot be read ({error.strerror}); give a "
                                  "text file with one prompt per line, or leave sample_prompts empty.") from None
            prompts = [line.strip() for line in lines if line.strip()]
            if prompts:
                return prompts
        return list(dict.fromkeys(item.caption for item in self.train_items)) or [""]

    def _model_view(self, model: SDTrainable) -> SDModel:
        """self.sd with the (possibly unwrapped) trained modules of `model` in place."""
        encoders = list(model.text_encoders) if len(model.text_encoders) else self.sd.text_encoders
        return dataclasses.replace(self.sd, unet=model.unet, text_encoders=encoders,
                                   scheduler_config=self._scheduler_config())

    def _scheduler_config(self) -> dict[str, Any]:
        config = dict(self.sd.scheduler_config)
        if self.config.zero_terminal_snr:
            # Inference must use the schedule the model was trained on, starting from its last step.
            config.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return config

    def samples(self, model: nn.Module) -> dict[str, Any]:
        """{"samples": a grid of num_samples images}: prompt i (cycling) with seed seed + i."""
        from difftrain.sampling import sample_flow_euler

        config = self.config
        prompts = self.sample_prompts()
        chosen = [prompts[i % len(prompts)] for i in range(config.num_samples)]
        side = config.resolution
        view = self._model_view(model)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        images = []
        with torch.no_grad(), autocast:
            if config.rectified_flow:
                velocity = self.objective.velocity_fn(model)
                factor = view.vae_scale_factor
                for index, prompt in enumerate(chosen):
                    generator = torch.Generator().manual_seed(config.seed + index)
                    noise = torch.randn((1, view.unet.config.in_channels, side // factor, side // factor),
                                        generator=generator).to(self.device)
                    latents = sample_flow_euler(velocity, noise, config.sample_inference_steps,
                                                cfg_scale=SAMPLE_GUIDANCE_SCALE, cond=view.encode_prompts([prompt]),
                                                uncond=view.encode_prompts([""]))
                    pixels = view.decode_latents(latents.float()).float().clamp(-1, 1)
                    array = ((pixels[0].permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()
                    from PIL import Image

                    images.append(Image.fromarray(array))
            elif config.sample_prompts.lower().endswith(".json"):  # EveryDream2's sample generator settings
                return {"samples": self._planned_samples(view)}
            else:
                pipeline = view.to_pipeline()
                pipeline.set_progress_bar_config(disable=True)
                for index, prompt in enumerate(chosen):
                    generator = torch.Generator(device=self.device).manual_seed(config.seed + index)
                    images.append(pipeline(**self._prompt_arguments(view, prompt), height=side, width=side,
                                           generator=generator, num_inference_steps=config.sample_inference_steps,
                                           guidance_scale=SAMPLE_GUIDANCE_SCALE).images[0])
        return {"samples": image_grid(images)}

    def _prompt_arguments(self, view: SDModel, prompt: str, negative: str = "") -> dict[str, Any]:
        """The pipeline's prompt arguments; with clip_skip, embeddings from our encoder (the layer the
        model trains on; diffusers' own clip_skip needs the text_model that transformers 5 removed)."""
        if self.config.clip_skip < 2:
            return {"prompt": prompt, "negative_prompt": negative or None}
        return {"prompt_embeds": view.encode_prompts([prompt])["encoder_hidden_states"],
                "negative_prompt_embeds": view.encode_prompts([negative])["encoder_hidden_states"]}

    def _planned_samples(self, view: SDModel):
        """EveryDream2's sample_prompts.json: each sample at each of its guidance scales, one row per
        sample (difftrain.vocab.everydream2.read_sample_plan)."""
        import diffusers
        from PIL import Image

        from difftrain.vocab.everydream2 import SCHEDULERS, read_sample_plan

        config = self.config
        plan = read_sample_plan(config.sample_prompts, config.seed, config.resolution)
        pipeline = view.to_pipeline()
        class_name, options = SCHEDULERS[plan.scheduler]
        pipeline.scheduler = getattr(diffusers, class_name).from_config(pipeline.scheduler.config, **options)
        pipeline.set_progress_bar_config(disable=True)
        captions = list(dict.fromkeys(item.caption for item in self.train_items)) or [""]
        rows = []
        for index, request in enumerate(plan.requests):
            seed = config.seed + index if request.seed == -1 else request.seed  # -1: reproducible, not random
            prompt = request.prompt
            if prompt is None:
                prompt = captions[torch.randint(len(captions), (1,), generator=torch.Generator().manual_seed(seed))]
            width, height = request.size
            rows.append([pipeline(**self._prompt_arguments(view, prompt, request.negative_prompt), width=width,
                                  height=height, num_inference_steps=plan.num_inference_steps, guidance_scale=cfg,
                                  generator=torch.Generator(device=self.device).manual_seed(seed)).images[0]
                         for cfg in request.cfgs])
        sheet = Image.new("RGB", (max(sum(i.width for i in row) for row in rows), sum(row[0].height for row in rows)))
        top = 0
        for row in rows:
            left = 0
            for image in row:
                sheet.paste(image, (left, top))
                left += image.width
            top += row[0].height
        return sheet

    # ---- rectified flow and reflow ----------------------------------------------------------------------
    def flow_velocity_fn(self, model: nn.Module):
        return self.objective.velocity_fn(model)

    def _noise_and_cond(self, dataset: ImageBucketDataset, indices: Sequence[int], seed: int):
        stats = self._latent_stats(dataset, indices, 0)
        noise = torch.randn(stats["mean"].shape, generator=torch.Generator().manual_seed(seed)).to(self.device)
        captions = [dataset.items[i].caption for i in indices]
        time_ids = self._time_ids(dataset, indices)
        if self.train_text_encoders:
            with torch.no_grad():
                cond = self.model.encode_captions(captions, time_ids)
            return noise, _to(cond, self.device, torch.float32)
        return noise, self._frozen_text_cond(captions, time_ids)

    def flow_probe(self) -> tuple[torch.Tensor, Optional[dict[str, Any]]]:
        dataset = self.valid_set or self.train_set
        bucket = dataset.buckets[0]
        indices = [i for i, b in enumerate(dataset.buckets) if b == bucket][:FLOW_PROBE_ITEMS]
        return self._noise_and_cond(dataset, indices, VALIDATION_SEED)

    def reflow_inputs(self, stage: int, batches: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """`batches` batches of the data set (captions and bucket shapes) with noise seeded by
        (seed, stage, batch), so a generation resumed after a crash meets the same noise."""
        order = self._sampler(self.train_set.buckets, 0, 1).epoch_batches(10_000 + stage)
        noises, conds = [], []
        for index in range(batches):
            noise, cond = self._noise_and_cond(self.train_set, order[index % len(order)],
                                               self.config.seed * 1000 + stage * 100 + index)
            noises.append(noise)
            conds.append(cond)
        return noises, conds

    def use_reflow_pairs(self, pairs: Optional[Any]) -> None:
        if pairs is not self.pairs:
            self._pair_shapes = None
        self.pairs = pairs

    # ---- persistence ------------------------------------------------------------------------------------
    def write_model(self, model: nn.Module, folder: Path) -> None:
        """Write the trained model into a checkpoint folder.

        'Full': a diffusers pipeline folder (StableDiffusionPipeline / StableDiffusionXLPipeline
        .from_pretrained(folder) loads it), the trained UNet in float32 so a resume is exact; with
        save_full_precision also `<project_name>.safetensors`, the A1111 single file.

        'LoRA': the base model is NOT copied (it is unchanged and often gigabytes): the folder holds
        `lora.safetensors` (kohya/A1111 keys, float32, loadable with the pipeline's
        load_lora_weights) and `base_model.json`, a pointer to the base (path, VAE, text encoder,
        family, prediction type) that a resume loads the base from. The user-facing LoRA file is
        written by `finish` (and `after_step` for save_per_steps), not here.
        """
        if not self.is_lora:
            view = self._model_view(model)
            view.save_pretrained(folder, overwrite=True)
            if self.config.save_full_precision:
                from difftrain.models.sd import export_single_file

                export_single_file(view, folder / f"{self.config.project_name}.safetensors", dtype=None)
            return
        state = lora_io.lora_state_dict(self._lora_modules(model))
        lora_io.save_lora_file(folder / LORA_FILE, state, self._lora_metadata(), overwrite=True)
        pointer = {key: self.base.get(key) for key in ("model", "vae", "te")}
        pointer.update(family=self.family, prediction_type=self.prediction_type, mode=self.config.mode,
                       **self.pointer_extras())
        (folder / BASE_POINTER_FILE).write_text(json.dumps(pointer, indent=2), encoding="utf-8")

    def pointer_extras(self) -> dict[str, Any]:
        """Mode-specific entries of a LoRA checkpoint's base_model.json (Difference: pass, copier)."""
        return {}

    def output_stem(self, log_folder: Optional[Path] = None) -> str:
        """save_lora_name; empty: the run name, else the log folder's name (unique per run, so
        repeated runs of one preset, e.g. a learning-rate sweep, never collide)."""
        config = self.config
        return config.save_lora_name or config.run_name or (log_folder.name if log_folder else config.project_name)

    def _lora_metadata(self, output_name: Optional[str] = None) -> dict[str, str]:
        config = self.config
        conv_rank, conv_alpha = self._conv_rank_alpha(config)
        return lora_io.lora_metadata(
            family=self.family, rank=config.network_rank, alpha=config.network_alpha,
            output_name=output_name or self.output_stem(),
            conv_rank=conv_rank, conv_alpha=conv_alpha,
            prediction_type=self.prediction_type, base_model=str(self.base.get("model") or ""),
            trains_text_encoder=self.train_text_encoders,
            extra={"ss_network_element": config.network_element, "ss_seed": str(config.seed),
                   "ss_learning_rate": str(config.lr), "ss_resolution": str(config.resolution),
                   "ss_network_strength": str(config.network_strength), "ss_training_mode": config.mode,
                   "ss_network_blocks": json.dumps(list(config.network_blocks)),
                   "ss_max_train_steps": str(config.max_steps),
                   "ss_min_timestep": str(config.min_timestep), "ss_max_timestep": str(config.max_timestep)})

    def write_lora_file(self, model: nn.Module, stem: str, log_folder: Optional[Path]) -> Path:
        """Export the trained LoRA as <lora dir>/<stem>.safetensors in save_precision.

        The folder is lora_dir, else <models_dir>/lora, else the run's log folder. An existing file
        is replaced only with save_overwrite; otherwise ours goes beside it as <stem>_1 (and so on).
        """
        config = self.config
        folder = self.output_lora_path.parent if self.output_lora_path else (log_folder or Path(config.logdir))
        path = folder / f"{stem}.safetensors"
        if path.exists() and not config.save_overwrite:
            base, number = path.stem, 1
            while path.exists():
                path = path.with_name(f"{base}_{number}.safetensors")
                number += 1
            _say(f"note: {folder / (stem + '.safetensors')} already exists; writing {path} instead "
                 "(save_overwrite is off).")
        state = lora_io.lora_state_dict(self._lora_modules(model))
        lora_io.save_lora_file(path, state, self._lora_metadata(path.stem), dtype=DTYPES[config.save_precision],
                               overwrite=config.save_overwrite)
        return path

    def exports_at(self, global_step: int) -> bool:
        """Whether after_step writes a file at this step (the loop then hands it the whole model)."""
        every = self.config.save_per_steps
        return bool(self.is_lora and every and not global_step % every
                    and not global_step >= self.config.max_steps > 0)

    def after_step(self, model: nn.Module, global_step: int, log_folder: Optional[Path]) -> None:
        """TrainTrain's save_per_steps: <name>_<N>steps.safetensors; the loop calls it at the steps
        exports_at names (every N steps, not at the last)."""
        path = self.write_lora_file(model, f"{self.output_stem(log_folder)}_{global_step}steps", log_folder)
        _say(f"LoRA at step {global_step}: {path}")

    def step_metrics(self, global_step: int) -> dict[str, Any]:
        """Mode-specific fields of step `global_step`'s metrics (ADDifT: direction and multiplier)."""
        return {}

    def finish(self, model: nn.Module, log_folder: Optional[Path], run_dir: Optional[Path]) -> None:
        """After a completed run: the user-facing LoRA, its settings JSON, the CSV log."""
        if run_dir is not None:
            from difftrain.modes.outputs import add_step_fields

            add_step_fields(run_dir / "metrics.jsonl", self.step_metrics)
        if not self.is_lora:
            return
        path = self.write_lora_file(model, self.output_stem(log_folder), log_folder)
        config = self.config
        if config.save_as_json:
            path.with_suffix(".json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
        if config.logging_save_csv and run_dir is not None:
            from difftrain.modes.outputs import write_metrics_csv

            write_metrics_csv(run_dir / "metrics.jsonl", path.with_suffix(".csv"))
        _say(f"LoRA: {path}")

    def load_model(self, model: nn.Module, folder: Path) -> None:
        """Restore exactly what write_model wrote into `folder`."""
        from safetensors.torch import load_file

        if self.is_lora:
            state, _ = lora_io.read_lora_file(folder / LORA_FILE)
            lora_io.load_lora_state_dict(self._lora_modules(model), state, str(folder / LORA_FILE))
            lora_io.set_multiplier(self._lora_modules(model).values(), self.multiplier)
            return
        modules = {"unet": model.unet}
        if len(model.text_encoders):
            names = ["text_encoder", "text_encoder_2"][:len(model.text_encoders)]
            modules.update(zip(names, model.text_encoders))
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

    def run_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The UNet's state_dict ('Full'), or the kohya-named LoRA tensors ('LoRA')."""
        if self.is_lora:
            return lora_io.lora_state_dict(self._lora_modules(model))
        return {k: v.detach().cpu() for k, v in model.unet.state_dict().items()}


__all__ = ["SDTask", "SDTrainable", "buckets_for", "image_grid", "split_validation"]
