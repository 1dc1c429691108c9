"""The one configuration schema.

Every key a user can set lives here exactly once, with its type, default, help text and
aliases. From this single class we derive:

* the settings TrainTrain's keys translate to (its one table: difftrain/vocab/traintrain.py),
* the `--flags` of `train.py` (EveryDream2 names are the canonical names),
* `configs/schema.json` for editors (see `export_json_schema`),
* the validation the launcher runs before it starts a child.

This module imports only pydantic and the standard library: the launcher loads it to validate
a config without paying for torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from difftrain.errors import ConfigError, did_you_mean
from difftrain.jsonfile import read_json_object
from difftrain.registry import MODE_NAMES



def setting(default: Any, help: str, *aliases: str, per_pass: bool = False, **constraints: Any) -> Any:
    """Declare one config key: default, help text, alternative names and value constraints.

    `per_pass` marks settings that a TrainTrain "2nd pass" section may override.
    """
    return Field(
        default,
        description=help,
        json_schema_extra={"aliases": list(aliases), "per_pass": per_pass},
        **constraints,
    )


Precision = Literal["fp32", "fp16", "bf16"]
TrainTrainMode = Literal[MODE_NAMES]  # every mode, written once in difftrain.registry


class SimulationConfig(BaseModel):
    """Parameters of the Kolmogorov-flow data generator (defaults are the paper's)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    size: int = Field(256, gt=7, description="Simulation grid size (square, periodic).")
    coarsen: int = Field(4, ge=1, description="Spatial coarsening factor applied to the saved fields.")
    trajectories: int = Field(1024, ge=6, description="Number of trajectories (split 80/10/10; at "
                              "least 6 so each split gets one).")
    steps: int = Field(128, ge=1, description="Saved time steps simulated per trajectory.")
    keep: int = Field(64, ge=1, description="Last saved steps kept per trajectory.")
    dt: float = Field(0.2, gt=0, description="Time between saved states.")
    reynolds: float = Field(1000.0, gt=0, description="Reynolds number.")
    wavenumber: int = Field(4, ge=1, description="Forcing wavenumber (sin(k y) forcing).")
    drag: float = Field(0.1, ge=0, description="Linear drag coefficient.")

    @model_validator(mode="after")
    def _keep_what_was_simulated(self) -> "SimulationConfig":
        if self.keep > self.steps:
            raise ValueError(f"simulation.keep ({self.keep}) cannot exceed simulation.steps ({self.steps}): "
                             "only simulated states can be kept; lower keep or raise steps")
        return self


# Config's keys are one flat namespace (a JSON file, the flags of train.py), declared in sections so
# that each class reads on a screen or two. Config inherits them all; only Config is ever built.

class ModelSettings(BaseModel):
    """Section of Config: what is trained, from which model, and where files are read and written."""

    # ---- what to train ------------------------------------------------------------------------
    task: Literal["sd", "kolmogorov"] = setting(
        "sd", "What is trained: 'sd' fine-tunes a Stable Diffusion model; 'kolmogorov' trains the "
        "score network of the Kolmogorov-flow experiment from scratch (no downloaded weights).")
    mode: TrainTrainMode = setting(
        "Full", "Training mode: 'Full' fine-tunes the UNet; TrainTrain modes train a LoRA: "
        + ", ".join(f"'{name}'" for name in MODE_NAMES if name != "Full") + ".")
    resume_ckpt: str = setting(
        "sd_v1-5_vae", "Base model (diffusers folder, .safetensors/.ckpt single file, or a bare name "
        "looked up in the model folders), a checkpoint folder under logs/ to resume from, or "
        "'findlast' for the newest complete checkpoint of this project.")
    vae: str = setting("", "A separate VAE (folder or single file) replacing the model's own.")
    te: str = setting("", "A separate text encoder replacing the model's own.")
    family: Literal["auto", "sd1", "sd2", "sdxl"] = setting(
        "auto", "Model family; 'auto' detects it from the weights.")
    clip_skip: int = setting(0, "SD1/SD2: condition on text-encoder layer -N (after the final layer norm); "
                             "2 is the penultimate layer; 0 or 1: the last (EveryDream2's clip_skip).", ge=0, le=4)
    prediction_type: Literal["auto", "epsilon", "v_prediction"] = setting(
        "auto", "What the base model predicts; 'auto' reads it from the model. SD2 single files "
        "cannot tell 512-base (epsilon) from 768 (v): set this for them.")
    model_v_pred: Optional[bool] = setting(
        None, "TrainTrain's switch: true means prediction_type 'v_prediction'.")

    # ---- folders ------------------------------------------------------------------------------
    data_root: str = setting("input", "Folder of training images (with .txt/.caption captions), or for "
                             "the Kolmogorov task the folder holding train/valid/test.h5.")
    validation_root: str = setting("", "Folder of held-out images for loss_valid; empty: use "
                                   "validation_fraction of data_root.")
    validation_fraction: float = setting(0.0, "Fraction of data_root held out for loss_valid.", ge=0, lt=1)
    validation_stabilize_fraction: float = setting(0.0, "Fraction of the training images (kept in training) "
                                                   "whose fixed-noise loss is logged as loss_train_stabilized "
                                                   "with loss_valid (EveryDream2's stabilize_training_loss); "
                                                   "0: off.", ge=0, le=1)
    validation_extra_roots: dict[str, str] = setting({}, "Named extra folders of held-out images, each "
                                                     "logged as loss_valid_<name> (EveryDream2's "
                                                     "extra_manual_datasets).")
    logdir: str = setting("logs", "Where logs/<project_name><timestamp>/ folders (settings, samples, "
                          "ckpts) are written.")
    runs_dir: str = setting("runs", "Where runs/<name>_<id>/ folders (config.json, state.pth, "
                            "metrics.jsonl, samples) are written.")
    project_name: str = setting("myproj", "Name prefix of log folders and checkpoints; wandb project.",
                                min_length=1)
    models_dir: str = setting("", "Root of the model folders: StableDiffusion/, VAE/, lora/, "
                              "TextEncoders/ (train_j.py --models-dir).")
    ckpt_dir: str = setting("", "Folder of base checkpoints (default <models_dir>/StableDiffusion).")
    vae_dir: str = setting("", "Folder of VAEs (default <models_dir>/VAE).")
    lora_dir: str = setting("", "Folder LoRA files are written to (default <models_dir>/lora).")
    te_dir: str = setting("", "Folder of text encoders (default <models_dir>/TextEncoders).")
    cache_dir: str = setting("", "Disk cache for VAE latents and text embeddings (keyed by file "
                             "content, model and resolution); empty: cache in memory only.")


class TrainingSettings(BaseModel):
    """Section of Config: schedule, optimizer, objective, precision and speed."""

    # ---- schedule -----------------------------------------------------------------------------
    max_epochs: int = setting(300, "Epochs to train.", "epochs", ge=1)
    max_steps: int = setting(0, "Optimizer steps to train; 0: use max_epochs. TrainTrain's "
                             "train_iterations.", per_pass=True, ge=0)
    batch_size: int = setting(2, "Images (or states) per optimizer step and process.", per_pass=True, ge=1)
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated per optimizer step.",
                                               "grad_accum", ge=1)
    seed: int = setting(555, "Seed of every random draw; -1 picks one at random (and records it).", per_pass=True)

    # ---- optimizer ----------------------------------------------------------------------------
    lr: float = setting(1e-6, "Learning rate.", "learning_rate",
                        per_pass=True, gt=0)
    text_encoder_lr: float = setting(0.0, "Learning rate of the text encoder(s); 0: same as lr.", per_pass=True, ge=0)
    optimizer: str = setting("AdamW", "Optimizer: a name of TrainTrain's list (AdamW, AdamW8bit, AdaFactor, "
                             "Lion, Prodigy, DAdaptAdam, AdamWScheduleFree, CAME, ...: difftrain/optim.py "
                             "lists them) or any torch.optim class name.",
                             per_pass=True)
    optimizer_settings: str = setting("", "Extra optimizer arguments, 'k=v;k=v' "
                                      "(e.g. 'betas=(0.9,0.99);eps=1e-8').", per_pass=True)
    weight_decay: Optional[float] = setting(None, "Weight decay; unset: the optimizer's own default "
                                            "(AdamW 0.01, most others 0), as in TrainTrain.", ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine", "polynomial", "cosine_with_restarts",
                          "constant_with_warmup", "piecewise_constant", "cosine_annealing",
                          "cosine_annealing_with_restarts", "exponential", "step", "multi_step",
                          "reduce_on_plateau", "cyclic", "one_cycle"] = setting(
        "constant", "Learning-rate schedule: TrainTrain's 15 names (diffusers' get_scheduler and "
        "torch.optim.lr_scheduler).", "scheduler", per_pass=True)
    lr_scheduler_settings: str = setting("", "Extra scheduler arguments 'k=v;k=v' (TrainTrain).", per_pass=True)
    lr_step_rules: str = setting("", "Piecewise-constant LR factors 'f1:s1,f2:s2,...,f_last' (x f1 before "
                                 "step s1, ...; lr_scheduler piecewise_constant).",
                                 per_pass=True)
    lr_warmup_steps: Optional[int] = setting(
        None, "Warm-up steps; default 2% of lr_decay_steps (EveryDream2), 0 for TrainTrain modes.", per_pass=True, ge=0)
    lr_decay_steps: int = setting(0, "Steps over which the schedule decays; 0: the whole run.", ge=0)
    lr_num_cycles: float = setting(1.0, "Cycles of cosine_with_restarts.", per_pass=True, gt=0)
    lr_power: float = setting(1.0, "Power of the polynomial schedule.",
                              per_pass=True, gt=0)
    clip_grad_norm: Optional[float] = setting(None, "Clip the gradient norm to this value.", gt=0)
    clip_grad_norm_per_model: bool = setting(
        False, "Clip the UNet's and the text encoders' gradients each to clip_grad_norm on their own, as "
        "EveryDream2 does (train.py's default); false: one norm over everything trained. Sharded runs "
        "(FSDP, DeepSpeed) clip over everything.")
    text_encoder_lr_scheduler: Literal["", "constant", "linear", "cosine", "polynomial", "cosine_with_restarts",
                                       "constant_with_warmup"] = setting(
        "", "Learning-rate schedule of the text encoder(s); empty: lr_scheduler (EveryDream2's "
        "text_encoder_overrides).")
    text_encoder_lr_warmup_steps: Optional[int] = setting(
        None, "Warm-up steps of the text encoder(s)' schedule; empty: lr_warmup_steps (EveryDream2's "
        "text_encoder_overrides).", ge=0)
    text_encoder_lr_decay_steps: Optional[int] = setting(
        None, "Decay steps of the text encoder(s)' schedule; empty: lr_decay_steps (EveryDream2's "
        "text_encoder_overrides).", ge=1)
    text_encoder_optimizer: str = setting(
        "", "Optimizer of the text encoder(s), named as for optimizer; empty: optimizer. With another "
        "optimizer, settings or weight decay than the UNet's, the text encoder(s) get an optimizer of "
        "their own (EveryDream2's text_encoder_overrides).")
    text_encoder_optimizer_settings: Optional[str] = setting(
        None, "optimizer_settings of the text encoder(s)' optimizer; empty: optimizer_settings.")
    text_encoder_weight_decay: Optional[float] = setting(
        None, "Weight decay of the text encoder(s); empty: weight_decay.", ge=0)
    text_encoder_own_optimizer: bool = setting(
        False, "Give the text encoder(s) an optimizer of their own even with the UNet's settings, as "
        "EveryDream2 does (train.py's default). It changes training only for optimizers that adapt one step "
        "size over all their parameters (D-Adaptation, Prodigy, DoWG); the others step each tensor alone.")
    text_encoder_unfreeze_last_n_layers: Optional[int] = setting(
        None, "Train only the last N layers and the final layer norm of the text encoder(s) (their "
        "embeddings stay frozen unless text_encoder_freeze_embeddings is false); empty: all of it "
        "(EveryDream2's unfreeze_last_n_layers).", ge=1)
    text_encoder_freeze_front_n_layers: Optional[int] = setting(
        None, "Freeze the first N layers of the text encoder(s), or with a negative N all but the last -N; "
        "text_encoder_unfreeze_last_n_layers wins when both are set (EveryDream2's freeze_front_n_layers).")
    text_encoder_freeze_embeddings: Optional[bool] = setting(
        None, "Freeze the text encoder's token and position embeddings; empty: frozen exactly when only some "
        "of its layers train (EveryDream2's freeze_embeddings).")
    text_encoder_freeze_final_layer_norm: bool = setting(
        False, "Freeze the text encoder's final layer norm (EveryDream2's freeze_final_layer_norm).")
    train_unet: bool = setting(
        True, "Train the UNet; false trains the text encoder(s) alone, in mode Full with "
        "network_train_text_encoder (EveryDream2's disable_unet_training).")

    # ---- objective ----------------------------------------------------------------------------
    loss_function: Literal["MSE", "L1", "Smooth-L1", "MSE-Huber", "Huber-MSE"] = setting(
        "MSE", "Per-element loss. 'MSE-Huber' blends MSE (weight t/T) with Huber (weight 1 - t/T) by "
        "timestep; 'Huber-MSE' the other way round (EveryDream2's loss_type).", per_pass=True)
    min_snr_gamma: float = setting(0.0, "Min-SNR-gamma loss weighting; 0 disables it.", per_pass=True, ge=0)
    noise_offset: float = setting(0.0, "Offset noise strength.", ge=0)
    pyramid_noise_discount: float = setting(0.0, "Pyramid (multi-resolution) noise with this discount "
                                            "per level; 0 disables it.", ge=0)
    embedding_perturbation: float = setting(0.0, "Gaussian noise added to the text embeddings while "
                                            "training, std = value / sqrt(width); 0 disables it.", ge=0)
    zero_terminal_snr: bool = setting(False, "Rescale the noise schedule to zero terminal SNR.")
    min_timestep: int = setting(0, "Lowest training timestep.",
                                per_pass=True, ge=0, le=1000)
    max_timestep: int = setting(1000, "Highest training timestep (exclusive).",
                                per_pass=True, ge=1, le=1000)
    rectified_flow: bool = setting(False, "Train the velocity of the straight path between noise and "
                                   "data (needs a v-prediction base for Stable Diffusion).")
    timestep_sampling: Literal["uniform", "logit_normal"] = setting(
        "uniform", "How flow times / timesteps are drawn.")
    reflow_steps: int = setting(0, "Reflow iterations after the initial rectified-flow training.", ge=0)
    reflow_sample_steps: int = setting(0, "Euler steps when generating reflow pairs; 0: sample_steps, "
                                       "and 50 if that is 0 too.", ge=0)
    reflow_train_epochs: int = setting(1, "Epochs of training on each reflow iteration's pairs.", ge=1)
    reflow_gen_batches: int = setting(1, "Batches of pairs generated per reflow iteration "
                                      "(pairs = reflow_gen_batches x batch_size).", ge=1)

    # ---- precision and speed ------------------------------------------------------------------
    scheduler_interval: Literal["step", "epoch"] = setting(
        "step", "Advance the LR schedule every optimizer step, or once per epoch (sda's Kolmogorov "
        "runs decay linearly per epoch).")
    gpu_id: int = setting(0, "CUDA GPU a single-process run trains on, numbered among the visible ones "
                          "(EveryDream2's gpuid); 0: the first. train.py narrows CUDA_VISIBLE_DEVICES to it.", ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = setting(
        "auto", "Autocast precision of the trained model; 'auto': bf16 on a GPU that supports it, "
        "fp32 on CPU.")
    model_precision: Precision = setting("fp16", "Storage precision of frozen weights on GPU "
                                         "(always fp32 on CPU).",
                                         per_pass=True)
    gradient_checkpointing: bool = setting(False, "Trade compute for memory in the UNet.", per_pass=True)
    num_workers: int = setting(0, "DataLoader worker processes.", ge=0)



class DataAndOutputSettings(BaseModel):
    """Section of Config: images and buckets; samples, validation, checkpoints and tracking."""

    # ---- data ---------------------------------------------------------------------------------
    resolution: int = setting(512, "Training resolution class (EveryDream2: 256..1536 in steps of "
                              "64) or TrainTrain's image_size.", ge=64)
    image_height_width: Optional[list[int]] = setting(
        None, "TrainTrain modes: a non-square training size [height, width]; its area is the bucket pixel "
        "budget and iLECO draws latents of this shape. None: resolution x resolution.")
    flip_p: float = setting(0.0, "Probability of a horizontal flip.", ge=0, le=1)
    caption_dropout: float = setting(0.0, "Probability of training on an empty caption.", ge=0, le=1)
    shuffle_tags: bool = setting(False, "Shuffle the comma-separated tags after a caption's first part "
                                 "each epoch (a folder's shuffle_tags.txt turns it on for that folder).")
    keep_tags: int = setting(0, "With shuffle_tags: keep this many tags after the first part in place.", ge=0)
    rated_dataset: bool = setting(
        False, "Train low-rated images less and less over the epochs: from the third epoch on, each epoch trains "
        "a shrinking share of the images, picked with chances in proportion to their yaml 'rating' "
        "(EveryDream2's rated_dataset).")
    rated_dataset_target_dropout_percent: float = setting(
        50, "With rated_dataset: the share of the images (percent) the schedule heads for by the last epoch.",
        ge=0, le=100)
    image_buckets_step: int = setting(256, "TrainTrain bucket step.", ge=8)
    image_num_multiply: int = setting(1, "TrainTrain: repeat each image this many times.", ge=1)
    image_min_length: int = setting(512, "TrainTrain: shortest bucket side.", ge=64)
    image_max_ratio: float = setting(2.0, "TrainTrain: largest bucket aspect ratio.", ge=1)
    image_mirroring: bool = setting(False, "TrainTrain: random horizontal flips (flip_p 0.5).")
    image_use_filename_as_tag: bool = setting(False, "TrainTrain: use the file name as the caption.")

    # ---- samples, validation, checkpoints, tracking -------------------------------------------
    sample_steps: int = setting(250, "Draw samples every N optimizer steps (and at the end); 0: only "
                                "at the end.", ge=0)
    sample_inference_steps: int = setting(30, "Denoising steps per sample.", ge=1)
    sample_prompts: str = setting("", "File of sample prompts, one per line; empty: training captions.")
    num_samples: int = setting(2, "Samples drawn each time.", ge=1)
    sample_before_training: bool = setting(
        False, "Also draw samples once before the first step (step 0), from the model trained from "
        "(EveryDream2's generate_pretrain_samples).")
    validate_every_n_epochs: int = setting(1, "loss_valid every N epochs.", ge=1)
    validations_per_epoch: int = setting(1, "loss_valid this many times per epoch, evenly spaced "
                                         "(EveryDream2's fractional every_n_epochs); 1: at its end.", ge=1)
    validate_before_training: bool = setting(
        False, "Measure loss_valid once before the first optimizer step (at step 0), so the curves start "
        "from the model trained from; EveryDream2 does on every new run (train.py's default).")
    validation_relative_loss: bool = setting(
        False, "Also log each loss_valid* metric as <metric>_relative: its difference from the same loss "
        "measured once before the first step (EveryDream2's use_relative_loss).")
    ckpt_every_n_minutes: float = setting(0.0, "Save a checkpoint every N minutes; 0 with no "
                                          "save_every_n_epochs means every 20 minutes.", ge=0)
    ckpt_every_n_steps: int = setting(0, "Save a checkpoint every N optimizer steps; 0: off.", ge=0)
    save_every_n_epochs: int = setting(0, "Save a checkpoint every N epochs; 0: off.", ge=0)
    save_full_precision: bool = setting(False, "Also export checkpoints as one .safetensors file.")
    save_ckpt_dir: str = setting("", "Also write each Stable Diffusion checkpoint (and its EMA) as one .safetensors "
                                 "file in the A1111 layout into this folder: float16, float32 with "
                                 "save_full_precision (EveryDream2's save_ckpt_dir).")
    no_save_ckpt: bool = setting(False, "Write no single .safetensors files into save_ckpt_dir.")
    no_prepend_last: bool = setting(False, "Name the final checkpoint without the 'last-' prefix.")
    reload_settings_from: str = setting(
        "", "A train.json read again as each epoch starts; its loss settings (loss_function, min_snr_gamma, "
        "pyramid_noise_discount, min/max_timestep, noise_offset, embedding_perturbation) apply from that epoch on "
        "(EveryDream2's load_settings_every_epoch, which sets it to the --config file).")
    save_ckpts_from_n_epochs: int = setting(0, "save_every_n_epochs saves only from this epoch on.", ge=0)
    tracker: Literal["wandb", "none"] = setting("wandb", "Metrics tracker; 'none' turns wandb off.")
    wandb_mode: Literal["offline", "online", "disabled"] = setting(
        "offline", "wandb mode; offline needs no account. WANDB_MODE overrides it.")
    wandb_project: str = setting("", "wandb project; empty: project_name.")
    run_name: str = setting("", "Run name; empty: an adjective-noun-N name like wandb's.")

    # ---- EMA of the trained weights (EveryDream2's names) ----------------------------------------
    ema_decay_rate: Optional[float] = setting(None, "EMA decay per update; setting it turns EMA on.", gt=0, lt=1)
    ema_strength_target: Optional[float] = setting(
        None, "EMA strength at the end of training; decay = target^(update_interval / total steps).", gt=0, lt=1)
    ema_update_interval: int = setting(500, "Optimizer steps between EMA updates.", ge=1)
    ema_device: Literal["cpu", "cuda"] = setting("cpu", "Where the EMA weights live.")
    ema_sample_nonema_model: bool = setting(False, "Samples from the trained (non-EMA) weights.")
    ema_sample_ema_model: bool = setting(False, "Samples from the EMA weights.")
    ema_resume_model: str = setting("", "Start the EMA weights from this model (or 'findlast').")


# pydantic lists the fields of the LAST base first: this order keeps the keys in reading order
# (ModelSettings' first, then Training, Data and outputs, then Config's own).
class Config(DataAndOutputSettings, TrainingSettings, ModelSettings):
    """Every setting of a difftrain run. Canonical names follow EveryDream2 where it names them."""

    # The sections above declare most keys; here are the task-specific ones (Kolmogorov score
    # network, TrainTrain modes) and the rules that read several keys at once.

    # allow_inf_nan: JSON as Python reads it accepts NaN and Infinity, which no setting can use.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    # ---- Kolmogorov score network (sda) -------------------------------------------------------
    window: int = setting(5, "Consecutive states the score network sees (channels = window x 2).", ge=1)
    embedding: int = setting(64, "Size of the noise-level embedding.", ge=2)
    hidden_channels: list[int] = setting([96, 192, 384], "Widths of the U-Net levels.", min_length=1)
    hidden_blocks: list[int] = setting([3, 3, 3], "Residual blocks per U-Net level.", min_length=1)
    kernel_size: int = setting(3, "Convolution kernel size (odd).", ge=1)
    activation: Literal["SiLU", "ReLU", "GELU", "ELU", "Tanh"] = setting("SiLU", "Activation.")
    simulation: SimulationConfig = setting(
        SimulationConfig(), "Kolmogorov data generation, used when data_root has no train/valid/test.h5.")

    # ---- TrainTrain: prompts, images, network ----------------------------------------------------
    original_prompt: str = setting("", "TrainTrain original prompt.")
    target_prompt: str = setting("", "TrainTrain target prompt (iLECO: empty erases the concept).")
    original_image: str = setting("", "TrainTrain original image.")
    target_image: str = setting("", "TrainTrain target image.")
    network_type: Literal["lierla", "c3lier", "loha"] = setting(
        "lierla", "lierla (LoRA), c3lier (LoCon) or loha (LyCORIS LoHa).", per_pass=True)
    network_rank: int = setting(16, "LoRA rank.", per_pass=True, ge=1)
    network_alpha: float = setting(8.0, "LoRA alpha.", per_pass=True, gt=0)
    network_element: Literal["Full", "CrossAttention", "SelfAttention"] = setting(
        "Full", "Which UNet layers get LoRA.", per_pass=True)
    network_conv_rank: int = setting(0, "LoRA rank of 3x3 convolutions (c3lier).", per_pass=True, ge=0)
    network_conv_alpha: float = setting(0.0, "LoRA alpha of 3x3 convolutions.", per_pass=True, ge=0)
    network_blocks: list[str] = setting([], "UNet blocks to train (empty: all).", per_pass=True)
    network_resume: str = setting("", "Start from this LoRA file.")
    network_strength: float = setting(1.0, "Strength baked into the saved LoRA (2: twice as strong).",
                                      per_pass=True)
    network_train_text_encoder: bool = setting(False, "Also train the text encoder(s).", per_pass=True)
    lora_trigger_word: str = setting("", "Prepended to every caption.")
    diff_target_name: str = setting("", "Multi-ADDifT: suffix of target images (a.png -> a<suffix>.png).")
    lora_precision: Precision = setting("fp32", "Precision of LoRA weights while training.", per_pass=True)
    save_lora_name: str = setting("", "Output LoRA file name (no extension); empty: the run name.")
    save_per_steps: int = setting(0, "Save an intermediate LoRA every N steps; 0: off.", per_pass=True, ge=0)
    save_precision: Precision = setting("fp16", "Precision of saved LoRA files.", per_pass=True)
    save_overwrite: bool = setting(False, "Overwrite an existing LoRA file of the same name.", per_pass=True)
    save_as_json: bool = setting(False, "Also save the settings as JSON beside the LoRA.")
    logging_save_csv: bool = setting(False, "Also write the metrics as CSV beside the LoRA.")
    diff_save_1st_pass: bool = setting(False, "Difference: save the copier LoRA of pass 1.")
    diff_1st_pass_only: bool = setting(False, "Difference: stop after pass 1.")
    diff_load_1st_pass: str = setting("", "Difference: load pass 1's LoRA from this file instead.")
    diff_revert_original_target: bool = setting(False, "Difference: swap original and target.")
    diff_use_diff_mask: bool = setting(False, "Difference: weight the loss by where the images differ.")
    diff_alt_ratio: float = setting(1.0, "ADDifT: strength of the reverse-direction steps.", per_pass=True)
    use_2nd_pass_settings: bool = setting(False, "Difference: apply the '2nd pass' section to pass 2.")
    second_pass: Optional[dict[str, Any]] = setting(
        None, "Settings for Difference's second pass (same keys as above).")

    @field_validator("*")
    @classmethod
    def _no_nul_character(cls, value: Any) -> Any:
        # Paths with a NUL cannot exist on any file system; os calls would raise ValueError later.
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL character (\\u0000), which no file or folder name can hold")
        return value

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("kernel_size must be odd so that circular padding keeps the grid size")
        return value

    @field_validator("image_height_width")
    @classmethod
    def _height_width(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and (len(value) != 2 or any(side < 64 or side % 8 for side in value)):
            raise ValueError("image_height_width is [height, width], each side a multiple of 8 (the VAE works "
                             "on 8x8 blocks) and at least 64, e.g. [512, 768]")
        return value

    @field_validator("resolution")
    @classmethod
    def _resolution_class(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"resolution must be a multiple of 8 (the VAE works on 8x8 blocks), e.g. "
                             f"{value // 64 * 64 or 64} or {value // 64 * 64 + 64}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _blocks_per_given_level(cls, data: Any) -> Any:
        # Widths given without block counts: the default's count per level, for as many levels.
        if isinstance(data, dict) and isinstance(data.get("hidden_channels"), list) and "hidden_blocks" not in data:
            default = cls.model_fields["hidden_blocks"].default
            data = {**data, "hidden_blocks": [default[0]] * len(data["hidden_channels"])}
        return data

    @model_validator(mode="after")
    def _settings_that_must_agree(self) -> "Config":
        problems = []
        if self.min_timestep >= self.max_timestep:
            problems.append(f"min_timestep ({self.min_timestep}) must be below max_timestep "
                            f"({self.max_timestep}); swap them or widen the range")
        if len(self.hidden_channels) != len(self.hidden_blocks):
            problems.append(f"hidden_channels {self.hidden_channels} and hidden_blocks {self.hidden_blocks} "
                            "must have the same length (one entry per U-Net level)")
        if self.task == "kolmogorov" and self.window > self.simulation.keep:
            problems.append(f"window {self.window} is longer than the trajectories (simulation.keep "
                            f"{self.simulation.keep} states); lower window or raise keep")
        if not self.train_unet and self.task == "sd" and (self.mode != "Full" or not self.network_train_text_encoder):
            problems.append("train_unet is false (disable_unet_training) but nothing else trains: it trains the "
                            "text encoder alone, so it needs mode 'Full' with network_train_text_encoder true "
                            "(disable_textenc_training false); train one of them")
        second = self.for_second_pass()
        if second is not self and second.min_timestep >= second.max_timestep:
            problems.append(f"in 'second_pass', min_timestep ({second.min_timestep}) must be below "
                            f"max_timestep ({second.max_timestep}); swap them or widen the range")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @field_validator("second_pass")
    @classmethod
    def _second_pass_values(cls, value: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
        # Keys are canonical by now (validate_config_dict renamed them, naming the file on a typo).
        if value is None:
            return None
        return SecondPass.model_validate(value).model_dump(exclude_none=True)

    def resolved_prediction_type(self) -> str:
        """prediction_type with TrainTrain's model_v_pred folded in."""
        if self.prediction_type == "auto" and self.model_v_pred is not None:
            return "v_prediction" if self.model_v_pred else "epsilon"
        return self.prediction_type

    def training_size(self) -> tuple[int, int]:
        """(height, width) of TrainTrain modes' training size: image_height_width, or a square."""
        if self.image_height_width:
            return self.image_height_width[0], self.image_height_width[1]
        return self.resolution, self.resolution

    def for_second_pass(self) -> "Config":
        """This config with the '2nd pass' section applied (when use_2nd_pass_settings is true)."""
        if not self.use_2nd_pass_settings or not self.second_pass:
            return self
        return self.model_copy(update=dict(self.second_pass))


# --- derived tables --------------------------------------------------------------------------------

def _extra(name: str) -> dict[str, Any]:
    extra = Config.model_fields[name].json_schema_extra
    return extra if isinstance(extra, dict) else {}


FIELD_NAMES: tuple[str, ...] = tuple(Config.model_fields)
ALIASES: dict[str, str] = {alias: name for name in FIELD_NAMES for alias in _extra(name)["aliases"]}
PER_PASS_NAMES: tuple[str, ...] = tuple(name for name in FIELD_NAMES if _extra(name)["per_pass"])



def _type_with_bounds(name: str) -> Any:
    field = Config.model_fields[name]
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


# The same types and bounds as the first pass (a negative lr is as wrong in pass 2), each optional.
SecondPass = create_model(  # type: ignore[call-overload]
    "SecondPass",
    __config__=ConfigDict(extra="forbid", allow_inf_nan=False),
    **{name: (Optional[_type_with_bounds(name)], None) for name in PER_PASS_NAMES},
)

# "$schema" points an editor at configs/schema.json; it is not a setting. (Other programs' keys are
# never dropped here: their vocabularies in difftrain/vocab/ implement, note or refuse each one.)
IGNORED_KEYS = frozenset({"$schema"})


# --- loading ---------------------------------------------------------------------------------------

def canonical_keys(data: dict[str, Any], names: tuple[str, ...] = FIELD_NAMES, where: str = "config")\
        -> dict[str, Any]:
    """Rename aliases to canonical names; unknown or doubled keys are ConfigErrors."""
    allowed = set(names)
    known = sorted(allowed | {alias for alias, name in ALIASES.items() if name in allowed})
    result: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            continue
        name = key if key in allowed else ALIASES.get(key)
        if name is None or name not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}'.{did_you_mean(key, known)} "
                              "Every key is listed in configs/schema.json and the README.")
        if name in result:
            raise ConfigError(f"{where}: '{key}' and '{given_as[name]}' set the same setting "
                              f"'{name}'; keep one of them.")
        result[name] = value
        given_as[name] = key
    return result


def _describe_type(annotation: Any) -> str:
    # list[int] has __name__ 'list'; str() keeps the element type, which is what the user needs.
    text = str(annotation) if get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def validate_config_dict(data: Any, source: str = "config",
                         defaults: Optional[dict[str, Any]] = None) -> Config:
    """Validate a parsed JSON config (canonical names, aliases, or both) into a Config.

    `defaults` (canonical names) fill the keys `data` leaves out: a door's own defaults, such as
    TrainTrain's for train_j.py (difftrain.vocab.traintrain.DEFAULTS).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a JSON object {{...}}, "
                          f"not {type(data).__name__}.")
    return _validated({**(defaults or {}), **canonical_keys(data, FIELD_NAMES, source)}, source)


def load_config(path: Union[str, Path, None], flags: Optional[dict[str, Any]] = None,
                defaults: Optional[dict[str, Any]] = None) -> Config:
    """The Config of a front door: `defaults`, then the JSON file at `path` (if any), then `flags`.

    `flags` and `defaults` use canonical names (the CLI's flags are generated from them); the file
    may use aliases. Each source wins over the one before it.
    """
    source = str(path) if path else "command line"
    from_file = canonical_keys(read_json_object(path), FIELD_NAMES, source) if path else {}
    return _validated({**(defaults or {}), **from_file, **(flags or {})}, source)


def _validated(canonical: dict[str, Any], source: str) -> Config:
    """The one validation of a config whose top-level keys are canonical."""
    second_pass = canonical.get("second_pass")
    if isinstance(second_pass, dict):
        # Renamed here, not in the field validator, so that a typo inside it names the file.
        second_pass = canonical_keys(second_pass, PER_PASS_NAMES, f"{source}: 'second_pass'")
        canonical = {**canonical, "second_pass": second_pass}
    try:
        return Config.model_validate(canonical)
    except ValidationError as error:
        raise ConfigError(_explain(error, source)) from None


def _explain(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        loc = list(problem["loc"])
        key = ".".join(str(part) for part in loc) or "(top level)"
        field = Config.model_fields.get(str(loc[0])) if loc else None
        expected = f" (expected {_describe_type(field.annotation)})" if field is not None and len(loc) == 1 else ""
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        if problem["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        if not loc or (len(loc) == 1 and loc[0] == "simulation" and problem["type"] == "value_error"):
            # A rule across several keys: the message names them; the whole input is no help.
            lines.append(f"{source}: {message}.")
            continue
        lines.append(f"{source}: key '{key}'{expected}: {message}; got {problem.get('input')!r}.")
    return "\n".join(lines)


# --- JSON Schema for editors --------------------------------------------------------------------------

def export_json_schema() -> dict[str, Any]:
    """JSON Schema of a config file: canonical keys plus every alias, each with its help text."""
    schema = Config.model_json_schema()
    properties = schema["properties"]
    for name in FIELD_NAMES:
        properties[name].pop("aliases", None)
        properties[name].pop("per_pass", None)
    for alias, name in ALIASES.items():
        alias_schema = dict(properties[name])
        alias_schema["description"] = f"Alias of '{name}'. {properties[name].get('description', '')}"
        properties[alias] = alias_schema
    for ignored in sorted(IGNORED_KEYS):
        properties[ignored] = {"description": "Where an editor finds this schema; not a setting."}
    properties["second_pass"]["description"] = Config.model_fields["second_pass"].description
    properties["second_pass"].pop("anyOf", None)
    properties["second_pass"]["type"] = "object"
    properties["second_pass"]["properties"] = {
        key: properties[key] for key in sorted(set(PER_PASS_NAMES) | {a for a, n in ALIASES.items()
                                                                       if n in PER_PASS_NAMES})}
    properties["second_pass"]["additionalProperties"] = False
    schema["additionalProperties"] = False
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "difftrain config"
    return schema


if __name__ == "__main__":  # python -m difftrain.config > configs/schema.json
    print(json.dumps(export_json_schema(), indent=2, ensure_ascii=False))
