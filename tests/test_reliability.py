"""Reliability: kill -9 at random moments, Ctrl-C / SIGTERM, exact resume, complete-or-absent files,
untrusted checkpoints, concurrent launches, NaN/inf stops.

Training runs are real `python train.py CONFIG.json` processes on the tiny Kolmogorov config of
tests/test_trainer.py, single-threaded (OMP_NUM_THREADS=1): on a busy 2-core machine two torch
threads per process make a tiny run ~6x slower, and the reference and the resumed runs must use
the same thread count for a bitwise comparison anyway.

Set DIFFTRAIN_KILL_SEED to replay the kill moments of a failed trial (every trial prints its seed).
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from difftrain import checkpoint as ckpt
from difftrain.checkpoint import (MANIFEST, STATE_JSON, STATE_TENSORS, TEMP_PREFIX, Progress, find_last,
                                  is_checkpoint, load_trainer_tensors, new_log_folder, read_progress,
                                  resolve_resume, save_checkpoint, verify_checkpoint, why_incomplete,
                                  write_file_atomically)
from difftrain.errors import ConfigError
from difftrain.tracking import create_run_folder
from tests.test_trainer import TINY_SIMULATION

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "offline"}
INTERVAL = 2  # ckpt_every_n_steps of the kill runs
KILL_SEED = int(os.environ.get("DIFFTRAIN_KILL_SEED", "20240917"))


# --- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def field_data(tmp_path_factory):
    from difftrain.data.kolmogorov import KolmogorovParams, ensure_dataset

    folder = tmp_path_factory.mktemp("kolmogorov")
    ensure_dataset(folder, KolmogorovParams(**TINY_SIMULATION), seed=0)
    return folder


def tiny_settings(folder: Path, data: Path, **changes) -> dict:
    """The tiny Kolmogorov run of tests/test_trainer.py: 10 steps per epoch, 2 epochs."""
    settings = {
        "task": "kolmogorov", "project_name": "tiny", "data_root": str(data),
        "simulation": TINY_SIMULATION, "window": 2, "embedding": 8, "hidden_channels": [4, 8],
        "hidden_blocks": [1, 1], "max_epochs": 2, "batch_size": 4, "lr": 1e-3,
        "lr_scheduler": "linear", "sample_steps": 0, "sample_inference_steps": 2, "num_samples": 1,
        "tracker": "none", "logdir": str(folder / "logs"), "runs_dir": str(folder / "runs"),
        "ckpt_every_n_minutes": 0, "ckpt_every_n_steps": INTERVAL, "seed": 7,
    }
    settings.update(changes)
    return settings


def write_config(folder: Path, settings: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    return path


def start_training(config_path: Path, *flags: str, script: str = "train.py", log_name: str = "stderr.txt"):
    log = open(config_path.parent / log_name, "ab")
    return subprocess.Popen([sys.executable, script, str(config_path), *flags], cwd=REPO, env=CHILD_ENV,
                            stdout=subprocess.DEVNULL, stderr=log)


def logged_steps(runs_dir: Path) -> dict[Path, int]:
    """Run folder -> the last step its metrics.jsonl recorded (a torn last line is ignored)."""
    result = {}
    for metrics in runs_dir.glob("*/metrics.jsonl"):
        steps = [0]
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
        result[metrics.parent] = max(steps)
    return result


def wait_for_steps(runs_dir: Path, at_least: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if max(logged_steps(runs_dir).values(), default=0) >= at_least:
            return
        time.sleep(0.02)


def final_weights(runs_dir: Path) -> dict[str, torch.Tensor]:
    """state.pth of the run started last (a killed run may have got as far as writing its own)."""
    newest = max(runs_dir.iterdir(), key=lambda folder: (folder / "config.json").stat().st_mtime_ns)
    return torch.load(newest / "state.pth", weights_only=True)


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


TOTAL_STEPS = 20  # 2 epochs of 10 steps


def wait_for_new_run(runs_dir: Path, before: set, at_least: int, process: subprocess.Popen,
                     timeout: float = 120) -> None:
    """Until a run folder not in `before` has logged step `at_least` (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        steps = logged_steps(runs_dir)
        if any(step >= at_least for folder, step in steps.items() if folder not in before):
            return
        time.sleep(0.005)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, field_data):
    """The uninterrupted run: its final weights and the seconds one optimizer step takes."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, tiny_settings(folder, field_data))
    process = start_training(config)
    wait_for_new_run(folder / "runs", set(), 1, process)
    first = time.monotonic()
    wait_for_new_run(folder / "runs", set(), TOTAL_STEPS, process)
    step_seconds = (time.monotonic() - first) / (TOTAL_STEPS - 1)
    assert process.wait(timeout=300) == 0, (folder / "stderr.txt").read_text()
    return final_weights(folder / "runs"), step_seconds


# --- kill -9 at random moments ---------------------------------------------------------------------

def kill_and_resume_trial(folder: Path, data: Path, reference, rng: random.Random, kills: int) -> list[str]:
    """Kill a run `kills` times at random moments, resuming with findlast each time, then check the
    end result bitwise and that each kill lost at most one checkpoint interval.

    A moment is a random step (so that kills land inside training, not in the seconds of imports)
    plus a random fraction of a step or so (so that they land anywhere in it, saves included).
    """
    reference_weights, step_seconds = reference
    config = write_config(folder, tiny_settings(folder, data))
    notes = []
    flags: tuple[str, ...] = ()
    saved, found = 0, None
    for _ in range(kills):
        if saved >= TOTAL_STEPS - 1:
            break
        before = set(logged_steps(folder / "runs"))
        process = start_training(config, *flags)
        wait_for_new_run(folder / "runs", before, rng.randint(saved + 1, TOTAL_STEPS - 1), process)
        time.sleep(rng.uniform(0, 1.5 * step_seconds))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert process.returncode == -signal.SIGKILL, (folder / "stderr.txt").read_text()[-3000:]
        steps = logged_steps(folder / "runs")
        (killed_run,) = set(steps) - before
        done = steps[killed_run]
        found, skipped = find_last(folder / "logs", "tiny")
        saved = read_progress(found).global_step if found else 0
        assert done - saved <= INTERVAL, f"killed after step {done}, newest checkpoint at {saved}"
        assert all(why_incomplete(folder_) for folder_ in skipped)
        notes.append(f"killed after step {done}, resumed from step {saved}"
                     + (f", skipped {[p.name for p in skipped]}" if skipped else ""))
        flags = ("--resume_ckpt", "findlast") if found else ()
    process = start_training(config, *flags)
    assert process.wait(timeout=300) == 0, (folder / "stderr.txt").read_text()[-3000:]
    if found:
        assert f"resumed from '{found}'" in (folder / "stderr.txt").read_text()
    assert_bitwise_equal(final_weights(folder / "runs"), reference_weights)
    return notes


@pytest.mark.parametrize("trial", range(3))
def test_sigkill_at_a_random_moment_then_findlast_resumes_bitwise(trial, tmp_path, field_data, reference):
    seed = KILL_SEED + trial
    print(f"DIFFTRAIN_KILL_SEED={seed}:", kill_and_resume_trial(tmp_path, field_data, reference,
                                                                random.Random(seed), kills=1))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(20))
def test_sigkill_many_trials_with_repeated_kills(trial, tmp_path, field_data, reference):
    seed = KILL_SEED + 1000 + trial
    rng = random.Random(seed)
    print(f"DIFFTRAIN_KILL_SEED={seed}:", kill_and_resume_trial(tmp_path, field_data, reference, rng,
                                                                kills=rng.randint(1, 3)))


def test_a_kill_in_the_middle_of_a_save_leaves_no_checkpoint_findlast_would_take(tmp_path):
    """Deterministic companion of the random kills: the process dies while writing the model."""
    logs = tmp_path / "logs"
    earlier = _fake_checkpoint(logs / "tiny20250101-000000" / "ckpts", "tiny-ep00-gs00002", 2)
    ckpts = logs / "tiny20250101-000001" / "ckpts"
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from difftrain.checkpoint import Progress, save_checkpoint
def write_model(folder):
    (folder / "model.safetensors").write_bytes(b"half a model")
    Path({str(tmp_path / 'writing')!r}).touch()
    time.sleep(60)
save_checkpoint(Path({str(ckpts)!r}), "tiny-ep00-gs00004", Progress(global_step=4, project_name="tiny"),
                {{}}, write_model, {{}})
"""
    process = subprocess.Popen([sys.executable, "-c", script], env=CHILD_ENV)
    deadline = time.monotonic() + 60
    while not (tmp_path / "writing").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    (leftover,) = list(ckpts.iterdir())
    assert leftover.name.startswith(TEMP_PREFIX + "tiny-ep00-gs00004")
    messages = []
    assert resolve_resume("findlast", logs, "tiny", messages.append) == earlier
    assert len(messages) == 1 and "interrupted" in messages[0] and leftover.name in messages[0]


