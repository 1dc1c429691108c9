"""Slurm: the launcher's job arrays (through submitit) and the multi-node accelerate command.

No cluster here: the array runs through submitit's LocalExecutor, and for the real SlurmExecutor
fake `sbatch` / `srun` programs on PATH capture the script submitit submits.
"""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from difftrain.errors import ConfigError
from difftrain.slurm import (ArrayTask, SlurmSettings, accelerate_launch_command, expand_nodelist,
                             parse_memory_gb, sbatch_script, time_in_minutes)

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "train_json_edit.py"
STANDIN = str(REPO / "tests" / "standin_train.py")


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"lr": 0.001, "exit_code": 0, "name": "x"}), encoding="utf-8")
    return path


def launcher(tmp_path, base, *args, env=None, timeout=120):
    command = [sys.executable, str(LAUNCHER), str(base), "--train-script-path", STANDIN,
               "--temp-config-dir", str(tmp_path / "temp"), *args]
    environment = {**os.environ, "STANDIN_RECORD": str(tmp_path / "record.jsonl"), **(env or {})}
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                          timeout=timeout)


def records(tmp_path):
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---- dry run and the real sbatch script ------------------------------------------------------


RESOURCES = ["--slurm-partition", "gpu", "--slurm-gpus", "2", "--slurm-cpus", "16", "--slurm-mem", "64G",
             "--slurm-time", "1-00:00:00", "--slurm-account", "lab", "--slurm-qos", "normal"]


def test_dry_run_prints_one_array_with_the_resources_and_writes_nothing(tmp_path, base):
    result = launcher(tmp_path, base, "--sweep", "lr:[0.1,0.2,0.3]", "--runs", "2", "--jobs", "4",
                      "--slurm-dry-run", "--slurm-folder", str(tmp_path / "jobs"), *RESOURCES)
    assert result.returncode == 0, result.stderr
    out = result.stderr
    for line in ("#SBATCH --array=0-5%4", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=2",
                 "#SBATCH --cpus-per-task=16", "#SBATCH --mem=64GB", "#SBATCH --time=1440",
                 "#SBATCH --account=lab", "#SBATCH --qos=normal", "#SBATCH --signal=USR2@90",
                 f"#SBATCH --output={tmp_path / 'jobs'}/%A_%a_0_log.out"):
        assert line in out.splitlines(), line
    assert out.count("#SBATCH --array") == 1  # six runs, one array
    assert [line.split()[2] for line in out.splitlines() if " would run " in line] == \
        ["0", "1", "2", "3", "4", "5"]
    assert f"{STANDIN} {tmp_path / 'temp'}" in out  # each task: the train script on its config
    assert not (tmp_path / "temp").exists() and not (tmp_path / "jobs").exists()
    assert records(tmp_path) == []


