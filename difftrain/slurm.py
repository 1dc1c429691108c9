"""Many runs on a Slurm cluster (one job array through submitit), and multi-node launch commands.

Two jobs live here, both used from the shell:

* `train_json_edit.py ... --slurm`: every planned run (sweeps x repeats) becomes one task of ONE
  job array. Each task runs the train script exactly as the local launcher would (same Python,
  its own temp config, its own runs/<name>_<id>), so a run behaves the same on a laptop and on the
  cluster. `--slurm-dry-run` prints the sbatch script submitit would submit.
* `python -m difftrain.slurm accelerate -- train.py ARGS`: inside a multi-node allocation, run on
  every node through `srun`, it turns the SLURM_* variables into the `accelerate launch` command
  for that node (machine rank, main process address, process counts) and runs it.

Nothing here imports torch; submitit is imported only when a job array is really submitted.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from difftrain.errors import ConfigError, exit_on_user_error

CLUSTERS = ("slurm", "local")
DEFAULT_LOG_FOLDER = "slurm_logs"
DEFAULT_MAIN_PROCESS_PORT = 29500
RUN_FOLDER_LINE = re.compile(r"^run folder: (.+?)\s*$")
RESUME_LINE = re.compile(r'--resume_ckpt "(.+)"\s*$')
_TIME_FORMAT = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")


# ---------------------------------------------------------------------------------------------
# Resources


@dataclass
class SlurmSettings:
    """What each array task asks Slurm for. Unset (None) means the cluster's default."""

    partition: Optional[str] = None
    gpus: Optional[int] = None  # per node (each task is one node)
    cpus: Optional[int] = None  # per task
    mem_gb: Optional[float] = None
    time: Optional[str] = None  # minutes, or [D-]HH[:MM[:SS]] as sbatch writes it
    account: Optional[str] = None
    qos: Optional[str] = None
    parallel: Optional[int] = None  # array tasks running at once (the array's %N)
    job_name: str = "difftrain"
    folder: str = DEFAULT_LOG_FOLDER
    cluster: str = "slurm"


def parse_memory_gb(text: str) -> float:
    """'32', '32G', '32GB' -> 32.0; '500M' -> 0.48828125 (sbatch counts M and G in 1024s)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([MmGgTt]?)[Bb]?\s*", str(text))
    if not match:
        raise ConfigError(f"--slurm-mem {text!r} is not a memory size; write it in GB like 32 or "
                          "32G (or 500M, 1T).")
    value, unit = float(match.group(1)), match.group(2).upper()
    return value * {"": 1.0, "G": 1.0, "M": 1 / 1024, "T": 1024.0}[unit]


def time_in_minutes(text: str) -> float:
    """sbatch's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> minutes."""
    if not _TIME_FORMAT.match(text):
        raise ConfigError(f"--slurm-time {text!r} is not a Slurm time; write minutes (120) or "
                          "[D-]HH:MM:SS (2:00:00, 1-12:00:00).")
    days, _, clock = text.rpartition("-")
    parts = [int(part) for part in clock.split(":")]
    if days:  # with days, the clock reads hours first
        hours, minutes, seconds = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        hours, minutes, seconds = parts
    else:  # 'M' or 'M:S'
        hours, (minutes, seconds) = 0, (parts + [0])[:2]
    return int(days or 0) * 1440 + hours * 60 + minutes + seconds / 60


def check_settings(settings: SlurmSettings) -> None:
    """Raise ConfigError for values sbatch would refuse, before anything is written."""
    if settings.cluster not in CLUSTERS:
        raise ConfigError(f"--slurm-cluster {settings.cluster!r} is unknown; use one of {', '.join(CLUSTERS)}.")
    for flag, value in (("--slurm-gpus", settings.gpus), ("--slurm-cpus", settings.cpus),
                        ("--jobs", settings.parallel)):
        if value is not None and value < (0 if flag == "--slurm-gpus" else 1):
            raise ConfigError(f"{flag} must be at least {0 if flag == '--slurm-gpus' else 1}, got {value}.")
    if settings.time is not None:
        time_in_minutes(settings.time)


