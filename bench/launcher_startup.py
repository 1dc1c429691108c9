"""Launcher start-up: from `python train_json_edit.py ...` starting to the train script starting,
against the time `python -c "import torch"` takes.

The train script is tests/standin_train.py, which records the wall-clock time at which it has
started (interpreter up, config read) and exits: what is measured is the launcher's own cost
(its Python start, argument parsing, config edit and write, spawning the child) plus the
child's interpreter start. The launcher imports no torch by design, so the ratio should be
well below 1: a ratio near or above 1 means something heavy crept into its imports. Both
commands alternate, many times, and the medians are compared.

    python bench/launcher_startup.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

STANDIN = common.REPO / "tests" / "standin_train.py"
LAUNCHER = common.REPO / "train_json_edit.py"
BASE_CONFIG = common.REPO / "configs" / "quickstart.json"


def time_launcher(folder: Path) -> float:
    """Seconds from starting the launcher to the stand-in child's recorded start."""
    record = folder / "record.jsonl"
    record.unlink(missing_ok=True)
    env = {**os.environ, "STANDIN_RECORD": str(record)}
    command = [sys.executable, str(LAUNCHER), str(BASE_CONFIG), "--override", "lr:0.0005",
               "--train-script-path", str(STANDIN), "--temp-config-dir", str(folder / "temp_configs"),
               "--delete-temp-config"]
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the launcher failed (exit code {result.returncode}):\n{result.stdout}{result.stderr}")
    entries = [json.loads(line) for line in record.read_text().splitlines()]
    return entries[-1]["started"] - started


def time_command(code: str) -> float:
    """Seconds `python -c code` takes from start to exit."""
    started = time.time()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.time() - started


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None, help="alternations (default 30)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.smoke else 30)
    launcher, torch_import, bare_python = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-launch-") as folder:
        if not args.smoke:
            time_launcher(Path(folder))  # warm the file cache once for every side
            time_command("import torch")
        for _ in range(repeats):
            launcher.append(time_launcher(Path(folder)))
            torch_import.append(time_command("import torch"))
            bare_python.append(time_command("pass"))
    common.say(f"commit {common.git_commit()}; device: {common.cpu_model()} ({os.cpu_count()} logical cores); {repeats} alternations")
    common.say(f"python -c pass:            median {common.median(bare_python) * 1e3:.0f} ms")
    common.say(f"launcher -> child started: median {common.median(launcher) * 1e3:.0f} ms")
    common.say(f"python -c 'import torch':  median {common.median(torch_import) * 1e3:.0f} ms")
    common.print_ratio(common.median(launcher) / common.median(torch_import))


if __name__ == "__main__":
    main()
