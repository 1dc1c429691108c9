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
    common.add_alternation_options(parser, "bare loop")
    args = parser.parse_args()
    common.hide_gpu_unless(args.device)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    blocks, block_steps, warmup = common.alternation_settings(args, device)
    config_holder = {}

    def make_bare(task, accelerator):
        bare = common.BareLoop(task.model, config_holder["config"], task, accelerator.device,
                               accelerator.mixed_precision, common.engine_torch_optimizer(accelerator))
        return bare.step

    alternation = common.Alternation(make_bare, warmup=warmup, block_steps=block_steps, count_flops=True)
    max_steps = alternation.steps_for(blocks)
    # The bare loop's optimizer comes from the same Config through the same make_optimizer.
    config_holder["config"] = common.engine_config(args, common.CACHE_ROOT, max_steps=max_steps)
    trainer = common.run_engine(args, max_steps, alternation.on_step_start)
    engine, bare = alternation.summary()

    what = {"sd1": "SD1.5 UNet", "sdxl": "SDXL UNet"}.get(common.wants_sd_unet(args), "Kolmogorov score network")
    common.say(f"commit {common.git_commit()}; device: {common.device_description(device)}; "
               f"precision: {alternation.precision}; model: {what}; batch: {trainer.config.batch_size}; "
               f"tracker: {trainer.config.tracker}")
    common.say(f"measured {len(alternation.engine_times)} alternations of {block_steps} step(s) each "
               f"(after {warmup} warm-up steps per side)")
    common.say(f"engine: {1 / engine:.2f} steps/s (median {engine * 1e3:.2f} ms/step)")
    common.say(f"bare:   {1 / bare:.2f} steps/s (median {bare * 1e3:.2f} ms/step)")
    common.say(f"ratio of totals (mean): {sum(alternation.engine_times) / sum(alternation.other_times):.3f}")
    peak = common.peak_bf16_flops(device)
    if alternation.flops:
        common.say(f"model FLOPs per step (forward + backward): {alternation.flops / 1e9:.2f} GFLOP")
        if peak:
            common.say(f"MFU: engine {alternation.flops / engine / peak:.1%}, bare "
                       f"{alternation.flops / bare / peak:.1%} of {peak / 1e12:.0f} TFLOP/s bf16")
    common.print_ratio(engine / bare)


if __name__ == "__main__":
    main()