def test_the_dry_run_script_is_the_one_submitit_submits(tmp_path, base):
    """Fake sbatch/srun: submitit's SlurmExecutor submits for real, and we compare scripts."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    captured = tmp_path / "submitted.sh"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {captured}\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for program in bin_dir.iterdir():
        program.chmod(0o755)
    folder = tmp_path / "jobs"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = ["--sweep", "lr:[0.1,0.2,0.3]", "--slurm-folder", str(folder), *RESOURCES]
    submitted = launcher(tmp_path, base, "--slurm", *args, env=env)
    assert submitted.returncode == 0, submitted.stderr
    assert "job array 4242" in submitted.stderr
    assert all(f"4242_{task}" in submitted.stderr for task in range(3))
    assert len(list((tmp_path / "temp").glob("*.json"))) == 3  # one config per task

    expected = sbatch_script(SlurmSettings(partition="gpu", gpus=2, cpus=16, mem_gb=64.0,
                                           time="1-00:00:00", account="lab", qos="normal",
                                           folder=str(folder)), tasks=3)
    assert captured.read_text() == expected
    dry = launcher(tmp_path, base, "--slurm-dry-run", *args)
    assert expected in dry.stderr


def test_without_sbatch_the_launcher_says_where_to_run(tmp_path, base):
    result = launcher(tmp_path, base, "--slurm", env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "sbatch" in result.stderr and "--slurm-dry-run" in result.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--slurm-partition", "gpu"], "--slurm-partition only applies with --slurm"),
    (["--slurm-wait"], "--slurm-wait only applies with --slurm"),
    (["--slurm", "--slurm-time", "soon"], "--slurm-time 'soon' is not a Slurm time"),
    (["--slurm", "--slurm-mem", "lots"], "--slurm-mem 'lots' is not a memory size"),
    (["--slurm", "--slurm-gpus", "-1"], "--slurm-gpus must be at least 0"),
    (["--slurm", "--jobs", "0"], "--jobs must be at least 1"),
])
def test_slurm_mistakes_exit_2_before_anything_is_written(tmp_path, base, args, fragment):
    result = launcher(tmp_path, base, *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert fragment in result.stderr, result.stderr
    assert not (tmp_path / "temp").exists()


def test_slurm_time_and_memory_formats():
    assert time_in_minutes("90") == 90
    assert time_in_minutes("90:30") == 90.5
    assert time_in_minutes("2:00:00") == 120
    assert time_in_minutes("1-12") == 36 * 60
    assert time_in_minutes("1-00:30:00") == 1470
    assert parse_memory_gb("32") == parse_memory_gb("32G") == parse_memory_gb("32GB") == 32
    assert parse_memory_gb("512M") == 0.5 and parse_memory_gb("1T") == 1024
    with pytest.raises(ConfigError):
        time_in_minutes("1:2:3:4")


# ---- the array, run through submitit's local executor ----------------------------------------


def test_a_sweep_runs_as_one_local_array_each_task_with_its_own_config(tmp_path, base):
    result = launcher(tmp_path, base, "--sweep", "exit_code:[0,3]", "--runs", "2", "--slurm",
                      "--slurm-cluster", "local", "--slurm-folder", str(tmp_path / "jobs"),
                      env={"STANDIN_EXIT_CODE_KEY": "exit_code", "STANDIN_RUN_FOLDER": "runs/standin_1"})
    assert result.returncode == 3, result.stdout + result.stderr  # the first failing run's code
    seen = records(tmp_path)
    assert sorted(entry["config"]["exit_code"] for entry in seen) == [0, 0, 3, 3]
    assert len({entry["config_path"] for entry in seen}) == 4  # a temp config per task
    assert len({entry["pid"] for entry in seen}) == 4
    assert result.stderr.count("submitted 4 run(s) to submitit's local executor") == 1
    summary = result.stderr.split("summary of 4 runs")[1].splitlines()
    # run, settings (3 words), exit, run folder, config
    rows = [line.split() for line in summary[2:] if line.strip()]
    assert [(row[0], row[1], row[4], row[5]) for row in rows] == [
        ("1", "exit_code=0,", "0", "runs/standin_1"), ("2", "exit_code=0,", "0", "runs/standin_1"),
        ("3", "exit_code=3,", "3", "runs/standin_1"), ("4", "exit_code=3,", "3", "runs/standin_1")]
    assert {row[6] for row in rows} == {entry["config_path"] for entry in seen}


# ---- one task: relay, run folder, and the time-limit hook ------------------------------------


WAITING_TRAINER = """
import json, signal, sys, time
print("run folder: runs/waiting_1", flush=True)
state = {"usr2_ignored": signal.getsignal(signal.SIGUSR2) is signal.SIG_IGN}
def stop(signum, frame):
    print('stopped by SIGTERM; resume with --resume_ckpt "/ckpts/interrupted-x-ep01-gs00007"', flush=True)
    with open(sys.argv[1], "w") as handle:
        json.dump(state, handle)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
