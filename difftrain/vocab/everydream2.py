"""EveryDream2's vocabulary: every flag of its train.py, what it becomes in our schema, or its status.

EveryDream2 (github.com/victorchall/EveryDream2trainer) is configured by `train.py` flags, a
`train.json` holding the same names, and three side files the JSON points at: `optimizer.json`
(optimizer_config), a validation JSON (validation_config) and sample prompts (sample_prompts).
This module is the one place that knows those names. `translate` turns a dict of them (the JSON
merged with the command line) into our schema's keys plus the notes to print; the engine never
sees an EveryDream2 name. docs/everydream2.md is generated from the same tables
(`python -m difftrain.vocab.everydream2 > docs/everydream2.md`), so the two cannot drift.

Statuses:
    ours        done through our schema (the Meaning column says how)
    no effect   accepted; a one-line note says why it changes nothing here
    refused     the values that would need a missing feature are refused with the reason; its
                neutral value (EveryDream2's default) is accepted
    legacy      a key EveryDream2's own shipped configs still carry but its train.py no longer reads
    front door  handled by train.py's command line itself
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import TypeAdapter, ValidationError

from difftrain.config import ALIASES, FIELD_NAMES, IGNORED_KEYS, Config, validate_config_dict
from difftrain.errors import ConfigError, did_you_mean
from difftrain.jsonfile import read_json_object
from difftrain.vocab.table import as_int, merge_settings

STATUSES = ("ours", "no effect", "refused", "legacy", "front door")
SOURCE = "EveryDream2trainer (victorchall), main at 5098db8"

Converter = Callable[[Any], dict[str, Any]]


@dataclass(frozen=True)
class Term:
    """One EveryDream2 key: its default there, our status and meaning, and how a value translates."""

    key: str
    default: Any
    status: str
    meaning: str
    kind: str = "str"                 # command-line type: bool, int, float, str, list
    targets: tuple[str, ...] = ()     # our schema keys it sets (for "flags win over the JSON")
    convert: Optional[Converter] = None
    refuse: Callable[[Any], str] = field(default=lambda value: "")   # a reason, or "" when accepted
    note: str = ""                    # printed when accepted with a value other than its default

    def translate(self, value: Any) -> dict[str, Any]:
        if self.convert is not None:
            return self.convert(value)
        if value is None or not self.targets:
            return {}
        return {self.targets[0]: value}


def _ours(key: str, default: Any, meaning: str, kind: str, target: str = "", convert: Optional[Converter] = None,
          also: tuple[str, ...] = ()) -> Term:
    return Term(key, default, "ours", meaning, kind, (target or key, *also), convert)


def _no_effect(key: str, default: Any, kind: str, note: str) -> Term:
    return Term(key, default, "no effect", note, kind, note=note)


def _refused_unless(key: str, default: Any, kind: str, neutral: Callable[[Any], bool], reason: str,
                    status: str = "refused") -> Term:
    return Term(key, default, status, reason, kind,
                refuse=lambda value: "" if value is None or neutral(value) else reason)


def _legacy(key: str, note: str) -> Term:
    return Term(key, None, "legacy", note, "bool", note=note)


def _drop_none(target: str, transform: Callable[[Any], Any] = lambda v: v) -> Converter:
    return lambda value: {} if value is None else {target: transform(value)}


LOSS_TYPES = {"mse": "MSE", "huber": "Smooth-L1", "mse_huber": "MSE-Huber", "huber_mse": "Huber-MSE"}


def _loss_type(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if value not in LOSS_TYPES:
        raise ConfigError(f"loss_type {value!r} is not one of EveryDream2's: {', '.join(LOSS_TYPES)}.")
    return {"loss_function": LOSS_TYPES[value]}


def _attn_type(value: Any) -> str:
    if value in (None, "sdp", "xformers", "slice"):
        return ""
    return f"attn_type {value!r} is not one of EveryDream2's: 'sdp', 'xformers', 'slice'"


def _clamp_percent(value: Any) -> Any:
    """EveryDream2 clamps rated_dataset_target_dropout_percent into 0..100; a value that is no number
    is left for the schema to report."""
    try:
        return min(max(float(value), 0.0), 100.0)
    except (TypeError, ValueError):
        return value


def _wandb(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    # EveryDream2 logs to wandb's servers only when asked, and then online.
    return {"tracker": "wandb", "wandb_mode": "online"} if value else {"tracker": "none"}


TERMS: tuple[Term, ...] = (
    Term("config", None, "front door", "`train.py --config FILE` (or the file as the first argument) is "
         "read first; flags win over it, as in EveryDream2.", "str"),
    _no_effect("amp", True, "bool", "amp is deprecated in EveryDream2 too (it is replaced by 'not "
               "disable_amp'); mixed precision is on unless disable_amp."),
    Term("attn_type", "sdp", "no effect", "PyTorch's scaled-dot-product attention is always used; "
         "'xformers' and 'slice' compute the same attention, so they change memory and speed only.",
         "str", refuse=_attn_type,
         note="attn_type: difftrain always uses PyTorch's scaled-dot-product attention (same results)."),
    _ours("batch_size", 2, "batch_size", "int"),
    _ours("ckpt_every_n_minutes", None, "ckpt_every_n_minutes (null: every 20 minutes unless "
          "save_every_n_epochs is set, as in EveryDream2)", "int",
          convert=_drop_none("ckpt_every_n_minutes")),
    _ours("clip_grad_norm", None, "clip_grad_norm (train.py: the UNet and the text encoder each clipped to it on "
          "their own, clip_grad_norm_per_model, as EveryDream2 does)", "float"),
    _ours("clip_skip", 0, "clip_skip (SD1/SD2; training, validation and samples all condition on that layer)",
          "int"),
    _ours("cond_dropout", 0.04, "caption_dropout", "float", "caption_dropout",
          convert=_drop_none("caption_dropout")),
    _ours("data_root", "input", "data_root: a folder in EveryDream2's conventions, or a .json list of "
          "items (difftrain/data/images.py)", "str"),
    _ours("disable_amp", False, "true: mixed_precision 'no'", "bool", "mixed_precision",
          convert=lambda value: {"mixed_precision": "no"} if value else {}),
    _ours("disable_textenc_training", False, "network_train_text_encoder = not disable_textenc_training",
          "bool", "network_train_text_encoder",
          convert=_drop_none("network_train_text_encoder", lambda value: not value)),
    _ours("disable_unet_training", False, "train_unet = not disable_unet_training: true trains the text "
          "encoder alone (the UNet stays as loaded; with disable_textenc_training too there is nothing to "
          "train, an error)", "bool", "train_unet", convert=_drop_none("train_unet", lambda value: not value)),
    _ours("embedding_perturbation", 0.0, "embedding_perturbation", "float",
          convert=_drop_none("embedding_perturbation")),
    _ours("flip_p", 0.0, "flip_p (a folder's flip_p.txt or yaml wins for its images)", "float",
          convert=_drop_none("flip_p")),
    _ours("gpuid", 0, "gpu_id: train.py narrows CUDA_VISIBLE_DEVICES to that GPU before CUDA starts (numbered "
          "among the visible GPUs, as cuda:N is); a multi-process launch refuses a non-zero gpuid (use accelerate "
          "launch --gpu_ids); without CUDA a one-line note says training runs on the CPU", "int", "gpu_id",
          convert=_drop_none("gpu_id")),
    _ours("gradient_checkpointing", False, "gradient_checkpointing", "bool",
          convert=_drop_none("gradient_checkpointing")),
    _ours("grad_accum", 1, "gradient_accumulation_steps", "int", "gradient_accumulation_steps"),
    _ours("logdir", "logs", "logdir", "str"),
    _no_effect("log_step", 25, "int", "log_step: difftrain records every optimizer step's loss and "
               "learning rate (metrics.jsonl and the tracker), so there is no interval to set."),
    _ours("loss_type", "mse_huber", "loss_function: mse -> MSE, huber -> Smooth-L1 (Huber with "
          "delta 1), mse_huber -> MSE-Huber, huber_mse -> Huber-MSE", "str", "loss_function",
          convert=_loss_type),
    _ours("lr", None, "lr (null: optimizer_config's base lr, else 1e-6)", "float", convert=_drop_none("lr")),
    _ours("lr_decay_steps", 0, "lr_decay_steps (0: the whole run; EveryDream2's automatic value is "
          "1.5 runs)", "int", convert=_drop_none("lr_decay_steps")),
    _ours("lr_scheduler", "constant", "lr_scheduler", "str", convert=_drop_none("lr_scheduler")),
    _ours("lr_warmup_steps", None, "lr_warmup_steps (null: 2% of lr_decay_steps, as in EveryDream2)", "int"),
    _ours("max_epochs", 300, "max_epochs", "int"),
    _ours("no_prepend_last", False, "no_prepend_last", "bool", convert=_drop_none("no_prepend_last")),
    _ours("no_save_ckpt", False, "no_save_ckpt: no single .safetensors files in save_ckpt_dir", "bool",
          convert=_drop_none("no_save_ckpt")),
    _ours("optimizer_config", "optimizer.json", "read and translated (see the optimizer_config table): "
          "optimizer, lr, weight_decay, optimizer_settings and the text encoder's own: text_encoder_lr, "
          "_lr_scheduler, _lr_warmup_steps, _lr_decay_steps, _optimizer, _optimizer_settings, _weight_decay, "
          "_unfreeze_last_n_layers and the other text_encoder_freeze_* settings", "str", "optimizer",
          also=("lr", "optimizer_settings", "weight_decay", "text_encoder_lr")),
    _refused_unless("plugins", None, "list", lambda value: not value,
                    "plugins run EveryDream2's own Python plugin classes, which difftrain does not load; "
                    "remove 'plugins' and use difftrain's settings for the same ends (e.g. data_root "
                    "conventions, sample_prompts)"),
    _ours("project_name", "myproj", "project_name", "str"),
    _ours("resolution", 512, "resolution", "int"),
    _ours("resume_ckpt", "sd_v1-5_vae.ckpt", "resume_ckpt: a diffusers folder, a single file, or "
          "'findlast'; a finished run's final checkpoint (what chain.bat's findlast finds) starts a new run "
          "from its weights, as in EveryDream2, while an unfinished run's checkpoint continues that run",
          "str"),
    _ours("run_name", None, "run_name", "str", convert=_drop_none("run_name")),
    _ours("sample_prompts", "sample_prompts.txt", "sample_prompts: a .txt file is read as it is (one prompt "
          "a line); a .json file is EveryDream2's sample generator settings (see the sample_prompts table)", "str",
          also=("sample_inference_steps", "num_samples")),
    _ours("sample_steps", 250, "sample_steps", "int"),
    _ours("save_ckpt_dir", None, "save_ckpt_dir: each checkpoint and its EMA as A1111 single files "
          "<checkpoint name>.safetensors there; null or left out: the current working folder ('.'), as in "
          "EveryDream2 (for the full fine-tunes EveryDream2 trains; train_j.py and other runs write none "
          "unless it is set). An existing file is never overwritten; no_save_ckpt writes none",
          "str",
          convert=lambda value: {"save_ckpt_dir": os.curdir if value is None else value}),
    _ours("save_every_n_epochs", None, "save_every_n_epochs (null: off)", "int",
          convert=_drop_none("save_every_n_epochs")),
    _ours("save_ckpts_from_n_epochs", 0, "save_ckpts_from_n_epochs", "int",
          convert=_drop_none("save_ckpts_from_n_epochs")),
    _ours("save_full_precision", False, "save_full_precision: true also writes the single .safetensors "
          "file in float32", "bool", convert=_drop_none("save_full_precision")),
    _no_effect("save_optimizer", False, "bool", "save_optimizer: every difftrain checkpoint folder holds the "
               "optimizer state (trainer_state.pt) anyway, for exact resumes."),
    _ours("seed", 555, "seed (-1: a random seed, recorded)", "int"),
    _ours("shuffle_tags", False, "shuffle_tags", "bool", convert=_drop_none("shuffle_tags")),
    _ours("timestep_start", 0, "min_timestep", "int", "min_timestep"),
    _ours("timestep_end", 1000, "max_timestep", "int", "max_timestep"),
    Term("train_sampler", "ddpm", "no effect", "the training noise comes from the model's own schedule; "
         "DDPM, PNDM and DDIM add noise identically from the same betas, so the choice changes nothing "
         "in training.", "str",
         refuse=lambda value: "" if value in (None, "ddpm", "pndm", "ddim") else
         f"train_sampler {value!r} is not one of EveryDream2's: 'ddpm', 'pndm', 'ddim'",
         note="train_sampler: DDPM, PNDM and DDIM add training noise identically; nothing changes."),
    _ours("keep_tags", 0, "keep_tags", "int", convert=_drop_none("keep_tags")),
    _ours("wandb", False, "false: tracker 'none' (metrics.jsonl is still written); true: tracker "
          "'wandb', wandb_mode 'online'", "bool", "tracker", convert=_wandb, also=("wandb_mode",)),
    _ours("validation_config", None, "read and translated (see the validation_config table)", "str",
          "validation_fraction", also=("validation_root", "validate_every_n_epochs")),
    _no_effect("write_schedule", False, "bool", "write_schedule: difftrain writes no per-epoch batch "
               "schedule file; the order is reproducible from seed instead."),
    _ours("rated_dataset", False, "rated_dataset: each image's yaml 'rating' (default 1; 0 counts as 1, as "
          "there) weights it; epochs 0 and 1 train every image, epoch n >= 2 trains ceil(count x (max_epochs - "
          "(n - 1) x (1 - target/100)) / max_epochs) distinct images drawn by rating without replacement "
          "(multiply does not apply to those epochs), EveryDream2's schedule; the draw is seeded per epoch",
          "bool", convert=_drop_none("rated_dataset")),
    _ours("rated_dataset_target_dropout_percent", 50, "rated_dataset_target_dropout_percent (clamped to 0..100, "
          "as in EveryDream2)", "int",
          convert=_drop_none("rated_dataset_target_dropout_percent", _clamp_percent)),
    _ours("zero_frequency_noise_ratio", 0.02, "noise_offset (the same noise + ratio x randn(B, C, 1, 1))",
          "float", "noise_offset", convert=_drop_none("noise_offset", lambda value: max(0.0, value))),
    _ours("enable_zero_terminal_snr", None, "zero_terminal_snr", "bool", "zero_terminal_snr",
          convert=_drop_none("zero_terminal_snr")),
    _ours("load_settings_every_epoch", None, "reload_settings_from = the --config file: read again as each "
          "epoch starts, its loss settings (loss_type, min_snr_gamma, pyramid_noise_discount, timestep_start/end, "
          "zero_frequency_noise_ratio, embedding_perturbation) apply from that epoch on, the keys of the JSON "
          "winning, as in EveryDream2; its other re-read keys (clip_skip, ema_*, the saving keys) get a note and "
          "wait for the next start; lr, batch_size, flip_p and cond_dropout change nothing there either",
          "bool", "reload_settings_from",
          convert=lambda value: {"reload_settings_from": True} if value else {}),
    _ours("min_snr_gamma", None, "min_snr_gamma (null: off)", "float", convert=_drop_none("min_snr_gamma")),
    _ours("ema_decay_rate", None, "ema_decay_rate (EMA of the trained weights: difftrain/ema.py)", "float"),
    _ours("ema_strength_target", None, "ema_strength_target (see ema_decay_rate)", "float"),
    _ours("ema_update_interval", 500, "ema_update_interval (see ema_decay_rate)", "int",
          convert=_drop_none("ema_update_interval")),
    _ours("ema_device", "cpu", "ema_device (see ema_decay_rate)", "str", convert=_drop_none("ema_device")),
    _ours("ema_sample_nonema_model", False, "ema_sample_nonema_model (see ema_decay_rate)", "bool",
          convert=_drop_none("ema_sample_nonema_model")),
    _ours("ema_sample_ema_model", False, "ema_sample_ema_model (see ema_decay_rate)", "bool",
          convert=_drop_none("ema_sample_ema_model")),
    _ours("ema_resume_model", None, "ema_resume_model (see ema_decay_rate)", "str",
          convert=_drop_none("ema_resume_model")),
    _ours("pyramid_noise_discount", None, "pyramid_noise_discount (null: off)", "float",
          convert=_drop_none("pyramid_noise_discount")),
    # Keys EveryDream2's own shipped configs still carry; its train.py reads none of them.
    _legacy("notebook", "notebook: an EveryDream2 notebook switch; no effect here."),
    _legacy("disable_xformers", "disable_xformers: superseded by attn_type in EveryDream2; no effect here."),
    _legacy("lowvram", "lowvram: EveryDream2 no longer reads it; lower batch_size or set "
            "gradient_checkpointing instead."),
    _legacy("scale_lr", "scale_lr: EveryDream2 no longer reads it; lr is used as given."),
    _legacy("ed1_mode", "ed1_mode: EveryDream1 compatibility that EveryDream2 no longer reads; no effect."),
    _legacy("useadam8bit", "useadam8bit: EveryDream2 no longer reads it; the optimizer comes from "
            "optimizer_config."),
)

TABLE: dict[str, Term] = {term.key: term for term in TERMS}
FLAG_KEYS: tuple[str, ...] = tuple(term.key for term in TERMS if term.status != "legacy")

# ---- side files -------------------------------------------------------------------------------------
# (key, status, meaning) of the keys inside the files that optimizer_config, validation_config and
# sample_prompts point at; the translators below follow these rows.

# EveryDream2's optimizer names -> ours, and which optimizer.json settings each of them receives
# there (optimizer/optimizers.py passes epsilon to the Adam family only, momentum to SGD only...).
_ADAM, _LION = ("betas", "epsilon"), ("betas",)
OPTIMIZER_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "adamw": ("AdamW", _ADAM), "adamw8bit": ("AdamW8bit", _ADAM), "lion": ("Lion", _LION),
    "lion8bit": ("Lion8bit", _LION), "prodigy": ("Prodigy", ("d0", "use_bias_correction", "safeguard_warmup")),
    "dadapt_adam": ("DAdaptAdam", (*_ADAM, "d0", "decouple")), "dadapt_adan": ("DAdaptAdan", (*_ADAM, "d0")),
    "dadapt_lion": ("DAdaptLion", (*_LION, "d0")), "dadapt_sgd": ("DAdaptSGD", ("momentum", "d0")),
    # EveryDream2 hands these its epsilon only (the dowg package's and its own adacoor.py's one setting)
    "coordinate_dowg": ("CoordinateDoWG", ("epsilon",)), "scalar_dowg": ("ScalarDoWG", ("epsilon",)),
    "adacoor": ("AdaCoor", ("epsilon",)),
}
# our optimizer_settings names for optimizer.json's (optim.py renames decouple and use_bias_correction
# to pytorch-optimizer's spellings itself)
_SETTING_NAMES = {"epsilon": "eps"}
OPTIMIZER_KEYS: tuple[tuple[str, str, str], ...] = (
    ("doc", "no effect", "documentation inside the file; not read"),
    ("base.optimizer", "ours", "optimizer: adamw, adamw8bit, lion, lion8bit, prodigy, dadapt_adam, dadapt_adan, "
     "dadapt_lion, dadapt_sgd, coordinate_dowg, scalar_dowg, adacoor -> AdamW, AdamW8bit, Lion, Lion8bit, Prodigy, "
     "DAdaptAdam, DAdaptAdan, DAdaptLion, DAdaptSGD, CoordinateDoWG, ScalarDoWG, AdaCoor. The last three set "
     "their own step size from epsilon, so lr and the schedule have no effect on them, as in EveryDream2 "
     "(DoWG: r_eps = epsilon x (1 + |x_0|); difftrain/parameter_free.py)"),
    ("base.lr", "ours", "lr, unless the main config or the command line sets lr (EveryDream2's order)"),
    ("base.lr_scheduler, base.lr_warmup_steps, base.lr_decay_steps", "ours",
     "the same keys; non-null values win over the main config (EveryDream2's order), flags win over both"),
    ("base.betas, base.epsilon, base.d0, base.decouple, base.momentum, base.use_bias_correction, "
     "base.safeguard_warmup", "ours", "optimizer_settings ('betas=(b1, b2);eps=e;d0=...'), each passed to "
     "the optimizers EveryDream2 passes it to; given to another optimizer it has no effect, with a note"),
    ("base.weight_decay", "ours", "weight_decay"),
    ("text_encoder_overrides.lr", "ours", "text_encoder_lr, unless the main config or the command line sets lr: "
     "EveryDream2 then trains the text encoder at that lr too (a note says so)"),
    ("text_encoder_overrides.lr_scheduler", "ours", "text_encoder_lr_scheduler (its own schedule, as in "
     "EveryDream2's second optimizer)"),
    ("text_encoder_overrides.lr_warmup_steps, text_encoder_overrides.lr_decay_steps", "ours",
     "text_encoder_lr_warmup_steps, text_encoder_lr_decay_steps (null or 0: base's, as in EveryDream2)"),
    ("text_encoder_overrides.optimizer, .betas, .epsilon, .weight_decay, .d0, .decouple, .momentum, "
     ".use_bias_correction, .safeguard_warmup", "ours", "text_encoder_optimizer, text_encoder_optimizer_settings, "
     "text_encoder_weight_decay (each null: base's); where they differ from base, the text encoder gets an "
     "optimizer of its own, stepped with the UNet's and saved with it in every checkpoint (difftrain/optim.py "
     "OptimizerPair), as EveryDream2 builds one per model"),
    ("text_encoder_lr_scale", "ours", "with no text_encoder_overrides.lr: text_encoder_lr = lr x scale"),
    ("text_encoder_freezing.unfreeze_last_n_layers", "ours", "text_encoder_unfreeze_last_n_layers (null: all "
     "layers); the key's presence, even null, makes freeze_front_n_layers have no effect, as in EveryDream2"),
    ("text_encoder_freezing.freeze_front_n_layers", "ours", "text_encoder_freeze_front_n_layers: the first N "
     "layers freeze, or with N < 0 all but the last -N"),
    ("text_encoder_freezing.freeze_embeddings", "ours", "text_encoder_freeze_embeddings (left out: frozen "
     "exactly when only some layers train; null counts as false, as in EveryDream2)"),
    ("text_encoder_freezing.freeze_final_layer_norm", "ours", "text_encoder_freeze_final_layer_norm (left out "
     "or null: it trains)"),
    ("apply_grad_scaler_step_tweaks", "no effect", "accelerate's gradient scaler is used as it is"),
)
VALIDATION_KEYS: tuple[tuple[str, str, str], ...] = (
    ("documentation", "no effect", "documentation inside the file; not read"),
    ("validate_training", "ours", "false: no validation (validation_fraction 0)"),
    ("val_split_mode 'automatic'", "ours", "validation_fraction = auto_split_proportion (a seeded split)"),
    ("val_split_mode 'manual'", "ours", "validation_root = manual_data_root"),
    ("auto_split_proportion", "ours", "validation_fraction"),
    ("manual_data_root", "ours", "validation_root"),
    ("extra_manual_datasets", "ours", "validation_extra_roots ({name: folder}), each folder's loss logged as "
     "loss_valid_<name> whenever loss_valid is"),
    ("stabilize_training_loss", "ours", "true: validation_stabilize_fraction = stabilize_split_proportion; that "
     "share of the training images (still trained on) logged with fixed noise as loss_train_stabilized"),
    ("stabilize_split_proportion", "ours", "validation_stabilize_fraction, when stabilize_training_loss is true"),
    ("every_n_epochs", "ours", "validate_every_n_epochs for whole numbers; below 1, validations_per_epoch = "
     "ceil(1 / every_n_epochs) evenly spaced (0.5: twice per epoch); 1.5 and the like are refused"),
    ("seed", "no effect", "the split follows seed; validation noise comes from difftrain's own fixed seed"),
    ("use_relative_loss", "ours", "validation_relative_loss: each validation also logs loss_valid_relative (and "
     "loss_valid_<name>_relative), the loss minus the same loss measured once before the first step, as "
     "EveryDream2's validation_default.json describes it and its code did until commit 413f981 (its main "
     "still reads the key, and no longer applies it)"),
)
SAMPLE_KEYS: tuple[tuple[str, str, str], ...] = (
    ("(a .txt file)", "ours", "one prompt a line, read as it is; an empty file samples training captions"),
    ("cfgs", "ours", "every sample is drawn at each guidance scale (default [7, 4, 1.01])"),
    ("scheduler", "ours", "the inference scheduler: ddim, dpm++ (dpm++_2m), dpm++_2m_k, dpm++_2s, dpm++_2s_k, "
     "dpm++_sde, dpm++_sde_k, dpm++_2m_sde, dpm++_2m_sde_k, pndm, ddpm, lms, euler, euler_a, kdpm2; with "
     "rectified_flow no effect: the flow Euler sampler draws every sample, honouring the prompts, negative "
     "prompts (the unguided side), seeds, sizes, cfgs and num_inference_steps"),
    ("num_inference_steps", "ours", "denoising steps (default 30)"),
    ("seed", "ours", "the samples' default seed; -1 (here or per sample): the run's seed plus the sample's "
     "number, so every sampling draws comparable images (EveryDream2 draws a new random seed)"),
    ("resolution", "ours", "the default size of samples without their own size"),
    ("samples[].prompt, samples[].negative_prompt, samples[].seed, samples[].size", "ours",
     "each sample's prompt, negative prompt, seed and [width, height] (multiples of 8)"),
    ("samples[].aspect_ratio", "ours", "without size: the size of about resolution^2 pixels nearest this ratio"),
    ("samples[].random_caption", "ours", "true: a training caption picked at random (seeded) is the prompt"),
    ("batch_size, show_progress_bars", "no effect", "samples are drawn one at a time, without a progress bar"),
    ("generate_samples_every_n_steps", "ours", "sample_steps, over the main config's (EveryDream2's sample "
     "generator reads it last); a --sample_steps flag still wins"),
    ("generate_pretrain_samples", "ours", "sample_before_training: samples at step 0, from the model trained from"),
)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}), "ddpm": ("DDPMScheduler", {}), "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}), "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}), "kdpm2": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++_2m_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True}),
    "dpm++_2s": ("DPMSolverSinglestepScheduler", {}),
    "dpm++_2s_k": ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
    "dpm++_sde": ("DPMSolverSDEScheduler", {"noise_sampler_seed": 0}),
    "dpm++_sde_k": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True, "noise_sampler_seed": 0}),
    "dpm++_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "dpm++_2m_sde_k": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++",
                                                       "use_karras_sigmas": True}),
}


@dataclass(frozen=True)
class SampleRequest:
    """One sample of EveryDream2's sample_prompts.json (prompt None: a random training caption)."""

    prompt: Optional[str]
    negative_prompt: str
    seed: int
    size: tuple[int, int]
    cfgs: tuple[float, ...]


