"""train_json_edit.py end to end, with tests/standin_train.py standing in for the trainer.

Every seed example runs verbatim (only the base config paths point into tmp_path, and the stand-in
train script is named). The stand-in appends what it received to the file in STANDIN_RECORD.
"""

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difftrain import launch
from difftrain.launch import build_parser, parse_command_line
from difftrain.overrides import parse_override, parse_sweep

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "train_json_edit.py"
STANDIN = "tests/standin_train.py"
DEFAULT_TEMP_DIR = REPO / "temp_configs"

ADDIFT_STYLE_SDXL = {
    "mode": "ADDifT",
    "model": "sd_xl_base_1.0.safetensors",
    "network_rank": "4",
    "network_alpha": "1",
    "train_iterations": "30",
    "train_batch_size": "1",
    "train_learning_rate": "0.0002",
    "train_min_timesteps": "200",
    "train_max_timesteps": "400",
    "network_strength": "2",
    "original prompt": "",
    "target prompt": "",
}
BASE_SETTINGS = {
    "mode": "LoRA",
    "model": "model.safetensors",
    "train_learning_rate": "0.0001",
    "train_batch_size": 2,
    "train_iterations": 1000,
    "save_lora_name": "日本語の名前",
    "2nd pass": {"train_learning_rate": "0.0001", "train_iterations": 500},
}

# The seed's commands, exactly as printed there.
SEED_EXAMPLES = {
    "usage": "python train_json_edit.py configs/ADDifT_Style_SDXL.json "
             "--override train_learning_rate:0.0001",
    "model_dirs": "python train_json_edit.py configs/ADDifT_Style_SDXL.json "
                  "--models-dir /path/to/models --ckpt-dir /path/to/checkpoints",
    "lr_1": "python train_json_edit.py configs/base_settings.json "
            "--override train_learning_rate:0.0001",
    "lr_2": "python train_json_edit.py configs/base_settings.json "
            "--override train_learning_rate:0.00005",
    "lr_3": "python train_json_edit.py configs/base_settings.json "
            "--override train_learning_rate:0.00001",
    "batch_and_dirs": """python train_json_edit.py configs/base_settings.json \\
    --override train_batch_size:4 \\
    --override train_iterations:100 \\
    --models-dir /data/trained_models \\
    --ckpt-dir /data/trained_models/checkpoints""",
    "temp_dir": """python train_json_edit.py configs/base_settings.json \\
    --temp-config-dir /tmp/cv_configs \\
    --delete-temp-config""",
}


@pytest.fixture
def configs(tmp_path):
    """The seed's base files, in tmp_path (configs/ belongs to the presets)."""
    folder = tmp_path / "configs"
    folder.mkdir()
    for name, content in (("ADDifT_Style_SDXL.json", ADDIFT_STYLE_SDXL),
                          ("base_settings.json", BASE_SETTINGS)):
        (folder / name).write_text(json.dumps(content, indent=4, ensure_ascii=False),
                                   encoding="utf-8")
    return folder


@pytest.fixture
def record(tmp_path):
    return tmp_path / "record.jsonl"


def launch_cli(args, record, env=None, standin=True, **popen):
    """Run the launcher from the repo root as a user would; returns CompletedProcess."""
    # Named first, so that a '--' in args (everything after it is the child's) cannot swallow it.
    command = [sys.executable, str(LAUNCHER), *(["--train-script-path", STANDIN] if standin else []),
               *args]
    full_env = {**os.environ, "STANDIN_RECORD": str(record), "HF_HUB_OFFLINE": "1",
                **(env or {})}
    return subprocess.run(command, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=60, **popen)


def records(record):
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines()]


def seed_argv(name, configs):
    command = SEED_EXAMPLES[name].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train_json_edit.py"]
    return [arg.replace("configs/", f"{configs}/") for arg in argv[2:]]


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.fixture
def cleanup_default_temp_configs():
    """Seed examples without --temp-config-dir write beside the launcher; remove what we made."""
    made = []
    yield made
    for path in made:
        Path(path).unlink(missing_ok=True)


# --- the seed's examples ------------------------------------------------------------------------


