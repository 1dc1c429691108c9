"""TrainTrain's vocabulary: every key its JSON files hold, in one table, translated to our schema.

TrainTrain (hako-mikan/sd-webui-traintrain) saves its settings as JSON: the UI's settings under
their own spellings (`image_size(height, width)`, `network_blocks(BASE = TextEncoder)`, numbers
mostly as strings), plus "mode", "model", "vae", "te", the prompts, and for Difference a
"2nd pass" object. `train_j.py` reads such a file through `translate`, and the launcher validates
with the same function, so the engine only sees `difftrain.config`'s names.

Facts from TrainTrain's source (scripts/traintrain.py, trainer/trainer.py, trainer/train.py):
- An empty string is "not set" (it falls back to its default there too).
- Inside "2nd pass", only the settings its UI shows for the second pass are read; the others keep
  the first pass's values. The switch for the section is the `use_2nd_pass_settings` *inside* it;
  the top-level key of that name is written from a hidden placeholder and never read.
- `network_blocks(BASE = TextEncoder)`: BASE gives the text encoder a LoRA; only mode LoRA trains
  it (the other modes encode their prompts once, before training). An empty list trains nothing.
- `network_train_text_encoder` is written but never read: BASE decides.

Run `python -m difftrain.vocab.traintrain --markdown` for the README's table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.vocab.table import (Row, Translation, Vocabulary, as_bool, as_float, as_int, as_text,
                                   merge_settings)

if TYPE_CHECKING:
    from difftrain.config import Config

PROGRAM = "TrainTrain"
SECOND_PASS = "2nd pass"
IMAGE_SIZE = "image_size(height, width)"
BLOCKS = "network_blocks(BASE = TextEncoder)"
MODES = ("LoRA", "iLECO", "Difference", "ADDifT", "Multi-ADDifT")

# train_j.py starts from TrainTrain's defaults where they differ from the engine's (EveryDream2's),
# so a file that leaves a key out trains as it would there. sample_steps and tracker are ours:
# TrainTrain draws no samples and logs to no tracker.
DEFAULTS: dict[str, Any] = {
    "mode": "LoRA", "max_steps": 1000, "lr": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 0,
    "seed": -1, "min_snr_gamma": 5.0, "sample_steps": 0, "tracker": "none",
}

Parse = Callable[[Any, str], Any]


def _to(target: str, parse: Parse) -> Callable[[Any, str], dict[str, Any]]:
    return lambda value, where: {target: parse(value, where)}


def _one_of(*choices: str, renames: Optional[dict[str, str]] = None) -> Parse:
    """A name from `choices`, matched without regard to case (TrainTrain compares lowercased)."""
    table = {choice.lower(): choice for choice in choices} | {k.lower(): v for k, v in (renames or {}).items()}

    def parse(value: Any, where: str) -> str:
        text = as_text(value, where).strip()
        if text.lower() not in table:
            raise ConfigError(f"{where}: {text!r} is not one of {', '.join(choices)}.")
        return table[text.lower()]
    return parse


def _optional_path(value: Any, where: str) -> str:
    # TrainTrain's VAE and text-encoder drop-downs write "None" for "the model's own".
    text = as_text(value, where).strip()
    return "" if text == "None" else text


def _precision(value: Any, where: str) -> str:
    text = as_text(value, where).strip().lower()
    names = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "fp8": "fp16",
             "model": "fp16", "bf16": "bf16", "bfloat16": "bf16"}
    if text == "int8":
        raise ConfigError(f"{where}: 'int8' (torchao weight-only quantization of the UNet) is not supported; "
                          "use fp16 or bf16.")
    if text not in names:
        raise ConfigError(f"{where}: {value!r} is not a precision; use fp32, fp16 or bf16.")
    return names[text]


def _image_size(value: Any, where: str) -> dict[str, Any]:
    """ "512" (square) or "height,width" -> resolution, and the pair when it is not square."""
    parts = [part.strip() for part in as_text(value, where).split(",")]
    if len(parts) not in (1, 2) or not all(parts):
        raise ConfigError(f"{where}: {value!r} is not a size; write one side (\"512\") or height,width "
                          "(\"512,768\").")
    sides = [as_int(part, where) for part in parts]
    if any(side < 64 or side % 8 for side in sides):
        raise ConfigError(f"{where}: {value!r}: each side must be a multiple of 8 (the VAE works on 8x8 "
                          "blocks) and at least 64.")
    if len(sides) == 1 or sides[0] == sides[1]:
        return {"resolution": sides[0]}
    return {"resolution": min(sides), "image_height_width": [sides[0], sides[1]]}


def _blocks(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, list) or not all(isinstance(block, str) for block in value):
        raise ConfigError(f"{where}: expected a list of block names like [\"BASE\", \"IN00\", ..., \"OUT11\"], "
                          f"got {value!r}.")
    if not value:
        raise ConfigError(f"{where}: the list is empty, so TrainTrain would train no layer at all. List the "
                          "blocks to train (BASE for the text encoder, IN00-IN11, M00, OUT00-OUT11), or leave "
                          "the key out to train every block.")
    blocks = [block.strip().upper() for block in value]
    return {"network_blocks": blocks, "network_train_text_encoder": "BASE" in blocks}


def _zero_only(meaning: str) -> Callable[[Any, str], dict[str, Any]]:
    def convert(value: Any, where: str) -> dict[str, Any]:
        if as_int(value, where) != 0:
            raise ConfigError(f"{where}: only 0 is supported: {meaning}")
        return {}
    return convert


def _false_only(meaning: str) -> Callable[[Any, str], dict[str, Any]]:
    def convert(value: Any, where: str) -> dict[str, Any]:
        if as_bool(value, where):
            raise ConfigError(f"{where}: only false is supported: {meaning}")
        return {}
    return convert


def _implemented(name: str, targets: tuple[str, ...], meaning: str, convert) -> Row:
    return Row(name, "implemented", meaning, targets, convert)


def _no_effect(name: str, meaning: str) -> Row:
    return Row(name, "no effect", meaning)


_NEVER_READ = "TrainTrain defines this setting in its UI code but neither saves nor reads it."

ROWS: tuple[Row, ...] = (
    _implemented("mode", ("mode",), "LoRA, iLECO, Difference, ADDifT or Multi-ADDifT.", _to("mode", _one_of(*MODES))),
    _implemented("model", ("resume_ckpt",), "the base model: a file or folder, or a name looked up in the model "
                 "folders (--models-dir, --ckpt-dir).", _to("resume_ckpt", as_text)),
    _implemented("vae", ("vae",), "a separate VAE; \"None\" or empty: the model's own.", _to("vae", _optional_path)),
    _implemented("te", ("te",), "a separate text encoder; \"None\" or empty: the model's own.", _to("te", _optional_path)),
    _implemented("original prompt", ("original_prompt",), "iLECO: the concept to change; Difference/ADDifT: "
                 "the prompt of the original image.", _to("original_prompt", as_text)),
    _implemented("target prompt", ("target_prompt",), "iLECO: what the concept becomes (empty: erased); "
                 "ADDifT: the prompt of the target image.", _to("target_prompt", as_text)),
    _implemented("original image", ("original_image",), "Difference/ADDifT: the original image file (TrainTrain's "
                 "standalone JSON).", _to("original_image", as_text)),
    _implemented("target image", ("target_image",), "Difference/ADDifT: the target image file.",
                 _to("target_image", as_text)),
    _implemented("network_type", ("network_type",), "lierla (LoRA), c3lier (LoCon: 3x3 convolutions too) or loha.",
                 _to("network_type", _one_of("lierla", "c3lier", "loha"))),
    _implemented("network_rank", ("network_rank",), "LoRA rank (dim).", _to("network_rank", as_int)),
    _implemented("network_alpha", ("network_alpha",), "LoRA alpha.", _to("network_alpha", as_float)),
    _implemented("lora_data_directory", ("data_root",), "folder of training images and captions (LoRA, "
                 "Multi-ADDifT).", _to("data_root", as_text)),
    _implemented("diff_target_name", ("diff_target_name",), "Multi-ADDifT: suffix naming each image's target "
                 "(a.png pairs with a<suffix>.png).", _to("diff_target_name", as_text)),
    _implemented("lora_trigger_word", ("lora_trigger_word",), "prepended to every caption.",
                 _to("lora_trigger_word", as_text)),
    _implemented(IMAGE_SIZE, ("resolution", "image_height_width"), "\"512\" (square) or \"height,width\"; a "
                 "non-square size keeps its shape: its area is the bucket budget and iLECO draws latents of "
                 "that height and width.", _image_size),
    _implemented("train_iterations", ("max_steps",), "optimizer steps.", _to("max_steps", as_int)),
    _implemented("train_batch_size", ("batch_size",), "images per step.", _to("batch_size", as_int)),
    _implemented("train_learning_rate", ("lr",), "learning rate.", _to("lr", as_float)),
    _implemented("train_optimizer", ("optimizer",), "optimizer name, any case (adamw, CAME, ...).",
                 _to("optimizer", as_text)),
    _implemented("train_optimizer_settings", ("optimizer_settings",), "extra optimizer arguments, "
                 "\"k=v;k=v\".", _to("optimizer_settings", as_text)),
    _implemented("train_lr_scheduler", ("lr_scheduler",), "learning-rate schedule name.",
                 _to("lr_scheduler", as_text)),
    _implemented("train_lr_scheduler_settings", ("lr_scheduler_settings",), "extra schedule arguments, "
                 "\"k=v;k=v\" (e.g. eta_min=0.00001).", _to("lr_scheduler_settings", as_text)),
    _implemented("save_lora_name", ("save_lora_name",), "file name of the LoRA (no extension); empty: the run "
                 "name (TrainTrain: \"untitled\").", _to("save_lora_name", as_text)),
    _implemented("use_gradient_checkpointing", ("gradient_checkpointing",), "trade compute for memory.",
                 _to("gradient_checkpointing", as_bool)),
    _implemented(BLOCKS, ("network_blocks", "network_train_text_encoder"), "blocks that get a LoRA; BASE is the "
                 "text encoder, trained in mode LoRA only (the other modes encode their prompts once). An empty "
                 "list is refused: it would train nothing.", _blocks),
    _implemented("network_resume", ("network_resume",), "start from this LoRA file (not in iLECO, as in "
                 "TrainTrain).", _to("network_resume", as_text)),
    _implemented("network_strength", ("network_strength",), "strength the LoRA is saved with.",
                 _to("network_strength", as_float)),
    _implemented("network_conv_rank", ("network_conv_rank",), "rank of 3x3 convolutions (c3lier; 0: "
                 "network_rank).", _to("network_conv_rank", as_int)),
    _implemented("network_conv_alpha", ("network_conv_alpha",), "alpha of 3x3 convolutions (0: network_alpha).",
                 _to("network_conv_alpha", as_float)),
    _implemented("network_element", ("network_element",), "Full, CrossAttention or SelfAttention layers.",
                 _to("network_element", _one_of("Full", "CrossAttention", "SelfAttention"))),
    _no_effect("network_train_text_encoder", "TrainTrain saves it but never reads it; BASE in "
               f"'{BLOCKS}' decides whether the text encoder is trained."),
    _implemented("image_buckets_step", ("image_buckets_step",), "bucket side step.",
                 _to("image_buckets_step", as_int)),
    _implemented("image_num_multiply", ("image_num_multiply",), "repeat each image this many times.",
                 _to("image_num_multiply", as_int)),
    _implemented("image_min_length", ("image_min_length",), "shortest bucket side.",
                 _to("image_min_length", as_int)),
    _implemented("image_max_ratio", ("image_max_ratio",), "largest bucket aspect ratio.",
                 _to("image_max_ratio", as_float)),
    _implemented("sub_image_num", (), "0 (each image in its one bucket) is what difftrain does; other values are "
                 "refused: extra smaller copies of each image are not made.",
                 _zero_only("extra smaller copies of each image (sub buckets) are not made.")),
    _implemented("image_mirroring", ("image_mirroring",), "horizontal flips (random, half of the time).",
                 _to("image_mirroring", as_bool)),
    _implemented("image_use_filename_as_tag", ("image_use_filename_as_tag",), "caption from the file name.",
                 _to("image_use_filename_as_tag", as_bool)),
    _implemented("image_disable_upscale", (), "false (small images are scaled up to their bucket) is what "
                 "difftrain does; true is refused: images are never skipped for being small.",
                 _false_only("images smaller than their bucket are always scaled up, never skipped.")),
    _implemented("train_fixed_timsteps_in_batch", (), "false (a timestep per image) is what difftrain does; "
                 "true is refused: one shared timestep per batch is not implemented.",
                 _false_only("each image of a batch draws its own timestep.")),
    _implemented("train_textencoder_learning_rate", ("text_encoder_lr",), "text-encoder learning rate; empty or "
                 "0: train_learning_rate.", _to("text_encoder_lr", as_float)),
    _implemented("train_seed", ("seed",), "seed; -1: random (recorded).", _to("seed", as_int)),
    _implemented("train_min_timesteps", ("min_timestep",), "lowest timestep.", _to("min_timestep", as_int)),
    _implemented("train_max_timesteps", ("max_timestep",), "highest timestep (exclusive).",
                 _to("max_timestep", as_int)),
    _implemented("train_loss_function", ("loss_function",), "MSE, L1 or Smooth-L1.",
                 _to("loss_function", _one_of("MSE", "L1", "Smooth-L1"))),
    _implemented("train_lr_step_rules", ("lr_step_rules",), "LR factors 'f1:s1,f2:s2,...,f_last' (x f1 before "
                 "step s1, ...) for train_lr_scheduler piecewise_constant.", _to("lr_step_rules", as_text)),
    _implemented("train_lr_warmup_steps", ("lr_warmup_steps",), "warm-up steps.", _to("lr_warmup_steps", as_int)),
    _implemented("train_lr_scheduler_num_cycles", ("lr_num_cycles",), "cycles of cosine_with_restarts.",
                 _to("lr_num_cycles", as_float)),
    _implemented("train_lr_scheduler_power", ("lr_power",), "power of the polynomial schedule.",
                 _to("lr_power", as_float)),
    _implemented("train_snr_gamma", ("min_snr_gamma",), "min-SNR-gamma loss weighting; 0: off.",
                 _to("min_snr_gamma", as_float)),
    _implemented("save_per_steps", ("save_per_steps",), "also save a LoRA every N steps; 0: off.",
                 _to("save_per_steps", as_int)),
    _implemented("diff_alt_ratio", ("diff_alt_ratio",), "ADDifT: strength of the reverse-direction steps.",
                 _to("diff_alt_ratio", as_float)),
    _implemented("diff_revert_original_target", ("diff_revert_original_target",), "swap original and target.",
                 _to("diff_revert_original_target", as_bool)),
    _implemented("diff_use_diff_mask", ("diff_use_diff_mask",), "weight the loss by where the images differ.",
                 _to("diff_use_diff_mask", as_bool)),
    _implemented("train_model_precision", ("model_precision",), "precision of the frozen weights on a GPU "
                 "(float16/fp8/model read as fp16; int8 refused).", _to("model_precision", _precision)),
    _implemented("train_lora_precision", ("lora_precision",), "precision of the LoRA while training.",
                 _to("lora_precision", _precision)),
    _implemented("save_precision", ("save_precision",), "precision of the saved LoRA.",
                 _to("save_precision", _precision)),
    _no_effect("train_VAE_precision", "the VAE runs at train_model_precision on a GPU and in fp32 on the CPU."),
    _implemented("diff_load_1st_pass", ("diff_load_1st_pass",), "Difference: load the copier LoRA instead of "
                 "training it (ADDifT: start from it).", _to("diff_load_1st_pass", as_text)),
    _implemented("diff_save_1st_pass", ("diff_save_1st_pass",), "Difference: also save the copier LoRA.",
                 _to("diff_save_1st_pass", as_bool)),
    _implemented("diff_1st_pass_only", ("diff_1st_pass_only",), "Difference: train the copier only.",
                 _to("diff_1st_pass_only", as_bool)),
    _implemented("logging_save_csv", ("logging_save_csv",), "also write step, loss and learning rate as CSV.",
                 _to("logging_save_csv", as_bool)),
    _no_effect("logging_verbose", "TrainTrain prints extra debugging lines; difftrain's output does not change."),
    _implemented("save_overwrite", ("save_overwrite",), "overwrite a LoRA file of the same name.",
                 _to("save_overwrite", as_bool)),
    _implemented("save_as_json", ("save_as_json",), "also save the settings as JSON beside the LoRA.",
                 _to("save_as_json", as_bool)),
    _implemented("model_v_pred", ("model_v_pred",), "the model predicts v (SD 2.x 768).",
                 _to("model_v_pred", as_bool)),
    _implemented("use_2nd_pass_settings", ("use_2nd_pass_settings",), f"inside \"{SECOND_PASS}\": Difference "
                 "trains its second pass with that section. At the top level it has no effect (TrainTrain "
                 "saves it from a hidden placeholder and reads only the one inside the section).",
                 _to("use_2nd_pass_settings", as_bool)),
    _implemented(SECOND_PASS, ("second_pass",), "Difference: settings of the second pass (the keys marked "
                 "per pass); the other keys in it keep the first pass's values, as in TrainTrain.",
                 lambda value, where: {}),  # translated by _second_pass: it holds keys of this table
    # TrainTrain's UI module defines these but they are not among the settings it saves or reads.
    _no_effect("logging_use_wandb", _NEVER_READ),
    _no_effect("logging_use_tensorboard", _NEVER_READ),
    _no_effect("logging_dir", _NEVER_READ),
    _no_effect("train_repeat", _NEVER_READ),
    _no_effect("train_use_bucket", _NEVER_READ),
    _no_effect("train_optimizer_args", _NEVER_READ + " Use train_optimizer_settings."),
    _no_effect("gen_noise_scheduler", _NEVER_READ),
    _no_effect("lora_train_targets", _NEVER_READ + " BASE in network_blocks decides the text encoder."),
    _no_effect("diff_use_fixed_noise", _NEVER_READ),
    _no_effect("image_use_transparent_background_ajust", _NEVER_READ),
)

TABLE = Vocabulary(PROGRAM, ROWS)

# The keys a "2nd pass" section sets: those TrainTrain's UI shows for the second pass (every other
# key of the section keeps the first pass's value there).
PER_PASS: frozenset[str] = frozenset({
    "network_type", "network_rank", "network_alpha", "network_element", "network_conv_rank", "network_conv_alpha",
    BLOCKS, "network_strength", "train_iterations", "train_batch_size", "train_learning_rate", "train_optimizer",
    "train_optimizer_settings", "train_lr_scheduler", "train_lr_scheduler_settings", "use_gradient_checkpointing",
    "train_loss_function", "train_seed", "train_min_timesteps", "train_max_timesteps", "train_model_precision",
    "train_lora_precision", "train_VAE_precision", "save_per_steps", "save_precision", "save_overwrite",
    "train_lr_step_rules", "train_lr_warmup_steps", "train_lr_scheduler_num_cycles", "train_lr_scheduler_power",
    "train_snr_gamma", "train_fixed_timsteps_in_batch", "model_v_pred", "use_2nd_pass_settings",
})
# No effect inside the section: model_v_pred is read once for the noise schedule in pass 1.
_FIRST_PASS_ONLY_IN_SECTION = frozenset({"model_v_pred", "train_VAE_precision"})


def _not_set(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def translate(data: Any, where: str, schema_keys: frozenset[str] = frozenset()) -> Translation:
    """Our settings from a TrainTrain JSON object.

    Keys of the table are translated; `schema_keys` (our own names, e.g. models_dir) pass through
    unchanged. An empty string or null is "not set". Anything else is a ConfigError.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a JSON object {{...}}, not {type(data).__name__}.")
    settings: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    written_as: dict[str, str] = {}
    notes: list[str] = []
    for key, value in data.items():
        if key in TABLE:
            if _not_set(value):
                continue
            if key == "use_2nd_pass_settings":
                _top_level_switch(data, value, where, notes)
                continue
            if key == SECOND_PASS:
                section, inner = _second_pass(value, f"{where}: '{SECOND_PASS}'", notes)
                merge_settings(settings, given_by, section, key, where)
                written_as.update({f"second_pass.{name}": f"{SECOND_PASS}.{their}" for name, their in inner.items()})
                continue
            merge_settings(settings, given_by, TABLE.apply(key, value, where, notes), key, where)
        elif key in schema_keys:
            merge_settings(settings, given_by, {key: value}, key, where)
        else:
            raise TABLE.unknown_key(key, where, schema_keys)
    _mode_rules(data, settings, where, notes)
    written_as.update({name: key for name, key in given_by.items() if name != key and key != SECOND_PASS})
    return Translation(settings, notes, written_as)