@dataclass(frozen=True)
class SamplePlan:
    requests: tuple[SampleRequest, ...]
    scheduler: str
    num_inference_steps: int


def _size_for_ratio(ratio: float, resolution: int) -> tuple[int, int]:
    """EveryDream2's rule: of the sizes in steps of 64 near resolution^2 pixels, the one nearest `ratio`."""
    target = resolution * resolution
    sizes = [(w, max(64, round(target / w / 64) * 64)) for w in range(64, 4 * resolution + 1, 64)]
    return min(sizes, key=lambda size: abs(1 - ratio / (size[0] / size[1])))


def read_sample_plan(path: str | Path, default_seed: int, resolution: int) -> SamplePlan:
    """EveryDream2's sample_prompts.json as a plan (its keys are checked: see SAMPLE_KEYS)."""
    where = str(path)
    data = read_json_object(path, "sample_prompts")
    _check_keys(data, {"batch_size", "seed", "cfgs", "scheduler", "num_inference_steps", "show_progress_bars",
                       "samples", "resolution", "generate_pretrain_samples", "generate_samples_every_n_steps"}, where)
    scheduler = str(data.get("scheduler", "ddim"))
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"{where}: scheduler '{scheduler}' is not one of EveryDream2's: {', '.join(SCHEDULERS)}.")
    cfgs = tuple(float(value) for value in data.get("cfgs") or (7, 4, 1.01))
    resolution = int(data.get("resolution", resolution))
    seed = int(data.get("seed", default_seed))
    requests = []
    for number, entry in enumerate(data.get("samples") or [{"random_caption": True}] * 4):
        at = f"{where}: samples[{number}]"
        _check_keys(entry, {"prompt", "negative_prompt", "seed", "size", "aspect_ratio", "random_caption", "cfgs"}, at)
        size = entry.get("size") or _size_for_ratio(float(entry.get("aspect_ratio", 1)), resolution)
        if len(size) != 2 or any(int(side) % 8 or int(side) < 8 for side in size):
            raise ConfigError(f"{at}: size {size} must be [width, height], multiples of 8.")
        prompt = None if entry.get("random_caption") else str(entry.get("prompt", ""))
        requests.append(SampleRequest(prompt, str(entry.get("negative_prompt", "")), int(entry.get("seed", seed)),
                                      (int(size[0]), int(size[1])),
                                      tuple(float(v) for v in entry.get("cfgs") or cfgs)))
    return SamplePlan(tuple(requests), scheduler, int(data.get("num_inference_steps", 30)))


