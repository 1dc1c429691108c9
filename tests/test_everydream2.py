"""EveryDream2's vocabulary (difftrain/vocab/everydream2.py) and its own shipped files, verbatim.

The files under tests/real_files/everydream2/ are byte-for-byte copies of EveryDream2trainer's
(see the README there); each is run through train.py's front door exactly as a user would, with
only resume_ckpt, data_root and smaller sizes added on the command line.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.cli import config_from_argv
from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.vocab import everydream2 as ed2

REAL = Path(__file__).parent / "real_files" / "everydream2"
DOC = Path(__file__).parent.parent / "docs" / "everydream2.md"

# The flags of EveryDream2's train.py (its main branch), as issue 18 lists them.
EVERYDREAM2_FLAGS = """config amp attn_type batch_size ckpt_every_n_minutes clip_grad_norm clip_skip cond_dropout
data_root disable_amp disable_textenc_training disable_unet_training embedding_perturbation flip_p gpuid
gradient_checkpointing grad_accum logdir log_step loss_type lr lr_decay_steps lr_scheduler lr_warmup_steps
max_epochs no_prepend_last no_save_ckpt optimizer_config plugins project_name resolution resume_ckpt run_name
sample_prompts sample_steps save_ckpt_dir save_every_n_epochs save_ckpts_from_n_epochs save_full_precision
save_optimizer seed shuffle_tags timestep_start timestep_end train_sampler keep_tags wandb validation_config
write_schedule rated_dataset rated_dataset_target_dropout_percent zero_frequency_noise_ratio
enable_zero_terminal_snr load_settings_every_epoch min_snr_gamma ema_decay_rate ema_strength_target
ema_update_interval ema_device ema_sample_nonema_model ema_sample_ema_model ema_resume_model
pyramid_noise_discount""".split()
LEGACY = ["notebook", "disable_xformers", "lowvram", "scale_lr", "ed1_mode", "useadam8bit"]


@pytest.fixture
def shipped(tmp_path, monkeypatch) -> Path:
    """The verbatim files in a working folder of their own (EveryDream2 reads side files from there)."""
    folder = tmp_path / "ed2"
    shutil.copytree(REAL, folder)
    monkeypatch.chdir(folder)
    return folder


def translated(*argv: str) -> Config:
    return config_from_argv(list(argv), "train")


def real_validation_json(**changes) -> dict:
    """EveryDream2's own validation_default.json (validate_training true, automatic split, every epoch,
    stabilize_training_loss and use_relative_loss false) with `changes` over its keys."""
    return {**json.loads((REAL / "validation_default.json").read_text()), **changes}


# ---- the verbatim copies --------------------------------------------------------------------------

def test_the_copies_are_byte_for_byte_the_blobs_the_readme_names():
    rows = re.findall(r"^\| (\S+) \| .*? \| ([0-9a-f]{40}) \|$", (REAL / "README.md").read_text(), re.M)
    assert len(rows) == 13
    for name, blob in rows:
        data = (REAL / name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob, name


# ---- the table ------------------------------------------------------------------------------------

def test_the_table_holds_every_flag_once_and_the_legacy_keys():
    assert len(EVERYDREAM2_FLAGS) == 63
    assert list(ed2.FLAG_KEYS) == EVERYDREAM2_FLAGS
    assert [term.key for term in ed2.TERMS if term.status == "legacy"] == LEGACY
    assert all(term.status in ed2.STATUSES for term in ed2.TERMS)


def test_the_doc_is_the_generated_text():
    assert DOC.read_text(encoding="utf-8") == ed2.render_markdown(), \
        "regenerate: python -m difftrain.vocab.everydream2 > docs/everydream2.md"


@pytest.mark.parametrize("term", [t for t in ed2.TERMS if t.status not in ("legacy", "front door")],
                         ids=lambda t: t.key)
def test_every_flag_is_accepted_at_its_default_as_flag_and_as_json_key(term, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    value = term.default
    if term.key == "optimizer_config":
        (tmp_path / "optimizer.json").write_bytes((REAL / "optimizer.json").read_bytes())
    if term.key == "sample_prompts":
        (tmp_path / "sample_prompts.txt").write_text("a cat\n")
    (tmp_path / "train.json").write_text(json.dumps({term.key: value}))
    from_json = translated("--config", "train.json")
    if value is None:
        return  # a flag cannot say null; the JSON above did
    argv = [f"--{term.key}"] + ([str(v) for v in value] if isinstance(value, list) else [str(value)])
    assert translated(*argv) == from_json


@pytest.mark.parametrize("key, value, words", [
    ("plugins", ["plugins.accumulnator.Accumulnator"], ["plugins", "does not load"]),
    ("attn_type", "flash", ["'sdp', 'xformers', 'slice'"]),
])
def test_refused_values_say_why_and_what_instead(key, value, words, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError) as caught:
        translated(str(path))
    for word in words:
        assert word in str(caught.value)


def test_legacy_keys_and_no_effect_values_each_print_one_note(tmp_path, capsys):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({**{key: True for key in LEGACY}, "attn_type": "xformers", "log_step": 5}))
    translated(str(path))
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    for key in [*LEGACY, "attn_type", "log_step"]:
        assert sum(note.startswith(f"note: {key}") for note in notes) == 1, key


def test_an_unknown_key_is_still_an_error_with_did_you_mean(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"zero_frequncy_noise_ratio": 0.1}))
    with pytest.raises(ConfigError, match="Did you mean 'zero_frequency_noise_ratio'"):
        translated(str(path))


def test_flags_win_over_the_json_and_both_vocabularies_mix(shipped):
    config = translated("--config", "train.json", "--cond_dropout", "0.3", "--grad_accum", "3",
                        "--timestep_start", "10", "--zero-frequency-noise-ratio", "0.05", "--resume_ckpt", "m")
    assert (config.caption_dropout, config.gradient_accumulation_steps) == (0.3, 3)
    assert (config.min_timestep, config.noise_offset) == (10, 0.05)


def test_two_keys_for_one_setting_in_one_file_are_refused(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"cond_dropout": 0.1, "caption_dropout": 0.2}))
    with pytest.raises(ConfigError, match="set the same setting 'caption_dropout'"):
        translated(str(path))


# ---- the shipped configs, translated ----------------------------------------------------------------

def test_train_json_and_its_side_files_translate(shipped):
    config = translated("--config", "train.json", "--resume_ckpt", "m", "--data_root", "d")
    assert (config.batch_size, config.max_epochs, config.seed, config.project_name) == (8, 40, -1, "project_abc")
    assert (config.caption_dropout, config.noise_offset, config.pyramid_noise_discount) == (0.04, 0.02, 0.03)
    assert (config.min_snr_gamma, config.loss_function, config.tracker) == (5.0, "MSE", "none")
    assert config.network_train_text_encoder and config.gradient_checkpointing
    assert (config.min_timestep, config.max_timestep, config.sample_steps) == (0, 1000, 300)
    # optimizer.json: base and text-encoder overrides
    assert (config.optimizer, config.lr, config.weight_decay) == ("AdamW8bit", 1e-6, 0.01)
    assert config.optimizer_settings == "betas=(0.9, 0.999);eps=1e-08"
    assert (config.text_encoder_lr, config.text_encoder_lr_scheduler) == (5e-7, "cosine")
    # validation_default.json: automatic split of 15%, every epoch
    assert (config.validation_fraction, config.validate_every_n_epochs) == (0.15, 1)
    assert Path(config.sample_prompts).name == "sample_prompts.txt"


def test_trainsd21_main_lr_wins_and_the_text_encoder_unfreezes_two_layers(shipped, capsys):
    config = translated("--config", "trainSD21.json", "--resume_ckpt", "m")
    # EveryDream2 gives the main lr to both optimizers, over optimizerSD21.json's text encoder 3e-7
    assert (config.lr, config.text_encoder_lr, config.text_encoder_lr_scheduler) == (2e-6, 0.0, "")
    assert "text_encoder_overrides.lr 3e-07 has no effect: the main lr (2e-06)" in capsys.readouterr().err
    (shipped / "noLR.json").write_text(json.dumps({k: v for k, v in json.loads((shipped / "trainSD21.json").read_text())
                                                   .items() if k != "lr"}))
    assert translated("--config", "noLR.json").text_encoder_lr == 3e-7
    assert translated("--config", "noLR.json", "--lr", "4e-6").text_encoder_lr == 0.0
    assert config.text_encoder_unfreeze_last_n_layers == 2
    assert (config.resolution, config.seed, config.noise_offset) == (768, 555, 0.02)


@pytest.mark.parametrize("name, expected", [
    ("chain0.json", dict(lr=2.5e-6, resolution=384, caption_dropout=0.0, network_train_text_encoder=True)),
    ("chain1.json", dict(lr=1.0e-6, resume_ckpt="findlast", caption_dropout=0.05, save_every_n_epochs=5)),
    ("chain2.json", dict(gradient_accumulation_steps=5, network_train_text_encoder=False, resolution=640)),
])
def test_the_chain_configs_translate(shipped, name, expected):
    config = translated("--config", name)
    assert {key: getattr(config, key) for key in expected} == expected


def test_text_encoder_lr_scale_applies_when_the_override_has_no_lr(tmp_path):
    data = json.loads((REAL / "optimizer.json").read_text())
    data["text_encoder_overrides"]["lr"] = None
    data["text_encoder_lr_scale"] = 0.5
    (tmp_path / "opt.json").write_text(json.dumps(data))
    (tmp_path / "train.json").write_text(json.dumps({"optimizer_config": "opt.json", "lr": 2e-6}))
    config = translated(str(tmp_path / "train.json"))
    assert config.lr == 2e-6 and config.text_encoder_lr == pytest.approx(1e-6)
    # "lr": null (EveryDream2's default) is no main lr: the scale applies to the optimizer.json base lr
    data["base"]["lr"] = 3e-6  # not our schema's default lr, so using that instead would show
    (tmp_path / "opt.json").write_text(json.dumps(data))
    (tmp_path / "train.json").write_text(json.dumps({"optimizer_config": "opt.json", "lr": None}))
    config = translated(str(tmp_path / "train.json"))
    assert config.lr == data["base"]["lr"] and config.text_encoder_lr == pytest.approx(data["base"]["lr"] * 0.5)


def test_optimizer_dadapt_translates_with_its_d_adaptation_settings(shipped):
    config = translated("--config", "train.json", "--optimizer_config", "optimizer_dadapt.json")
    assert (config.optimizer, config.lr, config.weight_decay) == ("DAdaptAdam", 0.1, 0.8)
    assert config.optimizer_settings == "betas=(0.9, 0.999);eps=1e-08;d0=1e-06;decouple=True"
    assert (config.text_encoder_lr, config.text_encoder_lr_scheduler) == (0.1, "")


def test_an_optimizer_name_everydream2_lacks_is_refused_naming_it(tmp_path):
    data = json.loads((REAL / "optimizer.json").read_text())
    data["base"]["optimizer"] = "adamw16bit"
    (tmp_path / "opt.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="adamw16bit' is not available"):
        translated("--optimizer_config", str(tmp_path / "opt.json"))


@pytest.mark.parametrize("name, ours", [("coordinate_dowg", "CoordinateDoWG"), ("scalar_dowg", "ScalarDoWG"),
                                        ("adacoor", "AdaCoor")])
def test_dowg_and_adacoor_get_epsilon_only_and_train(name, ours, tmp_path, capsys):
    from difftrain.optim import make_optimizer, make_scheduler

    data = json.loads((REAL / "optimizer.json").read_text())  # betas, epsilon 1e-8, weight_decay 0.01
    data["base"]["optimizer"] = name
    (tmp_path / "opt.json").write_text(json.dumps(data))
    config = translated("--optimizer_config", str(tmp_path / "opt.json"))
    assert (config.optimizer, config.optimizer_settings) == (ours, "eps=1e-08")
    assert f"base.betas has no effect with {name}" in capsys.readouterr().err
    weight = torch.nn.Parameter(torch.full((4,), 2.0))
    optimizer = make_optimizer(config.model_copy(update={"optimizer_settings": "eps=0.01"}), [{"params": [weight]}])
    scheduler = make_scheduler(config, optimizer, 100)
    for _ in range(20):
        (weight ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    assert 0 <= weight.detach().max() < 2.0  # it moved towards the minimum, whatever lr says (1e-6 here)


def test_validation_manual_split_and_refusals(tmp_path):
    def with_validation(**changes):
        (tmp_path / "val.json").write_text(json.dumps(real_validation_json(**changes)))
        return translated("--validation_config", str(tmp_path / "val.json"))

    assert with_validation(val_split_mode="manual", manual_data_root="held").validation_root == "held"
    assert with_validation(validate_training=False).validation_fraction == 0
    assert with_validation(every_n_epochs=3).validate_every_n_epochs == 3
    assert with_validation(every_n_epochs=0.5).validations_per_epoch == 2
    third = with_validation(every_n_epochs=0.33)
    assert (third.validations_per_epoch, third.validate_every_n_epochs) == (4, 1)  # ceil(1 / 0.33)
    with pytest.raises(ConfigError, match="every_n_epochs 1.5"):
        with_validation(every_n_epochs=1.5)
    assert with_validation(stabilize_training_loss=True).validation_stabilize_fraction == 0.15
    assert with_validation(stabilize_training_loss=False).validation_stabilize_fraction == 0
    stabilized_only = with_validation(validate_training=False, stabilize_training_loss=True,
                                      stabilize_split_proportion=0.5)
    assert (stabilized_only.validation_fraction, stabilized_only.validation_stabilize_fraction) == (0, 0.5)
    assert with_validation(use_relative_loss=True).validation_relative_loss
    assert not with_validation().validation_relative_loss  # the shipped file says false
    assert with_validation(extra_manual_datasets={"santa": "x"}).validation_extra_roots == {"santa": "x"}
    with pytest.raises(ConfigError, match="extra_manual_datasets must be an object"):
        with_validation(extra_manual_datasets=["x"])


def test_sample_prompts_json_reads_into_a_plan(shipped):
    config = translated("--config", "train.json", "--sample_prompts", "sample_prompts.json")
    plan = ed2.read_sample_plan(config.sample_prompts, default_seed=9, resolution=512)
    assert (plan.scheduler, plan.num_inference_steps) == ("dpm++", 15)
    first, second, third = plan.requests
    assert (first.prompt, first.negative_prompt, first.seed, first.size, first.cfgs) == (
        "ted bennet and a man sitting on a sofa with a kitchen in the background", "distorted, deformed", 555,
        (512, 512), (7.0, 4.0))
    assert (second.seed, second.negative_prompt) == (-1, "")
    assert (third.prompt, third.seed, third.cfgs, third.size) == (None, 555, (1.0, 11.0), (640, 384))


def test_sample_prompts_json_mistakes_are_reported_at_the_start(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"scheduler": "dpm+", "samples": []}))
    with pytest.raises(ConfigError, match="scheduler 'dpm\\+' is not one of"):
        translated("--sample_prompts", str(tmp_path / "s.json"))
    (tmp_path / "s.json").write_text(json.dumps({"samples": [{"prompt": "x", "size": [100, 64]}]}))
    with pytest.raises(ConfigError, match="multiples of 8"):
        translated("--sample_prompts", str(tmp_path / "s.json"))


@pytest.mark.usefixtures("one_thread")
def test_sample_prompts_json_draws_each_sample_at_each_cfg(shipped, tiny_sd15, tmp_path):
    from types import SimpleNamespace

    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    data = _images(tmp_path / "data")
    # The shipped file with its one explicit size and its steps made small for the tiny CPU model.
    plan = json.loads((shipped / "sample_prompts.json").read_text())
    plan["samples"][2]["size"], plan["num_inference_steps"] = [80, 48], 2
    (shipped / "small_samples.json").write_text(json.dumps(plan))
    config = translated("--config", "train.json", "--resume_ckpt", str(tiny_sd15), "--data_root", str(data),
                        "--resolution", "64", "--sample_prompts", "small_samples.json")
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)
    task = SDTask(config, cpu, StartPoint(base=str(tiny_sd15)))
    sheet = task.parts.samples.samples(task.model)["samples"]
    # rows: 64x64 (the resolution) at cfgs 7 and 4, twice (sample 2 inherits the cfgs), then 80x48 at 1 and 11,
    # each row with its prompt and scale written under each picture
    assert sheet.width == 2 * 80 and sheet.height > 64 + 64 + 48
    pixels = np.asarray(sheet).astype(float)
    assert pixels[:64, :128].std() > 0 and pixels[-100:, :160].std() > 0
    assert np.abs(pixels[:64, :64] - pixels[:64, 64:128]).max() > 0  # cfg 7 and cfg 4 differ


# ---- training on the tiny stand-ins -------------------------------------------------------------------

def _images(folder: Path, count: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        pixels = np.full((72, 64, 3), 40 + 50 * index, np.uint8)
        pixels[:, :32] //= 2
        Image.fromarray(pixels).save(folder / f"thing{index}_{index}.png")
        (folder / f"thing{index}_{index}.txt").write_text(f"photo of thing{index}, red, small")
    return folder


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name, extra", [("train.json", []), ("trainSD21.json", []),
                                         ("train.json", ["--optimizer_config", "optimizer_dadapt.json"])])
def test_shipped_configs_train_verbatim_on_the_tiny_stand_in(shipped, name, extra, tiny_sd15, tmp_path):
    from difftrain.cli import main

    data = _images(tmp_path / "data")
    assert main(["--config", name, "--resume_ckpt", str(tiny_sd15), "--data_root", str(data),
                 "--resolution", "64", "--max_epochs", "1", "--batch_size", "2", *extra]) == 0
    (log_folder,) = (shipped / "logs").iterdir()
    assert list((log_folder / "ckpts").glob("last-*")), "no final checkpoint"
    (run,) = (shipped / "runs").iterdir()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_train" in line for line in lines)
    assert any("loss_valid" in line for line in lines), "validation_default.json asks for validation"
    used = json.loads((run / "config.json").read_text())
    assert (used["noise_offset"], used["caption_dropout"], used["validation_fraction"]) == (0.02, 0.04, 0.15)
    assert used["network_train_text_encoder"] is True


@pytest.mark.usefixtures("one_thread")
def test_the_chain_runs_in_sequence_each_continuing_from_the_last(shipped, tiny_sd15, tmp_path):
    from difftrain.cli import main

    data = _images(tmp_path / "data")
    small = ["--data_root", str(data), "--resolution", "64", "--max_epochs", "1", "--batch_size", "2",
             "--sample_steps", "0"]
    commands = [line.split()[2:] for line in (shipped / "chain.bat").read_text().splitlines()
                if line.startswith("python train.py")]
    assert [command[-1] for command in commands] == ["chain0.json", "chain1.json", "chain2.json"]
    first = commands[0] + ["--resume_ckpt", str(tiny_sd15)] + small
    assert main(first) == 0
    for command in commands[1:]:  # chain1/2 say resume_ckpt "findlast" themselves
        assert main(command + small) == 0
    finals = sorted((shipped / "logs").glob("*/ckpts/last-*"))
    assert len(finals) == 3


# ---- the objective features EveryDream2's flags turn on ----------------------------------------------

def _objective(**options):
    from difftrain.objectives import DiffusionObjective

    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return DiffusionObjective(torch.cumprod(1 - betas, 0), "epsilon", **options)


def test_pyramid_noise_is_seeded_unit_variance_and_correlated_in_space():
    objective = _objective(pyramid_noise_discount=0.8)
    draw = lambda seed: objective.sample_noise((2, 4, 32, 32), torch.Generator().manual_seed(seed))  # noqa: E731
    noise = draw(1)
    assert torch.equal(noise, draw(1)) and not torch.equal(noise, draw(2))
    assert noise.std().item() == pytest.approx(1.0, abs=1e-5)
    neighbours = (noise[..., 1:] * noise[..., :-1]).mean().item()
    plain = _objective().sample_noise((2, 4, 32, 32), torch.Generator().manual_seed(1))
    assert neighbours > 0.15 and abs((plain[..., 1:] * plain[..., :-1]).mean().item()) < 0.05


@pytest.mark.parametrize("name", ["MSE-Huber", "Huber-MSE"])
def test_timestep_blended_losses_move_from_one_loss_to_the_other(name):
    objective = _objective(loss_function=name)
    x0 = torch.zeros(1, 1, 4, 4)
    noise = torch.full((1, 1, 4, 4), 3.0)  # error 3 against a zero prediction: MSE 9, Huber 2.5

    def loss_at(step):
        return objective.loss(lambda x, t: torch.zeros_like(x), x0, noise=noise,
                              timesteps=torch.tensor([step]))[0].item()

    late_mse = name == "MSE-Huber"
    assert loss_at(0) == pytest.approx(9.0 if not late_mse else 2.5)
    assert loss_at(999) == pytest.approx(9.0 * 0.999 + 2.5 * 0.001 if late_mse else 2.5 * 0.999 + 9.0 * 0.001)


def test_embedding_perturbation_and_sample_weights():
    objective = _objective(embedding_perturbation=2.0)
    seen = []

    def model(x, t, encoder_hidden_states):
        seen.append(encoder_hidden_states)
        return torch.zeros_like(x)

    hidden = torch.zeros(4, 77, 64)
    x0 = torch.zeros(4, 1, 2, 2)
    objective.loss(model, x0, torch.Generator().manual_seed(0), encoder_hidden_states=hidden)
    assert seen[0].std().item() == pytest.approx(2.0 / 64**0.5, rel=0.05)
    draws = _objective().fixed_validation_draws((4, 1, 2, 2), 0)
    plain = _objective().loss(lambda x, t: torch.zeros_like(x), x0, **draws)[1]["loss_per_sample"]
    weights = torch.tensor([1.0, 2.0, 0.0, 3.0])
    weighted = _objective().loss(lambda x, t: torch.zeros_like(x), x0, **draws, sample_weights=weights)[0]
    assert weighted.item() == pytest.approx((plain * weights).mean().item())


def test_text_encoder_gets_its_own_schedule():
    from difftrain.optim import make_scheduler

    config = Config(lr_scheduler="constant", text_encoder_lr_scheduler="cosine", lr_warmup_steps=0)
    unet, text = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [unet]}, {"params": [text], "lr": 5e-7}], lr=1e-6)
    scheduler = make_scheduler(config, optimizer, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert [group["lr"] for group in optimizer.param_groups] == pytest.approx([1e-6, 2.5e-7])


def test_the_doc_lists_the_defaults_that_differ_and_giving_the_key_gets_everydream2s():
    differences = ed2.default_differences()
    assert {"cond_dropout", "zero_frequency_noise_ratio", "loss_type", "disable_textenc_training"} <= set(differences)
    assert "batch_size" not in differences and "seed" not in differences  # the same default in both
    for key in ("cond_dropout", "loss_type"):
        config = translated(f"--{key}", str(ed2.TABLE[key].default))
        for name, (theirs, ours) in differences[key].items():
            assert getattr(config, name) == theirs != ours == getattr(Config(), name)


EVERYDREAM2_DEFAULTS = {"caption_dropout": 0.04, "noise_offset": 0.02, "loss_function": "MSE-Huber",
                        "network_train_text_encoder": True, "tracker": "none", "resume_ckpt": "sd_v1-5_vae.ckpt"}


def settings_of(config: Config, names=tuple(EVERYDREAM2_DEFAULTS)) -> dict:
    return {name: getattr(config, name) for name in names}


def test_a_train_json_without_those_keys_takes_everydream2s_defaults(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"batch_size": 4, "data_root": "d"}))
    assert settings_of(translated(str(path))) == EVERYDREAM2_DEFAULTS
    assert settings_of(translated()) == EVERYDREAM2_DEFAULTS  # no file at all
    assert translated(str(path)).text_encoder_own_optimizer  # EveryDream2 builds one optimizer per model
    assert not config_from_argv([str(path)], "train_j").text_encoder_own_optimizer
    # train_j.py's door (and the schema) keep their own defaults.
    from difftrain.vocab.traintrain import DEFAULTS as TRAINTRAIN_DEFAULTS
    train_j = config_from_argv([str(path)], "train_j")
    expected = {name: TRAINTRAIN_DEFAULTS.get(name, Config.model_fields[name].default) for name in EVERYDREAM2_DEFAULTS}
    assert settings_of(train_j) == expected != EVERYDREAM2_DEFAULTS
    assert settings_of(Config()) != EVERYDREAM2_DEFAULTS


@pytest.mark.parametrize("source", ["json", "flags"])
def test_a_key_given_in_either_vocabulary_wins_over_everydream2s_default(source, tmp_path):
    given = {"cond_dropout": 0.0, "noise_offset": 0.1, "loss_type": "mse", "disable_textenc_training": True,
             "tracker": "wandb", "resume_ckpt": "mine"}
    if source == "json":
        (tmp_path / "train.json").write_text(json.dumps(given))
        config = translated(str(tmp_path / "train.json"))
    else:
        config = translated(*[text for key, value in given.items() for text in (f"--{key}", str(value))])
    assert settings_of(config) == {"caption_dropout": 0.0, "noise_offset": 0.1, "loss_function": "MSE",
                                   "network_train_text_encoder": False, "tracker": "wandb", "resume_ckpt": "mine"}


@pytest.mark.parametrize("settings", [{"task": "kolmogorov"}, {"mode": "LoRA"}, {"rectified_flow": True}])
def test_runs_everydream2_cannot_train_keep_difftrains_defaults(settings, tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(settings))
    config = translated(str(path))
    for name in EVERYDREAM2_DEFAULTS:
        assert getattr(config, name) == Config.model_fields[name].default, name


def test_the_default_model_missing_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "input").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "input" / "a.png")
    with pytest.raises(SystemExit) as stop:
        main([])
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "model 'sd_v1-5_vae.ckpt' not found" in error and "Traceback" not in error


@pytest.mark.usefixtures("one_thread")
def test_clip_skip_conditions_on_the_earlier_layer_in_training_and_samples(tiny_sd15, tmp_path):
    from types import SimpleNamespace

    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    data = _images(tmp_path / "data", count=2)
    cpu = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)

    def task_with(clip_skip):
        config = translated("--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--resolution", "64",
                            "--clip_skip", str(clip_skip), "--sample_inference_steps", "2", "--num_samples", "1")
        return SDTask(config, cpu, StartPoint(base=str(tiny_sd15)))

    skipped, plain = task_with(2), task_with(0)
    with torch.no_grad():
        encoder = skipped.stack.sd.text_encoders[0]
        ids = skipped.stack.sd.tokenize(["a cat"])[0]
        layers = encoder(ids, output_hidden_states=True).hidden_states
        expected = getattr(encoder, "text_model", encoder).final_layer_norm(layers[-2])
        assert torch.allclose(skipped.stack.sd.encode_prompts(["a cat"])["encoder_hidden_states"], expected)
        assert not torch.allclose(plain.stack.sd.encode_prompts(["a cat"])["encoder_hidden_states"], expected)
    assert skipped.stack.text.fingerprint != plain.stack.text.fingerprint  # cached embeddings of one layer never serve the other
    assert np.abs(np.asarray(skipped.parts.samples.samples(skipped.model)["samples"], float)
                  - np.asarray(plain.parts.samples.samples(plain.model)["samples"], float)).max() > 0


@pytest.mark.usefixtures("one_thread")
def test_extra_manual_datasets_and_the_stabilized_train_loss_each_log_their_own(tmp_path, tiny_sd15, monkeypatch):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    data, santa = _images(tmp_path / "data"), _images(tmp_path / "santa", count=2)
    dark = _images(tmp_path / "dark", count=2)
    for path in dark.glob("*.png"):  # other pixels than santa's: a different loss
        Image.fromarray(np.zeros((72, 64, 3), np.uint8)).save(path)
    (tmp_path / "val.json").write_text(json.dumps(real_validation_json(
        auto_split_proportion=0.25, extra_manual_datasets={"santa": str(santa), "dark": str(dark)},
        stabilize_training_loss=True, stabilize_split_proportion=0.5)))
    assert main(["--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--validation_config", "val.json",
                 "--resolution", "64", "--max_epochs", "2", "--batch_size", "1", "--logdir", "logs",
                 "--tracker", "none", "--sample_steps", "0"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [line for line in lines if "loss_valid" in line]
    metrics = {"loss_valid_santa", "loss_valid_dark", "loss_train_stabilized"}
    # one at step 0 (EveryDream2 validates before its first step), then one per epoch
    assert [line["step"] for line in valid][0] == 0 and len(valid) == 3
    assert all(metrics <= set(line) for line in valid)
    assert all(math.isfinite(line[metric]) for line in valid for metric in metrics)
    assert valid[0]["loss_valid_santa"] != valid[0]["loss_valid_dark"]


def test_the_stabilized_set_is_a_seeded_share_of_the_distinct_training_images(tmp_path):
    from difftrain.config import validate_config_dict
    from difftrain.data.images import scan_image_folder
    from difftrain.tasks.sd_parts.data import extra_validation_sets

    items = scan_image_folder(str(_images(tmp_path / "data", count=4)), trigger_word="",
                              caption_from_filename=True, setting_name="data_root") * 3  # image_num_multiply 3

    def chosen(**settings):
        config = validate_config_dict({"data_root": str(tmp_path / "data"), **settings})
        sets = extra_validation_sets(config, [(64, 64)], items)
        return sorted(item.path.name for item in sets["loss_train_stabilized"].items)

    half = chosen(validation_stabilize_fraction=0.5, seed=1)
    assert len(half) == len(set(half)) == 2 and set(half) <= {item.path.name for item in items}
    assert half == chosen(validation_stabilize_fraction=0.5, seed=1)
    assert len(chosen(validation_stabilize_fraction=0.1, seed=1)) == 1  # at least one image
    assert "loss_train_stabilized" not in extra_validation_sets(
        validate_config_dict({"data_root": "x"}), [(64, 64)], items)


# ---- text_encoder_overrides: the text encoder's own optimizer -------------------------------------
# EveryDream2's own optimizer.json (base: betas (0.9, 0.999), epsilon 1e-8, weight_decay 0.01, constant; the
# overrides' epsilon null) with another base optimizer and lr, and overrides that all differ from base
OWN_TEXT_ENCODER_OPTIMIZER = json.loads((REAL / "optimizer.json").read_text())
OWN_TEXT_ENCODER_OPTIMIZER["base"].update(optimizer="adamw", lr=1e-3)
OWN_TEXT_ENCODER_OPTIMIZER["text_encoder_overrides"].update(
    optimizer="lion", lr=1e-4, lr_scheduler="linear", lr_warmup_steps=2, lr_decay_steps=5, betas=[0.8, 0.95],
    weight_decay=0.1)


def test_shipped_optimizer_files_keep_one_optimizer_when_the_overrides_equal_base(shipped):
    for name in ("optimizer.json", "optimizerSD21.json", "optimizer_dadapt.json"):
        config = translated("--optimizer_config", name)
        assert (config.text_encoder_optimizer, config.text_encoder_optimizer_settings) == ("", None), name
        assert (config.text_encoder_weight_decay, config.text_encoder_lr_warmup_steps) == (None, None), name


def test_overrides_that_differ_become_the_text_encoders_own_settings(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "opt.json").write_text(json.dumps(OWN_TEXT_ENCODER_OPTIMIZER))
    config = translated("--optimizer_config", "opt.json")
    assert (config.optimizer, config.optimizer_settings) == ("AdamW", "betas=(0.9, 0.999);eps=1e-08")
    assert (config.text_encoder_optimizer, config.text_encoder_optimizer_settings) == ("Lion", "betas=(0.8, 0.95)")
    assert (config.text_encoder_weight_decay, config.text_encoder_lr) == (0.1, 1e-4)
    assert (config.text_encoder_lr_scheduler, config.text_encoder_lr_warmup_steps,
            config.text_encoder_lr_decay_steps) == ("linear", 2, 5)
    # base's epsilon falls to the text encoder's Lion, which EveryDream2 does not give it either
    assert "text_encoder_overrides.epsilon has no effect with lion" in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_a_text_encoder_with_its_own_optimizer_trains_and_resumes_bit_for_bit(tmp_path, tiny_sd15, monkeypatch):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    data = _images(tmp_path / "data", count=3)
    (tmp_path / "opt.json").write_text(json.dumps(OWN_TEXT_ENCODER_OPTIMIZER))
    common = ["--optimizer_config", "opt.json", "--data_root", str(data), "--resolution", "64",
              "--max_epochs", "2", "--batch_size", "1", "--sample_steps", "0", "--seed", "7",
              "--ckpt_every_n_minutes", "0"]
    assert main([*common, "--resume_ckpt", str(tiny_sd15), "--logdir", "full", "--runs_dir", "full_runs",
                 "--ckpt_every_n_steps", "2"]) == 0
    (middle,) = Path("full").glob("*/ckpts/*-gs00002")
    saved = torch.load(middle / "trainer_state.pt", weights_only=True)["optimizer"]
    assert set(saved) == {"unet", "text_encoders"}
    assert saved["text_encoders"]["param_groups"][0]["betas"] == (0.8, 0.95)
    assert main([*common, "--resume_ckpt", str(middle), "--logdir", "resumed", "--runs_dir", "resumed_runs"]) == 0
    (straight,), (resumed,) = Path("full_runs").iterdir(), Path("resumed_runs").iterdir()
    a = torch.load(straight / "state.pth", weights_only=True)
    b = torch.load(resumed / "state.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # The text encoder (not in state.pth, which is the UNet's) trained, and resumed exactly too.
    from safetensors.torch import load_file

    def text_encoder(folder: Path) -> dict:
        (path,) = folder.glob("text_encoder/*.safetensors")
        return load_file(path)

    base = text_encoder(tiny_sd15)
    (last_full,), (last_resumed,) = Path("full").glob("*/ckpts/last-*"), Path("resumed").glob("*/ckpts/last-*")
    c, d = text_encoder(last_full), text_encoder(last_resumed)
    assert all(torch.equal(c[key], d[key]) for key in c)
    assert any(not torch.equal(c[key], base[key]) for key in base)


# ---- validation use_relative_loss ----------------------------------------------------------------
def test_relative_metrics_measure_from_each_metrics_first_value():
    from difftrain.validation_points import relative_metrics

    start: dict = {}
    assert relative_metrics({"loss_valid": 0.5, "loss_valid_santa": 0.7, "loss_train_stabilized": 0.1}, start) == \
        {"loss_valid_relative": 0.0, "loss_valid_santa_relative": 0.0}
    assert relative_metrics({"loss_valid": 0.25, "loss_valid_santa": 0.9}, start) == \
        pytest.approx({"loss_valid_relative": -0.25, "loss_valid_santa_relative": 0.2})
    assert start == {"loss_valid": 0.5, "loss_valid_santa": 0.7}


@pytest.mark.usefixtures("one_thread")
def test_use_relative_loss_logs_each_validation_against_the_pre_training_one(tmp_path, tiny_sd15, monkeypatch):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    data, santa = _images(tmp_path / "data", count=5), _images(tmp_path / "santa", count=2)
    (tmp_path / "val.json").write_text(json.dumps(real_validation_json(
        auto_split_proportion=0.25, extra_manual_datasets={"santa": str(santa)}, use_relative_loss=True)))
    common = ["--data_root", str(data), "--validation_config", "val.json", "--resolution", "64", "--max_epochs", "3",
              "--batch_size", "2", "--sample_steps", "0", "--ckpt_every_n_minutes", "0", "--lr", "1e-3"]

    def validations(runs: str) -> list[dict]:
        (run,) = Path(runs).iterdir()
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [line for line in lines if "loss_valid" in line]

    assert main([*common, "--resume_ckpt", str(tiny_sd15), "--logdir", "full", "--runs_dir", "full_runs",
                 "--ckpt_every_n_steps", "2"]) == 0
    straight = validations("full_runs")
    # one before the first step, then one per epoch
    assert [line["step"] for line in straight][0] == 0 and len(straight) == 4
    for name in ("loss_valid", "loss_valid_santa"):
        assert straight[0][f"{name}_relative"] == 0
        for line in straight[1:]:
            assert line[f"{name}_relative"] == pytest.approx(line[name] - straight[0][name])
        assert any(line[f"{name}_relative"] != 0 for line in straight[1:])
    # A resumed run measures from the same start (kept in the checkpoint), not from where it resumed.
    (middle,) = Path("full").glob("*/ckpts/*-gs00002")
    assert main([*common, "--resume_ckpt", str(middle), "--logdir", "resumed", "--runs_dir", "resumed_runs"]) == 0
    resumed = validations("resumed_runs")
    assert resumed and all(line["step"] > 0 for line in resumed)  # no new start point
    later = {line["step"]: line for line in straight}
    for line in resumed:
        assert line["loss_valid_relative"] == pytest.approx(later[line["step"]]["loss_valid_relative"], abs=1e-6)


# ---- gpuid --------------------------------------------------------------------------------------
def test_gpuid_narrows_the_visible_gpus_to_the_one_asked_for():
    from difftrain.gpu_choice import gpu_environment

    assert gpu_environment(0, {"WORLD_SIZE": "4"}, 8) == ({}, "")  # the default changes nothing, anywhere
    assert gpu_environment(1, {}, 2)[0] == {"CUDA_VISIBLE_DEVICES": "1"}
    # numbered among the visible ones, as EveryDream2's cuda:N is
    changes, note = gpu_environment(1, {"CUDA_VISIBLE_DEVICES": "4, 6"}, 2)
    assert changes == {"CUDA_VISIBLE_DEVICES": "6"} and "entry 1 of CUDA_VISIBLE_DEVICES='4, 6'" in note
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES='4,6' shows 2 GPU.s., numbered 0 to 1"):
        gpu_environment(2, {"CUDA_VISIBLE_DEVICES": "4,6"}, 2)
    with pytest.raises(ConfigError, match="this machine has 2 GPU.s."):
        gpu_environment(3, {}, 2)
    with pytest.raises(ConfigError, match="launch of 2 processes.*--gpu_ids"):
        gpu_environment(1, {"WORLD_SIZE": "2"}, 2)
    changes, note = gpu_environment(2, {}, 0)
    assert changes == {} and note == "note: gpuid 2: this machine shows no CUDA GPU, so training runs on the CPU."


def test_gpuid_reaches_the_front_door_and_a_cpu_machine_notes_it(tmp_path, capsys, monkeypatch):
    from difftrain.cli import main
    from difftrain.data.kolmogorov import KolmogorovParams, ensure_dataset
    from difftrain.gpu_choice import choose_gpu
    from tests.test_bad_inputs import TINY_SIMULATION, tiny_settings, write

    assert translated("--gpuid", "2").gpu_id == 2
    (tmp_path / "train.json").write_text(json.dumps({"gpuid": 1}))
    assert translated(str(tmp_path / "train.json")).gpu_id == 1
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CPU note is not what happens here")
    environ: dict = {}
    assert "no CUDA GPU" in choose_gpu(3, environ) and environ == {}
    ensure_dataset(tmp_path / "data", KolmogorovParams(**TINY_SIMULATION), seed=0, progress=False)
    config = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, tmp_path / "data"), max_steps=1))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert main([str(config), "--gpuid", "3"]) == 0
    assert capsys.readouterr().err.count("gpuid 3: this machine shows no CUDA GPU") == 1