# --- completeness: the manifest ----------------------------------------------------------------------

def _fake_checkpoint(ckpts: Path, name: str, step: int, *, model: bytes = b"weights" * 100) -> Path:
    progress = Progress(global_step=step, project_name="tiny", task="kolmogorov")
    state = {"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}, "generator": torch.zeros(2),
             "cpu_rng": torch.get_rng_state()}
    return save_checkpoint(ckpts, name, progress, state,
                           lambda folder: (folder / "model.safetensors").write_bytes(model), {"task": "kolmogorov"})


def test_every_file_is_in_the_manifest_written_last(tmp_path):
    folder = _fake_checkpoint(tmp_path / "ckpts", "tiny-ep00-gs00002", 2)
    files = json.loads((folder / MANIFEST).read_text())["files"]
    assert set(files) == {"model.safetensors", STATE_TENSORS, STATE_JSON, "config.json"}
    assert files["model.safetensors"]["size"] == 700
    assert is_checkpoint(folder) and why_incomplete(folder, check_hashes=True) is None
    assert not [p for p in (tmp_path / "ckpts").iterdir() if p.name.startswith(TEMP_PREFIX)]


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "model.safetensors").write_bytes(b"weights" * 50), "truncated"),
    (lambda f: (f / MANIFEST).unlink(), f"no readable {MANIFEST}"),
    (lambda f: (f / MANIFEST).write_text('{"files": {"model.safe'), f"no readable {MANIFEST}"),
    (lambda f: (f / STATE_TENSORS).unlink(), f"'{STATE_TENSORS}' is missing"),
])
def test_a_checkpoint_with_a_truncated_or_missing_file_is_skipped_and_named(tmp_path, damage, reason):
    """E.g. a folder with trainer_state.json but half a model file (an rsync cut short)."""
    logs = tmp_path / "logs"
    older = _fake_checkpoint(logs / "tiny20250101-000000" / "ckpts", "tiny-ep00-gs00002", 2)
    newer = _fake_checkpoint(logs / "tiny20250101-000000" / "ckpts", "tiny-ep00-gs00004", 4)
    damage(newer)
    assert (newer / STATE_JSON).is_file() and not is_checkpoint(newer)
    messages = []
    assert resolve_resume("findlast", logs, "tiny", messages.append) == older
    assert len(messages) == 1 and newer.name in messages[0] and reason in messages[0]
    with pytest.raises(ConfigError, match=f"'{newer}' is incomplete or damaged.*{reason[:12]}"):
        resolve_resume(str(newer), logs, "tiny", messages.append)