def resolve_side_file(name: str, key: str, config_dir: Optional[Path]) -> Path:
    """A side file as EveryDream2 finds it (relative to the working folder), else beside the config."""
    if not isinstance(name, str) or "\0" in name:
        raise ConfigError(f"{key} must be the path of a file, as a string; got {json.dumps(name)}. "
                          f"Write it like \"{key}\": \"my_{key.split('_')[0]}.json\", or remove {key}.")
    path = Path(name).expanduser()
    if path.is_absolute() or path.is_file() or config_dir is None:
        return path
    beside = config_dir / path
    return beside if beside.is_file() else path


def _read_side_json(name: str, key: str, config_dir: Optional[Path]) -> dict[str, Any]:
    path = resolve_side_file(name, key, config_dir)
    if not path.is_file():
        raise ConfigError(f"{key} '{name}' does not exist (looked in the working folder"
                          f"{' and beside the config' if config_dir else ''}); give its path, or remove "
                          f"{key}.")
    return read_json_object(path, key)


def _check_keys(section: dict[str, Any], allowed: set[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(key, sorted(allowed))} "
                              "docs/everydream2.md lists the keys this file may hold.")


BASE_OPTIMIZER_KEYS = {"optimizer", "lr", "lr_scheduler", "lr_decay_steps", "lr_warmup_steps", "betas",
                       "epsilon", "weight_decay", "d0", "decouple", "momentum", "safeguard_warmup", "use_bias_correction"}


