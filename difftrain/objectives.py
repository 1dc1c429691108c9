"""Training objectives: what the network is asked to predict, at which noise levels, with what weight.

Two families share one calling convention, ``objective.loss(model, x0, generator, **cond)``:

- ``DiffusionObjective``: the DDPM family of Stable Diffusion (epsilon or v targets over a
  diffusers-style ``alphas_cumprod`` table), with min-SNR-gamma weighting, offset noise and a
  timestep window.
- ``RectifiedFlowObjective``: rectified flow (Liu et al. 2022) in ONE time convention, used by
  training, sampling, validation and reflow alike:

      flow time s in [0, 1],   x_s = (1 - s) * x0 + s * noise,   s = 0 is data, s = 1 is noise,
      the model predicts the velocity u = dx_s/ds = noise - x0,
      sampling integrates dx/ds = u from s = 1 down to s = 0.

  The network's own timestep input is ``flow_time_to_timestep(s)``: ``s * timestep_scale`` for
  a network trained from scratch, or the DDPM timestep matching ``s`` when a pretrained
  v-prediction model is fine-tuned through ``VPredictionFlowBridge``.

A model is any callable ``model(x_t, timestep, **cond) -> Tensor`` shaped like ``x_t``, where
``timestep`` is a float tensor of shape (B,) in the network's own units. Every random draw
comes from the ``torch.Generator`` passed in; nothing touches the global RNG.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from difftrain.errors import ConfigError

Model = Callable[..., torch.Tensor]
VelocityFn = Callable[..., torch.Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")
FLOW_TIME_SAMPLINGS = ("uniform", "logit_normal")

# TrainTrain spells these "MSE", "L1", "Smooth-L1"; the reduction is done by the objective so
# that per-sample weights (min-SNR) can be applied before averaging.
_ELEMENTWISE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "mse": lambda prediction, target: F.mse_loss(prediction, target, reduction="none"),
    "l1": lambda prediction, target: F.l1_loss(prediction, target, reduction="none"),
    "smooth-l1": lambda prediction, target: F.smooth_l1_loss(prediction, target, reduction="none"),
}


def elementwise_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return the unreduced loss called ``name`` ('MSE', 'L1', 'Smooth-L1'; case-insensitive,
    '_' accepted for '-'), raising ConfigError for an unknown name."""
    key = str(name).strip().lower().replace("_", "-")
    if key not in _ELEMENTWISE_LOSSES:
        raise ConfigError(
            f"loss_function {name!r} is not known; use one of 'MSE', 'L1', 'Smooth-L1' "
            "(train_loss_function in TrainTrain configs)."
        )
    return _ELEMENTWISE_LOSSES[key]


# EveryDream2's loss_type mse_huber / huber_mse: MSE and Huber (delta 1) blended per sample by
# t / T, MSE weighted by t / T in 'MSE-Huber' (so Huber dominates the low-noise timesteps).
TIMESTEP_BLENDS = {"mse-huber": True, "huber-mse": False}


def blended_loss(name: str, prediction: torch.Tensor, target: torch.Tensor, noise_fraction: torch.Tensor) -> torch.Tensor:
    """Unreduced MSE/Huber blend; ``noise_fraction`` (B,) is timestep / number of timesteps."""
    mse = F.mse_loss(prediction, target, reduction="none")
    huber = F.huber_loss(prediction, target, reduction="none", delta=1.0)
    mse_weight = broadcast_to_sample(noise_fraction.float(), mse)
    if not TIMESTEP_BLENDS[name.lower()]:
        mse_weight = 1.0 - mse_weight
    return mse * mse_weight + huber * (1.0 - mse_weight)