def test_a_flipped_byte_is_caught_by_the_hash_on_resume(tmp_path):
    logs = tmp_path / "logs"
    older = _fake_checkpoint(logs / "tiny20250101-000000" / "ckpts", "tiny-ep00-gs00002", 2)
    newer = _fake_checkpoint(logs / "tiny20250101-000000" / "ckpts", "tiny-ep00-gs00004", 4)
    data = bytearray((newer / "model.safetensors").read_bytes())
    data[10] ^= 0xFF
    (newer / "model.safetensors").write_bytes(bytes(data))
    assert is_checkpoint(newer)  # the size is right: only the hash can tell
    messages = []
    assert resolve_resume("findlast", logs, "tiny", messages.append) == older
    assert "SHA-256" in messages[0]
    with pytest.raises(ConfigError, match="SHA-256"):
        verify_checkpoint(newer)


def test_findlast_with_nothing_to_find_says_how_to_start(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint of project 'tiny'.*Train once first"):
        resolve_resume("findlast", tmp_path / "nothing-here", "tiny", print)


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path):
    ckpts = tmp_path / "ckpts"
    previous = _fake_checkpoint(ckpts, "tiny-ep00-gs00002", 2)
    before = {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()}

    def disk_full(folder):
        (folder / "model.safetensors").write_bytes(b"part")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.safetensors"))

    with pytest.raises(ConfigError) as error:
        save_checkpoint(ckpts, "tiny-ep00-gs00004", Progress(global_step=4, project_name="tiny"),
                        {}, disk_full, {})
    message = str(error.value)
    assert "No space left on device" in message and str(previous) in message and "is intact" in message
    assert "free some disk space" in message.lower() and "--resume_ckpt findlast" in message
    assert sorted(p.name for p in ckpts.iterdir()) == ["tiny-ep00-gs00002"]  # no temp folder left
    assert {p: p.read_bytes() for p in previous.rglob("*") if p.is_file()} == before
    verify_checkpoint(previous)