def sbatch_parameters(settings: SlurmSettings, tasks: int) -> dict[str, Any]:
    """The parameters of submitit's SlurmExecutor (sbatch's names) for an array of `tasks`."""
    parameters: dict[str, Any] = {"job_name": settings.job_name,
                                  "array_parallelism": settings.parallel or tasks}
    optional = {"partition": settings.partition, "gpus_per_node": settings.gpus,
                "cpus_per_task": settings.cpus, "mem": sbatch_memory(settings.mem_gb), "time": settings.time,
                "account": settings.account, "qos": settings.qos}
    parameters.update({key: value for key, value in optional.items() if value is not None})
    if "time" in parameters:
        # Whole minutes: submitit also reads this number to tell a time-out from a preemption.
        parameters["time"] = math.ceil(time_in_minutes(parameters["time"]))
    return parameters


def sbatch_memory(gigabytes: Optional[float]) -> Optional[str]:
    """32.0 -> '32GB', 0.5 -> '512MB': a whole number of units, which sbatch requires."""
    if gigabytes is None:
        return None
    if gigabytes == int(gigabytes):
        return f"{int(gigabytes)}GB"
    return f"{math.ceil(gigabytes * 1024)}MB"


def submitit_command(folder: Path, python: Optional[str] = None) -> str:
    """The command every array task runs: submitit's runner, which unpickles that task's call."""
    return f"{python or shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"


def sbatch_script(settings: SlurmSettings, tasks: int, python: Optional[str] = None) -> str:
    """The sbatch script submitit's SlurmExecutor submits for a job array of `tasks` runs.

    Built by submitit's own sbatch writer from the same parameters the executor gets, so a dry
    run shows exactly what would be submitted.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    folder = Path(settings.folder).absolute()
    parameters = sbatch_parameters(settings, tasks)
    return _make_sbatch_string(command=submitit_command(folder, python), folder=folder,
                               map_count=tasks, **parameters)


# ---------------------------------------------------------------------------------------------
# One array task


class ArrayTask:
    """One run of the array: the train script on its own temp config, as a child process.

    submitit pickles this object and calls it on the compute node. Its `checkpoint` method is
    submitit's hook for the time-limit warning and for preemption (SIGUSR2, `signal_delay_s`
    before the end): the train script gets SIGTERM, saves an `interrupted-` checkpoint and exits;
    with this repo's trainers the task then requeues itself resuming from that checkpoint.
    """

    def __init__(self, command: Sequence[str], config_path: str, *, resumable: bool,
                 delete_config: bool = False, attempt: int = 0):
        self.command = list(command)
        self.config_path = config_path
        self.resumable = resumable
        self.delete_config = delete_config
        self.attempt = attempt
        self._process: Optional[subprocess.Popen] = None
        self._pump: Optional[threading.Thread] = None
        self._found: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_process=None, _pump=None, _found={})
        return state

    def __call__(self) -> dict[str, Any]:
        """Run the train script; returns {exit_code, run_folder, config, resume_from}."""
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        # Slurm's time-limit warning (SIGUSR2) reaches every process of the step and would kill the
        # trainer outright; ignoring it there leaves it to submitit here, which calls checkpoint().
        self._process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=environment,
            preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        self._pump = threading.Thread(target=self._relay_output, daemon=True)
        self._pump.start()
        try:
            # Wait on the output first: submitit's signal handler (checkpoint below) interrupts this
            # wait, and Popen.wait is not re-entrant, a thread join is.
            self._pump.join()
            returncode = self._process.wait()
        finally:
            if self.delete_config and self._process.poll() is not None:
                Path(self.config_path).unlink(missing_ok=True)
        return {"exit_code": 128 - returncode if returncode < 0 else returncode,
                "run_folder": self._found.get("run_folder"), "config": self.config_path,
                "resume_from": self._found.get("resume_from")}

    def _relay_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for raw in iter(self._process.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            sys.stdout.write(line)
            sys.stdout.flush()
            if (match := RUN_FOLDER_LINE.match(line)) and "run_folder" not in self._found:
                self._found["run_folder"] = match.group(1)
            if match := RESUME_LINE.search(line):
                self._found["resume_from"] = match.group(1)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit's preemption / time-limit hook: stop the trainer cleanly, then requeue.

        Returns the call to run after the requeue (a submitit DelayedSubmission), or None when the
        run cannot resume (another train script, or no checkpoint was saved): no requeue.
        """
        from submitit.helpers import DelayedSubmission

        process = self._process
        if process is not None and process.returncode is None:
            try:
                process.send_signal(signal.SIGTERM)
            except OSError:  # it ended meanwhile
                pass
            if self._pump is not None:
                self._pump.join()  # its output ends when it does: the resume line is in by then
        resume_from = self._found.get("resume_from")
        if not (self.resumable and resume_from):
            return None
        return DelayedSubmission(self.resumed(resume_from))

    def resumed(self, checkpoint: str) -> "ArrayTask":
        """The same run continued from `checkpoint`: a copy of its config with resume_ckpt set."""
        config = json.loads(Path(self.config_path).read_text(encoding="utf-8"))
        config["resume_ckpt"] = checkpoint
        original = Path(self.config_path)
        stem = original.stem.split("_resume")[0]
        path = original.with_name(f"{stem}_resume{self.attempt + 1}.json")
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        command = [str(path) if part == self.config_path else part for part in self.command]
        return ArrayTask(command, str(path), resumable=self.resumable,
                         delete_config=self.delete_config, attempt=self.attempt + 1)


