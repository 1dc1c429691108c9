"""Trainer overhead: the engine's training step vs a bare PyTorch loop on the same network.

The engine is the real `difftrain.trainer.Trainer` running the real Kolmogorov task (or, with
--sd15-size / --sdxl-size, an SD-architecture UNet on random latents). A probe on the task's
`collate` marks the start of every engine step; after every block of engine steps the probe
runs the same number of bare steps (forward, backward, optimizer step on the same network, the
same optimizer settings and precision, a batch already on the device), so the two alternate
in one process for the whole run. The ratio is median(engine step) / median(bare step): 1.00
means the loop costs nothing, the target is <= 1.03.

    python bench/trainer_overhead.py                      # CPU, quickstart-sized network
    python bench/trainer_overhead.py --device cuda --sd15-size   # SD1.5 UNet, 512 px, bf16, batch 4
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    common.add_model_options(parser)
    parser.add_argument("--blocks", type=int, default=None,
                        help="alternations measured (default 300 on CPU, 100 on GPU)")
    parser.add_argument("--block-steps", type=int, default=None,
                        help="steps per block (default 1 on CPU; 10 on GPU, so that a host-device "
                             "sync inside the engine's step shows up as a pipeline stall)")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps of each side (default 10)")
    args = parser.parse_args()
    common.hide_gpu_unless(args.device)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    on_gpu = device.type == "cuda"
    blocks = args.blocks or (3 if args.smoke else 100 if on_gpu else 300)
    block_steps = args.block_steps or (2 if args.smoke else 10 if on_gpu else 1)
    warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 10)

    engine_times: list[float] = []
    bare_times: list[float] = []
    state = {"started": 0, "bare": None, "block_start": 0.0, "block_epoch": None, "flops": None,
             "precision": None}

    def on_step_start(epoch, task, accelerator):
        if state["bare"] is None:
            state["precision"] = accelerator.mixed_precision
            bare = common.BareLoop(task.model, trainer_config(), task, accelerator.device,
                                   accelerator.mixed_precision)
            for _ in range(warmup):
                bare.step()
            state["flops"] = common.flops_per_step(bare.step)
            state["bare"] = bare
        completed = state["started"]
        state["started"] += 1
        block_ends = completed > warmup and (completed - warmup) % block_steps == 0
        if completed < warmup or not (block_ends or completed == warmup):
            return  # no clock reading (and no sync) inside a block
        common.synchronize(accelerator.device)
        if block_ends:
            if epoch == state["block_epoch"]:  # a block across an epoch boundary is not a plain step
                engine_times.append((common.now() - state["block_start"]) / block_steps)
                start = common.now()
                for _ in range(block_steps):
                    state["bare"].step()
                common.synchronize(accelerator.device)
                bare_times.append((common.now() - start) / block_steps)
        state["block_start"], state["block_epoch"] = common.now(), epoch

    configs = {}

    def trainer_config():
        return configs["config"]

    max_steps = warmup + blocks * block_steps + 1
    # The bare loop needs the engine's Config (for make_optimizer); build it the same way.
    import tempfile

    configs["config"] = common.engine_config(args, Path(tempfile.gettempdir()), max_steps=max_steps)
    trainer = common.run_engine(args, max_steps, on_step_start)
    if not engine_times:
        raise SystemExit("no block was measured; raise --blocks")

    engine, bare = common.median(engine_times), common.median(bare_times)
    mean_ratio = sum(engine_times) / sum(bare_times)
    what = {"sd1": "SD1.5 UNet", "sdxl": "SDXL UNet"}.get(common.wants_sd_unet(args), "Kolmogorov score network")
    common.say(f"device: {common.device_description(device)}; precision: {state['precision']}; "
               f"model: {what}; batch: {trainer.config.batch_size}; tracker: {trainer.config.tracker}")
    common.say(f"measured {len(engine_times)} alternations of {block_steps} step(s) each "
               f"(after {warmup} warm-up steps per side)")
    common.say(f"engine: {1 / engine:.2f} steps/s (median {engine * 1e3:.2f} ms/step)")
    common.say(f"bare:   {1 / bare:.2f} steps/s (median {bare * 1e3:.2f} ms/step)")
    common.say(f"ratio of totals (mean): {mean_ratio:.3f}")
    peak = common.peak_bf16_flops(device)
    if state["flops"]:
        common.say(f"model FLOPs per step (forward + backward): {state['flops'] / 1e9:.2f} GFLOP")
        if peak:
            common.say(f"MFU: engine {state['flops'] / engine / peak:.1%}, bare {state['flops'] / bare / peak:.1%} "
                       f"of {peak / 1e12:.0f} TFLOP/s bf16")
    common.print_ratio(engine / bare)


if __name__ == "__main__":
    main()