def test_a_full_disk_during_training_exits_2_with_the_message(tmp_path, field_data, monkeypatch, capsys, one_thread):
    from difftrain.cli import main

    real_save = torch.save
    calls = {"n": 0}

    def save_fills_the_disk(obj, target, *args, **kwargs):
        if str(target).endswith(STATE_TENSORS):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_fills_the_disk)
    config = write_config(tmp_path, tiny_settings(tmp_path, field_data, max_epochs=1))
    with pytest.raises(SystemExit) as stop:
        main([str(config)])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "tiny-ep00-gs00002' is intact" in err
    found, skipped = find_last(tmp_path / "logs", "tiny")
    assert found.name == "tiny-ep00-gs00002" and not skipped


def test_run_files_are_written_whole_or_not_at_all(tmp_path):
    target = tmp_path / "state.pth"

    def crashes(temp):
        temp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        write_file_atomically(target, crashes)
    assert list(tmp_path.iterdir()) == []
    write_file_atomically(target, lambda temp: temp.write_bytes(b"one"))
    write_file_atomically(target, lambda temp: temp.write_bytes(b"two"))
    assert target.read_bytes() == b"two"
    with pytest.raises(FileExistsError):
        write_file_atomically(target, lambda temp: temp.write_bytes(b"three"), exclusive=True)
    assert target.read_bytes() == b"two" and list(tmp_path.iterdir()) == [target]


# --- untrusted checkpoints ------------------------------------------------------------------------------

