"""The v -> flow bridge: the rectified-flow loss at the first fine-tuning step, with the bridge vs
reading the v-prediction network's output naively as the flow velocity at timestep s * 1000.

Fine-tuning a pretrained v-prediction model (SD 2.x 768-v) with rectified flow starts from a
network that already knows the answer, if its output is read the right way:
`difftrain.objectives.pretrained_flow_objective` (the `VPredictionFlowBridge`) rescales the flow
state into the network's x_t, picks the DDPM timestep with the same noise level, and turns v into
the flow velocity. The naive reading feeds the flow state and s * 1000 straight in and calls
the output a velocity. The better the initial loss, the less of the pretrained model the
fine-tune has to unlearn.

The network is the tiny SD2-v stand-in (`difftrain.tiny.make_tiny('sd2-v', ...)`, loaded with
`difftrain.models.sd.load_sd`), first trained briefly as a v-predictor on a small set of smooth
latent fields (its random weights alone predict nothing), then both readings are scored on the
same data, noise and flow times. The ratio is bridge loss / naive loss (below 1: the bridge
starts closer). For reference the script also scores the exact (Bayes-optimal) v-predictor of
Gaussian data, where the answer is known in closed form.

    python bench/flow_bridge.py
"""

from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PROMPT = "a photo of a cat"


def smooth_latents(count: int, side: int, generator):
    """(count, 4, side, side) fields made of a few low-frequency waves each, unit variance:
    data with structure a small UNet can learn in a few hundred steps."""
    import torch

    grid = torch.arange(side, dtype=torch.float32) * (2 * math.pi / side)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    fields = torch.zeros(count, 4, side, side)
    for _ in range(3):
        kx = torch.randint(0, 3, (count, 4, 1, 1), generator=generator).float()
        ky = torch.randint(0, 3, (count, 4, 1, 1), generator=generator).float()
        phase = torch.rand(count, 4, 1, 1, generator=generator) * 2 * math.pi
        amplitude = torch.randn(count, 4, 1, 1, generator=generator)
        fields += amplitude * torch.cos(kx * x + ky * y + phase)
    return (fields - fields.mean()) / fields.std()


def flow_losses(model, alphas_cumprod, data, noise, flow_time, condition) -> dict[str, float]:
    """Mean rectified-flow loss of `model` read through the bridge and naively, per flow-time band."""
    import torch

    from difftrain.objectives import RectifiedFlowObjective, pretrained_flow_objective

    readings = {"bridge": pretrained_flow_objective("v_prediction", alphas_cumprod),
                "naive": RectifiedFlowObjective(timestep_scale=1000.0)}
    results: dict[str, float] = {}
    with torch.no_grad():
        for name, objective in readings.items():
            _, stats = objective.flow_loss(model, data, noise, flow_time, **condition)
            per_sample = stats["loss_per_sample"]
            results[name] = float(per_sample.mean())
            for low in (0.0, 0.25, 0.5, 0.75):
                band = (flow_time >= low) & (flow_time < low + 0.25)
                results[f"{name} s in [{low:.2f}, {low + 0.25:.2f})"] = float(per_sample[band].mean())
    return results


class GaussianOptimalV:
    """E[v | x_t] for data x0 ~ N(0, scale^2 I): alpha sigma (1 - scale^2) / (alpha^2 scale^2 + sigma^2) x_t,
    taking a continuous timestep (B,) and interpolating the schedule, as a perfectly trained
    v-prediction network would answer."""

    def __init__(self, alphas_cumprod, scale: float):
        self.table = alphas_cumprod.float()
        self.scale = scale

    def __call__(self, x, timestep, **unused):
        import torch

        t = torch.as_tensor(timestep, dtype=torch.float32).clamp(0, self.table.numel() - 1)
        lower = t.floor().long().clamp(max=self.table.numel() - 2)
        fraction = t - lower
        abar = self.table[lower] * (1 - fraction) + self.table[lower + 1] * fraction
        alpha, sigma = abar.sqrt()[:, None, None, None], (1 - abar).sqrt()[:, None, None, None]
        variance = self.scale**2
        return alpha * sigma * (1 - variance) / (alpha**2 * variance + sigma**2) * x


