"""Rectified flow and reflow for a Stable Diffusion run (the Flow part): the velocity field the
reflow stages follow, their fixed inputs, and training on the (noise, endpoint) pairs they make."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn

from difftrain.data.images import ImageBucketDataset
from difftrain.tasks.sd_parts.conditioning import Latents, TextConditioning, to_device
from difftrain.tasks.sd_parts.data import EpochBatches
from difftrain.tasks.sd_parts.samples import VALIDATION_SEED, latents_to_images

FLOW_PROBE_ITEMS = 4


def _stack_nested(values: list[Any]) -> Any:
    if isinstance(values[0], dict):
        return {key: _stack_nested([value[key] for value in values]) for key in values[0]}
    return torch.stack(values)


class SDReflow:
    """The Flow part; while reflow pairs are in use (`active`), the task draws its batches, collates
    and computes its loss here instead of on the images."""

    def __init__(self, model: nn.Module, objective: Any, train_set: ImageBucketDataset,
                 probe_set: ImageBucketDataset, latents: Latents, text: TextConditioning, batch_size: int, seed: int):
        self.model, self.objective, self.train_set, self.probe_set = model, objective, train_set, probe_set
        self.latents, self.text, self.batch_size, self.seed = latents, text, batch_size, seed
        self.pairs: Optional[Any] = None
        self._pair_batches: Optional[EpochBatches] = None

    def flow_velocity_fn(self, model: nn.Module):
        return self.objective.velocity_fn(model)

    def _noise_and_cond(self, dataset: ImageBucketDataset, indices: Sequence[int], seed: int):
        stats = self.latents.posterior(dataset, indices, 0)
        noise = torch.randn(stats["mean"].shape, generator=torch.Generator().manual_seed(seed)).to(self.latents.device)
        captions = [dataset.items[i].caption for i in indices]
        return noise, self.text.encoded(self.model, captions, self.text.time_ids(dataset, indices))

    def flow_probe(self) -> tuple[torch.Tensor, Optional[dict[str, Any]]]:
        """Fixed noise and conditioning of up to 4 held-out (else training) images of one bucket."""
        dataset = self.probe_set
        bucket = dataset.buckets[0]
        indices = [i for i, b in enumerate(dataset.buckets) if b == bucket][:FLOW_PROBE_ITEMS]
        return self._noise_and_cond(dataset, indices, VALIDATION_SEED)

    def render_flow_states(self, batches: Sequence[torch.Tensor]) -> list[Any]:
        """Latent flow states (B, 4, h, w) decoded by the VAE, each batch one row of pictures."""
        from difftrain.sheets import stack

        with torch.no_grad():
            return [stack(latents_to_images(self.latents.sd, x), vertical=False) for x in batches]

    def reflow_inputs(self, stage: int, batches: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        """`batches` batches of the data set (captions and bucket shapes) with noise seeded by
        (seed, stage, batch), so a generation resumed after a crash meets the same noise."""
        order = EpochBatches(self.train_set.buckets, self.batch_size, self.seed)(10_000 + stage)
        noises, conds = [], []
        for index in range(batches):
            noise, cond = self._noise_and_cond(self.train_set, order[index % len(order)],
                                               self.seed * 1000 + stage * 100 + index)
            noises.append(noise)
            conds.append(cond)
        return noises, conds

    def use_reflow_pairs(self, pairs: Optional[Any]) -> None:
        if pairs is not self.pairs:
            self._pair_batches = None
        self.pairs = pairs

    @property
    def active(self) -> bool:
        return self.pairs is not None

    def epoch_batches(self, epoch: int, rank: int, world_size: int) -> list[list[int]]:
        if self._pair_batches is None:
            shapes = [tuple(self.pairs[i]["x0"].shape) for i in range(len(self.pairs))]
            self._pair_batches = EpochBatches(shapes, self.batch_size, self.seed)
        return self._pair_batches(epoch, rank, world_size)

    def collate(self, indices: Sequence[int]) -> dict[str, Any]:
        """{"x0", "noise", "cond"}: the pairs' endpoints, their noise and conditioning."""
        pairs = [self.pairs[i] for i in indices]
        return to_device({key: _stack_nested([p[key] for p in pairs]) for key in ("x0", "noise", "cond")},
                         self.latents.device)

    def loss(self, model: nn.Module, batch: dict[str, Any], generator: torch.Generator) -> torch.Tensor:
        """The flow loss with the coupling (noise, endpoint) given."""
        flow_time = self.objective.sample_flow_time(batch["x0"].shape[0], generator, batch["x0"].device)
        return self.objective.flow_loss(model, batch["x0"], batch["noise"], flow_time, **batch["cond"])[0]


__all__ = ["FLOW_PROBE_ITEMS", "SDReflow"]
