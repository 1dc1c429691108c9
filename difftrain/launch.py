"""The launcher behind ``train_json_edit.py``: base JSON + overrides -> temp config -> train script.

It owns a handful of options and passes everything else to the train script unchanged and in
order. It imports nothing heavy (no torch), so it starts at once; the schema (pydantic) is only
imported when the train script is one of this repo's trainers, to fail bad values before a
multi-minute model load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any, Optional, Sequence

from difftrain import log
from difftrain.errors import ConfigError, exit_on_user_error
from difftrain.jsonfile import read_json_object
from difftrain.log import say
from difftrain.overrides import (
    MISSING,
    Change,
    Override,
    Sweep,
    apply_overrides,
    format_value,
    parse_override,
    parse_sweep,
)

PROGRAM = "train_json_edit.py"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TRAIN_SCRIPT = REPO_ROOT / "train_j.py"
DEFAULT_TEMP_CONFIG_DIR = REPO_ROOT / "temp_configs"
OUR_TRAINERS = ("train_j.py", "train.py")
RUN_FOLDER_LINE = re.compile(r"^run folder: (.+?)\s*$")

# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own options. Whatever else is on the command line is the train script's."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        usage=f"{PROGRAM} json_path [--override KEY:VALUE ...] [launcher options] "
              "[train script arguments] [-- more train script arguments]",
        description="Run a train script on a base JSON config edited from the command line. "
                    "The edited config is written to a new file in the temp config folder, and "
                    "the train script gets its path as first argument, followed by every argument "
                    "this launcher does not own (--models-dir, --ckpt-dir, --vae-dir, --lora-dir, "
                    "--te-dir, ...), unchanged and in order. Arguments after '--' always go to "
                    "the train script.",
        epilog="Values are typed: 4 -> int, 1e-4 -> float, true/True/false/False -> bool, "
               "null/None -> null, [1,2] -> list, {\"a\": 1} -> dict, quoted ('\"0001\"') or "
               "anything else -> string. Keys are dot-paths ('2nd pass.train_learning_rate', "
               "list.0) and may hold spaces and parentheses ('image_size(height, width):640,768'); "
               "'+KEY:VALUE' adds a key that does not exist yet. See docs/launcher.md.",
        # An abbreviation of ours (--over) may well be one of the train script's options.
        allow_abbrev=False,
    )
    # Not an argparse positional: parse_known_args would give it the value of a train-script
    # option written before it (`--models-dir /m base.json`). parse_command_line picks it.
    parser.add_argument_group(
        "base config", "json_path: the base JSON config, written first (required; it is never "
                       "modified)")
    _add_run_options(parser)
    _add_slurm_options(parser)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--override", nargs="+", action="extend", default=[], metavar="KEY:VALUE",
        help="set a key of the config; repeatable, several pairs per flag, the last value for "
             "a key wins",
    )
    parser.add_argument(
        "--train-script-path", default=None, metavar="PATH",
        help=f"train script to run (default: train_j.py beside {PROGRAM})",
    )
    parser.add_argument(
        "--temp-config-dir", default=None, metavar="DIR",
        help=f"where edited configs are written (default: temp_configs beside {PROGRAM})",
    )
    parser.add_argument(
        "--delete-temp-config", action="store_true",
        help="delete the edited config after the run (also when it fails or is interrupted)",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="print the changed keys and the command, write nothing and run nothing",
    )
    parser.add_argument(
        "--sweep", nargs="+", action="extend", default=[], metavar="KEY:[V1,V2,...]",
        help="run once per value; several sweeps make a grid (every combination)",
    )
    parser.add_argument(
        "--runs", type=int, default=1, metavar="N",
        help="repeat each configuration N times (independent runs)",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, metavar="N",
        help="how many runs go at once (default: on this machine 1, one after another; "
             "with --slurm all of them)",
    )


def _add_slurm_options(parser: argparse.ArgumentParser) -> None:
    slurm = parser.add_argument_group(
        "Slurm", "submit every run as one task of ONE job array (through submitit); "
                 "see docs/scaling.md. The --slurm-* options that take a value apply only with "
                 "--slurm or --slurm-dry-run.")
    slurm.add_argument("--slurm", action="store_true",
                       help="submit the runs to Slurm instead of running them here")
    slurm.add_argument("--slurm-dry-run", action="store_true",
                       help="print the sbatch script and each task's command; submit nothing")
    slurm.add_argument("--slurm-wait", action="store_true",
                       help="wait for every task and print their exit codes and run folders")
    slurm.add_argument("--slurm-partition", metavar="NAME", help="partition (sbatch --partition)")
    slurm.add_argument("--slurm-gpus", type=int, metavar="N", help="GPUs per task (--gpus-per-node)")
    slurm.add_argument("--slurm-cpus", type=int, metavar="N", help="CPU cores per task (--cpus-per-task)")
    slurm.add_argument("--slurm-mem", metavar="SIZE", help="memory per task: 32G, 500M (--mem)")
    slurm.add_argument("--slurm-time", metavar="TIME",
                       help="time limit per task: minutes or [D-]HH:MM:SS (--time)")
    slurm.add_argument("--slurm-account", metavar="NAME", help="account to charge (--account)")
    slurm.add_argument("--slurm-qos", metavar="NAME", help="quality of service (--qos)")
    slurm.add_argument("--slurm-job-name", metavar="NAME", help="job name (default: difftrain)")
    slurm.add_argument("--slurm-folder", metavar="DIR",
                       help="where submitit keeps the job files and logs (default: slurm_logs)")
    slurm.add_argument("--slurm-cluster", metavar="KIND", choices=["slurm", "local"],
                       help="'local' runs the same array on this machine through submitit "
                            "(to try a sweep before queueing it); default slurm")


def parse_command_line(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's options (with ``json_path``) and the train script's arguments, in order.

    argparse takes the launcher's options wherever they are; everything it does not know stays
    in order for the train script, and everything after the first ``--`` goes there as is.
    """
    arguments = list(argv)
    after_separator: list[str] = []
    if "--" in arguments:
        cut = arguments.index("--")
        arguments, after_separator = arguments[:cut], arguments[cut + 1:]
    parser = build_parser()
    options, unknown = parser.parse_known_args(arguments)
    position = _json_path_position(unknown)
    if position is None:
        parser.error("the following arguments are required: json_path (write it first, before "
                     "the train script's arguments)")
    options.json_path = unknown.pop(position)
    return options, unknown + after_separator


