"""The naive peer: our SD fine-tuning steps/s vs a plain diffusers-style loop that runs the VAE
on the images and the text encoder on the captions at every step.

Ours is the real engine (`difftrain.trainer.Trainer` with `difftrain.tasks.sd.SDTask`, mode
'Full') fine-tuning a tiny SD1.5 stand-in on a folder of captioned images; it encodes each
image and caption once and trains from the cached latent posteriors and text embeddings. The
peer is the loop of diffusers' train_text_to_image example: VAE-encode the pixel batch, sample
the posterior, encode the captions, add noise, predict it, step. The peer gets its pixels
already decoded and resized in memory (kinder to it than reading files each step), the same
UNet, VAE and text encoder objects, the same batch size and precision, and its own AdamW.
The two alternate in blocks inside one engine run.

The ratio is OUR steps/s divided by the peer's (above 1: we are faster). With the tiny
stand-in the VAE and text encoder are as small as the UNet, so the size of the gain here says
little about a real SD1.5 (where the UNet dominates); the point is that it is measured on the
same path a user runs.

    python bench/naive_peer.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

CAPTIONS = ["a photo of a cat", "a dog on the grass", "the sea at night", "a red car",
            "a bowl of fruit", "a mountain in snow", "an old house", "a city street"]


def write_image_folder(folder: Path, side: int, count: int) -> None:
    """`count` smooth random RGB images (side x side PNG) with .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 2 * np.pi, side)
    for index in range(count):
        y, x = np.meshgrid(grid, grid, indexing="ij")
        channels = [np.sin(rng.integers(1, 4) * x + rng.uniform(0, 6)) * np.cos(rng.integers(1, 4) * y)
                    for _ in range(3)]
        pixels = ((np.stack(channels, axis=-1) + 1) * 127.5).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"image{index:02d}.png")
        (folder / f"image{index:02d}.txt").write_text(CAPTIONS[index % len(CAPTIONS)], encoding="utf-8")


def sd_config(args, model: Path, data: Path, workdir: Path, max_steps: int, resolution: int):
    from difftrain.config import validate_config_dict

    return validate_config_dict({
        "task": "sd", "mode": "Full", "resume_ckpt": str(model), "data_root": str(data),
        "resolution": resolution, "batch_size": 4, "lr": 1e-5, "max_steps": max_steps,
        # Many copies of the few images: one epoch outlasts the measurement.
        "image_num_multiply": 400, "sample_steps": 0, "sample_inference_steps": 1, "num_samples": 1,
        "validate_every_n_epochs": 10_000, "save_every_n_epochs": 10_000, "ckpt_every_n_minutes": 0,
        "tracker": args.tracker or ("none" if args.smoke else "wandb"), "mixed_precision": args.mixed_precision,
        "logdir": str(workdir / "logs"), "runs_dir": str(workdir / "runs"), "project_name": "bench-sd",
        "seed": 1,
    }, source="bench")


class PeerLoop:
    """diffusers' train_text_to_image step: VAE and text encoder on every batch."""

    def __init__(self, sd, unet, data: Path, resolution: int, batch_size: int, device, mixed_precision: str):
        import numpy as np
        import torch
        from PIL import Image

        self.sd, self.unet, self.device = sd, unet, device
        files = sorted(data.glob("*.png"))
        pixels = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution))).copy())
                  for f in files]
        self.pixels = (torch.stack(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1).to(device)
        self.captions = [f.with_suffix(".txt").read_text(encoding="utf-8") for f in files]
        self.batch_size = batch_size
        self.optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-5,
                                           weight_decay=1e-2)
        self.scheduler = sd.noise_scheduler
        self.autocast_dtype = torch.bfloat16 if mixed_precision == "bf16" else None
        self.generator = torch.Generator(device=device).manual_seed(3)
        self.position = 0

    def _loss(self):
        import torch

        picks = [(self.position + i) % len(self.captions) for i in range(self.batch_size)]
        self.position += self.batch_size
        with torch.no_grad():
            latents = self.sd.vae.encode(self.pixels[picks].to(self.sd.vae.dtype)).latent_dist.sample(self.generator)
            latents = latents * self.sd.vae.config.scaling_factor
            ids = self.sd.tokenizers[0]([self.captions[i] for i in picks], padding="max_length", truncation=True,
                                        max_length=self.sd.tokenizers[0].model_max_length,
                                        return_tensors="pt").input_ids.to(self.device)
            hidden = self.sd.text_encoders[0](ids)[0]
        noise = torch.randn(latents.shape, generator=self.generator, device=self.device)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=self.generator, device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = self.unet(noisy, timesteps, hidden).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())

    def step(self) -> None:
        import torch

        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                loss = self._loss()
        else:
            loss = self._loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "bf16"])
    parser.add_argument("--tracker", default=None, choices=["wandb", "none"],
                        help="the engine's tracker (default: wandb, as a user's run; none under --smoke)")
    parser.add_argument("--resolution", type=int, default=64,
                        help="image side in pixels, 64 or more (the tiny VAE halves it: 64 px -> "
                             "32x32 latents)")
    common.add_alternation_options(parser, "the peer")
    args = parser.parse_args()
    common.hide_gpu_unless(args.device)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    blocks, block_steps, warmup = common.alternation_settings(args, device)
    if not args.blocks:
        blocks = 1 if args.smoke else 60  # a tiny-SD step is ~1 s on one CPU core
    if args.smoke and not args.block_steps:
        block_steps = 1

    from difftrain.engine import task_factory
    from difftrain.tasks.base import FactoryFunction
    from difftrain.tiny import make_tiny
    from difftrain.trainer import Trainer

    common.CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-peer-", dir=common.CACHE_ROOT) as folder:
        folder = Path(folder)
        model = make_tiny("sd15", folder / "sd15", seed=0)
        data = folder / "images"
        write_image_folder(data, args.resolution, 4 if args.smoke else 8)

        def make_peer(task, accelerator):
            peer = PeerLoop(task.stack.sd, task.model.unet, data, args.resolution, task.config.batch_size,
                            accelerator.device, accelerator.mixed_precision)
            return peer.step

        alternation = common.Alternation(make_peer, warmup=warmup, block_steps=block_steps)
        config = sd_config(args, model, data, folder / "run", alternation.steps_for(blocks), args.resolution)
        sd_task = task_factory(config)

        def build(config, accelerator, start):
            task = sd_task(config, accelerator, start)
            return common.StepProbe(task, lambda epoch: alternation.on_step_start(epoch, task, accelerator))

        exit_code = Trainer(config, FactoryFunction(build, sd_task.defaults), program="bench").run()
        if exit_code != 0:
            raise SystemExit(f"the engine stopped with exit code {exit_code}")
    ours, peer = alternation.summary()
    common.say(f"commit {common.git_commit()}; device: {common.device_description(device)}; "
               f"precision: {alternation.precision}; tiny SD1.5 stand-in, {args.resolution} px, batch 4")
    common.say(f"measured {len(alternation.engine_times)} alternations of {block_steps} step(s) each")
    common.say(f"ours: {1 / ours:.2f} steps/s (median {ours * 1e3:.2f} ms/step)")
    common.say(f"peer: {1 / peer:.2f} steps/s (median {peer * 1e3:.2f} ms/step)")
    common.print_ratio(peer / ours)


if __name__ == "__main__":
    main()
