"""The one schema: loading JSON with good errors, aliases, both front doors, schema.json."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from difftrain.cli import config_from_argv, main
from difftrain.config import (ALIASES, FIELD_NAMES, Config, export_json_schema,
                              load_config, validate_config_dict)
from difftrain.errors import ConfigError
from difftrain.vocab import traintrain
from difftrain.vocab.traintrain import DEFAULTS as TRAINTRAIN_DEFAULTS
from difftrain.jsonfile import read_json_object

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str, name: str = "c.json") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "lr": 1e-4,\n  "batch_size": ,\n}')
    with pytest.raises(ConfigError) as error:
        read_json_object(path)
    message = str(error.value)
    assert str(path) in message and "line 3" in message and "column 17" in message


def test_single_backslash_gets_the_fix(tmp_path):
    path = write(tmp_path, '{"data_root": "x:\\mydata"}')
    with pytest.raises(ConfigError) as error:
        read_json_object(path)
    assert "\\\\" in str(error.value) and "forward slashes" in str(error.value)


DUPLICATED_LR = '{\n  "lr": 0.001,\n  "batch_size": 2,\n  "lr": 0.002\n}\n'


@pytest.mark.parametrize("door", ["train", "train_j"])
def test_both_front_doors_refuse_a_duplicated_key_naming_both_lines(tmp_path, door):
    path = write(tmp_path, DUPLICATED_LR)
    with pytest.raises(ConfigError) as error:
        config_from_argv([str(path)], door)
    message = str(error.value)
    assert str(path) in message and "'lr' is written twice" in message and "line 2 and line 4" in message


def test_the_launcher_refuses_the_same_duplicated_key_with_the_same_words(tmp_path):
    path = write(tmp_path, DUPLICATED_LR)
    result = subprocess.run([sys.executable, "train_json_edit.py", str(path), "--dry-run"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "'lr' is written twice in the same object (line 2 and line 4)" in result.stderr


def test_duplicated_key_lines_are_found_in_nested_objects_and_past_escapes(tmp_path):
    # A string holding a brace, a colon and an escaped quote comes first; the duplicate is in a nested
    # object, its second copy spelt with an escape; the 'lr' in the list and the outer one are not copies.
    path = write(tmp_path, '{"prompt": "a {\\"x\\": 1} cat",\n "2nd pass": {"lr": 1,\n  "x": [{"lr": 2}],\n'
                           '  "\\u006cr": 3},\n "lr": 4}')
    with pytest.raises(ConfigError, match=r"'lr' is written twice .*\(line 2 and line 4\)"):
        read_json_object(path)


@pytest.mark.parametrize("door", ["train", "train_j"])
def test_both_front_doors_accept_a_utf8_byte_order_mark(tmp_path, door):
    path = tmp_path / "notepad.json"
    path.write_bytes("\ufeff".encode() + '{"project_name": "café", "lr": 0.002}'.encode())
    config = config_from_argv([str(path)], door)
    assert (config.project_name, config.lr) == ("café", 0.002)


def test_second_pass_values_have_the_first_pass_bounds():
    with pytest.raises(ConfigError, match=r"'second_pass.lr'.*greater than 0"):
        validate_config_dict({"second_pass": {"lr": -1}}, "preset.json")
    # TrainTrain's section (translated by its vocabulary) is checked the same way, in its own words.
    with pytest.raises(ConfigError, match=r"'2nd pass.train_learning_rate'.*greater than 0"):
        traintrain.load(None, data={"2nd pass": {"train_learning_rate": -1, "use_2nd_pass_settings": True}},
                        say_notes=False, source="preset.json")
    with pytest.raises(ConfigError, match=r"in '2nd pass', min_timestep \(900\) must be below max_timestep \(800\)"):
        traintrain.load(None, data={"train_max_timesteps": 800, "2nd pass": {"train_min_timesteps": 900,
                                                                             "use_2nd_pass_settings": True}},
                        say_notes=False, source="preset.json")
    # Unused (the section's use_2nd_pass_settings off), the section's cross-key rule cannot matter.
    traintrain.load(None, data={"train_max_timesteps": 800, "2nd pass": {"train_min_timesteps": 900}}, say_notes=False)


def test_unknown_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, '{"max_epoch": 3}'))
    assert "unknown key 'max_epoch'" in str(error.value) and "'max_epochs'" in str(error.value)


def test_the_one_did_you_mean_ignores_case_and_keeps_the_candidates_spelling(tmp_path):
    from difftrain.errors import did_you_mean

    assert did_you_mean("adamw", ["AdamW", "SGD"]) == " Did you mean 'AdamW'?"
    assert did_you_mean("zzz", ["AdamW", "SGD"]) == ""
    with pytest.raises(ConfigError, match="unknown key 'Max_Epoch'. Did you mean 'max_epochs'"):
        load_config(write(tmp_path, '{"Max_Epoch": 3}'))


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError) as error:
        validate_config_dict({"batch_size": "four"}, "my.json")
    message = str(error.value)
    assert "my.json" in message and "'batch_size'" in message and "int" in message and "'four'" in message


def test_out_of_range_values_are_refused():
    for bad in ({"lr": -1}, {"batch_size": 0}, {"network_rank": 0}, {"kernel_size": 4}):
        with pytest.raises(ConfigError):
            validate_config_dict(bad)


def test_traintrain_presets_with_numbers_as_strings_and_their_names():
    config = traintrain.load(None, data={"train_learning_rate": "0.0002", "train_batch_size": "4",
                                         "model": "x.safetensors", "original prompt": "a cat",
                                         "model_v_pred": "true"})
    assert config.lr == 2e-4 and config.batch_size == 4 and config.resume_ckpt == "x.safetensors"
    assert config.original_prompt == "a cat" and config.resolved_prediction_type() == "v_prediction"


def test_alias_and_canonical_name_together_is_an_error():
    with pytest.raises(ConfigError, match="same setting 'lr'"):
        validate_config_dict({"lr": 1e-4, "learning_rate": 2e-4})
    with pytest.raises(ConfigError, match="same setting 'lr'"):  # TrainTrain's name and ours in one file
        traintrain.load(None, data={"lr": 1e-4, "train_learning_rate": 2e-4})


def test_second_pass_settings_apply_only_when_enabled(tmp_path):
    data = {"train_learning_rate": 1e-4, "2nd pass": {"train_learning_rate": "3e-4", "train_iterations": 7}}
    config = traintrain.load(None, data=data, say_notes=False)
    assert config.for_second_pass().lr == 1e-4
    data["2nd pass"]["use_2nd_pass_settings"] = True  # TrainTrain's switch is the section's own
    config = traintrain.load(None, data=data, say_notes=False)
    assert config.for_second_pass().lr == 3e-4 and config.for_second_pass().max_steps == 7
    with pytest.raises(ConfigError, match="2nd pass.*unknown key 'train_learing_rate'"):
        traintrain.load(None, data={"2nd pass": {"train_learing_rate": 1}}, source="preset.json")


def test_schema_json_is_in_sync_with_the_code():
    on_disk = json.loads((REPO / "configs" / "schema.json").read_text(encoding="utf-8"))
    assert on_disk == export_json_schema(), "regenerate: python -m difftrain.config > configs/schema.json"


def test_schema_lists_every_key_and_alias_with_help():
    properties = export_json_schema()["properties"]
    for name in (*FIELD_NAMES, *ALIASES):
        assert name in properties
    assert properties["learning_rate"]["description"].startswith("Alias of 'lr'")


def test_train_py_flags_come_from_the_schema_and_win_over_the_json(tmp_path):
    path = write(tmp_path, '{"lr": 0.001, "batch_size": 3, "task": "kolmogorov"}')
    config = config_from_argv(["--config", str(path), "--lr", "3e-6", "--max_epochs", "50",
                               "--hidden_channels", "8", "16", "--rectified_flow"], "train")
    assert (config.lr, config.batch_size, config.max_epochs) == (3e-6, 3, 50)
    assert config.hidden_channels == [8, 16] and config.rectified_flow is True
    assert config_from_argv([str(path), "--max-epochs", "2"], "train").max_epochs == 2


def test_every_key_is_a_flag_of_both_doors():
    from difftrain.cli import build_parser

    for door in ("train", "train_j"):
        destinations = {action.dest for action in build_parser(door)._actions}
        assert set(FIELD_NAMES) <= destinations


def test_train_j_applies_traintrain_defaults_for_missing_keys(tmp_path):
    path = write(tmp_path, '{"mode": "ADDifT", "train_batch_size": 1}')
    config = config_from_argv([str(path), "--models-dir", "/models"], "train_j")
    assert config.lr == TRAINTRAIN_DEFAULTS["lr"] and config.max_steps == 1000
    assert config.batch_size == 1 and config.models_dir == "/models"
    assert Config().lr != TRAINTRAIN_DEFAULTS["lr"]  # the engine's own default is EveryDream2's


@pytest.mark.parametrize("argv, expected", [
    (["--lr", "abc"], "'lr'"),
    (["--bogus_flag", "1"], "unrecognized arguments"),
    (["missing.json"], "missing.json"),
])
def test_front_door_mistakes_exit_2_without_traceback(argv, expected):
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("argv, words", [(["missing.json"], "'missing.json' does not exist"),
                                         (["--lr"], "expected one argument")])
def test_front_door_errors_are_records_of_the_difftrain_logger(argv, words):
    # A log file or a --quiet flag is then one handler or one level away (difftrain/log.py).
    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("difftrain").addHandler(catcher)
    try:
        with pytest.raises(SystemExit) as stop:
            main(argv, door="train")
    finally:
        logging.getLogger("difftrain").removeHandler(catcher)
    assert stop.value.code == 2
    assert [record.levelno for record in records] == [logging.ERROR]
    assert records[0].getMessage().startswith("train.py: error:") and words in records[0].getMessage()


class CountingValidator:
    """Stands in for Config's pydantic validator and counts every validation that goes through it."""

    def __init__(self, validator):
        self.validator = validator
        self.calls: list[str] = []

    def __getattr__(self, name):
        attribute = getattr(self.validator, name)
        if name.startswith("validate"):
            def counted(*args, **kwargs):
                self.calls.append(name)
                return attribute(*args, **kwargs)
            return counted
        return attribute


