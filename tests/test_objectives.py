"""Objectives: targets, weights, schedules, flow-time mapping and the v -> flow bridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from difftrain.errors import ConfigError
from difftrain.objectives import (
    DiffusionObjective,
    RectifiedFlowObjective,
    VPredictionFlowBridge,
    elementwise_loss,
    fixed_validation_noise,
    pretrained_flow_objective,
    randn,
    rescale_zero_terminal_snr,
)


def stepped_schedule() -> torch.Tensor:
    """abar = 0.96 on [0, 250), 0.64 on [250, 500), 0.36 on [500, 750), 0.04 on [750, 1000)."""
    table = torch.empty(1000, dtype=torch.float64)
    for start, value in zip((0, 250, 500, 750), (0.96, 0.64, 0.36, 0.04)):
        table[start : start + 250] = value
    return table


def sd_schedule() -> torch.Tensor:
    """Stable Diffusion's scaled-linear schedule (beta 0.00085 .. 0.012 over 1000 steps)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


class Recorder:
    """A model returning zeros that remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, x, timestep, **cond):
        self.calls.append((x.clone(), timestep.clone(), cond))
        return torch.zeros_like(x)


# x0 = [3, -1], noise = [1, 2] at abar 0.64 (alpha 0.8, sigma 0.6):
# x_t = [3.0, 0.4], v = alpha*noise - sigma*x0 = [-1.0, 2.2].
X0 = torch.tensor([3.0, -1.0]).reshape(1, 1, 1, 2)
NOISE = torch.tensor([1.0, 2.0]).reshape(1, 1, 1, 2)
T300 = torch.tensor([300])


def test_v_target_and_noisy_input_match_hand_computation():
    objective = DiffusionObjective(stepped_schedule(), "v_prediction")
    assert torch.allclose(objective.add_noise(X0, NOISE, T300).flatten(), torch.tensor([3.0, 0.4]))
    assert torch.allclose(objective.target(X0, NOISE, T300).flatten(), torch.tensor([-1.0, 2.2]))


def test_epsilon_target_is_the_noise():
    objective = DiffusionObjective(stepped_schedule(), "epsilon")
    assert torch.equal(objective.target(X0, NOISE, T300), NOISE)


@pytest.mark.parametrize(
    ("prediction_type", "expected"),
    # t=100: SNR 24 -> eps 5/24, v 5/25; t=300: SNR 16/9 < 5 -> eps 1, v 16/25;
    # t=800: SNR 1/24 -> eps 1, v (1/24)/(25/24) = 1/25.
    [("epsilon", [5 / 24, 1.0, 1.0]), ("v_prediction", [0.2, 0.64, 0.04])],
)
def test_min_snr_weights(prediction_type, expected):
    objective = DiffusionObjective(stepped_schedule(), prediction_type, min_snr_gamma=5)
    weights = objective.loss_weights(torch.tensor([100, 300, 800]))
    assert torch.allclose(weights, torch.tensor(expected), atol=1e-6)


def test_min_snr_disabled_by_none_or_zero():
    for gamma in (None, 0):
        objective = DiffusionObjective(stepped_schedule(), "v_prediction", min_snr_gamma=gamma)
        assert torch.equal(objective.loss_weights(torch.tensor([100, 800])), torch.ones(2))


def test_loss_feeds_model_x_t_and_float_timesteps_and_weights_per_sample():
    objective = DiffusionObjective(stepped_schedule(), "v_prediction", min_snr_gamma=5)
    model = Recorder()
    x0 = torch.cat([X0, X0])
    noise = torch.cat([NOISE, NOISE])
    loss, stats = objective.loss(model, x0, noise=noise, timesteps=torch.tensor([300, 100]), context=7)
    x_t, timestep, cond = model.calls[0]
    assert torch.allclose(x_t[0].flatten(), torch.tensor([3.0, 0.4]))
    assert timestep.dtype == torch.float32 and timestep.tolist() == [300.0, 100.0]
    assert cond == {"context": 7}
    # Sample 0: mean(v^2) = (1 + 4.84) / 2 = 2.92 at weight 0.64.
    assert stats["loss_per_sample"][0].item() == pytest.approx(2.92, rel=1e-5)
    alpha, sigma = 0.96**0.5, 0.04**0.5
    v1 = alpha * NOISE - sigma * X0
    expected = (0.64 * 2.92 + 0.2 * float((v1**2).mean())) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["loss"].item() == pytest.approx(expected, rel=1e-5)


def test_a_loss_mask_restricts_each_sample_to_its_region():
    objective = DiffusionObjective(stepped_schedule(), "v_prediction")
    fixed = dict(noise=NOISE, timesteps=torch.tensor([300]))
    whole = objective.loss(Recorder(), X0, **fixed)[1]["loss_per_sample"]
    ones = objective.loss(Recorder(), X0, loss_mask=torch.ones_like(X0), **fixed)[1]["loss_per_sample"]
    assert torch.allclose(ones, whole)
    # Sample 0's squared v-errors are 1 and 4.84 (see above): each mask keeps one of them, a soft
    # mask weighs them.
    first, second = torch.zeros_like(X0), torch.zeros_like(X0)
    first.view(-1)[0], second.view(-1)[1] = 1.0, 1.0
    assert objective.loss(Recorder(), X0, loss_mask=first, **fixed)[0].item() == pytest.approx(1.0, rel=1e-5)
    assert objective.loss(Recorder(), X0, loss_mask=second, **fixed)[0].item() == pytest.approx(4.84, rel=1e-5)
    soft = first * 0.75 + second * 0.25
    assert objective.loss(Recorder(), X0, loss_mask=soft, **fixed)[0].item() == \
        pytest.approx(0.75 * 1.0 + 0.25 * 4.84, rel=1e-5)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("MSE", 2.92), ("mse", 2.92), ("L1", 1.6), ("Smooth-L1", 1.1), ("smooth_l1", 1.1)],
)
def test_loss_functions_by_traintrain_name(name, expected):
    objective = DiffusionObjective(stepped_schedule(), "v_prediction", loss_function=name)
    loss, _ = objective.loss(Recorder(), X0, noise=NOISE, timesteps=T300)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_unknown_loss_function_is_a_config_error_naming_choices():
    with pytest.raises(ConfigError, match="Smooth-L1"):
        elementwise_loss("huberish")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prediction_type": "sample"},
        {"min_timestep": 500, "max_timestep": 500},
        {"max_timestep": 1001},
        {"min_snr_gamma": -1},
    ],
)
def test_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        DiffusionObjective(stepped_schedule(), **kwargs)


def test_timesteps_stay_in_window_and_cover_it():
    objective = DiffusionObjective(stepped_schedule(), min_timestep=200, max_timestep=400)
    timesteps = objective.sample_timesteps(4000, torch.Generator().manual_seed(0))
    assert timesteps.min().item() == 200 and timesteps.max().item() == 399


def test_offset_noise_adds_one_draw_per_channel():
    objective = DiffusionObjective(stepped_schedule(), noise_offset=0.1)
    shape = (2, 3, 4, 5)
    noise = objective.sample_noise(shape, torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    base = randn(shape, replay)
    offset = randn((2, 3, 1, 1), replay)
    assert torch.allclose(noise, base + 0.1 * offset)
    assert not torch.allclose(noise, base)


def test_zero_terminal_snr_rescale():
    original = sd_schedule()
    rescaled = rescale_zero_terminal_snr(original)
    assert rescaled[-1].item() == 0.0
    assert (rescaled[-1] / (1 - rescaled[-1])).item() == 0.0
    assert rescaled[0].item() == pytest.approx(original[0].item(), abs=1e-12)
    assert bool(torch.all(rescaled[1:] <= rescaled[:-1]))
    # The rescale is a shift and scale of sqrt(abar): check one interior point by hand.
    root = original.sqrt()
    expected_mid = ((root[500] - root[-1]) * root[0] / (root[0] - root[-1])) ** 2
    assert rescaled[500].item() == pytest.approx(expected_mid.item(), rel=1e-12)


def test_epsilon_refuses_zero_terminal_snr_but_v_accepts_it():
    table = rescale_zero_terminal_snr(sd_schedule())
    with pytest.raises(ConfigError, match="v_prediction"):
        DiffusionObjective(table, "epsilon")
    objective = DiffusionObjective(table, "v_prediction", min_snr_gamma=5)
    assert objective.loss_weights(torch.tensor([999])).item() == 0.0


def test_losses_are_deterministic_per_seed_and_leave_global_rng_alone():
    objective = DiffusionObjective(sd_schedule(), "v_prediction", min_snr_gamma=5, noise_offset=0.05)
    x0 = torch.linspace(-1, 1, 2 * 4 * 8 * 8).reshape(2, 4, 8, 8)
    model = lambda x, t: 0.5 * x  # noqa: E731
    torch.manual_seed(123)
    global_state = torch.get_rng_state()
    first, _ = objective.loss(model, x0, torch.Generator().manual_seed(9))
    again, _ = objective.loss(model, x0, torch.Generator().manual_seed(9))
    other, _ = objective.loss(model, x0, torch.Generator().manual_seed(10))
    assert torch.equal(torch.get_rng_state(), global_state)
    assert first.item() == again.item() and first.item() != other.item()


def test_fixed_validation_draws_reproduce_the_same_loss():
    objective = DiffusionObjective(sd_schedule(), "epsilon")
    x0 = torch.ones(3, 4, 8, 8)
    model = lambda x, t: 0.1 * x  # noqa: E731
    draws = fixed_validation_noise(objective, x0.shape, seed=42)
    assert set(draws) == {"noise", "timesteps"} and draws["timesteps"].shape == (3,)
    first, _ = objective.loss(model, x0, **draws)
    second, _ = objective.loss(model, x0, **fixed_validation_noise(objective, x0.shape, seed=42))
    third, _ = objective.loss(model, x0, **fixed_validation_noise(objective, x0.shape, seed=43))
    assert first.item() == second.item() != third.item()


# ---------------------------------------------------------------- rectified flow


def test_flow_interpolation_convention():
    x0, noise = torch.full((2, 3), 2.0), torch.full((2, 3), -1.0)
    state = RectifiedFlowObjective.interpolate(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.equal(state[0], x0[0]) and torch.equal(state[1], noise[1])
    mid = RectifiedFlowObjective.interpolate(x0, noise, torch.tensor([0.25, 0.25]))
    assert torch.allclose(mid, torch.full((2, 3), 0.75 * 2.0 - 0.25))


def test_flow_time_timestep_round_trip_for_scratch_networks():
    objective = RectifiedFlowObjective(timestep_scale=250.0)
    s = torch.tensor([0.0, 0.1, 0.5, 1.0])
    assert torch.allclose(objective.flow_time_to_timestep(s), torch.tensor([0.0, 25.0, 125.0, 250.0]))
    assert torch.allclose(objective.timestep_to_flow_time(objective.flow_time_to_timestep(s)), s)


def test_flow_loss_is_zero_for_the_exact_velocity_through_the_timestep_mapping():
    # x0 is the constant c, so the exact velocity at (z, s) is (z - c) / s; the model only
    # knows s through the timestep, so a wrong mapping would show up as a nonzero loss.
    c = torch.tensor([1.5, -0.5, 2.0])
    objective = RectifiedFlowObjective(timestep_scale=1000.0)
    model = lambda z, t: (z - c) / (t / 1000.0)[:, None]  # noqa: E731
    x0 = c.expand(64, 3)
    loss, stats = objective.loss(model, x0, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-9
    assert stats["flow_time"].shape == (64,)
    wrong_mapping = RectifiedFlowObjective(timestep_scale=500.0)
    assert wrong_mapping.loss(model, x0, torch.Generator().manual_seed(0))[0].item() > 1e-2


def test_flow_loss_target_is_noise_minus_data():
    objective = RectifiedFlowObjective()
    x0, noise = torch.full((1, 2), 3.0), torch.full((1, 2), 1.0)
    loss, _ = objective.flow_loss(lambda z, t: torch.zeros_like(z), x0, noise, torch.tensor([0.3]))
    assert loss.item() == pytest.approx(4.0)  # (1 - 3)^2


def test_logit_normal_flow_time_statistics():
    objective = RectifiedFlowObjective(time_sampling="logit_normal", logit_mean=0.5, logit_std=0.8)
    s = objective.sample_flow_time(20000, torch.Generator().manual_seed(1))
    assert bool(torch.all((s > 0) & (s < 1)))
    logits = torch.log(s / (1 - s))
    assert logits.mean().item() == pytest.approx(0.5, abs=0.03)
    assert logits.std().item() == pytest.approx(0.8, abs=0.03)
    uniform = RectifiedFlowObjective().sample_flow_time(20000, torch.Generator().manual_seed(1))
    assert uniform.mean().item() == pytest.approx(0.5, abs=0.01)
    assert uniform.std().item() == pytest.approx(12**-0.5, abs=0.01)


def test_flow_sampling_is_deterministic_per_seed():
    objective = RectifiedFlowObjective(time_sampling="logit_normal")
    first = objective.sample_flow_time(8, torch.Generator().manual_seed(5))
    assert torch.equal(first, objective.sample_flow_time(8, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, objective.sample_flow_time(8, torch.Generator().manual_seed(6)))


def test_bad_flow_settings_are_config_errors():
    with pytest.raises(ConfigError):
        RectifiedFlowObjective(time_sampling="cosine")
    with pytest.raises(ConfigError):
        RectifiedFlowObjective(logit_std=0)


# ---------------------------------------------------------------- v -> flow bridge


def exact_v_model(table: torch.Tensor, c: torch.Tensor):
    """An exact v-predictor for data that is always ``c`` under ``table`` interpolated linearly
    over continuous t (computed with numpy, independently of the bridge)."""
    grid = np.arange(table.numel(), dtype=np.float64)

    def model(x_t, timestep, **cond):
        abar = torch.from_numpy(np.interp(timestep.double().numpy(), grid, table.numpy()))
        alpha = abar.sqrt().reshape(-1, *([1] * (x_t.ndim - 1)))
        sigma = (1 - abar).sqrt().reshape(alpha.shape)
        eps = (x_t.double() - alpha * c) / sigma
        return (alpha * eps - sigma * c).to(x_t.dtype)

    return model


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_bridge_time_mapping_round_trips(zero_terminal_snr):
    table = sd_schedule()
    if zero_terminal_snr:
        table = rescale_zero_terminal_snr(table)
    bridge = VPredictionFlowBridge(table)
    timesteps = torch.tensor([0.0, 1.0, 17.5, 250.0, 500.25, 998.0, 999.0])
    if zero_terminal_snr:
        timesteps = timesteps[:-1]  # the zero-SNR step's neighbourhood is steep in t
    flow_time = bridge.timestep_to_flow_time(timesteps)
    assert torch.allclose(bridge.flow_time_to_timestep(flow_time), timesteps, atol=2e-3)
    s = torch.linspace(bridge.s_min, bridge.s_max, 101)
    assert torch.allclose(bridge.timestep_to_flow_time(bridge.flow_time_to_timestep(s)), s, atol=1e-6)
    assert bridge.flow_time_to_timestep(torch.tensor([0.0, 1.0])).tolist() == [0.0, 999.0]


def test_bridge_range_of_stable_diffusion_schedule():
    bridge = VPredictionFlowBridge(sd_schedule())
    assert bridge.s_max == pytest.approx(0.936, abs=1e-3)
    assert bridge.s_min == pytest.approx(0.0283, abs=1e-3)
    assert VPredictionFlowBridge(rescale_zero_terminal_snr(sd_schedule())).s_max == 1.0


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_bridge_turns_an_exact_v_predictor_into_the_exact_flow(zero_terminal_snr):
    table = sd_schedule()
    if zero_terminal_snr:
        table = rescale_zero_terminal_snr(table)
    bridge = VPredictionFlowBridge(table)
    c = torch.tensor([0.7, -1.2, 0.3, 2.0], dtype=torch.float64).reshape(1, 4, 1, 1)
    noise = randn((6, 4, 2, 2), torch.Generator().manual_seed(0), dtype=torch.float64)
    # From the bottom of the table to pure noise, including s above SD's s_max ~ 0.936.
    s = torch.tensor([bridge.s_min, 0.1, 0.4, 0.8, 0.95, 1.0], dtype=torch.float64)
    state = (1 - s.reshape(-1, 1, 1, 1)) * c + s.reshape(-1, 1, 1, 1) * noise
    velocity = bridge.velocity(exact_v_model(table, c), state, s)
    assert torch.allclose(velocity, noise - c, atol=1e-6)


def test_bridge_is_what_the_flow_objective_trains_through():
    table = sd_schedule()
    c = torch.tensor([0.5, -0.5]).reshape(1, 2, 1, 1)
    objective = RectifiedFlowObjective(v_bridge=VPredictionFlowBridge(table))
    model = exact_v_model(table, c.double())
    # Draw flow times inside the table's range: the pretrained model is already exact there.
    loss, _ = objective.flow_loss(
        model,
        c.expand(16, 2, 3, 3),
        randn((16, 2, 3, 3), torch.Generator().manual_seed(2)),
        torch.linspace(0.05, 0.93, 16),
    )
    assert loss.item() < 1e-8
    assert torch.allclose(
        objective.flow_time_to_timestep(torch.tensor([0.5])),
        objective.v_bridge.flow_time_to_timestep(torch.tensor([0.5])),
    )


def test_bridge_feeds_the_network_x_t_at_the_matching_timestep():
    table = sd_schedule()
    bridge = VPredictionFlowBridge(table)
    model = Recorder()
    timestep = torch.tensor([400.0])
    s = bridge.timestep_to_flow_time(timestep)
    z = torch.ones(1, 1, 2, 2)
    bridge.velocity(model, z, s)
    x_t, fed_timestep, _ = model.calls[0]
    alpha, sigma = table[400].sqrt().item(), (1 - table[400]).sqrt().item()
    assert fed_timestep.item() == pytest.approx(400.0, abs=1e-3)
    assert torch.allclose(x_t, z * (alpha + sigma), atol=1e-5)


def test_pretrained_flow_objective_requires_a_v_prediction_base():
    with pytest.raises(ConfigError, match="v-prediction base"):
        pretrained_flow_objective("epsilon", sd_schedule())
    objective = pretrained_flow_objective("v_prediction", sd_schedule(), time_sampling="logit_normal")
    assert objective.v_bridge is not None and objective.time_sampling == "logit_normal"
    assert objective.flow_time_to_timestep(torch.tensor([1.0])).item() == 999.0