def optimizer_settings(data: dict[str, Any], where: str, main: dict[str, Any],
                       notes: Optional[list[str]] = None) -> dict[str, Any]:
    """Our keys from an EveryDream2 optimizer.json; `main` holds what the main config already set."""
    _check_keys(data, {"doc", "base", "text_encoder_overrides", "text_encoder_lr_scale",
                       "text_encoder_freezing", "apply_grad_scaler_step_tweaks"}, where)
    base = data.get("base") or {}
    overrides = data.get("text_encoder_overrides") or {}
    _check_keys(base, BASE_OPTIMIZER_KEYS, f"{where}: base")
    _check_keys(overrides, BASE_OPTIMIZER_KEYS, f"{where}: text_encoder_overrides")
    result: dict[str, Any] = {}
    name = _optimizer_name(base.get("optimizer") or "adamw8bit", f"{where}: base.optimizer")  # ED2's default
    if base.get("optimizer") is not None:
        result["optimizer"] = OPTIMIZER_NAMES[name][0]
    if base.get("lr") is not None and main.get("lr") is None:
        result["lr"] = base["lr"]
    for key in ("lr_scheduler", "lr_warmup_steps", "lr_decay_steps"):
        if base.get(key) is not None:
            result[key] = base[key]
    if base.get("weight_decay") is not None:
        result["weight_decay"] = base["weight_decay"]
    base_settings = _settings_text(name, base, f"{where}: base", notes)
    if base_settings:
        result["optimizer_settings"] = base_settings
    main_lr = main.get("lr")  # null there (EveryDream2's default) means "not set", as a missing key does
    result.update(_text_encoder_settings(data, base, overrides, where, name,
                                         main_lr if main_lr is not None else result.get("lr"), notes, main_lr))
    return result