def _json_path_position(unknown: list[str]) -> Optional[int]:
    """Where the base JSON is among the arguments the launcher does not own: the first bare one,
    unless it directly follows one of the train script's options written without '=', whose
    value it then is (`--models-dir /m base.json`)."""
    def is_option(token: str) -> bool:
        return token.startswith("-") and token != "-"

    for index, token in enumerate(unknown):
        previous = unknown[index - 1] if index else ""
        if not is_option(token) and not (is_option(previous) and "=" not in previous):
            return index
    return None


# ---------------------------------------------------------------------------------------------
# Planning: every run's config is resolved (and validated) before anything starts


@dataclass
class PlannedRun:
    """One launch: its config, where it will be written, and what happened to it."""

    number: int
    settings: dict[str, Any]
    repeat: int
    config: dict[str, Any]
    changes: list[Change]
    temp_path: Optional[Path] = None
    exit_code: Optional[int] = None
    run_folder: Optional[str] = None

    def label(self, repeats: int) -> str:
        parts = [f"{key}={format_value(value)}" for key, value in self.settings.items()]
        if repeats > 1:
            parts.append(f"repeat {self.repeat}/{repeats}")
        return ", ".join(parts) or "base"


@dataclass
class Plan:
    """Everything decided before launching."""

    base_path: Path
    train_script: Path
    temp_dir: Path
    passthrough: list[str]
    runs: list[PlannedRun]
    repeats: int
    jobs: int
    delete_temp_config: bool
    override_changes: list[Change]


