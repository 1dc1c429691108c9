"""Samples and the held-out loss of a Stable Diffusion run (the Samples and Validation parts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from difftrain.config import Config
from difftrain.data.images import ImageBucketDataset
from difftrain.errors import ConfigError
from difftrain.log import say
from difftrain.models.sd import SDModel
from difftrain.tasks.sd_parts.conditioning import Latents, TextConditioning

SAMPLE_GUIDANCE_SCALE = 7.5  # diffusers' default for these pipelines
VALIDATION_SEED = 12345  # fixed noise and timesteps, so loss_valid is comparable between evaluations


def latents_to_images(sd: SDModel, latents: torch.Tensor) -> list[Any]:
    """PIL images of scaled latents (B, 4, h, w), decoded by the model's VAE."""
    from PIL import Image

    pixels = sd.decode_latents(latents.float()).float().clamp(-1, 1)
    return [Image.fromarray(((image.permute(1, 2, 0) + 1) * 127.5).round().byte().cpu().numpy()) for image in pixels]


def prompt_caption(prompt: str) -> str:
    return prompt if prompt.strip() else "(empty prompt)"


def prompt_columns(images: list[Any], prompts: list[str]) -> Any:
    """Image i (drawn from prompt i % len(prompts)) in column i % columns, one column per prompt
    used, with the prompt written under its column."""
    columns = min(len(prompts), len(images))
    rows = [images[start:start + columns] for start in range(0, len(images), columns)]
    return written_under(rows, [prompt_caption(prompt) for prompt in prompts[:columns]])


def written_under(rows: list[list[Any]], captions: list[str]) -> Any:
    """sheets.captioned_columns; should the text fail to draw, the pictures alone and one warning: the
    samples are worth more than their captions."""
    from difftrain.figures import drawing
    from difftrain.sheets import captioned_columns, stack

    with drawing("the prompts under the samples"):
        return captioned_columns(rows, captions)
    return stack([stack(row, vertical=False) for row in rows])


def sample_prompts(config: Config, defaults: Sequence[str]) -> list[str]:
    """Prompts from the sample_prompts file (one per line), else `defaults` (or one empty prompt)."""
    path = config.sample_prompts
    if path:
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError(f"sample_prompts file '{path}' cannot be read ({error.strerror}); give a "
                              "text file with one prompt per line, or leave sample_prompts empty.") from None
        prompts = [line.strip() for line in lines if line.strip()]
        if prompts:
            return prompts
    return list(dict.fromkeys(defaults)) or [""]