def _optimizer_name(value: Any, where: str) -> str:
    name = str(value).lower()
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"{where} '{name}' is not available in difftrain; use one of "
                          f"{', '.join(OPTIMIZER_NAMES)}.")
    return name


def _settings_text(name: str, values: dict[str, Any], where: str, notes: Optional[list[str]]) -> str:
    """Our optimizer_settings string for EveryDream2's optimizer `name` from an optimizer.json section;
    a setting EveryDream2 does not pass to that optimizer gets a note instead."""
    extras = []
    for key in ("betas", "epsilon", "d0", "decouple", "momentum", "use_bias_correction", "safeguard_warmup"):
        value = values.get(key)
        if value is None:
            continue
        if key not in OPTIMIZER_NAMES[name][1]:
            if notes is not None:
                notes.append(f"note: {where}.{key} has no effect with {name} (EveryDream2 does not pass it either).")
            continue
        text = f"({float(value[0])!r}, {float(value[1])!r})" if key == "betas" else repr(value)
        extras.append(f"{_SETTING_NAMES.get(key, key)}={text}")
    return ";".join(extras)


def _text_encoder_settings(data: dict[str, Any], base: dict[str, Any], overrides: dict[str, Any], where: str,
                           base_name: str, lr: Optional[float], notes: Optional[list[str]] = None,
                           main_lr: Optional[float] = None) -> dict[str, Any]:
    """text_encoder_overrides (and the freezing section) as our text_encoder_* keys. As in EveryDream2,
    an lr in the main config or on the command line (`main_lr`) is both models' learning rate (unless
    text_encoder_lr_scale applies);
    each override that is null falls back to base's value (warm-up, decay and weight decay also when 0:
    EveryDream2 reads them with `or`); the keys are set only where the text encoder's value differs
    from the UNet's, so one optimizer trains both when nothing differs."""
    result: dict[str, Any] = {}
    if overrides.get("lr") is None and data.get("text_encoder_lr_scale") is not None:
        # the rule optimizer.json's own doc gives (text encoder lr = base lr x scale)
        result["text_encoder_lr"] = float(lr if lr is not None else Config.model_fields["lr"].default) \
            * float(data["text_encoder_lr_scale"])
    elif main_lr is not None:
        # EveryDream2's optimizers.py gives the main lr to the text encoder's optimizer too ("for legacy
        # reasons"), over text_encoder_overrides.lr.
        result["text_encoder_lr"] = 0.0  # ours: the same as lr
        if overrides.get("lr") is not None and notes is not None and overrides["lr"] != main_lr:
            notes.append(f"note: {where}: text_encoder_overrides.lr {overrides['lr']!r} has no effect: the main "
                         f"lr ({main_lr!r}) is the text encoder's too, as in EveryDream2; remove lr from the main "
                         "config to use it.")
    elif overrides.get("lr") is not None:
        result["text_encoder_lr"] = overrides["lr"]
    if overrides.get("lr_scheduler") is not None:
        result["text_encoder_lr_scheduler"] = overrides["lr_scheduler"]
    for key in ("lr_warmup_steps", "lr_decay_steps", "weight_decay"):
        if overrides.get(key) and overrides[key] != base.get(key):
            result[f"text_encoder_{key}"] = overrides[key]
    name = _optimizer_name(overrides.get("optimizer") or base_name, f"{where}: text_encoder_overrides.optimizer")
    merged = {**base, **{key: value for key, value in overrides.items() if value is not None}}
    text_settings = _settings_text(name, merged, f"{where}: text_encoder_overrides", notes)
    if name != base_name:
        result["text_encoder_optimizer"] = OPTIMIZER_NAMES[name][0]
    if name != base_name or text_settings != _settings_text(base_name, base, "", None):
        result["text_encoder_optimizer_settings"] = text_settings
    freezing = data.get("text_encoder_freezing") or {}
    _check_keys(freezing, {"unfreeze_last_n_layers", "freeze_front_n_layers", "freeze_embeddings",
                           "freeze_final_layer_norm"}, f"{where}: text_encoder_freezing")
    result.update(_freezing_settings(freezing, where, notes))
    return result