def _top_level_switch(data: dict[str, Any], value: Any, where: str, notes: list[str]) -> None:
    # TrainTrain saves this key from a hidden placeholder and reads the one inside "2nd pass".
    if as_bool(value, f"{where}: 'use_2nd_pass_settings'") and SECOND_PASS not in data:
        notes.append(f"note: {where}: 'use_2nd_pass_settings' has no effect at the top level; TrainTrain reads the "
                     f"one inside a \"{SECOND_PASS}\" section, which this file does not have.")


def _second_pass(section: Any, where: str, notes: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """use_2nd_pass_settings and second_pass from the section (empty when its switch is off), and
    which of its keys set each of our settings."""
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: expected a JSON object of settings, got {section!r}.")
    ours: dict[str, Any] = {}
    given_by: dict[str, str] = {}
    first_pass_only = []
    for key, value in section.items():
        if key not in TABLE:
            raise TABLE.unknown_key(key, where)
        if key == "use_2nd_pass_settings" or _not_set(value):
            continue
        if key not in PER_PASS or key in _FIRST_PASS_ONLY_IN_SECTION:
            first_pass_only.append(key)
            continue
        merge_settings(ours, given_by, TABLE.apply(key, value, where, notes), key, where)
    switch = section.get("use_2nd_pass_settings")
    if _not_set(switch) or not as_bool(switch, f"{where}: 'use_2nd_pass_settings'"):
        notes.append(f"note: {where}: the section's own use_2nd_pass_settings is not true, so the second pass "
                     "trains with the first pass's settings (as in TrainTrain); set it to true inside the section "
                     "to use them.")
        return {}, {}
    if first_pass_only:
        notes.append(f"note: {where}: {', '.join(first_pass_only)} keep the first pass's values (TrainTrain reads "
                     "only the per-pass settings from this section).")
    return {"use_2nd_pass_settings": True, "second_pass": ours}, given_by


def _mode_rules(data: dict[str, Any], settings: dict[str, Any], where: str, notes: list[str]) -> None:
    """What TrainTrain's mode changes about the other settings (its mode_fixer, and BASE)."""
    mode = settings.get("mode", DEFAULTS["mode"])
    if mode == "iLECO" and settings.pop("network_resume", ""):
        notes.append(f"note: {where}: 'network_resume' has no effect in iLECO (TrainTrain starts iLECO from a "
                     "new LoRA).")
    if mode in ("ADDifT", "Multi-ADDifT") and settings.get("diff_load_1st_pass"):
        settings["network_resume"] = settings.pop("diff_load_1st_pass")  # TrainTrain starts ADDifT from it
    if mode != "LoRA" and isinstance(settings.get("second_pass"), dict):
        settings["second_pass"].pop("network_train_text_encoder", None)
    if mode != "LoRA" and settings.get("network_train_text_encoder"):
        settings["network_train_text_encoder"] = False
        notes.append(f"note: {where}: BASE in '{BLOCKS}' trains the text encoder in mode LoRA only; mode "
                         f"{mode} encodes its prompts once, so only the UNet is trained (as in TrainTrain).")
    if "2nd pass" in data and settings.get("use_2nd_pass_settings") and mode != "Difference":
        notes.append(f"note: {where}: '{SECOND_PASS}' has no effect in mode {mode}; only Difference has a second "
                     "pass.")


def load(path: Union[str, Path, None], flags: Optional[dict[str, Any]] = None, say_notes: bool = True,
         data: Optional[dict[str, Any]] = None, require_model: bool = True, source: str = "") -> "Config":
    """The Config of train_j.py: TrainTrain's defaults, the file (or `data`) translated, then `flags`.

    `flags` use our names. The launcher validates with `data`, quietly and without requiring the
    model (a --model flag may reach the run); the run it starts prints the notes once.
    """
    from difftrain.config import FIELD_NAMES, validate_config_dict
    from difftrain.jsonfile import read_json_object

    source = source or (str(path) if path else "command line")
    if data is None:
        data = read_json_object(path) if path else {}
    translation = translate(data, source, frozenset(FIELD_NAMES) | {"$schema"})
    settings = {**translation.settings, **(flags or {})}
    settings.pop("$schema", None)
    if require_model and "model" in data and "resume_ckpt" not in settings:  # TrainTrain: "No Model Selected."
        raise ConfigError(f"{source}: \"model\" is empty; set it to the base model (a .safetensors file, a "
                          "diffusers folder, or a file name in --models-dir's StableDiffusion folder), e.g. with "
                          "train_json_edit.py --override model:v1-5-pruned-emaonly.safetensors.")
    if say_notes:
        for note in translation.notes:
            say(note)
    try:
        return validate_config_dict(settings, source, defaults=DEFAULTS)
    except ConfigError as error:
        written_as = {ours: theirs for ours, theirs in translation.written_as.items() if ours not in (flags or {})}
        raise ConfigError(_in_their_words(str(error), written_as)) from None


def _in_their_words(message: str, written_as: dict[str, str]) -> str:
    """A schema message about our keys, naming the keys the user wrote instead."""
    for ours in sorted(written_as, key=len, reverse=True):
        message = message.replace(f"key '{ours}'", f"key '{written_as[ours]}'")
    return message.replace("'second_pass'", f"'{SECOND_PASS}'")


def our_setting(key: str) -> Optional[str]:
    """The schema key a TrainTrain key sets first (None for keys without a setting)."""
    row = TABLE.rows.get(key)
    return row.targets[0] if row is not None and row.status == "implemented" and row.targets else None


def their_key(setting: str) -> Optional[str]:
    """The TrainTrain key that sets our `setting` (None when TrainTrain has none)."""
    for row in ROWS:
        if row.status == "implemented" and row.targets[:1] == (setting,):
            return row.name
    return None


def markdown() -> str:
    """The README's TrainTrain table (per-pass keys marked)."""
    text = TABLE.markdown()
    for key in PER_PASS:
        text = text.replace(f"| `{key}` |", f"| `{key}` (per pass) |", 1)
    return text


def main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        say("usage: python -m difftrain.vocab.traintrain --markdown")
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