def make_plan(options: argparse.Namespace, passthrough: list[str]) -> Plan:
    """Resolve every run's config; raises ConfigError before anything is written or launched."""
    if options.runs < 1:
        raise ConfigError(f"--runs must be at least 1, got {options.runs}")
    if options.jobs is not None and options.jobs < 1:
        raise ConfigError(f"--jobs must be at least 1, got {options.jobs}")
    base_path = Path(options.json_path)
    base = read_json_object(base_path)
    overrides = [parse_override(text) for text in options.override]
    sweeps = [parse_sweep(text) for text in options.sweep]

    source = str(base_path)
    train_script = Path(options.train_script_path or DEFAULT_TRAIN_SCRIPT)
    ours = _is_our_trainer(train_script)
    traintrain_door = ours and train_script.name == "train_j.py"
    if ours:
        overrides = _resolve_schema_names(overrides, base, traintrain_door)
    overridden, override_changes = apply_overrides(base, overrides, source)
    if ours:
        sweeps = _resolve_schema_names(sweeps, overridden, traintrain_door)
    _check_sweeps_do_not_clash(overrides, sweeps)
    runs: list[PlannedRun] = []
    combinations = itertools.product(*(sweep.values for sweep in sweeps))
    for combination in combinations:
        sweep_overrides = [
            Override(key=sweep.key, value=value, create=sweep.create, text=sweep.text)
            for sweep, value in zip(sweeps, combination)
        ]
        config, sweep_changes = apply_overrides(overridden, sweep_overrides, source)
        settings = {sweep.key: value for sweep, value in zip(sweeps, combination)}
        for repeat in range(1, options.runs + 1):
            runs.append(PlannedRun(number=len(runs) + 1, settings=settings, repeat=repeat,
                                   config=config, changes=override_changes + sweep_changes))

    if ours:
        _validate_with_schema(runs, source, options.runs, traintrain_door)
    if not train_script.is_file():
        raise ConfigError(
            f"train script not found: {train_script}. Pass the right one with "
            "--train-script-path PATH"
        )
    temp_dir = Path(options.temp_config_dir or DEFAULT_TEMP_CONFIG_DIR)
    if temp_dir.exists() and not temp_dir.is_dir():
        raise ConfigError(f"--temp-config-dir {temp_dir} exists and is not a folder")
    return Plan(base_path=base_path, train_script=train_script, temp_dir=temp_dir,
                passthrough=passthrough, runs=runs, repeats=options.runs, jobs=options.jobs or 1,
                delete_temp_config=options.delete_temp_config,
                override_changes=override_changes)


def _check_sweeps_do_not_clash(overrides: list[Override], sweeps: list[Sweep]) -> None:
    overridden = {override.key for override in overrides}
    seen: set[str] = set()
    for sweep in sweeps:
        if sweep.key in overridden:
            raise ConfigError(
                f"--sweep {sweep.text!r} sets {sweep.key!r}, which --override also sets; "
                "keep one of them"
            )
        if sweep.key in seen:
            raise ConfigError(f"{sweep.key!r} is swept twice; put all its values in one list")
        seen.add(sweep.key)


def _resolve_schema_names(items: list[Any], base: dict[str, Any], traintrain_door: bool = False) -> list[Any]:
    """For our trainers, a key the schema knows need not be in the file to be overridden.

    ``lr:1e-4`` on a TrainTrain preset sets its ``train_learning_rate`` (the same setting under
    another name, so the config never holds both), and a known setting the preset leaves at its
    default is added. A missing "2nd pass" object is still an error: creating one would be
    silently ignored unless use_2nd_pass_settings is on. For train_j.py, TrainTrain's keys are
    known by their table (difftrain/vocab/traintrain.py) and a created key takes their spelling.
    """
    from difftrain.config import ALIASES, FIELD_NAMES, PER_PASS_NAMES
    from difftrain.vocab.traintrain import SECOND_PASS as SECOND_PASS_KEY, our_setting, their_key

    def canonical(name: str) -> Optional[str]:
        return name if name in FIELD_NAMES else ALIASES.get(name) or our_setting(name)

    resolved = []
    for item in items:
        head, dot, rest = item.key.partition(".")
        scope, names, prefix, key = base, FIELD_NAMES, "", head
        if dot and head == SECOND_PASS_KEY and isinstance(base.get(head), dict) and "." not in rest:
            scope, names, prefix, key = base[head], PER_PASS_NAMES, f"{head}.", rest
        elif dot:
            resolved.append(item)
            continue
        setting = canonical(key)
        if item.create or key in scope or setting is None or setting not in names \
                or setting == "second_pass":
            resolved.append(item)
            continue
        same_setting = [existing for existing in scope if canonical(existing) == setting]
        if same_setting:
            resolved.append(replace(item, key=prefix + same_setting[0]))
        else:
            spelling = (their_key(setting) if traintrain_door else None) or key
            resolved.append(replace(item, key=prefix + spelling, create=True))
    return resolved


