"""Samplers: pure functions over a model, no training state.

Flow samplers take ``velocity_fn(z, flow_time, **cond) -> velocity`` in the time convention of
``difftrain.objectives`` (s = 1 noise, s = 0 data, velocity = noise - data), e.g.
``RectifiedFlowObjective.velocity_fn(model)``. DDIM takes the raw ``model(x_t, timestep, **cond)``
of an epsilon or v-prediction network. Classifier-free guidance evaluates the conditional and
unconditional branches in one batch.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from difftrain.errors import ConfigError
from difftrain.objectives import PREDICTION_TYPES, randn

Cond = Mapping[str, Any]


def _concat_conditions(cond: Any, uncond: Any, where: str) -> Any:
    """Stack a conditional and an unconditional input batch-wise, through nested dicts."""
    if isinstance(cond, torch.Tensor):
        if not isinstance(uncond, torch.Tensor):
            raise ValueError(f"{where}: cond is a tensor but uncond is {type(uncond).__name__}")
        return torch.cat([cond, uncond.to(cond.device, cond.dtype)], dim=0)
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(cond) != set(uncond):
            raise ValueError(f"{where}: cond and uncond must have the same keys")
        return {key: _concat_conditions(cond[key], uncond[key], f"{where}.{key}") for key in cond}
    if cond != uncond:
        raise ValueError(f"{where}: non-tensor values differ between cond and uncond ({cond!r} vs {uncond!r})")
    return cond


def classifier_free_guidance(
    predict: Callable[..., torch.Tensor],
    cfg_scale: float,
    cond: Cond | None,
    uncond: Cond | None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Bind conditions to ``predict(x, time, **cond)`` and apply classifier-free guidance.

    Returns ``guided(x, time)`` with x (B, ...) and time (B,). With cfg_scale == 1 only the
    conditional branch runs; otherwise conditional and unconditional inputs are batched as
    (2B, ...) and combined as uncond + cfg_scale * (cond - uncond). Works for velocities,
    epsilon and v alike because the combination is linear.
    """
    cond = dict(cond or {})
    if cfg_scale == 1.0:
        return lambda x, time: predict(x, time, **cond)
    if uncond is None:
        raise ConfigError(
            f"cfg_scale is {cfg_scale} but no unconditional input was given; pass uncond "
            "(e.g. the empty-prompt embedding) or set cfg_scale to 1."
        )
    batched = _concat_conditions(cond, dict(uncond), "cond")

    def guided(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        both = predict(torch.cat([x, x]), torch.cat([time, time]), **batched)
        conditional, unconditional = both.chunk(2)
        return unconditional + cfg_scale * (conditional - unconditional)

    return guided


def _check_steps(steps: int) -> int:
    if int(steps) < 1:
        raise ConfigError(f"sampling steps is {steps}; it must be at least 1 (sample_steps).")
    return int(steps)


@torch.no_grad()
def euler_flow_path(
    velocity_fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    *,
    cfg_scale: float = 1.0,
    cond: Cond | None = None,
    uncond: Cond | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler integration of dx/ds = velocity from s = 1 to s = 0 in ``steps`` uniform steps.

    Returns (states, velocities): states (steps + 1, B, ...) from the noise to the sample,
    velocities (steps, B, ...) evaluated at each step's start. Runs under no_grad.
    """
    steps = _check_steps(steps)
    guided = classifier_free_guidance(velocity_fn, cfg_scale, cond, uncond)
    batch = noise.shape[0]
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    state = noise
    states, velocities = [noise], []
    for index in range(steps):
        flow_time = torch.full((batch,), float(times[index]), device=noise.device)
        velocity = guided(state, flow_time).to(state.dtype)
        # Negative step: s decreases towards the data end.
        state = state + float(times[index + 1] - times[index]) * velocity
        states.append(state)
        velocities.append(velocity)
    return torch.stack(states), torch.stack(velocities)


def sample_flow_euler(
    velocity_fn: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    steps: int,
    *,
    cfg_scale: float = 1.0,
    cond: Cond | None = None,
    uncond: Cond | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Deterministic rectified-flow sample from ``noise`` (B, ...) with ``steps`` Euler steps.

    ``cond`` / ``uncond`` are keyword inputs for ``velocity_fn`` (e.g. encoder_hidden_states);
    guidance applies when cfg_scale != 1. Returns the sample (B, ...), or (sample, trajectory)
    with trajectory (steps + 1, B, ...) when ``return_trajectory``.
    """
    states, _ = euler_flow_path(velocity_fn, noise, steps, cfg_scale=cfg_scale, cond=cond, uncond=uncond)
    return (states[-1], states) if return_trajectory else states[-1]


def ddim_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """Descending integer timesteps (steps,) with 'trailing' spacing.

    Trailing spacing starts at the last training timestep, so a zero-terminal-SNR model starts
    from its pure-noise step (Lin et al. 2023); the older 'leading' spacing never visits it.
    """
    steps = _check_steps(steps)
    if steps > num_train_timesteps:
        raise ConfigError(f"sampling steps {steps} exceeds the {num_train_timesteps} training timesteps.")
    spacing = num_train_timesteps / steps
    return (torch.arange(num_train_timesteps, 0, -spacing, dtype=torch.float64).round() - 1).long()[:steps]


@torch.no_grad()
def sample_ddim(
    model: Callable[..., torch.Tensor],
    noise: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    steps: int,
    prediction_type: str,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    cfg_scale: float = 1.0,
    cond: Cond | None = None,
    uncond: Cond | None = None,
    return_trajectory: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """DDIM sampling (Song et al. 2021) for an epsilon or v-prediction ``model``.

    noise (B, ...) is the starting point at the last timestep; alphas_cumprod (T,) is the
    training schedule. eta = 0 is deterministic; eta > 0 adds fresh noise from ``generator``.
    Returns the sample (B, ...), or (sample, trajectory (steps + 1, B, ...)).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'.")
    if eta > 0 and generator is None:
        raise ValueError("sample_ddim with eta > 0 needs a generator")
    table = torch.as_tensor(alphas_cumprod).detach().to(noise.device, torch.float64)
    timesteps = ddim_timesteps(table.numel(), steps)
    if prediction_type == "epsilon" and float(table[timesteps[0]]) == 0.0:
        raise ConfigError(
            "epsilon prediction cannot sample from a zero-terminal-SNR schedule "
            "(x0 is undefined at SNR 0); use a v-prediction model."
        )
    guided = classifier_free_guidance(model, cfg_scale, cond, uncond)
    batch = noise.shape[0]
    work_dtype = torch.promote_types(noise.dtype, torch.float32)
    state = noise.to(work_dtype)
    trajectory = [state]
    for index, timestep in enumerate(timesteps.tolist()):
        abar = table[timestep]
        abar_prev = table[timesteps[index + 1]] if index + 1 < len(timesteps) else table.new_tensor(1.0)
        alpha, sigma = float(abar.sqrt()), float((1 - abar).sqrt())
        prediction = guided(state.to(noise.dtype), torch.full((batch,), float(timestep), device=noise.device))
        prediction = prediction.to(work_dtype)
        if prediction_type == "epsilon":
            eps_hat = prediction
            x0_hat = (state - sigma * eps_hat) / alpha
        else:
            x0_hat = alpha * state - sigma * prediction
            eps_hat = sigma * state + alpha * prediction
        noise_scale = eta * float(((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt())
        direction_scale = max(float(1 - abar_prev) - noise_scale**2, 0.0) ** 0.5
        state = float(abar_prev.sqrt()) * x0_hat + direction_scale * eps_hat
        if noise_scale > 0:
            state = state + noise_scale * randn(state.shape, generator, device=state.device, dtype=work_dtype)
        trajectory.append(state)
    sample = state.to(noise.dtype)
    return (sample, torch.stack(trajectory).to(noise.dtype)) if return_trajectory else sample


__all__ = [
    "classifier_free_guidance",
    "ddim_timesteps",
    "euler_flow_path",
    "sample_ddim",
    "sample_flow_euler",
]