open(sys.argv[2], "w").close()
time.sleep(30)
"""


def test_the_time_limit_hook_stops_the_trainer_and_requeues_a_resuming_copy(tmp_path):
    script = tmp_path / "waiting_trainer.py"
    script.write_text(WAITING_TRAINER)
    config = tmp_path / "run_config.json"
    config.write_text(json.dumps({"lr": 0.1}))
    started, state = tmp_path / "started", tmp_path / "state.json"
    task = ArrayTask([sys.executable, str(script), str(state), str(started), str(config)],
                     str(config), resumable=True)
    results = {}
    runner = threading.Thread(target=lambda: results.update(task()))
    runner.start()
    deadline = time.monotonic() + 30
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    delayed = task.checkpoint()  # what submitit calls on SIGUSR2
    runner.join(timeout=30)

    assert json.loads(state.read_text()) == {"usr2_ignored": True}  # the warning cannot kill it
    assert results["exit_code"] == 143 and results["run_folder"] == "runs/waiting_1"
    resumed = delayed.function
    assert isinstance(resumed, ArrayTask) and resumed.attempt == 1
    resumed_config = json.loads(Path(resumed.config_path).read_text())
    assert resumed_config == {"lr": 0.1, "resume_ckpt": "/ckpts/interrupted-x-ep01-gs00007"}
    assert resumed.command[-1] == resumed.config_path != str(config)


RESUMABLE_TRAINER = """
import json, signal, sys, time
config = json.load(open(sys.argv[1]))
if config.get("resume_ckpt"):
    print("resumed from", config["resume_ckpt"], flush=True)
    sys.exit(0)
print("run folder: runs/first_1", flush=True)
def stop(signum, frame):
    print('stopped by SIGTERM; resume with --resume_ckpt "/ckpts/interrupted-x"', flush=True)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
