"""Stable Diffusion fine-tuning through the engine, on the tiny stand-ins (CPU, offline).

Four 72x80 images with .txt captions, resolution 64 (one 64x64 bucket; the tiny VAEs halve
each side, so latents are 32x32), 3 training images + 1 held out.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.config import validate_config_dict
from difftrain.engine import run
from difftrain.errors import ConfigError
from difftrain.tiny import single_file_path

CAPTIONS = ["a cat", "a dog", "photo of a cat", "the dog"]
COLOURS = [(220, 40, 40), (40, 200, 60), (30, 60, 220), (230, 210, 40)]
CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)


def built(task_class, config):
    """task_class for `config`, from the start point the engine would resolve (base model or checkpoint)."""
    from difftrain.checkpoint import resolve_start

    return task_class(config, CPU, resolve_start(config, from_scratch=False, log=print))


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index, (colour, caption) in enumerate(zip(COLOURS, CAPTIONS)):
        pixels = np.zeros((80, 72, 3), np.uint8)
        pixels[:] = colour
        pixels[:, :36] //= 2  # a left/right structure, so flips and crops matter
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text(caption, encoding="utf-8")
    return folder


def sd_config(tmp_path: Path, model, images: Path, **changes):
    settings = {
        "task": "sd", "mode": "Full", "resume_ckpt": str(model), "data_root": str(images),
        "resolution": 64, "max_epochs": 2, "batch_size": 2, "lr": 1e-3, "seed": 3,
        "validation_fraction": 0.25, "sample_steps": 0, "sample_inference_steps": 2, "num_samples": 2,
        "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"),
        "ckpt_every_n_minutes": 0, "project_name": "sdtest",
    }
    settings.update(changes)
    return validate_config_dict(settings)


def last_checkpoint(tmp_path: Path) -> Path:
    (log_folder,) = (tmp_path / "logs").iterdir()
    (folder,) = (log_folder / "ckpts").glob("last-*")
    return folder


def run_state(tmp_path: Path) -> dict:
    (folder,) = (tmp_path / "runs").iterdir()
    return torch.load(folder / "state.pth", weights_only=True)


def validation_losses(config, checkpoint: Path) -> tuple[float, float]:
    """loss_valid of the base model and of the checkpoint's weights (same fixed noise)."""
    from difftrain.tasks.sd import SDTask

    task = built(SDTask, config)
    with torch.no_grad():
        before = task.parts.validation.validation_loss(task.model)
        task.load_model(task.model, checkpoint)
        after = task.parts.validation.validation_loss(task.model)
    return before, after