def _freezing_settings(freezing: dict[str, Any], where: str, notes: Optional[list[str]]) -> dict[str, Any]:
    """text_encoder_freezing as EveryDream2 reads it: by presence of a key, not by its value, so an
    unfreeze_last_n_layers key (even null, meaning all layers) overrides freeze_front_n_layers, and
    freeze_embeddings null means false (the embeddings train)."""
    result: dict[str, Any] = {}
    at = f"{where}: text_encoder_freezing"
    if "unfreeze_last_n_layers" in freezing:
        if freezing["unfreeze_last_n_layers"] is not None:
            result["text_encoder_unfreeze_last_n_layers"] = freezing["unfreeze_last_n_layers"]
        if freezing.get("freeze_front_n_layers") is not None and notes is not None:
            notes.append(f"note: {at}.freeze_front_n_layers has no effect: unfreeze_last_n_layers is also "
                         "there and wins (as in EveryDream2); remove one of them.")
    elif freezing.get("freeze_front_n_layers") is not None:
        result["text_encoder_freeze_front_n_layers"] = freezing["freeze_front_n_layers"]
    if "freeze_embeddings" in freezing:
        result["text_encoder_freeze_embeddings"] = bool(freezing["freeze_embeddings"])
        if freezing["freeze_embeddings"] is None and notes is not None:
            notes.append(f"note: {at}.freeze_embeddings null is read as false, as EveryDream2 reads it: the "
                         "text encoder's embeddings train.")
    if "freeze_final_layer_norm" in freezing:
        result["text_encoder_freeze_final_layer_norm"] = bool(freezing["freeze_final_layer_norm"])
    return result