def main() -> None:
    parser = common.base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--pretrain-steps", type=int, default=None,
                        help="v-prediction training steps before scoring (default 400)")
    parser.add_argument("--samples", type=int, default=None, help="scored samples (default 512)")
    args = parser.parse_args()
    common.hide_gpu_unless(args.device)
    common.apply_threads(args)
    device = common.pick_device(args.device)
    import torch

    from difftrain.models.sd import load_sd
    from difftrain.objectives import DiffusionObjective
    from difftrain.tiny import make_tiny

    pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else (2 if args.smoke else 400)
    samples = args.samples or (16 if args.smoke else 512)
    batch = 16
    with tempfile.TemporaryDirectory(prefix="bench-bridge-") as folder:
        sd = load_sd(make_tiny("sd2-v", Path(folder) / "sd2-v", seed=0), device=device)
    if sd.prediction_type != "v_prediction":
        raise SystemExit(f"the stand-in loaded as {sd.prediction_type}; the bridge needs v_prediction")
    alphas_cumprod = sd.noise_scheduler.alphas_cumprod
    side = sd.unet.config.sample_size
    generator = torch.Generator().manual_seed(0)
    train_set = smooth_latents(64, side, generator).to(device)
    with torch.no_grad():
        condition = sd.encode_prompts([PROMPT] * batch)
    unet = sd.unet

    def network(x, t, **cond):
        size = x.shape[0]
        cond = {key: value[:size] for key, value in cond.items()}
        return unet(x, t, **cond).sample

    # The pretraining the real model had: v-prediction on the data, here briefly.
    objective = DiffusionObjective(alphas_cumprod, "v_prediction")
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    unet.train()
    draw = torch.Generator(device=device).manual_seed(1)
    v_loss = float("nan")
    for step in range(pretrain_steps):
        picks = torch.randint(0, train_set.shape[0], (batch,), generator=generator)
        loss, _ = objective.loss(network, train_set[picks.to(device)], draw, **condition)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        v_loss = float(loss.detach())
    unet.eval()

    # The same data, noise and flow times for both readings.
    score = torch.Generator().manual_seed(2)
    picks = torch.randint(0, train_set.shape[0], (samples,), generator=score)
    data = train_set[picks.to(device)]
    noise = torch.randn(data.shape, generator=score).to(device)
    flow_time = torch.rand(samples, generator=score).to(device)
    all_bands: dict[str, list[float]] = {}
    for start in range(0, samples, batch):
        part = slice(start, start + batch)
        result = flow_losses(network, alphas_cumprod, data[part], noise[part], flow_time[part], condition)
        for key, value in result.items():
            all_bands.setdefault(key, []).append(value)
    mean = {key: sum(v for v in values if not math.isnan(v)) / max(1, sum(not math.isnan(v) for v in values))
            for key, values in all_bands.items()}

    gaussian_scale = 0.5
    gaussian = torch.randn(data.shape, generator=score).to(device) * gaussian_scale
    oracle = flow_losses(GaussianOptimalV(alphas_cumprod.to(device), gaussian_scale), alphas_cumprod, gaussian,
                         noise, flow_time, {})
    # What the best possible velocity model scores on that Gaussian data, for scale.
    best = float(((noise - gaussian) - expected_flow(gaussian + 0, noise, flow_time, gaussian_scale)).square().mean())

    common.say(f"commit {common.git_commit()}; device: {common.device_description(device)}; tiny SD2-v stand-in, {side}x{side} latents; "
               f"{pretrain_steps} v-prediction steps (last v loss {v_loss:.4f}); {samples} scored samples")
    common.say(f"zero-velocity reference E|noise - x0|^2: {float((noise - data).square().mean()):.4f}")
    for name in ("bridge", "naive"):
        bands = ", ".join(f"{key.split(' ', 1)[1]}: {value:.4f}" for key, value in mean.items()
                          if key.startswith(name + " "))
        common.say(f"{name:6s} initial flow loss {mean[name]:.4f}  ({bands})")
    common.say(f"exact v-model of N(0, {gaussian_scale}^2) data: bridge {oracle['bridge']:.4f}, naive "
               f"{oracle['naive']:.4f}, best possible {best:.4f}")
    common.print_ratio(mean["bridge"] / mean["naive"])


def expected_flow(x0, noise, flow_time, scale: float):
    """E[noise - x0 | x_s] for x0 ~ N(0, scale^2 I), x_s = (1 - s) x0 + s noise: the Bayes-optimal
    velocity, whose loss is the floor no model can beat on that data."""
    s = flow_time[:, None, None, None]
    state = (1 - s) * x0 + s * noise
    variance = scale**2
    # Cov(noise - x0, x_s) / Var(x_s), elementwise.
    return (s - (1 - s) * variance) / ((1 - s) ** 2 * variance + s**2) * state


if __name__ == "__main__":
    main()