@pytest.mark.parametrize("name, passthrough, expected", [
    ("usage", [], {"train_learning_rate": 0.0001}),
    ("model_dirs", ["--models-dir", "/path/to/models", "--ckpt-dir", "/path/to/checkpoints"], {}),
    ("lr_1", [], {"train_learning_rate": 0.0001}),
    ("lr_2", [], {"train_learning_rate": 0.00005}),
    ("lr_3", [], {"train_learning_rate": 0.00001}),
    ("batch_and_dirs", ["--models-dir", "/data/trained_models",
                        "--ckpt-dir", "/data/trained_models/checkpoints"],
     {"train_batch_size": 4, "train_iterations": 100}),
])
def test_seed_examples_verbatim(name, passthrough, expected, configs, record,
                                cleanup_default_temp_configs):
    argv = seed_argv(name, configs)
    base_file = Path(argv[0])
    base_bytes = base_file.read_bytes()
    result = launch_cli(argv, record)
    assert result.returncode == 0, result.stderr
    [received] = records(record)
    cleanup_default_temp_configs.append(received["config_path"])
    config_path = Path(received["argv"][0])
    assert received["argv"][1:] == passthrough
    assert config_path.parent == DEFAULT_TEMP_DIR
    assert config_path.name.startswith(base_file.stem + "_")
    assert config_path.exists(), "kept by default"
    base = json.loads(base_bytes)
    assert received["config"] == {**base, **expected}
    for key, value in expected.items():
        assert type(received["config"][key]) is type(value)
    assert base_file.read_bytes() == base_bytes, "the base JSON is never modified"
    assert received["python"] == sys.executable


def test_seed_temp_dir_example_deletes_its_config(configs, record):
    result = launch_cli(seed_argv("temp_dir", configs), record)
    assert result.returncode == 0, result.stderr
    [received] = records(record)
    config_path = Path(received["config_path"])
    assert config_path.parent == Path("/tmp/cv_configs")
    assert received["config"] == BASE_SETTINGS
    assert received["argv"] == [str(config_path)]
    assert not config_path.exists()


def test_seed_2nd_pass_example_on_a_preset_without_it_is_an_error(configs, record, tmp_path):
    base = configs / "ADDifT_Style_SDXL.json"
    result = launch_cli([str(base), "--override", "2nd pass.train_learning_rate:0.0001",
                         "--temp-config-dir", str(tmp_path / "temp")], record)
    assert_user_error(result, "'2nd pass.train_learning_rate'", "'2nd pass' does not exist",
                      "train_learning_rate", "+2nd pass.train_learning_rate:0.0001")
    assert not record.exists(), "nothing may be launched"
    assert not (tmp_path / "temp").exists()


# --- overrides on the command line ------------------------------------------------------------


def test_override_forms_and_the_printed_changes(configs, record, tmp_path):
    base = configs / "base_settings.json"
    result = launch_cli([
        str(base),
        "--override", "train_batch_size:4", "2nd pass.train_learning_rate:5e-5",
        "--override", "model:C:/models/x.safetensors", "train_batch_size:8",
        "--override", "+train_seed:42", "save_lora_name:'0001'",
        "--temp-config-dir", str(tmp_path / "temp"),
    ], record)
    assert result.returncode == 0, result.stderr
    [received] = records(record)
    config = received["config"]
    assert config["train_batch_size"] == 8
    assert config["2nd pass"] == {"train_learning_rate": 5e-5, "train_iterations": 500}
    assert config["model"] == "C:/models/x.safetensors"
    assert config["train_seed"] == 42
    assert config["save_lora_name"] == "0001"
    assert "train_batch_size: 2 -> 8" in result.stderr
    assert '2nd pass.train_learning_rate: "0.0001" -> 5e-05' in result.stderr
    assert "train_seed: (new key) -> 42" in result.stderr


def test_unknown_key_fails_without_launching_or_writing(configs, record, tmp_path):
    base = configs / "base_settings.json"
    before = base.read_bytes()
    result = launch_cli([str(base), "--override", "train_batch_size:4", "train_learnig_rate:1",
                         "--temp-config-dir", str(tmp_path / "temp")], record)
    assert_user_error(result, "unknown key 'train_learnig_rate'", str(base),
                      "Closest existing keys: train_learning_rate")
    assert not record.exists()
    assert not (tmp_path / "temp").exists()
    assert base.read_bytes() == before