def validation_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Our keys from an EveryDream2 validation JSON (validation_default.json's keys)."""
    _check_keys(data, {key.split(" ")[0] for key, _, _ in VALIDATION_KEYS}, where)
    extra = data.get("extra_manual_datasets") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: extra_manual_datasets must be an object of name: folder pairs, e.g. "
                          '{"santa_suit": "/path/to/santa_suit_images"}.')
    # EveryDream2 stabilizes the train loss whether or not it validates.
    stabilized = {"validation_stabilize_fraction": data.get("stabilize_split_proportion") or 0.15} \
        if data.get("stabilize_training_loss") else {}
    if not data.get("validate_training", True):
        return {"validation_fraction": 0.0, **stabilized}
    result: dict[str, Any] = {**stabilized, **({"validation_extra_roots": extra} if extra else {})}
    if data.get("use_relative_loss") is not None:
        result["validation_relative_loss"] = bool(data["use_relative_loss"])
    mode = data.get("val_split_mode", "automatic")
    if mode == "automatic":
        result["validation_fraction"] = data.get("auto_split_proportion", 0.15)
    elif mode == "manual":
        if not data.get("manual_data_root"):
            raise ConfigError(f"{where}: val_split_mode 'manual' needs manual_data_root, the folder of "
                              "validation images.")
        result["validation_root"] = data["manual_data_root"]
    else:
        raise ConfigError(f"{where}: val_split_mode {mode!r} is neither 'automatic' nor 'manual'.")
    every = data.get("every_n_epochs", 1)
    if every is not None:
        every = float(every)
        if every <= 0 or (every > 1 and every != int(every)):
            raise ConfigError(f"{where}: every_n_epochs {every}: use a whole number of epochs (1, 2, ...) or "
                              "a fraction below 1 (0.5: twice per epoch).")
        if every < 1:
            result["validations_per_epoch"] = math.ceil(1 / every)
        else:
            result["validate_every_n_epochs"] = int(every)
    return result


def _sample_generator_settings(name: str) -> dict[str, Any]:
    """What a sample_prompts .json's generator keys set over the main config's keys (EveryDream2's
    sample generator reads them after train.json's sample_steps); nothing for a .txt file."""
    if Path(name).suffix.lower() != ".json":
        return {}
    read_sample_plan(name, 0, 512)  # its mistakes are reported now, not at the first sample
    data = read_json_object(name, "sample_prompts")
    over: dict[str, Any] = {}
    if data.get("generate_samples_every_n_steps") is not None:
        over["sample_steps"] = as_int(data["generate_samples_every_n_steps"],
                                      f"{name}: generate_samples_every_n_steps")
    if data.get("generate_pretrain_samples") is not None:
        over["sample_before_training"] = data["generate_pretrain_samples"]
    return over


# ---- translation ------------------------------------------------------------------------------------

def _known_names() -> list[str]:
    return sorted(set(TABLE) | set(FIELD_NAMES) | set(ALIASES))


def translate(data: dict[str, Any], source: str, *, config_dir: Optional[Path] = None,
              main: Optional[dict[str, Any]] = None) -> tuple[dict[str, Any], list[str]]:
    """EveryDream2 keys (and our own, which pass through) -> (our canonical keys, notes to print).

    `data` is one source: a train.json or the command line's flags. `main` is what an earlier
    source already set (the JSON, when `data` is the flags), for EveryDream2's rule that the main
    lr wins over optimizer.json's. Unknown keys are ConfigErrors with a did-you-mean; so are
    refused values, with the reason and what to use instead.
    """
    result: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    notes: list[str] = []
    later: dict[str, Any] = {}  # side files' settings that win over the main keys (EveryDream2's order)

    def put(values: dict[str, Any], key: str) -> None:
        merge_settings(result, set_by, values, key, source)

    for key, value in data.items():
        term = TABLE.get(key)
        if term is None:
            name = key if key in FIELD_NAMES else ALIASES.get(key)
            if name is None and key not in IGNORED_KEYS:
                raise ConfigError(f"{source}: unknown key '{key}'.{did_you_mean(key, _known_names())} "
                                  "docs/everydream2.md lists EveryDream2's keys, configs/schema.json ours.")
            if name is not None:
                put({name: value}, key)
            continue
        reason = term.refuse(value)
        if reason:
            raise ConfigError(f"{source}: {reason}.")
        if term.note and (term.status == "legacy" or (value is not None and value != term.default)):
            notes.append(f"note: {term.note}")
        if key == "optimizer_config" and value:
            continue  # after the main keys: its non-null schedule settings win over theirs
        if key == "validation_config" and value:
            where = str(resolve_side_file(value, key, config_dir))
            put(validation_settings(_read_side_json(value, key, config_dir), where), key)
        elif key == "sample_prompts" and value:
            where = str(resolve_side_file(value, key, config_dir))
            put({"sample_prompts": where}, key)
            later.update(_sample_generator_settings(where))
        else:
            put(term.translate(value), key)
    if data.get("optimizer_config"):
        name = data["optimizer_config"]
        where = str(resolve_side_file(name, "optimizer_config", config_dir))
        from_file = optimizer_settings(_read_side_json(name, "optimizer_config", config_dir), where,
                                       {**(main or {}), **data}, notes)
        result.update(from_file)
    result.update(later)
    return result, notes


def load(path: Optional[str], flags: Optional[dict[str, Any]] = None) -> Config:
    """The Config of train.py: the JSON at `path` (if any) then the command line's `flags`, either
    vocabulary, translated; flags win; the notes are printed once."""
    from difftrain.log import say

    source = str(path) if path else "command line"
    config_dir = Path(path).parent if path else None
    raw = read_json_object(path) if path else {}
    flags = flags or {}
    # A flag replaces the JSON's key of the same name whole (a side file's every setting with it).
    # Each source sees the other's keys as `main`: a flag's lr is the main lr for the JSON's optimizer_config.
    from_json, notes = translate({k: v for k, v in raw.items() if k not in flags}, source, config_dir=config_dir,
                                 main=flags)
    from_flags, flag_notes = translate(flags, "command line", config_dir=config_dir, main=raw)
    for note in dict.fromkeys(notes + flag_notes):
        say(note)
    settings = {**from_json, **from_flags}
    if settings.get("reload_settings_from") is True:  # load_settings_every_epoch: this very file, again
        if not path:
            raise ConfigError("load_settings_every_epoch re-reads the train.json given with --config as each epoch "
                              "starts; give the settings in such a file, or drop load_settings_every_epoch.")
        settings["reload_settings_from"] = str(Path(path).resolve())
    return validate_config_dict(settings, source, defaults=everydream2_defaults(settings))


def epoch_settings(path: str) -> dict[str, Any]:
    """The train.json at `path` read again (load_settings_every_epoch): its keys translated into ours,
    those it does not hold left out (EveryDream2 updates its settings with what the file holds)."""
    where = Path(path)
    settings, _ = translate(read_json_object(where), str(where), config_dir=where.parent)
    return settings


