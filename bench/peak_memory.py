"""Peak memory: the engine's training steps vs the bare loop's (RSS on CPU, allocated VRAM on GPU).

Each side runs in its own fresh process (a process's peak cannot be shared), alternating
engine, bare, engine, bare. Both processes build the same task through the same Accelerator
(same network, same data in memory, same libraries imported), then, at the start of the first
step, note their memory and reset the peak: on CPU the kernel's RSS high-water mark
(/proc/self/clear_refs), on GPU torch's allocator statistics. The peak over the training steps
that follow (gradients, optimizer state, activations, whatever the loop keeps) is compared.

    python bench/peak_memory.py
    python bench/peak_memory.py --device cuda --sd15-size      # SD1.5 UNet, 512 px, bf16, batch 4
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MARKER = "MEMORY "


def measure_engine(args, steps: int) -> dict:
    reading: dict = {}
    state = {"started": 0}

    def on_step_start(epoch, task, accelerator):
        device = accelerator.device
        if state["started"] == 0:
            common.synchronize(device)
            reading["setup"] = common.current_memory_bytes(device)
            reading["reset"] = common.reset_peak_memory(device)
        elif state["started"] == steps:
            common.synchronize(device)
            reading["peak"] = common.peak_memory_bytes(device)
            reading["device"] = common.device_description(device)
            reading["device_type"] = device.type
        state["started"] += 1

    common.run_engine(args, steps + 1, on_step_start)
    return reading


def measure_bare(args, steps: int) -> dict:
    import torch
    from accelerate import Accelerator

    import difftrain.trainer  # noqa: F401  (the engine's imports, so both processes carry the same libraries)

    config = common.engine_config(args, Path(tempfile.gettempdir()), max_steps=steps)
    precision = config.mixed_precision
    if precision == "auto":  # the engine's rule (difftrain.trainer.Trainer)
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    accelerator = Accelerator(mixed_precision=precision)
    if common.wants_sd_unet(args) and args.batch_size is None:
        config = config.model_copy(update={"batch_size": 4})
    from difftrain.tasks.base import StartPoint

    task = common.make_engine_task(args, config, accelerator, StartPoint())  # random weights: from scratch
    device = accelerator.device
    model = task.model.to(device)
    bare = common.BareLoop(model, config, task, device, precision)
    common.synchronize(device)
    reading = {"setup": common.current_memory_bytes(device), "reset": common.reset_peak_memory(device)}
    for _ in range(steps):
        bare.step()
    common.synchronize(device)
    reading["peak"] = common.peak_memory_bytes(device)
    reading["device"] = common.device_description(device)
    reading["device_type"] = device.type
    return reading


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    common.add_model_options(parser)
    parser.add_argument("--steps", type=int, default=None, help="training steps per process (default 20)")
    parser.add_argument("--repeats", type=int, default=None, help="processes per side (default 2)")
    parser.add_argument("--role", choices=["engine", "bare"], help=argparse_hidden())
    args = parser.parse_args()
    common.hide_gpu_unless(args.device)
    common.apply_threads(args)
    steps = args.steps or (2 if args.smoke else 20)
    if args.role:
        measure = measure_engine if args.role == "engine" else measure_bare
        print(MARKER + json.dumps(measure(args, steps)), flush=True)
        return

    common.pick_device(args.device)  # fail here, not in a child, when cuda is missing
    repeats = args.repeats or (1 if args.smoke else 2)
    passed = [arg for arg in sys.argv[1:] if not arg.startswith("--role")]
    readings: dict[str, list[dict]] = {"engine": [], "bare": []}
    for _ in range(repeats):
        for role in ("engine", "bare"):
            child = subprocess.run([sys.executable, __file__, *passed, "--role", role],
                                   capture_output=True, text=True)
            lines = [line for line in child.stdout.splitlines() if line.startswith(MARKER)]
            if child.returncode != 0 or not lines:
                sys.stderr.write(child.stdout + child.stderr)
                raise SystemExit(f"the {role} process failed (exit code {child.returncode})")
            readings[role].append(json.loads(lines[-1][len(MARKER):]))

    summary = {}
    for role, items in readings.items():
        summary[role] = {key: common.median([item[key] for item in items]) for key in ("setup", "peak")}
    engine, bare = summary["engine"], summary["bare"]
    kind = "allocated VRAM" if readings["engine"][0]["device_type"] == "cuda" else "RSS"
    common.say(f"commit {common.git_commit()}; device: {readings['engine'][0]['device']}; {steps} steps per process, "
               f"{repeats} process(es) per side; peak reset at the first step: "
               f"{all(item['reset'] for items in readings.values() for item in items)}")
    for role, values in summary.items():
        common.say(f"{role:6s} {kind}: before the first step {mib(values['setup'])}, peak during the steps "
                   f"{mib(values['peak'])} (+{mib(values['peak'] - values['setup'])})")
    added_bare = bare["peak"] - bare["setup"]
    if added_bare > 0:
        common.say(f"ratio of what the steps added: {(engine['peak'] - engine['setup']) / added_bare:.3f}")
    common.print_ratio(engine["peak"] / bare["peak"])


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