def _is_our_trainer(train_script: Path) -> bool:
    resolved = train_script.resolve()
    return any(resolved == (REPO_ROOT / name).resolve() for name in OUR_TRAINERS)


def _validate_with_schema(runs: list[PlannedRun], source: str, repeats: int, traintrain_door: bool = False) -> None:
    # Lazy: pydantic is light but not free, and other train scripts have their own schema.
    from difftrain.config import validate_config_dict
    from difftrain.vocab import traintrain

    checked_first_of_each = (run for run in runs if run.repeat == 1)
    for run in checked_first_of_each:
        where = f"{source} with the command-line overrides"
        if run.settings:
            where += f" ({run.label(repeats)})"
        if traintrain_door:  # the same translation train_j.py makes; the run prints its notes
            traintrain.load(None, data=run.config, say_notes=False, require_model=False, source=where)
        else:
            validate_config_dict(run.config, where)


# ---------------------------------------------------------------------------------------------
# Temp configs


def temp_config_path(plan: Plan, run: PlannedRun) -> Path:
    """A fresh name: base stem, local time, pid and random characters (unique under races)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_part = f"_run{run.number}" if len(plan.runs) > 1 else ""
    name = f"{plan.base_path.stem}_{stamp}_{os.getpid()}_{_random_hex()}{run_part}.json"
    return Path(os.path.abspath(plan.temp_dir / name))


def _random_hex() -> str:
    # Not the secrets module: it imports hashlib and hmac, a few ms of start-up for six letters.
    return os.urandom(3).hex()


def write_temp_config(plan: Plan, run: PlannedRun) -> Path:
    """Write the run's config to a new file and return its path; never overwrites a file."""
    try:
        plan.temp_dir.mkdir(parents=True, exist_ok=True)
        return _write_new_file(plan, run)
    except OSError as error:
        raise ConfigError(
            f"cannot write the temp config in {plan.temp_dir}: {error.strerror or error}. "
            "Choose another folder with --temp-config-dir DIR"
        ) from None


def _write_new_file(plan: Plan, run: PlannedRun) -> Path:
    text = json.dumps(run.config, indent=2, ensure_ascii=False) + "\n"
    for _ in range(20):
        path = temp_config_path(plan, run)
        try:
            # Exclusive creation reserves the name; the content arrives by an atomic rename, so
            # a reader never sees half a file.
            with open(path, "x", encoding="utf-8"):
                pass
        except FileExistsError:
            continue
        staging = path.with_name(f".{path.name}.partial")
        try:
            with open(staging, "w", encoding="utf-8", newline="\n") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(staging, path)
        except BaseException:
            _remove_quietly(staging)
            _remove_quietly(path)
            raise
        return path
    raise ConfigError(f"could not find a free file name in {plan.temp_dir}")