def pyramid_noise(shape: tuple[int, ...], generator: torch.Generator, discount: float, *, device=None,
                  levels: int = 10) -> torch.Tensor:
    """Multi-resolution noise (B, C, H, W), rescaled to unit standard deviation.

    Level i adds bilinearly upsampled noise drawn at a resolution shrunk by a random factor
    r in [2, 4) to the power i (compounding, as EveryDream2 does), weighted discount**i; it stops
    once a side reaches 1. Every draw, r included, comes from ``generator``.
    """
    batch, channels, height, width = shape
    noise = randn(shape, generator, device=device)
    for level in range(levels):
        factor = float(rand((1,), generator)[0]) * 2 + 2
        height, width = max(1, int(height / factor**level)), max(1, int(width / factor**level))
        coarse = randn((batch, channels, height, width), generator, device=device)
        noise = noise + F.interpolate(coarse, size=tuple(shape[2:]), mode="bilinear") * discount**level
        if height == 1 or width == 1:
            break
    return noise / noise.std()


def perturb_embeddings(hidden: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Text embeddings (B, L, D) plus Gaussian noise of std strength / sqrt(D) (EveryDream2's
    embedding_perturbation, after arXiv 2405.20494)."""
    noise = randn(tuple(hidden.shape), generator, device=hidden.device, dtype=hidden.dtype)
    return hidden + noise * (strength / hidden.shape[-1] ** 0.5)


def randn(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal draws from ``generator`` placed on ``device``.

    Drawing happens on the generator's own device, so a CPU generator gives the same numbers
    whether training runs on CPU or CUDA (a resumed run on another machine stays reproducible).
    """
    draws = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return draws.to(device=device if device is not None else draws.device, dtype=dtype)


def rand(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Uniform [0, 1) float32 draws from ``generator`` placed on ``device`` (see ``randn``)."""
    draws = torch.rand(tuple(shape), generator=generator, device=generator.device, dtype=torch.float32)
    return draws.to(device if device is not None else draws.device)


def broadcast_to_sample(per_sample: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, 1, ...) so it scales each sample of ``like`` (B, ...)."""
    return per_sample.reshape(per_sample.shape + (1,) * (like.ndim - per_sample.ndim))


def _per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _check_alphas_cumprod(alphas_cumprod: torch.Tensor, where: str) -> torch.Tensor:
    table = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64)
    if table.ndim != 1 or table.numel() < 2:
        raise ValueError(f"{where}: alphas_cumprod must be a 1-D table, got shape {tuple(table.shape)}")
    if not bool(torch.all(table[1:] <= table[:-1])) or not bool(torch.all((table >= 0) & (table <= 1))):
        raise ValueError(f"{where}: alphas_cumprod must be non-increasing values in [0, 1]")
    return table


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale a schedule so its last timestep has SNR exactly 0 (Lin et al. 2023, Alg. 1).

    sqrt(alphas_cumprod) is shifted so the last entry is 0 and scaled so the first entry is
    unchanged; without this, SD's last timestep still leaks low-frequency signal and the model
    never learns to start from pure noise. Args: alphas_cumprod (T,). Returns (T,), same dtype.
    """
    table = torch.as_tensor(alphas_cumprod)
    sqrt_abar = table.to(torch.float64).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * (first / (first - last))
    return (sqrt_abar**2).to(table.dtype)


class DiffusionObjective:
    """DDPM-family loss over a discrete ``alphas_cumprod`` schedule (Stable Diffusion style).

    x_t = alpha_t * x0 + sigma_t * noise with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t);
    the target is ``noise`` ('epsilon') or ``alpha_t * noise - sigma_t * x0`` ('v_prediction').

    Args:
        alphas_cumprod: (T,) cumulative alpha products, e.g. a diffusers scheduler's table.
        prediction_type: 'epsilon' or 'v_prediction'.
        min_snr_gamma: min-SNR-gamma weighting (Hang et al. 2023); None or 0 disables it.
        noise_offset: offset noise strength: noise + offset * randn(B, C, 1, 1).
        min_timestep, max_timestep: timesteps are drawn uniformly from [min, max).
        loss_function: 'MSE', 'L1', 'Smooth-L1', or the timestep blends 'MSE-Huber' / 'Huber-MSE'.
        pyramid_noise_discount: multi-resolution noise (see ``pyramid_noise``); 0 disables it.
        embedding_perturbation: noise added to ``encoder_hidden_states`` (see ``perturb_embeddings``).
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        *,
        min_snr_gamma: float | None = None,
        noise_offset: float = 0.0,
        min_timestep: int = 0,
        max_timestep: int = 1000,
        loss_function: str = "MSE",
        pyramid_noise_discount: float = 0.0,
        embedding_perturbation: float = 0.0,
    ) -> None:
        self.alphas_cumprod = _check_alphas_cumprod(alphas_cumprod, "DiffusionObjective")
        num_timesteps = self.alphas_cumprod.numel()
        if prediction_type not in PREDICTION_TYPES:
            raise ConfigError(
                f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or "
                "'v_prediction' (set model_v_pred / v-prediction for SD 2.x 768 models)."
            )
        min_timestep, max_timestep = int(min_timestep), int(max_timestep)
        if not 0 <= min_timestep < max_timestep <= num_timesteps:
            raise ConfigError(
                f"timestep window [{min_timestep}, {max_timestep}) is empty or outside "
                f"[0, {num_timesteps}); set min_timestep (train_min_timesteps) below "
                f"max_timestep (train_max_timesteps), both within 0..{num_timesteps}."
            )
        if min_snr_gamma is not None and float(min_snr_gamma) < 0:
            raise ConfigError(
                f"min_snr_gamma (train_snr_gamma) is {min_snr_gamma}; it must be positive "
                "(5 is the usual value) or 0 to disable min-SNR weighting."
            )
        if (
            prediction_type == "epsilon"
            and float(self.alphas_cumprod[min_timestep:max_timestep].min()) == 0.0
        ):
            raise ConfigError(
                "epsilon prediction cannot learn the zero-SNR timestep of a zero-terminal-SNR "
                "schedule (the noise is the input itself); use v_prediction with zero-terminal SNR."
            )
        self.prediction_type = prediction_type
        self.min_snr_gamma = float(min_snr_gamma) if min_snr_gamma else None
        self.noise_offset = float(noise_offset)
        self.min_timestep = min_timestep
        self.max_timestep = max_timestep
        self.loss_function = loss_function
        self.pyramid_noise_discount = float(pyramid_noise_discount)
        self.embedding_perturbation = float(embedding_perturbation)
        if str(loss_function).lower() not in TIMESTEP_BLENDS:
            self._elementwise_loss = elementwise_loss(loss_function)

    def _schedule(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # float32 coefficients: float64 ones would promote whole latent batches to float64.
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return abar.sqrt().float(), (1.0 - abar).sqrt().float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio abar / (1 - abar) at integer ``timesteps`` (B,), float64."""
        abar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return abar / (1.0 - abar)

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (B,): min(SNR, gamma) / SNR for epsilon and
        min(SNR, gamma) / (SNR + 1) for v-prediction; ones when min-SNR is off."""
        if self.min_snr_gamma is None:
            return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
        snr = self.snr(timesteps)
        clipped = snr.clamp(max=self.min_snr_gamma)
        if self.prediction_type == "v_prediction":
            weights = clipped / (snr + 1.0)
        else:
            # min(SNR, gamma) / SNR -> 1 as SNR -> 0; the limit avoids 0/0 at a zero-SNR step.
            weights = torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), 1.0)
        return weights.float()

    def sample_timesteps(self, batch_size: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Integer timesteps (B,) drawn uniformly from [min_timestep, max_timestep)."""
        draws = torch.randint(
            self.min_timestep, self.max_timestep, (batch_size,), generator=generator, device=generator.device
        )
        return draws.to(device if device is not None else draws.device)

    def sample_noise(self, shape: tuple[int, ...], generator: torch.Generator, device=None) -> torch.Tensor:
        """Float32 noise of ``shape`` (B, C, ...), with offset noise shared over the spatial dims."""
        if self.pyramid_noise_discount > 0 and len(shape) == 4:
            noise = pyramid_noise(tuple(shape), generator, self.pyramid_noise_discount, device=device)
        else:
            noise = randn(shape, generator, device=device)
        if self.noise_offset:
            per_channel_shape = tuple(shape[:2]) + (1,) * (len(shape) - 2)
            noise = noise + self.noise_offset * randn(per_channel_shape, generator, device=device)
        return noise

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t noise; x0, noise (B, ...), timesteps (B,). Float32 result."""
        alpha, sigma = self._schedule(timesteps)
        return (broadcast_to_sample(alpha, x0) * x0 + broadcast_to_sample(sigma, x0) * noise).float()

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The regression target (B, ...): ``noise`` or v = alpha_t noise - sigma_t x0. Float32."""
        if self.prediction_type == "epsilon":
            return noise.float()
        alpha, sigma = self._schedule(timesteps)
        return (broadcast_to_sample(alpha, x0) * noise - broadcast_to_sample(sigma, x0) * x0).float()

    def fixed_validation_draws(
        self, shape: tuple[int, ...], seed: int, device=None
    ) -> dict[str, torch.Tensor]:
        """Noise and timesteps that depend only on ``seed``, so validation losses of different
        steps (and of a resumed run) are comparable. Pass them on: ``loss(model, x0, **draws)``."""
        generator = torch.Generator().manual_seed(int(seed))
        timesteps = self.sample_timesteps(shape[0], generator, device)
        return {"noise": self.sample_noise(tuple(shape), generator, device), "timesteps": timesteps}

    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        timesteps: torch.Tensor | None = None,
        loss_mask: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
        **cond: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted regression loss of ``model`` on clean samples ``x0`` (B, C, ...).

        ``sample_weights`` (B,) multiply each sample's loss (EveryDream2's loss_scale.txt).
        With embedding_perturbation, precomputed ``encoder_hidden_states`` get noise from
        ``generator``; captions encoded inside the model get a ``perturb_embeddings`` callback.

        ``noise`` (B, C, ...) and integer ``timesteps`` (B,) are drawn from ``generator`` unless
        given (validation passes fixed ones); ``cond`` goes to the model unchanged. ``loss_mask``
        (broadcastable to x0, values in [0, 1]) restricts each sample's loss to where it is
        non-zero: the per-sample loss is the mask-weighted mean, so its scale does not depend on
        the masked area. The model
        sees x_t in x0's dtype and float32 timesteps; the loss is computed in float32.
        Returns (scalar loss, stats) where stats holds detached 'loss', 'loss_per_sample' (B,)
        and 'timesteps' (B,).
        """
        if (noise is None or timesteps is None) and generator is None:
            raise ValueError("DiffusionObjective.loss needs a generator unless noise and timesteps are given")
        if timesteps is None:
            timesteps = self.sample_timesteps(x0.shape[0], generator, x0.device)
        timesteps = timesteps.to(x0.device)
        if noise is None:
            noise = self.sample_noise(tuple(x0.shape), generator, x0.device)
        noise = noise.to(x0.device)
        clean = x0.float()
        noisy = self.add_noise(clean, noise, timesteps)
        if self.embedding_perturbation and generator is not None:
            cond = self._perturbed(cond, generator)
        prediction = model(noisy.to(x0.dtype), timesteps.float(), **cond)
        target = self.target(clean, noise, timesteps)
        if str(self.loss_function).lower() in TIMESTEP_BLENDS:
            fraction = timesteps.float() / self.alphas_cumprod.numel()
            elementwise = blended_loss(self.loss_function, prediction.float(), target, fraction)
        else:
            elementwise = self._elementwise_loss(prediction.float(), target)
        if loss_mask is None:
            per_sample = _per_sample_mean(elementwise)
        else:
            mask = loss_mask.to(elementwise.device, torch.float32).expand_as(elementwise)
            per_sample = _per_sample_mean(elementwise * mask) / _per_sample_mean(mask).clamp(min=1e-8)
        weighted = per_sample * self.loss_weights(timesteps).to(per_sample.device)
        if sample_weights is not None:
            weighted = weighted * sample_weights.to(weighted.device, torch.float32)
        loss = weighted.mean()
        return loss, {"loss": loss.detach(), "loss_per_sample": per_sample.detach(), "timesteps": timesteps.detach()}


    def _perturbed(self, cond: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        strength = self.embedding_perturbation
        if "encoder_hidden_states" in cond:
            return {**cond, "encoder_hidden_states": perturb_embeddings(cond["encoder_hidden_states"], strength, generator)}
        return {**cond, "perturb_embeddings": lambda hidden: perturb_embeddings(hidden, strength, generator)}


class VPredictionFlowBridge:
    """Reads a pretrained v-prediction network as a rectified-flow velocity model.

    With alpha = sqrt(abar), sigma = sqrt(1 - abar), the DDPM point x_t = alpha x0 + sigma eps is
    the flow point z = x_t / (alpha + sigma) at flow time s = sigma / (alpha + sigma), because
    z = (1 - s) x0 + s eps. From the network's v, x0_hat = alpha x_t - sigma v and
    eps_hat = sigma x_t + alpha v, so the flow velocity is u = eps_hat - x0_hat. A pretrained
    v model therefore predicts the right flow at fine-tuning step 0.

    Timestep mapping: for flow time s the matching abar is (1 - s)^2 / ((1 - s)^2 + s^2); the
    network timestep is the continuous t where the table, linearly interpolated over t, equals
    it. This makes alpha_t and sigma_t at that t exactly the values s implies.

    Outside the table's range [s_min, s_max] (SD: about 0.029 .. 0.936; a zero-terminal-SNR
    schedule reaches s_max = 1) the timestep is CLAMPED to the first / last table entry and the
    network input is x_t = z * (alpha_t + sigma_t) at the clamped t. Above s_max the velocity is
    taken as (z - x0_hat) / s, the velocity that keeps the straight line from z through x0_hat at
    the true flow time (so one Euler step from s = 1 lands exactly on x0_hat); in range this is
    algebraically equal to eps_hat - x0_hat. Below s_min, eps_hat - x0_hat at t = 0 is used,
    which avoids dividing by a flow time near 0.

    Args:
        alphas_cumprod: (T,) the pretrained model's schedule (diffusers ``alphas_cumprod``).
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.alphas_cumprod = _check_alphas_cumprod(alphas_cumprod, "VPredictionFlowBridge")
        if float(self.alphas_cumprod[0]) == 0.0:
            raise ValueError("VPredictionFlowBridge: alphas_cumprod[0] is 0, the schedule holds no data")
        self.num_timesteps = self.alphas_cumprod.numel()
        # The search runs over an increasing sequence, so flip the non-increasing table.
        self._increasing_abar = self.alphas_cumprod.flip(0).contiguous()
        alpha, sigma = self.alphas_cumprod.sqrt(), (1.0 - self.alphas_cumprod).sqrt()
        self._flow_time_table = sigma / (alpha + sigma)

    @property
    def s_min(self) -> float:
        """Flow time of timestep 0, the least noisy point the network knows."""
        return float(self._flow_time_table[0])

    @property
    def s_max(self) -> float:
        """Flow time of the last timestep (< 1 unless the schedule has zero terminal SNR)."""
        return float(self._flow_time_table[-1])

    def _abar_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        table = self.alphas_cumprod.to(timesteps.device)
        t = timesteps.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lower = t.floor().long().clamp(max=self.num_timesteps - 2)
        fraction = t - lower
        return table[lower] * (1 - fraction) + table[lower + 1] * fraction

    def timestep_to_flow_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow time s = sigma_t / (alpha_t + sigma_t) of continuous timesteps (B,), float32."""
        abar = self._abar_at(torch.as_tensor(timesteps))
        alpha, sigma = abar.sqrt(), (1.0 - abar).sqrt()
        return (sigma / (alpha + sigma)).float()

    def flow_time_to_timestep(self, flow_time: torch.Tensor) -> torch.Tensor:
        """The continuous network timestep t (B,) in [0, T-1] whose flow time is ``flow_time``
        (B,), clamped to the table's ends outside [s_min, s_max]. Float32."""
        s = torch.as_tensor(flow_time).to(torch.float64)
        target_abar = (1 - s) ** 2 / ((1 - s) ** 2 + s**2)
        increasing = self._increasing_abar.to(s.device)
        # Index into the flipped table: position j holds timestep T-1-j.
        upper = torch.searchsorted(increasing, target_abar.contiguous()).clamp(1, self.num_timesteps - 1)
        lower = upper - 1
        low_value, high_value = increasing[lower], increasing[upper]
        span = (high_value - low_value).clamp(min=torch.finfo(torch.float64).tiny)
        fraction = ((target_abar - low_value) / span).clamp(0, 1)
        flipped_position = lower + fraction
        return ((self.num_timesteps - 1) - flipped_position).float()

    def velocity(self, model: Model, z: torch.Tensor, flow_time: torch.Tensor, **cond: Any) -> torch.Tensor:
        """Flow velocity (B, ...) of the v-prediction ``model`` at flow state ``z`` (B, ...) and
        flow time ``flow_time`` (B,). The model sees x_t in z's dtype and a float32 timestep."""
        s = torch.as_tensor(flow_time, device=z.device).to(torch.float64).expand(z.shape[0])
        timesteps = self.flow_time_to_timestep(s)
        abar = self._abar_at(timesteps.to(torch.float64))
        work_dtype = torch.promote_types(z.dtype, torch.float32)
        alpha = broadcast_to_sample(abar.sqrt().to(work_dtype), z)
        sigma = broadcast_to_sample((1.0 - abar).sqrt().to(work_dtype), z)
        state = z.to(work_dtype)
        noisy = state * (alpha + sigma)
        v = model(noisy.to(z.dtype), timesteps, **cond).to(work_dtype)
        x0_hat = alpha * noisy - sigma * v
        eps_hat = sigma * noisy + alpha * v
        in_range_velocity = eps_hat - x0_hat
        beyond_last = broadcast_to_sample(s > self.s_max, z)
        safe_s = broadcast_to_sample(s.clamp(min=1e-12).to(work_dtype), z)
        return torch.where(beyond_last, (state - x0_hat) / safe_s, in_range_velocity)

    def wrap(self, model: Model) -> VelocityFn:
        """``velocity_fn(z, flow_time, **cond)`` over ``model`` for the samplers."""

        def velocity_fn(z: torch.Tensor, flow_time: torch.Tensor, **cond: Any) -> torch.Tensor:
            return self.velocity(model, z, flow_time, **cond)

        return velocity_fn


class RectifiedFlowObjective:
    """Rectified-flow loss in the module's time convention (s = 0 data, s = 1 noise).

    Args:
        time_sampling: 'uniform' (s ~ U(0, 1)) or 'logit_normal' (s = sigmoid(N(mean, std)),
            which spends more steps mid-path, where the velocity is hardest to predict).
        logit_mean, logit_std: parameters of the logit-normal draw.
        timestep_scale: network timestep = s * timestep_scale for networks without a bridge.
        v_bridge: a ``VPredictionFlowBridge`` when the network is a pretrained v-prediction
            model; then the bridge owns the timestep mapping and the v -> velocity conversion.
        loss_function: 'MSE' (the rectified-flow loss), 'L1' or 'Smooth-L1'.
    """

    def __init__(
        self,
        *,
        time_sampling: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        timestep_scale: float = 1000.0,
        v_bridge: VPredictionFlowBridge | None = None,
        loss_function: str = "MSE",
    ) -> None:
        if time_sampling not in FLOW_TIME_SAMPLINGS:
            raise ConfigError(
                f"time_sampling {time_sampling!r} is not known; use 'uniform' or 'logit_normal'."
            )
        if not logit_std > 0:
            raise ConfigError(f"logit_std is {logit_std}; it must be positive (1.0 is the usual value).")
        if not timestep_scale > 0:
            raise ConfigError(f"timestep_scale is {timestep_scale}; it must be positive (e.g. 1000).")
        self.time_sampling = time_sampling
        self.logit_mean = float(logit_mean)
        self.logit_std = float(logit_std)
        self.timestep_scale = float(timestep_scale)
        self.v_bridge = v_bridge
        self.loss_function = loss_function
        self._elementwise_loss = elementwise_loss(loss_function)

    def flow_time_to_timestep(self, flow_time: torch.Tensor) -> torch.Tensor:
        """The network's timestep input (B,) for flow times (B,); the one mapping everything uses."""
        if self.v_bridge is not None:
            return self.v_bridge.flow_time_to_timestep(flow_time)
        return torch.as_tensor(flow_time, dtype=torch.float32) * self.timestep_scale

    def timestep_to_flow_time(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Inverse of ``flow_time_to_timestep`` (within the bridge's range when bridged)."""
        if self.v_bridge is not None:
            return self.v_bridge.timestep_to_flow_time(timesteps)
        return torch.as_tensor(timesteps, dtype=torch.float32) / self.timestep_scale

    def sample_flow_time(self, batch_size: int, generator: torch.Generator, device=None) -> torch.Tensor:
        """Flow times (B,) in [0, 1] drawn by ``time_sampling``, float32."""
        if self.time_sampling == "uniform":
            return rand((batch_size,), generator, device=device)
        logits = self.logit_mean + self.logit_std * randn((batch_size,), generator, device=device)
        return torch.sigmoid(logits)

    @staticmethod
    def interpolate(x0: torch.Tensor, noise: torch.Tensor, flow_time: torch.Tensor) -> torch.Tensor:
        """x_s = (1 - s) x0 + s noise; x0, noise (B, ...), flow_time (B,)."""
        s = broadcast_to_sample(flow_time.to(x0.device, torch.promote_types(x0.dtype, torch.float32)), x0)
        return (1 - s) * x0 + s * noise

    def velocity(self, model: Model, z: torch.Tensor, flow_time: torch.Tensor, **cond: Any) -> torch.Tensor:
        """The model's flow velocity (B, ...) at state ``z`` (B, ...) and flow time (B,)."""
        if self.v_bridge is not None:
            return self.v_bridge.velocity(model, z, flow_time, **cond)
        flow_time = torch.as_tensor(flow_time, device=z.device).expand(z.shape[0])
        return model(z, self.flow_time_to_timestep(flow_time).to(z.device), **cond)

    def velocity_fn(self, model: Model) -> VelocityFn:
        """``velocity_fn(z, flow_time, **cond)`` over ``model``, for samplers and reflow."""

        def velocity_fn(z: torch.Tensor, flow_time: torch.Tensor, **cond: Any) -> torch.Tensor:
            return self.velocity(model, z, flow_time, **cond)

        return velocity_fn

    def flow_loss(
        self, model: Model, x0: torch.Tensor, noise: torch.Tensor, flow_time: torch.Tensor, *,
        sample_weights: torch.Tensor | None = None, **cond: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Regress the velocity at x_s onto noise - x0; shared by training (independent draws)
        and reflow (coupled noise / endpoint pairs).

        x0, noise (B, ...) in any float dtype, flow_time (B,). The model sees x_s in x0's dtype;
        the loss is float32. Returns (scalar loss, stats) with detached 'loss',
        'loss_per_sample' (B,) and 'flow_time' (B,). ``sample_weights`` (B,) scale each sample's loss.
        """
        flow_time = flow_time.to(x0.device)
        clean, noise = x0.float(), noise.to(x0.device).float()
        state = self.interpolate(clean, noise, flow_time)
        prediction = self.velocity(model, state.to(x0.dtype), flow_time, **cond)
        per_sample = _per_sample_mean(self._elementwise_loss(prediction.float(), noise - clean))
        if sample_weights is not None:
            loss = (per_sample * sample_weights.to(per_sample.device, torch.float32)).mean()
        else:
            loss = per_sample.mean()
        return loss, {"loss": loss.detach(), "loss_per_sample": per_sample.detach(), "flow_time": flow_time.detach()}

    def fixed_validation_draws(
        self, shape: tuple[int, ...], seed: int, device=None
    ) -> dict[str, torch.Tensor]:
        """Noise and flow times that depend only on ``seed``: ``loss(model, x0, **draws)``."""
        generator = torch.Generator().manual_seed(int(seed))
        flow_time = self.sample_flow_time(shape[0], generator, device)
        return {"noise": randn(tuple(shape), generator, device=device), "flow_time": flow_time}

    def loss(
        self,
        model: Model,
        x0: torch.Tensor,
        generator: torch.Generator | None = None,
        *,
        noise: torch.Tensor | None = None,
        flow_time: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
        **cond: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``flow_loss`` with noise (B, ...) and flow times (B,) drawn from ``generator`` unless
        given. Same return as ``flow_loss``."""
        if (noise is None or flow_time is None) and generator is None:
            raise ValueError("RectifiedFlowObjective.loss needs a generator unless noise and flow_time are given")
        if flow_time is None:
            flow_time = self.sample_flow_time(x0.shape[0], generator, x0.device)
        if noise is None:
            noise = randn(tuple(x0.shape), generator, device=x0.device)
        return self.flow_loss(model, x0, noise, flow_time, sample_weights=sample_weights, **cond)


def pretrained_flow_objective(
    prediction_type: str, alphas_cumprod: torch.Tensor, **flow_settings: Any
) -> RectifiedFlowObjective:
    """Rectified-flow objective for fine-tuning a pretrained DDPM network through the v bridge.

    ``prediction_type`` is the base model's; only 'v_prediction' can be bridged, because an
    epsilon model's output does not determine the flow velocity near pure noise. Raises
    ConfigError otherwise. ``flow_settings`` are RectifiedFlowObjective's keyword arguments.
    """
    if prediction_type != "v_prediction":
        raise ConfigError(
            f"--rectified_flow needs a v-prediction base model, but the model is {prediction_type!r}; "
            "start from a v-prediction checkpoint (e.g. SD 2.x 768-v) or turn rectified_flow off."
        )
    return RectifiedFlowObjective(v_bridge=VPredictionFlowBridge(alphas_cumprod), **flow_settings)


def fixed_validation_noise(
    objective: DiffusionObjective | RectifiedFlowObjective,
    shape: tuple[int, ...],
    seed: int,
    device=None,
) -> dict[str, torch.Tensor]:
    """Seeded validation draws for either objective; see ``fixed_validation_draws``."""
    return objective.fixed_validation_draws(tuple(shape), seed, device)


__all__ = [
    "DiffusionObjective",
    "RectifiedFlowObjective",
    "VPredictionFlowBridge",
    "broadcast_to_sample",
    "elementwise_loss",
    "fixed_validation_noise",
    "pretrained_flow_objective",
    "rand",
    "randn",
    "rescale_zero_terminal_snr",
]