def test_full_sd15_lowers_the_held_out_loss_and_the_checkpoint_is_a_diffusers_pipeline(tmp_path, images, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    config = sd_config(tmp_path, tiny_sd15, images, max_epochs=3)
    assert run(config) == 0
    checkpoint = last_checkpoint(tmp_path)
    before, after = validation_losses(config, checkpoint)
    assert after < 0.8 * before, (before, after)

    pipeline = StableDiffusionPipeline.from_pretrained(checkpoint, local_files_only=True)
    state = run_state(tmp_path)
    assert all(torch.equal(pipeline.unet.state_dict()[key], value) for key, value in state.items())
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline("a cat", height=64, width=64, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    (run_folder,) = (tmp_path / "runs").iterdir()
    events = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss_valid" in event for event in events) == 3
    sheet = Image.open(next((run_folder / "samples").glob("samples-gs*.png")))
    assert sheet.width == 128 and sheet.height > 64  # 2 samples side by side, their prompts in a strip under them


def test_sd2v_from_a_single_file_trains_with_v_targets_and_saves_a_v_pipeline(tmp_path, images, tiny_sd2v):
    from diffusers import StableDiffusionPipeline

    config = sd_config(tmp_path, single_file_path(tiny_sd2v), images, max_epochs=3, min_snr_gamma=5.0)
    assert run(config) == 0
    checkpoint = last_checkpoint(tmp_path)
    scheduler = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    before, after = validation_losses(config, checkpoint)
    assert after < 0.8 * before, (before, after)
    pipeline = StableDiffusionPipeline.from_pretrained(checkpoint, local_files_only=True)
    assert pipeline.scheduler.config.prediction_type == "v_prediction"


def test_resume_from_a_mid_epoch_checkpoint_is_bitwise_identical(tmp_path, images, tiny_sd15):
    full = sd_config(tmp_path / "full", tiny_sd15, images, ckpt_every_n_steps=1, flip_p=0.5,
                     caption_dropout=0.3, noise_offset=0.05)
    assert run(full) == 0
    (log_folder,) = (tmp_path / "full" / "logs").iterdir()
    middle = log_folder / "ckpts" / "sdtest-ep00-gs00001"  # 3 training images in batches of 2: mid-epoch
    assert json.loads((middle / "trainer_state.json").read_text())["batch_in_epoch"] == 1
    resumed = sd_config(tmp_path / "resumed", tiny_sd15, images, ckpt_every_n_steps=1, flip_p=0.5,
                        caption_dropout=0.3, noise_offset=0.05, resume_ckpt=str(middle))
    assert run(resumed) == 0
    a, b = run_state(tmp_path / "full"), run_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_sdxl_lora_end_to_end_file_loads_in_diffusers_and_resumes_exactly(tmp_path, images, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    from difftrain.tasks.sd import SDTask

    lora_dir = tmp_path / "loras"
    settings = dict(mode="LoRA", lr=1e-2, network_rank=4, network_alpha=2.0, network_type="c3lier",
                    network_conv_rank=2, network_conv_alpha=1.0, network_train_text_encoder=True,
                    save_precision="fp32", lora_dir=str(lora_dir), save_lora_name="tiny-xl",
                    ckpt_every_n_steps=1, max_epochs=2)
    assert run(sd_config(tmp_path / "full", tiny_sdxl, images, **settings)) == 0
    lora_file = lora_dir / "tiny-xl.safetensors"
    with safe_open(str(lora_file), framework="pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert metadata["ss_network_dim"] == "4" and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_output_name"] == "tiny-xl"
    assert {key.split("_")[1] for key in keys} == {"unet", "te1", "te2"}
    assert any("resnets_0_conv1.lora_down" in key for key in keys)  # c3lier: 3x3 convolutions too
    checkpoint = last_checkpoint(tmp_path / "full")
    assert not (checkpoint / "unet").exists()  # the base is pointed to, not copied
    assert json.loads((checkpoint / "base_model.json").read_text())["model"] == str(tiny_sdxl.resolve())

    def generate(pipeline):
        pipeline.set_progress_bar_config(disable=True)
        return pipeline("a cat", height=64, width=64, num_inference_steps=2, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images

    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    base = generate(pipeline)
    pipeline.load_lora_weights(str(lora_file))
    with_lora = generate(pipeline)
    assert np.abs(with_lora - base).max() > 1e-3
    # diffusers reads every layer of the file as we trained it: same images as our own modules.
    task = built(SDTask, sd_config(tmp_path / "check", tiny_sdxl, images, **settings, resume_ckpt=str(checkpoint)))
    task.load_model(task.model, checkpoint)
    ours = generate(task.stack.view(task.model).to_pipeline())
    np.testing.assert_allclose(ours, with_lora, atol=1e-4)

    middle = checkpoint.parent / "sdtest-ep00-gs00001"
    resumed = sd_config(tmp_path / "resumed", tiny_sdxl, images, **dict(settings, save_lora_name="again"),
                        resume_ckpt=str(middle))
    assert run(resumed) == 0
    a, b = run_state(tmp_path / "full"), run_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_an_existing_lora_file_is_not_overwritten(tmp_path, images, tiny_sd15):
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "mine.safetensors").write_bytes(b"precious")
    config = sd_config(tmp_path, tiny_sd15, images, mode="LoRA", lora_dir=str(lora_dir), save_lora_name="mine")
    with pytest.raises(ConfigError, match="save_overwrite"):
        run(config)
    assert (lora_dir / "mine.safetensors").read_bytes() == b"precious"


def test_network_resume_starts_from_a_saved_lora(tmp_path, images, tiny_sd15):
    from difftrain.tasks.sd import SDTask

    settings = dict(mode="LoRA", lr=1e-2, network_element="CrossAttention", max_steps=1,
                    save_precision="fp32", lora_dir=str(tmp_path / "loras"), save_lora_name="first")
    assert run(sd_config(tmp_path / "a", tiny_sd15, images, **settings)) == 0
    task = built(SDTask, sd_config(tmp_path / "b", tiny_sd15, images, **{**settings, "save_lora_name": "second"},
                                   network_resume="first"))
    saved = run_state(tmp_path / "a")
    ours = task.run_state_dict(task.model)
    assert ours.keys() == saved.keys() and all(torch.equal(ours[k], saved[k]) for k in ours)
    assert all("attn2" in key for key in ours)


def test_a_missing_data_root_is_reported_before_any_model_is_loaded(tmp_path, monkeypatch):
    import difftrain.tasks.sd_parts.base_model as base_model

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data folder was checked")

    monkeypatch.setattr(base_model, "load_sd", must_not_load)
    config = sd_config(tmp_path, "no-such-model", tmp_path / "missing")
    with pytest.raises(ConfigError, match="data_root .*does not exist"):
        run(config)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="contains no images"):
        run(sd_config(tmp_path, "no-such-model", tmp_path / "empty"))


def test_rectified_flow_is_refused_for_an_epsilon_base_and_trains_a_v_base(tmp_path, images, tiny_sd15, tiny_sd2v):
    with pytest.raises(ConfigError, match="v-prediction"):
        run(sd_config(tmp_path / "eps", tiny_sd15, images, rectified_flow=True))
    assert not (tmp_path / "eps" / "runs").exists()  # refused before any output or step
    assert run(sd_config(tmp_path / "v", tiny_sd2v, images, rectified_flow=True, max_steps=2,
                         zero_terminal_snr=True)) == 0
    checkpoint = last_checkpoint(tmp_path / "v")
    scheduler = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["rescale_betas_zero_snr"] is True and scheduler["timestep_spacing"] == "trailing"


def test_bucket_rules(tmp_path):
    from difftrain.tasks.sd_parts.data import buckets_for, split_validation

    full = validate_config_dict({"resolution": 256})
    assert (256, 256) in buckets_for(full) and len(buckets_for(full)) > 1
    assert buckets_for(validate_config_dict({"resolution": 64})) == [(64, 64)]
    with pytest.raises(ConfigError, match="resolution"):
        buckets_for(validate_config_dict({"resolution": 300}))
    lora = buckets_for(validate_config_dict({"mode": "LoRA", "resolution": 512, "image_buckets_step": 64,
                                             "image_min_length": 256, "image_max_ratio": 2}))
    assert (512, 512) in lora and (384, 640) in lora and len(lora) > 2  # TrainTrain's rules, not ED2's
    assert all(max(w, h) / min(w, h) <= 2 and w * h <= 512 * 512 for w, h in lora)
    items = list(range(10))
    train, valid = split_validation(items, 0.2, seed=1)
    assert len(valid) == 2 and sorted(train + valid) == items
    assert split_validation(items, 0.2, seed=1) == (train, valid)


@pytest.mark.parametrize("preset, mode", [("sd15_finetune", "Full"), ("sd2v_finetune", "Full"), ("sdxl_lora", "LoRA")])
def test_presets_validate_and_pick_the_sd_task(preset, mode):
    from difftrain.config import load_config
    from difftrain.engine import task_factory
    from difftrain.tasks.sd import SDTask
    from difftrain.tasks.sd_parts.data import buckets_for

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{preset}.json")
    assert config.task == "sd" and config.mode == mode and task_factory(config) is SDTask
    assert buckets_for(config)  # its resolution is a valid bucket setting


def test_the_front_door_shows_our_lines_not_the_libraries_chatter(tmp_path, images, tiny_sd15):
    """Sampling and saving pull in transformers and diffusers, whose default logs (notes about
    optional backends, a progress bar per save_pretrained) would drown the training's own output."""
    import os
    import subprocess
    import sys

    config = sd_config(tmp_path, single_file_path(tiny_sd15), images, max_epochs=1, sample_steps=1,
                       tracker="wandb")
    path = tmp_path / "sd.json"
    path.write_text(config.model_dump_json())
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")}
    result = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=Path(__file__).parents[1],
                            env={**environment, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "run folder:" in output and "checkpoint:" in output
    for chatter in ("[transformers]", "Warning", "warn(", "Writing model shards", "Loading pipeline components"):
        assert chatter not in output, output[-3000:]


def test_several_processes_share_one_disk_cache_unless_told_otherwise(tmp_path, capsys):
    from difftrain.tasks.sd_parts.conditioning import cache_folder

    def folder(processes, main=True, **changes):
        config = validate_config_dict({"task": "sd", "logdir": str(tmp_path / "logs"), **changes})
        accelerator = SimpleNamespace(num_processes=processes, is_main_process=main)
        return cache_folder(config, accelerator)

    assert folder(1) is None  # one process: in memory
    assert folder(1, cache_dir=str(tmp_path / "c")) == folder(2, cache_dir=str(tmp_path / "c")) == str(tmp_path / "c")
    assert folder(2) == folder(2, main=False) == str(tmp_path / "logs" / "latent_cache")
    assert capsys.readouterr().err.count("shared by all of them") == 1  # said by the main process only


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state whose mixed precision the first Accelerator fixes;
    a test that needs another precision starts from a clean one and leaves one behind."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_autocast_gradient_checkpointing_and_accumulation_train_together(tmp_path, images, tiny_sd15, monkeypatch,
                                                                             fresh_accelerator_state):
    """The GPU speed settings, exercised on the CPU (where bf16 autocast exists too): the UNet runs
    under bf16 autocast with checkpointing on, and the weights it keeps stay fp32 and finite."""
    from diffusers import UNet2DConditionModel

    seen = []
    original_forward = UNet2DConditionModel.forward

    def recording_forward(self, *args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     self.is_gradient_checkpointing, self.training))
        return original_forward(self, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", recording_forward)
    config = sd_config(tmp_path, tiny_sd15, images, mixed_precision="bf16", gradient_checkpointing=True,
                       gradient_accumulation_steps=2, max_epochs=2, validation_fraction=0.0)
    assert run(config) == 0
    training_calls = [call for call in seen if call[3]]
    assert training_calls and all(call[:3] == (True, torch.bfloat16, True) for call in training_calls)
    state = run_state(tmp_path)
    assert all(value.dtype == torch.float32 and torch.isfinite(value).all() for value in state.values())
    lines = [json.loads(line) for line in next((tmp_path / "runs").iterdir()).joinpath("metrics.jsonl").read_text().splitlines()]
    assert max(line.get("step", 0) for line in lines) == 2  # 4 images, batch 2: 2 micro-batches, 1 optimizer step an epoch
