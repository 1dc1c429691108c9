"""TrainTrain's vocabulary (difftrain/vocab/traintrain.py) against TrainTrain's own shipped presets.

tests/real_files/traintrain/ holds the 8 presets of hako-mikan/sd-webui-traintrain byte for byte.
The fast tests here check the table and the translation; the end-to-end tests train each preset,
unchanged, through train_j.py and train_json_edit.py on the tiny stand-ins.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest

from difftrain.config import PER_PASS_NAMES
from difftrain.errors import ConfigError
from difftrain.vocab import traintrain
from difftrain.vocab.traintrain import BLOCKS, IMAGE_SIZE, SECOND_PASS, TABLE, load, translate

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "tests" / "real_files" / "traintrain"
PRESETS = sorted(path.name for path in REAL.glob("*.json"))
SCHEMA = frozenset({"models_dir", "tracker", "resume_ckpt"})


def git_blob_id(path: Path) -> str:
    content = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def settings_of(data: dict, where: str = "t.json") -> dict:
    return translate(data, where, SCHEMA).settings


def test_the_real_presets_are_the_eight_files_byte_for_byte():
    listed = dict(re.findall(r"^\| (\S+\.json) \| ([0-9a-f]{40}) \|$", (REAL / "README.md").read_text(), re.M))
    assert len(listed) == 8 and sorted(listed) == PRESETS
    for name, blob in listed.items():
        assert git_blob_id(REAL / name) == blob, f"{name} differs from TrainTrain's file"


def test_every_key_of_every_real_preset_is_in_the_table():
    for name in PRESETS:
        data = json.loads((REAL / name).read_text())
        keys = set(data) | set(data.get(SECOND_PASS) or {})
        assert keys <= set(TABLE.rows), (name, keys - set(TABLE.rows))


def test_every_row_has_a_status_and_words_and_per_pass_keys_land_on_per_pass_settings():
    assert len(TABLE) >= 75
    for row in TABLE.rows.values():
        assert row.meaning.strip(), row.name
    for key in traintrain.PER_PASS - traintrain._FIRST_PASS_ONLY_IN_SECTION:
        assert set(TABLE.row(key).targets) <= set(PER_PASS_NAMES) | {"use_2nd_pass_settings"}, key


def test_numbers_stored_as_strings_become_numbers():
    settings = settings_of({"train_iterations": "30", "train_batch_size": "1", "train_learning_rate": "5e-05",
                            "network_rank": "16.0", "network_alpha": "1", "train_snr_gamma": "5.0",
                            "train_seed": "-1", "train_min_timesteps": "200", "image_max_ratio": "2",
                            "network_strength": " 2.0 ", "image_buckets_step": "256", "save_per_steps": "0"})
    assert settings == {"max_steps": 30, "batch_size": 1, "lr": 5e-05, "network_rank": 16, "network_alpha": 1.0,
                        "min_snr_gamma": 5.0, "seed": -1, "min_timestep": 200, "image_max_ratio": 2.0,
                        "network_strength": 2.0, "image_buckets_step": 256, "save_per_steps": 0}
    assert isinstance(settings["network_rank"], int) and isinstance(settings["network_alpha"], float)
    for bad in ({"train_iterations": "thirty"}, {"network_rank": "16.5"}, {"train_learning_rate": "nan"}):
        with pytest.raises(ConfigError, match=re.escape(next(iter(bad)))):
            settings_of(bad)


def test_an_empty_string_is_not_set_and_none_is_the_models_own():
    settings = settings_of({"train_textencoder_learning_rate": "", "lora_data_directory": "", "logging_save_csv": "",
                            "vae": "None", "te": "", "train_lr_step_rules": ""})
    assert settings == {"vae": ""}
    config = load(None, data={"train_textencoder_learning_rate": "", "model": "m.safetensors"}, say_notes=False)
    assert config.text_encoder_lr == 0.0 and config.resume_ckpt == "m.safetensors"


def test_an_unknown_key_is_an_error_with_the_spelling_meant(tmp_path):
    with pytest.raises(ConfigError, match=re.escape("'image_size(height, width)'")):
        settings_of({"image_size(height,width)": "512"})
    with pytest.raises(ConfigError, match="'train_iterations'"):
        settings_of({SECOND_PASS: {"train_iteration": "5", "use_2nd_pass_settings": True}})
    with pytest.raises(ConfigError, match="'models_dir'"):  # our own names are suggested too
        settings_of({"model_dir": "x"})
    assert settings_of({"models_dir": "M", "tracker": "none"}) == {"models_dir": "M", "tracker": "none"}


def test_no_effect_keys_say_so_once_when_they_ask_for_something(caplog):
    translation = translate({"logging_verbose": True, "train_VAE_precision": "fp16", "network_train_text_encoder": False},
                            "t.json")
    assert translation.settings == {}
    assert [note.split("'")[1] for note in translation.notes] == ["logging_verbose", "train_VAE_precision"]
    assert translate({"logging_verbose": False}, "t.json").notes == []


def test_refused_values_give_the_reason():
    cases = {"sub_image_num": ("2", "sub buckets"), "image_disable_upscale": (True, "scaled up"),
             "train_fixed_timsteps_in_batch": (True, "own timestep"), "train_model_precision": ("int8", "int8"),
             BLOCKS: ([], "train no layer")}
    for key, (value, reason) in cases.items():
        with pytest.raises(ConfigError, match=re.escape(reason)):
            settings_of({key: value})
    for key, value in (("sub_image_num", "0"), ("image_disable_upscale", False), ("train_fixed_timsteps_in_batch", False)):
        assert settings_of({key: value}) == {}  # the value TrainTrain ships is what difftrain does


def test_image_size_is_one_side_or_height_comma_width():
    assert settings_of({IMAGE_SIZE: "768"}) == {"resolution": 768}
    assert settings_of({IMAGE_SIZE: "512, 768"}) == {"resolution": 512, "image_height_width": [512, 768]}
    config = load(None, data={IMAGE_SIZE: "512,768"})
    assert config.training_size() == (512, 768)
    from difftrain.tasks.sd_parts.data import buckets_for

    buckets = buckets_for(config)  # (width, height); the pixel budget is 512 x 768, both orientations
    assert (768, 512) in buckets and (512, 768) in buckets and max(w * h for w, h in buckets) == 512 * 768
    for bad in ("512x768", "512,768,1024", "500", ""):
        if bad:
            with pytest.raises(ConfigError, match=re.escape(IMAGE_SIZE)):
                settings_of({IMAGE_SIZE: bad})


def test_base_in_network_blocks_trains_the_text_encoder_in_lora_mode_only():
    with_base = {BLOCKS: ["BASE", "IN01", "out11"]}
    assert settings_of({"mode": "LoRA", **with_base}) == {
        "mode": "LoRA", "network_blocks": ["BASE", "IN01", "OUT11"], "network_train_text_encoder": True}
    assert settings_of({BLOCKS: ["IN01"]})["network_train_text_encoder"] is False
    translation = translate({"mode": "iLECO", **with_base}, "t.json")
    assert translation.settings["network_train_text_encoder"] is False
    assert any("BASE" in note and "iLECO" in note for note in translation.notes)


def test_the_switch_of_the_2nd_pass_is_the_one_inside_it():
    real = json.loads((REAL / "Difference_Use2ndPass.json").read_text())
    assert real["use_2nd_pass_settings"] is True and real[SECOND_PASS]["use_2nd_pass_settings"] is False
    off = translate(real, "Difference_Use2ndPass.json", SCHEMA)
    assert "second_pass" not in off.settings and "use_2nd_pass_settings" not in off.settings
    assert any("section's own use_2nd_pass_settings" in note for note in off.notes)

    real[SECOND_PASS]["use_2nd_pass_settings"] = True
    on = translate(real, "Difference_Use2ndPass.json", SCHEMA)
    assert on.settings["use_2nd_pass_settings"] is True
    second = on.settings["second_pass"]
    assert (second["network_rank"], second["lr"], second["max_steps"]) == (4, 1e-4, 500)
    assert "data_root" not in second and "save_lora_name" not in second and "resolution" not in second
    assert any("keep the first pass's values" in note and IMAGE_SIZE in note for note in on.notes)
    config = load(None, data={**real, "model": "m.safetensors"}, say_notes=False).for_second_pass()
    assert (config.network_rank, config.lr, config.network_alpha) == (4, 1e-4, 4.0)

    alone = translate({"use_2nd_pass_settings": True}, "t.json")
    assert alone.settings == {} and "top level" in alone.notes[0]


def test_ileco_ignores_network_resume_and_addift_starts_from_the_1st_pass_file():
    translation = translate({"mode": "iLECO", "network_resume": "old.safetensors"}, "t.json")
    assert "network_resume" not in translation.settings and "iLECO" in translation.notes[0]
    assert settings_of({"mode": "ADDifT", "diff_load_1st_pass": "copier"})["network_resume"] == "copier"


def test_an_empty_model_is_refused_unless_the_user_gives_one(capsys):
    with pytest.raises(ConfigError, match='"model" is empty'):
        load(REAL / "LoRA.json")
    config = load(REAL / "LoRA.json", flags={"resume_ckpt": "v1-5.safetensors"})
    assert config.resume_ckpt == "v1-5.safetensors" and config.mode == "LoRA" and config.optimizer == "adamw"


def test_the_readme_table_is_generated_from_the_table():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("<!-- traintrain-table:start -->\n", 1)[1].split("<!-- traintrain-table:end -->", 1)[0]
    assert section == traintrain.markdown(), "regenerate: python -m difftrain.vocab.traintrain --markdown"
    assert section.count("\n") == len(TABLE) + 2


def test_our_presets_use_traintrains_spellings():
    for name in ("LoRA_SD15", "LoRA_SDXL", "iLECO_SD15", "Difference_SD15", "ADDifT_Action_SD15", "ADDifT_Style_SDXL",
                 "Multi-ADDifT_SD15", "base_settings"):
        data = json.loads((REPO / "configs" / f"{name}.json").read_text())
        assert set(data) <= set(TABLE.rows) and IMAGE_SIZE in data and BLOCKS in data, name
        load(REPO / "configs" / f"{name}.json", say_notes=False)


# ---- each real preset, unchanged, trains through both doors ------------------------------------------

XL = {"ADDifT_Action_XL.json", "ADDifT_Style_XL.json"}


def _save_image(path: Path, colour) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.full((64, 64, 3), colour, np.uint8)
    pixels[:, :32] //= 2  # two halves, so the image has structure
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


def user_additions(name: str, folder: Path, model: Path) -> dict:
    """What a user adds to the preset, in TrainTrain's spellings: model, data, a small size, 2 steps."""
    data = json.loads((REAL / name).read_text())
    added = {"model": str(model), IMAGE_SIZE: "64", "train_iterations": "2"}
    if data["mode"] == "LoRA":
        for index, colour in enumerate([(200, 20, 20), (20, 200, 20)]):
            _save_image(folder / "input" / f"img{index}.png", colour)
            (folder / "input" / f"img{index}.txt").write_text(f"picture {index}")
        added["lora_data_directory"] = str(folder / "input")
    elif data["mode"] == "iLECO":
        added["original prompt"] = "a red square"
    else:
        added["original image"] = _save_image(folder / "pair" / "original.png", (210, 60, 40))
        added["target image"] = _save_image(folder / "pair" / "target.png", (40, 80, 220))
    return added


