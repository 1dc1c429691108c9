"""Reflow quality on the Kolmogorov quickstart: does each reflow iteration straighten the flow?

Trains `configs/quickstart_reflow.json` (rectified flow, then 2 reflow iterations) through the
real front door, and reads what the engine measured on a fixed batch of noise after the initial
training and after every reflow iteration: `straightness` (the integral over t of
E||(z1 - z0) - v(z_t, t)||^2; 0 is perfectly straight) and the distance between the 1-step and
the N-step samples from the same noise. Both are printed as ratios to the first measurement
(below 1: straighter than after the initial training). The last line is the final
straightness ratio.

    python bench/reflow_quality.py            # the preset as shipped (a few minutes on 2 cores)
    python bench/reflow_quality.py --smoke    # tiny sizes, seconds: checks the wiring only
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PRESET = common.REPO / "configs" / "quickstart_reflow.json"


def main() -> None:
    args = common.base_parser(__doc__.splitlines()[0]).parse_args()
    common.hide_gpu_unless(args.device)
    settings = json.loads(PRESET.read_text(encoding="utf-8"))
    workdir = Path(tempfile.mkdtemp(prefix="reflow-quality-"))
    settings.update({"tracker": "none", "runs_dir": str(workdir / "runs"), "logdir": str(workdir / "logs"),
                     "save_every_n_epochs": 0, "ckpt_every_n_minutes": 0})
    if args.smoke:
        settings.update(common.SMOKE_SETTINGS)
        settings.update({"data_root": str(workdir / "data"), "max_epochs": 1, "reflow_gen_batches": 2,
                         "reflow_train_epochs": 1, "reflow_sample_steps": 2, "sample_inference_steps": 2})
    config_path = workdir / "config.json"
    config_path.write_text(json.dumps(settings), encoding="utf-8")
    command = [sys.executable, str(common.REPO / "train.py"), str(config_path)]
    if args.threads or args.smoke:
        command = [sys.executable, "-c", "import runpy,sys,torch; torch.set_num_threads(1); "
                   "sys.argv=sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')",
                   *command[1:]]
    result = subprocess.run(command, cwd=common.REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"training failed ({result.returncode}):\n{result.stderr[-3000:]}")
    (run_folder,) = (workdir / "runs").iterdir()
    events = [json.loads(line) for line in (run_folder / "metrics.jsonl").open(encoding="utf-8")]
    measured = [event for event in events if "straightness" in event]
    first = measured[0]
    common.say(f"device: {common.device_description(common.pick_device(args.device))}; "
               f"commit {common.git_commit()}; preset {PRESET.name}{' (smoke)' if args.smoke else ''}")
    common.say(f"{'after':>22} {'straightness':>13} {'ratio':>7} {'1-vs-N dist':>12} {'ratio':>7}")
    for event in measured:
        stage = "initial training" if event["reflow_stage"] == 0 else f"reflow {event['reflow_stage']}"
        common.say(f"{stage:>22} {event['straightness']:13.5f} {event['straightness'] / first['straightness']:7.3f} "
                   f"{event['one_vs_n_step_distance']:12.5f} "
                   f"{event['one_vs_n_step_distance'] / first['one_vs_n_step_distance']:7.3f}")
    common.print_ratio(measured[-1]["straightness"] / first["straightness"])


if __name__ == "__main__":
    main()