@pytest.mark.parametrize("args, fragments", [
    (["--override", "train_batch_size=4"], ["train_batch_size:4"]),
    (["--override", "train_batch_size:[1,,2]"], ["cannot read", "in quotes"]),
    (["--sweep", "train_batch_size:4"], ["non-empty list"]),
    (["--sweep", "train_batch_size:[1,2]", "--override", "train_batch_size:3"], ["keep one"]),
    (["--runs", "0"], ["--runs must be at least 1"]),
    (["--jobs", "0"], ["--jobs must be at least 1"]),
])
def test_user_mistakes_exit_2_without_traceback(configs, record, tmp_path, args, fragments):
    result = launch_cli([str(configs / "base_settings.json"), *args,
                         "--temp-config-dir", str(tmp_path / "temp")], record)
    assert_user_error(result, *fragments)
    assert not record.exists()
    assert not (tmp_path / "temp").exists()


def test_malformed_base_json_names_line_column_and_backslash_fix(tmp_path, record):
    base = tmp_path / "win.json"
    base.write_text('{\n    "model": "C:\\Users\\me\\sd.safetensors"\n}\n', encoding="utf-8")
    result = launch_cli([str(base), "--temp-config-dir", str(tmp_path / "temp")], record)
    assert_user_error(result, str(base), "line 2, column", "\\\\", "'/'")
    assert not record.exists()


def test_missing_base_file_and_missing_train_script(tmp_path, record, configs):
    result = launch_cli([str(tmp_path / "nope.json")], record)
    assert_user_error(result, "nope.json")
    result = launch_cli([str(configs / "base_settings.json"), "--train-script-path",
                         str(tmp_path / "gone.py")], record, standin=False)
    assert_user_error(result, "train script not found", "gone.py")


# --- what the train script receives -----------------------------------------------------------


def test_passthrough_keeps_everything_else_in_order(configs, record, tmp_path):
    base = configs / "base_settings.json"
    result = launch_cli([
        "--models-dir", "/m", str(base), "--te-dir", "/te", "--override", "train_batch_size:3",
        "--vae-dir=/vae", "--unknown-flag", "--lora-dir", "/lora", "positional",
        "--temp-config-dir", str(tmp_path / "temp"), "--", "--override", "x:1", "--dry-run",
    ], record)
    assert result.returncode == 0, result.stderr
    [received] = records(record)
    assert received["argv"][1:] == [
        "--models-dir", "/m", "--te-dir", "/te", "--vae-dir=/vae", "--unknown-flag",
        "--lora-dir", "/lora", "positional", "--override", "x:1", "--dry-run"]
    assert received["config"]["train_batch_size"] == 3


def test_abbreviations_of_launcher_options_go_to_the_train_script():
    options, theirs = parse_command_line(["base.json", "--over", "a:1", "--delete", "--jobs=2"])
    assert theirs == ["--over", "a:1", "--delete"]
    assert options.json_path == "base.json"
    assert options.jobs == 2 and options.override == [] and not options.delete_temp_config


@pytest.mark.parametrize("argv, json_path, options, theirs", [
    # A train-script option written before the base JSON takes the bare word after it.
    (["--models-dir", "/m", "base.json", "--override", "a:1", "b:2", "--ckpt-dir", "/c"],
     "base.json", {"override": ["a:1", "b:2"]}, ["--models-dir", "/m", "--ckpt-dir", "/c"]),
    # ... unless it carries its value after '='.
    (["--vae-dir=/v", "base.json", "rest"], "base.json", {}, ["--vae-dir=/v", "rest"]),
    # The launcher's options anywhere, in both spellings; the rest keeps its order.
    (["base.json", "--te-dir", "/te", "--override=a:1", "--sweep", "b:[1,2]", "--runs", "2",
      "pos", "--delete-temp-config", "--x"],
     "base.json", {"override": ["a:1"], "sweep": ["b:[1,2]"], "runs": 2,
                   "delete_temp_config": True}, ["--te-dir", "/te", "pos", "--x"]),
    # After '--' everything is the train script's, the launcher's own option names included.
    (["base.json", "--jobs", "2", "--", "--jobs", "9", "--dry-run"],
     "base.json", {"jobs": 2, "dry_run": False}, ["--jobs", "9", "--dry-run"]),
    # '-' (standard input) is a bare word, not an option.
    (["-", "--override", "k:v"], "-", {"override": ["k:v"]}, []),
])
def test_command_line_split(argv, json_path, options, theirs):
    parsed, passthrough = parse_command_line(argv)
    assert parsed.json_path == json_path
    assert {name: getattr(parsed, name) for name in options} == options
    assert passthrough == theirs


