"""Samplers: flow Euler in the objectives' time convention, DDIM, classifier-free guidance."""

from __future__ import annotations

import pytest
import torch

from difftrain.errors import ConfigError
from difftrain.objectives import RectifiedFlowObjective, randn, rescale_zero_terminal_snr
from difftrain.sampling import ddim_timesteps, euler_flow_path, sample_ddim, sample_flow_euler

C = torch.tensor([0.7, -1.2, 0.3]).reshape(1, 3, 1, 1)


def sd_schedule() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def noise_batch(seed: int = 0, shape=(4, 3, 2, 2)) -> torch.Tensor:
    return randn(shape, torch.Generator().manual_seed(seed))


def exact_flow_to_c(z, s, **cond):
    """The exact velocity field when the data is always C: straight lines into C."""
    return (z - C) / s.reshape(-1, 1, 1, 1)


def test_euler_on_a_straight_flow_reaches_the_data_in_one_step():
    noise = noise_batch()
    constant_velocity = lambda z, s: noise - C  # noqa: E731
    assert torch.allclose(sample_flow_euler(constant_velocity, noise, 1), C.expand_as(noise), atol=1e-6)


def test_euler_trajectory_follows_the_straight_line_at_the_grid_times():
    noise = noise_batch()
    seen_times = []

    def velocity(z, s):
        seen_times.append(s.clone())
        return exact_flow_to_c(z, s)

    sample, trajectory = sample_flow_euler(velocity, noise, 4, return_trajectory=True)
    assert trajectory.shape == (5, *noise.shape)
    assert torch.equal(trajectory[0], noise) and torch.equal(trajectory[-1], sample)
    for index, s in enumerate([1.0, 0.75, 0.5, 0.25, 0.0]):
        assert torch.allclose(trajectory[index], (1 - s) * C + s * noise, atol=1e-5)
    # Integration runs from noise (s = 1) towards data and never evaluates s = 0.
    assert [float(t[0]) for t in seen_times] == [1.0, 0.75, 0.5, 0.25]
    assert all(t.shape == (4,) for t in seen_times)


def test_classifier_free_guidance_batches_cond_and_uncond_once_per_step():
    noise = noise_batch()
    calls = []

    def velocity(z, s, shift, nested):
        calls.append((z.shape[0], shift.shape[0], nested["extra"].shape[0]))
        return torch.zeros_like(z) + shift.reshape(-1, 1, 1, 1) + nested["extra"].reshape(-1, 1, 1, 1)

    cond = {"shift": torch.full((4,), 2.0), "nested": {"extra": torch.zeros(4)}}
    uncond = {"shift": torch.full((4,), 0.5), "nested": {"extra": torch.zeros(4)}}
    sample = sample_flow_euler(velocity, noise, 3, cfg_scale=3.0, cond=cond, uncond=uncond)
    assert calls == [(8, 8, 8)] * 3
    guided_velocity = 0.5 + 3.0 * (2.0 - 0.5)
    assert torch.allclose(sample, noise - guided_velocity, atol=1e-5)


def test_guidance_scale_one_uses_only_the_conditional_branch():
    noise = noise_batch()
    calls = []

    def velocity(z, s, shift):
        calls.append(z.shape[0])
        return torch.zeros_like(z) + shift

    sample = sample_flow_euler(velocity, noise, 2, cond={"shift": torch.tensor(1.0)})
    assert calls == [4, 4] and torch.allclose(sample, noise - 1.0)


def test_guidance_without_uncond_is_a_config_error():
    with pytest.raises(ConfigError, match="uncond"):
        sample_flow_euler(exact_flow_to_c, noise_batch(), 2, cfg_scale=5.0, cond={})


def test_zero_steps_is_a_config_error():
    with pytest.raises(ConfigError):
        sample_flow_euler(exact_flow_to_c, noise_batch(), 0)


def test_euler_path_returns_the_velocities_it_used():
    noise = noise_batch()
    states, velocities = euler_flow_path(exact_flow_to_c, noise, 5)
    assert velocities.shape == (5, *noise.shape)
    assert torch.allclose(states[:-1] - states[1:], velocities / 5, atol=1e-6)


