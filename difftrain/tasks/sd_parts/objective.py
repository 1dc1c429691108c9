"""The objective of a Stable Diffusion run: the base's own (epsilon / v prediction), rectified flow
through the v bridge, and the comparison of two predictions that TrainTrain's modes train on."""

from __future__ import annotations

import torch

from difftrain.config import Config
from difftrain.errors import ConfigError
from difftrain.models.sd import SDModel
from difftrain.objectives import DiffusionObjective, elementwise_loss, pretrained_flow_objective, rescale_zero_terminal_snr


def make_objective(config: Config, sd: SDModel):
    """DiffusionObjective in the base's prediction type, or (rectified_flow) the flow objective,
    which refuses a base that does not predict v before any step is taken."""
    alphas_cumprod = sd.noise_scheduler.alphas_cumprod
    if config.zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    if config.rectified_flow:
        unused = [name for name in ("pyramid_noise_discount", "embedding_perturbation") if getattr(config, name)]
        if unused:
            raise ConfigError(f"{', '.join(unused)} apply to the epsilon / v objective, not to rectified_flow; "
                              "set them to 0 or rectified_flow to false.")
        return pretrained_flow_objective(sd.prediction_type, alphas_cumprod, time_sampling=config.timestep_sampling,
                                         loss_function=config.loss_function)
    return DiffusionObjective(alphas_cumprod, sd.prediction_type, min_snr_gamma=config.min_snr_gamma,
                              noise_offset=config.noise_offset, min_timestep=config.min_timestep,
                              max_timestep=config.max_timestep, loss_function=config.loss_function,
                              pyramid_noise_discount=config.pyramid_noise_discount,
                              embedding_perturbation=config.embedding_perturbation)


def refuse_rectified_flow(config: Config) -> None:
    """TrainTrain's modes other than LoRA train against the model's own predictions: no flow."""
    if config.rectified_flow:
        raise ConfigError(f"rectified_flow is not available in mode {config.mode}; it trains a LoRA against the "
                          "model's own predictions. Turn rectified_flow off.")


class PredictionMatch:
    """TrainTrain's loss between two predictions (B, C, h, w): loss_function averaged per sample,
    min-SNR weighted by the objective, then averaged over the batch; the target is the frozen
    model's prediction."""

    def __init__(self, config: Config, objective: DiffusionObjective):
        self.objective = objective
        self._elementwise = elementwise_loss(config.loss_function)

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        per_sample = self._elementwise(prediction.float(), target.float()).mean(dim=tuple(range(1, prediction.dim())))
        return (per_sample * self.objective.loss_weights(timesteps).to(per_sample.device)).mean()


__all__ = ["PredictionMatch", "make_objective", "refuse_rectified_flow"]