@pytest.mark.parametrize("argv", [[], ["--models-dir", "/m"], ["--override", "a:1"],
                                  ["--", "base.json"]])
def test_missing_json_path_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_command_line(argv)
    assert stopped.value.code == 2
    assert "json_path" in capsys.readouterr().err


def test_help_names_json_path_and_every_option(capsys):
    with pytest.raises(SystemExit) as stopped:
        parse_command_line(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    for name in ("json_path", "--override", "--sweep", "--runs", "--jobs", "--dry-run",
                 "--train-script-path", "--temp-config-dir", "--delete-temp-config", "--slurm",
                 "--slurm-cluster"):
        assert name in text, name


def test_traintrain_keys_with_parentheses_and_spaces(tmp_path, record):
    """TrainTrain's own spellings are addressed as written; values keep their colons and
    backslashes (Windows paths)."""
    base = tmp_path / "LoRA.json"
    base.write_text(json.dumps({
        "mode": "LoRA", "image_size(height, width)": "512",
        "network_blocks(BASE = TextEncoder)": ["BASE", "IN01"], "original prompt": "",
        "model": "", "2nd pass": {"use_2nd_pass_settings": False, "train_iterations": "500"},
    }), encoding="utf-8")
    result = launch_cli([
        str(base), "--override", "image_size(height, width):640,768",
        "network_blocks(BASE = TextEncoder):[BASE, IN02, OUT11]",
        "original prompt:a photo: of a cat", r"model:C:\models\sd 1.5.safetensors",
        "2nd pass.use_2nd_pass_settings:true",
        "--temp-config-dir", str(tmp_path / "temp")], record)
    assert result.returncode == 0, result.stderr
    config = records(record)[0]["config"]
    assert config["image_size(height, width)"] == "640,768"
    assert config["network_blocks(BASE = TextEncoder)"] == ["BASE", "IN02", "OUT11"]
    assert config["original prompt"] == "a photo: of a cat"
    assert config["model"] == r"C:\models\sd 1.5.safetensors"
    assert config["2nd pass"] == {"use_2nd_pass_settings": True, "train_iterations": "500"}
    assert 'image_size(height, width): "512" -> "640,768"' in result.stderr
    typo = launch_cli([str(base), "--override", "image_size(height,width):640",
                       "--temp-config-dir", str(tmp_path / "temp")], record)
    assert_user_error(typo, "unknown key 'image_size(height,width)'",
                      "Closest existing keys: image_size(height, width)")


@pytest.fixture
def said():
    """Every line said through difftrain's logger while the test runs."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda entry: lines.append(entry.getMessage())
    logging.getLogger("difftrain").addHandler(handler)
    yield lines
    logging.getLogger("difftrain").removeHandler(handler)


def test_the_launcher_speaks_through_difftrains_logger(configs, tmp_path, said, capsys):
    """One handler added to the "difftrain" logger (a log file, a --quiet) gets every line."""
    status = launch.main([str(configs / "base_settings.json"),
                          "--train-script-path", str(REPO / STANDIN),
                          "--override", "train_batch_size:3", "--sweep",
                          "train_iterations:[1,2]", "--dry-run",
                          "--temp-config-dir", str(tmp_path / "temp")])
    assert status == 0
    text = "\n".join(said)
    assert "train_batch_size: 2 -> 3" in text
    assert text.count("would run ") == 2 and "train_iterations: 1000 -> 2" in text
    assert capsys.readouterr().out == "", "stdout is the train scripts' alone"


REAL_TRAINTRAIN = REPO / "tests" / "real_files" / "traintrain"


@pytest.mark.parametrize("preset", sorted(path.name for path in REAL_TRAINTRAIN.glob("*.json")))
def test_traintrain_presets_verbatim_take_their_own_keys_and_pass_train_j_checks(preset, said,
                                                                                 tmp_path):
    """TrainTrain's shipped presets (byte for byte), their own key spellings overridden, judged
    by train_j.py's schema in the launcher (a dry run: nothing is written or started)."""
    base = REAL_TRAINTRAIN / preset
    overrides = ["image_size(height, width):640,768",
                 "network_blocks(BASE = TextEncoder):[BASE, IN01]", "lr:0.0005"]
    if preset == "Difference_Use2ndPass.json":
        overrides.append("2nd pass.train_learning_rate:2e-4")
    status = launch.main([str(base), "--override", *overrides, "--dry-run",
                          "--temp-config-dir", str(tmp_path / "temp")])
    assert status == 0, said
    text = "\n".join(said)
    assert '  image_size(height, width): "512" -> "640,768"' in text
    assert '-> ["BASE", "IN01"]' in text
    assert "  train_learning_rate: " in text and "-> 0.0005" in text, "lr is the preset's key"
    assert "lr:" not in text.replace("train_learning_rate", "")
    assert not (tmp_path / "temp").exists()


def test_a_traintrain_key_with_parentheses_can_be_swept(said):
    status = launch.main([str(REAL_TRAINTRAIN / "LoRA.json"), "--sweep",
                          'image_size(height, width):["512,768", 640]', "--dry-run"])
    assert status == 0, said
    text = "\n".join(said)
    assert 'run 1/2 [image_size(height, width)="512,768"]' in text
    assert "run 2/2 [image_size(height, width)=640]" in text
    assert text.count("would run ") == 2


def test_a_bad_value_for_a_traintrain_key_names_that_key(said, capsys):
    with pytest.raises(SystemExit) as stopped:
        launch.main([str(REAL_TRAINTRAIN / "LoRA.json"), "--override",
                     "image_size(height, width):big", "--dry-run"])
    assert stopped.value.code == 2
    error = capsys.readouterr().err + "\n".join(said)
    assert "'image_size(height, width)'" in error and "'big'" in error


def test_temp_config_is_utf8_indented_json_and_kept(configs, record, tmp_path):
    temp = tmp_path / "temp"
    result = launch_cli([str(configs / "base_settings.json"), "--override", "mode:LoRA",
                         "--temp-config-dir", str(temp)], record)
    assert result.returncode == 0, result.stderr
    [written] = list(temp.iterdir())
    text = written.read_text(encoding="utf-8")
    assert "日本語の名前" in text, "ensure_ascii=False"
    assert text == json.dumps(BASE_SETTINGS, indent=2, ensure_ascii=False) + "\n"
    assert re.fullmatch(r"base_settings_\d{8}-\d{6}_\d+_[0-9a-f]{6}\.json", written.name)


def test_exit_code_of_the_train_script_is_the_launchers(configs, record, tmp_path):
    temp = tmp_path / "temp"
    result = launch_cli([str(configs / "base_settings.json"), "--temp-config-dir", str(temp),
                         "--delete-temp-config"], record, env={"STANDIN_EXIT_CODE": "3"})
    assert result.returncode == 3
    assert list(temp.iterdir()) == [], "deleted even though the run failed"


def test_dry_run_writes_and_runs_nothing(configs, record, tmp_path):
    temp = tmp_path / "temp"
    result = launch_cli([str(configs / "base_settings.json"), "--override", "train_batch_size:5",
                         "--dry-run", "--temp-config-dir", str(temp), "--models-dir", "/m"],
                        record)
    assert result.returncode == 0, result.stderr
    assert "train_batch_size: 2 -> 5" in result.stderr
    assert re.search(r"would run .*standin_train\.py .*base_settings_.*\.json --models-dir /m",
                     result.stderr)
    assert not record.exists()
    assert not temp.exists()


def test_temp_names_are_unique_within_one_second_and_one_process(monkeypatch, tmp_path):
    monkeypatch.setattr(launch.time, "strftime", lambda fmt: "20250101-000000")
    drawn = iter(["aaaaaa", "aaaaaa", *[f"{n:06x}" for n in range(100)]])
    monkeypatch.setattr(launch, "_random_hex", lambda: next(drawn))
    run = launch.PlannedRun(number=1, settings={}, repeat=1, config={"k": 1}, changes=[])
    plan = launch.Plan(base_path=Path("base.json"), train_script=Path("t.py"), temp_dir=tmp_path,
                       passthrough=[], runs=[run], repeats=1, jobs=1, delete_temp_config=False,
                       override_changes=[])
    paths = [launch.write_temp_config(plan, run) for _ in range(50)]
    assert len(set(paths)) == 50, "a clash on the random part must retry, never overwrite"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)
    assert all(json.loads(p.read_text()) == {"k": 1} for p in paths)