def _remove_quietly(path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Running


def command_for(plan: Plan, config_path: Path) -> list[str]:
    """The child's argv: same Python, train script, config path, then the pass-through args.

    Both of our trainers (and TrainTrain's) take the config path as their first argument.
    """
    return [sys.executable, str(plan.train_script), str(config_path), *plan.passthrough]


def format_command(command: Sequence[str]) -> str:
    """A command line the user can paste into their shell."""
    if os.name == "nt":
        return subprocess.list2cmdline(list(command))
    return shlex.join(command)


def _exit_status(returncode: int) -> int:
    # Popen reports death by signal N as -N; shells say 128 + N, which also fits an exit status.
    return 128 - returncode if returncode < 0 else returncode


class _SignalRelay:
    """While children run: Ctrl-C reaches them directly (same process group), so the launcher
    only notes it and stops starting new runs; SIGTERM is sent to us alone, so we pass it on.

    A Python handler, not SIG_IGN, because an ignored signal stays ignored in the child after
    exec and the trainer could then never be interrupted.
    """

    def __init__(self) -> None:
        self.children: list[subprocess.Popen] = []
        self.stop_signal: Optional[int] = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_SignalRelay":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum
        if signum == signal.SIGTERM:
            for child in self.children:
                if child.poll() is None:
                    try:
                        child.send_signal(signal.SIGTERM)
                    except OSError:
                        pass


class _OutputPump(threading.Thread):
    """Copies a child's stdout to ours (with a prefix when runs overlap) and spots its run folder."""

    def __init__(self, run: PlannedRun, stream: IO[bytes], prefix: str, lock: threading.Lock,
                 errors: Optional[IO[bytes]] = None):
        super().__init__(daemon=True)
        self.run_record = run
        self.stream = stream
        self.prefix = prefix.encode()
        self.lock = lock
        self.errors = _StderrScanner(run, errors) if errors is not None else None

    def run(self) -> None:
        if self.errors is not None:
            self.errors.start()
        self._copy_stdout()
        if self.errors is not None:
            self.errors.join()

    def _copy_stdout(self) -> None:
        target = getattr(sys.stdout, "buffer", None)
        for line in iter(self.stream.readline, b""):
            decoded = line.decode("utf-8", errors="replace")
            match = RUN_FOLDER_LINE.match(decoded)
            if match:
                self.run_record.run_folder = match.group(1)
            with self.lock:
                if target is not None:
                    target.write(self.prefix + line)
                    target.flush()
                else:
                    sys.stdout.write(self.prefix.decode() + decoded)
                    sys.stdout.flush()
        self.stream.close()


class _StderrScanner(threading.Thread):
    """Passes a child's stderr through as it comes, unprefixed (progress bars redraw with a
    carriage return and no newline, so it cannot wait for whole lines), and spots the
    'run folder:' line our trainers print there."""

    def __init__(self, run: PlannedRun, stream: IO[bytes]):
        super().__init__(daemon=True)
        self.run_record = run
        self.stream = stream

    def run(self) -> None:
        target = getattr(sys.stderr, "buffer", None)
        tail = b""
        while chunk := os.read(self.stream.fileno(), 65536):
            if target is not None:
                target.write(chunk)
                target.flush()
            else:
                sys.stderr.write(chunk.decode("utf-8", errors="replace"))
                sys.stderr.flush()
            *lines, tail = re.split(rb"[\r\n]", tail + chunk)
            tail = tail[-4096:]  # a progress bar never ends its line
            for line in lines:
                match = RUN_FOLDER_LINE.match(line.decode("utf-8", errors="replace"))
                if match and self.run_record.run_folder is None:
                    self.run_record.run_folder = match.group(1)
        self.stream.close()


@dataclass
class _Child:
    """A started run: its train script process and, when runs share the terminal, its pump."""

    run: PlannedRun
    process: subprocess.Popen
    pump: Optional[_OutputPump]

    def ended(self, wait: bool) -> bool:
        """Whether the process has exited (waiting for it if `wait`); records its exit code."""
        returncode = self.process.wait() if wait else self.process.poll()
        if returncode is None:
            return False
        if self.pump is not None:
            self.pump.join()  # the last lines (and the run folder) are in once the pipe closes
        self.run.exit_code = _exit_status(returncode)
        return True

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait()


def execute(plan: Plan) -> int:
    """Run every planned run (``plan.jobs`` at a time); return the launcher's exit status."""
    single = len(plan.runs) == 1
    pending = list(plan.runs)
    active: list[_Child] = []
    output_lock = threading.Lock()
    child_env = dict(os.environ)
    if not single:
        # Piped stdout is block-buffered in a Python child; lines must arrive as printed.
        child_env["PYTHONUNBUFFERED"] = "1"
    with _SignalRelay() as relay:
        try:
            while active or (pending and relay.stop_signal is None):
                while pending and len(active) < plan.jobs and relay.stop_signal is None:
                    active.append(_start(plan, pending.pop(0), single, child_env, relay,
                                         output_lock))
                if not single:
                    time.sleep(0.05)
                for child in [child for child in active if child.ended(wait=single)]:
                    active.remove(child)
                    _finish(plan, child.run)
                    if plan.jobs == 1 and not single:
                        _say(f"run {child.run.number}/{len(plan.runs)} ended with exit code "
                             f"{child.run.exit_code}")
        finally:
            # Only reached with children alive if the launcher itself crashed: do not orphan them.
            for child in active:
                child.stop()
                _finish(plan, child.run)
    if not single:
        say_summary(plan)
    return _overall_status(plan, relay.stop_signal)


def _start(plan: Plan, run: PlannedRun, single: bool, env: dict[str, str], relay: _SignalRelay,
           output_lock: threading.Lock) -> _Child:
    run.temp_path = write_temp_config(plan, run)
    command = command_for(plan, run.temp_path)
    lines = [] if single else [f"run {run.number}/{len(plan.runs)} [{run.label(plan.repeats)}]"]
    _say(*lines, f"config {run.temp_path}", f"running {format_command(command)}")
    try:
        process = subprocess.Popen(command, env=env,
                                   stdout=None if single else subprocess.PIPE,
                                   stderr=None if single else subprocess.PIPE)
    except OSError as error:
        _finish(plan, run)
        raise ConfigError(f"cannot start {command[0]}: {error}") from None
    relay.children.append(process)
    pump = None
    if not single:
        prefix = f"[{run.number}] " if plan.jobs > 1 else ""
        pump = _OutputPump(run, process.stdout, prefix, output_lock, errors=process.stderr)
        pump.start()
    return _Child(run, process, pump)


def _finish(plan: Plan, run: PlannedRun) -> None:
    if plan.delete_temp_config and run.temp_path is not None:
        _remove_quietly(run.temp_path)


def _overall_status(plan: Plan, stop_signal: Optional[int]) -> int:
    for run in plan.runs:
        if run.exit_code:
            return run.exit_code
    if stop_signal is not None and any(run.exit_code is None for run in plan.runs):
        return 128 + stop_signal
    return 0


# ---------------------------------------------------------------------------------------------
# What the launcher says (through difftrain/log.py, on stderr like the trainers' own messages;
# stdout carries the train scripts' output)


def _say(*lines: str) -> None:
    """Each line prefixed with the program's name, so it stands out among the trainer's."""
    say("\n".join(f"{PROGRAM}: {line}" for line in lines))


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in rows)


