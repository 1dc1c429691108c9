"""TrainTrain modes (ADDifT, Multi-ADDifT, Difference, iLECO), LoRA options and outputs, and the
seed's launcher examples, on the tiny SD1.x / SDXL stand-ins (CPU, offline, 64x64 images)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from difftrain.config import validate_config_dict
from difftrain.engine import run, task_factory, train_once
from difftrain.errors import ConfigError
from difftrain.tiny import single_file_path

REPO = Path(__file__).resolve().parents[1]
CPU = SimpleNamespace(device=torch.device("cpu"), is_main_process=True, num_processes=1)


def start_of(config):
    """The start point the engine resolves for `config` (its base model, or the checkpoint it names)."""
    from difftrain.checkpoint import resolve_start

    return resolve_start(config, from_scratch=False, log=print)


def built(task_class, config):
    return task_class(config, CPU, start_of(config))

# Tiny convolutions on shared cores run several times faster without intra-op threads.
torch.set_num_threads(1)


def save_image(path: Path, colour, size=(64, 64)) -> Path:
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[:] = colour
    pixels[:, : size[0] // 2] //= 2  # structure, so the two halves differ
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return save_image(folder / "original.png", (210, 60, 40)), save_image(folder / "target.png", (40, 80, 220))


def mode_config(tmp_path: Path, model, **changes):
    settings = {
        "task": "sd", "resume_ckpt": str(model), "resolution": 64, "max_steps": 4, "batch_size": 1, "lr": 2e-3,
        "seed": 7, "sample_steps": 0, "sample_inference_steps": 2, "num_samples": 1, "tracker": "none",
        "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"), "ckpt_every_n_minutes": 0,
        "lora_dir": str(tmp_path / "loras"), "network_rank": 4, "network_alpha": 4, "save_precision": "fp32",
        "project_name": "modes", "min_snr_gamma": 0,
    }
    settings.update(changes)
    return validate_config_dict(settings)


def events_of(run_folder: Path) -> list[dict]:
    lines = (run_folder / "metrics.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if "loss_train" in event]


def only(folder: Path, pattern: str = "*") -> Path:
    (found,) = folder.glob(pattern)
    return found


def generate(pipeline, prompt="a cat"):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(prompt, height=64, width=64, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images


def lora_changes_pipeline(model_folder: Path, lora_file: Path, family: str, prompt="a cat") -> float:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(model_folder, local_files_only=True)
    before = generate(pipeline, prompt)
    pipeline.load_lora_weights(str(lora_file))
    return float(np.abs(generate(pipeline, prompt) - before).max())


def ranks(lora_file: Path) -> set[int]:
    with safe_open(str(lora_file), framework="pt") as handle:
        return {handle.get_tensor(key).shape[0] for key in handle.keys() if key.endswith("lora_down.weight")}


# ---- ADDifT ----------------------------------------------------------------------------------------

def test_addift_alternates_directions_saves_every_n_steps_and_resumes_in_step(tmp_path, pair, tiny_sd15):
    original, target = pair
    settings = dict(mode="ADDifT", original_image=str(original), target_image=str(target),
                    original_prompt="a cat", target_prompt="a dog", save_lora_name="style", save_per_steps=2,
                    logging_save_csv=True, save_as_json=True, diff_alt_ratio=2.0, ckpt_every_n_steps=1,
                    network_strength=2.0, min_timestep=200, max_timestep=400)
    assert run(mode_config(tmp_path / "full", tiny_sd15, **settings)) == 0
    run_folder = only(tmp_path / "full" / "runs")
    events = events_of(run_folder)
    assert [e["direction"] for e in events] == ["forward", "reverse", "forward", "reverse"]
    assert [e["lora_multiplier"] for e in events] == [0.25, -0.5, 0.25, -0.5]
    loras = tmp_path / "full" / "loras"
    assert sorted(p.name for p in loras.iterdir()) == ["style.csv", "style.json", "style.safetensors",
                                                       "style_2steps.safetensors"]
    assert json.loads((loras / "style.json").read_text())["network_strength"] == 2.0
    assert (loras / "style.csv").read_text().splitlines()[0].startswith("step,epoch,loss_train,lr")
    with safe_open(str(loras / "style.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_training_mode"] == "ADDifT" and metadata["ss_network_strength"] == "2.0"
    assert metadata["ss_output_name"] == "style"
    assert lora_changes_pipeline(tiny_sd15, loras / "style.safetensors", "sd1") > 1e-3

    # Resumed after step 1, the run goes on with the reverse direction and ends bitwise equal.
    middle = only(only(tmp_path / "full" / "logs") / "ckpts", "modes-*gs00001")
    resumed = mode_config(tmp_path / "resumed", tiny_sd15, **dict(settings, resume_ckpt=str(middle)))
    assert run(resumed) == 0
    resumed_run = only(tmp_path / "resumed" / "runs")
    assert [e["direction"] for e in events_of(resumed_run)] == ["reverse", "forward", "reverse"]
    a = torch.load(run_folder / "state.pth", weights_only=True)
    b = torch.load(resumed_run / "state.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_addift_loss_uses_the_frozen_prediction_of_the_other_image(tmp_path, pair, tiny_sd15):
    """At step 0 the LoRA is zero: the loss is exactly the distance between the frozen model's
    predictions for the two noisy images under the same noise and timestep."""
    from difftrain.modes.addift import ADDifTTask

    original, target = pair
    task = built(ADDifTTask, mode_config(tmp_path, tiny_sd15, mode="ADDifT", original_image=str(original),
                                         target_image=str(target)))
    batch = task.collate([0], 0)
    task.before_batch(0, 0)
    loss = task.loss(task.model, batch, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    latents = batch["original"]["latents"]
    timesteps = task.objective.sample_timesteps(1, generator, latents.device)
    noise = task.objective.sample_noise(tuple(latents.shape), generator, latents.device)
    with torch.no_grad():
        on_original = task.model(task.objective.add_noise(latents, noise, timesteps), timesteps.float(),
                                 **batch["original"]["cond"])
        on_target = task.model(task.objective.add_noise(batch["target"]["latents"], noise, timesteps),
                               timesteps.float(), **batch["target"]["cond"])
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(on_original, on_target))
    assert loss > 0


@pytest.mark.parametrize("missing, message", [("original_image", "'original image' is empty"),
                                              ("target_image", "'target image' .*does not exist")])
def test_addift_refuses_a_missing_image_before_loading_the_model(tmp_path, pair, missing, message, monkeypatch):
    import difftrain.tasks.sd_parts.base_model as base_model

    monkeypatch.setattr(base_model, "load_sd", lambda *a, **k: pytest.fail("the model was loaded first"))
    original, target = pair
    images = {"original_image": str(original), "target_image": str(target)}
    images[missing] = "" if missing == "original_image" else str(tmp_path / "nope.png")
    with pytest.raises(ConfigError, match=message):
        run(mode_config(tmp_path, "no-model", mode="ADDifT", **images))


def test_multi_addift_on_sdxl_pairs_by_name_and_refuses_a_folder_without_pairs(tmp_path, tiny_sdxl):
    folder = tmp_path / "pairs"
    for name, colour in (("a", (200, 30, 30)), ("b", (30, 200, 30))):
        save_image(folder / f"{name}.png", colour)
        save_image(folder / f"{name}_after.png", tuple(255 - c for c in colour))
    save_image(folder / "lonely.png", (90, 90, 90))
    config = mode_config(tmp_path, tiny_sdxl, mode="Multi-ADDifT", data_root=str(folder), diff_target_name="_after",
                         batch_size=2, max_steps=2, save_lora_name="multi")
    from difftrain.modes.addift import ADDifTTask

    task = built(ADDifTTask, config)
    assert task.pair_count == 2
    assert [item.path.name for item in task.train_items] == ["a.png", "a_after.png", "b.png", "b_after.png"]
    assert run(config) == 0
    assert lora_changes_pipeline(tiny_sdxl, tmp_path / "loras" / "multi.safetensors", "sdxl") > 1e-3

    with pytest.raises(ConfigError, match="no image pairs"):
        run(mode_config(tmp_path, tiny_sdxl, mode="Multi-ADDifT", data_root=str(folder), diff_target_name="_before"))
    with pytest.raises(ConfigError, match="diff_target_name"):
        run(mode_config(tmp_path, tiny_sdxl, mode="Multi-ADDifT", data_root=str(folder)))


# ---- Difference ----------------------------------------------------------------------------------------

def test_difference_trains_a_copier_then_the_difference_with_2nd_pass_settings(tmp_path, pair, tiny_sd15):
    from difftrain.modes.difference import run_difference

    original, target = pair
    settings = dict(mode="Difference", original_image=str(original), target_image=str(target),
                    original_prompt="a cat", save_lora_name="diff", diff_save_1st_pass=True, run_name="d",
                    ckpt_every_n_steps=1, use_2nd_pass_settings=True,
                    second_pass={"max_steps": 3, "network_rank": 2, "lr": 1e-3})
    full = mode_config(tmp_path / "full", tiny_sd15, **settings)
    assert run_difference(full, start_of(full), train_once) == 0
    runs = tmp_path / "full" / "runs"
    first, second = only(runs, "d-pass1_*"), only(runs, "d-pass2_*")
    assert [(e["pass"], e["lr"]) for e in events_of(first)] == [(1, 2e-3)] * 4
    assert [(e["pass"], e["lr"]) for e in events_of(second)] == [(2, 1e-3)] * 3
    loras = tmp_path / "full" / "loras"
    assert ranks(loras / "diff_copy.safetensors") == {4} and ranks(loras / "diff.safetensors") == {2}
    assert lora_changes_pipeline(tiny_sd15, loras / "diff.safetensors", "sd1") > 1e-3
    # Pass 2 trains only the difference: the copier is applied, unchanged.
    pass2_logs = max((tmp_path / "full" / "logs").iterdir())
    pointer = json.loads((only(pass2_logs / "ckpts", "last-*") / "base_model.json").read_text())
    assert pointer["difference_pass"] == 2 and Path(pointer["copier"]).is_file()

    # Resuming inside pass 2 reloads the copier and finishes pass 2 exactly.
    middle = only(pass2_logs / "ckpts", "modes-*gs00001")
    resumed = mode_config(tmp_path / "resumed", tiny_sd15, **dict(settings, resume_ckpt=str(middle)))
    assert run_difference(resumed, start_of(resumed), train_once) == 0
    assert not list((tmp_path / "resumed" / "runs").glob("*pass1*"))
    a = torch.load(second / "state.pth", weights_only=True)
    b = torch.load(only(tmp_path / "resumed" / "runs", "d-pass2_*") / "state.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # diff_load_1st_pass skips pass 1 and uses that copier.
    loaded = mode_config(tmp_path / "loaded", tiny_sd15, **dict(settings, diff_load_1st_pass=str(loras / "diff_copy.safetensors"),
                                                                 use_2nd_pass_settings=False, max_steps=1))
    assert run_difference(loaded, start_of(loaded), train_once) == 0
    assert [p.name.split("_")[0] for p in (tmp_path / "loaded" / "runs").iterdir()] == ["d-pass2"]


def test_difference_mask_covers_where_the_images_differ(tmp_path, tiny_sd15, capsys, monkeypatch):
    from difftrain.modes.difference import DifferencePassTask, run_difference

    folder = tmp_path / "pair"
    original = save_image(folder / "original.png", (200, 200, 200))
    pixels = np.asarray(Image.open(original)).copy()
    pixels[:, :16] = (20, 30, 230)  # the change: the left quarter only
    target = folder / "target.png"
    Image.fromarray(pixels).save(target)
    config = mode_config(tmp_path, tiny_sd15, mode="Difference", original_image=str(original),
                         target_image=str(target), save_lora_name="masked", diff_use_diff_mask=True, max_steps=2)
    masks = []
    original_mask = DifferencePassTask.difference_mask

    def recording(self):
        masks.append(original_mask(self))
        return masks[-1]

    monkeypatch.setattr(DifferencePassTask, "difference_mask", recording)
    assert run_difference(config, start_of(config), train_once) == 0
    mask = masks[0][0, 0]
    width = mask.shape[-1]
    assert mask[:, : width // 8].min() == 1  # the changed columns count...
    assert mask[:, width // 2:].max() == 0  # ...the unchanged right half does not
    assert "difference mask: the loss covers" in capsys.readouterr().err
    assert (tmp_path / "loras" / "masked.safetensors").is_file()


def test_difference_1st_pass_only_and_through_the_engine(tmp_path, pair, tiny_sd15):
    original, target = pair
    config = mode_config(tmp_path, tiny_sd15, mode="Difference", original_image=str(original),
                         target_image=str(target), save_lora_name="copy-only", diff_1st_pass_only=True, max_steps=1)
    assert run(config) == 0
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == ["copy-only_copy.safetensors"]
    assert len(list((tmp_path / "runs").iterdir())) == 1


# ---- iLECO --------------------------------------------------------------------------------------------

def test_ileco_on_sdxl_changes_the_concept_and_needs_an_original_prompt(tmp_path, tiny_sdxl, monkeypatch):
    config = mode_config(tmp_path, tiny_sdxl, mode="iLECO", original_prompt="a cat", target_prompt="",
                         save_lora_name="erase", batch_size=2, max_steps=3)
    assert run(config) == 0
    assert lora_changes_pipeline(tiny_sdxl, tmp_path / "loras" / "erase.safetensors", "sdxl", "a cat") > 1e-3

    import difftrain.tasks.sd_parts.base_model as base_model

    monkeypatch.setattr(base_model, "load_sd", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(ConfigError, match="original prompt"):
        run(mode_config(tmp_path, tiny_sdxl, mode="iLECO", target_prompt="a dog"))


# ---- LoRA options ---------------------------------------------------------------------------------------

def test_block_names_follow_the_ldm_numbering():
    from difftrain.models.lora import unet_block_of

    sd1 = {"down_blocks.0.attentions.0.proj_in": "IN01", "down_blocks.0.downsamplers.0.conv": "IN03",
           "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k": "IN05", "down_blocks.3.resnets.1.conv1": "IN11",
           "mid_block.attentions.0.proj_out": "M00", "up_blocks.0.upsamplers.0.conv": "OUT02",
           "up_blocks.1.attentions.0.proj_in": "OUT03", "up_blocks.3.attentions.2.proj_out": "OUT11"}
    assert {name: unet_block_of(name, 2) for name in sd1} == sd1


def test_network_blocks_and_c3lier_select_layers_and_unknown_blocks_are_refused(tmp_path, tiny_sd15):
    from difftrain.tasks.sd import SDTask

    images = tmp_path / "images"
    save_image(images / "one.png", (100, 150, 200))
    base = dict(mode="LoRA", data_root=str(images))
    full = built(SDTask, mode_config(tmp_path, tiny_sd15, **base))
    everything = full.run_state_dict(full.model)
    chosen = built(SDTask, mode_config(tmp_path, tiny_sd15, **base, network_blocks=["IN01"]))
    keys = chosen.run_state_dict(chosen.model)
    assert keys and all(key.startswith("lora_unet_down_blocks_0_") for key in keys)
    assert len(keys) < len(everything)
    c3lier = built(SDTask, mode_config(tmp_path, tiny_sd15, **base, network_type="c3lier"))
    conv = {k: v for k, v in c3lier.run_state_dict(c3lier.model).items() if "resnets_0_conv1.lora_down" in k}
    assert conv and all(v.shape[0] == 4 for v in conv.values())  # conv rank 0: network_rank
    with pytest.raises(ConfigError, match="unknown block"):
        built(SDTask, mode_config(tmp_path, tiny_sd15, **base, network_blocks=["IN99"]))
    loha = built(SDTask, mode_config(tmp_path, tiny_sd15, **base, network_type="loha"))
    hada = loha.run_state_dict(loha.model)
    assert any(key.endswith("resnets_0_conv1.hada_w1_a") for key in hada)  # LyCORIS LoHa, LoCon's layers
    assert not any("lora_down" in key for key in hada)


def test_mode_presets_validate_and_pick_their_tasks():
    from difftrain.cli import config_from_argv
    from difftrain.modes.addift import ADDifTTask
    from difftrain.engine import mode_runner
    from difftrain.modes.difference import DifferencePassTask, run_difference
    from difftrain.modes.ileco import ILECOTask
    from difftrain.tasks.sd import SDTask

    expected = {"ADDifT_Style_SDXL": ADDifTTask, "ADDifT_Action_SD15": ADDifTTask, "Multi-ADDifT_SD15": ADDifTTask,
                "Difference_SD15": DifferencePassTask, "iLECO_SD15": ILECOTask, "LoRA_SD15": SDTask,
                "LoRA_SDXL": SDTask, "base_settings": SDTask}
    for name, task_class in expected.items():
        config = config_from_argv([str(REPO / "configs" / f"{name}.json")], "train_j")
        assert task_factory(config) is task_class, name
        assert mode_runner(config) is (run_difference if name.startswith("Difference") else None), name
    style = config_from_argv([str(REPO / "configs" / "ADDifT_Style_SDXL.json")], "train_j")
    assert (style.network_rank, style.network_alpha, style.max_steps, style.lr, style.min_timestep,
            style.max_timestep, style.network_strength, style.batch_size) == (4, 1, 30, 2e-4, 200, 400, 2, 1)
    difference = config_from_argv([str(REPO / "configs" / "Difference_SD15.json")], "train_j").for_second_pass()
    assert difference.network_rank == 4 and difference.lr == 1e-4


# ---- the seed's launcher examples -------------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path, tiny_sd15, tiny_sdxl, pair):
    """A working folder like a user's: configs/ (presets pointing at tiny images), input/, models/."""
    (tmp_path / "configs").mkdir()
    for name in ("ADDifT_Style_SDXL", "base_settings"):
        data = json.loads((REPO / "configs" / f"{name}.json").read_text())
        if "original image" in data:
            data.update({"original image": str(pair[0]), "target image": str(pair[1])})
        (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(data, indent=2))
    for index, colour in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200), (200, 200, 20)]):
        save_image(tmp_path / "input" / f"img{index}.png", colour)
        (tmp_path / "input" / f"img{index}.txt").write_text(f"picture {index}")
    models = tmp_path / "models"
    (models / "StableDiffusion").mkdir(parents=True)
    shutil.copy(single_file_path(tiny_sdxl), models / "StableDiffusion" / "sd_xl_base_1.0.safetensors")
    (models / "checkpoints").mkdir()
    shutil.copy(single_file_path(tiny_sd15), models / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    return tmp_path


def launch(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    small = ["--override", "image_size(height, width):64", "--override", "sample_inference_steps:2",
             "--temp-config-dir", str(workspace / "temp_configs")]
    return subprocess.run([sys.executable, str(REPO / "train_json_edit.py"), *args, *small], cwd=workspace, env=env,
                          capture_output=True, text=True, timeout=300)


def test_seed_addift_style_sdxl_example_runs_verbatim(workspace):
    result = launch(workspace, "configs/ADDifT_Style_SDXL.json", "--override", "train_learning_rate:0.0001",
                    "--override", "train_iterations:2")
    assert result.returncode == 0, result.stderr[-3000:]
    lora = only(workspace / "logs", "*/ADDifT_Style_SDXL.safetensors")  # no lora folder given: the log folder
    with safe_open(str(lora), framework="pt") as handle:
        assert handle.metadata()["ss_learning_rate"] == "0.0001"
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    assert events_of(only(workspace / "runs"))[-1]["step"] == 2


@pytest.mark.slow
def test_seed_base_settings_examples_run_verbatim(workspace):
    result = launch(workspace, "configs/base_settings.json", "--override", "train_batch_size:4",
                    "--override", "train_iterations:100", "--models-dir", str(workspace / "models"),
                    "--ckpt-dir", str(workspace / "models" / "checkpoints"), "--override", "train_iterations:2")
    assert result.returncode == 0, result.stderr[-3000:]
    (lora,) = (workspace / "models" / "lora").glob("*.safetensors")  # <models-dir>/lora
    for rate in ("0.0001", "0.00005"):
        again = launch(workspace, "configs/base_settings.json", "--override", f"train_learning_rate:{rate}",
                       "--override", "train_iterations:1", "--ckpt-dir", str(workspace / "models" / "checkpoints"))
        assert again.returncode == 0, again.stderr[-3000:]
    assert len(list((workspace / "logs").glob("*/*.safetensors"))) == 2  # one LoRA per run, none overwritten