class _WritesAMarker:
    """Unpickling this would create `marker`: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_every_torch_load_in_the_package_is_weights_only():
    offenders = []
    for path in (REPO / "difftrain").rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
            if ("pickle.load" in line or "allow_pickle=True" in line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders


def test_a_malicious_trainer_state_is_refused_on_resume_without_running(tmp_path, field_data, capsys, one_thread):
    from difftrain.cli import main

    config = write_config(tmp_path, tiny_settings(tmp_path, field_data, max_epochs=1, ckpt_every_n_steps=5))
    assert main([str(config)]) == 0
    target = tmp_path / "logs"
    found, _ = find_last(target, "tiny")
    marker = tmp_path / "pwned"
    torch.save({"optimizer": _WritesAMarker(marker), "scheduler": {}, "generator": None, "cpu_rng": None},
               found / STATE_TENSORS)
    ckpt.write_manifest(found)  # whoever planted the payload can write a matching manifest too
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main([str(config), "--resume_ckpt", str(found)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert f"{STATE_TENSORS} was refused" in err and "never code" in err
    assert not marker.exists()


def test_load_trainer_tensors_refuses_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / STATE_TENSORS)
    with pytest.raises(ConfigError, match="lacks the optimizer"):
        load_trainer_tensors(tmp_path)
    (tmp_path / STATE_TENSORS).write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ConfigError, match="refused or cannot be read"):
        load_trainer_tensors(tmp_path)


# --- Ctrl-C and SIGTERM ------------------------------------------------------------------------------------

@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_saves_an_interrupted_checkpoint_and_the_resume_continues_bitwise(tmp_path, field_data, reference):
    config = write_config(tmp_path, tiny_settings(tmp_path, field_data, ckpt_every_n_steps=0, save_every_n_epochs=1))
    process = start_training(config)
    wait_for_steps(tmp_path / "runs", 3, process)
    process.send_signal(signal.SIGTERM)  # what Slurm sends before it kills a job
    assert process.wait(timeout=120) == 143
    err = (tmp_path / "stderr.txt").read_text()
    assert "SIGTERM received" in err and "Traceback" not in err
    found, _ = find_last(tmp_path / "logs", "tiny")
    assert found.name.startswith("interrupted-tiny-ep00-gs000")
    interrupted_at = read_progress(found).global_step
    assert 3 <= interrupted_at < 10 and f'--resume_ckpt "{found}"' in err
    resumed = start_training(config, "--resume_ckpt", "findlast")
    assert resumed.wait(timeout=300) == 0
    assert f"resumed from '{found}' at epoch 0, step {interrupted_at}" in (tmp_path / "stderr.txt").read_text()
    assert_bitwise_equal(final_weights(tmp_path / "runs"), reference[0])


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_to_the_launcher_reaches_the_real_trainer(tmp_path, field_data):
    config = write_config(tmp_path, tiny_settings(tmp_path, field_data, max_epochs=1000, ckpt_every_n_steps=0))
    log = open(tmp_path / "launcher.txt", "wb")
    launcher = subprocess.Popen(
        [sys.executable, "train_json_edit.py", str(config), "--train-script-path", "train.py",
         "--temp-config-dir", str(tmp_path / "temp"), "--delete-temp-config", "--override", "seed:8"],
        cwd=REPO, env=CHILD_ENV, stdout=log, stderr=subprocess.STDOUT)
    wait_for_steps(tmp_path / "runs", 2, launcher)
    launcher.send_signal(signal.SIGTERM)  # the launcher alone, as a job scheduler would
    assert launcher.wait(timeout=120) == 143, (tmp_path / "launcher.txt").read_text()[-3000:]
    found, _ = find_last(tmp_path / "logs", "tiny")
    assert found is not None and found.name.startswith("interrupted-tiny-")
    assert read_progress(found).seed == 8
    assert list((tmp_path / "temp").iterdir()) == []
    assert "Traceback" not in (tmp_path / "launcher.txt").read_text()


# --- concurrency -----------------------------------------------------------------------------------------

def _in_threads(count: int, work):
    results, errors = [None] * count, []
    barrier = threading.Barrier(count)

    def run(index):
        barrier.wait()
        try:
            results[index] = work(index)
        except BaseException as error:  # reported below, with the index
            errors.append((index, error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_fifty_run_folders_created_at_once_are_distinct(tmp_path, monkeypatch):
    # The same name for all: only the id (and its retry on a clash) keeps them apart.
    from difftrain import tracking

    ids = iter(["aaaaaaaa"] * 5 + [f"{n:08d}" for n in range(100)])
    lock = threading.Lock()

    def colliding_ids():
        with lock:
            return next(ids)

    monkeypatch.setattr(tracking, "make_run_id", colliding_ids)
    made = _in_threads(50, lambda i: create_run_folder(tmp_path / "runs", "crimson-cloud-1", {"n": i}))
    folders = [folder for folder, _ in made]
    assert len(set(folders)) == 50 == len(list((tmp_path / "runs").iterdir()))
    assert sorted(json.loads((f / "config.json").read_text())["n"] for f in folders) == list(range(50))


def test_fifty_processes_creating_run_folders_at_once_get_distinct_ones(tmp_path):
    go = tmp_path / "go"
    script = f"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from difftrain.tracking import create_run_folder
while not Path({str(go)!r}).exists():
    time.sleep(0.005)
folder, _ = create_run_folder(Path({str(tmp_path / 'runs')!r}), "same-name-1", {{"n": int(sys.argv[1])}})
print(folder)
"""
    processes = [subprocess.Popen([sys.executable, "-c", script, str(n)], stdout=subprocess.PIPE, text=True)
                 for n in range(50)]
    time.sleep(0.5)
    go.touch()
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0] * 50
    assert len(set(outputs)) == 50
    numbers = sorted(json.loads((Path(o) / "config.json").read_text())["n"] for o in outputs)
    assert numbers == list(range(50))


