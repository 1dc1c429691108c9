"""What the UNet sees besides the noise: VAE latents of the images and the conditioning of their
captions (text embeddings, SDXL's size ids), each computed once and cached.

The cache lives in memory, or on disk in cache_dir (`cache_folder`); keys carry a fingerprint of
the VAE / text encoders, so a changed model never meets a stale entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from difftrain.config import Config
from difftrain.data.cache import LatentCache, encode_images_cached, fingerprint_module, text_embedding_key
from difftrain.data.images import ImageBucketDataset
from difftrain.log import say
from difftrain.models.sd import SDModel, sdxl_time_ids
from difftrain.objectives import randn


def to_device(value: Any, device: torch.device, dtype: Optional[torch.dtype] = None) -> Any:
    """`value` (a tensor, or nested dicts of them) on `device`; floating tensors in `dtype` if given."""
    if isinstance(value, dict):
        return {key: to_device(item, device, dtype) for key, item in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype if dtype is not None and value.is_floating_point() else value.dtype)
    return value


def cache_folder(config: Config, accelerator: Any) -> Optional[str]:
    """cache_dir; with several processes and none given, a disk cache under logdir that all of
    them share. In memory, each process would encode again the images another process met
    in an earlier epoch, since each epoch deals the batches out anew."""
    if config.cache_dir:
        return config.cache_dir
    processes = accelerator.num_processes
    if processes == 1:
        return None
    shared = str(Path(config.logdir) / "latent_cache")
    if accelerator.is_main_process:
        say(f"note: {processes} processes and no cache_dir: latents and text embeddings "
            f"are cached in '{shared}', shared by all of them (set cache_dir to choose the folder).")
    return shared


class Latents:
    """VAE latents of data-set images: the posterior (mean, std) cached per image and
    augmentation, and the scaled latents the UNet trains on."""

    def __init__(self, sd: SDModel, cache: LatentCache, device: torch.device):
        self.sd, self.vae, self.cache, self.device = sd, sd.vae, cache, device
        self.fingerprint = fingerprint_module(sd.vae)

    def _encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        distribution = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return {"mean": distribution.mean.float(), "std": distribution.std.float()}

    def posterior(self, dataset: ImageBucketDataset, indices: Sequence[int], epoch: int) -> dict[str, torch.Tensor]:
        """{"mean", "std"}: (B, 4, h, w) each, on the CPU (cache entries: copy before changing)."""
        return encode_images_cached(self.cache, dataset, indices, model_fingerprint=self.fingerprint,
                                    encode=self._encode, epoch=epoch)

    def scaled(self, mean: torch.Tensor, std: Optional[torch.Tensor], generator=None) -> torch.Tensor:
        """Scaled latents: a posterior sample drawn from `generator`, or the mean when std is None."""
        latents = mean if std is None else mean + std * randn(mean.shape, generator, device=mean.device)
        return self.sd.scale_latents(latents)

    def means(self, dataset: ImageBucketDataset, indices: Sequence[int], epoch: int) -> torch.Tensor:
        """Scaled posterior means (B, 4, h, w) on the device: the same latents every time, so that
        two images (a pair, or two evaluations) differ only by their content."""
        stats = self.posterior(dataset, indices, epoch)
        return self.scaled(stats["mean"].to(self.device), None)


class TextConditioning:
    """The UNet's conditioning of captions, as keyword arguments of SDTrainable's forward.

    With frozen text encoders: {"encoder_hidden_states" (B, 77, D) [, "added_cond_kwargs"]},
    each caption encoded once and cached. With training text encoders: {"captions" [, "time_ids"]},
    which the trainable encodes inside its forward so that gradients reach the encoders.
    """

    def __init__(self, sd: SDModel, cache: LatentCache, device: torch.device, encoders_train: bool):
        self.sd, self.cache, self.device, self.encoders_train = sd, cache, device, encoders_train
        self.is_sdxl = sd.family == "sdxl"
        # clip_skip changes the embeddings, not the weights: cached ones of another layer must not match.
        self.fingerprint = "+".join(fingerprint_module(e) for e in sd.text_encoders) + \
            (f"+clip_skip{sd.clip_skip}" if sd.clip_skip >= 2 else "")

    def time_ids(self, dataset: ImageBucketDataset, indices: Sequence[int]) -> Optional[torch.Tensor]:
        """SDXL's (B, 6) size conditioning: original size, where the center crop sat, bucket size."""
        if not self.is_sdxl:
            return None
        originals, crops, targets = [], [], []
        for index in indices:
            item = dataset.items[index]
            width, height = dataset.buckets[index]
            scale = max(width / item.width, height / item.height)
            resized = (max(width, round(item.width * scale)), max(height, round(item.height * scale)))
            originals.append((item.height, item.width))
            crops.append((round(0.5 * (resized[1] - height)), round(0.5 * (resized[0] - width))))
            targets.append((height, width))
        return sdxl_time_ids(originals, crops, targets)

    def _embedding(self, caption: str) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            cond = self.sd.encode_prompts([caption])
        tensors = {"encoder_hidden_states": cond["encoder_hidden_states"][0].float()}
        if "added_cond_kwargs" in cond:
            tensors["text_embeds"] = cond["added_cond_kwargs"]["text_embeds"][0].float()
        return tensors

    def frozen(self, captions: Sequence[str], time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """Conditioning from the frozen text encoders (cached per caption), on the device."""
        rows = [self.cache.get_or_compute(text_embedding_key(caption=caption, model_fingerprint=self.fingerprint),
                                          lambda caption=caption: self._embedding(caption)) for caption in captions]
        cond: dict[str, Any] = {"encoder_hidden_states": torch.stack([r["encoder_hidden_states"] for r in rows])}
        if self.is_sdxl:
            cond["added_cond_kwargs"] = {"text_embeds": torch.stack([r["text_embeds"] for r in rows]),
                                         "time_ids": time_ids}
        return to_device(cond, self.device)

    def __call__(self, captions: Sequence[str], time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """The conditioning a training step passes to the trainable (see the class docstring)."""
        if self.encoders_train:
            return {"captions": list(captions), **({"time_ids": time_ids} if time_ids is not None else {})}
        return self.frozen(captions, time_ids)

    def of_items(self, dataset: ImageBucketDataset, indices: Sequence[int]) -> dict[str, Any]:
        """The conditioning of items `indices`: their captions and (SDXL) their sizes."""
        return self([dataset.items[i].caption for i in indices], self.time_ids(dataset, indices))

    def encoded(self, model: Any, captions: Sequence[str], time_ids: Optional[torch.Tensor]) -> dict[str, Any]:
        """Embeddings (never bare captions) for fixed inputs such as reflow's: from the trainable's
        current text encoders when they train, else the frozen ones."""
        if not self.encoders_train:
            return self.frozen(captions, time_ids)
        with torch.no_grad():
            cond = model.encode_captions(captions, time_ids)
        return to_device(cond, self.device, torch.float32)

    def of_prompt(self, prompt: str, count: int, size: tuple[int, int]) -> dict[str, Any]:
        """Frozen-encoder conditioning of `prompt`, `count` rows, for images of (width, height)."""
        time_ids = None
        if self.is_sdxl:
            height_width = (size[1], size[0])
            time_ids = sdxl_time_ids([height_width] * count, [(0, 0)] * count, [height_width] * count)
        return self.frozen([prompt] * count, time_ids)


__all__ = ["Latents", "TextConditioning", "cache_folder", "to_device"]
