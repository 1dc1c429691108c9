"""EveryDream2 features beyond the vocabulary itself: text-encoder freezing, training the text encoder
alone, the rated dataset, the single files without save_ckpt_dir, settings re-read every epoch.
Each is checked on the tiny Stable Diffusion stand-in or on the data layer directly."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from difftrain.config import Config
from difftrain.errors import ConfigError
from tests.test_everydream2 import REAL, _images, translated

CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)


def _optimizer_json(folder: Path, freezing: dict) -> Path:
    path = folder / "optimizer.json"
    path.write_text(json.dumps({"base": {"optimizer": "adamw", "lr": 1e-6}, "text_encoder_freezing": freezing}))
    return path


def _trained_parts(encoder: torch.nn.Module) -> set[str]:
    """'embeddings', 'final_layer_norm' and 'layer<i>' for the parts whose every weight trains."""
    parts: dict[str, list[bool]] = {}
    for name, parameter in encoder.named_parameters():
        if ".layers." in name:
            part = "layer" + name.split(".layers.")[1].split(".")[0]
        else:
            part = next((p for p in ("embeddings", "final_layer_norm") if p in name), name)
        parts.setdefault(part, []).append(parameter.requires_grad)
    return {part for part, flags in parts.items() if all(flags)} | \
        {f"partly {part}" for part, flags in parts.items() if any(flags) and not all(flags)}


def _clip(layers: int = 4):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                        num_hidden_layers=layers, vocab_size=1000, bos_token_id=0, eos_token_id=1))


# ---- a) text_encoder_freezing ----------------------------------------------------------------------

ALL = {"embeddings", "layer0", "layer1", "layer2", "layer3", "final_layer_norm"}


@pytest.mark.parametrize("freezing, trained", [
    ({}, ALL),
    ({"unfreeze_last_n_layers": None}, ALL),
    ({"unfreeze_last_n_layers": 2}, {"layer2", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 9}, ALL),
    ({"freeze_front_n_layers": 1}, {"layer1", "layer2", "layer3", "final_layer_norm"}),
    ({"freeze_front_n_layers": -1}, {"layer3", "final_layer_norm"}),
    ({"freeze_front_n_layers": 0}, ALL),
    # EveryDream2 reads the keys by presence: unfreeze_last_n_layers (even null) wins over freeze_front
    ({"freeze_front_n_layers": 3, "unfreeze_last_n_layers": None}, ALL),
    ({"freeze_front_n_layers": 3, "unfreeze_last_n_layers": 2}, {"layer2", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1, "freeze_embeddings": False}, {"embeddings", "layer3", "final_layer_norm"}),
    ({"unfreeze_last_n_layers": 1, "freeze_embeddings": None}, {"embeddings", "layer3", "final_layer_norm"}),
    ({"freeze_embeddings": True}, ALL - {"embeddings"}),
    ({"freeze_final_layer_norm": True}, ALL - {"final_layer_norm"}),
    ({"freeze_final_layer_norm": None, "unfreeze_last_n_layers": 3}, {"layer1", "layer2", "layer3",
                                                                        "final_layer_norm"}),
])
def test_text_encoder_freezing_trains_what_everydream2_trains(freezing, trained, tmp_path):
    from difftrain.tasks.sd_parts.trainable import freeze_text_encoder_parts

    config = translated("--optimizer_config", str(_optimizer_json(tmp_path, freezing)))
    encoder = _clip()
    freeze_text_encoder_parts(encoder, config)
    assert _trained_parts(encoder) == trained


def test_freezing_every_layer_from_the_front_is_an_error_naming_the_setting():
    from difftrain.tasks.sd_parts.trainable import freeze_text_encoder_parts

    with pytest.raises(ConfigError, match="text_encoder_freeze_front_n_layers 4 leaves none"):
        freeze_text_encoder_parts(_clip(), Config(text_encoder_freeze_front_n_layers=4))


def test_freezing_reaches_the_optimizer_of_a_full_run_on_the_tiny_stand_in(tiny_sd15, tmp_path):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    data = _images(tmp_path / "data", count=2)
    optimizer = _optimizer_json(tmp_path, {"freeze_front_n_layers": 1, "freeze_final_layer_norm": True})
    config = translated("--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--resolution", "64",
                        "--optimizer_config", str(optimizer), "--disable_textenc_training", "false")
    task = SDTask(config, CPU, StartPoint(base=str(tiny_sd15)))
    (encoder,) = task.model.text_encoders
    assert _trained_parts(encoder) == {"layer1"}  # the stand-in's encoder has two layers
    optimized = {id(p) for group in task.parameter_groups() for p in group["params"]}
    assert all((id(p) in optimized) == p.requires_grad for p in encoder.parameters())
    assert all(id(p) in optimized for p in task.model.unet.parameters())


# ---- b) disable_unet_training ---------------------------------------------------------------------

def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (file,) = folder.glob("*.safetensors")
    return load_file(str(file))


@pytest.mark.usefixtures("one_thread")
def test_disable_unet_training_trains_the_text_encoder_alone(tiny_sd15, tmp_path, monkeypatch):
    from difftrain.cli import main

    monkeypatch.chdir(tmp_path)
    data = _images(tmp_path / "data", count=2)
    assert main(["--resume_ckpt", str(tiny_sd15), "--data_root", str(data), "--resolution", "64",
                 "--max_epochs", "1", "--batch_size", "2", "--lr", "1e-3", "--sample_steps", "0",
                 "--tracker", "none", "--disable_unet_training", "true", "--disable_textenc_training", "false"]) == 0
    (final,) = (tmp_path / "logs").glob("*/ckpts/last-*")
    for module, changes in (("unet", False), ("text_encoder", True)):
        before, after = _weights(tiny_sd15 / module), _weights(final / module)
        changed = [name for name in before if not torch.equal(before[name], after[name].to(before[name].dtype))]
        assert bool(changed) == changes, module
    used = json.loads(next((tmp_path / "runs").glob("*/config.json")).read_text())
    assert used["train_unet"] is False


def test_disabling_both_the_unet_and_the_text_encoder_is_a_clear_error(tiny_sd15, tmp_path, capsys):
    from difftrain.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--resume_ckpt", str(tiny_sd15), "--data_root", str(_images(tmp_path / "data", count=1)),
              "--disable_unet_training", "true", "--disable_textenc_training", "true"])
    assert exited.value.code == 2
    assert "nothing else trains" in capsys.readouterr().err


def test_a_frozen_unet_leaves_the_text_encoder_its_own_schedule():
    from difftrain.optim import make_scheduler

    config = Config(lr_scheduler="constant", text_encoder_lr_scheduler="linear", lr_warmup_steps=0)
    text = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [text], "module": "text_encoder"}], lr=1e-6)
    scheduler = make_scheduler(config, optimizer, 100)
    for _ in range(50):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-7)


# ---- d) save_ckpt_dir null or left out ------------------------------------------------------------------------

def test_save_ckpt_dir_null_means_the_working_folder(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"save_ckpt_dir": None}))
    assert translated(str(path)).save_ckpt_dir == "."
    assert translated("--save_ckpt_dir", "out").save_ckpt_dir == "out"
    # Left out, EveryDream2 writes there too (its default is null); difftrain's own runs write none.
    assert translated("--lr", "1e-5").save_ckpt_dir == "."
    assert translated("--mode", "LoRA").save_ckpt_dir == ""


def test_train_py_validates_before_the_first_step_as_everydream2_does():
    assert translated("--lr", "1e-5").validate_before_training
    assert not translated("--mode", "LoRA").validate_before_training
    assert not translated("--validate_before_training", "false").validate_before_training


def test_train_py_clips_each_model_on_its_own_as_everydream2_does():
    assert translated("--clip_grad_norm", "1").clip_grad_norm_per_model
    assert not translated("--mode", "LoRA").clip_grad_norm_per_model
    from difftrain.config import Config

    assert Config.model_fields["save_ckpt_dir"].default == ""


@pytest.mark.usefixtures("one_thread")
def test_without_save_ckpt_dir_the_single_file_lands_in_the_working_folder_and_is_never_overwritten(
        tiny_sd15, tmp_path, monkeypatch):
    from difftrain.cli import main
    from difftrain.exports import write_single_file

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    (work / "train.json").write_text(json.dumps({"project_name": "cat"}))  # no save_ckpt_dir, as EveryDream2 allows
    assert main(["--config", "train.json", "--resume_ckpt", str(tiny_sd15), "--data_root",
                 str(_images(tmp_path / "data", count=2)), "--resolution", "64", "--max_epochs", "1",
                 "--batch_size", "2", "--sample_steps", "0", "--tracker", "none"]) == 0
    (final,) = (work / "logs").glob("*/ckpts/last-cat-*")
    single = work / f"{final.name}.safetensors"
    assert sorted(path.name for path in work.glob("*.safetensors")) == [single.name]
    from safetensors.torch import load_file

    assert any(key.startswith("model.diffusion_model.") for key in load_file(str(single)))  # A1111 layout
    single.write_bytes(b"the user's own file")
    assert write_single_file(final, single, full_precision=False) is False
    assert single.read_bytes() == b"the user's own file"


# ---- c) rated_dataset ------------------------------------------------------------------------------

def test_the_rated_share_follows_everydream2s_schedule():
    from difftrain.data.images import rated_dataset_fraction

    # target 50%: drop 0.5; epoch n >= 1 trains (max_epochs - (n - 1) x 0.5) / max_epochs
    assert [rated_dataset_fraction(epoch, 4, 50) for epoch in range(4)] == [1.0, 1.0, 0.875, 0.75]
    assert [rated_dataset_fraction(epoch, 4, 100) for epoch in range(4)] == [1.0] * 4
    assert rated_dataset_fraction(3, 4, -5) == rated_dataset_fraction(3, 4, 0) == 0.5


def test_the_rated_draw_favours_high_ratings_and_is_fixed_per_seed_and_epoch():
    from difftrain.data.images import rated_subset

    ratings = [20.0] + [1.0] * 7
    picks = [rated_subset(ratings, 1 / 8, seed, epoch=3) for seed in range(200)]
    assert all(len(pick) == 1 for pick in picks)
    assert sum(pick == [0] for pick in picks) > 0.6 * 200  # 20/27 of the draws, about 148
    assert rated_subset(ratings, 0.5, 1, 5) == rated_subset(ratings, 0.5, 1, 5)
    four = [rated_subset(ratings, 0.5, 1, epoch) for epoch in range(2, 12)]
    assert all(len(set(pick)) == 4 for pick in four) and len({tuple(pick) for pick in four}) > 1
    assert rated_subset(ratings, 0.99, 1, 5) == list(range(8))  # ceil(7.92) = every image


def _rated_folder(folder: Path) -> Path:
    _images(folder, count=4)
    for index in range(4):  # the first image rated 9, the others 1 (the yaml beats the .txt)
        (folder / f"thing{index}_{index}.yaml").write_text(
            f"main_prompt: thing{index}\nrating: {9 if index == 0 else 0}\n")
    (folder / "multiply.txt").write_text("2")
    return folder


def test_rated_epochs_train_a_shrinking_share_of_distinct_images_by_rating(tmp_path):
    from difftrain.data.images import rated_dataset_fraction, repeat_by_multiply, scan_image_folder
    from difftrain.tasks.sd_parts.data import ImageEpochBatches, bucketed

    items = scan_image_folder(str(_rated_folder(tmp_path / "data")))
    assert sorted(item.rating for item in items) == [1.0, 1.0, 1.0, 9.0]  # rating 0 reads as 1, as in EveryDream2
    copies, chances = repeat_by_multiply(items)
    dataset = bucketed(copies, [(64, 64)], seed=3)
    batches = ImageEpochBatches(dataset, chances, batch_size=1, seed=3,
                                rated_fraction=lambda epoch: rated_dataset_fraction(epoch, 6, 25))

    def names(epoch):
        return sorted(dataset.items[i].path.name for batch in batches(epoch) for i in batch)

    assert len(names(0)) == len(names(1)) == 8  # every image, twice (multiply.txt)
    # drop 0.75 over 6 epochs: epoch 2 -> 0.875 (ceil 3.5 = 4 of the 4 images), 3 -> 0.75 (3),
    # 4 -> 0.625 (ceil 2.5 = 3), 5 -> 0.5 (2); each image once, multiply.txt aside
    assert [len(names(epoch)) for epoch in range(2, 6)] == [4, 3, 3, 2]
    assert all(len(set(names(epoch))) == len(names(epoch)) for epoch in range(2, 6))
    assert names(5) == names(5)  # a resumed run draws the same images
    high = "thing0_0.png"
    shown = [high in {dataset.items[i].path.name for i in
                      ImageEpochBatches(dataset, chances, 1, seed, lambda epoch: 0.25).trained(4)}
             for seed in range(40)]
    assert sum(shown) > 25  # rated 9 of 12: picked about 3 times in 4


def test_rated_dataset_translates_and_a_negative_rating_is_refused(tmp_path):
    from difftrain.data.images import scan_image_folder

    config = translated("--rated_dataset", "true", "--rated_dataset_target_dropout_percent", "140")
    assert config.rated_dataset and config.rated_dataset_target_dropout_percent == 100
    folder = _images(tmp_path / "data", count=1)
    (folder / "thing0_0.yaml").write_text("rating: -1\n")
    with pytest.raises(ConfigError, match="rating: expected a number of 0 or more"):
        scan_image_folder(str(folder))


def test_a_rated_run_on_the_tiny_stand_in_shrinks_its_epochs(tiny_sd15, tmp_path):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    config = translated("--resume_ckpt", str(tiny_sd15), "--data_root", str(_rated_folder(tmp_path / "data")),
                        "--resolution", "64", "--batch_size", "1", "--max_epochs", "4", "--rated_dataset", "true",
                        "--rated_dataset_target_dropout_percent", "0")
    task = SDTask(config, CPU, StartPoint(base=str(tiny_sd15)))
    # drop 1 over 4 epochs: 8 copies, 8, then 3 of the 4 images (ceil 4 x 0.75), then 2
    assert [len(task.epoch_batches(epoch, 0, 1)) for epoch in range(4)] == [8, 8, 3, 2]


# ---- f) sample_prompts.json with rectified_flow ------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_a_flow_run_draws_the_sample_plan_with_its_seeds_sizes_cfgs_and_negatives(tiny_sd2v, tmp_path, capsys):
    import numpy as np

    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    plan = {"num_inference_steps": 2, "cfgs": [1, 6], "scheduler": "dpm++", "samples": [
        {"prompt": "a red square", "seed": 7, "size": [80, 48]},
        {"prompt": "a red square", "seed": 7, "size": [80, 48]},
        {"prompt": "a red square", "seed": 7, "size": [80, 48], "negative_prompt": "blue"},
        {"prompt": "a red square", "seed": 8, "size": [80, 48], "cfgs": [6]}]}
    (tmp_path / "samples.json").write_text(json.dumps(plan))
    config = translated("--resume_ckpt", str(tiny_sd2v), "--data_root", str(_images(tmp_path / "data", count=2)),
                        "--resolution", "64", "--rectified_flow", "true",
                        "--sample_prompts", str(tmp_path / "samples.json"))
    task = SDTask(config, CPU, StartPoint(base=str(tiny_sd2v)))
    assert "the file's scheduler has no effect" in capsys.readouterr().err
    drawn = []
    original = task.parts.samples._flow_image

    def recording(*args, **kwargs):
        image = original(*args, **kwargs)
        drawn.append(np.asarray(image).astype(float))
        return image

    task.parts.samples._flow_image = recording
    task.parts.samples.samples(task.model)
    assert [image.shape[:2] for image in drawn] == [(48, 80)] * 7  # [height, width] of each sample x cfg
    assert np.array_equal(drawn[0], drawn[2]) and np.array_equal(drawn[1], drawn[3])  # the same seed, the same picture
    assert np.abs(drawn[0] - drawn[1]).max() > 0  # cfg 1 and cfg 6 differ
    assert np.array_equal(drawn[4], drawn[0])  # at cfg 1 the negative prompt is not used
    assert np.abs(drawn[5] - drawn[1]).max() > 0  # at cfg 6 it is
    assert np.abs(drawn[6] - drawn[1]).max() > 0  # another seed


# ---- e) load_settings_every_epoch ------------------------------------------------------------------

def test_load_settings_every_epoch_applies_the_loss_settings_the_file_says_at_each_epoch(
        tiny_sd15, tmp_path, capsys):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    path = tmp_path / "train.json"
    settings = {"load_settings_every_epoch": True, "loss_type": "mse", "resume_ckpt": str(tiny_sd15),
                "data_root": str(_images(tmp_path / "data", count=2)), "resolution": 64, "max_epochs": 3}
    path.write_text(json.dumps(settings))
    config = translated("--config", str(path), "--min_snr_gamma", "5")
    assert config.reload_settings_from == str(path.resolve())
    task = SDTask(config, CPU, StartPoint(base=str(tiny_sd15)))
    objective, reload = task.objective, task.parts.before_batch
    assert task.parts.samples.objective is objective and task.parts.validation is None
    reload(0, 0)
    assert (objective.loss_function, objective.min_snr_gamma, objective.min_timestep) == ("MSE", 5.0, 0)
    path.write_text(json.dumps({**settings, "loss_type": "huber", "timestep_start": 100, "min_snr_gamma": 1.5,
                                "zero_frequency_noise_ratio": 0.1, "cond_dropout": 0.5}))
    reload(3, 0)  # the same epoch: not read again
    assert objective.loss_function == "MSE"
    reload(4, 1)
    assert task.objective is objective  # changed in place: samples and validation see it too
    assert (objective.loss_function, objective.min_timestep, objective.min_snr_gamma, objective.noise_offset) == \
        ("Smooth-L1", 100, 1.5, 0.1)
    err = capsys.readouterr().err
    assert "from epoch 1 on" in err and "caption_dropout changed" in err  # a key that waits for the next start
    path.write_text("{ half saved")
    reload(8, 2)
    path.write_text(json.dumps({**settings, "timestep_start": 999, "timestep_end": 10}))
    reload(9, 3)
    assert (objective.loss_function, objective.min_timestep) == ("Smooth-L1", 100)  # kept through both mistakes
    assert capsys.readouterr().err.count("keeps the settings it had") == 2


def test_load_settings_every_epoch_needs_a_config_file():
    with pytest.raises(ConfigError, match="re-reads the train.json given with --config"):
        translated("--load_settings_every_epoch", "true")


def test_freezing_without_a_trained_text_encoder_is_noted(tiny_sd15, tmp_path, capsys):
    from difftrain.tasks.base import StartPoint
    from difftrain.tasks.sd import SDTask

    optimizer = _optimizer_json(tmp_path, {"freeze_embeddings": True})
    config = translated("--resume_ckpt", str(tiny_sd15), "--data_root", str(_images(tmp_path / "data", count=2)),
                        "--resolution", "64", "--optimizer_config", str(optimizer),
                        "--disable_textenc_training", "true")
    SDTask(config, CPU, StartPoint(base=str(tiny_sd15)))
    assert "text_encoder_freeze_embeddings have no effect: the text encoder does not train" in capsys.readouterr().err


def test_the_sample_generators_own_keys_set_the_sample_interval_and_the_step_0_samples(tmp_path):
    # EveryDream2's own sample_prompts.json, which leaves both keys out, with them added
    plan = {**json.loads((REAL / "sample_prompts.json").read_text()), "generate_samples_every_n_steps": 3,
            "generate_pretrain_samples": True}
    (tmp_path / "sample_prompts.json").write_text(json.dumps(plan))
    (tmp_path / "train.json").write_text(json.dumps({"sample_steps": 250, "sample_prompts": "sample_prompts.json"}))
    config = translated(str(tmp_path / "train.json"))
    assert config.sample_steps == 3 and config.sample_before_training  # the generator's keys are read last
    assert translated(str(tmp_path / "train.json"), "--sample_steps", "7").sample_steps == 7  # a flag wins
    del plan["generate_samples_every_n_steps"], plan["generate_pretrain_samples"]
    (tmp_path / "sample_prompts.json").write_text(json.dumps(plan))
    config = translated(str(tmp_path / "train.json"))
    assert config.sample_steps == 250 and not config.sample_before_training


def test_the_documented_sample_prompts_json_sets_the_interval_and_the_step_0_samples(tmp_path):
    # EveryDream2's doc/LOGGING.md shows users this sample_prompts.json (kept verbatim in tests/real_files).
    from difftrain.vocab.everydream2 import read_sample_plan

    document = (REAL / "LOGGING.md").read_text(encoding="utf-8")
    (tmp_path / "sample_prompts.json").write_text(document.split("```json\n", 1)[1].split("```", 1)[0])
    (tmp_path / "train.json").write_text(json.dumps({"sample_steps": 250, "sample_prompts": "sample_prompts.json"}))
    config = translated(str(tmp_path / "train.json"))
    assert config.sample_steps == 200 and config.sample_before_training
    plan = read_sample_plan(tmp_path / "sample_prompts.json", default_seed=555, resolution=512)
    assert [request.size for request in plan.requests][2] == (640, 384) and plan.num_inference_steps == 15
    assert plan.requests[0].negative_prompt == "distorted, deformed" and plan.requests[2].prompt is None
