"""Data-parallel training with 2 CPU processes (torchrun, gloo) on the tiny Kolmogorov task.

What is checked: the main process alone writes the run folder, logs and checkpoints; two
processes resume from a checkpoint exactly; 2 processes x batch 2 train the same network as
1 process x batch 4; Ctrl-C reaches both processes, saves one checkpoint and does not hang.

Run as a script (`python -m torch.distributed.run ... tests/test_distributed.py CONFIG.json`),
this file is the worker of the 2-vs-1 comparison: the tiny task with noise keyed by item.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if __name__ != "__main__":
    from tests.test_trainer import tiny_config, tiny_field_data  # noqa: F401  (pytest fixture)

LAUNCH_TIMEOUT_S = 240
WORKER_ENV = {
    "ACCELERATE_USE_CPU": "1",  # accelerate only forms a CPU process group (gloo) when asked
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "HF_HUB_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "PYTHONUNBUFFERED": "1",
}


def item_noise_task_class():
    """KolmogorovTask whose diffusion time and noise come from (seed, epoch, item), not from
    the process's random stream: then the trained network cannot depend on how each global batch
    is split over processes, and 2 x 2 can be compared with 1 x 4 exactly (up to the order of
    floating-point sums)."""
    import torch

    from difftrain.tasks.kolmogorov import KolmogorovTask

    class ItemNoiseKolmogorovTask(KolmogorovTask):
        def collate(self, indices, epoch):
            return super().collate(indices, epoch), list(indices), epoch

        def loss(self, model, batch, generator):
            fields, indices, epoch = batch
            times, noises = [], []
            for row, index in zip(fields, indices):
                item_generator = torch.Generator().manual_seed(
                    (self.config.seed * 1_000_003 + epoch) * 1_000_003 + index)
                times.append(torch.rand(1, generator=item_generator))
                noises.append(torch.randn(row.shape, generator=item_generator))
            return self.sde.loss(model, fields, generator, t=torch.cat(times).to(fields.device),
                                 eps=torch.stack(noises).to(fields.device))

    return ItemNoiseKolmogorovTask


def train_with_item_noise(config_path: str) -> int:
    from difftrain.config import validate_config_dict
    from difftrain.trainer import Trainer

    config = validate_config_dict(json.loads(Path(config_path).read_text()), config_path)
    return Trainer(config, item_noise_task_class()).run()


# ---- helpers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_command(*script_and_args: str) -> list[str]:
    # A free port of our own rather than --standalone's rendezvous: other test processes on
    # the machine may be using torchrun's default port at the same time.
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *script_and_args]


def start_two_processes(*script_and_args: str) -> subprocess.Popen:
    return subprocess.Popen(torchrun_command(*script_and_args), cwd=REPO, env={**os.environ, **WORKER_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


# Known, not understood: now and then (about 1 launch in 30 on the 2-core CI machine) a gloo worker
# aborts in C++ teardown *after* the run has finished -- the main process has printed its summary,
# which comes after the last checkpoint and state.pth, and every process has passed the final
# barrier -- with this line from the C++ runtime. Such a launch is accepted (the test's own checks of
# the files still run); any other non-zero exit fails. See the README's Scaling out section.
EXIT_TEARDOWN_ABORT = "terminate called without an active exception"


def aborted_only_in_teardown(stderr: str) -> bool:
    return EXIT_TEARDOWN_ABORT in stderr and "\ndone.\n" in stderr and "Traceback" not in stderr.split(
        EXIT_TEARDOWN_ABORT)[0]


def finish(process: subprocess.Popen) -> str:
    """Wait for a launch; returns its stderr, failing the test on a non-zero exit."""
    try:
        _, stderr = process.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
    if process.returncode != 0 and aborted_only_in_teardown(stderr):
        print(f"note: a worker aborted in teardown after the run finished ({EXIT_TEARDOWN_ABORT!r})")
        return stderr
    assert process.returncode == 0, stderr[-4000:]
    return stderr


def run_two_processes(*script_and_args: str) -> str:
    return finish(start_two_processes(*script_and_args))


def write_config(path: Path, config) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config.model_dump(mode="json")))
    return str(path)


def only(folder: Path) -> Path:
    entries = list(folder.iterdir())
    assert len(entries) == 1, entries
    return entries[0]


def weights(run_folder: Path):
    import torch

    return torch.load(run_folder / "state.pth", weights_only=True)


def losses(run_folder: Path) -> list[tuple[int, float]]:
    events = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    return [(event["step"], event["loss_train"]) for event in events if "loss_train" in event]


# ---- tests -----------------------------------------------------------------------------------


def test_two_processes_train_like_one_with_the_same_global_batch_and_resume_exactly(tmp_path, tiny_field_data):
    import torch

    from difftrain.checkpoint import read_progress
    from difftrain.trainer import Trainer

    # 40 items; global batch 4 either way: 10 steps per epoch, 20 in all.
    settings = dict(max_epochs=2, ckpt_every_n_steps=6)
    two = tiny_config(tmp_path / "two", tiny_field_data, batch_size=2, **settings)
    launched = start_two_processes(__file__, write_config(tmp_path / "two.json", two))
    # One process with the whole global batch, meanwhile: the same items per step (each rank's
    # batch is its slice of the global one), the same per-item noise, gradients averaged alike.
    one = tiny_config(tmp_path / "one", tiny_field_data, batch_size=4, **settings)
    assert Trainer(one, item_noise_task_class()).run() == 0
    finish(launched)

    run_folder = only(tmp_path / "two" / "runs")  # one run folder, named once, by the main process
    log_folder = only(tmp_path / "two" / "logs")
    steps = [step for step, _ in losses(run_folder)]
    assert steps == list(range(1, 21))  # logged once per step, not once per process
    names = sorted(path.name for path in (log_folder / "ckpts").iterdir())
    assert names == ["last-tiny-ep02-gs00020", "tiny-ep00-gs00006", "tiny-ep01-gs00012", "tiny-ep01-gs00018"]
    middle = log_folder / "ckpts" / "tiny-ep01-gs00012"
    assert read_progress(middle).batch_in_epoch == 2 and read_progress(middle).extra["world_size"] == 2

    single_folder = only(tmp_path / "one" / "runs")
    two_losses, one_losses = losses(run_folder), losses(single_folder)
    assert [step for step, _ in one_losses] == steps
    # Measured: 6e-8 on the losses, 3e-8 on the weights (float32 sums in another order).
    assert max(abs(a - b) for (_, a), (_, b) in zip(two_losses, one_losses)) < 1e-6
    two_weights, one_weights = weights(run_folder), weights(single_folder)
    worst = max((two_weights[key] - one_weights[key]).abs().max().item() for key in two_weights)
    assert worst < 1e-6, f"2 x 2 and 1 x 4 differ by {worst}"

    # Both processes resume from the main process's checkpoint, mid-epoch, and end bitwise equal.
    resumed = tiny_config(tmp_path / "resumed", tiny_field_data, batch_size=2, resume_ckpt=str(middle), **settings)
    run_two_processes(__file__, write_config(tmp_path / "resumed.json", resumed))
    resumed_weights = weights(only(tmp_path / "resumed" / "runs"))
    assert all(torch.equal(two_weights[key], resumed_weights[key]) for key in two_weights)
    assert losses(only(tmp_path / "resumed" / "runs")) == two_losses[12:]


@pytest.mark.slow  # three 2-process launches (two at once): about 45 s on 2 cores
def test_ctrl_c_stops_both_processes_at_one_step_with_one_checkpoint_that_resumes_exactly(tmp_path, tiny_field_data):
    """train.py itself under torchrun, with each process drawing its own noise: the checkpoint
    must carry both processes' random streams for the resumed run to match a straight one."""
    import torch

    common = dict(batch_size=2, lr_scheduler="constant")  # constant: max_steps changes nothing else
    endless = tiny_config(tmp_path / "stopped", tiny_field_data, max_epochs=100000, **common)
    # Its own session, like a terminal's foreground group: Ctrl-C reaches torchrun and both workers.
    process = subprocess.Popen(torchrun_command("train.py", write_config(tmp_path / "endless.json", endless)),
                               cwd=REPO, env={**os.environ, **WORKER_ENV}, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        metrics = tmp_path / "stopped" / "runs"
        while time.monotonic() < deadline and not any(
                len(path.read_text().splitlines()) >= 15 for path in metrics.glob("*/metrics.jsonl")):
            assert process.poll() is None, process.stderr.read()[-4000:]
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        started_stopping = time.monotonic()
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert time.monotonic() - started_stopping < 25, "the stop took longer than torchrun's grace period"
    # torchrun itself ends with its SignalException traceback; the workers must end cleanly.
    assert "[rank0]" not in stderr and "[rank1]" not in stderr, stderr[-4000:]
    (interrupted,) = (only(tmp_path / "stopped" / "logs") / "ckpts").iterdir()
    assert interrupted.name.startswith("interrupted-tiny-"), interrupted.name
    assert stderr.count("stopped by SIGINT") == 1  # said once, by the main process
    stopped_at = int(interrupted.name.rsplit("-gs", 1)[1])

    target = stopped_at + 4
    resumed = tiny_config(tmp_path / "resumed", tiny_field_data, max_steps=target, resume_ckpt=str(interrupted), **common)
    straight = tiny_config(tmp_path / "straight", tiny_field_data, max_steps=target, **common)
    straight_run = start_two_processes("train.py", write_config(tmp_path / "straight.json", straight))
    try:
        run_two_processes("train.py", write_config(tmp_path / "resumed.json", resumed))
    finally:
        finish(straight_run)
    a, b = weights(only(tmp_path / "resumed" / "runs")), weights(only(tmp_path / "straight" / "runs"))
    assert all(torch.equal(a[key], b[key]) for key in a)


@pytest.mark.slow  # one 2-process launch, about 15 s on 2 cores
def test_reflow_with_two_processes_trains_every_process_on_the_main_process_pairs(tmp_path, tiny_field_data):
    """The main process generates the pairs under its log folder; the others must read them
    there (they have no log folder of their own)."""
    config = tiny_config(tmp_path, tiny_field_data, batch_size=2, max_epochs=2, rectified_flow=True,
                         reflow_steps=1, reflow_gen_batches=4, reflow_sample_steps=4)
    run_two_processes("train.py", write_config(tmp_path / "reflow.json", config))
    log_folder = only(tmp_path / "logs")
    assert [path.name for path in (log_folder / "reflow").iterdir()] == ["reflow_stage_01"]
    # 20 steps of stage 0, then 4 generated batches shared by 2 processes: 2 steps of reflow.
    assert [step for step, _ in losses(only(tmp_path / "runs"))] == list(range(1, 23))


def test_a_multi_process_launch_without_a_process_group_is_refused(tmp_path, tiny_field_data, monkeypatch):
    from difftrain.engine import run
    from difftrain.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets; accelerate formed no group here
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU"):
        run(tiny_config(tmp_path, tiny_field_data))
    assert not (tmp_path / "runs").exists()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(train_with_item_noise(sys.argv[1]))