# ---------------------------------------------------------------------------------------------
# Submitting


def make_executor(settings: SlurmSettings, tasks: int):
    """submitit's SlurmExecutor (or LocalExecutor for cluster 'local') set up for the array."""
    import submitit

    folder = Path(settings.folder).absolute()
    if settings.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        minutes = time_in_minutes(settings.time) if settings.time else 60 * 24 * 365
        # As on Slurm, the time-limit warning comes 90 s before the end (sooner for short limits).
        executor.update_parameters(timeout_min=minutes, gpus_per_node=settings.gpus or 0,
                                   signal_delay_s=int(min(90, minutes * 60 / 2)))
        return executor
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm: 'sbatch' is not on PATH, so this is not a Slurm login node. "
                          "Run the launcher where sbatch works, or use --slurm-dry-run to see the "
                          "script, or --slurm-cluster local to run the array here.")
    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**sbatch_parameters(settings, tasks))
    return executor


def submit_array(executor, tasks: Sequence[ArrayTask]) -> list[Any]:
    """Submit every task as one job array; returns submitit's jobs, in task order."""
    with executor.batch():
        jobs = [executor.submit(task) for task in tasks]
    return jobs


def job_log_path(job) -> str:
    """Where a job's output lands (stdout and, with our tasks, the train script's output)."""
    try:
        return str(job.paths.stdout)
    except Exception:  # a job whose paths submitit cannot name yet
        return "-"


# ---------------------------------------------------------------------------------------------
# Multi-node: accelerate launch from inside a Slurm allocation


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,07],login1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu07', 'login1'] (what
    `scontrol show hostnames` prints, for the forms Slurm writes)."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(prefix + low)
                continue
            hosts.extend(f"{prefix}{number:0{len(low)}d}" for number in range(int(low), int(high) + 1))
    return hosts


def _gpus_on_node(environment: Mapping[str, str]) -> Optional[int]:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = environment.get(name, "")
        digits = value.rsplit(":", 1)[-1]  # 'a100:4' -> '4'
        if digits.isdigit():
            return int(digits)
    visible = environment.get("CUDA_VISIBLE_DEVICES", "")
    if visible and visible not in ("-1", "NoDevFiles"):
        return len(visible.split(","))
    return None