def written_lora(folder: Path, name: str) -> Path:
    stem = json.loads((REAL / name).read_text())["save_lora_name"]
    (found,) = [path for path in folder.rglob(f"{stem}.safetensors")]
    return found


@pytest.fixture
def model_for(request, tmp_path):
    def model(name: str) -> Path:
        from difftrain.tiny import single_file_path

        return single_file_path(request.getfixturevalue("tiny_sdxl" if name in XL else "tiny_sd15"))
    return model


# Each run is a whole training on CPU: the default set keeps one of each kind of data per door.
FAST_ON_TRAIN_J = {"LoRA.json", "iLECO.json", "ADDifT_Style_SD1.5.json"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in FAST_ON_TRAIN_J else [pytest.mark.slow])
                                  for name in PRESETS])
def test_each_real_preset_trains_through_train_j(name, tmp_path, model_for, monkeypatch, one_thread):
    from difftrain.cli import main
    from difftrain.vocab.traintrain import their_key

    added = user_additions(name, tmp_path, model_for(name))
    # train_j.py's flags are our setting names; the user's additions map onto them one to one.
    flags = []
    for key, value in added.items():
        flags += [f"--{traintrain.our_setting(key)}", value]
    assert their_key("max_steps") == "train_iterations"
    monkeypatch.chdir(tmp_path)
    assert main([str(REAL / name), *flags], door="train_j") == 0
    lora = written_lora(tmp_path, name)
    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as handle:
        assert any(key.startswith("lora_unet_") for key in handle.keys())


FAST_ON_LAUNCHER = {"LoRA.json", "ADDifT_Action_SD1.5.json"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[] if name in FAST_ON_LAUNCHER else [pytest.mark.slow])
                                  for name in PRESETS])
def test_each_real_preset_trains_through_the_launcher(name, tmp_path, model_for):
    import os
    import subprocess
    import sys

    added = user_additions(name, tmp_path, model_for(name))
    overrides = [part for key, value in added.items() for part in ("--override", f"{key}:{value}")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(REPO / "train_json_edit.py"), str(REAL / name), *overrides,
                             "--temp-config-dir", str(tmp_path / "temp_configs")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert written_lora(tmp_path, name).stat().st_size > 0
    listed = dict(re.findall(r"^\| (\S+\.json) \| ([0-9a-f]{40}) \|$", (REAL / "README.md").read_text(), re.M))
    assert git_blob_id(REAL / name) == listed[name]  # the launcher edited a temporary copy, not the preset
