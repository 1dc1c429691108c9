"""A catalogue of user mistakes, each through a front door.

Every case must give one clear message on stderr (what, where, how to fix), exit code 2, no
traceback, and leave every file the user had exactly as it was, creating none. Most cases run
in-process through `difftrain.cli.main` (fast); the launcher's cases run it as a subprocess (it
imports no torch, so that is cheap).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difftrain.checkpoint import Progress, save_checkpoint
from difftrain.cli import main
from tests.test_trainer import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]


# --- the harness ------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """Every file under `roots`: path -> (mtime_ns, sha256); folders by path alone."""
    state = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                state[str(path)] = (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
            elif path.is_dir():
                state[str(path)] = (0, "folder")
    return state


def assert_user_error(argv, fragments, capsys, roots, door="train"):
    """Run a front door in-process; check exit 2, one message with `fragments`, nothing touched."""
    before = snapshot(*roots)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in argv], door=door)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err
    program = "train_j.py" if door == "train_j" else "train.py"
    assert err.count(f"{program}: error:") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    after = snapshot(*roots)
    assert after == before, {"added or changed": sorted(set(after.items()) - set(before.items())),
                             "removed or changed": sorted(set(before.items()) - set(after.items()))}
    return err


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    from difftrain.data.kolmogorov import KolmogorovParams, ensure_dataset

    folder = tmp_path_factory.mktemp("kolmogorov")
    ensure_dataset(folder, KolmogorovParams(**TINY_SIMULATION), seed=0, progress=False)
    return folder


def tiny_settings(tmp_path: Path, data: Path) -> dict:
    return {
        "task": "kolmogorov", "project_name": "tiny", "data_root": str(data),
        "simulation": TINY_SIMULATION, "window": 2, "embedding": 8, "hidden_channels": [4, 8],
        "hidden_blocks": [1, 1], "max_epochs": 1, "batch_size": 4, "lr": 1e-3,
        "sample_steps": 0, "sample_inference_steps": 2, "num_samples": 1, "tracker": "none",
        "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"), "ckpt_every_n_minutes": 0,
    }


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


# --- 1. the config file itself ------------------------------------------------------------------------
# (file content, extra flags, fragments the message must contain)

CONFIG_FILE_CASES = {
    "trailing comma": ('{\n  "lr": 0.001,\n}', [], ["c.json", "line 3", "column 1", "invalid JSON"]),
    "missing comma": ('{"lr": 0.001 "batch_size": 2}', [], ["line 1", "column 14"]),
    "single backslash": ('{"data_root": "C:\\data\\new"}', [], ["double backslashes", "forward slashes"]),
    "empty file": ("", [], ["c.json", "line 1, column 1", "invalid JSON"]),
    "top level is a list": ("[1, 2]", [], ["top level must be a JSON object"]),
    "not UTF-8": ('{"project_name": "caf\xe9"}'.encode("latin-1"), [], ["not UTF-8", "save it as UTF-8"]),
    "unknown key": ({"max_epoch": 3}, [], ["unknown key 'max_epoch'", "Did you mean 'max_epochs'"]),
    "2nd pass typo": ({"second_pas": {"lr": 1}}, [], ["unknown key 'second_pas'", "'second_pass'"]),
    "typo inside 2nd pass": ({"second_pass": {"learing_rate": 1}}, [],
                             ["'second_pass'", "unknown key 'learing_rate'", "learning_rate"]),
    "alias and name together": ({"lr": 1e-4, "learning_rate": 2e-4}, [], ["'learning_rate' and 'lr'", "keep one"]),
    "two aliases together": ({"epochs": 2, "max_epochs": 3}, [], ["same setting 'max_epochs'"]),
    "wrong type": ({"batch_size": "four"}, [], ["'batch_size'", "int", "'four'"]),
    "float for an int": ({"max_epochs": 2.5}, [], ["'max_epochs'", "2.5"]),
    "list for a number": ({"lr": [0.1]}, [], ["'lr'", "float"]),
    "string for a list": ({"hidden_channels": "4,8"}, [], ["'hidden_channels'", "list"]),
    "not a boolean": ({"rectified_flow": "maybe"}, [], ["'rectified_flow'", "'maybe'"]),
    "negative lr": ({"lr": -0.001}, [], ["'lr'", "greater than 0"]),
    "zero lr": ({"lr": 0}, [], ["'lr'", "greater than 0"]),
    "NaN lr": ('{"lr": NaN}', [], ["'lr'"]),
    "infinite lr": ('{"lr": Infinity}', [], ["'lr'", "finite"]),
    "batch 0": ({"batch_size": 0}, [], ["'batch_size'", "greater than or equal to 1"]),
    "rank 0": ({"network_rank": 0}, [], ["'network_rank'", "greater than or equal to 1"]),
    "negative save interval": ({"save_every_n_epochs": -1}, [], ["'save_every_n_epochs'"]),
    "negative step interval": ({"ckpt_every_n_steps": -5}, [], ["'ckpt_every_n_steps'"]),
    "negative minutes": ({"ckpt_every_n_minutes": -1}, [], ["'ckpt_every_n_minutes'"]),
    "accumulation 0": ({"gradient_accumulation_steps": 0}, [], ["'gradient_accumulation_steps'"]),
    "probability above 1": ({"flip_p": 1.5}, [], ["'flip_p'", "less than or equal to 1"]),
    "validation fraction 1": ({"validation_fraction": 1}, [], ["'validation_fraction'"]),
    "timestep above 1000": ({"max_timestep": 1001}, [], ["'max_timestep'"]),
    "timesteps reversed": ({"min_timestep": 600, "max_timestep": 400}, [], ["min_timestep", "max_timestep"]),
    "unknown scheduler": ({"lr_scheduler": "cosinus"}, [], ["'lr_scheduler'", "'cosine'"]),
    "unknown task": ({"task": "kolmo"}, [], ["'task'", "'kolmogorov'"]),
    "mode in the wrong case": ({"mode": "lora"}, [], ["'mode'", "'LoRA'"]),
    "unknown precision": ({"mixed_precision": "fp8"}, [], ["'mixed_precision'"]),
    "kernel size even": ({"kernel_size": 4}, [], ["'kernel_size'", "odd"]),
    "resolution not a class": ({"resolution": 500}, [], ["'resolution'", "multiple of 8"]),
    "hidden channels and blocks differ": ({"hidden_channels": [4, 8, 16], "hidden_blocks": [1, 1]}, [],
                                          ["hidden_channels", "hidden_blocks", "same length"]),
    "window longer than the trajectories": ({"task": "kolmogorov", "window": 9,
                                            "simulation": {"keep": 6, "steps": 8}}, [],
                                           ["window 9", "keep"]),
    "keep more than simulated": ({"simulation": {"steps": 8, "keep": 64}}, [], ["keep", "steps"]),
    "unknown simulation key": ({"simulation": {"sizee": 16}}, [], ["'simulation.sizee'", "unknown key"]),
    "simulation too small": ({"simulation": {"trajectories": 3}}, [], ["'simulation.trajectories'"]),
    "empty project name": ({"project_name": ""}, [], ["'project_name'"]),
    "empty hidden channels": ({"hidden_channels": []}, [], ["'hidden_channels'"]),
    "NUL character in a path": ({"logdir": "logs\u0000x"}, [], ["'logdir'", "NUL character"]),
}


@pytest.mark.parametrize("content, flags, fragments", CONFIG_FILE_CASES.values(), ids=CONFIG_FILE_CASES.keys())
def test_config_file_mistakes(content, flags, fragments, tmp_path, capsys):
    path = write(tmp_path / "c.json", content)
    assert_user_error([path, *flags], fragments, capsys, [tmp_path])


# --- 2. the command line -----------------------------------------------------------------------------

COMMAND_LINE_CASES = {
    "flag value of the wrong type": (["--lr", "abc"], ["'lr'", "'abc'"]),
    "unknown flag": (["--learning-rte", "1"], ["unrecognized arguments", "--help"]),
    "flag without its value": (["--max_epochs"], ["--max_epochs", "expected one argument"]),
    "bad boolean": (["--rectified_flow", "perhaps"], ["expected true or false", "perhaps"]),
    "list of words for ints": (["--hidden_channels", "a", "b"], ["'hidden_channels"]),
    "object flag not JSON": (["--simulation", "{size: 16"], ["--simulation expects a JSON object"]),
    "object flag not an object": (["--simulation", "[16]"], ["--simulation expects a JSON object"]),
    "missing config file": (["nowhere.json"], ["nowhere.json", "does not exist"]),
    "config is a folder": (["."], ["is a folder, not a JSON config file"]),
}


@pytest.mark.parametrize("argv, fragments", COMMAND_LINE_CASES.values(), ids=COMMAND_LINE_CASES.keys())
def test_command_line_mistakes(argv, fragments, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_user_error(argv, fragments, capsys, [tmp_path])


def test_two_configs_at_once(tmp_path, capsys):
    a, b = write(tmp_path / "a.json", {}), write(tmp_path / "b.json", {})
    assert_user_error([a, "--config", b], ["two configs given", "pass one"], capsys, [tmp_path])


def test_train_j_preset_with_an_unknown_key(tmp_path, capsys):
    path = write(tmp_path / "preset.json", {"mode": "ADDifT", "train_learing_rate": "0.0002"})
    assert_user_error([path], ["unknown key 'train_learing_rate'", "train_learning_rate"], capsys, [tmp_path],
                      door="train_j")


def test_train_j_without_a_config(tmp_path, capsys):
    assert_user_error([], ["CONFIG.json", "required"], capsys, [tmp_path], door="train_j")


# --- 3. files and folders the config names (Kolmogorov task) ----------------------------------------

def test_findlast_with_nothing_to_find(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", tiny_settings(tmp_path, field_data))
    assert_user_error([path, "--resume_ckpt", "findlast"],
                      ["findlast", "no complete checkpoint of project 'tiny'", "Train once first"],
                      capsys, [tmp_path, field_data])


def test_resume_folder_that_is_not_a_checkpoint(tmp_path, field_data, capsys):
    (tmp_path / "somefolder").mkdir()
    path = write(tmp_path / "c.json", tiny_settings(tmp_path, field_data))
    assert_user_error([path, "--resume_ckpt", tmp_path / "somefolder"], ["is not a checkpoint folder", "findlast"],
                      capsys, [tmp_path, field_data])


def _checkpoint_of(tmp_path: Path, task: str, project: str = "other", hidden=(4, 8)) -> Path:
    """A complete checkpoint folder as another run would have left it."""
    from difftrain.models.score import ScoreUNet

    network = ScoreUNet(window=2, embedding=8, hidden_channels=list(hidden), hidden_blocks=[1] * len(hidden),
                        kernel_size=3, activation="SiLU", forcing_wavenumber=4)
    from safetensors.torch import save_file

    progress = Progress(global_step=3, project_name=project, task=task, seed=555)
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "generator": torch.zeros(2),
             "cpu_rng": torch.get_rng_state()}
    return save_checkpoint(tmp_path / "otherlogs" / f"{project}20250101-000000" / "ckpts", f"{project}-ep00-gs00003",
                           progress, state,
                           lambda folder: save_file(network.state_dict(), str(folder / "model.safetensors")),
                           {"task": task})


def test_resume_from_a_checkpoint_of_another_task(tmp_path, field_data, capsys):
    folder = _checkpoint_of(tmp_path, task="sd")
    path = write(tmp_path / "c.json", tiny_settings(tmp_path, field_data))
    assert_user_error([path, "--resume_ckpt", folder], ["made by a 'sd' run", "trains 'kolmogorov'"],
                      capsys, [tmp_path, field_data])


def test_resume_from_a_checkpoint_whose_network_has_another_shape(tmp_path, field_data, capsys):
    folder = _checkpoint_of(tmp_path, task="kolmogorov", project="tiny", hidden=(8, 16))
    path = write(tmp_path / "c.json", tiny_settings(tmp_path, field_data))
    assert_user_error([path, "--resume_ckpt", folder], [str(folder), "does not fit", "config.json"],
                      capsys, [tmp_path, field_data])


def test_resume_from_a_truncated_checkpoint(tmp_path, field_data, capsys):
    folder = _checkpoint_of(tmp_path, task="kolmogorov", project="tiny")
    model = folder / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    path = write(tmp_path / "c.json", tiny_settings(tmp_path, field_data))
    assert_user_error([path, "--resume_ckpt", folder], [str(folder), "incomplete or damaged", "truncated"],
                      capsys, [tmp_path, field_data])


def test_logdir_under_a_regular_file(tmp_path, field_data, capsys):
    # Tests run as root, where chmod cannot make a folder unwritable; a file in the path can.
    write(tmp_path / "somefile", "not a folder")
    settings = dict(tiny_settings(tmp_path, field_data), logdir=str(tmp_path / "somefile" / "logs"))
    path = write(tmp_path / "c.json", settings)
    assert_user_error([path], ["logdir", "somefile", "not a folder"], capsys, [tmp_path, field_data])


def test_runs_dir_under_a_regular_file(tmp_path, field_data, capsys):
    write(tmp_path / "somefile", "not a folder")
    settings = dict(tiny_settings(tmp_path, field_data), runs_dir=str(tmp_path / "somefile" / "runs"))
    path = write(tmp_path / "c.json", settings)
    assert_user_error([path], ["runs_dir", "somefile", "not a folder"], capsys, [tmp_path, field_data])


@pytest.mark.skipif(os.name == "nt" or os.geteuid() == 0, reason="root writes through chmod; covered above")
def test_unwritable_logdir(tmp_path, field_data, capsys):
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked").chmod(0o500)
    settings = dict(tiny_settings(tmp_path, field_data), logdir=str(tmp_path / "locked" / "logs"))
    path = write(tmp_path / "c.json", settings)
    try:
        assert_user_error([path], ["logdir", "not writable"], capsys, [tmp_path, field_data])
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_unknown_optimizer(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), optimizer="Adamm"))
    assert_user_error([path], ["optimizer 'Adamm' is unknown", "AdamW"], capsys, [tmp_path, field_data])


def test_optimizer_settings_that_do_not_fit(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), optimizer_settings="momentum=0.9"))
    assert_user_error([path], ["optimizer_settings 'momentum=0.9'", "AdamW"], capsys, [tmp_path, field_data])


def test_malformed_optimizer_settings(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), optimizer_settings="betas"))
    assert_user_error([path], ["optimizer_settings", "key=value"], capsys, [tmp_path, field_data])


def test_unknown_scheduler_setting(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), lr_scheduler_settings="cycles=2"))
    assert_user_error([path], ["lr_scheduler_settings", "cycles", "num_cycles"], capsys, [tmp_path, field_data])


def test_reflow_without_rectified_flow(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), reflow_steps=1))
    assert_user_error([path], ["reflow_steps needs rectified_flow"], capsys, [tmp_path, field_data])


def test_batch_larger_than_the_data(tmp_path, field_data, capsys):
    path = write(tmp_path / "c.json", dict(tiny_settings(tmp_path, field_data), batch_size=1000))
    assert_user_error([path], ["batch_size 1000", "larger than the training set"], capsys, [tmp_path, field_data])


def test_an_existing_run_name_gets_a_new_folder_and_the_old_one_is_untouched(tmp_path, field_data):
    settings = dict(tiny_settings(tmp_path, field_data), run_name="my-run")
    old = tmp_path / "runs" / "my-run_abcdefgh"
    write(old / "config.json", {"mine": True})
    write(old / "state.pth", b"my weights")
    before = snapshot(old)
    assert main([str(write(tmp_path / "c.json", settings))]) == 0
    assert snapshot(old) == before
    assert len(list((tmp_path / "runs").glob("my-run_*"))) == 2


# --- 4. Stable Diffusion inputs: images, captions, models ------------------------------------------------

@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        pixels = np.full((64, 64, 3), 60 * index + 40, np.uint8)
        Image.fromarray(pixels).save(folder / f"img{index}.png")
        (folder / f"img{index}.txt").write_text("a cat", encoding="utf-8")
    return folder


@pytest.fixture
def model_file(tmp_path, tiny_sd15) -> Path:
    from difftrain.tiny import single_file_path

    target = tmp_path / "models" / "tiny15.safetensors"
    target.parent.mkdir()
    target.write_bytes(single_file_path(tiny_sd15).read_bytes())
    return target


def sd_settings(tmp_path: Path, model: Path, images: Path, **changes) -> dict:
    settings = {"task": "sd", "mode": "Full", "resume_ckpt": str(model), "data_root": str(images),
                "resolution": 64, "max_epochs": 1, "batch_size": 1, "lr": 1e-4, "sample_steps": 0,
                "tracker": "none", "logdir": str(tmp_path / "logs"), "runs_dir": str(tmp_path / "runs"),
                "ckpt_every_n_minutes": 0, "project_name": "sdbad"}
    settings.update(changes)
    return settings


def sd_case(tmp_path, model_file, image_folder, capsys, fragments, **changes):
    path = write(tmp_path / "c.json", sd_settings(tmp_path, model_file, image_folder, **changes))
    return assert_user_error([path], fragments, capsys, [tmp_path])


def test_missing_data_folder(tmp_path, model_file, image_folder, capsys):
    sd_case(tmp_path, model_file, image_folder, capsys, ["data_root", "does not exist", "nowhere"],
            data_root=str(tmp_path / "nowhere"))


def test_empty_data_folder(tmp_path, model_file, image_folder, capsys):
    (tmp_path / "empty").mkdir()
    sd_case(tmp_path, model_file, image_folder, capsys, ["contains no images", "empty"],
            data_root=str(tmp_path / "empty"))


def test_data_root_is_a_file(tmp_path, model_file, image_folder, capsys):
    sd_case(tmp_path, model_file, image_folder, capsys, ["is a file, not a folder"],
            data_root=str(image_folder / "img0.png"))


def test_only_corrupt_and_zero_byte_images(tmp_path, model_file, image_folder, capsys):
    broken = tmp_path / "broken"
    write(broken / "zero.png", b"")
    write(broken / "cut.png", (image_folder / "img0.png").read_bytes()[:40])
    write(broken / "text.jpg", b"this is no jpeg")
    sd_case(tmp_path, model_file, image_folder, capsys, ["none of the 3 image(s)", "could be read"],
            data_root=str(broken))


def test_caption_file_in_a_wrong_encoding(tmp_path, model_file, image_folder, capsys):
    (image_folder / "img1.txt").write_bytes("une crème brûlée".encode("cp1252"))  # Windows' Notepad of old
    sd_case(tmp_path, model_file, image_folder, capsys, ["not UTF-8", "img1.txt", "UTF-8 encoding"])


def test_missing_model(tmp_path, model_file, image_folder, capsys):
    sd_case(tmp_path, model_file, image_folder, capsys, ["no_such_model"], resume_ckpt="no_such_model")


def test_model_of_the_wrong_family(tmp_path, model_file, image_folder, capsys):
    sd_case(tmp_path, model_file, image_folder, capsys, ["sdxl"], family="sdxl")


def test_truncated_safetensors_model(tmp_path, model_file, image_folder, capsys):
    model_file.write_bytes(model_file.read_bytes()[:4096])
    sd_case(tmp_path, model_file, image_folder, capsys, ["truncated"])


def test_zero_byte_model(tmp_path, model_file, image_folder, capsys):
    model_file.write_bytes(b"")
    sd_case(tmp_path, model_file, image_folder, capsys, [str(model_file)])


def test_rectified_flow_on_a_base_that_is_not_v_prediction(tmp_path, model_file, image_folder, capsys):
    sd_case(tmp_path, model_file, image_folder, capsys, ["rectified_flow", "v"], rectified_flow=True)


def test_a_kolmogorov_checkpoint_used_as_a_stable_diffusion_model(tmp_path, model_file, image_folder, capsys):
    folder = _checkpoint_of(tmp_path, task="kolmogorov", project="sdbad")
    sd_case(tmp_path, model_file, image_folder, capsys, ["holds no Stable Diffusion model", "another task"],
            resume_ckpt=str(folder))


def test_cache_dir_under_a_regular_file(tmp_path, model_file, image_folder, capsys):
    write(tmp_path / "somefile", "x")
    sd_case(tmp_path, model_file, image_folder, capsys, ["cache_dir", "somefile"],
            cache_dir=str(tmp_path / "somefile" / "cache"))


# --- 5. the launcher's own mistakes (subprocess: it imports no torch) -------------------------------------

LAUNCHER_CASES = {
    "override without a colon": (["--override", "lr"], ["KEY:VALUE"]),
    "override of an unknown key": (["--override", "lrr:0.1"], ["lrr", "lr"]),
    "override with a broken list": (["--override", "hidden_channels:[4, 8"], ["hidden_channels"]),
    "override of the wrong type": (["--override", "batch_size:four"], ["batch_size", "four"]),
    "sweep that is not a list": (["--sweep", "lr:0.1"], ["non-empty list"]),
}


@pytest.mark.parametrize("args, fragments", LAUNCHER_CASES.values(), ids=LAUNCHER_CASES.keys())
def test_launcher_mistakes(args, fragments, tmp_path):
    base = write(tmp_path / "base.json", {"task": "kolmogorov", "lr": 0.001, "batch_size": 2,
                                          "hidden_channels": [4, 8]})
    before = snapshot(tmp_path)
    result = subprocess.run([sys.executable, "train_json_edit.py", str(base), "--train-script-path", "train.py",
                             "--temp-config-dir", str(tmp_path / "temp"), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert snapshot(tmp_path) == before


def test_a_malformed_config_through_the_real_front_door(tmp_path):
    """One case end to end as a user meets it: exit status and stderr of the process."""
    path = write(tmp_path / "c.json", '{"data_root": "C:\\mydata"}')
    result = subprocess.run([sys.executable, "train.py", "--config", str(path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("train.py: error:") and "forward slashes" in result.stderr