time.sleep(60)
"""


def test_a_task_that_hits_its_time_limit_is_requeued_by_submitit_and_resumes(tmp_path):
    """submitit's own signal handling end to end (LocalExecutor: SIGUSR2 before the limit,
    checkpoint(), requeue), with a stand-in trainer that waits until told to stop."""
    from difftrain.slurm import make_executor, submit_array

    script = tmp_path / "resumable_trainer.py"
    script.write_text(RESUMABLE_TRAINER)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"lr": 0.1}))
    settings = SlurmSettings(cluster="local", time="0:06", folder=str(tmp_path / "jobs"))
    task = ArrayTask([sys.executable, str(script), str(config)], str(config), resumable=True)
    (job,) = submit_array(make_executor(settings, 1), [task])
    result = job.result()  # the warning comes 3 s in; the requeued copy resumes and ends
    assert result["exit_code"] == 0 and result["config"].endswith("run_resume1.json")
    assert json.loads(Path(result["config"]).read_text())["resume_ckpt"] == "/ckpts/interrupted-x"
    log = Path(job.paths.stdout).read_text()
    assert "run folder: runs/first_1" in log and "resumed from /ckpts/interrupted-x" in log


def test_an_array_task_survives_pickling_without_its_process(tmp_path):
    import pickle

    task = ArrayTask([sys.executable, "-c", "print('run folder: a/b_1')"], str(tmp_path / "c.json"),
                     resumable=False)
    assert task()["run_folder"] == "a/b_1"
    copy = pickle.loads(pickle.dumps(task))
    assert copy.command == task.command and copy._process is None
    assert copy.checkpoint() is None  # another train script: nothing to resume, no requeue


# ---- multi-node: accelerate launch from SLURM_* ----------------------------------------------


def test_expand_nodelist_reads_slurms_compressed_host_lists():
    assert expand_nodelist("gpu[07-09,12],login1") == ["gpu07", "gpu08", "gpu09", "gpu12", "login1"]
    assert expand_nodelist("node5") == ["node5"]
    assert expand_nodelist("a[1-2],b[009-010]") == ["a1", "a2", "b009", "b010"]


def test_accelerate_command_for_the_second_of_two_nodes():
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_GPUS_ON_NODE": "4"}
    command = accelerate_launch_command(env, ["train.py", "--config", "c.json"])
    assert command == ["accelerate", "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", "1",
                       "--main_process_ip", "gpu07", "--main_process_port", "29500",
                       "--num_processes", "8", "train.py", "--config", "c.json"]
    exported = accelerate_launch_command({**env, "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "31000",
                                          "SLURM_GPUS_ON_NODE": "", "SLURM_GPUS_PER_NODE": "a100:2"},
                                         ["train.py"])
    assert exported[exported.index("--main_process_ip") + 1] == "10.0.0.7"
    assert exported[exported.index("--main_process_port") + 1] == "31000"
    assert exported[exported.index("--num_processes") + 1] == "4"


def test_accelerate_command_outside_an_allocation_says_how_to_run_it():
    with pytest.raises(ConfigError, match="SLURM_NODEID is not set"):
        accelerate_launch_command({"SLURM_NNODES": "2"}, ["train.py"])
    with pytest.raises(ConfigError, match="GPUs"):
        accelerate_launch_command({"SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n1"},
                                  ["train.py"])


def test_the_module_prints_the_command_from_the_environment():
    env = {**os.environ, "SLURM_NNODES": "3", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "n[1-3]",
           "SLURM_GPUS_ON_NODE": "8"}
    result = subprocess.run([sys.executable, "-m", "difftrain.slurm", "accelerate", "--print", "--",
                             "train.py", "--config", "my config.json"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("accelerate launch --multi_gpu --num_machines 3 --machine_rank 2 "
                                     "--main_process_ip n1 --main_process_port 29500 --num_processes 24 "
                                     "train.py --config 'my config.json'")


def test_the_launcher_still_imports_nothing_heavy_with_slurm_options(tmp_path, base):
    code = ("import runpy, sys\n"
            f"sys.argv = ['x', {str(base)!r}, '--train-script-path', {STANDIN!r}, '--slurm-dry-run']\n"
            f"try:\n    runpy.run_path({str(LAUNCHER)!r}, run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code)\n"
            "print(sorted(m for m in ('torch', 'accelerate', 'diffusers') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert "exit 0" in result.stdout and result.stdout.strip().endswith("[]"), result.stdout + result.stderr


def test_local_sweep_summary_finds_the_run_folder_our_trainers_print_on_stderr(tmp_path, base):
    """The trainers print 'run folder:' on stderr (with their progress bars): the launcher's
    table must find it there, while the bars still pass through."""
    script = tmp_path / "stderr_trainer.py"
    script.write_text("import json, sys\n"
                      "lr = json.load(open(sys.argv[1]))['lr']\n"
                      "sys.stderr.write('step 1\\rstep 2\\r')\n"
                      "print(f'run folder: runs/lr-{lr}_abcdefgh', file=sys.stderr)\n")
    result = subprocess.run([sys.executable, str(LAUNCHER), str(base), "--train-script-path", str(script),
                             "--temp-config-dir", str(tmp_path / "temp"), "--sweep", "lr:[0.1,0.2]"],
                            cwd=REPO, capture_output=True, timeout=60)  # bytes: keep the \r
    assert result.returncode == 0, result.stderr
    summary = result.stderr.decode().split("summary of 2 runs")[1]
    assert "runs/lr-0.1_abcdefgh" in summary and "runs/lr-0.2_abcdefgh" in summary
    assert result.stderr.count(b"step 1\rstep 2\r") == 2


def test_the_multinode_example_passes_flags_accelerate_launch_accepts():
    """The sbatch example's command, expanded as on the second of two nodes, parses with
    accelerate's own launch parser, and agrees with what difftrain.slurm builds."""
    import re
    import shlex

    from accelerate.commands.launch import launch_command_parser

    text = (REPO / "examples" / "slurm_multinode.sbatch").read_text()
    quoted = re.search(r"srun --kill-on-bad-exit=1 bash -c '(accelerate launch.*?)'", text, re.S).group(1)
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "1", "MASTER_ADDR": "gpu07", "MASTER_PORT": "31234",
           "GPUS_PER_NODE": "4"}
    expanded = quoted.replace("\\\n", " ").replace("$((SLURM_NNODES * GPUS_PER_NODE))", "8")
    for name, value in env.items():
        expanded = expanded.replace(f'"${name}"', value)
    argv = shlex.split(expanded)
    assert argv[:2] == ["accelerate", "launch"] and "$" not in expanded
    options = launch_command_parser().parse_args(argv[2:])
    assert (options.num_machines, options.machine_rank, options.main_process_ip, options.main_process_port,
            options.num_processes, options.multi_gpu) == (2, 1, "gpu07", 31234, 8, True)
    assert options.training_script == "train.py"
    built = accelerate_launch_command({**env, "SLURM_GPUS_ON_NODE": "4"}, argv[argv.index("train.py"):])
    assert built == argv