class SDSamples:
    """num_samples images, prompt i (cycling) with seed seed + i: the diffusers pipeline over the
    trained modules, or (rectified_flow) the flow Euler sampler."""

    def __init__(self, config: Config, view: Callable[[nn.Module], SDModel], objective: Any,
                 device: torch.device, default_prompts: Sequence[str]):
        self.config, self.view, self.objective, self.device = config, view, objective, device
        self.default_prompts = list(default_prompts)
        if config.rectified_flow and config.sample_prompts.lower().endswith(".json"):
            say("note: sample_prompts: the flow Euler sampler draws the samples of a rectified_flow run, so the "
                "file's scheduler has no effect (its prompts, seeds, sizes, cfgs and steps do).")

    def prompts(self) -> list[str]:
        return sample_prompts(self.config, self.default_prompts)

    def samples(self, model: nn.Module) -> dict[str, Any]:
        """{"samples": num_samples images, one column per prompt with the prompt under it}."""
        view = self.view(model)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) \
            if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)
        with torch.no_grad(), autocast:
            if self.config.sample_prompts.lower().endswith(".json"):  # EveryDream2's sample generator settings
                return {"samples": self.planned_samples(view, model)}
            # A text file of prompts is read at each draw (the JSON plan above reads its own file).
            prompts = self.prompts()
            chosen = [prompts[i % len(prompts)] for i in range(self.config.num_samples)]
            if self.config.rectified_flow:
                images = [self._flow_image(model, view, prompt, index) for index, prompt in enumerate(chosen)]
            else:
                images = self._pipeline_images(view, chosen)
        return {"samples": prompt_columns(images, prompts)}

    def _flow_image(self, model: nn.Module, view: SDModel, prompt: str, index: int, *, negative: str = "",
                    seed: Optional[int] = None, size: Optional[tuple[int, int]] = None,
                    cfg: float = SAMPLE_GUIDANCE_SCALE, steps: int = 0):
        """One flow Euler sample: `size` (width, height) in pixels, the negative prompt as the unguided side."""
        from difftrain.sampling import sample_flow_euler

        width, height = size or (self.config.resolution, self.config.resolution)
        generator = torch.Generator().manual_seed(self.config.seed + index if seed is None else seed)
        noise = torch.randn((1, view.unet.config.in_channels, height // view.vae_scale_factor,
                             width // view.vae_scale_factor), generator=generator).to(self.device)
        latents = sample_flow_euler(self.objective.velocity_fn(model), noise, steps or self.config.sample_inference_steps,
                                    cfg_scale=cfg, cond=view.encode_prompts([prompt]),
                                    uncond=view.encode_prompts([negative]))
        return latents_to_images(view, latents)[0]

    def prompt_arguments(self, view: SDModel, prompt: str, negative: str = "") -> dict[str, Any]:
        """The pipeline's prompt arguments; with clip_skip, embeddings from our encoder (the layer the
        model trains on; diffusers' own clip_skip needs the text_model that transformers 5 removed)."""
        if self.config.clip_skip < 2:
            return {"prompt": prompt, "negative_prompt": negative or None}
        return {"prompt_embeds": view.encode_prompts([prompt])["encoder_hidden_states"],
                "negative_prompt_embeds": view.encode_prompts([negative])["encoder_hidden_states"]}

    def planned_samples(self, view: SDModel, model: nn.Module):
        """EveryDream2's sample_prompts.json: each sample at each of its guidance scales, one row per
        sample with its prompt and scale under each picture (difftrain.vocab.everydream2.read_sample_plan).
        With rectified_flow the flow Euler sampler draws them (the plan's scheduler has no effect)."""
        import diffusers

        from difftrain.sheets import stack
        from difftrain.vocab.everydream2 import SCHEDULERS, read_sample_plan

        config = self.config
        plan = read_sample_plan(config.sample_prompts, config.seed, config.resolution)
        pipeline = view.to_pipeline()
        class_name, options = SCHEDULERS[plan.scheduler]
        pipeline.scheduler = getattr(diffusers, class_name).from_config(pipeline.scheduler.config, **options)
        pipeline.set_progress_bar_config(disable=True)
        captions = list(dict.fromkeys(self.default_prompts)) or [""]
        rows = []
        for index, request in enumerate(plan.requests):
            seed = config.seed + index if request.seed == -1 else request.seed  # -1: reproducible, not random
            prompt = request.prompt
            if prompt is None:  # a random training caption
                prompt = captions[torch.randint(len(captions), (1,), generator=torch.Generator().manual_seed(seed))]
            width, height = request.size
            if config.rectified_flow:
                row = [self._flow_image(model, view, prompt, index, negative=request.negative_prompt, seed=seed,
                                        size=request.size, cfg=cfg, steps=plan.num_inference_steps)
                       for cfg in request.cfgs]
            else:
                row = [pipeline(**self.prompt_arguments(view, prompt, request.negative_prompt), width=width,
                                height=height, num_inference_steps=plan.num_inference_steps, guidance_scale=cfg,
                                generator=torch.Generator(device=self.device).manual_seed(seed)).images[0]
                       for cfg in request.cfgs]
            rows.append(written_under([row], [f"{prompt_caption(prompt)} (cfg {cfg:g})" for cfg in request.cfgs]))
        return stack(rows)

    def _pipeline_images(self, view: SDModel, prompts: list[str]) -> list[Any]:
        pipeline = view.to_pipeline()
        pipeline.set_progress_bar_config(disable=True)
        side = self.config.resolution
        images = []
        for index, prompt in enumerate(prompts):
            generator = torch.Generator(device=self.device).manual_seed(self.config.seed + index)
            images.append(pipeline(**self.prompt_arguments(view, prompt), height=side, width=side,
                                   generator=generator, num_inference_steps=self.config.sample_inference_steps,
                                   guidance_scale=SAMPLE_GUIDANCE_SCALE).images[0])
        return images


class SDValidation:
    """Loss on held-out images with the posterior mean and seeded noise / timesteps, so two
    evaluations differ only by the weights."""

    def __init__(self, dataset: Optional[ImageBucketDataset], batch_size: int, latents: Latents,
                 text: TextConditioning, objective: Any, extra: Optional[dict[str, ImageBucketDataset]] = None):
        self.dataset, self.batch_size, self.latents, self.text, self.objective = \
            dataset, batch_size, latents, text, objective
        self.extra = extra or {}  # metric name -> images, each its own loss (EveryDream2's extra sets)

    def validation_loss(self, model: nn.Module) -> Optional[float | dict[str, float]]:
        """loss_valid, or with extra sets {"loss_valid": ..., <metric>: ...}."""
        if not self.extra:
            return self._mean_loss(model, self.dataset)
        losses = {} if self.dataset is None else {"loss_valid": self._mean_loss(model, self.dataset)}
        losses.update({metric: self._mean_loss(model, data) for metric, data in self.extra.items()})
        return losses

    def _mean_loss(self, model: nn.Module, dataset: ImageBucketDataset) -> float:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, bucket in enumerate(dataset.buckets):
            groups.setdefault(bucket, []).append(index)
        total, seen, number = 0.0, 0, 0
        for bucket in sorted(groups):
            members = groups[bucket]
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                latents = self.latents.means(dataset, chunk, 0)
                draws = self.objective.fixed_validation_draws(tuple(latents.shape), VALIDATION_SEED + number,
                                                              latents.device)
                cond = self.text.of_items(dataset, chunk)
                total += self.objective.loss(model, latents, **draws, **cond)[0].item() * len(chunk)
                seen += len(chunk)
                number += 1
        return total / seen


__all__ = ["SAMPLE_GUIDANCE_SCALE", "SDSamples", "SDValidation", "VALIDATION_SEED", "latents_to_images",
           "prompt_columns", "sample_prompts"]