def say_summary(plan: Plan) -> None:
    """A table of every run: its settings, exit code, run folder and config file."""
    rows = [("run", "settings", "exit", "run folder", "config")]
    for run in plan.runs:
        exit_text = "not run" if run.exit_code is None else str(run.exit_code)
        config_text = "-" if run.temp_path is None else (
            f"{run.temp_path} (deleted)" if plan.delete_temp_config else str(run.temp_path))
        rows.append((str(run.number), run.label(plan.repeats), exit_text,
                     run.run_folder or "-", config_text))
    say(f"\n{PROGRAM}: summary of {len(plan.runs)} runs\n{_table(rows)}")


def say_changes(changes: list[Change]) -> None:
    """Show old -> new for each key the overrides touched."""
    if not changes:
        _say("no keys changed")
        return
    lines = [f"{PROGRAM}: changed keys (old -> new):"]
    for change in changes:
        note = "" if change.changed else "  (unchanged)"
        old = "(new key)" if change.old is MISSING else format_value(change.old)
        lines.append(f"  {change.key}: {old} -> {format_value(change.new)}{note}")
    say("\n".join(lines))


def say_dry_run(plan: Plan) -> None:
    """What would happen, without writing or running anything."""
    for run in plan.runs:
        if len(plan.runs) > 1:
            _say(f"run {run.number}/{len(plan.runs)} [{run.label(plan.repeats)}]")
        say_changes(run.changes)
        planned = temp_config_path(plan, run)
        _say(f"would write {planned}",
             f"would run {format_command(command_for(plan, planned))}")