def test_concurrent_launches_get_distinct_configs(configs, record, tmp_path):
    temp = tmp_path / "temp"
    command = [sys.executable, str(LAUNCHER), str(configs / "base_settings.json"),
               "--train-script-path", STANDIN, "--temp-config-dir", str(temp)]
    env = {**os.environ, "STANDIN_RECORD": str(record)}
    processes = [subprocess.Popen(command + ["--override", f"train_batch_size:{n}"], cwd=REPO,
                                  env=env, stdout=subprocess.DEVNULL) for n in range(12)]
    assert [p.wait(timeout=60) for p in processes] == [0] * 12
    received = records(record)
    assert len({r["config_path"] for r in received}) == 12
    assert sorted(r["config"]["train_batch_size"] for r in received) == list(range(12))


# --- signals ------------------------------------------------------------------------------------


def _start_waiting_launch(configs, record, tmp_path, *extra):
    wait_file = tmp_path / "started"
    env = {**os.environ, "STANDIN_RECORD": str(record), "STANDIN_WAIT_FILE": str(wait_file)}
    process = subprocess.Popen(
        [sys.executable, str(LAUNCHER), str(configs / "base_settings.json"),
         "--train-script-path", STANDIN, "--temp-config-dir", str(tmp_path / "temp"),
         "--delete-temp-config", *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True)  # its own process group, like a shell job
    deadline = time.time() + 30
    while not wait_file.exists() and time.time() < deadline:
        time.sleep(0.02)
    assert wait_file.exists(), "the stand-in never started"
    return process


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_ctrl_c_reaches_the_child_and_the_launcher_waits_and_cleans_up(configs, record,
                                                                        tmp_path):
    process = _start_waiting_launch(configs, record, tmp_path)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
    _, stderr = process.communicate(timeout=30)
    [received] = records(record)
    assert received["signal"] == "SIGINT"
    assert not received["sigint_ignored"], "SIG_IGN would be inherited by the train script"
    assert received["config_exists_at_exit"], "deleted only after the child exited"
    assert process.returncode == 130
    assert "Traceback" not in stderr.decode()
    assert list((tmp_path / "temp").iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_to_the_launcher_is_forwarded(configs, record, tmp_path):
    process = _start_waiting_launch(configs, record, tmp_path)
    os.kill(process.pid, signal.SIGTERM)  # the launcher alone, as a job scheduler would
    process.communicate(timeout=30)
    [received] = records(record)
    assert received["signal"] == "SIGTERM"
    assert process.returncode == 143
    assert list((tmp_path / "temp").iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_ctrl_c_during_a_sweep_starts_no_further_runs(configs, record, tmp_path):
    process = _start_waiting_launch(configs, record, tmp_path,
                                    "--sweep", "train_batch_size:[1,2,3]")
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert [r["config"]["train_batch_size"] for r in records(record)] == [1]
    assert process.returncode == 130
    summary = stderr.decode().split("summary of 3 runs")[1]
    assert summary.count("not run") == 2


# --- sweeps and repeats -------------------------------------------------------------------------


def test_sweep_grid_runs_every_combination_and_summarises(configs, record, tmp_path):
    result = launch_cli([
        str(configs / "base_settings.json"),
        "--sweep", "train_learning_rate:[1e-4,2e-4]", "--sweep", "train_batch_size:[1,2]",
        "--temp-config-dir", str(tmp_path / "temp"), "--lora-dir", "/l",
    ], record, env={"STANDIN_RUN_FOLDER": "runs/crimson-cloud-4_6k7cjnx7"})
    assert result.returncode == 0, result.stderr
    received = records(record)
    combos = [(r["config"]["train_learning_rate"], r["config"]["train_batch_size"])
              for r in received]
    assert combos == [(1e-4, 1), (1e-4, 2), (2e-4, 1), (2e-4, 2)], "one after another, in order"
    assert len({r["config_path"] for r in received}) == 4
    assert all(r["argv"][1:] == ["--lora-dir", "/l"] for r in received)
    summary = result.stderr.split("summary of 4 runs")[1]
    assert summary.count("runs/crimson-cloud-4_6k7cjnx7") == 4
    assert "train_learning_rate=0.0002, train_batch_size=1" in summary


def test_sweep_exit_code_is_the_first_failure_and_the_table_shows_each(configs, record,
                                                                       tmp_path):
    result = launch_cli([
        str(configs / "base_settings.json"), "--sweep", "+exit_code:[0,3,5]",
        "--temp-config-dir", str(tmp_path / "temp"), "--delete-temp-config",
    ], record, env={"STANDIN_EXIT_CODE_KEY": "exit_code"})
    assert result.returncode == 3
    rows = [line.split() for line in result.stderr.split("summary of 3 runs")[1].splitlines()
            if line.strip() and line.split()[0].isdigit()]
    assert [(row[0], row[2]) for row in rows] == [("1", "0"), ("2", "3"), ("3", "5")]
    assert list((tmp_path / "temp").iterdir()) == []


def test_jobs_run_at_once_and_runs_repeat_the_same_config(configs, record, tmp_path):
    result = launch_cli([
        str(configs / "base_settings.json"), "--runs", "3", "--jobs", "3",
        "--override", "train_batch_size:7", "--temp-config-dir", str(tmp_path / "temp"),
    ], record, env={"STANDIN_SLEEP": "1.0"})
    assert result.returncode == 0, result.stderr
    received = records(record)
    assert len(received) == 3
    assert all(r["config"]["train_batch_size"] == 7 for r in received)
    assert len({r["config_path"] for r in received}) == 3
    latest_start = max(r["started"] for r in received)
    earliest_end = min(r["ended"] for r in received)
    assert latest_start < earliest_end, "the three runs overlapped"
    assert "repeat 3/3" in result.stderr


# --- lightness ----------------------------------------------------------------------------------

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "wandb")


def test_importing_the_launcher_imports_nothing_heavy():
    code = (
        "import sys; sys.path.insert(0, {repo!r}); import train_json_edit, difftrain.launch; "
        "print([m for m in {heavy!r} + ('pydantic',) if m in sys.modules])"
    ).format(repo=str(REPO), heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_and_a_validated_dry_run_import_nothing_heavy(configs):
    pytest.importorskip("difftrain.config", reason="difftrain.config (the schema) not written yet")
    code = (
        "import runpy, sys\n"
        "sys.argv = [{launcher!r}, {base!r}, '--override', 'train_batch_size:4', '--dry-run']\n"
        "try:\n    runpy.run_path({launcher!r}, run_name='__main__')\n"
        "except SystemExit as e:\n    print('exit', e.code)\n"
        "print([m for m in {heavy!r} if m in sys.modules])\n"
    ).format(launcher=str(LAUNCHER), base=str(configs / "base_settings.json"), heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    # The default train_j.py may not exist yet; either way the schema ran and nothing heavy loaded.
    assert result.stdout.strip().endswith("[]"), result.stdout + result.stderr
    if (REPO / "train_j.py").exists():
        assert "exit 0" in result.stdout, result.stdout + result.stderr
    assert "pydantic" not in result.stdout
    help_result = subprocess.run([sys.executable, str(LAUNCHER), "--help"], capture_output=True,
                                 text=True, timeout=60)
    assert help_result.returncode == 0
    assert "--override" in help_result.stdout and "--delete-temp-config" in help_result.stdout


# --- schema validation for our trainers --------------------------------------------------------


def test_wrong_type_for_our_trainer_fails_in_the_launcher(configs, record, tmp_path):
    pytest.importorskip("difftrain.config", reason="difftrain.config (the schema) not written yet")
    # train.py speaks EveryDream2's names: the override is ours, batch_size (a TrainTrain file's
    # train_batch_size is train_j.py's).
    for script, key in (([], "train_batch_size"), (["--train-script-path", "train_j.py"], "train_batch_size"),
                        (["--train-script-path", str(REPO / "train.py")], "batch_size")):
        base = configs / "base_settings.json"
        if key == "batch_size":
            base = tmp_path / "ours.json"
            base.write_text('{"batch_size": 2}')
        result = launch_cli([str(base), "--override",
                             f"{key}:four", "--temp-config-dir", str(tmp_path / "t"),
                             *script], record, standin=False)
        assert_user_error(result, "batch_size", "four")
        assert not (tmp_path / "t").exists()


def test_schema_names_reach_the_key_the_preset_uses():
    pytest.importorskip("difftrain.config", reason="difftrain.config (the schema) not written yet")

    base = {"train_learning_rate": "1e-4", "train_batch_size": 1,
            "2nd pass": {"train_learning_rate": "1e-4"}}
    resolved = launch._resolve_schema_names(
        [parse_override(text) for text in
         ("lr:2e-4", "2nd pass.lr:3e-4", "batch_size:4", "train_seed:7", "bogus:1")], base)
    assert [(o.key, o.create) for o in resolved] == [
        ("train_learning_rate", False), ("2nd pass.train_learning_rate", False),
        ("train_batch_size", False), ("train_seed", True), ("bogus", False)]


def test_our_trainers_get_the_config_their_way_and_schema_names_work(configs, record, tmp_path):
    for script in ("train_j.py", "train.py"):
        if not (REPO / script).exists():
            pytest.skip(f"{script} not written yet")
    result = launch_cli([str(configs / "base_settings.json"), "--override", "lr:2e-4",
                         "--dry-run", "--models-dir", "/m"], record, standin=False)
    assert result.returncode == 0, result.stderr
    assert 'train_learning_rate: "0.0001" -> 0.0002' in result.stderr
    assert re.search(r"train_j\.py \S+base_settings_\S+\.json --models-dir /m", result.stderr)
    edtrainer = tmp_path / "ed.json"
    edtrainer.write_text('{"lr": 0.001, "batch_size": 2}')
    result = launch_cli([str(edtrainer), "--override", "batch_size:4", "--dry-run",
                         "--train-script-path", "train.py"], record, standin=False)
    assert result.returncode == 0, result.stderr
    assert re.search(r"train\.py \S+ed_\S+\.json$", result.stderr.strip())


def test_stand_in_train_script_is_not_validated(configs, record, tmp_path):
    result = launch_cli([str(configs / "base_settings.json"), "--override",
                         "train_batch_size:four", "--temp-config-dir", str(tmp_path / "t")],
                        record)
    assert result.returncode == 0, result.stderr
    assert records(record)[0]["config"]["train_batch_size"] == "four"


# --- examples/ stay in step with the CLI -------------------------------------------------------

TRAIN_J_FLAGS = {"--models-dir", "--ckpt-dir", "--vae-dir", "--lora-dir", "--te-dir"}


def _launcher_commands(path):
    text = path.read_text(encoding="utf-8")
    continuation = "^" if path.suffix == ".bat" else "\\"
    joined = re.sub(re.escape(continuation) + r"\r?\n", " ", text)
    commands = []
    for line in joined.splitlines():
        if line.strip().startswith("python train_json_edit.py"):
            tokens = shlex.split(line, posix=path.suffix == ".sh")
            commands.append([token.strip('"') for token in tokens[2:]])
    return commands


def test_examples_use_only_flags_the_launcher_or_train_j_accepts():
    launcher_flags = {option for action in build_parser()._actions
                      for option in action.option_strings}
    scripts = sorted((REPO / "examples").glob("*.sh")) + sorted((REPO / "examples").glob("*.bat"))
    assert len(scripts) >= 10
    for script in scripts:
        commands = _launcher_commands(script)
        assert commands, f"{script.name} runs no launcher command"
        for argv in commands:
            flags = {token.split("=")[0] for token in argv if token.startswith("--")}
            unknown = flags - launcher_flags - TRAIN_J_FLAGS
            assert not unknown, f"{script.name} uses {unknown}"
            options, _ = parse_command_line(argv)  # raises SystemExit on a bad launcher arg
            assert options.json_path.startswith("configs")
            for override in options.override:
                parse_override(override)  # raises ConfigError on a malformed pair
            for sweep in options.sweep:
                parse_sweep(sweep)


def test_bat_and_sh_examples_match():
    for sh in sorted((REPO / "examples").glob("*.sh")):
        bat = sh.with_suffix(".bat")
        assert bat.exists(), f"{bat.name} is missing"
        assert b"\r\n" in bat.read_bytes(), "cmd.exe wants CRLF line ends"
        sh_flags = [[t for t in argv if t.startswith("--")] for argv in _launcher_commands(sh)]
        bat_flags = [[t for t in argv if t.startswith("--")] for argv in _launcher_commands(bat)]
        assert sh_flags == bat_flags, sh.name


def test_train_j_accepts_the_passthrough_flags_the_examples_use():
    train_j = REPO / "train_j.py"
    if not train_j.exists():
        pytest.skip("train_j.py not written yet")
    result = subprocess.run([sys.executable, str(train_j), "--help"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for flag in TRAIN_J_FLAGS:
        assert flag in result.stdout