def test_sampler_with_objective_velocity_fn_uses_the_shared_timestep_mapping():
    objective = RectifiedFlowObjective(timestep_scale=1000.0)
    model = lambda z, t: (z - C) / (t / 1000.0).reshape(-1, 1, 1, 1)  # noqa: E731
    sample = sample_flow_euler(objective.velocity_fn(model), noise_batch(), 7)
    assert torch.allclose(sample, C.expand(4, 3, 2, 2), atol=1e-5)


def test_flow_sampler_does_not_build_graphs():
    weight = torch.nn.Parameter(torch.tensor(0.5))
    sample = sample_flow_euler(lambda z, s: weight * z, noise_batch(), 2)
    assert not sample.requires_grad


# ---------------------------------------------------------------- DDIM


def test_trailing_timesteps_start_at_the_last_step():
    assert ddim_timesteps(1000, 4).tolist() == [999, 749, 499, 249]
    assert ddim_timesteps(1000, 1).tolist() == [999]
    steps = ddim_timesteps(1000, 7)
    assert len(steps) == 7 and bool(torch.all(steps[1:] < steps[:-1])) and steps[-1] >= 0


def exact_predictor(table: torch.Tensor, prediction_type: str):
    """Exact epsilon / v predictor when the data is always C."""

    def model(x_t, timestep, **cond):
        abar = table[timestep.long()].reshape(-1, 1, 1, 1).to(x_t.dtype)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        eps = (x_t - alpha * C) / sigma
        return eps if prediction_type == "epsilon" else alpha * eps - sigma * C

    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 5, 20])
def test_ddim_with_an_exact_predictor_lands_on_the_data(prediction_type, steps):
    table = sd_schedule()
    sample = sample_ddim(exact_predictor(table, prediction_type), noise_batch(), table, steps, prediction_type)
    assert torch.allclose(sample, C.expand(4, 3, 2, 2), atol=1e-4)


def test_ddim_v_prediction_from_pure_noise_on_zero_terminal_snr():
    table = rescale_zero_terminal_snr(sd_schedule())
    sample, trajectory = sample_ddim(
        exact_predictor(table, "v_prediction"), noise_batch(), table, 10, "v_prediction", return_trajectory=True
    )
    assert trajectory.shape == (11, 4, 3, 2, 2)
    assert torch.allclose(sample, C.expand(4, 3, 2, 2), atol=1e-4)
    with pytest.raises(ConfigError, match="v-prediction"):
        sample_ddim(exact_predictor(table, "epsilon"), noise_batch(), table, 10, "epsilon")


def test_ddim_eta_zero_is_deterministic_and_eta_uses_only_the_generator():
    table = sd_schedule()
    model = lambda x, t: 0.3 * x  # noqa: E731
    noise = noise_batch()
    first = sample_ddim(model, noise, table, 6, "epsilon")
    assert torch.equal(first, sample_ddim(model, noise, table, 6, "epsilon"))
    stochastic = [
        sample_ddim(model, noise, table, 6, "epsilon", eta=1.0, generator=torch.Generator().manual_seed(seed))
        for seed in (1, 1, 2)
    ]
    assert torch.equal(stochastic[0], stochastic[1])
    assert not torch.equal(stochastic[0], stochastic[2]) and not torch.equal(stochastic[0], first)
    with pytest.raises(ValueError):
        sample_ddim(model, noise, table, 6, "epsilon", eta=1.0)


def test_ddim_guidance_combines_predictions_linearly():
    table = sd_schedule()
    batch_sizes = []

    def model(x, t, label):
        batch_sizes.append(x.shape[0])
        return 0.2 * x + label.reshape(-1, 1, 1, 1)

    noise = noise_batch()
    guided = sample_ddim(
        model, noise, table, 3, "v_prediction",
        cfg_scale=4.0, cond={"label": torch.full((4,), 0.3)}, uncond={"label": torch.full((4,), 0.1)},
    )
    assert batch_sizes == [8, 8, 8]
    # The output is linear in the label, so guidance equals one pass with 0.1 + 4 * (0.3 - 0.1).
    equivalent = sample_ddim(model, noise, table, 3, "v_prediction", cond={"label": torch.full((4,), 0.9)})
    assert torch.allclose(guided, equivalent, atol=1e-5)
    assert not torch.allclose(guided, sample_ddim(model, noise, table, 3, "v_prediction", cond={"label": torch.full((4,), 0.3)}))