@pytest.mark.parametrize("door", ["train", "train_j"])
def test_a_config_is_validated_once_per_process(tmp_path, monkeypatch, door):
    # The front door validates; the engine, trainer, task and checkpoints only read what it built.
    from difftrain.data.kolmogorov import KolmogorovParams, ensure_dataset
    from tests.test_trainer import TINY_SIMULATION

    ensure_dataset(tmp_path / "data", KolmogorovParams(**TINY_SIMULATION), seed=0, progress=False)
    path = write(tmp_path, json.dumps({
        "task": "kolmogorov", "data_root": str(tmp_path / "data"), "simulation": TINY_SIMULATION, "window": 2,
        "embedding": 8, "hidden_channels": [4, 8], "max_epochs": 1, "max_steps": 2, "batch_size": 4, "sample_steps": 0,
        "sample_inference_steps": 2, "num_samples": 1, "tracker": "none", "logdir": str(tmp_path / "logs"),
        "runs_dir": str(tmp_path / "runs"), "ckpt_every_n_minutes": 0, "seed": -1}))
    counter = CountingValidator(Config.__pydantic_validator__)
    monkeypatch.setattr(Config, "__pydantic_validator__", counter)
    assert main([str(path), "--lr", "0.001"], door=door) == 0
    assert counter.calls == ["validate_python"]
    assert list((tmp_path / "runs").iterdir())  # it did train and save


@pytest.mark.parametrize("word, expected", [("yes", True), ("ON", True), ("1", True), ("no", False),
                                            ("off", False), ("False", False)])
def test_a_switch_flag_reads_the_same_true_and_false_words_as_the_vocabularies(word, expected):
    assert config_from_argv(["--gradient_checkpointing", word], "train").gradient_checkpointing is expected


def test_a_switch_flag_refuses_a_word_that_is_neither_true_nor_false(capsys):
    with pytest.raises(SystemExit):
        config_from_argv(["--gradient_checkpointing", "maybe"], "train")
    assert "expected true or false, got 'maybe'" in capsys.readouterr().err