def test_fifty_temp_configs_written_at_once_are_distinct(tmp_path, monkeypatch):
    from difftrain import launch

    monkeypatch.setattr(launch.time, "strftime", lambda fmt: "20250101-000000")  # all in one second
    runs = [launch.PlannedRun(number=1, settings={}, repeat=1, config={"n": n}, changes=[]) for n in range(50)]
    plan = launch.Plan(base_path=Path("base.json"), train_script=Path("t.py"), temp_dir=tmp_path / "temp",
                       passthrough=[], runs=runs[:1], repeats=1, jobs=1, delete_temp_config=False,
                       override_changes=[])
    paths = _in_threads(50, lambda n: launch.write_temp_config(plan, runs[n]))
    assert len(set(paths)) == 50 == len(list((tmp_path / "temp").iterdir()))
    assert sorted(json.loads(p.read_text())["n"] for p in paths) == list(range(50))


def test_fifty_log_folders_in_the_same_second_are_distinct(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt: "20250101-000000")
    folders = _in_threads(50, lambda i: new_log_folder(tmp_path / "logs", "tiny"))
    assert len(set(folders)) == 50
    assert all(folder.name.startswith("tiny20250101-000000") for folder in folders)


def test_two_runs_of_one_project_in_one_logdir_keep_all_their_checkpoints(tmp_path, field_data):
    settings = tiny_settings(tmp_path, field_data, max_epochs=1, ckpt_every_n_steps=5)
    configs = [write_config(tmp_path / name, dict(settings, seed=seed)) for name, seed in (("a", 1), ("b", 2))]
    processes = [start_training(config) for config in configs]
    assert [p.wait(timeout=300) for p in processes] == [0, 0]
    log_folders = sorted((tmp_path / "logs").iterdir())
    assert len(log_folders) == 2
    seeds = set()
    for folder in log_folders:
        names = sorted(p.name for p in (folder / "ckpts").iterdir())
        assert names == ["last-tiny-ep01-gs00010", "tiny-ep00-gs00005", "tiny-ep00-gs00010"]
        seeds |= {read_progress(folder / "ckpts" / name).seed for name in names}
    assert seeds == {1, 2}
    assert len(list((tmp_path / "runs").glob("*/state.pth"))) == 2


# --- NaN and inf ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("inf"), float("-inf")])
def test_an_infinite_loss_stops_and_keeps_the_last_good_checkpoint(bad, tmp_path, field_data, monkeypatch,
                                                                    capsys, one_thread):
    from difftrain.engine import run
    from difftrain.config import validate_config_dict
    from difftrain.tasks.kolmogorov import KolmogorovTask

    original = KolmogorovTask.loss
    calls = {"n": 0}

    def loss_that_breaks(self, model, batch, generator):
        calls["n"] += 1
        value = original(self, model, batch, generator)
        return value * bad if calls["n"] == 8 else value

    monkeypatch.setattr(KolmogorovTask, "loss", loss_that_breaks)
    config = validate_config_dict(tiny_settings(tmp_path, field_data, ckpt_every_n_steps=5))
    assert run(config) == 1
    err = capsys.readouterr().err
    assert f"loss became {bad}" in err and "tiny-ep00-gs00005" in err
    found, _ = find_last(tmp_path / "logs", "tiny")
    assert found.name == "tiny-ep00-gs00005"
    verify_checkpoint(found)