# ---------------------------------------------------------------------------------------------
# Entry point


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, plan, and run; returns the exit status (the train script's, or 2 for a mistake)."""
    log.setup()
    options, passthrough = parse_command_line(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error(PROGRAM):
        plan = make_plan(options, passthrough)
        slurm = slurm_settings(options)
        if slurm is not None and (options.dry_run or options.slurm_dry_run):
            say_slurm_dry_run(plan, slurm)
            return 0
        if options.dry_run:
            say_dry_run(plan)
            return 0
        say_changes(plan.runs[0].changes if len(plan.runs) == 1 else plan.override_changes)
        if slurm is not None:
            return execute_on_slurm(plan, slurm, wait=options.slurm_wait or slurm.cluster == "local")
        return execute(plan)


# ---------------------------------------------------------------------------------------------
# Slurm: every run is one task of one job array (difftrain/slurm.py does the submitit part)


def slurm_settings(options: argparse.Namespace):
    """The array's resources from the --slurm-* options; None when not submitting to Slurm."""
    if not (options.slurm or options.slurm_dry_run):
        given = [name for name, value in vars(options).items()
                 if name.startswith("slurm_") and value not in (None, False)]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise ConfigError(f"{flag} only applies with --slurm (or --slurm-dry-run); add --slurm")
        return None
    from difftrain.slurm import DEFAULT_LOG_FOLDER, SlurmSettings, check_settings, parse_memory_gb

    settings = SlurmSettings(
        partition=options.slurm_partition, gpus=options.slurm_gpus, cpus=options.slurm_cpus,
        mem_gb=None if options.slurm_mem is None else parse_memory_gb(options.slurm_mem),
        time=options.slurm_time, account=options.slurm_account, qos=options.slurm_qos,
        parallel=options.jobs, job_name=options.slurm_job_name or "difftrain",
        folder=options.slurm_folder or DEFAULT_LOG_FOLDER, cluster=options.slurm_cluster or "slurm")
    check_settings(settings)
    return settings


def say_slurm_dry_run(plan: Plan, settings) -> None:
    """Each task's changes and command, then the sbatch script; nothing is written."""
    from difftrain.slurm import sbatch_script

    plan = _with_absolute_train_script(plan)
    for index, run in enumerate(plan.runs):
        _say(f"array task {index} (run {run.number}/{len(plan.runs)}) [{run.label(plan.repeats)}]")
        say_changes(run.changes)
        planned = temp_config_path(plan, run)
        _say(f"would write {planned}",
             f"task {index} would run {format_command(command_for(plan, planned))}")
    _say(f"would submit this sbatch script ({len(plan.runs)} task(s), submitit runs each task's "
         "command):\n")
    say(sbatch_script(settings, len(plan.runs)))


def _with_absolute_train_script(plan: Plan) -> Plan:
    # A task may start in another folder than the launcher's (sbatch --chdir, a requeue).
    return replace(plan, train_script=plan.train_script.absolute())


def execute_on_slurm(plan: Plan, settings, *, wait: bool) -> int:
    """Write every run's temp config and submit them as one job array; with `wait`, wait for
    the tasks and return the launcher's usual exit status."""
    from difftrain.slurm import ArrayTask, job_log_path, make_executor, submit_array

    executor = make_executor(settings, len(plan.runs))
    plan = _with_absolute_train_script(plan)
    resumable = _is_our_trainer(plan.train_script)
    tasks = []
    for run in plan.runs:
        run.temp_path = write_temp_config(plan, run)
        tasks.append(ArrayTask(command_for(plan, run.temp_path), str(run.temp_path),
                               resumable=resumable, delete_config=plan.delete_temp_config))
    try:
        jobs = submit_array(executor, tasks)
    except Exception as error:  # sbatch's refusal (bad partition, account, limits) is the user's to fix
        raise ConfigError(f"the job array was not submitted: {error}") from None
    array_id = str(jobs[0].job_id).split("_")[0]
    where = f"as job array {array_id}" if settings.cluster == "slurm" else \
        "to submitit's local executor (one process per run, all at once)"
    rows = [("task", "settings", "job", "log", "config")]
    rows += [(str(index), run.label(plan.repeats), str(job.job_id), job_log_path(job),
              str(run.temp_path)) for index, (run, job) in enumerate(zip(plan.runs, jobs))]
    _say(f"submitted {len(jobs)} run(s) {where}; each task's output is in its log file")
    say(_table(rows))
    if not wait:
        _say(f"follow with squeue -j {array_id}; cancel with scancel {array_id}")
        return 0
    return _wait_for_array(plan, jobs, array_id)


def _wait_for_array(plan: Plan, jobs: list[Any], array_id: str) -> int:
    try:
        for run, job in zip(plan.runs, jobs):
            try:
                result = job.result()
            except Exception as error:  # the task itself failed (killed, out of memory, ...)
                _say(f"run {run.number} failed: {str(error).strip().splitlines()[-1:]}")
                run.exit_code = 1
                continue
            run.exit_code, run.run_folder = result["exit_code"], result["run_folder"]
    except KeyboardInterrupt:
        say(f"\n{PROGRAM}: stopped waiting; the array keeps running (scancel {array_id} stops it)")
        return 130
    say_summary(plan)
    return _overall_status(plan, None)