def accelerate_launch_command(environment: Mapping[str, str], script_and_args: Sequence[str], *,
                              processes_per_node: Optional[int] = None,
                              port: Optional[int] = None, accelerate: str = "accelerate") -> list[str]:
    """The `accelerate launch` command for this node of a Slurm allocation.

    Reads SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST (or MASTER_ADDR / MASTER_PORT when the
    batch script exported them) and the GPUs on the node. One such command runs per node
    (`srun --ntasks-per-node=1`); accelerate starts one process per GPU on its node.
    """
    def need(name: str) -> str:
        value = environment.get(name)
        if not value:
            raise ConfigError(f"{name} is not set: run this inside a Slurm allocation, one task per node "
                              "(srun --ntasks-per-node=1 python -m difftrain.slurm accelerate -- ...).")
        return value

    machines = int(environment.get("SLURM_NNODES") or environment.get("SLURM_JOB_NUM_NODES") or need("SLURM_NNODES"))
    machine_rank = int(need("SLURM_NODEID"))
    main_address = environment.get("MASTER_ADDR") or expand_nodelist(need("SLURM_JOB_NODELIST"))[0]
    main_port = port or int(environment.get("MASTER_PORT") or DEFAULT_MAIN_PROCESS_PORT)
    per_node = processes_per_node or _gpus_on_node(environment)
    if not per_node:
        raise ConfigError("cannot tell how many GPUs this node has (no SLURM_GPUS_ON_NODE or "
                          "CUDA_VISIBLE_DEVICES): ask for GPUs with --gpus-per-node, or pass "
                          "--processes-per-node N.")
    if not script_and_args:
        raise ConfigError("give the train script and its arguments after '--', e.g. "
                          "python -m difftrain.slurm accelerate -- train.py --config my.json")
    multi = ["--multi_gpu"] if machines * per_node > 1 else []
    return [accelerate, "launch", *multi, "--num_machines", str(machines), "--machine_rank", str(machine_rank),
            "--main_process_ip", main_address, "--main_process_port", str(main_port),
            "--num_processes", str(machines * per_node), *script_and_args]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m difftrain.slurm accelerate [--print] [--processes-per-node N] [--port P] -- SCRIPT ARGS`."""
    import argparse

    arguments = list(sys.argv[1:] if argv is None else argv)
    script_and_args: list[str] = []
    if "--" in arguments:
        split = arguments.index("--")
        arguments, script_and_args = arguments[:split], arguments[split + 1:]
    parser = argparse.ArgumentParser(
        prog="python -m difftrain.slurm",
        description="Run on every node of a Slurm allocation (srun --ntasks-per-node=1): builds the "
                    "node's `accelerate launch` command from SLURM_* variables and runs it.")
    commands = parser.add_subparsers(dest="command", required=True)
    launch = commands.add_parser("accelerate", help="run (or --print) accelerate launch for this node")
    launch.add_argument("--print", action="store_true", help="print the command instead of running it")
    launch.add_argument("--processes-per-node", type=int, default=None, metavar="N",
                        help="processes on each node (default: the node's GPUs)")
    launch.add_argument("--port", type=int, default=None, help="main process port (default: "
                        f"MASTER_PORT or {DEFAULT_MAIN_PROCESS_PORT})")
    options = parser.parse_args(arguments)
    with exit_on_user_error("difftrain.slurm"):
        command = accelerate_launch_command(os.environ, script_and_args,
                                            processes_per_node=options.processes_per_node, port=options.port)
        if options.print:
            # The command itself, for a shell to capture ($(...)): data on stdout, not a message.
            sys.stdout.write(shlex.join(command) + "\n")
            return 0
        sys.stdout.flush()
        os.execvp(command[0], command)
    return 0  # not reached: execvp replaces this process


if __name__ == "__main__":
    sys.exit(main())