# ---- the generated document -------------------------------------------------------------------------

def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _side_table(title: str, rows: tuple[tuple[str, str, str], ...]) -> list[str]:
    lines = [f"## {title}", "", "| key | status | meaning here |", "|---|---|---|"]
    lines += [f"| `{_cell(key)}` | {status} | {_cell(meaning)} |" for key, status, meaning in rows]
    return lines + [""]


SIDE_FILE_KEYS = ("optimizer_config", "validation_config", "sample_prompts")

# What EveryDream2 does without any key for it, and train.py therefore does too (our key: (value, why)).
DOOR_DEFAULTS_WHY = {"text_encoder_own_optimizer": (True, "EveryDream2 builds one optimizer per model, so "
                                                          "D-Adaptation, Prodigy and DoWG adapt a step size for each"),
                     "save_ckpt_dir": (os.curdir, "EveryDream2 writes each checkpoint's single .safetensors file "
                                                  "into the folder it runs in when save_ckpt_dir is not given"),
                     "clip_grad_norm_per_model": (True, "EveryDream2 clips the UNet's and the text encoder's "
                                                        "gradients each on their own"),
                     "validate_before_training": (True, "EveryDream2 measures the validation loss once before "
                                                        "its first step (step 0) on every new run")}
DOOR_DEFAULTS = {name: value for name, (value, _) in DOOR_DEFAULTS_WHY.items()}


def default_differences() -> dict[str, dict[str, tuple[Any, Any]]]:
    """EveryDream2 keys whose default there, translated, is not what difftrain does when the key is
    left out: {key: {our key: (EveryDream2's default translated, our default)}}. Side files apart."""
    result: dict[str, dict[str, tuple[Any, Any]]] = {}
    for term in TERMS:
        if term.status != "ours" or term.key in SIDE_FILE_KEYS or term.default is None:
            continue
        settings, _ = translate({term.key: term.default}, "defaults")
        ours = {name: Config.model_fields[name].default for name in settings}
        differ = {name: (value, ours[name]) for name, value in settings.items() if value != ours[name]}
        if differ:
            result[term.key] = differ
    return result


def trains_like_everydream2(settings: dict[str, Any]) -> bool:
    """Whether `settings` (our keys) describe what EveryDream2 trains: a full fine-tune of a Stable
    Diffusion model's noise (or v) prediction. Other runs through train.py (Kolmogorov, TrainTrain's
    LoRA modes, rectified flow) are difftrain's own and keep its defaults."""
    fields = Config.model_fields
    try:
        rectified_flow = TypeAdapter(bool).validate_python(settings.get("rectified_flow", False))
    except ValidationError:
        rectified_flow = False  # the schema's validation reports it
    return (settings.get("task", fields["task"].default) == "sd"
            and settings.get("mode", fields["mode"].default) == "Full" and not rectified_flow)


def everydream2_defaults(settings: dict[str, Any]) -> dict[str, Any]:
    """Our keys at EveryDream2's defaults where our schema's differ, for train.py to fill in under
    the JSON and the flags (so anything given, in either vocabulary, wins). Empty unless the run is
    one EveryDream2 could train (trains_like_everydream2)."""
    if not trains_like_everydream2(settings):
        return {}
    return {**{name: theirs for differ in default_differences().values() for name, (theirs, _) in differ.items()},
            **DOOR_DEFAULTS}


def status_counts() -> dict[str, int]:
    """How many of EveryDream2's train.py flags (legacy keys apart) have each status."""
    counts = {status: 0 for status in STATUSES}
    for term in TERMS:
        counts[term.status] += 1
    return counts


def render_markdown() -> str:
    """docs/everydream2.md: the tables above as Markdown."""
    counts = status_counts()
    summary = ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s])
    lines = [
        "# EveryDream2 vocabulary",
        "",
        "<!-- Generated by `python -m difftrain.vocab.everydream2 > docs/everydream2.md`; edit the "
        "tables in difftrain/vocab/everydream2.py instead. -->",
        "",
        f"`train.py` accepts every flag of EveryDream2's train.py ({SOURCE}) as `--flag` and as a key of "
        "the `--config` JSON, and translates it into difftrain's schema at the front door. Keys are: "
        f"{summary}.",
        "",
        "Statuses: **ours** done through our schema (the meaning column says how); **no effect** accepted, "
        "with a one-line note; **refused** the values needing a missing feature are refused with the "
        "reason, the neutral value is accepted; **legacy** a key EveryDream2's shipped configs "
        "still carry, accepted with a note; **front door** handled by train.py's command line.",
        "",
        "Defaults: a key left out takes EveryDream2's default, as it would there. Where difftrain's own "
        "default (`python train.py --help`, and what train_j.py uses) differs, train.py fills in "
        "EveryDream2's, listed below (computed from this table and the schema); a key given in the JSON "
        "or on the command line, in either vocabulary, wins. This holds for what EveryDream2 trains, a full "
        "fine-tune (task 'sd', mode 'Full', no rectified_flow); other runs through train.py keep "
        "difftrain's defaults. The side files are read only when named: "
        "without `optimizer_config` difftrain does not look for ./optimizer.json, without "
        "`sample_prompts` it samples training captions, and without `validation_config` it does not validate.",
        "",
        *[f"- `{key}` left out: {', '.join(f'`{name}` {json.dumps(theirs)}' for name, (theirs, _) in diff.items())}"
          f", as in EveryDream2 (difftrain's own default: "
          f"{', '.join(f'`{name}` {json.dumps(ours)}' for name, (_, ours) in diff.items())})"
          for key, diff in default_differences().items()],
        *[f"- (no key) `{name}` {json.dumps(value)}: {why}" for name, (value, why) in DOOR_DEFAULTS_WHY.items()],
        "",
        "## train.py flags and train.json keys",
        "",
        "| key | EveryDream2 default | status | meaning here |",
        "|---|---|---|---|",
    ]
    for term in TERMS:
        lines.append(f"| `{term.key}` | `{json.dumps(term.default)}` | {term.status} | {_cell(term.meaning)} |")
    lines.append("")
    lines += _side_table("optimizer_config (optimizer.json)", OPTIMIZER_KEYS)
    lines += _side_table("validation_config (validation_default.json)", VALIDATION_KEYS)
    lines += _side_table("sample_prompts", SAMPLE_KEYS)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":  # python -m difftrain.vocab.everydream2 > docs/everydream2.md
    import sys

    sys.stdout.write(render_markdown())
